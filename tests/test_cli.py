from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from helpers import run_pipmm as pipmm

ROOT = Path(__file__).resolve().parents[1]


def test_describe_json(bundles, image, tmp_path):
    path = tmp_path / "frame.jpg"
    Image.fromarray(image).save(path)
    out = pipmm("describe", path, "what is in the picture?", "--bundle", bundles("llama"), "--max-new-tokens", 6,
                "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"text", "token_ids", "stats"}
    assert len(result["token_ids"]) <= 6
    assert result["stats"]["visual_tokens"] == 49


def test_describe_errors_are_one_line_and_nonzero(bundles, tmp_path):
    out = pipmm("describe", tmp_path / "missing.png", "hi", "--bundle", bundles("llama"))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")
    out = pipmm("describe", tmp_path / "missing.png", "hi", "--bundle", tmp_path / "no-bundle")
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_export_cli(checkpoints, prompt_mlp, tmp_path):
    out = pipmm("export", checkpoints["llama"], "--out", tmp_path / "b", "--quiet")
    assert out.returncode == 1 and "--prompt-mlp" in out.stderr
    out = pipmm("export", checkpoints["qwen2"], "--out", tmp_path / "b", "--no-prompt-mlp", "--visual-tokens", "quarter",
                "--quiet")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["visual_tokens"]["count"] == 13 and manifest["prompt_vector"] is None
