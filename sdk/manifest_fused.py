"""The settings of a `decoder_fused` graph entry (sdk/manifest.py Graph: its extra keys), typed: written by
export/fused.py fused_entry, read by the runtimes (runtimes/decoder_flavour.py, inplace_cache.py, fused_device.py).

    "decoder_fused": {"file": ..., "inputs": [...], "outputs": [...], "flavour_of": "decoder", "target": "cuda",
                      "preferred_by": {"onnxruntime": ["cuda"]}, "query_seqlens": false, "cmai": false,
                      "token_input": "input_ids", "next_token": "next_token", "ops": {...}, ...}

    target         export/fused.py FUSED_TARGETS: "cpu" or "cuda"
    query_seqlens  GroupQueryAttention takes query_seqlens: a mask as wide as the in-place buffer reads right
    cmai           image_bias in, attention out
    token_input    an optional input [1,T] int64 (an initializer default of [1,0]: not in `inputs`, which lists the
                   required ones, as ONNX Runtime's get_inputs() does) whose rows are looked up in the embedding
                   table and put before inputs_embeds' rows: a decode step is input_ids [1,1] with inputs_embeds
                   [1,0,D], one session run for embed + layers. None: bundles before it (the embed graph's row)
    next_token     an output [B,1] int64, the ArgMax of `logits` (first index of the maximum, as numpy's): a greedy
                   step reads 8 bytes, not the [1,V] row. None: bundles before it (the host's argmax)

Bundles written before a key read as its default here: the settings those graphs were built with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest_fields import Fields, Section, extra_field, is_dict, is_name, optional

FUSED_TARGET_NAMES = ("cpu", "cuda")


def _is_bool(value) -> bool:
    return isinstance(value, bool)


@dataclass(frozen=True)
class FusedDecoderEntry(Section):
    flavour_of: str = "decoder"
    target: str = "cpu"
    preferred_by: dict = field(default_factory=lambda: {"onnxruntime": ["cpu"]})
    query_seqlens: bool = False
    cmai: bool = True
    token_input: str | None = None
    next_token: str | None = None
    extra: dict = extra_field()  # ops, node counts, built_by, quantization records: read by people, not code

    @classmethod
    def from_extra(cls, d: dict, source: str) -> "FusedDecoderEntry":
        r = Fields(d, "graph 'decoder_fused'", source)
        return cls(flavour_of=r.get("flavour_of", is_name, "a graph name", "decoder"),
                   target=r.get("target", lambda v: v in FUSED_TARGET_NAMES, " or ".join(FUSED_TARGET_NAMES), "cpu"),
                   preferred_by=r.get("preferred_by", is_dict, "an object", {"onnxruntime": ["cpu"]}),
                   query_seqlens=r.get("query_seqlens", _is_bool, "true or false", False),
                   cmai=r.get("cmai", _is_bool, "true or false", True),
                   token_input=r.get("token_input", optional(is_name), "an input name or null", None),
                   next_token=r.get("next_token", optional(is_name), "an output name or null", None),
                   extra=r.extra(cls))

    @classmethod
    def of(cls, bundle, graph: str = "decoder_fused") -> "FusedDecoderEntry":
        """The entry of a loaded bundle's `graph` (sdk/bundle.py Bundle)."""
        return cls.from_extra(bundle.graphs[graph].extra, str(bundle.path))
