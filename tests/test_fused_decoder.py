"""decoder_fused (export/fused.py): ONNX Runtime's fused ops on CPU, parity with the traced decoder, transformers'
generate and the PyTorch modules; the backend's choice of flavour (runtimes/decoder_flavour.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import sdk
from export.extra_graphs import add_graphs, optional_module
from export.model.checkpoint import load_checkpoint
from export.model.decoder import DecoderGraph
from export.onnx_graphs import export_decoder_fused
from export.synthetic import TEXT_ARCHS
from sdk.errors import BackendError
from test_parity import NEW_TOKENS, PROMPT, hf_generate

ATOL = {"logits": 1e-3, "hidden": 1e-4, "kv": 1e-4, "attention": 1e-5}


@pytest.fixture(scope="module")
def fused_bundle(bundles, checkpoints, tmp_path_factory):
    """A copy of a session bundle with decoder_fused added (the session's own bundles stay plain)."""
    made = {}

    def get(arch="llama", pipmm=False, budget="full", reducer="pool"):
        key = (arch, pipmm, budget, reducer)
        if key not in made:
            out = tmp_path_factory.mktemp("fused") / "-".join(map(str, key))
            shutil.copytree(bundles(arch, pipmm=pipmm, budget=budget, reducer=reducer), out)
            made[key] = add_graphs(out, checkpoints[arch], graphs=("decoder_fused",))
        return made[key]

    return get


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_fused_greedy_tokens_match_plain_decoder_and_transformers_generate(arch, fused_bundle, checkpoints, image):
    fused = sdk.load(fused_bundle(arch), backend="onnxruntime", device="cpu")
    assert fused.backend.info()["decoder_graph"] == "decoder_fused"
    plain = fused.backend.__class__(fused.backend.bundle, device="cpu", decoder_flavour="plain")
    assert plain.info()["decoder_graph"] == "decoder"
    got = fused.generate(image, PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    expected = hf_generate(checkpoints[arch], fused, image, PROMPT, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert got == expected
    fused.backend = plain
    assert fused.generate(image, PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected


def _random_call(rng, model, past: int, new: int, positions=None, cmai_layers=0):
    embeds = rng.standard_normal((1, new, model.hidden_size)).astype(np.float32)
    cache = [rng.standard_normal((1, model.num_kv_heads, past, model.head_dim)).astype(np.float32)
             for _ in range(2 * model.num_layers)]
    positions = np.arange(past, past + new)[None] if positions is None else np.asarray([positions])
    bias = (rng.standard_normal((1, cmai_layers, past + new)) * 4).astype(np.float32) if cmai_layers else None
    return embeds, cache, positions.astype(np.int64), bias


@pytest.mark.parametrize("prompt_layer", [-1, 0, 1])
def test_fused_graph_matches_the_torch_decoder_at_any_prompt_layer(prompt_layer, checkpoints, tmp_path):
    """Against the PyTorch module itself: prompt vector from layer 0/1/last, CMAI bias and attention, arbitrary
    (repeated, jumping) positions, a prefill after a cached prefix (multi-turn)."""
    import onnxruntime

    checkpoint = load_checkpoint(checkpoints["qwen2"])  # q/k/v biases: the packed bias path
    text = checkpoint.config.text_config
    cmai_layers = [0, 1]
    path = tmp_path / "decoder_fused.onnx"
    export_decoder_fused(optional_module("decoder_fused", checkpoint, prompt_layer, cmai_layers), path, {})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cmai = {"layers": cmai_layers}
    torch_decoder = DecoderGraph(checkpoint.language_model, checkpoint.model.lm_head, text, prompt_layer, cmai).eval()
    model = type("M", (), {"hidden_size": text.hidden_size, "num_kv_heads": text.num_key_value_heads,
                           "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads, "num_layers": text.num_hidden_layers})
    rng = np.random.default_rng(prompt_layer + 5)
    for past, new, positions in ((0, 9, None), (4, 1, None), (6, 5, None), (0, 6, [0, 1, 1, 1, 2, 40]), (3, 3, [7, 7, 9])):
        embeds, cache, pos, bias = _random_call(rng, model, past, new, positions, len(cmai_layers))
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past + new), np.int64), "position_ids": pos,
                 "image_bias": bias, **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": c for i, c in enumerate(cache)}}
        got = session.run(None, feeds)
        with torch.no_grad():
            want = torch_decoder(torch.from_numpy(embeds), torch.ones(1, past + new, dtype=torch.long), torch.from_numpy(pos),
                                 tuple(torch.from_numpy(c) for c in cache), torch.from_numpy(bias))
        names = ["logits", "hidden"] + ["kv"] * len(cache) + ["attention"]
        for name, g, w in zip(names, got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=ATOL[name], rtol=0, err_msg=f"{name} at P={past} T={new}")


def test_cmai_inhibition_runs_on_the_fused_decoder(fused_bundle, image):
    pipe = sdk.load(fused_bundle("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")
    assert pipe.backend.info()["decoder_graph"] == "decoder_fused" and pipe.backend.has_attention
    plain = pipe.backend.__class__(pipe.backend.bundle, device="cpu", decoder_flavour="plain")
    fused_result = pipe.generate(image, PROMPT, max_new_tokens=12, inhibit=0.5)
    assert fused_result.inhibited > 0
    pipe.backend = plain
    plain_result = pipe.generate(image, PROMPT, max_new_tokens=12, inhibit=0.5)
    assert fused_result.token_ids == plain_result.token_ids and fused_result.inhibited == plain_result.inhibited


def test_manifest_records_the_flavour_and_the_choice_can_be_forced(fused_bundle, bundles, monkeypatch):
    from runtimes.onnxruntime import OnnxRuntimeBackend

    with_fused = sdk.load(fused_bundle("llama"), device="cpu").backend
    entry = with_fused.bundle.graphs["decoder_fused"]
    assert entry.extra["flavour_of"] == "decoder" and entry.extra["preferred_by"] == {"onnxruntime": ["cpu"]}
    assert entry.extra["ops"]["com.microsoft.GroupQueryAttention"] == with_fused.num_layers
    assert entry.extra["nodes_per_layer"] < 25  # the traced decoder: about 74 after ORT's own optimisation
    assert with_fused.info()["decoder_flavour_note"] is None

    monkeypatch.setenv("PIPMM_DECODER", "plain")
    forced = OnnxRuntimeBackend(with_fused.bundle, device="cpu")
    assert forced.info()["decoder_graph"] == "decoder" and "plain" in forced.info()["decoder_flavour_note"]

    plain_bundle = sdk.load(bundles("llama"), device="cpu").backend.bundle
    monkeypatch.delenv("PIPMM_DECODER")
    assert "no decoder_fused" in OnnxRuntimeBackend(plain_bundle, device="cpu").info()["decoder_flavour_note"]
    with pytest.raises(BackendError, match="add-graphs"):
        OnnxRuntimeBackend(plain_bundle, device="cpu", decoder_flavour="fused")
    with pytest.raises(BackendError, match="choose auto, plain, fused"):
        OnnxRuntimeBackend(plain_bundle, device="cpu", decoder_flavour="fastest")


def test_cpu_sessions_sleep_between_runs_unless_told(bundles, monkeypatch):
    """Spinning intra-op threads of idle sessions take the shared CPU's cores (docs/gpu.md, CPU)."""
    from runtimes.onnxruntime import OnnxRuntimeBackend

    bundle = sdk.load(bundles("llama"), device="cpu").backend.bundle
    monkeypatch.delenv("PIPMM_SPINNING", raising=False)
    backend = OnnxRuntimeBackend(bundle, device="cpu")
    assert backend.info()["spinning"] is False
    assert backend.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("PIPMM_SPINNING", "1")
    assert OnnxRuntimeBackend(bundle, device="cpu").info()["spinning"] is True
    assert OnnxRuntimeBackend(bundle, device="cpu", spinning=False).info()["spinning"] is False


def test_pipmm_add_graphs_adds_decoder_fused(bundles, checkpoints, tmp_path):
    from helpers import run_pipmm

    out = tmp_path / "bundle"
    shutil.copytree(bundles("qwen2"), out)
    done = run_pipmm("add-graphs", out, "--checkpoint", checkpoints["qwen2"], "--graph", "decoder_fused", timeout=300)
    assert done.returncode == 0, done.stderr
    backend = sdk.load(out, device="cpu").backend
    assert backend.info()["decoder_graph"] == "decoder_fused"
    again = run_pipmm("add-graphs", out, "--checkpoint", checkpoints["qwen2"], "--graph", "decoder_fused", timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
