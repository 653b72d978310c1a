"""ONNX Runtime backend: one InferenceSession per graph, on the device asked for.

On CPU the KV cache is a list of numpy arrays that each decoder call returns grown by T.
The provider table and the per-graph session options are where the GPU path (IO binding,
preallocated cache, CUDA graphs) plugs in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from sdk.bundle import Bundle
from sdk.errors import BackendError, BundleError

# device -> execution providers, most preferred first
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from err
    return onnxruntime


@dataclass
class KVCache:
    past: list[np.ndarray]  # 2 per layer (key, value), each [B, H_kv, length, head_dim]
    length: int = 0
    mask: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))  # [B, length]


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

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None):
        ort = _ort()
        self.bundle = bundle
        self.device = self.resolve_device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
        if threads:
            options.intra_op_num_threads = threads
        elif os.environ.get("PIPMM_THREADS"):
            options.intra_op_num_threads = int(os.environ["PIPMM_THREADS"])
        self.sessions = {}
        for name, spec in bundle.graphs.items():
            try:
                session = ort.InferenceSession(str(bundle.graph_path(name)), sess_options=options,
                                               providers=PROVIDERS[self.device])
            except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
                raise BundleError(f"graph {name} ({spec['file']}) cannot be loaded by onnxruntime: "
                                  f"{str(err).splitlines()[0][:200]}; copy or re-export the bundle") from err
            self._check_signature(name, spec, session)
            self.sessions[name] = session
        model = bundle.manifest["model"]
        self.num_layers, self.num_kv_heads, self.head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
        decoder_inputs = {i["name"]: i for i in bundle.graphs["decoder"]["inputs"]}
        self.kv_dtype = _NUMPY_DTYPES[decoder_inputs["past_key_values.0.key"]["dtype"]]
        self.embed_dtype = _NUMPY_DTYPES[decoder_inputs["inputs_embeds"]["dtype"]]
        vision_inputs = {i["name"]: i for i in bundle.graphs["vision"]["inputs"]}
        self.pixel_dtype = _NUMPY_DTYPES[vision_inputs["pixel_values"]["dtype"]]

    @staticmethod
    def _check_signature(name: str, spec: dict, session) -> None:
        """The graph file must have exactly the inputs and outputs the manifest promises."""
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        want_in = [i["name"] for i in spec["inputs"]]
        want_out = [o["name"] for o in spec["outputs"]]
        if got_in != want_in or got_out != want_out:
            raise BundleError(f"graph {name} has inputs {got_in} / outputs {got_out} but the manifest says "
                              f"{want_in} / {want_out}: the bundle is inconsistent; re-export it")

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def vision(self, pixel_values: np.ndarray, prompt_vector: np.ndarray | None):
        feeds = {"pixel_values": pixel_values.astype(self.pixel_dtype)}
        if prompt_vector is not None:
            feeds["prompt_vector"] = prompt_vector.astype(self.embed_dtype)
        tokens, cls_attention = self.sessions["vision"].run(None, feeds)
        return tokens, cls_attention

    def new_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        return KVCache(past=[empty] * (2 * self.num_layers), length=0, mask=np.zeros((batch, 0), np.int64))

    def decoder(self, inputs_embeds: np.ndarray, cache: KVCache):
        b, t, _ = inputs_embeds.shape
        mask = np.concatenate([cache.mask, np.ones((b, t), np.int64)], axis=1)
        feeds = {
            "inputs_embeds": inputs_embeds.astype(self.embed_dtype),
            "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(cache.length, cache.length + t, dtype=np.int64), (b, t)).copy(),
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = cache.past[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache.past[2 * i + 1]
        logits, hidden, *present = self.sessions["decoder"].run(None, feeds)
        return logits, hidden, KVCache(past=present, length=cache.length + t, mask=mask)
