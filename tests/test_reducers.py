from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

import re

from export.model.checkpoint import load_checkpoint
from export.model.prompt import PromptMLP
from export.model.reducers import (REDUCERS, FullReducer, PromptTopKReducer, make_reducer, pool_matrix,
                                   reducer_options, resolve_budget, visual_positions_for)
from export.onnx_graphs import describe_graph, export_vision
from export.writer import build_modules
from sdk import cli
from sdk.errors import ExportError


@pytest.mark.parametrize("budget,n,k", [("full", 576, 576), ("half", 576, 288), ("half", 49, 25), ("quarter", 576, 144),
                                        (10, 49, 10), ("7", 49, 7)])
def test_resolve_budget(budget, n, k):
    assert resolve_budget(budget, n) == k


@pytest.mark.parametrize("budget", ["most", 0, 50, -1, None])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ExportError):
        resolve_budget(budget, 49)


@pytest.mark.parametrize("h,w,k", [(24, 24, 288), (24, 24, 144), (7, 7, 25), (7, 7, 13), (16, 16, 128), (5, 3, 7)])
def test_pool_matrix_averages_disjoint_cells_covering_every_patch(h, w, k):
    m = pool_matrix(h, w, k)
    assert m.shape == (k, h * w)
    torch.testing.assert_close(m.sum(1), torch.ones(k))  # each output is an average
    assert ((m > 0).sum(0) == 1).all()  # every patch in exactly one cell


def test_quarter_budget_pools_2x2_squares():
    m = pool_matrix(24, 24, 144)
    first = m[0].nonzero().flatten().tolist()
    assert first == [0, 1, 24, 25]


def test_prompt_topk_keeps_the_most_attended_patches_in_original_order():
    tokens = torch.arange(10.0).view(1, 10, 1).expand(2, 10, 3)
    attention = torch.tensor([[0, 9, 1, 8, 2, 7, 3, 6, 4, 5], [9, 0, 0, 0, 0, 0, 0, 0, 8, 7]], dtype=torch.float)
    out, kept = PromptTopKReducer(2, 5, 3)(tokens, attention)
    assert out[0, :, 0].tolist() == [1, 3, 5]
    assert out[1, :, 0].tolist() == [0, 8, 9]
    assert kept.tolist() == [[1, 3, 5], [0, 8, 9]] and kept.dtype == torch.int64


def test_prompt_topk_breaks_ties_by_the_lower_patch_index():
    tokens = torch.arange(10.0).view(1, 10, 1).expand(3, 10, 2)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 2, 1, 1, 2, 1, 1, 1, 0, 1],
                              [0, 0, 0, 0, 0, 0, 0, 5, 5, 5]], dtype=torch.float)
    out, kept = PromptTopKReducer(2, 5, 4)(tokens, attention)
    assert kept.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [0, 7, 8, 9]]
    assert out[:, :, 0].tolist() == kept.float().tolist()


def _run_onnx(module, args, names, tmp_path):
    path = tmp_path / "graph.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=18, input_names=names,
                                    dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: arg.numpy() for name, arg in zip(names, args)})


def test_exported_prompt_topk_keeps_the_same_patches_as_torch_on_ties(tmp_path):
    """torch.topk and ONNX's TopK break ties differently; the reducer's own rule is exported with it."""
    torch.manual_seed(0)
    tokens = torch.randn(3, 49, 4)
    attention = torch.rand(3, 49)
    attention[0, 10:40] = 0.9  # 30 tied scores among the highest
    attention[1] = 1 / 49  # every score tied
    attention[2, ::2] = 0.01  # 25 tied scores among the lowest
    reducer = PromptTopKReducer(7, 7, 25)
    want_tokens, want_kept = reducer(tokens, attention)
    got_tokens, got_kept = _run_onnx(reducer, (tokens, attention), ["tokens", "cls_attention"], tmp_path)
    np.testing.assert_array_equal(got_kept, want_kept.numpy())
    np.testing.assert_array_equal(got_tokens, want_tokens.numpy())
    assert want_kept[1].tolist() == list(range(25))  # all tied: the first 25 patches


def test_unknown_reducer_is_refused():
    with pytest.raises(ExportError, match="pool"):
        make_reducer("magic", 7, 7, 25)


def test_each_reducer_declares_its_facts():
    assert list(REDUCERS) == ["pool", "prompt-topk", "merge"]
    assert all(name == cls.name for name, cls in REDUCERS.items())
    topk = REDUCERS["prompt-topk"]
    assert topk.positions == ("sequence", "patch") and topk.keeps_patches and topk.options == {}
    for cls in (REDUCERS["pool"], REDUCERS["merge"], FullReducer):
        assert cls.positions == ("sequence",) and not cls.keeps_patches
    assert reducer_options("merge") == {"primary_ratio": 0.5, "iterations": 2}
    assert visual_positions_for(topk, None) == "sequence" and visual_positions_for(topk, "patch") == "patch"
    with pytest.raises(ExportError, match="do not apply to reducer 'merge': choose sequence$"):
        visual_positions_for(REDUCERS["merge"], "patch")


@pytest.mark.parametrize("verb", ["export", "train", "eval"])
def test_cli_reducer_choices_are_the_registry(verb, capsys):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    listed = re.search(r"--reducer \{([^}]*)\}", capsys.readouterr().out).group(1)
    assert listed.split(",") == list(REDUCERS)


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
def test_vision_graph_reports_the_patches_it_gathered(checkpoints, prompt_mlp, tmp_path, tied):
    """kept_patches [B,K] of the exported graph = the torch module's, and the visual tokens are the
    full-budget tokens at exactly those patches; with every score tied, the first K patches."""
    checkpoint = load_checkpoint(checkpoints["llama"])
    vision = build_modules(checkpoint, PromptMLP.load(prompt_mlp).eval(), budget="half", reducer="prompt-topk")["vision"]
    if tied:  # zero queries: the class token attends to every patch alike
        for layer in vision.vit.encoder.layers:
            torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
            torch.nn.init.zeros_(layer.self_attn.q_proj.bias)
    export_vision(vision, tmp_path / "vision.onnx", {})
    outputs = describe_graph(tmp_path / "vision.onnx")["outputs"]
    assert outputs[2] == {"name": "kept_patches", "dtype": "int64", "shape": ["batch", 25]}
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, vision.config.image_size, vision.config.image_size)
    vector = torch.randn(2, vision.prompt_mlp.config.d_llm)
    session = onnxruntime.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    tokens, attention, kept = session.run(None, {"pixel_values": pixels.numpy(), "prompt_vector": vector.numpy()})
    with torch.no_grad():
        want_tokens, want_attention, want_kept = vision(pixels, vector)
        full = vision.projector(vision.features(pixels, vision.prompt_mlp(vector))[0])  # [B,N,D], every patch
    np.testing.assert_array_equal(kept, want_kept.numpy())
    np.testing.assert_allclose(tokens, np.take_along_axis(full.numpy(), kept[..., None], 1), atol=1e-5)
    np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=1e-5)
    assert (len(np.unique(attention[0])) == 1) == tied
    if tied:
        np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(25), (2, 25)))
