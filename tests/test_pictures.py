"""The pictures (shapes.study_chart, shapes.gallery), read back pixel by pixel.

    python -m pytest -q tests/test_pictures.py

Bars, error bars and the baseline are found by their colour (shapes.ROUTE_COLORS, ERROR_BAR, BASELINE);
every expected height and position comes from the values the test draws, never from the module's layout.
"""
import os

import numpy as np
import pytest
from PIL import Image

import shapes


def row(route, mean, std=0.0, peft="lora", control="full", task="vqa", metric="vqa_accuracy"):
    return {"task": task, "peft": peft, "control": control, "route": route, metric: (mean, std)}


def baseline_row(value, task="vqa", metric="vqa_accuracy"):
    return {"task": task, "peft": None, "control": None, "route": None, metric: (value, 0.0)}


def chart(tmp_path, rows, metric=None, scale=None, name="study.png"):
    path = tmp_path / name
    shapes.study_chart(rows, str(path), metric or {"vqa": "vqa_accuracy"}, scale)
    return path, np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)


def mask(pixels, color):
    return (pixels == np.array(color)).all(-1)  # (H, W)


def bars(pixels, color, min_height=20):
    """Rectangles [x0, x1, top, bottom] (inclusive) where `color` runs down at least min_height pixels, in
    reading order: per column its vertical runs, adjacent columns with the same bottom merged (an error
    bar may cut into a bar's top); runs apart by at most 2 pixels are one (a baseline's dash or an error
    bar's cap across a bar). The legend's swatches are shorter than min_height."""
    m = mask(pixels, color)
    rects = []
    for x in range(m.shape[1]):
        ys = np.flatnonzero(m[:, x])
        for run in np.split(ys, np.flatnonzero(np.diff(ys) > 3) + 1) if len(ys) else []:
            if len(run) < min_height:
                continue
            top, bottom = int(run[0]), int(run[-1])
            same = [r for r in rects if r[1] == x - 1 and r[3] == bottom]
            if same:
                same[0][1], same[0][2] = x, min(same[0][2], top)
            else:
                rects.append([x, x, top, bottom])
    return sorted(rects, key=lambda r: (r[3], r[0]))


def height(rect):
    return rect[3] - rect[2] + 1


def test_bar_heights_proportional_to_values_and_baseline_at_its_value(tmp_path):
    _, px = chart(tmp_path, [row("none", 20.0), row("mul", 40.0), baseline_row(30.0)])
    [none], [mul] = bars(px, shapes.ROUTE_COLORS[0]), bars(px, shapes.ROUTE_COLORS[1])
    assert none[3] == mul[3]  # both stand on the zero line
    assert abs(height(mul) - 2 * height(none)) <= 2, (none, mul)
    zero = mul[3] + 1  # the row below the bars: value 0
    y_line = np.flatnonzero(mask(px, shapes.BASELINE).sum(1) > 30)  # the dashed line's rows (2 px thick)
    assert len(y_line) in (1, 2)
    expected = zero - 30.0 / 40.0 * (zero - mul[2])  # value 30 on the scale the 40 bar sets
    assert abs(y_line.mean() - expected) <= 1.5, (y_line, expected)


def test_error_bar_spans_mean_plus_minus_std(tmp_path):
    _, px = chart(tmp_path, [row("none", 40.0, 10.0), row("mul", 20.0, 0.0)])
    [none], [mul] = bars(px, shapes.ROUTE_COLORS[0]), bars(px, shapes.ROUTE_COLORS[1])
    per_unit, zero = height(mul) / 20.0, mul[3] + 1  # pixels per unit, from the 20 bar
    assert abs(height(none) - 40 * per_unit) <= 2
    [err] = bars(px, shapes.ERROR_BAR, min_height=25)  # the 40 ± 10 bar has one, the 20 ± 0 bar none
    assert none[0] <= err[0] <= err[1] <= none[1]  # on its bar
    assert abs((zero - err[2]) - 50 * per_unit) <= 2 and abs((zero - err[3]) - 30 * per_unit) <= 2, (err, zero, per_unit)


def test_one_seed_draws_no_error_bars(tmp_path):
    _, px = chart(tmp_path, [row("none", 40.0), row("mul", 30.0), baseline_row(10.0)])
    assert not mask(px, shapes.ERROR_BAR).any()  # nor its legend entry
    assert len(bars(px, shapes.ROUTE_COLORS[0])) == len(bars(px, shapes.ROUTE_COLORS[1])) == 1


def test_missing_routes_leave_their_slot_empty(tmp_path):
    rows = [row("none", 30.0), row("add", 35.0), row("mul", 40.0),
            row("none", 25.0, peft="adapter"), row("mul", 45.0, peft="adapter")]  # adapter has no "add"
    _, px = chart(tmp_path, rows)
    none, add, mul = (bars(px, c) for c in shapes.ROUTE_COLORS[:3])
    assert (len(none), len(add), len(mul)) == (2, 1, 2)
    # a route keeps its place: none -> mul is the same distance in both groups, and the lone add bar
    # sits between none and mul of the lora group
    assert mul[0][0] - none[0][0] == mul[1][0] - none[1][0]
    assert none[0][0] < add[0][0] < mul[0][0] < none[1][0]
    assert abs(height(mul[1]) / height(none[1]) - 45 / 25) < 0.03  # the adapter bars' values


def test_one_panel_per_task_with_bars_and_baseline_on_one_scale(tmp_path):
    """CIDEr 0.6 shown x100 beside VQA 60 (%): each task has its panel, and in both the bar and the
    baseline (0.3 x100 and 30) stand at the same heights: the scale reaches bars and baseline alike.
    (Axes start at 0 and fit the data, so the scale itself changes only the numbers written.)"""
    rows = [row("none", 60.0), row("none", 0.6, task="caption", metric="CIDEr"),
            baseline_row(30.0), baseline_row(0.3, task="caption", metric="CIDEr")]
    _, px = chart(tmp_path, rows, {"vqa": "vqa_accuracy", "caption": "CIDEr"}, {"CIDEr": 100})
    vqa, caption = bars(px, shapes.ROUTE_COLORS[0])
    assert vqa[1] < caption[0] and vqa[2:] == caption[2:]
    middle = (vqa[1] + caption[0]) // 2
    line = mask(px, shapes.BASELINE)
    left, right = (np.flatnonzero(half.sum(1) > 30) for half in (line[:, :middle], line[:, middle:]))
    assert len(left) and list(left) == list(right)


def test_chart_is_written_atomically(tmp_path, monkeypatch):
    """A failure while the PNG is written leaves no picture and no temporary file behind."""
    def broken_save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            fp = open(fp, "wb")
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        shapes.study_chart([row("none", 20.0)], str(tmp_path / "study.png"), {"vqa": "vqa_accuracy"})
    with pytest.raises(OSError, match="disk full"):
        shapes.gallery([example(grey(), "yes", "yes")], str(tmp_path / "gallery.png"), "g")
    assert os.listdir(tmp_path) == []


def readme_rows():
    """The README's study (VQA + captioning, lora/adapter x 5 routes x 3 seeds + controls), as study_rows
    gives it: caption metrics as fractions."""
    routes = ("none", "add", "mul", "matmul", "matmul_expand")
    vqa = {("lora", "full"): [48.37, 48.67, 54.06, 45.40, 52.51], ("lora", "noprefix"): [45.99, 47.51, 53.60, 45.80, 54.49],
           ("lora", "shuffled"): [45.18, 45.64, 46.09, 42.92, 44.17], ("adapter", "full"): [40.31, 41.71, 50.09, 27.59, 31.62]}
    cider = {("lora", "full"): [0.9656, 1.7632, 1.7903, 1.7165, 1.7992], ("adapter", "full"): [0.8415, 1.7217, 1.7549, 1.6931, 1.7312]}
    rows = [row(r, m, 1.5, peft, control) for (peft, control), ms in vqa.items() for r, m in zip(routes, ms)]
    rows += [row(r, m, 0.04, peft, control, "caption", "CIDEr") for (peft, control), ms in cider.items() for r, m in zip(routes, ms)]
    return rows + [baseline_row(34.17), baseline_row(0.4036, "caption", "CIDEr")]


def test_realistic_charts_fit_a_readme(tmp_path):
    """The README's study and a 5-panel study (4 tasks + mean, 4 PEFT methods) stay small and narrow."""
    path, px = chart(tmp_path, readme_rows(), {"vqa": "vqa_accuracy", "caption": "CIDEr"}, {"CIDEr": 100})
    assert os.path.getsize(path) < 150_000 and px.shape[1] <= 1000 and px.shape[0] < 600  # README width
    tasks = ("vqa", "gqa", "nlvr2", "caption", "mean")
    rows = [row(r, 50 + i, 1.0, peft, "full", t, "score") for t in tasks for i, r in enumerate(("none", "add", "mul", "matmul", "matmul_expand"))
            for peft in ("lora", "adapter", "vlpet-large", "vlpet-small")]
    path, px = chart(tmp_path, rows, {t: "score" for t in tasks}, name="multi.png")
    assert os.path.getsize(path) < 150_000 and px.shape[1] <= 1000
    assert len(bars(px, shapes.ROUTE_COLORS[4])) == len(tasks) * 4  # every bar drawn


def test_chart_refuses_a_task_without_metric(tmp_path):
    with pytest.raises(ValueError, match="caption"):
        shapes.study_chart([row("none", 1.0), row("none", 1.0, task="caption", metric="CIDEr")],
                           str(tmp_path / "s.png"), {"vqa": "vqa_accuracy"})


def grey(size=64):
    return Image.new("RGB", (size, size), (128, 128, 128))


def example(image, prediction, truth, text="What color is the circle?"):
    return {"images": [image], "text": text, "prediction": prediction, "truth": truth}


def coloured_text(pixels):
    """(number of green pixels, number of red pixels): strong green or red ink, not grey or black."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((g > r + 60) & (g > b + 50)).sum()), int(((r > g + 80) & (r > b + 80)).sum())


def test_gallery_colours_right_green_and_wrong_red(tmp_path):
    path = tmp_path / "gallery.png"
    shapes.gallery([example(grey(), "red", "red"), example(grey(), "blue", "red"),
                    example(grey(), "A red circle.", ["two shapes", "a red circle"], "caption")],
                   str(path), "demo", columns=3)
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    third = px.shape[1] // 3
    (g0, r0), (g1, r1), (g2, r2) = (coloured_text(px[:, i * third:(i + 1) * third]) for i in range(3))
    assert g0 > 20 and r0 == 0   # right: green
    assert r1 > 20 and g1 == 0   # wrong: red
    assert g2 > 20 and r2 == 0   # matches one reference up to case and the final period


def test_gallery_grid_and_upscaled_images(tmp_path):
    """8 examples in 4 columns: 2 rows of 4 images, each 64-px image drawn 2x larger, in input order;
    an NLVR2 pair is drawn side by side; images may be file paths."""
    colors = [(200, 30 * i, 250 - 30 * i) for i in range(8)]
    files = []
    for i, c in enumerate(colors):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (64, 64), c).save(files[-1])
    path = tmp_path / "gallery.png"
    shapes.gallery([example(str(f), "a", "a") for f in files], str(path), "demo", columns=4)
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    boxes = []
    for c in colors:
        ys, xs = np.nonzero(mask(px, c))
        assert xs.max() - xs.min() + 1 == 128 and ys.max() - ys.min() + 1 == 128 and len(xs) == 128 * 128
        boxes.append((ys.min(), xs.min()))
    assert len({y for y, _ in boxes[:4]}) == 1 and len({y for y, _ in boxes[4:]}) == 1 and boxes[4][0] > boxes[0][0]
    assert [x for _, x in boxes[:4]] == sorted(x for _, x in boxes[:4]) == [x for _, x in boxes[4:]]
    pair = tmp_path / "pair.png"
    left, right = Image.new("RGB", (64, 64), colors[0]), Image.new("RGB", (64, 64), colors[1])
    shapes.gallery([{"images": [left, right], "text": "The left image has more shapes.", "prediction": "true",
                     "truth": "false"}], str(pair), "nlvr2")
    px = np.asarray(Image.open(pair).convert("RGB")).astype(int)
    (y0, x0), (y1, x1) = (np.argwhere(mask(px, c)).min(0) for c in colors[:2])
    assert y0 == y1 and x1 - x0 >= 128


def test_pictures_are_deterministic(tmp_path):
    rows = readme_rows()
    args = ({"vqa": "vqa_accuracy", "caption": "CIDEr"}, {"CIDEr": 100})
    shapes.study_chart(rows, str(tmp_path / "a.png"), *args)
    shapes.study_chart([dict(r) for r in rows], str(tmp_path / "b.png"), *args)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    exs = [example(im, "yes", "no") for im in ims]
    shapes.gallery(exs, str(tmp_path / "c.png"), "g")
    shapes.gallery([dict(e) for e in exs], str(tmp_path / "d.png"), "g")
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    assert read("a.png") == read("b.png") and read("c.png") == read("d.png")
