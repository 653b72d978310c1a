"""A bundle runs a checkpoint exactly as transformers does: the checkpoint's own chat template, BOS rule and
stop tokens (export/model/chat_template.py).

Each test builds a tiny random LLaVA checkpoint in its own saved layout (processor with chat_template.jinja,
the legacy chat_template.json without processor_config.json, or no template at all), exports it, and
compares with transformers' own LlavaProcessor.apply_chat_template + LlavaForConditionalGeneration.generate:
the prompt's token ids and the greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from export.model.chat_template import conversation_format  # noqa: E402
from export.synthetic import build_tiny_llava  # noqa: E402
from sdk.bundle import sha256_file  # noqa: E402
from chat_checkpoints import CASES, NEW_TOKENS, transformers_run  # noqa: E402

QUESTION = "what is the color of the star left of the circle?"


@pytest.fixture(scope="module")
def made(chat_bundles):
    return chat_bundles


@pytest.mark.parametrize("case", CASES)
def test_bundle_runs_the_checkpoints_own_template_as_transformers_does(case, made, image):
    path, bundle = made(case)
    pipeline = sdk.load(bundle, device="cpu")
    expected_ids, expected_tokens = transformers_run(path, image, QUESTION)
    ids, _ = pipeline.prompter.prompt_ids(QUESTION)
    assert ids.tolist() == expected_ids
    result = pipeline.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected_tokens
    assert len(expected_tokens) >= 4, "the random checkpoint stops almost at once; pick another seed"


@pytest.mark.parametrize("case", ["llama-bos-llava15", "siglip-qwen2-chatml"])
@pytest.mark.parametrize("height, width", [(13, 97), (120, 31), (28, 28)])
def test_odd_image_sizes_and_aspect_ratios_run_as_transformers_does(case, height, width, made):
    """CLIP's processor resizes the short edge and center-crops; SigLIP's resizes to the square: both as the
    checkpoint's own processor does, so the greedy tokens stay transformers'."""
    path, bundle = made(case)
    rng = np.random.default_rng(height * width)
    picture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    result = sdk.load(bundle, device="cpu").generate(picture, QUESTION, max_new_tokens=12)
    assert result.token_ids == transformers_run(path, picture, QUESTION, new_tokens=12)[1]


def test_stop_tokens_come_from_the_generation_config(made):
    _, bundle = made("qwen2-chatml")
    manifest = json.loads((bundle / "manifest.json").read_text())
    im_end = json.loads((bundle / "tokenizer.json").read_text())["added_tokens"][-1]
    assert im_end["content"] == "<|im_end|>"
    assert manifest["special_tokens"]["eos"] == [im_end["id"], 2]


@pytest.mark.parametrize("case, source, add_special_tokens, rule", [
    ("llama-bos-llava15", "chat_template.jinja", True, "post-processor adds '<s>'"),
    ("llama-no-bos-llava15", "chat_template.jinja", True, "no BOS"),
    ("mistral-inst", "chat_template.jinja", False, "the template writes '<s>' itself"),
    ("legacy-chat-template-json", "chat_template.json", True, "post-processor adds '<s>'"),
])
def test_export_records_where_the_template_and_bos_rule_came_from(case, source, add_special_tokens, rule, made):
    fmt = conversation_format(made(case)[0])
    assert fmt.source == source
    assert fmt.add_special_tokens is add_special_tokens
    assert rule in fmt.bos_rule
    assert "{prompt}" in fmt.prompt and fmt.prompt.count("<image>") == 1
    assert fmt.prompt_encoder.endswith("{prompt}") and "<image>" not in fmt.prompt_encoder


def test_checkpoint_without_template_gets_llava15_with_its_tokenizers_bos(tmp_path):
    path = build_tiny_llava(tmp_path / "ckpt")
    fmt = conversation_format(path)
    assert fmt.source.startswith("LLaVA-1.5") and fmt.template is None
    assert fmt.prompt == "USER: <image>\n{prompt} ASSISTANT:" and "post-processor adds '<s>'" in fmt.bos_rule


def test_cli_export_prints_template_bos_and_stop_tokens(made, tmp_path, capsys):
    from sdk.cli import main

    path, _ = made("qwen2-chatml")
    assert main(["export", str(path), "--out", str(tmp_path / "b"), "--no-prompt-mlp", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "chat template: chat_template.jinja" in out and "no BOS" in out and "stop token ids: [" in out


def test_a_bundle_from_before_templates_keeps_its_bos_flag(bundles, tmp_path, image):
    """Old manifests carry add_bos instead of add_special_tokens: the SDK still adds BOS by that flag."""
    import shutil

    old = shutil.copytree(bundles("llama"), tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["chat_template"] = {"prompt": "USER: <image>\n{prompt} ASSISTANT:", "prompt_encoder": "USER: {prompt}",
                                 "image_placeholder": "<image>", "add_bos": True}
    raw = json.loads((old / "tokenizer.json").read_text())
    raw["post_processor"] = None  # the tokenizer adds nothing: only the old flag can put BOS first
    (old / "tokenizer.json").write_text(json.dumps(raw))
    manifest["files"]["tokenizer.json"] = {"sha256": sha256_file(old / "tokenizer.json"),
                                           "bytes": (old / "tokenizer.json").stat().st_size}
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipeline = sdk.load(old, device="cpu")
    ids, _ = pipeline.prompter.prompt_ids(QUESTION)
    assert ids[0] == manifest["special_tokens"]["bos"] and np.sum(ids == ids[0]) == 1
