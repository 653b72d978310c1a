"""Write a bundle: trace the graphs, copy the tokenizer, publish the manifest with every file's sha256.

Everything is written through sdk.bundle.staged_bundle (a temporary sibling directory renamed into
place at the end), so an interrupted export never leaves a half-written bundle that loads.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import sdk
from sdk.bundle import refuse_existing, staged_bundle
from sdk.errors import ExportError
from sdk.manifest import (ChatTemplate, Cmai, Created, Graph, Manifest, Model, Precision, PromptMlp, PromptVector,
                          SpecialTokens, Vision, VisualTokens)

from export import onnx_graphs
from export.model.chat_template import conversation_format, prefill_prefix, save_tokenizer
from export.model.checkpoint import Checkpoint, load_checkpoint
from export.model.decoder import DecoderGraph, EmbedGraph, cmai_settings
from export.model.prompt import PromptMLP
from export.model.prompt_encoder import PROMPT_ENCODER, PromptEncoderGraph, encoder_layers
from export.model.reducers import FullReducer, visual_positions_for
from export.model.vision import PipmmVision, vision_config_from
from export.precision import calibration, quantize


# The prompt_encoder's manifest entry (its layer count is prompt_vector.encoder_layers).
PROMPT_ENCODER_NOTE = {"for": "PIP-MM's prompt pass: the first prompt_vector.encoder_layers decoder layers "
                              "(export/model/prompt_encoder.py)"}


def _progress(steps: list[str], enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return iter(steps), lambda *_: None
    bar = tqdm(steps, desc="export", unit="graph")
    return iter(bar), bar.set_postfix_str


def graph_entry(path: Path, **optional) -> Graph:
    """The manifest's entry of a graph file just written (names, dtypes, shapes, opset read back from it)."""
    return Graph.from_dict({"file": path.name, **onnx_graphs.describe_graph(path), **optional}, path.stem, str(path))


def created() -> Created:
    return Created(by=f"pipmm-edge {sdk.__version__}", torch=torch.__version__,
                   time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def build_modules(checkpoint: Checkpoint, prompt_mlp: PromptMLP | None, budget="full", reducer="pool",
                  reducer_options: dict | None = None, cmai: dict | None = None) -> dict:
    """The torch modules that become the graphs (also the PyTorch reference backend's modules).

    cmai: CMAI settings (export.model.decoder.cmai_settings; None = defaults, {"layers": "none"} = without)."""
    model, config = checkpoint.model, checkpoint.config
    vision_cfg = vision_config_from(config, budget=budget, reducer=reducer, options=reducer_options,
                                    pipmm=prompt_mlp is not None)
    prompt_layer = prompt_mlp.config.prompt_layer if prompt_mlp is not None else -1
    cmai = cmai_settings(config.text_config.num_hidden_layers, cmai)
    modules = {
        "vision": PipmmVision(model.model.vision_tower, model.model.multi_modal_projector, vision_cfg, prompt_mlp).eval(),
        "embed": EmbedGraph(model.get_input_embeddings()).eval(),
        "decoder": DecoderGraph(checkpoint.language_model, model.lm_head, config.text_config, prompt_layer,
                                cmai).eval(),
    }
    # A prompt vector from layer k < last needs only layers 0..k: their own graph (export/model/prompt_encoder.py).
    layers = encoder_layers(prompt_layer, config.text_config.num_hidden_layers) if prompt_mlp is not None else None
    if layers is not None:
        modules[PROMPT_ENCODER] = PromptEncoderGraph(checkpoint.language_model, config.text_config, layers).eval()
    return modules


def _preprocessing(checkpoint: Checkpoint, image_size: int) -> dict:
    from sdk.preprocess import config_from_processor

    file = checkpoint.path / "preprocessor_config.json"
    raw = json.loads(file.read_text()) if file.is_file() else {
        "size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return config_from_processor(raw)


def _special_tokens(checkpoint: Checkpoint, tokenizer_json: dict) -> SpecialTokens:
    text = checkpoint.config.text_config
    bos = checkpoint.model.generation_config.bos_token_id
    pad = checkpoint.model.generation_config.pad_token_id
    return SpecialTokens(
        bos=bos if bos is not None else text.bos_token_id,
        eos=list(checkpoint.eos_token_ids),
        pad=pad if pad is not None else text.pad_token_id,
        image=checkpoint.config.image_token_index,
        # Every added special token's text: user prompts are stripped of these (no injected turns or image slots).
        texts=sorted(t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")),
    )


def build_manifest(checkpoint: Checkpoint, modules: dict, prompt_mlp: PromptMLP | None,
                   chat_template: ChatTemplate | None = None, precision: str = "fp32",
                   visual_positions: str | None = None) -> Manifest:
    """Everything but `graphs` and `files`, which the staged writer fills in (the torch reference uses it as is)."""
    text = checkpoint.config.text_config
    vision = modules["vision"].config
    reducer = type(modules["vision"].reducer)  # FullReducer at full budget
    # With the class token leading the visual tokens (select strategy "full") it has no patch to sit at.
    class_leads = vision.select_strategy == "full" and vision.class_token
    reducer_positions = visual_positions_for(FullReducer if class_leads else reducer, visual_positions)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tokenizer_json = json.loads(checkpoint.tokenizer_file.read_text())
    source = str(checkpoint.path)
    chat_template = chat_template or ChatTemplate.from_dict(
        conversation_format(checkpoint.path, checkpoint.tokenizer).manifest_entry(), source)
    encoder = modules.get(PROMPT_ENCODER)
    return Manifest(
        created=created(),
        model=Model(source=checkpoint.path.name, text_architecture=text.model_type,
                    num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads, head_dim=head_dim,
                    hidden_size=text.hidden_size, vocab_size=text.vocab_size, max_context=checkpoint.max_context,
                    vision_hidden_size=checkpoint.config.vision_config.hidden_size, pipmm=prompt_mlp is not None),
        precision=Precision.uniform(precision, [*onnx_graphs.EXPORTERS, *([PROMPT_ENCODER] if encoder else [])]),
        vision=Vision.from_dict(vision.to_dict(), source),
        visual_tokens=VisualTokens(budget=vision.budget, count=vision.num_tokens + class_leads,
                                   reducer=reducer.name, positions=reducer_positions),
        prompt_vector=None if prompt_mlp is None else PromptVector(
            layer=prompt_mlp.config.prompt_layer, pooling=prompt_mlp.config.pooling, conversation="first-question",
            encoder_layers=encoder.num_layers if encoder is not None else None,
            prefill_prefix=prefill_prefix(chat_template, checkpoint.tokenizer) or None),
        prompt_mlp=None if prompt_mlp is None else PromptMlp.from_dict(vars(prompt_mlp.config).copy(), source),
        image_preprocessing=_preprocessing(checkpoint, vision.image_size),
        chat_template=chat_template,
        special_tokens=_special_tokens(checkpoint, tokenizer_json),
        # CMAI (docs/vmtc-cmai.md): the decoder's image_bias input and attention output, the layers they act at
        # and the runtime's settings; None: the decoder has neither.
        cmai=None if modules["decoder"].cmai is None else Cmai.from_dict(modules["decoder"].cmai, source),
    )


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, prompt_mlp: str | Path | None = None,
                  no_prompt_mlp: bool = False, budget: str | int = "full", reducer: str = "pool",
                  chat_template: ChatTemplate | None = None, overwrite: bool = False, progress: bool = True,
                  precision: str = "fp32", visual_positions: str | None = None, reducer_options: dict | None = None,
                  cmai: dict | None = None, **quantize_options) -> Path:
    """quantize_options (precision other than fp32): calibration_set, calibration_size, block_size,
    int8_decoder, keep_fp32_ops, int8_vision; see export.precision.quantize.quantize_bundle."""
    out_dir = Path(out_dir)
    if precision != "fp32":
        return _export_quantized(checkpoint_dir, out_dir, precision, quantize_options, overwrite, progress,
                                 prompt_mlp=prompt_mlp, no_prompt_mlp=no_prompt_mlp, budget=budget, reducer=reducer,
                                 chat_template=chat_template, visual_positions=visual_positions,
                                 reducer_options=reducer_options, cmai=cmai)
    if quantize_options:
        raise ExportError(f"{', '.join(sorted(quantize_options))} only apply to --precision fp16, int8 or int4")
    if prompt_mlp is None and not no_prompt_mlp:
        raise ExportError("a PIP-MM export needs the trained prompt MLP: pass --prompt-mlp FILE "
                          "(or --no-prompt-mlp for a plain LLaVA bundle)")
    if prompt_mlp is not None and no_prompt_mlp:
        raise ExportError("--prompt-mlp and --no-prompt-mlp contradict each other: pass one")
    with staged_bundle(out_dir, overwrite) as stage:
        checkpoint = load_checkpoint(checkpoint_dir)
        mlp = PromptMLP.load(prompt_mlp).eval() if prompt_mlp is not None else None
        if mlp is not None:
            want = (checkpoint.config.text_config.hidden_size, checkpoint.config.vision_config.hidden_size)
            if (mlp.config.d_llm, mlp.config.d_vit) != want:
                raise ExportError(f"prompt MLP maps {mlp.config.d_llm}->{mlp.config.d_vit} but the checkpoint needs "
                                  f"{want[0]}->{want[1]}: it was trained for another checkpoint")
        modules = build_modules(checkpoint, mlp, budget=budget, reducer=reducer, reducer_options=reducer_options,
                                cmai=cmai)
        manifest = build_manifest(checkpoint, modules, mlp, chat_template, visual_positions=visual_positions)
        graphs = {}
        exporters = {**onnx_graphs.EXPORTERS, **{name: onnx_graphs.OPTIONAL_EXPORTERS[name] for name in modules
                                                 if name not in onnx_graphs.EXPORTERS}}
        steps, note = _progress(list(exporters), progress)
        for name in steps:
            note(name)
            path = stage.directory / f"{name}.onnx"
            exporters[name](modules[name], path, manifest.model.to_dict())
            graphs[name] = graph_entry(path, **(PROMPT_ENCODER_NOTE if name == PROMPT_ENCODER else {}))
        save_tokenizer(checkpoint.tokenizer, stage.directory / manifest.tokenizer)  # as transformers runs it
        stage.publish(replace(manifest, graphs=graphs))
    return out_dir


def _export_quantized(checkpoint_dir, out_dir: Path, precision: str, options: dict, overwrite: bool, progress: bool,
                      **export_args) -> Path:
    """Check the precision options and read the calibration set first (errors before any work or write), export
    FP32 into a hidden sibling, derive `precision` from it into out_dir, drop the FP32 copy."""
    options = dict(options)
    refuse_existing(out_dir, overwrite)
    quantize.check_options(precision, options.get("block_size", quantize.DEFAULT_BLOCK_SIZE),
                           options.get("int8_decoder", quantize.DEFAULT_INT8_DECODER), options.get("keep_fp32_ops"),
                           options.get("calibration_set"), options.get("int8_vision", False))
    if quantize.needs_calibration(precision, options.get("int8_decoder", quantize.DEFAULT_INT8_DECODER),
                                  options.get("int8_vision", False)):
        options["pairs"] = calibration.load_pairs(options.pop("calibration_set", None),
                                                  options.pop("calibration_size", calibration.DEFAULT_SIZE))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.fp32-", dir=out_dir.parent) as scratch:
        fp32 = export_bundle(checkpoint_dir, Path(scratch) / "fp32", overwrite=True, progress=progress, **export_args)
        return quantize.quantize_bundle(fp32, out_dir, precision, overwrite=overwrite, progress=progress, **options)
