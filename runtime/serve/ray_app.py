"""Scale-out on Ray Serve: N replicas of the same FastAPI app, the HTTP API unchanged.

    python -m runtime.serve --engine-dir engines/llava --ray --replicas 2 --port 8000
    RAY_ADDRESS=10.0.0.1:6379 python -m runtime.serve --engine-dir /models/llava --ray --replicas 8
    serve run runtime.serve.ray_app:app_builder engine_dir=/models/llava replicas=4   # Ray's own CLI
    serve deploy serve_config.yaml    # import_path: runtime.serve.ray_app:app_builder (docs/SERVING.md)

Each replica is a Ray actor that builds the app with `runtime.serve.app.create_app(cfg)` itself, so it
loads the engine in its own process (the builder-function form of `serve.ingress`: the function is
called on the replica, not in the driver). Serve's HTTP proxy listens on cfg.host:cfg.port and routes
every request to one replica; the routes, request and response shapes are those of the single-box server.

Without RAY_ADDRESS `run` starts a private local Ray instance: no dashboard, Ray's own servers on the
loopback interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes Ray's node address 127.0.0.1), torn
down on exit. With RAY_ADDRESS set it joins that cluster, deploys the application, and on exit deletes
only this application (the cluster and its other Serve applications keep running).

Resources: each replica reserves `replica_threads(cfg)` CPUs from Ray's scheduler (ray_actor_options
num_cpus; and one GPU, num_gpus, with a GPU provider) and runs ONNX Runtime with that many intra-op
threads (its --workers threads share them: one pipeline per replica), so replicas x threads should not
exceed the cores of the nodes they land on.
Admission: Serve sends a replica at most --workers requests at a time (max_ongoing_requests), so a request
waits in Serve's queue (not in one replica's) until any replica is free; that queue holds at most
queue_size x replicas requests (max_queued_requests; at least 1, Serve's minimum), as many as N single
boxes would admit; one more gets 429 with Retry-After: 1 from Serve, as from a single box (the body is
Serve's text, not OpenAI's error JSON; the openai client raises RateLimitError either way).

Ray is imported only inside the functions here: `import runtime.serve.ray_app` works without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from runtime.errors import InputError
from runtime.manifest import read_manifest
from runtime.serve.config import ServeConfig, config_problem

log = logging.getLogger(__name__)

APP_NAME = "dart-vlm"  # the Serve application (serve status, serve delete)
DEPLOYMENT_NAME = "DartVLM"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1 (read at import)
INSTALL_HINT = 'Ray Serve is not installed: pip install "dart-vlm[ray]" (or pip install "ray[serve]==2.60.0")'


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise InputError(f"{INSTALL_HINT} ({exc})") from None
    return ray, serve


# --- the application -----------------------------------------------------------------------------------


def replica_threads(cfg: ServeConfig) -> int:
    """ONNX Runtime intra-op threads per replica, also the CPUs each replica reserves from Ray:
    --threads when given, else this machine's cores / replicas (at least 1). On a multi-node cluster pass
    --threads: the replica nodes' core counts are not known where the application is built."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // cfg.replicas)


def replica_resources(cfg: ServeConfig) -> dict[str, float]:
    """What one replica reserves from Ray: its threads as CPUs, and one GPU with a GPU provider (Ray then
    sets CUDA_VISIBLE_DEVICES, so each replica runs on a GPU of its own)."""
    gpus = 0 if cfg.provider == "cpu" else 1
    return {"num_cpus": replica_threads(cfg), "num_gpus": gpus}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Keyword arguments of serve.deployment for `cfg` (replicas, per-replica CPUs, admission bounds)."""
    return {
        "name": DEPLOYMENT_NAME,
        "num_replicas": cfg.replicas,
        "ray_actor_options": replica_resources(cfg),
        "max_ongoing_requests": cfg.workers,  # a replica runs what it can; the rest wait in Serve's queue,
        "max_queued_requests": max(1, cfg.queue_size * cfg.replicas),  # as N single boxes (Serve: >= 1)
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},  # what a full single box answers
    }


def replica_config(cfg: ServeConfig) -> ServeConfig:
    """What each replica builds its app from: the same config with the thread count resolved (an
    unresolved None would let every replica's ONNX Runtime take all the node's cores)."""
    return dataclasses.replace(cfg, threads=replica_threads(cfg), ray=False, replicas=1)


def build(cfg: ServeConfig):
    """The Serve application (ray.serve.Application) for `cfg`: a deployment of cfg.replicas replicas
    whose ingress app `create_app(...)` is built on each replica. InputError for a bad config (here,
    not N times in the replicas)."""
    problem = config_problem(cfg)
    if problem:
        raise InputError(problem)
    _, serve = _import_ray()
    inner = replica_config(cfg)

    def build_asgi_app():  # called on each replica (Ray actor), never in the driver
        from runtime.serve.app import create_app

        return create_app(inner)

    ingress = serve.ingress(build_asgi_app)()  # (a class: the builder-function form of serve.ingress)
    return serve.deployment(ingress, **deployment_options(cfg)).bind()


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """ServeConfig from an application builder's `args` (a Serve config file's `args:` mapping, or
    `serve run ... key=value`, whose values arrive as strings): keys are ServeConfig field names."""
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(unknown)} for {APP_NAME}; use ServeConfig field "
                         f"names: {', '.join(sorted(fields))}")
    if "engine_dir" not in args:
        raise InputError(f"{APP_NAME} needs engine_dir (args: {{engine_dir: /path/to/engine}} in the Serve "
                         "config, or engine_dir=... after the import path of `serve run`)")
    defaults = ServeConfig(engine_dir=Path(args["engine_dir"]))
    values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in args.items()}
    return dataclasses.replace(defaults, **values)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A `serve run key=value` string as the type of the field's default (YAML values pass through)."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if name == "engine_dir" or isinstance(default, Path):
        return Path(value)
    if value.lower() in ("none", "null"):
        return None
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int) or name in ("threads",):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise InputError(f"argument {name}={value!r}: not a {type(default).__name__}") from None
    return value


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder (`serve run runtime.serve.ray_app:app_builder engine_dir=DIR`, or
    import_path in a Serve config file with `args:`). The config file's http_options set host and port."""
    return build(config_from_args(args))


# --- python -m runtime.serve --ray ---------------------------------------------------------------------


def missing_resources(cfg: ServeConfig, available: dict[str, float]) -> str | None:
    """What the replicas need beyond `available` ({"CPU": n, "GPU": m}, as ray.cluster_resources()
    reports), as one line; None when they all fit."""
    need = {k: cfg.replicas * v for k, v in (("CPU", replica_resources(cfg)["num_cpus"]),
                                             ("GPU", replica_resources(cfg)["num_gpus"])) if v}
    short = [f"{need[k]:g} {k}s ({cfg.replicas} replicas x {need[k] / cfg.replicas:g}), "
             f"{available.get(k, 0):g} available" for k in need if need[k] > available.get(k, 0)]
    if not short:
        return None
    return (f"the replicas need {'; '.join(short)}: lower --replicas or --threads (each replica reserves "
            "--threads CPUs, and a GPU with a GPU provider), or use a larger Ray cluster (RAY_ADDRESS)")


def check_resources(cfg: ServeConfig, available: dict[str, float], strict: bool) -> None:
    """InputError (strict: our own instance, which will never grow) or a warning (a cluster, which an
    autoscaler may grow) when the replicas do not fit: Ray would wait for the resources forever."""
    problem = missing_resources(cfg, available)
    if problem and strict:
        raise InputError(problem)
    if problem:
        log.warning("ray: %s; Serve waits until the cluster has them", problem)


def start_ray(ray, level: int = logging.WARNING) -> bool:
    """Connect to RAY_ADDRESS, or start a private local instance (no dashboard, loopback only).
    Returns True when the instance is ours (local). A SIGTERM during ray.init (whose handler exits
    with code 15) becomes KeyboardInterrupt, as it is during the rest of the start."""
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            log.info("ray: joining the cluster at %s", address)
            ray.init(address=address, logging_level=level)
            return False
        ray.init(address="local", include_dashboard=False, logging_level=level)
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    node = ray.util.get_node_ip_address()
    if node not in ("127.0.0.1", "::1"):  # ray was imported before run() set LOOPBACK_ENV
        log.warning("ray: the local instance uses the node address %s, not the loopback (set %s=0 before "
                    "Python imports ray); its servers are reachable from the network", node, LOOPBACK_ENV)
    log.info("ray: started a local instance (node address %s)", node)
    return True


class _Signals:
    """SIGINT / SIGTERM for run(): while starting they abort the start (KeyboardInterrupt, so the
    `finally` shuts down whatever started); once serving they set `stop`, which run() waits on. Installed
    again after ray.init, which puts its own SIGTERM handler (sys.exit) in place."""

    def __init__(self):
        self.stop = threading.Event()
        self.serving = False
        self.signum: int | None = None
        self._old = {}

    def __call__(self, signum, frame):
        self.signum = signum
        if not self.serving:
            raise KeyboardInterrupt
        self.stop.set()

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(s, self)
            self._old.setdefault(s, old)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run(cfg: ServeConfig) -> None:
    """Deploy cfg.replicas replicas behind Serve's HTTP proxy on cfg.host:cfg.port, print one `serving`
    line on stderr when they are ready, and block until SIGINT / SIGTERM; then shut Serve and the local
    Ray instance down (on a cluster: delete this application and disconnect). A signal before the
    replicas are ready aborts the start (KeyboardInterrupt, after the same clean-up)."""
    if cfg.port == 0:
        raise InputError("--port 0 (a free port) does not work with --ray: Serve's HTTP proxy is started on "
                         "a fixed port (every node's proxy on the same one); give --port N")
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(LOOPBACK_ENV, "0")  # before `import ray`, which reads it
        if cfg.provider == "cpu":  # (a GPU count needs Ray: checked after the start)
            check_resources(cfg, {"CPU": os.cpu_count() or 1}, strict=True)
        read_manifest(cfg.engine_dir, verify=False)  # a bad --engine-dir fails here, not in N replicas
    ray, serve = _import_ray()
    signals = _Signals()
    signals.install()
    local = None
    try:
        local = start_ray(ray, logging.INFO if cfg.verbose else logging.WARNING)
        signals.install()  # ray.init replaced the SIGTERM handler
        check_resources(cfg, ray.cluster_resources(), strict=local)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        signals.serving = True
        # The CLI's ready line (python -m runtime.serve prints the same for one process): what to call.
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"serving {cfg.served_name} on http://{host}:{cfg.port} through Ray Serve ({cfg.replicas} "
              f"replica(s), {replica_threads(cfg)} thread(s) and {cfg.workers} worker(s) each); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while not signals.stop.wait(1.0):
            pass
        log.info("ray serve: %s received, shutting down", signal.Signals(signals.signum).name)
    finally:
        _shut_down(ray, serve, local)
        signals.restore()


def _shut_down(ray, serve, local: bool | None) -> None:
    """Serve and Ray down (local), or only this application deleted (a cluster); a failing step is
    logged, not raised, so it cannot hide why run() is ending."""
    steps = [("serve.shutdown", serve.shutdown)] if local else []
    steps += [("serve.delete", lambda: serve.delete(APP_NAME))] if local is False else []
    for name, step in [*steps, ("ray.shutdown", ray.shutdown)]:
        try:
            step()
        except Exception as exc:  # noqa: BLE001  (clean-up: report and go on)
            log.warning("ray: %s failed during shutdown: %s", name, exc)
