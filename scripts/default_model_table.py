"""The default model's evaluation table (docs/default-model.md), from the checkpoints in the repository.

    python scripts/default_model_table.py [--n 2000] [--jobs 2] [--out runs/table]

1. Assembles the plain-LLaVA baseline: its vision tower is the default model's own (both were
   frozen after stage 0), the rest is models/default_model/plain-baseline/without_vision.safetensors.
2. Exports one FP32 bundle per row: {plain, PIP-MM} x {full, half, quarter} x {pool, prompt-topk}
   (at full budget the reducer does nothing, so full has one row per model), plus PIP-MM's
   prompt-topk rows with --visual-positions patch.
3. Runs `pipmm eval BUNDLE --split test --n N --json ...` on each (the SDK path, ONNX Runtime CPU)
   and prints the markdown table of `pipmm eval --table`.

Everything lands in --out; bundles and results already there are reused (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default_model"
PLAIN_PARTIAL = DEFAULT_MODEL / "plain-baseline"
ROWS = [  # (name, model, budget, reducer)
    ("plain full", "plain", "full", "pool"),
    ("plain half pool", "plain", "half", "pool"),
    ("plain half prompt-topk", "plain", "half", "prompt-topk"),
    ("plain quarter pool", "plain", "quarter", "pool"),
    ("plain quarter prompt-topk", "plain", "quarter", "prompt-topk"),
    ("PIP-MM full", "pipmm", "full", "pool"),
    ("PIP-MM half pool", "pipmm", "half", "pool"),
    ("PIP-MM half prompt-topk", "pipmm", "half", "prompt-topk"),
    ("PIP-MM quarter pool", "pipmm", "quarter", "pool"),
    ("PIP-MM quarter prompt-topk", "pipmm", "quarter", "prompt-topk"),
    ("PIP-MM half prompt-topk patch-positions", "pipmm", "half", "prompt-topk"),
    ("PIP-MM quarter prompt-topk patch-positions", "pipmm", "quarter", "prompt-topk"),
]


def assemble_plain(out: Path) -> Path:
    """The plain baseline as a whole checkpoint directory: default model's vision tower + its own rest."""
    from export.train.state import assemble_variant

    return assemble_variant(DEFAULT_MODEL, PLAIN_PARTIAL, out)


def pipmm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdk.cli", *args], check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="test questions per row")
    parser.add_argument("--jobs", type=int, default=2, help="eval processes per row")
    parser.add_argument("--out", default=str(ROOT / "runs" / "table"))
    parser.add_argument("--rows", nargs="+", default=None, help="only these row names")
    args = parser.parse_args()
    out = Path(args.out)
    plain = assemble_plain(out / "ckpt-plain")
    results = []
    for name, model, budget, reducer in ROWS:
        if args.rows and name not in args.rows:
            continue
        slug = name.lower().replace(" ", "-")
        bundle, result = out / "bundles" / slug, out / f"{slug}.json"
        if not (bundle / "manifest.json").is_file():
            source = ["--prompt-mlp", str(DEFAULT_MODEL)] if model == "pipmm" else ["--no-prompt-mlp"]
            ckpt = str(DEFAULT_MODEL if model == "pipmm" else plain)
            positions = ["--visual-positions", "patch"] if name.endswith("patch-positions") else []
            pipmm("export", ckpt, *source, "--visual-tokens", budget, "--reducer", reducer, *positions,
                  "--out", str(bundle), "--overwrite", "--quiet")
        if not result.is_file() or json.loads(result.read_text())["overall"]["n"] != args.n:
            pipmm("eval", str(bundle), "--split", "test", "--n", str(args.n), "--jobs", str(args.jobs), "--quiet",
                  "--json", str(result))
        results.append(f"{name}={result}")
    pipmm("eval", "--table", *results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
