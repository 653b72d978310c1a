"""sensor_msgs/Image and CompressedImage payloads -> arrays sdk accepts. Pure numpy + PIL: no ROS, no cv_bridge.

    Image: encoding, height, width, step (bytes per row, >= width * channels: rows may be padded), data
        rgb8  -> HxWx3    bgr8 -> HxWx3 (channels reversed)    mono8 -> HxW    rgba8 -> HxWx4 (sdk composites
        alpha onto white, as for any RGBA input)
    CompressedImage: format ("jpeg", "png", ...; PIL reads the bytes whatever it says), data -> PIL RGB image
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdk.errors import ImageError
from sdk.preprocess import load_image


@dataclass(frozen=True)
class Encoding:
    channels: int
    to_sdk: Callable[[np.ndarray], np.ndarray]  # [H, W, channels] uint8 -> what sdk's image argument accepts


ENCODINGS: dict[str, Encoding] = {
    "rgb8": Encoding(3, lambda rows: rows),
    "bgr8": Encoding(3, lambda rows: rows[..., ::-1]),
    "mono8": Encoding(1, lambda rows: rows[..., 0]),
    "rgba8": Encoding(4, lambda rows: rows),
}


class FrameError(ImageError):
    """A frame this node cannot read (unsupported encoding, sizes that do not match the data)."""


def check_encoding(encoding: str) -> Encoding:
    if encoding not in ENCODINGS:
        raise FrameError(f"sensor_msgs/Image encoding {encoding!r} is not supported: publish one of "
                         f"{', '.join(ENCODINGS)} (or a CompressedImage)")
    return ENCODINGS[encoding]


def decode_raw(encoding: str, height: int, width: int, step: int, data) -> np.ndarray:
    """A sensor_msgs/Image's fields -> a contiguous uint8 array (HxWx3, HxWx4 or HxW)."""
    spec = check_encoding(encoding)
    row_bytes = width * spec.channels
    if height < 1 or width < 1 or step < row_bytes:
        raise FrameError(f"sensor_msgs/Image {width}x{height} {encoding} has step {step} < {row_bytes} bytes per "
                         "row: fix the publisher's step (bytes per row, padding included)")
    buffer = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if buffer.size < step * height:
        raise FrameError(f"sensor_msgs/Image {width}x{height} {encoding} needs {step * height} bytes "
                         f"(step {step} x height {height}) but carries {buffer.size}: fix the publisher")
    rows = buffer[:step * height].reshape(height, step)[:, :row_bytes].reshape(height, width, spec.channels)
    return np.ascontiguousarray(spec.to_sdk(rows))


def decode_compressed(data) -> Image.Image:
    """A sensor_msgs/CompressedImage's bytes -> PIL RGB image (sdk's pixel limit checked before decoding)."""
    payload = bytes(data)
    try:
        opened = Image.open(io.BytesIO(payload))
    except (UnidentifiedImageError, OSError):
        raise FrameError(f"sensor_msgs/CompressedImage data ({len(payload)} bytes) is not an image PIL can read: "
                         "publish jpeg or png bytes") from None
    return load_image(opened)
