"""Fuzzing (issue 6): hypothesis over random image bytes, arrays and prompt strings; only a valid
answer or a documented error (a PipmmError subclass, one line) may come back. The properties live
in scripts/fuzz.py, which runs them with thousands of examples (figures in docs/robustness.md);
here a bounded, derandomized run keeps CI fast and reproducible."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 60  # per property; ~10 ms each on the tiny bundle


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("pipmm_fuzz", ROOT / "scripts" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    return _fuzz_module()


@pytest.mark.parametrize("name", ["image bytes", "arrays", "prompts"])
def test_property_only_documented_errors_or_valid_output(fuzz, pipe, image, tmp_path, name):
    reference = pipe.generate(image, "What is here?", max_new_tokens=4).token_ids
    counts: dict = {}
    # 4 MP instead of 50 MP: a damaged header that declares 7000x7000 would make PIL allocate
    # 150 MB before finding the data truncated; the limit itself is tested in test_robustness_inputs.
    props = fuzz.properties(pipe, EXAMPLES, derandomize=True, counts=counts, image=image, folder=tmp_path,
                            max_pixels=4_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about the corrupt metadata we feed it
        props[name]()
    outcomes = counts[name]
    assert sum(outcomes.values()) >= EXAMPLES // 2
    assert outcomes["ok"] > 0 and len(outcomes) > 1, outcomes  # both answers and refusals were exercised
    assert pipe.generate(image, "What is here?", max_new_tokens=4).token_ids == reference
