"""The OpenAI-compatible HTTP app (FastAPI) over one engine directory. Imports FastAPI (the `serve`
extra): runtime.serve's other modules and `python -m runtime.serve --help` do not.

    app = create_app(ServeConfig(engine_dir=Path("engines/llava-tiny")))   # uvicorn.run(app, ...)

Routes: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text). What a request may hold:
runtime/serve/protocol.py; how requests are queued and run: runtime/serve/workers.py.

Every error is OpenAI's error JSON with its status, never a traceback: 400 a bad request (JSON,
fields, base64, image, content part, too many images, prompt too long for the engine), 404 another
model or path, 413 a body over max_body_bytes, 429 the queue is full (Retry-After: 1), 500 the
engine failed (its one-line message) or a bug ("internal error", logged with its traceback here),
503 shutting down. An error after a stream has begun is sent as a last `data: {"error": ...}` event.
A client that disconnects stops its generation at the next token (streaming: when an event cannot
be sent; otherwise the handler polls the connection every POLL_S seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime.errors import InputError
from runtime.serve import protocol as P
from runtime.serve.config import ServeConfig, config_problem
from runtime.serve.generation import INTERNAL, Delta, Done, Failed, Generator
from runtime.serve.images import ImageLimits
from runtime.serve.metrics import CONTENT_TYPE, Metrics
from runtime.serve.workers import Job, QueueFull, ShuttingDown, WorkerPool

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting non-streaming handler checks that its client is still there
CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never received


class ClientGone(Exception):
    pass


class Server:
    """What the routes share: the config, the pipeline's workers, the metrics."""

    def __init__(self, cfg: ServeConfig, pipeline):
        self.cfg, self.name, self.created = cfg, cfg.served_name, P.now()
        self.limits = P.Limits(cfg.allow_local_files, cfg.allow_remote_urls)
        self.metrics = Metrics(self._gauges)
        limits = ImageLimits(cfg.max_image_bytes, cfg.url_timeout_s)
        self.generator = Generator(pipeline, self.metrics, limits)
        self.pool = WorkerPool(cfg.workers, cfg.queue_size, on_dropped=self.generator.dropped)

    def _gauges(self) -> dict[str, tuple[str, float]]:
        return {"dart_requests_running": ("Generations running now.", self.pool.running),
                "dart_requests_waiting": ("Requests waiting in the queue.", self.pool.waiting)}

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "pid": os.getpid(), "workers": self.cfg.workers,
                "queue_size": self.cfg.queue_size, "running": self.pool.running, "waiting": self.pool.waiting}

    # --- chat completions ----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        raw = await read_body(request, self.cfg.max_body_bytes)
        req = P.parse_chat_request(P.parse_json(raw), self.name, self.limits)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(self.generator, _emitter(loop, events), req)
        try:
            self.pool.submit(job)
        except QueueFull:
            raise P.APIError(429, f"the server is busy ({self.cfg.workers} running, {self.cfg.queue_size} "
                                  "waiting): retry later", code="queue_full") from None
        except ShuttingDown:
            raise P.APIError(503, "the server is shutting down", code="shutting_down") from None
        try:
            first = await _next(events, request)
            if isinstance(first, Failed):
                raise first.error
            rid, created = P.new_id(), P.now()
            if req.stream:
                stream = JobStream(self._sse(req, events, rid, created), job)
                job = None  # the stream owns it now
                return stream
            while not isinstance(ev := await _next(events, request), (Done, Failed)):
                pass
            if isinstance(ev, Failed):
                raise ev.error
            body = P.completion_body(rid, created, self.name, ev.text, ev.finish_reason, ev.usage)
            return JSONResponse(body)
        finally:
            if job is not None:
                job.cancel()  # the client is gone, or an error: no effect on a finished job

    async def _sse(self, req: P.ChatRequest, events: asyncio.Queue, rid: str, created: int):
        """The chat.completion.chunk events of one generation, then [DONE]."""
        usage = req.include_usage
        role = {"role": "assistant", "content": ""}
        yield P.sse(P.chunk_body(rid, created, self.name, role, with_usage=usage))
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                yield P.sse(P.chunk_body(rid, created, self.name, {"content": ev.text}, with_usage=usage))
            elif isinstance(ev, Done):
                yield P.sse(P.chunk_body(rid, created, self.name, {}, ev.finish_reason, with_usage=usage))
                if usage:
                    yield P.sse(P.usage_chunk(rid, created, self.name, ev.usage))
                break
            elif isinstance(ev, Failed):
                yield P.sse(ev.error.body())
                break
        yield P.SSE_DONE


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    def emit(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits
            pass

    return emit


async def _next(events: asyncio.Queue, request):
    """The next event; ClientGone when the client disconnects first."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None


async def read_body(request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over `limit` bytes."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise _too_large(int(size), limit)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _too_large(n, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(n: int, limit: int) -> P.APIError:
    return P.APIError(413, f"the request body is over this server's limit of {limit} bytes ({n}+ bytes); "
                           "send a smaller image (or start the server with a larger --max-body-mib)",
                      code="request_too_large")


class JobStream(StreamingResponse):
    """A server-sent-event stream that cancels its job however it ends (a client that goes away
    before or during the stream, an error while sending)."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


# --- the app -----------------------------------------------------------------------------------------


def create_app(cfg: ServeConfig, pipeline=None):
    """The FastAPI app serving `cfg.engine_dir` (loaded with runtime.load unless `pipeline` is given).
    Its worker threads start now and stop at the app's shutdown (lifespan). InputError for a bad
    config, EngineError for a bad engine directory."""
    problem = config_problem(cfg)
    if problem:
        raise InputError(problem)
    if pipeline is None:
        import runtime

        t0 = time.perf_counter()
        pipeline = runtime.load(cfg.engine_dir, providers=[cfg.provider], threads=cfg.threads)
        log.info("serve: loaded %s in %.1f s", cfg.engine_dir, time.perf_counter() - t0)
    server = Server(cfg, pipeline)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.pool.shutdown)

    app = FastAPI(title="DART-VLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def error(exc: P.APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            response = await server.chat(request)
        except P.APIError as exc:
            response = error(exc)
        except ClientGone:
            response = Response(status_code=CLIENT_GONE)
        except Exception:
            log.exception("serve: request failed")
            response = error(INTERNAL)
        server.metrics.response(response.status_code)
        return response

    @app.get("/v1/models")
    async def models():
        return P.models_body(server.name, server.created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.name:
            return error(P.APIError(404, f"the model {model_id!r} is not served here; this server serves "
                                         f"{server.name!r}", "model", "model_not_found"))
        return P.model_body(server.name, server.created)

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; this server has POST "
                       "/v1/chat/completions, GET /v1/models, GET /health, GET /metrics")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error(P.APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error(INTERNAL)

    return app
