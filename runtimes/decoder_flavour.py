"""Which decoder graph ONNX Runtime runs, and how its CPU threads wait: the traced `decoder`, or `decoder_fused` (export/fused.py: the same
weights as ONNX Runtime's fused contrib ops, for the CPU).

    decoder_flavour  "auto" (default): decoder_fused on CPU (in-place or numpy KV cache) when the bundle has it
                     "plain": the traced decoder always;  "fused": decoder_fused, refused where it cannot run
    PIPMM_DECODER    the same choice from the environment (the argument wins)
    PIPMM_SPINNING   1/0: intra-op threads spin between runs or sleep (default: sleep on CPU, spin on GPUs)
"""

from __future__ import annotations

import os

from sdk.bundle import Bundle
from sdk.errors import BackendError

FUSED_DECODER = "decoder_fused"
DECODER_FLAVOURS = ("auto", "plain", "fused")
CPU_CACHES = ("numpy", "inplace")  # runtimes/onnxruntime.py: the CPU's KV cache kinds


def choose_flavour(bundle: Bundle, device: str, kv_cache: str, flavour: str | None = None) -> tuple[bool, str | None]:
    """-> (run decoder_fused, why not when it is not run: for the backend's info())."""
    flavour = flavour or os.environ.get("PIPMM_DECODER") or "auto"
    if flavour not in DECODER_FLAVOURS:
        raise BackendError(f"decoder_flavour {flavour!r}: choose {', '.join(DECODER_FLAVOURS)}")
    has_fused = FUSED_DECODER in bundle.graphs
    if flavour == "fused" and not has_fused:
        raise BackendError(f"bundle {bundle.path} has no {FUSED_DECODER} graph: add it with 'pipmm add-graphs BUNDLE "
                           f"--checkpoint CHECKPOINT_DIR --graph {FUSED_DECODER}', or use decoder_flavour='plain'")
    if flavour == "fused" and kv_cache not in CPU_CACHES:
        raise BackendError(f"{FUSED_DECODER} runs with the CPU's KV caches, not kv_cache={kv_cache!r} on "
                           f"{device}: use device='cpu' or decoder_flavour='plain'")
    if flavour == "plain":
        return False, "plain decoder asked for (decoder_flavour='plain' or PIPMM_DECODER=plain)"
    if not has_fused:
        return False, f"the bundle has no {FUSED_DECODER} (pipmm add-graphs BUNDLE --graph {FUSED_DECODER})"
    if kv_cache not in CPU_CACHES:
        return False, f"{FUSED_DECODER} is the CPU's flavour (GroupQueryAttention on CUDA is FP16 only); {device} " \
                      "runs the plain decoder"
    return True, None


def spinning_default(device: str) -> bool:
    """Sleeping threads on CPU: spinning ones of idle sessions (vision, embed) compete with the decoder for the
    cores, the collapse issue 18 measured on a shared 2-core CPU (docs/gpu.md, CPU). ONNX Runtime's own default
    (spin) elsewhere, where the host threads only launch kernels."""
    given = os.environ.get("PIPMM_SPINNING")
    if given is not None:
        return given.strip() not in ("0", "", "false", "no")
    return device != "cpu"
