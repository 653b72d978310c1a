"""Trace the three graphs (vision, embed, decoder) to ONNX with torch.export (dynamo).

Dynamic axes: batch everywhere, sequence and past length for the decoder. Example inputs use
sizes >= 2 so that torch.export does not specialise an axis to the example's 0 or 1.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch

from export.energy_stitch import build_energy_grad
from export.fused import FusedDecoderSpec, build_fused_decoder
from export.fused_prompt import build_fused_prompt_encoder
from export.model.decoder import DecoderGraph, EmbedGraph, StaticDecoderGraph, kv_names
from export.model.energy import EnergyGradGraph
from export.model.prompt_encoder import PromptEncoderGraph
from export.model.vision import PipmmVision

OPSET = 18  # the TensorRT 10 parser covers opsets 9-20
EXTERNAL_DATA_BYTES = 1 << 30  # weights go to a side file above 1 GiB (protobuf's hard limit is 2 GiB)
WEIGHT_BYTES = 4096  # initializers from this size on are weights (shared between graphs); smaller ones are constants

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT8: "uint8",
                onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# torch.onnx logs a warning per torchvision op it cannot register; torchvision is not used here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path), external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path), full_check=True)


def export_vision(vision: PipmmVision, path: Path, model: dict) -> None:
    cfg = vision.config
    batch = torch.export.Dim("batch", min=1, max=64)
    device = next(vision.parameters()).device  # example inputs where the weights are (a GPU export)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device)
    if vision.prompt_mlp is None:
        args, names, shapes = (pixels,), ["pixel_values"], ({0: batch},)
    else:
        mlp_dtype = next(vision.prompt_mlp.parameters()).dtype
        prompt = torch.randn(2, vision.prompt_mlp.config.d_llm, dtype=mlp_dtype, device=device)
        args, names, shapes = (pixels, prompt), ["pixel_values", "prompt_vector"], ({0: batch}, {0: batch})
    _export(vision, args, path, names, vision.output_names, shapes)


def export_embed(embed: EmbedGraph, path: Path, model: dict) -> None:
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=1, max=1 << 16)
    ids = torch.randint(0, embed.embed_tokens.num_embeddings, (2, 5), device=embed.embed_tokens.weight.device)
    _export(embed, (ids,), path, ["input_ids"], ["inputs_embeds"], ({0: batch, 1: seq},))


def decoder_example(decoder: DecoderGraph | StaticDecoderGraph, model: dict, slots: int | None = None) -> tuple:
    """Tracing inputs: B=2 sequences of T=5 new tokens at positions 3..7, after P=3 cached ones.

    slots None: the dynamic decoder, past [B,H_kv,P,hd] and mask [B,P+T] of ones; slots S: the static
    decoder, past and mask over S slots, the first P+T in use."""
    b, t, p = 2, 5, 3
    param = next(decoder.parameters())
    dtype, device = param.dtype, param.device
    cached = p if slots is None else slots
    mask = torch.zeros(b, p + t if slots is None else slots, dtype=torch.int64, device=device)
    mask[:, : p + t] = 1
    return (
        torch.randn(b, t, decoder.text_config.hidden_size, dtype=dtype, device=device),
        mask,
        torch.arange(p, p + t, device=device).expand(b, t).contiguous(),
        tuple(torch.randn(b, model["num_kv_heads"], cached, model["head_dim"], dtype=dtype, device=device)
              for _ in range(2 * decoder.num_layers)),
    )


def export_decoder(decoder: DecoderGraph, path: Path, model: dict) -> None:
    n = decoder.num_layers
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=1 << 16)
    past = torch.export.Dim("past_sequence", min=0, max=1 << 16)
    args = decoder_example(decoder, model)
    total = torch.export.Dim("total_sequence", min=1, max=1 << 17)  # = past + sequence; torch.export can't say so
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: past} for _ in range(2 * n)))
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n, "past_key_values")]
    outputs = ["logits", "hidden", *kv_names(n, "present")]
    if decoder.cmai_layers:  # CMAI (docs/vmtc-cmai.md): image_bias [B,L_c,P+T] in, attention [B,L_c,T,P+T] out
        b, width = args[1].shape  # attention_mask [B,P+T]
        args += (torch.randn(b, len(decoder.cmai_layers), width, dtype=args[0].dtype, device=args[0].device),)
        shapes += ({0: batch, 2: total},)
        inputs.append("image_bias")
        outputs.append("attention")
    _export(decoder, args, path, inputs, outputs, shapes)


def export_decoder_static(decoder: StaticDecoderGraph, path: Path, model: dict) -> None:
    """The decoder over a preallocated cache of S slots (export/model/decoder.py); S, like batch and T, is a
    dynamic axis: a runtime fixes it when it allocates the cache."""
    n = decoder.num_layers
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=1 << 16)
    slots = torch.export.Dim("cache", min=2, max=1 << 17)
    args = decoder_example(decoder, model, slots=9)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: slots}, {0: batch, 1: seq},
              tuple({0: batch, 2: slots} for _ in range(2 * n)))
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n, "past_key_values")]
    outputs = ["logits", "hidden", *kv_names(n, "present")]
    _export(decoder, args, path, inputs, outputs, shapes)


def export_decoder_fused(spec: FusedDecoderSpec, path: Path, model: dict, rewrite=None) -> None:
    """The decoder as ONNX Runtime's fused ops (export/fused.py), built from the modules, not traced. Checked by
    loading it in ONNX Runtime: the onnx checker does not know ONNX Runtime's SimplifiedLayerNormalization.
    rewrite: ModelProto -> ModelProto applied before the one save (its MatMulNBits weights, export/fused_quant.py)."""
    import onnxruntime

    with torch.no_grad():
        graph = build_fused_decoder(spec)
    save_graph(graph if rewrite is None else rewrite(graph), path)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_prompt_encoder(encoder: PromptEncoderGraph, path: Path, model: dict) -> None:
    """The first L decoder layers over the prompt, no cache (export/model/prompt_encoder.py): hidden [B,T,D]."""
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=1, max=1 << 16)
    param = next(encoder.parameters())
    b, t = 2, 5
    args = (torch.randn(b, t, encoder.text_config.hidden_size, dtype=param.dtype, device=param.device),
            torch.ones(b, t, dtype=torch.int64, device=param.device),
            torch.arange(t, device=param.device).expand(b, t).contiguous())
    _export(encoder, args, path, ["inputs_embeds", "attention_mask", "position_ids"], ["hidden"],
            ({0: batch, 1: seq},) * 3)


def export_prompt_encoder_fused(spec: tuple[FusedDecoderSpec, int], path: Path, model: dict) -> None:
    """(spec, L) -> the fused prompt encoder (export/fused_prompt.py), checked by loading it in ONNX Runtime."""
    import onnxruntime

    with torch.no_grad():
        save_graph(build_fused_prompt_encoder(*spec), path)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_energy_grad(graph: EnergyGradGraph, path: Path, model: dict) -> None:
    """ControlMLLM's energy and its gradient (export/model/energy.py): one decoder layer's forward-and-VJP traced
    once with its weights as inputs, exported, and stitched L_g times in ONNX with the prelude and the energy's
    head (export/energy_stitch.py: cost linear in depth). T is dynamic; batch is 1 (one request's prefill). The
    weights are stored once each, in the decoder graph's layout, so add-graphs shares them."""
    save_graph(build_energy_grad(graph), path)
    onnx.checker.check_model(str(path), full_check=True)


def export_adapter(adapter, path: Path, n_max: int, tokens_per_frame: int) -> None:
    """The frame adapter (export/model/mivpg.py) at fixed shapes, nothing dynamic (TensorRT builds it as is):
    frame_tokens [1,N_max,K,D_llm], frame_mask [1,N_max] float (1 = a frame) (, frame_positions [1,N_max,K] int64
    when the adapter reads where each token sits) -> visual_tokens [1,R,D_llm]."""
    param = next(adapter.parameters())
    tokens = torch.randn(1, n_max, tokens_per_frame, adapter.config.d_in, dtype=param.dtype, device=param.device)
    mask = torch.ones(1, n_max, dtype=torch.float32, device=param.device)
    inputs = (tokens, mask)
    if adapter.config.needs_positions:
        inputs += (torch.randint(0, adapter.config.num_patches, (1, n_max, tokens_per_frame), device=param.device),)
    _export(adapter, inputs, path, adapter.input_names, adapter.output_names, None)


# graph name -> exporter(module, path, manifest["model"]); the bundle writer walks this in order.
EXPORTERS = {"vision": export_vision, "embed": export_embed, "decoder": export_decoder}
# Graphs a bundle may carry besides those, added on request (export/extra_graphs.py): same weights, other
# shapes for other runtimes. The default bundle and the CPU path never need them.
OPTIONAL_EXPORTERS = {"decoder_static": export_decoder_static, "energy_grad": export_energy_grad,
                      "decoder_fused": export_decoder_fused, "prompt_encoder": export_prompt_encoder,
                      "prompt_encoder_fused": export_prompt_encoder_fused}


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Weights in a side file above EXTERNAL_DATA_BYTES (so never past protobuf's 2 GiB), as the exporter does.
    The size is the initializers' bytes: ByteSize() serializes the message and fails above 2 GiB (a 7B graph)."""
    external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data" if external else None)


def has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def externalize(path: Path, threshold: int = WEIGHT_BYTES) -> bool:
    """Move a graph's weights (initializers of `threshold` bytes or more) into `<file>.data` beside it, so that
    other graphs can point their own initializers at them (export/extra_graphs.py share_weights). The graph and
    what it computes are unchanged; only where its bytes lie. False when it already keeps weights outside."""
    if has_external_data(path):
        return False
    model = onnx.load(str(path))
    data = path.parent / f"{path.name}.data"
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    # Written beside and renamed over: the graph file may be a hard link into another bundle (export_direct reuse).
    scratch = path.parent / f".{path.name}.externalized"
    onnx.save(model, str(scratch), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=threshold)
    os.replace(scratch, path)
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it private; a bundle is meant to be copied and shared
    return True


def describe_graph(path: Path) -> dict:
    """Names, dtypes and shapes (ints, or axis names for dynamic axes) of a graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def values(items):
        out = []
        for v in items:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
        return out

    initializers = {i.name for i in model.graph.initializer}
    return {"inputs": values(i for i in model.graph.input if i.name not in initializers),
            "outputs": values(model.graph.output), "opset": OPSET}
