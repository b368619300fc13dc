"""One request's generation, run in a worker thread: the image, then the runtime's own steps
(Pipeline.prepare -> prefill -> decode_step, the loop Pipeline.generate runs, with the same sampler,
eos rule and incremental detokeniser), plus what a server needs between tokens: stop strings, the
cancel flag, text deltas and latency metrics.

Why the steps and not Pipeline.generate(stream=...): a generation ended by a stop string or a
cancel must still report what it did (usage, kept tokens, metrics), and generate() returns nothing
when its stream callback raises. tests/test_serve.py checks that the server's tokens equal
generate()'s for the same seed and ratio.

Events sent to the request's handler, in order: Started (the request passed every check), then
Delta pieces of text (streaming only), then one Done or Failed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from runtime.errors import EngineError, InputError
from runtime.output import Streamer, cap_new_tokens
from runtime.serve.images import ImageLimits, load_request_image
from runtime.serve.metrics import Metrics
from runtime.serve.protocol import APIError, ChatRequest, StopMatcher, usage_body
from runtime.serve.workers import Job
from runtime.steps import Request, step_timings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    usage: dict


@dataclass(frozen=True)
class Failed:
    error: APIError


# The final event of a cancelled job: its client is gone, or the server is stopping (then someone reads it).
CANCELLED = Failed(APIError(503, "the generation was cancelled (the server is shutting down)",
                            code="cancelled"))
INTERNAL = APIError(500, "internal error (the server's log has the details)", code="internal_error")


class Cancelled(Exception):
    """The client went away (Job.cancel)."""


class Generator:
    """Runs jobs whose payload is a ChatRequest on one pipeline (shared by the worker threads)."""

    def __init__(self, pipe, metrics: Metrics, limits: ImageLimits):
        self.pipe, self.metrics, self.limits = pipe, metrics, limits

    def __call__(self, job: Job):
        """The job's final event: Done, or Failed (CANCELLED when the job was cancelled)."""
        try:
            return self._run(job, job.payload)
        except Cancelled:
            return CANCELLED
        except APIError as exc:
            return Failed(exc)
        except InputError as exc:
            return Failed(APIError(400, str(exc), code="invalid_input"))
        except EngineError as exc:
            log.error("serve: engine error: %s", exc)
            return Failed(APIError(500, str(exc), code="engine_error"))
        except Exception:
            log.exception("serve: generation failed")
            return Failed(INTERNAL)

    def dropped(self, job: Job) -> Failed:
        """A job cancelled while it waited in the queue."""
        self.metrics.cancelled_early()
        return CANCELLED

    def _run(self, job: Job, req: ChatRequest):
        pipe, m = self.pipe, self.pipe.manifest
        t_start = time.perf_counter()
        image = load_request_image(req.image, self.limits) if req.image is not None else None
        # max_new_tokens=0 here and the cap below: a request without max_tokens fills the context
        # quietly, where prepare() would log a warning for every such request.
        p = pipe.prepare(Request(req.prompt, image, keep_ratio=req.keep_ratio, keep_tokens=req.keep_tokens,
                                 max_new_tokens=0, temperature=req.temperature, top_p=req.top_p,
                                 seed=req.seed, ignore_eos=req.ignore_eos))
        limit = m.max_context if req.max_tokens is None else req.max_tokens
        p = dataclasses.replace(p, max_new_tokens=cap_new_tokens(limit, len(p.ids), m.max_context))
        job.emit(Started(len(p.ids)))
        if job.cancelled:
            raise self._cancel(job)
        t_pre = time.perf_counter()
        state = pipe.prefill(p)
        t_prefill = time.perf_counter()
        tokens, reason, text = self._decode(job, req, p, state)
        t_end = time.perf_counter()
        timings = step_timings(p, state, tokens, pre_s=t_pre - t_start, decode_s=t_end - t_prefill,
                               total_s=t_end - t_start)
        self.metrics.generation(timings, t_end - job.arrival, cancelled=reason == "cancelled")
        if reason == "cancelled":
            return CANCELLED
        return Done(text, reason, usage_body(timings, p.ratio, req.keep_tokens))

    def _decode(self, job: Job, req: ChatRequest, p, state) -> tuple[list[int], str, str]:
        """Pipeline.generate's loop (Pipeline.tokens) plus stop strings and the cancel flag: (tokens,
        finish reason, text). Text deltas go out as they decode."""
        pipe = self.pipe
        stops = StopMatcher(req.stop)

        def sink(piece: str) -> None:
            out = stops.feed(piece)
            if out and req.stream:
                job.emit(Delta(out))

        streamer = Streamer(pipe.prompt.decode, sink)
        tokens: list[int] = []
        reason, last = None, None
        for tok in pipe.tokens(p, state):  # generate()'s sampler, eos rule and decode steps
            if job.cancelled:
                reason = "cancelled"
                break
            tokens.append(tok)
            last = self._token_time(job, last)
            streamer.push(tokens)
            if stops.stopped:
                reason = "stop"
                break
        reason = reason or state.finish
        if reason == "cancelled" or stops.stopped:
            return tokens, reason, stops.text
        text = pipe.prompt.decode(tokens)
        streamer.finish(text)
        tail = stops.flush()
        if tail and req.stream:
            job.emit(Delta(tail))
        return tokens, reason, stops.text if req.stop else text

    def _token_time(self, job: Job, last: float | None) -> float:
        t = time.perf_counter()
        if last is None:
            self.metrics.first_token(t - job.arrival)
        else:
            self.metrics.token_gap(t - last)
        return t

    def _cancel(self, job: Job) -> Cancelled:
        self.metrics.cancelled_early()
        return Cancelled()
