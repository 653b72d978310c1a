"""TVP's transfer table (docs/tvp.md): every target bundle with and without each prompt, on the shifted and the
clean test split, through the SDK (sdk.load(bundle, visual_prompt=...).generate, export.train.evaluate's scoring).

    python scripts/tvp_table.py --prompt tvp=runs/tvp/prompt --prompt no-fca=runs/tvp/prompt-nofca \\
        --prompt no-tse=runs/tvp/prompt-notse [--independent runs/tvp/seed1] [--n 2000] [--jobs 14] \\
        [--out runs/tvp/table] [--json docs/tvp-results/table.json]

Targets (TARGETS; none of them but `source` saw the prompt's training):
  source   the source checkpoint as it ships (--source, default models/default_model: PIP-MM, half, prompt-topk,
           patch positions), exported FP32
  int8     the same at int8 (pipmm export --precision int8)
  quarter  the same at a quarter of the visual tokens
  plain    the plain-LLaVA baseline (models/default_model/plain-baseline + the source's vision tower)
  seed1    an independently trained checkpoint (--independent; another seed from stage 0, scripts/gpu_tvp.sh)
  source-ft  the per-model alternative: the source with its projector fine-tuned on the prompt's images
           (--finetuned, pipmm tvp finetune), scored without prompts; its time and parameters are in the JSON
Conditions: the shifted test split (export/tvp/domain.py; the first N questions) without a prompt and with each
--prompt; the clean test split (the same scenes unshifted) without a prompt and with the first --prompt.
Bundles and per-condition results already in --out are reused (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "models" / "default_model"
PLAIN_PARTIAL = DEFAULT_MODEL / "plain-baseline"
TARGETS = {  # name -> (what it is, how its bundle differs from the checkpoint's own export)
    "source": ("the prompt's source model", []),
    "int8": ("the source at int8", ["--precision", "int8"]),
    "quarter": ("the source at a quarter budget", ["--visual-tokens", "quarter"]),
    "plain": ("plain-LLaVA baseline (same stage 0)", []),
    "seed1": ("independently trained (another seed from stage 0)", []),
    "source-ft": ("the source, projector fine-tuned on the prompt's images (no prompt)", []),
}


def pipmm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdk.cli", *map(str, args)], check=True, cwd=ROOT)


def export_flags(checkpoint: Path) -> list[str]:
    """pipmm export's flags for a checkpoint as `pipmm train` recorded it (PIP-MM or plain, budget, positions)."""
    trained = json.loads((checkpoint / "train_config.json").read_text())
    pipmm_model = trained.get("pipmm") and (checkpoint / "prompt_mlp.json").is_file()
    flags = ["--prompt-mlp", str(checkpoint)] if pipmm_model else ["--no-prompt-mlp"]
    flags += ["--visual-tokens", str(trained.get("budget", "full")), "--reducer", trained.get("reducer", "pool")]
    if trained.get("visual_positions") == "patch":
        flags += ["--visual-positions", "patch"]
    return flags


def with_override(flags: list[str], extra: list[str]) -> list[str]:
    out = list(flags)
    for key, value in zip(extra[::2], extra[1::2]):
        if key in out:
            out[out.index(key) + 1] = value
        else:
            out += [key, value]
    return out


def checkpoints(args, out: Path) -> dict[str, Path]:
    from export.train.state import assemble_variant

    source = Path(args.source)
    found = {"source": source, "int8": source, "quarter": source}
    if (Path(args.plain) / "without_vision.safetensors").is_file():
        found["plain"] = assemble_variant(source, Path(args.plain), out / "ckpt-plain")
    if args.independent:
        found["seed1"] = Path(args.independent)
    if args.finetuned:
        found["source-ft"] = Path(args.finetuned)
    return found


def evaluate(bundle: Path, split: str, clean: bool, prompt, n: int, jobs: int, path: Path) -> dict:
    from export.train.evaluate import run_bundle, summarize
    from export.tvp.domain import questions

    if path.is_file() and json.loads(path.read_text())["overall"]["n"] == n:
        return json.loads(path.read_text())
    examples = questions(split, n, clean=clean)
    records, manifest = run_bundle(str(bundle), examples, device="cpu", jobs=jobs,
                                   visual_prompt=False if prompt is None else str(prompt))
    result = summarize(records, manifest, {"source": {"kind": "bundle", "path": str(bundle), "visual_prompt":
                                                      None if prompt is None else str(prompt)},
                                           "data": {"split": f"{'clean' if clean else 'shifted'} {split}", "n": n}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown(table: dict, prompts: list[str]) -> str:
    first = prompts[0]
    head = (["target", "shifted: none"] + [f"shifted: {p}" for p in prompts] + ["clean: none", f"clean: {first}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        base, clean = row["shifted"]["none"], row["clean"]["none"]
        cost = row.get("finetune")
        what = row["what"] + (f"; {cost['trainable_parameters']:,} parameters, {cost['seconds']:.0f} s on "
                              f"{cost['device']}" if cost else "")
        cells = [f"{name} ({what})", f"{base:.1f}"]
        cells += [f"{row['shifted'][p]:.1f} ({row['shifted'][p] - base:+.1f})" if p in row["shifted"] else "-"
                  for p in prompts]
        cells += [f"{clean:.1f}", f"{row['clean'][first]:.1f} ({row['clean'][first] - clean:+.1f})"
                  if first in row["clean"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", required=True, metavar="NAME=DIR",
                        help="a prompt directory (repeatable; the first is also scored on the clean split)")
    parser.add_argument("--source", default=str(DEFAULT_MODEL), help="the prompt's source checkpoint")
    parser.add_argument("--plain", default=str(PLAIN_PARTIAL), help="the plain baseline (without_vision files)")
    parser.add_argument("--independent", default=None, help="an independently trained checkpoint (target seed1)")
    parser.add_argument("--finetuned", default=None, help="the source with a fine-tuned projector (target source-ft)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--n", type=int, default=2000, help="questions per split and condition")
    parser.add_argument("--jobs", type=int, default=2, help="eval processes (one thread each)")
    parser.add_argument("--split", default="test", help="shifted split to score (export/tvp/domain.py)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "tvp" / "table"))
    parser.add_argument("--json", default=None, help="write the table (accuracies, settings) here")
    args = parser.parse_args()
    prompts = dict(item.split("=", 1) for item in args.prompt)
    out = Path(args.out)
    found = checkpoints(args, out)
    table = {}
    for name in args.targets:
        if name not in found:
            print(f"skipping {name}: no checkpoint (see --plain / --independent)", flush=True)
            continue
        bundle = out / "bundles" / name
        if not (bundle / "manifest.json").is_file():
            pipmm("export", found[name], *with_override(export_flags(found[name]), TARGETS[name][1]),
                  "--out", bundle, "--overwrite", "--quiet")
        row = {"what": TARGETS[name][0], "checkpoint": str(found[name]), "shifted": {}, "clean": {}, "per_family": {}}
        trained = json.loads((found[name] / "train_config.json").read_text())
        if "tvp_finetune" in trained:
            row["finetune"] = {k: trained["tvp_finetune"][k] for k in ("trainable_parameters", "seconds", "steps",
                                                                       "device")}
        tried = {} if name == "source-ft" else prompts  # the fine-tune is the alternative to a prompt
        for condition, prompt in [("none", None), *tried.items()]:
            result = evaluate(bundle, args.split, False, prompt, args.n, args.jobs,
                              out / "results" / f"{name}-shifted-{condition}.json")
            row["shifted"][condition] = 100 * result["overall"]["accuracy"]
            row["per_family"][f"shifted {condition}"] = {f: round(100 * v["accuracy"], 1)
                                                         for f, v in result["per_family"].items()}
        for condition, prompt in [("none", None), *list(tried.items())[:1]]:
            result = evaluate(bundle, args.split, True, prompt, args.n, args.jobs,
                              out / "results" / f"{name}-clean-{condition}.json")
            row["clean"][condition] = 100 * result["overall"]["accuracy"]
            row["per_family"][f"clean {condition}"] = {f: round(100 * v["accuracy"], 1)
                                                       for f, v in result["per_family"].items()}
        table[name] = row
        print(markdown({name: row}, list(prompts)).splitlines()[-1], flush=True)
    text = markdown(table, list(prompts))
    print(text)
    if args.json:
        from sdk.visual_prompt import VisualPrompt

        settings = {name: VisualPrompt.load(path).settings for name, path in prompts.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "n": args.n, "split": args.split,
                                               "table": table, "prompts": settings, "markdown": text}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
