"""energy_grad in pieces that are traced once and stitched in ONNX (export/energy_stitch.py): cost linear in depth.

Tracing the whole forward-and-backward (EnergyGradGraph.trace) and exporting it re-traces every layer under
symbolic shapes, superlinear in depth (docs/referring.md). Here one decoder layer is traced with its weights as
graph INPUTS (so the one trace serves every layer of that kind) and T symbolic:

    prelude  (inputs_embeds [1,T,D], position_ids [1,T])          -> cos, sin [1,T,hd], bias [1,1,1,T,T]
    layer    (h [1,T,D], cos, sin, bias, queries [T], *weights,
              g_out [1,T,D], g_rel [T])                            -> h_out [1,T,D], rel [T], g_h [1,T,D]
    last     (h, cos, sin, bias, queries, *weights, g_rel)          -> rel, g_h     (attention probabilities only)
    head     (r [T] float32, mask [T], image_weight [T])           -> energy [], g_r [T]

rel = query_weights @ mean_h probs (float32), one layer's relevance before its layer weight; the stitcher forms
r = sum_l layer_weights[l] rel_l and g_rel_l = layer_weights[l] g_r. A layer piece is one joint graph (torch.func.vjp
under make_fx: the backward reads the forward's saved values, nothing is recomputed); the stitcher splits it into
the nodes that do not depend on the cotangents (the forward) and the rest, runs every layer's forward, the head,
then every layer's backward in reverse.

Weights enter in the layout the decoder graph stores (linear weights as W^T [in,out], folded there by the
exporter; norms and biases as they are), so the stitched graph's initializers are byte-identical to the decoder's
and add-graphs shares them (export/extra_graphs.py share_weights).
"""

from __future__ import annotations

import torch
from torch import nn

from export.model.energy import AttentionEnergy, energy_of

PROJECTIONS = ("q", "k", "v", "o")


def layer_weight_names(layer: nn.Module, last: bool) -> list[str]:
    """The parameter names (in the layer) a piece reads, in input order. last: only the attention scores'."""
    names = ["input_layernorm.weight"]
    for p in PROJECTIONS[:2] if last else PROJECTIONS:
        names.append(f"self_attn.{p}_proj.weight")
        if getattr(layer.self_attn, f"{p}_proj").bias is not None:
            names.append(f"self_attn.{p}_proj.bias")
    if not last:
        names += ["post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight"]
    return names


def stored_layout(name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter as the decoder graph stores it: linear weights [out,in] as W^T [in,out]."""
    return param.detach().t().contiguous() if name.endswith("_proj.weight") else param.detach()


class EnergyPieces:
    """The pieces' functions over one checkpoint's layer modules (their code: AttentionEnergy's)."""

    def __init__(self, energy: AttentionEnergy):
        self.energy = energy
        self.layers = energy.language_model.layers[: energy.num_layers]

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights in the stored layout, by parameter name."""
        layer = self.layers[index]
        params = dict(layer.named_parameters())
        last = index + 1 == len(self.layers)
        return {name: stored_layout(name, params[name]) for name in layer_weight_names(layer, last)}

    def _layer_forward(self, index: int, names: list[str], last: bool):
        """(h, cos, sin, bias, queries, *weights) -> (h_out, rel) or rel, computed with layer `index`'s modules
        (norm and activation code) and the weights passed in."""
        layer = self.layers[index]
        energy = self.energy

        def norm(module, weight, h):  # the checkpoint's own RMSNorm code over the weight input
            return torch.func.functional_call(module, {"weight": weight}, (h,))

        def forward(h, cos, sin, bias, queries, *weights):
            w = dict(zip(names, weights))

            def project(p, x):
                out = torch.matmul(x, w[f"self_attn.{p}_proj.weight"])
                bias_name = f"self_attn.{p}_proj.bias"
                return out + w[bias_name] if bias_name in w else out

            out, probs = energy._probs(layer.self_attn, norm(layer.input_layernorm, w["input_layernorm.weight"], h),
                                       cos, sin, bias, project=project, need_out=not last)
            rel = torch.matmul(queries.float(), probs)  # [T] float32
            if last:
                return rel
            h = h + out
            x = norm(layer.post_attention_layernorm, w["post_attention_layernorm.weight"], h)
            gate = layer.mlp.act_fn(torch.matmul(x, w["mlp.gate_proj.weight"]))
            h = h + torch.matmul(gate * torch.matmul(x, w["mlp.up_proj.weight"]), w["mlp.down_proj.weight"])
            return h, rel
        return forward

    def layer_joint(self, index: int):
        """The layer piece: forward and VJP in one function (inputs and outputs as in the module docstring)."""
        last = index + 1 == len(self.layers)
        names = layer_weight_names(self.layers[index], last)
        forward = self._layer_forward(index, names, last)
        n_weights = len(names)

        def joint(h, cos, sin, bias, queries, *rest):
            weights, cotangents = rest[:n_weights], rest[n_weights:]
            outputs, vjp = torch.func.vjp(lambda x: forward(x, cos, sin, bias, queries, *weights), h)
            grad, = vjp(cotangents[0] if last else tuple(cotangents))
            return (outputs, grad) if last else (*outputs, grad)
        return joint

    def example(self, index: int, t: int = 7) -> tuple:
        """Tracing inputs of layer `index`'s piece: T=7 (>= 2: no axis specialised), its real weights."""
        energy = self.energy
        param = next(self.layers[index].parameters())
        dtype, device = param.dtype, param.device
        embeds = torch.randn(1, t, energy.text_config.hidden_size, dtype=dtype, device=device)
        cos, sin, bias = energy.rotary_and_bias(embeds, torch.arange(t, device=device).view(1, t))
        queries = torch.zeros(t, dtype=dtype, device=device)
        queries[5:] = 0.5
        last = index + 1 == len(self.layers)
        cotangents = (torch.randn(t, device=device),) if last else (torch.randn_like(embeds),
                                                                    torch.randn(t, device=device))
        return (embeds, cos, sin, bias, queries, *self.weights(index).values(), *cotangents)

    @staticmethod
    def head(r, mask, image_weight):
        """The head piece: (energy, dE/dr)."""
        grad, value = torch.func.grad_and_value(energy_of)(r, mask, image_weight)
        return value, grad


class Prelude(nn.Module):
    """(inputs_embeds, position_ids) -> cos, sin, causal bias: the rotary tables and the mask every layer reads."""

    def __init__(self, energy: AttentionEnergy):
        super().__init__()
        self.energy = energy

    def forward(self, inputs_embeds, position_ids):
        return self.energy.rotary_and_bias(inputs_embeds, position_ids)


def trace_joint(fn, example: tuple) -> torch.fx.GraphModule:
    """fn (a forward with its VJP inside) as plain aten ops over symbolic shapes: torch.func's transforms do not
    survive torch.export, make_fx traces them away. torch.onnx.export then fixes every dim but the sequence axis
    (the weights' shapes become constants again)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
