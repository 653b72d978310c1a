"""Build a random checkpoint of a real shape, export its bundles, bench them on the GPU; results under --out.

    python scripts/gpu_measure.py --preset edge-0.5b --work /tmp/pipmm --out $OUT            # everything
    python scripts/gpu_measure.py --preset llava-1.5-7b --work /tmp/pipmm --stage export     # export only
    python scripts/gpu_measure.py --preset llava-1.5-7b --work /tmp/pipmm --stage bench --out $OUT

Export (scripts/gpu_export.py steps, independent ones in parallel processes): the FP16 checkpoint and a random
prompt MLP on the GPU; the plain-LLaVA bundle (vision, embed, decoder) traced on the CPU while decoder_static is
traced in another process, then attached (its weights pointed into decoder.onnx.data); the PIP-MM full and half
(prompt-topk) bundles, which trace only their vision graph and hard-link the rest. Bench: one `pipmm bench`
process per configuration (CONFIGS), so each one's peak memory is its own; transformers' eager FP16 generate is
timed beside the plain full-budget bundle (--compare-hf). Writes <preset>.json (every result, export timings,
disk), <preset>.md (table, targets) and <preset>.png (chart) via scripts/gpu_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label, bundle, bench arguments, compare with transformers; in order of importance (a deadline cuts the tail)
CONFIGS = [
    ("ORT CUDA + graph, plain, full", "plain-full", ["--cuda-graph"], True),
    ("ORT CUDA + graph, PIP-MM, half", "pipmm-half", ["--cuda-graph"], False),
    ("ORT CUDA + graph, PIP-MM, full", "pipmm-full", ["--cuda-graph"], False),
    ("ORT CUDA + graph, PIP-MM, half, cache = max context", "pipmm-half", ["--cuda-graph", "--max-cache", "MAX"], False),
    ("ORT CUDA, plain, full", "plain-full", ["--no-cuda-graph"], False),
    ("ORT CUDA, PIP-MM, half", "pipmm-half", ["--no-cuda-graph"], False),
    ("ORT CUDA dynamic KV, plain, full", "plain-full", ["--kv-cache", "device"], False),
    ("ORT CUDA, PIP-MM, full", "pipmm-full", ["--no-cuda-graph"], False),
]


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def step(args: list[str], logfile: Path) -> subprocess.Popen:
    out = open(logfile, "a")
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_export.py"), *args], stdout=subprocess.PIPE,
                            stderr=out, text=True, cwd=ROOT)


def finish(process: subprocess.Popen, what: str) -> dict:
    stdout, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}); see the export log")
    record = json.loads(stdout.strip().splitlines()[-1])
    log(f"{what}: {record['seconds']} s, {record['bytes'] / 1e9:.2f} GB")
    return record


def export(preset: str, work: Path, device: str = "cuda") -> dict:
    ckpt, mlp = work / "ckpt", work / "ckpt-mlp"
    logfile = work / "export.log"
    start = time.perf_counter()
    records = {"checkpoint": finish(step(["checkpoint", "--preset", preset, "--out", str(ckpt), "--device", device],
                                         logfile), "checkpoint")}
    a = step(["bundle", "--checkpoint", str(ckpt), "--plain", "--graphs", "vision,embed,decoder",
              "--out", str(work / "plain-full")], logfile)
    b = step(["static", "--checkpoint", str(ckpt), "--out", str(work / "static" / "decoder_static.onnx")], logfile)
    records["plain-full"] = finish(a, "plain bundle (vision, embed, decoder)")
    records["decoder_static"] = finish(b, "decoder_static (in parallel)")
    records["attach"] = finish(step(["attach", "--bundle", str(work / "plain-full"), "--graph",
                                     f"decoder_static={work / 'static' / 'decoder_static.onnx'}"], logfile), "attach")
    common = ["--checkpoint", str(ckpt), "--prompt-mlp", str(mlp), "--reuse", str(work / "plain-full")]
    c = step(["bundle", *common, "--out", str(work / "pipmm-full")], logfile)
    d = step(["bundle", *common, "--budget", "half", "--reducer", "prompt-topk", "--out", str(work / "pipmm-half")],
             logfile)
    records["pipmm-full"] = finish(c, "PIP-MM full (vision traced, rest linked)")
    records["pipmm-half"] = finish(d, "PIP-MM half (vision traced, rest linked)")
    usage = shutil.disk_usage(work)
    info = {"seconds": round(time.perf_counter() - start, 1), "steps": records,
            "disk_used_gb": round((usage.total - usage.free) / 1e9, 1), "disk_free_gb": round(usage.free / 1e9, 1),
            "bundle_files": {name: {f: info["bytes"] for f, info in
                                    json.loads((work / name / "manifest.json").read_text())["files"].items()}
                             for name in ("plain-full", "pipmm-full", "pipmm-half")}}
    (work / "export.json").write_text(json.dumps(info, indent=2))
    log(f"export done in {info['seconds']} s; disk free {info['disk_free_gb']} GB")
    return info


def torch_copy_bandwidth() -> float | None:
    """Cross-check of the bench's cudaMemcpy figure: a 1 GiB device-to-device copy through torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * (1 << 30) * 20 / (start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def bench(preset: str, work: Path, new_tokens: int, runs: int, warmup: int, deadline: float, only=None,
          device: str = "cuda") -> list[dict]:
    results = []
    (work / "results").mkdir(exist_ok=True)
    max_context = json.loads((work / "plain-full" / "manifest.json").read_text())["model"]["max_context"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for index, (label, bundle, extra, compare) in enumerate(CONFIGS):
        if only and index not in only:
            continue
        if time.monotonic() > deadline:
            log(f"skipped (time): {label}")
            continue
        extra = [str(max_context) if a == "MAX" else a for a in extra]
        out = work / "results" / f"{index}.json"
        cmd = [sys.executable, "-m", "sdk.cli", "bench", str(work / bundle), "--device", device, "--new-tokens",
               str(new_tokens), "--runs", str(runs), "--warmup", str(warmup), "--json", str(out), "--label", label,
               "--no-verify", *extra]
        if compare:
            cmd += ["--compare-hf", str(work / "ckpt"), "--hf-dtype", "fp16", "--hf-attn", "eager"]
        log("bench:", " ".join(cmd[2:]))
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(30, deadline - time.monotonic()))
        if done.returncode != 0:
            log(f"FAILED {label}: {done.stderr.strip()[-600:]}")
            continue
        print(done.stdout.strip(), flush=True)
        result = json.loads(out.read_text())
        result["command"] = "pipmm " + shlex.join(cmd[3:]).replace(str(work), "$WORK")
        result["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True)
    parser.add_argument("--work", default="/tmp/pipmm")
    parser.add_argument("--out", default=None)
    parser.add_argument("--stage", default="all", choices=["all", "export", "bench"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=520, help="stop starting new benches after this")
    parser.add_argument("--only", default=None, help="comma-separated CONFIGS indices")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script on the ci-tiny preset")
    parser.add_argument("--wait-export", type=float, default=0, help="seconds to wait for a background export")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    work = Path(args.work) / args.preset
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "export"):
        export(args.preset, work, args.device)
    if args.stage == "export":
        return 0
    waited = 0.0
    while not (work / "export.json").exists() and waited < args.wait_export:
        time.sleep(5)
        waited += 5
    if not (work / "export.json").exists():
        raise SystemExit(f"no export in {work}: run --stage export first")
    bandwidth = torch_copy_bandwidth()
    log(f"torch device-to-device copy: {bandwidth / 1e9:.0f} GB/s" if bandwidth else "no torch bandwidth")
    only = {int(i) for i in args.only.split(",")} if args.only else None
    results = bench(args.preset, work, args.new_tokens, args.runs, args.warmup, deadline, only, args.device)
    doc = {"preset": args.preset, "export": json.loads((work / "export.json").read_text()),
           "torch_copy_gb_per_s": bandwidth / 1e9 if bandwidth else None, "results": results}
    if args.out:
        from gpu_report import write_report

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.preset}.json").write_text(json.dumps(doc, indent=1))
        write_report(doc, out / f"{args.preset}.md", out / f"{args.preset}.png")
        print((out / f"{args.preset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
