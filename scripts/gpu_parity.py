"""Parity of the CUDA path on the GPU machine: tiny random checkpoints, every ONNX Runtime cache mode on CUDA
against the CPU path.

    python scripts/gpu_parity.py --out parity.json

FP32 bundles (plain Llama, Qwen2 with grouped KV heads, PIP-MM at half budget with prompt-topk), each with
decoder_static: greedy tokens (32) on CUDA with the device KV cache, the static cache, and the static cache
captured as a CUDA graph must be identical to the CPU's; prefill logits are compared too.
FP16: a bundle traced in FP16 (export/extra_graphs.py) and one converted by export/precision/quantize.py, on CUDA,
against the FP32 bundle on the CPU: relative logits error <= FP16_TOLERANCE, and the leading tokens that agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP16_TOLERANCE = 2e-2  # ||logits_fp16 - logits_fp32|| / ||logits_fp32|| at prefill
PROMPT = "what is the color of the shape on the left?"


def pipeline(bundle_dir, **options):
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.bundle import load_bundle
    from sdk.pipeline import Pipeline

    bundle = load_bundle(bundle_dir)
    return Pipeline(bundle.manifest, bundle.tokenizer_path, OnnxRuntimeBackend(bundle, **options))


def prefill_logits(p, image) -> np.ndarray:
    from sdk.preprocess import preprocess

    pixels = preprocess(image, p.preprocessing)
    vector = p.encode_prompt(PROMPT) if p.prompt_vector_spec is not None else None
    visual = p.backend.vision(pixels, vector).visual_tokens
    ids, slots = p.prompter.prompt_ids(PROMPT)
    embeds = p.backend.embed(ids[None]).copy()
    embeds[0, slots] = visual[0].astype(embeds.dtype)
    return p.prefill(embeds)[0].astype(np.float64)


def leading(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (no CUDA graph)")
    args = parser.parse_args()

    from export.writer import export_bundle
    from export.extra_graphs import add_graphs, export_direct
    from export.synthetic import build_random_prompt_mlp, build_tiny_llava
    from sdk.bench import bench_image

    image = bench_image((45, 61))
    report = {"cases": [], "fp16_tolerance": FP16_TOLERANCE}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts = {arch: build_tiny_llava(tmp / arch, arch=arch, seed=i) for i, arch in enumerate(("llama", "qwen2"))}
        mlp = build_random_prompt_mlp(ckpts["llama"], tmp / "mlp", seed=1)
        cases = {
            "llama plain fp32": dict(ckpt="llama", no_prompt_mlp=True),
            "qwen2 plain fp32 (GQA)": dict(ckpt="qwen2", no_prompt_mlp=True),
            "llama PIP-MM half prompt-topk fp32": dict(ckpt="llama", prompt_mlp=mlp, budget="half", reducer="prompt-topk"),
        }
        fp32 = {}
        for name, spec in cases.items():
            ckpt = ckpts[spec.pop("ckpt")]
            out = export_bundle(ckpt, tmp / name.replace(" ", "_"), progress=False, **spec)
            add_graphs(out, ckpt)
            fp32[name] = out
            cpu = pipeline(out, device="cpu")
            reference = cpu.generate(image, PROMPT, max_new_tokens=args.tokens).token_ids
            ref_logits = prefill_logits(cpu, image)
            case = {"case": name, "cpu_tokens": reference, "modes": {}}
            modes = {"device KV": dict(kv_cache="device"), "static KV": dict(kv_cache="static", cuda_graph=False),
                     "static KV + CUDA graph": dict(kv_cache="static", cuda_graph=True)}
            if args.device == "cpu":
                modes.pop("static KV + CUDA graph")
            for mode, options in modes.items():
                p = pipeline(out, device=args.device, **options)
                tokens = p.generate(image, PROMPT, max_new_tokens=args.tokens).token_ids
                again = p.generate(image, PROMPT, max_new_tokens=args.tokens).token_ids  # the graph replayed
                logits = prefill_logits(p, image)
                case["modes"][mode] = {
                    "identical_tokens": tokens == reference and again == reference,
                    "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
                    "cuda_graph": p.backend.cuda_graph, "note": p.backend.cuda_graph_note,
                    "providers": p.backend.info()["providers"]}
            case["pass"] = all(m["identical_tokens"] for m in case["modes"].values())
            report["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k != "cpu_tokens"}), flush=True)

        # FP16 on CUDA against FP32 on the CPU
        base = fp32["llama plain fp32"]
        cpu = pipeline(base, device="cpu")
        reference = cpu.generate(image, PROMPT, max_new_tokens=args.tokens).token_ids
        ref_logits = prefill_logits(cpu, image)
        traced = export_direct(ckpts["llama"], tmp / "fp16-traced", no_prompt_mlp=True, dtype="fp16", log=lambda *_: None)
        converted = export_bundle(ckpts["llama"], tmp / "fp16-converted", no_prompt_mlp=True, precision="fp16",
                                  progress=False)
        for name, bundle_dir, options in (("fp16 traced, static KV (+ CUDA graph on cuda)", traced, dict(kv_cache="static")),
                                          ("fp16 traced, device KV", traced, dict(kv_cache="device")),
                                          ("fp16 converted (export/precision/quantize.py), device KV", converted,
                                           dict(kv_cache="device"))):
            p = pipeline(bundle_dir, device=args.device, **options)
            logits = prefill_logits(p, image)
            rel = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
            tokens = p.generate(image, PROMPT, max_new_tokens=args.tokens).token_ids
            case = {"case": name, "relative_logit_error": rel, "leading_tokens_identical": leading(tokens, reference),
                    "of": len(reference), "cuda_graph": p.backend.cuda_graph, "pass": rel <= FP16_TOLERANCE}
            report["cases"].append(case)
            print(json.dumps(case), flush=True)
    report["pass"] = all(c["pass"] for c in report["cases"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"parity {'PASSED' if report['pass'] else 'FAILED'} in {report['seconds']} s", flush=True)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
