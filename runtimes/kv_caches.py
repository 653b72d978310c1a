"""The KV caches of the ONNX Runtime backend (runtimes/onnxruntime.py's module docstring says which runs where;
the CPU's in-place cache is runtimes/inplace_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVCache:
    past: list[np.ndarray]  # 2 per layer (key, value), each [B, H_kv, length, head_dim]
    length: int = 0
    mask: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))  # [B, length]
    next_position: int = 0  # runtimes/positions.py


@dataclass
class DeviceKVCache:
    past: list  # OrtValues on the device (or numpy while empty), [B, H_kv, length, head_dim]
    length: int = 0
    mask: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))
    next_position: int = 0


@dataclass
class StaticKVCache:
    """A view of the backend's one static buffer: slots [0, length) hold this sequence. Any number of
    these may share a generation (each a prefix of the next); new_cache() starts a new generation and
    the older ones are refused, since the new sequence overwrites their slots."""
    length: int  # slots [0, length) may be in use: the static graph writes token p to slot p (its position)
    mask: np.ndarray  # [1, S] int64, 1 = slot in use
    generation: int

    @property
    def next_position(self) -> int:
        return self.length
