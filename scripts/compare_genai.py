"""pipmm against ONNX Runtime GenAI on CPU, same weights, one command (issue 18; numbers in docs/gpu.md, CPU section).

    pip install -e .[genai]
    python scripts/compare_genai.py                                  # the default model and bundle
    python scripts/compare_genai.py --checkpoint CKPT --bundle BUNDLE --json docs/gpu-results/cpu-genai-X.json
    python scripts/compare_genai.py --precision int4   # the bundle quantized (int4, + its INT4 decoder_fused) vs -p int4
                                                       # (a bundle whose decoder_fused is int4 already runs as it is)

The peer is built with GenAI's own model builder (`python -m onnxruntime_genai.models.builder -i TEXT -o OUT
-p fp32 -e cpu`) from the checkpoint's text model, extracted with transformers into a plain
LlamaForCausalLM/Qwen2ForCausalLM directory (the LLaVA's language model + lm_head, the same tensors). pipmm runs
through the path users run, sdk/bench.py bench() (Pipeline.generate with min_new_tokens, so every run decodes N
tokens), on the bundle as given ("plain": PIPMM_DECODER=plain) and on a copy with decoder_fused added: "fused"
(the CPU default: decoder_fused with the in-place KV cache, runtimes/inplace_cache.py) and "fused-numpy"
(decoder_fused with the numpy cache that grows and copies every step, what the in-place cache replaced).
GenAI gets a text prompt of the same length as pipmm's prefill (image slots included) and decodes N tokens
(min_length). Variants are interleaved, their order rotated per round; medians over rounds are reported.

Reported per variant: prefill ms (pipmm: embed + splice + decoder over the prompt; GenAI: append_tokens), time
to first token (pipmm: from the request, so preprocess, prompt pass and vision too; GenAI: its prefill),
decode tok/s ((N-1) / decode time, both sides), and decoder nodes per layer after ONNX Runtime's load-time
optimisation. No memory figures: every variant runs in one process, whose peak RSS is shared. Before timing, the two decoders' greedy tokens on the same ids are compared (same weights).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# variant -> (bundle: the plain one as given or its fused copy, kv_cache, PIPMM_DECODER); "genai" is the peer
PIPMM_VARIANTS = {"plain": ("plain", "auto", "plain"), "fused-numpy": ("fused", "numpy", "auto"),
                  "fused": ("fused", "auto", "auto")}
VARIANTS = (*PIPMM_VARIANTS, "genai")
METRICS = ("prefill_ms", "ttft_ms", "decode_tokens_per_s")


# GenAI's builder (0.18) takes every nn.Linear with out_features == vocab_size for the LM head; when the MLP width
# equals the vocabulary (the default model: 512 and 512) it emits logits after layer 0. The MLP is then widened by
# PAD zero channels (gate/up rows, down columns of zeros: silu(0) * 0 = 0, the same function), 1.6% more MLP work
# for the peer.
PAD = 8


def extract_text_model(checkpoint_dir: Path, out: Path) -> tuple[Path, str | None]:
    """The LLaVA's language model + lm_head as a plain transformers causal-LM directory (GenAI's builder input), in
    the checkpoint's stored dtype: a 7B FP16 checkpoint stays 13.5 GB on disk and in memory (FP32 would be 27 GB)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from export.model.checkpoint import load_checkpoint

    stored = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    dtype = getattr(torch, stored.get("dtype") or stored.get("torch_dtype") or "float32")
    checkpoint = load_checkpoint(checkpoint_dir, dtype=dtype)
    config = copy.deepcopy(checkpoint.config.text_config)
    weights = dict(checkpoint.language_model.state_dict())
    note = None
    if config.hidden_size == config.vocab_size:
        raise SystemExit("hidden size == vocabulary size: GenAI's builder would take q_proj for the LM head")
    if config.intermediate_size == config.vocab_size:
        config.intermediate_size += PAD
        note = f"MLP widened from {config.vocab_size} to {config.intermediate_size} zero channels (builder heuristic)"
        for name, tensor in list(weights.items()):
            if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
                weights[name] = torch.cat([tensor, tensor.new_zeros(PAD, tensor.shape[1])], 0)
            elif name.endswith("mlp.down_proj.weight"):
                weights[name] = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], PAD)], 1)
    with torch.device("meta"):  # no random init of weights that are replaced next (minutes at 7B on a CPU)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.model.load_state_dict(weights, assign=True)
    model.lm_head.load_state_dict(checkpoint.model.lm_head.state_dict(), assign=True)
    model.save_pretrained(out, max_shard_size="4GB")
    shutil.copy(checkpoint.tokenizer_file, out / "tokenizer.json")
    return out, note


def build_genai(checkpoint_dir: Path, work: Path, precision: str = "fp32") -> tuple[Path, str | None]:
    out = work / ("genai" if precision == "fp32" else f"genai-{precision}")
    if (out / "genai_config.json").exists():
        return out, (out / "pipmm-note.txt").read_text() if (out / "pipmm-note.txt").exists() else None
    text = work / "text"
    text_note = text / "pipmm-note.txt"  # beside the text model, so every precision's build reads the same note
    if (text / "config.json").exists():
        note = text_note.read_text() if text_note.exists() else None
    else:
        text, note = extract_text_model(checkpoint_dir, text)
        if note:
            text_note.write_text(note)
    print(f"building the GenAI model from {text} (onnxruntime_genai.models.builder, {precision}, cpu)", flush=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(work / f"builder-cache-{precision}")], check=True,
                   stdout=subprocess.DEVNULL)
    if note:
        (out / "pipmm-note.txt").write_text(note)
    return out, note


def made_from(out: Path, source: Path) -> bool:
    """Whether the cached `out` was made from `source` as it is now (a bundle's manifest.json, or a checkpoint's
    weights, export.model.checkpoint.weights_sha256): a stamp beside `out` holds the source's sha256. A re-export
    or retrain since makes the copy stale, and it is made again (such a copy once carried another checkpoint's
    decoder_fused)."""
    from export.model.checkpoint import weights_sha256
    from sdk.bundle import sha256_file

    # in chunks: a 7B checkpoint is 13.5 GB; a sharded one (m20) by its shards
    digest = sha256_file(source / "manifest.json") if (source / "manifest.json").exists() else weights_sha256(source)
    stamp = out.parent / f"{out.name}.source-sha256"
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return True
    shutil.rmtree(out, ignore_errors=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")  # written before the copy; a copy left half made fails to load, loudly
    return False


def quantized_copy(bundle: Path, work: Path, precision: str) -> Path:
    """The bundle at `precision` (export/precision/quantize.py, as `pipmm export --precision` makes it)."""
    from export.precision.quantize import quantize_bundle

    out = work / f"bundle-{precision}"
    if not made_from(out, bundle):
        quantize_bundle(bundle, out, precision, overwrite=True, progress=False)
    return out


def fused_copy(bundle: Path, checkpoint_dir: Path, work: Path) -> Path:
    from export.extra_graphs import add_graphs
    from sdk.bundle import load_bundle

    from sdk.manifest_fused import FusedDecoderEntry

    def current(path: Path) -> bool:  # a decoder_fused of this export/fused.py (older ones lack the marks)
        loaded = load_bundle(path, verify=False)
        if "decoder_fused" not in loaded.graphs:
            return False
        entry = FusedDecoderEntry.of(loaded)
        return entry.query_seqlens and entry.token_input is not None

    if current(bundle):
        return bundle
    out = work / f"{bundle.name}-fused"  # bundle-fused / bundle-int4-fused: decoder_fused at the bundle's precision
    if not made_from(out, bundle) or not current(out):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(bundle, out)
        add_graphs(out, checkpoint_dir, graphs=("decoder_fused",), overwrite=True)
    return out


def nodes_per_layer(path: Path, layers: int) -> dict:
    """Decoder nodes per layer as written and after ONNX Runtime's ORT_ENABLE_ALL at load (CPU)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(scratch) / "optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(options.optimized_model_filepath, load_external_data=False)
    written = onnx.load(str(path), load_external_data=False)
    return {"written": round(len(written.graph.node) / layers, 1),
            "after_ort_optimisation": round(len(optimised.graph.node) / layers, 1),
            "ops_after_ort_optimisation": dict(collections.Counter(n.op_type for n in optimised.graph.node).most_common())}


def genai_run(model, ids: np.ndarray, new_tokens: int, exactly: bool = True) -> tuple[dict, list[int]]:
    """One greedy generation: exactly `new_tokens` (end of sequence suppressed), or up to them."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total if exactly else 0, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)  # the prompt's forward pass: the first token's logits
    generator.generate_next_token()  # samples the first token (no model run)
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    end = time.perf_counter()
    tokens = [int(t) for t in generator.get_sequence(0)[len(ids):]]
    return {"prefill_ms": (first - start) * 1e3, "ttft_ms": (first - start) * 1e3,
            "decode_tokens_per_s": (new_tokens - 1) / (end - first)}, tokens


def same_weights_check(bundle: Path, genai_model, ids: np.ndarray, tokens: int = 16) -> dict:
    """Greedy tokens of pipmm's decoder and GenAI's on the same text ids (no image), up to the end of sequence:
    equal = same weights."""
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.bundle import load_bundle

    loaded = load_bundle(bundle, verify=False)
    backend, eos = OnnxRuntimeBackend(loaded, device="cpu"), set(loaded.manifest.special_tokens.eos)
    cache, step, ours = backend.new_cache(1), ids[None].astype(np.int64), []
    for _ in range(tokens):
        logits, _, cache = backend.decoder(backend.embed(step), cache)
        token = int(logits[0].argmax())
        if token in eos:  # GenAI's sequence ends before its end-of-sequence token
            break
        ours.append(token)
        step = np.array([[ours[-1]]], np.int64)
    theirs = genai_run(genai_model, ids.astype(np.int32), tokens, exactly=False)[1]
    return {"tokens": tokens, "pipmm": ours, "genai": theirs, "identical": ours == theirs}


def pipmm_run(bundle: Path, variant: str, new_tokens: int, runs: int) -> dict:
    from sdk.bench import bench

    _, kv_cache, decoder = PIPMM_VARIANTS[variant]
    os.environ["PIPMM_DECODER"] = decoder
    result = bench(bundle, backend="onnxruntime", device="cpu", new_tokens=new_tokens, runs=runs, warmup=1,
                   kv_cache=kv_cache, log=lambda *a, **k: None)
    assert result["backend"]["decoder_graph"] == ("decoder" if variant == "plain" else "decoder_fused")
    assert result["backend"]["kv_cache"] == {"plain": "numpy", "fused-numpy": "numpy", "fused": "inplace"}[variant]
    out = {name: result["stages"][name]["median"] for name in METRICS}
    return out, result["config"]["prompt_tokens"], result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default_model")
    parser.add_argument("--bundle", type=Path, default=ROOT / "sdk" / "default_bundle")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--runs", type=int, default=3, help="requests per variant per round (their median)")
    parser.add_argument("--work", type=Path, default=None, help="where the GenAI model and the fused copy go")
    parser.add_argument("--json", type=Path, default=None, help="default docs/gpu-results/cpu-genai-default[-int4].json")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int4"),
                        help="int4: the bundle quantized (MatMulNBits decoder and decoder_fused, int8 embedding "
                             "gather) against GenAI's -p int4 -e cpu")
    args = parser.parse_args(argv)
    import onnxruntime
    import onnxruntime_genai as og

    from sdk.bundle import load_bundle

    work = args.work or Path.home() / ".cache" / "pipmm" / "compare_genai" / args.checkpoint.resolve().name
    work.mkdir(parents=True, exist_ok=True)
    args.json = args.json or ROOT / "docs" / "gpu-results" / \
        f"cpu-genai-default{'' if args.precision == 'fp32' else '-' + args.precision}.json"
    genai_dir, peer_note = build_genai(args.checkpoint, work, args.precision)
    shipped = load_bundle(args.bundle, verify=False).graphs.get("decoder_fused")
    # a bundle whose decoder_fused already has these weights (the default's int4 one) runs as it is
    if args.precision != "fp32" and (shipped is None or shipped.extra.get("weights") != args.precision):
        args.bundle = quantized_copy(args.bundle, work, args.precision)
    fused = fused_copy(args.bundle, args.checkpoint, work)
    model = og.Model(str(genai_dir))
    manifest = load_bundle(args.bundle, verify=False).manifest
    layers = manifest.model.num_layers

    _, prompt_tokens, first = pipmm_run(args.bundle, "plain", args.new_tokens, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest.model.vocab_size, prompt_tokens).astype(np.int32)
    check = same_weights_check(fused, model, ids[: min(32, prompt_tokens)])
    print(f"same weights: greedy tokens identical = {check['identical']}", flush=True)
    genai_run(model, ids, args.new_tokens)  # warm-up
    rounds = {name: [] for name in VARIANTS}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            if name == "genai":
                runs = [genai_run(model, ids, args.new_tokens)[0] for _ in range(args.runs)]
                got = {m: float(np.median([run[m] for run in runs])) for m in METRICS}
            else:
                bundle = args.bundle if PIPMM_VARIANTS[name][0] == "plain" else fused
                got = pipmm_run(bundle, name, args.new_tokens, args.runs)[0]
            rounds[name].append(got)
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {rounds[n][-1]['decode_tokens_per_s']:.0f} tok/s" for n in VARIANTS), flush=True)
    medians = {n: {m: float(np.median([x[m] for x in rounds[n]])) for m in METRICS} for n in VARIANTS}

    def ratio(a, b, metric):
        return medians[a][metric] / medians[b][metric]

    result = {
        "schema": "pipmm-compare-genai/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python scripts/compare_genai.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "shared": "yes: other processes ran on the same cores",
                    "load_average_1min_per_round": load},
        "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
        "checkpoint": str(args.checkpoint), "bundle": str(args.bundle), "model": manifest.model.to_dict(),
        "config": {"prompt_tokens": int(prompt_tokens), "new_tokens": args.new_tokens, "rounds": args.rounds,
                   "runs_per_round": args.runs, "pipmm_prompt": first["config"]["prompt"], "precision": args.precision},
        "same_weights": check, "peer_note": peer_note,
        "nodes_per_layer": {"plain": nodes_per_layer(args.bundle / "decoder.onnx", layers),
                            "fused": nodes_per_layer(fused / "decoder_fused.onnx", layers),
                            "genai": nodes_per_layer(genai_dir / "model.onnx", layers)},
        "medians": medians, "rounds": rounds,
        "ratios": {"fused_over_genai_decode": ratio("fused", "genai", "decode_tokens_per_s"),
                   "fused_over_plain_decode": ratio("fused", "plain", "decode_tokens_per_s"),
                   "fused_over_fused_numpy_decode": ratio("fused", "fused-numpy", "decode_tokens_per_s"),
                   "genai_prefill_over_fused_prefill": ratio("genai", "fused", "prefill_ms"),
                   "genai_ttft_over_fused_ttft": ratio("genai", "fused", "ttft_ms")},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| variant | prefill ms | TTFT ms | decode tok/s |\n|---|---|---|---|")
    for name in VARIANTS:
        m = medians[name]
        print(f"| {name} | {m['prefill_ms']:.1f} | {m['ttft_ms']:.1f} | {m['decode_tokens_per_s']:.0f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
