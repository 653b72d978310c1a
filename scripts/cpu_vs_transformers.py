"""A whole describe through pipmm against transformers' generate on the same checkpoint, on CPU: speed and peak RSS
(issue 18's CPU targets: describe >= 5x faster, peak RSS <= 0.5x transformers'; numbers in docs/gpu.md).

    python3 scripts/cpu_vs_transformers.py                   # default model + bundle -> cpu-vs-transformers-default.json
    python3 scripts/cpu_vs_transformers.py --checkpoint CKPT --bundle BUNDLE --rounds 2 --requests 1 \
        --json docs/gpu-results/cpu-vs-transformers-edge-0.5b.json --precisions fp32,int4

One request = image (a HxWx3 uint8 frame) + question -> text, greedy, exactly --new-tokens tokens (min_new_tokens on
both sides). pipmm: `Pipeline.generate` (preprocess, prompt pass, vision, prefill, decode, detokenize). transformers:
the checkpoint's own processor (AutoProcessor: CLIP resize/crop/normalise, the chat turn with <image> expanded to
the full visual-token count), `LlavaForConditionalGeneration.generate` (FP32, --hf-attn), batch_decode.

Variants (each a bundle or a transformers attention implementation):
  pipmm           the bundle as given (the default bundle: PIP-MM, half budget), plus decoder_fused (the CPU default
                  flavour; scripts/compare_genai.py fused_copy) unless --no-fused
  pipmm-full      a plain full-budget bundle of the checkpoint (`pipmm export --no-prompt-mlp --visual-tokens full
                  --cmai-layers none`, + decoder_fused): the same function as transformers', so FP32 greedy tokens
                  must be identical (skipped when the bundle given already is one)
  *-int4          the bundle quantized (export/precision/quantize.py, as `pipmm export --precision int4`, + its INT4
                  decoder_fused), with --precisions fp32,int4; transformers stays FP32 (it has no CPU INT4 path here)
  transformers-eager / -sdpa  transformers at each --hf-attn
  --also NAME=DIR + pipmm-NAME: another bundle of the checkpoint as it is (no decoder_fused added), same rounds
  --before DIR    + pipmm@REV: the same bundle through DIR's code (a worktree of the commit before a change),
                  in the same interleaved rounds
  --ablations     + pipmm-one-decoder-session (prefills on the decode session's one thread), pipmm-plain-decoder
                  (the traced decoder with its numpy cache: what sdk.describe ran before the default bundle carried
                  decoder_fused), pipmm-no-prompt-cache (every request runs its prompt pass: each process here asks
                  one question 4 times) and pipmm-decoder-2-spinning (the decoder on 2 spinning threads), the same
                  bundle with one switch each (ABLATIONS)
Every variant runs in its OWN subprocess per round (this file with --child), which imports, loads, warms up once and
times --requests requests, so its peak RSS (VmHWM of that process; see peak_rss_mb for why not ru_maxrss) and its RSS growth over
the RSS after its imports are its own. Rounds are interleaved, the order rotated per round; per variant the median
over all its requests is reported, and ratios against the FASTEST transformers variant (and its lowest RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = "pipmm-cpu-vs-transformers/1"
TARGETS = {"describe_speedup": 5.0, "peak_rss_ratio": 0.5}  # issue 18: >= 5x faster, <= 0.5x peak RSS
ENVIRONMENT = ("OMP_NUM_THREADS", "PIPMM_THREADS", "PIPMM_DECODER_THREADS", "PIPMM_SPINNING", "PIPMM_DECODER",
               "PIPMM_PREFILL_SESSION", "PIPMM_DECODER_SPINNING", "PIPMM_PROMPT_CACHE")  # recorded: they change what runs
# --ablations: the `pipmm` variant with one switch each (runtimes/decoder_flavour.py's, sdk/prompt_pass.py's)
ABLATIONS = {"pipmm-one-decoder-session": {"PIPMM_PREFILL_SESSION": "0"},  # prefills on the decode step's 1 thread
             "pipmm-plain-decoder": {"PIPMM_DECODER": "plain", "PIPMM_PREFILL_SESSION": "0"},  # the traced decoder
             "pipmm-no-prompt-cache": {"PIPMM_PROMPT_CACHE": "0"},  # every request runs its prompt pass
             # the decoder (decode steps and prefills) on 2 spinning threads, the other sessions asleep: not default
             "pipmm-decoder-2-spinning": {"PIPMM_DECODER_THREADS": "2", "PIPMM_DECODER_SPINNING": "1"}}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    return float("nan")


def rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, the high-water mark of its own address space). Not getrusage's
    ru_maxrss: Linux carries the parent's high-water mark over fork + exec into it (fs/exec.c keeps the old mm's
    hiwater in signal->maxrss), so every child here would report at least the parent's RSS (about 290 MB: the
    parent imports torch to build bundles). ru_maxrss is recorded beside it (ru_maxrss_mb) for that reason."""
    return _status_mb("VmHWM")


# -- children: one process per variant per round -------------------------------------------------

def pipmm_child(spec: dict, image, prompt: str, new_tokens: int):
    """-> (load, describe) where describe() -> (text, token ids, ttft ms, decode tok/s)."""
    import onnxruntime  # noqa: F401  (the runtime library in the baseline, as torch + transformers are on the other side)

    import sdk
    import sdk.pipeline  # noqa: F401
    from runtimes import onnxruntime as _runtime  # noqa: F401

    def load():
        return sdk.load(spec["bundle"], backend="onnxruntime", device="cpu")

    def describe(pipeline):
        result = pipeline.generate(image, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
        return result.text, result.token_ids, result.timings["ttft_ms"], result.timings["tokens_per_s"]

    return load, describe, lambda pipeline: {"decoder": pipeline.backend.info().get("decoder_graph"),
                                             "kv_cache": pipeline.backend.info().get("kv_cache"),
                                             "visual_tokens": pipeline.manifest.visual_tokens.count}


def transformers_child(spec: dict, image, prompt: str, new_tokens: int):
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from export.compare_hf import TokenClock

    frame = Image.fromarray(image)
    text = spec["chat_template"].format(prompt=prompt)

    def load():
        model = LlavaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=torch.float32,
                                                              attn_implementation=spec["attn"]).eval()
        # The checkpoint has preprocessor_config.json but no processor_config.json: the processor's image-token
        # count comes from the model's config, as llava-hf's processor_config.json states it (CLIP: + class token).
        config = model.config
        processor = AutoProcessor.from_pretrained(
            spec["checkpoint"], patch_size=config.vision_config.patch_size,
            num_additional_image_tokens=int(config.vision_config.model_type == "clip_vision_model"),
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        return processor, model

    def describe(loaded):
        processor, model = loaded
        clock = TokenClock("cpu")
        start = time.perf_counter()
        with torch.inference_mode():
            inputs = processor(images=frame, text=text, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 num_beams=1, streamer=clock, pad_token_id=spec["eos"][0])
        new = out[0, inputs["input_ids"].shape[1]:]
        words = processor.batch_decode(new[None], skip_special_tokens=True)[0]
        steps = len(clock.times) - 1
        rate = steps / (clock.times[-1] - clock.times[0]) if steps > 0 else None
        return words, new.tolist(), (clock.times[0] - start) * 1e3, rate

    def info(loaded):
        processor, model = loaded
        ids = processor(images=frame, text=text, return_tensors="pt")["input_ids"]
        return {"transformers": transformers.__version__, "torch": torch.__version__, "attn": spec["attn"],
                "torch_threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1]),
                "visual_tokens": int((ids == model.config.image_token_index).sum())}

    return load, describe, info


CHILDREN = {"pipmm": pipmm_child, "transformers": transformers_child}


def child(spec: dict) -> dict:
    """Runs in its own process: imports, then load + 1 warm-up + spec['requests'] timed describes."""
    import numpy as np  # noqa: F401  (both sides need it; counted in the baseline)

    from sdk.bench import DEFAULT_PROMPT, bench_image

    image, prompt = bench_image(), spec.get("prompt") or DEFAULT_PROMPT
    load, describe, info = CHILDREN[spec["side"]](spec, image, prompt, spec["new_tokens"])
    baseline = rss_mb()  # after the imports: what the describe's load and work add is measured over this
    start = time.perf_counter()
    loaded = load()
    load_s = time.perf_counter() - start
    after_load = rss_mb()
    describe(loaded)  # warm-up (not counted)
    requests, ttft, rate, tokens, text = [], [], [], None, None
    for _ in range(spec["requests"]):
        start = time.perf_counter()
        words, ids, first, per_s = describe(loaded)
        requests.append((time.perf_counter() - start) * 1e3)
        ttft.append(first)
        rate.append(per_s)
        tokens, text = tokens or ids, text or words
    if len(tokens) != spec["new_tokens"]:
        raise SystemExit(f"{spec['name']}: {len(tokens)} tokens, not {spec['new_tokens']}")
    return {"pid": os.getpid(), "describe_ms": requests, "ttft_ms": ttft, "decode_tokens_per_s": rate, "load_s": load_s,
            "rss_after_imports_mb": baseline, "rss_after_load_mb": after_load, "peak_rss_mb": peak_rss_mb(),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "rss_growth_mb": peak_rss_mb() - baseline, "tokens": tokens, "text": text, "info": info(loaded)}


def run_child(spec: dict) -> dict:
    root = Path(spec.get("root", ROOT))  # --before: another checkout's child, its own sdk/ and runtimes/
    done = subprocess.run([sys.executable, str(root / "scripts" / Path(__file__).name), "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **spec.get("env", {})})
    if done.returncode != 0:
        raise SystemExit(f"variant {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent: bundles, rounds, summary --------------------------------------------------------

def full_bundle(checkpoint: Path, work: Path) -> Path:
    """A plain LLaVA bundle of the checkpoint at its full budget: transformers' function, exactly."""
    from export.writer import export_bundle

    from scripts.compare_genai import made_from

    out = work / "bundle-full"
    if not made_from(out, checkpoint):
        print(f"exporting a plain full-budget bundle of {checkpoint} to {out}", flush=True)
        export_bundle(checkpoint, out, no_prompt_mlp=True, budget="full", cmai={"layers": "none"}, overwrite=True,
                      progress=False)
    return out


def is_plain_full(bundle: Path) -> bool:
    from sdk.bundle import load_bundle

    manifest = load_bundle(bundle, verify=False).manifest
    return manifest.visual_tokens.budget == "full" and "prompt_encoder" not in load_bundle(bundle, verify=False).graphs


def variants(args, work: Path) -> dict:
    """name -> child spec (the bundles built here, once, before any timing)."""
    from scripts.compare_genai import fused_copy, quantized_copy
    from sdk.bundle import load_bundle

    manifest = load_bundle(args.bundle, verify=False).manifest
    bundles = {"pipmm": args.bundle}
    if not is_plain_full(args.bundle):
        bundles["pipmm-full"] = full_bundle(args.checkpoint, work)
    specs = {}
    for precision in args.precisions:
        for name, bundle in bundles.items():
            if precision != "fp32":
                bundle = quantized_copy(bundle, work / name, precision)  # work/NAME/bundle-int4
            if args.fused:
                bundle = fused_copy(bundle, args.checkpoint, work / name)
            specs[name if precision == "fp32" else f"{name}-{precision}"] = {"side": "pipmm", "bundle": str(bundle),
                                                                             "precision": precision}
    if args.ablations:  # the default bundle as describe ran it before (issue 18 CPU pass 2): same tokens, slower
        for name, env in ABLATIONS.items():
            specs[name] = {**specs["pipmm"], "env": env}
    for pair in args.also:  # another bundle of the same checkpoint as it is (e.g. the one before a re-export)
        name, _, path = pair.partition("=")
        specs[f"pipmm-{name}"] = {"side": "pipmm", "bundle": str(Path(path).resolve()), "precision": "as exported"}
    if args.before is not None:  # the same bundle through another checkout's code (the commit before a change)
        rev = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "before"
        specs[f"pipmm@{rev}"] = {**specs["pipmm"], "root": str(args.before.resolve())}
    for attn in args.hf_attn:
        specs[f"transformers-{attn}"] = {"side": "transformers", "checkpoint": str(args.checkpoint), "attn": attn,
                                         "precision": "fp32", "eos": sorted(set(manifest.special_tokens.eos)),
                                         "chat_template": manifest.chat_template.prompt.replace(
                                             manifest.chat_template.image_placeholder, "<image>")}
    for name, spec in specs.items():
        spec.update(name=name, new_tokens=args.new_tokens, requests=args.requests, prompt=args.prompt)
    return specs


def median(values):
    import numpy as np

    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarise(runs: list[dict]) -> dict:
    return {"describe_ms": median([v for r in runs for v in r["describe_ms"]]),
            "ttft_ms": median([v for r in runs for v in r["ttft_ms"]]),
            "decode_tokens_per_s": median([v for r in runs for v in r["decode_tokens_per_s"]]),
            "load_s": median([r["load_s"] for r in runs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
            "rss_after_imports_mb": median([r["rss_after_imports_mb"] for r in runs]),
            "rss_after_load_mb": median([r["rss_after_load_mb"] for r in runs]),
            "rss_growth_mb": median([r["rss_growth_mb"] for r in runs])}


def leading_same(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # commonprefix compares element by element: lists of ids work too


def compare(specs: dict, rounds: dict) -> tuple[dict, dict]:
    medians = {name: summarise(runs) for name, runs in rounds.items()}
    peers = [n for n in specs if specs[n]["side"] == "transformers"]
    fastest = min(peers, key=lambda n: medians[n]["describe_ms"])
    leanest = min(peers, key=lambda n: medians[n]["peak_rss_mb"])
    hf_tokens = rounds[fastest][0]["tokens"]
    out = {"transformers_fastest": fastest, "transformers_leanest": leanest}
    for name in specs:
        if specs[name]["side"] != "pipmm":
            continue
        m, speed = medians[name], medians[fastest]["describe_ms"] / medians[name]["describe_ms"]
        rss = m["peak_rss_mb"] / medians[leanest]["peak_rss_mb"]
        growth = m["rss_growth_mb"] / medians[leanest]["rss_growth_mb"]
        out[name] = {"describe_speedup": speed, "ttft_speedup": medians[fastest]["ttft_ms"] / m["ttft_ms"],
                     "decode_speedup": m["decode_tokens_per_s"] / medians[fastest]["decode_tokens_per_s"],
                     "peak_rss_ratio": rss, "rss_growth_ratio": growth,
                     "describe_target_met": speed >= TARGETS["describe_speedup"],
                     "peak_rss_target_met": rss <= TARGETS["peak_rss_ratio"],
                     "leading_tokens_identical": leading_same(rounds[name][0]["tokens"], hf_tokens),
                     "tokens_identical": rounds[name][0]["tokens"] == hf_tokens,
                     "tokens_stable_across_rounds": all(r["tokens"] == rounds[name][0]["tokens"] for r in rounds[name])}
    return medians, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default_model")
    parser.add_argument("--bundle", type=Path, default=ROOT / "sdk" / "default_bundle")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, one process per variant each")
    parser.add_argument("--requests", type=int, default=3, help="timed describes per process (after one warm-up)")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, int4, int8 (pipmm's bundles)")
    parser.add_argument("--hf-attn", default="eager,sdpa", help="transformers' attn_implementation(s), comma list")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="the bundles without decoder_fused")
    parser.add_argument("--ablations", action="store_true", help="also the default bundle with each of ABLATIONS")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout of this repo: its pipmm on the same bundle, interleaved (pipmm@REV)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=BUNDLE",
                        help="another bundle of the checkpoint, timed as it is in the same rounds (pipmm-NAME)")
    parser.add_argument("--prompt", default=None, help="the question (default: sdk.bench's)")
    parser.add_argument("--work", type=Path, default=None, help="where the derived bundles go")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gpu-results" / "cpu-vs-transformers-default.json")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    args.precisions = args.precisions.split(",")
    args.hf_attn = args.hf_attn.split(",")
    work = args.work or Path.home() / ".cache" / "pipmm" / "cpu_vs_transformers" / args.checkpoint.resolve().name
    work.mkdir(parents=True, exist_ok=True)
    specs = variants(args, work)
    names = list(specs)
    rounds, load = {name: [] for name in names}, [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rounds[name].append(run_child(specs[name]))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} (load {load[-1]:.1f}): " + ", ".join(
            f"{n} {min(rounds[n][-1]['describe_ms']):.0f} ms {rounds[n][-1]['peak_rss_mb']:.0f} MB" for n in names),
            flush=True)
    medians, ratios = compare(specs, rounds)
    result = {
        "schema": SCHEMA, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python3 scripts/cpu_vs_transformers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "shared": "yes: other processes ran on the same cores",
                    "cpu_affinity": sorted(os.sched_getaffinity(0)), "load_average_1min_per_round": load,
                    "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}},
        "checkpoint": str(args.checkpoint), "bundle": str(args.bundle), "targets": TARGETS,
        "config": {"new_tokens": args.new_tokens, "rounds": args.rounds, "requests_per_round": args.requests,
                   "warmup_per_process": 1, "image": "sdk.bench.bench_image() 640x480",
                   "prompt": args.prompt or "sdk.bench.DEFAULT_PROMPT"},
        "variants": {n: {k: v for k, v in s.items() if k not in ("eos", "requests", "new_tokens")} | {
            "info": rounds[n][0]["info"], "text": rounds[n][0]["text"], "tokens": rounds[n][0]["tokens"]}
            for n, s in specs.items()},
        "medians": medians, "ratios": ratios,
        "rounds": {n: [{k: v for k, v in run.items() if k not in ("tokens", "text", "info")} for run in runs]
                   for n, runs in rounds.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("| variant | describe ms | TTFT ms | decode tok/s | peak RSS MB | RSS growth MB | vs fastest transformers |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        m, q = medians[name], ratios.get(name)
        note = (f"{q['describe_speedup']:.2f}x faster, RSS {q['peak_rss_ratio']:.2f}x, "
                f"tokens identical {q['leading_tokens_identical']}/{args.new_tokens}") if q else ""
        print(f"| {name} | {m['describe_ms']:.1f} | {m['ttft_ms']:.1f} | {m['decode_tokens_per_s']:.0f} | "
              f"{m['peak_rss_mb']:.0f} | {m['rss_growth_mb']:.0f} | {note} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
