"""Multi-turn chat about one image, or several frames: every turn reuses the KV cache of the turns before it,
the image included.

    conv = pipeline.conversation("frame.jpg")
    conv.ask("What is on the table?").text
    conv.ask("Is it left of the cup?").text      # its prefill covers only this turn's new tokens
    pipeline.chat([{"role": "user", "content": [{"type": "image", "image": "frame.jpg"},
                                                {"type": "text", "text": "What is on the table?"}]}])
    conv = pipeline.conversation(["head.jpg", "wrist.jpg"])   # frames (docs/multi-image.md), in its first turn

Each turn renders the whole conversation with the bundle's chat template and tokenizes it as transformers'
processor tokenizes a whole conversation (`apply_chat_template`), so the ids are exactly transformers'. The
ids already in the cache (earlier turns: their prompts and the tokens generated) are compared with the new ids:
the longest common prefix stays in the cache and only the rest is prefilled. An earlier answer comes back as
the template renders it (its text re-tokenized, the end-of-turn text the template writes after it); where that
re-tokenization differs from the tokens generated, the cache is cut back to the common prefix (numpy caches;
other cache kinds prefill the whole conversation again, the image's visual tokens reused).

Rendering: the checkpoint's Jinja template (manifest chat_template.template), in the environment transformers
renders it in (transformers/utils/chat_template_utils.py: jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, loopcontrols, the {% generation %} tag, tojson, raise_exception, strftime_now),
with the tokenizer's special tokens as variables (bos_token, eos_token, ...). Bundles without a template (the
LLaVA-1.5 fallback, bundles exported before templates) use LLaVA-1.5's conversation:
"USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:" (a system prompt first, followed by a space).

Frames (sdk/frames.py): several images, all in one user turn (the first question's, for conversation()), at
most the bundle's multi_image.n_max. concat: the turn holds one image part per frame, which the template
renders as it renders several images (transformers' way; the manifest's separator is for single-turn
requests), each placeholder K slots, the frames' tokens in order. qformer/mivpg: the turn holds one image
part, its placeholder the adapter's R slots (the single-turn request's layout). Either way the frames are
encoded once and the combined tokens are cached as the image's tokens, so follow-up turns prefill only their
own text.

PIP-MM: the image (every frame) is encoded once per conversation, with the prompt vector of the question in the
image's turn (manifest prompt_vector.conversation = "first-question"; image_question records it). Re-encoding it
per question would change the visual tokens in the cache, so every later turn would prefill the whole
conversation again; the first question is the one the frame was taken for, and the visual tokens stay what the
model answered it with.

Regions (docs/referring.md): a turn may point at part of the image, `conv.ask("What color is this?",
region=sdk.Box(...), referring="controlmllm")`, for that turn only. ControlMLLM's latent is optimised over the
whole conversation as rendered (its queries: every text token after the image, earlier turns included; ++: the
last token) and added to the visual tokens of that turn; overlay encodes the image with the region drawn. The
cache holds the visual tokens of the turn that filled it, so a turn whose visual tokens differ (a region's turn,
and a plain turn after one) prefills again from the image on; the text before the image stays cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

import numpy as np

from .errors import BundleError, PromptError, typed_errors
from .frames import FrameCountError, as_frames, preprocess_frames
from .referring import prepare as prepare_referring

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")
# LLaVA-1.5's conversation (vicuna_v1: sep " ", sep2 "</s>"), for bundles without the checkpoint's template.
# One user turn with the image renders "USER: <image>\n{prompt} ASSISTANT:", the single-turn format.
LLAVA_15_CONVERSATION = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for p in parts if p['type'] == 'text' %}{{ p['text'] }} {% endfor %}"
    "{% elif message['role'] == 'user' %}USER: {% for p in parts if p['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


# -- rendering -------------------------------------------------------------------------------------


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise BundleError("multi-turn chat renders the bundle's chat template with jinja2, which is not "
                          "installed: pip install 'jinja2>=3.1.6'") from err

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2.exceptions.TemplateError


class Renderer:
    """A bundle's chat template, compiled once: messages -> the conversation's text."""

    def __init__(self, template: str | None, variables: dict):
        self.env, self.template_error = _environment()
        self.source = "the checkpoint's template" if template else "LLaVA-1.5's conversation (no template)"
        try:
            self.template = self.env.from_string(template or LLAVA_15_CONVERSATION)
        except self.template_error as err:
            raise BundleError(f"the bundle's chat template does not compile ({_short(err)}): re-export it") from err
        self.variables = variables

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except self.template_error as err:  # the template's own raise_exception(), e.g. roles must alternate
            raise PromptError(f"the chat template refuses this conversation: {_short(err)}") from err
        except Exception as err:  # a template reading a field this conversation lacks
            raise PromptError(f"the chat template cannot render this conversation ({type(err).__name__}: "
                              f"{_short(err)}): check the messages' roles and content") from err


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


# -- messages --------------------------------------------------------------------------------------


def _parts(message: dict, index: int) -> list:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") in PART_TYPES for p in content):
        raise PromptError(f"message {index}: content must be a string or a list of parts "
                          "{'type': 'text', 'text': ...} / {'type': 'image', 'image': ...}")
    return content


def split_image(messages) -> tuple[list[dict], list, int, str]:
    """OpenAI-style messages -> (messages for the template, with {"type": "image"} in each image's place; the
    images (frames) in order; the index of their message; that message's text). One image or several, all in
    one user turn."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out, images = [], []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise PromptError(f"message {index}: role {role!r} is not one of {', '.join(ROLES)}")
        parts = _parts(message, index)
        for part in parts:
            if part["type"] == "image":
                if role != "user":
                    raise PromptError(f"message {index}: an image belongs in a user turn, not a {role} turn")
                if part.get("image") is None:
                    raise PromptError(f"message {index}: an image part needs 'image' (a path, a PIL image or an "
                                      "HxWx3 uint8 array)")
                images.append((part["image"], index))
        content = message["content"] if isinstance(message["content"], str) else [
            {"type": "image"} if p["type"] == "image" else {"type": "text", "text": p.get("text", "")} for p in parts]
        out.append({"role": role, "content": content})
    turns = sorted({index for _, index in images})
    if not images:
        raise PromptError("the conversation holds 0 images: give one (or several frames, in order), in a user turn")
    if len(turns) > 1:
        raise PromptError(f"the images are in {len(turns)} user turns (messages {', '.join(map(str, turns))}): "
                          "several images are frames of one turn and belong in one user message, in order")
    at = turns[0]
    question = " ".join(p["text"] for p in _parts(out[at], at) if p["type"] == "text")
    return out, [image for image, _ in images], at, question


def _placeholders(message: dict, keep: int) -> dict:
    """The image turn with its first `keep` image parts only (an adapter's turn renders one for all frames)."""
    parts, seen = [], 0
    for part in message["content"]:
        seen += part["type"] == "image"
        if part["type"] != "image" or seen <= keep:
            parts.append(part)
    return {**message, "content": parts}


def _cleaned(prompter, message: dict) -> dict:
    """Texts stripped of special-token markup, so no message can add turns or image slots."""
    what = f"{message['role']} message"
    if isinstance(message["content"], str):
        return {**message, "content": prompter.clean_text(message["content"], what)}
    return {**message, "content": [
        {"type": "text", "text": prompter.clean_text(p["text"], what)} if p["type"] == "text" else p
        for p in message["content"]]}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if len(differs) else n


def cut_cache(cache, length: int, next_position: int):
    """The cache's first `length` tokens, or None where its kind cannot be cut here (device or static caches:
    the caller prefills again). numpy caches are cut by slicing; caches with a cut() (the CPU's in-place one,
    runtimes/inplace_cache.py) cut themselves."""
    if hasattr(cache, "cut"):
        return cache.cut(length, next_position)
    past = getattr(cache, "past", None)
    if not (isinstance(past, list) and all(isinstance(p, np.ndarray) for p in past)) or not hasattr(cache, "mask"):
        return None
    return replace(cache, past=[p[:, :, :length] for p in past], length=length, mask=cache.mask[:, :length],
                   next_position=next_position)


def _recording(generator: Iterator[int], into: list[int]):
    """`yield from generator`, appending what it yields to `into`; returns the generator's return value."""
    try:
        while True:
            try:
                item = next(generator)
            except StopIteration as stop:
                return stop.value
            into.append(item)
            yield item
    finally:
        generator.close()


def text_pieces(prompter, tokens: Iterator[int], result) -> Iterator[str]:
    """Text pieces as tokens arrive (their concatenation equals the decoded text); fills result.token_ids."""
    emitted = ""
    for token in tokens:
        result.token_ids.append(token)
        text = prompter.decode(result.token_ids)
        # A byte-level token can end inside a UTF-8 character: hold it back until complete.
        if text.endswith("\ufffd"):
            continue
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = prompter.decode(result.token_ids)
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted):]


# -- the conversation ------------------------------------------------------------------------------


class Conversation:
    """One image (or several frames), many turns. `messages` holds the conversation as the template sees it (the
    image as {"type": "image"}, once per frame for concat, once for an adapter's R tokens); `cached_ids` the token
    ids whose keys and values are in `cache`."""

    def __init__(self, pipeline, image, system: str | None = None):
        if image is None:
            raise PromptError("a conversation is about one image: pass it, e.g. pipeline.conversation('frame.jpg'), "
                              "or a list of frames")
        self.frames = as_frames(image)  # [f1..fn]: one image is one frame
        pipeline.frames.check(len(self.frames))
        self.pipeline = pipeline
        self.renderer = Renderer(pipeline.manifest.chat_template.template, pipeline.prompter.template_variables())
        self.image = image
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.image_question: str | None = None  # PIP-MM: the prompt vector's question
        self.vision = None  # (the vision graph's output [n,K,D], the combined tokens [L,D]), once per conversation
        self.cache = None
        self.cached_ids: list[int] = []
        self.cached_visual = None  # the visual tokens [L, D] in the cache (a region's turn steers them)
        self.prefilled = 0  # tokens the last turn's prefill covered

    @classmethod
    def from_messages(cls, pipeline, messages) -> "Conversation":
        rendered, images, at, question = split_image(messages)
        if rendered[-1]["role"] != "user":
            raise PromptError("the last message must be the user's: chat() answers it")
        conversation = cls(pipeline, images[0] if len(images) == 1 else images)
        keep = pipeline.frames.placeholders(len(images))
        conversation.messages = [_placeholders(m, keep) if i == at else m for i, m in enumerate(rendered)]
        conversation.image_question = question
        return conversation

    @property
    def cache_length(self) -> int:
        return len(self.cached_ids)

    def ask(self, question: str, region=None, referring: str | None = None, **generation) -> "object":
        """Add a user turn and answer it -> Result. generation: max_new_tokens, temperature, top_p, seed,
        min_new_tokens, as Pipeline.generate. region, referring: where on the image this question points, as
        Pipeline.generate, for this turn only (module docstring). Bad arguments are refused before the turn joins."""
        args, result, steer = self._prepare(region, referring, None, generation)
        self._add_question(question)
        return self._answer(args, result, steer)

    def stream(self, question: str, region=None, referring: str | None = None, result=None,
               **generation) -> Iterator[str]:
        """ask() as text pieces; an unfinished stream closed early keeps the answer so far in the conversation."""
        args, result, steer = self._prepare(region, referring, result, generation)
        self._add_question(question)
        return self._pieces(args, result, steer)

    def reply(self, region=None, referring: str | None = None, **generation):
        """Answer the conversation as it stands (its last message the user's) -> Result."""
        return self._answer(*self._prepare(region, referring, None, generation))

    def reply_stream(self, result=None, region=None, referring: str | None = None, **generation) -> Iterator[str]:
        """reply() as text pieces; result: a Result to fill as it goes (token ids, timings, cached_tokens,
        referring)."""
        yield from self._pieces(*self._prepare(region, referring, result, generation))

    def _prepare(self, region, method, result, generation: dict) -> tuple:
        """-> (generation args, the Result to fill, (this turn's image, a Steering or None)). The image is the
        conversation's, or it with the region drawn (overlay); result.referring starts as the turn's report."""
        pipeline = self.pipeline
        args = pipeline.generation_args(*self._generation(**generation))
        result = pipeline.new_result() if result is None else result
        if (region is not None or method is not None) and len(self.frames) != 1:
            raise FrameCountError("referring to a region takes one image: this conversation holds "
                                  f"{len(self.frames)} frames")
        with typed_errors("the referring region"):
            image, steering, report = prepare_referring(pipeline, self.image, region, method)
        pipeline.frames.check_steering(steering)
        result.referring = None if report is None else report.to_dict()
        return args, result, (image, steering)

    def _answer(self, args, result, steer):
        with self.pipeline.request():
            result.token_ids = list(self._turn(args, result, *steer))
        result.text = self.pipeline.prompter.decode(result.token_ids)
        return result

    def _pieces(self, args, result, steer) -> Iterator[str]:
        with self.pipeline.request():
            yield from text_pieces(self.pipeline.prompter, self._turn(args, result, *steer), result)

    @staticmethod
    def _generation(max_new_tokens=None, temperature=None, top_p=None, seed=None, min_new_tokens=None):
        return max_new_tokens, temperature, top_p, seed, min_new_tokens

    def _add_question(self, question: str) -> None:
        question = self.pipeline.prompter.clean(question)
        if self.messages and self.messages[-1]["role"] == "user":
            raise PromptError("the last user turn has no answer yet: call reply() before asking again")
        content = [{"type": "text", "text": question}]
        if self.image_question is None:  # the first question: its turn holds the image (the frames)
            content[:0] = [{"type": "image"}] * self.pipeline.frames.placeholders(len(self.frames))
            self.image_question = question
        self.messages.append({"role": "user", "content": content})

    def _encode(self, image) -> tuple:
        """The image or frames -> (the vision graph's output [n,K,D], the turn's visual tokens [L,D]): every frame
        with the image question's prompt vector (PIP-MM), combined as the bundle says (sdk/frames.py)."""
        pipeline = self.pipeline
        frames = as_frames(image)
        # [n,3,H,W], each frame framed by the pipeline's visual prompt, if any
        pixel_values = preprocess_frames(pipeline.pixel_values, frames)
        vector = None
        if pipeline.prompt_vector_spec is not None:
            vector = np.repeat(pipeline.encode_prompt(self.image_question or "Describe the image."), len(frames), 0)
        vision = pipeline.backend.vision(pixel_values, vector)
        return vision, pipeline.frames.combine(pipeline.backend, vision.visual_tokens, vision.kept_patches)[0]

    def _turn(self, args, result, image=None, steering=None) -> Iterator[int]:
        """Render, prefill what the cache lacks, generate; on completion the answer joins the conversation.
        image: this turn's (the region drawn on it: overlay) when not the conversation's; steering: a region's
        latent for this turn's visual tokens (sdk/referring.py), optimised over the whole conversation."""
        pipeline, backend = self.pipeline, self.pipeline.backend
        t = result.timings
        start = time.perf_counter()
        messages = [_cleaned(pipeline.prompter, m) for m in self.messages]
        ids, image_slots = pipeline.frames.conversation_ids(pipeline.prompter, self.renderer.render(messages),
                                                            len(self.frames))
        result.visual_tokens, result.frames = len(image_slots), len(self.frames)
        t["prompt_ms"] = (time.perf_counter() - start) * 1000.0
        stage = time.perf_counter()
        if self.vision is None:
            self.vision = self._encode(self.image)
        vision, visual = self.vision if image is None or image is self.image else self._encode(image)
        t["vision_ms"] = (time.perf_counter() - stage) * 1000.0

        stage = time.perf_counter()  # the adapter's R tokens have no patch of their own: sequence positions
        pooled = pipeline.frames.pools(len(self.frames))
        positions = None if pooled else pipeline.prefill_positions(len(ids), image_slots, vision)
        positions = np.arange(len(ids), dtype=np.int64) if positions is None else positions[0]
        whole = None
        if steering is not None:  # the energy reads the whole conversation's attention to the image
            whole = backend.embed(ids[None]).copy()
            whole[0, image_slots] = visual.astype(whole.dtype)
            whole = steering(whole, image_slots, positions[None], vision)
            result.referring = steering.report.to_dict()
            t["referring_ms"] = (time.perf_counter() - stage) * 1000.0
            visual = whole[0, image_slots]
        keep = min(common_prefix(self.cached_ids, ids.tolist()), len(ids) - 1)  # prefill >= 1 token: its logits
        if self.cached_visual is not None and not np.array_equal(self.cached_visual, visual):
            keep = min(keep, int(image_slots[0]))  # the cache holds other visual tokens: prefill from the image on
        cache = self.cache if keep == len(self.cached_ids) else None
        if cache is None and keep > 0:
            cache = cut_cache(self.cache, keep, int(positions[keep - 1]) + 1)
        if cache is None:
            keep, cache = 0, backend.new_cache(1)
        embeds = backend.embed(ids[None, keep:]).copy() if whole is None else whole[:, keep:]
        inside = image_slots >= keep
        embeds[0, image_slots[inside] - keep] = visual[inside].astype(embeds.dtype)
        logits, _, cache = backend.decoder(embeds, cache, positions[None, keep:])
        result.cached_tokens, self.prefilled = keep, len(ids) - keep
        t["prefill_ms"] = (time.perf_counter() - stage) * 1000.0

        tokens: list[int] = []
        try:
            cache = yield from _recording(pipeline.decode_tokens(logits, cache, args, result, start), tokens)
        except GeneratorExit:  # a stream closed early: the answer so far joins the conversation, the cache of
            self._answered(tokens)  # earlier turns stays valid and the next turn prefills the rest
            raise
        self.cache, self.cached_visual = cache, visual
        self.cached_ids = ids.tolist() + tokens[:cache.length - len(ids)]  # a final EOS is never fed
        self._answered(tokens)

    def _answered(self, tokens: list[int]) -> None:
        answer = self.pipeline.prompter.decode(tokens)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
