"""Stage mv's visual setting (export/train/frame_setting.py): the init's own where N_max frames fit, else why not."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from export.train.frame_setting import choose, needed  # noqa: E402

DEFAULT_MODEL = {"budget": "half", "visual_positions": "patch"}  # models/default_model/train_config.json
# the default model: 16x16 patches, context 512, "\n" one token
SHAPE = {"patches": 256, "context": 512, "separator": 1}


def test_positions_a_request_needs():
    assert needed("concat", 4, 128, 256, "patch", 0, 1) == 4 * 256 + 3 + 32  # every frame its block of N
    assert needed("concat", 4, 64, 256, "sequence", 0, 1) == 4 * 64 + 3 + 32
    assert needed("mivpg", 8, 128, 256, "patch", 64, 1) == 64 + 32  # the adapter's R tokens, whatever the frames


def test_adapters_keep_the_default_models_own_setting():
    setting = choose("mivpg", DEFAULT_MODEL, "prompt-topk", 8, slots=64, **SHAPE)
    assert (setting.budget, setting.positions, setting.source, setting.rejected) == ("half", "patch", "init", [])


def test_concat_falls_back_and_says_why():
    setting = choose("concat", DEFAULT_MODEL, "prompt-topk", 4, slots=0, **SHAPE)
    assert (setting.budget, setting.positions, setting.source, setting.needed_positions) == \
        ("quarter", "sequence", "fallback", 4 * 64 + 3 + 32)
    assert [(r["budget"], r["positions"], r["needed_positions"]) for r in setting.rejected] == \
        [("half", "patch", 1059), ("half", "sequence", 547), ("quarter", "patch", 1059)]
    assert "needs 1059 positions, the context holds 512" in setting.rejected[0]["why"]


def test_a_long_context_keeps_patch_positions_for_concat():
    # edge-0.5b: CLIP ViT-B/16 at 224 (196 patches), Qwen2-0.5B's context
    setting = choose("concat", DEFAULT_MODEL, "prompt-topk", 8, patches=196, context=32768, slots=0, separator=1)
    assert (setting.budget, setting.positions, setting.source) == ("half", "patch", "init")


def test_given_flags_are_kept_or_refused():
    setting = choose("concat", DEFAULT_MODEL, "prompt-topk", 4, slots=0, budget="quarter", **SHAPE)
    assert (setting.budget, setting.positions, setting.source) == ("quarter", "sequence", "given")
    with pytest.raises(ValueError, match="needs 1059 positions"):
        choose("concat", DEFAULT_MODEL, "prompt-topk", 4, slots=0, budget="half", positions="patch", **SHAPE)


def test_a_reducer_without_patch_positions_takes_sequence():
    setting = choose("mivpg", DEFAULT_MODEL, "pool", 8, slots=64, **SHAPE)
    assert (setting.budget, setting.positions, setting.source) == ("half", "sequence", "fallback")
    assert "takes sequence only" in setting.rejected[0]["why"]
