"""Seconds to export energy_grad (export/onnx_graphs.py export_energy_grad) at Qwen2-0.5B widths, by depth.

    OMP_NUM_THREADS=1 python scripts/energy_export_time.py --layers 2 4 8 24 [--json OUT.json]

A random Qwen2 text model with the edge-0.5b preset's widths (896 wide, 4864 MLP, 14 heads over 2 KV heads) and a
1024-token vocabulary (the embedding is not in the graph), L layers, energy read at every layer (the graph's
cut: all of them). Prints the export time (trace, ONNX, save and check) and the graph's file size per depth, then
one ONNX Runtime CPU call at T = 160 (the first, with its session build, and the median of three after it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def measure(layers: int, seq: int) -> dict:
    import onnxruntime
    from transformers import Qwen2Config, Qwen2Model

    from export import onnx_graphs
    from export.model.energy import EnergyGradGraph

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    graph = EnergyGradGraph(Qwen2Model(cfg).eval(), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "energy_grad.onnx"
        start = time.perf_counter()
        onnx_graphs.export_energy_grad(graph, path, {})
        export_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {"inputs_embeds": rng.normal(0, 1, (1, seq, 896)).astype(np.float32),
                 "position_ids": np.arange(seq, dtype=np.int64)[None],
                 "mask": (rng.uniform(size=seq) > 0.5).astype(np.float32),
                 "image_weight": np.r_[np.zeros(4), np.ones(seq - 24), np.zeros(20)].astype(np.float32),
                 "query_weights": np.r_[np.zeros(seq - 20), np.full(20, 1 / 20)].astype(np.float32),
                 "layer_weights": np.full(layers, 1 / layers, np.float32)}
        times = []
        for _ in range(4):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
    return {"layers": layers, "export_s": round(export_s, 1), "file_mb": round(size / 1e6, 1),
            "first_call_ms": round(1e3 * times[0]), "call_ms": round(1e3 * float(np.median(times[1:]))), "seq": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 24])
    parser.add_argument("--seq", type=int, default=160, help="tokens of the timed call")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        rows.append(measure(layers, args.seq))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
