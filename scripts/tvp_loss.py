"""TVP's training objective measured after the fact: the source's teacher-forced answer loss (L_LM, the loss
`pipmm tvp train` minimises) without a frame, with the zero frame and with each prompt, on the prompt's own
training images and on held-out images of the same domain (docs/tvp.md, "Why the first prompt hurts").

    python scripts/tvp_loss.py --prompt tvp=runs/tvp/prompt-f30 --data train=runs/tvp/shifted-train \\
        --data test=runs/tvp/shifted-test [--source models/default_model] [--images 300] [--json out.json] \\
        [--bundle runs/tvp/table/bundles/source]

Data directories are `pipmm tvp scenes` output (--split train / test). Every image of a directory with all its
questions, in file order, `--scenes-per-batch` images a forward pass, no gradient; the loss is the mean over
answer tokens (+ EOS), as in training. `none` is the bundle's own preprocessing (no frame); `zero-frame` the
first prompt's geometry with delta = 0 (the image as the prompt sees it, nothing learned).

--by-family also gives each question family's loss (the overall one is token-weighted, so families with long
answers, `describe` above all, dominate it: the weighting training optimised).

--bundle also checks train/eval agreement on the first --check images of each directory: the pixels the SDK feeds
the bundle's vision graph (sdk.load(bundle, visual_prompt=DIR).pixel_values, as scripts/tvp_table.py's workers
load it) against the torch transform training differentiated, and against the bundle without the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mean_loss(source, data, prompt=None) -> dict:
    """Token-weighted mean answer loss over every image of `data` (prompt None: data holds plain pixel_values)."""
    import torch

    from export.train.model import forward_loss
    from export.tvp.transform import prompted

    total, tokens, per = 0.0, 0, data.scenes_per_step
    with torch.no_grad():
        for start in range(0, len(data.items), per):
            chosen = list(range(start, min(len(data.items), start + per)))
            batch = data.rows(chosen)
            pixels = batch.pop("pixels")
            if prompt is not None:
                pixels = prompted(pixels, torch.from_numpy(prompt.delta), prompt.frame, source.stats, prompt.geometry)
            out = forward_loss(source.model, source.vision, {"pixel_values": pixels, **batch},
                               patch_positions=source.patch_positions)
            total += float(out["lm_loss"]) * out["answer_tokens"]
            tokens += out["answer_tokens"]
    return {"lm_loss": total / tokens, "answer_tokens": tokens, "images": len(data.items),
            "questions": data.questions}


def combined(parts: list[dict]) -> dict:
    tokens = sum(p["answer_tokens"] for p in parts)
    return {"lm_loss": sum(p["lm_loss"] * p["answer_tokens"] for p in parts) / tokens, "answer_tokens": tokens,
            "images": max(p["images"] for p in parts), "questions": sum(p["questions"] for p in parts)}


def by_family(items, list_path: Path) -> dict:
    """family -> the items with only that family's questions (families from the list's records)."""
    from export.tvp.data import Item

    root = list_path.parent
    family = {(str(root / r["image"]), r["conversations"][0]["value"].replace("<image>", "").strip()): r["family"]
              for r in json.loads(list_path.read_text())}
    out: dict = {}
    for item in items:
        for question in item.questions:
            group = out.setdefault(family[str(item.image), question[0]], {})
            group.setdefault(item.image, Item(item.image, item.caption, [])).questions.append(question)
    return {f: list(group.values()) for f, group in sorted(out.items())}


def agreement(bundle: str, prompts: dict, items, source) -> dict:
    """Max |SDK pixels - training pixels| and max |SDK pixels with - without the prompt|, per prompt."""
    import numpy as np
    import torch

    import sdk

    from export.tvp.transform import inner_batch, prompted

    plain = sdk.load(bundle, device="cpu", visual_prompt=False)
    out = {}
    for name, prompt in prompts.items():
        framed = sdk.load(bundle, device="cpu", visual_prompt=str(Path(prompt.source).parent))
        device = np.concatenate([framed.pixel_values(i.image) for i in items])
        training = prompted(inner_batch([i.image for i in items], prompt, source.preprocessing),
                            torch.from_numpy(prompt.delta), prompt.frame, source.stats, prompt.geometry).numpy()
        unframed = np.concatenate([plain.pixel_values(i.image) for i in items])
        out[name] = {"images": len(items), "max_abs_sdk_vs_training": float(np.abs(device - training).max()),
                     "max_abs_with_vs_without": float(np.abs(device - unframed).max()),
                     "attached_prompt_sha256": framed.visual_prompt.sha256}
        print(f"agreement {name}: {out[name]}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--source", default=str(ROOT / "models" / "default_model"))
    parser.add_argument("--images", type=int, default=None, help="the first N images of each directory")
    parser.add_argument("--scenes-per-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--bundle", default=None, help="the source's bundle: check train/eval pixel agreement")
    parser.add_argument("--check", type=int, default=8, help="images per directory for --bundle's check")
    parser.add_argument("--by-family", action="store_true", help="also the loss of each question family")
    args = parser.parse_args()

    import torch

    from sdk.visual_prompt import VisualPrompt

    from export.tvp.data import PromptData, read_items
    from export.tvp.source import SourceModel

    torch.manual_seed(0)
    source = SourceModel.load(args.source)
    prompts = {name: VisualPrompt.load(path) for name, path in (p.split("=", 1) for p in args.prompt)}
    first = next(iter(prompts.values()))
    conditions = {"none": None, "zero-frame": first.zeroed(), **prompts}
    table, agreed = {}, {}
    for name, path in (d.split("=", 1) for d in args.data):
        everything, list_path = read_items(path, args.images)
        if args.bundle:
            agreed[name] = agreement(args.bundle, prompts, everything[:args.check], source)
        groups = by_family(everything, list_path) if args.by_family else {"all": everything}
        for group, items in groups.items():
            key = name if group == "all" else f"{name} {group}"
            plain = PromptData.plain(items, source.preprocessing, source.prompter, source.pad_id,
                                     args.scenes_per_batch)
            table[key] = {}
            framed_by = {}  # inner side -> the images prepared for it, shared by the prompts of that geometry
            for condition, prompt in conditions.items():
                if prompt is None:
                    table[key][condition] = mean_loss(source, plain)
                else:
                    if prompt.inner_size not in framed_by:
                        framed_by[prompt.inner_size] = PromptData.framed(items, prompt, source.preprocessing,
                                                                         source.prompter, source.pad_id,
                                                                         args.scenes_per_batch)
                    table[key][condition] = mean_loss(source, framed_by[prompt.inner_size], prompt)
                print(f"{key} {condition}: L_LM {table[key][condition]['lm_loss']:.4f}", flush=True)
        if args.by_family:  # the whole directory's token-weighted mean, from its families'
            table[name] = {c: combined([table[f"{name} {g}"][c] for g in groups]) for c in conditions}
            print(f"{name}: " + ", ".join(f"{c} {v['lm_loss']:.4f}" for c, v in table[name].items()), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "source": args.source,
                                               "prompts": {k: v.source for k, v in prompts.items()},
                                               "data": dict(d.split("=", 1) for d in args.data),
                                               "loss": table, "agreement": agreed}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
