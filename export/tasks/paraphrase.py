"""Seeded compositional rewrites of a TRAIN question template: more ways of asking the same thing.

A rewrite takes a template with its slots ("What color is the {n}?") and applies a fixed sequence of
small rules (RULES, each tried with its recorded probability `p`):

    "What color is the {n}?"  --synonyms-->  "What shade is the {n}?"
                              --form------>  "Tell me what shade the {n} is."
                              --wrapper--->  "Hey, tell me what shade the {n} is, thanks."
                              --noise----->  "hey, tell me what shade the {n} is, thanks"

The vocabulary is wide on purpose: the model knows only the words it was trained on, so each family
is asked with many generic English words and sentence forms (SYNONYMS: ~30 groups such as
describe/explain/summarize/outline, colour/shade/hue, where's/location/position, next to/beside/near,
above/over/higher than; FORMS: question <-> imperative rewrites per family; wrappers, fillers, noise
with typos).

The meaning and so the answer stay those of the source template: the slots ({n}, {a}, {b}) are
kept verbatim (the object names are filled in after the rewrite, never touched), and a rewrite must
keep how often each GUARD_CLASSES class occurs -- a relation's direction (left, right, above
(over, higher than), below (under, beneath, lower than)) and a family's key word (colour (shade,
hue), shape (form), label (tag, text, written), where (location, position, part), count (how many,
number)) -- so a word may become another of its class, never of another class, and a rewrite that
changes any class count is refused. The word lists are generic English chosen by hand, not taken from
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

# Words (or phrases, as `norm` writes them) a rewrite must keep, counted per class: members of one class
# are the same meaning (TRAIN already asks 'above' as 'over' and 'higher than'), members of two classes
# never are. Phrases are matched longest first, so 'higher up than' is one 'above', not 'above' + 'up'.
GUARD_CLASSES: dict[str, tuple[str, ...]] = {
    "left": ("left",), "right": ("right",), "further": ("further", "farther"), "up": ("up",), "down": ("down",),
    "above": ("above", "over", "higher", "higher up"),
    "below": ("below", "under", "underneath", "beneath", "lower", "lower down"),
    "color": ("color", "colour", "shade", "hue"),
    "shape": ("shape", "form"),
    "label": ("label", "tag", "text", "writing", "lettering", "written", "printed", "labelled", "labeled"),
    "where": ("where", "whereabouts", "location", "position", "positioned", "located", "situated", "placed",
              "locate", "part", "region", "area", "section"),
    "count": ("how many", "number", "count"),
}
_GUARD_OF = {phrase: name for name, phrases in GUARD_CLASSES.items() for phrase in phrases}
_GUARD_PATTERN = re.compile(r"\b(" + "|".join(sorted(_GUARD_OF, key=len, reverse=True)) + r")s?\b")
GUARD_WORDS = frozenset(w for phrase in _GUARD_OF for w in phrase.split())  # never typo'd by noise


def _pick(seq, rng: np.random.Generator):
    return seq[int(rng.integers(len(seq)))]


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


# ----------------------------------------------------------------------------- rules

# Interchangeable words or phrases (whole words, either direction; plurals by +s where `plural`). A group
# holding guarded words stays inside one GUARD_CLASSES class; the name is what FORMS call it ('<image>').
SYNONYMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "image": (("image", "picture", "photo", "photograph", "pic", "frame", "scene", "view", "snapshot", "shot",
               "drawing", "illustration"), True),
    "object": (("object", "item", "thing"), True),
    "colour": (("color", "colour", "shade", "hue"), False),
    "shape": (("shape", "form"), False),
    "kind": (("kind of", "type of", "sort of"), False),
    "modal": (("can you", "could you", "would you", "are you able to"), False),
    "see": (("see", "spot", "notice", "observe"), False),
    "tell": (("tell me", "let me know", "tell us"), False),
    "show": (("show", "depict", "display", "contain", "feature", "include"), False),
    "shown": (("shown", "visible", "present", "depicted", "displayed"), False),
    "describe": (("describe", "explain", "summarize", "summarise", "outline"), False),
    "list": (("list", "enumerate", "itemize"), False),
    "everything": (("everything", "every object", "all the objects", "all the things"), False),
    "how_many": (("how many", "what number of"), False),
    "location": (("position", "location", "whereabouts"), False),
    "located": (("located", "placed", "situated", "positioned"), False),
    "part": (("part", "region", "area", "section"), False),
    "appear": (("appear", "sit", "lie"), False),
    "label": (("label", "tag"), True),
    "text": (("text", "writing", "lettering"), False),
    "written": (("written", "printed"), False),
    "labelled": (("labelled", "labeled"), False),
    "next": (("next to", "beside", "by", "near", "close to", "alongside"), False),
    "read": (("read", "read out"), False),
    "anywhere": (("anywhere", "somewhere"), False),
    "sign": (("sign of", "trace of"), False),
    "further": (("further", "farther"), False),
    # a relation's direction: only phrases of the same GUARD_CLASSES class
    "left": (("left of", "to the left of", "on the left of", "on the left side of"), False),
    "right": (("right of", "to the right of", "on the right of", "on the right side of"), False),
    "above": (("above", "over", "higher than", "higher up than"), False),
    "below": (("below", "under", "beneath", "underneath", "lower than", "lower down than"), False),
}
SWAP_P = 0.6  # chance that each matching word of a synonym group is swapped once the rule fires


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SYNONYM_PATTERNS = [(re.compile(r"\b(" + _alternation((*words, *(w + "s" for w in words if plural))) + r")\b",
                                 re.IGNORECASE), words, plural) for words, plural in SYNONYMS.values()]


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


CONTRACTIONS = (("what is", "what's"), ("where is", "where's"), ("it is", "it's"), ("that is", "that's"),
                ("there is", "there's"))
_CONTRACTION_PATTERNS = [tuple((re.compile(r"\b" + re.escape(a) + r"\b", re.IGNORECASE), b) for a, b in (pair, pair[::-1]))
                         for pair in CONTRACTIONS]


def _contractions(text: str, rng: np.random.Generator) -> str:
    for pair in _CONTRACTION_PATTERNS:
        pattern, b = pair[int(rng.random() < 0.5)]
        text = pattern.sub(lambda m, b=b: _match_case(b, m.group(0)), text)
    return text


# (pattern on the whole template, replacements): sentence forms that keep the meaning, family by family.
# '<group>' in a pattern is any word of that SYNONYMS group (forms run after the swaps); '{k}' in a
# replacement is the pattern's k-th group. A replacement never adds or drops a GUARD_CLASSES word.
_END = r"\s*[.?!]?\s*$"
FORMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # an attribute of one object (colour, shape, label, number, position)
    (r"^what(?:'s| is) the (\w+) of (.+?)", ("Tell me the {1} of {2}.", "Give me the {1} of {2}.",
                                            "Name the {1} of {2}.", "Say the {1} of {2}.")),
    (r"^(?:tell me|let me know|name|give me) the (\w+) of (.+?)", ("What is the {1} of {2}?",
                                                                 "What's the {1} of {2}?")),
    (r"^what(?:'s| is) the (<colour>|<shape>|<label>) of (.+?)", ("What {1} does {2} have?",
                                                                 "Which {1} does {2} have?")),
    (r"^what (<colour>|<shape>) is (.+?)", ("What {1} does {2} have?", "Which {1} is {2}?", "{2} is what {1}?")),
    (r"^which (\w+) (is|does) (.+?)", ("What {1} {2} {3}?",)),
    (r"^what (\w+) is the ({n})(.*?)", ("Tell me what {1} the {2}{3} is.", "Say what {1} the {2}{3} is.",
                                        "What {1} would you say the {2}{3} is?")),
    # describe
    (r"^(<describe>) (this|the) (<image>)", ("Give me a description of {2} {3}.", "Tell me about {2} {3}.",
                                            "Provide a description of {2} {3}.", "Give me an overview of {2} {3}.",
                                            "Give me a summary of {2} {3}.", "What can you tell me about {2} {3}?")),
    (r"^what(?:'s| is) in (this|the) (<image>)", ("What does {1} {2} contain?", "What can be seen in {1} {2}?",
                                                 "What is there in {1} {2}?", "What appears in {1} {2}?",
                                                 "What is visible in {1} {2}?", "Tell me what is in {1} {2}.")),
    (r"^what (<object>s) are (?:there )?in (this|the) (<image>)", (
        "Which {1} are in {2} {3}?", "What {1} does {2} {3} contain?", "What {1} appear in {2} {3}?",
        "What {1} can be seen in {2} {3}?", "Name the {1} in {2} {3}.")),
    (r"^what does (this|the) (<image>) (<show>)", ("What is in {1} {2}?", "What can be seen in {1} {2}?",
                                                  "Tell me what {1} {2} {3}s.")),
    (r"^what do you (<see>)", ("What can you {1}?", "What do you {1} here?", "Tell me what you {1}.")),
    (r"^(?:<list>) (.+?) in (this|the) (<image>)", ("Name {1} in {2} {3}.", "Make a list of {1} in {2} {3}.",
                                                   "Give me a list of {1} in {2} {3}.")),
    (r"^name all the (<object>s)", ("List all the {1}.", "Name every one of the {1}.",
                                    "Give me a list of all the {1}.")),
    # count
    (r"^how many ({n}) are there", ("Count the {1}.", "What is the number of {1}?", "Tell me how many {1} there are.",
                                    "How many {1} are there in total?", "How many {1} can you find?",
                                    "How many {1} exist?", "How many {1} are there altogether?")),
    (r"^how many ({n}) are (?:in|on) (this|the) (<image>)", (
        "How many {1} does {2} {3} contain?", "Count the {1} in {2} {3}.", "What is the number of {1} in {2} {3}?",
        "How many {1} can be seen in {2} {3}?")),
    (r"^(?:can you |could you )?count the ({n})(.*?)", ("How many {1}{2}?", "How many {1} are there{2}?",
                                                        "What is the number of {1}{2}?")),
    # exist and relation: yes/no questions
    (r"^is (there|the {a}|{n}) (.+?)", ("Tell me whether {1} is {2}.", "Check whether {1} is {2}.",
                                        "Tell me if {1} is {2}.", "Is it true that {1} is {2}?",
                                        "Would you say {1} is {2}?")),
    (r"^is there ({n})(.*?)", ("Does {1} exist{2}?", "Can {1} be seen{2}?")),
    (r"^(?:<modal>|do you) (<see>|find) ({n})(.*?)", ("Is there {2}{3}?", "Is {2} visible{3}?",
                                                      "Tell me whether you {1} {2}{3}.")),
    (r"^does (this|the) (<image>) (?:<show>|have) ({n})", ("Is there {3} in {1} {2}?", "Can {3} be seen in {1} {2}?",
                                                          "Is {3} in {1} {2}?")),
    # position
    (r"^where(?:'s| is) the ({n})", ("What is the location of the {1}?", "Locate the {1}.",
                                     "Where can the {1} be found?", "In which part of the image is the {1}?",
                                     "Whereabouts is the {1}?")),
    (r"^where(?:'s| is) the ({n})(.*?)", ("Tell me where the {1} is{2}.",)),
    (r"^where(?:'s| is) the ({n}) in (this|the) (<image>)", ("Where in {2} {3} is the {1}?",
                                                            "In which part of {2} {3} is the {1}?",
                                                            "Locate the {1} in {2} {3}.")),
    (r"^(?:in )?(which|what) (<part>) of (this|the) (<image>) is the ({n})(?: in)?", (
        "Where in {3} {4} is the {5}?", "Which {2} of {3} {4} is the {5} in?", "In what {2} of {3} {4} is the {5}?",
        "Tell me which {2} of {3} {4} the {5} is in.")),
    (r"^what(?:'s| is) the (?:<location>) of the ({n})", ("Where is the {1}?", "Where's the {1}?")),
    (r"^where can i (find|<see>) the ({n})", ("Where is the {2} to be found?", "Where would I {1} the {2}?")),
    (r"^where does the ({n}) (?:<appear>)", ("Where is the {1}?", "Where can the {1} be seen?")),
    # label
    (r"^what does the (<text>|<label>) (<next>) the ({n}) say", (
        "What does the {1} {2} the {3} read?", "Read the {1} {2} the {3}.", "Tell me what the {1} {2} the {3} says.")),
    (r"^(?:<read>) the (<text>|<label>) (<next>) the ({n})", (
        "What does the {1} {2} the {3} say?", "Tell me what the {1} {2} the {3} says.",
        "Read out the {1} {2} the {3}.")),
    (r"^what(?:'s| is) (<written>) (<next>) the ({n})", ("Tell me what is {1} {2} the {3}.",
                                                        "What has been {1} {2} the {3}?")),
    (r"^what does the ({n})'s (<label>) say", ("What does the {2} of the {1} say?", "What is on the {1}'s {2}?")),
    # refer
    (r"^what(?:'s| is) (this|it)", ("What object is {1}?", "What is {1} called?", "What would you call {1}?",
                                    "Identify {1}.")),
    (r"^what (<object>) is (this|it)", ("Which {1} is {2}?", "What kind of {1} is {2}?")),
)


def _form_pattern(pattern: str) -> re.Pattern:
    for slot in ("n", "a", "b"):
        pattern = pattern.replace("{%s}" % slot, r"\{%s\}" % slot)
    pattern = re.sub(r"<(\w+)>", lambda m: "(?:" + _alternation(SYNONYMS[m.group(1)][0]) + ")", pattern)
    return re.compile(pattern + _END, re.IGNORECASE)


_FORMS = [(_form_pattern(p), r) for p, r in FORMS]


def _form(text: str, rng: np.random.Generator) -> str:
    fits = [(m, r) for p, r in _FORMS for m in [p.match(text)] if m]
    if not fits:
        return text
    m, replacements = _pick(fits, rng)
    out = _pick(replacements, rng)
    for i, g in enumerate(m.groups(), 1):
        out = out.replace("{%d}" % i, g)
    return out[:1].upper() + out[1:]  # '{2} is what {1}?' starts with 'the ...'


QUESTION_START = ("what", "what's", "which", "how", "where", "where's", "whereabouts", "is", "are", "does", "do",
                  "can", "could", "would", "in", "the", "any", "number", "color", "colour")
ANY_PREFIXES = ("Hey, ", "Hi, ", "Hello, ", "Quick question: ", "Question: ", "OK, ", "So, ", "Hey there, ",
                "Excuse me, ", "Hi there! ", "Sorry, ", "Quick one: ", "Hey, quick question: ", "Real quick: ")
COMMAND_PREFIXES = ("Please ", "Please, ", "Kindly ", "I want you to ", "Now ", "Go ahead and ", "I'd like you to ",
                    "I need you to ", "Try to ")
COMMAND_TO_QUESTION = ("Could you ", "Can you ", "Would you ", "Will you ", "Could you please ",
                       "Would you be able to ", "Are you able to ")
QUESTION_PREFIXES = ("I want to know: ", "I'd like to know: ", "Tell me: ", "Could you tell me: ",
                     "Here's my question: ", "Help me out: ", "One thing: ", "I was wondering: ", "Just wondering: ",
                     "Out of curiosity, ", "Do you know: ", "My question is: ")
INNER_SUFFIXES = (", please", ", thanks", " please", ", thank you", ", if you can", ", if possible", " for me")
OUTER_SUFFIXES = (" Thanks!", " Thank you.", " Thanks.", " Cheers.", " Thanks a lot.", " Much appreciated.",
                  " Thanks in advance.")


def _is_question(text: str) -> bool:
    return text.rstrip().endswith("?") or text.split(" ", 1)[0].lower().strip(",") in QUESTION_START


def _lower_first(text: str) -> str:
    first = text.split(" ", 1)[0].strip(",:!")
    keep = text.startswith(("I ", "I'", "{")) or (len(first) > 1 and first.isupper())  # 'OK, ...' stays 'OK'
    return text if keep else text[:1].lower() + text[1:]


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


FILLERS = ("Um, ", "Uh, ", "Well, ", "Okay so ", "Hmm, ", "Alright, ", "Oh, ", "Okay, ", "So ")
COMMAND_FILLERS = ("Just ", "Simply ", "Quickly ")


def _filler(text: str, rng: np.random.Generator) -> str:
    options = FILLERS if _is_question(text) else FILLERS + COMMAND_FILLERS
    return _pick(options, rng) + _lower_first(text)


NOISE = {"lowercase": 0.35, "no_final_mark": 0.3, "trailing_spaces": 0.15, "double_space": 0.15,
         "double_mark": 0.05, "no_apostrophe": 0.1, "typo": 0.1}
_TYPO_WORD = re.compile(r"(?<![{'\w])[A-Za-z]{4,}(?![}'\w])")


def _typo(text: str, rng: np.random.Generator) -> str:
    """One word of 4+ letters (not a slot, not a guarded word) with two inner letters swapped, one dropped or
    one doubled: 'picture' -> 'pictrue' / 'pcture' / 'pictture'."""
    spans = [m.span() for m in _TYPO_WORD.finditer(text) if m.group(0).lower() not in GUARD_WORDS]
    if not spans:
        return text
    start, end = _pick(spans, rng)
    word, i = text[start:end], int(rng.integers(1, end - start - 1))
    kind = int(rng.integers(3))
    kind = 1 if kind == 0 and word[i] == word[i + 1] else kind  # swapping 'll' would change nothing
    word = (word[:i] + word[i + 1] + word[i] + word[i + 2:] if kind == 0 else
            word[:i] + word[i + 1:] if kind == 1 else word[:i] + word[i] + word[i:])
    return text[:start] + word + text[end:]


def _noise(text: str, rng: np.random.Generator) -> str:
    if rng.random() < NOISE["lowercase"]:
        text = text.lower()
    if rng.random() < NOISE["no_final_mark"]:
        text = text.rstrip().rstrip(".?!")
    elif rng.random() < NOISE["double_mark"] and text.endswith("?"):
        text += "?"
    if rng.random() < NOISE["no_apostrophe"]:
        text = text.replace("'", "")
    if rng.random() < NOISE["typo"]:
        text = _typo(text, rng)
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


# Applied in this order: word-level first, then the sentence's form (contracted after), what wraps it, noise.
RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("synonyms", 0.7, _synonyms, "generic word swaps within a group: "
         + "; ".join("/".join(words) for words, _ in SYNONYMS.values())),
    Rule("form", 0.4, _form, "sentence forms per family that keep the meaning: 'What is the X of Y?' <-> 'Tell "
         "me the X of Y.', 'What color is the {n}?' -> 'What color does the {n} have?', 'Describe the image.' -> "
         "'Give me a description of the image.', 'What's in this image?' -> 'What does this image contain?', "
         "'How many {n} are there?' -> 'Count the {n}.', 'Is there {n}?' -> 'Is it true that there is {n}?', "
         "'Where is the {n}?' -> 'Locate the {n}.', 'Read the label next to the {n}.' -> 'What does the label "
         "next to the {n} say?', 'What is this?' -> 'What is this called?'"),
    Rule("contractions", 0.3, _contractions, "what is/what's, where is/where's, it is/it's, that is/that's, "
         "there is/there's"),
    Rule("wrapper", 0.5, _wrapper, "politeness and framing: 'Hey, ...', 'Quick question: ...', 'Please ...', "
         "'Could you ...?', 'I was wondering: ...', '..., if possible', '... Thanks in advance.'"),
    Rule("filler", 0.15, _filler, "a filler opening: 'Um, ', 'Well, ', 'Okay so ', 'Oh, ', 'Just ' (commands)"),
    Rule("noise", 0.5, _noise, "casing, punctuation and typing slips: lowercase, no final mark, '??', dropped "
         "apostrophes, one typo (not in a slot or guarded word), a doubled space, trailing spaces (probabilities "
         "in NOISE)"),
)}
ATTEMPTS = 16


def _guarded(text: str) -> Counter:
    return Counter(_GUARD_OF[m] for m in _GUARD_PATTERN.findall(norm(text)))


def acceptable(source: str, out: str) -> bool:
    """`out` keeps `source`'s slots and guarded classes, differs from it and is no HELD_OUT template."""
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
            "noise": dict(NOISE), "guard_classes": {k: list(v) for k, v in GUARD_CLASSES.items()},
            "attempts": ATTEMPTS, "refused": "rewrites equal to a HELD_OUT template after norm(), or changing "
            "slots or how often a guarded class occurs"}
