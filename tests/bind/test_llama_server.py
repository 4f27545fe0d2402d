"""The real llama.cpp server on the tiny model, in both runtimes that share its HTTP API.

Every server test runs against the embedded launcher (xllamacpp; a missing install FAILS the
test, it is a declared extra) and against the upstream ``llama-server`` binary: the one the
``LLAMA_SERVER`` environment variable names, else the one ``scripts/build-llama-server`` built
into ``third_party/`` (``.ci/run`` builds it, so CI always runs this tier). Only a checkout that
has neither skips that parameter, and says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from companion_runtime.bind.llama_server import (
    DEFAULT_CONTEXT_SIZE,
    EXIT_NOT_INSTALLED,
    EXIT_START_FAILED,
    EXIT_USAGE,
    INSTALL_COMMAND,
    MODULE,
    embedded_llama_command,
    llama_available,
)
from companion_runtime.bind.tiny_model import PRINTABLE_CHARACTERS, expected_greedy_completion
from tests.support.llama import (
    HOST,
    LLAMA_SERVER_ENV,
    LlamaServer,
    declaring_context,
    embedded_command,
    free_port,
    health_answer,
    running_llama_server,
    upstream_binary,
    upstream_command,
    write_model,
)

pytestmark = pytest.mark.integration

CommandFactory = Callable[[Path, int], list[str]]
REPOSITORY_SOURCE = Path(__file__).resolve().parents[2] / "src"
#: The grace period between SIGTERM and SIGKILL here, the supervisor's default ``kill_grace_s``.
STOP_GRACE_S = 5.0


def _upstream_factory(model: Path, port: int) -> list[str]:
    binary = upstream_binary()
    assert binary is not None
    return upstream_command(binary, model, port)


@pytest.fixture(
    params=[
        pytest.param("embedded", id="embedded"),
        pytest.param(
            "upstream",
            id="upstream",
            marks=pytest.mark.skipif(
                upstream_binary() is None,
                reason=f"no upstream llama-server: run scripts/build-llama-server or set "
                f"{LLAMA_SERVER_ENV}",
            ),
        ),
    ]
)
def command_factory(request: pytest.FixtureRequest) -> CommandFactory:
    if request.param == "embedded":
        # Not a skip: the llama extra is part of the tested install.
        assert llama_available(), f"xllamacpp is missing: {INSTALL_COMMAND}"
        return embedded_command
    return _upstream_factory


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def server(command_factory: CommandFactory, model: Path, tmp_path: Path) -> Iterator[LlamaServer]:
    with running_llama_server(command_factory(model, free_port()), tmp_path) as running:
        yield running


def _complete(client: httpx.Client, prompt: str, n_predict: int) -> str:
    response = client.post(
        "/completion", json={"prompt": prompt, "n_predict": n_predict, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    content = response.json()["content"]
    assert isinstance(content, str)
    return content


def _port_is_reusable(port: int) -> bool:
    # SO_REUSEADDR, as every server sets it: connections the old server closed may linger in
    # TIME_WAIT, but no process may still be listening on the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
            probe.listen()
        except OSError:
            return False
        return True


def test_health_goes_from_loading_to_ok(
    command_factory: CommandFactory, model: Path, tmp_path: Path
) -> None:
    # The 503 phase lasts only while the model loads (milliseconds for the tiny model), so a
    # single start may slip past it; over a few starts a tight poller must see it.
    histories: list[list[int | str]] = []
    for _ in range(3):
        with running_llama_server(command_factory(model, free_port()), tmp_path) as running:
            history = running.health_history
            histories.append(history)
            assert history[-1] == 200
            # Nothing but "not listening yet" and "loading" before the first 200.
            assert set(history[:-1]) <= {"refused", 503}
            first_503 = history.index(503) if 503 in history else len(history)
            assert "refused" not in history[first_503:]
            assert running.seconds_to_healthy < 10.0
            if 503 in history:
                break
    assert any(503 in history for history in histories), histories


def test_health_while_loading_says_so(
    command_factory: CommandFactory, model: Path, tmp_path: Path
) -> None:
    # Catch one 503 body: llama.cpp reports the loading state as a JSON error.
    for _ in range(5):
        port = free_port()
        with (tmp_path / f"{port}.log").open("wb") as log:
            process = subprocess.Popen(command_factory(model, port), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, body = health_answer(port)
                if status == 503:
                    assert b"loading" in body.lower()
                    return
                if status == 200:
                    break
        finally:
            process.kill()
            process.wait()
    pytest.fail("never saw /health answer 503 while the model loaded")


def test_greedy_completion_repeats_the_last_character(server: LlamaServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert _complete(client, "abc", 4) == expected_greedy_completion("abc", 4) == "cccc"
        # Deterministic: the same request gives the same answer.
        assert _complete(client, "abc", 4) == "cccc"
        # The rule holds for every printable character, not just one lucky prompt.
        for character in PRINTABLE_CHARACTERS:
            prompt = "x" + character
            assert _complete(client, prompt, 3) == expected_greedy_completion(prompt, 3)
        assert _complete(client, "end with a space ", 3) == "   "


def test_openai_completions_and_chat(server: LlamaServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        completion = client.post(
            "/v1/completions", json={"prompt": "xyz", "max_tokens": 5, "temperature": 0}
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"] == "zzzzz"

        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello?"},
                ],
                "max_tokens": 3,
                "temperature": 0,
            },
        )
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "???"}
        assert body["usage"]["completion_tokens"] == 3

        models = client.get("/v1/models")
        assert models.status_code == 200
        assert models.json()["data"]


def test_streamed_completion_arrives_as_incremental_sse_events(server: LlamaServer) -> None:
    n_predict = 64
    request = {"prompt": "abc", "n_predict": n_predict, "temperature": 0, "stream": True}
    reads: list[bytes] = []
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as client,
        client.stream("POST", "/completion", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reads.extend(chunk for chunk in response.iter_raw() if chunk)

    events = [
        json.loads(line.removeprefix("data: "))
        for line in b"".join(reads).decode().splitlines()
        if line.startswith("data: ")
    ]
    tokens = [event["content"] for event in events if not event["stop"]]
    assert tokens == ["c"] * n_predict
    assert events[-1]["stop"] is True
    # Incremental: the events did not come as one body at the end; the first read off the
    # socket holds only the beginning of the stream.
    assert len(reads) > 1
    assert b'"stop":true' not in reads[0]


def test_streamed_chat_ends_with_done(server: LlamaServer) -> None:
    request = {
        "messages": [{"role": "user", "content": "ok"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert data[-1] == "[DONE]"
    deltas = [json.loads(item)["choices"][0]["delta"].get("content") for item in data[:-1]]
    assert "".join(delta for delta in deltas if delta) == "kkkk"


def test_metrics_and_slots_answer(server: LlamaServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        _complete(client, "abc", 4)
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "llamacpp:tokens_predicted_total" in metrics.text
        slots = client.get("/slots")
        assert slots.status_code == 200
        assert len(slots.json()) == 2  # --parallel 2


def test_listens_on_127_0_0_1_only(server: LlamaServer) -> None:
    listening = [
        connection.laddr
        for connection in psutil.Process(server.process.pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    assert listening
    assert all(address.ip == HOST for address in listening)
    # Another loopback address of this machine reaches no listener.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.2:{server.port}/health", timeout=2)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_a_stop_signal_ends_it_promptly_and_frees_the_port(
    server: LlamaServer, stop_signal: signal.Signals
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        _complete(client, "abc", 2)
    started = time.monotonic()
    assert server.stop(stop_signal) == 0, server.log_tail()
    assert time.monotonic() - started < 5.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/health", timeout=2)
    assert _port_is_reusable(server.port)


def test_sigterm_during_a_stream_still_exits_cleanly(
    server: LlamaServer, request: pytest.FixtureRequest
) -> None:
    body = {"prompt": "abc", "n_predict": 200, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as client,
        client.stream("POST", "/completion", json=body) as response,
    ):
        next(response.iter_lines())
        server.process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = server.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            returncode = None
            # The escalation every stop in bind/process.py makes after its grace period.
            server.process.kill()
            server.process.wait()
    if request.node.callspec.params["command_factory"] == "embedded":
        # The launcher handles SIGTERM itself: it must exit 0 within the grace period.
        assert returncode == 0, server.log_tail()
    else:
        # Upstream llama-server (b11434) sometimes never exits after a SIGTERM that lands during
        # a stream (about 1 start in 4 here; its log ends at "stop: cancel task"). That is the
        # fault the SIGKILL after the grace period exists for: either way nothing is left.
        assert returncode in (0, None), server.log_tail()
    assert server.process.poll() is not None
    assert _port_is_reusable(server.port)


def test_sigterm_right_after_ready_is_not_lost(model: Path, tmp_path: Path) -> None:
    # llama.cpp reports ready before its inference loop runs, and a stop that lands in that gap
    # used to be forgotten (the process then hung). Stop at the earliest moment, a few times.
    for _ in range(5):
        with running_llama_server(embedded_command(model, free_port()), tmp_path) as running:
            started = time.monotonic()
            assert running.stop(signal.SIGTERM) == 0, running.log_tail()
            assert time.monotonic() - started < 5.0


# --- the embedded launcher's own command line -------------------------------------------------


def test_embedded_command_template_runs_as_given(model: Path, tmp_path: Path) -> None:
    port = free_port()
    template = embedded_llama_command(threads=1, context_size=512, api_key_file=False)
    assert template[:4] == [sys.executable, "-P", "-m", MODULE]
    command = [
        part.format(model_path=model, host=HOST, port=port) if "{" in part else part
        for part in template
    ]
    with running_llama_server(command, tmp_path) as running:
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            assert _complete(client, "ok", 2) == "kk"
            assert client.get("/metrics").status_code == 200
        assert running.stop() == 0


def _launcher(
    *arguments: str, python_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_flags, "-m", MODULE, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY_SOURCE)},
    )


def test_without_xllamacpp_it_names_the_install_command(model: Path) -> None:
    # -S leaves site-packages (where xllamacpp lives) off the path: a real interpreter without
    # the extra installed. The launcher itself needs only the standard library.
    result = _launcher("-m", str(model), "--port", str(free_port()), python_flags=("-S",))
    assert result.returncode == EXIT_NOT_INSTALLED, result.stderr
    assert INSTALL_COMMAND in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_a_non_loopback_host_is_a_usage_error(model: Path, host: str) -> None:
    result = _launcher("-m", str(model), "--host", host, "--port", str(free_port()))
    assert result.returncode == EXIT_USAGE
    assert "loopback" in result.stderr


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_an_unreadable_or_empty_key_file_is_a_usage_error(
    model: Path, tmp_path: Path, content: str | None
) -> None:
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    result = _launcher(
        "-m", str(model), "--port", str(free_port()), "--api-key-file", str(key_file)
    )
    assert result.returncode == EXIT_USAGE
    assert "API key file" in result.stderr


@pytest.mark.security
def test_with_a_key_file_only_health_answers_without_the_key(
    command_factory: CommandFactory, model: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k3y-for-this-run\n")
    command = [*command_factory(model, free_port()), "--api-key-file", str(key_file)]
    with running_llama_server(command, tmp_path) as running:
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            body = {"prompt": "ab", "n_predict": 2, "temperature": 0}
            assert client.get("/health").status_code == 200
            assert client.post("/completion", json=body).status_code == 401
            assert client.get("/slots").status_code == 401
            wrong = {"authorization": "Bearer not-the-key"}
            assert client.post("/completion", json=body, headers=wrong).status_code == 401
            right = {"authorization": "Bearer k3y-for-this-run"}
            answered = client.post("/completion", json=body, headers=right)
            assert answered.status_code == 200
            assert answered.json()["content"] == "bb"
        assert running.stop() == 0


def test_a_missing_model_fails_to_start(tmp_path: Path) -> None:
    result = _launcher("-m", str(tmp_path / "absent.gguf"), "--port", str(free_port()))
    assert result.returncode == EXIT_START_FAILED
    assert "absent.gguf" not in result.stderr


def test_a_file_that_is_not_a_model_fails_to_start(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(1000))
    result = _launcher("-m", str(garbage), "--port", str(free_port()))
    assert result.returncode == EXIT_START_FAILED
    assert "failed to start" in result.stderr


def test_a_busy_port_fails_to_start(model: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind((HOST, 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        result = _launcher("-m", str(model), "--port", str(port))
    assert result.returncode == EXIT_START_FAILED


def test_a_model_that_declares_a_huge_context_gets_the_default_one(
    model: Path, tmp_path: Path
) -> None:
    # 2**21 tokens: over 2 GiB of KV cache even for this 2-layer model (measured: 2.3 GB
    # resident with -c 0), allocated as the model loads, before any resource sample could see
    # it. Without -c the launcher uses DEFAULT_CONTEXT_SIZE, not the length the file declares.
    hostile = declaring_context(model, 2**21, tmp_path)
    command = embedded_command(hostile, free_port())
    at = command.index("-c")
    del command[at : at + 2]
    with running_llama_server(command, tmp_path) as server:
        with httpx.Client(base_url=f"http://{HOST}:{server.port}", timeout=10) as client:
            props = client.get("/props").json()
        resident = psutil.Process(server.process.pid).memory_info().rss
    slots = props["total_slots"]
    assert props["default_generation_settings"]["n_ctx"] == DEFAULT_CONTEXT_SIZE // slots
    assert resident < 256 * 1024 * 1024, resident
