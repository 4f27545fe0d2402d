"""Start a real llama.cpp server on the tiny model, for tests that need a live runtime.

Two runtimes speak the same HTTP API: the embedded launcher
(``python -m companion_runtime.bind.llama_server``, always available with the ``llama`` extra)
and the upstream ``llama-server`` binary (when the ``LLAMA_SERVER`` environment variable names
one, e.g. built by ``scripts/build-llama-server``).

Typical use::

    from tests.support.llama import running_llama_server, embedded_command, write_model

    def test_x(tmp_path):
        model = write_model(tmp_path)
        with running_llama_server(embedded_command(model, free_port()), tmp_path) as server:
            httpx.get(server.base_url + "/health")

or the fixtures :func:`tiny_model_file` (session scoped) and :func:`embedded_llama_server`
(imported into the test module).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from companion_runtime.bind.llama_server import MODULE
from companion_runtime.bind.tiny_model import write_tiny_model

#: Environment variable naming an upstream ``llama-server`` binary to test against.
LLAMA_SERVER_ENV = "LLAMA_SERVER"
HOST = "127.0.0.1"
# Small and fast: one thread per request, two slots, a short context.
PARALLEL = 2
THREADS = 1
CONTEXT_SIZE = 512
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def write_model(directory: Path) -> Path:
    """Write the tiny model into ``directory`` and return its path."""
    return write_tiny_model(directory / "tiny.gguf")


def declaring_context(model: Path, tokens: int, directory: Path) -> Path:
    """A copy of ``model`` whose metadata declares a context of ``tokens``: the value of the
    ``llama.context_length`` key (a GGUF uint32, type 4, right after the key's name)."""
    data = bytearray(model.read_bytes())
    key = b"llama.context_length"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 4  # uint32
    data[at + 4 : at + 8] = tokens.to_bytes(4, "little")
    path = directory / f"context-{tokens}.gguf"
    path.write_bytes(bytes(data))
    return path


def embedded_command(model: Path, port: int, *, metrics: bool = True) -> list[str]:
    """Argv for the embedded launcher on ``model`` at ``HOST:port``."""
    command = [
        sys.executable,
        "-m",
        MODULE,
        "-m",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--parallel",
        str(PARALLEL),
        "--threads",
        str(THREADS),
        "-c",
        str(CONTEXT_SIZE),
    ]
    return [*command, "--metrics"] if metrics else command


def upstream_command(binary: Path, model: Path, port: int, *, metrics: bool = True) -> list[str]:
    """Argv for an upstream ``llama-server`` binary with the same settings."""
    command = [
        str(binary),
        "-m",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--parallel",
        str(PARALLEL),
        "--threads",
        str(THREADS),
        "-c",
        str(CONTEXT_SIZE),
    ]
    return [*command, "--metrics"] if metrics else command


#: Where ``scripts/build-llama-server`` puts the binary it builds (gitignored).
BUILT_UPSTREAM_BINARY = (
    Path(__file__).resolve().parents[2]
    / "third_party"
    / "llama-server-11434"
    / "bin"
    / "llama-server"
)


def upstream_binary() -> Path | None:
    """The upstream binary: ``LLAMA_SERVER`` if set, else the built one, else ``None``."""
    value = os.environ.get(LLAMA_SERVER_ENV)
    if value:
        return Path(value)
    return BUILT_UPSTREAM_BINARY if BUILT_UPSTREAM_BINARY.is_file() else None


@dataclass
class LlamaServer:
    """A running server process and what was seen while it started."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    #: Every /health answer while starting, in order: an HTTP status or ``"refused"``.
    health_history: list[int | str] = field(default_factory=list)
    #: Seconds from spawn to the first 200 on /health.
    seconds_to_healthy: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit code (kill on timeout, then fail)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the server did not stop on " + sig.name) from None


def health_answer(port: int) -> tuple[int | str, bytes]:
    """One ``GET /health`` on a fresh connection: ``(status, body)``, or ``("refused", b"")``.

    A raw socket, not an HTTP client: a poll costs a fraction of a millisecond, which is what it
    takes to see the upstream binary's 503 phase (a few milliseconds on the tiny model).
    """
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    answer = b""
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as connection:
            connection.sendall(request)
            while data := connection.recv(65536):
                answer += data
    except OSError:
        if not answer:
            return "refused", b""
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return "refused", b""  # closed before a status line: not serving yet
    return int(parts[1]), body


def wait_healthy(server: LlamaServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll /health as fast as possible until 200, recording every answer."""
    started = time.monotonic()
    deadline = started + timeout_s
    # A tight loop on purpose: the tiny model loads in milliseconds, and the 503 phase is only
    # visible to a poller that does not sleep.
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        status, _ = health_answer(server.port)
        server.health_history.append(status)
        if status == 200:
            return
        if status == "refused":
            time.sleep(0.0005)
    raise AssertionError(f"server not healthy within {timeout_s} s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_llama_server(command: list[str], log_directory: Path) -> Iterator[LlamaServer]:
    """Spawn ``command`` (whose port is in its argv), wait for health, yield, then stop it."""
    port = int(command[command.index("--port") + 1])
    log_path = log_directory / f"llama-server-{port}.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        # Output goes to a file, not a pipe nobody reads, so a chatty server can never block.
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    server = LlamaServer(process=process, port=port, log_path=log_path)
    try:
        wait_healthy(server)
        server.seconds_to_healthy = time.monotonic() - started
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, written once per test session."""
    return write_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def embedded_llama_server(tiny_model_file: Path, tmp_path: Path) -> Iterator[LlamaServer]:
    """A healthy embedded server on the tiny model at a free loopback port."""
    with running_llama_server(embedded_command(tiny_model_file, free_port()), tmp_path) as server:
        yield server


@pytest.fixture
def embedded_llama_url(embedded_llama_server: LlamaServer) -> str:
    """The base URL (``http://127.0.0.1:PORT``) of a healthy embedded server."""
    return embedded_llama_server.base_url
