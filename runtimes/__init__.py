"""Backends that run a bundle's graphs. Registry: name -> "module:Class", imported on first use.

Every backend offers the same four calls on numpy arrays (batch-first):

    embed(input_ids [B,T] int64) -> inputs_embeds [B,T,D]
    vision(pixel_values [B,3,H,W], prompt_vector [B,D_llm] or None)
        -> VisionOutput(visual_tokens [B,K,D], cls_attention [B,N], kept_patches [B,K] or None)
    new_cache(batch) -> an opaque KV cache with `.length`
    decoder(inputs_embeds [B,T,D], cache, position_ids=None, image_bias=None)
        -> (logits [B,V], hidden [B,T,D], cache grown by T); image_bias [B,L_c,P+T] for CMAI bundles (None = zeros)
    attention(inputs_embeds [B,T,D], cache, position_ids=None) -> [B,L_c,T,P+T]
        CMAI's probe: the call's attention probabilities at the CMAI layers; `cache` is not grown (sdk/cmai.py)

Backends may also offer `info() -> dict` (what runs where: providers, cache kind, CUDA graph), which
`pipmm bench` records. `export.reference:TorchBackend` is the PyTorch reference with the same interface (workstation only).
"""

from __future__ import annotations

import importlib

from sdk.errors import BackendError

BACKENDS: dict[str, str] = {
    "onnxruntime": "runtimes.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "runtimes.tensorrt:TensorRTBackend",
}

# "auto" tries these in order; the first whose `available()` is true wins.
AUTO_ORDER = ("onnxruntime",)


def backend_class(name: str):
    if name == "auto":
        for candidate in AUTO_ORDER:
            cls = backend_class(candidate)
            if cls.available():
                return cls
        raise BackendError("no backend is available: pip install onnxruntime (or onnxruntime-gpu)")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose auto or one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendError(f"backend {name!r} cannot be imported ({err.name} is missing): install it") from err
    return getattr(module, class_name)
