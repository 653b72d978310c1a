"""Issue 7's table: pool / prompt-topk / merge at half and quarter budget, each without and with CMAI.

    python scripts/vmtc_cmai_table.py [--checkpoint models/default_model --prompt-mlp models/default_model]
        [--n 2000] [--probe-n 400] [--jobs 2] [--inhibit 0.5] [--primary-ratio 0.5] [--out runs/vmtc-cmai]
    python scripts/vmtc_cmai_table.py --bundle half-merge=B1 --bundle quarter-merge=B2 ...   # bundles as they are

Per row (a bundle, and an inhibit fraction: 0 = CMAI off):
1. accuracy per question family on the test split, exact match (export/train/evaluate.py: questions, summarize,
   markdown_table), the SDK path on ONNX Runtime CPU, `--jobs` processes of one thread each;
2. an instruction-following probe (export/tasks/instructions.py): test-split questions with an answer-form
   instruction appended, scored by exact rules (trained instructions) or form (held-out ones);
3. vision and prefill latency (ms, median of `--latency-runs` requests in this process, all threads; the
   prefill of a CMAI row includes its probe pass and the focus scores).

With --checkpoint the bundles are exported into --out/bundles (FP32; kept and reused: delete to redo),
plus one full-budget bundle as the reference of "keeps >= 95% of full-budget accuracy". It prints the
markdown tables and writes --out/table.json (every row's summaries, probe records and settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdk.bundle import load_bundle  # noqa: E402

from export.train import evaluate  # noqa: E402
from export.tasks import instructions, scenes  # noqa: E402


# The probe's instructions: export/tasks/instructions.py. TRAINED ones were appended to a fraction of stage 2's
# training questions (--instruction-fraction), each with an exact instructed answer; HELD_OUT ones were
# never seen in training and are scored on form alone.
PROBES = instructions.ALL


def probe_examples(n: int, split: str = "test") -> list[tuple[str, scenes.Example]]:
    """n questions per probe, the first of `split` in its families, each with the instruction appended."""
    out = []
    for name, probe in PROBES.items():
        for example in evaluate.questions(split, n, probe.families):
            out.append((name, replace(example, prompt=f"{example.prompt} {probe.text}")))
    return out


def score_probe(records: list[dict]) -> dict:
    """records carry 'probe', 'output', 'answer' -> per probe and overall pass rates (form, exact)."""
    per = {}
    for r in records:
        probe = PROBES[r["probe"]]
        entry = per.setdefault(r["probe"], {"n": 0, "form": 0, "exact": 0})
        entry["n"] += 1
        entry["form"] += bool(probe.form(r["output"]))
        entry["exact"] += bool(probe.exact(r["output"], r["answer"]))
    for entry in per.values():
        entry["form_rate"], entry["exact_rate"] = entry["form"] / entry["n"], entry["exact"] / entry["n"]
    # "overall": the trained instructions (exact answers); held-out ones stay in per_probe only.
    trained = [e for name, e in per.items() if name in instructions.TRAINED]
    n = sum(e["n"] for e in trained)
    return {"per_probe": per, "overall": {"n": n, "form_rate": sum(e["form"] for e in trained) / max(n, 1),
                                          "exact_rate": sum(e["exact"] for e in trained) / max(n, 1)}}


# ----------------------------------------------------------------------------- running a bundle

def answer_all(bundle: Path, examples: list, inhibit: float, jobs: int, max_new_tokens: int) -> list[dict]:
    """evaluate.run_bundle's records (inhibit = CMAI fraction), in order, over `jobs` processes of one thread;
    their per-request ms (taken under that load) are dropped: latency() measures alone."""
    records, _ = evaluate.run_bundle(str(bundle), examples, "cpu", jobs, max_new_tokens, inhibit=inhibit)
    return [{**r, "ms": None} for r in records]


def latency(bundle: Path, examples: list, inhibit: float, runs: int) -> dict:
    """Median vision and prefill ms over `runs` requests of one new token, this process, default threads."""
    import sdk

    os.environ.pop("PIPMM_THREADS", None)
    pipeline = sdk.load(bundle, device="cpu")
    pipeline.generate(examples[0].image, examples[0].prompt, max_new_tokens=1, inhibit=inhibit)  # warm-up
    timings = [pipeline.generate(e.image, e.prompt, max_new_tokens=1, inhibit=inhibit).timings
               for e in (examples * runs)[:runs]]
    return {stage: statistics.median(t[f"{stage}_ms"] for t in timings) for stage in ("vision", "prefill")}


def run_row(label: str, bundle: Path, inhibit: float, examples, probes, args) -> dict:
    start = time.perf_counter()
    manifest = load_bundle(bundle, verify=False).manifest
    records = answer_all(bundle, examples, inhibit, args.jobs, args.max_new_tokens)
    meta = {"source": {"kind": "bundle", "path": str(bundle), "inhibit": inhibit},
            "data": {"split": "test", "n": len(examples)}}
    accuracy = evaluate.summarize(records, manifest, meta)
    answered = answer_all(bundle, [e for _, e in probes], inhibit, args.jobs, args.max_new_tokens)
    probe_records = [{"probe": name, "prompt": r["prompt"], "answer": r["answer"], "output": r["output"]}
                     for (name, _), r in zip(probes, answered)]
    row = {"label": label, "bundle": str(bundle), "inhibit": inhibit,
           "reducer": manifest.visual_tokens.reducer, "budget": manifest.visual_tokens.budget,
           "visual_tokens": manifest.visual_tokens.count, "reducer_options": manifest.vision.reducer_options,
           "cmai": manifest.cmai and manifest.cmai.to_dict(), "accuracy": accuracy, "probe": score_probe(probe_records),
           "probe_records": probe_records, "latency_ms": latency(bundle, examples, inhibit, args.latency_runs)}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(f"  {label}: {100 * accuracy['overall']['accuracy']:.1f}% exact, probe "
          f"{100 * row['probe']['overall']['exact_rate']:.1f}% ({row['seconds']} s)", flush=True)
    return row


# ----------------------------------------------------------------------------- bundles and tables

def checkpoint_positions(checkpoint) -> str:
    """The visual positions a checkpoint's stage 2 trained with (train_config.json; sequence if unsaid)."""
    config = Path(checkpoint) / "train_config.json"
    return (json.loads(config.read_text()).get("visual_positions") if config.is_file() else None) or "sequence"


def export_bundles(args) -> list[tuple[str, Path]]:
    from export.writer import export_bundle
    from export.train.state import assemble_variant, variant_base

    root = Path(args.out) / "bundles"
    # (label, checkpoint, budget, reducer): the checkpoint's rows, then each --variant at its trained setting
    wanted = [("full", args.checkpoint, "full", "pool")] + [(f"{b} {r}", args.checkpoint, b, r)
                                                            for b in args.budgets for r in args.reducers]
    for item in args.variant or []:
        label, _, path = item.rpartition("=")
        trained = json.loads((Path(path) / "train_config.json").read_text())
        base = variant_base(Path(path), default=args.checkpoint)  # models/variants/merge-quarter: r11's
        whole = assemble_variant(base, Path(path), Path(args.out) / "variants" / Path(path).name)
        wanted.append((label or Path(path).name, whole, trained["budget"], trained["reducer"]))
    topk_positions = args.topk_positions if args.topk_positions != "auto" else checkpoint_positions(args.checkpoint)
    out = []
    for label, checkpoint, budget, reducer in wanted:
        positions = topk_positions if reducer == "prompt-topk" and checkpoint == args.checkpoint else None
        path = root / (f"{budget}-{reducer}" + (f"-{positions}" if positions == "patch" else "")
                       + ("" if checkpoint == args.checkpoint else f"-{Path(checkpoint).name}"))
        if not (path / "manifest.json").is_file():
            print(f"export {label} -> {path}", flush=True)
            options = {"primary_ratio": args.primary_ratio} if reducer == "merge" and budget != "full" else None
            export_bundle(checkpoint, path, prompt_mlp=None if args.prompt_mlp is None else checkpoint,
                          no_prompt_mlp=args.prompt_mlp is None, budget=budget, reducer=reducer,
                          reducer_options=options, visual_positions=positions, progress=False, overwrite=True,
                          cmai={"layers": args.cmai_layers})
        out.append((label + (" (patch positions)" if positions == "patch" else ""), path))
    return out


def cmai_cost(args, examples, with_cmai: Path) -> list[dict]:
    """What CMAI costs (checkpoint mode): the half-budget prompt-topk bundle exported without CMAI's input and
    output (as before CMAI), with them and inhibit 0, and with inhibit --inhibit; vision, prefill and per-token
    decode ms (medians over --latency-runs requests of 16 new tokens, this process, all threads)."""
    import sdk
    from export.writer import export_bundle

    plain = with_cmai.parent / f"{with_cmai.name}-no-cmai"
    positions = load_bundle(with_cmai, verify=False).manifest.visual_tokens.positions
    if not (plain / "manifest.json").is_file():
        export_bundle(args.checkpoint, plain, prompt_mlp=args.prompt_mlp, no_prompt_mlp=args.prompt_mlp is None,
                      budget="half", reducer="prompt-topk", visual_positions=positions, progress=False,
                      overwrite=True, cmai={"layers": "none"})
    os.environ.pop("PIPMM_THREADS", None)
    out = []
    for label, path, inhibit in (("no CMAI graph", plain, 0.0), ("CMAI graph, inhibit 0", with_cmai, 0.0),
                                 (f"CMAI graph, inhibit {args.inhibit:g}", with_cmai, args.inhibit)):
        pipeline = sdk.load(path, device="cpu")
        pipeline.generate(examples[0].image, examples[0].prompt, max_new_tokens=2, inhibit=inhibit)  # warm-up
        runs = [pipeline.generate(e.image, e.prompt, max_new_tokens=16, inhibit=inhibit)
                for e in (examples * args.latency_runs)[:args.latency_runs]]
        per_token = [r.timings["decode_ms"] / max(1, len(r.token_ids) - 1) for r in runs if len(r.token_ids) > 1]
        out.append({"label": label, "bundle": str(path), "inhibit": inhibit,
                    "vision_ms": statistics.median(r.timings["vision_ms"] for r in runs),
                    "prefill_ms": statistics.median(r.timings["prefill_ms"] for r in runs),
                    "decode_ms_per_token": statistics.median(per_token) if per_token else None})
    return out


def cost_markdown(cost: list[dict]) -> str:
    lines = ["What CMAI costs (half prompt-topk, CPU, ms, median):", "",
             "| decoder | vision | prefill | decode per token |", "|---|---|---|---|"]
    for c in cost:
        decode = "" if c["decode_ms_per_token"] is None else f"{c['decode_ms_per_token']:.2f}"
        lines.append(f"| {c['label']} | {c['vision_ms']:.1f} | {c['prefill_ms']:.1f} | {decode} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    labelled = [(r["label"] + (f" +CMAI {r['inhibit']:g}" if r["inhibit"] else ""), r["accuracy"]) for r in rows]
    lines = ["Accuracy per family (exact match, %):", "", evaluate.markdown_table(labelled), "",
             "Instruction-following probe (exact: asked form and right content, %; form only in brackets; "
             "'probe' = the trained instructions together; one-word is held out and scored on form), "
             "vision and prefill latency (ms, median, CPU):", ""]
    names = list(PROBES)
    lines.append("| model | tokens | overall acc | " + " | ".join(names) + " | probe | vision ms | prefill ms |")
    lines.append("|" + "---|" * (len(names) + 6))
    for (label, acc), r in zip(labelled, rows):
        per = r["probe"]["per_probe"]
        cells = [f"{100 * per[n]['exact_rate']:.1f} ({100 * per[n]['form_rate']:.0f})" if n in per else ""
                 for n in names]
        lines.append(f"| {label} | {r['visual_tokens']} | {100 * acc['overall']['accuracy']:.1f} | "
                     + " | ".join(cells) + f" | **{100 * r['probe']['overall']['exact_rate']:.1f}** | "
                     f"{r['latency_ms']['vision']:.1f} | {r['latency_ms']['prefill']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "default_model"))
    parser.add_argument("--prompt-mlp", default=str(ROOT / "models" / "default_model"),
                        help="the prompt MLP (PIP-MM); 'none' for a plain LLaVA checkpoint")
    parser.add_argument("--bundle", action="append", default=None, metavar="LABEL=DIR",
                        help="measure these bundles instead of exporting from --checkpoint (repeatable)")
    parser.add_argument("--budgets", nargs="+", default=["half", "quarter"])
    parser.add_argument("--reducers", nargs="+", default=["pool", "prompt-topk", "merge"],
                        choices=["pool", "prompt-topk", "merge"])
    parser.add_argument("--primary-ratio", type=float, default=0.5, help="merge's primary share of the budget")
    parser.add_argument("--cmai-layers", default="auto", help="as pipmm export --cmai-layers")
    parser.add_argument("--topk-positions", default="auto", choices=("auto", "sequence", "patch"),
                        help="visual positions of the prompt-topk rows (auto: as the checkpoint's stage 2 trained)")
    parser.add_argument("--variant", action="append", default=None, metavar="LABEL=DIR",
                        help="also a variant trained from the same stage 0 (export.train.state.split_variant, e.g. "
                             "models/variants/merge-quarter), at its trained budget and reducer (repeatable)")
    parser.add_argument("--inhibit", type=float, default=0.5, help="CMAI rows' fraction of visual tokens masked")
    parser.add_argument("--n", type=int, default=2000, help="accuracy questions (test split)")
    parser.add_argument("--probe-n", type=int, default=None, help="questions per probe (default n / 5)")
    parser.add_argument("--jobs", type=int, default=1, help="processes of one thread each")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="runs/vmtc-cmai")
    args = parser.parse_args(argv)
    if args.n < 1 or args.jobs < 1 or args.latency_runs < 1:
        parser.error("--n, --jobs and --latency-runs must be at least 1")
    if not 0.0 < args.inhibit < 1.0:
        parser.error(f"--inhibit {args.inhibit} must be in (0, 1): the CMAI rows need something to mask")
    args.prompt_mlp = None if args.prompt_mlp == "none" else args.prompt_mlp
    Path(args.out).mkdir(parents=True, exist_ok=True)

    if args.bundle:
        bundles = []
        for item in args.bundle:
            label, _, path = item.rpartition("=")
            bundles.append((label or Path(path).name, Path(path)))
    else:
        bundles = export_bundles(args)
    examples = evaluate.questions("test", args.n)
    probes = probe_examples(args.probe_n or max(1, args.n // 5))
    rows = []
    for label, path in bundles:
        cmai = load_bundle(path, verify=False).manifest.cmai
        for inhibit in (0.0, args.inhibit):
            if inhibit and not cmai:
                print(f"  {label}: no CMAI inputs in this bundle, CMAI row skipped", flush=True)
                continue
            rows.append(run_row(label, path, inhibit, examples, probes, args))
    table = markdown(rows)
    cost = None
    if not args.bundle and "half" in args.budgets and "prompt-topk" in args.reducers:
        cost = cmai_cost(args, examples, next(p for label, p in bundles if label.startswith("half prompt-topk")))
        table += "\n\n" + cost_markdown(cost)
    print(table)
    settings = {k: v for k, v in vars(args).items()}
    result = {"command": " ".join(["python", "scripts/vmtc_cmai_table.py", *(argv or sys.argv[1:])]),
              "settings": settings, "probes": {k: {"instruction": p.text, "families": p.families, "trained": k in instructions.TRAINED, "note": p.note}
                                               for k, p in PROBES.items()},
              "rows": rows, "cmai_cost": cost, "markdown": table}
    (Path(args.out) / "table.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {Path(args.out) / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
