"""The progress bar of `pipmm eval` (export/train/evaluate.py, evaluate_frames.py): tqdm where installed."""

from __future__ import annotations

import sys


def progress(iterable, enabled: bool, total: int | None = None, desc: str = "eval"):
    """`iterable`, wrapped in a tqdm bar when enabled and tqdm is there (redrawn every 30 s off a terminal)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, mininterval=1.0 if sys.stderr.isatty() else 30.0)
