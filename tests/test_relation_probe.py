"""scripts/relation_probe.py's labels and probe: the direction read from a prompt is the template's own group for
every trained relation template, and the ridge probe separates what is linearly there and not what is not."""

from __future__ import annotations

import importlib.util

import numpy as np

from export.tasks.questions import template_kind, templates
from helpers import ROOT

spec = importlib.util.spec_from_file_location("relation_probe", ROOT / "scripts" / "relation_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_the_direction_word_of_every_trained_relation_template():
    for template in templates("relation"):
        prompt = template.format(a="red star", b="blue circle")
        assert probe.first_when_yes(prompt) == (template_kind("relation", template) in ("left", "above")), template


def test_the_ridge_probe_reads_a_linear_fact_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 64))
    linear = x[:, 3] - 0.5 * x[:, 10] > 0
    noise = rng.random(1200) > 0.5
    assert probe.ridge_accuracy(x[:800], linear[:800], x[800:], linear[800:]) > 0.85  # least squares, not max-margin: 0.91 here
    assert abs(probe.ridge_accuracy(x[:800], noise[:800], x[800:], noise[800:]) - 0.5) < 0.08
