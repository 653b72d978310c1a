"""Several frames per request (sdk/frames.py): concat against transformers' own multi-image generate, adapter
bundles against the PyTorch reference, the errors, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import sdk
from chat_checkpoints import NEW_TOKENS as HF_TOKENS, transformers_run
from export.multi_image import set_concat
from export.reference import reference_pipeline
from helpers import adapter_bundle as make_adapter_bundle, edit_manifest, frames, run_pipmm
from sdk.errors import BundleError, ContextOverflowError, PipmmError
from sdk.frames import FrameCountError
from sdk.manifest_multi import MultiImage
from sdk.pipeline import Pipeline

QUESTION = "what is the color of the star left of the circle?"
NEW_TOKENS = 16
N_MAX = 4


@pytest.mark.parametrize("case", ["llama-bos-llava15", "qwen2-chatml"])
def test_concat_matches_transformers_generate_with_several_images(case, chat_bundles):
    """Plain LLaVA, no multi_image section (concat by default): the processor's ids and greedy tokens, 2 and 3 images."""
    checkpoint, bundle = chat_bundles(case)
    pipeline = sdk.load(bundle, device="cpu")
    assert pipeline.frames.mode == "concat"
    for n in (2, 3):
        images = frames(n, seed=n)
        messages = [{"role": "user", "content": [*({"type": "image", "image": Image.fromarray(im)} for im in images),
                                                 {"type": "text", "text": QUESTION}]}]
        ids, expected = transformers_run(checkpoint, None, messages=messages)
        assert pipeline.frames.prompt_ids(pipeline.prompter, QUESTION, n)[0].tolist() == ids
        result = pipeline.generate(images, QUESTION, max_new_tokens=HF_TOKENS)
        assert len(expected) == HF_TOKENS and result.token_ids == expected
        assert result.frames == n and result.visual_tokens == n * pipeline.num_visual_tokens


def test_concat_pipmm_patch_positions_matches_the_reference(checkpoints, prompt_mlp, bundles):
    """PIP-MM at half budget, kept tokens at their patch positions: every frame gets its own T-CLS from the one
    prompt vector and its own block of patch positions; the ONNX bundle and the PyTorch modules agree."""
    options = dict(budget="half", reducer="prompt-topk")
    onnx_pipe = sdk.load(bundles("llama", pipmm=True, positions="patch", **options), device="cpu")
    ref_pipe = reference_pipeline(checkpoints["llama"], prompt_mlp=prompt_mlp, visual_positions="patch", **options)
    images = frames(3)
    got = onnx_pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == ref_pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS).token_ids
    assert got.visual_tokens == 3 * 25 and len(got.token_ids) > 0
    # one frame, as an image or as a list of one: the single-image request of before
    single = onnx_pipe.generate(images[0], QUESTION, max_new_tokens=NEW_TOKENS)
    assert onnx_pipe.generate(images[:1], QUESTION, max_new_tokens=NEW_TOKENS).token_ids == single.token_ids
    assert single.frames == 1 and single.visual_tokens == 25


@pytest.fixture(scope="module")
def adapter_bundle(bundles, tmp_path_factory):
    """mode -> (bundle, adapter module): the PIP-MM half-budget bundle with a random adapter for N_MAX frames."""
    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    made = {}

    def make(mode):
        if mode not in made:
            made[mode] = make_adapter_bundle(source, tmp_path_factory.mktemp(mode) / "bundle", mode, N_MAX, seed=2)
        return made[mode]
    return make


@pytest.mark.parametrize("mode", ["qformer", "mivpg"])
def test_adapter_bundle_matches_the_reference(mode, adapter_bundle, checkpoints, prompt_mlp):
    path, module = adapter_bundle(mode)
    onnx_pipe = sdk.load(path, device="cpu")
    spec = onnx_pipe.manifest.multi_image
    assert (spec.mode, spec.n_max, spec.tokens, spec.graph) == (mode, N_MAX, 6, "adapter")
    assert spec.settings["frame_order"] == "ignored" and ("csa" in spec.settings) == (mode == "mivpg")
    ref_pipe = reference_pipeline(checkpoints["llama"], prompt_mlp=prompt_mlp, budget="half", reducer="prompt-topk",
                                  adapter=module, n_max=N_MAX)
    for n in (1, 3):
        images = frames(n, seed=10 + n)
        got = onnx_pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        assert got.token_ids == ref_pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS).token_ids
        assert got.visual_tokens == 6 and got.frames == n and "adapter_ms" in got.timings
    pieces = list(onnx_pipe.stream(frames(2), QUESTION, max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == onnx_pipe.describe(frames(2), QUESTION, max_new_tokens=NEW_TOKENS)


def test_frame_count_errors(adapter_bundle, bundles, tmp_path):
    pipeline = sdk.load(adapter_bundle("mivpg")[0], device="cpu")
    with pytest.raises(FrameCountError, match="no image given"):
        pipeline.generate([], QUESTION)
    with pytest.raises(FrameCountError, match=f"5 images, but this bundle takes at most {N_MAX}") as err:
        pipeline.generate(frames(5), QUESTION)
    assert "\n" not in str(err.value) and isinstance(err.value, PipmmError)
    with pytest.raises(FrameCountError, match="takes one image"):
        pipeline.generate(frames(2), QUESTION, region=sdk.Box(0, 0, 5, 5))
    with pytest.raises(FrameCountError, match="at most 8"):  # a bundle without the section: concat, 8 frames
        sdk.load(bundles("llama"), device="cpu").generate(frames(9), QUESTION)
    shutil.copytree(bundles("llama"), tmp_path / "concat")
    concat = sdk.load(set_concat(tmp_path / "concat", n_max=12), device="cpu")  # 49 tokens a frame, context 512
    with pytest.raises(ContextOverflowError, match="with the 11 images .* or send fewer images"):
        concat.generate(frames(11), QUESTION)


def test_single_frame_own_answers_one_frame_as_the_bundle_without_the_adapter(adapter_bundle, bundles, tmp_path):
    """multi_image.single_frame "own": one frame is the plain bundle's request (its own 25 tokens at its positions,
    no adapter), in generate and in a conversation; two frames still go through the adapter."""
    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    path = tmp_path / "own"
    shutil.copytree(adapter_bundle("mivpg")[0], path)
    edit_manifest(path, lambda m: m["multi_image"].update(single_frame="own"))
    own, pooled, plain = (sdk.load(p, device="cpu") for p in (path, adapter_bundle("mivpg")[0], source))
    image = frames(1, seed=5)[0]
    one, want = (p.generate(image, QUESTION, max_new_tokens=NEW_TOKENS) for p in (own, plain))
    assert one.token_ids == want.token_ids and one.visual_tokens == 25 and "adapter_ms" not in one.timings
    assert pooled.generate(image, QUESTION, max_new_tokens=2).visual_tokens == 6  # the default: through the adapter
    two = own.generate(frames(2), QUESTION, max_new_tokens=NEW_TOKENS)
    assert two.token_ids == pooled.generate(frames(2), QUESTION, max_new_tokens=NEW_TOKENS).token_ids
    assert two.visual_tokens == 6 and "adapter_ms" in two.timings
    answers = [p.conversation(image).ask(QUESTION, max_new_tokens=NEW_TOKENS) for p in (own, plain)]
    assert answers[0].token_ids == answers[1].token_ids and answers[0].visual_tokens == 25
    with pytest.raises(BundleError, match="'single_frame' must be 'adapter' or 'own'"):
        MultiImage.from_dict({"mode": "mivpg", "n_max": 4, "graph": "adapter", "tokens": 6, "single_frame": "first"},
                             "m.json")


def test_the_manifest_section_is_checked(adapter_bundle, tmp_path):
    with pytest.raises(BundleError, match="'graph' and 'tokens' must be given for mode 'mivpg'"):
        MultiImage.from_dict({"mode": "mivpg", "n_max": 4}, "m.json")
    with pytest.raises(BundleError, match="'mode' must be"):
        MultiImage.from_dict({"mode": "perceiver"}, "m.json")
    path = tmp_path / "bundle"
    shutil.copytree(adapter_bundle("qformer")[0], path)
    edit_manifest(path, lambda m: m["multi_image"].update(n_max=6))
    with pytest.raises(BundleError, match=r"graph 'adapter' takes \[1, 4, 25, 64\]"):
        Pipeline.load(path, device="cpu")
    set_concat(path, n_max=2)  # the section rewritten, the files re-hashed: concat again, two frames
    pipeline = sdk.load(path, device="cpu")
    assert pipeline.frames.mode == "concat" and pipeline.frames.n_max == 2
    assert pipeline.generate(frames(2), QUESTION, max_new_tokens=2).visual_tokens == 50


def test_cli_takes_several_images_and_the_single_image_form(adapter_bundle, tmp_path):
    bundle = adapter_bundle("mivpg")[0]
    files = []
    for i, image in enumerate(frames(3)):
        files.append(tmp_path / f"f{i}.png")
        Image.fromarray(image).save(files[-1])
    many = run_pipmm("describe", *files, "--prompt", QUESTION, "--bundle", bundle, "--json", "--max-new-tokens", 4)
    assert many.returncode == 0, many.stderr
    stats = json.loads(many.stdout)["stats"]
    assert (stats["frames"], stats["visual_tokens"]) == (3, 6)
    one = run_pipmm("describe", files[0], QUESTION, "--bundle", bundle, "--json", "--max-new-tokens", 4)
    assert one.returncode == 0 and json.loads(one.stdout)["stats"]["frames"] == 1
    missing = run_pipmm("describe", files[0], tmp_path / "absent.png", "--bundle", bundle)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "absent.png" in missing.stderr
    too_many = run_pipmm("describe", *files, *files, "--prompt", QUESTION, "--bundle", bundle)
    assert too_many.returncode == 1 and "at most 4" in too_many.stderr


def test_frames_preprocess_in_parallel_in_order(monkeypatch):
    """Several frames preprocess on a thread pool (sdk/frames.py); the batch is in request order whatever finishes
    first, and equals one frame after another."""
    import time

    import numpy as np

    from sdk import frames as frames_module

    def preprocess(frame):  # later frames finish first
        time.sleep(0.02 * (5 - frame))
        return np.full((1, 2), frame, dtype=np.float32)

    monkeypatch.setattr(frames_module, "PREPROCESS_THREADS", 4)
    batch = frames_module.preprocess_frames(preprocess, [0, 1, 2, 3, 4])
    assert batch[:, 0].tolist() == [0, 1, 2, 3, 4]
    monkeypatch.setattr(frames_module, "PREPROCESS_THREADS", 1)
    np.testing.assert_array_equal(frames_module.preprocess_frames(preprocess, [0, 1, 2, 3, 4]), batch)
