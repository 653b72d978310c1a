"""TVP's training data: a few hundred images of the new domain with questions, held in memory at the inner size.

A data directory is what `pipmm tvp scenes` (export/tvp/domain.py write_dataset) or `pipmm scenes` writes: a
LLaVA-style list (DIR/<split>.json: {"image": relative path, "conversations": [human "<image>\\n" + question,
gpt answer], optional "caption"}) beside the images. Questions are grouped by image; an image's caption (if any)
is the text TSE pulls the prompted image towards.

Batch i of a run (PromptData.batch) holds `scenes_per_step` images of epoch i // steps_per_epoch, in the order of
a permutation drawn from PCG64([seed, epoch]): the stream depends only on (data, seed, step), so a resumed run
sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdk.errors import PipmmError
from sdk.preprocess import preprocess
from sdk.visual_prompt import VisualPrompt

from export.train.data import encode_example, text_tensors
from export.tvp.transform import inner_batch


class TvpDataError(PipmmError, ValueError):
    """A TVP data directory that cannot be read."""


@dataclass
class Item:
    image: Path
    caption: str | None
    questions: list[tuple[str, str]]  # (prompt, answer)


def read_items(data_dir, limit: int | None = None) -> tuple[list[Item], Path]:
    """The images of a data directory with their questions, in file order (first `limit` images)."""
    root = Path(data_dir)
    lists = sorted(p for p in root.glob("*.json") if p.name != "domain.json") if root.is_dir() else []
    if not lists:
        raise TvpDataError(f"{root} holds no LLaVA-style .json list: write one with 'pipmm tvp scenes --out {root}'")
    try:
        records = json.loads(lists[0].read_text())
        items: dict[str, Item] = {}
        for r in records:
            human, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
            item = items.setdefault(r["image"], Item(root / r["image"], r.get("caption"), []))
            item.questions.append((human.replace("<image>", "").strip(), answer))
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise TvpDataError(f"{lists[0]} is not a LLaVA-style list of records ({type(err).__name__}: {err}); write "
                           "it with 'pipmm tvp scenes'") from None
    out = list(items.values())[:limit]
    missing = [i.image for i in out if not i.image.is_file()]
    if not out or missing:
        raise TvpDataError(f"{lists[0]}: {'no records' if not out else f'image {missing[0]} is missing'}")
    return out, lists[0]


class PromptData:
    """Every image's pixels [N, 3, h, w] (at the prompt's inner side: PromptData.framed), the encoded questions,
    and the deterministic batch stream."""

    def __init__(self, items: list[Item], pixels: torch.Tensor, prompter, pad: int, scenes_per_step: int,
                 seed: int = 0):
        self.items, self.prompter, self.pad, self.seed = items, prompter, pad, seed
        self.scenes_per_step = min(scenes_per_step, len(items))
        self.pixels = pixels
        self.encoded = [[encode_example(prompter, q, a) for q, a in item.questions] for item in items]

    @classmethod
    def framed(cls, items: list[Item], prompt: VisualPrompt, preprocessing: dict, prompter, pad: int,
               scenes_per_step: int, seed: int = 0) -> "PromptData":
        """The images at the inner side of `prompt`'s geometry, rescaled, not padded (what TVP trains on)."""
        inner = inner_batch([i.image for i in items], prompt, preprocessing)  # [N, 3, h, w] float32
        return cls(items, inner, prompter, pad, scenes_per_step, seed)

    @classmethod
    def plain(cls, items: list[Item], preprocessing: dict, prompter, pad: int, scenes_per_step: int,
              seed: int = 0) -> "PromptData":
        """The images through the bundle's own preprocessing (normalised pixel_values: what a fine-tune sees)."""
        pixels = torch.from_numpy(np.concatenate([preprocess(i.image, preprocessing) for i in items]))
        return cls(items, pixels, prompter, pad, scenes_per_step, seed)

    @property
    def questions(self) -> int:
        return sum(len(e) for e in self.encoded)

    def scene_indices(self, step: int) -> list[int]:
        per_epoch = len(self.items) // self.scenes_per_step
        epoch, at = divmod(step, per_epoch)
        order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.items))
        return order[at * self.scenes_per_step:(at + 1) * self.scenes_per_step].tolist()

    def batch(self, step: int) -> dict:
        """Scenes of `step`: pixels [S, 3, h, w], their questions' text tensors, scene_index [Q], captions [S]."""
        return self.rows(self.scene_indices(step))

    def rows(self, chosen: list[int]) -> dict:
        """The images `chosen` (indices into items) as one batch (see batch)."""
        encoded, scene_index = [], []
        for s, i in enumerate(chosen):
            encoded += self.encoded[i]
            scene_index += [s] * len(self.encoded[i])
        return {"pixels": self.pixels[chosen], **text_tensors(encoded, self.pad),
                "scene_index": torch.tensor(scene_index, dtype=torch.int64),
                "captions": [self.items[i].caption for i in chosen]}
