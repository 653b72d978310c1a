"""The LLM as two graphs: `embed` (ids -> embeddings) and `decoder` (one step, with KV cache).

decoder inputs:  inputs_embeds [B,T,D], attention_mask [B,P+T] (int64, 1 = attend),
                 position_ids [B,T] (int64), past_key_values.{i}.key/.value [B,H_kv,P,hd] per layer
decoder outputs: logits [B,V] (last position only: the only one generation reads),
                 hidden [B,T,D] (hidden state at the prompt-vector layer, every position),
                 present.{i}.key/.value [B,H_kv,P+T,hd]

Prefill is a call with P = 0 and the whole prompt; decode is a call with T = 1. The same graph
over the prompt alone (no image) is PIP-MM's prompt encoder, so the bundle holds the LLM once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


class EmbedGraph(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B,T] -> [B,T,D]


class DecoderGraph(nn.Module):
    def __init__(self, language_model: nn.Module, lm_head: nn.Module, text_config, prompt_layer: int = -1):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers
        self.prompt_layer = prompt_layer

    def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        # The cache object is rebuilt from flat tensors inside the traced function: the graph's
        # interface stays plain tensors, whatever cache class the transformers release uses.
        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, output_hidden_states=self.prompt_layer != -1,
        )
        last = out.last_hidden_state
        hidden = last if self.prompt_layer == -1 else out.hidden_states[self.prompt_layer + 1]
        logits = self.lm_head(last[:, -1]).float()
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, hidden, *present)
