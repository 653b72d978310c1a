"""Multi-view samples: several frames per question, and question families that need more than one frame.

Two kinds of sample (KINDS), drawn half and half:
  scenes  N different generated scenes (scenes.make_scene), one per frame: "N cameras, N places"
  views   one scene seen through N synthetic viewpoints: square crops of 60-85% of its side, each resized to the
          frame size; every object is wholly inside a view or wholly outside it (windows cutting an object's box
          are redrawn), so "in a view" is exact. Objects look 1.2-1.7x larger than in a full frame.

Families (FAMILIES), every answer computed from the drawn objects:
  which_frame  "Which frame shows the red star?"              a colour+shape seen in exactly one frame -> "second"
  count_all    "How many stars are there in all the frames?"  (scenes only: a view repeats objects) -> "5"
  every_frame  "Is there a star in every frame?"               yes / no, balanced where the frames allow it
  compare      "Which frame has more stars, the first or the third?"  counts differ -> "third"
Frames are named by ORDINALS in the order given: which_frame and compare need the frame order, count_all and
every_frame do not (a permutation-invariant adapter can answer only those; docs/multi-image.md).

Determinism and splits: sample i of a split draws from Generator(PCG64([split_seed(split, MV_OFFSET + i * 8), 7]));
its frames are scenes split_seed(split, MV_OFFSET + i * 8 + f), f < 8, so samples never share a scene, the three
splits never share one (scenes.py's split ranges), and no multi-view frame is one of the single-frame
benchmark's scenes (indices below MV_OFFSET). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.tasks import scenes

KINDS = ("scenes", "views")
FAMILIES = ("which_frame", "count_all", "every_frame", "compare")
ORDER_FREE = ("count_all", "every_frame")  # answerable without knowing which frame came first
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
MAX_FRAMES = len(ORDINALS)
MV_OFFSET = 500_000_000  # scene indices of multi-view frames start here in every split
_STRIDE = MAX_FRAMES  # scene indices per sample
_CROP = (0.60, 0.85)  # view side / scene side
_TRIES = 60

TEMPLATES = {
    "which_frame": ("Which frame shows the {x}?", "In which frame is there a {x}?", "Which frame has the {x} in it?"),
    "count_all": ("How many {xs} are there in all the frames?", "How many {xs} do the frames show in total?",
                  "Count the {xs} in all the frames."),
    "every_frame": ("Is there a {x} in every frame?", "Does every frame show a {x}?", "Is a {x} in each frame?"),
    "compare": ("Which frame has more {xs}, the {a} or the {b}?", "Are there more {xs} in the {a} or in the {b} frame?"),
}


@dataclass(frozen=True)
class MultiViewExample:
    frames: list  # PIL images, in order
    prompt: str
    answer: str
    family: str
    kind: str  # KINDS
    sample_seed: int


@dataclass(frozen=True)
class Seen:
    """What one frame shows: the (colour, shape) of every object wholly in it."""
    objects: tuple[tuple[str, str], ...]

    def count(self, attribute: tuple[str, str]) -> int:
        field, value = attribute
        return sum((c if field == "color" else s) == value for c, s in self.objects)


def _scene_seed(split: str, index: int, frame: int) -> int:
    return scenes.split_seed(split, MV_OFFSET + index * _STRIDE + frame)


def _inside(o, x0: int, y0: int, side: int) -> bool:
    return x0 <= o.x - o.radius and o.x + o.radius < x0 + side and y0 <= o.y - o.radius and o.y + o.radius < y0 + side


def _apart(o, x0: int, y0: int, side: int) -> bool:
    return o.x + o.radius < x0 or o.x - o.radius >= x0 + side or o.y + o.radius < y0 or o.y - o.radius >= y0 + side


def _window(rng: np.random.Generator, scene) -> tuple[int, int, int] | None:
    """(x0, y0, side) of a square window cutting no object's box, or None after _TRIES draws."""
    size = scene.image_size
    for _ in range(_TRIES):
        side = int(rng.integers(int(_CROP[0] * size), int(_CROP[1] * size) + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(_inside(o, x0, y0, side) or _apart(o, x0, y0, side) for o in scene.objects):
            return x0, y0, side
    return None


def _views(rng, split: str, index: int, n: int, size: int) -> tuple[list, list[Seen]] | None:
    """n crops of one scene (another scene of the sample's range if a crowded one leaves no clean window); None
    when every scene of the range is too crowded (rare with the mixed styles' big objects: the sample is skipped)."""
    for frame in range(_STRIDE):
        scene = scenes.make_scene(_scene_seed(split, index, frame), size)
        windows = [_window(rng, scene) for _ in range(n)]
        if all(w is not None for w in windows):
            break
    else:
        return None
    frames, seen = [], []
    for x0, y0, side in windows:
        frames.append(scene.image.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC))
        seen.append(Seen(tuple((o.color, o.shape) for o in scene.objects if _inside(o, x0, y0, side))))
    return frames, seen


def _scenes(split: str, index: int, n: int, size: int) -> tuple[list, list[Seen]]:
    drawn = [scenes.make_scene(_scene_seed(split, index, f), size) for f in range(n)]
    return [s.image for s in drawn], [Seen(tuple((o.color, o.shape) for o in s.objects)) for s in drawn]


def _name(attribute: tuple[str, str], plural: bool = False) -> str:
    field, value = attribute
    if field == "shape":
        return scenes.PLURALS[value] if plural else value
    return f"{value} objects" if plural else f"{value} object"


def _ask(family: str, kind: str, seen: list[Seen], rng: np.random.Generator) -> tuple[str, str] | None:
    """-> (prompt, answer), or None when these frames hold no such question."""
    n = len(seen)
    tpl = TEMPLATES[family][int(rng.integers(len(TEMPLATES[family])))]

    def pick(items):
        return items[int(rng.integers(len(items)))] if items else None

    attributes = sorted({a for s in seen for c, sh in s.objects for a in (("color", c), ("shape", sh))})
    if family == "which_frame":
        pairs = sorted({p for s in seen for p in s.objects})
        alone = [p for p in pairs if sum(p in s.objects for s in seen) == 1]
        p = pick(alone)
        return None if p is None else (tpl.format(x=f"{p[0]} {p[1]}"),
                                       ORDINALS[next(i for i, s in enumerate(seen) if p in s.objects)])
    if family == "count_all":
        a = pick(attributes) if kind == "scenes" else None
        return None if a is None else (tpl.format(xs=_name(a, plural=True)), str(sum(s.count(a) for s in seen)))
    if family == "every_frame":
        everywhere = [a for a in attributes if all(s.count(a) for s in seen)]
        somewhere = [a for a in attributes if a not in everywhere]
        yes = bool(everywhere) and (not somewhere or rng.random() < 0.5)
        a = pick(everywhere if yes else somewhere)
        return None if a is None else (tpl.format(x=_name(a)), "yes" if yes else "no")
    if family == "compare":
        if n < 2:
            return None
        i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
        differ = [a for a in attributes if seen[i].count(a) != seen[j].count(a)]
        a = pick(differ)
        if a is None:
            return None
        more = i if seen[i].count(a) > seen[j].count(a) else j
        return tpl.format(xs=_name(a, plural=True), a=ORDINALS[i], b=ORDINALS[j]), ORDINALS[more]
    raise ValueError(f"unknown multi-view family {family!r}")


def sample(split: str, index: int, frames: int, size: int = 224, families: Sequence[str] = FAMILIES,
           kind: str | None = None) -> list[MultiViewExample]:
    """Sample `index` of `split` with `frames` frames: one question per family that these frames allow."""
    if not 1 <= frames <= MAX_FRAMES:
        raise scenes.SceneArgumentError(f"{frames} frames: a multi-view sample has 1 to {MAX_FRAMES}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise scenes.SceneArgumentError(f"unknown multi-view families {unknown}: use {', '.join(FAMILIES)}")
    seed = _scene_seed(split, index, 0)
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    drawn = _scenes(split, index, frames, size) if kind == "scenes" else _views(rng, split, index, frames, size)
    if drawn is None:
        return []
    images, seen = drawn
    out = []
    for family in families:
        asked = _ask(family, kind, seen, rng)
        if asked is not None:
            out.append(MultiViewExample(images, asked[0], asked[1], family, kind, seed))
    return out


def iter_examples(split: str, n_samples: int, frames: int, size: int = 224, families: Sequence[str] = FAMILIES,
                  seed_offset: int = 0) -> Iterator[MultiViewExample]:
    """Examples of samples seed_offset .. seed_offset + n_samples - 1 of `split` (the frames of a sample shared)."""
    for i in range(seed_offset, seed_offset + n_samples):
        yield from sample(split, i, frames, size, families)


def examples(split: str, n: int, frames: int, size: int = 224, families: Sequence[str] = FAMILIES,
             seed_offset: int = 0) -> list[MultiViewExample]:
    """The first n examples of `split` (the benchmark's questions: the same for every run with the same args)."""
    out = []
    for example in iter_examples(split, 4 * n, frames, size, families, seed_offset):
        out.append(example)
        if len(out) == n:
            break
    return out
