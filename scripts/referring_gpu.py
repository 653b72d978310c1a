"""Referring latency on a GPU at real shapes (random weights): ms per energy_grad step and per answer.

    python scripts/referring_gpu.py --preset edge-0.5b --out /tmp/referring-gpu [--device cuda] [--runs 5]

Builds a random checkpoint of the preset (export/synthetic.py), traces a plain full-budget FP16 bundle with
energy_grad on the device (export/extra_graphs.py export_direct), then times Pipeline.generate on ONNX Runtime
(CUDA): no referring, ControlMLLM (5 steps: early stop off) and ControlMLLM++ (3 steps), a box over a quarter of
the image, 16 new tokens (min = max, so every row decodes the same count). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edge-0.5b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    import sdk
    from export.extra_graphs import export_direct
    from export.synthetic import build_random_checkpoint

    out = Path(args.out)
    start = time.perf_counter()
    checkpoint = build_random_checkpoint(out / "checkpoint", args.preset, dtype=torch.float16, device=args.device)
    built = time.perf_counter() - start
    bundle = export_direct(checkpoint, out / "bundle", no_prompt_mlp=True, budget="full", reducer="pool",
                           dtype="fp16", device=args.device, graphs=("vision", "embed", "decoder", "energy_grad"),
                           overwrite=True, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    exported = time.perf_counter() - start - built
    torch.cuda.empty_cache()
    pipe = sdk.load(bundle, device=args.device)
    settings = pipe.manifest.referring
    fixed = replace(settings.variants["controlmllm"], stop_ratio=None)
    pipe.manifest = replace(pipe.manifest, referring=replace(settings, variants={**settings.variants,
                                                                                  "controlmllm": fixed}))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    box = sdk.Box(56, 56, 168, 168)
    rows = {"no referring": {}, "controlmllm": {"region": box, "referring": "controlmllm"},
            "controlmllm++": {"region": box, "referring": "controlmllm++"}}
    report = {"preset": args.preset, "device": args.device, "checkpoint_s": built, "export_s": exported,
              "energy_grad_bytes": sum(p.stat().st_size for p in Path(bundle).glob("energy_grad.onnx*")),
              "decoder_bytes": sum(p.stat().st_size for p in Path(bundle).glob("decoder.onnx*")),
              "sharing": pipe.manifest.graphs["energy_grad"].sharing, "rows": {}}
    for name, kwargs in rows.items():
        answers, steps = [], []
        for run in range(args.runs + 1):  # the first run warms up (session, arena, kernels)
            t0 = time.perf_counter()
            result = pipe.generate(image, "What is in the box?", max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, **kwargs)
            if run:
                answers.append((time.perf_counter() - t0) * 1000)
                if result.referring:
                    steps.extend(result.referring["step_ms"])
        report["rows"][name] = {"ms_per_answer": statistics.median(answers),
                                "ms_per_step": statistics.median(steps) if steps else 0.0,
                                "steps": len(steps) // args.runs, "prefill_ms": result.timings.get("prefill_ms"),
                                "visual_tokens": result.visual_tokens}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
