"""The server's metrics in Prometheus' text exposition format (version 0.0.4), written here rather
than with prometheus_client (one dependency less; the format is a few lines of text).

    dart_requests_total{code}                  chat-completion responses by HTTP status
    dart_requests_cancelled_total              generations stopped because the client went away
    dart_prompt_tokens_total                   unpruned prompt tokens
    dart_kept_tokens_total                     prompt tokens DART kept (what the decoder's layers >= K hold)
    dart_vision_tokens_total / dart_kept_vision_tokens_total
    dart_completion_tokens_total               generated tokens (cancelled generations included)
    dart_time_to_first_token_seconds           histogram: admission (body read and checked) -> first
                                               token: queueing, image decoding and prefill
    dart_time_per_output_token_seconds         histogram: the gap between consecutive tokens
    dart_request_duration_seconds              histogram: admission -> last token
    dart_kept_vision_token_ratio               histogram: kept / vision tokens of requests with an image
    dart_requests_running / dart_requests_waiting   gauges: generations running, requests queued
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (0.05, 0.1, 0.111, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = {}

    def inc(self, amount: float = 1.0, label: str = "") -> None:
        self.values[label] = self.values.get(label, 0.0) + amount

    def get(self, label: str = "") -> float:
        return self.values.get(label, 0.0)

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if self.label is None:
            return out + [f"{self.name} {_num(self.values.get('', 0.0))}"]
        return out + [f'{self.name}{{{self.label}="{k}"}} {_num(v)}' for k, v in sorted(self.values.items())]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float]):
        self.name, self.help, self.bounds = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip((*self.bounds, math.inf), self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {total}')
        return out + [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]


class Metrics:
    """Thread-safe: workers observe, the HTTP handlers count responses, /metrics renders."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]] | None = None):
        self.lock = threading.Lock()
        self.gauges = gauges or dict
        self.requests = Counter("dart_requests_total", "Chat-completion responses by HTTP status code.",
                                "code")
        self.cancelled = Counter("dart_requests_cancelled_total",
                                 "Generations stopped because the client disconnected.")
        self.prompt_tokens = Counter("dart_prompt_tokens_total", "Prompt tokens before pruning.")
        self.kept_tokens = Counter("dart_kept_tokens_total", "Prompt tokens kept by DART at layer K.")
        self.vision_tokens = Counter("dart_vision_tokens_total", "Vision tokens in prompts.")
        self.kept_vision_tokens = Counter("dart_kept_vision_tokens_total", "Vision tokens kept by DART.")
        self.completion_tokens = Counter("dart_completion_tokens_total",
                                         "Generated tokens (cancelled generations included).")
        self.ttft = Histogram("dart_time_to_first_token_seconds",
                              "Time from the request's admission to its first generated token.",
                              LATENCY_BUCKETS)
        self.tpot = Histogram("dart_time_per_output_token_seconds",
                              "Time between consecutive generated tokens.", TOKEN_BUCKETS)
        self.duration = Histogram("dart_request_duration_seconds",
                                  "Time from the request's admission to its last generated token.",
                                  LATENCY_BUCKETS)
        self.kept_ratio = Histogram("dart_kept_vision_token_ratio",
                                    "Kept / vision tokens of each request with an image.", RATIO_BUCKETS)

    def response(self, code: int) -> None:
        with self.lock:
            self.requests.inc(label=str(code))

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        with self.lock:
            self.tpot.observe(seconds)

    def generation(self, timings: dict, seconds: float, cancelled: bool = False) -> None:
        """One generation that ran (to the end, or until its client went away)."""
        with self.lock:
            self.prompt_tokens.inc(timings["prompt_tokens"])
            self.kept_tokens.inc(timings["kept_tokens"])
            self.vision_tokens.inc(timings["vision_tokens"])
            self.kept_vision_tokens.inc(timings["kept_vision_tokens"])
            self.completion_tokens.inc(timings["new_tokens"])
            self.duration.observe(seconds)
            if timings["vision_tokens"]:
                self.kept_ratio.observe(timings["kept_vision_tokens"] / timings["vision_tokens"])
            if cancelled:
                self.cancelled.inc()

    def cancelled_early(self) -> None:
        """A request whose client went away before its generation produced anything."""
        with self.lock:
            self.cancelled.inc()

    def render(self) -> str:
        with self.lock:
            lines = []
            for m in (self.requests, self.cancelled, self.prompt_tokens, self.kept_tokens, self.vision_tokens,
                      self.kept_vision_tokens, self.completion_tokens, self.ttft, self.tpot, self.duration,
                      self.kept_ratio):
                lines += m.lines()
        for name, (help_, value) in self.gauges().items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(lines) + "\n"
