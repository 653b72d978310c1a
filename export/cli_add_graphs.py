"""`pipmm add-graphs BUNDLE --checkpoint CHECKPOINT_DIR`: add optional graphs (decoder_static, energy_grad) to a
bundle; `--controlmllm` adds energy_grad, the referring graph (docs/referring.md). `pipmm add-graphs BUNDLE
--pixel-input uint8` makes the vision graph take uint8 pixels and normalise them itself (export/pixel_input.py;
no checkpoint needed).

    pipmm add-graphs BUNDLE --adapter ADAPTER_DIR [--n-max 8]      the frame adapter (qformer/mivpg) for several frames
    pipmm add-graphs BUNDLE --multi-image concat [--n-max 4]       concat's settings only (docs/multi-image.md)
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory written by 'pipmm export' (fp32 or fp16)")
    parser.add_argument("--checkpoint", default=None, help="the checkpoint the bundle was exported from (needed to "
                        "trace graphs; not for --adapter / --multi-image / --pixel-input)")
    parser.add_argument("--pixel-input", choices=("uint8",), default=None,
                        help="the vision graph takes the resized, cropped uint8 pixels [B,H,W,3] and rescales and "
                             "normalises them inside (no host float work; docs/gpu.md, CPU)")
    parser.add_argument("--graph", action="append", default=None, metavar="NAME",
                        help="optional graph to add (repeatable; default decoder_static: the static KV cache "
                             "decoder for CUDA graphs, docs/gpu.md; decoder_fused and prompt_encoder_fused: ONNX "
                             "Runtime's fused CPU flavours; prompt_encoder: PIP-MM's first-L-layers prompt pass)")
    parser.add_argument("--controlmllm", action="store_true",
                        help="add energy_grad: ControlMLLM's energy and gradient, for referring by box, mask, scribble "
                             "or point (docs/referring.md)")
    parser.add_argument("--referring-set", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                        help="a referring setting over the defaults, e.g. controlmllm.lr=100 (repeatable; "
                             "docs/referring.md)")
    parser.add_argument("--fused-target", default="cpu", choices=("cpu", "cuda"),
                        help="decoder_fused for ONNX Runtime on this device (export/fused.py: cuda = RotaryEmbedding "
                             "ops, no CMAI, loads in onnxruntime 1.31; build it in an fp16 bundle)")
    parser.add_argument("--fused-weights", default=None, choices=("int4", "int8"),
                        help="decoder_fused's MatMuls as MatMulNBits (default: as the bundle's decoder, so int4/int8 "
                             "bundles get a quantized one; export/fused_quant.py)")
    parser.add_argument("--device", default="cpu", help="torch device to trace on (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="trace a graph again if the bundle has it")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="add the frame adapter in DIR (adapter.safetensors + adapter.json, pipmm train --stage mv)")
    parser.add_argument("--multi-image", default=None, choices=("concat",), help="record concat's multi-image settings")
    parser.add_argument("--n-max", type=int, default=None, help="frames per request at most (default: the adapter's "
                        "max_frames; concat 8)")
    parser.add_argument("--image-separator", default="\n", help="concat: text between two frames' placeholders")
    parser.add_argument("--single-frame", default="adapter", choices=("adapter", "own"),
                        help="--adapter: one frame through the adapter (as stage mv trains it) or as the bundle "
                             "without it takes one (own K tokens; for an adapter trained beside a frozen LLM)")


def referring_settings(pairs: list[str]) -> dict:
    """["controlmllm.lr=100", ...] -> {"controlmllm": {"lr": 100}} (values read as JSON, else as strings)."""
    import json

    from sdk.errors import ExportError

    settings: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        variant, dot, name = key.rpartition(".")
        if not (sep and dot and variant and name):
            raise ExportError(f"--referring-set {pair!r}: write VARIANT.KEY=VALUE, e.g. controlmllm.lr=100")
        try:
            settings.setdefault(variant, {})[name] = json.loads(value)
        except ValueError:
            settings.setdefault(variant, {})[name] = value
    return settings


def run(args) -> int:
    from export.extra_graphs import add_graphs
    from sdk.errors import ExportError

    if args.adapter or args.multi_image:
        from export.multi_image import attach_adapter, set_concat

        if args.adapter and args.multi_image:
            raise ExportError("--adapter and --multi-image concat contradict each other: pass one")
        if args.adapter:
            attach_adapter(args.bundle, args.adapter, args.n_max, args.overwrite, args.image_separator, args.single_frame)
        else:
            set_concat(args.bundle, args.n_max, args.image_separator)
        section = "adapter" if args.adapter else "concat settings"
        print(f"added {section} to {args.bundle}")
        return 0

    asked = list(args.graph or []) + (["energy_grad"] if args.controlmllm else [])
    if args.pixel_input:
        from export.pixel_input import convert_bundle

        convert_bundle(args.bundle)
        print(f"the vision graph of {args.bundle} takes {args.pixel_input} pixels")
        if not asked:
            return 0
    if args.checkpoint is None:
        raise ExportError("pass --checkpoint CHECKPOINT_DIR (the checkpoint the bundle was exported from) to trace graphs")
    graphs = tuple(dict.fromkeys(asked or ["decoder_static"]))
    add_graphs(args.bundle, args.checkpoint, graphs, device=args.device, overwrite=args.overwrite,
               referring_settings=referring_settings(args.referring_set), fused_target=args.fused_target,
               fused_weights=args.fused_weights)
    print(f"added {', '.join(graphs)} to {args.bundle}")
    return 0
