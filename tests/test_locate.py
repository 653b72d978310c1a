"""The locate loss (export/train/locate.py): its targets agree with the generator's own answers, the head learns
them on a fixed batch, and `pipmm train` records, resumes and refuses its settings."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.train.data import locate_targets, scene_items  # noqa: E402
from export.train.locate import locate_loss, locate_setting  # noqa: E402
from export.train.model import forward_loss  # noqa: E402
from helpers import ROOT  # noqa: E402
from sdk.cli import main  # noqa: E402
from test_train import FAST, tiny_model_and_batch  # noqa: E402

spec = importlib.util.spec_from_file_location("relation_probe", ROOT / "scripts" / "relation_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_relation_targets_give_the_generators_answer_and_one_object_questions_fill_one_slot():
    items = scene_items("train", 0, 60, 224, questions_per_family={"relation": 3})
    relations = 0
    for scene, questions in items:
        for q in questions:
            targets, present = locate_targets(scene, q)
            assert np.all(np.abs(targets) <= 1.0)
            if q.family == "relation":
                assert present.all(), q.prompt  # both names match one object each (questions.py asks only those)
                horizontal = re.search(r"\b(left|right)\b", q.prompt.lower()) is not None
                a, b = (targets[0], targets[2]) if horizontal else (targets[1], targets[3])
                # "yes" exactly when the first-named object comes first along the axis and the word says so
                assert (q.answer == "yes") == ((a < b) == probe.first_when_yes(q.prompt)), q.prompt
                relations += 1
            elif q.family in ("color", "shape", "position", "label"):
                assert present.tolist() == [True, True, False, False], q.prompt
            elif q.family in ("describe", "count", "refer"):
                assert not present.any(), q.prompt
    assert relations > 60


def test_position_targets_fall_in_the_answered_cell():
    thirds = {"top": (-1, -1 / 3), "bottom": (1 / 3, 1), "left": (-1, -1 / 3), "right": (1 / 3, 1)}
    checked = 0
    for scene, questions in scene_items("train", 100, 40, 224):
        for q in (q for q in questions if q.family == "position"):
            (x, y, _, _), _ = locate_targets(scene, q)
            words = q.answer.split()
            for word in words:
                if word in ("top", "bottom"):
                    lo, hi = thirds[word]
                    assert lo <= y <= hi, (q.prompt, q.answer, y)
                elif word in ("left", "right"):
                    lo, hi = thirds[word]
                    assert lo <= x <= hi, (q.prompt, q.answer, x)
            checked += 1
    assert checked > 10


def test_the_head_learns_the_places_on_a_fixed_batch(tmp_path):
    model, vision, batch = tiny_model_and_batch(tmp_path, 4)
    assert batch["locate_present"].any()
    args = type("Args", (), {"locate_weight": 1.0, "locate_layer": None, "pack_questions": False, "stage": 0,
                             "train_llm": False, "seed": 0})()
    text = model.config.text_config
    head, layer, weight = locate_setting(args, text.hidden_size, text.num_hidden_layers)
    assert layer == 1 and args.locate_layer == 1  # the tiny LLM has 2 layers: two below the top is layer 1 (>= 1)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    first = last = None
    for _ in range(50):
        out = forward_loss(model, vision, batch, locate=(head, layer, weight))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        last = float(out["locate_loss"].detach())
        first = last if first is None else first
    assert last < 0.1 * first, (first, last)  # 0.197 -> 0.0089 in 50 steps here
    assert float(out["loss"].detach()) > float(out["lm_loss"].detach())  # the term is in the total


def test_a_batch_without_named_objects_gives_zero_with_a_gradient():
    head = torch.nn.Linear(8, 4)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, -100, -100]])
    loss = locate_loss(head, hidden, labels, torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad is not None
    # the state read is each row's last prompt token: position 1 of row 0, 0 of row 1
    present = torch.tensor([[True, True, False, False], [True, True, False, False]])
    locate_loss(head, hidden, labels, torch.ones(2, 4), present).backward()
    touched = hidden.grad.abs().sum(-1) > 0
    assert touched.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]


def test_the_trainer_records_the_setting_keeps_it_on_resume_and_refuses_a_frozen_llm(tmp_path):
    s0, s2 = tmp_path / "s0", tmp_path / "s2"
    assert main(["train", "--stage", "0", "--out", str(s0), "--steps", "3", "--stop-after", "2",
                 "--locate-weight", "0.5", *FAST]) == 0
    config = json.loads((s0 / "train_config.json").read_text())
    assert config["locate_weight"] == 0.5 and config["locate_layer"] == 1
    assert main(["train", "--stage", "0", "--out", str(s0), "--resume", *FAST]) == 0
    config = json.loads((s0 / "train_config.json").read_text())
    assert config["locate_weight"] == 0.5 and config["completed_steps"] == 3
    log = [json.loads(line) for line in (s0 / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["locate_loss"]) for r in log)
    # stage 2 without --train-llm: the loss would train nothing it reads through
    assert main(["train", "--stage", "2", "--init", str(s0), "--no-prompt-mlp", "--out", str(s2), "--steps", "1",
                 "--locate-weight", "1", *FAST]) == 1
    assert main(["train", "--stage", "0", "--out", str(tmp_path / "p"), "--steps", "1", "--pack-questions",
                 "--locate-weight", "1", *FAST]) == 1
