"""scripts/load_test.py: its statistics (exact values), and the client loop against a stdlib fake of the
streaming API (no engine, no server package): token counts, error counting, exit codes, bounds."""

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


lt = _load_script()


# --- statistics ----------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy():
    xs = [10.0, 20.0, 30.0, 40.0]  # positions 0..3; p50 -> 1.5, p99 -> 2.97
    assert lt.percentile(xs, 50) == 25.0
    assert lt.percentile(xs, 99) == pytest.approx(39.7, abs=1e-12)
    assert lt.percentile(xs, 0) == 10.0 and lt.percentile(xs, 100) == 40.0
    assert lt.percentile([7.0], 99) == 7.0
    assert lt.percentile([], 50) is None
    assert lt.percentile([3.0, 1.0, 2.0], 50) == 2.0  # sorted first
    np = pytest.importorskip("numpy")
    ys = [0.3, 5.0, 1.25, 9.5, 2.0, 2.0, 7.75]
    for q in (1, 25, 50, 90, 99):
        assert lt.percentile(ys, q) == pytest.approx(float(np.percentile(ys, q)), abs=1e-12)


def test_summarize_counts_and_rates():
    recs = [
        lt.Record(0, ok=True, ttft_s=0.1, total_s=1.1, tokens=11),  # per token (1.1-0.1)/10 = 0.1 s
        lt.Record(1, ok=True, ttft_s=0.3, total_s=0.7, tokens=5),  # per token 0.1 s
        lt.Record(0, ok=True, ttft_s=None, total_s=0.05, tokens=0),  # empty answer: no TTFT
        lt.Record(1, ok=False, total_s=0.2, error="APIConnectionError: boom"),
    ]
    s = lt.summarize(recs, wall_s=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["empty"]) == (4, 3, 1, 1)
    assert s["completion_tokens"] == 16
    assert s["aggregate_tokens_per_s"] == 8.0
    assert s["requests_per_s"] == 1.5
    assert s["ttft_ms_p50"] == pytest.approx(200.0)  # of 100 and 300 ms
    assert s["ttft_ms_p99"] == pytest.approx(298.0)
    assert s["per_token_ms_p50"] == pytest.approx(100.0)
    assert s["request_tokens_per_s_p50"] == pytest.approx(5 / 0.7)  # the middle of 0, 5/0.7, 11/1.1
    assert s["tokens_counted_by"] == ["usage"]
    text = lt.format_summary(s)
    assert "errors 1" in text and "TTFT p50 200.0 ms, p99 298.0 ms" in text and "aggregate 8.0 tok/s" in text


def test_record_rates_need_two_tokens():
    assert lt.Record(0, ok=True, ttft_s=0.1, total_s=0.5, tokens=1).per_token_s is None
    assert lt.Record(0, ok=True, ttft_s=0.1, total_s=0.5, tokens=1).tokens_per_s == 2.0


def test_image_url_and_messages(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG-bytes")
    url = lt.image_url(img)
    assert url == "data:image/png;base64,iVBORy1ieXRlcw=="
    assert lt.build_messages("hi", url) == [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]
    assert lt.build_messages("hi", None) == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_parse_args_defaults_and_usage_errors(tmp_path, capsys):
    cfg = lt.parse_args([])
    assert cfg == lt.LoadConfig()
    cfg = lt.parse_args(["--clients", "3", "--duration", "1.5", "--max-requests", "4", "--keep-ratio", "0.5"])
    assert (cfg.clients, cfg.duration, cfg.max_requests, cfg.keep_ratio) == (3, 1.5, 4, 0.5)
    for bad in (["--clients", "0"], ["--duration", "inf"], ["--image", str(tmp_path / "missing.png")]):
        with pytest.raises(SystemExit) as e:
            lt.parse_args(bad)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 3  # one line each


# --- the client loop against a fake streaming server ---------------------------------------------------


def _chunk(delta: dict, finish=None, usage=None, choices=True) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        doc["usage"] = usage
    return f"data: {json.dumps(doc)}\n\n".encode()


class FakeAPI(BaseHTTPRequestHandler):
    """GET /v1/models and a streaming POST /v1/chat/completions answering "a b c" (3 tokens, with usage
    when include_usage is asked); the server's `fail_every` makes every n-th request a 500."""

    def log_message(self, *args):
        pass

    def _json(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                     "owned_by": "x"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.bodies.append(req)
            n = len(srv.bodies)
        if srv.fail_every and n % srv.fail_every == 0:
            self._json(500, {"error": {"message": "injected failure", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(_chunk({"role": "assistant", "content": ""}))
        for piece in ("a", " b", " c"):
            self.wfile.write(_chunk({"content": piece}))
        self.wfile.write(_chunk({}, finish="length"))
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            self.wfile.write(_chunk({}, usage=usage, choices=False))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture()
def fake_api():
    pytest.importorskip("openai", reason="scripts/load_test.py sends requests with the openai client")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    srv.lock, srv.bodies, srv.fail_every = threading.Lock(), [], 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_run_counts_tokens_from_usage_and_bounds_requests(fake_api, tmp_path):
    out = tmp_path / "load.json"
    code = lt.main(["--base-url", _url(fake_api), "--clients", "3", "--duration", "30", "--max-requests", "4",
                    "--max-tokens", "5", "--keep-ratio", "0.25", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert (s["requests"], s["ok"], s["errors"], s["empty"]) == (12, 12, 0, 0)  # 3 clients x 4, no warm-up
    assert s["completion_tokens"] == 36 and s["tokens_counted_by"] == ["usage"]
    assert len(fake_api.bodies) == 13  # + the warm-up
    body = fake_api.bodies[-1]
    assert body["model"] == "fake" and body["stream"] is True and body["max_tokens"] == 5
    assert body["keep_ratio"] == 0.25 and body["stream_options"] == {"include_usage": True}
    assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["total_s"] for r in doc["records"])
    assert doc["environment"]["cpu_count"] >= 1


def test_duration_bounds_the_loop(fake_api):
    cfg = lt.LoadConfig(base_url=_url(fake_api), clients=2, duration=0.3)
    result = lt.run(cfg)
    assert result.summary["errors"] == 0
    assert result.summary["wall_s"] < 5.0  # no request starts after 0.3 s; each takes milliseconds
    assert result.summary["requests"] >= 2


def test_errors_are_counted_and_exit_1(fake_api, capsys):
    fake_api.fail_every = 3  # requests 3, 6, 9, ... (1 is the warm-up, which succeeds)
    code = lt.main(["--base-url", _url(fake_api), "--clients", "1", "--duration", "30",
                    "--max-requests", "6"])
    assert code == 1
    out, err = capsys.readouterr()
    assert "requests 6 (ok 4, errors 2, empty 0)" in out
    assert "error (2x): InternalServerError" in err and "injected failure" in err


def test_unreachable_server_is_one_line_exit_1(capsys):
    pytest.importorskip("openai")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = lt.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: warm-up request to") and "APIConnectionError" in err
    assert err.count("\n") == 1
