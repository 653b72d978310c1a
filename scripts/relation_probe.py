"""Why the default model answers relation questions at chance: linear probes on its own hidden states.

    python3 scripts/relation_probe.py [--checkpoint models/default_model] [--train 1500] [--test 600]
        [--json docs/default-model-results/m20/relation-probe.json]

A relation question ("Is the red star left of the blue circle?") is answered yes/no from two facts: the pair's
order along the asked axis (`order`: a left of b, or a above b) and the asked direction word. m20 answers it
at chance (docs/default-model.md). For each LLM layer this fits two ridge-regression probes (closed form, on
standardised features, ±1 targets) on the hidden state of the last prompt token (the one whose logits give the
answer) of train-split questions and scores them on test-split questions:

  order   whether a is left of / above b: the geometry alone. High: the LLM has located and compared both
          objects, and only fails to combine it with the word. At chance: it never computed the comparison.
  answer  the yes/no answer itself (order XOR the word is right/below).
  axis    whether the question asks left/right or above/below: read from the prompt's own words, a control that
          the probe can decode what the state does hold.
  places  R^2 of ridge regressions for x_a, y_a, x_b, y_b, the view coordinates of the first- and second-named
          object (the locate loss's targets, export/train/locate.py): whether the state holds where the objects
          are, before any comparison.

The model runs as it ships (PIP-MM at half budget, prompt-topk, patch positions; export/train/evaluate.py's
batched torch path), on the CPU; the model's own answers are scored too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# direction word of a TRAIN relation template -> whether "yes" means a before b (left of, above)
DIRECTIONS = [(re.compile(r"\b(left)\b"), True), (re.compile(r"\b(right)\b"), False),
              (re.compile(r"\b(above|over|higher)\b"), True), (re.compile(r"\b(below|under|beneath|lower)\b"), False)]


PLACES = ("x_a", "y_a", "x_b", "y_b")  # the named objects' view coordinates, as the locate loss regresses them


def first_when_yes(prompt: str) -> bool:
    hits = [yes_means_first for pattern, yes_means_first in DIRECTIONS if pattern.search(prompt.lower())]
    if len(hits) != 1:
        raise ValueError(f"no single direction word in {prompt!r}")
    return hits[0]


def load(checkpoint: Path):
    """-> (pipeline for its prompter and preprocessing, the LLaVA, its PIP-MM vision at half, prompt-topk), as shipped."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from export.model.prompt import PromptMLP
    from export.train.evaluate import torch_pipeline
    from export.train.model import make_vision

    pipeline = torch_pipeline(checkpoint, checkpoint, "half", "prompt-topk", "cpu", "patch")
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True,
                                                          attn_implementation="sdpa").eval()
    return pipeline, model, make_vision(model, "half", "prompt-topk", PromptMLP.load(checkpoint).eval())


def features(loaded, examples, batch_size: int = 32):
    """-> hidden [layers + 1, N, D] at each question's last prompt token, the model's greedy first answer token."""
    import torch

    from export.train.data import encode_example, text_tensors
    from export.train.locate import last_prompt_positions
    from export.train.model import embed_sequence, patch_position_ids, visual_tokens
    from sdk.preprocess import preprocess

    pipeline, model, vision = loaded
    prompter, pad = pipeline.prompter, pipeline.manifest.special_tokens.pad
    hidden, answers = [], []
    with torch.no_grad():
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = {"pixel_values": torch.from_numpy(np.concatenate([preprocess(e.image, pipeline.preprocessing)
                                                                      for e in chunk])),
                     **text_tensors([encode_example(prompter, e.prompt, e.answer) for e in chunk], pad),
                     "scene_index": torch.arange(len(chunk))}
            ids, labels = batch["input_ids"], batch["labels"]
            last = last_prompt_positions(labels)  # the prompt ends just before the first answer token
            tokens, attention = visual_tokens(model, vision, batch)
            width = int(last.max()) + 1
            positions = patch_position_ids(ids[:, :width], model.config.image_token_index, attention, tokens.shape[1])
            out = model.model.language_model(inputs_embeds=embed_sequence(model, ids[:, :width], tokens),
                                              position_ids=positions, output_hidden_states=True)
            rows = torch.arange(len(chunk))
            hidden.append(torch.stack([h[rows, last] for h in out.hidden_states]).numpy())
            first_tokens = model.lm_head(out.last_hidden_state[rows, last]).argmax(-1)
            answers += [prompter.decode([int(t)]) for t in first_tokens]  # yes / no are one token each
            print(f"{first + len(chunk)}/{len(examples)} questions", end="\r", file=sys.stderr, flush=True)
    return np.concatenate(hidden, 1), answers


def ridge_predict(train_x, train_y, test_x, penalty: float = 10.0) -> np.ndarray:
    """Closed-form ridge on standardised features (with a bias column) fit to train_y -> predictions for test_x."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    return b @ np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ train_y)


def ridge_accuracy(train_x, train_y, test_x, test_y, penalty: float = 10.0) -> float:
    """Ridge on ±1 targets; accuracy of the sign on the test rows."""
    return float(((ridge_predict(train_x, 2.0 * train_y - 1, test_x, penalty) > 0) == test_y).mean())


def ridge_r2(train_x, train_y, test_x, test_y, penalty: float = 10.0) -> float:
    """Ridge for a real target; R^2 on the test rows (0: no better than the train mean, 1: exact)."""
    predicted = ridge_predict(train_x, train_y, test_x, penalty)
    return float(1 - ((predicted - test_y) ** 2).sum() / ((test_y - train_y.mean()) ** 2).sum())


def places(split: str, examples, size: int = 224) -> np.ndarray:
    """[N,4] view coordinates (x_a, y_a, x_b, y_b in [-1, 1]) of the two objects each relation question names, in
    the order it names them (export/train/data.py locate_targets, the locate loss's targets). size: the scene
    size the examples were drawn at (evaluate.questions'; a canvas of another aspect is wider than it)."""
    from export.tasks.scenes import Question, make_scene, split_style
    from export.train.data import locate_targets

    out = []
    for e in examples:
        scene = make_scene(e.scene_seed, size, split_style(split, e.scene_seed))
        targets, present = locate_targets(scene, Question(e.family, e.prompt, e.answer))
        if not present.all():
            raise ValueError(f"no single drawn object for each name of {e.prompt!r}")
        out.append(targets)
    return np.stack(out)


def main(argv=None) -> int:
    from export.tasks.answers import normalize
    from export.train import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default_model")
    parser.add_argument("--train", type=int, default=1500, help="train-split relation questions the probes fit")
    parser.add_argument("--test", type=int, default=600, help="test-split relation questions they are scored on")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    loaded, sets = load(args.checkpoint), {}
    for split, n in (("train", args.train), ("test", args.test)):
        examples = evaluate.questions(split, n, families=["relation"], instruction_fraction=0.0)
        hidden, said = features(loaded, examples)
        yes = np.array([normalize(e.answer) == "yes" for e in examples])
        order = np.array([y == first_when_yes(e.prompt) for e, y in zip(examples, yes)])
        axis = np.array([bool(re.search(r"\b(left|right)\b", e.prompt.lower())) for e in examples])
        sets[split] = {"hidden": hidden, "yes": yes, "order": order, "axis": axis, "places": places(split, examples),
                       "model": float(np.mean([normalize(s) == normalize(e.answer) for s, e in zip(said, examples)])),
                       "says_yes": float(np.mean([normalize(s) == "yes" for s in said]))}
    train, test = sets["train"], sets["test"]
    layers = [{"layer": layer,
               "order": ridge_accuracy(train["hidden"][layer], train["order"], test["hidden"][layer], test["order"]),
               "answer": ridge_accuracy(train["hidden"][layer], train["yes"], test["hidden"][layer], test["yes"]),
               "axis": ridge_accuracy(train["hidden"][layer], train["axis"], test["hidden"][layer], test["axis"]),
               **{f"r2_{name}": ridge_r2(train["hidden"][layer], train["places"][:, k], test["hidden"][layer],
                                          test["places"][:, k]) for k, name in enumerate(PLACES)}}
              for layer in range(train["hidden"].shape[0])]
    result = {"checkpoint": str(args.checkpoint), "train_questions": args.train, "test_questions": args.test,
              "model_accuracy_test": test["model"], "model_says_yes_test": test["says_yes"],
              "yes_fraction_test": float(test["yes"].mean()), "layers": layers}
    print(f"\nmodel: {100 * test['model']:.1f}% right on {args.test} test relation questions, says yes "
          f"{100 * test['says_yes']:.1f}% (truth: {100 * test['yes'].mean():.1f}%)")
    print("| layer (0 = embeddings) | probe: order | probe: answer | probe: axis (control) | R^2: x_a, y_a, x_b, y_b |"
          "\n|---|---|---|---|---|")
    for row in layers:
        r2 = ", ".join(f"{row['r2_' + name]:.2f}" for name in PLACES)
        probes = " | ".join(f"{100 * row[k]:.1f}" for k in ("order", "answer", "axis"))
        print(f"| {row['layer']} | {probes} | {r2} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
