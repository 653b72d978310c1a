"""A bundle is checked before any graph is opened; a damaged one fails with a one-line BundleError."""

from __future__ import annotations

import json
import shutil

import pytest

import sdk
from helpers import edit_manifest
from export.writer import export_bundle
from sdk.bundle import load_bundle
from sdk.errors import BundleError, ExportError
from sdk.manifest import FORMAT_VERSION


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundles("llama"), dst)
    return dst


def _assert_refused(path, match):
    with pytest.raises(BundleError, match=match) as err:
        sdk.load(path, device="cpu")
    assert "\n" not in str(err.value)


def test_manifest_lists_every_file_and_the_contract(bundles):
    path = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    manifest = load_bundle(path).manifest
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest.files) == on_disk == {"vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json"}
    assert manifest.visual_tokens.to_dict() == {"budget": "half", "count": 25, "reducer": "prompt-topk",
                                                "positions": "sequence"}
    assert manifest.prompt_vector.layer == -1
    assert manifest.precision.default == "fp32"
    assert {"bos", "eos", "pad", "image"} <= set(manifest.special_tokens.to_dict())
    decoder = manifest.graphs["decoder"]
    assert decoder.inputs[0].to_dict() == {"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 64]}
    assert [o.name for o in decoder.outputs][:2] == ["logits", "hidden"]


def test_missing_directory(tmp_path):
    _assert_refused(tmp_path / "nope", "does not exist")


def test_missing_graph_file(bundle_copy):
    (bundle_copy / "decoder.onnx").unlink()
    _assert_refused(bundle_copy, "missing")


def test_tampered_graph(bundle_copy):
    data = bytearray((bundle_copy / "vision.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / "vision.onnx").write_bytes(bytes(data))
    _assert_refused(bundle_copy, "sha256")


def test_truncated_file(bundle_copy):
    data = (bundle_copy / "decoder.onnx").read_bytes()
    (bundle_copy / "decoder.onnx").write_bytes(data[: len(data) // 2])
    _assert_refused(bundle_copy, "truncated")


def test_unknown_format_version(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    _assert_refused(bundle_copy, "format version")


def test_bundle_from_newer_sdk(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(min_sdk_version="99.0.0"))
    _assert_refused(bundle_copy, "upgrade")


def test_path_escaping_the_bundle(bundle_copy):
    def escape(m):
        m["files"]["../secret"] = {"sha256": "0", "bytes": 1}
    edit_manifest(bundle_copy, escape)
    _assert_refused(bundle_copy, "outside the bundle")


def test_graph_inputs_differ_from_manifest(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["graphs"]["embed"]["inputs"][0].update(name="token_ids"))
    _assert_refused(bundle_copy, "inputs")


def test_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    _assert_refused(bundle_copy, "not valid JSON")


def test_pipmm_export_without_prompt_mlp_stops(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--prompt-mlp"):
        export_bundle(checkpoints["llama"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_unsupported_checkpoint_is_refused(checkpoints, tmp_path):
    ckpt = tmp_path / "pixtral"  # CLIP and SigLIP towers are supported (tests/test_siglip.py); Pixtral's is not
    shutil.copytree(checkpoints["llama"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"]["model_type"] = "pixtral"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="vision tower 'pixtral' is not supported"):
        export_bundle(ckpt, tmp_path / "b", no_prompt_mlp=True)


def test_interrupted_export_leaves_nothing_that_loads(checkpoints, tmp_path, monkeypatch):
    from export import onnx_graphs

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setitem(onnx_graphs.EXPORTERS, "decoder", fail)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(checkpoints["llama"], tmp_path / "b", no_prompt_mlp=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_external_data_bundle_loads_and_checks_its_weights(checkpoints, tmp_path, monkeypatch, image):
    """Graphs above the threshold keep their weights in a side file, listed and hashed like the rest."""
    from export import onnx_graphs

    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 0)
    out = export_bundle(checkpoints["llama"], tmp_path / "b", no_prompt_mlp=True, progress=False)
    manifest = load_bundle(out).manifest
    side_files = [name for name in manifest.files if name.endswith(".data")]
    assert len(side_files) == 3
    assert sdk.load(out, device="cpu").generate(image, "what is here?", max_new_tokens=4).token_ids
    data = bytearray((out / side_files[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / side_files[0]).write_bytes(bytes(data))
    _assert_refused(out, "sha256")
