"""Damaged bundles and unsupported checkpoints (issue 6), the cases tests/test_bundle.py does not
already cover: each is refused with a typed one-line error, and a Pipeline loaded before keeps
answering with the same tokens. Nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import sdk
from helpers import edit_manifest
from sdk.bundle import sha256_file
from sdk.errors import BundleError, ExportError
from sdk.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "what is in the picture?"


@pytest.fixture(scope="module")
def intact(bundles):
    return bundles("llama")  # plain LLaVA, full budget: four small files


@pytest.fixture(scope="module")
def served(intact, image):
    """A Pipeline loaded before any damage, and its answer."""
    pipe = sdk.load(intact, device="cpu")
    return pipe, pipe.generate(image, PROMPT, max_new_tokens=6).token_ids


@pytest.fixture(scope="module")
def external(intact, tmp_path_factory):
    """The same bundle with every graph's weights in an external-data side file (as above 2 GB)."""
    import onnx

    root = tmp_path_factory.mktemp("external") / "bundle"
    shutil.copytree(intact, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        path = root / graph["file"]
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{graph['file']}.data", size_threshold=1024)
        for name in (graph["file"], f"{graph['file']}.data"):
            manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _rehash(path: Path, name: str) -> None:
    """Make the manifest agree with a file we changed, as a careless re-packer would."""
    edit_manifest(path, lambda m: m["files"].__setitem__(name, {"sha256": sha256_file(path / name),
                                                          "bytes": (path / name).stat().st_size}))


def _set(keys: str, value):
    def change(m):
        *parents, last = keys.split(".")
        for key in parents:
            m = m[key]
        m[last] = value
    return lambda path: edit_manifest(path, change)


def _truncate(name: str, keep: float = 0.5, rehash: bool = False):
    def damage(path: Path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: int(len(data) * keep)])
        if rehash:
            _rehash(path, name)
    return damage


def _garbage(name: str):
    def damage(path: Path):
        size = (path / name).stat().st_size
        (path / name).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return damage


def _swap_graph(path: Path):
    shutil.copy(path / "vision.onnx", path / "embed.onnx")
    _rehash(path, "embed.onnx")


def _symlink_out(path: Path):
    outside = path.parent / "elsewhere.onnx"
    shutil.move(path / "vision.onnx", outside)
    (path / "vision.onnx").symlink_to(outside)


def _not_a_dir(path: Path):
    shutil.rmtree(path)
    path.write_text("a file")


def _unlisted_graph(path: Path):
    edit_manifest(path, lambda m: m["graphs"]["embed"].update(file="embed2.onnx"))


# case: (source "intact"/"external", damage(path), verify, words in the message)
CASES = {
    "path is a file": ("intact", _not_a_dir, True, ("is a file",)),
    "no manifest.json": ("intact", lambda p: (p / "manifest.json").unlink(), True, ("no manifest.json",)),
    "manifest is a JSON list": ("intact", lambda p: (p / "manifest.json").write_text("[1, 2]"), True, ("not a",)),
    "manifest not utf-8": ("intact", lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe{"), True, ("not valid JSON",)),
    "another format": ("intact", _set("format", "onnx-bundle"), True, ("pipmm-bundle",)),
    "format version 0": ("intact", _set("format_version", 0), True, ("format version",)),
    "format version as a string": ("intact", _set("format_version", "1"), True, ("format version",)),
    "manifest lacks model": ("intact", lambda p: edit_manifest(p, lambda m: m.pop("model")), True, ("lacks 'model'",)),
    "tokenizer missing": ("intact", lambda p: (p / "tokenizer.json").unlink(), True, ("tokenizer.json", "missing")),
    "tokenizer garbage, verify off": ("intact", _garbage("tokenizer.json"), False, ("tokenizer",)),
    "graph garbage, verify off": ("intact", _garbage("decoder.onnx"), False, ("decoder", "cannot be loaded")),
    "graph truncated, manifest re-hashed": ("intact", _truncate("vision.onnx", rehash=True), True, ("vision", "cannot be loaded")),
    "graph swapped for another": ("intact", _swap_graph, True, ("embed", "inputs")),
    "graph file not listed": ("intact", _unlisted_graph, True, ("embed2.onnx", "not listed")),
    "absolute path": ("intact", _set("files./etc/passwd", {"sha256": "0", "bytes": 1}), True, ("outside the bundle",)),
    "symlink out of the bundle": ("intact", _symlink_out, True, ("outside the bundle",)),
    "files is a list": ("intact", _set("files", ["vision.onnx"]), True, ("'files'",)),
    "graph without a file": ("intact", lambda p: edit_manifest(p, lambda m: m["graphs"]["vision"].pop("file")), True, ("graph 'vision'",)),
    "max_context a string": ("intact", _set("model.max_context", "512"), True, ("max_context",)),
    "eos not a list": ("intact", _set("special_tokens.eos", 2), True, ("eos",)),
    "template without {prompt}": ("intact", _set("chat_template.prompt", "USER: <image> ASSISTANT:"), True, ("{prompt}",)),
    "template without image": ("intact", _set("chat_template.prompt", "USER: {prompt} ASSISTANT:"), True, ("image placeholder",)),
    "visual token count differs from the graph": ("intact", _set("visual_tokens.count", 7), True, ("count 7", "49")),
    "bad generation default": ("intact", _set("generation.top_p", 2), True, ("generation", "top_p")),
    "bad preprocessing": ("intact", _set("image_preprocessing.crop_size", {"shortest_edge": 5}), True, ("image_preprocessing",)),
    "external data truncated": ("external", _truncate("decoder.onnx.data"), True, ("decoder.onnx.data", "truncated")),
    "external data truncated, verify off": ("external", _truncate("decoder.onnx.data", rehash=True), False,
                                            ("decoder", "cannot be loaded")),
    "external data missing": ("external", lambda p: (p / "vision.onnx.data").unlink(), True, ("vision.onnx.data", "missing")),
    "external data tampered": ("external", _garbage("embed.onnx.data"), True, ("embed.onnx.data", "sha256")),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_bundle_is_refused_with_one_line(request, served, image, tmp_path, case):
    source, damage, verify, words = CASES[case]
    path = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(source), path)
    damage(path)
    with pytest.raises(BundleError) as err:
        Pipeline.load(path, device="cpu", verify=verify)
    message = str(err.value)
    assert "\n" not in message and 15 <= len(message) <= 400, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert re.search(r"re-export|copy|upgrade|pass", message), message  # says what to do
    pipe, reference = served
    assert pipe.generate(image, PROMPT, max_new_tokens=6).token_ids == reference


def test_external_data_bundle_is_intact_before_damage(external, served, image):
    pipe, reference = served
    assert sdk.load(external, device="cpu").generate(image, PROMPT, max_new_tokens=6).token_ids == reference


# -- export: unsupported checkpoints, nothing unpickled ------------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _config(change):
    def edit(ckpt: Path):
        config = json.loads((ckpt / "config.json").read_text())
        change(config)
        (ckpt / "config.json").write_text(json.dumps(config))
    return edit


def _pickle_only(ckpt: Path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(ckpt.parent / "UNPICKLED")))


EXPORT_CASES = {
    "unknown architecture": (_config(lambda c: c.update(model_type="blip-2")), ("'blip-2'", "llava")),
    "encoder-decoder text model": (_config(lambda c: c["text_config"].update(model_type="t5")),
                                   ("'t5'", "decoder-only", "llama")),
    "unknown text model": (_config(lambda c: c["text_config"].update(model_type="foo_lm")), ("'foo_lm'", "decoder-only")),
    "pickle weights only": (_pickle_only, ("safetensors",)),
    "truncated safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00"), ("safetensors",)),
    "config does not match the weights": (_config(lambda c: c["text_config"].update(hidden_size=128)), ("config.json",)),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_unsupported_checkpoint_is_refused(checkpoints, served, image, tmp_path, case):
    from export.writer import export_bundle

    damage, words = EXPORT_CASES[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], ckpt)
    damage(ckpt)
    with pytest.raises(ExportError) as err:
        export_bundle(ckpt, tmp_path / "out", no_prompt_mlp=True, progress=False)
    message = str(err.value)
    assert "\n" not in message and len(message) <= 600, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was loaded"
    pipe, reference = served
    assert pipe.generate(image, PROMPT, max_new_tokens=6).token_ids == reference


def test_no_code_path_unpickles():
    """Static: no pickle, no torch.load without weights_only=True, no np.load(allow_pickle=True)."""
    offenders = []
    for path in [*ROOT.glob("sdk/**/*.py"), *ROOT.glob("runtimes/**/*.py"), *ROOT.glob("export/**/*.py")]:
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{path.name}: imports pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if "allow_pickle=True" in text:
            offenders.append(f"{path.name}: allow_pickle=True")
    assert offenders == []
