"""`pipmm train`: the embedded default model, from scratch, on generated scenes.

    stage 0  a small LLaVA (CLIP ViT with a class token + projector + Llama with GQA), all weights,
             full visual-token budget, plain class embedding                     --out ckpt/stage0
    stage 1  PIP-MM: everything frozen, train the prompt MLP (T-CLS = MLP(prompt vector)), full budget
             --init ckpt/stage0                                                   --out ckpt/stage1
    stage 2  prompt MLP + projector (+ LLM with --train-llm) at the reduced budget (--budget, --reducer)
             --init ckpt/stage1                                                   --out ckpt/stage2
    stage 2 --no-prompt-mlp: the fair baseline, plain LLaVA's projector fine-tuned at the same budget
             --init ckpt/stage0                                                   --out ckpt/plain2

Loss: cross-entropy on the answer tokens and EOS only (export.train.model.forward_loss). Every
choice is written to DIR/train_config.json; see export/state.py for the files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from sdk.errors import PipmmError
from sdk.preprocess import clip_processor_config

from export.model.reducers import resolve_budget
from export.tasks import instructions, paraphrase, scenes
from export.tasks.answers import normalize
from export.train import archs, multiframe
from export.train.train_args import add_arguments  # noqa: F401  (sdk/cli.py's VERBS read it here)
from export.train.data import (SCENE_MIXES, SceneBatches, SequenceSpec, build_tokenizer, collate_scenes, data_mix,
                               loader, scene_items)
from export.train.locate import locate_setting
from export.train.progress import resolve_device, step_bar
from export.train.model import (ModelSizes, aux_head_outputs, build_llava, forward_loss, greedy_generate, make_vision, parameter_counts,
                          special_tokens)
from export.train.state import (STATE_JSON, copy_assets, load_trainer_state, save_model,
                          save_trainer_state)
from export.train.archs import Arch
from export.train.resume import keep_settings, recorded_arch, resume_weights, resumed_config
from export.train.templates import DEFAULT as DEFAULT_TEMPLATE, TEMPLATES, check_prefix, write_template

# Where each stage's stream of train scenes starts (scene index in the train split), per seed
# += SEED_STRIDE: stages and seeds never see the same scenes.
DATA_OFFSET = {0: 0, 1: 100_000_000, 2: 200_000_000}
SEED_STRIDE = 10_000_000
INSTRUCTION_FRACTION = {0: 0.1, 1: 0.0, 2: 0.0}  # default --instruction-fraction per stage
DEFAULTS = {  # per stage: steps, questions per step, peak learning rate
    0: {"steps": 3000, "batch_size": 256, "lr": 1e-3},
    1: {"steps": 600, "batch_size": 128, "lr": 1e-3},
    2: {"steps": 600, "batch_size": 128, "lr": 3e-4},
}


class TrainError(PipmmError):
    """A training argument or an --init/--resume directory does not fit."""


_SIZE_FLAGS = ("image_size", "vocab_size", "vision_hidden", "vision_layers", "vision_heads", "vision_mlp",
               "text_hidden", "text_layers", "text_heads", "text_kv_heads", "text_mlp")


def _arch(args, resumed: dict | None) -> Arch:
    """Stage 0 from scratch: the resumed run's architecture (its train_config.json, whatever the flags), else
    --arch (export/train/archs.py), --tiny or r11's sizes, with the size flags on top."""
    if resumed is not None:
        return recorded_arch(resumed)
    if args.arch and args.tiny:
        raise TrainError("--arch and --tiny both name the sizes: pass one")
    arch = archs.resolve(args.arch) if args.arch else Arch(ModelSizes.tiny() if args.tiny else ModelSizes())
    for field in _SIZE_FLAGS:
        if getattr(args, field, None) is not None:
            setattr(arch.sizes, field, getattr(args, field))
    return arch


def _template(args, parent: dict | None) -> str:
    """--template, else the parent checkpoint's (train_config.json "template"; older ones: llava-1.5)."""
    if args.template is not None:
        return args.template
    return (parent or {}).get("template", DEFAULT_TEMPLATE)


def _load_init(init: Path):
    from transformers import LlavaForConditionalGeneration

    if not (init / "train_config.json").is_file():
        raise TrainError(f"--init {init} has no train_config.json: pass a directory written by pipmm train")
    model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32, use_safetensors=True,
                                                          attn_implementation="sdpa")
    return model, json.loads((init / "train_config.json").read_text())


def _new_prompt_mlp(model, args):
    """T-CLS starts as the checkpoint's own class embedding (fc2 = 0, bias = class embedding), so stage 1
    begins exactly at the plain model and only moves away where the prompt helps."""
    from export.model.prompt import PromptMLP, PromptMLPConfig

    vit = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    config = PromptMLPConfig(d_llm=model.config.text_config.hidden_size, d_vit=model.config.vision_config.hidden_size,
                             d_mid=args.mlp_width, prompt_layer=args.prompt_layer, pooling=args.pooling)
    torch.manual_seed(args.seed)
    mlp = PromptMLP(config)
    with torch.no_grad():
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.copy_(vit.embeddings.class_embedding)
    return mlp


def setup(args):
    """-> (model, prompt MLP or None, vision module, trainable {name: param}, Arch, parent config, source dir,
    auxiliary head or None)."""
    out = Path(args.out)
    stage = args.stage
    parent = None
    resumed = resumed_config(args)
    saved_weights = args.resume and any(out.glob("model*.safetensors"))
    if stage == 0 and not args.init:
        arch = _arch(args, resumed)
        sizes = arch.sizes
        if args.resume and (out / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        else:
            tokenizer = build_tokenizer(args.tokenizer_scenes, sizes.vocab_size, template=_template(args, None),
                                        split=SCENE_MIXES[args.scene_mix], answerless=arch.answerless)
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(out / "tokenizer.json"))
        sizes.vocab_size = tokenizer.get_vocab_size()
        model = resume_weights(out) if saved_weights else build_llava(sizes, tokenizer, seed=args.seed)
        (out / "preprocessor_config.json").write_text(json.dumps(clip_processor_config(sizes.image_size), indent=2))
        (out / "special_tokens.json").write_text(json.dumps(special_tokens(tokenizer)) + "\n")
        src = out
    else:
        if not args.init:
            raise TrainError(f"stage {stage} starts from a trained checkpoint: pass --init DIR")
        if args.arch:
            raise TrainError("--arch is for stage 0 from scratch: a run with --init keeps its checkpoint's sizes")
        # (stage 0 with --init: more base training of every weight, with a fresh optimizer and schedule)
        src = Path(args.init)
        model, parent = _load_init(src)
        arch = Arch(ModelSizes(**parent["model_sizes"]), recorded_arch(parent).answerless)
        sizes = arch.sizes
        out.mkdir(parents=True, exist_ok=True)
        copy_assets(src, out)
        if saved_weights:
            model = resume_weights(out)
    mlp = None
    budget = args.budget or ("half" if stage == 2 else "full")
    if stage == 1 and args.no_prompt_mlp:
        raise TrainError("stage 1 trains the prompt MLP: --no-prompt-mlp makes no sense there")
    from export.model.prompt import CONFIG_FILE, PromptMLP

    if stage in (1, 2) and saved_weights and (out / CONFIG_FILE).is_file():
        mlp = PromptMLP.load(out)  # --resume: the run's own MLP (a full trainer state overwrites it again)
    elif stage == 1:
        mlp = _new_prompt_mlp(model, args)
    elif stage == 2 and not args.no_prompt_mlp:
        if not (src / CONFIG_FILE).is_file():
            raise TrainError(f"--init {src} has no prompt MLP: start stage 2 from stage 1, or pass --no-prompt-mlp")
        mlp = PromptMLP.load(src)
    for p in model.parameters():
        p.requires_grad_(stage == 0)
    trainable = {}
    if stage == 0:
        trainable = {n: p for n, p in model.named_parameters()}
    if mlp is not None:
        trainable.update({f"prompt_mlp.{n}": p for n, p in mlp.named_parameters()})
    if stage == 2:
        trainable.update({n: p for n, p in model.named_parameters() if "multi_modal_projector" in n})
        if args.train_llm:
            trainable.update({n: p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n})
    for p in trainable.values():
        p.requires_grad_(True)
    vision = make_vision(model, budget, args.reducer, mlp)
    aux_head = None
    if stage == 0 and _aux_weight(args) > 0:
        # Training-only: a linear classifier over the visual tokens, kept in the trainer state (resume)
        # but not in the model files; see model.aux_patch_loss.
        torch.manual_seed(args.seed + 1)
        aux_head = torch.nn.Linear(model.config.text_config.hidden_size,
                                   aux_head_outputs(sizes.image_size // sizes.patch_size))
        trainable.update({f"aux_head.{n}": p for n, p in aux_head.named_parameters()})
    return model, mlp, vision, trainable, arch, parent, src, aux_head


def _aux_weight(args) -> float:
    if args.aux_weight is not None and args.aux_weight > 0 and args.stage != 0:
        raise TrainError("--aux-weight is a stage-0 loss (the plain model at full budget)")
    return (1.0 if args.aux_weight is None else args.aux_weight) if args.stage == 0 else 0.0


def _config(args, arch, model, mlp, vision, trainable, parent, resolved: dict) -> dict:
    return {
        "stage": args.stage, "init": args.init, "seed": args.seed,
        "model_sizes": arch.sizes.to_dict(),
        "arch": arch.to_dict(),
        "parameters": parameter_counts(model, mlp),
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "trainable": sorted({_part(n) for n in trainable}),
        "pipmm": mlp is not None,
        "prompt_mlp": None if mlp is None else vars(mlp.config).copy(),
        "vision": vision.config.to_dict(),
        "budget": vision.config.budget, "reducer": vision.config.reducer, "visual_tokens": vision.config.num_tokens,
        "grounding_weight": args.grounding_weight if mlp is not None else 0.0,
        "aux_patch_weight": _aux_weight(args),
        "locate_weight": args.locate_weight or 0.0, "locate_layer": args.locate_layer if args.locate_weight else None,
        "reduced_fraction": args.reduced_fraction if args.stage == 0 else 0.0,
        "reduced_budgets": list(args.reduced_budgets) if args.stage == 0 and args.reduced_fraction > 0 else None,
        "pack_questions": bool(args.pack_questions),
        "train_llm": bool(args.train_llm),
        "template": _template(args, parent),  # export/train/templates.py; the export reads DIR/chat_template.jinja
        "chat_template": {k: getattr(TEMPLATES[_template(args, parent)].chat, k) for k in ("prompt", "prompt_encoder")},
        "visual_positions": "patch" if args.patch_positions else "sequence",
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "schedule": "linear warm-up, cosine to min_lr_ratio * lr", "min_lr_ratio": args.min_lr_ratio},
        "loss": "cross-entropy on answer tokens + EOS (token mean)",
        "precision": "fp32 master weights, bf16 autocast on CUDA; checkpoint weights saved in bf16",
        "data": {**data_mix(args.scene_mix), "questions_per_scene": "one per family",
                 "extra_questions": args.extra_questions,
                 "instruction_fraction": args.instruction_fraction,
                 "paraphrase_fraction": args.paraphrase_fraction,
                 "paraphrase": paraphrase.settings() if args.paraphrase_fraction else None,
                 "instructions": {n: list(i.train_texts) for n, i in instructions.TRAINED.items()}
                 if args.instruction_fraction else None,
                 "tokenizer_scenes": args.tokenizer_scenes if args.stage == 0 else None},
        **resolved,
        "parent": parent,
    }


def _part(name: str) -> str:
    for part in ("prompt_mlp", "vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        if part in name:
            return part
    return name


def _lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def validate(model, vision, spec: SequenceSpec, preprocessing: dict, n_scenes: int, device, grid: int,
             image_size: int, batch_scenes: int = 32, max_new_tokens: int = 64) -> dict:
    """Exact match per family on the first n_scenes validation scenes (batched greedy decoding)."""

    prompter = spec.prompter()
    correct, total = {}, {}
    model.eval()
    for first in range(0, n_scenes, batch_scenes):
        items = scene_items("val", first, min(batch_scenes, n_scenes - first), image_size)
        batch = _to(collate_scenes(items, spec, prompter, preprocessing, grid), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = greedy_generate(model, vision, batch, max_new_tokens)
        questions = [q for _, qs in items for q in qs]
        for q, tokens in zip(questions, outputs):
            ok = normalize(prompter.decode(tokens)) == normalize(q.answer)
            correct[q.family] = correct.get(q.family, 0) + ok
            total[q.family] = total.get(q.family, 0) + 1
    model.train()
    acc = {f: correct[f] / total[f] for f in total}
    return {"per_family": acc, "n": sum(total.values()),
            "overall": sum(correct.values()) / max(1, sum(total.values()))}


def run(args) -> int:
    if args.stage == "mv":
        if args.paraphrase_fraction or args.extra_questions:
            raise TrainError("--paraphrase-fraction and --extra-questions are for stages 0-2: --stage mv asks its "
                             "own multi-frame questions (export/tasks/multiview.py)")
        return multiframe.run(args)
    out = Path(args.out)
    if out.exists() and any(out.glob("model*.safetensors")) and not args.resume:
        raise TrainError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if args.resume and not (out / STATE_JSON).is_file():
        raise TrainError(f"--resume: {out} has no {STATE_JSON} to continue from")
    resumed = resumed_config(args)
    if resumed is not None:
        keep_settings(args, resumed)
    if args.instruction_fraction is None:
        args.instruction_fraction = INSTRUCTION_FRACTION[args.stage]
    if args.paraphrase_fraction is None:
        args.paraphrase_fraction = 0.0
    if args.reduced_fraction is None:
        args.reduced_fraction = 0.0
    args.pack_questions = bool(args.pack_questions)
    args.extra_questions = dict(args.extra_questions or {})  # [(family, n)] from the flag, {family: n} from a resume
    if args.pack_questions and (args.stage != 0 or args.reduced_fraction > 0):
        raise TrainError("--pack-questions is a stage-0 setting without --reduced-fraction (a reduced question "
                         "reads its own subset of the image, at its own positions)")
    if not 0 <= args.paraphrase_fraction <= 1:
        raise TrainError(f"--paraphrase-fraction {args.paraphrase_fraction} is outside 0-1")
    if not 0 <= args.instruction_fraction <= 1:
        raise TrainError(f"--instruction-fraction {args.instruction_fraction} is outside 0-1")
    device = resolve_device(args.device, TrainError)
    defaults = DEFAULTS[args.stage]
    steps = args.steps or defaults["steps"]
    batch_size = args.batch_size or defaults["batch_size"]
    lr = args.lr or defaults["lr"]
    per_scene = len(scenes.split_families(SCENE_MIXES[args.scene_mix])) + sum(args.extra_questions.values())
    scenes_per_batch = max(1, math.ceil(batch_size / per_scene))
    workers = args.workers if args.workers is not None else max(0, min(14, (os.cpu_count() or 2) - 2))

    model, mlp, vision, trainable, arch, parent, src, aux_head = setup(args)
    sizes = arch.sizes
    aux_weight = _aux_weight(args)
    if aux_head is not None:
        aux_head.to(device).train()
    locate = locate_setting(args, model.config.text_config.hidden_size, sizes.text_layers)  # (head, layer, weight)
    if locate:
        trainable.update({f"locate_head.{n}": p for n, p in locate[0].named_parameters()})
        locate[0].to(device).train()
    model.to(device).train()
    vision.to(device)  # the reducer's buffers (pool matrix) are the vision module's own
    if mlp is not None:
        mlp.to(device).train()
    decay = [p for n, p in trainable.items() if p.dim() >= 2]
    no_decay = [p for n, p in trainable.items() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    start, total_steps, time_used = 0, steps, 0.0
    resumes = list((resumed or {}).get("resumes", []))  # every --resume of this run: step, optimizer kept or fresh
    rewarm = 0  # steps of learning-rate ramp after a resume without optimizer state
    if args.resume:
        try:
            meta = load_trainer_state(out, trainable, optimizer)
        except ValueError as err:  # a partial copy, or other trainables than the saved run's
            raise TrainError(str(err)) from None
        start, total_steps, time_used = meta["step"], meta["total_steps"], meta.get("seconds", 0.0)
        rewarm = 0 if meta["optimizer_restored"] else max(1, args.rewarmup)
        resumes.append({"step": start, "optimizer": "restored" if meta["optimizer_restored"] else "fresh",
                        "rewarmup": rewarm})
        print(f"resumed at step {start} of {total_steps}: "
              + ("optimizer state restored" if rewarm == 0 else
                 f"bf16 weights, fresh optimizer, learning rate re-warmed over {rewarm} steps"), flush=True)
    warmup = args.warmup if args.warmup is not None else max(1, int(0.05 * steps))
    if args.resume:
        warmup = meta.get("warmup", warmup)

    special = special_tokens(_tokenizer(out))
    template = _template(args, parent)
    spec = SequenceSpec(str(out / "tokenizer.json"), special, vision.config.num_tokens, sizes.max_positions, template)
    if TEMPLATES[template].prompt_first:  # the device reuses the prompt pass's KV cache: its ids must be a prefix
        items = scene_items("val", 0, 64, 112, instruction_fraction=1.0) + scene_items("val", 0, 64, 112)
        if args.paraphrase_fraction:  # reworded prompts end in other characters (spaces, '??', 'Thanks!')
            items += scene_items("val", 0, 64, 112, instruction_fraction=0.5, paraphrase_fraction=1.0)
        check_prefix(spec.prompter(), [q.prompt for _, qs in items for q in qs], template)
    write_template(out, template)
    preprocessing = _preprocessing(out)
    grid = sizes.image_size // sizes.patch_size
    offset = args.data_offset if args.data_offset is not None else DATA_OFFSET[args.stage] + args.seed * SEED_STRIDE
    data = SceneBatches(spec, preprocessing, scenes_per_batch, sizes.image_size, grid, seed_offset=offset, start=start,
                        split=SCENE_MIXES[args.scene_mix], instruction_fraction=args.instruction_fraction,
                        paraphrase_fraction=args.paraphrase_fraction, pack=args.pack_questions,
                        extra_questions=args.extra_questions)
    if args.pack_questions and TEMPLATES[template].prompt_first:
        raise TrainError("--pack-questions needs the image before the question (not the prompt-first template)")
    resolved = {"steps": total_steps, "requested_steps": steps, "time_budget_s": args.time_budget,
                "batch_size": batch_size, "scenes_per_batch": scenes_per_batch, "lr": lr, "warmup": warmup,
                "data_offset": offset, "workers": workers, "device": str(device), "resumes": resumes}
    if resumed is not None and "measured_steps_per_s" in resumed:  # measured by the run's first call
        resolved["measured_steps_per_s"] = resumed["measured_steps_per_s"]

    def write_config(extra=None):
        config = _config(args, arch, model, mlp, vision, trainable, parent, {**resolved, **(extra or {})})
        (out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return config

    def checkpoint(step: int, final: bool = False):
        if final:  # what ships is bf16: round now so validation scores the shipped weights
            with torch.no_grad():
                for p in trainable.values():
                    p.copy_(p.to(torch.bfloat16).float())
        save_model(model, out)
        if mlp is not None:
            mlp.save(out)
        save_trainer_state(out, step, trainable, optimizer, {"total_steps": total_steps, "warmup": warmup,
                                                                  "seconds": elapsed()}, model_names)
        write_config({"completed_steps": step})

    model_names = frozenset(n for n, _ in model.named_parameters())  # what save_model writes (bf16)
    counts = parameter_counts(model, mlp)
    print(f"stage {args.stage}: {counts['total'] / 1e6:.2f}M parameters ({sum(p.numel() for p in trainable.values()) / 1e6:.3f}M "
          f"trainable), {vision.config.num_tokens} visual tokens, device {device}, {workers} data workers", flush=True)
    write_config()
    log = open(out / "log.jsonl", "a")
    bar = step_bar(start, total_steps, args.quiet, "train")
    begin = time.perf_counter()

    def elapsed():
        return time_used + time.perf_counter() - begin

    step, timing_from = start, None
    frozen_prompt = not args.train_llm
    if args.patch_positions and (args.stage != 2 or vision.config.reducer != "prompt-topk"):
        raise TrainError("--patch-positions is a stage-2 setting of the prompt-topk reducer")
    reduced_budgets = ()
    if args.reduced_fraction > 0:
        if args.stage != 0 or not 0 < args.reduced_fraction <= 1:
            raise TrainError("--reduced-fraction is a stage-0 setting in (0, 1]")
        reduced_budgets = tuple(resolve_budget(b, grid * grid) for b in args.reduced_budgets)
        keep_rng = torch.Generator(device=device).manual_seed(args.seed * 1000 + start)
    data_wait, waited_from = 0.0, time.perf_counter()  # seconds spent waiting on the scene workers
    for batch in loader(data, workers):
        data_wait += time.perf_counter() - waited_from
        if step >= total_steps:
            break
        ramp = min(1.0, (step - start + 1) / rewarm) if rewarm else 1.0
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total_steps, warmup, lr, args.min_lr_ratio) * ramp
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = forward_loss(model, vision, batch, args.grounding_weight if mlp is not None else 0.0,
                                  frozen_llm_for_prompt=frozen_prompt, aux_head=aux_head, aux_weight=aux_weight,
                                  reduced=(args.reduced_fraction, reduced_budgets, keep_rng) if reduced_budgets else None,
                                  patch_positions=args.patch_positions, locate=locate)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        step += 1
        # Steps that fit the time budget, from the rate measured after the data workers warmed up
        # (steps 50-150 of the run, again at 1000); the hard stop below catches any drift.
        if args.time_budget and not args.resume and step - start == 50:
            timing_from = (step, time.perf_counter())
        if args.time_budget and not args.resume and timing_from and step - start in (150, 1000):
            rate = (step - timing_from[0]) / (time.perf_counter() - timing_from[1])
            left = args.time_budget - (time.perf_counter() - begin)
            total_steps = min(steps, max(step + 1, step + int(rate * left)))
            resolved.update(steps=total_steps, measured_steps_per_s=round(rate, 2))
            bar.total = total_steps
            write_config()
        if args.time_budget and not args.resume and time.perf_counter() - begin > args.time_budget and step < total_steps:
            total_steps = step  # a hard stop too: the measured rate can drift
            resolved.update(steps=total_steps)
        if step % args.log_every == 0 or step == total_steps:
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(norm),
                      "questions": int(batch["scene_index"].shape[0]), "seconds": round(elapsed(), 2),
                      "data_wait_s": round(data_wait, 2),
                      **{k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix_str(f"loss {record['loss']:.3f}")
        bar.update(1)
        out_of_time = args.stop_after_seconds is not None and time.perf_counter() - begin > args.stop_after_seconds
        if (step == args.stop_after or out_of_time) and step < total_steps:
            checkpoint(step)
            bar.close()
            log.close()
            print(f"stopped after step {step} of {total_steps}: --resume continues", flush=True)
            return 0
        if step % args.save_every == 0 and step < total_steps:
            checkpoint(step)
        waited_from = time.perf_counter()
    bar.close()
    log.close()
    resolved["train_seconds"] = round(time.perf_counter() - begin, 1)
    checkpoint(step, final=True)
    if args.val_scenes:
        result = validate(model, vision, spec, preprocessing, args.val_scenes, device, grid, sizes.image_size)
        resolved["val"] = result
        write_config({"completed_steps": step})
        per = " ".join(f"{f} {a:.2f}" for f, a in result["per_family"].items())
        print(f"validation ({result['n']} questions): overall {result['overall']:.3f} | {per}", flush=True)
    print(f"wrote {out} after {step} steps in {resolved['train_seconds']} s", flush=True)
    return 0


def _tokenizer(out: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json"))


def _preprocessing(out: Path) -> dict:
    from sdk.preprocess import config_from_processor

    return config_from_processor(json.loads((out / "preprocessor_config.json").read_text()))


