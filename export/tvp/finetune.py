"""`pipmm tvp finetune`: the per-model alternative to a prompt, for the cost comparison of docs/tvp.md.

    pipmm tvp finetune --source models/default_model --data runs/tvp/shifted-train --out runs/tvp/ft-source

The source's projector (only) is fine-tuned with AdamW on the same images and questions a prompt trains on,
through the bundle's own preprocessing (no frame), with the same answer loss (export.train.model.forward_loss).
The result is a whole checkpoint (bf16 weights as `pipmm train` saves them, the prompt MLP, the source's
train_config.json with a `tvp_finetune` record of time and trained parameters), exported like the source.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from export.train.state import copy_assets, save_model
from export.tvp.data import PromptData, read_items
from export.train.progress import resolve_device, step_bar
from export.tvp.source import SourceModel


def add_arguments(parser) -> None:
    parser.add_argument("--source", required=True, help="the checkpoint to fine-tune (pipmm train's directory)")
    parser.add_argument("--data", required=True, help="directory of images + LLaVA-style questions")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenes-per-step", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (pipmm train's stage 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    device = resolve_device(args.device)
    source = SourceModel.load(args.source, device=device)
    data = PromptData.plain(read_items(args.data)[0], source.preprocessing, source.prompter, source.pad_id,
                            args.scenes_per_step, args.seed)
    params = list(source.vision.projector.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    bar = step_bar(0, args.steps, args.quiet, "finetune")
    begin = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = data.batch(step)
        text = {k: batch[k].to(device) for k in ("input_ids", "labels", "encoder_ids", "encoder_lengths",
                                                 "scene_index")}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = source.answer_loss(batch["pixels"].to(device), text)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix_str(f"loss {loss.item():.3f}")
        bar.update(1)
    bar.close()
    seconds = round(time.perf_counter() - begin, 1)
    out, src = Path(args.out), Path(args.source)
    out.mkdir(parents=True, exist_ok=True)
    save_model(source.model, out)
    copy_assets(src, out)
    if source.vision.prompt_mlp is not None:
        source.vision.prompt_mlp.save(out)
    trained = json.loads((src / "train_config.json").read_text()) if (src / "train_config.json").is_file() else {}
    record = {"source": str(src), "data": str(args.data), "images": len(data.items), "questions": data.questions,
              "trainable": "multi_modal_projector", "trainable_parameters": sum(p.numel() for p in params),
              "steps": args.steps, "scenes_per_step": data.scenes_per_step, "lr": args.lr,
              "optimizer": "AdamW (0.9, 0.95), weight decay 0.05, warm-up 5%, cosine", "seconds": seconds,
              "device": str(device), "final_loss": loss.item()}
    (out / "train_config.json").write_text(json.dumps({**trained, "tvp_finetune": record}, indent=2) + "\n")
    print(f"wrote {out}: projector ({record['trainable_parameters']} parameters) fine-tuned in {seconds} s", flush=True)
    return 0
