"""Does a one-frame adapter carry what the LLM needs? A short CPU run per adapter setting, same data, steps and seed.

    OMP_NUM_THREADS=1 python scripts/mv_adapter_probe.py --init models/default_model --steps 300 \\
        --setting old: --setting new:positions=patch,shortcut=regions --json out.json

Each frame is encoded once through the frozen vision part (PIP-MM: with its question's prompt vector from the init
LLM) and cached: `--train-scenes` train scenes and `--val-scenes` val scenes, one frame each, the single-image
families `--families`. Then per setting (NAME:KEY=VALUE,...: AdapterConfig fields over the run's defaults) a fresh
adapter (seed --seed, calibrated as stage mv does) and the LLM (as --train-llm, a fresh copy each) train on the
cached batches with stage mv's optimiser and schedule; the cache leaves the prompt vector at the init LLM's (stage mv
recomputes it with the LLM being tuned). Reported at step 0 and every --eval-every steps: the val answer loss and
exact match (teacher-forced argmax of every answer token and EOS: greedy decoding's exact match), per family; and
at step 0 what the adapter's R tokens hold: the share of their variance across questions that the image explains,
their spread across slots against across questions (a mean repeated R times: ~0), the queries' attention entropy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from export.model import mivpg
from export.model.mivpg import AdapterConfig, FrameAdapter
from export.tasks import multiview
from export.train.data import IGNORE, SequenceSpec, scene_items
from export.train.model import embed_sequence, make_vision, special_tokens
from export.train.multiframe import MultiViewBatches, combine, encode_frames, lr_at

FAMILIES = ("color", "shape", "position")


class SingleFrames(MultiViewBatches):
    """MultiViewBatches' one-frame batches, of the chosen single-image families only."""

    def __init__(self, *args, families=FAMILIES, **kwargs):
        super().__init__(*args, **kwargs)
        self.families = list(families)

    def items(self, index: int, n: int):
        first = self.offset + index * self.samples
        return [([scene.image], [(q.prompt, q.answer, len(multiview.FAMILIES) + self.families.index(q.family))
                                 for q in questions])
                for scene, questions in scene_items(self.split, first, self.samples, self.size, self.families)]


def cache(model, vision, data: SingleFrames, scenes: int) -> list[dict]:
    """Batches of `data.samples` scenes: their frozen vision tokens [Q,1,K,D], kept [Q,1,K] and sequences."""
    prompter, out = data.spec.prompter(), []
    for index in range(math.ceil(scenes / data.samples)):
        batch = data.batch(index, prompter, frames=0)
        with torch.no_grad():
            tokens, kept = encode_frames(model, vision, batch)
        out.append({"tokens": tokens, "kept": kept, "input_ids": batch["input_ids"], "labels": batch["labels"],
                    "family": batch["family"], "sample_index": batch["sample_index"]})
    return out


def answer_loss(model, batch: dict, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean answer-token loss, [Q] exact match: every answer token and EOS the argmax)."""
    embeds = embed_sequence(model, batch["input_ids"], visual)
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1]).float()  # [Q,T-1,V]
    loss = F.cross_entropy(logits[keep], targets[keep])
    exact = ((logits.argmax(-1) == targets) | ~keep).all(1)
    return loss, exact


def evaluate(model, adapter, val: list[dict], names: list[str]) -> dict:
    model.eval()
    losses, right, total = [], {}, {}
    with torch.no_grad():
        for batch in val:
            loss, exact = answer_loss(model, batch, combine(adapter, batch["tokens"], batch["kept"]))
            losses.append(float(loss.detach()))
            for f, e in zip(batch["family"].tolist(), exact.tolist()):
                right[names[f]] = right.get(names[f], 0) + e
                total[names[f]] = total.get(names[f], 0) + 1
    model.train()
    return {"loss": round(sum(losses) / len(losses), 4),
            "exact": round(sum(right.values()) / sum(total.values()), 3),
            "per_family": {f: round(right[f] / total[f], 3) for f in total}}


def holds(adapter, batch: dict) -> dict:
    """What the R tokens of one val batch hold (no training): image share of their variance, spread, entropy."""
    entropy, plain = {}, mivpg.Attention.forward

    def recording(self, x, memory, key_mask=None):  # the attention weights of every cross-attention, as forward
        q, k = self._split(self.q(x)), self._split(self.k(memory))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if key_mask is not None:
            scores = torch.where(key_mask[:, None, None, :], scores, torch.full_like(scores, mivpg.NEG))
        p = torch.softmax(scores, -1)
        entropy.setdefault(self.name, []).append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()
                                                       / math.log(p.shape[-1])))
        return plain(self, x, memory, key_mask)

    for name, module in adapter.named_modules():
        if isinstance(module, mivpg.Attention):
            module.name = name
    mivpg.Attention.forward = recording
    try:
        with torch.no_grad():
            out = combine(adapter, batch["tokens"], batch["kept"]).double()  # [Q,R,D]
    finally:
        mivpg.Attention.forward = plain
    scene = batch["sample_index"]
    flat = out.flatten(1)
    means = torch.stack([flat[scene == s].mean(0) for s in scene.unique()])[torch.searchsorted(scene.unique(), scene)]
    image_share = float(((means - flat.mean(0)) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum())
    return {"image_share": round(image_share, 3), "std_across_slots": round(float(out.std(1).mean()), 3),
            "std_across_questions": round(float(out.std(0).mean()), 3),
            "cross_entropy_over_log_m": {n: round(sum(v) / len(v), 3) for n, v in entropy.items()
                                         if n.endswith("cross.attn")}}


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, pairs = text.partition(":")
    settings = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        settings[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, settings


def train_one(model, base: AdapterConfig, settings: dict, train: list[dict], val: list[dict], names, args) -> dict:
    torch.manual_seed(args.seed)
    adapter = FrameAdapter(AdapterConfig(**{**vars(base), **settings})).train()
    model = copy.deepcopy(model).train()
    if adapter.config.output == "calibrated":  # stage mv's calibrate(): the frozen tokens of the first batches
        tokens = torch.cat([b["tokens"] for b in train[:2]])
        adapter.calibrate(tokens, torch.ones(tokens.shape[:2]))
    llm = [p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in llm:
        p.requires_grad_(True)
    groups = [{"params": list(adapter.parameters()), "lr_scale": 1.0},
              {"params": llm, "lr_scale": args.llm_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(0.05 * args.steps))
    report = {"settings": settings, "holds_at_step_0": holds(adapter, val[0]), "curve": []}
    report["curve"].append({"step": 0, **evaluate(model, adapter, val, names)})
    print(json.dumps(report["holds_at_step_0"]), "\n", json.dumps(report["curve"][-1]), flush=True)
    begin, losses = time.perf_counter(), []
    for step in range(args.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.steps, warmup, args.lr, 0.1) * g["lr_scale"]
        batch = train[step % len(train)]
        loss, _ = answer_loss(model, batch, combine(adapter, batch["tokens"], batch["kept"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(adapter.parameters()) + llm, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                   **evaluate(model, adapter, val, names), "seconds": round(time.perf_counter() - begin, 1)}
            report["curve"].append(row)
            print(json.dumps(row), flush=True)
    report["holds_at_end"] = holds(adapter.eval(), val[0])
    print(json.dumps(report["holds_at_end"]), flush=True)
    return report


def main() -> int:
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration

    from export.model.prompt import PromptMLP
    from sdk.preprocess import config_from_processor

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="models/default_model")
    p.add_argument("--mode", default="qformer", choices=("qformer", "mivpg"))
    p.add_argument("--setting", action="append", required=True, help="NAME:KEY=VALUE,... (AdapterConfig fields)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--train-scenes", type=int, default=320)
    p.add_argument("--val-scenes", type=int, default=48)
    p.add_argument("--scenes-per-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--llm-lr-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    init = Path(args.init)
    model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32, use_safetensors=True)
    parent = json.loads((init / "train_config.json").read_text())
    vision = make_vision(model, parent.get("budget", "half"), "prompt-topk", PromptMLP.load(init)).eval()
    vcfg = model.config.vision_config
    base = AdapterConfig(mode=args.mode, d_in=model.config.text_config.hidden_size,
                         num_patches=(vcfg.image_size // vcfg.patch_size) ** 2)
    spec = SequenceSpec(str(init / "tokenizer.json"), special_tokens(Tokenizer.from_file(str(init / "tokenizer.json"))),
                        vision.config.num_tokens, model.config.text_config.max_position_embeddings)
    pre = config_from_processor(json.loads((init / "preprocessor_config.json").read_text()))
    make = lambda split: SingleFrames(spec, pre, args.scenes_per_batch, vcfg.image_size, (1, 1), args.mode,
                                      base.queries, split=split, families=args.families)
    begin = time.perf_counter()
    train, val = cache(model, vision, make("train"), args.train_scenes), cache(model, vision, make("val"), args.val_scenes)
    print(f"cached {sum(len(b['input_ids']) for b in train)} train and {sum(len(b['input_ids']) for b in val)} val "
          f"questions ({vision.config.num_tokens} tokens a frame) in {time.perf_counter() - begin:.0f} s", flush=True)
    names = list(multiview.FAMILIES) + list(args.families)
    results = {"command": vars(args), "tokens_per_frame": vision.config.num_tokens, "settings": {}}
    for text in args.setting:
        name, settings = parse_setting(text)
        print(f"== {name} {settings}", flush=True)
        results["settings"][name] = train_one(model, base, settings, train, val, names, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
