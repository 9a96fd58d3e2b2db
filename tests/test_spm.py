"""SentencePiece unigram (data.SentencePieceTokenizer, T5's tokenizer) against the sentencepiece package.

    python -m pytest -q tests/test_spm.py

The spec is sentencepiece.SentencePieceProcessor (0.2.3, pinned in requirements-dev.txt: its scoring
changed in that release). The models are trained here with sentencepiece's own trainer on a small
corpus written in this file, under several normalizer settings, or serialized by hand (CRAFTED) to
reach exact ties and float32 rounding that trained models only hit by chance.
"""
import io
import random
import struct

import pytest
import sentencepiece as spm
import torch

import data

CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs playing with a frisbee in the park.",
    "A woman is holding an umbrella in the rain.", "The cat is sleeping on a laptop keyboard.",
    "A plate of food with broccoli and carrots.", "People walking down a busy city street at night.",
    "A red double decker bus parked on the side of the road.", "A giraffe eating leaves from a tall tree.",
]
QUESTIONS = [
    "What color is the shirt?", "How many people are there?", "Is this a kitchen?", "What sport is being played?",
    "Is the giraffe eating leaves?", "vqa: what is the man holding?", "caption: <sep> gqa: where is it?",
]
FOREIGN = ["Un café crème au résumé naïf.", "Straße über Ærø und Åland.", "ﬁne ﬂowers", "Ｆｕｌｌ ｗｉｄｔｈ"]
SYLLABLES = ["ka", "lo", "mi", "ta", "ren", "sho", "pa", "ve", "zu", "qui", "ne", "dor", "bel", "fi", "gra", "tio"]

# Strings every model is checked on (plus random ones): the cases the normalizer and the lattice must get right.
CASES = CAPTIONS + QUESTIONS + FOREIGN + [
    "Ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ １２３！", "ﬁne ﬂower ﬀ ﬃ ﬄ", "① ½ ™ ㎏ Ⅻ ㈱ ¹²³ ｶﾀｶﾅ",  # NFKC
    "e\u0301 a\u0308 n\u0303 o\u0323\u0302 ｌ\u0301 A\u030a", "Åland Å A\u030a",  # combining marks
    "a  b   c    d", "  leading", "trailing   ", "   both   ", " ", "  ", "", "\n", "\t",  # spaces
    "tab\tand\nnewline\r\nend\n", "\x01\x02control\x07chars\x7f\x1f x\x0b\x0cy", "\x01", " \x01 ",
    "nbsp\u00a0and\u3000ideographic\u2003em\u2028line\u1680ogham\u0085nel", "zero\u200bwidth\ufeffbom\u200d",
    "OOV 日本語のテキスト 한국어 Ελληνικά Русский", "emoji 😀🎉👍🏽 👨\u200d👩\u200d👧 🇧🇪", "{}<>~^|\\` @#$%&*",
    "▁", "a▁b ▁ ▁▁", "<extra_id_0> </s> <pad> <unk>", "kalo" * 30, "x" * 40 + " " + "kalomi" * 8,
    "?!?!..,,;;", "don't can't it's", "1234567890 3.14 1,000", "\ufffd", "a\u0300\u0301\u0302\u0303",
]
POOL = list("abcdefghijklmnoprstuvwxyz ABCGT.,?!'0123 ") + list(
    "éèüßÆøÅﬁﬂＦｕｌ①½™\u0301\u0308\u0323\u00a0\u3000\t\n\r\x01\x7f\u0085\u200b\u2028\u2581\ufeff😀日本語한{}<>") + [
    "ka", "lo", "ren", "the ", "  ", " a ", "kalo", "caption:", "<sep>"]


def random_texts(seed, n, max_len=12):
    rng = random.Random(seed)
    return ["".join(rng.choices(POOL, k=rng.randint(0, max_len))) for _ in range(n)]


def corpus():
    rng = random.Random(0)
    words = " ".join(CAPTIONS + QUESTIONS + FOREIGN).split() + [
        "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(250)]
    return [" ".join(rng.choices(words, k=rng.randint(4, 14))) for _ in range(2500)]


# name -> options of SentencePieceTrainer (T5's layout unless said: <pad> 0, </s> 1, <unk> 2, no <s>)
SETTINGS = {
    "nmt_nfkc": {},  # T5's normalizer: NFKC + the NMT rules, as a precompiled charsmap
    "identity": {"normalization_rule_name": "identity"},  # no charsmap at all
    "nfkc_cf": {"normalization_rule_name": "nfkc_cf"},  # NFKC + case folding
    "no_dummy_prefix": {"add_dummy_prefix": False},
    "keep_spaces": {"remove_extra_whitespaces": False},
    "user_symbols": {"user_defined_symbols": ["caption:", "<sep>", "ﬁ", "日本", "kalo"]},
    "spm_default_ids": {"pad_id": -1, "eos_id": 2, "unk_id": 0, "bos_id": 1},  # sentencepiece's defaults
}


@pytest.fixture(scope="module")
def models():
    """{name: spiece.model bytes}, trained once for the module."""
    lines, out = corpus(), {}
    for name, options in SETTINGS.items():
        f = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="unigram",
                                       vocab_size=320, minloglevel=2,
                                       **{"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1, **options})
        out[name] = f.getvalue()
    return out


def pair(blob):
    return data.SentencePieceTokenizer(blob), spm.SentencePieceProcessor(model_proto=blob)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_encode_and_normalize_match_sentencepiece(models, name):
    ours, ref = pair(models[name])
    for s in CASES + random_texts(hash(name) % 1000, 1500) + CASES:  # CASES again: now from the caches
        assert ours.normalize(s) == ref.normalize(s), repr(s)
        assert ours.encode(s) == ref.encode(s), repr(s)


def test_the_settings_are_what_they_claim(models):
    """The trained models differ where the settings say (so the parity above covers each rule)."""
    tok = {name: data.SentencePieceTokenizer(blob) for name, blob in models.items()}
    assert tok["nmt_nfkc"].charsmap is not None and tok["identity"].charsmap is None
    assert tok["nmt_nfkc"].normalize("ﬁ Ｆ\tA") == "▁fi▁F▁A" and tok["identity"].normalize("ﬁ Ｆ") == "▁ﬁ▁Ｆ"
    assert tok["nfkc_cf"].normalize("ﬁ Ｆ") == "▁fi▁f"
    assert tok["no_dummy_prefix"].normalize(" a  b ") == "a▁b" and tok["keep_spaces"].normalize(" a  b ") == "▁▁a▁▁b▁"
    user = tok["user_symbols"]
    assert user.normalize("ﬁ日本") == "▁ﬁ日本" and [user.pieces[i] for i in user.encode("ﬁ日本")] == ["▁", "ﬁ", "日本"]


def test_long_text_matches_sentencepiece(models):
    """A text whose path score passes -1e5 (re-based by sentencepiece) with most words searched again after
    large scores, where the cached paths are out of their float32 limits."""
    ours, ref = pair(models["nmt_nfkc"])
    rng = random.Random(5)
    words = " ".join(CAPTIONS + FOREIGN).split() + ["日本", "x{y}", "kalomi", "quive"]
    text = " ".join(rng.choices(words, k=12000))
    assert ours.encode(text) == ref.encode(text)


@pytest.mark.parametrize("name", ["nmt_nfkc", "no_dummy_prefix", "keep_spaces", "user_symbols"])
def test_decode_matches_sentencepiece(models, name):
    ours, ref = pair(models[name])
    for s in CASES:
        ids = ref.encode(s)
        if ours.unk_id not in ids:  # sentencepiece writes " ⁇ " for <unk>, we its name (or nothing)
            assert ours.decode(ids) == ref.decode(ids), repr(s)
    rng = random.Random(6)
    plain = [i for i in range(len(ours.pieces)) if i not in ours.special_ids]
    for _ in range(500):  # arbitrary sequences: leading "▁" pieces, "▁" alone, ...
        ids = rng.choices(plain, k=rng.randint(1, 5))
        assert ours.decode(ids) == ref.decode(ids), [ours.pieces[i] for i in ids]


def test_t5_special_tokens_and_sentinels(models):
    ours, ref = pair(models["nmt_nfkc"])
    n = ref.get_piece_size()
    assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id, ours.mask_id) == (0, 1, 2, None, None)
    assert len(ours) == n + 100
    assert ours.id_to_piece(n + 99) == "<extra_id_0>" and ours.id_to_piece(n) == "<extra_id_99>"
    ids = ours.encode("What color is the shirt?")
    assert ours.wrap(ids) == ids + [1]  # T5: </s> appended, no BOS
    assert ours.decode(ids + [n + 99, 1]) == "What color is the shirt?<extra_id_0></s>"  # names, as transformers
    assert ours.decode([0] + ids) == "<pad> What color is the shirt?"  # text before: "▁" is a space again
    skipped = ours.decode([0] + ids + [n + 99, 2, n, 1], skip_special=True)
    assert skipped == ref.decode(ids) == "What color is the shirt?"
    ids = ours.encode("the {cat}")  # "{" and "}" are unknown: dropped with the other specials
    assert ids.count(2) == 2 and ours.decode(ids, skip_special=True) == "the cat" != ref.decode(ids)
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([n + 100])
    other = data.SentencePieceTokenizer(models["spm_default_ids"])
    ref = spm.SentencePieceProcessor(model_proto=models["spm_default_ids"])
    assert (other.unk_id, other.bos_id, other.eos_id, other.pad_id) == (ref.unk_id(), ref.bos_id(), ref.eos_id(), None)
    assert ref.pad_id() == -1 and other.wrap([5]) == [5, ref.eos_id()]
    assert ours.fingerprint != other.fingerprint and len(ours.fingerprint) == 64


# ---- hand-serialized models -------------------------------------------------------------------
def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number, value):
    """One protobuf field: float -> 32-bit, int/bool -> varint, str/bytes -> length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def model_proto(pieces, trainer=(), normalizer=((1, "identity"),)):
    """A ModelProto: <pad> <s>... T5's three specials, then pieces [(piece, score, type)] (type 1 NORMAL,
    4 USER_DEFINED, 5 UNUSED); trainer / normalizer: extra (field, value) pairs of their specs."""
    specials = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]
    out = b"".join(_field(1, _field(1, p) + _field(2, float(s)) + _field(3, t)) for p, s, t in specials + pieces)
    out += _field(2, _field(3, 1) + b"".join(_field(k, v) for k, v in trainer))
    return out + _field(3, b"".join(_field(k, v) for k, v in normalizer))


A, B = -1.5, -0.5 + 2 ** -25  # "▁a" + "b" = -1.99999997 in double, -2.0 in float32
CRAFTED = {  # name: (pieces, text, sentencepiece's pieces)
    "tie keeps the first (longest last piece)": ([("▁a", -1.0, 1), ("b", -1.0, 1), ("▁ab", -2.0, 1)], "ab", ["▁ab"]),
    "sums compared in float32": ([("▁a", A, 1), ("b", B, 1), ("▁ab", -2.0, 1)], "ab", ["▁ab"]),
    "sums compared in float32, reversed": ([("▁a", A, 1), ("b", B + 2 ** -23, 1), ("▁ab", -2.0, 1)], "ab",
                                           ["▁a", "b"]),
    "unknown edge at min score - 10, no more": ([("▁", -1.0, 1), ("xy", -10.0, 1), ("y", 10.25, 1)], "xy",
                                                 ["▁", "x", "y"]),
    "unknown edge at min score - 10, no less": ([("▁", -1.0, 1), ("xy", -10.0, 1), ("y", 9.75, 1)], "xy",
                                                ["▁", "xy"]),
    "unknown edge, float32 compare": ([("▁a", 10 + 2 ** -20, 1), ("▁az", -20.0, 1)], "az", ["▁az"]),
    "unknowns merged": ([("▁", -1.0, 1), ("a", -1.0, 1)], "xyzaüq", ["▁", "xyz", "a", "üq"]),
    "unknowns merged across words": ([("a", -1.0, 1)], "x ya z", ["▁x▁y", "a", "▁z"]),  # no "▁" piece
    "user-defined scores 0.1 (utf-8 bytes - 1)": ([("▁", -1.0, 1), ("é", 0.1, 1), ("éé", -9.0, 4)], "éé",
                                                  ["▁", "éé"]),
    "unused pieces never match": ([("▁", -1.0, 1), ("▁ab", -1.0, 5), ("a", -2.0, 1), ("b", -2.0, 1)], "ab",
                                  ["▁", "a", "b"]),
    "unused single character is unknown": ([("▁", -1.0, 1), ("a", -2.0, 5)], "aa", ["▁", "aa"]),
    "piece with an inner ▁ (no word split)": ([("▁", -1.0, 1), ("a", -2.0, 1), ("a▁b", -1.0, 1), ("b", -2.0, 1)],
                                            "a b ab", ["▁", "a▁b", "▁", "a", "b"]),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_lattices(name):
    pieces, text, expected = CRAFTED[name]
    ours, ref = pair(model_proto(pieces))
    assert ref.encode(text, out_type=str) == expected  # the case does reach the rule its name gives
    assert ours.encode(text) == ref.encode(text)


def test_word_cache_is_exact_after_any_prefix():
    """"▁a"+"b" beats "▁ab" at the start of a text, but not after a path scoring ~ -1300, where float32
    rounds "▁a"'s sum away: a word's cached segmentation is only reused where rounding cannot turn it."""
    ours, ref = pair(model_proto([("▁a", -1.5 + 2 ** -20, 1), ("b", -0.5000005, 1), ("▁ab", -2.0, 1),
                                  ("▁", -3.0, 1)]))
    late = "z" * 100 + " ab"
    assert ref.encode("ab", out_type=str) == ["▁a", "b"] and ref.encode(late, out_type=str)[-1] == "▁ab"
    for text in ["ab", late, "ab " + late, late + " ab"]:
        assert ours.encode(text) == ref.encode(text), text


def test_long_word_rebases_scores_inside_the_lattice():
    """One 9,000-character word of unknowns scores ~ -1e5, where sentencepiece re-bases the path scores
    to 0; without that, float32 (1/128 there) would round "a"'s 2^-9 edge over "ab" away."""
    ours, ref = pair(model_proto([("a", -1.5, 1), ("b", -0.5 + 2 ** -9, 1), ("ab", -2.0, 1)]))
    text = "z" * 9000 + "ab"
    assert ref.encode(text, out_type=str)[-2:] == ["a", "b"] and ref.encode("z" * 8000 + "ab", out_type=str)[-1] == "ab"
    assert ours.encode(text) == ref.encode(text)


def test_special_ids_are_control_pieces_named_by_the_trainer_spec():
    blob = model_proto([("▁", -1.0, 1), ("a", -2.0, 1), ("<s>", 0.0, 3)], trainer=((47, "a"), (48, "<nope>")))
    ref = spm.SentencePieceProcessor(model_proto=blob)
    assert (ref.bos_id(), ref.eos_id(), ref.pad_id(), ref.unk_id()) == (5, -1, -1, 2)  # "a" is no CONTROL piece
    with pytest.raises(ValueError, match="no CONTROL piece 'a'"):  # T5 needs its </s>
        data.SentencePieceTokenizer(blob)
    blob = model_proto([("▁", -1.0, 1), ("a", -2.0, 1), ("<s>", 0.0, 3)], trainer=((48, "a"),))
    ours, ref = pair(blob)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (5, 1, None, 2)
    assert (ref.bos_id(), ref.eos_id(), ref.pad_id(), ref.unk_id()) == (5, 1, -1, 2)


def test_crafted_normalizer_rules():
    """Options and symbols that trained models do not combine: no escaping, a user symbol holding spaces
    (no word-by-word normalization then), and remove_extra_whitespaces over a replacement."""
    pieces = [("▁", -1.0, 1)] + [(c, -2.0, 1) for c in "abxy"] + [("a  b", 0.0, 4), (" ", -1.0, 1)]
    for normalizer in [((1, "identity"), (5, False)), ((1, "identity"), (4, False)), ((1, "identity"),)]:
        ours, ref = pair(model_proto(pieces, normalizer=normalizer))
        assert ours._by_word is False
        for s in ["a  b", "xa  by", " a  b  a b ", "", "   ", "a\tb", "x   y"]:
            assert ours.normalize(s) == ref.normalize(s) and ours.encode(s) == ref.encode(s), (normalizer, s)


def test_refused_models_name_the_problem(models, tmp_path):
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=f, vocab_size=320,
                                   minloglevel=2, model_type="bpe")
    with pytest.raises(ValueError, match="model type BPE is not supported"):
        data.SentencePieceTokenizer(f.getvalue())
    with pytest.raises(ValueError, match="byte_fallback=true is not supported"):
        data.SentencePieceTokenizer(model_proto([("▁", -1.0, 1)], trainer=((35, True),)))
    byte_piece = model_proto([("▁", -1.0, 1), ("<0x41>", 0.0, 6)])
    with pytest.raises(RuntimeError):
        spm.SentencePieceProcessor(model_proto=byte_piece)
    with pytest.raises(ValueError, match="byte pieces without byte_fallback"):
        data.SentencePieceTokenizer(byte_piece)
    with pytest.raises(ValueError, match="treat_whitespace_as_suffix=true"):
        data.SentencePieceTokenizer(model_proto([("▁", -1.0, 1)], trainer=((24, True),)))
    with pytest.raises(ValueError, match="trie size"):
        data.SentencePieceTokenizer(model_proto([("▁", -1.0, 1)], normalizer=((2, b"\xff\0\0\0abcd"),)))
    with pytest.raises(ValueError, match="truncated varint"):
        data.SentencePieceTokenizer(models["nmt_nfkc"] + b"\x80")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.SentencePieceTokenizer(str(tmp_path / "nope.model"))
    path = tmp_path / "spiece.model"
    path.write_bytes(models["nmt_nfkc"])
    from_path, from_bytes = data.SentencePieceTokenizer(str(path)), data.SentencePieceTokenizer(models["nmt_nfkc"])
    assert from_path.fingerprint == from_bytes.fingerprint


def test_load_tokenizer_reads_both_kinds(models, tmp_path):
    path = str(tmp_path / "t5.pt")
    t5 = data.SentencePieceTokenizer(models["nmt_nfkc"])
    torch.save({"arch": "t5", "tokenizer": t5.to_data()}, path)
    tok = data.load_tokenizer(path)
    assert isinstance(tok, data.SentencePieceTokenizer) and tok.fingerprint == t5.fingerprint
    assert tok.encode(CAPTIONS[0]) == t5.encode(CAPTIONS[0]) and t5.to_data()["spiece_model"].dtype == torch.uint8
    assert data.SentencePieceTokenizer.from_checkpoint(path).fingerprint == t5.fingerprint
    with pytest.raises(ValueError, match="not a BPETokenizer"):
        data.BPETokenizer.from_checkpoint(path)
    bpe = data.BPETokenizer(**data.learn_bpe(CAPTIONS, 300))
    torch.save({"arch": "bart", "tokenizer": bpe.to_data()}, path)
    assert data.load_tokenizer(path).encode(CAPTIONS[1]) == bpe.encode(CAPTIONS[1])
    assert data.BPETokenizer.from_checkpoint(path).fingerprint == bpe.fingerprint
    for ckpt, message in [({"arch": "vit"}, "no tokenizer"), ({"tokenizer": {"vocab": {}}}, "unknown tokenizer kind"),
                          ({"tokenizer": {"spiece_model": torch.zeros(3)}}, "torch.uint8 tensor")]:
        torch.save(ckpt, path)
        with pytest.raises(ValueError, match=message):
            data.load_tokenizer(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        data.load_tokenizer(str(tmp_path / "nope.pt"))


def test_transformers_t5_tokenizer_agrees_on_plain_text(models):
    """transformers' T5 tokenizer (the Rust pipeline: Precompiled charsmap, whitespace split, Metaspace
    per word, Unigram) built from the same pieces and charsmap gives sentencepiece's ids on ordinary
    captions and questions; it differs on unusual characters (see the report in the module's docs)."""
    transformers = pytest.importorskip("transformers")
    blob = models["nmt_nfkc"]
    ours, ref = pair(blob)
    spec = data.read_spiece_model(blob)
    hf = transformers.T5Tokenizer(vocab=[(p, s) for p, s, _ in spec["pieces"]], extra_ids=0,
                                  _spm_precompiled_charsmap=spec["normalizer"]["precompiled_charsmap"])
    for s in CAPTIONS + QUESTIONS + FOREIGN + ["  two  spaces ", "tab\tnew\nline", "ﬁne Ｆｕｌｌ"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s) == hf.encode(s, add_special_tokens=False), s
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True), s
