"""`pipmm tvp train`: one transferable visual prompt, trained on one frozen MLLM (TVP, arXiv 2404.11207).

    pipmm tvp train --source models/default_model --data runs/tvp/shifted-train --clip runs/tvp/clip \\
                    --out runs/tvp/prompt [--frame 30] [--geometry pad|overlay] [--steps 600] [--fca-weight 0.005] \
                    [--tse-weight 0.001]

delta [3, S, S] starts at zeros and lives only in the border frame. Geometry pad (TVP's code, the default): the
image is resized to S - 2 * frame and zero-padded, so frame pixels equal delta; overlay: the image keeps its S x S
and delta is added on its border band, clipped to [0, 1] (sdk/visual_prompt.py). Per step, on `scenes_per_step`
images and all their questions (export/tvp/data.py), with frame(x) = pad(x) + delta (or the overlay):

    loss = L_LM(normalise(frame(x)))                                         the source's answer loss
         + fca_weight * mean_patches || F(prompted) - F(normalise(frame_0(x))) ||_2   Feature Consistency Alignment
         - tse_weight * SceneClip.similarity(frame(x), caption)               Task Semantics Enrichment
    g = mask * dloss/ddelta;  g = g / ||g||_2;  delta <- delta - lr_t * g   lr_t = lr * (1 + cos(pi t / T)) / 2
    (clamp: delta <- clip(delta, 0, 1) for pad, so every frame pixel is a valid colour, TVP's code does not clip;
    clip(delta, -1, 1) for overlay, whose band is clipped to the pixel range on every path anyway)

FCA's features: the source ViT's patch features with its own class embedding (export/tvp/source.py). TSE's
guide: SceneClip (export/tvp/clip.py), trained here on clean captions, none of the MLLMs.

Files in --out: visual_prompt.safetensors + visual_prompt.json (format, geometry, sha256, settings, progress),
log.jsonl. The directory is a usable prompt after every save; --resume continues a run from its last save and
gives the delta of an uninterrupted run (the batch stream depends on the step only, the optimiser is stateless).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from sdk.bundle import sha256_file
from sdk.errors import PipmmError
from sdk.manifest_visual_prompt import DEFAULT_GEOMETRY, GEOMETRIES, inner_side
from sdk.visual_prompt import DELTA, PROMPT_CONFIG, PROMPT_FORMAT, PROMPT_WEIGHTS

from export.tvp.data import PromptData, read_items
from export.train.progress import resolve_device, step_bar
from export.tvp.source import SourceModel
from export.tvp.transform import frame_mask, framed, normalise


class TvpTrainError(PipmmError, ValueError):
    """A `pipmm tvp train` argument or --resume directory that does not fit."""


def add_arguments(parser) -> None:
    p = parser
    p.add_argument("--source", required=True, help="the checkpoint to train on (pipmm train's directory)")
    p.add_argument("--prompt-mlp", default=None, help="its prompt MLP (default: the checkpoint's own, if any)")
    p.add_argument("--budget", default=None, help="visual-token budget (default: the checkpoint's train_config)")
    p.add_argument("--reducer", default=None, help="reducer (default: the checkpoint's train_config)")
    p.add_argument("--visual-positions", default=None, choices=("sequence", "patch"), help="(default: as trained)")
    p.add_argument("--data", required=True, help="directory of images + LLaVA-style questions (pipmm tvp scenes)")
    p.add_argument("--images", type=int, default=None, help="use the first N images only")
    p.add_argument("--out", required=True, help="prompt directory to write")
    p.add_argument("--frame", type=int, default=30, help="frame width in pixels (TVP's prompt_size; 30 of 224)")
    p.add_argument("--geometry", default=DEFAULT_GEOMETRY, choices=list(GEOMETRIES),
                   help="pad: shrink the image and frame it (TVP's code); overlay: add delta on the border band of "
                        "the full-size image")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--scenes-per-step", type=int, default=32, help="images per step (with all their questions)")
    p.add_argument("--lr", type=float, default=10.0, help="step on the L2-normalised gradient (cosine to 0)")
    p.add_argument("--fca-weight", type=float, default=0.005, help="Feature Consistency Alignment (0 = off)")
    p.add_argument("--tse-weight", type=float, default=0.001, help="Task Semantics Enrichment (0 = off)")
    p.add_argument("--clip", default=None, help="TSE's image-text guide (pipmm tvp clip-train); needed for TSE")
    p.add_argument("--no-clamp", action="store_true", help="let frame pixels leave [0, 1] (as TVP's code)")
    p.add_argument("--seed", type=int, default=0, help="order of the images")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a prompt")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="save after step N and stop")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_of(args, source: SourceModel, data: PromptData, list_path: Path, guide) -> dict:
    return {
        "method": "TVP (arXiv 2404.11207): pixel frame, L_LM + FCA - TSE, normalised-gradient descent",
        "source": source.description,
        "data": {"list": str(list_path), "images": len(data.items), "questions": data.questions,
                 "domain": _domain_of(list_path)},
        "frame": args.frame, "geometry": args.geometry, "image_size": source.image_size,
        "inner_size": inner_side(args.geometry, source.image_size, args.frame),
        "steps": args.steps, "scenes_per_step": data.scenes_per_step, "lr": args.lr,
        "schedule": "cosine from lr to 0 over the steps", "gradient": "batch gradient, masked to the frame, L2-normalised",
        "clamp": not args.no_clamp, "seed": args.seed,
        "losses": {"lm": "answer + EOS cross-entropy of the source (export.train.model.forward_loss)",
                   "fca_weight": args.fca_weight,
                   "fca": "mean over patches of the L2 distance between the source ViT's patch features of the "
                          "prompted and the zero-framed image (its own class embedding)",
                   "tse_weight": args.tse_weight,
                   "tse": "SceneClip logit scale * cosine(prompted image, the image's caption), maximised"},
        "tse_guide": None if guide is None else {"path": str(args.clip), "model": "SceneClip (export/tvp/clip.py), "
                                                 "trained on clean scene captions; no target MLLM",
                                                 **{k: guide.training_record.get(k) for k in
                                                    ("steps", "held_out_retrieval_top1")}},
    }


def _domain_of(list_path: Path):
    domain = list_path.parent / "domain.json"
    return json.loads(domain.read_text()).get("style", {}).get("name") if domain.is_file() else None


def save_prompt(out: Path, delta: torch.Tensor, settings: dict, progress: dict) -> None:
    """The weights first (atomically), then the JSON naming their sha256: a reader never sees a mismatch."""
    from safetensors.torch import save_file

    tmp = out / f".{PROMPT_WEIGHTS}.tmp"
    save_file({DELTA: delta.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, out / PROMPT_WEIGHTS)
    record = {"format": PROMPT_FORMAT, "version": 1, "file": PROMPT_WEIGHTS, "frame": settings["frame"],
              "geometry": settings.get("geometry", DEFAULT_GEOMETRY),
              "inner_size": settings["inner_size"], "image_size": settings["image_size"],
              "sha256": sha256_file(out / PROMPT_WEIGHTS), "settings": settings, "progress": progress}
    tmp = out / f".{PROMPT_CONFIG}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / PROMPT_CONFIG)


def resume_state(out: Path, settings: dict) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    if not (out / PROMPT_CONFIG).is_file():
        raise TvpTrainError(f"--resume: {out} holds no {PROMPT_CONFIG}; start the run without --resume")
    record = json.loads((out / PROMPT_CONFIG).read_text())
    recorded = {"geometry": DEFAULT_GEOMETRY, **record["settings"]}  # runs from before geometry were all pad
    changed = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
    if changed:
        raise TvpTrainError(f"--resume: the run in {out} was started with other settings ({', '.join(changed)}); "
                            "pass the same arguments, or --overwrite to start over")
    return load_file(str(out / PROMPT_WEIGHTS))[DELTA], record.get("progress", {})


def objective(source: SourceModel, guide, batch: dict, delta: torch.Tensor, frame: int, fca_weight: float,
              tse_weight: float, device: torch.device, geometry: str = DEFAULT_GEOMETRY) -> dict:
    """The loss of one batch and its parts (see the module docstring)."""
    inner = batch["pixels"].to(device)
    raw = framed(inner, delta, frame, geometry)  # [S, 3, S, S], the frame's pixels from delta
    pixels = normalise(raw, source.stats)
    text = {k: batch[k].to(device) for k in ("input_ids", "labels", "encoder_ids", "encoder_lengths", "scene_index")}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        lm = source.answer_loss(pixels, text)
        parts = {"lm_loss": lm}
        loss = lm
        if fca_weight > 0:
            with torch.no_grad():
                clean = source.features(normalise(framed(inner, torch.zeros_like(delta), frame, geometry),
                                                  source.stats))
            fca = (source.features(pixels).float() - clean.float()).norm(dim=-1).mean()
            parts["fca"] = fca
            loss = loss + fca_weight * fca
        rows = [i for i, c in enumerate(batch["captions"]) if c]
        if tse_weight > 0 and rows:
            tse = guide.similarity(raw[rows], [batch["captions"][i] for i in rows]).float().mean()
            parts["tse"] = tse
            loss = loss - tse_weight * tse
    parts["loss"] = loss
    return parts


def train(args) -> Path:
    out = Path(args.out)
    device = resolve_device(args.device)
    if args.tse_weight > 0 and not args.clip:
        raise TvpTrainError("TSE needs its image-text guide: pass --clip DIR (pipmm tvp clip-train), or "
                            "--tse-weight 0")
    if (out / PROMPT_CONFIG).is_file() and not (args.resume or args.overwrite):
        raise TvpTrainError(f"{out} already holds a prompt: pass --resume to continue it or --overwrite")
    source = SourceModel.load(args.source, args.prompt_mlp, args.budget, args.reducer, args.visual_positions, device)
    if not 1 <= args.frame < source.image_size // 2:
        raise TvpTrainError(f"--frame {args.frame}: pass a width from 1 to {source.image_size // 2 - 1} pixels")
    guide = None
    if args.tse_weight > 0:
        from export.tvp.clip import SceneClip

        guide = SceneClip.load(args.clip).to(device)
        for p in guide.parameters():
            p.requires_grad_(False)
        if guide.config.image_size != source.image_size:
            raise TvpTrainError(f"--clip {args.clip} reads {guide.config.image_size} px images, the source "
                                f"{source.image_size}: train the guide with --image-size {source.image_size}")
    items, list_path = read_items(args.data, args.images)
    data = PromptData.framed(items, source.zero_prompt(args.frame, args.geometry), source.preprocessing,
                             source.prompter, source.pad_id, args.scenes_per_step, args.seed)
    settings = settings_of(args, source, data, list_path, guide)
    size = source.image_size
    delta, progress, start = torch.zeros(3, size, size), {}, 0
    if args.resume:
        delta, progress = resume_state(out, settings)
        start = int(progress.get("completed_steps", 0))
    out.mkdir(parents=True, exist_ok=True)
    delta = delta.to(device)
    mask = frame_mask(size, args.frame).to(device)
    low_high = GEOMETRIES[args.geometry].delta_range
    log = open(out / "log.jsonl", "a" if args.resume else "w")
    bar = step_bar(start, args.steps, args.quiet, "tvp")
    begin, spent = time.perf_counter(), float(progress.get("seconds", 0.0))

    def save(step: int) -> None:
        save_prompt(out, delta, settings, {"completed_steps": step, "total_steps": args.steps,
                                           "seconds": round(spent + time.perf_counter() - begin, 1)})

    for step in range(start, args.steps):
        variable = delta.clone().requires_grad_(True)
        parts = objective(source, guide, data.batch(step), variable, args.frame, args.fca_weight, args.tse_weight,
                          device, args.geometry)
        grad = torch.autograd.grad(parts["loss"], variable)[0] * mask
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        with torch.no_grad():
            delta = delta - lr * grad / grad.norm().clamp_min(1e-12)
            delta = (delta.clamp(*low_high) if not args.no_clamp else delta) * mask
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            record = {"step": done, "lr": lr, "grad_norm": float(grad.norm()),
                      **{k: float(v.detach()) for k, v in parts.items()},
                      "seconds": round(spent + time.perf_counter() - begin, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix_str(f"loss {record['loss']:.3f}")
        bar.update(1)
        if done == args.stop_after and done < args.steps:
            save(done)
            print(f"stopped after step {done} of {args.steps}: --resume continues", flush=True)
            break
        if done % args.save_every == 0 or done == args.steps:
            save(done)
    else:
        if start >= args.steps:
            print(f"{out} already completed {start} steps", flush=True)
    bar.close()
    log.close()
    return out


def run(args) -> int:
    out = train(args)
    print(f"wrote {out / PROMPT_WEIGHTS} and {out / PROMPT_CONFIG}", flush=True)
    return 0
