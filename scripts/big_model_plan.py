"""The figures of docs/default-model.md "The next model: plan", measured on this machine (CPU, seconds each).

    python3 scripts/big_model_plan.py data [--batches 20]   # scene generator rate per core -> samples per call
    python3 scripts/big_model_plan.py archs                 # parameters, bytes, FLOPs per step, carry per arch
    python3 scripts/big_model_plan.py labels [--sheet PNG]  # label pixels against the 14-px patch, tokenisation

Sections are a registry (SECTIONS); each prints a short table. FLOPs are counted, GPU step times are estimates
from r10's measured rate on the H200 (train_config.json lineage of models/default_model), not measurements.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

SHIPPED = ROOT / "models/default_model"
CARRY = 64 * 2**20          # what one device call carries: tree + named ignored paths
CALL_TRAIN_S = 480          # training seconds of one 10-minute call (start, tokenizer, save and pack around it)
BATCH = 256                 # questions a step, as r9-r11's stage 0


def _batches(tokenizer_file: str, num_tokens: int, image_size: int):
    from tokenizers import Tokenizer

    from export.tasks import scenes
    from export.train.data import SceneBatches, SequenceSpec
    from export.train.model import special_tokens
    from sdk.preprocess import clip_processor_config, config_from_processor

    spec = SequenceSpec(tokenizer_file, special_tokens(Tokenizer.from_file(tokenizer_file)), num_tokens, 2048)
    per_batch = -(-BATCH // len(scenes.split_families("train")))
    grid = image_size // 14
    return SceneBatches(spec, config_from_processor(clip_processor_config(image_size)), per_batch, image_size, grid,
                        seed_offset=5_000_000, instruction_fraction=0.1, paraphrase_fraction=0.5), per_batch


def data(args) -> None:
    """One process draws batches of the stage-0 stream (mixed styles, 10% instructions, 50% reworded)."""
    batches, per_batch = _batches(str(SHIPPED / "tokenizer.json"), 256, 224)
    prompter = batches.spec.prompter()
    batches.batch(0, prompter)  # fonts, caches
    begin = time.perf_counter()
    questions = 0
    for i in range(1, args.batches + 1):
        questions += int(batches.batch(i, prompter)["input_ids"].shape[0])
    seconds = (time.perf_counter() - begin) / args.batches
    scenes_s = per_batch / seconds
    print(f"one core: {seconds * 1000:.0f} ms a batch of {per_batch} scenes ({questions / args.batches:.0f} questions)"
          f" = {scenes_s:.0f} scenes/s, {questions / args.batches / seconds:.0f} questions/s")
    for workers in (14, 15):
        n = scenes_s * workers * CALL_TRAIN_S
        print(f"{workers} workers x {CALL_TRAIN_S} s: {n / 1e3:.0f}k scenes = {n / per_batch / 1e3:.1f}k steps of "
              f"{BATCH} questions at most (data-bound rate {scenes_s * workers / per_batch:.0f} steps/s)")


def _slim_tree_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return sum((ROOT / p).stat().st_size for p in files.split("\0")
               if p and not p.startswith(("models/", "sdk/default_bundle/")) and (ROOT / p).is_file())


def _matmul_params(module) -> int:
    """Weights of the Linear layers (what costs 2 FLOPs per token each); embeddings and norms cost ~nothing."""
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _text_tokens(tokenizer_file: str, num_tokens: int, image_size: int) -> float:
    """Mean sequence length (visual tokens + chat text + answer) of stage-0 batches."""
    batches, _ = _batches(tokenizer_file, num_tokens, image_size)
    prompter = batches.spec.prompter()
    lengths = [int((b["input_ids"] != batches.spec.special["pad"]).sum(1).float().mean())
               for b in (batches.batch(i, prompter) for i in range(3))]
    return float(np.mean(lengths))


def archs(args) -> None:
    import torch

    from export.model.prompt import PromptMLP, PromptMLPConfig
    from export.train.archs import ARCHS
    from export.train.data import build_tokenizer
    from export.train.model import build_llava, parameter_counts

    shipped = json.loads((SHIPPED / "train_config.json").read_text())
    measured = None  # r10's stage 0 on the H200: steps/s at batch 256, r11's sizes
    record = shipped
    while record:
        if record["stage"] == 0 and record.get("measured_steps_per_s"):
            measured = record["measured_steps_per_s"]
        record = record.get("parent")
    tree = _slim_tree_bytes()
    tokenizers = {}
    rows = []
    for name in ("r11", "m20", "m20-336"):
        arch = ARCHS[name]
        sizes = arch.sizes
        key = (sizes.vocab_size, arch.answerless)
        if key not in tokenizers:
            tokenizer = build_tokenizer(2000, sizes.vocab_size, answerless=arch.answerless)
            path = Path("/tmp") / f"plan-tokenizer-{sizes.vocab_size}-{'-'.join(arch.answerless)}.json"
            tokenizer.save(str(path))
            tokenizers[key] = (tokenizer, path)
        tokenizer, path = tokenizers[key]
        if name == "r11":
            path = SHIPPED / "tokenizer.json"
        with torch.device("meta"):
            model = build_llava(sizes, tokenizer)
            mlp = PromptMLP(PromptMLPConfig(d_llm=sizes.text_hidden, d_vit=sizes.vision_hidden))
        counts = parameter_counts(model, mlp)
        grid = sizes.image_size // sizes.patch_size
        vit_t, seq = grid * grid + 1, _text_tokens(str(path), grid * grid, sizes.image_size)
        scenes_step = -(-BATCH // 9)
        questions_step = BATCH * 0.82  # not every family fits every scene: 211 questions of 29 scenes measured
        vit, llm = model.model.vision_tower, model.model.language_model
        # forward FLOPs: 2 per matmul weight per token + attention (QK^T and AV: 4 * T^2 * d per layer, full
        # square: sdpa's causal kernels skip about half); training = 3x forward
        f_vit = scenes_step * (2 * _matmul_params(vit) * vit_t + 4 * sizes.vision_layers * vit_t ** 2 * sizes.vision_hidden)
        f_proj = scenes_step * 2 * _matmul_params(model.model.multi_modal_projector) * grid * grid
        f_llm = questions_step * (2 * _matmul_params(llm) * seq + 4 * sizes.text_layers * seq ** 2 * sizes.text_hidden)
        flops = 3 * (f_vit + f_proj + f_llm)
        rows.append((name, counts, seq, flops, f_vit / (f_vit + f_proj + f_llm)))
    base = rows[0][3]
    rate = measured * base if measured else None  # effective FLOP/s of r10's run
    print(f"r10 stage 0 on the H200: {measured} steps/s at batch {BATCH} -> {rate / 1e12:.1f} TFLOP/s effective"
          if rate else "no measured stage-0 rate in the lineage")
    print(f"slimmed tree (tracked files without models/ and sdk/default_bundle): {tree / 2**20:.1f} MiB; a call "
          f"carries {CARRY / 2**20:.0f} MiB")
    print("| arch | ViT | LLM + head | total | bf16 ckpt | FP16 bundle ~ | INT8 ~ | carry (bf16 + tree) | full state "
          "(fp32 + AdamW) | sequence | TFLOP/step (ViT share) | step at r10's rate | at 3x its efficiency |")
    for name, counts, seq, flops, vit_share in rows:
        total = counts["total"]
        step_r10, step_3x = (flops / rate, flops / (3 * rate)) if rate else (float("nan"),) * 2
        print(f"| {name} | {counts['vision_tower'] / 1e6:.2f}M | {(counts['language_model'] + counts['lm_head']) / 1e6:.2f}M"
              f" | **{total / 1e6:.2f}M** | {2 * total / 1e6:.1f} MB | {2 * total / 1e6 + 1:.0f} MB | {total / 1e6 + 1:.0f} MB"
              f" | {(2 * total + tree) / 2**20:.1f} MiB | {12 * total / 2**20:.0f} MiB | {seq:.0f} | {flops / 1e12:.2f} "
              f"({100 * vit_share:.0f}%) | {1000 * step_r10:.0f} ms | {1000 * step_3x:.0f} ms |")


def labels(args) -> None:
    from tokenizers import Tokenizer

    from export.tasks import scenes
    from export.tasks.scenes import label_font, plan_scene, split_seed, split_style

    tokenizer = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    found = collections.defaultdict(list)
    for split in ("train", "test", "style"):
        for i in range(args.scenes):
            seed = split_seed(split, i)
            scene = plan_scene(seed, 224, split_style(split, seed))[0]
            k = 224 / scene.image_size  # canvas pixels -> model pixels (the view is resized to 224)
            for o in scene.objects:
                if o.label:
                    x0, y0, x1, y1 = o.label_box
                    _, top, _, bottom = label_font(o, scene.image_size).getbbox("H")
                    found[split].append((len(o.label), (y1 - y0) * k, (bottom - top) * k, (x1 - x0) * k / len(o.label),
                                         o.label))
    print("| split | labels | cap height px (5/50/95%) | px per glyph (5/50/95%) | glyphs per 14-px patch (median) |")
    for split, rows in found.items():
        a = np.array([r[:4] for r in rows], float)
        pct = lambda c: "/".join(f"{v:.0f}" for v in np.percentile(a[:, c], [5, 50, 95]))  # noqa: E731
        print(f"| {split} | {len(rows)} | {pct(2)} | {pct(3)} | {14 / np.median(a[:, 3]):.1f} |")
    answers = [r[4] for r in found["test"]]
    per = collections.Counter(len(tokenizer.encode(" " + s.lower(), add_special_tokens=False).ids) - len(s)
                              for s in answers)
    upper = collections.Counter(len(tokenizer.encode(" " + s, add_special_tokens=False).ids) - len(s) for s in answers)
    print(f"shipped tokenizer on the test labels (answer ' ' + lower case): tokens - glyphs {dict(sorted(per.items()))};"
          f" in capitals (the 'capitals' instruction): {dict(sorted(upper.items()))}")
    for s in answers[:4]:
        print(f"  {s!r}: {tokenizer.encode(' ' + s.lower(), add_special_tokens=False).tokens} | capitals "
              f"{tokenizer.encode(' ' + s, add_special_tokens=False).tokens}")
    lengths = collections.Counter(len(s) for s in answers)
    chance = sum(c / len(answers) * len(scenes.LABEL_CHARS) ** -n for n, c in lengths.items())
    print(f"label lengths {dict(sorted(lengths.items()))}; exact by chance (uniform glyphs, right length): "
          f"{100 * chance:.1f}%")
    if args.sheet:
        _sheet(args.sheet)


def _sheet(path: str, n: int = 12) -> None:
    """Label crops at model resolution (224 px view, nearest x4) with the 14-px patch grid in red."""
    from PIL import Image, ImageDraw

    from export.tasks.scenes import split_scene

    crops = []
    i = 0
    while len(crops) < n:
        scene = split_scene("test", i)
        i += 1
        view = scene.image.crop((*scene.offset, scene.offset[0] + scene.image_size, scene.offset[1] + scene.image_size))
        view = view.resize((224, 224), Image.BICUBIC)
        k = 224 / scene.image_size
        for o in scene.objects:
            if o.label and len(crops) < n:
                x0, y0 = ((o.label_box[0] - scene.offset[0]) * k, (o.label_box[1] - scene.offset[1]) * k)
                px, py = int(x0 // 14) * 14 - 14, int(y0 // 14) * 14 - 14  # patch-aligned 4x3-patch window
                px, py = min(max(px, 0), 224 - 56), min(max(py, 0), 224 - 42)
                crop = view.crop((px, py, px + 56, py + 42)).resize((224, 168), Image.NEAREST)
                draw = ImageDraw.Draw(crop)
                for g in range(0, 225, 56):
                    draw.line([(g, 0), (g, 168)], fill=(255, 0, 0))
                for g in range(0, 169, 56):
                    draw.line([(0, g), (224, g)], fill=(255, 0, 0))
                crops.append(crop)
    sheet = Image.new("RGB", (4 * 228, 3 * 172), "white")
    for j, crop in enumerate(crops):
        sheet.paste(crop, ((j % 4) * 228, (j // 4) * 172))
    sheet.save(path, optimize=True)
    print(f"wrote {path}: {n} test-split labels, patch-aligned windows of 4x3 patches (red: 14-px patch grid)")


SECTIONS = {"data": data, "archs": archs, "labels": labels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--batches", type=int, default=20, help="data: batches timed")
    parser.add_argument("--scenes", type=int, default=2000, help="labels: scenes per split")
    parser.add_argument("--sheet", default=None, metavar="PNG", help="labels: also write a contact sheet")
    args = parser.parse_args()
    SECTIONS[args.section](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
