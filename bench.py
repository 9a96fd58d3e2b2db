"""Benchmarks: speed and memory as ratios measured in one run (tests never time anything).

    python bench.py models      # our ViT-L/16, RoBERTa-large, GPT2-medium vs transformers (forward);
                                # BART-base, T5-base + LoRA vs transformers + peft (forward + backward);
                                # CLIP RN101 forward: images/s and GFLOP/s vs plain conv/matmul rates
    python bench.py routing     # routed LoRA vs plain LoRA vs peft; a VL-PET-large layer per route (fwd + bwd);
                                # LoRA with cross-attention vs LoRA none / mul, pooled and 196-patch x_R
    python bench.py beams       # beam search (beam 5, batch 8) over our GPT2-medium and BART-base vs
                                # transformers' generate: the same outputs, time ratio
    python bench.py eval        # CIDEr-D vs pycocoevalcap; VQA accuracy over 200k questions
    python bench.py train       # VQA training step: ours (cached / recomputed ViT) vs transformers + peft
    python bench.py fullsize    # what one step of each preset costs at full size here, and its full run projected
    python bench.py tokenizers  # T5's SentencePiece tokenizer (data.py) vs the sentencepiece package, 10k captions

Needs the dev requirements (transformers, peft, pycocoevalcap, sentencepiece). Runs on 2 threads unless told
otherwise.
"""
import argparse
import json
import os
import statistics
import time

import torch


def median_seconds(fn, repeat=5, warmup=1):
    """Median wall time of fn() over `repeat` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(header, rows):
    """Print a Markdown table (header: list of column names, rows: lists of cells)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")


# ---- models (issues 2, 10) --------------------------------------------------
def _hub_state_dict(ref):
    """The state dict of a transformers model under its hub key names (transformers 5 renames some
    modules internally, e.g. ViT's q_proj, and reverts the names when saving; 4.x needs nothing)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: state_dict() already has the hub names
        return ref.state_dict()
    return revert_weight_conversion(ref, ref.state_dict())


def _models_pair(name):
    """(ours, theirs, inputs for ours, kwargs for theirs) with the same random weights, batch 8."""
    import dataclasses

    import transformers as hf

    import models
    B = 8
    if name == "vit-l16":  # 224 px
        ref = hf.ViTModel(hf.ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096), add_pooling_layer=True)
        x = torch.randn(B, 3, 224, 224)
        ours_args, theirs_kwargs = (x,), {"pixel_values": x}
    elif name == "roberta-large":  # 21 tokens (VQA: prefix + <s> question </s>), right-padded batch
        ref = hf.RobertaModel(hf.RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                               num_attention_heads=16, intermediate_size=4096,
                                               max_position_embeddings=514, type_vocab_size=1,
                                               layer_norm_eps=1e-5),  # roberta-large's config.json
                              add_pooling_layer=False)
        ids = torch.randint(3, 50265, (B, 21))
        mask = (torch.arange(21) < torch.randint(8, 22, (B, 1))).long()  # (B, 21)
        ids = ids.masked_fill(mask == 0, 1)
        ours_args, theirs_kwargs = (ids, mask), {"input_ids": ids, "attention_mask": mask}
    else:  # gpt2-medium, 30 tokens (a caption)
        ref = hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=1024, n_layer=24, n_head=16))
        ids = torch.randint(0, 50257, (B, 30))
        ours_args, theirs_kwargs = (ids,), {"input_ids": ids, "use_cache": False}  # no cache on either side
    arch = models.PRESETS[name].arch
    ref.eval()
    config = dataclasses.replace(models.PRESETS[name])
    sd, _ = models.convert_state_dict(arch, _hub_state_dict(ref), config)
    ours = models.build_model(config).eval()
    ours.load_state_dict(sd, strict=True)
    return ours, ref, ours_args, theirs_kwargs


MODEL_ROUNDS = {"vit-l16": 6, "roberta-large": 15, "gpt2-medium": 15}  # ViT-L takes ~5-10 s a forward here


def _paired_rounds(fns, rounds, cpu=False):
    """Wall times of each of fns (a dict of callables) over `rounds` rounds; within a round each runs once,
    the order reversed every other round (so neither side always runs first, after the other's memory
    churn). cpu=True: (wall times, process CPU times) of the same calls; CPU time hardly changes with other
    jobs on a shared machine (with several threads it also counts their spin-waiting)."""
    wall, proc = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            proc[k].append(time.process_time() - c0)
    return (wall, proc) if cpu else wall


def _load():
    """The 1-minute load average (the machine is shared: a load above the 2 threads slows everything)."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def bench_models():
    """Our backbones against the references: bench_text_vision (ViT, RoBERTa, GPT-2 forward), bench_seq2seq
    (BART-base and T5-base + LoRA training steps), bench_clip (RN101 forward rate)."""
    bench_text_vision()
    bench_seq2seq("bart-base")
    bench_seq2seq("t5-base")
    bench_clip()


def bench_text_vision():
    """Forward time of our backbones vs transformers on the same random weights (batch 8, inference_mode),
    fp32 and bf16 autocast. Ours and theirs alternate within each round (the machine is shared, so both
    see the same load); times are medians over rounds, the ratio is the median of the per-round ratios."""
    import gc
    rows = []
    print(_load(), flush=True)
    for name in ("vit-l16", "roberta-large", "gpt2-medium"):
        ours, ref, args, kwargs = _models_pair(name)
        with torch.inference_mode():  # same numbers first, so we time the same computation
            y_ours, y_ref = ours(*args), ref(**kwargs)
            y_ours = y_ours[0] if isinstance(y_ours, tuple) else y_ours
            y_ref = y_ref[0] if name != "gpt2-medium" else y_ref.logits
            diff = (y_ours - y_ref).abs().max().item()
        for dtype in (torch.float32, torch.bfloat16):
            def run(model, *model_args, **model_kwargs):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                            enabled=dtype == torch.bfloat16):
                    model(*model_args, **model_kwargs)
            run(ours, *args), run(ref, **kwargs)  # warm-up
            times = _paired_rounds({"ours": lambda: run(ours, *args), "ref": lambda: run(ref, **kwargs)},
                                   MODEL_ROUNDS[name])
            t_ours, t_ref = times["ours"], times["ref"]
            ratio = statistics.median(o / r for o, r in zip(t_ours, t_ref))  # paired: same load in a round
            rows.append([name, str(dtype).replace("torch.", ""), statistics.median(t_ours),
                         statistics.median(t_ref), ratio, f"{diff:.1e}"])
            print(rows[-1], flush=True)
        del ours, ref
        gc.collect()
    print_table(["model (batch 8)", "dtype", "ours s", "transformers s", "ours/theirs", "max |diff| fp32"], rows)
    print(_load())


def _lora_pair(name, B=8):
    """BART-base or T5-base with the same random weights, ours and transformers', each with LoRA r = alpha =
    128 on q and v of every attention (encoder self-, decoder self- and cross-attention; ours via
    routing_peft, theirs via peft), everything else frozen, dropout 0.1 everywhere (VL-PET's recipe; T5's
    dropout_rate). Inputs like the VL settings': 56 encoder tokens (~20 text + 36 visual), right-padded rows,
    and 20 decoder tokens (BART, captions) or 10 (T5, setting 3's answers).
    Returns (ours, theirs, (ids, mask, dec, labels))."""
    import peft
    import transformers as hf

    import models
    import routing_peft as rp
    torch.manual_seed(0)
    if name == "bart-base":
        cfg = hf.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, max_position_embeddings=1024, dropout=0.1, attention_dropout=0.1,
                            activation_dropout=0.1)
        ref, config = hf.BartForConditionalGeneration(cfg), models.bart_config(cfg.to_dict())
        targets, pad, n_dec = ["q_proj", "v_proj"], 1, 20
    else:  # t5-base (T5_NOTES 1.1)
        cfg = hf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                          dropout_rate=0.1, decoder_start_token_id=0)
        ref, config = hf.T5ForConditionalGeneration(cfg), models.t5_config(cfg.to_dict())
        targets, pad, n_dec = ["q", "v"], 0, 10
    sd, _ = models.convert_state_dict(config.arch, ref.state_dict(), config)
    ours = models.build_model(config)
    ours.load_state_dict(sd, strict=True)
    rp.mark_trainable(rp.add_lora(ours, ["attn.q", "attn.v", "cross.q", "cross.v"], 128, 128, "none"))
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=128, lora_alpha=128, lora_dropout=0.0, target_modules=targets))
    V, n_enc = config.vocab_size, 56
    ids = torch.randint(3, V, (B, n_enc))
    mask = (torch.arange(n_enc) < torch.randint(n_enc // 2, n_enc + 1, (B, 1))).long()  # (B, n_enc)
    ids = ids.masked_fill(mask == 0, pad)
    dec = torch.randint(3, V, (B, n_dec))
    labels = torch.randint(3, V, (B, n_dec))
    return ours, theirs, (ids, mask, dec, labels)


def bench_seq2seq(name, rounds=7):
    """Training step (forward + backward, no optimizer) of BART-base or T5-base + LoRA: ours vs transformers +
    peft on the same weights (_lora_pair), fp32 and bf16 autocast; paired rounds, median of per-round ratios."""
    import routing_peft as rp
    import torch.nn.functional as F
    ours, theirs, (ids, mask, dec, labels) = _lora_pair(name)
    n_ours, n_theirs = rp.count_parameters(ours), rp.count_parameters(theirs)
    assert n_ours == n_theirs, (n_ours, n_theirs)  # the same trainable and total parameters
    ours.eval(), theirs.eval()
    with torch.no_grad():  # LoRA's B starts at zero: both are the base model, to the last digit or nearly
        diff = (ours(ids, mask, dec) - theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                              use_cache=False).logits).abs().max().item()
    ours.train(), theirs.train()
    params = [p for m in (ours, theirs) for p in m.parameters() if p.requires_grad]

    def loss_of(logits):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step(forward, dtype):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = loss_of(forward())
            loss.backward()
            for p in params:
                p.grad = None
        return run
    fwd = {"ours": lambda: ours(ids, mask, dec),
           "theirs": lambda: theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits}
    rows = []
    print(_load(), flush=True)
    for dtype in ("fp32", "bf16"):
        fns = {k: step(f, dtype) for k, f in fwd.items()}
        for fn in fns.values():
            fn()  # warm-up
        wall, proc = _paired_rounds(fns, rounds, cpu=True)
        ratios = [statistics.median(o / t for o, t in zip(times["ours"], times["theirs"])) for times in (wall, proc)]
        rows.append([f"{name} + LoRA q,v r=128", dtype, statistics.median(wall["ours"]),
                     statistics.median(wall["theirs"]), *ratios, f"{diff:.1e}"])
        for clock, times in [("wall", wall), ("CPU", proc)]:
            print(dtype, clock, {k: [round(t, 3) for t in v] for k, v in times.items()}, flush=True)
    print(f"forward + backward, batch {len(ids)}, {ids.shape[1]} encoder / {dec.shape[1]} decoder tokens, trainable "
          f"{n_ours[0]:,} of {n_ours[1]:,}, {torch.get_num_threads()} threads; ratios: medians of per-round ratios of "
          f"wall time, then of process CPU time; goal: ours/theirs <= 1.0")
    print_table(["model", "dtype", "ours s/step", "transformers + peft s/step", "ours/theirs wall", "ours/theirs CPU",
                 "max |diff| fp32"], rows)
    print(_load())


def bench_clip(rounds=3, B=8):
    """Our CLIP RN101 visual tower, random weights, 224 px, batch B, inference_mode: images/s in fp32 and
    bf16 autocast, the achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter: convolutions, matmuls,
    attention; 2 per multiply-add) next to what a plain 2048^3 matmul and a 3x3 conv (256 -> 256 channels,
    56 x 56, batch 8, channels_last) reach in the same run. Times: fastest of `rounds` (a shared machine
    only adds time); the model's runs and the plain kernels alternate."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import models
    model = _random_weights(lambda: models.build_model(models.PRESETS["clip-rn101"])).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1.0)  # unit statistics: activations stay finite in bf16
    x = torch.randn(B, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    flops = counter.get_total_flops()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    feat = torch.randn(8, 256, 56, 56).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3)

    def under(dtype, fn):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                fn()
        return run
    kernels = {"RN101 forward": (lambda: model(x), flops),
               "plain matmul 2048^3": (lambda: a @ b, 2 * 2048 ** 3),
               "plain conv 3x3 256->256 @56x56": (lambda: F.conv2d(feat, weight, padding=1), 2 * 8 * 256 * 256 * 9 * 56 * 56)}
    rows = []
    print(_load(), flush=True)
    for dtype in ("fp32", "bf16"):
        runs = {name: under(dtype, fn) for name, (fn, _) in kernels.items()}
        for run in runs.values():
            run()  # warm-up
        times = _paired_rounds(runs, rounds)
        rates = {name: [n / t / 1e9 for t in times[name]] for name, (_, n) in kernels.items()}  # GFLOP/s
        for name, (fn, n) in kernels.items():
            best = max(rates[name])
            per_image = B * best * 1e9 / flops if name == "RN101 forward" else "-"
            rows.append([name, dtype, per_image, best, best / max(rates["plain conv 3x3 256->256 @56x56"])])
        print(dtype, {k: [round(r, 1) for r in v] for k, v in rates.items()}, flush=True)
    print(f"RN101 visual tower, {flops / B / 1e9:.1f} GFLOP per 224 px image, batch {B}, "
          f"{torch.get_num_threads()} threads")
    print_table(["what", "dtype", "images/s", "GFLOP/s", "vs plain conv"], rows)
    print(_load())


# ---- routing (issue 3) ------------------------------------------------------
def _routing_step(layer, x, grad_out, x_R=None):
    """One forward + backward of `layer` on x (which requires grad, as inside a network)."""
    import routing_peft

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        if x_R is None:
            layer(x).backward(grad_out)
        else:
            with routing_peft.visual_context(layer, x_R):
                layer(x).backward(grad_out)
    return step


def bench_routing(rounds=5, repeat=5):
    """RoBERTa-large-sized layer (d = 1024, r = alpha = 128, N = 21, batch 32): each route vs none vs peft
    (fastest call of each); then the VL-PET table (bench_vlpet) and the cross-attention one (bench_cross_attention)."""
    import copy

    import peft
    import routing_peft

    d, r, n, batch = 1024, 128, 21, 32
    base = torch.nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(batch, n, d, requires_grad=True)
    x_R = torch.randn(batch, 1, d)
    grad_out = torch.randn(batch, n, d)

    holder = torch.nn.Module()
    holder.lin = copy.deepcopy(base)
    peft_model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    steps = {"peft": _routing_step(peft_model.base_model.model.lin, x, grad_out)}
    for route in routing_peft.ROUTES:
        layer = routing_peft.LoRA(copy.deepcopy(base), r, r, route)
        steps[route] = _routing_step(layer, x, grad_out, None if route == "none" else x_R)

    best = _interleaved_fastest(steps, rounds, repeat)
    print(f"forward + backward, x (B={batch}, N={n}, d={d}) requires grad, frozen Linear({d}, {d}), "
          f"r = alpha = {r}, x_R ({batch}, 1, {d}); {torch.get_num_threads()} threads; fastest call of each, "
          f"ratios of CPU time")
    print_table(["layer", "wall ms", "CPU ms", "vs none", "vs peft"],
                [[name, 1e3 * w, 1e3 * c, c / best["none"][1], c / best["peft"][1]]
                 for name, (w, c) in best.items()])
    print()
    bench_vlpet()
    print()
    bench_cross_attention()


def _interleaved_fastest(steps, rounds, repeat):
    """{name: (wall seconds, CPU seconds) of its fastest call} over rounds x repeat timed calls. The candidates
    alternate within each round (one untimed warm-up call, then `repeat` timed ones each); the machine is shared
    and other work only ever adds time, so the fastest call is the closest to each candidate's own cost. The
    process CPU time (time.process_time) hardly sees other jobs at all; with --threads 1 it is the cost itself
    (with more threads it also counts the threads' spin-waiting)."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            for _ in range(repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}


def bench_vlpet(rounds=5, repeat=3):
    """A VL-PET-large encoder layer at BART-base sizes (d = 768, 12 heads, FFN 3072, post-LN; VL-PET after the
    attention and the FFN sub-layers, r = gate_r = 96; N = 56 tokens = 20 text + 36 visual, batch 32),
    forward + backward: route none vs each route, vs plain Adapters (r = 96, after attn.o and mlp.fc2), vs the
    frozen layer alone."""
    import copy

    import models
    import routing_peft as rp

    d, n, batch, r = 768, 56, 32, 96
    config = models.Config("roberta", d, 1, 12, 3072, 1e-5, vocab_size=8, max_positions=8)  # dropout 0
    block = models.build_model(config).blocks[0].requires_grad_(False)  # post-LN, like BART's encoder layers
    x = torch.randn(batch, n, d, requires_grad=True)
    x_R = torch.randn(batch, 1, d)
    grad_out = torch.randn(batch, n, d)
    gelu_tanh = torch.nn.GELU(approximate="tanh")
    adapter = rp.add_adapters(copy.deepcopy(block), ["attn.o", "mlp.fc2"], r, "none", gelu_tanh)
    steps = {"frozen layer, no PEFT": _routing_step(block, x, grad_out),
             "Adapter r=96 (VL-Adapter's)": _routing_step(adapter, x, grad_out)}
    for route in rp.ROUTES:
        layer = rp.add_vlpet(copy.deepcopy(block), ["attn", "mlp"], "large", r, route, gate_r=r)
        steps[f"VL-PET-large, {route}"] = _routing_step(layer, x, grad_out, None if route == "none" else x_R)
    best = _interleaved_fastest(steps, rounds, repeat)
    none, adapter = best["VL-PET-large, none"][1], best["Adapter r=96 (VL-Adapter's)"][1]
    print(f"forward + backward of one encoder layer, x (B={batch}, N={n}, d={d}) requires grad, frozen layer, "
          f"r = gate_r = {r}, x_R ({batch}, 1, {d}); {torch.get_num_threads()} threads; fastest call of each, "
          f"ratios of CPU time; goal: every route <= 1.1x none")
    print_table(["layer", "wall ms", "CPU ms", "vs VL-PET none", "vs Adapter"],
                [[name, 1e3 * w, 1e3 * c, c / none, c / adapter] for name, (w, c) in best.items()])


def bench_cross_attention(rounds=5, repeat=3):
    """LoRA with cross-attention (r = alpha = 128: width 32, 4 heads) against LoRA none and mul at the same r, on
    a RoBERTa-large-sized layer (d = 1024, N = 21, batch 32), forward + backward, x_R pooled (L = 1) or 196
    patches (ViT-L/16 at 224 px); LoRA matmul on the patches too (mul needs L = 1). CPU-time ratios, candidates
    alternating within each round, fastest call of each."""
    import copy

    import routing_peft as rp

    d, r, n, batch, patches = 1024, 128, 21, 32, 196
    base = torch.nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(batch, n, d, requires_grad=True)
    pooled, grid = torch.randn(batch, 1, d), torch.randn(batch, patches, d)
    grad_out = torch.randn(batch, n, d)
    layers = {"LoRA none": (rp.LoRA(copy.deepcopy(base), r, r, "none"), None),
              "LoRA mul, pooled": (rp.LoRA(copy.deepcopy(base), r, r, "mul"), pooled),
              f"LoRA matmul, {patches} patches": (rp.LoRA(copy.deepcopy(base), r, r, "matmul"), grid),
              "cross-attention, pooled": (rp.CrossAttentionLoRA(copy.deepcopy(base), r, r), pooled),
              f"cross-attention, {patches} patches": (rp.CrossAttentionLoRA(copy.deepcopy(base), r, r), grid)}
    for layer, _ in layers.values():
        rp.mark_trainable(layer)
        with torch.no_grad():  # B off zero, as after some training (the cost does not depend on it)
            layer.B.weight.normal_(0, 0.02)
    steps = {name: _routing_step(layer, x, grad_out, x_R) for name, (layer, x_R) in layers.items()}
    best = _interleaved_fastest(steps, rounds, repeat)
    none, mul = best["LoRA none"][1], best["LoRA mul, pooled"][1]
    print(f"forward + backward, x (B={batch}, N={n}, d={d}) requires grad, frozen Linear({d}, {d}), r = alpha = {r} "
          f"(cross-attention: width {r // 4}, 4 heads), x_R ({batch}, 1 or {patches}, {d}); "
          f"{torch.get_num_threads()} threads; fastest call of each, ratios of CPU time; {_load()}")
    print_table(["layer", "trainable", "wall ms", "CPU ms", "vs LoRA none", "vs LoRA mul"],
                [[name, f"{rp.count_parameters(layers[name][0])[0]:,}", 1e3 * w, 1e3 * c, c / none, c / mul]
                 for name, (w, c) in best.items()])
    print(_load())


# ---- eval (issue 4) ---------------------------------------------------------


def _caption_corpus(n_images, n_refs=5, seed=0):
    """Generated COCO-like tokenised captions (~10 words from a 300-word vocabulary with a
    Zipf-like bias, so n-grams overlap): gts {id: [refs]}, res {id: [candidate]}."""
    import random
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    weights = [1.0 / (i + 1) for i in range(300)]

    def caption():
        return " ".join(rng.choices(vocab, weights, k=rng.randint(7, 13)))
    gts = {100000 + i: [caption() for _ in range(n_refs)] for i in range(n_images)}
    return gts, {k: [caption()] for k in gts}


def _vqa_corpus(n_questions, seed=0):
    """Generated questions with 10 messy human answers each and a prediction."""
    import random
    rng = random.Random(seed)
    pool = ["yes", "Yes", "no", "no.", "2", "two", "Two ", "red", "the red one", "red-ish", "3,5",
            "left side", "dont", "a dog", "dogs", "white and black", "1.5", "tennis", "10", "ten"]
    preds, answers = [], []
    for _ in range(n_questions):
        variants = rng.sample(pool, rng.choice([1, 2, 3]))
        answers.append([rng.choice(variants) for _ in range(10)])
        preds.append(rng.choice(variants + [rng.choice(pool)]))
    return preds, answers


def bench_eval():
    """CIDEr-D on 5,000 images x 5 refs: ours vs pycocoevalcap; VQA accuracy over 200,000 questions."""
    from pycocoevalcap.cider.cider import Cider
    import eval as E
    gts, res = _caption_corpus(5000)
    ours = E.cider(gts, res)[0]
    theirs = float(Cider().compute_score(gts, res)[0])
    assert abs(ours - theirs) < 1e-6, (ours, theirs)
    # interleaved, so that load from other processes hits both sides alike
    pairs = [(median_seconds(lambda: E.cider(gts, res), repeat=1, warmup=0),
              median_seconds(lambda: Cider().compute_score(gts, res), repeat=1, warmup=0)) for _ in range(3)]
    t_ours, t_theirs = (statistics.median(t) for t in zip(*pairs))
    preds, answers = _vqa_corpus(200_000)

    def vqa():
        E.normalize_answer.cache_clear()  # time the normalisation too, not only cache hits
        return sum(E.vqa_accuracy(p, a) for p, a in zip(preds, answers)) / len(preds)
    t_vqa = median_seconds(vqa, repeat=1, warmup=0)
    print_table(["benchmark", "ours (s)", "reference (s)", "ratio ours/ref"], [
        ["CIDEr-D, 5,000 images x 5 refs (vs pycocoevalcap 1.2)", t_ours, t_theirs, t_ours / t_theirs],
        ["VQA accuracy, 200,000 questions x 10 answers (goal: well under 30 s)", t_vqa, "-", "-"],
    ])


# ---- tokenizers (issue 20) --------------------------------------------------
def _caption_texts(n, seed, words):
    """n raw COCO-like captions: a capitalised sentence of 7-14 words (Zipf-like choice) and a period."""
    import random
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(7, 14))).capitalize() + "." for _ in range(n)]


def _t5_like_model(vocab_size=2500):
    """A unigram spiece.model trained by sentencepiece as T5's was (nmt_nfkc, <pad> 0, </s> 1, <unk> 2, no
    <s>) on 20,000 generated captions over ~2,000 word forms (real caption words and made-up ones)."""
    import io
    import random

    import sentencepiece as spm
    rng = random.Random(0)
    real = ("a an the man woman person people child dog dogs cat cats horse bus train car street road city "
            "table plate food pizza sandwich bowl cup kitchen room bed couch tv laptop phone field grass tree "
            "water beach wave surfboard snow ski skateboard frisbee ball tennis racket baseball bat player game "
            "sitting standing riding holding playing eating walking looking flying parked next to on in of with "
            "at near top front side large small red white black blue green yellow two three several group some "
            "is are there what how many color which where who this that it its his her").split()
    syllables = ["ka", "lo", "mi", "ta", "ren", "sho", "pa", "ve", "zu", "qui", "ne", "dor", "bel", "fi", "gra",
                 "tio", "ing", "ed", "er", "st", "ch", "an", "or", "us"]
    words = real + sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)})
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_caption_texts(20000, 1, words)), model_writer=f,
                                   model_type="unigram", vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2, num_threads=2)
    return f.getvalue(), words


def bench_tokenizers(rounds=5):
    """Encoding 10,000 captions: data.SentencePieceTokenizer (cold: a fresh tokenizer, empty word caches;
    warm: caches filled, the prepare-once case after the first pass) vs sentencepiece's C++ encode called
    per string and once on the whole list (num_threads=1). Same ids checked first; rounds alternate the
    order; medians."""
    import sentencepiece as spm

    import data
    blob, words = _t5_like_model()
    texts = _caption_texts(10000, 2, words)
    ref = spm.SentencePieceProcessor(model_proto=blob)
    warm = data.SentencePieceTokenizer(blob)
    n_ids = sum(len(i) for i in ref.encode(texts))
    assert [warm.encode(t) for t in texts] == ref.encode(texts)
    print(_load(), flush=True)
    def cold():
        tok = data.SentencePieceTokenizer(blob)  # loading included (~0.1 s)
        return [tok.encode(t) for t in texts]
    fns = {"ours, cold caches": cold,
           "ours, warm caches": lambda: [warm.encode(t) for t in texts],
           "sentencepiece, per string": lambda: [ref.encode(t) for t in texts],
           "sentencepiece, one list call": lambda: ref.encode(texts, num_threads=1)}
    times = {k: statistics.median(v) for k, v in _paired_rounds(fns, rounds).items()}
    base = times["sentencepiece, per string"]
    print_table(["10,000 captions, %d ids, vocab %d" % (n_ids, ref.get_piece_size()), "s", "ids/s",
                 "time / sentencepiece per string"],
                [[k, t, f"{n_ids / t:,.0f}", t / base] for k, t in times.items()])


# ---- beam search (issue 19) ---------------------------------------------------
def _cut(rows, eos, skip=0):
    """generate()'s rows as beam_search returns them: the first `skip` tokens dropped, nothing from EOS on."""
    rows = [row[skip:] for row in rows.tolist()]
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def _beam_pairs(B=8, beams=5):
    """(name, ours, theirs) for GPT2-medium and BART-base, the same random weights in our models and in
    transformers'; ours(n) / theirs(n) decode a batch of B with `beams` beams and at most n new tokens and
    return token lists. GPT-2 decodes from a one-embedding prefix (generate(inputs_embeds=...), as the
    routing release's caption model), BART from 20 encoder tokens with the CLIP-BART releases' caption
    settings (bart-base's no_repeat_ngram_size 3 and early_stopping, EOS forced at the last step)."""
    import transformers as hf

    import models
    torch.manual_seed(0)
    ours, ref, _, _ = _models_pair("gpt2-medium")
    prefix, eos = torch.randn(B, 1, 1024), 50256

    def ours_gpt2(n):
        rows, cache = prefix.repeat_interleave(beams, 0), ours.new_cache()  # (B * k, 1, d)

        def step(tokens, index):
            if tokens is None:
                return ours(prefix=rows, cache=cache)[:, -1]
            cache.reorder(index)
            return ours(tokens[:, None], cache=cache)[:, -1]
        return models.beam_search(step, B, beams, n, eos)

    def theirs_gpt2(n):
        return _cut(ref.generate(inputs_embeds=prefix, attention_mask=torch.ones(B, 1, dtype=torch.long),
                                 num_beams=beams, max_new_tokens=n, do_sample=False, length_penalty=1.0,
                                 early_stopping=False, pad_token_id=eos), eos)
    yield "gpt2-medium", ours_gpt2, theirs_gpt2
    del ours, ref
    cfg = hf.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                        max_position_embeddings=1024)  # bart-base's sizes (CLIPBART_NOTES 5.1)
    ref = hf.BartForConditionalGeneration(cfg).eval()
    config = models.bart_config(cfg.to_dict())
    sd, _ = models.convert_state_dict("bart", _hub_state_dict(ref), config)
    ours = models.build_model(config).eval()
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(3, 50265, (B, 20))
    mask = (torch.arange(20) < torch.randint(10, 21, (B, 1))).long()  # (B, 20) right-padded
    ids = ids.masked_fill(mask == 0, 1)
    release = dict(no_repeat_ngram=3, early_stopping=True, force_eos=True)

    def ours_bart(n):
        memory, memory_mask = ours.encode(ids, mask)
        per_beam = [t.repeat_interleave(beams, 0) for t in (memory, memory_mask)]  # (B, ...) -> (B * k, ...)
        return models.beam_search(ours.beam_step(*per_beam), B, beams, n, 2, **release)

    def theirs_bart(n):
        return _cut(ref.generate(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=n,
                                 do_sample=False, length_penalty=1.0, early_stopping=True, no_repeat_ngram_size=3,
                                 min_length=0, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1,
                                 forced_bos_token_id=None, forced_eos_token_id=2), 2, skip=1)
    yield "bart-base", ours_bart, theirs_bart


def bench_beams(rounds=3):
    """Beam search, beam 5, batch 8, 20 and 40 new tokens: models.beam_search over our GPT2-medium and
    BART-base against transformers' generate on the same random weights (_beam_pairs). The outputs must be
    equal; ours and theirs alternate within each round; the ratio is of the medians."""
    rows = []
    print(_load(), flush=True)
    for name, ours, theirs in _beam_pairs():
        for n in (20, 40):
            with torch.inference_mode():
                got, want = ours(n), theirs(n)  # also the warm-up
                assert got == want, f"{name}, {n} new tokens: our beam search and transformers' generate differ"
                times = _paired_rounds({"ours": lambda: ours(n), "theirs": lambda: theirs(n)}, rounds)
            t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
            rows.append([name, n, statistics.mean(map(len, got)), t_ours, t_theirs, t_ours / t_theirs])
            print(rows[-1], {k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
    print(f"beam 5, batch 8, fp32, {torch.get_num_threads()} threads; outputs equal; goal: ours/theirs <= 1.0")
    print_table(["model", "max new tokens", "mean tokens out", "ours s", "transformers s", "ours/theirs"], rows)
    print(_load())


# ---- train (issue 5) --------------------------------------------------------
def _random_weights(build):
    """build() on the meta device, then N(0, 0.02) weights and unit LayerNorms: random weights in a second
    instead of a minute of per-layer initialisation (timings do not depend on the values)."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            module, _, kind = name.rpartition(".")
            is_norm = "norm" in module.lower() or module.rsplit(".", 1)[-1].startswith("ln")
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if is_norm and kind == "weight" else 0.0)
        for name, b in model.named_buffers():  # transformers: position_ids = arange, token_type_ids = 0
            b.copy_(torch.arange(b.shape[-1]).expand_as(b) if name.endswith("position_ids") else torch.zeros_like(b))
    return model


def _rss_kib(field):
    """VmRSS / VmHWM of this process from /proc/self/status, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _train_inputs(B=8, n=20, K=3129):
    """A VQA batch like the paper's: <s> question </s> (right-padded, at most 20 tokens), soft targets."""
    torch.manual_seed(0)
    ids = torch.randint(3, 50265, (B, n))
    mask = (torch.arange(n) < torch.randint(8, n + 1, (B, 1))).long()  # (B, n)
    ids = ids.masked_fill(mask == 0, 1)
    targets = torch.zeros(B, K)
    targets[torch.arange(B), torch.randint(K, (B,))] = 1.0
    return ids, mask, targets, torch.randn(B, 3, 224, 224)


def _train_steps_ours(with_vit):
    """{"a": step with cached features (x_R a stored tensor, no ViT needed), "b": step that runs our ViT-L
    first (only if with_vit)}: our VQAModel with LoRA r = alpha = 128 (route mul), one AdamW step."""
    import torch.nn.functional as F

    import data
    import models
    import routing_peft as rp
    import tasks
    import train
    cfg = train.Config(rank=128, alpha=128, route="mul", lr=3e-4)  # the paper's LoRA setting, routed
    text = _random_weights(lambda: models.build_model(models.PRESETS["roberta-large"]))
    tasks.add_peft(cfg, text)
    model = rp.mark_trainable(tasks.VQAModel(text, 1024, 3129, prefix=True), ["head", "ln1", "ln2"])
    model.train()
    vit = _random_weights(lambda: models.build_model(models.PRESETS["vit-l16"])).eval() if with_vit else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ids, mask, targets, pixels = _train_inputs()
    x_cached = torch.randn(8, 1, 1024)

    def step(x_R):
        loss = F.binary_cross_entropy_with_logits(model(ids, mask, x_R, x_R).float(), targets, reduction="sum") / len(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_vit():
        with torch.no_grad():
            x_R = data.select_visual(*vit(pixels), "pooler").float()  # (B, 1, d)
        step(x_R)
    return {"a": lambda: step(x_cached), **({"b": step_vit} if with_vit else {})}


def _train_step_transformers():
    """(c) transformers RobertaModel + ViTModel (random, same configs) + peft LoRA r = alpha = 128 on
    query/value, trainable LayerNorms in the layers, ViT pooler output as the first input embedding,
    a linear head on the first token; the ViT recomputed every step."""
    import peft
    import torch.nn.functional as F
    import transformers as hf
    text = _random_weights(lambda: hf.RobertaModel(hf.RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5), add_pooling_layer=False))
    vit = _random_weights(lambda: hf.ViTModel(hf.ViTConfig(hidden_size=1024, num_hidden_layers=24,
                                                           num_attention_heads=16, intermediate_size=4096),
                                              add_pooling_layer=True)).eval()
    text = peft.get_peft_model(text, peft.LoraConfig(r=128, lora_alpha=128, target_modules=["query", "value"]))
    for name, p in text.named_parameters():
        if ".encoder.layer." in name and "LayerNorm" in name:
            p.requires_grad_(True)
    head = torch.nn.Linear(1024, 3129)
    text.train()
    params = [p for p in text.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4)
    ids, mask, targets, pixels = _train_inputs()
    embed = text.get_input_embeddings()

    def step():
        with torch.no_grad():
            prefix = vit(pixel_values=pixels).pooler_output[:, None]  # (B, 1, d)
        x = torch.cat([prefix, embed(ids)], dim=1)  # (B, 1 + n, d)
        m = torch.cat([mask.new_ones(len(ids), 1), mask], dim=1)
        h = text(inputs_embeds=x, attention_mask=m).last_hidden_state  # (B, 1 + n, d)
        loss = F.binary_cross_entropy_with_logits(head(h[:, 0]).float(), targets, reduction="sum") / len(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _autocast(step, dtype):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            step()
    return run


def _train_memory(which, dtype, threads):
    """One configuration in a fresh process; prints JSON {peak RSS of the timed step, its rise}."""
    torch.set_num_threads(threads)
    step = _train_step_transformers() if which == "c" else _train_steps_ours(which == "b")[which]
    run = _autocast(step, dtype)
    run()  # warm-up: allocator caches, optimizer state
    rss = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak from here on is the step's peak
    run()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_gib": peak / 2**20, "rise_gib": (peak - rss) / 2**20}))


def bench_train(rounds=3):
    """Training step of the VQA setting (RoBERTa-large + ViT-L/16 sizes, random weights, batch 8, 20 text
    tokens + prefix, LoRA r = 128): (a) ours with cached ViT features, (b) ours running the ViT every step
    (the released code), (c) transformers + peft, ViT recomputed. Speed: one process holds all three and
    alternates them step by step over `rounds` rounds after a warm-up step each; the machine is shared
    and other work only ever adds time, so each configuration's time is its fastest step (all rounds
    are printed too) and the ratios are ratios of those. Memory: each
    configuration alone in a fresh process; peak resident set (VmHWM, reset after a warm-up step, so it
    is the peak of one training step: weights, gradients, optimizer state and activations) and its rise
    above the resident set before that step. (a) holds no ViT: cached features make it unnecessary."""
    import subprocess
    import sys
    threads = torch.get_num_threads()
    here = os.path.dirname(os.path.abspath(__file__))
    names = {"a": "(a) ours, cached features", "b": "(b) ours, ViT every step", "c": "(c) transformers + peft"}
    steps = {**_train_steps_ours(with_vit=True), "c": _train_step_transformers()}
    rows = []
    for dtype in ("fp32", "bf16"):
        runs = {k: _autocast(step, dtype) for k, step in steps.items()}
        for run in runs.values():
            run()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                times[k].append(median_seconds(run, repeat=1, warmup=0))
        print(dtype, {k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
        for k in "abc":
            out = subprocess.run([sys.executable, "-c", f"import bench; bench._train_memory({k!r}, {dtype!r}, {threads})"],
                                 capture_output=True, text=True, check=True, cwd=here)
            mem = json.loads(out.stdout.strip().splitlines()[-1])
            t = min(times[k])
            rows.append([names[k], dtype, 8 / t, t, min(times["c"]) / t, mem["peak_gib"], mem["rise_gib"]])
            print(rows[-1], flush=True)
    print(f"VQA training step, RoBERTa-large + ViT-L/16 sizes, batch 8, LoRA r=128 (ours: route mul), "
          f"{threads} threads; goals: (a) >= 4x (c), (b) >= 1.0x (c)")
    print_table(["configuration", "dtype", "samples/s", "s/step", "speed vs (c)", "peak RSS GiB",
                 "rise in step GiB"], rows)


# ---- fullsize (issue 19) -----------------------------------------------------
#
# The real data sets behind the projection of a preset's full run: per task, the training examples an epoch visits,
# the validation examples scored every epoch and the test examples scored once at the end.
FULL_DATA = {
    # VQAv2 on the Karpathy split: every train2014 + val2014 question by its image's split (the counts of VL-T5's
    # karpathy_{train,val,test}.json, j-min/VL-T5 issue 6; 443,757 + 214,354 questions in all)
    "vqa": {"train": 605_102, "val": 26_729, "test": 26_280},
    # Karpathy COCO: 82,783 train + 30,504 restval images x 5 captions (a few images have more), 5,000 val and
    # 5,000 test images (TFDS coco_captions)
    "caption": {"train": 113_287 * 5, "val": 5_000, "test": 5_000},
    # GQA balanced: train + val questions for training, testdev as val and test (huggingface.co/datasets/Mineru/GQA)
    "gqa": {"train": 943_000 + 132_062, "val": 12_578, "test": 12_578},
    # NLVR2: train, dev, test1 (lil.nlp.cornell.edu/nlvr: 107,292 examples = these + 6,970 hidden test)
    "nlvr2": {"train": 86_373, "val": 6_982, "test": 6_967},
}
# The images whose features a full run computes, by image encoder: COCO 2014 (82,783 + 40,504) for the ViT; for
# CLIP also GQA's ~113,000 images (all of them: an upper bound) and NLVR2's pairs (2 an example: an upper bound)
FULL_IMAGES = {"vit": 123_287, "clip_resnet": 123_287 + 113_000 + 2 * (86_373 + 6_982 + 6_967)}
FULL_PRESETS = ("vqa-lora", "vqa-adapter", "caption-lora", "multitask-lora", "multitask-adapter", "multitask-vlpet-large")
BACKBONES = {"vit": "vit-l16", "roberta": "roberta-large", "gpt2": "gpt2-medium", "bart": "bart-base",
             "clip_resnet": "clip-rn101"}  # arch -> models.PRESETS name: the papers' sizes


def _padded_tokenizer(texts, vocab_size):
    """A byte-level BPE learned on texts (data.learn_bpe, 1,000 tokens), its vocabulary filled up to a real model's
    size with tokens "zq0", "zq1", ... that nothing encodes to: every id a full-size model generates decodes."""
    import data
    tok = data.learn_bpe(texts, 1000)
    vocab, k = dict(tok["vocab"]), 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"zq{k}", len(vocab))
        k += 1
    return {"vocab": vocab, "merges": tok["merges"]}


def _fullsize_inputs(root, archs, n_images, nlvr2_sets):
    """The world (shapes.make_world: n_images images, nlvr2_sets NLVR2 sets) and a full-size backbone per arch,
    random weights (models.build_model(models.PRESETS[...])), saved in the converted format with a padded
    tokenizer. Returns (world folder, {arch: checkpoint path})."""
    import models
    import shapes
    world = os.path.join(root, "world")
    if not os.path.isfile(os.path.join(world, shapes.SCENES)):
        shapes.make_world(world, n_images=n_images, nlvr2_sets=nlvr2_sets)
    texts = shapes.bart_texts(world)  # every task's questions, answers, captions and statements
    paths = {}
    for arch in archs:
        paths[arch] = os.path.join(root, f"{BACKBONES[arch]}.pt")
        if not os.path.isfile(paths[arch]):
            torch.manual_seed(0)
            config = models.PRESETS[BACKBONES[arch]]
            tokenizer = _padded_tokenizer(texts, config.vocab_size) if config.vocab_size else None
            models.save_checkpoint(models.build_model(config), paths[arch], tokenizer)
    return world, paths


def _folder_bytes(folder, skip):
    """Bytes of the files under folder, except under its subfolder `skip`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               if not d.startswith(os.path.join(folder, skip)) for f in files)


def _fullsize_run(spec):
    """One preset through train.main in this fresh process (spec: JSON {"preset", "options", "steps", "threads"}): one
    epoch of the first `steps` steps of each task (the epoch's plan cut, the steps' order kept). Prints one JSON
    line: per task the wall time of each training step (from its start to the next step's or the evaluation's:
    data, forward, backward, optimizer) and the evaluation's seconds and examples; the feature extraction's seconds,
    images and new bytes in the cache; the peak memory; {"oom": true} if CUDA ran out of memory."""
    import resource
    from collections import Counter, defaultdict

    import data
    import tasks
    import train
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    starts, evals, extraction = [], defaultdict(lambda: [0.0, 0]), [0.0, 0]

    def timed_step(model, task, *args):
        starts.append((time.perf_counter(), task.name))
        return step(model, task, *args)

    def timed_score(*args):
        starts.append((time.perf_counter(), None))  # the end of the last step
        return score(*args)

    def timed_evaluate(self, *args):
        t0 = time.perf_counter()
        out = evaluate(self, *args)
        evals[self.name][0] += time.perf_counter() - t0
        evals[self.name][1] += len(out[1])
        return out

    def timed_cache(self, keys):
        t0 = time.perf_counter()
        cache(self, keys)
        extraction[0] += time.perf_counter() - t0
        extraction[1] += len(keys)

    def first_steps(*args):
        seen = Counter()
        return [s for s in plan(*args) if seen.update([s[0]]) or seen[s[0]] <= spec["steps"]]

    step, score, evaluate, cache, plan = (train.train_step, train.score, tasks.Task.evaluate, data.Features.cache,
                                          train.epoch_plan)
    train.train_step, train.score, tasks.Task.evaluate, data.Features.cache, train.epoch_plan = (
        timed_step, timed_score, timed_evaluate, timed_cache, first_steps)
    cfg = train.Config(**{**train.PRESETS[spec["preset"]], **spec["options"]})
    before = _folder_bytes(cfg.cache, "prepared") if os.path.isdir(cfg.cache) else 0
    try:
        train.main(cfg, overwrite=True)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"oom": True}))
        return
    end = next(t for t, name in starts if name is None)
    steps = defaultdict(list)
    for (t, name), (t_next, _) in zip(starts, starts[1:]):
        if name is not None and t < end:
            steps[name].append(t_next - t)
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"steps": steps, "evals": evals, "extraction": extraction, "device": "cuda" if cuda else "cpu",
                      "new_bytes": _folder_bytes(cfg.cache, "prepared") - before, "peak_bytes": peak}))


def _hours(seconds):
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.0f} min"


def _run_preset(name, batch, options, steps, threads, log):
    """One preset through _fullsize_run in a fresh process at --batch-size `batch`, halved while CUDA runs out of
    memory; its output in the file `log`. -> (the batch measured, _fullsize_run's measurements)."""
    import subprocess
    import sys
    while True:
        spec = json.dumps({"preset": name, "options": {**options, "batch_size": batch}, "steps": steps, "threads": threads})
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-c", f"import bench; bench._fullsize_run({spec!r})"],
                                  cwd=os.path.dirname(os.path.abspath(__file__)), stdout=f, stderr=subprocess.STDOUT)
        with open(log) as f:
            lines = f.read().splitlines()
        if proc.returncode:
            raise RuntimeError(f"{name} failed; its log: {log}\n" + "\n".join(lines[-20:]))
        m = json.loads(lines[-1])
        if not m.get("oom"):
            return batch, m
        if batch == 1:
            raise RuntimeError(f"{name}: batch 1 does not fit in CUDA memory")
        batch //= 2


def _fullsize_rows(name, preset, b, m, per_image, size):
    """(the table's row, the projection's row) of a preset measured at --batch-size b; per_image, size: its image
    encoder's feature extraction rate (images / s) and bytes per image on disk."""
    import tasks
    kinds = tasks.TASKS[preset["task"]]
    task_batch = {k.name: k.batch_of(b) for k in kinds}
    full_batch = {k.name: k.batch_of(preset["batch_size"]) for k in kinds}
    step = {t: statistics.median(v[1:] or v) * full_batch[t] / task_batch[t] for t, v in m["steps"].items()}
    per_example = {t: s / n for t, (s, n) in m["evals"].items()}
    epochs = preset["epochs"]
    n_steps = {t: FULL_DATA[t]["train"] // full_batch[t] for t in step}
    t_train = epochs * sum(n_steps[t] * step[t] for t in step)
    t_eval = sum((epochs * FULL_DATA[t]["val"] + FULL_DATA[t]["test"]) * per_example[t] for t in per_example)
    t_features = FULL_IMAGES[kinds[0].vision] / per_image
    scaled = "" if b == preset["batch_size"] else f" (x{preset['batch_size'] / b:g} from batch {b})"
    row = [name, f"{preset['batch_size']}{scaled}", ", ".join(f"{t} {s:.2f}" for t, s in step.items()),
           ", ".join(f"{t} {s:.3f}" for t, s in per_example.items()), f"{per_image:.1f}", f"{size / 1024:.1f}",
           f"{m['peak_bytes'] / 2**30:.1f} ({m['device']})"]
    return row, [name, f"{epochs} x {sum(n_steps.values()):,}", _hours(t_train), _hours(t_features), _hours(t_eval),
                 _hours(t_train + t_features + t_eval)]


def bench_fullsize(presets, batch, steps, n_images, nlvr2_sets, val_limit, root, threads):
    """Each preset at full size (random weights, the demo world's data in the real formats) for one short epoch
    through train.main, each in a fresh process; prints what a step, an evaluated example and an image's features
    cost here, the peak memory, and the projected time of the preset's full run (FULL_DATA). batch: the
    --batch-size measured (0: the preset's, halved on CUDA until it fits); a step at the preset's batch is then
    that step's time x the ratio of the batch sizes (a projection, said so). Each task runs `steps` steps; the
    first, which also reads the weights in, is not timed."""
    import shutil
    import tempfile

    import tasks
    import train
    t_start = time.time()
    root = root or tempfile.mkdtemp(prefix="fullsize-")
    for old in ("cache", "runs"):  # a reused root keeps its world and backbones; the features are measured again
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    settings = {name: train.PRESETS[name] for name in presets}
    archs = sorted({a for p in settings.values() for a in (tasks.TASKS[p["task"]][0].vision, tasks.TASKS[p["task"]][0].tiny)})
    world, paths = _fullsize_inputs(root, archs, n_images, nlvr2_sets)
    print(f"world: {world} ({n_images} images); backbones with random weights: "
          f"{', '.join(os.path.basename(p) for p in paths.values())}, tokenizer: a 1,000-token BPE learned on the "
          f"world's text, filled up to each model's vocabulary ({time.time() - t_start:.0f}s)", flush=True)
    devices, rows, projections, rates = set(), [], [], {}
    for name, preset in settings.items():
        kind = tasks.TASKS[preset["task"]][0]
        options = {"vision": paths[kind.vision], "text": paths[kind.tiny], "data": world, "epochs": 1, "val_limit": val_limit,
                   "out": os.path.join(root, "runs", name), "cache": os.path.join(root, "cache"), "workers": 2}
        b, m = _run_preset(name, batch or preset["batch_size"], options, steps, threads, os.path.join(root, f"{name}.log"))
        devices.add(m["device"])
        if m["new_bytes"]:  # this run computed the features; a later preset with the same encoder reads them
            rates[kind.vision] = (m["extraction"][1] / m["extraction"][0], m["new_bytes"] / m["extraction"][1])
        row, projection = _fullsize_rows(name, preset, b, m, *rates[kind.vision])
        rows.append(row)
        projections.append(projection)
        print(row, projection, flush=True)
    machine = torch.cuda.get_device_name() if devices == {"cuda"} else f"CPU, {threads} threads, {_load()}"
    print(f"\nFull-size presets on this machine ({machine}), random weights, {n_images}-image demo world; "
          f"{time.time() - t_start:.0f}s in all")
    print_table(["preset", "batch", "s / step at that batch, per task", "evaluation s / example", "features: images / s",
                 "kB / image on disk", "peak memory GiB"], rows)
    print("\nProjected full run (FULL_DATA in bench.py; evaluation: the whole val split every epoch, then test):")
    print_table(["preset", "epochs x steps", "training", "features (once)", "evaluation", "total"], projections)


BENCHES = {}
BENCHES["beams"] = bench_beams
BENCHES["eval"] = bench_eval
BENCHES["models"] = bench_models
BENCHES["routing"] = bench_routing
BENCHES["tokenizers"] = bench_tokenizers
BENCHES["train"] = bench_train
BENCHES["fullsize"] = bench_fullsize


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--threads", type=int, default=2)
    fullsize = parser.add_argument_group("fullsize")
    fullsize.add_argument("--presets", default=",".join(FULL_PRESETS), help="comma-separated train.py presets")
    fullsize.add_argument("--batch", type=int, default=None,
                          help="--batch-size to measure (default: the preset's on CUDA, 2 on a CPU)")
    fullsize.add_argument("--steps", type=int, default=3, help="training steps of each task (the first is not timed)")
    fullsize.add_argument("--world", type=int, default=None, help="images in the demo world (default: 1,500 on CUDA, "
                          "enough for 3 steps at the presets' batches; 20, the least, on a CPU)")
    fullsize.add_argument("--val-limit", type=int, default=None, help="val examples scored (default: 1,000 on CUDA, 4)")
    fullsize.add_argument("--root", default="", help="folder for the world, backbones, caches and runs (default: a "
                          "new temporary folder)")
    return parser


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    if args.bench != "fullsize":
        return BENCHES[args.bench]()
    cuda = torch.cuda.is_available()
    world = args.world or (1500 if cuda else 20)
    bench_fullsize(args.presets.split(","), 0 if cuda and args.batch is None else args.batch or 2, args.steps, world,
                   max(6, world // 10), args.val_limit or (1000 if cuda else 4), args.root, args.threads)


if __name__ == "__main__":
    main()
