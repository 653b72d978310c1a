"""Chat template and tokenization: the user's prompt -> token ids with K image slots.

The template comes from the manifest, e.g. "USER: <image>\n{prompt} ASSISTANT:". As in
transformers' LlavaProcessor, the whole turn is tokenized with the placeholder as one special
token, which is then repeated K times (K = the bundle's visual-token count). The prompt
encoder's text is the same turn without the image ("USER: {prompt}").
"""

from __future__ import annotations

import unicodedata

import numpy as np

from .errors import PromptError


def _load_tokenizer(path):
    from tokenizers import Tokenizer

    from .errors import BundleError

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise BundleError(f"tokenizer {path} cannot be read ({str(err)[:120]}): copy the bundle again") from err


class Prompter:
    def __init__(self, tokenizer_path, manifest: dict):
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.template = manifest["chat_template"]
        self.special = manifest["special_tokens"]
        self.num_visual_tokens = int(manifest["visual_tokens"]["count"])
        self.max_context = int(manifest["model"]["max_context"])
        self.eos_ids = set(self.special["eos"])

    def clean(self, prompt) -> str:
        """Refuse what cannot be a prompt; remove what could hijack the template.

        Special-token texts (the image placeholder, end-of-turn...) are removed so a prompt can
        never add image slots or end the turn early; control characters other than newline and
        tab are dropped.
        """
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a string, not {type(prompt).__name__}")
        text = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
        for special in sorted(self.special.get("texts", []), key=len, reverse=True):
            text = text.replace(special, " ")
        text = text.strip()
        if not text:
            raise PromptError("prompt is empty: ask a question about the image, e.g. 'What is on the table?'")
        return text

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.template.get("add_bos", True) and self.special.get("bos") is not None:
            ids = [int(self.special["bos"])] + ids
        return ids

    def prompt_ids(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids [T] int64 with K image slots, positions of the image slots [K])."""
        text = self.template["prompt"].replace("{prompt}", self.clean(prompt))
        ids = self._encode(text)
        image_id = int(self.special["image"])
        slots = [i for i, t in enumerate(ids) if t == image_id]
        if len(slots) != 1:
            raise PromptError(f"the chat template yields {len(slots)} image placeholders, not 1: fix the bundle's "
                              "chat_template")
        at = slots[0]
        ids = ids[:at] + [image_id] * self.num_visual_tokens + ids[at + 1:]
        if len(ids) >= self.max_context:
            from .errors import ContextOverflowError

            raise ContextOverflowError(
                f"prompt needs {len(ids)} tokens with the image but the context holds {self.max_context}: "
                "shorten the prompt")
        return np.asarray(ids, np.int64), np.arange(at, at + self.num_visual_tokens)

    def encoder_ids(self, prompt: str) -> np.ndarray:
        """The prompt encoder's ids: the user turn without the image. [T] int64."""
        return np.asarray(self._encode(self.template["prompt_encoder"].replace("{prompt}", self.clean(prompt))),
                          np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
