"""`pipmm train --stage mv`: several frames per question (export/tasks/multiview.py), three ways to combine them.

    pipmm train --stage mv --init models/default_model --adapter mivpg --out ckpt/mv-mivpg \\
                --frames 2 4 --n-max 8 [--train-llm --llm-lr-scale 1] [--adapter-set csa=full ...] \\
                [--budget half --visual-positions patch]

  concat          no new weights: every frame's K tokens in turn, as the SDK lays them out (sdk/frames.py); only
                  --train-llm has something to learn (the LLM reading several frames)
  qformer, mivpg  a FrameAdapter (export/model/mivpg.py), trained from scratch, its output calibrated first to the
                  frozen vision tokens' per-channel mean/std (FrameAdapter.calibrate, recorded); --train-llm tunes
                  the LLM too, at lr * --llm-lr-scale
Frozen always: the vision tower, the projector and the prompt MLP, so every frame is encoded as the single-frame
model encodes it (PIP-MM: with the question's T-CLS; the prompt vector from the current LLM, without gradient).
Sequences are the SDK's own (sdk.prompting.Prompter.prompt_ids with the frames' placeholders, or one of R slots)
plus answer and EOS; the loss reads the answer and EOS only. Every frame is encoded at the init model's own budget
and positions (the default model: half, patch) where the request fits the context at N_max frames, else the
next setting that does (export/train/frame_setting.py; train_config.json "visual_setting" says which and why);
with patch positions concat's frames take the SDK's layout (export/train/model.py kept_position_ids), and the
bundle is exported with the same --visual-tokens and --visual-positions. Each batch holds samples of one frame
count, drawn per batch in --frames MIN MAX; the adapter sees the unpadded frames (equal to N_max slots with a mask:
tests/test_frames_adapter.py). Output: a checkpoint directory `pipmm export` reads, with adapter.safetensors +
adapter.json beside it for `pipmm add-graphs --adapter`. Every choice is in train_config.json; --resume,
--stop-after and --stop-after-seconds split a run as the other stages do.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdk.errors import PipmmError
from sdk.manifest_multi import DEFAULT_SEPARATOR, MODES
from sdk.preprocess import config_from_processor, preprocess

from export.model.mivpg import AdapterConfig, FrameAdapter, parameter_count
from export.tasks import multiview, scenes
from export.tasks.answers import normalize
from export.train import frame_setting
from export.train.data import IGNORE, IndexedBatches, SequenceSpec, pad_rows, scene_items
from export.train.progress import step_bar
from export.train.model import (embed_sequence, encode_prompts, greedy_generate, kept_position_ids, make_vision,
                                special_tokens)
from export.train.state import STATE_JSON, copy_assets, load_trainer_state, save_model, save_trainer_state

DATA_OFFSET = 0  # multi-view samples of the train split (their frames: scene indices >= multiview.MV_OFFSET)
SEED_STRIDE = 10_000_000
# lr 1e-4 for the adapter and the LLM alike: at 1e-3 (the first GPU run) Adam grew a constant in the adapter's
# residual stream within ~100 steps, its LayerNorms then divided the frames' part away, and the pooled tokens became
# one vector whatever the frames (log.jsonl "spread" ~0.001; answers at chance, docs/multi-image.md)
DEFAULTS = {"steps": 1500, "batch_size": 64, "lr": 1e-4,
            # AdapterConfig fields (--adapter-set overrides them; shortcut=none: the first runs' adapters). Without a
            # shortcut the R tokens were one mean of the frame repeated (one-frame colour 0.30); "regions" left "which
            # frame" at chance (0.30), "frame_regions" answers it (0.45-0.52 at 4 frames; docs/multi-image.md)
            "adapter_settings": {"positions": "patch", "shortcut": "frame_regions"}}


class MultiFrameTrainError(PipmmError):
    """A multi-frame training argument or --init directory does not fit."""


def add_arguments(p) -> None:
    p.add_argument("--adapter", default="mivpg", choices=MODES, help="stage mv: how frames combine")
    p.add_argument("--frames", type=int, nargs=2, default=[2, 4], metavar=("MIN", "MAX"),
                   help="stage mv: frames per sample, drawn per batch")
    p.add_argument("--n-max", type=int, default=8, help="stage mv: frame slots of the adapter (its order table)")
    p.add_argument("--adapter-set", action="append", default=[], metavar="KEY=VALUE",
                   help="stage mv: an AdapterConfig field, e.g. csa=full, frame_order=embedded, queries=64")
    p.add_argument("--llm-lr-scale", type=float, default=1.0, help="stage mv with --train-llm: LLM lr = lr * this")
    p.add_argument("--visual-positions", default=None, choices=("patch", "sequence"),
                   help="stage mv: decoder positions of concat's frame tokens (default: the init model's own where "
                        "N_max frames fit the context, export/train/frame_setting.py; --budget likewise)")
    p.add_argument("--single-fraction", type=float, default=0.25,
                   help="stage mv: fraction of batches of one frame with the single-image families (scenes.py), so "
                        "one frame stays answered as before")


def adapter_settings(pairs: list[str], base: dict | None = None) -> dict:
    """--adapter-set KEY=VALUE pairs over `base` (default: the recipe, DEFAULTS["adapter_settings"])."""
    settings = dict(DEFAULTS["adapter_settings"] if base is None else base)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise MultiFrameTrainError(f"--adapter-set {pair!r}: write KEY=VALUE, e.g. csa=full")
        settings[key] = int(value) if value.lstrip("-").isdigit() else value
    return settings


def adapter_config(args, d_llm: int, num_patches: int) -> AdapterConfig:
    settings = adapter_settings(args.adapter_set)
    known = set(AdapterConfig.__dataclass_fields__) - {"mode", "d_in", "max_frames", "num_patches"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise MultiFrameTrainError(f"--adapter-set {', '.join(unknown)}: not an adapter setting ({', '.join(sorted(known))})")
    return AdapterConfig(mode=args.adapter, d_in=d_llm, max_frames=args.n_max, num_patches=num_patches, **settings)


# ----------------------------------------------------------------------------- data

def sequence(prompter, prompt: str, answer: str, frames: int, mode: str, slots: int) -> tuple[list, list, list]:
    """-> (ids, labels, encoder ids): the SDK's turn for `frames` frames (sdk/frames.py) + answer + EOS."""
    if mode == "concat":
        ids, _ = prompter.prompt_ids(prompt, frames, DEFAULT_SEPARATOR)
    else:
        ids, _ = prompter.prompt_ids(prompt, 1, slots=slots)
    answer_ids = prompter.tokenizer.encode(" " + answer, add_special_tokens=False).ids + [min(prompter.eos_ids)]
    return ids.tolist() + answer_ids, [IGNORE] * len(ids) + answer_ids, prompter.encoder_ids(prompt).tolist()


class MultiViewBatches(IndexedBatches):
    """Batch i: samples offset + i * S ... of `split`, all with the same frame count (drawn from the batch index),
    one question per family each. Worker w of W builds batches w, w + W, ... (the stream is the same for any W)."""

    def __init__(self, spec: SequenceSpec, preprocessing: dict, samples: int, size: int, frames: tuple[int, int],
                 mode: str, slots: int, offset: int = 0, start: int = 0, split: str = "train", seed: int = 0,
                 single_fraction: float = 0.0):
        super().__init__()
        self.single_fraction = single_fraction
        self.spec, self.preprocessing, self.samples, self.size, self.frames = spec, preprocessing, samples, size, frames
        self.mode, self.slots, self.offset, self.start, self.split, self.seed = mode, slots, offset, start, split, seed

    def frame_count(self, index: int) -> int:
        """Frames of batch `index`; 0: a batch of single frames with the single-image families."""
        lo, hi = self.frames
        rng = np.random.Generator(np.random.PCG64([self.seed, index, 11]))
        return 0 if rng.random() < self.single_fraction else int(rng.integers(lo, hi + 1))

    def items(self, index: int, n: int) -> list[tuple[list, list]]:
        """[(frames, [(prompt, answer, family index)])] of batch `index`; family indices past the multi-view ones
        are scenes.FAMILIES (single frames, n == 0), scene indices of the split's single-frame stream."""
        first = self.offset + index * self.samples
        if n == 0:
            return [([scene.image], [(q.prompt, q.answer, len(multiview.FAMILIES) + scenes.FAMILIES.index(q.family))
                                     for q in questions])
                    for scene, questions in scene_items(self.split, first, self.samples, self.size)]
        out = []
        for s in range(self.samples):
            examples = multiview.sample(self.split, first + s, n, self.size)
            if examples:  # a sample whose frames allow no family's question is skipped: the batch is one smaller
                out.append((examples[0].frames, [(e.prompt, e.answer, multiview.FAMILIES.index(e.family))
                                                 for e in examples]))
        return out

    def batch(self, index: int, prompter=None, frames: int | None = None) -> dict:
        prompter = prompter or self.spec.prompter()
        n = self.frame_count(index) if frames is None else frames
        pixels, encoded, sample_index, family = [], [], [], []
        for s, (images, questions) in enumerate(self.items(index, n)):
            pixels += [preprocess(f, self.preprocessing)[0] for f in images]
            for prompt, answer, which in questions:
                encoded.append(sequence(prompter, prompt, answer, max(n, 1), self.mode, self.slots))
                sample_index.append(s)
                family.append(which)
        ids, labels, enc = (list(column) for column in zip(*encoded))
        pad = int(self.spec.special["pad"])
        return {"pixel_values": torch.from_numpy(np.stack(pixels)),                 # [S*n,3,H,W]
                "input_ids": pad_rows(ids, pad), "labels": pad_rows(labels, IGNORE),  # [Q,T]
                "encoder_ids": pad_rows(enc, pad),                                    # [Q,Te]
                "encoder_lengths": torch.tensor([len(e) for e in enc]),               # [Q]
                "sample_index": torch.tensor(sample_index), "family": torch.tensor(family),
                "frames": torch.tensor(max(n, 1))}



# ----------------------------------------------------------------------------- model

def encode_frames(model, vision, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (tokens [Q,n,K,D], kept patch indices [Q,n,K] or None): each question's n frames through the frozen vision
    part, with the question's prompt vector."""
    pixels, index, n = batch["pixel_values"], batch["sample_index"], int(batch["frames"])
    q = index.shape[0]
    with torch.no_grad():
        frames = pixels.view(-1, n, *pixels.shape[1:])[index].flatten(0, 1)  # [Q*n,3,H,W]
        vectors = None
        if vision.prompt_mlp is not None:
            cfg = vision.prompt_mlp.config
            vectors = encode_prompts(model, batch["encoder_ids"], batch["encoder_lengths"], cfg.prompt_layer,
                                     cfg.pooling).to(pixels.dtype).repeat_interleave(n, 0)
        out = vision(frames, vectors)  # tokens [Q*n,K,D], cls attention, (kept [Q*n,K] when the reducer keeps patches)
    tokens = out[0].view(q, n, *out[0].shape[1:])
    return tokens, out[2].view(q, n, -1) if len(out) > 2 else None


def frame_positions(kept: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """[Q,n,K] patch index of every token in its frame: the kept patches, or token i at i (a reducer that keeps
    no patch: its tokens are regions in raster order), as sdk/frames.py feeds the adapter graph."""
    if kept is not None:
        return kept
    q, n, k = tokens.shape[:3]
    return torch.arange(k, device=tokens.device).expand(q, n, k)


def combine(adapter, tokens: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """[Q,n,K,D] (kept [Q,n,K] or None) -> the image slots' tokens [Q,L,D]: concatenated (L = n*K) or pooled by
    the adapter (L = R; an adapter with positions or a shortcut reads where each token sits)."""
    if adapter is None:
        return tokens.flatten(1, 2)
    mask = torch.ones(tokens.shape[:2], device=tokens.device)
    if adapter.config.needs_positions:
        return adapter(tokens, mask, frame_positions(kept, tokens))
    return adapter(tokens, mask)


def frame_tokens(model, vision, adapter, batch: dict) -> torch.Tensor:
    """-> the image slots' tokens [Q,L,D] of a batch (encode_frames, then combine)."""
    return combine(adapter, *encode_frames(model, vision, batch))


def position_ids(model, vision, adapter, batch: dict, kept: torch.Tensor | None, positions: str):
    """[Q,T] prefill positions of concat's frames at their patch positions (kept_position_ids), or None: sequence
    positions (the adapters' R tokens always, as Pipeline._tokens gives them)."""
    if adapter is not None or positions != "patch":
        return None
    if kept is None:
        raise MultiFrameTrainError(f"patch positions need a reducer that keeps patches, not {vision.config.reducer}")
    return kept_position_ids(batch["input_ids"], model.config.image_token_index, kept, vision.config.grid ** 2)


def forward_loss(model, vision, adapter, batch: dict, positions: str = "sequence") -> dict:
    frames, kept = encode_frames(model, vision, batch)
    tokens = combine(adapter, frames, kept)  # [Q,L,D]
    embeds = embed_sequence(model, batch["input_ids"], tokens)
    ids = position_ids(model, vision, adapter, batch, kept, positions)
    # with jumping position ids the all-ones mask keeps transformers from reading packed sequences (model.py)
    lm_kwargs = {} if ids is None else {"position_ids": ids, "attention_mask": torch.ones_like(batch["input_ids"])}
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False, **lm_kwargs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE  # predict token t+1 from position t; only answer tokens
    loss = F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), targets[keep])
    # how much the image slots differ between the questions of a batch, per channel, relative to the tokens'
    # own scale: ~0 means the pooled tokens no longer depend on the frames (a collapsed adapter answers at chance)
    spread = (tokens.detach().float().std(0).mean() / tokens.detach().float().std((0, 1)).mean().clamp_min(1e-9)
              if tokens.shape[0] > 1 else tokens.new_zeros(()))
    return {"loss": loss, "answer_tokens": int(keep.sum()), "spread": spread}  # spread: a tensor, read when logged


def validate(model, vision, adapter, data: MultiViewBatches, samples: int, device, positions: str = "sequence",
             batch_samples: int = 16) -> dict:
    """Exact match per family (batched greedy, the run's own layout): the first `samples` val samples at
    data.frames[1] frames (the multi-view families), and under "single" as many val scenes of one frame (scenes.py's
    families: concat gives the LLM the frame's K tokens, an adapter its R)."""
    prompter, batch_samples = data.spec.prompter(), min(batch_samples, samples)
    val = MultiViewBatches(data.spec, data.preprocessing, batch_samples, data.size, data.frames, data.mode,
                           data.slots, split="val")
    names = list(multiview.FAMILIES) + list(scenes.FAMILIES)  # the batches' family indices
    correct, total = {}, {}
    model.eval()
    for frames in (data.frames[1], 0):  # 0: a batch of single frames (MultiViewBatches.frame_count)
        for index in range(math.ceil(samples / batch_samples)):
            batch = {k: v.to(device) for k, v in val.batch(index, prompter, frames=frames).items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tokens, kept = encode_frames(model, vision, batch)
                outputs = greedy_generate(model, vision, batch, 16, tokens=combine(adapter, tokens, kept),
                                          position_ids=position_ids(model, vision, adapter, batch, kept, positions))
            labels = batch["labels"].cpu()
            for row, tokens in enumerate(outputs):
                family = names[int(batch["family"][row])]
                answer = prompter.decode([t for t in labels[row].tolist() if t != IGNORE])
                correct[family] = correct.get(family, 0) + (normalize(prompter.decode(tokens)) == normalize(answer))
                total[family] = total.get(family, 0) + 1
    model.train()

    def score(families) -> dict:
        n = sum(total.get(f, 0) for f in families)
        return {"n": n, "overall": sum(correct.get(f, 0) for f in families) / max(1, n),
                "per_family": {f: correct[f] / total[f] for f in families if f in total}}

    return {"frames": data.frames[1], **score(multiview.FAMILIES), "single": score(scenes.FAMILIES)}


def _report(what: str, val: dict, frames: int) -> str:
    single = val["single"]
    return (f"{what} at {frames} frames: overall {val['overall']:.3f} "
            + " ".join(f"{f} {a:.2f}" for f, a in val["per_family"].items())
            + f"; one frame: overall {single['overall']:.3f} ({single['n']} questions) "
            + " ".join(f"{f} {a:.2f}" for f, a in single["per_family"].items()))


# ----------------------------------------------------------------------------- the run

def calibrate(model, vision, adapter, data: MultiViewBatches, device, batches: int = 2) -> dict:
    """FrameAdapter.calibrate on the frozen vision tokens of the first `batches` training batches at the most
    frames: the adapter's first outputs then have the per-channel mean/std of the tokens the LLM was trained on."""
    prompter, tokens = data.spec.prompter(), []
    for index in range(batches):
        batch = {k: v.to(device) for k, v in data.batch(data.start + index, prompter, frames=data.frames[1]).items()}
        t = frame_tokens(model, vision, None, batch)  # [Q,n*K,D]
        tokens.append(t.view(t.shape[0], int(batch["frames"]), -1, t.shape[-1]))
    tokens = torch.cat(tokens)
    return adapter.calibrate(tokens, torch.ones(tokens.shape[:2], device=device))


def _grad_norm(params: list) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine down to peak * min_ratio (as the other stages)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _load(args):
    from transformers import LlavaForConditionalGeneration

    from export.model.prompt import CONFIG_FILE, PromptMLP

    init = Path(args.init or "")
    if not args.init or not (init / "config.json").is_file():
        raise MultiFrameTrainError("stage mv starts from a trained checkpoint: pass --init DIR (e.g. models/default_model)")
    model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32, use_safetensors=True,
                                                          attn_implementation="sdpa")
    mlp = PromptMLP.load(init) if (init / CONFIG_FILE).is_file() and not args.no_prompt_mlp else None
    parent = json.loads((init / "train_config.json").read_text()) if (init / "train_config.json").is_file() else None
    return init, model, mlp, parent


def choose_setting(args, model_config, init: Path, parent: dict | None, adapter_cfg) -> frame_setting.VisualSetting:
    """The run's budget and positions (export/train/frame_setting.py), the separator's tokens from the tokenizer."""
    from tokenizers import Tokenizer

    vision_cfg = model_config.vision_config
    separator = len(Tokenizer.from_file(str(init / "tokenizer.json")).encode(DEFAULT_SEPARATOR,
                                                                            add_special_tokens=False).ids)
    try:
        return frame_setting.choose(args.adapter, parent, args.reducer, args.n_max,
                                    (vision_cfg.image_size // vision_cfg.patch_size) ** 2,
                                    model_config.text_config.max_position_embeddings,
                                    0 if adapter_cfg is None else adapter_cfg.queries, separator,
                                    args.budget, args.visual_positions)
    except ValueError as err:
        raise MultiFrameTrainError(f"stage mv: {err}") from None


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and (out / "train_config.json").is_file() and not args.resume:
        raise MultiFrameTrainError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if args.resume and not (out / STATE_JSON).is_file():
        raise MultiFrameTrainError(f"--resume: {out} has no {STATE_JSON} to continue from")
    lo, hi = args.frames
    if not 1 <= lo <= hi <= min(args.n_max, multiview.MAX_FRAMES):
        raise MultiFrameTrainError(f"--frames {lo} {hi}: need 1 <= MIN <= MAX <= --n-max {args.n_max} (and <= 8)")
    if args.adapter == "concat" and not args.train_llm:
        raise MultiFrameTrainError("--adapter concat has no new weights: pass --train-llm (the LLM learns to read "
                                   "several frames), or evaluate the bundle as it is")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    steps, batch_size, lr = args.steps or DEFAULTS["steps"], args.batch_size or DEFAULTS["batch_size"], args.lr or DEFAULTS["lr"]
    init, model, mlp, parent = _load(args)
    for p in model.parameters():
        p.requires_grad_(False)
    d_llm = model.config.text_config.hidden_size
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    adapter_cfg = None if args.adapter == "concat" else adapter_config(args, d_llm, grid ** 2)
    setting = choose_setting(args, model.config, init, parent, adapter_cfg)
    budget, positions = setting.budget, setting.positions
    vision = make_vision(model, budget, args.reducer, mlp)
    torch.manual_seed(args.seed)
    adapter = None if adapter_cfg is None else FrameAdapter(adapter_cfg).train()
    trainable = {} if adapter is None else {f"adapter.{n}": p for n, p in adapter.named_parameters()}
    llm = {n: p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n} if args.train_llm else {}
    for p in llm.values():
        p.requires_grad_(True)
    trainable.update(llm)
    groups = [{"params": [p for n, p in trainable.items() if n.startswith("adapter.")], "lr_scale": 1.0},
              {"params": list(llm.values()), "lr_scale": args.llm_lr_scale}]
    adapter_params, llm_params = groups[0]["params"], groups[1]["params"]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    model.to(device).train()
    vision.to(device).eval()
    if adapter is not None:
        adapter.to(device)
    start, total_steps, used = 0, steps, 0.0
    out.mkdir(parents=True, exist_ok=True)
    copy_assets(init, out)
    calibration = None
    if args.resume:
        meta = load_trainer_state(out, trainable, optimizer)
        start, total_steps, used = meta["step"], meta["total_steps"], meta.get("seconds", 0.0)
        calibration = meta.get("calibration")
    warmup = args.warmup if args.warmup is not None else max(1, int(0.05 * total_steps))

    from tokenizers import Tokenizer

    special = special_tokens(Tokenizer.from_file(str(out / "tokenizer.json")))
    spec = SequenceSpec(str(out / "tokenizer.json"), special, vision.config.num_tokens,
                        model.config.text_config.max_position_embeddings)
    preprocessing = config_from_processor(json.loads((out / "preprocessor_config.json").read_text()))
    samples = max(1, math.ceil(batch_size / len(multiview.FAMILIES)))
    offset = args.data_offset if args.data_offset is not None else DATA_OFFSET + args.seed * SEED_STRIDE
    slots = adapter.config.queries if adapter is not None else vision.config.num_tokens
    data = MultiViewBatches(spec, preprocessing, samples, model.config.vision_config.image_size, (lo, hi),
                            args.adapter, slots, offset=offset, start=start, seed=args.seed,
                            single_fraction=args.single_fraction)
    workers = args.workers if args.workers is not None else max(0, min(14, (os.cpu_count() or 2) - 2))
    if adapter is not None and adapter.config.output == "calibrated" and not args.resume:
        calibration = calibrate(model, vision, adapter, data, device)
    config = {"stage": "mv", "init": str(init), "seed": args.seed, "adapter": args.adapter,
              "adapter_config": None if adapter is None else vars(adapter.config).copy(),
              "adapter_parameters": 0 if adapter is None else parameter_count(adapter),
              "frames": [lo, hi], "n_max": args.n_max, "budget": budget, "reducer": args.reducer,
              "visual_setting": setting.to_dict(),
              "visual_tokens_per_frame": vision.config.num_tokens, "pipmm": mlp is not None,
              "frozen": ["vision_tower", "multi_modal_projector"] + (["prompt_mlp"] if mlp else []) +
                        ([] if args.train_llm else ["language_model", "lm_head"]),
              "train_llm": bool(args.train_llm), "llm_lr_scale": args.llm_lr_scale if args.train_llm else None,
              "trainable_parameters": sum(p.numel() for p in trainable.values()),
              "steps": total_steps, "batch_size": batch_size, "samples_per_batch": samples, "lr": lr, "warmup": warmup,
              "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                            "schedule": "linear warm-up, cosine to min_lr_ratio * lr", "min_lr_ratio": args.min_lr_ratio},
              "loss": "cross-entropy on answer tokens + EOS (token mean)", "positions": positions,
              "data": {"split": "train", "families": list(multiview.FAMILIES), "kinds": list(multiview.KINDS),
                       "questions_per_sample": "one per family the frames allow", "data_offset": offset,
                       "single_fraction": args.single_fraction,
                       "single": "one-frame batches of scenes.py's families (scene_items, train scenes from "
                                 "data_offset on)"},
              "adapter_calibration": calibration,
              "device": str(device), "workers": workers, "parent": parent}
    begin = time.perf_counter()

    def save(step: int, final: bool = False):
        if final and llm:  # what ships is bf16: round now so validation scores the shipped weights
            with torch.no_grad():
                for p in llm.values():
                    p.copy_(p.to(torch.bfloat16).float())
        save_model(model, out)
        if mlp is not None:
            mlp.save(out)
        if adapter is not None:
            adapter.save(out)
        seconds = used + time.perf_counter() - begin
        save_trainer_state(out, step, trainable, optimizer, {"total_steps": total_steps, "warmup": warmup,
                                                              "seconds": seconds, "calibration": calibration})
        (out / "train_config.json").write_text(json.dumps({**config, "completed_steps": step,
                                                           "train_seconds": round(seconds, 1)}, indent=2) + "\n")

    print(f"stage mv ({args.adapter}): {config['trainable_parameters'] / 1e6:.3f}M trainable, {lo}-{hi} frames of "
          f"{vision.config.num_tokens} tokens ({budget}, {positions} positions: {setting.source}), {samples} samples "
          f"a step, device {device}", flush=True)
    if args.resume:  # the step-0 validation of the run's first part
        config["val_start"] = json.loads((out / "train_config.json").read_text()).get("val_start")
    elif args.val_scenes:  # the starting point (after calibration): what training improves on
        config["val_start"] = validate(model, vision, adapter, data, args.val_scenes, device, positions)
        print(_report("validation at step 0", config["val_start"], hi), flush=True)
    log, bar, step = open(out / "log.jsonl", "a"), step_bar(start, total_steps, args.quiet, "train mv"), start
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    for batch in loader:
        if step >= total_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup, lr, args.min_lr_ratio) * group["lr_scale"]
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = forward_loss(model, vision, adapter, batch, positions)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        logged = (step + 1) % args.log_every == 0 or step + 1 == total_steps
        # per part, before clipping (does each part get a gradient at all), on logged steps only
        group_norms = {name: _grad_norm(params) for name, params in (("adapter", adapter_params), ("llm", llm_params))
                       if params} if logged else None
        norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        step += 1
        if logged:
            log.write(json.dumps({"step": step, "loss": float(losses["loss"].detach()), "grad_norm": float(norm),
                                  "grad_norms": group_norms, "spread": round(float(losses["spread"]), 4),
                                  "frames": int(batch["frames"]), "lr": optimizer.param_groups[0]["lr"],
                                  "seconds": round(used + time.perf_counter() - begin, 2)}) + "\n")
            log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {float(losses['loss'].detach()):.3f}")
        out_of_time = args.stop_after_seconds is not None and time.perf_counter() - begin > args.stop_after_seconds
        if (step == args.stop_after or out_of_time) and step < total_steps:
            save(step)
            print(f"stopped after step {step} of {total_steps}: --resume continues", flush=True)
            return 0
        if step % args.save_every == 0 and step < total_steps:
            save(step)
    log.close()
    save(step, final=True)
    if args.val_scenes:
        config["val"] = validate(model, vision, adapter, data, args.val_scenes, device, positions)
        save(step)
        print(_report("validation", config["val"], hi), flush=True)
    print(f"wrote {out} after {step} steps", flush=True)
    return 0
