"""`pipmm tvp clip-train`: SceneClip (export/tvp/clip.py), contrastively, on clean train scenes and their captions.

    pipmm tvp clip-train --out runs/tvp/clip [--steps 2000] [--batch-size 256] [--device cuda]

Scenes are train-split scenes from index CLIP_OFFSET on (no MLLM training stream nor the shifted domain's
train split reaches there), drawn by worker processes, batch i = scenes CLIP_OFFSET + i * B ... + B - 1. Half of
each batch is augmented on the device so that the guide still reads a prompted image: shrunk to a random side
in [AUGMENT["shrink"] * S, S] and framed with random noise (a stand-in for any prompt), and photometric changes
(brightness, per-channel gain, Gaussian noise). The domain's own style (export/tvp/domain.py) is never shown.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from export.tasks import scenes
from export.tvp.clip import ClipConfig, SceneClip

CLIP_OFFSET = 800_000_000
HELD_OUT = 150_000_000  # held-out scenes for the retrieval check: CLIP_OFFSET + HELD_OUT on
AUGMENT = {"fraction": 0.5, "shrink": 0.65, "brightness": [0.6, 1.25], "channel_gain": [0.8, 1.2], "noise": 0.04}


class CaptionBatches(torch.utils.data.IterableDataset):
    """(pixels [B, 3, S, S] uint8, captions) for batches start, start + 1, ... (workers round-robin). uint8: a
    quarter of float32's bytes through the workers' shared memory (256 x 224 px: 38 MB a batch, several a second);
    the device divides by 255."""

    def __init__(self, batch_size: int, image_size: int, start: int = 0):
        super().__init__()
        self.batch_size, self.image_size, self.start = batch_size, image_size, start

    def batch(self, index: int):
        pixels, captions = [], []
        draw = max(self.image_size, 64)  # scenes.py's smallest size; resized down for tiny guides
        for k in range(self.batch_size):
            scene = scenes.make_scene(scenes.split_seed("train", CLIP_OFFSET + index * self.batch_size + k), draw)
            image = scene.image if draw == self.image_size else scene.image.resize(
                (self.image_size, self.image_size), Image.Resampling.BICUBIC)
            pixels.append(np.asarray(image, np.uint8))
            captions.append(scene.caption)
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AUGMENT on a random half of the batch (see the module)."""
    b, _, size, _ = pixels.shape
    out = pixels.clone()
    device = pixels.device

    def uniform(n, lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
    chosen = (torch.rand(b, generator=generator, device=device) < AUGMENT["fraction"]).nonzero().flatten().tolist()
    for i in chosen:
        side = int(uniform(1, AUGMENT["shrink"] * size, size + 1).floor().clamp(max=size))
        if side < size:
            inner = F.interpolate(pixels[i:i + 1], size=(side, side), mode="bilinear", antialias=True,
                                  align_corners=False)
            frame = torch.rand(1, 3, size, size, generator=generator, device=device)
            top = (size - side) // 2
            frame[:, :, top:top + side, top:top + side] = inner
            out[i] = frame[0]
        gain = uniform(1, *AUGMENT["brightness"]) * uniform(3, *AUGMENT["channel_gain"])
        noise = AUGMENT["noise"] * torch.randn(out[i].shape, generator=generator, device=device)
        out[i] = (out[i] * gain.view(3, 1, 1) + noise).clamp(0, 1)
    return out


def retrieval_accuracy(model: SceneClip, pixels: torch.Tensor, captions: list[str]) -> float:
    """Fraction of images whose own caption scores highest among the batch's captions."""
    with torch.no_grad():
        logits = model.encode_image(pixels) @ model.encode_text(model.tokens(captions)).T
    return float((logits.argmax(1) == torch.arange(len(captions), device=logits.device)).float().mean())


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="directory for clip.safetensors + clip.json")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=224, help="the input side of the models it guides")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (tests and CPU smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=None, help="scene-drawing processes (default: cores - 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import os

    from export.train.progress import resolve_device, step_bar

    device = resolve_device(args.device)
    config = ClipConfig.tiny(args.image_size) if args.tiny else ClipConfig(image_size=args.image_size)
    torch.manual_seed(args.seed)
    model = SceneClip(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    workers = args.workers if args.workers is not None else max(0, min(14, (os.cpu_count() or 2) - 2))
    data = CaptionBatches(args.batch_size, args.image_size)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         **({"prefetch_factor": 4} if workers else {}))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")
    bar = step_bar(0, args.steps, args.quiet, "clip")
    begin = time.perf_counter()
    for step, (pixels, captions) in enumerate(loader):
        if step >= args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels = augment(pixels.to(device).float() / 255, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.contrastive_loss(pixels, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            record = {"step": step, "loss": loss.item(), "lr": lr, "seconds": round(time.perf_counter() - begin, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix_str(f"loss {record['loss']:.3f}")
        bar.update(1)
    bar.close()
    log.close()
    model.eval()
    held_out, held_captions = CaptionBatches(min(args.batch_size, 256), args.image_size).batch(
        HELD_OUT // min(args.batch_size, 256))
    accuracy = retrieval_accuracy(model, held_out.to(device).float() / 255, held_captions)
    training = {"data": {"split": "train", "first_scene": CLIP_OFFSET, "scenes": args.steps * args.batch_size,
                         "text": "the scene caption"}, "augment": AUGMENT, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "optimizer": "AdamW, warm-up 5%, cosine",
                "loss": "symmetric InfoNCE (CLIP)", "seed": args.seed, "seconds": round(time.perf_counter() - begin, 1),
                "held_out_retrieval_top1": accuracy, "held_out_batch": len(held_captions)}
    model.cpu().save(out, training)
    print(f"wrote {out}: held-out caption retrieval top-1 {accuracy:.3f} among {len(held_captions)}", flush=True)
    return 0
