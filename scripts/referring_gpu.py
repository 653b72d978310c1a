"""Referring latency on a GPU at real shapes (random weights): ms per energy_grad step and per answer, with torch
autograd's step on the same weights beside it.

    bash scripts/stage_ort_gpu.sh          # here: the ONNX Runtime GPU wheel in parts, and the device commands
    python3 scripts/referring_gpu.py --preset edge-0.5b --out /tmp/referring-gpu --build-only     # one call
    python3 scripts/referring_gpu.py --preset edge-0.5b --out /tmp/referring-gpu --json $OUT/referring-gpu.json

On the GPU machine itself (nothing big travels): builds a random checkpoint of the preset (export/synthetic.py),
traces a plain full-budget FP16 bundle with energy_grad on the device (export/extra_graphs.py export_direct; the
decoder's weights go to decoder.onnx.data and energy_grad shares them), then times Pipeline.generate on ONNX
Runtime CUDA: no referring, ControlMLLM (5 steps: early stop off) and ControlMLLM++ (3 steps), a box over a
quarter of the image, 16 new tokens (min = max, so every row decodes the same count). The peer, in the same
command: one step of the same energy by torch autograd (export/model/energy.py AttentionEnergy, FP16, CUDA) at
the prefill's length, and the energy of both on one input (parity). Resumable: a checkpoint or bundle already
under --out is reused (run the command again on the same machine after a time-out). Prints one JSON object.
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

PROMPT = "What is in the box?"


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def require_cuda_provider(device: str) -> None:
    import onnxruntime

    if device.startswith("cuda") and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit(f"onnxruntime {onnxruntime.__version__} here has no CUDAExecutionProvider: send and install "
                         "onnxruntime-gpu first (bash scripts/stage_ort_gpu.sh prints the commands)")


def build(args) -> tuple[Path, Path, dict]:
    """-> (checkpoint, bundle, seconds per phase); each reused when already complete under --out."""
    import torch

    from export.extra_graphs import export_direct
    from export.synthetic import build_random_checkpoint
    from sdk.bundle import load_bundle
    from sdk.errors import BundleError

    out, seconds = Path(args.out), {}
    checkpoint, bundle = out / "checkpoint", out / "bundle"
    start = time.perf_counter()
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "tokenizer.json").is_file():
        build_random_checkpoint(checkpoint, args.preset, dtype=torch.float16, device=args.device)
        seconds["checkpoint_s"] = time.perf_counter() - start
    try:
        load_bundle(bundle, verify=False)
        log(f"reusing {bundle}")
    except BundleError:
        start = time.perf_counter()
        export_direct(checkpoint, bundle, no_prompt_mlp=True, budget="full", reducer="pool", dtype="fp16",
                      device=args.device, graphs=("vision", "embed", "decoder", "energy_grad"), overwrite=True,
                      log=log)
        seconds["export_s"] = time.perf_counter() - start
        torch.cuda.empty_cache()
    return checkpoint, bundle, seconds


def time_pipeline(pipe, args) -> dict:
    import sdk

    settings = pipe.manifest.referring
    fixed = replace(settings.variants["controlmllm"], stop_ratio=None)  # every row runs its full step count
    pipe.manifest = replace(pipe.manifest, referring=replace(settings, variants={**settings.variants,
                                                                                  "controlmllm": fixed}))
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    box = sdk.Box(56, 56, 168, 168)
    rows = {"no referring": {}, "controlmllm": {"region": box, "referring": "controlmllm"},
            "controlmllm++": {"region": box, "referring": "controlmllm++"}}
    report = {}
    for name, kwargs in rows.items():
        answers, steps = [], []
        for run in range(args.runs + 1):  # the first run warms up (session, arena, kernels)
            t0 = time.perf_counter()
            result = pipe.generate(image, PROMPT, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kwargs)
            if run:
                answers.append((time.perf_counter() - t0) * 1000)
                if result.referring:
                    steps.extend(result.referring["step_ms"])
        report[name] = {"ms_per_answer": statistics.median(answers),
                        "ms_per_step": statistics.median(steps) if steps else 0.0,
                        "steps": len(steps) // args.runs, "prefill_ms": result.timings.get("prefill_ms"),
                        "referring_ms": result.timings.get("referring_ms", 0.0),
                        "visual_tokens": result.visual_tokens}
        log(f"{name}: {report[name]}")
    return report


def torch_peer(checkpoint: Path, pipe, args) -> dict:
    """One ControlMLLM step by torch autograd (forward + backward of the same energy, FP16) at the prefill's length,
    and both energies on one input."""
    import torch

    from export.model.checkpoint import load_checkpoint
    from export.model.energy import AttentionEnergy
    from sdk.referring import EnergyGradSession, layer_weights, query_weights

    ids, slots = pipe.prompter.prompt_ids(PROMPT)
    t, variant = len(ids), pipe.manifest.referring.variants["controlmllm"]
    layers = pipe.manifest.referring.graph_layers
    rng = np.random.default_rng(1)
    embeds = (rng.normal(0, 0.02, (1, t, pipe.manifest.model.hidden_size))).astype(np.float32)
    mask = np.zeros(t, np.float32)
    mask[slots[: len(slots) // 4]] = 1.0
    image_weight = np.zeros(t, np.float32)
    image_weight[slots] = 1.0
    queries, weights = query_weights(variant, t, slots), layer_weights(variant, layers)
    positions = np.arange(t, dtype=np.int64)[None]
    ort = pipe.energy_graph or EnergyGradSession(pipe)  # the session the rows above opened
    ort_energy, _ = ort(embeds, positions, mask, image_weight, queries, weights)

    ckpt = load_checkpoint(checkpoint, dtype=torch.float16)
    ckpt.model.to(args.device)
    energy = AttentionEnergy(ckpt.language_model, ckpt.config.text_config, layers).eval()
    dev = lambda a, dtype=torch.float16: torch.tensor(a, dtype=dtype, device=args.device)  # noqa: E731
    inputs = (dev(positions, torch.int64), dev(mask), dev(image_weight), dev(queries), dev(weights))
    x = dev(embeds).requires_grad_(True)

    def step():
        x.grad = None
        value = energy(x, *inputs)
        value.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        return float(value.detach())

    torch_energy = step()
    times = []
    for _ in range(args.runs + 1):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000)
    ort_times = []
    for _ in range(args.runs + 1):
        t0 = time.perf_counter()
        ort(embeds, positions, mask, image_weight, queries, weights)
        ort_times.append((time.perf_counter() - t0) * 1000)
    return {"length": t, "torch_ms_per_step": statistics.median(times[1:]),
            "energy_grad_ms_per_call": statistics.median(ort_times[1:]), "torch_energy": torch_energy,
            "ort_energy": ort_energy, "energy_rel_diff": abs(ort_energy - torch_energy) / max(abs(torch_energy), 1e-12)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edge-0.5b")
    parser.add_argument("--out", required=True, help="work folder (checkpoint, bundle); reused when complete")
    parser.add_argument("--json", default=None, help="also write the report here (e.g. $OUT/referring-gpu.json)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--build-only", action="store_true",
                        help="build the checkpoint and bundle and stop (one device call; the timing is the next)")
    args = parser.parse_args(argv)
    require_cuda_provider(args.device)

    import sdk

    checkpoint, bundle, seconds = build(args)
    if args.build_only:
        print(json.dumps({"built": str(bundle), **seconds}))
        return 0
    pipe = sdk.load(bundle, device=args.device)
    report = {"preset": args.preset, "device": args.device, **seconds,
              "energy_grad_bytes": sum(p.stat().st_size for p in bundle.glob("energy_grad.onnx*")),
              "decoder_bytes": sum(p.stat().st_size for p in bundle.glob("decoder.onnx*")),
              "sharing": pipe.manifest.graphs["energy_grad"].sharing, "rows": time_pipeline(pipe, args)}
    report["peer"] = torch_peer(checkpoint, pipe, args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
