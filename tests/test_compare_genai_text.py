"""scripts/compare_genai.py's text model (GenAI's builder input) and export/onnx_graphs.py's save_graph sizing, the
two steps that broke at 7B widths (scripts/gpu_speed.py --preset llava-1.5-7b-2l --device cpu)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export import onnx_graphs
from export.model.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare_genai import extract_text_model  # noqa: E402


def test_text_model_is_the_llavas_language_model_in_its_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    from export.synthetic import build_random_checkpoint

    ckpt = build_random_checkpoint(tmp_path / "ckpt", "ci-tiny", dtype=torch.float16, device="cpu")
    extract_text_model(ckpt, tmp_path / "text")
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype="auto")
    llava = load_checkpoint(ckpt, dtype=torch.float16)
    assert text.dtype == torch.float16  # a 7B FP16 checkpoint's text model stays 13.5 GB, not 27 GB of FP32
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        got, want = text(ids).logits.float(), llava.model(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=1e-2)


def test_save_graph_sizes_by_initializer_bytes(tmp_path, monkeypatch):
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # 16 KiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph)
    onnx_graphs.save_graph(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 8 << 10)  # a 7B graph's case, scaled down
    onnx_graphs.save_graph(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == 64 * 64 * 4
    loaded = onnx.load(str(tmp_path / "big.onnx"))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.ones((64, 64), np.float32))
