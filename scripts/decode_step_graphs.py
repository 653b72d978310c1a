"""One decode step of each decoder graph alone, through ONNX Runtime's Python API (no pipeline around it), CPU.

    python scripts/decode_step_graphs.py [--work ~/.cache/pipmm/compare_genai/default_model] [--past 200]

Separates the graph from the host loop around it: the plain decoder, decoder_fused (with its CMAI layers, as
the bundle has it, and rebuilt without them) and ORT GenAI's graph, all in the work directory that
scripts/compare_genai.py filled; sessions with the CPU default of runtimes/onnxruntime.py (threads sleep).
Interleaved rounds, medians; JSON to docs/gpu-results/cpu-decode-step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def feeds_for(session, past: int, model: dict) -> dict:
    """Zeros of every input's shape for one new token after `past` cached ones."""
    feeds = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, model["num_kv_heads"], past, model["head_dim"]), np.float32)
        elif value.name == "input_ids":
            feeds[value.name] = np.array([[5]], np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.array([[past]], np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, past + 1), np.int64)
        else:
            shape = [1 if d in ("batch", "batch_size") else 1 if d in ("sequence", "sequence_length") else
                     past + 1 if d in ("total_sequence",) else past if isinstance(d, str) else d for d in value.shape]
            feeds[value.name] = np.zeros(shape, np.float32)
    return feeds


def main(argv=None) -> int:
    import onnxruntime as ort

    from export.extra_graphs import optional_module
    from export.model.checkpoint import load_checkpoint
    from export.onnx_graphs import export_decoder_fused

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pipmm" / "compare_genai" / "default_model")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default_model")
    parser.add_argument("--past", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gpu-results" / "cpu-decode-step.json")
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as scratch:
        no_cmai = Path(scratch) / "decoder_fused.onnx"
        export_decoder_fused(optional_module("decoder_fused", load_checkpoint(args.checkpoint), -1, []), no_cmai, {})
        graphs = {"plain": args.work / "bundle-fused" / "decoder.onnx",
                  "fused": args.work / "bundle-fused" / "decoder_fused.onnx",
                  "fused without CMAI layers": no_cmai, "genai": args.work / "genai" / "model.onnx"}
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
        model = json.loads((args.work / "bundle-fused" / "manifest.json").read_text())["model"]
        feeds = {k: feeds_for(s, args.past, model) for k, s in sessions.items()}
        got = {k: [] for k in sessions}
        for r in range(args.rounds):
            for name in list(sessions)[r % 4:] + list(sessions)[: r % 4]:
                session = sessions[name]
                for _ in range(5):
                    session.run(None, feeds[name])
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    session.run(None, feeds[name])
                    times.append(time.perf_counter() - start)
                got[name].append(float(np.median(times) * 1e3))
    medians = {k: float(np.median(v)) for k, v in got.items()}
    result = {"schema": "pipmm-decode-step/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python scripts/decode_step_graphs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": "2 cores, shared with other jobs", "past_tokens": args.past, "step_ms_median": medians,
              "rounds": got}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for name, value in medians.items():
        print(f"{name}: {value:.3f} ms per decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
