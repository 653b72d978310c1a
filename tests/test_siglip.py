"""SigLIP vision towers (no class token): PIP-MM prepends T-CLS as an extra ViT token, dropped at the output,
and prompt-topk ranks the patches by its attention. (Plain SigLIP + Qwen2 against transformers' generate:
tests/test_chat_template.py, case siglip-qwen2-chatml.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from export.model.checkpoint import load_checkpoint  # noqa: E402
from export.model.prompt import PromptMLP  # noqa: E402
from export.synthetic import build_random_prompt_mlp, build_tiny_llava  # noqa: E402
from export.writer import build_modules, export_bundle  # noqa: E402
from sdk.preprocess import preprocess  # noqa: E402


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    path = build_tiny_llava(root / "ckpt", arch="qwen2", tower="siglip", seed=5)
    mlp = build_random_prompt_mlp(path, root / "mlp", seed=2)
    bundle = export_bundle(path, root / "bundle", prompt_mlp=mlp, budget="half", reducer="prompt-topk",
                           progress=False)
    return path, mlp, bundle


def test_pipmm_siglip_records_the_prepended_tcls(siglip):
    manifest = json.loads((siglip[2] / "manifest.json").read_text())
    assert manifest["vision"]["tcls"] == "prepended" and manifest["vision"]["class_token"] is False
    assert manifest["visual_tokens"]["count"] == 25  # half of 7x7 patches (rounded up), no class token in front
    assert manifest["prompt_vector"]["conversation"] == "first-question"


def test_pipmm_siglip_vision_graph_matches_the_torch_reference(siglip, image):
    path, mlp, bundle = siglip
    pipeline = sdk.load(bundle, device="cpu")
    pixels = preprocess(image, pipeline.preprocessing)
    vector = pipeline.encode_prompt("what is the color of the star?")
    got = pipeline.backend.vision(pixels, vector)
    modules = build_modules(load_checkpoint(path), PromptMLP.load(mlp).eval(), budget="half", reducer="prompt-topk")
    with torch.no_grad():
        tokens, attention, kept = modules["vision"](torch.from_numpy(pixels), torch.from_numpy(vector))
    np.testing.assert_allclose(got.visual_tokens, tokens.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.cls_attention, attention.numpy(), atol=1e-5)
    assert got.cls_attention.shape == (1, 49)  # T-CLS's attention over the patches only
    # prompt-topk keeps the patches T-CLS attends to most
    top = np.sort(np.argsort(-attention.numpy()[0], kind="stable")[:25])
    assert got.kept_patches[0].tolist() == top.tolist() == kept[0].tolist()


def test_the_question_changes_what_a_siglip_pipmm_bundle_sees(siglip, image):
    pipeline = sdk.load(siglip[2], device="cpu")
    pixels = preprocess(image, pipeline.preprocessing)
    a = pipeline.backend.vision(pixels, pipeline.encode_prompt("what is the color of the star?"))
    b = pipeline.backend.vision(pixels, pipeline.encode_prompt("how many squares are there?"))
    assert not np.allclose(a.cls_attention, b.cls_attention)
    assert pipeline.generate(image, "what is the color of the star?", max_new_tokens=4).token_ids
