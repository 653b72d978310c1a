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
Conditions: the shifted test split (export/tvp/domain.py; the first N questions) without a prompt, with
`zero-frame` and with each --prompt; the clean test split (the same scenes unshifted) without a prompt, with
`zero-frame` and with the first --prompt. `zero-frame` is the first prompt's geometry with delta = 0 (the image
shrunk and zero-padded, nothing learned): the frame's cost alone, so that prompt - zero-frame is what training
added (--no-zero-frame leaves it out).
Bundles and per-condition results already in --out are reused (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import os
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


def stamp_of(checkpoint: Path, flags: list[str]) -> dict:
    """What a bundle was exported from: a bundle whose stamp differs is exported again (a retrained checkpoint)."""
    from export.model.checkpoint import weights_sha256

    return {"checkpoint": str(checkpoint), "model_sha256": weights_sha256(checkpoint), "flags": flags}


def export_all(found: dict[str, Path], names: list[str], out: Path, jobs: int) -> dict[str, tuple[Path, str]]:
    """Each target's bundle in out/bundles/NAME, the missing or stale ones exported concurrently (<= jobs at once,
    the cores shared between them) -> name: (bundle, the sha256 of the checkpoint it was exported from)."""
    bundles, todo = {}, []
    for name in names:
        flags = with_override(export_flags(found[name]), TARGETS[name][1])
        bundle, stamp = out / "bundles" / name, stamp_of(found[name], flags)
        bundles[name] = bundle, stamp["model_sha256"]
        stamp_file = out / "bundles" / f"{name}.stamp.json"
        if not ((bundle / "manifest.json").is_file() and stamp_file.is_file()
                and json.loads(stamp_file.read_text()) == stamp):
            todo.append((name, [sys.executable, "-m", "sdk.cli", "export", str(found[name]), *flags, "--out",
                                str(bundle), "--overwrite", "--quiet"], stamp_file, stamp))
    threads = str(max(1, jobs // max(1, len(todo))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    running: list = []

    def finish() -> None:
        (name, _, stamp_file, stamp), proc = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"export of {name} failed: see {out / 'bundles' / (name + '.export.log')}")
        stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
        print(f"exported {name}", flush=True)

    for item in todo:
        while len(running) >= max(1, jobs):
            finish()
        log = open(out / "bundles" / f"{item[0]}.export.log", "w")
        running.append((item, subprocess.Popen(item[1], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
    while running:
        finish()
    return bundles


ZERO_FRAME = "zero-frame"


def zero_frame(prompt_dir, out: Path) -> Path:
    """out/zero-frame: a prompt with the geometry of `prompt_dir` and delta = 0 (rewritten when it differs)."""
    import torch

    from sdk.visual_prompt import VisualPrompt

    from export.tvp.train import save_prompt

    prompt = VisualPrompt.load(prompt_dir)
    settings = {"method": "zero-frame reference: the geometry of a trained prompt with delta = 0",
                "geometry_of": str(prompt_dir), "frame": prompt.frame, "geometry": prompt.geometry,
                "image_size": prompt.image_size, "inner_size": prompt.inner_size}
    target = out / ZERO_FRAME
    config = target / "visual_prompt.json"
    if not (config.is_file() and json.loads(config.read_text()).get("settings") == settings):
        target.mkdir(parents=True, exist_ok=True)
        save_prompt(target, torch.zeros(3, prompt.image_size, prompt.image_size), settings, {"completed_steps": 0})
    return target


def prompt_sha(prompt) -> str | None:
    return None if prompt is None else json.loads((Path(prompt) / "visual_prompt.json").read_text())["sha256"]


# one eval worker's state: pipelines by (bundle, prompt), the latest few; questions by (split, clean, n)
_WORKER: dict = {"pipelines": {}, "questions": {}}


def _worker_init() -> None:
    os.environ["PIPMM_THREADS"] = "1"  # one thread per process: many small requests scale by processes


def _worker_run(job) -> list[dict]:
    """A chunk [start, stop) of one condition's questions through sdk.load(bundle, visual_prompt=...).generate."""
    import sdk
    from export.train.evaluate import run_pipeline
    from export.tvp.domain import questions

    bundle, prompt, split, clean, n, start, stop = job
    pipelines = _WORKER["pipelines"]
    if (bundle, prompt) not in pipelines:
        if len(pipelines) >= 2:  # conditions run one after another: keep the current and the next
            pipelines.pop(next(iter(pipelines)))
        pipelines[bundle, prompt] = sdk.load(bundle, device="cpu", visual_prompt=False if prompt is None else prompt)
    key = (split, clean, n)
    if key not in _WORKER["questions"]:
        _WORKER["questions"][key] = questions(split, n, clean=clean)
    return run_pipeline(pipelines[bundle, prompt], _WORKER["questions"][key][start:stop])


def evaluate_all(conditions: list[dict], n: int, jobs: int, split: str) -> dict[str, dict]:
    """Every condition {key, bundle, stamp, prompt, clean, path} scored on the first n questions: one pool of `jobs`
    processes for all of them, chunks in condition order, each condition's JSON written as soon as it is complete
    (a killed run keeps the finished ones). A saved result is reused when its n, bundle and prompt match."""
    import multiprocessing as mp

    from sdk.bundle import load_bundle

    from export.train.evaluate import summarize

    results, todo = {}, []
    for c in conditions:
        meta = {"source": {"kind": "bundle", "path": str(c["bundle"]), "visual_prompt": c["prompt"],
                           "visual_prompt_sha256": prompt_sha(c["prompt"]),
                           "bundle_stamp": c["stamp"]},
                "data": {"split": f"{'clean' if c['clean'] else 'shifted'} {split}", "n": n}}
        path = Path(c["path"])
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["overall"]["n"] == n and all(saved["source"].get(k) == meta["source"][k]
                                                  for k in ("visual_prompt_sha256", "bundle_stamp")):
                results[c["key"]] = saved
                continue
        todo.append((c, meta))
    chunk = max(1, min(32, n // (2 * max(1, jobs))))
    jobs_of = [[(str(c["bundle"]), c["prompt"], split, c["clean"], n, i, min(n, i + chunk)) for i in range(0, n, chunk)]
               for c, _ in todo]
    work = [(k, job) for k, jobs_k in enumerate(jobs_of) for job in jobs_k]
    pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init) if jobs > 1 else None
    stream = pool.imap(_run_indexed, work) if pool else map(_run_indexed, work)
    if pool is None:
        _worker_init()
    parts: dict[int, list] = {}
    try:
        for k, records in stream:
            parts.setdefault(k, []).append(records)
            if len(parts[k]) == len(jobs_of[k]):
                c, meta = todo[k]
                result = summarize([r for part in parts.pop(k) for r in part],
                                   load_bundle(str(c["bundle"]), verify=False).manifest, meta)
                Path(c["path"]).parent.mkdir(parents=True, exist_ok=True)
                Path(c["path"]).write_text(json.dumps(result, indent=1) + "\n")
                results[c["key"]] = result
                print(f"{c['key']}: {100 * result['overall']['accuracy']:.1f}% of {n}", flush=True)
    except BaseException:  # stopped (the phase's time budget) or failed: drop the queued chunks
        if pool:
            pool.terminate()
        raise
    if pool:
        pool.close()
        pool.join()
    return results


def _run_indexed(item):
    k, job = item
    return k, _worker_run(job)


def markdown(table: dict, shifted: list[str], clean: list[str]) -> str:
    """One row per target: accuracy without a prompt, then each condition (its difference to none)."""
    head = (["target", "shifted: none"] + [f"shifted: {p}" for p in shifted] + ["clean: none"]
            + [f"clean: {p}" for p in clean])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cost = row.get("finetune")
        what = row["what"] + (f"; {cost['trainable_parameters']:,} parameters, {cost['seconds']:.0f} s on "
                              f"{cost['device']}" if cost else "")
        cells = [f"{name} ({what})"]
        for kind, conditions in (("shifted", shifted), ("clean", clean)):
            base = row[kind]["none"]
            cells += [f"{base:.1f}"] + [f"{row[kind][p]:.1f} ({row[kind][p] - base:+.1f})" if p in row[kind]
                                        else "-" for p in conditions]
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
    parser.add_argument("--no-zero-frame", action="store_true", help="leave out the zero-frame reference")
    args = parser.parse_args()
    prompts = dict(item.split("=", 1) for item in args.prompt)
    out = Path(args.out)
    first = next(iter(prompts))
    references = {} if args.no_zero_frame else {ZERO_FRAME: str(zero_frame(prompts[first], out))}
    shifted, clean = {**references, **prompts}, {**references, first: prompts[first]}
    found = checkpoints(args, out)
    for name in args.targets:
        if name not in found:
            print(f"skipping {name}: no checkpoint (see --plain / --independent / --finetuned)", flush=True)
    names = [name for name in args.targets if name in found]
    bundles = export_all(found, names, out, args.jobs)
    conditions = []
    for name in names:
        for is_clean, chosen in ((False, shifted), (True, clean)):
            chosen = {} if name == "source-ft" else chosen  # the fine-tune is the alternative to a prompt
            for condition, prompt in [("none", None), *chosen.items()]:
                kind = "clean" if is_clean else "shifted"
                conditions.append({"key": (name, kind, condition), "bundle": bundles[name][0],
                                   "stamp": bundles[name][1], "prompt": prompt, "clean": is_clean,
                                   "path": out / "results" / f"{name}-{kind}-{condition}.json"})
    results = evaluate_all(conditions, args.n, args.jobs, args.split)
    table = {}
    for name in names:
        row = {"what": TARGETS[name][0], "checkpoint": str(found[name]), "shifted": {}, "clean": {}, "per_family": {}}
        trained = json.loads((found[name] / "train_config.json").read_text())
        if "tvp_finetune" in trained:
            row["finetune"] = {k: trained["tvp_finetune"][k] for k in ("trainable_parameters", "seconds", "steps",
                                                                       "device")}
        for (target, kind, condition), result in results.items():
            if target == name:
                row[kind][condition] = 100 * result["overall"]["accuracy"]
                row["per_family"][f"{kind} {condition}"] = {f: round(100 * v["accuracy"], 1)
                                                            for f, v in result["per_family"].items()}
        table[name] = row
    text = markdown(table, list(shifted), list(clean))
    print(text)
    if args.json:
        from sdk.visual_prompt import VisualPrompt

        settings = {name: VisualPrompt.load(path).settings for name, path in shifted.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "n": args.n, "split": args.split,
                                               "table": table, "prompts": settings, "markdown": text}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
