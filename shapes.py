"""The demos' synthetic world, their tiny pretrained backbones and pictures: no part of the method.

    python shapes.py world [--out data/shapes] [--n-images 3000] [--seed 0]   # the world, in the real formats
    python shapes.py backbones                          # the tiny ViT, RoBERTa, GPT-2, CLIP ResNet, BART and T5
    python train.py                                     # builds both on first use

The world: 64-px images of coloured shapes (1-4 per image, one per quadrant), with VQAv2 questions
(10 human answers each), COCO captions (5 per image) with a Karpathy split, GQA-style relational
questions ("What is the color of the shape to the left of the circle?", exact one-word answers) and
NLVR2-style image pairs with true / false statements about both images ("Both images contain a red
shape."), in exactly the files and fields of the real datasets (data.py reads them, eval.py
scores them), laid out as the official archives unpack (WORLD = --out):

    WORLD/train2014/COCO_train2014_000000000009.jpg, val2014/...  COCO images (train2014.zip, val2014.zip)
    WORLD/v2_OpenEnded_mscoco_{train,val}2014_questions.json       VQAv2 (visualqa.org: Questions, Annotations)
    WORLD/v2_mscoco_{train,val}2014_annotations.json
    WORLD/dataset_coco.json                                        COCO captions, Karpathy's split file
    WORLD/gqa/questions1.2/{train,val,testdev}_balanced_questions.json   GQA: questions1.2.zip and images.zip
    WORLD/gqa/images/2300000.jpg                                         (cs.stanford.edu/people/dorarad/gqa)
    WORLD/nlvr2/data/{train,dev,test1}.json                        NLVR2 (github.com/lil-lab/nlvr, nlvr2/data),
    WORLD/nlvr2/images/train/{directory}/train-0-0-img0.png        with its image archives extracted in nlvr2/
    WORLD/nlvr2/{dev,test1}/dev-0-0-img0.png                       (data.nlvr2_image_keys)
    WORLD/shapes_scenes.json                                       the truth: every image's objects, every answer
    WORLD/shapes_version.txt                                       the DEMO_VERSION that made it (written last)

gqa_files(WORLD, split) and nlvr2_files(WORLD, split) give (file, images folder) for data.read_gqa /
data.read_nlvr2 and eval.py. GQA asks its questions on the VQA scenes, whose JPEGs it holds again
under its own flat layout and image ids; a scene's Karpathy split decides its GQA split (train ->
train, restval -> val, test -> testdev), and the Karpathy val images have no GQA questions (GQA, as
Visual Genome, covers only part of COCO): the multi-task setting trains GQA on its train and val
questions (as VL-PET), so no image that VQA or captions validate or test on is ever trained on.
NLVR2 draws its own pairs. Answers are balanced per question template and labels per statement
template, so the text alone says little (tests/test_shapes.py measures blind priors against oracles).
Deterministic: the same seed gives the same bytes.

The tiny backbones have the real architectures (models.py), tiny (d = 128), in the converted-
checkpoint format: a ViT and a CLIP ResNet trained briefly to name the colour, shape and size in each
quadrant of freshly drawn scenes (a stand-in for ImageNet-21k or CLIP pretraining: none of the demo's
images), a RoBERTa trained with masked-LM, a GPT-2 with next-token LM and a BART by denoising on the
world's text, each with a byte-level BPE learned on its text, and a T5 by span corruption with a SentencePiece
unigram model of the world's words (spiece_model). World and backbones live next to this
file (data/shapes, data/tiny), wherever train.py is run from.

The study (python train.py --study): STUDY, the runs it makes (train.run_study trains and resumes them),
study_rows and study_table, its table from their final records, and study_chart, its chart (Pillow only: a bar
per route, the seeds' spread, the text-only baseline); gallery draws a few test examples with their predictions.
"""
import argparse
import dataclasses
import io
import itertools
import json
import math
import os
import random
import re
import struct
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import models
from eval import atomic_write, normalize_answer, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "shapes")  # the demo's world and tiny backbones, beside this file
TINY_DIR = os.path.join(HERE, "data", "tiny")
SCENES = "shapes_scenes.json"  # the world's ground truth
VERSION_FILE = "shapes_version.txt"  # the DEMO_VERSION that made the world, written last
DEMO_VERSION = 1  # of the world and the tiny backbones' pretraining: a change makes both again (ensure_world, tiny_backbone)


# ---- the synthetic world: coloured shapes, written as VQAv2 + COCO + Karpathy files ---------------

SHAPES_SIZE = 64          # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230),
          "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (5, 7), "large": (10, 13)}   # half-extent range in pixels (64 px image)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]


def sample_scene(rng):
    """The random content of one scene, before any pixel is drawn: (background grey level, objects,
    fill colours). 1-4 shapes, one per quadrant, with distinct (colour, shape) pairs; each object is
    {"color", "shape", "size", "quadrant", "x", "y", "r"} (centre and half-extent in pixels)."""
    n = rng.randint(1, 4)
    quads = rng.sample(range(4), n)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    half = SHAPES_SIZE // 2
    bg = rng.randint(80, 150)
    objects, fills = [], []
    for q, (color, shape) in zip(quads, pairs):
        size = rng.choice(sorted(SIZES))
        r = rng.randint(*SIZES[size])
        cx = (q % 2) * half + half // 2 + rng.randint(-(half // 2 - r - 1), half // 2 - r - 1)
        cy = (q // 2) * half + half // 2 + rng.randint(-(half // 2 - r - 1), half // 2 - r - 1)
        fills.append(tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLORS[color]))
        objects.append({"color": color, "shape": shape, "size": size, "quadrant": QUADRANTS[q],
                        "x": cx, "y": cy, "r": r})
    return bg, objects, fills


def render_scene(bg, objects, fills, nprng):
    """The 64x64 image of a sampled scene: drawn at 2x and downsampled (smooth edges), plus pixel noise."""
    scale = 2
    img = Image.new("RGB", (SHAPES_SIZE * scale, SHAPES_SIZE * scale), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    for o, fill in zip(objects, fills):
        cx, cy, r = o["x"], o["y"], o["r"]
        box = [(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx * scale, (cy - r) * scale), ((cx - r) * scale, (cy + r) * scale),
                          ((cx + r) * scale, (cy + r) * scale)], fill=fill)
    img = img.resize((SHAPES_SIZE, SHAPES_SIZE), Image.BOX)
    noise = nprng.normal(0.0, 5.0, size=(SHAPES_SIZE, SHAPES_SIZE, 3))           # (H, W, 3)
    pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def draw_scene(rng, nprng):
    """A 64x64 scene on a grey noisy background (sample_scene, then render_scene). Returns (image, objects)."""
    bg, objects, fills = sample_scene(rng)
    return render_scene(bg, objects, fills, nprng), objects


def _name(o):
    return f"{o['color']} {o['shape']}"


def _a(words):
    """The indefinite article for words: "a red circle", "an orange square"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


# Question templates: (kind, template, question_type, answer_type). Templates with {s}/{c}/{o} name
# a shape, a colour or an object ("red circle"); {sa} is "a"/"an" + colour + shape.
TEMPLATES = [
    ("color", "What color is the {s}?", "what color is the", "other"),
    ("color", "What is the color of the {s}?", "what is the color of the", "other"),
    ("color", "Which colour does the {s} have?", "which", "other"),
    ("shape", "What shape is the {c} object?", "what shape is the", "other"),
    ("shape", "What is the {c} thing?", "what is the", "other"),
    ("shape", "Which shape is {c}?", "which", "other"),
    ("side", "Is the {o} on the left or on the right?", "is the", "other"),
    ("side", "Is the {o} at the top or at the bottom?", "is the", "other"),
    ("side", "Where is the {o}?", "where is the", "other"),
    ("size", "Is the {o} big or small?", "is the", "other"),
    ("size", "What size is the {o}?", "what size is the", "other"),
    ("yesno", "Is the {o} on the left?", "is the", "yes/no"),
    ("yesno", "Is the {o} on the right?", "is the", "yes/no"),
    ("yesno", "Are there any {s}s?", "are there any", "yes/no"),
    ("yesno", "Is there anything {c}?", "is there", "yes/no"),
    ("yesno", "Is there {sa}?", "is there a", "yes/no"),
    ("count", "How many shapes are there?", "how many", "number"),
    ("count", "How many objects are in the picture?", "how many", "number"),
    ("count", "How many {s}s are there?", "how many", "number"),
    ("count", "How many {c} shapes are there?", "how many", "number"),
]


def _question_candidates(objects):
    """Every (template index, question, answer, possible answers) this scene supports. An object
    is named by its shape or colour only where that is unique in the scene; colour + shape always
    is (pairs are distinct)."""
    n_shape = Counter(o["shape"] for o in objects)
    n_color = Counter(o["color"] for o in objects)
    present = {(o["color"], o["shape"]) for o in objects}
    yes_no, numbers = ["no", "yes"], [str(k) for k in range(5)]
    out = []
    for t, (kind, template, _, _) in enumerate(TEMPLATES):
        if kind == "color":
            out += [(t, template.format(s=o["shape"]), o["color"], sorted(COLORS))
                    for o in objects if n_shape[o["shape"]] == 1]
        elif kind == "shape":
            out += [(t, template.format(c=o["color"]), o["shape"], list(SHAPES))
                    for o in objects if n_color[o["color"]] == 1]
        elif kind == "count" and "{" not in template:
            out.append((t, template, str(len(objects)), numbers))
        elif kind == "count":
            out += [(t, template.format(s=s), str(n_shape[s]), numbers) for s in SHAPES if "{s}" in template]
            out += [(t, template.format(c=c), str(n_color[c]), numbers) for c in COLORS if "{c}" in template]
        elif "{o}" in template:
            for o in objects:
                vertical, horizontal = o["quadrant"].split()
                answer, possible = {
                    "Is the {o} on the left or on the right?": (horizontal, ["left", "right"]),
                    "Is the {o} at the top or at the bottom?": (vertical, ["bottom", "top"]),
                    "Where is the {o}?": (o["quadrant"], list(QUADRANTS)),
                    "Is the {o} big or small?": ("big" if o["size"] == "large" else "small", ["big", "small"]),
                    "What size is the {o}?": (o["size"], ["large", "small"]),
                    "Is the {o} on the left?": (yes_no[horizontal == "left"], yes_no),
                    "Is the {o} on the right?": (yes_no[horizontal == "right"], yes_no),
                }[template]
                out.append((t, template.format(o=_name(o)), answer, possible))
        elif "{s}" in template:
            out += [(t, template.format(s=s), yes_no[n_shape[s] > 0], yes_no) for s in SHAPES]
        elif "{c}" in template:
            out += [(t, template.format(c=c), yes_no[n_color[c] > 0], yes_no) for c in COLORS]
        else:  # "Is there {sa}?"
            out += [(t, template.format(sa=_a(f"{c} {s}")), yes_no[(c, s) in present], yes_no)
                    for c in COLORS for s in SHAPES]
    return out


def _pick_questions(rng, objects, used, per_image):
    """per_image questions of distinct kinds: a kind, then one of its templates that this scene
    supports, at random; then the answer used least so far with that template in the whole world
    (ties at random), then a question with that answer. Answers come out nearly uniform per
    template, so the question text alone says little."""
    by_template = {}
    for cand in _question_candidates(objects):
        by_template.setdefault(cand[0], []).append(cand)
    kinds = sorted({TEMPLATES[t][0] for t in by_template})
    picked = []
    for kind in rng.sample(kinds, min(per_image, len(kinds))):
        t = rng.choice([t for t in sorted(by_template) if TEMPLATES[t][0] == kind])
        answers = sorted({c[2] for c in by_template[t]})
        least = min(used[(t, a)] for a in answers)
        answer = rng.choice([a for a in answers if used[(t, a)] == least])
        used[(t, answer)] += 1
        picked.append(rng.choice([c for c in by_template[t] if c[2] == answer]))
    return picked


_SYNONYMS = {"large": ["big"], "big": ["large"], "small": ["little", "tiny"], "circle": ["round", "oval"],
             "square": ["rectangle"], "triangle": ["triangular"], "purple": ["violet"],
             "top left": ["upper left", "left"], "top right": ["upper right", "right"],
             "bottom left": ["lower left", "left"], "bottom right": ["lower right", "right"]}


def _human_answers(rng, kind, answer, possible):
    """10 annotators: most give the answer, written in various ways that the official normaliser
    maps back ("Red", "red.", "a circle", "two", "zero"); some give a synonym it does not map ("big"
    for "large"); some are wrong (another possible answer). The error rate varies per question."""
    p_wrong = rng.choice([0.0, 0.0, 0.0, 0.05, 0.05, 0.1, 0.1, 0.2, 0.3])
    p_synonym = 0.1 if answer in _SYNONYMS else 0.0
    out = []
    for _ in range(10):
        u = rng.random()
        if u < p_wrong:
            a = rng.choice([x for x in possible if x != answer])
        elif u < p_wrong + p_synonym:
            a = rng.choice(_SYNONYMS[answer])
        else:
            a = answer
        v = rng.random()
        if kind == "count" and v < 0.3:
            a = NUMBER_WORDS[int(a)]
        elif v < 0.06:
            a = a.capitalize()
        elif v < 0.09:
            a = a + "."
        elif v < 0.12 and kind == "shape":
            a = "a " + a
        out.append(a)
    return out


def _captions(rng, objects):
    """5 varied captions of a scene (raw sentences)."""
    n = len(objects)
    objs = objects[:]
    rng.shuffle(objs)

    def listing(with_size):
        parts = [_a(f"{o['size'] + ' ' if with_size else ''}{_name(o)}") for o in objs]
        return parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    count = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    where = "; ".join(f"{_a(_name(o))} in the {o['quadrant']}" for o in objs)
    colors = sorted({o["color"] for o in objs})
    color_text = colors[0] if len(colors) == 1 else ", ".join(colors[:-1]) + " and " + colors[-1]
    options = [
        f"{listing(False)} on a gray background.",
        f"{listing(True)}.",
        f"There {'is' if n == 1 else 'are'} {count} in the picture: {listing(False)}.",
        f"An image with {where}.",
        f"{count.capitalize()} on a plain background, colored {color_text}.",
        f"A picture showing {listing(rng.random() < 0.5)}.",
        f"{where}.",
    ]
    picked = rng.sample(options, 5)
    return [p[0].upper() + p[1:] for p in picked]


def _caption_tokens(raw):
    """Karpathy's "tokens": lower-cased words without punctuation."""
    return "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in raw.lower()).split()


# ---- GQA-style relational questions (the official balanced question files) ------------------------

RELATIONS = ("to the left of", "to the right of", "above", "below")
YES_NO = ["no", "yes"]
# Question templates: name -> (types.structural, types.semantic, types.detailed for the answer "yes"
# (and for "no" where GQA names its contrast variant apart), every possible answer). Structural and
# semantic types are GQA's (a question is open iff structural == "query"); the detailed types borrow
# the names of the nearest GQA question families (only the official metrics' groups depend on types).
GQA_TEMPLATES = {
    "color_of_related": ("query", "attr", ("directOf",), sorted(COLORS)),
    "shape_of_related": ("query", "rel", ("relS",), list(SHAPES)),
    "verify_relation": ("verify", "rel", ("relVerify", "relVerifyCr"), YES_NO),
    "exist_related": ("verify", "rel", ("existRelS", "existRelSC"), YES_NO),
    "verify_color_of_related": ("verify", "attr", ("verifyAttr", "verifyAttrC"), YES_NO),
    "choose_relation": ("choose", "rel", ("relChooser",), ["above", "below", "left", "right"]),
    "choose_color_of_related": ("choose", "attr", ("chooseAttr",), sorted(COLORS)),
    "same_color": ("compare", "attr", ("twoSame", "twoSameC"), YES_NO),
    "same_shape": ("compare", "attr", ("twoSame", "twoSameC"), YES_NO),
    "exist_and": ("logical", "obj", ("existAnd", "existAndC"), YES_NO),
    "exist_or": ("logical", "obj", ("existOr", "existOrC"), YES_NO),
}
# The structural types, weighted towards query and verify (the bulk of GQA) for a scene's first question
GQA_KINDS = {"query": 4, "verify": 3, "choose": 2, "compare": 1, "logical": 1}
# Karpathy -> GQA; Karpathy val: no GQA question (GQA's val is trained on, and must hold no image scored elsewhere)
GQA_SPLIT = {"train": "train", "restval": "val", "test": "testdev"}


def relation_holds(a, b, rel):
    """Whether object a is `rel` (RELATIONS) object b, from their quadrants: a is to the left of b when
    it is in the left column and b in the right one, above b when it is in the top row and b in the
    bottom one (so diagonal neighbours are both)."""
    (ra, ca), (rb, cb) = divmod(QUADRANTS.index(a["quadrant"]), 2), divmod(QUADRANTS.index(b["quadrant"]), 2)
    if rel in ("to the left of", "to the right of"):
        return ca < cb if rel == "to the left of" else ca > cb
    return ra < rb if rel == "above" else ra > rb


def _relation_words(word):
    """The relation named by a one-word answer: "left" -> "to the left of", "above" -> "above"."""
    return word if word in ("above", "below") else f"to the {word} of"


def _relation(a, b):
    """The first relation of RELATIONS that holds from a to b (objects in two quadrants have one)."""
    return next(rel for rel in RELATIONS if relation_holds(a, b, rel))


def _gqa_names(rng, objects, ids):
    """One name per object that singles it out in its scene, at random among: its shape ("circle")
    where no other object has it, its colour ("red shape") likewise, its colour and shape ("red
    circle", always unique). Each as (words, the program steps that select it)."""
    n_shape, n_color = Counter(o["shape"] for o in objects), Counter(o["color"] for o in objects)
    names = []
    for o, i in zip(objects, ids):
        options = [(_name(o), [("select", f"{o['shape']} ({i})"), ("filter color", o["color"])])]
        if n_shape[o["shape"]] == 1:
            options.append((o["shape"], [("select", f"{o['shape']} ({i})")]))
        if n_color[o["color"]] == 1:
            options.append((f"{o['color']} shape", [("select", f"shape ({i})"), ("filter color", o["color"])]))
        names.append(rng.choice(options))
    return names


def _program(chains, final=None):
    """GQA's "semantic" program: the steps (operation, argument) of each chain in turn, each depending
    on the step before it in its chain; then `final` (operation, argument) depending on the last step
    of every chain (comparisons of two objects, "and", "or")."""
    program, ends = [], []
    for chain in chains:
        for k, (op, arg) in enumerate(chain):
            program.append({"operation": op, "dependencies": [len(program) - 1] if k else [], "argument": arg})
        ends.append(len(program) - 1)
    if final:
        program.append({"operation": final[0], "dependencies": ends, "argument": final[1]})
    return program


def _semantic_str(program):
    """GQA's "semanticStr": "select: bed (1026412)->verify rel: book,to the left of,s (1026411) [0]"."""
    return "->".join(f"{op['operation']}: {op['argument']}" + (f" [{', '.join(map(str, op['dependencies']))}]"
                                                               if op["dependencies"] else "") for op in program)


def _annotated(parts, end):
    """(text, GQA annotations) of parts: strings, or (words, object id) for words that name an object;
    annotations map the word index ("3") or span ("3:5", end excluded) of those words, counting
    words by spaces as GQA does, to the object id."""
    words, spans = [], {}
    for part in parts:
        text, obj = part if isinstance(part, tuple) else (part, None)
        new = text.split()
        if obj is not None:
            spans[str(len(words)) if len(new) == 1 else f"{len(words)}:{len(words) + len(new)}"] = obj
        words += new
    return " ".join(words) + end, spans


def _art(word):
    return "an" if word[0] in "aeiou" else "a"


def _question(template, answer, question, full, chains, final=None, local="", global_=None, answer_obj=None):
    """A candidate GQA question: question and fullAnswer parts (_annotated), program chains and final
    step (_program), groups, and the answer's object id where the answer names an object."""
    return {"template": template, "answer": answer, "question": question, "full": full, "chains": chains,
            "final": final, "groups": {"global": global_, "local": local}, "answer_obj": answer_obj}


def _questions_about_related(rng, objects, ids, names, template):
    """Questions about "the shape {rel} the {b}" (or "the triangle {rel} the {b}" where only its shape
    singles it out there): its colour and shape, yes / no on its colour, a choice of two colours;
    and exist_related: "Is there a circle to the left of the square?"."""
    out = []
    for (b, ob), rel in itertools.product(enumerate(objects), RELATIONS):
        related = [a for a in range(len(objects)) if a != b and relation_holds(objects[a], ob, rel)]
        the_b = (names[b][0], ids[b])
        if template == "exist_related":
            for s in SHAPES:
                if names[b][0] == s:  # "Is there a circle above the circle?" when b is the only circle: no
                    continue
                hit = next((a for a in related if objects[a]["shape"] == s), None)
                found = None if hit is None else (_name(objects[hit]), ids[hit])
                full = ["No, there is no", s] if hit is None else ["Yes, there is", _art(found[0]), found]
                question = ["Is there a", s if hit is None else (s, ids[hit]), rel, "the", the_b]
                out.append(_question(
                    template, YES_NO[hit is not None], question, full + [rel, "the", the_b],
                    [names[b][1] + [("relate", f"{s},{rel},s ({'-' if hit is None else ids[hit]})"), ("exist", "?")]],
                    local=f"13-{ob['shape']}_{s}"))
            continue
        # the colour of a "no" or of the other choice: not b's when b is named by it ("the red shape"),
        # since then no other object has it and the question would give its answer away
        others = [c for c in COLORS if names[b][0] != f"{c} shape"]
        for a in related:
            oa, the_a, color = objects[a], (objects[a]["shape"], ids[a]), objects[a]["color"]
            noun = "shape" if len(related) == 1 else oa["shape"]
            if sum(objects[x]["shape"] == oa["shape"] for x in related) > 1 or (
                    template == "shape_of_related" and noun != "shape"):
                continue
            steps = names[b][1] + [("relate", f"{noun},{rel},s ({ids[a]})")]
            subject = ["the", (noun, ids[a]), rel, "the", the_b]
            if template == "color_of_related":  # "What is the color of the shape above the circle?"
                out.append(_question(template, color, ["What is the color of"] + subject, ["The", the_a, "is", color],
                                     [steps + [("query", "color")]], local=f"10q-{oa['shape']}_color", global_="color"))
            elif template == "shape_of_related":  # "Which shape is above the red circle?"
                out.append(_question(template, oa["shape"], ["Which shape is", rel, "the", the_b],
                                     ["The", the_a, "is", rel, "the", the_b],
                                     [names[b][1] + [("relate", f"_,{rel},s ({ids[a]})"), ("query", "name")]],
                                     local=f"14-{ob['shape']}_{rel},s", global_="shape", answer_obj=ids[a]))
            elif template == "verify_color_of_related":  # "Is the triangle above the circle red?"
                for c in (color, rng.choice([c for c in others if c != color])):
                    out.append(_question(template, YES_NO[c == color], ["Is"] + subject + [c],
                                         ["Yes, the" if c == color else "No, the", the_a, "is", color],
                                         [steps + [("verify color", c)]], local=f"06-{oa['shape']}_{c}"))
            else:  # choose_color_of_related: "Is the shape above the circle red or blue?"
                pair = rng.sample([color, rng.choice([c for c in others if c != color])], 2)
                out.append(_question(template, color, ["Is"] + subject + [f"{pair[0]} or {pair[1]}"],
                                     ["The", the_a, "is", color], [steps + [("choose color", "|".join(sorted(pair)))]],
                                     local=f"10c-{oa['shape']}_color", global_="color"))
    return out


def _questions_about_two(rng, objects, ids, names, template):
    """Questions about two objects: whether a relation holds (verify_relation), which of two holds
    (choose_relation), whether they have the same colour or shape (named without it)."""
    out = []
    if template in ("verify_relation", "choose_relation"):
        for (a, oa), (b, ob) in itertools.permutations(enumerate(objects), 2):
            the_a, the_b, local = (names[a][0], ids[a]), (names[b][0], ids[b]), f"13-{ob['shape']}_{oa['shape']}"
            for rel in RELATIONS if template == "verify_relation" else ():
                holds = relation_holds(oa, ob, rel)  # "Is the circle to the left of the red square?"
                out.append(_question(
                    template, YES_NO[holds], ["Is the", the_a, rel, "the", the_b],
                    ["Yes, the" if holds else "No, the", the_a, "is", rel if holds else _relation(oa, ob),
                     "the", the_b],
                    [names[b][1] + [("verify rel", f"{oa['shape']},{rel},s ({ids[a]})")]], local=local))
            for axis in (("left", "right"), ("above", "below")) if template == "choose_relation" else ():
                answer = next((w for w in axis if relation_holds(oa, ob, _relation_words(w))), None)
                if answer is None:
                    continue
                x, y = rng.sample(axis, 2)  # "Is the circle to the right or to the left of the square?"
                words = f"{x} or {y}" if x in ("above", "below") else f"to the {x} or to the {y} of"
                choice = f"{oa['shape']},{_relation_words(x)}|{_relation_words(y)},s ({ids[a]})"
                out.append(_question(
                    template, answer, ["Is the", the_a, words, "the", the_b],
                    ["The", the_a, "is", _relation_words(answer), "the", the_b],
                    [names[b][1] + [("choose rel", choice)]], local=local))
        return out
    attribute, naming = ("color", "shape") if template == "same_color" else ("shape", "color")
    unique = Counter(o[naming] for o in objects)
    for (a, oa), (b, ob) in itertools.combinations(enumerate(objects), 2):
        if unique[oa[naming]] > 1 or unique[ob[naming]] > 1:
            continue
        same = oa[attribute] == ob[attribute]
        if template == "same_color":  # "Are the circle and the square the same color?"
            x, y = (oa["shape"], ids[a]), (ob["shape"], ids[b])
            chains = [[("select", f"{oa['shape']} ({ids[a]})")], [("select", f"{ob['shape']} ({ids[b]})")]]
            full = (["Yes, both the", x, "and the", y, "are", oa["color"]] if same else
                    ["No, the", x, "is", oa["color"], "and the", y, "is", ob["color"]])
        else:  # "Are the red shape and the blue shape the same shape?"
            x, y = (f"{oa['color']} shape", ids[a]), (f"{ob['color']} shape", ids[b])
            chains = [[("select", f"shape ({i})"), ("filter color", o["color"])]
                      for o, i in ((oa, ids[a]), (ob, ids[b]))]
            full = (["Yes, both the", x, "and the", y, "are", oa["shape"] + "s"] if same else
                    ["No, the", x, "is", _art(oa["shape"]), oa["shape"],
                     "and the", y, "is", _art(ob["shape"]), ob["shape"]])
        out.append(_question(template, YES_NO[same], ["Are the", x, "and the", y, f"the same {attribute}"], full,
                             chains, (f"same {attribute}", ""), local=f"09compare-{oa[naming]}_{ob[naming]}"))
    return out


def _questions_of_existence(rng, objects, ids, template):
    """exist_and / exist_or: "Are there both a red circle and a blue square?", "Is there a red circle
    or a blue square?", about two objects there, one there and one not, or two not there."""
    present = {(o["color"], o["shape"]): i for o, i in zip(objects, ids)}
    absent = [p for p in itertools.product(sorted(COLORS), SHAPES) if p not in present]
    pairs = (list(itertools.permutations(present, 2))
             + [(p, q) for p in present for q in rng.sample(absent, 2)]
             + [(q, p) for p in present for q in rng.sample(absent, 2)]
             + [tuple(rng.sample(absent, 2)) for _ in range(3)])
    out = []
    for x, y in pairs:
        parts = [[_art(c), (f"{c} {s}", present[(c, s)]) if (c, s) in present else f"{c} {s}"] for c, s in (x, y)]
        chains = [[("select", f"{s} ({present.get((c, s), '-')})"), ("filter color", c), ("exist", "?")]
                  for c, s in (x, y)]
        if template == "exist_and":
            missing = next((f"{c} {s}" for c, s in (x, y) if (c, s) not in present), None)
            out.append(_question(
                template, YES_NO[missing is None], ["Are there both"] + parts[0] + ["and"] + parts[1],
                ["No, there is no", missing] if missing else ["Yes, there are both"] + parts[0] + ["and"] + parts[1],
                chains, ("and", ""), local=f"09existAnd-{x[1]}_{y[1]}"))
        else:
            found = next(((f"{c} {s}", present[(c, s)]) for c, s in (x, y) if (c, s) in present), None)
            out.append(_question(
                template, YES_NO[found is not None], ["Is there"] + parts[0] + ["or"] + parts[1],
                ["No, there are no", f"{x[0]} {x[1]}s", "or", f"{y[0]} {y[1]}s"] if found is None else
                ["Yes, there is", _art(found[0]), found], chains, ("or", ""), local=f"09existOr-{x[1]}_{y[1]}"))
    return out


def _gqa_candidates(rng, objects, ids, names, template):
    """Every question of `template` this scene supports (names: _gqa_names of the scene)."""
    if template in ("exist_and", "exist_or"):
        return _questions_of_existence(rng, objects, ids, template)
    if template in ("verify_relation", "choose_relation", "same_color", "same_shape"):
        return _questions_about_two(rng, objects, ids, names, template)
    return _questions_about_related(rng, objects, ids, names, template)


def _pick_gqa(rng, objects, ids, used, per_image, slack=2):
    """Up to per_image questions of distinct structural types (GQA_KINDS, in a random order drawn
    with their weights), each of a template of that type that this scene supports: the answer
    used least so far in the world with that template among those the scene allows (ties at random),
    unless even that answer is more than `slack` questions ahead of the template's least-used
    possible answer (then the next template of the type); then a question with that answer, at
    random. So every template's answers stay nearly uniform and the question text alone says little."""
    names = _gqa_names(rng, objects, ids)
    picked = []
    for kind in sorted(GQA_KINDS, key=lambda k: -rng.random() ** (1 / GQA_KINDS[k])):  # weighted order
        templates = sorted(t for t, spec in GQA_TEMPLATES.items() if spec[0] == kind)
        for t in rng.sample(templates, len(templates)):
            candidates = _gqa_candidates(rng, objects, ids, names, t)
            answers = sorted({c["answer"] for c in candidates})
            least = min((used[(t, a)] for a in answers), default=None)
            if least is None or least > min(used[(t, a)] for a in GQA_TEMPLATES[t][3]) + slack:
                continue
            answer = rng.choice([a for a in answers if used[(t, a)] == least])
            used[(t, answer)] += 1
            picked.append(rng.choice([c for c in candidates if c["answer"] == answer]))
            break
        if len(picked) == per_image:
            break
    return picked


def _gqa_question(cand, image_id, qid):
    """One entry of a GQA balanced questions file, fields in the official files' order."""
    structural, semantic, detailed, _ = GQA_TEMPLATES[cand["template"]]
    question, q_spans = _annotated(cand["question"], "?")
    full, a_spans = _annotated(cand["full"], ".")
    program = _program(cand["chains"], cand["final"])
    return {"semantic": program, "entailed": [], "equivalent": [qid], "question": question,
            "imageId": image_id, "isBalanced": True, "groups": cand["groups"], "answer": cand["answer"],
            "semanticStr": _semantic_str(program),
            "annotations": {"answer": {"0": cand["answer_obj"]} if cand["answer_obj"] else {},
                            "question": q_spans, "fullAnswer": a_spans},
            "types": {"detailed": detailed[-1] if cand["answer"] == "no" else detailed[0],
                      "semantic": semantic, "structural": structural},
            "fullAnswer": full}


def gqa_files(world, split):
    """(questions file, images folder) of one GQA split (train, val, testdev) of a world: what
    data.read_gqa and eval.py's gqa scoring read."""
    return (os.path.join(world, "gqa", "questions1.2", data.GQA_QUESTIONS.format(split)),
            os.path.join(world, "gqa", "images"))


def write_gqa(out, images, seed, per_image):
    """The GQA part of a world: per_image questions on each scene of `images` ([(Karpathy split,
    JPEG bytes, objects)], the VQA scenes) but those of Karpathy val, in
    gqa/questions1.2/{train,val,testdev}_balanced_questions.json (GQA_SPLIT: Karpathy train -> train,
    restval -> val, test -> testdev), and the same JPEG again under gqa/images/{imageId}.jpg: GQA's
    images.zip is one flat folder named by GQA's own image ids, which COCO's paths cannot serve. Returns
    (GQA image id per scene, None for Karpathy val, truths [{question_id, image_id, template, answer}])."""
    rng, used = random.Random(f"{seed}-gqa"), Counter()  # (template, answer) -> questions so far
    files = {split: {} for split in ("train", "val", "testdev")}
    images_dir = gqa_files(out, "train")[1]
    image_ids, truths = [], []
    for i, (split, buf, objects) in enumerate(images):
        if split not in GQA_SPLIT:
            image_ids.append(None)
            continue
        image_id = str(2300000 + i)  # Visual Genome-like ids, apart from the COCO ids
        image_ids.append(image_id)
        atomic_write(os.path.join(images_dir, data.gqa_image_key(image_id)), lambda f: f.write(buf), "wb")
        ids = [str(1000000 + 4 * i + k) for k in range(len(objects))]
        for k, cand in enumerate(_pick_gqa(rng, objects, ids, used, per_image)):
            qid = str(20000000 + 10 * i + k)
            files[GQA_SPLIT[split]][qid] = _gqa_question(cand, image_id, qid)
            truths.append({"question_id": qid, "image_id": image_id, "template": cand["template"],
                           "answer": cand["answer"]})
    for split, questions in files.items():
        write_json(questions, gqa_files(out, split)[0], indent=None)
    return image_ids, truths


# ---- NLVR2-style image pairs with true / false statements (the official JSON-lines files) ----------

# The statements, each about the pair: both images show a shape ("a circle") or a colour ("a red shape"), in one of
# three phrasings. One quantifier on purpose: the demo's tiny 2-layer BART learns per-image existence and its
# conjunction in its 80 NLVR2 steps, not counting, comparing or telling quantifiers apart. Measured on NLVR2 alone
# (the demo's model and options, 2 epochs, test1): seven templates with those ("more", "neither", "exactly two",
# "the same number", ...) 50 %, 55-57 % with 4 times the sets; "more shapes than" alone 50 %; "both" with
# "neither" 52 %; these three phrasings 63-64 % (3 seeds); and in the multi-task demo the seven 58.5 % (blind 50).
NLVR2_TEMPLATES = {"both": "Both images contain {}.", "each": "Each image contains {}.",
                   "in_both": "There is {} in both images."}
NLVR2_SPLITS = ("train", "dev", "test1")
NLVR2_TRIES = 500  # scene pairs drawn for a pair's two target labels before giving up the second


def _nlvr2_statement(rng, template):
    """A sentence of `template` about a random shape or colour: (sentence, truth(left objects, right objects) ->
    bool: both images show it, synset: the shape it is about, or "shape")."""
    key, value = rng.choice([("shape", rng.choice(SHAPES)), ("color", rng.choice(sorted(COLORS)))])

    def shows(objs):
        return any(o[key] == value for o in objs)
    noun, synset = (value, value) if key == "shape" else (f"{value} shape", "shape")
    return NLVR2_TEMPLATES[template].format(_a(noun)), lambda l, r: shows(l) and shows(r), synset


def _nlvr2_scenes(rng, truths, targets):
    """Two sampled scenes (left, right) on which each statement's truth is its target: drawn again
    until they are; after NLVR2_TRIES draws only the first target counts, after twice as many none."""
    for attempt in itertools.count():
        left, right = sample_scene(rng), sample_scene(rng)
        keep = 2 if attempt < NLVR2_TRIES else 1 if attempt < 2 * NLVR2_TRIES else 0
        if all(truth(left[1], right[1]) == target for truth, target in zip(truths[:keep], targets[:keep])):
            return left, right


def nlvr2_files(world, split):
    """(JSON-lines file, images folder) of one NLVR2 split (train, dev, test1) of a world: what
    data.read_nlvr2 and eval.py's nlvr2 scoring read."""
    return os.path.join(world, "nlvr2", "data", f"{split}.json"), os.path.join(world, "nlvr2")


def _nlvr2_example(rng, split, identifier, sentence, label, keys, writer, synset, query, directory):
    """One line of an NLVR2 file, fields in the official files' order: a first validation that agrees
    with the label; train: the image folder number; dev and test: four more judgements, 5 % wrong."""
    example = {"validation": {str(rng.randint(0, 170)): label}, "sentence": sentence,
               "left_url": f"https://shapes.invalid/{os.path.basename(keys[0])}", "writer": writer, "label": label,
               "right_url": f"https://shapes.invalid/{os.path.basename(keys[1])}", "synset": synset, "query": query,
               "identifier": identifier}
    if split == "train":
        example["directory"] = directory
    else:
        example["extra_validations"] = {str(v): label if rng.random() < 0.95 else str(label != "True")
                                        for v in rng.sample(range(171), 4)}
    return example


def write_nlvr2(out, n_sets, seed):
    """The NLVR2 part of a world: n_sets image sets (15 % dev, 15 % test1, at least one each, the rest
    train), each as in NLVR2 four image pairs (pair ids 0-3) and two sentences (sentence ids 0 and 1,
    of two templates), each sentence written for all four pairs, so that split-set-pair-sentence
    names one example. Each pair is drawn for the labels its two sentences need: per template the
    label used less so far (ties at random), so labels are balanced and a sentence is true for some
    of its pairs and false for others. Images: JPEG bytes named -img0.png / -img1.png, as NLVR2's
    README warns that "not all images are actually PNGs". Returns (objects per image key, template
    per identifier)."""
    rng, nprng = random.Random(f"{seed}-nlvr2"), np.random.default_rng([seed, 2])
    n_dev = max(1, round(0.15 * n_sets))
    n_train = n_sets - 2 * n_dev
    used, queries = Counter(), Counter()  # (template, label) -> examples; synset -> sets
    lines = {split: [] for split in NLVR2_SPLITS}
    objects, templates = {}, {}
    for s in range(n_sets):
        split = "train" if s < n_train else "dev" if s < n_train + n_dev else "test1"
        set_id = s - (0 if split == "train" else n_train if split == "dev" else n_train + n_dev)
        names = rng.sample(sorted(NLVR2_TEMPLATES), 2)
        statements = [_nlvr2_statement(rng, t) for t in names]
        writers = [str(rng.randint(0, 170)) for _ in names]
        synset = statements[0][2]
        queries[synset] += 1
        examples = [[], []]  # per sentence
        for pair in range(4):
            targets = [rng.choice([v for v in (True, False) if used[(t, v)] == min(used[(t, True)], used[(t, False)])])
                       for t in names]
            left, right = _nlvr2_scenes(rng, [truth for _, truth, _ in statements], targets)
            directory = rng.randrange(100) if split == "train" else None
            keys = data.nlvr2_image_keys(f"{split}-{set_id}-{pair}-0", directory)
            for key, (bg, objs, fills) in zip(keys, (left, right)):
                buf = jpeg_bytes(render_scene(bg, objs, fills, nprng))
                atomic_write(os.path.join(out, "nlvr2", key), lambda f: f.write(buf), "wb")
                objects[key] = objs
            for k, ((sentence, truth, _), t) in enumerate(zip(statements, names)):
                identifier = f"{split}-{set_id}-{pair}-{k}"
                label = truth(left[1], right[1])
                used[(t, label)] += 1
                templates[identifier] = t
                examples[k].append(_nlvr2_example(rng, split, identifier, sentence, str(label), keys, writers[k],
                                                  synset, f"{synset}s{queries[synset]}", directory))
        lines[split] += examples[0] + examples[1]
    for split, examples in lines.items():
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        atomic_write(nlvr2_files(out, split)[0], lambda f: f.write(text))
    return objects, templates


def make_world(out, n_images=3000, seed=0, questions_per_image=3, gqa_per_image=2, nlvr2_sets=None):
    """Write the synthetic world under `out` in the real formats (see the module docstring).
    Two thirds of the images are train2014, one third val2014; of val2014, 30 % are Karpathy val,
    30 % test, the rest restval. GQA asks gqa_per_image questions on each of these scenes but the
    Karpathy val ones (write_gqa); NLVR2 has nlvr2_sets sets of four image pairs (write_nlvr2; default n_images // 20,
    i.e. 600 pairs for 3000 images). Last, the truth for oracle checks, shapes_scenes.json:
    {"images": [{image_id, image, objects, gqa_image_id (None: not in GQA)}], "questions": VQA [{question_id, image_id,
    kind, answer}], "gqa_questions": [{question_id, image_id, template, answer}], "nlvr2_images":
    {image key under nlvr2/: objects}, "nlvr2_templates": {identifier: template}}. Deterministic: the
    same seed gives byte-identical files."""
    if n_images < 20:  # fewer leave a Karpathy val, test or restval split, hence GQA val or testdev, empty
        raise ValueError(f"make_world: n_images must be at least 20, got {n_images}")
    nlvr2_sets = n_images // 20 if nlvr2_sets is None else nlvr2_sets
    if nlvr2_sets < 3:
        raise ValueError(f"make_world: nlvr2_sets must be at least 3 (one per split), got {nlvr2_sets}")
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    n_train = round(n_images * 2 / 3)
    n_val = n_images - n_train
    n_kval = n_ktest = n_val * 3 // 10
    used = Counter()  # (template, answer) -> questions so far

    vqa = {s: ([], []) for s in ("train2014", "val2014")}
    karpathy, scenes, truths, gqa_images = [], [], [], []
    sentid = 0
    for i in data.progress(range(n_images), "shapes", "img"):
        subtype = "train2014" if i < n_train else "val2014"
        image_id = 9 + 7 * i  # sparse ids, different from the Karpathy imgid, like COCO
        img, objects = draw_scene(rng, nprng)
        key = data.coco_image_key(subtype, image_id)
        buf = jpeg_bytes(img)
        atomic_write(os.path.join(out, key), lambda f: f.write(buf), "wb")
        _vqa_questions(rng, image_id, objects, used, questions_per_image, *vqa[subtype], truths)
        j = i - n_train
        split = "train" if j < 0 else "val" if j < n_kval else "test" if j < n_kval + n_ktest else "restval"
        sentences = []
        for raw in _captions(rng, objects):
            sentences.append({"tokens": _caption_tokens(raw), "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        karpathy.append({"filepath": subtype, "sentids": [s["sentid"] for s in sentences],
                         "filename": os.path.basename(key), "imgid": i, "split": split,
                         "sentences": sentences, "cocoid": image_id})
        scenes.append({"image_id": image_id, "image": key, "objects": objects})
        gqa_images.append((split, buf, objects))

    write_vqa(out, vqa)
    write_json({"images": karpathy, "dataset": "coco"}, os.path.join(out, data.KARPATHY), indent=None)
    gqa_ids, gqa_truths = write_gqa(out, gqa_images, seed, gqa_per_image)
    for scene, gqa_id in zip(scenes, gqa_ids):
        scene["gqa_image_id"] = gqa_id
    nlvr2_objects, nlvr2_templates = write_nlvr2(out, nlvr2_sets, seed)
    write_json({"images": scenes, "questions": truths, "gqa_questions": gqa_truths, "nlvr2_images": nlvr2_objects,
                "nlvr2_templates": nlvr2_templates}, os.path.join(out, SCENES), indent=None)
    atomic_write(os.path.join(out, VERSION_FILE), lambda f: f.write(f"{DEMO_VERSION}\n"))


def _vqa_questions(rng, image_id, objects, used, per_image, questions, annotations, truths):
    """Append one scene's per_image VQAv2 questions, their annotations (10 human answers) and their truths."""
    for k, (t, question, answer, possible) in enumerate(_pick_questions(rng, objects, used, per_image)):
        kind, _, qtype, atype = TEMPLATES[t]
        qid = image_id * 1000 + k
        answers = _human_answers(rng, kind, answer, possible)
        norm = Counter(normalize_answer(a) for a in answers)
        mc = min(norm, key=lambda a: (-norm[a], a))
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({
            "question_type": qtype, "multiple_choice_answer": mc,
            "answers": [{"answer": a, "answer_confidence": rng.choice(["yes", "yes", "yes", "maybe"]),
                         "answer_id": j + 1} for j, a in enumerate(answers)],
            "image_id": image_id, "answer_type": atype, "question_id": qid})
        truths.append({"question_id": qid, "image_id": image_id, "kind": kind, "answer": answer})


def write_vqa(out, vqa):
    """The VQAv2 question and annotation files of each subtype: vqa = {subtype: (questions, annotations)}."""
    info = {"description": "Synthetic shapes world in the VQAv2 format (routing-peft shapes.py)",
            "url": "", "version": "2.0", "year": 2024, "contributor": "routing-peft shapes.py",
            "date_created": "2024-01-01 00:00:00"}
    license_ = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "CC0 1.0"}
    for subtype, (questions, annotations) in vqa.items():
        q_path, a_path = data.vqa_files(out, subtype)
        write_json({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                     "license": license_, "data_subtype": subtype, "questions": questions}, q_path, indent=None)
        write_json({"info": info, "license": license_, "data_subtype": subtype,
                     "annotations": annotations, "data_type": "mscoco"}, a_path, indent=None)


def jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ensure_world(path=WORLD):
    """The synthetic world at `path`: generated once (python shapes.py world), or again when a file that
    make_world writes late is missing (an interrupted run) or the world is from another DEMO_VERSION of this
    file (its questions or images differ from what the README's numbers were measured on). Returns path."""
    files = (os.path.join(path, data.KARPATHY), gqa_files(path, "testdev")[0], nlvr2_files(path, "test1")[0],
             os.path.join(path, SCENES))
    if not all(os.path.isfile(p) for p in files):
        print(f"creating the synthetic world in {path} (once)")
        make_world(path)
    elif world_version(path) != str(DEMO_VERSION):
        print(f"the synthetic world in {path} is from an older shapes.py: creating it again")
        make_world(path)
    return path


def world_version(path):
    """The DEMO_VERSION that made the world at `path` (its VERSION_FILE, a few bytes), or "" (an older shapes.py)."""
    file = os.path.join(path, VERSION_FILE)
    if not os.path.isfile(file):
        return ""
    with open(file, encoding="utf-8") as f:
        return f.read().strip()


def world_texts(world):
    """Questions and captions of the synthetic world's training images (the tiny models' corpus)."""
    karpathy = data.read_karpathy(os.path.join(world, data.KARPATHY))
    train_ids = {img["cocoid"] for img in karpathy if data.karpathy_split(img["split"]) == "train"}
    captions = [s["raw"] for img in karpathy if img["cocoid"] in train_ids for s in img["sentences"]]
    questions = [r["question"] for r in data.read_vqa(world, "train2014") if r["image_id"] in train_ids]
    return questions, captions


def bart_texts(world):
    """The tiny BART's corpus: the training questions and captions, VQA's human answers, GQA's training questions
    and answers (train and val), NLVR2's training sentences and their labels' words. The answers stand alone, as
    the targets do (<s> answer </s>, no leading space), so that they are whole tokens, as in BART's vocabulary."""
    questions, captions = world_texts(world)
    vqa = [a for r in data.read_vqa(world, "train2014") for a in r["answers"]]
    gqa = data.read_gqa(gqa_files(world, "train")[0]) + data.read_gqa(gqa_files(world, "val")[0])
    nlvr2 = data.read_nlvr2(nlvr2_files(world, "train")[0])
    return questions + captions + vqa + [r["question"] for r in gqa] + [r["answer"] for r in gqa] + \
        [r["sentence"] for r in nlvr2] + ["true" if r["label"] else "false" for r in nlvr2]


# ---- the demo's tiny pretrained backbones --------------------------------------------------------

TINY = {  # the same architectures as the real backbones, tiny; d = 128 for ViT, RoBERTa and GPT-2 (no projection)
    "vit": models.Config("vit", 128, 4, 4, 512, 1e-12, image_size=64, patch_size=16),
    "roberta": models.Config("roberta", 128, 4, 4, 512, 1e-5, max_positions=66, dropout=0.1),
    "gpt2": models.Config("gpt2", 128, 4, 4, 512, 1e-5, max_positions=64, dropout=0.1),
    # CLIP's ResNet at the images' own 64 px: a 2 x 2 grid (one cell a quadrant), 256 channels (stem width 8)
    "clip_resnet": models.Config("clip_resnet", 256, 4, 4, 0, 1e-5, image_size=64, stages=(1, 1, 1, 1), output_dim=128,
                                 image_mean=models.CLIP_MEAN, image_std=models.CLIP_STD, image_resample="bicubic"),
    # no dropout in the tiny BART and T5: on 2 CPU cores their masks would cost a third of every step
    "bart": models.Config("bart", 128, 2, 4, 512, 1e-5, max_positions=66),
    "t5": models.Config("t5", 128, 2, 4, 512, 1e-6, pad_id=0, decoder_start_id=0, d_kv=32),
}
TINY_VOCAB = 1000
VIT_STEPS, VIT_LR, VIT_SCENES = 700, 2e-3, 8000
TEXT_STEPS, TEXT_LR = 400, 1e-3  # per text backbone
BART_STEPS, BART_LR = 800, 3e-3  # BART's decoder needs ~800 steps to learn to read its encoder (copy), not just the LM
T5_STEPS, T5_LR = 800, 3e-3
PRETRAIN_WARMUP = 50


def pretrain(model, head, batches, steps, lr, desc):
    """AdamW on model + head over `batches` (a function step -> loss): linear warm-up over
    PRETRAIN_WARMUP steps, then cosine decay (without warm-up the post-LN RoBERTa stalls at the
    unigram loss and gives the same hidden state for every input)."""
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    bar = data.progress(range(steps), desc, "step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / PRETRAIN_WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = batches(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# The ViT's pretraining targets: per quadrant (top left, top right, bottom left, bottom right) its
# colour, shape and size, with class 0 = empty quadrant; then the number of objects (0-4).
ATTRIBUTE_CLASSES = [1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES)] * 4 + [5]


def scene_attributes(objects):
    """Class labels (13,) of one scene's attributes, in the order of ATTRIBUTE_CLASSES."""
    colors, shapes, sizes = sorted(COLORS), list(SHAPES), sorted(SIZES)
    y = torch.zeros(len(ATTRIBUTE_CLASSES), dtype=torch.long)
    for o in objects:
        q = 3 * QUADRANTS.index(o["quadrant"])
        y[q:q + 3] = torch.tensor([1 + colors.index(o["color"]), 1 + shapes.index(o["shape"]),
                                   1 + sizes.index(o["size"])])
    y[-1] = len(objects)
    return y


def attribute_loss(logits, labels):
    """Mean cross-entropy over the 13 attribute groups: logits (B, sum(ATTRIBUTE_CLASSES)), labels (B, 13)."""
    groups = logits.split(ATTRIBUTE_CLASSES, dim=-1)
    return sum(F.cross_entropy(z, labels[:, j]) for j, z in enumerate(groups)) / len(groups)


# The CLIP ResNet's grid is what VL-Adapter feeds BART (here 2 x 2 cells, one a quadrant), so it is trained cell by
# cell too: one head names the colour, shape and size of each cell's object (class 0 = empty). Trained on the pooled
# attributes alone, a cell's colour is 56 % linearly readable from the cell (linear probe on fresh scenes), 99.9 %
# with the cells' loss, and BART, which reads the cells, has little to bind a question's words to.
CELL_CLASSES = ATTRIBUTE_CLASSES[:3]
CLIP_LR = 4e-3  # with the cells' loss (at the ViT's 2e-3: a cell's shape 79 % linearly readable, 89 % at 4e-3)


def cell_loss(logits, labels):
    """Mean cross-entropy over the grid cells' attributes: logits (B, 4, sum(CELL_CLASSES)), cell q (row-major, as
    CLIP's grid) scored against QUADRANTS[q]; labels (B, 13) as scene_attributes."""
    cells = labels[:, :12].reshape(-1, 4, 3)  # (B, 13) -> (B, 4 quadrants, colour / shape / size)
    groups = logits.split(CELL_CLASSES, dim=-1)  # 3 x (B, 4, classes)
    return sum(F.cross_entropy(z.flatten(0, 1), cells[..., j].flatten()) for j, z in enumerate(groups)) / len(groups)


def draw_scenes(n, seed, config):
    """n new scenes from the synthetic world's generator (not its stored images), JPEG round-tripped
    like the stored ones: (pixels (n, 3, S, S) preprocessed for the encoder, labels (n, 13))."""
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    pixels, labels = [], []
    for _ in data.progress(range(n), "draw scenes", "img"):
        img, objects = draw_scene(rng, nprng)
        with Image.open(io.BytesIO(jpeg_bytes(img))) as im:
            pixels.append(data.preprocess(im.convert("RGB"), config.image_size, config.image_mean, config.image_std,
                                          config.image_resample))
        labels.append(scene_attributes(objects))
    return torch.stack(pixels), torch.stack(labels)


def pretrain_vision(arch):
    """The tiny ViT or CLIP ResNet, trained briefly to name the attributes of freshly drawn scenes from its
    pooled output, the CLIP ResNet also from each grid cell (cell_loss; a stand-in for ImageNet-21k or CLIP
    pretraining: no image, question or caption of the demo's data is used)."""
    c = TINY[arch]
    pixels, labels = draw_scenes(VIT_SCENES, seed=1, config=c)
    model, head = models.build_model(c), nn.Linear(c.output_dim or c.d_model, sum(ATTRIBUTE_CLASSES))
    cells = nn.Linear(c.d_model, sum(CELL_CLASSES)) if arch == "clip_resnet" else None
    if arch == "vit":
        with torch.no_grad():  # distinct positions from the first step: learning starts much faster than from 0
            model.pos_embed.normal_(0.0, 0.5)
            model.cls_token.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        i = torch.randint(len(pixels), (64,), generator=g)
        grid, pooled = model(pixels[i])  # CLIP: grid (B, 4, d), pooled (B, d_out)
        scene = attribute_loss(head(pooled), labels[i])
        return scene if cells is None else scene + cell_loss(cells(grid), labels[i])

    heads = nn.ModuleList([head] + ([cells] if cells else []))
    return pretrain(model, heads, loss, VIT_STEPS, CLIP_LR if cells else VIT_LR, f"pretrain tiny {arch} (scene attributes)")


def pretrain_bart(tokenizer, texts):
    """The tiny BART, trained briefly as BART is: to rebuild a sentence from a copy with 30 % of its tokens
    masked (text infilling with one-token spans)."""
    c = dataclasses.replace(TINY["bart"], vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
    model = models.build_model(c)
    seqs = [torch.tensor(tokenizer.wrap(tokenizer.encode(t))[:c.max_positions - 4]) for t in texts]
    g = torch.Generator().manual_seed(0)

    def loss(step):
        i = torch.randint(len(seqs), (64,), generator=g).tolist()
        ids, mask = data.pad_sequences([seqs[j] for j in i], tokenizer.pad_id)  # (B, N)
        special = (ids == tokenizer.bos_id) | (ids == tokenizer.eos_id) | (mask == 0)
        noisy = ids.masked_fill((torch.rand(ids.shape, generator=g) < 0.3) & ~special, tokenizer.mask_id)
        decoder_input_ids, labels = data.seq2seq_targets([seqs[j] for j in i], c.decoder_start_id, tokenizer.pad_id)
        logits = model(noisy, mask, decoder_input_ids)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    return pretrain(model, nn.Identity(), loss, BART_STEPS, BART_LR, "pretrain tiny BART (denoising)")


def _proto_field(number, value):
    """One protocol-buffer field (spiece_model): float -> fixed32, int -> varint, str or bytes -> length-delimited."""
    def varint(n):
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    value = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(value)) + value


def spiece_model(texts):
    """The tiny T5's spiece.model, the bytes of a SentencePiece ModelProto (data.SentencePieceTokenizer reads it): a
    unigram model with T5's specials (<pad> 0, </s> 1, <unk> 2), then "▁word" for every word of `texts` and every
    character, scored by log frequency, characters 10 lower: each word of the world is one piece, as in t5-base."""
    words = Counter(w for t in texts for w in re.findall(r"\w+", t))
    chars = Counter(c for t in texts for c in t.replace(" ", data.SPACE))
    total = sum(words.values()) + sum(chars.values())
    pieces = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]  # types: 3 CONTROL, 2 UNKNOWN, 1 NORMAL
    pieces += [(data.SPACE + w, math.log(n / total), 1) for w, n in words.most_common()]
    pieces += [(c, math.log(n / total) - 10, 1) for c, n in chars.most_common()]
    proto = b"".join(_proto_field(1, _proto_field(1, p) + _proto_field(2, s) + _proto_field(3, t)) for p, s, t in pieces)
    return proto + _proto_field(2, _proto_field(3, 1)) + _proto_field(3, _proto_field(1, "identity"))  # unigram, no map


def span_corruption(ids, tokenizer, g, rate=0.15, span=3):
    """T5's objective on one text's token ids (no </s>): spans of `span` tokens at random starts, about `rate` of the
    tokens (at least one span), each replaced in the input by the next sentinel <extra_id_k>; the target is each
    sentinel followed by its span, then one more sentinel (the T5 paper, 3.1.4). -> (input ids, target ids) + </s>."""
    n, last = len(ids), len(tokenizer) - 1  # <extra_id_k> = last - k
    masked = torch.zeros(n, dtype=torch.bool)
    for start in torch.randint(n, (max(1, round(n * rate / span)),), generator=g).tolist():
        masked[start:start + span] = True
    inputs, targets, k = [], [], 0
    for i in range(n):
        if masked[i] and (i == 0 or not masked[i - 1]):  # a span starts: its sentinel in both
            inputs.append(last - k)
            targets.append(last - k)
            k += 1
        (targets if masked[i] else inputs).append(ids[i])
    return inputs + [tokenizer.eos_id], targets + [last - k, tokenizer.eos_id]


def pretrain_t5(tokenizer, texts):
    """The tiny T5, trained briefly as T5 is: span corruption (span_corruption)."""
    c = dataclasses.replace(TINY["t5"], vocab_size=len(tokenizer))
    model = models.build_model(c)
    seqs = [tokenizer.encode(t) for t in texts]
    g = torch.Generator().manual_seed(0)

    def loss(step):
        pairs = [span_corruption(seqs[j], tokenizer, g) for j in torch.randint(len(seqs), (64,), generator=g).tolist()]
        ids, mask = data.pad_sequences([torch.tensor(i) for i, _ in pairs], tokenizer.pad_id)  # (B, N)
        decoder_input_ids, labels = data.seq2seq_targets([t for _, t in pairs], c.decoder_start_id, tokenizer.pad_id)
        return F.cross_entropy(model(ids, mask, decoder_input_ids).flatten(0, 1), labels.flatten())

    return pretrain(model, nn.Identity(), loss, T5_STEPS, T5_LR, "pretrain tiny T5 (span corruption)")


def pretrain_text(arch, tokenizer, texts):
    """The tiny RoBERTa (masked LM) or GPT-2 (next-token LM) on the synthetic world's text."""
    c = dataclasses.replace(TINY[arch], vocab_size=len(tokenizer), pad_id=tokenizer.pad_id)
    model = models.build_model(c)
    seqs = [torch.tensor(tokenizer.wrap(tokenizer.encode(t))[:c.max_positions - 4]) for t in texts]
    g = torch.Generator().manual_seed(0)
    if arch == "roberta":
        head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.LayerNorm(c.d_model))
    else:
        head = nn.Identity()

    def loss(step):
        i = torch.randint(len(seqs), (64,), generator=g).tolist()
        ids, mask = data.pad_sequences([seqs[j] for j in i], tokenizer.pad_id)  # (B, N)
        if arch == "gpt2":
            labels = ids.masked_fill(mask == 0, -100)
            logits = model(ids)  # (B, N, V)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        special = (ids == tokenizer.bos_id) | (ids == tokenizer.eos_id) | (mask == 0)
        chosen = (torch.rand(ids.shape, generator=g) < 0.15) & ~special  # (B, N)
        labels = ids.masked_fill(~chosen, -100)
        u = torch.rand(ids.shape, generator=g)
        noisy = torch.where(chosen & (u < 0.8), tokenizer.mask_id, ids)  # 80 % <mask>, 10 % random, 10 % kept
        noisy = torch.where(chosen & (u >= 0.8) & (u < 0.9), torch.randint(len(tokenizer), ids.shape, generator=g), noisy)
        h = head(model(noisy, mask))  # (B, N, d)
        return F.cross_entropy((h @ model.wte.weight.T).flatten(0, 1), labels.flatten())

    return pretrain(model, head, loss, TEXT_STEPS, TEXT_LR, f"pretrain tiny {arch} ({'masked' if arch == 'roberta' else 'next-token'} LM)")


def tiny_backbone(arch):
    """Path of the demo's tiny pretrained `arch` backbone (vit, roberta, gpt2, clip_resnet, bart, t5), pretrained on first use
    (about a minute each) from a fixed seed: the same weights whatever ran before."""
    path = os.path.join(TINY_DIR, f"{arch}-v{DEMO_VERSION}.pt")  # another version's file is never read
    if os.path.isfile(path):
        return path
    if arch not in TINY:
        raise ValueError(f"no tiny demo backbone for arch {arch!r}; there are {sorted(TINY)}")
    torch.manual_seed(0)
    ensure_world()
    if arch in ("vit", "clip_resnet"):
        models.save_checkpoint(pretrain_vision(arch), path)
    elif arch == "bart":
        texts = bart_texts(WORLD)
        tokenizer = data.BPETokenizer(**data.learn_bpe(texts, TINY_VOCAB))
        models.save_checkpoint(pretrain_bart(tokenizer, texts), path, tokenizer.to_data())
    elif arch == "t5":
        texts = bart_texts(WORLD)
        tokenizer = data.SentencePieceTokenizer(spiece_model(texts))
        models.save_checkpoint(pretrain_t5(tokenizer, texts), path, tokenizer.to_data())
    else:
        questions, captions = world_texts(WORLD)
        tokenizer = data.BPETokenizer(**data.learn_bpe(questions + captions, TINY_VOCAB))
        model = pretrain_text(arch, tokenizer, questions + captions if arch == "roberta" else captions)
        models.save_checkpoint(model, path, tokenizer.to_data())
    print(f"saved the tiny pretrained {arch} to {path}")
    return path


# ---- pictures: the study's chart and the demos' galleries (Pillow only) -------------------------------------

# Text is a slightly bluish dark grey: its anti-aliased edges are never a pure grey, so bars, error bars and
# the baseline keep colours of their own (tests find them by colour).
WHITE, INK, FAINT, GRID = (255, 255, 255), (33, 37, 48), (100, 106, 120), (228, 228, 228)
BASELINE = (0, 0, 0)           # the text-only baseline's dashed line; nothing else is pure black
ERROR_BAR = (70, 70, 70)       # mean ± std over seeds
RIGHT, WRONG = (0, 135, 45), (205, 25, 25)
ROUTE_COLORS = [(150, 150, 150), (230, 159, 0), (0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233),
                (213, 94, 0), (120, 80, 40)]  # one per route, in order of appearance: Okabe-Ito, grey first
BAR, GROUP_GAP, PLOT_H, MAX_WIDTH = 12, 18, 200, 1000  # chart geometry in pixels


def font(size):
    """Pillow's built-in scalable font (Aileron) at `size` pixels: present wherever Pillow >= 10.1 is."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a fixed-size bitmap font, too small for a README picture
        raise RuntimeError("the pictures need Pillow >= 10.1 (a scalable built-in font): pip install -U pillow") from None


def save_png(img, path):
    """Atomic PNG write (eval.atomic_write): a crash never leaves a half-written picture."""
    atomic_write(path, lambda f: img.save(f, format="PNG", optimize=True), "wb")


def text_width(text, fnt):
    return math.ceil(fnt.getlength(text))


def wrap(text, fnt, width):
    """`text` in lines no wider than `width` pixels, broken at spaces (a longer word gets a line of its own)."""
    lines = []
    for word in str(text).split():
        if lines and text_width(lines[-1] + " " + word, fnt) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def nice_axis(top):
    """(axis maximum, tick step) for values up to `top`: at most 8 steps of 1, 2 or 5 x 10^k, 5 % headroom."""
    top = max(top * 1.05, 1e-9)
    mag = 10 ** math.floor(math.log10(top / 5))
    step = next(m * mag for m in (1, 2, 5, 10) if top / (m * mag) <= 8)
    return step * math.ceil(top / step), step


# ---- the study (train.py --study): its runs, its table and its chart ---------------------------------------
#
# Per task, STUDY's rows (method, control, routes) x seeds (from --seed on): VQA and captions on the tiny backbones (a
# real text checkpoint serves one task: --task), or CLIP-BART (--task multitask). A control changes the visual input
# (None: the setting's own); STUDY's options apply unless given; options a method does not read take their defaults
# (train.study_grid). The runs' final records make the table (study_rows, study_table) and the chart (study_chart).
ROUTES5, NONE = ("none", "add", "mul", "matmul", "matmul_expand"), ("none",)
CONTROLS = {None: {}, "noprefix": {"prefix": False}, "shuffled": {"shuffle_visual": True}, "cls": {"visual": "cls"},
            "mean": {"visual": "mean"}, "patches": {"visual": "patches"}}  # name: options
BASELINES = [("xattn", None, NONE), ("xattn", "patches", NONE), ("bitfit", None, NONE), ("full", None, NONE)]
STUDY = {  # task: ([(peft, control, routes)], seeds, options); seeds, epochs cut before rows: ~30 min a study on 2 cores
    "vqa": ([("lora", c, ROUTES5) for c in (None, "noprefix", "shuffled")] + [("lora", c, ("mul",)) for c in ("cls", "mean")]
            + [("lora", "patches", ("matmul",)), ("adapter", None, ROUTES5)] + BASELINES, 2, {"epochs": 3}),
    "caption": ([("lora", None, ROUTES5), ("adapter", None, ROUTES5)] + BASELINES, 2, {"epochs": 1}),
    "multitask": ([(p, None, ROUTES5) for p in ("lora", "adapter", "vlpet-large")] + [("lora", "patches", ("matmul",))] +
                  [(p, None, NONE) for p in ("vlpet-middlex", "vlpet-middley", "vlpet-small")] + BASELINES, 2,
                  {"epochs": 2, "train_limit": 4000})}
STUDY_LR = {"full": 0.1}  # a method's learning rate relative to the study's (VL-PET's scripts: full 1e-4, others 1e-3)
STUDY_NOTE = ("visual: the feature that is visual prefix and x_R (patches: all); noprefix: routing is the image's only path; "
              "shuffled: another image's features (a route that still helps is not using the image). xattn: LoRA with "
              f"cross-attention to x_R; full at {STUDY_LR['full']:g} x the learning rate. gain: over route none of the method "
              "and visual input, else LoRA's. Seeds (the papers: 3) and epochs are cut, never rows, to keep a study near 30 "
              "minutes on 2 CPU cores.")
STUDY_METRICS = {"vqa": ("vqa_accuracy",), "caption": ("CIDEr", "Bleu_4"),  # the first is the gain's
                 "multitask": ("mean", "vqa_accuracy", "gqa_accuracy", "nlvr2_accuracy", "CIDEr")}


def study_value(record, name):
    """A record's metric for the study; "mean": VL-PET's average of VQA, GQA and NLVR2 accuracy and CIDEr x100."""
    if name == "mean":
        return (record["vqa_accuracy"] + record["gqa_accuracy"] + record["nlvr2_accuracy"] + 100 * record["CIDEr"]) / 4
    return record[name]


def study_rows(records, unrouted):
    """records {(task, peft, control, route, seed): final record} -> one row per (task, peft, control, route): {task,
    peft, control, route, params (sorted set), split, metric: (mean, std) for each of STUDY_METRICS, gain: the first
    metric's relative change over route none of the method (of LoRA for the `unrouted` methods) and control, else of
    control None; None for none itself}, plus one text-only row per task (peft and control None)."""
    groups = defaultdict(list)
    for (task, peft, control, route, seed), r in records.items():
        groups[task, peft, control, route].append(r)
    rows = [{"task": task, "peft": peft, "control": control, "route": route, "split": rs[0]["split"], "params": sorted(
        {r["trainable_params"] for r in rs}), **{m: mean_std([study_value(r, m) for r in rs]) for m in STUDY_METRICS[task]}}
            for (task, peft, control, route), rs in groups.items()]
    nones = {(r["task"], r["peft"], r["control"]): r for r in rows if r["route"] == "none"}
    for row in rows:
        head, peft = STUDY_METRICS[row["task"]][0], "lora" if row["peft"] in unrouted else row["peft"]
        none = nones.get((row["task"], peft, row["control"]), nones.get((row["task"], peft, None)))
        row["gain"] = None if none in (None, row) or none[head][0] == 0 else row[head][0] / none[head][0] - 1
    for task in dict.fromkeys(k[0] for k in records):
        r = next(r for k, r in records.items() if k[0] == task)
        rows.append({"task": task, "peft": None, "control": None, "route": None, "params": [0], "split": r["split"],
                     "gain": None, **{m: (study_value(r["text_only"], m), 0.0) for m in STUDY_METRICS[task]}})
    return rows


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def study_table(rows, grid, scale):
    """Markdown: one table per task of study_rows' rows, mean ± std over seeds, the metrics times scale (CIDEr and BLEU
    x100 as in papers); grid {(task, peft, control, route, seed): the run's options}; STUDY_NOTE closes it."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        names = STUDY_METRICS[task]
        runs = [c for k, c in grid.items() if k[0] == task]
        own = next(c.visual for k, c in grid.items() if k[0] == task and not k[2])  # the setting's own x_R
        limit = f", the first {runs[0].train_limit:,} training examples of each task" if runs[0].train_limit else ""
        epochs, seeds, split = runs[0].epochs, len({c.seed for c in runs}), next(r["split"] for r in rows if r["task"] == task)
        out += [f"### {task}: {' / '.join(n + (' x100' if n in scale else ' (%)') for n in names)}, mean ± std over "
                f"{seeds} seed(s), {epochs} epoch(s){limit}, {split} split", "",
                "| peft | visual | route | " + " | ".join(names) + " | trainable params | gain |", "|---|---|---|" + "---:|" * (len(names) + 2)]
        for r in (r for r in rows if r["task"] == task):
            label = ("text-only baseline", "", "") if r["peft"] is None else (r["peft"], r["control"] or own, r["route"])
            values = " | ".join(f"{scale.get(n, 1) * r[n][0]:.2f}" + (f" ± {scale.get(n, 1) * r[n][1]:.2f}" if r["peft"]
                                                                      else "") for n in names)
            gain = "" if r["gain"] is None else f"{100 * r['gain']:+.1f} %"
            out.append(f"| {' | '.join(label)} | {values} | {'/'.join(f'{p:,}' for p in r['params'])} | {gain} |")
        out.append("")
    out.append(STUDY_NOTE)
    return "\n".join(out) + "\n"


def study_chart(rows, path, metric, scale=None, title="Study: mean over seeds per route, error bars ± std"):
    """Draw the study (study_rows' rows) to the PNG `path`: per task a panel, in it a group per
    (peft, control) with one bar per route (the mean over seeds) and an error bar (± std; none for one
    seed), and the task's text-only baseline row (peft None) as a dashed line with its value.

    rows: dicts with "task", "peft", "control", "route" and, for the plotted metric, (mean, std).
    metric: {task: the metric its panel plots}, e.g. {"vqa": "vqa_accuracy", "caption": "CIDEr"}.
    scale: {metric: factor shown}, e.g. {"CIDEr": 100}; the axis says "x100", else the metric is in %.
    A route missing from a group leaves its slot empty, so a route sits at the same place in every group.
    Panels come in the order of the rows' tasks, side by side, wrapped into rows of MAX_WIDTH pixels."""
    scale = scale or {}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks or [t for t in tasks if t not in metric]:
        raise ValueError(f"study_chart: no metric for task(s) {[t for t in tasks if t not in metric] or 'none: no rows'}")
    routes = list(dict.fromkeys(r["route"] for r in rows if r["peft"] is not None))
    if len(routes) > len(ROUTE_COLORS):
        raise ValueError(f"study_chart: {len(routes)} routes, but colours for only {len(ROUTE_COLORS)}")
    colors = dict(zip(routes, ROUTE_COLORS))
    panels = [chart_panel([r for r in rows if r["task"] == t], t, metric[t], scale.get(metric[t], 1), colors)
              for t in tasks]
    error_bars = any(r[metric[r["task"]]][1] > 0 for r in rows if r["peft"] is not None)
    save_png(stack(title, colors, error_bars, panels), path)


def stack(title, colors, error_bars, panels, gap=10):
    """The picture: the title and legend on top, then the panels left to right, wrapped into rows of
    MAX_WIDTH pixels."""
    lines = [[]]
    for p in panels:
        if lines[-1] and sum(q.width + gap for q in lines[-1]) + p.width > MAX_WIDTH:
            lines.append([])
        lines[-1].append(p)
    width = max(480, *(sum(q.width + gap for q in line) - gap for line in lines))
    head = chart_legend(title, colors, width, error_bars)
    height = head.height + sum(max(q.height for q in line) + gap for line in lines)
    img = Image.new("RGB", (width, height), WHITE)
    img.paste(head, (0, 0))
    y = head.height
    for line in lines:
        x = 0
        for p in line:
            img.paste(p, (x, y))
            x += p.width + gap
        y += max(q.height for q in line) + gap
    return img


def chart_legend(title, colors, width, error_bars):
    """The title, then one swatch per route, the baseline's dashed line and (if any are drawn) the error
    bar, wrapped to `width`."""
    title_font, small = font(17), font(13)
    items = [(name, "swatch", c) for name, c in colors.items()]
    items += [("text-only baseline", "dash", BASELINE)] + [("± std over seeds", "error", ERROR_BAR)] * error_bars
    img = Image.new("RGB", (width, 400), WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, font=title_font, fill=INK)
    x, y = 10, 36
    for name, kind, c in items:
        w = 26 + text_width(name, small) + 16
        if x + w > width:
            x, y = 10, y + 20
        if kind == "swatch":
            draw.rectangle([x, y + 2, x + 15, y + 13], fill=c)
        elif kind == "dash":
            dashed_line(draw, x, x + 20, y + 8)
        else:
            draw.line([(x + 8, y), (x + 8, y + 15)], fill=c)
            draw.line([(x + 4, y), (x + 12, y)], fill=c)
            draw.line([(x + 4, y + 15), (x + 12, y + 15)], fill=c)
        draw.text((x + 24, y + 8), name, font=small, fill=INK, anchor="lm")
        x += w
    return img.crop((0, 0, width, y + 26))


def dashed_line(draw, x0, x1, y):
    for x in range(x0, x1, 8):
        draw.line([(x, y), (min(x + 5, x1), y)], fill=BASELINE, width=2)


def chart_panel(rows, task, name, k, colors):
    """One task's panel: bars per (peft, control) group and route, error bars, the baseline, axes."""
    small, bold = font(13), font(15)
    bars = [r for r in rows if r["peft"] is not None]
    baseline = next((k * r[name][0] for r in rows if r["peft"] is None), None)
    groups = list(dict.fromkeys((r["peft"], r["control"]) for r in bars))
    labels = [[peft] + ([control] if control not in (None, "full") else []) for peft, control in groups]
    top = max([k * (r[name][0] + r[name][1]) for r in bars] + [baseline or 0])
    if min([k * r[name][0] for r in bars] + [baseline or 0]) < 0:
        raise ValueError(f"study_chart: a negative {name} in task {task}: bars start at 0")
    y_max, step = nice_axis(top)
    ticks = [(i * step, f"{i * step:g}") for i in range(round(y_max / step) + 1)]
    widths = [max(len(colors) * BAR, *(text_width(s, small) + 6 for s in lab)) for lab in labels]
    left = 14 + max(text_width(s, small) for _, s in ticks)
    right = 10 + (text_width(f"{baseline:.1f}", small) if baseline is not None else 0)
    plot_w = sum(widths) + GROUP_GAP * (len(groups) + 1)
    y0 = 50 + PLOT_H  # the zero line: title and axis label above, group labels below
    img = Image.new("RGB", (left + plot_w + right, y0 + 16 + 16 * max(map(len, labels))), WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), task, font=bold, fill=INK)
    draw.text((left, 26), f"{name} " + (f"x{k:g}" if k != 1 else "(%)"), font=small, fill=FAINT)
    for t, s in ticks:
        draw.line([(left, value_row(t, y0, y_max)), (left + plot_w, value_row(t, y0, y_max))], fill=GRID)
        draw.text((left - 6, value_row(t, y0, y_max)), s, font=small, fill=INK, anchor="rm")
    x = left + GROUP_GAP
    for (peft, control), lab, w in zip(groups, labels, widths):
        x_bar = x + (w - len(colors) * BAR) // 2
        for slot, route in enumerate(colors):
            r = next((r for r in bars if (r["peft"], r["control"], r["route"]) == (peft, control, route)), None)
            if r is not None:
                draw_bar(draw, x_bar + slot * BAR, y0, k * r[name][0], k * r[name][1], y_max, colors[route])
        for i, s in enumerate(lab):
            draw.text((x + w // 2, y0 + 6 + 16 * i), s, font=small, fill=INK, anchor="ma")
        x += w + GROUP_GAP
    draw.line([(left, y0), (left + plot_w, y0)], fill=INK)
    if baseline is not None:
        y = value_row(baseline, y0, y_max)
        dashed_line(draw, left, left + plot_w, y)
        draw.text((left + plot_w + 4, y), f"{baseline:.1f}", font=small, fill=INK, anchor="lm")
    return img


def value_row(value, y0, y_max):
    """The pixel row of `value` on an axis from 0 (row y0) to y_max (PLOT_H rows higher)."""
    return y0 - round(value / y_max * PLOT_H)


def draw_bar(draw, x, y0, mean, std, y_max, color):
    """A bar of height mean (a pixel narrower than its slot) and, if std > 0, an error bar mean ± std."""
    top = value_row(mean, y0, y_max)
    if top < y0:
        draw.rectangle([x, top, x + BAR - 2, y0 - 1], fill=color)
    if std > 0:
        c = x + (BAR - 2) // 2
        lo, hi = value_row(max(mean - std, 0), y0, y_max), value_row(mean + std, y0, y_max)
        draw.line([(c, lo), (c, hi)], fill=ERROR_BAR)
        draw.line([(c - 2, hi), (c + 2, hi)], fill=ERROR_BAR)
        draw.line([(c - 2, lo), (c + 2, lo)], fill=ERROR_BAR)


def gallery(examples, path, title, columns=4, box=128):
    """Draw test examples to the PNG `path`, `columns` per row: each example's image(s) fitted into
    `box` x `box` pixels (a 64-px image is upscaled 2x, pixel for pixel), its text, the prediction
    (green if right, red if wrong) and the truth.

    examples: dicts with "images" (a list of one or two PIL images or file paths: an NLVR2 pair side by
    side), "text" (the question, the statement, or e.g. "caption"), "prediction" (the answer or the
    generated caption) and "truth" (the true answer, or a list of references: the one the prediction
    matches is shown, else the first). Right means equal up to case, spacing and a final period."""
    if not examples:
        raise ValueError("gallery: no examples")
    small = font(13)
    n_images = max(len(e["images"]) for e in examples)
    cell_w = max(240, n_images * box + (n_images - 1) * 6)
    cells = [gallery_cell(e, cell_w, box, small) for e in examples]
    rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
    width = 10 + len(rows[0]) * (cell_w + 14)
    img = Image.new("RGB", (width, 40 + sum(max(c.height for c in row) + 14 for row in rows)), WHITE)
    ImageDraw.Draw(img).text((10, 10), title, font=font(17), fill=INK)
    y = 40
    for row in rows:
        for i, cell in enumerate(row):
            img.paste(cell, (10 + i * (cell_w + 14), y))
        y += max(c.height for c in row) + 14
    save_png(img, path)


def same_text(a, b):
    """Equal up to case, spacing and a final period: 'A red circle.' == 'a red  circle'."""
    return normal_text(a) == normal_text(b)


def normal_text(s):
    return " ".join(str(s).lower().rstrip().rstrip(".").split())


def gallery_cell(example, width, box, fnt):
    """One example: its image(s) centred at the top, then the text, the prediction and the truth, wrapped."""
    images = [fit(im, box) for im in example["images"]]
    truths = example["truth"] if isinstance(example["truth"], (list, tuple)) else [example["truth"]]
    match = [t for t in truths if same_text(example["prediction"], t)]
    shown = (match or truths)[0]
    lines = [(s, INK) for s in wrap(example["text"], fnt, width)]
    lines += [(s, RIGHT if match else WRONG) for s in wrap(f"predicted: {example['prediction']}", fnt, width)]
    lines += [(s, FAINT) for s in wrap(f"{'reference' if len(truths) > 1 else 'true'}: {shown}", fnt, width)]
    cell = Image.new("RGB", (width, box + 8 + 17 * len(lines)), WHITE)
    x = (width - sum(im.width for im in images) - 6 * (len(images) - 1)) // 2
    for im in images:
        cell.paste(im, (x, (box - im.height) // 2))
        x += im.width + 6
    draw = ImageDraw.Draw(cell)
    for i, (s, color) in enumerate(lines):
        draw.text((0, box + 8 + 17 * i), s, font=fnt, fill=color)
    return cell


def fit(im, box):
    """An RGB copy of `im` (a PIL image or a file path) fitted into box x box: upscaled by a whole factor,
    pixel for pixel, if it is smaller (a 64-px image shows its shapes sharp at 2x), else shrunk with Lanczos."""
    if isinstance(im, (str, os.PathLike)):
        with Image.open(im) as f:
            im = f.convert("RGB")
    im = im.convert("RGB")
    factor = box // max(im.size)
    if factor >= 1:
        return im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    ratio = box / max(im.size)
    return im.resize((max(1, round(im.width * ratio)), max(1, round(im.height * ratio))), Image.LANCZOS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("world", help="write the synthetic world (VQAv2, COCO + Karpathy, GQA, NLVR2 formats)")
    p.add_argument("--out", default=WORLD, help=f"output folder, data and images (default: {WORLD})")
    p.add_argument("--n-images", type=int, default=3000,
                   help="number of VQA / COCO / GQA scenes (2/3 train2014, 1/3 val2014); NLVR2 has n-images / 5 pairs")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    sub.add_parser("backbones", help=f"pretrain every tiny backbone ({', '.join(TINY)}) into {TINY_DIR} (once)")
    args = parser.parse_args(argv)
    if args.command == "world":
        make_world(args.out, n_images=args.n_images, seed=args.seed)
        print(f"wrote {args.n_images} scenes with VQA and GQA questions and captions, and "
              f"{4 * (args.n_images // 20)} NLVR2 image pairs, to {args.out}")
    else:
        for arch in TINY:
            print(tiny_backbone(arch))


if __name__ == "__main__":
    main()
