"""Progress bars and device choice shared by the TVP commands."""

from __future__ import annotations

import sys

import torch

from sdk.errors import PipmmError


class _NullBar:
    total = 0

    def update(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass


def progress_bar(start: int, total: int, quiet: bool, desc: str):
    """A tqdm bar from `start` of `total` steps (rarer updates when stderr is no terminal), or a silent one."""
    try:
        from tqdm import tqdm
    except ImportError:
        quiet = True
    if quiet:
        return _NullBar()
    return tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=1.0 if sys.stderr.isatty() else 15.0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipmmError("--device cuda but torch sees no CUDA device: use --device cpu")
    return torch.device(name)
