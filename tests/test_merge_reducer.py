"""VMTC's merge reducer (issue 7, first part): static graph, parity with PyTorch, settings recorded.

Tolerances as tests/test_parity.py: vision outputs within 1e-4, identical greedy tokens.
"""

import json

import numpy as np
import pytest
import torch

import sdk
from export.writer import export_bundle
from export.model.reducers import MergeReducer, make_reducer
from export.reference import reference_pipeline
from sdk.errors import ExportError
from sdk.preprocess import preprocess

PROMPT = "what is the color of the shape?"


def test_merge_keeps_primaries_in_raster_order_and_merges_the_rest():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 8)
    attention = torch.rand(2, 16).softmax(-1)
    reducer = MergeReducer(4, 4, 6, primary_ratio=0.5, iterations=2)
    out, kept = reducer(tokens, attention)
    assert kept is None  # merged tokens are not patches
    assert out.shape == (2, 6, 8) and (reducer.kp, reducer.km) == (3, 3)
    for b in range(2):
        primary = torch.topk(attention[b], 3).indices.sort().values
        torch.testing.assert_close(out[b, :3], tokens[b, primary])
        # every merged token is an attention-weighted mean of non-primary patches: a convex combination
        rest = [i for i in range(16) if i not in primary.tolist()]
        lo, hi = tokens[b, rest].min(0).values, tokens[b, rest].max(0).values
        assert bool(((out[b, 3:] >= lo - 1e-5) & (out[b, 3:] <= hi + 1e-5)).all())


def test_merge_with_one_iteration_and_identical_patches_averages_them():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.0]]])
    attention = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # primary: patch 0; seeds: patches 1 and 2 (the next-ranked); patch 3 points along patch 0 but
    # patch 0 is primary, so its nearest seed is a tie of 1 and 2 (cosine 0 with both): it joins both.
    out = MergeReducer(2, 2, 3, primary_ratio=0.34, iterations=1)(tokens, attention).tokens
    torch.testing.assert_close(out[0, 0], tokens[0, 0])
    torch.testing.assert_close(out[0, 1], (0.3 * tokens[0, 1] + 0.2 * tokens[0, 2] + 0.1 * tokens[0, 3]) / 0.6)


@pytest.mark.parametrize("bad, match", [(dict(primary_ratio=1.0), "outside"), (dict(primary_ratio=0.0), "outside"),
                                        (dict(iterations=0), "at least 1"), (dict(colour=1), "takes no colour")])
def test_bad_merge_settings_are_one_line_errors(bad, match):
    with pytest.raises(ExportError, match=match):
        make_reducer("merge", 4, 4, 6, bad)


@pytest.mark.parametrize("budget", ["half", "quarter"])
def test_merge_bundle_matches_the_reference(checkpoints, prompt_mlp, image, budget, tmp_path):
    out = export_bundle(checkpoints["llama"], tmp_path / "b", prompt_mlp=prompt_mlp, budget=budget, reducer="merge",
                        reducer_options={"primary_ratio": 0.25}, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["visual_tokens"]["reducer"] == "merge"
    assert manifest["vision"]["reducer_options"] == {"primary_ratio": 0.25, "iterations": 2}
    onnx = sdk.load(out, device="cpu")
    ref = reference_pipeline(checkpoints["llama"], prompt_mlp, budget=budget, reducer="merge",
                             reducer_options={"primary_ratio": 0.25})
    pixels = preprocess(image, onnx.preprocessing)
    vector = onnx.encode_prompt(PROMPT)
    got, want = onnx.backend.vision(pixels, vector), ref.backend.vision(pixels, vector)
    assert got.kept_patches is None and want.kept_patches is None
    assert [o["name"] for o in manifest["graphs"]["vision"]["outputs"]] == ["visual_tokens", "cls_attention"]
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_allclose(g, w, atol=1e-4)
    assert onnx.generate(image, PROMPT, max_new_tokens=16).token_ids == \
        ref.generate(image, PROMPT, max_new_tokens=16).token_ids


def test_primary_ratio_applies_to_merge_only(checkpoints, prompt_mlp, tmp_path):
    with pytest.raises(ExportError, match="takes no primary_ratio"):
        export_bundle(checkpoints["llama"], tmp_path / "b", prompt_mlp=prompt_mlp, budget="half",
                      reducer="prompt-topk", reducer_options={"primary_ratio": 0.5}, progress=False)
    assert not (tmp_path / "b").exists()
