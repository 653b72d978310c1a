"""The vocabulary of generated scenes (shapes, colours, sizes, positions), drawn objects and referring regions.

Plain data, torch-free: scenes.py lays objects out and draws them, questions.py asks about them,
styles.py paints what lies around them. Coordinates are pixels of the drawn canvas (the image a
user would pass to the SDK); a scene's *view* is the centred square of side Scene.image_size that
the CLIP preprocessing (shortest edge -> model size, centre crop) keeps, and every object lies in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The first 6 shapes and 8 colours are the original ("classic") vocabulary, in their original order:
# the classic style draws only from them, so its scenes stay byte-identical.
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "hexagon", "arrow", "moon")
COLORS = {
    "red": (230, 25, 25), "green": (30, 175, 45), "blue": (30, 70, 235), "yellow": (250, 230, 30),
    "purple": (150, 40, 205), "orange": (250, 125, 0), "white": (250, 250, 250), "black": (10, 10, 10),
    "pink": (255, 105, 180), "brown": (140, 80, 30), "cyan": (0, 200, 220),
}
CLASSIC_SHAPES = SHAPES[:6]
CLASSIC_COLORS = tuple(COLORS)[:8]
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds", "heart": "hearts", "hexagon": "hexagons",
           "arrow": "arrows", "moon": "moons"}
LABEL_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345789"  # no I/O/Q/0/1: too easy to misread at 8 px


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str           # "small" (radius <= 12 px at 224) or "large" (radius >= 14 px at 224)
    x: int              # centre, canvas pixels
    y: int
    radius: int         # half the side of the box the shape fits in
    label: str | None = None
    label_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the drawn text
    outline: int = 0    # 0: filled; else the width in pixels of the drawn outline
    label_font: int = 0  # font size of the label in canvas pixels (0: the classic size for the view)
    label_stroke: int = 0  # stroke width of the label's text (bold), pixels

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)


@dataclass
class Scene:
    seed: int
    image_size: int                   # side of the view (canvas pixels); the canvas itself for square scenes
    objects: tuple[SceneObject, ...]  # canonical (raster) order of the view, the order of the caption
    image: Image.Image | None = None
    style: str = "classic"
    offset: tuple[int, int] = (0, 0)  # canvas pixel of the view's top-left corner
    canvas: tuple[int, int] | None = None  # (width, height); None: the square view itself

    @property
    def caption(self) -> str:
        return ", ".join(o.phrase for o in self.objects)

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.canvas or (self.image_size, self.image_size)

    def view_xy(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixel -> pixel of the view (what the model sees after resize and centre crop, at view scale)."""
        return x - self.offset[0], y - self.offset[1]


def shape_points(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon of `shape` inside the box [x - r, x + r] x [y - r, y + r] (circle: drawn as an ellipse)."""
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
    if shape == "hexagon":  # flat top and bottom
        return [(x + r * math.cos(k * math.pi / 3), y + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "heart":  # the classic parametric heart (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - ...), scaled to r
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
        return [(x + r * px / 16.5, y + r * (py - 2.6) / 14.5) for px, py in pts]  # py in [-11.8, 17]
    if shape == "arrow":  # pointing up: head over the top 55 %, shaft below
        t = 0.3 * r
        return [(x, y - r), (x + r, y + 0.1 * r), (x + t, y + 0.1 * r), (x + t, y + r), (x - t, y + r),
                (x - t, y + 0.1 * r), (x - r, y + 0.1 * r)]
    if shape == "moon":  # a crescent opening to the right, its body over the centre: outer circle (x, r) minus
        # the circle (x + d, ri); u, v: where the two circles cross, relative to (x, y)
        d, ri = 0.9 * r, 0.8 * r
        u = (r * r - ri * ri + d * d) / (2 * d)
        v = math.sqrt(max(r * r - u * u, 0.0))
        a_out = math.atan2(v, u)
        outer = [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.linspace(a_out, 2 * math.pi - a_out, 28)]
        a0 = math.atan2(-v, u - d)  # back along the inner circle through its leftmost point (clockwise)
        inner = [(x + d + ri * math.cos(a), y + ri * math.sin(a)) for a in np.linspace(a0, -2 * math.pi - a0, 20)]
        return outer + inner[1:-1]
    raise ValueError(shape)


def draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, fill=None) -> None:
    """Draw `o` filled (or as an outline of width o.outline) in its colour (or `fill`)."""
    rgb = fill if fill is not None else COLORS[o.color]
    if o.shape == "circle":
        box = (o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius)
        if o.outline:
            draw.ellipse(box, outline=rgb, width=o.outline)
        else:
            draw.ellipse(box, fill=rgb)
    elif o.outline:
        draw.polygon(shape_points(o.shape, o.x, o.y, o.radius), outline=rgb, width=o.outline)
    else:
        draw.polygon(shape_points(o.shape, o.x, o.y, o.radius), fill=rgb)


def object_mask(o: SceneObject, width: int, height: int) -> np.ndarray:
    """[height, width] bool: the pixels the filled shape covers (also for outlined objects: its area)."""
    img = Image.new("L", (width, height), 0)
    draw_object(ImageDraw.Draw(img), SceneObject(o.shape, o.color, o.size, o.x, o.y, o.radius), fill=255)
    return np.asarray(img) > 0


@dataclass(frozen=True)
class Region:
    """Where a referring question points (canvas pixels): the same region as box, point, scribble and mask.

    sdk.regions' types from it: Box(*box), Point(point), Scribble(scribble), Mask(mask(w, h)).
    """
    box: tuple[int, int, int, int]            # x0, y0, x1, y1 (x1/y1 exclusive)
    point: tuple[float, float]                # the object's centre
    scribble: tuple[tuple[float, float], ...]  # a short stroke through the object, inside its box
    obj: SceneObject

    def mask(self, width: int, height: int) -> np.ndarray:
        return object_mask(self.obj, width, height)


def region_of(o: SceneObject) -> Region:
    r = 0.5 * o.radius
    stroke = tuple((o.x + r * math.cos(a), o.y + 0.6 * r * math.sin(2 * a)) for a in np.linspace(0, math.pi, 5))
    return Region((o.x - o.radius, o.y - o.radius, o.x + o.radius + 1, o.y + o.radius + 1), (float(o.x), float(o.y)),
                  stroke, o)
