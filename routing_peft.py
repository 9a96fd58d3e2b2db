"""Routing functions for vision-language PEFT with low-rank bottlenecks (LoRA and Adapter).

One self-contained file (imports only torch) to copy into any project. It wraps layers of an
existing model, ours or anyone's (a Hugging Face model included), without changing the model's code.

    python -m pytest -q tests/test_routing_peft.py     # the tests
    python bench.py routing                            # speed: routed LoRA vs plain LoRA vs peft

Paper: Qu, Tuytelaars, Moens, "Introducing Routing Functions to Vision-Language Parameter-Efficient
Fine-Tuning with Low-Rank Bottlenecks", ECCV 2024, arXiv 2403.09377.

The method
----------
A LoRA or Adapter squeezes a text hidden state through a low-rank bottleneck of width r. The visual
feature x_R (by default the frozen ViT pooler output, one vector per image) goes through the SAME
down-projection, and a routing function f mixes the two inside the bottleneck, adding no parameter:

    x_t = W_down x          (B, N, r)   N text positions
    x_v = W_down x_R        (B, L, r)   L visual tokens (L = 1 for a pooled feature)

    route           f(x_t, x_v)                  L       note
    none            x_t                          any     plain LoRA / Adapter, x_R unused
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
    Adapter (after a module whose output is h):
            h + W_up act(f(W_down h + b_down, W_down x_R + b_down)) + b_up,   W_up, b_up: zeros.

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
(Model-level deviations, e.g. GPT-2's fused q|k|v split into q, k, v, live in models.py / train.py.)

Usage
-----
    import routing_peft as rp
    model = build_my_text_model()                   # any nn.Module; load its weights BEFORE wrapping
    rp.add_lora(model, ["attn.q", "attn.v"], r=128, alpha=128, route="matmul")
    # or Adapters (Houlsby places):
    # rp.add_adapters(model, ["attn.o", "mlp.fc2"], r=64, route="matmul", act=nn.GELU())
    rp.mark_trainable(model, extra=["ln1", "ln2", "head"])
    print(rp.count_parameters(model))              # (trainable, total); the same for every route
    with rp.visual_context(model, x_R):            # x_R: (B, L, d) or (B, d), d = the layers' width
        loss = loss_fn(model(tokens), targets)
    loss.backward()
    torch.save(rp.peft_state_dict(model), "peft.pt")    # only the LoRA / Adapter weights
    # later, on a model wrapped the same way: rp.load_peft_state_dict(model, torch.load("peft.pt"))
    # route 'none' only: rp.merge_lora(model) folds B A into W0 and puts the plain layers back

Names: a target pattern matches a module whose qualified name equals it or ends with "." + pattern
(peft's convention): "attn.q" matches "blocks.3.attn.q", "query" matches a HF RoBERTa
"encoder.layer.0.attention.self.query". Wrapping replaces the module, so the base weights move to
"<name>.base.*" (LoRA) or "<name>.module.*" (Adapter): load pretrained weights before wrapping.

Beam search / expanded batches: every call of a routed layer needs x_R with the same batch size as
its input. When a batch is expanded (beam search repeats each example k times), the caller repeats
x_R the same way: x_R.repeat_interleave(k, dim=0).
"""
import contextlib
import copy

import torch
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


# ---- the two wrappers ---------------------------------------------------------------------------------


def _linear_shape(layer):
    """(in_features, out_features) of nn.Linear or of a Hugging Face GPT-2 Conv1D (weight (in, out), `nf`)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"expected a linear layer (nn.Linear or HF Conv1D), got {type(layer).__name__}")
    if hasattr(layer, "nf"):  # Conv1D: y = x @ weight + bias, weight (in, out)
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]  # nn.Linear: y = x @ weight.T + bias, weight (out, in)


class _PeftLayer(nn.Module):
    """What LoRA and Adapter share: the route name and the visual feature set by visual_context."""

    def __init__(self, route, width):
        super().__init__()
        _check_route(route)
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


class Adapter(_PeftLayer):
    """h + W_up act(route(W_down h + b_down, W_down x_R + b_down)) + b_up, after `module` (h = its output)."""

    trained = ("down", "up")  # the children holding the Adapter weights

    def __init__(self, module, r, act, route="none"):
        if not isinstance(act, nn.Module):
            raise TypeError(f"act must be an nn.Module instance such as nn.GELU(), got {act!r}")
        _, width = _linear_shape(module)
        super().__init__(route, width=width)
        self.module = module
        self.down = nn.Linear(width, r)
        self.act = act
        self.up = nn.Linear(r, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.module(x)  # (B, N, width)
        x_t = self.down(h)  # (B, N, r)
        if self.route != "none":
            x_t = ROUTES[self.route](x_t, self.down(self.visual_tokens(h)))  # x_v: (B, L, r)
        return h + self.up(self.act(x_t))

    def extra_repr(self):
        return f"route={self.route!r}, r={self.down.out_features}"


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


def add_adapters(model, targets, r, route, act):
    """Insert an Adapter after every linear layer named by `targets`; act: an nn.Module such as nn.GELU().
    Each adapter gets its own deep copy of act. Returns the model."""
    _check_route(route)
    _replace_matches(model, targets, lambda m: Adapter(m, r, copy.deepcopy(act), route))
    return model


def _peft_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _PeftLayer)]


def _peft_parameters(model):
    """(qualified name, parameter) of every LoRA / Adapter weight in the model."""
    for name, m in _peft_layers(model):
        for child in m.trained:
            for pname, p in getattr(m, child).named_parameters():
                yield f"{name}.{child}.{pname}", p


# ---- training helpers ---------------------------------------------------------------------------------


def mark_trainable(model, extra=()):
    """Freeze everything except the LoRA / Adapter weights and the parameters named by `extra`.

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

    d must equal each routed layer's width (LoRA: its input width; Adapter: its module's output width).
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
    """Only the LoRA / Adapter weights: {qualified name: tensor}, e.g. 'blocks.0.attn.q.A.weight'."""
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
    anything) if any LoRA is routed. Returns the model."""
    loras = [(name, m) for name, m in _peft_layers(model) if isinstance(m, LoRA)]
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
