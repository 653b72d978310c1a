"""`pipmm eval BUNDLE --multiview --frames 4`: exact match per multi-frame family (export/tasks/multiview.py).

    pipmm eval BUNDLE --multiview --frames 4 --n 2000 [--split test] [--jobs 8] [--json out.json]

Every question runs through the SDK as a user would ask it, `sdk.load(bundle).generate(frames, prompt)`, so
concat, qformer and mivpg bundles are scored the same way (the bundle's manifest says which). Questions are the
first N of multiview.iter_examples(split, frames) (one per family a sample allows, in sample order): every run with
the same --split/--n/--frames/--seed-offset scores the same questions. Also reported: the tokens the LLM saw per
request, and accuracy over the order-free families (count_all, every_frame) that a permutation-invariant
adapter can answer at all.
"""

from __future__ import annotations

import os
import statistics

from export.tasks import multiview
from export.tasks.answers import normalize
from export.train.progress import progress as progress_bar

MISTAKES_KEPT = 20


def run_pipeline(pipeline, examples, max_new_tokens: int = 16, progress: bool = False) -> list[dict]:
    records = []
    for e in progress_bar(examples, progress, desc="eval mv"):
        result = pipeline.generate(e.frames, e.prompt, max_new_tokens=max_new_tokens)
        records.append({"family": e.family, "kind": e.kind, "prompt": e.prompt, "answer": e.answer,
                        "output": result.text, "ms": result.timings.get("total_ms"),
                        "ttft_ms": result.timings.get("ttft_ms"), "visual_tokens": result.visual_tokens})
    return records


_WORKER = {}


def _worker_init(bundle: str, device: str):
    os.environ["PIPMM_THREADS"] = "1"  # one thread per process: many small requests scale by processes
    import sdk

    _WORKER["pipeline"] = sdk.load(bundle, device=device)


def _worker_run(job):
    (split, first, count, frames, families, size), max_new_tokens = job
    examples = [e for i in range(first, first + count)
                for e in multiview.sample(split, i, frames, size, families=families)]
    return first, run_pipeline(_WORKER["pipeline"], examples, max_new_tokens)


def run_bundle(bundle: str, split: str, n: int, frames: int, families, seed_offset: int = 0, device: str = "auto",
               jobs: int = 1, max_new_tokens: int = 16, progress: bool = False) -> tuple[list[dict], object]:
    """The first n questions of the split's multi-view samples at `frames` frames, drawn at the bundle's image
    size -> (records, manifest)."""
    import sdk
    from sdk.bundle import load_bundle

    manifest = load_bundle(bundle, verify=False).manifest
    size = manifest.vision.image_size
    if jobs <= 1:
        pipeline = sdk.load(bundle, device=device)
        examples = multiview.examples(split, n, frames, size, families=families, seed_offset=seed_offset)
        return run_pipeline(pipeline, examples, max_new_tokens, progress), pipeline.manifest
    import multiprocessing as mp

    # n samples give at least n questions; chunks come back in order and the pool stops once n are in
    chunk = max(1, min(8, n // (8 * jobs) or 1))
    work = [((split, first, chunk, frames, tuple(families), size), max_new_tokens)
            for first in range(seed_offset, seed_offset + n, chunk)]
    records = []
    with mp.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(str(bundle), device)) as pool:
        for _, part in progress_bar(pool.imap(_worker_run, work), progress, total=len(work), desc="eval mv"):
            records += part
            if len(records) >= n:
                break
    return records[:n], manifest


def summarize(records: list[dict], manifest, meta: dict) -> dict:
    per_family = {}
    for r in records:
        r["correct"] = normalize(r["output"]) == normalize(r["answer"])
        f = per_family.setdefault(r["family"], {"n": 0, "correct": 0})
        f["n"] += 1
        f["correct"] += r["correct"]
    for f in per_family.values():
        f["accuracy"] = f["correct"] / f["n"]
    free = [r for r in records if r["family"] in multiview.ORDER_FREE]
    spec = manifest.multi_image
    times = [r["ms"] for r in records if r["ms"] is not None]
    ttft = [r["ttft_ms"] for r in records if r.get("ttft_ms") is not None]
    return {
        "source": {**meta.get("source", {}), "pipmm": manifest.model.pipmm, "budget": manifest.visual_tokens.budget,
                   "reducer": manifest.visual_tokens.reducer, "tokens_per_frame": manifest.visual_tokens.count,
                   "multi_image": None if spec is None else spec.to_dict(),
                   "mode": "concat" if spec is None else spec.mode},
        "data": meta.get("data", {}),
        "per_family": {f: per_family[f] for f in multiview.FAMILIES if f in per_family},
        "overall": {"n": len(records), "correct": sum(r["correct"] for r in records),
                    "accuracy": sum(r["correct"] for r in records) / max(1, len(records))},
        "order_free": {"n": len(free), "accuracy": sum(r["correct"] for r in free) / max(1, len(free))},
        "llm_visual_tokens": statistics.median([r["visual_tokens"] for r in records]) if records else None,
        "latency_ms": None if not times else {"median": statistics.median(times),
                                              "ttft_median": statistics.median(ttft) if ttft else None},
        "seconds": meta.get("seconds"),
        "mistakes": [{k: r[k] for k in ("family", "prompt", "answer", "output")}
                     for r in records if not r["correct"]][:MISTAKES_KEPT],
    }


def format_table(result: dict) -> str:
    lines = [f"{'family':<12} {'n':>6} {'exact match':>12}"]
    for family, f in result["per_family"].items():
        lines.append(f"{family:<12} {f['n']:>6} {100 * f['accuracy']:>11.1f}%")
    for name in ("order_free", "overall"):
        lines.append(f"{name:<12} {result[name]['n']:>6} {100 * result[name]['accuracy']:>11.1f}%")
    lines.append(f"the LLM saw {result['llm_visual_tokens']} visual tokens per request ({result['source']['mode']})")
    return "\n".join(lines)



def add_arguments(parser) -> None:
    parser.add_argument("--multiview", action="store_true", help="score the multi-frame families (several frames "
                                                                  "per question; docs/multi-image.md)")
    parser.add_argument("--frames", type=int, default=4, help="with --multiview: frames per question")
    parser.add_argument("--mv-families", nargs="+", default=list(multiview.FAMILIES), choices=multiview.FAMILIES,
                        help="with --multiview: the families to ask")


def run(args, error) -> int:
    """pipmm eval --multiview (called by export/train/evaluate.py, which owns the parser); error: its error type."""
    import json
    import time
    from pathlib import Path

    import sdk.bundle

    if args.checkpoint:
        raise error("--multiview scores a bundle: export the checkpoint (and add its adapter) first")
    if not 1 <= args.frames <= multiview.MAX_FRAMES:
        raise error(f"--frames {args.frames}: 1 to {multiview.MAX_FRAMES}")
    bundle = args.bundle or str(sdk.bundle.default_bundle_path())
    start = time.perf_counter()
    records, manifest = run_bundle(bundle, args.split, args.n, args.frames, args.mv_families, args.seed_offset,
                                   args.device, args.jobs, args.max_new_tokens, not args.quiet)
    meta = {"source": {"kind": "bundle", "path": str(bundle), "device": args.device, "jobs": args.jobs},
            "seconds": round(time.perf_counter() - start, 1),
            "data": {"split": args.split, "n": len(records), "frames": args.frames, "families": list(args.mv_families),
                     "seed_offset": args.seed_offset, "max_new_tokens": args.max_new_tokens}}
    result = summarize(records, manifest, meta)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
