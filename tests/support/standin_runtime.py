"""A stand-in inference runtime: a stdlib HTTP server run as a real child process.

It exists only for faults the real llama.cpp server cannot show on demand: a slow start, a
runtime that never turns healthy, a crash in the middle of a request, one that ignores SIGTERM,
and resident memory that grows past a limit when asked. Everything else is tested against the
real server.

    python tests/support/standin_runtime.py --port P [--host H] [--listen-delay-s S]
        [--loading-s S] [--never-healthy] [--ignore-sigterm] [--spawn-child]
        [--emit-stdout-bytes N] [--exit-after-s S] [--spawn-orphan] [--orphan-mib N]
        [--busy-children] [--pid-file PATH] [--api-key-file PATH] [--hand-over-after-s S]
        [--give-up-listener-after-s S] [--reexec-after-s S]
        [--send-listener-to PATH --send-listener-after-s S] [--move-listener-after-s S]

Endpoints: ``GET /health`` (200 ``{"status":"ok"}``, 503 while loading), ``POST /work?sleep_s=S``
(answers after S seconds), ``POST /crash`` (sends the headers and part of a body, then exits
with status 3), ``POST /allocate?mib=N`` (holds N MiB more, touched so they are resident),
``POST /release`` (frees all of it), ``POST /sicken`` (``/health`` answers 503 from then on),
``GET /pid``. ``--exit-after-s`` makes it exit by itself (status 4) S seconds after it listens.

``--spawn-orphan`` double-forks a process into a session of its own and leaves it (an orphan
outside the runtime's process group), holding ``--orphan-mib`` MiB resident.
``--busy-children`` keeps starting children that each spin a core for 0.3 s and exit.
``--api-key-file`` makes every request but ``GET /health`` need ``Authorization: Bearer <key>``
with the key the file holds (``401`` otherwise), as llama.cpp's server does.
``--hand-over-after-s`` serves from a worker process instead, as a pre-forking server does:
the runtime binds its port, forks a worker that inherits the listener, closes its own copy and
waits; S seconds after it starts, the worker forks its successor (which inherits the listener
and serves from then on) and exits.
``--give-up-listener-after-s`` serves from a worker too, but the runtime keeps its copy of the
listener until S seconds after it starts, then closes it and lives on; the worker exits a moment
later, with no successor: the port is free while the runtime runs.
``--reexec-after-s`` re-executes the runtime S seconds after it listens, as a runtime that
restarts itself in place does: the same process, its listener and connections closed by the
exec; the new image listens on the same port a second later, and tries again every 50 ms
while the port is taken.
``--send-listener-to`` sends the listener, S seconds (``--send-listener-after-s``) after it
starts, to whatever listens on the Unix socket PATH (``SCM_RIGHTS``), closes its own copy and
lives on: the socket still listens, in a process that is not below the runtime.
``--move-listener-after-s`` moves the listener to another descriptor S seconds after it starts
(a dup, then the old one closed), as a server that rearranges its descriptors does: the same
socket, held all along, by the same process, at a new number.
``--pid-file`` gets one line per process: ``runtime PID``, ``child PID``, ``orphan PID``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_held: list[bytearray] = []


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


_ready_at = 0.0
_never_healthy = False
# The key every request but /health must carry (--api-key-file, as llama.cpp's server reads it).
_api_key: str | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def _reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _unauthorized(self) -> bool:
        if _api_key is None or self.headers.get("Authorization") == f"Bearer {_api_key}":
            return False
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._reply(401, {"error": {"code": 401, "message": "Invalid API Key"}})
        return True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path != "/health" and self._unauthorized():
            return
        if path == "/health":
            if _never_healthy or time.monotonic() < _ready_at:
                self._reply(503, {"error": {"code": 503, "message": "Loading model"}})
            else:
                self._reply(200, {"status": "ok"})
        elif path == "/pid":
            self._reply(200, {"pid": os.getpid()})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self._unauthorized():
            return
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if parts.path == "/work":
            time.sleep(float(query.get("sleep_s", ["0"])[0]))
            self._reply(200, {"done": True})
        elif parts.path == "/crash":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"partial": ')
            self.wfile.flush()
            os._exit(3)
        elif parts.path == "/allocate":
            mib = int(query.get("mib", ["0"])[0])
            block = bytearray(mib * 1024 * 1024)
            for offset in range(0, len(block), 4096):  # touch every page: make it resident
                block[offset] = 1
            _held.append(block)
            self._reply(200, {"held_mib": sum(len(b) for b in _held) // (1024 * 1024)})
        elif parts.path == "/sicken":
            global _never_healthy
            _never_healthy = True
            self._reply(200, {"sick": True})
        elif parts.path == "/release":
            _held.clear()
            self._reply(200, {"held_mib": 0})
        else:
            self._reply(404, {"error": "not found"})


def _note_pid(path: str | None, role: str, pid: int) -> None:
    if path is not None:
        with open(path, "a") as file:
            file.write(f"{role} {pid}\n")


def _spawn_orphan(mib: int, pid_file: str | None) -> None:
    """Fork, make a new session, fork again and leave the grandchild behind."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            block = bytearray(mib * 1024 * 1024)
            for offset in range(0, len(block), 4096):
                block[offset] = 1
            _note_pid(pid_file, "orphan", os.getpid())
            time.sleep(600)
        os._exit(0)
    os.waitpid(middle, 0)


def _busy_children() -> None:
    spin = "import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end: pass"
    while True:
        subprocess.run([sys.executable, "-c", spin], check=False)


def main() -> None:
    global _ready_at, _never_healthy, _api_key
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen-delay-s", type=float, default=0.0)
    parser.add_argument("--loading-s", type=float, default=0.0)
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--emit-stdout-bytes", type=int, default=0)
    parser.add_argument("--exit-after-s", type=float, default=0.0)
    parser.add_argument("--spawn-orphan", action="store_true")
    parser.add_argument("--orphan-mib", type=int, default=0)
    parser.add_argument("--busy-children", action="store_true")
    parser.add_argument("--pid-file")
    parser.add_argument("--api-key-file")
    parser.add_argument("--hand-over-after-s", type=float, default=0.0)
    parser.add_argument("--give-up-listener-after-s", type=float, default=0.0)
    parser.add_argument("--reexec-after-s", type=float, default=0.0)
    parser.add_argument("--send-listener-to")
    parser.add_argument("--send-listener-after-s", type=float, default=0.0)
    parser.add_argument("--move-listener-after-s", type=float, default=0.0)
    parser.add_argument("--retry-bind", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.emit_stdout_bytes:
        remaining = args.emit_stdout_bytes
        while remaining > 0:
            n = min(remaining, 8192)
            sys.stdout.write("x" * n)
            remaining -= n
        sys.stdout.write("\nEND-OF-OUTPUT\n")
        sys.stdout.flush()
    _note_pid(args.pid_file, "runtime", os.getpid())
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"CHILD {child.pid}", flush=True)
        _note_pid(args.pid_file, "child", child.pid)
    if args.spawn_orphan:
        _spawn_orphan(args.orphan_mib, args.pid_file)
    if args.busy_children:
        threading.Thread(target=_busy_children, daemon=True).start()
    _never_healthy = args.never_healthy
    if args.api_key_file:
        with open(args.api_key_file, encoding="ascii") as key_file:
            _api_key = key_file.read().strip()
    time.sleep(args.listen_delay_s)
    _ready_at = time.monotonic() + args.loading_s
    server_class = _Server6 if ":" in args.host else ThreadingHTTPServer
    while True:
        try:
            server = server_class((args.host, args.port), _Handler)
        except OSError:
            if not args.retry_bind:
                raise
            time.sleep(0.05)
            continue
        break
    server.daemon_threads = True
    print(f"LISTENING {args.port}", flush=True)
    if args.exit_after_s:
        threading.Timer(args.exit_after_s, os._exit, args=(4,)).start()
    if args.hand_over_after_s:
        _serve_in_workers(server, args.hand_over_after_s, args.pid_file)
    if args.give_up_listener_after_s:
        _give_up_listener(server, args.give_up_listener_after_s)
    if args.reexec_after_s:
        threading.Timer(args.reexec_after_s, _reexec).start()
    if args.send_listener_to:
        _send_listener(server, args.send_listener_to, args.send_listener_after_s)
    if args.move_listener_after_s:
        _move_listener(server, args.move_listener_after_s)
    server.serve_forever()


def _move_listener(server: ThreadingHTTPServer, after_s: float) -> None:
    """Serve for ``after_s``, then move the listener to a new descriptor (held all along)."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(after_s)
    server.shutdown()
    moved = server.socket.dup()
    old = server.socket.fileno()
    server.socket.close()
    server.socket = moved
    print(f"MOVED {old} {moved.fileno()}", flush=True)


def _send_listener(server: ThreadingHTTPServer, path: str, after_s: float) -> None:
    """Serve for ``after_s``, send the listener to ``path``, close it here and live on."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(after_s)
    with socket.socket(socket.AF_UNIX) as channel:
        channel.connect(path)
        socket.send_fds(channel, [b"listener"], [server.socket.fileno()])
    server.shutdown()
    server.server_close()
    while True:
        time.sleep(60)


def _reexec() -> None:
    """Run this program again in this process, without ``--reexec-after-s``."""
    argv = sys.argv[1:]
    at = argv.index("--reexec-after-s")
    del argv[at : at + 2]
    again = [sys.executable, sys.argv[0], *argv, "--listen-delay-s", "1", "--retry-bind"]
    os.execv(sys.executable, again)


def _give_up_listener(server: ThreadingHTTPServer, after_s: float) -> None:
    """Serve from a worker; after ``after_s`` the runtime and then the worker let go of it."""
    if os.fork():
        time.sleep(after_s)
        server.socket.close()
        while True:
            time.sleep(60)
    threading.Timer(after_s + 0.3, os._exit, args=(0,)).start()


def _serve_in_workers(server: ThreadingHTTPServer, after_s: float, pid_file: str | None) -> None:
    """Serve from a worker that hands the listener on to its successor after ``after_s``."""
    if os.fork():
        server.socket.close()  # the runtime itself holds no listener from here on
        while True:
            time.sleep(60)
    _note_pid(pid_file, "worker", os.getpid())

    def hand_over() -> None:
        if os.fork():
            os._exit(0)  # the successor (a child of this worker) serves on
        # Only the listener: the connections the worker accepted end with it.
        listener = server.socket.fileno()
        os.closerange(3, listener)
        os.closerange(listener + 1, 4096)
        _note_pid(pid_file, "successor", os.getpid())
        server.serve_forever()

    threading.Timer(after_s, hand_over).start()


if __name__ == "__main__":
    main()
