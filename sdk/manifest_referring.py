"""The manifest's `referring` section (sdk/manifest.py): ControlMLLM's settings for the energy_grad graph.

    "referring": {"graph": "energy_grad", "graph_layers": 4, "default": "controlmllm",
                  "variants": {"controlmllm":   {"optimizer": "gradient-ema", "layers": [0, 1, 2, 3], ...},
                               "controlmllm++": {"optimizer": "adam", "layers": [1, 2], "queries": "last", ...}}}

Written by export/extra_graphs.py when it adds energy_grad (defaults_for), read by sdk/referring.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BundleError
from .manifest_fields import (REEXPORT, Fields, Section, extra_field, is_dict, is_int, is_name, is_real, list_of,
                              optional)

OPTIMIZERS = ("gradient-ema", "adam")
# whose attention counts: every text token after the image (question + assistant prefix), or the last one
QUERIES = ("after-image", "last")


@dataclass(frozen=True)
class ReferringVariant(Section):
    """One optimiser of the latent v added to the visual tokens (docs/referring.md)."""
    optimizer: str  # OPTIMIZERS
    layers: list[int]  # decoder layers whose attention the energy averages (< graph_layers)
    queries: str = "after-image"  # QUERIES
    steps: int = 5  # gradient steps at most
    lr: float = 1.0
    alpha: float = 400.0  # E = alpha * (1 - inside / all)^2
    beta: float = 0.5  # gradient-ema: v <- beta * v + (1 - beta) * (v - lr * g); adam: its beta1
    beta2: float = 0.999  # adam
    eps: float = 1e-3  # adam
    stop_ratio: float | None = 0.25  # stop once |E_t - E_0| / E_0 exceeds it; None: always `steps`
    sigma: float = 0.1  # point and scribble: Gaussian width over the distance, the grid side = 1
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, where: str, source: str) -> "ReferringVariant":
        r = Fields(d, where, source)
        real = (is_real, "a finite number")
        return cls(optimizer=r.get("optimizer", lambda v: v in OPTIMIZERS, " or ".join(OPTIMIZERS)),
                   layers=r.get("layers", list_of(lambda v: is_int(v, 0)), "a list of decoder layers"),
                   queries=r.get("queries", lambda v: v in QUERIES, " or ".join(QUERIES), "after-image"),
                   steps=r.get("steps", lambda v: is_int(v, 0), "a step count", 5),
                   lr=float(r.get("lr", *real, 1.0)), alpha=float(r.get("alpha", *real, 400.0)),
                   beta=float(r.get("beta", *real, 0.5)), beta2=float(r.get("beta2", *real, 0.999)),
                   eps=float(r.get("eps", *real, 1e-3)),
                   stop_ratio=r.get("stop_ratio", optional(is_real), "a finite number or null", 0.25),
                   sigma=float(r.get("sigma", *real, 0.1)), extra=r.extra(cls))


@dataclass(frozen=True)
class Referring(Section):
    graph_layers: int  # the energy graph runs decoder layers 0..graph_layers-1 (cut after the last one read)
    variants: dict[str, ReferringVariant] = field(default_factory=dict)
    default: str = "controlmllm"
    graph: str = "energy_grad"
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "Referring":
        r = Fields(d, "referring", source)
        layers = r.get("graph_layers", lambda v: is_int(v, 1), "a positive layer count")
        raw = r.get("variants", lambda v: isinstance(v, dict) and all(map(is_dict, v.values())), "a map of objects")
        variants = {name: ReferringVariant.from_dict(v, f"referring variant {name!r}", source)
                    for name, v in raw.items()}
        for name, variant in variants.items():
            if not variant.layers or max(variant.layers) >= layers:
                raise BundleError(f"{source}: referring variant {name!r} reads layers {variant.layers} but the "
                                  f"energy graph runs {layers}; {REEXPORT}")
        return cls(graph_layers=layers, variants=variants, default=r.get("default", is_name, "a variant name",
                                                                          "controlmllm"),
                   graph=r.get("graph", is_name, "a graph name", "energy_grad"), extra=r.extra(cls))


def middle_band(num_layers: int) -> list[int]:
    """ControlMLLM++'s layers when export is not told: the middle half of the decoder (at least one layer)."""
    low, high = num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)
    return list(range(low, high))


def defaults_for(num_layers: int) -> Referring:
    """The settings of the seed's code: ControlMLLM (alpha 400, lr 1, EMA 0.5, 5 steps, early stop at 25%,
    every layer, the queries after the image); ControlMLLM++ (Adam lr 0.03, betas 0.9/0.999, eps 1e-3, 3 steps,
    a middle band of layers, the last query)."""
    every = list(range(num_layers))
    return Referring(graph_layers=num_layers, variants={
        "controlmllm": ReferringVariant(optimizer="gradient-ema", layers=every, queries="after-image", steps=5,
                                        lr=1.0, beta=0.5, stop_ratio=0.25),
        "controlmllm++": ReferringVariant(optimizer="adam", layers=middle_band(num_layers), queries="last", steps=3,
                                          lr=0.03, beta=0.9, beta2=0.999, eps=1e-3, stop_ratio=None)})


def with_settings(referring: Referring, settings: dict[str, dict], error=BundleError) -> Referring:
    """`referring` with some variants' settings replaced ({"controlmllm": {"lr": 100.0}}), each checked as the
    manifest reader checks it; `error` is the type raised for an unknown variant or a bad value."""
    variants = dict(referring.variants)
    for name, changes in settings.items():
        if name not in variants:
            raise error(f"referring variant {name!r} is unknown: choose {', '.join(variants)}")
        unknown = set(changes) - {f for f in ReferringVariant.__dataclass_fields__ if f != "extra"}
        if unknown:
            raise error(f"referring setting {sorted(unknown)[0]!r} of {name} is unknown: choose from "
                        f"{', '.join(f for f in ReferringVariant.__dataclass_fields__ if f != 'extra')}")
        variants[name] = {**variants[name].to_dict(), **changes}
    try:
        return Referring.from_dict({**referring.to_dict(), "variants": {k: v if isinstance(v, dict) else v.to_dict()
                                                                         for k, v in variants.items()}}, "settings")
    except BundleError as err:
        raise error(str(err).split(";")[0]) from None
