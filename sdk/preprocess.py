"""CLIP image preprocessing in numpy + PIL, identical to transformers' CLIPImageProcessor.

The exported vision graph was trained on pixels produced by transformers' PIL-based CLIP
processor (`CLIPImageProcessorPil` in transformers 5.x: `image_processing_backends.PilBackend`
and `image_transforms`; the old "slow" CLIPImageProcessor of 4.x is the same algorithm). This
module reproduces it bit for bit on the device, where neither torch nor transformers exists:

    RGB conversion (alpha composited onto white)      -> uint8 HxWx3
    resize with PIL on the *uint8* image              (shortest edge: the long edge is truncated)
    center crop (zero padding where the image is smaller than the crop)
    rescale: float64 * factor, then cast to float32
    normalize: (x - mean) / std in float32            -> float32 [1, 3, H, W]

A bundle whose preprocessing says pixel_input "uint8-nhwc" takes the uint8 crop itself, [1, H, W, 3]
(pixel_input()): its vision graph rescales and normalises in one folded x * (factor / std) - mean / std
(export/pixel_input.py; within 1e-6 of the float path, tests/test_pixel_input.py), so the host does no float work.

Never import torch or transformers here.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import BundleError, ExportError, ImageError

# CLIPImageProcessor's class defaults (transformers/models/clip/image_processing_pil_clip.py).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_processor_config(image_size: int = 224) -> dict:
    """CLIPImageProcessor's settings for square `image_size` inputs, as a llava-1.5 checkpoint's
    preprocessor_config.json holds them (its class defaults at 224)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def siglip_processor_config(image_size: int = 224) -> dict:
    """SiglipImageProcessor's settings (its class defaults, transformers/models/siglip/image_processing_pil_siglip.py):
    resize to a square without crop, rescale, mean and std 0.5 (llava-interleave-qwen's preprocessor_config.json)."""
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3, "do_center_crop": False,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


DEFAULTS = {k: v for k, v in clip_processor_config().items() if k != "image_processor_type"}
# A processor config's missing keys take its class's defaults: per image_processor_type, without the backend
# suffix ("Fast", "Pil"). Unknown types read as CLIP's.
PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": DEFAULTS,
    "SiglipImageProcessor": {k: v for k, v in siglip_processor_config().items() if k != "image_processor_type"},
    # LlavaImageProcessor: CLIP's, plus do_pad (pad to a square of the longer edge in the mean colour, before the
    # resize; transformers/models/llava/image_processing_pil_llava.py), off by default as there
    "LlavaImageProcessor": {**DEFAULTS, "do_pad": False},
}
# The vision graph's input: "float32-nchw" (preprocess(), every bundle before it) or "uint8-nhwc" (resized and
# cropped uint8 pixels; rescale and normalise are the graph's first nodes, export/pixel_input.py)
UINT8_NHWC = "uint8-nhwc"
PIXEL_INPUTS = ("float32-nchw", UINT8_NHWC)
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

# Images above this many pixels are refused before decoding (decompression bombs, absurd frames).
# Set sdk.preprocess.MAX_IMAGE_PIXELS, the environment variable PIPMM_MAX_IMAGE_PIXELS, or pass
# max_pixels=. PIL has its own limit (PIL.Image.MAX_IMAGE_PIXELS, about 89 MP; its error above
# twice that, its warning above it, both become ImageError here): raise both to go beyond it.
MAX_IMAGE_PIXELS = int(os.environ.get("PIPMM_MAX_IMAGE_PIXELS", 50_000_000))
# A resize larger than this (e.g. a 1 x 2,000,000 strip whose short edge is scaled up to the
# model's size) computes only the window the center crop keeps (see _resize_and_crop).
RESIZE_WINDOW_PIXELS = 16_000_000
# warnings.catch_warnings swaps process-wide state: one thread at a time in our header check.
_WARNINGS_LOCK = threading.Lock()


# -- configuration ---------------------------------------------------------------------------------


def config_from_processor(d: dict) -> dict:
    """A CLIPImageProcessor or SiglipImageProcessor config (preprocessor_config.json or processor.to_dict()) ->
    our manifest's "image_preprocessing" dict, every key explicit. Idempotent."""
    kind = str(d.get("image_processor_type", "")) if isinstance(d, dict) else ""
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    return normalize_config(d, ExportError, PROCESSOR_DEFAULTS.get(kind, DEFAULTS))


def normalize_config(d: dict, error, defaults: dict = DEFAULTS) -> dict:
    """An image_preprocessing dict with every key explicit, or `error` (the type raised) naming the bad key."""
    if not isinstance(d, dict):
        raise error(f"image preprocessing config must be a dict, got {type(d).__name__}")
    # transformers treats a key set to None like a missing key: the class default applies.
    cfg = {key: (d[key] if d.get(key) is not None else default) for key, default in defaults.items()}
    if d.get("use_square_size"):
        # Kosmos-2 compatibility in CLIPImageProcessor.__init__: a square of the *class default*
        # shortest edge (224), whatever "size" says.
        cfg["size"] = {"height": 224, "width": 224}

    if d.get("do_pad"):  # kept only where asked: manifests without it read as before
        cfg["do_pad"] = True
    if d.get("pixel_input") is not None:  # likewise: the vision graph's own pixel format (pixel_input())
        if d["pixel_input"] not in PIXEL_INPUTS:
            raise error(f"pixel_input must be one of {', '.join(PIXEL_INPUTS)}, got {d['pixel_input']!r}")
        cfg["pixel_input"] = d["pixel_input"]
    for key in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        cfg[key] = bool(cfg[key])
    if "do_pad" in cfg and not cfg["do_pad"]:
        del cfg["do_pad"]
    # CLIP has default_to_square=False: an int size is the shortest edge; a crop int is a square.
    cfg["size"] = _size_dict(cfg["size"], "size", square_int=False, error=error)
    cfg["crop_size"] = _size_dict(cfg["crop_size"], "crop_size", square_int=True, error=error)
    if set(cfg["crop_size"]) != {"height", "width"}:
        raise error(f"crop_size must have 'height' and 'width', got {cfg['crop_size']}")
    cfg["resample"] = _resample(cfg["resample"], error)
    cfg["rescale_factor"] = float(cfg["rescale_factor"])
    for key in ("image_mean", "image_std"):
        value = cfg[key]
        value = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(value) != 3:
            raise error(f"{key} must have 3 values (one per RGB channel), got {value}")
        cfg[key] = [float(v) for v in value]
    return cfg


def _size_dict(value, name: str, square_int: bool, error) -> dict:
    """transformers' get_size_dict, restricted to the two forms we support."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square_int else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}  # (height, width) order
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
        if set(value) in ({"shortest_edge"}, {"height", "width"}):
            if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
                return dict(value)
    raise error(f"{name} must be {{'shortest_edge': N}} or {{'height': H, 'width': W}} (positive ints), got {value}")


def _resample(value, error) -> int:
    if isinstance(value, str) and value.lower() in _RESAMPLE_NAMES:
        return _RESAMPLE_NAMES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5:
        return int(value)  # also PIL.Image.Resampling / transformers' PILImageResampling members
    raise error(f"resample must be a PIL resampling filter 0-5 (3 = bicubic), got {value!r}")


# -- loading ---------------------------------------------------------------------------------------


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """A path (str / Path), a PIL image, or a uint8 array (HxW, HxWx1, HxWx3, HxWx4) -> PIL RGB.

    Paths: EXIF orientation applied, first frame of an animation, refused before decoding when
    the header declares more than `max_pixels` (default MAX_IMAGE_PIXELS)."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(image, (str, Path)):
        return _convert_rgb(_open(Path(image), limit))
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, limit, "the PIL image")  # before load(): may still be lazy
        try:
            image.load()  # lazily opened images fail here if the file is truncated or broken
        except Exception as err:
            raise ImageError(f"the PIL image could not be decoded ({_short(err)}); pass a valid image") from None
        return _convert_rgb(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, limit)
    raise ImageError(f"unsupported image type {type(image).__name__}; pass a file path, a PIL image "
                     "or an HxWx3 uint8 numpy array")


def _check_pixels(width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise ImageError(f"{what} is {width}x{height} = {width * height / 1e6:.1f} MP, above the limit of "
                         f"{limit / 1e6:g} MP (a decompression bomb?); downscale it, or raise "
                         "sdk.preprocess.MAX_IMAGE_PIXELS / PIPMM_MAX_IMAGE_PIXELS if you trust it")


def _open_header(path) -> Image.Image:
    """Image.open reads the header only. PIL's own bomb check raises DecompressionBombError above
    2x PIL.Image.MAX_IMAGE_PIXELS and only *warns* above 1x: make the warning an error too."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _open_regular(path: Path):
    """A binary file object of `path`, refusing anything but a regular file *before* reading from it: a FIFO with
    no writer would block Image.open forever (while the caller holds the Pipeline), a device would never end.
    O_NONBLOCK makes opening a FIFO return at once; fstat then looks at what was opened, so a file swapped
    for a FIFO after a check by name is refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ImageError(f"cannot open {path} ({err.strerror}); check the path and its permissions") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise ImageError(f"{path} is {kind}; pass an image file")
    return os.fdopen(fd, "rb")


def _open(path: Path, limit: int) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image file not found: {path}; check the path")
    with _open_regular(path) as file:
        return _open_file(file, path, limit)


def _open_file(file, path: Path, limit: int) -> Image.Image:
    try:
        opened = _open_header(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path} is refused before decoding: {_short(err)}; downscale it, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS and sdk.preprocess.MAX_IMAGE_PIXELS if you trust it") from None
    except Exception as err:  # UnidentifiedImageError, empty file, unreadable header, ...
        raise ImageError(f"cannot read {path} as an image ({_short(err)}); pass a JPEG, PNG or other "
                         "image file that PIL can open") from None
    with opened:
        _check_pixels(opened.width, opened.height, limit, str(path))  # from the header: nothing decoded yet
        return _decode(opened, path)


def _decode(opened: Image.Image, path: Path) -> Image.Image:
    try:
        opened.load()  # decode now (the first frame of an animation), inside the try
    except Exception as err:  # truncated or corrupt data, ...
        raise ImageError(f"cannot read {path} as an image ({_short(err)}); pass a JPEG, PNG or other "
                         "image file that PIL can open") from None
    try:
        # Apply the EXIF orientation, as transformers.image_utils.load_image does for paths.
        # (exif_transpose returns a copy, so the caller may close the file.)
        return ImageOps.exif_transpose(opened)
    except Exception:  # a damaged EXIF block: the pixels are fine, keep them as stored
        return opened.copy()


def _convert_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL images: anything with an alpha band
    or a transparency entry (RGBA, LA, PA, P/L/RGB with tRNS) is composited onto white; every
    other mode (L, P, 1, I;16, I, F, CMYK, YCbCr...) goes through PIL's convert("RGB")."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"the image is empty ({image.width}x{image.height}); pass a non-empty image")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:
        raise ImageError(f"cannot convert a PIL image of mode {image.mode} to RGB ({_short(err)}); "
                         "pass an RGB, RGBA, L or P image") from None


def _from_array(array: np.ndarray, limit: int) -> Image.Image:
    """The numpy path of transformers' convert_to_rgb, channels last."""
    # Cheapest first: shape and the pixel limit read no element, so a huge (e.g. broadcast) array costs nothing.
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"image array has shape {array.shape}; pass HxWx3 (channels last), HxWx4 or HxW")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array is empty (shape {array.shape}); pass a non-empty image")
    _check_pixels(array.shape[1], array.shape[0], limit, "the image array")
    if array.dtype != np.uint8:
        # min() propagates NaN in one pass without a temporary array as large as the image.
        if np.issubdtype(array.dtype, np.floating) and np.isnan(array.min()):
            raise ImageError("the image array contains NaN; pass a uint8 array with values 0-255")
        raise ImageError(f"image array has dtype {array.dtype}; pass uint8 values 0-255 "
                         "(e.g. (x * 255).round().astype(np.uint8) for floats in 0-1)")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        # Composite onto white in float64 and round, exactly as transformers does for arrays
        # (PIL's alpha_composite rounds differently, so don't go through a PIL RGBA image).
        alpha = array[:, :, 3:4] / 255
        array = np.round(alpha * array[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))  # HxWx3 uint8 -> mode RGB


def _short(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]


# -- preprocessing ---------------------------------------------------------------------------------


def preprocess(image, config: dict, max_pixels: int | None = None) -> np.ndarray:
    """Any image load_image accepts -> float32 pixel_values [1, 3, H, W]."""
    cfg = normalize_config(config, BadPreprocessing)
    return pixel_values(resized_pixels(image, cfg, max_pixels), cfg)


def pixel_values(pixels: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 H x W x 3 -> float32 pixel_values [1, 3, H, W], bit for bit normalized(rescaled(pixels)): a uint8 has
    256 values, so each channel's result is a table of 256 float32s computed by those very steps, and one gather
    per channel writes the channels-first output (no float64 image, no temporaries, no transpose copy)."""
    table = _level_table(cfg["do_rescale"], cfg["rescale_factor"], cfg["do_normalize"], tuple(cfg["image_mean"]),
                         tuple(cfg["image_std"]))
    out = np.empty((1, 3) + pixels.shape[:2], np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[0, c], mode="clip")  # uint8 indices: never clipped
    return out


@functools.lru_cache(maxsize=16)
def _level_table(do_rescale: bool, factor: float, do_normalize: bool, mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: rescaled then normalized for every uint8 level, per channel."""
    cfg = {"do_rescale": do_rescale, "rescale_factor": factor, "do_normalize": do_normalize,
           "image_mean": list(mean), "image_std": list(std)}
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # 256 x 1 x 3
    return np.ascontiguousarray(normalized(rescaled(levels, cfg), cfg)[0, :, :, 0])


def pixel_input(image, config: dict, max_pixels: int | None = None) -> np.ndarray:
    """What the bundle's vision graph takes: uint8 [1, H, W, 3] after resize and crop where its preprocessing says
    pixel_input "uint8-nhwc" (the graph rescales and normalises, export/pixel_input.py), else preprocess()'s
    float32 [1, 3, H, W]."""
    cfg = normalize_config(config, BadPreprocessing)
    if cfg.get("pixel_input") == UINT8_NHWC:
        return np.ascontiguousarray(resized_pixels(image, cfg, max_pixels)[None])
    return preprocess(image, cfg, max_pixels)


def resized_pixels(image, config: dict, max_pixels: int | None = None) -> np.ndarray:
    """preprocess up to its float steps: RGB, pad to a square (do_pad), resize, center crop -> uint8 H x W x 3.
    (A visual prompt, sdk/visual_prompt.py, runs this at its inner size and puts its frame around the result.)"""
    cfg = normalize_config(config, BadPreprocessing)
    # Always RGB: the vision graph takes 3 channels. (With do_convert_rgb=False transformers keeps
    # the PIL mode, which only differs for non-RGB images, and then its 3-value normalize fails.)
    img = load_image(image, max_pixels)
    if cfg.get("do_pad") and img.width != img.height:
        img = _pad_to_square(img, cfg["image_mean"])

    crop = (cfg["crop_size"]["height"], cfg["crop_size"]["width"]) if cfg["do_center_crop"] else None
    if cfg["do_resize"]:
        height, width = _resize_size(img.height, img.width, cfg["size"])
        if height * width > RESIZE_WINDOW_PIXELS:
            pixels = _resize_and_crop(img, height, width, cfg["resample"], crop)
        else:
            # transformers resizes the uint8 image with PIL (to_pil_image; no rescale for uint8).
            pixels = np.asarray(img.resize((width, height), resample=cfg["resample"]), dtype=np.uint8)
    else:
        pixels = np.asarray(img, dtype=np.uint8)  # H x W x 3

    if crop is not None:
        pixels = _center_crop(pixels, *crop)
    return pixels


def rescaled(pixels: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 H x W x 3 -> float32 H x W x 3: float64 * rescale_factor, then cast (transformers' dtypes, so the
    float32 results match)."""
    if cfg["do_rescale"]:
        return (pixels.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    return pixels.astype(np.float32)


def normalized(out: np.ndarray, cfg: dict) -> np.ndarray:
    """float32 H x W x 3 -> (x - mean) / std in float32 -> pixel_values [1, 3, H, W]."""
    if cfg["do_normalize"]:
        mean = np.asarray(cfg["image_mean"], dtype=np.float32)
        std = np.asarray(cfg["image_std"], dtype=np.float32)
        out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None], dtype=np.float32)


def transform_plane(plane: np.ndarray, config: dict) -> np.ndarray:
    """A float HxW plane over the input image (a referring region, sdk/regions.py) through preprocess's own
    resize and center crop -> float32 [crop_h, crop_w], zero where the crop pads. Bilinear: weights, not colours."""
    cfg = normalize_config(config, BadPreprocessing)
    out = np.asarray(plane, dtype=np.float32)
    if cfg["do_resize"]:
        height, width = _resize_size(*out.shape, cfg["size"])
        out = np.asarray(Image.fromarray(out).resize((width, height), resample=Image.BILINEAR), np.float32)
    if cfg["do_center_crop"]:
        out = _center_crop(out, cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    return out


class BadPreprocessing(BundleError):
    """An image_preprocessing dict in a bundle manifest that we cannot use."""

    def __init__(self, message: str):
        super().__init__(f"bundle manifest image_preprocessing: {message}; re-export the bundle")


def _pad_to_square(img: Image.Image, mean: list[float]) -> Image.Image:
    """LlavaImageProcessor's pad_to_square: the image centred on a square of its longer edge, filled with the
    mean colour as uint8 (int(m * 255) per channel; the shorter side's offset rounded down)."""
    side = max(img.width, img.height)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square


def _resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """transformers.image_transforms.get_resize_output_image_size(default_to_square=False)."""
    if "height" in size:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    new_short = size["shortest_edge"]
    new_long = int(new_short * long / short)  # truncated, not rounded (torchvision's old rule)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize_and_crop(img: Image.Image, height: int, width: int, resample: int, crop) -> np.ndarray:
    """Resize to (height, width) but compute only the pixels the center crop keeps.

    For extreme aspect ratios (20000x10 with its short edge scaled up to LLaVA-1.5's 336 would be
    336 x 672000 pixels, 677 MB) the full resize would need too much memory. PIL's resize with a
    `box` samples the same grid (same scale, filter support reaching outside the box) but only
    the window asked for. Not bit-identical to resize-then-crop: PIL orders its two passes by the
    size of their intermediate, so uint8 rounding happens in a different order (measured mean
    difference well under one level, see tests/test_robustness_images.py). Along an axis longer
    than the crop the window is the crop; along a shorter one it is the whole axis, which
    _center_crop then pads exactly as it would the full image."""
    if crop is None:
        raise ImageError(f"the image would be resized to {width}x{height} pixels without a center crop; "
                         "pass an image with a less extreme aspect ratio")
    sy, sx = img.height / height, img.width / width
    (r0, rn), (c0, cn) = _kept(height, crop[0]), _kept(width, crop[1])
    window = img.resize((cn, rn), resample=resample, box=(c0 * sx, r0 * sy, (c0 + cn) * sx, (r0 + rn) * sy))
    return np.asarray(window, dtype=np.uint8)  # rn x cn x 3


def _kept(size: int, crop: int) -> tuple[int, int]:
    """_center_crop's kept range along one axis of `size` output pixels: (start, count)."""
    return ((size - crop) // 2, crop) if size >= crop else (0, size)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on an HxWxC array: floor offsets; where the
    image is smaller than the crop it is first zero-padded (ceil of half the gap on top/left).
    Padding happens on uint8 pixels, so padded pixels come out as (0 - mean) / std."""
    h, w = pixels.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:  # the crop fits in the image
        return pixels[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]
