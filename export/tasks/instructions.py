"""Answer-form instructions appended to scene questions: the instruction-following part of the data.

A scene question answers in lower case ("red", "top left"), in digits for counts ("3") and in yes/no for
exist and relation questions. An instruction asks for another form -- or another content -- of the same
answer, always with one exact expected answer, e.g.

    "What color is the star? Answer in capitals."                      -> "RED"
    "How many circles are there? Spell out the number."               -> "three"
    "Is there a red star? Answer true or false."                      -> "true"
    "Describe the image. Just tell me how many objects there are."    -> "4"
    "Describe the image. Name only the first object."                 -> "small red star"

Each instruction has several TRAIN phrasings (`texts`) and separately written held-out ones
(`held_out_texts`, never trained: the `phrasing` eval split asks them). `pipmm train
--instruction-fraction F` appends one to a fraction F of the training questions that one fits
(stage 0 by default too, recorded in train_config.json); `pipmm eval` appends them to a fraction of its
questions (--instruction-fraction, recorded) and reports the instructed exact rate (case-sensitive).
`HELD_OUT` instructions are never trained at all (form only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from export.tasks.answers import normalize
from export.tasks.questions import FAMILIES, Question

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def _words(text: str) -> list[str]:
    return text.strip().rstrip(".").split()


def strip_output(text: str) -> str:
    """What an instructed answer is compared with: the output without surrounding spaces or a final period."""
    return text.strip().rstrip(".").strip()


@dataclass(frozen=True)
class Instruction:
    texts: tuple[str, ...]                    # train phrasings, appended to the question after one space
    families: tuple[str, ...]                 # the question families it is asked of
    answer: Callable[[str], str] | None       # plain answer -> the instructed answer (None: not defined)
    form: Callable[[str], bool]               # model output -> has the asked form (content not checked)
    note: str
    held_out_texts: tuple[str, ...] = ()      # never trained: the `phrasing` split
    # more train phrasings (after m21, 2026-12-04: 23% of held-out-worded instructions were followed against 84%
    # of trained ones, a 15-point cost on the phrasing split): drawn by the train split only, so the questions of
    # the eval splits, drawn from `texts`, stay the ones measured before
    more_texts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def train_texts(self) -> tuple[str, ...]:
        """Every phrasing the train split draws ('train-wide'): texts, then more_texts."""
        return self.texts + self.more_texts

    def exact(self, output: str, plain_answer: str) -> bool:
        """The asked form with the right content (form only where `answer` is None)."""
        if self.answer is None:
            return self.form(output)
        return strip_output(output) == self.answer(plain_answer)


def _capitals_form(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def _items(caption: str) -> list[str]:
    return caption.split(", ")


# name -> instruction; trained ones have an exact instructed answer.
TRAINED: dict[str, Instruction] = {
    "capitals": Instruction(
        ("Answer in capitals.", "Reply in capital letters.", "Use upper case.", "Answer in uppercase.",
         "Write your answer in capital letters."), ("color", "shape", "position", "label", "refer"), str.upper,
        _capitals_form, "colour/shape/position/label answers in upper case: 'TOP LEFT'",
        ("Please respond in ALL CAPS.", "Capitalise every letter of the answer."),
        ("Please give the answer in upper-case letters.", "Respond in block capitals.",
         "Make the whole answer uppercase.", "Type the reply in capitals.", "Everything in upper case, please.",
         "Write it all in capitals.")),
    "number-word": Instruction(
        ("Answer with the number written as a word.", "Spell out the number.", "Write the number in words.",
         "Give the count as a word."), ("count",), lambda answer: NUMBER_WORDS[int(answer)],
        lambda out: normalize(out) in NUMBER_WORDS, "count answers as words: 'three'",
        ("Use words, not digits, for the number.",),
        ("Please write the count out in letters.", "Respond with the number spelled out.", "Give the number in "
         "letters.", "Spell the count.", "Say the number as a word.")),
    "digits": Instruction(
        ("Answer with a number.", "Give the number in digits.", "Reply with just the number."), ("count",),
        lambda answer: answer, lambda out: normalize(out).isdigit(), "count answers stay digits: '3'",
        ("Respond using numerals only.",),
        ("Please answer with digits.", "Give the count in figures.", "Answer using digits.", "Respond with the count "
         "as a figure.")),
    "yes-no": Instruction(
        ("Answer yes or no.", "Just say yes or no.", "Reply with yes or no."), ("exist", "relation"),
        lambda answer: answer, lambda out: normalize(out) in ("yes", "no"),
        "exist/relation answers are already yes/no: the instruction must not derail them",
        ("A yes/no answer, please.",),
        ("Please answer with yes or no.", "Respond yes or no.", "Yes or no?", "Reply yes or no only.")),
    "true-false": Instruction(
        ("Answer true or false.", "Reply with true or false.", "Say true or false."), ("exist", "relation"),
        lambda answer: {"yes": "true", "no": "false"}[answer], lambda out: normalize(out) in ("true", "false"),
        "exist/relation answers as true/false: content, not only form", ("Respond with either true or false.",),
        ("Please answer with true or false.", "Respond true or false.", "True or false?", "State true or false.")),
    "object-count": Instruction(
        ("Just tell me how many objects there are.", "Only give the number of objects.",
         "Answer with the number of objects only."), ("describe",), lambda caption: str(len(_items(caption))),
        lambda out: normalize(out).isdigit(), "describe answered by the number of listed objects: '4'",
        ("Rather than listing them, count the objects.",),
        ("Please give only how many objects there are.", "Respond with the number of objects.", "How many objects? "
         "Just the number.", "Give the object count alone.")),
    "first-object": Instruction(
        ("Name only the first object.", "Only the first object, please.", "Just give the first object."),
        ("describe",), lambda caption: _items(caption)[0], lambda out: "," not in out,
        "describe answered by its first item only: 'small red star'", ("Stop after naming one object.",),
        ("Please give just the first object.", "Respond with the first object only.", "Give me the first object and "
         "nothing else.", "The first object alone, please.")),
}
HELD_OUT: dict[str, Instruction] = {
    "one-word": Instruction(("Answer in one word.",), ("describe",), None, lambda out: len(_words(out)) == 1,
                            "never trained; describe questions (a list of objects unasked); form only"),
}
ALL: dict[str, Instruction] = {**TRAINED, **HELD_OUT}


def instruct(question: Question, name: str, rng: np.random.Generator | None = None,
             phrasing: str = "train") -> Question:
    """`question` with instruction `name` appended (its first phrasing, or one drawn from `rng`; phrasing
    'held_out': the held-out phrasings, 'train-wide': the train ones and `more_texts`, as the train split draws
    them) and its answer in the asked form (trained ones)."""
    instruction = TRAINED[name]
    if question.family not in instruction.families:
        raise ValueError(f"instruction {name!r} is for {instruction.families}, not {question.family!r}")
    texts = {"held_out": instruction.held_out_texts, "train-wide": instruction.train_texts}.get(
        phrasing, instruction.texts)
    text = texts[0] if rng is None else texts[int(rng.integers(len(texts)))]
    return replace(question, prompt=join(question.prompt, text), answer=instruction.answer(question.answer))


def join(prompt: str, text: str) -> str:
    """prompt + instruction: after one space, or after '. ' where the prompt has no final punctuation."""
    return f"{prompt} {text}" if prompt.rstrip()[-1:] in ".?!" else f"{prompt}. {text}"


def instruction_of(prompt: str) -> str | None:
    """The name of the trained instruction a prompt ends with (any phrasing), else None."""
    for name, i in TRAINED.items():
        if any(prompt.endswith(" " + t) for t in (*i.train_texts, *i.held_out_texts)):
            return name
    return None


_BY_FAMILY = {family: [n for n, i in TRAINED.items() if family in i.families] for family in FAMILIES}


def maybe_instruct(questions: list[Question], rng: np.random.Generator, fraction: float,
                   phrasing: str = "train") -> list[Question]:
    """Each question that some trained instruction fits gets one, with probability `fraction`."""
    if fraction <= 0:
        return questions
    out = []
    for q in questions:
        names = _BY_FAMILY.get(q.family, [])
        if names and rng.random() < fraction:
            q = instruct(q, names[int(rng.integers(len(names)))], rng, phrasing)
        out.append(q)
    return out
