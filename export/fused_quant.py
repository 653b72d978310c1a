"""decoder_fused with INT4/INT8 weight-only MatMuls (MatMulNBits), for int4/int8 bundles and for CUDA's INT4.

    pipmm add-graphs INT4_BUNDLE --checkpoint CKPT --graph decoder_fused               # follows the bundle's decoder
    pipmm add-graphs FP16_BUNDLE --checkpoint CKPT --graph decoder_fused --fused-target cuda --fused-weights int4

The fused graph (export/fused.py) is built from the checkpoint in float (fp32 for an int4/int8 bundle, whose
decoder computes in fp32; the bundle's own dtype otherwise), then its weight MatMuls (packed q|k|v, o, packed
gate|up, down) are quantized with the tool the plain decoder's are (export/precision/quantize.py: ONNX
Runtime's MatMulNBitsQuantizer, symmetric round-to-nearest, block-wise along K) and the same settings, read
from the bundle's precision record of `decoder` when it is int4/int8: block_size (32), accuracy_level (4:
int8 activations per block on the CPU) and the lm_head's bits (8 in an int4 bundle, float in an int8 one).
ORT GenAI's builder (`-p int4 -e cpu`, onnxruntime-genai 0.18) writes the same MatMulNBits settings (block 32,
accuracy level 4, symmetric) and quantizes its LM head to 4 bits.

Packing does not change the quantization: blocks run along K within one output column, and packing
concatenates columns (N), so every column of W_q|W_k|W_v gets exactly the blocks and scales that W_q, W_k,
W_v get alone. The fused and the plain int4 decoders therefore hold the same integer weights; what differs
is the float work around them (fused norms, rotary, attention), which accuracy_level 4 then quantizes per
block: logits agree to about 1e-3 relative, not bit for bit (tests/test_fused_quant.py).
"""

from __future__ import annotations

import onnx

from sdk.errors import ExportError
from sdk.manifest import Manifest

from export.fused import LM_HEAD_WEIGHT
from export.precision.quantize import ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, LM_HEAD_BITS_IN_INT4, weight_only

FUSED_WEIGHTS = {"int4": 4, "int8": 8}  # weight precision -> MatMulNBits bits


def weight_settings(manifest: Manifest, weights: str | None) -> dict | None:
    """The MatMulNBits settings for the fused graph of this bundle, or None for float weights.
    weights: 'int4'/'int8', or None = the bundle decoder's own (int4/int8 bundles), else float."""
    precision = manifest.precision
    decoder = precision.graphs.get("decoder", precision.default)
    weights = weights or (decoder if decoder in FUSED_WEIGHTS else None)
    if weights is None:
        return None
    if weights not in FUSED_WEIGHTS:
        raise ExportError(f"--fused-weights {weights!r}: choose {', '.join(FUSED_WEIGHTS)}")
    bits = FUSED_WEIGHTS[weights]
    recorded = precision.details.get("decoder", {}) if decoder == weights else {}
    lm_head = recorded.get("lm_head", f"{LM_HEAD_BITS_IN_INT4}-bit" if bits == 4 else "float32")
    return {"precision": weights, "bits": bits, "block_size": int(recorded.get("block_size") or DEFAULT_BLOCK_SIZE),
            "accuracy_level": int(recorded.get("accuracy_level", ACCURACY_LEVEL[bits])),
            "lm_head_bits": int(lm_head.split("-")[0]) if lm_head[0].isdigit() else None,
            "from": "the bundle's decoder" if recorded else "defaults of export/precision/quantize.py"}


def quantize_fused(model: onnx.ModelProto, settings: dict) -> tuple[onnx.ModelProto, dict]:
    """The fused graph (in memory, before its one save: export/onnx_graphs.py export_decoder_fused) with
    MatMulNBits weights -> (the model, the manifest entry's `quantization` record)."""
    lm_head = [n.name for n in model.graph.node if n.op_type == "MatMul" and LM_HEAD_WEIGHT in n.input]
    if not lm_head:
        raise ExportError(f"no MatMul of the fused graph reads {LM_HEAD_WEIGHT}; is it export/fused.py's graph?")
    model, record = weight_only(model, settings["bits"], settings["block_size"], lm_head, settings["lm_head_bits"],
                                settings["accuracy_level"])
    left = [n.name for n in model.graph.node if n.op_type == "MatMul"
            and any(i.name == n.input[1] for i in model.graph.initializer)]
    return model, {**record, "precision": settings["precision"], "float_weight_matmuls": left,
                   "settings_from": settings["from"]}
