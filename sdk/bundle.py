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

from .errors import BundleError, PipmmError
from .version import __version__

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


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_shapes(manifest: dict, manifest_path: Path) -> None:
    """The manifest fields the device side reads have the types it expects, so a damaged manifest
    (valid JSON, wrong content) fails here with a BundleError, not later with a KeyError."""
    from .generation import GenerationArgs
    from .preprocess import _BadManifest, _normalize

    def bad(what: str):
        return BundleError(f"{manifest_path}: {what}; the manifest is damaged: copy the bundle again or re-export it")

    def each_dict(value, what: str) -> dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
            raise bad(f"'{what}' must map names to objects")
        return value

    for name, graph in each_dict(manifest["graphs"], "graphs").items():
        ios = [graph.get("inputs"), graph.get("outputs")]
        if not isinstance(graph.get("file"), str) or not all(
                isinstance(io, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in io)
                for io in ios):
            raise bad(f"graph {name!r} needs a 'file' and 'inputs'/'outputs' lists of named entries")
    for name, info in each_dict(manifest["files"], "files").items():
        if not isinstance(info.get("sha256"), str) or not _is_int(info.get("bytes")):
            raise bad(f"file {name!r} needs a 'sha256' string and a 'bytes' count")
    if not isinstance(manifest["tokenizer"], str):
        raise bad("'tokenizer' must be a file name")
    model = manifest["model"]
    if not isinstance(model, dict) or not all(_is_int(model.get(k), 1) for k in
                                              ("num_layers", "num_kv_heads", "head_dim", "max_context")):
        raise bad("'model' needs positive integers num_layers, num_kv_heads, head_dim, max_context")
    special = manifest["special_tokens"]
    if (not isinstance(special, dict) or not _is_int(special.get("image"))
            or not (isinstance(special.get("eos"), list) and all(_is_int(e) for e in special["eos"]))
            or not all(special.get(k) is None or _is_int(special[k]) for k in ("bos", "pad"))
            or not all(isinstance(t, str) and t for t in special.get("texts", []))):
        raise bad("'special_tokens' needs integer ids image, eos (a list), bos/pad (or null) and texts (strings)")
    template = manifest["chat_template"]
    if not isinstance(template, dict) or not all(isinstance(template.get(k), str) and "{prompt}" in template[k]
                                                 for k in ("prompt", "prompt_encoder")):
        raise bad("'chat_template' needs 'prompt' and 'prompt_encoder' strings holding {prompt}")
    visual = manifest["visual_tokens"]
    if not isinstance(visual, dict) or not _is_int(visual.get("count"), 1):
        raise bad("'visual_tokens' needs a positive integer 'count'")
    # The count must be what the vision graph returns (when its manifest shape says so).
    for output in manifest["graphs"].get("vision", {}).get("outputs", []):
        shape = output.get("shape")
        if output["name"] == "visual_tokens" and isinstance(shape, list) and len(shape) == 3 and _is_int(shape[1]):
            if shape[1] != visual["count"]:
                raise bad(f"visual_tokens count {visual['count']} differs from the vision graph's {shape[1]} tokens")
    if manifest["prompt_vector"] is not None and not isinstance(manifest["prompt_vector"], dict):
        raise bad("'prompt_vector' must be an object or null")
    _normalize(manifest["image_preprocessing"], _BadManifest)
    generation = manifest["generation"]
    if not isinstance(generation, dict):
        raise bad("'generation' must be an object")
    try:
        GenerationArgs.checked(generation.get("max_new_tokens"), generation.get("temperature"),
                               generation.get("top_p"), None, model["max_context"])
    except PipmmError as err:
        raise bad(f"generation defaults: {err}") from None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle directory. `verify` checks every file's sha256 (recommended after a copy)."""
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
    _check_shapes(manifest, manifest_path)
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
