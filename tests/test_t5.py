"""T5 (v1.0: ReLU, tied and rescaled head; v1.1: gated-GELU, own head) against transformers'
T5ForConditionalGeneration, and its one-time conversion.

    python -m pytest -q tests/test_t5.py

Every reference is a tiny random model built here, saved as a Hugging Face folder and converted with
`python models.py convert`. The tiny models have d_kv * heads (24) != d_model (32), 3 encoder and 2
decoder layers, 8 relative buckets with max distance 20 (so the logarithmic buckets are reached by
the test sequences), and RMS norm weights drawn in [0.5, 1.5] so that a missing or misplaced norm shows.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as hf
from safetensors.torch import save_file  # test-only: writes .safetensors inputs

import models
from conftest import check_decoder_cache
import routing_peft as rp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
V, D, PAD, EOS = 48, 32, 0, 1  # T5: <pad> = 0 starts decoding, </s> = 1 ends it
SPIECE = bytes(range(256)) * 3  # stands for spiece.model: the converter stores the bytes as they are
FAMILIES = ["v1.0", "v1.1"]


def max_diff(a, b):
    return (a - b).abs().max().item()


def tiny_t5(family, seed, dropout=0.1):
    """A random T5ForConditionalGeneration of the family: RMS norm weights in [0.5, 1.5], relative
    position tables N(0, 1) (HF's init is small), v1.1 with its own lm_head (transformers 5 ties it
    to shared at build time: a new Parameter unties it, as loading a v1.1 checkpoint does)."""
    torch.manual_seed(seed)
    gated = family == "v1.1"
    cfg = hf.T5Config(vocab_size=V, d_model=D, d_kv=6, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=dropout,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    ref = hf.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
        if gated:
            ref.lm_head.weight = nn.Parameter(0.5 * torch.randn(V, D))
    assert ref.config.scale_decoder_outputs == (not gated)
    return ref


def hub_config(ref):
    """config.json as the Hub's T5 files have it: v1.1 says tie_word_embeddings false (transformers 4's
    flag for an untied, unscaled head), with no scale_decoder_outputs (transformers 5's)."""
    cfg = ref.config.to_dict()
    if not cfg.pop("scale_decoder_outputs"):
        cfg["tie_word_embeddings"] = False
    return cfg


STALE = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def write_folder(path, config, sd, fmt):
    """A Hugging Face T5 folder: config.json, spiece.model and the weights in one format."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "spiece.model").write_bytes(SPIECE)
    if fmt == "safetensors":
        save_file({k: t.contiguous() for k, t in sd.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(sd, path / "pytorch_model.bin")


def convert_cli(src, out, new_process=False):
    """`python models.py convert --src src --out out` (in this process, or a new one) -> its report."""
    argv = ["convert", "--src", str(src), "--out", str(out)]
    if new_process:
        res = subprocess.run([sys.executable, os.path.join(ROOT, "models.py"), *argv], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        return res.stdout
    with contextlib.redirect_stdout(io.StringIO()) as report:
        models.main(argv)
    return report.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def t5(request, tmp_path_factory):
    """(reference, ours from a .safetensors folder without the tied copies, ours from a .bin with every
    tied copy and the stale cross-attention table, the two CLI reports, the .bin's converted file)."""
    ref = tiny_t5(request.param, seed=3)
    root = tmp_path_factory.mktemp("t5")
    full = dict(ref.state_dict())  # every tied alias (and v1.0's lm_head) under its own name
    shared = full["shared.weight"].data_ptr()
    lean = {k: t for k, t in full.items() if k == "shared.weight" or t.data_ptr() != shared}  # no tied copy
    write_folder(root / "st", hub_config(ref), lean, "safetensors")
    write_folder(root / "bin", hub_config(ref), {**full, STALE: torch.randn(8, 4)}, "bin")
    reports = [convert_cli(root / "st", root / "st.pt"), convert_cli(root / "bin", root / "bin.pt")]
    load = models.load_checkpoint
    return ref, load(str(root / "st.pt"), arch="t5"), load(str(root / "bin.pt"), arch="t5"), reports, root / "bin.pt"


def padded_batch(lengths, n):
    """tokens ... </s> then padding (id 0) on the right; the last row is padded on the left instead."""
    ids = torch.full((len(lengths), n), PAD)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        ids[b, :L] = torch.randint(2, V, (L,))
        ids[b, L - 1] = EOS
        mask[b, :L] = 1
    ids[-1], mask[-1] = ids[-1].roll(n - lengths[-1]), mask[-1].roll(n - lengths[-1])
    return ids, mask


def decoder_inputs(B, T):
    dec = torch.randint(0, V, (B, T))
    dec[:, 0] = PAD  # decoder_start_token_id, as _shift_right puts it
    return dec


# ---- relative position buckets ------------------------------------------------------------------

# T5_NOTES 1.3 (computed there with transformers 5.24), 32 buckets, max distance 128: rel -> bucket
BIDIRECTIONAL = {-200: 15, -128: 15, -127: 15, -64: 14, -32: 12, -16: 10, -12: 9, -9: 8, -8: 8, -7: 7, -1: 1, 0: 0,
                 1: 17, 7: 23, 8: 24, 12: 25, 16: 26, 32: 28, 64: 30, 100: 31, 127: 31, 200: 31}
UNIDIRECTIONAL = {5: 0, 0: 0, -1: 1, -15: 15, -16: 16, -17: 16, -20: 17, -32: 21, -64: 26, -100: 30, -127: 31, -500: 31}


def test_relative_position_bucket():
    for table, bidirectional in [(BIDIRECTIONAL, True), (UNIDIRECTIONAL, False)]:
        rel = torch.tensor(list(table))
        got = models.relative_position_bucket(rel, bidirectional, 32, 128)
        assert got.tolist() == list(table.values()), bidirectional
    rel = torch.arange(-300, 301)
    for buckets, distance in [(32, 128), (8, 20), (10, 7)]:
        for bidirectional in (True, False):
            want = hf.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(models.relative_position_bucket(rel, bidirectional, buckets, distance), want)


# ---- parity with transformers -----------------------------------------------------------------------


def test_t5_parity(t5):
    ref, ours_st, ours_bin, _, _ = t5
    ids, mask = padded_batch([11, 20, 4, 9], 20)
    dec = decoder_inputs(4, 8)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got_st, got_bin = ours_st(ids, mask, dec), ours_bin(ids, mask, dec)
        unmasked = ours_st(ids[1:2], None, dec[1:2]), ref(input_ids=ids[1:2], decoder_input_ids=dec[1:2]).logits
    assert got_st.shape == (4, 8, V)
    assert max_diff(got_st, want) <= TOL and max_diff(got_bin, want) <= TOL  # padded rows and positions included
    assert max_diff(*unmasked) <= TOL
    assert want.abs().max() > 1.0  # logits large enough for the tolerance to mean something


def test_t5_train_mode_dropout_as_transformers(t5):
    """In train mode, with the same seed, our dropout masks fall where transformers' do (embeddings,
    attention probabilities, each sub-layer's output, the FFN activation, after each final norm)."""
    ref, ours, _, _, _ = t5
    ids, mask = padded_batch([9, 6, 12], 12)
    dec = decoder_inputs(3, 5)
    ref.train(), ours.train()
    try:
        with torch.no_grad():
            torch.manual_seed(11)
            want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            torch.manual_seed(11)
            got = ours(ids, mask, dec)
            plain = ours.eval()(ids, mask, dec)
    finally:
        ref.eval(), ours.eval()
    assert max_diff(got, want) <= TOL
    assert max_diff(got, plain) > 0.1  # dropout did act


def test_t5_converted_file(t5):
    ref, ours, _, reports, out = t5
    ckpt = torch.load(out, weights_only=True)
    c = ours.config
    gated = ref.config.is_gated_act
    assert ckpt["arch"] == "t5"
    assert (c.d_kv, c.n_layers, c.n_dec_layers, c.n_heads, c.d_ff) == (6, 3, 2, 4, 40)
    assert (c.rel_buckets, c.rel_max_distance) == (8, 20)
    assert (c.ffn, c.tie_embeddings, c.decoder_start_id, c.pad_id, c.ln_eps) == (
        "gated-gelu" if gated else "relu", not gated, 0, 0, 1e-6)
    assert c.gelu == "tanh"  # gelu_new: v1.1's FFN and the adapters VL-T5 / VL-PET insert
    assert bytes(ckpt["tokenizer"]["spiece_model"].tolist()) == SPIECE
    assert ckpt["tokenizer"]["spiece_model"].dtype == torch.uint8
    st_report, bin_report = reports
    assert f"tokenizer: spiece.model, {len(SPIECE):,} bytes" in st_report
    assert "stale cross-attention position table" in bin_report and "stale" not in st_report
    assert ("own lm_head, no rescale" if gated else "tied, v1.0") in bin_report
    sd = ckpt["model"]
    assert "encoder.blocks.0.attn.ln.weight" in sd and "decoder.blocks.1.cross.ln.weight" in sd
    assert ("decoder.blocks.1.mlp.gate.weight" in sd) == gated and ("lm_head.weight" in sd) == gated
    wi = "decoder.block.1.layer.2.DenseReluDense." + ("wi_1" if gated else "wi") + ".weight"
    assert torch.equal(sd["decoder.blocks.1.mlp.fc1.weight"], ref.state_dict()[wi])
    assert torch.equal(sd["encoder.rel_bias.weight"],
                       ref.state_dict()["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    assert not any(k.endswith(".bias") for k in sd)  # T5 has no bias anywhere (rel_bias is a table)


def joint_encoder_reference(ref, ids, mask, extra, extra_mask, dec):
    """VL-T5's JointEncoder made of transformers' own T5 modules: text embeddings then the extra ones,
    dropout over the whole sequence, a position bias from transformers' compute_bias on the text block
    and zeros elsewhere, plus the padding mask, the encoder blocks, the final norm and dropout; then
    transformers' decoder and head. -> (encoder states, mask, logits)."""
    enc, (N, L) = ref.encoder, (ids.shape[1], extra.shape[1])
    bias = torch.zeros(1, ref.config.num_heads, N + L, N + L)
    bias[:, :, :N, :N] = enc.block[0].layer[0].SelfAttention.compute_bias(N, N)  # (1, H, N, N)
    keep = torch.cat([mask, extra_mask], dim=1)  # (B, N + L)
    additive = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
    x = enc.dropout(torch.cat([ref.shared(ids), extra], dim=1))
    for block in enc.block:
        x = block(x, additive, bias)[0]
    x = enc.dropout(enc.final_layer_norm(x))
    h = ref.decoder(input_ids=dec, encoder_hidden_states=x, encoder_attention_mask=keep).last_hidden_state
    return x, keep, ref.lm_head(h * ref.config.d_model ** -0.5 if ref.config.scale_decoder_outputs else h)


def test_t5_extra_embeds_after_text(t5):
    """Visual tokens appended after the text, their bias 0, as VL-T5's JointEncoder (T5_NOTES 3.3)."""
    ref, ours, _, _, _ = t5
    ids, mask = padded_batch([7, 4, 6], 7)
    extra = torch.randn(3, 5, D)
    extra_mask = torch.ones(3, 5, dtype=torch.long)
    extra_mask[1, 3:] = 0
    dec = decoder_inputs(3, 4)
    with torch.no_grad():
        x, keep, want = joint_encoder_reference(ref, ids, mask, extra, extra_mask, dec)
        got = ours(ids, mask, dec, extra_embeds=extra, extra_mask=extra_mask)
        memory, memory_mask = ours.encode(ids, mask, extra, extra_mask)
        no_mask = ours.encode(ids, None, extra)[1]
        ref.train(), ours.train()  # and the same dropout masks: over the whole sequence, after the final norm
        try:
            torch.manual_seed(5)
            want_train = joint_encoder_reference(ref, ids, mask, extra, extra_mask, dec)[2]
            torch.manual_seed(5)
            got_train = ours(ids, mask, dec, extra_embeds=extra, extra_mask=extra_mask)
        finally:
            ref.eval(), ours.eval()
    assert max_diff(got, want) <= TOL
    assert max_diff(memory, x) <= TOL and torch.equal(memory_mask, keep.bool())
    assert no_mask is None  # nothing masked: no mask at all
    assert max_diff(got_train, want_train) <= TOL and max_diff(got_train, got) > 0.1


def test_t5_extra_tokens_have_no_position(t5):
    """With no position bias on any pair involving an extra token, reordering the extra tokens only
    reorders their outputs: the text outputs do not move (a bias over the whole sequence would move them)."""
    _, ours, _, _, _ = t5
    ids, mask = padded_batch([6, 3], 6)
    extra = torch.randn(2, 5, D)
    order = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        memory = ours.encode(ids, mask, extra)[0]
        moved = ours.encode(ids, mask, extra[:, order])[0]
        text_only = ours.encode(ids, mask)[0]
    assert max_diff(moved[:, :6], memory[:, :6]) <= TOL
    assert max_diff(moved[:, 6:], memory[:, 6:][:, order]) <= TOL
    assert max_diff(text_only, memory[:, :6]) > 1e-3  # the text does attend to the extra tokens


def test_t5_cache_equals_full_forward(t5):
    _, ours, _, _, _ = t5
    check_decoder_cache(ours, *padded_batch([8, 5], 8), decoder_inputs(2, 9), V, TOL)


def t5_generate(model, ids, mask, beams, max_new_tokens):
    """Our decoding as a trainer runs it: encode once, repeat per beam, models.beam_search over
    T5.beam_step (the decoder start token 0 first, then one token per step with the cache)."""
    with torch.no_grad():
        memory, memory_mask = model.encode(ids, mask)
        memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)
        return models.beam_search(model.beam_step(memory, memory_mask), len(ids), beams, max_new_tokens, EOS)


@pytest.mark.parametrize("family", FAMILIES)
def test_t5_beam_search_matches_transformers(family):
    ref = tiny_t5(family, seed=5)
    with torch.no_grad():
        if family == "v1.0":
            ref.shared.weight[EOS] *= 2.5  # some rows end by EOS, others run to the limit
        else:
            ref.lm_head.weight[EOS] *= 4.0
    c = models.t5_config(hub_config(ref))
    sd, _ = models.convert_state_dict("t5", ref.state_dict(), c)
    ours = models.build_model(c).eval()
    ours.load_state_dict(sd, strict=True)
    torch.manual_seed(0)
    ids, mask = padded_batch([9, 4, 7, 9, 3, 6, 8, 5], 9)
    lengths = set()
    for k in (1, 2, 5):
        got = t5_generate(ours, ids, mask, k, 10)
        out = ref.generate(input_ids=ids, attention_mask=mask, num_beams=k, max_new_tokens=10, length_penalty=1.0,
                           early_stopping=False, do_sample=False, no_repeat_ngram_size=0, min_length=0,
                           decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD)
        rows = [row[1:] for row in out.tolist()]  # drop the decoder start token
        want = [row[:row.index(EOS)] if EOS in row else row for row in rows]
        assert got == want, k
        lengths |= {len(t) for t in got}
    assert len(lengths) > 1 and min(lengths) < 10  # some hypotheses end by EOS, others at the limit


def test_t5_transformers5_file_of_an_unscaled_model(tmp_path):
    """transformers 5 ties a v1.1 model's head to shared (config tie_word_embeddings true,
    scale_decoder_outputs false) and saves no lm_head: ours copies shared into its own head, no rescale."""
    torch.manual_seed(8)
    cfg = hf.T5Config(vocab_size=V, d_model=D, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=PAD)
    ref = hf.T5ForConditionalGeneration(cfg).eval()
    assert ref.lm_head.weight is ref.shared.weight and not ref.config.scale_decoder_outputs
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "spiece.model").write_bytes(SPIECE)
    report = convert_cli(tmp_path / "hf", tmp_path / "ours.pt", new_process=True)
    assert "this transformers 5 file ties it to shared: copied from shared" in report
    ours = models.load_checkpoint(str(tmp_path / "ours.pt"))
    ids, mask = padded_batch([6, 3], 6)
    dec = decoder_inputs(2, 4)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert max_diff(ours(ids, mask, dec), want) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_t5_resize_token_table_keeps_the_old_rows(family):
    """resize_token_table (VL-T5's 32,128 -> 32,200): the old tokens' logits do not move, the new rows are N(0, std)
    in the shared table and, for v1.1's own head, nn.Linear's uniform init (bound d^-0.5); a cut keeps the first rows."""
    ref = tiny_t5(family, seed=4)
    c = models.t5_config(hub_config(ref))
    ours = models.build_model(c).eval()
    ours.load_state_dict(models.convert_state_dict("t5", ref.state_dict(), c)[0], strict=True)
    ids, mask = padded_batch([6, 4], 6)
    ids, dec = ids.clamp(max=V - 9), decoder_inputs(2, 3).clamp(max=V - 9)  # tokens the cut keeps
    with torch.no_grad():
        before = ours(ids, mask, dec)
        ours.resize_token_table(V + 4000, 2.0)
        grown = ours(ids, mask, dec)
        new = ours.wte.weight[V:]
        assert grown.shape == (2, 3, V + 4000) and max_diff(grown[..., :V], before) <= 1e-6
        assert abs(new.std().item() - 2.0) < 0.1 and abs(new.mean().item()) < 0.1
        if family == "v1.1":
            head = ours.lm_head.weight[V:]
            assert head.abs().max() <= D ** -0.5 and abs(head.std().item() - D ** -0.5 / 3 ** 0.5) < 0.01
        ours.resize_token_table(V - 8, 1.0)
        assert max_diff(ours(ids, mask, dec), before[..., :V - 8]) <= 1e-6


# ---- the module tree PEFT code relies on ------------------------------------------------------------


def test_t5_sublayers_see_the_residual_stream(t5):
    """Each sub-layer normalises its own input, so a wrapper around blocks[i].attn / .mlp / .cross gets
    the residual stream X (VL-PET's gate reads X, T5_NOTES 4.2), and x + drop(sub(x)) is the block."""
    _, ours, _, _, _ = t5
    block = ours.decoder.blocks[1]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
             for name, m in [("block", block), ("attn", block.attn), ("cross", block.cross), ("mlp", block.mlp)]]
    ids, mask = padded_batch([5, 3], 5)
    with torch.no_grad():
        memory, memory_mask = ours.encode(ids, mask)
        ours.decode(decoder_inputs(2, 4), memory, memory_mask)
        for h in hooks:
            h.remove()
        bias = ours.decoder.position_bias(4, 4)
        x = seen["block"]
        assert torch.equal(seen["attn"], x)
        x = x + block.attn(x, models.masked_bias(bias, torch.ones(4, 4, dtype=torch.bool).triu(1)))
        assert max_diff(seen["cross"], x) <= TOL
        x = x + block.cross(x, memory, memory_mask[:, None, None, :])
        assert max_diff(seen["mlp"], x) <= TOL
    names = {n for n, _ in ours.named_modules()}
    assert {"encoder.blocks.2.attn.q", "encoder.blocks.2.attn.ln", "decoder.blocks.1.cross.v",
            "decoder.blocks.1.cross.ln", "encoder.blocks.0.mlp.fc2", "encoder.ln_f", "decoder.rel_bias"} <= names


def test_t5_peft_targets_match_by_suffix(t5):
    """LoRA on q and v of all 3 + 2 self- and 2 cross-attentions, VL-PET around the encoder sub-layers
    (width d_model although the heads are 24 wide), parallel adapters on cross.v: all by name."""
    import copy
    _, ours, _, _, _ = t5
    lora, vlpet = copy.deepcopy(ours), copy.deepcopy(ours)
    rp.add_lora(lora, ["attn.q", "attn.v", "cross.q", "cross.v"], 4, 4, "none")
    assert sum(isinstance(m, rp.LoRA) for m in lora.modules()) == 2 * (3 + 2 + 2)
    rp.add_vlpet(vlpet.encoder, ["attn", "mlp"], "large", 4, "none", gate_r=4)
    rp.add_parallel_adapters(vlpet.decoder, ["cross.v"], 4, "none")
    assert sum(isinstance(m, rp.VLPET) for m in vlpet.modules()) == 6
    ids, mask = padded_batch([6, 4], 6)
    dec = decoder_inputs(2, 3)
    with torch.no_grad():
        assert max_diff(lora(ids, mask, dec), ours(ids, mask, dec)) == 0.0  # B = 0: unchanged
        assert vlpet(ids, mask, dec).shape == (2, 3, V)


# ---- counts of the real configurations (meta device: no weights) ----------------------------------


def count(model):
    return sum(p.numel() for p in model.parameters())  # a tied tensor once


def test_t5_real_counts():
    with torch.device("meta"):
        ours = {name: models.build_model(models.PRESETS[name]) for name in ("t5-small", "t5-base", "t5-large",
                                                                            "t5-v1_1-base")}
        theirs = {"t5-small": hf.T5ForConditionalGeneration(hf.T5Config()),  # T5Config's defaults: t5-small
                  "t5-large": hf.T5ForConditionalGeneration(hf.T5Config(d_model=1024, d_ff=4096, num_layers=24,
                                                                        num_heads=16)),
                  "t5-v1_1-base": hf.T5ForConditionalGeneration(hf.T5Config(
                      d_model=768, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False))}
    assert count(ours["t5-base"]) == 222_903_552  # VL-T5's orig_param_size (T5_NOTES 1.2)
    assert count(ours["t5-small"]) == count(theirs["t5-small"])
    assert count(ours["t5-large"]) == count(theirs["t5-large"])
    # transformers 5 ties v1.1's head at build time; the checkpoint (and ours) has its own 32128 x 768
    assert count(ours["t5-v1_1-base"]) == count(theirs["t5-v1_1-base"]) + 32128 * 768


def test_t5_base_config_from_its_config_json():
    """The t5-base config.json of an old official revision (T5_NOTES 1.1; model_type added, as
    today's files have it): every missing field takes T5Config's default, which is our preset."""
    old = {"model_type": "t5", "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12,
           "relative_attention_num_buckets": 32, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
           "initializer_factor": 1.0, "n_positions": 512, "vocab_size": 32128}
    c = models.t5_config(old)
    assert c == models.PRESETS["t5-base"] and c.decoder_layers == 12 and c.head_dim == 64


# ---- bad input: one "error:" line, exit status 2 --------------------------------------------------


def cli_error(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        models.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("family, edit, config_edit, message", [
    ("v1.0", lambda sd: sd.pop("decoder.block.1.layer.1.EncDecAttention.v.weight"), None,
     "missing 1 key.*decoder.block.1.layer.1.EncDecAttention.v.weight"),
    ("v1.0", lambda sd: sd.pop("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), None,
     "missing 1 key.*encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("v1.0", lambda sd: sd.__setitem__("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
                                       torch.zeros(8, 4)),
     None, "unexpected key: encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("v1.0", lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(V, D)), None,
     "lm_head.weight that differs from shared"),
    ("v1.0", lambda sd: sd.__setitem__("decoder.embed_tokens.weight", torch.zeros(V, D)), None,
     "decoder.embed_tokens.weight that differs from shared"),
    ("v1.1", lambda sd: sd.pop("lm_head.weight"), None, "missing 1 key.*lm_head.weight"),
    ("v1.1", None, lambda cfg: cfg.__setitem__("feed_forward_proj", "gated-silu"), "feed_forward_proj='gated-silu'"),
    ("v1.0", None, lambda cfg: cfg.__setitem__("num_decoder_layers", 3),
     "missing 13 key.*decoder.block.2.layer.0.SelfAttention"),
])
def test_t5_bad_checkpoints(tmp_path, capsys, family, edit, config_edit, message):
    ref = tiny_t5(family, seed=6)
    sd, cfg = dict(ref.state_dict()), hub_config(ref)
    if edit:
        edit(sd)
    if config_edit:
        config_edit(cfg)
    write_folder(tmp_path / "src", cfg, sd, "bin")
    err = cli_error(capsys, "--src", tmp_path / "src", "--out", tmp_path / "o.pt")
    assert re.search(message, err), err
    assert not (tmp_path / "o.pt").exists()


def test_t5_folder_without_spiece(tmp_path, capsys):
    ref = tiny_t5("v1.0", seed=6)
    write_folder(tmp_path / "src", hub_config(ref), dict(ref.state_dict()), "bin")
    os.remove(tmp_path / "src" / "spiece.model")
    assert "no spiece.model" in cli_error(capsys, "--src", tmp_path / "src", "--out", tmp_path / "o.pt")
    (tmp_path / "src" / "spiece.model").write_bytes(b"")
    assert "spiece.model: an empty file" in cli_error(capsys, "--src", tmp_path / "src", "--out", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()
