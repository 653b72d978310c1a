"""Seeded compositional rewrites of a TRAIN question template: more ways of asking the same thing.

A rewrite takes a template with its slots ("What color is the {n}?") and applies a fixed sequence of
small rules (RULES, each tried with its recorded probability `p`):

    "What color is the {n}?"  --synonyms-->  "What colour is the {n}?"
                              --form------>  "Tell me what colour the {n} is."
                              --wrapper--->  "Hey, tell me what colour the {n} is, thanks."
                              --noise----->  "hey, tell me what colour the {n} is, thanks"

The meaning and so the answer stay those of the source template: the slots ({n}, {a}, {b}) are
kept verbatim (the object names are filled in after the rewrite, never touched), no rule swaps a
relation's direction words or a family's key word (shape, colour), and a rewrite whose guarded words
differ from its source is refused. The word lists are generic English chosen by hand, not taken from
phrasings.HELD_OUT; a rewrite that normalises (case, punctuation, whitespace: `norm`, as
tests/test_phrasings.py compares templates) to any HELD_OUT template is refused and redrawn, so the
`phrasing` eval split stays unseen verbatim. Torch-free.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from export.tasks.phrasings import HELD_OUT

Rewrite = Callable[[str, np.random.Generator], str]


def norm(text: str) -> str:
    """Case, punctuation and whitespace removed: 'What's in this image?' == "whats in this image"."""
    return " ".join(re.sub(r"[^a-z0-9{} ]", "", text.lower()).split())


def _flat(groups) -> tuple[str, ...]:
    return tuple(t for g in groups.values() for t in g) if isinstance(groups, dict) else groups


HELD_OUT_NORMS = frozenset(norm(t) for groups in HELD_OUT.values() for t in _flat(groups))
SLOT = re.compile(r"{\w}")
# Words a rewrite must keep, counted (colour spellings as one): the relation's direction and the family's key.
GUARDED = {"left", "right", "above", "below", "higher", "lower", "over", "under", "beneath", "further", "up",
           "shape", "color", "label", "where"}


def _pick(seq, rng: np.random.Generator):
    return seq[int(rng.integers(len(seq)))]


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


# ----------------------------------------------------------------------------- rules

# Interchangeable words (whole words, either direction; plurals by +s where `plural`).
SYNONYMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "image": (("image", "picture", "photo", "frame", "scene", "view", "snapshot"), True),
    "object": (("object", "item", "thing"), True),
    "colour": (("color", "colour"), False),
    "modal": (("can you", "could you", "would you"), False),
    "see": (("see", "spot", "notice"), False),
    "tell": (("tell me", "let me know"), False),
    "show": (("show", "depict"), False),
}
SWAP_P = 0.6  # chance that each matching word of a synonym group is swapped once the rule fires


_SYNONYM_PATTERNS = [(re.compile(r"\b(" + "|".join(sorted((*words, *(w + "s" for w in words if plural)), key=len,
                                                            reverse=True)) + r")\b", re.IGNORECASE), words, plural)
                     for words, plural in SYNONYMS.values()]


def _synonyms(text: str, rng: np.random.Generator) -> str:
    for pattern, words, plural in _SYNONYM_PATTERNS:

        def swap(m: re.Match) -> str:
            found = m.group(0)
            if rng.random() >= SWAP_P:
                return found
            is_plural = plural and found.lower() not in words
            options = [w for w in words if w + ("s" if is_plural else "") != found.lower()]
            return _match_case(_pick(options, rng) + ("s" if is_plural else ""), found)
        text = pattern.sub(swap, text)
    return text


CONTRACTIONS = (("what is", "what's"), ("where is", "where's"), ("it is", "it's"), ("that is", "that's"))
_CONTRACTION_PATTERNS = [tuple((re.compile(r"\b" + re.escape(a) + r"\b", re.IGNORECASE), b) for a, b in (pair, pair[::-1]))
                         for pair in CONTRACTIONS]


def _contractions(text: str, rng: np.random.Generator) -> str:
    for pair in _CONTRACTION_PATTERNS:
        pattern, b = pair[int(rng.random() < 0.5)]
        text = pattern.sub(lambda m, b=b: _match_case(b, m.group(0)), text)
    return text


# (pattern on the whole template, replacements): question <-> imperative forms that keep the meaning.
_END = r"\s*[.?!]?\s*$"
FORMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^what(?:'s| is) the (\w+) of (.+?)" + _END, ("Tell me the {1} of {2}.", "Give me the {1} of {2}.",
                                                   "Name the {1} of {2}.")),
    (r"^(?:tell me|name|give me) the (\w+) of (.+?)" + _END, ("What is the {1} of {2}?",)),
    (r"^what (\w+) is the ({n})(.*?)" + _END, ("Tell me what {1} the {2}{3} is.", "Say what {1} the {2}{3} is.")),
    (r"^where(?:'s| is) the ({n})(.*?)" + _END, ("Tell me where the {1} is{2}.",)),
    (r"^is (there|the {a}|{n}) (.+?)" + _END, ("Tell me whether {1} is {2}.", "Check whether {1} is {2}.")),
    (r"^count the ({n})(.*?)" + _END, ("How many {1}{2}?", "How many {1} are there{2}?")),
)
_FORMS = [(re.compile(p.replace("{n}", r"\{n\}").replace("{a}", r"\{a\}"), re.IGNORECASE), r) for p, r in FORMS]


def _form(text: str, rng: np.random.Generator) -> str:
    fits = [(m, r) for p, r in _FORMS for m in [p.match(text)] if m]
    if not fits:
        return text
    m, replacements = _pick(fits, rng)
    out = _pick(replacements, rng)
    for i, g in enumerate(m.groups(), 1):
        out = out.replace("{%d}" % i, g)
    return out


QUESTION_START = ("what", "which", "how", "where", "is", "are", "does", "do", "can", "could", "would", "in",
                  "the", "any", "number", "color", "colour")
ANY_PREFIXES = ("Hey, ", "Hi, ", "Hello, ", "Quick question: ", "Question: ", "OK, ", "So, ", "Right, ",
                "Excuse me, ", "Hi there! ")
COMMAND_PREFIXES = ("Please ", "Please, ", "Kindly ", "I want you to ", "Now ", "Go ahead and ")
COMMAND_TO_QUESTION = ("Could you ", "Can you ", "Would you ", "Will you ")
QUESTION_PREFIXES = ("I want to know: ", "I'd like to know: ", "Tell me: ", "Could you tell me: ",
                     "Here's my question: ", "Help me out: ", "One thing: ")
INNER_SUFFIXES = (", please", ", thanks", " please", ", thank you")
OUTER_SUFFIXES = (" Thanks!", " Thank you.", " Thanks.", " Cheers.")


def _is_question(text: str) -> bool:
    return text.rstrip().endswith("?") or text.split(" ", 1)[0].lower().strip(",") in QUESTION_START


def _lower_first(text: str) -> str:
    return text if text.startswith(("I ", "I'", "{")) else text[:1].lower() + text[1:]


def _wrapper(text: str, rng: np.random.Generator) -> str:
    body, end = re.match(r"^(.*?)([.?!]?)\s*$", text).groups()
    question = _is_question(text)
    kind = int(rng.integers(3))  # 0 prefix, 1 suffix, 2 both
    if kind in (0, 2):
        if not question and rng.random() < 0.4:  # imperative -> polite question
            body, end = _pick(COMMAND_TO_QUESTION, rng) + _lower_first(body), "?"
        else:
            prefix = _pick(ANY_PREFIXES + (QUESTION_PREFIXES if question else COMMAND_PREFIXES), rng)
            body = prefix + (_lower_first(body) if rng.random() < 0.7 else body)
    if kind in (1, 2):
        if rng.random() < 0.6:
            body += _pick(INNER_SUFFIXES, rng)
        else:
            return body + (end or ("?" if question else ".")) + _pick(OUTER_SUFFIXES, rng)
    return body + end


FILLERS = ("Um, ", "Uh, ", "Well, ", "Okay so ", "Hmm, ", "Alright, ")
COMMAND_FILLERS = ("Just ", "Simply ", "Quickly ")


def _filler(text: str, rng: np.random.Generator) -> str:
    options = FILLERS if _is_question(text) else FILLERS + COMMAND_FILLERS
    return _pick(options, rng) + _lower_first(text)


NOISE = {"lowercase": 0.35, "no_final_mark": 0.3, "trailing_spaces": 0.15, "double_space": 0.15,
         "double_mark": 0.05}


def _noise(text: str, rng: np.random.Generator) -> str:
    if rng.random() < NOISE["lowercase"]:
        text = text.lower()
    if rng.random() < NOISE["no_final_mark"]:
        text = text.rstrip().rstrip(".?!")
    elif rng.random() < NOISE["double_mark"] and text.endswith("?"):
        text += "?"
    if rng.random() < NOISE["double_space"] and " " in text:
        spaces = [i for i, c in enumerate(text) if c == " "]
        i = _pick(spaces, rng)
        text = text[:i] + " " + text[i:]
    if rng.random() < NOISE["trailing_spaces"]:
        text += " " * int(rng.integers(1, 3))
    return text


@dataclass(frozen=True)
class Rule:
    name: str
    p: float        # chance the rule is tried in one rewrite (recorded in train_config.json)
    apply: Rewrite  # template -> template, unchanged where it does not fit
    note: str


# Applied in this order: word-level first, then the sentence's form, then what wraps it, then noise.
RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("synonyms", 0.7, _synonyms, "generic word swaps: image/picture/photo/frame/scene/view/snapshot, "
         "object/item/thing, color/colour, can/could/would you, see/spot/notice, tell me/let me know, show/depict"),
    Rule("contractions", 0.3, _contractions, "what is/what's, where is/where's, it is/it's, that is/that's"),
    Rule("form", 0.35, _form, "question <-> imperative where safe: 'What is the X of Y?' <-> 'Tell me the X of "
         "Y.', 'What color is the {n}?' -> 'Tell me what color the {n} is.', 'Is there {n}?' -> 'Tell me "
         "whether there is {n}.', 'Count the {n}.' -> 'How many {n}?'"),
    Rule("wrapper", 0.5, _wrapper, "politeness and framing: 'Hey, ...', 'Quick question: ...', 'Please ...', "
         "'Could you ...?', 'I want to know: ...', '..., thanks', '... Thanks!'"),
    Rule("filler", 0.15, _filler, "a filler opening: 'Um, ', 'Well, ', 'Okay so ', 'Just ' (commands)"),
    Rule("noise", 0.5, _noise, "casing and punctuation: lowercase, no final mark, '??', a doubled space, "
         "trailing spaces (probabilities in NOISE)"),
)}
ATTEMPTS = 16


def _guarded(text: str) -> Counter:
    words = norm(text.replace("colour", "color")).split()
    return Counter(w for w in words if w in GUARDED)


def acceptable(source: str, out: str) -> bool:
    """`out` keeps `source`'s slots and guarded words, differs from it and is no HELD_OUT template."""
    return (out != source and Counter(SLOT.findall(out)) == Counter(SLOT.findall(source))
            and _guarded(out) == _guarded(source) and norm(out) not in HELD_OUT_NORMS)


def rewrite(template: str, rng: np.random.Generator) -> str:
    """A paraphrase of `template` drawn from `rng` (the template itself where ATTEMPTS draws were refused)."""
    for _ in range(ATTEMPTS):
        out = template
        for rule in RULES.values():
            if rng.random() < rule.p:
                out = rule.apply(out, rng)
        if acceptable(template, out):
            return out
    return template


def settings() -> dict:
    """The rules as recorded in train_config.json."""
    return {"rules": {name: {"p": r.p, "note": r.note} for name, r in RULES.items()}, "swap_p": SWAP_P,
            "noise": dict(NOISE), "attempts": ATTEMPTS, "refused": "rewrites equal to a HELD_OUT template "
            "after norm(), or changing slots or guarded words"}
