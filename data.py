"""Data: byte-level BPE and T5's SentencePiece unigram tokenizers; VQAv2, Karpathy COCO captions, GQA and
NLVR2 from the official files; image preprocessing with Pillow; collate functions; the prepared-data cache;
a frozen image encoder's features for the task models, cached. The real formats only: the synthetic world is in
shapes.py.

    python -m pytest -q tests/test_bpe.py tests/test_spm.py tests/test_data.py tests/test_features.py   # the tests

Layout read by the loaders (the real datasets and the synthetic world alike):

    DATA/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json    VQAv2 questions
    DATA/v2_mscoco_{train2014,val2014}_annotations.json            VQAv2 annotations (10 answers each)
    DATA/dataset_coco.json                                         Karpathy split + 5 captions per image
    IMAGES/{train2014,val2014}/COCO_{split}_{image_id:012d}.jpg    COCO images
    GQA/questions1.2/{train,val,testdev}_balanced_questions.json   GQA (see the GQA and NLVR2 section)
    GQA/images/{imageId}.jpg
    NLVR2/data/{train,dev,test1}.json, NLVR2/images/train/..., NLVR2/{dev,test1}/...   NLVR2 pairs

Typical use (a trainer):

    tok = load_tokenizer("ckpt/roberta-large.pt")                # BPE, or SentencePiece for T5
    vqa = prepare_vqa("DATA", tok)                                # parsed + tokenised once, cached
    train = VQADataset(vqa["splits"]["train"])                    # items carry image keys
    collate = functools.partial(collate_vqa, pad_id=tok.pad_id, num_answers=len(vqa["answers"]))
    images = Images("IMAGES", size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = images(train[0]["image"])                            # (3, 224, 224), or use cached features

Runtime imports: torch, numpy, PIL, tqdm, the standard library and eval.py.
"""
import array
import contextlib
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import struct
import sys
import time
import unicodedata
from collections import Counter

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval import atomic_write, nlvr2_identifier, normalize_answer, read_nlvr2_lines, vqa_accuracy, write_json

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
        """The tokenizer stored in a converted checkpoint (ckpt["tokenizer"]; see load_tokenizer)."""
        return _checkpoint_tokenizer(cls, path)

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
# SentencePiece unigram (T5)
# =============================================================================================
# The reference is google/sentencepiece (src/normalizer.cc, src/unigram_model.cc EncodeOptimized,
# src/sentencepiece_processor.cc); the field numbers are those of its sentencepiece_model.proto.

SPACE = "\u2581"  # "▁", sentencepiece's escaped space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType
T5_EXTRA_IDS = 100  # <extra_id_0> .. <extra_id_99>, after the pieces, in reverse order
FLT_MAX = 3.4028234663852886e38  # sentencepiece's min_score without NORMAL pieces
SCORE_RESET = 1e5  # EncodeOptimized re-bases path scores beyond this magnitude (kScoreResetThreshold)


def _varint(buf, i):
    """(value, next position) of the protobuf varint at buf[i]."""
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("spiece.model: truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf):
    """Yield (field number, wire type, value) of a serialized protobuf message, in file order: an int
    for a varint (wire type 0), the raw bytes otherwise (1: 8 bytes, 2: length-delimited, 5: 4 bytes)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"spiece.model: unsupported protobuf wire type {wire} (field {number})")
        if i > n:
            raise ValueError(f"spiece.model: field {number} runs past the end of its message")
        yield number, wire, value


# Schemas: field number -> (name, kind); kinds map to a wire type and a decoder (proto2 semantics: a
# scalar field given twice keeps its last value). Every "int" here is a non-negative enum.
_WIRE = {"int": 0, "bool": 0, "float": 5, "str": 2, "bytes": 2}
_PIECE = {1: ("piece", "str"), 2: ("score", "float"), 3: ("type", "int")}
_TRAINER = {3: ("model_type", "int"), 24: ("treat_whitespace_as_suffix", "bool"), 35: ("byte_fallback", "bool"),
            45: ("unk_piece", "str"), 46: ("bos_piece", "str"), 47: ("eos_piece", "str"), 48: ("pad_piece", "str")}
_NORMALIZER = {1: ("name", "str"), 2: ("precompiled_charsmap", "bytes"), 3: ("add_dummy_prefix", "bool"),
               4: ("remove_extra_whitespaces", "bool"), 5: ("escape_whitespaces", "bool")}
# proto2 defaults of the fields above (sentencepiece_model.proto)
_PIECE_DEFAULTS = {"piece": "", "score": 0.0, "type": NORMAL}
_TRAINER_DEFAULTS = {"model_type": UNIGRAM, "treat_whitespace_as_suffix": False, "byte_fallback": False,
                     "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>"}
_NORMALIZER_DEFAULTS = {"name": "", "precompiled_charsmap": b"", "add_dummy_prefix": True,
                        "remove_extra_whitespaces": True, "escape_whitespaces": True}


def _proto_message(buf, schema, defaults, what):
    """The fields of `schema` in one message, as a dict over `defaults`; other fields are skipped."""
    out = dict(defaults)
    for number, wire, value in _proto_fields(buf):
        if number not in schema:
            continue
        name, kind = schema[number]
        if wire != _WIRE[kind]:
            raise ValueError(f"spiece.model: {what}.{name} has wire type {wire}, expected {_WIRE[kind]}")
        if kind == "bool":
            value = value != 0
        elif kind == "float":
            value = struct.unpack("<f", value)[0]
        elif kind == "str":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"spiece.model: {what}.{name} is not valid UTF-8") from None
        out[name] = value
    return out


def read_spiece_model(blob):
    """The parts of a serialized sentencepiece ModelProto that encoding needs: {"pieces": [(piece,
    score, type)], "trainer": {...}, "normalizer": {...}, "denormalizer": {...}} (fields of _TRAINER and
    _NORMALIZER with their proto2 defaults). A message field given twice is merged, as protobuf does."""
    pieces, parts = [], {2: [], 3: [], 5: []}
    for number, wire, value in _proto_fields(blob):
        if number in (1, 2, 3, 5) and wire != 2:
            raise ValueError(f"spiece.model: field {number} of ModelProto is not a message (wire type {wire})")
        if number == 1:
            p = _proto_message(value, _PIECE, _PIECE_DEFAULTS, "SentencePiece")
            pieces.append((p["piece"], p["score"], p["type"]))
        elif number in parts:
            parts[number].append(value)
    return {"pieces": pieces,
            "trainer": _proto_message(b"".join(parts[2]), _TRAINER, _TRAINER_DEFAULTS, "TrainerSpec"),
            "normalizer": _proto_message(b"".join(parts[3]), _NORMALIZER, _NORMALIZER_DEFAULTS, "NormalizerSpec"),
            "denormalizer": _proto_message(b"".join(parts[5]), _NORMALIZER, _NORMALIZER_DEFAULTS, "NormalizerSpec")}


class CharsMap:
    """A precompiled charsmap (NormalizerSpec.precompiled_charsmap): the normalization rules of a
    sentencepiece model, byte strings -> replacements (normalizer.cc DecodePrecompiledCharsMap).

    Layout: a uint32 little-endian trie size, a Darts-clone double array of that many bytes (uint32
    units), then a pool of NUL-terminated replacement strings; a key's value is the byte offset of
    its replacement in the pool. A unit (darts.h DoubleArrayUnit) packs has_leaf = bit 8, value = the
    low 31 bits, label = unit & (0x80000000 | 0xFF), offset = (unit >> 10) << ((unit & 0x200) >> 6)."""

    def __init__(self, blob):
        if len(blob) <= 4:
            raise ValueError("precompiled charsmap: shorter than its 4-byte header")
        size = int.from_bytes(blob[:4], "little")
        if size >= len(blob) or size % 4 or size == 0:
            raise ValueError(f"precompiled charsmap: trie size {size} does not fit a blob of {len(blob)} bytes")
        self.units = np.frombuffer(blob, dtype="<u4", count=size // 4, offset=4).tolist()
        self.pool = bytes(blob[4 + size:])
        self.labels = {u & 0x800000FF for u in self.units}  # every byte any key can contain (and more)

    def longest_prefix(self, data, i):
        """(bytes matched, replacement) of the longest key that data[i:] starts with, (0, None) if none:
        darts.h commonPrefixSearch from the root, keeping its last (longest) result."""
        units, n = self.units, len(self.units)
        pos = self._offset(units[0])
        size, value = 0, None
        for k in range(i, len(data)):
            c = data[k]
            pos ^= c
            if pos >= n or units[pos] & 0x800000FF != c:
                break
            unit = units[pos]
            pos ^= self._offset(unit)
            if unit & 0x100:  # has_leaf: a key ends here; its value sits in the unit at pos
                size, value = k + 1 - i, units[pos] & 0x7FFFFFFF
        if value is None:
            return 0, None
        end = self.pool.find(b"\0", value)
        if end < 0:
            raise ValueError(f"precompiled charsmap: the replacement at {value} has no NUL terminator")
        return size, self.pool[value:end]

    @staticmethod
    def _offset(unit):
        return (unit >> 10) << ((unit & 0x200) >> 6)


def _drop_extra_spaces(spans):
    """The remove_extra_whitespaces rule of Normalizer::Normalize over the replacements of its steps:
    a replacement loses its leading spaces when the text so far is empty or ends in a space (trailing
    spaces go later). Without a double space in the joined text this is just joined.lstrip(" ")."""
    out, after_space = [], True
    for span in spans:
        if after_space:
            span = span.lstrip(" ")
        if span:
            out.append(span)
            after_space = span.endswith(" ")
    return "".join(out)


def _f32(x):
    """x rounded to the nearest float32 (as a C++ float stores it)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class SentencePieceTokenizer:
    """T5's tokenizer: a sentencepiece unigram model, read from the bytes of its spiece.model, with the
    ids of sentencepiece.SentencePieceProcessor.encode (version 0.2.3; tested against it on models trained
    and written inside the tests) and transformers' T5 vocabulary layout around it.

    SentencePieceTokenizer(model): model is the bytes of a spiece.model or a path to one. Steps, as
    sentencepiece: normalize (the file's own precompiled charsmap, longest match per position, user-
    defined symbols kept verbatim; then drop leading, trailing and repeated spaces, prepend the dummy
    space, escape " " as "▁"), then Viterbi over the pieces' scores (consecutive unknowns give one
    <unk>). Ids: the file's pieces (T5: <pad> 0, </s> 1, <unk> 2, read from the trainer spec), then
    T5's 100 sentinels, <extra_id_N> = len(pieces) + 99 - N; len(tokenizer) counts both.

    Same interface as BPETokenizer: encode(text) (no special tokens), wrap(ids) (T5's: ids + [</s>],
    never a BOS, as transformers' T5 tokenizers), decode(ids, skip_special), bos_id (None for T5),
    eos_id, pad_id, unk_id, mask_id (None), fingerprint, to_data(). Deviations: "<extra_id_0>" or
    "</s>" inside the text are encoded as plain text (transformers maps them to their ids; callers add
    specials by id); decode writes special tokens by name where sentencepiece writes "" for control
    pieces and " ⁇ " for <unk>. Refused: non-unigram models, byte_fallback, treat_whitespace_as_suffix,
    a denormalizer with rules (none of which T5 uses).

    The releases (VL-T5, VL-Adapter, VL-PET) tokenized with transformers' fast T5 pipeline instead (the
    same charsmap, then a whitespace split and one Unigram run per word): the same ids on ordinary text;
    it differs on a few characters (U+0085 splits words there; tokenizers' normalizer drops combining
    marks after some characters, e.g. "ｌ\u0301" -> "l" where sentencepiece gives "ĺ")."""

    def __init__(self, model):
        if isinstance(model, (str, os.PathLike)):
            if not os.path.isfile(model):
                raise FileNotFoundError(f"spiece.model not found: {model}")
            with open(model, "rb") as f:
                model = f.read()
        self.model_bytes = bytes(model)
        spec = read_spiece_model(self.model_bytes)
        self._check_supported(spec["trainer"], spec["denormalizer"])
        self._read_vocabulary(spec["pieces"], spec["trainer"])
        self._read_normalizer(spec["normalizer"])
        self._build_lattice_tables(spec["pieces"])

    def _read_vocabulary(self, pieces, trainer):
        """pieces, types, piece_to_id and the special ids, checked as sentencepiece checks them."""
        self.pieces = [p for p, _, _ in pieces]
        self.types = [t for _, _, t in pieces]
        if BYTE in self.types:
            raise ValueError("spiece.model: byte pieces without byte_fallback (sentencepiece refuses them too)")
        self.piece_to_id = {}
        for i, p in enumerate(self.pieces):
            if not p or p in self.piece_to_id:
                raise ValueError(f"spiece.model: piece {i} ({p!r}) is empty or defined twice")
            self.piece_to_id[p] = i
        unknown = [i for i, t in enumerate(self.types) if t == UNKNOWN]
        if len(unknown) != 1:
            raise ValueError(f"spiece.model: {len(unknown)} pieces of type UNKNOWN (sentencepiece needs one)")
        self.unk_id = unknown[0]  # the encoder's <unk> (model_interface.cc InitializePieces)
        # as SentencePieceProcessor::{bos,eos,pad}_id: the trainer spec's piece names, if CONTROL pieces
        self.bos_id, self.eos_id, self.pad_id = (self._control(trainer[f"{k}_piece"]) for k in ("bos", "eos", "pad"))
        if self.eos_id is None:
            raise ValueError(f"spiece.model: no CONTROL piece {trainer['eos_piece']!r} (T5 appends </s>)")
        self.mask_id = None
        self.special_ids = {i for i, t in enumerate(self.types) if t in (CONTROL, UNKNOWN)}

    def _read_normalizer(self, norm):
        """The normalizer spec's flags, its charsmap and the user-defined symbols (kept as they are)."""
        self.add_dummy_prefix = norm["add_dummy_prefix"]
        self.remove_extra_whitespaces = norm["remove_extra_whitespaces"]
        self.escape_whitespaces = norm["escape_whitespaces"]
        self.charsmap = CharsMap(norm["precompiled_charsmap"]) if norm["precompiled_charsmap"] else None
        user = sorted((p.encode("utf-8") for p, t in zip(self.pieces, self.types) if t == USER_DEFINED), key=len)
        self._user_symbols = {}  # first byte -> user-defined symbols (utf-8), longest first
        for sym in reversed(user):
            self._user_symbols.setdefault(sym[0], []).append(sym)
        # No rule or symbol holds a space: normalizing word by word (cached) is normalizing the text
        spaced_rules = self.charsmap is not None and ord(" ") in self.charsmap.labels
        self._by_word = not spaced_rules and not any(b" " in s for s in user)
        self._word_cache = {}

    @staticmethod
    def _check_supported(trainer, denormalizer):
        """Refuse the model kinds and options this tokenizer does not implement, by name."""
        if trainer["model_type"] != UNIGRAM:
            kind = {2: "BPE", 3: "WORD", 4: "CHAR"}.get(trainer["model_type"], trainer["model_type"])
            raise ValueError(f"spiece.model: model type {kind} is not supported (only UNIGRAM, as T5)")
        for flag in ("byte_fallback", "treat_whitespace_as_suffix"):
            if trainer[flag]:
                raise ValueError(f"spiece.model: {flag}=true is not supported (T5 does not use it)")
        if denormalizer["precompiled_charsmap"]:
            raise ValueError("spiece.model: denormalization rules are not supported (T5 has none)")

    def _control(self, piece):
        """The id of a CONTROL piece by name, None if the model has none of that name."""
        i = self.piece_to_id.get(piece)
        return i if i is not None and self.types[i] == CONTROL else None

    def _build_lattice_tables(self, pieces):
        """The character trie of the matchable pieces and the scores of sentencepiece's lattice.

        Trie: nested dicts {char: child}; a piece ending at a node is stored under the key "" as
        (id, score). NORMAL and USER_DEFINED pieces only: UNUSED ones are skipped when matched and
        CONTROL / UNKNOWN / BYTE never are (model_interface.cc InitializePieces). Scores as
        EncodeOptimized has them (sentencepiece 0.2.3, unigram_model.cc): a USER_DEFINED piece
        0.1 * (its utf-8 bytes - 1) in float32, whatever the file says; the unknown edge min_score - 10,
        min_score over the NORMAL pieces."""
        if any(math.isnan(s) or math.isinf(s) for _, s, _ in pieces):
            raise ValueError("spiece.model: a piece score is NaN or infinite")
        normal = [s for _, s, t in pieces if t == NORMAL]
        self.unk_score = _f32((min(normal) if normal else FLT_MAX) - 10.0)
        self.trie = {}
        self._segment_cache = {}
        self._max_abs_score = abs(self.unk_score)
        self._by_segment = all(SPACE not in p[1:] for p, _, t in pieces if t in (NORMAL, USER_DEFINED))
        for i, (piece, score, kind) in enumerate(pieces):
            if kind not in (NORMAL, USER_DEFINED):
                continue
            if kind == USER_DEFINED:
                score = _f32(0.1 * (len(piece.encode("utf-8")) - 1))
            node = self.trie
            for c in piece:
                node = node.setdefault(c, {})
            node[""] = (i, score)
            self._max_abs_score = max(self._max_abs_score, abs(score))

    @classmethod
    def from_checkpoint(cls, path):
        """The tokenizer stored in a converted T5 checkpoint (see load_tokenizer)."""
        return _checkpoint_tokenizer(cls, path)

    def to_data(self):
        """{"spiece_model": torch.uint8 tensor of the spiece.model bytes}: what checkpoints store."""
        return {"spiece_model": torch.frombuffer(bytearray(self.model_bytes), dtype=torch.uint8)}

    @functools.cached_property
    def fingerprint(self):
        """sha256 of the spiece.model bytes: identifies the tokenizer in cache keys."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def __len__(self):
        return len(self.pieces) + T5_EXTRA_IDS

    def normalize(self, text):
        """The normalized text as sentencepiece's Normalizer::Normalize gives it ("▁"-escaped): the
        replacements, extra spaces removed (remove_extra_whitespaces), the dummy prefix, " " -> "▁"."""
        if not text:
            return ""
        spans = self._normalized_spans(text)
        body = "".join(spans)
        if self.remove_extra_whitespaces:
            body = body.lstrip(" ") if "  " not in body else _drop_extra_spaces(spans)
            if not body:
                return ""
        space = SPACE if self.escape_whitespaces else " "
        text = (" " + body if self.add_dummy_prefix else body).replace(" ", space)
        return text.rstrip(space) if self.remove_extra_whitespaces else text  # trailing spaces, "▁" too

    def _normalized_spans(self, text):
        """The replacement of each step of NormalizePrefix over text, word by word where that is exact
        (the words of text.split(" ") are then cached, and a word whose replacements hold no space is one
        span: the whitespace rules see no difference)."""
        if not self._by_word:
            return self._prefix_spans(text)
        spans = []
        for word in text.split(" "):
            out = self._word_cache.get(word)
            if out is None:
                out = self._prefix_spans(word)
                if not any(" " in s for s in out):
                    out = ["".join(out)]
                self._word_cache[word] = out
            spans += out
            spans.append(" ")
        spans.pop()
        return spans

    def _prefix_spans(self, text):
        """Normalizer::NormalizePrefix at each position of text's utf-8 bytes: the longest user-defined
        symbol (kept as is), else the longest charsmap key (its replacement), else one character."""
        data, spans, i = text.encode("utf-8"), [], 0
        while i < len(data):
            size = next((len(s) for s in self._user_symbols.get(data[i], ()) if data.startswith(s, i)), 0)
            span = data[i:i + size]
            if not size and self.charsmap is not None:
                size, span = self.charsmap.longest_prefix(data, i)
            if not size:
                size = 1 if data[i] < 0x80 else 2 if data[i] < 0xE0 else 3 if data[i] < 0xF0 else 4
                span = data[i:i + size]
            try:
                spans.append(span.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"precompiled charsmap: a rule splits a character ({span!r})") from None
            i += size
        return spans

    def viterbi(self, s):
        """Token ids of a normalized string: sentencepiece's best segmentation (unigram EncodeOptimized),
        consecutive unknowns merged into one <unk> (SentencePieceProcessor::Encode).

        When no piece holds a "▁" after its first character, every path breaks before each "▁", so the
        string is segmented one word ("▁" + characters) at a time, each word's best path found once and
        cached. Exact: sentencepiece sums path scores in float32, so a word's rounding depends on the
        score before it, and a cached path is reused only where no comparison in it can turn (see
        _best_path); otherwise the word is searched again after the actual score."""
        if not self._by_segment:
            ids = self._best_path(s, 0.0)[0]
        else:
            ids, total, f32 = [], 0.0, array.array("f", [0.0])  # total: the path score so far
            parts = s.split(SPACE)
            for word in ([parts[0]] if parts[0] else []) + [SPACE + p for p in parts[1:]]:
                hit = self._segment_cache.get(word)
                if hit is None:
                    hit = self._segment_cache[word] = self._best_path(word, 0.0)
                if abs(total) < hit[3]:
                    for score in hit[1]:  # the float32 sums of the cached path after `total`
                        f32[0] = total + score
                        total = f32[0]
                else:
                    hit = self._best_path(word, total)
                    total = hit[2]
                merge = ids and ids[-1] == self.unk_id == hit[0][0]  # an unknown run across the "▁"
                ids += hit[0][1:] if merge else hit[0]
        return ids

    def _best_path(self, s, offset):
        """(ids, scores, final score, offset limit) of sentencepiece's best path over s after a path
        scoring `offset`: its ids (consecutive unknowns merged), the scores of its pieces (unknowns one by
        one), best[len(s)]. The same path is the best after any offset of absolute value below the limit,
        and its score is then the float32 sum of its scores after it.

        As EncodeOptimized (sentencepiece 0.2.3): best[j], the best score over s[:j], is float32, and so
        is each candidate best[i] + score, compared strictly (a tie keeps the first: the piece starting
        earliest). Edges from position i: each piece the trie matches at s[i:] and, when none covers the
        single character s[i], an unknown one over it. Where |best[i]| > 1e5, the scores from i on are
        re-based to best[i] = 0.

        The limit: each candidate is off its exact value by at most (n + 1) half-ulps of a float32 of
        magnitude <= |offset| + (n + 1) max|score| (ulp(x) <= |x| 2^-23), at offset 0 and at `offset`
        alike; a path whose every comparison was won or lost by more than twice that is the best at
        both. Offsets that could re-base inside the word are excluded."""
        n = len(s)
        best = [-math.inf] * (n + 1)  # float32 values; -inf: no path yet
        best[0] = offset
        start, ids, scores = [0] * (n + 1), [0] * (n + 1), [0.0] * (n + 1)
        margin, f32 = math.inf, array.array("f", [0.0])  # f32[0] = x rounds x to float32
        for i in range(n):
            if abs(best[i]) > SCORE_RESET:
                base = best[i]
                for k in range(i, n + 1):
                    f32[0] = best[k] - base
                    best[k] = f32[0]
            edges, node = [], self.trie  # (end, (id, score)) of the pieces starting at i, shortest first
            for j in range(i, n):
                node = node.get(s[j])
                if node is None:
                    break
                if "" in node:
                    edges.append((j + 1, node[""]))
            if not edges or edges[0][0] != i + 1:  # no piece covers s[i] alone
                edges.append((i + 1, (self.unk_id, self.unk_score)))
            for end, (piece, score) in edges:
                f32[0] = best[i] + score
                margin = min(margin, abs(f32[0] - best[end]))
                if f32[0] > best[end]:
                    best[end], start[end], ids[end], scores[end] = f32[0], i, piece, score
        path, j = [], n
        while j > 0:
            path.append(j)
            j = start[j]
        safe = 2 * (n + 1) * 2.0 ** -23  # margin > safe * (|offset| + 2 (n + 1) max|score|)
        limit = min(margin / safe - 2 * (n + 1) * self._max_abs_score, SCORE_RESET - (n + 1) * self._max_abs_score)
        path.reverse()
        merged = [ids[j] for k, j in enumerate(path) if not (k and ids[j] == self.unk_id == ids[path[k - 1]])]
        return merged, [scores[j] for j in path], best[n], limit

    def encode(self, text):
        """Token ids of text, no special tokens (sentencepiece's encode; HF add_special_tokens=False)."""
        return self.viterbi(self.normalize(text))

    def wrap(self, ids):
        """T5's special tokens around encoded ids: ids + [</s>] (no BOS)."""
        return list(ids) + [self.eos_id]

    def decode(self, ids, skip_special=False):
        """Text of token ids, as sentencepiece's decode: pieces joined, "▁" -> " ", the first piece's
        leading "▁" dropped (with remove_extra_whitespaces: one from each piece until some text is
        written). skip_special drops pad/eos/unk (control and unknown pieces) and the <extra_id_N>;
        otherwise they are written by name."""
        out, at_start = [], True
        strip = self.add_dummy_prefix or self.remove_extra_whitespaces
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self):
                raise ValueError(f"SentencePieceTokenizer: id {i} is out of range (size {len(self)})")
            if i >= len(self.pieces) or i in self.special_ids:
                if not skip_special:
                    out.append(self.id_to_piece(i))
                    at_start = False
                continue
            piece = self.pieces[i]
            consumed = at_start and strip and piece.startswith(SPACE)
            text = (piece[1:] if consumed else piece).replace(SPACE, " ")
            out.append(text)
            if text or (consumed and not self.remove_extra_whitespaces):
                at_start = False
        return "".join(out)

    def id_to_piece(self, i):
        """The piece of an id, the sentinels included ("<extra_id_N>")."""
        return self.pieces[i] if i < len(self.pieces) else f"<extra_id_{len(self.pieces) + T5_EXTRA_IDS - 1 - i}>"


def load_tokenizer(path):
    """The tokenizer a converted checkpoint carries in ckpt["tokenizer"]: {"vocab", "merges"} gives a
    BPETokenizer (GPT-2, RoBERTa, BART), {"spiece_model": uint8 tensor of the spiece.model bytes} a
    SentencePieceTokenizer (T5)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
        raise ValueError(f"{path}: no tokenizer in this checkpoint (convert a model directory that has "
                         "vocab.json and merges.txt, or spiece.model)")
    tok = ckpt["tokenizer"]
    kind = sorted(tok) if isinstance(tok, dict) else type(tok).__name__
    if kind == ["merges", "vocab"]:
        return BPETokenizer(tok["vocab"], tok["merges"])
    if kind == ["spiece_model"]:
        blob = tok["spiece_model"]
        if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.dim() == 1):
            raise ValueError(f"{path}: tokenizer spiece_model must be a 1-D torch.uint8 tensor")
        return SentencePieceTokenizer(blob.numpy().tobytes())
    raise ValueError(f"{path}: unknown tokenizer kind {kind} (expected keys vocab + merges, or spiece_model)")


def _checkpoint_tokenizer(cls, path):
    """load_tokenizer(path), which must be a `cls`."""
    tok = load_tokenizer(path)
    if not isinstance(tok, cls):
        raise ValueError(f"{path}: its tokenizer is a {type(tok).__name__}, not a {cls.__name__}")
    return tok


# =============================================================================================
# Files: clear errors, atomic writes, a prepared-data cache that is never stale
# =============================================================================================

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


PROGRESS_EVERY = 60.0  # seconds between two progress lines in a redirected log (and between two feature commits)


def progress(iterable, desc, unit, total=None, disable=False, initial=0):
    """A progress bar (tqdm) on a terminal; in a redirected log (nohup, a batch job) a line on stdout at most every
    PROGRESS_EVERY seconds (LogProgress), so that a long loop is never silent and a short one prints nothing. Both
    count items of the iterable, or update(n) calls when iterable is None; initial = what was done before."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=False, mininterval=1.0,
                    disable=disable)
    return LogProgress(iterable, desc, unit, total, initial)


class LogProgress:
    """progress() off a terminal: "desc: done/total unit (pct%), rate unit/s, time left" (and set_postfix's values),
    printed when PROGRESS_EVERY seconds have passed since the last line (or the start), never more often. The rate
    counts this run's items only (not `initial`)."""

    def __init__(self, iterable, desc, unit, total, initial):
        self.iterable, self.desc, self.unit, self.initial = iterable, desc, unit, initial
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.postfix = initial, ""
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n):
        """n more items done; a line if PROGRESS_EVERY seconds have passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now):
        """The progress line at time `now`."""
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        if self.total is None:
            text = f"{self.desc}: {self.n} {self.unit}, {rate:.2f} {self.unit}/s"
        else:
            left = f"{duration((self.total - self.n) / rate)} left" if rate > 0 else "time left unknown"
            text = (f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), "
                    f"{rate:.2f} {self.unit}/s, {left}")
        return text + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values):
        """Values shown at the end of the next lines (e.g. loss=0.123), as tqdm's."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        """Nothing to clear (tqdm's bar clears itself)."""


def duration(seconds):
    """'42s', '3m05s', '31h02m'."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def lock_file(f):
    """An exclusive, non-blocking lock on an open file (OSError if another process holds it); the OS releases it
    when the process ends, kill -9 included."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def wait_for_lock(f, what):
    """lock_file(f), waiting (one line saying so) while another process holds it."""
    waited = False
    while True:
        try:
            return lock_file(f)
        except OSError:
            if not waited:
                print(f"{what} is being made by another process; waiting for it", flush=True)
                waited = True
            time.sleep(1.0)


def cache_file(kind, sources, params, cache_dir, ext=".pt"):
    """The path of a cache entry: a hash of the source files' absolute paths, sizes and modification times
    and of the parameters (tokenizer fingerprint, lengths, a version of the code that makes the entry), so
    that a changed source, option or code gives a new file, never a stale one."""
    key = {"kind": kind, "params": params, "sources": []}
    for path in sources:
        st = os.stat(path)
        key["sources"].append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"{kind}-{digest}{ext}")


def cached(kind, sources, params, build, cache_dir):
    """build() once; later calls load the result from its cache_file, whose key includes code_version(build):
    a column added or changed by any code that build runs gives a new entry, with no version number to bump."""
    path = cache_file(kind, sources, {**params, "code": code_version(build)}, cache_dir)
    if os.path.isfile(path):
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a cache: an entry cut short (a killed writer, a full disk) is made again
            print(f"cache entry {path} is damaged ({type(e).__name__}); rebuilding it")
    data = build()
    atomic_write(path, lambda f: torch.save(data, f), "wb")
    return data


PROJECT = os.path.dirname(os.path.abspath(__file__))


def code_version(fn):
    """A hash of the source of fn and of every function and class of this project that it can run, found
    transitively through the global names and closures of their code (and the classes of the objects in a
    closure: the tokenizer). Any edit to that code, such as a column added to a prepared split, changes it."""
    sources, todo = {}, [fn]
    while todo:
        obj = inspect.unwrap(todo.pop())  # an lru_cache'd function: the function itself
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            obj = type(obj)  # an object in a closure: its class
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in sources or not _is_project_code(obj):
            continue
        sources[name] = inspect.getsource(obj)
        for f in [v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj) else [obj]:
            todo += [f.__globals__[n] for n in _code_names(f.__code__) if n in f.__globals__]
            todo += [c.cell_contents for c in f.__closure__ or ()]
    return hashlib.sha256(json.dumps(sorted(sources.items())).encode()).hexdigest()[:16]


def _code_names(code):
    """The global and attribute names a code object and the code nested in it (comprehensions, lambdas) use."""
    return set(code.co_names).union(*(_code_names(c) for c in code.co_consts if inspect.iscode(c)))


def _is_project_code(obj):
    """Whether a function or class is defined in a file under this project's folder (tests included), not in
    an installed package (a virtual environment may sit inside the project)."""
    try:
        parts = os.path.relpath(os.path.abspath(inspect.getsourcefile(obj) or ""), PROJECT).split(os.sep)
    except (TypeError, ValueError):  # built in; on another drive (Windows)
        return False
    return parts[0] != ".." and not {"site-packages", "dist-packages"} & set(parts)


def npy_header(f):
    """(shape, dtype, header length in bytes) of the version 1.0 .npy file open in f; ValueError if it is not one."""
    f.seek(0)
    if np.lib.format.read_magic(f) != (1, 0):
        raise ValueError("not a version 1.0 .npy header")
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    if fortran_order:
        raise ValueError("Fortran order")
    return shape, dtype, f.tell()


def size_text(n):
    """A size in bytes for people: '192 B', '28.8 kB', '505.3 MB', '126.3 GB'."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


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


RAGGED = ("input_ids", "target_ids", "target_scores", "caption_ids")  # the flat values of the prepared splits' ragged columns


def first_rows(split, n):
    """The first n examples of a prepared split (prepare_vqa, _gqa, _nlvr2, _captions; a caption split's examples
    are its images): every per-example column cut to n, a ragged column's offsets to n + 1 (the flat values they
    index stay whole); a caption split's per-caption columns keep the captions of its first n images."""
    c = int((split["caption_image"] < n).sum()) if "caption_image" in split else n  # captions come in image order

    def cut(key, column):
        rows = c if key.startswith("caption_") else n
        return column if key in RAGGED else column[:rows + 1] if key.endswith("_offsets") else column[:rows]
    return {k: cut(k, v) for k, v in split.items()}


def encode_question(tokenizer, question, max_len):
    """<s> question </s> (the model's wrapping), the question truncated so the total is <= max_len."""
    room = max_len - len(tokenizer.wrap([]))
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for the question")
    return tokenizer.wrap(tokenizer.encode(question)[:room])


def _vqa_columns(records, tokenizer, vocab, max_len, desc, prompt=""):
    """The prepared form of one split: columns (lists / tensors) instead of a list of dicts."""
    input_ids, t_ids, t_scores = [], [], []
    for r in progress(records, desc, "q", disable=len(records) < 20000):
        input_ids.append(encode_question(tokenizer, prompt + r["question"], max_len))
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
        "answers": [r["answers"] for r in records],             # the 10 raw human answers (generative scoring)
        "input_ids": ids_flat, "input_offsets": ids_off,        # ragged: question m = flat[off[m]:off[m+1]]
        "target_ids": tid_flat, "target_scores": ts_flat, "target_offsets": t_off,
    }


def prepare_vqa(data_dir, tokenizer, karpathy=None, num_answers=3129, max_len=20, cache_dir=None, prompt=""):
    """Parse, build the answer vocabulary, tokenise (<s> prompt + question </s>) and compute soft targets
    once; cached on disk.

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
              "karpathy": bool(karpathy), "prompt": prompt}

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
                "splits": {name: _vqa_columns(recs, tokenizer, vocab, max_len, f"prepare VQA {name}", prompt)
                           for name, recs in splits.items()}}

    return cached("vqa", sources, params, build, cache_dir or os.path.join(data_dir, "prepared"))


class PromptDataset(torch.utils.data.Dataset):
    """One item per row of a prepared split with ragged inputs and targets (prepare_vqa, prepare_gqa,
    prepare_nlvr2): {"index", "image" (a key, or a pair of keys), "input_ids" (n,), "target_ids" (t,)} plus
    "pixel_values" ((3, S, S), or (2, 3, S, S) for a pair) when images (an Images) is given."""

    def __init__(self, split, images=None):
        self.split, self.images = split, images

    def __len__(self):
        return len(self.split["image"])

    def __getitem__(self, m):
        s = self.split
        a, b = s["input_offsets"][m].item(), s["input_offsets"][m + 1].item()
        c, d = s["target_offsets"][m].item(), s["target_offsets"][m + 1].item()
        item = {"index": m, "image": s["image"][m], "input_ids": s["input_ids"][a:b], "target_ids": s["target_ids"][c:d]}
        if self.images is not None:
            keys = s["image"][m]
            item["pixel_values"] = (torch.stack([self.images(k) for k in keys]) if isinstance(keys, tuple)
                                    else self.images(keys))
        return item


class VQADataset(PromptDataset):
    """One prepared VQA split. Item: {"index": int, "question_id": int, "image_id": int,
    "image": str key, "input_ids": LongTensor (n,), "target_ids": LongTensor (c,),
    "target_scores": FloatTensor (c,)} plus "pixel_values" (3, S, S) when images (an Images) is
    given; without it a trainer looks up cached image features by "image"."""

    def __getitem__(self, m):
        s = self.split
        c, d = s["target_offsets"][m].item(), s["target_offsets"][m + 1].item()
        return {**super().__getitem__(m), "question_id": s["question_id"][m].item(), "image_id": s["image_id"][m].item(),
                "target_scores": s["target_scores"][c:d]}


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
            for i, img in enumerate(progress(imgs, f"prepare captions {name}", "img", disable=len(imgs) < 5000)):
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
    return cached("captions", [karpathy], params, build, cache_dir or folder)


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
# GQA and NLVR2 (the CLIP-BART setting), from the official files
# =============================================================================================
#
# GQA (https://cs.stanford.edu/people/dorarad/gqa/download.html): questions1.2.zip holds
# {train,val,testdev}_balanced_questions.json (also test/challenge files without answers, scored by
# the server, and *_all_questions files, train's in chunks); images.zip holds images/{imageId}.jpg.
# A questions file is one JSON object {questionId: {"imageId", "question", "answer", "fullAnswer",
# "isBalanced", "types": {"structural", "semantic", "detailed"}, "groups": {"global", "local"},
# "entailed", "equivalent", "semantic": [{"operation", "argument", "dependencies"}], "semanticStr",
# "annotations"}}, the fields the official eval.py reads (eval.read_gqa_questions).
#
# NLVR2 (lil-lab/nlvr, nlvr2/README.md): nlvr2/data/{train,dev,test1,test2}.json, one JSON object a
# line with "identifier" (split-set_id-pair_id-sentence_id, e.g. "dev-850-2-0"), "sentence",
# "label" ("True" / "False"), "left_url", "right_url", "writer", "validation", "synset", "query",
# "extra_validations" (dev and test) and "directory" (train only: one of 100 folders). The README
# names the images of an identifier split-set_id-pair_id-sentence_id split-set_id-pair_id-img0.png
# (left) and -img1.png (right); some are not PNGs inside, which Pillow does not mind. The archives of
# the direct download extract to images/train/{directory}/, dev/ and test1/ (as read by the Hugging
# Face NLVR2 loading script and the public fine-tuning codes, e.g. DaVinci's documented layout).

GQA_QUESTIONS = "{}_balanced_questions.json"  # train, val, testdev


def gqa_image_key(image_id):
    """GQA image path relative to the images folder (images.zip's images/): '2354786.jpg'."""
    return f"{image_id}.jpg"


def read_gqa(questions_path, images_dir=None):
    """The questions of an official GQA questions file, in file order: [{"question_id": str,
    "image_id": str, "image": key (gqa_image_key), "question": str, "answer": str, "types":
    {"structural", "semantic", "detailed"}}]. A missing field or a file without answers (test,
    challenge) is a ValueError naming the file and the question; with images_dir, a question whose
    image file is missing is a FileNotFoundError naming both."""
    questions = _read_json(questions_path)
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"{questions_path}: not a GQA questions file (a JSON object {{questionId: question}})")
    records = []
    for qid, q in questions.items():
        for field in ("imageId", "question", "answer"):
            if not isinstance(q, dict) or not isinstance(q.get(field), str):
                raise ValueError(f"{questions_path}: question {qid} has no string field {field!r}")
        types = q.get("types")
        if not isinstance(types, dict) or not all(isinstance(types.get(t), str) for t in ("structural", "semantic")):
            raise ValueError(f"{questions_path}: question {qid} has no 'types' with 'structural' and 'semantic'")
        records.append({"question_id": qid, "image_id": q["imageId"], "image": gqa_image_key(q["imageId"]),
                        "question": q["question"], "answer": q["answer"], "types": types})
    if images_dir is not None:
        _check_images(questions_path, images_dir, ((f"question {r['question_id']}", r["image"]) for r in records))
    return records


def _check_images(source, images_dir, items):
    """FileNotFoundError for the first (what, image key) whose file is not under images_dir."""
    seen = set()
    for what, key in items:
        if key not in seen:
            seen.add(key)
            path = os.path.join(images_dir, key)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{source}: {what}: image not found: {path}")


def nlvr2_image_keys(identifier, directory=None):
    """The (left, right) image paths of an NLVR2 example relative to the folder holding the extracted
    archives: train -> images/train/{directory}/train-10171-0-img0.png, dev -> dev/dev-850-2-img0.png,
    test1 -> test1/test1-0-1-img0.png (the identifier without its sentence id, then -img0 / -img1)."""
    split, set_id, pair_id, _ = nlvr2_identifier(identifier)
    folder = f"images/train/{directory}" if split == "train" else split
    return [f"{folder}/{split}-{set_id}-{pair_id}-img{k}.png" for k in (0, 1)]


def read_nlvr2(path, images_dir=None):
    """The examples of an official NLVR2 JSON-lines file, in file order: [{"identifier": str,
    "sentence": str, "label": bool, "images": [left key, right key] (nlvr2_image_keys)}]. A malformed
    line is a ValueError naming the file and the line number; with images_dir, a missing image file is
    a FileNotFoundError naming the example and the image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NLVR2 file not found: {path}")
    records = []
    for where, obj in read_nlvr2_lines(path):  # identifier and label checked
        if not isinstance(obj.get("sentence"), str):
            raise ValueError(f"{where}: no string field 'sentence'")
        directory = obj.get("directory")
        if obj["identifier"].startswith("train-") and not (
                type(directory) is int or (isinstance(directory, str) and directory.isdigit())):
            raise ValueError(f"{where}: a train example needs its image folder number 'directory', "
                             f"got {directory!r:.50}")
        records.append({"identifier": obj["identifier"], "sentence": obj["sentence"],
                        "label": obj["label"] == "True", "images": nlvr2_image_keys(obj["identifier"], directory)})
    if images_dir is not None:
        _check_images(path, images_dir, ((f"example {r['identifier']}", key) for r in records for key in r["images"]))
    return records


def prepare_gqa(gqa_dir, tokenizer, prompt="gqa: ", max_len=20, cache_dir=None):
    """GQA for a generative model, tokenised once and cached (cache_dir defaults to GQA_DIR/prepared): the
    inputs <s> prompt + question </s> (at most max_len tokens) and the targets <s> answer </s>. Splits as
    VL-Adapter and VL-PET use them: "train" = the train and val balanced questions, "testdev" = testdev.
    Columns: question_id, image (a key under GQA_DIR/images), question and answer [str], input_ids /
    input_offsets and target_ids / target_offsets (ragged)."""
    files = {s: os.path.join(gqa_dir, "questions1.2", GQA_QUESTIONS.format(s)) for s in ("train", "val", "testdev")}
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GQA file not found: {path}")
    params = {"tokenizer": tokenizer.fingerprint, "prompt": prompt, "max_len": max_len}

    def build():
        parts = {"train": read_gqa(files["train"]) + read_gqa(files["val"]), "testdev": read_gqa(files["testdev"])}
        return {name: {"question_id": [r["question_id"] for r in rs], "image": [r["image"] for r in rs],
                       "question": [r["question"] for r in rs], "answer": [r["answer"] for r in rs],
                       **_prompted(tokenizer, prompt, [r["question"] for r in rs], [r["answer"] for r in rs], max_len)}
                for name, rs in parts.items()}

    return cached("gqa", list(files.values()), params, build, cache_dir or os.path.join(gqa_dir, "prepared"))


def prepare_nlvr2(nlvr2_dir, tokenizer, prompt="nlvr: ", cache_dir=None):
    """NLVR2 for a generative model, tokenised once and cached (cache_dir defaults to NLVR2_DIR/prepared): the
    inputs <s> prompt + sentence </s> (not cut, as VL-Adapter) and the targets <s> true </s> or <s> false </s>.
    Splits "train", "dev", "test1" from NLVR2_DIR/data/{split}.json. Columns: identifier and sentence [str],
    image [(left, right) keys under NLVR2_DIR], label (BoolTensor), input_ids / input_offsets, target_ids /
    target_offsets."""
    files = {s: os.path.join(nlvr2_dir, "data", f"{s}.json") for s in ("train", "dev", "test1")}
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NLVR2 file not found: {path}")
    params = {"tokenizer": tokenizer.fingerprint, "prompt": prompt}

    def build():
        out = {}
        for name, path in files.items():
            rs = read_nlvr2(path)
            out[name] = {"identifier": [r["identifier"] for r in rs], "image": [tuple(r["images"]) for r in rs],
                         "sentence": [r["sentence"] for r in rs],
                         "label": torch.tensor([r["label"] for r in rs], dtype=torch.bool),
                         **_prompted(tokenizer, prompt, [r["sentence"] for r in rs],
                                     ["true" if r["label"] else "false" for r in rs], None)}
        return out

    return cached("nlvr2", list(files.values()), params, build, cache_dir or os.path.join(nlvr2_dir, "prepared"))


def _prompted(tokenizer, prompt, texts, targets, max_len):
    """Ragged columns of <s> prompt + text </s> (cut to max_len tokens unless None) and <s> target </s>."""
    inputs = [tokenizer.wrap(tokenizer.encode(prompt + t)) if max_len is None else
              encode_question(tokenizer, prompt + t, max_len) for t in texts]
    ids, off = _ragged(inputs)
    tids, toff = _ragged([tokenizer.wrap(tokenizer.encode(t)) for t in targets])
    return {"input_ids": ids, "input_offsets": off, "target_ids": tids, "target_offsets": toff}


def seq2seq_targets(targets, start_id, pad_id):
    """Decoder inputs and labels of an encoder-decoder from B target sequences (<s> ... </s>, lists or 1-D
    tensors): decoder_input_ids (B, T) = the targets shifted right behind start_id (BART starts from </s>),
    padded with pad_id; labels (B, T) = the targets, padded with -100 (never supervised)."""
    targets = [torch.as_tensor(t, dtype=torch.long) for t in targets]
    labels, mask = pad_sequences(targets, -100)
    shifted = [torch.cat([torch.tensor([start_id]), t[:-1]]) for t in targets]
    decoder_input_ids, _ = pad_sequences(shifted, pad_id)
    return decoder_input_ids, labels


def collate_prompted(batch, pad_id, start_id):
    """PromptDataset items -> {"input_ids" (B, N) padded with pad_id, "attention_mask" (B, N), "decoder_input_ids"
    and "labels" (B, T) (seq2seq_targets), "index" (B,), "image" [B keys or pairs], "pixel_values" if present}."""
    input_ids, attention_mask = pad_sequences([b["input_ids"] for b in batch], pad_id)
    decoder_input_ids, labels = seq2seq_targets([b["target_ids"] for b in batch], start_id, pad_id)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
           "labels": labels, "index": torch.tensor([b["index"] for b in batch]), "image": [b["image"] for b in batch]}
    if "pixel_values" in batch[0]:
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])  # (B, [2,] 3, S, S)
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




class ImageFeatures:
    """Features of a frozen image encoder by image key: computed once per image and kept on disk as one
    memory-mapped .npy array (rows in key order; dtype float32, or float16 for large grids), or, without a
    cache folder, computed on every batch from the pixels the DataLoader loads (see `pixels`).

    encode(pixel_values (B, 3, S, S)) -> (B, L, d) tensor. The cache key (cache_file) covers the encoder's
    checkpoint file `source`, every image file, the preprocessing, `params` (what encode keeps, a version of
    its code: change it when encode changes) and the keys. An example may have several images (an NLVR2
    pair): its features are those of its images one after the other, (B, n_images * L, d). `name` is what the
    log line calls the encoder (e.g. "vit_large ckpt/vit-large.pt"; default: source). An extraction says what it
    computes, shows its progress (data.progress) and resumes where a kill stopped it (write)."""

    batch_size = 64  # images per encode call

    def __init__(self, images, encode, source, params, cache_dir=None, dtype="float32", workers=0, name=None):
        self.images, self.encode, self.source, self.params = images, encode, source, params
        self.cache_dir, self.dtype, self.workers, self.name = cache_dir, dtype, workers, name or source
        self.table, self.row = None, None

    @property
    def pixels(self):
        """What a dataset must load per image: the Images when the features are computed per batch, else None."""
        return self.images if self.table is None else None

    def prepare(self, keys):
        """Compute (or load) the cached features of these image keys (without a cache folder: nothing). One process
        computes a cache entry at a time (a lock beside it); the others wait for it, then read it."""
        if self.cache_dir is None:
            return
        if not keys:
            raise ValueError("ImageFeatures.prepare: no image keys")
        missing = next((k for k in keys if not os.path.isfile(self.images.path(k))), None)
        if missing:
            raise FileNotFoundError(f"image not found: {self.images.path(missing)} (images folder {self.images.images_dir})")
        params = {**self.params, "dtype": self.dtype, "size": self.images.size, "mean": self.images.mean,
                  "std": self.images.std, "keys": keys}
        path = cache_file("features", [self.source] + [self.images.path(k) for k in keys], params, self.cache_dir, ".npy")
        self.table = self.load(path, len(keys))
        if self.table is None:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(os.path.join(self.cache_dir, f".{os.path.basename(path)}.lock"), "a") as lock:
                wait_for_lock(lock, path)
                self.table = self.load(path, len(keys))  # made by the process we waited for
                if self.table is None:
                    self.write(keys, path)
                    self.table = np.load(path, mmap_mode="r")
        self.row = {k: i for i, k in enumerate(keys)}

    def load(self, path, n):
        """The memory-mapped (n, L, d) array at path, or None if there is none; a damaged one is deleted (to be made
        again) with one line saying so."""
        if not os.path.isfile(path):
            return None
        try:
            table = np.load(path, mmap_mode="r")
            if table.shape[0] != n or table.dtype != self.dtype:
                raise ValueError(f"shape {table.shape}, dtype {table.dtype}")
            return table
        except (ValueError, OSError) as e:  # a cache: an entry damaged on disk is made again
            print(f"cache entry {path} is damaged ({e}); rebuilding it", flush=True)
            with contextlib.suppress(FileNotFoundError):  # another process found it damaged too
                os.remove(path)
            return None

    @torch.no_grad()
    def write(self, keys, path):
        """Compute the features of every key into the .npy file at path, resumably. The rows go in key order into
        PATH.partial, a .npy file whose header holds the final shape from the start (one image is encoded first
        to learn it). Every PROGRESS_EVERY seconds the rows so far are made durable (flush, fsync), then their
        count is written atomically to PATH.partial.json: a kill loses at most that much work, and the next call
        continues from the count, at a batch boundary, so the file ends up byte for byte the one a run never
        killed writes. Complete, it is renamed to path. The caller holds the entry's lock (prepare)."""
        n, partial, done_file = len(keys), path + ".partial", path + ".partial.json"
        folder, name = glob.escape(os.path.dirname(path)), glob.escape(os.path.basename(done_file))
        for tmp in glob.glob(os.path.join(folder, f".tmp-*-{name}")):
            os.remove(tmp)  # a count write that a kill cut short
        start = self.resume_point(partial, done_file, n)
        if start is None:  # a fresh start
            start, shape = 0, (n, *self.encode(self.images(keys[0])[None]).shape[1:])  # (n, L, d)
            write_json({"rows": 0}, done_file)  # first: a partial file without its count is damaged
            with open(partial, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(self.dtype).str, "fortran_order": False,
                                                         "shape": shape})
        with open(partial, "r+b") as f:
            shape, _, offset = npy_header(f)
            row_bytes = math.prod(shape[1:]) * np.dtype(self.dtype).itemsize
            cached = f"{start} cached by an interrupted run" if start else "none cached yet"
            print(f"image features: computing {n - start} images of {n} ({cached}) with {self.name} into {path}: "
                  f"{self.dtype} {tuple(shape[1:])} per image, {row_bytes} bytes each, {size_text(n * row_bytes)} in all",
                  flush=True)
            f.seek(offset + start * row_bytes)
            loader = torch.utils.data.DataLoader(ImageDataset(keys[start:], self.images), batch_size=self.batch_size,
                                                 num_workers=self.workers)
            bar, done, last = progress(None, "image features", "img", total=n, initial=start), start, time.monotonic()
            for batch in loader:
                x = self.encode(batch["pixel_values"]).float().cpu().numpy().astype(self.dtype)  # (B, L, d)
                if x.shape[1:] != shape[1:]:
                    raise ValueError(f"{self.name} gives features of shape {x.shape[1:]}, {partial} holds {shape[1:]}: "
                                     "change the features' params when their code changes")
                f.write(np.ascontiguousarray(x).tobytes())
                done += len(x)
                bar.update(len(x))
                if time.monotonic() - last >= PROGRESS_EVERY:
                    f.flush()
                    os.fsync(f.fileno())
                    write_json({"rows": done}, done_file)
                    last = time.monotonic()
            bar.close()
            f.truncate()  # rows past the end (none unless the file was damaged) are not the entry's
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        os.remove(done_file)

    def resume_point(self, partial, done_file, n):
        """The rows an interrupted extraction made durable in its partial file, or None if there is none. Damaged
        partial state (an unreadable count or header, another shape or dtype, fewer rows in the file than counted)
        gives None and one line saying so (the fresh start writes over it)."""
        if not os.path.isfile(partial):
            return None
        try:
            done = _read_json(done_file)
            rows = done.get("rows") if isinstance(done, dict) else None
            if type(rows) is not int or not 0 <= rows <= n:
                raise ValueError(f"{done_file} counts {rows!r} rows of {n}")
            with open(partial, "rb") as f:
                shape, dtype, offset = npy_header(f)
            if len(shape) != 3 or shape[0] != n or dtype != self.dtype:
                raise ValueError(f"shape {shape}, dtype {dtype}; expected ({n}, L, d), {self.dtype}")
            if os.path.getsize(partial) < offset + rows * math.prod(shape[1:]) * dtype.itemsize:
                raise ValueError(f"{done_file} counts {rows} rows, the file holds fewer")
            return rows
        except (OSError, ValueError) as e:
            print(f"partial cache entry {partial} is damaged ({e}); starting it again", flush=True)
            return None

    def __call__(self, batch):
        """The features of a batch's examples, float32 on the CPU: (B, n_images * L, d)."""
        images = [k if isinstance(k, (tuple, list)) else (k,) for k in batch["image"]]
        if self.table is not None:
            rows = self.table[[self.row[k] for ks in images for k in ks]]  # (B * n_images, L, d)
            x = torch.from_numpy(np.ascontiguousarray(rows)).float()
        else:
            pixels = batch["pixel_values"]  # (B, 3, S, S) or, for pairs, (B, n_images, 3, S, S)
            x = self.encode(pixels.flatten(0, pixels.dim() - 4)).float().cpu()  # (B * n_images, L, d)
        return x.reshape(len(images), -1, x.shape[-1])  # (B, n_images * L, d)


# ---- a frozen image encoder's features for the task models ------------------------------------------------------------------------------


def select_visual(last_hidden, pooler, visual):
    """The ViT feature of the chosen kind: (B, L, d), L = 1 except for patches (L = number of patches)."""
    if visual == "pooler":
        return pooler[:, None]                           # (B, d) -> (B, 1, d)
    if visual == "cls":
        return last_hidden[:, :1]                        # (B, 1, d)
    if visual == "mean":
        return last_hidden[:, 1:].mean(1, keepdim=True)  # (B, 1, d)
    return last_hidden[:, 1:]                            # patches: (B, P, d)


class Features:
    """A frozen image encoder's input to the task model for a batch: (visual tokens (B, L, d), x_R). A ViT gives
    one feature of kind cfg.visual as both the visual prefix and x_R; CLIP's ResNet gives its layer4 grid,
    adaptive-max-pooled to 6 x 6 = 36 tokens per image as VL-Adapter does (x_R is then made by the model,
    after its visual embedding). Computed once per image and cached on disk (ImageFeatures; CLIP grids
    in fp16), or with --no-feature-cache by the encoder on every batch."""

    VERSION = 3  # of the feature code (select_visual, the pooler, the 6 x 6 pool, preprocess)

    def __init__(self, cfg, encoder, path, images_dir, device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        c = encoder.config
        self.d, self.grid = c.d_model, c.arch == "clip_resnet"
        images = Images(images_dir, c.image_size, c.image_mean, c.image_std, c.image_resample)
        kind = "grid6x6" if self.grid else cfg.visual
        self.store = ImageFeatures(images, self.encode, path, {"version": self.VERSION, "visual": kind, "precision": cfg.precision},
                                        cfg.cache if cfg.feature_cache else None, "float16" if self.grid else "float32",
                                        cfg.workers, name=f"{c.arch} {path}")

    @property
    def pixels(self):
        return self.store.pixels

    def autocast(self):
        """The forward passes' precision (--precision): bf16 autocast, or none (fp32, as the releases trained)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def path(self, key):
        return self.store.images.path(key)

    def cache(self, keys):
        """Compute the features of these images into the cache (nothing without --feature-cache)."""
        self.store.prepare(keys)

    @torch.no_grad()
    def encode(self, pixel_values):
        with self.autocast():
            out = self.encoder(pixel_values.to(self.device))
        if not self.grid:
            return select_visual(*out, self.cfg.visual).float()
        grid = out[0]  # (B, h * w, C), row-major
        h = math.isqrt(grid.shape[1])
        grid = grid.transpose(1, 2).reshape(grid.shape[0], -1, h, h)  # (B, C, h, w)
        # RN101 at 224 px: 7 x 7 -> 6 x 6. A smaller grid (the demo's tiny ResNet: 2 x 2) stays as it is: pooling
        # it up to 6 x 6 would only repeat its cells
        return torch.nn.functional.adaptive_max_pool2d(grid.float(), min(h, 6)).flatten(2).transpose(1, 2)  # (B, C, 6, 6) -> (B, 36, C)

    def __call__(self, batch):
        x = self.store(batch).to(self.device)
        return x, (None if self.grid else x)  # (visual tokens, x_R)
