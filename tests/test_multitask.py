"""The CLIP-BART multi-task setting end to end: VQAv2 + GQA + NLVR2 + COCO captions on one BART with CLIP grid
features, with LoRA, VL-Adapter and VL-PET, on a tiny synthetic world and tiny random backbones.

    python -m pytest -q tests/test_multitask.py
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import eval as E
import models
import routing_peft as rp
import shapes
import tasks
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = models.Config("clip_resnet", 128, 4, 2, 0, 1e-5, image_size=64, stages=(1, 1, 1, 1), output_dim=32,
                     image_mean=models.CLIP_MEAN, image_std=models.CLIP_STD, image_resample="bicubic")
METHODS = [("lora", "mul"), ("adapter", "add"), ("vlpet-large", "matmul"), ("vlpet-middlex", "none"),
           ("vlpet-middley", "mul"), ("vlpet-small", "matmul_expand")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    path = str(root / "world")
    shapes.make_world(path, n_images=60)
    tokenizer = data.BPETokenizer(**data.learn_bpe(shapes.bart_texts(path), 300))
    torch.manual_seed(0)
    w = SimpleNamespace(root=root, data=path, cache=str(root / "cache"), tokenizer=tokenizer,
                        clip=str(root / "clip.pt"), bart=str(root / "bart.pt"), t5=str(root / "t5.pt"))
    models.save_checkpoint(models.build_model(CLIP), w.clip)
    bart = models.Config("bart", 32, 1, 2, 64, 1e-5, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id,
                         max_positions=66, dropout=0.1)
    models.save_checkpoint(models.build_model(bart), w.bart, tokenizer.to_data())
    spm = data.SentencePieceTokenizer(shapes.spiece_model(shapes.bart_texts(path)))
    t5 = models.Config("t5", 32, 1, 2, 64, 1e-6, vocab_size=len(spm), pad_id=0, dropout=0.1, decoder_start_id=0, d_kv=16)
    models.save_checkpoint(models.build_model(t5), w.t5, spm.to_data())
    return w


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def config(world, out, *args):
    """The command line's Config (with the multitask defaults), tiny."""
    return train.parse_command_line(["--task", "multitask", "--vision", world.clip, "--text", world.bart, "--data", world.data,
                                   "--cache", world.cache, "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                   "--rank", "4", "--lr", "1e-2", "--beams", "2", "--max-new-tokens", "8", "--workers", "0",
                                   *args])[0]


@pytest.mark.parametrize("peft,route", METHODS)
def test_every_method_end_to_end(world, tmp_path, capsys, peft, route):
    """main() trains the four tasks round-robin and writes each task's results in its benchmark's official
    format; eval.py scores those files to the numbers of the final record, next to the text-only baselines. Every
    record and log line says which benchmark split each task was scored on: GQA's val and test are testdev."""
    cfg = config(world, tmp_path / "run", "--peft", peft, "--route", route)
    result = train.main(cfg)
    assert result["final"] and result["split"] == "test" and result["step"] == train.load_run(cfg.out)["step"]
    epoch = train.load_run(cfg.out)["records"][0]
    assert epoch["split"] == "val" and epoch["task_split"] == {"vqa": "val", "gqa": "testdev", "nlvr2": "dev", "caption": "val"}
    assert result["task_split"] == {"vqa": "test", "gqa": "testdev", "nlvr2": "test1", "caption": "test"}
    log = capsys.readouterr().out
    assert f"gqa_accuracy {epoch['gqa_accuracy']:.2f} (testdev)" in log and f"vqa_accuracy {epoch['vqa_accuracy']:.2f}," in log
    assert "test split (gqa: testdev, nlvr2: test1)" in log
    for name in ("vqa_accuracy", "gqa_accuracy", "nlvr2_accuracy", "CIDEr"):
        assert name in result and name in result["text_only"]
    assert set(result["task_train_loss"] if "task_train_loss" in result else train.load_run(cfg.out)["records"][0]
               ["task_train_loss"]) == {"vqa", "gqa", "nlvr2", "caption"}
    out = tmp_path / "run"
    gqa = E.score_gqa_files(str(out / "results_gqa_test.json"), shapes.gqa_files(world.data, "testdev")[0])
    assert gqa == result["gqa"] and result["gqa_accuracy"] == gqa["accuracy"]
    nlvr2 = E.score_nlvr2_files(str(out / "results_nlvr2_test.csv"), shapes.nlvr2_files(world.data, "test1")[0])
    assert nlvr2 == result["nlvr2"] and result["nlvr2_accuracy"] == pytest.approx(100 * nlvr2["accuracy"])
    karpathy = os.path.join(world.data, data.KARPATHY)
    vqa = E.score_vqa_files(str(out / "results_vqa_test.json"), [data.vqa_files(world.data, s)[0] for s in ("train2014", "val2014")],
                            [data.vqa_files(world.data, s)[1] for s in ("train2014", "val2014")], karpathy, "test")
    assert vqa["overall"] == result["vqa_accuracy"]
    caption = E.score_caption_files(str(out / "results_caption_test.json"), karpathy, "test")
    assert caption["CIDEr"] == pytest.approx(result["CIDEr"], abs=1e-12)
    assert {f"gallery_{t}.png" for t in ("vqa", "gqa", "nlvr2", "caption")} <= set(os.listdir(out))


def test_t5_end_to_end(world, tmp_path):
    """The four tasks on a T5 with its SentencePiece tokenizer: VL-T5's token table (the pieces + 200 rows), and
    main() writes each task's official results, which eval.py scores to the final record's numbers."""
    cfg = config(world, tmp_path / "run", "--text", world.t5, "--peft", "vlpet-large", "--route", "mul")
    _, model, _ = train.build(cfg)
    pieces = len(data.load_tokenizer(world.t5).pieces)
    assert model.backbone.wte.weight.shape[0] == pieces + 200 and model.backbone.config.arch == "t5"
    result = train.main(cfg)
    out = tmp_path / "run"
    nlvr2 = E.score_nlvr2_files(str(out / "results_nlvr2_test.csv"), shapes.nlvr2_files(world.data, "test1")[0])
    assert result["final"] and nlvr2 == result["nlvr2"]
    gqa = E.score_gqa_files(str(out / "results_gqa_test.json"), shapes.gqa_files(world.data, "testdev")[0])
    caption = E.score_caption_files(str(out / "results_caption_test.json"), os.path.join(world.data, data.KARPATHY), "test")
    assert gqa == result["gqa"] and caption["CIDEr"] == pytest.approx(result["CIDEr"], abs=1e-12)


@pytest.mark.parametrize("peft,route", METHODS)
def test_a_step_changes_only_the_trainable_weights(world, tmp_path, peft, route):
    """One step of every task: every trainable tensor that gets a gradient changes; nothing else does (the
    frozen BART, its 200 added token rows, the final logits bias, CLIP's BatchNorm statistics)."""
    cfg = config(world, tmp_path / "run", "--peft", peft, "--route", route)
    tasks, model, _ = train.build(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for task in tasks:
        batch = next(iter(task.loader(task.dataset("train"), [list(range(4))])))
        train.train_step(model, task, [batch], cfg, 0, 0, 1)
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable and changed, sorted(changed - trainable)[:5]
    assert "visual.feat.0.weight" in changed and not any(k.startswith("backbone.wte") for k in changed)
    extra = {"lora": ".bias", "adapter": "ln_cross.weight", "vlpet-large": "encoder.ln_emb.weight"}
    if peft in extra:  # the release's other trainable parameters: biases, every LN, the encoder's LNs
        assert any(k.endswith(extra[peft]) for k in changed)
    if peft.startswith("vlpet"):
        assert not any(".decoder." in k and ".ln" in k for k in trainable)


@pytest.mark.parametrize("peft,visual", [("xattn", "mean"), ("xattn", "patches"), ("bitfit", "mean"), ("full", "mean")])
def test_two_steps_change_exactly_what_each_baseline_trains(world, tmp_path, peft, visual):
    """Two rounds of a step of every task, no weight decay (the first round moves xattn's zero-initialised B, the
    second what lies before it): exactly what the method trains changes, named here from its release's definition:
    full everything (BART's 200 added token rows too; the final logits bias is a buffer); bitfit every bias and the
    visual embedding; xattn its eight matrices on q and v of every attention, every bias, the decoder's ln2, the
    visual embedding. Exceptions, each with an exactly zero gradient: the visual box term's weight (its input is all
    zeros), xattn's A_t, W_q, W_k with the mean token as x_R (one key: the softmax is 1); the key biases' true gradient
    is 0 too (a softmax ignores a shift), so whether rounding moves them is left open."""
    cfg = config(world, tmp_path / "run", "--peft", peft, "--visual", visual, "--weight-decay", "0", "--rank", "16")
    tasks, model, _ = train.build(cfg)
    names = [n for n, _ in model.named_parameters()]
    visual_emb, biases = {n for n in names if n.startswith("visual.")}, {n for n in names if n.endswith(".bias")}
    layer = r"\.(attn|cross)\.[qv]\.(A_t|A_v|W_q|W_k|W_v|W_o|W_up|B)\.weight$"
    trained = {"full": set(names), "bitfit": visual_emb | biases, "xattn": visual_emb | biases | {
        n for n in names if re.search(layer, n) or re.search(r"decoder\.blocks\.\d\.ln2\.weight", n)}}[peft]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert len([n for n in trained if re.search(layer, n)]) == (3 * 2 * 8) * (peft == "xattn")  # enc self, dec self, cross
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = train.optimizer(model, cfg)
    model.train()
    for step in range(2):
        for task in tasks:
            batch = next(iter(task.loader(task.dataset("train"), [list(range(4))])))
            train.train_step(model, task, [batch], cfg, step, 0, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    still = {"visual.box.0.weight"} | {n for n in trained if visual == "mean" and re.search(r"\.(A_t|W_q|W_k)\.", n)}
    keys = {n for n in trained if n.endswith(("attn.k.bias", "cross.k.bias"))}
    assert changed - keys == trained - still - keys


def test_multitask_resume_is_exact(world, tmp_path):
    """Steps of all four tasks (VQA targets drawn at random, dropout on), stopped and resumed: the same weights
    and records as one straight run, bit for bit."""
    straight = config(world, tmp_path / "straight", "--epochs", "2", "--max-steps", "40")
    train.main(straight)
    split = config(world, tmp_path / "split", "--epochs", "2", "--max-steps", "15")
    train.main(split)
    train.main(train.run_config(split.out, max_steps=40), resume=True)
    a, b = train.load_run(straight.out), train.load_run(split.out)
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert a["records"] == b["records"][1:]  # b also logged its stop at step 15
    plan = train.epoch_plan(train.build(straight)[0], straight, 0)
    assert len({t for t, _ in plan[:15]}) < 4 == len({t for t, _ in plan})  # the stop falls before some task's turn


def test_nlvr2_text_only_baseline_breaks_ties_as_the_others():
    """A sentence as often true as false in training, and a new sentence when all labels tie, are predicted by
    tasks.most_frequent (the smaller key: false), as the other baselines break ties, not by file order."""
    task = object.__new__(tasks.NLVR2)
    task.splits = {"train": {"sentence": ["A.", "A.", "B.", "B."], "label": torch.tensor([True, False, True, False])},
                   "test": {"identifier": ["test1-0-0-0", "test1-1-0-0"], "sentence": ["A.", "C."],
                            "label": torch.tensor([False, False])}}
    assert task.text_only_baseline("test")["accuracy"] == 1.0


def test_parameter_counts_reproduce_vl_pet():
    """On bart-base with VL-Adapter's 200 added tokens and visual embedding for RN101 grids (meta device, no
    weights): the trainable counts and percentages VL-PET reports (CLIPBART_NOTES 1.6 and Q6: BitFit 1.21 %, full
    fine-tuning 100 %; its LoRA also trains the decoder's final_layer_norm weights, src/trainer_base.py: still 5.93 %)."""
    vl_bart, biases, visual = 139_420_416 + 200 * 768 + 1_582_848, 125_952, 1_582_848  # BART-base's biases: LNs' too
    xattn = 36 * (768 * 128 // 2 + 128 ** 2 // 2 + 128 * 768)  # rp.CrossAttentionLoRA on q, v of 18 attentions, r 128
    expected = {  # peft: (trainable, total, the paper's %)
        "vlpet-large": (6_052_416, 145_606_464, 4.16), "vlpet-small": (4_291_020, 143_845_068, 2.98),
        "vlpet-middlex": (4_281_804, 143_835_852, 2.98), "vlpet-middley": (4_281_792, 143_835_840, 2.98),
        "adapter": (6_081_600, 145_606_464, 4.18), "lora": (8_791_296, 148_234_752, 5.93),  # + the decoder's 6 ln2 weights
        "bitfit": (biases + visual, vl_bart, 1.21), "full": (vl_bart, vl_bart, 100.0),
        "xattn": (xattn + biases + 6 * 768 + visual, vl_bart + xattn, 4.99)}  # ours: no paper figure
    for peft, (trainable, total, percent) in expected.items():
        lora = peft in ("lora", "xattn")
        cfg = train.Config(task="multitask", peft=peft, route="none", rank=128 if lora else 96, alpha=32 if lora else 16,
                           dropout=0.1 if lora else 0.0, visual="mean")
        with torch.device("meta"):
            bart = models.build_model(models.PRESETS["bart-base"])
            extra = tasks.add_peft_vl(cfg, bart)
            model = tasks.VLSeq2Seq(bart, 2048, True, False, 50265 + 200)
        counts = rp.count_parameters(rp.mark_trainable(model, ["visual"] + extra))
        assert counts == (trainable, total) and round(100 * trainable / total, 2) == percent, peft
    with torch.device("meta"):
        assert sum(p.numel() for p in models.build_model(models.PRESETS["clip-rn101"]).parameters()) == 56_259_936


def test_bad_multitask_input_is_one_line(world, tmp_path, capsys):
    """A GQA question whose image is missing, a malformed NLVR2 line: one error line naming the problem."""
    broken = tmp_path / "world"
    shutil.copytree(world.data, broken, ignore=shutil.ignore_patterns("prepared"))
    gqa_images = broken / "gqa" / "images"
    missing = sorted(os.listdir(gqa_images))[0]
    os.remove(gqa_images / missing)
    cache = str(tmp_path / "cache")
    args = ["--task", "multitask", "--vision", world.clip, "--text", world.bart, "--data", str(broken), "--cache", cache,
            "--workers", "0", "--max-steps", "1"]
    with pytest.raises(SystemExit) as e:
        train.cli(args + ["--out", str(tmp_path / "a")])
    assert e.value.code.startswith("error: image not found") and missing in e.value.code and "\n" not in e.value.code
    shutil.copy(os.path.join(world.data, "gqa", "images", missing), gqa_images / missing)
    with open(broken / "nlvr2" / "data" / "dev.json", "a", encoding="utf-8") as f:
        f.write('{"identifier": "dev-9-0-0", "sentence": "x", "label": "maybe"}\n')
    with pytest.raises(SystemExit) as e:
        train.cli(args + ["--out", str(tmp_path / "b")])
    assert "dev.json, line" in e.value.code and "label" in e.value.code and "\n" not in e.value.code


def test_multitask_options():
    """The multitask defaults, the CLIP-BART visual kinds, VL-PET only there; VL-PET's baselines as its scripts run them
    (full fine-tuning at lr 1e-4, BitFit at 1e-3), reading neither --rank nor a route."""
    cfg = train.parse_command_line(["--task", "multitask"])[0]
    assert (cfg.peft, cfg.visual, cfg.clip, cfg.adam_eps, cfg.warmup) == ("vlpet-large", "mean", 5.0, 1e-6, 0.1)
    assert train.parse_command_line(["--task", "multitask", "--peft", "lora", "--visual", "patches"])[0].visual == "patches"
    for name, lr in (("multitask-full", 1e-4), ("multitask-bitfit", 1e-3)):
        preset = train.parse_command_line(["--preset", name])[0]
        assert (preset.peft, preset.lr, preset.rank, preset.route, preset.batch_size) == (name[10:], lr, 16, "none", 500)
        train.check_config(preset)
    xattn = train.parse_command_line(["--task", "multitask", "--peft", "xattn", "--visual", "patches", "--rank", "32"])[0]
    assert xattn.route == "none" and train.check_config(xattn) is None
    for bad, phrase in ((dataclasses.replace(cfg, visual="pooler"), "CLIP-BART setting routes"),
                        (train.Config(peft="vlpet-small"), "VL-PET is built for the CLIP-BART setting"),
                        (dataclasses.replace(cfg, peft="lora", rank_dec=96), "--rank-dec is the rank of VL-PET's")):
        with pytest.raises(ValueError, match=phrase):
            train.check_config(bad)


def test_tiny_backbone_names(monkeypatch):
    """--text tiny is the setting's own demo backbone, tiny-ARCH another one (the demo's tiny T5: tiny-t5)."""
    monkeypatch.setattr(shapes, "tiny_backbone", lambda arch: f"data/tiny/{arch}.pt")
    assert train.backbone("tiny", "bart") == "data/tiny/bart.pt"
    assert train.backbone("tiny-t5", "bart") == "data/tiny/t5.pt"


@pytest.mark.parametrize("text", ["bart", "t5"])
def test_multitask_study(world, tmp_path, monkeypatch, text):
    """python train.py --study --task multitask, tiny, on BART or T5: the grid of PEFT methods and routes, the table
    with each task's metric and VL-PET's average, and its chart."""
    monkeypatch.setitem(shapes.STUDY, "multitask", ([("lora", None, shapes.ROUTES5), ("vlpet-small", None, ("none",)),
                                                    ("xattn", "patches", ("none",))], 2, {"epochs": 1, "train_limit": 40}))
    cfg, meta = train.parse_command_line(["--study", "--task", "multitask", "--vision", world.clip, "--text", getattr(world, text),
                                          "--data", world.data, "--cache", world.cache, "--out", str(tmp_path / "study"),
                                          "--batch-size", "16", "--rank", "16", "--beams", "1", "--max-new-tokens", "8",
                                          "--workers", "0"])
    rows, table = train.run_study(cfg, meta["given"], routes=("none", "mul"), seeds=1)
    runs = sorted(f for f in os.listdir(tmp_path / "study") if not f.startswith("study."))
    assert runs == ["multitask-lora-mul-s0", "multitask-lora-none-s0", "multitask-vlpet-small-none-s0",
                    "multitask-xattn-none-patches-s0"]
    header = "| peft | visual | route | mean | vqa_accuracy | gqa_accuracy | nlvr2_accuracy | CIDEr | trainable params | gain |"
    assert header in table and "the first 40 training examples of each task" in table
    assert "| lora | mean | mul |" in table and "| xattn | patches | none |" in table
    record = train.final_record(str(tmp_path / "study" / "multitask-lora-mul-s0"))
    row = next(r for r in rows if (r["peft"], r["route"]) == ("lora", "mul"))
    expected = (record["vqa_accuracy"] + record["gqa_accuracy"] + record["nlvr2_accuracy"] + 100 * record["CIDEr"]) / 4
    assert row["mean"] == (pytest.approx(expected), 0.0)
    assert os.path.isfile(tmp_path / "study" / "study.png")


def test_default_run_folders():
    """Each demo and study has its own default folder: the tiny T5's never meets the BART demo's."""
    cfg = train.Config()
    for task, text, study, out in (("vqa", "tiny", False, "runs/vqa"), ("multitask", "tiny", False, "runs/multitask"),
                                   ("multitask", "tiny-t5", False, "runs/multitask-t5"),
                                   ("multitask", "ckpt/t5-base.pt", False, "runs/multitask"), ("vqa", "tiny", True, "runs/study"),
                                   ("multitask", "tiny", True, "runs/study-multitask"),
                                   ("multitask", "tiny-t5", True, "runs/study-multitask-t5")):
        assert train.default_out(dataclasses.replace(cfg, task=task, text=text), study) == out, (task, text, study)


def test_vqa_targets_are_drawn_per_example(world, tmp_path):
    """GenerativeVQA's target answer for an example is a function of (seed, step, its index) alone: the same in a
    batch of eight as in either half (two processes' shares), another at other steps and seeds; over many steps
    each answer is drawn in proportion to its soft score."""
    cfg = config(world, tmp_path / "run")
    vqa = train.build(cfg)[0][0]
    ds = vqa.dataset("train")

    def drawn(indices, step):
        """[(target tokens, weight)] per example."""
        _, labels, weight = vqa.targets(next(iter(vqa.loader(ds, [indices]))), step)
        return [(tuple(row[row != -100].tolist()), w) for row, w in zip(labels, weight.tolist())]

    whole = drawn(list(range(8)), 3)
    assert drawn([0, 2, 4, 6], 3) == whole[0::2] and drawn([1, 3, 5, 7], 3) == whole[1::2]
    scores = [sorted(s for s in vqa.collate([ds[m]])["targets"][0].tolist() if s > 0) for m in range(len(ds))]
    m = next(m for m, s in enumerate(scores) if len(s) >= 2 and len(set(s)) == len(s))  # told apart by the score
    weights = [drawn([m], step)[0][1] for step in range(2000)]
    for score in scores[m]:
        assert weights.count(pytest.approx(score)) / 2000 == pytest.approx(score / sum(scores[m]), abs=0.04)
    vqa.cfg = dataclasses.replace(cfg, seed=1)
    assert drawn([m], 3) != drawn([m], 4) or drawn([m], 5) != drawn([m], 6)
    other = [drawn([m], step)[0][1] for step in range(40)]
    assert other != weights[:40]


# ---- several processes (torchrun, gloo on CPU) ------------------------------------------------------------


def torchrun(args, procs, out):
    """python -m torch.distributed.run --nproc_per_node procs train.py args --out out, one thread a process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                           "train.py", *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ddp_args(world, bart, batch_size):
    return ["--task", "multitask", "--vision", world.clip, "--text", bart, "--data", world.data, "--cache", world.cache,
            "--batch-size", str(batch_size), "--grad-accum", "2", "--train-limit", "20", "--epochs", "2",
            "--max-steps", "6", "--rank", "4", "--beams", "1", "--max-new-tokens", "4", "--workers", "0", "--device", "cpu"]


def test_ddp_matches_one_process(world, tmp_path):
    """The four tasks over 2 processes against one process, dropout off: batch 6 is the smallest that gives each
    process an NLVR2 example (its share 1/3: 2 a batch); gradient accumulation 2; the first epoch's 6 steps visit
    every task (at most 20 examples each: one step of VQA and of GQA, two of NLVR2 and of captions). VQA's target
    answers are drawn per example, so both runs draw the same ones: the logged train losses (about 18) agree to a
    relative 1e-6, the trainable weights to 1e-6 plus a relative 1e-3: Adam's division by sqrt(v) + eps (1e-6) can
    magnify the float32 summation order of a small gradient (one decoder adapter weight: a relative 1.3e-4)."""
    model = models.load_checkpoint(world.bart)
    model.config = dataclasses.replace(model.config, dropout=0.0)
    bart = str(tmp_path / "bart.pt")
    models.save_checkpoint(model, bart, world.tokenizer.to_data())
    args = ddp_args(world, bart, 6)
    cfg = train.parse_command_line(args + ["--out", str(tmp_path / "one")])[0]
    assert train.smallest_batch(cfg, 2) == 6 and [t.batch_of(6) for t in tasks.TASKS["multitask"]] == [6, 10, 2, 5]
    train.main(cfg)
    proc = torchrun(args, 2, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train.load_run(cfg.out), train.load_run(str(tmp_path / "ddp"))
    assert a["step"] == b["step"] == 6 and a["trainable"].keys() == b["trainable"].keys()
    for name in a["trainable"]:
        torch.testing.assert_close(a["trainable"][name], b["trainable"][name], rtol=1e-3, atol=1e-6)
    losses = a["records"][0]["task_train_loss"]
    assert set(losses) == {"vqa", "gqa", "nlvr2", "caption"}
    for name, loss in losses.items():
        assert b["records"][0]["task_train_loss"][name] == pytest.approx(loss, rel=1e-6), name  # float32 sums near 17
    assert a["records"][0]["train_loss"] == pytest.approx(b["records"][0]["train_loss"], rel=1e-6)


def test_smallest_batch_for_the_processes():
    """NLVR2's share of a batch is 1/3: each process needs one, so 3 examples a process; one process takes any."""
    cfg = train.Config(**train.TASK_DEFAULTS["multitask"], task="multitask")
    assert [train.smallest_batch(cfg, world) for world in (1, 2, 3, 4)] == [1, 6, 9, 12]
    for world in (2, 3, 4):
        train.check_world(dataclasses.replace(cfg, batch_size=train.smallest_batch(cfg, world)), world)
        with pytest.raises(ValueError, match=f"smallest --batch-size for {world} processes is"):
            train.check_world(dataclasses.replace(cfg, batch_size=train.smallest_batch(cfg, world) - 1), world)


def test_ddp_refuses_a_batch_too_small_before_any_work(world, tmp_path):
    """--batch-size 5 gives NLVR2 batches of 1 example, none for the second process: both processes stop before
    building anything, with one line naming the smallest batch that works."""
    proc = torchrun(ddp_args(world, world.bart, 5), 2, tmp_path / "run")
    assert proc.returncode != 0
    # one line per process not killed first; two processes' lines may share a line of the combined stderr
    lines = {"error: " + part.strip() for ln in proc.stderr.splitlines() if ln.startswith("error: ")
             for part in ln.split("error: ")[1:]}
    assert lines == {"error: --batch-size 5 gives nlvr2 batches of 1 example, fewer than the 2 processes (each needs "
                     "an example of every batch); the smallest --batch-size for 2 processes is 6"}, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run")
