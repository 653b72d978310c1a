"""Training-free referring on the device (ControlMLLM, arXiv 2407.21534; ControlMLLM++): numpy only.

    pipeline.generate(image, "What color is this?", region=sdk.Box(40, 30, 120, 90), referring="controlmllm")

    region --sdk/regions.py--> token weights [K] --laid on the image rows--> mask [T]
    v = 0 [K, D]; for t < steps:                                   (the bundle's energy_grad graph)
        E_t, G = energy_grad(embeds with v added to the image rows)    E, G scaled by alpha
        stop when |E_t - E_0| / E_0 > stop_ratio
        controlmllm:   v <- beta * v + (1 - beta) * (v - lr * G[image rows])     (EMA between iterates)
        controlmllm++: v <- Adam(v, G[image rows])                               (bias-corrected, eps outside sqrt)
    prefill and decode with v added to the visual tokens

`overlay` needs no gradient: the region is drawn on the image (sdk/regions.py overlay). The settings of each
variant are the manifest's `referring` section (sdk/manifest_referring.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BackendError, BundleError
from .manifest_referring import ReferringVariant
from .regions import RegionError, check_region, overlay, patch_weights, token_weights

METHODS = ("controlmllm", "controlmllm++", "overlay")
GRAPH = "energy_grad"


@dataclass
class ReferringReport:
    """What a referring request did: method, region kind, gradient steps taken, energy before each step
    (alpha-scaled, the first at v = 0), and milliseconds per step."""
    method: str
    region: str
    steps: int = 0
    energies: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "region": self.region, "steps": self.steps, "energies": self.energies,
                "step_ms": self.step_ms}


class EnergyGradSession:
    """The bundle's energy_grad graph in ONNX Runtime, opened with the backend's own session options."""

    def __init__(self, pipeline):
        backend = pipeline.backend
        sessions = getattr(backend, "sessions", None)
        if sessions is None or not hasattr(backend, "provider_options"):
            raise BackendError(f"referring runs its energy graph in ONNX Runtime; the {type(backend).__name__} "
                               "backend has none: load the bundle with backend='onnxruntime'")
        import onnxruntime

        path = backend.bundle.graph_path(GRAPH)
        # the backend's device and provider options (device id, arena, TF32), not just the decoder's provider names
        self.session = onnxruntime.InferenceSession(str(path), sess_options=backend.options,
                                                    providers=backend.provider_options(GRAPH))
        spec = pipeline.manifest.graphs[GRAPH].input("inputs_embeds")
        self.dtype = np.float16 if spec is not None and spec.dtype == "float16" else np.float32

    def __call__(self, embeds, positions, mask, image_weight, query_weights, layer_weights):
        f = self.dtype
        energy, grad = self.session.run(None, {
            "inputs_embeds": embeds.astype(f), "position_ids": positions.astype(np.int64), "mask": mask.astype(f),
            "image_weight": image_weight.astype(f), "query_weights": query_weights.astype(f),
            "layer_weights": layer_weights.astype(f)})
        return float(energy), grad.astype(np.float32)


def check_method(pipeline, region, method: str | None) -> str | None:
    """The referring method a request asked for (None without a region); refuses what the bundle cannot do."""
    if region is None:
        if method is not None:
            raise RegionError(f"referring={method!r} needs a region: pass region=sdk.Box(...), sdk.Point(...), "
                              "sdk.Scribble(...) or sdk.Mask(...)")
        return None
    check_region(region)
    settings = pipeline.manifest.referring
    method = method or (settings.default if settings is not None and GRAPH in pipeline.manifest.graphs else "overlay")
    if method not in METHODS:
        raise RegionError(f"referring {method!r} is unknown: choose {', '.join(METHODS)}")
    if method != "overlay" and (settings is None or GRAPH not in pipeline.manifest.graphs):
        raise BundleError(f"bundle {pipeline.source or '(in memory)'} has no {GRAPH} graph for {method}: add it with "
                          "'pipmm add-graphs BUNDLE --checkpoint CHECKPOINT_DIR --controlmllm', or use "
                          "referring='overlay'")
    if method != "overlay" and method not in settings.variants:
        raise BundleError(f"the bundle's referring settings have no {method!r} variant (it has "
                          f"{', '.join(settings.variants)}): re-add energy_grad with this SDK's 'pipmm add-graphs'")
    return method


def layer_weights(variant: ReferringVariant, graph_layers: int) -> np.ndarray:
    weights = np.zeros(graph_layers, np.float32)
    weights[variant.layers] = 1.0 / len(variant.layers)
    return weights


def query_weights(variant: ReferringVariant, length: int, image_slots: np.ndarray) -> np.ndarray:
    """ControlMLLM: every text token after the image, equally; ++: the last token only."""
    weights = np.zeros(length, np.float32)
    after = np.arange(int(image_slots[-1]) + 1, length)
    if len(after) == 0:
        raise RegionError("the prompt has no text after the image, so no query attends to the region: ask a question")
    chosen = after[-1:] if variant.queries == "last" else after
    weights[chosen] = 1.0 / len(chosen)
    return weights


class GradientEma:
    """ControlMLLM: a plain gradient step, then an exponential moving average with the previous latent."""

    def __init__(self, variant: ReferringVariant, shape):
        self.lr, self.beta = variant.lr, variant.beta

    def step(self, latent, grad):
        return self.beta * latent + (1.0 - self.beta) * (latent - self.lr * grad)


class Adam:
    """ControlMLLM++: Adam (torch.optim.Adam's update: bias-corrected moments, eps added after the sqrt)."""

    def __init__(self, variant: ReferringVariant, shape):
        self.lr, self.b1, self.b2, self.eps = variant.lr, variant.beta, variant.beta2, variant.eps
        self.m, self.v, self.t = np.zeros(shape, np.float32), np.zeros(shape, np.float32), 0

    def step(self, latent, grad):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return latent - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


OPTIMIZERS = {"gradient-ema": GradientEma, "adam": Adam}


def optimise_latent(energy_grad, embeds: np.ndarray, positions: np.ndarray, image_slots: np.ndarray,
                    tokens: np.ndarray, variant: ReferringVariant, graph_layers: int, report: ReferringReport):
    """The latent v [K, D] after the variant's steps (the module docstring); fills report."""
    length = embeds.shape[1]
    mask = np.zeros(length, np.float32)
    mask[image_slots] = tokens
    image_weight = np.zeros(length, np.float32)
    image_weight[image_slots] = 1.0
    queries, layers = query_weights(variant, length, image_slots), layer_weights(variant, graph_layers)
    latent = np.zeros((len(image_slots), embeds.shape[2]), np.float32)
    optimizer = OPTIMIZERS[variant.optimizer](variant, latent.shape)
    for _ in range(variant.steps):
        start = time.perf_counter()
        steered = embeds.astype(np.float32).copy()
        steered[0, image_slots] += latent
        energy, grad = energy_grad(steered, positions, mask, image_weight, queries, layers)
        energy *= variant.alpha
        first = report.energies[0] if report.energies else energy
        report.energies.append(energy)
        if variant.stop_ratio is not None and first > 0 and abs(energy - first) / first > variant.stop_ratio:
            report.step_ms.append((time.perf_counter() - start) * 1000.0)
            break
        latent = optimizer.step(latent, variant.alpha * grad[0, image_slots])
        report.steps += 1
        report.step_ms.append((time.perf_counter() - start) * 1000.0)
    return latent


class Steering:
    """One request's referring: the region's patch weights (from the image) and the variant; called by the
    pipeline with the spliced embeddings, it returns them with the optimised latent added to the image rows."""

    def __init__(self, pipeline, image, region, method: str):
        self.pipeline, self.method = pipeline, method
        manifest = pipeline.manifest
        self.settings = manifest.referring
        self.variant = self.settings.variants[method]
        vision = manifest.vision
        self.patches = patch_weights(region, image, pipeline.preprocessing, vision.grid, vision.patch_size,
                                     self.variant.sigma)
        self.report = ReferringReport(method=method, region=region.kind)

    def __call__(self, embeds: np.ndarray, image_slots: np.ndarray, positions: np.ndarray | None, vision) -> np.ndarray:
        manifest = self.pipeline.manifest
        tokens = token_weights(self.patches, manifest.visual_tokens.reducer, len(image_slots), vision.kept_patches,
                               manifest.vision.grid)
        if positions is None:
            positions = np.arange(embeds.shape[1], dtype=np.int64)[None]
        if self.pipeline.energy_graph is None:
            self.pipeline.energy_graph = EnergyGradSession(self.pipeline)
        latent = optimise_latent(self.pipeline.energy_graph, embeds, positions, image_slots, tokens, self.variant,
                                 self.settings.graph_layers, self.report)
        out = embeds.copy()
        out[0, image_slots] += latent.astype(out.dtype)
        return out


def prepare(pipeline, image, region, method: str | None):
    """-> (the image to preprocess, a Steering or None, a ReferringReport or None) for one request."""
    method = check_method(pipeline, region, method)
    if method is None:
        return image, None, None
    if method == "overlay":
        return overlay(image, region), None, ReferringReport(method="overlay", region=region.kind)
    steering = Steering(pipeline, image, region, method)
    return image, steering, steering.report
