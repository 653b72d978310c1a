"""Visual tokens at their patch positions (manifest visual_tokens.positions == "patch").

prompt-topk keeps K of N patches; with "patch" positions the decoder sees each kept token at the
position of its patch and the text after the image where it is at full budget (runtimes/positions.py).
Checked here: the positions themselves, parity with the PyTorch reference, KV cache against full
recompute with the same positions, every ONNX Runtime cache mode, the export's refusals, and the
refusal of a patch-positions bundle whose vision graph does not say which patches it kept.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

import sdk
from export.writer import export_bundle
from export.reference import reference_pipeline
from runtimes.positions import step_positions
from runtimes.vision_output import VisionOutput
from sdk.bundle import sha256_file
from sdk.errors import BundleError, ExportError
from sdk.preprocess import preprocess

PROMPT = "what is the color of the shape?"
PATCH = dict(arch="llama", pipmm=True, budget="half", reducer="prompt-topk", positions="patch")


def test_step_positions_default_and_given():
    np.testing.assert_array_equal(step_positions(5, 2, 3), [[5, 6, 7], [5, 6, 7]])
    given = np.array([[0, 4, 9]])
    np.testing.assert_array_equal(step_positions(0, 1, 3, given), given)
    with pytest.raises(ValueError, match="shape"):
        step_positions(0, 1, 2, given)


def test_manifest_records_the_positions(bundles):
    assert sdk.load(bundles(**PATCH), device="cpu").manifest.visual_tokens.positions == "patch"
    default = sdk.load(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")
    assert default.manifest.visual_tokens.positions == "sequence"


def test_prefill_positions_put_kept_tokens_at_their_patches(bundles, image):
    pipeline = sdk.load(bundles(**PATCH), device="cpu")
    ids, slots = pipeline.prompter.prompt_ids(PROMPT)
    vector = pipeline.encode_prompt(PROMPT)
    vision = pipeline.backend.vision(preprocess(image, pipeline.preprocessing), vector)
    attention = vision.cls_attention
    n, k = attention.shape[-1], len(slots)
    assert len(np.unique(attention[0])) == n  # no ties: the selection is the K largest scores
    positions = pipeline.prefill_positions(len(ids), slots, vision)[0]
    kept = torch.topk(torch.from_numpy(attention[0]), k).indices.sort().values.numpy()  # the reducer's choice
    np.testing.assert_array_equal(vision.kept_patches[0], kept)
    np.testing.assert_array_equal(positions[: slots[0]], np.arange(slots[0]))
    np.testing.assert_array_equal(positions[slots], slots[0] + kept)
    np.testing.assert_array_equal(positions[slots[-1] + 1:], np.arange(slots[-1] + 1, len(ids)) + n - k)
    assert np.all(np.diff(positions) > 0)


def test_prefill_positions_from_kept_patches_equal_the_former_host_replay(bundles, image):
    """Until kept_patches, the pipeline replayed prompt-topk on the host (a stable argsort of the class
    token's attention); on an example without ties the graph's own record gives the same positions."""
    pipeline = sdk.load(bundles(**PATCH), device="cpu")
    ids, slots = pipeline.prompter.prompt_ids(PROMPT)
    vision = pipeline.backend.vision(preprocess(image, pipeline.preprocessing), pipeline.encode_prompt(PROMPT))
    attention = vision.cls_attention
    n, k = attention.shape[-1], len(slots)
    assert len(np.unique(attention[0])) == n
    replayed = np.sort(np.argsort(-attention[0], kind="stable")[:k])
    want = np.arange(len(ids), dtype=np.int64)
    want[slots] = slots[0] + replayed
    want[slots[-1] + 1:] += n - k
    np.testing.assert_array_equal(pipeline.prefill_positions(len(ids), slots, vision), want[None])


def test_prefill_positions_follow_kept_patches_not_the_attention(bundles):
    """The positions are the graph's kept patches, whatever the scores say (no replay of the selection)."""
    pipeline = sdk.load(bundles(**PATCH), device="cpu")
    ids, slots = pipeline.prompter.prompt_ids(PROMPT)
    k, n = len(slots), 49
    kept = np.arange(n - k, n)[None]  # the last K patches
    vision = VisionOutput(np.zeros((1, k, 8), np.float32), np.linspace(1, 0, n, dtype=np.float32)[None], kept)
    positions = pipeline.prefill_positions(len(ids), slots, vision)[0]
    np.testing.assert_array_equal(positions[slots], slots[0] + kept[0])


def test_a_patch_positions_bundle_without_kept_patches_is_refused(bundles, tmp_path):
    """Bundles exported before the vision graph said which patches it kept: refused at load, in one line."""
    copy = tmp_path / "b"
    shutil.copytree(bundles(**PATCH), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    outputs = manifest["graphs"]["vision"]["outputs"]
    assert [o["name"] for o in outputs] == ["visual_tokens", "cls_attention", "kept_patches"]
    assert outputs[2]["dtype"] == "int64" and outputs[2]["shape"] == ["batch", 25]
    graph = onnx.load(str(copy / "vision.onnx"))  # as exported before: the same graph without the output
    graph.graph.output.pop()
    onnx.save(graph, str(copy / "vision.onnx"))
    manifest["graphs"]["vision"]["outputs"] = outputs[:2]
    manifest["files"]["vision.onnx"] = {"sha256": sha256_file(copy / "vision.onnx"),
                                        "bytes": (copy / "vision.onnx").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no kept_patches output") as refused:
        sdk.load(copy, device="cpu")
    assert "\n" not in str(refused.value) and "--visual-positions patch" in str(refused.value)
    manifest["visual_tokens"]["positions"] = "sequence"  # the same graphs, tokens one after another: no need
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert sdk.load(copy, device="cpu").visual_positions == "sequence"


def test_patch_positions_match_the_reference_and_change_the_logits(checkpoints, prompt_mlp, bundles, image):
    onnx = sdk.load(bundles(**PATCH), device="cpu")
    ref = reference_pipeline(checkpoints["llama"], prompt_mlp, budget="half", reducer="prompt-topk",
                             visual_positions="patch")
    got, want = onnx.generate(image, PROMPT, max_new_tokens=16), ref.generate(image, PROMPT, max_new_tokens=16)
    assert got.token_ids == want.token_ids
    # the same graphs with sequence positions answer from other logits: the positions are used
    sequence = sdk.load(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")
    ids, slots = onnx.prompter.prompt_ids(PROMPT)
    vision = onnx.backend.vision(preprocess(image, onnx.preprocessing), onnx.encode_prompt(PROMPT))
    embeds = onnx.backend.embed(ids[None]).copy()
    embeds[0, slots] = vision.visual_tokens[0]
    patch_logits, _ = onnx.prefill(embeds, onnx.prefill_positions(len(ids), slots, vision))
    sequence_logits, _ = sequence.prefill(embeds)
    assert np.abs(patch_logits - sequence_logits).max() > 1e-3


def test_patch_positions_kv_cache_equals_full_recompute(bundles, image):
    pipeline = sdk.load(bundles(**PATCH), device="cpu")
    backend = pipeline.backend
    cached = pipeline.generate(image, PROMPT, max_new_tokens=10).token_ids
    ids, slots = pipeline.prompter.prompt_ids(PROMPT)
    vision = backend.vision(preprocess(image, pipeline.preprocessing), pipeline.encode_prompt(PROMPT))
    prompt_embeds = backend.embed(ids[None]).copy()
    prompt_embeds[0, slots] = vision.visual_tokens[0]
    positions = pipeline.prefill_positions(len(ids), slots, vision)
    tokens = []
    for _ in range(10):
        grown = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(len(tokens))[None]], axis=1)
        embeds = prompt_embeds if not tokens else np.concatenate(
            [prompt_embeds, backend.embed(np.asarray([tokens], np.int64))], axis=1)
        logits, _, _ = backend.decoder(embeds, backend.new_cache(), grown)
        token = int(np.argmax(logits[0]))
        if token in pipeline.prompter.eos_ids:
            break
        tokens.append(token)
    assert cached == tokens


def test_patch_positions_need_a_reducer_that_keeps_patches(checkpoints, prompt_mlp, tmp_path):
    with pytest.raises(ExportError, match="do not apply to reducer 'pool'"):
        export_bundle(checkpoints["llama"], tmp_path / "b", prompt_mlp=prompt_mlp, budget="half", reducer="pool",
                      visual_positions="patch", progress=False)
    assert not (tmp_path / "b").exists()


def test_unknown_positions_in_a_manifest_are_refused(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles(**PATCH), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["visual_tokens"]["positions"] = "diagonal"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="positions"):
        sdk.load(copy, device="cpu")
    del manifest["visual_tokens"]["positions"]  # a bundle from before the key: sequence positions
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert sdk.load(copy, device="cpu").visual_positions == "sequence"


def test_training_positions_equal_the_sdk_positions(bundles, image):
    """Stage 2 --patch-positions (export.train.model.patch_position_ids) trains on the SDK's positions."""
    from export.train.model import patch_position_ids

    pipeline = sdk.load(bundles(**PATCH), device="cpu")
    vision = pipeline.backend.vision(preprocess(image, pipeline.preprocessing), pipeline.encode_prompt(PROMPT))
    ids, slots = pipeline.prompter.prompt_ids(PROMPT)
    want = pipeline.prefill_positions(len(ids), slots, vision)
    padded = torch.from_numpy(np.concatenate([ids, [0, 0]]))[None]  # a right-padded training row
    got = patch_position_ids(padded, pipeline.manifest.special_tokens.image, torch.from_numpy(vision.cls_attention),
                             len(slots))
    np.testing.assert_array_equal(got[:, : len(ids)].numpy(), want)


def test_batched_torch_eval_with_patch_positions_matches_the_pipeline(checkpoints, prompt_mlp):
    """pipmm eval --checkpoint --batch-size (padded batches, export.train.model.greedy_generate) answers
    as the one-at-a-time reference Pipeline with the same patch positions."""
    from export.train import evaluate

    examples = evaluate.questions("test", 6)
    records, manifest = evaluate.run_batched(checkpoints["llama"], examples, prompt_mlp, "half", "prompt-topk",
                                             "cpu", "patch", batch_size=3, max_new_tokens=8)
    assert manifest.visual_tokens.positions == "patch"
    assert sum(len(r["output"]) for r in records) > 6  # random weights, but real text to compare
    reference = evaluate.torch_pipeline(checkpoints["llama"], prompt_mlp, "half", "prompt-topk", "cpu", "patch")
    for example, record in zip(examples, records):
        assert record["output"] == reference.generate(example.image, example.prompt, max_new_tokens=8).text
