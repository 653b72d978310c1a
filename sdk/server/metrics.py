"""Counters and latency histograms, rendered in Prometheus' text exposition format (GET /metrics)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


# name -> (type, help)
METRICS: dict[str, tuple[str, str]] = {
    "pipmm_requests_total": ("counter", "HTTP requests answered, by path and status"),
    "pipmm_prompt_tokens_total": ("counter", "prompt tokens of answered completions (image slots included)"),
    "pipmm_completion_tokens_total": ("counter", "generated tokens of answered completions"),
    "pipmm_explain_requests_total": ("counter", "POST /v1/explain answers (the page's overlay)"),
    "pipmm_stream_disconnects_total": ("counter", "streams whose client went away before the end (worker freed)"),
    "pipmm_queue_depth": ("gauge", "requests waiting for a worker"),
    "pipmm_workers_busy": ("gauge", "workers serving a request"),
    "pipmm_workers": ("gauge", "workers (Pipelines) loaded"),
    "pipmm_request_duration_seconds": ("histogram", "chat completion latency, request to last byte"),
    "pipmm_time_to_first_token_seconds": ("histogram", "chat completion latency to the first generated token"),
}


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.counters: dict[str, float] = defaultdict(float)
        self.histograms = {name: Histogram() for name, (kind, _) in METRICS.items() if kind == "histogram"}

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] += 1

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.histograms[name].observe(seconds)

    def render(self, gauges: dict[str, float]) -> str:
        """The text format; `gauges` are read by the caller at scrape time."""
        lines = []
        with self.lock:
            for name, (kind, help_text) in METRICS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if name == "pipmm_requests_total":
                    lines += [f'{name}{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
                elif kind == "histogram":
                    lines += self.histograms[name].lines(name)
                elif kind == "gauge":
                    lines.append(f"{name} {gauges.get(name, 0):g}")
                else:
                    lines.append(f"{name} {self.counters[name]:g}")
        return "\n".join(lines) + "\n"
