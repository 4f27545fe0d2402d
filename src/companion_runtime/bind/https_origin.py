"""A small loopback HTTPS static-file origin, for tests and the offline demo.

:class:`ModelOrigin` serves a dict of ``path -> bytes`` (or a directory) on
``127.0.0.1:<ephemeral port>`` with a certificate from a throw-away ``trustme`` CA whose PEM
is written to :attr:`ModelOrigin.ca_pem_path`, so a client trusts exactly this server through
``--ca-bundle``. It answers ``GET``/``HEAD``, honours ``Range: bytes=N-`` / ``bytes=N-M`` with
``206``, and records every request (method, path, query present, headers, status, body bytes
sent) so tests can assert on what the client asked for.

It is a threaded stdlib ``http.server``; the TLS handshake runs in the connection's own
thread, so a client that never finishes it cannot block the others. Fault injection lives in
subclasses of :class:`OriginHandler` (see ``tests/support/https.py``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final, final
from urllib.parse import urlsplit

import trustme

__all__ = ["ModelOrigin", "OriginHandler", "RequestRecord"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_SEND_CHUNK: Final = 256 * 1024


@final
@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One request as the origin saw it (``bytes_sent`` is updated while the body streams)."""

    method: str
    path: str
    has_query: bool
    headers: dict[str, str]
    status: int = 0
    bytes_sent: int = 0

    @property
    def range_header(self) -> str | None:
        """The ``Range`` header, if the client sent one."""
        return self.headers.get("range")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    origin: ModelOrigin

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # Handshake here, in the connection's thread, not in the accept loop.
        request.settimeout(self.origin.socket_timeout_s)
        try:
            tls = self.origin.server_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(tls, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-body is normal in fault tests; stay quiet.
        return


class OriginHandler(BaseHTTPRequestHandler):
    """Serves the origin's files. Override :meth:`respond` (or helpers) to inject faults."""

    server: _Server
    protocol_version = "HTTP/1.1"

    # --- hooks ------------------------------------------------------------------------------

    @property
    def origin(self) -> ModelOrigin:
        """The :class:`ModelOrigin` this handler serves."""
        return self.server.origin

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def respond(self, record: RequestRecord, body: bytes | None, send_body: bool) -> None:
        """Answer one request for ``body`` (``None``: not found), honouring ``Range``."""
        if body is None:
            self.send_status_only(record, 404)
            return
        start, end = 0, len(body) - 1
        status = 200
        range_header = record.range_header
        if range_header is not None:
            match = _RANGE.fullmatch(range_header.strip())
            if match is None or int(match.group(1)) >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                record.status = 416
                return
            start = int(match.group(1))
            if match.group(2):
                end = min(int(match.group(2)), len(body) - 1)
            status = 206
        self.send_response(status)
        record.status = status
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if send_body:
            self.send_bytes(record, memoryview(body)[start : end + 1])

    def send_status_only(self, record: RequestRecord, status: int) -> None:
        """Send ``status`` with an empty body."""
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        record.status = status

    def send_bytes(
        self, record: RequestRecord, data: bytes | memoryview, *, chunk_bytes: int = _SEND_CHUNK
    ) -> None:
        """Write ``data`` in chunks, counting what was sent; a client hang-up ends it quietly."""
        view = memoryview(data)
        try:
            for position in range(0, len(view), chunk_bytes):
                if self.origin.closing.is_set():
                    return
                piece = view[position : position + chunk_bytes]
                self.wfile.write(piece)
                record.bytes_sent += len(piece)
                self.origin.chunk_sent(record)
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        return

    # --- plumbing ---------------------------------------------------------------------------

    def _handle(self, *, send_body: bool) -> None:
        parts = urlsplit(self.path)
        record = RequestRecord(
            method=self.command,
            path=parts.path,
            has_query=bool(parts.query),
            headers={name.lower(): value for name, value in self.headers.items()},
        )
        self.origin.record(record)
        self.respond(record, self.origin.body_for(parts.path), send_body)


class ModelOrigin:
    """A loopback HTTPS origin serving fixed bytes; a context manager.

    ``files`` maps URL paths (``"/models/m.gguf"``) to bodies; ``directory`` serves files below
    it by relative path instead. ``handler`` is the :class:`OriginHandler` subclass to use.
    """

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        *,
        directory: Path | None = None,
        handler: type[OriginHandler] = OriginHandler,
        socket_timeout_s: float = 10.0,
    ) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.directory = directory
        self.socket_timeout_s = socket_timeout_s
        self.closing = threading.Event()
        self._handler = handler
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._tempdir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.server_context: ssl.SSLContext = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca_pem_path: Path = Path()
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> ModelOrigin:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Create the CA and certificate, bind an ephemeral port and serve in a thread."""
        authority = trustme.CA()
        authority.issue_cert("127.0.0.1", "localhost").configure_cert(self.server_context)
        self._tempdir = Path(tempfile.mkdtemp(prefix="model-origin-"))
        self.ca_pem_path = self._tempdir / "ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_pem_path))
        server = _Server(("127.0.0.1", 0), self._handler)
        server.origin = self
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, release the port and delete the CA file."""
        self.closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    # --- what tests use ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<port>/``."""
        return f"https://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this origin."""
        return self.base_url + path.lstrip("/")

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests received so far."""
        with self._lock:
            return list(self._requests)

    def record(self, record: RequestRecord) -> None:
        """Append a request record (called by the handler)."""
        with self._lock:
            self._requests.append(record)

    def chunk_sent(self, record: RequestRecord) -> None:
        """Hook called after each body chunk is sent (a subclass may pace or stall here)."""

    def body_for(self, path: str) -> bytes | None:
        """The bytes served at ``path``, or ``None`` (404)."""
        if path in self.files:
            return self.files[path]
        if self.directory is None:
            return None
        root = self.directory.resolve()
        candidate = (root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        with contextlib.suppress(OSError):
            return candidate.read_bytes()
        return None
