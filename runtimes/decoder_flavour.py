"""Which decoder graph ONNX Runtime runs, and how its CPU threads wait: the traced `decoder`, or `decoder_fused` (export/fused.py: the same
weights as ONNX Runtime's fused contrib ops, for the CPU).

    decoder_flavour  "auto" (default): decoder_fused where it runs: on CPU (in-place or numpy KV cache, or the
                     device cache with kv_cache='static'), on CUDA when it is the CUDA target in FP16/INT4
                     (export/fused.py FUSED_TARGETS; runtimes/fused_device.py)
                     "plain": the traced decoder always;  "fused": decoder_fused, refused where it cannot run
    PIPMM_DECODER    the same choice from the environment (the argument wins)
    PIPMM_SPINNING   1/0: intra-op threads spin between runs or sleep (default: sleep on CPU, spin on GPUs)
    PIPMM_DECODER_SPINNING  1/0: the decoder session's alone (default: as PIPMM_SPINNING). With
                     PIPMM_DECODER_THREADS=2 on a quiet 2-core CPU the default model's decode step is 0.43 ms
                     instead of 0.58 (both cores stream the weights); with other processes on the cores the
                     describe is slower than on one sleeping thread (docs/gpu.md, CPU): not the default
    PIPMM_THREADS    intra-op threads of every session (default: ONNX Runtime's, one per core; threads=)
    PIPMM_DECODER_THREADS  the decoder's alone (default: 1 on CPU for a decoder of at most SMALL_DECODER_BYTES)
    PIPMM_PREFILL_SESSION  0: no second decoder session for prefills (separate_prefill; default 1)
    PIPMM_TOKEN_STEP 0: decode steps through the embed graph and the host's argmax even where decoder_fused takes
                     token ids and gives next_token (token_step_choice; default 1: scripts/gpu_speed.py compares)
"""

from __future__ import annotations

import os

from sdk.bundle import Bundle
from sdk.errors import BackendError
from sdk.manifest_fused import FusedDecoderEntry

FUSED_DECODER = "decoder_fused"
# A decoder this small runs on one intra-op thread on CPU: its ops are too small to split, and a second thread
# only adds a wake-up per op (default model, 9.4 MB: decode 1.5x faster on one thread, docs/gpu.md CPU). Larger
# ones (0.5B: 2 GB read per token) keep ONNX Runtime's one per core, which the memory bandwidth needs.
SMALL_DECODER_BYTES = 64 << 20
DECODER_FLAVOURS = ("auto", "plain", "fused")
CPU_CACHES = ("numpy", "inplace", "auto")  # runtimes/onnxruntime.py: the CPU's KV cache kinds
FUSED_DEVICE_CACHES = ("static", "auto")  # decoder_fused's one device buffer (runtimes/fused_device.py)
CUDA_DTYPES = ("float16", "bfloat16")  # GroupQueryAttention's CUDA kernel


def fused_devices(bundle: Bundle) -> list[str]:
    """Where the bundle's decoder_fused is meant to run (its manifest entry's preferred_by, export/fused.py)."""
    return list(FusedDecoderEntry.of(bundle).preferred_by.get("onnxruntime", ["cpu"]))


def token_step_choice(bundle: Bundle, decoder_graph: str, device_buffer: bool) -> tuple[bool, str | None]:
    """-> (decode steps feed token ids to decoder_fused, why not: for info()). The device-buffer cache
    (runtimes/fused_device.py) is what uses it."""
    if decoder_graph != FUSED_DECODER:
        return False, f"{decoder_graph} takes embeddings only"
    if not device_buffer:  # host memory already: the embed graph writes the bound row, numpy takes the argmax
        return False, "the token step is the device-buffer cache's (kv_cache='static')"
    if FusedDecoderEntry.of(bundle).token_input is None:
        return False, f"this {FUSED_DECODER} predates its input_ids entry: re-add it (--overwrite) for the token step"
    if os.environ.get("PIPMM_TOKEN_STEP", "1").strip() in ("0", "false", "no"):
        return False, "PIPMM_TOKEN_STEP=0"
    return True, None


def _why_not(bundle: Bundle, device: str, kv_cache: str) -> str | None:
    """None where decoder_fused can run on `device` with `kv_cache`, else why not (one line)."""
    devices = fused_devices(bundle)
    if device == "cpu":  # both targets run on the CPU; the device cache (kv_cache='static') is the CUDA one's
        if kv_cache == "static" and FusedDecoderEntry.of(bundle).cmai:
            # its bindings carry no image_bias: CMAI's bias is the host caches' (inplace, numpy)
            return f"this {FUSED_DECODER} takes CMAI's image_bias, which kv_cache 'static' does not feed: use " \
                   "kv_cache 'inplace' or 'numpy'"
        return None if kv_cache in CPU_CACHES + FUSED_DEVICE_CACHES else \
            f"{FUSED_DECODER} on cpu runs with kv_cache 'inplace', 'numpy' or 'static', not {kv_cache!r}"
    if device != "cuda":
        return f"{FUSED_DECODER} is ONNX Runtime contrib ops, which TensorRT cannot parse: {device} runs the plain decoder"
    if "cuda" not in devices:
        return f"this bundle's {FUSED_DECODER} is the {', '.join(devices)} target (GroupQueryAttention with " \
               "attention_bias/query_seqlens: no CUDA kernel in onnxruntime 1.31); add the CUDA one with 'pipmm " \
               f"add-graphs BUNDLE --checkpoint CKPT --graph {FUSED_DECODER} --fused-target cuda --overwrite'"
    kv_dtype = next(i.dtype for i in bundle.graphs[FUSED_DECODER].inputs if i.name == "past_key_values.0.key")
    if kv_dtype not in CUDA_DTYPES:
        return f"GroupQueryAttention on CUDA is FP16/BF16 only and this {FUSED_DECODER} is {kv_dtype}: add it to " \
               "an FP16 bundle (pipmm add-graphs ... --fused-target cuda)"
    if kv_cache not in FUSED_DEVICE_CACHES:
        return f"{FUSED_DECODER} on CUDA runs with its one device KV buffer (kv_cache 'static'), not {kv_cache!r}"
    return None


def choose_flavour(bundle: Bundle, device: str, kv_cache: str, flavour: str | None = None) -> tuple[bool, str | None]:
    """-> (run decoder_fused, why not when it is not run: for the backend's info()). kv_cache: as asked ('auto'
    included)."""
    flavour = flavour or os.environ.get("PIPMM_DECODER") or "auto"
    if flavour not in DECODER_FLAVOURS:
        raise BackendError(f"decoder_flavour {flavour!r}: choose {', '.join(DECODER_FLAVOURS)}")
    has_fused = FUSED_DECODER in bundle.graphs
    if flavour == "fused" and not has_fused:
        raise BackendError(f"bundle {bundle.path} has no {FUSED_DECODER} graph: add it with 'pipmm add-graphs BUNDLE "
                           f"--checkpoint CHECKPOINT_DIR --graph {FUSED_DECODER}', or use decoder_flavour='plain'")
    if flavour == "plain":
        return False, "plain decoder asked for (decoder_flavour='plain' or PIPMM_DECODER=plain)"
    if not has_fused:
        return False, f"the bundle has no {FUSED_DECODER} (pipmm add-graphs BUNDLE --graph {FUSED_DECODER})"
    why = _why_not(bundle, device, kv_cache)
    if why and flavour == "fused":
        raise BackendError(f"decoder_flavour='fused' cannot run here: {why}")
    return why is None, why


def spinning_default(device: str) -> bool:
    """Sleeping threads on CPU: spinning ones of idle sessions (vision, embed) compete with the decoder for the
    cores, the collapse issue 18 measured on a shared 2-core CPU (docs/gpu.md, CPU). ONNX Runtime's own default
    (spin) elsewhere, where the host threads only launch kernels."""
    given = os.environ.get("PIPMM_SPINNING")
    if given is not None:
        return given.strip() not in ("0", "", "false", "no")
    return device != "cpu"


def decoder_spinning(spinning: bool) -> bool:
    """Whether the decoder session's threads spin (PIPMM_DECODER_SPINNING), else `spinning` (the other sessions').
    The other sessions stay asleep while the decoder runs, so only its own threads take the cores."""
    given = os.environ.get("PIPMM_DECODER_SPINNING")
    if given is None:
        return spinning
    return given.strip() not in ("0", "", "false", "no")


def session_options(ort, ort_device: str, threads: int | None, spinning: bool):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # Idle intra-op threads spin by default; with three sessions on a shared CPU they steal the cores the
    # running graph needs (docs/gpu.md, CPU: chosen by measurement).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if ort_device == "cuda":
        # Weights straight into device memory, outside the arena: the arena then holds activations only.
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return options


def decoder_threads(bundle: Bundle, graph: str, device: str, threads: int | None) -> int | None:
    """The decoder session's intra-op threads: PIPMM_DECODER_THREADS, else `threads` when given, else 1 on CPU
    for a decoder of at most SMALL_DECODER_BYTES of files, else None (ONNX Runtime's default)."""
    given = os.environ.get("PIPMM_DECODER_THREADS")
    if given:
        return int(given)
    if threads or device != "cpu":
        return threads
    spec = bundle.graphs[graph]  # its files, and those of the graph whose weights it shares (export/fused.py pieces)
    names = [spec.file] + [bundle.graphs[g].file for g in (spec.shares_weights_with,) if g in bundle.graphs]
    size = sum(r.bytes for f, r in bundle.manifest.files.items() if any(f == n or f.startswith(n + ".") for n in names))
    return 1 if size <= SMALL_DECODER_BYTES else None


def separate_prefill(device: str, decoder_threads: int | None, threads: int | None, host_cache: bool = True) -> bool:
    """Whether calls of T > 1 (prefill, prompt pass, CMAI's probe) get a second session of the decoder graph on the
    other sessions' threads (one per core by default): where the decoder itself runs on one thread (the small-
    decoder rule above), since a decode step is too small to split but a prefill of a few hundred rows is compute
    that every core shortens. Same graph, same kernels: the outputs are the same bits (tests/test_fused_decoder.py).
    Costs a second copy of the decoder's weights in memory (9.4 MB for the default model). host_cache: the KV cache
    is a host one (inplace, numpy); the device-buffer cache (kv_cache 'static') runs its prefills in its own binding
    on the decoder's session, so a second session would only hold the weights twice."""
    if os.environ.get("PIPMM_PREFILL_SESSION", "1").strip() in ("0", "false", "no"):
        return False
    return device == "cpu" and host_cache and decoder_threads == 1 and threads != 1 and (os.cpu_count() or 1) > 1
