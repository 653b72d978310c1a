"""ONNX Runtime session options for a shared edge CPU, chosen by measurement (docs/gpu.md, CPU section).

    python scripts/cpu_session_options.py [--bundle B] [--rounds 5] [--json docs/gpu-results/cpu-session-options.json]

For each setting (intra-op threads: ONNX Runtime's default = one per core, or 1; idle threads spinning or
sleeping: PIPMM_THREADS / PIPMM_SPINNING), sdk/bench.py bench() through Pipeline.generate, alone and with a
busy process taking one core (a pure-Python loop), interleaved and rotated per round; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {"threads=default spin": ("", "1"), "threads=default sleep": ("", "0"),
            "threads=1 spin": ("1", "1"), "threads=1 sleep": ("1", "0")}
METRICS = ("prefill_ms", "ttft_ms", "decode_tokens_per_s")


def busy(stop) -> None:
    while not stop.is_set():
        sum(range(10000))


def measure(bundle: Path, threads: str, spin: str, new_tokens: int, runs: int) -> dict:
    from sdk.bench import bench

    os.environ["PIPMM_THREADS"], os.environ["PIPMM_SPINNING"] = threads, spin
    if not threads:
        del os.environ["PIPMM_THREADS"]
    result = bench(bundle, backend="onnxruntime", device="cpu", new_tokens=new_tokens, runs=runs, warmup=1,
                   log=lambda *a, **k: None)
    return {name: result["stages"][name]["median"] for name in METRICS} | {"decoder": result["backend"]["decoder_graph"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path.home() / ".cache" / "pipmm" / "compare_genai" /
                        "default_model" / "bundle-fused", help="a bundle (default: compare_genai.py's fused copy)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gpu-results" / "cpu-session-options.json")
    args = parser.parse_args(argv)
    got = {cond: {name: [] for name in SETTINGS} for cond in ("alone", "one core taken")}
    names = list(SETTINGS)
    for r in range(args.rounds):
        for cond in got:
            stop = multiprocessing.Event()
            hog = multiprocessing.Process(target=busy, args=(stop,)) if cond != "alone" else None
            if hog:
                hog.start()
            try:
                for name in names[r % 4:] + names[: r % 4]:
                    got[cond][name].append(measure(args.bundle, *SETTINGS[name], args.new_tokens, args.runs))
            finally:
                if hog:
                    stop.set()
                    hog.join()
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{c} {n}: {got[c][n][-1]['decode_tokens_per_s']:.0f} tok/s" for c in got for n in names), flush=True)
    medians = {c: {n: {m: float(np.median([x[m] for x in runs])) for m in METRICS} for n, runs in v.items()}
               for c, v in got.items()}
    result = {"schema": "pipmm-cpu-session-options/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python scripts/cpu_session_options.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "shared": "yes: other processes ran on the same cores"},
              "bundle": str(args.bundle), "decoder": got["alone"][names[0]][0]["decoder"],
              "config": {"new_tokens": args.new_tokens, "rounds": args.rounds, "runs_per_round": args.runs},
              "medians": medians, "rounds": got}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("| setting | alone: prefill ms / TTFT ms / decode tok/s | one core taken: prefill ms / TTFT ms / decode tok/s |")
    print("|---|---|---|")
    for name in names:
        cells = [" / ".join(f"{medians[c][name][m]:.0f}" for m in METRICS) for c in medians]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
