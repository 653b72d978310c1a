"""energy_grad stitched from pieces (export/energy_stitch.py): one middle-layer piece reused for several layers, each
with its own weights stored once in the decoder's layout, against torch autograd at a length other than the trace's."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from export.model.checkpoint import load_checkpoint  # noqa: E402
from export.model.energy import EnergyGradGraph  # noqa: E402
from export.onnx_graphs import WEIGHT_BYTES, export_energy_grad  # noqa: E402
from export.synthetic import build_tiny_llava  # noqa: E402
from helpers import assert_energy_grad_matches_autograd  # noqa: E402


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """A tiny Qwen2 (biased q/k/v) of 3 layers and its energy_grad: layers 0 and 1 the middle piece, 2 the last."""
    root = tmp_path_factory.mktemp("stitch")
    checkpoint = load_checkpoint(build_tiny_llava(root / "ckpt", arch="qwen2", seed=5, text_layers=3))
    graph = EnergyGradGraph(checkpoint.language_model, checkpoint.config.text_config).eval()
    export_energy_grad(graph, root / "energy_grad.onnx", {})
    return graph, root / "energy_grad.onnx"


def test_stitched_graph_matches_torch_autograd(three_layers):
    import onnxruntime

    graph, path = three_layers
    rng = np.random.default_rng(1)
    t, d = 13, graph.text_config.hidden_size
    feeds = {"inputs_embeds": rng.normal(0, 1, (1, t, d)).astype(np.float32),
             "position_ids": (np.arange(t) + np.r_[np.zeros(8), np.full(5, 3)]).astype(np.int64)[None],
             "mask": np.r_[0, 0, 0.4, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0].astype(np.float32),
             "image_weight": np.r_[0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0].astype(np.float32),
             "query_weights": np.r_[np.zeros(8), np.full(5, 0.2)].astype(np.float32),
             "layer_weights": np.array([0.5, 0.2, 0.3], np.float32)}  # each layer's term weighted differently
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_e, got_g = session.run(None, feeds)
    assert_energy_grad_matches_autograd(
        got_e, got_g, lambda x: graph.energy(x, *(torch.tensor(feeds[k]) for k in graph.input_names[1:])),
        feeds["inputs_embeds"])


def test_every_weight_once_in_the_decoders_layout(three_layers):
    """Layers 0-1: q, k, v, o, gate, up, down; layer 2 (the last the energy reads): q, k only. Each matrix stored
    once, as W^T (the decoder graph's folded layout), and no two layers share a piece's weights by mistake."""
    graph, path = three_layers
    model = onnx.load(str(path))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if onnx.numpy_helper.to_array(t).nbytes >= WEIGHT_BYTES}
    digests = [hashlib.sha256(a.tobytes()).hexdigest() for a in stored.values()]
    assert len(set(digests)) == len(digests) == 7 + 7 + 2
    layers = graph.energy.language_model.layers
    for i, name in [(0, "self_attn.q_proj.weight"), (1, "mlp.down_proj.weight"), (2, "self_attn.k_proj.weight")]:
        want = dict(layers[i].named_parameters())[name].detach().numpy().T
        np.testing.assert_array_equal(stored[f"layers.{i}.{name}.T"], want)
