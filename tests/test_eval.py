"""`pipmm eval` on bundles exported from a smoke-trained checkpoint, and its torch paths."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from export.tasks import scenes  # noqa: E402
from export.writer import export_bundle  # noqa: E402
from export.tasks.answers import normalize  # noqa: E402
from export.train.evaluate import questions, run_batched, run_pipeline, torch_pipeline  # noqa: E402
from sdk.cli import main  # noqa: E402

FAST = ["--tiny", "--batch-size", "16", "--workers", "0", "--val-scenes", "0", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert main(["train", "--stage", "0", "--out", str(root / "s0"), "--steps", "3", "--tokenizer-scenes", "60",
                 *FAST]) == 0
    assert main(["train", "--stage", "1", "--init", str(root / "s0"), "--out", str(root / "s1"), "--steps", "2",
                 *FAST]) == 0
    return root


@pytest.fixture(scope="module")
def sharp(trained, tmp_path_factory):
    """The smoke checkpoint with large random weights: greedy answers differ from question to question."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("sharp")
    model = LlavaForConditionalGeneration.from_pretrained(trained / "s1", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "preprocessor_config.json", "prompt_mlp.json", "prompt_mlp.safetensors"):
        (out / f).write_bytes((trained / "s1" / f).read_bytes())
    return out


def test_eval_on_a_bundle_writes_the_json_schema(trained, tmp_path):
    bundle = export_bundle(trained / "s1", tmp_path / "b", prompt_mlp=trained / "s1", budget="half",
                           reducer="prompt-topk", progress=False)
    out = tmp_path / "r.json"
    assert main(["eval", str(bundle), "--n", "10", "--json", str(out), "--quiet", "--max-new-tokens", "8"]) == 0
    result = json.loads(out.read_text())
    assert result["overall"]["n"] == 10 and 0.0 <= result["overall"]["accuracy"] <= 1.0
    assert set(result["per_family"]) <= set(scenes.FAMILIES)
    assert sum(f["n"] for f in result["per_family"].values()) == 10
    assert all(set(f) == {"n", "correct", "accuracy"} for f in result["per_family"].values())
    assert result["latency_ms"]["median"] > 0
    assert result["source"]["kind"] == "bundle" and result["source"]["pipmm"] is True
    assert result["source"]["budget"] == "half" and result["source"]["reducer"] == "prompt-topk"
    assert result["source"]["visual_tokens"] == 32
    assert result["data"]["split"] == "test" and result["data"]["n"] == 10
    assert all(set(m) == {"family", "prompt", "answer", "output"} for m in result["mistakes"])
    # Families filter, and the table of saved results.
    out2 = tmp_path / "c.json"
    assert main(["eval", str(bundle), "--n", "4", "--families", "color", "shape", "--json", str(out2), "--quiet",
                 "--max-new-tokens", "4"]) == 0
    assert set(json.loads(out2.read_text())["per_family"]) <= {"color", "shape"}


def test_table_of_saved_results(tmp_path, capsys):
    fake = {"source": {"visual_tokens": 128}, "per_family": {"color": {"n": 2, "correct": 1, "accuracy": 0.5}},
            "overall": {"n": 2, "correct": 1, "accuracy": 0.5}}
    (tmp_path / "r.json").write_text(json.dumps(fake))
    assert main(["eval", "--table", f"PIP-MM half={tmp_path / 'r.json'}"]) == 0
    text = capsys.readouterr().out
    assert "| PIP-MM half | 128 | 50.0 | **50.0** |" in text


def test_batched_torch_answers_equal_the_pipeline(sharp):
    examples = questions("val", 12)
    for mlp, budget, reducer in ((None, "full", "pool"), (sharp, "half", "prompt-topk")):
        reference = run_pipeline(torch_pipeline(sharp, mlp, budget, reducer), examples, max_new_tokens=6)
        batched, _ = run_batched(sharp, examples, mlp, budget, reducer, batch_size=5, max_new_tokens=6)
        assert [r["output"] for r in batched] == [r["output"] for r in reference]
        assert len({r["output"] for r in reference}) > 1, "outputs should differ between questions"


def test_questions_are_deterministic_and_normalized():
    a, b = questions("test", 9), questions("test", 9)
    assert [(x.prompt, x.answer) for x in a] == [(x.prompt, x.answer) for x in b]
    assert [x.family for x in questions("test", 5, families=["count"])] == ["count"] * 5
    assert normalize("  Bottom   Right. ") == "bottom right"
