"""What `pipmm train --resume` reads back from its own run directory, besides the trainer state (state.py):
the run's train_config.json (architecture, settings, resumes so far) and its last saved weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from export.train import archs
from export.train.archs import Arch
from export.train.model import ModelSizes

# flag (argparse dest) -> where train_config.json records the value the run used
_KEPT = {"lr": ("lr",), "batch_size": ("batch_size",), "data_offset": ("data_offset",),
         "instruction_fraction": ("data", "instruction_fraction"), "paraphrase_fraction": ("data", "paraphrase_fraction"),
         "aux_weight": ("aux_patch_weight",), "reduced_fraction": ("reduced_fraction",),
         "pack_questions": ("pack_questions",), "extra_questions": ("data", "extra_questions"),
         "locate_weight": ("locate_weight",), "locate_layer": ("locate_layer",),
         "steps": ("requested_steps",), "time_budget": ("time_budget_s",)}


def resumed_config(args) -> dict | None:
    """--resume: the run's own train_config.json; None without --resume."""
    if not args.resume:
        return None
    return json.loads((Path(args.out) / "train_config.json").read_text())


def keep_settings(args, resumed: dict) -> None:
    """A resume keeps the run's own settings (_KEPT) where no flag was given (argparse default None)."""
    for name, path in _KEPT.items():
        value = resumed
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if getattr(args, name) is None:
            setattr(args, name, value)


def recorded_arch(config: dict) -> Arch:
    """A train_config.json's architecture ("arch"; runs from before --arch: their model_sizes)."""
    if "arch" in config:
        return archs.from_dict(config["arch"])
    return Arch(ModelSizes(**config["model_sizes"]))


def resume_weights(out: Path):
    """--resume: the model from DIR's last save (bf16 model files, as fp32 masters). A full trainer state then
    overwrites its trainables with their fp32 copies; a portable copy (state.portable_copy) has only these."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, use_safetensors=True,
                                                         attn_implementation="sdpa")
