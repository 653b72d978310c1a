"""Helpers that several test files use (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_pipmm(*args, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`pipmm ARGS` in a subprocess from the repository root, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "sdk.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def edit_manifest(bundle_dir: Path, change) -> None:
    """change(manifest) on bundle_dir/manifest.json, written back; the file records are not updated."""
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """n random uint8 frames of different sizes (each preprocessed as its own image)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8) for i in range(n)]


TINY_ADAPTER = dict(d_model=32, queries=6, frame_queries=4, csa_points=3)  # R = 6 tokens, for the tiny checkpoints


def adapter_bundle(source: Path, out: Path, mode: str = "mivpg", n_max: int = 4, seed: int = 0, d_in: int = 64,
                   **settings):
    """-> (out, the module): a copy of bundle `source` at `out` with a random tiny `mode` adapter (TINY_ADAPTER,
    order vectors for n_max frames, `settings` on top) attached for n_max frames (export.multi_image)."""
    import shutil

    from export.model.mivpg import random_adapter
    from export.multi_image import attach_adapter

    shutil.copytree(source, out)
    module = random_adapter(mode, d_in, seed=seed, **{**TINY_ADAPTER, "max_frames": n_max, **settings})
    attach_adapter(out, module, n_max=n_max)
    return Path(out), module


def assert_energy_grad_matches_autograd(got_energy, got_grad, energy_of, embeds: np.ndarray) -> None:
    """An energy_grad run (energy, dE/d inputs_embeds) against torch autograd of energy_of(x) at x = embeds: the
    energy within 1e-5 relative, the gradient within 1e-4 of its largest magnitude (docs/referring.md)."""
    import torch

    x = torch.tensor(embeds, requires_grad=True)
    want = energy_of(x)
    want.backward()
    want = float(want.detach())
    assert want > 0.01 and abs(float(got_energy) - want) <= 1e-5 * want
    scale = float(x.grad.abs().max())
    assert scale > 0 and np.abs(got_grad - x.grad.numpy()).max() <= 1e-4 * scale
