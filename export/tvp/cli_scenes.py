"""`pipmm tvp scenes`: the shifted domain's images, questions and captions (export/tvp/domain.py)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--n", required=True, type=int, help="number of scenes (TVP trains on a few hundred)")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="shifted split (default train)")
    parser.add_argument("--size", default=224, type=int, help="image side in pixels (default 224)")
    parser.add_argument("--seed-offset", default=0, type=int, help="first scene index within the split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import json

    from export.tasks.scenes import SceneArgumentError
    from export.tvp.domain import write_dataset

    if args.n < 1:
        raise SceneArgumentError(f"--n must be at least 1, got {args.n}")
    path = write_dataset(args.out, args.n, args.split, args.size, args.seed_offset, progress=not args.quiet)
    print(f"wrote {len(json.loads(path.read_text()))} questions on {args.n} shifted scenes to {path}")
    return 0
