"""Referring regions (docs/referring.md): where on the image a question points, mapped onto the visual tokens.

    sdk.Box(x0, y0, x1, y1)           pixels of the input image, x1/y1 exclusive
    sdk.Point(x, y) / sdk.Point([(x, y), ...])
    sdk.Scribble([(x, y), (x, y), ...])   a polyline
    sdk.Mask(array HxW or "mask.png")   nonzero = inside; the image's own size

    region --rasterise at the input size--> plane HxW --preprocess's resize + crop (sdk.preprocess.transform_plane)-->
    crop plane --mean per patch--> coverage [gh, gw] --box/mask: as is; point/scribble: exp(-d^2 / 2 sigma^2),
    d the distance to the nearest touched patch, the grid side = 1--> patch weights [N] --the bundle's reducer-->
    token weights [K] (full: as is; prompt-topk: the kept patches; pool: the mean over each cell)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import PipmmError
from .preprocess import load_image, transform_plane


class RegionError(PipmmError, ValueError):
    """A referring region that cannot be used with this image or bundle."""


def _pairs(points, what: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple((float(x), float(y)) for x, y in points)
    except (TypeError, ValueError):
        raise RegionError(f"{what} needs (x, y) pairs, got {points!r:.60}: pass e.g. [(10, 20), (30, 40)]") from None
    if not pairs or not all(math.isfinite(v) for p in pairs for v in p):
        raise RegionError(f"{what} needs at least one finite (x, y) pair: pass e.g. [(10, 20)]")
    return pairs


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    kind = "box"

    def plane(self, width: int, height: int) -> np.ndarray:
        if not (0 <= self.x0 < self.x1 <= width and 0 <= self.y0 < self.y1 <= height):
            raise RegionError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) is not inside the {width}x{height} "
                              "image: pass 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height")
        plane = np.zeros((height, width), np.float32)
        plane[int(self.y0):math.ceil(self.y1), int(self.x0):math.ceil(self.x1)] = 1.0
        return plane

    def draw(self, canvas: ImageDraw.ImageDraw, width: int) -> None:
        canvas.rectangle((self.x0, self.y0, self.x1 - 1, self.y1 - 1), outline=(255, 0, 0), width=width)


def _inside(pairs, width: int, height: int, what: str) -> None:
    bad = [p for p in pairs if not (0 <= p[0] < width and 0 <= p[1] < height)]
    if bad:
        raise RegionError(f"{what} {bad[0]} is outside the {width}x{height} image: pass 0 <= x < width, "
                          "0 <= y < height")


class Point:
    """One point (Point(x, y)) or several (Point([(x, y), ...]))."""
    kind = "point"

    def __init__(self, x, y=None):
        self.points = _pairs([(x, y)] if y is not None else x, "Point")

    def __repr__(self) -> str:
        return f"Point({list(self.points)})"

    def plane(self, width: int, height: int) -> np.ndarray:
        _inside(self.points, width, height, "point")
        plane = np.zeros((height, width), np.float32)
        for x, y in self.points:
            plane[int(y), int(x)] = 1.0
        return plane

    def draw(self, canvas: ImageDraw.ImageDraw, width: int) -> None:
        r = 2 * width
        for x, y in self.points:
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=(255, 0, 0))


class Scribble:
    """A polyline through (x, y) points."""
    kind = "scribble"

    def __init__(self, points):
        self.points = _pairs(points, "Scribble")

    def __repr__(self) -> str:
        return f"Scribble({list(self.points)})"

    def plane(self, width: int, height: int) -> np.ndarray:
        _inside(self.points, width, height, "scribble point")
        line = Image.new("L", (width, height), 0)
        ImageDraw.Draw(line).line(list(self.points) if len(self.points) > 1 else list(self.points) * 2, fill=255,
                                  width=1)
        return np.asarray(line, np.float32) / 255.0

    def draw(self, canvas: ImageDraw.ImageDraw, width: int) -> None:
        canvas.line(list(self.points) if len(self.points) > 1 else list(self.points) * 2, fill=(255, 0, 0),
                    width=width, joint="curve")


class Mask:
    """A binary mask of the image's own size: an HxW array (nonzero = inside) or an image file (grey level > 127)."""
    kind = "mask"

    def __init__(self, mask):
        if isinstance(mask, (str, Path)):
            try:
                with Image.open(mask) as img:
                    mask = np.asarray(img.convert("L")) > 127
            except (OSError, ValueError) as err:
                raise RegionError(f"mask file {mask} cannot be read ({type(err).__name__}): pass a PNG of the "
                                  "image's size") from None
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array[..., 0]
        if array.ndim != 2:
            raise RegionError(f"mask has shape {array.shape}: pass an HxW array or a grey PNG of the image's size")
        self.array = array != 0

    def __repr__(self) -> str:
        return f"Mask({self.array.shape[1]}x{self.array.shape[0]}, {int(self.array.sum())} px)"

    def plane(self, width: int, height: int) -> np.ndarray:
        if self.array.shape != (height, width):
            raise RegionError(f"mask is {self.array.shape[1]}x{self.array.shape[0]} but the image is {width}x{height}: "
                              "pass a mask of the image's size")
        if not self.array.any():
            raise RegionError("mask is empty (no nonzero pixel): mark the region to refer to")
        return self.array.astype(np.float32)

    def draw(self, canvas: ImageDraw.ImageDraw, width: int) -> None:
        outline = self.array & ~_eroded(self.array, width)
        ys, xs = np.nonzero(outline)
        canvas.point(list(zip(xs.tolist(), ys.tolist())), fill=(255, 0, 0))


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


REGIONS = (Box, Point, Scribble, Mask)
SOFT = ("point", "scribble")  # weighted by distance, not by coverage


def check_region(region) -> None:
    if not isinstance(region, REGIONS):
        raise RegionError(f"region {region!r:.60} is not a referring region: pass sdk.Box, sdk.Point, sdk.Scribble "
                          "or sdk.Mask")


def overlay(image, region) -> Image.Image:
    """The region drawn on the image (red box outline, dot, polyline or mask outline): referring without
    gradients, as visual-prompting-by-drawing does."""
    check_region(region)
    img = load_image(image).copy()
    region.plane(img.width, img.height)  # the same bounds checks as the gradient methods
    region.draw(ImageDraw.Draw(img), max(2, round(min(img.width, img.height) / 100)))
    return img


def patch_weights(region, image, preprocessing: dict, grid: list[int], patch_size: int, sigma: float) -> np.ndarray:
    """Weights [gh * gw] of the patches the region covers, in raster order (module docstring)."""
    check_region(region)
    img = load_image(image)
    crop = transform_plane(region.plane(img.width, img.height), preprocessing)
    gh, gw = grid
    if crop.shape != (gh * patch_size, gw * patch_size):
        raise RegionError(f"the preprocessed image is {crop.shape[1]}x{crop.shape[0]} but the patch grid needs "
                          f"{gw * patch_size}x{gh * patch_size}: re-export the bundle")
    coverage = np.clip(crop.reshape(gh, patch_size, gw, patch_size).mean(axis=(1, 3)), 0.0, 1.0)
    if not coverage.any():
        raise RegionError(f"the {region.kind} falls outside the part of the image the model sees (its center crop): "
                          "move it towards the middle")
    if region.kind not in SOFT:
        return coverage.reshape(-1).astype(np.float32)
    rows, cols = np.mgrid[0:gh, 0:gw]
    centres = np.stack([rows.reshape(-1), cols.reshape(-1)], 1).astype(np.float64)
    touched = centres[coverage.reshape(-1) > 0]
    distance = np.sqrt(((centres[:, None] - touched[None]) ** 2).sum(-1)).min(1) / max(gh, gw)
    return np.exp(-distance ** 2 / (2 * sigma ** 2)).astype(np.float32)


def _cell_edges(length: int, cells: int) -> list[int]:
    return [round(i * length / cells) for i in range(cells + 1)]


def pool_cells(grid_h: int, grid_w: int, k: int) -> np.ndarray:
    """[K, N] averaging matrix of the `pool` reducer, the same cells as export/model/reducers.py pool_matrix
    (a test holds them equal): output token j is the mean of one rectangular cell, or of a raster run."""
    n = grid_h * grid_w
    matrix = np.zeros((k, n), np.float32)
    shapes = [(gh, k // gh) for gh in range(1, k + 1) if k % gh == 0 and gh <= grid_h and k // gh <= grid_w]
    if shapes:
        gh, gw = min(shapes, key=lambda s: (abs(math.log((grid_h / s[0]) / (grid_w / s[1]))), -s[0]))
        rows, cols = _cell_edges(grid_h, gh), _cell_edges(grid_w, gw)
        for i in range(gh):
            for j in range(gw):
                cell = [r * grid_w + c for r in range(rows[i], rows[i + 1]) for c in range(cols[j], cols[j + 1])]
                matrix[i * gw + j, cell] = 1.0 / len(cell)
    else:
        edges = _cell_edges(n, k)
        for j in range(k):
            matrix[j, edges[j]:edges[j + 1]] = 1.0 / (edges[j + 1] - edges[j])
    return matrix


def _full(weights, count, kept, grid):
    if count == len(weights) + 1:  # select_strategy "full": the class token first, outside every region
        return np.concatenate([[0.0], weights]).astype(np.float32)
    return weights


# reducer -> token weights [K] from (patch weights [N], K, kept_patches [K] or None, grid)
TOKEN_MAPS = {
    "full": _full,
    "prompt-topk": lambda weights, count, kept, grid: weights[np.asarray(kept).reshape(-1)],
    "pool": lambda weights, count, kept, grid: pool_cells(grid[0], grid[1], count) @ weights,
}


def token_weights(patch: np.ndarray, reducer: str, count: int, kept_patches, grid: list[int]) -> np.ndarray:
    """The region's weight on each of the K visual tokens the bundle keeps."""
    if reducer not in TOKEN_MAPS:
        raise RegionError(f"the bundle's {reducer!r} reducer mixes patches by content, so a region has no fixed "
                          f"tokens: use a bundle with the {', '.join(TOKEN_MAPS)} reducer, or referring='overlay'")
    if reducer == "prompt-topk" and kept_patches is None:
        raise RegionError("the bundle's vision graph has no kept_patches output: re-export it with 'pipmm export'")
    weights = TOKEN_MAPS[reducer](patch, count, kept_patches, grid).astype(np.float32)
    if weights.shape != (count,):
        raise RegionError(f"the region maps to {weights.shape[0]} tokens but the bundle keeps {count}: re-export it")
    if not weights.any():
        raise RegionError("none of the visual tokens the bundle keeps lies in the region (prompt-topk dropped "
                          "them): use a larger region, or referring='overlay'")
    return weights
