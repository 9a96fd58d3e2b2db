"""BART and CLIP's ModifiedResNet against their references, and their one-time conversion.

    python -m pytest -q tests/test_bart_clip.py

BART: tiny random transformers BartForConditionalGeneration models built here. CLIP: the fixture
../shared/fixtures/clip_modified_resnet_tiny.pt, made with openai/CLIP's own ModifiedResNet.
"""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import transformers as hf
from PIL import Image
from safetensors.torch import save_file  # test-only: writes .safetensors inputs

import data
import models
from conftest import check_decoder_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "clip_modified_resnet_tiny.pt")
TOL = 1e-5
V, D, EOS = 64, 32, 2  # tiny BART: vocabulary, width; </s> = 2 ends and starts decoding as in bart-base


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- BART -----------------------------------------------------------------------------------------


def tiny_bart(scale_embedding, seed, jitter=0.2, encoder_layers=2, decoder_layers=2):
    """A random BartForConditionalGeneration whose every parameter (LayerNorms too) and logits bias
    are far from their initial values, so a swapped LayerNorm or a missing bias shows."""
    torch.manual_seed(seed)
    cfg = hf.BartConfig(vocab_size=V, d_model=D, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                        encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
                        scale_embedding=scale_embedding, decoder_start_token_id=EOS, eos_token_id=EOS, pad_token_id=1,
                        bos_token_id=0, forced_bos_token_id=None, forced_eos_token_id=None)
    ref = hf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(jitter * torch.randn_like(p))
        ref.final_logits_bias.normal_()
    return ref


@pytest.fixture(scope="module", params=[False, True], ids=["unscaled", "scale_embedding"])
def bart(request, tmp_path_factory):
    """(reference, converted from save_pretrained's safetensors, converted from a BartModel-style .bin)."""
    ref = tiny_bart(request.param, seed=4)
    root = tmp_path_factory.mktemp("bart")
    st, pt = root / "st", root / "bin"
    ref.save_pretrained(st)  # "model."-prefixed keys, final_logits_bias, one token table (model.shared)
    (st / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "<mask>": 5}))
    (st / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # A BartModel's .bin: no prefix, every tied copy of the table, no lm_head, no final_logits_bias.
    pt.mkdir()
    shutil.copy(st / "config.json", pt / "config.json")
    torch.save({k[len("model."):]: t for k, t in ref.state_dict().items() if k.startswith("model.")},
               pt / "pytorch_model.bin")
    load = models.load_checkpoint
    out_st, out_pt = root / "st.pt", root / "bin.pt"
    models.convert(str(st), str(out_st))
    models.convert(str(pt), str(out_pt))
    return ref, load(str(out_st), arch="bart"), load(str(out_pt), arch="bart"), out_st


def padded_batch(lengths, n):
    """<s> tokens </s> then padding (id 1) on the right; the last row is padded on the left instead."""
    ids = torch.full((len(lengths), n), 1)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        ids[b, :L] = torch.randint(4, V, (L,))
        ids[b, 0], ids[b, L - 1] = 0, EOS
        mask[b, :L] = 1
    ids[-1], mask[-1] = ids[-1].roll(n - lengths[-1]), mask[-1].roll(n - lengths[-1])
    return ids, mask


def test_bart_parity(bart):
    ref, ours_st, ours_bin, _ = bart
    ids, mask = padded_batch([9, 6, 3, 5], 9)
    dec = torch.randint(0, V, (4, 7))
    dec[:, 0] = EOS  # decoder_start_token_id, as shift_tokens_right would put it
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got_st, got_bin = ours_st(ids, mask, dec), ours_bin(ids, mask, dec)
        unmasked = ours_st(ids[:1], None, dec[:1]), ref(input_ids=ids[:1], decoder_input_ids=dec[:1]).logits
    assert got_st.shape == (4, 7, V)
    assert max_diff(got_st, want) <= TOL  # padding rows and positions included
    assert max_diff(got_bin, want - ref.final_logits_bias) <= TOL  # the .bin had no bias: zeros
    assert max_diff(*unmasked) <= TOL
    assert ref.final_logits_bias.abs().min() > 0  # so the check above sees the bias


def test_bart_unequal_depths(tmp_path):
    """distilbart-style depths (here 3 encoder layers, 1 decoder layer) convert and match."""
    ref = tiny_bart(False, seed=9, encoder_layers=3, decoder_layers=1)
    ref.save_pretrained(tmp_path / "hf")
    models.convert(str(tmp_path / "hf"), str(tmp_path / "ours.pt"))
    ours = models.load_checkpoint(str(tmp_path / "ours.pt"), arch="bart")
    assert (ours.config.n_layers, ours.config.n_dec_layers) == (3, 1)
    assert (len(ours.encoder.blocks), len(ours.decoder.blocks)) == (3, 1)
    ids, mask = padded_batch([9, 6, 3], 9)
    dec = torch.randint(0, V, (3, 5))
    dec[:, 0] = EOS
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert max_diff(ours(ids, mask, dec), want) <= TOL


def test_bart_converted_file(bart):
    ref, ours, _, out = bart
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == "bart" and ckpt["config"]["max_positions"] == 42  # 40 + offset 2
    assert ckpt["config"]["scale_embedding"] == ref.config.scale_embedding
    assert ckpt["tokenizer"]["vocab"]["<mask>"] == 5
    assert ours.config.decoder_start_id == EOS
    assert torch.equal(ckpt["model"]["final_logits_bias"], ref.final_logits_bias)


def test_bart_generation_defaults(tmp_path):
    """config.json's generation defaults (bart-base: num_beams 4, no_repeat_ngram_size 3, early_stopping
    true) reach the converted file; generation_config.json is not read, but the report names what it
    sets otherwise; generation_args turns them into beam_search's keywords as transformers 4.2.1 did."""
    ref = tiny_bart(False, seed=5)
    st = tmp_path / "st"
    ref.save_pretrained(st)
    cfg = json.loads((st / "config.json").read_text())
    (st / "config.json").write_text(json.dumps({**cfg, "num_beams": 4, "no_repeat_ngram_size": 3,
                                                "early_stopping": True}))
    (st / "generation_config.json").write_text(json.dumps({"num_beams": 4, "no_repeat_ngram_size": 2}))
    report = models.convert(str(st), str(tmp_path / "o.pt"))
    c = models.load_checkpoint(str(tmp_path / "o.pt"), arch="bart").config
    assert (c.num_beams, c.no_repeat_ngram, c.early_stopping) == (4, 3, True)
    assert any(n.startswith("generation defaults from config.json: num_beams 4, no_repeat_ngram_size 3, early_"
                            "stopping True; generation_config.json, not read, sets no_repeat_ngram_size=2")
               for n in report["notes"])
    assert models.generation_args(c) == dict(beams=4, no_repeat_ngram=3, early_stopping=True, force_eos=True)
    assert models.generation_args(c, 1)["force_eos"] is False  # 4.2.1's greedy search never forced EOS
    for key, value in [("early_stopping", "never"), ("no_repeat_ngram_size", -1)]:
        (st / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"unsupported generation default: config.json has {key}="):
            models.convert(str(st), str(tmp_path / "o.pt"))


def test_bart_extra_embeds_after_text(bart):
    """Visual tokens appended after the text: no position, no layernorm_embedding, their own mask. The
    reference runs transformers' own modules in that order (VL-Adapter's JointEncoder)."""
    ref, ours, _, _ = bart
    ids, mask = padded_batch([7, 4, 6], 7)
    extra = torch.randn(3, 5, D)
    extra_mask = torch.ones(3, 5, dtype=torch.long)
    extra_mask[1, 3:] = 0
    dec = torch.randint(0, V, (3, 4))
    enc, m = ref.model.encoder, ref.model
    with torch.no_grad():
        text = enc.embed_tokens(ids) + enc.embed_positions(ids)  # embed_tokens applies embed_scale
        x = torch.cat([enc.layernorm_embedding(text), extra], dim=1)  # (3, 7 + 5, D)
        keep = torch.cat([mask, extra_mask], dim=1)
        additive = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (3, 1, 1, 12)
        for layer in enc.layers:
            x = layer(x, additive)
        h = m.decoder(input_ids=dec, encoder_hidden_states=x, encoder_attention_mask=keep).last_hidden_state
        want = ref.lm_head(h) + ref.final_logits_bias
        got = ours(ids, mask, dec, extra_embeds=extra, extra_mask=extra_mask)
        memory, memory_mask = ours.encode(ids, mask, extra, extra_mask)
        no_extra_mask = ours.encode(ids, None, extra)[1]
    assert max_diff(got, want) <= TOL
    assert max_diff(memory, x) <= TOL and torch.equal(memory_mask, keep.bool())
    assert no_extra_mask is None  # nothing masked: SDPA gets no mask at all


def test_bart_cache_equals_full_forward(bart):
    _, ours, _, _ = bart
    check_decoder_cache(ours, *padded_batch([8, 5], 8), torch.randint(0, V, (2, 9)), V, TOL)


def bart_generate(model, ids, mask, beams, max_new_tokens, **kw):
    """Our decoding as a trainer runs it: encode once, repeat per beam, models.beam_search over
    BART.beam_step (the decoder start token first, then one token per step with the cache)."""
    with torch.no_grad():
        memory, memory_mask = model.encode(ids, mask)
        memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)
        return models.beam_search(model.beam_step(memory, memory_mask), len(ids), beams, max_new_tokens, EOS, **kw)


def hf_generate(ref, ids, mask, beams, max_new_tokens, no_repeat_ngram=0, early_stopping=False, force_eos=False):
    """transformers' generate with the same settings, its rows cut as ours: no start token, nothing from EOS on."""
    out = ref.generate(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=max_new_tokens,
                       length_penalty=1.0, early_stopping=early_stopping, do_sample=False,
                       no_repeat_ngram_size=no_repeat_ngram, min_length=0, decoder_start_token_id=EOS,
                       eos_token_id=EOS, pad_token_id=1, forced_bos_token_id=None,
                       forced_eos_token_id=EOS if force_eos else None)
    rows = [row[1:] for row in out.tolist()]  # drop the decoder start token
    return [row[:row.index(EOS)] if EOS in row else row for row in rows]


def repeats_ngram(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


@pytest.fixture(scope="module")
def decoder():
    """A tiny random BART (transformers) and ours with the same weights; EOS's bias raised so that some
    rows end by EOS (one at once, one after a few tokens) and others run on to the limit."""
    ref = tiny_bart(False, seed=7, jitter=0.3)
    with torch.no_grad():
        ref.final_logits_bias[0, EOS] += 3.5
    c = models.bart_config(ref.config.to_dict())
    sd, _ = models.convert_state_dict("bart", ref.state_dict(), c)
    ours = models.build_model(c).eval()
    ours.load_state_dict(sd, strict=True)
    torch.manual_seed(0)
    return ref, ours, padded_batch([9, 4, 7, 9, 3, 6, 8, 5], 9)


@pytest.mark.parametrize("settings", [
    {},  # transformers' defaults
    dict(no_repeat_ngram=3, early_stopping=True, force_eos=True),  # bart-base's config as the releases ran it
    dict(no_repeat_ngram=2, early_stopping=False, force_eos=True),
    dict(no_repeat_ngram=3, early_stopping=True),
], ids=["plain", "release", "bigrams", "no-forced-eos"])
def test_bart_beam_search_matches_transformers(decoder, settings):
    ref, ours, (ids, mask) = decoder
    lengths = set()
    for k in (1, 2, 5):
        for n_new in (3, 10):
            got = bart_generate(ours, ids, mask, k, n_new, **settings)
            assert got == hf_generate(ref, ids, mask, k, n_new, **settings), (k, n_new)
            lengths |= {len(t) for t in got}
            assert not settings.get("force_eos") or max(map(len, got)) < n_new  # the last token is EOS
    assert min(lengths) < 3 and len(lengths) >= 4  # EOS ends hypotheses at many lengths


def test_bart_ngram_blocking_is_triggered(decoder):
    """Unblocked, the decoder repeats 3-grams in some rows (greedy and beams); blocked, no row does,
    token for token as transformers."""
    ref, ours, (ids, mask) = decoder
    with torch.no_grad():
        ref.final_logits_bias[0, EOS] -= 3.5  # long outputs: EOS as likely as any token
        ours.final_logits_bias[0, EOS] -= 3.5
    try:
        for k in (1, 5):
            free = bart_generate(ours, ids, mask, k, 16)
            blocked = bart_generate(ours, ids, mask, k, 16, no_repeat_ngram=3)
            assert sum(repeats_ngram(t, 3) for t in free) >= 2, free
            assert not any(repeats_ngram(t, 3) for t in blocked)
            assert blocked == hf_generate(ref, ids, mask, k, 16, no_repeat_ngram=3)
            assert free == hf_generate(ref, ids, mask, k, 16)
    finally:
        with torch.no_grad():
            ref.final_logits_bias[0, EOS] += 3.5
            ours.final_logits_bias[0, EOS] += 3.5


def test_bart_tokenizer_specials(tmp_path):
    """BART's tokenizer is RoBERTa's byte-level BPE with <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask> last:
    our BPETokenizer finds those specials by name and wraps <s> ... </s> as BartTokenizer does."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "Ġ": 6, "ab": 7, "Ġab": 8, "Ġa": 9,
             "<mask>": 10}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ ab\nĠ a\n", encoding="utf-8")
    ours = data.BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    theirs = hf.BartTokenizer(vocab=vocab, merges=[("a", "b"), ("Ġ", "ab"), ("Ġ", "a")])
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.mask_id) == (0, 1, 2, 10)
    for text in ["ab", "ab a b", " ab ab", "ba"]:
        want = theirs(text)["input_ids"]
        assert ours.encode(text, special=True) == want, text
        assert ours.decode(want, skip_special=True) == theirs.decode(want, skip_special_tokens=True)


# ---- CLIP's ModifiedResNet ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


# What OpenAI's full CLIP state dict adds around the visual tower (names from clip/model.py CLIP and
# the TorchScript archive's extra scalars); the converter must ignore each, with a reason.
TEXT_TOWER = {"token_embedding.weight": (10, 4), "positional_embedding": (6, 4), "ln_final.weight": (4,),
              "transformer.resblocks.0.attn.in_proj_weight": (12, 4), "text_projection": (4, 16),
              "logit_scale": (), "input_resolution": (), "context_length": (), "vocab_size": ()}


def full_state_dict(clip, dtype=torch.float32):
    sd = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in clip["state_dict"].items()}
    sd.update({k: torch.randn(shape).to(dtype) for k, shape in TEXT_TOWER.items()})
    return sd


def check_clip(model, clip):
    with torch.no_grad():
        grid, pooled = model(clip["pixels"])
    want_grid = clip["grid"].flatten(2).transpose(1, 2)  # (2, 256, 3, 3) -> (2, 9, 256), row-major
    assert grid.shape == (2, 9, 256) and pooled.shape == (2, 16)
    return max_diff(grid, want_grid), max_diff(pooled, clip["pooled"])


def test_clip_parity_through_the_cli(clip, tmp_path):
    torch.save(full_state_dict(clip), tmp_path / "clip.pt")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "models.py"), "convert", "--src", str(tmp_path / "clip.pt"),
                          "--out", str(tmp_path / "ours.pt"), "--heads", "2"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "arch clip_resnet" in res.stdout and "text tower" in res.stdout
    model = models.load_checkpoint(str(tmp_path / "ours.pt"), arch="clip_resnet")
    c = model.config
    assert (c.stages, c.d_model, c.output_dim, c.image_size, c.n_heads) == ((1, 2, 2, 1), 256, 16, 96, 2)
    assert (c.image_mean, c.image_std, c.image_resample) == ((0.48145466, 0.4578275, 0.40821073),
                                                              (0.26862954, 0.26130258, 0.27577711), "bicubic")
    grid_diff, pooled_diff = check_clip(model, clip)
    assert grid_diff <= TOL and pooled_diff <= TOL


def test_clip_heads_default_is_openai_rule(clip, tmp_path):
    """Without --heads the pool gets width * 32 // 64 = 4 heads, not the fixture's 2: the outputs differ,
    which is why the count must be given for this tiny model (no shape holds it)."""
    torch.save(clip["state_dict"], tmp_path / "clip.pt")
    models.convert(str(tmp_path / "clip.pt"), str(tmp_path / "ours.pt"))
    model = models.load_checkpoint(str(tmp_path / "ours.pt"))
    assert model.config.n_heads == 4
    grid_diff, pooled_diff = check_clip(model, clip)
    assert grid_diff <= TOL and pooled_diff > TOL


def test_clip_frozen_batchnorm_in_train_mode(clip, tmp_path):
    torch.save(clip["state_dict"], tmp_path / "clip.pt")
    models.convert(str(tmp_path / "clip.pt"), str(tmp_path / "ours.pt"), heads=2)
    model = models.load_checkpoint(str(tmp_path / "ours.pt")).train()
    grid_diff, pooled_diff = check_clip(model, clip)
    assert grid_diff <= TOL and pooled_diff <= TOL
    assert torch.equal(model.bn1.running_mean, clip["state_dict"]["visual.bn1.running_mean"])  # not updated
    with pytest.raises(ValueError, match="expects 96x96 images, got 64x64"):
        model(torch.zeros(1, 3, 64, 64))


def test_clip_safetensors_fp16_becomes_fp32(clip, tmp_path):
    sd = full_state_dict(clip, torch.float16)
    sd = {k: t for k, t in sd.items() if not k.endswith("num_batches_tracked")}  # RN101.pt may lack them
    save_file(sd, str(tmp_path / "clip.safetensors"))
    notes = models.convert(str(tmp_path / "clip.safetensors"), str(tmp_path / "ours.pt"), heads=2)["notes"]
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)["model"]
    w = ours["layer3.1.conv2.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, sd["visual.layer3.1.conv2.weight"].float())
    assert ours["bn1.num_batches_tracked"].dtype == torch.int64 and ours["bn1.num_batches_tracked"] == 0
    assert "num_batches_tracked absent: 0 (unused: the statistics are frozen)" in notes


def torchscript_archive(sd, path):
    """torch.jit.save of a module tree with OpenAI's key names (as RN101.pt is): each dotted name a
    path of submodules; 4-D weights in real Conv2d modules (whose attributes include int lists)."""
    root = nn.Module()
    for key, t in sd.items():
        *names, leaf = key.split(".")
        m = root
        for name in names[:-1] if t.dim() == 4 else names:
            if not hasattr(m, name):
                m.add_module(name, nn.Module())
            m = getattr(m, name)
        if t.dim() == 4:  # a bias-free conv weight
            conv = nn.Conv2d(t.shape[1], t.shape[0], t.shape[2], bias=False)
            conv.weight = nn.Parameter(t, requires_grad=False)
            m.add_module(names[-1], conv)
        elif t.is_floating_point() and t.dim() > 0:
            m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            m.register_buffer(leaf, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; OpenAI's files are not
        torch.jit.save(torch.jit.script(root), str(path))


def test_clip_torchscript_archive(clip, tmp_path):
    sd = full_state_dict(clip)
    sd["visual.conv1.weight"] = sd["visual.conv1.weight"].half()  # OpenAI's archive stores fp16
    torchscript_archive(sd, tmp_path / "RN-tiny.pt")
    assert models.is_torchscript(str(tmp_path / "RN-tiny.pt"))
    report = models.convert(str(tmp_path / "RN-tiny.pt"), str(tmp_path / "ours.pt"), heads=2)
    assert report["params"] == sum(t.numel() for k, t in clip["state_dict"].items()
                                   if "running" not in k and "num_batches" not in k)
    assert set(report["ignored"]) == set(TEXT_TOWER)
    model = models.load_checkpoint(str(tmp_path / "ours.pt"))
    assert torch.equal(model.conv1.weight, sd["visual.conv1.weight"].float())
    model.conv1.weight.data = clip["state_dict"]["visual.conv1.weight"]  # the fp32 original for parity
    grid_diff, pooled_diff = check_clip(model, clip)
    assert grid_diff <= TOL and pooled_diff <= TOL


def test_torchscript_reader_runs_no_code(tmp_path):
    """A data.pkl that names any other global (here os.system) is refused, not imported."""
    payload = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(ValueError, match="refusing os.system"):
        models.read_torchscript(str(tmp_path / "evil.pt"))


# ---- counts (meta device: no weights) and preprocessing -------------------------------------------


def count(model):
    return sum(p.numel() for p in model.parameters())  # a tied tensor once


def test_real_counts():
    with torch.device("meta"):
        bart = models.build_model(models.PRESETS["bart-base"])
        theirs = hf.BartForConditionalGeneration(hf.BartConfig())  # BartConfig's defaults: bart-large shapes
        large = models.build_model(models.PRESETS["bart-large"])
        rn101 = models.build_model(models.PRESETS["clip-rn101"])
    assert count(bart) == 139_420_416  # BART-base, VL-PET's orig_param_size (CLIPBART_NOTES 1.6)
    assert count(large) == count(theirs)
    assert count(rn101) == 56_259_936 and len(rn101.state_dict()) == 645  # OpenAI's RN101 visual tower


def test_clip_preprocessing_bicubic_squash(tmp_path):
    """data.load_image with CLIP's stored settings equals transformers' PIL CLIP processor set to
    squash (no crop); ViT's bilinear path would differ."""
    rgb = np.random.RandomState(0).randint(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    c = models.PRESETS["clip-rn101"]
    proc = hf.CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                    image_mean=list(c.image_mean), image_std=list(c.image_std))
    with Image.open(tmp_path / "im.png") as im:
        want = proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    images = data.Images(str(tmp_path), 32, c.image_mean, c.image_std, c.image_resample)
    assert max_diff(images("im.png"), want) < 1e-5
    assert max_diff(data.load_image(str(tmp_path / "im.png"), 32, c.image_mean, c.image_std), want) > 1e-2
    with pytest.raises(ValueError, match="unknown resample filter 'lanczos'"):
        data.load_image(str(tmp_path / "im.png"), 32, c.image_mean, c.image_std, "lanczos")


# ---- bad input: one "error:" line, exit status 2 --------------------------------------------------


def cli_error(capsys, *argv):
    capsys.readouterr()  # drop earlier output (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        models.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("visual.layer2.1.conv2.weight"), "missing 1 key.*visual.layer2.1.conv2.weight"),
    (lambda sd: sd.__setitem__("visual.layer2.1.extra", torch.zeros(1)), "unexpected key: visual.layer2.1.extra"),
    (lambda sd: sd.__setitem__("visual.attnpool.c_proj.bias", torch.zeros(3)), "wrong shape: attnpool.c_proj.bias"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("visual.")], "no visual.\\* keys"),
    (lambda sd: sd.__setitem__("visual.class_embedding", torch.zeros(4)), "CLIP ViT visual tower"),
])
def test_clip_bad_state_dicts(clip, tmp_path, capsys, edit, message):
    sd = full_state_dict(clip)
    edit(sd)
    torch.save(sd, tmp_path / "clip.pt")
    err = cli_error(capsys, "--src", tmp_path / "clip.pt", "--out", tmp_path / "o.pt", "--heads", "2")
    assert re.search(message, err), err
    assert not (tmp_path / "o.pt").exists()


def test_truncated_files(clip, tmp_path, capsys):
    sd = full_state_dict(clip)
    torch.save(sd, tmp_path / "full.pt")
    save_file(sd, str(tmp_path / "full.safetensors"))
    torchscript_archive(sd, tmp_path / "full-ts.pt")
    for name, message in [("full.pt", "(truncated, or another kind of file)"),
                          ("full.safetensors", "truncated safetensors"),
                          ("full-ts.pt", "(truncated, or another kind of file)")]:
        blob = (tmp_path / name).read_bytes()
        cut = tmp_path / ("cut-" + name)
        cut.write_bytes(blob[: len(blob) * 2 // 3])
        assert message in cli_error(capsys, "--src", cut, "--out", tmp_path / "o.pt")
    # a TorchScript archive whose tensor data is cut short, zip directory intact
    with zipfile.ZipFile(tmp_path / "full-ts.pt") as z, zipfile.ZipFile(tmp_path / "short-ts.pt", "w") as out:
        for info in z.infolist():
            blob = z.read(info)
            out.writestr(info, blob[:-4] if info.filename.endswith("/data/0") else blob)
    assert "cannot read the TorchScript archive" in cli_error(capsys, "--src", tmp_path / "short-ts.pt",
                                                              "--out", tmp_path / "o.pt")


def test_bart_bad_inputs(tmp_path, capsys):
    ref = tiny_bart(False, seed=5)
    st = tmp_path / "st"
    ref.save_pretrained(st)
    good = dict(ref.state_dict())
    for edit, message in [
        (lambda sd: sd.pop("model.decoder.layers.1.encoder_attn.v_proj.bias"), "missing 1 key.*encoder_attn.v_proj.bias"),
        (lambda sd: sd.__setitem__("model.encoder.layers.0.adapter", torch.zeros(1)), "unexpected key: encoder.layers.0.adapter"),
        (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(V, D)), "lm_head.weight that differs from shared"),
    ]:
        sd = dict(good)
        edit(sd)
        (tmp_path / "bin").mkdir(exist_ok=True)
        shutil.copy(st / "config.json", tmp_path / "bin" / "config.json")
        torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
        assert re.search(message, cli_error(capsys, "--src", tmp_path / "bin", "--out", tmp_path / "o.pt"))
    cfg = json.loads((st / "config.json").read_text())
    (st / "config.json").write_text(json.dumps({**cfg, "model_type": "mbart"}))
    assert "unknown model_type 'mbart'" in cli_error(capsys, "--src", st, "--out", tmp_path / "o.pt")
    (st / "config.json").write_text(json.dumps({**cfg, "decoder_ffn_dim": 40}))
    assert "decoder_ffn_dim=40" in cli_error(capsys, "--src", st, "--out", tmp_path / "o.pt")
    assert "no such file or directory" in cli_error(capsys, "--src", tmp_path / "nothing", "--out", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_cli_bad_input_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "models.py"), "convert", "--src", str(tmp_path),
                          "--out", str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    assert "unknown model_type 'bert'" in res.stderr and "Traceback" not in res.stderr
