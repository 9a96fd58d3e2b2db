"""What a researcher meets at full size: evaluation on part of the val split and in its own batches, broken
outputs said so, a Hugging Face folder where a converted file belongs, and a README whose commands run as written.

    python -m pytest -q tests/test_fullsize.py

The runs use a tiny synthetic world and tiny random backbones (CLIP + BART for the four tasks of setting 3, ViT +
RoBERTa + GPT-2 for settings 1 and 2), built once per module.
"""
import dataclasses
import json
import os
import re
import shlex
from types import SimpleNamespace

import pytest
import torch

import bench
import data
import eval as E
import models
import shapes
import tasks
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = models.Config("clip_resnet", 128, 4, 2, 0, 1e-5, image_size=64, stages=(1, 1, 1, 1), output_dim=32,
                     image_mean=models.CLIP_MEAN, image_std=models.CLIP_STD, image_resample="bicubic")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fullsize")
    path = str(root / "world")
    shapes.make_world(path, n_images=60)
    tokenizer = data.BPETokenizer(**data.learn_bpe(shapes.bart_texts(path), 300))
    torch.manual_seed(0)
    w = SimpleNamespace(data=path, cache=str(root / "cache"), tokenizer=tokenizer)
    text = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, ln_eps=1e-5, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
    configs = {"clip": CLIP, "vit": models.Config("vit", 32, 1, 2, 64, 1e-12, image_size=32, patch_size=16),
               "bart": models.Config("bart", max_positions=66, **text), "roberta": models.Config("roberta", max_positions=40, **text),
               "gpt2": models.Config("gpt2", max_positions=40, **text)}
    for name, config in configs.items():
        setattr(w, name, str(root / f"{name}.pt"))
        models.save_checkpoint(models.build_model(config), getattr(w, name), tokenizer.to_data() if config.vocab_size else None)
    return w


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def config(world, out, task="multitask", **options):
    """A tiny run of one epoch; multitask with the command line's multitask defaults."""
    backbones = {"multitask": (world.clip, world.bart), "vqa": (world.vit, world.roberta), "caption": (world.vit, world.gpt2)}
    cfg, _ = train.parse_command_line(["--task", task, "--vision", backbones[task][0], "--text", backbones[task][1],
                                       "--data", world.data, "--cache", world.cache, "--out", str(out), "--epochs", "1",
                                       "--batch-size", "16", "--rank", "4", "--beams", "2", "--max-new-tokens", "6",
                                       "--answers", "20", "--max-len", "12", "--workers", "0"])
    return dataclasses.replace(cfg, **options)


def read_records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def results_ids(out, task, split):
    """The ids of a results file, in file order (NLVR2: its CSV)."""
    if task == "nlvr2":
        with open(os.path.join(out, f"results_nlvr2_{split}.csv"), encoding="utf-8") as f:
            return [line.split(",")[0] for line in f]
    key = {"vqa": "question_id", "gqa": "questionId", "caption": "image_id"}[task]
    return [r[key] for r in E.load_json(os.path.join(out, f"results_{task}_{split}.json"), "results")]


def split_ids(task, split):
    s = task.splits[split]
    ids = s["question_id"] if task.name in ("vqa", "gqa") else s["identifier"] if task.name == "nlvr2" else s["image_id"]
    return ids.tolist() if torch.is_tensor(ids) else list(ids)


# ---- §2 evaluation that does not dominate training ---------------------------------------------------------


def test_val_limit_scores_the_first_examples_and_the_final_test_all(world, tmp_path, capsys):
    """--val-limit 5: every task's epoch record is over the first 5 val examples (its results file holds exactly
    those, its official metrics count 5, GQA's against those 5 questions), the log line says so; the final test
    record is over every test example."""
    cfg = config(world, tmp_path / "run", val_limit=5)
    train.main(cfg)
    val, test = read_records(cfg.out)
    built, _, _ = train.build(cfg)
    assert val["examples"] == {t.name: 5 for t in built}
    assert test["examples"] == {t.name: len(t.splits["test"]["image"]) for t in built}
    assert all(len(t.splits["test"]["image"]) > 5 for t in built)
    assert (val["vqa"]["n_questions"], val["gqa"]["n_questions"], val["nlvr2"]["n_examples"], val["caption"]["n_images"]) == (5,) * 4
    for t in built:
        assert results_ids(cfg.out, t.name, "val") == split_ids(t, "val")[:5], t.name
        assert sorted(results_ids(cfg.out, t.name, "test"), key=str) == sorted(split_ids(t, "test"), key=str), t.name
    gqa = {r["questionId"]: r["prediction"] for r in E.load_json(os.path.join(cfg.out, "results_gqa_val.json"), "results")}
    questions = E.read_gqa_questions(shapes.gqa_files(world.data, "testdev")[0])
    assert val["gqa"] == E.gqa_scores(gqa, {q: questions[q] for q in gqa})
    assert "val (up to 5 a task) vqa_accuracy " in capsys.readouterr().out


def test_first_rows_are_the_first_examples(world, tmp_path):
    """data.first_rows on each prepared format (VQA, GQA, NLVR2: ragged inputs and targets; captions: images with
    their per-caption columns): its dataset's items are the first items of the whole split's, none more."""
    for t in train.build(config(world, tmp_path / "run"))[0]:
        whole = t.splits["val"]
        head = data.first_rows(whole, 5)
        n = int((whole["caption_image"] < 5).sum()) if "caption_image" in whole else 5
        assert len(head["image"]) == 5 and len(t.dataset_class(head)) == n < len(t.dataset_class(whole)), t.name
        for m in range(n):
            a, b = t.dataset_class(head)[m], t.dataset_class(whole)[m]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                                for k in a), (t.name, m)


@pytest.mark.parametrize("task,n", [("vqa", 12), ("caption", 3)])
def test_val_limit_in_settings_1_and_2(world, tmp_path, task, n):
    """The classifier VQA and GPT-2 captions take the limit too: the first n questions / images, scored as the
    official evaluation scores those predictions."""
    cfg = config(world, tmp_path / "run", task=task, val_limit=n)
    train.main(cfg)
    val, test = read_records(cfg.out)
    built, _, _ = train.build(cfg)
    assert val["examples"] == {task: n} and test["examples"] == {task: len(built[0].splits["test"]["image"])}
    assert results_ids(cfg.out, task, "val") == split_ids(built[0], "val")[:n] and len(split_ids(built[0], "val")) > n
    assert val[task]["n_questions" if task == "vqa" else "n_images"] == n
    results = E.load_json(os.path.join(cfg.out, f"results_{task}_val.json"), "results")
    if task == "vqa":
        annotations = [a for s in ("train2014", "val2014") for a in E.load_json(data.vqa_files(world.data, s)[1], "")["annotations"]
                       if a["question_id"] in {r["question_id"] for r in results}]
        official = E.vqa_scores({r["question_id"]: r["answer"] for r in results}, annotations)
        assert (val["vqa_accuracy"], val["vqa"]["perAnswerType"]) == (official["overall"], official["perAnswerType"])
        assert official["overall"] > 0  # something right: soft targets cut wrongly would show


def test_evaluation_batches(world, tmp_path, monkeypatch):
    """By default each task evaluates in its own training batch (VL-PET's per-task sizes); --eval-batch-size sets
    one for all. Evaluation goes through data.progress, named by task and split, with its number of batches."""
    cfg = config(world, tmp_path / "run", batch_size=12)
    built, model, _ = train.build(cfg)
    assert [list(map(len, t.eval_batches(25))) for t in built] == [[12, 12, 1], [20, 5], [4] * 6 + [1], [10, 10, 5]]
    calls = []

    def progress(iterable, desc, unit, total=None, **kw):
        calls.append((desc, total))
        return iterable
    monkeypatch.setattr(data, "progress", progress)
    for t in built:
        t.evaluate(model, "val", limit=5)
    assert calls == [("evaluate vqa val[:5]", 1), ("evaluate gqa val[:5]", 1), ("evaluate nlvr2 val[:5]", 2),
                     ("evaluate caption val[:5]", 1)]
    calls.clear()
    for t in built:
        t.cfg = dataclasses.replace(cfg, eval_batch_size=2)
        t.evaluate(model, "val", limit=5)
    assert [total for _, total in calls] == [3] * 4


def test_eval_options_on_resume(world, tmp_path, monkeypatch):
    """--resume keeps a run's --val-limit, --eval-batch-size, --workers and --device unless given again, and takes
    new ones; --max-steps goes back to its default (to the end) unless given."""
    cfg = config(world, tmp_path / "run", task="vqa", val_limit=4, max_steps=1, epochs=2, device="cpu")
    train.main(cfg)
    seen = []
    monkeypatch.setattr(train, "main", lambda c, resume=False, overwrite=False: seen.append((c, resume)))
    train.cli(["--resume", cfg.out])
    train.cli(["--resume", cfg.out, "--val-limit", "2", "--eval-batch-size", "3", "--workers", "1", "--max-steps", "3"])
    assert [(c.val_limit, c.eval_batch_size, c.workers, c.device, c.max_steps, resume) for c, resume in seen] == \
        [(4, 0, 0, "cpu", 0, True), (2, 3, 1, "cpu", 3, True)]


# ---- §3 outputs that are obviously broken ---------------------------------------------------------------


def test_output_warning_lines():
    t = tasks.GQA.__new__(tasks.GQA)
    assert t.output_warning([{"questionId": "1", "prediction": " "}, {"questionId": "2", "prediction": ""}], "val") == \
        ["warning: gqa: all 2 testdev predictions are empty (a tokenizer or checkpoint that does not fit, or a collapsed run?)"]
    assert "are the same, 'yes'" in t.output_warning([{"questionId": str(i), "prediction": "yes"} for i in range(3)], "test")[0]
    assert t.output_warning([{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "no"}], "val") == []
    assert t.output_warning([{"questionId": "1", "prediction": "yes"}], "val") == []  # one example says nothing


def test_collapsed_and_empty_outputs_are_said(world, tmp_path, monkeypatch, capsys):
    """A VQA head forced to one answer: the warning follows the epoch's scores and the final table, and is in
    both records; captions decoded by a tokenizer that yields nothing: the same for "empty"."""
    forward = tasks.VQAModel.forward

    def one_answer(self, *args):
        logits = forward(self, *args)
        return logits + 1e4 * torch.nn.functional.one_hot(torch.tensor(2), logits.shape[-1])
    monkeypatch.setattr(tasks.VQAModel, "forward", one_answer)
    cfg = config(world, tmp_path / "vqa", task="vqa")
    train.main(cfg)
    out = capsys.readouterr().out.splitlines()
    val, test = read_records(cfg.out)
    answer = train.build(cfg)[0][0].vocab[2]
    for record, n in ((val, val["examples"]["vqa"]), (test, test["examples"]["vqa"])):
        line = f"warning: vqa: all {n} {record['split']} predictions are the same, {answer!r} (a tokenizer or checkpoint that does not fit, or a collapsed run?)"
        assert record["warnings"] == [line] and line in out
    epoch = next(i for i, ln in enumerate(out) if ln.startswith("epoch 1.00"))
    assert out[epoch + 1].startswith("warning: vqa: all")
    monkeypatch.setattr(data.BPETokenizer, "decode", lambda self, ids, skip_special=False: "")
    cfg = config(world, tmp_path / "caption", task="caption")
    train.main(cfg)
    assert all(r["warnings"] == [f"warning: caption: all {r['examples']['caption']} {r['split']} predictions are empty "
                                 f"(a tokenizer or checkpoint that does not fit, or a collapsed run?)"] for r in read_records(cfg.out))
    capsys.readouterr()
    train.evaluate_run(cfg.out, "val")
    assert capsys.readouterr().out.startswith("warning: caption: all ")


# ---- §4 a Hugging Face folder where a converted checkpoint belongs --------------------------------------------


def test_a_hugging_face_folder_is_named_and_its_conversion_shown(world, tmp_path):
    folder = tmp_path / "hf" / "vit-large-patch16-224-in21k"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError) as e:
        models.load_checkpoint(str(folder))
    assert str(e.value) == (f"{folder} is a folder (a Hugging Face model, judging by its config.json), not a converted "
                            f"checkpoint file: convert it once with: python models.py convert --src {folder} --out "
                            f"ckpt/vit-large-patch16-224-in21k.pt, then use ckpt/vit-large-patch16-224-in21k.pt")
    with pytest.raises(SystemExit) as e:
        train.cli(["--vision", str(folder), "--text", world.roberta, "--data", world.data, "--cache", world.cache,
                   "--out", str(tmp_path / "run"), "--workers", "0"])
    assert e.value.code.startswith(f"error: {folder} is a folder (a Hugging Face model") and "\n" not in e.value.code
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"is a folder, not a converted checkpoint file: convert it once with: python "
                                         r"models.py convert --src .* --out ckpt/vit-large-patch16-224-in21k.pt"):
        models.load_checkpoint(str(folder) + "/")


# ---- §4 the README's commands run as written, on one data layout ---------------------------------------------


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def bash_commands(text):
    """Every command in the README's bash blocks, continuation lines joined, comments dropped, as argv lists."""
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def layout(text):
    """The path patterns of the README's data layout block, each as a regex ({a,b}: either; {name}, *: one name)."""
    block = re.search(r"```\n(.*?)```", text.split("## Data layout", 1)[1], re.S).group(1)
    patterns = [p.strip() for line in block.splitlines() for p in re.split(r",\s+", line.split("#")[0]) if p.strip()]
    assert len(patterns) >= 14, patterns

    def regex(pattern):
        parts = re.split(r"(\{[^}]*\}|\*)", pattern)
        return "".join("[^/]*" if p == "*" else "(" + "|".join(map(re.escape, p[1:-1].split(","))) + ")" if p[:1] == "{" and "," in p
                       else "[^/]+" if p[:1] == "{" else re.escape(p) for p in parts)
    return [re.compile(regex(p)) for p in patterns]


def files_read(cfg):
    """One file of every kind a run of cfg reads, by the tasks' own folder rules and data.py's file names."""
    coco = [data.coco_image_key(s, 9) for s in ("train2014", "val2014")]
    nlvr2 = [k for ident, d in (("train-10171-0-0", 5), ("dev-850-2-0", None), ("test1-0-1-0", None))
             for k in data.nlvr2_image_keys(ident, d)]
    out = [cfg.vision, cfg.text]
    for kind in tasks.TASKS[cfg.task]:
        folder, images = kind.data_folder(cfg, cfg.data), kind.images_folder(cfg, cfg.data)
        if kind.name in ("vqa", "caption"):
            out += [os.path.join(folder, data.KARPATHY)] + [os.path.join(images, k) for k in coco]
        if kind.name == "vqa":
            out += [p for s in ("train2014", "val2014") for p in data.vqa_files(folder, s)]
        if kind.name == "gqa":
            out += [os.path.join(folder, "questions1.2", data.GQA_QUESTIONS.format(s)) for s in ("train", "val", "testdev")]
            out += [os.path.join(images, data.gqa_image_key("2354786"))]
        if kind.name == "nlvr2":
            out += [os.path.join(folder, "data", f"{s}.json") for s in ("train", "dev", "test1")]
            out += [os.path.join(images, k) for k in nlvr2]
    return [os.path.normpath(p) for p in out]


def test_readme_commands_parse_and_follow_the_data_layout(monkeypatch):
    """Every command in the README parses with its script's own parser (train.py, models.py convert, eval.py,
    bench.py); every train.py run and every preset reads its data where the layout section puts it and its
    checkpoints from the README's conversions."""
    text, converted, runs = readme(), [], []
    monkeypatch.setattr(models, "convert", lambda src, out, heads=None: converted.append(out))
    monkeypatch.setattr(models, "print_report", lambda report: None)
    for argv in bash_commands(text):
        script = next((a for a in argv if a.endswith(".py")), None)
        args = argv[argv.index(script) + 1:] if script else []
        if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
            continue
        if script == "train.py":
            cfg, meta = train.parse_command_line(args)
            if cfg.data != "shapes" and not meta.get("evaluate"):
                runs.append((" ".join(argv), cfg))
        elif script == "models.py":
            models.main(args)
        elif script == "eval.py":
            E.build_parser().parse_args(args)
        elif script == "bench.py":
            bench.build_parser().parse_args(args)
        else:
            pytest.fail(f"README command with no parser here: {' '.join(argv)}")
    assert len(runs) == 7 and len(converted) == 6
    runs += [(f"--preset {name}", train.parse_command_line(["--preset", name])[0]) for name in train.PRESETS]
    patterns = layout(text)
    for command, cfg in runs:
        assert {cfg.vision, cfg.text} <= set(converted), command
        for path in files_read(cfg):
            assert any(p.fullmatch(path) for p in patterns), (command, path)


def test_caption_preset_generates_as_the_routing_release():
    cfg = train.parse_command_line(["--preset", "caption-lora"])[0]
    assert (cfg.max_len, cfg.max_new_tokens, cfg.beams, cfg.eval_batch_size or cfg.batch_size) == (50, 19, 5, 40)
