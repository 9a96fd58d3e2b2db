"""Tests of routing_peft.py: routes, LoRA / Adapter / VL-PET invariants, context, state, merging, foreign models,
VL-PET's hand-worked gates and its parameter counts on bart-base shapes.

    python -m pytest -q tests/test_routing_peft.py
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routing_peft as rp

ROUTED = [name for name in rp.ROUTES if name != "none"]
MULTIPLICATIVE = ["mul", "matmul", "matmul_expand", "matmul_relu", "ones"]  # products of >= 2 factors
D = 16


class Toy(nn.Module):
    """A two-block stand-in with our module tree: blocks[i].attn.{q,k,v,o}, blocks[i].mlp.{fc1,fc2}, ln1, ln2."""

    def __init__(self, d=D, n_blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(n_blocks):
            block = nn.Module()
            block.ln1, block.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            block.attn = nn.Module()
            block.attn.q, block.attn.k, block.attn.v, block.attn.o = (nn.Linear(d, d) for _ in range(4))
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.blocks.append(block)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x (B, N, d) -> (B, N, 3)
        for b in self.blocks:
            h = b.ln1(x)
            att = torch.softmax(b.attn.q(h) @ b.attn.k(h).transpose(-1, -2), dim=-1)  # (B, N, N)
            x = x + b.attn.o(att @ b.attn.v(h))
            x = x + b.mlp.fc2(torch.relu(b.mlp.fc1(b.ln2(x))))
        return self.head(x)


def toy_inputs(batch=3, n=5, d=D, L=1):
    return torch.randn(batch, n, d), torch.randn(batch, L, d)


def lora_toy(route, **kw):
    return rp.add_lora(Toy(), ["attn.q", "attn.v"], r=4, alpha=8, route=route, **kw)


def adapter_toy(route):
    return rp.add_adapters(Toy(), ["attn.o", "mlp.fc2"], r=4, route=route, act=nn.GELU())


def randomize_up(model):
    """Give the zero-initialised B / W_up random values, as after some training."""
    with torch.no_grad():
        for name, p in rp.peft_state_dict(model).items():
            if ".B." in name or ".up." in name:
                p.normal_(0, 0.1)
    return model


def run(model, x, x_R):
    with rp.visual_context(model, x_R):
        return model(x)


# ---- routes ---------------------------------------------------------------------------------------------

def test_routes_against_hand_computed_example():
    x_t = torch.tensor([[[1., 2., 3.], [2., -1., 0.]]])  # (1, 2, 3)
    x_v = torch.tensor([[[1., 0., -1.]]])  # (1, 1, 3); <x_t, x_v> = -2 and 2, row sums 6 and 1
    expected = {
        "none": [[1, 2, 3], [2, -1, 0]],
        "add": [[2, 2, 2], [3, -1, -1]],
        "mul": [[1, 0, -3], [2, 0, 0]],
        "matmul": [[-2, 0, 2], [2, 0, -2]],  # <x_t, x_v> x_v
        "matmul_expand": [[6, 0, -6], [1, 0, -1]],  # (sum x_t) x_v
        "matmul_relu": [[1, 0, -1], [2, 0, -2]],  # <relu x_t, relu x_v> = 1, 2; times x_v
        "ones": [[-2, -2, -2], [2, 2, 2]],  # <x_t, x_v> in every channel
    }
    assert set(expected) == set(rp.ROUTES)
    for name, want in expected.items():
        assert torch.equal(rp.ROUTES[name](x_t, x_v), torch.tensor([want], dtype=torch.float32)), name


def test_matmul_expand_is_sum_times_x_v_and_the_expanded_matrix():
    x_t, x_v = torch.randn(2, 5, 4), torch.randn(2, 1, 4)
    out = rp.ROUTES["matmul_expand"](x_t, x_v)
    torch.testing.assert_close(out, x_t.sum(-1, keepdim=True) * x_v)
    expanded = x_v.expand(2, 4, 4)  # the r x r matrix x''_v whose rows all equal x_v
    torch.testing.assert_close(out, x_t @ expanded)


def test_matmul_with_several_visual_tokens_uses_a_transpose():
    x_t, x_v = torch.randn(2, 5, 4), torch.randn(2, 3, 4)  # L = 3
    out = rp.ROUTES["matmul"](x_t, x_v)
    want = torch.einsum("bnr,blr,bls->bns", x_t, x_v, x_v)  # sum_l <x_t, x_v,l> x_v,l
    torch.testing.assert_close(out, want)
    released = x_t @ x_v.reshape(2, 4, 3) @ x_v  # the release's reshape: same only for L = 1
    assert not torch.allclose(out, released)
    one = torch.randn(2, 1, 4)
    torch.testing.assert_close(rp.ROUTES["matmul"](x_t, one), x_t @ one.reshape(2, 4, 1) @ one)
    assert rp.ROUTES["matmul_relu"](x_t, x_v).shape == (2, 5, 4)


@pytest.mark.parametrize("route", ["add", "mul", "matmul_expand", "ones"])
def test_single_vector_routes_refuse_several_visual_tokens(route):
    with pytest.raises(ValueError, match="one visual vector"):
        rp.ROUTES[route](torch.randn(2, 5, 4), torch.randn(2, 3, 4))


def test_unknown_route_is_an_error():
    with pytest.raises(ValueError, match="unknown route 'matmull'"):
        lora_toy("matmull")
    for make in (lambda: rp.LoRA(nn.Linear(D, D), 4, 4, "mull"),
                 lambda: rp.Adapter(nn.Linear(D, D), 4, nn.GELU(), "mull")):
        with pytest.raises(ValueError, match="unknown route 'mull'"):  # the layers check too, not only add_*
            make()


# ---- invariants ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", list(rp.ROUTES))
def test_identity_at_init(route):
    x, x_R = toy_inputs()
    base = Toy()
    want = base(x)
    for wrapped in (rp.add_lora(copy.deepcopy(base), ["attn.q", "attn.v"], 4, 8, route),
                    rp.add_lora(copy.deepcopy(base), ["attn.q", "attn.v"], 4, 8, route, after_b=True),
                    rp.add_adapters(copy.deepcopy(base), ["attn.o", "mlp.fc2"], 4, route, nn.GELU())):
        assert torch.equal(run(wrapped, x, x_R), want)


def test_injection_names_and_target_errors():
    model = lora_toy("matmul")
    wrapped = [name for name, m in model.named_modules() if isinstance(m, rp.LoRA)]
    assert wrapped == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    with pytest.raises(ValueError, match="no module .* matches"):
        rp.add_lora(Toy(), ["ttn.q"], 4, 4, "none")  # whole name components only
    with pytest.raises(TypeError, match="linear layer"):
        rp.add_lora(Toy(), ["attn"], 4, 4, "none")
    with pytest.raises(TypeError, match="act must be an nn.Module"):
        rp.add_adapters(Toy(), ["attn.o"], 4, "none", act=torch.relu)


def test_one_step_changes_only_trainable_parameters():
    x, x_R = toy_inputs()
    model = rp.mark_trainable(lora_toy("matmul"), extra=["ln1", "head"])
    rp.add_adapters(model, ["mlp.fc2"], 4, "add", nn.GELU())  # adapters added later are frozen ...
    rp.mark_trainable(model, extra=["ln1", "head"])  # ... until marked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # every parameter; frozen ones get no grad
    for _ in range(2):  # step 1 moves B / W_up off zero, step 2 then moves A / W_down
        opt.zero_grad()
        run(model, x, x_R).square().mean().backward()
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".A." in n or ".B." in n or ".down." in n or ".up." in n
                         or ".ln1." in n or n.startswith("head.")}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def test_mark_trainable_pattern_errors():
    with pytest.raises(ValueError, match=r"\['lnx'\] match no parameter"):
        rp.mark_trainable(lora_toy("none"), extra=["ln1", "lnx"])


@pytest.mark.parametrize("wrap", [lora_toy, adapter_toy])
def test_routing_adds_zero_parameters(wrap):
    counts = {route: rp.count_parameters(rp.mark_trainable(wrap(route))) for route in rp.ROUTES}
    assert len(set(counts.values())) == 1, counts
    trainable, total = counts["none"]
    per_layer = 2 * 4 * D if wrap is lora_toy else 2 * 4 * D + 4 + D  # A and B; W_down, b_down, W_up, b_up
    assert trainable == 4 * per_layer
    assert total == rp.count_parameters(Toy())[1] + trainable


def test_after_b_has_exactly_zero_gradient_while_the_bottleneck_does_not():
    # With B = 0 the full-width inputs of the afterB route are u = B A x = 0 and u_v = B A x_R = 0. Every
    # multiplicative route is a product of >= 2 factors each linear in (u, u_v), so its derivative at
    # (0, 0) vanishes: dL/dB = 0, and dL/dA = 0 too (it flows through B = 0). Zero gradient at a point
    # where B = 0 means B never moves: the variant can never train. (none and add are linear in (u, u_v):
    # afterB add is plain LoRA on x + x_R and does train.)
    # In the bottleneck, route(A x, A x_R) is nonzero, so dL/dB != 0 at init for every route; dL/dA is 0
    # at init for every placement (B = 0) and becomes nonzero once B has moved.
    x, x_R = toy_inputs()
    grad_out = torch.randn(3, 5, 6)
    for route in rp.ROUTES:
        for after_b in (False, True):
            torch.manual_seed(0)
            layer = rp.LoRA(nn.Linear(D, 6).requires_grad_(False), r=4, alpha=4, route=route, after_b=after_b)
            opt = torch.optim.Adam([layer.A.weight, layer.B.weight], lr=1e-2)
            with rp.visual_context(layer, x_R):
                layer(x).backward(grad_out)
                assert torch.count_nonzero(layer.A.weight.grad) == 0, route
                if after_b and route in MULTIPLICATIVE:
                    assert torch.count_nonzero(layer.B.weight.grad) == 0, route
                    for _ in range(3):
                        opt.step()
                        opt.zero_grad()
                        layer(x).backward(grad_out)
                    assert torch.count_nonzero(layer.B.weight) == 0, route  # stuck at zero forever
                else:
                    assert torch.count_nonzero(layer.B.weight.grad) > 0, (route, after_b)
                    opt.step()
                    opt.zero_grad()
                    layer(x).backward(grad_out)
                    assert torch.count_nonzero(layer.A.weight.grad) > 0, (route, after_b)


def test_train_and_eval_have_no_side_effect():
    x, x_R = toy_inputs()
    model = randomize_up(lora_toy("none"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    model.eval()
    model.train()
    model.eval()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert isinstance(model.blocks[0].attn.q, rp.LoRA)
    assert torch.equal(model(x), out)


def test_wrappers_follow_the_formulas():
    x, x_R = toy_inputs(L=2)
    lora = randomize_up(rp.LoRA(nn.Linear(D, 6), r=4, alpha=8, route="matmul"))
    adapter = randomize_up(rp.Adapter(nn.Linear(D, 6), r=4, act=nn.ReLU(), route="matmul"))
    with torch.no_grad():
        A, B = lora.A.weight, lora.B.weight  # (4, D), (6, 4)
        x_t, x_v = x @ A.T, x_R @ A.T  # (3, 5, 4), (3, 2, 4)
        want_lora = lora.base(x) + (8 / 4) * (x_t @ x_v.transpose(1, 2) @ x_v) @ B.T
        h = adapter.module(x)  # (3, 5, 6)
        down, up = adapter.down, adapter.up
        a_t, a_v = h @ down.weight.T + down.bias, torch.randn(3, 2, 6)
        with rp.visual_context(adapter, a_v):
            got_adapter = adapter(x)
        a_v = a_v @ down.weight.T + down.bias
        want_adapter = h + torch.relu(a_t @ a_v.transpose(1, 2) @ a_v) @ up.weight.T + up.bias
    with rp.visual_context(lora, x_R):
        torch.testing.assert_close(lora(x), want_lora)
    torch.testing.assert_close(got_adapter, want_adapter)


def test_dropout_applies_to_x_and_x_R_in_training_only():
    layer = rp.LoRA(nn.Linear(D, D), r=4, alpha=4, route="add", dropout=0.5)
    randomize_up(layer)
    x, x_R = toy_inputs()
    with rp.visual_context(layer, x_R):
        assert not torch.equal(layer(x), layer(x))
        zeros = torch.zeros_like(x)  # only the x_R term is left: it must be dropped out too
        assert not torch.equal(layer(zeros), layer(zeros))
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        with torch.no_grad():  # eval: A on undropped x and x_R
            want = layer.base(x) + layer.B(((x @ layer.A.weight.T) + x_R @ layer.A.weight.T) * layer.scale)
        torch.testing.assert_close(layer(x), want)


# ---- visual context --------------------------------------------------------------------------------------

def test_visual_context_errors_and_clearing():
    x, x_R = toy_inputs()
    model = lora_toy("matmul")
    with pytest.raises(RuntimeError, match="visual_context"):
        model(x)
    rp.add_lora(Toy(), ["attn.q"], 4, 4, "none")(x)  # route none needs no context
    with pytest.raises(ValueError, match="width 7 .* needs width 16"):
        with rp.visual_context(model, torch.randn(3, 7)):
            pass
    with pytest.raises(ValueError, match="repeat_interleave"):
        run(model, x, x_R[:1])
    with pytest.raises(ZeroDivisionError):
        with rp.visual_context(model, x_R):
            1 / 0
    assert all(m.x_R is None for m in model.modules() if isinstance(m, rp.LoRA))
    with pytest.raises(RuntimeError, match="nested"):
        with rp.visual_context(model, x_R), rp.visual_context(model, x_R):
            pass
    assert all(m.x_R is None for m in model.modules() if isinstance(m, rp.LoRA))
    torch.testing.assert_close(run(randomize_up(model), x, x_R[:, 0]), run(model, x, x_R))  # (B, d) == (B, 1, d)


def test_expanded_batch_with_repeated_x_R_matches_per_example():
    x, x_R = toy_inputs()
    model = randomize_up(adapter_toy("mul"))
    out = run(model, x, x_R)
    beams = 4  # beam search: each example repeated, the caller repeats x_R the same way
    out_beams = run(model, x.repeat_interleave(beams, 0), x_R.repeat_interleave(beams, 0))
    torch.testing.assert_close(out_beams, out.repeat_interleave(beams, 0))


# ---- state, merging, pickling ----------------------------------------------------------------------------

def build_both(seed=0):
    torch.manual_seed(seed)
    model = rp.add_lora(Toy(), ["attn.q", "attn.v"], 4, 8, "matmul")
    return rp.add_adapters(model, ["mlp.fc2"], 4, "add", nn.GELU())


def test_peft_state_dict_round_trip_into_a_fresh_model():
    x, x_R = toy_inputs()
    trained = randomize_up(build_both(seed=0))
    sd = rp.peft_state_dict(trained)
    assert sorted(sd) == sorted(
        [f"blocks.{i}.attn.{p}.{m}.weight" for i in range(2) for p in "qv" for m in "AB"]
        + [f"blocks.{i}.mlp.fc2.{m}.{w}" for i in range(2) for m in ("down", "up") for w in ("weight", "bias")])
    fresh = build_both(seed=1)
    fresh.load_state_dict(trained.state_dict())  # same frozen backbone ...
    with torch.no_grad():
        for p in rp.peft_state_dict(fresh).values():  # ... different PEFT weights
            p.zero_()
    assert not torch.equal(run(fresh, x, x_R), run(trained, x, x_R))
    rp.load_peft_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(run(fresh, x, x_R), run(trained, x, x_R))


def test_load_peft_state_dict_is_strict():
    sd = rp.peft_state_dict(build_both())
    model = build_both()
    bad = dict(sd)
    bad.pop("blocks.0.attn.q.A.weight")
    bad["blocks.0.attn.k.A.weight"] = torch.zeros(4, D)
    with pytest.raises(ValueError, match=r"missing: \['blocks.0.attn.q.A.weight'\]\n.*unexpected: \['blocks.0.attn.k"):
        rp.load_peft_state_dict(model, bad)
    wider = rp.add_lora(Toy(), ["attn.q", "attn.v"], 8, 8, "matmul")
    rp.add_adapters(wider, ["mlp.fc2"], 4, "add", nn.GELU())
    with pytest.raises(ValueError, match=r"blocks.0.attn.q.A.weight: file \(4, 16\) vs model \(8, 16\)"):
        rp.load_peft_state_dict(wider, sd)


def test_merge_none_is_equivalent_and_restores_plain_layers():
    x = torch.randn(3, 5, D)
    model = randomize_up(lora_toy("none"))
    want = model(x)
    rp.merge_lora(model)
    assert not any(isinstance(m, rp.LoRA) for m in model.modules())
    assert type(model.blocks[0].attn.q) is nn.Linear
    assert set(model.state_dict()) == set(Toy().state_dict())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_merge_refuses_routed_layers_and_changes_nothing():
    model = randomize_up(rp.add_lora(lora_toy("none"), ["attn.k"], 4, 4, "mul"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks.0.attn.k \(route 'mul'\)"):
        rp.merge_lora(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert isinstance(model.blocks[0].attn.q, rp.LoRA)


def test_pickling_round_trip():
    x, x_R = toy_inputs()
    model = randomize_up(build_both())
    want = run(model, x, x_R)
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(run(again, x, x_R), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(run(torch.load(buf, weights_only=False), x, x_R), want)


# ---- foreign models --------------------------------------------------------------------------------------

def test_hf_roberta_unchanged():
    import transformers
    cfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    base = transformers.RobertaModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(3, 100, (2, 7))
    x_R = torch.randn(2, 32)
    want = base(ids).last_hidden_state
    model = rp.add_lora(copy.deepcopy(base), ["query", "value"], 4, 4, "matmul")
    rp.add_adapters(model, ["output.dense"], 4, "mul", nn.GELU())  # attention.output.dense and output.dense
    assert sum(isinstance(m, rp.Adapter) for m in model.modules()) == 4
    rp.mark_trainable(model, extra=["LayerNorm"])
    assert torch.equal(run(model, ids, x_R).last_hidden_state, want)
    randomize_up(model)
    out = run(model, ids, x_R).last_hidden_state
    assert not torch.allclose(out, want)
    out.sum().backward()
    assert model.encoder.layer[0].attention.self.query.A.weight.grad.abs().sum() > 0


def test_hf_gpt2_conv1d_lora_merge_and_beam_search():
    import transformers
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 100, (2, 6))
    x_R = torch.randn(2, 1, 32)
    want = base(ids).logits
    model = rp.add_lora(copy.deepcopy(base), ["c_attn"], 4, 4, "matmul")  # Conv1D, weight (in, out)
    rp.add_adapters(model, ["c_proj"], 4, "add", nn.GELU(approximate="tanh"))  # attn.c_proj and mlp.c_proj
    assert torch.equal(run(model, ids, x_R).logits, want)
    randomize_up(model)

    def beam_search(ids, x_R):
        with rp.visual_context(model, x_R.repeat_interleave(3, 0)):  # beam search expands the batch 3 times
            return model.generate(ids, num_beams=3, max_new_tokens=5, do_sample=False).tolist()

    strong = x_R * 30  # a visual feature large enough to change the decoded tokens
    both = beam_search(ids, strong)  # each example's beams see its own x_R: as if it were decoded alone
    assert both == [beam_search(ids[i:i + 1], strong[i:i + 1])[0] for i in range(2)]
    assert both != beam_search(ids, strong.flip(0))  # and x_R steers the routed decoder

    plain = randomize_up(rp.add_lora(copy.deepcopy(base), ["c_attn"], 4, 4, "none"))
    want = plain(ids).logits
    rp.merge_lora(plain)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(plain(ids).logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "vit"])
def test_our_backbones_unchanged_and_trainable(arch):
    import models
    cfg = models.Config(arch=arch, d_model=32, n_layers=2, n_heads=4, d_ff=64, ln_eps=1e-5, vocab_size=100,
                        max_positions=64, image_size=32, patch_size=16)
    base = models.build_model(cfg).eval()
    x_R = torch.randn(2, 32)  # pooled visual feature, also the one-vector prefix of the text models
    inputs = {"roberta": dict(input_ids=torch.randint(3, 100, (2, 7)), prefix=x_R[:, None]),
              "gpt2": dict(input_ids=torch.randint(0, 100, (2, 7)), prefix=x_R[:, None]),
              "vit": dict(pixel_values=torch.randn(2, 3, 32, 32))}[arch]

    def forward(model):  # -> (2, T, d or V); ViT returns (hidden states, pooled)
        with rp.visual_context(model, x_R):
            out = model(**inputs)
        return out[0] if arch == "vit" else out

    want = forward(base)
    model = rp.add_lora(copy.deepcopy(base), ["attn.q", "attn.v"], 4, 4, "matmul")
    rp.add_adapters(model, ["attn.o", "mlp.fc2"], 4, "add", nn.GELU())
    rp.mark_trainable(model, extra=["ln1", "ln2"])
    assert torch.equal(forward(model), want)
    randomize_up(model)
    out = forward(model)
    assert not torch.allclose(out, want)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_our_gpt2_kv_cache_decoding_with_routing():
    import models
    cfg = models.Config(arch="gpt2", d_model=32, n_layers=2, n_heads=4, d_ff=64, ln_eps=1e-5, vocab_size=100,
                        max_positions=64)
    model = randomize_up(rp.add_lora(models.build_model(cfg).eval(), ["attn.q", "attn.v"], 4, 4, "mul"))
    ids, x_R = torch.randint(0, 100, (2, 6)), torch.randn(2, 32)
    with rp.visual_context(model, x_R):
        full = model(ids, prefix=x_R[:, None])  # (2, 7, V)
        cache = model.new_cache()
        steps = [model(None, prefix=x_R[:, None], cache=cache)] + [model(ids[:, i:i + 1], cache=cache)
                                                                  for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


# ---- VL-PET: gates, sub-layer wrapper, parallel adapter --------------------------------------------------

GATE_R = {"large": 3, "middleX": None, "middleY": None, "small": None}  # gate_r: the large gate's rank only


def roberta(d=D):
    """Our RoBERTa (post-LN, like BART's encoder), two blocks: blocks[i].attn and blocks[i].mlp are sub-layers."""
    import models
    return models.build_model(models.Config("roberta", d, 2, 4, 2 * d, 1e-5, vocab_size=50, max_positions=40))


def vlpet_roberta(gate, route, r=4):
    return rp.add_vlpet(roberta(), ["attn", "mlp"], gate, r, route, GATE_R[gate])


def parallel_toy(route):
    return rp.add_parallel_adapters(Toy(), ["attn.v", "mlp.fc2"], r=4, route=route)


def set_linear(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def neutralise(model):
    """W_up = 0, b_up = 0 in every VL-PET / parallel bottleneck and z = 0 in every middleY gate: each module
    then returns its sub-layer's (or base layer's) output exactly, which checks the plumbing alone."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (rp.VLPET, rp.ParallelAdapter)):
                m.up.weight.zero_()
                m.up.bias.zero_()
            if isinstance(m, rp.MiddleYGate):
                m.z.zero_()
    return model


# Worked by hand (d = 2, r = 2, B = 1, N = 2; g = tanh GELU, s = sigmoid; g(1) = 0.841192, g(-1) = -0.158808,
# g(2) = 1.954598, g(-2) = -0.045402):
#   sub-layer: H = X with its two channels swapped;  X = [[1, 0], [0, -1]]  ->  H = [[0, 1], [-1, 0]]
#   W_down = [[1, 1], [1, -1]], b_down = [0, 1];  W_up = [[1, 0], [0, 2]], b_up = [0, 0.5]
#   none:   x_t = W_down H + b_down = [[1, 0], [-1, 0]];  H1 = H + W_up g(x_t) + b_up
#           = [[0.841192, 1.5], [-1.158808, 0.5]]
#   matmul, x_R = [1, 0]:  x_v = W_down x_R + b_down = [1, 2];  <x_t, x_v> = 1, -1  ->  f = [[1, 2], [-1, -2]]
#           H1 = [[g(1), 1 + 2 g(2) + 0.5], [-1 + g(-1), 2 g(-2) + 0.5]]
#              = [[0.841192, 5.409195], [-1.158808, 0.409195]]
#   large (gate_r = 1): W_gd = [[1, 1]], b_gd = 0, W_gu = [[1], [-1]], b_gu = 0:  W_gd X = [1, -1]
#           G = s([[g(1), -g(1)], [g(-1), -g(-1)]]) = [[0.698716, 0.301284], [0.460381, 0.539619]]
#   middleX: w = [1, -1], b = 0: w . (X + H1) = none [0.341192, -0.658808] -> G = [0.584480, 0.341007]
#                                               matmul [-3.568003, -0.568003] -> G = [0.027438, 0.361698]
#   middleY: z = [0.5, -0.25] -> G = [1.5, 0.75] (no sigmoid)
#   small:  w = [1, 0, 0, 1], b = -1 on [X; H1]: X_0 + H1_1 - 1 = none [1.5, -0.5] -> s = [0.817574, 0.377541]
#           -> G = mean = 0.597558;  matmul [5.409195, -0.590805] -> s = [0.995545, 0.356450] -> G = 0.675997
#   out = H1 * G:
VLPET_HAND = {
    ("large", "none"): [[0.587754, 0.451926], [-0.533493, 0.269809]],
    ("middleX", "none"): [[0.491660, 0.876720], [-0.395162, 0.170504]],
    ("middleY", "none"): [[1.261788, 1.125000], [-1.738212, 0.375000]],
    ("small", "none"): [[0.502661, 0.896336], [-0.692455, 0.298779]],
    ("large", "matmul"): [[0.587754, 1.629703], [-0.533493, 0.220810]],
    ("middleX", "matmul"): [[0.023081, 0.148418], [-0.419138, 0.148005]],
    ("middleY", "matmul"): [[1.261788, 4.056897], [-1.738212, 0.306897]],
    ("small", "matmul"): [[0.568644, 3.656602], [-0.783351, 0.276615]],
}


@pytest.mark.parametrize("gate, route", list(VLPET_HAND))
def test_vlpet_gates_against_hand_computed_example(gate, route):
    swap = nn.Linear(2, 2)
    set_linear(swap, [[0, 1], [1, 0]], [0, 0])
    layer = rp.VLPET(swap, r=2, gate=rp.make_gate(gate, 2, 1 if gate == "large" else None), route=route)
    set_linear(layer.down, [[1, 1], [1, -1]], [0, 1])
    set_linear(layer.up, [[1, 0], [0, 2]], [0, 0.5])
    g = layer.gate
    if gate == "large":
        set_linear(g.down, [[1, 1]], [0])
        set_linear(g.up, [[1], [-1]], [0, 0])
    elif gate == "middleX":
        set_linear(g.w, [[1, -1]], [0])
    elif gate == "middleY":
        with torch.no_grad():
            g.z.copy_(torch.tensor([0.5, -0.25]))
    else:
        set_linear(g.w, [[1, 0, 0, 1]], [-1])
    X = torch.tensor([[[1., 0.], [0., -1.]]])
    with rp.visual_context(layer, torch.tensor([[1., 0.]])):
        out = layer(X)
    torch.testing.assert_close(out, torch.tensor([VLPET_HAND[gate, route]]), rtol=0, atol=2e-6)


# Worked by hand: base W = [[1, 2], [0, 1]], b = [0, -1];  x = [[1, -1], [2, 0]]  ->  base(x) = [[-1, -2], [2, -1]]
#   W_down = [[1, 0], [1, 1]], b_down = [0, -1];  W_up = [[1, 1], [0, -1]], b_up = [0.5, 0]
#   none: x_t = [[1, -1], [2, 1]];  W_up g(x_t) + b_up = [[g(1) + g(-1) + 0.5, -g(-1)], [g(2) + g(1) + 0.5, -g(1)]]
#   mul, x_R = [1, 2]: x_v = [1, 2];  x_t * x_v = [[1, -2], [2, 2]]
#         W_up g(.) + b_up = [[g(1) + g(-2) + 0.5, -g(-2)], [2 g(2) + 0.5, -g(2)]]
PARALLEL_HAND = {"none": [[0.182384, -1.841192], [5.295790, -1.841192]],
                 "mul": [[0.295790, -1.954598], [6.409195, -2.954598]]}


@pytest.mark.parametrize("route", list(PARALLEL_HAND))
def test_parallel_adapter_against_hand_computed_example(route):
    base = nn.Linear(2, 2)
    set_linear(base, [[1, 2], [0, 1]], [0, -1])
    layer = rp.ParallelAdapter(base, r=2, route=route)
    set_linear(layer.down, [[1, 0], [1, 1]], [0, -1])
    set_linear(layer.up, [[1, 1], [0, -1]], [0.5, 0])
    with rp.visual_context(layer, torch.tensor([[1., 2.]])):
        out = layer(torch.tensor([[[1., -1.], [2., 0.]]]))
    torch.testing.assert_close(out, torch.tensor([PARALLEL_HAND[route]]), rtol=0, atol=2e-6)


def test_release_multihead_down_projection_is_one_linear():
    # The release: 4 heads Linear(d, r/4) on the same H, concatenated, tanh GELU, one Linear(r, d). Our single
    # W_down with the heads' rows stacked computes the same thing, routed or not (the route sees the
    # concatenation).
    d, r = D, 8
    heads = [nn.Linear(d, r // 4) for _ in range(4)]
    up = nn.Linear(r, d)
    H, x_R = torch.randn(3, 5, d), torch.randn(3, 1, d)
    with torch.no_grad():
        x_t = torch.cat([h(H) for h in heads], dim=-1)  # (3, 5, r)
        x_v = torch.cat([h(x_R) for h in heads], dim=-1)
        for route in ("none", "matmul"):
            released = up(F.gelu(rp.ROUTES[route](x_t, x_v), approximate="tanh"))
            layer = rp.VLPET(nn.Linear(d, d), r, rp.make_gate("middleY", d), route)
            layer.down.weight.copy_(torch.cat([h.weight for h in heads]))  # (r, d): the heads' rows stacked
            layer.down.bias.copy_(torch.cat([h.bias for h in heads]))
            layer.up.load_state_dict(up.state_dict())
            with rp.visual_context(layer, x_R):
                torch.testing.assert_close(layer.branch(H), released)


def test_vlpet_init_as_the_release():
    torch.manual_seed(0)
    sub = nn.Linear(768, 768)
    before = copy.deepcopy(sub.state_dict())
    layer = rp.VLPET(sub, 96, rp.make_gate("large", 768, 96))
    weights = [layer.down.weight, layer.up.weight, layer.gate.down.weight, layer.gate.up.weight]
    for w in weights:
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(torch.count_nonzero(b) == 0 for b in (layer.down.bias, layer.up.bias, layer.gate.down.bias,
                                                      layer.gate.up.bias))
    assert all(torch.equal(v, before[k]) for k, v in layer.module.state_dict().items())  # the sub-layer untouched
    z = rp.make_gate("middleY", 768).z
    assert abs(z.std().item() - 0.02) < 0.002
    for gate in ("middleX", "small"):
        w = rp.make_gate(gate, 768).w
        assert abs(w.weight.std().item() - 0.02) < 0.003 and torch.count_nonzero(w.bias) == 0
    pa = rp.ParallelAdapter(nn.Linear(768, 768), 96)
    assert abs(pa.up.weight.std().item() - 0.02) < 0.001 and torch.count_nonzero(pa.up.bias) == 0


def test_vlpet_option_errors():
    with pytest.raises(ValueError, match="unknown gate 'medium'"):
        rp.add_vlpet(roberta(), ["attn"], "medium", 4, "none")
    with pytest.raises(ValueError, match="gate_r .* required"):
        rp.add_vlpet(roberta(), ["attn"], "large", 4, "none")
    with pytest.raises(ValueError, match="refused for the others"):
        rp.add_vlpet(roberta(), ["attn"], "small", 4, "none", gate_r=4)
    with pytest.raises(ValueError, match="unknown route"):
        rp.add_parallel_adapters(Toy(), ["attn.v"], 4, "mull")
    with pytest.raises(TypeError, match="holds no linear layer"):
        rp.add_vlpet(roberta(), ["ln1"], "small", 4, "none")


@pytest.mark.parametrize("gate", list(rp.GATES))
def test_vlpet_routing_adds_zero_parameters(gate):
    counts = {route: rp.count_parameters(rp.mark_trainable(vlpet_roberta(gate, route))) for route in rp.ROUTES}
    assert len(set(counts.values())) == 1, counts
    trainable, total = counts["none"]
    d, r = D, 4
    gate_size = {"large": 2 * d * 3 + 3 + d, "middleX": d + 1, "middleY": d, "small": 2 * d + 1}[gate]
    assert trainable == 4 * (2 * d * r + r + d + gate_size)  # 2 blocks x (attn, mlp)
    assert total == rp.count_parameters(roberta())[1] + trainable


def test_parallel_adapter_routing_adds_zero_parameters():
    counts = {route: rp.count_parameters(rp.mark_trainable(parallel_toy(route))) for route in rp.ROUTES}
    assert len(set(counts.values())) == 1, counts
    # attn.v: Linear(16, 16), mlp.fc2: Linear(32, 16): W_down, b_down, W_up, b_up
    assert counts["none"][0] == 2 * ((D * 4 + 4 + 4 * D + D) + (2 * D * 4 + 4 + 4 * D + D))


def test_vlpet_mark_trainable_selects_exactly_the_module_weights_plus_extra():
    model = rp.add_parallel_adapters(vlpet_roberta("large", "matmul"), ["attn.module.v"], 4, "add")
    rp.mark_trainable(model, extra=["ln1", "ln2"])
    ids, x_R = torch.randint(3, 50, (2, 6)), torch.randn(2, D)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if any(k in n for k in (".down.", ".up.", ".gate.", ".ln1.", ".ln2."))}
    # per block, weights and biases: attn and mlp (down, up, gate.down, gate.up), attn.v's adapter (down, up), LNs
    assert len(trainable) == 2 * (8 + 8 + 4 + 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run(model, ids, x_R).square().mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def test_vlpet_state_dict_round_trip_and_pickling():
    ids, x_R = torch.randint(3, 50, (2, 6)), torch.randn(2, D)

    def build(seed):
        torch.manual_seed(seed)
        model = rp.add_vlpet(roberta(), ["attn"], "middleY", 4, "matmul")
        rp.add_vlpet(model, ["mlp"], "small", 4, "mul")
        return rp.add_parallel_adapters(model, ["attn.module.v"], 4, "add")

    trained = build(0)
    sd = rp.peft_state_dict(trained)
    sub_layers = ("attn", "mlp", "attn.module.v")
    assert sorted(sd) == sorted([f"blocks.{i}.{s}.{m}.{w}" for i in range(2) for s in sub_layers
                                 for m in ("down", "up") for w in ("weight", "bias")]
                                + [f"blocks.{i}.attn.gate.z" for i in range(2)]
                                + [f"blocks.{i}.mlp.gate.w.{w}" for i in range(2) for w in ("weight", "bias")])
    fresh = build(1)
    fresh.load_state_dict(trained.state_dict())  # the PEFT weights are part of the full state dict ...
    assert torch.equal(run(fresh, ids, x_R), run(trained, ids, x_R))
    fresh = build(1)
    with torch.no_grad():
        for name, p in fresh.named_parameters():  # ... so copy only the frozen backbone here
            if name not in sd:
                p.copy_(trained.get_parameter(name))
    assert not torch.equal(run(fresh, ids, x_R), run(trained, ids, x_R))
    rp.load_peft_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(run(fresh, ids, x_R), run(trained, ids, x_R))
    assert torch.equal(run(pickle.loads(pickle.dumps(trained)), ids, x_R), run(trained, ids, x_R))


def test_vlpet_visual_context_checks():
    ids, x_R = torch.randint(3, 50, (2, 6)), torch.randn(2, D)
    model = vlpet_roberta("small", "matmul")
    with pytest.raises(RuntimeError, match="visual_context"):
        model(ids)
    with pytest.raises(ValueError, match=r"width 7 but layer 'blocks.0.attn' \(VLPET\) needs width 16"):
        with rp.visual_context(model, torch.randn(2, 7)):
            pass
    with pytest.raises(ValueError, match="repeat_interleave"):
        run(model, ids, x_R[:1])
    vlpet_roberta("small", "none")(ids)  # route none needs no context
    pa = rp.add_parallel_adapters(Toy(), ["mlp.fc2"], 4, "mul")
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc2' \(ParallelAdapter\) needs width 32"):
        with rp.visual_context(pa, torch.randn(2, D)):
            pass


def test_merge_lora_merges_only_lora_and_refuses_a_model_without_one():
    with pytest.raises(ValueError, match="has no LoRA layer"):
        rp.merge_lora(vlpet_roberta("large", "none"))
    ids = torch.randint(3, 50, (2, 6))
    model = rp.add_lora(vlpet_roberta("large", "none"), ["attn.module.q"], 4, 4, "none")
    randomize_up(model)
    want = model(ids)
    rp.merge_lora(model)
    assert not any(isinstance(m, rp.LoRA) for m in model.modules())
    assert sum(isinstance(m, rp.VLPET) for m in model.modules()) == 4
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", list(rp.GATES))
def test_vlpet_on_our_roberta(gate):
    ids, x_R = torch.randint(3, 50, (2, 6)), torch.randn(2, D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    base = roberta().eval()
    want = base(ids, mask)
    model = rp.add_vlpet(copy.deepcopy(base), ["attn", "mlp"], gate, 4, "matmul", GATE_R[gate])
    if gate == "middleY":
        assert torch.equal(run(neutralise(copy.deepcopy(model)), ids, x_R), base(ids))  # the wrapper's plumbing
    # the wrapped attention, called with the block's arguments (x, mask), against the formula
    attn = model.blocks[0].attn
    X, key_mask = torch.randn(2, 6, D), mask.bool()[:, None, None, :]
    with torch.no_grad():
        H = attn.module(X, key_mask)
        x_v = attn.down(x_R[:, None])  # (2, 1, r)
        H1 = H + attn.up(F.gelu(rp.ROUTES["matmul"](attn.down(H), x_v), approximate="tanh"))
        g = attn.gate
        G = {"large": lambda: torch.sigmoid(g.up(F.gelu(g.down(X), approximate="tanh"))),
             "middleX": lambda: torch.sigmoid(g.w(X + H1)),
             "middleY": lambda: 1 + g.z,
             "small": lambda: torch.sigmoid(g.w(torch.cat([X, H1], -1))).mean(1, keepdim=True)}[gate]()
    with rp.visual_context(model, x_R):
        torch.testing.assert_close(attn(X, key_mask), H1 * G)
    rp.mark_trainable(model, extra=["ln1", "ln2"])
    with rp.visual_context(model, x_R):
        out = model(ids, mask)
    assert not torch.allclose(out, want)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def tiny_bart():
    import transformers
    cfg = transformers.BartConfig(vocab_size=60, d_model=16, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg).eval()


def test_vlpet_on_hf_bart_attention_sublayers():
    # HF BART's attention returns (output, weights) and gets its input positionally or as hidden_states=; its
    # FFN is inline in the layer (not a module), so only attention can be wrapped as a sub-layer there. We wrap
    # every attention kind (encoder self, decoder self with its cache, cross) to show the wrapper is generic.
    base = tiny_bart()
    ids, x_R = torch.randint(3, 60, (2, 7)), torch.randn(2, 16)
    dec = torch.randint(3, 60, (2, 4))
    want = base(input_ids=ids, decoder_input_ids=dec).logits
    model = rp.add_vlpet(copy.deepcopy(base), ["self_attn", "encoder_attn"], "middleY", 4, "matmul")
    rp.add_parallel_adapters(model.model.decoder, ["encoder_attn.module.v_proj"], 4, "mul")
    assert sum(isinstance(m, rp.VLPET) for m in model.modules()) == 6
    assert sum(isinstance(m, rp.ParallelAdapter) for m in model.modules()) == 2
    with rp.visual_context(model, x_R):
        assert torch.equal(neutralise(copy.deepcopy(model))(input_ids=ids, decoder_input_ids=dec).logits, want)

    model = rp.add_vlpet(copy.deepcopy(base).model.encoder, ["self_attn"], "large", 4, "matmul", gate_r=3)
    attn = model.layers[0].self_attn
    X = torch.randn(2, 7, 16)
    with torch.no_grad():
        H, weights = attn.module(X)
        H1 = H + attn.up(F.gelu(rp.ROUTES["matmul"](attn.down(H), attn.down(x_R[:, None])), approximate="tanh"))
        G = torch.sigmoid(attn.gate.up(F.gelu(attn.gate.down(X), approximate="tanh")))
    with rp.visual_context(attn, x_R):
        out, out_weights = attn(hidden_states=X)  # the keyword form of VL-PET's transformers 4.2.1 copy
    torch.testing.assert_close(out, H1 * G)
    assert out_weights is None if weights is None else torch.equal(out_weights, weights)


def test_vlpet_on_hf_bart_trains_and_generates_with_beams():
    model = tiny_bart()
    rp.add_vlpet(model.model.encoder, ["self_attn"], "small", 4, "add")
    rp.add_parallel_adapters(model.model.decoder, ["encoder_attn.v_proj"], 4, "matmul")
    rp.mark_trainable(model, extra=["encoder.layernorm_embedding", "encoder.layers.0.self_attn_layer_norm"])
    ids, x_R = torch.randint(3, 60, (2, 7)), torch.randn(2, 16)
    with rp.visual_context(model, x_R):
        loss = model(input_ids=ids, labels=torch.randint(3, 60, (2, 4))).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    # generate() runs the encoder once on the 2 examples, then the decoder on 2 x 3 beams: one x_R cannot fit
    # both, so run the encoder with x_R and generate from its output with x_R repeated per beam.
    with rp.visual_context(model, x_R):
        with pytest.raises(ValueError, match="repeat_interleave"):
            model.generate(ids, num_beams=3, max_new_tokens=3, do_sample=False)
        encoded = model.get_encoder()(input_ids=ids)
    with rp.visual_context(model, x_R.repeat_interleave(3, 0)):
        beams = model.generate(encoder_outputs=encoded, num_beams=3, max_new_tokens=3, min_new_tokens=3,
                               do_sample=False)
    assert beams.shape[0] == 2


def bart_base_vlpet(gate):
    """VL-PET's trainable set on bart-base shapes, on the meta device (no weights, no forward):
    HF BartForConditionalGeneration (vocab 50265 + the 200 added <extra_id_*> / <vis_extra_id_*> tokens);
    VL-PET on every encoder self-attention and FFN, a parallel adapter on every decoder cross-attention value
    projection (r = 96, gate_r = 96), plus the trainable encoder LayerNorms and VL-Adapter's visual embedding."""
    import transformers
    cfg = transformers.BartConfig(vocab_size=50265 + 200, d_model=768, encoder_layers=6, decoder_layers=6,
                                  encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                  decoder_ffn_dim=3072, max_position_embeddings=1024)
    with torch.device("meta"):
        model = transformers.BartForConditionalGeneration(cfg)
        # HF BART runs fc1, act, fc2 inline in the layer, so its FFN is no module. For this count only, each
        # encoder layer gets an `ffn` module holding its own fc1, act and fc2 (shared, counted once) to wrap: a
        # VL-PET module's size depends only on the width of the sub-layer it wraps, 768 here.
        for layer in model.model.encoder.layers:
            layer.ffn = nn.Sequential(layer.fc1, layer.activation_fn, layer.fc2)
        rp.add_vlpet(model.model.encoder, ["self_attn", "ffn"], gate, 96, "none", 96 if gate == "large" else None)
        rp.add_parallel_adapters(model.model.decoder, ["encoder_attn.v_proj"], 96, "none")
        # Stand-in for VL-Adapter's visual embedding (it belongs to the CLIP-BART model, not to this file; only its
        # size matters here): Linear(2048, 768) + LN on the CLIP features, Linear(5, 768) + LN on the boxes, the
        # image-order Embedding(2, 768). Its object-order embedding is BART's shared token table, counted above.
        model.visual_embedding = nn.ModuleDict({
            "feat": nn.Sequential(nn.Linear(2048, 768), nn.LayerNorm(768)),
            "pos": nn.Sequential(nn.Linear(5, 768), nn.LayerNorm(768)),
            "img_order": nn.Embedding(2, 768)})
    encoder_lns = ["encoder.layernorm_embedding"] + [f"encoder.layers.{i}.{ln}" for i in range(6)
                                                     for ln in ("self_attn_layer_norm", "final_layer_norm")]
    return rp.mark_trainable(model, extra=encoder_lns + ["visual_embedding"])


def test_vlpet_parameter_counts_reproduce_the_paper_on_bart_base_shapes():
    def size(module):
        return sum(p.numel() for p in module.parameters())

    # BART-base has 139,420,416 parameters (VL-PET's trainer_base.py: orig_param_size); + 200 token rows of 768;
    # visual embedding 2048*768 + 768 + 2*768 + 5*768 + 768 + 2*768 + 2*768 = 1,582,848;
    # encoder LayerNorms: (6 layers x 2 + layernorm_embedding) x 2 x 768 = 19,968.
    frozen_and_visual = 139_420_416 + 200 * 768 + 1_582_848
    modules = {"large": 4_449_600, "small": 2_688_204, "middleX": 2_678_988, "middleY": 2_678_976}
    trainable = {"large": 6_052_416, "small": 4_291_020, "middleX": 4_281_804, "middleY": 4_281_792}
    paper = {"large": 4.16, "small": 2.98, "middleX": 2.98, "middleY": 2.98}  # VL-PET Table 2, % trainable
    for gate in rp.GATES:
        model = bart_base_vlpet(gate)
        layer = model.model.encoder.layers[0]
        assert size(layer.self_attn.down) + size(layer.self_attn.up) == 148_320  # 768*96 + 96 + 96*768 + 768
        assert size(layer.ffn.gate) == {"large": 148_320, "small": 1_537, "middleX": 769, "middleY": 768}[gate]
        assert size(model.model.decoder.layers[0].encoder_attn.v_proj) - 768 * 768 - 768 == 148_320
        # modules: 12 encoder sub-layers x (148,320 + gate) + 6 decoder value adapters x 148,320
        assert 12 * (148_320 + size(layer.ffn.gate)) + 6 * 148_320 == modules[gate]
        assert sum(p.numel() for p in rp.peft_state_dict(model).values()) == modules[gate]
        got = rp.count_parameters(model)
        assert got == (trainable[gate], frozen_and_visual + modules[gate]), gate
        assert trainable[gate] == modules[gate] + 19_968 + 1_582_848
        assert round(100 * got[0] / got[1], 2) == paper[gate]
    assert frozen_and_visual + modules["large"] == 145_606_464


# ---- LoRA with cross-attention (the parameterised baseline) ----------------------------------------------

def set_weights(layer, **weights):
    """Copy hand-set lists into the named nn.Linear children of `layer` (weights as (out, in) lists)."""
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer, name).weight.copy_(torch.tensor(w, dtype=torch.float32))


def xattn_toy(**kw):
    return rp.add_cross_attention_lora(Toy(), ["attn.q", "attn.v"], r=8, alpha=16, heads=2, **kw)


def randomize_B(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, rp.CrossAttentionLoRA):
                m.B.weight.normal_(0, 0.5)
    return model


# Worked by hand: d_in = d_out = 2, r = 8 (attention width w = 2), 2 heads, alpha = 16 (scale 2):
#   base W0 = [[1, 2], [0, 1]], b = [0, -1];  x = [[1, -1], [2, 0]]  ->  base(x) = [[-1, -2], [2, -1]]
#   A_v = [[0, 1], [1, 0]], W_v = [[1, 1], [0, 1]], W_o = [[1, 0], [1, 1]]
#   W_up (8 x 2) rows [1, 0], [0, 1], [1, 1], then zeros; B (2 x 8) rows [1, 0, 1, 0...], [0, -1, 0...]
#       -> B W_up = [[2, 1], [0, -1]]
#   pooled x_R = [2, 1]: x_v = A_v x_R = [1, 2];  V = W_v x_v = [3, 2]. One key: softmax = 1, so every text
#   position gets a = V, whatever its query:  W_o a = [3, 5];  B W_up W_o a = [11, -5];  x 2 = [22, -10]
#   y = base(x) + [22, -10] = [[21, -12], [24, -11]]
POOLED_WEIGHTS = dict(A_t=[[1, 0], [1, 1]], A_v=[[0, 1], [1, 0]], W_q=[[1, 0], [0, -1]], W_k=[[2, 0], [0, 1]],
                      W_v=[[1, 1], [0, 1]], W_o=[[1, 0], [1, 1]], W_up=[[1, 0], [0, 1], [1, 1]] + [[0, 0]] * 5,
                      B=[[1, 0, 1, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0, 0]])
POOLED_HAND = [[21., -12.], [24., -11.]]


def base_2x2():
    base = nn.Linear(2, 2)
    set_linear(base, [[1, 2], [0, 1]], [0, -1])
    return base


def xattn_by_hand(x, x_R, weights, heads, scale):
    """The formula in plain Python (lists, math.exp) for one example: x N text vectors, x_R L visual vectors,
    around base_2x2. Heads take consecutive channels; each scores by q . k / sqrt(head width), softmax over L."""
    import math

    def mv(matrix, u):
        return [sum(m * ui for m, ui in zip(row, u)) for row in matrix]
    W = weights
    x_v = [mv(W["A_v"], u) for u in x_R]
    keys, values = [mv(W["W_k"], u) for u in x_v], [mv(W["W_v"], u) for u in x_v]
    out = []
    for xn in x:
        q = mv(W["W_q"], mv(W["A_t"], xn))
        dh = len(q) // heads
        a = []
        for h in range(heads):
            ch = range(h * dh, (h + 1) * dh)
            e = [math.exp(sum(q[c] * k[c] for c in ch) / math.sqrt(dh)) for k in keys]
            a += [sum(el * v[c] for el, v in zip(e, values)) / sum(e) for c in ch]
        delta = mv(W["B"], mv(W["W_up"], mv(W["W_o"], a)))
        base = [xn[0] + 2 * xn[1], xn[1] - 1]
        out.append([b + scale * dl for b, dl in zip(base, delta)])
    return out


def test_cross_attention_pooled_against_hand_computed_example():
    layer = rp.CrossAttentionLoRA(base_2x2(), r=8, alpha=16, heads=2)
    set_weights(layer, **POOLED_WEIGHTS)
    with rp.visual_context(layer, torch.tensor([[2., 1.]])):  # (B, d): one visual token
        out = layer(torch.tensor([[[1., -1.], [2., 0.]]]))
    torch.testing.assert_close(out, torch.tensor([POOLED_HAND]), rtol=0, atol=1e-6)
    # the plain-Python formula, used for patches below, agrees with the hand-worked numbers
    assert xattn_by_hand([[1, -1], [2, 0]], [[2, 1]], POOLED_WEIGHTS, 2, 2.0) == POOLED_HAND


# Patches: d_in = d_out = 2, r = 16 (w = 4), 2 heads of width 2 (so the 1/sqrt(2) scale and the head split
# both matter), alpha = 32 (scale 2), L = 3 visual tokens, two examples.
PATCH_WEIGHTS = dict(
    A_t=[[1, 0], [0, 1], [1, 1], [1, -1]], A_v=[[0, 1], [1, 0], [1, -1], [0, 1]],
    W_q=[[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]],
    W_k=[[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, -1]],
    W_v=[[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 1]],
    W_o=[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
    W_up=[[(i + 2 * j) % 3 - 1 for j in range(4)] for i in range(16)],
    B=[[(i + j) % 3 - 1 for j in range(16)] for i in range(2)])


def test_cross_attention_patches_against_plain_python():
    x = [[[0.5, -1.0], [1.0, 0.5]], [[-1.0, 0.0], [0.5, 0.5]]]  # (2, N = 2, 2)
    x_R = [[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]], [[0.0, -1.0], [1.0, 1.0], [0.5, 0.0]]]  # (2, L = 3, 2)
    layer = rp.CrossAttentionLoRA(base_2x2(), r=16, alpha=32, heads=2)
    set_weights(layer, **PATCH_WEIGHTS)
    with rp.visual_context(layer, torch.tensor(x_R)):
        out = layer(torch.tensor(x))
    want = [xattn_by_hand(x[b], x_R[b], PATCH_WEIGHTS, 2, 2.0) for b in range(2)]
    torch.testing.assert_close(out, torch.tensor(want), rtol=0, atol=1e-5)
    delta = out - layer.base(torch.tensor(x))
    assert (delta[:, 0] - delta[:, 1]).abs().min() > 0.1  # with several tokens each text position differs


def test_cross_attention_identity_at_init_and_counts():
    x, x_R = toy_inputs(L=3)
    base = Toy()
    want = base(x)
    model = rp.mark_trainable(rp.add_cross_attention_lora(copy.deepcopy(base), ["attn.q", "attn.v"], 8, 16, 2))
    for L in (1, 3):  # pooled and patches
        assert torch.equal(run(model, x, x_R[:, :L]), want)
    r, w = 8, 2
    per_layer = 2 * D * w + 4 * w * w + w * r + r * D  # A_t, A_v; W_q, W_k, W_v, W_o; W_up; B
    assert per_layer == D * r // 2 + r * r // 2 + r * D
    assert rp.count_parameters(model) == (4 * per_layer, rp.count_parameters(Toy())[1] + 4 * per_layer)
    assert sorted(rp.peft_state_dict(model)) == sorted(
        f"blocks.{i}.attn.{p}.{m}.weight" for i in range(2) for p in "qv"
        for m in ("A_t", "A_v", "W_q", "W_k", "W_v", "W_o", "W_up", "B"))
    paper = rp.CrossAttentionLoRA(nn.Linear(1024, 1024), r=128, alpha=128)  # RoBERTa-large width, the paper's r
    assert sum(p.numel() for n, p in paper.named_parameters() if not n.startswith("base.")) == 204_800
    assert 2 * 1024 * 128 == 262_144  # a LoRA layer of the same r


def test_cross_attention_gradients_pooled_and_patches():
    # At init (B = 0) only B has a gradient, as for LoRA. After one step B != 0 and, with patches, every weight
    # gets a gradient. With one visual token the softmax is constantly 1: the scores' path (the text's A_t, W_q
    # and the keys' W_k) never gets any (the release's module, kept as it is: the attention output replaces x_t).
    x, grad_out = torch.randn(3, 5, D), torch.randn(3, 5, 6)
    for L in (3, 1):
        layer = rp.mark_trainable(rp.CrossAttentionLoRA(nn.Linear(D, 6), r=8, alpha=8, heads=2))
        trained = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        assert [n for n, _ in trained] == [f"{m}.weight" for m in rp.CrossAttentionLoRA.trained]
        opt = torch.optim.Adam([p for _, p in trained], lr=1e-2)
        with rp.visual_context(layer, torch.randn(3, L, D)):
            layer(x).backward(grad_out)
            assert {n for n, p in trained if torch.count_nonzero(p.grad)} == {"B.weight"}
            opt.step()
            opt.zero_grad()
            layer(x).backward(grad_out)
        dead = {n for n, p in trained if torch.count_nonzero(p.grad) == 0}
        assert dead == (set() if L == 3 else {"A_t.weight", "W_q.weight", "W_k.weight"}), L
        assert layer.base.weight.grad is None


def test_cross_attention_dropout_sites():
    # the release's five: x, x_R, x_v before W_k, x_v before W_v (separate draws), the attention output
    layer = rp.CrossAttentionLoRA(nn.Linear(D, 6), r=8, alpha=8, heads=2, dropout=0.5)
    seen = []
    layer.drop.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with rp.visual_context(layer, torch.randn(3, 4, D)):
        layer(torch.randn(3, 5, D))
    assert seen == [(3, 5, D), (3, 4, D), (3, 4, 2), (3, 4, 2), (3, 5, 2)]
    assert xattn_toy(dropout=0.5).blocks[1].attn.v.drop.p == 0.5  # add_cross_attention_lora passes it on
    randomize_B(layer)
    x, x_R = torch.randn(3, 5, D), torch.randn(3, 4, D)
    with rp.visual_context(layer, x_R):
        assert not torch.equal(layer(x), layer(x))
        layer.eval()
        assert torch.equal(layer(x), layer(x))


def test_cross_attention_on_hf_roberta():
    import transformers
    cfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    base = transformers.RobertaModel(cfg, add_pooling_layer=False).eval()
    ids, x_R = torch.randint(3, 100, (2, 7)), torch.randn(2, 3, 32)  # 3 patch tokens
    want = base(ids).last_hidden_state
    model = rp.add_cross_attention_lora(copy.deepcopy(base), ["query", "value"], r=8, alpha=8, heads=2)
    assert sum(isinstance(m, rp.CrossAttentionLoRA) for m in model.modules()) == 4
    rp.mark_trainable(model)
    assert rp.count_parameters(model)[0] == 4 * (32 * 8 // 2 + 8 * 8 // 2 + 8 * 32)
    assert torch.equal(run(model, ids, x_R).last_hidden_state, want)
    out = run(randomize_B(model), ids, x_R).last_hidden_state
    assert not torch.allclose(out, want)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(RuntimeError, match="route 'cross_attention' needs the visual feature"):
        model(ids)


def test_cross_attention_context_merge_and_option_errors():
    x, x_R = toy_inputs()
    model = xattn_toy()
    with pytest.raises(RuntimeError, match="route 'cross_attention' needs the visual feature.*visual_context"):
        model(x)
    with pytest.raises(ValueError, match=r"width 7 but layer 'blocks.0.attn.q' \(CrossAttentionLoRA\) needs width 16"):
        with rp.visual_context(model, torch.randn(3, 7)):
            pass
    randomize_up(rp.add_lora(model, ["attn.k"], 4, 4, "none"))  # a mergeable LoRA beside them is not merged
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge .*blocks.0.attn.q \(route 'cross_attention'\)"):
        rp.merge_lora(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert isinstance(model.blocks[0].attn.k, rp.LoRA)
    for r, heads in ((6, 1), (8, 4)):  # r/4 = 1.5; r/4 = 2 not split into 4 heads
        with pytest.raises(ValueError, match="r must be a multiple of 4 \\* heads"):
            rp.add_cross_attention_lora(Toy(), ["attn.q"], r, r, heads)
