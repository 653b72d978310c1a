"""`pipmm tvp`: transferable visual prompting on the workstation (docs/tvp.md).

    pipmm tvp scenes --out DIR --n 300 [--split train|test]   shifted-domain images + questions (export/tvp/domain.py)
    pipmm tvp clip-train --out DIR                            TSE's image-text guide (export/tvp/clip_train.py)
    pipmm tvp train --source CKPT --data DIR --out PROMPT     the prompt (export/tvp/train.py)
    pipmm tvp finetune --source CKPT --data DIR --out CKPT2   the per-model projector fine-tune (export/tvp/finetune.py)
"""

from __future__ import annotations

import importlib

# action -> (module, one-line help); each module has add_arguments(parser) and run(args)
ACTIONS = {
    "scenes": ("export.tvp.cli_scenes", "write shifted-domain scenes with questions and captions"),
    "clip-train": ("export.tvp.clip_train", "train SceneClip, the frozen image-text guide of TSE"),
    "train": ("export.tvp.train", "train a visual prompt on a frozen source MLLM"),
    "finetune": ("export.tvp.finetune", "fine-tune a model's projector on the same data (the per-model alternative)"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, (module, help_text) in ACTIONS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(action, help=help_text, description=help_text))


def run(args) -> int:
    return importlib.import_module(ACTIONS[args.action][0]).run(args)
