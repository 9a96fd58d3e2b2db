"""The frozen backbones, written from scratch: ViT (image encoder), RoBERTa (text encoder), GPT-2
(text decoder), BART (encoder-decoder) and CLIP's ModifiedResNet (RN50 / RN101 image encoder), plus the
one-time conversion of public checkpoints into plain state dicts.

    python models.py convert --src DIR --out FILE.pt             # DIR: a Hugging Face model directory
    python models.py convert --src RN101.pt --out clip-rn101.pt  # a CLIP weights file (OpenAI key names)
    python models.py convert --help                              # the formats, how RN101.pt is read

DIR holds config.json and model.safetensors (or pytorch_model.bin), plus vocab.json/merges.txt for
the text models and preprocessor_config.json for ViT. The output is one plain dict
{"arch", "config", "model": state_dict, "tokenizer": {"vocab", "merges"}} that `load_checkpoint`
reads back with torch.load(weights_only=True).

Every transformer has the same module tree, so PEFT code can target layers by name:
    model.blocks[i].attn.{q,k,v,o}   nn.Linear     (BART: model.encoder.blocks[i], model.decoder.blocks[i])
    model.blocks[i].mlp.{fc1,fc2}    nn.Linear
    model.blocks[i].ln1, .ln2        nn.LayerNorm
    BART decoder blocks add cross-attention: .cross.{q,k,v,o} (k, v read the encoder states) and .ln_cross.
ViT and GPT-2 are pre-LN, RoBERTa and BART post-LN; each keeps its own numerics (GELU flavour,
LayerNorm eps, RoBERTa's and BART's position offsets). The CLIP ResNet keeps OpenAI's module names.
"""
import argparse
import dataclasses
import json
import math
import mmap
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval import atomic_write  # the project's one atomic file writer (pure standard library)


@dataclass
class Config:
    arch: str                  # "vit" | "roberta" | "gpt2" | "bart" | "clip_resnet"
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    ln_eps: float              # LayerNorm eps: ViT 1e-12, RoBERTa and GPT-2 1e-5
    vocab_size: int = 0        # text models
    max_positions: int = 0     # text models: rows of the position table (RoBERTa: 514 = 512 + pad offset)
    pad_id: int = 1            # RoBERTa padding_idx: position ids start at pad_id + 1
    type_vocab_size: int = 1   # RoBERTa token-type table (we always use type 0)
    image_size: int = 224      # ViT
    patch_size: int = 16       # ViT
    image_mean: tuple = (0.5, 0.5, 0.5)  # ViT preprocessing, read by data.py
    image_std: tuple = (0.5, 0.5, 0.5)
    dropout: float = 0.0       # train-mode dropout on embeddings, attention probabilities and residual
                               # branches, as in Hugging Face (RoBERTa/GPT-2 checkpoints: 0.1, ViT: 0.0);
                               # BART also on the FFN activation (VL-PET sets all three BART dropouts to 0.1)
    # Fields added for BART and CLIP (at the end, with defaults, so older converted files still load):
    scale_embedding: bool = False      # BART: token embeddings x sqrt(d_model) (bart-base/large: False)
    decoder_start_id: int = 2          # BART: the decoder's first input token (</s>, decoder_start_token_id)
    image_resample: str = "bilinear"   # resize filter for data.preprocess: ViT bilinear (HF's processor),
                                       # CLIP bicubic (VL-Adapter's feature extraction)
    stages: tuple = ()                 # CLIP ModifiedResNet: Bottleneck blocks per stage (RN101: 3, 4, 23, 3)
    output_dim: int = 0                # CLIP ModifiedResNet: width of the attention pool's output
    # Generation defaults that config.json carries (read as transformers 4.2.1 read them; the tasks decide
    # which to apply: generation_args turns them into beam_search's keywords):
    num_beams: int = 1                 # the checkpoint's default beam count (bart-base: 4)
    no_repeat_ngram: int = 0           # no_repeat_ngram_size (bart-base: 3; 0 = off)
    early_stopping: bool = False       # stop a row once it holds num_beams ended hypotheses (bart-base: true)

    @property
    def gelu(self):
        """The backbone's GELU, for its FFN and for anything inserted into it (an Adapter's activation):
        "tanh" (GPT-2's gelu_new) or "none" (the exact erf GELU of ViT and RoBERTa)."""
        return "tanh" if self.arch == "gpt2" else "none"


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP clip/clip.py _transform
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PRESETS = {
    "vit-b16": Config("vit", 768, 12, 12, 3072, 1e-12),    # google/vit-base-patch16-224-in21k
    "vit-l16": Config("vit", 1024, 24, 16, 4096, 1e-12),   # google/vit-large-patch16-224-in21k
    "roberta-base": Config("roberta", 768, 12, 12, 3072, 1e-5, vocab_size=50265, max_positions=514, dropout=0.1),
    "roberta-large": Config("roberta", 1024, 24, 16, 4096, 1e-5, vocab_size=50265, max_positions=514, dropout=0.1),
    "gpt2": Config("gpt2", 768, 12, 12, 3072, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
    "gpt2-medium": Config("gpt2", 1024, 24, 16, 4096, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
    "gpt2-large": Config("gpt2", 1280, 36, 20, 5120, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
    # BART: n_layers encoder layers and as many decoder layers; 1026 position rows = 1024 + BART's offset 2
    "bart-base": Config("bart", 768, 6, 12, 3072, 1e-5, vocab_size=50265, max_positions=1026, dropout=0.1),
    "bart-large": Config("bart", 1024, 12, 16, 4096, 1e-5, vocab_size=50265, max_positions=1026, dropout=0.1),
    # CLIP ModifiedResNet (OpenAI's RN50 / RN101 visual towers): d_model = the layer4 grid's channels
    # (32 x width), n_layers = Bottleneck blocks, n_heads = the attention pool's heads (head dim 64),
    # ln_eps = BatchNorm eps; CLIP's mean/std and bicubic squash (CLIPBART_NOTES 5.3).
    "clip-rn50": Config("clip_resnet", 2048, 16, 32, 0, 1e-5, stages=(3, 4, 6, 3), output_dim=1024,
                        image_mean=CLIP_MEAN, image_std=CLIP_STD, image_resample="bicubic"),
    "clip-rn101": Config("clip_resnet", 2048, 33, 32, 0, 1e-5, stages=(3, 4, 23, 3), output_dim=512,
                         image_mean=CLIP_MEAN, image_std=CLIP_STD, image_resample="bicubic"),
}


# ---- building blocks ------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every GPT-2 layer seen so far; a forward appends to it in place.

    k[i], v[i]: (B, H, T, head_dim). `length` = T, the position the next token gets.
    `reorder(index)` picks batch rows (beam search: index_select over the batch).
    """

    def __init__(self):
        self.k, self.v = [], []

    @property
    def length(self):
        return self.k[0].shape[2] if self.k else 0

    def update(self, layer, k, v):
        """Append this step's k, v (B, H, N, hd) to `layer` and return the whole (B, H, T, hd) pair."""
        if layer == len(self.k):
            self.k.append(k)
            self.v.append(v)
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def reorder(self, index):
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


class CrossKVCache(KVCache):
    """A decoder's KVCache (growing self-attention keys/values) plus, kept apart, the cross-attention
    keys/values of the encoder states: cross_k[i], cross_v[i] (B, H, S, head_dim), computed by layer i
    at the first step and reused unchanged after. `reorder` picks batch rows of both."""

    def __init__(self):
        super().__init__()
        self.cross_k, self.cross_v = [], []

    def cross(self, layer, compute):
        """The cached cross (k, v) of `layer`; compute() -> (k, v) makes them the first time."""
        if layer == len(self.cross_k):
            k, v = compute()
            self.cross_k.append(k)
            self.cross_v.append(v)
        return self.cross_k[layer], self.cross_v[layer]

    def reorder(self, index):
        super().reorder(index)
        self.cross_k = [t.index_select(0, index) for t in self.cross_k]
        self.cross_v = [t.index_select(0, index) for t in self.cross_v]


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o projections (GPT-2's fused one is split)."""

    def __init__(self, d_model, n_heads, causal, dropout):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def heads(self, t):
        B, N, d = t.shape
        return t.view(B, N, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, N, d) -> (B, H, N, hd)

    def forward(self, x, mask=None, cache=None, layer=0):
        B, N, d = x.shape
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))  # (B, H, N, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, T, hd), T = past + N
        past = k.shape[2] - N
        is_causal = self.causal and N > 1 and past == 0
        if self.causal and N > 1 and past > 0:
            # query i sits at absolute position past + i and sees keys 0..past + i: (N, T)
            mask = torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, N, d))  # (B, H, N, hd) -> (B, N, H, hd) -> (B, N, d)


class CrossAttention(Attention):
    """Decoder-to-encoder attention (BART's encoder_attn): queries from the decoder states x (B, N, d),
    keys and values from the encoder states `memory` (B, S, d) through the plain Linears k and v, so
    a PEFT wrapper on "cross.v" sees the encoder output. With a CrossKVCache, k and v are computed at
    the first step and reused. mask (B, 1, 1, S) bool: the encoder positions every query may see."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__(d_model, n_heads, causal=False, dropout=dropout)

    def forward(self, x, memory, mask=None, cache=None, layer=0):
        B, N, d = x.shape

        def keys_values():
            return self.heads(self.k(memory)), self.heads(self.v(memory))  # (B, H, S, hd) each
        k, v = keys_values() if cache is None else cache.cross(layer, keys_values)
        y = F.scaled_dot_product_attention(self.heads(self.q(x)), k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, N, d))  # (B, H, N, hd) -> (B, N, H, hd) -> (B, N, d)


class MLP(nn.Module):
    def __init__(self, d_model, d_ff, gelu, act_dropout=0.0):
        super().__init__()
        self.gelu = gelu  # "none" (exact erf GELU: ViT, RoBERTa, BART) or "tanh" (GPT-2's gelu_new)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act_drop = nn.Dropout(act_dropout)  # BART's activation_dropout; 0 (identity) elsewhere

    def forward(self, x):
        return self.fc2(self.act_drop(F.gelu(self.fc1(x), approximate=self.gelu)))


class Block(nn.Module):
    """One transformer layer. pre_ln: x + f(LN(x)) (ViT, GPT-2); post-LN: LN(x + f(x)) (RoBERTa)."""

    def __init__(self, config, pre_ln, causal, gelu, act_dropout=0.0):
        super().__init__()
        c = config
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.attn = Attention(c.d_model, c.n_heads, causal, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.mlp = MLP(c.d_model, c.d_ff, gelu, act_dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, mask, cache, layer)))
        return self.ln2(x + self.drop(self.mlp(x)))


class DecoderBlock(Block):
    """BART decoder layer, post-LN: causal self-attention -> ln1, cross-attention over the encoder
    states -> ln_cross, MLP -> ln2; each sub-layer x = LN(x + drop(f(x))), exact GELU."""

    def __init__(self, config):
        super().__init__(config, pre_ln=False, causal=True, gelu=config.gelu, act_dropout=config.dropout)
        c = config
        self.cross = CrossAttention(c.d_model, c.n_heads, c.dropout)
        self.ln_cross = nn.LayerNorm(c.d_model, eps=c.ln_eps)

    def forward(self, x, memory, memory_mask=None, cache=None, layer=0):
        x = self.ln1(x + self.drop(self.attn(x, None, cache, layer)))
        x = self.ln_cross(x + self.drop(self.cross(x, memory, memory_mask, cache, layer)))
        return self.ln2(x + self.drop(self.mlp(x)))


# ---- decoding: one beam search for every decoder ------------------------------------------------

RULES = ("5", "4.29.2", "4.2.1")  # the transformers versions whose beam search lengths and stop test we follow


def block_repeated_ngrams(logp, seqs, n):
    """Set to -inf, in place, the log p of every token that would complete an n-gram its row already
    holds (transformers' no_repeat_ngram_size). logp (R, V) next-token scores, seqs (R, t) tokens so far."""
    R, t = seqs.shape
    if t < n:  # no n-gram yet
        return logp
    grams = seqs.unfold(1, n, 1)  # (R, t - n + 1, n): every n-gram of each row
    suffix = seqs[:, t - n + 1:]  # (R, n - 1): the tokens the next one would extend
    hit = (grams[:, :, :-1] == suffix[:, None, :]).all(dim=2)  # (R, t - n + 1): n-grams that begin as the suffix
    rows = torch.arange(R, device=seqs.device)[:, None].expand_as(hit)
    logp[rows[hit], grams[:, :, -1][hit]] = -math.inf  # ban their last tokens
    return logp


@torch.no_grad()
def beam_search(step, batch_size, beams, max_new_tokens, eos_id, no_repeat_ngram=0, early_stopping=False,
                force_eos=False, rules="5"):
    """Beam search over a decoder given as a step function, token for token as transformers' generate(
    num_beams=beams, do_sample=False, length_penalty=1.0) runs it; beams = 1 is greedy decoding.

    step(tokens, index) -> logits (B * k, V) of the next token, B = batch_size, k = beams. The first
    call is step(None, None): the logits after the prompt (a visual prefix, a decoder start token).
    Every later call first reorders the decoder state (its KVCache) by index (B * k,): row j
    continues beam index[j]; then it feeds tokens (B * k,), one new token per row.

    Step t (t = 1 .. max_new_tokens) scores each (beam, token) by its summed log p and keeps the 2k
    best candidates. Of these, an EOS candidate ranked in the top k ends a hypothesis (one ranked k or
    lower never does); the first k others are the live beams. A row keeps its k best ended hypotheses
    and stops when it holds k of them and early_stopping is set (beams = 1: at its first EOS), or,
    without early_stopping, when the stop test of `rules` says no live beam can beat the worst of
    them. At max_new_tokens the live beams end too. The hypothesis with the best summed log p / length
    is returned, without its EOS: B lists of token ids.

    no_repeat_ngram = n > 0: a token that would complete an n-gram the beam already holds gets log p
        -inf (after log_softmax, before the beam's score is added), over the generated tokens. The
        sequence transformers holds also has the start token in front; that changes nothing while the
        start token is the EOS (BART's </s>, GPT-2's unfed BOS), which a live beam never holds, except
        for n = 1, where transformers bans it from the first step on.
    force_eos: at step max_new_tokens every beam takes EOS with log p 0 (transformers 4.2.1's BART
        beam search did; later versions do so for forced_eos_token_id, greedy included).
    rules: lengths and the stop test without early_stopping, as transformers
        "5"      (the default): a hypothesis' length is its generated tokens, EOS included (t if it
                 ended at step t, max_new_tokens at the limit); a row stops once its best live beam's
                 score / t <= its worst ended score.
        "4.29.2" (the routing release): lengths count the start token transformers holds and not the
                 EOS: the same t for a hypothesis ended by EOS, max_new_tokens + 1 for one cut at the
                 limit; a row stops once its best candidate, EOS or not, / (t + 1) <= the worst.
        "4.2.1"  (VL-PET, VL-Adapter): as 4.29.2, but its stop test divides by t.
    Corners where transformers may differ: ties between equal scores, and the other beams start at
    -1e9 there, -inf here (a difference only if fewer than 2k tokens are possible at the first step)."""
    if rules not in RULES:
        raise ValueError(f"beam_search: rules must be one of {RULES}, got {rules!r}")
    B, k = batch_size, beams
    logits = step(None, None)  # (B * k, V)
    device = logits.device
    seqs = torch.zeros(B * k, 0, dtype=torch.long, device=device)  # (B * k, t): the tokens of each live beam
    score = torch.full((B, k), -math.inf, device=device)
    score[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = [[] for _ in range(B)]  # per row: (score / length, tokens) of the ended hypotheses
    done = [False] * B
    for t in range(1, max_new_tokens + 1):
        logp = F.log_softmax(logits.float(), dim=-1)  # (B * k, V)
        if no_repeat_ngram:
            block_repeated_ngrams(logp, seqs, no_repeat_ngram)
        if force_eos and t == max_new_tokens:
            logp = torch.full_like(logp, -math.inf)
            logp[:, eos_id] = 0.0
        # The row's 2k best (beam, token) candidates by summed log p, enough to refill k beams after EOS picks;
        # they lie among each beam's 2k best tokens, so the beam's score is added to those only.
        n = min(2 * k, logp.shape[-1])
        beam_s, beam_tok = logp.topk(n, dim=1)  # (B * k, n)
        cand = (score.view(B * k, 1) + beam_s).view(B, k * n)  # (B * k, n) -> (B, k * n)
        top_s, top_j = cand.topk(2 * k, dim=1)  # (B, 2k), in rank order
        top_tok = beam_tok.view(B, k * n).gather(1, top_j)  # (B, 2k)
        top_s, top_j, top_tok = top_s.tolist(), top_j.tolist(), top_tok.tolist()
        next_beam, next_tok, new_score = ([[x] * k for _ in range(B)] for x in (0, eos_id, -math.inf))  # (B, k)
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for rank, (s, j, tok) in enumerate(zip(top_s[b], top_j[b], top_tok[b])):
                if live == k or s == -math.inf:
                    break
                beam = j // n
                if tok != eos_id:
                    next_beam[b][live], next_tok[b][live], new_score[b][live] = beam, tok, s
                    live += 1
                elif rank < k:  # only the top k candidates may end a hypothesis
                    finished[b].append((s / t, seqs[b * k + beam]))
            if len(finished[b]) >= k and (t < max_new_tokens or rules != "5"):  # 5: the live beams end with them
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
                if early_stopping or k == 1:
                    done[b] = True
                elif rules == "5":
                    done[b] = new_score[b][0] / t <= finished[b][-1][0]
                else:  # transformers 4.x: the best candidate (rank 0), at the length its sequence will have
                    done[b] = top_s[b][0] / (t + (rules == "4.29.2")) <= finished[b][-1][0]
        index = (torch.arange(B)[:, None] * k + torch.tensor(next_beam)).flatten().to(device)  # (B * k,) rows to continue
        next_tok = torch.tensor(next_tok, device=device).flatten()  # (B, k) -> (B * k,)
        seqs = torch.cat([seqs[index], next_tok[:, None]], dim=1)  # (B * k, t)
        score = torch.tensor(new_score, device=device)
        if all(done) or t == max_new_tokens:
            break
        logits = step(next_tok, index)
    limit = max_new_tokens + (rules != "5")  # transformers 4.x also counts the start token here
    for b in range(B):
        if not done[b]:  # the limit: the live beams end too
            finished[b] += [(s / limit, seqs[b * k + j]) for j, s in enumerate(score[b].tolist()) if s > -math.inf]
    return [max(f, key=lambda h: h[0])[1].tolist() if f else [] for f in finished]


def generation_args(config, beams=None):
    """beam_search's keywords from a checkpoint's generation defaults, as transformers 4.2.1's
    generate(num_beams=beams) applied them (VL-PET's and VL-Adapter's version): beams (None: the
    checkpoint's num_beams), no_repeat_ngram, early_stopping, and force_eos for BART's beam search
    (4.2.1's BartForConditionalGeneration forced EOS at the last step whenever beams > 1, whatever the
    config said; its greedy search never did). The length limit and `rules` are the caller's: the
    releases' max_length L counts the start token, so max_new_tokens = L - 1."""
    beams = config.num_beams if beams is None else beams
    return dict(beams=beams, no_repeat_ngram=config.no_repeat_ngram, early_stopping=config.early_stopping,
                force_eos=config.arch == "bart" and beams > 1)


# ---- the three backbones --------------------------------------------------------------------------


class ViT(nn.Module):
    """ViT with the ImageNet-21k layout: CLS token, learned positions, pre-LN blocks, final LN, pooler."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, pre_ln=True, causal=False, gelu=c.gelu) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.pooler = nn.Linear(c.d_model, c.d_model)

    def forward(self, pixel_values):
        """pixel_values (B, 3, S, S), normalised -> (last_hidden_state (B, 1+P, d), pooler_output (B, d))."""
        B, _, H, W = pixel_values.shape
        S = self.config.image_size
        if (H, W) != (S, S):
            raise ValueError(f"ViT expects {S}x{S} images, got {H}x{W}")
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, d, P) -> (B, P, d)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1+P, d)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x, torch.tanh(self.pooler(x[:, 0]))  # pooler_output = tanh(dense(CLS)), as HF


class RoBERTa(nn.Module):
    """RoBERTa encoder (post-LN) returning the last hidden state; no pooler, no MLM head."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_positions, c.d_model)
        self.wtt = nn.Embedding(c.type_vocab_size, c.d_model)
        self.ln_emb = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, pre_ln=False, causal=False, gelu=c.gelu) for _ in range(c.n_layers))

    def position_ids(self, input_ids, n_prefix):
        """RoBERTa positions: pad_id + 1, pad_id + 2, ... skipping padding tokens (which get pad_id).

        The P prefix vectors take the first positions, the text continues after them: (B, P + N).
        """
        pad = self.config.pad_id
        B = input_ids.shape[0]
        prefix_pos = torch.arange(pad + 1, pad + 1 + n_prefix, device=input_ids.device).expand(B, -1)  # (B, P)
        not_pad = input_ids.ne(pad).long()  # (B, N)
        text_pos = (torch.cumsum(not_pad, dim=1) + n_prefix) * not_pad + pad  # (B, N)
        return torch.cat([prefix_pos, text_pos], dim=1)

    def forward(self, input_ids, attention_mask=None, prefix=None):
        """input_ids (B, N), attention_mask (B, N) of 1/0 or None, prefix (B, P, d) or None
        -> last hidden state (B, P + N, d). The prefix is always attended."""
        B, N = input_ids.shape
        P = 0 if prefix is None else prefix.shape[1]
        if self.config.pad_id + P + N >= self.config.max_positions:
            raise ValueError(f"sequence too long for RoBERTa: {P} prefix + {N} text positions, "
                             f"at most {self.config.max_positions - self.config.pad_id - 1}")
        x = self.wte(input_ids)  # (B, N, d)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + N, d)
        x = x + self.wtt.weight[0] + self.wpe(self.position_ids(input_ids, P))  # HF's order of additions
        x = self.drop(self.ln_emb(x))
        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()  # (B, N)
            if P:
                keep = torch.cat([keep.new_ones(B, P), keep], dim=1)  # (B, P + N)
            mask = keep[:, None, None, :]  # (B, 1, 1, P + N): which keys every query may see
        for block in self.blocks:
            x = block(x, mask)
        return x


class GPT2(nn.Module):
    """GPT-2 decoder (pre-LN, tanh GELU) returning logits; the LM head is tied to the token embedding."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_positions, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, pre_ln=True, causal=True, gelu=c.gelu) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.ln_eps)

    def new_cache(self):
        return KVCache()

    def forward(self, input_ids=None, prefix=None, cache=None):
        """input_ids (B, N) or None, prefix (B, P, d) or None, cache: KVCache or None
        -> logits (B, P + N, V). With a cache, positions continue from cache.length and the new
        keys/values are appended to it."""
        parts = [] if prefix is None else [prefix.to(self.wte.weight.dtype)]
        if input_ids is not None:
            parts.append(self.wte(input_ids))
        if not parts:
            raise ValueError("GPT-2 forward needs input_ids, a prefix, or both")
        x = torch.cat(parts, dim=1)  # (B, P + N, d)
        start = cache.length if cache is not None else 0
        T = x.shape[1]
        if start + T > self.config.max_positions:
            raise ValueError(f"sequence too long for GPT-2: {start + T} positions, at most {self.config.max_positions}")
        x = self.drop(x + self.wpe(torch.arange(start, start + T, device=x.device)))
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied LM head: (B, T, d) @ (V, d)^T


# ---- the encoder-decoder: BART --------------------------------------------------------------------

BART_POS_OFFSET = 2  # BART's learned positions: position p reads row p + 2 (a fairseq legacy)


class BARTStack(nn.Module):
    """One side of BART (encoder or decoder): learned positions, the embedding LayerNorm
    (layernorm_embedding), dropout and the layers. BART has no final LayerNorm."""

    def __init__(self, config, make_block):
        super().__init__()
        c = config
        self.wpe = nn.Embedding(c.max_positions, c.d_model)
        self.ln_emb = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(make_block() for _ in range(c.n_layers))

    def embed(self, tokens, start=0):
        """Token embeddings (B, T, d) at positions start..start+T-1 -> LN(tokens + positions) (B, T, d)."""
        T = tokens.shape[1]
        if start + T + BART_POS_OFFSET > self.wpe.num_embeddings:
            raise ValueError(f"sequence too long for BART: {start + T} positions, "
                             f"at most {self.wpe.num_embeddings - BART_POS_OFFSET}")
        pos = torch.arange(start + BART_POS_OFFSET, start + T + BART_POS_OFFSET, device=tokens.device)
        return self.ln_emb(tokens + self.wpe(pos))


class BART(nn.Module):
    """BART (BartForConditionalGeneration's numerics): post-LN encoder and decoder, exact GELU, learned
    positions with offset 2, layernorm_embedding, q scaled by head_dim^-0.5 (SDPA's default), LM head
    tied to the shared token table plus the final_logits_bias buffer.

        model.wte                               shared token embedding (x sqrt(d) if scale_embedding)
        model.encoder.{wpe, ln_emb, blocks}     blocks[i]: Block (attn, ln1, mlp, ln2)
        model.decoder.{wpe, ln_emb, blocks}     blocks[i]: DecoderBlock (attn, ln1, cross, ln_cross, mlp, ln2)

    model(input_ids, attention_mask, decoder_input_ids) -> logits (B, T, V), or the split used for
    generation: memory, memory_mask = model.encode(...); model.decode(ids, memory, memory_mask, cache).
    Extra input embeddings (CLIP-BART's visual tokens) are appended to the encoder input AFTER the text,
    as VL-Adapter does: no position embedding, not through layernorm_embedding, masked by their own
    mask, dropout over the whole sequence (CLIPBART_NOTES 2.3)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = BARTStack(c, lambda: Block(c, pre_ln=False, causal=False, gelu=c.gelu, act_dropout=c.dropout))
        self.decoder = BARTStack(c, lambda: DecoderBlock(c))
        self.register_buffer("final_logits_bias", torch.zeros(1, c.vocab_size))

    def new_cache(self):
        return CrossKVCache()

    def encode(self, input_ids, attention_mask=None, extra_embeds=None, extra_mask=None):
        """input_ids (B, N), attention_mask (B, N) of 1/0 or None, extra_embeds (B, L, d) or None,
        extra_mask (B, L) of 1/0 or None (all attended) -> (memory (B, N + L, d), memory_mask
        (B, N + L) bool, or None when every position is attended)."""
        B, N = input_ids.shape
        x = self.encoder.embed(self.wte(input_ids) * self.embed_scale)  # (B, N, d)
        keep = None if attention_mask is None else attention_mask.bool()  # (B, N)
        if extra_embeds is not None:
            L = extra_embeds.shape[1]
            x = torch.cat([x, extra_embeds.to(x.dtype)], dim=1)  # (B, N + L, d): text first, then the extras
            if keep is not None or extra_mask is not None:
                text_keep = keep if keep is not None else x.new_ones(B, N, dtype=torch.bool)
                extra_keep = extra_mask.bool() if extra_mask is not None else x.new_ones(B, L, dtype=torch.bool)
                keep = torch.cat([text_keep, extra_keep], dim=1)  # (B, N + L)
        x = self.encoder.drop(x)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, S): keys every query may see
        for block in self.encoder.blocks:
            x = block(x, mask)
        return x, keep

    def decode(self, decoder_input_ids, memory, memory_mask=None, cache=None):
        """decoder_input_ids (B, T), memory (B, S, d) and memory_mask (B, S) from encode, cache: a
        CrossKVCache or None -> logits (B, T, V). With a cache, positions continue from cache.length,
        the self-attention keys/values are appended to it, the cross ones computed once."""
        start = cache.length if cache is not None else 0
        x = self.decoder.drop(self.decoder.embed(self.wte(decoder_input_ids) * self.embed_scale, start))
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, memory, mask, cache, i)
        return F.linear(x, self.wte.weight) + self.final_logits_bias  # tied LM head: (B, T, d) @ (V, d)^T

    def forward(self, input_ids, attention_mask, decoder_input_ids, extra_embeds=None, extra_mask=None):
        """-> logits (B, T, V) of the decoder inputs (teacher forcing; no shift is done here)."""
        memory, memory_mask = self.encode(input_ids, attention_mask, extra_embeds, extra_mask)
        return self.decode(decoder_input_ids, memory, memory_mask)

    def beam_step(self, memory, memory_mask):
        """The step function models.beam_search expects, over encoder states already repeated per beam
        (memory.repeat_interleave(k, dim=0), the same for the mask): the first call feeds the decoder
        start token, every later call reorders the cache and feeds one token per row."""
        cache = self.new_cache()
        start = torch.full((memory.shape[0], 1), self.config.decoder_start_id, device=memory.device)

        def step(tokens, index):
            if tokens is None:
                return self.decode(start, memory, memory_mask, cache)[:, -1]  # (B * k, V)
            cache.reorder(index)
            return self.decode(tokens[:, None], memory, memory_mask, cache)[:, -1]
        return step


# ---- CLIP's ModifiedResNet (the visual tower of OpenAI's RN50 / RN101) ------------------------------


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its stored statistics, in train mode too: the CLIP
    tower is frozen. Same parameters and buffers (hence keys) as nn.BatchNorm2d."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def conv_bn(c_in, c_out, kernel, eps):
    """A bias-free conv (stride 1, 'same' padding) and its BatchNorm; CLIP never strides a conv."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), FrozenBatchNorm2d(c_out, eps=eps)


class Bottleneck(nn.Module):
    """CLIP's anti-aliased Bottleneck: 1x1 -> 3x3 -> (avg-pool by `stride`) -> 1x1 (x4 channels);
    the shortcut avg-pools then projects (1x1 + BN) when the shape changes. ReLU after the sum."""

    def __init__(self, c_in, planes, stride, eps):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, planes, 1, eps)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, eps)
        self.conv3, self.bn3 = conv_bn(planes, 4 * planes, 1, eps)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.downsample = None
        if stride > 1 or c_in != 4 * planes:  # OpenAI's Sequential {"-1": avg-pool, "0": conv, "1": BN}
            self.downsample = nn.Sequential(*conv_bn(c_in, 4 * planes, 1, eps))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        shortcut = x if self.downsample is None else self.downsample(self.pool(x))
        return F.relu(out + shortcut)


class AttentionPool(nn.Module):
    """CLIP's AttentionPool2d: the mean of the grid, prepended to it, plus learned positions; one
    multi-head attention whose only query is that mean token; c_proj maps it to output_dim."""

    def __init__(self, n_tokens, d, n_heads, d_out):
        super().__init__()
        self.n_heads = n_heads
        self.positional_embedding = nn.Parameter(torch.zeros(1 + n_tokens, d))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.c_proj = nn.Linear(d, d_out)

    def forward(self, grid):
        """grid (B, P, d) -> (B, d_out)."""
        B, P, d = grid.shape
        x = torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1) + self.positional_embedding  # (B, 1 + P, d)

        def heads(t):
            return t.view(B, t.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(y.reshape(B, d))  # (B, H, 1, hd) -> (B, d): heads side by side


class CLIPResNet(nn.Module):
    """OpenAI CLIP's ModifiedResNet (openai/CLIP clip/model.py), BatchNorm frozen. Module names are
    OpenAI's after "visual.": conv1..3/bn1..3 (the 3-conv stem), layer1..4 (Bottlenecks), attnpool.

    model(pixel_values (B, 3, S, S)) -> (grid (B, (S/32)^2, d_model), pooled (B, output_dim)): grid =
    layer4's output flattened row-major (VL-Adapter's features), pooled = the attention pool's output."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        width, eps = c.d_model // 32, c.ln_eps  # the stem's width; layer4 has 4 x 8 x width = d_model channels
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width // 2, eps=eps)
        self.conv2, self.bn2 = conv_bn(width // 2, width // 2, 3, eps)
        self.conv3, self.bn3 = conv_bn(width // 2, width, 3, eps)
        c_in = width
        for s, n_blocks in enumerate(c.stages):
            planes, stride = width * 2 ** s, 1 if s == 0 else 2
            blocks = [Bottleneck(c_in if j == 0 else 4 * planes, planes, stride if j == 0 else 1, eps)
                      for j in range(n_blocks)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            c_in = 4 * planes
        self.attnpool = AttentionPool((c.image_size // 32) ** 2, c.d_model, c.n_heads, c.output_dim)

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        S = self.config.image_size
        if (H, W) != (S, S):
            raise ValueError(f"CLIP ResNet expects {S}x{S} images, got {H}x{W}")
        # channels_last (NHWC in memory) from the first conv on: oneDNN's native layout on CPU, 1.2-1.7x
        # faster than NCHW here (bench.py models); the values are the same
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (B, width, S/4, S/4)
        for s in range(len(self.config.stages)):
            x = getattr(self, f"layer{s + 1}")(x)
        grid = x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, d, h, w) -> (B, h, w, d) -> (B, h*w, d), row-major
        return grid, self.attnpool(grid)


ARCHS = {"vit": ViT, "roberta": RoBERTa, "gpt2": GPT2, "bart": BART, "clip_resnet": CLIPResNet}


def build_model(config):
    """A randomly initialised backbone for `config` (a Config)."""
    if config.arch not in ARCHS:
        raise ValueError(f"unknown arch {config.arch!r}; expected one of {sorted(ARCHS)}")
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
    return ARCHS[config.arch](config)


# ---- reading Hugging Face weights -----------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path):
    """Read a .safetensors file by hand: 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the raw
    little-endian buffer that the offsets index into. Returns {name: tensor} (copies)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size - 8})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        data_size = size - 8 - n
        tensors = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as buf:  # ACCESS_COPY: writable for frombuffer
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                numel = 1
                for s in info["shape"]:
                    numel *= s
                if end > data_size:
                    raise ValueError(f"{path}: truncated safetensors file (tensor {name} ends at byte {end} "
                                     f"of the data, only {data_size} present)")
                if end - begin != numel * dtype.itemsize:
                    raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
                t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + begin) if numel else \
                    torch.empty(0, dtype=dtype)
                tensors[name] = t.reshape(info["shape"]).clone()  # clone: detach from the mmap before it closes
    return tensors


def read_torch_state_dict(path):
    """{name: tensor} from a torch.save'd dict of tensors (.bin / .pt), read with weights_only=True."""
    sd = read_torch_file(path, "weights file")
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


# TorchScript archives (torch.jit.save; OpenAI's RN101.pt) are zips: <root>/data.pkl pickles the module
# tree, each module an object of a class "__torch__.<...>" rebuilt by NEWOBJ + BUILD with the state
# {attribute: value}; a tensor is torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
# whose storage is the persistent id ("storage", torch.<Type>Storage, key, device, numel), the raw
# little-endian bytes of <root>/data/<key>. We unpickle with a restricted Unpickler: module classes
# become attribute holders, the few torch helpers our own functions; any other global is refused, so
# no code from the archive (its <root>/code/*.py) is ever imported or run.
TORCHSCRIPT_STORAGES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """One TorchScript object (a module) as the restricted unpickler sees it: its attribute dict."""

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(size, stride, offset)


def _jit_list(values, *unused):
    """torch.jit._pickle's build_intlist & co. and restore_type_tag(value, type): the value itself."""
    return values


class _TensorsOnly(pickle.Unpickler):
    SAFE = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("collections", "OrderedDict"): dict,  # the (empty) backward-hooks argument
            **{("torch.jit._pickle", name): _jit_list for name in
               ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")}}

    def __init__(self, file, archive, root):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in TORCHSCRIPT_STORAGES:
            return TORCHSCRIPT_STORAGES[name]  # the storage's dtype
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name} (only tensors and module attributes are read)")

    def persistent_load(self, pid):
        kind, dtype, key, _device, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        data = self.archive.read(f"{self.root}/data/{key}")
        if len(data) != numel * dtype.itemsize:
            raise ValueError(f"storage {key} has {len(data)} bytes, expected {numel * dtype.itemsize}")
        return torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def is_torchscript(path):
    """True for a zip with <root>/constants.pkl: how torch itself tells a TorchScript archive."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())


def read_torchscript(path):
    """{dotted attribute path: tensor} of every tensor attribute (parameters, buffers) of the module
    tree in a TorchScript archive, read without executing anything from it (see TORCHSCRIPT_STORAGES)."""
    def tensors(obj, prefix):
        out = {}
        for name, value in obj.attrs.items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                out.update(tensors(value, prefix + name + "."))
        return out
    try:
        with zipfile.ZipFile(path) as z:
            root = next(n[:-len("/data.pkl")] for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
            with z.open(f"{root}/data.pkl") as f:
                tree = _TensorsOnly(f, z, root).load()
    except (zipfile.BadZipFile, StopIteration, KeyError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the TorchScript archive ({type(e).__name__}: {e})") from None
    if not isinstance(tree, _ScriptObject):
        raise ValueError(f"{path}: the TorchScript archive does not hold a module")
    return tensors(tree, "")


def read_state_dict_file(path):
    """{name: tensor} from one weights file: .safetensors (read by hand), a TorchScript archive (read
    by read_torchscript, e.g. OpenAI's RN101.pt) or a torch.save'd dict of tensors (.pt / .bin)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if is_torchscript(path):
        return read_torchscript(path)
    return read_torch_state_dict(path)


def read_weights(src_dir):
    """{name: tensor} from model.safetensors (preferred) or pytorch_model.bin in src_dir."""
    st, pt = os.path.join(src_dir, "model.safetensors"), os.path.join(src_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st), st
    if os.path.isfile(pt):
        return read_torch_state_dict(pt), pt
    raise FileNotFoundError(f"{src_dir}: no weights found (expected model.safetensors or pytorch_model.bin; "
                            f"sharded checkpoints are not supported); files present: {sorted(os.listdir(src_dir))}")


# ---- conversion: one pure function per backbone (HF key -> our key) ------------------------------


def _require(hf, key, allowed, what):
    if hf.get(key, allowed[0]) not in allowed:
        raise ValueError(f"unsupported {what}: config.json has {key}={hf[key]!r}, expected one of {allowed}")


def vit_config(hf):
    _require(hf, "hidden_act", ["gelu"], "ViT activation")
    _require(hf, "qkv_bias", [True], "ViT attention")
    _require(hf, "num_channels", [3], "ViT input")
    _require(hf, "pooler_act", ["tanh"], "ViT pooler")
    return Config("vit", hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                  hf["intermediate_size"], hf["layer_norm_eps"], image_size=hf["image_size"],
                  patch_size=hf["patch_size"], dropout=hf.get("hidden_dropout_prob", 0.0))


def roberta_config(hf):
    _require(hf, "hidden_act", ["gelu"], "RoBERTa activation")
    _require(hf, "position_embedding_type", ["absolute"], "RoBERTa position embedding")
    return Config("roberta", hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                  hf["intermediate_size"], hf["layer_norm_eps"], vocab_size=hf["vocab_size"],
                  max_positions=hf["max_position_embeddings"], pad_id=hf["pad_token_id"],
                  type_vocab_size=hf["type_vocab_size"], dropout=hf.get("hidden_dropout_prob", 0.1))


def generation_fields(hf):
    """The generation defaults a config.json carries, as Config fields. transformers 4.2.1 (the CLIP-BART
    releases' version) read them from config.json only; generation_config.json came later (read_hf_dir
    notes it when it says otherwise)."""
    n, early = hf.get("no_repeat_ngram_size", 0), hf.get("early_stopping", False)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"unsupported generation default: config.json has no_repeat_ngram_size={n!r}, expected an integer >= 0")
    if not isinstance(early, bool):
        raise ValueError(f"unsupported generation default: config.json has early_stopping={early!r}, expected true or false")
    return dict(num_beams=hf.get("num_beams", 1), no_repeat_ngram=n, early_stopping=early)


def gpt2_config(hf):
    _require(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], "GPT-2 activation")
    _require(hf, "scale_attn_weights", [True], "GPT-2 attention scaling")
    _require(hf, "scale_attn_by_inverse_layer_idx", [False], "GPT-2 attention scaling")
    d = hf["n_embd"]
    return Config("gpt2", d, hf["n_layer"], hf["n_head"], hf.get("n_inner") or 4 * d,
                  hf["layer_norm_epsilon"], vocab_size=hf["vocab_size"], max_positions=hf["n_positions"],
                  dropout=hf.get("resid_pdrop", 0.1), **generation_fields(hf))


def _encoder_layer_keys(c, names):
    """{our block key: HF key} for HF's BERT-style "encoder.layer.{i}" layout, from (ours, theirs) name pairs."""
    return {f"blocks.{i}.{ours}.{wb}": f"encoder.layer.{i}.{theirs}.{wb}"
            for i in range(c.n_layers) for ours, theirs in names for wb in ("weight", "bias")}


def vit_keys(c):
    """{our key: (HF key, transform)} for ViT; HF names as in google/vit-*-in21k (after "vit.")."""
    m = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
         "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
         "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
         "ln_f.weight": "layernorm.weight", "ln_f.bias": "layernorm.bias",
         "pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}
    m.update(_encoder_layer_keys(c, [
        ("attn.q", "attention.attention.query"), ("attn.k", "attention.attention.key"),
        ("attn.v", "attention.attention.value"), ("attn.o", "attention.output.dense"),
        ("ln1", "layernorm_before"), ("ln2", "layernorm_after"),
        ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]))
    return {k: (v, None) for k, v in m.items()}


def roberta_keys(c):
    """{our key: (HF key, transform)} for RoBERTa; HF names after "roberta." (post-LN: ln1 after attention)."""
    m = {"wte.weight": "embeddings.word_embeddings.weight", "wpe.weight": "embeddings.position_embeddings.weight",
         "wtt.weight": "embeddings.token_type_embeddings.weight",
         "ln_emb.weight": "embeddings.LayerNorm.weight", "ln_emb.bias": "embeddings.LayerNorm.bias"}
    m.update(_encoder_layer_keys(c, [
        ("attn.q", "attention.self.query"), ("attn.k", "attention.self.key"),
        ("attn.v", "attention.self.value"), ("attn.o", "attention.output.dense"),
        ("ln1", "attention.output.LayerNorm"), ("ln2", "output.LayerNorm"),
        ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]))
    return {k: (v, None) for k, v in m.items()}


def _conv1d_weight(w):
    """GPT-2's Conv1D computes x @ W + b with W (in, out); nn.Linear computes x @ W'^T + b: W' = W^T (out, in)."""
    return w.t()


def _qkv_part(j, d, is_weight):
    """Slice j (0 = q, 1 = k, 2 = v) of the fused c_attn. Weight W (d, 3d) = [W_q | W_k | W_v] along the
    output columns: our q.weight = W[:, 0:d]^T (d, d). Bias (3d,) = [b_q | b_k | b_v]."""
    if is_weight:
        return lambda w: w[:, j * d:(j + 1) * d].t()
    return lambda b: b[j * d:(j + 1) * d]


def gpt2_keys(c):
    """{our key: (HF key, transform)} for GPT-2; HF names after "transformer."."""
    d = c.d_model
    m = {"wte.weight": ("wte.weight", None), "wpe.weight": ("wpe.weight", None),
         "ln_f.weight": ("ln_f.weight", None), "ln_f.bias": ("ln_f.bias", None)}
    for i in range(c.n_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for wb in ("weight", "bias"):
            is_w = wb == "weight"
            for j, name in enumerate("qkv"):  # fused c_attn -> separate q, k, v
                m[dst + f"attn.{name}.{wb}"] = (src + f"attn.c_attn.{wb}", _qkv_part(j, d, is_w))
            for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                m[dst + f"{ours}.{wb}"] = (src + f"{theirs}.{wb}", _conv1d_weight if is_w else None)
            m[dst + f"ln1.{wb}"] = (src + f"ln_1.{wb}", None)
            m[dst + f"ln2.{wb}"] = (src + f"ln_2.{wb}", None)
    return m


def bart_config(hf):
    _require(hf, "activation_function", ["gelu"], "BART activation")
    _require(hf, "normalize_before", [False], "BART layer norm placement")  # mBART-style pre-LN
    _require(hf, "add_final_layer_norm", [False], "BART final layer norm")
    _require(hf, "normalize_embedding", [True], "BART embedding layer norm")
    _require(hf, "add_bias_logits", [False], "BART logits bias")
    for enc, dec in [("encoder_layers", "decoder_layers"), ("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")]:
        if hf[enc] != hf[dec]:
            raise ValueError(f"unsupported BART: config.json has {enc}={hf[enc]} but {dec}={hf[dec]} (must be equal)")
    return Config("bart", hf["d_model"], hf["encoder_layers"], hf["encoder_attention_heads"], hf["encoder_ffn_dim"],
                  1e-5, vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"] + BART_POS_OFFSET,
                  pad_id=hf.get("pad_token_id", 1), dropout=hf.get("dropout", 0.1),
                  scale_embedding=bool(hf.get("scale_embedding", False)),
                  decoder_start_id=hf.get("decoder_start_token_id", 2), **generation_fields(hf))  # LayerNorm eps: 1e-5


def bart_dropout_note(hf):
    """Our BART applies `dropout` also where HF uses attention_dropout / activation_dropout."""
    other = {k: hf[k] for k in ("attention_dropout", "activation_dropout") if k in hf and hf[k] != hf.get("dropout")}
    if not other:
        return f"dropout {hf.get('dropout')} on embeddings, attention, FFN activation and residual branches"
    return (f"dropout {hf.get('dropout')} everywhere, as VL-PET's recipe sets it; config.json has "
            + ", ".join(f"{k}={v}" for k, v in other.items()))


def bart_keys(c):
    """{our key: (HF key, transform)} for BART; HF names after the optional "model." prefix."""
    m = {"wte.weight": "shared.weight", "final_logits_bias": "final_logits_bias"}
    sublayers = [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                 ("attn.o", "self_attn.out_proj"), ("ln1", "self_attn_layer_norm"),
                 ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("ln2", "final_layer_norm")]
    cross = [("cross.q", "encoder_attn.q_proj"), ("cross.k", "encoder_attn.k_proj"),
             ("cross.v", "encoder_attn.v_proj"), ("cross.o", "encoder_attn.out_proj"),
             ("ln_cross", "encoder_attn_layer_norm")]
    for side, names in [("encoder", sublayers), ("decoder", sublayers + cross)]:
        m[f"{side}.wpe.weight"] = f"{side}.embed_positions.weight"
        for wb in ("weight", "bias"):
            m[f"{side}.ln_emb.{wb}"] = f"{side}.layernorm_embedding.{wb}"
            for i in range(c.n_layers):
                for ours, theirs in names:
                    m[f"{side}.blocks.{i}.{ours}.{wb}"] = f"{side}.layers.{i}.{theirs}.{wb}"
    return {k: (v, None) for k, v in m.items()}


def clip_config(sd, heads=None):
    """Config of OpenAI's ModifiedResNet from the shapes of its "visual." tensors, as clip.build_model
    infers it. The attention pool's head count is in no shape: OpenAI uses heads = width * 32 // 64
    (head dim 64); `heads` overrides it (e.g. for a tiny test model)."""
    if not any(k.startswith("visual.") for k in sd):
        raise ValueError("no visual.* keys: not a CLIP state dict with OpenAI's key names")
    if "visual.class_embedding" in sd:
        raise ValueError("a CLIP ViT visual tower (visual.class_embedding): only the ModifiedResNet towers "
                         "(RN50, RN101, ...) are supported")
    needed = ["visual.attnpool.positional_embedding", "visual.attnpool.c_proj.weight"]
    if any(k not in sd for k in needed):
        raise KeyError(f"clip_resnet checkpoint is missing {', '.join(k for k in needed if k not in sd)}")
    stages = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{s}.")}) for s in (1, 2, 3, 4))
    n_pos, d = sd["visual.attnpool.positional_embedding"].shape  # (1 + side^2, d)
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1:
        raise ValueError(f"visual.attnpool.positional_embedding has {n_pos} rows, not 1 + a square")
    heads = heads or d // 64
    if d % heads:
        raise ValueError(f"the attention pool's width {d} is not divisible by {heads} heads")
    return Config("clip_resnet", d, sum(stages), heads, 0, 1e-5, image_size=32 * side, image_mean=CLIP_MEAN,
                  image_std=CLIP_STD, image_resample="bicubic", stages=stages,
                  output_dim=sd["visual.attnpool.c_proj.weight"].shape[0])


def clip_keys(c):
    """{our key: (OpenAI key, transform)}: our names are OpenAI's without the "visual." prefix."""
    bn = [f"bn{i}.{b}" for i in (1, 2, 3) for b in ("weight", "bias", "running_mean", "running_var",
                                                      "num_batches_tracked")]
    convs = [f"conv{i}.weight" for i in (1, 2, 3)]
    names = convs + bn  # the stem
    for s, n_blocks in enumerate(c.stages):
        for j in range(n_blocks):
            block = f"layer{s + 1}.{j}."
            names += [block + k for k in convs + bn]
            if j == 0:  # the first block changes width (and stride): a projected shortcut
                names += [block + "downsample.0.weight"] + [block + "downsample.1." + k[4:] for k in bn[:5]]
    names += ["attnpool.positional_embedding"] + [f"attnpool.{p}_proj.{wb}" for p in "qkvc" for wb in ("weight", "bias")]
    return {k: ("visual." + k, None) for k in names}


# Source keys we knowingly drop (regex on the name after the model prefix) and why.
IGNORED = {
    "vit": [(r"classifier\..*", "image-classification head: we use the backbone only"),
            (r"embeddings\.mask_token", "masked-image-modeling token: unused")],
    "roberta": [(r"pooler\.dense\..*", "RoBERTa pooler: never used (the VQA head reads the prefix position, SPEC)"),
                (r"lm_head\..*", "masked-LM head: not used"),
                (r"embeddings\.position_ids", "buffer arange(max_positions): recomputed"),
                (r"embeddings\.token_type_ids", "buffer of zeros: recomputed")],
    "gpt2": [(r"h\.\d+\.attn\.(bias|masked_bias)", "causal-mask buffers, not weights"),
             (r"lm_head\.weight", "LM head tied to wte (checked equal)")],
    "bart": [(r"lm_head\.weight", "LM head tied to shared (checked equal)"),
             (r"(encoder|decoder)\.embed_tokens\.weight", "a tied copy of shared (checked equal)")],
    "clip_resnet": [
        (r"(token_embedding|positional_embedding|transformer|ln_final|text_projection)(\..*)?",
         "CLIP's text tower: only the visual tower is converted"),
        (r"logit_scale", "CLIP's image-text temperature: not part of the visual tower"),
        (r"input_resolution|context_length|vocab_size", "scalars of OpenAI's TorchScript model, not weights "
                                                        "(the resolution is inferred from the shapes)")],
}
PREFIXES = {"vit": "vit.", "roberta": "roberta.", "gpt2": "transformer.", "bart": "model.", "clip_resnet": ""}
CONFIGS = {"vit": (vit_config, vit_keys), "roberta": (roberta_config, roberta_keys), "gpt2": (gpt2_config, gpt2_keys),
           "bart": (bart_config, bart_keys), "clip_resnet": (clip_config, clip_keys)}
# Tied copies of one table, the name we read first: all present must be equal; if that first name is
# absent, the first copy present stands in (a Hub file may keep only one of BART's four names).
TIED = {"gpt2": ["wte.weight", "lm_head.weight"],
        "bart": ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]}
# Source keys that may be absent: (regex, value from the config, note). HF drops final_logits_bias
# (zeros) from some files; num_batches_tracked only counts training steps, unused by frozen BatchNorm.
DEFAULTS = {"bart": [(r"final_logits_bias", lambda c: torch.zeros(1, c.vocab_size), "final_logits_bias absent: zeros")],
            "clip_resnet": [(r"visual\..*num_batches_tracked", lambda c: torch.tensor(0),
                             "num_batches_tracked absent: 0 (unused: the statistics are frozen)")]}


def _tie(arch, src):
    """Check the tied copies of TIED[arch] in src equal; put the stand-in under the first name if needed."""
    group = TIED.get(arch, [])
    present = [k for k in group if k in src]
    for k in present[1:]:
        if not torch.equal(src[k], src[present[0]]):
            raise ValueError(f"{arch} checkpoint has an {k} that differs from {present[0]} (untied weights unsupported)")
    if present and group[0] not in src:
        src[group[0]] = src[present[0]]


def convert_state_dict(arch, hf_sd, config, notes=None):
    """Map a Hugging Face (or OpenAI CLIP) state dict to ours. Returns (state_dict, {ignored source
    key: reason}); absent keys filled by DEFAULTS are noted in `notes` (a list) if given. Every source
    key is used or ignored; a missing or unexpected key is an error naming it. Floating-point tensors
    become fp32 (OpenAI's fp16 weights included)."""
    prefix = PREFIXES[arch]
    has_prefix = any(k.startswith(prefix) for k in hf_sd)
    src = {(k[len(prefix):] if has_prefix and k.startswith(prefix) else k): t for k, t in hf_sd.items()}
    _tie(arch, src)
    mapping = CONFIGS[arch][1](config)
    filled = set()
    for s, _ in mapping.values():
        default = None if s in src else next(
            ((make, note) for pat, make, note in DEFAULTS.get(arch, []) if re.fullmatch(pat, s)), None)
        if default is not None:
            src[s] = default[0](config)
            filled.add(default[1])
    if notes is not None:
        notes += sorted(filled)
    missing = sorted({s for s, _ in mapping.values() if s not in src})
    if missing:
        raise KeyError(f"{arch} checkpoint is missing {len(missing)} key(s): {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))
    used = {s for s, _ in mapping.values()}
    ignored = {}
    for k in src:
        if k in used:
            continue
        reason = next((r for pat, r in IGNORED[arch] if re.fullmatch(pat, k)), None)
        if reason is None:
            raise KeyError(f"{arch} checkpoint has an unexpected key: {k}")
        ignored[k] = reason
    sd = {}
    for ours, (theirs, fn) in mapping.items():
        t = src[theirs] if fn is None else fn(src[theirs])
        t = t.float() if t.is_floating_point() else t  # BatchNorm's num_batches_tracked stays int64
        sd[ours] = t.clone(memory_format=torch.contiguous_format)
    return sd, ignored


def read_tokenizer(src_dir):
    """{"vocab": {token: id}, "merges": ["Ġ t", ...]} from vocab.json + merges.txt, or None if absent."""
    vp, mp = os.path.join(src_dir, "vocab.json"), os.path.join(src_dir, "merges.txt")
    if not (os.path.isfile(vp) and os.path.isfile(mp)):
        return None
    with open(vp, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(mp, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return {"vocab": vocab, "merges": [ln for ln in lines if ln]}


def read_image_preprocessing(src_dir, config):
    """image_size/mean/std from preprocessor_config.json into config; returns a note for the report."""
    path = os.path.join(src_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return "no preprocessor_config.json: mean = std = 0.5 (ViTImageProcessor's defaults)"
    with open(path) as f:
        pp = json.load(f)
    size = pp.get("size", config.image_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if size != config.image_size:
        raise ValueError(f"{path}: size {size} differs from the model's image_size {config.image_size}")
    config.image_mean = tuple(float(x) for x in pp.get("image_mean", config.image_mean))
    config.image_std = tuple(float(x) for x in pp.get("image_std", config.image_std))
    return f"preprocessing from preprocessor_config.json: {size} px, mean {config.image_mean}, std {config.image_std}"


def atomic_save(obj, path):
    """torch.save, atomically (eval.atomic_write: a temporary file, then os.replace)."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def save_checkpoint(model, path, tokenizer=None):
    """A backbone in the converted format that load_checkpoint reads: {"arch", "config", "model"}, plus
    "tokenizer" ({"vocab", "merges"}, data.BPETokenizer.to_data()) for text models."""
    ckpt = {"arch": model.config.arch, "config": dataclasses.asdict(model.config), "model": model.state_dict()}
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer
    atomic_save(ckpt, path)


def generation_note(src_dir, config):
    """The generation defaults the converted file keeps, and any that generation_config.json (not read:
    the releases' transformers 4.2.1 read config.json only) sets otherwise."""
    note = (f"generation defaults from config.json: num_beams {config.num_beams}, no_repeat_ngram_size "
            f"{config.no_repeat_ngram}, early_stopping {config.early_stopping}")
    path = os.path.join(src_dir, "generation_config.json")
    if not os.path.isfile(path):
        return note
    with open(path) as f:
        try:
            gen = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    ours = {"num_beams": config.num_beams, "no_repeat_ngram_size": config.no_repeat_ngram,
            "early_stopping": config.early_stopping}
    other = [f"{k}={gen[k]!r}" for k in ours if k in gen and gen[k] != ours[k]]
    return note + (f"; generation_config.json, not read, sets {', '.join(other)}" if other else "")


def read_hf_dir(src_dir):
    """(arch, config, state dict, weights path, notes) of a Hugging Face model directory."""
    cfg_path = os.path.join(src_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{src_dir}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    arch = hf.get("model_type")
    if arch not in CONFIGS or arch == "clip_resnet":
        raise ValueError(f"{cfg_path}: unknown model_type {arch!r}; supported: {sorted(set(PREFIXES) - {'clip_resnet'})} "
                         f"(CLIP ResNets convert from a state-dict file, not a directory)")
    config = CONFIGS[arch][0](hf)
    notes = [read_image_preprocessing(src_dir, config)] if arch == "vit" else []
    notes += [bart_dropout_note(hf)] if arch == "bart" else []
    notes += [generation_note(src_dir, config)] if arch in ("gpt2", "bart") else []
    sd, weights_path = read_weights(src_dir)
    return arch, config, sd, weights_path, notes


def check_shapes(config, sd):
    """Every tensor of sd has the shape our model built from config expects (built on the meta device).
    Returns the model's number of parameters (buffers not counted)."""
    with torch.device("meta"):
        model = build_model(config)
    want = model.state_dict()
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(t.shape)})" for k, t in want.items() if sd[k].shape != t.shape]
    if bad:
        raise ValueError(f"{config.arch} checkpoint has {len(bad)} tensor(s) of the wrong shape: {', '.join(bad[:3])}"
                         + (" ..." if len(bad) > 3 else ""))
    return sum(p.numel() for p in model.parameters())


def convert(src, out_path, heads=None):
    """Convert a Hugging Face model directory (ViT, RoBERTa, GPT-2, BART) or a CLIP ModifiedResNet
    weights file (OpenAI key names) into our checkpoint file; returns a report dict. heads: the CLIP
    attention pool's head count (default: OpenAI's rule, head dim 64)."""
    if os.path.isdir(src):
        if heads is not None:
            raise ValueError("--heads is for CLIP weights files only, not a Hugging Face directory")
        arch, config, hf_sd, weights_path, notes = read_hf_dir(src)
    elif os.path.isfile(src):
        arch, hf_sd, weights_path = "clip_resnet", read_state_dict_file(src), src
        config = clip_config(hf_sd, heads)
        notes = [f"config from the shapes: stages {config.stages}, grid width {config.d_model}, output "
                 f"{config.output_dim}, {config.image_size} px, {config.n_heads} pool heads "
                 + ("(--heads)" if heads else "(OpenAI's rule: width / 64)")]
    else:
        raise FileNotFoundError(f"{src}: no such file or directory")
    sd, ignored = convert_state_dict(arch, hf_sd, config, notes)
    params = check_shapes(config, sd)
    ckpt = {"arch": arch, "config": dataclasses.asdict(config), "model": sd}
    if arch in ("roberta", "gpt2", "bart"):
        tok = read_tokenizer(src)
        if tok is not None:
            ckpt["tokenizer"] = tok
            notes.append(f"tokenizer: {len(tok['vocab'])} tokens, {len(tok['merges'])} merges")
        else:
            notes.append("no vocab.json/merges.txt: checkpoint has no tokenizer")
    atomic_save(ckpt, out_path)
    report = {"arch": arch, "src": weights_path, "out": out_path, "params": params,
              "keys_used": len(hf_sd) - len(ignored), "ignored": ignored, "notes": notes}
    return report


def print_report(r):
    print(f"{r['src']} -> {r['out']}")
    print(f"arch {r['arch']}, {r['params']:,} parameters, {r['keys_used']} source keys used, "
          f"{len(r['ignored'])} ignored")
    reasons = {}
    for k, why in r["ignored"].items():
        reasons.setdefault(why, []).append(k)
    for why, keys in reasons.items():
        print(f"  ignored {len(keys)} ({why}): {keys[0]}" + (" ..." if len(keys) > 1 else ""))
    for note in r["notes"]:
        print(f"  {note}")


def read_torch_file(path, what, mmap=False):
    """torch.load(path, weights_only=True) on the CPU, with one clear error that names the file and the
    problem: missing, empty, truncated or not a torch file, or a pickle of other objects (which could
    run code: weights_only loading never runs it). `what` names the expected kind of file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no central directory
        size = os.path.getsize(path)
        raise ValueError(f"{path} is not a {what}: " + ("an empty file" if size == 0 else
                         f"{size:,} bytes that are not the zip archive torch.save writes (truncated, or another kind of file)"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a {what}: it holds pickled Python objects other than tensors and plain "
                         f"values (they could run code; weights_only loading refuses them)") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a readable {what} (damaged archive: {type(e).__name__})") from None


def load_checkpoint(path, arch=None):
    """The backbone stored in a converted file, in eval mode (strict load, weights_only=True)."""
    hint = "make one with: python models.py convert --src DIR --out FILE.pt"
    if os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        kind = " (a Hugging Face model, judging by its config.json)" if os.path.isfile(os.path.join(path, "config.json")) else ""
        raise ValueError(f"{path} is a folder{kind}, not a converted checkpoint file: convert it once with: python models.py "
                         f"convert --src {path} --out ckpt/{name}.pt, then use ckpt/{name}.pt")
    ckpt = read_torch_file(path, "converted checkpoint", mmap=True)
    if not isinstance(ckpt, dict) or not {"arch", "config", "model"} <= set(ckpt):
        raise ValueError(f"{path} is not a converted checkpoint (expected a dict with arch, config, model); {hint}")
    if arch is not None and ckpt["arch"] != arch:
        raise ValueError(f"{path} is a {ckpt['arch']} checkpoint, expected {arch}")
    try:
        config = Config(**ckpt["config"])
    except TypeError as e:
        raise ValueError(f"{path}: stored config does not fit this models.py ({e})") from None
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(ckpt["model"], strict=True, assign=True)
    return model.eval()


CONVERT_HELP = """Convert a checkpoint once into our plain file (load it with load_checkpoint).

--src is either
  a Hugging Face model directory: config.json (model_type vit, roberta, gpt2 or bart) and
    model.safetensors or pytorch_model.bin; vocab.json + merges.txt (text models) and
    preprocessor_config.json (ViT) go with it. BART keys may carry the "model." prefix or not;
    a missing lm_head is the tied token table, a missing final_logits_bias is zeros.
  or a CLIP ModifiedResNet weights file with OpenAI's key names ("visual.*"; the text tower is
    ignored): a torch.save'd dict of tensors (.pt / .bin, read with weights_only=True), a
    .safetensors file (read by hand), or OpenAI's own TorchScript archive (RN50.pt, RN101.pt). The
    archive is a zip whose data.pkl is read with a restricted unpickler that rebuilds only the
    tensors and the module tree's attribute names and refuses every other global: nothing from the
    archive is executed. The config is inferred from the shapes; fp16 weights become fp32.

Bad input (a missing or unexpected key, no visual.* keys, a truncated file, an unknown model_type)
prints one "error: ..." line and exits with status 2."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a checkpoint into our file", description=CONVERT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="Hugging Face model directory, or a CLIP weights file")
    p.add_argument("--out", required=True, help="output file, e.g. ckpt/bart-base.pt")
    p.add_argument("--heads", type=int, default=None,
                   help="CLIP only: the attention pool's heads (default: width * 32 // 64, OpenAI's rule; no shape "
                        "holds it)")
    args = parser.parse_args(argv)
    try:
        report = convert(args.src, args.out, args.heads)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)  # one line
        sys.exit(2)
    print_report(report)


if __name__ == "__main__":
    main()
