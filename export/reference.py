"""The PyTorch reference: the very modules that are exported, behind the runtime's backend interface.

    pipeline = reference_pipeline("ckpt/", prompt_mlp="mlp/", budget="half", reducer="prompt-topk")
    pipeline.generate(image, prompt)   # same Pipeline class as the ONNX bundle, torch underneath

So the reference and the runtime are compared (and benchmarked) by one loop over backends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from runtimes.positions import following, step_positions
from runtimes.vision_output import VisionOutput
from sdk.errors import BundleError
from sdk.manifest import ChatTemplate, Model
from sdk.pipeline import Pipeline

from export.writer import build_manifest, build_modules
from export.model.checkpoint import load_checkpoint
from export.model.prompt import PromptMLP


@dataclass
class TorchCache:
    past: tuple  # 2 per layer, [B, H_kv, length, hd]
    length: int = 0
    next_position: int = 0  # runtimes/positions.py


class TorchBackend:
    name = "torch"

    def __init__(self, modules: dict, model: Model, device: str = "cpu"):
        self.modules = modules
        self.device = device
        self.num_layers, self.num_kv_heads, self.head_dim = model.num_layers, model.num_kv_heads, model.head_dim
        self.dtype = next(modules["decoder"].parameters()).dtype
        # the first-L-layers prompt encoder (export/model/prompt_encoder.py), as a bundle would carry it
        self.prompt_encoder_graph = "prompt_encoder" if "prompt_encoder" in modules else None

    @staticmethod
    def available() -> bool:
        return True

    def _t(self, array: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype=dtype)

    @torch.no_grad()
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.modules["embed"](self._t(input_ids, torch.int64)).float().cpu().numpy()

    @torch.no_grad()
    def vision(self, pixel_values: np.ndarray, prompt_vector: np.ndarray | None) -> VisionOutput:
        if pixel_values.dtype == np.uint8:  # the reference's manifest is build_manifest's: float pixels only
            raise BundleError("the PyTorch reference takes float pixel_values [B,3,H,W] (sdk.preprocess.preprocess)")
        prompt = None if prompt_vector is None else self._t(prompt_vector, self.dtype)
        vision = self.modules["vision"]
        outputs = vision(self._t(pixel_values, self.dtype), prompt)
        as_numpy = {name: out.cpu().numpy() if name == "kept_patches" else out.float().cpu().numpy()
                    for name, out in zip(vision.output_names, outputs)}
        return VisionOutput.from_graph(as_numpy)

    @torch.no_grad()
    def adapter(self, frame_tokens: np.ndarray, frame_mask: np.ndarray,
                frame_positions: np.ndarray | None = None) -> np.ndarray:
        """The frame adapter (export/model/mivpg.py): [1,N_max,K,D], [1,N_max] (, [1,N_max,K]) -> [1,R,D]."""
        adapter = self.modules["adapter"]
        extra = () if frame_positions is None else (torch.as_tensor(frame_positions, device=self.device),)
        return adapter(self._t(frame_tokens, self.dtype), self._t(frame_mask, torch.float32), *extra).float().cpu().numpy()

    def new_cache(self, batch: int = 1) -> TorchCache:
        empty = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        return TorchCache(past=(empty,) * (2 * self.num_layers), length=0)

    def _run(self, inputs_embeds: np.ndarray, cache: TorchCache, position_ids, image_bias):
        b, t, _ = inputs_embeds.shape
        mask = torch.ones(b, cache.length + t, dtype=torch.int64, device=self.device)
        positions = step_positions(cache.next_position, b, t, position_ids)
        decoder = self.modules["decoder"]
        extra = ()
        if decoder.cmai_layers:  # a CMAI decoder: image_bias [B,L_c,P+T], zeros when not given
            layers = len(decoder.cmai_layers)
            bias = np.zeros((b, layers, cache.length + t), np.float32) if image_bias is None else image_bias
            extra = (self._t(bias, self.dtype),)
        elif image_bias is not None:
            raise BundleError("this decoder has no CMAI layers (exported with --cmai-layers none): no inhibit")
        outputs = decoder(self._t(inputs_embeds, self.dtype), mask, self._t(positions), cache.past, *extra)
        n = 2 + 2 * self.num_layers
        logits, hidden, present = outputs[0], outputs[1], outputs[2:n]
        attention = outputs[n] if len(outputs) > n else None
        grown = TorchCache(past=tuple(present), length=cache.length + t, next_position=following(positions))
        return logits.float().cpu().numpy(), hidden.float().cpu().numpy(), grown, attention

    @torch.no_grad()
    def decoder(self, inputs_embeds: np.ndarray, cache: TorchCache, position_ids: np.ndarray | None = None,
                image_bias: np.ndarray | None = None):
        logits, hidden, grown, _ = self._run(inputs_embeds, cache, position_ids, image_bias)
        return logits, hidden, grown

    @torch.no_grad()
    def prompt_hidden(self, inputs_embeds: np.ndarray) -> np.ndarray:
        b, t, _ = inputs_embeds.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        hidden = self.modules["prompt_encoder"](self._t(inputs_embeds, self.dtype),
                                                torch.ones(b, t, dtype=torch.int64, device=self.device), positions)
        return hidden.float().cpu().numpy()

    @torch.no_grad()
    def attention(self, inputs_embeds: np.ndarray, cache: TorchCache, position_ids: np.ndarray | None = None):
        """CMAI's probe: attention [B,L_c,T,P+T] of this call's queries (no bias); the cache is not kept."""
        attention = self._run(inputs_embeds, cache, position_ids, None)[3]
        if attention is None:
            raise BundleError("this decoder has no CMAI layers (exported with --cmai-layers none): no attention")
        return attention.float().cpu().numpy()


def reference_pipeline(checkpoint_dir, prompt_mlp=None, budget="full", reducer="pool",
                       chat_template: ChatTemplate | None = None, visual_positions: str | None = None,
                       reducer_options: dict | None = None, cmai: dict | None = None, adapter=None,
                       n_max: int | None = None) -> Pipeline:
    """adapter: a FrameAdapter folder (or module) for qformer/mivpg frames, n_max frames (export/multi_image.py)."""
    from export.model.mivpg import FrameAdapter
    from export.multi_image import multi_image_section

    checkpoint = load_checkpoint(checkpoint_dir)
    mlp = PromptMLP.load(prompt_mlp).eval() if prompt_mlp is not None else None
    modules = build_modules(checkpoint, mlp, budget=budget, reducer=reducer, reducer_options=reducer_options,
                            cmai=cmai)
    manifest = build_manifest(checkpoint, modules, mlp, chat_template, visual_positions=visual_positions)
    if adapter is not None or n_max is not None:
        if adapter is not None:
            modules["adapter"] = adapter if isinstance(adapter, torch.nn.Module) else FrameAdapter.load(adapter)
        manifest = replace(manifest, multi_image=multi_image_section(modules.get("adapter"), n_max))
    return Pipeline(manifest, checkpoint.tokenizer_file, TorchBackend(modules, manifest.model),
                    source=f"torch:{checkpoint_dir}")
