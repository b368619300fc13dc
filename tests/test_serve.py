"""python -m runtime.serve as a real process on 127.0.0.1, driven by the real `openai` client (and
httpx where the test needs the raw wire): answers equal runtime.load(...).generate(...) for the same
seed and ratio, usage and DART's kept counts are right, every error is its status with OpenAI's
error JSON and the server keeps serving, a client that disconnects stops its generation, /metrics.

One server for the module, started with --workers 1 --queue-size 0 (a second concurrent request is
429) --max-body-mib 1 (a 1.5 MiB body is 413) --allow-local-files. Unit tests without a server:
tests/test_serve_protocol.py.
"""

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from test_serve_protocol import parse_prometheus

import runtime

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llava-tiny"
INCLUDE_USAGE = {"include_usage": True}
LONG = 3000  # tokens of a generation that runs ~3 s on llava-tiny: long enough to cancel in the middle


class ServerProcess:
    """`python -m runtime.serve ...` with its stderr collected; url once it listens."""

    def __init__(self, engine_dir: Path, *flags: str):
        cmd = [sys.executable, "-m", "runtime.serve", "--engine-dir", str(engine_dir), "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.match(r"serving \S+ on (http://\S+) ", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or self.url is None:
            self.stop()
            raise AssertionError(f"the server did not start: {self.log}")
        r = httpx.get(f"{self.url}/health", timeout=30)  # the socket listens before the line is printed
        assert r.status_code == 200 and r.json()["status"] == "ok", self.log

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = ServerProcess(tiny_engine[0], "--workers", "1", "--queue-size", "0", "--max-body-mib", "1",
                      "--allow-local-files")
    yield s
    code = s.stop()
    assert code == 0, s.log  # SIGTERM: a graceful stop
    assert "Traceback" not in s.log and "ERROR" not in s.log, s.log


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return runtime.load(tiny_engine[0])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(path, data: URL) of an 80x64 PNG."""
    path = tmp_path_factory.mktemp("serve") / "picture.png"
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 80, 3) * 255).astype("uint8")).save(path)
    return path, f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


def messages(text: str, url: str | None = None) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if url:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


def dart(usage) -> dict:
    return usage.model_dump()["dart"]


def expected_usage(out, keep_ratio=None, keep_tokens=None) -> dict:
    t = out.timings
    return {"prompt_tokens": t["prompt_tokens"], "completion_tokens": len(out.token_ids),
            "total_tokens": t["prompt_tokens"] + len(out.token_ids),
            "dart": {"keep_ratio": keep_ratio, "keep_tokens": keep_tokens,
                     "vision_tokens": t["vision_tokens"], "kept_vision_tokens": t["kept_vision_tokens"],
                     "kept_tokens": t["kept_tokens"]}}


def usage_dict(usage) -> dict:
    d = usage.model_dump(exclude_none=True)
    return {k: d[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens", "dart")}


def metrics(server) -> dict[str, float]:
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(r.text)


def assert_serving(client):
    r = client.chat.completions.create(model=MODEL, messages=messages("still there?"), max_tokens=2,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 2


def wait_idle(server, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (m := metrics(server))["dart_requests_running"] or m["dart_requests_waiting"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    return m


# --- answers equal the runtime's ---------------------------------------------------------------------

SAMPLING = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.9, "seed": 7}}


@pytest.mark.parametrize("mode", SAMPLING)
def test_non_streaming_equals_generate(client, pipe, image, mode):
    path, url = image
    kw = SAMPLING[mode]
    r = client.chat.completions.create(model=MODEL, messages=messages("What is this?", url), max_tokens=24,
                                       extra_body={"keep_ratio": 0.25}, **kw)
    out = pipe.generate("What is this?", image=path, keep_ratio=0.25, max_new_tokens=24, **kw)
    assert r.choices[0].message.content == out.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(out.token_ids) == 24 else "stop")
    assert usage_dict(r.usage) == expected_usage(out, keep_ratio=0.25)
    assert r.model == MODEL and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert dart(r.usage)["kept_vision_tokens"] == 4 + 8 * (144 // 8)  # round(0.25 * 576) = 144: T = 18


@pytest.mark.parametrize("mode", SAMPLING)
def test_streaming_equals_generate(client, pipe, image, mode):
    path, url = image
    kw = SAMPLING[mode]
    stream = client.chat.completions.create(model=MODEL, messages=messages("Describe it.", url),
                                            max_tokens=20, stream=True, stream_options=INCLUDE_USAGE, **kw)
    chunks = list(stream)
    out = pipe.generate("Describe it.", image=path, max_new_tokens=20, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.text
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(out.token_ids) == 20 else "stop"]
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == [] and usage_dict(chunks[-1].usage) == expected_usage(out, keep_ratio=0.111)


def test_sse_wire_format(server, image):
    body = {"model": MODEL, "messages": messages("Hi", image[1]), "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all("usage" not in p for p in payloads)  # no include_usage: no usage field at all
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"]


def test_local_file_equals_data_url(client, image):
    path, url = image
    a, b = (client.chat.completions.create(model=MODEL, messages=messages("What?", u), max_tokens=8,
                                           temperature=0)
            for u in (url, path.as_uri()))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert usage_dict(a.usage) == usage_dict(b.usage)


def test_system_message_is_prepended(client, pipe):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    out = pipe.generate("Be brief.\n\nHello", max_new_tokens=6)
    assert r.choices[0].message.content == out.text and r.usage.prompt_tokens == out.timings["prompt_tokens"]


@pytest.mark.parametrize("extra, kept_vision", [
    ({}, 68),  # the manifest's 0.111: budget 64, T = 8, 4 + 8 * 8
    ({"keep_ratio": 1.0}, 576),
    ({"keep_ratio": 0.5}, 4 + 8 * 36),  # budget 288, T = 36
    ({"keep_tokens": 16}, 4 + 8 * 2),  # T = 16 // 8
    ({"keep_tokens": 0}, 4),  # the image pivots only
])
def test_keep_ratio_and_keep_tokens_set_the_kept_counts(client, pipe, image, extra, kept_vision):
    path, url = image
    r = client.chat.completions.create(model=MODEL, messages=messages("What is this?", url), max_tokens=3,
                                       temperature=0, extra_body=extra)
    out = pipe.generate("What is this?", image=path, max_new_tokens=3, **extra)
    ratio = None if "keep_tokens" in extra else extra.get("keep_ratio", 0.111)
    assert usage_dict(r.usage) == expected_usage(out, keep_ratio=ratio, keep_tokens=extra.get("keep_tokens"))
    d = dart(r.usage)
    assert (d["vision_tokens"], d["kept_vision_tokens"]) == (576, kept_vision)
    assert d["kept_tokens"] == r.usage.prompt_tokens - 576 + kept_vision
    assert r.choices[0].message.content == out.text


def test_text_only_request_is_not_pruned(client, pipe):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=4, temperature=0)
    d = dart(r.usage)
    assert (d["vision_tokens"], d["kept_vision_tokens"], d["kept_tokens"]) == (0, 0, r.usage.prompt_tokens)
    assert r.choices[0].message.content == pipe.generate("Hello", max_new_tokens=4).text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_ends_the_generation(client, pipe, image, stream):
    path, url = image
    full = pipe.generate("What is this?", image=path, max_new_tokens=40)
    stop = full.text[12:15]  # three characters from the middle of the greedy answer
    cut = full.text[:full.text.find(stop)]
    used = next(k for k in range(1, 41) if stop in pipe.prompt.decode(full.token_ids[:k]))
    kw = {"model": MODEL, "messages": messages("What is this?", url), "max_tokens": 40, "temperature": 0,
          "stop": [stop, "\x00"]}
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options=INCLUDE_USAGE))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
    else:
        r = client.chat.completions.create(**kw)
        text, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    assert (text, reason, usage.completion_tokens) == (cut, "stop", used)
    assert used < len(full.token_ids)


def test_ignore_eos_generates_exactly_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=50, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (50, "length")


# --- errors ------------------------------------------------------------------------------------------


def post(server, body, timeout=30) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=timeout)


def assert_error(r: httpx.Response, status: int, code: str | None, text: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and text in err["message"]
    assert "Traceback" not in r.text and "\n" not in err["message"]


@pytest.mark.parametrize("case", ["bad base64", "unreadable image", "unsupported part", "two images",
                                  "prompt too long", "n=2", "another model", "bad json",
                                  "stream_options alone"])
def test_bad_requests_are_400_and_the_server_keeps_serving(server, client, image, case):
    url = image[1]
    garbage = base64.b64encode(b"these bytes are no image").decode()
    bodies = {
        "bad base64": (messages("x", "data:image/png;base64,not*base64"), 400, "invalid_base64",
                       "not valid base64"),
        "unreadable image": (messages("x", f"data:image/png;base64,{garbage}"), 400, "invalid_image",
                             "cannot read the image"),
        "unsupported part": ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 400,
                             "unsupported_content", "unsupported content part type 'input_audio'"),
        "two images": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 2}],
                       400, "too_many_images", "2 images"),
        "prompt too long": (messages("hello " * 800, url), 400, "invalid_input",
                            "this engine was exported for at most 2048"),
    }
    if case in bodies:
        msgs, status, code, text = bodies[case]
        r = post(server, {"model": MODEL, "messages": msgs, "max_tokens": 4})
    elif case == "n=2":
        r = post(server, {"model": MODEL, "messages": messages("x"), "n": 2})
        status, code, text = 400, None, "n must be 1"
    elif case == "another model":
        r = post(server, {"model": "gpt-4o", "messages": messages("x")})
        status, code, text = 404, "model_not_found", "'gpt-4o' is not served here"
    elif case == "bad json":
        r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{oops", timeout=30)
        status, code, text = 400, None, "not valid JSON"
    else:
        r = post(server, {"model": MODEL, "messages": messages("x"), "stream_options": INCLUDE_USAGE})
        status, code, text = 400, None, "only allowed with stream"
    assert_error(r, status, code, text)
    assert_serving(client)


def test_openai_client_raises_the_status(client, image):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages("x", image[1]), n=2)
    assert info.value.status_code == 400 and "n must be 1" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # a streaming request checks first, too
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image[1]}}] * 2}], stream=True)
    assert info.value.code == "too_many_images"
    with pytest.raises(openai.BadRequestError) as info:  # found by the runtime, before the stream begins
        client.chat.completions.create(model=MODEL, messages=messages("hello " * 800, image[1]), stream=True)
    assert info.value.code == "invalid_input" and "at most 2048" in info.value.message
    assert_serving(client)


def test_body_over_the_limit_is_413(server, client):
    big = "data:image/png;base64," + "A" * (3 << 19)  # 1.5 MiB of base64 in a 1 MiB server
    r = post(server, {"model": MODEL, "messages": messages("x", big)})
    assert_error(r, 413, "request_too_large", "over this server's limit of 1048576 bytes")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=messages("x", big))
    assert info.value.status_code == 413
    # a chunked body (no Content-Length) is counted as it arrives
    chunked = iter([b"{" + b" " * (1 << 20), b"}"])
    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunked, timeout=30)
    assert_error(r, 413, "request_too_large", "over this server's limit")
    assert_serving(client)


def test_unknown_route_and_method(server, client):
    assert_error(httpx.get(f"{server.url}/v1/nothing"), 404, None, "no route GET /v1/nothing")
    assert_error(httpx.get(f"{server.url}/v1/chat/completions"), 405, None, "GET is not allowed")
    assert_error(httpx.get(f"{server.url}/v1/models/other"), 404, "model_not_found", "'other'")
    assert_serving(client)


def long_stream(server):
    """A streaming request of LONG tokens (ignore_eos); returns (response, lines) after its first chunk."""
    body = {"model": MODEL, "messages": messages("Go on."), "max_tokens": LONG, "temperature": 0,
            "stream": True, "ignore_eos": True}
    ctx = httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30)
    r = ctx.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(lines).startswith("data: {")
    return ctx, lines


def test_queue_full_is_429_and_a_disconnect_stops_the_generation(server, client):
    before = wait_idle(server)
    ctx, lines = long_stream(server)
    next(lines), next(lines)  # a few tokens in: it is running
    assert metrics(server)["dart_requests_running"] == 1
    with pytest.raises(openai.RateLimitError) as info:  # --workers 1 --queue-size 0
        client.chat.completions.create(model=MODEL, messages=messages("x"), max_tokens=2)
    assert info.value.response.headers["retry-after"] == "1" and "busy" in info.value.message
    ctx.__exit__(None, None, None)  # the client goes away mid-stream
    after = wait_idle(server)
    assert after["dart_requests_cancelled_total"] == before["dart_requests_cancelled_total"] + 1
    generated = after["dart_completion_tokens_total"] - before["dart_completion_tokens_total"]
    assert 2 <= generated < LONG // 3, generated  # stopped early, not after LONG tokens
    assert after['dart_requests_total{code="429"}'] == before.get('dart_requests_total{code="429"}', 0) + 1
    assert_serving(client)


def test_a_non_streaming_client_that_leaves_stops_its_generation(server, client):
    before = wait_idle(server)
    body = {"model": MODEL, "messages": messages("Go on."), "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, body, timeout=httpx.Timeout(30, read=0.3))
    after = wait_idle(server)  # the handler notices within POLL_S (0.5 s) and cancels
    assert after["dart_requests_cancelled_total"] == before["dart_requests_cancelled_total"] + 1
    assert after["dart_completion_tokens_total"] - before["dart_completion_tokens_total"] < LONG // 2
    assert_serving(client)


def test_workers_sharing_one_pipeline_give_the_sequential_answers(pipe, image):
    """The concurrency model without HTTP: 2 worker threads, one pipeline, 4 requests at once (mixed
    images, ratios and sampling) answer as generate() does one at a time."""
    from runtime.serve.generation import Done, Generator
    from runtime.serve.images import ImageLimits
    from runtime.serve.metrics import Metrics
    from runtime.serve.protocol import ChatRequest, ImageRef
    from runtime.serve.workers import Job, WorkerPool

    path, url = image
    requests = [ChatRequest("What is this?", ImageRef("data", url), 30, 0.0, keep_ratio=0.25),
                ChatRequest("Hello", None, 30, 0.9, 0.8, seed=5),
                ChatRequest("Describe it.", ImageRef("data", url), 30, 0.7, seed=1, keep_tokens=16),
                ChatRequest("Go on.", None, 30, 0.0, ignore_eos=True)]
    gen = Generator(pipe, Metrics(), ImageLimits())
    pool = WorkerPool(2, 2)
    finals: dict[int, list] = {i: [] for i in range(4)}
    jobs = [Job(gen, finals[i].append, r) for i, r in enumerate(requests)]
    for job in jobs:
        pool.submit(job)
    assert all(job.done.wait(60) for job in jobs)
    pool.shutdown()
    for i, r in enumerate(requests):
        out = pipe.generate(r.prompt, image=path if r.image else None, keep_ratio=r.keep_ratio,
                            keep_tokens=r.keep_tokens, max_new_tokens=30, temperature=r.temperature, top_p=r.top_p,
                            seed=r.seed, ignore_eos=r.ignore_eos)
        (done,) = [e for e in finals[i] if isinstance(e, Done)]
        assert done.text == out.text and done.usage["completion_tokens"] == len(out.token_ids), i


# --- models, health, metrics -------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["pid"] == server.proc.pid
    assert (h["workers"], h["queue_size"]) == (1, 0)


def test_metrics_count_one_request(server, client, image):
    before = wait_idle(server)
    r = client.chat.completions.create(model=MODEL, messages=messages("What is this?", image[1]),
                                       max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages("x"), n=3)
    after = wait_idle(server)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert (delta('dart_requests_total{code="200"}'), delta('dart_requests_total{code="400"}')) == (1, 1)
    assert delta("dart_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("dart_completion_tokens_total") == 12
    assert delta("dart_vision_tokens_total") == 576 and delta("dart_kept_vision_tokens_total") == 68
    assert delta("dart_kept_tokens_total") == dart(r.usage)["kept_tokens"]
    assert delta("dart_time_to_first_token_seconds_count") == 1
    assert delta("dart_time_per_output_token_seconds_count") == 11  # the gaps between 12 tokens
    assert delta("dart_request_duration_seconds_count") == 1
    assert delta("dart_kept_vision_token_ratio_count") == 1
    assert delta('dart_kept_vision_token_ratio_bucket{le="0.111"}') == 0  # 68 / 576 = 0.118
    assert delta('dart_kept_vision_token_ratio_bucket{le="0.15"}') == 1
    ttft_sum = delta("dart_time_to_first_token_seconds_sum")
    assert 0 < ttft_sum <= delta("dart_request_duration_seconds_sum")


# --- the command line --------------------------------------------------------------------------------


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.serve", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_failures_are_one_line(tmp_path, tiny_engine):
    r = run_cli("--engine-dir", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("--engine-dir", str(tiny_engine[0]), "--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot listen on 127.0.0.1:"), r.stderr
    assert r.stderr.count("\n") == 1
    r = run_cli("--engine-dir", "e", "--workers", "0")
    assert r.returncode == 2 and "workers must be >= 1" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("--help")
    assert r.returncode == 0 and "(default: 16)" in r.stderr + r.stdout and "examples:" in r.stdout


# --- the other families ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen2-vl-tiny", "llava-next-tiny"])
def family_server(request, tmp_path_factory):
    """(preset, server, pipeline) of the other families' tiny presets (about 25 s each to export):
    Qwen2-VL's M-RoPE positions, LLaVA-NeXT's tiles; both with a vision-token count that follows the
    image's size."""
    from export.build import build, parse_args

    preset = request.param
    out = tmp_path_factory.mktemp("family") / preset
    build(parse_args(["--model", preset, "--ratio", "0.333", "--out", str(out)]))
    s = ServerProcess(out)
    yield preset, s, runtime.load(out)
    assert s.stop() == 0, s.log
    assert "Traceback" not in s.log, s.log


@pytest.mark.parametrize("stream", [False, True])
def test_other_families_answer_as_generate(family_server, image, stream):
    preset, server, fpipe = family_server
    path, url = image
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    kw = {"temperature": 0.8, "top_p": 0.9, "seed": 11} if stream else {"temperature": 0.0}
    out = fpipe.generate("What is this?", image=path, keep_ratio=0.5, max_new_tokens=16, **kw)
    req = dict(model=preset, messages=messages("What is this?", url), max_tokens=16,
               extra_body={"keep_ratio": 0.5}, **kw)
    if stream:
        chunks = list(client.chat.completions.create(**req, stream=True, stream_options=INCLUDE_USAGE))
        text, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
    else:
        r = client.chat.completions.create(**req)
        text, usage = r.choices[0].message.content, r.usage
    assert text == out.text and usage_dict(usage) == expected_usage(out, keep_ratio=0.5)
    assert 0 < dart(usage)["kept_vision_tokens"] < dart(usage)["vision_tokens"]
