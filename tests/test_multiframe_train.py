"""pipmm train --stage mv on CPU: tiny sizes, a few steps; what is trained is what the SDK runs; resume; learning."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from export.model.mivpg import FrameAdapter  # noqa: E402
from export.tasks import scenes  # noqa: E402
from export.train.multiframe import MultiViewBatches, forward_loss, frame_tokens  # noqa: E402
from sdk.cli import main  # noqa: E402

FAST = ["--tiny", "--batch-size", "8", "--workers", "0", "--val-scenes", "2", "--quiet", "--log-every", "1"]
SMALL = ["--adapter-set", "d_model=32", "--adapter-set", "queries=8", "--adapter-set", "frame_queries=4",
         "--adapter-set", "csa_points=4", "--n-max", "4", "--frames", "2", "3"]


def train(*args) -> None:
    assert main(["train", *map(str, args), *FAST]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mv")
    train("--stage", 0, "--out", root / "s0", "--steps", 3, "--tokenizer-scenes", 60)
    train("--stage", 1, "--init", root / "s0", "--out", root / "s1", "--steps", 1)
    # as the default model: half budget, patch positions (64 patches a frame at the tiny sizes)
    train("--stage", 2, "--init", root / "s1", "--out", root / "s2", "--steps", 1, "--patch-positions")
    train("--stage", "mv", "--init", root / "s2", "--out", root / "mivpg", "--adapter", "mivpg", "--steps", 3, *SMALL)
    train("--stage", "mv", "--init", root / "s2", "--out", root / "concat", "--adapter", "concat", "--train-llm",
          "--steps", 2, "--frames", "2", "2", "--n-max", "4")
    return root


def test_the_stage_records_every_choice_and_freezes_the_rest(runs):
    config = json.loads((runs / "mivpg/train_config.json").read_text())
    assert config["stage"] == "mv" and config["adapter"] == "mivpg" and config["completed_steps"] == 3
    assert config["adapter_config"]["csa"] == "induced" and config["adapter_config"]["queries"] == 8
    assert config["frozen"] == ["vision_tower", "multi_modal_projector", "prompt_mlp", "language_model", "lm_head"]
    # the init's own setting (half, patch): R = 8 adapter tokens and the question fit the context
    assert config["frames"] == [2, 3] and config["budget"] == "half" and config["visual_tokens_per_frame"] == 32
    assert config["positions"] == "patch" and config["visual_setting"]["source"] == "init"
    assert set(config["val"]["per_family"]) <= {"which_frame", "count_all", "every_frame", "compare"}
    for val in (config["val_start"], config["val"]):  # step 0 and the end: multi-view and single-frame families
        assert val["n"] > 0 and val["single"]["n"] > 0 and set(val["single"]["per_family"]) <= set(scenes.FAMILIES)
    assert config["trainable_parameters"] == config["adapter_parameters"] > 0 and config["parent"]["stage"] == 2
    log = [json.loads(line) for line in (runs / "mivpg/log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log) and {r["frames"] for r in log} <= {1, 2, 3}
    assert all(set(r["grad_norms"]) == {"adapter"} and r["grad_norms"]["adapter"] > 0 and r["spread"] > 0.05
               for r in log)  # the adapter gets a gradient; its pooled tokens differ between questions
    # the adapter's output was calibrated to the frozen vision tokens before step 1 (recorded)
    calibration = config["adapter_calibration"]
    assert calibration["tokens"] > 0 and 0 < calibration["std_mean"] and calibration["token_norm"] > 0
    from export.model.mivpg import FrameAdapter as Loaded

    trained = Loaded.load(runs / "mivpg")
    # the recipe (multiframe.DEFAULTS): patch positions of the tiny 8 x 8 grid and the frame_regions shortcut, which gives
    # the tokens' mean itself: the stream's output is scaled to their std and starts at zero
    assert (trained.config.positions, trained.config.shortcut, trained.config.num_patches) == ("patch", "frame_regions", 64)
    assert config["adapter_config"]["shortcut"] == "frame_regions" and trained.config.output == "calibrated"
    assert abs(float(trained.out_scale.mean()) - calibration["std_mean"]) < 0.05 * calibration["std_mean"]
    from safetensors.torch import load_file

    before, after = (load_file(str(runs / d / "model.safetensors")) for d in ("s2", "mivpg"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # adapter only: the model is the init's
    concat = json.loads((runs / "concat/train_config.json").read_text())
    assert concat["adapter_config"] is None and concat["train_llm"] and concat["llm_lr_scale"] == 1.0
    # 4 frames x 64 patch positions + 3 separators + 32 of text fit the tiny context of 512: the init's setting
    assert (concat["budget"], concat["positions"], concat["visual_setting"]["needed_positions"]) == ("half", "patch", 291)
    changed = {k for k, v in load_file(str(runs / "concat/model.safetensors")).items() if not torch.equal(v, before[k])}
    assert changed and all("language_model" in k or "lm_head" in k for k in changed)
    assert main(["train", "--stage", "mv", "--init", str(runs / "s1"), "--out", str(runs / "x"), "--adapter",
                 "concat", *FAST]) == 1  # concat without --train-llm has nothing to train: a one-line error


def test_what_is_trained_is_what_the_sdk_runs(runs, tmp_path):
    """Training's sequences and pooled tokens equal the exported bundle's: same ids, same adapter output."""
    bundle = tmp_path / "bundle"
    assert main(["export", str(runs / "mivpg"), "--prompt-mlp", str(runs / "mivpg"), "--visual-tokens", "half",
                 "--reducer", "prompt-topk", "--visual-positions", "patch", "--out", str(bundle), "--quiet"]) == 0
    assert main(["add-graphs", str(bundle), "--adapter", str(runs / "mivpg"), "--n-max", "4"]) == 0
    pipeline = sdk.load(bundle, device="cpu")
    from transformers import LlavaForConditionalGeneration

    from export.model.prompt import PromptMLP
    from export.train.model import make_vision
    from export.train.data import SequenceSpec
    from sdk.preprocess import preprocess

    model = LlavaForConditionalGeneration.from_pretrained(runs / "mivpg").eval()
    adapter = FrameAdapter.load(runs / "mivpg")
    vision = make_vision(model, "half", "prompt-topk", PromptMLP.load(runs / "mivpg").eval()).eval()
    spec = SequenceSpec(str(runs / "mivpg/tokenizer.json"), pipeline.manifest.special_tokens.to_dict(), 32, 512)
    data = MultiViewBatches(spec, pipeline.preprocessing, 1, 112, (3, 3), "mivpg", 8, split="val")
    batch = data.batch(0)
    from export.tasks import multiview

    example = multiview.sample("val", 0, 3, 112)[0]
    ids, slots = pipeline.frames.prompt_ids(pipeline.prompter, example.prompt, 3)
    assert batch["input_ids"][0, :len(ids)].tolist() == ids.tolist()
    with torch.no_grad():
        trained = frame_tokens(model, vision, adapter, batch)[0].numpy()
    pixels = np.concatenate([preprocess(f, pipeline.preprocessing) for f in example.frames])
    vector = np.repeat(pipeline.encode_prompt(example.prompt), 3, axis=0)
    seen = pipeline.backend.vision(pixels, vector)  # the adapter reads each token's patch: kept_patches
    served = pipeline.frames.combine(pipeline.backend, seen.visual_tokens, seen.kept_patches)[0]
    np.testing.assert_allclose(served, trained, atol=2e-3, rtol=0)  # bf16 checkpoint weights, fp32 both sides


def test_concat_at_patch_positions_is_what_the_sdk_runs(runs, tmp_path):
    """Concat trained at patch positions (each frame its own block of N positions): training's prefill positions
    are the bundle's (Pipeline.prefill_positions), and so are its next-token logits after the prompt."""
    bundle = tmp_path / "bundle"
    assert main(["export", str(runs / "concat"), "--prompt-mlp", str(runs / "concat"), "--visual-tokens", "half",
                 "--reducer", "prompt-topk", "--visual-positions", "patch", "--out", str(bundle), "--quiet"]) == 0
    assert main(["add-graphs", str(bundle), "--multi-image", "concat", "--n-max", "4"]) == 0
    pipeline = sdk.load(bundle, device="cpu")
    from transformers import LlavaForConditionalGeneration

    from export.model.prompt import PromptMLP
    from export.tasks import multiview
    from export.train.data import SequenceSpec
    from export.train.model import embed_sequence, make_vision
    from export.train.multiframe import combine, encode_frames, position_ids

    model = LlavaForConditionalGeneration.from_pretrained(runs / "concat").eval()
    vision = make_vision(model, "half", "prompt-topk", PromptMLP.load(runs / "concat").eval()).eval()
    spec = SequenceSpec(str(runs / "concat/tokenizer.json"), pipeline.manifest.special_tokens.to_dict(), 32, 512)
    batch = MultiViewBatches(spec, pipeline.preprocessing, 1, 112, (2, 2), "concat", 32, split="val").batch(0)
    example = multiview.sample("val", 0, 2, 112)[0]  # the batch's first question
    ids, slots = pipeline.frames.prompt_ids(pipeline.prompter, example.prompt, 2)
    assert batch["input_ids"][0, :len(ids)].tolist() == ids.tolist()
    batch = {**batch, "input_ids": batch["input_ids"][:1, :len(ids)], "sample_index": batch["sample_index"][:1],
             "encoder_ids": batch["encoder_ids"][:1], "encoder_lengths": batch["encoder_lengths"][:1]}
    with torch.no_grad():
        tokens, kept = encode_frames(model, vision, batch)  # kept [1,2,32]
        trained = position_ids(model, vision, None, batch, kept, "patch")
        embeds = embed_sequence(model, batch["input_ids"], combine(None, tokens))
        logits = {}
        for name, p in (("patch", trained), ("sequence", None)):
            kwargs = {} if p is None else {"position_ids": p, "attention_mask": torch.ones_like(batch["input_ids"])}
            hidden = model.model.language_model(inputs_embeds=embeds, **kwargs).last_hidden_state
            logits[name] = model.lm_head(hidden[0, -1]).numpy()
    pixels = np.concatenate([pipeline.pixel_values(f) for f in example.frames])
    served = pipeline.backend.vision(pixels, np.repeat(pipeline.encode_prompt(example.prompt), 2, axis=0))
    assert np.array_equal(served.kept_patches, kept[0].numpy())
    positions = pipeline.prefill_positions(len(ids), slots, served)
    assert positions[0].tolist() == trained[0].tolist() and positions[0, -1] == len(ids) - 1 + 2 * (64 - 32)
    sdk_embeds = pipeline.backend.embed(ids[None]).copy()
    sdk_embeds[0, slots] = served.visual_tokens.reshape(-1, sdk_embeds.shape[-1])
    sdk_logits = pipeline.prefill(sdk_embeds, positions)[0][0]
    np.testing.assert_allclose(sdk_logits, logits["patch"], atol=1e-5, rtol=0)  # measured: 1.5e-7 (fp32 both)
    # the tiny model barely reads positions (4e-4 between the two layouts), still far above the tolerance
    assert np.abs(sdk_logits - logits["sequence"]).max() > 1e-4


def test_resume_continues_exactly(runs, tmp_path):
    args = ["--stage", "mv", "--init", runs / "s1", "--adapter", "qformer", "--steps", 4, "--save-every", 100, *SMALL]
    train(*args, "--out", tmp_path / "a")
    train(*args, "--out", tmp_path / "b", "--stop-after", 2)
    train(*args, "--out", tmp_path / "b", "--resume")
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / x / "adapter.safetensors")) for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_adapter_loss_goes_down_on_a_fixed_batch(runs):
    from transformers import LlavaForConditionalGeneration

    from export.model.mivpg import AdapterConfig
    from export.model.prompt import PromptMLP
    from export.train.model import make_vision

    model = LlavaForConditionalGeneration.from_pretrained(runs / "s1").eval()
    vision = make_vision(model, "quarter", "prompt-topk", PromptMLP.load(runs / "s1").eval()).eval()
    torch.manual_seed(0)
    adapter = FrameAdapter(AdapterConfig(mode="mivpg", d_in=64, d_model=32, queries=8, frame_queries=4, csa_points=4))
    from export.train.data import SequenceSpec
    from export.train.model import special_tokens
    from sdk.preprocess import clip_processor_config, config_from_processor
    from tokenizers import Tokenizer

    spec = SequenceSpec(str(runs / "s1/tokenizer.json"), special_tokens(Tokenizer.from_file(str(runs / "s1/tokenizer.json"))),
                        16, 512)
    data = MultiViewBatches(spec, config_from_processor(clip_processor_config(112)), 2, 112, (2, 2), "mivpg", 8)
    batch = data.batch(0)
    llm = [p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n]
    for p in llm:  # as --train-llm: the tiny LLM has seen 3 steps of data, too few to read a soft prompt
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*adapter.parameters(), *llm], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = forward_loss(model, vision, adapter, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
