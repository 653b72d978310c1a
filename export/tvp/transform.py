"""The TVP training transform in torch: sdk/visual_prompt.py's numpy preprocessing, differentiable in delta.

    inner [B, 3, h, w] float32 (the image at the inner side, rescaled to [0, 1]: VisualPrompt.inner_pixels)
      --zero-pad by `frame` (geometry pad; overlay: h = w = S, no pad)--> [B, 3, S, S] --+ delta [3, S, S]-->
      --(overlay: the band clipped to [0, 1])--> --(x - mean) / std--> pixel_values

The padding, the addition, the clip and the normalisation are the same float32 operations as the device's, so
the two agree to rounding (tests/test_visual_prompt.py checks 1e-6). Only frame pixels of delta ever change
(frame_mask).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sdk.manifest_visual_prompt import DEFAULT_GEOMETRY, GEOMETRIES
from sdk.preprocess import BadPreprocessing, normalize_config
from sdk.visual_prompt import VisualPrompt


def frame_mask(image_size: int, frame: int) -> torch.Tensor:
    """[1, S, S] float32: 1 in the border `frame` pixels wide, 0 inside."""
    mask = torch.ones(1, image_size, image_size)
    mask[:, frame:image_size - frame, frame:image_size - frame] = 0
    return mask


def channel_stats(preprocessing: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) as [1, 3, 1, 1] float32 tensors, or None when the bundle does not normalise."""
    cfg = normalize_config(preprocessing, BadPreprocessing)
    if not cfg["do_normalize"]:
        return None
    return tuple(torch.tensor(np.asarray(cfg[k], np.float32)).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))


def framed(inner: torch.Tensor, delta: torch.Tensor, frame: int, geometry: str = DEFAULT_GEOMETRY) -> torch.Tensor:
    """inner [B, 3, h, w] -> (zero-padded by `frame`: pad) + delta [3, S, S] (band clipped: overlay) -> [B, 3, S, S]
    (the pixels before normalising: what TSE's guide reads; delta = zeros gives the clean image FCA compares
    against)."""
    shape = GEOMETRIES[geometry]
    x = (F.pad(inner, (frame, frame, frame, frame)) if shape.shrinks else inner) + delta
    if not shape.clips:
        return x
    band = frame_mask(x.shape[-1], frame).to(x.device).bool()
    return torch.where(band, x.clamp(0, 1), x)


def normalise(x: torch.Tensor, stats) -> torch.Tensor:
    """(x - mean) / std per channel, as sdk.preprocess.normalized (stats None: the bundle does not normalise)."""
    if stats is None:
        return x
    mean, std = (s.to(x.device) for s in stats)
    return (x - mean) / std


def prompted(inner: torch.Tensor, delta: torch.Tensor, frame: int, stats,
             geometry: str = DEFAULT_GEOMETRY) -> torch.Tensor:
    """inner [B, 3, h, w] + delta [3, S, S] -> pixel_values [B, 3, S, S]: the device's prompted preprocessing."""
    return normalise(framed(inner, delta, frame, geometry), stats)


def inner_batch(images, prompt: VisualPrompt, preprocessing: dict) -> torch.Tensor:
    """Images (paths, PIL, arrays) -> inner [B, 3, h, w] float32, through the device's own resize and rescale."""
    arrays = [prompt.inner_pixels(image, preprocessing) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
