"""Fine-tune a frozen ViT + text model with LoRA or Adapters and a routing function (SPEC.md).

    python train.py                          # demo: synthetic VQA, tiny pretrained backbones, CPU, ~2 min
    python train.py --task caption           # demo: synthetic captioning with a tiny GPT-2
    python train.py --preset vqa-lora --vit ckpt/vit-l16.pt --text ckpt/roberta-large.pt \
        --data DATA --images IMAGES          # the paper's VQAv2 setting (see README)
    python train.py --resume runs/demo       # continue a run exactly where it stopped
    python train.py --study                  # every route x LoRA/Adapter x 3 seeds + controls -> runs/study/study.md
    python train.py --evaluate runs/demo --split test   # regenerate a run's predictions and score them
    torchrun --nproc_per_node 2 train.py ... # DDP: each process takes its share of every batch
    python train.py --help                   # every option with its default

The frozen ViT gives one visual feature x_R per image (by default the pooler output). x_R is both
the visual prefix (the first input embedding of the text model) and the input of the routing
functions inside every LoRA / Adapter bottleneck. The ViT is frozen, so its features are computed
once and cached on disk.

Run folder OUT: config.json, metrics.jsonl (one line per evaluation), results_{split}.json (the
official results format), last.pt (only what training changed + optimizer, schedule, RNG).
"""
import argparse
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import eval as metrics
import models
import routing_peft as rp


@dataclass
class Config:
    task: str = "vqa"             # vqa (RoBERTa + answer head) | caption (GPT-2 decoder)
    vit: str = "tiny"             # converted ViT checkpoint (python models.py convert), or "tiny" (the demo's)
    text: str = "tiny"            # converted RoBERTa (vqa) / GPT-2 (caption) checkpoint, or "tiny"
    data: str = "data/shapes"     # folder with the VQAv2 files and dataset_coco.json; the default is generated
    images: str = ""              # folder with train2014/ and val2014/ ("" = the data folder)
    vqa_split: str = "karpathy"   # karpathy: train/val/test by dataset_coco.json | official: train2014 / val2014
    peft: str = "lora"            # lora (on attn.q, attn.v) | adapter (after attn.o and mlp.fc2)
    route: str = "mul"            # routing function, one of routing_peft.ROUTES
    rank: int = 16                # bottleneck width r
    alpha: float = 16.0           # LoRA scale alpha / r
    dropout: float = 0.0          # LoRA dropout on x and x_R
    visual: str = "pooler"        # x_R: pooler | cls | mean | patches (patches only with route matmul)
    prefix: bool = True           # prepend x_R as the first input embedding of the text model
    shuffle_visual: bool = False  # control: x_R permuted within each batch (training and evaluation, fixed per batch), so prefix and routes see other images
    train_ln: bool = True         # also train the LayerNorms inside the text model's blocks
    epochs: int = 6               # passes over the training split
    batch_size: int = 64          # examples per batch (under torchrun: all processes together)
    grad_accum: int = 1           # batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-3              # peak AdamW learning rate
    warmup: float = 0.05          # linear warm-up: fraction of all steps if < 1, else steps; then linear decay
    weight_decay: float = 0.0     # AdamW weight decay
    max_len: int = 20             # text tokens: <s> question </s> (vqa) or caption + EOS (caption)
    answers: int = 3129           # K, size of the answer vocabulary (vqa)
    beams: int = 5                # beam width for captioning (1 = greedy)
    max_new_tokens: int = 20      # caption length limit in tokens
    max_steps: int = 0            # stop after this many optimizer steps (0 = all epochs); schedule unchanged
    seed: int = 0                 # seeds the new weights, the data order and dropout
    device: str = "auto"          # auto | cpu | cuda | mps
    workers: int = 2              # image-loading processes (only when features are not cached)
    out: str = "runs/demo"        # run folder
    resume: str = ""              # run folder to continue exactly (its last.pt); other options come from it
    feature_cache: bool = True    # cache frozen ViT features on disk (off: recompute every step, as released)
    cache: str = "cache"          # folder of the feature cache, shared by runs
    preset: str = ""              # a name in PRESETS or a JSON file of options; explicit options win


# The released hyper-parameters of the two paper settings (SPEC.md). Checkpoint and data paths
# are the README's; pass --vit/--text/--data/--images to change them.
PRESETS = {
    "vqa-lora": dict(task="vqa", vit="ckpt/vit-l16.pt", text="ckpt/roberta-large.pt", data="data/vqa",
                     images="data/coco", peft="lora", rank=128, alpha=128, lr=3e-4, batch_size=512,
                     epochs=20, warmup=0.05),
    "vqa-adapter": dict(task="vqa", vit="ckpt/vit-l16.pt", text="ckpt/roberta-large.pt", data="data/vqa",
                        images="data/coco", peft="adapter", rank=64, lr=3e-4, batch_size=512,
                        epochs=20, warmup=0.05),
    "caption-lora": dict(task="caption", vit="ckpt/vit-l16.pt", text="ckpt/gpt2-medium.pt",
                         data="data/coco", images="data/coco", peft="lora", rank=128, alpha=128,
                         lr=3e-5, batch_size=40, epochs=20, warmup=5000),
}
# python train.py --study: every route in STUDY_ROUTES x STUDY_PEFTS x STUDY_SEEDS seeds (from --seed on), on both
# tasks with the tiny backbones (a real text checkpoint serves one task: --task). The controls run for VQA with LoRA
# only (the 2-core budget): without the visual prefix (routing is then the image's only path) and with x_R shuffled
# across the batch (a route that still helps is not using the image). STUDY_EPOCHS apply unless epochs are given.
STUDY_OUT = "runs/study"
STUDY_ROUTES = ("none", "add", "mul", "matmul", "matmul_expand")
STUDY_PEFTS = ("lora", "adapter")
STUDY_SEEDS = 3
STUDY_EPOCHS = {"vqa": 3, "caption": 1}  # 60 VQA runs x ~16 s + 30 caption runs x ~14 s: ~23 min on 2 CPU cores
STUDY_CONTROLS = {"noprefix": {"prefix": False}, "shuffled": {"shuffle_visual": True}}  # name: options
STUDY_CONTROLLED = ("vqa", "lora")  # the (task, peft) the controls run for
STUDY_METRICS = {"vqa": ("vqa_accuracy",), "caption": ("CIDEr", "Bleu_4")}  # the first is the headline
STUDY_FREE = ("out", "resume", "device", "workers", "cache", "max_steps")  # may differ from a finished run's config
RESUME_OVERRIDES = ("max_steps", "device", "workers")  # what --resume may change: not the math
CHOICES = {"task": ("vqa", "caption"), "vqa_split": ("karpathy", "official"), "peft": ("lora", "adapter"),
           "route": tuple(rp.ROUTES), "visual": ("pooler", "cls", "mean", "patches"),
           "device": ("auto", "cpu", "cuda", "mps")}


# ---- configuration: dataclass -> argparse, presets, checks ----------------------------------------------


def _field_help():
    """The comment after each Config field, read from this file: one source for defaults and --help."""
    helps = {}
    with open(__file__, encoding="utf-8") as f:
        for line in f:
            name, sep, rest = line.strip().partition(":")
            if sep and name in Config.__dataclass_fields__ and "#" in rest:
                helps.setdefault(name, rest.split("#", 1)[1].strip())
    return helps


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad options: one line, no usage block (python train.py --help lists them)."""
        self.exit(2, f"error: {message} (see python train.py --help)\n")


def build_parser():
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = _field_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default!r})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=None, choices=CHOICES.get(f.name), help=text)
    parser.add_argument("--study", action="store_true", default=None,
                        help=f"run the routing study (routes {', '.join(STUDY_ROUTES)} x lora/adapter x "
                             f"{STUDY_SEEDS} seeds, with controls) from these options; table in OUT/study.md "
                             f"(default OUT: {STUDY_OUT})")
    parser.add_argument("--evaluate", metavar="RUN", help="evaluate a finished or interrupted run (its folder or "
                        "last.pt) on --split: writes RUN/results_SPLIT.json and RUN/results_SPLIT.metrics.json")
    parser.add_argument("--split", default=None, help="with --evaluate: the split to predict (default: test)")
    return parser


def load_preset(name):
    """Options of a preset: a name in PRESETS or a JSON file; unknown keys are an error."""
    if name in PRESETS:
        options = PRESETS[name]
    elif os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            options = json.load(f)
    else:
        raise ValueError(f"unknown preset {name!r}: not one of {sorted(PRESETS)} and not a JSON file")
    unknown = sorted(set(options) - set(Config.__dataclass_fields__))
    if unknown:
        raise ValueError(f"preset {name!r} has unknown options {unknown}")
    return options


def config_from_args(argv=None):
    """Defaults < preset < explicit command-line options."""
    return parse_command_line(argv)[0]


def parse_command_line(argv=None):
    """(Config, study): defaults < preset < explicit options. study is None without --study, else the
    per-task options the study sets itself ({task: {option: value}}: STUDY_EPOCHS, unless epochs were given)."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    args.pop("evaluate", None), args.pop("split", None)  # see cli
    study = None
    if args.pop("study", False):
        if args.get("resume"):
            raise ValueError("--study resumes by itself (finished runs are skipped); it takes no --resume")
        args.setdefault("out", STUDY_OUT)
        given = set(args) | set(load_preset(args["preset"]) if args.get("preset") else {})
        study = {task: {} if "epochs" in given else {"epochs": e} for task, e in STUDY_EPOCHS.items()}
    if args.get("resume"):
        fixed = sorted(set(args) - {"resume", *RESUME_OVERRIDES})
        if fixed:
            raise ValueError(f"--resume continues a run with its own options; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may change, "
                             f"not {', '.join('--' + k.replace('_', '-') for k in fixed)}")
    options = load_preset(args["preset"]) if args.get("preset") else {}
    return Config(**{**options, **args}), study


def check_config(cfg):
    """One clear error for options that do not fit together."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {list(allowed)}")
    if cfg.visual == "patches" and cfg.route not in ("none", "matmul", "matmul_relu"):
        raise ValueError(f"--visual patches gives many visual tokens; only route 'matmul' handles them "
                         f"(route {cfg.route!r} needs one vector per image)")
    for name in ("rank", "epochs", "batch_size", "grad_accum", "max_len", "answers", "beams", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


# ---- the demo's tiny pretrained backbones ------------------------------------------------------------

DEMO_WORLD = "data/shapes"
DEMO_DIR = "data/tiny"
TINY = {  # the same architectures as the real backbones, tiny; d = 128 everywhere, so no projection
    "vit": models.Config("vit", 128, 4, 4, 512, 1e-12, image_size=64, patch_size=16),
    "roberta": models.Config("roberta", 128, 4, 4, 512, 1e-5, max_positions=66, dropout=0.1),
    "gpt2": models.Config("gpt2", 128, 4, 4, 512, 1e-5, max_positions=64, dropout=0.1),
}
TINY_VOCAB = 1000
VIT_STEPS, VIT_LR, VIT_SCENES = 700, 2e-3, 8000
TEXT_STEPS, TEXT_LR = 400, 1e-3  # per text backbone
PRETRAIN_WARMUP = 50


def ensure_world(path):
    """The synthetic world at `path`: generated once (data.py shapes)."""
    if not os.path.isfile(os.path.join(path, data.KARPATHY)):
        print(f"creating the synthetic world in {path} (once)")
        data.make_shapes(path)


def world_texts(world):
    """Questions and captions of the synthetic world's training images (the tiny models' corpus)."""
    karpathy = data.read_karpathy(os.path.join(world, data.KARPATHY))
    train_ids = {img["cocoid"] for img in karpathy if data.karpathy_split(img["split"]) == "train"}
    captions = [s["raw"] for img in karpathy if img["cocoid"] in train_ids for s in img["sentences"]]
    questions = [r["question"] for r in data.read_vqa(world, "train2014") if r["image_id"] in train_ids]
    return questions, captions


def pretrain(model, head, batches, steps, lr, desc):
    """AdamW on model + head over `batches` (a function step -> loss): linear warm-up over
    PRETRAIN_WARMUP steps, then cosine decay (without warm-up the post-LN RoBERTa stalls at the
    unigram loss and gives the same hidden state for every input)."""
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / PRETRAIN_WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = batches(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# The ViT's pretraining targets: per quadrant (top left, top right, bottom left, bottom right) its
# colour, shape and size, with class 0 = empty quadrant; then the number of objects (0-4).
ATTRIBUTE_CLASSES = [1 + len(data.COLORS), 1 + len(data.SHAPES), 1 + len(data.SIZES)] * 4 + [5]


def scene_attributes(objects):
    """Class labels (13,) of one scene's attributes, in the order of ATTRIBUTE_CLASSES."""
    colors, shapes, sizes = sorted(data.COLORS), list(data.SHAPES), sorted(data.SIZES)
    y = torch.zeros(len(ATTRIBUTE_CLASSES), dtype=torch.long)
    for o in objects:
        q = 3 * data.QUADRANTS.index(o["quadrant"])
        y[q:q + 3] = torch.tensor([1 + colors.index(o["color"]), 1 + shapes.index(o["shape"]),
                                   1 + sizes.index(o["size"])])
    y[-1] = len(objects)
    return y


def attribute_loss(logits, labels):
    """Mean cross-entropy over the 13 attribute groups: logits (B, sum(ATTRIBUTE_CLASSES)), labels (B, 13)."""
    groups = logits.split(ATTRIBUTE_CLASSES, dim=-1)
    return sum(F.cross_entropy(z, labels[:, j]) for j, z in enumerate(groups)) / len(groups)


def draw_scenes(n, seed, config):
    """n new scenes from the synthetic world's generator (not its stored images), JPEG round-tripped
    like the stored ones: (pixels (n, 3, S, S) normalised for the ViT, labels (n, 13))."""
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    pixels, labels = [], []
    for _ in tqdm(range(n), desc="draw scenes", unit="img", mininterval=1.0):
        img, objects = data.draw_scene(rng, nprng)
        with Image.open(io.BytesIO(data.jpeg_bytes(img))) as im:
            pixels.append(data.preprocess(im.convert("RGB"), config.image_size, config.image_mean, config.image_std))
        labels.append(scene_attributes(objects))
    return torch.stack(pixels), torch.stack(labels)


def pretrain_vit():
    """The tiny ViT, trained briefly to name the attributes of freshly drawn scenes (a stand-in for
    ImageNet-21k pretraining: no image, question or caption of the demo's data is used)."""
    c = TINY["vit"]
    pixels, labels = draw_scenes(VIT_SCENES, seed=1, config=c)
    model, head = models.build_model(c), nn.Linear(c.d_model, sum(ATTRIBUTE_CLASSES))
    with torch.no_grad():  # distinct positions from the first step: learning starts much faster than from 0
        model.pos_embed.normal_(0.0, 0.5)
        model.cls_token.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        i = torch.randint(len(pixels), (64,), generator=g)
        return attribute_loss(head(model(pixels[i])[1]), labels[i])

    return pretrain(model, head, loss, VIT_STEPS, VIT_LR, "pretrain tiny ViT (scene attributes)")


def pretrain_text(arch, tokenizer, texts):
    """The tiny RoBERTa (masked LM) or GPT-2 (next-token LM) on the synthetic world's text."""
    c = dataclasses.replace(TINY[arch], vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
    model = models.build_model(c)
    seqs = [torch.tensor(tokenizer.wrap(tokenizer.encode(t))[:c.max_positions - 4]) for t in texts]
    g = torch.Generator().manual_seed(0)
    if arch == "roberta":
        head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.LayerNorm(c.d_model))
    else:
        head = nn.Identity()

    def loss(step):
        i = torch.randint(len(seqs), (64,), generator=g).tolist()
        ids, mask = data.pad_sequences([seqs[j] for j in i], tokenizer.pad_id)  # (B, N)
        if arch == "gpt2":
            labels = ids.masked_fill(mask == 0, -100)
            logits = model(ids)  # (B, N, V)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        special = (ids == tokenizer.bos_id) | (ids == tokenizer.eos_id) | (mask == 0)
        chosen = (torch.rand(ids.shape, generator=g) < 0.15) & ~special  # (B, N)
        labels = ids.masked_fill(~chosen, -100)
        u = torch.rand(ids.shape, generator=g)
        noisy = torch.where(chosen & (u < 0.8), tokenizer.mask_id, ids)  # 80 % <mask>, 10 % random, 10 % kept
        noisy = torch.where(chosen & (u >= 0.8) & (u < 0.9), torch.randint(len(tokenizer), ids.shape, generator=g), noisy)
        h = head(model(noisy, mask))  # (B, N, d)
        return F.cross_entropy((h @ model.wte.weight.T).flatten(0, 1), labels.flatten())

    return pretrain(model, head, loss, TEXT_STEPS, TEXT_LR, f"pretrain tiny {arch} ({'masked' if arch == 'roberta' else 'next-token'} LM)")


def save_backbone(model, path, tokenizer=None):
    """Write a backbone in the converted-checkpoint format (models.load_checkpoint reads it)."""
    ckpt = {"arch": model.config.arch, "config": dataclasses.asdict(model.config), "model": model.state_dict()}
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer.to_data()
    models.atomic_save(ckpt, path)


def demo_backbone(arch):
    """Path of the demo's tiny pretrained `arch` backbone; pretrained (about a minute) on first use."""
    path = os.path.join(DEMO_DIR, f"{arch}.pt")
    if os.path.isfile(path):
        return path
    torch.manual_seed(0)
    ensure_world(DEMO_WORLD)
    if arch == "vit":
        save_backbone(pretrain_vit(), path)
    else:
        questions, captions = world_texts(DEMO_WORLD)
        tokenizer = data.BPETokenizer(**data.learn_bpe(questions + captions, TINY_VOCAB))
        save_backbone(pretrain_text(arch, tokenizer, questions + captions if arch == "roberta" else captions),
                      path, tokenizer)
    print(f"saved the tiny pretrained {arch} to {path}")
    return path


def backbone_path(name, arch):
    """A checkpoint path, or 'tiny' -> the demo's backbone (pretrained on first use)."""
    if name == "tiny":
        return demo_backbone(arch)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{arch} checkpoint not found: {name} (convert one with: "
                                f"python models.py convert --src HF_DIR --out {name}, or use 'tiny')")
    return name


# ---- frozen visual features ----------------------------------------------------------------------


def select_visual(last_hidden, pooler, visual):
    """x_R of the chosen kind: (B, L, d), L = 1 except for patches (L = number of patches)."""
    if visual == "pooler":
        return pooler[:, None]                       # (B, d) -> (B, 1, d)
    if visual == "cls":
        return last_hidden[:, :1]                    # (B, 1, d)
    if visual == "mean":
        return last_hidden[:, 1:].mean(1, keepdim=True)  # (B, 1, d)
    return last_hidden[:, 1:]                        # patches: (B, P, d)


@torch.no_grad()
def compute_features(vit, images, keys, visual, device, batch_size, workers):
    """x_R of every image key: (n, L, d) float32 on the CPU."""
    loader = torch.utils.data.DataLoader(data.ImageDataset(keys, images), batch_size=batch_size,
                                         num_workers=workers)
    out = []
    for batch in tqdm(loader, desc="ViT features", unit="batch"):
        with autocast(device):
            last_hidden, pooler = vit(batch["pixel_values"].to(device))
        out.append(select_visual(last_hidden, pooler, visual).float().cpu())
    return torch.cat(out)


def cached_features(cfg, vit_path, vit, images, keys, device):
    """compute_features once per (checkpoint, image list, preprocessing, feature kind); on disk after.
    The key hashes the checkpoint's and every image's path, size and mtime, so a changed file or option
    gives a new cache entry, never a stale one (data._cached)."""
    params = {"visual": cfg.visual, "size": images.size, "mean": images.mean, "std": images.std, "keys": keys}
    sources = [vit_path] + [images.path(k) for k in keys]
    missing = next((p for p in sources[1:] if not os.path.isfile(p)), None)
    if missing:
        raise FileNotFoundError(f"image not found: {missing} (--images {images.images_dir})")
    build = functools.partial(compute_features, vit, images, keys, cfg.visual, device, 64, cfg.workers)
    return data._cached("features", sources, params, build, cfg.cache)


# ---- the two task models -------------------------------------------------------------------------


class VQAModel(nn.Module):
    """Frozen RoBERTa with PEFT layers; x_R is the visual prefix and the routing input; an MLP head on
    the final hidden state at the prefix position (without prefix: at <s>) scores K answers."""

    def __init__(self, text, d_visual, num_answers, prefix):
        super().__init__()
        d = text.config.d_model
        self.text, self.prefix = text, prefix
        self.proj = nn.Linear(d_visual, d) if d_visual != d else None  # only when widths differ
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, num_answers))

    def forward(self, input_ids, attention_mask, x_R):
        """input_ids, attention_mask (B, N), x_R (B, L, d_visual) -> answer logits (B, K)."""
        if self.proj is not None:
            x_R = self.proj(x_R)  # (B, L, d)
        with rp.visual_context(self.text, x_R):
            h = self.text(input_ids, attention_mask, prefix=x_R if self.prefix else None)  # (B, L + N, d)
        return self.head(h[:, 0])


class CaptionModel(nn.Module):
    """Frozen GPT-2 with PEFT layers. Input [x_R; caption; EOS] (without prefix: [<bos>; caption; EOS]);
    the last prefix position predicts the first caption token."""

    def __init__(self, text, d_visual, prefix, bos_id):
        super().__init__()
        d = text.config.d_model
        self.text, self.prefix, self.bos_id = text, prefix, bos_id
        self.proj = nn.Linear(d_visual, d) if d_visual != d else None

    def start(self, x_R):
        """(projected x_R (B, L, d), the prefix embeddings (B, P, d))."""
        if self.proj is not None:
            x_R = self.proj(x_R)
        if self.prefix:
            return x_R, x_R
        bos = torch.full((x_R.shape[0], 1), self.bos_id, dtype=torch.long, device=x_R.device)
        return x_R, self.text.wte(bos)  # (B, 1, d)

    def forward(self, input_ids, x_R):
        """input_ids (B, N), x_R (B, L, d_visual) -> logits (B, N, V): position i predicts input_ids[:, i]."""
        x_R, prefix = self.start(x_R)
        with rp.visual_context(self.text, x_R):
            logits = self.text(input_ids, prefix=prefix)  # (B, P + N, V)
        return logits[:, prefix.shape[1] - 1:-1]


def build_task_model(cfg, text, d_visual, num_answers, tokenizer):
    """Backbone + PEFT layers + head, with only the PEFT weights, head, projection (and LNs) trainable."""
    if cfg.peft == "lora":
        rp.add_lora(text, ["attn.q", "attn.v"], cfg.rank, cfg.alpha, cfg.route, cfg.dropout)
    else:
        act = nn.GELU(approximate="tanh" if cfg.task == "caption" else "none")  # the backbone's own GELU
        rp.add_adapters(text, ["attn.o", "mlp.fc2"], cfg.rank, cfg.route, act)
    if cfg.task == "vqa":
        model = VQAModel(text, d_visual, num_answers, cfg.prefix)
        extra = ["head"]
    else:
        model = CaptionModel(text, d_visual, cfg.prefix, tokenizer.bos_id)
        extra = []
    extra += ["proj"] if model.proj is not None else []
    extra += ["ln1", "ln2"] if cfg.train_ln else []
    return rp.mark_trainable(model, extra)


# ---- decoding --------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, x_R, beams, max_new_tokens, eos_id):
    """Captions for a batch of x_R (B, L, d): models.beam_search over GPT-2 with its KV cache."""
    B, k = x_R.shape[0], beams
    x_R, prefix = model.start(x_R.repeat_interleave(k, dim=0))  # (B * k, L, d): routed layers need x_R per beam
    cache = model.text.new_cache()

    def step(tokens, index):
        if tokens is None:
            return model.text(prefix=prefix, cache=cache)[:, -1]  # (B * k, V)
        cache.reorder(index)
        return model.text(tokens[:, None], cache=cache)[:, -1]

    with rp.visual_context(model.text, x_R):
        return models.beam_search(step, B, k, max_new_tokens, eos_id)


# ---- batches, evaluation --------------------------------------------------------------------------


class Task:
    """Everything about the data of one run: tokenizer, splits, collate, features, and evaluation."""

    def __init__(self, cfg, tokenizer, vit_path, vit, device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        images_dir = cfg.images or cfg.data
        c = vit.config
        self.images = data.Images(images_dir, c.image_size, c.image_mean, c.image_std)
        if cfg.task == "vqa":
            karpathy = os.path.join(cfg.data, data.KARPATHY) if cfg.vqa_split == "karpathy" else None
            prepared = data.prepare_vqa(cfg.data, tokenizer, karpathy, cfg.answers, cfg.max_len,
                                        cache_dir=os.path.join(cfg.cache, "prepared"))
            self.answers = prepared["answers"]
            self.splits = prepared["splits"]
            self.collate = functools.partial(data.collate_vqa, pad_id=tokenizer.pad_id, num_answers=len(self.answers))
            self.dataset_class = data.VQADataset
        else:
            prepared = data.prepare_captions(os.path.join(cfg.data, data.KARPATHY), tokenizer, cfg.max_len,
                                             cache_dir=os.path.join(cfg.cache, "prepared"))
            self.answers = None
            self.splits = prepared["splits"]
            self.collate = functools.partial(data.collate_caption, eos_id=tokenizer.eos_id)
            self.dataset_class = data.CaptionDataset
        self.vit = None if cfg.feature_cache else vit  # with cached features the ViT is not needed again
        self.features, self.row = None, None
        if cfg.feature_cache:
            keys = sorted({k for s in self.splits.values() for k in s["image"]})
            self.features = cached_features(cfg, vit_path, vit, self.images, keys, device)  # (n, L, d)
            self.row = {k: i for i, k in enumerate(keys)}
        self.d_visual = c.d_model
        self._references = {}  # split -> tokenised references (captioning), see references()

    def dataset(self, split):
        return self.dataset_class(self.splits[split], None if self.features is not None else self.images)

    def x_R(self, batch):
        """The visual features of a batch (B, L, d): cached rows, or the frozen ViT run now; with
        cfg.shuffle_visual, another example's features (shuffle_rows)."""
        if self.features is not None:
            x_R = self.features[[self.row[k] for k in batch["image"]]].to(self.device)
        else:
            with torch.no_grad(), autocast(self.device):
                last_hidden, pooler = self.vit(batch["pixel_values"].to(self.device))
            x_R = select_visual(last_hidden, pooler, self.cfg.visual).float()
        return shuffle_rows(x_R, batch["image"], self.cfg.seed) if self.cfg.shuffle_visual else x_R

    def loader(self, dataset, batches, collate="task"):
        """Batches of `dataset`; with images to decode (no feature cache) in cfg.workers processes."""
        workers = self.cfg.workers if self.features is None else 0
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                           collate_fn=self.collate if collate == "task" else collate)

    def loss(self, model, batch):
        x_R = self.x_R(batch)
        ids = batch["input_ids"].to(self.device)
        if self.cfg.task == "vqa":
            logits = model(ids, batch["attention_mask"].to(self.device), x_R)  # (B, K)
            targets = batch["targets"].to(self.device)
            return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / len(ids)
        logits = model(ids, x_R)  # (B, N, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(self.device).flatten())

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        """(metrics, results in the official format) on a split."""
        model.eval()
        if self.cfg.task == "vqa":
            out = self.evaluate_vqa(model, split, batch_size)
        else:
            out = self.evaluate_caption(model, split, batch_size)
        model.train()
        return out

    def evaluate_vqa(self, model, split, batch_size):
        """Predictions = argmax answer. A question's accuracy is its soft target for that answer,
        which data.py computed with eval.vqa_accuracy: the official per-question accuracy exactly."""
        ds = self.dataset(split)
        batches = eval_batches(len(ds), batch_size)
        results, acc = [], []
        for batch in tqdm(self.loader(ds, batches), desc=f"evaluate {split}", unit="batch", leave=False):
            with autocast(self.device):
                logits = model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                               self.x_R(batch))
            pred = logits.argmax(-1).cpu()  # (B,)
            acc += batch["targets"].gather(1, pred[:, None])[:, 0].tolist()
            results += [{"question_id": q, "answer": self.answers[p]}
                        for q, p in zip(batch["question_id"].tolist(), pred.tolist())]
        return vqa_metrics(acc, self.splits[split]["answer_type"]), results

    def evaluate_caption(self, model, split, batch_size):
        """Beam search (cfg.beams) on every image of the split; CIDEr-D, BLEU, ROUGE-L against its references."""
        s = self.splits[split]
        keys, ids = s["image"], s["image_id"].tolist()
        batches = eval_batches(len(keys), batch_size)
        if self.features is None:  # images decoded by DataLoader workers, the ViT run per batch
            loader = self.loader(data.ImageDataset(keys, self.images), batches, collate=None)
        else:
            loader = ({"image": [keys[j] for j in b]} for b in batches)
        captions = {}
        for b, batch in zip(batches, tqdm(loader, total=len(batches), desc=f"evaluate {split}", unit="batch",
                                          leave=False)):
            with autocast(self.device):
                out = generate(model, self.x_R(batch), self.cfg.beams, self.cfg.max_new_tokens, self.tokenizer.eos_id)
            captions.update({ids[j]: self.tokenizer.decode(t, skip_special=True).strip() for j, t in zip(b, out)})
        gts = self.references(split)
        results = [{"image_id": k, "caption": c} for k, c in captions.items()]
        return metrics.caption_scores(gts, captions), results

    def references(self, split):
        """{image_id: PTB-tokenised reference captions} of a caption split, made once per split."""
        if split not in self._references:
            s = self.splits[split]
            self._references[split] = {i: [metrics.ptb_tokenize(r) for r in refs]
                                       for i, refs in zip(s["image_id"].tolist(), s["refs"])}
        return self._references[split]

    def text_only_baseline(self, split):
        """A model that never sees the image. VQA: the best training answer per question type;
        captioning: the most frequent training caption for every image."""
        if self.cfg.task == "vqa":
            totals = defaultdict(Counter)  # question type -> answer id -> summed soft score
            for qtype, scores in zip(self.splits["train"]["question_type"], soft_targets(self.splits["train"])):
                totals[qtype].update(scores)
            prior = {q: min(c, key=lambda i: (-c[i], i)) for q, c in totals.items()}
            s = self.splits[split]
            acc = [scores.get(prior.get(qtype), 0.0) for qtype, scores in zip(s["question_type"], soft_targets(s))]
            return vqa_metrics(acc, s["answer_type"])
        counts = Counter(r for refs in self.splits["train"]["refs"] for r in refs)
        caption = min(counts, key=lambda r: (-counts[r], r))
        s = self.splits[split]
        gts = self.references(split)
        return metrics.caption_scores(gts, {i: caption for i in gts})


def eval_batches(n, batch_size):
    """Indices 0..n-1 in order, cut into batches of batch_size (the last may be shorter)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def shuffle_rows(x_R, keys, seed):
    """x_R (B, L, d) with each row replaced by another row's: a random cyclic permutation (no example
    keeps its own position), drawn from a generator seeded by (seed, the batch's image keys), so the
    same batch is shuffled the same way in training, after --resume and in evaluation."""
    digest = hashlib.sha256("\n".join([str(seed), *keys]).encode()).digest()
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
    source = torch.empty_like(order)
    source[order] = order.roll(-1)  # order[i] takes the features of order[i + 1]
    return x_R[source.to(x_R.device)]


def soft_targets(split):
    """Per question of a prepared VQA split, {answer id: soft score}, read from its ragged columns."""
    ids, scores, off = split["target_ids"].tolist(), split["target_scores"].tolist(), split["target_offsets"].tolist()
    return [dict(zip(ids[a:b], scores[a:b])) for a, b in zip(off, off[1:])]


def vqa_metrics(acc, answer_types):
    """Official aggregation: x100 and rounded to 2 digits, overall and per answer type."""
    by_type = defaultdict(list)
    for a, t in zip(acc, answer_types):
        by_type[t].append(a)
    return {"vqa_accuracy": round(100 * sum(acc) / len(acc), 2),
            "per_answer_type": {t: round(100 * sum(v) / len(v), 2) for t, v in sorted(by_type.items())},
            "n_questions": len(acc)}


# ---- training ------------------------------------------------------------------------------------


def get_lr(step, total, cfg):
    """Linear warm-up to cfg.lr, then linear decay to 0 at `total` steps."""
    warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / max(1.0, total - warmup))


def epoch_batches(n, cfg, epoch, rank=0, world=1):
    """The batches of one epoch: a permutation fixed by (seed, epoch), cut into full batches
    (a shorter last batch is dropped); under DDP each process takes its share of every batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)).tolist()
    size = min(cfg.batch_size, n)
    batches = [order[i:i + size] for i in range(0, n - size + 1, size)]
    batches = batches[:len(batches) // cfg.grad_accum * cfg.grad_accum]  # whole optimizer steps only
    return [b[rank::world] for b in batches]


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pick_device(name):
    """auto: CUDA, else MPS, else CPU. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps: MPS is not available")
    return torch.device(name)


def step_seed(cfg, rank, step, micro):
    """The seed of the random draws (dropout) of one micro-batch: a function of (seed, process, optimizer
    step, micro-batch), so a resumed run draws exactly what an uninterrupted one would, whatever ran in
    between (evaluation, DataLoader seeds), and a checkpoint needs no RNG state."""
    return ((cfg.seed * 1_000_003 + rank) * 1_000_003 + step) * 4096 + micro


def trainable_state(model):
    """What training changed: every trainable parameter (PEFT weights, LayerNorms, head, projection)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, opt, cfg, step, answers):
    """Atomically: what training changed, the optimizer, the step (the schedule and the dropout seeds are
    functions of the step and the config: see get_lr, step_seed) and the config. Tensors and plain
    Python values only, so load_run reads it with weights_only=True."""
    models.atomic_save({"config": dataclasses.asdict(cfg), "trainable": trainable_state(model),
                        "optimizer": opt.state_dict(), "step": step, "answers": answers}, path)


def run_file(path):
    """OUT/last.pt for a run folder, else the path itself."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def load_run(path):
    """The dict saved by save_checkpoint (path: the file or its run folder); a clear error for anything else."""
    file = run_file(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no run checkpoint at {file}")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{file} is not a train.py checkpoint (torch.load failed: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not {"config", "trainable", "optimizer", "step"} <= set(ckpt):
        raise ValueError(f"{file} is not a train.py checkpoint (models.py checkpoints are backbones)")
    unknown = sorted(set(ckpt["config"]) - set(Config.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{file}: its config has options this train.py does not know: {unknown}")
    return ckpt


def load_trainable(model, state, source):
    """Put a checkpoint's trainable tensors into a freshly built model; they must match it exactly."""
    ours = trainable_state(model)
    if set(ours) != set(state):
        diff = sorted(set(ours) ^ set(state))
        raise ValueError(f"{source}: checkpoint does not fit the model ({len(diff)} tensors differ, "
                         f"e.g. {diff[:3]})")
    bad = [n for n, t in state.items() if t.shape != ours[n].shape]
    if bad:
        raise ValueError(f"{source}: checkpoint does not fit the model (shape of {bad[0]}: "
                         f"{tuple(state[bad[0]].shape)} vs {tuple(ours[bad[0]].shape)})")
    model.load_state_dict(state, strict=False)


def log_metrics(cfg, record):
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def setup(cfg):
    """Backbones, task data, the task model: everything a run or an evaluation needs. Seeded, so the
    freshly initialised weights are the same in a run, its resumption and its evaluation."""
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.data == DEMO_WORLD:
        ensure_world(DEMO_WORLD)
    for name in ("data", "images"):
        if getattr(cfg, name) and not os.path.isdir(getattr(cfg, name)):
            raise FileNotFoundError(f"--{name} {getattr(cfg, name)}: no such folder")
    device = pick_device(cfg.device)
    text_arch = "roberta" if cfg.task == "vqa" else "gpt2"
    vit_path = backbone_path(cfg.vit, "vit")
    text_path = backbone_path(cfg.text, text_arch)
    vit = models.load_checkpoint(vit_path, arch="vit").to(device)
    text = models.load_checkpoint(text_path, arch=text_arch)
    tokenizer = data.BPETokenizer.from_checkpoint(text_path)
    task = Task(cfg, tokenizer, vit_path, vit, device)
    model = build_task_model(cfg, text, task.d_visual, len(task.answers or ()), tokenizer).to(device)
    return task, model, device


def main(cfg):
    """Train, evaluate every epoch, return the last evaluation's metrics (plus the text-only baseline)."""
    ckpt = None
    if cfg.resume:  # the run's own options, in its own folder; only RESUME_OVERRIDES come from cfg
        ckpt = load_run(cfg.resume)
        overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES}
        cfg = Config(**{**ckpt["config"], **overrides, "out": os.path.dirname(os.path.abspath(run_file(cfg.resume)))})
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:  # torchrun: one process per GPU (or CPU process, gloo); each takes its share of every batch
        torch.distributed.init_process_group("nccl" if cfg.device in ("auto", "cuda") and torch.cuda.is_available()
                                             else "gloo", timeout=datetime.timedelta(hours=2))  # rank 0 evaluates
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if distributed and rank > 0:
        torch.distributed.barrier()  # rank 0 writes the world, prepared data and feature caches first
    task, model, device = setup(cfg)
    if distributed and rank == 0:
        torch.distributed.barrier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_set = task.dataset("train")
    steps_per_epoch = len(epoch_batches(len(train_set), cfg, 0)) // cfg.grad_accum
    total = steps_per_epoch * cfg.epochs
    step = 0
    if ckpt is not None:
        load_trainable(model, ckpt["trainable"], cfg.resume)
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    trained, total_params = rp.count_parameters(model)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        metrics.write_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))  # atomic
        print(f"{cfg.task}: {cfg.peft} r={cfg.rank} route={cfg.route} visual={cfg.visual} prefix={cfg.prefix}; "
              f"trainable {trained:,} of {total_params:,} parameters; {len(train_set):,} training examples, "
              f"{total} steps on {device}")
    last_step = cfg.max_steps or total
    eval_split = "val"
    result = {}
    model.train()
    while step < min(total, last_step):
        epoch, offset = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_set), cfg, epoch, rank, world)[offset * cfg.grad_accum:]
        t0, losses = time.time(), []
        bar = tqdm(task.loader(train_set, batches), total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=rank != 0)
        for i, batch in enumerate(bar):
            torch.manual_seed(step_seed(cfg, rank, step, i % cfg.grad_accum))  # dropout: see step_seed
            with autocast(device):
                loss = task.loss(ddp, batch)
            (loss / cfg.grad_accum).backward()  # gradients add up over grad_accum batches
            losses.append(loss.item())
            if (i + 1) % cfg.grad_accum:
                continue
            for g in opt.param_groups:
                g["lr"] = get_lr(step, total, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{get_lr(step - 1, total, cfg):.2e}")
            if step == last_step or step % steps_per_epoch == 0:
                break
        bar.close()
        if rank == 0:
            m, results = task.evaluate(model, eval_split, cfg.batch_size)
            record = {"epoch": step / steps_per_epoch, "step": step, "split": eval_split,
                      "train_loss": float(np.mean(losses)), **m}
            log_metrics(cfg, record)
            metrics.write_json(results, os.path.join(cfg.out, f"results_{eval_split}.json"))
            save_checkpoint(os.path.join(cfg.out, "last.pt"), model, opt, cfg, step, task.answers)
            headline = m.get("vqa_accuracy", m.get("CIDEr"))
            print(f"epoch {record['epoch']:.2f} step {step}: loss {record['train_loss']:.4f}, "
                  f"{eval_split} {'vqa_accuracy' if cfg.task == 'vqa' else 'CIDEr'} {headline:.2f} "
                  f"({time.time() - t0:.0f}s)")
            result = m
        if distributed:
            torch.distributed.barrier()
    if rank == 0 and step >= total:
        result = final_report(cfg, task, model)
    if distributed:
        torch.distributed.destroy_process_group()
    return result


def final_report(cfg, task, model):
    """Test-split evaluation next to the text-only baseline, as a small table."""
    split = "test" if "test" in task.splits else "val"
    m, results = task.evaluate(model, split, cfg.batch_size)
    metrics.write_json(results, os.path.join(cfg.out, f"results_{split}.json"))
    base = task.text_only_baseline(split)
    log_metrics(cfg, {"epoch": cfg.epochs, "split": split, "final": True,
                      "trainable_params": rp.count_parameters(model)[0], "text_only": base, **m})
    names = ["vqa_accuracy"] if cfg.task == "vqa" else ["CIDEr", "Bleu_4"]
    demo = " (the demo's tiny backbones, pretrained here on the synthetic world)" if "tiny" in (cfg.vit, cfg.text) else ""
    print(f"\n{split} split, {m.get('n_questions', m.get('n_images'))} examples{demo}:")
    print("| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    print("| text-only baseline | " + " | ".join(f"{base[n]:.2f}" for n in names) + " |")
    print(f"| {cfg.peft} r={cfg.rank}, route {cfg.route} | " + " | ".join(f"{m[n]:.2f}" for n in names) + " |")
    return {**m, "baseline": base}


# ---- the study: every route x LoRA/Adapter x seeds, with controls (python train.py --study) ----------


def study_grid(base, study, routes=STUDY_ROUTES, seeds=STUDY_SEEDS):
    """{(task, peft, control, route, seed): Config} of every run, each in its own folder under base.out
    (e.g. vqa-lora-mul-noprefix-s0). study: per-task options ({task: {option: value}})."""
    tasks = ("vqa", "caption") if base.text == "tiny" else (base.task,)
    grid = {}
    for task in tasks:
        for peft in STUDY_PEFTS:
            controls = {"full": {}, **(STUDY_CONTROLS if (task, peft) == STUDY_CONTROLLED else {})}
            for control, options in controls.items():
                for route in routes:
                    for seed in range(base.seed, base.seed + seeds):
                        name = f"{task}-{peft}-{route}{'' if control == 'full' else '-' + control}-s{seed}"
                        grid[task, peft, control, route, seed] = Config(**{
                            **dataclasses.asdict(base), **study.get(task, {}), **options, "task": task, "peft": peft,
                            "route": route, "seed": seed, "out": os.path.join(base.out, name)})
    return grid


def final_record(out):
    """The final evaluation a run wrote (the last line of OUT/metrics.jsonl, marked final), or None."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    record = json.loads(lines[-1]) if lines else {}
    return record if record.get("final") else None


def check_same_run(cfg):
    """A folder the study would reuse must hold a run with the same options."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        theirs = json.load(f)
    ours = dataclasses.asdict(cfg)
    diff = [k for k in ours if k not in STUDY_FREE and theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"{cfg.out} holds a run with other options ({diff[0]}: {theirs.get(diff[0])!r}, the study "
                         f"wants {ours[diff[0]]!r}); remove it or choose another --out")


def run_study(base, study, routes=STUDY_ROUTES, seeds=STUDY_SEEDS):
    """Train every run of the grid that has not finished (an interrupted run resumes from its last.pt), then
    read each run's final metrics from its metrics.jsonl and write the table (study_table) to OUT/study.md.
    Returns (rows, the table's Markdown)."""
    if base.max_steps:
        raise ValueError("--study compares whole runs: it takes no --max-steps")
    grid = study_grid(base, study, routes, seeds)
    t0 = time.time()
    for k, cfg in enumerate(grid.values(), 1):
        check_same_run(cfg)
        name = os.path.basename(cfg.out)
        if final_record(cfg.out) is not None:
            print(f"[{k}/{len(grid)}] {name}: finished, skipped")
            continue
        print(f"[{k}/{len(grid)}] {name} ({time.time() - t0:.0f}s so far)")
        if os.path.isfile(os.path.join(cfg.out, "last.pt")):
            main(Config(resume=cfg.out, **{o: getattr(cfg, o) for o in RESUME_OVERRIDES}))
        else:
            main(cfg)
        if final_record(cfg.out) is None:
            raise RuntimeError(f"{cfg.out}: the run ended without its final evaluation (the study needs whole "
                               f"runs: no --max-steps)")
    records = {key: final_record(cfg.out) for key, cfg in grid.items()}
    rows = study_rows(records)
    table = study_table(rows, base, study, seeds)
    path = os.path.join(base.out, "study.md")
    write_text(table, path)
    print("\n" + table)
    print(study_summary(rows) + f"\nstudy: {len(grid)} runs in {base.out}, {time.time() - t0:.0f}s; table in {path}")
    return rows, table


def write_text(text, path):
    """Atomic write of a text file (data.atomic_write: a temporary file, then os.replace)."""
    data.atomic_write(path, lambda f: f.write(text), mode="w")


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def study_rows(records):
    """records {(task, peft, control, route, seed): final record} -> one row per (task, peft, control, route):
    {task, peft, control, route, seeds, params (set), metric: (mean, std), gain (relative to route none of the
    same task, peft and control, on the headline metric; None for none or without a none row)}, plus one
    text-only row per task (peft and control None)."""
    groups = defaultdict(list)
    for (task, peft, control, route, seed), r in records.items():
        groups[task, peft, control, route].append(r)
    rows = []
    for (task, peft, control, route), rs in groups.items():
        row = {"task": task, "peft": peft, "control": control, "route": route, "seeds": len(rs), "split": rs[0]["split"],
               "params": sorted({r["trainable_params"] for r in rs})}
        row.update({m: mean_std([r[m] for r in rs]) for m in STUDY_METRICS[task]})
        rows.append(row)
    for row in rows:
        head = STUDY_METRICS[row["task"]][0]
        none = next((r for r in rows if r["route"] == "none" and
                     (r["task"], r["peft"], r["control"]) == (row["task"], row["peft"], row["control"])), None)
        row["gain"] = (None if none is None or row is none or none[head][0] == 0
                       else (row[head][0] - none[head][0]) / none[head][0])
    for task in dict.fromkeys(k[0] for k in records):
        base = next(r["text_only"] for k, r in records.items() if k[0] == task)
        split = next(r["split"] for k, r in records.items() if k[0] == task)
        rows.append({"task": task, "peft": None, "control": None, "route": None, "seeds": 1, "params": [0], "split": split,
                     "gain": None, **{m: (base[m], 0.0) for m in STUDY_METRICS[task]}})
    return rows


def study_table(rows, base, study, seeds):
    """Markdown: one table per task, mean ± std over seeds; caption metrics x100 as in the paper."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        names = STUDY_METRICS[task]
        scale = 1 if task == "vqa" else 100
        epochs = study.get(task, {}).get("epochs", base.epochs)
        split = next(r["split"] for r in rows if r["task"] == task)
        out += [f"### {task}: {' / '.join(n + (' x100' if scale != 1 else '') for n in names)}, mean ± std over "
                f"{seeds} seed(s), {epochs} epoch(s), {split} split", "",
                "| peft | control | route | " + " | ".join(names) + " | trainable params | gain vs none |",
                "|---|---|---|" + "---:|" * (len(names) + 2)]
        for r in (r for r in rows if r["task"] == task):
            label = ("text-only baseline", "", "") if r["peft"] is None else (r["peft"], r["control"], r["route"])
            values = " | ".join(f"{scale * r[n][0]:.2f} ± {scale * r[n][1]:.2f}" if r["peft"] else f"{scale * r[n][0]:.2f}"
                                for n in names)
            params = "/".join(f"{p:,}" for p in r["params"]) if r["peft"] else "0"
            gain = "" if r["gain"] is None else f"{100 * r['gain']:+.1f} %"
            out.append(f"| {' | '.join(label)} | {values} | {params} | {gain} |")
        out.append("")
    out.append("Controls: full = x_R as visual prefix and routing input; noprefix = no visual prefix (routing is the "
               "image's only path); shuffled = x_R permuted across each batch in training and evaluation (a route "
               f"that still helps is not using the image). The controls run for {' + '.join(STUDY_CONTROLLED)} only. "
               "Gain: relative change of the first metric over route none of the same peft and control.")
    return "\n".join(out) + "\n"


def study_summary(rows):
    """A few plain lines: per (task, peft, control), route none, the best route and its gain; the text-only score."""
    lines = []
    for r in rows:
        head, scale = STUDY_METRICS[r["task"]][0], 1 if r["task"] == "vqa" else 100  # as in the table
        if r["peft"] is None:
            lines.append(f"{r['task']}: text-only baseline {head} {scale * r[head][0]:.2f}")
            continue
        if r["route"] != "none":
            continue
        group = [g for g in rows if (g["task"], g["peft"], g["control"]) == (r["task"], r["peft"], r["control"])]
        best = max(group, key=lambda g: g[head][0])
        lines.append(f"{r['task']} {r['peft']} {r['control']}: {head} none {scale * r[head][0]:.2f}, best "
                     f"{best['route']} {scale * best[head][0]:.2f}"
                     + (f" ({100 * best['gain']:+.1f} %)" if best["gain"] is not None else ""))
    return "\n".join(lines)


def evaluate_checkpoint(path, split, device="auto"):
    """Rebuild a run from its checkpoint (a file or run folder), regenerate the predictions for `split`
    and score them (python train.py --evaluate RUN --split SPLIT). The results file goes next to the checkpoint.
    Returns (metrics, path of results_{split}.json)."""
    ckpt = load_run(path)
    cfg = Config(**{**ckpt["config"], "device": device})
    task, model, _ = setup(cfg)
    if ckpt["answers"] != task.answers:
        raise ValueError(f"{run_file(path)}: the answer vocabulary of the data differs from the one it was trained with")
    load_trainable(model, ckpt["trainable"], run_file(path))
    if split not in task.splits:
        raise ValueError(f"split {split!r} not in this dataset (it has {sorted(task.splits)})")
    m, results = task.evaluate(model, split, cfg.batch_size)
    out = os.path.join(os.path.dirname(os.path.abspath(run_file(path))), f"results_{split}.json")
    metrics.write_json(results, out)
    return m, out


def error_line(e):
    """The one line the command line prints for an error. A DataLoader worker's error arrives wrapped
    with its traceback; its last line is the original error."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def cli(argv=None):
    """python train.py: bad input ends in one line "error: ..." (exit status 1; 2 for bad options), no traceback."""
    try:
        args = build_parser().parse_args(argv)
        if args.evaluate:
            m, path = evaluate_checkpoint(args.evaluate, args.split or "test", args.device or "auto")
            out = path[:-len(".json")] + ".metrics.json"
            metrics.write_json(m, out)
            print(json.dumps(m, indent=1) + f"\nwrote {path} and {out}")
            return m
        cfg, study = parse_command_line(argv)
        return main(cfg) if study is None else run_study(cfg, study)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {error_line(e)}")


if __name__ == "__main__":
    cli()
