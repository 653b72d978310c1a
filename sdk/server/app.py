"""The HTTP server (standard library: ThreadingHTTPServer, one thread per connection, HTTP/1.1 keep-alive).

Routes are a registry of (method, path) -> handler; every response is JSON but the page at / and
/metrics; every refusal is an OpenAI-style error body with one log line, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import PipmmError, one_line
from .chat import chat_completions
from .config import ServerConfig
from .errors import CLIENT_GONE, ApiError, from_sdk
from .explain import explain_request
from .metrics import Metrics
from .responses import model_list

PAGE = Path(__file__).with_name("page.html")
DISCARD_LIMIT = 256 * 1024 * 1024  # bytes of a refused body read and dropped (never held)
PUBLIC = {"/", "/health"}  # answered without the API key (the page asks for it itself)


class Service:
    """What every connection's handler shares: settings, the pool (None while loading), metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.pool = None
        self.metrics = Metrics()
        self.started = int(time.time())

    def gauges(self) -> dict[str, float]:
        waiting, busy = self.pool.depth() if self.pool else (0, 0)
        return {"pipmm_queue_depth": waiting, "pipmm_workers_busy": busy,
                "pipmm_workers": self.pool.workers if self.pool else 0}

    def ready(self):
        if self.pool is None:
            raise ApiError(503, "the model is still loading: retry when GET /health answers 200", "server_error",
                           code="loading")
        return self.pool


def health(handler: "Handler") -> None:
    if handler.service.pool is None:
        handler.send_json(503, {"status": "loading"})
    else:
        handler.send_json(200, {"status": "ok"})


def models(handler: "Handler") -> None:
    pool = handler.service.ready()
    handler.send_json(200, model_list(handler.service.config.served_model, handler.service.started, pool.first))


def metrics(handler: "Handler") -> None:
    service = handler.service
    handler.send_bytes(200, service.metrics.render(service.gauges()).encode(), "text/plain; version=0.0.4")


def page(handler: "Handler") -> None:
    handler.send_bytes(200, PAGE.read_bytes(), "text/html; charset=utf-8")


ROUTES = {
    ("GET", "/health"): health,
    ("GET", "/v1/models"): models,
    ("GET", "/metrics"): metrics,
    ("GET", "/"): page,
    ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/explain"): explain_request,
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pipmm-serve"
    timeout = 120  # seconds a connection may sit idle, or a write wait for a client that reads nothing
    service: Service  # set on the subclass make_server builds

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        start = time.perf_counter()
        path = self.path.split("?", 1)[0]
        route = ROUTES.get((method, path))
        self.status, self.error = 0, ""
        try:
            if route is None:
                known = any(p == path for _, p in ROUTES)
                raise ApiError(405 if known else 404, f"{method} {path} is not an endpoint here "
                               "(POST /v1/chat/completions, GET /v1/models, /health, /metrics, /)",
                               code="method_not_allowed" if known else "not_found")
            if path not in PUBLIC:
                self.check_key()
            route(self)
        except ApiError as err:
            self.send_error_body(err)
        except PipmmError as err:
            self.send_error_body(from_sdk(err))
        except CLIENT_GONE:
            self.close_connection = True
            self.status = self.status or 499
        except Exception as err:  # a bug of ours: one line, a 500, and the server keeps serving
            self.close_connection = True
            self.send_error_body(ApiError(500, f"internal error ({one_line(err)}): report it with the request",
                                          "server_error", code="internal_error"))
        label = path if route is not None else "other"
        self.service.metrics.request(label, self.status)
        self.log_line(method, path, (time.perf_counter() - start) * 1000)

    def check_key(self) -> None:
        key = self.service.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the --api-key the "
                                "server was started with", code="invalid_api_key")

    def read_json(self):
        length = self.headers.get("Content-Length")
        limit = self.service.config.max_body_bytes
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header", code="length_required")
        if int(length) > limit:
            self.discard_body(int(length))
            raise ApiError(413, f"the request body has {length} bytes, above this server's limit of {limit} "
                                "(--max-body-mb): send a smaller image", code="body_too_large")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None

    def discard_body(self, length: int) -> None:
        """Read a refused body in small pieces, so the client reads the 413 instead of a broken pipe; one too
        large even for that stays unread and the connection closes."""
        if length > DISCARD_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            block = self.rfile.read(min(length, 1 << 16))
            if not block:
                break
            length -= len(block)

    # -- writing ---------------------------------------------------------------------------------

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, body: dict) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json")

    def send_error_body(self, err: ApiError) -> None:
        self.error = err.message
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        if self.status:  # headers already sent (a stream): nothing more can be said in HTTP
            return
        self.send_bytes(err.status, json.dumps(err.body()).encode(), "application/json", headers)

    def start_events(self) -> None:
        """Server-sent events over chunked transfer encoding (the connection stays usable afterwards)."""
        self.status = 200
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                            ("Transfer-Encoding", "chunked")):
            self.send_header(name, value)
        self.end_headers()

    def send_event(self, data: dict | str) -> None:
        payload = ("data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- logging: one line per request -----------------------------------------------------------

    def log_request(self, code="-", size="-"):  # BaseHTTPRequestHandler's own line: replaced by log_line
        pass

    def log_line(self, method: str, path: str, ms: float) -> None:
        error = f" error: {self.error}" if self.error else ""
        print(f"pipmm serve: {self.client_address[0]} {method} {path} {self.status} {ms:.1f} ms{error}",
              file=sys.stderr, flush=True)

    def log_message(self, format, *args):  # malformed request lines etc.: one line, same prefix
        print(f"pipmm serve: {self.client_address[0]} {format % args}", file=sys.stderr, flush=True)


def make_server(service: Service) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((service.config.host, service.config.port), handler)
    server.daemon_threads = True
    return server
