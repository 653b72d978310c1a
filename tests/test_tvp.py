"""TVP training on CPU (export/tvp): tiny checkpoint, a few steps; the delta moves only in the frame, resuming gives
the uninterrupted delta, the shifted domain is deterministic and keeps the clean questions, errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.tasks import scenes  # noqa: E402
from export.tvp import domain  # noqa: E402
from export.tvp.clip import SceneClip  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.visual_prompt import PROMPT_CONFIG, VisualPrompt  # noqa: E402

FRAME = 4  # of the tiny checkpoints' 28 px


@pytest.fixture(scope="module")
def tvp_inputs(tmp_path_factory):
    """A few shifted scenes with questions, and a tiny TSE guide trained for two steps."""
    root = tmp_path_factory.mktemp("tvp")
    assert main(["tvp", "scenes", "--out", str(root / "data"), "--n", "3", "--size", "64", "--quiet"]) == 0
    assert main(["tvp", "clip-train", "--out", str(root / "clip"), "--tiny", "--image-size", "28", "--steps", "2",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    return root


def train(checkpoint, mlp, inputs, out, *extra) -> int:
    return main(["tvp", "train", "--source", str(checkpoint), "--prompt-mlp", str(mlp), "--data", str(inputs / "data"),
                 "--clip", str(inputs / "clip"), "--out", str(out), "--frame", str(FRAME), "--steps", "4",
                 "--scenes-per-step", "1", "--device", "cpu", "--quiet", "--log-every", "1", "--save-every", "2",
                 *map(str, extra)])


def test_the_delta_moves_only_in_the_frame_and_resuming_gives_the_same_delta(checkpoints, prompt_mlp, tvp_inputs,
                                                                             tmp_path):
    assert train(checkpoints["llama"], prompt_mlp, tvp_inputs, tmp_path / "whole") == 0
    prompt = VisualPrompt.load(tmp_path / "whole")  # the device's reader: geometry, sha256, zero inside
    inside = prompt.delta[:, FRAME:-FRAME, FRAME:-FRAME]
    assert prompt.frame == FRAME and prompt.image_size == 28 and not inside.any()
    assert np.abs(prompt.delta).sum() > 0 and prompt.delta.min() >= 0 and prompt.delta.max() <= 1
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in log for k in ("lm_loss", "fca", "tse", "loss"))
    record = json.loads((tmp_path / "whole" / PROMPT_CONFIG).read_text())
    settings = record["settings"]
    assert record["progress"]["completed_steps"] == 4 and settings["lr"] == 10.0 and settings["clamp"]
    assert settings["losses"]["fca_weight"] == 0.005 and settings["losses"]["tse_weight"] == 0.001
    assert settings["data"]["images"] == 3 and settings["data"]["domain"] == domain.DUSK["name"]
    assert settings["source"]["pipmm"] and settings["tse_guide"]["steps"] == 2

    assert train(checkpoints["llama"], prompt_mlp, tvp_inputs, tmp_path / "split", "--stop-after", 3) == 0
    halfway = json.loads((tmp_path / "split" / PROMPT_CONFIG).read_text())["progress"]["completed_steps"]
    assert halfway == 3
    assert train(checkpoints["llama"], prompt_mlp, tvp_inputs, tmp_path / "split", "--resume") == 0
    np.testing.assert_array_equal(VisualPrompt.load(tmp_path / "split").delta, prompt.delta)


def test_an_overlay_prompt_trains_on_the_full_size_image(checkpoints, prompt_mlp, tvp_inputs, tmp_path):
    assert train(checkpoints["llama"], prompt_mlp, tvp_inputs, tmp_path / "o", "--geometry", "overlay") == 0
    prompt = VisualPrompt.load(tmp_path / "o")
    assert prompt.geometry == "overlay" and prompt.inner_size == prompt.image_size == 28
    assert not prompt.delta[:, FRAME:-FRAME, FRAME:-FRAME].any() and np.abs(prompt.delta).sum() > 0
    assert prompt.delta.min() >= -1 and prompt.delta.max() <= 1
    record = json.loads((tmp_path / "o" / PROMPT_CONFIG).read_text())
    assert record["geometry"] == record["settings"]["geometry"] == "overlay" and record["inner_size"] == 28
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["lm_loss"]) for r in log) and log[0]["fca"] < 1e-3  # step 1 starts from the clean image


def test_ablations_and_errors_are_one_line(checkpoints, prompt_mlp, tvp_inputs, tmp_path, capsys):
    out = tmp_path / "plain-lm"
    assert train(checkpoints["llama"], prompt_mlp, tvp_inputs, out, "--fca-weight", 0, "--tse-weight", 0,
                 "--steps", 1) == 0
    assert "fca" not in json.loads((out / "log.jsonl").read_text().splitlines()[0])

    def refused(*argv) -> str:
        capsys.readouterr()
        assert main(["tvp", "train", "--source", str(checkpoints["llama"]), "--prompt-mlp", str(prompt_mlp),
                     "--data", str(tvp_inputs / "data"), "--device", "cpu", "--quiet", *map(str, argv)]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading bar, if any
        assert err.startswith("error:"), err
        return err

    assert "pass --clip" in refused("--out", tmp_path / "x")
    assert "already holds a prompt" in refused("--out", out, "--tse-weight", 0)
    assert "other settings (lr)" in refused("--out", out, "--tse-weight", 0, "--fca-weight", 0, "--steps", 1,
                                            "--scenes-per-step", 1, "--frame", FRAME, "--resume", "--lr", 5)
    assert "--frame 14" in refused("--out", tmp_path / "y", "--tse-weight", 0, "--frame", 14)
    assert "holds no" in refused("--out", tmp_path / "z", "--tse-weight", 0, "--frame", FRAME, "--data", tmp_path)
    assert "clip-train" in refused("--out", tmp_path / "w", "--frame", FRAME, "--clip", tmp_path)


def test_the_shifted_domain_is_seeded_and_keeps_the_clean_questions():
    seed = domain.split_seed("test", 5)
    assert seed == scenes.split_seed("test", 5)  # the shifted test split is the clean test split's scenes
    a, b = domain.shifted_scene(seed, 64), domain.shifted_scene(seed, 64)
    assert a.image.tobytes() == b.image.tobytes()
    clean = scenes.make_scene(seed, 64)
    assert a.objects == clean.objects and a.image.tobytes() != clean.image.tobytes()
    shifted = domain.questions("test", 16, size=64)
    unshifted = domain.questions("test", 16, size=64, clean=True)
    assert [(e.prompt, e.answer) for e in shifted] == [(e.prompt, e.answer) for e in unshifted]
    assert domain.split_seed("train", 0) == scenes.split_seed("train", 900_000_000)
    with pytest.raises(scenes.SceneArgumentError):
        domain.split_seed("val", 0)


def test_the_written_dataset_is_the_shifted_split(tvp_inputs):
    """pipmm tvp scenes (scenes.write_dataset with the shifted renderer): the domain's images, questions and captions."""
    from PIL import Image

    root = tvp_inputs / "data"
    records = json.loads((root / "train.json").read_text())
    expected = list(domain.iter_examples("train", 3, size=64))
    assert [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in records] == \
        [("<image>\n" + e.prompt, e.answer) for e in expected]
    first = domain.shifted_scene(domain.split_seed("train", 0), 64)
    assert records[0]["image"] == f"images/train_{first.seed:010d}.png" and records[0]["caption"] == first.caption
    assert np.array_equal(np.asarray(Image.open(root / records[0]["image"])), np.asarray(first.image))
    assert json.loads((root / "domain.json").read_text())["style"]["name"] == domain.DUSK["name"]
    with pytest.raises(scenes.SceneArgumentError):
        domain.write_dataset(root / "bad", 1, "val")


def test_the_guide_ranks_captions_and_round_trips(tvp_inputs):
    guide = SceneClip.load(tvp_inputs / "clip")
    pixels = torch.rand(2, 3, 28, 28)
    captions = ["small red star, large blue circle", "large white cross"]
    assert guide.similarity(pixels, captions).shape == (2,)
    ids = guide.tokens(captions + ["unknown words here"])
    assert ids.shape[0] == 3 and (ids[2, :3] == 1).all()  # <unk>
    assert guide.training_record["steps"] == 2


def test_the_projector_fine_tune_changes_only_the_projector(checkpoints, tvp_inputs, tmp_path):
    from safetensors.torch import load_file

    source = checkpoints["llama"]
    assert main(["tvp", "finetune", "--source", str(source), "--data", str(tvp_inputs / "data"), "--out",
                 str(tmp_path / "ft"), "--steps", "2", "--scenes-per-step", "1", "--lr", "1e-2", "--device", "cpu",
                 "--quiet"]) == 0
    before, after = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k].to(torch.bfloat16), after[k].to(torch.bfloat16))}
    assert changed and all("multi_modal_projector" in k for k in changed)
    record = json.loads((tmp_path / "ft" / "train_config.json").read_text())["tvp_finetune"]
    assert record["trainable_parameters"] == sum(v.numel() for k, v in before.items() if "multi_modal_projector" in k)
    assert record["steps"] == 2 and record["seconds"] >= 0 and (tmp_path / "ft" / "tokenizer.json").is_file()
