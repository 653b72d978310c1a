"""The Pipeline: image + prompt -> text, through a backend that runs the bundle's graphs.

    image (or several frames, sdk/frames.py) --preprocess--> pixel_values [n,3,H,W]
    prompt --template, no image--> embed -> decoder (fresh cache) -> hidden -> prompt vector   (PIP-MM only;
           sdk/prompt_pass.py: or the first-L-layers prompt_encoder graph, or, prompt-first templates, the
           prefill's own prefix, whose KV cache the prefill then continues)
    pixel_values (+ prompt vector) --vision--> visual tokens [n, K, D]
    frames combined (manifest multi_image: concat -> [n*K, D]; qformer/mivpg: the adapter graph -> [R, D])
    template with those image slots --embed--> embeddings, image slots := visual tokens
    prefill: decoder over the whole turn -> logits, KV cache
             (inhibit > 0, CMAI: [text, image] -> cache; the prompt's text -> attention -> focus -> image_bias;
              the prompt's text again with image_bias -> logits, cache. sdk/cmai.py)
    decode:  sample -> embed -> decoder (T=1) -> logits ... until EOS, max_new_tokens or a full context
             (greedy on a bundle whose decoder_fused takes token ids and gives next_token: token id -> one session
              run -> the device's argmax, 8 bytes to the host; runtimes/fused_device.py)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtimes.vision_output import VisionOutput

from . import cmai, prompt_pass
from .bundle import default_bundle_path, load_bundle
from .conversation import Conversation, text_pieces
from .errors import BundleError, ContextOverflowError, PipelineBusyError, PipmmError, one_line, typed_errors
from .explain import Explanation, explain, require_attention
from .frames import FrameCountError, Frames, as_frames, preprocess_frames
from .generation import GenerationArgs, choose
from .manifest import Manifest
from .preprocess import pixel_input
from .prompting import Prompter
from .referring import prepare as prepare_referring
from .visual_prompt import VisualPrompt, VisualPromptError, resolve as resolve_visual_prompt


@dataclass
class Result:
    """timings, ms unless named otherwise: preprocess_ms, prompt_ms, vision_ms, prefill_ms; ttft_ms (from the
    start of the request to the first generated token); decode_ms (the decoder steps after the first token,
    each giving one token, end-of-sequence included; time a stream()'s caller spends between tokens is not
    counted); decode_ms_per_token = decode_ms / steps and tokens_per_s = steps / decode_ms, steps being
    len(token_ids) - 1 (+ 1 when generation ended at end-of-sequence), 0 when no step ran; total_ms.
    With min_new_tokens = max_new_tokens = N that is (N - 1) / decode_ms, the convention of llama.cpp and of
    transformers' streamer timings (export/compare_hf.py). PIP-MM: prompt_prefix_tokens, the prefill ids whose KV
    cache came from the prompt pass (prompt-first bundles, sdk/prompt_pass.py; prefill_ms then covers the rest)."""

    text: str
    token_ids: list[int]
    visual_tokens: int
    finish_reason: str  # "eos", "length" (max_new_tokens) or "context" (the context window is full)
    timings: dict[str, float] = field(default_factory=dict)
    inhibited: int = 0  # CMAI: visual tokens masked from the text's attention (per CMAI layer)
    cached_tokens: int = 0  # conversations: tokens of earlier turns taken from the KV cache, not prefilled again
    referring: dict | None = None  # region requests: method, region, steps, energy per step (sdk/referring.py)
    frames: int = 1  # images of the request (sdk/frames.py); visual_tokens counts what the LLM saw of them all

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids,
                "stats": {"visual_tokens": self.visual_tokens, "frames": self.frames, "finish_reason": self.finish_reason,
                          "inhibited_visual_tokens": self.inhibited, "cached_tokens": self.cached_tokens,
                          **({"referring": self.referring} if self.referring is not None else {}),
                          **self.timings}}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Pipeline:
    def __init__(self, manifest: Manifest, tokenizer_path, backend, source: str = "", visual_prompt=None):
        self.manifest = manifest
        self.backend = backend
        self.source = source
        self.prompter = Prompter.for_manifest(tokenizer_path, manifest)
        self.preprocessing = manifest.image_preprocessing
        # TVP (sdk/visual_prompt.py): a pixel frame added in preprocessing; a request's visual_prompt= overrides it
        self.visual_prompt = None
        self.visual_prompt = self.framing(visual_prompt)
        self.prompt_vector_spec = manifest.prompt_vector
        self.prompt_vectors = prompt_pass.VectorCache()  # repeated prompts skip the prompt pass (sdk/prompt_pass.py)
        self.max_context = manifest.model.max_context
        self.defaults = manifest.generation
        self.visual_positions = manifest.visual_tokens.positions
        self.cmai = manifest.cmai  # None: the decoder has no image_bias input
        self.frames = Frames(manifest, source)  # how several frames combine (sdk/frames.py)
        self.energy_graph = None  # referring's energy_grad session, opened on first use (sdk/referring.py)
        vision_outputs = [o.name for o in manifest.graphs["vision"].outputs] if manifest.graphs else []
        if self.visual_positions == "patch" and manifest.graphs and "kept_patches" not in vision_outputs:
            raise BundleError("the bundle puts visual tokens at patch positions but its vision graph has no "
                              "kept_patches output (exported before it): re-export it with 'pipmm export ... "
                              "--visual-positions patch'")
        # One request at a time per Pipeline: the backends' sessions are shared state. Callers from
        # several threads are serialised here; use one Pipeline per thread for parallelism.
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread id holding _lock (to refuse re-entry instead of deadlocking)

    @classmethod
    def load(cls, bundle=None, backend: str = "auto", device: str = "auto", verify: bool = True,
             visual_prompt=None) -> "Pipeline":
        """visual_prompt: a prompt directory or VisualPrompt instead of the bundle's own, False for none."""
        from runtimes import backend_class

        path = default_bundle_path() if bundle is None else Path(bundle)
        loaded = load_bundle(path, verify=verify)
        section = loaded.manifest.visual_prompt
        attached = VisualPrompt.from_section(path, section) if section is not None and visual_prompt is None else None
        try:
            runner = backend_class(backend)(loaded, device=device)
            return cls(loaded.manifest, loaded.tokenizer_path, runner, source=str(path),
                       visual_prompt=attached if visual_prompt is None else visual_prompt)
        except PipmmError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a manifest field of the wrong form
            raise BundleError(f"bundle {path} has a malformed manifest ({one_line(err)}): re-export it") from err

    @property
    def num_visual_tokens(self) -> int:
        return self.manifest.visual_tokens.count

    # -- stages ---------------------------------------------------------------------------------

    def framing(self, visual_prompt=None) -> VisualPrompt | None:
        """The TVP prompt a request uses: None = the pipeline's, False = none, or a prompt directory / VisualPrompt
        (refused in one line when its input size is not the bundle's)."""
        prompt = resolve_visual_prompt(visual_prompt, self.visual_prompt)
        if prompt is not None and prompt is not self.visual_prompt:
            prompt.check_fits(self.preprocessing, f"bundle {self.source or '(in memory)'}")
        return prompt

    def pixel_values(self, image, visual_prompt=None) -> np.ndarray:
        """The vision graph's input for one image: float [1,3,H,W] (uint8 [1,H,W,3] where the graph normalises,
        sdk.preprocess.pixel_input), framed by the visual prompt when one applies (sdk/visual_prompt.py)."""
        prompt = self.framing(visual_prompt)
        if prompt is None:
            return pixel_input(image, self.preprocessing)
        return prompt.pixel_input(image, self.preprocessing)  # uint8 bundles: the frame rounded to uint8 levels

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """PIP-MM's prompt vector [1, D_llm]: the hidden state over the prompt, no image (sdk/prompt_pass.py)."""
        return prompt_pass.run(self, prompt).vector

    def prefill_positions(self, length: int, image_slots: np.ndarray, vision: VisionOutput) -> np.ndarray | None:
        """Position ids [1,T] of the prefill when the manifest puts visual tokens at their patch
        positions (visual_tokens.positions == "patch"), else None (contiguous, runtimes/positions.py).

        The vision graph's kept_patches [n,K] are the patches the reducer gathered, in raster order:
        token k of a frame sits at the frame's first slot + its patch index, and whatever follows the frame
        (the next frame, the text) at its full-budget place, shifted by N - K per frame before it.
        """
        if self.visual_positions != "patch":
            return None
        k, n = self.num_visual_tokens, vision.cls_attention.shape[-1]
        positions = np.arange(length, dtype=np.int64)
        for kept, slots in zip(vision.kept_patches, image_slots.reshape(-1, k)):
            positions[slots] = positions[slots[0]] + kept
            positions[slots[-1] + 1:] += n - k
        if positions[-1] + 1 >= self.max_context:  # prefill plus one new token must have positions
            raise ContextOverflowError(f"prompt needs positions up to {positions[-1] + 1} with the image's "
                                       f"{n} patch positions but the context holds {self.max_context}: "
                                       "shorten the prompt")
        return positions[None]

    def prefill(self, input_embeds: np.ndarray, position_ids: np.ndarray | None = None, prefix=None):
        """Whole turn [1,T,D] with a fresh cache -> (last logits [1,V], cache); position_ids [1,T] or
        None for 0..T-1. prefix (cache, n): the KV cache of the turn's first n rows (sdk/prompt_pass.py), which
        only the rows after them continue."""
        if prefix is None:
            cache = self.backend.new_cache(input_embeds.shape[0])
        else:
            cache, n = prefix
            input_embeds, position_ids = input_embeds[:, n:], None if position_ids is None else position_ids[:, n:]
        if position_ids is None:
            logits, _, cache = self.backend.decoder(input_embeds, cache)
        else:
            logits, _, cache = self.backend.decoder(input_embeds, cache, position_ids)
        return logits, cache

    def inhibited_prefill(self, input_embeds: np.ndarray, position_ids: np.ndarray | None, image_slots: np.ndarray,
                          fraction: float, prefix=None):
        """CMAI prefill -> (last logits [1,V], cache, image_bias [1,L_c,T] for the following calls, masked count).

        The text after the image is run twice over the cache of everything before it: once with no bias to
        read its attention (focus scores), once with the lowest `fraction` of image tokens masked at the
        CMAI layers. Only text queries see the bias: the image tokens and the text before them are
        prefilled without it, as in one plain prefill.
        """
        split = int(image_slots[-1]) + 1  # first text token after the image
        if split >= input_embeds.shape[1]:  # no prompt text after the image: nothing to weigh focus by
            logits, cache = self.prefill(input_embeds, position_ids, prefix)
            return logits, cache, None, 0
        head, tail = (None, None) if position_ids is None else (position_ids[:, :split], position_ids[:, split:])
        _, before = self.prefill(input_embeds[:, :split], head, prefix)
        text = input_embeds[:, split:]
        attention = self.backend.attention(text, before, tail)  # [1, L_c, T_b, split + T_b]
        text_slots = np.arange(split, input_embeds.shape[1])
        focus = cmai.focus_scores(attention[0].astype(np.float32), image_slots, text_slots)  # [L_c, K]
        bias, count = cmai.inhibition_bias(focus, fraction, image_slots, input_embeds.shape[1],
                                             self.cmai.to_dict())
        logits, _, cache = self.backend.decoder(text, before, tail, image_bias=bias)
        return logits, cache, bias, count

    def decode(self, token_id: int, cache, image_bias: np.ndarray | None = None, greedy: bool = False):
        """One new token -> (logits [1,V], cache grown by one); image_bias [1,L_c,P+1] (CMAI) or None. greedy: the
        backend may give a DeviceChoice instead of the logits (sdk/generation.py: its argmax made on the device)."""
        fused = getattr(self.backend, "decode_token", None)  # embed + decoder in one backend call, where offered
        if fused is not None:
            return fused(token_id, cache, image_bias, greedy=greedy)
        embeds = self.backend.embed(np.asarray([[token_id]], np.int64))
        logits, _, cache = self.backend.decoder(embeds, cache, image_bias=image_bias)
        return logits, cache

    # -- requests -------------------------------------------------------------------------------

    @contextmanager
    def request(self):
        """One request at a time; typed errors only. A thread that still holds the Pipeline (an
        unfinished stream()) gets PipelineBusyError instead of waiting for itself forever."""
        if self._owner == threading.get_ident():
            raise PipelineBusyError("this thread is still iterating a stream() of this Pipeline: finish it or "
                                    "call its close() before the next request")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                with typed_errors("the request"):
                    yield
            finally:
                self._owner = None

    def _tokens(self, image, prompt, args: GenerationArgs, result: Result, inhibit: float = 0.0,
                steering=None, visual_prompt: VisualPrompt | None = None) -> Iterator[int]:
        """Yields generated token ids one by one, filling result.timings as it goes (visual_prompt: the
        request's, already resolved by framing(); None = no frame)."""
        t = result.timings
        start = time.perf_counter()
        frames = as_frames(image)
        self.frames.check(len(frames))
        # [n,3,H,W] float, or uint8 [n,H,W,3] where the vision graph normalises; each frame framed by the
        # request's visual prompt, if any
        framing = False if visual_prompt is None else visual_prompt
        pixel_values = preprocess_frames(lambda frame: self.pixel_values(frame, framing), frames)
        t["preprocess_ms"] = _ms(start)

        stage = time.perf_counter()
        ids, image_slots = self.frames.prompt_ids(self.prompter, prompt, len(frames))
        passed = prompt_pass.run(self, prompt, ids) if self.prompt_vector_spec is not None else None
        prompt_vector = passed.vector if passed is not None else None
        prefix = (passed.cache, passed.length) if passed is not None and passed.cache is not None else None
        t["prompt_ms"] = _ms(stage)
        if passed is not None:  # prefill ids taken from the prompt pass's KV cache (0: a separate pass)
            t["prompt_prefix_tokens"] = passed.length

        stage = time.perf_counter()  # every frame with the request's one prompt vector (PIP-MM's T-CLS)
        vision = self.backend.vision(pixel_values, None if prompt_vector is None else
                                     np.repeat(prompt_vector, len(frames), axis=0))
        t["vision_ms"] = _ms(stage)
        stage = time.perf_counter()
        visual = self.frames.combine(self.backend, vision.visual_tokens, vision.kept_patches)  # [1, L, D]
        pooled = self.frames.pools(len(frames))  # several frames through the adapter (sdk/frames.py)
        if pooled:
            t["adapter_ms"] = _ms(stage)
        result.visual_tokens, result.frames = len(image_slots), len(frames)

        stage = time.perf_counter()
        embeds = self.backend.embed(ids[None]).copy()
        embeds[0, image_slots] = visual[0].astype(embeds.dtype)
        # the adapter's R tokens have no patch of their own: sequence positions
        positions = None if pooled else self.prefill_positions(len(ids), image_slots, vision)
        if steering is not None:  # referring: the latent joins the image rows before prefill
            embeds = steering(embeds, image_slots, positions, vision)
            result.referring = steering.report.to_dict()
            t["referring_ms"] = _ms(stage)
        bias = None
        if inhibit > 0:
            logits, cache, bias, result.inhibited = self.inhibited_prefill(embeds, positions, image_slots, inhibit,
                                                                           prefix)
        else:
            logits, cache = self.prefill(embeds, positions, prefix)
        t["prefill_ms"] = _ms(stage)

        yield from self.decode_tokens(logits, cache, args, result, start, bias)

    def decode_tokens(self, logits, cache, args: GenerationArgs, result: Result, start: float,
                      bias: np.ndarray | None = None):
        """The tokens after a prefill whose last logits are `logits`: yields ids one by one, fills
        result's finish_reason and timings, and returns the cache of every token fed (for `yield from`)."""
        t = result.timings
        rng = np.random.default_rng(args.seed)
        eos = sorted(self.prompter.eos_ids)
        generated = steps = 0
        decode_ms, step_start = 0.0, None
        result.finish_reason = "length"
        while True:
            token = choose(logits, args, rng, [] if generated >= args.min_new_tokens else eos)
            if step_start is None:
                t["ttft_ms"] = _ms(start)
            else:
                decode_ms += _ms(step_start)
            if token in self.prompter.eos_ids:
                result.finish_reason = "eos"
                break
            generated += 1
            yield token
            if generated >= args.max_new_tokens:
                break
            if cache.next_position + 1 > self.max_context:  # the next token would have no position left
                result.finish_reason = "context"
                break
            step_start = time.perf_counter()
            bias = cmai.grow(bias)  # the new token's own position is never inhibited
            logits, cache = self.decode(token, cache, bias, greedy=args.temperature == 0.0)
            steps += 1
        t["decode_ms"] = decode_ms
        t["decode_ms_per_token"] = decode_ms / steps if steps else 0.0
        t["tokens_per_s"] = steps / (decode_ms / 1000.0) if steps and decode_ms > 0 else 0.0
        t["total_ms"] = _ms(start)
        return cache

    def new_result(self) -> Result:
        return Result(text="", token_ids=[], visual_tokens=self.num_visual_tokens, finish_reason="length")

    def generation_args(self, max_new_tokens, temperature, top_p, seed, min_new_tokens=None) -> GenerationArgs:
        d = self.defaults
        return GenerationArgs.checked(
            d.max_new_tokens if max_new_tokens is None else max_new_tokens,
            d.temperature if temperature is None else temperature,
            d.top_p if top_p is None else top_p, seed, self.max_context,
            0 if min_new_tokens is None else min_new_tokens)

    def _inhibit(self, inhibit) -> float:
        """inhibit as a fraction in [0, 1) (sdk/cmai.py); > 0 needs a bundle with CMAI inputs."""
        fraction = cmai.check_fraction(inhibit)
        if fraction > 0 and self.cmai is None:
            raise BundleError(f"bundle {self.source or '(in memory)'} has no CMAI inputs (exported before CMAI, or "
                              "with --cmai-layers none): re-export it with 'pipmm export' to use inhibit")
        return fraction

    def generate(self, image, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, inhibit: float | None = None,
                 min_new_tokens: int | None = None, region=None, referring: str | None = None,
                 visual_prompt=None) -> Result:
        """image: one image (path, PIL image, HxWx3 uint8 array) or a list of them, frames in order (at most
        manifest multi_image.n_max; sdk/frames.py). inhibit: CMAI, the fraction of visual tokens masked from the
        text's attention (0 or None = off).
        min_new_tokens: end-of-sequence is suppressed until this many tokens were generated (None = 0).
        region: sdk.Box / Point / Scribble / Mask the question refers to; referring: "controlmllm",
        "controlmllm++" (the bundle's energy_grad graph) or "overlay" (None: the bundle's default;
        docs/referring.md). visual_prompt: a TVP prompt directory or VisualPrompt for this request, False for
        none (None: the pipeline's, docs/tvp.md)."""
        args = self.generation_args(max_new_tokens, temperature, top_p, seed, min_new_tokens)
        fraction = self._inhibit(inhibit)
        result = self.new_result()
        framed = self.framing(visual_prompt)
        image, steering = self._referring(image, region, referring, result, framed)
        with self.request():
            result.token_ids = list(self._tokens(image, prompt, args, result, fraction, steering, framed))
        result.text = self.prompter.decode(result.token_ids)
        return result

    def _referring(self, image, region, referring, result: Result, framed: VisualPrompt | None = None):
        """-> (the image to encode, a Steering or None); result.referring starts as the request's report."""
        if (region is not None or referring is not None) and len(as_frames(image)) != 1:
            raise FrameCountError("referring to a region takes one image: pass a single frame with region=")
        with typed_errors("the referring region"):
            image, steering, report = prepare_referring(self, image, region, referring)
        self.frames.check_steering(steering)
        if steering is not None and framed is not None:
            raise VisualPromptError("referring by energy (controlmllm) maps the region onto unframed patches: pass "
                                    "visual_prompt=False (--visual-prompt none) or referring='overlay'")
        result.referring = None if report is None else report.to_dict()
        return image, steering

    def describe(self, image, prompt: str = "Describe the image.", **kwargs) -> str:
        return self.generate(image, prompt, **kwargs).text

    def explain(self, image, prompt: str = "Describe the image.", decoder: bool = False,
                max_new_tokens: int | None = None) -> Explanation:
        """Where the model looked (sdk/explain.py): the T-CLS attention over patches as a heat map, the kept
        patches outlined; decoder=True shows the greedy answer's attention over the visual tokens (CMAI bundles)."""
        if decoder:
            require_attention(self)
        answer = self.generate(image, prompt, max_new_tokens=max_new_tokens, temperature=0.0) if decoder else None
        with self.request():
            return explain(self, image, prompt, None if answer is None else answer.token_ids,
                           None if answer is None else answer.text)

    def stream(self, image, prompt: str = "Describe the image.", max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               inhibit: float | None = None, min_new_tokens: int | None = None, region=None,
               referring: str | None = None, result: Result | None = None, visual_prompt=None) -> Iterator[str]:
        """Yields text pieces as tokens are decoded (their concatenation equals describe()'s text).
        region, referring: as generate (the latent is optimised before the first piece).
        result: a Result to fill as it goes (token_ids, finish_reason, timings, referring; text stays empty)."""
        args = self.generation_args(max_new_tokens, temperature, top_p, seed, min_new_tokens)
        fraction = self._inhibit(inhibit)
        result = self.new_result() if result is None else result
        framed = self.framing(visual_prompt)
        image, steering = self._referring(image, region, referring, result, framed)
        with self.request():
            yield from text_pieces(self.prompter, self._tokens(image, prompt, args, result, fraction, steering,
                                                               framed), result)

    # -- conversations (sdk/conversation.py) ------------------------------------------------------

    def conversation(self, image, system: str | None = None) -> Conversation:
        """A multi-turn chat about one image, or a list of frames (at most multi_image.n_max, in the first
        question's turn): conv.ask(question) -> Result, conv.stream(question); each turn reuses the KV cache of
        the turns before it, the image (the frames' combined tokens) included."""
        return Conversation(self, image=image, system=system)

    def chat(self, messages: list[dict], max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, min_new_tokens: int | None = None,
             region=None, referring: str | None = None) -> Result:
        """OpenAI-style messages (roles system/user/assistant; content a string or parts {"type": "text",
        "text": ...} / {"type": "image", "image": path, PIL image or array}; one image, or several frames in order,
        all in one user turn; the last
        message the user's) -> the assistant's reply. region, referring: on the image, for this reply (as
        generate; sdk/conversation.py)."""
        return Conversation.from_messages(self, messages).reply(max_new_tokens=max_new_tokens,
                                                                temperature=temperature, top_p=top_p, seed=seed,
                                                                min_new_tokens=min_new_tokens, region=region,
                                                                referring=referring)
