"""A fixed number of worker threads and a bounded queue in front of them.

Concurrency model: `workers` threads each run one generation at a time, all on ONE shared pipeline
(ONNX Runtime sessions take concurrent runs and release the GIL while a graph runs; each generation
has its own KV binding and sampler). At most `workers + queue_size` requests are admitted at once:
the running ones plus `queue_size` waiting in arrival order; one more is refused at once (QueueFull
-> HTTP 429), so a burst never piles up unbounded memory or latency. A request's slot is freed
before its last event is sent, so a client that sends its next request as soon as it has read an
answer is never refused by its own previous request.

Cancellation: Job.cancel() sets a flag; a queued job is dropped when a worker takes it, a running
one stops at its next token (the job's function checks `job.cancelled`). There is no batching
across requests: each generation runs alone on its worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every worker is busy and the queue holds queue_size requests already."""


class ShuttingDown(Exception):
    """The pool is stopping and takes no more requests."""


class Job:
    """One request's generation. `emit(event)` delivers events to whoever waits (thread-safe, never
    raises); `run(job)` does the work in a worker thread and returns the final event (None: none),
    which the pool emits after freeing the job's slot."""

    def __init__(self, run: Callable[[Job], Any], emit: Callable[[Any], None], payload: Any = None):
        self.run_fn, self.emit, self.payload = run, emit, payload
        self.arrival = time.perf_counter()
        self._cancel = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop this job: dropped if still queued, stopped at its next token if running; no effect
        once it has finished."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class WorkerPool:
    def __init__(self, workers: int, queue_size: int, name: str = "dart-serve",
                 on_dropped: Callable[[Job], Any] | None = None):
        """on_dropped(job): called instead of the job's function for a job cancelled while it
        waited; its return value is emitted as the job's final event (None: nothing)."""
        if workers < 1 or queue_size < 0:
            raise ValueError(f"workers must be >= 1 and queue_size >= 0, got {workers}, {queue_size}")
        self.workers, self.queue_size = workers, queue_size
        self.on_dropped = on_dropped or (lambda job: None)
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._active: set[Job] = set()
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._admitted - self._running

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull (all slots taken) / ShuttingDown."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown()
            if self._admitted >= self.workers + self.queue_size:
                raise QueueFull()
            self._admitted += 1
            self._active.add(job)
        self._queue.put(job)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._running += 1
            final = None
            try:
                final = self.on_dropped(job) if job.cancelled else job.run_fn(job)
            except BaseException:  # the job's function handles its errors; this is a bug: keep serving
                log.exception("worker: a job failed outside its own error handling")
            finally:
                with self._lock:
                    self._running -= 1
                    self._admitted -= 1
                    self._active.discard(job)
                job.done.set()
            if final is not None:
                job.emit(final)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new jobs, cancel queued and running ones, and wait up to `timeout` s for the threads
        (a graph already running finishes its run first)."""
        with self._lock:
            self._stopping = True
            for job in self._active:
                job.cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("serve: workers %s still running after %.1f s; left to finish as daemon threads",
                        alive, timeout)
