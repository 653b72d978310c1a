"""Chat templates `pipmm train --template` can train a checkpoint with, and the file that carries one to the export.

    llava-1.5     "USER: <image>\\n{prompt} ASSISTANT:"    prompt encoder "USER: {prompt}"   (the default model)
    prompt-first  "USER: {prompt}\\n<image> ASSISTANT:"    prompt encoder "USER: {prompt}"

Under prompt-first the prompt encoder's ids are exactly the first ids of the prefill, so on the device the
decoder's pass over them gives the prompt vector AND the KV cache the prefill continues from (the prompt
pass costs nothing extra). That needs the tokenizer not to merge across the boundary after {prompt}: the
boundary is "\\n" followed by the image placeholder, a special token (split out before BPE), and the
byte-level pre-tokenizer never joins "\\n" to the characters before it (GPT-2's split: letters, digits,
punctuation runs and whitespace runs are separate pieces), so it holds for any cleaned prompt (clean()
strips trailing whitespace). `check_prefix` verifies it on real prompts; tests/test_train_template.py too.

The export reads a checkpoint's template from its chat_template.jinja (export/model/chat_template.py, in
transformers' order), so training writes the prompt-first template there and `pipmm export` derives the
manifest's chat_template from it with no flag. llava-1.5 writes no file: the export's fallback is that format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdk.errors import PipmmError
from sdk.manifest import ChatTemplate

JINJA_FILE = "chat_template.jinja"

# One user turn: the question's text, then "\n<image>" per image, then " "; as sdk/conversation.py's
# LLaVA-1.5 conversation otherwise (system text + " ", "ASSISTANT: answer</s>"). The newline is a Jinja
# string, not template text: transformers renders with trim_blocks, which would drop a newline after a tag.
PROMPT_FIRST_JINJA = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for p in parts if p['type'] == 'text' %}{{ p['text'] }} {% endfor %}"
    "{% elif message['role'] == 'user' %}USER: {% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{% for p in parts if p['type'] == 'image' %}{{ '\\n<image>' }}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass(frozen=True)
class TrainTemplate:
    chat: ChatTemplate  # what training tokenizes with (sdk.prompting.Prompter), as the exported bundle will
    jinja: str | None  # written to the checkpoint as JINJA_FILE; None: the export's LLaVA-1.5 fallback
    prompt_first: bool  # the prompt encoder's ids are a prefix of the prefill ids


TEMPLATES = {
    "llava-1.5": TrainTemplate(ChatTemplate(), None, False),
    "prompt-first": TrainTemplate(ChatTemplate(prompt="USER: {prompt}\n<image> ASSISTANT:",
                                               prompt_encoder="USER: {prompt}"), PROMPT_FIRST_JINJA, True),
}
DEFAULT = "llava-1.5"


def write_template(out: Path, name: str) -> None:
    """The checkpoint's chat_template.jinja for `name` (removed for llava-1.5: an --init's file must not leak)."""
    path = Path(out) / JINJA_FILE
    jinja = TEMPLATES[name].jinja
    if jinja is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(jinja)


class TemplateError(PipmmError):
    """A prompt-first template whose prompt-encoder ids are not a prefix of the prefill ids with this tokenizer."""


def check_prefix(prompter, prompts, name: str) -> None:
    bad = prefix_failures(prompter, prompts)
    if bad:
        raise TemplateError(f"--template {name}: the tokenizer merges across the end of the question for {len(bad)} "
                            f"of {len(prompts)} prompts (e.g. {bad[0]!r}), so the prompt pass is not the prefill's "
                            "prefix: train with --template llava-1.5")


def prefix_failures(prompter, prompts) -> list[str]:
    """The prompts whose prompt-encoder ids are not the first ids of their prefill ids (empty: all are)."""
    failures = []
    for prompt in prompts:
        ids, _ = prompter.prompt_ids(prompt)
        enc = prompter.encoder_ids(prompt)
        if len(enc) > len(ids) or list(ids[:len(enc)]) != list(enc):
            failures.append(prompt)
    return failures
