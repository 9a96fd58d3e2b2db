"""Fine-tune frozen backbones with LoRA, Adapters or VL-PET and a routing function: train, evaluate, study.

    python train.py                             # demo: synthetic VQA, tiny pretrained ViT + RoBERTa, CPU
    python train.py --task caption              # demo: synthetic captioning with a tiny GPT-2
    python train.py --task multitask            # demo: CLIP-BART on VQA, GQA, NLVR2 and captions at once
    python train.py --preset vqa-lora --vision ckpt/vit-l16.pt --text ckpt/roberta-large.pt \\
        --data DATA --images IMAGES             # a paper setting (README: all three)
    python train.py --resume runs/vqa           # continue a run exactly where it stopped
    python train.py --evaluate runs/vqa --split test   # regenerate a run's predictions and score them
    python train.py --study                     # every route x PEFT method x seeds: runs/study/study.md, .png
    torchrun --nproc_per_node 2 train.py ...    # DDP: each process takes its share of every batch
    python train.py --help                      # every option with its default

The file top to bottom: the options (Config, presets); the frozen visual features; the tasks (one class per
task: its data, loss, evaluation and text-only baseline) and their models, setting by setting; the loop
(main); records and checkpoints; the study.

A frozen image encoder gives, per example, the visual tokens (the text model's visual prefix, or BART's
extra encoder input) and the routing input x_R of every PEFT bottleneck; for the ViT settings both are the
same vector (by default the pooler output). The encoder is frozen, so its features are computed once and
cached.

Run folder OUT: config.json, metrics.jsonl (one record per evaluation, always those of last.pt),
results_{task}_{split}.json (the official results format), gallery_{task}.png, last.pt (what training
changed, the optimizer, the step and the records).
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import glob
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as metrics
import models
import routing_peft as rp
import shapes


@dataclass
class Config:
    task: str = "vqa"             # vqa (an answer classifier on RoBERTa) | caption (a GPT-2 decoder) | multitask (CLIP-BART: VQA, GQA, NLVR2, captions)
    vision: str = "tiny"          # converted image encoder, ViT (vqa, caption) or CLIP ResNet (multitask), or "tiny" (the demo's)
    text: str = "tiny"            # converted text checkpoint (RoBERTa for vqa, GPT-2 for caption, BART for multitask), or "tiny"
    data: str = "shapes"          # folder with the VQAv2 files and/or dataset_coco.json; "shapes": the demo's world
    images: str = ""              # folder with train2014/ and val2014/ ("" = the data folder)
    gqa: str = ""                 # multitask: GQA folder with questions1.2/ and images/ ("" = DATA/gqa)
    nlvr2: str = ""               # multitask: NLVR2 folder with data/ and the image folders ("" = DATA/nlvr2)
    vqa_split: str = "auto"       # karpathy: train/val/test by dataset_coco.json | official: train2014 / val2014 | auto: karpathy if that file is there
    peft: str = "lora"            # lora (q, v of every attention) | adapter (after every attention and FFN) | vlpet-large | vlpet-middlex | vlpet-middley | vlpet-small (multitask)
    route: str = "mul"            # routing function, one of routing_peft.ROUTES
    rank: int = 16                # bottleneck width r
    alpha: float = 16.0           # LoRA scale alpha / r (LoRA only)
    dropout: float = 0.0          # LoRA dropout on x and x_R (LoRA only)
    visual: str = "pooler"        # x_R: pooler | cls | mean | patches (ViT); mean | patches of the embedded CLIP tokens (multitask); patches only with route matmul
    prefix: bool = True           # the visual tokens as the first input embeddings of the text model
    shuffle_visual: bool = False  # control: every image's features replaced by another image's (a fixed derangement)
    train_ln: bool = True         # also train the LayerNorms inside the text model's blocks
    epochs: int = 6               # passes over the training split
    batch_size: int = 64          # examples per batch (under torchrun: all processes together)
    grad_accum: int = 1           # batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-3              # peak AdamW learning rate
    warmup: float = 0.05          # linear warm-up: a fraction of all steps if < 1, else steps; then linear decay
    weight_decay: float = 0.0     # AdamW weight decay
    adam_eps: float = 1e-8        # AdamW epsilon
    clip: float = 0.0             # gradient-norm clipping (0 = none)
    max_len: int = 20             # text tokens: <s> question </s> (vqa, and multitask's VQA and GQA) or caption + EOS (caption)
    answers: int = 3129           # K, size of the answer vocabulary (vqa)
    beams: int = 5                # beam width for captioning (1 = greedy)
    max_new_tokens: int = 20      # caption length limit in tokens (multitask: also the training captions')
    max_steps: int = 0            # stop after this many optimizer steps (0 = all epochs); schedule unchanged
    train_limit: int = 0          # train on the first N examples of each task only (0 = all; VL-T5's --train_topk)
    seed: int = 0                 # seeds the new weights, the data order and dropout
    device: str = "auto"          # auto | cpu | cuda | mps
    workers: int = 2              # image-loading processes (only when features are not cached)
    out: str = ""                 # run folder ("" = runs/TASK)
    feature_cache: bool = True    # cache frozen image features on disk (off: recompute every step, as released)
    cache: str = "cache"          # folder of the feature and prepared-data caches, shared by runs


# The released hyper-parameters of the two paper settings (README). Checkpoint and data paths are the
# README's; pass --vision/--text/--data/--images to change them.
PAPER = dict(vision="ckpt/vit-l16.pt", images="data/coco", epochs=20)
PRESETS = {
    "vqa-lora": dict(PAPER, task="vqa", text="ckpt/roberta-large.pt", data="data/vqa", peft="lora", rank=128,
                     alpha=128, lr=3e-4, batch_size=512, warmup=0.05),
    "vqa-adapter": dict(PAPER, task="vqa", text="ckpt/roberta-large.pt", data="data/vqa", peft="adapter", rank=64,
                        lr=3e-4, batch_size=512, warmup=0.05),
    "caption-lora": dict(PAPER, task="caption", text="ckpt/gpt2-medium.pt", data="data/coco", peft="lora",
                         rank=128, alpha=128, lr=3e-5, batch_size=40, warmup=5000, max_len=50),
}
# The CLIP-BART setting as VL-PET released it (scripts/image-text/*.sh, CLIPBART_NOTES 1.7): batch 500 (VQA; the
# other tasks' batches in proportion), 20 epochs, AdamW lr 1e-3, eps 1e-6, weight decay 0.01, 10 % warm-up, gradient
# clipping at 5 (the converted bart-base keeps its dropout 0.1). LoRA r 128 / alpha 32 / dropout 0.1, the
# adapters and VL-PET r 96 (VL-PET: gate rank 96 and the decoder's value adapter r 96 too).
CLIP_BART = dict(task="multitask", vision="ckpt/clip-rn101.pt", text="ckpt/bart-base.pt", data="data/vqa", images="data/coco",
                 gqa="data/gqa", nlvr2="data/nlvr2", visual="mean", batch_size=500, epochs=20, lr=1e-3, adam_eps=1e-6,
                 weight_decay=0.01, warmup=0.1, clip=5.0, beams=5, max_new_tokens=40, rank=96)
PRESETS.update({"multitask-lora": dict(CLIP_BART, peft="lora", rank=128, alpha=32, dropout=0.1),
                "multitask-adapter": dict(CLIP_BART, peft="adapter"),
                **{f"multitask-{p}": dict(CLIP_BART, peft=p) for p in ("vlpet-large", "vlpet-middlex", "vlpet-middley",
                                                                         "vlpet-small")}})
CHOICES = {"task": ("vqa", "caption", "multitask"), "vqa_split": ("auto", "karpathy", "official"),
           "peft": ("lora", "adapter", "vlpet-large", "vlpet-middlex", "vlpet-middley", "vlpet-small"),
           "route": tuple(rp.ROUTES), "visual": ("pooler", "cls", "mean", "patches"),
           "device": ("auto", "cpu", "cuda", "mps")}
# The demo's defaults of a setting other than the first (the Config defaults are the VQA demo's): below a preset
# and explicit options. CLIP-BART: x_R the mean embedded visual token; VL-PET-large with route mul; VL-PET's
# optimiser settings (AdamW eps 1e-6, weight decay 0.01, 10 % warm-up, gradient clipping at 5); caption beams 5,
# at most 40 tokens.
TASK_DEFAULTS = {"multitask": dict(visual="mean", peft="vlpet-large", adam_eps=1e-6, weight_decay=0.01, warmup=0.1,
                                   clip=5.0, max_new_tokens=40, epochs=2, batch_size=64, lr=1e-2)}
LORA_ONLY = ("alpha", "dropout")
RESUME_OVERRIDES = ("max_steps", "device", "workers")  # what --resume may change: not the math
META = ("preset", "resume", "overwrite", "evaluate", "split", "study")  # command-line options that are not Config fields


# ---- options: dataclass -> argparse, presets, checks ---------------------------------------------------


def field_help():
    """The comment after each Config field, read from this file: one source for defaults and --help."""
    helps = {}
    with open(__file__, encoding="utf-8") as f:
        for line in f:
            name, sep, rest = line.strip().partition(":")
            if sep and name in Config.__dataclass_fields__ and "#" in rest:
                helps.setdefault(name, rest.split("#", 1)[1].strip())
    return helps


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad options: one line, no usage block (python train.py --help lists them)."""
        self.exit(2, f"error: {message} (see python train.py --help)\n")


def build_parser():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps.get(f.name, '')} (default: {f.default!r})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=None, choices=CHOICES.get(f.name), help=text)
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)}, or a JSON file of options; explicit options win")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN exactly, with its own options")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="train into --out even if it holds another run: that run's files are deleted first")
    parser.add_argument("--evaluate", metavar="RUN", help="rebuild the run in RUN (its folder or last.pt), predict "
                        "--split and score it: RUN/results_TASK_SPLIT.json and RUN/metrics_SPLIT.json")
    parser.add_argument("--split", help="with --evaluate: the split to predict (default: test)")
    parser.add_argument("--study", action="store_true", default=None,
                        help="train every route x PEFT method x seeds (VQA and captions, with controls; or --task "
                             f"multitask) from these options; table and chart in OUT/study.md, study.png (default OUT: "
                             f"{STUDY_OUT}, {STUDY_OUT}-multitask)")
    return parser


def load_preset(name):
    """Options of a preset: a name in PRESETS or a JSON file; unknown keys are an error."""
    if name in PRESETS:
        return PRESETS[name]
    if not os.path.isfile(name):
        raise ValueError(f"unknown preset {name!r}: not one of {sorted(PRESETS)} and not a JSON file")
    options = metrics.load_json(name, "preset")
    unknown = sorted(set(options) - set(Config.__dataclass_fields__)) if isinstance(options, dict) else None
    if unknown or not isinstance(options, dict):
        raise ValueError(f"preset {name!r} has unknown options {unknown}" if unknown else
                         f"preset {name!r} must be a JSON object of options")
    return options


def parse_command_line(argv=None):
    """(Config, meta): defaults < preset < explicit options; meta holds the META options given and "given",
    the fields set by the preset or the command line. With --resume only RESUME_OVERRIDES may be given."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    meta = {k: args.pop(k) for k in META if k in args}
    fixed = sorted(set(args) - set(RESUME_OVERRIDES))
    if meta.get("resume") and fixed:
        raise ValueError(f"--resume continues a run with its own options; only "
                         f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may change, "
                         f"not {', '.join('--' + k.replace('_', '-') for k in fixed)}")
    options = load_preset(meta["preset"]) if "preset" in meta else {}
    meta["given"] = set(options) | set(args)
    task = args.get("task", options.get("task", Config.task))
    return Config(**{**TASK_DEFAULTS.get(task, {}), **options, **args}), meta


def config_from_args(argv=None):
    return parse_command_line(argv)[0]


def check_config(cfg):
    """One clear error for options that do not fit together or cannot reach the model."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {list(allowed)}")
    if cfg.visual == "patches" and cfg.route not in ("none", "matmul", "matmul_relu"):
        raise ValueError(f"--visual patches gives many visual tokens; only route 'matmul' handles them "
                         f"(route {cfg.route!r} needs one vector per image)")
    for names, ok, need in ((("rank", "epochs", "batch_size", "grad_accum", "max_len", "answers", "beams", "max_new_tokens"),
                             lambda v: v >= 1, "at least 1"), (("lr", "alpha"), lambda v: v > 0, "> 0"),
                            (("max_steps", "train_limit", "warmup", "weight_decay", "workers", "clip"), lambda v: v >= 0, ">= 0"),
                            (("dropout",), lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {need}, got {getattr(cfg, name)}")
    changed = [n for n in LORA_ONLY if getattr(cfg, n) != Config.__dataclass_fields__[n].default]
    if cfg.peft != "lora" and changed:
        raise ValueError(f"--{changed[0]} applies to LoRA only; --peft {cfg.peft} would ignore it")
    clip_bart = cfg.task == "multitask"
    if cfg.peft.startswith("vlpet") and not clip_bart:
        raise ValueError(f"--peft {cfg.peft}: VL-PET is built for the CLIP-BART setting (--task multitask)")
    if clip_bart and cfg.visual not in ("mean", "patches"):
        raise ValueError(f"--visual {cfg.visual}: the CLIP-BART setting routes the mean embedded visual token (mean) "
                         f"or all of them (patches)")


# ---- frozen visual features ------------------------------------------------------------------------------


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
    after its visual embedding). Computed once per image and cached on disk (data.ImageFeatures; CLIP grids
    in fp16), or with --no-feature-cache by the encoder on every batch."""

    VERSION = 3  # of the feature code (select_visual, the pooler, the 6 x 6 pool, data.preprocess)

    def __init__(self, cfg, encoder, path, images_dir, device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        c = encoder.config
        self.d, self.grid = c.d_model, c.arch == "clip_resnet"
        images = data.Images(images_dir, c.image_size, c.image_mean, c.image_std, c.image_resample)
        kind = "grid6x6" if self.grid else cfg.visual
        self.store = data.ImageFeatures(images, self.encode, path, {"version": self.VERSION, "visual": kind},
                                        cfg.cache if cfg.feature_cache else None, "float16" if self.grid else "float32",
                                        cfg.workers)

    @property
    def pixels(self):
        return self.store.pixels

    def path(self, key):
        return self.store.images.path(key)

    def prepare(self, keys):
        self.store.prepare(keys)
        if self.store.pixels is None:
            self.encoder = None  # cached: not needed again

    @torch.no_grad()
    def encode(self, pixel_values):
        with autocast(self.device):
            out = self.encoder(pixel_values.to(self.device))
        if not self.grid:
            return select_visual(*out, self.cfg.visual).float()
        grid = out[0]  # (B, h * w, C), row-major
        h = math.isqrt(grid.shape[1])
        grid = grid.transpose(1, 2).reshape(grid.shape[0], -1, h, h)  # (B, C, h, w)
        # RN101 at 224 px: 7 x 7 -> 6 x 6. A smaller grid (the demo's tiny ResNet: 2 x 2) stays as it is: pooling
        # it up to 6 x 6 would only repeat its cells
        return F.adaptive_max_pool2d(grid.float(), min(h, 6)).flatten(2).transpose(1, 2)  # (B, C, 6, 6) -> (B, 36, C)

    def __call__(self, batch):
        x = self.store(batch).to(self.device)
        return x, (None if self.grid else x)  # (visual tokens, x_R)


def derange_images(splits, seed):
    """The shuffle_visual control: each image key of every split replaced by another image's key, by a random
    cycle over the sorted unique keys (a derangement: no image keeps its own features, however often it
    occurs in a batch), fixed by the seed, so training, --resume and evaluation see the same pairs."""
    keys = sorted({k for s in splits.values() for k in s["image"]})
    if len(keys) < 2:
        raise ValueError("--shuffle-visual needs at least two images")
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {keys[a]: keys[b] for a, b in zip(order, order[1:] + order[:1])}
    return {name: {**s, "image": [partner[k] for k in s["image"]]} for name, s in splits.items()}


# ---- tasks: data, loss, evaluation, text-only baseline ----------------------------------------------------


class Task:
    """One task of a run: its prepared splits, batches, loss, evaluation and a text-only baseline.
    A subclass sets name, archs (the text backbones it runs on), tiny (the demo's text backbone), headline
    (the metric names of log lines and tables) and dataset_class, and implements prepare, make_model,
    loss, predict, summary and text_only_baseline."""

    name, archs, tiny, headline, dataset_class = "", (), "", (), None
    vision = "vit"      # the image encoder's arch
    prompt = ""         # put before every question (the CLIP-BART tasks' prompts)
    batch_share = 1.0   # the task's batch size, as a share of cfg.batch_size
    vocab = None        # what the trained head depends on (the VQA answers): a checkpoint must match it

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return data_dir

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return cfg.images or data_dir

    @property
    def batch_size(self):
        return max(1, int(self.cfg.batch_size * self.batch_share))

    @property
    def n_train(self):
        """The training examples an epoch visits (captions: every reference is one), at most cfg.train_limit."""
        n = len(self.dataset("train"))
        return min(n, self.cfg.train_limit) if self.cfg.train_limit else n

    def __init__(self, cfg, data_dir, tokenizer, features, text_config):
        self.cfg, self.tokenizer, self.features, self.text_config = cfg, tokenizer, features, text_config
        self.splits = self.prepare(data_dir)
        if cfg.shuffle_visual:
            self.splits = derange_images(self.splits, cfg.seed)
        for split, s in self.splits.items():  # train, val and (Karpathy) test: found now, not after training
            if not s["image"]:
                raise ValueError(f"{self.name}: the {split} split of {data_dir} is empty")

    def image_keys(self):
        """Every image of every split (an NLVR2 example has a pair)."""
        return {k for s in self.splits.values() for ks in s["image"] for k in (ks if isinstance(ks, tuple) else (ks,))}

    def dataset(self, split):
        return self.dataset_class(self.splits[split], self.features.pixels)

    def loader(self, dataset, batches, collate=None):
        """Batches of `dataset`; images decoded in cfg.workers processes when the features are not cached."""
        workers = self.cfg.workers if self.features.pixels is not None else 0
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                           collate_fn=collate or self.collate)

    @torch.no_grad()
    def evaluate(self, model, split):
        """(metrics in eval.py's names, results in the official format) on a split."""
        model.eval()
        try:
            return self.predict(model, split)
        finally:
            model.train()

    def eval_batches(self, split):
        """The batches of a split in order (evaluation), with a progress bar."""
        ds = self.dataset(split)
        return data.progress(self.loader(ds, eval_batches(len(ds), self.cfg.batch_size)), f"evaluate {split}", "batch")

    def write_results(self, results, folder, split):
        path = os.path.join(folder, f"results_{self.name}_{split}.json")
        metrics.write_json(results, path)
        return path


def eval_batches(n, batch_size):
    """Indices 0..n-1 in order, cut into batches of batch_size (the last may be shorter)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class VQA(Task):
    """VQAv2 as answer classification (setting 1): the text model reads [visual prefix; <s> question </s>], an
    MLP on the final hidden state at the prefix position scores K answers; BCE with logits against the
    official soft scores (summed over answers); prediction = argmax; the official VQA accuracy."""

    name, archs, tiny, headline, dataset_class = "vqa", ("roberta",), "roberta", ("vqa_accuracy",), data.VQADataset

    def prepare(self, data_dir):
        karpathy = os.path.join(data_dir, data.KARPATHY)
        split = self.cfg.vqa_split
        if split == "auto":
            split = "karpathy" if os.path.isfile(karpathy) else "official"
            print(f"vqa: {split} split ({'by ' + karpathy if split == 'karpathy' else 'train2014 / val2014'})")
        prepared = data.prepare_vqa(data_dir, self.tokenizer, karpathy if split == "karpathy" else None, self.cfg.answers,
                                    self.cfg.max_len, os.path.join(self.cfg.cache, "prepared"), self.prompt)
        self.vocab = prepared["answers"]
        self.collate = functools.partial(data.collate_vqa, pad_id=self.tokenizer.pad_id, num_answers=len(self.vocab))
        return prepared["splits"]

    def make_model(self, text, d_visual):
        """The frozen text model with PEFT layers and the answer head; (model, its other trainable modules)."""
        add_peft(self.cfg, text)
        model = VQAModel(text, d_visual, len(self.vocab), self.cfg.prefix)
        return model, ["head"] + vit_trainable(self.cfg, model)

    def loss(self, model, batch):
        """(sum over the batch of the BCE summed over answers, number of examples)."""
        ids, mask = batch["input_ids"].to(self.features.device), batch["attention_mask"].to(self.features.device)
        logits = model(ids, mask, *self.features(batch))  # (B, K)
        targets = batch["targets"].to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum"), len(ids)

    def predict(self, model, split):
        """Argmax answers. A question's accuracy is its soft target for that answer, which data.py computed
        with eval.vqa_accuracy: the official per-question accuracy exactly."""
        results, acc = [], []
        for batch in self.eval_batches(split):
            device = self.features.device
            with autocast(device):
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), *self.features(batch))
            pred = logits.argmax(-1).cpu()  # (B,)
            acc += batch["targets"].gather(1, pred[:, None])[:, 0].tolist()
            results += [{"question_id": q, "answer": self.vocab[p]} for q, p in zip(batch["question_id"].tolist(), pred.tolist())]
        return metrics.vqa_aggregate(acc, self.splits[split]["answer_type"]), results

    def summary(self, m):
        return {"vqa_accuracy": m["overall"]}

    def examples(self, results, split, n=8):
        """n examples for a gallery (shapes.gallery), one question per image; truth: the most common answer after
        the official normalisation ("three" and "3" alike)."""
        s, shown, out = self.splits[split], set(), []
        for m, r in enumerate(results):  # in split order
            if s["image"][m] not in shown and len(out) < n:
                shown.add(s["image"][m])
                truth = Counter(map(metrics.normalize_answer, s["answers"][m])).most_common(1)[0][0]
                out.append({"images": [self.features.path(s["image"][m])], "text": s["question"][m],
                            "prediction": r["answer"], "truth": truth})
        return out

    def text_only_baseline(self, split):
        """The best training answer (summed soft score) per question type: a model that never sees the image."""
        totals = defaultdict(Counter)  # question type -> answer id -> summed soft score
        for qtype, scores in zip(self.splits["train"]["question_type"], soft_targets(self.splits["train"])):
            totals[qtype].update(scores)
        prior = {q: most_frequent(c) for q, c in totals.items()}
        s = self.splits[split]
        acc = [scores.get(prior.get(qtype), 0.0) for qtype, scores in zip(s["question_type"], soft_targets(s))]
        return metrics.vqa_aggregate(acc, s["answer_type"])


def most_frequent(counts):
    """The key with the highest count of a Counter, ties broken by the smaller key (the text-only baselines)."""
    return min(counts, key=lambda k: (-counts[k], k))


def soft_targets(split):
    """Per question of a prepared VQA split, {answer id: soft score}, read from its ragged columns."""
    ids, scores, off = split["target_ids"].tolist(), split["target_scores"].tolist(), split["target_offsets"].tolist()
    return [dict(zip(ids[a:b], scores[a:b])) for a, b in zip(off, off[1:])]


class Captioning(Task):
    """COCO captioning, Karpathy split (setting 2): GPT-2 reads [visual prefix; caption; EOS] and is trained with
    cross-entropy on every caption token and the EOS (a token mean); beam search; CIDEr-D, BLEU, ROUGE-L."""

    name, archs, tiny, headline, dataset_class = "caption", ("gpt2",), "gpt2", ("CIDEr", "Bleu_4"), data.CaptionDataset

    def prepare(self, data_dir):
        prepared = data.prepare_captions(os.path.join(data_dir, data.KARPATHY), self.tokenizer, self.cfg.max_len,
                                         os.path.join(self.cfg.cache, "prepared"))
        self.collate = functools.partial(data.collate_caption, eos_id=self.tokenizer.eos_id)
        self.references = {}  # split -> PTB-tokenised references, made once (see refs)
        return prepared["splits"]

    def make_model(self, text, d_visual):
        add_peft(self.cfg, text)
        model = CaptionModel(text, d_visual, self.cfg.prefix, self.tokenizer.bos_id)
        return model, vit_trainable(self.cfg, model)

    def loss(self, model, batch):
        """(summed cross-entropy over the supervised tokens, their number)."""
        device = self.features.device
        logits = model(batch["input_ids"].to(device), *self.features(batch))  # (B, N, V)
        labels = batch["labels"].to(device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        return loss, int((labels != -100).sum())

    def predict(self, model, split):
        """Beam search (cfg.beams) on every image of the split, scored against its references."""
        s = self.splits[split]
        keys, ids = s["image"], s["image_id"].tolist()
        batches = eval_batches(len(keys), self.cfg.batch_size)
        if self.features.pixels is None:
            loader = ({"image": [keys[j] for j in b]} for b in batches)
        else:  # images decoded by DataLoader workers, the ViT run per batch
            loader = self.loader(data.ImageDataset(keys, self.features.pixels), batches, collate=torch.utils.data.default_collate)
        captions = {}
        for b, batch in zip(batches, data.progress(loader, f"evaluate {split}", "batch", total=len(batches))):
            with autocast(self.features.device):
                captions.update(zip([ids[j] for j in b], self.generate(model, batch)))
        return metrics.caption_scores(self.refs(split), captions), [{"image_id": k, "caption": c} for k, c in captions.items()]

    def generate(self, model, batch):
        out = model.generate(*self.features(batch), self.cfg.beams, self.cfg.max_new_tokens, self.tokenizer.eos_id)
        return [self.tokenizer.decode(t, skip_special=True).strip() for t in out]

    def refs(self, split):
        if split not in self.references:
            s = self.splits[split]
            self.references[split] = {i: [metrics.ptb_tokenize(r) for r in refs]
                                      for i, refs in zip(s["image_id"].tolist(), s["refs"])}
        return self.references[split]

    def summary(self, m):
        return {"CIDEr": m["CIDEr"], "Bleu_4": m["Bleu_4"]}

    def examples(self, results, split, n=8):
        """The first n images of the split with the generated caption and their references (shapes.gallery)."""
        s = self.splits[split]
        return [{"images": [self.features.path(k)], "text": "caption", "prediction": r["caption"], "truth": refs}
                for k, refs, r in zip(s["image"][:n], s["refs"], results)]

    def text_only_baseline(self, split):
        """The most frequent training caption, for every image."""
        caption = most_frequent(Counter(r for refs in self.splits["train"]["refs"] for r in refs))
        gts = self.refs(split)
        return metrics.caption_scores(gts, {i: caption for i in gts})


# ---- task models: frozen backbone + PEFT layers + head ----------------------------------------------------
#
# Where we deliberately differ from the authors' release (Routing_VLPEFT), one line each:
# - GPT-2's fused c_attn is split into q, k, v and routing runs per projection (models/vit_gpt.py routed
#   the q|v bottleneck as one 2r-wide matrix in matmul, matmul_expand and ones, mixing q and v).
# - Two adapters per GPT-2 block, after attn.o and after mlp.fc2 (models/vit_gpt.py shared one adapter
#   between the attention and the MLP of a block).
# - Adapters keep their residual h + W_up(...) (models/vit_roberta.py, add_res=False, replaced h by it).
# - The adapter sits right after its linear layer, before the block's dropout (as Houlsby).
# - The visual prefix is embedded once (models/vit_roberta.py ran the text embeddings twice).
# - The VQA head reads the final hidden state at the prefix position (the release put RoBERTa's
#   never-pretrained, frozen pooler in front of it).
# - Captions: every caption token and one EOS are supervised, never padding (train_vit_gpt.py).
# - Base biases are frozen (the release trained the q / v biases next to LoRA).
# - The VQA loss is BCE summed over the K answers, mean over the batch: K = 3,129 times the release's
#   mean over answers and batch (train_vit_roberta.py), so our learning rates are not comparable as is.


def vit_trainable(cfg, model):
    """Besides the PEFT weights (and a head): the visual projection if any, the blocks' LayerNorms if cfg.train_ln."""
    return (["visual"] if model.visual.proj is not None else []) + (["ln1", "ln2"] if cfg.train_ln else [])


def add_peft(cfg, text):
    """The PEFT layers of cfg.peft, with cfg.route, into the frozen text model."""
    if cfg.peft == "lora":
        rp.add_lora(text, ["attn.q", "attn.v"], cfg.rank, cfg.alpha, cfg.route, cfg.dropout)
    else:  # Houlsby places, with the backbone's own activation
        rp.add_adapters(text, ["attn.o", "mlp.fc2"], cfg.rank, cfg.route, nn.GELU(approximate=text.config.gelu))


class VisualProjection(nn.Module):
    """A trainable Linear from the image encoder's width to the text model's, only when they differ (off in
    the paper: ViT-L/16, RoBERTa-large and GPT2-medium are all 1024 wide)."""

    def __init__(self, d_visual, d):
        super().__init__()
        self.proj = nn.Linear(d_visual, d) if d_visual != d else None

    def forward(self, visual, x_R):
        if self.proj is None:
            return visual, x_R
        return self.proj(visual), self.proj(x_R)  # (B, L, d) each


class VQAModel(nn.Module):
    """Frozen RoBERTa with PEFT layers; an MLP head on the final hidden state at the prefix position
    (without prefix: at <s>) scores K answers."""

    def __init__(self, text, d_visual, num_answers, prefix):
        super().__init__()
        d = text.config.d_model
        self.text, self.prefix, self.visual = text, prefix, VisualProjection(d_visual, d)
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, num_answers))

    def forward(self, input_ids, attention_mask, visual, x_R):
        """input_ids, attention_mask (B, N), visual (B, L, d_visual), x_R (B, L', d_visual) -> logits (B, K)."""
        visual, x_R = self.visual(visual, x_R)
        with rp.visual_context(self.text, x_R):
            h = self.text(input_ids, attention_mask, prefix=visual if self.prefix else None)  # (B, L + N, d)
        return self.head(h[:, 0])


class CaptionModel(nn.Module):
    """Frozen GPT-2 with PEFT layers. Input [visual; caption; EOS] (without prefix: [<bos>; caption; EOS]);
    the last prefix position predicts the first caption token."""

    def __init__(self, text, d_visual, prefix, bos_id):
        super().__init__()
        self.text, self.prefix, self.bos_id = text, prefix, bos_id
        self.visual = VisualProjection(d_visual, text.config.d_model)

    def start(self, visual, x_R):
        """(the prefix embeddings (B, P, d), projected x_R (B, L', d))."""
        visual, x_R = self.visual(visual, x_R)
        if self.prefix:
            return visual, x_R
        bos = torch.full((visual.shape[0], 1), self.bos_id, dtype=torch.long, device=visual.device)
        return self.text.wte(bos), x_R  # (B, 1, d)

    def forward(self, input_ids, visual, x_R):
        """input_ids (B, N) -> logits (B, N, V): position i predicts input_ids[:, i]."""
        prefix, x_R = self.start(visual, x_R)
        with rp.visual_context(self.text, x_R):
            logits = self.text(input_ids, prefix=prefix)  # (B, P + N, V)
        return logits[:, prefix.shape[1] - 1:-1]

    @torch.no_grad()
    def generate(self, visual, x_R, beams, max_new_tokens, eos_id):
        """Token ids of a caption per example: models.beam_search over GPT-2 with its KV cache."""
        B, k = visual.shape[0], beams
        # every beam is a row: (B, L, d) -> (B * k, L, d); routed layers need x_R per row too
        prefix, x_R = self.start(visual.repeat_interleave(k, dim=0), x_R.repeat_interleave(k, dim=0))
        cache = self.text.new_cache()

        def step(tokens, index):
            if tokens is None:
                return self.text(prefix=prefix, cache=cache)[:, -1]  # (B * k, V)
            cache.reorder(index)
            return self.text(tokens[:, None], cache=cache)[:, -1]

        with rp.visual_context(self.text, x_R):
            return models.beam_search(step, B, k, max_new_tokens, eos_id)


# ---- the CLIP-BART setting: VQAv2, GQA, NLVR2 and COCO captions, generative, on one BART ----------------
#
# VL-Adapter's recipe, which VL-PET uses too (CLIPBART_NOTES.md in the README's references): CLIP RN101 grid
# features (36 tokens an image) through a trainable visual embedding, appended after the text tokens of the
# BART encoder; task prompts; every task generative. The routing paper did not release this setting, so
# where routing sits is OUR design: x_R = the mean of the embedded visual tokens (or all of them, --visual
# patches, for matmul), the same vector for every routed layer of encoder and decoder.


class VisualEmbedding(nn.Module):
    """VL-Adapter's visual embedding (VL-T5 src/modeling_bart.py VisualEmbedding, CLIP features): per token
    LN(W_f feat) + LN(W_p box) + the image-order embedding (image 0 or 1 of an NLVR2 pair) + the object-order
    embedding (the frozen BART token table at row V - 1 - k for the k-th token of an image). CLIP grids have
    no boxes: VL-Adapter feeds zeros, so the box term is a learned constant, kept for faithful counts."""

    def __init__(self, d_visual, d):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(d_visual, d), nn.LayerNorm(d))
        self.box = nn.Sequential(nn.Linear(5, d), nn.LayerNorm(d))
        self.image_order = nn.Embedding(2, d)

    def forward(self, visual, n_images, token_table):
        """visual (B, n_images * L, d_visual), token_table (V, d) -> (B, n_images * L, d)."""
        B, T, _ = visual.shape
        k = torch.arange(T // n_images, device=visual.device).repeat(n_images)  # (T,): token k of its image
        image = torch.arange(n_images, device=visual.device).repeat_interleave(T // n_images)  # (T,)
        x = self.feat(visual) + self.box(visual.new_zeros(B, T, 5)) + self.image_order(image)
        return x + token_table[token_table.shape[0] - 1 - k].to(x.dtype)


class VLBart(nn.Module):
    """Frozen BART with PEFT layers reading [<s> prompt + text </s>; visual tokens]. BART's token table gains
    VL-Adapter's 200 added tokens (<extra_id_k>, <vis_extra_id_k>: new rows N(0, 0.02), frozen; the last 36
    are the object-order embeddings), as its checkpoints and parameter counts have them."""

    ADDED_TOKENS = 200

    def __init__(self, bart, d_visual, prefix, all_tokens):
        super().__init__()
        V, d = bart.wte.weight.shape
        with torch.no_grad():
            table = torch.cat([bart.wte.weight, torch.empty(self.ADDED_TOKENS, d).normal_(0.0, 0.02)])
            bart.wte = nn.Embedding.from_pretrained(table, freeze=True)  # (V + 200, d), still tied to the LM head
            bart.final_logits_bias = torch.cat([bart.final_logits_bias, bart.final_logits_bias.new_zeros(1, self.ADDED_TOKENS)], 1)
        self.bart, self.prefix, self.all_tokens = bart, prefix, all_tokens
        self.visual = VisualEmbedding(d_visual, d)

    def encode(self, input_ids, attention_mask, visual, n_images):
        """-> (encoder states (B, N + L, d), their mask, x_R (B, 1, d) or (B, L, d))."""
        v = self.visual(visual, n_images, self.bart.wte.weight)  # (B, L, d)
        x_R = v if self.all_tokens else v.mean(1, keepdim=True)
        with rp.visual_context(self.bart, x_R):
            memory, mask = self.bart.encode(input_ids, attention_mask, v if self.prefix else None)
        return memory, mask, x_R

    def forward(self, input_ids, attention_mask, visual, decoder_input_ids, n_images=1):
        """Teacher forcing: logits (B, T, V) of decoder_input_ids."""
        memory, mask, x_R = self.encode(input_ids, attention_mask, visual, n_images)
        with rp.visual_context(self.bart, x_R):
            return self.bart.decode(decoder_input_ids, memory, mask)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, visual, beams, max_new_tokens, eos_id, n_images=1):
        """Token ids per example: models.beam_search over BART's decoder (beams 1: greedy)."""
        memory, mask, x_R = self.encode(input_ids, attention_mask, visual, n_images)
        def per_beam(t):
            return None if t is None else t.repeat_interleave(beams, dim=0)  # (B, ...) -> (B * k, ...)
        with rp.visual_context(self.bart, per_beam(x_R)):
            return models.beam_search(self.bart.beam_step(per_beam(memory), per_beam(mask)), len(memory), beams,
                                      max_new_tokens, eos_id)


def add_peft_vl(cfg, bart):
    """The PEFT layers of cfg.peft into BART, placed as their releases place them; returns the names of the
    other parameters their releases train (VL-PET src/trainer_base.py unfreeze_parameters): LoRA (q, v of every
    attention, encoder and decoder, self and cross) trains every bias; VL-Adapter (after every attention and
    FFN, gelu_new) every LayerNorm; VL-PET (a gated module after every encoder attention and FFN, a parallel
    adapter on the decoder's cross-attention values) the encoder's LayerNorms. Gate rank = rank (both 96)."""
    n_enc, n_dec = len(bart.encoder.blocks), len(bart.decoder.blocks)
    enc_ln = ["encoder.ln_emb"] + [f"encoder.blocks.{i}.{n}" for i in range(n_enc) for n in ("ln1", "ln2")]
    if cfg.peft == "lora":
        rp.add_lora(bart, ["attn.q", "attn.v", "cross.q", "cross.v"], cfg.rank, cfg.alpha, cfg.route, cfg.dropout)
        return ["bias"]
    if cfg.peft == "adapter":
        rp.add_adapters(bart, ["attn.o", "cross.o", "mlp.fc2"], cfg.rank, cfg.route, nn.GELU(approximate="tanh"))
        return enc_ln + ["decoder.ln_emb"] + [f"decoder.blocks.{i}.{n}" for i in range(n_dec) for n in ("ln1", "ln_cross", "ln2")]
    gate = {"vlpet-large": "large", "vlpet-middlex": "middleX", "vlpet-middley": "middleY", "vlpet-small": "small"}[cfg.peft]
    rp.add_vlpet(bart.encoder, ["attn", "mlp"], gate, cfg.rank, cfg.route, gate_r=cfg.rank if gate == "large" else None)
    rp.add_parallel_adapters(bart.decoder, ["cross.v"], cfg.rank, cfg.route)
    return enc_ln


class Generative(Task):
    """What the four CLIP-BART tasks share: BART reads <s> prompt + text </s> and the visual tokens and generates
    the answer, from the decoder start </s>; the loss is each example's token-mean cross-entropy (times the
    target's weight), averaged over the batch (VL-PET src/{vqa,gqa,nlvr}_model.py)."""

    archs, tiny, vision, prompt, n_images, answer_tokens = ("bart",), "bart", "clip_resnet", "", 1, 10

    @property
    def start_id(self):
        return self.text_config.decoder_start_id  # BART: </s>

    def make_model(self, bart, d_visual):
        extra = add_peft_vl(self.cfg, bart)
        extra = [p for p in extra if p == "bias" or self.cfg.train_ln]
        return VLBart(bart, d_visual, self.cfg.prefix, self.cfg.visual == "patches"), ["visual"] + extra

    def inputs(self, batch):
        device = self.features.device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), self.features(batch)[0]

    def targets(self, batch):
        """(decoder inputs (B, T), labels (B, T), weights (B,) or None) of a training batch."""
        return batch["decoder_input_ids"], batch["labels"], None

    def loss(self, model, batch):
        decoder_input_ids, labels, weight = self.targets(batch)
        logits = model(*self.inputs(batch), decoder_input_ids.to(self.features.device), self.n_images)  # (B, T, V)
        labels = labels.to(logits.device)
        ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # (B, T), 0 where -100
        per_example = ce.sum(1) / (labels != -100).sum(1)
        if weight is not None:
            per_example = per_example * weight.to(per_example.device)
        return per_example.sum(), len(per_example)

    def answers(self, model, split):
        """The decoded answer of every example of the split, in order: greedy, at most answer_tokens."""
        out = []
        for batch in self.eval_batches(split):
            with autocast(self.features.device):
                ids = model.generate(*self.inputs(batch), 1, self.answer_tokens, self.tokenizer.eos_id, self.n_images)
            out += [self.decode(t) for t in ids]
        return out

    def decode(self, ids):
        """Generated ids -> text, without special tokens and the 200 added ones."""
        return self.tokenizer.decode([i for i in ids if i < len(self.tokenizer)], skip_special=True).strip()


class GenerativeVQA(Generative, VQA):
    """VQAv2 (Karpathy split), generative: the target is one answer drawn in proportion to its soft score, the
    loss weighted by that score; greedy decoding scored with the official VQA accuracy."""

    prompt = "vqa: "

    def prepare(self, data_dir):
        splits = VQA.prepare(self, data_dir)
        self.vocab_tokens = [torch.tensor(self.tokenizer.wrap(self.tokenizer.encode(a))) for a in self.vocab]
        return splits

    def targets(self, batch):
        """One answer per question, drawn from its soft scores (the step's seed: exact on resume), and its score."""
        scores = batch["targets"]  # (B, K)
        empty = scores.sum(1) == 0  # no answer in the vocabulary: weight 0
        pick = torch.multinomial(scores.masked_fill(empty[:, None], 1.0), 1)[:, 0]  # (B,)
        weight = scores.gather(1, pick[:, None])[:, 0]
        return (*data.seq2seq_targets([self.vocab_tokens[i] for i in pick.tolist()], self.start_id, self.tokenizer.pad_id), weight)

    def predict(self, model, split):
        s = self.splits[split]
        preds = self.answers(model, split)
        acc = [metrics.vqa_accuracy(p, answers) for p, answers in zip(preds, s["answers"])]
        results = [{"question_id": q, "answer": p} for q, p in zip(s["question_id"].tolist(), preds)]
        return metrics.vqa_aggregate(acc, s["answer_type"]), results


class GQA(Generative):
    """GQA (balanced; train = train + val, evaluation on testdev, as VL-PET): exact-match accuracy."""

    name, headline, dataset_class, prompt = "gqa", ("gqa_accuracy",), data.PromptDataset, "gpa: "  # VL-PET's typo
    batch_share = 100 / 60  # VL-PET's per-task batch sizes (src/multitask.py): VQA 500, GQA 833, NLVR2 166, captions 416

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return cfg.gqa or os.path.join(data_dir, "gqa")

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return os.path.join(cls.data_folder(cfg, data_dir), "images")

    def prepare(self, gqa_dir):
        p = data.prepare_gqa(gqa_dir, self.tokenizer, self.prompt, self.cfg.max_len, os.path.join(self.cfg.cache, "prepared"))
        # the official testdev file, read once: eval.gqa_scores reads its types, programs and isBalanced
        self.questions = metrics.read_gqa_questions(os.path.join(gqa_dir, "questions1.2", data.GQA_QUESTIONS.format("testdev")))
        self.collate = functools.partial(data.collate_prompted, pad_id=self.tokenizer.pad_id, start_id=self.start_id)
        return {"train": p["train"], "val": p["testdev"], "test": p["testdev"]}

    def predict(self, model, split):
        preds = dict(zip(self.splits[split]["question_id"], self.answers(model, split)))
        return metrics.gqa_scores(preds, self.questions), \
            [{"questionId": q, "prediction": p} for q, p in preds.items()]

    def summary(self, m):
        return {"gqa_accuracy": m["accuracy"]}

    def text_only_baseline(self, split):
        """The most frequent training answer per question type, read from the text as VQAv2's types are: its
        first three words (GQA's own detailed types are no blind prior: "existRelSC" means the answer is no)."""
        def qtype(q):
            return " ".join(q.lower().split()[:3])
        prior = defaultdict(Counter)
        for q, answer in zip(self.splits["train"]["question"], self.splits["train"]["answer"]):
            prior[qtype(q)][answer] += 1
        overall = Counter(self.splits["train"]["answer"])
        s = self.splits[split]
        preds = {i: most_frequent(prior.get(qtype(q)) or overall) for i, q in zip(s["question_id"], s["question"])}
        return metrics.gqa_scores(preds, self.questions)

    def examples(self, results, split, n=8):
        s = self.splits[split]
        return [{"images": [self.features.path(k)], "text": q, "prediction": r["prediction"], "truth": a}
                for k, q, a, r in zip(s["image"][:n], s["question"], s["answer"], results)]


class NLVR2(Generative):
    """NLVR2: two images, a statement; the target text is "true" or "false"; the prediction compares the two
    words' logits at the first decoded position after [</s>, <s>] (VL-PET src/nlvr_model.py). Accuracy and
    consistency as lil-lab/nlvr's metrics.py."""

    name, headline, dataset_class, prompt, n_images = "nlvr2", ("nlvr2_accuracy",), data.PromptDataset, "nlvr: ", 2
    batch_share = 20 / 60

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return cfg.nlvr2 or os.path.join(data_dir, "nlvr2")

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return cls.data_folder(cfg, data_dir)

    def prepare(self, nlvr2_dir):
        p = data.prepare_nlvr2(nlvr2_dir, self.tokenizer, self.prompt, os.path.join(self.cfg.cache, "prepared"))
        self.collate = functools.partial(data.collate_prompted, pad_id=self.tokenizer.pad_id, start_id=self.start_id)
        self.words = [self.tokenizer.encode(w)[0] for w in ("false", "true")]
        return {"train": p["train"], "val": p["dev"], "test": p["test1"]}

    def predict(self, model, split):
        preds = []
        start = torch.tensor([[self.start_id, self.tokenizer.bos_id]])  # (1, 2): </s> <s>
        for batch in self.eval_batches(split):
            ids, mask, visual = self.inputs(batch)
            with autocast(self.features.device):
                logits = model(ids, mask, visual, start.expand(len(ids), 2).to(ids.device), self.n_images)[:, 1]  # (B, V)
            preds += (logits[:, self.words[1]] > logits[:, self.words[0]]).tolist()
        s = self.splits[split]
        return self.scores(s, preds), [{"identifier": i, "prediction": str(p)} for i, p in zip(s["identifier"], preds)]

    def scores(self, s, preds):
        return metrics.nlvr2_scores({i: str(p) for i, p in zip(s["identifier"], preds)},
                                    {i: str(bool(y)) for i, y in zip(s["identifier"], s["label"].tolist())})

    def summary(self, m):
        return {"nlvr2_accuracy": 100 * m["accuracy"]}

    def write_results(self, results, folder, split):
        """The official predictions file: CSV lines "identifier,prediction"."""
        path = os.path.join(folder, f"results_{self.name}_{split}.csv")
        lines = "".join(f"{r['identifier']},{r['prediction']}\n" for r in results)
        metrics.atomic_write(path, lambda f: f.write(lines))
        return path

    def text_only_baseline(self, split):
        """The most frequent training label of the same sentence, else of all sentences."""
        train = self.splits["train"]
        prior = defaultdict(Counter)
        for sentence, y in zip(train["sentence"], train["label"].tolist()):
            prior[sentence][y] += 1
        overall = Counter(train["label"].tolist()).most_common(1)[0][0]
        s = self.splits[split]
        return self.scores(s, [prior[x].most_common(1)[0][0] if x in prior else overall for x in s["sentence"]])

    def examples(self, results, split, n=8):
        s = self.splits[split]
        return [{"images": [self.features.path(k) for k in keys], "text": x, "prediction": r["prediction"],
                 "truth": str(bool(y))} for keys, x, y, r in zip(s["image"][:n], s["sentence"], s["label"].tolist(), results)]


class GenerativeCaptioning(Generative, Captioning):
    """COCO captions (Karpathy): the input is the prompt alone, the target one caption (every reference is an
    example); the loss is the token mean over the batch; beam search (cfg.beams, cfg.max_new_tokens)."""

    prompt, batch_share = "caption: ", 50 / 60

    def prepare(self, data_dir):
        prepared = data.prepare_captions(os.path.join(data_dir, data.KARPATHY), self.tokenizer,
                                         self.cfg.max_new_tokens - 1, os.path.join(self.cfg.cache, "prepared"))
        self.references = {}
        self.prompt_ids = torch.tensor(self.tokenizer.wrap(self.tokenizer.encode(self.prompt)))
        return prepared["splits"]

    def collate(self, items):
        B = len(items)
        decoder_input_ids, labels = data.seq2seq_targets([self.tokenizer.wrap(i["input_ids"].tolist()) for i in items],
                                                         self.start_id, self.tokenizer.pad_id)
        out = {"input_ids": self.prompt_ids.expand(B, -1), "attention_mask": torch.ones(B, len(self.prompt_ids), dtype=torch.long),
               "decoder_input_ids": decoder_input_ids, "labels": labels, "image": [i["image"] for i in items]}
        if "pixel_values" in items[0]:
            out["pixel_values"] = torch.stack([i["pixel_values"] for i in items])
        return out

    def loss(self, model, batch):
        """(summed cross-entropy over every target token of the batch, their number): a token mean."""
        logits = model(*self.inputs(batch), batch["decoder_input_ids"].to(self.features.device))
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum"), int((labels != -100).sum())

    def generate(self, model, batch):
        B, device = len(batch["image"]), self.features.device
        ids, mask = self.prompt_ids.expand(B, -1).to(device), torch.ones(B, len(self.prompt_ids), dtype=torch.long, device=device)
        out = model.generate(ids, mask, self.features(batch)[0], self.cfg.beams, self.cfg.max_new_tokens, self.tokenizer.eos_id)
        return [self.decode(t) for t in out]


TASKS = {"vqa": (VQA,), "caption": (Captioning,),  # --task: the tasks trained together, on one model
         "multitask": (GenerativeVQA, GQA, NLVR2, GenerativeCaptioning)}


def backbone(name, arch):
    """A converted checkpoint's path, or "tiny": the demo's `arch` backbone (pretrained on first use)."""
    if name == "tiny":
        return shapes.tiny_backbone(arch)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"checkpoint not found: {name} (convert one with: python models.py convert "
                                f"--src HF_DIR --out {name}, or use 'tiny')")
    return name


def build(cfg):
    """Backbones, tasks and the task model of a run (or of its evaluation). The new weights are drawn after
    the backbones exist, from cfg.seed alone: the same whether or not the demo's backbones were made first."""
    check_config(cfg)
    device = pick_device(cfg.device)
    setting = TASKS[cfg.task]
    data_dir = shapes.ensure_world() if cfg.data == "shapes" else cfg.data
    for name, folder in (("data", data_dir), ("images", cfg.images), ("gqa", cfg.gqa), ("nlvr2", cfg.nlvr2)):
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"--{name} {folder}: no such folder")
    vision_path = backbone(cfg.vision, setting[0].vision)
    encoder = models.load_checkpoint(vision_path, arch=setting[0].vision).to(device)
    text_path = backbone(cfg.text, setting[0].tiny)
    text = models.load_checkpoint(text_path)
    if text.config.arch not in setting[0].archs:
        raise ValueError(f"{text_path} is a {text.config.arch} checkpoint, expected {' or '.join(setting[0].archs)} "
                         f"for --task {cfg.task}")
    tokenizer = data.BPETokenizer.from_checkpoint(text_path)
    features, tasks = {}, []  # one feature store per images folder, shared by the tasks that read it
    for c in setting:
        folder = c.images_folder(cfg, data_dir)
        tasks.append(c(cfg, c.data_folder(cfg, data_dir), tokenizer,
                       features.setdefault(folder, Features(cfg, encoder, vision_path, folder, device)), text.config))
    for f in features.values():
        f.prepare(sorted(set().union(*(t.image_keys() for t in tasks if t.features is f))))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, extra = tasks[0].make_model(text, encoder.config.d_model)
    return tasks, rp.mark_trainable(model, extra).to(device), device


# ---- the loop ---------------------------------------------------------------------------------------------


def get_lr(step, total, cfg):
    """Linear warm-up over int(warmup) steps (a fraction of `total` if < 1) to cfg.lr, reached at the last
    warm-up step and never exceeded, then linear decay to 0 at `total` steps."""
    warmup = int(cfg.warmup * total if cfg.warmup < 1 else cfg.warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


def epoch_plan(tasks, cfg, epoch):
    """The optimizer steps of one epoch: [(task index, [micro-batches of example indices])]. Each task's
    training examples in a permutation fixed by (seed, epoch), cut into full batches (a shorter last batch is
    dropped), grad_accum batches a step; several tasks' steps interleave in an order fixed by (seed, epoch):
    every batch of every task once an epoch, one task a step (VL-PET's round-robin sampling)."""
    steps = []
    for t, task in enumerate(tasks):
        n = task.n_train
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)).tolist()
        size = min(task.batch_size, n)
        batches = [order[i:i + size] for i in range(0, n - size + 1, size)]
        k = cfg.grad_accum
        steps += [(t, batches[i:i + k]) for i in range(0, len(batches) - k + 1, k)]
    if len(tasks) > 1:
        random.Random(cfg.seed * 100003 + epoch).shuffle(steps)
    return steps


def plan_batches(tasks, plan, rank, world):
    """(task, [collated micro-batches]) for each step of the plan; this process's share of every batch,
    each task's batches loaded in plan order by its own DataLoader."""
    loaders = {}
    for t, task in enumerate(tasks):
        mine = [b[rank::world] for u, micro in plan if u == t for b in micro]
        loaders[t] = iter(task.loader(task.dataset("train"), mine)) if mine else None
    for t, micro in plan:
        yield tasks[t], [next(loaders[t]) for _ in micro]


def train_step(model, task, batches, cfg, step, rank, world):
    """Forward and backward over one step's micro-batches. The gradient is the mean over every example (or
    token) of the step, however the step is split over processes and micro-batches: each task.loss returns
    a sum and its count, and the summed gradients are divided by the global count. Returns the step's loss."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        torch.manual_seed(step_seed(cfg, rank, step, i))  # dropout: see step_seed
        last = i + 1 == len(batches)
        with model.no_sync() if world > 1 and not last else contextlib.nullcontext():  # DDP syncs once a step
            with autocast(task.features.device):
                loss, n = task.loss(model, batch)
            loss.backward()
        total, count = total + loss.item(), count + n
    if world > 1:
        both = torch.tensor([total, count], dtype=torch.float64, device=task.features.device)
        torch.distributed.all_reduce(both)  # DDP averaged the gradients over processes: undo, then divide
        total, count = both.tolist()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(world / count)
    return total / count


def optimizer(model, cfg):
    """AdamW on the trainable parameters; biases are not decayed (VL-PET's and Hugging Face's no_decay rule:
    "LayerNorm.weight" is in it too but matches none of BART's LayerNorm names there, so LN weights are decayed)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps)


def step_seed(cfg, rank, step, micro):
    """The seed of the random draws (dropout) of one micro-batch: a function of (seed, process, optimizer
    step, micro-batch), so a resumed run draws exactly what an uninterrupted one would, whatever ran in
    between (evaluation, DataLoader seeds), and a checkpoint needs no RNG state."""
    return ((cfg.seed * 1_000_003 + rank) * 1_000_003 + step) * 4096 + micro


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pick_device(name):
    """auto: CUDA, else MPS, else CPU. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    if name == "mps" and not mps:
        raise RuntimeError("--device mps: MPS is not available")
    if name == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def start_distributed(cfg):
    """torchrun: one process per GPU (or CPU process, gloo); rank 0 evaluates and writes. (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


@contextlib.contextmanager
def rank_zero_first(rank, world):
    """Rank 0 runs the block first (it writes the world, prepared data and feature caches), then the others."""
    if world > 1 and rank > 0:
        torch.distributed.barrier()
    yield
    if world > 1 and rank == 0:
        torch.distributed.barrier()


def main(cfg, resume=False, overwrite=False):
    """Train (resume: continue the run in cfg.out; overwrite: replace the run there), evaluate on val after every
    epoch, and at the end on test next to the text-only baseline. Returns the last record (evaluate_and_save)."""
    cfg = dataclasses.replace(cfg, out=cfg.out or os.path.join("runs", cfg.task))
    check_config(cfg)
    rank, world = start_distributed(cfg)
    try:
        with run_folder(cfg, rank, resume, overwrite):
            return train(cfg, rank, world, resume)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def train(cfg, rank, world, resume):
    """The loop: build, restore, then steps, an evaluation and a checkpoint after every epoch, the final report."""
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the number of processes ({world})")
    with rank_zero_first(rank, world):
        tasks, model, device = build(cfg)
    opt = optimizer(model, cfg)
    saved = resume and os.path.isfile(os.path.join(cfg.out, "last.pt"))  # a run killed before it saved starts over
    step, records, partial = restore(load_run(cfg.out), model, opt, tasks, cfg.out) if saved else (0, [], {})
    if rank == 0 and saved:
        write_records(cfg.out, records)  # a kill between last.pt and metrics.jsonl left the log one record short
    if records and records[-1].get("final"):
        print(f"{cfg.out}: finished already; its final record is in {os.path.join(cfg.out, 'metrics.jsonl')}")
        return records[-1]
    model.train()  # dropout on, in the frozen backbone too (load_checkpoint returns it in eval mode)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = len(epoch_plan(tasks, cfg, 0))
    total = steps_per_epoch * cfg.epochs
    last = min(total, cfg.max_steps or total)
    if rank == 0:
        start_run_folder(cfg, model, tasks, total, device)
    while step < last:
        epoch, offset = divmod(step, steps_per_epoch)
        losses = defaultdict(list, {k: list(v) for k, v in partial.items()} if offset else {})  # steps before a stop
        plan, t0 = epoch_plan(tasks, cfg, epoch)[offset:], time.time()
        bar = data.progress(plan_batches(tasks, plan, rank, world), f"epoch {epoch + 1}/{cfg.epochs}", "step", len(plan),
                            disable=rank != 0)
        for task, batches in bar:
            for g in opt.param_groups:
                g["lr"] = get_lr(step, total, cfg)
            losses[task.name].append(train_step(ddp, task, batches, cfg, step, rank, world))
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == last or step % steps_per_epoch == 0:
                break
        if rank == 0:
            record = {"epoch": step / steps_per_epoch, "step": step, "split": "val", "train_loss":
                      mean([x for v in losses.values() for x in v]), "task_train_loss": {k: mean(v) for k, v in losses.items()}}
            evaluate_and_save(cfg, tasks, model, opt, step, records, record, {} if step % steps_per_epoch == 0 else losses)
            print(f"epoch {record['epoch']:.2f} step {step}: loss {record['train_loss']:.4f}, val "
                  f"{headline(record, tasks)} ({time.time() - t0:.0f}s)")
        if world > 1:
            torch.distributed.barrier()
    if rank == 0 and step >= total:
        final_report(cfg, tasks, model, opt, step, records)
    return records[-1] if records else {}


RUN_FILES = ("config.json", "last.pt", "metrics.jsonl", "results_*", "metrics_*.json", "gallery_*.png")  # what a run writes


@contextlib.contextmanager
def run_folder(cfg, rank, resume, overwrite):
    """The run folder, made ready before any expensive step (by rank 0): created and writable; locked (an
    exclusive lock on OUT/.lock, which the OS releases when the process ends, kill -9 included), so that two
    processes never train into one folder; holding no other run unless resume or overwrite says so (overwrite
    deletes that run's files); cleared of the temporary files of writes a kill cut short. Ctrl-C ends the run
    with one line: what last.pt holds and how to continue."""
    if rank > 0:
        yield
        return
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, ".lock"), "a") as lock:
        try:
            lock_file(lock)
        except OSError:
            raise RuntimeError(f"{cfg.out} is in use by another train.py process") from None
        held = os.path.isfile(os.path.join(cfg.out, "config.json"))
        if held and not (resume or overwrite):
            raise ValueError(f"{cfg.out} holds a run already: continue it with --resume {cfg.out}, replace it with "
                             f"--overwrite, or choose another --out")
        for pattern in (RUN_FILES if overwrite else ()) + (".tmp-*",):
            for path in glob.glob(os.path.join(glob.escape(cfg.out), pattern)):
                os.remove(path)
        try:
            yield
        except KeyboardInterrupt:
            record = final_record(cfg.out, final=False)
            saved = f"last.pt holds step {record['step']}" if record else "nothing was saved yet"
            raise KeyboardInterrupt(f"interrupted: {saved}; continue with: python train.py --resume {cfg.out}") from None


def lock_file(f):
    """An exclusive, non-blocking lock on an open file (OSError if another process holds it)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def mean(values):
    return float(np.mean(values))


# ---- records and checkpoints --------------------------------------------------------------------------


def start_run_folder(cfg, model, tasks, total, device):
    os.makedirs(cfg.out, exist_ok=True)
    metrics.write_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
    trained, all_params = rp.count_parameters(model)
    examples = ", ".join(f"{t.n_train:,} {t.name}" for t in tasks)
    print(f"{cfg.task}: {cfg.peft} r={cfg.rank} route={cfg.route} visual={cfg.visual} prefix={cfg.prefix}; trainable "
          f"{trained:,} of {all_params:,} parameters; training examples: {examples}; {total} steps on {device}; "
          f"run folder {cfg.out}")


def headline(record, tasks):
    """The headline metrics of a record, as in papers: VQA / GQA / NLVR2 accuracy in %, CIDEr and BLEU x100."""
    return ", ".join(f"{n} {record[n] * (100 if n in ('CIDEr', 'Bleu_4') else 1):.2f}" for t in tasks for n in t.headline)


def evaluate_and_save(cfg, tasks, model, opt, step, records, record, losses=None):
    """Evaluate every task on record["split"]; the record (its metrics, headline values flat), the results
    files (and, for the final record, a gallery of test examples per task), then last.pt with every record so
    far, then metrics.jsonl rewritten from those records: the log always belongs to the checkpoint, and a kill
    at any point loses no record that last.pt holds."""
    for task in tasks:
        m, results = task.evaluate(model, record["split"])
        task.write_results(results, cfg.out, record["split"])
        if record.get("final"):
            shapes.gallery(task.examples(results, record["split"]), os.path.join(cfg.out, f"gallery_{task.name}.png"),
                           f"{task.name}: {record['split']} examples, {cfg.peft} route {cfg.route}")
        record.update(task.summary(m))
        record[task.name] = m
    records.append(record)
    save_checkpoint(cfg, model, opt, step, tasks, records, losses or {})


def final_report(cfg, tasks, model, opt, step, records):
    """Every task on the test split (val where there is none) next to its text-only baseline, as a table."""
    split = "test" if all("test" in t.splits for t in tasks) else "val"
    base = {}
    for task in tasks:
        base.update(task.summary(task.text_only_baseline(split)))
    record = {"epoch": cfg.epochs, "step": step, "split": split, "final": True,
              "trainable_params": rp.count_parameters(model)[0], "text_only": base}
    evaluate_and_save(cfg, tasks, model, opt, step, records, record)
    names = [n for t in tasks for n in t.headline]
    demo = " (the demo's tiny backbones, pretrained on the synthetic world)" if "tiny" in (cfg.vision, cfg.text) else ""
    print(f"\n{split} split{demo}; accuracy in %, CIDEr and BLEU x100:")
    print("| model | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for label, values in (("text-only baseline", base), (f"{cfg.peft} r={cfg.rank}, route {cfg.route}", record)):
        print(f"| {label} | " + " | ".join(f"{values[n] * (100 if n in ('CIDEr', 'Bleu_4') else 1):.2f}" for n in names) + " |")
    print(f"results, galleries and last.pt in {cfg.out}")


def trainable_state(model):
    """What training changed: every trainable parameter (PEFT weights, LayerNorms, head, projection)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(cfg, model, opt, step, tasks, records, losses):
    """Atomically OUT/last.pt: what training changed, the optimizer, the step (the schedule and the dropout
    seeds are functions of step and config: see get_lr, step_seed), the config, what the heads depend on
    (the answer vocabulary) and the records; then OUT/metrics.jsonl from those records. Tensors and plain
    Python values only, so load_run reads it with weights_only=True."""
    ckpt = {"config": dataclasses.asdict(cfg), "trainable": trainable_state(model), "optimizer": opt.state_dict(),
            "step": step, "vocab": {t.name: t.vocab for t in tasks}, "records": records, "losses": dict(losses)}
    models.atomic_save(ckpt, os.path.join(cfg.out, "last.pt"))
    write_records(cfg.out, records)


def write_records(out, records):
    """OUT/metrics.jsonl, a record a line: always rewritten whole from the records last.pt holds."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    metrics.atomic_write(os.path.join(out, "metrics.jsonl"), lambda f: f.write(lines))


def run_file(path):
    """OUT/last.pt for a run folder, else the path itself."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def load_run(path):
    """The dict save_checkpoint wrote (path: the file or its run folder); a clear error for anything else."""
    file = run_file(path)
    ckpt = models.read_torch_file(file, "train.py checkpoint")
    if not isinstance(ckpt, dict) or not {"config", "trainable", "optimizer", "step", "vocab", "records", "losses"} <= set(ckpt):
        raise ValueError(f"{file} is not a train.py checkpoint (models.py checkpoints are backbones)")
    return ckpt


def run_config(path, **overrides):
    """The Config of a saved run: from RUN/config.json for a run folder (written first, so also for a run killed
    before its first checkpoint), else from the checkpoint file; out = the run's folder, plus the overrides."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no run at {path}")
    if os.path.isdir(path):
        options = metrics.load_json(os.path.join(path, "config.json"), f"run config of {path} (no run there?)")
    else:
        options = load_run(path)["config"]
    unknown = sorted(set(options) - set(Config.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: the run has options this train.py does not know: {unknown}")
    return Config(**{**options, **overrides, "out": os.path.dirname(os.path.abspath(run_file(path)))})


def restore(ckpt, model, opt, tasks, source):
    """Put a checkpoint into a freshly built run (resume and evaluation alike): the tasks' vocabularies and
    the trainable tensors must match it exactly. Returns (step, records, the step losses of an unfinished epoch)."""
    for task in tasks:
        if ckpt["vocab"].get(task.name) != task.vocab:
            raise ValueError(f"{source}: the {task.name} answer vocabulary of the data differs from the one it was "
                             f"trained with")
    ours = trainable_state(model)
    diff = sorted(set(ours) ^ set(ckpt["trainable"]))
    bad = diff or [n for n, t in ckpt["trainable"].items() if t.shape != ours[n].shape]
    if bad:
        raise ValueError(f"{source}: checkpoint does not fit the model ({len(bad)} tensors differ, e.g. {bad[:3]})")
    model.load_state_dict(ckpt["trainable"], strict=False)
    if opt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["records"], ckpt["losses"]


def evaluate_run(path, split="test", device="auto"):
    """python train.py --evaluate RUN: rebuild a run from its last.pt, predict `split` and score it. Writes
    RUN/results_{task}_{split}.json and RUN/metrics_{split}.json; returns ({task: metrics}, that path)."""
    cfg = run_config(path, device=device)
    tasks, model, _ = build(cfg)
    restore(load_run(path), model, None, tasks, run_file(path))
    out = {}
    for task in tasks:
        if split not in task.splits:
            raise ValueError(f"split {split!r} not in the {task.name} data (it has {sorted(task.splits)})")
        out[task.name], results = task.evaluate(model, split)
        task.write_results(results, cfg.out, split)
    path = os.path.join(cfg.out, f"metrics_{split}.json")
    metrics.write_json(out, path)
    return out, path


# ---- the study: every route x PEFT method x seeds, with controls (python train.py --study) -----------------
#
# Per task, every PEFT method with its routes x seeds (from --seed on), on the tiny backbones: VQA and captions
# (the default; a real text checkpoint serves one task: --task), or the CLIP-BART multitask setting (--task
# multitask). The controls run for VQA with LoRA only (the 2-core budget): without the visual prefix (routing is
# then the image's only path) and with every image's features replaced by another image's (a route that still
# helps is not using the image). The options of STUDY apply unless given; the multitask runs train on 4,000
# examples a task (--train-limit) to fit 36 runs in 30 minutes on 2 CPU cores.
ROUTES5 = ("none", "add", "mul", "matmul", "matmul_expand")
STUDY = {  # task: {peft: routes}, seeds, options
    "vqa": ({"lora": ROUTES5, "adapter": ROUTES5}, 3, {"epochs": 3}),  # 60 runs x ~16 s
    "caption": ({"lora": ROUTES5, "adapter": ROUTES5}, 3, {"epochs": 1}),  # 30 runs x ~14 s
    "multitask": ({"lora": ROUTES5, "adapter": ROUTES5, "vlpet-large": ROUTES5, "vlpet-middlex": ("none",),
                   "vlpet-middley": ("none",), "vlpet-small": ("none",)}, 2, {"epochs": 2, "train_limit": 4000}),
}
STUDY_OUT = "runs/study"
STUDY_CONTROLS = {"noprefix": {"prefix": False}, "shuffled": {"shuffle_visual": True}}  # name: options
STUDY_CONTROLLED = ("vqa", "lora")  # the (task, peft) the controls run for
STUDY_METRICS = {"vqa": ("vqa_accuracy",), "caption": ("CIDEr", "Bleu_4"),  # the first is the gain's
                 "multitask": ("mean", "vqa_accuracy", "gqa_accuracy", "nlvr2_accuracy", "CIDEr")}
STUDY_FREE = ("out", "device", "workers", "cache", "max_steps")  # may differ from a finished run's config


def study_grid(base, given=(), routes=None, seeds=None):
    """{(task, peft, control, route, seed): Config} of every run, each in its own folder under base.out
    (e.g. vqa-lora-mul-noprefix-s0). routes / seeds: fewer than STUDY's (tests). LoRA-only options take their
    defaults in the other methods' runs."""
    grid = {}
    tasks = ("multitask",) if base.task == "multitask" else ("vqa", "caption") if base.text == "tiny" else (base.task,)
    for task in tasks:
        pefts, n_seeds, options = STUDY[task]
        options = {k: v for k, v in options.items() if k not in given}
        for peft, peft_routes in pefts.items():
            lora_only = {} if peft == "lora" else {n: Config.__dataclass_fields__[n].default for n in LORA_ONLY}
            controls = {"full": {}, **(STUDY_CONTROLS if (task, peft) == STUDY_CONTROLLED else {})}
            for (control, extra), route, seed in itertools.product(
                    controls.items(), [r for r in peft_routes if routes is None or r in routes],
                    range(base.seed, base.seed + (seeds or n_seeds))):
                name = f"{task}-{peft}-{route}{'' if control == 'full' else '-' + control}-s{seed}"
                grid[task, peft, control, route, seed] = dataclasses.replace(
                    base, **options, **lora_only, **extra, task=task, peft=peft, route=route, seed=seed,
                    out=os.path.join(base.out, name))
    return grid


def study_value(record, name):
    """A record's metric for the study; "mean": VL-PET's average of VQA, GQA and NLVR2 accuracy and CIDEr x100."""
    if name == "mean":
        return (record["vqa_accuracy"] + record["gqa_accuracy"] + record["nlvr2_accuracy"] + 100 * record["CIDEr"]) / 4
    return record[name]


def final_record(out, final=True):
    """The last record of OUT/metrics.jsonl (final: only if it is the final evaluation), or None."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    record = json.loads(lines[-1]) if lines else None
    return record if record and (record.get("final") or not final) else None


def check_same_run(cfg):
    """A folder the study would reuse must hold a run with the same options."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.isfile(path):
        return
    theirs, ours = metrics.load_json(path, "run config"), dataclasses.asdict(cfg)
    diff = [k for k in ours if k not in STUDY_FREE and theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"{cfg.out} holds a run with other options ({diff[0]}: {theirs.get(diff[0])!r}, the study "
                         f"wants {ours[diff[0]]!r}); remove it or choose another --out")


def run_study(base, given=(), routes=None, seeds=None):
    """Train every run of the grid that has not finished (an interrupted run resumes from its last.pt), then
    read each run's final record from its metrics.jsonl and write the table (study_table) to OUT/study.md.
    Returns (rows, the table's Markdown)."""
    if base.max_steps:
        raise ValueError("--study compares whole runs: it takes no --max-steps")
    base = dataclasses.replace(base, out=base.out or STUDY_OUT + ("-multitask" if base.task == "multitask" else ""))
    grid = study_grid(base, given, routes, seeds)
    t0 = time.time()
    for k, cfg in enumerate(grid.values(), 1):
        check_same_run(cfg)
        name = os.path.basename(cfg.out)
        if final_record(cfg.out) is not None:
            print(f"[{k}/{len(grid)}] {name}: finished, skipped")
            continue
        print(f"[{k}/{len(grid)}] {name} ({time.time() - t0:.0f}s so far)")
        resume = os.path.isfile(os.path.join(cfg.out, "last.pt"))
        main(run_config(cfg.out, **{o: getattr(cfg, o) for o in RESUME_OVERRIDES}) if resume else cfg, resume)
    rows = study_rows({key: final_record(cfg.out) for key, cfg in grid.items()})
    table = study_table(rows, grid)
    path = os.path.join(base.out, "study.md")
    metrics.atomic_write(path, lambda f: f.write(table))
    n_seeds = len({key[-1] for key in grid})
    seeds_text = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    shapes.study_chart(rows, os.path.join(base.out, "study.png"), {r["task"]: STUDY_METRICS[r["task"]][0] for r in rows},
                       X100, f"Study: mean ± std over {seeds_text} per route, {'the demo' if base.text == 'tiny' else base.text}")
    print("\n" + table + "\n" + study_summary(rows) + f"\nstudy: {len(grid)} runs in {base.out}, "
          f"{time.time() - t0:.0f}s; table in {path}, chart in {os.path.join(base.out, 'study.png')}")
    return rows, table


def study_rows(records):
    """records {(task, peft, control, route, seed): final record} -> one row per (task, peft, control, route):
    {task, peft, control, route, params (sorted set), split, metric: (mean, std) for each headline metric,
    gain (relative to route none of the same task, peft and control, on the first metric; None for none)},
    plus one text-only row per task (peft and control None)."""
    groups = defaultdict(list)
    for (task, peft, control, route, seed), r in records.items():
        groups[task, peft, control, route].append(r)
    rows = []
    for (task, peft, control, route), rs in groups.items():
        row = {"task": task, "peft": peft, "control": control, "route": route, "split": rs[0]["split"],
               "params": sorted({r["trainable_params"] for r in rs})}
        rows.append({**row, **{m: mean_std([study_value(r, m) for r in rs]) for m in STUDY_METRICS[task]}})
    for row in rows:
        head = STUDY_METRICS[row["task"]][0]
        none = next((r for r in rows if (r["task"], r["peft"], r["control"], r["route"]) ==
                     (row["task"], row["peft"], row["control"], "none")), None)
        row["gain"] = (None if none is None or row is none or none[head][0] == 0
                       else (row[head][0] - none[head][0]) / none[head][0])
    for task in dict.fromkeys(k[0] for k in records):
        r = next(r for k, r in records.items() if k[0] == task)
        rows.append({"task": task, "peft": None, "control": None, "route": None, "params": [0], "split": r["split"],
                     "gain": None, **{m: (study_value(r["text_only"], m), 0.0) for m in STUDY_METRICS[task]}})
    return rows


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def study_table(rows, grid):
    """Markdown: one table per task, mean ± std over seeds; CIDEr and BLEU x100 as in papers."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        names = STUDY_METRICS[task]
        runs = [c for k, c in grid.items() if k[0] == task]
        epochs, seeds = runs[0].epochs, len({c.seed for c in runs})
        limit = f", the first {runs[0].train_limit:,} training examples of each task" if runs[0].train_limit else ""
        split = next(r["split"] for r in rows if r["task"] == task)
        out += [f"### {task}: {' / '.join(n + (' x100' if n in X100 else ' (%)') for n in names)}, mean ± std over "
                f"{seeds} seed(s), {epochs} epoch(s){limit}, {split} split", "",
                "| peft | control | route | " + " | ".join(names) + " | trainable params | gain vs none |",
                "|---|---|---|" + "---:|" * (len(names) + 2)]
        for r in (r for r in rows if r["task"] == task):
            label = ("text-only baseline", "", "") if r["peft"] is None else (r["peft"], r["control"], r["route"])
            values = " | ".join(f"{X100.get(n, 1) * r[n][0]:.2f}" + (f" ± {X100.get(n, 1) * r[n][1]:.2f}" if r["peft"]
                                                                      else "") for n in names)
            params = "/".join(f"{p:,}" for p in r["params"])
            gain = "" if r["gain"] is None else f"{100 * r['gain']:+.1f} %"
            out.append(f"| {' | '.join(label)} | {values} | {params} | {gain} |")
        out.append("")
    out.append("Controls: full = the image's features as visual prefix and routing input; noprefix = no visual prefix "
               "(routing is the image's only path); shuffled = every image's features replaced by another image's "
               "(a fixed derangement), in training and evaluation (a route that still helps is not using the image). "
               f"The controls run for {' + '.join(STUDY_CONTROLLED)} only. Gain: relative change of the first metric "
               "over route none of the same peft and control.")
    return "\n".join(out) + "\n"


def study_summary(rows):
    """A few plain lines: per (task, peft, control), route none, the best route and its gain; the text-only score."""
    lines = []
    for r in rows:
        head = STUDY_METRICS[r["task"]][0]
        scale = X100.get(head, 1)
        if r["peft"] is None:
            lines.append(f"{r['task']}: text-only baseline {head} {scale * r[head][0]:.2f}")
        elif r["route"] == "none":
            group = [g for g in rows if (g["task"], g["peft"], g["control"]) == (r["task"], r["peft"], r["control"])]
            best = max(group, key=lambda g: g[head][0])
            lines.append(f"{r['task']} {r['peft']} {r['control']}: {head} none {scale * r[head][0]:.2f}, best "
                         f"{best['route']} {scale * best[head][0]:.2f}"
                         + (f" ({100 * best['gain']:+.1f} %)" if best["gain"] is not None else ""))
    return "\n".join(lines)


X100 = {"CIDEr": 100, "Bleu_4": 100}  # shown x100, as papers report them


# ---- the command line ---------------------------------------------------------------------------------


def error_line(e):
    """The one line the command line prints for an error. A DataLoader worker's error arrives wrapped
    with its traceback; its last line is the original error."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def cli(argv=None):
    """python train.py: bad input ends in one line "error: ..." (exit status 1; 2 for bad options), Ctrl-C in one
    line saying how to continue (exit status 130); no traceback."""
    try:
        cfg, meta = parse_command_line(argv)
        if meta.get("evaluate"):
            out, path = evaluate_run(meta["evaluate"], meta.get("split", "test"), cfg.device)
            print(json.dumps(out, indent=1) + f"\nwrote {path}")
            return out
        if meta.get("resume"):
            return main(run_config(meta["resume"], **{o: getattr(cfg, o) for o in RESUME_OVERRIDES}), resume=True)
        if meta.get("study"):
            return run_study(cfg, meta["given"])
        return main(cfg, overwrite=meta.get("overwrite", False))
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {error_line(e)}")
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
