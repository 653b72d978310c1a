"""`pipmm explain IMAGE PROMPT --out overlay.png`: where the model looked, as a heat map over the image."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("image", help="image file (png, jpg, ...)")
    parser.add_argument("prompt", nargs="?", default="Describe the image.", help="the question about the image")
    parser.add_argument("--out", default="overlay.png", help="the overlay PNG to write (default: overlay.png)")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--backend", default="auto", help="auto or onnxruntime")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the grid values (rows x cols, summing to 1) and the kept patches as JSON")
    parser.add_argument("--decoder", action="store_true",
                        help="show the greedy answer's attention over the visual tokens instead of the vision "
                             "encoder's (bundles with CMAI)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="--decoder: at most this many answer tokens")


def run(args) -> int:
    from . import load

    pipeline = load(args.bundle, backend=args.backend, device=args.device)
    explanation = pipeline.explain(args.image, args.prompt, decoder=args.decoder, max_new_tokens=args.max_new_tokens)
    explanation.save(args.out, args.json)
    rows, cols = explanation.grid.shape
    kept = "all" if explanation.kept is None else len(explanation.kept)
    summary = {"out": args.out, "grid": [rows, cols], "kept_patches": kept}
    if explanation.answer is not None:
        summary["answer"] = explanation.answer
    print(json.dumps(summary))
    return 0
