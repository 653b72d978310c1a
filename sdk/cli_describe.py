"""`pipmm describe IMAGE PROMPT`: one description, printed (or as JSON with --json).

    pipmm describe scene.png "What color is this?" --box 40,30,120,90 [--referring controlmllm|controlmllm++|overlay]
    --point x,y (repeatable) | --scribble "x,y;x,y;..." | --mask mask.png   (docs/referring.md)
"""

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
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--box", metavar="X0,Y0,X1,Y1", help="refer to this box (pixels of the image)")
    where.add_argument("--point", action="append", metavar="X,Y", help="refer to this point (repeatable)")
    where.add_argument("--scribble", metavar="X,Y;X,Y;...", help="refer to the polyline through these points")
    where.add_argument("--mask", metavar="FILE", help="refer to this mask (a PNG of the image's size, white = inside)")
    parser.add_argument("--referring", default=None, choices=("controlmllm", "controlmllm++", "overlay"),
                        help="how to refer (default: the bundle's, controlmllm when it has energy_grad, else overlay)")
    parser.add_argument("--visual-prompt", default=None, metavar="DIR",
                        help="frame the image with this TVP prompt directory instead of the bundle's own ('none': "
                             "without the bundle's; docs/tvp.md)")
    parser.add_argument("--stream", action="store_true", help="print text as it is decoded")
    parser.add_argument("--json", action="store_true", help='print {"text", "token_ids", "stats"} as one JSON object')


def _numbers(text: str, count: int | None, flag: str) -> list[float]:
    from .regions import RegionError

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count):
        raise RegionError(f"{flag} {text!r}: pass {count or 'two'} comma-separated numbers, e.g. {flag} "
                          + ",".join(["10", "20", "60", "80"][:count or 2]))
    return values


def region_of(args):
    """The --box / --point / --scribble / --mask argument as an sdk region, or None."""
    from .regions import Box, Mask, Point, Scribble

    if args.box:
        return Box(*_numbers(args.box, 4, "--box"))
    if args.point:
        return Point([_numbers(p, 2, "--point") for p in args.point])
    if args.scribble:
        return Scribble([_numbers(p, 2, "--scribble") for p in args.scribble.split(";") if p.strip()])
    if args.mask:
        return Mask(args.mask)
    return None


def visual_prompt_argument(value: str | None):
    """--visual-prompt DIR | none -> sdk.load's visual_prompt= (None: the bundle's own; False: without it)."""
    return False if value is not None and value.lower() == "none" else value


def run(args) -> int:
    from . import load

    pipeline = load(args.bundle, backend=args.backend, device=args.device,
                    visual_prompt=visual_prompt_argument(args.visual_prompt))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   inhibit=args.inhibit)
    region = region_of(args)
    if region is not None or args.referring is not None:
        if args.stream and not args.json:
            from .errors import GenerationArgumentError
            raise GenerationArgumentError("--stream does not take a region: drop --stream (referring prints the "
                                          "whole answer)")
        options.update(region=region, referring=args.referring)
    if args.stream and not args.json:
        for piece in pipeline.stream(args.image, args.prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = pipeline.generate(args.image, args.prompt, **options)
    print(json.dumps(result.to_dict()) if args.json else result.text)
    return 0
