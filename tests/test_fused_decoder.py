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
    assert fused.backend.info()["kv_cache"] == "inplace" and plain.info()["kv_cache"] == "numpy"
    copying = fused.backend.__class__(fused.backend.bundle, device="cpu", kv_cache="numpy")
    assert copying.info()["decoder_graph"] == "decoder_fused" and copying.info()["kv_cache"] == "numpy"
    for backend in (plain, copying):
        fused.backend = backend
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
    monkeypatch.setenv("PIPMM_DECODER_SPINNING", "1")  # the decoder's threads alone (the 2-thread decode, docs/gpu.md)
    alone = OnnxRuntimeBackend(bundle, device="cpu", spinning=False)
    assert (alone.info()["spinning"], alone.info()["decoder_spinning"]) == (False, True)
    assert alone.decoder_options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert alone.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_prefills_run_on_every_core_in_a_second_session_with_the_same_bits(fused_bundle, image, monkeypatch):
    """The one-thread decoder's calls of T > 1 (prefill, prompt pass, CMAI's probe) go to a second session of the
    same graph on the other sessions' threads (runtimes/decoder_flavour.py separate_prefill): same tokens, same bits."""
    from runtimes import decoder_flavour
    from runtimes.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(decoder_flavour.os, "cpu_count", lambda: 2)
    pipe = sdk.load(fused_bundle("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")
    split = pipe.backend
    assert split.decoder_threads == 1 and split.prefill_session is not split.sessions["decoder_fused"]
    assert split.prefill_session.get_session_options().intra_op_num_threads == 0  # ONNX Runtime's: one per core
    assert split.info()["prefill_session"].startswith("separate")
    monkeypatch.setenv("PIPMM_PREFILL_SESSION", "0")
    one = OnnxRuntimeBackend(split.bundle, device="cpu")
    assert one.prefill_session is one.sessions["decoder_fused"] and one.info()["prefill_session"] == "the decoder's"
    monkeypatch.delenv("PIPMM_PREFILL_SESSION")
    assert OnnxRuntimeBackend(split.bundle, device="cpu", threads=1).info()["prefill_session"] == "the decoder's"

    embeds = np.random.default_rng(0).standard_normal((1, 40, split.hidden_size)).astype(np.float32)
    for kv_cache in ("inplace", "numpy"):
        a = OnnxRuntimeBackend(split.bundle, device="cpu", kv_cache=kv_cache)
        monkeypatch.setenv("PIPMM_PREFILL_SESSION", "0")
        b = OnnxRuntimeBackend(split.bundle, device="cpu", kv_cache=kv_cache)
        monkeypatch.delenv("PIPMM_PREFILL_SESSION")
        (la, ha, ca), (lb, hb, cb) = a.decoder(embeds, a.new_cache()), b.decoder(embeds, b.new_cache())
        assert np.array_equal(la, lb) and np.array_equal(ha, hb), kv_cache
        assert np.array_equal(a.decoder(embeds[:, :1], ca)[0], b.decoder(embeds[:, :1], cb)[0]), kv_cache
    for inhibit in (0.0, 0.5):
        pipe.backend = split
        got = pipe.generate(image, PROMPT, max_new_tokens=12, inhibit=inhibit).token_ids
        pipe.backend = one
        assert got == pipe.generate(image, PROMPT, max_new_tokens=12, inhibit=inhibit).token_ids, inhibit


def test_pipmm_add_graphs_adds_decoder_fused(bundles, checkpoints, tmp_path):
    from helpers import run_pipmm

    out = tmp_path / "bundle"
    shutil.copytree(bundles("qwen2"), out)
    done = run_pipmm("add-graphs", out, "--checkpoint", checkpoints["qwen2"], "--graph", "decoder_fused", timeout=300)
    assert done.returncode == 0, done.stderr
    backend = sdk.load(out, device="cpu").backend
    assert backend.info()["decoder_graph"] == "decoder_fused"
    entry = backend.bundle.graphs["decoder_fused"]  # float weights: the decoder's own pieces (export/fused.py)
    # but for the token step's embedding table (input_ids), the embed graph's in this untied checkpoint
    table = backend.vocab_size * backend.hidden_size * 4
    assert entry.extra["token_input"] == "input_ids" and entry.sharing["weight_bytes"] > table
    assert entry.shares_weights_with == "decoder" and \
        entry.sharing["shared_bytes"] > 0.9 * (entry.sharing["weight_bytes"] - table)
    assert entry.extra["folded_at_load"] == 2 * backend.num_layers + 1  # Concat of q|k|v, gate|up; the lm_head's Transpose
    assert (out / "decoder_fused.onnx").stat().st_size < 0.2 * (out / "decoder.onnx.data").stat().st_size + table
    again = run_pipmm("add-graphs", out, "--checkpoint", checkpoints["qwen2"], "--graph", "decoder_fused", timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_weight_pieces_folded_at_load_give_the_packed_graphs_bits(checkpoints, tmp_path):
    """pieces=True (shared with the decoder) and the packed export compute the same bits in ONNX Runtime."""
    import onnxruntime

    checkpoint = load_checkpoint(checkpoints["qwen2"])  # q/k/v biases too
    text = checkpoint.config.text_config
    got = []
    for pieces in (False, True):
        spec = optional_module("decoder_fused", checkpoint, -1, [0])
        spec.pieces = pieces
        path = tmp_path / f"pieces-{pieces}" / "decoder_fused.onnx"
        path.parent.mkdir()
        export_decoder_fused(spec, path, {})
        model = type("M", (), {"hidden_size": text.hidden_size, "num_kv_heads": text.num_key_value_heads,
                               "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                               "num_layers": text.num_hidden_layers})
        embeds, cache, pos, bias = _random_call(np.random.default_rng(3), model, 4, 6, None, 1)
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, 10), np.int64), "position_ids": pos,
                 "image_bias": bias, **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": c for i, c in enumerate(cache)}}
        got.append(onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))
    for a, b in zip(*got):
        assert np.array_equal(a, b)


# -- the in-place CPU cache (runtimes/inplace_cache.py) ------------------------------------------------------


def _decode_steps(backend, steps: int, prompt: int = 9, seed: int = 0):
    """A prefill of random embeddings, then `steps` greedy decode steps -> (logits per call, the last cache)."""
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, prompt, backend.hidden_size)).astype(np.float32)
    logits, _, cache = backend.decoder(embeds, backend.new_cache(1))
    out = [logits.copy()]
    for _ in range(steps):
        token = np.asarray([[int(out[-1][0].argmax())]], np.int64)
        logits, _, cache = backend.decoder(backend.embed(token), cache)
        out.append(logits.copy())
    return out, cache


def test_inplace_decode_step_copies_no_cache_and_allocates_nothing_per_token(fused_bundle):
    """Every step writes the same buffers (same addresses, the logits buffer reused) and allocates no numpy memory
    beyond a few small objects (tracemalloc sees numpy's own allocations); the numpy cache gets a new grown copy
    of every layer's cache every step. Logits equal."""
    import tracemalloc

    from runtimes.onnxruntime import OnnxRuntimeBackend

    bundle = sdk.load(fused_bundle("qwen2"), device="cpu").backend.bundle
    inplace = OnnxRuntimeBackend(bundle, device="cpu")
    copying = OnnxRuntimeBackend(bundle, device="cpu", kv_cache="numpy")
    want, _ = _decode_steps(copying, 12)
    got, _ = _decode_steps(inplace, 12)
    for step, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"step {step}")
    last = {}
    for name, backend in (("inplace", inplace), ("numpy", copying)):
        _, cache = _decode_steps(backend, 2)
        token = backend.embed(np.asarray([[3]], np.int64))
        logits, _, cache = backend.decoder(token, cache)
        kept = list(cache.buffer.arrays if name == "inplace" else cache.past)  # alive: their memory is not reused
        addresses = [a.ctypes.data for a in kept]
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for step in range(16):  # through decoder(), then through decode_token() (Pipeline.decode's path)
            if step < 8:
                logits_again, _, cache = backend.decoder(token, cache)
            else:
                logits_again, cache = backend.decode_token(3, cache)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        last[name] = logits_again.copy()
        if name == "inplace":
            per_token = sum(d.size_diff for d in after.compare_to(before, "filename") if d.size_diff > 0) / 16
            assert per_token < 1024
            assert np.shares_memory(logits, logits_again)  # one logits buffer per sequence
            assert [a.ctypes.data for a in cache.buffer.arrays] == addresses  # the same KV buffers
            assert cache.buffer.slots == inplace.cache_slots
        else:
            assert not any(np.shares_memory(a, b) for a in cache.past for b in kept)  # every layer's cache is new
    np.testing.assert_allclose(last["inplace"], last["numpy"], atol=1e-5, rtol=0)


def test_inplace_cache_views_share_one_buffer_and_refuse_overwritten_slots(fused_bundle):
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.errors import BackendError

    bundle = sdk.load(fused_bundle("llama"), device="cpu").backend.bundle
    backend = OnnxRuntimeBackend(bundle, device="cpu", max_cache=8)  # small: the buffer grows (copying) past it
    copying = OnnxRuntimeBackend(bundle, device="cpu", kv_cache="numpy")
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal((1, t, backend.hidden_size)).astype(np.float32) for t in (6, 4, 3))
    _, _, short = backend.decoder(a, backend.new_cache(1))
    _, _, reference = copying.decoder(a, copying.new_cache(1))
    # a call from the shorter cache writes only after it: `short` stays valid, twice over
    for extra in (b, c, b):
        logits, _, longer = backend.decoder(extra, short)
        want, _, _ = copying.decoder(extra, reference)
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    assert longer.length == 10 and longer.buffer.slots >= 10 and backend.info()["kv_cache"] == "inplace"
    logits = backend.decoder(c, longer.cut(7, 7))[0]
    np.testing.assert_allclose(logits, copying.decoder(c, copying.decoder(b[:, :1], reference)[2])[0], atol=1e-5)
    with pytest.raises(BackendError, match="overwritten"):  # slot 7 now holds c, not b's second row
        backend.decoder(c, longer)
    # a finished sequence gives its buffer back: the next request reuses it, a live one gets its own
    buffer_bytes = sum(a.nbytes for a in longer.buffer.arrays)
    del short, longer
    first = backend.new_cache(1)
    assert backend.info()["inplace_cache_bytes"] == buffer_bytes  # one buffer, reused
    second = backend.new_cache(1)
    assert second.buffer is not first.buffer and backend.info()["inplace_cache_bytes"] > buffer_bytes
    with pytest.raises(BackendError, match="batch 1"):
        backend.new_cache(2)


def test_inplace_cache_serves_conversations_and_cmai_like_the_numpy_cache(fused_bundle, image):
    """Multi-turn (the cache kept and cut between turns) and CMAI's probe + re-run from one shorter cache."""
    pipe = sdk.load(fused_bundle("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")
    inplace = pipe.backend
    copying = inplace.__class__(inplace.bundle, device="cpu", kv_cache="numpy")
    runs = {}
    for name, backend in (("inplace", inplace), ("numpy", copying)):
        pipe.backend = backend
        conv = pipe.conversation(image)
        first = conv.ask(PROMPT, max_new_tokens=8)
        conv.messages[-1]["content"][0]["text"] = "red"  # re-tokenizes differently: the cache is cut back
        second = conv.ask("how many squares are there?", max_new_tokens=8)
        inhibited = pipe.generate(image, PROMPT, max_new_tokens=8, inhibit=0.5)
        runs[name] = (first.token_ids, second.token_ids, second.cached_tokens, inhibited.token_ids)
    assert inplace.info()["kv_cache"] == "inplace"
    assert runs["inplace"] == runs["numpy"] and runs["inplace"][2] > 0


def test_inplace_cache_needs_decoder_fused_and_says_why_it_is_not_used(fused_bundle, bundles, tmp_path):
    from helpers import edit_manifest
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.bundle import load_bundle

    plain_bundle = sdk.load(bundles("llama"), device="cpu").backend.bundle
    info = OnnxRuntimeBackend(plain_bundle, device="cpu").info()
    assert info["kv_cache"] == "numpy" and "decoder_fused" in info["kv_cache_note"]
    with pytest.raises(BackendError, match="needs decoder_fused"):
        OnnxRuntimeBackend(plain_bundle, device="cpu", kv_cache="inplace")
    fused = sdk.load(fused_bundle("llama"), device="cpu").backend.bundle
    forced = OnnxRuntimeBackend(fused, device="cpu", decoder_flavour="plain").info()
    assert forced["kv_cache"] == "numpy" and "plain" in forced["kv_cache_note"]
    assert OnnxRuntimeBackend(fused, device="cpu", kv_cache="inplace").info()["kv_cache_note"] is None
    older = tmp_path / "older"  # a decoder_fused of before query_seqlens reads only masks of P + T slots
    shutil.copytree(fused.path, older)
    edit_manifest(older, lambda m: m["graphs"]["decoder_fused"].pop("query_seqlens"))
    info = OnnxRuntimeBackend(load_bundle(older, verify=False), device="cpu").info()
    assert info["decoder_graph"] == "decoder_fused" and info["kv_cache"] == "numpy"
    assert "--overwrite" in info["kv_cache_note"]


def test_token_steps_copy_host_embedding_rows_with_the_embed_graphs_tokens(fused_bundle, image, monkeypatch):
    """A small vocabulary's rows live on the host (runtimes/onnxruntime.py _host_embed_table): the in-place token
    step copies one instead of running the embed graph; the rows are the graph's bits, so the tokens are the same."""
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.bundle import load_bundle
    from sdk.pipeline import Pipeline

    bundle = load_bundle(fused_bundle("llama", pipmm=True, budget="half", reducer="prompt-topk"))
    host = Pipeline(bundle.manifest, bundle.tokenizer_path, OnnxRuntimeBackend(bundle, device="cpu"))
    table = host.backend.embed_table
    assert host.backend.kv_cache == "inplace" and table.shape == (bundle.manifest.model.vocab_size,
                                                                  bundle.manifest.model.hidden_size)
    ids = np.arange(len(table), dtype=np.int64)[None]
    np.testing.assert_array_equal(table, host.backend.embed(ids)[0])
    assert host.backend.info()["host_embed_table_bytes"] == table.nbytes and not table.flags.writeable
    monkeypatch.setenv("PIPMM_HOST_EMBED", "0")
    graph = Pipeline(bundle.manifest, bundle.tokenizer_path, OnnxRuntimeBackend(bundle, device="cpu"))
    assert graph.backend.embed_table is None
    for prompt in ("What is it?", "Describe the scene."):
        want = graph.generate(image, prompt, max_new_tokens=12, min_new_tokens=12, temperature=0.0).token_ids
        assert host.generate(image, prompt, max_new_tokens=12, min_new_tokens=12, temperature=0.0).token_ids == want
    cache = host.backend.new_cache(1)
    with pytest.raises(BackendError, match="outside the vocabulary"):
        host.backend.decode_token(-1, cache)
