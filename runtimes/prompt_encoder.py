"""Which graph ONNX Runtime runs for PIP-MM's prompt pass when the bundle has its own prompt encoder.

    prompt_encoder        the first L decoder layers (manifest prompt_vector.encoder_layers), traced
    prompt_encoder_fused  the same as ONNX Runtime's fused contrib ops: run where decoder_fused runs (CPU)
    neither               the decoder graph is the prompt encoder (sdk/prompt_pass.py), as before

PIPMM_PROMPT_ENCODER=decoder runs the decoder for the prompt pass even when the bundle has a prompt encoder (what
scripts/prompt_pass_bench.py compares against). Both take inputs_embeds [B,T,D], attention_mask [B,T] (ones) and position_ids [B,T] (0..T-1) and give
hidden [B,T,D], the decoder's `hidden` output over the same prompt.
"""

from __future__ import annotations

import os

import numpy as np

from .decoder_flavour import FUSED_DECODER

PROMPT_ENCODER = "prompt_encoder"
PROMPT_ENCODER_FUSED = "prompt_encoder_fused"


def choose_prompt_encoder(bundle, decoder_graph: str) -> tuple[str | None, str | None]:
    """-> (graph to run or None, why not the fused one / why none: for info())."""
    graphs = bundle.graphs
    if os.environ.get("PIPMM_PROMPT_ENCODER", "auto") == "decoder":
        return None, "PIPMM_PROMPT_ENCODER=decoder: the decoder is the prompt encoder"
    if decoder_graph == FUSED_DECODER and PROMPT_ENCODER_FUSED in graphs:
        return PROMPT_ENCODER_FUSED, None
    if PROMPT_ENCODER in graphs:
        note = None if PROMPT_ENCODER_FUSED not in graphs else f"{PROMPT_ENCODER_FUSED} runs where {FUSED_DECODER} does"
        return PROMPT_ENCODER, note
    if PROMPT_ENCODER_FUSED in graphs:  # fused only, but the plain decoder runs: keep the flavours together
        return None, f"{PROMPT_ENCODER_FUSED} runs with {FUSED_DECODER}; this backend runs {decoder_graph}"
    return None, "no prompt_encoder graph: the decoder is the prompt encoder"


def run_prompt_encoder(session, inputs_embeds: np.ndarray, dtype) -> np.ndarray:
    """[B,T,D] prompt embeddings -> hidden [B,T,D] at the prompt layer (a fresh pass: positions 0..T-1)."""
    b, t, _ = inputs_embeds.shape
    feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype),
             "attention_mask": np.ones((b, t), np.int64),
             "position_ids": np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()}
    return session.run(["hidden"], feeds)[0]
