"""Generation arguments and token sampling (numpy): greedy, temperature, nucleus (top-p), min_new_tokens."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import BackendError, GenerationArgumentError


@dataclass(frozen=True)
class GenerationArgs:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens were generated

    @classmethod
    def checked(cls, max_new_tokens, temperature, top_p, seed, max_context: int,
                min_new_tokens=0) -> "GenerationArgs":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise GenerationArgumentError(f"max_new_tokens must be an integer, not {max_new_tokens!r}")
        if not 1 <= max_new_tokens <= max_context:
            raise GenerationArgumentError(f"max_new_tokens={max_new_tokens} is outside 1..{max_context} "
                                          "(the model's context)")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, numbers.Integral):
            raise GenerationArgumentError(f"min_new_tokens must be an integer, not {min_new_tokens!r}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise GenerationArgumentError(f"min_new_tokens={min_new_tokens} is outside 0..{max_new_tokens} "
                                          "(max_new_tokens)")
        if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0
                or not math.isfinite(temperature)):
            raise GenerationArgumentError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise GenerationArgumentError(f"top_p must be in (0, 1], not {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise GenerationArgumentError(f"seed must be a non-negative integer or None, not {seed!r}")
        return cls(int(max_new_tokens), float(temperature), float(top_p), None if seed is None else int(seed),
                   int(min_new_tokens))


def suppress(logits: np.ndarray, token_ids: list[int]) -> np.ndarray:
    """logits [V] with token_ids made impossible, as transformers' MinNewTokensLengthLogitsProcessor does."""
    logits = logits.copy()
    logits[token_ids] = -np.inf
    return logits


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


@dataclass(frozen=True)
class DeviceChoice:
    """A greedy decode step whose argmax ran on the device (runtimes/fused_device.py): the chosen id, read back as 8
    bytes, and the logits row [1,V] copied only when asked (valid until the backend's next step)."""
    token: int
    logits: Callable[[], np.ndarray]


def choose(logits: "np.ndarray | DeviceChoice", args: GenerationArgs, rng: np.random.Generator,
           banned: list[int]) -> int:
    """A step's logits [1,V] (or a greedy DeviceChoice) -> the next token id, `banned` ids made impossible. The
    device's argmax stands unless it is banned (then the row comes to the host): with the maximum not banned, the
    first index of the maximum is the same with or without the ban."""
    if isinstance(logits, DeviceChoice):
        if logits.token not in banned:
            return logits.token
        logits = logits.logits()
    return sample(suppress(logits[0], banned) if banned else logits[0], args, rng)
