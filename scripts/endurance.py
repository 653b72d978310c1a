"""Endurance: many consecutive describes on one Pipeline; resident memory must not creep.

    python scripts/endurance.py                          # the embedded default bundle, 1000 requests
    python scripts/endurance.py --bundle DIR --count 300 --warmup 100 --json

Requests cycle through different images (arrays of several sizes, a PNG and a JPEG file, a PIL
image) and prompts; every 10th request is a bad one (an unreadable file, an empty prompt, a
prompt longer than the context...) that must raise a PipmmError, so error paths are measured too.
After `--warmup` requests, RSS is read (Linux /proc/self/statm); it is read again after `--count`
more. Exit status 1 when it grew by `--max-growth` percent or more (default 5), or when a request
did not do what it should. Runs on the device side only: no torch is imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import sdk  # noqa: E402
from sdk.errors import PipmmError  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image.", "How many objects are there?",
           "Is the gripper holding the red block?", "What color is the large cross?", "Where is the blue ball?",
           "Is there anything unusual here? Answer briefly.", "What is to the left of the cup?"]


def rss_bytes() -> int:
    """Resident set size now (Linux); elsewhere the peak, which is all getrusage offers."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def make_requests(folder: Path, max_context: int) -> tuple[list, list]:
    """(good requests, bad requests): (image, prompt) pairs."""
    rng = np.random.default_rng(0)
    images: list = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
                    [(45, 61), (480, 640), (1, 1), (37, 300), (224, 224)]]
    Image.fromarray(images[1]).save(folder / "frame.png")
    Image.fromarray(images[3]).save(folder / "frame.jpg", quality=90)
    images += [folder / "frame.png", str(folder / "frame.jpg"), Image.fromarray(images[0]).convert("RGBA")]
    good = [(images[i % len(images)], PROMPTS[(i * 3) % len(PROMPTS)]) for i in range(len(images) * len(PROMPTS))]
    (folder / "notes.jpg").write_text("not an image")
    bad = [(folder / "notes.jpg", PROMPTS[0]), (images[0], "   "), (images[0], "word " * max_context),
           (np.zeros((4, 4, 3), np.float32), PROMPTS[1]), (folder / "missing.png", PROMPTS[2])]
    return good, bad


def run(pipeline, count: int, good: list, bad: list, max_new_tokens: int, start_at: int = 0) -> dict:
    latencies, failures, errors = [], [], 0
    for i in range(start_at, start_at + count):
        if i % 10 == 9:
            image, prompt = bad[(i // 10) % len(bad)]
            try:
                pipeline.describe(image, prompt, max_new_tokens=max_new_tokens)
                failures.append(f"request {i}: a bad request was answered")
            except PipmmError:
                errors += 1
            continue
        image, prompt = good[i % len(good)]
        begin = time.perf_counter()
        text = pipeline.describe(image, prompt, max_new_tokens=max_new_tokens)
        latencies.append((time.perf_counter() - begin) * 1000)
        if not isinstance(text, str):
            failures.append(f"request {i}: {text!r}")
    return {"latencies": latencies, "failures": failures, "errors": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=1000, help="requests measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent of RSS growth that fails the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    rss_start = rss_bytes()
    pipeline = sdk.load(args.bundle, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = make_requests(Path(tmp), pipeline.max_context)
        warm = run(pipeline, args.warmup, good, bad, args.max_new_tokens)
        gc.collect()
        rss_warm, objects_warm = rss_bytes(), len(gc.get_objects())
        samples, measured = [], {"latencies": [], "failures": [], "errors": 0}
        step = max(1, args.count // 10)
        for done in range(0, args.count, step):
            part = run(pipeline, min(step, args.count - done), good, bad, args.max_new_tokens,
                       start_at=args.warmup + done)
            for key in ("latencies", "failures"):
                measured[key] += part[key]
            measured["errors"] += part["errors"]
            samples.append(rss_bytes())
        gc.collect()
        rss_end, objects_end = rss_bytes(), len(gc.get_objects())

    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    latencies = np.asarray(measured["latencies"])
    report = {
        "bundle": pipeline.source, "device": args.device, "warmup": args.warmup, "requests": args.count,
        "answered": len(latencies), "refused_as_expected": measured["errors"], "max_new_tokens": args.max_new_tokens,
        "rss_before_load_mb": round(rss_start / 2**20, 1), "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1), "rss_max_sampled_mb": round(max(samples) / 2**20, 1),
        "rss_growth_pct": round(growth, 2), "python_objects_delta": objects_end - objects_warm,
        "latency_ms_mean": round(float(latencies.mean()), 2) if latencies.size else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 2) if latencies.size else None,
        "failures": measured["failures"][:5] + warm["failures"][:5],
    }
    ok = growth < args.max_growth and not report["failures"]
    report["ok"] = ok
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
