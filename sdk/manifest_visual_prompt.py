"""The manifest's `visual_prompt` section (sdk/manifest.py): a TVP pixel frame attached to the bundle.

    "visual_prompt": {"file": "visual_prompt.safetensors", "frame": 30, "inner_size": 164, "image_size": 224,
                      "sha256": "...", "geometry": "pad",
                      "settings": {"source": "...", "domain": "...", "losses": {...}, ...}}

Written by `pipmm prompt attach` (sdk/visual_prompt.py), read by the Pipeline. `geometry` (GEOMETRIES; "pad"
when absent, as every prompt before it was) says where delta (zero inside the frame) meets the image:
  pad      TVP's code: the image resized to inner_size = image_size - 2 * frame, zero-padded by `frame` pixels,
           delta added (the frame's pixels are delta's)
  overlay  the image at its full image_size (inner_size = image_size), delta added on its border band `frame`
           pixels wide, the band clipped to [0, 1] (a valid colour); the inside untouched
then normalised. `settings` summarises how the prompt was trained (export/tvp/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BundleError
from .manifest_fields import REEXPORT, Fields, Section, extra_field, is_dict, is_int, is_name


@dataclass(frozen=True)
class Geometry:
    """Where a prompt's delta meets the image (module docstring)."""
    shrinks: bool  # the image is resized to image_size - 2 * frame and zero-padded (else kept at image_size)
    clips: bool  # the band's pixels are clip(x + delta, 0, 1) (else x + delta, as trained)
    delta_range: tuple[float, float]  # training's clamp: pad's frame is a colour, overlay's a change of one


GEOMETRIES = {"pad": Geometry(shrinks=True, clips=False, delta_range=(0.0, 1.0)),
              "overlay": Geometry(shrinks=False, clips=True, delta_range=(-1.0, 1.0))}
DEFAULT_GEOMETRY = "pad"  # TVP's own, and what a prompt without the field was


def inner_side(geometry: str, image_size: int, frame: int) -> int:
    """The side the image is resized to under `geometry`."""
    return image_size - 2 * frame if GEOMETRIES[geometry].shrinks else image_size


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class VisualPromptSection(Section):
    file: str  # the delta, float32 [3, image_size, image_size] in safetensors, inside the bundle
    frame: int  # border width in pixels (the TVP paper's prompt_size)
    inner_size: int  # the side the image is resized to: image_size - 2 * frame (pad), image_size (overlay)
    image_size: int  # the vision graph's input side
    sha256: str  # of `file`, as the prompt directory recorded it (also in manifest `files`)
    geometry: str = DEFAULT_GEOMETRY  # a key of GEOMETRIES
    settings: dict = field(default_factory=dict)  # training summary: source model, domain, losses, steps, lr
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "VisualPromptSection":
        r = Fields(d, "visual_prompt", source)
        image_size = r.get("image_size", lambda v: is_int(v, 1), "a positive integer")
        frame = r.get("frame", lambda v: is_int(v, 1) and 2 * v < image_size, "a width below half the image side")
        geometry = r.get("geometry", lambda v: v in GEOMETRIES, f"one of {', '.join(GEOMETRIES)}", DEFAULT_GEOMETRY)
        side = inner_side(geometry, image_size, frame)
        inner = r.get("inner_size", lambda v: v == side, f"{side} (the {geometry} geometry's inner side)")
        return cls(file=r.get("file", is_name, "a file name"), frame=frame, inner_size=inner, image_size=image_size,
                   sha256=r.get("sha256", is_sha256, "64 lowercase hex digits"), geometry=geometry,
                   settings=r.get("settings", is_dict, "an object", {}), extra=r.extra(cls))

    def check_files(self, files: dict, source: str) -> None:
        """The prompt's file must be one of the manifest's files, with the same sha256."""
        record = files.get(self.file)
        if record is None or record.sha256 != self.sha256:
            raise BundleError(f"{source}: visual_prompt file {self.file!r} is not listed in 'files' with its "
                              f"sha256; {REEXPORT} (or attach the prompt again with 'pipmm prompt attach')")
