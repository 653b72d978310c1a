"""Phrasings (export/tasks/phrasings.py) and instruction phrasings: enough of them, and TRAIN / HELD_OUT never overlap."""

from __future__ import annotations

import re

from export.tasks import instructions
from export.tasks.paraphrase import norm  # what "the same template" means, here and for the paraphrase refusal
from export.tasks.phrasings import HELD_OUT, LEGACY, TRAIN
from export.tasks.questions import FAMILIES, templates


def test_every_family_has_many_train_and_some_held_out_phrasings():
    for family in FAMILIES:
        assert len(set(templates(family, "train"))) >= 12, family
        assert len(set(templates(family, "held_out"))) >= 6, family
    for groups in (TRAIN["relation"], HELD_OUT["relation"]):
        assert set(groups) == {"left", "right", "above", "below"}
    for family in FAMILIES:
        for tpl in templates(family, "train") + templates(family, "held_out"):
            slots = set(re.findall(r"{(\w)}", tpl))
            assert slots == ({"a", "b"} if family == "relation" else set() if family in ("describe", "refer")
                             else {"n"}), (family, tpl)


def test_train_and_held_out_never_share_a_template():
    train = {norm(t) for f in FAMILIES for t in templates(f, "train")}
    held = {norm(t) for f in FAMILIES for t in templates(f, "held_out")}
    assert not train & held, train & held
    texts = [t for i in instructions.TRAINED.values() for t in i.train_texts]
    held_texts = [t for i in instructions.TRAINED.values() for t in i.held_out_texts]
    assert not {norm(t) for t in texts} & {norm(t) for t in held_texts}
    assert all(i.held_out_texts for i in instructions.TRAINED.values())


def test_newcomer_phrasings_are_trained_and_legacy_is_a_subset():
    # Issue 19: a newcomer typed these and got nonsense; they are in TRAIN on purpose.
    assert {"Describe the scene.", "What does the picture show?"} <= set(TRAIN["describe"])
    for family in LEGACY:
        assert set(templates(family, "legacy")) <= set(templates(family, "train"))
        assert len(templates(family, "legacy")) == (4 if family == "relation" else 3)


def test_the_train_split_draws_the_wider_instruction_phrasings_and_eval_splits_keep_theirs():
    """more_texts (instructions.py) reach training only: the eval splits' questions stay the measured ones."""
    import numpy as np

    from export.tasks import scenes
    from export.tasks.questions import Question

    assert scenes.SPLITS["train"].instruction_phrasing == "train-wide"
    assert all(scenes.SPLITS[s].instruction_phrasing in ("train", "held_out") for s in scenes.EVAL_SPLITS)
    for name, instruction in instructions.TRAINED.items():
        assert len(instruction.train_texts) >= 7, name
        question = Question(instruction.families[0], "Is there a red star?", "yes" if name in ("yes-no",
                            "true-false") else "3" if instruction.families[0] == "count" else "small red star")
        rng = np.random.default_rng(0)
        drawn = {instructions.instruct(question, name, rng, "train-wide").prompt for _ in range(200)}
        endings = set(instruction.train_texts)
        assert {d.split("? ", 1)[1] for d in drawn} == endings, name
        assert all(instructions.instruction_of(d) == name for d in drawn)
        test = {instructions.instruct(question, name, rng, "train").prompt.split("? ", 1)[1] for _ in range(100)}
        assert test == set(instruction.texts), name
