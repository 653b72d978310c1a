"""Training smoke run on CPU: tiny sizes, a few steps per stage, files, config, resume, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.model.prompt import PromptMLP, PromptMLPConfig  # noqa: E402
from export.tasks import scenes  # noqa: E402
from export.train.data import (IGNORE, SceneBatches, SequenceSpec, build_tokenizer, encode_example,  # noqa: E402
                               named_phrases, relevant_patches)
from export.train.model import ModelSizes, build_llava, forward_loss, make_vision, special_tokens  # noqa: E402
from export.train.state import MAX_FILE_BYTES  # noqa: E402
from sdk.preprocess import clip_processor_config  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.preprocess import config_from_processor  # noqa: E402

FAST = ["--tiny", "--batch-size", "16", "--workers", "0", "--val-scenes", "2", "--quiet", "--log-every", "1"]


def train(*args) -> None:
    assert main(["train", *map(str, args), *FAST]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    train("--stage", 0, "--out", root / "s0", "--steps", 6, "--tokenizer-scenes", 100)
    train("--stage", 1, "--init", root / "s0", "--out", root / "s1", "--steps", 3, "--grounding-weight", 0.5,
          "--prompt-layer", 0, "--pooling", "mean")
    train("--stage", 2, "--init", root / "s1", "--out", root / "s2", "--steps", 3, "--instruction-fraction", 0.5)
    train("--stage", 2, "--init", root / "s1", "--out", root / "m2", "--steps", 2, "--reducer", "merge",
          "--budget", "quarter")
    train("--stage", 2, "--init", root / "s0", "--out", root / "p2", "--steps", 3, "--no-prompt-mlp",
          "--reducer", "pool")
    return root


def test_stages_write_hf_checkpoints_and_record_every_choice(runs):
    for name in ("s0", "s1", "s2", "p2"):
        d = runs / name
        for f in ("config.json", "tokenizer.json", "preprocessor_config.json", "train_config.json", "log.jsonl",
                  "trainer_state.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        assert list(d.glob("model*.safetensors"))
        assert all(f.stat().st_size <= MAX_FILE_BYTES for f in d.iterdir())
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        assert log and all(np.isfinite(r["loss"]) for r in log)
    s0 = json.loads((runs / "s0/train_config.json").read_text())
    assert s0["completed_steps"] == 6 and s0["parameters"]["total"] > 0 and "val" in s0
    for key in ("model_sizes", "lr", "batch_size", "seed", "warmup", "optimizer", "data_offset", "budget", "reducer"):
        assert key in s0, key
    s1 = json.loads((runs / "s1/train_config.json").read_text())
    assert s1["prompt_mlp"]["prompt_layer"] == 0 and s1["prompt_mlp"]["pooling"] == "mean"
    assert s1["trainable"] == ["prompt_mlp"] and s1["grounding_weight"] == 0.5 and s1["parent"]["stage"] == 0
    s2 = json.loads((runs / "s2/train_config.json").read_text())
    assert s2["budget"] == "half" and s2["reducer"] == "prompt-topk" and s2["visual_tokens"] == 32  # 8x8 / 2
    assert s2["trainable"] == ["multi_modal_projector", "prompt_mlp"] and s2["parent"]["parent"]["stage"] == 0
    assert s2["data"]["instruction_fraction"] == 0.5 and "capitals" in s2["data"]["instructions"]
    assert s1["data"]["instruction_fraction"] == 0.0 and s1["data"]["instructions"] is None
    m2 = json.loads((runs / "m2/train_config.json").read_text())
    assert m2["reducer"] == "merge" and m2["visual_tokens"] == 16
    assert (runs / "s2/prompt_mlp.json").is_file() and json.loads((runs / "s2/prompt_mlp.json").read_text())[
        "prompt_layer"] == 0
    p2 = json.loads((runs / "p2/train_config.json").read_text())
    assert not p2["pipmm"] and p2["trainable"] == ["multi_modal_projector"] and p2["reducer"] == "pool"
    assert not (runs / "p2/prompt_mlp.json").exists()
    config = json.loads((runs / "s0/config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["num_key_value_heads"] < config["text_config"]["num_attention_heads"]  # GQA


def test_frozen_stages_leave_the_base_model_alone(runs):
    from safetensors.torch import load_file

    s0 = load_file(str(next((runs / "s0").glob("model*.safetensors"))))
    s1 = load_file(str(next((runs / "s1").glob("model*.safetensors"))))
    s2 = load_file(str(next((runs / "s2").glob("model*.safetensors"))))
    assert s0.keys() == s1.keys() == s2.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    changed = {k for k in s0 if not torch.equal(s0[k], s2[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_resume_continues_exactly(tmp_path, runs):
    args = ["--stage", 1, "--init", runs / "s0", "--steps", 4, "--save-every", 100]
    train(*args, "--out", tmp_path / "a")
    train(*args, "--out", tmp_path / "b", "--stop-after", 2)
    assert json.loads((tmp_path / "b/trainer_state.json").read_text())["step"] == 2
    train(*args, "--out", tmp_path / "b", "--resume")
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / x / "prompt_mlp.safetensors")) for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "b/train_config.json").read_text())["completed_steps"] == 4
    # An existing checkpoint without --resume is refused with a one-line error (exit code 1).
    assert main(["train", "--stage", "1", "--init", str(runs / "s0"), "--out", str(tmp_path / "a"), *FAST]) == 1


def tiny_model_and_batch(folder, scenes_per_batch: int, budget="full", reducer="pool", prompt_mlp: bool = False):
    """A seeded tiny model (tokenizer written to folder), its vision part and the first batch of scenes."""
    sizes = ModelSizes.tiny()
    tokenizer = build_tokenizer(60, sizes.vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    model = build_llava(sizes, tokenizer)
    mlp = PromptMLP(PromptMLPConfig(d_llm=sizes.text_hidden, d_vit=sizes.vision_hidden)) if prompt_mlp else None
    vision = make_vision(model, budget, reducer, mlp)
    spec = SequenceSpec(str(folder / "tokenizer.json"), special_tokens(tokenizer), vision.config.num_tokens, 512)
    batch = SceneBatches(spec, config_from_processor(clip_processor_config(sizes.image_size)), scenes_per_batch,
                         sizes.image_size, sizes.image_size // sizes.patch_size).batch(0)
    return model, vision, batch


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    model, vision, batch = tiny_model_and_batch(tmp_path, 2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = forward_loss(model, vision, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_sequences_are_the_sdk_prompt_plus_answer(tmp_path):
    tokenizer = build_tokenizer(40, 320)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    spec = SequenceSpec(str(tmp_path / "tokenizer.json"), special_tokens(tokenizer), 5, 512)
    prompter = spec.prompter()
    ids, labels, enc = encode_example(prompter, "What color is the star?", "red")
    prompt_ids, slots = prompter.prompt_ids("What color is the star?")
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids.tolist() and all(x == IGNORE for x in labels[:n])
    assert labels[n:] == ids[n:] and ids[-1] == spec.special["eos"][0]
    assert prompter.decode(ids[n:]).strip() == "red"
    assert enc == prompter.encoder_ids("What color is the star?").tolist()
    assert [ids[i] for i in slots] == [spec.special["image"]] * 5


def test_grounding_masks_cover_the_named_objects():
    assert named_phrases("Is the small red star left of the circle?") == [
        {"size": "small", "color": "red", "shape": "star"}, {"shape": "circle"}]
    assert named_phrases("How many red objects are there?") == [{"color": "red"}]
    scene = scenes.make_scene(3)
    rng = np.random.default_rng(0)
    for q in scenes.make_questions(scene, rng):
        mask = relevant_patches(scene, q, 16)
        if q.family in ("describe", "color", "shape", "position", "label"):
            assert mask.any(), q
        if q.family in ("color", "shape", "position"):  # one named object: a few patches
            assert 1 <= mask.sum() <= 16, q


def test_patch_position_loss_attends_across_the_position_jumps(tmp_path):
    """Stage 2 --patch-positions: the loss equals a row-by-row causal forward with the same positions
    (a cache-fed forward, which transformers never treats as packed sequences), so the answer tokens
    see the image although the kept tokens' positions jump."""
    from transformers.cache_utils import DynamicCache

    from export.train.model import embed_sequence, patch_position_ids, visual_tokens

    model, vision, batch = tiny_model_and_batch(tmp_path, 1, "half", "prompt-topk", prompt_mlp=True)
    model.eval()
    with torch.no_grad():
        got = forward_loss(model, vision, batch, patch_positions=True)["lm_loss"]
        tokens, attention = visual_tokens(model, vision, batch)
        embeds = embed_sequence(model, batch["input_ids"], tokens)
        positions = patch_position_ids(batch["input_ids"], model.config.image_token_index, attention, tokens.shape[1])
        assert (positions.diff(dim=1) > 1).any()  # the jumps that must not cut the sequence
        total, count = 0.0, 0
        for row in range(embeds.shape[0]):
            hidden = model.model.language_model(inputs_embeds=embeds[row:row + 1], position_ids=positions[row:row + 1],
                                                past_key_values=DynamicCache(config=model.config.text_config),
                                                use_cache=True).last_hidden_state[0]
            targets = batch["labels"][row, 1:]
            keep = targets != IGNORE
            logits = model.lm_head(hidden[:-1][keep]).float()
            total += float(torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"))
            count += int(keep.sum())
        # and the image reaches the answers: other pixels, another loss (it would not if cut)
        other = forward_loss(model, vision, {**batch, "pixel_values": batch["pixel_values"].flip(-1)},
                             patch_positions=True)["lm_loss"]
    torch.testing.assert_close(got, torch.tensor(total / count), rtol=2e-5, atol=0.0)
    # (a cut sequence gives the same loss to float rounding, ~1e-7; the tiny random model's pixel effect is
    # small, about 2e-4 on the current scenes, so the bound sits between the two)
    assert abs(float(other) - float(got)) > 1e-5
