"""Answer-form instructions: instructed answers, the training stream, and the probe's checks."""

from __future__ import annotations

import numpy as np
import pytest

from export.tasks import instructions, scenes
from export.tasks.scenes import Question


def test_instructed_answers_follow_the_instruction():
    q = instructions.instruct(Question("position", "Where is the red star?", "top left"), "capitals")
    assert q.prompt == "Where is the red star? Answer in capitals." and q.answer == "TOP LEFT"
    q = instructions.instruct(Question("count", "How many circles are there?", "3"), "number-word")
    assert q.prompt.endswith("Answer with the number written as a word.") and q.answer == "three"
    q = instructions.instruct(Question("exist", "Is there a blue square?", "no"), "yes-no")
    assert q.answer == "no" and q.family == "exist"
    with pytest.raises(ValueError, match="not 'count'"):
        instructions.instruct(Question("count", "How many?", "2"), "capitals")


def test_exact_and_form_checks():
    capitals = instructions.ALL["capitals"]
    assert capitals.exact("RED", "red") and capitals.exact("RED.", "red")
    assert not capitals.exact("red", "red") and not capitals.exact("BLUE", "red")
    assert capitals.form("BLUE") and not capitals.form("Blue") and not capitals.form("3")
    number = instructions.ALL["number-word"]
    assert number.exact("twelve", "12") and not number.exact("12", "12") and number.form("Four")
    one_word = instructions.ALL["one-word"]
    assert one_word.answer is None and one_word.exact("circles", "anything") and not one_word.exact("a b", "x")
    assert set(instructions.HELD_OUT).isdisjoint(instructions.TRAINED)


def test_training_stream_instructs_about_the_asked_fraction_and_keeps_the_questions():
    pytest.importorskip("torch")
    from export.train.data import scene_items

    plain = scene_items("train", 0, 40, 224)
    mixed = scene_items("train", 0, 40, 224, instruction_fraction=0.5)
    assert [s.seed for s, _ in plain] == [s.seed for s, _ in mixed]
    fits = instructed = 0
    texts = {t for i in instructions.TRAINED.values() for t in i.train_texts}  # the train split's
    for (_, qa), (_, qb) in zip(plain, mixed):
        assert len(qa) == len(qb)
        for a, b in zip(qa, qb):
            assert a.family == b.family
            if b.prompt == a.prompt:
                assert b.answer == a.answer
                continue
            sep = " " if a.prompt[-1] in ".?!" else ". "
            suffix = b.prompt[len(a.prompt) + len(sep):]
            assert b.prompt.startswith(a.prompt + sep) and suffix in texts
            name = next(n for n, i in instructions.TRAINED.items() if suffix in i.train_texts)
            assert instructions.instruction_of(b.prompt) == name
            assert b.answer == instructions.TRAINED[name].answer(a.answer)
            instructed += 1
        fits += sum(any(q.family in i.families for i in instructions.TRAINED.values()) for q in qa)
    assert 0.35 < instructed / fits < 0.65
    assert scene_items("train", 0, 3, 224, instruction_fraction=0.0) == scene_items("train", 0, 3, 224)


def test_maybe_instruct_is_a_no_op_at_zero_and_covers_every_trained_family():
    rng = np.random.Generator(np.random.PCG64(0))
    scene = scenes.make_scene(scenes.split_seed("train", 5))
    qs = scenes.make_questions(scene, 0)
    assert instructions.maybe_instruct(qs, rng, 0.0) is qs
    everything = instructions.maybe_instruct(qs, rng, 1.0)
    for a, b in zip(qs, everything):
        fits = any(a.family in i.families for i in instructions.TRAINED.values())
        assert (b.prompt != a.prompt) == fits
