"""`prompt_encoder_fused`: the first-L-layers prompt encoder (export/model/prompt_encoder.py) as ONNX Runtime's fused
contrib ops, cut out of the fused decoder (export/fused.py) rather than built a second way.

    decoder_fused with hidden = states[L] --keep only the nodes `hidden` depends on--> layers 0..L-1
      (+ layer L's SkipSimplifiedLayerNormalization, whose 4th output is the residual sum states[L]),
      GroupQueryAttention's past_key/past_value left empty (optional inputs: a pass with no cache), the present
      outputs and logits dropped.

Inputs and output are the plain prompt_encoder's: inputs_embeds [B,T,D], attention_mask [B,T] (int64, its sum
gives GroupQueryAttention's lengths, so all ones as the runtime feeds it), position_ids [B,T]; hidden [B,T,D].
"""

from __future__ import annotations

from dataclasses import replace

import onnx
from onnx import helper

from sdk.errors import ExportError

from export.fused import FusedDecoderSpec, build_fused_decoder

PROMPT_ENCODER_FUSED = "prompt_encoder_fused"


def prune(model: onnx.ModelProto, outputs: list[str], name: str) -> onnx.ModelProto:
    """The subgraph that computes `outputs`: only the nodes, initializers and inputs they depend on."""
    g = model.graph
    producer = {out: node for node in g.node for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack += [i for i in node.input if i]
    nodes = [n for n in g.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, name, [i for i in g.input if i.name in used],
                              [o for o in g.output if o.name in outputs],
                              [t for t in g.initializer if t.name in used])
    return helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name,
                             ir_version=model.ir_version)


def build_fused_prompt_encoder(spec: FusedDecoderSpec, layers: int) -> onnx.ModelProto:
    n = spec.text_config.num_hidden_layers
    if not 1 <= layers < n:
        raise ExportError(f"a fused prompt encoder of {layers} layers: it needs fewer than the decoder's {n} "
                          "(with all of them the decoder is the prompt encoder)")
    full = build_fused_decoder(replace(spec, prompt_layer=layers - 1, cmai_layers=[]))
    for node in full.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[3] = node.input[4] = ""  # no past: the prompt pass starts from an empty cache
            if len(node.input) > 16:  # query_seqlens needs a past (ORT); without one the rows rotate at 0..T-1,
                node.input[16] = ""   # which are the prompt pass's positions
    model = prune(full, ["hidden"], PROMPT_ENCODER_FUSED)
    attention = sum(node.op_type == "GroupQueryAttention" for node in model.graph.node)
    if attention != layers:  # the cut must keep exactly the first L layers
        raise ExportError(f"the fused prompt encoder kept {attention} attention layers, not {layers}")
    return model
