"""POST /v1/chat/completions: parse, take a worker (or 429), answer whole or as server-sent events."""

from __future__ import annotations

import time

from ..errors import PipmmError
from .completion import Outcome, pieces
from .errors import CLIENT_GONE, from_sdk
from .parsing import parse_chat
from .responses import chunk, completion, completion_id, referring, usage_chunk



def chat_completions(handler) -> None:
    service = handler.service
    pool = service.ready()
    start = time.perf_counter()
    body = handler.read_json()
    request = parse_chat(body, service.config, pool.first.num_visual_tokens, pool.first.frames)  # images decoded here
    model = service.config.served_model
    outcome = Outcome()
    with pool.acquire() as pipeline:
        answer = pieces(pipeline, request, outcome)
        if request.stream:
            stream_answer(handler, answer, request, outcome, model)
        else:
            text = "".join(answer)
            handler.send_json(200, completion(completion_id(), model, text, outcome))
    record(service.metrics, outcome, time.perf_counter() - start)


def stream_answer(handler, answer, request, outcome: Outcome, model: str) -> None:
    """Errors before the first piece are plain JSON errors (the caller sends them); after it, an error event."""
    first = next(answer, None)  # preprocessing, prompt encoder, vision and prefill run here
    cid = completion_id()
    handler.start_events()
    try:
        handler.send_event(chunk(cid, model, {"role": "assistant", "content": ""}))
        if first is not None:
            handler.send_event(chunk(cid, model, {"content": first}))
            for piece in answer:
                handler.send_event(chunk(cid, model, {"content": piece}))
        handler.send_event(chunk(cid, model, {}, outcome.finish_reason, timings=outcome.timings, **referring(outcome)))
        if request.include_usage:
            handler.send_event(usage_chunk(cid, model, outcome))
        handler.send_event("[DONE]")
        handler.end_events()
    except CLIENT_GONE:
        answer.close()  # generation stops and the worker is free for the next request
        handler.service.metrics.add("pipmm_stream_disconnects_total")
        handler.close_connection = True
        handler.error = "client disconnected mid-stream"
    except PipmmError as err:
        answer.close()
        api_error = from_sdk(err)
        handler.error = api_error.message
        handler.send_event(api_error.body())
        handler.send_event("[DONE]")
        handler.end_events()


def record(metrics, outcome: Outcome, seconds: float) -> None:
    metrics.add("pipmm_prompt_tokens_total", outcome.prompt_tokens)
    metrics.add("pipmm_completion_tokens_total", outcome.completion_tokens)
    metrics.observe("pipmm_request_duration_seconds", seconds)
    if outcome.timings.get("ttft_ms"):
        metrics.observe("pipmm_time_to_first_token_seconds", outcome.timings["ttft_ms"] / 1000)
