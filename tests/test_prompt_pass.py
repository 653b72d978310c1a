"""PIP-MM's prompt pass made cheap (sdk/prompt_pass.py): (a) a prompt_encoder graph of only the first L layers when
the prompt vector comes from layer L - 1, plain and fused; (b) prompt-first bundles whose prompt pass is the
prefill's prefix, its KV cache reused. Both against the full recomputation, the PyTorch reference and transformers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from chat_checkpoints import checkpoint, transformers_run  # noqa: E402
from export.extra_graphs import add_graphs  # noqa: E402
from export.model.checkpoint import load_checkpoint  # noqa: E402
from export.model.decoder import DecoderGraph  # noqa: E402
from export.reference import reference_pipeline  # noqa: E402
from export.synthetic import build_random_prompt_mlp, build_tiny_llava  # noqa: E402
from export.train.templates import PROMPT_FIRST_JINJA, TEMPLATES  # noqa: E402
from export.writer import export_bundle  # noqa: E402
from runtimes.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from sdk.bundle import load_bundle  # noqa: E402
from sdk.pipeline import Pipeline  # noqa: E402
from sdk import prompt_pass  # noqa: E402

PROMPTS = ["What color is the star?", "Describe the scene.", "How many objects are there", "3", "是什么？"]
NEW = 16
# prompt_encoder (traced) against the PyTorch module and the decoder's hidden: float32 rounding of 2 layers
HIDDEN_ATOL = 1e-4


def pipeline(bundle, prompt_encoder: bool = True, prefix: bool = True, flavour: str = "plain") -> Pipeline:
    """A CPU Pipeline; prompt_encoder / prefix False switch the cheap passes off (the full recomputation)."""
    loaded = load_bundle(bundle)
    backend = OnnxRuntimeBackend(loaded, device="cpu", decoder_flavour=flavour)
    if not prompt_encoder:
        backend.prompt_encoder_graph = None
    pipe = Pipeline(loaded.manifest, loaded.tokenizer_path, backend, source=str(bundle))
    if not prefix:
        pipe.prompt_vector_spec = replace(pipe.prompt_vector_spec, prefill_prefix=None)
    return pipe


def tokens(pipe, image, prompts=PROMPTS, **kwargs):
    return [pipe.generate(image, p, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs).token_ids for p in prompts]


# -- (a) the first L layers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """A 4-layer checkpoint, its prompt vector from layer 1 (2 layers), exported at half budget + the fused graphs."""
    root = tmp_path_factory.mktemp("layered")
    ckpt = build_tiny_llava(root / "ckpt", seed=5, text_layers=4)
    mlp = build_random_prompt_mlp(ckpt, root / "mlp", seed=2, prompt_layer=1)
    bundle = export_bundle(ckpt, root / "bundle", prompt_mlp=mlp, budget="half", reducer="prompt-topk", progress=False)
    add_graphs(bundle, ckpt, graphs=("decoder_fused", "prompt_encoder_fused"))
    return ckpt, mlp, bundle


def test_prompt_encoder_graph_has_the_first_layers_only(layered):
    _, _, bundle = layered
    manifest = load_bundle(bundle).manifest
    assert manifest.prompt_vector.encoder_layers == 2 and manifest.prompt_vector.layer == 1
    assert manifest.precision.graphs["prompt_encoder"] == "fp32"
    plain = onnx.load(str(bundle / "prompt_encoder.onnx"))
    decoder = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)

    def ops(model, op):
        return sum(n.op_type == op for n in model.graph.node)
    # one Softmax per attention layer, one Pow per RMSNorm: 2 layers of 2 norms, no final norm (un-normed layer 1)
    assert (ops(plain, "Softmax"), ops(plain, "Pow")) == (2, 4)
    assert (ops(decoder, "Softmax"), ops(decoder, "Pow")) == (4, 9)
    assert [o.name for o in plain.graph.output] == ["hidden"]
    assert not any("lm_head" in t.name for t in plain.graph.initializer)
    fused = onnx.load(str(bundle / "prompt_encoder_fused.onnx"))
    assert sum(n.op_type == "GroupQueryAttention" for n in fused.graph.node) == 2
    assert [o.name for o in fused.graph.output] == ["hidden"]
    assert len(plain.graph.node) < 0.6 * len(decoder.graph.node)


def test_prompt_encoder_matches_the_pytorch_decoder_hidden(layered):
    ckpt, _, bundle = layered
    c = load_checkpoint(ckpt)
    decoder = DecoderGraph(c.language_model, c.model.lm_head, c.config.text_config, prompt_layer=1).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 9, 64)).astype(np.float32)
    past = tuple(torch.zeros(1, 2, 0, 16) for _ in range(8))
    with torch.no_grad():
        want = decoder(torch.from_numpy(x), torch.ones(1, 9, dtype=torch.int64), torch.arange(9)[None], past)[1].numpy()
    for flavour, graph in (("plain", "prompt_encoder"), ("fused", "prompt_encoder_fused")):
        backend = pipeline(bundle, flavour=flavour).backend
        assert backend.prompt_encoder_graph == graph and backend.info()["prompt_encoder_graph"] == graph
        np.testing.assert_allclose(backend.prompt_hidden(x), want, atol=HIDDEN_ATOL, rtol=0)


def test_prompt_encoder_gives_the_full_recomputations_tokens(layered, image):
    ckpt, mlp, bundle = layered
    full = pipeline(bundle, prompt_encoder=False)
    want = tokens(full, image)
    assert tokens(pipeline(bundle), image) == want
    assert tokens(pipeline(bundle, flavour="fused"), image) == want
    reference = reference_pipeline(ckpt, prompt_mlp=mlp, budget="half", reducer="prompt-topk")
    assert reference.backend.prompt_encoder_graph == "prompt_encoder"
    assert tokens(reference, image) == want
    one = PROMPTS[0]
    np.testing.assert_allclose(prompt_pass.run(pipeline(bundle), one).vector,
                               prompt_pass.run(full, one).vector, atol=HIDDEN_ATOL, rtol=0)
    assert prompt_pass.run(pipeline(bundle), one).mode == prompt_pass.ENCODER


# -- (b) prompt first: the prompt pass is the prefill's prefix ---------------------------------------

@pytest.fixture(scope="module")
def prompt_first(tmp_path_factory):
    """A tiny checkpoint saved by transformers' processor with the prompt-first template (pipmm train --template
    prompt-first writes the same chat_template.jinja), exported plain and PIP-MM at half budget, patch positions."""
    root = tmp_path_factory.mktemp("prompt-first")
    ckpt = checkpoint(root / "ckpt", "llama", PROMPT_FIRST_JINJA, True, [], [], "processor")
    mlp = build_random_prompt_mlp(ckpt, root / "mlp", seed=4)
    plain = export_bundle(ckpt, root / "plain", no_prompt_mlp=True, progress=False)
    pipmm = export_bundle(ckpt, root / "pipmm", prompt_mlp=mlp, budget="half", reducer="prompt-topk",
                          visual_positions="patch", progress=False)
    add_graphs(pipmm, ckpt, graphs=("decoder_fused",))  # the CPU's default flavour reuses the prefix too
    return ckpt, mlp, plain, pipmm


def test_export_marks_prompt_first_bundles(prompt_first, bundles):
    _, _, plain, pipmm = prompt_first
    manifest = load_bundle(pipmm).manifest
    assert manifest.chat_template.prompt == TEMPLATES["prompt-first"].chat.prompt
    assert manifest.prompt_vector.prefill_prefix is True and manifest.prompt_vector.encoder_layers is None
    assert "prompt_encoder" not in manifest.graphs  # prompt layer -1: the decoder is the prompt encoder
    llava = load_bundle(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")).manifest
    assert llava.prompt_vector.prefill_prefix is None  # image first: no prefix to reuse


def test_prompt_first_plain_bundle_generates_transformers_tokens(prompt_first, image):
    ckpt, _, plain, _ = prompt_first
    ids, want = transformers_run(ckpt, image, PROMPTS[0], new_tokens=NEW)
    pipe = sdk.load(plain, device="cpu")
    assert pipe.prompter.prompt_ids(PROMPTS[0])[0].tolist() == ids
    assert pipe.generate(image, PROMPTS[0], max_new_tokens=NEW, temperature=0.0).token_ids == want


def test_prefix_reuse_gives_the_full_recomputations_tokens(prompt_first, image):
    ckpt, mlp, _, bundle = prompt_first
    reuse, full = pipeline(bundle), pipeline(bundle, prefix=False)
    want = tokens(full, image)
    assert tokens(reuse, image) == want
    fused = pipeline(bundle, flavour="fused")
    assert fused.backend.decoder_graph == "decoder_fused"
    assert tokens(fused, image) == tokens(pipeline(bundle, prefix=False, flavour="fused"), image)
    reference = reference_pipeline(ckpt, prompt_mlp=mlp, budget="half", reducer="prompt-topk", visual_positions="patch")
    assert reference.prompt_vector_spec.prefill_prefix
    assert tokens(reference, image) == want  # the PyTorch modules, also reusing the prefix
    result = reuse.generate(image, PROMPTS[0], max_new_tokens=4)
    assert result.timings["prompt_prefix_tokens"] == len(reuse.prompter.encoder_ids(PROMPTS[0]))
    assert full.generate(image, PROMPTS[0], max_new_tokens=4).timings["prompt_prefix_tokens"] == 0
    # CMAI: the image's cache and the inhibited text continue the prefix's cache too
    assert tokens(reuse, image, PROMPTS[:2], inhibit=0.5) == tokens(full, image, PROMPTS[:2], inhibit=0.5)


def test_prefix_pass_equals_the_separate_prompt_pass(prompt_first, image):
    _, _, _, bundle = prompt_first
    reuse, full = pipeline(bundle), pipeline(bundle, prefix=False)
    for prompt in PROMPTS:
        ids, _ = reuse.prompter.prompt_ids(prompt)
        passed = prompt_pass.run(reuse, prompt, ids)
        assert passed.mode == prompt_pass.PREFIX and passed.length == len(reuse.prompter.encoder_ids(prompt))
        np.testing.assert_allclose(passed.vector, prompt_pass.run(full, prompt, ids).vector, atol=1e-5, rtol=0)
    # a prefill that does not start with the encoder's ids takes the separate pass
    assert prompt_pass.run(reuse, PROMPTS[0], np.asarray([1, 2, 3], np.int64)).mode == prompt_pass.DECODER
