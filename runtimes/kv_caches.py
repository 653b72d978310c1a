"""The KV caches of the ONNX Runtime backend (runtimes/onnxruntime.py's module docstring says which runs where;
the CPU's in-place cache is runtimes/inplace_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdk.errors import BackendError

STATIC_DECODER = "decoder_static"


def resolve_cache(bundle, device: str, kv_cache: str, fused_device: bool) -> str:
    """kv_cache as asked ('auto' included) -> the kind that runs, or BackendError where it cannot.
    fused_device: decoder_fused runs over one device buffer (runtimes/fused_device.py), which is 'static'."""
    has_static = STATIC_DECODER in bundle.graphs
    if kv_cache == "auto":
        # TensorRT reads input and output as separate buffers: the in-place static cache is for CUDA.
        kv_cache = "numpy" if device == "cpu" else \
            ("static" if (has_static or fused_device) and device == "cuda" else "device")
    if kv_cache in ("numpy", "inplace") and device != "cpu":
        raise BackendError(f"kv_cache {kv_cache!r} is the CPU's; on {device} choose 'device' or 'static'")
    if kv_cache == "static" and not (has_static or fused_device):
        raise BackendError(f"bundle {bundle.path} has no {STATIC_DECODER} graph for a static KV cache: add it "
                           "with 'pipmm add-graphs BUNDLE --checkpoint CHECKPOINT_DIR', or use kv_cache='device'")
    return kv_cache


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
