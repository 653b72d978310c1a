"""`pipmm train --template prompt-first`: the question before the image, recorded in the checkpoint, carried by
`pipmm export` into the manifest; the prompt encoder's ids are a prefix of the prefill ids with our tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from export.train.data import SequenceSpec, build_tokenizer, scene_items  # noqa: E402
from export.train.model import special_tokens  # noqa: E402
from export.train.templates import JINJA_FILE, TEMPLATES, TemplateError, check_prefix, prefix_failures  # noqa: E402
from sdk.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--tiny", "--batch-size", "16", "--workers", "0", "--val-scenes", "2", "--quiet", "--log-every", "1"]
# Prompts whose last characters could tempt a byte-level BPE to merge with the "\n" after them.
HARD = ["What color is the star?", "Describe the scene.", "How many objects are there", "Count: 3", "3",
        "Is it red?!", "What is it...", "Is the cross left of the star?)", "étoile rouge ?", "是什么？", "emoji 🙂",
        "line one\nline two?", "tab\tinside", "ends with colon:", "ASSISTANT:", "USER:", "?", "\u00a0nbsp end"]


def train(*args) -> None:
    assert main(["train", *map(str, args), *FAST]) == 0


def prompts(n_scenes: int = 64) -> list[str]:
    items = scene_items("val", 0, n_scenes, 112, instruction_fraction=1.0) + scene_items("val", 0, n_scenes, 112)
    return [q.prompt for _, qs in items for q in qs] + HARD


def spec_for(tokenizer_file: Path, template: str) -> SequenceSpec:
    from tokenizers import Tokenizer

    special = special_tokens(Tokenizer.from_file(str(tokenizer_file)))
    return SequenceSpec(str(tokenizer_file), special, 8, 512, template)


@pytest.mark.parametrize("tokenizer", ["default", "tiny"])
def test_prompt_first_encoder_ids_are_a_prefix_of_the_prefill(tokenizer, tmp_path):
    if tokenizer == "default":
        path = ROOT / "models/default_model/tokenizer.json"
    else:
        path = tmp_path / "tokenizer.json"
        build_tokenizer(100, 320, "prompt-first").save(str(path))
    prompter = spec_for(path, "prompt-first").prompter()
    assert prefix_failures(prompter, prompts()) == []
    ids, slots = prompter.prompt_ids("What color is the star?")
    enc = prompter.encoder_ids("What color is the star?")
    assert slots[0] == len(enc) + 1  # the prefix, "\n", then the image slots
    # The LLaVA-1.5 turn puts the image first: its encoder ids are no prefix (the check can fail).
    assert prefix_failures(spec_for(path, "llava-1.5").prompter(), ["What color is the star?"])
    with pytest.raises(TemplateError, match="--template llava-1.5"):
        check_prefix(spec_for(path, "llava-1.5").prompter(), ["What color is the star?"], "llava-1.5")


def test_prompt_first_jinja_renders_the_trained_turn():
    """transformers renders the checkpoint's chat_template.jinja into exactly the turn training tokenized."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "models/default_model/tokenizer.json"), eos_token="</s>")
    jinja, chat = TEMPLATES["prompt-first"].jinja, TEMPLATES["prompt-first"].chat
    q = "Is the red star left of the cross?"
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert tok.apply_chat_template(turn, chat_template=jinja, tokenize=False, add_generation_prompt=True) == \
        chat.prompt.replace("{prompt}", q)
    two = turn + [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
                  {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert tok.apply_chat_template(two, chat_template=jinja, tokenize=False, add_generation_prompt=True) == \
        f"USER: {q}\n<image> ASSISTANT: yes</s>USER: Why? ASSISTANT:"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    train("--stage", 0, "--out", root / "s0", "--steps", 3, "--tokenizer-scenes", 100, "--template", "prompt-first")
    train("--stage", 1, "--init", root / "s0", "--out", root / "s1", "--steps", 2)  # inherits prompt-first
    train("--stage", 2, "--init", root / "s1", "--out", root / "l2", "--steps", 1, "--template", "llava-1.5")
    return root


def test_the_checkpoint_records_the_template(runs):
    for name, template in (("s0", "prompt-first"), ("s1", "prompt-first"), ("l2", "llava-1.5")):
        config = json.loads((runs / name / "train_config.json").read_text())
        assert config["template"] == template, name
        assert config["chat_template"]["prompt"] == TEMPLATES[template].chat.prompt
        assert (runs / name / JINJA_FILE).is_file() == (template == "prompt-first"), name
    assert (runs / "s1" / JINJA_FILE).read_text() == TEMPLATES["prompt-first"].jinja


def test_export_writes_the_prompt_first_template(runs):
    from export.model.chat_template import conversation_format

    for name, template in (("s1", "prompt-first"), ("l2", "llava-1.5")):
        fmt = conversation_format(runs / name)  # what pipmm export writes into the manifest's chat_template
        assert (fmt.prompt, fmt.prompt_encoder) == (TEMPLATES[template].chat.prompt,
                                                   TEMPLATES[template].chat.prompt_encoder), name
        assert fmt.add_special_tokens and fmt.tokenizer_adds_bos  # BOS as training added it (add_bos)
