"""The LLM as two graphs: `embed` (ids -> embeddings) and `decoder` (one step, with KV cache).

decoder inputs:  inputs_embeds [B,T,D], attention_mask [B,P+T] (int64, 1 = attend),
                 position_ids [B,T] (int64), past_key_values.{i}.key/.value [B,H_kv,P,hd] per layer
decoder outputs: logits [B,V] (last position only: the only one generation reads),
                 hidden [B,T,D] (hidden state at the prompt-vector layer, every position),
                 present.{i}.key/.value [B,H_kv,P+T,hd]

Prefill is a call with P = 0 and the whole prompt; decode is a call with T = 1. The same graph
over the prompt alone (no image) is PIP-MM's prompt encoder, so the bundle holds the LLM once.

`decoder_static` (optional, `StaticDecoderGraph`) is the same weights over a preallocated cache of
S slots, for GPU runtimes: shapes that do not grow per token, so decode can be a captured CUDA graph.

decoder_static inputs:  inputs_embeds [B,T,D], attention_mask [B,S] (1 = the slot holds a token),
                        position_ids [B,T] (slot = position: token t is written to slot position_ids[b,t]),
                        past_key_values.{i}.key/.value [B,H_kv,S,hd]
decoder_static outputs: logits [B,V], hidden [B,T,D],
                        present.{i}.key/.value [B,H_kv,S,hd] = past with the T new slots written (ScatterElements
                        straight into the output, so a runtime may bind present to the same buffer as past:
                        ONNX Runtime's CUDA and CPU scatter kernels skip their copy when input is output)
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoderGraph(nn.Module):
    """The decoder over a static cache, written from the checkpoint's own submodules (like vision.py's
    CLIP layers): transformers' cache classes and mask helpers change between releases, this does not.

    Llama-family layers (Llama, Mistral, Qwen2): pre-norm attention with rotary embeddings and grouped
    KV heads, pre-norm MLP. Attention is plain eager attention, softmax in float32, as transformers'
    eager path; the KV heads are not repeated: the query heads of a group are folded into its rows, so
    no copy of the whole cache is made per step.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, text_config, prompt_layer: int = -1):
        super().__init__()
        self.language_model = language_model  # same attribute names as DecoderGraph: same initializer names
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers
        self.prompt_layer = prompt_layer
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads

    def _attention(self, attn, x, cos, sin, bias, index, past_k, past_v):
        b, t, _ = x.shape
        hd, hkv, rep = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
        q = attn.q_proj(x).view(b, t, self.num_heads, hd).transpose(1, 2)  # [B,H,T,hd]
        k = attn.k_proj(x).view(b, t, hkv, hd).transpose(1, 2)  # [B,Hkv,T,hd]
        v = attn.v_proj(x).view(b, t, hkv, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys = past_k.scatter(2, index, k)  # [B,Hkv,S,hd]: slots position_ids := the new keys
        values = past_v.scatter(2, index, v)
        # Query head h reads KV head h // rep (transformers' repeat_kv): fold the rep heads into rows.
        s = keys.shape[2]
        scores = torch.matmul(q.reshape(b, hkv, rep * t, hd), keys.transpose(2, 3)) * (hd ** -0.5)
        scores = scores.view(b, hkv, rep, t, s) + bias  # bias [B,1,1,T,S]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, hkv, rep * t, s)
        out = torch.matmul(probs, values).view(b, self.num_heads, t, hd).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(out), keys, values

    def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        lm = self.language_model
        b, t, _ = inputs_embeds.shape
        s = past[0].shape[2]
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids)  # [B,T,hd] each
        # Token t may attend to slot j when j <= its position and the slot holds a token.
        slots = torch.arange(s, device=inputs_embeds.device)
        allowed = (slots.view(1, 1, s) <= position_ids.unsqueeze(-1)) & attention_mask.unsqueeze(1).bool()  # [B,T,S]
        bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min).view(b, 1, 1, t, s)
        index = position_ids.view(b, 1, t, 1).expand(b, self.num_kv_heads, t, self.head_dim)
        hidden = inputs_embeds
        states = [hidden]  # transformers' hidden_states: embeddings, then each layer's output
        present = []
        for i, layer in enumerate(lm.layers[: self.num_layers]):
            out, keys, values = self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, bias, index,
                                                 past[2 * i], past[2 * i + 1])
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            states.append(hidden)
            present += [keys, values]
        last = lm.norm(hidden)
        states[-1] = last  # transformers' last hidden state is the normed one
        chosen = last if self.prompt_layer == -1 else states[self.prompt_layer + 1]
        logits = self.lm_head(last[:, -1]).float()
        return (logits, chosen, *present)
