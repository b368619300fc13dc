"""Ray Serve scale-out (runtime/serve/ray_app.py).

Unit tests (no Ray needed): the deployment's options, the per-replica thread split, the application
builder's arguments. End to end (skipped, with the reason, where ray[serve] is not installed):
`python -m runtime.serve --ray --replicas 2` on a private local Ray instance (loopback, no dashboard)
called through the real openai client: the answers (plain, streamed, concurrent) are the runtime's own
greedy answers token for token; two replica processes answer (/health reports each replica's pid);
SIGTERM shuts Serve and Ray down with exit code 0 and leaves no Ray process behind. About 25 s on 2
cores, plus the llava-tiny export (session fixture) when this file runs alone.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.errors import InputError
from runtime.serve import ray_app
from runtime.serve.config import ServeConfig

NO_RAY = "ray[serve] is not installed (pip install 'ray[serve]==2.60.0', the ray extra): not tested here"
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "sample.png"
PROMPT = "What is in the picture?"
RATIO = 0.5
MAX_TOKENS = 8
START_TIMEOUT_S = 150  # Ray start + 2 replicas loading the engine; ~20 s on 2 idle cores
STOP_TIMEOUT_S = 60


# --- the deployment's settings (no Ray needed) ---------------------------------------------------------


def test_deployment_options_follow_the_config():
    cfg = ServeConfig(engine_dir=Path("e"), replicas=3, threads=2, workers=2, queue_size=5)
    assert ray_app.deployment_options(cfg) == {
        "name": "DartVLM", "num_replicas": 3, "ray_actor_options": {"num_cpus": 2, "num_gpus": 0},
        "max_ongoing_requests": 2, "max_queued_requests": 15,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1}}
    no_queue = ServeConfig(engine_dir=Path("e"), queue_size=0)
    assert ray_app.deployment_options(no_queue)["max_queued_requests"] == 1
    inner = ray_app.replica_config(cfg)
    assert (inner.threads, inner.ray, inner.replicas, inner.workers) == (2, False, 1, 2)
    assert inner.engine_dir == Path("e")
    with pytest.raises(InputError, match="tensorrt provider runs one generation at a time"):  # before Ray
        ray_app.build(ServeConfig(engine_dir=Path("e"), provider="tensorrt", workers=2))


def test_replica_threads_default_splits_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ray_app.replica_threads(ServeConfig(engine_dir=Path("e"), replicas=3)) == 2  # 8 // 3
    assert ray_app.replica_threads(ServeConfig(engine_dir=Path("e"), replicas=16)) == 1
    assert ray_app.replica_threads(ServeConfig(engine_dir=Path("e"), replicas=16, threads=4)) == 4


def test_resources_are_checked_before_ray_waits_forever(caplog):
    cfg = ServeConfig(engine_dir=Path("e"), replicas=4, threads=2)
    assert ray_app.missing_resources(cfg, {"CPU": 8.0}) is None
    ray_app.check_resources(cfg, {"CPU": 8.0}, strict=True)
    cfg = ServeConfig(engine_dir=Path("e"), replicas=5, threads=2)
    with pytest.raises(InputError, match=r"^the replicas need 10 CPUs \(5 replicas x 2\), 8 available"):
        ray_app.check_resources(cfg, {"CPU": 8.0}, strict=True)
    # a cluster may grow: a warning only (captured at WARNING on the module's logger whatever level an
    # earlier test's main() left on "runtime")
    with caplog.at_level(logging.WARNING, logger="runtime.serve.ray_app"):
        ray_app.check_resources(cfg, {"CPU": 8.0}, strict=False)
    assert "the replicas need 10 CPUs" in caplog.text
    gpu = ServeConfig(engine_dir=Path("e"), replicas=2, threads=1, provider="cuda")
    assert ray_app.replica_resources(gpu) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_app.missing_resources(gpu, {"CPU": 8.0}) == (
        "the replicas need 2 GPUs (2 replicas x 1), 0 available: lower --replicas or --threads (each replica "
        "reserves --threads CPUs, and a GPU with a GPU provider), or use a larger Ray cluster (RAY_ADDRESS)")
    assert ray_app.missing_resources(gpu, {"CPU": 2.0, "GPU": 2.0}) is None


def test_app_builder_args_as_serve_run_and_config_files_send_them():
    # `serve run runtime.serve.ray_app:app_builder engine_dir=... replicas=2 ...`: every value a string
    cfg = ray_app.config_from_args({"engine_dir": "/m/llava", "replicas": "2", "threads": "3", "workers": "2",
                                    "queue_size": "0", "allow_local_files": "true", "url_timeout_s": "2.5",
                                    "model_name": "llava", "provider": "cuda"})
    assert cfg == ServeConfig(engine_dir=Path("/m/llava"), replicas=2, threads=3, workers=2, queue_size=0,
                              allow_local_files=True, url_timeout_s=2.5, model_name="llava", provider="cuda")
    # a Serve config file's `args:` mapping: YAML has already typed them
    cfg = ray_app.config_from_args({"engine_dir": "/m/llava", "replicas": 4, "threads": None})
    assert (cfg.engine_dir, cfg.replicas, cfg.threads) == (Path("/m/llava"), 4, None)
    with pytest.raises(InputError, match="unknown argument.*replica_count"):
        ray_app.config_from_args({"engine_dir": "e", "replica_count": 2})
    with pytest.raises(InputError, match="needs engine_dir"):
        ray_app.config_from_args({"replicas": 2})
    with pytest.raises(InputError, match=r"replicas='two': not a int"):
        ray_app.config_from_args({"engine_dir": "e", "replicas": "two"})
    with pytest.raises(InputError, match=r"allow_local_files='maybe'"):
        ray_app.config_from_args({"engine_dir": "e", "allow_local_files": "maybe"})


@pytest.mark.parametrize("flags, what", [
    (["--replicas", "2", "--threads", "1"], "nope"),  # the engine directory is read before Ray starts
    (["--replicas", "64", "--threads", "4"], "the replicas need 256 CPUs (64 replicas x 4)"),
])
def test_failures_before_ray_starts_are_one_line(tmp_path, flags, what):
    pytest.importorskip("ray", reason=NO_RAY)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "runtime.serve", "--engine-dir", str(tmp_path / "nope"), "--ray", *flags]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and what in r.stderr
    assert time.monotonic() - t0 < 20  # no Ray instance was started


def test_port_0_with_ray_is_a_usage_error():
    """Serve's proxy binds a fixed port: --ray --port 0 is refused before anything runs (exit 2)."""
    cmd = [sys.executable, "-m", "runtime.serve", "--engine-dir", "nope", "--ray", "--port", "0"]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "port 0 (any free port) does not apply with Ray Serve" in r.stderr


# --- end to end: python -m runtime.serve --ray --replicas 2 --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(marker: str) -> list[str]:
    """Live processes whose command line or environment mentions `marker` (our RAY_TMPDIR): the
    raylet, GCS, workers and replicas this test's Ray instance started."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker.encode() in cmd or marker.encode() in env):
            found.append(f"{pid}: " + cmd.replace(b"\0", b" ").decode(errors="replace")[:120])
    return found


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class RayServer:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, tmpdir: str):
        self.proc, self.port, self.log, self.tmpdir = proc, port, log, tmpdir
        self.base_url = f"http://127.0.0.1:{port}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self) -> float:
        """Until the `serving ... through Ray Serve` line (printed once every replica is ready and the
        shutdown handlers are in place) and a /health answer."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "through Ray Serve" in self.log.read_text(errors="replace"):
                try:
                    _get(self.base_url + "/health", timeout=2.0)
                    return time.monotonic() - t0
                except OSError:
                    pass
            time.sleep(0.5)
        pytest.fail(f"not ready within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM the server (it shuts Serve and Ray down), then make sure its group is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def ray_server(request, tmp_path_factory):
    pytest.importorskip("ray.serve", reason=NO_RAY)
    pytest.importorskip("fastapi", reason="the server needs fastapi (the serve extra)")
    pytest.importorskip("openai", reason="the test client is the openai package")
    engine, _ = request.getfixturevalue("tiny_engine")  # after the skips: no export when skipped
    port = _free_port()
    # A short private RAY_TMPDIR (Ray's unix socket paths must stay short): it also marks this instance's
    # processes, so the teardown can check that none is left.
    tmpdir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=tmpdir, PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
    log = tmp_path_factory.mktemp("ray") / "server.log"
    cmd = [sys.executable, "-m", "runtime.serve", "--engine-dir", str(engine), "--ray", "--replicas", "2",
           "--threads", "1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = RayServer(proc, port, log, tmpdir)
    try:
        server.started_s = server.wait_ready()
        yield server
    finally:
        server.stop()
        server.kill_group()  # only what SIGTERM left (the test below asserts it left nothing)
        shutil.rmtree(tmpdir, ignore_errors=True)  # Ray's session logs


@pytest.fixture(scope="module")
def pipe(request):
    import runtime

    return runtime.load(request.getfixturevalue("tiny_engine")[0])  # (not an argument: pytest would build the
    # session-scoped engine before ray_server's skips)


@pytest.fixture(scope="module")
def expected(pipe):
    return pipe.generate(PROMPT, image=IMAGE, keep_ratio=RATIO, max_new_tokens=MAX_TOKENS)


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _messages() -> list[dict]:
    import base64

    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _ask(client, model: str):
    return client.chat.completions.create(model=model, messages=_messages(), max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"keep_ratio": RATIO})


@pytest.mark.slow
def test_two_replicas_answer_as_the_runtime_does(ray_server, expected):
    client = _client(ray_server)
    model = client.models.list().data[0].id
    assert expected.token_ids, "the reference answer is empty; pick another prompt"

    out = _ask(client, model)
    assert out.choices[0].message.content == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.prompt_tokens == expected.timings["prompt_tokens"]

    pieces, usage = [], None
    stream = client.chat.completions.create(model=model, messages=_messages(), max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, extra_body={"keep_ratio": RATIO},
                                            stream_options={"include_usage": True})
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == expected.text
    assert usage.completion_tokens == len(expected.token_ids)

    with ThreadPoolExecutor(4) as pool:  # more than one replica's worker: Serve queues and spreads them
        answers = list(pool.map(lambda _: _ask(_client(ray_server), model), range(4)))
    texts = [a.choices[0].message.content for a in answers]
    assert texts == [expected.text] * 4


@pytest.mark.slow
def test_requests_reach_two_replica_processes(ray_server):
    import json

    pids = set()
    for _ in range(60):
        doc = json.loads(_get(ray_server.base_url + "/health"))
        assert doc["status"] == "ok"
        pids.add(doc["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, f"60 /health calls reached only the replica(s) {pids}"
    assert ray_server.proc.pid not in pids  # replicas are Ray actors, not the driver


@pytest.mark.slow
def test_serving_md_python_example_runs_against_the_replicas(ray_server, pipe, monkeypatch, capsys):
    """docs/SERVING.md's openai example, as written (only the base URL changed), through Ray Serve."""
    import re

    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "SERVING.md").read_text(), re.DOTALL)
    assert len(code) == 1
    assert "http://127.0.0.1:8000/v1" in code[0]
    monkeypatch.chdir(ROOT)  # it reads examples/sample.png
    code = code[0].replace("http://127.0.0.1:8000/v1", ray_server.base_url + "/v1")
    exec(compile(code, "SERVING.md", "exec"), {})  # noqa: S102 (our own docs)
    ref = pipe.generate("What is in the picture?", image=IMAGE, keep_ratio=0.111, max_new_tokens=32)
    finish = "length" if len(ref.token_ids) == 32 else "stop"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{ref.text} {finish}"
    assert lines[1] == f"{ref.timings['prompt_tokens']} {len(ref.token_ids)}"
    assert f"'kept_vision_tokens': {ref.timings['kept_vision_tokens']}" in lines[2]


@pytest.mark.slow
def test_sigterm_shuts_down_ray_and_leaves_no_process(ray_server):
    assert _ray_processes(ray_server.tmpdir), "the marker finds no Ray process while the server runs"
    t0 = time.monotonic()
    code = ray_server.stop()
    took = time.monotonic() - t0
    assert code == 0, f"exit code {code} after SIGTERM ({took:.1f} s):\n{ray_server.log_tail()}"
    deadline = time.monotonic() + 20  # Ray's processes exit shortly after the driver
    while (left := _ray_processes(ray_server.tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "Ray processes left after shutdown:\n" + "\n".join(left)
    with pytest.raises(OSError):
        _get(ray_server.base_url + "/health", timeout=2.0)
