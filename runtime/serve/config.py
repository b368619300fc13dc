"""The server's configuration: one frozen dataclass, filled by `python -m runtime.serve`'s flags
(runtime/serve/__main__.py) or built directly (tests, a Ray Serve replica). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """engine_dir:        the engine directory to serve (python -m export.build wrote it).
    host, port:        where to listen.
    workers:           generations running at once (worker threads sharing one pipeline; ONNX
                       Runtime releases the GIL while a graph runs).
    queue_size:        requests admitted to wait beyond the running ones; one more gets 429.
    max_body_bytes:    a request body over this gets 413 (the base64 images are in the body).
    allow_local_files: image_url may name a file on the server (file:///abs/path or /abs/path).
    allow_remote_urls: image_url may be an http(s) URL the server downloads (every host it can reach).
    url_timeout_s:     time allowed for one image download (runtime/serve/images.py).
    max_image_bytes:   an image file or download over this is refused (400).
    model_name:        the model id of the API (None: the engine directory's name).
    provider, threads: as runtime.load (cpu / cuda / ort-tensorrt / tensorrt; intra-op threads).
    ray, replicas:     serve through Ray Serve with this many replicas (runtime/serve/ray_app.py)."""

    engine_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    queue_size: int = 16
    max_body_bytes: int = 20 * MIB
    allow_local_files: bool = False
    allow_remote_urls: bool = False
    url_timeout_s: float = 10.0
    max_image_bytes: int = 20 * MIB
    model_name: str | None = None
    provider: str = "cpu"
    threads: int | None = None
    ray: bool = False
    replicas: int = 1
    verbose: bool = False  # log requests and progress; tracebacks on errors (the CLI's -v)

    @property
    def served_name(self) -> str:
        """The model id clients send and GET /v1/models lists."""
        return self.model_name or Path(self.engine_dir).resolve().name


PROVIDERS = ("cpu", "cuda", "ort-tensorrt", "tensorrt")


def config_problem(cfg: ServeConfig) -> str | None:
    """What is wrong with a config (one line), or None. The CLI's flags check the same things."""
    if cfg.workers < 1 or cfg.queue_size < 0 or cfg.replicas < 1:
        return (f"workers and replicas must be >= 1 and queue_size >= 0, got workers {cfg.workers}, "
                f"queue_size {cfg.queue_size}, replicas {cfg.replicas}")
    if cfg.max_body_bytes < 1 or cfg.max_image_bytes < 1 or not cfg.url_timeout_s > 0:
        return "max_body_bytes, max_image_bytes and url_timeout_s must be > 0"
    if cfg.provider not in PROVIDERS:
        return f"provider must be one of {', '.join(PROVIDERS)}, got {cfg.provider!r}"
    if cfg.provider == "tensorrt" and cfg.workers > 1:
        return ("the tensorrt provider runs one generation at a time per process (a TensorRT execution "
                "context is not thread-safe): use workers 1 (and more replicas for throughput)")
    if not 0 <= cfg.port <= 65535:
        return f"port must be in [0, 65535], got {cfg.port}"
    if cfg.ray and cfg.port == 0:
        return "port 0 (any free port) does not apply with Ray Serve, whose proxy binds the port: give one"
    return None
