"""Generated scenes: layout, drawing, splits and datasets -- the training data and the token-budget benchmark.

A scene is a background (export/tasks/styles.py: the original noisy grey "classic", flat, gradient,
textured, a photo-like table...) with 1 to 12 flat-coloured or outlined shapes, most of them small
(about one 14 px patch at 224 px), some with a 1-3 character text label beside them. Questions
(export/tasks/questions.py, phrasings in phrasings.py) come in the families of FAMILIES; every
answer is a short lowercase string computed from the drawn objects. The caption ("describe")
lists "size color shape" phrases in raster order of the 16x16 patch grid of the view (patch row,
then x).

Determinism: make_scene(seed, size, style) draws the layout and the classic background from
numpy.random.Generator(PCG64(seed)) and every style-specific choice from Generator(PCG64([seed, 4])),
so the same (seed, size, style) gives byte-identical pixels and "classic" is the original generator.
iter_examples, write_dataset and corpus_text ask the questions of scene `seed` with their own
stream, Generator(PCG64([seed, 1])), and pick a split's style with Generator(PCG64([seed, 3])), so
asking more or fewer questions never changes the image.

Splits (SPLITS): scene `i` of a split has seed SPLIT_BASE[split] + i, i < SPLIT_SPAN = 1e9:
train 0, val 1e9, test 2e9, phrasing 3e9, style 4e9 -- never a shared seed between training and any
eval split. train/val/test draw TRAIN_STYLES with TRAIN phrasings; phrasing asks HELD_OUT phrasings
on train styles; style draws HELD_OUT_STYLES with TRAIN phrasings. classic is the original test
split exactly (same seeds as test, classic style, the legacy phrasings and families), kept so
old figures reproduce; train-classic the original training stream. (--seed-offset k starts a
split at scene index k.)

Canvases: a style may draw a non-square canvas (e.g. 640x480); the objects then lie in its centred
square *view* of side min(w, h) -- what the CLIP preprocessing (shortest edge -> model size, centre
crop) keeps -- so every object stays visible after the crop. Coordinates are canvas pixels.

Geometry guarantees (relied on by the questions and the tests):
  * every shape fits in the box [x - radius, x + radius] x [y - radius, y + radius], inside the view;
  * centres of two objects are at least max(1.3 * max(r1, r2) + 2, 0.85 * (r1 + r2)) apart,
    so shapes may overlap a little but no object's centre pixel is ever covered by another;
  * labels never touch an object's box, and the labelled object is clearly the nearest one;
  * the background never equals an object colour (styles.py states the invariant per style).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdk.errors import PipmmError

from export.tasks.objects import (COLORS, LABEL_CHARS, PLURALS, POSITIONS, SHAPES, SIZES, Region, Scene,  # noqa: F401
                                  SceneObject, draw_object, region_of, shape_points)
from export.tasks.questions import (FAMILIES, LEGACY_FAMILIES, Question, make_questions, position_of,  # noqa: F401
                                    refer_question, templates)
from export.tasks.styles import HELD_OUT_STYLES, STYLES, TRAIN_STYLES, Style, background, effects, pick_style

_LABEL_CHARS = LABEL_CHARS     # (old name)
_TEXT_RGB = (30, 30, 30)       # label ink on light backgrounds: grey, not an object colour
_LIGHT_INK = (225, 225, 225)   # label ink on dark backgrounds
_MIN_SIZE = 64
SPLIT_SPAN = 1_000_000_000


@dataclass(frozen=True)
class SplitSpec:
    base: int                     # seed of scene 0
    styles: dict[str, float]      # style -> weight
    phrasing: str = "train"       # key of phrasings.PHRASINGS
    families: tuple[str, ...] = FAMILIES
    instruction_phrasing: str = "train"  # instructions.py: which phrasings of the answer-form instructions


_HELD_OUT_MIX = {name: 1.0 for name in HELD_OUT_STYLES}
SPLITS = {
    "train": SplitSpec(0, TRAIN_STYLES, instruction_phrasing="train-wide"),
    "val": SplitSpec(SPLIT_SPAN, TRAIN_STYLES),
    "test": SplitSpec(2 * SPLIT_SPAN, TRAIN_STYLES),
    "phrasing": SplitSpec(3 * SPLIT_SPAN, TRAIN_STYLES, "held_out", instruction_phrasing="held_out"),
    "style": SplitSpec(4 * SPLIT_SPAN, _HELD_OUT_MIX),
    "classic": SplitSpec(2 * SPLIT_SPAN, {"classic": 1.0}, "legacy", LEGACY_FAMILIES),
    "train-classic": SplitSpec(0, {"classic": 1.0}, "legacy", LEGACY_FAMILIES),
}
SPLIT_BASE = {name: spec.base for name, spec in SPLITS.items()}
TRAIN_SPLITS = ("train", "train-classic")
EVAL_SPLITS = ("val", "test", "phrasing", "style", "classic")


class SceneArgumentError(PipmmError, ValueError):
    """A scene-generation argument (split, n, size, seed offset, style) is out of range."""


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


@lru_cache(maxsize=64)
def _font_px(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # Pillow's bundled font (FreeType): the same here and in CI


def _font(size: int) -> ImageFont.FreeTypeFont:
    """The classic label font for a view of `size` pixels (11 px at 224)."""
    return _font_px(max(8, round(size * 11 / 224)))


def label_font(o: SceneObject, size: int) -> ImageFont.FreeTypeFont:
    return _font_px(o.label_font) if o.label_font else _font(size)


def _box_distance(box, o: SceneObject) -> float:
    """Distance from the centre of `box` to the object's bounding box (0 inside it)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return math.hypot(max(abs(cx - o.x) - o.radius, 0), max(abs(cy - o.y) - o.radius, 0))


def _boxes_touch(a, b, pad: int = 0) -> bool:
    return not (a[2] + pad < b[0] or b[2] + pad < a[0] or a[3] + pad < b[1] or b[3] + pad < a[1])


def _place_label(rng, o: SceneObject, objects, taken, size: int, font, stroke: int = 0):
    """A box for a new label next to `o`, or None when no side is free and unambiguous."""
    text = "".join(rng.choice(list(LABEL_CHARS), size=int(rng.integers(1, 4))))
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
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


def _theme(style: Style, srng) -> tuple[dict, int]:
    """Non-classic: maybe many objects sharing a shape and/or colour -> ({field: value}, how many), else ({}, 0)."""
    if not style.theme or srng.random() >= style.theme:
        return {}, 0
    kind = ("shape", "color", "both")[int(srng.integers(3))]
    fixed = {}
    if kind in ("shape", "both"):
        fixed["shape"] = style.shapes[int(srng.integers(len(style.shapes)))]
    if kind in ("color", "both"):
        fixed["color"] = style.colors[int(srng.integers(len(style.colors)))]
    return fixed, int(srng.integers(7, 13))


def _layout(rng: np.random.Generator, size: int, style: Style = STYLES["classic"],
            srng: np.random.Generator | None = None) -> list[SceneObject]:
    """Objects in view coordinates (a size x size square). The main stream `rng` draws what the original
    generator drew; everything else (one-object scenes, themes, outlines, fonts) comes from `srng`."""
    scale = size / 224
    n_target = int(rng.integers(style.counts[0], style.counts[1] + 1))
    fixed, n_fixed = ({}, 0) if style.classic else _theme(style, srng)
    if n_fixed:
        n_target = max(n_target, min(12, n_fixed + int(srng.integers(0, 3))))
    elif not style.classic and style.single and srng.random() < style.single:
        n_target = 1
    objects: list[SceneObject] = []
    for k in range(n_target):
        size_name = "small" if rng.random() < style.p_small else "large"
        lo, hi = style.radii[size_name]
        r = max(3, round(int(rng.integers(lo, hi + 1)) * scale))
        shape = style.shapes[int(rng.integers(len(style.shapes)))]
        color = style.colors[int(rng.integers(len(style.colors)))]
        if k < n_fixed:
            shape, color = fixed.get("shape", shape), fixed.get("color", color)
        outline = 0
        if style.outline and size_name == "large" and srng.random() < style.outline:
            outline = max(2, round(srng.uniform(0.14, 0.25) * r))
        for _try in range(100):  # rejection sampling; a crowded scene just gets fewer objects
            x, y = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
            if all(math.hypot(x - p.x, y - p.y) >= _min_gap(r, p.radius) for p in objects):
                objects.append(SceneObject(shape, color, size_name, x, y, r, outline=outline))
                break
    # Labels on some objects (classic: 40% of scenes have none).
    n_labels = 0 if rng.random() < 1 - style.p_labels else int(rng.integers(1, 4))
    taken: list[tuple] = []
    for i in rng.permutation(len(objects))[:n_labels]:
        if style.classic:
            px, stroke, font = 0, 0, _font(size)
        else:
            px = max(8, round(int(srng.integers(style.label_font[0], style.label_font[1] + 1)) * scale))
            stroke = max(1, round(px / 14)) if srng.random() < style.stroke else 0
            font = _font_px(px)
        placed = _place_label(rng, objects[i], objects, taken, size, font, stroke)
        if placed:
            text, box = placed
            taken.append(box)
            objects[i] = replace(objects[i], label=text, label_box=box, label_font=px, label_stroke=stroke)
    return sorted(objects, key=lambda o: _raster_key(o, size))


def _shift(o: SceneObject, dx: int, dy: int) -> SceneObject:
    box = o.label_box and (o.label_box[0] + dx, o.label_box[1] + dy, o.label_box[2] + dx, o.label_box[3] + dy)
    return replace(o, x=o.x + dx, y=o.y + dy, label_box=box)


def _style(name: str) -> Style:
    if name not in STYLES:
        raise SceneArgumentError(f"unknown style {name!r}: use one of {', '.join(STYLES)}")
    return STYLES[name]


def plan_scene(seed: int, size: int = 224, style: str = "classic", canvas: tuple[int, int] | None = None):
    """-> (Scene without pixels, main stream, style stream) of scene `seed`: the layout only (cheap).
    canvas (w, h) in pixels overrides the style's canvases (non-classic styles; `size` then only scales)."""
    _check_size(size)
    st = _style(style)
    rng = np.random.Generator(np.random.PCG64(seed))
    srng = np.random.Generator(np.random.PCG64([seed, 4]))
    w = h = size
    if canvas is not None and not st.classic:
        w, h = canvas
    elif not st.classic:
        cw, ch = st.canvases[int(srng.integers(len(st.canvases)))]
        w, h = round(cw * size / 224), round(ch * size / 224)
    view = min(w, h)
    ox, oy = (w - view) // 2, (h - view) // 2
    objects = tuple(_shift(o, ox, oy) for o in _layout(rng, view, st, srng))
    scene = Scene(seed=seed, image_size=view, objects=objects, style=style, offset=(ox, oy),
                  canvas=None if w == h else (w, h))
    return scene, rng, srng


# ----------------------------------------------------------------------------- drawing

def _ink(img: Image.Image, box) -> tuple[int, int, int]:
    """Label ink that reads on the background under `box`: dark on light, light on dark."""
    lum = float(np.asarray(img.crop(box).convert("L"), np.float32).mean())
    return _TEXT_RGB if lum >= 110 else _LIGHT_INK


def make_scene(seed: int, size: int = 224, style: str = "classic", canvas: tuple[int, int] | None = None) -> Scene:
    """Scene `seed` with a view of `size` pixels in `style` (classic: the original scenes); byte-deterministic.
    canvas: (w, h) instead of one of the style's canvases."""
    scene, rng, srng = plan_scene(seed, size, style, canvas)
    st = STYLES[style]
    w, h = scene.size_wh
    img = background(st, rng, srng, w, h, scene.objects)  # classic: the main stream, after the layout
    ink = {o: _ink(img, o.label_box) if not st.classic else _TEXT_RGB for o in scene.objects if o.label}
    draw = ImageDraw.Draw(img)
    # Large objects first, so that small ones stay on top where they overlap.
    for o in sorted(scene.objects, key=lambda o: o.size != "large"):
        draw_object(draw, o)
    for o in scene.objects:
        if o.label:
            font = label_font(o, scene.image_size)
            left, top, _, _ = font.getbbox(o.label, stroke_width=o.label_stroke)
            draw.text((o.label_box[0] - left, o.label_box[1] - top), o.label, fill=ink[o], font=font,
                      stroke_width=o.label_stroke, stroke_fill=ink[o])
    scene.image = effects(st, srng, img, scene.image_size) if not st.classic else img
    return scene


def label_char_centres(o: SceneObject, size: int) -> list[tuple[str, float, float]]:
    """(character, x, y) of the centre of each drawn character of o's label, left to right ([] if none);
    from the same font metrics make_scene draws with (canvas pixels; `size` is the scene's view)."""
    if not o.label:
        return []
    font = label_font(o, size)
    left, top, _, _ = font.getbbox(o.label, stroke_width=o.label_stroke)
    x0, y = o.label_box[0] - left, (o.label_box[1] + o.label_box[3]) / 2
    return [(ch, x0 + font.getlength(o.label[:i]) + font.getlength(ch) / 2, y) for i, ch in enumerate(o.label)]


# ----------------------------------------------------------------------------- datasets

def split_seed(split: str, index: int) -> int:
    """Seed of scene `index` of `split` (see the module docstring)."""
    if split not in SPLITS:
        raise SceneArgumentError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= index < SPLIT_SPAN:
        raise SceneArgumentError(f"scene index {index} is outside 0..{SPLIT_SPAN - 1}: lower --n or --seed-offset")
    return SPLIT_BASE[split] + index


def split_style(split: str, seed: int) -> str:
    """The style of scene `seed` of `split` (drawn from the split's mix with the seed's own stream)."""
    styles = SPLITS[split].styles
    return next(iter(styles)) if len(styles) == 1 else pick_style(seed, styles)


def split_scene(split: str, index: int, size: int = 224) -> Scene:
    seed = split_seed(split, index)
    return make_scene(seed, size, split_style(split, seed))


def _check_size(size: int) -> None:
    if size < _MIN_SIZE:
        raise SceneArgumentError(f"scene size {size} is too small: use --size {_MIN_SIZE} or more")


def _check(split: str, n: int, seed_offset: int = 0, size: int = 224) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise SceneArgumentError(f"number of scenes must be a positive integer, got {n!r}: pass --n 1 or more")
    _check_size(size)
    split_seed(split, seed_offset)
    split_seed(split, seed_offset + n - 1)


def split_families(split: str, families: Sequence[str] | None = None) -> tuple[str, ...]:
    """`families` (None: all) that `split` asks, in FAMILIES order."""
    own = SPLITS[split].families
    return own if families is None else tuple(f for f in families if f in own)


def scene_questions(scene: Scene, questions_per_scene: int | None, families, phrasing: str = "train",
                    per_family=1, paraphrase: float = 0.0) -> list[Question]:
    """The questions of a scene; own stream per scene: they never shift the pixels, nor other scenes' questions.
    paraphrase: the fraction reworded (export/tasks/paraphrase.py), from the scene's stream [seed, 3], so the
    questions asked are the same for any fraction. per_family: an int, or {family: count} (make_questions)."""
    rng = np.random.Generator(np.random.PCG64([scene.seed, 1]))
    reword = {"paraphrase": paraphrase, "paraphrase_rng": np.random.Generator(np.random.PCG64([scene.seed, 3]))}
    if questions_per_scene is None:
        return make_questions(scene, rng, families, per_family=per_family, phrasing=phrasing, **reword)
    k = questions_per_scene
    qs = make_questions(scene, rng, families, per_family=max(1, -(-k // len(families))), phrasing=phrasing,
                        **reword)
    # Round-robin over families, starting at a scene-dependent family, so families stay balanced.
    by_family = [[q for q in qs if q.family == f] for f in families]
    start = int(rng.integers(len(families)))
    by_family = by_family[start:] + by_family[:start]
    return [q for rnd in range(k) for fam in by_family for q in fam[rnd:rnd + 1]][:k]


def iter_examples(split: str, n: int, size: int = 224, questions_per_scene: int | None = None,
                  families: Sequence[str] | None = None, seed_offset: int = 0) -> Iterator[Example]:
    """Examples of `n` scenes of `split`; questions_per_scene None asks one question per family.

    The examples of one scene share one PIL image: copy it before changing it.
    """
    _check(split, n, seed_offset, size)
    families = split_families(split, families)
    for i in range(seed_offset, seed_offset + n):
        scene = split_scene(split, i, size)
        for q in scene_questions(scene, questions_per_scene, families, SPLITS[split].phrasing):
            yield Example(scene.image, q.prompt, q.answer, q.family, scene.seed)


def _progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar then
        return it
    return tqdm(it, total=total, desc=desc, unit="scene")


def write_dataset(out_dir, n: int, split: str = "train", size: int = 224, progress: bool = True,
                  seed_offset: int = 0, questions_per_scene: int | None = None,
                  scene_at: Callable[[int], Scene] | None = None, captions: bool = False,
                  desc: str = "scenes") -> Path:
    """Write `n` scenes as out_dir/images/*.png and the LLaVA-style list out_dir/<split>.json.

    scene_at(index) -> Scene draws scene `index` of the split (default split_scene: another renderer of the same
    seeds, e.g. export/tvp/domain.py's shifted camera, keeps the split's questions); captions: each record also
    carries its scene's caption (the text TVP's TSE aligns the image with)."""
    _check(split, n, seed_offset, size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    indices = range(seed_offset, seed_offset + n)
    for i in _progress(indices, n, f"{desc} ({split})") if progress else indices:
        scene = scene_at(i) if scene_at is not None else split_scene(split, i, size)
        rel = f"images/{split}_{scene.seed:010d}.png"
        scene.image.save(out / rel)
        for k, q in enumerate(scene_questions(scene, questions_per_scene, split_families(split),
                                              SPLITS[split].phrasing)):
            records.append({
                "id": f"{split}-{scene.seed}-{k}", "image": rel, "family": q.family, "style": scene.style,
                **({"caption": scene.caption} if captions else {}),
                "conversations": [{"from": "human", "value": "<image>\n" + q.prompt},
                                  {"from": "gpt", "value": q.answer}],
            })
    path = out / f"{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees a half-written list
    return path


def corpus_text(n_scenes: int = 2000, split: str = "train", answerless: tuple[str, ...] = ()) -> Iterator[str]:
    """Prompt and answer text of `n_scenes` scenes (layouts only, no pixels), for a tokenizer.

    The closed answer vocabulary comes first, so that even rare answers are seen; then every
    phrasing of the split once, so that rare templates are tokenized well too. The answers of the
    `answerless` families are yielded as "" (their prompts stay): ("label",) keeps a BPE from merging
    pairs of random label glyphs into tokens (export/train/archs.py).
    """
    _check(split, n_scenes)
    spec = SPLITS[split]
    yield " ".join([*SHAPES, *PLURALS.values(), *COLORS, *SIZES, *POSITIONS, "yes", "no",
                    *map(str, range(13)), *LABEL_CHARS.lower()])
    for family in spec.families:
        for tpl in templates(family, spec.phrasing):
            yield tpl.replace("{n}", "object").replace("{a}", "object").replace("{b}", "object")
            yield "object"
    for i in range(n_scenes):
        seed = split_seed(split, i)
        scene = plan_scene(seed, 224, split_style(split, seed))[0]
        for q in scene_questions(scene, None, spec.families, spec.phrasing):
            yield q.prompt
            yield "" if q.family in answerless else q.answer


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory")
    parser.add_argument("--n", default=None, type=int, metavar="N", help="number of scenes")
    parser.add_argument("--split", default="train", choices=tuple(SPLITS), help="seed range (default: train)")
    parser.add_argument("--size", default=224, type=int, help="image side in pixels (default: 224)")
    parser.add_argument("--seed-offset", default=0, type=int, help="first scene index within the split")


def run(args) -> int:
    if args.out is None or args.n is None:
        raise SceneArgumentError("pass --out DIR and --n N (or --contact-sheet PNG)")
    path = write_dataset(args.out, args.n, args.split, args.size, seed_offset=args.seed_offset)
    count = len(json.loads(path.read_text(encoding="utf-8")))
    print(f"wrote {count} questions on {args.n} scenes to {path}")
    return 0
