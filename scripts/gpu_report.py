"""A markdown table, the issue's targets and a chart from scripts/gpu_measure.py's JSON.

    python scripts/gpu_report.py docs/gpu-results/llava-1.5-7b.json     # rewrites the .md and .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.bench import plot  # noqa: E402


def _f(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _stage(result: dict, name: str) -> tuple:
    s = result["stages"][name]
    return s["median"], s["p90"]


def _kv_bytes(model: dict, slots: int, itemsize: int = 2) -> int:
    return 2 * model["num_layers"] * model["num_kv_heads"] * slots * model["head_dim"] * itemsize


def targets(doc: dict) -> list[str]:
    """The issue's three targets, evaluated on what was measured (7B shapes; reported for any preset)."""
    results = {r["label"]: r for r in doc["results"]}
    lines = []
    graph_runs = [r for r in doc["results"] if r["backend"].get("cuda_graph")]
    best = max(graph_runs or doc["results"], key=lambda r: r["stages"]["decode_tokens_per_s"]["median"] or 0, default=None)
    if best and best.get("bandwidth"):
        frac = best["bandwidth"]["fraction_of_bound"]
        lines.append(f"* decode >= 75% of the bandwidth bound: **{_f(frac * 100)}%** ({_f(best['stages']['decode_tokens_per_s']['median'])} "
                     f"of {_f(best['bandwidth']['bound_tokens_per_s'], 0)} tokens/s, {best['label']}) -> "
                     f"{'met' if frac >= 0.75 else 'missed by ' + _f((0.75 - frac) * 100) + ' points'}")
    hf_run = next((r for r in doc["results"] if r.get("compare_hf")), None)
    half = results.get("ORT CUDA + graph, PIP-MM, half")
    full = results.get("ORT CUDA + graph, PIP-MM, full")
    if half and hf_run:
        hf_ttft = hf_run["compare_hf"]["stages"]["ttft_ms"]["median"]
        ours = half["stages"]["ttft_ms"]["median"]
        lines.append(f"* TTFT at half budget <= 0.5x transformers eager at full budget: **{_f(ours / hf_ttft, 2)}x** "
                     f"({_f(ours)} ms vs {_f(hf_ttft)} ms) -> {'met' if ours <= 0.5 * hf_ttft else 'missed'}")
    if half and full:
        ratio = half["stages"]["ttft_ms"]["median"] / full["stages"]["ttft_ms"]["median"]
        lines.append(f"* TTFT at half budget <= 0.65x our full budget: **{_f(ratio, 2)}x** -> "
                     f"{'met' if ratio <= 0.65 else 'missed'}")
    at_max = next((r for r in doc["results"] if "max context" in r["label"]), None)
    if at_max and at_max["memory"].get("device_peak_mb"):
        model = at_max["bundle"]["model"]
        files = doc["export"]["bundle_files"].get("pipmm-half", {})
        # the graphs a static-cache run loads: vision, embed, decoder_static (whose weights may lie in decoder.onnx.data)
        weights = sum(b for f, b in files.items() if f.split(".")[0] in ("vision", "embed", "decoder_static"))
        if "decoder_static.onnx.data" not in files:
            weights += files.get("decoder.onnx.data", 0)
        budget = (weights + _kv_bytes(model, model["max_context"])) / 2**20
        peak = at_max["memory"]["device_peak_mb"]
        lines.append(f"* peak GPU memory <= 1.1x (weights + KV cache at the maximum context {model['max_context']}): "
                     f"**{_f(peak / budget, 2)}x** ({_f(peak, 0)} MB against {_f(budget, 0)} MB of weights + KV, "
                     f"{at_max['memory'].get('device_source')}) -> {'met' if peak <= 1.1 * budget else 'missed'}")
    return lines


def markdown(doc: dict) -> str:
    rows = ["| configuration | K | preprocess | prompt | vision | prefill | TTFT median (p90) | decode tok/s median (p90) "
            "| % of bound | GPU peak MB | host RSS MB |", "|" + "---|" * 11]
    device = None
    for r in doc["results"]:
        device = device or r["device"]
        ttft, decode = _stage(r, "ttft_ms"), _stage(r, "decode_tokens_per_s")
        bw = r.get("bandwidth") or {}
        frac = bw.get("fraction_of_bound")
        rows.append(f"| {r['label']} | {r['bundle']['visual_tokens']['count']} | {_f(_stage(r, 'preprocess_ms')[0])} | "
                    f"{_f(_stage(r, 'prompt_ms')[0])} | {_f(_stage(r, 'vision_ms')[0])} | {_f(_stage(r, 'prefill_ms')[0])} | "
                    f"{_f(ttft[0])} ({_f(ttft[1])}) | {_f(decode[0])} ({_f(decode[1])}) | "
                    f"{_f(frac * 100 if frac else None)} | {_f(r['memory'].get('device_peak_mb'), 0)} | "
                    f"{_f(r['memory'].get('host_peak_rss_mb'), 0)} |")
        hf = r.get("compare_hf")
        if hf:
            t, d = hf["stages"]["ttft_ms"], hf["stages"]["decode_tokens_per_s"]
            frac = (d["median"] / bw["bound_tokens_per_s"]) if bw and d["median"] else None
            rows.append(f"| transformers {hf['transformers']} generate, {hf['attn']} {hf['dtype']} | {hf['visual_tokens']} | – | – "
                        f"| – | – | {_f(t['median'])} ({_f(t['p90'])}) | {_f(d['median'])} ({_f(d['p90'])}) | "
                        f"{_f(frac * 100 if frac else None)} | {_f(hf['memory'].get('device_peak_mb'), 0)} "
                        f"(torch {_f(hf['memory'].get('torch_peak_allocated_mb'), 0)}) | – |")
    first = doc["results"][0] if doc["results"] else {}
    bw = first.get("bandwidth") or {}
    export = doc["export"]
    lines = [f"# {doc['preset']} on {device.get('name') if device else '?'}", "",
             f"Stage times in ms (median over {first.get('config', {}).get('runs')} runs after "
             f"{first.get('config', {}).get('warmup')} warm-ups), batch 1, {first.get('config', {}).get('new_tokens')} new "
             f"tokens, prompt {first.get('config', {}).get('prompt_tokens')} tokens at full budget; FP16 bundles traced "
             "directly (export/extra_graphs.py); random weights (export/synthetic.py). Decode tok/s = (N - 1) new tokens "
             "over the time from the first to the last (Pipeline.generate's tokens/s, sdk/pipeline.py Result; "
             "transformers' from its streamer's timestamps).", "", *rows, ""]
    if bw:
        lines.append(f"Bandwidth bound: {bw['decoder_weight_gb']:.2f} GB of decoder weights read per token / "
                     f"{bw['copy_gb_per_s']:.0f} GB/s device-to-device copy ({bw['method']}) = "
                     f"{bw['bound_tokens_per_s']:.0f} tokens/s; torch's copy: {_f(doc.get('torch_copy_gb_per_s'), 0)} GB/s.")
    hf_run = next((r for r in doc["results"] if r.get("compare_hf")), None)
    if hf_run:
        lines.append(f"Greedy tokens identical to transformers' (plain bundle, FP16, end-of-sequence suppressed on both "
                     f"sides): the first {hf_run['ratios']['leading_tokens_identical']} of {len(hf_run['tokens'])}.")
    lines += ["", "## Targets (issue 5)", "", *targets(doc), "",
              f"Export: {export['seconds']} s wall in all (steps in parallel where independent): " +
              "; ".join(f"{k} {v['seconds']} s ({v['bytes'] / 1e9:.2f} GB)" for k, v in export["steps"].items()) +
              ". Sizes are of the step's output directory: the PIP-MM bundles hard-link the plain bundle's decoder, "
              "decoder_static and embed files and add one vision graph each.", "",
              f"Commands (on the GPU machine, after shared/device/stage-ort-gpu.sh; $WORK = /tmp/pipmm/{doc['preset']}; "
              f"made by `python scripts/gpu_measure.py --preset {doc['preset']} --work /tmp/pipmm --out OUT`):", ""]
    lines += [f"    {r['command']}" for r in doc["results"] if r.get("command")]
    notes = sorted({r["backend"].get("cuda_graph_note") for r in doc["results"] if r["backend"].get("cuda_graph_note")})
    if notes:
        lines += ["", "Notes from the runtime:", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_report(doc: dict, md_path, png_path) -> None:
    Path(md_path).write_text(markdown(doc))
    if doc["results"]:
        plot(doc["results"], png_path, title=f"{doc['preset']}: pipmm bench on {doc['results'][0]['device'].get('name')}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        write_report(json.loads(path.read_text()), path.with_suffix(".md"), path.with_suffix(".png"))
