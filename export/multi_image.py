"""Multi-image bundles: the manifest's multi_image section and the adapter graph (docs/multi-image.md).

    pipmm add-graphs BUNDLE --adapter ADAPTER_DIR [--n-max 8]        qformer/mivpg: + adapter.onnx and the section
    pipmm add-graphs BUNDLE --multi-image concat --n-max 4           concat: the section only (no graph)

The adapter (export/model/mivpg.py, trained by `pipmm train --stage mv`) is traced at fixed shapes for this
bundle: frame_tokens [1, N_max, K, D_llm] with K the bundle's visual-token count, so one adapter serves bundles
of any budget of its LLM. The bundle's other files are not touched; the manifest is rewritten last.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from sdk.bundle import file_records, load_bundle, write_manifest
from sdk.errors import ExportError
from sdk.manifest_multi import DEFAULT_N_MAX, DEFAULT_SEPARATOR, MultiImage

from export import onnx_graphs
from export.model.mivpg import FrameAdapter, parameter_count
from export.writer import graph_entry

ADAPTER_GRAPH = "adapter"


def multi_image_section(adapter: FrameAdapter | None = None, n_max: int | None = None,
                        separator: str = DEFAULT_SEPARATOR, single_frame: str = "adapter") -> MultiImage:
    """concat (adapter None) or the adapter's mode, with its recorded settings; n_max None: the adapter's
    max_frames (concat: DEFAULT_N_MAX); single_frame: sdk/manifest_multi.py SINGLE_FRAME."""
    if n_max is not None and n_max < 1:
        raise ExportError(f"--n-max {n_max}: a bundle takes at least one frame")
    if adapter is None:
        return MultiImage(mode="concat", n_max=n_max or DEFAULT_N_MAX, separator=separator)
    config = adapter.config
    n = n_max or config.max_frames
    if config.bounds_frames and n > config.max_frames:  # order vectors or per-frame-count shortcut tables
        raise ExportError(f"--n-max {n}: the adapter has frame-order vectors / shortcut tables for "
                          f"{config.max_frames} frames")
    settings = {**config.settings(), "d_model": config.d_model, "parameters": parameter_count(adapter),
                "instances": "the vision graph's visual tokens of every frame (patch tokens; the T-CLS output "
                             "is not an instance)"}
    return MultiImage(mode=config.mode, n_max=n, tokens=config.queries, separator=separator, graph=ADAPTER_GRAPH,
                      settings=settings, single_frame=single_frame)


def _publish(bundle_dir: Path, manifest, moved: list[Path], **changes) -> Path:
    fresh = {p.name for p in moved}
    known = {k: v for k, v in manifest.files.items() if k not in fresh}
    write_manifest(bundle_dir, replace(manifest, files=file_records(bundle_dir, known), **changes))
    return bundle_dir


def attach_adapter(bundle_dir, adapter, n_max: int | None = None, overwrite: bool = False,
                   separator: str = DEFAULT_SEPARATOR, single_frame: str = "adapter") -> Path:
    """Trace `adapter` (a FrameAdapter or its folder) for the bundle's shapes and add it with its section."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=True)
    manifest = bundle.manifest
    if ADAPTER_GRAPH in manifest.graphs and not overwrite:
        raise ExportError(f"bundle {bundle_dir} already has an adapter: pass --overwrite to replace it")
    adapter = adapter if isinstance(adapter, FrameAdapter) else FrameAdapter.load(adapter)
    if adapter.config.d_in != manifest.model.hidden_size:
        raise ExportError(f"the adapter takes {adapter.config.d_in}-wide tokens but this bundle's LLM is "
                          f"{manifest.model.hidden_size} wide: it was trained for another model")
    if adapter.config.needs_positions and adapter.config.num_patches != manifest.vision.num_patches:
        raise ExportError(f"the adapter reads patch positions of a {adapter.config.num_patches}-patch frame but this "
                          f"bundle's vision has {manifest.vision.num_patches} patches: it was trained for another model")
    section = multi_image_section(adapter.float().eval(), n_max, separator, single_frame)
    moved = []
    with tempfile.TemporaryDirectory(prefix=f".{bundle_dir.name}.adapter-", dir=bundle_dir.parent) as scratch:
        path = Path(scratch) / f"{ADAPTER_GRAPH}.onnx"
        onnx_graphs.export_adapter(adapter, path, section.n_max, manifest.visual_tokens.count)
        for src in (path, Path(f"{path}.data")):
            dst = bundle_dir / src.name
            dst.unlink(missing_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))
                moved.append(dst)
    graphs = {**manifest.graphs, ADAPTER_GRAPH: graph_entry(bundle_dir / path.name, **{"for": "multi-image frames"})}
    precision = replace(manifest.precision, graphs={**manifest.precision.graphs, ADAPTER_GRAPH: "fp32"})
    return _publish(bundle_dir, manifest, moved, graphs=graphs, precision=precision, multi_image=section)


def set_concat(bundle_dir, n_max: int | None = None, separator: str = DEFAULT_SEPARATOR) -> Path:
    """Record concat with `n_max` frames in the bundle's manifest (an adapter graph, if any, stays unused)."""
    bundle_dir = Path(bundle_dir)
    manifest = load_bundle(bundle_dir, verify=True).manifest
    return _publish(bundle_dir, manifest, [], multi_image=multi_image_section(None, n_max, separator))
