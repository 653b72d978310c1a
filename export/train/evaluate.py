"""`pipmm eval`: exact-match accuracy per question family on generated scenes, and latency.

    pipmm eval BUNDLE [--split test|phrasing|style|classic|val] [--n 2000] [--families color shape] [--json out.json]
    pipmm eval --checkpoint DIR [--prompt-mlp DIR] --budget half --reducer pool [--device cuda]
    pipmm eval --checkpoint DIR ... --batch-size 256          # batched greedy decoding in torch (GPU)
    pipmm eval --table full.json half.json ...                # markdown table of saved results

A bundle runs through the SDK (sdk.load(bundle).generate), so exported and quantized variants are
measured the same way; --checkpoint runs the PyTorch reference (export.reference, same Pipeline
interface). Questions are the first N of scenes.iter_examples(split) (one per family and scene,
in scene order), so every run with the same --split/--n/--families scores the same questions.
An answer is correct when the generated text equals the expected one after normalize(). A fraction
of the questions (--instruction-fraction, default 0.2 on test/phrasing/style) carries an answer-form
instruction (export/tasks/instructions.py; held-out phrasings on the phrasing split): those count
only when the output equals the instructed answer exactly (case too), and the result's "instructed"
block reports their exact rate per instruction.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from sdk.bundle import load_bundle
from sdk.errors import PipmmError
from sdk.manifest import Manifest

from export.tasks import instructions, scenes
from export.train import evaluate_frames
from export.tasks.answers import normalize
from export.train.progress import progress as progress_bar

MISTAKES_KEPT = 20


class EvalError(PipmmError):
    """An eval argument does not fit (no bundle or checkpoint, bad family...)."""


DEFAULT_INSTRUCTION_FRACTION = {"test": 0.2, "phrasing": 0.2, "style": 0.2}  # else 0


def questions(split: str = "test", n: int = 2000, families=None, seed_offset: int = 0,
              size: int = 224, instruction_fraction: float = 0.0) -> list:
    """The first n examples of `split` (scenes.Example: image, prompt, answer, family, scene_seed); a fraction
    gets an answer-form instruction from the scene's own stream [seed, 2] (the others are the same for any
    fraction)."""
    import numpy as np

    out, rngs = [], {}
    phrasing = scenes.SPLITS[split].instruction_phrasing
    for example in scenes.iter_examples(split, max(1, 4 * n), size=size, families=families, seed_offset=seed_offset):
        if instruction_fraction > 0:
            rng = rngs.setdefault(example.scene_seed, np.random.Generator(np.random.PCG64([example.scene_seed, 2])))
            q = scenes.Question(example.family, example.prompt, example.answer)
            q = instructions.maybe_instruct([q], rng, instruction_fraction, phrasing)[0]
            example = scenes.Example(example.image, q.prompt, q.answer, example.family, example.scene_seed)
        out.append(example)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- runners

def run_pipeline(pipeline, examples, max_new_tokens: int = 64, progress: bool = False,
                 inhibit: float | None = None) -> list[dict]:
    """One generate() per question, as a user would call it: [{family, prompt, answer, output, ms}]
    (inhibit: CMAI's fraction, sdk/cmai.py; None = off)."""
    records = []
    iterator = progress_bar(examples, progress)
    for ex in iterator:
        result = pipeline.generate(ex.image, ex.prompt, max_new_tokens=max_new_tokens, inhibit=inhibit)
        records.append({"family": ex.family, "prompt": ex.prompt, "answer": ex.answer, "output": result.text,
                        "ms": result.timings.get("total_ms")})
    return records


_WORKER = {}


def _worker_init(bundle: str, device: str, visual_prompt=None):
    os.environ["PIPMM_THREADS"] = "1"  # one thread per process: many small requests scale by processes
    import sdk

    _WORKER["pipeline"] = sdk.load(bundle, device=device, visual_prompt=visual_prompt)


def _worker_run(job):
    from export.tasks.scenes import Example
    from PIL import Image

    items, max_new_tokens, inhibit = job
    examples = [Example(Image.fromarray(a), p, ans, f, s) for a, p, ans, f, s in items]
    return run_pipeline(_WORKER["pipeline"], examples, max_new_tokens, inhibit=inhibit)


def run_bundle(bundle: str, examples, device: str = "auto", jobs: int = 1, max_new_tokens: int = 64,
               progress: bool = False, inhibit: float | None = None,
               visual_prompt=None) -> tuple[list[dict], Manifest]:
    """visual_prompt: as sdk.load's (a TVP prompt directory, False for none, None for the bundle's own)."""
    import numpy as np

    import sdk

    if jobs <= 1:
        pipeline = sdk.load(bundle, device=device, visual_prompt=visual_prompt)
        return run_pipeline(pipeline, examples, max_new_tokens, progress, inhibit), pipeline.manifest
    import multiprocessing as mp

    manifest = load_bundle(bundle, verify=False).manifest
    chunk = max(1, min(32, len(examples) // (4 * jobs) or 1))
    work = [([(np.asarray(e.image), e.prompt, e.answer, e.family, e.scene_seed) for e in examples[i:i + chunk]],
             max_new_tokens, inhibit) for i in range(0, len(examples), chunk)]
    records = []
    with mp.get_context("spawn").Pool(jobs, initializer=_worker_init,
                                     initargs=(str(bundle), device, visual_prompt)) as pool:
        for part in progress_bar(pool.imap(_worker_run, work), progress, total=len(work)):
            records += part
    return records, manifest


def torch_pipeline(checkpoint, prompt_mlp=None, budget="full", reducer="pool", device: str = "cpu",
                   visual_positions: str | None = None):
    """export.reference's Pipeline, on `device`."""
    from sdk.pipeline import Pipeline

    from export.writer import build_manifest, build_modules
    from export.model.checkpoint import load_checkpoint
    from export.model.prompt import PromptMLP
    from export.reference import TorchBackend

    ckpt = load_checkpoint(checkpoint)
    mlp = PromptMLP.load(prompt_mlp).eval() if prompt_mlp else None
    modules = build_modules(ckpt, mlp, budget=budget, reducer=reducer)
    for module in modules.values():
        module.to(device)
    manifest = build_manifest(ckpt, modules, mlp, visual_positions=visual_positions)
    return Pipeline(manifest, ckpt.tokenizer_file, TorchBackend(modules, manifest.model, device=device),
                    source=f"torch:{checkpoint}")


def run_batched(checkpoint, examples, prompt_mlp=None, budget="full", reducer="pool", device: str = "cpu",
                visual_positions: str | None = None,
                batch_size: int = 256, max_new_tokens: int = 64, progress: bool = False) -> tuple[list[dict], Manifest]:
    """Batched greedy decoding in torch (export.train.model.greedy_generate): same answers as the
    Pipeline up to float rounding, many times faster on a GPU. No per-request latency."""
    import numpy as np
    import torch

    from sdk.preprocess import preprocess

    from export.train.data import encode_example, text_tensors
    from export.train.model import greedy_generate, make_vision

    pipeline = torch_pipeline(checkpoint, prompt_mlp, budget, reducer, "cpu", visual_positions)  # manifest, tokenizer
    patch = pipeline.visual_positions == "patch"
    manifest = pipeline.manifest
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True,
                                                          attn_implementation="sdpa").to(device).eval()
    mlp = None
    if prompt_mlp:
        from export.model.prompt import PromptMLP

        mlp = PromptMLP.load(prompt_mlp).to(device).eval()
    vision = make_vision(model, budget, reducer, mlp).to(device)
    prompter = pipeline.prompter  # K image slots of this budget, the SDK's own tokenization
    pad = manifest.special_tokens.pad
    records = []
    for first in progress_bar(range(0, len(examples), batch_size), progress):
        chunk = examples[first:first + batch_size]
        seqs = [encode_example(prompter, e.prompt, e.answer) for e in chunk]
        batch = {
            "pixel_values": torch.from_numpy(np.concatenate([preprocess(e.image, pipeline.preprocessing)
                                                             for e in chunk])).to(device),
            **{name: tensor.to(device) for name, tensor in text_tensors(seqs, pad).items()},
            "scene_index": torch.arange(len(chunk), device=device),
        }
        outputs = greedy_generate(model, vision, batch, max_new_tokens, patch_positions=patch)
        records += [{"family": e.family, "prompt": e.prompt, "answer": e.answer, "output": prompter.decode(o),
                     "ms": None} for e, o in zip(chunk, outputs)]
    return records, manifest


# ----------------------------------------------------------------------------- scoring

def summarize(records: list[dict], manifest: Manifest, meta: dict) -> dict:
    per_family, instructed = {}, {}
    for r in records:
        name = instructions.instruction_of(r["prompt"])
        if name:  # instructed: the exact instructed answer, case included
            r["correct"] = instructions.strip_output(r["output"]) == r["answer"]
            i = instructed.setdefault(name, {"n": 0, "exact": 0})
            i["n"] += 1
            i["exact"] += r["correct"]
        else:
            r["correct"] = normalize(r["output"]) == normalize(r["answer"])
        f = per_family.setdefault(r["family"], {"n": 0, "correct": 0})
        f["n"] += 1
        f["correct"] += r["correct"]
    for f in per_family.values():
        f["accuracy"] = f["correct"] / f["n"]
    order = [f for f in scenes.FAMILIES if f in per_family]
    n, correct = len(records), sum(r["correct"] for r in records)
    times = [r["ms"] for r in records if r["ms"] is not None]
    visual = manifest.visual_tokens
    return {
        "source": {**meta.get("source", {}), "pipmm": manifest.model.pipmm,
                   "budget": visual.budget, "reducer": visual.reducer, "visual_tokens": visual.count},
        "data": meta.get("data", {}),
        "per_family": {f: per_family[f] for f in order},
        "overall": {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0},
        "instructed": None if not instructed else {
            "n": sum(i["n"] for i in instructed.values()), "exact": sum(i["exact"] for i in instructed.values()),
            "rate": sum(i["exact"] for i in instructed.values()) / sum(i["n"] for i in instructed.values()),
            "per_instruction": {k: {**v, "rate": v["exact"] / v["n"]} for k, v in sorted(instructed.items())}},
        "latency_ms": None if not times else {"median": statistics.median(times), "mean": statistics.fmean(times),
                                              "p90": sorted(times)[int(0.9 * (len(times) - 1))]},
        "seconds": meta.get("seconds"),
        "mistakes": [{k: r[k] for k in ("family", "prompt", "answer", "output")}
                     for r in records if not r["correct"]][:MISTAKES_KEPT],
    }


def format_table(result: dict) -> str:
    lines = [f"{'family':<10} {'n':>6} {'exact match':>12}"]
    for family, f in result["per_family"].items():
        lines.append(f"{family:<10} {f['n']:>6} {100 * f['accuracy']:>11.1f}%")
    o = result["overall"]
    lines.append(f"{'overall':<10} {o['n']:>6} {100 * o['accuracy']:>11.1f}%")
    if result.get("instructed"):
        i = result["instructed"]
        lines.append(f"{'instructed':<10} {i['n']:>6} {100 * i['rate']:>11.1f}%  (exact, of the questions above)")
    if result["latency_ms"]:
        lat = result["latency_ms"]
        lines.append(f"latency: median {lat['median']:.1f} ms, p90 {lat['p90']:.1f} ms per request")
    return "\n".join(lines)


def markdown_table(results: list[tuple[str, dict]]) -> str:
    """Rows = labelled results, columns = families + overall (exact match, %)."""
    families = [f for f in scenes.FAMILIES if any(f in r["per_family"] for _, r in results)]
    head = "| model | tokens | " + " | ".join(families) + " | overall |"
    lines = [head, "|" + "---|" * (len(families) + 3)]
    for label, r in results:
        cells = [f"{100 * r['per_family'][f]['accuracy']:.1f}" if f in r["per_family"] else "" for f in families]
        lines.append(f"| {label} | {r['source'].get('visual_tokens')} | " + " | ".join(cells)
                     + f" | **{100 * r['overall']['accuracy']:.1f}** |")
    return "\n".join(lines)



# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the embedded one)")
    parser.add_argument("--checkpoint", default=None, help="evaluate a checkpoint through the PyTorch reference")
    parser.add_argument("--prompt-mlp", default=None, help="with --checkpoint: the prompt MLP (PIP-MM)")
    parser.add_argument("--budget", default="full", help="with --checkpoint: full, half, quarter or K")
    parser.add_argument("--reducer", default="pool", choices=("pool", "prompt-topk", "merge"), help="with --checkpoint")
    parser.add_argument("--batch-size", type=int, default=0, help="with --checkpoint: batched greedy decoding")
    parser.add_argument("--visual-positions", default=None, choices=("sequence", "patch"),
                        help="with --checkpoint: decoder positions of the kept visual tokens (as pipmm export)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--split", default="test", choices=scenes.EVAL_SPLITS,
                        help="test (train styles and phrasings), phrasing (held-out phrasings), style (held-out "
                             "styles), classic (the original test split), val")
    parser.add_argument("--instruction-fraction", type=float, default=None, metavar="F",
                        help="fraction of questions with an answer-form instruction (default 0.2 on "
                             "test/phrasing/style, else 0)")
    parser.add_argument("--n", type=int, default=2000, help="number of questions")
    parser.add_argument("--families", nargs="+", default=None, choices=scenes.FAMILIES,
                        help="question families (default: all the split asks)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first scene index of the split")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--visual-prompt", default=None, metavar="DIR",
                        help="bundle: frame every image with this TVP prompt instead of the bundle's own ('none': "
                             "without it; docs/tvp.md)")
    parser.add_argument("--jobs", type=int, default=1, help="bundle: parallel processes (1 thread each)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the result (with mistakes) as JSON")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="print a markdown table of saved results (LABEL=FILE or FILE) and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate_frames.add_arguments(parser)


def _device(name: str) -> str:
    if name != "auto":
        return name
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run(args) -> int:
    if args.table:
        rows = []
        for item in args.table:
            label, _, file = item.rpartition("=")
            result = json.loads(Path(file).read_text())
            rows.append((label or Path(file).stem, result))
        print(markdown_table(rows))
        return 0
    if args.n < 1:
        raise EvalError(f"--n must be at least 1, got {args.n}")
    if args.multiview:
        return evaluate_frames.run(args, EvalError)
    if args.bundle and args.checkpoint:
        raise EvalError("pass a BUNDLE or --checkpoint, not both")
    if args.checkpoint and args.visual_prompt:
        raise EvalError("--visual-prompt frames a bundle's images: export the checkpoint and pass the BUNDLE")
    fraction = args.instruction_fraction
    fraction = DEFAULT_INSTRUCTION_FRACTION.get(args.split, 0.0) if fraction is None else fraction
    if not 0 <= fraction <= 1:
        raise EvalError(f"--instruction-fraction {fraction} is outside 0-1")
    families = list(scenes.split_families(args.split, args.families))
    examples = questions(args.split, args.n, families, args.seed_offset, instruction_fraction=fraction)
    start = time.perf_counter()
    progress = not args.quiet
    if args.checkpoint:
        device = _device(args.device)
        if args.batch_size > 0:
            records, manifest = run_batched(args.checkpoint, examples, args.prompt_mlp, args.budget, args.reducer,
                                            device, args.visual_positions, args.batch_size, args.max_new_tokens,
                                            progress)
        else:
            pipeline = torch_pipeline(args.checkpoint, args.prompt_mlp, args.budget, args.reducer, device,
                                      args.visual_positions)
            records, manifest = run_pipeline(pipeline, examples, args.max_new_tokens, progress), pipeline.manifest
        source = {"kind": "torch-batched" if args.batch_size > 0 else "torch", "path": str(args.checkpoint),
                  "prompt_mlp": args.prompt_mlp, "device": device}
    else:
        import sdk.bundle

        bundle = args.bundle or str(sdk.bundle.default_bundle_path())
        from sdk.cli_describe import visual_prompt_argument

        records, manifest = run_bundle(bundle, examples, args.device, args.jobs, args.max_new_tokens, progress,
                                       visual_prompt=visual_prompt_argument(args.visual_prompt))
        source = {"kind": "bundle", "path": str(bundle), "device": args.device, "jobs": args.jobs,
                  "threads_per_job": 1 if args.jobs > 1 else None, "visual_prompt": args.visual_prompt}
    meta = {"source": source, "seconds": round(time.perf_counter() - start, 1),
            "data": {"split": args.split, "n": len(examples), "families": families, "instruction_fraction": fraction,
                     "seed_offset": args.seed_offset, "scenes": len({e.scene_seed for e in examples}),
                     "max_new_tokens": args.max_new_tokens}}
    result = summarize(records, manifest, meta)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
