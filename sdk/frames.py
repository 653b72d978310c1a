"""Several frames per request (docs/multi-image.md): the images argument, the turn's image slots, and how the
frames' visual tokens become the tokens the LLM sees (the manifest's multi_image section, sdk/manifest_multi.py).

    frames [f1..fn] --preprocess--> pixel_values [n,3,H,W]
    prompt vector [1,D] (PIP-MM, one per request) --repeated--> [n,D]: every frame encoded with the prompt's T-CLS
    vision graph (batch n) -> visual tokens [n,K,D]
    concat:         [1, n*K, D] into n placeholders of the turn (separator between), frame after frame
    qformer/mivpg:  (one frame with single_frame "own": as concat, its own K tokens)
                    padded to [1,N_max,K,D] with frame_mask [1,N_max] (1 = a frame, 0 = absent, zeros)
                    (+ frame_positions [1,N_max,K] int64 when the graph takes it: each token's patch index, the
                    vision graph's kept_patches, or i for token i of a reducer that keeps none)
                    -> the adapter graph -> [1,R,D] into one placeholder of R slots

A single image (path, PIL image, HxWx3 array) is one frame; a list or tuple of them is several, in order (an
NxHxWx3 array is refused as an image of the wrong shape, as before: pass list(array)). Every frame is
preprocessed as a single image would be.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import BundleError, ImageError
from .manifest import Manifest
from .manifest_multi import ADAPTER_MODES, DEFAULT_N_MAX, MultiImage

TEXT_ROOM = 32  # tokens of template and question a frame count must leave room for (bundles without the section)


class FrameCountError(ImageError):
    """No image, or more images than the bundle takes per request (multi_image.n_max)."""


def as_frames(image) -> list:
    """A request's image argument -> its frames, in order (one image is one frame)."""
    frames = list(image) if isinstance(image, (list, tuple)) else [image]
    if not frames:
        raise FrameCountError("no image given: pass one image, or a list of images (frames) in order")
    return frames


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
# preprocessing threads for several frames: PIL's decode and resize and numpy's casts release the GIL, so frames
# preprocess side by side (8 frames took 56 ms one after another on the H200 machine's host, the largest part of
# concat's TTFT there: docs/multi-image.md); PIPMM_PREPROCESS_THREADS=1 turns it off
PREPROCESS_THREADS = max(1, int(os.environ.get("PIPMM_PREPROCESS_THREADS", min(8, os.cpu_count() or 1))))


def preprocess_frames(preprocess, frames: list) -> np.ndarray:
    """preprocess(frame) -> [1,...] for every frame, in order, on up to PREPROCESS_THREADS threads -> [n,...]."""
    global _POOL
    if len(frames) == 1 or PREPROCESS_THREADS == 1:
        return np.concatenate([preprocess(frame) for frame in frames])
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(PREPROCESS_THREADS, thread_name_prefix="pipmm-frames")
    return np.concatenate(list(_POOL.map(preprocess, frames)))


def concat_tokens(backend, tokens: np.ndarray, spec: MultiImage, kept: np.ndarray | None = None,
                  positions: bool = False) -> np.ndarray:
    """[n,K,D] -> [1,n*K,D], frame after frame (the slots of frame i follow those of frame i-1)."""
    n, k, d = tokens.shape
    return tokens.reshape(1, n * k, d)


def pooled_tokens(backend, tokens: np.ndarray, spec: MultiImage, kept: np.ndarray | None = None,
                  positions: bool = False) -> np.ndarray:
    """[n,K,D] (kept [n,K] or None) -> the adapter graph over [1,N_max,K,D], its frame mask (and, when the graph
    reads where each token sits, the tokens' patch indices [1,N_max,K], as training gives them) -> [1,R,D]."""
    n, k, d = tokens.shape
    frame_tokens = np.zeros((1, spec.n_max, k, d), tokens.dtype)
    frame_tokens[0, :n] = tokens
    frame_mask = np.zeros((1, spec.n_max), np.float32)
    frame_mask[0, :n] = 1.0
    if not positions:
        return backend.adapter(frame_tokens, frame_mask)
    frame_positions = np.zeros((1, spec.n_max, k), np.int64)  # absent frames: masked, any index
    frame_positions[0, :n] = np.arange(k) if kept is None else np.asarray(kept, np.int64)
    return backend.adapter(frame_tokens, frame_mask, frame_positions)


# mode -> how the frames' tokens become the LLM's
COMBINERS = {"concat": concat_tokens, "qformer": pooled_tokens, "mivpg": pooled_tokens}


class Frames:
    """A bundle's way of combining frames (its manifest's multi_image section, or concat's defaults)."""

    def __init__(self, manifest: Manifest, source: str = ""):
        self.spec = manifest.multi_image or MultiImage(n_max=self.fitting(manifest))
        self.mode = self.spec.mode
        self.pooled = self.mode in ADAPTER_MODES
        self.per_frame = manifest.visual_tokens.count
        graph = manifest.graphs.get(self.spec.graph) if self.pooled and manifest.graphs else None
        self.positions = graph is not None and graph.input("frame_positions") is not None
        if self.pooled and manifest.graphs:
            self._check_graph(manifest, source)

    @staticmethod
    def fitting(manifest: Manifest, text: int = TEXT_ROOM) -> int:
        """concat's n_max for a bundle without the section: the frames whose positions fit the context beside
        `text` tokens (patch positions: every patch's, visual_tokens.positions), at most DEFAULT_N_MAX."""
        per_frame = manifest.vision.num_patches if manifest.visual_tokens.positions == "patch" else \
            manifest.visual_tokens.count
        return max(1, min(DEFAULT_N_MAX, (manifest.model.max_context - text) // max(1, per_frame)))

    def _check_graph(self, manifest: Manifest, source: str) -> None:
        graph = manifest.graphs.get(self.spec.graph)
        tokens = graph.input("frame_tokens") if graph is not None else None
        out = graph.output("visual_tokens") if graph is not None else None
        want = [1, self.spec.n_max, self.per_frame, manifest.model.hidden_size]
        if tokens is None or out is None or graph.input("frame_mask") is None:
            raise BundleError(f"bundle {source}: multi_image mode {self.mode!r} needs graph {self.spec.graph!r} with "
                              "frame_tokens/frame_mask inputs and a visual_tokens output: add it again with "
                              "'pipmm add-graphs BUNDLE --adapter DIR'")
        if list(tokens.shape) != want or list(out.shape) != [1, self.spec.tokens, manifest.model.hidden_size]:
            raise BundleError(f"bundle {source}: graph {self.spec.graph!r} takes {tokens.shape} -> {out.shape}, but the "
                              f"manifest says {want} -> [1, {self.spec.tokens}, {want[-1]}]: add it again with "
                              "'pipmm add-graphs BUNDLE --adapter DIR --overwrite'")

    @property
    def n_max(self) -> int:
        return self.spec.n_max

    def check(self, count: int) -> None:
        if count > self.spec.n_max:
            raise FrameCountError(f"{count} images, but this bundle takes at most {self.spec.n_max} per request "
                                  f"(multi_image {self.mode}, n_max {self.spec.n_max}): send fewer frames, or see "
                                  "docs/multi-image.md for bundles that take more")

    def pools(self, count: int) -> bool:
        """Whether a turn with `count` frames goes through the adapter (one frame may not: single_frame "own")."""
        return self.pooled and not (count == 1 and self.spec.single_frame == "own")

    def check_steering(self, steering) -> None:
        """Energy referring steers one frame's own K visual tokens; an adapter bundle's LLM sees R pooled ones
        (a single frame of a single_frame "own" bundle is its own tokens)."""
        if steering is not None and self.pools(1):
            raise BundleError(f"referring by energy steers a frame's own visual tokens, but this bundle pools frames "
                              f"with an adapter ({self.mode}): use referring='overlay'")

    def slots(self, count: int) -> int:
        """The image slots of a turn with `count` frames: what the LLM sees."""
        return self.spec.tokens if self.pools(count) else count * self.per_frame

    def prompt_ids(self, prompter, prompt: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids [T], image slots [L]) of a turn with `count` frames (sdk.prompting.Prompter.prompt_ids)."""
        if self.pools(count):  # one placeholder holding the adapter's R tokens, whatever the number of frames
            return prompter.prompt_ids(prompt, 1, slots=self.spec.tokens)
        return prompter.prompt_ids(prompt, count, self.spec.separator)

    def placeholders(self, count: int) -> int:
        """Image placeholders a turn with `count` frames renders: one per frame (concat), one for the adapter's R."""
        return 1 if self.pools(count) else count

    def conversation_ids(self, prompter, text: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """A rendered conversation whose image turn holds placeholders(count) -> (ids [T], image slots [L])."""
        return prompter.conversation_ids(text, self.placeholders(count), self.spec.tokens if self.pools(count) else None)

    def combine(self, backend, tokens: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
        """The vision graph's tokens of the frames [n,K,D] (its kept_patches [n,K] or None) -> the turn's visual
        tokens [1,L,D]."""
        mode = self.mode if self.pools(len(tokens)) else "concat"
        return COMBINERS[mode](backend, tokens, self.spec, kept, self.positions)
