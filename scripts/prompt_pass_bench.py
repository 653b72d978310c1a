"""Time to first token, split into prompt pass / vision / prefill, for the ways PIP-MM's prompt pass can run.

    python scripts/prompt_pass_bench.py --preset default --work /tmp/ppb --out docs/gpu-results/prompt_pass_cpu.json
    python scripts/prompt_pass_bench.py --preset edge-0.5b --device cuda --work /tmp/ppb --stage export      # GPU, <10 min
    python scripts/prompt_pass_bench.py --preset edge-0.5b --device cuda --work /tmp/ppb --stage bench --out $OUT/pp.json

Configurations, each a bundle of the same checkpoint run through Pipeline.generate (greedy, fixed new tokens),
interleaved in one process (run r of every configuration before run r + 1 of any, so drift hits all alike):

    plain full                   plain LLaVA, full visual budget: no prompt pass
    PIP-MM half (today)          prompt vector from layer L - 1, the prompt pass through the whole decoder
                                 (PIPMM_PROMPT_ENCODER=decoder: the bundle's prompt_encoder graph not used)
    PIP-MM half, first L layers  the same bundle, its prompt_encoder graph of L layers (sdk/prompt_pass.py "encoder")
    PIP-MM half, prompt first    the prompt-first template (export/train/templates.py), prompt vector from the
                                 last layer, the prompt pass is the prefill's prefix and its KV cache is reused
    PIP-MM half, prompt first, no reuse   the same bundle with PIPMM_PREFIX_REUSE=0 (what reuse saves)

L = half the decoder's layers (--prompt-layer overrides). The prompt MLPs are random (timing only: which
layer answers best is a training question, docs/gpu.md). Presets: `default` is the embedded default model's
checkpoint (models/default_model, 4 layers) in FP32 on the CPU, with decoder_fused and prompt_encoder_fused (the
CPU's fast path); `edge-0.5b` and `llava-1.5-7b` are random
checkpoints of those shapes (export/synthetic.py PRESETS) traced in FP16 on the GPU (export_direct, decoder_static
for the CUDA-graph decode). --stage export writes the bundles (skipping those already there), --stage bench
measures; --stage all does both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = ROOT / "samples" / "scene.png"
PROMPT = "What color is the large cross?"
# --long: a question of about 50 tokens, where the prompt pass weighs more
LONG = ("Look carefully at every object in the picture, at their shapes, colours, sizes and where they lie relative "
        "to each other and to the edges of the frame, and then tell me: what color is the large cross?")
STAGES = ("preprocess_ms", "prompt_ms", "vision_ms", "prefill_ms", "ttft_ms", "tokens_per_s")
# label -> (bundle, environment while it loads and runs)
CONFIGS = {
    "plain full": ("plain-full", {}),
    "PIP-MM half (today)": ("pipmm-half-L", {"PIPMM_PROMPT_ENCODER": "decoder"}),
    "PIP-MM half, first L layers": ("pipmm-half-L", {}),
    "PIP-MM half, prompt first + KV reuse": ("pipmm-half-pf", {}),
    "PIP-MM half, prompt first, no reuse": ("pipmm-half-pf", {"PIPMM_PREFIX_REUSE": "0"}),
}


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of a checkpoint directory whose big files are hard links (the template file differs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copyfile(f, dst / f.name)


def checkpoint(preset: str, work: Path, device: str) -> Path:
    ckpt = work / "ckpt"
    if preset == "default":
        if not ckpt.exists():
            _link_tree(ROOT / "models" / "default_model", ckpt)
            (ckpt / "chat_template.jinja").unlink(missing_ok=True)
        return ckpt
    if not (ckpt / "config.json").is_file():
        import torch

        from export.synthetic import build_random_checkpoint
        build_random_checkpoint(ckpt, preset, dtype=torch.float16, device=device)
    return ckpt


def export(preset: str, work: Path, device: str, prompt_layer: int | None, dtype: str = "fp16") -> dict:
    from transformers import AutoConfig

    from export.extra_graphs import export_direct
    from export.synthetic import build_random_prompt_mlp
    from export.train.templates import write_template
    from export.writer import export_bundle

    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(preset, work, device)
    layers = AutoConfig.from_pretrained(ckpt).text_config.num_hidden_layers
    layer = prompt_layer if prompt_layer is not None else layers // 2 - 1
    pf = work / "prompt-first" / "ckpt"  # the same directory name: the manifests' model.source agree (export_direct reuse)
    _link_tree(ckpt, pf)
    write_template(pf, "prompt-first")
    mlps = {"L": build_random_prompt_mlp(ckpt, work / "mlp-L", seed=1, prompt_layer=layer),
            "last": build_random_prompt_mlp(ckpt, work / "mlp-last", seed=1, prompt_layer=-1)}
    half = {"budget": "half", "reducer": "prompt-topk"}
    plans = {"plain-full": (ckpt, {"no_prompt_mlp": True}), "pipmm-half-L": (ckpt, {"prompt_mlp": mlps["L"], **half}),
             "pipmm-half-pf": (pf, {"prompt_mlp": mlps["last"], **half})}
    seconds = {}
    for name, (source, options) in plans.items():
        out = work / name
        if (out / "manifest.json").is_file():
            continue
        start = time.perf_counter()
        if preset == "default":  # FP32 on the CPU: the writer (prompt_encoder included when L < all)
            export_bundle(source, out, progress=False, **options)
        else:  # FP16 traced on the GPU (--dtype); the prompt-first bundle links the layer -1 graphs of plain-full
            graphs = ("vision", "embed", "decoder", "decoder_static") + (("prompt_encoder",) if name.endswith("-L") else ())
            export_direct(source, out, dtype=dtype, device=device, graphs=graphs, log=log,
                          reuse=work / "plain-full" if name == "pipmm-half-pf" else None, **options)
        seconds[name] = round(time.perf_counter() - start, 1)
        log(f"exported {name} in {seconds[name]} s")
    if preset == "default":  # the CPU's fast path: decoder_fused, and the fused prompt encoder beside it
        from export.extra_graphs import add_graphs

        for name, (source, _) in plans.items():
            graphs = json.loads((work / name / "manifest.json").read_text())["graphs"]
            wanted = ["decoder_fused"] + (["prompt_encoder_fused"] if name.endswith("-L") else [])
            missing = [g for g in wanted if g not in graphs]
            if missing:
                add_graphs(work / name, source, graphs=tuple(missing))
                log(f"added {', '.join(missing)} to {name}")
    return {"prompt_layer": layer, "encoder_layers": layer + 1, "decoder_layers": layers, "export_seconds": seconds}


def bench(work: Path, device: str, runs: int, warmup: int, new_tokens: int, prompt: str) -> dict:
    import sdk

    pipes = {}
    for label, (bundle, env) in CONFIGS.items():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        pipes[label] = (sdk.load(work / bundle, device=device), env)
        for k, v in old.items():  # the backend read its choice at load; prompt_pass reads its variable per call
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    samples = {label: [] for label in CONFIGS}
    for r in range(warmup + runs):
        for label, (pipe, env) in pipes.items():
            os.environ.update(env)
            result = pipe.generate(str(IMAGE), prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   temperature=0.0)
            for k in env:
                os.environ.pop(k, None)
            if r >= warmup:
                samples[label].append({**{k: result.timings.get(k, 0.0) for k in STAGES},
                                       # what the prompt pass changes (preprocess and vision are the same work)
                                       "prompt_plus_prefill_ms": result.timings["prompt_ms"] + result.timings["prefill_ms"],
                                       "prompt_prefix_tokens": result.timings.get("prompt_prefix_tokens")})
        log(f"run {r + 1}/{warmup + runs}" + (" (warm-up)" if r < warmup else ""))
    out = {}
    for label, (pipe, _) in pipes.items():
        rows = samples[label]
        med = {k: round(statistics.median(row[k] for row in rows), 3) for k in (*STAGES, "prompt_plus_prefill_ms")}
        info = pipe.backend.info()
        out[label] = {"bundle": CONFIGS[label][0], "median": med, "runs": rows, "visual_tokens": pipe.num_visual_tokens,
                      "prompt_tokens": int(len(pipe.prompter.prompt_ids(prompt)[0])),
                      "prompt_encoder_tokens": int(len(pipe.prompter.encoder_ids(prompt))),
                      "prompt_prefix_tokens": rows[-1]["prompt_prefix_tokens"],
                      "decoder_graph": info.get("decoder_graph"), "prompt_encoder_graph": info.get("prompt_encoder_graph"),
                      "kv_cache": info.get("kv_cache"), "cuda_graph": info.get("cuda_graph")}
    base = out["plain full"]["median"]["ttft_ms"]
    today = out["PIP-MM half (today)"]["median"]["prompt_plus_prefill_ms"]
    for row in out.values():
        row["ttft_vs_plain_full"] = round(row["median"]["ttft_ms"] / base, 3)
        row["prompt_plus_prefill_vs_today"] = round(row["median"]["prompt_plus_prefill_ms"] / today, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=("default", "edge-0.5b", "llava-1.5-7b", "ci-tiny"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument("--stage", default="all", choices=("all", "export", "bench"))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"),
                   help="non-default presets: the precision export_direct traces in (fp32: a CPU check of the GPU path)")
    p.add_argument("--prompt-layer", type=int, default=None, help="the PIP-MM half bundle's layer (default: half)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--long", action="store_true", help="the ~50-token question LONG instead of --prompt")
    p.add_argument("--prompt-cache", action="store_true",
                   help="keep the pipelines' prompt-vector cache on (sdk/prompt_pass.py VectorCache): a repeated "
                        "question then skips the pass, so what is timed is the camera-loop case, not the pass")
    args = p.parse_args(argv)
    args.prompt = LONG if args.long else args.prompt
    record = {"preset": args.preset, "device": args.device, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "runs": args.runs, "warmup": args.warmup, "machine": {"cpu": platform.processor() or platform.machine(),
                                                                     "cores": os.cpu_count()},
              "command": "python scripts/prompt_pass_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.stage in ("all", "export"):
        record["export"] = export(args.preset, args.work, "cuda" if args.device == "cuda" else "cpu", args.prompt_layer,
                                  args.dtype)
        (args.work / "export.json").write_text(json.dumps(record["export"], indent=2))
    if args.stage in ("all", "bench"):
        if "export" not in record and (args.work / "export.json").is_file():
            record["export"] = json.loads((args.work / "export.json").read_text())
        import onnxruntime

        if not args.prompt_cache:  # every run repeats the question: with the cache on, the pass would run once
            os.environ["PIPMM_PROMPT_CACHE"] = "0"
        record["prompt_vector_cache"] = args.prompt_cache
        record["onnxruntime"] = onnxruntime.__version__
        record["configs"] = bench(args.work, args.device, args.runs, args.warmup, args.new_tokens, args.prompt)
        for label, row in record["configs"].items():
            m = row["median"]
            log(f"{label:40s} ttft {m['ttft_ms']:8.2f} ms (prompt {m['prompt_ms']:.2f}, vision {m['vision_ms']:.2f}, "
                f"prefill {m['prefill_ms']:.2f}; prompt + prefill x{row['prompt_plus_prefill_vs_today']:.2f} of today) "
                f"x{row['ttft_vs_plain_full']:.2f} of plain full")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")
            log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
