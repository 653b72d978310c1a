"""export/tasks/multiview.py: determinism, split separation, and answers re-derived from the drawn scenes."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from export.tasks import multiview as M
from export.tasks import scenes as S


@pytest.fixture(scope="module")
def examples() -> list[M.MultiViewExample]:
    return list(M.iter_examples("val", 40, 3))


def test_samples_are_deterministic_and_splits_apart(examples):
    again = M.sample("val", 1, 3)
    first = [e for e in examples if e.sample_seed == again[0].sample_seed]
    assert [(e.prompt, e.answer) for e in first] == [(e.prompt, e.answer) for e in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first[0].frames, again[0].frames))
    seeds = {split: {M.sample(split, i, 2)[0].sample_seed for i in range(5)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    # no multi-view frame is a scene of the single-frame benchmark (indices below MV_OFFSET)
    assert min(s - S.SPLIT_BASE["test"] for s in seeds["test"]) >= M.MV_OFFSET


def test_every_family_and_kind_is_asked_and_frames_have_the_frame_size(examples):
    assert {e.family for e in examples} == set(M.FAMILIES) and {e.kind for e in examples} == set(M.KINDS)
    assert all(len(e.frames) == 3 and all(f.size == (224, 224) for f in e.frames) for e in examples)
    yes = Counter(e.answer for e in examples if e.family == "every_frame")
    assert set(yes) == {"yes", "no"}
    with pytest.raises(S.SceneArgumentError, match="1 to 8"):
        M.sample("val", 0, 9)


def slots(family: str, prompt: str) -> dict[str, str]:
    """The template slots ({x}, {xs}, {a}, {b}) of a prompt, by matching it against its family's templates."""
    for tpl in M.TEMPLATES[family]:
        pattern = re.escape(tpl)
        for slot in ("xs", "x", "a", "b"):
            pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>.+?)")
        match = re.fullmatch(pattern, prompt)
        if match:
            return match.groupdict()
    raise AssertionError(f"{prompt!r} matches no {family} template")


def attribute(phrase: str) -> tuple[str, str]:
    """'red object(s)' -> (color, red); 'star' / 'stars' -> (shape, star)."""
    words = phrase.split()
    if words[-1] in ("object", "objects"):
        return "color", words[0]
    return "shape", {p: s for s, p in S.PLURALS.items()}.get(words[-1], words[-1])


def test_scene_answers_follow_from_the_drawn_objects(examples):
    """Scenes kind: frame f is scene split_seed(val, MV_OFFSET + 8 i + f); answers recomputed from its objects."""
    checked = Counter()
    for e in (e for e in examples if e.kind == "scenes"):
        first = e.sample_seed - S.SPLIT_BASE["val"]
        drawn = [S.make_scene(S.split_seed("val", first + f)).objects for f in range(3)]

        def count(frame: int, phrase: str) -> int:
            field, value = attribute(phrase)
            return sum(getattr(o, field) == value for o in drawn[frame])
        got = slots(e.family, e.prompt)
        if e.family == "which_frame":
            color, shape = got["x"].split()
            frames = [f for f in range(3) if any((o.color, o.shape) == (color, shape) for o in drawn[f])]
            assert frames == [M.ORDINALS.index(e.answer)]
        elif e.family == "count_all":
            assert int(e.answer) == sum(count(f, got["xs"]) for f in range(3))
        elif e.family == "every_frame":
            assert e.answer == ("yes" if all(count(f, got["x"]) for f in range(3)) else "no")
        else:
            i, j = M.ORDINALS.index(got["a"]), M.ORDINALS.index(got["b"])
            ci, cj = count(i, got["xs"]), count(j, got["xs"])
            assert ci != cj and e.answer == (got["a"] if ci > cj else got["b"])
        checked[e.family] += 1
    assert set(checked) == set(M.FAMILIES)
