"""Progress bars (tqdm where installed, silent without it) and the device choice of the training and eval commands:
`pipmm train`, `pipmm eval`, `pipmm tvp`."""

from __future__ import annotations

import sys

from sdk.errors import PipmmError


def progress(iterable, enabled: bool, total: int | None = None, desc: str = "eval"):
    """`iterable`, wrapped in a tqdm bar when enabled and tqdm is there (redrawn every 30 s off a terminal)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, mininterval=1.0 if sys.stderr.isatty() else 30.0)


class _NullBar:
    total = 0

    def update(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass


def step_bar(start: int, total: int, quiet: bool, desc: str):
    """A tqdm bar from `start` of `total` steps (rarer updates when stderr is no terminal), or a silent one."""
    try:
        from tqdm import tqdm
    except ImportError:
        quiet = True
    if quiet:
        return _NullBar()
    return tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=1.0 if sys.stderr.isatty() else 15.0)


def resolve_device(name: str, error: type[PipmmError] = PipmmError):
    """'auto' -> cuda where torch sees one, else cpu; 'cuda' without one raises `error`."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda but torch sees no CUDA device: use --device cpu")
    return torch.device(name)
