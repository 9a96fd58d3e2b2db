"""data.ImageFeatures and data.progress: an extraction that says what it computes, shows its progress in a
redirected log, survives a kill -9 (the next run continues and writes the same bytes), restarts cleanly from
damaged partial state, and never runs twice at once on one cache entry. A toy encoder on 4 x 4 images.

    python -m pytest -q tests/test_features.py
"""
import io
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = [f"{i:03d}.png" for i in range(150)]  # batches of 64, 64 and 22


def encode(pixel_values):
    """A toy encoder: (B, 3, 4, 4) -> (B, 16, 3), each pixel a token."""
    return pixel_values.flatten(2).transpose(1, 2) * 2 + 1  # (B, 3, 16) -> (B, 16, 3)


def toy_features(images_dir, cache_dir, dtype="float32"):
    return data.ImageFeatures(data.Images(images_dir, 4, (0.5,) * 3, (0.5,) * 3), encode,
                              os.path.join(images_dir, KEYS[0]), {"version": 1}, cache_dir, dtype, name="toy encoder")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for key in KEYS:
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / key)
    return str(folder)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """(file name, bytes) of the cache entry of a run never interrupted."""
    cache = str(tmp_path_factory.mktemp("reference"))
    toy_features(images, cache).prepare(KEYS)
    (name,) = [f for f in os.listdir(cache) if not f.startswith(".")]
    with open(os.path.join(cache, name), "rb") as f:
        return name, f.read()


def counting(features):
    """Count the images the encoder sees."""
    seen = []
    features.encode = lambda x: seen.append(len(x)) or encode(x)
    return seen


def entry_files(cache):
    return sorted(f for f in os.listdir(cache) if not f.endswith(".lock"))


# ---- kill -9 and resume ---------------------------------------------------------------------------------

KILLER = """import os, sys
import data
from tests.test_features import KEYS, toy_features
data.PROGRESS_EVERY = 0.0  # a progress line and a durable row count after every batch
n, die, real = 0, int(sys.argv[3]), os.replace
def replace(src, dst):  # the die-th replace into the cache (row counts 0, 64, 128, 150, then the final rename)
    global n
    n += dst.startswith(sys.argv[2])
    if n == die:
        os._exit(9)  # a kill -9
    real(src, dst)
os.replace = replace
toy_features(sys.argv[1], sys.argv[2]).prepare(KEYS)
"""


def run_killer(images, cache, die):
    """Extract in a child process with stdout and stderr redirected (not a terminal), killed at the die-th replace
    (0: never)."""
    return subprocess.run([sys.executable, "-c", KILLER, images, cache, str(die)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("die, durable", [(3, 64), (5, 150)])
def test_killed_extraction_resumes_exactly(images, reference, tmp_path, capsys, die, durable):
    """Killed while recording 128 rows (64 are durable) or at the final rename (all 150 are): the next run computes
    only the rest and writes the same bytes as a run never killed, one memory-mapped .npy, nothing else left."""
    name, expected = reference
    cache = str(tmp_path / "cache")
    proc = run_killer(images, cache, die)
    assert proc.returncode == 9, proc.stderr[-2000:]
    left = entry_files(cache)
    assert name + ".partial" in left and name + ".partial.json" in left and name not in left
    assert any(f.startswith(".tmp-") for f in left) == (die == 3)  # the row count a kill cut short
    features = toy_features(images, cache)
    seen = counting(features)
    features.prepare(KEYS)
    assert sum(seen) == len(KEYS) - durable  # no image encoded twice, none for the shape
    out = capsys.readouterr().out
    assert f"computing {len(KEYS) - durable} images of {len(KEYS)} ({durable} cached by an interrupted run)" in out
    with open(os.path.join(cache, name), "rb") as f:
        assert f.read() == expected
    assert entry_files(cache) == [name] and isinstance(features.table, np.memmap)


def test_progress_lines_in_a_redirected_log(images, reference, tmp_path):
    """Off a terminal: the announce line, then "done/total img (pct%), rate img/s, time left" lines on stdout, nothing
    on stderr; the child process writes the same bytes as this one."""
    name, expected = reference
    proc = run_killer(images, str(tmp_path / "cache"), 0)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("image features: computing 150 images of 150 (none cached yet) with toy encoder")
    progress = [re.fullmatch(r"image features: (\d+)/150 img \((\d+)%\), [\d.]+ img/s, (\d+)s left", s) for s in lines[1:]]
    assert all(progress) and [m.group(1, 2) for m in progress] == [("64", "43"), ("128", "85"), ("150", "100")]
    assert progress[-1].group(3) == "0"
    with open(tmp_path / "cache" / name, "rb") as f:
        assert f.read() == expected


# ---- damaged partial state -------------------------------------------------------------------------------


def interrupted(images, cache, monkeypatch):
    """Extract until the 4th encode call (the shape, then batches of 64, 64: 128 durable rows), which raises."""
    monkeypatch.setattr(data, "PROGRESS_EVERY", 0.0)
    features = toy_features(images, cache)
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return encode(x)

    features.encode = failing
    with pytest.raises(KeyboardInterrupt):
        features.prepare(KEYS)


def damage_count(rows):
    def damage(partial, count):
        with open(count, "w") as f:
            f.write(rows)
    return damage


def damage_header(old, new):
    def damage(partial, count):
        with open(partial, "r+b") as f:
            head = f.read(128)
            assert head.count(old) == 1
            f.seek(0)
            f.write(head.replace(old, new))
    return damage


DAMAGE = {"count beyond the file": damage_count('{"rows": 150}'), "negative count": damage_count('{"rows": -64}'),
          "malformed count": damage_count('{"rows": 6'), "count not a number": damage_count('{"rows": "64"}'),
          "no count": lambda partial, count: os.remove(count), "other dtype in the header": damage_header(b"<f4", b"<i4"),
          "other shape in the header": damage_header(b"(150, 16, 3)", b"(149, 16, 3)"),
          "Fortran order in the header": damage_header(b"'fortran_order': False", b"'fortran_order': True "),
          "other .npy version": damage_header(b"NUMPY\x01\x00", b"NUMPY\x02\x00"),
          "no header": lambda partial, count: open(partial, "wb").close()}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_partial_state_restarts(images, reference, tmp_path, monkeypatch, capsys, damage):
    name, expected = reference
    cache = str(tmp_path / "cache")
    interrupted(images, cache, monkeypatch)
    partial = os.path.join(cache, name + ".partial")
    with open(partial + ".json") as f:
        assert f.read() == '{\n  "rows": 128\n}'
    damage(partial, partial + ".json")
    capsys.readouterr()
    features = toy_features(images, cache)
    seen = counting(features)
    features.prepare(KEYS)
    lines = capsys.readouterr().out.splitlines()
    assert sum(" is damaged (" in s for s in lines) == 1, lines
    assert lines[0].startswith(f"partial cache entry {partial} is damaged (") and lines[0].endswith("); starting it again")
    assert lines[1].startswith("image features: computing 150 images of 150 (none cached yet)")
    assert sum(seen) == 1 + len(KEYS)  # the shape, then every image
    with open(os.path.join(cache, name), "rb") as f:
        assert f.read() == expected
    assert entry_files(cache) == [name]


def test_an_intact_partial_resumes_in_process(images, reference, tmp_path, monkeypatch, capsys):
    """The same interruption as above, undamaged: 128 rows kept, 22 computed; bytes past the last row (rows not
    yet counted, or junk) are written over or cut off."""
    name, expected = reference
    cache = str(tmp_path / "cache")
    interrupted(images, cache, monkeypatch)
    with open(os.path.join(cache, name + ".partial"), "ab") as f:
        f.write(b"\x01" * 50_000)
    features = toy_features(images, cache)
    seen = counting(features)
    features.prepare(KEYS)
    assert seen == [22] and " is damaged (" not in capsys.readouterr().out
    with open(os.path.join(cache, name), "rb") as f:
        assert f.read() == expected


def test_damaged_entry_is_made_again(images, reference, tmp_path, capsys):
    """A finished entry cut short on disk: one line, deleted, made again with the same bytes."""
    name, expected = reference
    path = tmp_path / name
    path.write_bytes(expected[:len(expected) // 2])
    toy_features(images, str(tmp_path)).prepare(KEYS)
    lines = capsys.readouterr().out.splitlines()
    assert [s for s in lines if " is damaged (" in s] == [lines[0]] and lines[0].startswith(f"cache entry {path} is damaged")
    assert path.read_bytes() == expected


def test_resumed_encoder_of_another_shape_is_an_error(images, reference, tmp_path, monkeypatch):
    """An encoder changed without a new params version (same cache key) cannot write into the old partial file."""
    cache = str(tmp_path / "cache")
    interrupted(images, cache, monkeypatch)
    features = toy_features(images, cache)
    features.encode = lambda x: encode(x).repeat(1, 1, 2)  # (B, 16, 6)
    with pytest.raises(ValueError, match=r"toy encoder gives features of shape \(16, 6\), .*partial holds \(16, 3\)"):
        features.prepare(KEYS)


# ---- one process per cache entry -------------------------------------------------------------------------


def test_waits_for_the_process_that_holds_the_entry(images, reference, tmp_path, monkeypatch, capsys):
    """Another process holds the entry's lock: one line, no partial file of ours meanwhile, then the entry that
    process made is read, not computed again."""
    name, expected = reference
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = open(cache / f".{name}.lock", "a")
    data.lock_file(lock)
    waits = []

    def sleep(seconds):  # the other process finishes its entry and ends
        waits.append(seconds)
        assert entry_files(cache) == []
        (cache / name).write_bytes(expected)
        lock.close()

    monkeypatch.setattr(data, "time", types.SimpleNamespace(sleep=sleep, monotonic=data.time.monotonic))
    features = toy_features(images, str(cache))
    seen = counting(features)
    features.prepare(KEYS)
    assert waits == [1.0] and seen == []
    assert capsys.readouterr().out == f"{cache / name} is being made by another process; waiting for it\n"
    assert features.table.shape == (150, 16, 3)


# ---- the announce line and the rows ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, size", [("float32", 192), ("float16", 96)])
def test_announce_line_and_rows(images, tmp_path, capsys, dtype, size):
    """One line before extracting (count, encoder, file, dtype, bytes); with the default interval a short extraction
    prints nothing else. The rows are the encoder's output in key order; a pair's features follow each other."""
    features = toy_features(images, str(tmp_path), dtype)
    features.prepare(KEYS)
    (name,) = entry_files(str(tmp_path))
    assert capsys.readouterr().out == (
        f"image features: computing 150 images of 150 (none cached yet) with toy encoder into {tmp_path / name}: "
        f"{dtype} (16, 3) per image, {size} bytes each, {150 * size / 1000:.1f} kB in all\n")
    pixels = torch.stack([features.images(k) for k in KEYS[:4]])
    expected = encode(pixels).to(getattr(torch, dtype)).float()  # (4, 16, 3)
    assert torch.equal(features({"image": KEYS[:4]}), expected)
    assert torch.equal(features({"image": [tuple(KEYS[:2]), tuple(KEYS[2:4])]}), expected.reshape(2, 32, 3))


# ---- progress ---------------------------------------------------------------------------------------------


def fake_clock(monkeypatch, step):
    """data.time.monotonic advancing `step` seconds at every call, from 0."""
    calls = []
    monkeypatch.setattr(data, "time", types.SimpleNamespace(monotonic=lambda: step * (calls.append(1) or len(calls) - 1)))


def test_progress_lines_at_most_every_interval(monkeypatch, capsys):
    """Off a terminal (pytest's captured stderr): with the default interval (60 s) and 25 s an item, a line at items
    3, 6 and 9, with the rate, the time left and set_postfix's values; none per item."""
    fake_clock(monkeypatch, 25.0)
    bar = data.progress(range(10), "epoch 1/2", "step")
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    assert capsys.readouterr().out.splitlines() == [
        "epoch 1/2: 3/10 step (30%), 0.04 step/s, 2m55s left, loss=0.333",
        "epoch 1/2: 6/10 step (60%), 0.04 step/s, 1m40s left, loss=0.167",
        "epoch 1/2: 9/10 step (90%), 0.04 step/s, 25s left, loss=0.111"]
    fake_clock(monkeypatch, 3600.0)  # manual updates after an earlier run's 100: the rate counts this run's only
    bar = data.progress(None, "image features", "img", total=10_000, initial=100)
    bar.update(3600)
    bar.update(360)
    assert capsys.readouterr().out.splitlines() == ["image features: 3700/10000 img (37%), 1.00 img/s, 1h45m left",
                                                    "image features: 4060/10000 img (41%), 0.55 img/s, 3h00m left"]
    fake_clock(monkeypatch, 1.0)  # no total: done and rate
    list(data.progress(iter(range(120)), "shapes", "img"))
    assert capsys.readouterr().out == "shapes: 60 img, 1.00 img/s\nshapes: 120 img, 1.00 img/s\n"


def test_progress_keeps_the_bar_on_a_terminal(monkeypatch, capsys):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = data.progress(range(3), "epoch 1/1", "step")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    assert capsys.readouterr().out == "" and "epoch 1/1" in terminal.getvalue()
    assert isinstance(data.progress(range(3), "evaluate", "batch", disable=True), tqdm)  # DDP ranks > 0: silent
