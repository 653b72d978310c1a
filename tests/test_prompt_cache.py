"""Repeated prompts skip PIP-MM's prompt pass (sdk/prompt_pass.py VectorCache): the cached vector is the
recomputed one bit for bit, so the tokens are those of a pipeline without the cache."""

from __future__ import annotations

import numpy as np
import pytest

import sdk
from sdk.prompt_pass import VectorCache

PROMPTS = ["What is it?", "Describe the scene.", "What is it?", "What is it?"]


def test_a_repeated_prompt_reuses_its_vector_with_the_same_tokens(bundles, image, monkeypatch):
    bundle = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    cached = sdk.load(bundle, device="cpu")
    monkeypatch.setenv("PIPMM_PROMPT_CACHE", "0")
    fresh = sdk.load(bundle, device="cpu")
    for prompt in PROMPTS:
        want = fresh.generate(image, prompt, max_new_tokens=8, min_new_tokens=8, temperature=0.0).token_ids
        assert cached.generate(image, prompt, max_new_tokens=8, min_new_tokens=8, temperature=0.0).token_ids == want
    assert (cached.prompt_vectors.hits, cached.prompt_vectors.misses) == (2, 2)
    assert not fresh.prompt_vectors.vectors  # PIPMM_PROMPT_CACHE=0: nothing kept
    vector = cached.encode_prompt(PROMPTS[0])  # a hit: the very bits of a fresh pass
    np.testing.assert_array_equal(vector, fresh.encode_prompt(PROMPTS[0]))
    assert cached.prompt_vectors.hits == 3
    with pytest.raises(ValueError):  # read-only: a caller cannot change what later requests get
        vector[0, 0] = 1.0


def test_the_least_recently_used_vector_goes_first():
    cache = VectorCache(size=2)
    a, b, c = (np.full((1, 4), v, np.float32) for v in (1, 2, 3))
    cache.put(("decoder", "last", b"a"), a)
    cache.put(("decoder", "last", b"b"), b)
    assert cache.get(("decoder", "last", b"a")) is not None  # a is now the most recent
    cache.put(("decoder", "last", b"c"), c)
    assert cache.get(("decoder", "last", b"b")) is None
    np.testing.assert_array_equal(cache.get(("decoder", "last", b"a")), a)
    assert list(cache.vectors) == [("decoder", "last", b"c"), ("decoder", "last", b"a")]
    off = VectorCache(size=0)
    off.put(("decoder", "last", b"a"), a)
    assert not off.vectors
