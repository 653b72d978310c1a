"""A shifted camera domain for TVP: the generated scenes as a different camera at dusk would see them.

    shifted_scene(seed, size) -> scenes.Scene: the layout, objects and answers of scenes.make_scene(seed, size),
                                                re-rendered in the style DUSK (a registry-shaped entry)

The style, per scene from its own stream Generator(PCG64([seed, DOMAIN_STREAM])), so the same (seed, size)
gives the same pixels and the questions stay those of the clean scene:

  * background: the grey texture is replaced by a dark teal one (objects and labels are kept: scenes.py
    guarantees background pixels have every channel in [90, 185] and every object colour one outside it;
    label ink is (30, 30, 30));
  * uneven lighting: a linear ramp in a random direction times a vignette;
  * a warm colour cast (sodium light: red up, blue down);
  * a Gaussian blur (lens focus) and JPEG compression at a low quality.

Splits (DOMAIN_SPLITS): the shifted test split is the clean test split's scenes (same seeds, same questions:
only the pixels differ, so clean and shifted accuracies compare question for question); the shifted train split
is train-split scenes from index 900,000,000 on, which no training stream of `pipmm train` reaches (their
offsets are 0, 1e8, 2e8 and + 1e7 per seed) nor the TSE guide's (export/tvp/clip.py, from 800,000,000).

Written as a function of (seed, size) with its parameters in one dict so that it can become one entry of the
scene style registry (export/tasks/styles.py) when that lands.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from export.tasks import scenes

DOMAIN_STREAM = 7  # the style's random stream per scene: PCG64([seed, 7]) (scenes.py uses 1 and 2 for questions)
DOMAIN_SPLITS = {"train": ("train", 900_000_000), "test": ("test", 0)}  # shifted split -> (scenes split, offset)
GREY = (90, 185)  # scenes.py's guarantee: every background channel lies in this range, no object colour does
DUSK = {
    "name": "dusk-camera",
    "version": 1,
    "background_rgb": [[35, 70, 85], [70, 105, 120]],  # base colour drawn per scene between these
    "background_blotches": 16.0,  # std of the smooth 6x6 texture, upsampled
    "background_noise": 7.0,  # std of per-pixel noise
    "light_ramp": [0.45, 1.15],  # illumination from one side of the image to the other (random direction)
    "vignette": [0.15, 0.35],  # 1 - v * r^2, r = 1 at the corners
    "cast_gains": [1.08, 0.95, 0.72],  # RGB gains of the warm cast
    "cast_jitter": 0.05,  # each gain +- this
    "blur_radius": [0.6, 1.1],  # Gaussian radius in pixels at 224 px (scaled with the size)
    "jpeg_quality": [30, 50],
}


def render(clean: Image.Image, rng: np.random.Generator, style: dict = DUSK) -> Image.Image:
    """A clean scene image (scenes.make_scene's) -> the same scene in `style`."""
    pixels = np.asarray(clean, dtype=np.float32)
    size = pixels.shape[0]
    lo, hi = GREY
    objects = ((pixels < lo) | (pixels > hi)).any(axis=-1, keepdims=True)  # [S, S, 1]: objects and label ink

    base = rng.uniform(*np.asarray(style["background_rgb"], np.float32))
    coarse = rng.normal(0, style["background_blotches"], size=(6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    background = base + smooth[..., None] + rng.normal(0, style["background_noise"], size=(size, size, 3))
    out = np.where(objects, pixels, background)

    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5  # [-0.5, 0.5]
    angle = rng.uniform(0, 2 * np.pi)
    along = (x * np.cos(angle) + y * np.sin(angle)) / np.sqrt(0.5) * 0.5 + 0.5  # 0..1 across the image
    low, high = style["light_ramp"]
    light = (low + (high - low) * along) * (1 - rng.uniform(*style["vignette"]) * (x ** 2 + y ** 2) / 0.5)
    gains = np.asarray(style["cast_gains"]) + rng.uniform(-1, 1, 3) * style["cast_jitter"]
    out = np.clip(out * light[..., None] * gains, 0, 255).astype(np.uint8)

    img = Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(*style["blur_radius"]) * size / 224))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(style["jpeg_quality"][0], style["jpeg_quality"][1] + 1)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shifted_scene(seed: int, size: int = 224, style: dict = DUSK) -> scenes.Scene:
    """Scene `seed` (scenes.make_scene's layout and answers) rendered in `style`; deterministic."""
    scene = scenes.make_scene(seed, size)
    rng = np.random.Generator(np.random.PCG64([seed, DOMAIN_STREAM]))
    scene.image = render(scene.image, rng, style)
    return scene


def split_seed(split: str, index: int) -> int:
    """Seed of scene `index` of the shifted `split` (DOMAIN_SPLITS)."""
    if split not in DOMAIN_SPLITS:
        raise scenes.SceneArgumentError(f"unknown shifted split {split!r}: use one of {', '.join(DOMAIN_SPLITS)}")
    base, offset = DOMAIN_SPLITS[split]
    return scenes.split_seed(base, offset + index)


def iter_examples(split: str, n: int, size: int = 224, families: Sequence[str] = scenes.FAMILIES,
                  seed_offset: int = 0, shifted: bool = True) -> Iterator[scenes.Example]:
    """scenes.iter_examples's questions (one per family, its own question stream) on shifted scenes (shifted=False:
    the same classic scenes and questions, unshifted)."""
    for i in range(seed_offset, seed_offset + n):
        seed = split_seed(split, i)
        scene = shifted_scene(seed, size) if shifted else scenes.make_scene(seed, size)
        for q in scenes.make_questions(scene, np.random.Generator(np.random.PCG64([scene.seed, 1])), families):
            yield scenes.Example(scene.image, q.prompt, q.answer, q.family, scene.seed)


def questions(split: str, n: int, size: int = 224, families: Sequence[str] = scenes.FAMILIES,
              clean: bool = False) -> list[scenes.Example]:
    """The first n questions of the shifted `split` (clean=True: the same scenes unshifted)."""
    out = []
    scenes_needed = max(1, 4 * n // max(1, len(families)) + 8)
    stream = iter_examples(split, scenes_needed, size, families, shifted=not clean)
    for example in stream:
        out.append(example)
        if len(out) == n:
            break
    return out


def write_dataset(out_dir, n: int, split: str = "train", size: int = 224, seed_offset: int = 0,
                  progress: bool = True) -> Path:
    """n shifted scenes as out_dir/images/*.png + out_dir/<split>.json (scenes.write_dataset's LLaVA-style
    records: the clean split's questions, one per family, each with the scene's caption for TSE) +
    out_dir/domain.json (the style and split)."""
    split_seed(split, seed_offset)  # an unknown split: a one-line error
    path = scenes.write_dataset(out_dir, n, DOMAIN_SPLITS[split][0], size, progress, seed_offset, captions=True, desc="shifted scenes",
                                scene_at=lambda i: shifted_scene(split_seed(split, i), size))
    (Path(out_dir) / "domain.json").write_text(json.dumps({"style": DUSK, "split": split, "scenes": n, "size": size,
                                                           "seed_offset": seed_offset, "splits": DOMAIN_SPLITS},
                                                          indent=1))
    return path
