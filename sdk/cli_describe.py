"""`pipmm describe IMAGE PROMPT`: one description, printed (or as JSON with --json).

    pipmm describe head.jpg wrist.jpg rear.jpg --prompt "Is the red block in every view?"   (frames in order;
    a last positional that is no file and has no image suffix is the prompt: IMAGE PROMPT still works)

    pipmm describe scene.png "What color is this?" --box 40,30,120,90 [--referring controlmllm|controlmllm++|overlay]
    --point x,y (repeatable) | --scribble "x,y;x,y;..." | --mask mask.png   (docs/referring.md)
"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE [IMAGE ...] [PROMPT]",
                        help="image files (png, jpg, ...; several are frames of one request, in order), then the "
                             "question unless --prompt gives it")
    parser.add_argument("--prompt", default=None, help="the question (default: a last positional that is no image "
                                                       "file, else 'Describe the image.')")
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def images_and_prompt(args) -> tuple[list[str], str]:
    """The positionals -> (image files, prompt): the last one is the prompt when --prompt is not given, there is
    more than one, and it is neither a file nor named like an image (a missing frame is reported, not asked)."""
    from pathlib import Path

    inputs = list(args.inputs)
    if args.prompt is not None:
        return inputs, args.prompt
    last = inputs[-1]
    try:
        is_file = Path(last).is_file()
    except (OSError, ValueError):  # a long question is no file name
        is_file = False
    if len(inputs) > 1 and not is_file and not last.lower().endswith(IMAGE_SUFFIXES):
        return inputs[:-1], last
    return inputs, "Describe the image."


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
    images, prompt = images_and_prompt(args)
    image = images[0] if len(images) == 1 else images
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   inhibit=args.inhibit)
    region = region_of(args)
    if region is not None or args.referring is not None:
        options.update(region=region, referring=args.referring)
    if args.stream and not args.json:
        for piece in pipeline.stream(image, prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = pipeline.generate(image, prompt, **options)
    print(json.dumps(result.to_dict()) if args.json else result.text)
    return 0
