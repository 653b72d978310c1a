"""The vision graph: CLIP ViT with the class slot filled per request, projector, token reducer.

    pixel_values [B,3,H,W] --patch embed--> [B,N,D_vit]
    [class slot | patches] + position embeddings -> pre-layernorm -> ViT layers (only those used)
    hidden of `vision_feature_layer` (minus the class token for strategy "default") -> projector [B,N,D_llm]
    -> reducer -> visual_tokens [B,K,D_llm], cls_attention [B,N]
                  (+ kept_patches [B,K] int64 when the reducer keeps whole patches: the gathered patch
                   indices in raster order, so the device never replays the selection)

The class slot is the checkpoint's own class embedding (plain LLaVA) or, for PIP-MM,
T-CLS = PromptMLP(prompt vector), with position embedding 0 still added. A tower without a class
embedding (SigLIP, TOWERS) runs its patches only (plain LLaVA; cls_attention is then the attention each
patch receives, averaged over queries and heads), or, for PIP-MM, takes T-CLS as an extra first token
(no position embedding of its own), dropped at the output; its attention ranks the patches for prompt-topk. The layers are run
here, from the checkpoint's own submodules, rather than through CLIPEncoder.forward, whose
signature differs between transformers releases, and because the class token's attention
in the deepest used layer is needed anyway (the prompt-topk reducer and explanations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from export.model.prompt import PromptMLP
from export.model.reducers import REDUCERS, make_reducer, reducer_options, resolve_budget


@dataclass(frozen=True)
class Tower:
    """What differs between the vision towers LLaVA checkpoints use (config.vision_config.model_type)."""
    class_token: bool  # a class embedding and its position embedding at index 0
    pre_norm: str | None  # the layernorm before the encoder layers, by attribute name


TOWERS = {"clip_vision_model": Tower(class_token=True, pre_norm="pre_layrnorm"),
          "siglip_vision_model": Tower(class_token=False, pre_norm=None)}
TOWERS_BY_CLASS_TOKEN = {tower.class_token: tower for tower in TOWERS.values()}


@dataclass
class VisionConfig:
    image_size: int
    patch_size: int
    feature_layers: list[int]  # indices into transformers' hidden_states (0 = embeddings), normalised >= 0
    select_strategy: str  # "default" drops the class token, "full" keeps it
    budget: str | int  # as asked: "full", "half", "quarter" or an int
    num_tokens: int  # K, resolved
    reducer: str
    reducer_options: dict = field(default_factory=dict)  # e.g. merge: primary_ratio, iterations
    class_token: bool = True  # TOWERS
    tcls: str | None = None  # PIP-MM: "class-slot" or "prepended" (sdk.manifest.TCLS); None: plain LLaVA

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = [self.grid, self.grid]
        d["num_patches"] = self.grid * self.grid
        if self.class_token:  # manifests of CLIP bundles stay as they were
            del d["class_token"]
        if self.tcls is None:
            del d["tcls"]
        return d


def vision_config_from(llava_config, budget="full", reducer="pool", options: dict | None = None,
                       pipmm: bool = False) -> VisionConfig:
    vc = llava_config.vision_config
    tower = TOWERS[vc.model_type]
    num_layers = vc.num_hidden_layers
    layers = llava_config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    # hidden_states has num_layers + 1 entries; negative indices count from its end.
    layers = [layer if layer >= 0 else num_layers + 1 + layer for layer in layers]
    grid = vc.image_size // vc.patch_size
    return VisionConfig(
        image_size=vc.image_size, patch_size=vc.patch_size, feature_layers=layers,
        select_strategy=llava_config.vision_feature_select_strategy, budget=budget,
        num_tokens=resolve_budget(budget, grid * grid), reducer=reducer,
        reducer_options=reducer_options(reducer, options) if reducer in REDUCERS else dict(options or {}),
        class_token=tower.class_token,
        tcls=None if not pipmm else ("class-slot" if tower.class_token else "prepended"),
    )


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)  # [B,H,N,hd]


def clip_layer(layer: nn.Module, x: torch.Tensor, want_cls_attention: bool = False, lead: int = 1):
    """One CLIP or SigLIP encoder layer, pre-norm: x + attn(ln1(x)); x + mlp(ln2(x)). Returns (x, cls_attention
    or None); lead: 1 when token 0 is a class token or T-CLS, 0 when every token is a patch."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q = _split_heads(attn.q_proj(h), attn.num_heads)
    k = _split_heads(attn.k_proj(h), attn.num_heads)
    v = _split_heads(attn.v_proj(h), attn.num_heads)
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)  # [B,H,N+1,N+1]
    out = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape)
    x = x + attn.out_proj(out)
    x = x + layer.mlp(layer.layer_norm2(x))
    # Class token's attention to each patch, averaged over heads: [B, N]; without one, the attention each
    # patch receives, averaged over the queries too.
    if not want_cls_attention:
        return x, None
    return x, probs[:, :, 0, 1:].mean(1) if lead else probs.mean(2).mean(1)


class PipmmVision(nn.Module):
    """pixel_values [B,3,H,W] (+ prompt_vector [B,D_llm]) -> the tuple named by `output_names`:
    visual_tokens [B,K,D_llm], cls_attention [B,N] (+ kept_patches [B,K] int64)."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, config: VisionConfig,
                 prompt_mlp: PromptMLP | None = None):
        super().__init__()
        # CLIPVisionModel wraps a CLIPVisionTransformer in older transformers; newer ones merged the two.
        self.vit = getattr(vision_tower, "vision_model", vision_tower)
        self.projector = projector
        self.prompt_mlp = prompt_mlp
        self.config = config
        self.reducer = make_reducer(config.reducer, config.grid, config.grid, config.num_tokens,
                                    config.reducer_options)

    @property
    def output_names(self) -> list[str]:
        return ["visual_tokens", "cls_attention"] + (["kept_patches"] if self.reducer.keeps_patches else [])

    def embed(self, pixel_values: torch.Tensor, t_cls: torch.Tensor | None) -> torch.Tensor:
        emb = self.vit.embeddings
        weight = emb.patch_embedding.weight
        patches = emb.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # [B,N,D]
        b = patches.shape[0]
        positions = emb.position_embedding.weight.unsqueeze(0)  # [1,N+1,D], index 0 the class slot; [1,N,D] without
        if not self.config.class_token:
            patches = patches + positions
            return patches if t_cls is None else torch.cat([t_cls.to(patches.dtype).unsqueeze(1), patches], dim=1)
        cls = emb.class_embedding.expand(b, 1, -1) if t_cls is None else t_cls.to(patches.dtype).unsqueeze(1)
        return torch.cat([cls, patches], dim=1) + positions

    def features(self, pixel_values: torch.Tensor, t_cls: torch.Tensor | None):
        """-> (selected hidden states [B,N(+1),D_vit * len(feature_layers)], cls_attention [B,N])."""
        x = self.embed(pixel_values, t_cls)
        pre_norm = TOWERS_BY_CLASS_TOKEN[self.config.class_token].pre_norm
        x = getattr(self.vit, pre_norm)(x) if pre_norm else x
        lead = int(self.config.class_token or t_cls is not None)  # a token 0 that is no patch
        hidden = [x]
        deepest = max(self.config.feature_layers)
        cls_attention = None
        for i, layer in enumerate(self.vit.encoder.layers[:deepest]):
            x, attention = clip_layer(layer, x, want_cls_attention=i == deepest - 1, lead=lead)
            cls_attention = attention if attention is not None else cls_attention
            hidden.append(x)
        patches = x.shape[1] - lead
        if cls_attention is None:  # feature layer 0: the embeddings themselves; uniform scores
            cls_attention = torch.full(x.shape[:1] + (patches,), 1.0 / patches, dtype=x.dtype)
        selected = [hidden[i] for i in self.config.feature_layers]
        # strategy "default" drops the class token; a prepended T-CLS is dropped whatever the strategy
        if self.config.select_strategy == "default" or not self.config.class_token:
            selected = [h[:, lead:] for h in selected]
        return torch.cat(selected, dim=-1), cls_attention

    def forward(self, pixel_values: torch.Tensor, prompt_vector: torch.Tensor | None = None):
        t_cls = None if self.prompt_mlp is None else self.prompt_mlp(prompt_vector)
        features, cls_attention = self.features(pixel_values, t_cls)
        tokens = self.projector(features)
        if self.config.select_strategy == "full" and self.config.class_token:  # class token in front, reduce patches
            reduced, kept = self.reducer(tokens[:, 1:], cls_attention)  # kept: patch indices, class token excluded
            reduced = torch.cat([tokens[:, :1], reduced], 1)
        else:
            reduced, kept = self.reducer(tokens, cls_attention)
        return (reduced, cls_attention) + (() if kept is None else (kept,))
