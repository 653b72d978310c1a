"""scripts/gpu_speed.py's own logic (its end-to-end dry run, `--preset ci-tiny --device cpu`, takes over a minute on
CI's cores: not run here): the prompt it gives GenAI, medians over rounds, token agreement, the report, and what
the 7B run's split calls rely on: --prune deletes an input only when nothing left needs it, sweep() only leftovers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import sdk
from sdk.bench import DEFAULT_PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_speed  # noqa: E402


def test_genai_prompt_is_as_long_as_pipmms_prefill(bundles):
    pipe = sdk.load(bundles("qwen2"), device="cpu")
    ids = gpu_speed.prompt_ids(bundles("qwen2"))
    assert len(ids) == len(pipe.prompter.prompt_ids(DEFAULT_PROMPT)[0]) and ids.min() >= 5


def test_rounds_are_summarised_and_tokens_compared():
    doc = {"preset": "p", "device": "cpu", "config": {"new_tokens": 4, "rounds": 2, "runs": 1},
           "variants": {name: {"rounds": []} for name in gpu_speed.VARIANTS}}
    rounds = doc["variants"]
    rounds["fused"]["rounds"] = [
        {"stages": {"ttft_ms": 10.0, "decode_tokens_per_s": 100.0}, "memory": {"device_peak_mb": 5.0},
         "tokens": [1, 2, 3, 4], "backend": {"decoder_graph": "decoder_fused", "kv_cache": "static"}},
        {"stages": {"ttft_ms": 30.0, "decode_tokens_per_s": 300.0}, "memory": {"device_peak_mb": 7.0}}]
    rounds["genai"]["rounds"] = [{"stages": {"ttft_ms": 2.0, "decode_tokens_per_s": 500.0}, "tokens": [1, 2, 9, 4],
                                  "backend": {"onnxruntime_genai": "0.18.0"}}]
    rounds["genai-int4"]["rounds"] = [{"error": "RuntimeError: no model"}]
    rounds["genai-int4"]["error"] = "RuntimeError: no model"
    gpu_speed.summarise(doc)
    assert rounds["fused"]["median"] == {"ttft_ms": 20.0, "decode_tokens_per_s": 200.0}
    assert rounds["fused"]["device_peak_mb"] == 7.0
    assert doc["agreement"] == {"fused vs genai": {"leading_identical": 2, "of": 4, "identical": 3}}
    table = gpu_speed.report(doc)
    assert "| fused | 20.0 |" in table and "RuntimeError: no model" in table and "2 of 4 leading identical" in table


def _manifest(bundle: Path, graphs: dict) -> None:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps({"graphs": graphs}))


def test_prune_keeps_inputs_until_no_stage_needs_them(tmp_path):
    for name in ("ckpt", "text"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    _manifest(tmp_path / "float", {"decoder": {}, "decoder_fused": {}})
    assert gpu_speed.prune(tmp_path) == []  # int4 and GenAI not built yet: both still needed
    _manifest(tmp_path / "int4", {"decoder_fused": {"weights": "int4"}})
    assert gpu_speed.prune(tmp_path) == ["ckpt"]  # the text model is out: the checkpoint has no reader left
    (tmp_path / "genai-float").mkdir()
    (tmp_path / "genai-float" / "genai_config.json").write_text("{}")
    assert gpu_speed.prune(tmp_path) == []  # genai-int4 still reads the text model
    (tmp_path / "genai-int4").mkdir()
    (tmp_path / "genai-int4" / "genai_config.json").write_text("{}")
    assert gpu_speed.prune(tmp_path) == ["text"] and not (tmp_path / "text").exists()


def test_sweep_removes_only_what_killed_stages_left(tmp_path):
    for name in (".float.partial-x1", ".int4.graphs-y2", "genai-int4.partial", "float", "results"):
        (tmp_path / name).mkdir()
    (tmp_path / "ids.npy").write_bytes(b"")
    gpu_speed.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "ids.npy", "results"]


def test_export_steps_are_checked(capsys):
    with pytest.raises(SystemExit):
        gpu_speed.main(["--export", "checkpoint;float+bogus", "--rounds", "0"])
    assert "unknown export stages bogus" in capsys.readouterr().err


def test_the_chart_draws_every_measured_variant(tmp_path):
    import gpu_speed_chart

    pytest.importorskip("matplotlib")
    doc = {"preset": "p", "device": "cuda", "time": "2026-12-03T00:00:00Z",
           "config": {"new_tokens": 4, "rounds": 1, "runs": 1},
           "variants": {"fused": {"median": {"preprocess_ms": 1.0, "vision_ms": 2.0, "prefill_ms": 3.0, "ttft_ms": 6.2,
                                             "decode_tokens_per_s": 100.0}},
                        "genai": {"median": {"ttft_ms": 2.0, "prefill_ms": 2.0, "decode_tokens_per_s": 120.0}},
                        "genai-int4": {"rounds": [{"error": "no model"}]}}}
    assert [name for name, _ in gpu_speed_chart.rows(doc)] == ["fused", "genai"]
    png = gpu_speed_chart.chart(doc, tmp_path / "speed.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no measured variant"):
        gpu_speed_chart.chart({**doc, "variants": {"genai-int4": doc["variants"]["genai-int4"]}}, tmp_path / "x.png")
