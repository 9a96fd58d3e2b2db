"""Data: byte-level BPE, VQAv2 and Karpathy COCO captions from the official files, image
preprocessing with Pillow, collate functions, and a synthetic world written in the real formats.

    python data.py shapes --out data/shapes [--n-images 3000] [--seed 0]   # the synthetic world
    python -m pytest -q tests/test_bpe.py tests/test_data.py                 # the tests

Layout read by the loaders (the real datasets and the synthetic world alike):

    DATA/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json    VQAv2 questions
    DATA/v2_mscoco_{train2014,val2014}_annotations.json            VQAv2 annotations (10 answers each)
    DATA/dataset_coco.json                                         Karpathy split + 5 captions per image
    IMAGES/{train2014,val2014}/COCO_{split}_{image_id:012d}.jpg    COCO images

Typical use (a trainer):

    tok = BPETokenizer.from_checkpoint("ckpt/roberta-large.pt")
    vqa = prepare_vqa("DATA", tok)                                # parsed + tokenised once, cached
    train = VQADataset(vqa["splits"]["train"])                    # items carry image keys
    collate = functools.partial(collate_vqa, pad_id=tok.pad_id, num_answers=len(vqa["answers"]))
    images = Images("IMAGES", size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = images(train[0]["image"])                            # (3, 224, 224), or use cached features

Runtime imports: torch, numpy, PIL, tqdm, the standard library and eval.py.
"""
import argparse
import functools
import hashlib
import io
import json
import math
import os
import random
import tempfile
import unicodedata
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from eval import normalize_answer, vqa_accuracy

# =============================================================================================
# Byte-level BPE (GPT-2, RoBERTa, BART)
# =============================================================================================


def bytes_to_unicode():
    """GPT-2's reversible table byte -> printable character. Printable Latin-1 bytes map to
    themselves; the 68 others (control characters, space, ...) map to chr(256 + n) in byte order,
    so a space becomes "Ġ" and a newline "Ċ". BPE then works on strings with no whitespace."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# Character classes of GPT-2's pre-tokenisation pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_SPACE, _LETTER, _NUMBER, _OTHER = 0, 1, 2, 3
# \s of the `regex` module and of the Rust tokenizers is Unicode White_Space: str.isspace()
# minus the four information separators U+001C..U+001F (which isspace() counts).
_NOT_SPACE = frozenset("\x1c\x1d\x1e\x1f")
_CONTRACTIONS_1 = frozenset("stmd")          # 's 't 'm 'd
_CONTRACTIONS_2 = frozenset(("re", "ve", "ll"))  # 're 've 'll
_CLASS_CACHE = {}


def _char_class(c):
    """\\s, \\p{L} (categories L*), \\p{N} (categories N*) or anything else, from unicodedata.
    Characters assigned after Python's Unicode version (unicodedata.unidata_version) are "other"
    here and may be letters for a newer regex engine: the only known source of difference."""
    k = _CLASS_CACHE.get(c)
    if k is None:
        if c.isspace() and c not in _NOT_SPACE:
            k = _SPACE
        else:
            cat = unicodedata.category(c)[0]
            k = _LETTER if cat == "L" else _NUMBER if cat == "N" else _OTHER
        _CLASS_CACHE[c] = k
    return k


def pretokenize(text):
    """Split text exactly like GPT-2's regex (first matching alternative at each position):
    a contraction ('s 't 're 've 'm 'll 'd, lower case only), else an optional single space followed
    by a run of letters, of digits or of other symbols, else a whitespace run. A whitespace run
    followed by a non-space gives up its last character (`\\s+(?!\\S)`), so that the next word can
    take it as its leading space: "a   b" -> ["a", "  ", " b"]; a lone tab before a word stays alone:
    "a\\tb" -> ["a", "\\t", "b"]."""
    n = len(text)
    cls = [_char_class(c) for c in text]
    words, i = [], 0
    while i < n:
        if text[i] == "'":
            if text[i + 1:i + 3] in _CONTRACTIONS_2:
                words.append(text[i:i + 3])
                i += 3
                continue
            if text[i + 1:i + 2] in _CONTRACTIONS_1:
                words.append(text[i:i + 2])
                i += 2
                continue
        start = i
        if text[i] == " " and i + 1 < n and cls[i + 1] != _SPACE:
            i += 1  # the optional leading space of ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        k = cls[i]
        j = i + 1
        while j < n and cls[j] == k:
            j += 1
        if k == _SPACE and j < n and j - start > 1:
            j -= 1  # \s+(?!\S): leave the last whitespace before a non-space; a single one is \s+
        words.append(text[start:j])
        i = j
    return words


class BPETokenizer:
    """Byte-level BPE, identical to Hugging Face's GPT-2 / RoBERTa tokenizers (tested against the
    Rust-backed GPT2Tokenizer / RobertaTokenizer of transformers 5, which has no slow ones left).

    BPETokenizer(vocab, merges): vocab is a path to vocab.json / encoder.json or a dict
    {token: id}; merges a path to merges.txt / vocab.bpe or a list of lines "Ġ t" (a "#version"
    header and empty lines are skipped). BPETokenizer.from_checkpoint(path) reads the
    {"vocab", "merges"} dict that models.convert stores under ckpt["tokenizer"].

    Special tokens are looked up by name: bos_id = <s> (RoBERTa, BART) or <|endoftext|> (GPT-2),
    eos_id = </s> or <|endoftext|>, pad_id = <pad>, mask_id = <mask>; None where the vocab lacks
    them. Deviation from HF: special-token strings inside the text are encoded as plain text
    (HF would map a literal "<s>" in the text to the special id); callers add specials by id."""

    def __init__(self, vocab, merges):
        if isinstance(vocab, (str, os.PathLike)):
            vocab = _read_json(vocab)
        if isinstance(merges, (str, os.PathLike)):
            with _open_source(merges) as f:
                merges = f.read().split("\n")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError("BPETokenizer: vocab must be a dict {token: id}")
        self.vocab = dict(vocab)
        self.merges = [m for m in merges if m and not m.startswith("#version")]
        self.ranks = {}
        for rank, line in enumerate(self.merges):
            pair = tuple(line.split(" "))
            if len(pair) != 2:
                raise ValueError(f"BPETokenizer: bad merge line {line!r} (expected two symbols and one space)")
            self.ranks.setdefault(pair, rank)  # a repeated pair keeps its first (lowest) rank
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.bos_id = self._first_id("<s>", "<|endoftext|>")
        self.eos_id = self._first_id("</s>", "<|endoftext|>")
        self.pad_id = self._first_id("<pad>")
        self.mask_id = self._first_id("<mask>")
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id,
                                        self._first_id("<unk>")) if i is not None}
        self._cache = {}

    @classmethod
    def from_checkpoint(cls, path):
        """The tokenizer stored in a converted checkpoint (ckpt["tokenizer"])."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
            raise ValueError(f"{path}: no tokenizer in this checkpoint (convert a model directory that has "
                             "vocab.json and merges.txt)")
        return cls(ckpt["tokenizer"]["vocab"], ckpt["tokenizer"]["merges"])

    def _first_id(self, *names):
        for name in names:
            if name in self.vocab:
                return self.vocab[name]
        return None

    def to_data(self):
        """{"vocab": {token: id}, "merges": [lines]}: what checkpoints store."""
        return {"vocab": dict(self.vocab), "merges": list(self.merges)}

    @functools.cached_property
    def fingerprint(self):
        """sha256 of vocab and merges: identifies the tokenizer in cache keys."""
        blob = json.dumps([sorted(self.vocab.items()), self.merges], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __len__(self):
        return len(self.vocab)

    def bpe(self, word):
        """Merge the symbols of one pre-token (a byte-mapped string) by rank: repeatedly merge every
        occurrence of the lowest-ranked adjacent pair, left to right. Cached per word."""
        out = self._cache.get(word)
        if out is not None:
            return out
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, math.inf), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == math.inf:
                break
            a, b = self.merges[rank].split(" ")
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            out = [self.vocab[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"BPETokenizer: symbol {e.args[0]!r} is not in the vocabulary") from None
        self._cache[word] = out
        return out

    def encode(self, text, special=False):
        """Token ids of text. special=False: no special tokens (HF add_special_tokens=False).
        special=True: the model's own wrapping, as HF build_inputs_with_special_tokens: <s> ... </s>
        when the vocab has distinct bos and eos (RoBERTa, BART); nothing for GPT-2."""
        ids = []
        for word in pretokenize(text):
            ids.extend(self.bpe("".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))))
        return self.wrap(ids) if special else ids

    def wrap(self, ids):
        """Add the model's special tokens around already encoded ids (see encode)."""
        if self.bos_id is not None and self.eos_id is not None and self.bos_id != self.eos_id:
            return [self.bos_id] + list(ids) + [self.eos_id]
        return list(ids)

    def decode(self, ids, skip_special=False):
        """Text of token ids; invalid UTF-8 (a multi-byte character cut in the middle) becomes U+FFFD
        as in HF (errors="replace"). skip_special drops bos/eos/pad/mask/unk."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                if not skip_special:
                    out += self.id_to_token[i].encode("utf-8")
                continue
            token = self.id_to_token.get(i)
            if token is None:
                raise ValueError(f"BPETokenizer: id {i} is not in the vocabulary (size {len(self.vocab)})")
            out += bytes(CHAR_TO_BYTE[c] for c in token)
        return out.decode("utf-8", errors="replace")


# Special tokens of the two text models, in their own id order (RoBERTa: <s>=0, <pad>=1, </s>=2,
# <unk>=3, ..., <mask> last; GPT-2: <|endoftext|> last).
ROBERTA_SPECIALS_FIRST = ("<s>", "<pad>", "</s>", "<unk>")
SPECIALS_LAST = ("<mask>", "<|endoftext|>")


def learn_bpe(texts, vocab_size):
    """Learn a small byte-level BPE in the GPT-2 format from texts (for the tiny demo models).

    Vocabulary: <s> <pad> </s> <unk>, the 256 byte symbols, the learned merges, then <mask> and
    <|endoftext|>: the special tokens of RoBERTa and GPT-2 together, so one tokenizer serves both
    tiny models (its bos/eos are <s>/</s>). Merges never cross pre-tokens; each step merges the
    most frequent adjacent pair (ties: the smallest pair as strings); stops early when no pair
    occurs twice. Returns {"vocab": {token: id}, "merges": [lines]}."""
    base = len(ROBERTA_SPECIALS_FIRST) + 256 + len(SPECIALS_LAST)
    if vocab_size < base:
        raise ValueError(f"learn_bpe: vocab_size must be at least {base} (specials + 256 bytes)")
    counts = Counter()
    for text in texts:
        for word in pretokenize(text):
            counts["".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))] += 1
    words = [(list(w), c) for w, c in sorted(counts.items())]
    merges = []
    while base + len(merges) < vocab_size:
        pairs = Counter()
        for parts, c in words:
            for p in zip(parts, parts[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        a, b = best
        for parts, _ in words:
            i = 0
            while i + 1 < len(parts):
                if parts[i] == a and parts[i + 1] == b:
                    parts[i:i + 2] = [a + b]
                i += 1
    tokens = list(ROBERTA_SPECIALS_FIRST) + [BYTE_TO_CHAR[b] for b in range(256)]
    tokens += [a + b for a, b in merges] + list(SPECIALS_LAST)
    vocab = {}
    for t in tokens:  # a merge may rebuild a string that exists already: keep its first id
        vocab.setdefault(t, len(vocab))
    return {"vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}


# =============================================================================================
# Files: clear errors, atomic writes, a prepared-data cache that is never stale
# =============================================================================================

CACHE_VERSION = 1  # bump when the layout of prepared data changes


def _open_source(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    return open(path, encoding="utf-8")


def _read_json(path):
    with _open_source(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None


def atomic_write(path, write_fn, mode="wb"):
    """write_fn(file) into a temp file next to path, then os.replace: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False), mode="w")


def _cached(kind, sources, params, build, cache_dir):
    """build() once; later calls load the result. The file name is a hash of the source files'
    absolute paths, sizes and modification times, the parameters (tokenizer fingerprint, lengths)
    and CACHE_VERSION, so a changed source or option gives a new file, never a stale one."""
    key = {"kind": kind, "version": CACHE_VERSION, "params": params, "sources": []}
    for path in sources:
        st = os.stat(path)
        key["sources"].append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{kind}-{digest}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    data = build()
    atomic_write(path, lambda f: torch.save(data, f))
    return data


# =============================================================================================
# VQAv2
# =============================================================================================

VQA_QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
VQA_ANNOTATIONS = "v2_mscoco_{}_annotations.json"
KARPATHY = "dataset_coco.json"


def coco_image_key(subtype, image_id):
    """Image path relative to the images folder: 'train2014/COCO_train2014_000000000009.jpg'."""
    return f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg"


def vqa_files(data_dir, subtype):
    """Paths of the official question and annotation files of one split (e.g. 'train2014')."""
    return (os.path.join(data_dir, VQA_QUESTIONS.format(subtype)),
            os.path.join(data_dir, VQA_ANNOTATIONS.format(subtype)))


def read_vqa(data_dir, subtype):
    """Join the official questions and annotations of one split by question_id. Returns a list of
    dicts: question_id, image_id, image (key, see coco_image_key), question, answers (the 10 raw
    human answers), answer_type, question_type, multiple_choice_answer."""
    q_path, a_path = vqa_files(data_dir, subtype)
    questions = _read_json(q_path)
    annotations = _read_json(a_path)
    for path, obj, field in ((q_path, questions, "questions"), (a_path, annotations, "annotations")):
        if not isinstance(obj, dict) or field not in obj:
            raise ValueError(f"{path}: not a VQAv2 file (no '{field}' list)")
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    if len(by_qid) != len(questions["questions"]):
        raise ValueError(f"{q_path} has {len(questions['questions'])} questions but {a_path} has "
                         f"{len(by_qid)} annotations")
    records = []
    for q in questions["questions"]:
        a = by_qid.get(q["question_id"])
        if a is None or a["image_id"] != q["image_id"]:
            raise ValueError(f"{a_path}: no annotation for question {q['question_id']} (image {q['image_id']})")
        records.append({
            "question_id": q["question_id"], "image_id": q["image_id"],
            "image": coco_image_key(subtype, q["image_id"]), "question": q["question"],
            "answers": [x["answer"] for x in a["answers"]], "answer_type": a["answer_type"],
            "question_type": a["question_type"], "multiple_choice_answer": a["multiple_choice_answer"],
        })
    return records


def read_karpathy(path):
    """The images of dataset_coco.json: [{filepath, filename, imgid, split, cocoid, sentences}]."""
    obj = _read_json(path)
    if not isinstance(obj, dict) or "images" not in obj:
        raise ValueError(f"{path}: not a Karpathy split file (no 'images' list)")
    for img in obj["images"]:
        if img.get("split") not in ("train", "restval", "val", "test"):
            raise ValueError(f"{path}: image {img.get('cocoid')} has unknown split {img.get('split')!r}")
    return obj["images"]


def karpathy_split(split):
    """Karpathy's 'restval' images are training images."""
    return "train" if split == "restval" else split


def answer_vocab(answer_lists, k=3129):
    """The k most frequent normalised answers (eval.normalize_answer), ties broken by string.
    Frequency counts every human answer: a question whose 10 annotators all said "yes" adds 10
    to "yes". Fewer than k distinct answers give a shorter list."""
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


class AnswerVocab:
    """Answer strings <-> ids and the soft targets of a question.

    The soft target of answer a is eval.vqa_accuracy(a, human_answers): what predicting a would
    score. Only answers that can score > 0 are evaluated. A prediction p matches a human answer h
    either with the unanimity gate closed (a raw comparison after the whitespace step) or with it
    open (normalize_answer(p) == normalize_answer(h)); normalize_answer starts with that same
    whitespace step, so in both cases normalize_answer(p) == normalize_answer(h). The candidates
    are therefore the answers whose normalised form is that of some human answer."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        self._by_norm = {}
        for i, a in enumerate(self.answers):
            self._by_norm.setdefault(normalize_answer(a), []).append(i)

    def __len__(self):
        return len(self.answers)

    def targets(self, human_answers):
        """(ids, scores) of the answers with a non-zero soft target, ids ascending."""
        candidates = set()
        for h in set(human_answers):
            candidates.update(self._by_norm.get(normalize_answer(h), ()))
        ids, scores = [], []
        for i in sorted(candidates):
            s = vqa_accuracy(self.answers[i], human_answers)
            if s > 0:
                ids.append(i)
                scores.append(s)
        return ids, scores


def _ragged(lists, dtype=torch.long):
    """Flat tensor + offsets (len + 1) for a list of lists: compact and fast to save/load."""
    offsets = [0]
    for x in lists:
        offsets.append(offsets[-1] + len(x))
    flat = [v for x in lists for v in x]
    return torch.tensor(flat, dtype=dtype), torch.tensor(offsets, dtype=torch.long)


def encode_question(tokenizer, question, max_len):
    """<s> question </s> (the model's wrapping), the question truncated so the total is <= max_len."""
    room = max_len - len(tokenizer.wrap([]))
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for the question")
    return tokenizer.wrap(tokenizer.encode(question)[:room])


def _vqa_columns(records, tokenizer, vocab, max_len, desc):
    """The prepared form of one split: columns (lists / tensors) instead of a list of dicts."""
    input_ids, t_ids, t_scores = [], [], []
    for r in tqdm(records, desc=desc, unit="q", mininterval=1.0, disable=len(records) < 20000):
        input_ids.append(encode_question(tokenizer, r["question"], max_len))
        i, s = vocab.targets(r["answers"])
        t_ids.append(i)
        t_scores.append(s)
    ids_flat, ids_off = _ragged(input_ids)
    tid_flat, t_off = _ragged(t_ids)
    ts_flat, _ = _ragged(t_scores, dtype=torch.float32)
    return {
        "question_id": torch.tensor([r["question_id"] for r in records], dtype=torch.long),  # (M,)
        "image_id": torch.tensor([r["image_id"] for r in records], dtype=torch.long),        # (M,)
        "image": [r["image"] for r in records],
        "question": [r["question"] for r in records],
        "answer_type": [r["answer_type"] for r in records],
        "question_type": [r["question_type"] for r in records],
        "input_ids": ids_flat, "input_offsets": ids_off,        # ragged: question m = flat[off[m]:off[m+1]]
        "target_ids": tid_flat, "target_scores": ts_flat, "target_offsets": t_off,
    }


def prepare_vqa(data_dir, tokenizer, karpathy=None, num_answers=3129, max_len=20, cache_dir=None):
    """Parse, build the answer vocabulary, tokenise and compute soft targets once; cached on disk.

    Without karpathy: splits "train" (train2014) and "val" (val2014). With karpathy (path to
    dataset_coco.json): the questions of train2014 and val2014 together, split by their image's
    Karpathy split: "train" (train + restval), "val", "test"; questions on images absent from the
    Karpathy file are an error. The answer vocabulary comes from the "train" split.
    cache_dir defaults to DATA/prepared. Returns {"answers": [K strings], "splits": {name: columns}},
    columns as documented in _vqa_columns (use VQADataset to read them)."""
    subtypes = ("train2014", "val2014")
    sources = [p for s in subtypes for p in vqa_files(data_dir, s)] + ([karpathy] if karpathy else [])
    for p in sources:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"VQAv2 file not found: {p}")
    params = {"tokenizer": tokenizer.fingerprint, "num_answers": num_answers, "max_len": max_len,
              "karpathy": bool(karpathy)}

    def build():
        records = {s: read_vqa(data_dir, s) for s in subtypes}
        if karpathy:
            split_of = {img["cocoid"]: karpathy_split(img["split"]) for img in read_karpathy(karpathy)}
            splits = {"train": [], "val": [], "test": []}
            for s in subtypes:
                for r in records[s]:
                    if r["image_id"] not in split_of:
                        raise ValueError(f"{karpathy}: image {r['image_id']} of {s} is not in the Karpathy split")
                    splits[split_of[r["image_id"]]].append(r)
        else:
            splits = {"train": records["train2014"], "val": records["val2014"]}
        vocab = AnswerVocab(answer_vocab((r["answers"] for r in splits["train"]), num_answers))
        return {"answers": vocab.answers,
                "splits": {name: _vqa_columns(recs, tokenizer, vocab, max_len, f"prepare VQA {name}")
                           for name, recs in splits.items()}}

    return _cached("vqa", sources, params, build, cache_dir or os.path.join(data_dir, "prepared"))


class VQADataset(torch.utils.data.Dataset):
    """One prepared VQA split. Item: {"index": int, "question_id": int, "image_id": int,
    "image": str key, "input_ids": LongTensor (n,), "target_ids": LongTensor (c,),
    "target_scores": FloatTensor (c,)} plus "pixel_values" (3, S, S) when images (an Images) is
    given; without it a trainer looks up cached ViT features by "image"."""

    def __init__(self, split, images=None):
        self.split = split
        self.images = images

    def __len__(self):
        return len(self.split["image"])

    def __getitem__(self, m):
        s = self.split
        a, b = s["input_offsets"][m].item(), s["input_offsets"][m + 1].item()
        c, d = s["target_offsets"][m].item(), s["target_offsets"][m + 1].item()
        item = {"index": m, "question_id": s["question_id"][m].item(), "image_id": s["image_id"][m].item(),
                "image": s["image"][m], "input_ids": s["input_ids"][a:b],
                "target_ids": s["target_ids"][c:d], "target_scores": s["target_scores"][c:d]}
        if self.images is not None:
            item["pixel_values"] = self.images(s["image"][m])
        return item


def pad_sequences(seqs, pad_value):
    """list of B 1-D LongTensors -> (B, N) padded on the right, and the (B, N) 0/1 mask."""
    n = max(len(x) for x in seqs)
    out = torch.full((len(seqs), n), pad_value, dtype=torch.long)      # (B, N)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)               # (B, N)
    for i, x in enumerate(seqs):
        out[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return out, mask


def collate_vqa(batch, pad_id, num_answers):
    """VQADataset items -> {"input_ids": (B, N) padded with pad_id, "attention_mask": (B, N) 1 on
    tokens, "targets": (B, K) dense soft scores, "question_id": (B,), "image_id": (B,),
    "index": (B,), "image": [B keys], "pixel_values": (B, 3, S, S) if the items have it}.
    Use functools.partial(collate_vqa, pad_id=..., num_answers=...) as a DataLoader collate_fn."""
    input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], pad_id)
    targets = torch.zeros((len(batch), num_answers), dtype=torch.float32)  # (B, K)
    for i, b in enumerate(batch):
        targets[i, b["target_ids"]] = b["target_scores"]
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
           "question_id": torch.tensor([b["question_id"] for b in batch]),
           "image_id": torch.tensor([b["image_id"] for b in batch]),
           "index": torch.tensor([b["index"] for b in batch]),
           "image": [b["image"] for b in batch]}
    if "pixel_values" in batch[0]:
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])  # (B, 3, S, S)
    return out


def image_keys(split):
    """The unique image keys of a prepared split (VQA or captions), sorted."""
    return sorted(set(split["image"]))


# =============================================================================================
# COCO captions, Karpathy split
# =============================================================================================


def prepare_captions(karpathy, tokenizer, max_len=40, cache_dir=None):
    """Karpathy COCO captions, tokenised once and cached (cache_dir defaults to the file's folder
    + /prepared). Splits "train" (train + restval), "val", "test". Each split has per-image columns
    "image_id" (cocoid, LongTensor (I,)), "image" (key = filepath/filename), "refs" (the raw
    reference sentences) and per-caption columns "caption_image" (LongTensor (C,), index into the
    images), "caption_ids"/"caption_offsets" (ragged tokens, no special token, truncated to
    max_len - 1 so that caption + EOS fits in max_len)."""
    if not os.path.isfile(karpathy):
        raise FileNotFoundError(f"Karpathy split file not found: {karpathy}")
    params = {"tokenizer": tokenizer.fingerprint, "max_len": max_len}

    def build():
        splits = {"train": [], "val": [], "test": []}
        for img in read_karpathy(karpathy):
            splits[karpathy_split(img["split"])].append(img)
        out = {}
        for name, imgs in splits.items():
            cap_image, cap_ids = [], []
            for i, img in enumerate(tqdm(imgs, desc=f"prepare captions {name}", unit="img",
                                         mininterval=1.0, disable=len(imgs) < 5000)):
                for sent in img["sentences"]:
                    cap_image.append(i)
                    cap_ids.append(tokenizer.encode(sent["raw"].strip())[:max_len - 1])
            flat, off = _ragged(cap_ids)
            out[name] = {
                "image_id": torch.tensor([img["cocoid"] for img in imgs], dtype=torch.long),  # (I,)
                "image": [f"{img['filepath']}/{img['filename']}" for img in imgs],
                "refs": [[s["raw"] for s in img["sentences"]] for img in imgs],
                "caption_image": torch.tensor(cap_image, dtype=torch.long),                   # (C,)
                "caption_ids": flat, "caption_offsets": off,
            }
        return {"splits": out}

    folder = os.path.join(os.path.dirname(os.path.abspath(karpathy)), "prepared")
    return _cached("captions", [karpathy], params, build, cache_dir or folder)


class CaptionDataset(torch.utils.data.Dataset):
    """One item per caption of a prepared split: {"index": int, "image_id": int, "image": str key,
    "input_ids": LongTensor (n,) caption tokens without EOS} plus "pixel_values" (3, S, S) when
    images is given. For evaluation iterate over the split's images instead (split["image"],
    split["image_id"], split["refs"])."""

    def __init__(self, split, images=None):
        self.split = split
        self.images = images

    def __len__(self):
        return len(self.split["caption_image"])

    def __getitem__(self, m):
        s = self.split
        i = s["caption_image"][m].item()
        a, b = s["caption_offsets"][m].item(), s["caption_offsets"][m + 1].item()
        item = {"index": m, "image_id": s["image_id"][i].item(), "image": s["image"][i],
                "input_ids": s["caption_ids"][a:b]}
        if self.images is not None:
            item["pixel_values"] = self.images(s["image"][i])
        return item


def collate_caption(batch, eos_id):
    """CaptionDataset items -> decoder-only batch:
      "input_ids"      (B, N)  caption tokens + one EOS, padded with EOS (masked out anyway),
      "attention_mask" (B, N)  1 on caption tokens and the EOS, 0 on padding,
      "labels"         (B, N)  = input_ids with -100 on padding: every caption token and one EOS
                               are supervised, never padding (SPEC),
      "image_id" (B,), "index" (B,), "image" [B keys], "pixel_values" (B, 3, S, S) if present.
    With the visual prefix in front, [prefix; t_1 .. t_n; EOS], the logits at positions
    prefix .. t_n (all but the last) predict labels t_1 .. t_n, EOS."""
    eos = torch.tensor([eos_id], dtype=torch.long)
    input_ids, attention_mask = pad_sequences([torch.cat([b["input_ids"], eos]) for b in batch], eos_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, N)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "image_id": torch.tensor([b["image_id"] for b in batch]),
           "index": torch.tensor([b["index"] for b in batch]),
           "image": [b["image"] for b in batch]}
    if "pixel_values" in batch[0]:
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])  # (B, 3, S, S)
    return out


# =============================================================================================
# Images
# =============================================================================================


class ImageError(RuntimeError):
    """An image file that exists but cannot be decoded."""


def load_image(path, size, mean, std, resample="bilinear"):
    """Like HF ViTImageProcessor: RGB, resize to (size, size) with PIL bilinear (or CLIP's bicubic,
    see RESAMPLE), x / 255, then (x - mean) / std per channel. Returns FloatTensor (3, size, size).
    A missing file raises FileNotFoundError, an undecodable or truncated one ImageError; both name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes the whole file: truncation is detected here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image {path}: {e}") from None
    return preprocess(im, size, mean, std, resample)


# The converted backbone's config names its resize filter (models.Config.image_resample): ViT uses PIL
# bilinear as HF's ViTImageProcessor; CLIP squashes with PIL bicubic, as torchvision's Resize((224, 224))
# on a PIL image did when VL-Adapter extracted its CLIP features.
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def preprocess(im, size, mean, std, resample="bilinear"):
    """An RGB PIL image -> FloatTensor (3, size, size): resize (squash), x / 255, (x - mean) / std."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample filter {resample!r}; expected one of {sorted(RESAMPLE)}")
    im = im.resize((size, size), RESAMPLE[resample])
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)                     # (S, S, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))          # (3, S, S)


class Images:
    """Images of one folder with one preprocessing (the backbone's size, mean, std, resize filter):
    Images(dir, size, mean, std, resample)(key) -> FloatTensor (3, size, size)."""

    def __init__(self, images_dir, size, mean, std, resample="bilinear"):
        self.images_dir, self.size, self.mean, self.std = images_dir, size, tuple(mean), tuple(std)
        self.resample = resample

    def path(self, key):
        return os.path.join(self.images_dir, key)

    def __call__(self, key):
        return load_image(self.path(key), self.size, self.mean, self.std, self.resample)


class ImageDataset(torch.utils.data.Dataset):
    """Unique images, e.g. to compute frozen ViT features once: item {"index": int, "image": key,
    "pixel_values": (3, S, S)}; the default collate stacks them."""

    def __init__(self, keys, images):
        self.keys = list(keys)
        self.images = images

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return {"index": i, "image": self.keys[i], "pixel_values": self.images(self.keys[i])}


# =============================================================================================
# The synthetic world: coloured shapes, written as VQAv2 + COCO + Karpathy files
# =============================================================================================

SHAPES_SIZE = 64          # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230),
          "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (5, 7), "large": (10, 13)}   # half-extent range in pixels (64 px image)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]


def draw_scene(rng, nprng):
    """A 64x64 scene: a grey noisy background and 1-4 shapes, one per quadrant, with distinct
    (colour, shape) pairs. Drawn at 2x and downsampled (smooth edges). Returns (image, objects)."""
    n = rng.randint(1, 4)
    quads = rng.sample(range(4), n)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    scale, half = 2, SHAPES_SIZE // 2
    bg = rng.randint(80, 150)
    img = Image.new("RGB", (SHAPES_SIZE * scale, SHAPES_SIZE * scale), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    objects = []
    for q, (color, shape) in zip(quads, pairs):
        size = rng.choice(sorted(SIZES))
        r = rng.randint(*SIZES[size])
        cx = (q % 2) * half + half // 2 + rng.randint(-(half // 2 - r - 1), half // 2 - r - 1)
        cy = (q // 2) * half + half // 2 + rng.randint(-(half // 2 - r - 1), half // 2 - r - 1)
        fill = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLORS[color])
        box = [(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx * scale, (cy - r) * scale), ((cx - r) * scale, (cy + r) * scale),
                          ((cx + r) * scale, (cy + r) * scale)], fill=fill)
        objects.append({"color": color, "shape": shape, "size": size, "quadrant": QUADRANTS[q],
                        "x": cx, "y": cy, "r": r})
    img = img.resize((SHAPES_SIZE, SHAPES_SIZE), Image.BOX)
    noise = nprng.normal(0.0, 5.0, size=(SHAPES_SIZE, SHAPES_SIZE, 3))           # (H, W, 3)
    pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels), objects


def _name(o):
    return f"{o['color']} {o['shape']}"


def _a(words):
    """The indefinite article for words: "a red circle", "an orange square"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


# Question templates: (kind, template, question_type, answer_type). Templates with {s}/{c}/{o} name
# a shape, a colour or an object ("red circle"); {sa} is "a"/"an" + colour + shape.
TEMPLATES = [
    ("color", "What color is the {s}?", "what color is the", "other"),
    ("color", "What is the color of the {s}?", "what is the color of the", "other"),
    ("color", "Which colour does the {s} have?", "which", "other"),
    ("shape", "What shape is the {c} object?", "what shape is the", "other"),
    ("shape", "What is the {c} thing?", "what is the", "other"),
    ("shape", "Which shape is {c}?", "which", "other"),
    ("side", "Is the {o} on the left or on the right?", "is the", "other"),
    ("side", "Is the {o} at the top or at the bottom?", "is the", "other"),
    ("side", "Where is the {o}?", "where is the", "other"),
    ("size", "Is the {o} big or small?", "is the", "other"),
    ("size", "What size is the {o}?", "what size is the", "other"),
    ("yesno", "Is the {o} on the left?", "is the", "yes/no"),
    ("yesno", "Is the {o} on the right?", "is the", "yes/no"),
    ("yesno", "Are there any {s}s?", "are there any", "yes/no"),
    ("yesno", "Is there anything {c}?", "is there", "yes/no"),
    ("yesno", "Is there {sa}?", "is there a", "yes/no"),
    ("count", "How many shapes are there?", "how many", "number"),
    ("count", "How many objects are in the picture?", "how many", "number"),
    ("count", "How many {s}s are there?", "how many", "number"),
    ("count", "How many {c} shapes are there?", "how many", "number"),
]


def _question_candidates(objects):
    """Every (template index, question, answer, possible answers) this scene supports. An object
    is named by its shape or colour only where that is unique in the scene; colour + shape always
    is (pairs are distinct)."""
    n_shape = Counter(o["shape"] for o in objects)
    n_color = Counter(o["color"] for o in objects)
    present = {(o["color"], o["shape"]) for o in objects}
    yes_no, numbers = ["no", "yes"], [str(k) for k in range(5)]
    out = []
    for t, (kind, template, _, _) in enumerate(TEMPLATES):
        if kind == "color":
            out += [(t, template.format(s=o["shape"]), o["color"], sorted(COLORS))
                    for o in objects if n_shape[o["shape"]] == 1]
        elif kind == "shape":
            out += [(t, template.format(c=o["color"]), o["shape"], list(SHAPES))
                    for o in objects if n_color[o["color"]] == 1]
        elif kind == "count" and "{" not in template:
            out.append((t, template, str(len(objects)), numbers))
        elif kind == "count":
            out += [(t, template.format(s=s), str(n_shape[s]), numbers) for s in SHAPES if "{s}" in template]
            out += [(t, template.format(c=c), str(n_color[c]), numbers) for c in COLORS if "{c}" in template]
        elif "{o}" in template:
            for o in objects:
                vertical, horizontal = o["quadrant"].split()
                answer, possible = {
                    "Is the {o} on the left or on the right?": (horizontal, ["left", "right"]),
                    "Is the {o} at the top or at the bottom?": (vertical, ["bottom", "top"]),
                    "Where is the {o}?": (o["quadrant"], list(QUADRANTS)),
                    "Is the {o} big or small?": ("big" if o["size"] == "large" else "small", ["big", "small"]),
                    "What size is the {o}?": (o["size"], ["large", "small"]),
                    "Is the {o} on the left?": (yes_no[horizontal == "left"], yes_no),
                    "Is the {o} on the right?": (yes_no[horizontal == "right"], yes_no),
                }[template]
                out.append((t, template.format(o=_name(o)), answer, possible))
        elif "{s}" in template:
            out += [(t, template.format(s=s), yes_no[n_shape[s] > 0], yes_no) for s in SHAPES]
        elif "{c}" in template:
            out += [(t, template.format(c=c), yes_no[n_color[c] > 0], yes_no) for c in COLORS]
        else:  # "Is there {sa}?"
            out += [(t, template.format(sa=_a(f"{c} {s}")), yes_no[(c, s) in present], yes_no)
                    for c in COLORS for s in SHAPES]
    return out


def _pick_questions(rng, objects, used, per_image):
    """per_image questions of distinct kinds: a kind, then one of its templates that this scene
    supports, at random; then the answer used least so far with that template in the whole world
    (ties at random), then a question with that answer. Answers come out nearly uniform per
    template, so the question text alone says little."""
    by_template = {}
    for cand in _question_candidates(objects):
        by_template.setdefault(cand[0], []).append(cand)
    kinds = sorted({TEMPLATES[t][0] for t in by_template})
    picked = []
    for kind in rng.sample(kinds, min(per_image, len(kinds))):
        t = rng.choice([t for t in sorted(by_template) if TEMPLATES[t][0] == kind])
        answers = sorted({c[2] for c in by_template[t]})
        least = min(used[(t, a)] for a in answers)
        answer = rng.choice([a for a in answers if used[(t, a)] == least])
        used[(t, answer)] += 1
        picked.append(rng.choice([c for c in by_template[t] if c[2] == answer]))
    return picked


_SYNONYMS = {"large": ["big"], "big": ["large"], "small": ["little", "tiny"], "circle": ["round", "oval"],
             "square": ["rectangle"], "triangle": ["triangular"], "purple": ["violet"],
             "top left": ["upper left", "left"], "top right": ["upper right", "right"],
             "bottom left": ["lower left", "left"], "bottom right": ["lower right", "right"]}


def _human_answers(rng, kind, answer, possible):
    """10 annotators: most give the answer, written in various ways that the official normaliser
    maps back ("Red", "red.", "a circle", "two", "zero"); some give a synonym it does not map ("big"
    for "large"); some are wrong (another possible answer). The error rate varies per question."""
    p_wrong = rng.choice([0.0, 0.0, 0.0, 0.05, 0.05, 0.1, 0.1, 0.2, 0.3])
    p_synonym = 0.1 if answer in _SYNONYMS else 0.0
    out = []
    for _ in range(10):
        u = rng.random()
        if u < p_wrong:
            a = rng.choice([x for x in possible if x != answer])
        elif u < p_wrong + p_synonym:
            a = rng.choice(_SYNONYMS[answer])
        else:
            a = answer
        v = rng.random()
        if kind == "count" and v < 0.3:
            a = NUMBER_WORDS[int(a)]
        elif v < 0.06:
            a = a.capitalize()
        elif v < 0.09:
            a = a + "."
        elif v < 0.12 and kind == "shape":
            a = "a " + a
        out.append(a)
    return out


def _captions(rng, objects):
    """5 varied captions of a scene (raw sentences)."""
    n = len(objects)
    objs = objects[:]
    rng.shuffle(objs)

    def listing(with_size):
        parts = [_a(f"{o['size'] + ' ' if with_size else ''}{_name(o)}") for o in objs]
        return parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    count = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    where = "; ".join(f"{_a(_name(o))} in the {o['quadrant']}" for o in objs)
    colors = sorted({o["color"] for o in objs})
    color_text = colors[0] if len(colors) == 1 else ", ".join(colors[:-1]) + " and " + colors[-1]
    options = [
        f"{listing(False)} on a gray background.",
        f"{listing(True)}.",
        f"There {'is' if n == 1 else 'are'} {count} in the picture: {listing(False)}.",
        f"An image with {where}.",
        f"{count.capitalize()} on a plain background, colored {color_text}.",
        f"A picture showing {listing(rng.random() < 0.5)}.",
        f"{where}.",
    ]
    picked = rng.sample(options, 5)
    return [p[0].upper() + p[1:] for p in picked]


def _caption_tokens(raw):
    """Karpathy's "tokens": lower-cased words without punctuation."""
    return "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in raw.lower()).split()


def make_shapes(out, n_images=3000, seed=0, questions_per_image=3):
    """Write the synthetic world under `out` in the real formats (see the module docstring).
    Two thirds of the images are train2014, one third val2014; of val2014, 30 % are Karpathy val,
    30 % test, the rest restval. Also writes shapes_scenes.json: every image's objects and every
    question's true answer (for attribute pretraining and oracle checks). Deterministic: the same
    seed gives byte-identical files."""
    if n_images < 10:
        raise ValueError("make_shapes: n_images must be at least 10")
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    n_train = round(n_images * 2 / 3)
    n_val = n_images - n_train
    n_kval = n_ktest = n_val * 3 // 10
    used = Counter()  # (template, answer) -> questions so far

    vqa = {s: ([], []) for s in ("train2014", "val2014")}
    karpathy, scenes, truths = [], [], []
    sentid = 0
    for i in tqdm(range(n_images), desc="shapes", unit="img", mininterval=1.0):
        subtype = "train2014" if i < n_train else "val2014"
        image_id = 9 + 7 * i  # sparse ids, different from the Karpathy imgid, like COCO
        img, objects = draw_scene(rng, nprng)
        key = coco_image_key(subtype, image_id)
        buf = jpeg_bytes(img)
        atomic_write(os.path.join(out, key), lambda f: f.write(buf))
        for k, (t, question, answer, possible) in enumerate(
                _pick_questions(rng, objects, used, questions_per_image)):
            kind, _, qtype, atype = TEMPLATES[t]
            qid = image_id * 1000 + k
            answers = _human_answers(rng, kind, answer, possible)
            norm = Counter(normalize_answer(a) for a in answers)
            mc = min(norm, key=lambda a: (-norm[a], a))
            vqa[subtype][0].append({"image_id": image_id, "question": question, "question_id": qid})
            vqa[subtype][1].append({
                "question_type": qtype, "multiple_choice_answer": mc,
                "answers": [{"answer": a, "answer_confidence": rng.choice(["yes", "yes", "yes", "maybe"]),
                             "answer_id": j + 1} for j, a in enumerate(answers)],
                "image_id": image_id, "answer_type": atype, "question_id": qid})
            truths.append({"question_id": qid, "image_id": image_id, "kind": kind, "answer": answer})
        j = i - n_train
        split = "train" if j < 0 else "val" if j < n_kval else "test" if j < n_kval + n_ktest else "restval"
        sentences = []
        for raw in _captions(rng, objects):
            sentences.append({"tokens": _caption_tokens(raw), "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        karpathy.append({"filepath": subtype, "sentids": [s["sentid"] for s in sentences],
                         "filename": os.path.basename(key), "imgid": i, "split": split,
                         "sentences": sentences, "cocoid": image_id})
        scenes.append({"image_id": image_id, "image": key, "objects": objects})

    info = {"description": "Synthetic shapes world in the VQAv2 format (routing-peft data.py)",
            "url": "", "version": "2.0", "year": 2024, "contributor": "routing-peft data.py",
            "date_created": "2024-01-01 00:00:00"}
    license_ = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "CC0 1.0"}
    for subtype, (questions, annotations) in vqa.items():
        q_path, a_path = vqa_files(out, subtype)
        _write_json(q_path, {"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                             "license": license_, "data_subtype": subtype, "questions": questions})
        _write_json(a_path, {"info": info, "license": license_, "data_subtype": subtype,
                             "annotations": annotations, "data_type": "mscoco"})
    _write_json(os.path.join(out, KARPATHY), {"images": karpathy, "dataset": "coco"})
    _write_json(os.path.join(out, "shapes_scenes.json"), {"images": scenes, "questions": truths})


def jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="write the synthetic world (VQAv2 + COCO + Karpathy formats)")
    p.add_argument("--out", required=True, help="output folder (data and images)")
    p.add_argument("--n-images", type=int, default=3000, help="number of images (2/3 train2014, 1/3 val2014)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    args = parser.parse_args(argv)
    make_shapes(args.out, n_images=args.n_images, seed=args.seed)
    print(f"wrote {args.n_images} images with questions and captions to {args.out}")


if __name__ == "__main__":
    main()
