"""Random LLaVA checkpoints built from transformers configs: the test suite's tiny models and the GPU
measurements' real shapes, with one small byte-level BPE tokenizer.

    build_tiny_llava("/tmp/ckpt", arch="llama")                              # tests: seconds on a CPU
    build_tiny_llava("/tmp/ckpt", arch="qwen2", tower="siglip")             # llava-interleave-qwen's layout
    build_random_checkpoint("/tmp/ckpt-7b", "llava-1.5-7b", device="cuda")   # CLIP ViT-L/14-336 + Llama-7B, FP16
    build_random_checkpoint("/tmp/ckpt-edge", "edge-0.5b", device="cuda")    # CLIP ViT-B/16-224 + Qwen2-0.5B

Same classes and file layout as a real llava-1.5 checkpoint (config.json, safetensors weights,
tokenizer.json, preprocessor_config.json), so export and transformers read them as they would
llava-1.5-7b-hf. Tiny text backbones: Llama, Mistral, Qwen2, all with grouped-query attention.
Real-shape weights are transformers' own initialisation, made on the device (seconds, where a CPU
takes minutes); speed and memory do not depend on their values. Their text vocabulary is the real
one (rows beyond the tokenizer's are never looked up by a prompt, but generated tokens may use them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sdk.preprocess import clip_processor_config, siglip_processor_config

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
BOS, EOS, PAD = 1, 2, 3

WORDS = ("what is the color of shape red green blue yellow circle square triangle star left right "
         "top bottom center how many are there in picture image describe scene a an one two three "
         "yes no above below small large object label read next to").split()

TEXT_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
TEXT_ARCHS = tuple(TEXT_CONFIGS)
# Per architecture, the keyword that switches sliding-window attention off (full attention like Llama).
NO_SLIDING_WINDOW = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}

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
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    },
    # small enough for a CPU: checks the measurement scripts themselves (scripts/gpu_measure.py --device cpu)
    "ci-tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=14, projection_dim=64, hidden_act="quick_gelu"),
        "text": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                     rms_norm_eps=1e-6, tie_word_embeddings=True),
    },
}
# llava-1.5-7b's widths with 2 text and 2 vision layers: the 7B-width export paths (external data, shared weights,
# packed and MatMulNBits weights) and their cost per layer on a CPU (scripts/gpu_speed.py --device cpu)
PRESETS["llava-1.5-7b-2l"] = {part: {**fields, "num_hidden_layers": 2}
                              for part, fields in PRESETS["llava-1.5-7b"].items()}


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_bos: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer trained with the `tokenizers` library (any input text is encodable).
    add_bos: its post-processor adds <s> (what transformers' processor then adds, and so the bundle)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if add_bos:  # as Llama's tokenizer: encode(..., add_special_tokens=True) starts every text with <s>
        bos = SPECIAL_TOKENS[BOS]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, BOS)])
    return tokenizer


def word_corpus(n: int = 400):
    """n random eight-word questions over WORDS (seeded): the synthetic checkpoints' tokenizer corpus."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randint(len(WORDS), (8,), generator=g).tolist()
        yield " ".join(WORDS[i] for i in idx) + "?"


# ----------------------------------------------------------------------------- checkpoint pieces

def text_config(model_type: str, **fields):
    """A transformers text config of `model_type` (TEXT_ARCHS), full attention, our special token ids."""
    import transformers

    cls = getattr(transformers, TEXT_CONFIGS[model_type])
    return cls(**fields, **NO_SLIDING_WINDOW[model_type], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


# Per vision tower: transformers' config class, LLaVA's feature layer and select strategy, the image processor.
# SigLIP as llava-hf/llava-interleave-qwen-0.5b-hf: no class token, last layer, strategy "full".
TOWER_LAYOUTS = {
    "clip": ("CLIPVisionConfig", -2, "default", clip_processor_config),
    "siglip": ("SiglipVisionConfig", -1, "full", siglip_processor_config),
}


def llava_config(vision: dict, text, image_token: int, tower: str = "clip", **fields):
    import transformers

    config_class, feature_layer, strategy, _ = TOWER_LAYOUTS[tower]
    if tower != "clip":
        vision = {k: v for k, v in vision.items() if k != "projection_dim"}
    vision_config = getattr(transformers, config_class)(**vision)
    return transformers.LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=image_token,
                                    vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                    image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                                    **fields)


def save_checkpoint(model, tokenizer: Tokenizer, out_dir: Path, tower: str = "clip", **save_options) -> Path:
    """Weights, tokenizer, preprocessor and special tokens: the files `pipmm export` and transformers read."""
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(out_dir, safe_serialization=True, **save_options)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    image_size = model.config.vision_config.image_size
    processor_config = TOWER_LAYOUTS[tower][3](image_size)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    (out_dir / "special_tokens.json").write_text(json.dumps(SPECIAL_TOKENS) + "\n")
    return out_dir


# ----------------------------------------------------------------------------- builders

def build_tiny_llava(out_dir: str | Path, arch: str = "llama", seed: int = 0, image_size: int = 28,
                     patch_size: int = 4, vision_hidden: int = 32, text_hidden: int = 64, tower: str = "clip",
                     text_layers: int = 2) -> Path:
    """Write a tiny random LlavaForConditionalGeneration checkpoint directory and return its path.
    tower: "clip" (class token, feature layer -2, strategy "default") or "siglip" (TOWER_LAYOUTS)."""
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(word_corpus(), vocab_size=320)
    text = text_config(arch, vocab_size=tokenizer.get_vocab_size(), hidden_size=text_hidden,
                       intermediate_size=2 * text_hidden, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=3,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    config = llava_config(vision, text, tokenizer.token_to_id("<image>"), tower=tower)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init has tiny weights; larger ones make logits (and so greedy tokens) well separated.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    return save_checkpoint(model, tokenizer, out_dir, tower=tower)


def build_random_checkpoint(out_dir, preset: str = "llava-1.5-7b", dtype: torch.dtype = torch.float16,
                            device: str = "cuda", seed: int = 0) -> Path:
    """A PRESETS-shaped checkpoint with transformers' own initialisation, built on `device`."""
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = PRESETS[preset]
    tokenizer = train_tokenizer(word_corpus(), vocab_size=320)
    text = dict(spec["text"])
    config = llava_config(spec["vision"], text_config(text.pop("model_type"), **text),
                          tokenizer.token_to_id("<image>"), projector_hidden_act="gelu")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    save_checkpoint(model, tokenizer, out_dir, max_shard_size="4GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir


def build_random_prompt_mlp(checkpoint_dir: str | Path, out_dir: str | Path, seed: int = 0, prompt_layer: int = -1,
                            std: float | None = 0.3) -> Path:
    """A random prompt MLP matching a checkpoint's widths (tests, timing). std: normal weights of that
    spread (well-separated outputs for parity tests); None keeps PyTorch's default initialisation."""
    from transformers import LlavaConfig

    from export.model.prompt import PromptMLP, PromptMLPConfig

    config = LlavaConfig.from_pretrained(checkpoint_dir)
    torch.manual_seed(seed)
    mlp = PromptMLP(PromptMLPConfig(d_llm=config.text_config.hidden_size, d_vit=config.vision_config.hidden_size,
                                    prompt_layer=prompt_layer))
    if std is not None:
        with torch.no_grad():
            for param in mlp.parameters():
                param.normal_(0.0, std)
    return mlp.save(out_dir)
