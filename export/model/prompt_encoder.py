"""`prompt_encoder`: PIP-MM's prompt pass as its own graph of only the layers the prompt vector needs.

    inputs_embeds [B,T,D], attention_mask [B,T] (int64, 1 = attend), position_ids [B,T] (int64)
      --decoder layers 0..L-1 of the checkpoint's own language model, no final norm, no cache, no lm_head-->
    hidden [B,T,D] = transformers' hidden_states[L] = the decoder graph's `hidden` when prompt_layer = L - 1

The prompt vector of prompt_layer k >= 0 is the output of decoder layer k (export/model/prompt.py), so it
needs L = k + 1 layers; prompt_layer -1 (the last layer, normed) needs them all, and then the decoder graph
itself is the prompt encoder (no extra graph). With k = 1 of a 4-layer LLM the pass costs about half.

The module runs transformers' own forward over a shallow copy of the language model whose layer list holds
the first L layers and whose final norm is the identity (the same parameter objects: initializer names are
the decoder's), so masks and rotary stay transformers' for every architecture it runs. Same inputs as the
decoder minus the cache, so a runtime feeds it as it feeds a prefill; `prompt_encoder_fused` (export/fused_prompt.py)
is the ONNX Runtime contrib-op flavour with the same inputs and output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sdk.errors import ExportError

PROMPT_ENCODER = "prompt_encoder"


def encoder_layers(prompt_layer: int, num_layers: int) -> int | None:
    """Decoder layers the prompt vector of `prompt_layer` needs, or None when that is all of them (no graph)."""
    if prompt_layer == -1:
        return None
    if not 0 <= prompt_layer < num_layers:
        raise ExportError(f"prompt layer {prompt_layer} is outside the decoder's {num_layers} layers (-1 = last, normed)")
    return prompt_layer + 1 if prompt_layer + 1 < num_layers else None


class PromptEncoderGraph(nn.Module):
    def __init__(self, language_model: nn.Module, text_config, layers: int):
        super().__init__()
        if not 1 <= layers <= text_config.num_hidden_layers:
            raise ExportError(f"a prompt encoder of {layers} layers: the decoder has {text_config.num_hidden_layers}")
        truncated = copy.copy(language_model)
        truncated._modules = dict(language_model._modules)  # copy.copy shares the dict: keep the original intact
        truncated.layers = nn.ModuleList(list(language_model.layers)[:layers])
        truncated.norm = nn.Identity()  # hidden_states[L] for L < num_layers is un-normed in transformers
        truncated.config = copy.copy(language_model.config)
        truncated.config.num_hidden_layers = layers
        if getattr(truncated.config, "layer_types", None):
            truncated.config.layer_types = list(truncated.config.layer_types)[:layers]
        self.language_model = truncated  # same attribute name as DecoderGraph: the same initializer names
        self.text_config = text_config
        self.num_layers = layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # [B,T,D]
