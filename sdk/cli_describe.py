"""`pipmm describe IMAGE PROMPT`: one description, printed (or as JSON with --json)."""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("image", help="image file (png, jpg, ...)")
    parser.add_argument("prompt", nargs="?", default="Describe the image.", help="the question about the image")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--backend", default="auto", help="auto or onnxruntime")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--inhibit", type=float, default=None, metavar="FRACTION",
                        help="CMAI: mask this fraction [0, 1) of the visual tokens the prompt attends to least "
                             "from the text's attention (docs/vmtc-cmai.md; default 0 = off)")
    parser.add_argument("--stream", action="store_true", help="print text as it is decoded")
    parser.add_argument("--json", action="store_true", help='print {"text", "token_ids", "stats"} as one JSON object')


def run(args) -> int:
    from . import load

    pipeline = load(args.bundle, backend=args.backend, device=args.device)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   inhibit=args.inhibit)
    if args.stream and not args.json:
        for piece in pipeline.stream(args.image, args.prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = pipeline.generate(args.image, args.prompt, **options)
    print(json.dumps(result.to_dict()) if args.json else result.text)
    return 0
