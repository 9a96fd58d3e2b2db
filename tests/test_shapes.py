"""shapes.py's synthetic world: the VQAv2, COCO / Karpathy, GQA and NLVR2 files in the official
formats, deterministic, agreeing with the drawn scenes, and needing the image on every task.

    python -m pytest -q tests/test_shapes.py
"""
import filecmp
import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import models
import shapes
from eval import normalize_answer, vqa_accuracy

N_IMAGES = 240  # 160 train2014 + 80 val2014 (24 val, 24 test, 32 restval): 720 VQA questions
GQA_PER_IMAGE = 3
NLVR2_SETS = 40  # 28 train, 6 dev, 6 test1 sets of 4 pairs x 2 sentences: 320 examples, 320 images

# The colours as drawn (RGB), written out here rather than read from shapes.py,
# so that a wrong table there shows.
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 210, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.make_world(out, n_images=N_IMAGES, seed=0, gqa_per_image=GQA_PER_IMAGE, nlvr2_sets=NLVR2_SETS)
    return out


@pytest.fixture(scope="module")
def scenes(world):
    return json.load(open(os.path.join(world, "shapes_scenes.json")))


def world_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---- VQAv2, COCO captions, Karpathy ----------------------------------------------------------------


def test_world_has_the_real_formats(world):
    for subtype, n in (("train2014", 160), ("val2014", 80)):
        q_path, a_path = data.vqa_files(world, subtype)
        q, a = json.load(open(q_path)), json.load(open(a_path))
        assert set(q) == {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
        assert set(a) == {"info", "license", "data_subtype", "annotations", "data_type"}
        assert q["data_subtype"] == a["data_subtype"] == subtype and q["task_type"] == "Open-Ended"
        assert len({x["image_id"] for x in q["questions"]}) == n and len(q["questions"]) == 3 * n
        for x in q["questions"]:
            assert set(x) == {"image_id", "question", "question_id"}
        for x in a["annotations"]:
            assert set(x) == {"question_type", "multiple_choice_answer", "answers", "image_id",
                              "answer_type", "question_id"}
            assert x["answer_type"] in ("yes/no", "number", "other")
            assert [y["answer_id"] for y in x["answers"]] == list(range(1, 11))
            assert all(set(y) == {"answer", "answer_confidence", "answer_id"} for y in x["answers"])
            assert all(y["answer_confidence"] in ("yes", "maybe", "no") for y in x["answers"])
        for x in q["questions"]:
            with Image.open(os.path.join(world, data.coco_image_key(subtype, x["image_id"]))) as im:
                assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
    k = json.load(open(os.path.join(world, "dataset_coco.json")))
    assert set(k) == {"images", "dataset"}
    assert Counter(img["split"] for img in k["images"]) == {"train": 160, "restval": 32, "val": 24, "test": 24}
    sentids = [s["sentid"] for img in k["images"] for s in img["sentences"]]
    assert sorted(sentids) == list(range(5 * N_IMAGES))
    for img in k["images"]:
        assert set(img) == {"filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"}
        assert len(img["sentences"]) == 5 and len({s["raw"] for s in img["sentences"]}) == 5
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        assert all(set(s) == {"tokens", "raw", "imgid", "sentid"} and s["imgid"] == img["imgid"] for s in img["sentences"])
        assert os.path.isfile(os.path.join(world, img["filepath"], img["filename"]))


def test_world_is_deterministic(world, tmp_path):
    """The same seed gives the same bytes (from the CLI too), another seed other bytes, in every part."""
    cli, again, other = (str(tmp_path / name) for name in ("cli", "again", "other"))
    shapes.main(["world", "--out", cli, "--n-images", str(N_IMAGES), "--seed", "0"])
    shapes.make_world(again, n_images=N_IMAGES, seed=0)
    shapes.make_world(other, n_images=N_IMAGES, seed=1)
    files = world_files(cli)
    # COCO images, GQA's (all but the 24 Karpathy val images), NLVR2 pairs (4 per set, N_IMAGES // 20 sets),
    # 4 VQA + Karpathy + 3 GQA + 3 NLVR2 files, the scenes, the version
    assert len(files) == 2 * N_IMAGES - 24 + 8 * (N_IMAGES // 20) + 13 and shapes.VERSION_FILE in files
    match, mismatch, errors = filecmp.cmpfiles(cli, again, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    _, mismatch, missing = filecmp.cmpfiles(cli, other, files, shallow=False)
    assert len(mismatch) > len(files) // 2  # missing: NLVR2 train pairs in other (random) folders
    assert missing and all(path.startswith(os.path.join("nlvr2", "images", "train", "")) for path in missing)
    for name in ("dataset_coco.json", "shapes_scenes.json", shapes.gqa_files(".", "testdev")[0],
                 shapes.nlvr2_files(".", "test1")[0], "gqa/images/2300000.jpg", "nlvr2/dev/dev-0-0-img0.png"):
        assert os.path.normpath(name) in mismatch


def test_questions_need_the_image(world, scenes):
    """A text-only prior (the most frequent answer per question type, and even per exact question
    string) scores far below an oracle that knows the scene, with the official accuracy."""
    train, val = data.read_vqa(world, "train2014"), data.read_vqa(world, "val2014")
    truth = {q["question_id"]: q["answer"] for q in scenes["questions"]}
    per_type, per_string = defaultdict(Counter), defaultdict(Counter)
    for r in train:
        per_type[r["question_type"]].update(normalize_answer(a) for a in r["answers"])
        per_string[r["question"]].update(normalize_answer(a) for a in r["answers"])

    def score(predict):
        return 100 * sum(vqa_accuracy(predict(r), r["answers"]) for r in val) / len(val)

    prior_type = score(lambda r: per_type[r["question_type"]].most_common(1)[0][0])
    prior_string = score(lambda r: (per_string.get(r["question"]) or per_type[r["question_type"]]).most_common(1)[0][0])
    oracle = score(lambda r: truth[r["question_id"]])
    assert prior_type < 45 and prior_string < 55 and oracle > 95, (prior_type, prior_string, oracle)
    # the answers of each answer type are spread out, not dominated by one answer
    for atype in ("yes/no", "number", "other"):
        counts = Counter(truth[r["question_id"]] for r in train + val if r["answer_type"] == atype)
        assert counts.most_common(1)[0][1] / sum(counts.values()) < 0.55, (atype, counts)


def test_scenes_match_questions(world, scenes):
    """The stored truth agrees with the drawn objects (counts, existence, colours, sides), and the
    human answers mostly agree with the truth."""
    objects = {s["image_id"]: s["objects"] for s in scenes["images"]}
    truth = {q["question_id"]: q["answer"] for q in scenes["questions"]}
    checked = Counter()
    for r in data.read_vqa(world, "train2014") + data.read_vqa(world, "val2014"):
        objs, q, t = objects[r["image_id"]], r["question"], truth[r["question_id"]]
        if q in ("How many shapes are there?", "How many objects are in the picture?"):
            checked["count"] += t == str(len(objs))
        elif q.startswith("Are there any "):
            checked["exist"] += (t == "yes") == any(o["shape"] == q[len("Are there any "):-2] for o in objs)
        elif q.startswith("What color is the "):
            checked["color"] += [o["color"] for o in objs if o["shape"] == q[len("What color is the "):-1]] == [t]
        elif q.endswith(" on the left or on the right?"):
            name = q[len("Is the "):-len(" on the left or on the right?")]
            checked["side"] += [o["quadrant"].split()[1] for o in objs if f"{o['color']} {o['shape']}" == name] == [t]
        else:
            continue
        checked["total"] += 1
        assert vqa_accuracy(t, r["answers"]) >= 0.6, (q, t, r["answers"])
    assert checked["total"] > 100 and checked["count"] + checked["exist"] + checked["color"] + checked["side"] == checked["total"]


def test_captions_need_the_image(world):
    """A blind captioner (the most frequent training caption, for every image) against a human-like
    oracle (each test image's first reference, scored against the other four), CIDEr-D."""
    karpathy = os.path.join(world, "dataset_coco.json")
    train = Counter(s["raw"] for img in E.karpathy_images(karpathy, "train") for s in img["sentences"])
    refs = {img["cocoid"]: [s["raw"] for s in img["sentences"]] for img in E.karpathy_images(karpathy, "test")}
    others = {k: [E.ptb_tokenize(s) for s in v[1:]] for k, v in refs.items()}
    blind = E.caption_scores(others, {k: train.most_common(1)[0][0] for k in refs})["CIDEr"]
    oracle = E.caption_scores(others, {k: v[0] for k, v in refs.items()})["CIDEr"]
    assert blind < 0.5 * oracle and oracle > 1.0, (blind, oracle)


# ---- GQA ---------------------------------------------------------------------------------------------

GQA_FIELDS = {"semantic", "entailed", "equivalent", "question", "imageId", "isBalanced", "groups", "answer",
              "semanticStr", "annotations", "types", "fullAnswer"}
SPLIT_OF_KARPATHY = {"train": "train", "restval": "val", "val": None, "test": "testdev"}  # None: not in GQA


def gqa_questions(world, split):
    return json.load(open(shapes.gqa_files(world, split)[0]))


def test_gqa_files_have_the_official_format(world, scenes, tmp_path):
    split_of = {img["cocoid"]: SPLIT_OF_KARPATHY[img["split"]]
                for img in data.read_karpathy(os.path.join(world, "dataset_coco.json"))}
    by_gqa_id = {s["gqa_image_id"]: s for s in scenes["images"] if s["gqa_image_id"]}
    assert len(by_gqa_id) == N_IMAGES - 24  # all but the Karpathy val images
    n = 0
    for split in ("train", "val", "testdev"):
        path, images = shapes.gqa_files(world, split)
        assert path == os.path.join(world, "gqa", "questions1.2", f"{split}_balanced_questions.json")
        assert images == os.path.join(world, "gqa", "images")
        records = data.read_gqa(path, images)  # every image is there
        questions = gqa_questions(world, split)
        assert [r["question_id"] for r in records] == list(questions) and len(records) > 50
        n += len(records)
        for qid, q in questions.items():
            assert set(q) == GQA_FIELDS and qid.isdigit() and q["equivalent"] == [qid] and q["entailed"] == []
            assert isinstance(q["imageId"], str) and q["isBalanced"] is True
            assert split_of[by_gqa_id[q["imageId"]]["image_id"]] == split  # test images are GQA's testdev
            assert q["answer"] == q["answer"].lower() and q["answer"].isalpha()
            assert q["question"].endswith("?") and q["question"][0].isupper() and q["fullAnswer"].endswith(".")
            assert set(q["groups"]) == {"global", "local"} and set(q["types"]) == {"structural", "semantic", "detailed"}
            assert q["types"]["structural"] in ("query", "verify", "logical", "choose", "compare")
            assert q["types"]["semantic"] in ("obj", "attr", "rel") and q["types"]["detailed"].isalpha()
            assert (q["types"]["structural"] in ("verify", "logical", "compare")) == (q["answer"] in ("yes", "no"))
            assert set(q["annotations"]) == {"answer", "question", "fullAnswer"}
            for i, op in enumerate(q["semantic"]):  # a program: each step depends on earlier ones only
                assert set(op) == {"operation", "dependencies", "argument"} and all(d < i for d in op["dependencies"])
            steps = [f"{op['operation']}: {op['argument']}" for op in q["semantic"]]
            steps = [step + (f" {op['dependencies']}" if op["dependencies"] else "") for step, op in zip(steps, q["semantic"])]
            assert q["semanticStr"] == "->".join(steps)
            objects = {o["id"]: o for o in gqa_objects(by_gqa_id[q["imageId"]])}
            for field in ("question", "fullAnswer"):  # annotations point at the words naming the object
                words = q[field].rstrip("?.").split()
                for span, obj in q["annotations"][field].items():
                    start, end = map(int, span.split(":")) if ":" in span else (int(span), int(span) + 1)
                    *color, shape = words[start:end]
                    assert shape in (objects[obj]["shape"], "shape") and color in ([], [objects[obj]["color"]]), (q, span)
        # the images: the same JPEG as the scene's COCO image
        for image_id in sorted({q["imageId"] for q in questions.values()})[:20]:
            coco = by_gqa_id[image_id]["image"]
            assert filecmp.cmp(os.path.join(images, data.gqa_image_key(image_id)), os.path.join(world, coco), shallow=False)
    assert n > 0.8 * GQA_PER_IMAGE * N_IMAGES  # fewer where a scene supports few question types
    # the official scoring reads the file: a perfect prediction file scores 100 %
    questions = gqa_questions(world, "testdev")
    results = tmp_path / "gqa_results.json"
    results.write_text(json.dumps([{"questionId": qid, "prediction": q["answer"]} for qid, q in questions.items()]))
    metrics = E.score_gqa_files(str(results), shapes.gqa_files(world, "testdev")[0])
    assert metrics["accuracy"] == metrics["binary"] == metrics["open"] == 100.0
    assert metrics["n_questions"] == len(questions)
    assert set(metrics["accuracyPerStructuralType"]) == {"query", "verify", "logical", "choose", "compare"}


def gqa_objects(scene):
    """The scene's objects with GQA's object ids as the question files use them (the scene's number
    times 4 plus the object's index, from 1000000)."""
    i = int(scene["gqa_image_id"]) - 2300000
    return [dict(o, id=str(1000000 + 4 * i + k)) for k, o in enumerate(scene["objects"])]


def cell(o):
    """(row, column) of an object: 0 = top / left."""
    vertical, horizontal = o["quadrant"].split()
    return int(vertical == "bottom"), int(horizontal == "right")


def holds(a, b, rel):
    (ra, ca), (rb, cb) = cell(a), cell(b)
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


REL = r"(to the left of|to the right of|above|below)"
NAME = r"((?:\w+ )?(?:circle|square|triangle|shape))"


def the(objects, name):
    """The one object a name picks out: "circle", "red shape", "red circle"."""
    *color, shape = name.split()
    found = [o for o in objects if (shape == "shape" or o["shape"] == shape) and (not color or o["color"] == color[0])]
    assert len(found) == 1, (name, objects)
    return found[0]


def related(objects, noun, rel, b):
    """The one object `noun` ("shape" or a shape) that is `rel` object b."""
    found = [o for o in objects if o is not b and holds(o, b, rel) and noun in ("shape", o["shape"])]
    assert len(found) == 1, (noun, rel, b, objects)
    return found[0]


def has(objects, color, shape):
    return any((o["color"], o["shape"]) == (color, shape) for o in objects)


def gqa_oracle(question, objects):
    """The answer to a world GQA question, worked out here from the objects alone."""
    yes = {True: "yes", False: "no"}
    if m := re.fullmatch(f"What is the color of the (\\w+) {REL} the {NAME}\\?", question):
        return related(objects, m[1], m[2], the(objects, m[3]))["color"]
    if m := re.fullmatch(f"Which shape is {REL} the {NAME}\\?", question):
        return related(objects, "shape", m[1], the(objects, m[2]))["shape"]
    if m := re.fullmatch(f"Is there a (\\w+) {REL} the {NAME}\\?", question):
        b = the(objects, m[3])
        return yes[any(o is not b and o["shape"] == m[1] and holds(o, b, m[2]) for o in objects)]
    if m := re.fullmatch(f"Is the (\\w+) {REL} the {NAME} (\\w+) or (\\w+)\\?", question):
        color = related(objects, m[1], m[2], the(objects, m[3]))["color"]
        assert color in (m[4], m[5]), question
        return color
    if m := re.fullmatch(f"Is the (\\w+) {REL} the {NAME} (red|green|blue|yellow|purple|orange)\\?", question):
        return yes[related(objects, m[1], m[2], the(objects, m[3]))["color"] == m[4]]
    if m := re.fullmatch(f"Is the {NAME} {REL} the {NAME}\\?", question):
        return yes[holds(the(objects, m[1]), the(objects, m[3]), m[2])]
    if m := re.fullmatch(f"Is the {NAME} (?:to the (left|right) or to the (left|right) of|(above|below) or (above|below)) "
                         f"the {NAME}\\?", question):
        a, b = the(objects, m[1]), the(objects, m[6])
        options = [w for w in m.groups()[1:5] if w]
        answers = [w for w in options if holds(a, b, w if w in ("above", "below") else f"to the {w} of")]
        assert sorted(options) in (["left", "right"], ["above", "below"]) and len(answers) == 1, question
        return answers[0]
    if m := re.fullmatch(f"Are the {NAME} and the {NAME} the same (color|shape)\\?", question):
        return yes[the(objects, m[1])[m[3]] == the(objects, m[2])[m[3]]]
    if m := re.fullmatch(r"Are there both an? (\w+) (\w+) and an? (\w+) (\w+)\?", question):
        return yes[has(objects, m[1], m[2]) and has(objects, m[3], m[4])]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) or an? (\w+) (\w+)\?", question):
        return yes[has(objects, m[1], m[2]) or has(objects, m[3], m[4])]
    raise AssertionError(f"a GQA question of no known form: {question}")


def nearest_color(pixel):
    return min(RGB, key=lambda c: sum((int(p) - v) ** 2 for p, v in zip(pixel, RGB[c])))


def check_pixels(path, objects):
    """The image shows the objects: each object's colour at its centre, grey background at the
    centre of each empty quadrant."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))  # (H, W, 3)
    for o in objects:
        assert nearest_color(pixels[o["y"], o["x"]]) == o["color"], (path, o)
    for q, (y, x) in zip(("top left", "top right", "bottom left", "bottom right"), ((16, 16), (16, 48), (48, 16), (48, 48))):
        if all(o["quadrant"] != q for o in objects):
            assert np.ptp(pixels[y, x].astype(int)) < 40, (path, q, pixels[y, x])  # grey: r ~ g ~ b


def test_gqa_answers_agree_with_scenes(world, scenes):
    by_gqa_id = {s["gqa_image_id"]: s for s in scenes["images"] if s["gqa_image_id"]}
    forms = Counter()
    for split in ("train", "val", "testdev"):
        for q in gqa_questions(world, split).values():
            objects = by_gqa_id[q["imageId"]]["objects"]
            assert gqa_oracle(q["question"], objects) == q["answer"], (q["question"], objects)
            forms[q["types"]["detailed"]] += 1
    assert len(forms) >= 15 and min(forms.values()) >= 5, forms  # every template, both answers of the binary ones
    for scene in list(by_gqa_id.values())[::7]:
        check_pixels(os.path.join(shapes.gqa_files(world, "val")[1], f"{scene['gqa_image_id']}.jpg"), scene["objects"])


def test_gqa_answers_are_balanced(world, scenes):
    """Per template, no answer is much more frequent than another: the question text alone says little."""
    per_template = defaultdict(Counter)
    for q in scenes["gqa_questions"]:
        per_template[q["template"]][q["answer"]] += 1
    assert len(per_template) == 11
    for template, counts in per_template.items():  # yes / no, 3 shapes, 4 sides, 6 colours
        assert len(counts) in (2, 3, 4, 6) and max(counts.values()) - min(counts.values()) <= 3, (template, counts)


# ---- NLVR2 --------------------------------------------------------------------------------------------

NLVR2_FIELDS = {"validation", "sentence", "left_url", "writer", "label", "right_url", "synset", "query", "identifier"}


def nlvr2_lines(world, split):
    return [json.loads(line) for line in open(shapes.nlvr2_files(world, split)[0])]


def test_nlvr2_files_have_the_official_format(world, tmp_path):
    sets = Counter()
    for split, n_sets in (("train", 28), ("dev", 6), ("test1", 6)):
        path, images = shapes.nlvr2_files(world, split)
        assert path == os.path.join(world, "nlvr2", "data", f"{split}.json") and images == os.path.join(world, "nlvr2")
        records = data.read_nlvr2(path, images)  # every image is there
        lines = nlvr2_lines(world, split)
        assert [r["identifier"] for r in records] == [x["identifier"] for x in lines] and len(lines) == 8 * n_sets
        sentences = defaultdict(set)
        for x, r in zip(lines, records):
            extra = {"directory"} if split == "train" else {"extra_validations"}
            assert set(x) == NLVR2_FIELDS | extra and x["label"] in ("True", "False")
            part, set_id, pair, sentence = x["identifier"].split("-")
            assert part == split and pair in "0123" and sentence in "01"
            sets[(split, set_id)] += 1
            sentences[(set_id, sentence)].add(x["sentence"])
            assert list(x["validation"].values()) == [x["label"]] and x["writer"].isdigit()
            if split == "train":
                assert type(x["directory"]) is int and 0 <= x["directory"] < 100
            else:
                assert len(x["extra_validations"]) == 4 and set(x["extra_validations"].values()) <= {"True", "False"}
            assert x["left_url"].endswith(os.path.basename(r["images"][0]))
            assert x["right_url"].endswith(os.path.basename(r["images"][1]))
            assert r["images"][0].endswith(f"{split}-{set_id}-{pair}-img0.png")
            for key in r["images"]:  # as many of NLVR2's images: JPEG bytes under a .png name
                with Image.open(os.path.join(images, key)) as im:
                    assert im.format == "JPEG" and im.size == (64, 64)
        assert all(len(s) == 1 for s in sentences.values())  # one sentence per set and sentence id
    assert set(sets.values()) == {8}  # 4 pairs x 2 sentences
    # the official metrics read the files: a perfect prediction file scores 1.0
    results = tmp_path / "nlvr2_results.csv"
    results.write_text("".join(f"{x['identifier']},{x['label']}\n" for x in nlvr2_lines(world, "test1")))
    metrics = E.score_nlvr2_files(str(results), shapes.nlvr2_files(world, "test1")[0])
    assert metrics == {"accuracy": 1.0, "consistency": 1.0, "n_examples": 48, "n_sentences": 12}


def nlvr2_oracle(sentence, left, right):
    """The truth of a world NLVR2 sentence, worked out here from the two images' objects alone."""
    m = re.fullmatch(r"(?:Both images contain|Each image contains|There is) an? (\w+)( shape)?( in both images)?\.", sentence)
    if not m or (m[3] is None) == sentence.startswith("There is"):
        raise AssertionError(f"an NLVR2 sentence of no known form: {sentence}")
    return all(any(o["color" if m[2] else "shape"] == m[1] for o in objs) for objs in (left, right))


def test_nlvr2_labels_agree_with_scenes(world, scenes):
    objects = scenes["nlvr2_images"]
    for split in ("train", "dev", "test1"):
        for r in data.read_nlvr2(shapes.nlvr2_files(world, split)[0]):
            left, right = (objects[key] for key in r["images"])
            assert nlvr2_oracle(r["sentence"], left, right) == r["label"], (r, left, right)
    assert len(objects) == 8 * NLVR2_SETS
    for key, objs in list(objects.items())[::5]:
        check_pixels(os.path.join(world, "nlvr2", key), objs)


def test_nlvr2_labels_are_balanced(world, scenes):
    """About half of each template's examples are true, and most sentences are true for some of
    their image pairs and false for others (so consistency means something)."""
    per_template, per_sentence = defaultdict(Counter), defaultdict(set)
    for split in ("train", "dev", "test1"):
        for x in nlvr2_lines(world, split):
            per_template[scenes["nlvr2_templates"][x["identifier"]]][x["label"]] += 1
            per_sentence[E.nlvr2_sentence(x["identifier"])].add(x["label"])
    assert len(per_template) == len(shapes.NLVR2_TEMPLATES)
    for template, counts in per_template.items():
        assert abs(counts["True"] - counts["False"]) <= 2, (template, counts)
    assert sum(len(labels) == 2 for labels in per_sentence.values()) >= 0.8 * len(per_sentence)


def test_every_nlvr2_statement_depends_on_both_images():
    """Each template's truth, from the generator itself, changes with the left image for some right image and
    with the right image for some left one: no statement can be judged from one image of the pair."""
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng)[1] for _ in range(60)]
    for template in shapes.NLVR2_TEMPLATES:
        for _ in range(10):
            _, truth, _ = shapes._nlvr2_statement(rng, template)
            table = [[truth(left, right) for right in scenes] for left in scenes]
            assert any(len(set(row)) == 2 for row in table) and any(len(set(col)) == 2 for col in zip(*table)), template


# ---- blind models against oracles, with the official metrics -------------------------------------------


def test_gqa_and_nlvr2_need_the_image(world, scenes, tmp_path):
    """Text-only priors fitted on train (the most frequent answer per question template, per exact
    question string; the most frequent label per sentence, per template) score far below oracles
    that work the answers out from the scenes (gqa_oracle, nlvr2_oracle), on held-out splits."""
    template = {q["question_id"]: q["template"] for q in scenes["gqa_questions"]}
    by_gqa_id = {s["gqa_image_id"]: s["objects"] for s in scenes["images"] if s["gqa_image_id"]}
    per_template, per_string = defaultdict(Counter), defaultdict(Counter)
    for qid, q in gqa_questions(world, "train").items():
        per_template[template[qid]][q["answer"]] += 1
        per_string[q["question"]][q["answer"]] += 1
    held_out = {**gqa_questions(world, "val"), **gqa_questions(world, "testdev")}
    path = tmp_path / "held_out_balanced_questions.json"
    path.write_text(json.dumps(held_out))

    def gqa_accuracy(predict):
        results = tmp_path / "gqa_results.json"
        results.write_text(json.dumps([{"questionId": qid, "prediction": predict(qid, q)} for qid, q in held_out.items()]))
        return E.score_gqa_files(str(results), str(path))["accuracy"]

    prior_template = gqa_accuracy(lambda qid, q: per_template[template[qid]].most_common(1)[0][0])
    prior_string = gqa_accuracy(lambda qid, q: (per_string.get(q["question"]) or per_template[template[qid]])
                                .most_common(1)[0][0])
    oracle = gqa_accuracy(lambda qid, q: gqa_oracle(q["question"], by_gqa_id[q["imageId"]]))
    assert prior_template < 50 and prior_string < 50 and oracle == 100, (prior_template, prior_string, oracle)

    objects, templates = scenes["nlvr2_images"], scenes["nlvr2_templates"]
    per_template, per_sentence = defaultdict(Counter), defaultdict(Counter)
    for x in data.read_nlvr2(shapes.nlvr2_files(world, "train")[0]):
        per_template[templates[x["identifier"]]][x["label"]] += 1
        per_sentence[x["sentence"]][x["label"]] += 1
    held_out = data.read_nlvr2(shapes.nlvr2_files(world, "dev")[0]) + data.read_nlvr2(shapes.nlvr2_files(world, "test1")[0])
    labels = tmp_path / "held_out.json"
    labels.write_text("".join(json.dumps({"identifier": x["identifier"], "label": str(x["label"])}) + "\n" for x in held_out))

    def nlvr2_metrics(predict):
        results = tmp_path / "nlvr2_results.csv"
        results.write_text("".join(f"{x['identifier']},{predict(x)}\n" for x in held_out))
        return E.score_nlvr2_files(str(results), str(labels))

    prior = nlvr2_metrics(lambda x: (per_sentence.get(x["sentence"]) or per_template[templates[x["identifier"]]])
                          .most_common(1)[0][0])
    oracle = nlvr2_metrics(lambda x: nlvr2_oracle(x["sentence"], *(objects[k] for k in x["images"])))
    assert prior["accuracy"] < 0.6 and prior["consistency"] < 0.2, prior
    assert oracle["accuracy"] == oracle["consistency"] == 1.0, oracle


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_no_task_trains_on_an_image_scored_on_karpathy_val_or_test(world):
    """The images every task trains on (VQA and captions: Karpathy train + restval; GQA: its train and val
    questions, as the multi-task setting trains on both; NLVR2: train), compared by their bytes, since GQA holds
    the same JPEGs under its own names: none is a Karpathy val or test image, which VQA and captions are
    validated and tested on."""
    karpathy = data.read_karpathy(os.path.join(world, "dataset_coco.json"))
    coco = {split: {file_hash(os.path.join(world, img["filepath"], img["filename"])) for img in karpathy
                    if data.karpathy_split(img["split"]) == split} for split in ("train", "val", "test")}
    gqa_images = shapes.gqa_files(world, "train")[1]
    gqa = {file_hash(os.path.join(gqa_images, r["image"])) for split in ("train", "val")
           for r in data.read_gqa(shapes.gqa_files(world, split)[0])}
    nlvr2 = {file_hash(os.path.join(world, "nlvr2", key)) for r in data.read_nlvr2(shapes.nlvr2_files(world, "train")[0])
             for key in r["images"]}
    held_out = coco["val"] | coco["test"]
    assert len(held_out) == 48 and len(coco["train"]) == N_IMAGES - 48 and len(gqa) > 150 and len(nlvr2) > 200
    for name, trained in (("VQA / captions", coco["train"]), ("GQA train + val", gqa), ("NLVR2 train", nlvr2)):
        assert not trained & held_out, f"{name} trains on {len(trained & held_out)} Karpathy val / test images"
    testdev = {file_hash(os.path.join(gqa_images, r["image"])) for r in data.read_gqa(shapes.gqa_files(world, "testdev")[0])}
    assert testdev == coco["test"]  # GQA's test images are the Karpathy test images


def test_tiny_bart_reads_every_gqa_question_it_trains_on(world):
    """The tiny BART's corpus (its BPE and denoising text) holds the questions and answers of both GQA files the
    multi-task setting trains on, train and val, and no testdev question that no training file asks."""
    corpus = set(shapes.bart_texts(world))
    trained = [r for split in ("train", "val") for r in data.read_gqa(shapes.gqa_files(world, split)[0])]
    assert {r["question"] for r in trained} | {r["answer"] for r in trained} <= corpus
    testdev = {r["question"] for r in data.read_gqa(shapes.gqa_files(world, "testdev")[0])}
    assert testdev & corpus <= {r["question"] for r in trained} | set(shapes.world_texts(world)[0])


# ---- making the world ------------------------------------------------------------------------------------


def test_ensure_world_makes_what_is_missing(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(shapes, "make_world", lambda path: made.append(path))
    old = tmp_path / "old"  # a world from before GQA and NLVR2: VQA, captions and the scenes only
    old.mkdir()
    for name in ("dataset_coco.json", "shapes_scenes.json"):
        (old / name).write_text("{}")
    assert shapes.ensure_world(str(old)) == str(old) and made == [str(old)]
    for path in (shapes.gqa_files(str(old), "testdev")[0], shapes.nlvr2_files(str(old), "test1")[0]):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    shapes.ensure_world(str(old))
    assert made == [str(old), str(old)]  # complete, but of no DEMO_VERSION: made again
    (old / shapes.VERSION_FILE).write_text(f"{shapes.DEMO_VERSION}\n")
    shapes.ensure_world(str(old))
    assert made == [str(old)] * 2  # complete and current: not made again


def test_a_made_world_is_current(world):
    """make_world stamps the world with DEMO_VERSION last, so ensure_world keeps it (and remakes an older one)."""
    assert shapes.world_version(world) == str(shapes.DEMO_VERSION)


def test_tiny_backbones_of_another_version_are_not_read(tmp_path, monkeypatch):
    """A tiny backbone pretrained by another DEMO_VERSION (an older world or pretraining) is made again, not reused."""
    saved = []
    monkeypatch.setattr(shapes, "TINY_DIR", str(tmp_path))
    monkeypatch.setattr(shapes, "ensure_world", lambda: None)
    monkeypatch.setattr(shapes, "pretrain_vision", lambda arch: arch)
    monkeypatch.setattr(models, "save_checkpoint", lambda model, path: saved.append(path) or open(path, "w").close())
    (tmp_path / "vit.pt").write_text("from before versions")
    (tmp_path / f"vit-v{shapes.DEMO_VERSION - 1}.pt").write_text("an older version")
    path = shapes.tiny_backbone("vit")
    assert saved == [path] and os.path.basename(path) == f"vit-v{shapes.DEMO_VERSION}.pt"
    assert shapes.tiny_backbone("vit") == path and saved == [path]  # now current: read, not made again


def test_make_world_rejects_worlds_too_small(tmp_path):
    with pytest.raises(ValueError, match="n_images must be at least 20, got 19"):
        shapes.make_world(str(tmp_path), n_images=19)
    with pytest.raises(ValueError, match="nlvr2_sets must be at least 3"):
        shapes.make_world(str(tmp_path), n_images=40, nlvr2_sets=2)


# ---- the tiny T5's tokenizer and objective ------------------------------------------------------------------


def test_tiny_t5_tokenizer_has_every_word_as_one_piece(world):
    """shapes.spiece_model, read by data.SentencePieceTokenizer: T5's specials (<pad> 0, </s> 1, <unk> 2, the 100
    sentinels last), every word of the world's text one piece (as in t5-base: answers and "true" / "false" are single
    tokens, so targets and NLVR2's scored words are), texts round-trip, characters it never saw are <unk>."""
    texts = shapes.bart_texts(world)
    tok = data.SentencePieceTokenizer(shapes.spiece_model(texts))
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert len(tok) == len(tok.pieces) + 100 and tok.wrap([5]) == [5, 1]
    for text in texts[::97]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) == len(re.findall(r"\w+|[^\w\s]", text))  # one piece a word, one a punctuation mark
    assert [tok.id_to_piece(i) for i in tok.encode("true false")] == ["\u2581true", "\u2581false"]
    assert tok.encode("red §")[-1] == tok.unk_id


def test_span_corruption_hides_spans_behind_sentinels():
    """T5's objective: the input keeps the text with each masked span replaced by the next sentinel <extra_id_k>
    (k = 0, 1, ...); the target lists each sentinel with its span and ends with one more sentinel and </s>: putting
    the spans back gives the text. About 15 % of the tokens in spans of 3, at least one span."""
    tok = data.SentencePieceTokenizer(shapes.spiece_model(["a b c d e f g h i j k l m n o p q r s t"]))
    sentinel = {len(tok) - 1 - k: k for k in range(100)}  # <extra_id_k>, written out
    g = torch.Generator().manual_seed(0)
    masked = []
    for n in (1, 4, 20, 20, 20, 20):
        ids = list(range(3, 3 + n))
        inputs, targets = shapes.span_corruption(ids, tok, g)
        assert inputs[-1] == targets[-1] == 1 and targets[-2] in sentinel
        spans, k = {}, None
        for t in targets[:-2]:
            if t in sentinel:
                k = sentinel[t]
                spans[k] = []
            else:
                spans[k].append(t)
        assert list(spans) == list(range(len(spans))) and targets[-2] == len(tok) - 1 - len(spans) and spans
        rebuilt = [x for t in inputs[:-1] for x in (spans[sentinel[t]] if t in sentinel else [t])]
        assert rebuilt == ids
        masked.append(sum(map(len, spans.values())) / n)
    assert masked[0] == 1.0 and all(0 < m <= 0.3 for m in masked[2:])
    lengths, fractions = [], []  # over many texts of 20 tokens: one span of 3 (cut at the end), 15 %
    for _ in range(300):
        inputs, targets = shapes.span_corruption(list(range(3, 23)), tok, g)
        marks = "".join("|" if t in sentinel else "t" for t in targets[:-2])  # e.g. "|ttt": a sentinel, its span
        lengths += [len(span) for span in marks.split("|")[1:]]
        fractions.append(marks.count("t") / 20)
    assert 2.6 <= np.mean(lengths) <= 3.0 and 0.12 <= np.mean(fractions) <= 0.15


# ---- the tiny backbones' pretraining -------------------------------------------------------------------


def test_cell_loss_scores_each_grid_cell_against_its_own_quadrant():
    """Logits that name, in each cell q of the grid (row-major), the colour, shape and size of QUADRANTS[q]'s
    object (class 0: empty) give a loss near 0; the same logits with the top right and bottom left cells swapped
    (a column-major reading) a large one."""
    objects = [{"color": "red", "shape": "circle", "size": "small", "quadrant": "top right"},
               {"color": "blue", "shape": "square", "size": "large", "quadrant": "bottom left"},
               {"color": "green", "shape": "triangle", "size": "large", "quadrant": "bottom right"}]
    labels = shapes.scene_attributes(objects)[None]  # (1, 13)
    logits = torch.full((1, 4, sum(shapes.CELL_CLASSES)), -30.0)
    starts = [0, *np.cumsum(shapes.CELL_CLASSES)[:-1]]
    names = (sorted(shapes.COLORS), list(shapes.SHAPES), sorted(shapes.SIZES))
    for q, quadrant in enumerate(shapes.QUADRANTS):
        o = next((o for o in objects if o["quadrant"] == quadrant), None)
        for j, (key, start) in enumerate(zip(("color", "shape", "size"), starts)):
            logits[0, q, start + (0 if o is None else 1 + names[j].index(o[key]))] = 30.0
    assert shapes.cell_loss(logits, labels) < 1e-6
    assert shapes.cell_loss(logits[:, [0, 2, 1, 3]], labels) > 10


def test_clip_pretraining_names_every_grid_cell(monkeypatch):
    """The tiny CLIP ResNet is trained on its grid cells too (cell_loss on its (B, 4, d) grid, at CLIP_LR); the
    ViT only on its pooled output, at VIT_LR (the VQA demo's backbone unchanged)."""
    calls, rates = [], []
    loss = shapes.cell_loss
    monkeypatch.setattr(shapes, "cell_loss", lambda logits, labels: calls.append(logits.shape) or loss(logits, labels))
    monkeypatch.setattr(shapes, "pretrain", lambda model, head, batches, steps, lr, desc: rates.append(lr) or batches(0))
    monkeypatch.setattr(shapes, "VIT_SCENES", 4)
    shapes.pretrain_vision("vit")
    assert not calls and rates == [shapes.VIT_LR]
    shapes.pretrain_vision("clip_resnet")
    assert calls == [(64, 4, sum(shapes.CELL_CLASSES))] and rates == [shapes.VIT_LR, shapes.CLIP_LR]
