"""The front door: a guarded loopback HTTP/1.1 listener in front of the runtime.

Theory of operation
-------------------
Each client connection is one task running an ``h11`` server state machine over asyncio streams.
A request passes the guards in a fixed order, and the first guard that fails answers it:

1. the request target is in origin form (``/path``), else ``400 bad_request``;
2. ``Host`` is a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``) with the front door's
   own port, else ``403 host_not_allowed`` (a DNS-rebinding page names its own host);
3. an ``Origin`` header, when present, is the front door's own origin, else
   ``403 origin_not_allowed`` (a browser page on another origin cannot use the runtime);
4. ``Authorization: Bearer <token>`` matches the session token, compared in constant time,
   else ``401 unauthorized``.

``GET /_status`` is answered by the front door itself. Every other request has its body read
(up to a cap, ``413 request_too_large`` beyond it) and then waits for an admission slot
(``async with controller.slot(deadline=...)``); a refusal is ``503`` with ``Retry-After`` and
``{"ok": false, "reason": "<code>"}``. An admitted request is sent to the runtime over a pooled
keep-alive connection (another ``h11`` state machine) without the client's credentials, and the
response is relayed chunk by chunk as it arrives, so streamed tokens are never buffered.

While a request waits for a slot or is relayed, a watcher reads the client socket; when the
client goes away the request is cancelled, which releases its slot and drops the runtime
connection (llama.cpp stops generating when its client disconnects). If the runtime fails before
the response head is relayed the client gets ``502`` (``upstream_error``, or ``runtime_gone``
when the connection to it broke); after that the client connection is aborted so a truncated
response can never look complete.

Nothing logged carries the token, the request path or its query.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol, final

import h11

from companion_runtime.bind.admission import AdmissionRefused
from companion_runtime.core import Reason

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "STATUS_PATH",
    "AdmissionPort",
    "AdmissionSnapshot",
    "FrontDoor",
    "FrontDoorConfig",
    "FrontDoorStatistics",
]

_logger = logging.getLogger(__name__)

#: The one path the front door answers itself.
STATUS_PATH: Final = b"/_status"
#: Largest request body accepted (completion requests are a few KiB).
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024
_READ_SIZE: Final = 65536
_MAX_HEAD_BYTES: Final = 16 * 1024
# Bytes a client may pipeline while its previous request is still being answered.
_MAX_PIPELINED_BYTES: Final = 64 * 1024
_LOOPBACK_NAMES: Final = (b"127.0.0.1", b"localhost", b"[::1]")

# Hop-by-hop headers (RFC 9110 section 7.6.1) are never relayed; framing is redone by h11 on each
# leg. Credentials and browser-facing headers are dropped on the way to the runtime so the
# runtime never sees the session token and never decides CORS for the front door.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_TO_RUNTIME: Final = _HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"cookie",
    b"origin",
    b"expect",
    b"content-length",
}


class AdmissionSnapshot(Protocol):
    """The parts of the admission statistics the front door reports."""

    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...


class AdmissionPort(Protocol):
    """The admission controller seam (``bind.admission.AdmissionController`` is the adapter)."""

    def slot(self, *, deadline: float | None = None) -> AbstractAsyncContextManager[None]: ...
    def statistics(self) -> AdmissionSnapshot: ...


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FrontDoorConfig:
    """How the front door listens and what it accepts.

    ``token`` is the session bearer token. ``port`` 0 picks a free ephemeral port.
    ``queue_timeout_s`` is how long a request may wait for an admission slot.
    """

    token: str
    port: int = 0
    queue_timeout_s: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Time a client has to send a complete request head and body.
    request_timeout_s: float = 30.0
    #: Time an idle keep-alive client connection is kept open.
    keep_alive_s: float = 30.0
    upstream_connect_timeout_s: float = 5.0
    #: Longest silence allowed from the runtime (before its head, or between body chunks).
    upstream_read_timeout_s: float = 600.0
    #: Idle runtime connections kept for reuse.
    upstream_pool_size: int = 32
    backlog: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or len(self.token) < 16:
            raise ValueError("token")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError("port")
        for name in (
            "queue_timeout_s",
            "request_timeout_s",
            "keep_alive_s",
            "upstream_connect_timeout_s",
            "upstream_read_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(name)
        if self.max_body_bytes < 0 or self.upstream_pool_size < 0 or self.backlog < 1:
            raise ValueError("bounds")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FrontDoorStatistics:
    """A frozen snapshot of the front door's own counters."""

    #: Requests whose head was parsed (any outcome).
    requests_total: int
    #: Requests relayed to the runtime with a complete response.
    proxied_total: int
    #: Requests answered by the front door with a refusal, by reason.
    refused_by_reason: Mapping[str, int]
    #: Requests currently inside an admission slot and talking to the runtime.
    proxied_in_flight: int
    #: Highest ``proxied_in_flight`` seen.
    peak_proxied_in_flight: int
    #: Clients that went away before their response was complete.
    client_disconnects: int
    #: Responses cut short because the runtime failed after the head was relayed.
    upstream_aborts: int
    #: Open client connections.
    open_connections: int

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {
            "requests_total": self.requests_total,
            "proxied_total": self.proxied_total,
            "refused_total": sum(self.refused_by_reason.values()),
            "refused_by_reason": dict(self.refused_by_reason),
            "proxied_in_flight": self.proxied_in_flight,
            "peak_proxied_in_flight": self.peak_proxied_in_flight,
            "client_disconnects": self.client_disconnects,
            "upstream_aborts": self.upstream_aborts,
            "open_connections": self.open_connections,
        }


class _ClientGone(Exception):
    """The client closed its connection or reset it."""


class _UpstreamFailed(Exception):
    """The runtime leg failed; ``reason`` says how, ``status`` what the client gets."""

    def __init__(self, reason: Reason, status: int) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.status = status


@dataclass(slots=True, kw_only=True)
class _Counters:
    requests_total: int = 0
    proxied_total: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    proxied_in_flight: int = 0
    peak_proxied_in_flight: int = 0
    client_disconnects: int = 0
    upstream_aborts: int = 0


def _json_body(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _refusal_body(reason: Reason) -> bytes:
    return _json_body({"ok": False, "reason": reason.value})


# Refusal bodies are built once; the hot path only picks one.
_REFUSAL_BODIES: Final = {reason: _refusal_body(reason) for reason in Reason}
_JSON_TYPE: Final = (b"content-type", b"application/json")
_NO_STORE: Final = (b"cache-control", b"no-store")


@final
class _UpstreamConnection:
    __slots__ = ("conn", "key", "reader", "reused", "writer")

    def __init__(
        self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.reused = False

    def abort(self) -> None:
        self.writer.transport.abort()


@final
class _UpstreamPool:
    """Keep-alive connections to the runtime, reused LIFO (the warmest socket first)."""

    def __init__(self, *, size: int, connect_timeout_s: float) -> None:
        self._size = size
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_UpstreamConnection] = []

    async def acquire(self, key: tuple[str, int]) -> _UpstreamConnection:
        while self._idle:
            candidate = self._idle.pop()
            # The runtime may have closed an idle connection (llama.cpp caps keep-alive by time
            # and count); the stream has then already seen EOF.
            if (
                candidate.key == key
                and not candidate.reader.at_eof()
                and not candidate.writer.is_closing()
            ):
                candidate.reused = True
                return candidate
            candidate.abort()
        async with asyncio.timeout(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(key[0], key[1], limit=_READ_SIZE * 4)
        return _UpstreamConnection(key, reader, writer)

    def release(self, connection: _UpstreamConnection) -> None:
        conn = connection.conn
        if (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and len(self._idle) < self._size
            and not connection.writer.is_closing()
        ):
            conn.start_next_cycle()
            self._idle.append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()


def _split_runtime_url(url: str) -> tuple[str, int]:
    # The runtime URL is built by the supervisor ("http://127.0.0.1:PORT"), not by a client.
    rest = url.removeprefix("http://").rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


@final
class FrontDoor:
    """The guarded loopback listener.

    ``controller`` admits requests, ``runtime_url`` returns the runtime's base URL (``None``
    while it is not running) and ``status`` returns the fields ``GET /_status`` reports next to
    the admission counters (lifecycle state, last resource sample, ...). ``clock`` must be the
    controller's clock: admission deadlines are absolute on it. ``runtime_authorization``
    returns the ``Authorization`` value the runtime demands (its API key), sent on every
    relayed request, or None.

    Use as ``async with FrontDoor(...) as door:``; ``door.url`` is then the listening origin.
    """

    def __init__(
        self,
        *,
        config: FrontDoorConfig,
        controller: AdmissionPort,
        runtime_url: Callable[[], str | None],
        status: Callable[[], Mapping[str, object]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        runtime_authorization: Callable[[], bytes | None] | None = None,
    ) -> None:
        self._config = config
        self._controller = controller
        self._runtime_url = runtime_url
        self._runtime_authorization = runtime_authorization
        self._status = status
        self._clock = clock
        self._token = config.token.encode()
        self._pool = _UpstreamPool(
            size=config.upstream_pool_size, connect_timeout_s=config.upstream_connect_timeout_s
        )
        self._counters = _Counters()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._allowed_hosts: frozenset[bytes] = frozenset()
        self._allowed_origins: frozenset[bytes] = frozenset()
        # Connection task -> True while it is busy with a request (idle ones are closed at once
        # on shutdown; busy ones get the grace period).
        self._connections: dict[asyncio.Task[None], bool] = {}
        self._runtime_key_cache: tuple[str, tuple[str, int]] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> FrontDoor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind ``127.0.0.1`` (never a wildcard address) and start accepting."""
        if self._server is not None:
            raise RuntimeError("already started")
        server = await asyncio.start_server(
            self._on_connection,
            host="127.0.0.1",
            port=self._config.port,
            backlog=self._config.backlog,
            limit=_READ_SIZE * 4,
            reuse_address=True,
        )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        port = str(self._port).encode()
        self._allowed_hosts = frozenset(name + b":" + port for name in _LOOPBACK_NAMES)
        self._allowed_origins = frozenset(b"http://" + host for host in self._allowed_hosts)

    async def aclose(self, *, grace_s: float = 5.0) -> None:
        """Stop listening, let busy connections finish for up to ``grace_s``, close the rest."""
        server = self._server
        if server is None:
            return
        server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        pending = set(self._connections)
        if pending:
            _done, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        await server.wait_closed()
        self._pool.close()

    @property
    def port(self) -> int:
        """The listening port (after ``start``)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._port}"

    def statistics(self) -> FrontDoorStatistics:
        """A frozen snapshot of the front door's counters."""
        counters = self._counters
        return FrontDoorStatistics(
            requests_total=counters.requests_total,
            proxied_total=counters.proxied_total,
            refused_by_reason=dict(counters.refused_by_reason),
            proxied_in_flight=counters.proxied_in_flight,
            peak_proxied_in_flight=counters.peak_proxied_in_flight,
            client_disconnects=counters.client_disconnects,
            upstream_aborts=counters.upstream_aborts,
            open_connections=len(self._connections),
        )

    def status_document(self) -> dict[str, object]:
        """What ``GET /_status`` returns."""
        snapshot = self._controller.statistics()
        document: dict[str, object] = {
            "state": "unknown",
            "in_flight": snapshot.in_flight,
            "queued": snapshot.queued,
        }
        if self._status is not None:
            document.update(self._status())
        document["front_door"] = self.statistics().to_dict()
        return document

    # --- one connection ---------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        try:
            await self._serve_connection(conn, reader, writer)
        except (_ClientGone, ConnectionError, TimeoutError):
            pass
        except Exception:
            # A bug must not take the listener down; the connection is closed below.
            _logger.exception("front door connection failed")
        finally:
            del self._connections[task]
            if conn.our_state is h11.ERROR:
                writer.transport.abort()
            else:
                writer.close()

    async def _serve_connection(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        while True:
            self._connections[task] = False
            try:
                async with asyncio.timeout(self._config.keep_alive_s):
                    event = await self._next_client_event(conn, reader)
            except h11.RemoteProtocolError as exc:
                await self._refuse_bad_request(conn, writer, exc)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or a protocol state with nothing left to serve
            self._connections[task] = True
            self._counters.requests_total += 1
            await self._serve_request(conn, reader, writer, event)
            if conn.our_state is h11.DONE and conn.their_state is h11.SEND_BODY:
                # Answered before the request was read to its end (``/_status``): read the
                # rest, so that the connection is reused instead of closed under a client that
                # was told it stays open. A GET's end is already parsed; no I/O happens then.
                await self._discard_request_rest(conn, reader)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            if self._closing():
                return  # shutting down: do not wait for another request on this connection
            conn.start_next_cycle()

    def _closing(self) -> bool:
        """True once the listener has stopped accepting (shutdown has begun)."""
        return self._server is None or not self._server.is_serving()

    async def _discard_request_rest(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> None:
        """Read and drop what is left of the current request, up to the body cap."""
        dropped = 0
        async with asyncio.timeout(self._config.request_timeout_s):
            while conn.their_state is h11.SEND_BODY and dropped <= self._config.max_body_bytes:
                event = await self._next_client_event(conn, reader)
                if isinstance(event, h11.Data):
                    dropped += len(event.data)
                elif not isinstance(event, h11.EndOfMessage):
                    return

    async def _next_client_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Event | None:
        """The next client event; ``None`` when h11 pauses (a pipelined request waits)."""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                return None
            try:
                data = await reader.read(_READ_SIZE)
            except ConnectionError as exc:
                raise _ClientGone from exc
            conn.receive_data(data)

    async def _serve_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
    ) -> None:
        target = request.target
        if not target.startswith(b"/"):
            await self._refuse(conn, writer, 400, Reason.BAD_REQUEST, close=True)
            return
        host = b""
        origin: bytes | None = None
        authorization: list[bytes] = []
        # h11 bounds only a head that arrives in pieces; one read can bring a whole large head.
        head_bytes = len(target)
        for name, value in request.headers:
            head_bytes += len(name) + len(value) + 4
            if name == b"host":
                host = value.lower()
            elif name == b"origin":
                origin = value.lower() if origin is None else b"\0"
            elif name == b"authorization":
                authorization.append(value)
        if head_bytes > _MAX_HEAD_BYTES:
            await self._refuse(conn, writer, 431, Reason.BAD_REQUEST, close=True)
            return
        if host not in self._allowed_hosts:
            await self._refuse(conn, writer, 403, Reason.HOST_NOT_ALLOWED, close=True)
            return
        if origin is not None and origin not in self._allowed_origins:
            await self._refuse(conn, writer, 403, Reason.ORIGIN_NOT_ALLOWED, close=True)
            return
        if not self._authorized(authorization):
            await self._refuse(
                conn,
                writer,
                401,
                Reason.UNAUTHORIZED,
                close=True,
                extra=((b"www-authenticate", b"Bearer"),),
            )
            return

        path = target.partition(b"?")[0]
        if path == STATUS_PATH:
            if request.method != b"GET":
                await self._refuse(
                    conn, writer, 405, Reason.BAD_REQUEST, close=True, extra=((b"allow", b"GET"),)
                )
                return
            await self._respond_json(conn, writer, 200, _json_body(self.status_document()))
            return

        body = await self._read_body(conn, reader, writer, request)
        if body is None:
            return
        await self._admit_and_relay(conn, reader, writer, request, body)

    def _authorized(self, values: list[bytes]) -> bool:
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time on bytes; a length difference is the only thing a timing attack learns.
        return hmac.compare_digest(credentials.strip(), self._token)

    async def _read_body(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
    ) -> bytes | None:
        cap = self._config.max_body_bytes
        for name, value in request.headers:
            if name == b"content-length" and int(value) > cap:
                await self._refuse(conn, writer, 413, Reason.REQUEST_TOO_LARGE, close=True)
                return None
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                while True:
                    event = await self._next_client_event(conn, reader)
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > cap:
                            await self._refuse(
                                conn, writer, 413, Reason.REQUEST_TOO_LARGE, close=True
                            )
                            return None
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return b"".join(chunks)
                    else:
                        raise _ClientGone
        except h11.RemoteProtocolError as exc:
            await self._refuse_bad_request(conn, writer, exc)
            return None

    # --- admission and relay ----------------------------------------------------------------

    async def _admit_and_relay(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(self._watch_client(conn, reader))
                try:
                    await self._admit_and_relay_unwatched(conn, writer, request, body)
                finally:
                    watcher.cancel()
        except* (_ClientGone, ConnectionError):
            self._counters.client_disconnects += 1
            raise _ClientGone from None

    async def _watch_client(self, conn: h11.Connection, reader: asyncio.StreamReader) -> None:
        # Runs while the request waits and is relayed. EOF or a reset means the client left;
        # bytes are a pipelined next request, handed to h11 to parse later.
        pipelined = 0
        while pipelined <= _MAX_PIPELINED_BYTES:
            try:
                data = await reader.read(_READ_SIZE)
            except ConnectionError as exc:
                raise _ClientGone from exc
            if not data:
                raise _ClientGone
            pipelined += len(data)
            conn.receive_data(data)
        await asyncio.Event().wait()  # stop reading; the relay finishes or is cancelled

    async def _admit_and_relay_unwatched(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> None:
        counters = self._counters
        try:
            async with self._controller.slot(deadline=self._clock() + self._config.queue_timeout_s):
                counters.proxied_in_flight += 1
                if counters.proxied_in_flight > counters.peak_proxied_in_flight:
                    counters.peak_proxied_in_flight = counters.proxied_in_flight
                try:
                    await self._relay(conn, writer, request, body)
                finally:
                    counters.proxied_in_flight -= 1
        except AdmissionRefused as refused:
            retry_after = max(1, math.ceil(refused.retry_after_s))
            await self._refuse(
                conn,
                writer,
                503,
                refused.reason,
                extra=((b"retry-after", str(retry_after).encode()),),
            )

    def _runtime_key(self) -> tuple[str, int] | None:
        url = self._runtime_url()
        if url is None:
            return None
        cached = self._runtime_key_cache
        if cached is not None and cached[0] == url:
            return cached[1]
        key = _split_runtime_url(url)
        self._runtime_key_cache = (url, key)
        return key

    async def _relay(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> None:
        key = self._runtime_key()
        if key is None:
            await self._refuse(conn, writer, 502, Reason.RUNTIME_GONE)
            return
        headers = [(name, value) for name, value in request.headers if name not in _NOT_TO_RUNTIME]
        headers.append((b"host", f"{key[0]}:{key[1]}".encode()))
        if self._runtime_authorization is not None:
            # The runtime's own key (never the client's token, which was dropped above).
            credential = self._runtime_authorization()
            if credential is not None:
                headers.append((b"authorization", credential))
        if body or request.method in (b"POST", b"PUT", b"PATCH"):
            headers.append((b"content-length", str(len(body)).encode()))
        outgoing = h11.Request(method=request.method, target=request.target, headers=headers)

        upstream: _UpstreamConnection | None = None
        try:
            try:
                upstream, response = await self._send_upstream(key, outgoing, body)
            except _UpstreamFailed as failed:
                await self._refuse(conn, writer, failed.status, failed.reason)
                return
            try:
                await self._relay_response(conn, writer, upstream, response)
            except _UpstreamFailed:
                self._counters.upstream_aborts += 1
                _logger.warning("runtime failed while a response was relayed")
                # The client already has a head; abort so the truncation is visible.
                writer.transport.abort()
                raise _ClientGone from None
            self._counters.proxied_total += 1
            self._pool.release(upstream)
            upstream = None
        finally:
            if upstream is not None:
                upstream.abort()

    async def _send_upstream(
        self, key: tuple[str, int], request: h11.Request, body: bytes
    ) -> tuple[_UpstreamConnection, h11.Response]:
        # A reused keep-alive connection may have been closed by the runtime a moment ago; if it
        # fails before a single response byte, the request is sent once more on a new one.
        for _attempt in range(2):
            try:
                upstream = await self._pool.acquire(key)
            except (OSError, TimeoutError) as exc:
                raise _UpstreamFailed(Reason.UPSTREAM_ERROR, 502) from exc
            try:
                conn = upstream.conn
                parts = [conn.send(request)]
                if body:
                    parts.append(conn.send(h11.Data(data=body)))
                parts.append(conn.send(h11.EndOfMessage()))
                upstream.writer.write(b"".join(part for part in parts if part))
                event = await self._next_upstream_event(upstream)
                while isinstance(event, h11.InformationalResponse):
                    event = await self._next_upstream_event(upstream)
                if not isinstance(event, h11.Response):
                    raise _UpstreamFailed(Reason.UPSTREAM_ERROR, 502)
                return upstream, event
            except _UpstreamFailed as failed:
                upstream.abort()
                if failed.reason is Reason.RUNTIME_GONE and upstream.reused:
                    continue
                raise
            except BaseException:
                upstream.abort()
                raise
        raise _UpstreamFailed(Reason.RUNTIME_GONE, 502)

    async def _next_upstream_event(self, upstream: _UpstreamConnection) -> h11.Event:
        conn = upstream.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                reason = Reason.RUNTIME_GONE if upstream.reader.at_eof() else Reason.UPSTREAM_ERROR
                raise _UpstreamFailed(reason, 502) from exc
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(self._config.upstream_read_timeout_s):
                        data = await upstream.reader.read(_READ_SIZE)
                except TimeoutError as exc:
                    raise _UpstreamFailed(Reason.TIMEOUT, 504) from exc
                except ConnectionError as exc:
                    raise _UpstreamFailed(Reason.RUNTIME_GONE, 502) from exc
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise _UpstreamFailed(Reason.RUNTIME_GONE, 502)
            assert isinstance(event, h11.Event)
            return event

    async def _relay_response(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        upstream: _UpstreamConnection,
        response: h11.Response,
    ) -> None:
        headers = _response_headers(response.headers)
        if self._closing():
            # The connection ends with this response: say so, or a keep-alive client would
            # send its next request into a socket that is being closed.
            headers.append((b"connection", b"close"))
        head = conn.send(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )
        assert head is not None
        writer.write(head)
        await writer.drain()
        while True:
            event = await self._next_upstream_event(upstream)
            if isinstance(event, h11.Data):
                chunk = conn.send(event)
                if chunk:
                    writer.write(chunk)
                    await writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                tail = conn.send(h11.EndOfMessage())
                if tail:
                    writer.write(tail)
                await writer.drain()
                return
            else:
                raise _UpstreamFailed(Reason.UPSTREAM_ERROR, 502)

    # --- answers the front door gives itself ------------------------------------------------

    async def _refuse(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        reason: Reason,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        counts = self._counters.refused_by_reason
        counts[reason.value] = counts.get(reason.value, 0) + 1
        if status >= 500:
            _logger.debug("refused %d %s", status, reason.value)
        await self._respond_json(
            conn, writer, status, _REFUSAL_BODIES[reason], close=close, extra=extra
        )

    async def _refuse_bad_request(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, exc: h11.RemoteProtocolError
    ) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._refuse(conn, writer, exc.error_status_hint, Reason.BAD_REQUEST, close=True)

    async def _respond_json(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        headers = [_JSON_TYPE, _NO_STORE, (b"content-length", str(len(body)).encode()), *extra]
        if close or self._closing():
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=status, headers=headers))
        out_body = conn.send(h11.Data(data=body))
        out_end = conn.send(h11.EndOfMessage())
        writer.write(b"".join(part for part in (out, out_body, out_end) if part))
        await writer.drain()


def _response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named_in_connection: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named_in_connection.update(token.strip().lower() for token in value.split(b","))
    return [
        (name, value)
        for name, value in headers
        if name not in _HOP_BY_HOP
        and name not in named_in_connection
        and not name.startswith(b"access-control-")
    ]
