"""Tests of routing_peft.py: routes, LoRA / Adapter invariants, context, state, merging, foreign models.

    python -m pytest -q tests/test_routing_peft.py
"""
import copy
import io
import pickle

import pytest
import torch
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
    with rp.visual_context(model, x_R.repeat_interleave(3, 0)):  # beam search expands the batch 3 times
        beams = model.generate(ids, num_beams=3, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert beams.shape == (2, 9)

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
