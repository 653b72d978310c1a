"""One export step per call, so that scripts/gpu_measure.py can run several in parallel processes.

    python scripts/gpu_export.py checkpoint --preset llava-1.5-7b --out CKPT [--device cuda]   (+ CKPT-mlp/)
    python scripts/gpu_export.py bundle --checkpoint CKPT --out B (--plain | --prompt-mlp M) [--budget half
            --reducer prompt-topk] [--graphs vision,embed,decoder] [--reuse OTHER_BUNDLE] [--dtype fp16]
    python scripts/gpu_export.py static --checkpoint CKPT --out DIR/decoder_static.onnx [--dtype fp16]
    python scripts/gpu_export.py attach --bundle B --graph decoder_static=DIR/decoder_static.onnx

Each prints one JSON line: what it did, seconds, bytes written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("bundle")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--prompt-mlp", default=None)
    p.add_argument("--budget", default="full")
    p.add_argument("--reducer", default="pool")
    p.add_argument("--graphs", default="vision,embed,decoder,decoder_static")
    p.add_argument("--reuse", default=None)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("static")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("attach")
    p.add_argument("--bundle", required=True)
    p.add_argument("--graph", action="append", required=True, metavar="NAME=PATH")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.step == "checkpoint":
        import torch

        from export.synthetic import build_random_checkpoint, build_random_prompt_mlp

        out = build_random_checkpoint(args.out, args.preset, dtype=torch.float16, device=args.device)
        build_random_prompt_mlp(out, f"{args.out}-mlp", seed=1, std=None)  # timing only: default init
        written = _size(out)
    elif args.step == "bundle":
        from export.extra_graphs import export_direct

        out = export_direct(args.checkpoint, args.out, prompt_mlp=args.prompt_mlp, no_prompt_mlp=args.plain,
                            budget=args.budget, reducer=args.reducer, dtype=args.dtype, device=args.device,
                            graphs=tuple(args.graphs.split(",")), reuse=args.reuse, overwrite=True,
                            log=lambda *a: print(*a, file=sys.stderr, flush=True))
        written = _size(out)
    elif args.step == "static":
        from export.extra_graphs import export_optional_graph

        out = export_optional_graph(args.checkpoint, "decoder_static", args.out, dtype=args.dtype, device=args.device)
        written = _size(Path(args.out).parent)
    else:
        from export.extra_graphs import attach_graphs

        out = attach_graphs(args.bundle, dict(g.split("=", 1) for g in args.graph), verify=False)
        written = _size(out)
    print(json.dumps({"step": args.step, "out": str(out), "seconds": round(time.perf_counter() - start, 1),
                      "bytes": written}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
