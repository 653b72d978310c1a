"""Graphs a bundle may carry besides vision/embed/decoder, and a bundle traced directly in half precision.

    add_graphs("bundle/", "checkpoint/")                       # + decoder_static (pipmm add-graphs)
    add_graphs("bundle/", "checkpoint/", graphs=("energy_grad",))  # + ControlMLLM referring (docs/referring.md)
    export_with_graphs("checkpoint/", "out/", ("energy_grad",), prompt_mlp="checkpoint/", budget="half", ...)
    export_direct("checkpoint/", "out/", no_prompt_mlp=True, dtype="fp16", device="cuda")

`decoder_static` (export/model/decoder.py: the decoder over a preallocated cache, for CUDA graphs) and
`energy_grad` hold the same weights as `decoder`. The decoder's weights lie in its external data file
(decoder.onnx.data; a decoder that kept them inline, any below 1 GiB, has them moved there when such a graph is
added, the graph itself unchanged) and the new graph's initializers are pointed into that file (after checking
that the bytes are equal), so a bundle holds the LLM weights once however many decoder graphs it has. What
the new graph does not find there stays its own. `decoder_fused` packs its weights and shares nothing.

`export_direct` traces the modules in float16 (or bfloat16) on any device instead of exporting FP32 and
converting (export/precision/quantize.py): the route for checkpoints whose FP32 export would not fit in memory or on
disk (a 7B model: 27 GB FP32 against 13.5 GB FP16). transformers' modules keep RMSNorm and our attention
keeps softmax in float32; the logits output is float32. The budget-independent graphs (embed, decoder,
decoder_static) can be hard-linked from another bundle of the same checkpoint (`reuse`), so the half
budget of a 7B model costs one vision export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from sdk.bundle import file_records, link_or_copy, load_bundle, refuse_existing, staged_bundle, write_manifest
from sdk.errors import ExportError
from sdk.manifest import ChatTemplate, Graph, Manifest, Precision, PromptVector
from sdk.manifest_referring import defaults_for, with_settings

from export import onnx_graphs
from export.fused import FUSED_DECODER, FusedDecoderSpec, fused_entry
from export.fused_prompt import PROMPT_ENCODER_FUSED
from export.fused_quant import FUSED_WEIGHTS, quantize_fused, weight_settings
from export.writer import PROMPT_ENCODER_NOTE, build_manifest, build_modules, export_bundle, graph_entry
from export.model.checkpoint import load_checkpoint
from export.model.decoder import StaticDecoderGraph
from export.model.energy import EnergyGradGraph
from export.model.prompt import PromptMLP
from export.model.prompt_encoder import PROMPT_ENCODER, PromptEncoderGraph, encoder_layers

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# graphs built from the modules with packed weights (q|k|v, gate|up): they share nothing with decoder.onnx
PACKED = (PROMPT_ENCODER_FUSED,)  # weights packed at export: nothing to share (decoder_fused: export/fused.py pieces)
# graphs that do not depend on the visual-token budget or the prompt MLP: reusable across bundles of a checkpoint
BUDGET_FREE = ("embed", "decoder", "decoder_static")
# bytes compared per initializer when checking that two graphs hold the same weights (ends and middle)
_SAMPLE = 1 << 16
_WEIGHT_BYTES = onnx_graphs.WEIGHT_BYTES  # smaller initializers are constants (shapes, scalars), not weights


# optional graph -> its module from (checkpoint, prompt layer)
OPTIONAL_MODULES = {
    "decoder_static": lambda checkpoint, prompt_layer: StaticDecoderGraph(
        checkpoint.language_model, checkpoint.model.lm_head, checkpoint.config.text_config, prompt_layer),
    "energy_grad": lambda checkpoint, prompt_layer: EnergyGradGraph(
        checkpoint.language_model, checkpoint.config.text_config,
        defaults_for(checkpoint.config.text_config.num_hidden_layers).graph_layers),
    PROMPT_ENCODER: lambda checkpoint, prompt_layer: PromptEncoderGraph(
        checkpoint.language_model, checkpoint.config.text_config, _encoder_layers(checkpoint, prompt_layer)),
}
# optional graph -> what its manifest entry says it is for
OPTIONAL_NOTES = {
    "decoder_static": {"kv_cache": "static", "for": "GPU runtimes: CUDA graphs (docs/gpu.md)"},
    "energy_grad": {"for": "referring by box, mask, scribble or point: ControlMLLM (docs/referring.md)"},
    PROMPT_ENCODER: PROMPT_ENCODER_NOTE,
}


def _encoder_layers(checkpoint, prompt_layer: int) -> int:
    layers = encoder_layers(prompt_layer, checkpoint.config.text_config.num_hidden_layers)
    if layers is None:
        raise ExportError("the prompt vector comes from the decoder's last layer: the decoder graph is the prompt "
                          "encoder, a prompt_encoder graph would be all of it")
    return layers


def optional_module(name: str, checkpoint, prompt_layer: int, cmai_layers=(), fused_target: str = "cpu"):
    if name == FUSED_DECODER:  # built from the modules, not traced (export/fused.py); CMAI layers as the decoder's
        return FusedDecoderSpec(checkpoint.language_model, checkpoint.model.lm_head, checkpoint.config.text_config,
                                prompt_layer, list(cmai_layers), fused_target,
                                embed_tokens=checkpoint.model.get_input_embeddings())
    if name == PROMPT_ENCODER_FUSED:  # cut out of the fused decoder (export/fused_prompt.py)
        return (FusedDecoderSpec(checkpoint.language_model, checkpoint.model.lm_head, checkpoint.config.text_config),
                _encoder_layers(checkpoint, prompt_layer))
    if name not in OPTIONAL_MODULES:
        raise ExportError(f"unknown optional graph {name!r}: choose from {', '.join(onnx_graphs.OPTIONAL_EXPORTERS)}")
    return OPTIONAL_MODULES[name](checkpoint, prompt_layer).eval()


# -- weights shared through external data --------------------------------------------------------

def _raw(tensor: onnx.TensorProto, base: Path, sample: bool) -> bytes:
    """An initializer's stored bytes (all, or a sample of ends and middle when `sample`)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
        return data[:_SAMPLE] + data[len(data) // 2:len(data) // 2 + _SAMPLE] + data[-_SAMPLE:] if sample else data
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(base / info["location"], "rb") as f:
        if not sample or length <= 3 * _SAMPLE:
            f.seek(offset)
            return f.read(length)
        parts = []
        for at in (offset, offset + length // 2, offset + length - _SAMPLE):
            f.seek(at)
            parts.append(f.read(_SAMPLE))
        return b"".join(parts)


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def share_weights(new_path: Path, source_path: Path, min_share: float = 0.5) -> dict:
    """Point `new_path`'s initializers into `source_path`'s external data where type, shape and bytes agree
    (by content: the exporter folds transposed weights into initializers of arbitrary names). The weights found
    there leave the new graph (inline or in its own data file); the rest stay its own, its data file rewritten to
    hold only them (or removed). Raises when less than `min_share` of the new graph's weight bytes are found in
    the source (the graphs come from different checkpoints)."""
    base = new_path.parent
    new = onnx.load(str(new_path), load_external_data=False)
    source = onnx.load(str(source_path), load_external_data=False)
    sample = sum(_nbytes(t) for t in new.graph.initializer) > (1 << 31)  # above 2 GiB, compare samples of each

    def key(tensor, where):
        digest = hashlib.sha256(_raw(tensor, where, sample)).hexdigest()
        return tensor.data_type, tuple(tensor.dims), digest

    index = {key(t, source_path.parent): t for t in source.graph.initializer if _nbytes(t) >= _WEIGHT_BYTES}
    own = f"{new_path.name}.data"
    weight_bytes = matched_bytes = shared = shared_bytes = 0
    for tensor in new.graph.initializer:
        size = _nbytes(tensor)
        if size < _WEIGHT_BYTES:
            continue
        weight_bytes += size
        other = index.get(key(tensor, base))
        if other is None:
            continue
        matched_bytes += size
        if other.data_location == onnx.TensorProto.EXTERNAL:
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.external_data.extend(other.external_data)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            shared, shared_bytes = shared + 1, shared_bytes + size
    if weight_bytes and matched_bytes < min_share * weight_bytes:
        raise ExportError(f"only {matched_bytes / weight_bytes:.0%} of {new_path.name}'s weights are in "
                          f"{source_path.name}: the checkpoint is not the one this bundle was exported from")
    # What is left in the graph's own data file comes back inline; save_graph writes a fresh file if still large.
    for tensor in new.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and \
                {e.key: e.value for e in tensor.external_data}["location"] == own:
            tensor.raw_data = _raw(tensor, base, sample=False)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    (base / own).unlink(missing_ok=True)
    onnx_graphs.save_graph(new, new_path)
    return {"weight_bytes": weight_bytes, "found_in_source_bytes": matched_bytes, "shared_initializers": shared,
            "shared_bytes": shared_bytes, "compared": "sampled bytes" if sample else "all bytes"}


# -- manifest and files ---------------------------------------------------------------------------

def _entry_of_optional(name: str, out: Path, source: Path | None) -> Graph:
    if name == FUSED_DECODER:  # float: its weight pieces are the decoder's (export/fused.py pieces); else its own
        extra = fused_entry(out)
        if source is not None and source.exists():
            onnx_graphs.externalize(source)
            extra.update(shares_weights_with=source.stem, sharing=share_weights(out, source, min_share=0.0))
        return graph_entry(out, **extra)
    if name == PROMPT_ENCODER_FUSED:
        entry = fused_entry(out)
        return graph_entry(out, **{**entry, "flavour_of": PROMPT_ENCODER, "built_by": "export/fused_prompt.py (the "
                                   "fused decoder's first layers; weights packed, not shared with decoder)"})
    extra = dict(OPTIONAL_NOTES[name])
    if source is not None and source.exists():
        onnx_graphs.externalize(source)  # a decoder that kept its weights inline lends them from a side file
        extra["shares_weights_with"] = source.stem
        extra["sharing"] = share_weights(out, source)
    return graph_entry(out, **extra)


def _export_optional(name: str, module, out: Path, model_info: dict, source: Path | None) -> Graph:
    onnx_graphs.OPTIONAL_EXPORTERS[name](module, out, model_info)
    return _entry_of_optional(name, out, source)


@contextmanager
def _lending(decoder: Path, names):
    """The decoder's weights moved into decoder.onnx.data (when it kept them inline and a graph in `names` will
    share them); on failure the inline decoder comes back, so the bundle still matches its manifest. Yields the
    decoder's file names whose bytes changed."""
    if not any(n not in PACKED for n in names) or onnx_graphs.has_external_data(decoder):
        yield set()
        return
    backup = decoder.parent / f".{decoder.name}.inline"
    shutil.copyfile(decoder, backup)
    try:
        onnx_graphs.externalize(decoder)
        yield {decoder.name, f"{decoder.name}.data"}
    except BaseException:
        os.replace(backup, decoder)
        Path(f"{decoder}.data").unlink(missing_ok=True)
        raise
    finally:
        backup.unlink(missing_ok=True)


def _refuse_quantized(precision: str) -> None:
    if precision not in TORCH_DTYPES:
        raise ExportError(f"the decoder is {precision}: optional graphs are traced in fp32, fp16 or bf16 and hold the "
                          "decoder's float weights, which a quantized decoder cannot lend them; add them to an fp32 "
                          "or fp16 bundle of the checkpoint")


def _bundle_precision(manifest: Manifest, graphs=()) -> str:
    """The float dtype the optional graphs are built in. An int4/int8 bundle takes decoder_fused alone: built in
    fp32 (its decoder's activations), then quantized as its decoder is (export/fused_quant.py)."""
    precision = manifest.precision.graphs.get("decoder", manifest.precision.default)
    if precision in FUSED_WEIGHTS and graphs and set(graphs) <= {FUSED_DECODER}:
        return "fp32"
    _refuse_quantized(precision)
    return precision


def _build_precision(manifest: Manifest, graphs, weights: dict | None, fused_target: str) -> str:
    """_bundle_precision, except that a decoder_fused with MatMulNBits weights for the CPU is built in fp32 in an fp16
    bundle too: x86 CPUs have no fp16 arithmetic, so ONNX Runtime widens an fp16 graph's weights at load and runs
    a Cast around every float op (m20: 47 Casts a decode step), and MatMulNBits at accuracy level 4 quantizes fp32
    activations per block either way. Its inputs and outputs are then fp32 and the runtime casts at the boundary
    (runtimes/onnxruntime.py); the weights are quantized from the checkpoint's fp32 ones, the bytes an fp32 bundle's
    quantized decoder_fused holds."""
    precision = _bundle_precision(manifest, graphs)
    if weights and fused_target == "cpu" and precision in ("fp16", "bf16"):
        if set(graphs) != {FUSED_DECODER}:
            raise ExportError(f"a quantized {FUSED_DECODER} for the CPU is built in fp32, the other graphs in "
                              f"{precision}: add it in its own add-graphs call")
        return "fp32"
    return precision


def _check_names(graphs) -> None:
    for name in graphs:
        if name not in onnx_graphs.OPTIONAL_EXPORTERS:
            raise ExportError(f"unknown optional graph {name!r}: choose from {', '.join(onnx_graphs.OPTIONAL_EXPORTERS)}")


def _as_converted_fp16(checkpoint):
    """The checkpoint's float16 weights as the fp16 bundle's decoder holds them: onnxruntime's converter
    (convert_float_to_float16, export/precision/quantize.py) turns a value below float16's smallest subnormal into
    +-5.96e-8 where torch rounds it to 0, so optional graphs traced from torch's .half() weights missed the
    decoder's bytes for some matrices (m20: 4.3 MB carried twice). Loaded in float32, converted by the same
    function."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with torch.no_grad():
        for param in checkpoint.model.parameters():
            param.data = torch.from_numpy(convert_np_to_float16(param.data.float().numpy()))
        checkpoint.model.half()  # the buffers (rotary frequencies) as the .half() load would
    return checkpoint


def _checked_checkpoint(checkpoint_dir, manifest: Manifest, dtype: torch.dtype):
    checkpoint = load_checkpoint(checkpoint_dir, dtype=torch.float32 if dtype == torch.float16 else dtype)
    if dtype == torch.float16:
        checkpoint = _as_converted_fp16(checkpoint)
    model = manifest.model
    text = checkpoint.config.text_config
    got = (text.num_hidden_layers, text.num_key_value_heads, text.hidden_size, text.vocab_size)
    want = (model.num_layers, model.num_kv_heads, model.hidden_size, model.vocab_size)
    if got != want:
        raise ExportError(f"checkpoint {checkpoint_dir} has layers/KV heads/width/vocabulary {got} but the bundle "
                          f"was exported from one with {want}: pass the bundle's own checkpoint")
    return checkpoint


def export_optional_graph(checkpoint_dir, name: str, out_path, dtype: str = "fp32", device: str = "cpu",
                          prompt_layer: int = -1) -> Path:
    """Trace one optional graph alone (into a scratch directory), e.g. in parallel with the bundle's own
    export; attach_graphs then moves it into the bundle."""
    if name not in onnx_graphs.OPTIONAL_EXPORTERS:
        raise ExportError(f"unknown optional graph {name!r}: choose from {', '.join(onnx_graphs.OPTIONAL_EXPORTERS)}")
    checkpoint = load_checkpoint(checkpoint_dir, dtype=TORCH_DTYPES[dtype])
    checkpoint.model.to(device)
    text = checkpoint.config.text_config
    info = {"num_kv_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_graphs.OPTIONAL_EXPORTERS[name](optional_module(name, checkpoint, prompt_layer), out_path, info)
    return out_path


def attach_graphs(bundle_dir, exported: dict, verify: bool = True, referring_settings: dict | None = None,
                  quantized: dict | None = None) -> Path:
    """Move already exported optional graphs {name: path.onnx (+ path.onnx.data)} into a bundle: weights shared
    with the decoder's external data where equal, then the manifest (hashing only the new files). referring:
    settings of the referring variants over the defaults ({"controlmllm": {"lr": 100.0}}, sdk/manifest_referring.py).
    quantized: {name: export/fused_quant.py's record} of graphs whose weights were quantized after the export."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=verify)
    manifest = bundle.manifest
    quantized = quantized or {}
    precision = _bundle_precision(manifest, exported)
    decoder_file = bundle.graph_path("decoder")
    graphs, graph_precision, moved = dict(manifest.graphs), dict(manifest.precision.graphs), []
    details = dict(manifest.precision.details)
    with _lending(decoder_file, [n for n in exported if n not in quantized]) as changed:
        try:
            for name, path in exported.items():
                path, out = Path(path), bundle_dir / f"{name}.onnx"
                if path.name != out.name:  # the graph names its data file: the names must not change in the move
                    raise ExportError(f"export {name} as {name}.onnx (got {path.name})")
                for src, dst in ((path, out), (Path(f"{path}.data"), bundle_dir / f"{name}.onnx.data")):
                    dst.unlink(missing_ok=True)
                    if src.exists():
                        shutil.move(str(src), str(dst))
                        moved.append(dst)
                graphs[name] = _entry_of_optional(name, out, None if name in quantized else decoder_file)
                graph_precision[name] = quantized[name]["precision"] if name in quantized else precision
                if name in quantized:
                    details[name] = quantized[name]
                    graphs[name] = replace(graphs[name], extra={**graphs[name].extra, "weights": quantized[name]["precision"]})
        except BaseException:
            for path in moved:  # the manifest was not touched: leave no stray file either
                path.unlink(missing_ok=True)
            raise
        fresh = {p.name for p in moved} | changed
        known = {k: v for k, v in manifest.files.items() if k not in fresh}
        referring = manifest.referring
        if "energy_grad" in exported:
            referring = with_settings(defaults_for(manifest.model.num_layers), referring_settings or {}, ExportError)
        prompt_vector = manifest.prompt_vector
        if prompt_vector is not None and {PROMPT_ENCODER, PROMPT_ENCODER_FUSED} & set(exported):
            prompt_vector = replace(prompt_vector, encoder_layers=prompt_vector.layer + 1)
        write_manifest(bundle_dir, replace(manifest, graphs=graphs, files=file_records(bundle_dir, known),
                                           precision=replace(manifest.precision, graphs=graph_precision,
                                                             details=details),
                                           referring=referring, prompt_vector=prompt_vector))
    return bundle_dir


def add_graphs(bundle_dir, checkpoint_dir, graphs=("decoder_static",), device: str = "cpu",
               overwrite: bool = False, referring_settings: dict | None = None, fused_target: str = "cpu",
               fused_weights: str | None = None) -> Path:
    """Trace the optional `graphs` from the checkpoint the bundle was exported from and add them to the bundle
    (files first, the manifest last and atomically). decoder_fused: written for `fused_target` (export/fused.py
    FUSED_TARGETS), its weights `fused_weights` ('int4'/'int8'; None: as the bundle's decoder, export/fused_quant.py)."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=True)
    manifest = bundle.manifest
    weights = weight_settings(manifest, fused_weights) if FUSED_DECODER in graphs else None
    precision = _build_precision(manifest, graphs, weights, fused_target)
    _check_names(graphs)
    for name in graphs:
        if name in manifest.graphs and not overwrite:
            raise ExportError(f"bundle {bundle_dir} already has {name}: pass --overwrite to trace it again")
    checkpoint = _checked_checkpoint(checkpoint_dir, manifest, TORCH_DTYPES[precision])
    checkpoint.model.to(device)
    prompt_layer = manifest.prompt_vector.layer if manifest.prompt_vector is not None else -1
    cmai_layers = manifest.cmai.layers if manifest.cmai is not None else ()
    with tempfile.TemporaryDirectory(prefix=f".{bundle_dir.name}.graphs-", dir=bundle_dir.parent) as scratch:
        exported, quantized = {}, {}
        for name in graphs:
            out = Path(scratch) / f"{name}.onnx"
            module = optional_module(name, checkpoint, prompt_layer, cmai_layers, fused_target)
            if name == FUSED_DECODER:  # float weights as the decoder's own pieces, shared with it (export/fused.py)
                module.pieces = not weights
            if name == FUSED_DECODER and weights:  # quantized in memory, written once
                def rewrite(graph, name=name):
                    graph, record = quantize_fused(graph, weights)
                    quantized[name] = {**record, "activations": precision}
                    return graph
                onnx_graphs.export_decoder_fused(module, out, manifest.model.to_dict(), rewrite)
            else:
                onnx_graphs.OPTIONAL_EXPORTERS[name](module, out, manifest.model.to_dict())
            exported[name] = out
        # verified above
        return attach_graphs(bundle_dir, exported, verify=False, referring_settings=referring_settings,
                             quantized=quantized)


def export_with_graphs(checkpoint_dir, out_dir, graphs=("energy_grad",), referring_settings: dict | None = None,
                       overwrite: bool = False, device: str = "cpu", **export_args) -> Path:
    """export.writer.export_bundle (export_args: its arguments, any precision it offers), then add_graphs, published
    as one: out_dir appears with the optional graphs or not at all. The decoder's weights go to decoder.onnx.data,
    where energy_grad and decoder_static share them. int8 and int4 are refused before any work: their decoder has
    no float weights to lend."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    _check_names(graphs)
    _refuse_quantized(export_args.get("precision", "fp32"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.with-graphs-", dir=out_dir.parent) as scratch:
        staged = export_bundle(checkpoint_dir, Path(scratch) / "bundle", overwrite=True, **export_args)
        add_graphs(staged, checkpoint_dir, tuple(graphs), device=device, referring_settings=referring_settings)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staged, out_dir)
    return out_dir


# -- a whole bundle traced in half precision ------------------------------------------------------


def export_direct(checkpoint_dir, out_dir, prompt_mlp=None, no_prompt_mlp: bool = False, budget="full",
                  reducer: str = "pool", dtype: str = "fp16", device: str = "cpu",
                  graphs=("vision", "embed", "decoder", "decoder_static"), reuse=None, overwrite: bool = False,
                  chat_template: ChatTemplate | None = None, log=print) -> Path:
    """Write a bundle whose graphs are traced in `dtype` on `device`; `reuse` is a bundle of the same
    checkpoint (and prompt layer) whose budget-free graphs are hard-linked instead of traced again."""
    out_dir = Path(out_dir)
    if dtype not in TORCH_DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose {', '.join(TORCH_DTYPES)}")
    if (prompt_mlp is None) == (not no_prompt_mlp):
        raise ExportError("pass the prompt MLP (PIP-MM) or no_prompt_mlp=True (plain LLaVA), one of the two")
    torch_dtype = TORCH_DTYPES[dtype]
    start = time.perf_counter()
    with staged_bundle(out_dir, overwrite) as stage:
        checkpoint = load_checkpoint(checkpoint_dir, dtype=torch_dtype)
        checkpoint.model.to(device)
        mlp = PromptMLP.load(prompt_mlp).eval().to(device=device, dtype=torch_dtype) if prompt_mlp is not None else None
        modules = build_modules(checkpoint, mlp, budget=budget, reducer=reducer)
        manifest = build_manifest(checkpoint, modules, mlp, chat_template, precision=dtype)
        prompt_layer = mlp.config.prompt_layer if mlp is not None else -1
        log(f"loaded {checkpoint_dir} in {dtype} on {device} ({time.perf_counter() - start:.1f} s)")
        reused = load_bundle(reuse, verify=False) if reuse is not None else None
        if reused is not None and (replace(reused.manifest.model, pipmm=False) != replace(manifest.model, pipmm=False)
                                   or (reused.manifest.prompt_vector or PromptVector()).layer != prompt_layer):
            raise ExportError(f"bundle {reuse} is of another checkpoint or prompt layer: it cannot lend its graphs")
        entries, model_info = {}, manifest.model.to_dict()
        for name in graphs:
            step = time.perf_counter()
            path = stage.directory / f"{name}.onnx"
            if reused is not None and name in BUDGET_FREE and name in reused.graphs:
                entry = reused.graphs[name]
                for file in [entry.file] + [f for f in reused.manifest.files if f.startswith(entry.file + ".")]:
                    link_or_copy(reused.path / file, stage.directory / file)
                entries[name] = entry
                log(f"  {name}: linked from {reuse}")
                continue
            if name in onnx_graphs.EXPORTERS:
                onnx_graphs.EXPORTERS[name](modules[name], path, model_info)
                entries[name] = graph_entry(path)
            else:
                module = optional_module(name, checkpoint, prompt_layer,
                                         manifest.cmai.layers if manifest.cmai is not None else ())
                entries[name] = _export_optional(name, module, path, model_info, stage.directory / "decoder.onnx")
            log(f"  {name}: traced in {time.perf_counter() - step:.1f} s")
        method = f"traced in {dtype} (export/extra_graphs.py export_direct)"
        precision = Precision.uniform(dtype, graphs, tensorrt=True,
                                      details={name: {"precision": dtype, "method": method} for name in graphs})
        shutil.copyfile(checkpoint.tokenizer_file, stage.directory / manifest.tokenizer)
        step = time.perf_counter()
        referring = defaults_for(manifest.model.num_layers) if "energy_grad" in entries else None
        published = stage.publish(replace(manifest, graphs=entries, precision=precision, referring=referring),
                                  known=reused.manifest.files if reused is not None else None)
        log(f"  hashed {sum(f.bytes for f in published.files.values()) / 1e9:.2f} GB in "
            f"{time.perf_counter() - step:.1f} s")
    log(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir
