"""The checkpoint's own conversation format: its chat template, BOS rule and tokenizer, as transformers runs them.

transformers' LlavaProcessor.apply_chat_template renders the checkpoint's Jinja template, then tokenizes the
text with the tokenizer's own special-token rule (its post-processor; the processor passes
add_special_tokens=False only when the rendered text already starts with the BOS text,
transformers/processing_utils.py `apply_chat_template`), and expands the one image placeholder into the
image's token count. The export renders one user turn (an image and a sentinel question) with the same
template and tokenizer, turns it into the manifest's `chat_template` (`prompt` with `{prompt}` and the
placeholder, `prompt_encoder` = the user turn up to the end of the question, `add_special_tokens`), writes
the tokenizer as transformers has it loaded (its post-processor included: e.g. LlamaTokenizerFast rebuilds
it from add_bos_token), and checks that the device side's tokenization of the sentinel turn gives exactly
transformers' ids.

Where the template comes from, in transformers' order: chat_template.jinja, chat_template.json (legacy
processor file), processor_config.json's key, tokenizer_config.json's key (or a .jinja file it names).
A checkpoint with none (the LLaVA-1.5 hub layout before templates, and our own default model) gets
LLaVA-1.5's format, tokenized with the tokenizer's own rule, as `processor(text=...)` would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdk.errors import ExportError
from sdk.manifest import ChatTemplate

# A question no template rewrites (no spaces to trim, no markup, no case to change in any filter we know of).
SENTINEL = "PIPMMQUESTIONSENTINEL"
# LLaVA-1.5's conversation, the manifest's defaults (llava-hf/llava-1.5-7b-hf's chat_template.json renders exactly
# this for one user turn).
LLAVA_15 = ChatTemplate()
IMAGE_PLACEHOLDER = LLAVA_15.image_placeholder
# Files that may hold the template, in the order transformers' processor loading reads them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


@dataclass
class ConversationFormat:
    """What the manifest's chat_template needs, and where each part came from (pipmm export prints it)."""
    prompt: str  # the user turn with the image placeholder and {prompt}, generation prompt included
    prompt_encoder: str  # the user turn without the image, up to the end of {prompt}
    add_special_tokens: bool  # passed to the tokenizer's encode: its post-processor adds BOS (or not)
    template: str | None  # the Jinja source, for multi-turn rendering; None for the LLaVA-1.5 fallback
    source: str  # the file the template came from, or "LLaVA-1.5 (no template in the checkpoint)"
    bos_rule: str  # in words: which BOS the tokenized turn starts with, and why
    tokenizer_adds_bos: bool  # the post-processor's only addition is BOS: what add_bos meant to older SDKs
    variables: dict  # the template's special-token variables, as the processor passes them (special_tokens_map)

    def manifest_entry(self) -> dict:
        return {"prompt": self.prompt, "prompt_encoder": self.prompt_encoder, "image_placeholder": IMAGE_PLACEHOLDER,
                "add_special_tokens": self.add_special_tokens, "add_bos": self.tokenizer_adds_bos,
                "template": self.template, "source": self.source,
                "bos_rule": self.bos_rule, "variables": self.variables}


def template_source(checkpoint_dir: Path) -> tuple[str, str] | None:
    """(file name, Jinja source) of the checkpoint's chat template, or None."""
    for name in TEMPLATE_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return name, path.read_text()
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise ExportError(f"{path} is not valid JSON ({err}): fix or remove it") from err
        template = raw.get("chat_template") if isinstance(raw, dict) else None
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template:
            return name, template
    return None


def load_tokenizer(checkpoint_dir: Path):
    """The checkpoint's tokenizer as transformers loads it (tokenizer_config.json's flags applied)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint_dir)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError for broken tokenizer files
        raise ExportError(f"transformers cannot load the tokenizer of {checkpoint_dir} "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]}): fix its tokenizer files") from err


def _render(tokenizer, template: str, content: list[dict], generation_prompt: bool) -> str:
    messages = [{"role": "user", "content": content}]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or the template's own raise_exception()
        raise ExportError(f"the checkpoint's chat template cannot render a user turn with an image "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err


def _single(text: str, piece: str, what: str) -> int:
    if text.count(piece) != 1:
        raise ExportError(f"the chat template renders {text.count(piece)} {what} for one user turn, not one: "
                          f"pass a template with --chat-template that places it once")
    return text.index(piece)


def conversation_format(checkpoint_dir: str | Path, tokenizer=None) -> ConversationFormat:
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
    found = template_source(checkpoint_dir)
    if found is None:
        prompt, encoder, template, source = LLAVA_15.prompt, LLAVA_15.prompt_encoder, None, \
            "LLaVA-1.5 (no template in the checkpoint)"
        rendered = prompt.replace("{prompt}", SENTINEL)
    else:
        source, template = found
        rendered = _render(tokenizer, template, [{"type": "image"}, {"type": "text", "text": SENTINEL}], True)
        _single(rendered, IMAGE_PLACEHOLDER, f"image placeholders {IMAGE_PLACEHOLDER!r}")
        _single(rendered, SENTINEL, "questions")
        prompt = rendered.replace(SENTINEL, "{prompt}")
        text_only = _render(tokenizer, template, [{"type": "text", "text": SENTINEL}], False)
        at = _single(text_only, SENTINEL, "questions")
        encoder = text_only[:at] + "{prompt}"
    bos = tokenizer.bos_token
    starts_with_bos = bos is not None and rendered.startswith(bos)
    add_special_tokens = not starts_with_bos  # transformers' processor rule (module docstring)
    plain = tokenizer(rendered, add_special_tokens=False).input_ids
    ids = tokenizer(rendered, add_special_tokens=add_special_tokens).input_ids
    if starts_with_bos:
        rule = f"the template writes {bos!r} itself; the tokenizer adds nothing"
    elif ids == plain:
        rule = "no BOS: neither the template nor the tokenizer's post-processor adds one"
    else:
        added = [tokenizer.convert_ids_to_tokens(i) for i in ids if i not in plain]
        rule = f"the tokenizer's post-processor adds {', '.join(map(repr, added))}"
    return ConversationFormat(prompt=prompt, prompt_encoder=encoder, add_special_tokens=add_special_tokens,
                              template=template, source=source, bos_rule=rule,
                              variables={k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
                              tokenizer_adds_bos=add_special_tokens and ids[1:] == plain and ids[:1] != plain[:1])


def save_tokenizer(tokenizer, path: Path) -> None:
    """tokenizer.json as transformers runs it: the backend with the post-processor it rebuilt at load."""
    tokenizer.backend_tokenizer.save(str(path))


# Questions whose ends could tempt a tokenizer to merge with what the template writes after them.
PREFIX_SAMPLES = ("What color is the star?", "Describe the scene.", "How many objects are there", "Count: 3", "3",
                  "Is it red?!", "What is it...", "étoile rouge ?", "是什么？", "ends with a colon:", "🙂")


def prefill_prefix(template: ChatTemplate, tokenizer) -> bool:
    """Whether the prompt encoder's ids are the first ids of the prefill for every sample question (the
    question-first templates of `pipmm train --template prompt-first`): the runtime then reuses the prompt pass's
    KV cache (sdk/prompt_pass.py), and checks the prefix again per request. Tokenized as the device does
    (sdk/prompting.py: the tokenizer's own rule, or BOS by add_bos for templates without add_special_tokens)."""
    if not (template.prompt_encoder.endswith("{prompt}") and template.prompt.startswith(template.prompt_encoder)):
        return False

    def ids(text: str) -> list[int]:
        if template.add_special_tokens is not None:
            return tokenizer(text, add_special_tokens=template.add_special_tokens).input_ids
        bos = [tokenizer.bos_token_id] if template.add_bos and tokenizer.bos_token_id is not None else []
        return bos + tokenizer(text, add_special_tokens=False).input_ids

    for question in PREFIX_SAMPLES:
        encoder = ids(template.prompt_encoder.replace("{prompt}", question))
        if ids(template.prompt.replace("{prompt}", question))[:len(encoder)] != encoder:
            return False
    return True
