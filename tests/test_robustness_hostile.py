"""Hostile input the server forwards to the SDK: limits that hold before anything expensive (docs/robustness.md)."""

from __future__ import annotations

import os
import shutil
import threading
import time
import tracemalloc

import numpy as np
import pytest

import sdk
from helpers import run_pipmm
from sdk.bundle import MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH, json_depth
from sdk.errors import BundleError, ImageError


@pytest.fixture
def damaged(bundles, tmp_path):
    """A copy of a tiny bundle whose manifest a test replaces."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundles("llama"), copy)
    return copy


def one_line(err) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 400
    return text


def test_deeply_nested_manifest_is_a_one_line_bundle_error(damaged):
    (damaged / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BundleError) as err:
        sdk.load(damaged)
    assert "nest" in one_line(err.value)
    done = run_pipmm("describe", "x.png", "--bundle", damaged)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_nesting_within_the_parser_but_above_the_depth_limit(damaged):
    depth = MAX_MANIFEST_DEPTH + 5
    (damaged / "manifest.json").write_text('{"a": ' * depth + "1" + "}" * depth)
    with pytest.raises(BundleError, match=f"nests {MAX_MANIFEST_DEPTH + 1} levels deep"):
        sdk.load(damaged)
    assert json_depth({"a": [1, {"b": []}]}, 10) == 4 and json_depth(5, 10) == 0


def test_oversized_manifest_is_refused_before_it_is_read(damaged):
    with open(damaged / "manifest.json", "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: nothing to read would be cheap either way, the size decides
    tracemalloc.start()
    with pytest.raises(BundleError, match="above the limit"):
        sdk.load(damaged)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # the 8 MB file was never read


def generate_with_deadline(pipe, image, seconds=10.0):
    """generate() in a thread: a regression (a blocking open) fails the test instead of hanging it."""
    outcome = {}

    def run():
        try:
            outcome["result"] = pipe.generate(image, "What is it?", max_new_tokens=4)
        except Exception as err:  # asserted by the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "generate() blocked"
    return outcome


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_and_device_paths_are_refused_without_blocking(pipe, image, tmp_path):
    before = pipe.generate(image, "What is it?", max_new_tokens=4).token_ids
    fifo = tmp_path / "frame.png"
    os.mkfifo(fifo)  # no writer: opening and reading it the ordinary way blocks forever
    for path in (fifo, "/dev/zero"):
        error = generate_with_deadline(pipe, str(path))["error"]
        assert isinstance(error, ImageError) and "not a regular file" in one_line(error), error
    assert generate_with_deadline(pipe, image)["result"].token_ids == before  # the Pipeline was not left locked


def test_huge_broadcast_float_array_is_refused_by_the_cheap_checks_first(pipe, image):
    huge = np.broadcast_to(np.float64(0.5), (100_000, 100_000, 3))  # 240 GB if it were real; no NaN scan may run
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageError, match="above the limit"):
        pipe.generate(huge, "What is it?", max_new_tokens=4)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 10_000_000
    with pytest.raises(ImageError, match="has shape"):
        pipe.generate(np.broadcast_to(np.float32(np.nan), (10_000, 10_000, 7)), "What is it?")
    with pytest.raises(ImageError, match="NaN"):  # within the limits, NaN is still named
        pipe.generate(np.full((8, 8, 3), np.nan, np.float32), "What is it?")
    with pytest.raises(ImageError, match="dtype float64"):
        pipe.generate(image / 255.0, "What is it?")


@pytest.mark.parametrize("args", [["describe"], ["describe", "x.png", "--max-new-tokens", "many"], ["no-such-verb"],
                                  ["serve", "--port", "eighty"]])
def test_usage_errors_are_one_line(args):
    done = run_pipmm(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: pipmm") and "--help" in done.stderr
