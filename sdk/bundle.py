"""The bundle: the only thing that crosses from the workstation to the device.

A directory with manifest.json (sdk/manifest.py: the typed contract), tokenizer.json and the .onnx
graphs (+ external data). Reading checks all of it before any graph is opened; nothing is ever
unpickled. Writing goes through one staged writer, used by every bundle writer (fp32 export,
quantize, export_direct, add-graphs):

    with staged_bundle(out_dir, overwrite) as stage:     # a temporary sibling directory
        ... write the graphs and the tokenizer into stage.directory ...
        stage.publish(manifest)                          # file records, manifest last, rename into place

Anything raised inside the block removes the temporary directory, so an interrupted writer leaves
no bundle and no debris. add-graphs, which adds files to a bundle in place, rewrites its manifest
with write_manifest (atomic: a reader sees the old manifest or the new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BundleError, ExportError
from .manifest import MANIFEST_FILE, REQUIRED_GRAPHS, FileRecord, Graph, Manifest
from .version import __version__


# A manifest is a few kB; anything far beyond is refused before it is read or parsed.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_MANIFEST_DEPTH = 32  # the real manifest nests 5 levels


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_bundle_path() -> Path:
    return Path(__file__).resolve().parent / "default_bundle"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def graphs(self) -> dict[str, Graph]:
        return self.manifest.graphs

    def graph_path(self, name: str) -> Path:
        return self.path / self.graphs[name].file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer

    @property
    def pipmm(self) -> bool:
        return self.manifest.pipmm

    @property
    def content_hash(self) -> str:
        """One hash for the whole bundle (engine cache keys use it)."""
        files = self.manifest.files
        return hashlib.sha256("".join(f"{k}:{files[k].sha256}" for k in sorted(files)).encode()).hexdigest()


# -- reading -----------------------------------------------------------------------------------------


def inside(root: Path, relative: str) -> Path:
    """Resolve `relative` under `root`, refusing anything that escapes it (../, absolute paths, links out)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise BundleError(f"manifest names {relative!r}, which lies outside the bundle: the bundle is damaged "
                          "or hostile; re-export it")
    return candidate


def read_manifest(root: Path) -> Manifest:
    """The bundle directory's manifest.json, every field checked (Manifest.from_dict)."""
    if not root.exists():
        raise BundleError(f"bundle directory {root} does not exist: pass the folder 'pipmm export' wrote")
    if not root.is_dir():
        raise BundleError(f"{root} is a file, not a bundle directory: pass the folder that holds {MANIFEST_FILE}")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_FILE}: it is not a pipmm bundle (re-export with 'pipmm export')")
    size = manifest_path.stat().st_size
    if size > MAX_MANIFEST_BYTES:  # before reading: a hostile manifest must not cost memory
        raise BundleError(f"{manifest_path} has {size} bytes, above the limit of {MAX_MANIFEST_BYTES} (real manifests "
                          "have a few kB): the bundle is damaged or hostile; re-export it")
    try:
        data = json.loads(manifest_path.read_text())
    except RecursionError:  # json's decoder recurses per nesting level
        raise BundleError(f"{manifest_path} nests deeper than JSON can be read: the bundle is damaged or hostile; "
                          "re-export it") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err}): the bundle is damaged; copy it again") from err
    if (depth := json_depth(data, MAX_MANIFEST_DEPTH)) > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{manifest_path} nests {depth} levels deep, above the limit of {MAX_MANIFEST_DEPTH}: the "
                          "bundle is damaged or hostile; re-export it")
    return Manifest.from_dict(data, str(manifest_path), sdk_version=__version__)


def json_depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion; stops counting past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def verify_files(root: Path, manifest: Manifest, verify: bool = True) -> None:
    """Required graphs present; every file listed, inside the bundle, of its recorded size (and sha256)."""
    missing_graphs = [g for g in REQUIRED_GRAPHS if g not in manifest.graphs]
    if missing_graphs:
        raise BundleError(f"bundle lacks graph(s) {', '.join(missing_graphs)}: re-export it")
    files = manifest.files
    for name in [manifest.tokenizer] + [g.file for g in manifest.graphs.values()]:
        if name not in files:
            raise BundleError(f"{name} is used but not listed with a sha256 in the manifest: re-export the bundle")
    for name, record in files.items():
        file_path = inside(root, name)
        if not file_path.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}: copy the bundle again")
        size = file_path.stat().st_size
        if size != record.bytes:
            raise BundleError(f"bundle file {name} has {size} bytes, the manifest says {record.bytes}: it is "
                              "truncated or altered; copy the bundle again")
        if verify and sha256_file(file_path) != record.sha256:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: it is damaged or "
                              "tampered with; copy the bundle again")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle directory. `verify` checks every file's sha256 (recommended after a copy)."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest, verify)
    return Bundle(path=root, manifest=manifest)


# -- writing -----------------------------------------------------------------------------------------


def file_records(directory: Path, known: dict[str, FileRecord] | None = None) -> dict[str, FileRecord]:
    """The manifest's `files`: sha256 and size of every file but the manifest (and hidden scratch files).
    A file listed in `known` with the same size keeps its recorded hash (it was checked when that
    manifest was loaded, or hard-linked from a checked bundle)."""
    known = known or {}
    records = {}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name == MANIFEST_FILE or p.name.startswith("."):
            continue
        size, entry = p.stat().st_size, known.get(p.name)
        records[p.name] = entry if entry is not None and entry.bytes == size else FileRecord(sha256_file(p), size)
    return records


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """manifest.json, atomically: a reader sees the old manifest or the new one."""
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists: pass --overwrite or choose another --out")


@dataclass
class StagedBundle:
    directory: Path  # the temporary sibling being written
    out_dir: Path
    published: bool = False

    def publish(self, manifest: Manifest, known: dict[str, FileRecord] | None = None) -> Manifest:
        """Record every file, write the manifest last, rename the finished directory into place."""
        manifest = replace(manifest, files=file_records(self.directory, known))
        write_manifest(self.directory, manifest)
        self.directory.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.directory.rename(self.out_dir)
        self.published = True
        return manifest


@contextmanager
def staged_bundle(out_dir: str | Path, overwrite: bool = False) -> Iterator[StagedBundle]:
    """A temporary sibling of `out_dir` to write a bundle into; removed unless published (see the module)."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = StagedBundle(Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent)), out_dir)
    try:
        yield stage
    finally:
        if not stage.published:
            shutil.rmtree(stage.directory, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (bundles share unchanged weight files), a copy where links are refused."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
