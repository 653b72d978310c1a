"""int8-gather: the embedding table as int8 rows with one symmetric scale per row (export/precision/quantize.py's
method for the embed graph of int8 and int4 bundles; docs/precision.md). A lookup gathers the T rows and their
scales and multiplies, in standard ops (Gather, Cast, Mul) that TensorRT reads too, so one token costs T*D work,
never the V*D table that a QDQ Gather dequantizes on every call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from export.onnx_graphs import save_graph
from sdk.errors import ExportError


def int8_gather(name: str, src: Path, dst: Path, ctx: dict) -> dict:
    """The graph's one Gather of a constant [V,D] float table -> int8 rows [V,D] and float scales [V,1]:
    out [B,T,D] = Cast(Gather(rows, ids)) * Gather(scales, ids)."""
    model = onnx.load(str(src), load_external_data=True)
    tables = {i.name: i for i in model.graph.initializer if len(i.dims) == 2}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    if len(gathers) != 1:
        raise ExportError(f"int8-gather needs exactly one Gather of a constant table in {name}, found "
                             f"{len(gathers)}: quantize this graph with another method")
    node = gathers[0]
    table = onnx.numpy_helper.to_array(tables[node.input[0]]).astype(np.float32)
    scales = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scales[scales == 0] = 1.0  # an all-zero row (padding) stays zero with any scale
    rows = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
    model.graph.initializer.remove(tables[node.input[0]])
    prefix = node.input[0]
    model.graph.initializer.extend([onnx.numpy_helper.from_array(rows, f"{prefix}.int8_rows"),
                                    onnx.numpy_helper.from_array(scales.astype(np.float32), f"{prefix}.row_scales")])
    ids, out = node.input[1], node.output[0]
    lookup = [
        onnx.helper.make_node("Gather", [f"{prefix}.int8_rows", ids], [f"{out}.int8"], name=f"{node.name}.rows"),
        onnx.helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], to=onnx.TensorProto.FLOAT,
                              name=f"{node.name}.cast"),
        onnx.helper.make_node("Gather", [f"{prefix}.row_scales", ids], [f"{out}.scale"], name=f"{node.name}.scales"),
        onnx.helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out], name=f"{node.name}.dequantize"),
    ]
    at = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, new in enumerate(lookup):
        model.graph.node.insert(at + offset, new)
    onnx.checker.check_model(model)
    save_graph(model, dst)
    error = float(np.abs(rows.astype(np.float32) * scales - table).max())
    return {"tool": f"onnx {onnx.__version__} (export/precision/embedding.py int8_gather)",
            "method": "weight-only: int8 rows, symmetric, one scale per row (max |w| / 127)",
            "block_size": None, "kept_float": {"op_types": [], "nodes": []}, "max_abs_error": error,
            "encoding": "Gather(int8 rows) -> Cast -> Mul(Gather(row scales)): standard ops, reads only the "
                        "looked-up rows"}
