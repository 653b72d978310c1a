"""The LLM as two graphs: `embed` (ids -> embeddings) and `decoder` (one step, with KV cache).

decoder inputs:  inputs_embeds [B,T,D], attention_mask [B,P+T] (int64, 1 = attend),
                 position_ids [B,T] (int64), past_key_values.{i}.key/.value [B,H_kv,P,hd] per layer,
                 image_bias [B,L_c,P+T] (float, CMAI bundles only: added to the attention scores of every
                 query of the call at the L_c CMAI layers; zeros = off. docs/vmtc-cmai.md)
decoder outputs: logits [B,V] (last position only: the only one generation reads),
                 hidden [B,T,D] (hidden state at the prompt-vector layer, every position),
                 present.{i}.key/.value [B,H_kv,P+T,hd],
                 attention [B,L_c,T,P+T] (CMAI bundles only: softmax probabilities at the CMAI layers, mean
                 over heads, after the bias; the runtime's focus score reads them)

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

from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from sdk.errors import ExportError


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


class EmbedGraph(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B,T] -> [B,T,D]


def default_cmai_layers(num_layers: int) -> list[int]:
    """CMAI's layers when export is not told: the second half of the decoder (its first layers attend
    broadly and build the tokens' context; the later ones read the image for the answer)."""
    return list(range(num_layers // 2, num_layers))


def cmai_settings(num_layers: int, given: dict | None = None) -> dict | None:
    """The manifest's `cmai` entry: layers (None or "auto" = default_cmai_layers, [] or "none" = no CMAI
    inputs in the graph: returns None), the runtime's settings (sdk.cmai.DEFAULTS) filled in."""
    from sdk.cmai import check_settings

    given = dict(given or {})
    layers = given.pop("layers", None)
    if layers is None or layers == "auto":
        layers = default_cmai_layers(num_layers)
    elif layers == "none":
        layers = []
    elif isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ExportError(f"--cmai-layers {layers!r} is not auto, none or comma-separated layer numbers") from None
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not -num_layers <= x < num_layers]
    if bad:
        raise ExportError(f"CMAI layers {bad} are outside the decoder's {num_layers} layers (0..{num_layers - 1}, "
                          "or negative from the end)")
    layers = sorted({x % num_layers for x in layers})
    if not layers:
        return None
    settings = check_settings(given, error=ExportError)
    return {"layers": layers, "bias_input": "image_bias", "attention_output": "attention", **settings}


@contextmanager
def _cmai_hooks(layers, cmai_layers: list[int], image_bias: torch.Tensor | None):
    """While open, attention of layer cmai_layers[c] gets image_bias[:, c] added to its mask, and its
    probabilities are collected: yields a list that fills with [B,T,S] (mean over heads) per CMAI layer.

    Hooks on the checkpoint's own attention modules (transformers' eager attention adds the mask to the
    scores and returns the softmax probabilities), so every text architecture that transformers runs gets
    the same treatment; they are removed on exit, so the model is untouched outside this graph's call.
    """
    probs: list[torch.Tensor] = []
    handles = []

    def add_bias(column: int, module, args, kwargs):
        bias = image_bias[:, column].unsqueeze(1).unsqueeze(1)  # [B,1,1,S]: every query row of the call
        mask = kwargs.get("attention_mask")  # [B,1,T,S] float (eager), finfo.min where masked
        kwargs["attention_mask"] = bias if mask is None else mask + bias.to(mask.dtype)
        return args, kwargs

    def keep_probs(module, args, kwargs, output):
        probs.append(output[1].float().mean(1))  # eager returns (out, probs [B,H,T,S])

    for column, index in enumerate(cmai_layers):
        attn = layers[index].self_attn
        if image_bias is not None:
            handles.append(attn.register_forward_pre_hook(
                lambda m, a, k, c=column: add_bias(c, m, a, k), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep_probs, with_kwargs=True))
    try:
        yield probs
    finally:
        for handle in handles:
            handle.remove()


class DecoderGraph(nn.Module):
    def __init__(self, language_model: nn.Module, lm_head: nn.Module, text_config, prompt_layer: int = -1,
                 cmai: dict | None = None):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers
        self.prompt_layer = prompt_layer
        self.cmai = cmai  # the manifest's cmai entry (cmai_settings), or None
        self.cmai_layers = list((cmai or {}).get("layers", []))  # empty: no image_bias input, no attention output

    def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple[torch.Tensor, ...],
                image_bias: torch.Tensor | None = None):
        # The cache object is rebuilt from flat tensors inside the traced function: the graph's
        # interface stays plain tensors, whatever cache class the transformers release uses.
        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        with _cmai_hooks(self.language_model.layers, self.cmai_layers, image_bias) as probs:
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
        if not self.cmai_layers:
            return (logits, hidden, *present)
        return (logits, hidden, *present, torch.stack(probs, dim=1))  # attention [B,L_c,T,P+T]


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
