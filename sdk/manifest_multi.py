"""The manifest's `multi_image` section (sdk/manifest.py): how a bundle combines several frames (docs/multi-image.md).

    "multi_image": {"mode": "mivpg", "n_max": 8, "tokens": 64, "separator": "\\n", "graph": "adapter",
                    "settings": {"csa": "induced", "csa_points": 16, "frame_queries": 32, ...}}

    concat   each frame's K visual tokens in turn, the chat template's image placeholder repeated once per frame
             with `separator` between (LLaVA's way); no graph, tokens = None (the LLM sees n * K)
    qformer  the `graph` (adapter) pools the frames' tokens into `tokens` = R with learned queries, no CSA
    mivpg    the same with correlated self-attention among instances, hierarchical (export/model/mivpg.py)

`single_frame` (adapter modes): "adapter" sends one frame through the adapter too (R tokens, what stage mv's
one-frame batches train); "own" answers one frame as the bundle without the section would (its own K tokens at
the bundle's positions: the model as it was before the adapter, and no adapter time), several through the adapter.

A bundle without the section combines frames by concat, separator "\\n" (what LLaVA-1.5's template and ChatML write
after each image), as many frames as fit its context beside a short question, DEFAULT_N_MAX at most
(sdk.frames.Frames.fitting: the embedded default bundle puts tokens at patch positions, 256 a frame in 512: one).
Written by export/multi_image.py, read by sdk/frames.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest_fields import Fields, Section, extra_field, is_dict, is_int, is_name, is_str, optional

MODES = ("concat", "qformer", "mivpg")
ADAPTER_MODES = ("qformer", "mivpg")  # the modes that run an adapter graph
DEFAULT_N_MAX = 8
DEFAULT_SEPARATOR = "\n"
SINGLE_FRAME = ("adapter", "own")


@dataclass(frozen=True)
class MultiImage(Section):
    mode: str = "concat"  # MODES
    n_max: int = DEFAULT_N_MAX  # frames per request at most (adapter modes: the graph's fixed frame axis)
    tokens: int | None = None  # R, the tokens the LLM sees (adapter modes); None for concat (n * K)
    separator: str = DEFAULT_SEPARATOR  # concat: text between two frames' placeholders
    graph: str | None = None  # adapter modes: the graph that pools the frames
    settings: dict = field(default_factory=dict)  # the adapter's recorded choices (AdapterConfig.settings)
    single_frame: str = "adapter"  # SINGLE_FRAME: how an adapter bundle takes one frame
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "MultiImage":
        r = Fields(d, "multi_image", source)
        mode = r.get("mode", lambda v: v in MODES, " or ".join(map(repr, MODES)))
        adapter = mode in ADAPTER_MODES
        section = cls(mode=mode, n_max=r.get("n_max", lambda v: is_int(v, 1), "a positive integer", DEFAULT_N_MAX),
                      tokens=r.get("tokens", optional(lambda v: is_int(v, 1)), "a positive integer or null", None),
                      separator=r.get("separator", is_str, "a string", DEFAULT_SEPARATOR),
                      graph=r.get("graph", optional(is_name), "a graph name or null", None),
                      settings=dict(r.get("settings", is_dict, "an object", {})),
                      single_frame=r.get("single_frame", lambda v: v in SINGLE_FRAME,
                                         " or ".join(map(repr, SINGLE_FRAME)), "adapter"), extra=r.extra(cls))
        if adapter and (section.graph is None or section.tokens is None):
            raise r.fail("graph", f"and 'tokens' must be given for mode {mode!r}")
        return section
