"""pipmm's decoders against ONNX Runtime GenAI on the same random weights, one command (issue 18, GPU speed).

    python scripts/gpu_speed.py --preset edge-0.5b --device cuda --work /tmp/speed --out $OUT/speed-edge-0.5b.json
    python scripts/gpu_speed.py --preset ci-tiny --device cpu --work /tmp/speed --out /tmp/speed/ci-tiny.json  # dry run

    # the 7B run, one call each (at most 600 s; docs/gpu.md has the plan, its timings and what to do if one stops):
    python scripts/gpu_speed.py --preset llava-1.5-7b --export checkpoint --rounds 0 --budget-s 120 --out ...
    python scripts/gpu_speed.py --preset llava-1.5-7b --export float --rounds 0 --budget-s 570 --out ...
    python scripts/gpu_speed.py --preset llava-1.5-7b --export fused+int4 --prune --rounds 0 --budget-s 570 --out ...
    python scripts/gpu_speed.py --preset llava-1.5-7b --export "text;genai" --prune --rounds 0 --budget-s 570 --out ...
    python scripts/gpu_speed.py --preset llava-1.5-7b --export none --variants fused,genai,fused-int4,genai-int4

Export (resumable: what exists under --work/<preset> is reused; --export names the stages of this call, ';' in
order, '+' in parallel; 'none' times what exists). Every stage writes under a temporary name and renames, or
writes its manifest last, so a stage killed at the budget leaves nothing a later call trusts; --prune deletes
the checkpoint and text model once no stage needs them (the 7B run's 64 GB disk). The stages:
the preset's random checkpoint on the device (export/synthetic.py); the plain LLaVA bundle traced in FP16 on the
device (export_direct: vision, embed, decoder) with decoder_static traced beside it and attached, then
decoder_fused's CUDA target added (export/fused.py, FP16); a copy of that bundle (graphs hard-linked) whose
decoder_fused has INT4 MatMulNBits weights (export/fused_quant.py); and GenAI's peers built by its model builder
from the same checkpoint's text model (scripts/compare_genai.py extract_text_model; `-p fp16 -e cuda` and `-p int4
-e cuda`). On --device cpu the same steps run in FP32 (`-p fp32 -e cpu`, `-p int4 -e cpu`), decoder_fused over the
device-buffer cache on CPU OrtValues (kv_cache='static'), no CUDA graphs: a check of the script, not a measurement.

The "fused" variants decode through decoder_fused's token step (input_ids in, next_token out: one session run, 8
bytes back per greedy token; runtimes/fused_device.py); "-embed-graph" ones the same bundle with PIPMM_TOKEN_STEP=0
(the embed graph's row in, the [1,V] logits row to the host for the argmax), the path before it.

Bench: VARIANTS, interleaved (order rotated per round), each round of each variant in its own process (so its
peak GPU memory is its own and a crash takes only that variant): pipmm through sdk.bench.bench()
(Pipeline.generate, N new tokens) and GenAI through its Generator (CUDA graph on) on a text prompt as long as
pipmm's prefill; then the first N greedy tokens of ours and GenAI's on the same ids (end of sequence suppressed
on both). A variant that fails records its error and the rest still run. The JSON is rewritten after every
step, so a run stopped at its time limit leaves what it measured; a markdown table (report()) goes beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sdk.bundle import link_or_copy  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """What the script builds and runs on one device."""
    dtype: str  # the pipmm bundle's
    genai: tuple[str, str]  # builder -p, -e of the float peer
    genai_int4: tuple[str, str]
    fused_kv_cache: str  # decoder_fused's cache: 'static' = one device buffer (runtimes/fused_device.py)
    torch_dtype: str


SETUPS = {"cuda": Setup("fp16", ("fp16", "cuda"), ("int4", "cuda"), "auto", "float16"),
          "cpu": Setup("fp32", ("fp32", "cpu"), ("int4", "cpu"), "static", "float32")}
# variant -> (kind, what it runs on, PIPMM_DECODER, kv_cache, CUDA graph: None = the backend's default); in order
# of importance; DEFAULT_VARIANTS run unless --variants says otherwise ("fused-eager": a diagnosis of the graph)
VARIANTS = {"plain+graph": ("pipmm", "float", "plain", "auto", None),
            "fused": ("pipmm", "float", "fused", "fused", None),
            "genai": ("genai", "genai-float", None, None, None),
            "fused-int4": ("pipmm", "int4", "fused", "fused", None),
            "genai-int4": ("genai", "genai-int4", None, None, None),
            "fused-eager": ("pipmm", "float", "fused", "fused", False),
            "fused-embed-graph": ("pipmm", "float", "fused", "fused", None),
            "fused-int4-embed-graph": ("pipmm", "int4", "fused", "fused", None)}
# the environment a variant adds: "-embed-graph", decode steps as before decoder_fused's token step (the embed
# graph's row in, the logits row to the host for the argmax; runtimes/fused_device.py)
VARIANT_ENV = {"fused-embed-graph": {"PIPMM_TOKEN_STEP": "0"}, "fused-int4-embed-graph": {"PIPMM_TOKEN_STEP": "0"}}
DEFAULT_VARIANTS = ("plain+graph", "fused", "genai", "fused-int4", "genai-int4", "fused-embed-graph")
PAIRS = [("plain+graph", "genai"), ("fused", "genai"), ("fused-int4", "genai-int4"),  # token agreement
         ("fused", "fused-embed-graph"), ("fused-int4", "fused-int4-embed-graph")]


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- export ---------------------------------------------------------------------------------------
# Every stage writes under a temporary name and renames when complete (or publishes its manifest last): a stage
# killed at a call's time limit leaves only hidden/`.partial` leftovers, which no check trusts and sweep() removes.

def _publish(partial: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def _fresh(partial: Path) -> Path:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def sweep(work: Path) -> None:
    """Remove what killed stages left: staged bundles (.float.partial-*), add_graphs' scratch (.float.graphs-*) and
    this script's *.partial directories. Never trusted; only disk (a 7B leftover is up to 13.5 GB)."""
    for path in work.iterdir():
        if path.is_dir() and (path.name.startswith(".") or path.name.endswith(".partial")):
            shutil.rmtree(path, ignore_errors=True)


def stage_checkpoint(work: Path, preset: str, device: str) -> None:
    import torch

    from export.synthetic import build_random_checkpoint

    if not (work / "ckpt" / "config.json").exists():
        partial = _fresh(work / "ckpt.partial")
        build_random_checkpoint(partial, preset, getattr(torch, SETUPS[device].torch_dtype), device)
        _publish(partial, work / "ckpt")


def stage_static(work: Path, device: str) -> None:
    from export.extra_graphs import export_optional_graph

    if not (work / "static" / "decoder_static.onnx").exists() and "decoder_static" not in _graphs(work / "float"):
        partial = _fresh(work / "static.partial")
        export_optional_graph(work / "ckpt", "decoder_static", partial / "decoder_static.onnx",
                              dtype=SETUPS[device].dtype, device="cpu")
        _publish(partial, work / "static")


def _graphs(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    return json.loads(path.read_text())["graphs"] if path.exists() else {}


def _int4_copy(float_dir: Path, int4_dir: Path) -> None:
    """int4_dir: the float bundle without decoder_fused, its graphs hard-linked (add_graphs writes decoder_fused's
    files anew, never into a linked one), its manifest a copy."""
    shutil.rmtree(int4_dir, ignore_errors=True)
    int4_dir.mkdir()
    for path in float_dir.iterdir():
        if not path.name.startswith("decoder_fused"):
            (link_or_copy if path.suffix in (".onnx", ".data") else shutil.copyfile)(path, int4_dir / path.name)
    manifest = json.loads((int4_dir / "manifest.json").read_text())
    if manifest["graphs"].pop("decoder_fused", None) is not None:  # a resumed run: float has it already
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("decoder_fused")}
        manifest["precision"]["graphs"].pop("decoder_fused", None)
        (int4_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def stage_float(work: Path, device: str) -> None:
    """The plain FP16 bundle (vision, embed, decoder), traced on the CPU; published whole or not at all."""
    from export.extra_graphs import export_direct

    if not _graphs(work / "float"):
        export_direct(work / "ckpt", work / "float", no_prompt_mlp=True, dtype=SETUPS[device].dtype, device="cpu",
                      graphs=("vision", "embed", "decoder"), overwrite=True, log=log)


def _int4_done(work: Path) -> bool:
    return _graphs(work / "int4").get("decoder_fused", {}).get("weights") == "int4"


def stage_fused(work: Path, device: str) -> None:
    """The float bundle's decoder_fused (CUDA target); the manifest is written last, so a killed stage leaves the
    bundle as it was."""
    from export.extra_graphs import add_graphs

    if "decoder_fused" not in _graphs(work / "float"):
        add_graphs(work / "float", work / "ckpt", ("decoder_fused",), fused_target="cuda")


def stage_int4(work: Path, device: str) -> None:
    """A copy of the float bundle (graphs hard-linked, without decoder_fused) with an INT4 decoder_fused."""
    from export.extra_graphs import add_graphs

    if not _int4_done(work):
        _int4_copy(work / "float", work / "int4")
        add_graphs(work / "int4", work / "ckpt", ("decoder_fused",), fused_target="cuda", fused_weights="int4")


def stage_pipmm(work: Path, device: str) -> None:
    """float, then fused and int4 in parallel (int4 in a child): the 0.5B run's one process for pipmm's bundles."""
    stage_float(work, device)
    int4 = None if _int4_done(work) else \
        subprocess.Popen(own_command(work.name, device, work.parent, "--stage", "int4"), cwd=ROOT)
    try:
        stage_fused(work, device)
        if int4 is not None and int4.wait():
            raise SystemExit("the INT4 decoder_fused failed (its output is above)")
    finally:
        if int4 is not None and int4.poll() is None:
            int4.kill()


def stage_text(work: Path, device: str) -> None:
    """The checkpoint's text model as a transformers causal LM (GenAI's builder input), in the checkpoint's dtype."""
    from compare_genai import extract_text_model

    if not (work / "text" / "config.json").exists():
        partial = _fresh(work / "text.partial")
        extract_text_model(work / "ckpt", partial)
        _publish(partial, work / "text")


GENAI_BUILDS = ("genai-float", "genai-int4")


def _genai_done(work: Path) -> bool:
    return all((work / name / "genai_config.json").exists() for name in GENAI_BUILDS)


def stage_genai(work: Path, device: str) -> None:
    stage_text(work, device)
    builds = {}  # the two builders in parallel, each into name.partial, renamed when it exits 0
    for name, (precision, ep) in zip(GENAI_BUILDS, (SETUPS[device].genai, SETUPS[device].genai_int4)):
        if not (work / name / "genai_config.json").exists():
            partial = _fresh(work / f"{name}.partial")
            log(f"GenAI builder -p {precision} -e {ep} -> {work / name}")
            builds[name] = subprocess.Popen([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                             str(work / "text"), "-o", str(partial), "-p", precision, "-e", ep, "-c",
                                             str(work / f"builder-cache-{precision}.partial")],
                                            stdout=subprocess.DEVNULL)
    try:
        failed = [name for name, build in builds.items() if build.wait()]
    finally:
        for build in builds.values():
            if build.poll() is None:
                build.kill()
    for name in builds:
        if name not in failed:
            _publish(work / f"{name}.partial", work / name)
    if failed:
        raise SystemExit(f"GenAI build {', '.join(failed)} failed (its output is above)")


def attach_static(work: Path) -> None:
    from export.extra_graphs import attach_graphs

    static = work / "static" / "decoder_static.onnx"
    if "decoder_static" not in _graphs(work / "float") and static.exists():
        attach_graphs(work / "float", {"decoder_static": static}, verify=False)


STAGES = {"checkpoint": stage_checkpoint, "float": stage_float, "fused": stage_fused, "pipmm": stage_pipmm,
          "int4": stage_int4, "static": stage_static, "text": stage_text, "genai": stage_genai}
# --export's default, the 0.5B run: ';' separates steps run in order, '+' stages of one step run in parallel
DEFAULT_EXPORT = "checkpoint;pipmm+static+genai"
# an input under --work -> when nothing left needs it (--prune then removes it; static/ is gone once attached)
PRUNE = {"text": _genai_done,
         "ckpt": lambda work: (_genai_done(work) or (work / "text" / "config.json").exists()) and _int4_done(work)
         and "decoder_fused" in _graphs(work / "float") and not (work / "static" / "decoder_static.onnx").exists()}


def prune(work: Path) -> list[str]:
    """Delete the inputs no later stage needs (the 7B run's disk: docs/gpu.md); the names removed."""
    gone = [name for name, done in PRUNE.items() if (work / name).exists() and done(work)]
    for name in gone:
        shutil.rmtree(work / name)
    return gone


def own_command(preset: str, device: str, work_root: Path, *extra: str) -> list[str]:
    """This script's command line for a child process (a stage, or one round of one variant) of the same preset,
    device and --work."""
    return [sys.executable, __file__, "--preset", preset, "--device", device, "--work", str(work_root), *extra]


def child(args, *extra) -> subprocess.Popen:
    """A child in its own process group, so that a timeout ends its own children too (stop())."""
    return subprocess.Popen(own_command(args.preset, args.device, args.work, *extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The child's output; at the timeout its whole process group is killed (a stage's builders or INT4 child)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0] + "\n[killed at the time budget]"


def disk_free_gb(work: Path) -> float:
    return round(shutil.disk_usage(work).free / 1e9, 1)


def export_all(args, work: Path, doc: dict, deadline: float) -> None:
    """--export's steps in order (each step's stages in parallel processes); no step starts after the deadline.
    Records go to work/export.json too, so the JSON of a later call (e.g. the timings alone) carries them."""
    record_file = work / "export.json"
    records = json.loads(record_file.read_text()) if record_file.exists() else {}
    doc["export"] = records
    sweep(work)
    start = time.perf_counter()
    for step in [s for s in args.export.split(";") if s and s != "none"]:
        if time.monotonic() > deadline:
            records[step] = {"skipped": "time budget"}
            continue
        procs = {name: (child(args, "--stage", name), time.perf_counter()) for name in step.split("+")}
        for name, (proc, began) in procs.items():
            out = finish(proc, max(10, deadline - time.monotonic()))
            got = {"rc": proc.returncode, "s": round(time.perf_counter() - began, 1),
                   "disk_free_gb": disk_free_gb(work), "time": time.strftime("%H:%M:%S"), "tail": out[-1500:]}
            records.setdefault(name, []).append(got)  # one entry per attempt: a resumed stage's second try too
            log(f"export {name}: rc {proc.returncode} in {got['s']} s, {got['disk_free_gb']} GB free")
        if args.prune:
            records.setdefault("pruned", []).extend(prune(work))
        record_file.write_text(json.dumps(records, indent=1) + "\n")
        if any(procs[name][0].returncode for name in procs):
            break  # a later step needs this one's output
    try:
        attach_static(work)
    except Exception as err:  # the plain variant then runs without decoder_static (no CUDA graph)
        records["attach_static"] = {"error": f"{type(err).__name__}: {err}"}
    records["seconds_this_call"] = round(time.perf_counter() - start, 1)
    record_file.write_text(json.dumps(records, indent=1) + "\n")


# -- one measurement (run in its own process) ------------------------------------------------------

def prompt_ids(bundle: Path) -> np.ndarray:
    """Random text ids as many as pipmm's prefill of bench()'s default request (image slots included): GenAI's
    prompt, and the ids of the token agreement check."""
    from sdk.bench import DEFAULT_PROMPT
    from sdk.bundle import load_bundle
    from sdk.prompting import Prompter

    loaded = load_bundle(bundle, verify=False)
    manifest = loaded.manifest
    length = len(Prompter.for_manifest(loaded.tokenizer_path, manifest).prompt_ids(DEFAULT_PROMPT)[0])
    return np.random.default_rng(0).integers(5, min(manifest.model.vocab_size, 300), length)


def greedy_ours(bundle: Path, device: str, decoder: str, kv_cache: str, ids: np.ndarray, n: int) -> list[int]:
    """The prefill of `ids`, then n greedy tokens through the decode steps Pipeline.decode takes (decode_token:
    the token step where the bundle and PIPMM_TOKEN_STEP allow), end of sequence suppressed as GenAI's
    min_length does."""
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.bundle import load_bundle
    from sdk.generation import GenerationArgs, choose

    loaded = load_bundle(bundle, verify=False)
    backend = OnnxRuntimeBackend(loaded, device=device, kv_cache=kv_cache, decoder_flavour=decoder)
    eos = sorted(set(loaded.manifest.special_tokens.eos))
    args, rng, out = GenerationArgs(max_new_tokens=n), np.random.default_rng(0), []
    logits, _, cache = backend.decoder(backend.embed(ids[None].astype(np.int64)), backend.new_cache(1))
    for _ in range(n):
        out.append(choose(logits, args, rng, eos))
        logits, cache = backend.decode_token(out[-1], cache, greedy=True)
    return out


def measure(args, work: Path, variant: str) -> dict:
    kind, target, decoder, kv_cache, cuda_graph = VARIANTS[variant]
    setup = SETUPS[args.device]
    kv_cache = setup.fused_kv_cache if kv_cache == "fused" else kv_cache
    ids_file = work / "ids.npy"
    if kind == "pipmm":
        from sdk.bench import bench

        os.environ["PIPMM_DECODER"] = decoder
        os.environ.update(VARIANT_ENV.get(variant, {}))
        result = bench(work / target, backend="onnxruntime", device=args.device, new_tokens=args.new_tokens,
                       runs=args.runs, warmup=args.warmup, kv_cache=kv_cache, cuda_graph=cuda_graph, verify=False,
                       log=lambda *a, **k: None)
        out = {"stages": {k: v["median"] for k, v in result["stages"].items()}, "memory": result["memory"],
               "backend": {k: result["backend"].get(k) for k in ("decoder_graph", "decoder_flavour_note", "kv_cache",
                                                                  "kv_cache_note", "cuda_graph", "cuda_graph_note",
                                                                  "token_step", "device_argmax", "token_step_note",
                                                                  "onnxruntime", "providers")},
               "prompt_tokens": result["config"]["prompt_tokens"], "bandwidth": result["bandwidth"]}
        if args.agree and ids_file.exists():
            out["tokens"] = greedy_ours(work / target, args.device, decoder, kv_cache, np.load(ids_file),
                                        args.new_tokens)
        return out
    import onnxruntime_genai as og

    from compare_genai import genai_run
    from runtimes.device_info import MemorySampler

    if not ids_file.exists():
        raise RuntimeError("no ids.npy: the float bundle was not exported")
    ids = np.load(ids_file).astype(np.int32)
    note = None
    with MemorySampler("cpu" if args.device == "cpu" else "cuda") as sampler:
        config = og.Config(str(work / target))
        if args.device == "cuda":
            try:
                config.clear_providers()
                config.append_provider("cuda")
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
            except Exception as err:
                note = f"CUDA graph not set: {err}"
        model = og.Model(config)
        for _ in range(args.warmup):
            genai_run(model, ids, args.new_tokens)
        runs = [genai_run(model, ids, args.new_tokens)[0] for _ in range(args.runs)]
        tokens = genai_run(model, ids, args.new_tokens)[1] if args.agree else None
    stages = {m: float(np.median([r[m] for r in runs])) for m in runs[0]}
    return {"stages": stages, "memory": sampler.peaks(), "tokens": tokens, "note": note,
            "backend": {"onnxruntime_genai": og.__version__, "cuda_graph": args.device == "cuda" and note is None}}


# -- the run --------------------------------------------------------------------------------------

def agreement(doc: dict) -> dict:
    got = {}
    for ours, theirs in PAIRS:
        a = doc["variants"].get(ours, {}).get("tokens")
        b = doc["variants"].get(theirs, {}).get("tokens")
        if a and b:
            lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            got[f"{ours} vs {theirs}"] = {"leading_identical": lead, "of": min(len(a), len(b)),
                                          "identical": sum(x == y for x, y in zip(a, b))}
    return got


def summarise(doc: dict) -> None:
    """Medians over rounds per variant, into doc['variants'][v]['median']."""
    for name, entry in doc["variants"].items():
        rounds = [r for r in entry["rounds"] if "stages" in r]
        if rounds:
            keys = [k for k in rounds[0]["stages"] if rounds[0]["stages"][k] is not None]
            entry["median"] = {k: float(np.median([r["stages"][k] for r in rounds if r["stages"].get(k) is not None]))
                               for k in keys}
            peaks = [(r.get("memory") or {}).get("device_peak_mb") for r in rounds]
            entry["device_peak_mb"] = max([p for p in peaks if p], default=None)
            hosts = [(r.get("memory") or {}).get("host_peak_rss_mb") for r in rounds]
            entry["host_peak_rss_mb"] = max([p for p in hosts if p], default=None)
            entry.setdefault("backend", rounds[0].get("backend"))
            if rounds[0].get("tokens"):
                entry["tokens"] = rounds[0]["tokens"]
    doc["agreement"] = agreement(doc)


def report(doc: dict) -> str:
    """The markdown table of a run."""
    lines = [f"# {doc['preset']} on {doc['device']}: pipmm vs ONNX Runtime GenAI ({doc['config']['new_tokens']} new "
             f"tokens, {doc['config']['rounds']} rounds x {doc['config']['runs']} runs, medians)", "",
             "| variant | TTFT ms | prefill ms | decode tok/s | peak device MB | peak RSS MB | decoder / note |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in doc["variants"].items():
        m, b = entry.get("median") or {}, entry.get("backend") or {}
        fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        what = entry.get("error") or b.get("decoder_graph") or f"GenAI {b.get('onnxruntime_genai', '')}"
        if b.get("kv_cache"):
            what += f", {b['kv_cache']} cache, CUDA graph {b.get('cuda_graph')}"
        if b.get("token_step") is not None:
            what += ", token step + device argmax" if b.get("device_argmax") else \
                f", embed graph + host argmax ({b.get('token_step_note')})"
        lines.append(f"| {name} | {fmt(m.get('ttft_ms'))} | {fmt(m.get('prefill_ms'))} | "
                     f"{fmt(m.get('decode_tokens_per_s'), 0)} | {fmt(entry.get('device_peak_mb'), 0)} | "
                     f"{fmt(entry.get('host_peak_rss_mb'), 0)} | {what[:160]} |")
    lines += ["", "TTFT: pipmm's from the request (preprocess, vision, prefill); GenAI's is its text prefill only.", ""]
    for pair, a in doc.get("agreement", {}).items():
        lines.append(f"- tokens {pair}: {a['leading_identical']} of {a['of']} leading identical ({a['identical']} equal)")
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path | None) -> None:
    summarise(doc)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(report(doc))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edge-0.5b")
    parser.add_argument("--device", default="cuda", choices=tuple(SETUPS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/speed"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=420, help="start no new step after this many seconds")
    parser.add_argument("--export", default=DEFAULT_EXPORT,
                        help="export steps of this call: ';' in order, '+' in parallel, of " + ", ".join(STAGES) +
                        "; 'none' = timings only (what exists under --work is reused either way)")
    parser.add_argument("--prune", action="store_true", help="delete ckpt/ and text/ once no stage needs them")
    parser.add_argument("--stage", default=None, choices=tuple(STAGES) + ("measure",), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--agree", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}: choose from {', '.join(VARIANTS)}")
    stages = {name for step in args.export.split(";") for name in step.split("+") if name and args.export != "none"}
    if stages - set(STAGES):
        parser.error(f"unknown export stages {', '.join(sorted(stages - set(STAGES)))}: "
                     f"choose from {', '.join(STAGES)}")
    work = args.work / args.preset
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "measure":  # a child: one round of one variant -> --result
        try:
            got = measure(args, work, args.variant)
        except Exception as err:
            got = {"error": f"{type(err).__name__}: {str(err)[:1500]}", "traceback": traceback.format_exc()[-3000:]}
        partial = args.result.with_suffix(".partial")
        partial.write_text(json.dumps(got))
        os.replace(partial, args.result)  # a round killed while writing leaves no half result
        return 0
    if args.stage:
        STAGES[args.stage](work, args.preset, args.device) if args.stage == "checkpoint" else \
            STAGES[args.stage](work, args.device)
        return 0
    deadline = time.monotonic() + args.budget_s
    doc = {"schema": "pipmm-gpu-speed/1", "preset": args.preset, "device": args.device,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python scripts/gpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": {"new_tokens": args.new_tokens, "rounds": args.rounds, "runs": args.runs, "warmup": args.warmup,
                      "setup": SETUPS[args.device].__dict__},
           "export": {}, "variants": {name: {"rounds": []} for name in args.variants.split(",")}}
    export_all(args, work, doc, deadline)
    write(doc, args.out)
    if not (work / "ids.npy").exists() and _graphs(work / "float"):
        np.save(work / "ids.partial.npy", prompt_ids(work / "float"))
        os.replace(work / "ids.partial.npy", work / "ids.npy")
    names = list(doc["variants"])
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if time.monotonic() > deadline:
                doc["variants"][name]["rounds"].append({"skipped": "time budget"})
                continue
            result = work / "results" / f"{name}-{r}.json"
            result.parent.mkdir(exist_ok=True)
            result.unlink(missing_ok=True)
            extra = ["--stage", "measure", "--variant", name, "--result", str(result), "--new-tokens",
                     str(args.new_tokens), "--runs", str(args.runs), "--warmup", str(args.warmup)] + \
                (["--agree"] if r == 0 else [])
            proc = child(args, *extra)
            out = finish(proc, max(30, deadline - time.monotonic() + 45))
            got = json.loads(result.read_text()) if result.exists() else \
                {"error": f"exit {proc.returncode}: {out[-1500:]}"}
            doc["variants"][name]["rounds"].append(got)
            if "error" in got:
                doc["variants"][name]["error"] = got["error"][:300]
            m = got.get("stages", {})
            log(f"round {r + 1} {name}: " + (got.get("error", "")[:200] or
                f"TTFT {m.get('ttft_ms', 0):.1f} ms, decode {m.get('decode_tokens_per_s', 0):.0f} tok/s"))
            write(doc, args.out)
    write(doc, args.out)
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
