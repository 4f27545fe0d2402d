"""A local process that answers on a loopback port as if it were a front door, and tells.

It stands for whatever takes a port a front door had: another program of this user, a
program of another user, or a process that got the pid of a ``serve`` that died. It answers
every ``GET`` and ``POST`` with ``200`` and a status document that says ``ready``, and reports
the ``authorization`` header of every request it received, so that a test can see whether a
token (or a runtime's key) reached it.

It is a forked child of the test process rather than a new program, so that it can drop to
another user without that user needing access to this interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

__all__ = ["PortTaker", "ipv6_loopback", "port_taker"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    report: TextIO


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.server.report.write(json.dumps({"authorization": self.headers.get("authorization")}))
        self.server.report.write("\n")
        self.server.report.flush()
        data = json.dumps({"state": "ready", "in_flight": 0, "answered_by": "port taker"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.do_GET()


class PortTaker:
    """The running port taker: its pid, its port, and the requests it reported."""

    def __init__(self, pid: int, report: TextIO, host: str) -> None:
        self.pid = pid
        self.host = host
        self._report = report
        first = report.readline()
        if not first:
            os.waitpid(pid, 0)
            raise AssertionError("the port taker could not listen")
        self.port = int(first)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._reaped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _read(self) -> None:
        for line in self._report:
            self._lines.append(line)

    def stop(self) -> list[str | None]:
        """Stop it; the ``authorization`` header of every request it received."""
        if not self._reaped:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self._reaped = True
        self._reader.join(timeout=10)
        return [json.loads(line)["authorization"] for line in self._lines]


def ipv6_loopback() -> bool:
    """Whether a socket can listen on ``::1`` here (not in every container)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextmanager
def port_taker(
    *,
    port: int = 0,
    user: int | None = None,
    host: str = "127.0.0.1",
    receive_listener_at: str | None = None,
) -> Iterator[PortTaker]:
    """Listen on ``host``:``port`` (any free port by default), as ``user`` when given (needs
    root). ``host`` may be ``::1``: the same port number there is another socket, which any
    local user can take while a front door listens on ``127.0.0.1``. With
    ``receive_listener_at``, accept on a listening socket another process sends to that Unix
    socket path (``SCM_RIGHTS``) instead; this waits until one has come."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the port taker, until it is killed
        try:
            os.close(read_end)
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            server_class = _Server6 if ":" in host else _Server
            if receive_listener_at is None:
                server = server_class((host, port), _Handler)
            else:
                server = server_class((host, port), _Handler, bind_and_activate=False)
                server.socket.close()
                with socket.socket(socket.AF_UNIX) as channel:
                    channel.bind(receive_listener_at)
                    channel.listen()
                    sender, _ = channel.accept()
                    _, (listener,), _, _ = socket.recv_fds(sender, 64, 1)
                server.socket = socket.socket(fileno=listener)
                server.server_address = server.socket.getsockname()
            server.report = os.fdopen(write_end, "w")
            server.report.write(f"{server.server_address[1]}\n")
            server.report.flush()
            server.serve_forever()
        finally:
            os._exit(1)
    os.close(write_end)
    taker = PortTaker(pid, os.fdopen(read_end), host)
    try:
        yield taker
    finally:
        taker.stop()
