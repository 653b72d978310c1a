"""TensorRT: engines built from a bundle's ONNX graphs on the target, cached, and run with device buffers.

    pipmm build-engines BUNDLE [--precision fp16|int8|fp32]      # once per GPU / TensorRT version / bundle
    sdk.load(BUNDLE, backend="tensorrt")                         # then runs them

Written to the public TensorRT 10 Python API (tensorrt.Builder, OnnxParser, IBuilderConfig with optimization
profiles and a timing cache, Runtime.deserialize_cuda_engine, IExecutionContext.set_input_shape /
set_tensor_address / execute_async_v3) and cuda-python's runtime bindings for device memory; no torch.
TensorRT could not be installed where this project is developed, so only the parts below that do not need it
(profiles, cache keys, the refusal of foreign engines, the error when it is missing) are tested there; the
real-engine tests run wherever `import tensorrt` works. docs/gpu.md says what was and was not run.

Engines live under ENGINE_ROOT (default ~/.cache/pipmm/engines, or $PIPMM_ENGINE_CACHE) in one directory per
key = (GPU name, compute capability, TensorRT version, bundle hash, precision), with `engine.json` beside them
recording the key, the profiles and the build settings. An engine is only ever loaded by a machine whose key
is the same; anything else is refused with a one-line message saying how to rebuild.

Profiles come from the manifest's axis names: `batch` 1..max_batch, `sequence` 1..max_context; the decoder
gets two profiles (prefill: past 0, any sequence; decode: sequence 1, past 1..max_context-1), each run by
its own execution context. The KV cache stays on the device in two buffers per layer and part, of the
maximum context each: a step reads one and writes the grown cache into the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .positions import following, step_positions
from .vision_output import VisionOutput

from sdk.bundle import Bundle, load_bundle
from sdk.errors import BackendError
from sdk.manifest import Manifest

ENGINE_FORMAT = "pipmm-trt-engines/1"
PRECISIONS = ("fp16", "int8", "fp32")
GRAPHS = ("vision", "embed", "decoder")
ADAPTER = "adapter"  # + the frame adapter, static shapes, when the bundle has it (sdk/frames.py)
DEFAULT_WORKSPACE_GB = 4.0


class TensorRTMissingError(BackendError):
    """TensorRT (or cuda-python) is not importable here."""


class EngineMismatchError(BackendError):
    """Engines exist but were built for another GPU, TensorRT version, bundle or precision."""


class EngineMissingError(BackendError):
    """No engines were built for this bundle on this machine yet."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTMissingError(
            "TensorRT is not installed: install it from NVIDIA (pip install tensorrt --extra-index-url "
            "https://pypi.nvidia.com, or JetPack on a Jetson), or use --backend onnxruntime --device cuda") from err
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as err:
            raise TensorRTMissingError("the TensorRT backend needs cuda-python for device memory: "
                                       "pip install cuda-python") from err
    return cudart


# -- keys -----------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    compute_capability: str
    tensorrt: str
    bundle: str  # Bundle.content_hash
    precision: str

    @property
    def dirname(self) -> str:
        cc = self.compute_capability.replace(".", "")
        return f"{_slug(self.gpu)}_sm{cc}_trt{self.tensorrt}_{self.precision}_{self.bundle[:16]}"

    def describe(self) -> str:
        return f"{self.gpu} (sm {self.compute_capability}), TensorRT {self.tensorrt}, {self.precision}, " \
               f"bundle {self.bundle[:12]}"

    def mismatch(self, other: "EngineKey") -> list[str]:
        """The fields in which `other` (what an engine was built for) differs from this machine's key."""
        names = {"gpu": "GPU", "compute_capability": "compute capability", "tensorrt": "TensorRT version",
                 "bundle": "bundle", "precision": "precision"}
        return [names[k] for k, v in asdict(self).items() if asdict(other)[k] != v]


def engine_root(root=None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("PIPMM_ENGINE_CACHE") or Path.home() / ".cache" / "pipmm" / "engines")


def gpu_identity(device_id: int = 0) -> tuple[str, str]:
    """(name, compute capability) of the GPU: NVML first, cuda-python otherwise."""
    from .device_info import gpu_identity as nvml_identity

    found = nvml_identity(device_id)
    if found is not None:
        return found
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(device_id)
    if int(err) != 0:
        raise BackendError(f"no CUDA GPU {device_id} here (cudaGetDeviceProperties: {err}): TensorRT needs one")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def current_key(bundle: Bundle, precision: str, device_id: int = 0, tensorrt_version: str | None = None) -> EngineKey:
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: choose {', '.join(PRECISIONS)}")
    version = tensorrt_version or import_tensorrt().__version__
    name, cc = gpu_identity(device_id)
    return EngineKey(gpu=name, compute_capability=cc, tensorrt=version, bundle=bundle.content_hash, precision=precision)


def read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / "engine.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == ENGINE_FORMAT else None


def key_of(meta: dict) -> EngineKey:
    return EngineKey(**{k: str(meta["key"][k]) for k in ("gpu", "compute_capability", "tensorrt", "bundle", "precision")})


def find_engines(root: Path, key: EngineKey, bundle_path, explicit: Path | None = None) -> Path:
    """The engine directory for `key`, or a one-line refusal: engines of another key are never loaded."""
    rebuild = f"pipmm build-engines {bundle_path} --precision {key.precision}"
    directory = explicit if explicit is not None else root / key.dirname
    meta = read_meta(directory) if directory.is_dir() else None
    if meta is not None:
        built_for = key_of(meta)
        if built_for != key:
            raise EngineMismatchError(
                f"engines in {directory} were built for {built_for.describe()}, this is {key.describe()} "
                f"(differs in {', '.join(key.mismatch(built_for))}): run '{rebuild} --rebuild'")
        missing = [g for g in GRAPHS if not (directory / f"{g}.engine").is_file()]
        if missing:
            raise EngineMissingError(f"engines in {directory} lack {', '.join(missing)}: run '{rebuild} --rebuild'")
        return directory
    if explicit is not None:
        raise EngineMissingError(f"{explicit} holds no pipmm engines (engine.json): run '{rebuild}'")
    others = [key_of(m) for d in sorted(root.glob(f"*_{key.bundle[:16]}")) if (m := read_meta(d)) is not None]
    if others:
        raise EngineMismatchError(f"engines for this bundle exist only for {others[0].describe()}, this is "
                                  f"{key.describe()}: run '{rebuild}'")
    raise EngineMissingError(f"no TensorRT engines for {bundle_path} on {key.gpu} with TensorRT {key.tensorrt}: "
                             f"run '{rebuild}'")


# -- profiles -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_batch: int = 1
    max_context: int = 4096
    opt_sequence: int = 640  # a turn with 576 visual tokens
    opt_past: int = 700


def limits_for(manifest: Manifest, max_batch: int = 1, max_context: int | None = None) -> Limits:
    context = min(int(max_context or manifest.model.max_context), manifest.model.max_context)
    turn = min(manifest.visual_tokens.count + 64, context - 1)
    return Limits(max_batch=max_batch, max_context=context, opt_sequence=max(turn, 1),
                  opt_past=max(1, min(turn + 32, context - 1)))


def _ranges(limits: Limits, profile: str) -> dict[str, tuple[int, int, int]]:
    b = (1, 1, limits.max_batch)
    c = limits.max_context
    if profile == "prefill":  # also the prompt encoder: past empty, any length
        return {"batch": b, "sequence": (1, limits.opt_sequence, c), "past_sequence": (0, 0, 0),
                "total_sequence": (1, limits.opt_sequence, c)}
    if profile == "decode":
        return {"batch": b, "sequence": (1, 1, 1), "past_sequence": (1, limits.opt_past, c - 1),
                "total_sequence": (2, limits.opt_past + 1, c)}
    return {"batch": b, "sequence": (1, limits.opt_sequence, c), "past_sequence": (0, limits.opt_past, c - 1),
            "total_sequence": (1, limits.opt_past + 1, c)}


PROFILES = {"vision": ("all",), "embed": ("all",), "decoder": ("prefill", "decode"), ADAPTER: ("all",)}


def derive_profiles(manifest: Manifest, graph: str, limits: Limits) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """Per optimization profile: input name -> (min, opt, max) shapes, from the manifest's axis names."""
    profiles = []
    for profile in PROFILES.get(graph, ("all",)):
        ranges = _ranges(limits, profile)
        shapes = {}
        for spec in manifest.graphs[graph].inputs:
            lo, opt, hi = [], [], []
            for axis in spec.shape:
                if isinstance(axis, int):
                    lo.append(axis), opt.append(axis), hi.append(axis)
                elif axis in ranges:
                    a, o, z = ranges[axis]
                    lo.append(a), opt.append(o), hi.append(z)
                else:
                    raise BackendError(f"graph {graph} input {spec.name} has a dynamic axis {axis!r} with no "
                                       "TensorRT range: re-export the bundle with this pipmm-edge")
            shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
        profiles.append(shapes)
    return profiles


def _shape_string(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in triple[which])}" for name, triple in shapes.items())


def ort_tensorrt_options(bundle: Bundle, graph: str, device_id: int = 0, root=None,
                         max_batch: int = 1, max_context: int | None = None) -> dict:
    """Provider options of ONNX Runtime's TensorRT execution provider for one graph: FP16 (and INT8 for a
    QDQ bundle), engine and timing caches under the same key as native engines, explicit profiles."""
    precision = bundle.manifest.precision.default
    trt_precision = "int8" if precision in ("int8", "int4") else "fp16"
    try:
        version = import_tensorrt().__version__
    except TensorRTMissingError:
        version = "ort"  # TensorRT libraries loaded by onnxruntime itself; its engine headers carry the version
    try:
        name, cc = gpu_identity(device_id)
    except BackendError:
        name, cc = "gpu", "unknown"
    key = EngineKey(name, cc, version, bundle.content_hash, trt_precision)
    directory = engine_root(root) / "onnxruntime" / key.dirname
    directory.mkdir(parents=True, exist_ok=True)
    limits = limits_for(bundle.manifest, max_batch, max_context)
    # One range per input covering every profile (ONNX Runtime builds one engine per graph).
    merged: dict[str, tuple] = {}
    for shapes in derive_profiles(bundle.manifest, graph, limits):
        for input_name, (lo, opt, hi) in shapes.items():
            if input_name in merged:
                plo, popt, phi = merged[input_name]
                lo, hi = tuple(map(min, plo, lo)), tuple(map(max, phi, hi))
                opt = popt
            merged[input_name] = (lo, opt, hi)
    options = {"device_id": str(device_id), "trt_fp16_enable": "1", "trt_int8_enable": str(int(trt_precision == "int8")),
               "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(directory),
               "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(engine_root(root) / "onnxruntime"),
               "trt_max_workspace_size": str(int(DEFAULT_WORKSPACE_GB * (1 << 30)))}
    dynamic = {n: s for n, s in merged.items() if s[0] != s[2]}
    if dynamic:
        options.update(trt_profile_min_shapes=_shape_string(dynamic, 0), trt_profile_opt_shapes=_shape_string(dynamic, 1),
                       trt_profile_max_shapes=_shape_string(dynamic, 2))
    return options


# -- building -------------------------------------------------------------------------------------

def _settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_engines(bundle_path, precision: str = "fp16", root=None, rebuild: bool = False, max_batch: int = 1,
                  max_context: int | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB, device_id: int = 0,
                  log=print) -> Path:
    """Build (or find up to date) the engines of a bundle for this GPU and TensorRT version."""
    trt = import_tensorrt()
    bundle = load_bundle(bundle_path, verify=True)
    if precision == "int8" and bundle.manifest.precision.default != "int8":
        raise BackendError("--precision int8 needs an int8 (QDQ) bundle: pipmm export --precision int8 "
                           "--int8-decoder static; or build fp16 engines")
    if not bundle.manifest.precision.tensorrt:
        raise BackendError(f"bundle {bundle_path} uses ONNX Runtime-only operators (MatMulNBits): export it for "
                           "TensorRT (docs/precision.md) or run it with --backend onnxruntime")
    key = current_key(bundle, precision, device_id, trt.__version__)
    graphs = GRAPHS + ((ADAPTER,) if ADAPTER in bundle.graphs else ())
    limits = limits_for(bundle.manifest, max_batch, max_context)
    settings = {"limits": asdict(limits), "workspace_gb": workspace_gb}
    directory = engine_root(root) / key.dirname
    meta = read_meta(directory)
    if (meta is not None and not rebuild and key_of(meta) == key and meta.get("settings_digest") == _settings_digest(settings)
            and all((directory / f"{g}.engine").is_file() for g in graphs)):
        log(f"engines in {directory} are up to date ({key.describe()})")
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    timing_path = engine_root(root) / f"timing_{_slug(key.gpu)}_sm{key.compute_capability}_trt{key.tensorrt}.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    profiles = {}
    for graph in graphs:
        start = time.perf_counter()
        profiles[graph] = derive_profiles(bundle.manifest, graph, limits)
        engine = _build_one(trt, logger, bundle.graph_path(graph), profiles[graph], precision, workspace_gb, timing_path)
        tmp = directory / f".{graph}.engine.tmp"
        tmp.write_bytes(engine)
        os.replace(tmp, directory / f"{graph}.engine")
        log(f"  {graph}: {len(engine) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    meta = {"format": ENGINE_FORMAT, "key": asdict(key), "settings": settings, "settings_digest": _settings_digest(settings),
            "profiles": {g: [{n: [list(s) for s in t] for n, t in p.items()} for p in ps] for g, ps in profiles.items()},
            "bundle_path": str(bundle.path), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (directory / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote engines to {directory}")
    return directory


def _build_one(trt, logger, onnx_path: Path, profiles: list[dict], precision: str, workspace_gb: float,
               timing_path: Path) -> bytes:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the bundle's Q/DQ nodes give the scales
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see its log above): try --precision fp32 "
                           "or a larger --workspace-gb")
    timing_path.parent.mkdir(parents=True, exist_ok=True)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# -- running --------------------------------------------------------------------------------------

def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed ({err}): check the GPU and its driver")
    return rest[0] if len(rest) == 1 else rest


class _Buffer:
    """One device allocation, grown on demand."""

    def __init__(self, cudart):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            if self.ptr:
                _check(self.cudart.cudaFree(self.ptr))
            self.ptr, self.nbytes = int(_check(self.cudart.cudaMalloc(max(nbytes, 256)))), max(nbytes, 256)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


@dataclass
class TensorRTCache:
    length: int
    side: int  # which of the two KV buffer sets holds the cache
    generation: int
    next_position: int = 0  # runtimes/positions.py


class _Engine:
    def __init__(self, trt, runtime, path: Path, num_profiles: int, stream: int):
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT cannot load {path} (damaged or built elsewhere): run pipmm build-engines "
                               "with --rebuild")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.contexts = []
        for index in range(num_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, stream)
            self.contexts.append(context)

    def dtype(self, name: str):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))


class TensorRTBackend:
    """The backend interface (runtimes/__init__.py) over TensorRT engines; host arrays in and out, the KV
    cache on the device."""

    name = "tensorrt"

    @staticmethod
    def available() -> bool:
        try:
            import_tensorrt()
            import_cudart()
        except TensorRTMissingError:
            return False
        return True

    def __init__(self, bundle: Bundle, device: str = "cuda", precision: str = "fp16", engine_cache=None,
                 engine_dir=None, device_id: int = 0):
        if device not in ("cuda", "auto"):
            raise BackendError(f"the tensorrt backend runs on device 'cuda', not {device!r}")
        self.trt = trt = import_tensorrt()
        self.cudart = cudart = import_cudart()
        self.bundle, self.device, self.device_id = bundle, "cuda", device_id
        key = current_key(bundle, precision, device_id, trt.__version__)
        self.directory = find_engines(engine_root(engine_cache), key, bundle.path,
                                      Path(engine_dir) if engine_dir is not None else None)
        meta = read_meta(self.directory)
        self.max_context = int(meta["settings"]["limits"]["max_context"])
        self.max_batch = int(meta["settings"]["limits"]["max_batch"])
        _check(cudart.cudaSetDevice(device_id))
        self.stream = int(_check(cudart.cudaStreamCreate()))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {g: _Engine(trt, runtime, self.directory / f"{g}.engine", len(PROFILES[g]), self.stream)
                        for g in GRAPHS + ((ADAPTER,) if ADAPTER in bundle.graphs else ())}
        model = bundle.manifest.model
        self.num_layers, self.num_kv_heads, self.head_dim = model.num_layers, model.num_kv_heads, model.head_dim
        decoder = self.engines["decoder"]
        self.kv_dtype = decoder.dtype("past_key_values.0.key")
        # CMAI bundles (sdk/cmai.py): image_bias [B,L_c,P+T]; 0 layers = a decoder without it
        self.bias_layers = (int(decoder.engine.get_tensor_shape("image_bias")[1]) if "image_bias" in decoder.inputs
                            else 0)
        kv_bytes = self.max_batch * self.num_kv_heads * self.max_context * self.head_dim * self.kv_dtype.itemsize
        self._kv = [[_Buffer(cudart) for _ in range(2 * self.num_layers)] for _ in range(2)]
        for side in self._kv:
            for buffer in side:
                buffer.ensure(kv_bytes)
        self._io: dict[str, _Buffer] = {}
        self._generation = 0

    def info(self) -> dict:
        return {"backend": self.name, "tensorrt": self.trt.__version__, "device": self.device,
                "engines": str(self.directory), "max_context": self.max_context, "kv_cache": "device (ping-pong)"}

    def _buffer(self, name: str, nbytes: int) -> int:
        return self._io.setdefault(name, _Buffer(self.cudart)).ensure(nbytes)

    def _execute(self, graph: str, profile: int, host_inputs: dict, device_inputs: dict | None = None,
                 device_outputs: dict | None = None) -> dict:
        """Run one engine: host arrays are copied in, outputs not given a device address come back to the host."""
        cudart, engine = self.cudart, self.engines[graph]
        context = engine.contexts[profile]
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []
        for name, array in host_inputs.items():
            array = np.ascontiguousarray(array, engine.dtype(name))
            keep.append(array)
            ptr = self._buffer(f"{graph}:{name}", array.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self.stream))
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, ptr)
        for name, (ptr, shape) in (device_inputs or {}).items():
            context.set_input_shape(name, shape)
            context.set_tensor_address(name, ptr)
        results = {}
        for name in engine.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if device_outputs and name in device_outputs:
                context.set_tensor_address(name, device_outputs[name])
                continue
            out = np.empty(shape, engine.dtype(name))
            context.set_tensor_address(name, self._buffer(f"{graph}:{name}", out.nbytes))
            results[name] = out
        if not context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run {graph}: see its log above")
        for name, out in results.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._io[f"{graph}:{name}"].ptr, out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return results

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._execute("embed", 0, {"input_ids": input_ids.astype(np.int64)})["inputs_embeds"]

    def vision(self, pixel_values: np.ndarray, prompt_vector: np.ndarray | None) -> VisionOutput:
        feeds = {"pixel_values": pixel_values}
        if prompt_vector is not None:
            feeds["prompt_vector"] = prompt_vector
        return VisionOutput.from_graph(self._execute("vision", 0, feeds))

    def adapter(self, frame_tokens: np.ndarray, frame_mask: np.ndarray,
                frame_positions: np.ndarray | None = None) -> np.ndarray:
        feeds = {"frame_tokens": frame_tokens, "frame_mask": frame_mask}
        if frame_positions is not None:  # an adapter that reads where each token sits (AdapterConfig.positions)
            feeds["frame_positions"] = frame_positions
        return self._execute(ADAPTER, 0, feeds)["visual_tokens"]

    def new_cache(self, batch: int = 1) -> TensorRTCache:
        if batch > self.max_batch:
            raise BackendError(f"the engines were built for batch <= {self.max_batch}: rebuild with --max-batch {batch}")
        self._generation += 1
        return TensorRTCache(length=0, side=0, generation=self._generation)

    def attention(self, inputs_embeds: np.ndarray, cache: TensorRTCache, position_ids: np.ndarray | None = None):
        raise BackendError("CMAI (inhibit) runs the prompt's text as a chunk after the image's cache, which these "
                           "engines' profiles (fresh prompt or one token) do not take: use the onnxruntime backend")

    def decoder(self, inputs_embeds: np.ndarray, cache: TensorRTCache, position_ids: np.ndarray | None = None,
                image_bias: np.ndarray | None = None):
        if cache.generation != self._generation:
            raise BackendError("this KV cache was replaced by a newer new_cache(): one sequence at a time per backend")
        b, t, _ = inputs_embeds.shape
        if cache.length + t > self.max_context:
            raise BackendError(f"the engines hold {self.max_context} tokens of context: rebuild with a larger "
                               "--max-context")
        if cache.length and t != 1:
            raise BackendError("TensorRT engines take a fresh prompt (prefill profile) or one token at a time "
                               "(decode profile), not a chunk appended to a cache")
        past, present = self._kv[cache.side], self._kv[1 - cache.side]
        names = [f"{i}.{part}" for i in range(self.num_layers) for part in ("key", "value")]
        shape = (b, self.num_kv_heads, cache.length, self.head_dim)
        host = {"inputs_embeds": inputs_embeds, "attention_mask": np.ones((b, cache.length + t), np.int64),
                "position_ids": step_positions(cache.next_position, b, t, position_ids)}
        if self.bias_layers:  # a CMAI bundle: zeros = off
            host["image_bias"] = (np.zeros((b, self.bias_layers, cache.length + t), np.float32) if image_bias is None
                                  else image_bias)
        elif image_bias is not None:
            raise BackendError("this bundle's decoder takes no image_bias (exported before CMAI): re-export it")
        device_in = {f"past_key_values.{n}": (buf.ptr, shape) for n, buf in zip(names, past)}
        device_out = {f"present.{n}": buf.ptr for n, buf in zip(names, present)}
        profile = 0 if cache.length == 0 else 1
        out = self._execute("decoder", profile, host, device_in, device_out)
        return out["logits"], out["hidden"], TensorRTCache(cache.length + t, 1 - cache.side, cache.generation,
                                                           following(host["position_ids"]))

    def __del__(self):
        for side in getattr(self, "_kv", []):
            for buffer in side:
                buffer.free()
        for buffer in getattr(self, "_io", {}).values():
            buffer.free()
