"""`pipmm serve`: an OpenAI-compatible HTTP server over a pool of Pipelines (standard library only).

    config.py      ServerConfig (the options)
    app.py         the HTTP server, routes, auth, one log line per request
    chat.py        POST /v1/chat/completions, whole or streamed (server-sent events)
    parsing.py     request body -> ChatRequest;  images.py  image_url -> PIL image
    completion.py  one answer on one Pipeline: stop strings, usage, llama.cpp timings
    pool.py        N Pipelines behind a bounded queue (429 when full)
    metrics.py     Prometheus text;  responses.py  OpenAI object shapes;  page.html  the page at /
"""

from __future__ import annotations

import sys
import threading

from .app import Service, make_server
from .config import ServerConfig
from .pool import PipelinePool


def serve(config: ServerConfig) -> int:
    """Listen at once (GET /health answers 503 while loading), load the workers, serve until interrupted."""
    from .. import load

    service = Service(config)
    server = make_server(service)
    host, port = server.server_address[:2]
    print(f"pipmm serve: listening on http://{host}:{port} (model {config.served_model!r}, loading "
          f"{config.workers} worker(s))", file=sys.stderr, flush=True)
    thread = threading.Thread(target=server.serve_forever, name="pipmm-serve", daemon=True)
    thread.start()
    try:
        service.pool = PipelinePool(lambda: load(config.bundle, backend=config.backend, device=config.device),
                                    config.workers, config.max_queue, progress=loaded)
        print(f"pipmm serve: ready at http://{host}:{port}/ (OpenAI base_url http://{host}:{port}/v1)",
              file=sys.stderr, flush=True)
        thread.join()
    finally:
        server.shutdown()
        server.server_close()
    return 0


def loaded(done: int, total: int) -> None:
    print(f"pipmm serve: loaded worker {done}/{total}", file=sys.stderr, flush=True)


__all__ = ["serve", "ServerConfig"]
