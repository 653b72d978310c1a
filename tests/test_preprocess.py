"""sdk.preprocess against transformers' CLIP image processor (CPU, a few seconds).

transformers 5.x has two CLIP processors: CLIPImageProcessor (torchvision backend) and
CLIPImageProcessorPil (PIL/numpy backend, the algorithm of 4.x's "slow" processor). Without
torchvision, CLIPImageProcessor(...) itself falls back to CLIPImageProcessorPil. We compare with
CLIPImageProcessorPil, the one LLaVA was trained with, to max abs diff <= 1e-5.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from sdk.errors import BundleError, ExportError, ImageError
from sdk.preprocess import DEFAULTS, config_from_processor, load_image, preprocess

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

TOL = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-7b-hf preprocessor_config.json
LLAVA15 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
# Tiny, in the legacy int form of the original LLaVA checkpoints (size=N means shortest edge).
TINY = {"size": 28, "crop_size": 28, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
CONFIGS = {"llava15": LLAVA15, "tiny": TINY}
# Corner cases of the algorithm: zero padding in center crop (crop larger than the resized image
# on one side, odd gaps), fixed height/width resize, no resize, no crop, no normalization.
EXTRA_CONFIGS = {
    "pad": {"size": {"shortest_edge": 21}, "crop_size": {"height": 32, "width": 24}},
    "hw_bilinear": {"size": {"height": 30, "width": 45}, "crop_size": {"height": 29, "width": 44}, "resample": 2},
    "no_resize": {"do_resize": False, "crop_size": {"height": 47, "width": 33}},
    "no_crop": {"size": {"shortest_edge": 28}, "do_center_crop": False, "resample": 1},
    "no_norm": {"size": 28, "crop_size": 28, "do_normalize": False},
    "no_rescale": {"size": 28, "crop_size": 28, "do_rescale": False, "image_mean": 100.0, "image_std": 50.0},
}
SIZES = [(37, 53), (53, 37), (641, 479), (224, 224), (10, 300), (300, 10)]  # (height, width)


def reference(raw: dict, image) -> np.ndarray:
    processor = CLIPImageProcessorPil.from_dict(raw)
    return processor(images=image, return_tensors="np")["pixel_values"]


def assert_matches(raw: dict, ours_input, ref_input=None):
    ours = preprocess(ours_input, config_from_processor(raw))
    ref = reference(raw, ours_input if ref_input is None else ref_input)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref.astype(np.float32)).max())
    assert diff <= TOL, f"max abs diff {diff}"


def rng_for(*key) -> np.random.Generator:
    # A fixed seed per test case (crc32, not hash(): str hashes change between runs).
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_image(mode: str, h: int, w: int, rng: np.random.Generator) -> Image.Image:
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        alpha.flat[:: max(1, alpha.size // 7)] = 0  # some fully transparent pixels
        alpha.flat[1:: max(1, alpha.size // 5)] = 255
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    if mode == "L":
        return Image.fromarray(rgb[:, :, 0])
    if mode == "LA":
        return Image.fromarray(rgb[:, :, :2])
    if mode == "P":
        return Image.fromarray(rgb).quantize(colors=37)
    if mode == "P_transparency":
        image = Image.fromarray(rgb).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "RGB_transparency":
        image = Image.fromarray(rgb // 128 * 255)  # few colours, so the key colour occurs
        image.info["transparency"] = (255, 0, 255)
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 600, (h, w), dtype=np.uint16))  # >255 saturates
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), rng.integers(0, 256, (h, w, 4), dtype=np.uint8).tobytes())
    if mode == "1":
        return Image.fromarray(rgb[:, :, 0] > 127)
    raise ValueError(mode)


# -- numerical equality with transformers ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers(config, mode, size):
    image = make_image(mode, *size, rng_for(config, mode, size))
    assert_matches(CONFIGS[config], image)


@pytest.mark.parametrize("mode", ["LA", "P_transparency", "RGB_transparency", "I;16", "CMYK", "1"])
@pytest.mark.parametrize("config", CONFIGS)
def test_other_modes_match_transformers(config, mode):
    image = make_image(mode, 41, 67, rng_for(config, mode))
    assert_matches(CONFIGS[config], image)


@pytest.mark.parametrize("config", EXTRA_CONFIGS)
@pytest.mark.parametrize("size", [(37, 53), (10, 300), (20, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_corner_configs_match_transformers(config, size, mode):
    image = make_image(mode, *size, rng_for(config, size, mode))
    assert_matches(EXTRA_CONFIGS[config], image)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("channels", [3, 4, 1])
def test_numpy_arrays_match_transformers(config, channels):
    array = rng_for(config, channels).integers(0, 256, (45, 71, channels), dtype=np.uint8)
    assert_matches(CONFIGS[config], array)  # transformers takes the array as is (channels last)


def test_grayscale_2d_array_is_l_image():
    array = rng_for("2d").integers(0, 256, (45, 71), dtype=np.uint8)
    assert_matches(LLAVA15, array, ref_input=Image.fromarray(array))


def test_path_applies_exif_orientation(tmp_path):
    rgb = rng_for("exif").integers(0, 256, (40, 90, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 90)  # upright: width 40, height 90
    assert_matches(TINY, path, ref_input=hf_load_image(str(path)))  # transformers' path loader
    assert_matches(TINY, str(path), ref_input=hf_load_image(str(path)))


def test_rgba_file_is_composited_on_white(tmp_path):
    # Same as the processor given the opened PIL image. (transformers' own loader for a *path*,
    # image_utils.load_image, does convert("RGB") and drops alpha; we always composite.)
    image = make_image("RGBA", 33, 50, rng_for("rgba-file"))
    path = tmp_path / "a.png"
    image.save(path)
    assert_matches(TINY, path, ref_input=Image.open(path))
    transparent = Image.new("RGBA", (5, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(load_image(transparent)) == 255)


def test_preprocess_exact_values():
    # A uniform 255 image: every pixel is (1 - mean) / std exactly in float32.
    out = preprocess(np.full((7, 9, 3), 255, np.uint8), config_from_processor(TINY))
    expected = (np.float32(1.0) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    assert out.shape == (1, 3, 28, 28)
    assert np.array_equal(out[0, :, 5, 5], expected)


# -- config ----------------------------------------------------------------------------------------


def test_config_defaults_are_clip_defaults():
    cfg = config_from_processor({})
    assert cfg == DEFAULTS
    assert set(cfg) == {"do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size",
                        "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"}
    hf = CLIPImageProcessorPil()
    for key in cfg:
        value = getattr(hf, key)
        value = dict(value) if key in ("size", "crop_size") else value
        value = list(value) if key in ("image_mean", "image_std") else value
        assert cfg[key] == value, key


@pytest.mark.parametrize("raw", [LLAVA15, TINY, *EXTRA_CONFIGS.values()])
def test_config_matches_processor_to_dict(raw):
    from_file = config_from_processor(raw)
    from_processor = config_from_processor(CLIPImageProcessorPil.from_dict(raw).to_dict())
    assert from_file == from_processor
    assert config_from_processor(from_file) == from_file  # idempotent


def test_config_forms():
    cfg = config_from_processor({"size": [30, 40], "crop_size": (20, 10), "resample": "bilinear",
                                 "image_mean": 0.5, "image_std": None})
    assert cfg["size"] == {"height": 30, "width": 40} and cfg["crop_size"] == {"height": 20, "width": 10}
    assert cfg["resample"] == 2 and cfg["image_mean"] == [0.5] * 3 and cfg["image_std"] == CLIP_STD
    assert config_from_processor(LLAVA15)["size"] == {"shortest_edge": 336}
    assert config_from_processor({"use_square_size": True, "size": 100})["size"] == {"height": 224, "width": 224}


@pytest.mark.parametrize("raw", [
    {"size": {"longest_edge": 30}}, {"size": {"shortest_edge": 0}}, {"crop_size": {"shortest_edge": 30}},
    {"resample": 9}, {"resample": "cubic-ish"}, {"image_mean": [0.5, 0.5]}, "not a dict",
])
def test_bad_config(raw):
    with pytest.raises(ExportError) as info:
        config_from_processor(raw)
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError):
        preprocess(np.zeros((4, 4, 3), np.uint8), raw)


# -- errors ----------------------------------------------------------------------------------------


def _error(image) -> str:
    with pytest.raises(ImageError) as info:
        preprocess(image, config_from_processor(TINY))
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_file_errors(tmp_path):
    assert "not found" in _error(tmp_path / "missing.png")
    assert "not found" in _error(str(tmp_path / "missing.png"))
    assert "directory" in _error(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    assert "cannot read" in _error(tmp_path / "notes.txt")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "cannot read" in _error(tmp_path / "empty.png")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    assert "cannot read" in _error(truncated)


@pytest.mark.parametrize("array, words", [
    (np.zeros((8, 8, 3), np.float32), "dtype"),
    (np.zeros((8, 8, 3), np.int64), "dtype"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((3, 8, 9), np.uint8), "shape"),   # channels first
    (np.zeros((8, 8, 2), np.uint8), "shape"),
    (np.zeros((1, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((8,), np.uint8), "shape"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
])
def test_array_errors(array, words):
    assert words in _error(array)


@pytest.mark.parametrize("thing", [None, [[0, 1]], b"\x89PNG", 3.0])
def test_type_errors(thing):
    assert "unsupported image type" in _error(thing)


def test_unconvertible_pil_mode():
    assert "mode" in _error(Image.new("La", (4, 4)))


def test_module_imports_neither_torch_nor_transformers():
    code = ("import sys, sdk.preprocess; bad = {'torch', 'transformers'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("size", [(45, 61), (97, 13), (30, 30)])
def test_llava_pad_to_square_matches_transformers(size):
    """LlavaImageProcessor with do_pad: the frame padded to a square in the mean colour before resize and crop."""
    from transformers import LlavaImageProcessorPil

    raw = {**LLAVA15, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    expected = LlavaImageProcessorPil.from_dict(raw)(image, return_tensors="np")["pixel_values"]
    config = config_from_processor(raw)
    assert config["do_pad"] is True
    got = preprocess(image, config)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5
    assert "do_pad" not in config_from_processor({**raw, "do_pad": False})  # manifests without it read as before



@pytest.mark.parametrize("config", ["llava15", "no_norm", "no_rescale"])
def test_level_table_is_bitwise_the_float_steps(config):
    # preprocess() gathers each channel from a 256-entry table (sdk.preprocess.pixel_values): the same float32s,
    # bit for bit, as rescale-then-normalise on the whole image (the steps the table is computed with)
    from sdk.preprocess import normalized, pixel_values, rescaled

    cfg = config_from_processor({**CONFIGS, **EXTRA_CONFIGS}[config])
    pixels = rng_for("table", config).integers(0, 256, (31, 45, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    got = pixel_values(pixels[:, 2:40], cfg)  # a cropped view, as after center crop
    expected = normalized(rescaled(pixels[:, 2:40], cfg), cfg)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, expected)
