"""Which decoder graph ONNX Runtime runs: the traced `decoder`, or `decoder_fused` (export/fused.py: the same
weights as ONNX Runtime's fused contrib ops, for the CPU).

    decoder_flavour  "auto" (default): decoder_fused on CPU with the numpy KV cache when the bundle has it
                     "plain": the traced decoder always;  "fused": decoder_fused, refused where it cannot run
    PIPMM_DECODER    the same choice from the environment (the argument wins)
"""

from __future__ import annotations

import os

from sdk.bundle import Bundle
from sdk.errors import BackendError

FUSED_DECODER = "decoder_fused"
DECODER_FLAVOURS = ("auto", "plain", "fused")


def choose_flavour(bundle: Bundle, device: str, kv_cache: str, flavour: str | None = None) -> tuple[bool, str | None]:
    """-> (run decoder_fused, why not when it is not run: for the backend's info())."""
    flavour = flavour or os.environ.get("PIPMM_DECODER") or "auto"
    if flavour not in DECODER_FLAVOURS:
        raise BackendError(f"decoder_flavour {flavour!r}: choose {', '.join(DECODER_FLAVOURS)}")
    has_fused = FUSED_DECODER in bundle.graphs
    if flavour == "fused" and not has_fused:
        raise BackendError(f"bundle {bundle.path} has no {FUSED_DECODER} graph: add it with 'pipmm add-graphs BUNDLE "
                           f"--checkpoint CHECKPOINT_DIR --graph {FUSED_DECODER}', or use decoder_flavour='plain'")
    if flavour == "fused" and kv_cache != "numpy":
        raise BackendError(f"{FUSED_DECODER} runs with the CPU's numpy KV cache, not kv_cache={kv_cache!r} on "
                           f"{device}: use device='cpu' or decoder_flavour='plain'")
    if flavour == "plain":
        return False, "plain decoder asked for (decoder_flavour='plain' or PIPMM_DECODER=plain)"
    if not has_fused:
        return False, f"the bundle has no {FUSED_DECODER} (pipmm add-graphs BUNDLE --graph {FUSED_DECODER})"
    if kv_cache != "numpy":
        return False, f"{FUSED_DECODER} is the CPU's flavour (GroupQueryAttention on CUDA is FP16 only); {device} " \
                      "runs the plain decoder"
    return True, None
