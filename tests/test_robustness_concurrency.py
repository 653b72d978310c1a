"""Concurrent use and endurance (issue 6): one Pipeline from 8 threads x 50 requests answers exactly
what the same requests answer one by one (no KV-cache or buffer crosstalk; failures in between
included); a thread can never deadlock on itself; memory does not creep over many requests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdk.errors import ImageError, PipelineBusyError, PromptError

ROOT = Path(__file__).resolve().parents[1]
THREADS, PER_THREAD, NEW = 8, 50, 4
PROMPTS = ["What is on the table?", "Describe the image.", "How many objects are there?", "Where is the red block?",
           "Is the gripper open?", "What color is the large cross?", "Count the balls.", "Anything unusual?",
           "What is left of the cup?", "Name the shapes."]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """THREADS * PER_THREAD (image, prompt, how) triples: different images (arrays of several sizes,
    a file, a PIL image) and prompts; every 9th is a bad request; generate, stream and describe."""
    folder = tmp_path_factory.mktemp("concurrency")
    rng = np.random.default_rng(11)
    images: list = [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8) for i in range(10)]
    Image.fromarray(images[3]).save(folder / "frame.png")
    images += [folder / "frame.png", Image.fromarray(images[5]).convert("L")]
    bad = [(folder / "missing.png", PROMPTS[0]), (images[0], "  \n "), (np.zeros((5, 5, 2), np.uint8), PROMPTS[1])]
    out = []
    for i in range(THREADS * PER_THREAD):
        image, prompt = (bad[i % len(bad)] if i % 9 == 8 else
                         (images[i % len(images)], PROMPTS[(i * 7 + i // len(images)) % len(PROMPTS)]))
        out.append((image, prompt, ("generate", "stream", "describe")[i % 3]))
    return out


def answer(pipe, image, prompt, how):
    """What a request gives: its text (token ids for generate), or its error type."""
    try:
        if how == "generate":
            result = pipe.generate(image, prompt, max_new_tokens=NEW)
            return result.token_ids, result.text
        if how == "stream":
            return "".join(pipe.stream(image, prompt, max_new_tokens=NEW))
        return pipe.describe(image, prompt, max_new_tokens=NEW)
    except (ImageError, PromptError) as err:
        return type(err).__name__


def run_threads(targets, timeout: float = 120.0) -> None:
    """Start all at once; a thread still alive after `timeout` is a hang, reported as a failure."""
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a request hung"


def test_eight_threads_answer_as_one_by_one(pipe, requests):
    expected = [answer(pipe, *request) for request in requests]
    assert sum(isinstance(e, str) and e.endswith("Error") for e in expected) == len(requests) // 9
    assert len({str(e) for e in expected}) > 20  # the requests really differ

    got: list = [None] * len(requests)
    errors: list = []
    barrier = threading.Barrier(THREADS)

    def worker(t: int):
        try:
            barrier.wait()
            # Thread t takes every THREADS-th request, so neighbours in time are different requests.
            for i in range(t, len(requests), THREADS):
                got[i] = answer(pipe, *requests[i])
        except Exception as err:  # surfaced below, not lost in the thread
            errors.append(err)

    run_threads([lambda t=t: worker(t) for t in range(THREADS)])
    assert errors == []
    mismatches = [i for i in range(len(requests)) if got[i] != expected[i]]
    assert mismatches == [], f"{len(mismatches)} requests differ, first {mismatches[:5]}"


def test_a_thread_cannot_deadlock_on_its_own_stream(pipe, image):
    reference = pipe.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
    outcome = {}

    def body():
        pieces = pipe.stream(image, PROMPTS[0], max_new_tokens=NEW)
        next(pieces)  # the stream holds the Pipeline now
        try:
            pipe.generate(image, PROMPTS[1], max_new_tokens=NEW)
        except PipelineBusyError as err:
            outcome["error"] = str(err)
        pieces.close()  # releases it
        outcome["after"] = pipe.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
        pieces = pipe.stream(image, PROMPTS[0], max_new_tokens=NEW)
        next(pieces)
        del pieces  # an abandoned stream releases the Pipeline when it is collected
        outcome["after_del"] = pipe.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids

    run_threads([body], timeout=60)
    assert "stream" in outcome["error"] and "close()" in outcome["error"] and "\n" not in outcome["error"]
    assert outcome["after"] == outcome["after_del"] == reference


def test_other_threads_wait_for_a_stream_then_proceed(pipe, image):
    reference = pipe.generate(image, PROMPTS[2], max_new_tokens=NEW).token_ids
    pieces = pipe.stream(image, PROMPTS[2], max_new_tokens=NEW)
    first = next(pieces)
    results = []
    waiter = threading.Thread(target=lambda: results.append(pipe.generate(image, PROMPTS[2], max_new_tokens=NEW)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and results == []  # serialised: it waits for the stream
    rest = "".join(pieces)
    waiter.join(60)
    assert not waiter.is_alive() and results[0].token_ids == reference
    assert first + rest == results[0].text


def test_interrupt_mid_request_releases_the_pipeline(pipe, image, monkeypatch):
    reference = pipe.generate(image, PROMPTS[3], max_new_tokens=NEW).token_ids

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipe.backend, "vision", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not wrapped: Ctrl-C stays Ctrl-C
        pipe.generate(image, PROMPTS[3], max_new_tokens=NEW)
    monkeypatch.undo()
    done = []
    run_threads([lambda: done.append(pipe.generate(image, PROMPTS[3], max_new_tokens=NEW).token_ids)], timeout=30)
    assert done == [reference]


def test_endurance_memory_does_not_creep(bundles):
    """scripts/endurance.py at a CI-sized count, in a fresh process that imports no torch (so RSS
    is the SDK's own). The full 1000-request run and its figures are in docs/robustness.md."""
    bundle = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "endurance.py"), "--bundle", str(bundle),
                          "--count", "300", "--warmup", "100", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], report
    assert report["rss_growth_pct"] < 5.0
    assert report["answered"] == 270 and report["refused_as_expected"] == 30 and report["failures"] == []
