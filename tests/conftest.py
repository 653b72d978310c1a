"""Shared fixtures: tiny random LLaVA checkpoints and the bundles exported from them, built once per session."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the workstation side; CI installs the [export] extra

from export.writer import export_bundle  # noqa: E402
from export.synthetic import TEXT_ARCHS, build_random_prompt_mlp, build_tiny_llava  # noqa: E402
import sdk  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_tiny_llava(root / arch, arch=arch, seed=i) for i, arch in enumerate(TEXT_ARCHS)}


@pytest.fixture(scope="session")
def prompt_mlp(checkpoints, tmp_path_factory):
    return build_random_prompt_mlp(checkpoints["llama"], tmp_path_factory.mktemp("mlp"), seed=1)


class BundleFactory:
    """Exports each distinct (arch, options) bundle once per session."""

    def __init__(self, checkpoints, prompt_mlp, root):
        self.checkpoints, self.prompt_mlp, self.root, self.cache = checkpoints, prompt_mlp, root, {}

    def __call__(self, arch="llama", pipmm=False, budget="full", reducer="pool", positions=None):
        key = (arch, pipmm, str(budget), reducer) + ((positions,) if positions else ())
        if key not in self.cache:
            out = self.root / "-".join(map(str, key))
            self.cache[key] = export_bundle(self.checkpoints[arch], out, prompt_mlp=self.prompt_mlp if pipmm else None,
                                            no_prompt_mlp=not pipmm, budget=budget, reducer=reducer, progress=False,
                                            visual_positions=positions)
        return self.cache[key]


@pytest.fixture(scope="session")
def bundles(checkpoints, prompt_mlp, tmp_path_factory):
    return BundleFactory(checkpoints, prompt_mlp, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def pipe(bundles):
    """PIP-MM at half budget: the prompt encoder, the prompt-aware reducer and the decoder all run.
    One per test module, so a module's stress (threads, fuzzing, bad requests) stays its own."""
    return sdk.load(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk"), device="cpu")


@pytest.fixture(scope="session")
def image():
    # An odd-sized photo-like array: smooth gradients plus noise, so resize and crop matter.
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:45, 0:61]
    base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1)
    return np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def chat_bundles(tmp_path_factory):
    """case name of tests/chat_checkpoints.py CASES -> (checkpoint, plain bundle), each built and exported once."""
    from chat_checkpoints import CASES, checkpoint

    cache = {}

    def make(case):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            path = checkpoint(root / "ckpt", *CASES[case])
            cache[case] = path, export_bundle(path, root / "bundle", no_prompt_mlp=True, progress=False)
        return cache[case]
    return make



@pytest.fixture(scope="session")
def referring_bundle(bundles, checkpoints, tmp_path_factory):
    """The PIP-MM prompt-topk bundle at patch positions (the default model's layout) with energy_grad added
    (pipmm add-graphs --controlmllm: the decoder's weights moved to decoder.onnx.data and shared)."""
    import shutil

    from export.extra_graphs import add_graphs

    out = tmp_path_factory.mktemp("referring") / "bundle"
    shutil.copytree(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk", positions="patch"), out)
    add_graphs(out, checkpoints["llama"], ("energy_grad",))
    return out
