"""Random-weight LLaVA checkpoints of real shapes, built on a GPU: what the GPU measurements run on.

    build_random_checkpoint("/tmp/ckpt-7b", "llava-1.5-7b", device="cuda")   # CLIP ViT-L/14-336 + Llama-7B, FP16
    build_random_checkpoint("/tmp/ckpt-edge", "edge-0.5b", device="cuda")    # CLIP ViT-B/16-224 + Qwen2-0.5B

Same classes and file layout as a real checkpoint (config.json, safetensors shards, tokenizer.json,
preprocessor_config.json), so export and transformers read them as they would llava-1.5-7b-hf. Weights are
transformers' own initialisation (normal, std = initializer_range), made on the device (seconds, where a
CPU takes minutes); speed and memory do not depend on their values. The tokenizer is the test suite's small
byte-level BPE (export/tokenizer.py): the text vocabulary of the model is the real one (rows beyond the
tokenizer's are never looked up by a prompt, but generated tokens may use them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import CLIP_MEAN, CLIP_STD, _corpus
from .tokenizer import SPECIAL_TOKENS, train_tokenizer

PRESETS = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (577 positions, feature layer -2), 2-layer GELU projector,
    # Llama-2-7B-shaped text model (32 layers, 4096 wide, 32 heads, no GQA), vocabulary 32064, context 4096.
    "llava-1.5-7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        "text": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, tie_word_embeddings=False),
    },
    # an edge-class shape: CLIP ViT-B/16 at 224 px (196 patches) + a Qwen2-0.5B-shaped text model (24 layers,
    # 896 wide, 14 heads over 2 KV heads, vocabulary 151936, tied embeddings); context capped at 4096.
    "edge-0.5b": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
        "text": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
    },
    # small enough for a CPU: checks the measurement scripts themselves (scripts/gpu_measure.py --device cpu)
    "ci-tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=14, projection_dim=64, hidden_act="quick_gelu"),
        "text": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    },
}


def _text_config(spec: dict):
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(spec)
    kind = spec.pop("model_type")
    common = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**spec, **common)


def build_random_checkpoint(out_dir, preset: str = "llava-1.5-7b", dtype: torch.dtype = torch.float16,
                            device: str = "cuda", seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = PRESETS[preset]
    tokenizer = train_tokenizer(_corpus(), vocab_size=320)
    vision = CLIPVisionConfig(**spec["vision"])
    config = LlavaConfig(vision_config=vision, text_config=_text_config(spec["text"]),
                         image_token_index=tokenizer.token_to_id("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="4GB")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    size = vision.image_size
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True}, indent=2) + "\n")
    (out_dir / "special_tokens.json").write_text(json.dumps(SPECIAL_TOKENS) + "\n")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir


def build_random_prompt_mlp(checkpoint_dir, out_dir, seed: int = 1) -> Path:
    """A prompt MLP of the checkpoint's widths with PyTorch's default initialisation (timing only)."""
    from transformers import LlavaConfig

    from .prompt import PromptMLP, PromptMLPConfig

    config = LlavaConfig.from_pretrained(checkpoint_dir)
    torch.manual_seed(seed)
    mlp = PromptMLP(PromptMLPConfig(d_llm=config.text_config.hidden_size, d_vit=config.vision_config.hidden_size))
    return mlp.save(out_dir)
