"""Tiny LLaVA checkpoints saved with transformers' LlavaProcessor in a given layout and chat template, and
transformers' own run of them (processor + apply_chat_template + greedy generate): the references of
tests/test_chat_template.py and tests/test_conversation.py."""

from __future__ import annotations

import json

import torch

from export.synthetic import build_tiny_llava

NEW_TOKENS = 32

# llava-hf/llava-1.5-7b-hf's template, as its chat_template.json holds it (one user turn + generation prompt).
LLAVA_15 = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
            "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
            "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
            "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type',"
            " 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# ChatML, as Qwen2-based LLaVA checkpoints (llava-interleave-qwen) write it.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
          "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
          "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral's [INST], with BOS written by the template itself (so the processor adds none).
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
           "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
           "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
           "{% endfor %} [/INST]{% else %}{{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}")

CASES = {
    # name: (text architecture, template, tokenizer adds BOS, extra special tokens, stop tokens, layout)
    "llama-bos-llava15": ("llama", LLAVA_15, True, [], [], "processor"),
    "llama-no-bos-llava15": ("llama", LLAVA_15, False, [], [], "processor"),
    "qwen2-chatml": ("qwen2", CHATML, False, ["<|im_start|>", "<|im_end|>"], ["<|im_end|>"], "processor"),
    "mistral-inst": ("mistral", MISTRAL, False, [], [], "processor"),
    "legacy-chat-template-json": ("llama", LLAVA_15, True, [], [], "legacy"),
    # llava-interleave-qwen's layout: SigLIP tower (no class token, strategy "full"), Qwen2, ChatML
    "siglip-qwen2-chatml": ("qwen2", CHATML, False, ["<|im_start|>", "<|im_end|>"], ["<|im_end|>"], "processor",
                            "siglip"),
}


def checkpoint(root, arch, template, bos, extra_tokens, stop_tokens, layout, tower="clip", seed=3):
    """A tiny checkpoint saved with transformers' LlavaProcessor in the given layout."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    path = build_tiny_llava(root, arch=arch, seed=seed, tower=tower)
    raw = json.loads((path / "tokenizer.json").read_text())
    if not bos:  # as many tokenizers saved with `tokenizers` are: no post-processor
        raw["post_processor"] = None
        (path / "tokenizer.json").write_text(json.dumps(raw))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    model = LlavaForConditionalGeneration.from_pretrained(path)
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens})
        model.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():  # resized rows as large as the rest, so greedy tokens stay well separated
            model.get_input_embeddings().weight[-len(extra_tokens):].normal_(0.0, 0.15)
            model.get_output_embeddings().weight[-len(extra_tokens):].normal_(0.0, 0.15)
    if stop_tokens:
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens] + [2]
    model.save_pretrained(path)
    class_token = tower == "clip"
    processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                               patch_size=4, vision_feature_select_strategy="default" if class_token else "full",
                               num_additional_image_tokens=int(class_token), chat_template=template)
    processor.save_pretrained(path)
    if layout == "legacy":  # the hub layout before chat_template.jinja: no processor_config.json either
        (path / "chat_template.jinja").unlink()
        (path / "processor_config.json").unlink(missing_ok=True)
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return path



def transformers_run(path, image, question=None, messages=None, new_tokens=NEW_TOKENS):
    """transformers' own run: processor + apply_chat_template, then greedy generate."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    if processor.patch_size is None:  # the legacy layout has no processor_config.json: its values by hand
        processor.patch_size, processor.vision_feature_select_strategy = 4, "default"
        processor.num_additional_image_tokens = 1
    if messages is None:
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                                 {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
