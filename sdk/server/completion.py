"""One chat completion on one Pipeline: text pieces (stop strings applied) and, at the end, an Outcome
with the usage and llama.cpp-style timings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..conversation import Conversation
from ..pipeline import Result
from .parsing import ChatRequest

# Result.finish_reason -> OpenAI's
FINISH_REASONS = {"eos": "stop", "length": "length", "context": "length"}


@dataclass
class Outcome:
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)
    referring: dict | None = None  # a region's request: method, region, steps, energy per step (sdk/referring.py)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopScanner:
    """Cuts the text at the first stop string. Holds back a tail that could be the start of one, so a stop
    string split over several tokens is still found and never shown."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text that is safe to emit, whether a stop string was reached)."""
        self.buffer += piece
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            emit, self.buffer = self.buffer[:min(found)], ""
            return emit, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        emit, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return emit, False

    def flush(self) -> str:
        emit, self.buffer = self.buffer, ""
        return emit


def pieces(pipeline, request: ChatRequest, outcome: Outcome) -> Iterator[str]:
    """Text pieces of the answer; `outcome` is complete once this generator is exhausted or closed."""
    result = pipeline.new_result()
    conversation = None
    if request.turns is None:
        count = len(request.image) if isinstance(request.image, list) else 1  # frames (sdk/frames.py)
        ids, _ = pipeline.frames.prompt_ids(pipeline.prompter, request.prompt, count)  # a bad prompt fails here
        outcome.prompt_tokens = len(ids)
        stream = pipeline.stream(request.image, request.prompt, result=result, **request.options)
    else:
        conversation = Conversation.from_messages(pipeline, request.turns)
        options = {k: v for k, v in request.options.items() if k != "inhibit"}
        stream = conversation.reply_stream(result=result, **options)
    scanner = StopScanner(request.stop)
    first = last = None
    try:
        for piece in stream:
            last = time.perf_counter()
            first = first or last
            text, stopped = scanner.feed(piece)
            if text:
                yield text
            if stopped:
                outcome.finish_reason = "stop"
                return
        if tail := scanner.flush():
            yield tail
        outcome.finish_reason = FINISH_REASONS[result.finish_reason]
    finally:
        stream.close()  # frees the Pipeline when the client went away or a stop string ended it
        if conversation is not None:  # the whole rendered conversation is the prompt
            outcome.prompt_tokens = result.cached_tokens + conversation.prefilled
        outcome.completion_tokens = len(result.token_ids)
        outcome.timings = llama_timings(result, outcome.prompt_tokens, (last - first) * 1000 if first else 0.0)
        outcome.referring = result.referring


def llama_timings(result: Result, prompt_n: int, measured_decode_ms: float) -> dict:
    """llama.cpp server's `timings` keys, plus vision_ms, visual_tokens and ttft_ms.

    prompt_ms is everything before the first token (preprocessing, prompt encoder, vision, prefill);
    predicted_ms the decode steps after the first token (Result.timings' decode_ms; measured here when the
    answer was cut by a stop string or a disconnect, which ends generation before the SDK's own totals)."""
    t = result.timings
    prompt_ms = sum(t.get(k, 0.0) for k in ("preprocess_ms", "prompt_ms", "vision_ms", "prefill_ms"))
    predicted_n = len(result.token_ids)
    if "decode_ms" in t:
        predicted_ms, per_token_ms, per_second = t["decode_ms"], t["decode_ms_per_token"], t["tokens_per_s"]
    else:
        steps = max(predicted_n - 1, 0)
        predicted_ms = measured_decode_ms
        per_token_ms = predicted_ms / steps if steps else 0.0
        per_second = steps / (predicted_ms / 1000) if steps and predicted_ms > 0 else 0.0
    return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / (prompt_ms / 1000) if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per_token_ms, "predicted_per_second": per_second,
            "vision_ms": t.get("vision_ms", 0.0), "visual_tokens": result.visual_tokens,
            "ttft_ms": t.get("ttft_ms", 0.0)}
