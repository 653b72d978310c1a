"""Visual-token reducers: N projected patch tokens -> a budget of K tokens.

Every reducer is a static graph for export: constant K, no data-dependent shapes, only
operators TensorRT's ONNX parser accepts (MatMul, TopK, GatherElements, comparisons).
Each reducer class declares its facts (Reducer: name, decoder positions, options, whether it keeps
whole patches); REDUCERS, the registry, gives the CLI's choices and the manifest's positions.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from sdk.errors import ExportError
from sdk.regions import pool_cells


def resolve_budget(budget: str | int, num_patches: int) -> int:
    """'full' -> N, 'half' -> ceil(N/2), 'quarter' -> ceil(N/4), an int (or digit string) -> itself."""
    named = {"full": num_patches, "half": math.ceil(num_patches / 2), "quarter": math.ceil(num_patches / 4)}
    if isinstance(budget, str) and budget in named:
        return named[budget]
    try:
        k = int(budget)
    except (TypeError, ValueError):
        raise ExportError(f"visual-token budget {budget!r} is not full, half, quarter or an integer") from None
    if not 1 <= k <= num_patches:
        raise ExportError(f"visual-token budget {k} is outside 1..{num_patches} (the number of patches)")
    return k


def pool_matrix(grid_h: int, grid_w: int, k: int) -> torch.Tensor:
    """[K, N] averaging matrix: output token j is the mean of one rectangular cell of the patch grid, the
    squarest cells with gh * gw == K (a 24x24 grid at quarter budget pools 2x2, at half budget 2x1), or
    contiguous raster runs when K has no factorisation that fits. The cells are sdk.regions.pool_cells': the
    device maps referring regions through the very same ones."""
    return torch.from_numpy(pool_cells(grid_h, grid_w, k))


def top_patches(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B,N] scores -> [B,K] int64: the K highest-scoring patches, in raster order.

    On equal scores the lower index ranks first, as ONNX's TopK specifies; torch.topk keeps some
    other one, and TensorRT documents no rule. Ranking by comparisons (a permutation of 0..N-1) and
    one TopK over distinct keys makes the torch reference, ONNX Runtime and TensorRT keep the same
    patches. TopK, not Sort: TensorRT has no Sort operator.
    """
    n = scores.shape[-1]
    index = torch.arange(n, device=scores.device)
    earlier = index[None, :] < index[:, None]  # [N,N]: column patch i comes before row patch j
    ahead = (scores[:, None, :] > scores[:, :, None]) | ((scores[:, None, :] == scores[:, :, None]) & earlier)
    rank = ahead.sum(-1)  # [B,N]: how many patches rank ahead of each, 0 = the best
    key = torch.where(rank < k, index, index + n)  # the kept ones first, each in raster order
    return torch.topk(key, k, dim=-1, largest=False).values


class Reduced(NamedTuple):
    tokens: torch.Tensor  # [B,K,D]
    kept_patches: torch.Tensor | None  # [B,K] int64 patch indices in raster order, for reducers that keep patches


class Reducer(torch.nn.Module):
    """A reducer's facts, declared by each subclass; the CLI, the manifest and the vision graph read them."""

    name: ClassVar[str]
    # Decoder positions of its tokens (runtimes/positions.py), the first being the default. "sequence"
    # numbers the K tokens one after another, as transformers' LLaVA does (and as our training does);
    # "patch" puts each kept token at the position of its patch, which a decoder trained at full budget
    # can read places from: only for reducers that keep whole patches.
    positions: ClassVar[tuple[str, ...]] = ("sequence",)
    options: ClassVar[dict] = {}  # settings -> defaults (recorded in the manifest's vision config)
    # Outputs whole patches, so the vision graph reports their indices (kept_patches) for the device.
    keeps_patches: ClassVar[bool] = False


class PoolReducer(Reducer):
    """Average neighbouring patches: [B,N,D] -> [B,K,D]. Prompt-agnostic."""

    name = "pool"

    def __init__(self, grid_h: int, grid_w: int, k: int):
        super().__init__()
        self.register_buffer("matrix", pool_matrix(grid_h, grid_w, k), persistent=False)

    def forward(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> Reduced:
        return Reduced(torch.matmul(self.matrix.to(tokens.dtype), tokens), None)


class PromptTopKReducer(Reducer):
    """Keep the K patches the (T-)CLS attends to most, in their original order: [B,N,D] -> [B,K,D]."""

    name = "prompt-topk"
    positions = ("sequence", "patch")
    keeps_patches = True

    def __init__(self, grid_h: int, grid_w: int, k: int):
        super().__init__()
        self.k = k

    def forward(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> Reduced:
        # cls_attention: [B, N], the class token's attention to each patch (mean over heads).
        kept = top_patches(cls_attention, self.k)  # [B, K]
        index = kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return Reduced(torch.gather(tokens, 1, index), kept)


def _unit(x: torch.Tensor) -> torch.Tensor:
    # x / |x| along the last axis, written out (Mul, ReduceSum, Sqrt, Div) for any ONNX consumer.
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-12)


class MergeReducer(Reducer):
    """VMTC (arXiv 2411.15453, as far as public sources describe it): keep the K_p patches the (T-)CLS
    attends to most, merge the others into K_m = K - K_p tokens: [B,N,D] -> [B,K,D].

    Clustering is static (constant K, a fixed number of unrolled iterations, no data-dependent
    shape): the K_m next-ranked patches seed the clusters; each iteration assigns every non-primary
    patch to its most cosine-similar centre (ReduceMax + Equal: a one-hot row, several on an exact tie)
    and recomputes the centres. A merged token is the mean of its members weighted by their
    attention scores; a cluster left empty keeps its seed token. Output: the primary tokens in raster
    order, then the merged tokens in the raster order of their seeds.
    """

    name = "merge"
    options = {"primary_ratio": 0.5, "iterations": 2}

    def __init__(self, grid_h: int, grid_w: int, k: int, primary_ratio: float = 0.5, iterations: int = 2):
        super().__init__()
        if not 0.0 < primary_ratio < 1.0:
            raise ExportError(f"--primary-ratio {primary_ratio} is outside (0, 1): part of the budget must go "
                              "to primary patches and part to merged ones")
        if iterations < 1:
            raise ExportError(f"merge iterations {iterations} must be at least 1")
        if k < 2:
            raise ExportError(f"the merge reducer needs a budget of at least 2 tokens (one primary, one merged), "
                              f"not {k}")
        self.kp = min(k - 1, max(1, round(k * primary_ratio)))
        self.km = k - self.kp
        self.iterations = iterations

    def forward(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> Reduced:
        d = tokens.shape[-1]
        ranked = torch.topk(cls_attention, self.kp + self.km, dim=-1).indices  # [B, Kp+Km], by score
        primary_index = torch.topk(ranked[:, : self.kp], self.kp, dim=-1, largest=False).values  # raster order
        seed_index = torch.topk(ranked[:, self.kp:], self.km, dim=-1, largest=False).values  # [B, Km]
        primary = torch.gather(tokens, 1, primary_index.unsqueeze(-1).expand(-1, -1, d))  # [B, Kp, D]
        seeds = torch.gather(tokens, 1, seed_index.unsqueeze(-1).expand(-1, -1, d))  # [B, Km, D]
        is_primary = torch.zeros_like(cls_attention).scatter(1, primary_index, 1.0)  # [B, N]
        weight = (cls_attention * (1.0 - is_primary)).unsqueeze(-1)  # [B, N, 1]: primaries take no part
        unit = _unit(tokens)  # [B, N, D]
        centres = _unit(seeds)
        merged = seeds
        for _ in range(self.iterations):
            similarity = torch.matmul(unit, centres.transpose(1, 2))  # [B, N, Km]
            assign = (similarity == similarity.amax(-1, keepdim=True)).to(tokens.dtype) * weight  # [B, N, Km]
            mass = assign.sum(1).unsqueeze(-1)  # [B, Km, 1]
            pooled = torch.matmul(assign.transpose(1, 2), tokens)  # [B, Km, D]
            merged = torch.where(mass > 0, pooled / mass.clamp_min(1e-12), seeds)
            centres = _unit(merged)
        return Reduced(torch.cat([primary, merged], dim=1), None)


class FullReducer(Reducer):
    """No reduction (a budget of every patch, whichever reducer was asked for)."""

    name = "full"

    def __init__(self, grid_h: int, grid_w: int, k: int):
        super().__init__()

    def forward(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> Reduced:
        return Reduced(tokens, None)


# The reducers `--reducer` chooses from (FullReducer is what any of them becomes at full budget).
REDUCERS: dict[str, type[Reducer]] = {cls.name: cls for cls in (PoolReducer, PromptTopKReducer, MergeReducer)}


def reducer_options(name: str, given: dict | None = None) -> dict:
    """The reducer's settings with its defaults filled in (recorded in the manifest's vision config)."""
    defaults = dict(REDUCERS[name].options) if name in REDUCERS else {}
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ExportError(f"reducer {name!r} takes no {', '.join(unknown)} setting"
                          + (f" (it takes {', '.join(defaults)})" if defaults else ""))
    return {**defaults, **(given or {})}


def visual_positions_for(reducer: type[Reducer], asked: str | None) -> str:
    """The reducer's default (first) or the asked mode, if that reducer supports it."""
    if asked is None:
        return reducer.positions[0]
    if asked not in reducer.positions:
        raise ExportError(f"visual positions {asked!r} do not apply to reducer {reducer.name!r}: choose "
                          f"{' or '.join(reducer.positions)}")
    return asked


def make_reducer(name: str, grid_h: int, grid_w: int, k: int, options: dict | None = None) -> Reducer:
    if name not in REDUCERS:
        raise ExportError(f"unknown reducer {name!r}: choose one of {', '.join(REDUCERS)}")
    if k == grid_h * grid_w:
        return FullReducer(grid_h, grid_w, k)
    return REDUCERS[name](grid_h, grid_w, k, **reducer_options(name, options))
