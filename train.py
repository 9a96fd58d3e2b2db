"""Train, evaluate and study: the options, the loop, the run folder and its checkpoints, the study, the CLI.

    python train.py                             # demo: synthetic VQA, tiny pretrained ViT + RoBERTa, CPU
    python train.py --task caption              # demo: synthetic captioning with a tiny GPT-2
    python train.py --task multitask            # demo: CLIP-BART on VQA, GQA, NLVR2 and captions at once
    python train.py --preset vqa-lora           # a paper setting (README: all three; data and checkpoints as laid out there)
    python train.py --resume runs/vqa           # continue a run exactly where it stopped
    python train.py --evaluate runs/vqa --split test   # regenerate a run's predictions and score them
    python train.py --study                     # every PEFT method x route x seeds: runs/study/study.md, .png
    torchrun --nproc_per_node 2 train.py ...    # DDP: each process takes its share of every batch
    python train.py --help                      # every option with its default

Top to bottom: the options (Config, presets, checks); build (backbones, tasks.TASKS[--task], the task model);
the loop (main, train, train_step); records and checkpoints; the study; the command line. What a task reads,
computes and is scored by lives in tasks.py. Run folder OUT: config.json, metrics.jsonl (one record per
evaluation, always those of last.pt), results_{task}_{split} (official formats), gallery_{task}.png, last.pt
(what training changed, the optimizer, the step and the records).
"""
import argparse
import contextlib
import dataclasses
import datetime
import glob
import itertools
import json
import os
import random
import re
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

import data
import eval as metrics
import models
import routing_peft as rp
import shapes
from tasks import TASKS, X100, add_metrics, headline, write_results


@dataclass
class Config:
    task: str = "vqa"             # vqa (an answer classifier on RoBERTa) | caption (a GPT-2 decoder) | multitask (CLIP-BART: VQA, GQA, NLVR2, captions)
    vision: str = "tiny"          # converted image encoder, ViT (vqa, caption) or CLIP ResNet (multitask), or "tiny" (the demo's)
    text: str = "tiny"            # converted text checkpoint (RoBERTa for vqa, GPT-2 for caption, BART or T5 for multitask), or "tiny" (multitask: also "tiny-t5")
    data: str = "shapes"          # folder with the VQAv2 files and/or dataset_coco.json; "shapes": the demo's world
    images: str = ""              # folder with train2014/ and val2014/ ("" = the data folder)
    gqa: str = ""                 # multitask: GQA folder with questions1.2/ and images/ ("" = DATA/gqa)
    nlvr2: str = ""               # multitask: NLVR2 folder with data/ and the image folders ("" = DATA/nlvr2)
    vqa_split: str = "auto"       # karpathy: train/val/test by dataset_coco.json | official: train2014 / val2014 | auto: karpathy if that file is there
    peft: str = "lora"            # lora (q, v of every attention) | adapter (after every attention and FFN) | xattn (LoRA with cross-attention to x_R, as lora) | bitfit (every bias) | full (every text weight) | vlpet-large | vlpet-middlex | vlpet-middley | vlpet-small (multitask)
    route: str = "mul"            # routing function, one of routing_peft.ROUTES (xattn, bitfit, full: none, their default)
    rank: int = 16                # bottleneck width r
    rank_dec: int = 0             # multitask VL-PET: r of the decoder's value adapters (0 = rank; VL-PET's T5 scripts: 96)
    alpha: float = 16.0           # LoRA scale alpha / r (lora, xattn)
    dropout: float = 0.0          # LoRA dropout on x and x_R (lora, xattn)
    visual: str = "pooler"        # x_R: pooler | cls | mean | patches (ViT); mean | patches of the embedded CLIP tokens (multitask); patches only with route matmul or xattn
    prefix: bool = True           # the visual tokens as the first input embeddings of the text model
    shuffle_visual: bool = False  # control: every image's features replaced by another image's (a fixed derangement)
    train_ln: bool = True         # also train the LayerNorms inside the text model's blocks
    epochs: int = 6               # passes over the training split
    batch_size: int = 64          # examples per batch (under torchrun: all processes together)
    eval_batch_size: int = 0      # examples per evaluation batch (0 = each task's training batch size, as VL-PET's release)
    grad_accum: int = 1           # batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-3              # peak AdamW learning rate
    warmup: float = 0.05          # linear warm-up: a fraction of all steps if < 1, else steps; then linear decay
    weight_decay: float = 0.0     # AdamW weight decay
    adam_eps: float = 1e-8        # AdamW epsilon
    clip: float = 0.0             # gradient-norm clipping (0 = none)
    max_len: int = 20             # text tokens: <s> question </s> (vqa, and multitask's VQA and GQA) or caption + EOS (caption)
    answers: int = 3129           # K, size of the answer vocabulary (vqa)
    beams: int = 5                # beam width for captioning (1 = greedy)
    max_new_tokens: int = 20      # caption length limit in new tokens (multitask: training captions hold one fewer)
    max_steps: int = 0            # stop after this many optimizer steps (0 = all epochs); schedule unchanged
    train_limit: int = 0          # train on the first N examples of each task only (0 = all; VL-T5's --train_topk)
    val_limit: int = 0            # score every epoch on the first N examples of each task's val split (0 = all; the final test: always all)
    seed: int = 0                 # seeds the new weights, the data order and dropout
    device: str = "auto"          # auto | cpu | cuda | mps
    workers: int = 2              # image-loading processes (only when features are not cached)
    out: str = ""                 # run folder ("" = runs/TASK; a tiny-ARCH demo: runs/TASK-ARCH)
    feature_cache: bool = True    # cache frozen image features on disk (off: recompute every step, as released)
    cache: str = "cache"          # folder of the feature and prepared-data caches, shared by runs
    precision: str = "fp32"       # fp32 | bf16 (autocast of every forward pass; the releases trained in fp32)


# The released hyper-parameters of the two paper settings (README). Checkpoint and data paths follow the README's
# layout (every dataset under data/real, as in the demo's world); --vision/--text/--data/--images change them.
PAPER = dict(vision="ckpt/vit-l16.pt", data="data/real", epochs=20)
VQA_PAPER = dict(PAPER, task="vqa", text="ckpt/roberta-large.pt", lr=3e-4, batch_size=512, warmup=0.05)
# captions: trained up to 50 tokens, generated with 5 beams and HF 4.29.2's default max_length 20, which counts the start id
# generate() puts before inputs_embeds: 19 new tokens (Routing_VLPEFT @ e91d826 configs/coco_task.yaml:11, test_vit_gpt.py:153)
PRESETS = {"vqa-lora": dict(VQA_PAPER, peft="lora", rank=128, alpha=128), "vqa-adapter": dict(VQA_PAPER, peft="adapter", rank=64),
           "caption-lora": dict(PAPER, task="caption", text="ckpt/gpt2-medium.pt", peft="lora", rank=128, alpha=128, lr=3e-5,
                                batch_size=40, warmup=5000, max_len=50, max_new_tokens=19)}
# The CLIP-BART setting as VL-PET released it (scripts/image-text/*.sh, CLIPBART_NOTES 1.7; the converted bart-base
# keeps its dropout 0.1; the other tasks' batches in proportion to VQA's). LoRA r 128 / alpha 32 / dropout 0.1, the
# adapters and VL-PET r 96 (gate rank and the decoder's value adapter too), BitFit (bitfit.sh) and full fine-tuning
# at lr 1e-4 (full_finetuning.sh, which also drops the task prompts: we keep them). Route none: the release's method.
CLIP_BART = dict(task="multitask", vision="ckpt/clip-rn101.pt", text="ckpt/bart-base.pt", data="data/real", visual="mean",
                 batch_size=500, epochs=20, lr=1e-3, adam_eps=1e-6, weight_decay=0.01, warmup=0.1, clip=5.0, beams=5,
                 max_new_tokens=39, route="none")
VLPET = ("vlpet-large", "vlpet-middlex", "vlpet-middley", "vlpet-small")
PRESETS.update({"multitask-lora": dict(CLIP_BART, peft="lora", rank=128, alpha=32, dropout=0.1),
                "multitask-bitfit": dict(CLIP_BART, peft="bitfit"), "multitask-full": dict(CLIP_BART, peft="full", lr=1e-4),
                **{f"multitask-{p}": dict(CLIP_BART, peft=p, rank=96) for p in ("adapter",) + VLPET}})
# The same on T5-base (T5_NOTES 4.1, 4.5): VL-PET's T5 scripts (scripts/image-text/T5-VL-PET-*.sh): batch 300, lr 3e-4,
# r 192 (large: gate rank 192), the decoder's value adapters r 96 (the gate scale 0.3 and zero inits are tasks.py's T5
# recipe); LoRA and VL-Adapter as Ladder-Side-Tuning's VL-T5/scripts/image (VL-PET's Table 2 copies those rows): lora.sh
# r 150, alpha 32, dropout 0.1, adapter.sh r 192 (reduction factor 4), both lr 3e-4.
CLIP_T5 = dict(CLIP_BART, text="ckpt/t5-base.pt", batch_size=300, lr=3e-4, rank=192)
PRESETS.update({"multitask-t5-lora": dict(CLIP_T5, peft="lora", rank=150, alpha=32, dropout=0.1),
                "multitask-t5-adapter": dict(CLIP_T5, peft="adapter"),
                **{f"multitask-t5-{p}": dict(CLIP_T5, peft=p, rank_dec=96) for p in VLPET}})
MODULES = ("lora", "adapter", "xattn") + VLPET  # the methods that add modules (bitfit, full: none)
CHOICES = {"task": ("vqa", "caption", "multitask"), "vqa_split": ("auto", "karpathy", "official"), "peft": MODULES + ("bitfit", "full"),
           "route": tuple(rp.ROUTES), "visual": ("pooler", "cls", "mean", "patches"),
           "device": ("auto", "cpu", "cuda", "mps"), "precision": ("fp32", "bf16")}
# The demo's defaults of a setting other than the first (the Config defaults are the VQA demo's), below a preset and
# explicit options. CLIP-BART: VL-PET-large, route mul, x_R the mean embedded token, VL-PET's optimiser settings,
# at most 39 new caption tokens (the release's max_length 40 counts the decoder start).
TASK_DEFAULTS = {"multitask": dict(visual="mean", peft="vlpet-large", adam_eps=1e-6, weight_decay=0.01, warmup=0.1,
                                   clip=5.0, max_new_tokens=39, epochs=2, batch_size=64, lr=1e-2)}
PEFT_ONLY = {"alpha": ("lora", "xattn"), "dropout": ("lora", "xattn"), "rank": MODULES, "train_ln": MODULES}  # who reads
UNROUTED = ("xattn", "bitfit", "full")  # no routing function: route none
RESUME_OVERRIDES = ("max_steps", "device", "workers", "val_limit", "eval_batch_size")  # what --resume may change (not the math)
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
    parser.add_argument("--study", action="store_true", default=None, help="train every PEFT method x route x seeds (VQA "
                        f"and captions with controls, or --task multitask) from these options; table and chart in OUT/study.md, "
                        f"study.png (default OUT: {STUDY_OUT}, {STUDY_OUT}-multitask, {STUDY_OUT}-multitask-t5 with --text tiny-t5)")
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
    task, peft = (args.get(k, options.get(k)) for k in ("task", "peft"))
    unrouted = {"route": "none"} if peft in UNROUTED else {}
    return Config(**{**TASK_DEFAULTS.get(task or Config.task, {}), **unrouted, **options, **args}), meta


def check_config(cfg):
    """One clear error for options that do not fit together or cannot reach the model."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {list(allowed)}")
    if cfg.peft in UNROUTED and cfg.route != "none":
        raise ValueError(f"--route {cfg.route}: --peft {cfg.peft} has no routing function (lora, adapter and VL-PET have); "
                         f"use --route none")
    if cfg.visual == "patches" and cfg.route not in ("none", "matmul", "matmul_relu"):
        raise ValueError(f"--visual patches gives many visual tokens; only route 'matmul' and --peft xattn handle them "
                         f"(route {cfg.route!r} needs one vector per image)")
    for names, ok, need in ((("rank", "epochs", "batch_size", "grad_accum", "max_len", "answers", "beams", "max_new_tokens"),
                             lambda v: v >= 1, "at least 1"), (("lr", "alpha"), lambda v: v > 0, "> 0"),
                            (("max_steps", "train_limit", "val_limit", "eval_batch_size", "warmup", "weight_decay", "workers",
                              "clip", "rank_dec"), lambda v: v >= 0, ">= 0"), (("dropout",), lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {need}, got {getattr(cfg, name)}")
    for name, users in PEFT_ONLY.items():
        value = getattr(cfg, name)
        if cfg.peft not in users and value != Config.__dataclass_fields__[name].default:
            flag = "--" + "no-" * (value is False) + name.replace("_", "-")
            raise ValueError(f"{flag} applies to --peft {' / '.join(users)} only; --peft {cfg.peft} would ignore it")
    if cfg.peft == "xattn" and cfg.rank % 16:
        raise ValueError(f"--peft xattn attends at width rank / 4 in 4 heads: --rank must be a multiple of 16, got {cfg.rank}")
    if cfg.peft.startswith("vlpet") and cfg.task != "multitask":
        raise ValueError(f"--peft {cfg.peft}: VL-PET is built for the CLIP-BART setting (--task multitask)")
    if cfg.rank_dec and not cfg.peft.startswith("vlpet"):
        raise ValueError(f"--rank-dec is the rank of VL-PET's decoder adapters; --peft {cfg.peft} has none")
    if cfg.task == "multitask" and cfg.visual not in ("mean", "patches"):
        raise ValueError(f"--visual {cfg.visual}: the CLIP-BART setting routes the mean embedded visual token (mean) "
                         f"or all of them (patches)")


def is_tiny(name):
    """Whether a --vision / --text value names one of the demo's tiny backbones: "tiny" or "tiny-ARCH"."""
    return name == "tiny" or name.startswith("tiny-")


def backbone(name, arch):
    """A converted checkpoint's path, or one of the demo's tiny backbones (pretrained on first use): "tiny" (the
    setting's `arch`) or "tiny-ARCH" (another, e.g. multitask's tiny-t5; build checks that the setting takes it)."""
    if is_tiny(name):
        return shapes.tiny_backbone(arch if name == "tiny" else name.removeprefix("tiny-"))
    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint not found: {name} (convert one with: python models.py convert "
                                f"--src HF_DIR --out {name}, or use 'tiny')")
    return name  # a folder is refused by models.load_checkpoint, which says how to convert it


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
    tokenizer = data.load_tokenizer(text_path)
    features, tasks = {}, []  # one feature store per images folder, shared by the tasks that read it
    for c in setting:
        folder = c.images_folder(cfg, data_dir)
        tasks.append(c(cfg, c.data_folder(cfg, data_dir), tokenizer,
                       features.setdefault(folder, data.Features(cfg, encoder, vision_path, folder, device)), text.config))
    for f in features.values():
        f.cache(sorted(set().union(*(t.image_keys() for t in tasks if t.features is f))))
        if f.pixels is None:
            f.encoder = None  # every feature is cached: the encoder is not needed again
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
            with task.features.autocast():
                loss, n = task.loss(model, batch, step)
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
    between (evaluation, DataLoader seeds), and a checkpoint needs no RNG state. Dropout masks differ with the
    processes; what a task's loss draws per example does not (Task: a function of seed, step and index)."""
    return ((cfg.seed * 1_000_003 + rank) * 1_000_003 + step) * 4096 + micro


def pick_device(name):
    """auto: CUDA, else MPS, else CPU. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(n for n, ok in available.items() if ok) if name == "auto" else name
    if not available[name]:
        raise RuntimeError(f"--device {name}: no {name.upper()} device available")
    if name == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)


def smallest_batch(cfg, world):
    """The smallest --batch-size that gives each of `world` processes at least one example of every task's batch."""
    return next(b for b in itertools.count(1) if all(c.batch_of(b) >= world for c in TASKS[cfg.task]))


def check_world(cfg, world):
    """Before any work: every process must hold an example of every batch of every task (its share of a batch is
    every world-th example). A process's batch sizes do not depend on the number of processes, so a run over several
    processes equals one process; a batch too small for them is refused, naming the smallest that works."""
    if cfg.train_limit and cfg.train_limit < world:
        raise ValueError(f"--train-limit {cfg.train_limit} gives fewer training examples than the {world} processes")
    small = next((c for c in TASKS[cfg.task] if c.batch_of(cfg.batch_size) < world), None)
    if small:
        n = small.batch_of(cfg.batch_size)
        raise ValueError(f"--batch-size {cfg.batch_size} gives {small.name} batches of {n} example{'s' * (n > 1)}, fewer "
                         f"than the {world} processes (each needs an example of every batch); the smallest --batch-size "
                         f"for {world} processes is {smallest_batch(cfg, world)}")


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
    epoch, and at the end on test next to the text-only baseline. Returns the last record."""
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
    check_config(cfg)
    rank, world = start_distributed(cfg)
    try:
        check_world(cfg, world)
        with run_folder(cfg, rank, resume, overwrite):
            return train(cfg, rank, world, resume)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def train(cfg, rank, world, resume):
    """The loop: build, restore, then steps, an evaluation and a checkpoint after every epoch, the final report."""
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
                      float(np.mean([x for v in losses.values() for x in v])),
                      "task_train_loss": {k: float(np.mean(v)) for k, v in losses.items()}}
            score(cfg, tasks, model, record)
            records.append(record)
            save_run(cfg, model, opt, step, tasks, records, {} if step % steps_per_epoch == 0 else losses)
            part = f" (up to {cfg.val_limit:,} a task)" if cfg.val_limit else ""
            print(f"epoch {record['epoch']:.2f} step {step}: loss {record['train_loss']:.4f}, val{part} "
                  f"{headline(record, tasks)} ({time.time() - t0:.0f}s)", *record["warnings"], sep="\n")
        if world > 1:
            torch.distributed.barrier()
    if rank == 0 and step >= total:
        final_report(cfg, tasks, model, opt, step, records)
    return records[-1] if records else {}


RUN_FILES = ("config.json", "last.pt", "metrics.jsonl", "results_*", "metrics_*.json", "gallery_*.png")  # what a run writes


@contextlib.contextmanager
def run_folder(cfg, rank, resume, overwrite):
    """The run folder, made ready by rank 0 before any expensive step: created; locked (OUT/.lock, released by the
    OS when the process ends, kill -9 included: two processes never train into one folder); holding no other run
    unless resume or overwrite (which deletes that run's files) says so; cleared of the temporary files of writes
    a kill cut short. Ctrl-C ends the run with one line: what last.pt holds and how to continue."""
    if rank > 0:
        yield
        return
    os.makedirs(cfg.out, exist_ok=True)
    with locked(cfg.out):
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


@contextlib.contextmanager
def locked(out):
    """The run folder OUT locked for the block (OUT/.lock, released by the OS when the process ends, kill -9
    included): training, resuming and evaluating a run exclude each other."""
    with open(os.path.join(out, ".lock"), "a") as lock:
        try:
            data.lock_file(lock)
        except OSError:
            raise RuntimeError(f"{out} is in use by another train.py process") from None
        yield


# ---- records and checkpoints --------------------------------------------------------------------------


def start_run_folder(cfg, model, tasks, total, device):
    os.makedirs(cfg.out, exist_ok=True)
    metrics.write_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
    trained, all_params = rp.count_parameters(model)
    examples = ", ".join(f"{t.n_train:,} {t.name}" for t in tasks)
    print(f"{cfg.task}: {cfg.peft} r={cfg.rank} route={cfg.route} visual={cfg.visual} prefix={cfg.prefix}; trainable {trained:,} "
          f"of {all_params:,} parameters; training examples: {examples}; {total} steps on {device}; run folder {cfg.out}")


def score(cfg, tasks, model, record):
    """Every task on record["split"] (an epoch's: its first --val-limit examples): metrics into the record, predictions
    into OUT/results_*. -> scored: {task: (metrics, results)}."""
    limit = 0 if record.get("final") else cfg.val_limit
    scored = {task: task.evaluate(model, record["split"], limit) for task in tasks}
    add_metrics(record, scored)
    write_results(cfg.out, scored, record["split"])
    return scored


def draw_galleries(cfg, scored, split):
    """OUT/gallery_{task}.png: a few examples of the split with prediction and truth (shapes.gallery)."""
    for task, (_, results) in scored.items():
        shapes.gallery(task.examples(results, split), os.path.join(cfg.out, f"gallery_{task.name}.png"),
                       f"{task.name}: {split} examples, {cfg.peft} route {cfg.route}")


def final_report(cfg, tasks, model, opt, step, records):
    """Every task on the test split (val where there is none) next to its text-only baseline, as a table."""
    split = "test" if all("test" in t.splits for t in tasks) else "val"
    base = {k: v for t in tasks for k, v in t.summary(t.text_only_baseline(split)).items()}
    record = {"epoch": cfg.epochs, "step": step, "split": split, "final": True,
              "trainable_params": rp.count_parameters(model)[0], "text_only": base}
    draw_galleries(cfg, score(cfg, tasks, model, record), split)
    records.append(record)
    save_run(cfg, model, opt, step, tasks, records, {})
    names = [n for t in tasks for n in t.headline]
    tiny = any(map(is_tiny, (cfg.vision, cfg.text)))
    demo = " (the demo's tiny backbones, pretrained on the synthetic world)" if tiny else ""
    others = ", ".join(f"{t}: {s}" for t, s in record["task_split"].items() if s != split)
    print(f"\n{split} split{f' ({others})' if others else ''}{demo}; accuracy in %, CIDEr and BLEU x100:")
    print("| model | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for label, values in (("text-only baseline", base), (f"{cfg.peft} r={cfg.rank}, route {cfg.route}", record)):
        print(f"| {label} | " + " | ".join(f"{values[n] * X100.get(n, 1):.2f}" for n in names) + " |")
    print(*record["warnings"], f"results, galleries and last.pt in {cfg.out}", sep="\n")


def trainable_state(model):
    """What training changed: every trainable parameter (PEFT weights, LayerNorms, head, projection)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_run(cfg, model, opt, step, tasks, records, losses):
    """The run on disk: atomically OUT/last.pt, then the log OUT/metrics.jsonl from its records (write_records).
    last.pt holds what training changed, the optimizer, the step (the schedule and the dropout seeds are functions
    of step and config: see get_lr, step_seed), the config, what the heads depend on (the answer vocabulary), the
    records and the losses of an unfinished epoch: tensors and plain values, read with weights_only=True."""
    ckpt = {"config": dataclasses.asdict(cfg), "trainable": trainable_state(model), "optimizer": opt.state_dict(),
            "step": step, "vocab": {t.name: t.vocab for t in tasks}, "records": records, "losses": dict(losses)}
    models.atomic_save(ckpt, os.path.join(cfg.out, "last.pt"))
    write_records(cfg.out, records)


def write_records(out, records):
    """OUT/metrics.jsonl, a record a line: rewritten whole from the records last.pt holds, after last.pt, so that a
    kill at any point loses no record that last.pt holds."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    metrics.atomic_write(os.path.join(out, "metrics.jsonl"), lambda f: f.write(lines))


def run_file(path):
    """OUT/last.pt for a run folder, else the path itself."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def load_run(path):
    """The dict save_run wrote (path: the file or its run folder); a clear error for anything else."""
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
    """python train.py --evaluate RUN: rebuild a run from its last.pt, predict `split` and score it, the run folder locked.
    Writes RUN/results_{task}_{split}.json, RUN/metrics_{split}.json; returns ({task: metrics}, that path)."""
    cfg = run_config(path, device=device)
    with locked(cfg.out):  # a --resume of the run would delete our temporary files
        tasks, model, _ = build(cfg)
        restore(load_run(path), model, None, tasks, run_file(path))
        lacking = next((t for t in tasks if split not in t.splits), None)
        if lacking:
            raise ValueError(f"split {split!r} not in the {lacking.name} data (it has {sorted(lacking.splits)})")
        scored = {task: task.evaluate(model, split) for task in tasks}
        write_results(cfg.out, scored, split)
        out, path = {task.name: m for task, (m, _) in scored.items()}, os.path.join(cfg.out, f"metrics_{split}.json")
        metrics.write_json(out, path)
        print("".join(line + "\n" for t, (_, r) in scored.items() for line in t.output_warning(r, split)), end="")
    return out, path


# ---- the study: PEFT methods x routes x visual inputs x seeds (python train.py --study) ----------------------
# What it runs (shapes.STUDY) and how its table and chart read are shapes.py's; here its runs are made and resumed.
STUDY_OUT = "runs/study"
STUDY_FREE = ("out", "device", "workers", "cache", "max_steps", "val_limit")  # may differ from a finished run's config


def study_grid(base, given=(), routes=None, seeds=None):
    """{(task, peft, control, route, seed): Config} of every run, each in its own folder under base.out
    (e.g. vqa-lora-mul-noprefix-s0). routes / seeds: fewer than shapes.STUDY's (tests)."""
    grid = {}
    tasks = ("multitask",) if base.task == "multitask" else ("vqa", "caption") if base.text == "tiny" else (base.task,)
    for task in tasks:
        rows, n_seeds, options = shapes.STUDY[task]
        options = {k: v for k, v in options.items() if k not in given}
        for peft, control, peft_routes in rows:
            unread = {n: Config.__dataclass_fields__[n].default for n, users in PEFT_ONLY.items() if peft not in users}
            for route, seed in itertools.product([r for r in peft_routes if routes is None or r in routes],
                                                 range(base.seed, base.seed + (seeds or n_seeds))):
                name = f"{task}-{peft}-{route}{'-' + control if control else ''}-s{seed}"
                grid[task, peft, control, route, seed] = dataclasses.replace(
                    base, **options, **unread, **shapes.CONTROLS[control], task=task, peft=peft, route=route, seed=seed,
                    lr=options.get("lr", base.lr) * shapes.STUDY_LR.get(peft, 1), out=os.path.join(base.out, name))
    return grid


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
    theirs, ours = metrics.load_json(path, "run config") if os.path.isfile(path) else {}, dataclasses.asdict(cfg)
    diff = [k for k in ours if theirs and k not in STUDY_FREE and theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"{cfg.out} holds a run with other options ({diff[0]}: {theirs.get(diff[0])!r}, the study "
                         f"wants {ours[diff[0]]!r}); remove it or choose another --out")


def default_out(cfg, study=False):
    """A run's default folder, runs/TASK, or a study's, runs/study (runs/study-multitask), with another tiny backbone's
    name after it, so that no two demos share one (--task multitask --text tiny-t5: runs/multitask-t5)."""
    parts = ["study"] * study + [cfg.task] * (not study or cfg.task == "multitask")
    return os.path.join("runs", "-".join(parts + [cfg.text.removeprefix("tiny-")] * cfg.text.startswith("tiny-")))


def run_study(base, given=(), routes=None, seeds=None):
    """Train every run of the grid that has not finished (an interrupted one resumes), then read each run's final
    record and write the table to OUT/study.md and the chart to OUT/study.png. Returns (rows, the table)."""
    if base.max_steps:
        raise ValueError("--study compares whole runs: it takes no --max-steps")
    base = dataclasses.replace(base, out=base.out or default_out(base, study=True))
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
    rows = shapes.study_rows({key: final_record(cfg.out) for key, cfg in grid.items()}, UNROUTED)
    table, path, seeds = shapes.study_table(rows, grid, X100), os.path.join(base.out, "study"), len({k[-1] for k in grid})
    metrics.atomic_write(path + ".md", lambda f: f.write(table))
    shapes.study_chart(rows, path + ".png", {r["task"]: shapes.STUDY_METRICS[r["task"]][0] for r in rows}, X100,
                       f"Study: mean ± std over {seeds} seed{'s' * (seeds > 1)} per route, {'the demo' if base.text == 'tiny' else base.text}")
    print(f"\n{table}\nstudy: {len(grid)} runs in {base.out}, {time.time() - t0:.0f}s; table and chart in {path}.md, .png")
    return rows, table


# ---- the command line ---------------------------------------------------------------------------------


def error_line(e):
    """The one line the command line prints for an error. A DataLoader worker's error arrives wrapped
    with its traceback; its last line is the original error."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


HERE = os.path.dirname(os.path.abspath(__file__))


def raised_on_purpose(e):
    """Whether e is one of this project's messages about the user's input: raised by a `raise` statement in
    its own files, not a slip inside a library or a wrong line of ours (a shape mismatch, max() of nothing),
    which keeps its traceback. A DataLoader worker's error arrives with its traceback as text: read from it."""
    frames = re.findall(r'File "([^"]+)", line \d+, in \S+\n +(.*)', str(e))  # torch's ExceptionWrapper
    if not frames:
        last = traceback.extract_tb(e.__traceback__)[-1]
        frames = [(last.filename, last.line)]
    filename, line = frames[-1]
    return os.path.dirname(os.path.abspath(filename)) == HERE and line.lstrip().startswith("raise")


def cli(argv=None):
    """python train.py: bad input ends in one line "error: ..." (exit status 1; 2 for bad options), Ctrl-C in one
    line saying how to continue (exit status 130); no traceback. Any other exception is a bug: its traceback shows."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a redirected log (nohup, a batch job) gets each line when printed
    try:
        cfg, meta = parse_command_line(argv)
        if meta.get("evaluate"):
            out, path = evaluate_run(meta["evaluate"], meta.get("split", "test"), cfg.device)
            print(json.dumps(out, indent=1) + f"\nwrote {path}")
            return out
        if meta.get("resume"):
            given = {o: getattr(cfg, o) for o in RESUME_OVERRIDES if o in meta["given"] or o == "max_steps"}  # 0: to the end
            return main(run_config(meta["resume"], **given), resume=True)
        if meta.get("study"):
            return run_study(cfg, meta["given"])
        return main(cfg, overwrite=meta.get("overwrite", False))
    except OSError as e:  # a file missing, unreadable or in use; a full disk
        sys.exit(f"error: {error_line(e)}")
    except (ValueError, RuntimeError) as e:
        if not raised_on_purpose(e):
            raise
        sys.exit(f"error: {error_line(e)}")
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
