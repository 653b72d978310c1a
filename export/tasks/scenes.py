"""Generated scenes and exact-answer questions: the training data and the token-budget benchmark.

A scene is a noisy grey background with 3 to 12 flat-coloured shapes, most of them small
(about one 14 px patch at 224 px), some with a 1-3 character text label beside them. Questions
come in the families of FAMILIES; every answer is a short lowercase string computed from the
drawn objects (Scene.objects), never from separate state. The caption ("describe") lists
"size color shape" phrases in raster order of the 16x16 patch grid (patch row, then x). An
object is named only by words that match it alone ("star", "red star", "small star", "small
red star"); position and relation questions are asked only where a centre is clearly away
from a 3x3 grid line, or clearly apart from the other centre along the asked axis.

Determinism: make_scene(seed, size) draws everything from numpy.random.Generator(PCG64(seed)),
so the same (seed, size) gives byte-identical pixels. iter_examples, write_dataset and
corpus_text ask the questions of scene `seed` with their own stream, Generator(PCG64([seed, 1])),
so asking more or fewer questions never changes the image.

Splits: scene `i` of a split has seed SPLIT_BASE[split] + i, with SPLIT_BASE = train 0,
val 1_000_000_000, test 2_000_000_000 and i < SPLIT_SPAN = 1_000_000_000, so the three
splits can never share a seed (a --seed-offset k starts the split at scene index k instead of 0).

Geometry guarantees (relied on by the questions and the tests):
  * every shape fits in the box [x - radius, x + radius] x [y - radius, y + radius];
  * centres of two objects are at least max(1.3 * max(r1, r2) + 2, 0.85 * (r1 + r2)) apart,
    so shapes may overlap a little but no object's centre pixel is ever covered by another;
  * labels never touch an object's box, and the labelled object is clearly the nearest one;
  * background, clutter and noise are grey with every channel in [90, 185], while each object
    colour has a channel outside that range, so the background never equals an object colour.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdk.errors import PipmmError

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (230, 25, 25), "green": (30, 175, 45), "blue": (30, 70, 235), "yellow": (250, 230, 30),
    "purple": (150, 40, 205), "orange": (250, 125, 0), "white": (250, 250, 250), "black": (10, 10, 10),
}
SIZES = ("small", "large")
FAMILIES = ("describe", "color", "shape", "count", "exist", "position", "relation", "label")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds"}
SPLIT_SPAN = 1_000_000_000
SPLIT_BASE = {"train": 0, "val": SPLIT_SPAN, "test": 2 * SPLIT_SPAN}

_RADII = {"small": (7, 10), "large": (14, 20)}  # pixels at 224 px: diameters 14-20 and 28-40
_P_SMALL = 0.65                                 # most objects are small: they fit one patch
_GREY = (90, 185)                               # range of every background/clutter channel
_TEXT_RGB = (30, 30, 30)                        # label ink: not an object colour
_LABEL_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345789"  # no I/O/Q/0/1: too easy to misread at 8 px
_MIN_SIZE = 64


class SceneArgumentError(PipmmError, ValueError):
    """A scene-generation argument (split, n, size, seed offset) is out of range."""


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str           # "small" or "large"
    x: int              # centre, pixels
    y: int
    radius: int         # half the side of the box the shape fits in
    label: str | None = None
    label_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the drawn text

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    seed: int
    image_size: int
    objects: tuple[SceneObject, ...]  # canonical (raster) order, the order of the caption
    image: Image.Image | None = None

    @property
    def caption(self) -> str:
        return ", ".join(o.phrase for o in self.objects)


@dataclass(frozen=True)
class Question:
    family: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Example:
    image: Image.Image
    prompt: str
    answer: str
    family: str
    scene_seed: int


# ----------------------------------------------------------------------------- layout

def _raster_key(o: SceneObject, size: int) -> tuple[int, int, int]:
    # Row of the 16-row patch grid first, then x: the order in which a ViT reads the patches.
    return (o.y * 16 // size, o.x, o.y)


def _min_gap(r1: int, r2: int) -> float:
    return max(1.3 * max(r1, r2) + 2, 0.85 * (r1 + r2))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, round(size * 11 / 224)))


def _box_distance(box, o: SceneObject) -> float:
    """Distance from the centre of `box` to the object's bounding box (0 inside it)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return math.hypot(max(abs(cx - o.x) - o.radius, 0), max(abs(cy - o.y) - o.radius, 0))


def _boxes_touch(a, b, pad: int = 0) -> bool:
    return not (a[2] + pad < b[0] or b[2] + pad < a[0] or a[3] + pad < b[1] or b[3] + pad < a[1])


def _place_label(rng, o: SceneObject, objects, taken, size: int):
    """A box for a new label next to `o`, or None when no side is free and unambiguous."""
    text = "".join(rng.choice(list(_LABEL_CHARS), size=int(rng.integers(1, 4))))
    left, top, right, bottom = _font(size).getbbox(text)
    w, h, gap = right - left, bottom - top, max(2, size // 112)
    sides = {
        "right": (o.x + o.radius + gap, o.y - h // 2),
        "left": (o.x - o.radius - gap - w, o.y - h // 2),
        "above": (o.x - w // 2, o.y - o.radius - gap - h),
        "below": (o.x - w // 2, o.y + o.radius + gap),
    }
    for side in rng.permutation(list(sides)):
        x0, y0 = sides[side]
        box = (x0, y0, x0 + w, y0 + h)
        if box[0] < 1 or box[1] < 1 or box[2] > size - 2 or box[3] > size - 2:
            continue
        if any(_boxes_touch(box, (p.x - p.radius, p.y - p.radius, p.x + p.radius, p.y + p.radius), 1)
               for p in objects) or any(_boxes_touch(box, t, 2) for t in taken):
            continue
        own = _box_distance(box, o)
        if all(_box_distance(box, p) >= own + 2 * gap + 2 for p in objects if p is not o):
            return text, box
    return None


def _layout(rng: np.random.Generator, size: int) -> list[SceneObject]:
    scale = size / 224
    n_target = int(rng.integers(3, 13))
    objects: list[SceneObject] = []
    for _ in range(n_target):
        size_name = "small" if rng.random() < _P_SMALL else "large"
        lo, hi = _RADII[size_name]
        r = max(3, round(int(rng.integers(lo, hi + 1)) * scale))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        for _try in range(100):  # rejection sampling; a crowded scene just gets fewer objects
            x, y = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
            if all(math.hypot(x - p.x, y - p.y) >= _min_gap(r, p.radius) for p in objects):
                objects.append(SceneObject(shape, color, size_name, x, y, r))
                break
    # Labels on some objects (40% of scenes have none).
    n_labels = 0 if rng.random() < 0.4 else int(rng.integers(1, 4))
    taken: list[tuple] = []
    for i in rng.permutation(len(objects))[:n_labels]:
        placed = _place_label(rng, objects[i], objects, taken, size)
        if placed:
            text, box = placed
            taken.append(box)
            objects[i] = replace(objects[i], label=text, label_box=box)
    return sorted(objects, key=lambda o: _raster_key(o, size))


# ----------------------------------------------------------------------------- drawing

def _shape_points(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = 0.85 * r
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]
    if shape == "diamond":
        return [(x, y - r), (x + 0.8 * r, y), (x, y + r), (x - 0.8 * r, y)]
    if shape == "star":
        return [(x + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 y - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        t = max(1.6, 0.3 * r)
        return [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
                (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)]
    raise ValueError(shape)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Grey texture + pixel noise + faint lines, rings and specks; every channel in _GREY."""
    lo, hi = _GREY
    base = rng.uniform(lo + 20, hi - 20)
    coarse = rng.normal(0, 12, size=(6, 6)).astype(np.float32)  # smooth blotches
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    tint = rng.normal(0, 3, size=3)  # a barely-there colour cast, far from any object colour
    noise = rng.normal(0, 6, size=(size, size, 3))
    arr = base + smooth[..., None] + tint + noise
    img = Image.fromarray(np.clip(arr, lo, hi).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def grey() -> tuple[int, int, int]:
        g = int(np.clip(base + rng.choice([-1, 1]) * rng.uniform(12, 28), lo, hi))
        return (g, g, g)

    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
        draw.line((x0, y0, x1, y1), fill=grey(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        r = int(rng.integers(size // 40, size // 8))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=grey(), width=1)
    for _ in range(int(rng.integers(5, 20))):
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        draw.rectangle((x, y, x + int(rng.integers(1, 4)), y + int(rng.integers(1, 4))), fill=grey())
    return img


def make_scene(seed: int, size: int = 224) -> Scene:
    """Scene `seed` at `size` x `size` pixels; deterministic, byte for byte."""
    _check_size(size)
    rng = np.random.Generator(np.random.PCG64(seed))
    objects = _layout(rng, size)  # uses the stream first: layouts do not depend on the drawing
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    # Large objects first, so that small ones stay on top where they overlap.
    for o in sorted(objects, key=lambda o: o.size != "large"):
        if o.shape == "circle":
            draw.ellipse((o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius), fill=COLORS[o.color])
        else:
            draw.polygon(_shape_points(o.shape, o.x, o.y, o.radius), fill=COLORS[o.color])
    for o in objects:
        if o.label:
            left, top, _, _ = _font(size).getbbox(o.label)
            draw.text((o.label_box[0] - left, o.label_box[1] - top), o.label, fill=_TEXT_RGB, font=_font(size))
    return Scene(seed=seed, image_size=size, objects=tuple(objects), image=img)


def label_char_centres(o: SceneObject, size: int) -> list[tuple[str, float, float]]:
    """(character, x, y) of the centre of each drawn character of o's label, left to right ([] if none);
    from the same font metrics make_scene draws with."""
    if not o.label:
        return []
    font = _font(size)
    left, top, _, _ = font.getbbox(o.label)
    x0, y = o.label_box[0] - left, (o.label_box[1] + o.label_box[3]) / 2
    return [(ch, x0 + font.getlength(o.label[:i]) + font.getlength(ch) / 2, y) for i, ch in enumerate(o.label)]


# ----------------------------------------------------------------------------- questions

TEMPLATES = {
    "describe": ("Describe the image.", "List the objects in the image.", "What objects are in this picture?"),
    "color": ("What color is the {n}?", "What is the color of the {n}?", "Which color does the {n} have?"),
    "shape": ("What shape is the {n} object?", "What is the shape of the {n} object?",
              "Name the shape of the {n} object."),
    "count": ("How many {n} are there?", "How many {n} are in the image?", "Count the {n}."),
    "exist": ("Is there {n}?", "Does the image contain {n}?", "Can you see {n}?"),  # n has its article
    "position": ("Where is the {n}?", "Where is the {n} in the image?", "In which part of the image is the {n}?"),
    "relation": ("Is the {a} left of the {b}?", "Is the {a} right of the {b}?",
                 "Is the {a} above the {b}?", "Is the {a} below the {b}?"),
    "label": ("What does the label next to the {n} say?", "What is written next to the {n}?",
              "Read the label next to the {n}."),
}


def _names(o: SceneObject, objects, fields_options) -> list[str]:
    """The names of `o` made of the given attribute tuples that match `o` alone."""
    return [" ".join(getattr(o, f) for f in fields) for fields in fields_options
            if sum(all(getattr(p, f) == getattr(o, f) for f in fields) for p in objects) == 1]


_ANY_NAME = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def position_of(x: float, y: float, size: int) -> str:
    return POSITIONS[min(int(3 * y / size), 2) * 3 + min(int(3 * x / size), 2)]


def _margin_to_grid(x: float, y: float, size: int) -> float:
    return min(abs(v - size * k / 3) for v in (x, y) for k in (1, 2))


def _ask(family: str, scene: Scene, rng: np.random.Generator) -> Question | None:
    objs, size = scene.objects, scene.image_size
    tpl = TEMPLATES[family][int(rng.integers(len(TEMPLATES[family])))]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))] if seq else None

    if family == "describe":
        return Question(family, tpl, scene.caption)
    if family == "count":
        if rng.random() < 0.5:
            shape = pick([o.shape for o in objs]) if rng.random() < 0.7 else pick(SHAPES)
            return Question(family, tpl.format(n=PLURALS[shape]), str(sum(o.shape == shape for o in objs)))
        color = pick([o.color for o in objs]) if rng.random() < 0.7 else pick(list(COLORS))
        return Question(family, tpl.format(n=f"{color} objects"), str(sum(o.color == color for o in objs)))
    if family == "exist":
        o = pick(objs)
        shape, color, sz = (o.shape, o.color, o.size) if rng.random() < 0.5 else (
            pick(SHAPES), pick(list(COLORS)), pick(SIZES))
        with_size = rng.random() < 0.3
        yes = any(p.shape == shape and p.color == color and (not with_size or p.size == sz) for p in objs)
        name = f"{sz} {color} {shape}" if with_size else f"{color} {shape}"
        article = "an" if name[0] in "aeiou" else "a"
        return Question(family, tpl.format(n=f"{article} {name}"), "yes" if yes else "no")
    def about(named: list, answer) -> Question | None:  # named: (object, unique name) pairs
        if not named:
            return None
        o, n = pick(named)
        return Question(family, tpl.format(n=n), answer(o))

    if family == "color":  # named without its colour
        return about([(o, n) for o in objs for n in _names(o, objs, (("shape",), ("size", "shape")))],
                     lambda o: o.color)
    if family == "shape":  # named without its shape
        return about([(o, n) for o in objs for n in _names(o, objs, (("color",), ("size", "color")))],
                     lambda o: o.shape)
    if family == "position":  # only objects clearly inside one cell of the 3x3 grid
        return about([(o, n) for o in objs if _margin_to_grid(o.x, o.y, size) >= 0.04 * size
                      for n in _names(o, objs, _ANY_NAME)], lambda o: position_of(o.x, o.y, size))
    if family == "label":
        return about([(o, n) for o in objs if o.label for n in _names(o, objs, _ANY_NAME)],
                     lambda o: o.label.lower())
    if family == "relation":  # only pairs whose centres are clearly apart along the asked axis
        named = [(o, pick(_names(o, objs, _ANY_NAME))) for o in objs]
        named = [(o, n) for o, n in named if n]
        horizontal = "left" in tpl or "right" in tpl
        pairs = [(a, b) for a in named for b in named if a[0] is not b[0]
                 and abs((a[0].x - b[0].x) if horizontal else (a[0].y - b[0].y)) >= 0.08 * size]
        if not pairs:
            return None
        (a, na), (b, nb) = pick(pairs)
        truth = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}
        word = next(w for w in truth if f" {w} " in tpl)
        return Question(family, tpl.format(a=na, b=nb), "yes" if truth[word] else "no")
    raise ValueError(f"unknown question family {family!r}")


def make_questions(scene: Scene, rng_or_seed, families: Sequence[str] = FAMILIES,
                   per_family: int = 1) -> list[Question]:
    """Up to `per_family` distinct questions of each family (fewer when the scene has none to ask)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families or per_family < 1:
        raise SceneArgumentError(f"bad families {list(families)} or per_family {per_family}: "
                                 f"use families from {', '.join(FAMILIES)} and per_family >= 1")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else \
        np.random.Generator(np.random.PCG64(rng_or_seed))
    out: list[Question] = []
    for family in families:
        seen: set[str] = set()
        for _ in range(4 * per_family):
            if len(seen) == per_family:
                break
            q = _ask(family, scene, rng)
            if q is not None and q.prompt not in seen:
                seen.add(q.prompt)
                out.append(q)
    return out


# ----------------------------------------------------------------------------- datasets

def split_seed(split: str, index: int) -> int:
    """Seed of scene `index` of `split` (see the module docstring)."""
    if split not in SPLIT_BASE:
        raise SceneArgumentError(f"unknown split {split!r}: use one of {', '.join(SPLIT_BASE)}")
    if not 0 <= index < SPLIT_SPAN:
        raise SceneArgumentError(f"scene index {index} is outside 0..{SPLIT_SPAN - 1}: lower --n or --seed-offset")
    return SPLIT_BASE[split] + index


def _check_size(size: int) -> None:
    if size < _MIN_SIZE:
        raise SceneArgumentError(f"scene size {size} is too small: use --size {_MIN_SIZE} or more")


def _check(split: str, n: int, seed_offset: int = 0, size: int = 224) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise SceneArgumentError(f"number of scenes must be a positive integer, got {n!r}: pass --n 1 or more")
    _check_size(size)
    split_seed(split, seed_offset)
    split_seed(split, seed_offset + n - 1)


def _scene_questions(scene: Scene, questions_per_scene: int | None, families) -> list[Question]:
    # Own stream per scene: the questions never shift the pixels, nor the other scenes' questions.
    rng = np.random.Generator(np.random.PCG64([scene.seed, 1]))
    if questions_per_scene is None:
        return make_questions(scene, rng, families)
    k = questions_per_scene
    qs = make_questions(scene, rng, families, per_family=max(1, -(-k // len(families))))
    # Round-robin over families, starting at a scene-dependent family, so families stay balanced.
    by_family = [[q for q in qs if q.family == f] for f in families]
    start = int(rng.integers(len(families)))
    by_family = by_family[start:] + by_family[:start]
    return [q for rnd in range(k) for fam in by_family for q in fam[rnd:rnd + 1]][:k]


def iter_examples(split: str, n: int, size: int = 224, questions_per_scene: int | None = None,
                  families: Sequence[str] = FAMILIES, seed_offset: int = 0) -> Iterator[Example]:
    """Examples of `n` scenes of `split`; questions_per_scene None asks one question per family.

    The examples of one scene share one PIL image: copy it before changing it.
    """
    _check(split, n, seed_offset, size)
    for i in range(seed_offset, seed_offset + n):
        scene = make_scene(split_seed(split, i), size)
        for q in _scene_questions(scene, questions_per_scene, families):
            yield Example(scene.image, q.prompt, q.answer, q.family, scene.seed)


def _progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar then
        return it
    return tqdm(it, total=total, desc=desc, unit="scene")


def write_dataset(out_dir, n: int, split: str = "train", size: int = 224, progress: bool = True,
                  seed_offset: int = 0, questions_per_scene: int | None = None) -> Path:
    """Write `n` scenes as out_dir/images/*.png and the LLaVA-style list out_dir/<split>.json."""
    _check(split, n, seed_offset, size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    indices = range(seed_offset, seed_offset + n)
    for i in _progress(indices, n, f"scenes ({split})") if progress else indices:
        scene = make_scene(split_seed(split, i), size)
        rel = f"images/{split}_{scene.seed:010d}.png"
        scene.image.save(out / rel)
        for k, q in enumerate(_scene_questions(scene, questions_per_scene, FAMILIES)):
            records.append({
                "id": f"{split}-{scene.seed}-{k}", "image": rel, "family": q.family,
                "conversations": [{"from": "human", "value": "<image>\n" + q.prompt},
                                  {"from": "gpt", "value": q.answer}],
            })
    path = out / f"{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees a half-written list
    return path


def corpus_text(n_scenes: int = 2000, split: str = "train") -> Iterator[str]:
    """Prompt and answer text of `n_scenes` scenes (layouts only, no pixels), for a tokenizer.

    The closed answer vocabulary comes first, so that even rare answers are seen.
    """
    _check(split, n_scenes)
    yield " ".join([*SHAPES, *PLURALS.values(), *COLORS, *SIZES, *POSITIONS, "yes", "no",
                    *map(str, range(13)), *_LABEL_CHARS.lower()])
    for i in range(n_scenes):
        seed = split_seed(split, i)
        scene = Scene(seed, 224, tuple(_layout(np.random.Generator(np.random.PCG64(seed)), 224)))
        for q in _scene_questions(scene, None, FAMILIES):
            yield q.prompt
            yield q.answer


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--n", required=True, type=int, metavar="N", help="number of scenes")
    parser.add_argument("--split", default="train", choices=tuple(SPLIT_BASE), help="seed range (default: train)")
    parser.add_argument("--size", default=224, type=int, help="image side in pixels (default: 224)")
    parser.add_argument("--seed-offset", default=0, type=int, help="first scene index within the split")


def run(args) -> int:
    path = write_dataset(args.out, args.n, args.split, args.size, seed_offset=args.seed_offset)
    count = len(json.loads(path.read_text(encoding="utf-8")))
    print(f"wrote {count} questions on {args.n} scenes to {path}")
    return 0
