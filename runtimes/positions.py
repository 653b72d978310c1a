"""Decoder position ids: contiguous by default, or given (visual tokens at their patch positions).

Every backend's cache carries `next_position`, the position of the next token it is fed. Without
explicit position ids a call of T tokens takes next_position ... next_position + T - 1, as a plain
LLaVA does. A bundle whose manifest says visual_tokens.positions == "patch" (sdk.pipeline) passes
the prefill's ids itself: the K kept tokens of a reducer sit at the positions of the patches they
came from (the vision graph's kept_patches output, runtimes/vision_output.py), and the text after
them where it would be at full budget, so a decoder trained at full
budget reads an object's place from its token's position as it did there. Positions then run ahead
of the cache length; the causal order is still the order in the cache.
"""

from __future__ import annotations

import numpy as np


def step_positions(next_position: int, batch: int, length: int, position_ids: np.ndarray | None = None) -> np.ndarray:
    """[B,T] int64 position ids of the next call: the given ones, or next_position + 0..T-1."""
    if position_ids is None:
        row = np.arange(next_position, next_position + length, dtype=np.int64)
        return row[None] if batch == 1 else np.broadcast_to(row, (batch, length)).copy()
    position_ids = np.asarray(position_ids, np.int64)
    if position_ids.shape != (batch, length):
        raise ValueError(f"position_ids has shape {position_ids.shape}, the call feeds {(batch, length)} tokens")
    return np.ascontiguousarray(position_ids)


def following(positions: np.ndarray) -> int:
    """next_position after a call with these [B,T] positions (rows share them)."""
    return int(positions[0, -1]) + 1
