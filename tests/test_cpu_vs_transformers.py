"""scripts/cpu_vs_transformers.py's summary logic (its end-to-end run on a tiny checkpoint takes 25-60 s here: too
slow for CI; docs/gpu.md has the measured command): ratios against the fastest and the leanest transformers
variant, token identity, medians over every request of every round."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from cpu_vs_transformers import compare  # noqa: E402


def _run(describe_ms, peak, tokens, growth=10.0):
    return {"describe_ms": describe_ms, "ttft_ms": [m / 4 for m in describe_ms], "decode_tokens_per_s": [100.0],
            "load_s": 1.0, "peak_rss_mb": peak, "rss_after_imports_mb": peak - growth,
            "rss_after_load_mb": peak - growth / 2, "rss_growth_mb": growth, "tokens": tokens}


def test_ratios_use_the_fastest_and_the_leanest_peer():
    specs = {"pipmm": {"side": "pipmm"}, "transformers-eager": {"side": "transformers"},
             "transformers-sdpa": {"side": "transformers"}}
    rounds = {"pipmm": [_run([10.0, 30.0, 20.0], 100.0, [1, 2, 3]), _run([20.0], 110.0, [1, 2, 3])],
              "transformers-eager": [_run([400.0], 300.0, [1, 2, 4])],
              "transformers-sdpa": [_run([100.0, 120.0], 500.0, [1, 2, 4])]}
    medians, ratios = compare(specs, rounds)
    assert medians["pipmm"]["describe_ms"] == 20.0  # median over all four requests of both rounds
    assert medians["pipmm"]["peak_rss_mb"] == 105.0  # median over the rounds' processes
    got = ratios["pipmm"]
    assert ratios["transformers_fastest"] == "transformers-sdpa" and ratios["transformers_leanest"] == "transformers-eager"
    assert got["describe_speedup"] == 110.0 / 20.0 and got["describe_target_met"]
    assert got["peak_rss_ratio"] == 105.0 / 300.0 and got["peak_rss_target_met"]
    assert got["leading_tokens_identical"] == 2 and not got["tokens_identical"]  # against the fastest peer's tokens
    assert got["tokens_stable_across_rounds"]
    rounds["pipmm"][1]["describe_ms"] = [200.0] * 5  # slower: 5.5x no longer holds
    assert not compare(specs, rounds)[1]["pipmm"]["describe_target_met"]
