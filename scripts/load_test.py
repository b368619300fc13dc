"""Bounded load run against an OpenAI-compatible server (python -m runtime.serve, or its Ray Serve form).

    python scripts/load_test.py --base-url http://127.0.0.1:8000/v1 --clients 8 --duration 20
    python scripts/load_test.py --clients 8 --duration 20 --max-requests 50 --image examples/sample.png \
        --max-tokens 32 --json load.json

N client threads, each with its own `openai` client, send streaming chat completions in a loop until the
duration has passed or the client has sent --max-requests (a request started before the deadline runs to
its end, bounded by --request-timeout). Per request: time to first token (TTFT: from sending to the first
chunk with content), the completion's token count (the `usage` of the last chunk, asked for with
stream_options.include_usage; the number of content chunks when the server sends no usage), per-token
latency ((end - first token) / (tokens - 1)) and tokens/s. Printed: p50/p99 TTFT, p50 per-token latency,
aggregate tokens/s (all completion tokens / wall time), request counts and errors.

One warm-up request is sent before the clock starts (not counted); if it fails, nothing else is sent.
Exit codes: 0 no errors; 1 any request failed (or the warm-up did); 2 usage error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import mimetypes
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runtime.cli import EXIT_FAILURE, EXIT_OK, Parser, dataclass_defaults, fail, one_line

log = logging.getLogger("load_test")

EPILOG = """examples:
  python -m runtime.serve --engine-dir engines/llava-tiny --workers 2 --queue-size 16 &
  python scripts/load_test.py --base-url http://127.0.0.1:8000/v1 --clients 8 --duration 20
  python scripts/load_test.py --clients 8 --duration 20 --max-requests 50 --image examples/sample.png \\
      --max-tokens 32 --json load.json

exit codes: 0 every request answered; 1 any request failed (the errors are counted and the first ones
printed); 2 usage error.
"""


@dataclass(frozen=True)
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    clients: int = 8
    duration: float = 20.0  # seconds; no request starts after this
    max_requests: int | None = None  # per client; None: only the duration bounds the loop
    image: Path | None = None
    prompt: str = "Describe the picture in one sentence."
    max_tokens: int = 32
    keep_ratio: float | None = None  # sent as extra_body {"keep_ratio": r}; None: the engine's default
    model: str | None = None  # None: the first id of GET /v1/models
    request_timeout: float = 120.0  # seconds, per request
    json: Path | None = None


@dataclass
class Record:
    """One request as the client saw it (times in seconds from the request's start)."""

    client: int
    ok: bool
    ttft_s: float | None = None  # first chunk with content
    total_s: float | None = None
    tokens: int = 0  # completion tokens
    tokens_from: str = "usage"  # "usage" (the server's count) or "chunks" (content chunks counted)
    error: str | None = None

    @property
    def per_token_s(self) -> float | None:
        if self.ttft_s is None or self.total_s is None or self.tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (self.tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.total_s if self.total_s else None


# --- statistics ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default
    'linear' method); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[Record], wall_s: float) -> dict:
    """Counts and latency figures of a run; times in milliseconds, rates per second of wall time."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    per_token = [r.per_token_s * 1e3 for r in ok if r.per_token_s is not None]
    tps = [r.tokens_per_s for r in ok if r.tokens_per_s is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "empty": sum(1 for r in ok if r.tokens == 0),
        "completion_tokens": tokens,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99),
        "per_token_ms_p50": percentile(per_token, 50),
        "request_tokens_per_s_p50": percentile(tps, 50),
        "tokens_counted_by": sorted({r.tokens_from for r in ok}),
    }


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"

    def rate(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        (f"requests {s['requests']} (ok {s['ok']}, errors {s['errors']}, empty {s['empty']}) "
         f"in {s['wall_s']:.1f} s = {rate(s['requests_per_s'])} req/s"),
        (f"TTFT p50 {ms(s['ttft_ms_p50'])}, p99 {ms(s['ttft_ms_p99'])}; "
         f"per-token latency p50 {ms(s['per_token_ms_p50'])}"),
        (f"tokens: {s['completion_tokens']} completion tokens, "
         f"aggregate {rate(s['aggregate_tokens_per_s'])} tok/s, "
         f"per request p50 {rate(s['request_tokens_per_s_p50'])} tok/s "
         f"(counted by: {', '.join(s['tokens_counted_by']) or '-'})"),
    ]
    return "\n".join(lines)


# --- requests ------------------------------------------------------------------------------------------


def image_url(path: Path) -> str:
    """The image file as a base64 data URL (what the OpenAI API takes for a local image)."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def build_messages(prompt: str, image: str | None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def make_client(cfg: LoadConfig):
    from openai import OpenAI  # lazy: --help works without the openai package

    return OpenAI(base_url=cfg.base_url, api_key="unused", max_retries=0, timeout=cfg.request_timeout)


def one_request(client, cfg: LoadConfig, model: str, messages: list[dict], index: int) -> Record:
    """Send one streaming request and time it; any exception becomes a failed Record."""
    extra = {"keep_ratio": cfg.keep_ratio} if cfg.keep_ratio is not None else None
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                ttft = time.perf_counter() - t0 if ttft is None else ttft
    except Exception as exc:  # noqa: BLE001  (every failure is counted and reported, never raised)
        return Record(index, ok=False, total_s=time.perf_counter() - t0,
                      error=f"{type(exc).__name__}: {one_line(str(exc))[:300]}")
    total = time.perf_counter() - t0
    if usage is not None:
        return Record(index, ok=True, ttft_s=ttft, total_s=total, tokens=int(usage.completion_tokens))
    return Record(index, ok=True, ttft_s=ttft, total_s=total, tokens=chunks, tokens_from="chunks")


def client_loop(cfg: LoadConfig, model: str, messages: list[dict], index: int, deadline: float,
                out: list[Record], lock: threading.Lock) -> None:
    client = make_client(cfg)
    sent = 0
    while time.perf_counter() < deadline and (cfg.max_requests is None or sent < cfg.max_requests):
        record = one_request(client, cfg, model, messages, index)
        sent += 1
        with lock:
            out.append(record)


def pick_model(cfg: LoadConfig) -> str:
    if cfg.model is not None:
        return cfg.model
    models = make_client(cfg).models.list().data
    if not models:
        raise RuntimeError(f"{cfg.base_url}/models lists no model; pass --model")
    return models[0].id


@dataclass
class RunResult:
    model: str
    summary: dict
    records: list[Record] = field(default_factory=list)


def run(cfg: LoadConfig) -> RunResult:
    """Warm up with one request, then run the clients; raises RuntimeError when the warm-up fails."""
    model = pick_model(cfg)
    messages = build_messages(cfg.prompt, image_url(cfg.image) if cfg.image is not None else None)
    warm = one_request(make_client(cfg), cfg, model, messages, -1)
    if not warm.ok:
        raise RuntimeError(f"warm-up request to {cfg.base_url} failed: {warm.error}")
    records: list[Record] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration
    threads = [threading.Thread(target=client_loop, args=(cfg, model, messages, i, deadline, records, lock),
                                daemon=True) for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return RunResult(model, summarize(records, wall), records)


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "openai": ver("openai")}


# --- command line --------------------------------------------------------------------------------------


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    d = dataclass_defaults(LoadConfig)
    p = Parser(prog="python scripts/load_test.py", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=d["base_url"], help="the server's OpenAI base URL (ending in /v1)")
    g.add_argument("--model", default=d["model"], help="model id to send (default: the first of /v1/models)")
    g = p.add_argument_group("load")
    g.add_argument("--clients", type=_positive(int), default=d["clients"], help="concurrent client threads")
    g.add_argument("--duration", type=_positive(float), default=d["duration"],
                   help="seconds during which requests are started")
    g.add_argument("--max-requests", type=_positive(int), default=d["max_requests"],
                   help="at most this many requests per client (default: bounded by --duration only)")
    g.add_argument("--request-timeout", type=_positive(float), default=d["request_timeout"],
                   help="seconds one request may take before it counts as an error")
    g = p.add_argument_group("request")
    g.add_argument("--image", type=Path, default=d["image"],
                   help="image file sent as a base64 data URL (default: none)")
    g.add_argument("--prompt", default=d["prompt"], help="the user text")
    g.add_argument("--max-tokens", type=_positive(int), default=d["max_tokens"],
                   help="max_tokens of every request")
    g.add_argument("--keep-ratio", type=_positive(float), default=d["keep_ratio"],
                   help="DART keep ratio sent as extra_body (default: the engine's)")
    p.add_argument("--json", type=Path, default=d["json"], help="write the summary and every request here")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    if a.image is not None and not a.image.is_file():
        p.error(f"--image {a.image}: no such file")
    return LoadConfig(**{k: getattr(a, k) for k in d})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as exc:  # noqa: BLE001  (one line, as every CLI here)
        return fail(str(exc))
    s = result.summary
    print(f"{cfg.clients} clients x {cfg.duration:g} s, model {result.model}, max_tokens {cfg.max_tokens}, "
          f"image {cfg.image or 'none'}")
    print(format_summary(s))
    errors = [r.error for r in result.records if not r.ok]
    for e in sorted(set(errors))[:5]:
        print(f"error ({errors.count(e)}x): {e}", file=sys.stderr)
    if cfg.json is not None:
        doc = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "environment": environment(), "model": result.model, "summary": s,
               "records": [asdict(r) for r in result.records]}
        cfg.json.write_text(json.dumps(doc, indent=2) + "\n")
    return EXIT_FAILURE if s["errors"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
