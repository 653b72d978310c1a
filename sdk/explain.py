"""Where the model looked: the T-CLS attention over patches as a heat map over the input image.

    image --preprocess--> pixel_values --vision (+ prompt vector)--> cls_attention [1,N], kept_patches [1,K]
    grid   = cls_attention reshaped to the patch grid [rows, cols], scaled to sum to 1
    (decoder) the greedy answer, teacher-forced over the prompt's KV cache through the decoder's CMAI
              attention output [1,L_c,A,P+A] -> mean over CMAI layers and answer tokens at the image slots [K]
              -> onto the patches each visual token came from -> decoder_grid, sums to 1
    overlay = colormap(grid) alpha-blended over the part of the image the model saw (the center crop,
              mapped back through the resize), kept patches outlined, the rest dimmed; PNG at the input size

Device side: numpy and PIL only (the colormap is a few anchor colours interpolated here).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import BundleError, PromptError
from .preprocess import load_image, normalize_config

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno"), value -> RGB.
COLORMAP_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
COLORMAP_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
OUTLINE_RGB = (255, 255, 255)


@dataclass
class Explanation:
    grid: np.ndarray  # [rows, cols] float32, sums to 1: the T-CLS attention over the patches (heads averaged)
    kept: np.ndarray | None  # [K] int64 raster indices of the patches the reducer kept (prompt-topk), else None
    png_bytes: bytes  # the overlay, at the input image's size
    prompt: str = ""
    answer: str | None = None  # decoder=True: the greedy answer whose attention decoder_grid shows
    decoder_grid: np.ndarray | None = None  # [rows, cols] float32, sums to 1: the answer's attention per patch

    def to_dict(self) -> dict:
        out = {"prompt": self.prompt, "rows": int(self.grid.shape[0]), "cols": int(self.grid.shape[1]),
               "grid": self.grid.tolist(), "kept": None if self.kept is None else self.kept.tolist()}
        if self.decoder_grid is not None:
            out.update(answer=self.answer, decoder_grid=self.decoder_grid.tolist())
        return out

    def save(self, png_path, json_path=None) -> None:
        Path(png_path).write_bytes(self.png_bytes)
        if json_path is not None:
            Path(json_path).write_text(json.dumps(self.to_dict()))


def explain(pipeline, image, prompt: str, answer_ids: list[int] | None = None, answer: str | None = None,
            alpha: float = 0.6) -> Explanation:
    """An Explanation of `prompt` on `image` with a loaded Pipeline (its lock held by the caller).
    answer_ids: the answer's token ids to weigh the decoder's attention by (None: the vision encoder only)."""
    picture = load_image(image)
    pixel_values = pipeline.pixel_values(picture)  # framed by the pipeline's visual prompt, if any
    prompt_vector = pipeline.encode_prompt(prompt) if pipeline.prompt_vector_spec is not None else None
    vision = pipeline.backend.vision(pixel_values, prompt_vector)
    rows, cols = grid_shape(pipeline.manifest, vision.cls_attention.shape[-1])
    grid = unit_sum(vision.cls_attention[0]).reshape(rows, cols)
    kept = None if vision.kept_patches is None else np.asarray(vision.kept_patches[0], np.int64)
    decoder_grid = None
    if answer_ids is not None:
        decoder_grid = unit_sum(answer_attention(pipeline, prompt, vision, answer_ids)).reshape(rows, cols)
    box = model_box(picture.width, picture.height, pipeline.preprocessing)
    if pipeline.visual_prompt is not None:  # the picture fills the inner square; the grid covers the frame too
        box = pipeline.visual_prompt.model_box(box)
    shown = grid if decoder_grid is None else decoder_grid
    png = overlay_png(picture, shown, kept, box, alpha)
    return Explanation(grid=grid, kept=kept, png_bytes=png, prompt=prompt, answer=answer, decoder_grid=decoder_grid)


def grid_shape(manifest, num_patches: int) -> tuple[int, int]:
    """[rows, cols] of the patch grid: the manifest's vision.grid, else the square of N patches."""
    vision = manifest.vision
    if vision is not None and len(vision.grid) == 2 and vision.grid[0] * vision.grid[1] == num_patches:
        return int(vision.grid[0]), int(vision.grid[1])
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise BundleError(f"the vision graph attends to {num_patches} patches, not a square grid, and the manifest "
                          "names no vision.grid: re-export the bundle")
    return side, side


def unit_sum(values: np.ndarray) -> np.ndarray:
    values = np.clip(np.asarray(values, np.float64).ravel(), 0.0, None)
    total = values.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(values.shape, 1.0 / values.size, np.float32)
    return (values / total).astype(np.float32)


# -- the decoder's view ------------------------------------------------------------------------------


def require_attention(pipeline) -> None:
    if pipeline.cmai is None:
        raise BundleError(f"bundle {pipeline.source or '(in memory)'} has no CMAI attention output (exported before "
                          "CMAI, or with --cmai-layers none): re-export it with 'pipmm export' to use --decoder")


def answer_attention(pipeline, prompt: str, vision, answer_ids: list[int]) -> np.ndarray:
    """[N] the answer tokens' attention (CMAI layers and answer tokens averaged) over the patches, each visual
    token's share on the patch it came from."""
    require_attention(pipeline)
    if not answer_ids:
        raise PromptError("the answer is empty (end of sequence first): nothing to weigh; ask another prompt")
    backend = pipeline.backend
    ids, slots = pipeline.prompter.prompt_ids(prompt)
    embeds = backend.embed(ids[None]).copy()
    embeds[0, slots] = vision.visual_tokens[0].astype(embeds.dtype)
    _, cache = pipeline.prefill(embeds, pipeline.prefill_positions(len(ids), slots, vision))
    answer = backend.embed(np.asarray([answer_ids], np.int64))
    attention = backend.attention(answer, cache)  # [1, L_c, A, P+A]; positions follow the prefill's
    per_token = attention[0][:, :, slots].astype(np.float64).mean(axis=(0, 1))  # [K]
    return tokens_to_patches(per_token, vision.kept_patches, vision.cls_attention.shape[-1], pipeline.source)


def tokens_to_patches(per_token: np.ndarray, kept_patches: np.ndarray | None, num_patches: int,
                      source: str = "") -> np.ndarray:
    """[K] per visual token -> [N] per patch: through kept_patches (a patch-keeping reducer), or one to one
    at full budget. Pooled or merged tokens have no single patch: refused."""
    patches = np.zeros(num_patches, np.float64)
    if kept_patches is not None:
        patches[np.asarray(kept_patches[0], np.int64)] = per_token
        return patches
    if len(per_token) == num_patches:
        return per_token.astype(np.float64)
    raise BundleError(f"bundle {source or '(in memory)'} pools or merges patches into {len(per_token)} visual "
                      "tokens, so the decoder's attention has no patch to land on: use a full-budget or "
                      "prompt-topk bundle for --decoder")


# -- the picture ------------------------------------------------------------------------------------


def model_box(width: int, height: int, preprocessing: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in input-image pixels of what the vision graph sees: the center crop mapped back
    through the resize (as sdk/preprocess.py computes them); may reach outside the image where it pads."""
    cfg = normalize_config(preprocessing, BundleError)
    new_h, new_w = height, width
    if cfg["do_resize"]:
        size = cfg["size"]
        if "height" in size:
            new_h, new_w = size["height"], size["width"]
        else:
            short, long = sorted((width, height))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop_h, crop_w = (cfg["crop_size"]["height"], cfg["crop_size"]["width"]) if cfg["do_center_crop"] else (new_h, new_w)

    def start(size: int, crop: int) -> int:  # floor offset inside, ceil of half the gap as padding outside
        return (size - crop) // 2 if size >= crop else -math.ceil((crop - size) / 2)

    sx, sy = width / new_w, height / new_h
    top, left = start(new_h, crop_h), start(new_w, crop_w)
    return left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    channels = [np.interp(v, COLORMAP_ANCHORS, COLORMAP_RGB[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay_png(picture: Image.Image, grid: np.ndarray, kept: np.ndarray | None,
                box: tuple[float, float, float, float], alpha: float = 0.6) -> bytes:
    """The heat map (grid scaled to its maximum) blended over `picture` inside `box`, the rest dimmed, the kept
    patches outlined -> PNG bytes at picture's size."""
    rows, cols = grid.shape
    x0, y0, x1, y1 = box
    base = np.asarray(picture.convert("RGB"), np.float64)
    h, w = base.shape[:2]
    # each pixel's patch (nearest: patches are what the model scored), -1 outside the model's view
    col = np.floor((np.arange(w) + 0.5 - x0) / (x1 - x0) * cols).astype(np.int64)
    row = np.floor((np.arange(h) + 0.5 - y0) / (y1 - y0) * rows).astype(np.int64)
    inside = ((row >= 0) & (row < rows))[:, None] & ((col >= 0) & (col < cols))[None, :]
    level = grid / (float(grid.max()) or 1.0)
    cell = (np.clip(row, 0, rows - 1)[:, None], np.clip(col, 0, cols - 1)[None, :])
    weight = alpha * np.sqrt(level)[cell][..., None]  # faint where attention is low: the image shows through
    blended = np.where(inside[..., None], (1 - weight) * base + weight * colormap(level)[cell], 0.4 * base)
    out = Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")
    if kept is not None:
        outline_kept(ImageDraw.Draw(out), kept, rows, cols, box, width=max(1, round(min(w, h) / 200)))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def outline_kept(draw: ImageDraw.ImageDraw, kept: np.ndarray, rows: int, cols: int,
                 box: tuple[float, float, float, float], width: int = 1) -> None:
    """The border of the kept region: each kept patch's sides that face a patch not kept (or the edge)."""
    x0, y0, x1, y1 = box
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    mask = np.zeros((rows + 2, cols + 2), bool)  # padded by one patch of "not kept"
    flat = np.asarray(kept, np.int64)
    mask[flat // cols + 1, flat % cols + 1] = True
    for r, c in zip(*np.nonzero(mask[1:-1, 1:-1])):
        left, top, right, bottom = x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch
        sides = {(-1, 0): [(left, top), (right, top)], (1, 0): [(left, bottom), (right, bottom)],
                 (0, -1): [(left, top), (left, bottom)], (0, 1): [(right, top), (right, bottom)]}
        for (dr, dc), line in sides.items():
            if not mask[r + 1 + dr, c + 1 + dc]:
                draw.line(line, fill=OUTLINE_RGB, width=width)
