"""What every backend's `vision` call returns: the vision graph's outputs by name."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class VisionOutput(NamedTuple):
    visual_tokens: np.ndarray  # [B,K,D_llm]
    cls_attention: np.ndarray  # [B,N], the (T-)CLS's attention to each patch, mean over heads
    # [B,K] int64: the patches a patch-keeping reducer (prompt-topk) gathered, in raster order;
    # None for reducers that pool or merge (their graph has no such output)
    kept_patches: np.ndarray | None = None

    @classmethod
    def from_graph(cls, outputs: dict[str, np.ndarray]) -> "VisionOutput":
        return cls(outputs["visual_tokens"], outputs["cls_attention"], outputs.get("kept_patches"))
