"""pipmm-edge device-side SDK: load a bundle, describe an image. Never imports torch."""

from __future__ import annotations

from .errors import PipmmError
from .regions import Box, Mask, Point, Scribble
from .version import __version__

_default_pipeline = None


def load(bundle=None, backend: str = "auto", device: str = "auto", visual_prompt=None):
    """Load a bundle directory (None: the embedded default model) and return a Pipeline.
    visual_prompt: a TVP prompt directory to frame every image with instead of the bundle's own, False for none
    (docs/tvp.md)."""
    from .pipeline import Pipeline

    return Pipeline.load(bundle, backend=backend, device=device, visual_prompt=visual_prompt)


def describe(image, prompt: str = "Describe the image.", **kwargs) -> str:
    """Describe `image` with the embedded default model (loaded once, then cached); kwargs as
    Pipeline.generate's (e.g. visual_prompt="my_prompt/")."""
    global _default_pipeline
    if _default_pipeline is None:
        _default_pipeline = load()
    return _default_pipeline.describe(image, prompt, **kwargs)


__all__ = ["load", "describe", "PipmmError", "Box", "Point", "Scribble", "Mask", "__version__"]
