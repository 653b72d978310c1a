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

`EnergyGradGraph` is the forward and backward traced together (torch.func.grad_and_value under make_fx, then
torch.onnx.export: export/onnx_graphs.py export_energy_grad). The layers are written from the checkpoint's own
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

    def _probs(self, attn, x, cos, sin, bias):
        """One layer's attention: (output [1,T,D], head-mean probabilities [T,T])."""
        b, t, _ = x.shape
        hd, hkv, rep = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
        q = _linear(attn.q_proj, x).view(b, t, self.num_heads, hd).transpose(1, 2)  # [B,H,T,hd]
        k = _linear(attn.k_proj, x).view(b, t, hkv, hd).transpose(1, 2)  # [B,Hkv,T,hd]
        v = _linear(attn.v_proj, x).view(b, t, hkv, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Query head h reads KV head h // rep (transformers' repeat_kv): fold the rep heads into rows.
        scores = torch.matmul(q.reshape(b, hkv, rep * t, hd), k.transpose(2, 3)) * (hd ** -0.5)
        scores = scores.view(b, hkv, rep, t, t) + bias  # bias [1,1,1,T,T]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs.view(b, hkv, rep * t, t), v).view(b, self.num_heads, t, hd)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return _linear(attn.o_proj, out), probs.float().mean(dim=(1, 2))[0]  # [T,T]

    def relevance(self, inputs_embeds, position_ids, query_weights, layer_weights) -> torch.Tensor:
        """r [T]: attention from the weighted queries to every key, weighted over layers, mean over heads."""
        lm = self.language_model
        t = inputs_embeds.shape[1]
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids)  # [1,T,hd] each
        rows = torch.arange(t, device=inputs_embeds.device)
        allowed = rows.view(1, t) <= rows.view(t, 1)  # causal: query i sees keys j <= i
        bias = torch.zeros((t, t), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min).view(1, 1, 1, t, t)
        hidden = inputs_embeds
        relevance = torch.zeros(t, dtype=torch.float32, device=inputs_embeds.device)
        for i, layer in enumerate(lm.layers[: self.num_layers]):
            out, probs = self._probs(layer.self_attn, layer.input_layernorm(hidden), cos, sin, bias)
            relevance = relevance + layer_weights[i] * torch.matmul(query_weights.float(), probs)
            if i + 1 < self.num_layers:  # the last layer's MLP does not reach the energy
                hidden = hidden + out
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return relevance

    def forward(self, inputs_embeds, position_ids, mask, image_weight, query_weights, layer_weights):
        r = self.relevance(inputs_embeds, position_ids, query_weights, layer_weights) * image_weight.float()
        inside = (r * mask.float()).sum() / r.sum()
        return (1.0 - inside) ** 2


class EnergyGradGraph(nn.Module):
    """(energy [], grad_inputs_embeds [1,T,D]) from one traced forward-and-backward (see trace())."""

    input_names = ["inputs_embeds", "position_ids", "mask", "image_weight", "query_weights", "layer_weights"]
    output_names = ["energy", "grad_inputs_embeds"]

    def __init__(self, language_model: nn.Module, text_config, num_layers: int | None = None):
        super().__init__()
        self.energy = AttentionEnergy(language_model, text_config, num_layers)
        self.num_layers = self.energy.num_layers
        self.text_config = text_config

    def example(self, t: int = 7) -> tuple:
        """Tracing inputs: T=7 tokens, the middle three image rows (sizes >= 2: no axis specialised)."""
        param = next(self.parameters())
        dtype, device = param.dtype, param.device
        weight = torch.zeros(t, dtype=dtype, device=device)
        weight[2:5] = 1
        mask = torch.zeros(t, dtype=dtype, device=device)
        mask[3] = 1
        queries = torch.zeros(t, dtype=dtype, device=device)
        queries[5:] = 0.5
        layers = torch.full((self.num_layers,), 1.0 / self.num_layers, dtype=dtype, device=device)
        embeds = torch.randn(1, t, self.text_config.hidden_size, dtype=dtype, device=device)
        return embeds, torch.arange(t, device=device).view(1, t), mask, weight, queries, layers

    def trace(self, example: tuple) -> torch.fx.GraphModule:
        """The forward and backward as one FX graph over symbolic shapes; the weights become its constants.

        torch.func.grad inside a module's forward does not survive torch.export; make_fx traces the transform
        itself into plain aten ops (its backward included), which torch.onnx.export then reads like any module."""
        from torch.fx.experimental.proxy_tensor import make_fx

        def value_and_grad(embeds, positions, mask, image_weight, queries, layers):
            grad, value = torch.func.grad_and_value(self.energy, argnums=0)(embeds, positions, mask, image_weight,
                                                                             queries, layers)
            return value, grad

        for p in self.parameters():
            p.requires_grad_(False)
        return make_fx(value_and_grad, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
