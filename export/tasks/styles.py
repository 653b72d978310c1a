"""Rendering styles of generated scenes: backgrounds, object sizes, outlines, labels, canvases and photometric effects.

A Style is plain, frozen data; STYLES maps its name to it. make_scene(seed, size, style) draws the
layout from the scene's main stream Generator(PCG64(seed)) exactly as the original generator did,
and every style-specific choice (canvas, font, outlines, effects, texture) from a second stream
Generator(PCG64([seed, 4])), so "classic" -- which makes no style-specific choice -- is
byte-identical to the original scenes (samples/scene.png is seed 0 of it).

Invariant (per style, tests/test_styles.py): the background layer -- everything drawn before the
objects, shadows included -- keeps every pixel at RGB distance >= BG_MARGIN from every object colour
(classic: every channel in [90, 185], which is further still), so the background is never an object
colour; label ink is grey, never an object colour. Photometric effects (lighting, blur, noise, JPEG)
come after and are mild: the lighting factor stays in [0.8, 1.15] and the noise sigma <= 8.

TRAIN_STYLES are what training draws (with weights); HELD_OUT_STYLES are never drawn in training and
make the `style` eval split.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from export.tasks.objects import CLASSIC_COLORS, CLASSIC_SHAPES, COLORS, SHAPES

BG_MARGIN = 40.0   # min RGB distance of any non-classic background pixel to any object colour
_PUSH = 56.0       # keep_away pushes pixels this far out (> BG_MARGIN: a later push or the clip may pull back)
_GREY = (90, 185)  # classic: range of every background/clutter channel
_ALL_COLORS = np.array(list(COLORS.values()), np.float32)


@dataclass(frozen=True)
class Style:
    name: str
    background: str                              # key of BACKGROUNDS
    counts: tuple[int, int] = (3, 12)            # objects drawn (inclusive; a crowded scene gets fewer)
    p_small: float = 0.65                        # share of "small" objects
    radii: dict = field(default_factory=lambda: {"small": (7, 10), "large": (14, 20)})  # px at 224
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    outline: float = 0.0                         # chance that a large object is drawn as an outline
    p_labels: float = 0.6                        # chance that a scene has labels (1-3 of its objects)
    label_font: tuple[int, int] = (0, 0)         # font px at 224 ((0, 0): classic's 11 px); else drawn per label
    stroke: float = 0.0                          # chance of a bold (stroked) label
    canvases: tuple[tuple[int, int], ...] = ((224, 224),)  # (w, h) at size 224; the view is the centred square
    theme: float = 0.0                           # chance of many (7-12) objects sharing a shape or a colour
    single: float = 0.0                          # chance of a one-object scene (refer questions need them)
    shadow: bool = False                         # soft drop shadows on the background under the objects
    light: float = 0.0                           # max strength of a linear lighting ramp (factor 1 -/+ light)
    blur: float = 0.0                            # max Gaussian blur radius, px at 224
    noise: float = 0.0                           # max pixel-noise sigma
    jpeg: tuple[int, int] = (0, 0)               # JPEG quality range ((0, 0): none)

    @property
    def classic(self) -> bool:
        return self.background == "classic"


# ----------------------------------------------------------------------------- backgrounds

def _safe_bins() -> np.ndarray:
    """[32768] bool: RGB cubes of side 8 whose every colour is >= _PUSH from every object colour."""
    centres = (np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1).reshape(-1, 3) * 8 + 3.5)
    d = np.linalg.norm(centres[:, None, :] - _ALL_COLORS[None], axis=-1).min(1)
    return d >= _PUSH + 8 * math.sqrt(3) / 2


_SAFE = _safe_bins()


def keep_away(arr: np.ndarray, margin: float = _PUSH) -> np.ndarray:
    """[H,W,3] float -> the same with every pixel pushed to >= margin (RGB distance) from every object colour."""
    out = np.clip(np.asarray(arr, np.float32), 0, 255)
    flat = out.reshape(-1, 3)
    q = np.minimum(flat, 255).astype(np.int32) // 8
    idx = np.flatnonzero(~_SAFE[q[:, 0] * 1024 + q[:, 1] * 32 + q[:, 2]])  # only pixels that may be near
    if not idx.size:
        return out
    near = flat[idx]
    for _ in range(3):
        for c in _ALL_COLORS:
            d = near - c
            n = np.linalg.norm(d, axis=-1, keepdims=True)
            hit = n[:, 0] < margin
            if hit.any():
                toward_grey = (128.0 - c) / max(1e-6, float(np.linalg.norm(128.0 - c)))
                unit = np.where(n > 1e-3, d / np.maximum(n, 1e-3), toward_grey)
                near = np.where(hit[:, None], c + unit * margin, near)
        near = np.clip(near, 0, 255)
    flat[idx] = near
    return out


def _classic(rng: np.random.Generator, size: int) -> Image.Image:
    """Grey texture + pixel noise + faint lines, rings and specks; every channel in _GREY (main stream)."""
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


def _grid(w: int, h: int, angle: float) -> np.ndarray:
    """[H,W] coordinate along the direction `angle` (pixels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx * math.cos(angle) + yy * math.sin(angle)


def _pastel(rng, lo: float, hi: float) -> np.ndarray:
    """A random colour with every channel in [lo, hi] (low saturation at narrow ranges)."""
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _far(rgb: np.ndarray) -> np.ndarray:
    """A flat colour moved well clear of the object colours (so the per-pixel pass has little left to do)."""
    return keep_away(rgb[None, None], _PUSH + 16)[0, 0]


def _flat_light(rng, w, h):
    return np.broadcast_to(_far(_pastel(rng, 195, 240)), (h, w, 3)) + rng.normal(0, 2, (h, w, 3))


def _flat_dark(rng, w, h):
    return np.broadcast_to(_far(_pastel(rng, 40, 80)), (h, w, 3)) + rng.normal(0, 2, (h, w, 3))


def _gradient(rng, w, h):
    a, b = _pastel(rng, 60, 230), _pastel(rng, 60, 230)
    t = _grid(w, h, rng.uniform(0, 2 * math.pi))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    return a + (b - a) * t[..., None]


def _stripes(rng, w, h):
    base, step = _pastel(rng, 90, 210), rng.uniform(-22, 22, size=3)
    period = rng.uniform(10, 28) * min(w, h) / 224
    t = _grid(w, h, rng.uniform(0, math.pi)) / period
    return base + step * (np.floor(t) % 2)[..., None]


def _checker(rng, w, h):
    base, step = _pastel(rng, 90, 210), rng.uniform(-20, 20, size=3)
    cell = rng.uniform(10, 32) * min(w, h) / 224
    yy, xx = np.mgrid[0:h, 0:w]
    return base + step * ((xx // cell + yy // cell) % 2)[..., None]


def _dots(rng, w, h):
    base, step = _pastel(rng, 120, 220), rng.uniform(-25, 25, size=3)
    cell = rng.uniform(12, 24) * min(w, h) / 224
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot((xx % cell) - cell / 2, (yy % cell) - cell / 2)
    return base + step * (d < cell / 5)[..., None]


def _wood(rng, w, h, lo=150, hi=205):
    """A wooden table top: a light wood tone, grain streaks along x, a vignette."""
    tone = np.array([rng.uniform(lo + 25, hi), rng.uniform(lo - 10, hi - 30), rng.uniform(lo - 55, hi - 75)], np.float32)
    grain = rng.normal(0, 1, size=(max(2, h // 6), 4)).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain).resize((w, h), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1 - 0.18 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2) * 4
    return (tone + 9 * grain[..., None]) * vignette[..., None] + rng.normal(0, 3, (h, w, 3))


def _slate(rng, w, h):
    """A dark grey-blue desk with a soft light pool (held out)."""
    tone = np.array([rng.uniform(70, 95), rng.uniform(80, 105), rng.uniform(95, 120)], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    pool = np.exp(-(((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2) * 3)
    return tone * (0.8 + 0.45 * pool)[..., None] + rng.normal(0, 4, (h, w, 3))


def _paper(rng, w, h):
    """Off-white paper with ruled lines (held out)."""
    base = np.array([rng.uniform(215, 235), rng.uniform(210, 230), rng.uniform(190, 215)], np.float32)
    arr = np.broadcast_to(base, (h, w, 3)) + rng.normal(0, 3, (h, w, 3))
    period = rng.uniform(14, 22) * min(w, h) / 224
    rule = (np.arange(h) % period < 1.2)[:, None, None]
    return np.where(rule, base - np.array([60, 45, 10], np.float32), arr)


# name -> (rng, width, height) -> [H,W,3] float (non-classic: passed through keep_away)
BACKGROUNDS = {"flat-light": _flat_light, "flat-dark": _flat_dark, "gradient": _gradient, "stripes": _stripes,
               "checker": _checker, "dots": _dots, "wood": _wood, "slate": _slate, "paper": _paper}


def background(style: Style, rng: np.random.Generator, srng: np.random.Generator, width: int, height: int,
               objects=()) -> Image.Image:
    """The background layer of a scene (classic: from the main stream; else from the style stream)."""
    if style.classic:
        return _classic(rng, width)
    arr = np.asarray(BACKGROUNDS[style.background](srng, width, height), np.float32)
    if style.shadow and objects:
        arr = arr * _shadows(objects, width, height, srng)[..., None]
    return Image.fromarray(np.round(keep_away(arr)).astype(np.uint8))


def _shadows(objects, width: int, height: int, srng) -> np.ndarray:
    """[H,W] multiplicative shading: a blurred dark disc below-right of each object (light from the top left)."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    shift = srng.uniform(0.15, 0.35)
    for o in objects:
        d = max(1, round(shift * o.radius))
        draw.ellipse((o.x - o.radius + d, o.y - o.radius + d, o.x + o.radius + d, o.y + o.radius + d), fill=255)
    soft = np.asarray(img.filter(ImageFilter.GaussianBlur(max(1.0, 0.02 * min(width, height)))), np.float32) / 255
    return 1 - 0.3 * soft


# ----------------------------------------------------------------------------- photometric effects

def effects(style: Style, srng: np.random.Generator, img: Image.Image, view: int) -> Image.Image:
    """Lighting ramp, blur, noise and JPEG, each drawn from the style stream (none for classic)."""
    if style.light > 0:
        w, h = img.size
        t = _grid(w, h, srng.uniform(0, 2 * math.pi))
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min())) - 0.5   # -0.5..0.5
        strength = srng.uniform(0, style.light)
        factor = np.clip(1 + 2 * strength * t, 0.8, 1.15)
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) * factor[..., None], 0, 255).astype(np.uint8))
    if style.blur > 0:
        radius = srng.uniform(0, style.blur) * view / 224
        if radius > 0.2:
            img = img.filter(ImageFilter.GaussianBlur(radius))
    if style.noise > 0:
        sigma = srng.uniform(0, min(8.0, style.noise))
        arr = np.asarray(img, np.float32) + srng.normal(0, sigma, (img.height, img.width, 3))
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if style.jpeg[1] > 0:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(srng.integers(style.jpeg[0], style.jpeg[1] + 1)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


# ----------------------------------------------------------------------------- the registry

_BIG = {"small": (8, 12), "large": (26, 56)}    # up to half the frame
_TINY = {"small": (4, 7), "large": (14, 18)}
_PHOTO = dict(shadow=True, light=0.12, blur=0.8, noise=4.0, jpeg=(55, 90), label_font=(11, 18), stroke=0.3)
_ASPECTS = ((224, 224), (298, 224), (224, 298), (256, 192), (320, 240), (448, 448))

STYLES: dict[str, Style] = {s.name: s for s in (
    Style("classic", "classic", shapes=CLASSIC_SHAPES, colors=CLASSIC_COLORS, p_labels=0.6),
    Style("flat-light", "flat-light", label_font=(10, 16), theme=0.2, single=0.1),
    Style("flat-dark", "flat-dark", label_font=(10, 16), theme=0.2, single=0.1),
    Style("gradient", "gradient", label_font=(10, 18), outline=0.3, theme=0.15, single=0.08, light=0.1,
          canvases=_ASPECTS),
    Style("stripes", "stripes", label_font=(12, 18), stroke=0.5, theme=0.15, single=0.08, noise=5.0),
    Style("checker", "checker", label_font=(12, 18), stroke=0.5, outline=0.2, single=0.08, blur=0.7),
    Style("big", "flat-light", counts=(1, 6), p_small=0.3, radii=_BIG, outline=0.3, label_font=(12, 20),
          single=0.2, canvases=_ASPECTS),
    Style("tiny", "gradient", counts=(5, 12), p_small=0.8, radii=_TINY, theme=0.3, label_font=(10, 14),
          noise=4.0),
    Style("outline", "flat-light", outline=1.0, p_small=0.4, label_font=(10, 16), theme=0.15, single=0.1),
    Style("table", "wood", canvases=_ASPECTS + ((320, 240), (240, 320)), theme=0.15, single=0.1, outline=0.1,
          **_PHOTO),
    # held out: textures, tones and artefacts never trained
    Style("photo", "slate", canvases=((640, 480), (480, 640), (400, 300), (512, 512)), outline=0.1, single=0.1,
          **{**_PHOTO, "light": 0.15, "jpeg": (35, 70), "blur": 1.0}),
    Style("paper", "paper", label_font=(11, 18), stroke=0.3, outline=0.3, single=0.1, jpeg=(30, 60),
          canvases=((224, 224), (320, 240))),
    Style("dots", "dots", label_font=(11, 17), theme=0.15, single=0.1, noise=6.0, blur=0.6),
    Style("dusk", "flat-dark", radii=_BIG, counts=(1, 7), p_small=0.4, outline=0.3, single=0.15, light=0.15,
          label_font=(12, 20), noise=7.0, canvases=((300, 224), (224, 224))),
)}
HELD_OUT_STYLES = ("photo", "paper", "dots", "dusk")
# name -> weight of the training mix ("classic" keeps a quarter: the original distribution stays present)
TRAIN_STYLES = {"classic": 0.25, "flat-light": 0.08, "flat-dark": 0.08, "gradient": 0.09, "stripes": 0.07,
                "checker": 0.07, "big": 0.09, "tiny": 0.07, "outline": 0.07, "table": 0.13}
assert not set(TRAIN_STYLES) & set(HELD_OUT_STYLES) and set(TRAIN_STYLES) | set(HELD_OUT_STYLES) == set(STYLES)


def pick_style(seed: int, mix: dict[str, float]) -> str:
    """The style of scene `seed` in a stream with weights `mix` (own stream: never shifts the scene's draws)."""
    names = list(mix)
    p = np.array([mix[n] for n in names], np.float64)
    rng = np.random.Generator(np.random.PCG64([seed, 3]))
    return names[int(rng.choice(len(names), p=p / p.sum()))]
