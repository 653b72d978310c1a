"""The frozen source MLLM a TVP prompt is trained on: the checkpoint as it ships (PIP-MM, budget, reducer, positions).

    SourceModel.load("models/default_model")   # PIP-MM with its prompt MLP, half budget, prompt-topk, patch positions

Settings not given are read from the checkpoint's train_config.json (what `pipmm train` recorded), so the model
the prompt is trained against is the one its bundle runs; the SDK's own Prompter (the bundle's chat template,
its K image slots) builds the sequences. Every weight is frozen; only the prompt's delta gets gradients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdk.prompting import Prompter
from sdk.visual_prompt import VisualPrompt, input_size

from export.model.checkpoint import load_checkpoint
from export.model.prompt import CONFIG_FILE as PROMPT_MLP_CONFIG, PromptMLP
from export.train.model import forward_loss
from export.tvp.transform import channel_stats
from export.writer import build_manifest, build_modules


@dataclass
class SourceModel:
    model: torch.nn.Module  # LlavaForConditionalGeneration, frozen
    vision: torch.nn.Module  # export.model.vision.PipmmVision over the model's tower and projector
    prompter: Prompter
    preprocessing: dict
    patch_positions: bool
    description: dict  # what the prompt's settings record about its source

    @classmethod
    def load(cls, checkpoint, prompt_mlp=None, budget=None, reducer=None, visual_positions=None,
             device: torch.device = torch.device("cpu")) -> "SourceModel":
        path = Path(checkpoint)
        recorded = path / "train_config.json"
        trained = json.loads(recorded.read_text()) if recorded.is_file() else {}
        if prompt_mlp is None and (path / PROMPT_MLP_CONFIG).is_file() and trained.get("pipmm", True):
            prompt_mlp = path
        budget = budget or trained.get("budget", "full")
        reducer = reducer or trained.get("reducer", "pool")
        visual_positions = visual_positions or trained.get("visual_positions")
        ckpt = load_checkpoint(path)
        mlp = PromptMLP.load(prompt_mlp).eval() if prompt_mlp else None
        modules = build_modules(ckpt, mlp, budget=budget, reducer=reducer)
        manifest = build_manifest(ckpt, modules, mlp, visual_positions=visual_positions)
        for p in list(ckpt.model.parameters()) + (list(mlp.parameters()) if mlp is not None else []):
            p.requires_grad_(False)
        ckpt.model.to(device)
        vision = modules["vision"].to(device)
        prompter = Prompter.for_manifest(ckpt.tokenizer_file, manifest)
        description = {"checkpoint": str(path), "prompt_mlp": None if prompt_mlp is None else str(prompt_mlp),
                       "pipmm": mlp is not None, "budget": str(budget), "reducer": reducer,
                       "visual_tokens": manifest.visual_tokens.count, "visual_positions": manifest.visual_tokens.positions,
                       "text_architecture": manifest.model.text_architecture}
        return cls(ckpt.model, vision, prompter, manifest.image_preprocessing,
                   manifest.visual_tokens.positions == "patch", description)

    @property
    def image_size(self) -> int:
        size = input_size(self.preprocessing)
        if size is None or size[0] != size[1]:
            raise ValueError(f"TVP needs a square, fixed input; this checkpoint's preprocessing gives {size}")
        return size[0]

    @property
    def pad_id(self) -> int:
        return int(self.prompter.special.pad if self.prompter.special.pad is not None else 0)

    def zero_prompt(self, frame: int, geometry: str) -> VisualPrompt:
        """A zero prompt of this input size: the geometry (inner side, frame) the data is prepared with."""
        import numpy as np

        size = self.image_size
        return VisualPrompt(np.zeros((3, size, size), np.float32), frame, size, geometry=geometry)

    @property
    def stats(self):
        return channel_stats(self.preprocessing)

    def answer_loss(self, pixel_values: torch.Tensor, batch: dict) -> torch.Tensor:
        """L_LM: the cross-entropy of the answers (+ EOS) given the prompted pixels, as `pipmm train` scores it."""
        return forward_loss(self.model, self.vision, {"pixel_values": pixel_values, **batch},
                            patch_positions=self.patch_positions)["lm_loss"]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's patch features [S, N, D] at its feature layers, with its own class embedding (prompt-agnostic)."""
        return self.vision.features(pixel_values, None)[0]
