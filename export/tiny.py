"""Tiny random LLaVA checkpoints built from transformers configs: the test suite's models.

Same classes and file layout as a real llava-1.5 checkpoint (config.json, safetensors weights,
tokenizer.json, preprocessor_config.json), only small, so the whole pipeline runs in seconds
on a CPU. Text backbones: Llama, Mistral, Qwen2, all with grouped-query attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import SPECIAL_TOKENS, train_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = ("what is the color of shape red green blue yellow circle square triangle star left right "
          "top bottom center how many are there in picture image describe scene a an one two three "
          "yes no above below small large object label read next to").split()


def _corpus(n: int = 400):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randint(len(_WORDS), (8,), generator=g).tolist()
        yield " ".join(_WORDS[i] for i in idx) + "?"


def text_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, use_sliding_window=False),
    }
    return configs[arch]()


TEXT_ARCHS = ("llama", "mistral", "qwen2")


def build_tiny_llava(out_dir: str | Path, arch: str = "llama", seed: int = 0, image_size: int = 28,
                     patch_size: int = 4, vision_hidden: int = 32, text_hidden: int = 64) -> Path:
    """Write a random LlavaForConditionalGeneration checkpoint directory and return its path."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_corpus(), vocab_size=320)
    vocab_size = tokenizer.get_vocab_size()
    image_token = tokenizer.token_to_id("<image>")
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=3,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=text_config(arch, vocab_size, hidden=text_hidden),
                         image_token_index=image_token, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init has tiny weights; larger ones make logits (and so greedy tokens) well separated.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True}, indent=2) + "\n")
    (out_dir / "special_tokens.json").write_text(json.dumps(SPECIAL_TOKENS) + "\n")
    return out_dir


def build_random_prompt_mlp(checkpoint_dir: str | Path, out_dir: str | Path, seed: int = 0, prompt_layer: int = -1):
    """A random prompt MLP matching a checkpoint's widths (tests; before training exists)."""
    from transformers import LlavaConfig

    from .prompt import PromptMLP, PromptMLPConfig

    config = LlavaConfig.from_pretrained(checkpoint_dir)
    torch.manual_seed(seed)
    mlp = PromptMLP(PromptMLPConfig(d_llm=config.text_config.hidden_size, d_vit=config.vision_config.hidden_size,
                                    prompt_layer=prompt_layer))
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0.0, 0.3)
    return mlp.save(out_dir)
