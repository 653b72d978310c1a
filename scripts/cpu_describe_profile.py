"""Where a CPU describe's time goes (issue 18): Pipeline.generate's stage timings, every session run counted and
timed, and the floor a decode step is held to (one core streaming the decoder's weights).

    python3 scripts/cpu_describe_profile.py                      # default bundle -> docs/gpu-results/cpu-describe-profile.json
    PIPMM_PROMPT_CACHE=0 python3 scripts/cpu_describe_profile.py --json /tmp/no-cache.json   # any env switch applies

One request = sdk.bench's 640x480 frame + DEFAULT_PROMPT, greedy, exactly --new-tokens tokens (min_new_tokens), as
scripts/cpu_vs_transformers.py runs it. Each session of the backend is wrapped (TimedSession: run and
run_with_iobinding timed with perf_counter, everything else passed through), so "python_ms" is the request's wall
time outside ONNX Runtime's runs: preprocessing (PIL, numpy), tokenizing, sampling, building feeds and bindings.
The floor: the decoder's weight bytes read once, as numpy's dot over an array of that size on one core (a decode
step reads every weight once; the default model's 10 MB do not fit a core's L2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = "pipmm-cpu-describe-profile/1"


class TimedSession:
    """An InferenceSession whose runs are counted and timed into `runs[name]` ([count, seconds])."""

    def __init__(self, name: str, session, runs: dict):
        self._name, self._session, self._runs = name, session, runs

    def _timed(self, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            tally = self._runs[self._name]
            tally[0] += 1
            tally[1] += time.perf_counter() - start

    def run(self, *args, **kwargs):
        return self._timed(self._session.run, *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def wrap_sessions(backend, runs: dict) -> None:
    """Every session the ONNX Runtime backend runs, wrapped once (the prefill session may be the decoder's own)."""
    wrapped = {}

    def wrap(name, session):
        if id(session) not in wrapped:
            wrapped[id(session)] = TimedSession(name, session, runs)
        return wrapped[id(session)]

    for name, session in list(backend.sessions.items()):
        backend.sessions[name] = wrap(name, session)
    separate = backend.prefill_session is not backend.sessions[backend.decoder_graph]._session
    backend.prefill_session = wrap("prefill_session", backend.prefill_session) if separate else \
        backend.sessions[backend.decoder_graph]
    inplace = getattr(backend, "_inplace", None) if backend.kv_cache == "inplace" else None
    if inplace is not None:  # the in-place cache holds its own references (runtimes/inplace_cache.py)
        inplace.session, inplace.prefill_session = backend.sessions[backend.decoder_graph], backend.prefill_session


def stream_floor_ms(nbytes: int, repeats: int = 50) -> float:
    """Milliseconds one core takes to read `nbytes` of float32 (numpy dot: BLAS streaming), median of `repeats`."""
    array = np.ones(max(1, nbytes // 4), np.float32)
    for _ in range(5):
        array.dot(array)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        array.dot(array)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "sdk" / "default_bundle")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=15, help="timed describes (after one warm-up)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gpu-results" / "cpu-describe-profile.json")
    args = parser.parse_args(argv)

    import sdk
    from sdk.bench import DEFAULT_PROMPT, bench_image

    pipeline = sdk.load(args.bundle, backend="onnxruntime", device="cpu")
    runs = defaultdict(lambda: [0, 0.0])
    wrap_sessions(pipeline.backend, runs)
    image = bench_image()

    def describe():
        return pipeline.generate(image, DEFAULT_PROMPT, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, temperature=0.0)

    describe()  # warm-up: first-run allocations, and the prompt pass (a repeat reuses its vector)
    runs.clear()
    stages, walls, outside, load = defaultdict(list), [], [], [os.getloadavg()[0]]
    for _ in range(args.requests):
        before = sum(seconds for _, seconds in runs.values())
        start = time.perf_counter()
        result = describe()
        walls.append((time.perf_counter() - start) * 1e3)
        outside.append(walls[-1] - (sum(seconds for _, seconds in runs.values()) - before) * 1e3)
        for key, value in result.timings.items():
            stages[key].append(value)
    load.append(os.getloadavg()[0])
    n = args.requests
    sessions = {name: {"runs_per_describe": count / n, "ms_per_describe": seconds / n * 1e3,
                       "us_per_run": seconds / count * 1e6} for name, (count, seconds) in runs.items()}
    backend = pipeline.backend
    decoder_files = [f for f in backend.bundle.manifest.files if f.startswith("decoder.onnx")]
    weight_bytes = sum(os.path.getsize(args.bundle / f) for f in decoder_files)
    floor = stream_floor_ms(weight_bytes)
    median = {key: float(np.median(values)) for key, values in stages.items()}
    result = {
        "schema": SCHEMA, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python3 scripts/cpu_describe_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_1min": load,
                    "environment": {k: v for k, v in os.environ.items() if k.startswith("PIPMM_") or k == "OMP_NUM_THREADS"}},
        "bundle": str(args.bundle), "backend": {k: backend.info().get(k) for k in (
            "decoder_graph", "kv_cache", "intra_op_threads", "decoder_intra_op_threads", "prefill_session", "spinning",
            "decoder_spinning")},
        "config": {"new_tokens": args.new_tokens, "requests": n, "warmup": 1, "image": "sdk.bench.bench_image() 640x480"},
        "stages_ms_median": median, "describe_ms_median": float(np.median(walls)),
        "session_runs": sessions, "session_runs_per_describe": sum(s["runs_per_describe"] for s in sessions.values()),
        "python_ms_per_describe": float(np.median(outside)),  # the request's wall time outside the session runs
        "decode_step_floor": {"decoder_weight_bytes": weight_bytes, "one_core_stream_ms": floor,
                              "decode_ms_per_token_over_floor": median["decode_ms_per_token"] / floor},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    order = ("preprocess_ms", "prompt_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_ms_per_token",
             "total_ms")
    print(f"describe {result['describe_ms_median']:.1f} ms (load {load[0]:.1f}-{load[-1]:.1f}): " +
          ", ".join(f"{k} {median[k]:.2f}" for k in order if k in median))
    for name, s in sessions.items():
        print(f"  {name}: {s['runs_per_describe']:.0f} runs, {s['ms_per_describe']:.2f} ms, {s['us_per_run']:.0f} us/run")
    print(f"  outside the runs (python, PIL, numpy): {result['python_ms_per_describe']:.2f} ms; decode step floor "
          f"{floor:.3f} ms ({weight_bytes / 1e6:.1f} MB on one core)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
