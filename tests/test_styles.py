"""Rendering styles (export/tasks/styles.py), splits of styles and phrasings, refer regions and samples/frames.json.

Answers are re-derived from the drawn objects by tests/test_scenes.py's check_answer, for every style.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.tasks import scenes as S
from export.tasks import styles
from export.tasks.phrasings import HELD_OUT, TRAIN
from export.tasks.questions import refer_question, templates
from tests.test_scenes import check_answer, parse

REPO = Path(__file__).resolve().parents[1]
# sha256 of make_scene(seed, size).image bytes for seeds (0, 1, 2_000_000_007) x sizes (224, 160), computed on
# main before styles existed (commit a8581ee): "classic" must stay the original generator, byte for byte.
CLASSIC_SHA256 = "5a0578d574b5045fe75e1dd54f3041d3c05cb9d6a6fd2d221c09ac359b5f03ee"
SEEDS = range(40)


@pytest.fixture(scope="module")
def drawn() -> dict[str, list[S.Scene]]:
    return {name: [S.make_scene(1000 + seed, 224, name) for seed in SEEDS] for name in styles.STYLES}


def test_classic_is_the_original_generator():
    images = b"".join(S.make_scene(s, z).image.tobytes() for s in (0, 1, 2_000_000_007) for z in (224, 160))
    assert hashlib.sha256(images).hexdigest() == CLASSIC_SHA256
    shipped = Image.open(REPO / "samples" / "scene.png").convert("RGB").tobytes()
    assert S.split_scene("classic", 0).image.tobytes() == shipped == S.make_scene(S.split_seed("test", 0)).image.tobytes()


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_every_style_is_deterministic_and_seeded(name):
    a, b = S.make_scene(77, 224, name), S.make_scene(77, 224, name)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects and a.style == name
    assert S.make_scene(78, 224, name).image.tobytes() != a.image.tobytes()


def test_unknown_style_is_a_typed_error():
    with pytest.raises(S.SceneArgumentError, match="unknown style"):
        S.make_scene(0, 224, "sepia")


def test_background_layer_keeps_clear_of_object_colours():
    colours = np.array(list(S.COLORS.values()), np.float32)
    for name, style in styles.STYLES.items():
        for seed in range(6):
            scene, rng, srng = S.plan_scene(seed, 224, name)
            w, h = scene.size_wh
            arr = np.asarray(styles.background(style, rng, srng, w, h, scene.objects), np.float32).reshape(-1, 3)
            if style.classic:  # the original invariant: every channel grey in [90, 185]
                assert arr.min() >= 90 and arr.max() <= 185
                continue
            d = np.sqrt(((arr[::7, None, :] - colours[None]) ** 2).sum(-1)).min()
            assert d >= styles.BG_MARGIN, (name, seed, d)
    rgbs = list(S.COLORS.values())
    assert min(math.dist(a, b) for i, a in enumerate(rgbs) for b in rgbs[i + 1:]) > 100


def test_objects_are_visible_and_inside_the_view(drawn):
    colours = np.array(list(S.COLORS.values()), np.float32)
    names = list(S.COLORS)
    for name, scenes in drawn.items():
        style = styles.STYLES[name]
        hits = total = 0
        for scene in scenes:
            arr = np.asarray(scene.image, np.float32)
            assert scene.image.size == scene.size_wh
            ox, oy = scene.offset
            for o in scene.objects:
                assert o.color in style.colors and o.shape in style.shapes
                lo, hi = style.radii[o.size]
                assert round(lo * scene.image_size / 224) - 1 <= o.radius <= round(hi * scene.image_size / 224) + 1
                assert ox <= o.x - o.radius and o.x + o.radius < ox + scene.image_size
                assert oy <= o.y - o.radius and o.y + o.radius < oy + scene.image_size
                assert o.size == "small" or o.radius >= 12 * scene.image_size / 224
                if o.outline:
                    assert o.size == "large"
                    continue
                total += 1
                nearest = names[int(np.linalg.norm(colours - arr[o.y, o.x], axis=-1).argmin())]
                hits += nearest == o.color
        # No effects: the centre pixel is the object colour; mild effects keep nearly all centres nearest to it.
        assert hits >= (total if not (style.blur or style.jpeg[1]) else 0.97 * total), (name, hits, total)


def test_labels_are_readable_and_inside_the_view(drawn):
    labelled = Counter()
    for name, scenes in drawn.items():
        style = styles.STYLES[name]
        for scene in scenes:
            for o in scene.objects:
                if not o.label:
                    continue
                labelled[name] += 1
                x0, y0, x1, y1 = o.label_box
                ox, oy = scene.offset
                assert ox <= x0 < x1 <= ox + scene.image_size and oy <= y0 < y1 <= oy + scene.image_size
                if not style.classic:  # 10-20 px at 224: a character spans most of a 14 px patch
                    assert style.label_font[0] * scene.image_size / 224 - 1 <= o.label_font
                    assert o.label_font <= style.label_font[1] * scene.image_size / 224 + 1
                    assert o.label_font >= 10 * scene.image_size / 224 - 1
    assert all(labelled[name] > 0 for name in styles.STYLES), labelled


def test_answers_match_every_style(drawn):
    families = Counter()
    for name, scenes in drawn.items():
        for scene in scenes:
            for q in S.make_questions(scene, scene.seed, per_family=2):
                check_answer(scene, q)
                families[q.family] += 1
            for q in S.make_questions(scene, scene.seed, phrasing="held_out"):
                check_answer(scene, q)
    assert set(families) == set(S.FAMILIES)
    counts = [int(q.answer) for scenes in drawn.values() for s in scenes
              for q in S.make_questions(s, s.seed, ["count"], per_family=3)]
    assert max(counts) >= 9 and sum(c >= 7 for c in counts) >= 5, "themed scenes should give counts of 7-12"


def test_new_vocabulary_is_drawn(drawn):
    objs = [o for name, scenes in drawn.items() if name != "classic" for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(S.SHAPES) and {o.color for o in objs} == set(S.COLORS)
    assert any(o.outline for o in objs) and any(s.canvas for scenes in drawn.values() for s in scenes)
    assert sum(len(s.objects) == 1 for scenes in drawn.values() for s in scenes) >= 5


# ---------------------------------------------------------------- splits

def test_training_never_draws_held_out_styles_or_phrasings():
    pytest.importorskip("torch")
    from export.train.data import scene_items

    seen = Counter(S.split_style("train", S.split_seed("train", i)) for i in range(4000))
    assert not set(seen) & set(styles.HELD_OUT_STYLES) and set(seen) == set(styles.TRAIN_STYLES)
    assert 0.2 < seen["classic"] / 4000 < 0.3
    train = {t for f in S.FAMILIES for t in templates(f, "train")}
    held = {t for f in S.FAMILIES for t in templates(f, "held_out")}
    from export.tasks import instructions

    held_instr = {t for i in instructions.TRAINED.values() for t in i.held_out_texts}
    for first in (0, 100_000_000, 200_000_000):  # the stage offsets of pipmm train
        for scene, questions in scene_items("train", first, 25, 224, instruction_fraction=0.5):
            assert scene.style in styles.TRAIN_STYLES
            for q in questions:
                assert not any(q.prompt.endswith(t) for t in held_instr)
                bases = {q.prompt} | {q.prompt[:-len(sep + t)] for i in instructions.TRAINED.values()
                                      for t in i.train_texts
                                      for sep in (" ", ". ") if q.prompt.endswith(sep + t)}
                assert any(_template(q.family, b) in train for b in bases), q
                assert not any(_template(q.family, b) in held for b in bases), q


def _template(family: str, prompt: str) -> str | None:
    if family in ("describe", "refer"):
        return prompt
    try:
        return parse(family, prompt)["template"]
    except AssertionError:
        return None


def test_splits_are_disjoint_and_named():
    ranges = {name: (spec.base, spec.base + S.SPLIT_SPAN) for name, spec in S.SPLITS.items()}
    for a in ("train",):
        for b in ("val", "test", "phrasing", "style", "classic"):
            assert ranges[a][1] <= ranges[b][0] or ranges[b][1] <= ranges[a][0]
    assert len({ranges[s] for s in ("val", "test", "phrasing", "style")}) == 4
    assert S.SPLITS["phrasing"].phrasing == "held_out" and S.SPLITS["style"].styles.keys() == set(styles.HELD_OUT_STYLES)


def test_eval_splits_exist_and_are_deterministic():
    from export.train.evaluate import questions

    held = {t for f in S.FAMILIES for t in templates(f, "held_out")}
    for split in ("test", "phrasing", "style", "classic", "val"):
        a = questions(split, 60, instruction_fraction=0.2)
        b = questions(split, 60, instruction_fraction=0.2)
        assert [(x.prompt, x.answer, x.scene_seed) for x in a] == [(x.prompt, x.answer, x.scene_seed) for x in b]
        assert len(a) == 60
        # >= 2000 questions: the split asks ~8 questions a scene and scans 4 n scenes
        assert len(a) / len({x.scene_seed for x in a}) >= 6
        for x in a:
            style = S.split_style(split, x.scene_seed)
            assert (style in styles.HELD_OUT_STYLES) == (split == "style")
        plain = questions(split, 60)
        if split == "phrasing":
            assert all(x.prompt in held or parse(x.family, x.prompt)["template"] in held for x in plain
                       if x.family in ("describe", "refer") and x.prompt in held or x.family not in ("describe", "refer"))


# ---------------------------------------------------------------- refer regions and samples

def test_refer_question_points_at_its_only_answer():
    found = 0
    for i in range(20):
        scene = S.split_scene("test", i)
        got = refer_question(scene, np.random.default_rng(i), "color")
        if got is None:
            continue
        q, region = got
        found += 1
        target = region.obj
        assert q.family == "refer" and q.answer == target.color
        assert sum(o.color == target.color for o in scene.objects) == 1
        x0, y0, x1, y1 = region.box
        assert x0 <= region.point[0] < x1 and y0 <= region.point[1] < y1
        assert all(x0 <= x < x1 and y0 <= y < y1 for x, y in region.scribble)
        mask = region.mask(*scene.size_wh)
        assert mask[target.y, target.x] and mask.sum() > 0 and not mask[:y0].any() and not mask[y1:].any()
    assert found >= 10
    pytest.importorskip("sdk.regions")
    from sdk.regions import Box, Mask, Point, Scribble

    w, h = scene.size_wh
    for r in (Box(*region.box), Point([region.point]), Scribble(region.scribble), Mask(region.mask(w, h))):
        assert r.plane(w, h).sum() > 0


def test_sample_frames_match_the_generator():
    from export.tasks.sheet import SAMPLE_FRAMES, sample_records

    records = json.loads((REPO / "samples" / "frames.json").read_text())
    assert records == sample_records()
    assert 4 <= len(records) <= 6
    for (file, seed, style, canvas), record in zip(SAMPLE_FRAMES, records):
        assert style in styles.HELD_OUT_STYLES, "sample frames are not from the train distribution"
        image = Image.open(REPO / "samples" / file).convert("RGB")
        assert image.size == tuple(canvas) == tuple(record["canvas"])
        assert image.tobytes() == S.make_scene(seed, 224, style, canvas).image.tobytes()
        scene = S.make_scene(seed, 224, style, canvas)
        for q in record["questions"]:
            check_answer(scene, S.Question(q["family"], q["prompt"], q["answer"]))
