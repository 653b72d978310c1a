"""`pipmm serve [BUNDLE]`: an OpenAI-compatible server on this machine (docs/server.md)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    parser.add_argument("--workers", type=int, default=1, help="Pipelines loaded, one request each at a time")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for a worker; beyond it 429 (default 16)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle's name)")
    parser.add_argument("--backend", default="auto", help="auto or onnxruntime")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    parser.add_argument("--media-dir", type=Path, default=None,
                        help="image_url may name files under this directory (default: data URLs only)")
    parser.add_argument("--allow-remote-images", action="store_true", help="image_url may be http(s)://")
    parser.add_argument("--remote-timeout", type=float, default=10.0, help="seconds to fetch a remote image")


def run(args) -> int:
    from .errors import PipmmError
    from .server import ServerConfig, serve

    if args.workers < 1 or args.max_queue < 0 or args.max_body_mb <= 0:
        raise PipmmError("--workers must be >= 1, --max-queue >= 0 and --max-body-mb > 0")
    if args.media_dir is not None and not args.media_dir.is_dir():
        raise PipmmError(f"--media-dir {args.media_dir} is not a directory: pass the folder images are read from")
    config = ServerConfig(bundle=args.bundle, host=args.host, port=args.port, workers=args.workers,
                          max_queue=args.max_queue, api_key=args.api_key, model_name=args.model_name,
                          backend=args.backend, device=args.device, max_body_bytes=int(args.max_body_mb * 1024 ** 2),
                          media_dir=args.media_dir, allow_remote_images=args.allow_remote_images,
                          remote_timeout_s=args.remote_timeout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean shutdown, as for Ctrl-C
    try:
        return serve(config)
    except OSError as err:  # the port is taken, the address is not this machine's
        raise PipmmError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}): choose another "
                         "--port or --host") from None
