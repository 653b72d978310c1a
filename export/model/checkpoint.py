"""Load and validate a LLaVA checkpoint directory: a CLIP vision tower (class token) or a SigLIP one (none), a
projector, and any decoder-only text model that transformers supports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from export.model.chat_template import load_tokenizer
from sdk.errors import ExportError

SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")  # export/model/vision.py TOWERS
TESTED_TEXT = ("llama", "mistral", "qwen2")  # verified token for token against transformers (tests/test_parity.py)


@dataclass
class Checkpoint:
    model: "torch.nn.Module"  # LlavaForConditionalGeneration, eval mode, fp32 unless asked
    path: Path
    tokenizer_file: Path
    eos_token_ids: list[int]

    @cached_property
    def tokenizer(self):
        """The tokenizer as transformers loads it (export/model/chat_template.py), read once per checkpoint."""
        return load_tokenizer(self.path)

    @property
    def config(self):
        return self.model.config

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def max_context(self) -> int:
        text = self.config.text_config
        limit = text.max_position_embeddings
        # A sliding-window cache would crop past keys and break the runtime's mask bookkeeping:
        # never let the context outgrow the window.
        window = getattr(text, "sliding_window", None)
        if window and getattr(text, "use_sliding_window", True) is not False:
            limit = min(limit, int(window))
        return int(limit)


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} has no config.json: pass a LlavaForConditionalGeneration checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except ValueError as err:
        raise ExportError(f"{config_file} is not valid JSON ({err})") from err


def validate_config(raw: dict, path: Path) -> None:
    """Refuse what the export cannot handle, naming what it supports."""
    model_type = raw.get("model_type")
    if model_type != "llava":
        raise ExportError(f"{path}: model_type {model_type!r} is not supported; "
                          "pipmm exports LlavaForConditionalGeneration checkpoints (model_type 'llava')")
    vision_type = raw.get("vision_config", {}).get("model_type", "clip_vision_model")
    if vision_type not in SUPPORTED_VISION:
        raise ExportError(f"{path}: vision tower {vision_type!r} is not supported; pipmm exports "
                          f"{', '.join(SUPPORTED_VISION)} towers")
    text_type = raw.get("text_config", {}).get("model_type", "llama")
    if text_type not in _causal_lm_types():
        raise ExportError(f"{path}: text model {text_type!r} is not a decoder-only model transformers can load "
                          f"for causal LM; pipmm exports decoder-only text models (tested: {', '.join(TESTED_TEXT)})")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ExportError(f"{path}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def weights_sha256(path: str | Path) -> str:
    """One digest of a checkpoint's weights: model.safetensors' sha256, or for a sharded checkpoint (m20's
    model-0000k-of-0000n.safetensors) the sha256 of its shards' names and digests in order."""
    import hashlib

    from sdk.bundle import sha256_file

    shards = sorted(Path(path).glob("model*.safetensors"))
    if not shards:
        raise ExportError(f"{path} has no model*.safetensors")
    if len(shards) == 1:
        return sha256_file(shards[0])
    return hashlib.sha256("".join(f"{s.name}:{sha256_file(s)}\n" for s in shards).encode()).hexdigest()


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint directory {path} does not exist")
    validate_config(_read_config(path), path)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"{path} has no tokenizer.json: save the fast tokenizer beside the weights")
    try:
        # safetensors only: nothing is ever unpickled.
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                              attn_implementation="eager")
    except Exception as err:  # OSError, ValueError, SafetensorError (truncated file), RuntimeError (shape mismatch)
        first = " ".join(str(err).split())[:300]
        raise ExportError(f"cannot load {path} as a LLaVA checkpoint with safetensors weights "
                          f"({type(err).__name__}: {first}): check that config.json matches model.safetensors") from err
    model.eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    return Checkpoint(model=model, path=path, tokenizer_file=tokenizer_file, eos_token_ids=eos_ids)
