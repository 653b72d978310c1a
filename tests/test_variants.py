"""Variants that share the default model's vision tower: split to the non-vision weights, made whole again."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from export.synthetic import build_tiny_llava  # noqa: E402
from export.train.state import WITHOUT_VISION, assemble_variant, split_variant  # noqa: E402


def _shard(checkpoint):
    """checkpoint's model.safetensors -> model-00001-of-00002 / model-00002-of-00002 (as m20's); -> (weights, names)."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(weights)
    (checkpoint / "model.safetensors").unlink()
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        save_file({k: weights[k] for k in chunk}, str(checkpoint / f"model-0000{i}-of-00002.safetensors"))
    return weights, names


def test_split_then_assemble_gives_back_the_variant_with_the_base_tower(tmp_path):
    base = build_tiny_llava(tmp_path / "base", seed=0)
    variant = build_tiny_llava(tmp_path / "variant", seed=1)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (base / name).is_file()
    part = split_variant(variant, tmp_path / "part")
    stored = load_file(str(part / WITHOUT_VISION))
    assert stored and not any("vision_tower" in k for k in stored)
    assert (part / "config.json").is_file()

    whole = assemble_variant(base, part, tmp_path / "whole")
    got, want_base, want_variant = (load_file(str(d / "model.safetensors")) for d in (whole, base, variant))
    assert set(got) == set(want_base)
    for key, value in got.items():
        expected = want_base[key] if "vision_tower" in key else want_variant[key]
        assert torch.equal(value, expected), key
    assert any(not torch.equal(want_base[k], want_variant[k]) for k in got if "vision_tower" in k)  # seeds differ


def test_a_sharded_base_gives_the_same_whole(tmp_path):
    """m20's checkpoints come in shards (model-0000k-of-0000n.safetensors): the tower is read from all of them."""
    base = build_tiny_llava(tmp_path / "base", seed=0)
    part = split_variant(build_tiny_llava(tmp_path / "variant", seed=1), tmp_path / "part")
    want = assemble_variant(base, part, tmp_path / "whole")
    weights, names = _shard(base)
    got = load_file(str(assemble_variant(base, part, tmp_path / "sharded") / "model.safetensors"))
    expected = load_file(str(want / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_checkpoints_weight_digest_covers_its_shards(tmp_path):
    """Benchmark caches key on it (scripts/compare_genai.py made_from): a sharded checkpoint (m20) has no
    model.safetensors, and a changed shard must change the digest."""
    from export.model.checkpoint import weights_sha256
    from sdk.bundle import sha256_file

    base = build_tiny_llava(tmp_path / "base", seed=0)
    assert weights_sha256(base) == sha256_file(base / "model.safetensors")
    weights, names = _shard(base)
    before = weights_sha256(base)
    second = {k: weights[k] for k in names[len(names) // 2:]}
    second[names[-1]] = second[names[-1]] + 1
    save_file(second, str(base / "model-00002-of-00002.safetensors"))
    assert weights_sha256(base) != before


def test_assemble_refuses_a_variant_missing_weights(tmp_path):
    base = build_tiny_llava(tmp_path / "base", seed=0)
    part = split_variant(base, tmp_path / "part")
    weights = load_file(str(part / WITHOUT_VISION))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(part / WITHOUT_VISION))
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        assemble_variant(base, part, tmp_path / "whole")


def test_a_variant_of_another_model_names_its_base_and_is_refused_beside_this_one(tmp_path):
    """r11's variants (models/variants/*) say models/r11 in variant.json; made whole with another model (m20's
    wider LLM) they are refused by shape, not assembled into a broken checkpoint."""
    import json

    from export.train.state import REPOSITORY, VARIANT_JSON, variant_base

    base = build_tiny_llava(tmp_path / "base", seed=0)
    wider = build_tiny_llava(tmp_path / "wider", seed=1, text_hidden=96)
    part = split_variant(wider, tmp_path / "part")
    assert variant_base(part, default=base) == base
    (part / VARIANT_JSON).write_text(json.dumps({"base": "models/r11"}))
    assert variant_base(part, default=base) == REPOSITORY / "models" / "r11"
    with pytest.raises(ValueError, match="trained from another model"):
        assemble_variant(base, part, tmp_path / "whole")
    for shipped in ("mivpg", "merge-quarter", "prompt-first"):
        assert variant_base(REPOSITORY / "models" / "variants" / shipped) == REPOSITORY / "models" / "r11"


def test_a_stage_mv_run_ships_its_adapter_in_bf16_and_loads_back(tmp_path):
    from export.model.mivpg import FrameAdapter, random_adapter

    run = build_tiny_llava(tmp_path / "run", seed=0)
    adapter = random_adapter("mivpg", 64, seed=3, d_model=32, heads=4, queries=6, frame_queries=4, csa_points=3)
    adapter.save(run)
    part = split_variant(run, tmp_path / "part")
    assert (part / WITHOUT_VISION).is_file()
    stored = load_file(str(part / "adapter.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    loaded = FrameAdapter.load(part)  # bf16 on disk, fp32 in the module: the values rounded to bf16
    assert loaded.config == adapter.config
    for key, value in adapter.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == torch.float32 and torch.equal(got, value.bfloat16().float()), key

    frozen = split_variant(run, tmp_path / "frozen", llm=False)  # a frozen-LLM run: the adapter and configs only
    assert not (frozen / WITHOUT_VISION).exists() and (frozen / "adapter.safetensors").is_file()
    assert (frozen / "config.json").is_file()
