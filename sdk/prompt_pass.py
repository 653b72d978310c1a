"""PIP-MM's prompt pass: the prompt vector [1, D_llm], taken the cheapest way the bundle allows.

    prefix   manifest prompt_vector.prefill_prefix (a prompt-first chat template: "USER: {prompt}\\n<image> ASSISTANT:")
             and this request's prompt-encoder ids are the first ids of its prefill: the decoder runs over them
             with a fresh cache; its `hidden` (at the prompt layer) gives the vector and its KV cache is kept, so
             the prefill runs only the image tokens and the rest (Pipeline.prefill(prefix=...)). The prompt
             vector then costs nothing beyond the prefill it is part of.
    encoder  the bundle's prompt_encoder graph (prompt_vector.encoder_layers < all layers): only the first L
             layers, no cache (runtimes/prompt_encoder.py picks the plain or the fused flavour)
    decoder  the decoder graph over the prompt-encoder ids with a fresh cache, which is dropped

The prefix mode is checked per request (the ids, not only the manifest): a tokenizer that merged across the end
of the question would make the cache differ from the prefill's, so such a request takes the separate pass.
PIPMM_PREFIX_REUSE=0 turns the prefix mode off (benchmarks: scripts/prompt_pass_bench.py). Every mode gives the
same vector up to float rounding: tests/test_prompt_pass.py compares them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

PREFIX, ENCODER, DECODER = "prefix", "encoder", "decoder"


@dataclass
class PromptPass:
    vector: np.ndarray  # [1, D_llm]
    mode: str  # PREFIX, ENCODER or DECODER
    cache: object | None = None  # PREFIX: the KV cache of the prefill's first `length` ids
    length: int = 0  # prefill ids the cache covers (0 unless PREFIX)


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """hidden [1,T,D] over the prompt -> the prompt vector [1,D] (manifest prompt_vector.pooling)."""
    return hidden.mean(axis=1) if pooling == "mean" else hidden[:, -1]


def is_prefix(encoder_ids: np.ndarray, prefill_ids: np.ndarray) -> bool:
    n = len(encoder_ids)
    return n < len(prefill_ids) and bool(np.array_equal(prefill_ids[:n], encoder_ids))


def run(pipeline, prompt: str, prefill_ids: np.ndarray | None = None) -> PromptPass:
    """The prompt pass of `prompt`; prefill_ids [T] (this request's whole turn) allow the prefix mode."""
    spec, backend = pipeline.prompt_vector_spec, pipeline.backend
    ids = pipeline.prompter.encoder_ids(prompt)
    embeds = backend.embed(ids[None])
    reuse = spec.prefill_prefix and os.environ.get("PIPMM_PREFIX_REUSE", "1") != "0"
    if reuse and prefill_ids is not None and is_prefix(ids, prefill_ids):
        _, hidden, cache = backend.decoder(embeds, backend.new_cache(1))
        return PromptPass(pool(hidden, spec.pooling), PREFIX, cache, len(ids))
    if getattr(backend, "prompt_encoder_graph", None):
        return PromptPass(pool(backend.prompt_hidden(embeds), spec.pooling), ENCODER)
    _, hidden, _ = backend.decoder(embeds, backend.new_cache(1))
    return PromptPass(pool(hidden, spec.pooling), DECODER)
