"""One token's embedding lookup per encoding, on ONNX Runtime CPU: what a decode step pays before the decoder.

    python scripts/embed_lookup_bench.py                       # 151936 x 896 (Qwen2-0.5B's table), 300 lookups
    python scripts/embed_lookup_bench.py --vocab 32064 --hidden 4096 --json docs/precision-results/embed.json

The embed graph is traced by the exporter bundles use (export.onnx_graphs.export_embed) from a random table
of the given shape, then converted by each of export.precision.quantize's methods for it: fp32 (as traced),
fp16, int8-static (QDQ, what int8/int4 bundles used before issue 18) and int8-gather (int8 rows with a
scale per row, what they use now). Each is timed on a [1,1] lookup (a decode step) and a [1,256] lookup
(a prompt), medians over interleaved rounds, one ONNX Runtime session each, as the SDK opens them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import onnx_graphs  # noqa: E402
from export.model.decoder import EmbedGraph  # noqa: E402
from export.precision import quantize  # noqa: E402

METHODS = ("fp32", "fp16", "int8-static", "int8-gather")


def build(vocab: int, hidden: int, out: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    table = torch.nn.Embedding(vocab, hidden)
    with torch.no_grad():
        table.weight.normal_(0.0, 0.02)
    fp32 = out / "fp32" / "embed.onnx"
    fp32.parent.mkdir(parents=True)
    onnx_graphs.export_embed(EmbedGraph(table).eval(), fp32, {})
    rng = np.random.default_rng(0)
    feeds = {"embed": [{"input_ids": rng.integers(0, vocab, (1, 16), dtype=np.int64)} for _ in range(4)]}
    ctx = {"keep": quantize.KEEP_FP32_DEFAULT["int8"], "block_size": quantize.DEFAULT_BLOCK_SIZE,
           "feeds": lambda: feeds, "calibration": {"pairs": 0, "source": "random ids"}}
    paths = {"fp32": fp32}
    for method in METHODS[1:]:
        path = out / method / "embed.onnx"
        path.parent.mkdir()
        method_ctx = dict(ctx, keep=quantize.KEEP_FP32_DEFAULT["fp16"]) if method == "fp16" else ctx
        quantize.METHODS[method]("embed", fp32, path, method_ctx)
        paths[method] = path
    return paths


def graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir())


def measure(paths: dict[str, Path], vocab: int, rounds: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {m: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for m, p in paths.items()}
    rng = np.random.default_rng(1)
    shapes = {"decode_step_1_token": (1, 1), "prompt_256_tokens": (1, 256)}
    times = {m: {s: [] for s in shapes} for m in sessions}
    for _ in range(rounds):  # interleaved: the machine's noise falls on every method alike
        for shape_name, shape in shapes.items():
            ids = rng.integers(0, vocab, shape, dtype=np.int64)
            for method, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"input_ids": ids})
                times[method][shape_name].append((time.perf_counter() - start) * 1e6)
    return {m: {"bytes": graph_bytes(paths[m]),
                **{f"{s}_us_median": float(np.median(v)) for s, v in per.items()},
                **{f"{s}_us_p90": float(np.percentile(v, 90)) for s, v in per.items()}}
            for m, per in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(build(args.vocab, args.hidden, Path(tmp)), args.vocab, args.rounds, args.threads)
    report = {"table": [args.vocab, args.hidden], "rounds": args.rounds, "threads": args.threads,
              "command": " ".join(["python scripts/embed_lookup_bench.py"] + sys.argv[1:]), "methods": results}
    print(f"{'method':<14}{'MB':>8}{'1 token us':>14}{'256 tokens us':>16}")
    for method, r in results.items():
        print(f"{method:<14}{r['bytes'] / 1e6:>8.1f}{r['decode_step_1_token_us_median']:>14.1f}"
              f"{r['prompt_256_tokens_us_median']:>16.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
