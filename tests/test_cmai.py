"""CMAI (issue 7, second part): the decoder's image_bias input and attention output, the SDK's focus scores
and masks, parity with the PyTorch reference, bundles without CMAI, and one-line errors.

Tolerances as tests/test_parity.py (FP32, CPU): logits 1e-3, attention probabilities 1e-5, identical tokens.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import sdk
from helpers import edit_manifest, run_pipmm as pipmm
from export.writer import export_bundle
from export.model.checkpoint import load_checkpoint
from export.model.decoder import DecoderGraph, cmai_settings
from export.reference import reference_pipeline
from runtimes.onnxruntime import OnnxRuntimeBackend
from sdk import cmai
from sdk.bundle import load_bundle
from sdk.errors import BundleError, ExportError, GenerationArgumentError
from sdk.pipeline import Pipeline

PROMPT = "what is the color of the star left of the circle?"
ATOL = {"logits": 1e-3, "attention": 1e-5}


# -- the numpy side --------------------------------------------------------------------------------

def test_focus_weights_text_to_image_attention_by_text_to_text_attention():
    # keys: 0 = text before the image, 1..3 = image tokens, 4..5 = the prompt's text (the queries)
    attention = np.array([[[0.1, 0.5, 0.2, 0.0, 0.2, 0.0],     # query 4
                           [0.1, 0.0, 0.1, 0.4, 0.1, 0.3]]])   # query 5
    image, text = np.array([1, 2, 3]), np.array([4, 5])
    # text token 4 receives 0.2 + 0.1 = 0.3 from the prompt, token 5 receives 0.3: equal weights
    np.testing.assert_allclose(cmai.focus_scores(attention, image, text), [[0.25, 0.15, 0.2]])
    attention[0, 1, 5] = 0.9  # token 5 now receives 0.9: weights 0.25, 0.75
    np.testing.assert_allclose(cmai.focus_scores(attention, image, text),
                               [[0.25 * 0.5 + 0.75 * 0.0, 0.25 * 0.2 + 0.75 * 0.1, 0.25 * 0.0 + 0.75 * 0.4]])


def test_inhibition_masks_the_lowest_fraction_per_layer_or_shared():
    focus = np.array([[0.5, 0.1, 0.3, 0.2], [0.1, 0.5, 0.2, 0.3]])  # 2 CMAI layers, 4 image tokens
    slots = np.array([2, 3, 4, 5])
    settings = cmai.check_settings({"aggregate": "per-layer"})
    bias, count = cmai.inhibition_bias(focus, 0.5, slots, 8, settings)
    assert bias.shape == (1, 2, 8) and count == 2
    assert np.flatnonzero(bias[0, 0]).tolist() == [3, 5] and np.flatnonzero(bias[0, 1]).tolist() == [2, 4]
    assert set(bias[bias != 0]) == {-1e4}
    shared, _ = cmai.inhibition_bias(focus, 0.5, slots, 8, {**settings, "aggregate": "mean"})
    # mean focus 0.3 0.3 0.25 0.25: tokens 2 and 3 (slots 4, 5) in both layers
    assert np.flatnonzero(shared[0, 0]).tolist() == np.flatnonzero(shared[0, 1]).tolist() == [4, 5]
    assert cmai.inhibition_bias(focus, 0.2, slots, 8, settings)[1] == 0  # floor(0.2 * 4) = 0: nothing masked
    grown = cmai.grow(bias)
    assert grown.shape == (1, 2, 9) and not grown[..., -1].any()


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "half", True])
def test_bad_inhibit_values_are_one_line_errors(bad):
    with pytest.raises(GenerationArgumentError, match="inhibit must be a fraction in"):
        cmai.check_fraction(bad)


@pytest.mark.parametrize("given, match", [({"layers": [5]}, "outside the decoder's 2 layers"),
                                          ({"layers": "1;2"}, "comma-separated"),
                                          ({"aggregate": "max"}, "aggregate 'max'"),
                                          ({"mask_value": 3.0}, "negative finite"),
                                          ({"strength": 1}, "takes no strength")])
def test_bad_cmai_export_settings_are_one_line_errors(given, match):
    with pytest.raises(ExportError, match=match):
        cmai_settings(2, given)
    assert cmai_settings(4, None)["layers"] == [2, 3] and cmai_settings(4, {"layers": "-1,0"})["layers"] == [0, 3]
    assert cmai_settings(4, {"layers": "none"}) is None


# -- the graphs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def without_cmai(checkpoints, tmp_path_factory):
    """The plain llama bundle exported with --cmai-layers none: the decoder as it was before CMAI."""
    return export_bundle(checkpoints["llama"], tmp_path_factory.mktemp("nocmai") / "b", no_prompt_mlp=True,
                         cmai={"layers": "none"}, progress=False)


def test_zero_bias_gives_the_decoder_without_cmai(bundles, without_cmai, image):
    with_cmai = sdk.load(bundles("llama"), device="cpu")
    old = sdk.load(without_cmai, device="cpu")
    assert with_cmai.cmai.layers == [1] and old.cmai is None
    names = [i.name for i in old.backend.bundle.graphs["decoder"].inputs]
    assert "image_bias" not in names and "image_bias" in [i.name for i in with_cmai.backend.bundle.graphs["decoder"].inputs]
    ids, _ = with_cmai.prompter.prompt_ids(PROMPT)
    embeds = with_cmai.backend.embed(ids[None])
    got = with_cmai.backend.decoder(embeds, with_cmai.backend.new_cache(1))  # image_bias: zeros
    want = old.backend.decoder(embeds, old.backend.new_cache(1))
    for g, w in zip(got[:2] + (got[2].past,), want[:2] + (want[2].past,)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
    assert with_cmai.generate(image, PROMPT, max_new_tokens=12).token_ids == \
        old.generate(image, PROMPT, max_new_tokens=12).token_ids


def test_bundles_before_cmai_load_run_and_refuse_inhibit(without_cmai, image, tmp_path):
    older = shutil.copytree(without_cmai, tmp_path / "older")
    edit_manifest(older, lambda manifest: manifest.pop("cmai"))  # what a bundle exported before this change holds
    pipeline = sdk.load(older, device="cpu")
    assert len(pipeline.generate(image, PROMPT, max_new_tokens=4).token_ids) > 0
    with pytest.raises(BundleError, match="has no CMAI inputs"):
        pipeline.generate(image, PROMPT, max_new_tokens=4, inhibit=0.5)
    with pytest.raises(BundleError, match="takes no image_bias"):
        pipeline.backend.decoder(np.zeros((1, 2, 64), np.float32), pipeline.backend.new_cache(1),
                                 image_bias=np.zeros((1, 1, 2), np.float32))


def test_hooks_leave_the_model_untouched(checkpoints):
    checkpoint = load_checkpoint(checkpoints["llama"])
    text = checkpoint.config.text_config
    graph = DecoderGraph(checkpoint.language_model, checkpoint.model.lm_head, text, cmai=cmai_settings(2, None))
    torch.manual_seed(0)
    embeds = torch.randn(1, 6, text.hidden_size)
    args = (embeds, torch.ones(1, 6, dtype=torch.int64), torch.arange(6)[None],
            tuple(torch.zeros(1, text.num_key_value_heads, 0, 16) for _ in range(4)))
    with torch.no_grad():
        before = checkpoint.language_model(inputs_embeds=embeds).last_hidden_state
        plain = graph(*args, torch.zeros(1, 1, 6))
        bias = torch.zeros(1, 1, 6)
        bias[..., 1:3] = -1e4
        inhibited = graph(*args, bias)
        after = checkpoint.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    attention = inhibited[-1]  # [1, 1, 6, 6]
    assert attention.shape == (1, 1, 6, 6) and float(attention[0, 0, 3:, 1:3].abs().max()) < 1e-6
    assert not torch.allclose(plain[0], inhibited[0])  # the bias reached the logits


@pytest.mark.parametrize("budget", ["half", "quarter"])
def test_inhibited_merge_bundle_matches_the_reference(checkpoints, prompt_mlp, bundles, image, budget):
    onnx = sdk.load(bundles("llama", pipmm=True, budget=budget, reducer="merge"), device="cpu")
    ref = reference_pipeline(checkpoints["llama"], prompt_mlp, budget=budget, reducer="merge")
    ids, slots = onnx.prompter.prompt_ids(PROMPT)
    split = int(slots[-1]) + 1
    embeds = onnx.backend.embed(ids[None])
    # the probe pass: attention of the prompt's text over the cache of what precedes it
    before = {name: p.prefill(embeds[:, :split])[1] for name, p in (("onnx", onnx), ("ref", ref))}
    got = onnx.backend.attention(embeds[:, split:], before["onnx"])
    want = ref.backend.attention(embeds[:, split:], before["ref"])
    assert got.shape == (1, 1, len(ids) - split, len(ids))
    np.testing.assert_allclose(got, want, atol=ATOL["attention"], rtol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    results = {}
    for fraction in (0.0, 0.5):
        a = onnx.generate(image, PROMPT, max_new_tokens=16, inhibit=fraction)
        b = ref.generate(image, PROMPT, max_new_tokens=16, inhibit=fraction)
        assert a.token_ids == b.token_ids and a.inhibited == b.inhibited == int(fraction * onnx.num_visual_tokens)
        logits = [p.inhibited_prefill(embeds, None, slots, 0.5)[0] for p in (onnx, ref)]
        np.testing.assert_allclose(logits[0], logits[1], atol=ATOL["logits"], rtol=0)
        results[fraction] = a.token_ids
    assert results[0.0] != results[0.5], "inhibition should change this random model's answer; pick another prompt"


def test_device_cache_inhibits_as_the_numpy_cache(bundles, image):
    bundle = load_bundle(bundles("llama", pipmm=True, budget="half", reducer="merge"))
    device = Pipeline(bundle.manifest, bundle.tokenizer_path, OnnxRuntimeBackend(bundle, "cpu", kv_cache="device"))
    numpy_cache = sdk.load(bundle.path, device="cpu")
    assert device.generate(image, PROMPT, max_new_tokens=12, inhibit=0.4).token_ids == \
        numpy_cache.generate(image, PROMPT, max_new_tokens=12, inhibit=0.4).token_ids


def test_stream_and_describe_take_inhibit(bundles, image):
    pipeline = sdk.load(bundles("llama", pipmm=True, budget="half", reducer="merge"), device="cpu")
    text = pipeline.describe(image, PROMPT, max_new_tokens=10, inhibit=0.5)
    assert "".join(pipeline.stream(image, PROMPT, max_new_tokens=10, inhibit=0.5)) == text
    with pytest.raises(GenerationArgumentError, match="inhibit"):
        pipeline.describe(image, PROMPT, inhibit=1.5)


def test_cli_inhibit_and_export_settings_errors_are_one_line(bundles, checkpoints, prompt_mlp, image, tmp_path):
    from PIL import Image

    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    bundle = bundles("llama", pipmm=True, budget="half", reducer="merge")
    out = pipmm("describe", path, PROMPT, "--bundle", bundle, "--inhibit", "0.5", "--max-new-tokens", 4, "--json",
                "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["inhibited_visual_tokens"] == int(0.5 * 25)
    failures = [
        (("describe", path, PROMPT, "--bundle", bundle, "--inhibit", "1.2"), "inhibit must be a fraction"),
        (("export", checkpoints["llama"], "--prompt-mlp", prompt_mlp, "--visual-tokens", "half", "--reducer", "merge",
          "--primary-ratio", "1.5", "--out", tmp_path / "b", "--quiet"), "--primary-ratio 1.5 is outside"),
        (("export", checkpoints["llama"], "--no-prompt-mlp", "--cmai-layers", "7", "--out", tmp_path / "b",
          "--quiet"), "outside the decoder's 2 layers"),
    ]
    for args, match in failures:
        out = pipmm(*args)
        last = out.stderr.strip().splitlines()[-1]  # above it, at most transformers' weight-loading bar
        assert out.returncode == 1 and last.startswith("error:") and match in last, out.stderr
        assert out.stderr.count("error:") == 1
    assert not (tmp_path / "b").exists()


def test_inhibition_with_visual_tokens_at_patch_positions_matches_the_reference(checkpoints, prompt_mlp, bundles,
                                                                                 image):
    # the split prefill carries the patch positions over: the text after the image keeps its full-budget place
    onnx = sdk.load(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk", positions="patch"), device="cpu")
    ref = reference_pipeline(checkpoints["llama"], prompt_mlp, budget="half", reducer="prompt-topk",
                             visual_positions="patch")
    assert onnx.visual_positions == ref.visual_positions == "patch"
    a, b = (p.generate(image, PROMPT, max_new_tokens=12, inhibit=0.3) for p in (onnx, ref))
    assert a.token_ids == b.token_ids and a.inhibited == b.inhibited == 7  # floor(0.3 * 25)
