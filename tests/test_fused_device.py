"""decoder_fused's CUDA target (export/fused.py FUSED_TARGETS) and its one-device-buffer KV cache
(runtimes/fused_device.py), run here on the CPU execution provider with OrtValues in host memory: the same
binding logic CUDA runs (past and present bound to one buffer, a fixed decode-step binding, the embed graph
written into the decoder's bound input). What only a GPU shows (the CUDA kernels, CUDA-graph capture) is measured
by scripts/gpu_speed.py, not here."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

import sdk
from export.extra_graphs import add_graphs, export_direct, optional_module
from export.fused import FUSED_IR_VERSION
from export.model.checkpoint import load_checkpoint
from export.model.decoder import DecoderGraph
from export.onnx_graphs import export_decoder_fused
from runtimes.decoder_flavour import choose_flavour
from runtimes.onnxruntime import OnnxRuntimeBackend
from sdk.bundle import load_bundle
from sdk.errors import BackendError, BundleError
from test_parity import PROMPT

ATOL = {"logits": 1e-3, "hidden": 1e-4, "kv": 1e-4}


@pytest.fixture(scope="module")
def cuda_target(bundles, checkpoints, tmp_path_factory):
    """(dtype) -> a qwen2 bundle of that dtype with decoder_fused's CUDA target (fp32: a copy of the session's)."""
    made = {}

    def get(dtype="fp32"):
        if dtype not in made:
            out = tmp_path_factory.mktemp("cuda-target") / dtype
            if dtype == "fp32":
                shutil.copytree(bundles("qwen2"), out)
            else:
                export_direct(checkpoints["qwen2"], out, no_prompt_mlp=True, dtype=dtype, graphs=("vision", "embed",
                              "decoder"), log=lambda *a: None)
            made[dtype] = add_graphs(out, checkpoints["qwen2"], graphs=("decoder_fused",), fused_target="cuda")
        return made[dtype]
    return get


def test_cuda_target_matches_the_torch_decoder_and_loads_in_older_onnxruntime(checkpoints, tmp_path):
    """RotaryEmbedding ops (every row at its own position id), no query_seqlens input (onnxruntime 1.31 has
    none), no CMAI, IR version 10; against the PyTorch module at arbitrary positions and after a cached prefix."""
    import onnxruntime

    checkpoint = load_checkpoint(checkpoints["qwen2"])
    text = checkpoint.config.text_config
    path = tmp_path / "decoder_fused.onnx"
    export_decoder_fused(optional_module("decoder_fused", checkpoint, -1, [0, 1], "cuda"), path, {})
    model = onnx.load(str(path))
    assert model.ir_version == FUSED_IR_VERSION <= 13
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == text.num_hidden_layers and all(len(n.input) == 7 for n in gqa)
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph.node) == 2 * text.num_hidden_layers
    assert "image_bias" not in {i.name for i in model.graph.input}  # CUDA's GroupQueryAttention: no attention_bias
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch_decoder = DecoderGraph(checkpoint.language_model, checkpoint.model.lm_head, text, -1, None).eval()
    heads, hd = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    rng = np.random.default_rng(2)
    for past, positions in ((0, [0, 1, 1, 1, 2, 40]), (4, [4]), (3, [7, 7, 9])):
        embeds = rng.standard_normal((1, len(positions), text.hidden_size)).astype(np.float32)
        cache = [rng.standard_normal((1, heads, past, hd)).astype(np.float32) for _ in range(2 * text.num_hidden_layers)]
        pos = np.asarray([positions], np.int64)
        mask = np.ones((1, past + len(positions)), np.int64)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos,
                 **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": c for i, c in enumerate(cache)}}
        got = session.run(None, feeds)
        with torch.no_grad():
            want = torch_decoder(torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(pos),
                                 tuple(torch.from_numpy(c) for c in cache))
        for name, g, w in zip(["logits", "hidden"] + ["kv"] * len(cache), got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=ATOL[name], rtol=0, err_msg=f"{name} at P={past}")


def _steps(backend, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, 7, backend.hidden_size)).astype(backend.embed_dtype)
    logits, _, cache = backend.decoder(embeds, backend.new_cache(1), position_ids=np.array([[0, 1, 2, 2, 2, 9, 10]]))
    out = [logits.copy()]
    for step in range(steps):
        token = int(out[-1][0].argmax())
        if step % 2:  # both decode paths: decoder() with an embedding, decode_token() with a token id
            logits, _, cache = backend.decoder(backend.embed(np.array([[token]], np.int64)), cache)
        else:
            logits, cache = backend.decode_token(token, cache)
        out.append(logits.copy())
    return out, cache


def test_device_buffer_cache_binds_one_buffer_and_matches_the_numpy_cache(cuda_target):
    bundle = load_bundle(cuda_target(), verify=False)
    device = OnnxRuntimeBackend(bundle, device="cpu", kv_cache="static", max_cache=32)
    numpy_cache = OnnxRuntimeBackend(bundle, device="cpu")
    info = device.info()
    assert (info["decoder_graph"], info["kv_cache"]) == ("decoder_fused", "static")
    assert numpy_cache.info()["kv_cache"] == "numpy" and "cuda target" in numpy_cache.info()["kv_cache_note"]
    assert device._token_step is not None  # the embed graph writes into the decoder's bound input
    addresses = [v.data_ptr() for v in device._buffer.kv]
    got, cache = _steps(device, 10)
    want, _ = _steps(numpy_cache, 10)
    for step, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"step {step}")
    assert [v.data_ptr() for v in device._buffer.kv] == addresses and cache.length == 17
    assert info["static_cache_bytes"] == device._buffer.nbytes

    shorter = cache.cut(9, 12)  # a conversation's common prefix: continues in the same buffer
    logits, _, grown = device.decoder(np.zeros((1, 2, device.hidden_size), np.float32), shorter)
    assert grown.length == 11
    with pytest.raises(BackendError, match="overwritten"):  # slots 9, 10 now hold the new call's tokens
        device.decoder(np.zeros((1, 1, device.hidden_size), np.float32), cache)
    with pytest.raises(BackendError, match="larger max_cache"):
        device.decoder(np.zeros((1, 30, device.hidden_size), np.float32), grown)
    device.new_cache(1)
    with pytest.raises(BackendError, match="newer new_cache"):
        device.decoder(np.zeros((1, 1, device.hidden_size), np.float32), grown)
    with pytest.raises(BackendError, match="batch 1"):
        device.new_cache(2)


def test_pipeline_on_the_device_buffer_cache_gives_the_plain_decoders_tokens(cuda_target, image):
    pipe = sdk.load(cuda_target(), device="cpu")
    pipe.backend = OnnxRuntimeBackend(pipe.backend.bundle, device="cpu", kv_cache="static")
    assert pipe.backend.info()["decoder_graph"] == "decoder_fused"
    runs = {}
    for name in ("device", "plain"):
        if name == "plain":
            pipe.backend = OnnxRuntimeBackend(pipe.backend.bundle, device="cpu", decoder_flavour="plain")
        conv = pipe.conversation(image)
        first = conv.ask(PROMPT, max_new_tokens=8)
        second = conv.ask("how many squares are there?", max_new_tokens=8)
        runs[name] = (first.token_ids, second.token_ids, second.cached_tokens)
    assert runs["device"] == runs["plain"] and runs["device"][2] > 0
    pipe.backend = OnnxRuntimeBackend(pipe.backend.bundle, device="cpu", kv_cache="static")
    with pytest.raises(BundleError, match="no attention output"):  # CMAI: the CUDA target has no probabilities
        pipe.generate(image, PROMPT, max_new_tokens=4, inhibit=0.5)


def test_cuda_chooses_the_fused_decoder_only_where_it_runs(cuda_target, bundles, checkpoints, tmp_path):
    """runtimes/decoder_flavour.py's choice for device='cuda', read from the manifests (no GPU needed)."""
    fp16 = load_bundle(cuda_target("fp16"), verify=False)
    assert choose_flavour(fp16, "cuda", "auto") == (True, None)
    assert choose_flavour(fp16, "cuda", "static") == (True, None)
    fused, why = choose_flavour(fp16, "cuda", "device")
    assert not fused and "kv_cache 'static'" in why
    fused, why = choose_flavour(load_bundle(cuda_target("fp32"), verify=False), "cuda", "auto")
    assert not fused and "FP16" in why  # GroupQueryAttention's CUDA kernel
    cpu_target = tmp_path / "cpu-target"
    shutil.copytree(bundles("qwen2"), cpu_target)
    add_graphs(cpu_target, checkpoints["qwen2"], graphs=("decoder_fused",))
    fused, why = choose_flavour(load_bundle(cpu_target, verify=False), "cuda", "auto")
    assert not fused and "--fused-target cuda" in why
    assert not choose_flavour(fp16, "tensorrt", "auto")[0]
    with pytest.raises(BackendError, match="cannot run here"):
        choose_flavour(load_bundle(cpu_target, verify=False), "cuda", "auto", "fused")
    entry = fp16.graphs["decoder_fused"].extra
    assert entry["preferred_by"] == {"onnxruntime": ["cuda"]} and entry["target"] == "cuda" and not entry["cmai"]


@pytest.fixture(scope="module")
def older_cuda_target(bundles, checkpoints, tmp_path_factory):
    """The CUDA-target bundle as export/fused.py wrote it before its token step: no input_ids, no next_token."""
    import dataclasses

    from export import extra_graphs

    out = tmp_path_factory.mktemp("older") / "fp32"
    shutil.copytree(bundles("qwen2"), out)
    with pytest.MonkeyPatch.context() as patch:
        made = extra_graphs.optional_module
        patch.setattr(extra_graphs, "optional_module", lambda *a, **k: dataclasses.replace(
            made(*a, **k), embed_tokens=None, next_token=False))
        return add_graphs(out, checkpoints["qwen2"], graphs=("decoder_fused",), fused_target="cuda")


class _CountingCopies:
    """An OrtValue stand-in that counts the copies to the host of the bound one it wraps."""

    def __init__(self, value):
        self.value, self.copies = value, 0

    def numpy(self):
        self.copies += 1
        return self.value.numpy()


def test_token_step_gives_the_embed_graphs_greedy_tokens_without_copying_logits(cuda_target, older_cuda_target,
                                                                                image, monkeypatch):
    """One session run per token (input_ids in, next_token out, each bound to its own OrtValue) against the embed graph +
    host argmax of the same bundle, an older bundle without the token step, and the plain decoder."""
    entry = load_bundle(cuda_target(), verify=False).graphs["decoder_fused"].extra
    assert (entry["token_input"], entry["next_token"]) == ("input_ids", "next_token")
    assert {"ArgMax", "Gather"} <= set(entry["ops"])
    pipe = sdk.load(cuda_target(), device="cpu")
    runs = {}
    for name, bundle, env in (("token step", cuda_target(), "1"), ("embed graph", cuda_target(), "0"),
                              ("older bundle", older_cuda_target, "1")):
        monkeypatch.setenv("PIPMM_TOKEN_STEP", env)
        pipe.backend = OnnxRuntimeBackend(load_bundle(bundle, verify=False), device="cpu", kv_cache="static")
        info = pipe.backend.info()
        assert info["token_step"] == info["device_argmax"] == (name == "token step"), info["token_step_note"]
        logits = pipe.backend._buffer.step_out["logits"] = _CountingCopies(pipe.backend._buffer.step_out["logits"])
        greedy = pipe.generate(image, PROMPT, max_new_tokens=12, min_new_tokens=12)
        runs[name] = greedy.token_ids
        assert logits.copies == (0 if name == "token step" else 11), name  # 11 decode steps after the prefill
        if name == "token step":  # sampling copies the row, and the greedy id in the buffer is rewritten first
            sampled = pipe.generate(image, PROMPT, max_new_tokens=6, temperature=0.7, seed=3)
            assert logits.copies == len(sampled.token_ids) - 1 + (sampled.finish_reason == "eos")
            assert pipe.generate(image, PROMPT, max_new_tokens=12, min_new_tokens=12).token_ids == runs[name]
    assert "predates" in OnnxRuntimeBackend(load_bundle(older_cuda_target, verify=False), device="cpu",
                                            kv_cache="static").info()["token_step_note"]
    monkeypatch.delenv("PIPMM_TOKEN_STEP")
    pipe.backend = OnnxRuntimeBackend(load_bundle(cuda_target(), verify=False), device="cpu", kv_cache="static")
    pipe.backend._buffer.bindings["ids"] = pipe.backend._buffer.session.io_binding()  # refused by onnxruntime
    runs["refused"] = pipe.generate(image, PROMPT, max_new_tokens=12, min_new_tokens=12).token_ids
    info = pipe.backend.info()
    assert not info["token_step"] and "failed on its first run" in info["token_step_note"]
    pipe.backend = OnnxRuntimeBackend(pipe.backend.bundle, device="cpu", decoder_flavour="plain")
    runs["plain"] = pipe.generate(image, PROMPT, max_new_tokens=12, min_new_tokens=12).token_ids
    assert len(set(map(tuple, runs.values()))) == 1, runs

    # ONNX Runtime's first run with a gpu_graph_id runs the graph twice on the same bindings (a warm-up, then the
    # capture): every bound run made twice must give the same tokens (next_token written into input_ids would not)
    monkeypatch.setenv("PIPMM_TOKEN_STEP", "1")
    pipe.backend = OnnxRuntimeBackend(load_bundle(cuda_target(), verify=False), device="cpu", kv_cache="static")
    session, run_once = pipe.backend._buffer.session, pipe.backend._buffer.session.run_with_iobinding
    session.run_with_iobinding = lambda *args: (run_once(*args), run_once(*args))[-1]
    assert pipe.backend.info()["token_step"]
    assert pipe.generate(image, PROMPT, max_new_tokens=12, min_new_tokens=12).token_ids == runs["plain"]
    monkeypatch.delenv("PIPMM_TOKEN_STEP")

    batched = OnnxRuntimeBackend(load_bundle(cuda_target(), verify=False), device="cpu", kv_cache="numpy")
    logits, _, _ = batched.decoder(np.zeros((2, 3, batched.hidden_size), np.float32), batched.new_cache(2))
    assert logits.shape == (2, batched.vocab_size)  # batches feed input_ids [2,0] (its default is [1,0])


def test_the_device_buffer_cache_refuses_a_cmai_fused_decoder_in_one_line():
    """The shipped bundle's decoder_fused (CPU target, CMAI's image_bias input): kv_cache 'static' feeds no bias, so
    it is refused with the reason (it failed in onnxruntime with 'Missing Input: image_bias') and the host caches run."""
    from sdk.bundle import default_bundle_path

    bundle = load_bundle(default_bundle_path(), verify=False)
    fused, why = choose_flavour(bundle, "cpu", "static")
    assert not fused and "image_bias" in why and "'inplace'" in why
    assert choose_flavour(bundle, "cpu", "auto") == (True, None)
    with pytest.raises(BackendError, match="decoder_static"):  # the plain decoder has no static graph either
        OnnxRuntimeBackend(bundle, device="cpu", kv_cache="static")
