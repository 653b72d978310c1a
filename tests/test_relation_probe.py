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


def test_the_place_regression_reads_a_linear_coordinate_and_not_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1200, 64))
    coordinate = np.tanh(0.5 * x[:, 5] + 0.3 * x[:, 20])
    assert probe.ridge_r2(x[:800], coordinate[:800], x[800:], coordinate[800:]) > 0.8
    assert probe.ridge_r2(x[:800], rng.random(800), x[800:], rng.random(400)) < 0.05


def test_the_places_of_relation_questions_are_the_named_objects():
    from export.train import evaluate

    examples = evaluate.questions("train", 40, families=["relation"])  # train: canvases of other aspects too
    places = probe.places("train", examples)
    assert places.shape == (40, 4) and np.all(np.abs(places) <= 1)
    for e, (xa, ya, xb, yb) in zip(examples, places):
        horizontal = "left" in e.prompt.lower() or "right" in e.prompt.lower()
        a, b = (xa, xb) if horizontal else (ya, yb)
        assert (e.answer == "yes") == ((a < b) == probe.first_when_yes(e.prompt)), e.prompt
