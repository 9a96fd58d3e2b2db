"""data.py: the VQAv2 / Karpathy loaders, answer vocabulary and soft targets, images, collate
functions, the prepared-data cache and the GQA / NLVR2 readers (the world itself: test_shapes.py).

    python -m pytest -q tests/test_data.py
"""
import functools
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes
from eval import vqa_accuracy

N_IMAGES = 240  # 160 train2014 + 80 val2014 (24 val, 24 test, 32 restval): 720 questions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.make_world(out, n_images=N_IMAGES, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(world):
    karpathy = data.read_karpathy(os.path.join(world, "dataset_coco.json"))
    texts = [s["raw"] for img in karpathy for s in img["sentences"]]
    texts += [r["question"] for r in data.read_vqa(world, "train2014")]
    return data.BPETokenizer(**data.learn_bpe(texts, 500))


# ---- answer vocabulary and soft targets -------------------------------------------------------


def test_answer_vocab_counts_every_human_answer_ties_by_string():
    lists = [["Yes"] * 6 + ["no"] * 4, ["two", "2", "2", "3", "3", "3", "a dog", "dog", "dog.", "cat"]]
    assert data.answer_vocab(lists) == ["yes", "no", "2", "3", "dog", "cat"]  # 6, 4, 3, 3 (ties by string), 3, 1
    assert data.answer_vocab(lists, k=3) == ["yes", "no", "2"]


def test_soft_targets_hand_made_with_unanimity_gate():
    vocab = data.AnswerVocab(["yes", "no", "2", "dog", "red", "blue", "wellknown fact"])

    def targets(answers):
        ids, scores = vocab.targets(answers)
        return {vocab.answers[i]: round(s, 6) for i, s in zip(ids, scores)}

    assert targets(["yes"] * 10) == {"yes": 1.0}
    assert targets(["Yes"] * 10) == {}  # gate closed: no normalisation, "yes" != "Yes"
    assert targets(["two"] * 10) == {}  # gate closed: "2" != "two"
    assert targets(["two"] * 9 + ["2"]) == {"2": 1.0}  # gate open: "two" -> "2"
    assert targets([" yes\n"] * 10) == {"yes": 1.0}  # whitespace is stripped before the gate
    assert targets(["red"] * 3 + ["blue"] * 7) == {"red": 0.9, "blue": 1.0}
    assert targets(["red"] * 2 + ["blue"] * 8) == {"red": 0.6, "blue": 1.0}
    assert targets(["red"] + ["Blue."] * 9) == {"red": 0.3, "blue": 1.0}
    assert targets(["a dog", "The dog", "dog", "cat"] + ["x"] * 6) == {"dog": 0.9}
    assert targets(["well-known - fact"] * 4 + ["y"] * 6) == {"wellknown fact": 1.0}
    assert targets(["maybe"] * 10) == {}


def test_soft_targets_equal_accuracy_of_every_answer(world, tok):
    """Sparse targets = vqa_accuracy of ALL K answers, checked by brute force on every question."""
    prepared = data.prepare_vqa(world, tok, cache_dir=None)
    answers = prepared["answers"]
    assert len(answers) == len(set(answers)) and len(answers) < 3129
    assert answers == data.answer_vocab(r["answers"] for r in data.read_vqa(world, "train2014"))
    for name, subtype in (("train", "train2014"), ("val", "val2014")):
        records = data.read_vqa(world, subtype)
        ds = data.VQADataset(prepared["splits"][name])
        assert len(ds) == len(records)
        for m, r in enumerate(records):
            item = ds[m]
            assert item["question_id"] == r["question_id"]
            dense = torch.zeros(len(answers))
            dense[item["target_ids"]] = item["target_scores"]
            expected = torch.tensor([vqa_accuracy(a, r["answers"]) for a in answers])
            assert torch.allclose(dense, expected, atol=1e-6), r


# ---- loaders, datasets, collate ----------------------------------------------------------------


def test_prepare_vqa_official_and_karpathy_splits(world, tok, tmp_path):
    official = data.prepare_vqa(world, tok, cache_dir=str(tmp_path))
    assert {k: len(v["image"]) for k, v in official["splits"].items()} == {"train": 480, "val": 240}
    karpathy = data.prepare_vqa(world, tok, karpathy=os.path.join(world, "dataset_coco.json"),
                                cache_dir=str(tmp_path))
    # Karpathy: train = train2014 + restval images, val and test from val2014
    assert {k: len(set(v["image"])) for k, v in karpathy["splits"].items()} == {"train": 192, "val": 24, "test": 24}
    assert {k: len(v["image"]) for k, v in karpathy["splits"].items()} == {"train": 576, "val": 72, "test": 72}
    split_of = {img["cocoid"]: img["split"] for img in data.read_karpathy(os.path.join(world, "dataset_coco.json"))}
    for name, split in karpathy["splits"].items():
        assert {data.karpathy_split(split_of[i]) for i in split["image_id"].tolist()} == {name}
    item = data.VQADataset(karpathy["splits"]["val"])[0]
    assert item["image"].startswith("val2014/COCO_val2014_") and item["image"].endswith(f"{item['image_id']:012d}.jpg")
    ids = item["input_ids"].tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special=True) == karpathy["splits"]["val"]["question"][0]


def test_question_truncation(tok):
    ids = data.encode_question(tok, "What color is the circle? " * 10, max_len=8)
    assert len(ids) == 8 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    with pytest.raises(ValueError, match="max_len"):
        data.encode_question(tok, "hi", max_len=2)


def test_collate_vqa(world, tok):
    prepared = data.prepare_vqa(world, tok)
    k = len(prepared["answers"])
    images = data.Images(world, size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = data.VQADataset(prepared["splits"]["train"], images=images)
    batch = [ds[i] for i in (0, 5, 7)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=functools.partial(
        data.collate_vqa, pad_id=tok.pad_id, num_answers=k))
    b = next(iter(loader))
    n = max(len(ds[i]["input_ids"]) for i in range(3))
    assert b["input_ids"].shape == b["attention_mask"].shape == (3, n)
    assert b["targets"].shape == (3, k) and b["pixel_values"].shape == (3, 3, 32, 32)
    for i in range(3):
        L = len(ds[i]["input_ids"])
        assert b["attention_mask"][i].tolist() == [1] * L + [0] * (n - L)
        assert (b["input_ids"][i, L:] == tok.pad_id).all()
        assert torch.equal(b["input_ids"][i, :L], ds[i]["input_ids"])
    b = data.collate_vqa(batch, pad_id=tok.pad_id, num_answers=k)
    assert b["question_id"].tolist() == [x["question_id"] for x in batch] and b["image"] == [x["image"] for x in batch]
    assert b["index"].tolist() == [0, 5, 7]
    assert torch.equal(b["targets"][1, batch[1]["target_ids"]], batch[1]["target_scores"])
    assert b["targets"][1].sum() == batch[1]["target_scores"].sum()


def test_captions_and_collate(world, tok):
    prepared = data.prepare_captions(os.path.join(world, "dataset_coco.json"), tok, max_len=12)
    splits = prepared["splits"]
    assert {k: len(v["image"]) for k, v in splits.items()} == {"train": 192, "val": 24, "test": 24}
    assert all(len(refs) == 5 for refs in splits["test"]["refs"])
    ds = data.CaptionDataset(splits["train"])
    assert len(ds) == 5 * 192
    items = [ds[0], ds[1], ds[6]]
    assert items[0]["image"] == "train2014/COCO_train2014_000000000009.jpg" and items[0]["image_id"] == 9
    assert items[2]["image_id"] == splits["train"]["image_id"][1].item()
    assert max(len(x["input_ids"]) for x in items) <= 11  # truncated to max_len - 1 (+ EOS = 12)
    b = data.collate_caption(items, eos_id=tok.eos_id)
    n = max(len(x["input_ids"]) for x in items) + 1
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, n)
    for i, x in enumerate(items):
        L = len(x["input_ids"])
        assert b["input_ids"][i, :L].tolist() == x["input_ids"].tolist() and b["input_ids"][i, L] == tok.eos_id
        assert b["labels"][i, :L + 1].tolist() == x["input_ids"].tolist() + [tok.eos_id]  # every token + one EOS
        assert (b["labels"][i, L + 1:] == -100).all() and b["attention_mask"][i].sum() == L + 1  # never padding
    full = data.prepare_captions(os.path.join(world, "dataset_coco.json"), tok)
    raw = full["splits"]["val"]["refs"][0][0]
    first = data.CaptionDataset(full["splits"]["val"])[0]
    assert tok.decode(first["input_ids"]) == raw


# ---- images ----------------------------------------------------------------------------------


def test_load_image_values_and_hf_parity(tmp_path):
    pixels = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 255, 255], [0, 0, 0]]], dtype=np.uint8)  # (2, 2, 3)
    Image.fromarray(pixels).save(tmp_path / "tiny.png")
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 2.0)
    x = data.load_image(str(tmp_path / "tiny.png"), 2, mean, std)
    expected = (torch.tensor(pixels, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x, expected.permute(2, 0, 1), atol=1e-6)
    # a grey-scale image becomes RGB; resizing equals transformers' ViT image processor
    import transformers
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    rgb = np.random.RandomState(0).randint(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    proc = processor_cls(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    for name in ("big.jpg", "gray.png"):
        with Image.open(tmp_path / name) as im:
            ref = proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        ours = data.load_image(str(tmp_path / name), 32, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
        assert (ours - ref).abs().max() < 1e-5


def test_bad_images_are_clear_errors(tmp_path, world):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        data.load_image(str(tmp_path / "missing.jpg"), 8, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(data.ImageError, match="garbage.jpg"):
        data.load_image(str(tmp_path / "garbage.jpg"), 8, (0.5,) * 3, (0.5,) * 3)
    good = open(os.path.join(world, "train2014", "COCO_train2014_000000000009.jpg"), "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(data.ImageError, match="truncated.jpg"):
        data.load_image(str(tmp_path / "truncated.jpg"), 8, (0.5,) * 3, (0.5,) * 3)
    images = data.Images(str(tmp_path), 8, (0.5,) * 3, (0.5,) * 3)
    ds = data.ImageDataset(["garbage.jpg"], images)
    with pytest.raises(data.ImageError, match="garbage.jpg"):
        ds[0]


def test_image_dataset_over_unique_keys(world, tok):
    prepared = data.prepare_vqa(world, tok)
    keys = sorted(set(prepared["splits"]["val"]["image"]))
    assert len(keys) == 80 and keys == sorted(set(keys))
    ds = data.ImageDataset(keys, data.Images(world, 16, (0.5,) * 3, (0.5,) * 3))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["image"] == keys[:4]
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


# ---- files and the cache ---------------------------------------------------------------------


def test_prepared_cache_is_hit_and_invalidated(world, tok, tmp_path, monkeypatch):
    src = str(tmp_path / "src")
    os.makedirs(src)
    for subtype in ("train2014", "val2014"):
        for p in data.vqa_files(world, subtype):
            with open(p, "rb") as f, open(os.path.join(src, os.path.basename(p)), "wb") as g:
                g.write(f.read())
    calls = []
    real = data.read_vqa
    monkeypatch.setattr(data, "read_vqa", lambda *a: calls.append(a) or real(*a))
    first = data.prepare_vqa(src, tok)
    assert len(calls) == 2 and len(os.listdir(os.path.join(src, "prepared"))) == 1
    second = data.prepare_vqa(src, tok)
    assert len(calls) == 2  # hit
    assert second["answers"] == first["answers"]
    assert torch.equal(second["splits"]["val"]["target_scores"], first["splits"]["val"]["target_scores"])
    data.prepare_vqa(src, tok, max_len=8)
    assert len(calls) == 4  # another option: another entry
    # a changed source file (different content and mtime) invalidates the entry
    q_path = data.vqa_files(src, "val2014")[0]
    q = json.load(open(q_path))
    q["questions"][0]["question"] = "How many squares are there?"
    with open(q_path, "w") as f:
        json.dump(q, f)
    os.utime(q_path, ns=(os.stat(q_path).st_atime_ns, os.stat(q_path).st_mtime_ns + 10**9))
    third = data.prepare_vqa(src, tok)
    assert len(calls) == 6 and third["splits"]["val"]["question"][0] == "How many squares are there?"
    other_tok = data.BPETokenizer(**data.learn_bpe(["How many squares are there?"] * 3, 270))
    data.prepare_vqa(src, other_tok)
    assert len(calls) == 8  # another tokenizer: another entry
    assert not [f for f in os.listdir(os.path.join(src, "prepared")) if f.startswith(".tmp")]


def test_prepared_cache_key_follows_the_code_that_builds_it(world, tok, tmp_path, monkeypatch):
    """A column added to a prepared split (here by data._prompted, which prepare_gqa's build runs) gives a new
    cache entry by itself: the key holds data.code_version(build), no version number that someone must bump."""
    gqa, cache = os.path.join(world, "gqa"), str(tmp_path)
    first = data.prepare_gqa(gqa, tok, cache_dir=cache)
    assert data.prepare_gqa(gqa, tok, cache_dir=cache)["train"].keys() == first["train"].keys()  # a hit
    real = data._prompted

    def with_lengths(tokenizer, prompt, texts, targets, max_len):
        out = real(tokenizer, prompt, texts, targets, max_len)
        return {**out, "input_lengths": out["input_offsets"].diff()}  # a new column

    monkeypatch.setattr(data, "_prompted", with_lengths)
    second = data.prepare_gqa(gqa, tok, cache_dir=cache)
    assert "input_lengths" in second["train"] and "input_lengths" not in first["train"]
    assert len(os.listdir(cache)) == 2


def test_missing_and_malformed_files_name_the_file(tmp_path, tok, world):
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        data.prepare_vqa(str(tmp_path), tok)
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        data.prepare_captions(str(tmp_path / "dataset_coco.json"), tok)
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        data.read_karpathy(str(tmp_path / "dataset_coco.json"))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"cocoid": 1, "split": "holdout"}]}))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        data.read_karpathy(str(tmp_path / "dataset_coco.json"))
    q_path, a_path = data.vqa_files(world, "val2014")
    a = json.load(open(a_path))
    a["annotations"] = a["annotations"][1:]
    with open(data.vqa_files(str(tmp_path), "val2014")[1], "w") as f:
        json.dump(a, f)
    with open(q_path) as f, open(data.vqa_files(str(tmp_path), "val2014")[0], "w") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match="240 questions but .* 239 annotations"):
        data.read_vqa(str(tmp_path), "val2014")


# ---- GQA and NLVR2 readers on hand-written official-format snippets ---------------------------


def gqa_question(image_id, question, answer, structural="query", semantic="attr", **extra):
    """One question as in questions1.2's *_balanced_questions.json (the fields the readers see)."""
    return dict({"imageId": image_id, "question": question, "answer": answer, "fullAnswer": f"It is {answer}.",
                 "isBalanced": True, "groups": {"global": None, "local": "10c-cup_color"},
                 "types": {"structural": structural, "semantic": semantic, "detailed": "typeVerifyC"},
                 "entailed": [], "equivalent": [], "semanticStr": "select: cup ->query: color",
                 "semantic": [{"operation": "select", "argument": "cup (5)", "dependencies": []},
                              {"operation": "query", "argument": "color", "dependencies": [0]}],
                 "annotations": {"answer": {}, "question": {}, "fullAnswer": {}}}, **extra)


def test_read_gqa_records_and_image_keys(tmp_path):
    questions = {"07333408": gqa_question("2375429", "What color is the cup?", "white"),
                 "201307251": gqa_question("n161313", "Is the plate round?", "yes", "verify", "attr")}
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    (tmp_path / "images").mkdir()
    for image_id in ("2375429", "n161313"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{image_id}.jpg")
    records = data.read_gqa(str(path), str(tmp_path / "images"))
    assert records == [
        {"question_id": "07333408", "image_id": "2375429", "image": "2375429.jpg", "question": "What color is the cup?",
         "answer": "white", "types": {"structural": "query", "semantic": "attr", "detailed": "typeVerifyC"}},
        {"question_id": "201307251", "image_id": "n161313", "image": "n161313.jpg", "question": "Is the plate round?",
         "answer": "yes", "types": {"structural": "verify", "semantic": "attr", "detailed": "typeVerifyC"}}]
    assert data.read_gqa(str(path)) == records  # without images_dir nothing is looked up
    assert data.GQA_QUESTIONS.format("testdev") == path.name


def test_read_gqa_errors(tmp_path):
    path = tmp_path / "q.json"
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "1.jpg")
    cases = [
        ({"a": gqa_question("1", "Q?", "x"), "b": gqa_question("2", "Q?", "y")}, FileNotFoundError,
         r"question b: image not found: .*images/2\.jpg"),
        ({"a": {k: v for k, v in gqa_question("1", "Q?", "x").items() if k != "answer"}}, ValueError,
         "question a has no string field 'answer'"),  # e.g. test_balanced_questions.json
        ({"a": gqa_question(1, "Q?", "x")}, ValueError, "question a has no string field 'imageId'"),
        ({"a": gqa_question("1", "Q?", "x", types={"detailed": "x"})}, ValueError, "question a has no 'types'"),
        ([gqa_question("1", "Q?", "x")], ValueError, "not a GQA questions file"),
        ({}, ValueError, "not a GQA questions file"),
    ]
    for questions, error, message in cases:
        path.write_text(json.dumps(questions))
        with pytest.raises(error, match=message):
            data.read_gqa(str(path), str(tmp_path / "images"))
    path.write_text("{")
    with pytest.raises(ValueError, match="q.json: malformed JSON"):
        data.read_gqa(str(path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        data.read_gqa(str(tmp_path / "missing.json"))


def nlvr2_line(identifier, label="True", sentence="The left image has more dogs.", **extra):
    """One line of nlvr2/data/{train,dev,test1}.json (a subset of the real fields, plus extra)."""
    return json.dumps(dict({"validation": {"77": label}, "sentence": sentence, "left_url": "http://a/l.jpg",
                            "writer": "103", "label": label, "right_url": "http://a/r.jpg", "synset": "dog",
                            "query": "dogs12", "identifier": identifier}, **extra))


def test_read_nlvr2_records_and_image_layout(tmp_path):
    lines = {"train.json": [nlvr2_line("train-10171-0-0", "False", directory=11),
                            nlvr2_line("train-10171-0-1", directory="11")],
             "dev.json": [nlvr2_line("dev-850-2-0"), "", nlvr2_line("dev-850-3-0", "False")],
             "test1.json": [nlvr2_line("test1-0-1-1")]}
    for name, rows in lines.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    train = data.read_nlvr2(str(tmp_path / "train.json"))
    assert train == [
        {"identifier": "train-10171-0-0", "sentence": "The left image has more dogs.", "label": False,
         "images": ["images/train/11/train-10171-0-img0.png", "images/train/11/train-10171-0-img1.png"]},
        {"identifier": "train-10171-0-1", "sentence": "The left image has more dogs.", "label": True,
         "images": ["images/train/11/train-10171-0-img0.png", "images/train/11/train-10171-0-img1.png"]}]
    dev = data.read_nlvr2(str(tmp_path / "dev.json"))
    assert [(r["label"], r["images"]) for r in dev] == [
        (True, ["dev/dev-850-2-img0.png", "dev/dev-850-2-img1.png"]),
        (False, ["dev/dev-850-3-img0.png", "dev/dev-850-3-img1.png"])]
    assert data.read_nlvr2(str(tmp_path / "test1.json"))[0]["images"] == ["test1/test1-0-1-img0.png",
                                                                          "test1/test1-0-1-img1.png"]
    # with the images folder: every image must be there
    for key in dev[0]["images"] + dev[1]["images"]:
        (tmp_path / "nlvr2" / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "nlvr2" / key, format="JPEG")  # not a PNG inside, as some are
    assert data.read_nlvr2(str(tmp_path / "dev.json"), str(tmp_path / "nlvr2")) == dev
    os.remove(tmp_path / "nlvr2" / "dev" / "dev-850-3-img1.png")
    with pytest.raises(FileNotFoundError, match=r"dev.json: example dev-850-3-0: image not found: .*dev-850-3-img1.png"):
        data.read_nlvr2(str(tmp_path / "dev.json"), str(tmp_path / "nlvr2"))


@pytest.mark.parametrize("bad,message", [
    ('{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"', "line 2: not valid JSON"),
    ('["dev-1-0-0", "True"]', "line 2: not a JSON object"),
    (nlvr2_line("dev-1-0"), "line 2: identifier must look like split-set_id-pair_id-sentence_id"),
    (nlvr2_line("dev-850-2-0"), "line 2: identifier dev-850-2-0 repeats an earlier line"),
    (nlvr2_line("dev-1-0-0", "true"), "line 2: label must be \"True\" or \"False\""),
    (nlvr2_line("dev-1-0-0", sentence=None), "line 2: no string field 'sentence'"),
    (nlvr2_line("train-1-0-0"), "line 2: a train example needs its image folder number 'directory'"),
    (nlvr2_line("train-1-0-0", directory="../x"), "line 2: a train example needs"),
])
def test_read_nlvr2_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "dev.json"
    path.write_text(nlvr2_line("dev-850-2-0") + "\n" + bad + "\n" + nlvr2_line("dev-850-3-0") + "\n")
    with pytest.raises(ValueError, match=f"dev.json, {re.escape(message)}"):
        data.read_nlvr2(str(path))


def test_read_nlvr2_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="NLVR2 file not found: .*test1.json"):
        data.read_nlvr2(str(tmp_path / "test1.json"))
    (tmp_path / "test1.json").write_text("\n")
    with pytest.raises(ValueError, match="test1.json has no lines"):
        data.read_nlvr2(str(tmp_path / "test1.json"))


# ---- GQA and NLVR2 prepared for a generative model ---------------------------------------------------


def test_seq2seq_targets_and_collate_prompted():
    """BART's teacher forcing: decoder inputs = the targets shifted right behind the start token </s> (2),
    padded with <pad> (1); labels = the targets, padded with -100."""
    dec, labels = data.seq2seq_targets([[0, 5, 2], torch.tensor([0, 6, 7, 2])], start_id=2, pad_id=1)
    assert dec.tolist() == [[2, 0, 5, 1], [2, 0, 6, 7]] and labels.tolist() == [[0, 5, 2, -100], [0, 6, 7, 2]]
    items = [{"index": 3, "image": ("a", "b"), "input_ids": torch.tensor([0, 9, 2]), "target_ids": torch.tensor([0, 5, 2])},
             {"index": 4, "image": ("c", "d"), "input_ids": torch.tensor([0, 8, 8, 2]), "target_ids": torch.tensor([0, 2])}]
    batch = data.collate_prompted(items, pad_id=1, start_id=2)
    assert batch["input_ids"].tolist() == [[0, 9, 2, 1], [0, 8, 8, 2]] and batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1] * 4]
    assert batch["decoder_input_ids"].tolist() == [[2, 0, 5], [2, 0, 1]] and batch["labels"].tolist() == [[0, 5, 2], [0, 2, -100]]
    assert batch["image"] == [("a", "b"), ("c", "d")] and batch["index"].tolist() == [3, 4]


def test_prepare_gqa_and_nlvr2(world, tok, tmp_path):
    """The prepared columns are the official files' records with <s> prompt + text </s> and <s> target </s>;
    GQA trains on train + val and evaluates on testdev (VL-PET's split); an NLVR2 item holds its image pair."""
    gqa = data.prepare_gqa(os.path.join(world, "gqa"), tok, "gpa: ", max_len=12, cache_dir=str(tmp_path))
    questions = os.path.join(world, "gqa", "questions1.2", "{}_balanced_questions.json")
    train = data.read_gqa(questions.format("train")) + data.read_gqa(questions.format("val"))
    assert sorted(gqa) == ["testdev", "train"] and gqa["train"]["question_id"] == [r["question_id"] for r in train]
    for m in (0, len(train) - 1):
        item = data.PromptDataset(gqa["train"])[m]
        assert item["input_ids"].tolist() == data.encode_question(tok, "gpa: " + train[m]["question"], 12)
        assert item["target_ids"].tolist() == tok.wrap(tok.encode(train[m]["answer"])) and item["image"] == train[m]["image"]
    assert gqa["testdev"]["answer"] == [r["answer"] for r in data.read_gqa(questions.format("testdev"))]
    nlvr2 = data.prepare_nlvr2(os.path.join(world, "nlvr2"), tok, "nlvr: ", cache_dir=str(tmp_path))
    records = data.read_nlvr2(os.path.join(world, "nlvr2", "data", "dev.json"))
    assert sorted(nlvr2) == ["dev", "test1", "train"] and nlvr2["dev"]["label"].tolist() == [r["label"] for r in records]
    images = data.Images(os.path.join(world, "nlvr2"), 32, (0.5,) * 3, (0.5,) * 3)
    item = data.PromptDataset(nlvr2["dev"], images)[0]
    assert item["image"] == tuple(records[0]["images"]) and item["pixel_values"].shape == (2, 3, 32, 32)
    assert item["target_ids"].tolist() == tok.wrap(tok.encode("true" if records[0]["label"] else "false"))
    assert item["input_ids"].tolist() == tok.wrap(tok.encode("nlvr: " + records[0]["sentence"]))  # not cut
