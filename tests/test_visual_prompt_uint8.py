"""TVP prompts on uint8-pixel bundles (sdk/visual_prompt.py, export/pixel_input.py): the frame reaches the graph
rounded to uint8 levels. The graph's normalised input equals the float path's within 1e-6 inside the frame and
half a level on it; with the frame on whole levels the two bundles' vision outputs agree to the parity
tolerance; with any frame they give the same greedy tokens; attach/detach/show work on uint8 bundles; frames
without a uint8 form are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from export.pixel_input import affine  # noqa: E402
from sdk.bundle import load_bundle  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.preprocess import UINT8_NHWC, resized_pixels  # noqa: E402
from sdk.visual_prompt import PROMPT_WEIGHTS, VisualPrompt, VisualPromptError, attach  # noqa: E402

from export.tvp.train import save_prompt  # noqa: E402
from export.tvp.transform import frame_mask  # noqa: E402
# converted: the fixture (float bundle, its uint8 copy); the tolerances: inside the frame the graph front's float32
# rounding (1e-6), the vision outputs tests/test_parity.py's (1e-4)
from tests.test_pixel_input import PIXEL_ATOL, PROMPT, VISION_ATOL, converted  # noqa: E402,F401
from tests.test_visual_prompt import one_line_error, overlay_delta, random_delta, write_prompt  # noqa: E402


def frame_atol(cfg: dict) -> float:
    """On the frame: half a uint8 level after normalising, 0.5 * factor / std, at the smallest std."""
    return 0.5 * cfg["rescale_factor"] / min(cfg["image_std"]) + PIXEL_ATOL


def graph_view(pixels: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 [1, S, S, 3] -> what the uint8 graph's front hands the tower, float32 [1, 3, S, S]."""
    scale, shift = affine(cfg)
    return (pixels.astype(np.float32) * scale + shift).transpose(0, 3, 1, 2)


def test_the_framed_uint8_input_is_the_float_input_within_half_a_level(converted, image):
    source, out = converted
    floating, uint8 = sdk.load(source, device="cpu"), sdk.load(out, device="cpu")
    prompt = VisualPrompt(random_delta(28, 4, seed=2).numpy(), 4, 28)
    got, want = uint8.pixel_values(image, prompt), floating.pixel_values(image, prompt)
    assert got.dtype == np.uint8 and got.shape == (1, 28, 28, 3) and want.shape == (1, 3, 28, 28)
    diff = np.abs(graph_view(got, uint8.preprocessing) - want)
    np.testing.assert_array_less(diff[..., 4:24, 4:24], PIXEL_ATOL)  # the image itself: exact up to float32
    assert diff.max() <= frame_atol(uint8.preprocessing) and diff.max() > 10 * PIXEL_ATOL  # the frame: rounded
    np.testing.assert_array_equal(got[0, 4:24, 4:24], resized_pixels(image, prompt.inner_config(uint8.preprocessing)))
    np.testing.assert_array_equal(got[0, :4], prompt.frame_levels(uint8.preprocessing)[:4])  # the frame's levels


def test_an_overlay_band_reaches_uint8_bundles_within_half_a_level_whatever_its_range(converted, image):
    source, out = converted
    floating, uint8 = sdk.load(source, device="cpu"), sdk.load(out, device="cpu")
    for scale in (1, 3):  # 3: a --no-clamp overlay, far outside [-1, 1]; the band is clipped on both paths
        prompt = VisualPrompt(overlay_delta(28, 4, seed=6).numpy() * scale, 4, 28, geometry="overlay")
        got, want = uint8.pixel_values(image, prompt), floating.pixel_values(image, prompt)
        diff = np.abs(graph_view(got, uint8.preprocessing) - want)
        np.testing.assert_array_less(diff[..., 4:24, 4:24], PIXEL_ATOL)
        assert diff.max() <= frame_atol(uint8.preprocessing)
        np.testing.assert_array_equal(got[0, 4:24, 4:24], uint8.pixel_values(image, False)[0, 4:24, 4:24])
        assert (got[0, :4] == 0).any() and (got[0, :4] == 255).any()  # clipped at both ends


def test_on_whole_levels_the_uint8_bundle_sees_and_answers_as_the_float_one(converted, image):
    source, out = converted
    floating, uint8 = sdk.load(source, device="cpu"), sdk.load(out, device="cpu")
    rough = VisualPrompt(random_delta(28, 4, seed=5).numpy(), 4, 28)
    levels = rough.frame_levels(uint8.preprocessing).transpose(2, 0, 1).astype(np.float32)
    exact = VisualPrompt(levels * np.float32(uint8.preprocessing["rescale_factor"]), 4, 28)  # on the uint8 grid
    vector = floating.encode_prompt(PROMPT)
    for prompt, atol in ((exact, VISION_ATOL), (rough, None)):
        got = uint8.backend.vision(uint8.pixel_values(image, prompt), vector)
        want = floating.backend.vision(floating.pixel_values(image, prompt), vector)
        if atol is not None:  # same pixels up to float32 rounding: the parity tolerance holds
            np.testing.assert_allclose(got.visual_tokens, want.visual_tokens, atol=atol, rtol=0)
            np.testing.assert_allclose(got.cls_attention, want.cls_attention, atol=atol, rtol=0)
            np.testing.assert_array_equal(got.kept_patches, want.kept_patches)
        unframed = floating.backend.vision(floating.pixel_values(image, False), vector)
        assert not np.allclose(got.visual_tokens, unframed.visual_tokens)  # the frame is seen
        for seed in range(3):  # a few images: the same greedy tokens with the rounded frame too
            picture = np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8) if seed else image
            assert uint8.generate(picture, PROMPT, max_new_tokens=8, visual_prompt=prompt).token_ids == \
                floating.generate(picture, PROMPT, max_new_tokens=8, visual_prompt=prompt).token_ids


def test_attach_detach_and_show_on_a_uint8_bundle(converted, image, tmp_path, capsys):
    source, out = converted
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    prompt_dir = write_prompt(tmp_path / "p")
    assert main(["prompt", "attach", str(bundle), str(prompt_dir)]) == 0
    attached, loose = sdk.load(bundle, device="cpu"), sdk.load(out, device="cpu", visual_prompt=prompt_dir)
    assert attached.preprocessing["pixel_input"] == UINT8_NHWC and attached.visual_prompt is not None
    np.testing.assert_array_equal(attached.pixel_values(image), loose.pixel_values(image))
    np.testing.assert_array_equal(attached.pixel_values(image, visual_prompt=False),
                                  sdk.load(out, device="cpu").pixel_values(image))
    assert attached.describe(image, PROMPT, max_new_tokens=4) == \
        sdk.load(source, device="cpu", visual_prompt=prompt_dir).describe(image, PROMPT, max_new_tokens=4)
    capsys.readouterr()
    assert main(["prompt", "show", str(bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["frame"] == 4
    assert main(["prompt", "detach", str(bundle)]) == 0
    assert load_bundle(bundle).manifest.files == load_bundle(out).manifest.files

    framed = attach(source, prompt_dir, tmp_path / "framed")  # a float bundle with a prompt, then converted
    assert main(["add-graphs", str(framed), "--pixel-input", "uint8"]) == 0
    np.testing.assert_array_equal(sdk.load(framed, device="cpu").pixel_values(image), loose.pixel_values(image))


def test_a_frame_outside_the_pixel_range_is_refused_on_uint8_bundles_only(converted, image, tmp_path, capsys):
    source, out = converted
    wide = tmp_path / "wide"  # a --no-clamp prompt: frame values below 0 and above 1
    wide.mkdir()
    save_prompt(wide, (random_delta(28, 4) * 3 - 1) * frame_mask(28, 4), {"frame": 4, "image_size": 28, "inner_size": 20}, {})
    assert sdk.load(source, device="cpu", visual_prompt=wide).pixel_values(image).dtype == np.float32  # float: fine
    err = one_line_error(["prompt", "attach", out, wide, "--out", tmp_path / "x"], capsys)
    assert "outside the pixel range" in err and not (tmp_path / "x").exists()
    with pytest.raises(VisualPromptError, match="outside the pixel range"):
        sdk.load(out, device="cpu").generate(image, PROMPT, visual_prompt=wide)
    framed = attach(source, wide, tmp_path / "framed")
    before = (framed / "manifest.json").read_text()
    err = one_line_error(["add-graphs", framed, "--pixel-input", "uint8"], capsys)
    assert "outside the pixel range" in err and (framed / "manifest.json").read_text() == before
    assert (framed / PROMPT_WEIGHTS).is_file()
