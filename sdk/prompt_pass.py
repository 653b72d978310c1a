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

The encoder and decoder modes keep the vectors of the last VECTOR_CACHE prompts (VectorCache, per Pipeline): a
camera loop asks the same question of every frame, and the vector is a function of the prompt's ids alone (no
image), so a repeat skips the pass: the same bits, since the same graph on the same session gives them (default
model: 3.4 ms of a 69 ms describe on CPU, docs/gpu.md). PIPMM_PROMPT_CACHE=N keeps N (0: off). The prefix mode is
not cached: its KV cache is the prefill's first rows, and its vector costs nothing beyond them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

PREFIX, ENCODER, DECODER = "prefix", "encoder", "decoder"
VECTOR_CACHE = 32  # prompts whose vectors a Pipeline keeps: [1, D] each (32 KB at D=256, 512 KB at D=4096)


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


class VectorCache:
    """Prompt vectors [1, D] of recent prompts, least recently used dropped first; key: (mode, pooling, the
    prompt-encoder ids). The arrays are read-only: a caller that wrote into one would change later requests."""

    def __init__(self, size: int | None = None):
        self.size = int(os.environ.get("PIPMM_PROMPT_CACHE", VECTOR_CACHE)) if size is None else int(size)
        self.vectors: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # encode_prompt may run outside a Pipeline's request lock

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            vector = self.vectors.get(key)
            if vector is None:
                self.misses += 1
                return None
            self.vectors.move_to_end(key)
            self.hits += 1
            return vector

    def put(self, key: tuple, vector: np.ndarray) -> np.ndarray:
        if self.size <= 0:
            return vector
        vector = np.array(vector)  # its own memory: `hidden` may be a view of a buffer the next call rewrites
        vector.setflags(write=False)
        with self._lock:
            self.vectors[key] = vector
            self.vectors.move_to_end(key)
            while len(self.vectors) > self.size:
                self.vectors.popitem(last=False)
        return vector


def run(pipeline, prompt: str, prefill_ids: np.ndarray | None = None) -> PromptPass:
    """The prompt pass of `prompt`; prefill_ids [T] (this request's whole turn) allow the prefix mode."""
    spec, backend = pipeline.prompt_vector_spec, pipeline.backend
    ids = pipeline.prompter.encoder_ids(prompt)
    reuse = spec.prefill_prefix and os.environ.get("PIPMM_PREFIX_REUSE", "1") != "0"
    if reuse and prefill_ids is not None and is_prefix(ids, prefill_ids):
        _, hidden, cache = backend.decoder(backend.embed(ids[None]), backend.new_cache(1))
        return PromptPass(pool(hidden, spec.pooling), PREFIX, cache, len(ids))
    mode = ENCODER if getattr(backend, "prompt_encoder_graph", None) else DECODER
    key = (mode, spec.pooling, np.asarray(ids, np.int64).tobytes())
    vector = pipeline.prompt_vectors.get(key)
    if vector is not None:
        return PromptPass(vector, mode)
    embeds = backend.embed(ids[None])
    if mode == ENCODER:
        vector = pool(backend.prompt_hidden(embeds), spec.pooling)
    else:
        _, hidden, _ = backend.decoder(embeds, backend.new_cache(1))
        vector = pool(hidden, spec.pooling)
    return PromptPass(pipeline.prompt_vectors.put(key, vector), mode)
