"""`pipmm export CHECKPOINT_DIR --out BUNDLE_DIR`: a LLaVA checkpoint (+ prompt MLP) -> an ONNX bundle."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="LlavaForConditionalGeneration directory (safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    mlp = parser.add_mutually_exclusive_group()
    mlp.add_argument("--prompt-mlp", default=None, help="prompt_mlp.safetensors (or its folder) for PIP-MM")
    mlp.add_argument("--no-prompt-mlp", action="store_true", help="plain LLaVA: keep the original class embedding")
    parser.add_argument("--visual-tokens", default="full", help="budget: full, half, quarter or an integer K")
    parser.add_argument("--reducer", default="pool", choices=["pool", "prompt-topk"],
                        help="how the budget is met (ignored at full budget)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .bundle import export_bundle

    out = export_bundle(args.checkpoint, args.out, prompt_mlp=args.prompt_mlp, no_prompt_mlp=args.no_prompt_mlp,
                        budget=args.visual_tokens, reducer=args.reducer, overwrite=args.overwrite,
                        progress=not args.quiet)
    print(f"wrote {out}")
    return 0
