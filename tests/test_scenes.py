"""Tests of export/tasks/scenes.py: determinism, scene statistics, and answers checked against the drawn scene.

Answers are re-derived here from the objects and pixels, by parsing the prompts back, so a
question generator that drifted from the scene would fail.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from export.tasks import scenes as S
from export.tasks.phrasings import COUNT_NOUNS, PHRASINGS
from export.tasks.questions import template_kind, templates
from sdk.errors import PipmmError

REPO = Path(__file__).resolve().parents[1]
N_SCENES = 300


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return [S.make_scene(seed) for seed in range(N_SCENES)]


# ---------------------------------------------------------------- helpers that re-derive answers

def parse(family: str, prompt: str) -> dict[str, str]:
    """The slots ({n}, {a}, {b}) of `prompt`, found by matching it against the family's templates (any phrasing)."""
    every = {t for phrasing in PHRASINGS for t in templates(family, phrasing)}
    for tpl in sorted(every, key=len, reverse=True):  # "...{n} in the image?" first
        pattern = re.escape(tpl)
        for slot in "nab":
            pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>[a-z ]+?)")
        m = re.fullmatch(pattern, prompt)
        if m:
            return {**m.groupdict(), "template": tpl}
    raise AssertionError(f"{family} prompt {prompt!r} matches no template")


def matching(name: str, objects) -> list[S.SceneObject]:
    words = set(name.split())
    return [o for o in objects if words <= {o.size, o.color, o.shape}]


def resolve(name: str, objects) -> S.SceneObject:
    found = matching(name, objects)
    assert len(found) == 1, f"{name!r} names {len(found)} objects"
    return found[0]


def grid_cell(x: float, y: float, w: int, h: int) -> str:
    rows, cols = ["top ", "", "bottom "], ["left", "", "right"]
    text = (rows[int(y * 3 // h)] + cols[int(x * 3 // w)]).strip()
    return text or "center"


def check_answer(scene: S.Scene, q: S.Question) -> None:
    objs, size = scene.objects, scene.image_size
    assert q.answer == q.answer.strip().lower() and q.answer
    if q.family == "describe":
        assert q.answer == ", ".join(f"{o.size} {o.color} {o.shape}" for o in objs)
        assert any(q.prompt in templates("describe", p) for p in PHRASINGS)
        return
    if q.family == "refer":
        assert len(objs) == 1, "refer questions are asked of one-object scenes only"
        kind = template_kind("refer", q.prompt)
        assert q.answer == {"color": objs[0].color, "shape": objs[0].shape, "what": objs[0].phrase}[kind]
        return
    slots = parse(q.family, q.prompt)
    if q.family == "color":
        assert not set(slots["n"].split()) & set(S.COLORS), "a color question must not name the color"
        assert q.answer == resolve(slots["n"], objs).color
    elif q.family == "shape":
        assert set(slots["n"].split()) <= set(S.COLORS) | set(S.SIZES)
        assert q.answer == resolve(slots["n"], objs).shape
    elif q.family == "count":
        n = slots["n"]
        if n.split()[-1] in {noun for nouns in COUNT_NOUNS.values() for noun in nouns}:
            expected = sum(o.color == n.split()[0] for o in objs)
        else:
            shape = {v: k for k, v in S.PLURALS.items()}[n]
            expected = sum(o.shape == shape for o in objs)
        assert q.answer == str(expected)
    elif q.family == "exist":
        article, name = slots["n"].split(" ", 1)
        assert article == ("an" if name[0] in "aeiou" else "a")
        assert q.answer == ("yes" if matching(name, objs) else "no")
    elif q.family == "position":
        o = resolve(slots["n"], objs)
        vx, vy = scene.view_xy(o.x, o.y)
        assert q.answer == grid_cell(vx, vy, size, size)
        assert q.answer == grid_cell(o.x, o.y, *scene.size_wh), "a position must hold for the whole frame too"
    elif q.family == "relation":
        a, b = resolve(slots["a"], objs), resolve(slots["b"], objs)
        assert a is not b
        word = template_kind("relation", slots["template"])
        delta = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[word]
        assert abs(delta) >= 0.08 * size, "relation asked about centres that are too close"
        assert q.answer == ("yes" if delta > 0 else "no")
    elif q.family == "label":
        o = resolve(slots["n"], objs)
        assert o.label is not None and q.answer == o.label.lower()
    else:
        raise AssertionError(q.family)


def check_pixels(scene: S.Scene) -> None:
    arr = np.asarray(scene.image)
    size = scene.image_size
    assert arr.shape == (size, size, 3)
    for o in scene.objects:
        # No object is ever covered at its centre (placement guarantee), so no occlusion case here.
        assert tuple(arr[o.y, o.x]) == S.COLORS[o.color], (scene.seed, o)
    # A pixel of an exact object colour lies inside the box of an object of that colour:
    # background, clutter and label ink never use object colours.
    for name, rgb in S.COLORS.items():
        ys, xs = np.nonzero(np.all(arr == rgb, axis=-1))
        boxes = [o for o in scene.objects if o.color == name]
        inside = np.zeros(len(xs), bool)
        for o in boxes:
            inside |= (abs(xs - o.x) <= o.radius + 1) & (abs(ys - o.y) <= o.radius + 1)
        assert inside.all(), (scene.seed, name, list(zip(xs[~inside], ys[~inside]))[:5])


# ---------------------------------------------------------------- determinism

def test_same_seed_same_bytes_and_questions():
    a, b = S.make_scene(1234), S.make_scene(1234)
    assert a.image.mode == "RGB" and a.image.size == (224, 224)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects
    assert S.make_questions(a, 7, per_family=2) == S.make_questions(b, 7, per_family=2)
    gen = np.random.Generator(np.random.PCG64(7))
    assert S.make_questions(a, gen, per_family=2) == S.make_questions(a, 7, per_family=2)
    assert list(S.iter_examples("val", 3)) == list(S.iter_examples("val", 3))


def test_different_seeds_differ():
    images = {S.make_scene(seed).image.tobytes() for seed in range(20)}
    assert len(images) == 20
    assert S.make_scene(5).objects != S.make_scene(6).objects


def test_global_random_state_is_not_used():
    np.random.seed(0)
    a = S.make_scene(42).image.tobytes()
    np.random.seed(1)
    np.random.random(100)
    assert S.make_scene(42).image.tobytes() == a


def test_size_is_configurable():
    scene = S.make_scene(3, size=320)
    assert scene.image.size == (320, 320) and scene.image_size == 320
    check_pixels(scene)
    with pytest.raises(PipmmError):
        S.make_scene(3, size=16)


# ---------------------------------------------------------------- scene statistics

def test_object_counts_and_vocabulary(scenes):
    counts = Counter(len(s.objects) for s in scenes)
    assert min(counts) >= 3 and max(counts) <= 12
    assert len(counts) >= 8, "object counts should spread over 3..12"
    objs = [o for s in scenes for o in s.objects]
    assert len(S.SHAPES) >= 10 and len(S.COLORS) == 11 and set(S.SIZES) == {"small", "large"}
    assert {o.shape for o in objs} == set(S.SHAPES[:6]), "classic draws the original 6 shapes"
    assert {o.color for o in objs} == set(list(S.COLORS)[:8]), "classic draws the original 8 colours"
    assert {o.size for o in objs} == set(S.SIZES)
    sizes = Counter(o.size for o in objs)
    assert sizes["small"] > sizes["large"], "the benchmark needs mostly small objects"
    assert any(o.label for o in objs)


def test_colors_are_well_separated():
    rgbs = list(S.COLORS.values())
    assert min(math.dist(a, b) for i, a in enumerate(rgbs) for b in rgbs[i + 1:]) > 100


def test_object_sizes_and_positions(scenes):
    for s in scenes:
        for o in s.objects:
            lo, hi = (7, 10) if o.size == "small" else (14, 20)  # diameters 14-20 / 28-40 px
            assert lo <= o.radius <= hi
            assert o.radius <= o.x < 224 - o.radius and o.radius <= o.y < 224 - o.radius
    xs = [o.x for s in scenes for o in s.objects]
    ys = [o.y for s in scenes for o in s.objects]
    assert min(xs) < 30 and max(xs) > 194 and min(ys) < 30 and max(ys) > 194


def test_overlap_is_limited(scenes):
    for s in scenes:
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                d = math.hypot(a.x - b.x, a.y - b.y)
                assert d > 1.28 * max(a.radius, b.radius), "a centre would be covered"
                assert d >= 0.85 * (a.radius + b.radius) - 1e-9


def test_labels_sit_next_to_their_object(scenes):
    for s in scenes:
        for o in s.objects:
            if not o.label:
                continue
            assert re.fullmatch(r"[A-Z0-9]{1,3}", o.label)
            x0, y0, x1, y1 = o.label_box
            assert 0 <= x0 < x1 < s.image_size and 0 <= y0 < y1 < s.image_size
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

            def dist(p):
                return math.hypot(max(abs(cx - p.x) - p.radius, 0), max(abs(cy - p.y) - p.radius, 0))
            assert all(dist(p) > dist(o) for p in s.objects if p is not o)


def test_caption_is_in_raster_order(scenes):
    for s in scenes[:50]:
        keys = [(o.y * 16 // 224, o.x) for o in s.objects]
        assert keys == sorted(keys)


# ---------------------------------------------------------------- answers against the drawn scene

def test_pixels_match_objects(scenes):
    for s in scenes[:120]:
        check_pixels(s)


def test_answers_match_scene(scenes):
    families = Counter()
    for s in scenes:
        for q in S.make_questions(s, s.seed, per_family=2):
            check_answer(s, q)
            families[q.family] += 1
    assert set(families) == set(S.FAMILIES) - {"refer"}, "classic scenes have 3+ objects: no refer questions"
    assert families["label"] > 50


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**63 - 1), size=st.sampled_from([96, 160, 224, 256]))
def test_answers_match_any_seed_and_size(seed, size):
    scene = S.make_scene(seed, size)
    check_pixels(scene)
    for q in S.make_questions(scene, seed, per_family=2):
        check_answer(scene, q)


def test_yes_no_answers_are_balanced(scenes):
    answers = Counter((q.family, q.answer) for s in scenes for q in S.make_questions(s, s.seed)
                      if q.family in ("exist", "relation"))
    for fam in ("exist", "relation"):
        yes, no = answers[fam, "yes"], answers[fam, "no"]
        assert 0.3 < yes / (yes + no) < 0.7, (fam, yes, no)


def test_make_questions_families_and_per_family():
    scene = S.make_scene(11)
    qs = S.make_questions(scene, 0, families=("count", "exist"), per_family=3)
    assert {q.family for q in qs} == {"count", "exist"}
    for fam in ("count", "exist"):
        prompts = [q.prompt for q in qs if q.family == fam]
        assert 1 <= len(prompts) <= 3 and len(set(prompts)) == len(prompts)
    with pytest.raises(ValueError):
        S.make_questions(scene, 0, families=("colour",))


# ---------------------------------------------------------------- splits and datasets

def test_splits_never_share_seeds():
    seeds = {split: {ex.scene_seed for ex in S.iter_examples(split, 4)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    last = {split: S.split_seed(split, S.SPLIT_SPAN - 1) for split in S.SPLIT_BASE}
    first = {split: S.split_seed(split, 0) for split in S.SPLIT_BASE}
    assert last["train"] < first["val"] and last["val"] < first["test"]
    with pytest.raises(PipmmError):
        S.split_seed("train", S.SPLIT_SPAN)
    with pytest.raises(ValueError):
        list(S.iter_examples("dev", 2))
    with pytest.raises(ValueError):
        list(S.iter_examples("train", 0))
    with pytest.raises(PipmmError):
        list(S.iter_examples("train", 2, seed_offset=S.SPLIT_SPAN - 1))


def test_iter_examples_questions_per_scene():
    examples = list(S.iter_examples("test", 5, questions_per_scene=3))
    per_scene = Counter(ex.scene_seed for ex in examples)
    assert set(per_scene.values()) == {3}
    for seed in per_scene:
        fams = [ex.family for ex in examples if ex.scene_seed == seed]
        assert len(set(fams)) == 3, "a few questions per scene should come from different families"
    default = list(S.iter_examples("test", 2))
    assert all(isinstance(ex.image, Image.Image) for ex in default)
    assert {ex.family for ex in default} <= set(S.FAMILIES) and len(default) >= 2 * 7


def test_corpus_text_matches_examples():
    corpus = list(S.corpus_text(n_scenes=10))
    assert all(isinstance(t, str) and t for t in corpus)
    texts = {t for ex in S.iter_examples("train", 10) for t in (ex.prompt, ex.answer)}
    assert texts <= set(corpus)
    vocabulary = corpus[0].split()
    assert set(S.SHAPES) <= set(vocabulary) and set(S.COLORS) <= set(vocabulary)


def test_write_dataset(tmp_path):
    path = S.write_dataset(tmp_path / "ds", 4, split="val", size=224, progress=False)
    records = json.loads(Path(path).read_text())
    assert isinstance(records, list) and records
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert r["family"] in S.FAMILIES
        image = Path(path).parent / r["image"]
        assert image.is_file() and not Path(r["image"]).is_absolute()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] == gpt["value"].lower()
    first = Path(path).parent / records[0]["image"]
    seed = int(first.stem.split("_")[1])
    assert S.split_seed("val", 0) == seed
    assert Image.open(first).convert("RGB").tobytes() == S.split_scene("val", 0).image.tobytes()
    assert records[0]["style"] == S.split_style("val", seed)


def test_cli(tmp_path):
    out = tmp_path / "tmp"
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", "scenes", "--out", str(out), "--n", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    records = json.loads((out / "train.json").read_text())
    assert len({r["image"] for r in records}) == 3
    assert all((out / r["image"]).is_file() for r in records)
    # Another process (another hash seed) drew the same pixels.
    drawn = Image.open(out / "images" / "train_0000000000.png").convert("RGB")
    assert drawn.tobytes() == S.split_scene("train", 0).image.tobytes()


def test_cli_bad_arguments(tmp_path, capsys):
    from sdk.cli import main

    assert main(["scenes", "--out", str(tmp_path), "--n", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--n" in err and err.count("\n") == 1
    assert main(["scenes", "--out", str(tmp_path), "--n", "2", "--seed-offset", "-1"]) == 1
