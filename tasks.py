"""The tasks and their models: what each task reads, computes, is scored by and is compared with.

    python train.py                             # the VQA demo (tasks.VQA on a tiny ViT + RoBERTa)
    python train.py --task caption              # the captioning demo (tasks.Captioning, GPT-2)
    python train.py --task multitask            # CLIP-BART: GenerativeVQA, GQA, NLVR2, GenerativeCaptioning
    python train.py --task multitask --text tiny-t5   # the same on the demo's tiny T5 (CLIP-T5)

train.py builds a run from TASKS[--task] and runs the loop; this file knows nothing of the loop, the options'
parsing or the run folder. Top to bottom: `Task`, the interface the loop
calls (prepared splits, batches, loss, evaluation, text-only baseline, gallery examples); settings 1 and 2
(VQA as classification on RoBERTa, captioning on GPT-2) with their PEFT recipe and task models, after the block
that lists where we deliberately differ from the routing release; setting 3 (CLIP-BART and CLIP-T5, VL-Adapter's
and VL-PET's recipe: the visual embedding, VLSeq2Seq, the PEFT placements, the four generative tasks); TASKS.

A frozen image encoder gives, per example, the visual tokens (the text model's visual prefix, or BART's extra
encoder input) and the routing input x_R of every PEFT bottleneck; for the ViT settings both are the same
vector (by default the pooler output). The encoder is frozen, so its features are computed once and cached.
"""
import functools
import os
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as metrics
import models
import routing_peft as rp


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


# The decoding rules of the transformers each setting's release ran (models.beam_search): the routing release
# 4.29.2 (GPT-2), VL-PET and VL-Adapter 4.2.1 (BART).
RELEASE_RULES = {"gpt2": "4.29.2", "bart": "4.2.1", "t5": "4.2.1"}  # the releases' transformers


class Task:
    """One task of a run: its prepared splits, batches, loss, evaluation and a text-only baseline.
    A subclass sets name, archs (the text backbones it runs on), tiny (the demo's text backbone), headline
    (the metric names of log lines and tables) and dataset_class, and implements prepare, make_model,
    loss, predict, summary and text_only_baseline. loss(model, batch, step) -> (the batch's summed loss, the
    number of examples or tokens it sums over); what it draws itself (GenerativeVQA's target answers) is a
    function of (cfg.seed, step, each example's index), never of the process or micro-batch that holds the
    example (dropout, the model's, is seeded by train.step_seed)."""

    name, archs, tiny, headline, dataset_class = "", (), "", (), None
    vision = "vit"      # the image encoder's arch
    prompt = ""         # put before every question (the CLIP-BART tasks' prompts)
    batch_share = 1.0   # the task's batch size, as a share of cfg.batch_size
    vocab = None        # what the trained head depends on (the VQA answers): a checkpoint must match it
    split_names = {}    # the benchmark's name of a split where it differs ({"val": "dev"}): records and logs show it

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return data_dir

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return cfg.images or data_dir

    @classmethod
    def batch_of(cls, batch_size):
        """The task's examples per batch when the run's --batch-size is batch_size."""
        return max(1, int(batch_size * cls.batch_share))

    @property
    def batch_size(self):
        return self.batch_of(self.cfg.batch_size)

    @property
    def n_train(self):
        """The training examples an epoch visits (captions: every reference is one), at most cfg.train_limit."""
        n = len(self.dataset("train"))
        return min(n, self.cfg.train_limit) if self.cfg.train_limit else n

    def search(self, beams, max_new_tokens):
        """models.beam_search's keywords as the setting's release decoded: the checkpoint's generation defaults as
        its transformers applied them (models.generation_args), its length and stop rules, the limit, EOS."""
        return dict(models.generation_args(self.text_config, beams), max_new_tokens=max_new_tokens,
                    eos_id=self.tokenizer.eos_id, rules=RELEASE_RULES[self.text_config.arch])

    def __init__(self, cfg, data_dir, tokenizer, features, text_config):
        self.cfg, self.tokenizer, self.features, self.text_config = cfg, tokenizer, features, text_config
        prepared = self.prepare_data(data_dir)
        self.splits = prepared["splits"]
        self.vocab = prepared.get("answers")
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
    def evaluate(self, model, split, limit=0):
        """(metrics in eval.py's names, results in the official format) on a split (limit > 0: its first `limit` examples)."""
        if 0 < limit < len(self.splits[split]["image"]):  # a split of its own, "val[:500]"
            name = f"{split}[:{limit}]"
            self.splits[name], split = data.first_rows(self.splits[split], limit), name
        model.eval()
        try:
            return self.predict(model, split)
        finally:
            model.train()

    def ordered_batches(self, split):
        """The collated batches of a split in order (evaluation), with a progress bar."""
        ds = self.dataset(split)
        batches = self.eval_batches(len(ds))
        return data.progress(self.loader(ds, batches), f"evaluate {self.name} {split}", "batch", len(batches))

    def eval_batches(self, n):
        """Indices 0..n-1 in batches of --eval-batch-size, else the training batch's (VL-PET's val and test loaders)."""
        size = self.cfg.eval_batch_size or self.batch_size
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def output_warning(self, results, split):
        """[a line] when every prediction (a results entry's last field in every official format) is empty, or all
        are the same (two or more): a tokenizer or checkpoint that does not fit, or a collapsed run. Else []."""
        seen = {str(list(r.values())[-1]).strip() for r in results}
        what = "empty" if seen == {""} else f"the same, {min(seen)!r}" if len(seen) == 1 < len(results) else ""
        return [f"warning: {self.name}: all {len(results):,} {self.split_names.get(split, split)} predictions are {what} (a tokenizer or "
                f"checkpoint that does not fit, or a collapsed run?)"] if what else []

    def write_results(self, results, folder, split):
        path = os.path.join(folder, f"results_{self.name}_{split}.json")
        metrics.write_json(results, path)
        return path


class VQA(Task):
    """VQAv2 as answer classification (setting 1): the text model reads [visual prefix; <s> question </s>], an
    MLP on the final hidden state at the prefix position scores K answers; BCE with logits against the
    official soft scores (summed over answers); prediction = argmax; the official VQA accuracy."""

    name, archs, tiny, headline, dataset_class = "vqa", ("roberta",), "roberta", ("vqa_accuracy",), data.VQADataset

    def prepare_data(self, data_dir):
        """{"splits", "answers"}: the tokenised splits and the answer vocabulary (data.prepare_vqa, cached)."""
        karpathy = os.path.join(data_dir, data.KARPATHY)
        split = self.cfg.vqa_split
        if split == "auto":
            split = "karpathy" if os.path.isfile(karpathy) else "official"
            print(f"vqa: {split} split ({'by ' + karpathy if split == 'karpathy' else 'train2014 / val2014'})")
        return data.prepare_vqa(data_dir, self.tokenizer, karpathy if split == "karpathy" else None, self.cfg.answers,
                                self.cfg.max_len, os.path.join(self.cfg.cache, "prepared"), self.prompt)

    def collate(self, items):
        return data.collate_vqa(items, self.tokenizer.pad_id, len(self.vocab))

    def make_model(self, text, d_visual):
        """The frozen text model with PEFT layers and the answer head; (model, its other trainable modules)."""
        extra = add_peft(self.cfg, text)
        model = VQAModel(text, d_visual, len(self.vocab), self.cfg.prefix)
        return model, ["head"] + extra + ["visual"] * (model.visual.proj is not None)

    def loss(self, model, batch, step):
        """(sum over the batch of the BCE summed over answers, number of examples)."""
        ids, mask = batch["input_ids"].to(self.features.device), batch["attention_mask"].to(self.features.device)
        logits = model(ids, mask, *self.features(batch))  # (B, K)
        targets = batch["targets"].to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum"), len(ids)

    def predict(self, model, split):
        """Argmax answers. A question's accuracy is its soft target for that answer, which data.py computed
        with eval.vqa_accuracy: the official per-question accuracy exactly."""
        results, acc = [], []
        for batch in self.ordered_batches(split):
            device = self.features.device
            with self.features.autocast():
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

    def __init__(self, *args):
        super().__init__(*args)
        self.references = {}  # split -> PTB-tokenised references (refs)

    def prepare_data(self, data_dir):
        """{"splits"}: the tokenised Karpathy splits (data.prepare_captions, cached)."""
        return data.prepare_captions(os.path.join(data_dir, data.KARPATHY), self.tokenizer, self.cfg.max_len,
                                     os.path.join(self.cfg.cache, "prepared"))

    def collate(self, items):
        return data.collate_caption(items, self.tokenizer.eos_id)

    def make_model(self, text, d_visual):
        extra = add_peft(self.cfg, text)
        model = CaptionModel(text, d_visual, self.cfg.prefix, self.tokenizer.bos_id)
        return model, extra + ["visual"] * (model.visual.proj is not None)

    def loss(self, model, batch, step):
        """(summed cross-entropy over the supervised tokens, their number)."""
        device = self.features.device
        logits = model(batch["input_ids"].to(device), *self.features(batch))  # (B, N, V)
        labels = batch["labels"].to(device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        return loss, int((labels != -100).sum())

    def predict(self, model, split):
        """Beam search (cfg.beams) on every image of the split, scored against its references."""
        keys, ids = self.splits[split]["image"], self.splits[split]["image_id"].tolist()
        batches = self.eval_batches(len(keys))
        if self.features.pixels is None:
            loader = ({"image": [keys[j] for j in b]} for b in batches)
        else:  # images decoded by DataLoader workers, the ViT run per batch
            loader = self.loader(data.ImageDataset(keys, self.features.pixels), batches, collate=torch.utils.data.default_collate)
        captions = {}
        for b, batch in zip(batches, data.progress(loader, f"evaluate {self.name} {split}", "batch", len(batches))):
            with self.features.autocast():
                captions.update(zip([ids[j] for j in b], self.generate(model, batch)))
        return metrics.caption_scores(self.refs(split), captions), [{"image_id": k, "caption": c} for k, c in captions.items()]

    def generate(self, model, batch):
        out = model.generate(*self.features(batch), **self.search(self.cfg.beams, self.cfg.max_new_tokens))
        return [self.tokenizer.decode(t, skip_special=True).strip() for t in out]

    def refs(self, split):
        """{image id: PTB-tokenised references} of a split, made once."""
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
# - Adapters start at the frozen model (W_up = 0, SPEC); the release's start N(0, 0.02) on both projections
#   (HF 4.29.2's init of new Linears), which with add_res=False means its RoBERTa starts far from pretrained.
# - (Not ours, but a reader should know: the released RoBERTa scripts pass --use_vllora, which is no option of
#   train_vit_roberta.py, and not --use_routing, so as released they train plain LoRA / Adapters.)


def add_peft(cfg, text, name="text", low_rank=("attn.q", "attn.v")):
    """cfg.peft's layers in the frozen text model: LoRA (routed by cfg.route) or xattn on `low_rank`, else Houlsby's
    adapters. Returns what else it trains: the blocks' LayerNorms; bitfit every bias; full all of `name` (patterns)."""
    if cfg.peft == "bitfit" and not any(n.endswith(".bias") for n, _ in text.named_parameters()):
        raise ValueError(f"--peft bitfit trains the backbone's biases; {text.config.arch} has none (LST's BitFit adds them)")
    if cfg.peft in ("full", "bitfit"):
        return [name] if cfg.peft == "full" else ["bias"]
    if cfg.peft == "xattn":
        rp.add_cross_attention_lora(text, low_rank, cfg.rank, cfg.alpha, dropout=cfg.dropout)
    elif cfg.peft == "lora":
        rp.add_lora(text, low_rank, cfg.rank, cfg.alpha, cfg.route, cfg.dropout)
    else:  # with the backbone's own activation
        rp.add_adapters(text, ["attn.o", "mlp.fc2"], cfg.rank, cfg.route, nn.GELU(approximate=text.config.gelu))
    return ["ln1", "ln2"] if cfg.train_ln else []


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
    def generate(self, visual, x_R, beams, **search):
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
            return models.beam_search(step, B, k, **search)


# ---- the CLIP-BART setting: VQAv2, GQA, NLVR2 and COCO captions, generative, on one BART (or T5) ----------
#
# VL-Adapter's recipe, which VL-PET uses too (CLIPBART_NOTES.md in the README's references): CLIP RN101 grid
# features (36 tokens an image) through a trainable visual embedding, appended after the text tokens of the
# BART encoder; task prompts; every task generative. The routing paper did not release this setting, so
# where routing sits is OUR design: x_R = the mean of the embedded visual tokens (or all of them, --visual
# patches, for matmul), the same vector for every routed layer of encoder and decoder.
#
# Where we differ from VL-PET's release (HenryHZY/VL-PET @ 7430cad; transformers 4.2.1), one line each, with
# the expected size of the effect:
# - VQA accuracy is the official evaluation at HEAD (vqaEval.py @ a013f00); the release scores with its 2016
#   version (src/vqa_clip_data.py: the prediction always normalised, the human answers only punctuation-
#   processed). Per question ours >= the release's, higher only when a human answer is not in normal form
#   ("two", "a dog", capitals) and the match count falls below 4 because of it; not measurable here.
# - The first warm-up step: the release's LambdaLR runs optimizer step 1 at lr 0; ours at lr / warm-up steps
#   (one of ~8,800 warm-up steps at full size).
# - Every task's last partial batch of an epoch is dropped (the release keeps it): at most one batch less a task
#   an epoch, 0.08 % of VQA's 605k questions; every step then has the same batch, exact under DDP.
# - The data order comes from (seed, epoch); the release's from the epoch alone (seed 0), so its seeds differ
#   only in initialisation, dropout and the VQA targets drawn.
# - The answer vocabulary: the 3,129 most frequent normalised human answers of the training split, a human
#   answer matched after normalisation (data.AnswerVocab); the release's LXMERT labels (bottom-up-attention's
#   compute_softscore.py: normalised consensus answers of >= 9 questions over train2014 + val2014, raw human
#   strings matched exactly). The score of m matches is the same (0.3, 0.6, 0.9, 1); the sets and the matching
#   differ only for answers not in normal form; not measurable without VQAv2 here.
# - VL-PET-small's gate averages over every token, padding included, as the release: a prediction depends on
#   its batch. The release evaluates with the training batches (VQA 500, GQA 833, NLVR2 166, captions 416) in
#   file order, as the multitask presets do (--eval-batch-size left unset: each task's training batch).
# On T5 (T5_NOTES.md; VL-PET's T5 scripts, LoRA and VL-Adapter as Ladder-Side-Tuning's) we follow the T5 path:
# - no BOS, decoding from <pad>; NLVR2 reads decoder position 0 after [<pad>] (BART: 1 after [</s>, <s>]).
# - the visual embedding's norms are RMS norms; nothing added is re-initialised (HF T5's init skips Linear and
#   Embedding): nn.Linear's init, the image-order and the 72 new token rows N(0, 1), VL-Adapter's W_up not zero.
# - VL-PET: every encoder module's output x 0.3; W_up, the gates' last layers and the decoder's value adapters'
#   W_up (r 96: --rank-dec) start at 0, so at step 0 each encoder sub-layer's output is x 0.15 (middleY 0.3).
# - VL-Adapter trains no norm: --unfreeze_layer_norms tests isinstance against transformers' T5LayerNorm, not
#   the copied class the model uses (7.98 % counts none); VL-PET's by-name rule trains the encoder's.
# - Ours: a v1.1 head of its own gains nn.Linear-initialised rows (the releases ran t5-base only).


def init_as_bart_release(*modules):
    """HF BART's _init_weights, which the releases' last init_weights() call (VL-T5 src/modeling_bart.py, the end of
    VLBart.__init__) applies to every module it adds: Linear and Embedding weights N(0, 0.02), Linear biases 0;
    LayerNorms keep 1 / 0."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


class VisualEmbedding(nn.Module):
    """VL-Adapter's visual embedding (VL-T5 src/modeling_{bart,t5}.py VisualEmbedding, CLIP features): per token
    LN(W_f feat) + LN(W_p box) + the image-order embedding (image 0 or 1 of an NLVR2 pair) + the object-order embedding
    (the frozen token table at row V - 1 - k for token k of an image); LN the backbone's (BART LayerNorm, T5 RMS norm).
    CLIP grids have no boxes: VL-Adapter feeds zeros, so the box term is a learned constant (kept for the counts)."""

    def __init__(self, d_visual, config):
        super().__init__()
        d, t5 = config.d_model, config.arch == "t5"
        norm = functools.partial(models.RMSNorm if t5 else nn.LayerNorm, d, config.ln_eps)
        self.feat = nn.Sequential(nn.Linear(d_visual, d), norm())
        self.box = nn.Sequential(nn.Linear(5, d), norm())
        self.image_order = nn.Embedding(2, d)
        if not t5:
            init_as_bart_release(self)

    def forward(self, visual, n_images, token_table):
        """visual (B, n_images * L, d_visual), token_table (V, d) -> (B, n_images * L, d)."""
        B, T, _ = visual.shape
        k = torch.arange(T // n_images, device=visual.device).repeat(n_images)  # (T,): token k of its image
        image = torch.arange(n_images, device=visual.device).repeat_interleave(T // n_images)  # (T,)
        x = self.feat(visual) + self.box(visual.new_zeros(B, T, 5)) + self.image_order(image)
        return x + token_table[token_table.shape[0] - 1 - k].to(x.dtype)


class VLSeq2Seq(nn.Module):
    """Frozen BART or T5 with PEFT layers reading [prompt + text (with the tokenizer's specials); visual tokens]
    (VL-T5's VLBart and VLT5). Its frozen token table holds `rows`: VL-T5's tokenizer's, 200 added to the pieces
    (<extra_id_k>, which T5's tokenizer has, <vis_extra_id_k>: the last 36 are the object-order embeddings)."""

    def __init__(self, backbone, d_visual, prefix, all_tokens, rows):
        super().__init__()
        backbone.resize_token_table(rows, 0.02 if backbone.config.arch == "bart" else 1.0)  # as the releases init
        self.backbone, self.prefix, self.all_tokens = backbone, prefix, all_tokens
        self.visual = VisualEmbedding(d_visual, backbone.config)

    def encode(self, input_ids, attention_mask, visual, n_images):
        """-> (encoder states (B, N + L, d), their mask, x_R (B, 1, d) or (B, L, d))."""
        v = self.visual(visual, n_images, self.backbone.wte.weight)  # (B, L, d)
        x_R = v if self.all_tokens else v.mean(1, keepdim=True)
        with rp.visual_context(self.backbone, x_R):
            memory, mask = self.backbone.encode(input_ids, attention_mask, v if self.prefix else None)
        return memory, mask, x_R

    def forward(self, input_ids, attention_mask, visual, decoder_input_ids, n_images=1):
        """Teacher forcing: logits (B, T, V) of decoder_input_ids."""
        memory, mask, x_R = self.encode(input_ids, attention_mask, visual, n_images)
        with rp.visual_context(self.backbone, x_R):
            return self.backbone.decode(decoder_input_ids, memory, mask)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, visual, n_images=1, *, beams, **search):
        """Token ids per example: models.beam_search(**search) over the decoder (beams 1: greedy)."""
        memory, mask, x_R = self.encode(input_ids, attention_mask, visual, n_images)
        def per_beam(t):
            return None if t is None else t.repeat_interleave(beams, dim=0)  # (B, ...) -> (B * k, ...)
        with rp.visual_context(self.backbone, per_beam(x_R)):
            return models.beam_search(self.backbone.beam_step(per_beam(memory), per_beam(mask)), len(memory), beams,
                                      **search)


VLPET_GATES = {"vlpet-large": "large", "vlpet-middlex": "middleX", "vlpet-middley": "middleY", "vlpet-small": "small"}
VLPET_T5_SCALE = 0.3  # every T5 script of VL-PET: --encoder_gating_scaling_factor 0.3


def add_peft_vl(cfg, model):
    """The PEFT layers of cfg.peft into BART or T5 where their releases put them; returns what else they train (VL-PET
    src/trainer_base.py unfreeze_parameters; norms only if cfg.train_ln; T5: the deviation block): LoRA on q, v of every
    attention (and xattn, ours) every bias and BART's decoder final_layer_norm (ln2); VL-Adapter (gelu_new) every
    nn.LayerNorm (none of T5's); VL-PET (gate rank = rank; the decoder's value adapters r = rank_dec or rank) the
    encoder's norms; bitfit (--unfreeze_bias) and full (--unfreeze_language_model) as add_peft."""
    t5 = model.config.arch == "t5"
    def norms(types):
        return [n for n, m in model.named_modules() if isinstance(m, types) and cfg.train_ln]  # e.g. decoder.blocks.0.ln2
    if cfg.peft in ("lora", "xattn", "bitfit", "full"):  # bitfit, full: the same sets in every setting
        extra = add_peft(cfg, model, "backbone", ["attn.q", "attn.v", "cross.q", "cross.v"])
        if cfg.peft in ("bitfit", "full"):
            return extra
        return ["bias"] + [n for n in norms(nn.LayerNorm) if n.startswith("decoder.") and n.endswith(".ln2")]
    if cfg.peft == "adapter":  # neither release zero-initialises W_up
        rp.add_adapters(model, ["attn.o", "cross.o", "mlp.fc2"], cfg.rank, cfg.route, nn.GELU(approximate="tanh"))
        adapters = [m for m in model.modules() if isinstance(m, rp.Adapter)]
        if t5:
            for a in adapters:
                a.up.reset_parameters()  # nn.Linear's init
        else:
            init_as_bart_release(*(getattr(a, w) for w in ("down", "up") for a in adapters))
        return norms(nn.LayerNorm)
    rp.add_vlpet(model.encoder, ["attn", "mlp"], VLPET_GATES[cfg.peft], cfg.rank, cfg.route, zero_init=t5,
                 gate_r=cfg.rank if cfg.peft == "vlpet-large" else None, scale=VLPET_T5_SCALE if t5 else 1.0)
    rp.add_parallel_adapters(model.decoder, ["cross.v"], cfg.rank_dec or cfg.rank, cfg.route, zero_init=t5)
    return [n for n in norms((nn.LayerNorm, models.RMSNorm)) if n.startswith("encoder.")]


CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # transformers' clean_up_tokenization, in its order


class Generative(Task):
    """What the four CLIP-BART tasks share: BART (T5) reads <s> prompt + text </s> (no <s>) and the visual tokens and
    generates the answer from the decoder start </s> (<pad>); the loss is each example's token-mean cross-entropy
    (times the target's weight), averaged over the batch (VL-PET src/{vqa,gqa,nlvr}_model.py)."""

    archs, tiny, vision, prompt, n_images = ("bart", "t5"), "bart", "clip_resnet", "", 1
    answer_tokens = 19  # the releases' greedy max_length 20 counts the decoder start

    @property
    def start_id(self):
        return self.text_config.decoder_start_id  # BART: </s>, T5: <pad>

    def make_model(self, backbone, d_visual):
        extra = add_peft_vl(self.cfg, backbone)
        rows = len(self.tokenizer) + 200 - data.T5_EXTRA_IDS * isinstance(self.tokenizer, data.SentencePieceTokenizer)
        return VLSeq2Seq(backbone, d_visual, self.cfg.prefix, self.cfg.visual == "patches", rows), ["visual"] + extra

    def collate(self, items):
        return data.collate_prompted(items, self.tokenizer.pad_id, self.start_id)

    def inputs(self, batch):
        device = self.features.device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), self.features(batch)[0]

    def targets(self, batch, step):
        """(decoder inputs (B, T), labels (B, T), weights (B,) or None) of a training batch at optimizer step `step`."""
        return batch["decoder_input_ids"], batch["labels"], None

    def loss(self, model, batch, step):
        decoder_input_ids, labels, weight = self.targets(batch, step)
        logits = model(*self.inputs(batch), decoder_input_ids.to(self.features.device), self.n_images)  # (B, T, V)
        labels = labels.to(logits.device)
        ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # (B, T), 0 where -100
        per_example = ce.sum(1) / (labels != -100).sum(1)
        if weight is not None:
            per_example = per_example * weight.to(per_example.device)
        return per_example.sum(), len(per_example)

    def answers(self, model, split):
        """The decoded answer of every example of the split, in order: greedy (with the checkpoint's n-gram
        blocking, which the releases' greedy search applied too), at most answer_tokens."""
        out = []
        for batch in self.ordered_batches(split):
            with self.features.autocast():
                ids = model.generate(*self.inputs(batch), self.n_images, **self.search(1, self.answer_tokens))
            out += [self.decode(t) for t in ids]
        return out

    def decode(self, ids):
        """Generated ids -> text, without special tokens and the 200 added ones, cleaned up as the releases'
        batch_decode did by default (transformers 4.2.1 clean_up_tokenization: " ." -> "." etc.)."""
        text = self.tokenizer.decode([i for i in ids if i < len(self.tokenizer)], skip_special=True)
        for spaced, joined in CLEAN_UP:
            text = text.replace(spaced, joined)
        return text.strip()


class GenerativeVQA(Generative, VQA):
    """VQAv2 (Karpathy split), generative: the target is one answer drawn in proportion to its soft score, the
    loss weighted by that score; greedy decoding scored with the official VQA accuracy."""

    prompt = "vqa: "

    collate = VQA.collate

    @functools.cached_property
    def vocab_tokens(self):
        """Each answer of the vocabulary as a target (<s> answer </s>), at most 10 tokens with the special ones
        (the release's max_length=10, truncation=True: src/vqa_clip_data.py)."""
        keep = 10 - len(self.tokenizer.wrap([]))
        return [torch.tensor(self.tokenizer.wrap(self.tokenizer.encode(a)[:keep])) for a in self.vocab]

    def targets(self, batch, step):
        """One answer per question, drawn in proportion to its soft scores by the question's own number
        example_uniform(seed, step, index) (the same in any process or micro-batch, and on resume), and its score."""
        scores = batch["targets"]  # (B, K)
        empty = scores.sum(1) == 0  # no answer in the vocabulary: weight 0
        cum = scores.masked_fill(empty[:, None], 1.0).double().cumsum(1)  # (B, K)
        u = example_uniform(self.cfg.seed, step, batch["index"])  # (B,), at most 1 - 2^-52: u * total < total
        pick = (cum <= u[:, None] * cum[:, -1:]).sum(1)  # (B,): the first answer whose cumulative score passes u * total
        weight = scores.gather(1, pick[:, None])[:, 0]
        return (*data.seq2seq_targets([self.vocab_tokens[i] for i in pick.tolist()], self.start_id, self.tokenizer.pad_id), weight)

    def predict(self, model, split):
        s = self.splits[split]
        preds = self.answers(model, split)
        acc = [metrics.vqa_accuracy(p, answers) for p, answers in zip(preds, s["answers"])]
        results = [{"question_id": q, "answer": p} for q, p in zip(s["question_id"].tolist(), preds)]
        return metrics.vqa_aggregate(acc, s["answer_type"]), results


def example_uniform(seed, step, index):
    """A number in [0, 1 - 2^-52] per example, a fixed function of (seed, step, the example's index (B,)):
    SplitMix64's mixing function (Steele, Lea & Flood, OOPSLA 2014) after adding each of the three in turn, the
    top 52 bits. Unlike a generator's stream, an example's number does not depend on the examples drawn before
    it, so not on which process or micro-batch holds it."""
    x = np.zeros(len(index), dtype=np.uint64)
    for key in (seed % 2**64, step, index.numpy().astype(np.uint64)):
        x = x + key + 0x9E3779B97F4A7C15  # uint64 arithmetic wraps around, as SplitMix64 needs
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        x = x ^ (x >> 31)
    return torch.from_numpy((x >> 12).astype(np.float64) * 2.0 ** -52)


class GQA(Generative):
    """GQA (balanced; train = train + val, evaluation on testdev, as VL-PET): exact-match accuracy."""

    name, headline, dataset_class, prompt = "gqa", ("gqa_accuracy",), data.PromptDataset, "gpa: "  # VL-PET's typo
    split_names = {"val": "testdev", "test": "testdev"}  # no GQA val: it is trained on; every epoch scores testdev
    batch_share = 100 / 60  # VL-PET's per-task batch sizes (src/multitask.py): VQA 500, GQA 833, NLVR2 166, captions 416

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return cfg.gqa or os.path.join(data_dir, "gqa")

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return os.path.join(cls.data_folder(cfg, data_dir), "images")

    def __init__(self, cfg, gqa_dir, *args):
        super().__init__(cfg, gqa_dir, *args)
        # the official testdev file, read once: eval.gqa_scores reads its types, programs and isBalanced
        self.questions = metrics.read_gqa_questions(os.path.join(gqa_dir, "questions1.2", data.GQA_QUESTIONS.format("testdev")))

    def prepare_data(self, gqa_dir):
        """{"splits"}: train (GQA's train + val) and testdev as both val and test (data.prepare_gqa, cached)."""
        p = data.prepare_gqa(gqa_dir, self.tokenizer, self.prompt, self.cfg.max_len, os.path.join(self.cfg.cache, "prepared"))
        return {"splits": {"train": p["train"], "val": p["testdev"], "test": p["testdev"]}}

    def predict(self, model, split):
        preds = dict(zip(self.splits[split]["question_id"], self.answers(model, split)))
        return metrics.gqa_scores(preds, {q: self.questions[q] for q in preds}), \
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
        overall, s = Counter(self.splits["train"]["answer"]), self.splits[split]
        preds = {i: most_frequent(prior.get(qtype(q)) or overall) for i, q in zip(s["question_id"], s["question"])}
        return metrics.gqa_scores(preds, self.questions)

    def examples(self, results, split, n=8):
        s = self.splits[split]
        return [{"images": [self.features.path(k)], "text": q, "prediction": r["prediction"], "truth": a}
                for k, q, a, r in zip(s["image"][:n], s["question"], s["answer"], results)]


class NLVR2(Generative):
    """NLVR2: two images, a statement; the target text is "true" or "false"; the prediction compares the two
    words' logits at the first decoded position after BART's [</s>, <s>] (T5's [<pad>]: position 0; VL-PET
    src/nlvr_model.py). Accuracy and consistency as lil-lab/nlvr's metrics.py."""

    name, headline, dataset_class, prompt, n_images = "nlvr2", ("nlvr2_accuracy",), data.PromptDataset, "nlvr: ", 2
    batch_share, split_names = 20 / 60, {"val": "dev", "test": "test1"}

    @classmethod
    def data_folder(cls, cfg, data_dir):
        return cfg.nlvr2 or os.path.join(data_dir, "nlvr2")

    @classmethod
    def images_folder(cls, cfg, data_dir):
        return cls.data_folder(cfg, data_dir)

    def prepare_data(self, nlvr2_dir):
        """{"splits"}: train, dev as val, test1 as test (data.prepare_nlvr2, cached)."""
        p = data.prepare_nlvr2(nlvr2_dir, self.tokenizer, self.prompt, os.path.join(self.cfg.cache, "prepared"))
        return {"splits": {"train": p["train"], "val": p["dev"], "test": p["test1"]}}

    @functools.cached_property
    def words(self):
        """The token ids of "false" and "true" whose logits the prediction compares."""
        return [self.tokenizer.encode(w)[0] for w in ("false", "true")]

    def predict(self, model, split):
        preds = []
        start = torch.tensor([[self.start_id] + self.tokenizer.wrap([])[:-1]])  # (1, T): BART </s> <s>, T5 <pad>
        for batch in self.ordered_batches(split):
            ids, mask, visual = self.inputs(batch)
            with self.features.autocast():
                logits = model(ids, mask, visual, start.expand(len(ids), -1).to(ids.device), self.n_images)[:, -1]
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
        """The most frequent training label of the same sentence, else of all sentences (ties: false)."""
        train, s, prior = self.splits["train"], self.splits[split], defaultdict(Counter)
        for sentence, y in zip(train["sentence"], train["label"].tolist()):
            prior[sentence][y] += 1
        overall = Counter(train["label"].tolist())
        return self.scores(s, [most_frequent(prior.get(x) or overall) for x in s["sentence"]])

    def examples(self, results, split, n=8):
        s = self.splits[split]
        return [{"images": [self.features.path(k) for k in keys], "text": x, "prediction": r["prediction"],
                 "truth": str(bool(y))} for keys, x, y, r in zip(s["image"][:n], s["sentence"], s["label"].tolist(), results)]


class GenerativeCaptioning(Generative, Captioning):
    """COCO captions (Karpathy): the input is the prompt alone, the target one caption (every reference is an
    example); the loss is the token mean over the batch; beam search (cfg.beams, cfg.max_new_tokens)."""

    prompt, batch_share = "caption: ", 50 / 60

    def prepare_data(self, data_dir):
        """{"splits"}: the Karpathy splits, captions up to max_new_tokens - 1 tokens (data.prepare_captions, cached)."""
        return data.prepare_captions(os.path.join(data_dir, data.KARPATHY), self.tokenizer,
                                     self.cfg.max_new_tokens - 1, os.path.join(self.cfg.cache, "prepared"))

    @functools.cached_property
    def prompt_ids(self):
        """The encoder input of every example: <s> caption: </s>."""
        return torch.tensor(self.tokenizer.wrap(self.tokenizer.encode(self.prompt)))

    def collate(self, items):
        B = len(items)
        decoder_input_ids, labels = data.seq2seq_targets([self.tokenizer.wrap(i["input_ids"].tolist()) for i in items],
                                                         self.start_id, self.tokenizer.pad_id)
        out = {"input_ids": self.prompt_ids.expand(B, -1), "attention_mask": torch.ones(B, len(self.prompt_ids), dtype=torch.long),
               "decoder_input_ids": decoder_input_ids, "labels": labels, "image": [i["image"] for i in items]}
        if "pixel_values" in items[0]:
            out["pixel_values"] = torch.stack([i["pixel_values"] for i in items])
        return out

    def loss(self, model, batch, step):
        """(summed cross-entropy over every target token of the batch, their number): a token mean."""
        logits = model(*self.inputs(batch), batch["decoder_input_ids"].to(self.features.device))
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum"), int((labels != -100).sum())

    def generate(self, model, batch):
        B, device = len(batch["image"]), self.features.device
        ids, mask = self.prompt_ids.expand(B, -1).to(device), torch.ones(B, len(self.prompt_ids), dtype=torch.long, device=device)
        out = model.generate(ids, mask, self.features(batch)[0], **self.search(self.cfg.beams, self.cfg.max_new_tokens))
        return [self.decode(t) for t in out]


TASKS = {"vqa": (VQA,), "caption": (Captioning,),  # --task: the tasks trained together, on one model
         "multitask": (GenerativeVQA, GQA, NLVR2, GenerativeCaptioning)}


# ---- scoring the tasks of a run -------------------------------------------------------------------------

X100 = {"CIDEr": 100, "Bleu_4": 100}  # shown x100, as papers report them


def headline(record, tasks):
    """A record's headline metrics as in papers (% and x100), each with its benchmark split if not the record's."""
    where = {t: "" if s == record["split"] else f" ({s})" for t, s in record["task_split"].items()}
    return ", ".join(f"{n} {record[n] * X100.get(n, 1):.2f}{where[t.name]}" for t in tasks for n in t.headline)


def add_metrics(record, scored):
    """Each task's metrics into a record: nested under the task's name, its headline values flat; "task_split": the
    benchmark's split it was scored on ({"gqa": "testdev", ...}); "examples": how many examples its scores are over
    (captions: images); "warnings": broken outputs (Task.output_warning)."""
    for task, (m, results) in scored.items():
        record.update(task.summary(m), **{task.name: m})
        record.setdefault("task_split", {})[task.name] = task.split_names.get(record["split"], record["split"])
        record.setdefault("examples", {})[task.name] = len(results)
        record.setdefault("warnings", []).extend(task.output_warning(results, record["split"]))


def write_results(out, scored, split):
    """OUT/results_{task}_{split}: each task's predictions in its benchmark's official format."""
    for task, (_, results) in scored.items():
        task.write_results(results, out, split)
