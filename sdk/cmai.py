"""CMAI, cross-modality attention inhibition (arXiv 2411.15453, as far as public sources describe it), in numpy.

For each image token a focus score: the prompt's text tokens' attention to it, weighted by how much the
prompt's text attends to each of those text tokens. The image tokens in the lowest `inhibit` fraction
of focus are masked out of the text tokens' attention at the CMAI layers, for the prompt's text and
every generated token. docs/vmtc-cmai.md describes the whole mechanism and what it costs.

The decoder graph of a CMAI bundle takes `image_bias` [B,L_c,P+T] (added to the attention scores of
every query of the call at its L_c CMAI layers; zeros = off) and returns `attention` [B,L_c,T,P+T]
(softmax probabilities, mean over heads). The manifest's `cmai` key names the layers and these settings.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import BundleError, GenerationArgumentError


def _per_layer(focus: np.ndarray) -> np.ndarray:
    return focus  # [L_c, K]: each CMAI layer masks the tokens its own attention neglects


def _mean(focus: np.ndarray) -> np.ndarray:
    return np.broadcast_to(focus.mean(0, keepdims=True), focus.shape)  # one ranking shared by every CMAI layer


# how the focus scores of the CMAI layers make the masks (manifest cmai.aggregate)
AGGREGATES = {"per-layer": _per_layer, "mean": _mean}
# Settings a bundle records (export fills in these defaults). mask_value: what an inhibited pair's score gets
# added; -1e4 zeroes its probability (exp(-1e4) underflows) and stays finite in float16.
DEFAULTS = {"aggregate": "per-layer", "mask_value": -1e4}


def check_settings(settings: dict, error=BundleError) -> dict:
    """The manifest's (or export's) CMAI settings, checked; `error` is the type raised."""
    unknown = sorted(set(settings) - set(DEFAULTS) - {"layers", "bias_input", "attention_output"})
    if unknown:
        raise error(f"CMAI takes no {', '.join(unknown)} setting (it takes layers, {', '.join(DEFAULTS)})")
    aggregate = settings.get("aggregate", DEFAULTS["aggregate"])
    if aggregate not in AGGREGATES:
        raise error(f"CMAI aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    mask_value = settings.get("mask_value", DEFAULTS["mask_value"])
    if isinstance(mask_value, bool) or not isinstance(mask_value, numbers.Real) or not -1e30 < mask_value < 0:
        raise error(f"CMAI mask_value {mask_value!r} must be a negative finite number")
    return {**DEFAULTS, **settings}


def check_fraction(inhibit) -> float:
    """`inhibit` (the share of image tokens masked) as a float in [0, 1); None means 0 (off)."""
    if inhibit is None:
        return 0.0
    if (isinstance(inhibit, bool) or not isinstance(inhibit, numbers.Real) or not math.isfinite(inhibit)
            or not 0.0 <= inhibit < 1.0):
        raise GenerationArgumentError(f"inhibit must be a fraction in [0, 1) of the image tokens to mask "
                                      f"(0 = off), not {inhibit!r}")
    return float(inhibit)


def focus_scores(attention: np.ndarray, image_slots: np.ndarray, text_slots: np.ndarray) -> np.ndarray:
    """attention [L_c, T_b, S]: the probabilities of the T_b prompt text tokens (the queries, at key
    positions text_slots) over all S keys -> focus [L_c, K] of the K image tokens (keys image_slots).

        w_t     = sum over queries q of A[q, t], t a prompt text token, normalised   (text -> text)
        focus_j = sum_t w_t * A[t, j], j an image token                              (text -> image)

    A text token much attended to by the rest of the prompt (a content word) counts more than one that
    is not; the image tokens such words attend to are the ones in focus.
    """
    to_text = attention[:, :, text_slots]  # [L_c, T_b, T_b], causal: row q sees tokens <= q
    weights = to_text.sum(1)  # [L_c, T_b]: attention each prompt token receives from the prompt
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-12)
    to_image = attention[:, :, image_slots]  # [L_c, T_b, K]
    return np.einsum("lt,ltk->lk", weights, to_image)


def inhibition_bias(focus: np.ndarray, fraction: float, image_slots: np.ndarray, length: int, settings: dict,
                    dtype=np.float32) -> tuple[np.ndarray, int]:
    """focus [L_c, K] -> (image_bias [1, L_c, length], tokens masked per layer): mask_value at the
    floor(fraction * K) image positions of lowest focus (per layer, or shared: settings' aggregate),
    0 elsewhere. Ties break toward the earlier token (a stable sort)."""
    ranked = AGGREGATES[settings["aggregate"]](focus)
    layers, k = ranked.shape
    count = int(math.floor(fraction * k))
    bias = np.zeros((1, layers, length), dtype)
    if count:
        lowest = np.argsort(ranked, axis=-1, kind="stable")[:, :count]  # [L_c, count] image-token indices
        bias[0, np.arange(layers)[:, None], image_slots[lowest]] = settings["mask_value"]
    return bias, count


def grow(bias: np.ndarray | None, steps: int = 1) -> np.ndarray | None:
    """The bias of the next call: the same over past positions, 0 over the `steps` new tokens."""
    if bias is None:
        return None
    return np.concatenate([bias, np.zeros(bias.shape[:2] + (steps,), bias.dtype)], axis=-1)
