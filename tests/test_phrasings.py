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
    texts = [t for i in instructions.TRAINED.values() for t in i.texts]
    held_texts = [t for i in instructions.TRAINED.values() for t in i.held_out_texts]
    assert not {norm(t) for t in texts} & {norm(t) for t in held_texts}
    assert all(i.held_out_texts for i in instructions.TRAINED.values())


def test_newcomer_phrasings_are_trained_and_legacy_is_a_subset():
    # Issue 19: a newcomer typed these and got nonsense; they are in TRAIN on purpose.
    assert {"Describe the scene.", "What does the picture show?"} <= set(TRAIN["describe"])
    for family in LEGACY:
        assert set(templates(family, "legacy")) <= set(templates(family, "train"))
        assert len(templates(family, "legacy")) == (4 if family == "relation" else 3)
