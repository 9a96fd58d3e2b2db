"""Benchmarks: speed and memory as ratios measured in one run (tests never time anything).

    python bench.py models      # our ViT-L/16, RoBERTa-large, GPT2-medium vs transformers (forward)
    python bench.py routing     # routed LoRA layers vs plain LoRA vs peft (forward + backward)
    python bench.py eval        # CIDEr-D vs pycocoevalcap; VQA accuracy over 200k questions

Needs the dev requirements (transformers, peft, pycocoevalcap). Runs on 2 threads unless told otherwise.
"""
import argparse
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


# ---- models (issue 2) -------------------------------------------------------
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


MODEL_ROUNDS = {"vit-l16": 3, "roberta-large": 15, "gpt2-medium": 15}  # ViT-L takes ~10 s a forward here


def bench_models():
    """Forward time of our backbones vs transformers on the same random weights (batch 8, inference_mode),
    fp32 and bf16 autocast. Ours and theirs alternate within each round (the machine is shared, so both
    see the same load); times are medians over rounds, the ratio is the median of the per-round ratios."""
    import gc
    rows = []
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
            t_ours, t_ref = [], []
            for _ in range(MODEL_ROUNDS[name]):
                t_ours.append(median_seconds(lambda: run(ours, *args), repeat=1, warmup=0))
                t_ref.append(median_seconds(lambda: run(ref, **kwargs), repeat=1, warmup=0))
            ratio = statistics.median(o / r for o, r in zip(t_ours, t_ref))  # paired: same load in a round
            rows.append([name, str(dtype).replace("torch.", ""), statistics.median(t_ours),
                         statistics.median(t_ref), ratio, f"{diff:.1e}"])
            print(rows[-1], flush=True)
        del ours, ref
        gc.collect()
    print_table(["model (batch 8)", "dtype", "ours s", "transformers s", "ours/theirs", "max |diff| fp32"], rows)


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
    """RoBERTa-large-sized layer (d = 1024, r = alpha = 128, N = 21, batch 32): each route vs none vs peft."""
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

    # interleave the candidates over several rounds so machine noise hits them alike; median of medians
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(median_seconds(step, repeat=repeat))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"forward + backward, x (B={batch}, N={n}, d={d}) requires grad, frozen Linear({d}, {d}), "
          f"r = alpha = {r}, x_R ({batch}, 1, {d}); {torch.get_num_threads()} threads")
    print_table(["layer", "ms", "vs none", "vs peft"],
                [[name, 1e3 * t, t / med["none"], t / med["peft"]] for name, t in med.items()])


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


BENCHES = {}
BENCHES["eval"] = bench_eval
BENCHES["models"] = bench_models
BENCHES["routing"] = bench_routing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCHES[args.bench]()


if __name__ == "__main__":
    main()
