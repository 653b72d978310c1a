"""What a decode step of the 7B model is made of, measured piece by piece on the GPU (docs/gpu.md, "where the time goes").

    python scripts/gpu_microbench.py --out micro.json [--decoder-static TINY_BUNDLE/decoder_static.onnx]

1. FP16 GEMV (batch 1) at the Llama-7B shapes through ONNX Runtime CUDA, inside a captured CUDA graph, for the
   weight layouts an exporter may produce: MatMul(x, W[K,N]) (what torch.onnx writes after folding the transpose)
   and Gemm(x, W[N,K], transB=1) (PyTorch's own layout); torch's F.linear under a CUDA graph as a reference.
   Eight different weights per graph, each larger than L2, so every run streams them from memory.
2. The cost of one small node inside a captured graph and outside it: 1000 chained Adds on a [1,4096] tensor.
3. The number of nodes a decoder layer has after ONNX Runtime's optimizations on the CUDA EP (a tiny
   decoder_static graph, whatever its width: the node count per layer does not depend on it).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"q/k/v/o_proj": (4096, 4096, 4), "gate/up_proj": (4096, 11008, 2), "down_proj": (11008, 4096, 1),
          "lm_head": (4096, 32064, 0)}  # (K, N, per layer)
COPIES = 8


def session(model: onnx.ModelProto, graph: bool, optimized: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    cuda = {"device_id": "0", "enable_cuda_graph": "1" if graph else "0", "use_tf32": "0"}
    path = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False).name
    onnx.save(model, path, save_as_external_data=True, location=Path(path).name + ".data")
    return ort.InferenceSession(path, options, providers=[("CUDAExecutionProvider", cuda)])


def timed(sess, feeds: dict, outputs: list, repeats: int = 50) -> float:
    """Median seconds of one run_with_iobinding with device inputs/outputs (the graph replays after warm-up)."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for name, shape, dtype in outputs:
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", 0))
    for _ in range(5):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gemv_graph(k: int, n: int, layout: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(COPIES):
        if layout == "matmul":
            w = rng.standard_normal((k, n), np.float32).astype(np.float16) * np.float16(0.02)
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        else:
            w = rng.standard_normal((n, k), np.float32).astype(np.float16) * np.float16(0.02)
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, [1, n]))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, k])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def chain_graph(length: int = 1000) -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "c"], [f"t{i}" if i < length - 1 else "y"])
             for i in range(length)]
    c = numpy_helper.from_array(np.full((1, 4096), 1e-3, np.float16), "c")
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4096])], [c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def torch_gemv(k: int, n: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(COPIES)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            [torch.nn.functional.linear(x, w) for w in ws]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [torch.nn.functional.linear(x, w) for w in ws]  # kept alive while the graph replays
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 50 / COPIES
    del ws, outputs
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--decoder-static", default=None)
    parser.add_argument("--layers", type=int, default=2, help="layers of the --decoder-static graph")
    args = parser.parse_args()
    report = {"gemv": {}, "copies_per_graph": COPIES}
    empty = timed(session(chain_graph(1), True), {"x": np.zeros((1, 4096), np.float16)}, [("y", (1, 4096), np.float16)])
    report["run_overhead_s"] = empty  # one run_with_iobinding of a one-node graph: launch + sync
    for name, (k, n, per_layer) in SHAPES.items():
        row = {"K": k, "N": n, "per_layer": per_layer, "bytes": k * n * 2}
        for layout in ("matmul", "gemm_transB"):
            sess = session(gemv_graph(k, n, "matmul" if layout == "matmul" else "gemm"), True)
            t = timed(sess, {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float16)},
                      [(f"y{i}", (1, n), np.float16) for i in range(COPIES)])
            per = (t - empty) / COPIES
            row[layout] = {"seconds": per, "gb_per_s": k * n * 2 / per / 1e9}
            del sess
        per = torch_gemv(k, n)
        row["torch_linear_cuda_graph"] = {"seconds": per, "gb_per_s": k * n * 2 / per / 1e9} if per else None
        report["gemv"][name] = row
        print(name, json.dumps(row), flush=True)
    for graph in (True, False):
        t = timed(session(chain_graph(1000), graph), {"x": np.zeros((1, 4096), np.float16)}, [("y", (1, 4096), np.float16)])
        report[f"small_node_s_{'graph' if graph else 'eager'}"] = (t - empty) / 999
    print("small node:", report["small_node_s_graph"], "(graph)", report["small_node_s_eager"], "(eager)", flush=True)
    if args.decoder_static:
        with tempfile.TemporaryDirectory() as tmp:
            optimized = str(Path(tmp) / "optimized.onnx")
            session(onnx.load(args.decoder_static), False, optimized)
            model = onnx.load(optimized, load_external_data=False)
            counts = collections.Counter(n.op_type for n in model.graph.node)
            per_layer = sum(counts.values()) / args.layers
            report["optimized_decoder"] = {"nodes": sum(counts.values()), "layers": args.layers,
                                           "nodes_per_layer_about": per_layer, "op_types": dict(counts.most_common())}
            print("optimized decoder_static:", json.dumps(report["optimized_decoder"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
