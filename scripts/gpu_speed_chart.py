"""The chart of a scripts/gpu_speed.py run: time to first token by stage and decode tokens/s, pipmm beside
ONNX Runtime GenAI on the same weights.

    python3 scripts/gpu_speed_chart.py docs/gpu-results/7b-2026-12-03/speed-llava-1.5-7b.json   # writes the .png beside it

pipmm's TTFT is measured from the request (preprocess, prompt pass, vision, prefill); GenAI's is its text prefill
only (it has no image path), so the left panel stacks pipmm's stages and shows GenAI's prefill alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (("preprocess_ms", "preprocess", "#9ecae1"), ("prompt_ms", "prompt pass", "#fdae6b"),
          ("vision_ms", "vision", "#a1d99b"), ("prefill_ms", "prefill", "#3182bd"))


def rows(doc: dict) -> list[tuple[str, dict]]:
    """(variant, medians) of every variant that measured, in the run's order."""
    return [(name, entry["median"]) for name, entry in doc["variants"].items() if entry.get("median")]


def chart(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = rows(doc)
    if not measured:
        raise ValueError("the run has no measured variant to chart")
    names = [name for name, _ in measured][::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.6 * len(names) + 2.2))
    medians = [m for _, m in measured][::-1]
    genai = [n.startswith("genai") for n in names]
    start = [0.0] * len(names)
    for key, label, color in STAGES:
        values = [m.get(key) or 0.0 for m in medians]
        # GenAI's TTFT is its text prefill alone: one prefill bar of its ttft_ms
        values = [(m["ttft_ms"] if key == "prefill_ms" else 0.0) if g else v for v, g, m in zip(values, genai, medians)]
        left.barh(names, values, left=start, color=color, label=label)
        start = [s + v for s, v in zip(start, values)]
    for i, (total, m) in enumerate(zip(start, medians)):  # the measured TTFT (the stages leave ~0.5 ms out)
        left.text(total, i, f" {m['ttft_ms']:.1f}", va="center", fontsize=8)
    left.set_xlabel("time to first token, ms (median)")
    left.legend(loc="lower right", fontsize=8)
    rates = [m.get("decode_tokens_per_s") or 0.0 for m in medians]
    right.barh(names, rates, color=["#e6550d" if g else "#31a354" for g in genai])
    for i, rate in enumerate(rates):
        right.text(rate, i, f" {rate:.0f}", va="center", fontsize=8)
    right.set_xlabel("decode tokens/s (median)")
    right.set_yticks([])
    config = doc["config"]
    fig.suptitle(f"{doc['preset']} on {doc['device']} ({doc.get('time', '')[:10]}): {config['new_tokens']} new tokens, "
                 f"{config['rounds']} rounds x {config['runs']} runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a scripts/gpu_speed.py --out JSON")
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default: beside the JSON)")
    args = parser.parse_args(argv)
    out = chart(json.loads(args.json.read_text()), args.out or args.json.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
