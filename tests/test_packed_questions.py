"""Stage 0 with packed questions (`pipmm train --pack-questions`, data.pack_scene): a scene's image once and its
questions after it, each attending to the image and itself. Shown against the unpacked batch of the same scenes:
the same loss and the same gradients, for several times fewer language-model tokens."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from export.train.data import IGNORE, SceneBatches, SequenceSpec, build_tokenizer  # noqa: E402
from export.train.model import (ModelSizes, aux_head_outputs, build_llava, forward_loss, make_vision,  # noqa: E402
                                special_tokens)
from sdk.cli import main  # noqa: E402
from sdk.preprocess import clip_processor_config, config_from_processor  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    sizes = ModelSizes.tiny()
    tokenizer = build_tokenizer(60, sizes.vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    model = build_llava(sizes, tokenizer).eval()  # eval: no dropout, so both forwards are deterministic
    vision = make_vision(model)
    grid = sizes.image_size // sizes.patch_size
    head = torch.nn.Linear(sizes.text_hidden, aux_head_outputs(grid))
    spec = SequenceSpec(str(folder / "tokenizer.json"), special_tokens(tokenizer), vision.config.num_tokens, 512)
    # instructions and rewordings on: their prompts differ in length and ending, the prefix must not
    batches = {pack: SceneBatches(spec, config_from_processor(clip_processor_config(sizes.image_size)), 4,
                                  sizes.image_size, grid, instruction_fraction=0.5, paraphrase_fraction=0.5,
                                  pack=pack).batch(3) for pack in (False, True)}
    return model, vision, head, batches


def _loss_and_grads(model, vision, head, batch):
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    out = forward_loss(model, vision, batch, aux_head=head, aux_weight=1.0)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()] if p.grad is not None}
    return out, grads


def test_packed_loss_and_gradients_equal_the_unpacked(setup):
    model, vision, head, batches = setup
    plain, plain_grads = _loss_and_grads(model, vision, head, batches[False])
    packed, packed_grads = _loss_and_grads(model, vision, head, batches[True])
    assert packed["answer_tokens"] == plain["answer_tokens"] > 0
    torch.testing.assert_close(packed["lm_loss"], plain["lm_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed["aux_loss"], plain["aux_loss"], rtol=1e-6, atol=0.0)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():  # float32: summation order differs, nothing else
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_each_question_sees_the_image_and_not_its_neighbours(setup):
    """The mask is what makes the two equal; shown directly: changing one question's tokens changes no other
    question's loss, and changing the image changes them all."""
    model, vision, _, batches = setup
    batch = batches[True]
    segments, targets = batch["packed_segments"][0], batch["packed_targets"][0]

    def per_segment(b):
        from export.train.model import embed_sequence, packed_attention_mask

        with torch.no_grad():
            tokens = vision(b["pixel_values"], None)[0]
            hidden = model.model.language_model(inputs_embeds=embed_sequence(model, b["packed_ids"], tokens),
                                                position_ids=b["packed_positions"],
                                                attention_mask=packed_attention_mask(b["packed_segments"]))[0][0]
            losses = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets.clamp_min(0), reduction="none")
        return {int(s): float(losses[(segments == s) & (targets != IGNORE)].sum()) for s in segments.unique() if s > 0}

    base = per_segment(batch)
    ids = batch["packed_ids"].clone()
    first = int((segments == 1).nonzero()[0])
    ids[0, first] = (ids[0, first] + 1) % 300  # the first question's first token
    changed = per_segment({**batch, "packed_ids": ids})
    assert changed[1] != base[1] and all(changed[s] == pytest.approx(base[s], rel=1e-6) for s in base if s > 1)
    other_image = per_segment({**batch, "pixel_values": batch["pixel_values"].flip(-1)})
    assert all(other_image[s] != base[s] for s in base)


def test_packing_cuts_the_language_model_tokens(setup):
    _, _, _, batches = setup
    plain, packed = batches[False], batches[True]
    assert packed["packed_ids"].shape[0] == plain["pixel_values"].shape[0]  # one row a scene
    positions = packed["packed_positions"]
    n = packed["packed_segments"].shape[1]
    assert int(positions.max()) < plain["input_ids"].shape[1] <= n  # positions restart after the image
    # the tiny model has 64 image tokens; m20's 256 make the cut larger (docs/default-model.md)
    assert packed["packed_ids"].numel() < 0.5 * plain["input_ids"].numel()


def test_the_trainer_records_packing_and_refuses_what_it_cannot_pack(tmp_path, capsys):
    fast = ["--tiny", "--batch-size", "16", "--workers", "0", "--val-scenes", "2", "--quiet", "--tokenizer-scenes", "40"]
    out = tmp_path / "s0"
    assert main(["train", "--stage", "0", "--out", str(out), "--steps", "3", "--stop-after", "2", "--pack-questions",
                 *fast]) == 0
    assert json.loads((out / "train_config.json").read_text())["pack_questions"] is True
    assert main(["train", "--stage", "0", "--out", str(out), "--resume", *fast]) == 0  # keeps the run's packing
    config = json.loads((out / "train_config.json").read_text())
    assert config["pack_questions"] is True and config["completed_steps"] == 3
    questions = [json.loads(line)["questions"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert min(questions) > 2  # questions, not the 2 packed rows of a step's 2 scenes
    for flags in (["--reduced-fraction", "0.5"], ["--template", "prompt-first"]):
        assert main(["train", "--stage", "0", "--out", str(tmp_path / "no"), "--steps", "2", "--pack-questions",
                     *flags, *fast]) == 1
        assert "--pack-questions" in capsys.readouterr().err
