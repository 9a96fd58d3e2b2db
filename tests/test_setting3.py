"""What the CLIP-BART setting computes, one behaviour at a time, on stub models and hand-made batches.

    python -m pytest -q tests/test_setting3.py

The end-to-end tests (test_multitask.py) show that the pipeline runs; these show that it is right: which
token NLVR2 scores, how each loss is weighted, where every method's modules sit, that routing reaches the
decoder, what x_R is, which rows the visual embedding adds, how new modules are initialised. Numbers are
worked by hand (plain Python) wherever the module under test could otherwise grade itself.
"""
import contextlib
import dataclasses
import math
import re

import pytest
import torch

import data
import models
import routing_peft as rp
import tasks
import train

# A tokenizer in which "true", "false", "yes", "no", "red" are single tokens (byte-level BPE, no leading space).
WORDS = ("true", "false", "yes", "no", "red")
SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


def tiny_tokenizer():
    vocab, merges = dict(SPECIALS), []
    for word in WORDS:
        for i in range(1, len(word) + 1):
            vocab.setdefault(word[:i], len(vocab))
            if i > 1:
                merges.append(f"{word[:i - 1]} {word[i - 1]}")
    return data.BPETokenizer(vocab, list(dict.fromkeys(merges)))


TOK = tiny_tokenizer()
BART = models.Config("bart", 16, 2, 2, 32, 1e-5, vocab_size=len(TOK.vocab), max_positions=40, pad_id=1)


class Features:
    """A data.Features stand-in: the CPU, and the batch's own "visual" tensor as its visual tokens."""

    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def __call__(self, batch):
        return batch["visual"], None


def bare_task(cls, **attrs):
    """A task object without data: what its methods read is set by hand."""
    task = object.__new__(cls)
    task.cfg, task.tokenizer, task.features, task.text_config = train.Config(task="multitask"), TOK, Features(), BART
    for k, v in attrs.items():
        setattr(task, k, v)
    return task


def log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - z for v in row]


# ---- NLVR2: which tokens, which decoder position, which comparison --------------------------------------


def test_nlvr2_compares_true_and_false_at_the_position_after_the_start_tokens():
    """VL-PET src/nlvr_model.py: decoder input [</s>, <s>], logits at position 1, "true" wins iff its logit is
    larger than "false"'s. Position 0 holds the opposite answer, so reading the wrong position fails."""
    true_id, false_id = TOK.encode("true")[0], TOK.encode("false")[0]
    margins = [2.0, -1.0, 0.5, -3.0]  # logit(true) - logit(false) at position 1, per example
    seen = {}

    def model(ids, mask, visual, decoder_input_ids, n_images):
        seen["decoder"], seen["n_images"] = decoder_input_ids.tolist(), n_images
        logits = torch.zeros(len(ids), decoder_input_ids.shape[1], len(TOK.vocab))
        for b, m in enumerate(margins):
            logits[b, 1, true_id], logits[b, 1, false_id] = m, 0.0
            logits[b, 0, true_id], logits[b, 0, false_id] = -m, 0.0
        return logits

    split = {"identifier": [f"test1-{i}-0-0" for i in range(4)], "label": torch.tensor([1, 0, 0, 0]),
             "sentence": ["s"] * 4}
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "visual": torch.zeros(4, 2, 8)}
    task = bare_task(tasks.NLVR2, splits={"test": split}, ordered_batches=lambda s: [batch])
    m, results = task.predict(model, "test")
    assert seen == {"decoder": [[2, 0]] * 4, "n_images": 2}
    assert [r["prediction"] for r in results] == ["True", "False", "True", "False"]
    assert m["accuracy"] == 0.75  # labels True, False, False, False


# ---- the generative losses, by hand ----------------------------------------------------------------------


def fixed_logits(B, T, V, seed=0):
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed))


def test_gqa_loss_is_the_batch_sum_of_each_examples_token_mean():
    """VL-PET src/gqa_model.py: per example the mean cross-entropy over its target tokens (padding -100 not
    counted), then summed over the batch and divided by the number of examples (returned as (sum, count))."""
    V = len(TOK.vocab)
    logits = fixed_logits(2, 4, V)
    labels = torch.tensor([[5, 6, 2, -100], [7, 2, -100, -100]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "visual": torch.zeros(2, 2, 8), "decoder_input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    task = bare_task(tasks.GQA)
    total, count = task.loss(lambda *a: logits, batch, 0)
    expected = 0.0
    for b in range(2):
        tokens = [t for t in range(4) if labels[b, t] != -100]
        expected += sum(-log_softmax(logits[b, t].tolist())[labels[b, t]] for t in tokens) / len(tokens)
    assert count == 2 and total.item() == pytest.approx(expected, rel=1e-6)


def test_vqa_loss_weights_each_example_by_its_target_score():
    """VL-PET src/vqa_model.py: the sampled answer's token-mean cross-entropy times its soft score. Each question
    here has one answer of non-zero score, so the draw is forced and the loss is known."""
    V = len(TOK.vocab)
    vocab = ["yes", "no", "red"]
    scores = torch.tensor([[0.0, 0.6, 0.0], [0.0, 0.0, 0.3]])
    logits = fixed_logits(2, 3, V, seed=1)
    task = bare_task(tasks.GenerativeVQA, vocab=vocab)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "visual": torch.zeros(2, 2, 8), "targets": scores, "index": torch.tensor([0, 1])}
    total, count = task.loss(lambda ids, mask, visual, dec, n: logits[:, :dec.shape[1]], batch, 0)
    expected = 0.0
    for b, (answer, score) in enumerate((("no", 0.6), ("red", 0.3))):
        target = [0, TOK.encode(answer)[0], 2]  # <s> answer </s>
        expected += score * sum(-log_softmax(logits[b, t].tolist())[target[t]] for t in range(3)) / 3
    assert count == 2 and total.item() == pytest.approx(expected, rel=1e-6)


def test_vqa_targets_are_drawn_in_proportion_to_the_scores_per_example():
    """The training answer of a question: drawn with probability score / total from (seed, step, its index), never
    an answer of score 0; the same draw whichever batch (process, micro-batch) holds the question."""
    task = bare_task(tasks.GenerativeVQA, vocab=["yes", "no", "red"])
    n = 4000
    scores = torch.tensor([[0.3, 0.0, 0.9]]).expand(n, 3)
    index = torch.arange(n)
    decoder_input_ids, _, weight = task.targets({"targets": scores, "index": index}, 7)
    picked = decoder_input_ids[:, 2].tolist()  # </s> <s> answer ...: the answer's one token
    yes, no, red = (TOK.encode(w)[0] for w in ("yes", "no", "red"))
    assert no not in picked and set(picked) == {yes, red}
    share = picked.count(yes) / n
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), share
    assert torch.equal(weight, torch.tensor([0.3 if p == yes else 0.9 for p in picked]))
    half = task.targets({"targets": scores[1::2], "index": index[1::2]}, 7)[0]
    assert torch.equal(half, decoder_input_ids[1::2])  # the odd questions alone draw the same answers
    assert task.targets({"targets": scores, "index": index}, 8)[0][:, 2].tolist() != picked  # a new step, new draws


def test_caption_loss_is_a_token_mean_over_the_batch():
    """VL-PET src/caption_model.py (reduce_loss): every target token of the batch counts once, padding never."""
    V = len(TOK.vocab)
    logits = fixed_logits(2, 4, V, seed=2)
    labels = torch.tensor([[5, 6, 7, 2], [8, 2, -100, -100]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "visual": torch.zeros(2, 2, 8), "decoder_input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    task = bare_task(tasks.GenerativeCaptioning)
    total, count = task.loss(lambda *a: logits, batch, 0)
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t] != -100]
    expected = sum(-log_softmax(logits[b, t].tolist())[labels[b, t]] for b, t in pairs)
    assert count == 6 and total.item() == pytest.approx(expected, rel=1e-6)


# ---- where every method's modules sit ----------------------------------------------------------------------


def vl_model(peft, route="mul", rank=4, all_tokens=False, train_ln=True):
    """Our tiny BART with cfg.peft placed as its release places it, inside VLSeq2Seq; (model, trainable extras)."""
    lora = peft in ("lora", "xattn")
    cfg = train.Config(task="multitask", peft=peft, route=route, rank=16 if peft == "xattn" else rank,
                       alpha=32 if lora else 16, dropout=0.0, visual="patches" if all_tokens else "mean", train_ln=train_ln)
    torch.manual_seed(0)
    bart = models.build_model(BART)
    extra = tasks.add_peft_vl(cfg, bart)
    model = tasks.VLSeq2Seq(bart, 8, True, all_tokens, len(TOK.vocab) + 200)
    return rp.mark_trainable(model, ["visual"] + extra).eval()


def peft_layers(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, rp._PeftLayer)}


def blocks(stack, names, kind):
    return {f"backbone.{stack}.blocks.{i}.{n}": kind for i in range(2) for n in names}


def test_every_method_sits_where_its_release_puts_it():
    vlpet = {**blocks("encoder", ("attn", "mlp"), "VLPET"), **blocks("decoder", ("cross.v",), "ParallelAdapter")}
    expected = {
        "lora": {**blocks("encoder", ("attn.q", "attn.v"), "LoRA"),
                 **blocks("decoder", ("attn.q", "attn.v", "cross.q", "cross.v"), "LoRA")},
        "xattn": {**blocks("encoder", ("attn.q", "attn.v"), "CrossAttentionLoRA"),
                  **blocks("decoder", ("attn.q", "attn.v", "cross.q", "cross.v"), "CrossAttentionLoRA")},
        "bitfit": {}, "full": {},
        "adapter": {**blocks("encoder", ("attn.o", "mlp.fc2"), "Adapter"),
                    **blocks("decoder", ("attn.o", "cross.o", "mlp.fc2"), "Adapter")},
        "vlpet-large": vlpet, "vlpet-small": vlpet, "vlpet-middlex": vlpet, "vlpet-middley": vlpet}
    gates = {"vlpet-large": rp.LargeGate, "vlpet-small": rp.SmallGate, "vlpet-middlex": rp.MiddleXGate,
             "vlpet-middley": rp.MiddleYGate}
    for peft, layers in expected.items():
        model = vl_model(peft)
        assert peft_layers(model) == layers, peft
        if peft in gates:
            assert all(isinstance(m.gate, gates[peft]) for m in model.modules() if isinstance(m, rp.VLPET)), peft


def trained_kinds(model):
    """The trainable parameters other than the PEFT weights, by module path without the block index."""
    peft = tuple(f"{n}.{c}." for n, m in model.named_modules() if isinstance(m, rp._PeftLayer) for c in m.trained)
    names = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(peft)]
    return {re.sub(r"\.blocks\.\d+\.", ".blocks.", n) for n in names}


def test_every_method_trains_what_its_release_trains():
    """VL-PET src/trainer_base.py unfreeze_parameters: LoRA every bias and the decoder's final_layer_norm ("decoder."
    and "final_layer_norm" in the name); VL-Adapter every LayerNorm; VL-PET the encoder's LayerNorms; BitFit
    (--unfreeze_bias) every bias; full fine-tuning (--unfreeze_language_model) everything; the visual embedding
    always. xattn (ours) trains as LoRA."""
    visual = {"visual.feat.0.weight", "visual.feat.0.bias", "visual.feat.1.weight", "visual.feat.1.bias",
              "visual.box.0.weight", "visual.box.0.bias", "visual.box.1.weight", "visual.box.1.bias",
              "visual.image_order.weight"}
    enc_ln = {f"backbone.encoder.{n}.{w}" for n in ("ln_emb", "blocks.ln1", "blocks.ln2") for w in ("weight", "bias")}
    dec_ln = {f"backbone.decoder.{n}.{w}" for n in ("ln_emb", "blocks.ln1", "blocks.ln_cross", "blocks.ln2")
              for w in ("weight", "bias")}
    full = vl_model("full")
    every = {re.sub(r"\.blocks\.\d+\.", ".blocks.", n) for n, _ in full.named_parameters()}
    biases = {n for n in every if n.startswith("backbone.") and n.endswith("bias")}
    lora, wrapped = vl_model("lora"), {n for n in biases if re.search(r"\.(attn|cross)\.[qv]\.bias$", n)}
    in_lora = {n.replace(".bias", ".base.bias") for n in wrapped}  # the wrapped q, v
    assert trained_kinds(lora) == visual | (biases - wrapped) | in_lora | {"backbone.decoder.blocks.ln2.weight"}
    assert trained_kinds(vl_model("xattn")) == trained_kinds(lora)
    assert {f"backbone.{s}.blocks.{m}.bias" for s in ("encoder", "decoder") for m in ("attn.k", "attn.o", "mlp.fc1")} <= biases
    assert trained_kinds(vl_model("bitfit")) == visual | biases
    assert trained_kinds(full) == every and "backbone.wte.weight" in every
    assert trained_kinds(vl_model("adapter")) == visual | enc_ln | dec_ln
    assert trained_kinds(vl_model("vlpet-large")) == visual | enc_ln
    for peft in ("lora", "adapter", "vlpet-large"):  # --no-train-ln: no LayerNorm weight of BART's
        assert not {n for n in trained_kinds(vl_model(peft, train_ln=False)) if ".ln" in n and n.endswith("weight")}, peft


def test_bitfit_refuses_a_backbone_without_biases():
    """T5 has no bias anywhere; LST's BitFit adds them first, which we do not: --peft bitfit says so, in every setting."""
    cfg = train.Config(task="multitask", peft="bitfit", route="none")
    bart = models.build_model(BART)
    for m in bart.modules():
        if getattr(m, "bias", None) is not None:
            m.bias = None
    for add in (tasks.add_peft, tasks.add_peft_vl):
        with pytest.raises(ValueError, match="--peft bitfit trains the backbone's biases; bart has none"):
            add(cfg, bart)


# ---- routing in setting 3: x_R, and the decoder -----------------------------------------------------------


def inputs(B=2, n_images=1, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(TOK.vocab), (B, 5), generator=g)
    return ids, torch.ones(B, 5, dtype=torch.long), torch.rand(B, n_images * L, 8, generator=g)


@pytest.mark.parametrize("n_images", [1, 2])
def test_x_R_is_the_mean_of_the_embedded_visual_tokens(n_images):
    """Our design (the routing paper did not release setting 3): x_R = the mean of the visual tokens after the
    visual embedding, over both images of a pair; every routed layer of the encoder sees exactly it."""
    model = vl_model("vlpet-large")
    ids, mask, visual = inputs(n_images=n_images)
    embedded = model.visual(visual, n_images, model.backbone.wte.weight)  # (B, n_images * L, d)
    seen = []
    layer = model.backbone.encoder.blocks[1].mlp
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(m.x_R.clone()))
    with torch.no_grad():
        _, _, x_R = model.encode(ids, mask, visual, n_images)
    hook.remove()
    mean = embedded.mean(1, keepdim=True)
    assert torch.allclose(x_R, mean) and torch.allclose(seen[0], mean) and seen[0].shape == (2, 1, 16)


@pytest.mark.parametrize("peft", ["vlpet-large", "lora", "adapter"])
def test_routing_reaches_the_decoder(peft):
    """With the encoder output held fixed, the decoder's logits change with x_R (route mul), and do not with
    route none: the decoder's routed modules (VL-PET: the cross-attention value adapters) read x_R."""
    logits = {}
    for route in ("mul", "none"):
        model = vl_model(peft, route)
        with torch.no_grad():
            for m in model.modules():  # LoRA's B starts at zero: give every PEFT weight a value
                if isinstance(m, rp._PeftLayer):
                    for p in m.parameters():
                        if p.requires_grad:
                            p.normal_(0, 0.3)
        ids, mask, visual = inputs()
        with torch.no_grad():
            memory, memory_mask, _ = model.encode(ids, mask, visual, 1)
            dec = torch.tensor([[2, 0, 5], [2, 0, 6]])
            out = []
            for x_R in (torch.randn(2, 1, 16), torch.randn(2, 1, 16)):
                with rp.visual_context(model.backbone, x_R):
                    out.append(model.backbone.decode(dec, memory, memory_mask))
        logits[route] = out
    assert not torch.allclose(*logits["mul"], atol=1e-4)
    assert torch.equal(*logits["none"])


@pytest.mark.parametrize("n_images", [1, 2])
def test_xattn_reads_every_embedded_visual_token_or_their_mean(n_images):
    """--peft xattn (LoRA with cross-attention): with --visual patches each module, here the decoder's self-attention
    value, attends over all embedded visual tokens (4 an image here; 36 at full size, 72 an NLVR2 pair) and its update
    differs from one text position to the next; with the mean (one token) the softmax is 1 and the update is the
    same image-only vector at every position."""
    ids, mask, visual = inputs(n_images=n_images)
    for all_tokens in (True, False):
        model = vl_model("xattn", all_tokens=all_tokens)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)  # B starts at zero
        layer, seen = model.backbone.decoder.blocks[0].attn.v, []
        hook = layer.register_forward_hook(lambda m, args, out: seen.append((m.x_R.clone(), out - m.base(args[0]))))
        with torch.no_grad():
            model(ids, mask, visual, torch.tensor([[2, 0, 5], [2, 0, 6]]), n_images)
            embedded = model.visual(visual, n_images, model.backbone.wte.weight)  # (B, n_images * 4, d)
        hook.remove()
        x_R, update = seen[0]
        assert torch.allclose(x_R, embedded if all_tokens else embedded.mean(1, keepdim=True))
        assert x_R.shape == (2, 4 * n_images if all_tokens else 1, 16)
        spread = (update - update[:, :1]).abs().max() / update.abs().max()  # each position's update against the first's
        assert spread > 1e-3 if all_tokens else spread < 1e-5


def test_visual_embedding_gives_each_token_its_object_and_image_rows():
    """VL-T5 src/modeling_bart.py VisualEmbedding: token k of image j gets the frozen token-table row V - 1 - k
    (the <vis_extra_id_k> embedding) and image-order row j. With the feature and box terms at zero, the output
    is exactly those two rows."""
    emb = tasks.VisualEmbedding(3, dataclasses.replace(BART, d_model=4))
    with torch.no_grad():
        for lin in (emb.feat[0], emb.box[0]):
            lin.weight.zero_()
            lin.bias.zero_()
        emb.image_order.weight.copy_(torch.tensor([[100.0] * 4, [200.0] * 4]))
    table = torch.arange(10.0)[:, None].expand(10, 4)  # row i = (i, i, i, i)
    out = emb(torch.rand(2, 6, 3), 2, table)  # 2 images of 3 tokens
    expected = [[100 + 9 - k] * 4 for k in range(3)] + [[200 + 9 - k] * 4 for k in range(3)]
    assert out.tolist() == [expected, expected]


# ---- initialisation as the releases do it -----------------------------------------------------------------


def near(t, std):
    return abs(t.float().std().item() - std) < 0.05 * std and abs(t.float().mean().item()) < 0.1 * std


def test_new_modules_start_as_in_the_release():
    """VL-PET's BART runs (research: the last init_weights of VLBart's constructor): every new Linear N(0, 0.02)
    with zero bias, the image-order Embedding N(0, 0.02), the visual LayerNorms 1 / 0; VL-Adapter's adapters the
    same (no zero up-projection); LoRA keeps A Kaiming-uniform and B = 0 (its A, B are bare Parameters there)."""
    emb = tasks.VisualEmbedding(2048, models.PRESETS["bart-base"])
    for lin in (emb.feat[0], emb.box[0]):
        assert near(lin.weight, 0.02) and not lin.bias.any()
    for ln in (emb.feat[1], emb.box[1]):
        assert (ln.weight == 1).all() and not ln.bias.any()
    assert near(emb.image_order.weight, 0.02)
    cfg = train.Config(task="multitask", peft="adapter", route="mul", rank=96, visual="mean")
    bart = models.build_model(dataclasses.replace(models.PRESETS["bart-base"], n_layers=1, vocab_size=16))
    tasks.add_peft_vl(cfg, bart)
    adapters = [m for m in bart.modules() if isinstance(m, rp.Adapter)]
    assert len(adapters) == 5
    for a in adapters:
        assert near(a.down.weight, 0.02) and near(a.up.weight, 0.02) and not a.down.bias.any() and not a.up.bias.any()


def test_multitask_presets_run_the_releases_methods():
    """--preset multitask-* is VL-PET's (or VL-Adapter's, LoRA's) recipe exactly: route none, fp32; routing is the
    explicit --route mul."""
    for name in ("multitask-vlpet-large", "multitask-vlpet-small", "multitask-adapter", "multitask-lora"):
        cfg = train.parse_command_line(["--preset", name])[0]
        assert (cfg.route, cfg.precision) == ("none", "fp32"), name
        assert train.parse_command_line(["--preset", name, "--route", "mul"])[0].route == "mul"
    for name in ("multitask-full", "multitask-bitfit"):  # no routing function: a route is refused, not ignored
        cfg = train.parse_command_line(["--preset", name, "--route", "mul"])[0]
        with pytest.raises(ValueError, match=f"--peft {name[10:]} has no routing function"):
            train.check_config(cfg)

    for name in ("multitask-t5-vlpet-large", "multitask-t5-vlpet-middley", "multitask-t5-adapter", "multitask-t5-lora"):
        cfg = train.parse_command_line(["--preset", name])[0]
        assert (cfg.route, cfg.precision, cfg.text, cfg.batch_size, cfg.lr) == ("none", "fp32", "ckpt/t5-base.pt", 300, 3e-4)


# ---- CLIP-T5: where the T5 releases differ from their BART path (T5_NOTES Q3, Q4) ------------------------------

T5 = models.Config("t5", 64, 2, 2, 32, 1e-6, vocab_size=24, pad_id=0, dropout=0.0, decoder_start_id=0, d_kv=8)


class T5Tokenizer:
    """What the tasks read of a T5 tokenizer: no BOS, wrap appends </s> (1); "false" and "true" are one piece each."""

    bos_id, eos_id, pad_id = None, 1, 0

    def encode(self, text):
        return {"false": [7], "true": [9]}[text]

    def wrap(self, ids):
        return list(ids) + [1]


def test_t5_nlvr2_compares_true_and_false_at_decoder_position_0():
    """VL-PET src/nlvr_model.py on T5: the decoder reads [<pad>] alone and "true" wins iff its logit at position 0
    beats "false"'s (BART: [</s>, <s>], position 1)."""
    margins = [2.0, -1.0, 0.5, -3.0]
    seen = {}

    def model(ids, mask, visual, decoder_input_ids, n_images):
        seen["decoder"] = decoder_input_ids.tolist()
        logits = torch.zeros(len(ids), decoder_input_ids.shape[1], 24)
        for b, m in enumerate(margins):
            logits[b, 0, 9] = m  # "true"; "false" (7) stays at 0
        return logits

    split = {"identifier": [f"test1-{i}-0-0" for i in range(4)], "label": torch.tensor([1, 0, 0, 0]),
             "sentence": ["s"] * 4}
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "visual": torch.zeros(4, 2, 8)}
    task = bare_task(tasks.NLVR2, tokenizer=T5Tokenizer(), text_config=T5, splits={"test": split},
                     ordered_batches=lambda s: [batch])
    m, results = task.predict(model, "test")
    assert seen["decoder"] == [[0]] * 4
    assert [r["prediction"] for r in results] == ["True", "False", "True", "False"] and m["accuracy"] == 0.75


def t5_vl_model(peft, route="mul", rank=8, rank_dec=0, config=T5):
    """A T5 with cfg.peft placed as the T5 releases place it, inside VLSeq2Seq (visual width 8), trainable as they train."""
    lora = peft == "lora"
    cfg = train.Config(task="multitask", peft=peft, route=route, rank=rank, rank_dec=rank_dec, alpha=32 if lora else 16,
                       dropout=0.0, visual="mean")
    t5 = models.build_model(config)
    extra = tasks.add_peft_vl(cfg, t5)
    model = tasks.VLSeq2Seq(t5, 8, True, False, config.vocab_size + 72)
    return rp.mark_trainable(model, ["visual"] + extra).eval()


def test_t5_methods_sit_where_bart_has_them_and_train_what_the_t5_releases_train():
    """LoRA (LST lora.sh): q, v of every attention, the biases (T5 has none: the visual embedding's); VL-Adapter (LST
    adapter.sh): after every attention and FFN, no norm (its isinstance test never matches T5's); VL-PET: gated modules
    around the encoder's sub-layers and value adapters in the decoder, the encoder's norms (by name) trained."""
    visual = {"visual.feat.0.weight", "visual.feat.0.bias", "visual.feat.1.weight", "visual.box.0.weight",
              "visual.box.0.bias", "visual.box.1.weight", "visual.image_order.weight"}  # RMS norms: no bias
    enc_norms = {"backbone.encoder.blocks.attn.module.ln.weight", "backbone.encoder.blocks.mlp.module.ln.weight",
                 "backbone.encoder.ln_f.weight"}
    expected = {"lora": ({**blocks("encoder", ("attn.q", "attn.v"), "LoRA"),
                          **blocks("decoder", ("attn.q", "attn.v", "cross.q", "cross.v"), "LoRA")}, visual),
                "adapter": ({**blocks("encoder", ("attn.o", "mlp.fc2"), "Adapter"),
                             **blocks("decoder", ("attn.o", "cross.o", "mlp.fc2"), "Adapter")}, visual),
                "vlpet-small": ({**blocks("encoder", ("attn", "mlp"), "VLPET"),
                                 **blocks("decoder", ("cross.v",), "ParallelAdapter")}, visual | enc_norms)}
    for peft, (layers, trained) in expected.items():
        model = t5_vl_model(peft)
        assert peft_layers(model) == layers, peft
        assert trained_kinds(model) == trained, peft
    for a in [m for m in t5_vl_model("adapter", rank=32).modules() if isinstance(m, rp.Adapter)]:
        assert near(a.up.weight, 32 ** -0.5 / math.sqrt(3))  # nn.Linear's init: no zero W_up in LST's adapters


@pytest.mark.parametrize("peft, gate", [("vlpet-large", 0.5), ("vlpet-middlex", 0.5), ("vlpet-small", 0.5),
                                        ("vlpet-middley", 1.0)])
def test_t5_vlpet_starts_at_zero_up_projections_scaled_by_0_3(peft, gate):
    """VL-PET's T5 scripts (--use_*_zero_init, --encoder_gating_scaling_factor 0.3): W_up and the gate's last layer
    start at zero, so every encoder module returns 0.3 * G * H, G = sigmoid(0) = 0.5 (middleY: 1 + 0); the decoder's
    value adapters (r = rank_dec) add nothing; the down-projections keep nn.Linear's init (uniform, bound d^-0.5)."""
    torch.manual_seed(0)
    model = t5_vl_model(peft, rank=32, rank_dec=4)
    t5 = model.backbone
    x, bias = torch.randn(2, 5, 64), torch.zeros(1, 2, 5, 5)
    with torch.no_grad(), rp.visual_context(t5, torch.randn(2, 1, 64)):
        for block in t5.encoder.blocks:
            assert (block.attn(x, bias) - 0.3 * gate * block.attn.module(x, bias)).abs().max() < 1e-6
            assert (block.mlp(x) - 0.3 * gate * block.mlp.module(x)).abs().max() < 1e-6
            assert near(block.mlp.down.weight, 64 ** -0.5 / math.sqrt(3)) and block.mlp.down.bias.abs().max() > 0
        for block in t5.decoder.blocks:
            assert block.cross.v.down.out_features == 4 and torch.equal(block.cross.v(x), block.cross.v.base(x))
    if peft == "vlpet-large":
        assert near(t5.encoder.blocks[0].attn.gate.down.weight, 64 ** -0.5 / math.sqrt(3))


def test_t5_visual_embedding_has_rms_norms_and_pytorch_init():
    """VL-T5 src/modeling_t5.py VisualEmbedding: T5LayerNorm (weight only, no mean subtracted) after both Linears, and
    nothing re-initialised: nn.Linear's uniform init, the image-order rows N(0, 1), as the 72 new token rows."""
    emb = tasks.VisualEmbedding(4, dataclasses.replace(T5, d_model=4))
    with torch.no_grad():
        emb.feat[0].weight.copy_(torch.eye(4))
        for p in (emb.feat[0].bias, emb.box[0].weight, emb.box[0].bias, emb.image_order.weight):
            p.zero_()
    out = emb(torch.tensor([[[1.0, 2.0, 3.0, 6.0]]]), 1, torch.zeros(10, 4))
    rms = math.sqrt((1 + 4 + 9 + 36) / 4 + 1e-6)  # a LayerNorm would subtract the mean 3 first
    assert out[0, 0].tolist() == pytest.approx([1 / rms, 2 / rms, 3 / rms, 6 / rms], rel=1e-6)
    big = tasks.VisualEmbedding(2048, models.PRESETS["t5-base"])
    assert near(big.feat[0].weight, 2048 ** -0.5 / math.sqrt(3)) and near(big.image_order.weight, 1.0)
    assert not any(n.endswith("bias") for n, _ in big.feat[1].named_parameters())
    torch.manual_seed(0)
    assert near(t5_vl_model("lora").backbone.wte.weight[T5.vocab_size:], 1.0)


T5_COUNTS = {  # preset: (trainable, total, the paper's %); T5_NOTES 5.2
    "multitask-t5-vlpet-large": (17_582_208, 240_521_856, 7.31), "multitask-t5-vlpet-small": (10_518_168, 233_457_816, 4.51),
    "multitask-t5-vlpet-middlex": (10_499_736, 233_439_384, 4.50),
    "multitask-t5-vlpet-middley": (10_499_712, 233_439_360, 4.50),
    "multitask-t5-adapter": (19_333_632, 242_292_480, 7.98), "multitask-t5-lora": (18_170_112, 241_128_960, 7.54)}


def test_t5_parameter_counts_reproduce_vl_pet():
    """On t5-base resized to VL-T5's 32,200 rows with the visual embedding for RN101 grids (meta device, no weights):
    224,540,160 parameters, and each T5 preset's trainable count and the percentage VL-PET reports (Table 2)."""
    with torch.device("meta"):
        base = tasks.VLSeq2Seq(models.build_model(models.PRESETS["t5-base"]), 2048, True, False, 32_200)
    assert sum(p.numel() for p in base.parameters()) == 224_540_160
    for preset, (trainable, total, percent) in T5_COUNTS.items():
        cfg = train.parse_command_line(["--preset", preset])[0]
        with torch.device("meta"):
            t5 = models.build_model(models.PRESETS["t5-base"])
            extra = tasks.add_peft_vl(cfg, t5)
            model = rp.mark_trainable(tasks.VLSeq2Seq(t5, 2048, True, False, 32_200), ["visual"] + extra)
        counts = rp.count_parameters(model)
        assert counts == (trainable, total) and round(100 * trainable / total, 2) == percent, preset


# ---- decoding as the releases decode ---------------------------------------------------------------------


def test_answers_and_captions_decode_as_vlpets_release(monkeypatch):
    """VL-PET's release (transformers 4.2.1 on bart-base, whose config sets no_repeat_ngram_size 3 and
    early_stopping): answers greedy with max_length 20 (19 new tokens; the n-gram blocking applies to greedy
    search too); captions beam 5 with max_length 40 (the preset's 39 new tokens), early stopping, EOS forced
    at the last step (4.2.1's BART beam search), the 4.2.1 length rules. A stub beam_search records the calls."""
    calls = []

    def fake_search(step, B, beams, **kw):
        calls.append(dict(kw, beams=beams))
        return [[TOK.encode("yes")[0]]] * B
    monkeypatch.setattr(models, "beam_search", fake_search)
    config = dataclasses.replace(BART, no_repeat_ngram=3, early_stopping=True)
    model = vl_model("vlpet-large")
    ids, mask, visual = inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "visual": visual, "image": ["a", "b"]}
    vqa = bare_task(tasks.GenerativeVQA, text_config=config, ordered_batches=lambda split: [batch])
    assert vqa.answers(model, "val") == ["yes", "yes"]
    cfg = train.parse_command_line(["--preset", "multitask-vlpet-large"])[0]
    captions = bare_task(tasks.GenerativeCaptioning, text_config=config, cfg=cfg)
    captions.__dict__["prompt_ids"] = ids[0]
    captions.generate(model, batch)
    common = dict(eos_id=TOK.eos_id, no_repeat_ngram=3, rules="4.2.1")
    assert calls == [dict(common, beams=1, max_new_tokens=19, early_stopping=True, force_eos=False),
                     dict(common, beams=5, max_new_tokens=39, early_stopping=True, force_eos=True)]
    gpt2 = bare_task(tasks.Captioning, text_config=dataclasses.replace(BART, arch="gpt2"))
    assert gpt2.search(5, 19)["rules"] == "4.29.2"  # the routing release's transformers (settings 1 and 2)
