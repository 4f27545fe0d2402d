"""Test helpers for the front door: a tiny real HTTP upstream and a ready front door over it.

The upstream is the standard library's threading HTTP server (an HTTP implementation that is
not the front door's own h11), speaking HTTP/1.1 keep-alive on 127.0.0.1. Its routes:

* ``/echo`` — JSON with the method, target, request headers and body it received;
* ``/slow?ms=N`` — sleeps N ms, then answers; counts concurrent requests (``peak_active``);
* ``/stream?n=N&gap_ms=M`` — a chunked ``text/event-stream`` of N events, M ms apart, flushed
  one by one; with ``stop_on_eof=1`` it checks before each event whether its client has
  half-closed the connection and, if so, stops and closes it unfinished, as llama.cpp's server
  cancels a generation whose client is gone;
* ``/die`` — sends a head promising 1000 bytes, 10 bytes, then closes the socket;
* ``/stream-die`` — a chunked event stream that closes after its first event;
* ``/reset-unframed`` — a head without length or chunking, a few body bytes, then a reset;
* ``/huge-head`` — a response head of about 450 KiB;
* ``/drop`` — closes the connection without answering;
* ``/big?mib=N`` — N MiB of zeros with a ``content-length``, written 64 KiB at a time;
* ``/sized?kib=N`` — N KiB of zeros with a ``content-length``, head and body in one write;
* ``/overlong`` — ``content-length: 5``, then ``hello`` and more bytes in the same write (a
  runtime that sends past its own framing).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from companion_runtime import (
    Lifecycle,
    LifecycleState,
    ResourceObservation,
    create_resource_limits,
)
from companion_runtime.bind.admission import AdmissionController
from companion_runtime.bind.frontdoor import FrontDoor, FrontDoorConfig
from companion_runtime.bind.https_origin import ModelOrigin

__all__ = [
    "ReadyDoor",
    "ServeProcess",
    "TinyUpstream",
    "ready_controller",
    "running_front_door",
    "running_serve",
    "runtime_processing",
    "serve_command",
    "serve_env",
    "serve_manifest_text",
    "tiny_upstream",
]


class TinyUpstream(ThreadingHTTPServer):
    """The upstream server; ``url`` is its base URL, counters are thread-safe."""

    daemon_threads = True
    # The front door may open many connections at once in the flood tests.
    request_queue_size = 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.active = 0
        self.peak_active = 0
        self.requests_seen = 0
        self.connections_seen = 0
        #: Streams stopped because their client half-closed (``stop_on_eof=1``).
        self.cancelled = 0
        self.last_headers: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        # The front door drops runtime connections on purpose (a client gone, an abandoned
        # stream); a reset here is an expected event, not a traceback for the test log.
        pass

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.requests_seen += 1
            self.peak_active = max(self.peak_active, self.active)

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TinyUpstream

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections_seen += 1

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length", "0"))
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        # The front door must strip these: it does not do CORS for the runtime.
        self.send_header("access-control-allow-origin", "*")
        self.send_header("x-upstream", "tiny")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def _route(self) -> None:
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        body = self._body()
        self.server.enter()
        try:
            if parts.path == "/echo":
                headers = {name.lower(): value for name, value in self.headers.items()}
                with self.server.lock:
                    self.server.last_headers = headers
                self._json(
                    200,
                    {
                        "method": self.command,
                        "target": self.path,
                        "headers": headers,
                        "body": body.decode("latin-1"),
                    },
                )
            elif parts.path == "/slow":
                time.sleep(int(query.get("ms", "50")) / 1000)
                self._json(200, {"ok": True})
            elif parts.path == "/stream":
                self._stream(
                    int(query.get("n", "5")),
                    int(query.get("gap_ms", "100")),
                    stop_on_eof=query.get("stop_on_eof") == "1",
                )
            elif parts.path == "/die":
                self.send_response(200)
                self.send_header("content-length", "1000")
                self.end_headers()
                self.wfile.write(b"0123456789")
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif parts.path == "/big":
                size = int(query.get("mib", "1")) * 1024 * 1024
                self.send_response(200)
                self.send_header("content-length", str(size))
                self.end_headers()
                block = bytes(64 * 1024)
                for _ in range(size // len(block)):
                    self.wfile.write(block)
            elif parts.path == "/sized":
                size = int(query.get("kib", "1")) * 1024
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + bytes(size)
                )
            elif parts.path == "/overlong":
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected"
                )
                self.wfile.flush()
                self.close_connection = True
            elif parts.path == "/huge-head":
                self.send_response(200)
                for index in range(4000):
                    self.send_header(f"x-filler-{index}", "a" * 100)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            elif parts.path == "/stream-die":
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                event = b"data: token\n\n"
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
                time.sleep(0.1)
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif parts.path == "/reset-unframed":
                # A body delimited by the end of the connection, cut short by a reset: the
                # socket is closed with a zero linger, so no orderly end (FIN) comes first.
                self.send_response(200)
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(b"partial")
                self.wfile.flush()
                time.sleep(0.1)
                with socket.socket(fileno=self.connection.detach()) as detached:
                    detached.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True
            elif parts.path == "/drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            else:
                self._json(404, {"error": "no such route"})
        finally:
            self.server.leave()

    def _client_gone(self) -> bool:
        """Whether the client half-closed: readable, and a peek finds the end."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def _stream(self, count: int, gap_ms: int, *, stop_on_eof: bool = False) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for index in range(count):
            if stop_on_eof and self._client_gone():
                with self.server.lock:
                    self.server.cancelled += 1
                self.close_connection = True
                return
            event = f"data: token-{index}\n\n".encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
            time.sleep(gap_ms / 1000)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@contextmanager
def tiny_upstream() -> Iterator[TinyUpstream]:
    """Run a :class:`TinyUpstream` in a thread for the duration of the block."""
    server = TinyUpstream()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def ready_controller(*, max_in_flight: int, queue_bound: int) -> AdmissionController:
    """A real admission controller in ``ready`` with a fresh, small resource sample."""
    controller = AdmissionController(
        max_in_flight=max_in_flight,
        queue_bound=queue_bound,
        resource_limits=create_resource_limits(
            max_ram_bytes=8 * 1024**3, max_vram_bytes=1024**3, max_cpu_percent=100
        ),
        # The tests push one sample; an hour keeps it fresh for the whole test.
        max_sample_age_s=3600.0,
    )
    controller.update_resources(
        ResourceObservation(ram_bytes=1024, vram_bytes=0, cpu_percent=1.0),
        taken_at=time.monotonic(),
    )
    controller.set_lifecycle(Lifecycle(LifecycleState.STARTING))
    controller.set_lifecycle(Lifecycle(LifecycleState.READY))
    return controller


class ReadyDoor:
    """A running front door with its token, controller and a few client helpers."""

    def __init__(self, door: FrontDoor, controller: AdmissionController, token: str) -> None:
        self.door = door
        self.controller = controller
        self.token = token

    @property
    def url(self) -> str:
        return self.door.url

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


@asynccontextmanager
async def running_front_door(
    upstream_url: str | None,
    *,
    max_in_flight: int = 2,
    queue_bound: int = 4,
    queue_timeout_s: float = 30.0,
    max_body_bytes: int = 1024 * 1024,
    runtime_authorization: bytes | None = None,
    keep_alive_s: float = 30.0,
    request_timeout_s: float = 30.0,
    upstream_read_timeout_s: float = 600.0,
    max_connections: int = 1024,
    max_arriving_body_bytes: int = 64 * 1024 * 1024,
    # None: FrontDoorConfig's defaults (serve's), which the tests against the real
    # llama-server hold to its limits.
    max_request_line_bytes: int | None = None,
    max_header_line_bytes: int | None = None,
    max_header_fields: int | None = None,
) -> AsyncIterator[ReadyDoor]:
    """A started :class:`FrontDoor` over ``upstream_url`` with a ready controller."""
    token = secrets.token_urlsafe(32)
    controller = ready_controller(max_in_flight=max_in_flight, queue_bound=queue_bound)
    config = FrontDoorConfig(
        token=token,
        queue_timeout_s=queue_timeout_s,
        max_body_bytes=max_body_bytes,
        keep_alive_s=keep_alive_s,
        request_timeout_s=request_timeout_s,
        upstream_read_timeout_s=upstream_read_timeout_s,
        max_connections=max_connections,
        max_arriving_body_bytes=max_arriving_body_bytes,
        **{
            name: value
            for name, value in (
                ("max_request_line_bytes", max_request_line_bytes),
                ("max_header_line_bytes", max_header_line_bytes),
                ("max_header_fields", max_header_fields),
            )
            if value is not None
        },
    )
    async with FrontDoor(
        config=config,
        controller=controller,
        runtime_url=lambda: upstream_url,
        status=lambda: {"state": str(LifecycleState.READY)},
        runtime_authorization=lambda: runtime_authorization,
    ) as door:
        yield ReadyDoor(door, controller, token)
        await asyncio.sleep(0)


# --- a real `companion-runtime serve` over the real llama.cpp server ------------------------

#: llama.cpp gets more slots than the front door admits, so the bound the tests see is the
#: front door's, not the runtime's own.
RUNTIME_PARALLEL = 8
SERVE_READY_TIMEOUT_S = 90.0


def serve_manifest_text(
    origin_url: str,
    allow: str,
    data: bytes,
    *,
    max_in_flight: int = 2,
    queue_bound: int = 4,
    queue_timeout_s: float = 30.0,
    size_bytes: int | None = None,
    sha256: str | None = None,
    max_ram_bytes: int = 4 * 1024**3,
    context_size: int | None = None,
) -> str:
    """A manifest for the tiny model at ``origin_url`` run by the embedded llama.cpp server
    (``context_size``: the runtime's ``-c``, by default the tiny model's length per slot)."""
    import hashlib

    from companion_runtime.bind.llama_server import embedded_llama_command
    from companion_runtime.bind.tiny_model import CONTEXT_LENGTH

    # Each slot gets the model's whole trained context (2,048): a long completion then runs
    # for most of a second instead of stopping at a slot's share (256 tokens, ~80 ms), so a
    # test can look at the runtime while a stream is still being generated.
    if context_size is None:
        context_size = RUNTIME_PARALLEL * CONTEXT_LENGTH
    command = embedded_llama_command(
        parallel=RUNTIME_PARALLEL, threads=1, context_size=context_size
    )
    return "\n".join(
        [
            "[model]",
            'name = "tiny"',
            f'url = "{origin_url}"',
            f'sha256 = "{sha256 or hashlib.sha256(data).hexdigest()}"',
            f"size_bytes = {size_bytes if size_bytes is not None else len(data)}",
            "[sources]",
            f'allow = ["{allow}"]',
            "[runtime]",
            f"command = {json.dumps(command)}",
            "ready_timeout_s = 60",
            "[limits]",
            f"max_in_flight = {max_in_flight}",
            f"queue_bound = {queue_bound}",
            f"queue_timeout_s = {queue_timeout_s}",
            f"max_ram_bytes = {max_ram_bytes}",
            "max_vram_bytes = 1073741824",
            "max_cpu_percent = 100",
            "",
        ]
    )


class ServeProcess:
    """A running ``companion-runtime serve --json`` child and what its ready line said."""

    def __init__(self, process: subprocess.Popen[str], ready: dict[str, object], state_dir: Path):
        self.process = process
        self.ready = ready
        self.state_dir = state_dir
        self.url = str(ready["url"])
        self.token_file = Path(str(ready["token_file"]))
        self.token = self.token_file.read_text().strip()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def status(self) -> dict[str, object]:
        import httpx

        response = httpx.get(self.url + "/_status", headers=self.auth, timeout=10)
        response.raise_for_status()
        document: dict[str, object] = response.json()
        return document

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def serve_command(manifest: Path, store: Path, ca_bundle: Path) -> list[str]:
    """Argv for ``companion-runtime serve --json`` (through this interpreter)."""
    return [
        sys.executable,
        "-m",
        "companion_runtime.cli",
        "serve",
        str(manifest),
        "--store",
        str(store),
        "--ca-bundle",
        str(ca_bundle),
        "--json",
    ]


def serve_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COMPANION_RUNTIME_STATE_DIR"] = str(state_dir)
    return env


@contextmanager
def running_serve(
    tmp_path: Path, **manifest_options: Any
) -> Iterator[tuple[ServeProcess, ModelOrigin]]:
    """Serve the tiny model from a loopback HTTPS origin and run ``serve`` on it until ready."""
    from companion_runtime.bind.tiny_model import tiny_model_bytes

    data = tiny_model_bytes()
    with ModelOrigin({"/models/tiny.gguf": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            serve_manifest_text(
                origin.url("/models/tiny.gguf"), origin.base_url, data, **manifest_options
            )
        )
        state_dir = tmp_path / "state"
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert process.stdout is not None
            line = _readline_with_timeout(process, SERVE_READY_TIMEOUT_S)
            ready = json.loads(line)
            assert ready["ok"] is True, ready
            yield ServeProcess(process, ready, state_dir), origin
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _readline_with_timeout(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0]:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"serve did not become ready: {stderr[-2000:]}")
    return result[0]


def runtime_headers(runtime_pid: int) -> dict[str, str]:
    """The runtime's own key as a header, read the way only the same user can: from the key
    file its command line names (the supervisor writes it; the front door sends it)."""
    import psutil

    argv = psutil.Process(runtime_pid).cmdline()
    key = Path(argv[argv.index("--api-key-file") + 1]).read_text().strip()
    return {"authorization": f"Bearer {key}"}


def runtime_processing(runtime_url: str, headers: dict[str, str]) -> int:
    """How many requests llama.cpp itself says it is processing (its /slots)."""
    import httpx

    slots = httpx.get(runtime_url + "/slots", headers=headers, timeout=5).json()
    return sum(1 for slot in slots if slot.get("is_processing"))
