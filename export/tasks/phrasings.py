"""Question phrasings: TRAIN (what training asks), HELD_OUT (never trained: the `phrasing` eval split), LEGACY.

Written separately, by hand: HELD_OUT is not a rewording generated from TRAIN, and
tests/test_phrasings.py checks that no template of one is a template of the other after
normalising case, punctuation and whitespace. LEGACY is the original three-per-family set (a
subset of TRAIN) that the `classic` split asks, so that old figures reproduce. The phrasings a
newcomer typed in issue 19 -- "Describe the scene." and "What does the picture show?" -- are
in TRAIN on purpose: people do type them.

Slots: {n} the object's name ("star", "red star"; exist: with its article, "a red star"; count: a
plural, "stars" or "red objects"), {a}/{b} the two objects of a relation. relation and refer
templates are grouped by what they ask (direction; colour/shape/what).
"""

from __future__ import annotations

TRAIN = {
    "describe": (
        "Describe the image.", "List the objects in the image.", "What objects are in this picture?",
        "Describe the scene.", "What does the picture show?", "What's in this image?", "What do you see?",
        "describe this picture", "list everything in the image", "What is in the picture?",
        "Tell me what you see in the image.", "what objects can you see", "Can you describe this image?",
        "Name all the objects.", "What's shown here?"),
    "color": (
        "What color is the {n}?", "What is the color of the {n}?", "Which color does the {n} have?",
        "What colour is the {n}?", "what color is the {n}", "Which color is the {n}?",
        "Tell me the color of the {n}.", "What's the color of the {n}?", "The {n} is what color?",
        "what colour's the {n}", "Name the color of the {n}.", "Can you tell me what color the {n} is?",
        "color of the {n}?"),
    "shape": (
        "What shape is the {n} object?", "What is the shape of the {n} object?", "Name the shape of the {n} object.",
        "What shape is the {n} thing?", "what shape is the {n} one", "Which shape is the {n} object?",
        "What's the shape of the {n} object?", "Tell me the shape of the {n} object.",
        "What kind of shape is the {n} object?", "the {n} object is which shape?", "What is the {n} object?",
        "What form does the {n} object have?", "what's the {n} shape"),
    "count": (
        "How many {n} are there?", "How many {n} are in the image?", "Count the {n}.", "how many {n} do you see",
        "How many {n} can you see?", "What's the number of {n}?", "Count the {n} in the picture.",
        "how many {n} are there", "Number of {n}?", "How many {n} does the image contain?",
        "Tell me how many {n} there are.", "How many {n} are shown?", "Can you count the {n}?"),
    "exist": (
        "Is there {n}?", "Does the image contain {n}?", "Can you see {n}?", "is there {n} in the picture",
        "Do you see {n}?", "Is there {n} in the image?", "Does the picture have {n}?", "Can you find {n}?",
        "Is {n} visible?", "Does this image show {n}?", "is there {n} anywhere", "Is {n} present?",
        "Any sign of {n}?"),
    "position": (
        "Where is the {n}?", "Where is the {n} in the image?", "In which part of the image is the {n}?",
        "where's the {n}", "Where is the {n} located?", "Which part of the picture is the {n} in?",
        "Where can I find the {n}?", "Where does the {n} appear?", "What is the position of the {n}?",
        "Tell me where the {n} is.", "where is the {n} placed", "In what part of the image is the {n}?",
        "Where in the picture is the {n}?"),
    "relation": {
        "left": ("Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?",
                 "is the {a} on the left of the {b}", "Is the {a} further left than the {b}?"),
        "right": ("Is the {a} right of the {b}?", "Is the {a} to the right of the {b}?",
                  "is the {a} on the right of the {b}", "Is the {a} further right than the {b}?"),
        "above": ("Is the {a} above the {b}?", "Is the {a} higher than the {b}?", "is the {a} over the {b}",
                  "Is the {a} higher up than the {b}?"),
        "below": ("Is the {a} below the {b}?", "Is the {a} lower than the {b}?", "is the {a} under the {b}",
                  "Is the {a} beneath the {b}?"),
    },
    "label": (
        "What does the label next to the {n} say?", "What is written next to the {n}?",
        "Read the label next to the {n}.", "What's written next to the {n}?",
        "what does the text beside the {n} say", "Read the text next to the {n}.", "What text is next to the {n}?",
        "What is the label of the {n}?", "What does the {n}'s label say?", "Read out the label by the {n}.",
        "What is the {n} labelled?", "Tell me the label next to the {n}.", "what's written beside the {n}"),
    "refer": {
        "color": ("What color is the object?", "What color is this?", "What colour is it?",
                  "what color is this object", "Which color does this object have?"),
        "shape": ("What shape is this?", "What shape is the object?", "what shape is it",
                  "Which shape is this object?"),
        "what": ("What is this?", "What object is this?", "What is it?", "What's this thing?",
                 "what is this object"),
    },
}

HELD_OUT = {
    "describe": (
        "Give me a description of this photo.", "what's going on in this image", "Please list all the shapes you can see.",
        "Caption this image.", "What can be seen in the frame?", "Explain what this picture contains.",
        "Tell me about this image.", "which things appear in the picture?"),
    "color": (
        "I'd like to know the colour of the {n}.", "what is the {n}'s color", "Identify the color of the {n}.",
        "How is the {n} colored?", "Say which colour the {n} is.", "Tell me which color the {n} has.",
        "What hue is the {n}?", "In what color is the {n} drawn?"),
    "shape": (
        "Identify the shape of the {n} object.", "What sort of shape is the {n} item?",
        "Which geometric shape is the {n} one?", "I wonder what shape the {n} object has.",
        "Can you name the {n} object's shape?", "what is the {n} thing shaped like", "Say the shape of the {n} item.",
        "Tell me what shape the {n} item is."),
    "count": (
        "What is the total number of {n}?", "count all the {n} please", "How many {n} appear in this picture?",
        "Give me the count of {n}.", "I need the number of {n} in the frame.", "how many {n} are visible",
        "Could you tell me how many {n} there are?", "Count how many {n} you can find."),
    "exist": (
        "Could you check whether there is {n}?", "Does the frame include {n}?", "Tell me if there is {n}.",
        "is {n} in this photo", "Would I find {n} in the picture?", "Is there {n} somewhere in this image?",
        "Can {n} be seen?", "Does {n} appear in the image?"),
    "position": (
        "Locate the {n}.", "whereabouts is the {n}", "Point out where the {n} sits.",
        "What region of the frame holds the {n}?", "Where would I look for the {n}?",
        "Which area of the image contains the {n}?", "Give the location of the {n}.", "Where exactly is the {n}?"),
    "relation": {
        "left": ("Does the {a} lie to the left of the {b}?", "Is the {a} on the {b}'s left?"),
        "right": ("Does the {a} lie to the right of the {b}?", "Is the {a} on the {b}'s right side?"),
        "above": ("Does the {a} sit above the {b}?", "Is the {a} placed higher than the {b}?"),
        "below": ("Does the {a} sit below the {b}?", "is the {a} positioned lower than the {b}"),
    },
    "label": (
        "What characters are printed beside the {n}?", "Transcribe the label near the {n}.",
        "what's the tag next to the {n}", "Which text is written by the {n}?", "What word appears next to the {n}?",
        "Spell the label beside the {n}.", "What does the caption by the {n} read?",
        "Can you read what it says next to the {n}?"),
    "refer": {
        "color": ("Tell me the colour of this object.", "which colour is it"),
        "shape": ("What kind of shape is this thing?", "Identify this shape."),
        "what": ("What am I looking at?", "Name this object.", "What is the thing here?",
                 "Can you tell me what this is?"),
    },
}

LEGACY = {family: (templates[:3] if isinstance(templates, tuple) else {k: v[:1] for k, v in templates.items()})
          for family, templates in TRAIN.items() if family != "refer"}

# The noun of a colour count ("How many red {noun}...") per phrasing set; legacy asks only "objects".
COUNT_NOUNS = {"train": ("objects", "things", "shapes"), "held_out": ("items", "objects"), "legacy": ("objects",)}
PHRASINGS = {"train": TRAIN, "held_out": HELD_OUT, "legacy": LEGACY}
