"""POST /v1/explain (an extension, docs/server.md): the chat body's image and last user text -> where the vision
encoder looked (sdk/explain.py): {"object": "explanation", "rows", "cols", "grid", "kept", "png"} with the
overlay PNG as a data: URL. Takes a worker like a chat request (429 when the queue is full)."""

from __future__ import annotations

import base64

from .parsing import parse_chat


def explain_request(handler) -> None:
    service = handler.service
    pool = service.ready()
    request = parse_chat(handler.read_json(), service.config, pool.first.num_visual_tokens)
    with pool.acquire() as pipeline:
        explanation = pipeline.explain(request.image, request.prompt)
    png = "data:image/png;base64," + base64.b64encode(explanation.png_bytes).decode()
    handler.send_json(200, {"object": "explanation", "model": service.config.served_model,
                            **explanation.to_dict(), "png": png})
    service.metrics.add("pipmm_explain_requests_total")
