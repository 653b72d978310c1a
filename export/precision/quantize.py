"""FP16, INT8 and INT4 bundles from an FP32 bundle, with ONNX Runtime's own tools.

    quantize_bundle(fp32_bundle, out_dir, "int8")            # or export_bundle(..., precision="int8")

Per precision, a plan says how each graph is made (PLANS); each method is a registered function
(METHODS) that writes one graph and returns what the manifest records about it:

    fp16              onnxruntime.transformers.float16.convert_float_to_float16; the ops of keep_fp32_ops
                      (normalisations, softmax, the lm_head that makes the logits) run in FP32 behind Casts,
                      and the logits output stays float32. Inputs/outputs otherwise float16 (KV cache too).
    int8-static       onnxruntime.quantization.quantize_static, QDQ format, int8 weights symmetric per channel,
                      int8 activations symmetric per tensor (zero point 0: what TensorRT accepts), MinMax
                      calibration on image+prompt pairs run through the FP32 bundle (export.precision.calibration).
                      Only weight-carrying ops are quantized by default (Conv, MatMul with a constant B,
                      Gemm, the embedding Gather); keep_fp32_ops lists what stays float.
    int8-gather       the embedding table as int8 with one symmetric scale per row (written here with onnx:
                      no maintained tool makes it in standard ops); a lookup gathers the T rows and their
                      scales and multiplies (Gather, Cast, Mul), so it reads T*D bytes, never the V*D table.
                      QDQ on a Gather dequantizes the whole table on every call (47.7 ms per token for a
                      151936x896 table, issue 18); ONNX Runtime's GatherBlockQuantized is a contrib op
                      TensorRT cannot read. scripts/embed_lookup_bench.py measures the choices.
    int8-weight-only  MatMulNBitsQuantizer, bits=8, block-wise symmetric: decoder linear layers only.
    int4-weight-only  MatMulNBitsQuantizer, bits=4, block-wise symmetric (block_size): decoder linear layers.

The MatMulNBits encoding is an ONNX Runtime contrib op (domain com.microsoft): such graphs run on
ONNX Runtime only. TensorRT reads weight-only INT4 as DequantizeLinear (opset 21, int4, block_size
attribute) feeding a MatMul instead; see docs/precision.md. The manifest records, per graph, the
encoding and the runtimes it serves, and `precision.tensorrt` says whether the whole bundle does.

The output is written through sdk.bundle.staged_bundle: a temporary sibling directory renamed into place at
the end, with the manifest derived from the source's (dataclasses.replace).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

import sdk
from sdk.bundle import load_bundle, refuse_existing, staged_bundle
from sdk.errors import ExportError
from sdk.manifest import Created, Graph, Precision

from export.precision import calibration
from export.precision.embedding import int8_gather
from export.onnx_graphs import EXTERNAL_DATA_BYTES, describe_graph, save_graph

from onnxruntime.quantization import CalibrationDataReader  # noqa: E402  (the workstation side has onnxruntime)

# The quantizers log every node at INFO and suggest pre-processing at WARNING: noise for a CLI user.
logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
INT8_DECODER = ("static", "weight-only")
# ONNX Runtime CPU, measured with scripts/precision_table.py (docs/precision.md says why): weight-only is
# as accurate as fp32 and faster at decode, where static activation QDQ costs accuracy on the decoder.
DEFAULT_INT8_DECODER = "weight-only"
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits' accuracy_level (a hint to the kernel; 0 = compute in the input's float type, 4 = int8 compute:
# ONNX Runtime CPU quantizes activations per block on the fly). Measured on ORT CPU (docs/precision.md), decode
# step of the default model's decoder: 8 bits 2.3-3.7 ms at level 0, 0.5-0.8 ms at 4; 4 bits 0.93 ms at 0,
# 0.51 ms at 4 (fp32 0.6-1.1 ms), for a logits error barely above level 0's.
ACCURACY_LEVEL = {8: 4, 4: 4}

# Pseudo op types usable in keep_fp32_ops besides real ONNX op types:
#   lm_head    the node that makes the `logits` output (vocabulary projection)
#   attention  MatMuls of two activations (Q.K^T and P.V); their inputs change every request
#   rope       the rotary-embedding angles (position x inverse frequency, up to Cos/Sin): in float16 an angle of
#              300 rad is rounded to 0.25 rad, which turns positions into noise (transformers computes them in fp32)
#   prompt_mlp the PIP-MM prompt MLP in the vision graph (nodes reading prompt_mlp.* weights): it makes the
#              T-CLS query that conditions the whole ViT, from a prompt vector with outliers; tiny, so kept float
PSEUDO_OPS = ("lm_head", "attention", "rope", "prompt_mlp")
KEEP_FP32_DEFAULT = {
    "fp16": ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Softmax", "lm_head", "rope"),
    "int8": ("LayerNormalization", "Softmax", "Add", "Mul", "Sigmoid", "lm_head", "attention", "prompt_mlp"),
}
# int4: the lm_head is not kept in float32 but quantized to 8 bits (still above the 4 of the other linears):
# in a small model it is a large share of the decoder's weights. "lm_head" in the list keeps it float32.
KEEP_FP32_DEFAULT["int4"] = tuple(t for t in KEEP_FP32_DEFAULT["int8"] if t != "lm_head")
LM_HEAD_BITS_IN_INT4 = 8
# Op types static QDQ may quantize, per graph; everything else stays float whatever the keep list says.
STATIC_OPS = {
    "vision": ("Conv", "MatMul", "Gemm", "LayerNormalization", "Softmax", "Add", "Mul", "Sigmoid"),
    "embed": ("Gather",),
    "decoder": ("MatMul", "Gemm", "Softmax", "Add", "Mul", "Sigmoid"),
}

PLANS = {  # precision -> graph -> method
    "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
    "int8": {"vision": "int8-static", "embed": "int8-gather", "decoder": None},  # None: --int8-decoder
    "int4": {"vision": "int8-static", "embed": "int8-gather", "decoder": "int4-weight-only"},
}
METHOD_PRECISION = {"fp16": "fp16", "int8-static": "int8", "int8-gather": "int8", "int8-weight-only": "int8", "int4-weight-only": "int4"}


class PrecisionError(ExportError):
    """A precision option does not fit (unknown precision, bad block size, ...)."""


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _lm_head_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if "logits" in n.output]


def _prompt_mlp_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if any(i.startswith("prompt_mlp.") for i in n.input)]


def _attention_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose B is not a weight (Q.K^T, P.V). By name: quantize_static's MatMulConstBOnly option is read
    by the QOperator quantizer only, and in QDQ format these MatMuls would otherwise be quantized, softmax
    probabilities included (most of them round to 0 at a per-tensor int8 step of 1/127)."""
    weights = {i.name for i in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def _rope_nodes(model: onnx.ModelProto) -> list[str]:
    """Cos/Sin and every node they are computed from (Cast of position_ids, Mul by inv_freq, Concat, ...)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found, stack = {}, [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while stack:
        node = stack.pop()
        if node.name not in found:
            found[node.name] = node
            stack += [producer[i] for i in node.input if i in producer]
    return [n.name for n in model.graph.node if n.name in found]


def _kept_nodes(model: onnx.ModelProto, keep) -> list[str]:
    return (_lm_head_nodes(model) if "lm_head" in keep else []) + \
        (_prompt_mlp_nodes(model) if "prompt_mlp" in keep else []) + \
        (_attention_nodes(model) if "attention" in keep else [])


def _gemm_as_matmul(model: onnx.ModelProto, node_name: str) -> bool:
    """Gemm(A, W, transB=1) with a constant W -> MatMul(A, W^T) (+ Add C): MatMulNBits quantizes MatMuls only."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next((n for n in model.graph.node if n.name == node_name and n.op_type == "Gemm"), None)
    if node is None or node.input[1] not in inits:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return False
    weight = onnx.numpy_helper.to_array(inits[node.input[1]])
    if attrs.get("transB", 0):
        weight = weight.T
    new_w = onnx.numpy_helper.from_array(np.ascontiguousarray(weight), node.input[1] + "_matmul")
    model.graph.initializer.append(new_w)
    has_bias = len(node.input) > 2 and node.input[2]
    out = node.output[0]
    matmul = onnx.helper.make_node("MatMul", [node.input[0], new_w.name], [out + "_nobias" if has_bias else out],
                                   name=node_name)
    replacement = [matmul]
    if has_bias:
        replacement.append(onnx.helper.make_node("Add", [matmul.output[0], node.input[2]], [out],
                                                 name=node_name + "_bias"))
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for k, new in enumerate(replacement):
        model.graph.node.insert(index + k, new)
    if not any(node.input[1] in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[node.input[1]])
    return True


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _encoding_runtimes(model: onnx.ModelProto) -> list[str]:
    custom = {n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    return ["onnxruntime"] if custom else ["onnxruntime", "tensorrt"]


# ----------------------------------------------------------------------------- methods

def to_fp16(name: str, src: Path, dst: Path, ctx: dict) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = _load(src)
    keep = ctx["keep"]
    op_block = sorted(t for t in keep if t not in PSEUDO_OPS)
    node_block = (_lm_head_nodes(model) if "lm_head" in keep else []) + (_rope_nodes(model) if "rope" in keep else [])
    keep_io = ["logits"] if any(o.name == "logits" for o in model.graph.output) else []
    model = convert_float_to_float16(model, keep_io_types=keep_io, op_block_list=op_block, node_block_list=node_block)
    # The converter adds one Cast per (tensor, blocked consumer): a tensor read by two blocked nodes gets two
    # identical Casts with one output name, which ONNX forbids. Keep the first; then restore topological order
    # (the Casts are appended at the end).
    seen, nodes = set(), []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _skip_float16_round_trips(model)
    OnnxModel(model).topological_sort()
    save_graph(model, dst)
    return {"tool": f"onnxruntime.transformers.float16.convert_float_to_float16 (onnxruntime {ort_version()})",
            "method": "float16 weights and activations; kept ops run in float32 behind Cast nodes",
            "block_size": None, "kept_float": {"op_types": op_block, "nodes": node_block},
            "float32_outputs": keep_io,
            "encoding": "float16 initializers and tensors (ai.onnx), Cast around float32 ops"}


def _skip_float16_round_trips(model: onnx.ModelProto) -> int:
    """float32 -> Cast(fp16) -> Cast(fp32): read the float32 tensor directly.

    The converter wraps each kept op separately, so a chain of kept ops (RMSNorm's Pow -> ReduceMean) passes
    through float16 between them: x^2 of a 300-valued activation (LLMs have a few such "massive activations")
    overflows to inf there and the logits turn NaN. Reading the float32 tensor instead only removes rounding.
    """
    dtypes = {v.name: v.type.tensor_type.elem_type
              for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    dtypes.update({i.name: i.data_type for i in model.graph.initializer})
    to = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    replace = {}
    for node in model.graph.node:
        if node.op_type != "Cast" or node.input[0] not in to:
            continue
        first = to[node.input[0]]
        target = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
        middle = onnx.helper.get_attribute_value(next(a for a in first.attribute if a.name == "to"))
        if (middle == onnx.TensorProto.FLOAT16 and target == onnx.TensorProto.FLOAT
                and dtypes.get(first.input[0]) == onnx.TensorProto.FLOAT):
            replace[node.output[0]] = first.input[0]
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replace and replace[name] not in outputs | {name}:
                node.input[i] = replace[name]
    used = {i for n in model.graph.node for i in n.input} | outputs
    dead = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    while dead:
        for node in dead:
            model.graph.node.remove(node)
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    return len(replace)


class _Feeds(CalibrationDataReader):
    """Recorded feeds as onnxruntime.quantization's calibration reader."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def int8_static(name: str, src: Path, dst: Path, ctx: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = _load(src)
    keep = ctx["keep"]
    present = _op_types(model)
    op_types = [t for t in STATIC_OPS[name] if t in present and t not in keep]
    exclude = _kept_nodes(model, keep)
    if not op_types:
        shutil.copyfile(src, dst)
        return {"precision": "fp32", "tool": None, "method": "nothing to quantize: every candidate op is kept",
                "block_size": None, "kept_float": {"op_types": sorted(keep), "nodes": []}, "encoding": "float32"}
    feeds = ctx["feeds"]()[name]
    with _QuietRoot():
        quantize_static(str(src), str(dst), _Feeds(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        # 7-bit weights: on x86 without VNNI (AVX2) ONNX Runtime's int8 GEMM adds pairs of
                        # u8 x s8 products in int16 (vpmaddubsw), which saturates for 8-bit weights (255 * 127 * 2 >
                        # 32767), so the graphs' error depended on the CPU (tests/test_precision.py: T-CLS attention
                        # 0.22 from fp32 on an AVX2 EPYC, 0.048 with 7 bits; 255 * 64 * 2 < 32767 never saturates)
                        per_channel=True, reduce_range=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=src.stat().st_size > EXTERNAL_DATA_BYTES,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "MatMulConstBOnly": "attention" in keep, "CalibTensorRangeSymmetric": True,
                                       # a Q/DQ pair for each consumer: ONNX Runtime fuses DQ -> MatMul -> Q into
                                       # QLinearMatMul only where the pair is the MatMul's own (the ViT's q/k/v
                                       # share one input: 24 of m21's 50 weight MatMuls ran DQ + fp32 MatMul); the
                                       # runtime keeps the pairs apart (runtimes/onnxruntime.py QDQ_KEEP_PAIRS)
                                       "DedicatedQDQPair": True,
                                       # biases stay float: TensorRT dequantizes INT8/INT4/FP8, not int32
                                       "QuantizeBias": False})
    return {"tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort_version()})",
            "method": "static, QDQ; weights int8 symmetric per channel in a 7-bit range (reduce_range: exact on "
                      "x86 with or without VNNI); activations int8 symmetric per tensor; MinMax calibration",
            "block_size": None, "quantized_op_types": op_types,
            "kept_float": {"op_types": sorted(t for t in keep if t not in PSEUDO_OPS),
                           "nodes": exclude, "attention_matmuls": "attention" in keep},
            "calibration": {**ctx["calibration"], "feeds": len(feeds)},
            "encoding": "QDQ: QuantizeLinear/DequantizeLinear (ai.onnx), int8, zero point 0, "
                        + ("one scale for the embedding table" if name == "embed" else
                           "per-output-channel weight scales, per-tensor activation scales, float biases")}


def _nbits_module():
    # Importing it calls logging.basicConfig(level=INFO) on the root logger: undo that for the caller's process.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.setLevel(level)
    for handler in root.handlers[len(handlers):] if root.handlers[:len(handlers)] == handlers else []:
        root.removeHandler(handler)
    return matmul_nbits_quantizer


class _QuietRoot:
    """quantize_static advises pre-processing through the root logger at WARNING, every call."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def matmul_nbits(model: onnx.ModelProto, bits: int, block: int, exclude=(), include=None,
                  accuracy_level: int | None = None) -> onnx.ModelProto:
    nbits = _nbits_module()
    level = ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits, accuracy_level=level,
                                                op_types_to_quantize=("MatMul",))
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=level,
                                           nodes_to_exclude=list(exclude), nodes_to_include=include,
                                           op_types_to_quantize=("MatMul",), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def weight_only(model: onnx.ModelProto, bits: int, block: int, lm_head: list[str], lm_head_bits: int | None = None,
                accuracy_level: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """MatMulNBits (bits, block-wise along K) over every MatMul with a constant weight except the `lm_head` nodes,
    which get lm_head_bits (None: they stay float) -> (the model, what the manifest records about it). The plain
    decoder's int4/int8 (METHODS) and decoder_fused's weights (export/fused_quant.py) both come from here."""
    level = ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level
    model = matmul_nbits(model, bits, block, exclude=lm_head, accuracy_level=level)
    if lm_head_bits:
        model = matmul_nbits(model, lm_head_bits, block, include=lm_head, accuracy_level=level)
    return model, {"tool": f"onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer "
                           f"(onnxruntime {ort_version()})",
                   "method": f"weight-only, round-to-nearest, {bits}-bit symmetric, block-wise along K",
                   "bits": bits, "block_size": block, "accuracy_level": level,
                   "quantized_nodes": sum(n.op_type == "MatMulNBits" for n in model.graph.node),
                   "lm_head": f"{lm_head_bits}-bit MatMulNBits, block_size={block}" if lm_head_bits else "float32"}


def _weight_only(bits: int):
    def method(name: str, src: Path, dst: Path, ctx: dict) -> dict:
        model = _load(src)
        block = ctx["block_size"]
        lm_head = _lm_head_nodes(model)
        # int4: the lm_head at LM_HEAD_BITS_IN_INT4 where it is (or can be made) a MatMul; int8: it stays float
        lm_head_bits = LM_HEAD_BITS_IN_INT4 if bits == 4 and "lm_head" not in ctx["keep"] and \
            all(_gemm_as_matmul(model, n) for n in lm_head) else None
        model, record = weight_only(model, bits, block, lm_head, lm_head_bits)
        save_graph(model, dst)
        return {**record, "kept_float": {"op_types": ["everything but MatMul with a constant weight"],
                                         "nodes": [] if lm_head_bits else lm_head},
                "encoding": f"MatMulNBits (com.microsoft), bits={bits}, block_size={block}: ONNX Runtime only; "
                            f"TensorRT needs DequantizeLinear(int{bits}, block_size={block}, opset 21) -> MatMul"}
    return method


# graph method -> fn(graph name, src graph, dst graph, ctx) -> manifest details
METHODS = {"fp16": to_fp16, "int8-static": int8_static, "int8-gather": int8_gather,
           "int8-weight-only": _weight_only(8), "int4-weight-only": _weight_only(4)}


# ----------------------------------------------------------------------------- bundle

def plan(precision: str, int8_decoder: str = DEFAULT_INT8_DECODER, int8_vision: bool = False) -> dict[str, str]:
    """graph -> method. int8_vision: an fp16 bundle whose vision graph is static int8 (the ViT is most of a small
    model's weights; the decoder stays fp16, so optional graphs that borrow its weights can still be added)."""
    if precision not in PLANS:
        raise PrecisionError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if int8_decoder not in INT8_DECODER:
        raise PrecisionError(f"--int8-decoder must be one of {', '.join(INT8_DECODER)}, got {int8_decoder!r}")
    chosen = dict(PLANS[precision])
    if chosen["decoder"] is None:
        chosen["decoder"] = f"int8-{int8_decoder}"
    if int8_vision:
        if precision != "fp16":
            raise PrecisionError(f"--int8-vision is an fp16 bundle's option (a {precision} bundle's vision graph is "
                                 f"{chosen['vision']} already)")
        chosen["vision"] = "int8-static"
    return chosen


def check_options(precision: str, block_size: int = DEFAULT_BLOCK_SIZE, int8_decoder: str = DEFAULT_INT8_DECODER,
                  keep_fp32_ops=None, calibration_set=None, int8_vision: bool = False) -> tuple[dict, tuple[str, ...]]:
    """(graph -> method, keep list) or PrecisionError, before anything is exported or written."""
    if precision == "fp32":
        if int8_vision:
            raise PrecisionError("--int8-vision is an fp16 bundle's option: add --precision fp16")
        return {}, ()
    methods = plan(precision, int8_decoder, int8_vision)
    if calibration_set is not None and "int8-static" not in methods.values():
        raise PrecisionError(f"--calibration applies to static int8 graphs and a {precision} bundle has "
                             "no static int8 graph: leave it out")
    if block_size < 16 or block_size & (block_size - 1):
        raise PrecisionError(f"--block-size must be a power of two >= 16 (MatMulNBits), got {block_size}")
    keep = KEEP_FP32_DEFAULT[precision] if keep_fp32_ops is None else tuple(keep_fp32_ops)
    if keep in (("none",), ("",)):
        keep = ()
    return methods, tuple(keep)


def needs_calibration(precision: str, int8_decoder: str = DEFAULT_INT8_DECODER, int8_vision: bool = False) -> bool:
    return precision != "fp32" and "int8-static" in plan(precision, int8_decoder, int8_vision).values()


def quantize_bundle(src: str | Path, out_dir: str | Path, precision: str, calibration_set=None,
                    calibration_size: int = calibration.DEFAULT_SIZE, block_size: int = DEFAULT_BLOCK_SIZE,
                    int8_decoder: str = DEFAULT_INT8_DECODER, keep_fp32_ops=None, overwrite: bool = False,
                    progress: bool = True, pairs=None, int8_vision: bool = False) -> Path:
    """Write `out_dir`, the FP32 bundle `src` at `precision`. `pairs` = calibration.load_pairs(...) if already read."""
    src, out_dir = Path(src), Path(out_dir)
    methods, keep = check_options(precision, block_size, int8_decoder, keep_fp32_ops, calibration_set, int8_vision)
    if precision == "fp32":
        raise PrecisionError("quantize_bundle makes fp16, int8 or int4 bundles; an fp32 bundle is `pipmm export`'s")
    refuse_existing(out_dir, overwrite)
    source = load_bundle(src, verify=True)
    if source.manifest.precision.default != "fp32":
        raise PrecisionError(f"{src} is a {source.manifest.precision.default} bundle: quantize from fp32")
    calib_info = None
    if "int8-static" in methods.values() and pairs is None:
        pairs, calib_info = calibration.load_pairs(calibration_set, calibration_size)  # errors before any write
    elif pairs is not None:
        pairs, calib_info = pairs
    recorded = {}

    def feeds():
        if not recorded:
            recorded.update(calibration.record_feeds(src, pairs, progress=progress))
        return recorded

    ctx = {"keep": keep, "block_size": block_size, "feeds": feeds, "calibration": calib_info}
    with staged_bundle(out_dir, overwrite) as stage:
        details, dropped, graphs = {}, {}, {}
        for name, spec in source.graphs.items():
            method = methods.get(name)
            if method is None:  # an optional graph (pipmm add-graphs): traced per precision, not converted here
                dropped[name] = ("not carried over: add it to this bundle with `pipmm add-graphs` where that "
                                 "supports the precision (fp32, fp16, bf16)")
                continue
            src_path, dst_path = source.graph_path(name), stage.directory / spec.file
            start = time.perf_counter()
            # a graph at another precision than the bundle's (--int8-vision) keeps that precision's default ops
            # in float unless --keep-fp32-ops was given
            graph_keep = keep if keep_fp32_ops is not None or METHOD_PRECISION[method] == precision else \
                KEEP_FP32_DEFAULT[METHOD_PRECISION[method]]
            info = METHODS[method](name, src_path, dst_path, {**ctx, "keep": graph_keep})
            model = onnx.load(str(dst_path), load_external_data=False)
            details[name] = {"precision": info.pop("precision", METHOD_PRECISION[method]), "method_name": method,
                             **info, "runtimes": _encoding_runtimes(model),
                             "from_fp32_sha256": source.manifest.files[spec.file].sha256,
                             "seconds": round(time.perf_counter() - start, 2)}
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), spec.opset)
            graphs[name] = Graph.from_dict({"file": spec.file, **describe_graph(dst_path), "opset": opset}, name,
                                           str(dst_path))
        shutil.copyfile(source.tokenizer_path, stage.directory / source.manifest.tokenizer)
        precision_record = Precision(default=precision, graphs={name: d["precision"] for name, d in details.items()},
                                     tensorrt=all("tensorrt" in d["runtimes"] for d in details.values()),
                                     details=details, dropped_graphs=dropped)
        made = replace(source.manifest.created or Created(), by=f"pipmm-edge {sdk.__version__}",
                       time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), from_fp32_bundle=str(src))
        stage.publish(replace(source.manifest, graphs=graphs, precision=precision_record, created=made))
    return out_dir


def weight_bytes(graph: Path) -> int:
    """Bytes of a graph's initializers (the weights), as stored."""
    model = onnx.load(str(graph), load_external_data=True)
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
