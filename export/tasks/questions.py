"""Exact-answer questions about a drawn scene, in the phrasings of export/tasks/phrasings.py.

Every answer is a short lowercase string computed from the drawn objects (Scene.objects), never
from separate state. An object is named only by words that match it alone ("star", "red star",
"small star", "small red star"); position and relation questions are asked only where a centre is
clearly away from a 3x3 grid line, or clearly apart from the other centre along the asked axis.
Positions are those of the view (what the model sees after the centre crop) *and* of the whole
canvas: on a non-square canvas a position is asked only where both frames agree, so the answer
is the one a person looking at the whole frame gives and the one the model can see.

`refer` questions ("What color is this?") name no object: training and the eval splits ask them
only of one-object scenes, where they are unambiguous without a pointer; refer_question asks them
of any scene with the target's Region (box, point, scribble, mask) for the ControlMLLM benchmark.

With phrasing "legacy" every question draws from the stream exactly as the original generator did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from sdk.errors import PipmmError

from export.tasks import paraphrase as _paraphrase
from export.tasks.objects import COLORS, PLURALS, POSITIONS, SHAPES, SIZES, Region, Scene, SceneObject, region_of
from export.tasks.phrasings import COUNT_NOUNS, PHRASINGS

FAMILIES = ("describe", "color", "shape", "count", "exist", "position", "relation", "label", "refer")
LEGACY_FAMILIES = FAMILIES[:8]
_ANY_NAME = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


class QuestionArgumentError(PipmmError, ValueError):
    """A question-generation argument (families, per_family, phrasing) is out of range."""


@dataclass(frozen=True)
class Question:
    family: str
    prompt: str
    answer: str


def templates(family: str, phrasing: str = "train") -> tuple[str, ...]:
    """The flat template list of a family (relation: left, right, above, below; refer: color, shape, what)."""
    t = PHRASINGS[phrasing].get(family, ())
    return tuple(x for group in t.values() for x in group) if isinstance(t, dict) else t


def template_kind(family: str, template: str) -> str | None:
    """The group of a relation/refer template ('left'...; 'color'/'shape'/'what'), None for other families."""
    for phrasing in PHRASINGS.values():
        groups = phrasing.get(family)
        if isinstance(groups, dict):
            for kind, group in groups.items():
                if template in group:
                    return kind
    return None


def _names(o: SceneObject, objects, fields_options) -> list[str]:
    """The names of `o` made of the given attribute tuples that match `o` alone."""
    return [" ".join(getattr(o, f) for f in fields) for fields in fields_options
            if sum(all(getattr(p, f) == getattr(o, f) for f in fields) for p in objects) == 1]


def position_of(x: float, y: float, size: int, height: int | None = None) -> str:
    """Cell of the 3x3 grid of a size x size (or size x height) frame that holds (x, y)."""
    height = height or size
    return POSITIONS[min(int(3 * y / height), 2) * 3 + min(int(3 * x / size), 2)]


def _margin_to_grid(x: float, y: float, w: int, h: int | None = None) -> float:
    h = h or w
    return min(*(abs(x - w * k / 3) for k in (1, 2)), *(abs(y - h * k / 3) for k in (1, 2)))


def position_answer(scene: Scene, o: SceneObject) -> str | None:
    """o's cell, where it is clearly inside one cell of both the view and the canvas (else None)."""
    vx, vy = scene.view_xy(o.x, o.y)
    size = scene.image_size
    if _margin_to_grid(vx, vy, size) < 0.04 * size:
        return None
    cell = position_of(vx, vy, size)
    if scene.canvas is not None:
        w, h = scene.canvas
        if _margin_to_grid(o.x, o.y, w, h) < 0.04 * size or position_of(o.x, o.y, w, h) != cell:
            return None
    return cell


@dataclass(frozen=True)
class _Asked:
    question: Question
    template: str                               # the template it was rendered from
    fill: dict = field(default_factory=dict)    # slot -> text ({n}: "red star")


def _refer_answer(kind: str, o: SceneObject) -> str:
    return {"color": o.color, "shape": o.shape, "what": o.phrase}[kind]


def _ask(family: str, scene: Scene, rng: np.random.Generator, phrasing: str = "train") -> _Asked | None:
    objs, size = scene.objects, scene.image_size
    shapes = SHAPES if phrasing != "legacy" else SHAPES[:6]
    colors = list(COLORS) if phrasing != "legacy" else list(COLORS)[:8]
    choices = templates(family, phrasing)
    if not choices:
        return None
    tpl = choices[int(rng.integers(len(choices)))]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))] if seq else None

    def asked(answer: str, **fill) -> _Asked:
        return _Asked(Question(family, tpl.format(**fill) if fill else tpl, answer), tpl, fill)

    if family == "describe":
        return asked(scene.caption)
    if family == "refer":  # only where unambiguous without a pointer
        return asked(_refer_answer(template_kind(family, tpl), objs[0])) if len(objs) == 1 else None
    if family == "count":
        if rng.random() < 0.5:
            shape = pick([o.shape for o in objs]) if rng.random() < 0.7 else pick(shapes)
            return asked(str(sum(o.shape == shape for o in objs)), n=PLURALS[shape])
        color = pick([o.color for o in objs]) if rng.random() < 0.7 else pick(colors)
        nouns = COUNT_NOUNS[phrasing]
        noun = nouns[0] if len(nouns) == 1 else pick(nouns)
        return asked(str(sum(o.color == color for o in objs)), n=f"{color} {noun}")
    if family == "exist":
        o = pick(objs)
        shape, color, sz = (o.shape, o.color, o.size) if rng.random() < 0.5 else (
            pick(shapes), pick(colors), pick(SIZES))
        with_size = rng.random() < 0.3
        yes = any(p.shape == shape and p.color == color and (not with_size or p.size == sz) for p in objs)
        name = f"{sz} {color} {shape}" if with_size else f"{color} {shape}"
        article = "an" if name[0] in "aeiou" else "a"
        return asked("yes" if yes else "no", n=f"{article} {name}")

    def about(named: list, answer) -> _Asked | None:  # named: (object, unique name) pairs
        if not named:
            return None
        o, n = pick(named)
        return asked(answer(o), n=n)

    if family == "color":  # named without its colour
        return about([(o, n) for o in objs for n in _names(o, objs, (("shape",), ("size", "shape")))],
                     lambda o: o.color)
    if family == "shape":  # named without its shape
        return about([(o, n) for o in objs for n in _names(o, objs, (("color",), ("size", "color")))],
                     lambda o: o.shape)
    if family == "position":  # only objects clearly inside one cell of the 3x3 grid
        return about([(o, n) for o in objs if position_answer(scene, o) for n in _names(o, objs, _ANY_NAME)],
                     lambda o: position_answer(scene, o))
    if family == "label":
        return about([(o, n) for o in objs if o.label for n in _names(o, objs, _ANY_NAME)],
                     lambda o: o.label.lower())
    if family == "relation":  # only pairs whose centres are clearly apart along the asked axis
        named = [(o, pick(_names(o, objs, _ANY_NAME))) for o in objs]
        named = [(o, n) for o, n in named if n]
        word = template_kind(family, tpl)
        horizontal = word in ("left", "right")
        pairs = [(a, b) for a in named for b in named if a[0] is not b[0]
                 and abs((a[0].x - b[0].x) if horizontal else (a[0].y - b[0].y)) >= 0.08 * size]
        if not pairs:
            return None
        (a, na), (b, nb) = pick(pairs)
        truth = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}
        return asked("yes" if truth[word] else "no", a=na, b=nb)
    raise ValueError(f"unknown question family {family!r}")


def make_questions(scene: Scene, rng_or_seed, families: Sequence[str] = FAMILIES,
                   per_family: int | Mapping[str, int] = 1, phrasing: str = "train", paraphrase: float = 0.0,
                   paraphrase_rng: np.random.Generator | None = None) -> list[Question]:
    """Up to `per_family` distinct questions of each family (fewer when the scene has none to ask); a mapping
    gives a family's own count (1 where it is not named, e.g. {"relation": 3}).

    paraphrase: the chance that a question's template is reworded first (export/tasks/paraphrase.py; same
    meaning and answer), drawn from `paraphrase_rng` (required then), so the questions asked (content and answers)
    are those of paraphrase 0; at 0 nothing is drawn for it at all."""
    counts = {f: per_family.get(f, 1) if isinstance(per_family, Mapping) else per_family for f in families}
    unknown = [f for f in families if f not in FAMILIES]
    if isinstance(per_family, Mapping):
        unknown += [f for f in per_family if f not in FAMILIES]
    if unknown or not families or min(counts.values()) < 1 or phrasing not in PHRASINGS:
        raise QuestionArgumentError(f"bad families {list(families)}, per_family {per_family} or phrasing "
                                    f"{phrasing!r}: use families from {', '.join(FAMILIES)}, per_family >= 1 and "
                                    f"a phrasing of {', '.join(PHRASINGS)}")
    if not 0 <= paraphrase <= 1 or (paraphrase > 0 and phrasing == "held_out"):
        raise QuestionArgumentError(f"paraphrase {paraphrase} with phrasing {phrasing!r}: use 0-1, and 0 for "
                                    "held_out (its templates are never reworded)")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else \
        np.random.Generator(np.random.PCG64(rng_or_seed))
    if paraphrase > 0 and paraphrase_rng is None:
        raise QuestionArgumentError("paraphrase > 0 needs its own paraphrase_rng (drawing from the main stream would "
                                    "change which questions are asked)")
    out: list[Question] = []
    for family in families:
        seen: set[str] = set()
        for _ in range(4 * counts[family]):
            if len(seen) == counts[family]:
                break
            a = _ask(family, scene, rng, phrasing)
            if a is not None and a.question.prompt not in seen:  # distinct in content, whatever the wording
                seen.add(a.question.prompt)
                q = a.question
                if paraphrase > 0 and paraphrase_rng.random() < paraphrase:
                    q = replace(q, prompt=_paraphrase.rewrite(a.template, paraphrase_rng).format(**a.fill))
                out.append(q)
    return out


def refer_question(scene: Scene, rng: np.random.Generator, kind: str | None = None,
                   phrasing: str = "train") -> tuple[Question, Region] | None:
    """A refer question about one object of a (multi-object) scene and that object's Region (the benchmark's
    pointer). The target's asked attribute is unique in the scene (so answering from the region is needed
    and checkable); None when no object has one. kind: 'color', 'shape' or 'what' (None: any)."""
    groups = PHRASINGS[phrasing]["refer"]
    kind = kind or list(groups)[int(rng.integers(len(groups)))]
    attr = {"color": ("color",), "shape": ("shape",), "what": ("size", "color", "shape")}[kind]
    targets = [o for o in scene.objects
               if sum(all(getattr(p, a) == getattr(o, a) for a in attr) for p in scene.objects) == 1]
    if not targets:
        return None
    o = targets[int(rng.integers(len(targets)))]
    tpl = groups[kind][int(rng.integers(len(groups[kind])))]
    return Question("refer", tpl, _refer_answer(kind, o)), region_of(o)
