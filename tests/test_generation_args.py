from __future__ import annotations

import numpy as np
import pytest

from sdk.errors import GenerationArgumentError
from sdk.generation import GenerationArgs, sample


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(max_new_tokens=10_000),
                                    dict(max_new_tokens=2.5), dict(temperature=-0.1), dict(temperature=float("nan")),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(seed=1.5), dict(seed="7"), dict(seed=-1)])
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
