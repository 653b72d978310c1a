"""The next default model's tooling on CPU at tiny sizes: `pipmm train --arch`, and a stage-0 run split over
device calls that resumes from a portable copy (bf16 model files, no optimizer state: what one call can carry
to the next, scripts/gpu_default_model.sh big0 / big) as well as from the full trainer state."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from export.tasks.scenes import LABEL_CHARS, plan_scene, split_seed, split_style  # noqa: E402
from export.train.archs import ARCHS  # noqa: E402
from export.train.data import build_tokenizer  # noqa: E402
from export.train.model import build_llava, parameter_counts  # noqa: E402
from export.train.state import STATE_JSON, portable_copy  # noqa: E402
from sdk.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "9", "--workers", "0", "--val-scenes", "0", "--quiet", "--log-every", "1"]
STOP = 5  # the first call stops after this step; the run has 7


def train(*args) -> int:
    return main(["train", *map(str, args), *FAST])


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """first: call 1 (from scratch, stops after step STOP); carried: its portable copy, what comes back and is
    carried to a fresh machine; portable: call 2, resumed from a copy of carried; full: call 2 resumed from every
    trainer-state shard (as on the same machine)."""
    root = tmp_path_factory.mktemp("big")
    assert train("--stage", 0, "--arch", "m20-tiny", "--out", root / "first", "--steps", 7, "--lr", 1e-2,
                 "--warmup", 2, "--save-every", 1000, "--stop-after", STOP, "--tokenizer-scenes", 40,
                 "--paraphrase-fraction", 0.5, "--reduced-fraction", 0.5) == 0
    portable_copy(root / "first", root / "carried")
    shutil.copytree(root / "carried", root / "portable")
    shutil.copytree(root / "first", root / "full")
    assert train("--stage", 0, "--out", root / "portable", "--resume", "--rewarmup", 2) == 0  # sizes from its config
    assert train("--stage", 0, "--out", root / "full", "--resume") == 0
    return root


def test_a_portable_copy_drops_the_optimizer_and_is_a_fraction_of_the_state(runs):
    first, portable = runs / "first", runs / "carried"
    size = lambda d, pattern="*": sum(f.stat().st_size for f in d.glob(pattern))  # noqa: E731
    assert list(first.glob("trainer_state-*.safetensors")) and not list(portable.glob("trainer_state-*.safetensors"))
    meta = json.loads((portable / STATE_JSON).read_text())
    assert meta["files"] == [] and meta["step"] == STOP
    # bf16 weights (2 bytes a parameter) against fp32 weights + two AdamW moments (12 bytes)
    assert 5 * size(portable, "model*.safetensors") < size(first, "trainer_state-*.safetensors")


def test_resume_from_the_portable_copy_continues_the_run(runs):
    first, portable, full = (log(runs / n) for n in ("first", "portable", "full"))
    assert [r["step"] for r in first] == list(range(1, STOP + 1))
    # the step counter and the data stream go on: steps 6-7 follow the first call's five
    assert [r["step"] for r in portable] == list(range(1, 8)) == [r["step"] for r in full]
    assert portable[:STOP] == first
    after, reference = portable[STOP], full[STOP]  # step 6: its loss is that of the weights at the resume
    # the weights came back (rounded to bf16 once; the next test checks them one by one): the same loss on the
    # same batch as the fp32 resume, auxiliary head included
    assert after["questions"] == reference["questions"]
    assert after["loss"] == pytest.approx(reference["loss"], rel=2e-2)
    assert after["lm_loss"] == pytest.approx(reference["lm_loss"], rel=2e-2)
    # a fresh optimizer: the learning rate ramps back over --rewarmup 2 steps, then follows the schedule
    assert after["lr"] == pytest.approx(0.5 * reference["lr"]) and portable[6]["lr"] == pytest.approx(full[6]["lr"])
    config = json.loads((runs / "portable/train_config.json").read_text())
    assert config["resumes"] == [{"step": STOP, "optimizer": "fresh", "rewarmup": 2}]
    assert config["completed_steps"] == 7 and config["arch"]["name"] == "m20-tiny" and config["lr"] == 1e-2
    # the resumed call was given none of the first call's settings: it keeps them
    assert config["data"]["paraphrase_fraction"] == 0.5 and config["reduced_fraction"] == 0.5
    assert json.loads((runs / "full/train_config.json").read_text())["resumes"][0]["optimizer"] == "restored"


def test_the_resumed_weights_are_the_carried_ones(runs, tmp_path):
    """What train.run resumes from a portable copy: every trainable as the first call's fp32 master rounded to
    bf16 once (the model files), the auxiliary head exact (trainer_extra), and an empty optimizer."""
    import argparse

    from safetensors.torch import load_file

    from export.train.state import load_trainer_state
    from export.train.train import setup
    from export.train.train_args import add_arguments

    carried = shutil.copytree(runs / "carried", tmp_path / "carried")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model, _, _, trainable, arch, *_ = setup(parser.parse_args(["--stage", "0", "--out", str(carried), "--resume"]))
    optimizer = torch.optim.AdamW(list(trainable.values()))
    assert not load_trainer_state(carried, trainable, optimizer)["optimizer_restored"] and not optimizer.state
    masters = {}
    for shard in (runs / "first").glob("trainer_state-*.safetensors"):
        masters.update({k[len("param."):]: v for k, v in load_file(str(shard)).items() if k.startswith("param.")})
    model_names = {n for n, _ in model.named_parameters()}
    assert set(masters) == set(trainable) and any(n.startswith("aux_head.") for n in trainable)
    for name, p in trainable.items():
        want = masters[name] if name not in model_names else masters[name].to(torch.bfloat16).float()
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0, msg=name)
    assert arch.name == "m20-tiny" and arch.answerless == ("label",)


def test_a_copy_missing_a_shard_is_refused(runs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs / "first", partial)
    next(partial.glob("trainer_state-*.safetensors")).unlink()
    assert train("--stage", 0, "--out", partial, "--resume") == 1


def _val_labels(n: int = 800) -> list[str]:
    labels = []
    for i in range(n):
        seed = split_seed("val", i)
        labels += [o.label for o in plan_scene(seed, 224, split_style("val", seed))[0].objects if o.label]
    return labels


def test_the_arch_tokenizer_reads_labels_one_token_per_glyph():
    """A 1024-BPE merges label glyph pairs once it runs out of the generator's words; m20 leaves the label
    answers out of its corpus (export/train/archs.py)."""
    labels = _val_labels()

    def merged(tokenizer) -> float:  # fraction of label answers with fewer tokens than characters
        return sum(len(tokenizer.encode(" " + s.lower(), add_special_tokens=False).ids) < len(s)
                   for s in labels) / len(labels)

    arch = ARCHS["m20"]
    with_labels = build_tokenizer(600, arch.sizes.vocab_size)
    without = build_tokenizer(600, arch.sizes.vocab_size, answerless=arch.answerless)
    assert merged(with_labels) > 0.08 and merged(without) < 0.05, (merged(with_labels), merged(without))
    assert set(c.lower() for c in LABEL_CHARS) <= set(without.get_vocab())  # every glyph has its own token


def _slim_tree_bytes() -> int:
    """Tracked files without models/ and sdk/default_bundle (what a call sends when those are removed)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [p for p in files.decode().split("\0") if p and not p.startswith(("models/", "sdk/default_bundle/"))]
    return sum((ROOT / p).stat().st_size for p in paths if (ROOT / p).is_file())


@pytest.mark.parametrize("name", ["m20", "m20-336"])
def test_the_planned_architectures_fit_issue_19_and_the_carry(name):
    sizes = ARCHS[name].sizes
    tokenizer = build_tokenizer(50, sizes.vocab_size, answerless=ARCHS[name].answerless)
    sizes.vocab_size = max(sizes.vocab_size, tokenizer.get_vocab_size())  # the largest the tokenizer can get
    with torch.device("meta"):  # shapes only: no memory, no init
        total = parameter_counts(build_llava(sizes, tokenizer))["total"]
    assert total <= 30e6  # issue 19: up to 30M parameters
    assert 2 * total <= 60e6  # the bf16 checkpoint shipped
    assert 2 * total + _slim_tree_bytes() <= 64 * 2**20 - 2**20  # carried beside the slimmed tree (1 MiB spare)


def test_a_finetune_call_comes_back_without_the_tower_and_is_made_whole(runs, tmp_path):
    """scripts/gpu_default_model.sh finetune (EVALS=0) returns pip0 and plain0 without their frozen vision tower,
    in parts (pack_variants: m20's are over the 16 MiB a returned file may be); `variants` joins them and puts the
    stage-0 tower back: every tensor is the run's own, the tower is stage 0's."""
    from safetensors.torch import load_file

    env = {"RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out"), "S0": str(runs / "portable"), "S1": "1",
           "S2": "1", "SEEDS": "0", "EVALS": "0", "W2": "0", "PATH": __import__("os").environ["PATH"]}
    done = subprocess.run(["bash", "scripts/gpu_default_model.sh", "finetune"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    returned = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert returned == ["pip0-without_vision.part00", "plain0-without_vision.part00", "small.tar.gz"]
    done = subprocess.run(["bash", "scripts/gpu_default_model.sh", "variants", str(tmp_path / "out"),
                           str(runs / "portable"), str(tmp_path / "whole")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tower = {k: v for k, v in load_file(str(runs / "portable" / "model.safetensors")).items() if "vision_tower" in k}
    for name in ("pip0", "plain0"):
        whole = load_file(str(tmp_path / "whole" / name / "model.safetensors"))
        trained = load_file(str(tmp_path / "runs" / name / "model.safetensors"))
        assert whole.keys() == trained.keys() and all(torch.equal(whole[k], trained[k]) for k in whole)
        assert all(torch.equal(whole[k], tower[k]) for k in tower)
    assert (tmp_path / "whole" / "pip0" / "prompt_mlp.safetensors").is_file()
