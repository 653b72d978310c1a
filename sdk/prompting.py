"""Chat template and tokenization: the user's prompt -> token ids with K image slots.

The template comes from the manifest, e.g. "USER: <image>\n{prompt} ASSISTANT:". As in
transformers' LlavaProcessor, the whole turn is tokenized with the placeholder as one special
token, which is then repeated K times (K = the bundle's visual-token count). The prompt
encoder's text is the same turn without the image ("USER: {prompt}").
"""

from __future__ import annotations

import unicodedata

import numpy as np

from .errors import BundleError, ContextOverflowError, PromptError
from .manifest import ChatTemplate, Manifest, SpecialTokens

# A token never covers more characters than its vocabulary entry has (byte-level entries have one
# character per byte); the factor 4 leaves room for normalizers that shrink text (NFKC).
_CHARS_PER_TOKEN_SLACK = 4


def _load_tokenizer(path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise BundleError(f"tokenizer {path} cannot be read ({str(err)[:120]}): copy the bundle again") from err


class Prompter:
    def __init__(self, tokenizer_path, template: ChatTemplate, special: SpecialTokens, num_visual_tokens: int,
                 max_context: int):
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.template = template
        self.special = special
        self.num_visual_tokens = int(num_visual_tokens)
        self.max_context = int(max_context)
        self.eos_ids = set(special.eos)
        # Every special token, from the manifest and from the tokenizer itself (defence in depth: a
        # tokenizer may know special tokens an older manifest does not list).
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_texts = sorted({*special.texts, *(t.content for t in added.values() if t.special)},
                                    key=len, reverse=True)
        self.special_ids = {int(i) for i, t in added.items() if t.special} | self.eos_ids | {
            int(i) for i in (special.bos, special.pad, special.image) if i is not None}
        # <unk> is what a tokenizer without byte fallback gives for text it has no piece for: ordinary.
        unk = getattr(self.tokenizer.model, "unk_token", None)
        self.special_ids -= {self.tokenizer.token_to_id(unk)} if isinstance(unk, str) else set()
        # A prompt longer than this many characters cannot fit, whatever it says: refuse it before
        # cleaning and tokenizing it (a 100 MB "prompt" must not cost seconds).
        longest = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = _CHARS_PER_TOKEN_SLACK * max(longest, 1) * self.max_context
        # The special tokens of the turn itself; a prompt must add none.
        template_ids = self._encode(template.prompt.replace("{prompt}", "x"))
        self.template_specials = sorted(t for t in template_ids if t in self.special_ids)
        if "{prompt}" not in template.prompt or template_ids.count(special.image) != 1:
            raise BundleError("the bundle's chat_template must hold '{prompt}' and exactly one image placeholder: "
                              "re-export the bundle")

    @classmethod
    def for_manifest(cls, tokenizer_path, manifest: Manifest) -> "Prompter":
        return cls(tokenizer_path, manifest.chat_template, manifest.special_tokens, manifest.visual_tokens.count,
                   manifest.model.max_context)

    def clean(self, prompt) -> str:
        """Refuse what cannot be a prompt; remove what could hijack the template.

        Special-token texts (the image placeholder, end-of-turn...) are removed so a prompt can
        never add image slots or end the turn early; control characters other than newline and
        tab are dropped.
        """
        text = self.clean_text(prompt, "prompt")
        if not text:
            raise PromptError("prompt is empty: ask a question about the image, e.g. 'What is on the table?'")
        return text

    def clean_text(self, text, what: str = "message text") -> str:
        """clean() without the empty check: system prompts and earlier answers of a conversation may be empty."""
        if not isinstance(text, str):
            raise PromptError(f"{what} must be a string, not {type(text).__name__}")
        if len(text) > self.max_prompt_chars:
            raise ContextOverflowError(f"{what} has {len(text)} characters, more than a context of "
                                       f"{self.max_context} tokens can hold: shorten the prompt")
        # Control characters first, so that "<ima\x00ge>" cannot become "<image>" after the strip below;
        # each special text becomes a space, so removing one cannot join its neighbours into another.
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
        for special in self.special_texts:
            text = text.replace(special, " ")
        return text.strip()

    def template_variables(self) -> dict:
        """The special-token variables a chat template reads (bos_token, eos_token, ...): the tokenizer's
        special_tokens_map as the export recorded it; older bundles: the texts of the manifest's ids."""
        if self.template.variables is not None:
            return dict(self.template.variables)
        named = {"bos_token": self.special.bos, "eos_token": self.special.eos[0] if self.special.eos else None,
                 "pad_token": self.special.pad}
        return {name: self.tokenizer.id_to_token(i) for name, i in named.items() if i is not None}

    def _encode(self, text: str) -> list[int]:
        if self.template.add_special_tokens is not None:  # the tokenizer's post-processor decides, as in transformers
            return self.tokenizer.encode(text, add_special_tokens=self.template.add_special_tokens).ids
        # bundles before chat templates came from the checkpoint: BOS by the manifest's flag
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.template.add_bos and self.special.bos is not None:
            ids = [self.special.bos] + ids
        return ids

    def prompt_ids(self, prompt: str, images: int = 1, separator: str = "\n",
                   slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids [T] int64 with `slots` (default K) image slots per image, positions of the image slots
        [images * slots], frame after frame). Several images (sdk/frames.py, concat): the template's placeholder
        is repeated, `separator` between, as LLaVA's templates render one "<image>\\n" per image."""
        template = self.template.prompt
        if images != 1:
            placeholder = self.template.image_placeholder
            if template.count(placeholder) != 1:
                raise BundleError(f"the bundle's chat template does not hold its image placeholder {placeholder!r} "
                                  "as text once: it takes one image per request; re-export it for several")
            template = template.replace(placeholder, separator.join([placeholder] * images))
        ids = self._encode(template.replace("{prompt}", self.clean(prompt)))
        self._check_no_injected_specials(ids, images)
        return self._with_image_slots(ids, "prompt", slots)

    def conversation_ids(self, text: str, images: int = 1, slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A whole rendered conversation (sdk/conversation.py; its texts already cleaned) with `images` image
        placeholders -> (ids [T] int64 with `slots` (default K) image slots per placeholder, positions of the image
        slots [images * slots], frame after frame), tokenized as transformers' processor does."""
        ids = self._encode(text)
        found = ids.count(self.special.image)
        if found != images:
            raise PromptError(f"the conversation renders {found} image placeholders, not {images}: give the image "
                              "(or the frames), in one user turn")
        return self._with_image_slots(ids, "conversation", slots)

    def _with_image_slots(self, ids: list[int], what: str, slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        # each placeholder (the template's, checked at load and in prompt_ids; none from the prompt) -> `slots` ids
        image_id, per_image = self.special.image, self.num_visual_tokens if slots is None else slots
        out, where = [], []
        for token in ids:
            if token == image_id:
                where.extend(range(len(out), len(out) + per_image))
                out.extend([image_id] * per_image)
            else:
                out.append(token)
        if len(out) >= self.max_context:  # prefill plus at least one new token must fit
            images = len(where) // per_image
            raise ContextOverflowError(
                f"{what} needs {len(out)} tokens with the {'image' if images == 1 else f'{images} images'} but the "
                f"context holds {self.max_context}: shorten the {what}"
                + (" or start a new one" if what == "conversation" else "") + (" or send fewer images" if images > 1 else ""))
        return np.asarray(out, np.int64), np.asarray(where, np.int64)

    def _check_no_injected_specials(self, ids: list[int], images: int = 1) -> None:
        """The turn must hold exactly the special tokens of the template itself (its placeholder once per image):
        the prompt adds none (after clean(), only a normalizer mapping look-alike text onto a special token could)."""
        if sorted(t for t in ids if t in self.special_ids) != sorted(self.template_specials
                                                                     + [self.special.image] * (images - 1)):
            raise PromptError("the prompt contains text the tokenizer reads as a special token (image slot, "
                              "end of turn...): remove markup such as '<image>' or '</s>' from it")

    def encoder_ids(self, prompt: str) -> np.ndarray:
        """The prompt encoder's ids: the user turn without the image. [T] int64."""
        text = self.template.prompt_encoder.replace("{prompt}", self.clean(prompt))
        ids = self._encode(text)
        if len(ids) >= self.max_context:  # only reachable with a template longer than the chat turn
            raise ContextOverflowError(f"prompt needs {len(ids)} tokens but the context holds {self.max_context}: "
                                       "shorten the prompt")
        return np.asarray(ids, np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
