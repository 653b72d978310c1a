"""energy_grad stitched in ONNX from pieces traced once (export/model/energy_pieces.py): export cost linear in depth.

    inputs_embeds, position_ids --prelude--> cos, sin, bias
    h_0 = inputs_embeds; for l < L_g: forward nodes of layer l's piece: h_{l+1}, rel_l   (+ the values its backward reads)
    r = sum_l layer_weights[l] * rel_l --head--> energy, g_r
    for l = L_g-1 .. 0: g_rel_l = layer_weights[l] * g_r; backward nodes of layer l: g_{h_l} from (g_{h_{l+1}}, g_rel_l)
    grad_inputs_embeds = g_{h_0}

A layer piece is one joint ONNX graph (forward and VJP); its forward is the set of nodes that do not depend on the
cotangent inputs, its backward the rest (any split of a DAG along that line is valid: the backward's reads of the
forward become this layer's saved values). Every middle layer reuses one piece with its own weights; the last
layer the energy reads has its own (attention scores only). Values are renamed per instance (`l{i}/...`), piece
constants are stored once per piece, weights once per layer in the decoder's layout.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import onnx
import torch
from onnx import TensorProto, helper

from export.model.energy import EnergyGradGraph
from export.model.energy_pieces import EnergyPieces, Prelude, layer_weight_names, trace_joint

OPSET = 18
SEQ = "sequence"
_TORCH_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}
PIECE_INPUTS = ["h", "cos", "sin", "bias", "queries"]
# per piece input: its dynamic (sequence) dims
_SEQ_DIMS = {"h": (1,), "cos": (1,), "sin": (1,), "bias": (3, 4), "queries": (0,), "g_out": (1,), "g_rel": (0,)}


@dataclass
class Piece:
    """One exported piece: its nodes split into forward and backward, and its constants."""
    name: str
    forward: list = field(default_factory=list)
    backward: list = field(default_factory=list)
    constants: list = field(default_factory=list)


def _export_proto(module, args, input_names, output_names, dynamic) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of one small piece, its local functions inlined."""
    seq = torch.export.Dim(SEQ, min=2, max=1 << 16)
    shapes = tuple({d: seq for d in dims} if dims else None for dims in dynamic)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=shapes, verbose=False)
    model = program.model_proto
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    _single_assignment(model.graph)
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"energy_grad piece has a subgraph op {node.op_type}: cannot stitch it")
    return model


def _single_assignment(graph: onnx.GraphProto) -> None:
    """Renames all but the last definition of a value defined twice: the exporter names an output after the
    value it casts (half precision: Cast(cos) -> cos), which the checker refuses once the piece is inlined."""
    defs = Counter(o for node in graph.node for o in node.output if o)
    seen, current = Counter(), {}
    for node in graph.node:
        for slot, value in enumerate(node.input):
            node.input[slot] = current.get(value, value)
        for slot, value in enumerate(node.output):
            if defs[value] > 1:
                seen[value] += 1
                if seen[value] < defs[value]:
                    node.output[slot] = current[value] = f"{value}__def{seen[value]}"
                else:
                    current.pop(value, None)


def _split(name: str, model: onnx.ModelProto, cotangents: set[str]) -> Piece:
    """The piece's nodes: those reachable from the cotangent inputs are its backward, the rest its forward."""
    piece = Piece(name)
    piece.constants = list(model.graph.initializer)
    tainted = set(cotangents)
    for node in model.graph.node:  # the exporter writes nodes in topological order
        if any(i in tainted for i in node.input if i):
            tainted.update(node.output)
            piece.backward.append(node)
        else:
            piece.forward.append(node)
    return piece


def _instance(nodes, prefix: str, mapping: dict[str, str]) -> list:
    """Copies of `nodes` with values renamed: mapped names as given, the rest under `prefix`."""
    out = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name}"
        for slot, value in enumerate(node.input):
            if value:
                copy.input[slot] = mapping.get(value, f"{prefix}{value}")
        for slot, value in enumerate(node.output):
            copy.output[slot] = mapping.get(value, f"{prefix}{value}")
        out.append(copy)
    return out


def _tensor(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
    tensor = tensor.detach().cpu().contiguous()
    raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
    return helper.make_tensor(name, _TORCH_ONNX[tensor.dtype], list(tensor.shape), raw, raw=True)


def _layer_piece(pieces: EnergyPieces, index: int, kind: str) -> Piece:
    example = pieces.example(index)
    weights = layer_weight_names(pieces.layers[index], kind == "last")  # the names only: no weight copied
    cotangents = ["g_rel"] if kind == "last" else ["g_out", "g_rel"]
    names = PIECE_INPUTS + [f"w:{w}" for w in weights] + cotangents
    dynamic = [_SEQ_DIMS.get(n, ()) for n in names]
    traced = trace_joint(pieces.layer_joint(index), example)
    outputs = ["rel", "g_h"] if kind == "last" else ["h_out", "rel", "g_h"]
    return _split(kind, _export_proto(traced, example, names, outputs, dynamic), set(cotangents))


def build_energy_grad(graph: EnergyGradGraph) -> onnx.ModelProto:
    """The stitched energy_grad graph of `graph`'s checkpoint (inputs and outputs as EnergyGradGraph's)."""
    energy = graph.energy
    for p in energy.parameters():
        p.requires_grad_(False)
    pieces = EnergyPieces(energy)
    n = len(pieces.layers)
    param = next(energy.parameters())
    dtype, device = param.dtype, param.device
    elem = _TORCH_ONNX[dtype]
    d = energy.text_config.hidden_size

    # the pieces: prelude, head, one middle layer (if any), the last layer
    t = 7
    embeds = torch.randn(1, t, d, dtype=dtype, device=device)
    positions = torch.arange(t, device=device).view(1, t)
    prelude = _split("prelude", _export_proto(Prelude(energy).eval(), (embeds, positions),
                                              ["inputs_embeds", "position_ids"], ["cos", "sin", "bias"],
                                              [(1,), (1,)]), set())
    head_args = (torch.rand(t, device=device) + 0.1, torch.rand(t, dtype=dtype, device=device),
                 torch.ones(t, dtype=dtype, device=device))
    head_fx = trace_joint(EnergyPieces.head, head_args)
    head = _split("head", _export_proto(head_fx, head_args, ["r", "mask", "image_weight"], ["energy", "g_r"],
                                        [(0,)] * 3), set())
    kinds = {"last": _layer_piece(pieces, n - 1, "last")}
    if n > 1:
        kinds["mid"] = _layer_piece(pieces, 0, "mid")

    nodes, initializers = [], []
    for piece in (prelude, head, *kinds.values()):  # constants once per piece
        for c in piece.constants:
            if not c.name.startswith("w:"):
                copy = onnx.TensorProto()
                copy.CopyFrom(c)
                copy.name = f"{piece.name}/{c.name}"
                initializers.append(copy)
    const_maps = {piece.name: {c.name: f"{piece.name}/{c.name}" for c in piece.constants}
                  for piece in (prelude, head, *kinds.values())}

    def small(name: str, op: str, inputs: list[str], **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    nodes += _instance(prelude.forward, "pre/", {"inputs_embeds": "inputs_embeds", "position_ids": "position_ids",
                                                 **const_maps["prelude"]})
    maps, layer_weight = [], []
    hidden, r = "inputs_embeds", None
    for i in range(n):
        piece = kinds["last" if i + 1 == n else "mid"]
        mapping = {**const_maps[piece.name], "h": hidden, "cos": "pre/cos", "sin": "pre/sin", "bias": "pre/bias",
                   "queries": "query_weights"}
        for name, tensor in pieces.weights(i).items():
            stored = f"layers.{i}.{name}" + (".T" if name.endswith("_proj.weight") else "")
            initializers.append(_tensor(stored, tensor))
            mapping[f"w:{name}"] = stored
        nodes += _instance(piece.forward, f"l{i}/", mapping)
        # rel_l weighted by layer_weights[l] (a scalar, float32 as the relevance)
        index = small(f"lw{i}/index", "Constant", [], value=helper.make_tensor("v", TensorProto.INT64, [], [i]))
        w = small(f"lw{i}/w", "Gather", ["layer_weights", index], axis=0)
        if elem != TensorProto.FLOAT:
            w = small(f"lw{i}/w_f32", "Cast", [w], to=TensorProto.FLOAT)
        layer_weight.append(w)
        part = small(f"lw{i}/rel", "Mul", [f"l{i}/rel", w])
        r = part if r is None else small(f"r{i}", "Add", [r, part])
        hidden = f"l{i}/h_out"
        maps.append(mapping)
    nodes += _instance(head.forward, "head/", {**const_maps["head"], "r": r, "mask": "mask",
                                               "image_weight": "image_weight"})
    for i in reversed(range(n)):
        piece = kinds["last" if i + 1 == n else "mid"]
        mapping = {**maps[i], "g_rel": small(f"lw{i}/g_rel", "Mul", ["head/g_r", layer_weight[i]])}
        if i + 1 < n:
            mapping["g_out"] = f"l{i + 1}/g_h"
        nodes += _instance(piece.backward, f"l{i}/", mapping)
    nodes.append(helper.make_node("Identity", ["head/energy"], ["energy"], name="energy"))
    nodes.append(helper.make_node("Identity", ["l0/g_h"], ["grad_inputs_embeds"], name="grad_inputs_embeds"))

    def value(name, elem_type, shape):
        return helper.make_tensor_value_info(name, elem_type, shape)
    inputs = [value("inputs_embeds", elem, [1, SEQ, d]), value("position_ids", TensorProto.INT64, [1, SEQ]),
              value("mask", elem, [SEQ]), value("image_weight", elem, [SEQ]), value("query_weights", elem, [SEQ]),
              value("layer_weights", elem, [n])]
    outputs = [value("energy", TensorProto.FLOAT, []), value("grad_inputs_embeds", elem, [1, SEQ, d])]
    model = helper.make_model(helper.make_graph(nodes, "energy_grad", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pipmm-edge energy_stitch")
    model.ir_version = 10  # opset 18's IR version (onnx.helper.VERSION_TABLE)
    return model
