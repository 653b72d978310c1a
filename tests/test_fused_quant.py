"""decoder_fused with INT4/INT8 MatMulNBits weights (export/fused_quant.py) on int4/int8 bundles: it loads, the CPU
chooses it, it describes, its greedy tokens equal the bundle's plain quantized decoder's, and its logits stay within
the written tolerance of the FP32 reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import sdk
from export.extra_graphs import add_graphs
from export.fused_quant import weight_settings
from export.precision import quantize
from runtimes.onnxruntime import OnnxRuntimeBackend
from sdk.errors import ExportError
from test_parity import PROMPT

# Packing concatenates output columns and MatMulNBits' blocks run along K within a column, so the fused and the
# plain decoder hold the same integer weights: their logits differ only by the float work around them.
SAME_WEIGHTS_ATOL = 1e-4
# Against the FP32 decoder, on the tiny random checkpoint (logits up to about 3.6): measured 0.09 (int8) and 0.83
# (int4) for both the fused and the plain quantized decoder. The bound: the plain one's own error + 1e-4, and
# at most these.
FP32_ATOL = {"int8": 0.25, "int4": 1.5}


@pytest.fixture(scope="module")
def quantized(bundles, checkpoints, tmp_path_factory):
    """precision -> a qwen2 bundle (q/k/v biases: the packed bias path) at that precision with decoder_fused."""
    made = {}

    def get(precision):
        if precision not in made:
            root = tmp_path_factory.mktemp(f"fused-{precision}")
            out = quantize.quantize_bundle(bundles("qwen2"), root / precision, precision, calibration_size=4,
                                           progress=False)
            made[precision] = add_graphs(out, checkpoints["qwen2"], graphs=("decoder_fused",))
        return made[precision]
    return get


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_decoder_fused_loads_describes_and_matches_the_plain_quantized_decoder(precision, quantized,
                                                                                         bundles, image):
    path = quantized(precision)
    manifest = json.loads((path / "manifest.json").read_text())
    entry, details = manifest["graphs"]["decoder_fused"], manifest["precision"]["details"]
    assert manifest["precision"]["graphs"]["decoder_fused"] == precision and entry["weights"] == precision
    assert entry["flavour_of"] == "decoder" and entry["preferred_by"] == {"onnxruntime": ["cpu"]}
    layers = manifest["model"]["num_layers"]
    fused = details["decoder_fused"]
    # q|k|v, o, gate|up, down per layer; the lm_head too in int4 (8 bits, as the plain int4 decoder's)
    assert entry["ops"]["com.microsoft.MatMulNBits"] == fused["quantized_nodes"] == 4 * layers + (precision == "int4")
    assert "MatMul" not in entry["ops"] or precision == "int8"  # int8 keeps the lm_head float, as the plain one
    plain = details["decoder"]
    assert (fused["block_size"], fused["accuracy_level"]) == (plain["block_size"], plain["accuracy_level"])
    assert fused["settings_from"] == "the bundle's decoder"

    pipe = sdk.load(path, device="cpu")
    info = pipe.backend.info()
    assert info["decoder_graph"] == "decoder_fused" and info["kv_cache"] == "inplace"
    assert info["decoder_flavour_note"] is None
    result = pipe.generate(image, PROMPT, max_new_tokens=16, min_new_tokens=16)
    assert len(result.token_ids) == 16 and isinstance(result.text, str)
    fused_backend = pipe.backend
    plain_backend = OnnxRuntimeBackend(fused_backend.bundle, device="cpu", decoder_flavour="plain")
    pipe.backend = plain_backend
    assert pipe.generate(image, PROMPT, max_new_tokens=16, min_new_tokens=16).token_ids == result.token_ids

    reference = sdk.load(bundles("qwen2"), device="cpu").backend  # the FP32 bundle it was quantized from
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((1, 11, fused_backend.hidden_size)).astype(np.float32)
    got, want, ref = (b.decoder(embeds, b.new_cache(1))[0].copy() for b in (fused_backend, plain_backend, reference))
    np.testing.assert_allclose(got, want, atol=SAME_WEIGHTS_ATOL, rtol=0)
    error = np.abs(got - ref).max()
    assert error <= np.abs(want - ref).max() + SAME_WEIGHTS_ATOL and error <= FP32_ATOL[precision]


def test_fused_weights_follow_the_bundle_or_are_asked_for(quantized, bundles, tmp_path):
    from sdk.bundle import load_bundle

    int8 = load_bundle(quantized("int8"), verify=False).manifest
    assert weight_settings(int8, None)["lm_head_bits"] is None  # the plain int8 decoder keeps its lm_head float
    fp32 = load_bundle(bundles("qwen2"), verify=False).manifest
    assert weight_settings(fp32, None) is None  # float bundles keep float weights unless asked
    asked = weight_settings(fp32, "int4")
    assert (asked["bits"], asked["block_size"], asked["accuracy_level"], asked["lm_head_bits"]) == (4, 32, 4, 8)
    with pytest.raises(ExportError, match="choose int4, int8"):
        weight_settings(fp32, "int2")
    int4_dir = tmp_path / "int4"
    shutil.copytree(quantized("int4"), int4_dir)
    with pytest.raises(ExportError, match="optional graphs are traced in fp32"):  # only decoder_fused is quantized
        add_graphs(int4_dir, None, graphs=("decoder_static",))


def test_a_cpu_int4_decoder_fused_of_an_fp16_bundle_computes_in_fp32(bundles, checkpoints, image, tmp_path):
    """The shipped default's CPU decode graph (scripts/export_default_bundle.sh): an fp16 bundle's decoder_fused with
    int4 MatMulNBits is built in fp32 from the checkpoint, so its graph is the one an fp32 bundle gets, bit for bit;
    the runtime feeds it across the fp16 embed/vision graphs, and the CPU chooses it."""
    import onnx
    from onnx import numpy_helper

    fp16 = quantize.quantize_bundle(bundles("qwen2"), tmp_path / "fp16", "fp16", progress=False)
    fp32 = tmp_path / "fp32"
    shutil.copytree(bundles("qwen2"), fp32)
    with pytest.raises(ExportError, match="its own add-graphs call"):
        add_graphs(fp16, checkpoints["qwen2"], graphs=("decoder_fused", "decoder_static"), fused_weights="int4")
    for path in (fp16, fp32):
        add_graphs(path, checkpoints["qwen2"], graphs=("decoder_fused",), fused_weights="int4")
    manifest = json.loads((fp16 / "manifest.json").read_text())
    assert manifest["precision"]["graphs"]["decoder_fused"] == "int4"
    assert manifest["precision"]["graphs"]["decoder"] == "fp16"
    assert manifest["precision"]["details"]["decoder_fused"]["activations"] == "fp32"
    weights = [{t.name: numpy_helper.to_array(t) for t in onnx.load(p / "decoder_fused.onnx").graph.initializer}
               for p in (fp16, fp32)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][name], err_msg=name)

    pipe = sdk.load(fp16, device="cpu")
    backend = pipe.backend
    info = backend.info()
    assert info["decoder_graph"] == "decoder_fused" and info["decoder_flavour_note"] is None
    assert backend.kv_dtype == np.float32 and backend.embed_dtype == np.float32
    assert backend.embed_table is not None and backend.embed_table.dtype == np.float32  # fp16 rows, widened
    result = pipe.generate(image, PROMPT, max_new_tokens=16, min_new_tokens=16)
    assert len(result.token_ids) == 16
    # the same graph on the same fp32 inputs as in the fp32 bundle: the same logits
    rng = np.random.default_rng(5)
    embeds = rng.standard_normal((1, 9, backend.hidden_size)).astype(np.float32)
    reference = sdk.load(fp32, device="cpu").backend
    got, want = (b.decoder(embeds, b.new_cache(1))[0].copy() for b in (backend, reference))
    np.testing.assert_allclose(got, want, atol=SAME_WEIGHTS_ATOL, rtol=0)
    # and within int4's bound of the bundle's own fp16 decoder
    plain = OnnxRuntimeBackend(backend.bundle, device="cpu", decoder_flavour="plain")
    fp16_logits = plain.decoder(embeds.astype(np.float16), plain.new_cache(1))[0].astype(np.float32)
    assert np.abs(got - fp16_logits).max() <= FP32_ATOL["int4"]
