"""Transferable visual prompting (TVP) on the device: a learned pixel frame around the image.

A prompt directory (written by `pipmm tvp train`, export/tvp/train.py) holds

    visual_prompt.safetensors   "delta": float32 [3, S, S], zero inside the frame (S = image_size)
    visual_prompt.json          frame, image_size, inner_size, geometry, sha256 of the weights, training settings

and a bundle may carry one (`pipmm prompt attach`; manifest section sdk/manifest_visual_prompt.py). With a
prompt, preprocessing becomes (export/tvp/transform.py is the same in torch; tests/test_visual_prompt.py: 1e-6)

    pad (TVP's code; S - 2 * frame = inner):
    image --the bundle's own resize + center crop, at inner x inner--> uint8 [inner, inner, 3]
          --rescale (float64 * factor -> float32)--> --zero-pad by `frame`--> [S, S, 3]
          --+ delta--> --(x - mean) / std--> pixel_values [1, 3, S, S]
    overlay (inner = S: the image keeps its size):
    image --the bundle's own resize + center crop--> uint8 [S, S, 3] --rescale--> --+ delta-->
          --the band `frame` pixels wide clipped to [0, 1]--> --(x - mean) / std--> pixel_values [1, 3, S, S]

so with pad the frame pixels are the prompt's and the image keeps its pixels, smaller; with overlay the image
keeps its size and the prompt shifts the pixels of its border. The safetensors file is read here with numpy
(its format: 8-byte little-endian header length, a JSON header, raw little-endian data).

A bundle whose vision graph normalises (pixel_input "uint8-nhwc", export/pixel_input.py) gets the framed image
as uint8 [1, S, S, 3]: the inner crop's own uint8 pixels (zero-padded for pad) plus the frame rounded to uint8
levels (rint(delta / rescale_factor)), clipped to [0, 255]. Inside the frame that is the float path's input
exactly (delta is zero there); on the frame it is off by at most half a level, 0.5 * factor / std after
normalising (its effect on the vision output and the answers is measured in docs/tvp.md). A pad frame outside
the pixel range (a --no-clamp prompt) has no uint8 form and is refused on such bundles; an overlay band is
clipped to the pixel range on both paths, so it always has one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .bundle import file_records, link_or_copy, load_bundle, sha256_file, staged_bundle, write_manifest
from .errors import PipmmError
from .manifest_visual_prompt import DEFAULT_GEOMETRY, GEOMETRIES, VisualPromptSection, inner_side
from .preprocess import BadPreprocessing, UINT8_NHWC, normalize_config, normalized, rescaled, resized_pixels

PROMPT_WEIGHTS = "visual_prompt.safetensors"
PROMPT_CONFIG = "visual_prompt.json"
PROMPT_FORMAT = "pipmm-visual-prompt"
DELTA = "delta"
MAX_WEIGHT_BYTES = 64 * 1024 * 1024  # a 2048 px prompt is 48 MiB; anything larger is refused before reading
MAX_HEADER_BYTES = 1 << 20
# uint8 bundles: a frame level may sit this far outside [0, 255] (float rounding of a clamped delta / factor)
LEVEL_SLACK = 0.5


class VisualPromptError(PipmmError, ValueError):
    """A visual prompt that cannot be read, or does not fit the bundle it is applied to."""


# -- the prompt ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualPrompt:
    delta: np.ndarray  # float32 [3, S, S], zero inside the frame; added to the [0, 1] pixels before normalising
    frame: int
    image_size: int
    sha256: str = ""
    settings: dict = field(default_factory=dict)
    source: str = ""
    geometry: str = DEFAULT_GEOMETRY  # a key of GEOMETRIES (sdk/manifest_visual_prompt.py)
    # rescale factor -> (rint(delta / factor) [S,S,3] as int16, min and max of delta / factor): computed once per
    # bundle normalisation, not per frame (uint8 bundles; the delta never changes)
    _levels: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise VisualPromptError(f"visual prompt geometry {self.geometry!r} is unknown: use one of "
                                    f"{', '.join(GEOMETRIES)}")

    @property
    def inner_size(self) -> int:
        return inner_side(self.geometry, self.image_size, self.frame)

    @cached_property  # frame and size never change: made once, not per image
    def band(self) -> np.ndarray:
        """bool [S, S]: the border `frame` pixels wide (where delta may be non-zero)."""
        inside = np.zeros((self.image_size, self.image_size), bool)
        inside[self.frame:self.image_size - self.frame, self.frame:self.image_size - self.frame] = True
        return ~inside

    def zeroed(self) -> "VisualPrompt":
        """The same geometry with delta = 0: the frame's cost alone (the zero-frame reference of docs/tvp.md)."""
        return VisualPrompt(np.zeros_like(self.delta), self.frame, self.image_size, settings={"zero_frame_of":
                            self.source}, source=f"zero frame of {self.source or '(in memory)'}", geometry=self.geometry)

    @classmethod
    def load(cls, directory) -> "VisualPrompt":
        """A prompt directory (visual_prompt.json + its weights), the weights' sha256 checked."""
        root = Path(directory)
        config_path = root / PROMPT_CONFIG
        if not config_path.is_file():
            raise VisualPromptError(f"{root} has no {PROMPT_CONFIG}: pass a directory written by 'pipmm tvp train'")
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise VisualPromptError(f"{config_path} is not valid JSON ({err}); train the prompt again") from None
        if not isinstance(config, dict) or config.get("format") != PROMPT_FORMAT:
            raise VisualPromptError(f"{config_path} is not a {PROMPT_FORMAT} file: pass a directory written by "
                                    "'pipmm tvp train'")
        try:  # the same checks as a bundle's section
            section = VisualPromptSection.from_dict({k: config.get(k) for k in
                                                     ("file", "frame", "inner_size", "image_size", "sha256",
                                                      "geometry") if k in config or k != "geometry"},
                                                    str(config_path))
        except PipmmError as err:
            raise VisualPromptError(str(err).split(";")[0] + "; train the prompt again") from None
        weights = root / section.file
        if not weights.is_file() or sha256_file(weights) != section.sha256:
            raise VisualPromptError(f"{weights} is missing or does not match the sha256 in {config_path}: copy "
                                    "the prompt directory again")
        settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
        return cls.from_file(weights, section.frame, section.image_size, section.sha256, settings,
                             section.geometry)

    @classmethod
    def from_section(cls, bundle_dir, section: VisualPromptSection) -> "VisualPrompt":
        """The prompt a bundle carries (its sha256 was checked with the bundle's files)."""
        return cls.from_file(Path(bundle_dir) / section.file, section.frame, section.image_size, section.sha256,
                             section.settings, section.geometry)

    @classmethod
    def from_file(cls, path: Path, frame: int, image_size: int, sha256: str = "", settings=None,
                  geometry: str = DEFAULT_GEOMETRY) -> "VisualPrompt":
        delta = read_tensor(Path(path), DELTA)
        side = image_size
        if delta.shape != (3, side, side):
            raise VisualPromptError(f"{path}: {DELTA} has shape {list(delta.shape)}, the prompt says [3, {side}, "
                                    f"{side}]; train the prompt again")
        if not np.isfinite(delta).all():
            raise VisualPromptError(f"{path}: {DELTA} holds NaN or infinite values; train the prompt again")
        if np.any(delta[:, frame:side - frame, frame:side - frame]):
            raise VisualPromptError(f"{path}: {DELTA} is not zero inside its {frame}-pixel frame; train the prompt "
                                    "again")
        return cls(delta=delta, frame=frame, image_size=image_size, sha256=sha256, settings=dict(settings or {}),
                   source=str(path), geometry=geometry)

    def section(self, file: str = PROMPT_WEIGHTS) -> VisualPromptSection:
        return VisualPromptSection(file=file, frame=self.frame, inner_size=self.inner_size,
                                   image_size=self.image_size, sha256=self.sha256, geometry=self.geometry,
                                   settings=summary(self.settings))

    # -- applying it -----------------------------------------------------------------------------

    def check_fits(self, preprocessing: dict, where: str = "the bundle") -> None:
        """One line when the bundle's input is not image_size x image_size, or it takes uint8 pixels and the
        frame leaves the pixel range."""
        size = input_size(preprocessing)
        if size != (self.image_size, self.image_size):
            shown = "a variable size (no center crop)" if size is None else f"{size[1]}x{size[0]}"
            raise VisualPromptError(f"visual prompt {self.source or '(in memory)'} is for {self.image_size}x"
                                    f"{self.image_size} input but {where} takes {shown}: use a prompt trained at "
                                    "that size ('pipmm tvp train --source ...' on a model of that input)")
        cfg = normalize_config(preprocessing, BadPreprocessing)
        if cfg.get("pixel_input") == UINT8_NHWC and not GEOMETRIES[self.geometry].clips:
            _, low, high = self._levels_at(_factor(cfg))
            if low < -LEVEL_SLACK or high > 255 + LEVEL_SLACK:
                raise VisualPromptError(f"visual prompt {self.source or '(in memory)'} has frame values from "
                                        f"{self.delta.min():.3g} to {self.delta.max():.3g}, outside the pixel range "
                                        f"that {where}'s uint8 input holds: train it with clamp (no --no-clamp), "
                                        "or use a bundle with float pixel input")

    def inner_config(self, preprocessing: dict) -> dict:
        """The bundle's preprocessing with its resize and crop scaled to the inner side."""
        cfg = normalize_config(preprocessing, BadPreprocessing)

        def scaled(size: dict) -> dict:
            return {k: max(1, round(v * self.inner_size / self.image_size)) for k, v in size.items()}
        return {**cfg, "size": scaled(cfg["size"]), "crop_size": scaled(cfg["crop_size"])}

    def inner_pixels(self, image, preprocessing: dict, max_pixels: int | None = None) -> np.ndarray:
        """The image as the prompt sees it before padding: float32 [inner, inner, 3] in the rescaled range."""
        cfg = self.inner_config(preprocessing)
        return rescaled(resized_pixels(image, cfg, max_pixels), cfg)

    def framed(self, inner: np.ndarray) -> np.ndarray:
        """float32 [inner, inner, 3] -> [S, S, 3] before normalising: zero-padded by the frame (pad), + delta, the
        band clipped to [0, 1] (overlay)."""
        f, geometry = self.frame, GEOMETRIES[self.geometry]
        x = inner.astype(np.float32, copy=False)
        x = (np.pad(x, ((f, f), (f, f), (0, 0))) if geometry.shrinks else x) + self.delta.transpose(1, 2, 0)
        return np.where(self.band[..., None], np.clip(x, 0, 1), x) if geometry.clips else x

    def apply(self, inner: np.ndarray, preprocessing: dict) -> np.ndarray:
        """float32 [inner, inner, 3] -> pixel_values [1, 3, S, S]: framed, normalised."""
        return normalized(self.framed(inner), normalize_config(preprocessing, BadPreprocessing))

    def preprocess(self, image, preprocessing: dict, max_pixels: int | None = None) -> np.ndarray:
        """Any image load_image accepts -> the prompted pixel_values [1, 3, S, S] float32 (the float path)."""
        self.check_fits({k: v for k, v in preprocessing.items() if k != "pixel_input"})
        return self.apply(self.inner_pixels(image, preprocessing, max_pixels), preprocessing)

    def frame_levels(self, preprocessing: dict) -> np.ndarray:
        """The frame as pixel levels [S, S, 3] int16: rint(delta / rescale_factor) within [-255, 255] (pad: [0,
        255]), zero inside the frame."""
        return self._levels_at(_factor(normalize_config(preprocessing, BadPreprocessing)))[0]

    def _levels_at(self, factor: float) -> tuple[np.ndarray, float, float]:
        if factor not in self._levels:
            levels = self.delta.transpose(1, 2, 0).astype(np.float64) / factor
            # pad: clipping only within LEVEL_SLACK (check_fits); overlay: the sum is clipped to [0, 255] anyway
            low = 0 if GEOMETRIES[self.geometry].shrinks else -255
            frame = np.clip(np.rint(levels), low, 255).astype(np.int16)
            frame.flags.writeable = False
            self._levels[factor] = (frame, float(levels.min()), float(levels.max()))
        return self._levels[factor]

    def pixel_input(self, image, preprocessing: dict, max_pixels: int | None = None) -> np.ndarray:
        """What the bundle's vision graph takes, framed (sdk.preprocess.pixel_input's twin): float32 [1, 3, S, S]
        from preprocess(), or uint8 [1, S, S, 3] where the graph normalises (pixel_input "uint8-nhwc"): the
        inner crop's uint8 pixels (zero-padded by the frame: pad) + frame_levels, clipped to [0, 255]."""
        self.check_fits(preprocessing)
        cfg = normalize_config(preprocessing, BadPreprocessing)
        if cfg.get("pixel_input") != UINT8_NHWC:
            return self.apply(self.inner_pixels(image, cfg, max_pixels), cfg)
        f = self.frame
        inner = resized_pixels(image, self.inner_config(cfg), max_pixels)  # uint8 [inner, inner, 3]
        placed = np.pad(inner, ((f, f), (f, f), (0, 0))) if GEOMETRIES[self.geometry].shrinks else inner
        return np.clip(placed.astype(np.int16) + self.frame_levels(cfg), 0, 255).astype(np.uint8)[None]

    def model_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """The image-coordinate box of the whole S x S input, from the box the inner image fills."""
        if not GEOMETRIES[self.geometry].shrinks:
            return box
        x0, y0, x1, y1 = box
        grow_x, grow_y = (x1 - x0) * self.frame / self.inner_size, (y1 - y0) * self.frame / self.inner_size
        return x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y


def _factor(cfg: dict) -> float:
    """What one uint8 level is in the rescaled range (the bundle's rescale_factor; 1 when it does not rescale)."""
    return float(cfg["rescale_factor"]) if cfg["do_rescale"] else 1.0


def input_size(preprocessing: dict) -> tuple[int, int] | None:
    """(height, width) of the bundle's pixel_values, or None when it depends on the image."""
    cfg = normalize_config(preprocessing, BadPreprocessing)
    if cfg["do_center_crop"]:
        return cfg["crop_size"]["height"], cfg["crop_size"]["width"]
    if cfg["do_resize"] and "height" in cfg["size"]:
        return cfg["size"]["height"], cfg["size"]["width"]
    return None


def summary(settings: dict, limit: int = 4096) -> dict:
    """The training settings the manifest keeps: scalars and short lists of every key, up to `limit` bytes."""
    kept = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            value = summary(value, limit // 4)
        if len(json.dumps({**kept, key: value})) <= limit:
            kept[key] = value
    return kept


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int) -> VisualPrompt:
    return VisualPrompt.load(path)


def resolve(choice, attached: VisualPrompt | None = None) -> VisualPrompt | None:
    """What a request's `visual_prompt=` means: None -> the attached one; False -> none; a VisualPrompt; or a
    prompt directory (read once while it is unchanged)."""
    if choice is None:
        return attached
    if choice is False:
        return None
    if isinstance(choice, VisualPrompt):
        return choice
    if isinstance(choice, (str, os.PathLike)):
        config = Path(choice) / PROMPT_CONFIG
        stat = config.stat() if config.is_file() else None
        return _cached(str(Path(choice).resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    raise VisualPromptError(f"visual_prompt must be a prompt directory, a VisualPrompt, None or False, not "
                            f"{type(choice).__name__}")


# -- safetensors, read with numpy ------------------------------------------------------------------


def read_tensor(path: Path, name: str) -> np.ndarray:
    """Tensor `name` (float32) of a safetensors file, as a numpy array; nothing is unpickled."""
    if not path.is_file():
        raise VisualPromptError(f"visual prompt weights {path} not found: copy the prompt directory again")
    size = path.stat().st_size
    if size > MAX_WEIGHT_BYTES:
        raise VisualPromptError(f"{path} has {size} bytes, above the limit of {MAX_WEIGHT_BYTES}: not a visual prompt")
    data = path.read_bytes()
    bad = VisualPromptError(f"{path} is not a safetensors file holding a float32 {name!r}: train the prompt again")
    if len(data) < 8:
        raise bad
    length = int.from_bytes(data[:8], "little")
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise bad
    try:
        entry = json.loads(data[8:8 + length]).get(name)
        shape, (begin, end) = [int(v) for v in entry["shape"]], entry["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if entry["dtype"] != "F32" or not 0 <= begin <= end or end - begin != 4 * count or 8 + length + end > len(data):
            raise bad
    except (ValueError, TypeError, KeyError, AttributeError):
        raise bad from None
    return np.frombuffer(data, dtype="<f4", count=count, offset=8 + length + begin).reshape(shape).astype(np.float32)


# -- attaching to a bundle -------------------------------------------------------------------------


def attach(bundle_dir, prompt_dir, out_dir=None, overwrite: bool = False) -> Path:
    """Add the prompt of `prompt_dir` to a bundle (in place, or as a new bundle `out_dir`) -> the bundle path.
    Refused when the bundle's input size is not the prompt's, or it already carries one (unless overwrite)."""
    bundle = load_bundle(bundle_dir, verify=True)
    prompt = VisualPrompt.load(prompt_dir)
    prompt.check_fits(bundle.manifest.image_preprocessing, f"bundle {bundle_dir}")
    if bundle.manifest.visual_prompt is not None and not overwrite:
        raise VisualPromptError(f"bundle {bundle_dir} already carries a visual prompt: pass --overwrite, or "
                                "'pipmm prompt detach' it first")
    known = {k: v for k, v in bundle.manifest.files.items() if k != PROMPT_WEIGHTS}
    manifest = replace(bundle.manifest, visual_prompt=prompt.section())
    source = Path(prompt.source)
    if out_dir is not None:
        return _copy_bundle(bundle, out_dir, overwrite, manifest, known, add=source)
    target = bundle.path / PROMPT_WEIGHTS
    tmp = bundle.path / f".{PROMPT_WEIGHTS}.tmp"
    shutil.copyfile(source, tmp)
    if sha256_file(tmp) != prompt.sha256:  # a copy that changed under us is never published
        tmp.unlink()
        raise VisualPromptError(f"the copy of {source} does not match its sha256: copy the prompt directory again")
    os.replace(tmp, target)  # the file first, then the manifest that names it
    write_manifest(bundle.path, replace(manifest, files=file_records(bundle.path, known)))
    return bundle.path


def detach(bundle_dir, out_dir=None, overwrite: bool = False) -> Path:
    """Remove a bundle's visual prompt (in place, or as a new bundle `out_dir`) -> the bundle path."""
    bundle = load_bundle(bundle_dir, verify=False)
    section = bundle.manifest.visual_prompt
    if section is None:
        raise VisualPromptError(f"bundle {bundle_dir} carries no visual prompt: nothing to detach")
    known = {k: v for k, v in bundle.manifest.files.items() if k != section.file}
    manifest = replace(bundle.manifest, visual_prompt=None, files=known)
    if out_dir is not None:
        return _copy_bundle(bundle, out_dir, overwrite, manifest, known, skip=section.file)
    write_manifest(bundle.path, manifest)  # the manifest first: a reader never sees it name a missing file
    (bundle.path / section.file).unlink(missing_ok=True)
    return bundle.path


def _copy_bundle(bundle, out_dir, overwrite: bool, manifest, known: dict, add: Path | None = None,
                 skip: str | None = None) -> Path:
    """A new bundle at out_dir: the files of `bundle` (hard-linked where possible) + `add`, through the stage."""
    if Path(out_dir).resolve() == bundle.path.resolve():
        raise VisualPromptError("--out is the bundle itself: leave --out out to change it in place")
    with staged_bundle(out_dir, overwrite) as stage:
        for name in bundle.manifest.files:
            if name not in (skip, PROMPT_WEIGHTS if add is not None else None):
                link_or_copy(bundle.path / name, stage.directory / name)
        if add is not None:
            shutil.copyfile(add, stage.directory / PROMPT_WEIGHTS)
            if sha256_file(stage.directory / PROMPT_WEIGHTS) != manifest.visual_prompt.sha256:  # never published
                raise VisualPromptError(f"the copy of {add} does not match its sha256: copy the prompt directory again")
        stage.publish(manifest, known)
    return Path(out_dir)
