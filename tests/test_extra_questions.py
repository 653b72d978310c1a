"""`pipmm train --extra-questions FAMILY=N`: N more questions of a family a training scene (m20 answers relation
questions at chance, docs/default-model.md), the batch keeping its question count, recorded in train_config.json
and kept on resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from export.tasks import scenes
from export.tasks.questions import FAMILIES, QuestionArgumentError, make_questions

torch = pytest.importorskip("torch")

from sdk.cli import main  # noqa: E402

FAST = ["--tiny", "--batch-size", "22", "--workers", "0", "--val-scenes", "2", "--quiet", "--tokenizer-scenes", "40"]


def _busy_scene():
    """The first train scene with at least four objects (so three relation pairs can be asked)."""
    return next(s for s in (scenes.split_scene("train", i, 224) for i in range(200)) if len(s.objects) >= 4)


def test_a_family_count_asks_that_many_distinct_questions_and_one_of_the_others():
    scene = _busy_scene()
    base = make_questions(scene, 5, FAMILIES)
    more = make_questions(scene, 5, FAMILIES, per_family={"relation": 3})
    counts = Counter(q.family for q in more)
    assert counts["relation"] == 3 and len({q.prompt for q in more if q.family == "relation"}) == 3
    assert {f: n for f, n in counts.items() if f != "relation"} == \
        {f: n for f, n in Counter(q.family for q in base).items() if f != "relation"}
    with pytest.raises(QuestionArgumentError):
        make_questions(scene, 5, FAMILIES, per_family={"relations": 2})
    with pytest.raises(QuestionArgumentError):
        make_questions(scene, 5, FAMILIES, per_family={"relation": 0})


def test_training_scenes_carry_the_extra_questions():
    from export.train.data import scene_items

    asked = [Counter(q.family for _, qs in scene_items("train", 0, 12, 112, questions_per_family=per_family)
                     for q in qs) for per_family in (1, {"relation": 3})]
    assert asked[1]["relation"] > 2 * asked[0]["relation"] and asked[1]["color"] == asked[0]["color"]


def test_the_trainer_asks_more_of_a_family_records_it_and_keeps_it_on_resume(tmp_path, capsys):
    out = tmp_path / "s0"
    assert main(["train", "--stage", "0", "--out", str(out), "--steps", "3", "--stop-after", "2",
                 "--extra-questions", "relation=2", *FAST]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["data"]["extra_questions"] == {"relation": 2}
    # 22 questions a batch, 9 families + 2 more relation questions a scene: 2 scenes a batch (3 without)
    assert config["scenes_per_batch"] == 2
    assert main(["train", "--stage", "0", "--out", str(out), "--resume", *FAST]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["data"]["extra_questions"] == {"relation": 2} and config["completed_steps"] == 3

    for bad in ("relations=2", "relation=-1", "relation"):
        with pytest.raises(SystemExit):
            main(["train", "--stage", "0", "--out", str(tmp_path / "no"), "--extra-questions", bad, *FAST])
        assert "FAMILY=N" in capsys.readouterr().err
