"""Data: byte-level BPE; VQAv2, Karpathy COCO captions, GQA and NLVR2 from the official files; image
preprocessing with Pillow; collate functions; the prepared-data and image-feature caches. The real
formats only: the demo's synthetic world, written in these formats, is in shapes.py.

    python -m pytest -q tests/test_bpe.py tests/test_data.py                 # the tests

Layout read by the loaders (the real datasets and the synthetic world alike):

    DATA/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json    VQAv2 questions
    DATA/v2_mscoco_{train2014,val2014}_annotations.json            VQAv2 annotations (10 answers each)
    DATA/dataset_coco.json                                         Karpathy split + 5 captions per image
    IMAGES/{train2014,val2014}/COCO_{split}_{image_id:012d}.jpg    COCO images
    GQA/questions1.2/{train,val,testdev}_balanced_questions.json   GQA (see the GQA and NLVR2 section)
    GQA/images/{imageId}.jpg
    NLVR2/data/{train,dev,test1}.json, NLVR2/images/train/..., NLVR2/{dev,test1}/...   NLVR2 pairs

Typical use (a trainer):

    tok = BPETokenizer.from_checkpoint("ckpt/roberta-large.pt")
    vqa = prepare_vqa("DATA", tok)                                # parsed + tokenised once, cached
    train = VQADataset(vqa["splits"]["train"])                    # items carry image keys
    collate = functools.partial(collate_vqa, pad_id=tok.pad_id, num_answers=len(vqa["answers"]))
    images = Images("IMAGES", size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = images(train[0]["image"])                            # (3, 224, 224), or use cached features

Runtime imports: torch, numpy, PIL, tqdm, the standard library and eval.py.
"""
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import unicodedata
from collections import Counter

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval import atomic_write, nlvr2_identifier, normalize_answer, read_nlvr2_lines, vqa_accuracy

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


def lock_file(f):
    """An exclusive, non-blocking lock on an open file (OSError if another process holds it)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def progress(iterable, desc, unit, total=None, disable=False):
    """A progress bar (tqdm) on a terminal; nothing in a redirected log, where train.py prints a line per epoch."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, mininterval=1.0,
                disable=disable or not sys.stderr.isatty())


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
    pair): its features are those of its images one after the other, (B, n_images * L, d)."""

    def __init__(self, images, encode, source, params, cache_dir=None, dtype="float32", workers=0):
        self.images, self.encode, self.source, self.params = images, encode, source, params
        self.cache_dir, self.dtype, self.workers = cache_dir, dtype, workers
        self.table, self.row = None, None

    @property
    def pixels(self):
        """What a dataset must load per image: the Images when the features are computed per batch, else None."""
        return self.images if self.table is None else None

    def prepare(self, keys):
        """Compute (or load) the cached features of these image keys (without a cache folder: nothing)."""
        if self.cache_dir is None:
            return
        missing = next((k for k in keys if not os.path.isfile(self.images.path(k))), None)
        if missing:
            raise FileNotFoundError(f"image not found: {self.images.path(missing)} (images folder {self.images.images_dir})")
        params = {**self.params, "dtype": self.dtype, "size": self.images.size, "mean": self.images.mean,
                  "std": self.images.std, "keys": keys}
        path = cache_file("features", [self.source] + [self.images.path(k) for k in keys], params, self.cache_dir, ".npy")
        self.table = self.load(path, len(keys))
        if self.table is None:
            atomic_write(path, functools.partial(self.write, keys), "wb")
            self.table = self.load(path, len(keys))
        self.row = {k: i for i, k in enumerate(keys)}

    def load(self, path, n):
        """The memory-mapped (n, L, d) array at path, or None if there is none; a damaged one is made again."""
        if not os.path.isfile(path):
            return None
        try:
            table = np.load(path, mmap_mode="r")
            if table.shape[0] != n or table.dtype != self.dtype:
                raise ValueError(f"shape {table.shape}, dtype {table.dtype}")
            return table
        except (ValueError, OSError) as e:  # a cache: an entry cut short by a kill or a full disk is made again
            print(f"cache entry {path} is damaged ({e}); rebuilding it")
            return None

    @torch.no_grad()
    def write(self, keys, f):
        """Stream the features of every key into an open .npy file: the header (with the shape, known from the
        first batch), then the rows in key order."""
        loader = torch.utils.data.DataLoader(ImageDataset(keys, self.images), batch_size=64, num_workers=self.workers)
        for i, batch in enumerate(progress(loader, "image features", "batch")):
            x = self.encode(batch["pixel_values"]).float().cpu().numpy().astype(self.dtype)  # (B, L, d)
            if i == 0:
                np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(self.dtype).str, "fortran_order": False,
                                                         "shape": (len(keys), *x.shape[1:])})
            f.write(np.ascontiguousarray(x).tobytes())

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
