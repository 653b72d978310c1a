"""`pipmm build-engines BUNDLE`: TensorRT engines of a bundle for this GPU and TensorRT version (runtimes/tensorrt.py)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"],
                        help="TensorRT builder precision (int8 needs an int8 QDQ bundle)")
    parser.add_argument("--cache-dir", default=None,
                        help="engine cache root (default $PIPMM_ENGINE_CACHE or ~/.cache/pipmm/engines)")
    parser.add_argument("--rebuild", action="store_true", help="build even if up-to-date engines exist")
    parser.add_argument("--max-batch", type=int, default=1, help="largest batch of the profiles (default 1)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="longest sequence of the profiles (default: the model's context)")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (default 4 GB)")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device (default 0)")


def run(args) -> int:
    from runtimes.tensorrt import build_engines

    build_engines(args.bundle, precision=args.precision, root=args.cache_dir, rebuild=args.rebuild,
                  max_batch=args.max_batch, max_context=args.max_context, workspace_gb=args.workspace_gb,
                  device_id=args.device_id)
    return 0
