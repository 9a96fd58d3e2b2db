"""The three frozen backbones, written from scratch: ViT (image encoder), RoBERTa (text encoder),
GPT-2 (text decoder), plus the one-time conversion of Hugging Face checkpoints into plain state dicts.

    python models.py convert --src DIR --out FILE.pt    # DIR: a Hugging Face model directory

DIR holds config.json and model.safetensors (or pytorch_model.bin), plus vocab.json/merges.txt for
the text models and preprocessor_config.json for ViT. The output is one plain dict
{"arch", "config", "model": state_dict, "tokenizer": {"vocab", "merges"}} that `load_checkpoint`
reads back with torch.load(weights_only=True).

Every backbone has the same module tree, so PEFT code can target layers by name:
    model.blocks[i].attn.{q,k,v,o}   nn.Linear
    model.blocks[i].mlp.{fc1,fc2}    nn.Linear
    model.blocks[i].ln1, .ln2        nn.LayerNorm
ViT and GPT-2 are pre-LN, RoBERTa is post-LN; each keeps its own numerics (GELU flavour, LayerNorm
eps, RoBERTa's position offset).
"""
import argparse
import dataclasses
import json
import math
import mmap
import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval import atomic_write  # the project's one atomic file writer (pure standard library)


@dataclass
class Config:
    arch: str                  # "vit" | "roberta" | "gpt2"
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
                               # branches, as in Hugging Face (RoBERTa/GPT-2 checkpoints: 0.1, ViT: 0.0)

    @property
    def gelu(self):
        """The backbone's GELU, for its FFN and for anything inserted into it (an Adapter's activation):
        "tanh" (GPT-2's gelu_new) or "none" (the exact erf GELU of ViT and RoBERTa)."""
        return "tanh" if self.arch == "gpt2" else "none"


PRESETS = {
    "vit-b16": Config("vit", 768, 12, 12, 3072, 1e-12),    # google/vit-base-patch16-224-in21k
    "vit-l16": Config("vit", 1024, 24, 16, 4096, 1e-12),   # google/vit-large-patch16-224-in21k
    "roberta-base": Config("roberta", 768, 12, 12, 3072, 1e-5, vocab_size=50265, max_positions=514, dropout=0.1),
    "roberta-large": Config("roberta", 1024, 24, 16, 4096, 1e-5, vocab_size=50265, max_positions=514, dropout=0.1),
    "gpt2": Config("gpt2", 768, 12, 12, 3072, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
    "gpt2-medium": Config("gpt2", 1024, 24, 16, 4096, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
    "gpt2-large": Config("gpt2", 1280, 36, 20, 5120, 1e-5, vocab_size=50257, max_positions=1024, dropout=0.1),
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


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o projections (GPT-2's fused one is split)."""

    def __init__(self, d_model, n_heads, causal, dropout):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None, cache=None, layer=0):
        B, N, d = x.shape
        # (B, N, d) -> (B, N, H, hd) -> (B, H, N, hd)
        q, k, v = (p(x).view(B, N, self.n_heads, d // self.n_heads).transpose(1, 2) for p in (self.q, self.k, self.v))
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


class MLP(nn.Module):
    def __init__(self, d_model, d_ff, gelu):
        super().__init__()
        self.gelu = gelu  # "none" (exact erf GELU: ViT, RoBERTa) or "tanh" (GPT-2's gelu_new)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class Block(nn.Module):
    """One transformer layer. pre_ln: x + f(LN(x)) (ViT, GPT-2); post-LN: LN(x + f(x)) (RoBERTa)."""

    def __init__(self, config, pre_ln, causal, gelu):
        super().__init__()
        c = config
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.attn = Attention(c.d_model, c.n_heads, causal, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.mlp = MLP(c.d_model, c.d_ff, gelu)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, mask, cache, layer)))
        return self.ln2(x + self.drop(self.mlp(x)))


# ---- decoding: one beam search for every decoder ------------------------------------------------


@torch.no_grad()
def beam_search(step, batch_size, beams, max_new_tokens, eos_id):
    """Beam search over a decoder given as a step function; beams = 1 is greedy argmax decoding.

    step(tokens, index) -> logits (B * k, V) of the next token, B = batch_size, k = beams. The first
    call is step(None, None): the logits after the prompt (a visual prefix, a decoder start token).
    Every later call first reorders the decoder state (its KVCache) by index (B * k,): row j
    continues beam index[j]; then it feeds tokens (B * k,), one new token per row.

    The search of transformers' generate(num_beams=k, length_penalty=1.0, early_stopping=False,
    do_sample=False): each step keeps the 2k best (beam, token) candidates by summed log p; of these,
    EOS candidates ranked in the top k become finished hypotheses scored sum(log p) / (length incl.
    EOS), and the first k others are the live beams. A row keeps its k best finished hypotheses and
    stops when it has k of them and the best live beam, normalised by the current length, cannot
    beat the worst. At max_new_tokens the live beams count as finished (score / max_new_tokens).
    The best hypothesis is returned. Corners where transformers differs: it finalises the top-k
    candidates at the limit rather than the live beams (the best hypothesis is the same: rank 0 is
    in both), starts the other beams at -1e9 rather than -inf (differs only if the vocabulary has
    fewer than 2k tokens), and ties in scores may break differently. The tests check equal outputs
    against transformers on tiny random decoders. Returns B lists of token ids, without EOS."""
    B, k = batch_size, beams
    logits = step(None, None)  # (B * k, V)
    device = logits.device
    finished = [[] for _ in range(B)]  # (score, tokens)
    done = [False] * B
    tokens = [[[] for _ in range(k)] for _ in range(B)]
    score = torch.full((B, k), -math.inf, device=device)
    score[:, 0] = 0.0  # all beams start identical: expand only the first
    for t in range(1, max_new_tokens + 1):
        logp = F.log_softmax(logits.float(), dim=-1)
        V = logp.shape[-1]
        cand = (score[:, :, None] + logp.view(B, k, V)).view(B, k * V)  # (B, k, V) -> (B, k * V)
        top_s, top_i = cand.topk(2 * k, dim=1)  # enough to refill k live beams after EOS picks
        next_beam = torch.zeros(B, k, dtype=torch.long)
        next_tok = torch.full((B, k), eos_id, dtype=torch.long)
        new_score = torch.full((B, k), -math.inf, device=device)
        new_tokens = [[[] for _ in range(k)] for _ in range(B)]
        for b in range(B):
            live = 0
            for rank, (s, i) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                beam, tok = divmod(i, V)
                if done[b] or live == k or s == -math.inf:
                    break
                if tok == eos_id:
                    if rank < k:  # only the top k candidates may finish, as in HF
                        finished[b].append((s / t, tokens[b][beam]))
                    continue
                next_beam[b, live], next_tok[b, live], new_score[b, live] = beam, tok, s
                new_tokens[b][live] = tokens[b][beam] + [tok]
                live += 1
            if not done[b] and len(finished[b]) >= k:
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
                done[b] = new_score[b, 0].item() / t <= finished[b][-1][0]
        if all(done):
            break
        score, tokens = new_score, new_tokens
        if t == max_new_tokens:
            break
        index = (torch.arange(B)[:, None] * k + next_beam).flatten()  # (B, k) -> (B * k,) rows to continue
        logits = step(next_tok.flatten().to(device), index.to(device))
    for b in range(B):
        if not done[b]:  # the limit: live beams count as finished
            finished[b] += [(score[b, j].item() / max_new_tokens, tokens[b][j]) for j in range(k)
                            if score[b, j] > -math.inf]
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


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


ARCHS = {"vit": ViT, "roberta": RoBERTa, "gpt2": GPT2}


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


def read_weights(src_dir):
    """{name: tensor} from model.safetensors (preferred) or pytorch_model.bin in src_dir."""
    st, pt = os.path.join(src_dir, "model.safetensors"), os.path.join(src_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st), st
    if os.path.isfile(pt):
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{pt}: cannot read weights ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise ValueError(f"{pt}: not a state dict of tensors")
        return sd, pt
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


def gpt2_config(hf):
    _require(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], "GPT-2 activation")
    _require(hf, "scale_attn_weights", [True], "GPT-2 attention scaling")
    _require(hf, "scale_attn_by_inverse_layer_idx", [False], "GPT-2 attention scaling")
    d = hf["n_embd"]
    return Config("gpt2", d, hf["n_layer"], hf["n_head"], hf.get("n_inner") or 4 * d,
                  hf["layer_norm_epsilon"], vocab_size=hf["vocab_size"], max_positions=hf["n_positions"],
                  dropout=hf.get("resid_pdrop", 0.1))


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
}
PREFIXES = {"vit": "vit.", "roberta": "roberta.", "gpt2": "transformer."}
CONFIGS = {"vit": (vit_config, vit_keys), "roberta": (roberta_config, roberta_keys), "gpt2": (gpt2_config, gpt2_keys)}


def convert_state_dict(arch, hf_sd, config):
    """Map a Hugging Face state dict to ours. Returns (state_dict, {ignored source key: reason}).
    Every source key is used or ignored; a missing or unexpected key is an error naming it."""
    prefix = PREFIXES[arch]
    has_prefix = any(k.startswith(prefix) for k in hf_sd)
    src = {(k[len(prefix):] if has_prefix and k.startswith(prefix) else k): t for k, t in hf_sd.items()}
    mapping = CONFIGS[arch][1](config)
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
    if arch == "gpt2" and "lm_head.weight" in src and not torch.equal(src["lm_head.weight"], src["wte.weight"]):
        raise ValueError("gpt2 checkpoint has an lm_head.weight that differs from wte.weight (untied head unsupported)")
    sd = {}
    for ours, (theirs, fn) in mapping.items():
        t = src[theirs] if fn is None else fn(src[theirs])
        sd[ours] = t.float().clone(memory_format=torch.contiguous_format)
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


def convert(src_dir, out_path):
    """Convert a Hugging Face model directory into our checkpoint file; returns a report dict."""
    cfg_path = os.path.join(src_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{src_dir}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        hf = json.load(f)
    arch = hf.get("model_type")
    if arch not in CONFIGS:
        raise ValueError(f"{cfg_path}: unknown model_type {arch!r}; supported: {sorted(CONFIGS)}")
    config = CONFIGS[arch][0](hf)
    notes = [read_image_preprocessing(src_dir, config)] if arch == "vit" else []
    hf_sd, weights_path = read_weights(src_dir)
    sd, ignored = convert_state_dict(arch, hf_sd, config)
    ckpt = {"arch": arch, "config": dataclasses.asdict(config), "model": sd}
    tok = read_tokenizer(src_dir) if arch != "vit" else None
    if tok is not None:
        ckpt["tokenizer"] = tok
        notes.append(f"tokenizer: {len(tok['vocab'])} tokens, {len(tok['merges'])} merges")
    elif arch != "vit":
        notes.append("no vocab.json/merges.txt: checkpoint has no tokenizer")
    atomic_save(ckpt, out_path)
    report = {"arch": arch, "src": weights_path, "out": out_path, "params": sum(t.numel() for t in sd.values()),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a Hugging Face model directory into our checkpoint file")
    p.add_argument("--src", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output file, e.g. ckpt/gpt2-medium.pt")
    args = parser.parse_args()
    print_report(convert(args.src, args.out))


if __name__ == "__main__":
    main()
