"""The locate loss: the language model says where the objects a question names are, before it answers.

Why (scripts/relation_probe.py on m20 and m21): a relation question ("Is the red star left of the blue circle?")
is answered at chance, and a linear probe on the hidden state of the answer position reads the pair's order
along the asked axis at 50-53% on every layer. The model never brings both objects' places to the token that
answers, so there is nothing to compare. Position questions about one named object are answered at 76%: the
model can fetch one object's place. The language-model loss alone gives a single yes/no bit a question for a
three-step computation (fetch a, fetch b, compare); this loss supervises the middle step directly.

At one LLM layer (`layer`, default two below the top, so two layers are left to compare and answer), a small
head (a norm without its own scale, then a linear map) reads the hidden state of the last prompt token (the one
whose logits give the first answer token) and regresses the view coordinates of the first and second object
the prompt names, in the order the prompt names them (a paraphrase may swap them; the target follows the words
the model reads):

    head(h[L][q, last prompt token]) -> [x_a, y_a, x_b, y_b]      each in [-1, 1] (view centre 0, edges +-1)

Targets (data.locate_targets) exist only where a name matches exactly one drawn object: colour, shape, position
and label questions name one object (x_b, y_b masked), relation questions two; captions, counts, existence and
refer questions have none. The loss is the mean squared error over the targets that exist; like stage 0's
auxiliary head, the head is training-only (kept in the trainer state for a resume, never in the model files).
"""

from __future__ import annotations

import torch

from sdk.errors import PipmmError

from export.train.data import IGNORE, LOCATE_OUTPUTS


class LocateArgumentError(PipmmError, ValueError):
    """--locate-weight / --locate-layer with a stage or setting the locate loss cannot train."""


def default_layer(text_layers: int) -> int:
    """Index into the LLM's hidden states (0 = embeddings, i = after layer i): two layers below the top."""
    return max(1, text_layers - 2)


def locate_setting(args, hidden: int, text_layers: int) -> tuple | None:
    """`pipmm train`'s flags -> (a new head, hidden-state index, weight), None at weight 0. The caller adds the
    head's parameters to the trained ones (so a resume restores it from the trainer state)."""
    if not args.locate_weight:
        return None
    if args.pack_questions or args.stage == 1 or (args.stage == 2 and not args.train_llm):
        raise LocateArgumentError("--locate-weight trains the language model a row a question: stage 0 without "
                                  "--pack-questions, or stage 2 with --train-llm")
    layer = default_layer(text_layers) if args.locate_layer is None else args.locate_layer
    if not 1 <= layer <= text_layers:
        raise LocateArgumentError(f"--locate-layer {layer}: use 1-{text_layers} (the output of that LLM layer)")
    args.locate_layer = layer  # recorded in train_config.json
    # The residual stream below the top is not normed (m21's layer 4: rms ~14 at the last prompt token, the
    # targets' ~0.5): a norm without its own scale, then a zero linear map, so the head starts at 0 (a loss of ~0.2,
    # the targets' mean square) instead of ~40 for a random linear map, whose gradient would swamp the language
    # model's in the first steps.
    head = torch.nn.Sequential(torch.nn.LayerNorm(hidden, elementwise_affine=False),
                               torch.nn.Linear(hidden, LOCATE_OUTPUTS))  # -> x_a, y_a, x_b, y_b
    torch.nn.init.zeros_(head[1].weight)
    torch.nn.init.zeros_(head[1].bias)
    return head, layer, args.locate_weight


def last_prompt_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels [Q,T] (IGNORE outside the answer) -> [Q] index of each row's last prompt token."""
    answer = labels != IGNORE
    return answer.float().argmax(1) - 1  # the first answer token is predicted from the position before it


def locate_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                present: torch.Tensor) -> torch.Tensor:
    """hidden [Q,T,D] (one layer's states), labels [Q,T], targets / present [Q,4] -> the masked MSE (a scalar;
    0 when no question of the batch names an object)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    predicted = head(hidden[rows, last_prompt_positions(labels)]).float()  # [Q,4]
    if not present.any():
        return predicted.sum() * 0.0
    return ((predicted - targets) ** 2)[present].mean()
