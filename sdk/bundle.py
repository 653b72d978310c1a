"""The bundle: the only thing that crosses from the workstation to the device.

A directory with manifest.json, tokenizer.json and the .onnx graphs (+ external data). The
manifest is the truth: graph names, files, input/output names, dtypes, shapes, sha256 of every
file, precision, visual-token budget and reducer, prompt-vector layer, image preprocessing,
chat template, special token ids and generation defaults. Loading checks all of it before
any graph is opened; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError

FORMAT = "pipmm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_GRAPHS = ("vision", "embed", "decoder")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def default_bundle_path() -> Path:
    return Path(__file__).resolve().parent / "default_bundle"


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def graphs(self) -> dict:
        return self.manifest["graphs"]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graphs[name]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]

    @property
    def pipmm(self) -> bool:
        return self.manifest["prompt_vector"] is not None

    @property
    def content_hash(self) -> str:
        """One hash for the whole bundle (engine cache keys use it)."""
        files = self.manifest["files"]
        return hashlib.sha256("".join(f"{k}:{files[k]['sha256']}" for k in sorted(files)).encode()).hexdigest()


def _inside(root: Path, relative: str) -> Path:
    """Resolve `relative` under `root`, refusing anything that escapes it (../, absolute paths, links out)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise BundleError(f"manifest names {relative!r}, which lies outside the bundle: the bundle is damaged "
                          "or hostile; re-export it")
    return candidate


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle directory. `verify` checks every file's sha256 (recommended after a copy)."""
    from . import __version__

    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle directory {root} does not exist: pass the folder 'pipmm export' wrote")
    if not root.is_dir():
        raise BundleError(f"{root} is a file, not a bundle directory: pass the folder that holds {MANIFEST}")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: it is not a pipmm bundle (re-export with 'pipmm export')")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err}): the bundle is damaged; copy it again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a {FORMAT} manifest: re-export with 'pipmm export'")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(f"bundle format version {version!r} is not supported by this SDK (reads up to "
                          f"{FORMAT_VERSION}): upgrade pipmm-edge or re-export the bundle")
    needed = manifest.get("min_sdk_version", "0")
    if _version_tuple(needed) > _version_tuple(__version__):
        raise BundleError(f"bundle needs pipmm-edge >= {needed} (this is {__version__}): upgrade pipmm-edge")
    for key in ("graphs", "files", "tokenizer", "special_tokens", "chat_template", "image_preprocessing",
                "visual_tokens", "model", "generation", "prompt_vector"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks '{key}': the bundle is incomplete; re-export it")
    missing_graphs = [g for g in REQUIRED_GRAPHS if g not in manifest["graphs"]]
    if missing_graphs:
        raise BundleError(f"bundle lacks graph(s) {', '.join(missing_graphs)}: re-export it")

    files = manifest["files"]
    referenced = [manifest["tokenizer"]] + [g["file"] for g in manifest["graphs"].values()]
    for name in referenced:
        if name not in files:
            raise BundleError(f"{name} is used but not listed with a sha256 in the manifest: re-export the bundle")
    for name, info in files.items():
        file_path = _inside(root, name)
        if not file_path.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}: copy the bundle again")
        if file_path.stat().st_size != info.get("bytes", file_path.stat().st_size):
            raise BundleError(f"bundle file {name} has {file_path.stat().st_size} bytes, the manifest says "
                              f"{info['bytes']}: it is truncated or altered; copy the bundle again")
        if verify and sha256_file(file_path) != info.get("sha256"):
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: it is damaged or "
                              "tampered with; copy the bundle again")
    return Bundle(path=root, manifest=manifest)
