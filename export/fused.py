"""`decoder_fused`: the decoder as ONNX Runtime's fused contrib ops, for ONNX Runtime on CPU.

Same inputs and outputs as `decoder` (export/model/decoder.py), same weights, 10 nodes per layer (Llama; ORT
GenAI's builder writes 10 too) instead of the ~74 that ONNX Runtime's own load-time optimisation leaves of the
dynamo trace:

    x ─ SimplifiedLayerNormalization ─ MatMul(W_q|W_k|W_v packed) [+ Add b_qkv] ─ GroupQueryAttention ─ MatMul(W_o)
          (packed q|k|v in, rotary inside at every position id; + image_bias, probs: CMAI layers)
      ─ SkipSimplifiedLayerNormalization (residual add + norm) ─ MatMul(W_gate|W_up packed) ─ Split ─ QuickGelu(1) * up ─ MatMul(W_down)
      ─ SkipSimplifiedLayerNormalization of the next layer (its 4th output is this layer's hidden state)

Why written here rather than by a tool: onnxruntime.transformers' optimizer on our dynamo graph fuses the
norms only (SkipSimplifiedLayerNormalization); its rotary and attention fusions match older exporters'
patterns, not torch 2.x dynamo's, and ORT GenAI's builder takes token ids, derives positions from the mask and
has no bias or attention-probability output. So the graph is emitted directly from the checkpoint's
modules with onnx.helper, as GenAI's builder does. Rotary is GroupQueryAttention's own (do_rotary) on the
packed projection, fed position_ids and query_seqlens (= T): with query_seqlens the kernel rotates every row
at its own position id, in a first prompt too (without it a first prompt reads only position_ids[:, 0]), so
arbitrary position ids (visual positions) work; the SwiGLU contrib op that would take gate|up whole has no
CPU kernel in onnxruntime 1.32, hence Split + QuickGelu + Mul. GroupQueryAttention is causal in sequence
order, as transformers' mask is; it reads lengths, not the mask's pattern: the runtime's masks are all ones
(runtimes/onnxruntime.py), and seqlens_k = sum(mask) - 1.

Its weights are packed (q|k|v, gate|up). With pieces=True (float weights: what add_graphs writes unless they are
quantized) each piece is its own initializer, W^T as the traced decoder stores it, joined by a Concat (axis 1)
that ONNX Runtime folds into one constant when the session loads, and the lm_head is [V,D] behind a Transpose
folded likewise: the same packed bytes at run time, and the pieces are found in decoder.onnx.data by content
(export/extra_graphs.py share_weights), so the bundle holds the LLM's weights once. Packed at export (pieces=False)
where MatMulNBits quantizes them (its quantizer needs the packed MatMul weight as an initializer).

The token step (both targets; sdk/manifest_fused.py records it): with spec.embed_tokens an optional input_ids
[B,T_ids] (its initializer default [1,0]) is looked up in the embedding table and its rows put before
inputs_embeds' (Concat on the sequence axis): a decode step feeds one id and no rows, a prefill rows and no ids.
next_token [B,1] int64 = ArgMax(logits), the last output, so a greedy step copies 8 bytes, not [1,V]
(runtimes/fused_device.py binds it to the input_ids buffer of the next step).

Two targets (FUSED_TARGETS; the manifest entry records which, `target`, and `preferred_by` follows it):

    cpu   the above: GroupQueryAttention's own rotary with query_seqlens (onnxruntime >= 1.32), CMAI's
          attention_bias and post-softmax output. The CPU's in-place cache (runtimes/inplace_cache.py).
    cuda  GroupQueryAttention's CUDA kernel has no attention_bias and no probability output, and onnxruntime 1.31
          (the GPU machine's) has no query_seqlens input: a Split and one RotaryEmbedding per q and k (which
          rotates every row at its own position id, visual positions included) before a GroupQueryAttention
          without rotary, and no image_bias/attention (CMAI falls back as on decoder_static). FP16 (or INT4
          MatMulNBits over FP16, export/fused_quant.py), run with one preallocated device KV buffer bound as
          past and present and a CUDA-graph decode step (runtimes/fused_device.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from sdk.errors import ExportError
from sdk.manifest_fused import FusedDecoderEntry

from export.model.decoder import kv_names

FUSED_DECODER = "decoder_fused"  # the graph's name in the bundle
LM_HEAD_WEIGHT = "lm_head.weight"  # the vocabulary projection's [D,V] MatMul weight (export/fused_quant.py finds it)
MS = "com.microsoft"
FUSED_OPSET = 18
# onnx's make_model writes its newest IR version (14 with onnx 1.20); onnxruntime 1.31 (the GPU machine's) reads
# up to 13. Opset 18 needs IR 8: write 10, what torch.onnx writes for the plain graphs.
FUSED_IR_VERSION = 10
_ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class FusedTarget:
    """How the graph is written for one kind of ONNX Runtime execution provider."""
    rotary_in_attention: bool  # GroupQueryAttention's do_rotary + query_seqlens, else RotaryEmbedding on q and k
    cmai: bool  # image_bias in, attention out (GroupQueryAttention's attention_bias and qk_output)
    devices: tuple[str, ...]  # the manifest's preferred_by.onnxruntime


FUSED_TARGETS = {"cpu": FusedTarget(True, True, ("cpu",)), "cuda": FusedTarget(False, False, ("cuda",))}
TARGET_KEY = "pipmm.fused_target"  # the model's metadata_props entry naming its target
TOKEN_INPUT, NEXT_TOKEN = "input_ids", "next_token"  # sdk/manifest_fused.py
EMBED_TABLE = "embed_tokens.weight"  # [V,D]; a tied lm_head's own [V,D] initializer where pieces=True


@dataclass
class FusedDecoderSpec:
    """What the fused graph is built from (the same modules as DecoderGraph)."""
    language_model: torch.nn.Module
    lm_head: torch.nn.Module
    text_config: object
    prompt_layer: int = -1
    cmai_layers: list[int] = field(default_factory=list)
    target: str = "cpu"  # FUSED_TARGETS
    pieces: bool = False  # packed weights as Concat of the decoder's own pieces, folded at load (module docstring)
    embed_tokens: torch.nn.Module | None = None  # the input embeddings: the optional input_ids entry (TOKEN_INPUT)
    next_token: bool = True  # the NEXT_TOKEN output (ArgMax of logits)


class _Graph:
    """Nodes, initializers and fresh names for one graph."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.elem = dtype, _ONNX_TYPE[dtype]
        self.nodes, self.initializers, self.count, self.constants = [], [], 0, set()

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def weight(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        array = value.detach().to(torch.float32).cpu().numpy() if isinstance(value, torch.Tensor) else value
        dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        """An int constant, stored once per name (equal names hold equal values here)."""
        if name not in self.constants:
            self.constants.add(name)
            self.initializers.append(onnx.numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        names = [self.name(op_type) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(f"n_{op_type}"), domain=domain,
                                           **attrs))
        return names[0] if len(names) == 1 else names


def _check(spec: FusedDecoderSpec) -> None:
    config = spec.text_config
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"decoder_fused is written for {', '.join(SUPPORTED_ARCHITECTURES)} text models, not "
                          f"{config.model_type}: leave decoder_fused out (the plain decoder runs everywhere)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"decoder_fused needs a SiLU MLP, this model's is {config.hidden_act}: leave it out")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", config.model_type == "mistral"):
        raise ExportError("decoder_fused has no sliding-window attention: leave it out for this checkpoint")


def _rotary_caches(spec: FusedDecoderSpec, head_dim: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] from the checkpoint's own rotary module (its scaling included)."""
    positions = int(spec.text_config.max_position_embeddings)
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    rotary = spec.language_model.rotary_emb
    param = next(rotary.buffers(), None)
    with torch.no_grad():
        cos, sin = rotary(probe.to(param.device) if param is not None else probe,
                          torch.arange(positions, device=param.device if param is not None else "cpu")[None])
    half = head_dim // 2
    return cos[0, :, :half].float().cpu().numpy(), sin[0, :, :half].float().cpu().numpy()


def _packed(g: _Graph, name: str, linears: list[torch.nn.Module], pieces: bool) -> tuple[str, str | None]:
    """One [in, sum(out)] MatMul weight (and bias, or None) from several nn.Linear: one initializer, or (pieces)
    Concat(W_1^T, W_2^T, ..., axis=1) of one initializer each, which ONNX Runtime folds at load."""
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = g.weight(f"{name}.bias", torch.cat([b if b is not None else torch.zeros(lin.out_features)
                                                   for b, lin in zip(biases, linears)]))
    if pieces:
        parts = [g.weight(f"{name}.weight.{k}", lin.weight.t()) for k, lin in enumerate(linears)]
        return g.op("Concat", parts, [f"{name}.weight"], axis=1), bias
    return g.weight(f"{name}.weight", torch.cat([lin.weight for lin in linears], 0).t()), bias


def _token_rows(g: _Graph, spec: FusedDecoderSpec) -> str:
    """Concat(table[input_ids], inputs_embeds) on the sequence axis [1,T_ids+T,D]: a decode step feeds one token id
    and no embedding rows, a prefill (visual rows among the text's) embedding rows and no ids (the default, an empty
    [1,0]: batch 1; larger batches feed [B,0]). A tied lm_head shares its [V,D] initializer (pieces=True) with it."""
    table = spec.embed_tokens.weight
    tied = spec.pieces and table.data_ptr() == spec.lm_head.weight.data_ptr()
    name = "lm_head.weight.vd" if tied else g.weight(EMBED_TABLE, table)
    g.initializers.append(onnx.numpy_helper.from_array(np.zeros((1, 0), np.int64), TOKEN_INPUT))
    return g.op("Concat", [g.op("Gather", [name, TOKEN_INPUT], axis=0), "inputs_embeds"], axis=1)


def build_fused_decoder(spec: FusedDecoderSpec) -> onnx.ModelProto:
    _check(spec)
    if spec.target not in FUSED_TARGETS:
        raise ExportError(f"decoder_fused target {spec.target!r}: choose {', '.join(FUSED_TARGETS)}")
    target = FUSED_TARGETS[spec.target]
    cmai_layers = list(spec.cmai_layers) if target.cmai else []
    config, lm = spec.text_config, spec.language_model
    n, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(lm.parameters()).dtype
    if dtype not in _ONNX_TYPE:
        raise ExportError(f"decoder_fused is built in fp32 or fp16, not {dtype}: add it to the fp32 or fp16 bundle")
    g = _Graph(dtype)
    eps = float(config.rms_norm_eps)
    cos, sin = _rotary_caches(spec, hd, dtype)
    cos_cache, sin_cache = g.weight("rotary.cos_cache", cos), g.weight("rotary.sin_cache", sin)

    # seqlens_k [B] int32 = tokens per sequence - 1; total_sequence_length: scalar int32; query_seqlens [B] int32
    # = T, the call's tokens (every row valid: it only switches the kernel's rotary to every row's position id)
    one = g.const("const.one", np.array([1], np.int64))
    embeds = _token_rows(g, spec) if spec.embed_tokens is not None else "inputs_embeds"
    seqlens = g.op("Sub", [g.op("ReduceSum", ["attention_mask", one], keepdims=0), one])
    seqlens = g.op("Cast", [seqlens], to=TensorProto.INT32)
    batch, tokens = g.op("Shape", [embeds], start=0, end=1), g.op("Shape", [embeds], start=1, end=2)
    width = g.op("Shape", ["attention_mask"], start=1, end=2)  # [1]: P+T, or the in-place buffer's S
    total = g.op("Cast", [g.op("Squeeze", [width])], to=TensorProto.INT32)
    rows = g.op("Expand", [g.op("Cast", [tokens], to=TensorProto.INT32), batch]) if target.rotary_in_attention else None
    splits_qkv = None if target.rotary_in_attention else \
        g.const("const.split_qkv", np.array([heads * hd, kv_heads * hd, kv_heads * hd], np.int64))
    biases = None
    if cmai_layers:  # image_bias [B,L_c,P+T] -> [B,L_c,T,P+T] once (every query row of the call), sliced per layer
        shape = g.op("Concat", [batch, g.const("const.cmai_layers", np.array([len(cmai_layers)], np.int64)),
                                tokens, width], axis=0)
        biases = g.op("Expand", [g.op("Unsqueeze", ["image_bias", g.const("const.two", np.array([2], np.int64))]),
                                 shape])
    splits_mlp = g.const("const.split_mlp", np.array([config.intermediate_size] * 2, np.int64))

    states = [embeds]  # transformers' hidden_states: embeddings, then each layer's output
    residual, pending, probs = embeds, None, []  # pending: the last MLP output, not yet added
    for i, layer in enumerate(lm.layers[:n]):
        attn, mlp = layer.self_attn, layer.mlp
        gamma = g.weight(f"layers.{i}.input_layernorm.weight", layer.input_layernorm.weight)
        if pending is None:
            normed = g.op("SimplifiedLayerNormalization", [residual, gamma], axis=-1, epsilon=eps, stash_type=1)
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], 4,
                                          domain=MS, epsilon=eps)
            states.append(residual)
        w_qkv, b_qkv = _packed(g, f"layers.{i}.qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj], spec.pieces)
        qkv = g.op("MatMul", [normed, w_qkv])
        if b_qkv is not None:
            qkv = g.op("Add", [qkv, b_qkv])
        # query (packed q|k|v), key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
        # sin_cache, position_ids, attention_bias, head_sink, k_scale, v_scale, q_norm_weight, k_norm_weight,
        # query_seqlens
        bias = ""
        column = cmai_layers.index(i) if i in cmai_layers else None
        outputs = [g.name("attn"), f"present.{i}.key", f"present.{i}.value"]
        extra = {}
        if column is not None:
            start, end = g.const(f"const.c{column}", np.array([column], np.int64)), \
                g.const(f"const.c{column + 1}", np.array([column + 1], np.int64))
            bias = g.op("Slice", [biases, start, end, one])  # [B,1,T,P+T]
            outputs.append(g.name("qk"))
            extra["qk_output"] = 2  # probabilities after softmax: CMAI's focus reads them
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total]
        if target.rotary_in_attention:
            gqa_inputs = [qkv, "", "", *past, cos_cache, sin_cache, "position_ids", bias, "", "", "", "", "", rows]
        else:  # cuda: rotary as its own op on q and k (every row at its own position id), no query_seqlens
            q, k, v = g.op("Split", [qkv, splits_qkv], 3, axis=-1)
            q = g.op("RotaryEmbedding", [q, "position_ids", cos_cache, sin_cache], domain=MS, num_heads=heads)
            k = g.op("RotaryEmbedding", [k, "position_ids", cos_cache, sin_cache], domain=MS, num_heads=kv_heads)
            gqa_inputs = [q, k, v, *past]
        g.op("GroupQueryAttention", gqa_inputs, outputs, domain=MS, num_heads=heads, kv_num_heads=kv_heads,
             scale=float(hd ** -0.5), do_rotary=int(target.rotary_in_attention), **extra)
        if column is not None:
            probs.append(g.op("ReduceMean", [outputs[3], one], keepdims=1))  # mean over heads: [B,1,T,P+T]
        attn_out = g.op("MatMul", [outputs[0], g.weight(f"layers.{i}.o_proj.weight", attn.o_proj.weight.t())])
        if attn.o_proj.bias is not None:
            attn_out = g.op("Add", [attn_out, g.weight(f"layers.{i}.o_proj.bias", attn.o_proj.bias)])
        gamma = g.weight(f"layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, gamma], 4,
                                      domain=MS, epsilon=eps)
        w_gu, b_gu = _packed(g, f"layers.{i}.gate_up_proj", [mlp.gate_proj, mlp.up_proj], spec.pieces)
        gate_up = g.op("MatMul", [normed, w_gu])
        if b_gu is not None:
            gate_up = g.op("Add", [gate_up, b_gu])
        gate, up = g.op("Split", [gate_up, splits_mlp], 2, axis=-1)
        act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])  # silu(gate) * up
        pending = g.op("MatMul", [act, g.weight(f"layers.{i}.down_proj.weight", mlp.down_proj.weight.t())])
        if mlp.down_proj.bias is not None:
            pending = g.op("Add", [pending, g.weight(f"layers.{i}.down_proj.bias", mlp.down_proj.bias)])

    gamma = g.weight("norm.weight", lm.norm.weight)
    last, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], 4, domain=MS, epsilon=eps)
    states.append(last)  # transformers' last hidden state is the normed one
    g.op("Identity", [states[spec.prompt_layer + 1] if spec.prompt_layer != -1 else last], ["hidden"])
    final = g.op("Gather", [last, g.const("const.last", np.array(-1, np.int64))], axis=1)  # [B,D]
    head = g.op("Transpose", [g.weight("lm_head.weight.vd", spec.lm_head.weight)], [LM_HEAD_WEIGHT], perm=[1, 0]) \
        if spec.pieces else g.weight(LM_HEAD_WEIGHT, spec.lm_head.weight.t())  # [D,V]
    logits = g.op("MatMul", [final, head])
    if getattr(spec.lm_head, "bias", None) is not None:
        logits = g.op("Add", [logits, g.weight("lm_head.bias", spec.lm_head.bias)])
    g.op("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
    if spec.next_token:  # [B,1]: the first index of the maximum, as numpy's argmax (greedy on the device)
        g.op("ArgMax", ["logits"], [NEXT_TOKEN], axis=-1, keepdims=1, select_last_index=0)
    if probs:
        g.op("Concat", probs, ["attention"], axis=1) if len(probs) > 1 else g.op("Identity", probs, ["attention"])

    elem, d = g.elem, config.hidden_size
    kv_in = [helper.make_tensor_value_info(name, elem, ["batch", kv_heads, "past_sequence", hd])
             for name in kv_names(n, "past_key_values")]
    kv_out = [helper.make_tensor_value_info(name, elem, ["batch", kv_heads, "past_sequence + sequence", hd])
              for name in kv_names(n, "present")]
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "sequence", d]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]), *kv_in]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config.vocab_size]),
               helper.make_tensor_value_info("hidden", elem, ["batch", "sequence", d]), *kv_out]
    if spec.embed_tokens is not None:  # optional: its initializer (an empty [1,0]) is the default
        inputs.append(helper.make_tensor_value_info(TOKEN_INPUT, TensorProto.INT64, ["batch", "tokens"]))
    if cmai_layers:
        inputs.append(helper.make_tensor_value_info("image_bias", elem, ["batch", len(cmai_layers), "total_sequence"]))
        outputs.append(helper.make_tensor_value_info("attention", elem, ["batch", len(cmai_layers), "sequence",
                                                                          "past_sequence + sequence"]))
    if spec.next_token:  # last: the outputs before it are the plain decoder's, in its order
        outputs.append(helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, ["batch", 1]))
    graph = helper.make_graph(g.nodes, "decoder_fused", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="pipmm-edge export/fused.py", ir_version=FUSED_IR_VERSION)
    helper.set_model_props(model, {TARGET_KEY: spec.target})
    return model


def _run_nodes(model: onnx.ModelProto) -> list:
    """The nodes that run: those of constant inputs only (the weight pieces' Concat and Transpose) are folded into
    initializers when ONNX Runtime loads the graph."""
    constant = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}  # input_ids: a default
    return [n for n in model.graph.node if not all(i in constant for i in n.input if i)]


def fused_ops(run: list) -> dict:
    """The nodes that run (_run_nodes) -> op type -> count, for the manifest."""
    counts: dict[str, int] = {}
    for node in run:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def fused_entry(path) -> dict:
    """The manifest entry's extra fields (sdk/manifest_fused.py): what the flavour is, its ops, and which runtime
    prefers it."""
    model = onnx.load(str(path), load_external_data=False)
    layers = sum(1 for node in model.graph.node if node.op_type == "GroupQueryAttention")
    name = {p.key: p.value for p in model.metadata_props}.get(TARGET_KEY, "cpu")
    target = FUSED_TARGETS[name]
    run = _run_nodes(model)
    inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    return FusedDecoderEntry(
        target=name, preferred_by={"onnxruntime": list(target.devices)},
        query_seqlens=target.rotary_in_attention, cmai=target.cmai,
        token_input=TOKEN_INPUT if TOKEN_INPUT in inputs else None,
        next_token=NEXT_TOKEN if NEXT_TOKEN in outputs else None,
        extra={"ops": fused_ops(run), "nodes": len(run), "folded_at_load": len(model.graph.node) - len(run),
               "nodes_per_layer": round(len(run) / max(layers, 1), 1),
               "built_by": "export/fused.py (ONNX Runtime contrib ops, weights packed: float ones from the decoder's "
                           "own pieces, folded at load, shared with it)"}).to_dict()
