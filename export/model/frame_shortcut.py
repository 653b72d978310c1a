"""The adapters' shortcuts (AdapterConfig.shortcut): the frame tokens pooled by region, added to the adapter's stream.

    "regions":       slot r = softmax over the present tokens of ALL frames of region_bias[position, r], one [N,R]
                     table that starts as "patch n lies in region r" (region r of a grid of R regions over the
                     patch grid). Invariant to the frames' order, but it mixes the frames: at 4 frames "which frame
                     shows X" stayed at chance on the H200 (docs/multi-image.md).
    "frame_regions": the R slots are shared out among the n present frames (n = frame_mask.sum()): the present
                     frame of rank j (cumsum(mask) - 1 in slot order, so the present frames need not be a prefix)
                     owns slots [j*R//n, (j+1)*R//n), laid out as a region grid over that frame's patch grid, and
                     a slot pools only its own frame's tokens. One learned [N,R] table per n: region_bias
                     [F_max,N,R] (F_max = max_frames), and slot_frame [F_max,R] int64 (the owner's rank, a
                     constant). The output depends on the frames' order by design ("which frame" needs it).

Both are static-shape: Gather, CumSum (float), ReduceSum, Cast, Equal, And, Where, Softmax, MatMul, Transpose,
Reshape, Expand: TensorRT's ONNX parser takes them all. A registry (SHORTCUTS) maps each name to how it builds its
parameters on the adapter and how it pools, so the adapter tests no names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

REGION_BIAS = 10.0  # a region's patches start 10 logits above the others: ~0.5% of the weight leaks to 126 patches
NEG = -1.0e4  # score of a masked key: exp(NEG - max) is exactly 0 in fp32, and NEG fits fp16


def region_index(regions: int, num_patches: int, region_rows: int | None = None) -> torch.Tensor:
    """[N] int64: the region (0..regions-1) of each patch. The patch grid (rows x cols, square where N is) is cut into
    `region_rows` bands of regions; band i holds (i+1)*regions//region_rows - i*regions//region_rows regions side by
    side. region_rows None: isqrt(regions) (as square as the count allows: 21 -> 4 bands of 5/5/5/6, 64 -> 8 x 8)."""
    rows = math.isqrt(num_patches) if math.isqrt(num_patches) ** 2 == num_patches else 1
    cols = num_patches // rows
    bands = region_rows or math.isqrt(regions)
    n = torch.arange(num_patches)
    band = n // cols * bands // rows  # [N]: which band of regions the patch's row falls in
    start, width = band * regions // bands, (band + 1) * regions // bands - band * regions // bands  # [N] each
    return start + n % cols * width // cols


def region_table(regions: int, num_patches: int) -> torch.Tensor:
    """[N,R] starting bias of "regions": 0 where patch n lies in region r, -REGION_BIAS elsewhere, on a grid of R
    regions as square as R's divisors allow (64: 8 x 8; the layout the trained adapters started from)."""
    region_rows = max(r for r in range(1, math.isqrt(regions) + 1) if regions % r == 0)
    region = region_index(regions, num_patches, region_rows)
    return torch.where(region[:, None] == torch.arange(regions)[None], 0.0, -REGION_BIAS)


def slot_starts(regions: int, frames: int) -> list[int]:
    """The first slot of each of `frames` present frames, and R at the end: frame j owns [j*R//n, (j+1)*R//n)."""
    return [j * regions // frames for j in range(frames + 1)]


def frame_region_tables(max_frames: int, regions: int, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (bias [F_max,N,R], slot_frame [F_max,R] int64). For n present frames (row n-1): slot s belongs to the frame
    of rank slot_frame[n-1, s], and bias[n-1, :, s] is 0 on the patches of its region in that frame's grid of
    regions (as many as the frame's slots), -REGION_BIAS elsewhere. n > R: the last frames own no slot."""
    bias = torch.full((max_frames, num_patches, regions), -REGION_BIAS)
    owner = torch.zeros(max_frames, regions, dtype=torch.int64)
    for n in range(1, max_frames + 1):
        starts = slot_starts(regions, n)
        for j in range(n):
            a, b = starts[j], starts[j + 1]
            if b > a:
                region = region_index(b - a, num_patches)  # [N]: 0..b-a-1 within the frame's own slots
                bias[n - 1, :, a:b] = torch.where(region[:, None] == torch.arange(b - a)[None], 0.0, -REGION_BIAS)
                owner[n - 1, a:b] = j
    return bias, owner


def build_regions(adapter: nn.Module, config) -> None:
    adapter.region_bias = nn.Parameter(region_table(config.queries, config.num_patches))  # [N,R]


def pool_regions(adapter, frame_tokens, present, positions) -> torch.Tensor:
    """frame_tokens [B,F,K,D_in], present [B,F] bool, positions [B,F,K] -> [B,R,D_in], slot r a softmax over the
    present tokens of region_bias[position, r] (absent frames' tokens masked)."""
    b, f, k, d_in = frame_tokens.shape
    scores = adapter.region_bias[positions.reshape(b, f * k)].transpose(1, 2)  # [B,R,F*K]
    keys = present[:, :, None].expand(b, f, k).reshape(b, 1, f * k)
    scores = torch.where(keys, scores, torch.full_like(scores, NEG))
    return torch.matmul(torch.softmax(scores, dim=-1), frame_tokens.reshape(b, f * k, d_in))


def build_frame_regions(adapter: nn.Module, config) -> None:
    bias, owner = frame_region_tables(config.max_frames, config.queries, config.num_patches)
    adapter.region_bias = nn.Parameter(bias)  # [F_max,N,R]: learned, one table per present count
    adapter.register_buffer("slot_frame", owner, persistent=False)  # [F_max,R]: from the config, not saved


def pool_frame_regions(adapter, frame_tokens, present, positions) -> torch.Tensor:
    """frame_tokens [B,F,K,D_in], present [B,F] bool, positions [B,F,K] -> [B,R,D_in]: slot s a softmax over the
    tokens of the frame that owns it (for the sample's present count) of region_bias[n-1, position, s]."""
    b, f, k, d_in = frame_tokens.shape
    f_max, n_patches, r = adapter.region_bias.shape
    mask = present.to(frame_tokens.dtype)  # [B,F] 1/0; CumSum in float (TensorRT's CumSum takes no integers)
    rank = (torch.cumsum(mask, dim=1) - 1).to(torch.int64)  # [B,F]: a present frame's rank among the present
    count = (mask.sum(dim=1).to(torch.int64) - 1).clamp(0, f_max - 1)  # [B]: n-1 (no frame at all: row 0, masked)
    owner = adapter.slot_frame[count]  # [B,R]: the rank of the frame each slot pools
    # the bias of every token for every slot, one Gather on the [F_max*N,R] table: row (n-1)*N + position
    rows = count[:, None] * n_patches + positions.reshape(b, f * k)  # [B,F*K]
    scores = adapter.region_bias.reshape(f_max * n_patches, r)[rows].transpose(1, 2)  # [B,R,F*K]
    token_rank = rank[:, :, None].expand(b, f, k).reshape(b, 1, f * k)  # [B,1,F*K]
    keys = present[:, :, None].expand(b, f, k).reshape(b, 1, f * k)  # [B,1,F*K]
    keys = keys & (token_rank == owner[:, :, None])  # [B,R,F*K]: present, and of the slot's own frame
    scores = torch.where(keys, scores, torch.full_like(scores, NEG))
    return torch.matmul(torch.softmax(scores, dim=-1), frame_tokens.reshape(b, f * k, d_in))


@dataclass(frozen=True)
class Shortcut:
    build: Callable  # (adapter, config): registers the shortcut's parameters/buffers on the adapter
    pool: Callable  # (adapter, frame_tokens [B,F,K,D_in], present [B,F], positions [B,F,K]) -> [B,R,D_in]
    per_frame_tables: bool  # True: tables per present count, so a graph may have at most max_frames slots


SHORTCUTS = {"regions": Shortcut(build_regions, pool_regions, False),
             "frame_regions": Shortcut(build_frame_regions, pool_frame_regions, True)}
