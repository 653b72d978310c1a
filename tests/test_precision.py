"""FP16, INT8 and INT4 bundles: they load, run, stay within written tolerances of FP32, record how they were made,
and a bad calibration set fails cleanly.

All variants are derived from one session FP32 bundle (tiny random llama, PIP-MM, half budget, pool reducer),
except int4, which goes through export_bundle(precision="int4") end to end. Each graph is fed inputs
recorded while the FP32 bundle answers held-out questions (test-split scenes, never the val-split scenes
that calibrate), and its outputs are compared with the FP32 graph's on the same inputs.

Tolerances are relative: max |q - fp32| / max |fp32| over every recorded call. They are written for the
tiny random checkpoints, whose random weights (std 0.15) amplify rounding about ten times more than a
trained model does; each is about twice the error measured here. The accuracy targets (exact match,
token agreement) are measured on the trained default model by scripts/precision_table.py, not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import sdk
from export.precision import calibration, quantize
from export.tasks import scenes
from export.writer import export_bundle
from export.precision.calibration import CalibrationError

BUNDLE = dict(arch="llama", pipmm=True, budget="half", reducer="pool")
# variant -> graph -> output -> max relative error (measured on this checkpoint, then about x2; "present" = KV)
TOLERANCE = {
    "fp16": {"vision": {"visual_tokens": 0.005, "cls_attention": 0.005}, "embed": {"inputs_embeds": 0.002},
             "decoder": {"logits": 0.01, "hidden": 0.01, "present": 0.01}},        # measured 6e-4 .. 4e-3
    "int8": {"vision": {"visual_tokens": 0.15, "cls_attention": 0.1}, "embed": {"inputs_embeds": 0.01},
             "decoder": {"logits": 0.08, "hidden": 0.08, "present": 0.05}},        # 0.031, 0.043, 0.032
    "int8-static": {"vision": {"visual_tokens": 0.15, "cls_attention": 0.1}, "embed": {"inputs_embeds": 0.01},
                    "decoder": {"logits": 0.6, "hidden": 0.7, "present": 0.4}},    # 0.078, 0.136, 0.079 (8-bit: 0.31..)
    "int4": {"vision": {"visual_tokens": 0.15, "cls_attention": 0.1}, "embed": {"inputs_embeds": 0.01},
             "decoder": {"logits": 0.8, "hidden": 0.8, "present": 0.7}},           # decoder 0.45, 0.47, 0.35
}
# Static int8 (vision of int8/int4, the static decoder) on this random checkpoint, 7-bit weights (reduce_range,
# export/precision/quantize.py): visual tokens 0.059, T-CLS attention 0.048 on an AVX2 EPYC (2026-12-08). With 8-bit
# weights the figures depended on the CPU: 0.07 / ~0.05 until 2026-12-03, then 0.26 / 0.074 with the same code and
# every dependency version tried (the cause was not found then), and 0.22 T-CLS on the AVX2 EPYC: on x86 without
# VNNI ONNX Runtime's int8 GEMM adds pairs of u8 x s8 products in int16, which saturates for 8-bit weights.
# Random weights amplify rounding; on trained weights static int8 vision matches fp32 (m20's stage 0, 600
# test questions: 80.5% with an int8 vision graph, 80.3% fp32; docs/precision.md). Bounds: about 2-3x measured.
# --int8-vision: an fp16 bundle whose vision graph is int8's, each graph within its own precision's bounds
TOLERANCE["fp16-int8vision"] = {"vision": TOLERANCE["int8"]["vision"], "embed": TOLERANCE["fp16"]["embed"],
                                "decoder": TOLERANCE["fp16"]["decoder"]}
# Next-token agreement on the FP32 trajectory: every recorded decoder call (prompt encoder, prefill, decode
# steps of 4 held-out questions), argmax of the variant's logits == argmax of FP32's. Measured 1.0, 1.0, 0.86, 0.61.
AGREEMENT = {"fp16": 1.0, "int8": 0.9, "int8-static": 0.7, "int4": 0.45, "fp16-int8vision": 1.0}  # (fp16's decoder)
# Free-running greedy tokens of the whole pipeline (16 tokens x 4 prompts, position-wise) for fp16: measured 1.0.
# (Not asserted for int8/int4 here: on random weights one early flip changes every later token; measured
# 0.47, 0.36 and 0.08. The trained model's agreement is in docs/precision.md.)
FREE_RUNNING_FP16 = 0.95
PROMPTS = ["what is the color of the star left of the circle?", "how many squares are there?",
           "Describe the image.", "is there a red triangle?"]
CALIBRATION_PAIRS = 4


@pytest.fixture(scope="module")
def fp32(bundles):
    return bundles(**BUNDLE)


@pytest.fixture(scope="module")
def variants(fp32, checkpoints, prompt_mlp, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    out = {
        "fp16": quantize.quantize_bundle(fp32, root / "fp16", "fp16", progress=False),
        "int8": quantize.quantize_bundle(fp32, root / "int8", "int8", calibration_size=CALIBRATION_PAIRS,
                                         progress=False),
        "int8-static": quantize.quantize_bundle(fp32, root / "int8s", "int8", int8_decoder="static",
                                                calibration_size=CALIBRATION_PAIRS, progress=False),
        "fp16-int8vision": quantize.quantize_bundle(fp32, root / "fp16i8v", "fp16", int8_vision=True,
                                                    calibration_size=CALIBRATION_PAIRS, progress=False),
        # end to end: checkpoint -> FP32 in a hidden scratch dir -> int4, scratch removed
        "int4": export_bundle(checkpoints["llama"], root / "int4", prompt_mlp=prompt_mlp, budget="half",
                              reducer="pool", progress=False, precision="int4", calibration_size=CALIBRATION_PAIRS),
    }
    assert sorted(p.name for p in root.iterdir()) == ["fp16", "fp16i8v", "int4", "int8", "int8s"], "scratch left behind"
    return out


@pytest.fixture(scope="module")
def held_out_feeds(fp32, image):
    examples = scenes.iter_examples("test", 3, questions_per_scene=1)
    pairs = [calibration.Pair(ex.image, ex.prompt, "test") for ex in examples]
    pairs.append(calibration.Pair(image, PROMPTS[0], "fixture"))
    return calibration.record_feeds(fp32, pairs, decode_steps=6, progress=False)


def _relative_errors(fp32_session, session, feeds) -> dict[str, float]:
    worst: dict[str, list[float]] = {}
    for feed in feeds:
        got = session.run(None, _as_inputs(session, feed))
        outputs = zip(fp32_session.get_outputs(), fp32_session.run(None, feed), got)
        for meta, ref, got in outputs:
            key = "present" if meta.name.startswith("present.") else meta.name
            err, scale = worst.setdefault(key, [0.0, 0.0])
            worst[key] = [max(err, float(np.abs(ref - got.astype(np.float32)).max())),
                          max(scale, float(np.abs(ref).max()))]
    return {k: err / scale for k, (err, scale) in worst.items()}


def _as_inputs(session, feed: dict) -> dict:
    wanted = {i.name: i.type for i in session.get_inputs()}
    return {k: v.astype(np.float16) if wanted[k] == "tensor(float16)" else v for k, v in feed.items()}


@pytest.mark.parametrize("variant", list(TOLERANCE))
def test_graphs_load_run_and_stay_within_tolerance_of_fp32(variant, variants, fp32, held_out_feeds, image):
    reference = sdk.load(fp32, device="cpu")
    pipeline = sdk.load(variants[variant], device="cpu")  # checks sha256 and every graph's signature
    for graph, limits in TOLERANCE[variant].items():
        errors = _relative_errors(reference.backend.sessions[graph], pipeline.backend.sessions[graph],
                                  held_out_feeds[graph])
        for output, limit in limits.items():
            assert errors[output] <= limit, f"{variant} {graph}.{output}: relative error {errors[output]:.4f} > {limit}"
    # logits leave every variant as float32: sampling and argmax see full-precision scores
    logits = pipeline.manifest.graphs["decoder"].outputs[0].to_dict()
    assert (logits["name"], logits["dtype"]) == ("logits", "float32")

    ours, theirs = pipeline.backend.sessions["decoder"], reference.backend.sessions["decoder"]
    same = [np.array_equal(np.argmax(theirs.run(["logits"], f)[0], -1),
                           np.argmax(ours.run(["logits"], _as_inputs(ours, f))[0], -1))
            for f in held_out_feeds["decoder"]]
    assert np.mean(same) >= AGREEMENT[variant], f"{variant}: next-token agreement {np.mean(same):.2f} of {len(same)}"
    # the whole PIP-MM path: the prompt vector (the decoder's dtype) fed to a vision graph of another precision
    assert len(pipeline.generate(image, PROMPTS[0], max_new_tokens=4).token_ids) >= 1

    if variant == "fp16":
        agree = total = 0
        for prompt in PROMPTS:
            got = pipeline.generate(image, prompt, max_new_tokens=16).token_ids
            want = reference.generate(image, prompt, max_new_tokens=16).token_ids
            agree += sum(x == y for x, y in zip(got, want))
            total += max(len(got), len(want))
        assert agree / total >= FREE_RUNNING_FP16, f"fp16: greedy tokens agree {agree}/{total}"


def test_manifest_records_how_each_graph_was_made(variants):
    expected = {"fp16": ("fp16", "fp16", "fp16"), "int8": ("int8", "int8", "int8"),
                "int8-static": ("int8", "int8", "int8"), "int4": ("int8", "int8", "int4"),
                "fp16-int8vision": ("int8", "fp16", "fp16")}
    for variant, path in variants.items():
        precision = json.loads((path / "manifest.json").read_text())["precision"]
        assert precision["default"] == variant.split("-")[0]
        assert tuple(precision["graphs"][g] for g in ("vision", "embed", "decoder")) == expected[variant]
        for graph, details in precision["details"].items():
            assert details["tool"].startswith(("onnxruntime.", "onnx ")) and details["encoding"] and details["runtimes"]
            assert len(details["from_fp32_sha256"]) == 64
    int4 = json.loads((variants["int4"] / "manifest.json").read_text())["precision"]
    assert int4["details"]["decoder"]["block_size"] == quantize.DEFAULT_BLOCK_SIZE
    assert "MatMulNBits" in int4["details"]["decoder"]["encoding"]
    assert int4["details"]["decoder"]["runtimes"] == ["onnxruntime"] and int4["tensorrt"] is False
    static = json.loads((variants["int8"] / "manifest.json").read_text())["precision"]["details"]["vision"]
    assert static["calibration"]["pairs"] == CALIBRATION_PAIRS and static["calibration"]["feeds"] > 0
    assert {"LayerNormalization", "Softmax", "Add"} <= set(static["kept_float"]["op_types"])
    mixed = json.loads((variants["fp16-int8vision"] / "manifest.json").read_text())["precision"]["details"]
    assert mixed["vision"]["kept_float"]["op_types"] == static["kept_float"]["op_types"]  # int8's list, not fp16's
    assert mixed["decoder"]["kept_float"] == json.loads((variants["fp16"] / "manifest.json").read_text())[
        "precision"]["details"]["decoder"]["kept_float"]
    fp16 = json.loads((variants["fp16"] / "manifest.json").read_text())["precision"]["details"]["decoder"]
    assert fp16["kept_float"]["nodes"] and fp16["float32_outputs"] == ["logits"]  # the lm_head
    decoder16 = onnx.load(str(variants["fp16"] / "decoder.onnx"))
    rotary = [n.name for n in decoder16.graph.node if n.op_type in ("Cos", "Sin")]
    assert rotary and set(rotary) <= set(fp16["kept_float"]["nodes"]), "rotary angles must stay float32"


def test_int8_static_bundle_is_a_tensorrt_bundle(variants):
    """QDQ with zero point 0 and only standard-domain ops in TensorRT 10's parser table: TensorRT can read it."""
    table = json.loads((Path(__file__).parent / "data" / "tensorrt10-onnx-operators.json").read_text())["operators"]
    path = variants["int8-static"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["precision"]["tensorrt"] is True
    for name, spec in manifest["graphs"].items():
        model = onnx.load(str(path / spec["file"]))
        inits = {i.name: i for i in model.graph.initializer}
        assert spec["opset"] <= 20
        for node in model.graph.node:
            assert node.domain in ("", "ai.onnx"), f"{name}: {node.domain}:{node.op_type}"
            assert table.get(node.op_type, {}).get("supported"), f"{name}: {node.op_type}"
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # TensorRT: INT8, INT4, FP8 only
                assert inits[node.input[0]].data_type == onnx.TensorProto.INT8, f"{name}: {node.name}"
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
                zero = onnx.numpy_helper.to_array(inits[node.input[2]])
                assert zero.dtype == np.int8 and not zero.any(), f"{name}: {node.name} zero point must be int8 0"


def test_static_int8_quantizes_weights_not_attention(variants):
    """Every MatMul fed by a DequantizeLinear multiplies by a weight: Q.K^T and P.V (softmax probabilities) stay
    float under the default keep list (onnxruntime's MatMulConstBOnly is ignored in QDQ format; we exclude them)."""
    for graph in ("vision", "decoder"):
        model = onnx.load(str(variants["int8-static"] / f"{graph}.onnx"))
        inits = {i.name for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        quantized = [n for n in matmuls if n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"]
        assert quantized, f"{graph}: nothing quantized"
        for node in quantized:
            assert producer[node.input[1]].input[0] in inits, f"{graph}: {node.name} has a quantized activation as B"
        assert len(quantized) < len(matmuls), f"{graph}: the attention MatMuls were quantized"


def test_static_int8_weight_matmuls_all_run_as_qlinearmatmul_on_the_cpu(variants, tmp_path):
    """Each quantized MatMul has its own Q/DQ pair on its activation (DedicatedQDQPair, export/precision/quantize.py)
    and the runtime keeps ONNX Runtime from merging the pairs (runtimes/onnxruntime.py QDQ_KEEP_PAIRS), so after the
    session's optimisation every one is a QLinearMatMul: with one pair shared by the ViT's q/k/v, those three stayed
    DequantizeLinear + fp32 MatMul on every run. (The static-int8 decoder is TensorRT's; ONNX Runtime runs the
    weight-only one.)"""
    import onnxruntime as ort

    from runtimes.onnxruntime import QDQ_KEEP_PAIRS

    for variant, graph in (("fp16-int8vision", "vision"), ("int8-static", "vision")):
        path = variants[variant] / f"{graph}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        producer = {o: n for n in model.graph.node for o in n.output}
        quantized_out = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        # DQ(activation), DQ(weight) -> MatMul -> Q: a whole quantized unit (kept-float nodes have no Q after them)
        weights = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producer
                   and producer[n.input[1]].op_type == "DequantizeLinear" and n.output[0] in quantized_out]
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{variant}-{graph}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=QDQ_KEEP_PAIRS)
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        fused = sum(n.op_type == "QLinearMatMul" for n in optimized.graph.node)
        assert fused == len(weights) > 0, (variant, graph, fused, len(weights))
        manifest = json.loads((variants[variant] / "manifest.json").read_text())
        assert "QDQ" in manifest["precision"]["details"][graph]["method"]  # what the runtime keys QDQ_KEEP_PAIRS on


def test_quantized_weights_are_smaller(fp32, variants):
    """Initializer bytes against FP32. The tiny checkpoint's float32 lm_head (320 x 64), prompt MLP and norms weigh
    relatively more than in the default model, whose int8 bundle is ~0.3x (docs/precision.md): int8 <= 0.45x here.
    The int4 decoder is held to the issue's own target, <= 0.2x."""
    def weights(bundle, graphs=("vision", "embed", "decoder")):
        return sum(quantize.weight_bytes(bundle / f"{g}.onnx") for g in graphs)

    assert weights(variants["int8"]) <= 0.45 * weights(fp32)
    assert weights(variants["int8"], ["decoder"]) <= 0.45 * weights(fp32, ["decoder"])
    assert weights(variants["int4"], ["decoder"]) <= 0.2 * weights(fp32, ["decoder"])
    assert weights(variants["fp16"]) <= 0.6 * weights(fp32)  # the lm_head stays float32


# ----------------------------------------------------------------------------- calibration sets

def _bad_sets(root: Path) -> dict[str, tuple[Path, str]]:
    root.mkdir()
    (root / "empty").mkdir()
    (root / "empty.json").write_text("[]")
    (root / "broken.json").write_text("[{\"image\": ")
    (root / "bad-image").mkdir()
    (root / "bad-image" / "frame.png").write_bytes(b"not a png at all")
    (root / "no-image.json").write_text(json.dumps([{"image": "nowhere.png", "prompt": "hi"}]))
    return {"missing": (root / "missing", "does not exist"), "empty folder": (root / "empty", "is empty"),
            "empty list": (root / "empty.json", "is empty"), "broken json": (root / "broken.json", "not readable JSON"),
            "unreadable image": (root / "bad-image", "cannot be read"),
            "image not found": (root / "no-image.json", "does not exist")}


def test_bad_calibration_sets_fail_cleanly_and_write_nothing(checkpoints, prompt_mlp, fp32, tmp_path):
    bad = _bad_sets(tmp_path / "sets")
    out_root = tmp_path / "out"
    out_root.mkdir()
    for label, (path, message) in bad.items():
        with pytest.raises(CalibrationError, match=message):
            export_bundle(checkpoints["llama"], out_root / "b", prompt_mlp=prompt_mlp, budget="half", reducer="pool",
                          progress=False, precision="int8", calibration_set=path)
        with pytest.raises(CalibrationError, match=message):
            quantize.quantize_bundle(fp32, out_root / "q", "int4", calibration_set=path, progress=False)
        assert list(out_root.iterdir()) == [], f"{label}: something was left in the output folder"


def test_calibration_error_through_the_cli(checkpoints, prompt_mlp, tmp_path):
    from test_cli import pipmm

    result = pipmm("export", checkpoints["llama"], "--prompt-mlp", prompt_mlp, "--out", tmp_path / "b", "--quiet",
                   "--precision", "int8", "--calibration", tmp_path / "nothing-here")
    assert result.returncode == 1 and result.stderr.startswith("error: calibration set")
    assert result.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_calibration_sets_from_folders_and_json(tmp_path):
    # `pipmm scenes --out DIR` output is a calibration folder as is
    scenes.write_dataset(tmp_path / "scenes", 2, split="val", size=64, progress=False)
    pairs, info = calibration.load_pairs(tmp_path / "scenes", size=5)
    assert len(pairs) == 5 and all(p.prompt and "<image>" not in p.prompt for p in pairs)
    # a folder of images, prompts from prompts.txt in turn
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        pairs[i].image.save(images / f"{i}.jpg")
    (images / "prompts.txt").write_text("what is this?\n\nhow many?\n")
    pairs, info = calibration.load_pairs(images, size=10)
    assert [p.prompt for p in pairs] == ["what is this?", "how many?", "what is this?"] and info["pairs"] == 3
    # a JSON list of {"image", "prompt"}, paths relative to the file
    (tmp_path / "set.json").write_text(json.dumps([{"image": "images/0.jpg", "prompt": "colour?"}]))
    pairs, _ = calibration.load_pairs(tmp_path / "set.json")
    assert pairs[0].prompt == "colour?" and pairs[0].image.size == (64, 64)


def test_precision_options_are_checked_before_any_work(checkpoints, prompt_mlp, fp32, tmp_path):
    for kwargs, message in [(dict(precision="int3"), "unknown precision"),
                            (dict(precision="int4", block_size=24), "power of two"),
                            (dict(precision="int8", int8_decoder="dynamic"), "int8-decoder"),
                            (dict(precision="fp32", block_size=64), "only apply"),
                            (dict(precision="fp32", int8_vision=True), "only apply"),
                            (dict(precision="int8", int8_vision=True), "an fp16 bundle's option"),
                            (dict(precision="fp16", calibration_set=tmp_path), "no static int8")]:
        with pytest.raises(quantize.ExportError, match=message):
            export_bundle(checkpoints["llama"], tmp_path / "b", prompt_mlp=prompt_mlp, progress=False, **kwargs)
    with pytest.raises(quantize.ExportError, match="quantize from fp32"):
        bundle = tmp_path / "copy"
        shutil.copytree(fp32, bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["precision"]["default"] = "int8"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        quantize.quantize_bundle(bundle, tmp_path / "q", "int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_optional_graphs_are_dropped_not_half_converted(fp32, tmp_path):
    """A graph the plan does not know (e.g. decoder_static from pipmm add-graphs) is left out and recorded."""
    from sdk.bundle import sha256_file

    bundle = tmp_path / "with-extra"
    shutil.copytree(fp32, bundle)
    shutil.copyfile(bundle / "embed.onnx", bundle / "extra.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"]["extra"] = {**manifest["graphs"]["embed"], "file": "extra.onnx"}
    manifest["files"]["extra.onnx"] = {"sha256": sha256_file(bundle / "extra.onnx"),
                                       "bytes": (bundle / "extra.onnx").stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = quantize.quantize_bundle(bundle, tmp_path / "fp16", "fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "extra" not in manifest["graphs"] and not (out / "extra.onnx").exists()
    assert "add-graphs" in manifest["precision"]["dropped_graphs"]["extra"]
    sdk.load(out, device="cpu")


def test_fp16_chains_of_kept_ops_stay_float32(tmp_path):
    """RMSNorm's Pow -> ReduceMean, both kept in float32, must not pass through float16 between them: an LLM's
    'massive activations' (|x| ~ 300) square past float16's 65504. The converter alone makes that round trip."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Pow", ["x", "two"], ["x2"]), helper.make_node("ReduceMean", ["x2", "axes"], ["ms"]),
         helper.make_node("Sqrt", ["ms"], ["rms"]), helper.make_node("Div", ["x", "rms"], ["y"])],
        "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    src = tmp_path / "rms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), src)
    info = quantize.to_fp16("decoder", src, tmp_path / "rms16.onnx", {"keep": quantize.KEEP_FP32_DEFAULT["fp16"]})
    assert info["kept_float"]["op_types"]
    import onnxruntime as ort

    x = np.array([[300.0, -2.0, 1.0, 0.5]], np.float32)
    got = ort.InferenceSession(str(tmp_path / "rms16.onnx")).run(None, {"x": x.astype(np.float16)})[0]
    np.testing.assert_allclose(got.astype(np.float32), x / np.sqrt((x ** 2).mean()), rtol=2e-3)


def test_int8_embedding_gathers_rows_and_never_dequantizes_the_table(variants, fp32):
    """int8/int4 bundles look up int8 rows and their scales (T*D work), within half a step of each row's scale."""
    import onnxruntime as ort

    for variant in ("int8", "int4"):
        graph = onnx.load(str(variants[variant] / "embed.onnx"))
        ops = [n.op_type for n in graph.graph.node]
        assert "DequantizeLinear" not in ops and ops.count("Gather") == 2, ops
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
        rows = next(v for k, v in inits.items() if k.endswith(".int8_rows"))
        scales = next(v for k, v in inits.items() if k.endswith(".row_scales"))
        assert rows.dtype == np.int8 and scales.shape == (rows.shape[0], 1)
        table = next(onnx.numpy_helper.to_array(i) for i in onnx.load(str(fp32 / "embed.onnx")).graph.initializer
                     if len(i.dims) == 2)
        ids = np.array([[0, 5, rows.shape[0] - 1, 5]], np.int64)
        got = ort.InferenceSession(str(variants[variant] / "embed.onnx")).run(None, {"input_ids": ids})[0]
        assert np.abs(got - table[ids]).max() <= 0.5 * scales[ids].max() + 1e-7
        manifest = json.loads((variants[variant] / "manifest.json").read_text())["precision"]
        assert manifest["details"]["embed"]["method_name"] == "int8-gather"

