"""Frame adapters: several frames' visual tokens -> R tokens the LLM sees, however many frames (MIVPG, seed 001).

    frame_tokens [B,F,K,D_llm] (the vision graph's output per frame, F = N_max slots), frame_mask [B,F] (1 = a frame),
    frame_positions [B,F,K] int64 (each token's patch index in its frame; only when positions/shortcut are set)
      -> LayerNorm -> Linear(D_llm, d) (+ a learned vector per frame slot when frame_order = "embedded")
                                       (+ a learned vector per patch position when positions = "patch")
    qformer:  instances = all F*K patch tokens (absent frames' keys masked)
              R learned queries x `layers` blocks [self-attention among queries, cross-attention to the
              instances, MLP]                                               (BLIP-2's Q-Former, no CSA)
    mivpg:    level 1, patches within each frame (B*F bags of K instances, no mask needed):
                  CSA among the K patches, then R_f frame queries cross-attend -> [B*F, R_f, d]
              level 2, frames within the sample (F*R_f instances, absent frames' keys masked):
                  CSA among the frame instances, then the R queries' blocks as in qformer
      -> LayerNorm -> Linear(d, D_llm) (x std + mean when calibrated)
         (+ shortcut "regions": slot r = softmax-weighted mean of the frame tokens by a learned [N,R] bias table
            that starts as "patch n lies in region r"; "frame_regions": the R slots shared out among the present
            frames, slot s pooling regions of its own frame only (export/model/frame_shortcut.py); Linear(d, D_llm)
            then starts at zero)
      -> visual_tokens [B,R,D_llm]

MIVPG (arXiv 2406.02987) as far as public sources describe it: a Q-Former is multi-instance pooling that treats
instances as independent; MIVPG adds correlated self-attention (CSA) among the instances and pools
hierarchically (patches within an image, then images within the sample). The paper's CSA equations are not
in reachable sources; ours (every choice a field of AdapterConfig, saved beside the weights):

    csa "induced": Set Transformer's induced set attention (Lee et al. 2019, ISAB): L learned points attend to
                   the n instances, H = I + Attn(I, X); the instances attend to H, X += Attn(X, H); X += MLP(X).
                   O(n L) for hundreds of patches; permutation equivariant; L = csa_points.
    csa "full":    X += Attn(X, X); X += MLP(X). O(n^2).

Frames enter no attention as a sequence: without frame_order "embedded" the output is invariant to the order
of the frames (patch positions and the "regions" shortcut use one table for every frame, so they keep this; the
"frame_regions" shortcut does not: slot s pools the present frame of rank j, so the output follows the frames'
order, as "which frame shows X" needs), and to the
order of the patches within one (with positions: of the (token, position) pairs), and an absent frame is masked out of every attention as a key,
so F frames padded to N_max give the output of the F frames alone (tests/test_frames_adapter.py).
The T-CLS output token is no instance: the vision graph drops it (LLaVA's "default" strategy); the CSA sees
the patch tokens, which attended to the prompt's T-CLS in every ViT layer.

Static for export: constant shapes (B = 1, F = N_max, K), masks by Where, only MatMul, Softmax,
LayerNormalization, Erf (GELU), Reshape, Expand, Where, Add, Mul, Concat (+ Gather, Transpose for the positions):
TensorRT's ONNX parser takes them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from export.model import frame_shortcut as shortcuts
from export.model.frame_shortcut import NEG, REGION_BIAS, region_table  # noqa: F401 (REGION_BIAS, region_table: API)
from sdk.errors import ExportError
from sdk.manifest_multi import ADAPTER_MODES

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
CSA_KINDS = ("induced", "full")
FRAME_ORDERS = ("ignored", "embedded")
OUTPUTS = ("calibrated", "plain")
POSITIONS = ("none", "patch")
SHORTCUTS = ("none",) + tuple(shortcuts.SHORTCUTS)


@dataclass
class AdapterConfig:
    mode: str = "mivpg"  # ADAPTER_MODES: "qformer" (no CSA, one level) or "mivpg" (CSA, hierarchical)
    d_in: int = 256  # D_llm: width of the visual tokens in, and of the R tokens out
    d_model: int = 192  # the adapter's own width
    heads: int = 4
    queries: int = 64  # R: the tokens the LLM sees
    layers: int = 2  # sample-level query blocks
    mlp_ratio: int = 2
    frame_order: str = "ignored"  # FRAME_ORDERS: "embedded" adds a learned vector per frame slot (order-aware)
    max_frames: int = 8  # frame slots with an order vector; a graph's N_max may not exceed it when embedded
    # mivpg only
    csa: str = "induced"  # CSA_KINDS
    csa_points: int = 16  # L, induced points
    frame_queries: int = 32  # R_f: tokens per frame after level 1
    # "calibrated": visual_tokens = shift + scale * proj_out(...) per channel, shift/scale set by calibrate() to the
    # mean/std of the frame tokens (the projector's, norm ~100 on the default model) before training, so the LLM
    # reads tokens at the scale it was trained on from step 0; "plain": proj_out(...) alone (norm ~9 at init: the
    # optimiser then spends its steps growing a constant, and the pooled tokens collapse to one input-free vector)
    output: str = "calibrated"
    # where each instance sits in its frame (frame_positions input: the vision's kept_patches, raster indices in
    # [0, num_patches)). Measured on the H200 runs (docs/multi-image.md): without it the R queries all attend
    # uniformly (entropy 0.99-1.0 of log M at init and still 0.77-1.0 trained), so the R tokens are one mean of
    # the frame's patches repeated (their std across slots 0.13-0.45 against 4.5 across questions) and colour/shape
    # of one frame stay at chance. "patch": a learned embedding per patch position added to every instance (one
    # table for all frames: the output stays invariant to the frames' order; patches permuted with their
    # positions leave it unchanged, patches permuted alone do not)
    positions: str = "none"
    num_patches: int = 256  # N: patch positions of a frame (the vision's grid ** 2)
    # "regions": visual_tokens = a region pooling of the frame tokens themselves (slot r: the present tokens whose
    # patch lies in region r of a grid of R regions over the patch grid, by a learned [R, N] bias table that starts
    # at REGION_BIAS inside the region) + the adapter's stream through a zero-initialised proj_out: at step 0 the
    # LLM reads pooled projector tokens, as concat at a quarter budget, and the stream learns what pooling loses.
    # "frame_regions": the same, but the slots shared out among the present frames, each pooling its own frame
    # (export/model/frame_shortcut.py; a [max_frames, N, R] table: a graph's N_max may not exceed max_frames)
    shortcut: str = "none"

    @property
    def needs_positions(self) -> bool:
        return self.positions != "none" or self.shortcut != "none"

    @property
    def bounds_frames(self) -> bool:
        """True when the graph's frame slots may not exceed max_frames (order vectors, per-count shortcut tables)."""
        return self.frame_order == "embedded" or (self.shortcut != "none"
                                                  and shortcuts.SHORTCUTS[self.shortcut].per_frame_tables)

    def __post_init__(self):
        checks = [(self.mode in ADAPTER_MODES, f"mode {self.mode!r}: choose {' or '.join(ADAPTER_MODES)}"),
                  (self.csa in CSA_KINDS, f"csa {self.csa!r}: choose {' or '.join(CSA_KINDS)}"),
                  (self.frame_order in FRAME_ORDERS, f"frame_order {self.frame_order!r}: choose "
                                                     f"{' or '.join(FRAME_ORDERS)}"),
                  (self.output in OUTPUTS, f"output {self.output!r}: choose {' or '.join(OUTPUTS)}"),
                  (self.positions in POSITIONS, f"positions {self.positions!r}: choose {' or '.join(POSITIONS)}"),
                  (self.shortcut in SHORTCUTS, f"shortcut {self.shortcut!r}: choose {' or '.join(SHORTCUTS)}"),
                  (self.d_model % self.heads == 0, f"d_model {self.d_model} is not a multiple of heads {self.heads}"),
                  (min(self.d_in, self.queries, self.layers, self.csa_points, self.frame_queries,
                       self.max_frames, self.mlp_ratio, self.num_patches) >= 1, "every size must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise ExportError(f"adapter config: {message}")

    def settings(self) -> dict:
        """What the manifest records (sdk/manifest_multi.py MultiImage.settings): every choice but the widths."""
        d = asdict(self)
        if self.mode == "qformer":  # the CSA settings do not apply
            for key in ("csa", "csa_points", "frame_queries"):
                d.pop(key)
        return d


class Attention(nn.Module):
    """Multi-head attention of queries x [B,Q,d] over memory [B,M,d]; key_mask [B,M] bool (True = attend) or None."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(d // heads)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B,H,n,hd]

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(memory)), self._split(self.v(memory))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B,H,Q,M]
        if key_mask is not None:
            scores = torch.where(key_mask[:, None, None, :], scores, torch.full_like(scores, NEG))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B,H,Q,hd]
        return self.o(out.transpose(1, 2).reshape(x.shape))


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: int):
        super().__init__(nn.LayerNorm(d), nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))


class CrossBlock(nn.Module):
    """x += Attn(ln(x), ln(memory)); x += MLP(x). Pre-norm, residual."""

    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.norm_x, self.norm_m = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attention(d, heads), MLP(d, ratio)

    def forward(self, x, memory, key_mask=None):
        x = x + self.attn(self.norm_x(x), self.norm_m(memory), key_mask)
        return x + self.mlp(x)


class QueryBlock(nn.Module):
    """One Q-Former block: self-attention among the queries, cross-attention to the instances, MLP."""

    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.cross = CrossBlock(d, heads, ratio)

    def forward(self, q, instances, key_mask=None):
        h = self.norm(q)
        return self.cross(q + self.self_attn(h, h), instances, key_mask)


class CorrelatedSelfAttention(nn.Module):
    """CSA among instances x [B,n,d] (key_mask [B,n] or None): see the module docstring for the two kinds."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        d, heads = config.d_model, config.heads
        self.kind = config.csa
        if self.kind == "induced":
            self.points = nn.Parameter(torch.randn(1, config.csa_points, d) * 0.02)
            self.gather = CrossBlock(d, heads, config.mlp_ratio)  # points <- instances
        self.norm_x, self.norm_m = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attention(d, heads), MLP(d, config.mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "induced":
            memory = self.gather(self.points.expand(x.shape[0], -1, -1), x, key_mask)  # [B,L,d]
            x = x + self.attn(self.norm_x(x), self.norm_m(memory))  # the points are all present: no mask
        else:
            h = self.norm_x(x)
            x = x + self.attn(h, h, key_mask)
        return x + self.mlp(x)


class FrameAdapter(nn.Module):
    """frame_tokens [B,F,K,D_in], frame_mask [B,F] (float 1/0 or bool) -> visual_tokens [B,R,D_in]."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        d, heads, ratio = config.d_model, config.heads, config.mlp_ratio
        self.norm_in, self.proj_in = nn.LayerNorm(config.d_in), nn.Linear(config.d_in, d)
        if config.frame_order == "embedded":
            self.frame_embedding = nn.Parameter(torch.randn(config.max_frames, d) * 0.02)
        if config.mode == "mivpg":
            self.patch_csa = CorrelatedSelfAttention(config)
            self.frame_queries = nn.Parameter(torch.randn(1, config.frame_queries, d) * 0.02)
            self.frame_pool = CrossBlock(d, heads, ratio)
            self.frame_csa = CorrelatedSelfAttention(config)
        self.queries = nn.Parameter(torch.randn(1, config.queries, d) * 0.02)
        self.blocks = nn.ModuleList(QueryBlock(d, heads, ratio) for _ in range(config.layers))
        self.norm_out, self.proj_out = nn.LayerNorm(d), nn.Linear(d, config.d_in)
        if config.output == "calibrated":  # identity until calibrate() measures the frame tokens
            self.out_scale, self.out_shift = nn.Parameter(torch.ones(config.d_in)), nn.Parameter(torch.zeros(config.d_in))
        if config.positions == "patch":  # [N,d], at the scale of proj_in's output (std ~0.6) so it is read at once
            self.patch_embedding = nn.Parameter(torch.randn(config.num_patches, d) * 0.5)
        self.shortcut = shortcuts.SHORTCUTS.get(config.shortcut)  # None for "none"
        if self.shortcut is not None:  # region_bias (+ slot_frame) on the adapter: the saved files' key names
            self.shortcut.build(self, config)
            nn.init.zeros_(self.proj_out.weight)  # step 0: the region pooling alone
            nn.init.zeros_(self.proj_out.bias)

    @property
    def input_names(self) -> list[str]:
        return ["frame_tokens", "frame_mask"] + (["frame_positions"] if self.config.needs_positions else [])

    @property
    def output_names(self) -> list[str]:
        return ["visual_tokens"]

    def instances(self, h: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B,F,K,d], present [B,F] bool -> (sample-level instances [B,n,d], their key mask [B,n])."""
        b, f, k, d = h.shape
        if self.config.mode == "qformer":
            return h.reshape(b, f * k, d), present[:, :, None].expand(b, f, k).reshape(b, f * k)
        x = self.patch_csa(h.reshape(b * f, k, d))  # level 1: the patches of each frame, frames apart
        r = self.config.frame_queries
        z = self.frame_pool(self.frame_queries.expand(b * f, -1, -1), x).reshape(b, f * r, d)
        keys = present[:, :, None].expand(b, f, r).reshape(b, f * r)
        return self.frame_csa(z, keys), keys  # level 2: the frames of the sample

    def forward(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor,
                frame_positions: torch.Tensor | None = None) -> torch.Tensor:
        """frame_positions [B,F,K] int64: each token's patch index in its frame (needed by positions / shortcut)."""
        b, f = frame_tokens.shape[:2]
        if self.config.bounds_frames and f > self.config.max_frames:
            raise ExportError(f"{f} frame slots but the adapter has order vectors / shortcut tables for "
                              f"{self.config.max_frames}")
        if self.config.needs_positions and frame_positions is None:
            raise ExportError("this adapter reads where each token sits (positions/shortcut): pass frame_positions")
        present = frame_mask > 0.5 if frame_mask.dtype != torch.bool else frame_mask
        h = self.proj_in(self.norm_in(frame_tokens))  # [B,F,K,d]
        if self.config.frame_order == "embedded":
            h = h + self.frame_embedding[:f][None, :, None, :]
        if self.config.positions == "patch":
            h = h + self.patch_embedding[frame_positions]  # [B,F,K,d]: the same table for every frame
        instances, keys = self.instances(h, present)
        q = self.queries.expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, instances, keys)
        out = self.proj_out(self.norm_out(q))  # [B,R,D_in]
        if self.config.output == "calibrated":
            out = out * self.out_scale + self.out_shift
        if self.shortcut is not None:
            out = out + self.shortcut.pool(self, frame_tokens, present, frame_positions)
        return out

    @torch.no_grad()
    def calibrate(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict:
        """Before training: out_shift/out_scale := per-channel mean/std of the present frame tokens [B,F,K,D_in]
        (mask [B,F]), and proj_out := unit-variance outputs (N(0, 1/d) weights, zero bias), so the first pooled
        tokens look like the projector's to the LLM. -> the statistics set (recorded in train_config.json)."""
        if self.config.output != "calibrated":
            raise ExportError("calibrate() needs an adapter with output = \"calibrated\"")
        tokens = frame_tokens[frame_mask > 0.5].reshape(-1, frame_tokens.shape[-1]).float()  # [n,D_in]
        mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
        self.out_scale.copy_(std)
        if self.config.shortcut == "none":
            self.out_shift.copy_(mean)
            nn.init.normal_(self.proj_out.weight, std=1.0 / math.sqrt(self.config.d_model))
        else:  # the shortcut already gives the tokens' mean and scale: the stream starts at zero, in units of std
            self.out_shift.zero_()
            nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        return {"tokens": int(tokens.shape[0]), "mean_norm": float(mean.norm()), "std_mean": float(std.mean()),
                "token_norm": float(tokens.norm(dim=-1).mean())}

    # -- files: adapter.safetensors + adapter.json beside it ---------------------------------------

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory / WEIGHTS_FILE

    @classmethod
    def load(cls, path: str | Path) -> "FrameAdapter":
        """From a directory holding adapter.safetensors + adapter.json, or from the safetensors file itself."""
        from safetensors.torch import load_file

        path = Path(path)
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        config_path = weights.with_name(CONFIG_FILE)
        if not weights.is_file() or not config_path.is_file():
            raise ExportError(f"adapter not found at {path}: pass the folder holding {WEIGHTS_FILE} and {CONFIG_FILE}")
        try:
            raw = json.loads(config_path.read_text())
            known = {f.name for f in fields(AdapterConfig)}
            raw.setdefault("output", "plain")  # adapter.json files from before the field had plain outputs
            config = AdapterConfig(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ValueError) as err:
            raise ExportError(f"adapter config {config_path} is invalid ({err}): re-save it with FrameAdapter.save") from err
        adapter = cls(config)
        try:
            adapter.load_state_dict(load_file(str(weights)))
        except Exception as err:  # wrong shapes or keys
            raise ExportError(f"adapter weights {weights} do not match {config_path.name} ({err})") from err
        return adapter.eval()


def parameter_count(adapter: nn.Module) -> int:
    return sum(p.numel() for p in adapter.parameters())


def random_adapter(mode: str, d_in: int, seed: int = 0, **settings) -> FrameAdapter:
    """An adapter with PyTorch's initialisation (tests, latency): its outputs are as large as a trained one's."""
    torch.manual_seed(seed)
    adapter = FrameAdapter(AdapterConfig(mode=mode, d_in=d_in, **settings))
    if adapter.config.shortcut != "none":  # its zero start would hide the stream (a trained one's has grown)
        adapter.proj_out.reset_parameters()
    return adapter.eval()
