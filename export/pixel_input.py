"""uint8 pixels into the vision graph: rescale and normalise become its first nodes (issue 18, host work off the
critical path).

    pixel_values uint8 [B,H,W,3] (the resized, cropped RGB crop, sdk.preprocess.pixel_input)
      ─ Cast(float32) ─ Mul(factor / std) ─ Add(-mean / std) ─ Transpose(0,3,1,2) [─ Cast(float16)]
      ─ the graph as it was, on [B,3,H,W]

transformers' float path is float32(float64(x) * factor), then (x - mean) / std in float32; the folded
x * (factor / std) - mean / std in float32 differs by rounding only (a few float32 ulps, under 1e-6 on CLIP's
range: tests/test_pixel_input.py). The manifest's image_preprocessing records pixel_input "uint8-nhwc" (its
factor, mean and std stay there, the graph's constants are made from them), the vision graph's input becomes
uint8 [batch,H,W,3]; bundles without it keep float input. A TVP prompt's frame reaches such a graph rounded to
uint8 levels (sdk/visual_prompt.py; docs/tvp.md measures what that moves); one that has no uint8 form (outside
the pixel range) is refused here and at attach.

    pipmm add-graphs BUNDLE --pixel-input uint8          (no checkpoint needed: the graph is edited, not traced)
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from sdk.bundle import file_records, load_bundle, write_manifest
from sdk.errors import ExportError
from sdk.preprocess import BadPreprocessing, UINT8_NHWC, normalize_config
from sdk.visual_prompt import VisualPrompt

from export.onnx_graphs import save_graph
from export.writer import graph_entry

INPUT = "pixel_values"
NORMALIZED = "pixel_values_normalized"  # the original graph's input, now the front's output


def affine(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (scale, shift) with normalised = pixel * scale + shift, [3] float32 each."""
    factor = cfg["rescale_factor"] if cfg["do_rescale"] else 1.0
    mean = np.asarray(cfg["image_mean"], np.float64) if cfg["do_normalize"] else np.zeros(3)
    std = np.asarray(cfg["image_std"], np.float64) if cfg["do_normalize"] else np.ones(3)
    return (factor / std).astype(np.float32), (-mean / std).astype(np.float32)


def uint8_front(model: onnx.ModelProto, cfg: dict) -> onnx.ModelProto:
    """The vision graph with a uint8 NHWC input in front of its float NCHW one."""
    graph = model.graph
    old = next((i for i in graph.input if i.name == INPUT), None)
    if old is None:
        raise ExportError(f"the vision graph has no {INPUT} input: re-export the bundle")
    if old.type.tensor_type.elem_type == TensorProto.UINT8:
        raise ExportError("the vision graph takes uint8 pixels already")
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]  # [batch, 3, H, W]
    elem = old.type.tensor_type.elem_type
    scale, shift = affine(cfg)
    for node in graph.node:
        node.input[:] = [NORMALIZED if name == INPUT else name for name in node.input]
    graph.initializer.extend([onnx.numpy_helper.from_array(scale.reshape(1, 1, 1, 3), "pixel_input.scale"),
                              onnx.numpy_helper.from_array(shift.reshape(1, 1, 1, 3), "pixel_input.shift")])
    front = [helper.make_node("Cast", [INPUT], ["pixel_input.float"], to=TensorProto.FLOAT, name="pixel_input.cast"),
             helper.make_node("Mul", ["pixel_input.float", "pixel_input.scale"], ["pixel_input.scaled"],
                              name="pixel_input.mul"),
             helper.make_node("Add", ["pixel_input.scaled", "pixel_input.shift"], ["pixel_input.nhwc"],
                              name="pixel_input.add"),
             helper.make_node("Transpose", ["pixel_input.nhwc"], [NORMALIZED if elem == TensorProto.FLOAT
                                                                  else "pixel_input.nchw"], perm=[0, 3, 1, 2],
                              name="pixel_input.transpose")]
    if elem != TensorProto.FLOAT:  # an fp16 graph: normalise in float32, then cast, as the host path did
        front.append(helper.make_node("Cast", ["pixel_input.nchw"], [NORMALIZED], to=elem, name="pixel_input.to"))
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    new_input = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [dims[0], dims[2], dims[3], 3])
    inputs = [new_input if i.name == INPUT else i for i in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def convert_bundle(bundle_dir) -> Path:
    """The bundle's vision graph to uint8 input, in place (graph file first, the manifest last)."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=True)
    manifest = bundle.manifest
    cfg = normalize_config(manifest.image_preprocessing, BadPreprocessing)
    if cfg.get("pixel_input") == UINT8_NHWC:
        raise ExportError(f"bundle {bundle_dir} takes uint8 pixels already")
    preprocessing = {**manifest.image_preprocessing, "pixel_input": UINT8_NHWC}
    if manifest.visual_prompt is not None:  # an attached frame must have a uint8 form (sdk/visual_prompt.py)
        VisualPrompt.from_section(bundle_dir, manifest.visual_prompt).check_fits(preprocessing, f"bundle {bundle_dir}")
    path = bundle.graph_path("vision")
    model = uint8_front(onnx.load(str(path)), cfg)
    onnx.checker.check_model(model)
    with tempfile.TemporaryDirectory(prefix=f".{bundle_dir.name}.pixels-", dir=bundle_dir.parent) as scratch:
        out = Path(scratch) / path.name  # the same name: a graph names its data file
        save_graph(model, out)
        Path(f"{path}.data").unlink(missing_ok=True)
        for src in (out, Path(f"{out}.data")):
            if src.exists():
                shutil.move(str(src), str(path.parent / src.name))
    graphs = {**manifest.graphs, "vision": replace(graph_entry(path), extra=manifest.graphs["vision"].extra)}
    known = {k: v for k, v in manifest.files.items() if k not in (path.name, f"{path.name}.data")}
    write_manifest(bundle_dir, replace(manifest, graphs=graphs, image_preprocessing=preprocessing,
                                       files=file_records(bundle_dir, known)))
    return bundle_dir
