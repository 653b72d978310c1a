"""ControlMLLM's attention energy (arXiv 2407.21534) over the decoder's prefill, and its gradient as one graph.

    inputs_embeds [1,T,D] --decoder layers 0..L_g-1, attention materialised--> probs_l [1,H,T,T]
    relevance r [T]  = sum_l layer_weights[l] * sum_q query_weights[q] * mean_h probs_l[0,h,q,:]
    energy          = (1 - sum(r * mask * image_weight) / sum(r * image_weight))^2          (alpha = 1)

mask [T] is the referring mask laid on the image rows (a box or mask: 1 inside; a point or scribble: a soft
Gaussian weight), image_weight [T] is 1 on the image rows and 0 elsewhere, query_weights [T] picks the text
queries whose attention counts (ControlMLLM: every token after the image; ControlMLLM++: the last one),
layer_weights [L_g] the layers (ControlMLLM: all, ++: a middle band), each summing to one. The runtime scales
energy and gradient by alpha (they are linear in it) and adds its latent to the image rows itself, so dE/dv is
the image rows of grad_inputs_embeds and the graph needs no scatter.

`EnergyGradGraph` names the graph's interface; its ONNX graph is stitched from one layer's forward-and-VJP traced
once (export/model/energy_pieces.py, export/energy_stitch.py), AttentionEnergy is the torch autograd reference. The layers are written from the checkpoint's own
submodules, as StaticDecoderGraph does (Llama-family: pre-norm attention with rotary embeddings and grouped KV
heads, pre-norm MLP; eager softmax in float32), cut after the last layer the energy reads.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # F.linear with a bias (Qwen2's q/k/v) traces as addmm, whose fake kernel pins T to the example's size
    # under make_fx's symbolic shapes; matmul + add keeps T symbolic.
    out = torch.matmul(x, layer.weight.t())
    return out if layer.bias is None else out + layer.bias


class AttentionEnergy(nn.Module):
    """The energy as a function of the prefill's embeddings (differentiable; torch autograd is the reference)."""

    def __init__(self, language_model: nn.Module, text_config, num_layers: int | None = None):
        super().__init__()
        self.language_model = language_model  # same attribute names as DecoderGraph: same initializer names
        self.text_config = text_config
        self.num_layers = num_layers or text_config.num_hidden_layers
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads

    def _probs(self, attn, x, cos, sin, bias, project=None, need_out: bool = True):
        """One layer's attention: (output [1,T,D] or None, head-mean probabilities [T,T]).

        project(name, x) applies the q/k/v/o projection `name` (default: the checkpoint's own modules; the per-layer
        pieces of export/energy_stitch.py pass their weight inputs instead)."""
        project = project or (lambda name, h: _linear(getattr(attn, f"{name}_proj"), h))
        b, t, _ = x.shape
        hd, hkv, rep = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
        q = project("q", x).view(b, t, self.num_heads, hd).transpose(1, 2)  # [B,H,T,hd]
        k = project("k", x).view(b, t, hkv, hd).transpose(1, 2)  # [B,Hkv,T,hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Query head h reads KV head h // rep (transformers' repeat_kv): fold the rep heads into rows.
        scores = torch.matmul(q.reshape(b, hkv, rep * t, hd), k.transpose(2, 3)) * (hd ** -0.5)
        scores = scores.view(b, hkv, rep, t, t) + bias  # bias [1,1,1,T,T]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        mean = probs.float().mean(dim=(1, 2))[0]  # [T,T]
        if not need_out:  # the last layer the energy reads: its values and output do not reach the energy
            return None, mean
        v = project("v", x).view(b, t, hkv, hd).transpose(1, 2)
        out = torch.matmul(probs.view(b, hkv, rep * t, t), v).view(b, self.num_heads, t, hd)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return project("o", out), mean

    def rotary_and_bias(self, inputs_embeds, position_ids):
        """cos, sin [1,T,hd] at the positions, and the causal bias [1,1,1,T,T] (0 where query i sees key j <= i)."""
        t = inputs_embeds.shape[1]
        cos, sin = self.language_model.rotary_emb(inputs_embeds, position_ids)
        rows = torch.arange(t, device=inputs_embeds.device)
        allowed = rows.view(1, t) <= rows.view(t, 1)
        bias = torch.zeros((t, t), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        return cos, sin, bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min).view(1, 1, 1, t, t)

    def relevance(self, inputs_embeds, position_ids, query_weights, layer_weights) -> torch.Tensor:
        """r [T]: attention from the weighted queries to every key, weighted over layers, mean over heads."""
        lm = self.language_model
        t = inputs_embeds.shape[1]
        cos, sin, bias = self.rotary_and_bias(inputs_embeds, position_ids)
        hidden = inputs_embeds
        relevance = torch.zeros(t, dtype=torch.float32, device=inputs_embeds.device)
        for i, layer in enumerate(lm.layers[: self.num_layers]):
            last = i + 1 == self.num_layers  # the last layer's values, output and MLP do not reach the energy
            out, probs = self._probs(layer.self_attn, layer.input_layernorm(hidden), cos, sin, bias, need_out=not last)
            relevance = relevance + layer_weights[i] * torch.matmul(query_weights.float(), probs)
            if not last:
                hidden = hidden + out
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return relevance

    def forward(self, inputs_embeds, position_ids, mask, image_weight, query_weights, layer_weights):
        return energy_of(self.relevance(inputs_embeds, position_ids, query_weights, layer_weights), mask, image_weight)


def energy_of(relevance, mask, image_weight) -> torch.Tensor:
    """(1 - sum(r * mask) / sum(r))^2 over the image rows (r = relevance * image_weight, float32)."""
    r = relevance * image_weight.float()
    inside = (r * mask.float()).sum() / r.sum()
    return (1.0 - inside) ** 2


class EnergyGradGraph(nn.Module):
    """(energy [], grad_inputs_embeds [1,T,D]): the interface of the energy_grad graph (export/energy_stitch.py)."""

    input_names = ["inputs_embeds", "position_ids", "mask", "image_weight", "query_weights", "layer_weights"]
    output_names = ["energy", "grad_inputs_embeds"]

    def __init__(self, language_model: nn.Module, text_config, num_layers: int | None = None):
        super().__init__()
        self.energy = AttentionEnergy(language_model, text_config, num_layers)
        self.num_layers = self.energy.num_layers
        self.text_config = text_config
