"""Command line: serve an engine directory as an OpenAI-compatible chat-completions API.

    python -m runtime.serve --engine-dir engines/llava-tiny [--host 127.0.0.1] [--port 8000]

Needs the `serve` extra (FastAPI + uvicorn), imported only after the flags are read, so --help works
without it. The port is bound before the engine loads: `--port 0` takes a free port, and the line
`serving MODEL on http://HOST:PORT` on stderr says which. Errors end as one line on stderr (the
traceback with -v): exit code 2 for usage errors, 1 for failures (engine directory, port in use,
serve extra or Ray missing). Ctrl-C or SIGTERM stops the server gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
import sys
from pathlib import Path

from runtime.cli import EXIT_OK, Parser, dataclass_defaults, fail, handle_sigterm
from runtime.errors import EngineError, InputError
from runtime.serve.config import MIB, PROVIDERS, ServeConfig, config_problem

log = logging.getLogger(__name__)

SERVE_MODULES = ("fastapi", "starlette", "uvicorn")  # the serve extra
GRACEFUL_S = 5
BACKLOG = 2048  # uvicorn's default  # on shutdown, open streams get this long before their generations are cancelled

EPILOG = """\
examples:
  python -m runtime.serve --engine-dir engines/llava-tiny
  python -m runtime.serve --engine-dir engines/llava --host 0.0.0.0 --port 8080 --workers 2 --threads 1
  python -m runtime.serve --engine-dir engines/llava --allow-remote-urls --url-timeout 5
  python -m runtime.serve --engine-dir engines/llava --ray --replicas 2
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "llava-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'

routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus).
exit codes: 0 stopped (Ctrl-C, SIGTERM); 1 failed (engine directory, port in use, the serve extra or
Ray not installed; one line on stderr, the traceback with -v); 2 usage error (a bad flag or value).
"""


def _number(kind, low: float, high: float | None = None, what: str = ""):
    """An argparse type: a number in [low, high] (low excluded for floats)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what_kind = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what_kind}: {text!r}") from None
        ok = (v >= low if kind is int else v > low) and (high is None or v <= high)
        if not ok or not math.isfinite(v):
            bounds = (f">= {low}" if kind is int else f"> {low:g}") + (f" and <= {high}" if high else "")
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}, got {text}")
        return v

    parse.__name__ = what
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = dataclass_defaults(ServeConfig)
    p = Parser(prog="python -m runtime.serve",
               description="Serve a DART-VLM engine directory as an OpenAI-compatible chat-completions API.",
               epilog=EPILOG)
    g = p.add_argument_group("engine")
    g.add_argument("--engine-dir", type=Path, required=True, help="engine directory written by export.build")
    g.add_argument("--model-name", default=d["model_name"],
                   help="the model id clients send and /v1/models lists (default: the engine directory's "
                        "name)")
    g.add_argument("--provider", choices=PROVIDERS, default=d["provider"],
                   help="as python -m runtime.run: ONNX Runtime provider, or tensorrt (one worker)")
    g.add_argument("--threads", type=_number(int, 1, 1024, "threads"), default=d["threads"],
                   help="intra-op threads per stage (default: ONNX Runtime's, one per core); with "
                        "--workers N, about cores / N")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d["host"], help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=_number(int, 0, 65535, "port"), default=d["port"],
                   help="port to listen on (0: a free one, printed at start)")
    g.add_argument("--workers", type=_number(int, 1, None, "workers"), default=d["workers"],
                   help="generations running at once (threads sharing the engine)")
    g.add_argument("--queue-size", type=_number(int, 0, None, "queue size"), default=d["queue_size"],
                   help="requests waiting beyond the running ones; one more gets HTTP 429")
    g.add_argument("--max-body-mib", type=_number(float, 0, None, "max body MiB"),
                   default=d["max_body_bytes"] / MIB, help="largest request body in MiB (HTTP 413 above)")
    g = p.add_argument_group("images")
    g.add_argument("--allow-local-files", action="store_true", default=d["allow_local_files"],
                   help="let image_url name a file on this machine (file:///abs/path); off: base64 data: "
                        "URLs only")
    g.add_argument("--allow-remote-urls", action="store_true", default=d["allow_remote_urls"],
                   help="let image_url be an http(s) URL the server downloads (any host it can reach: "
                        "trusted clients only)")
    g.add_argument("--url-timeout", type=_number(float, 0, None, "url timeout"), default=d["url_timeout_s"],
                   help="seconds allowed for one image download")
    g.add_argument("--max-image-mib", type=_number(float, 0, None, "max image MiB"),
                   default=d["max_image_bytes"] / MIB,
                   help="largest image (file, download or decoded base64) in MiB")
    g = p.add_argument_group("scale-out")
    g.add_argument("--ray", action="store_true", default=d["ray"],
                   help="serve through Ray Serve (pip install -e \".[ray]\")")
    g.add_argument("--replicas", type=_number(int, 1, None, "replicas"), default=d["replicas"],
                   help="Ray Serve replicas, each with its own engine and workers (needs --ray)")
    p.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                   help="log requests and progress; tracebacks on errors")
    return p


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.replicas != 1 and not a.ray:
        p.error("--replicas needs --ray (one process serves one engine; see --workers)")
    cfg = ServeConfig(
        engine_dir=a.engine_dir, host=a.host, port=a.port, workers=a.workers, queue_size=a.queue_size,
        max_body_bytes=max(1, int(a.max_body_mib * MIB)), allow_local_files=a.allow_local_files,
        allow_remote_urls=a.allow_remote_urls, url_timeout_s=a.url_timeout,
        max_image_bytes=max(1, int(a.max_image_mib * MIB)), model_name=a.model_name, provider=a.provider,
        threads=a.threads, ray=a.ray, replicas=a.replicas, verbose=a.verbose,
    )
    problem = config_problem(cfg)
    if problem:
        p.error(problem)
    return cfg


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for host:port (uvicorn serves on it): a port in use fails before the engine
    loads, and clients that connect while it loads wait instead of being refused."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)  # connections wait in the backlog until uvicorn accepts them
    except OSError:
        sock.close()
        raise
    return sock


def serve(cfg: ServeConfig) -> int:
    """Bind, load the engine, serve until Ctrl-C / SIGTERM."""
    try:
        import uvicorn

        from runtime.serve.app import create_app
    except ImportError as exc:
        if _top(exc) not in SERVE_MODULES:
            raise
        return fail(f"the server needs the serve extra ({_top(exc)} is not installed): "
                    "pip install 'dart-vlm[serve]'")

    try:
        sock = listen(cfg.host, cfg.port)
    except OSError as exc:
        return fail(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}", cfg.verbose)
    with sock:
        app = create_app(cfg)
        host, port = sock.getsockname()[:2]
        print(f"serving {cfg.served_name} on http://{_url_host(host)}:{port} (workers {cfg.workers}, queue "
              f"{cfg.queue_size}); Ctrl-C stops", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="info" if cfg.verbose else "warning", access_log=cfg.verbose,
                                timeout_graceful_shutdown=GRACEFUL_S)
        handle_sigterm()  # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # that signal, after the graceful stop
            pass
    return EXIT_OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _top(exc: ImportError) -> str:
    return (exc.name or "").split(".")[0]


def serve_ray(cfg: ServeConfig) -> int:
    try:
        import ray.serve  # noqa: F401

        from runtime.serve import ray_app
    except ImportError as exc:
        if _top(exc) not in ("ray", *SERVE_MODULES):
            raise
        return fail(f"--ray needs Ray Serve ({_top(exc)} is not installed): pip install -e '.[ray]' (ray[serve])")

    result = ray_app.run(cfg)
    return result if isinstance(result, int) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)  # argparse exits 2 on usage errors
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        return serve_ray(cfg) if cfg.ray else serve(cfg)
    except (EngineError, InputError) as exc:
        return fail(str(exc) or type(exc).__name__, cfg.verbose)
    except KeyboardInterrupt:  # during the engine load (uvicorn handles it once serving)
        return fail("interrupted", cfg.verbose)
    except Exception as exc:  # noqa: BLE001  a bug or a library's own error: still one line, -v shows where
        return fail(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)", cfg.verbose)


if __name__ == "__main__":
    sys.exit(main())
