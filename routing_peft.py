"""Routing functions for vision-language PEFT with low-rank bottlenecks (LoRA, Adapter, VL-PET).

One self-contained file (imports only torch) to copy into any project. It wraps layers of an
existing model, ours or anyone's (a Hugging Face model included), without changing the model's code.

    python -m pytest -q tests/test_routing_peft.py     # the tests
    python bench.py routing                            # speed: routed vs plain LoRA vs peft; VL-PET layers

Paper: Qu, Tuytelaars, Moens, "Introducing Routing Functions to Vision-Language Parameter-Efficient
Fine-Tuning with Low-Rank Bottlenecks", ECCV 2024, arXiv 2403.09377. VL-PET: Hu, Li, Lyu, Wang,
"VL-PET: Vision-and-Language Parameter-Efficient Tuning via Granularity Control", ICCV 2023
(release: github.com/HenryHZY/VL-PET). Neither release has the other; routing inside
VL-PET's bottleneck is ours.

The method
----------
A LoRA, Adapter or VL-PET module squeezes a text hidden state through a low-rank bottleneck of width
r. The visual feature x_R (by default the frozen ViT pooler output, one vector per image) goes through
the SAME down-projection, and a routing function f mixes the two inside the bottleneck, adding no
parameter:

    x_t = W_down x          (B, N, r)   N text positions
    x_v = W_down x_R        (B, L, r)   L visual tokens (L = 1 for a pooled feature)

    route           f(x_t, x_v)                  L       note
    none            x_t                          any     plain LoRA / Adapter / VL-PET, x_R unused
    add             x_t + x_v                    1       x_v broadcast over the N positions
    mul             x_t * x_v                    1
    matmul          x_t x_v^T x_v                any     = <x_t, x_v> x_v for L = 1; a real transpose
    matmul_expand   (sum_i x_t,i) x_v            1       = x_t X, X the r x r matrix whose rows all equal x_v
    matmul_relu     relu(x_t) relu(x_v)^T x_v    any     ablation (reported not to work well)
    ones            (x_t x_v^T) 1                1       ablation: <x_t, x_v> in every channel

    LoRA    (parallel to a linear layer W0, b):
            y = W0 x + b + (alpha / r) B f(A drop(x), A drop(x_R))
            A: Kaiming-uniform (as nn.Linear), B: zeros, so the model is unchanged at init. One Dropout
            module, applied to x and to x_R separately. alpha/r is applied in the r-wide bottleneck.
            after_b=True (ablation): y = W0 x + b + (alpha / r) f(B A drop(x), B A drop(x_R)), the route
            in full width. With B = 0 every multiplicative route (all but none and add) then has EXACTLY
            zero gradient on A and B, so B stays 0 forever: why the paper routes inside the bottleneck.
    LoRA with cross-attention (the routes' parameterised baseline; CrossAttentionLoRA), parallel to W0, b;
            width w = r/4 inside, h heads (default 4); the text and the image get their OWN down-projections:
            x_t = A_t drop(x)   (B, N, w),   x_v = A_v drop(x_R)   (B, L, w)
            a   = [softmax(Q_i K_i^T / sqrt(w/h)) V_i]_i  heads side by side,
                  Q = W_q x_t, K = W_k drop(x_v), V = W_v drop(x_v)
            y   = W0 x + b + (alpha / r) B W_up W_o drop(a)        W_up: w -> r, B: r -> d_out
            No bias, no mask; B zeros (identity at init), the seven others Kaiming-uniform. Trainable per
            layer: d_in r/2 + r^2/2 + r d_out (LoRA: r d_in + r d_out; d = 1024, r = 128: 204,800 vs 262,144).
            a REPLACES x_t, as the release (no residual). So with ONE visual token (pooled x_R, L = 1) the
            softmax is 1 and a = V at every text position: the update is the image-only constant
            (alpha/r) B W_up W_o W_v A_v x_R, and the scoring path A_t, W_q, W_k gets exactly zero gradient.
            The text meets the image only through several visual tokens (patches, L > 1).
    Adapter (after a module whose output is h):
            h + W_up act(f(W_down h + b_down, W_down x_R + b_down)) + b_up,   W_up, b_up: zeros.

    VL-PET  (wraps a whole sub-layer, self-attention or FFN: input X, output H; in VL-PET's BART encoder,
            after each sub-layer, before its dropout, residual and post-LN; r = 96):
            H1  = H + W_up gelu_tanh(f(W_down H + b_down, W_down x_R + b_down)) + b_up
            out = H1 * G,  G from the gate (gate_r = 96; parameters for d = 768 in brackets):
        large     sigmoid(W_gu gelu_tanh(W_gd X + b_gd) + b_gu)  (B, N, d) per token and channel [148,320]
        middleX   sigmoid(w . (X + H1) + b)                     (B, N, 1) per token               [769]
        middleY   1 + z                                         (d,)      per channel             [768]
        small     mean over n of sigmoid(w . [X_n; H1_n] + b)    (B, 1, 1) per example             [1,537]
            + the bottleneck W_down, W_up [148,320]. Every new weight N(0, 0.02), biases 0, z ~ N(0, 0.02),
            as the release: NOT the identity at init (large / middleX / small start near G = 0.5).
    Parallel adapter (VL-PET's decoder module, on the cross-attention VALUE projection, r = 96, no gate):
            y = base(x) + W_up gelu_tanh(f(W_down x + b_down, W_down x_R + b_down)) + b_up, init as VL-PET.

Deliberate deviations from the authors' released code (Routing_VLPEFT)
----------------------------------------------------------------------
- `matmul` uses a real transpose, x_t @ x_v.transpose(-1, -2) @ x_v. The release used `reshape`,
  which is the same only for L = 1; for several visual tokens it mixes tokens and channels.
- The element-wise routes (add, mul), matmul_expand and ones raise on L > 1 instead of silently
  broadcasting or reshaping.
- Only route='none' LoRA can be merged into W0 (a routed update depends on the image), and merging
  is explicit (`merge_lora`), never a side effect of .train() / .eval().
- x_R is passed through `visual_context` instead of extra forward arguments and flags threaded
  through copies of the model files, so the backbone's code stays untouched.
- LoRA with cross-attention (loralib/layers.py MergedLinearSplitAttn, which no model file of the release
  builds). Kept: widths r/4 and r, 4 heads, 1/sqrt(head width), no bias, no projection inside the attention
  (W_o is its own Linear after it), the five dropout sites, Kaiming-uniform and zero B, alpha/r, no residual.
  Changed: one module per projection, like the routes (its config pairs it with GPT-2's fused q|v, where one
  module would span both bottlenecks, width r/2); where it goes is ours: q and v of every self-attention,
  as LoRA, is what we recommend; an r that 4 * heads does not divide is an error (the release floors r//4).
  No visual-token mask: every x_R here has one L per batch (pooled 1, ViT 196 patches, CLIP 36 per image,
  72 per pair), and visual_context takes one dense (B, L, d) tensor.
(Model-level deviations, e.g. GPT-2's fused q|k|v split into q, k, v, are listed in tasks.py, above the task models.)

VL-PET: where the released code differs from the paper, we follow the code (HenryHZY/VL-PET
src/my_transformers/modeling_bart.py, BartEncoderLayer); these are what reproduce its numbers:
- middleY has no sigmoid and no scale: G = 1 + z (the paper's Fig. 3 draws sigmoid / +1 / scale boxes).
- small averages over EVERY token, padding and visual tokens included (no mask), as the release.
- middleX reads X + H1 (after the adapter), not X + H as drawn.
- the gate always reads the sub-layer input X, never H.
Where we differ from the release:
- its multi-head down-projection, N_h = 4 heads W_down,i: Linear(d, r / N_h) side by side, concatenated,
  IS one Linear(d, r) whose weight stacks the heads' rows (same function, parameters, init). We keep one
  matrix (a release checkpoint loads as torch.cat of the heads along dim 0), so there is no `heads`
  option: it would never change the computation. A route sees the concatenation, x_t of width r.
- routing (x_R) is ours; route 'none' is the release's module exactly.

Usage
-----
    import routing_peft as rp
    model = build_my_text_model()                   # any nn.Module; load its weights BEFORE wrapping
    rp.add_lora(model, ["attn.q", "attn.v"], r=128, alpha=128, route="matmul")
    # or Adapters (Houlsby places):
    # rp.add_adapters(model, ["attn.o", "mlp.fc2"], r=64, route="matmul", act=nn.GELU())
    # or VL-PET-large on the encoder's sub-layers and the decoder's cross-attention value projection:
    # rp.add_vlpet(model.encoder, ["attn", "mlp"], "large", r=96, route="matmul", gate_r=96)
    # rp.add_parallel_adapters(model.decoder, ["cross.v"], r=96, route="matmul")
    # or the parameterised baseline, LoRA with cross-attention (best with patch tokens, x_R (B, L, d)):
    # rp.add_cross_attention_lora(model, ["attn.q", "attn.v"], r=128, alpha=128, heads=4)
    rp.mark_trainable(model, extra=["ln1", "ln2", "head"])
    print(rp.count_parameters(model))              # (trainable, total); the same for every route
    with rp.visual_context(model, x_R):            # x_R: (B, L, d) or (B, d), d = the layers' width
        loss = loss_fn(model(tokens), targets)
    loss.backward()
    torch.save(rp.peft_state_dict(model), "peft.pt")    # only the PEFT weights
    # later, on a model wrapped the same way: rp.load_peft_state_dict(model, torch.load("peft.pt"))
    # route 'none' only: rp.merge_lora(model) folds B A into W0 and puts the plain layers back

Names: a target pattern matches a module whose qualified name equals it or ends with "." + pattern
(peft's convention): "attn.q" matches "blocks.3.attn.q", "query" matches a HF RoBERTa
"encoder.layer.0.attention.self.query". Wrapping replaces the module, so the base weights move to
"<name>.base.*" (LoRA, parallel adapter) or "<name>.module.*" (Adapter, VL-PET): load pretrained
weights before wrapping.

Beam search / expanded batches: every call of a routed layer needs x_R with the same batch size as
its input. When a batch is expanded (beam search repeats each example k times), the caller repeats
x_R the same way: x_R.repeat_interleave(k, dim=0). An encoder-decoder runs its encoder once on B
examples and its decoder on B k beams: encode inside visual_context(model, x_R), then decode from
that output inside visual_context(model, x_R.repeat_interleave(k, dim=0)).
"""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

# ---- routing functions: (x_t (B, N, r), x_v (B, L, r)) -> (B, N, r) --------------------------------


def _need_one_visual_token(route, x_v):
    if x_v.shape[1] != 1:
        raise ValueError(f"route {route!r} needs one visual vector per example (x_v of shape (B, 1, r)), "
                         f"got L={x_v.shape[1]} visual tokens; use route 'matmul' for several tokens")


def route_none(x_t, x_v):
    return x_t


def route_add(x_t, x_v):
    _need_one_visual_token("add", x_v)
    return x_t + x_v  # (B, N, r) + (B, 1, r): x_v broadcast over the N text positions


def route_mul(x_t, x_v):
    _need_one_visual_token("mul", x_v)
    return x_t * x_v


def route_matmul(x_t, x_v):
    # (B, N, r) @ (B, r, L) -> (B, N, L) similarities; @ (B, L, r) -> (B, N, r)
    return x_t @ x_v.transpose(-1, -2) @ x_v


def route_matmul_expand(x_t, x_v):
    _need_one_visual_token("matmul_expand", x_v)
    # x_t @ X with X = r x r matrix whose rows all equal x_v:  (sum_i x_t[..., i]) * x_v
    return x_t.sum(-1, keepdim=True) * x_v  # (B, N, 1) * (B, 1, r) -> (B, N, r)


def route_matmul_relu(x_t, x_v):
    # (B, N, r) @ (B, r, L) @ (B, L, r) -> (B, N, r)
    return torch.relu(x_t) @ torch.relu(x_v).transpose(-1, -2) @ x_v


def route_ones(x_t, x_v):
    _need_one_visual_token("ones", x_v)
    # (x_t x_v^T) 1 with 1 of shape (1, r): the similarity <x_t, x_v> copied into every channel
    return (x_t * x_v).sum(-1, keepdim=True).expand_as(x_t)  # (B, N, 1) -> (B, N, r)


ROUTES = {
    "none": route_none,
    "add": route_add,
    "mul": route_mul,
    "matmul": route_matmul,
    "matmul_expand": route_matmul_expand,
    "matmul_relu": route_matmul_relu,
    "ones": route_ones,
}


def _check_route(route):
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {sorted(ROUTES)}")


# ---- LoRA and Adapter -------------------------------------------------------------------------------


def _linear_shape(layer):
    """(in_features, out_features) of nn.Linear or of a Hugging Face GPT-2 Conv1D (weight (in, out), `nf`)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"expected a linear layer (nn.Linear or HF Conv1D), got {type(layer).__name__}")
    if hasattr(layer, "nf"):  # Conv1D: y = x @ weight + bias, weight (in, out)
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]  # nn.Linear: y = x @ weight.T + bias, weight (out, in)


class _PeftLayer(nn.Module):
    """What every PEFT layer shares: the route name and the visual feature set by visual_context.

    The one protocol the helpers rely on: a PEFT layer subclasses _PeftLayer and names, in `trained`,
    the children that hold its weights (everything else in it, the wrapped layer, stays frozen), and
    `route` says how x_R enters it: a name in ROUTES ('none': not at all; each subclass checks its own)
    or 'cross_attention' (CrossAttentionLoRA). visual_context binds x_R to every layer whose route is
    not 'none'."""

    def __init__(self, route, width):
        super().__init__()
        self.route = route
        self.width = width  # the width x_R must have
        self.x_R = None  # (B, L, width) inside visual_context, None outside

    def visual_tokens(self, x):
        """x_R for an input x of shape (B, N, d), checked against x; called only by routed layers."""
        if self.x_R is None:
            raise RuntimeError(f"route {self.route!r} needs the visual feature: call the model inside "
                               f"`with visual_context(model, x_R):`")
        if x.dim() != 3:
            raise ValueError(f"a routed layer expects input of shape (B, N, d), got {tuple(x.shape)}")
        if self.x_R.shape[0] != x.shape[0]:
            raise ValueError(f"x_R has batch {self.x_R.shape[0]} but the layer input has batch {x.shape[0]}; "
                             f"for an expanded batch (beam search) repeat x_R: x_R.repeat_interleave(k, dim=0)")
        return self.x_R.to(x.dtype)

    def extra_repr(self):
        return f"route={self.route!r}"


class LoRA(_PeftLayer):
    """base(x) + (alpha/r) B route(A drop(x), A drop(x_R)), in parallel to a linear layer `base`."""

    trained = ("A", "B")  # the children holding the LoRA weights

    def __init__(self, base, r, alpha, route="none", dropout=0.0, after_b=False):
        _check_route(route)
        d_in, d_out = _linear_shape(base)
        super().__init__(route, width=d_in)
        self.base = base
        self.A = nn.Linear(d_in, r, bias=False)  # nn.Linear's default init: Kaiming-uniform, a=sqrt(5)
        self.B = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.B.weight)
        self.drop = nn.Dropout(dropout)
        self.scale = alpha / r
        self.after_b = after_b

    def forward(self, x):
        y = self.base(x)
        if self.route == "none":
            return y + self.B(self.A(self.drop(x)) * self.scale)
        route, x_R = ROUTES[self.route], self.visual_tokens(x)
        x_t, x_v = self.A(self.drop(x)), self.A(self.drop(x_R))  # (B, N, r), (B, L, r)
        if self.after_b:  # ablation: route in full width, after B
            return y + route(self.B(x_t), self.B(x_v)) * self.scale
        return y + self.B(route(x_t, x_v) * self.scale)

    def delta_weight(self):
        """(alpha/r) B A as a (d_out, d_in) matrix, the update a merge adds to W0 (route 'none' only)."""
        return (self.B.weight.float() @ self.A.weight.float()) * self.scale

    def extra_repr(self):
        return f"route={self.route!r}, r={self.A.out_features}, scale={self.scale:g}, after_b={self.after_b}"


class CrossAttentionLoRA(_PeftLayer):
    """base(x) + (alpha/r) B W_up W_o drop(MHA(W_q x_t, W_k drop(x_v), W_v drop(x_v))), x_t = A_t drop(x),
    x_v = A_v drop(x_R), in parallel to a linear layer `base`: the routes' parameterised baseline, the release's
    "LoRA with cross-attention" (loralib/layers.py MergedLinearSplitAttn). Width w = r/4 inside."""

    trained = ("A_t", "A_v", "W_q", "W_k", "W_v", "W_o", "W_up", "B")

    def __init__(self, base, r, alpha, heads=4, dropout=0.0):
        if r % 4 or (r // 4) % heads:
            raise ValueError(f"CrossAttentionLoRA attends at width r/4 split into `heads` heads: r must be a "
                             f"multiple of 4 * heads, got r={r}, heads={heads}")
        d_in, d_out = _linear_shape(base)
        super().__init__("cross_attention", width=d_in)
        self.base = base
        w = r // 4
        self.A_t, self.A_v = nn.Linear(d_in, w, bias=False), nn.Linear(d_in, w, bias=False)  # text, image
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(w, w, bias=False) for _ in range(4))
        self.W_up = nn.Linear(w, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.B.weight)  # every other weight: nn.Linear's Kaiming-uniform, as the release
        self.heads = heads
        self.drop = nn.Dropout(dropout)
        self.scale = alpha / r

    def split_heads(self, z):
        """(B, T, w) -> (B, heads, T, w / heads)."""
        return z.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        y = self.base(x)
        x_t = self.A_t(self.drop(x))  # (B, N, w)
        x_v = self.A_v(self.drop(self.visual_tokens(x)))  # (B, L, w)
        q = self.split_heads(self.W_q(x_t))  # (B, h, N, w/h)
        k = self.split_heads(self.W_k(self.drop(x_v)))  # (B, h, L, w/h)
        v = self.split_heads(self.W_v(self.drop(x_v)))  # (B, h, L, w/h)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(w/h)) v over the L tokens: (B, h, N, w/h)
        a = a.transpose(1, 2).flatten(2)  # (B, N, h, w/h) -> (B, N, w), the heads side by side
        return y + self.B(self.W_up(self.W_o(self.drop(a))) * self.scale)

    def extra_repr(self):
        return f"r={self.W_up.out_features}, heads={self.heads}, scale={self.scale:g}"


class _Bottleneck(_PeftLayer):
    """What Adapter, VLPET and ParallelAdapter share: the routed branch
    W_up act(f(W_down h + b_down, W_down x_R + b_down)) + b_up."""

    trained = ("down", "up")  # the children holding the adapter weights

    def __init__(self, route, d_in, r, d_out, act):
        _check_route(route)
        if not isinstance(act, nn.Module):
            raise TypeError(f"act must be an nn.Module instance such as nn.GELU(), got {act!r}")
        super().__init__(route, width=d_in)
        self.down = nn.Linear(d_in, r)
        self.act = act
        self.up = nn.Linear(r, d_out)

    def branch(self, h):
        x_t = self.down(h)  # (B, N, r)
        if self.route != "none":
            x_t = ROUTES[self.route](x_t, self.down(self.visual_tokens(h)))  # x_v: (B, L, r)
        return self.up(self.act(x_t))  # (B, N, d_out)

    def extra_repr(self):
        return f"route={self.route!r}, r={self.down.out_features}"


class Adapter(_Bottleneck):
    """h + W_up act(route(W_down h + b_down, W_down x_R + b_down)) + b_up, after `module` (h = its output)."""

    def __init__(self, module, r, act, route="none"):
        _, width = _linear_shape(module)
        super().__init__(route, width, r, width, act)
        self.module = module
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.module(x)  # (B, N, width)
        return h + self.branch(h)


# ---- VL-PET: the granularity-controlled gates, the sub-layer wrapper, the parallel adapter -----------------


def _init_as_vlpet(*modules):
    """VL-PET's init of its layers (HF BART's _init_weights): Linear weights N(0, 0.02), biases 0."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


class LargeGate(nn.Module):
    """G = sigmoid(W_gu gelu_tanh(W_gd X + b_gd) + b_gu): (B, N, d), one value per token and channel."""

    def __init__(self, d, gate_r):
        super().__init__()
        self.down = nn.Linear(d, gate_r)
        self.up = nn.Linear(gate_r, d)
        _init_as_vlpet(self)

    def forward(self, X, H1):
        return torch.sigmoid(self.up(F.gelu(self.down(X), approximate="tanh")))


class MiddleXGate(nn.Module):
    """G = sigmoid(w . (X + H1) + b): (B, N, 1), one value per token (the release adds H1, not H)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Linear(d, 1)
        _init_as_vlpet(self)

    def forward(self, X, H1):
        return torch.sigmoid(self.w(X + H1))


class MiddleYGate(nn.Module):
    """G = 1 + z: (d,), one value per channel (no sigmoid, as the release)."""

    def __init__(self, d):
        super().__init__()
        self.z = nn.Parameter(torch.empty(d))
        nn.init.normal_(self.z, std=0.02)

    def forward(self, X, H1):
        return 1 + self.z


class SmallGate(nn.Module):
    """G = mean over the N tokens of sigmoid(w . [X; H1] + b): (B, 1, 1), one value per example.
    The mean takes every token, padding included, as the release (it has no mask)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Linear(2 * d, 1)
        _init_as_vlpet(self)

    def forward(self, X, H1):
        g = torch.sigmoid(self.w(torch.cat([X, H1], dim=-1)))  # (B, N, 2d) -> (B, N, 1)
        return g.mean(dim=1, keepdim=True)  # (B, 1, 1)


GATES = {"large": LargeGate, "middleX": MiddleXGate, "middleY": MiddleYGate, "small": SmallGate}


def _check_gate(gate, gate_r):
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; choose one of {sorted(GATES)}")
    if (gate == "large") != (gate_r is not None):
        raise ValueError(f"gate_r is the rank of the 'large' gate: required for it and refused for the others; "
                         f"got gate={gate!r}, gate_r={gate_r!r}")


def make_gate(gate, d, gate_r=None):
    """The gate module named `gate` for width d; gate_r (the rank of W_gd) for 'large' only."""
    _check_gate(gate, gate_r)
    return LargeGate(d, gate_r) if gate == "large" else GATES[gate](d)


def _sublayer_width(module):
    """Output width of a sub-layer: that of its last linear layer (attn.o / out_proj, mlp.fc2, or itself)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or hasattr(m, "nf")]
    if not linears:
        raise TypeError(f"cannot tell the width of {type(module).__name__}: it holds no linear layer")
    return _linear_shape(linears[-1])[1]


class VLPET(_Bottleneck):
    """VL-PET module around a whole sub-layer `module` (self-attention or FFN) whose input X and output H
    have width d: H1 = H + W_up gelu_tanh(route(W_down H + b_down, W_down x_R + b_down)) + b_up, out = H1 * G.

    `module` is called with its usual arguments; X is its first positional argument or the keyword
    `hidden_states` (Hugging Face's name). A module may return a tuple whose first element is H (HF
    attention): the rest passes through. `gate` is a module G(X, H1) (see GATES, make_gate). On a
    Hugging Face BART only the attention modules can be wrapped: its FFN (fc1, act, fc2) is inline in
    the layer's forward, not a module."""

    trained = ("down", "up", "gate")

    def __init__(self, module, r, gate, route="none"):
        d = _sublayer_width(module)
        super().__init__(route, d, r, d, nn.GELU(approximate="tanh"))
        self.module = module
        self.gate = gate
        _init_as_vlpet(self.down, self.up)  # each gate initialises itself as the release

    def forward(self, *args, **kwargs):
        X = args[0] if args else kwargs.get("hidden_states")
        if X is None:
            raise TypeError("VLPET: the sub-layer input must be the first positional argument or `hidden_states`")
        out = self.module(*args, **kwargs)
        H = out[0] if isinstance(out, tuple) else out  # (B, N, d)
        H1 = H + self.branch(H)
        H2 = H1 * self.gate(X, H1)  # G: (B, N, d), (B, N, 1), (d,) or (B, 1, 1)
        return (H2, *out[1:]) if isinstance(out, tuple) else H2

    def extra_repr(self):
        return f"route={self.route!r}, r={self.down.out_features}, gate={type(self.gate).__name__}"


class ParallelAdapter(_Bottleneck):
    """base(x) + W_up gelu_tanh(route(W_down x + b_down, W_down x_R + b_down)) + b_up, parallel to a linear
    layer `base` (VL-PET's decoder module, on the cross-attention value projection); init as VL-PET."""

    def __init__(self, base, r, route="none"):
        d_in, d_out = _linear_shape(base)
        super().__init__(route, d_in, r, d_out, nn.GELU(approximate="tanh"))
        self.base = base
        _init_as_vlpet(self.down, self.up)

    def forward(self, x):
        return self.base(x) + self.branch(x)


# ---- injection ----------------------------------------------------------------------------------------


def _matches(name, pattern):
    """True when the dotted name equals pattern or ends with "." + pattern (whole components only)."""
    return ("." + name).endswith("." + pattern)


def _replace_matches(model, targets, wrap):
    """Replace every module whose name matches a target pattern by wrap(module); returns the names."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets or any(not t for t in targets):
        raise ValueError(f"targets must be a non-empty list of non-empty module-name patterns, got {targets!r}")
    names = [name for name, _ in model.named_modules() if name and any(_matches(name, t) for t in targets)]
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches targets {list(targets)}; "
                         f"module names look like {[n for n, _ in model.named_modules() if n][:8]}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child)))
    return names


def add_lora(model, targets, r, alpha, route, dropout=0.0, after_b=False):
    """Wrap every linear layer named by `targets` in a LoRA with the given route; returns the model."""
    _check_route(route)
    _replace_matches(model, targets, lambda m: LoRA(m, r, alpha, route, dropout, after_b))
    return model


def add_cross_attention_lora(model, targets, r, alpha, heads=4, dropout=0.0):
    """Wrap every linear layer named by `targets` in a CrossAttentionLoRA (the paper's parameterised baseline;
    recommended places: q and v of every self-attention, as LoRA); returns the model."""
    _replace_matches(model, targets, lambda m: CrossAttentionLoRA(m, r, alpha, heads, dropout))
    return model


def add_adapters(model, targets, r, route, act):
    """Insert an Adapter after every linear layer named by `targets`; act: an nn.Module such as nn.GELU().
    Each adapter gets its own deep copy of act. Returns the model."""
    _check_route(route)
    _replace_matches(model, targets, lambda m: Adapter(m, r, copy.deepcopy(act), route))
    return model


def add_vlpet(model, targets, gate, r, route, gate_r=None):
    """Wrap every sub-layer named by `targets` (e.g. "attn", "mlp"; HF BART: "self_attn") in a VL-PET
    module with the given gate ('large' needs gate_r) and route; returns the model. Each module gets its
    own gate. Restrict it to the encoder by passing the encoder: add_vlpet(model.encoder, ...)."""
    _check_route(route)
    _check_gate(gate, gate_r)
    _replace_matches(model, targets, lambda m: VLPET(m, r, make_gate(gate, _sublayer_width(m), gate_r), route))
    return model


def add_parallel_adapters(model, targets, r, route):
    """Add a ParallelAdapter to every linear layer named by `targets` (VL-PET: "encoder_attn.v_proj" on HF
    BART, "cross.v" on ours); returns the model."""
    _check_route(route)
    _replace_matches(model, targets, lambda m: ParallelAdapter(m, r, route))
    return model


def _peft_layers(model):
    """(qualified name, layer) of every _PeftLayer: LoRA, CrossAttentionLoRA, Adapter, VLPET, ParallelAdapter."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _PeftLayer)]


def _peft_parameters(model):
    """(qualified name, parameter) of every PEFT weight in the model (the children named in `trained`)."""
    for name, m in _peft_layers(model):
        for child in m.trained:
            for pname, p in getattr(m, child).named_parameters():
                yield f"{name}.{child}.{pname}", p


# ---- training helpers ---------------------------------------------------------------------------------


def mark_trainable(model, extra=()):
    """Freeze everything except the PEFT weights and the parameters named by `extra`.

    A pattern in `extra` selects a parameter when the parameter's name, or the name of a module that
    contains it, equals the pattern or ends with "." + pattern: "ln1" selects blocks.0.ln1.weight and
    blocks.0.ln1.bias, "head" everything under the module `head`. A pattern selecting nothing is an error.
    Returns the model."""
    extra = [extra] if isinstance(extra, str) else list(extra)
    peft = {id(p) for _, p in _peft_parameters(model)}
    used = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]  # a.b.c -> a, a.b, a.b.c
        hits = {pat for pat in extra if any(_matches(pre, pat) for pre in prefixes)}
        used |= hits
        p.requires_grad_(id(p) in peft or bool(hits))
    unused = [pat for pat in extra if pat not in used]
    if unused:
        raise ValueError(f"mark_trainable: extra patterns {unused} match no parameter")
    return model


def count_parameters(model):
    """(trainable, total) numbers of parameter elements (shared parameters counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextlib.contextmanager
def visual_context(model, x_R):
    """Within the block every routed layer of `model` sees x_R, of shape (B, L, d) or (B, d) (= L of 1).

    d must equal each routed layer's width (LoRA, CrossAttentionLoRA, parallel adapter: its input width;
    Adapter: its module's output width; VL-PET: its sub-layer's width).
    The batch B must equal the batch of every call inside the block (beam search: repeat x_R per beam).
    x_R is always cleared on exit, also on an exception; layers with route 'none' ignore it."""
    if x_R.dim() == 2:
        x_R = x_R[:, None, :]  # (B, d) -> (B, 1, d)
    if x_R.dim() != 3:
        raise ValueError(f"x_R must have shape (B, L, d) or (B, d), got {tuple(x_R.shape)}")
    layers = [(name, m) for name, m in _peft_layers(model) if m.route != "none"]
    for name, m in layers:
        if x_R.shape[-1] != m.width:
            raise ValueError(f"x_R has width {x_R.shape[-1]} but layer {name!r} ({type(m).__name__}) "
                             f"needs width {m.width}; project the visual feature first")
        if m.x_R is not None:
            raise RuntimeError(f"layer {name!r} already has a visual feature: nested visual_context?")
    try:
        for _, m in layers:
            m.x_R = x_R
        yield model
    finally:
        for _, m in layers:
            m.x_R = None


# ---- saving and merging -------------------------------------------------------------------------------


def peft_state_dict(model):
    """Only the PEFT weights: {qualified name: tensor}, e.g. 'blocks.0.attn.q.A.weight', 'blocks.0.mlp.gate.z'."""
    return {name: p.detach() for name, p in _peft_parameters(model)}


def load_peft_state_dict(model, state_dict):
    """Copy a peft_state_dict into a model wrapped the same way; strict: any mismatch is an error."""
    own = dict(_peft_parameters(model))
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state_dict.keys()) if state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError("load_peft_state_dict: the state dict does not fit the model's PEFT layers "
                         f"(same targets, r and kind needed)\n  missing: {missing}\n  unexpected: {unexpected}"
                         f"\n  shape mismatches: {shapes}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state_dict[name])
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRA into its base layer (W0 += (alpha/r) B A) and put the base layer back in place.

    Only route 'none' can be merged: a routed update depends on the image. Refuses (before changing
    anything) if any LoRA is routed or the model holds a CrossAttentionLoRA. Returns the model."""
    loras = [(name, m) for name, m in _peft_layers(model) if isinstance(m, (LoRA, CrossAttentionLoRA))]
    routed = [f"{name} (route {m.route!r})" for name, m in loras if m.route != "none"]
    if routed:
        raise ValueError(f"cannot merge routed LoRA layers, their update depends on x_R: {routed}")
    if not loras:
        raise ValueError("merge_lora: the model has no LoRA layer")
    for name, m in loras:
        delta = m.delta_weight()  # (d_out, d_in)
        if hasattr(m.base, "nf"):  # HF Conv1D stores the weight as (d_in, d_out)
            delta = delta.T
        m.base.weight += delta.to(m.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return model
