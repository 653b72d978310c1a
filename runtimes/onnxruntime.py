"""ONNX Runtime backend: one InferenceSession per graph, on the device asked for.

Four ways to hold the KV cache, chosen at load (kv_cache="auto" picks the first that fits):

    inplace  (cpu with decoder_fused, the default there) one preallocated buffer per layer and part, read as
             past and written as present by GroupQueryAttention: no copy per token (runtimes/inplace_cache.py)
    numpy    (cpu, plain decoder)  a list of numpy arrays that each decoder call returns grown by T
    device   (cuda/tensorrt, bundle without decoder_static, or kv_cache="device") ORT-owned device tensors,
             [B,H_kv,P,hd], fed back through IO binding: no host copy, but shapes grow per token (no CUDA graph)
    static   (cuda with decoder_static or the CUDA decoder_fused: the default there) one preallocated [1,H_kv,S,hd]
             buffer per layer and part, bound as past and present (written in place): every decode step has the
             same shapes and addresses, captured once as a CUDA graph and replayed; prefill runs outside it

Per decode step the token's embedding row goes in, the logits [1,V] and hidden [1,D] rows come back. S =
min(max_context, 4096) or `max_cache` (static: decode reads all S slots; inplace: grows when full).

decoder_fused (export/fused.py: ONNX Runtime's fused contrib ops, same inputs and outputs; ~10 nodes per layer
against ~74 of the traced decoder after ORT's load) runs instead where runtimes/decoder_flavour.py says: on CPU
with the in-place cache, on CUDA (its CUDA target) with one device buffer (runtimes/fused_device.py: kv_cache
'static', CUDA graph). decoder_flavour="plain" / PIPMM_DECODER=plain forces the traced graphs. docs/gpu.md.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np

from .decoder_flavour import (FUSED_DECODER, choose_flavour, decoder_spinning, decoder_threads, separate_prefill,
                              session_options, spinning_default, token_step_choice)
from .fused_device import DeviceBufferCaches
from .inplace_cache import InPlaceCaches, cpu_cache
from .kv_caches import STATIC_DECODER, DeviceKVCache, KVCache, resolve_cache
from .positions import following, step_positions
from .prompt_encoder import choose_prompt_encoder, run_prompt_encoder
from .vision_output import VisionOutput

from sdk.bundle import Bundle
from sdk.manifest import Graph
from sdk.manifest_fused import FusedDecoderEntry
from sdk.errors import BackendError, BundleError, PipmmError, one_line

# device -> execution providers, most preferred first
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# where OrtValues of a device live
ORT_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}
DEFAULT_MAX_CACHE = 4096
HOST_EMBED_TABLE_BYTES = 4 << 20  # default model: 512 x 256 float32 = 0.5 MB; a 0.5B model's 540 MB stays in the graph
KV_CACHES = ("inplace", "numpy", "device", "static")
ADAPTER_GRAPHS = ("adapter",)  # opened when the bundle has them (sdk/frames.py)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


# Graph optimizers left off for a static-int8 (QDQ) graph: CommonSubexpressionElimination merges the identical Q/DQ
# pairs that quantize_static's DedicatedQDQPair writes, one per consumer (export/precision/quantize.py), back into one
# pair shared by several MatMuls, and ONNX Runtime's QDQ fusion then leaves those as DequantizeLinear + fp32 MatMul
# on every run instead of QLinearMatMul (m21's vision graph: 26 of 50 weight MatMuls fused with it, 50 without;
# 27.5 -> 19.9 ms a run on 2 cores).
QDQ_KEEP_PAIRS = ["CommonSubexpressionElimination"]


def _io_kind(dtype: str) -> str:
    """An input's dtype as decoder_fused must match the plain decoder's: any float width (a quantized CPU
    decoder_fused of an fp16 bundle computes in fp32, export/extra_graphs.py _build_precision; every feed is cast to
    the running graph's dtypes, read below), else the dtype itself."""
    return "float" if dtype in ("float16", "float32", "bfloat16") else dtype


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from err
    return onnxruntime


class OnnxRuntimeBackend:
    name = "onnxruntime"

    @staticmethod
    def available() -> bool:
        try:
            _ort()
        except BackendError:
            return False
        return True

    @staticmethod
    def resolve_device(device: str) -> str:
        available = set(_ort().get_available_providers())
        if device == "auto":
            return "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device not in PROVIDERS:
            raise BackendError(f"unknown device {device!r}: choose auto, {', '.join(PROVIDERS)}")
        if PROVIDERS[device][0] not in available:
            raise BackendError(f"device {device!r} needs {PROVIDERS[device][0]}, which this onnxruntime lacks "
                               f"(it has {', '.join(sorted(available))}): install onnxruntime-gpu or use device='cpu'")
        return device

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None, kv_cache: str = "auto",
                 cuda_graph: bool | None = None, max_cache: int | None = None, device_id: int = 0,
                 engine_cache: str | None = None, decoder_flavour: str | None = None, spinning: bool | None = None):
        ort = _ort()
        self.bundle = bundle
        self.device = self.resolve_device(device)
        self.device_id = int(device_id)
        self.ort_device = ORT_DEVICE[self.device]
        model = bundle.manifest.model
        self.num_layers, self.num_kv_heads, self.head_dim = model.num_layers, model.num_kv_heads, model.head_dim
        self.max_context = model.max_context
        asked_cache = kv_cache
        if kv_cache not in KV_CACHES + ("auto",):
            raise BackendError(f"kv_cache {kv_cache!r}: choose auto, {', '.join(KV_CACHES)}")
        fused, self.decoder_flavour_note = choose_flavour(bundle, self.device, kv_cache, decoder_flavour)
        # decoder_fused over one device KV buffer (runtimes/fused_device.py): CUDA, or the CPU with kv_cache='static'
        self.fused_device = fused and (self.device != "cpu" or kv_cache == "static")
        self.kv_cache = kv_cache = resolve_cache(bundle, self.device, kv_cache, self.fused_device)
        self.static_cache = kv_cache == "static"
        if cuda_graph and not (self.static_cache and self.device == "cuda"):
            raise BackendError("cuda_graph=True needs device='cuda' and the static KV cache (a bundle with "
                               f"{STATIC_DECODER}, kv_cache 'static' or 'auto')")
        self.cuda_graph = bool(self.static_cache and self.device == "cuda" if cuda_graph is None else cuda_graph)
        self.cuda_graph_note: str | None = None
        self.decoder_graph = FUSED_DECODER if fused else (STATIC_DECODER if self.static_cache else "decoder")
        wanted = max_cache or int(os.environ.get("PIPMM_MAX_CACHE", 0)) or min(self.max_context, DEFAULT_MAX_CACHE)
        self.cache_slots = max(2, min(int(wanted), self.max_context))  # static: fixed; inplace: the first size
        self.engine_cache = engine_cache
        if not fused and kv_cache == "inplace":
            raise BackendError(f"kv_cache 'inplace' needs {FUSED_DECODER} (GroupQueryAttention writes the shared "
                               f"buffer) and this backend runs the plain decoder: {self.decoder_flavour_note}")

        self.spinning = spinning_default(self.device) if spinning is None else bool(spinning)
        threads = threads or int(os.environ.get("PIPMM_THREADS", 0)) or None
        self.options = session_options(ort, self.ort_device, threads, self.spinning)
        # a small decoder on CPU runs on one thread (runtimes/decoder_flavour.py decoder_threads: measured)
        self.decoder_threads = decoder_threads(bundle, self.decoder_graph, self.device, threads)
        self.decoder_spinning = decoder_spinning(self.spinning)  # PIPMM_DECODER_SPINNING: the decoder's alone
        self.decoder_options = self.options if (self.decoder_threads, self.decoder_spinning) == (threads, self.spinning) \
            else session_options(ort, self.ort_device, self.decoder_threads, self.decoder_spinning)
        self.sessions = {}
        # + the frame adapter of a qformer/mivpg bundle (sdk/frames.py)
        for name in ("vision",) + tuple(g for g in ADAPTER_GRAPHS if g in bundle.graphs):
            self.sessions[name] = self._open(name)
        self.sessions[self.decoder_graph] = self._open_decoder()
        # decoder_fused's token step (sdk/manifest_fused.py: input_ids in, next_token out), where it has one. Its
        # decode steps never run the embed graph, whose rows (prefills) go through the host anyway: on a GPU the
        # embed graph then runs on the CPU, so the device holds the table once (the decoder's Gather), not twice.
        token_ids, self.token_step_note = token_step_choice(bundle, self.decoder_graph, self.static_cache)
        self.embed_device = "cpu" if token_ids else self.device
        self.sessions["embed"] = self._open("embed", session_options(ort, "cpu", 1, False), "cpu") \
            if self.embed_device != self.device else self._open("embed")
        # calls of T > 1 on every core where decode steps run on one (runtimes/decoder_flavour.py separate_prefill)
        self.prefill_session = self._open(self.decoder_graph, self.options) if separate_prefill(
            self.device, self.decoder_threads, threads, not self.static_cache) else self.sessions[self.decoder_graph]
        # PIP-MM's first-L-layers prompt encoder, when the bundle has one (runtimes/prompt_encoder.py)
        self.prompt_encoder_graph, self.prompt_encoder_note = choose_prompt_encoder(bundle, self.decoder_graph)
        if self.prompt_encoder_graph:
            self.sessions[self.prompt_encoder_graph] = self._open(self.prompt_encoder_graph)
        self.kv_cache_note = None  # why the CPU runs the numpy cache, where it does
        if self.device == "cpu" and asked_cache in ("auto", "inplace"):
            self.kv_cache, self.kv_cache_note = cpu_cache(bundle, self.decoder_graph, self.decoder_flavour_note)
        decoder_inputs = {i.name: i for i in bundle.graphs[self.decoder_graph].inputs}
        self.kv_dtype = _NUMPY_DTYPES[decoder_inputs["past_key_values.0.key"].dtype]
        self.embed_dtype = _NUMPY_DTYPES[decoder_inputs["inputs_embeds"].dtype]
        vision_inputs = {i.name: i for i in bundle.graphs["vision"].inputs}
        self.pixel_dtype = _NUMPY_DTYPES[vision_inputs["pixel_values"].dtype]
        # the decoder's dtype, except in an fp16 bundle with a static-int8 vision graph (float32 in and out)
        prompt_input = vision_inputs.get("prompt_vector")
        self.prompt_vector_dtype = _NUMPY_DTYPES[prompt_input.dtype] if prompt_input else self.embed_dtype
        decoder_outputs = {o.name: o for o in bundle.graphs[self.decoder_graph].outputs}
        self.logits_dtype = _NUMPY_DTYPES[decoder_outputs["logits"].dtype]
        self.hidden_dtype = _NUMPY_DTYPES[decoder_outputs["hidden"].dtype]
        self.hidden_size = model.hidden_size
        # CMAI (sdk/cmai.py): image_bias [B,L_c,P+T] in, attention [B,L_c,T,P+T] out; bundles before it (and
        # decoder_static) have neither: nothing is fed, and inhibition is refused in one line.
        bias = decoder_inputs.get("image_bias")
        self.bias_layers = int(bias.shape[1]) if bias else 0
        self.bias_dtype = _NUMPY_DTYPES[bias.dtype] if bias else None
        # zeros for calls without a bias, fed as views (read-only for the graph) rather than new arrays per token
        self._zero_bias = np.zeros(self.bias_layers * self.max_context, self.bias_dtype) if bias else None
        self.has_attention = "attention" in decoder_outputs
        self.token_input = FusedDecoderEntry.of(bundle).token_input if self.decoder_graph == FUSED_DECODER else None
        self.step_outputs = ["logits", "hidden", *self._kv_names("present")]  # what a generation step reads
        self.vocab_size = model.vocab_size
        # The cache kind's constructor and decode step, chosen once here rather than per call by the cache's type.
        kinds = {"numpy": (self._new_dynamic_cache, self._decode_numpy),
                 "device": (partial(self._new_dynamic_cache, kind=DeviceKVCache), self._decode_device)}
        embed_out = bundle.graphs["embed"].outputs[0]  # bound straight into the decoder's input row where it fits
        embed_binds = embed_out.name == "inputs_embeds" and embed_out.dtype == np.dtype(self.embed_dtype).name
        # an fp16 embed graph before an fp32 decoder (a quantized decoder_fused of an fp16 bundle): the host table
        # holds its rows widened, exactly, and the token step copies them as for a bound embed graph
        host_rows = embed_out.name == "inputs_embeds" and _io_kind(embed_out.dtype) == "float"
        self._token_step, self._buffer = None, None  # decode_token's in-place path (token id -> logits)
        # a small vocabulary's embedding rows on the host: the in-place token step copies its row instead of
        # running the embed graph (one session run less per token; inplace_cache.py token_step)
        self.embed_table = self._host_embed_table() if self.kv_cache == "inplace" and host_rows else None
        if self.kv_cache == "inplace":
            self._inplace = InPlaceCaches(ort, self.sessions[FUSED_DECODER], self)
            kinds["inplace"] = (self._inplace.new_cache, self._inplace.step)
            self._token_step = self._inplace.token_step if embed_binds or self.embed_table is not None else None
        if self.static_cache:  # one device buffer: decoder_fused's (slot = order) or decoder_static's (= position)
            entry = token_ids and FusedDecoderEntry.of(bundle)
            self._buffer = DeviceBufferCaches(ort, self.sessions[self.decoder_graph], self, self.cuda_graph,
                                              by_position=self.decoder_graph == STATIC_DECODER, token_ids=token_ids,
                                              device_argmax=bool(entry and entry.next_token))
            kinds["static"] = (self._buffer.new_cache, self._buffer.step)
            self._token_step = self._buffer.token_step if embed_binds or token_ids else None
        self._new_cache, self._decode_step = kinds[self.kv_cache]

    # -- sessions ---------------------------------------------------------------------------------

    def _host_embed_table(self) -> np.ndarray | None:
        """The embed graph's rows [V, D] for every id, read-only, where they take at most HOST_EMBED_TABLE_BYTES
        (PIPMM_HOST_EMBED=0: none). A Gather copies rows, so a row taken here is the graph's own bits. After a
        decode step streamed the decoder's weights, the embed graph's run is cold: 19 us a token on the default
        model (scripts/cpu_describe_profile.py), where the row copy is 1."""
        if os.environ.get("PIPMM_HOST_EMBED", "1").strip() in ("0", "false", "no"):
            return None
        if self.vocab_size * self.hidden_size * np.dtype(self.embed_dtype).itemsize > HOST_EMBED_TABLE_BYTES:
            return None
        table = np.ascontiguousarray(self.embed(np.arange(self.vocab_size, dtype=np.int64)[None])[0], self.embed_dtype)
        table.setflags(write=False)
        return table

    def provider_options(self, graph: str) -> list:
        """The providers, with this backend's options (device id, arena, TF32), for an optional graph that another
        part of the SDK opens itself (referring's energy_grad), without a CUDA graph."""
        return self._provider_options(graph, False)

    def _provider_options(self, graph: str, cuda_graph: bool, device: str | None = None) -> list:
        if (device or self.device) == "cpu":
            return list(PROVIDERS["cpu"])
        cuda = {"device_id": str(self.device_id), "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
        if cuda_graph:
            cuda["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        if self.device == "tensorrt":
            from .tensorrt import ort_tensorrt_options

            providers.insert(0, ("TensorrtExecutionProvider",
                                 ort_tensorrt_options(self.bundle, graph, self.device_id, self.engine_cache)))
        return providers

    def _open_decoder(self):
        """The decoder's session; decoder_fused falls back to the plain graph (reason in info()) if it cannot run."""
        if self.decoder_graph != FUSED_DECODER:
            return self._open(self.decoder_graph)
        plain, fused = self.bundle.graphs["decoder"], self.bundle.graphs[FUSED_DECODER]
        entry = FusedDecoderEntry.of(self.bundle)
        cmai = () if entry.cmai else ("image_bias", "attention")  # the CUDA target has no CMAI
        if [(i.name, _io_kind(i.dtype)) for i in plain.inputs if i.name not in cmai] != \
                [(i.name, _io_kind(i.dtype)) for i in fused.inputs] or \
                [o.name for o in plain.outputs if o.name not in cmai] != \
                [o.name for o in fused.outputs if o.name != entry.next_token]:
            reason = f"{FUSED_DECODER}'s inputs/outputs differ from decoder's (re-add it with --overwrite)"
        else:
            try:
                return self._open(FUSED_DECODER)
            except (BundleError, BackendError) as err:
                reason = f"{FUSED_DECODER} did not load: {one_line(err, 200)}"
        self.decoder_flavour_note = reason
        if self.static_cache and STATIC_DECODER not in self.bundle.graphs:  # the fused device cache's fallback
            self.kv_cache, self.static_cache, self.cuda_graph = "device", False, False
        self.decoder_graph = STATIC_DECODER if self.static_cache else "decoder"
        return self._open(self.decoder_graph)

    def _open(self, name: str, options=None, device: str | None = None):
        ort = _ort()
        spec = self.bundle.graphs[name]
        device = device or self.device
        graph_capture = self.cuda_graph and name == self.decoder_graph
        path = str(self.bundle.graph_path(name))
        options = options or (self.decoder_options if name.startswith("decoder") else self.options)
        disabled = QDQ_KEEP_PAIRS if "QDQ" in str(self.bundle.manifest.precision.details.get(name, {}).get("method")) \
            else None
        try:
            try:
                session = ort.InferenceSession(path, sess_options=options, disabled_optimizers=disabled,
                                               providers=self._provider_options(name, graph_capture, device))
            except Exception as err:
                if not graph_capture:
                    raise
                # ORT refuses graph capture when some node runs on the CPU with a copy in between: run without.
                self.cuda_graph, graph_capture = False, False
                self.cuda_graph_note = f"CUDA graph refused by onnxruntime: {one_line(err, 300)}"
                session = ort.InferenceSession(path, sess_options=options, disabled_optimizers=disabled,
                                               providers=self._provider_options(name, False))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(f"graph {name} ({spec.file}) cannot be loaded by onnxruntime: "
                              f"{str(err).splitlines()[0][:200]}; copy or re-export the bundle") from err
        self._check_signature(name, spec, session)
        wanted = PROVIDERS[device][0]
        if wanted not in session.get_providers():
            raise BackendError(f"onnxruntime could not start {wanted} for graph {name} (it fell back to "
                               f"{', '.join(session.get_providers())}): check the CUDA/cuDNN libraries that "
                               "onnxruntime-gpu needs, or use device='cpu'")
        return session

    @staticmethod
    def _check_signature(name: str, spec: Graph, session) -> None:
        """The graph file must have exactly the inputs and outputs the manifest promises."""
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        want_in = [i.name for i in spec.inputs]
        want_out = [o.name for o in spec.outputs]
        if got_in != want_in or got_out != want_out:
            raise BundleError(f"graph {name} has inputs {got_in} / outputs {got_out} but the manifest says "
                              f"{want_in} / {want_out}: the bundle is inconsistent; re-export it")

    def info(self) -> dict:
        """What runs where, for benchmarks and bug reports."""
        ort = _ort()
        kv_bytes = 2 * self.num_layers * self.num_kv_heads * self.cache_slots * self.head_dim * \
            np.dtype(self.kv_dtype).itemsize if self.static_cache else None
        return {"backend": self.name, "onnxruntime": ort.__version__, "device": self.device,
                "providers": {name: s.get_providers()[0] for name, s in self.sessions.items()},
                "decoder_graph": self.decoder_graph, "decoder_flavour_note": self.decoder_flavour_note,
                "prompt_encoder_graph": self.prompt_encoder_graph, "prompt_encoder_note": self.prompt_encoder_note,
                "kv_cache": self.kv_cache, "kv_cache_note": self.kv_cache_note,
                "static_cache_slots": self.cache_slots if self.static_cache else None, "static_cache_bytes": kv_bytes,
                "inplace_cache_bytes": self._inplace.nbytes if self.kv_cache == "inplace" else None,
                "host_embed_table_bytes": None if self.embed_table is None else self.embed_table.nbytes,
                "token_step": self._buffer is not None and "ids" in self._buffer.bindings,
                "device_argmax": self._buffer is not None and self._buffer.device_argmax,
                "token_step_note": self.token_step_note, "embed_device": self.embed_device,
                "cuda_graph": self._buffer.cuda_graph if self._buffer else self.cuda_graph,
                "cuda_graph_note": (self._buffer and self._buffer.cuda_graph_note) or self.cuda_graph_note,
                "graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_threads": self.options.intra_op_num_threads or "default",
                "decoder_intra_op_threads": self.decoder_threads or "default",
                "prefill_session": "separate, intra-op threads as the other sessions'" if
                self.prefill_session is not self.sessions[self.decoder_graph] else "the decoder's",
                "spinning": self.spinning, "decoder_spinning": self.decoder_spinning}

    # -- graphs -----------------------------------------------------------------------------------

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def vision(self, pixel_values: np.ndarray, prompt_vector: np.ndarray | None) -> VisionOutput:
        if (pixel_values.dtype == np.uint8) != (self.pixel_dtype == np.uint8):  # never cast pixels across the two
            raise BackendError(f"the vision graph takes {np.dtype(self.pixel_dtype).name} pixels, not "
                               f"{pixel_values.dtype}: make them with sdk.preprocess.pixel_input(image, preprocessing)")
        feeds = {"pixel_values": pixel_values.astype(self.pixel_dtype)}
        if prompt_vector is not None:
            feeds["prompt_vector"] = prompt_vector.astype(self.prompt_vector_dtype)
        session = self.sessions["vision"]
        names = [o.name for o in session.get_outputs()]
        return VisionOutput.from_graph(dict(zip(names, session.run(names, feeds))))

    def prompt_hidden(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """The prompt_encoder graph over [B,T,D] -> hidden [B,T,D] (only when prompt_encoder_graph is set)."""
        return run_prompt_encoder(self.sessions[self.prompt_encoder_graph], inputs_embeds, self.embed_dtype)

    def adapter(self, frame_tokens: np.ndarray, frame_mask: np.ndarray,
                frame_positions: np.ndarray | None = None) -> np.ndarray:
        """[1,N_max,K,D], [1,N_max] (1 = a frame) (, [1,N_max,K] patch indices when the graph takes them) ->
        visual_tokens [1,R,D] (qformer/mivpg bundles)."""
        if "adapter" not in self.sessions:
            raise BundleError(f"bundle {self.bundle.path} has no adapter graph: add one with 'pipmm add-graphs "
                              "BUNDLE --adapter DIR'")
        inputs = self.bundle.graphs["adapter"].inputs
        values = {"frame_tokens": frame_tokens, "frame_mask": frame_mask, "frame_positions": frame_positions}
        feeds = {io.name: values[io.name].astype(_NUMPY_DTYPES[io.dtype]) for io in inputs}
        return self.sessions["adapter"].run(["visual_tokens"], feeds)[0]

    def new_cache(self, batch: int = 1):
        return self._new_cache(batch)

    def _new_dynamic_cache(self, batch: int, kind: type = KVCache):
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        return kind(past=[empty] * (2 * self.num_layers), length=0, mask=np.zeros((batch, 0), np.int64))

    def _image_bias(self, batch: int, total: int, image_bias: np.ndarray | None) -> np.ndarray | None:
        """The decoder's image_bias feed [B,L_c,P+T]: zeros unless given; None when the graph has no such input."""
        if not self.bias_layers:
            if image_bias is not None:
                raise BundleError(f"the {self.decoder_graph} graph of bundle {self.bundle.path} takes no image_bias "
                                  "(exported before CMAI or with --cmai-layers none, or a static KV cache): "
                                  "re-export it with 'pipmm export', or run without inhibit")
            return None
        if image_bias is None:
            if batch != 1 or total > self.max_context:
                return np.zeros((batch, self.bias_layers, total), self.bias_dtype)
            return self._zero_bias[:self.bias_layers * total].reshape(1, self.bias_layers, total)
        if image_bias.shape != (batch, self.bias_layers, total):
            raise BackendError(f"image_bias has shape {image_bias.shape}, the call needs {(batch, self.bias_layers, total)}")
        return np.ascontiguousarray(image_bias, self.bias_dtype)

    def decode_token(self, token_id: int, cache, image_bias: np.ndarray | None = None, greedy: bool = False):
        """Pipeline.decode's embed + decoder -> (logits [1,V], cache + 1); in place on bound arrays where it can.
        greedy: a DeviceChoice (sdk/generation.py) instead of the logits where the device makes the argmax."""
        if image_bias is None and self._token_step is not None:
            try:
                return self._token_step(self.sessions["embed"], token_id, cache, greedy)
            except PipmmError:
                raise
            except Exception as err:  # onnxruntime's own: the token step refused on its first run, not later
                if self._buffer is None or not self._buffer.refuse_token_step():
                    raise
                self._token_step = None  # the embed graph runs on the CPU now: its rows go through the host
                self.token_step_note = f"the token step failed on its first run: {one_line(err, 300)}"
        logits, _, cache = self.decoder(self.embed(np.asarray([[token_id]], np.int64)), cache, image_bias=image_bias)
        return logits, cache

    def decoder(self, inputs_embeds: np.ndarray, cache, position_ids: np.ndarray | None = None,
                image_bias: np.ndarray | None = None):
        """[B,T,D] -> (logits [B,V], hidden [B,T,D], grown cache); position_ids [B,T] or contiguous;
        image_bias [B,L_c,P+T] (CMAI bundles; None = zeros)."""
        return self._decoder(inputs_embeds, cache, position_ids, image_bias, attention=False)[:3]

    def attention(self, inputs_embeds: np.ndarray, cache, position_ids: np.ndarray | None = None) -> np.ndarray:
        """CMAI's probe: attention [B,L_c,T,P+T] of this call's queries at the CMAI layers (no bias); the
        grown cache is dropped, `cache` stays valid (numpy and device caches are never written in place, the
        in-place one only after `cache.length`)."""
        if not self.has_attention:
            raise BundleError(f"the {self.decoder_graph} graph of bundle {self.bundle.path} has no attention output "
                              "(exported before CMAI or with --cmai-layers none, or a static KV cache): re-export "
                              "it with 'pipmm export', or run without inhibit")
        return self._decoder(inputs_embeds, cache, position_ids, None, attention=True)[3]

    def _decoder(self, inputs_embeds: np.ndarray, cache, position_ids, image_bias, attention: bool):
        """-> (logits, hidden, grown cache, attention or None) from the decode step of this backend's cache kind."""
        b, t, _ = inputs_embeds.shape
        positions = step_positions(cache.next_position, b, t, position_ids)
        # decoder_static has no image_bias input: a bias is refused here, and attention() refuses before this.
        bias = self._image_bias(b, cache.length + t, image_bias)
        return self._decode_step(inputs_embeds, cache, positions, bias, attention)

    # -- numpy cache (CPU, plain decoder; the in-place one is runtimes/inplace_cache.py) -------------

    def _decode_numpy(self, inputs_embeds: np.ndarray, cache: KVCache, positions: np.ndarray,
                      bias: np.ndarray | None, attention: bool):
        b, t, _ = inputs_embeds.shape
        mask = np.concatenate([cache.mask, np.ones((b, t), np.int64)], axis=1)
        feeds = {
            "inputs_embeds": inputs_embeds.astype(self.embed_dtype),
            "attention_mask": mask,
            "position_ids": positions,
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = cache.past[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache.past[2 * i + 1]
        if bias is not None:
            feeds["image_bias"] = bias
        if b > 1 and self.token_input:  # the optional input_ids' default is [1,0]: batch 1
            feeds[self.token_input] = np.zeros((b, 0), np.int64)
        fetch = self.step_outputs + (["attention"] if attention else [])
        session = self.prefill_session if t > 1 else self.sessions[self.decoder_graph]
        logits, hidden, *present = session.run(fetch, feeds)
        probs = present.pop() if attention else None
        return logits, hidden, KVCache(past=present, length=cache.length + t, mask=mask,
                                       next_position=following(positions)), probs

    # -- device cache (dynamic shapes, IO binding) ------------------------------------------------

    def _kv_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{part}" for i in range(self.num_layers) for part in ("key", "value")]

    def _decode_device(self, inputs_embeds: np.ndarray, cache: DeviceKVCache, positions: np.ndarray,
                       bias: np.ndarray | None, attention: bool):
        # `attention` is not looked at: the output is bound (and returned) whenever the graph has it.
        b, t, _ = inputs_embeds.shape
        mask = np.concatenate([cache.mask, np.ones((b, t), np.int64)], axis=1)
        session = self.sessions["decoder"]
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, self.embed_dtype))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        if bias is not None:
            binding.bind_cpu_input("image_bias", bias)
        for name, value in zip(self._kv_names("past_key_values"), cache.past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        binding.bind_output("hidden", "cpu")
        for name in self._kv_names("present"):
            binding.bind_output(name, self.ort_device, self.device_id)
        if self.has_attention:
            binding.bind_output("attention", "cpu")
        session.run_with_iobinding(binding)
        logits, hidden, *present = binding.get_outputs()
        probs = present.pop().numpy() if self.has_attention else None
        return logits.numpy(), hidden.numpy(), DeviceKVCache(past=present, length=cache.length + t, mask=mask,
                                                                next_position=following(positions)), probs
