"""uint8 pixels into the vision graph (export/pixel_input.py, sdk.preprocess.pixel_input): the graph's folded
rescale + normalise equals the host's float path within 1e-6, a converted bundle gives the float bundle's
visual tokens within the parity tolerance and the same greedy tokens; older bundles keep float input."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import sdk
from export.pixel_input import uint8_front
from sdk.errors import BackendError, BundleError, ExportError
from sdk.preprocess import UINT8_NHWC, clip_processor_config, config_from_processor, pixel_input, preprocess, \
    siglip_processor_config

PIXEL_ATOL = 1e-6  # folded x * (factor / std) - mean / std against float32(float64(x) * factor), (x - mean) / std
VISION_ATOL = 1e-4  # tests/test_parity.py's vision tolerance: the ViT amplifies the pixels' last-ulp differences
PROMPT = "what is the color of the star left of the circle?"


def _front_alone(cfg: dict, size: int, dtype=TensorProto.FLOAT) -> onnxruntime.InferenceSession:
    """uint8_front on a graph that returns its float input unchanged: the front's own output."""
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["out"])], "front",
                              [helper.make_tensor_value_info("pixel_values", dtype, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("out", dtype, ["batch", 3, size, size])])
    model = uint8_front(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), cfg)
    onnx.checker.check_model(model)
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("raw", [clip_processor_config(32), siglip_processor_config(32),
                                 {**clip_processor_config(32), "do_normalize": False}])
def test_the_graph_front_equals_the_float_path(raw, image):
    cfg = config_from_processor(raw)
    want = preprocess(image, cfg)
    got = _front_alone(cfg, 32).run(None, {"pixel_values": pixel_input(image, {**cfg, "pixel_input": UINT8_NHWC})})[0]
    assert got.shape == want.shape == (1, 3, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=PIXEL_ATOL, rtol=0)
    assert np.abs(got - want).max() > 0 or not cfg["do_normalize"]  # rounding differs; the written tolerance covers it
    half = _front_alone(cfg, 32, TensorProto.FLOAT16).run(None, {"pixel_values": pixel_input(
        image, {**cfg, "pixel_input": UINT8_NHWC})})[0]
    assert half.dtype == np.float16  # normalised in float32, then cast, as the host path's cast of float32 pixels
    np.testing.assert_array_equal(half, want.astype(np.float16))


@pytest.fixture(scope="module")
def converted(bundles, tmp_path_factory):
    """(float bundle, its uint8 copy) of the PIP-MM half prompt-topk session bundle, converted through the CLI."""
    from sdk.cli import main

    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    out = tmp_path_factory.mktemp("pixels") / "bundle"
    shutil.copytree(source, out)
    assert main(["add-graphs", str(out), "--pixel-input", "uint8"]) == 0
    return source, out


def test_a_converted_bundle_sees_and_answers_as_the_float_one(converted, image):
    source, out = converted
    floating, uint8 = sdk.load(source, device="cpu"), sdk.load(out, device="cpu")
    spec, side = uint8.manifest.graphs["vision"].inputs[0], uint8.preprocessing["crop_size"]["height"]
    assert (spec.name, spec.dtype, spec.shape[1:]) == ("pixel_values", "uint8", [side, side, 3])
    assert uint8.preprocessing["pixel_input"] == UINT8_NHWC and "pixel_input" not in floating.preprocessing
    pixels = pixel_input(image, uint8.preprocessing)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, side, side, 3)
    assert pixel_input(image, floating.preprocessing).dtype == np.float32  # older bundles: float, as before
    vector = floating.encode_prompt(PROMPT)
    got, want = uint8.backend.vision(pixels, vector), floating.backend.vision(preprocess(image, floating.preprocessing),
                                                                              vector)
    np.testing.assert_allclose(got.visual_tokens, want.visual_tokens, atol=VISION_ATOL, rtol=0)
    np.testing.assert_allclose(got.cls_attention, want.cls_attention, atol=VISION_ATOL, rtol=0)
    np.testing.assert_array_equal(got.kept_patches, want.kept_patches)
    assert uint8.generate(image, PROMPT, max_new_tokens=12).token_ids == \
        floating.generate(image, PROMPT, max_new_tokens=12).token_ids
    assert uint8.conversation(image).ask(PROMPT, max_new_tokens=4).token_ids  # the conversation path too


def test_pixels_are_never_cast_across_and_conversion_is_refused_twice(converted, image):
    source, out = converted
    floating, uint8 = sdk.load(source, device="cpu"), sdk.load(out, device="cpu")
    with pytest.raises(BackendError, match="takes uint8 pixels, not float32"):
        uint8.backend.vision(preprocess(image, floating.preprocessing), None)
    with pytest.raises(BackendError, match="takes float32 pixels, not uint8"):
        floating.backend.vision(pixel_input(image, uint8.preprocessing), None)
    from export.pixel_input import convert_bundle

    with pytest.raises(ExportError, match="uint8 pixels already"):
        convert_bundle(out)
    with pytest.raises(BundleError, match="pixel_input must be one of"):
        pixel_input(image, {**uint8.preprocessing, "pixel_input": "uint16-nhwc"})
