"""Backbones and checkpoint conversion against `transformers` on tiny random models built here.

    python -m pytest -q tests/test_models.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file  # test-only: writes the hub-layout .bin for ViT

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def max_diff(a, b):
    return (a - b).abs().max().item()


def jitter(model, std=0.2):
    """Make every parameter non-trivial (HF starts LayerNorms at 1/0 and weights at std 0.02, which would
    hide a swapped LayerNorm or the exact-vs-tanh GELU difference)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def save_both(model, root, name, bin_state_dict=None):
    """save_pretrained (safetensors) into root/name-st; a classic pytorch_model.bin into root/name-bin."""
    st, pt = root / f"{name}-st", root / f"{name}-bin"
    model.save_pretrained(st)
    pt.mkdir()
    shutil.copy(st / "config.json", pt / "config.json")
    sd = model.state_dict() if bin_state_dict is None else bin_state_dict
    torch.save(sd, pt / "pytorch_model.bin")
    return st, pt


def write_tokenizer(d):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "a": 3, "b": 4, "Ġ": 5, "ab": 6, "Ġab": 7}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\na b\nĠ ab\n", encoding="utf-8")
    return vocab


# ---- fixtures: tiny random Hugging Face models, converted both ways ------------------------------


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("vit")
    cfg = hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    ref = jitter(hf.ViTModel(cfg, add_pooling_layer=True).eval())
    st, pt = root / "vit-st", root / "vit-bin"
    ref.save_pretrained(st)
    # transformers 5 renames ViT's modules internally (q_proj, ...) but saves the hub layout; a real
    # pytorch_model.bin has the hub layout, so the .bin gets the tensors that save_pretrained wrote.
    pt.mkdir()
    shutil.copy(st / "config.json", pt / "config.json")
    torch.save(load_file(str(st / "model.safetensors")), pt / "pytorch_model.bin")
    pp = {"size": {"height": 32, "width": 32}, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}
    (st / "preprocessor_config.json").write_text(json.dumps(pp))
    return ref, st, pt


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    torch.manual_seed(2)
    root = tmp_path_factory.mktemp("roberta")
    cfg = hf.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, type_vocab_size=1)
    mlm = jitter(hf.RobertaForMaskedLM(cfg).eval())  # keys "roberta.*" + lm_head.* (ignored)
    base = jitter(hf.RobertaModel(cfg, add_pooling_layer=True).eval())  # keys without prefix + pooler (ignored)
    st, _ = save_both(mlm, root, "mlm")
    write_tokenizer(st)
    _, pt = save_both(base, root, "base")
    return mlm.roberta, base, st, pt


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("gpt2")
    cfg = hf.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0,
                        eos_token_id=0)
    ref = jitter(hf.GPT2LMHeadModel(cfg).eval())
    sd = dict(ref.state_dict())  # has the tied lm_head.weight; old checkpoints also carry mask buffers:
    for i in range(2):
        sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    st, pt = save_both(ref, root, "gpt2", bin_state_dict=sd)
    write_tokenizer(st)
    return ref, st, pt


def converted(src, tmp_path, name="out.pt"):
    out = tmp_path / name
    models.convert(str(src), str(out))
    return out


# ---- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_vit_parity(vit, tmp_path, fmt):
    ref, st, pt = vit
    model = models.load_checkpoint(str(converted(st if fmt == "st" else pt, tmp_path)), arch="vit")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h, pooled = model(x)
        r = ref(pixel_values=x)
    assert h.shape == (3, 1 + 16, 32) and pooled.shape == (3, 32)
    assert max_diff(h, r.last_hidden_state) <= TOL
    assert max_diff(pooled, r.pooler_output) <= TOL


def test_vit_preprocessing_and_wrong_size(vit, tmp_path):
    _, st, _ = vit
    ckpt = torch.load(converted(st, tmp_path), weights_only=True)
    c = ckpt["config"]
    assert (c["image_size"], tuple(c["image_mean"]), tuple(c["image_std"])) == (32, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert "tokenizer" not in ckpt
    model = models.build_model(models.Config(**c))
    with pytest.raises(ValueError, match="expects 32x32 images, got 48x48"):
        model(torch.zeros(1, 3, 48, 48))


def padded_batch(lengths, n, vocab, pad=1):
    ids = torch.full((len(lengths), n), pad)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        ids[b, :L] = torch.randint(3, vocab, (L,))
        ids[b, 0] = 0  # <s>
        mask[b, :L] = 1
    return ids, mask


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_roberta_parity_padded(roberta, tmp_path, fmt):
    ref_mlm, ref_base, st, pt = roberta
    ref = ref_mlm if fmt == "st" else ref_base
    model = models.load_checkpoint(str(converted(st if fmt == "st" else pt, tmp_path)), arch="roberta")
    ids, mask = padded_batch([9, 5, 2], 9, 60)  # right padding, different lengths
    left_ids, left_mask = ids[1].roll(4), mask[1].roll(4)  # plus one left-padded row: positions skip padding
    ids, mask = torch.cat([ids, left_ids[None]]), torch.cat([mask, left_mask[None]])
    with torch.no_grad():
        h = model(ids, mask)
        r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        h_nomask, r_nomask = model(ids[:1]), ref(input_ids=ids[:1]).last_hidden_state
    assert h.shape == (4, 9, 32)
    assert max_diff(h[mask.bool()], r[mask.bool()]) <= TOL  # the positions that matter
    assert max_diff(h, r) <= TOL                              # and padding positions too: we match HF exactly
    assert max_diff(h_nomask, r_nomask) <= TOL


def test_roberta_prefix(roberta, tmp_path):
    ref, _, st, _ = roberta
    model = models.load_checkpoint(str(converted(st, tmp_path)), arch="roberta")
    ids, mask = padded_batch([6, 3], 6, 60)
    P, pad = 2, 1
    prefix = torch.randn(2, P, 32)
    # HF with inputs_embeds = [prefix; word embeddings], one pass through positions + type + LN;
    # positions: prefix pad+1..pad+P, text continues after it, padding tokens stay at pad.
    pos = torch.full((2, P + 6), pad)
    for b in range(2):
        pos[b, :P] = torch.arange(pad + 1, pad + 1 + P)
        L = int(mask[b].sum())
        pos[b, P:P + L] = torch.arange(pad + 1 + P, pad + 1 + P + L)
    with torch.no_grad():
        h = model(ids, mask, prefix=prefix)
        embeds = torch.cat([prefix, ref.embeddings.word_embeddings(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], dim=1)
        r = ref(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos).last_hidden_state
    assert h.shape == (2, P + 6, 32)
    assert max_diff(h, r) <= TOL


def test_roberta_tokenizer_stored(roberta, tmp_path):
    _, _, st, pt = roberta
    ckpt = torch.load(converted(st, tmp_path), weights_only=True)
    assert ckpt["arch"] == "roberta" and ckpt["tokenizer"]["merges"] == ["a b", "Ġ ab"]
    assert ckpt["tokenizer"]["vocab"]["Ġab"] == 7
    assert "tokenizer" not in torch.load(converted(pt, tmp_path, "b.pt"), weights_only=True)


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_gpt2_parity(gpt2, tmp_path, fmt):
    ref, st, pt = gpt2
    model = models.load_checkpoint(str(converted(st if fmt == "st" else pt, tmp_path)), arch="gpt2")
    ids = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        logits = model(ids)
        r = ref(input_ids=ids).logits
    assert logits.shape == (2, 11, 60)
    assert max_diff(logits, r) <= TOL


def test_gpt2_cache_equals_full_forward(gpt2, tmp_path):
    ref, st, _ = gpt2
    model = models.load_checkpoint(str(converted(st, tmp_path)), arch="gpt2")
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache=cache)]                  # a first chunk
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(4, 7)]  # one token at a time
        steps.append(model(ids[:, 7:10], cache=cache))            # a chunk after a past (explicit mask)
    assert cache.length == 10
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    with torch.no_grad():  # HF's own incremental decoding agrees too
        out = ref(input_ids=ids[:, :9], use_cache=True)
        last = ref(input_ids=ids[:, 9:], past_key_values=out.past_key_values).logits
    assert max_diff(steps[-1][:, -1:], last) <= TOL


def test_gpt2_prefix_cache_and_reorder(gpt2, tmp_path):
    ref, st, _ = gpt2
    model = models.load_checkpoint(str(converted(st, tmp_path)), arch="gpt2")
    prefix, ids = torch.randn(2, 1, 32), torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        full = model(ids, prefix=prefix)  # (2, 1 + 5, V)
        r = ref(inputs_embeds=torch.cat([prefix, ref.transformer.wte(ids)], dim=1)).logits
        cache = model.new_cache()
        steps = [model(prefix=prefix, cache=cache)]  # first captioning step: the visual prefix alone
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5)]
    assert full.shape == (2, 6, 60)
    assert max_diff(full, r) <= TOL
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    # beam search: reorder the cache to rows [1, 1, 0] and keep decoding
    order = torch.tensor([1, 1, 0])
    nxt = torch.randint(0, 60, (3, 1))
    with torch.no_grad():
        cache.reorder(order)
        step = model(nxt, cache=cache)
        want = model(torch.cat([ids[order], nxt], dim=1), prefix=prefix[order])[:, -1:]
    assert max_diff(step, want) <= TOL


def test_cli_convert(gpt2, tmp_path):
    _, st, _ = gpt2
    out = tmp_path / "cli.pt"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "models.py"), "convert", "--src", str(st),
                          "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "arch gpt2" in res.stdout and "parameters" in res.stdout
    assert models.load_checkpoint(str(out)).config.n_layers == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic write left nothing behind


# ---- real parameter counts (no weights: both sides built on the meta device) ---------------------


def count(model):
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once


def test_real_parameter_counts():
    with torch.device("meta"):
        ours = {name: count(models.build_model(models.PRESETS[name]))
                for name in ("vit-l16", "roberta-large", "gpt2-medium")}
        # ViT-L/16 in21k: the backbone with its pooler on both sides.
        vit = count(hf.ViTModel(hf.ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                             intermediate_size=4096), add_pooling_layer=True))
        # RoBERTa-large: encoder without pooler on both sides (we never use it).
        rob = count(hf.RobertaModel(hf.RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                                     num_attention_heads=16, intermediate_size=4096,
                                                     max_position_embeddings=514, type_vocab_size=1),
                                    add_pooling_layer=False))
        # GPT2-medium: LM model whose head is tied to wte, counted once on both sides.
        gpt = count(hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=1024, n_layer=24, n_head=16)))
    assert ours == {"vit-l16": vit, "roberta-large": rob, "gpt2-medium": gpt}
    assert gpt == 354_823_168  # the published GPT2-medium size (~355M)


# ---- bad input ------------------------------------------------------------------------------------


def test_dir_without_weights(gpt2, tmp_path):
    _, st, _ = gpt2
    shutil.copy(st / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights found"):
        models.convert(str(tmp_path), str(tmp_path / "o.pt"))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unknown model_type 'bert'"):
        models.convert(str(tmp_path), str(tmp_path / "o.pt"))


def test_truncated_safetensors(gpt2, tmp_path):
    _, st, _ = gpt2
    shutil.copy(st / "config.json", tmp_path / "config.json")
    data = (st / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        models.convert(str(tmp_path), str(tmp_path / "o.pt"))
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"), "missing 1 key.*h.1.mlp.c_fc.weight"),
    (lambda sd: sd.__setitem__("transformer.h.0.attn.extra", torch.zeros(1)), "unexpected key: h.0.attn.extra"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(60, 32)), "differs from wte"),
])
def test_missing_or_unexpected_key(gpt2, tmp_path, edit, message):
    ref, _, pt = gpt2
    sd = dict(torch.load(pt / "pytorch_model.bin", weights_only=True))
    edit(sd)
    shutil.copy(pt / "config.json", tmp_path / "config.json")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises((KeyError, ValueError), match=message):
        models.convert(str(tmp_path), str(tmp_path / "o.pt"))


def test_wrong_arch_and_not_a_checkpoint(gpt2, tmp_path):
    _, st, _ = gpt2
    out = converted(st, tmp_path)
    with pytest.raises(ValueError, match="is a gpt2 checkpoint, expected roberta"):
        models.load_checkpoint(str(out), arch="roberta")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a converted checkpoint"):
        models.load_checkpoint(str(tmp_path / "plain.pt"))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="is not a converted checkpoint"):
        models.load_checkpoint(str(tmp_path / "text.pt"))


# ---- decoding: models.beam_search on constructed decoders (no model) ------------------------------


class Toy:
    """A decoder given as a table: dist[history] = {token: p} for the next token (the rest of the mass
    spread evenly over the other non-EOS tokens; EOS gets 1e-9 unless listed); histories not in the
    table are near uniform. As a beam_search step function it follows the beams' reorders and counts
    its calls."""

    def __init__(self, dist, rows, V=40, eos=0):
        self.dist, self.rows, self.V, self.eos, self.calls = dist, rows, V, eos, 0

    def probs(self, history):
        listed = self.dist.get(tuple(history), {})
        others = [v for v in range(self.V) if v not in listed and v != self.eos]
        p = torch.full((self.V,), (1.0 - sum(listed.values())) / len(others))
        p[self.eos] = 1e-9
        for v, q in listed.items():
            p[v] = q
        return p / p.sum()

    def __call__(self, tokens, index):
        self.calls += 1
        if tokens is None:
            self.hist = [[] for _ in range(self.rows)]
        else:
            self.hist = [self.hist[i] + [t] for i, t in zip(index.tolist(), tokens.tolist())]
        return torch.stack([self.probs(h) for h in self.hist]).log()  # logits = log p: log_softmax keeps them


def toy_search(dist, beams=2, max_new_tokens=5, **kw):
    toy = Toy(dist, beams)
    out = models.beam_search(toy, 1, beams, max_new_tokens, 0, **kw)
    return out[0], toy.calls


def test_eos_ranked_below_k_never_ends_a_hypothesis():
    # The search reads candidates in rank order until k beams live, so an EOS ranked k or lower is read only
    # after an EOS above it. Step 1: 1 and 2 live (.5 each). Step 2: [1, EOS] -1.386 ranks 0 and ends H1 = [1]
    # (-0.693); [2, 4] -1.492 ranks 1 and lives; [2, EOS] -1.609 ranks 2 = k: it may not end; [1, 5] -2.996
    # lives. Step 3: [2, 4, EOS] (-1.502 / 3 = -0.501) ends and wins. Had [2] ended at step 2, the row would
    # have held k = 2 hypotheses and stopped early, [1] winning.
    dist = {(): {1: .5, 2: .5}, (1,): {0: .5, 5: .1}, (2,): {4: .45, 0: .4}, (2, 4): {0: .99}}
    assert toy_search(dist, early_stopping=True)[0] == [2, 4]
    assert toy_search(dist, beams=3, early_stopping=True)[0] == [1]  # k = 3: rank 2 ends [2]; 3 ended by step 2


def test_two_k_candidates_refill_the_beams():
    # k = 3. Step 2: [1, EOS] and [2, EOS] rank 0 and 1 and end; the live beams come from ranks 2, 3 and 4:
    # [3, 6], [1, 4] and [2, 5]. Only [2, 5] goes on well: [2, 5, 7, 8, EOS] (-3.41 / 5 = -0.68) beats [1]
    # (-0.80). With fewer than 2k candidates a step would lose [2, 5].
    dist = {(): {1: .34, 2: .33, 3: .32}, (1,): {0: .6, 4: .1}, (2,): {0: .6, 5: .1}, (3,): {6: .2},
            (2, 5): {7: .999}, (2, 5, 7): {8: .999}, (2, 5, 7, 8): {0: .999}}
    assert toy_search(dist, beams=3, max_new_tokens=6)[0] == [2, 5, 7, 8]


# Step 1 from []: EOS .40 ends H1 = [] (log .40 = -0.916); 1 (.35) and 2 (.20) live. Step 2 from [1]: EOS x,
# token 3 y; from [2]: token 4 (.5). After step 2 a row holds 2 ended hypotheses; the stop test decides.
def stop_case(x, y):
    return {(): {0: .40, 1: .35, 2: .20}, (1,): {0: x, 3: y}, (2,): {4: .5}}


@pytest.mark.parametrize("x, y, calls", [
    # [1, EOS] ranks 0 and ends H2 = (log .35 + log .40) / 2 = -0.983, the worst; best live [1, 3]: -2.254 / 2.
    # 5: -1.127 <= -0.983 stops; 4.2.1: the rank-0 candidate -1.966 / 2 = -0.983 <= -0.983 stops (equal);
    # 4.29.2: -1.966 / 3 = -0.655 > -0.983 goes on to step 3.
    (.40, .30, {"5": 2, "4.2.1": 2, "4.29.2": 3}),
    # H2 = (log .35 + log .6) / 2 = -0.78 beats H1: worst -0.916. Best live [2, 4]: -2.30 / 2 = -1.15 <= -0.916:
    # 5 stops; 4.x test the rank-0 candidate [1, EOS]: -1.561 / 2 (or / 3) > -0.916: both go on.
    (.60, .25, {"5": 2, "4.2.1": 3, "4.29.2": 3}),
    # [1, 3] (-1.743) ranks 0 and lives, [1, EOS] ranks 1 and ends H2 = -0.924, the worst: -1.743 / 2 = -0.871
    # > -0.924, so every rule goes on (and stops at step 3, where every candidate is far worse).
    (.45, .50, {"5": 3, "4.2.1": 3, "4.29.2": 3}),
])
def test_stop_test_of_each_rule(x, y, calls):
    dist = stop_case(x, y)
    for rules, n in calls.items():
        assert toy_search(dist, rules=rules)[1] == n, rules
        # early_stopping: stop as soon as the row holds k = 2 ended hypotheses (step 2), whatever the scores
        assert toy_search(dist, rules=rules, early_stopping=True)[1] == 2, rules
    assert toy_search(dist, early_stopping=True)[0] == ([1] if x == .60 else [])  # the better of H1, H2


def test_limit_lengths_of_each_rule():
    # At the limit (step 2): [1, EOS] = log .5 + log .736 = -1.0 ends by EOS; [2, 3] = log .45 + log .606 = -1.3
    # is cut. 5 scores them -1.0 / 2 vs -1.3 / 2: [1] wins. 4.x count the start token in the cut one: -1.3 / 3.
    dist = {(): {1: .5, 2: .45}, (1,): {0: .736}, (2,): {3: .606}}
    assert toy_search(dist, max_new_tokens=2)[0] == [1]
    assert toy_search(dist, max_new_tokens=2, rules="4.2.1")[0] == [2, 3]
    assert toy_search(dist, max_new_tokens=2, rules="4.29.2")[0] == [2, 3]


def test_early_stopping_at_the_limit():
    # Step 1: 1 (.5) lives, EOS (.3) ends H1 = -1.204, 2 lives. Step 2 = the limit: [1, 3] (-0.981) lives,
    # [1, EOS] ends H2 = -1.15: 2 ended, early stopping. transformers 4.x stop the row before the live beams end
    # ([1] wins); transformers 5 ends them at the same step, and [1, 3] (-0.49) wins.
    dist = {(): {1: .5, 0: .3, 2: .15}, (1,): {0: .2, 3: .75}}
    assert toy_search(dist, max_new_tokens=2, early_stopping=True)[0] == [1, 3]
    assert toy_search(dist, max_new_tokens=2, early_stopping=True, rules="4.2.1")[0] == [1]


def test_forced_eos_and_greedy():
    # Step 1: [] ends by EOS (log .45 = -0.80); [1] lives. Step 2: [1, 2] (-1.8). At step 3 EOS forced with
    # log p 0 scores [1, 2] -1.8 / 3 = -0.6: it wins. Unforced, step 3 is near uniform and [] wins.
    dist = {(): {1: .5, 0: .45}, (1,): {2: .33}}
    assert toy_search(dist, max_new_tokens=3, force_eos=True)[0] == [1, 2]
    assert toy_search(dist, max_new_tokens=3)[0] == []
    for rules in models.RULES:  # greedy: the first EOS ends the row, whatever the rules
        assert toy_search({(): {0: .6, 1: .4}}, beams=1, rules=rules) == ([], 1)
    with pytest.raises(ValueError, match="rules must be one of"):
        toy_search(dist, rules="4.3")
    assert toy_search(dist, beams=1, max_new_tokens=3, force_eos=True)[0] == [1, 2]


def test_block_repeated_ngrams_bans_exactly_the_repeats():
    """Against the definition: token v is banned iff the row followed by v ends with an n-gram it already holds."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for t in range(0, 9):
            seqs = torch.randint(0, 4, (6, t), generator=g)
            got = models.block_repeated_ngrams(torch.zeros(6, 5), seqs, n) == -float("inf")
            for r, row in enumerate(seqs.tolist()):
                held = {tuple(row[i:i + n]) for i in range(len(row) - n + 1)}
                want = [len(row) >= n and tuple(row[len(row) - n + 1:] + [v]) in held for v in range(5)]
                assert got[r].tolist() == want, (n, row)


def test_ngram_blocking_in_the_search():
    dist = {(): {1: .9}, (1,): {2: .9}, (1, 2): {1: .9}, (1, 2, 1): {2: .9, 3: .05}}  # 1 2 1 2 ...: 3 only if blocked
    assert toy_search(dist, beams=1, max_new_tokens=4)[0] == [1, 2, 1, 2]
    assert toy_search(dist, beams=1, max_new_tokens=4, no_repeat_ngram=2)[0] == [1, 2, 1, 3]  # (1, 2) repeats
    assert toy_search(dist, beams=1, max_new_tokens=4, no_repeat_ngram=3)[0] == [1, 2, 1, 2]  # no 3-gram repeats yet


# ---- decoding against transformers' generate (transformers 5's rules, the default) ---------------


def gpt2_decoder(seed=0, V=40, d=24, eos=7, eos_bias=2.0):
    """A tiny random GPT-2 (transformers) and ours with the same weights; EOS's logit raised by eos_bias
    (through ln_f's bias: the head is the tied table) so that some hypotheses end early."""
    torch.manual_seed(seed)
    ref = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=V, n_embd=d, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=eos, eos_token_id=eos, resid_pdrop=0, embd_pdrop=0,
                                           attn_pdrop=0)).eval()
    jitter(ref, 0.5)
    with torch.no_grad():
        e = ref.transformer.wte.weight[eos]
        ref.transformer.ln_f.bias.add_(torch.randn(d) + eos_bias * e / e.dot(e))
    c = models.Config("gpt2", d, 2, 2, 4 * d, 1e-5, vocab_size=V, max_positions=64)
    sd, _ = models.convert_state_dict("gpt2", ref.state_dict(), c)
    ours = models.build_model(c).eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def gpt2_beam_search(model, prefix, beams, max_new_tokens, eos, **kw):
    """models.beam_search over our GPT-2 from a prefix of embeddings (the caption model's way)."""
    rows, cache = prefix.repeat_interleave(beams, 0), model.new_cache()

    def step(tokens, index):
        if tokens is None:
            return model(prefix=rows, cache=cache)[:, -1]
        cache.reorder(index)
        return model(tokens[:, None], cache=cache)[:, -1]
    return models.beam_search(step, len(prefix), beams, max_new_tokens, eos, **kw)


@pytest.mark.parametrize("no_repeat, early", [(0, False), (3, True), (2, False)])
def test_gpt2_beam_search_matches_transformers(no_repeat, early):
    ref, ours = gpt2_decoder()
    prefix = torch.randn(6, 2, 24) * 2
    lengths = set()
    with torch.no_grad():
        for k in (1, 2, 5):
            for n_new in (5, 12):
                out = ref.generate(inputs_embeds=prefix, attention_mask=torch.ones(6, 2, dtype=torch.long),
                                   num_beams=k, max_new_tokens=n_new, do_sample=False, length_penalty=1.0,
                                   early_stopping=early, no_repeat_ngram_size=no_repeat, pad_token_id=7)
                want = [row[:row.index(7)] if 7 in row else row for row in out.tolist()]
                got = gpt2_beam_search(ours, prefix, k, n_new, 7, no_repeat_ngram=no_repeat, early_stopping=early)
                assert got == want, (k, n_new)
                lengths |= {len(t) for t in got}
    assert min(lengths) < 5 and len(lengths) >= 4  # EOS ends hypotheses at many lengths


def test_older_converted_file_loads_with_generation_defaults(gpt2, tmp_path):
    """A file converted before Config had its generation fields still loads; they take their defaults.
    GPT-2's config.json has no generation settings: a converted GPT-2 keeps the defaults."""
    _, st, _ = gpt2
    out = converted(st, tmp_path)
    ckpt = torch.load(out, weights_only=True)
    assert {k: ckpt["config"][k] for k in ("num_beams", "no_repeat_ngram", "early_stopping")} == \
        {"num_beams": 1, "no_repeat_ngram": 0, "early_stopping": False}
    for k in ("num_beams", "no_repeat_ngram", "early_stopping"):
        del ckpt["config"][k]
    torch.save(ckpt, tmp_path / "old.pt")
    model = models.load_checkpoint(str(tmp_path / "old.pt"), arch="gpt2")
    assert (model.config.num_beams, model.config.no_repeat_ngram, model.config.early_stopping) == (1, 0, False)
    assert models.generation_args(model.config, 5) == dict(beams=5, no_repeat_ngram=0, early_stopping=False,
                                                           force_eos=False)
