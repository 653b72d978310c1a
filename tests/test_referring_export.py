"""energy_grad on the decoder's weights whatever way a bundle is written (docs/referring.md): `pipmm export
--controlmllm` (how sdk/default_bundle is made, scripts/export_default_bundle.sh), add-graphs on an fp16 bundle,
the quantized precisions refused with their reason, and a failed attach leaving the bundle as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from sdk.bundle import load_bundle  # noqa: E402
from sdk.errors import ExportError  # noqa: E402
from export.extra_graphs import add_graphs, attach_graphs, export_with_graphs  # noqa: E402

PROMPT = "what is the color of the shape"
BOX = sdk.Box(14, 6, 44, 36)


def _weights_outside(path) -> int:
    """Bytes of the graph's weight initializers (>= 4096 bytes) still held in the graph file itself."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) for t in model.graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 4096)


def _feeds(t=11, d=64, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros(t, np.float32)
    image[2:7] = 1
    mask = np.zeros(t, np.float32)
    mask[3:5] = 1
    queries = np.zeros(t, np.float32)
    queries[7:] = 0.25
    return {"inputs_embeds": rng.normal(0, 1, (1, t, d)).astype(np.float32), "position_ids": np.arange(t)[None],
            "mask": mask, "image_weight": image, "query_weights": queries,
            "layer_weights": np.full(layers, 1 / layers, np.float32)}


def test_cli_export_with_controlmllm_shares_the_decoders_weights(checkpoints, bundles, image, tmp_path, capsys):
    from sdk.cli import main

    out = tmp_path / "bundle"
    assert main(["export", str(checkpoints["llama"]), "--no-prompt-mlp", "--controlmllm", "--referring-set",
                 "controlmllm++.lr=0.5", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("with energy_grad")
    manifest = json.loads((out / "manifest.json").read_text())
    sharing = manifest["graphs"]["energy_grad"]["sharing"]
    assert sharing["shared_bytes"] == sharing["weight_bytes"] > 0 and manifest["precision"]["graphs"]["energy_grad"] == "fp32"
    assert "decoder.onnx.data" in manifest["files"] and _weights_outside(out / "energy_grad.onnx") == 0
    assert _weights_outside(out / "decoder.onnx") == 0
    assert manifest["referring"]["variants"]["controlmllm++"]["lr"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left beside it
    # the decoder with its weights in a side file answers as the bundle exported without energy_grad
    pipe, plain = sdk.load(out, device="cpu"), sdk.load(bundles("llama"), device="cpu")
    assert pipe.generate(image, PROMPT, max_new_tokens=6).token_ids == \
        plain.generate(image, PROMPT, max_new_tokens=6).token_ids
    referred = pipe.generate(image, PROMPT, max_new_tokens=4, region=BOX, referring="controlmllm++")
    assert referred.referring["steps"] == 3


def test_fp16_bundle_shares_its_decoders_weights(checkpoints, bundles, referring_bundle, tmp_path):
    """fp16 = the fp32 export converted (export/precision/quantize.py); energy_grad traced in float16 finds every
    weight byte-equal in the converted decoder, and computes what the fp32 graph computes, to fp16's precision."""
    import onnxruntime

    from export.precision.quantize import quantize_bundle

    fp16 = quantize_bundle(bundles("llama"), tmp_path / "fp16", "fp16", progress=False)
    add_graphs(fp16, checkpoints["llama"], ("energy_grad",))
    manifest = json.loads((fp16 / "manifest.json").read_text())
    sharing = manifest["graphs"]["energy_grad"]["sharing"]
    assert sharing["shared_bytes"] == sharing["weight_bytes"] > 0 and manifest["precision"]["graphs"]["energy_grad"] == "fp16"
    assert _weights_outside(fp16 / "energy_grad.onnx") == 0
    feeds = _feeds()
    cpu = ["CPUExecutionProvider"]
    want_e, want_g = onnxruntime.InferenceSession(str(referring_bundle / "energy_grad.onnx"), providers=cpu).run(
        None, feeds)
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    got_e, got_g = onnxruntime.InferenceSession(str(fp16 / "energy_grad.onnx"), providers=cpu).run(None, half)
    assert abs(float(got_e) - float(want_e)) <= 1e-2 * float(want_e)
    assert np.abs(got_g.astype(np.float32) - want_g).max() <= 2e-2 * np.abs(want_g).max()


def test_fp16_sharing_survives_weights_below_the_smallest_float16(checkpoints, tmp_path):
    """Trained weights hold values below float16's smallest subnormal (m20 did): onnxruntime's converter makes them
    +-5.96e-8 in the decoder, torch's .half() 0; energy_grad is traced from the converter's values, so it still
    finds every weight in the decoder (before: m20's energy_grad and decoder_fused carried 4.3 MB of their own)."""
    from safetensors.torch import load_file, save_file

    from export.precision.quantize import quantize_bundle
    from export.writer import export_bundle

    ckpt = Path(shutil.copytree(checkpoints["llama"], tmp_path / "ckpt"))
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in weights if "layers.0.self_attn.q_proj.weight" in k)
    weights[name][0, :8] = torch.tensor([1e-8, -1e-8, 2e-8, -2.5e-8] * 2, dtype=weights[name].dtype)
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    fp32 = export_bundle(ckpt, tmp_path / "fp32", no_prompt_mlp=True, progress=False)
    fp16 = quantize_bundle(fp32, tmp_path / "fp16", "fp16", progress=False)
    add_graphs(fp16, ckpt, ("energy_grad",))
    sharing = json.loads((fp16 / "manifest.json").read_text())["graphs"]["energy_grad"]["sharing"]
    assert sharing["shared_bytes"] == sharing["weight_bytes"] > 0


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_precisions_are_refused_before_any_work(checkpoints, tmp_path, precision, capsys):
    from sdk.cli import main

    with pytest.raises(ExportError, match="quantized decoder cannot lend"):
        export_with_graphs(checkpoints["llama"], tmp_path / "b", no_prompt_mlp=True, precision=precision)
    assert main(["export", str(checkpoints["llama"]), "--no-prompt-mlp", "--controlmllm", "--precision", precision,
                 "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the decoder is {precision}") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_failed_attach_leaves_the_bundle_as_it_was(bundles, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundles("llama"), out)
    before = (out / "decoder.onnx").read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "other.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="export energy_grad as energy_grad.onnx"):
        attach_graphs(out, {"energy_grad": scratch / "other.onnx"})
    assert (out / "decoder.onnx").read_bytes() == before and not (out / "decoder.onnx.data").exists()
    load_bundle(out, verify=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bundles("llama").iterdir())
