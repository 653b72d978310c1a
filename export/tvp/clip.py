"""SceneClip: a small CLIP-style image-text model of the generated scenes, TVP's frozen guide for TSE.

TVP's Task Semantics Enrichment pulls the prompted image towards the text of its content in a frozen image-text
model's space. No image-text model can be downloaded here, and the guide must not be any of the MLLMs the prompt
is trained on or transferred to, so this one is trained from scratch (export/tvp/clip_train.py) on clean scenes
and their captions ("large purple circle, small green square, ..."), contrastively:

    pixels [B, 3, S, S] in [0, 1] --normalise--> conv stem /2 --> stages (conv /2, conv) x len(widths)
        --> mean over space --> linear --> image embedding [B, E] (unit norm)
    caption words [B, T] --embed + positions--> transformer encoder (padding masked) --> mean over words
        --> linear --> text embedding [B, E] (unit norm)
    similarity = exp(logit_scale) * cosine   (CLIP's logits_per_image; symmetric InfoNCE trains it)

Files: clip.safetensors (weights, fp32) + clip.json (ClipConfig and how it was trained).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdk.errors import PipmmError
from sdk.preprocess import CLIP_MEAN, CLIP_STD

from export.tasks import scenes

CONFIG_FILE = "clip.json"
WEIGHTS_FILE = "clip.safetensors"
SPECIALS = ("<pad>", "<unk>", ",")


class ClipError(PipmmError, ValueError):
    """A SceneClip directory that cannot be read."""


def caption_vocabulary() -> list[str]:
    """Every word a scene caption can hold (scenes.py's sizes, colours, shapes), after the special tokens."""
    return list(SPECIALS) + list(scenes.SIZES) + list(scenes.COLORS) + list(scenes.SHAPES)


@dataclass
class ClipConfig:
    image_size: int = 224
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 192])  # channels per stage (each halves H, W)
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_words: int = 48  # 12 objects x (3 words + comma)
    vocab: list[str] = field(default_factory=caption_vocabulary)
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    @classmethod
    def tiny(cls, image_size: int = 28) -> "ClipConfig":
        return cls(image_size=image_size, widths=[8, 16], embed_dim=16, text_width=16, text_layers=1, text_heads=2)


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|,", caption.lower())


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.GELU())


class SceneClip(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 5, 2, 2), nn.GroupNorm(min(8, w[0]), w[0]), nn.GELU())
        self.stages = nn.Sequential(*[nn.Sequential(_block(a, b, 2), _block(b, b, 1)) for a, b in zip(w, w[1:] + w[-1:])])
        self.image_proj = nn.Linear(w[-1], config.embed_dim)
        self.word_embedding = nn.Embedding(len(config.vocab), config.text_width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_words, config.text_width))
        layer = nn.TransformerEncoderLayer(config.text_width, config.text_heads, 4 * config.text_width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.index = {word: i for i, word in enumerate(config.vocab)}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> unit image embeddings [B, E]."""
        x = self.stages(self.stem((pixels - self.mean) / self.std))
        return F.normalize(self.image_proj(x.mean(dim=(2, 3))), dim=-1)

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """captions -> word ids [B, T] (0 = <pad>, unknown words -> <unk>), cut at max_words."""
        rows = [[self.index.get(w, 1) for w in words(c)][:self.config.max_words] or [1] for c in captions]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                            device=self.position_embedding.device)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """word ids [B, T] -> unit text embeddings [B, E]."""
        real = ids != 0
        x = self.word_embedding(ids) + self.position_embedding[:ids.shape[1]]
        x = self.text_encoder(x, src_key_padding_mask=~real)
        pooled = (x * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def similarity(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """[B] exp(logit_scale) * cosine of each image with its own caption (TSE's term)."""
        image = self.encode_image(pixels)
        text = self.encode_text(self.tokens(captions))
        return self.logit_scale.exp().clamp(max=100.0) * (image * text).sum(-1)

    def contrastive_loss(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        image = self.encode_image(pixels)
        text = self.encode_text(self.tokens(captions))
        logits = self.logit_scale.exp().clamp(max=100.0) * image @ text.T  # [B, B]
        target = torch.arange(len(captions), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    # -- files -----------------------------------------------------------------------------------

    def save(self, out: Path, training: dict | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({"config": asdict(self.config), "training": training or {}},
                                                  indent=1) + "\n")
        return out

    @classmethod
    def load(cls, directory) -> "SceneClip":
        from safetensors.torch import load_file

        root = Path(directory)
        if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise ClipError(f"{root} has no {CONFIG_FILE} + {WEIGHTS_FILE}: train the TSE guide with "
                            f"'pipmm tvp clip-train --out {root}'")
        meta = json.loads((root / CONFIG_FILE).read_text())
        model = cls(ClipConfig(**meta["config"]))
        model.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
        model.training_record = meta.get("training", {})
        return model.eval()
