"""A pool of N Pipelines (each serves one request at a time) behind a bounded queue.

    acquire() -> a free Pipeline at once, or a wait in the queue, or QueueFull when max_queue already wait.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ApiError


class QueueFull(ApiError):
    def __init__(self, workers: int, max_queue: int):
        super().__init__(429, f"the server is busy ({workers} worker(s) busy, {max_queue} request(s) queued): "
                              "retry later", "rate_limit_error", code="queue_full")


class PipelinePool:
    def __init__(self, load, workers: int, max_queue: int, progress=None):
        """load() -> one Pipeline (called `workers` times); progress(i, n) after each."""
        self.workers, self.max_queue = workers, max_queue
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.waiting = 0
        self.busy = 0
        self.first = None
        for i in range(workers):
            pipeline = load()
            self.first = self.first or pipeline
            self.free.put(pipeline)
            if progress:
                progress(i + 1, workers)

    @contextmanager
    def acquire(self) -> Iterator:
        with self.lock:
            if self.busy + self.waiting >= self.workers + self.max_queue:
                raise QueueFull(self.workers, self.max_queue)
            self.waiting += 1
        pipeline = self.free.get()
        with self.lock:
            self.waiting -= 1
            self.busy += 1
        try:
            yield pipeline
        finally:
            with self.lock:
                self.busy -= 1
            self.free.put(pipeline)

    def depth(self) -> tuple[int, int]:
        """(requests waiting for a worker, workers busy)."""
        with self.lock:
            return self.waiting, self.busy
