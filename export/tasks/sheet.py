"""Pictures of the generated data: a contact sheet of every style, and the real-looking frames of samples/.

    python -m sdk.cli scenes --contact-sheet docs/styles.png     # one scene per style, named
    python -m export.tasks.sheet --samples samples               # samples/frame-*.png + samples/frames.json

The sample frames are held-out-style scenes (styles.HELD_OUT_STYLES, never trained) at camera-like
sizes, each with questions and the answers a person would give (computed from the drawn objects,
like every answer here); tests/test_styles.py checks that the json matches the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from export.tasks import scenes
from export.tasks.scenes import STYLES, TRAIN_STYLES, make_scene, make_questions

TILE = 224
# (file, seed, style, canvas): each frame's seed is chosen once here, not searched at run time.
SAMPLE_FRAMES = (("frame-desk.png", 7_000_000_001, "photo", (640, 480)),
                 ("frame-desk-portrait.png", 7_000_000_002, "photo", (480, 640)),
                 ("frame-paper.png", 7_000_000_003, "paper", (512, 384)),
                 ("frame-dots.png", 7_000_000_004, "dots", (448, 448)),
                 ("frame-dusk.png", 7_000_000_005, "dusk", (600, 450)))
SAMPLE_FAMILIES = ("describe", "count", "color", "shape", "position")


def contact_sheet(path, seed: int = 11, columns: int = 5) -> Path:
    """One scene of every style, scaled into TILE x TILE tiles, with the style name (train/held out)."""
    names = list(STYLES)
    rows = -(-len(names) // columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        img = make_scene(seed + i, 224, name).image
        scale = TILE / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        x, y = (i % columns) * TILE, (i // columns) * (TILE + 16)
        sheet.paste(img, (x, y + 16))
        draw.text((x + 4, y + 2), f"{name} ({'train' if name in TRAIN_STYLES else 'held out'})", fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return Path(path)


def sample_records() -> list[dict]:
    """[{file, seed, style, canvas, objects, questions: [{family, prompt, answer}]}] of SAMPLE_FRAMES."""
    records = []
    for file, seed, style, canvas in SAMPLE_FRAMES:
        scene = make_scene(seed, 224, style, canvas)
        questions = [{"family": q.family, "prompt": q.prompt, "answer": q.answer}
                     for q in make_questions(scene, seed, SAMPLE_FAMILIES)]
        records.append({"file": file, "seed": seed, "style": style, "canvas": list(scene.image.size),
                        "objects": [o.phrase for o in scene.objects], "questions": questions})
    return records


def write_samples(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file, seed, style, canvas in SAMPLE_FRAMES:
        make_scene(seed, 224, style, canvas).image.save(folder / file)
    path = folder / "frames.json"
    path.write_text(json.dumps(sample_records(), indent=1) + "\n", encoding="utf-8")
    return path


def add_arguments(parser) -> None:
    """`pipmm scenes`: scenes.py's dataset arguments, plus the contact sheet."""
    scenes.add_arguments(parser)
    parser.add_argument("--contact-sheet", default=None, metavar="PNG",
                        help="instead: write a contact sheet of every style and exit")


def run(args) -> int:
    if args.contact_sheet:
        contact_sheet(args.contact_sheet)
        print(f"wrote a contact sheet of {len(STYLES)} styles to {args.contact_sheet}")
        return 0
    return scenes.run(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=None, metavar="DIR", help="write the sample frames and frames.json")
    parser.add_argument("--contact-sheet", default=None, metavar="PNG")
    args = parser.parse_args()
    if args.samples:
        print(f"wrote {write_samples(args.samples)}")
    if args.contact_sheet:
        print(f"wrote {contact_sheet(args.contact_sheet)}")
