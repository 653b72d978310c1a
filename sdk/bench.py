"""`pipmm bench BUNDLE`: latency and memory of a bundle on this machine, per stage, as a table, JSON and a chart.

    pipmm bench BUNDLE [--backend auto] [--device auto] [--new-tokens 64] [--runs 5] [--json FILE]
                       [--plot FILE.png] [--compare-hf CHECKPOINT_DIR]

Each run is one request, timed stage by stage with the host clock (every backend call returns host arrays,
so the device has finished when it returns): preprocess, prompt (tokenize + PIP-MM's prompt encoding),
vision, prefill (embed + splice + decoder over the turn), time to first token (from the start of the run),
decode (exactly N-1 further greedy tokens; end-of-sequence is suppressed so every run decodes as many),
end to end. Warm-up runs come first and are not counted (they also capture the CUDA graph). Reported:
median and p90 over the runs; peak host RSS and peak device memory (NVML on a desktop GPU, unified memory
from /proc/meminfo on a Jetson) with the device's memory before the bundle was loaded; the device; the
visual-token budget; on a GPU the device-to-device copy bandwidth and the decode bound it implies
(decoder weight bytes read once per token).

`--compare-hf` runs transformers' own `generate` (export/compare_hf.py, imported only then, since it needs
torch) on the checkpoint, with the same image and prompt at the checkpoint's full budget, in the same
process after this runtime's runs, and reports ratios.
"""

from __future__ import annotations

import gc
import importlib
import json
import time
from pathlib import Path

import numpy as np

from .errors import PipmmError

SCHEMA = "pipmm-bench/1"
# stage -> unit; every stage gets median and p90 over the counted runs
STAGES = {"preprocess_ms": "ms", "prompt_ms": "ms", "vision_ms": "ms", "prefill_ms": "ms", "ttft_ms": "ms",
          "decode_ms_per_token": "ms", "decode_tokens_per_s": "tokens/s", "total_ms": "ms"}
DEFAULT_PROMPT = "Describe the image in detail: every object, its color, its size and where it is."
CACHE_ROUND = 256  # --max-cache auto: prompt + new tokens, rounded up to this


def bench_image(size: tuple[int, int] = (480, 640), seed: int = 0) -> np.ndarray:
    """A deterministic photo-like frame (gradients, blobs, noise): no file needed, same on every machine."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(20, 90)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def summary(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    if arr.size == 0:
        return {"median": None, "p90": None, "runs": []}
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "runs": [float(v) for v in arr]}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def one_run(pipeline, image, prompt: str, new_tokens: int) -> tuple[dict, list[int]]:
    """One request through the Pipeline's stages, greedy, exactly `new_tokens` tokens."""
    from .preprocess import preprocess

    backend = pipeline.backend
    eos = sorted(pipeline.prompter.eos_ids)
    t = {}
    start = time.perf_counter()
    pixel_values = preprocess(image, pipeline.preprocessing)
    t["preprocess_ms"] = _ms(start)
    stage = time.perf_counter()
    ids, slots = pipeline.prompter.prompt_ids(prompt)
    prompt_vector = pipeline.encode_prompt(prompt) if pipeline.prompt_vector_spec is not None else None
    t["prompt_ms"] = _ms(stage)
    stage = time.perf_counter()
    visual = backend.vision(pixel_values, prompt_vector).visual_tokens
    t["vision_ms"] = _ms(stage)
    stage = time.perf_counter()
    embeds = backend.embed(ids[None]).copy()
    embeds[0, slots] = visual[0].astype(embeds.dtype)
    logits, cache = pipeline.prefill(embeds)
    t["prefill_ms"] = _ms(stage)

    def pick(row: np.ndarray) -> int:
        row = row.astype(np.float32, copy=True)
        row[eos] = -np.inf  # as transformers' min_new_tokens: every run decodes the same number of tokens
        return int(np.argmax(row))

    tokens = [pick(logits[0])]
    t["ttft_ms"] = _ms(start)
    stage = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, cache = pipeline.decode(tokens[-1], cache)
        tokens.append(pick(logits[0]))
    decode_ms = _ms(stage)
    steps = new_tokens - 1
    t["decode_ms_per_token"] = decode_ms / steps if steps else None
    t["decode_tokens_per_s"] = steps / (decode_ms / 1000.0) if steps and decode_ms > 0 else None
    t["total_ms"] = _ms(start)
    return t, tokens


def _graph_bytes(bundle, graph: str) -> int:
    """Bytes of a graph's files (the .onnx and its external data): what a decode step reads, once."""
    files = bundle.manifest["files"]
    name = bundle.graphs[graph]["file"]
    return sum(info["bytes"] for f, info in files.items() if f == name or f.startswith(name + "."))


def _timed_runs(cls, path, resolved, verify, prompt, new_tokens, kv_cache, cuda_graph, max_cache, image, runs, warmup):
    from .bundle import load_bundle
    from .pipeline import Pipeline

    load_start = time.perf_counter()
    loaded = load_bundle(path, verify=verify)
    options = {}
    if cls.name == "onnxruntime":
        # The static cache (used only where it applies) is sized to the request: decode reads every slot.
        slots = max_cache
        if max_cache in (None, "auto"):
            from .prompting import Prompter

            needed = len(Prompter(loaded.tokenizer_path, loaded.manifest).prompt_ids(prompt)[0]) + new_tokens + 1
            slots = min(-(-needed // CACHE_ROUND) * CACHE_ROUND, int(loaded.manifest["model"]["max_context"]))
        options = {"kv_cache": kv_cache, "cuda_graph": cuda_graph, "max_cache": int(slots)}
    runner = cls(loaded, device=resolved, **options)
    pipeline = Pipeline(loaded.manifest, loaded.tokenizer_path, runner, source=str(path))
    load_s = time.perf_counter() - load_start
    per_stage = {name: [] for name in STAGES}
    tokens = None
    for index in range(warmup + runs):
        timings, got = one_run(pipeline, image, prompt, new_tokens)
        if index >= warmup:
            for name in STAGES:
                per_stage[name].append(timings.get(name))
            tokens = tokens or got
    return loaded, runner, pipeline, per_stage, tokens, load_s


def bench(bundle=None, backend: str = "auto", device: str = "auto", new_tokens: int = 64, runs: int = 5,
          warmup: int = 1, image=None, prompt: str = DEFAULT_PROMPT, kv_cache: str = "auto",
          cuda_graph: bool | None = None, max_cache="auto", compare_hf=None, hf_dtype: str | None = None,
          hf_attn: str = "eager", verify: bool = True, bandwidth: bool = True, label: str | None = None,
          log=print) -> dict:
    from runtimes import backend_class
    from runtimes.device_info import MemorySampler, copy_bandwidth, describe

    from .bundle import default_bundle_path
    from .preprocess import preprocess

    if new_tokens < 1 or runs < 1 or warmup < 0:
        raise PipmmError("--new-tokens and --runs must be >= 1 and --warmup >= 0")
    path = default_bundle_path() if bundle is None else Path(bundle)
    image = bench_image() if image is None else image
    cls = backend_class(backend)
    resolved = cls.resolve_device(device) if hasattr(cls, "resolve_device") else device
    sampler = MemorySampler("cpu" if resolved == "cpu" else "cuda")  # baseline before anything is loaded
    with sampler:
        loaded, runner, pipeline, per_stage, tokens, load_s = _timed_runs(
            cls, path, resolved, verify, prompt, new_tokens, kv_cache, cuda_graph, max_cache, image, runs, warmup)
    info = runner.info() if hasattr(runner, "info") else {"backend": cls.name, "device": resolved}
    manifest = loaded.manifest
    result = {
        "schema": SCHEMA,
        "label": label,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle": {"path": str(path), "hash": loaded.content_hash[:16], "precision": manifest["precision"]["default"],
                   "visual_tokens": manifest["visual_tokens"], "pipmm": manifest["prompt_vector"] is not None,
                   "model": manifest["model"],
                   # what a decode step reads: the decoder's weights (decoder_static shares them)
                   "decoder_weight_bytes": _graph_bytes(loaded, "decoder")},
        "backend": info,
        "device": describe(resolved),
        "config": {"new_tokens": new_tokens, "runs": runs, "warmup": warmup, "prompt": prompt,
                   "prompt_tokens": int(len(pipeline.prompter.prompt_ids(prompt)[0])),
                   "image_shape": list(np.asarray(image).shape) if not isinstance(image, (str, Path)) else str(image),
                   "load_s": round(load_s, 2)},
        "stages": {name: summary(values) for name, values in per_stage.items()},
        "memory": sampler.peaks(),
        "tokens": tokens,
        "bandwidth": None,
        "compare_hf": None,
        "ratios": None,
    }
    if bandwidth and resolved != "cpu":
        bw = copy_bandwidth()
        if bw:
            weights = result["bundle"]["decoder_weight_bytes"]
            bound = bw / weights
            got = result["stages"]["decode_tokens_per_s"]["median"]
            result["bandwidth"] = {"copy_gb_per_s": bw / 1e9, "decoder_weight_gb": weights / 1e9,
                                   "bound_tokens_per_s": bound, "fraction_of_bound": (got / bound) if got else None,
                                   "method": "cudaMemcpy device-to-device, 1 GiB, (read + written bytes) / time"}
    if compare_hf is not None:
        del pipeline, runner
        gc.collect()
        hf = importlib.import_module("export.compare_hf")
        full = dict(manifest, visual_tokens=dict(manifest["visual_tokens"], count=hf.full_budget_tokens(manifest)))
        from .prompting import Prompter

        ids, _ = Prompter(loaded.tokenizer_path, full).prompt_ids(prompt)
        hf_sampler = MemorySampler("cpu" if resolved == "cpu" else "cuda")
        with hf_sampler:
            result["compare_hf"] = hf.run_hf(compare_hf, preprocess(image, manifest["image_preprocessing"]), ids,
                                             new_tokens, runs, warmup, hf_dtype or result["bundle"]["precision"],
                                             "cpu" if resolved == "cpu" else "cuda", hf_attn, sorted(set(manifest["special_tokens"]["eos"])))
        result["compare_hf"]["memory"].update(hf_sampler.peaks())
        result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    """This runtime over transformers, per stage present in both (medians); > 1 = this runtime is larger."""
    ours, theirs = result["stages"], result["compare_hf"]["stages"]
    out = {}
    for name in ("ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "total_ms"):
        a, b = ours.get(name, {}).get("median"), theirs.get(name, {}).get("median")
        out[name] = a / b if a and b else None
    a = result["memory"].get("device_peak_mb")
    b = result["compare_hf"]["memory"].get("device_peak_mb")
    out["device_peak_mb"] = a / b if a and b else None
    hf_tokens, our_tokens = result["compare_hf"].get("tokens") or [], result.get("tokens") or []
    same = 0
    for x, y in zip(our_tokens, hf_tokens):
        if x != y:
            break
        same += 1
    out["leading_tokens_identical"] = same
    return out


REQUIRED = {"schema": str, "bundle": dict, "backend": dict, "device": dict, "config": dict, "stages": dict,
            "memory": dict}


def validate(result: dict) -> None:
    """Raise ValueError unless `result` has the shape SCHEMA promises (tests and report scripts use it)."""
    for key, kind in REQUIRED.items():
        if not isinstance(result.get(key), kind):
            raise ValueError(f"bench result lacks {key!r} ({kind.__name__})")
    if result["schema"] != SCHEMA:
        raise ValueError(f"schema {result['schema']!r} is not {SCHEMA}")
    for name in STAGES:
        stage = result["stages"].get(name)
        if not isinstance(stage, dict) or not {"median", "p90", "runs"} <= set(stage):
            raise ValueError(f"stage {name} needs median, p90 and runs")
        for value in (stage["median"], stage["p90"], *stage["runs"]):
            if value is not None and not (isinstance(value, float) and value >= 0):
                raise ValueError(f"stage {name} has a bad value {value!r}")
    for key in ("host_peak_rss_mb", "device_peak_mb", "device_baseline_mb", "device_source"):
        if key not in result["memory"]:
            raise ValueError(f"memory lacks {key}")
    for key in ("precision", "visual_tokens", "decoder_weight_bytes"):
        if key not in result["bundle"]:
            raise ValueError(f"bundle lacks {key}")


# -- output ---------------------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    hf = result.get("compare_hf")
    head = f"{'stage':<22}{'median':>10}{'p90':>10}"
    if hf:
        head += f"{'transformers':>14}{'ratio':>8}"
    lines = [head]
    for name, unit in STAGES.items():
        stage = result["stages"][name]
        line = f"{name:<22}{_fmt(stage['median']):>10}{_fmt(stage['p90']):>10}"
        if hf:
            theirs = hf["stages"].get(name, {}).get("median")
            ratio = stage["median"] / theirs if stage["median"] and theirs else None
            line += f"{_fmt(theirs):>14}{_fmt(ratio, 2):>8}"
        lines.append(line)
    mem = result["memory"]
    lines.append(f"peak host RSS {_fmt(mem['host_peak_rss_mb'], 0)} MB; device peak {_fmt(mem['device_peak_mb'], 0)} MB "
                 f"(before load {_fmt(mem['device_baseline_mb'], 0)} MB, {mem['device_source'] or 'not measured'})")
    if hf:
        lines.append(f"transformers device peak {_fmt(hf['memory'].get('device_peak_mb'), 0)} MB; "
                     f"leading greedy tokens identical: {result['ratios']['leading_tokens_identical']}")
    bw = result.get("bandwidth")
    if bw:
        lines.append(f"copy bandwidth {bw['copy_gb_per_s']:.0f} GB/s, decoder {bw['decoder_weight_gb']:.2f} GB -> bound "
                     f"{bw['bound_tokens_per_s']:.0f} tokens/s; decode at {_fmt((bw['fraction_of_bound'] or 0) * 100)}%")
    b, dev, be = result["bundle"], result["device"], result["backend"]
    lines.append(f"{dev.get('name')} | {be.get('backend')} {be.get('device')} kv={be.get('kv_cache', '-')} "
                 f"cuda_graph={be.get('cuda_graph', '-')} | {b['precision']} | visual tokens "
                 f"{b['visual_tokens']['count']} ({b['visual_tokens']['budget']}, {b['visual_tokens']['reducer']})")
    return "\n".join(lines)


def label_of(result: dict) -> str:
    if result.get("label"):
        return result["label"]
    be, vt = result["backend"], result["bundle"]["visual_tokens"]
    graph = " +graph" if be.get("cuda_graph") else ""
    return f"{be.get('backend')} {be.get('device')}{graph} K={vt['count']}"


def plot(results: list[dict], path, title: str | None = None) -> Path:
    """Two panels: time to first token split by stage, and decode tokens/s against the bandwidth bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PipmmError("--plot needs matplotlib: pip install matplotlib") from err
    rows = []
    for r in results:
        s = r["stages"]
        rows.append((label_of(r), [s[k]["median"] or 0 for k in ("preprocess_ms", "prompt_ms", "vision_ms", "prefill_ms")],
                     s["ttft_ms"]["median"], s["decode_tokens_per_s"]["median"] or 0))
        if r.get("compare_hf"):
            h = r["compare_hf"]["stages"]
            rows.append((f"transformers {r['compare_hf'].get('attn', '')} K={r['compare_hf'].get('visual_tokens')}",
                         [0, 0, 0, h["ttft_ms"]["median"] or 0], h["ttft_ms"]["median"],
                         h["decode_tokens_per_s"]["median"] or 0))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 2.6))
    names = [r[0] for r in rows][::-1]
    colors = ["#9ecae1", "#fdae6b", "#a1d99b", "#3182bd"]
    lefts = np.zeros(len(rows))
    for i, stage in enumerate(("preprocess", "prompt", "vision", "prefill")):
        values = np.array([r[1][i] for r in rows][::-1])
        left.barh(names, values, left=lefts, color=colors[i], label=stage)
        lefts += values
    for y, r in enumerate(rows[::-1]):
        left.text(r[2] or 0, y, f" {_fmt(r[2])} ms", va="center", fontsize=8)
    left.set_xlabel("time to first token, ms (median)")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8, frameon=False)
    left.set_xlim(0, max((r[2] or 0) for r in rows) * 1.18 if rows else 1)
    right.barh(names, [r[3] for r in rows][::-1], color="#31a354")
    for y, r in enumerate(rows[::-1]):
        right.text(r[3], y, f" {r[3]:.0f}", va="center", fontsize=8)
    bounds = [r["bandwidth"]["bound_tokens_per_s"] for r in results if r.get("bandwidth")]
    if bounds:  # one line: the runs' bounds differ only by the noise of the copy measurement
        bound = float(np.median(bounds))
        right.axvline(bound, color="k", linestyle="--", linewidth=1)
        right.text(bound, len(rows) - 0.5, f" bound {bound:.0f}", fontsize=8, va="top", ha="right")
    right.set_xlabel("decode tokens/s (median); dashed: bandwidth bound")
    right.set_yticklabels([])
    dev = results[0]["device"].get("name") if results else ""
    fig.suptitle(title or f"pipmm bench on {dev}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ---------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime or tensorrt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or tensorrt (ONNX Runtime's TensorRT EP)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="counted runs (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    parser.add_argument("--image", default=None, help="image file (default: a generated 640x480 frame)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question")
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "numpy", "device", "static"],
                        help="ONNX Runtime KV cache: static (preallocated, CUDA graphs) needs decoder_static")
    graph = parser.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                       help="capture decode as a CUDA graph (default on cuda with a static cache)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    parser.add_argument("--max-cache", default="auto", help="static cache slots: auto (prompt + new tokens, "
                                                            f"rounded up to {CACHE_ROUND}) or a number")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the full result as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="write a chart (needs matplotlib)")
    parser.add_argument("--compare-hf", default=None, metavar="CHECKPOINT_DIR",
                        help="also time transformers' generate on this checkpoint (needs torch + transformers)")
    parser.add_argument("--hf-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="transformers' dtype (default: the bundle's precision)")
    parser.add_argument("--hf-attn", default="eager", help="transformers' attn_implementation (default eager)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    parser.add_argument("--label", default=None, help="name of this configuration in the JSON and the chart")


def run(args) -> int:
    image = None
    if args.image is not None:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"))
    result = bench(args.bundle, backend=args.backend, device=args.device, new_tokens=args.new_tokens, runs=args.runs,
                   warmup=args.warmup, image=image, prompt=args.prompt, kv_cache=args.kv_cache,
                   cuda_graph=args.cuda_graph, max_cache=args.max_cache, compare_hf=args.compare_hf,
                   hf_dtype=args.hf_dtype, hf_attn=args.hf_attn, verify=not args.no_verify,
                   bandwidth=not args.no_bandwidth, label=args.label)
    validate(result)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot([result], args.plot)
    return 0
