from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import sdk
from sdk.errors import GenerationArgumentError
from sdk.generation import GenerationArgs, sample

PROMPT = "what is the color of the shape?"


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(max_new_tokens=10_000),
                                    dict(max_new_tokens=2.5), dict(temperature=-0.1), dict(temperature=float("nan")),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(seed=1.5), dict(seed="7"), dict(seed=-1),
                                    dict(min_new_tokens=-1), dict(min_new_tokens=9), dict(min_new_tokens=2.0),
                                    dict(min_new_tokens=True)])
def test_bad_generation_arguments_are_refused_with_one_line(kwargs):
    args = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None) | kwargs
    with pytest.raises(GenerationArgumentError) as err:
        GenerationArgs.checked(max_context=512, **args)
    assert "\n" not in str(err.value)


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    args = GenerationArgs(max_new_tokens=1, temperature=1.0, top_p=0.7)
    rng = np.random.default_rng(0)
    draws = {sample(logits, args, rng) for _ in range(300)}
    assert draws == {0, 1}


def test_greedy_is_argmax():
    assert sample(np.array([0.1, 3.0, -1.0]), GenerationArgs(max_new_tokens=1), np.random.default_rng()) == 1


@pytest.fixture(scope="module")
def eos_first(bundles, image, tmp_path_factory):
    """A copy of a real bundle whose end-of-sequence id is the token greedy decoding picks first."""
    source = bundles("llama")
    first = sdk.load(source, device="cpu").generate(image, PROMPT, max_new_tokens=1).token_ids[0]
    bundle = shutil.copytree(source, tmp_path_factory.mktemp("eos") / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["special_tokens"]["eos"] = [first]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle, first


def test_min_new_tokens_suppresses_end_of_sequence(eos_first, image):
    bundle, eos = eos_first
    pipeline = sdk.load(bundle, device="cpu")
    stopped = pipeline.generate(image, PROMPT, max_new_tokens=6)
    assert stopped.token_ids == [] and stopped.finish_reason == "eos"
    forced = pipeline.generate(image, PROMPT, max_new_tokens=6, min_new_tokens=6)
    assert len(forced.token_ids) == 6 and eos not in forced.token_ids and forced.finish_reason == "length"
    assert "".join(pipeline.stream(image, PROMPT, max_new_tokens=6, min_new_tokens=6)) == forced.text
    some = pipeline.generate(image, PROMPT, max_new_tokens=6, min_new_tokens=2)
    assert some.token_ids[:2] == forced.token_ids[:2] and 2 <= len(some.token_ids) <= 6
    with pytest.raises(GenerationArgumentError, match="min_new_tokens=7 is outside 0..6"):
        pipeline.generate(image, PROMPT, max_new_tokens=6, min_new_tokens=7)


def test_a_device_choice_stands_unless_banned():
    """sdk/generation.py choose(): the device's argmax is taken as it is, the row fetched only when it is banned."""
    from sdk.generation import DeviceChoice, GenerationArgs, choose

    row = np.array([[0.0, 3.0, 2.0, 3.0]], np.float32)
    fetched = []
    step = DeviceChoice(1, lambda: fetched.append(1) or row)
    greedy, rng = GenerationArgs(max_new_tokens=4), np.random.default_rng(0)
    assert choose(step, greedy, rng, [0]) == 1 and not fetched
    assert choose(step, greedy, rng, [1]) == 3 and fetched  # the ban moves the choice to the other maximum
    assert choose(row, greedy, rng, []) == 1 == int(np.argmax(row))
