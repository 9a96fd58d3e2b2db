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
