"""`pipmm export CHECKPOINT_DIR --out BUNDLE_DIR`: a LLaVA checkpoint (+ prompt MLP) -> an ONNX bundle."""

from __future__ import annotations

import json
from pathlib import Path

from export.model.reducers import REDUCERS


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="LlavaForConditionalGeneration directory (safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    mlp = parser.add_mutually_exclusive_group()
    mlp.add_argument("--prompt-mlp", default=None, help="prompt_mlp.safetensors (or its folder) for PIP-MM")
    mlp.add_argument("--no-prompt-mlp", action="store_true", help="plain LLaVA: keep the original class embedding")
    parser.add_argument("--visual-tokens", default="full", help="budget: full, half, quarter or an integer K")
    parser.add_argument("--reducer", default="pool", choices=list(REDUCERS),
                        help="how the budget is met (ignored at full budget)")
    parser.add_argument("--primary-ratio", type=float, default=None, metavar="R",
                        help="merge: share of the budget kept as primary patches, the rest merged (default 0.5)")
    parser.add_argument("--cmai-layers", default="auto", metavar="auto|none|I,J,...",
                        help="CMAI: decoder layers that take the image_bias input and return attention "
                             "(auto: the second half; none: a decoder without them); docs/vmtc-cmai.md")
    parser.add_argument("--cmai-aggregate", default=None, choices=["per-layer", "mean"],
                        help="CMAI: each layer masks by its own focus scores, or all by their mean (default per-layer)")
    parser.add_argument("--visual-positions", default=None,
                        choices=sorted({p for reducer in REDUCERS.values() for p in reducer.positions}),
                        help="decoder positions of the kept visual tokens: one after another (default) or, with "
                             "a reducer that keeps patches (prompt-topk), those of their patches; docs/bundle.md")
    q = parser.add_argument_group("precision (docs/precision.md)")
    q.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                   help="fp16: float16 with fp32 norms/softmax/logits; int8: static QDQ (vision, embed) + decoder "
                        "per --int8-decoder; int4: 4-bit block-wise decoder weights, int8 vision/embed")
    q.add_argument("--calibration", default=None, metavar="DIR_OR_JSON",
                   help="image+prompt pairs for static int8 (default: generated scenes, val split)")
    q.add_argument("--calibration-size", type=int, default=None, metavar="N", help="pairs used (default 32)")
    q.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="weight-only block size along K (power of two >= 16; default 32)")
    q.add_argument("--int8-decoder", default=None, choices=["static", "weight-only"],
                   help="int8 decoder: static QDQ (TensorRT) or weight-only MatMulNBits (ONNX Runtime; default)")
    q.add_argument("--int8-vision", action="store_const", const=True, default=None,
                   help="with --precision fp16: the vision graph in static int8 (about half an fp16 bundle's size "
                        "for a small model; the decoder stays fp16, so --controlmllm and decoder_fused still fit)")
    q.add_argument("--keep-fp32-ops", nargs="+", default=None, metavar="OP",
                   help="op types kept in float, plus lm_head, attention (MatMuls of two activations) and "
                        "prompt_mlp; "
                        "'none' to keep nothing; default per precision, see docs/precision.md")
    g = parser.add_argument_group("optional graphs (as pipmm add-graphs; docs/referring.md)")
    g.add_argument("--controlmllm", action="store_true",
                   help="add energy_grad (referring by box, mask, scribble or point), sharing the decoder's weights "
                        "through decoder.onnx.data; fp32 or fp16")
    g.add_argument("--graph", action="append", default=None, metavar="NAME",
                   help="another optional graph to add (repeatable: decoder_static, energy_grad, decoder_fused)")
    g.add_argument("--referring-set", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                   help="with --controlmllm: a referring setting over the defaults, e.g. controlmllm.lr=100")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from export.cli_add_graphs import referring_settings
    from export.extra_graphs import export_with_graphs
    from export.writer import export_bundle

    given = {"calibration_set": args.calibration, "calibration_size": args.calibration_size,
             "block_size": args.block_size, "int8_decoder": args.int8_decoder, "keep_fp32_ops": args.keep_fp32_ops,
             "int8_vision": args.int8_vision}
    options = {k: v for k, v in given.items() if v is not None}
    graphs = tuple(dict.fromkeys(list(args.graph or []) + (["energy_grad"] if args.controlmllm else [])))
    if args.referring_set and "energy_grad" not in graphs:
        from sdk.errors import ExportError
        raise ExportError("--referring-set configures energy_grad: pass --controlmllm too")
    if graphs:
        options.update(graphs=graphs, referring_settings=referring_settings(args.referring_set))
    write = export_with_graphs if graphs else export_bundle
    out = write(args.checkpoint, args.out, prompt_mlp=args.prompt_mlp, no_prompt_mlp=args.no_prompt_mlp,
                        budget=args.visual_tokens, reducer=args.reducer, overwrite=args.overwrite,
                        progress=not args.quiet, precision=args.precision,
                        visual_positions=args.visual_positions,
                        reducer_options=None if args.primary_ratio is None else {"primary_ratio": args.primary_ratio},
                        cmai={"layers": args.cmai_layers,
                              **({"aggregate": args.cmai_aggregate} if args.cmai_aggregate else {})},
                        **options)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    template, special = manifest["chat_template"], manifest["special_tokens"]
    print(f"chat template: {template.get('source', 'given')}; BOS: {template.get('bos_rule', '-')}; "
          f"stop token ids: {special['eos']}")
    print(f"wrote {out}" + (f" with {', '.join(graphs)}" if graphs else ""))
    return 0
