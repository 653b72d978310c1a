"""decoder_static (the preallocated-cache decoder for CUDA graphs) and the ONNX Runtime cache modes, on a CPU.

The GPU runs the same code with OrtValues on the device (docs/gpu.md); here every mode of the backend is
checked against the plain numpy path token for token, and the in-place cache binding is exercised.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from export import onnx_graphs  # noqa: E402
from export.writer import export_bundle  # noqa: E402
from export.model.checkpoint import load_checkpoint  # noqa: E402
from export.model.decoder import DecoderGraph, StaticDecoderGraph  # noqa: E402
from export.extra_graphs import add_graphs, export_direct  # noqa: E402
from export.synthetic import build_tiny_llava  # noqa: E402
from runtimes.kv_caches import StaticKVCache  # noqa: E402
from runtimes.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from sdk.bundle import load_bundle  # noqa: E402
from sdk.errors import BackendError, ExportError  # noqa: E402
from sdk.pipeline import Pipeline  # noqa: E402

TABLE = json.loads((__import__("pathlib").Path(__file__).parent / "data" / "tensorrt10-onnx-operators.json")
                   .read_text())["operators"]


@pytest.fixture(scope="session")
def static_bundles(bundles, checkpoints, tmp_path_factory):
    """Copies of the session's bundles with decoder_static added (the originals stay as exported)."""
    root, cache = tmp_path_factory.mktemp("static"), {}

    def make(arch="llama", **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            out = root / "-".join([arch, *map(str, options.values())])
            shutil.copytree(bundles(arch, **options), out)
            cache[key] = add_graphs(out, checkpoints[arch])
        return cache[key]

    return make


def _pipeline(bundle_dir, **options) -> Pipeline:
    bundle = load_bundle(bundle_dir)
    return Pipeline(bundle.manifest, bundle.tokenizer_path, OnnxRuntimeBackend(bundle, device="cpu", **options))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("prompt_layer", [-1, 0])
def test_static_decoder_module_equals_the_decoder(checkpoints, arch, prompt_layer):
    checkpoint = load_checkpoint(checkpoints[arch])
    text = checkpoint.config.text_config
    args = (checkpoint.language_model, checkpoint.model.lm_head, text, prompt_layer)
    dynamic, static = DecoderGraph(*args).eval(), StaticDecoderGraph(*args).eval()
    heads, hd, n = text.num_key_value_heads, text.hidden_size // text.num_attention_heads, text.num_hidden_layers
    torch.manual_seed(0)
    x, y = torch.randn(1, 6, text.hidden_size), torch.randn(1, 1, text.hidden_size)
    slots = 11
    mask = torch.zeros(1, slots, dtype=torch.int64)
    mask[0, :6] = 1
    garbage = tuple(torch.randn(1, heads, slots, hd) for _ in range(2 * n))  # unused slots must not matter
    with torch.no_grad():
        l1, h1, *p1 = dynamic(x, torch.ones(1, 6, dtype=torch.int64), torch.arange(6)[None],
                              tuple(torch.zeros(1, heads, 0, hd) for _ in range(2 * n)))
        l2, h2, *p2 = static(x, mask, torch.arange(6)[None], garbage)
        mask[0, 6] = 1
        l3, h3, _ = dynamic(y, torch.ones(1, 7, dtype=torch.int64), torch.tensor([[6]]), tuple(p1))[:3]
        l4, h4, _ = static(y, mask, torch.tensor([[6]]), tuple(p2))[:3]
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)
    assert all(torch.allclose(a, b[:, :, :6], atol=1e-5) for a, b in zip(p1, p2))
    assert torch.allclose(l3, l4, atol=1e-5) and torch.allclose(h3, h4, atol=1e-5)


def test_add_graphs_records_decoder_static_in_the_manifest(static_bundles):
    bundle = load_bundle(static_bundles("llama"), verify=True)  # every file hashed, the new ones included
    spec = bundle.graphs["decoder_static"]
    assert spec.kv_cache == "static"
    names = {i.name: i.shape for i in spec.inputs}
    assert names["attention_mask"] == ["batch", "cache"]
    assert names["past_key_values.0.key"][2] == "cache"
    assert {o.name: o.shape for o in spec.outputs}["present.0.key"][2] == "cache"
    assert bundle.manifest.precision.graphs["decoder_static"] == "fp32"
    # present is written by a scatter straight into the output: what lets a runtime bind it onto past
    model = onnx.load(str(bundle.graph_path("decoder_static")))
    outputs = {o.name for o in model.graph.output}
    scatters = [n for n in model.graph.node if n.op_type == "ScatterElements" and n.output[0] in outputs]
    assert len(scatters) == 2 * bundle.manifest.model.num_layers


def test_decoder_static_operators_are_in_tensorrt_10(static_bundles):
    model = onnx.load(str(load_bundle(static_bundles("qwen2")).graph_path("decoder_static")))
    for node in model.graph.node:
        if node.op_type != "Constant":
            assert TABLE.get(node.op_type, {}).get("supported"), node.op_type


@pytest.mark.parametrize("options", [dict(arch="llama"), dict(arch="qwen2"),
                                     dict(arch="llama", pipmm=True, budget="half", reducer="prompt-topk"),
                                     dict(arch="llama", pipmm=True, budget="half", reducer="prompt-topk",
                                          positions="patch")],
                         ids=["llama", "qwen2-gqa", "pipmm-half", "pipmm-half-patch-positions"])
def test_every_cache_mode_generates_the_same_tokens(static_bundles, image, options):
    bundle = static_bundles(**options)
    reference = _pipeline(bundle).generate(image, "what is the color of the shape?", max_new_tokens=32)
    for mode in ("device", "static"):
        result = _pipeline(bundle, kv_cache=mode).generate(image, "what is the color of the shape?", max_new_tokens=32)
        assert result.token_ids == reference.token_ids, mode


def test_static_cache_logits_match_and_prefixes_stay_usable(static_bundles):
    bundle = load_bundle(static_bundles("llama"))
    numpy_backend = OnnxRuntimeBackend(bundle, device="cpu")
    static = OnnxRuntimeBackend(bundle, device="cpu", kv_cache="static", max_cache=40)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 9, bundle.manifest.model.hidden_size)).astype(np.float32)
    step = rng.standard_normal((1, 1, embeds.shape[-1])).astype(np.float32)
    l1, h1, c1 = numpy_backend.decoder(embeds, numpy_backend.new_cache())
    l2, h2, c2 = static.decoder(embeds, static.new_cache())
    assert isinstance(c2, StaticKVCache) and c2.length == 9
    np.testing.assert_allclose(l1, l2, atol=1e-4)
    np.testing.assert_allclose(h1, h2, atol=1e-4)
    a1 = numpy_backend.decoder(step, c1)[0]
    a2, _, c3 = static.decoder(step, c2)
    np.testing.assert_allclose(a1, a2, atol=1e-4)
    # c2 is a prefix of c3 in the same buffer: stepping from it again gives the same answer
    np.testing.assert_allclose(static.decoder(step, c2)[0], a2, atol=1e-6)
    static.new_cache()  # a new sequence overwrites the slots: the old views are refused
    with pytest.raises(BackendError, match="replaced by a newer"):
        static.decoder(step, c3)


def test_static_cache_limits_are_one_line_errors(static_bundles, bundles):
    bundle = load_bundle(static_bundles("llama"))
    small = OnnxRuntimeBackend(bundle, device="cpu", kv_cache="static", max_cache=4)
    embeds = np.zeros((1, 5, bundle.manifest.model.hidden_size), np.float32)
    with pytest.raises(BackendError, match="holds 4 tokens"):
        small.decoder(embeds, small.new_cache())
    with pytest.raises(BackendError, match="batch 1"):
        small.new_cache(2)
    with pytest.raises(BackendError, match="cuda_graph"):
        OnnxRuntimeBackend(bundle, device="cpu", kv_cache="static", cuda_graph=True)
    with pytest.raises(BackendError, match="add-graphs"):
        OnnxRuntimeBackend(load_bundle(bundles("llama")), device="cpu", kv_cache="static")
    with pytest.raises(BackendError, match="kv_cache"):
        OnnxRuntimeBackend(bundle, device="cpu", kv_cache="paged")


def test_add_graphs_refuses_another_checkpoint_and_a_second_copy(bundles, tmp_path):
    bundle = shutil.copytree(bundles("llama"), tmp_path / "b")
    other = build_tiny_llava(tmp_path / "other", arch="llama", seed=42)  # same shapes, other weights
    with pytest.raises(ExportError, match="not the one this bundle was exported from"):
        add_graphs(bundle, other)
    assert "decoder_static" not in load_bundle(bundle).graphs  # the manifest is untouched


def test_decoder_static_shares_the_decoders_external_weights(checkpoints, image, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 0)
    bundle_dir = export_bundle(checkpoints["llama"], tmp_path / "ext", no_prompt_mlp=True, progress=False)
    add_graphs(bundle_dir, checkpoints["llama"])
    files = sorted(p.name for p in bundle_dir.iterdir())
    assert "decoder_static.onnx" in files and "decoder_static.onnx.data" not in files
    model = onnx.load(str(bundle_dir / "decoder_static.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    spec = load_bundle(bundle_dir).graphs["decoder_static"]
    assert spec.shares_weights_with == "decoder" and spec.sharing["shared_initializers"] > 0
    plain = _pipeline(bundle_dir).generate(image, "describe", max_new_tokens=12).token_ids
    assert _pipeline(bundle_dir, kv_cache="static").generate(image, "describe", max_new_tokens=12).token_ids == plain


def test_export_direct_bundle_with_reused_graphs(checkpoints, prompt_mlp, image, tmp_path):
    full = export_direct(checkpoints["llama"], tmp_path / "full", prompt_mlp=prompt_mlp, dtype="fp32", log=lambda *_: None)
    half = export_direct(checkpoints["llama"], tmp_path / "half", prompt_mlp=prompt_mlp, budget="half",
                         reducer="prompt-topk", dtype="fp32", graphs=("vision", "embed", "decoder", "decoder_static"),
                         reuse=full, log=lambda *_: None)
    for name in ("decoder", "decoder_static", "embed"):  # hard links of the same files
        assert (half / f"{name}.onnx").stat().st_ino == (full / f"{name}.onnx").stat().st_ino
    manifest = load_bundle(half, verify=True).manifest
    assert manifest.visual_tokens.count < load_bundle(full).manifest.visual_tokens.count
    tokens = _pipeline(half).generate(image, "what is here?", max_new_tokens=10).token_ids
    assert _pipeline(half, kv_cache="static").generate(image, "what is here?", max_new_tokens=10).token_ids == tokens
