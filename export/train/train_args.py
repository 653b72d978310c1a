"""`pipmm train`'s command-line options (export/train/train.py runs them; multiframe.py adds --stage mv's)."""

from __future__ import annotations

import argparse

from export.model.reducers import REDUCERS
from export.train import multiframe
from export.train.archs import ARCHS
from export.train.data import SCENE_MIXES
from export.tasks.questions import FAMILIES
from export.train.templates import TEMPLATES


def family_count(text: str) -> tuple[str, int]:
    """'relation=2' -> ('relation', 2): a question family (export/tasks/questions.py) and a count >= 0."""
    family, _, count = text.partition("=")
    if family not in FAMILIES or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use FAMILY=N with N >= 0 and FAMILY one of {', '.join(FAMILIES)}")
    return family, int(count)


def add_arguments(parser) -> None:
    p = parser
    p.add_argument("--stage", type=lambda v: v if v == "mv" else int(v), choices=(0, 1, 2, "mv"), required=True,
                   help="0 base model, 1 prompt MLP, 2 budget, mv several frames (export/train/multiframe.py)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--init", default=None, help="checkpoint to start from (stages 1 and 2; stage 0: continue one)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (stage default: 3000/600/600)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="fit the run into S seconds: steps = min(--steps, measured steps/s * S), recorded")
    p.add_argument("--batch-size", type=int, default=None,
                   help="questions per step (one per family of ceil(B/8) scenes; default 256/128/128)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3/1e-3/3e-4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay down to lr * this")
    p.add_argument("--seed", type=int, default=0, help="init and data stream (scene offset += seed * 1e7)")
    p.add_argument("--data-offset", type=int, default=None,
                   help="first train scene of the stream (default: per stage 0 / 1e8 / 2e8, + seed * 1e7)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=None, help="scene-drawing processes (default: cores - 2, <= 14)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its trainer state")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="save a resumable checkpoint after step N and stop (split a run; --resume continues)")
    p.add_argument("--stop-after-seconds", type=float, default=None, metavar="S",
                   help="save a resumable checkpoint once this process has trained S seconds and stop, whatever "
                        "the step (split a long run over time-limited machines; --resume continues)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--val-scenes", type=int, default=64, help="validation scenes scored at the end (0: none)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (tests and CPU smoke runs)")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="stage 0 from scratch: a named architecture (export/train/archs.py; default: r11's sizes), "
                        "its tokenizer trained on the generator's text; the size flags below override its fields")
    p.add_argument("--rewarmup", type=int, default=200, metavar="N",
                   help="--resume from a portable copy (bf16 weights, no optimizer state): the learning rate "
                        "ramps from 0 back to the schedule's over N steps while the fresh AdamW moments fill")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    for name in ("vision-hidden", "vision-layers", "vision-heads", "vision-mlp", "text-hidden", "text-layers",
                 "text-heads", "text-kv-heads", "text-mlp"):
        p.add_argument(f"--{name}", type=int, default=None, help="model size (stage 0)")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="stage 0: weight of the auxiliary patch-classification loss (default 1.0; 0 = LM loss only)")
    p.add_argument("--locate-weight", type=float, default=None, metavar="W",
                   help="weight of the locate loss (export/train/locate.py: a training-only head regresses the "
                        "places of the objects the prompt names from one LLM layer's last prompt token; "
                        "default 0; a --resume keeps the run's)")
    p.add_argument("--locate-layer", type=int, default=None, metavar="L",
                   help="the LLM layer whose output the locate head reads (default: two below the top)")
    p.add_argument("--reduced-fraction", type=float, default=None,
                   help="stage 0: fraction of questions trained on a reduced visual-token set (their objects' "
                        "patches + random others; see model.sample_keep; default 0; a --resume keeps the run's)")
    p.add_argument("--pack-questions", action="store_const", const=True, default=None,
                   help="stage 0: one sequence a scene, the image once and each question after it attending to the "
                        "image and itself (data.pack_scene; the same loss as a row a question, ~4x fewer LLM tokens; "
                        "not with --reduced-fraction or the prompt-first template; a --resume keeps the run's)")
    p.add_argument("--reduced-budgets", nargs="+", default=["half", "quarter"],
                   help="stage 0: the budgets those reduced sets are drawn from")
    p.add_argument("--tokenizer-scenes", type=int, default=2000, help="scenes whose text trains the tokenizer")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="chat template (export/train/templates.py; default: --init's, else llava-1.5); prompt-first: "
                        "question before image, the prompt pass is the prefill's prefix (DIR/chat_template.jinja)")
    # PIP-MM
    p.add_argument("--prompt-layer", type=int, default=-1, help="LLM layer of the prompt vector (-1: last, normed)")
    p.add_argument("--pooling", default="last", choices=("last", "mean"), help="prompt vector: last token or mean")
    p.add_argument("--mlp-width", type=int, default=0, help="prompt MLP hidden width (0: ViT width)")
    p.add_argument("--no-prompt-mlp", action="store_true", help="stage 2 without the MLP: the plain baseline")
    p.add_argument("--train-llm", action="store_true", help="stage 2: also fine-tune the LLM")
    p.add_argument("--instruction-fraction", type=float, default=None, metavar="F",
                   help="append an answer-form instruction (export/tasks/instructions.py) to this fraction of the "
                        "training questions that one fits (0-1; default per stage: 0.1 / 0 / 0)")
    p.add_argument("--paraphrase-fraction", type=float, default=None, metavar="F",
                   help="reword this fraction of the training questions (export/tasks/paraphrase.py: synonyms, "
                        "question/command forms, polite wrappers, casing noise; never a held-out template; "
                        "stages 0-2, 0-1, default 0; a --resume keeps the run's)")
    p.add_argument("--extra-questions", nargs="+", type=family_count, default=None, metavar="FAMILY=N",
                   help="N more questions of FAMILY a training scene beside one of each family (e.g. relation=2; "
                        "the batch keeps its question count; a --resume keeps the run's)")
    p.add_argument("--scene-mix", default="mixed", choices=tuple(SCENE_MIXES),
                   help="training scenes: 'mixed' = the train styles and phrasings (export/tasks/styles.py "
                        "TRAIN_STYLES, phrasings.TRAIN; default), 'classic' = the original grey scenes and "
                        "three phrasings per family")
    p.add_argument("--patch-positions", action="store_true",
                   help="stage 2 with prompt-topk: kept visual tokens at their patch positions (export the result "
                        "with --visual-positions patch)")
    p.add_argument("--budget", default=None, help="visual tokens: full, half, quarter or K (stage 2 default half)")
    p.add_argument("--reducer", default="prompt-topk", choices=list(REDUCERS))
    p.add_argument("--grounding-weight", type=float, default=0.0,
                   help="stages 1-2: weight of -log(T-CLS attention on the named objects' patches) (not in "
                        "the paper; 0 = the LM loss alone)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    multiframe.add_arguments(p)
