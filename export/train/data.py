"""Training data: the tokenizer, sequences built exactly as the SDK builds them, and batches of scenes.

A training sequence is the SDK's own prompt (sdk.prompting.Prompter, the bundle's chat template
with K image slots) followed by the answer and EOS; the loss reads only the answer and EOS:

    ids    [<s> U S E R : Ġ <image>*K Ċ What Ġcolor ... ? Ġ ASSISTANT : | Ġred </s> <pad>...]
    labels [-100 ...                                                 -100 | Ġred </s> -100...]

The prompt encoder's ids (PIP-MM) are Prompter.encoder_ids: "<s>USER: {prompt}", no image. The template is
SequenceSpec.template (export/train/templates.py; `pipmm train --template prompt-first` puts the question first).
Every row is right-padded, so positions 0..T-1 are those the SDK uses (it never pads) and causal
attention keeps the real tokens from ever seeing the pads.

Batches are drawn by worker processes (PIL drawing costs ~7 ms a scene): batch i holds scenes
seed_offset + i * S ... + S - 1 of the train split, each with its questions (one per family),
so batch i is the same whatever the number of workers, and resuming at step i skips nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from sdk.manifest import SpecialTokens
from sdk.preprocess import preprocess

from export.tasks import instructions, scenes
from export.train.templates import DEFAULT as DEFAULT_TEMPLATE, TEMPLATES

IGNORE = -100
SCENE_MIXES = {"mixed": "train", "classic": "train-classic"}  # pipmm train --scene-mix -> split of scenes.py


def data_mix(mix: str) -> dict:
    """What a train batch of --scene-mix `mix` draws (recorded in train_config.json)."""
    split = SCENE_MIXES[mix]
    spec = scenes.SPLITS[split]
    return {"scene_mix": mix, "split": split, "families": list(spec.families), "styles": dict(spec.styles),
            "phrasing": spec.phrasing, "held_out_styles": list(scenes.HELD_OUT_STYLES)}


# ----------------------------------------------------------------------------- tokenizer

def conversation_texts(n_scenes: int, split: str = "train", template: str = DEFAULT_TEMPLATE,
                       answerless: tuple[str, ...] = ()):
    """corpus_text as the model will see it: every prompt in the chat turn and the prompt encoder's text
    of `template` (templates.TEMPLATES), answers after ' ' (none for the `answerless` families)."""
    chat = TEMPLATES[template].chat
    texts = scenes.corpus_text(n_scenes, split, answerless)
    yield next(texts)  # the closed answer vocabulary
    # every trained answer-form instruction once, with the forms of answers it asks for
    yield " ".join([*instructions.NUMBER_WORDS, "true", "false", *(c.upper() for c in scenes.COLORS),
                    *(s.upper() for s in scenes.SHAPES), *(p.upper() for p in scenes.POSITIONS)])
    for instruction in instructions.TRAINED.values():
        for text in instruction.texts:
            yield chat.prompt.replace("{prompt}", "What is it? " + text)
    prompt = None
    for text in texts:
        if prompt is None:
            prompt = text
            continue
        yield chat.prompt.replace("{prompt}", prompt) + " " + text
        yield chat.prompt_encoder.replace("{prompt}", prompt)
        prompt = None


def build_tokenizer(n_scenes: int = 2000, vocab_size: int = 512, template: str = DEFAULT_TEMPLATE,
                    split: str = "train", answerless: tuple[str, ...] = ()):
    from export.synthetic import train_tokenizer

    return train_tokenizer(conversation_texts(n_scenes, split, template, answerless), vocab_size=vocab_size)


@dataclass
class SequenceSpec:
    """What a worker needs to build sequences (picklable): tokenizer file and token ids."""
    tokenizer_file: str
    special: dict  # bos, eos (list), pad, image, texts
    num_visual_tokens: int
    max_context: int
    template: str = DEFAULT_TEMPLATE  # a name in templates.TEMPLATES

    def prompter(self):
        from sdk.prompting import Prompter

        return Prompter(self.tokenizer_file, TEMPLATES[self.template].chat, SpecialTokens.from_dict(self.special, "special tokens"),
                        self.num_visual_tokens, self.max_context)


def encode_example(prompter, prompt: str, answer: str) -> tuple[list[int], list[int], list[int]]:
    """-> (ids, labels, encoder ids). Answer tokens are the tokenizer's for ' ' + answer, then EOS."""
    ids, _ = prompter.prompt_ids(prompt)
    ids = ids.tolist()
    answer_ids = prompter.tokenizer.encode(" " + answer, add_special_tokens=False).ids + [min(prompter.eos_ids)]
    labels = [IGNORE] * len(ids) + answer_ids
    return ids + answer_ids, labels, prompter.encoder_ids(prompt).tolist()


# ----------------------------------------------------------------------------- grounding

_ATTRIBUTES = {**{s: ("shape", s) for s in scenes.SHAPES}, **{p: ("shape", s) for s, p in scenes.PLURALS.items()},
               **{c: ("color", c) for c in scenes.COLORS}, **{z: ("size", z) for z in scenes.SIZES},
               "object": None, "objects": None}


def named_phrases(prompt: str) -> list[dict]:
    """Object names in a prompt: maximal runs of size/colour/shape words -> [{attribute: value}]."""
    phrases, current = [], None
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in _ATTRIBUTES:
            current = {} if current is None else current
            if _ATTRIBUTES[word]:
                key, value = _ATTRIBUTES[word]
                current[key] = value
        elif current is not None:
            phrases.append(current)
            current = None
    if current is not None:
        phrases.append(current)
    return [p for p in phrases if p]


def relevant_objects(scene, question) -> list:
    """The drawn objects a question is about: all of them for a caption, else those its names match."""
    if question.family in ("describe", "refer"):  # refer: asked of one-object scenes only
        return list(scene.objects)
    out = []
    for phrase in named_phrases(question.prompt):
        out += [o for o in matching_objects(scene, phrase) if o not in out]
    return out


def matching_objects(scene, phrase: dict) -> list:
    """The drawn objects that a name ({attribute: value}, named_phrases) fits."""
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in phrase.items())]


LOCATE_FAMILIES = ("color", "shape", "position", "label", "relation")
LOCATE_OUTPUTS = 4  # x_a, y_a, x_b, y_b


def locate_targets(scene, question) -> tuple[np.ndarray, np.ndarray]:
    """-> (targets [4] float32, present [4] bool): the view coordinates, in [-1, 1], of the first and second object
    the prompt names where a name matches exactly one drawn object (export/train/locate.py says why)."""
    targets, present = np.zeros(LOCATE_OUTPUTS, np.float32), np.zeros(LOCATE_OUTPUTS, bool)
    if question.family not in LOCATE_FAMILIES:
        return targets, present
    half = scene.image_size / 2
    for slot, phrase in enumerate(named_phrases(question.prompt)[:2]):
        matches = matching_objects(scene, phrase)
        if len(matches) != 1:
            continue
        x, y = scene.view_xy(matches[0].x, matches[0].y)
        targets[2 * slot:2 * slot + 2] = (x - half) / half, (y - half) / half
        present[2 * slot:2 * slot + 2] = True
    return targets, present


def relevant_patches(scene, question, grid: int) -> np.ndarray:
    """[grid*grid] bool: patches overlapped by the box of a relevant object (and its label for 'label')."""
    mask = np.zeros((grid, grid), bool)
    cell = scene.image_size / grid
    ox, oy = scene.offset  # canvas -> view (what the model sees after the centre crop)
    for o in relevant_objects(scene, question):
        boxes = [(o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius)]
        if question.family == "label" and o.label_box:
            boxes.append(o.label_box)
        for x0, y0, x1, y1 in ((a - ox, b - oy, c - ox, d - oy) for a, b, c, d in boxes):
            r0, r1 = int(max(y0, 0) // cell), int(min(y1, scene.image_size - 1) // cell)
            c0, c1 = int(max(x0, 0) // cell), int(min(x1, scene.image_size - 1) // cell)
            mask[r0:r1 + 1, c0:c1 + 1] = True
    return mask.reshape(-1)


# ----------------------------------------------------------------------------- batches

# Classes of the auxiliary patch targets. Objects: 0 = no object centre in the patch, else 1 + the
# index of (size, colour, shape) in this order: 1 + 2 * 11 * 10 = 221 classes. Label characters: up to
# CHAR_SLOTS characters of a label have their centre in one patch (a character is ~6 px wide at
# 224 px, a patch 14 px), slot j holds the j-th of them from the left: 0 = none, else 1 + index in
# scenes._LABEL_CHARS.
PATCH_CLASSES = [None] + [(z, c, s) for z in scenes.SIZES for c in scenes.COLORS for s in scenes.SHAPES]
_PATCH_CLASS = {key: i for i, key in enumerate(PATCH_CLASSES) if key is not None}
CHAR_CLASSES = [None] + list(scenes.LABEL_CHARS)
CHAR_SLOTS = 3


def patch_targets(scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (objects [grid*grid] int64, chars [grid*grid, CHAR_SLOTS] int64), see PATCH_CLASSES.

    The dense targets of stage 0's auxiliary loss: they tell the ViT directly what the caption and
    the label questions will name at each place, instead of only through the language model's loss.
    """
    objects = np.zeros(grid * grid, np.int64)
    chars = np.zeros((grid * grid, CHAR_SLOTS), np.int64)
    cell = scene.image_size / grid

    def patch(x, y):  # canvas pixel -> patch of the view
        x, y = scene.view_xy(x, y)
        return min(max(int(y // cell), 0), grid - 1) * grid + min(max(int(x // cell), 0), grid - 1)

    for o in scene.objects:
        objects[patch(o.x, o.y)] = _PATCH_CLASS[(o.size, o.color, o.shape)]
        for ch, x, y in scenes.label_char_centres(o, scene.image_size):
            row = chars[patch(x, y)]
            free = np.flatnonzero(row == 0)
            if free.size:
                row[free[0]] = CHAR_CLASSES.index(ch)
    return objects, chars


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


def text_tensors(encoded: list[tuple[list[int], list[int], list[int]]], pad: int) -> dict:
    """[encode_example(...)] -> the padded text tensors of a batch."""
    ids, labels, enc = (list(column) for column in zip(*encoded))
    return {
        "input_ids": pad_rows(ids, pad),                                            # [Q,T]
        "labels": pad_rows(labels, IGNORE),                                         # [Q,T]
        "encoder_ids": pad_rows(enc, pad),                                          # [Q,Te]
        "encoder_lengths": torch.tensor([len(e) for e in enc], dtype=torch.int64),  # [Q]
    }


def pack_scene(encoded: list[tuple[list[int], list[int], list[int]]], image_token: int) -> tuple[list[int], ...]:
    """One scene's questions [encode_example(...)] -> one packed row (ids, positions, segments, targets).

    The image is encoded once: the row is the shared prefix up to the last image slot, then every question's
    rest (question, answer, EOS) one after another, each starting at the position the prefix ends at:

        ids       [<s> U S E R : Ġ <image>*K | Ċ What ... ASSISTANT : Ġred </s> | Ċ How ... Ġ3 </s> | ...]
        positions [0 ...                P-1 | P P+1 ...                       | P P+1 ...          | ...]
        segments  [0 ...                  0 | 1 ...                           | 2 ...              | ...]

    A token of segment i > 0 attends to the prefix and causally to segment i (model.packed_attention_mask), so
    each question sees exactly the tokens and positions of its own unpacked sequence. targets[t] is the token
    that position t predicts within its segment (the label of the next token, IGNORE at a segment's end).
    """
    ids0 = encoded[0][0]
    prefix = len(ids0) - ids0[::-1].index(image_token)  # just after the last image slot
    ids, positions, segments = list(ids0[:prefix]), list(range(prefix)), [0] * prefix
    targets = [IGNORE] * prefix  # the prefix's last token would predict a question's first token: never scored
    for i, (row, labels, _) in enumerate(encoded, 1):
        if row[:prefix] != ids0[:prefix] or any(t != IGNORE for t in labels[:prefix + 1]):
            raise ValueError("packing needs questions that share the prefix up to the image and ask after it")
        ids += row[prefix:]
        positions += range(prefix, len(row))
        segments += [i] * (len(row) - prefix)
        targets += labels[prefix + 1:] + [IGNORE]
    return ids, positions, segments, targets


def packed_tensors(rows: list[tuple[list[int], ...]], pad: int) -> dict:
    """[pack_scene(...)] -> right-padded [S,L] tensors; pads are segment -1."""
    ids, positions, segments, targets = (list(column) for column in zip(*rows))
    return {"packed_ids": pad_rows(ids, pad), "packed_positions": pad_rows(positions, 0),
            "packed_segments": pad_rows(segments, -1), "packed_targets": pad_rows(targets, IGNORE)}


def collate_scenes(items: list[tuple], spec: SequenceSpec, prompter, preprocessing: dict, grid: int,
                   families=scenes.FAMILIES, pack: bool = False) -> dict:
    """[(scene, [Question])] -> one batch dict of tensors (see SceneBatches); pack: one packed row a scene
    (pack_scene) instead of a row a question (stage 0's language-model loss reads only these)."""
    pixels, encoded, scene_index, grounding, family = [], [], [], [], []
    classes, packed, located = [], [], []
    for s, (scene, questions) in enumerate(items):
        pixels.append(preprocess(scene.image, preprocessing)[0])
        classes.append(patch_targets(scene, grid))
        for q in questions:
            encoded.append(encode_example(prompter, q.prompt, q.answer))
            scene_index.append(s)
            grounding.append(relevant_patches(scene, q, grid))
            located.append(locate_targets(scene, q))
            family.append(families.index(q.family) if q.family in families else -1)
        if pack:
            packed.append(pack_scene(encoded[-len(questions):], int(spec.special["image"])))
    pad = int(spec.special["pad"])
    # input_ids, labels [Q,T], encoder_ids [Q,Te], encoder_lengths [Q]; packed: packed_ids ... packed_targets [S,L]
    text = packed_tensors(packed, pad) if pack else text_tensors(encoded, pad)
    return {
        "pixel_values": torch.from_numpy(np.stack(pixels)),                       # [S,3,H,W] float32
        **text,
        "scene_index": torch.tensor(scene_index, dtype=torch.int64),              # [Q] -> row of pixel_values
        "grounding": torch.from_numpy(np.stack(grounding)),                       # [Q,N] bool
        "family": torch.tensor(family, dtype=torch.int64),                        # [Q] index into FAMILIES
        "patch_classes": torch.from_numpy(np.stack([c[0] for c in classes])),     # [S,N] index into PATCH_CLASSES
        "patch_chars": torch.from_numpy(np.stack([c[1] for c in classes])),       # [S,N,3] index into CHAR_CLASSES
        "locate": torch.from_numpy(np.stack([t for t, _ in located])),            # [Q,4] float32 (locate_targets)
        "locate_present": torch.from_numpy(np.stack([p for _, p in located])),    # [Q,4] bool
    }


def scene_items(split: str, first: int, count: int, size: int, families=None,
                questions_per_family=1, instruction_fraction: float = 0.0,
                paraphrase_fraction: float = 0.0) -> list[tuple]:
    """[(scene, [Question])] for scenes first..first+count-1 of `split` (its styles, phrasings and families;
    scenes.SPLITS); a fraction of the questions is reworded (export/tasks/paraphrase.py) and a fraction gets an
    answer-form instruction (export/tasks/instructions.py), each from its own stream, so the scenes and the
    questions asked are the same for any fractions. questions_per_family: an int, or {family: count} (1 where a
    family is not named; make_questions)."""
    spec = scenes.SPLITS[split]
    families = scenes.split_families(split, families)
    items = []
    for i in range(first, first + count):
        scene = scenes.split_scene(split, i, size)
        questions = scenes.scene_questions(scene, None, families, spec.phrasing, per_family=questions_per_family,
                                           paraphrase=paraphrase_fraction)
        instruct_rng = np.random.Generator(np.random.PCG64([scene.seed, 2]))
        items.append((scene, instructions.maybe_instruct(questions, instruct_rng, instruction_fraction,
                                                         spec.instruction_phrasing)))
    return items


class IndexedBatches(torch.utils.data.IterableDataset):
    """Batch i is a function of i alone (self.batch(i, prompter)): worker w of W builds start + w, start + w + W,
    ..., forever, so any number of workers and a resume at step i give the same stream. Subclasses set
    self.spec (a SequenceSpec) and self.start."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        prompter = self.spec.prompter()
        index = self.start + worker
        while True:
            yield self.batch(index, prompter)
            index += workers


class SceneBatches(IndexedBatches):
    """Batches `start`, `start + 1`, ... of `scenes_per_batch` train scenes each, forever.

    Worker w of W builds batches start + w, start + w + W, ...; the DataLoader hands them back in
    round-robin worker order, i.e. in batch order, so the stream is the same for any W.
    """

    def __init__(self, spec: SequenceSpec, preprocessing: dict, scenes_per_batch: int, image_size: int, grid: int,
                 seed_offset: int = 0, start: int = 0, split: str = "train", families=None,
                 instruction_fraction: float = 0.0, paraphrase_fraction: float = 0.0, pack: bool = False,
                 extra_questions: dict[str, int] | None = None):
        super().__init__()
        self.instruction_fraction, self.paraphrase_fraction = instruction_fraction, paraphrase_fraction
        # {family: n}: n more questions of that family a scene (--extra-questions), one of every other
        self.per_family = {f: 1 + n for f, n in (extra_questions or {}).items()}
        self.pack = pack  # one packed row a scene (pack_scene)
        self.spec, self.preprocessing, self.grid = spec, preprocessing, grid
        self.scenes_per_batch, self.image_size = scenes_per_batch, image_size
        self.seed_offset, self.start, self.split = seed_offset, start, split
        self.families = scenes.split_families(split, families)

    def batch(self, index: int, prompter=None) -> dict:
        prompter = prompter or self.spec.prompter()
        first = self.seed_offset + index * self.scenes_per_batch
        items = scene_items(self.split, first, self.scenes_per_batch, self.image_size, self.families,
                            questions_per_family=self.per_family, instruction_fraction=self.instruction_fraction,
                            paraphrase_fraction=self.paraphrase_fraction)
        return collate_scenes(items, self.spec, prompter, self.preprocessing, self.grid, pack=self.pack)



def loader(dataset: SceneBatches, workers: int):
    """A DataLoader over whole batches (batch_size=None: the dataset already collates)."""
    kwargs = {"num_workers": workers, "batch_size": None, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, **kwargs)
