"""The manifest's `visual_prompt` section (sdk/manifest.py): a TVP pixel frame attached to the bundle.

    "visual_prompt": {"file": "visual_prompt.safetensors", "frame": 30, "inner_size": 164, "image_size": 224,
                      "sha256": "...", "settings": {"source": "...", "domain": "...", "losses": {...}, ...}}

Written by `pipmm prompt attach` (sdk/visual_prompt.py), read by the Pipeline: the image is resized to
inner_size x inner_size, zero-padded by `frame` pixels to image_size, the prompt's delta (zero inside the
frame) added, then normalised. `settings` summarises how the prompt was trained (export/tvp/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BundleError
from .manifest_fields import REEXPORT, Fields, Section, extra_field, is_dict, is_int, is_name


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class VisualPromptSection(Section):
    file: str  # the delta, float32 [3, image_size, image_size] in safetensors, inside the bundle
    frame: int  # border width in pixels (the TVP paper's prompt_size)
    inner_size: int  # image_size - 2 * frame: the side the image is resized to
    image_size: int  # the vision graph's input side
    sha256: str  # of `file`, as the prompt directory recorded it (also in manifest `files`)
    settings: dict = field(default_factory=dict)  # training summary: source model, domain, losses, steps, lr
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "VisualPromptSection":
        r = Fields(d, "visual_prompt", source)
        image_size = r.get("image_size", lambda v: is_int(v, 1), "a positive integer")
        frame = r.get("frame", lambda v: is_int(v, 1) and 2 * v < image_size, "a width below half the image side")
        inner = r.get("inner_size", lambda v: v == image_size - 2 * frame, f"image_size - 2 * frame = "
                      f"{image_size - 2 * frame}")
        return cls(file=r.get("file", is_name, "a file name"), frame=frame, inner_size=inner, image_size=image_size,
                   sha256=r.get("sha256", is_sha256, "64 lowercase hex digits"),
                   settings=r.get("settings", is_dict, "an object", {}), extra=r.extra(cls))

    def check_files(self, files: dict, source: str) -> None:
        """The prompt's file must be one of the manifest's files, with the same sha256."""
        record = files.get(self.file)
        if record is None or record.sha256 != self.sha256:
            raise BundleError(f"{source}: visual_prompt file {self.file!r} is not listed in 'files' with its "
                              f"sha256; {REEXPORT} (or attach the prompt again with 'pipmm prompt attach')")
