"""Generation arguments and token sampling (numpy): greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import BackendError, GenerationArgumentError


@dataclass(frozen=True)
class GenerationArgs:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def checked(cls, max_new_tokens, temperature, top_p, seed, max_context: int) -> "GenerationArgs":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise GenerationArgumentError(f"max_new_tokens must be an integer, not {max_new_tokens!r}")
        if not 1 <= max_new_tokens <= max_context:
            raise GenerationArgumentError(f"max_new_tokens={max_new_tokens} is outside 1..{max_context} "
                                          "(the model's context)")
        if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0
                or not math.isfinite(temperature)):
            raise GenerationArgumentError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise GenerationArgumentError(f"top_p must be in (0, 1], not {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise GenerationArgumentError(f"seed must be a non-negative integer or None, not {seed!r}")
        return cls(int(max_new_tokens), float(temperature), float(top_p), None if seed is None else int(seed))


def sample(logits: np.ndarray, args: GenerationArgs, rng: np.random.Generator) -> int:
    """logits [V] -> one token id."""
    if np.isnan(logits).any():
        raise BackendError("the model produced NaN logits: the bundle's weights or precision are broken here "
                           "(try an fp32 bundle, or re-export it)")
    if args.temperature == 0.0 or not np.isfinite(logits.max()):  # +inf (fp16 overflow) wins outright
        return int(np.argmax(logits))
    # Shift before dividing: a tiny temperature must give 0 and -inf, never inf - inf = NaN.
    logits = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # -x / 1e-320 = -inf on purpose
        scaled = (logits - logits.max()) / args.temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    if args.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cumulative, args.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.shape[0], p=probs))
