"""Every operator of every exported graph is one TensorRT 10's ONNX parser supports (fact table in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

TABLE = json.loads((Path(__file__).parent / "data" / "tensorrt10-onnx-operators.json").read_text())["operators"]
# Operators whose listed restriction is "`axes` must be an initializer / a constant tensor", and the
# input index that holds axes in opset 18.
AXES_INPUT = {"ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "ReduceMin": 1, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1}


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


@pytest.mark.parametrize("options", [dict(), dict(pipmm=True, budget="half", reducer="prompt-topk"),
                                     dict(pipmm=True, budget="half", reducer="pool"), dict(arch="qwen2"),
                                     dict(pipmm=True, budget="quarter", reducer="merge")],
                         ids=["plain", "pipmm-topk", "pipmm-pool", "qwen2", "pipmm-merge"])
def test_every_operator_is_supported_by_tensorrt(options, bundles):
    bundle = bundles(**options)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, spec in manifest["graphs"].items():
        model = onnx.load(str(bundle / spec["file"]), load_external_data=False)
        assert spec["opset"] <= 20, "the TensorRT 10 parser covers opsets 9-20"
        constants = _constants(model.graph)
        for node in model.graph.node:
            if node.op_type == "Constant":
                continue
            assert node.domain in ("", "ai.onnx"), f"{name}: custom-domain op {node.domain}:{node.op_type}"
            entry = TABLE.get(node.op_type)
            assert entry and entry["supported"], f"{name}: {node.op_type} is not supported by TensorRT 10"
            index = AXES_INPUT.get(node.op_type)
            if index is not None and len(node.input) > index and node.input[index]:
                assert node.input[index] in constants, f"{name}: {node.op_type} axes must be constant"
