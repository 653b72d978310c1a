"""The multi-image table (issue 16, docs/multi-image.md): accuracy per multi-frame family for concat / qformer /
mivpg, the tokens the LLM sees, and TTFT and peak memory for 1, 2, 4 and 8 frames.

    # latency and memory, through Pipeline.generate, one fresh process per (mode, frames) for its own peak RSS:
    python scripts/mivpg_table.py measure --out docs/multi-image-results/latency-cpu.json            # this machine
    python scripts/mivpg_table.py measure --preset edge-0.5b --device cuda --out .../latency-gpu.json # GPU, 0.5B
    # the table, from that JSON and `pipmm eval BUNDLE --multiview --frames 4 --json` results:
    python scripts/mivpg_table.py table --latency .../latency-cpu.json --accuracy concat=a.json qformer=b.json \\
           mivpg=c.json --out docs/multi-image-results/table.md

measure: the default model (models/default_model, exported as the embedded bundle is: half budget, prompt-topk,
patch positions) with its context raised to 4096 positions for these rows only (RoPE has no table: the graphs
are the same, the LLM was never trained that long, so only time and memory are meaningful), or a PRESETS-shaped
random checkpoint (export/synthetic.py; --preset). concat is that bundle as it is; qformer and mivpg are copies
with random-weight adapters (export/model/mivpg.py) of the shipped recipe's settings (frame order embedded and
export/train/multiframe.py DEFAULTS; --adapter-set overrides, as in `pipmm train`), N_max 8, attached, one frame
answered from its own tokens (multi_image.single_frame "own", as the shipped bundle). Each run is
generate(frames, prompt, max_new_tokens=N, min_new_tokens=N, temperature=0) after one warm-up, the three modes'
requests interleaved in one process per frame count (a changing load falls on all alike); reported: medians of
ttft_ms and of the stages, the tokens the LLM saw, and the peak host RSS (and device memory on a GPU) of a fresh
process per row.
The adapter graph has fixed shapes: it computes all N_max frame slots whatever the number of frames, so its cost
is the same for 1 and 8 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("concat", "qformer", "mivpg")
FRAMES = (1, 2, 4, 8)
PROMPT = "Is there a red object in every frame?"
CONTEXT = 4096


def adapter_settings(pairs: list[str]) -> dict:
    """The shipped recipe's AdapterConfig fields (frame order embedded + export/train/multiframe.py DEFAULTS),
    with KEY=VALUE overrides: what a trained adapter computes, so its latency is the one measured."""
    from export.train import multiframe

    return multiframe.adapter_settings(pairs, {"frame_order": "embedded", **multiframe.DEFAULTS["adapter_settings"]})


def build(work: Path, preset: str | None, device: str, settings: dict, log=print) -> dict[str, Path]:
    """mode -> bundle directory (built once under `work`)."""
    import torch

    from export.model.mivpg import random_adapter
    from export.multi_image import attach_adapter
    from export.synthetic import build_random_checkpoint, build_random_prompt_mlp
    from export.writer import export_bundle

    bundles = {mode: work / f"bundle-{mode}" for mode in MODES}
    if all((b / "manifest.json").is_file() for b in bundles.values()):
        return bundles
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        if preset is None:  # the default model, context raised (config only: the weights are the shipped ones)
            shutil.copytree(ROOT / "models/default_model", checkpoint, dirs_exist_ok=True)
            config = json.loads((checkpoint / "config.json").read_text())
            config["text_config"]["max_position_embeddings"] = CONTEXT
            (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
        else:
            build_random_checkpoint(checkpoint, preset, dtype=torch.float32, device=device)
            build_random_prompt_mlp(checkpoint, checkpoint, seed=1, std=None)
    if not (bundles["concat"] / "manifest.json").is_file():
        start = time.perf_counter()
        export_bundle(checkpoint, bundles["concat"], prompt_mlp=checkpoint, budget="half", reducer="prompt-topk",
                      visual_positions="patch", overwrite=True, progress=False)
        log(f"exported {bundles['concat']} in {time.perf_counter() - start:.0f} s")
    config = json.loads((checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    shape = {"d_in": config["text_config"]["hidden_size"],
             "num_patches": (vision["image_size"] // vision["patch_size"]) ** 2}
    for mode in ("qformer", "mivpg"):
        if not (bundles[mode] / "adapter.onnx").is_file():
            shutil.rmtree(bundles[mode], ignore_errors=True)
            shutil.copytree(bundles["concat"], bundles[mode])
            attach_adapter(bundles[mode], random_adapter(mode, seed=0, **shape, **settings), n_max=max(FRAMES),
                           single_frame="own")  # as scripts/export_multi_image_bundle.sh ships it
            log(f"attached a random {mode} adapter to {bundles[mode]}")
    return bundles


STAGES = ("ttft_ms", "preprocess_ms", "prompt_ms", "vision_ms", "adapter_ms", "prefill_ms", "decode_ms_per_token")


def _request(pipeline, images, new_tokens: int):
    return pipeline.generate(images, PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)


def timing(bundles: list[str], frames: int, runs: int, new_tokens: int, device: str) -> list[dict]:
    """Every bundle loaded in this process, one warm-up each, then `runs` rounds of one request per bundle in
    turn, so a load that changes during the measurement (a shared machine) falls on every mode alike."""
    import sdk
    from sdk.bench import bench_image

    images = [bench_image(seed=i) for i in range(frames)]
    pipelines = [sdk.load(b, device=device) for b in bundles]
    results = [[_request(p, images, new_tokens)] for p in pipelines]
    for _ in range(runs):
        for p, out in zip(pipelines, results):
            out.append(_request(p, images, new_tokens))
    rows = []
    for p, out in zip(pipelines, results):
        out = out[1:]
        rows.append({"frames": frames, "mode": p.frames.mode, "llm_visual_tokens": out[0].visual_tokens,
                     "prompt_tokens": int(len(p.frames.prompt_ids(p.prompter, PROMPT, frames)[0])),
                     **{s: statistics.median(r.timings.get(s, 0.0) for r in out) for s in STAGES},
                     "ttft_ms_runs": [round(r.timings["ttft_ms"], 2) for r in out],
                     "tokens_equal_across_runs": len({tuple(r.token_ids) for r in out}) == 1,
                     "backend": p.backend.info() if hasattr(p.backend, "info") else {}})
    return rows


def memory(bundle: str, frames: int, new_tokens: int, device: str) -> dict:
    """Peak memory of a fresh process that loads the bundle and answers one request (after a warm-up)."""
    import sdk
    from runtimes.device_info import MemorySampler
    from sdk.bench import bench_image

    images = [bench_image(seed=i) for i in range(frames)]
    with MemorySampler("cpu" if device == "cpu" else "cuda") as sampler:
        pipeline = sdk.load(bundle, device=device)
        for _ in range(2):
            _request(pipeline, images, new_tokens)
    return sampler.peaks()


def _child(args: list[str], threads: int | None) -> dict | list:
    env = {**os.environ, **({"PIPMM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> None:
    from runtimes.device_info import describe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundles = build(work, args.preset, args.device, adapter_settings(args.adapter_set))
    rows, load = [], [os.getloadavg()[0]]
    for frames in args.frames:
        common = ["--frames", str(frames), "--new-tokens", str(args.new_tokens), "--device", args.device]
        timed = _child(["timing", *[str(bundles[m]) for m in MODES], "--runs", str(args.runs), *common], args.threads)
        for row in timed:
            row["memory"] = _child(["memory", str(bundles[row["mode"]]), *common], args.threads)
            rows.append(row)
            print(f"{row['mode']:>8} {frames} frames: LLM sees {row['llm_visual_tokens']:>5} tokens, TTFT "
                  f"{row['ttft_ms']:8.1f} ms, peak RSS {row['memory']['host_peak_rss_mb']} MB", flush=True)
        load.append(os.getloadavg()[0])
    manifest = json.loads((bundles["mivpg"] / "manifest.json").read_text())
    out = {"schema": "pipmm-mivpg-latency/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join(["python scripts/mivpg_table.py", *sys.argv[1:]]),
           "model": args.preset or "default_model (context raised to 4096 for these rows)", "device": describe(args.device),
           "weights": "shipped default model; random-weight adapters (the shipped recipe's settings)" if args.preset is None
           else f"random {args.preset} checkpoint and adapters", "adapter_set": args.adapter_set, "prompt": PROMPT, "new_tokens": args.new_tokens,
           "runs": args.runs, "intra_op_threads": args.threads or "onnxruntime's default",
           "load_average_1min": [round(v, 2) for v in load],
           "timing": "one process per frame count, the three modes' requests interleaved; memory: one fresh "
                     "process per row (load + warm-up + one request), peak host RSS",
           "adapters": {m: json.loads((bundles[m] / "manifest.json").read_text())["multi_image"]
                        for m in ("qformer", "mivpg")},
           "tokens_per_frame": manifest["visual_tokens"]["count"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


def table(args) -> None:
    latency = json.loads(Path(args.latency).read_text()) if args.latency else {"rows": []}
    accuracy = {}
    for item in args.accuracy or []:
        label, _, file = item.partition("=")
        accuracy[label] = json.loads(Path(file).read_text())
    from export.tasks.multiview import FAMILIES

    lines = ["| mode | " + " | ".join(FAMILIES) + " | order-free | overall | LLM tokens (n frames) | "
             + " | ".join(f"TTFT {n}f ms" for n in FRAMES) + " | " + " | ".join(f"RSS {n}f MB" for n in FRAMES) + " |",
             "|" + "---|" * (len(FAMILIES) + 4 + 2 * len(FRAMES))]
    labels = list(dict.fromkeys([*accuracy, *MODES]))
    for label in labels:
        mode = accuracy[label]["source"]["mode"] if label in accuracy else label
        acc = accuracy.get(label)
        cells = [f"{100 * acc['per_family'][f]['accuracy']:.1f}" if acc and f in acc["per_family"] else "-"
                 for f in FAMILIES]
        cells += [f"{100 * acc['order_free']['accuracy']:.1f}" if acc else "-",
                  f"**{100 * acc['overall']['accuracy']:.1f}**" if acc else "-"]
        # latency rows are per mode, of the measured bundles: shown on the row labelled with that mode only
        rows = {r["frames"]: r for r in latency["rows"] if r["mode"] == mode and label == mode}
        tokens = ", ".join(str(rows[n]["llm_visual_tokens"]) for n in FRAMES if n in rows) or "-"
        ttft = [f"{rows[n]['ttft_ms']:.0f}" if n in rows else "-" for n in FRAMES]
        rss = [f"{rows[n]['memory']['host_peak_rss_mb']:.0f}" if n in rows else "-" for n in FRAMES]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {tokens} | " + " | ".join(ttft + rss) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--work", default="/tmp/pipmm-mivpg-table", help="bundles are built here once")
    m.add_argument("--preset", default=None, help="a PRESETS shape (export/synthetic.py), e.g. edge-0.5b")
    m.add_argument("--device", default="cpu")
    m.add_argument("--frames", type=int, nargs="+", default=list(FRAMES))
    m.add_argument("--runs", type=int, default=7)
    m.add_argument("--new-tokens", type=int, default=8)
    m.add_argument("--threads", type=int, default=None, help="PIPMM_THREADS for the runs (default: ONNX Runtime's)")
    m.add_argument("--adapter-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an AdapterConfig field over the shipped recipe (frame_order=embedded + multiframe DEFAULTS)")
    for name in ("timing", "memory"):
        o = sub.add_parser(name)
        o.add_argument("bundles", nargs="+")
        o.add_argument("--frames", type=int, required=True)
        o.add_argument("--runs", type=int, default=5)
        o.add_argument("--new-tokens", type=int, default=8)
        o.add_argument("--device", default="cpu")
    t = sub.add_parser("table")
    t.add_argument("--latency", default=None)
    t.add_argument("--accuracy", nargs="*", default=None, metavar="LABEL=JSON")
    t.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "measure":
        measure(args)
    elif args.command == "timing":
        print(json.dumps(timing(args.bundles, args.frames, args.runs, args.new_tokens, args.device)))
    elif args.command == "memory":
        print(json.dumps(memory(args.bundles[0], args.frames, args.new_tokens, args.device)))
    else:
        table(args)


if __name__ == "__main__":
    main()
