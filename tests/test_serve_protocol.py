"""runtime.serve without a server: request parsing and its 400s, data: URLs, stop strings, response
shapes, image loading (equal to the runtime's own loader; files and downloads from a loopback HTTP
server), the Prometheus text, the worker pool (queue bound, order, cancellation, shutdown) and the
CLI's flags. The server itself: tests/test_serve.py."""

import base64
import http.server
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import EngineError, InputError
from runtime.preprocess import load_image
from runtime.serve import protocol as P
from runtime.serve.__main__ import parse_args
from runtime.serve.config import MIB, ServeConfig
from runtime.serve.generation import Failed, Generator
from runtime.serve.images import ImageLimits, download, load_request_image, open_image, read_file
from runtime.serve.metrics import Metrics
from runtime.serve.workers import Job, QueueFull, ShuttingDown, WorkerPool

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llava-tiny"


def png_bytes(w=8, h=6, mode="RGB") -> bytes:
    rng = np.random.RandomState(0)
    im = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def user(*parts, text="hi"):
    content = [{"type": "text", "text": text}, *parts] if parts else text
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def parse(body, **limits):
    return P.parse_chat_request(body, MODEL, P.Limits(**limits))


def refused(body, status=400, **limits) -> P.APIError:
    with pytest.raises(P.APIError) as info:
        parse(body, **limits)
    assert info.value.status == status
    assert "\n" not in info.value.message
    return info.value


# --- requests ------------------------------------------------------------------------------------------


def test_parse_defaults_and_fields():
    r = parse(user())
    assert r == P.ChatRequest(prompt="hi")  # temperature 1.0, top_p 1.0 (OpenAI's), no limit, no image
    url = data_url(png_bytes())
    body = {**user(image_part(url), text="What is it?"), "max_completion_tokens": 7, "temperature": 0,
            "top_p": 0.5, "seed": 3, "stop": ["a", ""], "stream": True,
            "stream_options": {"include_usage": True}, "keep_tokens": 12, "ignore_eos": True, "n": 1,
            "logprobs": False, "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u"}
    r = parse(body)
    assert r == P.ChatRequest(prompt="What is it?", image=P.ImageRef("data", url), max_tokens=7,
                              temperature=0.0, top_p=0.5, seed=3, stop=("a",), stream=True,
                              include_usage=True, keep_tokens=12, ignore_eos=True)
    assert parse({**user(), "max_tokens": 5}).max_tokens == 5
    assert parse({**user(), "max_tokens": 5, "max_completion_tokens": 5}).max_tokens == 5
    assert parse({**user(), "keep_ratio": 0.25}).keep_ratio == 0.25
    assert parse({**user(), "stop": "###"}).stop == ("###",)
    assert parse({"messages": [{"role": "user", "content": "no model field"}]}).prompt == "no model field"


def test_system_messages_are_prepended_and_text_parts_joined():
    body = {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert parse(body).prompt == "Be brief.\n\nAnswer in English.\n\na\nb"


@pytest.mark.parametrize("messages, what", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}], "one user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "one user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "one user turn"),
    ([{"role": "tool", "content": "a"}, {"role": "user", "content": "b"}], "one user turn"),
    ([{"content": "a"}], "string role"),
    ([{"role": "user", "content": 3}], "string or a list"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
      {"role": "user", "content": "a"}], "images go in the user message"),
])
def test_conversations_the_template_cannot_hold_are_refused(messages, what):
    e = refused({"model": MODEL, "messages": messages})
    assert what in e.message and e.param.startswith("messages")


def test_unsupported_content_part_and_too_many_images():
    e = refused(user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}))
    assert e.code == "unsupported_content" and "'input_audio'" in e.message
    assert "['text', 'image_url']" in e.message
    url = data_url(png_bytes())
    e = refused(user(image_part(url), image_part(url)))
    assert e.code == "too_many_images" and "2 images" in e.message and "at most 1" in e.message


@pytest.mark.parametrize("field, value, what", [
    ("n", 2, "n must be 1"), ("n", True, "n must be 1"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("max_completion_tokens", 2.5, "max_completion_tokens must be an integer >= 1"),
    ("temperature", -1, "temperature"), ("temperature", "hot", "temperature must be a number"),
    ("top_p", 0, "top_p"), ("seed", -1, "seed"), ("seed", 1.5, "seed"),
    ("keep_ratio", 1.5, "keep ratio"), ("keep_tokens", -1, "keep_tokens"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"), ("stop", 3, "stop must be"),
    ("stream", "yes", "stream must be true or false"),
    ("stream_options", {"include_usage": True}, "only allowed with stream"),
    ("tools", [{"type": "function"}], "tool calls"), ("logprobs", True, "logprobs"),
    ("response_format", {"type": "json_object"}, "only text"),
    ("frequency_penalty", 0.5, "frequency_penalty"),
])
def test_bad_fields(field, value, what):
    e = refused({**user(), field: value})
    assert what in e.message and e.param == field


def test_both_token_limits_and_both_budgets_refused():
    assert "differ" in refused({**user(), "max_tokens": 3, "max_completion_tokens": 4}).message
    assert "not both" in refused({**user(), "keep_ratio": 0.5, "keep_tokens": 3}).message


def test_another_model_is_404_and_json_must_be_an_object():
    e = refused({**user(), "model": "gpt-4o"}, status=404)
    assert e.code == "model_not_found" and "'llava-tiny'" in e.message
    with pytest.raises(P.APIError, match="not valid JSON"):
        P.parse_json(b"{nope")
    with pytest.raises(P.APIError, match="must be a JSON object, got a list"):
        P.parse_json(b"[1]")


def test_image_sources_follow_the_server_flags():
    for url, kind, flag in (("http://127.0.0.1/x.png", "url", "allow_remote_urls"),
                            ("file:///tmp/x.png", "file", "allow_local_files"), ("/tmp/x.png", "file",
                                                                                 "allow_local_files")):
        e = refused(user(image_part(url)))
        assert e.code == "image_url_disabled" and flag.replace("_", "-") in e.message
        assert parse(user(image_part(url)), **{flag: True}).image == P.ImageRef(kind, url)
    assert "image_url.url must be" in refused(user(image_part("ftp://x"))).message


# --- data: URLs --------------------------------------------------------------------------------------


def test_decode_data_url():
    data = png_bytes()
    assert P.decode_data_url(data_url(data), 1 << 20) == data
    b64 = base64.b64encode(data).decode()
    spaced = "\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    assert P.decode_data_url(f"data:image/png;base64,{spaced}", 1 << 20) == data  # line breaks allowed
    assert P.decode_data_url(f"data:;base64,{b64}", 1 << 20) == data
    for url, code in ((f"data:image/png;base64,{b64[:-1]}", "invalid_base64"),
                      ("data:image/png;base64,ab$d", "invalid_base64"),
                      ("data:image/png,rawbytes", None), (f"data:text/plain;base64,{b64}", None),
                      (data_url(data), "image_too_large")):
        with pytest.raises(P.APIError) as info:
            P.decode_data_url(url, 1 << 20 if code != "image_too_large" else len(data) - 1)
        assert info.value.status == 400 and info.value.code == code


# --- stop strings ------------------------------------------------------------------------------------


def feed_all(stops, pieces):
    m = P.StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return out, m


def test_stop_matcher_cuts_and_holds_back():
    out, m = feed_all(("END",), ["Hello E", "N", "D more"])
    assert out == ["Hello ", "", ""] and m.stopped and m.text == "Hello "
    out, m = feed_all(("END",), ["a E", "x", "EN"])  # held back, then released; the tail flushed
    assert out == ["a ", "Ex", "", "EN"] and not m.stopped and m.text == "a ExEN"
    out, m = feed_all(("xyz", "b"), ["a", "xyb", "c"])  # the earliest stop wins
    assert out == ["a", "xy", ""] and m.text == "axy"
    out, m = feed_all((), ["a", "b"])
    assert out == ["a", "b", ""] and m.text == "ab"
    out, m = feed_all(("aab",), ["a", "a", "a", "b"])  # overlapping prefixes
    assert "".join(out) == "a" and m.stopped


# --- responses ---------------------------------------------------------------------------------------


def test_usage_and_response_shapes():
    timings = {"prompt_tokens": 599, "new_tokens": 20, "vision_tokens": 576, "kept_vision_tokens": 68,
               "kept_tokens": 91}
    usage = P.usage_body(timings, 0.111, None)
    assert usage == {"prompt_tokens": 599, "completion_tokens": 20, "total_tokens": 619,
                     "dart": {"keep_ratio": 0.111, "keep_tokens": None, "vision_tokens": 576,
                              "kept_vision_tokens": 68, "kept_tokens": 91}}
    body = P.completion_body("chatcmpl-1", 5, MODEL, "hi", "stop", usage)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["object"] == "chat.completion"
    chunk = P.chunk_body("chatcmpl-1", 5, MODEL, {"content": "x"}, with_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert "usage" not in P.chunk_body("chatcmpl-1", 5, MODEL, {})
    assert P.usage_chunk("chatcmpl-1", 5, MODEL, usage)["choices"] == []
    assert P.sse({"a": 1}) == b'data: {"a":1}\n\n' and P.SSE_DONE == b"data: [DONE]\n\n"
    assert P.APIError(429, "busy", code="queue_full").body() == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}


# --- images ------------------------------------------------------------------------------------------


def test_open_image_equals_the_runtime_loader_on_the_same_file(tmp_path):
    rng = np.random.RandomState(1)
    rgb = Image.fromarray((rng.rand(20, 30, 3) * 255).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on load
    cases = {"rotated.jpg": lambda f: rgb.save(f, "JPEG", exif=exif),
             "palette.png": lambda f: rgb.convert("P").save(f, "PNG", transparency=0),
             "gray.png": lambda f: rgb.convert("L").save(f, "PNG"),
             "rgba.png": lambda f: rgb.convert("RGBA").save(f, "PNG")}
    for name, save in cases.items():
        path = tmp_path / name
        save(path)
        ours, theirs = open_image(path.read_bytes()), load_image(path)
        assert ours.mode == "RGB" and ours.size == theirs.size, name
        # the runtime converts a PIL input once more (a PNG colour key): compare what generate() sees
        assert np.array_equal(np.asarray(load_image(ours)), np.asarray(theirs)), name
    assert open_image((tmp_path / "rotated.jpg").read_bytes()).size == (20, 30)  # EXIF applied


def test_unreadable_images_are_400(tmp_path):
    ref = P.ImageRef("data", data_url(b"not an image at all"))
    with pytest.raises(P.APIError) as info:
        load_request_image(ref, ImageLimits())
    assert (info.value.status, info.value.code) == (400, "invalid_image")
    assert "cannot read the image" in str(info.value)
    huge = io.BytesIO()
    Image.new("1", (70000, 1000)).save(huge, "PNG")  # 70 M pixels, a small file
    with pytest.raises(P.APIError, match="downscale it first"):
        load_request_image(P.ImageRef("data", data_url(huge.getvalue())), ImageLimits())


def test_read_file(tmp_path):
    path = tmp_path / "a b.png"
    path.write_bytes(png_bytes())
    assert read_file(path.as_uri(), 1 << 20) == path.read_bytes()
    assert read_file(str(path), 1 << 20) == path.read_bytes()
    for url, max_bytes, what in ((str(tmp_path / "missing.png"), 1 << 20, "No such file"),
                                 (str(path), 10, "over this server's limit"),
                                 ("file:relative.png", 1 << 20, "absolute path")):
        with pytest.raises(P.APIError, match=what):
            read_file(url, max_bytes)


@pytest.fixture(scope="module")
def http_images():
    """A loopback HTTP server: /ok.png, /big (Content-Length over 100 bytes), /slow (an image sent in
    pieces over 2 s), /404."""
    body = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/404":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/slow":
                for i in range(0, len(body), 16):
                    self.wfile.write(body[i:i + 16])
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


def test_download(http_images):
    base, body = http_images
    assert download(f"{base}/ok.png", ImageLimits()) == body
    for path, limits, code in (("/ok.png", ImageLimits(max_bytes=100), "image_too_large"),
                               ("/404", ImageLimits(), "invalid_image"),
                               ("/slow", ImageLimits(url_timeout_s=0.3), "image_timeout")):
        t0 = time.monotonic()
        with pytest.raises(P.APIError) as info:
            download(base + path, limits)
        assert info.value.status == 400 and info.value.code == code, (path, info.value)
        assert time.monotonic() - t0 < 1.5
    assert "HTTP 404" in str(pytest.raises(P.APIError, download, f"{base}/404", ImageLimits()).value)


# --- metrics -----------------------------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a text exposition, checking every sample has a TYPE line."""
    values, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            base = key.split("{")[0]
            assert any(base == n or base in (f"{n}_bucket", f"{n}_sum", f"{n}_count") for n in types), line
            values[key] = float(value)
    return values


def test_metrics_text():
    m = Metrics(lambda: {"dart_requests_running": ("Running.", 2)})
    m.response(200)
    m.response(200)
    m.response(429)
    m.first_token(0.004)
    m.token_gap(0.002)
    timings = {"prompt_tokens": 599, "kept_tokens": 91, "vision_tokens": 576, "kept_vision_tokens": 68,
               "new_tokens": 20}
    m.generation(timings, 0.3)
    m.generation({**timings, "vision_tokens": 0, "kept_vision_tokens": 0}, 2.0, cancelled=True)
    v = parse_prometheus(m.render())
    assert v['dart_requests_total{code="200"}'] == 2 and v['dart_requests_total{code="429"}'] == 1
    assert v["dart_requests_cancelled_total"] == 1 and v["dart_completion_tokens_total"] == 40
    assert v["dart_prompt_tokens_total"] == 1198 and v["dart_kept_vision_tokens_total"] == 68
    assert v['dart_time_to_first_token_seconds_bucket{le="0.0025"}'] == 0
    assert v['dart_time_to_first_token_seconds_bucket{le="0.005"}'] == 1
    assert v['dart_time_to_first_token_seconds_bucket{le="+Inf"}'] == 1
    assert v["dart_request_duration_seconds_count"] == 2 and v["dart_request_duration_seconds_sum"] == 2.3
    assert v['dart_request_duration_seconds_bucket{le="0.5"}'] == 1
    assert v["dart_kept_vision_token_ratio_count"] == 1  # the text-only generation has no ratio
    assert v['dart_kept_vision_token_ratio_bucket{le="0.111"}'] == 0  # 68 / 576 = 0.118
    assert v['dart_kept_vision_token_ratio_bucket{le="0.15"}'] == 1
    assert v["dart_requests_running"] == 2


# --- the worker pool ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def emit(self, ev):
        with self.lock:
            self.events.append(ev)


def blocking_job(rec, name, gate: threading.Event, started: list):
    def run(job):
        started.append(name)
        while not gate.wait(0.01):
            if job.cancelled:
                return f"{name} cancelled"
        return f"{name} done"

    return Job(run, rec.emit)


def test_pool_bounds_orders_and_cancels():
    rec, gate, started = Recorder(), threading.Event(), []
    pool = WorkerPool(1, 2, on_dropped=lambda job: "dropped")
    jobs = [blocking_job(rec, f"j{i}", gate, started) for i in range(4)]
    for job in jobs[:3]:
        pool.submit(job)
    with pytest.raises(QueueFull):  # 1 running + 2 waiting
        pool.submit(jobs[3])
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (pool.running, pool.waiting) == (1, 2)
    jobs[1].cancel()  # waiting: dropped without running
    gate.set()
    for job in jobs[:3]:
        assert job.done.wait(5)
    time.sleep(0.05)
    assert started == ["j0", "j2"] and rec.events == ["j0 done", "dropped", "j2 done"]
    assert (pool.running, pool.waiting) == (0, 0)
    pool.submit(jobs[3])  # slots are free again
    assert jobs[3].done.wait(5)
    pool.shutdown()
    with pytest.raises(ShuttingDown):
        pool.submit(blocking_job(rec, "late", gate, started))


def test_pool_frees_the_slot_before_the_final_event_and_shutdown_cancels():
    seen = []
    pool = WorkerPool(1, 0)
    job = Job(lambda job: "final", lambda ev: seen.append((ev, pool.running, pool.waiting)))
    pool.submit(job)
    assert job.done.wait(5)
    time.sleep(0.05)
    assert seen == [("final", 0, 0)]  # a client reading "final" can submit again at once
    rec, gate, started = Recorder(), threading.Event(), []
    running = blocking_job(rec, "r", gate, started)
    pool.submit(running)
    while not started:
        time.sleep(0.01)
    pool.shutdown(timeout=5)
    assert running.cancelled and rec.events == ["r cancelled"]


def test_pool_survives_a_job_that_raises(caplog):
    pool = WorkerPool(1, 0)
    bad = Job(lambda job: 1 / 0, lambda ev: None)
    pool.submit(bad)
    assert bad.done.wait(5)
    ok = Job(lambda job: "ok", lambda ev: None)
    pool.submit(ok)
    assert ok.done.wait(5)
    pool.shutdown()
    assert "a job failed outside its own error handling" in caplog.text


# --- the CLI's flags ---------------------------------------------------------------------------------


def test_parse_args_fills_the_config():
    cfg = parse_args(["--engine-dir", "e", "--port", "0", "--workers", "2", "--queue-size", "0",
                      "--max-body-mib", "0.5", "--allow-local-files", "--url-timeout", "2",
                      "--model-name", "m", "--threads", "1", "-v"])
    assert cfg == ServeConfig(engine_dir=cfg.engine_dir, port=0, workers=2, queue_size=0,
                              max_body_bytes=MIB // 2, allow_local_files=True, url_timeout_s=2.0,
                              model_name="m", threads=1, verbose=True)
    assert parse_args(["--engine-dir", "engines/llava-tiny"]).served_name == "llava-tiny"
    assert parse_args(["--engine-dir", "e", "--ray", "--replicas", "2"]).replicas == 2


@pytest.mark.parametrize("argv, what", [
    (["--workers", "0"], "workers must be >= 1"), (["--queue-size", "-1"], "queue size must be >= 0"),
    (["--max-body-mib", "0"], "max body MiB must be > 0"), (["--url-timeout", "inf"], "url timeout"),
    (["--port", "65536"], "port must be"), (["--replicas", "2"], "--replicas needs --ray"),
    (["--provider", "tensorrt", "--workers", "2"], "not thread-safe"),
])
def test_usage_errors_exit_2_with_one_line(argv, what, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--engine-dir", "e", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and what in err and err.count("\n") == 1


# --- a generation's errors, and what imports what ----------------------------------------------------


class FailingPipeline:
    """A pipeline whose prepare() raises `exc` (the generation's error mapping, without an engine)."""

    manifest = None

    def __init__(self, exc):
        self.exc = exc

    def prepare(self, request):
        raise self.exc


@pytest.mark.parametrize("exc, status, code, message", [
    (InputError("prompt has 3000 tokens; this engine was exported for at most 2048"), 400, "invalid_input",
     "prompt has 3000 tokens; this engine was exported for at most 2048"),
    (EngineError("decoder: onnxruntime failed (boom)"), 500, "engine_error",
     "decoder: onnxruntime failed (boom)"),
    (RuntimeError("a bug\nwith a second line"), 500, "internal_error",
     "internal error (the server's log has"),
])
def test_generation_errors_map_to_statuses(exc, status, code, message, caplog):
    events = []
    gen = Generator(FailingPipeline(exc), Metrics(), ImageLimits())
    final = gen(Job(gen, events.append, P.ChatRequest(prompt="hi")))
    assert isinstance(final, Failed) and events == []
    assert (final.error.status, final.error.code) == (status, code)
    assert final.error.message.startswith(message)
    assert "second line" not in final.error.message
    if isinstance(exc, RuntimeError):
        assert "Traceback" in caplog.text and "a bug" in caplog.text  # logged here, never sent


def test_serve_modules_import_without_fastapi_or_torch():
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, starlette=None, torch=None, "
            "transformers=None)\n"
            "import runtime.serve, runtime.serve.protocol, runtime.serve.workers, runtime.serve.generation, "
            "runtime.serve.metrics, runtime.serve.images, runtime.serve.config\n"
            "from runtime.serve.__main__ import main\n"
            "sys.exit(main(['--engine-dir', 'e', '--port', '0']))")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == "error: the server needs the serve extra (uvicorn is not installed): pip install " \
                       "'dart-vlm[serve]'\n"
