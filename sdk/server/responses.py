"""The OpenAI object shapes: chat.completion, chat.completion.chunk, the model list."""

from __future__ import annotations

import time
import uuid

from .completion import Outcome


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, outcome: Outcome) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage, "timings": outcome.timings, **referring(outcome)}


def referring(outcome: Outcome) -> dict:
    """The `referring` extension of a region's answer (docs/server.md), or nothing."""
    return {} if outcome.referring is None else {"referring": outcome.referring}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def usage_chunk(cid: str, model: str, outcome: Outcome) -> dict:
    """stream_options.include_usage: the last chunk before [DONE], with no choices."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": outcome.usage}


def model_list(model: str, created: int, pipeline) -> dict:
    manifest = pipeline.manifest
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "pipmm-edge",
        "input_modalities": ["text", "image"], "output_modalities": ["text"],
        "meta": {"visual_tokens": pipeline.num_visual_tokens, "max_context": pipeline.max_context,
                 "reducer": manifest.visual_tokens.reducer, "pipmm": manifest.pipmm,
                 "inhibit": pipeline.cmai is not None, "referring": referring_methods(pipeline)}}]}


def referring_methods(pipeline) -> list[str]:
    """The referring methods a region may ask for on this bundle (overlay always; ControlMLLM's with energy_grad)."""
    settings = pipeline.manifest.referring
    graph = settings is not None and settings.graph in pipeline.manifest.graphs
    return (list(settings.variants) if graph else []) + ["overlay"]
