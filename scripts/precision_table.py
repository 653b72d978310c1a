"""Accuracy, agreement, size, load time, memory and latency of one model at each precision, side by side.

    python scripts/precision_table.py --bundle FP32_BUNDLE --work /tmp/precision [--n 800] [--jobs 2]
    python scripts/precision_table.py --checkpoint CKPT --prompt-mlp CKPT --visual-tokens half --reducer prompt-topk ...
    python scripts/precision_table.py --bundle B --variants fp32 fp16 --device cuda     # on a GPU machine

Variants (derived from the FP32 bundle with export.precision.quantize.quantize_bundle, written under --work):
fp32, int8 (decoder weight-only, the default), int8-static (decoder static QDQ too, the TensorRT form),
int4, and fp16 where a CUDA provider exists (or when named in --variants). For each:

* exact-match accuracy per family and overall: export.train.evaluate's questions (the first N of the split, the
  same set `pipmm eval --n N` scores) and its scoring (evaluate.summarize), one generate() per question
  through the SDK, in --jobs processes of one thread each;
* greedy-token agreement with fp32 on the same questions: tokens equal position by position, over the
  longer of the two sequences (and the share of questions whose whole answer is identical);
* bundle size on disk and the decoder's weight bytes (initializers), against fp32;
* in a fresh process per run (--probe): sdk.load time, peak RSS of one describe (VmHWM) and that peak
  minus the RSS after the imports;
* describe latency: all variants loaded in one process and run round-robin (--latency-runs rounds of
  samples/scene.png, "Describe the image.", default generation settings, ONNX Runtime's default threads),
  so a busy machine slows them alike; medians of the total, the vision and prefill stages, decode tokens/s.

Prints markdown tables and the targets of issue 4 met or missed; --json keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "samples" / "scene.png"
SAMPLE_PROMPT = "Describe the image."
# variant -> quantize_bundle options (None: the FP32 bundle itself)
VARIANTS = {
    "fp32": None,
    "fp16": {"precision": "fp16"},
    "int8": {"precision": "int8", "int8_decoder": "weight-only"},
    "int8-static": {"precision": "int8", "int8_decoder": "static"},
    "int4": {"precision": "int4"},
}
TARGETS = {  # issue 4
    "int8": {"accuracy_drop_points": 1.0, "token_agreement": 0.95, "bundle_ratio": 0.35, "peak_rss_ratio": 0.6},
    "int4": {"accuracy_drop_points": 3.0, "decoder_weights_ratio": 0.2},
    "fp16": {"token_agreement": 0.99},
}


# ----------------------------------------------------------------------------- probe (fresh process)

def _status_mb(key: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024


def probe(bundle: str, device: str) -> dict:
    """Load time and peak RSS of one describe, in this (fresh) process."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big parent would report the
    # parent's peak. VmHWM is this process image's own high-water mark.
    import numpy as np  # noqa: F401
    import onnxruntime  # noqa: F401
    from PIL import Image

    import sdk

    image = Image.open(SAMPLE).convert("RGB")
    after_imports = _status_mb("VmRSS")  # resident now (an import may have peaked above what stays)
    start = time.perf_counter()
    pipeline = sdk.load(bundle, device=device)
    load_ms = (time.perf_counter() - start) * 1000
    first = pipeline.generate(image, SAMPLE_PROMPT)
    return {"load_ms": load_ms, "rss_after_imports_mb": after_imports, "peak_rss_mb": _status_mb("VmHWM"),
            "tokens": len(first.token_ids)}


def latency(specs: list[tuple[str, str]], runs: int) -> list[dict]:
    """Describe latency of several bundles in one process, round-robin: a busy machine slows them alike."""
    from PIL import Image

    import sdk

    image = Image.open(SAMPLE).convert("RGB")
    pipelines = [sdk.load(bundle, device=device) for bundle, device in specs]
    for pipeline in pipelines:  # warm-up
        pipeline.generate(image, SAMPLE_PROMPT)
    timings = [[] for _ in pipelines]
    for _ in range(runs):
        for pipeline, out in zip(pipelines, timings):
            out.append(pipeline.generate(image, SAMPLE_PROMPT).timings)
    keys = ("total_ms", "vision_ms", "prefill_ms", "tokens_per_s")
    return [{k: statistics.median(t[k] for t in out) for k in keys} for out in timings]


def run_probes(bundle: Path, device: str, repeats: int) -> dict:
    results = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--probe", str(bundle), "--device", device],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"probe of {bundle} failed: {out.stderr.strip()[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def run_latency(rows: list[dict], runs: int) -> None:
    specs = [f"{row['bundle']}@{row['device']}" for row in rows]
    out = subprocess.run([sys.executable, __file__, "--latency", *specs, "--latency-runs", str(runs)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"latency run failed: {out.stderr.strip()[-2000:]}")
    for row, result in zip(rows, json.loads(out.stdout.strip().splitlines()[-1])):
        row["latency"] = result


# ----------------------------------------------------------------------------- eval (token ids kept)

_WORKER = {}


def _init(bundle: str, device: str):
    os.environ["PIPMM_THREADS"] = "1"
    import sdk

    _WORKER["pipeline"] = sdk.load(bundle, device=device)


def _answer(job):
    from PIL import Image

    array, prompt, max_new_tokens = job
    result = _WORKER["pipeline"].generate(Image.fromarray(array), prompt, max_new_tokens=max_new_tokens)
    return result.text, result.token_ids, result.timings.get("total_ms")


def answer_all(bundle: Path, examples, device: str, jobs: int, max_new_tokens: int) -> list[dict]:
    import multiprocessing as mp

    import numpy as np

    work = [(np.asarray(e.image), e.prompt, max_new_tokens) for e in examples]
    with mp.get_context("spawn").Pool(jobs, initializer=_init, initargs=(str(bundle), device)) as pool:
        answers = pool.map(_answer, work, chunksize=max(1, len(work) // (8 * jobs)))
    return [{"family": e.family, "prompt": e.prompt, "answer": e.answer, "output": text, "token_ids": ids, "ms": ms}
            for e, (text, ids, ms) in zip(examples, answers)]


def agreement(records: list[dict], reference: list[dict]) -> dict:
    same = total = identical = 0
    for r, f in zip(records, reference):
        a, b = r["token_ids"], f["token_ids"]
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b), 1)
        identical += a == b
    return {"token": same / total, "sequence": identical / len(records)}


# ----------------------------------------------------------------------------- tables

def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def markdown(rows: list[dict], families: list[str]) -> str:
    head = "| variant | graphs (vision/embed/decoder) | " + " | ".join(families) + " | overall | Δ vs fp32 |"
    lines = ["Exact match (%), " + f"{rows[0]['eval']['overall']['n']} questions:", "", head,
             "|" + "---|" * (len(families) + 4)]
    for r in rows:
        base = _base(rows, r)["eval"]["overall"]["accuracy"]
        fam = r["eval"]["per_family"]
        cells = [f"{100 * fam[f]['accuracy']:.1f}" if f in fam else "" for f in families]
        acc = r["eval"]["overall"]["accuracy"]
        lines.append(f"| {r['variant']} | {r['graphs']} | " + " | ".join(cells)
                     + f" | **{100 * acc:.1f}** | {100 * (acc - base):+.1f} |")
    lines += ["", "Agreement with fp32 and cost:", "",
              "| variant | token agreement | identical answers | bundle MB (× fp32) | decoder weights MB (× fp32) "
              "| load ms | peak RSS MB (× fp32) | peak RSS − imports MB (× fp32) | describe ms | vision ms "
              "| prefill ms | decode tokens/s |",
              "|" + "---|" * 12]
    for r in rows:
        b = _base(rows, r)
        p, bp = r["probe"], b["probe"]
        model_rss = p["peak_rss_mb"] - p["rss_after_imports_mb"]
        base_model_rss = bp["peak_rss_mb"] - bp["rss_after_imports_mb"]
        lines.append(
            f"| {r['variant']} | {100 * r['agreement']['token']:.1f}% | {100 * r['agreement']['sequence']:.1f}% "
            f"| {r['bundle_bytes'] / 1e6:.2f} ({r['bundle_bytes'] / b['bundle_bytes']:.2f}) "
            f"| {r['decoder_weight_bytes'] / 1e6:.2f} ({r['decoder_weight_bytes'] / b['decoder_weight_bytes']:.2f}) "
            f"| {p['load_ms']:.0f} | {p['peak_rss_mb']:.0f} ({p['peak_rss_mb'] / bp['peak_rss_mb']:.2f}) "
            f"| {model_rss:.0f} ({model_rss / max(base_model_rss, 1e-9):.2f}) "
            f"| {r['latency']['total_ms']:.1f} | {r['latency']['vision_ms']:.1f} | {r['latency']['prefill_ms']:.1f} "
            f"| {r['latency']['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def _base(rows: list[dict], row: dict) -> dict:
    """The fp32 row on the same device (else the first row)."""
    return next((r for r in rows if r["name"] == "fp32" and r["device"] == row["device"]), rows[0])


def check_targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        base = _base(rows, r)
        target = TARGETS.get(r["name"])
        if not target:
            continue
        got = {
            "accuracy_drop_points": 100 * (base["eval"]["overall"]["accuracy"] - r["eval"]["overall"]["accuracy"]),
            "token_agreement": r["agreement"]["token"],
            "bundle_ratio": r["bundle_bytes"] / base["bundle_bytes"],
            "peak_rss_ratio": r["probe"]["peak_rss_mb"] / base["probe"]["peak_rss_mb"],
            "decoder_weights_ratio": r["decoder_weight_bytes"] / base["decoder_weight_bytes"],
        }
        for key, limit in target.items():
            ok = got[key] >= limit if key == "token_agreement" else got[key] <= limit
            sign = ">=" if key == "token_agreement" else "<="
            out.append(f"{r['variant']}: {key} {got[key]:.3f} (target {sign} {limit}) {'met' if ok else 'MISSED'}")
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="the FP32 bundle (default: the embedded one)")
    src.add_argument("--checkpoint", help="export this checkpoint to FP32 first")
    src.add_argument("--probe", help=argparse.SUPPRESS)
    src.add_argument("--latency", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--prompt-mlp", default=None)
    p.add_argument("--no-prompt-mlp", action="store_true")
    p.add_argument("--visual-tokens", default="half")
    p.add_argument("--reducer", default="prompt-topk")
    p.add_argument("--work", default="/tmp/pipmm-precision", help="where the variant bundles are written")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME[@DEVICE]",
                   help=f"of {', '.join(VARIANTS)}; default: all but fp16, plus fp32@cuda fp16@cuda with a GPU")
    p.add_argument("--reuse", action="store_true", help="keep variant bundles already in --work")
    p.add_argument("--calibration", default=None)
    p.add_argument("--calibration-size", type=int, default=32)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=800, help="questions (the first N of the split, as pipmm eval --n)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--probe-repeats", type=int, default=3, help="fresh processes per variant (medians)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)

    if args.probe:
        print(json.dumps(probe(args.probe, args.device)))
        return 0
    if args.latency:
        specs = [tuple(spec.rsplit("@", 1)) for spec in args.latency]
        print(json.dumps(latency(specs, args.latency_runs)))
        return 0

    import onnxruntime

    from export.train import evaluate
    from export.precision import quantize
    from export.tasks import scenes
    from sdk.bundle import default_bundle_path, load_bundle

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        from export.writer import export_bundle

        fp32 = work / "fp32"
        if not (args.reuse and fp32.exists()):
            export_bundle(args.checkpoint, fp32, prompt_mlp=args.prompt_mlp, no_prompt_mlp=args.no_prompt_mlp,
                          budget=args.visual_tokens, reducer=args.reducer, overwrite=True)
    else:
        fp32 = Path(args.bundle) if args.bundle else default_bundle_path()
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    # "NAME" runs on --device, "NAME@DEVICE" on DEVICE (e.g. fp16@cuda beside the CPU rows)
    specs = args.variants or [v for v in VARIANTS if v != "fp16"] + (["fp32@cuda", "fp16@cuda"] if gpu else [])
    runs = [(spec, *spec.partition("@")[::2]) for spec in specs]
    runs = [(label, name, device or args.device) for label, name, device in runs]
    for label, name, _ in runs:
        if name not in VARIANTS:
            p.error(f"unknown variant {label!r}: choose from {', '.join(VARIANTS)} (optionally NAME@DEVICE)")
    if not any(name == "fp32" and device == args.device for _, name, device in runs):
        runs.insert(0, ("fp32", "fp32", args.device))

    bundles = {}
    for name in dict.fromkeys(name for _, name, _ in runs):
        options = VARIANTS[name]
        if options is None:
            bundles[name] = fp32
            continue
        out = work / name
        if not (args.reuse and out.exists()):
            start = time.perf_counter()
            kwargs = dict(options)
            if "int8-static" in quantize.plan(kwargs["precision"], kwargs.get("int8_decoder", "weight-only")).values():
                kwargs.update(calibration_set=args.calibration, calibration_size=args.calibration_size)
            quantize.quantize_bundle(fp32, out, overwrite=True, **kwargs)
            print(f"{name}: made in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        bundles[name] = out

    examples = evaluate.questions(args.split, args.n)
    rows, answers = [], {}
    for label, name, device in runs:  # all evals first, then all probes back to back
        bundle = bundles[name]
        manifest = load_bundle(bundle, verify=False).manifest
        start = time.perf_counter()
        answers[label] = answer_all(bundle, examples, device, args.jobs, args.max_new_tokens)
        seconds = time.perf_counter() - start
        reference = answers.get("fp32" if device == args.device else f"fp32@{device}", answers[runs[0][0]])
        summary = evaluate.summarize([dict(r) for r in answers[label]], manifest,
                                     {"source": {"kind": "bundle", "path": str(bundle), "device": device},
                                      "seconds": round(seconds, 1),
                                      "data": {"split": args.split, "n": len(examples)}})
        graphs = manifest.precision.graphs
        rows.append({
            "variant": label, "name": name, "device": device, "bundle": str(bundle),
            "graphs": "/".join(graphs[g] for g in ("vision", "embed", "decoder")),
            "eval": summary, "agreement": agreement(answers[label], reference),
            "bundle_bytes": dir_bytes(bundle), "decoder_weight_bytes": quantize.weight_bytes(bundle / "decoder.onnx"),
        })
        print(f"{label}: {100 * summary['overall']['accuracy']:.1f}% in {seconds:.0f} s", file=sys.stderr)
    for row in rows:
        row["probe"] = run_probes(Path(row["bundle"]), row["device"], args.probe_repeats)
    run_latency(rows, args.latency_runs)

    families = [f for f in scenes.FAMILIES if f in rows[0]["eval"]["per_family"]]
    table = markdown(rows, families)
    verdicts = check_targets(rows)
    source = args.checkpoint or str(fp32)
    header = (f"Model: {source} ({load_bundle(fp32, verify=False).manifest.visual_tokens.to_dict()}); "
              f"device {args.device} unless the variant says @device, "
              f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores, "
              f"eval in {args.jobs} processes x 1 thread, "
              f"load/RSS: median of {args.probe_repeats} fresh processes; latency: medians of {args.latency_runs} "
              f"round-robin describes of samples/scene.png, one process, default threads.")
    text = header + "\n\n" + table + "\n\nTargets (issue 4):\n\n" + "\n".join(f"* {v}" for v in verdicts) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        for r in rows:
            r["eval"].pop("mistakes", None)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "targets": verdicts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
