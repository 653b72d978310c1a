"""Answer-form instructions appended to scene questions: the instruction-following part of the data.

A scene question answers in lower case ("red", "top left"), in digits for counts ("3") and in yes/no for
exist and relation questions. An instruction asks for another form of the same answer, e.g.

    "What color is the star? Answer in capitals."   -> "RED"
    "How many circles are there? Answer with the number written as a word." -> "three"

`pipmm train --instruction-fraction F` appends one to a fraction F of the training questions (stage 2 of
the default model), and scripts/vmtc_cmai_table.py scores how often a model follows them (issue 7's
probe: CMAI is meant to raise instruction following). `HELD_OUT` are never trained: they measure
following an instruction the model has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from export.tasks.answers import normalize
from export.tasks.scenes import FAMILIES, Question

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def _words(text: str) -> list[str]:
    return text.strip().rstrip(".").split()


@dataclass(frozen=True)
class Instruction:
    text: str                                 # appended to the question after one space
    families: tuple[str, ...]                 # the question families it is asked of
    answer: Callable[[str], str] | None       # plain answer -> the instructed answer (None: not defined)
    form: Callable[[str], bool]               # model output -> has the asked form (content not checked)
    note: str

    def exact(self, output: str, plain_answer: str) -> bool:
        """The asked form with the right content (form only where `answer` is None)."""
        if self.answer is None:
            return self.form(output)
        return output.strip().rstrip(".").strip() == self.answer(plain_answer)


def _capitals_form(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


# name -> instruction; trained ones have an exact instructed answer.
TRAINED: dict[str, Instruction] = {
    "capitals": Instruction("Answer in capitals.", ("color", "shape", "position"), str.upper, _capitals_form,
                            "colour/shape/position answers in upper case: 'TOP LEFT'"),
    "number-word": Instruction("Answer with the number written as a word.", ("count",),
                               lambda answer: NUMBER_WORDS[int(answer)],
                               lambda out: normalize(out) in NUMBER_WORDS, "count answers as words: 'three'"),
    "yes-no": Instruction("Answer yes or no.", ("exist", "relation"), lambda answer: answer,
                          lambda out: normalize(out) in ("yes", "no"),
                          "exist/relation answers are already yes/no: the instruction must not derail them"),
}
HELD_OUT: dict[str, Instruction] = {
    "one-word": Instruction("Answer in one word.", ("describe",), None, lambda out: len(_words(out)) == 1,
                            "never trained; describe questions (a list of objects unasked); form only"),
}
ALL: dict[str, Instruction] = {**TRAINED, **HELD_OUT}


def instruct(question: Question, name: str) -> Question:
    """`question` with instruction `name` appended and its answer in the asked form (trained ones)."""
    instruction = TRAINED[name]
    if question.family not in instruction.families:
        raise ValueError(f"instruction {name!r} is for {instruction.families}, not {question.family!r}")
    return replace(question, prompt=f"{question.prompt} {instruction.text}",
                   answer=instruction.answer(question.answer))


_BY_FAMILY = {family: [n for n, i in TRAINED.items() if family in i.families] for family in FAMILIES}


def maybe_instruct(questions: list[Question], rng: np.random.Generator, fraction: float) -> list[Question]:
    """Each question that some trained instruction fits gets one, with probability `fraction`."""
    if fraction <= 0:
        return questions
    out = []
    for q in questions:
        names = _BY_FAMILY.get(q.family, [])
        if names and rng.random() < fraction:
            q = instruct(q, names[int(rng.integers(len(names)))])
        out.append(q)
    return out
