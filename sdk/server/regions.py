"""The `regions` extension of /v1/chat/completions (docs/server.md): where on the request's image the question
points, as an sdk region (sdk/regions.py) and a referring method (docs/referring.md).

    "regions": [{"type": "box", "box": [x0, y0, x1, y1], "referring": "controlmllm++"}]
               [{"type": "point", "point": [x, y]}]  or  {"type": "point", "points": [[x, y], ...]}
               [{"type": "scribble", "points": [[x, y], ...]}]
               [{"type": "mask", "mask": "data:image/png;base64,..."}]      (the image's size, grey > 127 inside)

Coordinates are pixels of the image as decoded (after its EXIF orientation). One region per request; "referring"
is optional (the bundle's default: controlmllm with energy_grad, else overlay). Everything is checked here,
against the decoded image, before a worker is taken; whether the bundle has energy_grad is checked by the SDK
(400 unsupported_by_bundle).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import ImageError
from ..referring import METHODS
from ..regions import Box, Mask, Point, RegionError, Scribble
from .config import ServerConfig
from .errors import ApiError, bad_request
from .images import from_url

PARAM = "regions"


def _numbers(value, count: int | None, what: str) -> list[float]:
    ok = isinstance(value, list) and (count is None or len(value) == count) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise bad_request(f"{what} must be a list of {count} numbers, not {value!r:.60}", PARAM, "invalid_region")
    return [float(v) for v in value]


def _pairs(value, what: str) -> list[list[float]]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"{what} must be a non-empty list of [x, y] pairs", PARAM, "invalid_region")
    return [_numbers(p, 2, f"each of {what}") for p in value]


def _box(spec, config):
    return Box(*_numbers(spec.get("box"), 4, "a box region's 'box' ([x0, y0, x1, y1])"))


def _point(spec, config):
    if "points" in spec:
        return Point(_pairs(spec["points"], "a point region's 'points'"))
    return Point(*_numbers(spec.get("point"), 2, "a point region's 'point' ([x, y])"))


def _scribble(spec, config):
    return Scribble(_pairs(spec.get("points"), "a scribble region's 'points'"))


def _mask(spec, config: ServerConfig):
    url = spec.get("mask")
    if not isinstance(url, str) or not url:
        raise bad_request("a mask region's 'mask' must be a data: URL of a PNG of the image's size", PARAM,
                          "invalid_region")
    try:
        image = from_url(url, config)
    except ApiError as err:  # a 403 (outside --media-dir) or 413 keeps its own code
        raise ApiError(err.status, f"regions[0].mask: {err.message}", err.type, PARAM,
                       "invalid_region" if err.status == 400 else err.code) from None
    except ImageError as err:
        raise bad_request(f"regions[0].mask: {err}", PARAM, "invalid_region") from None
    return Mask(np.asarray(image.convert("L")) > 127)


# region type -> builder(spec, config) of the sdk region
KINDS = {"box": _box, "point": _point, "scribble": _scribble, "mask": _mask}


def parse_regions(value, image: Image.Image, config: ServerConfig) -> dict:
    """The request's `regions` -> Pipeline.stream keyword arguments ({} without regions)."""
    if value is None:
        return {}
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise bad_request("regions must be a list of one region object, e.g. [{\"type\": \"box\", \"box\": "
                          "[x0, y0, x1, y1]}] (one region per request)", PARAM, "invalid_region")
    spec = value[0]
    kind = spec.get("type")
    if kind not in KINDS:
        raise bad_request(f"region type {kind!r} is unknown: choose {', '.join(KINDS)}", PARAM, "invalid_region")
    method = spec.get("referring")
    if method is not None and method not in METHODS:
        raise bad_request(f"referring {method!r} is unknown: choose {', '.join(METHODS)}", PARAM, "invalid_region")
    try:
        region = KINDS[kind](spec, config)
        region.plane(image.width, image.height)  # inside the image, a mask of its size and not empty
    except RegionError as err:
        raise bad_request(str(err), PARAM, "invalid_region") from None
    return {"region": region, "referring": method}
