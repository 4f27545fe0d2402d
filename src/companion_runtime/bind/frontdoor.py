"""The front door: a guarded loopback HTTP/1.1 listener in front of the runtime.

Theory of operation
-------------------
Each client connection is an asyncio protocol that feeds an ``httptools`` (llhttp) request
parser, plus one task that serves the parsed requests in order. A request passes the guards in a
fixed order, and the first guard that fails answers it:

1. the request target is in origin form (``/path``), else ``400 bad_request``; so is a head
   that does not parse, an HTTP/1.1 request without exactly one ``Host``, a method other than
   ``GET``, ``HEAD``, ``POST``, ``PUT``, ``DELETE``, ``OPTIONS`` and ``PATCH``, a head over
   16 KiB (``431``), a request line over ``max_request_line_bytes`` (``414``), and a header
   line over ``max_header_line_bytes`` or more than ``max_header_fields`` fields (``431``),
   both counted in the request as relayed (never the client's ``Host``, credentials,
   ``Cookie``, hop-by-hop headers or those its ``Connection`` header names; the front door's
   own ``Host``, runtime key and ``Content-Length``, the last once a chunked body is in), and a
   head of more than twice ``max_header_fields`` fields in all, relayed or not, as soon as the
   one too many arrives (each field held costs about 120 bytes besides its own): the
   runtime's HTTP layer has limits of its own (llama.cpp's server: 8 KiB a header line, 100
   fields), and answers past them with a bare status and no reason, after the request took an
   admission slot;
2. ``Host`` is a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``) with the front door's
   own port, else ``403 host_not_allowed`` (a DNS-rebinding page names its own host);
3. an ``Origin`` header, when present, is the front door's own origin, else
   ``403 origin_not_allowed`` (a browser page on another origin cannot use the runtime);
4. ``Authorization: Bearer <token>`` matches the session token, compared in constant time,
   else ``401 unauthorized``.

``GET /_status`` is answered by the front door itself. Every other request has its body read (up
to a cap, ``413 request_too_large`` beyond it; a body in a content coding other than
``identity`` is ``415 bad_request``, as a runtime that decodes none answers it; ``408 timeout``
when it is not whole within ``request_timeout_s``; ``503 at_capacity`` when the bodies still
arriving on all connections would pass ``max_arriving_body_bytes``, since every connection may
be sending one and none of them is counted by admission yet) and then waits for an admission
slot (``async with controller.slot(deadline=...)``); a refusal is ``503`` with ``Retry-After``
and ``{"ok": false, "reason": "<code>"}``. A refusal that ends the connection before the
request's end was read (a 401 or 413 with the body still coming) half-closes it and reads on
until the client goes, at most a second, so that the client gets to read its answer (at most 64
such connections linger at once, the refused-at-capacity ones below included; past that the one
that has lingered longest is closed to make room). On a connection no authorized request came
on yet, a body in more than 16 pieces (a chunked body of tiny chunks; each field of its
trailer counts as a piece, and so do the pieces of the bodies pipelined before it since a
token was last looked at) is parsed no further unless its request carries the token: that
request is refused whatever its body, and each piece costs a callback. An admitted request is
sent to the runtime over a pooled keep-alive connection (a second protocol with an
``httptools`` response parser) without the client's credentials (nor a ``Range``, which a
server may ignore and llama.cpp's answers with a bare ``416`` when it cannot apply it); a new
one carries nothing until
``runtime_listening`` confirms that the runtime still holds its port (which anyone may take once
it dies). The response is relayed from the parser's callbacks as the bytes arrive, so streamed
tokens are never buffered; when the client reads slower than the runtime writes, reading from
the runtime pauses until the client catches up.

The client connection's protocol sees the client leave (EOF or reset) at once, also while the
request waits for a slot or is relayed; while reading is paused (see below), where that end
waits unread behind what the client sent, the connection's TCP state shows it within a quarter
second (Linux; elsewhere, at the next write that fails). A request still waiting for a slot is
then cancelled.
A request the runtime already has keeps its slot until the runtime has stopped working on it:
the runtime connection is half-closed, which llama.cpp's server takes as the client gone (it
cancels the generation and ends the response), and the rest of the response is read and
dropped. Releasing the slot at the disconnect instead would let the runtime run more than
``max_in_flight`` requests, because llama.cpp does not reliably stop a generation whose client
went away, least of all a non-streamed one while other requests keep it busy.
Bytes a client pipelines behind a request are parsed and queued, up to 64 KiB or 32 requests
(or heads holding twice the fields one head may carry, in all), after which reading pauses
until every queued request is answered (a 33rd request in the same read, or one behind that
many fields, stops the parser: the rest of the connection is dropped, and the last one waiting is
answered with ``connection: close``; reading stays paused until the connection lingers, so
what comes meanwhile is not read at all). Behind any request that ends the connection
(``connection: close``, HTTP/1.0, an upgrade, bytes that do not parse, a refusal that closes)
nothing more is parsed either, and reading stops at the next read until the connection
lingers; the serving task yields to
the loop between pipelined requests, so one connection cannot hold it. If the runtime fails
before the response head is relayed the client gets ``502`` (``upstream_error``, or
``runtime_gone`` when the connection to it broke; ``504 timeout`` after
``upstream_read_timeout_s`` of silence); after that the client connection is reset (a TCP RST,
not an orderly close) so a truncated response can never look complete, not even to an HTTP/1.0
client whose body ends with the connection.

Opening a connection needs no token, so at most ``max_connections`` are open at once, fewer
when the open-file limit leaves room for fewer (past that limit ``accept`` would fail for
everyone). At the limit a new connection takes the place of the connection that has waited
longest for a request among those that never sent an authorized one, if it has waited 0.1 s
or more; failing that, of an authorized client's kept connection idle for a second or more;
else the newcomer gets ``503 at_capacity`` before it is read, and the connection is
half-closed and read until the client goes, at most a second. A flood must therefore bring
``max_connections`` new connections between an authorized client's connect and its request
to take its place. A request whose head is complete is never closed to make room; a head still
arriving in pieces counts as waiting.

The whole per-request path runs in callbacks and one coroutine, with no task, stream or timer
per read: the front door is on the path of every token, and on a small machine it shares the
cores with the runtime (docs/benchmarks.md has the measured cost).

Nothing logged carries the token, the request path or its query.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, Protocol, cast, final

import httptools

from companion_runtime.bind.admission import AdmissionRefused
from companion_runtime.core import Reason

__all__ = [
    "DEFAULT_MAX_ARRIVING_BODY_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_FIELDS",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_MAX_REQUEST_LINE_BYTES",
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
#: Request bodies still arriving, over all connections at once (eight at the cap).
DEFAULT_MAX_ARRIVING_BODY_BYTES: Final = 64 * 1024 * 1024
#: Longest header line, CRLF included, as relayed (nginx's ``large_client_header_buffers 4 8k``;
#: llama.cpp's server refuses a longer header line).
DEFAULT_MAX_LINE_BYTES: Final = 8 * 1024
#: Longest request line, CRLF included: the head's own bound. llama.cpp's server takes a request
#: line of about 32 KiB, so a shorter limit would refuse what the runtime answers.
DEFAULT_MAX_REQUEST_LINE_BYTES: Final = 16 * 1024
#: Most header fields in a request (Apache's ``LimitRequestFields``; llama.cpp's limit too).
DEFAULT_MAX_HEADER_FIELDS: Final = 100
_MAX_HEAD_BYTES: Final = 16 * 1024
# Header fields a head may carry, per field ``max_header_fields`` lets through to the runtime:
# the rest are the fields never relayed (the client's Host and credentials, Cookie lines,
# hop-by-hop headers). Each held field costs a tuple and two bytes objects, about 120 bytes
# over its own, so the head's 16 KiB alone would let a head of tiny fields hold 20 times that.
_HEAD_FIELDS_PER_RELAYED: Final = 2
# The runtime's response head, with room for a body that comes in the same read.
_MAX_UPSTREAM_HEAD_BYTES: Final = 256 * 1024
# Bytes a client may pipeline while its previous request is still being answered, and how
# many parsed requests may wait; reading then pauses until every waiting one is answered.
_MAX_PIPELINED_BYTES: Final = 64 * 1024
_MAX_PIPELINED_REQUESTS: Final = 32
# And the header fields they may hold in all, per field a head may carry: every head in a read
# is parsed before the serving task looks at the first, with or without a token, and 32 heads
# of small fields (each within the head's bounds) had held 700 KiB a connection.
_PIPELINED_FIELDS_PER_HEAD: Final = 2
# Pieces of bodies (and fields of their trailers) parsed on a connection no authorized
# request came on before the token of the request then parsed is looked at, and between two
# such looks (a body in one read, the usual case, is one piece).
_PIECES_BEFORE_TOKEN_CHECK: Final = 16
_LOOPBACK_NAMES: Final = (b"127.0.0.1", b"localhost", b"[::1]")
# At max_connections, a connection that never sent an authorized request may be closed to make
# room once it has waited this long for one (a client that connects sends its request within
# milliseconds; the wait keeps a newcomer from being closed by the connections accepted in the
# same burst), and an authorized client's kept connection once it has idled the longer time.
_EVICTABLE_AFTER_S: Final = 0.1
_EVICTABLE_AUTHORIZED_AFTER_S: Final = 1.0
# File descriptors kept out of max_connections: the listener, the runtime connections beyond
# the idle pool, the supervisor's pipes and files, the interpreter's own.
_RESERVED_FDS: Final = 128
# Refused connections kept half-open until the client has read its answer (at most this many
# at once, for at most a second each; beyond that the one that has lingered longest is closed
# to make room).
_MAX_LINGERING: Final = 64
_LINGER_S: Final = 1.0
# While reading is paused, the end of the client's side (a FIN, a reset) waits unread behind
# what it sent; the connection's TCP state shows it at once, and is looked at this often.
_PAUSED_CHECK_S: Final = 0.25
# Linux's TCP_INFO starts with the connection's state: CLOSE after a reset, CLOSE_WAIT after
# the client's FIN. Elsewhere (no TCP_INFO) a client that left while reading is paused is
# seen at the next write that fails.
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE: Final = 7
_TCP_CLOSE_WAIT: Final = 8

# Hop-by-hop headers (RFC 9110 section 7.6.1), and any header a Connection header names, are
# never relayed on either leg, and framing is redone on each leg (the front door adds its own
# host, length and runtime key after that filter, so a named header never removes them).
# Credentials and browser-facing headers are dropped on the way to the runtime so the runtime
# never sees the session token and never decides CORS for the front door.
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
# Range too: a server may ignore it (RFC 9110 section 14.2), and llama.cpp's server answers
# one it cannot apply, also to a POST, with a bare 416.
_NOT_TO_RUNTIME: Final = _HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"cookie",
    b"origin",
    b"expect",
    b"content-length",
    b"range",
    b"if-range",
}
# Framing headers of the runtime's response: the client leg's framing is the front door's own.
_NOT_TO_CLIENT: Final = _HOP_BY_HOP | {b"content-length"}
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
# Methods relayed: what llama.cpp's server routes (it answers any other, TRACE and WebDAV's
# among them, with a bare 400), and what an HTTP API needs. CONNECT is refused as an upgrade.
_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
# What the front door writes around the target on a relayed request line: method, " ",
# " HTTP/1.1\r\n"; the shortest method is three bytes.
_REQUEST_LINE_OVERHEAD: Final = len(b"  HTTP/1.1\r\n")
_SHORTEST_METHOD: Final = 3
# Header fields the front door may add to a relayed request beyond the client's own: Host
# (for an HTTP/1.0 client that sent none), its runtime key and a Content-Length.
_ADDED_FIELDS: Final = 3
_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


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
    #: Longest silence allowed from the runtime (before its head, or between body chunks),
    #: and longest a client may leave what was written to it unread.
    upstream_read_timeout_s: float = 600.0
    #: Idle runtime connections kept for reuse.
    upstream_pool_size: int = 32
    backlog: int = 2048
    #: Client connections open at once (lowered at start to what the open-file limit leaves
    #: room for). At the limit a new connection takes the place of the one that has waited
    #: longest for a request: first among those that never sent an authorized request (after
    #: 0.1 s), then among authorized clients' kept connections (after a second); else it is
    #: answered ``503 at_capacity`` and closed. A request whose head is complete is never
    #: closed to make room.
    max_connections: int = 1024
    #: Bytes of request bodies still arriving, summed over every connection (bodies are read
    #: before admission; never less than ``max_body_bytes``). A body that would pass it is
    #: answered ``503 at_capacity`` and its connection closed.
    max_arriving_body_bytes: int = DEFAULT_MAX_ARRIVING_BODY_BYTES
    #: Longest request line, as relayed (method, target, ``HTTP/1.1`` and CRLF); a longer one
    #: is answered ``414 bad_request``.
    max_request_line_bytes: int = DEFAULT_MAX_REQUEST_LINE_BYTES
    #: Longest header line, as relayed (``name: value`` and CRLF); a longer one is answered
    #: ``431 bad_request``. A line never relayed (``Cookie``, ``Authorization``, one the
    #: ``Connection`` header names, ...) is held only to the head's 16 KiB.
    max_header_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    #: Most header fields in the request as relayed: the client's own that are relayed, and
    #: the front door's ``Host``, runtime key and ``Content-Length`` (for a chunked body, once
    #: it is in: an empty one on a ``GET`` gets none); more is ``431 bad_request``. Fields
    #: never relayed count only within the head's 16 KiB, and a head carries at most twice
    #: ``max_header_fields`` fields in all (``431 bad_request`` at the one too many, before the
    #: head ends).
    max_header_fields: int = DEFAULT_MAX_HEADER_FIELDS

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
        if (
            self.max_body_bytes < 0
            or self.upstream_pool_size < 0
            or self.backlog < 1
            or not isinstance(self.max_arriving_body_bytes, int)
            or self.max_arriving_body_bytes < 1
        ):
            raise ValueError("bounds")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError("max_connections")
        for name, least in (
            # Room for "OPTIONS /x HTTP/1.1" and a short header; for the front door's own
            # fields and one of the client's.
            ("max_request_line_bytes", 64),
            ("max_header_line_bytes", 64),
            ("max_header_fields", _ADDED_FIELDS + 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(name)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FrontDoorStatistics:
    """A frozen snapshot of the front door's own counters."""

    #: Requests whose head was parsed; each has one outcome, counted in ``proxied_total``,
    #: ``refused_by_reason``, ``client_disconnects``, ``upstream_aborts``, ``client_stalls``,
    #: ``pipelined_unanswered``, ``status_answered`` or ``shutdown_cancels``.
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
    #: Most parsed requests seen waiting on one connection behind the one being answered.
    peak_pipelined: int = 0
    #: Responses cut short because the client stopped reading for ``upstream_read_timeout_s``.
    client_stalls: int = 0
    #: Client connections allowed open at once (``FrontDoorConfig.max_connections``, or less
    #: when the open-file limit leaves room for less).
    max_connections: int = 0
    #: Idle connections closed to make room for a new one at ``max_connections``.
    connections_evicted: int = 0
    #: New connections answered ``503 at_capacity`` at ``max_connections`` (none was idle long
    #: enough to make room).
    connections_refused: int = 0
    #: Requests parsed behind one that ended their connection (a refusal that closes it, the
    #: client leaving, shutdown), never answered: a client sends them again on a new one.
    pipelined_unanswered: int = 0
    #: ``GET /_status`` requests answered (the one reading this included).
    status_answered: int = 0
    #: Requests waiting for a slot or relayed when shutdown's grace period ran out.
    shutdown_cancels: int = 0
    #: Connections that ended mid-request or were refused at ``max_connections``, still
    #: half-open until the client has read its answer (at most 64, for at most a second each;
    #: not in ``open_connections``).
    lingering_connections: int = 0
    #: Bytes of request bodies still arriving, over every connection, held to
    #: ``max_arriving_body_bytes``; 0 whenever no body is arriving.
    arriving_body_bytes: int = 0

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
            "peak_pipelined": self.peak_pipelined,
            "client_stalls": self.client_stalls,
            "max_connections": self.max_connections,
            "connections_evicted": self.connections_evicted,
            "connections_refused": self.connections_refused,
            "pipelined_unanswered": self.pipelined_unanswered,
            "status_answered": self.status_answered,
            "shutdown_cancels": self.shutdown_cancels,
            "lingering_connections": self.lingering_connections,
            "arriving_body_bytes": self.arriving_body_bytes,
        }


class _ClientGone(Exception):
    """The client closed its connection or reset it."""


class _Closing(Exception):
    """Shutdown began while a request's body was still arriving."""


class _PipelineFull(Exception):
    """A request began while the pipelining bound's worth of requests were already waiting."""


class _HeadRefused(Exception):
    """A request head passed a limit (``_Client.error`` says which answer it gets)."""


class _NotAuthorized(Exception):
    """A body in many pieces (or a trailer of many fields) comes with a request that has no
    valid token, on a connection no authorized request came on: it is refused whatever its
    body, which is not parsed."""


@dataclass(slots=True, kw_only=True)
class _Counters:
    requests_total: int = 0
    proxied_total: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    proxied_in_flight: int = 0
    peak_proxied_in_flight: int = 0
    client_disconnects: int = 0
    upstream_aborts: int = 0
    peak_pipelined: int = 0
    client_stalls: int = 0
    connections_evicted: int = 0
    connections_refused: int = 0
    pipelined_unanswered: int = 0
    status_answered: int = 0
    shutdown_cancels: int = 0


def _json_body(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _refusal_body(reason: Reason) -> bytes:
    return _json_body({"ok": False, "reason": reason.value})


# Refusal bodies are built once; the hot path only picks one.
_REFUSAL_BODIES: Final = {reason: _refusal_body(reason) for reason in Reason}


def _llhttp_reads_chunks(coding: bytes) -> bool:
    """Whether ``coding``, a runtime answer's ``Transfer-Encoding`` that is not exactly
    ``chunked``, is chunked as llhttp frames its body.

    Its value trimmed is no guide: llhttp reads ``chunked`` followed by a tab as another
    coding and hands the body over to the connection's end, chunk sizes and all, while it
    reads ``chunked`` followed by a space as chunked. Asked only where the trimmed value is
    ``chunked``, so an answer framed the usual way costs nothing more.
    """
    if coding.strip().lower() != b"chunked":
        return False
    from companion_runtime.bind.httpsget import reads_chunks

    return reads_chunks(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n")


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


# The whole answer to a connection over max_connections, written before any request is read.
_AT_CAPACITY_RESPONSE: Final = b"".join(
    (
        _status_line(503),
        b"content-type: application/json\r\ncache-control: no-store\r\n",
        b"content-length: %d\r\n" % len(_REFUSAL_BODIES[Reason.AT_CAPACITY]),
        b"retry-after: 1\r\nconnection: close\r\n\r\n",
        _REFUSAL_BODIES[Reason.AT_CAPACITY],
    )
)


def _open_file_count() -> int:
    for directory in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(directory))
    return 0


def _connection_limits(config: FrontDoorConfig) -> tuple[int, int]:
    """``(max_connections, backlog)``, lowered to what the open-file limit leaves room for.

    Past that limit ``accept`` would fail, and no new connection, an authorized one included,
    could get in until an old one closed: the limit must be reached here first, where the
    front door can still make room. asyncio's own loop accepts up to ``backlog`` connections
    before the front door sees the first of them, so that burst gets room of its own.
    """
    limit, backlog = config.max_connections, config.backlog
    try:
        import resource
    except ImportError:  # not on this platform
        return limit, backlog
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit, backlog
    room = soft - _open_file_count() - _RESERVED_FDS - config.upstream_pool_size
    backlog = max(1, min(backlog, room // 2))
    return max(1, min(limit, room - backlog)), backlog


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset: a plain close is an orderly end that a reader cannot tell apart
    from the end of a body delimited by the connection."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _peer_closed(transport: asyncio.Transport) -> bool:
    """Whether the client has ended its side of the connection, read or not (Linux)."""
    sock = transport.get_extra_info("socket")
    if _TCP_INFO is None or sock is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:
        return False
    return bool(info) and info[0] in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def _coded(content_encoding: bytes) -> bool:
    """Whether a ``Content-Encoding`` value names a coding other than ``identity``. An empty
    list element names none (RFC 9110 section 5.6.1): an empty value, or ``identity,``, says
    the body is as sent."""
    for coding in content_encoding.split(b","):
        coding = coding.strip().lower()
        if coding and coding != b"identity":
            return True
    return False


def _named(connection: bytes) -> Iterator[bytes]:
    """The header names a Connection header's value lists (lower case)."""
    return (token.strip().lower() for token in connection.split(b","))


def _fields_of(requests: deque[_Request]) -> int:
    """The header fields ``requests`` hold in all."""
    return sum(len(request.headers) for request in requests)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


# --- the client leg -----------------------------------------------------------------------


@final
class _Request:
    """One request as the client's parser saw it; the body fills in as it arrives."""

    __slots__ = (
        "body",
        "body_size",
        "complete",
        "head_bytes",
        "headers",
        "held",
        "http_10",
        "keep_alive",
        "long_line",
        "method",
        "nominated",
        "over_cap",
        "shed",
        "target",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # Header names the client's Connection header lists: hop-by-hop, never relayed.
        self.nominated: frozenset[bytes] = frozenset()
        # A header line past max_header_line_bytes, relayed unless the Connection header
        # names it (known once the head is whole).
        self.long_line = False
        self.head_bytes = 0
        self.http_10 = False
        self.keep_alive = False
        # The body as it came in one read (the usual case, kept without a copy), or one buffer
        # from its second piece on, never a list of the pieces: a chunked body of 2-byte
        # chunks had held a bytes object and a list slot, 43 bytes, for every 2 bytes of it.
        self.body: bytes | bytearray = b""
        self.body_size = 0
        # Bytes of the body counted in the front door's budget for bodies still arriving.
        self.held = 0
        self.over_cap = False
        # Refused (past the cap, unread from then on) for the budget, not for its own size.
        self.shed = False
        self.complete = False


@final
class _Client(asyncio.Protocol):
    """One client connection: parses requests into a queue its serving task takes them from."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        config = door._config
        self._max_body = config.max_body_bytes
        self._max_request_line = config.max_request_line_bytes
        self._max_target = config.max_request_line_bytes - _REQUEST_LINE_OVERHEAD - _SHORTEST_METHOD
        self._max_header_line = config.max_header_line_bytes
        self._max_header_fields = config.max_header_fields
        self._max_head_fields = _HEAD_FIELDS_PER_RELAYED * config.max_header_fields
        self._max_waiting_fields = _PIPELINED_FIELDS_PER_HEAD * self._max_head_fields
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.requests: deque[_Request] = deque()
        self._current: _Request | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        #: 400, 414 or 431 once the byte stream stopped being parseable HTTP, or a head passed
        #: a limit.
        self.error = 0
        #: After an upgrade request nothing more on the connection is HTTP.
        self.no_more = False
        #: Requests were pipelined past the bound: the rest of the byte stream is dropped.
        self.overflowed = False
        self.gone = False
        #: True while a request is read, waits for a slot or is relayed.
        self.busy = False
        #: The request being answered (its body may still be arriving).
        self.serving: _Request | None = None
        #: True while the request waits for a slot or is relayed (a disconnect cancels it).
        self.cancellable = False
        #: The runtime connection that has this client's request (a disconnect then leaves
        #: the request running until the runtime has stopped it, see ``_Upstream.abandon``).
        self.relaying: _Upstream | None = None
        self._in_head = False
        self._head_bytes = 0
        self._pipelined = 0
        self._reading_paused = False
        self.write_paused = False
        #: The runtime connection a response is being relayed from (paused with the client).
        self.upstream: asyncio.Transport | None = None
        #: Loop time since which the serving task waits for a request head (None: it does not).
        self.waiting_since: float | None = None
        #: The keep-alive time ran out while waiting for a request head.
        self.idle_expired = False
        #: Closed while idle to make room for a new connection at max_connections.
        self.evicted = False
        #: Has sent a request with the session token (on this connection).
        self.authorized = False
        # Pieces of bodies (one per chunk, and per read) and fields of their trailers parsed
        # since a request's token was last looked at, over all the requests on the connection.
        self._unchecked_pieces = 0
        # The request being parsed, once found to carry the token (looked at once, not every
        # 16 pieces of its body).
        self._token_found: _Request | None = None
        #: Refused at max_connections: answered, half-closed, and read until the client goes.
        self.lingering = False
        self._keep_alive_s = door._config.keep_alive_s
        self._idle_timer: asyncio.TimerHandle | None = None
        # Looks for the client leaving while reading is paused (see _check_paused).
        self._paused_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, only alike).
        self.transport = cast(asyncio.Transport, transport)
        door = self._door
        if not door._make_room():
            door._refuse_connection(self)
            return
        self.task = door._accept(self)
        loop = self._loop
        self._idle_timer = loop.call_at(loop.time() + self._keep_alive_s, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per connection, moved on lazily instead of one per request.
        self._idle_timer = None
        if self.gone or self.idle_expired:
            return
        loop = self._loop
        since = self.waiting_since
        if since is not None and loop.time() - since >= self._keep_alive_s:
            self.idle_expired = True
            _wake(self._waiter)
            return
        start = loop.time() if since is None else since
        self._idle_timer = loop.call_at(start + self._keep_alive_s, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.error or self.no_more:
            # Nothing more is parsed: the connection ends once the answers owed are out, and
            # that can take up to upstream_read_timeout_s. Reading stops until it lingers
            # (bounded), or what the client sends meanwhile would be read and dropped at full
            # speed for all that time. Stopped here, one read after the end became known, a
            # client that sends nothing more is still seen leaving while it is answered.
            if not self._reading_paused and not self.lingering and self.transport is not None:
                self._pause()
            return
        if self._current is None or self._in_head:
            # A head that never ends is bounded here: llhttp itself accepts any length.
            self._head_bytes += len(data)
        serving = self.serving
        if self.requests or (self.busy and (serving is None or serving.complete)):
            # Bytes behind the request being answered, or behind requests already waiting
            # (a request's own body is bounded by the body cap instead).
            self._pipelined += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.no_more = True
            self._upgraded()
        except httptools.HttpParserError:
            if self.overflowed:
                self._overflow()
            elif not self.error and not self.no_more:
                # Else a callback refused the head (_HeadRefused) or stopped at an unauthorized
                # body (_NotAuthorized): the serving task refuses that request.
                self.error = 400
        if self._in_head and self._head_bytes > _MAX_HEAD_BYTES and not self.error:
            self.error = 431
        waiting = len(self.requests)
        counters = self._door._counters
        if waiting > counters.peak_pipelined:
            counters.peak_pipelined = waiting
        if (
            self._pipelined > _MAX_PIPELINED_BYTES
            or waiting >= _MAX_PIPELINED_REQUESTS
            # One head carries fewer fields than the bound: only pipelining can reach it.
            or (waiting > 1 and _fields_of(self.requests) >= self._max_waiting_fields)
        ) and not self._reading_paused:
            self._pause()
        _wake(self._waiter)

    def _pause(self) -> None:
        """Stop reading; meanwhile, look for the client leaving in the connection's state."""
        assert self.transport is not None
        self.transport.pause_reading()
        self._reading_paused = True
        if self._paused_timer is None:
            self._paused_timer = self._loop.call_later(_PAUSED_CHECK_S, self._check_paused)

    def _check_paused(self) -> None:
        """Reading is paused, so the end of the client's side waits unread behind what it
        sent, and would not be seen until a write failed: a request waiting for a slot would
        keep its place and then run on the runtime for nobody, and one relayed would not be
        stopped. A connection the client has closed (or half-closed: the same as its end read,
        see ``eof_received``) is the client leaving, seen within ``_PAUSED_CHECK_S``."""
        self._paused_timer = None
        if not self._reading_paused or self.gone or self.lingering:
            return  # the timer ends with the pause (a new pause starts a new one)
        transport = self.transport
        if transport is not None and _peer_closed(transport):
            self._lost()
            return
        self._paused_timer = self._loop.call_later(_PAUSED_CHECK_S, self._check_paused)

    def _upgraded(self) -> None:
        """The request just parsed asks to switch protocols (CONNECT, or an Upgrade its
        Connection header names); nothing after its head is read on this connection.

        httptools then skips the request's body as well: relayed, it would reach the runtime
        without its body, another request than the client sent. The front door switches no
        protocol, so a bodiless request is answered as a plain one (the Upgrade header is
        dropped) that ends the connection, and says so: a client told it stays open would send
        its next request into a connection that reads no more. A CONNECT or one with a body
        is refused ``400``.
        """
        request = self.requests[-1] if self.requests else None
        if request is None:
            return
        declares_body = any(
            name == b"transfer-encoding" or (name == b"content-length" and int(value) > 0)
            for name, value in request.headers
        )
        if declares_body or request.method == b"CONNECT":
            self.requests.pop()
            self.error = 400
        else:
            request.keep_alive = False

    def _overflow(self) -> None:
        """More requests came in one read than may wait: the parser stopped at the first
        one past the bound. Those waiting are answered, the last with ``connection: close``;
        the rest is read and dropped, as a server may close a connection with requests
        pipelined on it unanswered (the client sends them again on a new one).

        Pausing is not enough here: one read can hold thousands of small requests.
        """
        self.no_more = True
        self.requests[-1].keep_alive = False

    def eof_received(self) -> bool:
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        _wake(self._drain_waiter)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._paused_timer is not None:
            self._paused_timer.cancel()
            self._paused_timer = None
        if self.lingering:
            self.lingering = False
            self._door._lingering.pop(self, None)

    def nudge(self) -> None:
        """Wake the serving task to look again (shutdown has begun)."""
        _wake(self._waiter)

    def evict(self) -> None:
        """Close this idle connection (its serving task does) to make room for a new one."""
        self.evicted = True
        self.idle_expired = True
        _wake(self._waiter)

    def linger(self, answer: bytes = b"") -> None:
        """End the connection once the client has read what was written to it last.

        The client may still be sending (a request refused before its body was read, or one
        sent to a connection refused at max_connections); closing with that unread would
        reset the connection, and a reset can destroy the answer before the client reads it.
        So the sending side is shut, what comes in is read and dropped, and the connection
        ends when the client closes its side, or after a second.
        """
        transport = self.transport
        assert transport is not None
        self.no_more = True
        self.gone = True
        self.lingering = True
        if answer:
            transport.write(answer)
        try:
            transport.write_eof()
        except OSError:
            # Already reset (a client that closed at once answers the refusal with a reset):
            # nobody is left to read it.
            transport.abort()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(_LINGER_S, transport.abort)

    @property
    def current(self) -> _Request | None:
        """The request whose head or body is being parsed, if any."""
        return self._current

    @property
    def mid_request(self) -> bool:
        """A request has begun whose end has not been read (its body, say, still arriving),
        or reading stopped with what the client sent since perhaps unread (requests
        pipelined past the bound, bytes behind a request that ended the connection)."""
        return self._current is not None or self.overflowed or self._reading_paused

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        relaying = self.relaying
        if relaying is not None:
            # The runtime's silence is counted from here: the pause was the client's doing.
            relaying.last_activity = self._loop.time()
        _wake(self._drain_waiter)

    def _lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        _wake(self._waiter)
        if self.cancellable and self.task is not None:
            self._door._counters.client_disconnects += 1
            relaying = self.relaying
            if relaying is not None:
                transport = self.transport
                if relaying.mid_body and transport is not None and not transport.is_closing():
                    # Gone at its end of the connection (a half-close), the client may still
                    # read: the answer it has is cut short, and an orderly close would make a
                    # body that ends with the connection look complete.
                    _reset(transport)
                # The runtime is working on the request: its slot stays taken until the
                # runtime has stopped, or the runtime would run more than max_in_flight.
                relaying.abandon()
            else:
                self.task.cancel()  # still waiting for a slot: nothing reached the runtime

    # parser callbacks

    def on_message_begin(self) -> None:
        requests = self.requests
        if len(requests) >= _MAX_PIPELINED_REQUESTS or (
            len(requests) > 1 and _fields_of(requests) >= self._max_waiting_fields
        ):
            # Stops the parser (see _overflow); pausing the transport comes a read too late.
            self.overflowed = True
            raise _PipelineFull
        self._current = _Request()
        self._in_head = True

    # The head's limits are checked here, one integer compare per callback the parser makes
    # anyway; raising stops the parser, and the head is answered ``self.error``.

    def on_url(self, url: bytes) -> None:
        request = self._current
        assert request is not None
        request.target += url
        request.head_bytes += len(url)
        if len(request.target) > self._max_target:
            self.error = 414  # too long with any method (checked exactly once it is known)
            raise _HeadRefused

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._current
        assert request is not None
        if not self._in_head:
            # A chunked body's trailer: checked by nobody, so relayed to nobody. Each of its
            # fields costs a callback as a piece of the body does, and counts as one: 210 KB
            # of empty fields ("a:") behind one chunk had cost 4.5 ms of CPU for each
            # connection without a token, none of it a piece of the body.
            pieces = self._unchecked_pieces + 1
            if pieces >= _PIECES_BEFORE_TOKEN_CHECK and not self.authorized:
                self._check_token(request)
                pieces = 0
            self._unchecked_pieces = pieces
            return
        headers = request.headers
        if len(headers) >= self._max_head_fields:
            # Each field held costs far more than its bytes on the wire: 16 KiB of fields of
            # a few bytes each ("1:", "2:", ...) had held 329 KiB a connection, without a
            # token, for as long as the head never ended.
            self.error = 431
            raise _HeadRefused
        line = len(name) + len(value) + 4  # "name: value\r\n", as relayed
        # A line never relayed (a browser's Cookie: every local server's cookies for the
        # host) is the runtime's limit to none; one the Connection header names neither,
        # which is known once the head is whole (see on_headers_complete).
        lowered = name.lower()
        if line > self._max_header_line and lowered not in _NOT_TO_RUNTIME:
            request.long_line = True
        headers.append((lowered, value))
        request.head_bytes += line

    def on_headers_complete(self) -> None:
        request = self._current
        assert request is not None
        parser = self._parser
        method = request.method = parser.get_method()
        if method not in _METHODS:
            self.error = 400
            raise _HeadRefused
        if len(method) + len(request.target) + _REQUEST_LINE_OVERHEAD > self._max_request_line:
            self.error = 414
            raise _HeadRefused
        # Counted once per head, not per field: the head's 16 KiB bound the list meanwhile.
        # Only near a limit (rarely) is the request looked at as it would be relayed.
        if (
            request.long_line or len(request.headers) > self._max_header_fields - _ADDED_FIELDS
        ) and self._door._past_the_runtime_limits(request):
            self.error = 431
            raise _HeadRefused
        request.http_10 = parser.get_http_version() == "1.0"
        request.keep_alive = parser.should_keep_alive() and not request.http_10
        self._in_head = False
        self._head_bytes = 0
        self.requests.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._current
        assert request is not None
        size = len(body)
        request.body_size += size
        pieces = self._unchecked_pieces + 1
        if pieces >= _PIECES_BEFORE_TOKEN_CHECK and not self.authorized:
            # Every piece costs a callback, and a chunked body of 2-byte chunks in the read
            # that brought its head, 200 KB, had cost 8.4 ms of CPU (33 times a plain body of
            # that size) on a request refused 401 whatever its body. Counted over the
            # connection, not per request: 32 pipelined requests of 15 chunks each had all
            # been parsed.
            self._check_token(request)
            pieces = 0
        self._unchecked_pieces = pieces
        if request.over_cap:
            return
        door = self._door
        if request.body_size > self._max_body:
            request.over_cap = True
            request.body = b""
            door._release_body(request)
            return
        # Every connection may be sending a body: they share one budget.
        door._arriving_body_bytes += size
        request.held += size
        if door._arriving_body_bytes > door._max_arriving_body_bytes:
            request.over_cap = request.shed = True
            request.body = b""
            door._release_body(request)
            return
        held = request.body
        if not held:
            request.body = body
        elif type(held) is bytes:
            request.body = bytearray(held) + body
        else:
            held += body

    def _check_token(self, request: _Request) -> None:
        """Stop the parser unless ``request`` carries the token (see ``_NotAuthorized``)."""
        if request is self._token_found:
            return
        if not self._door._carries_token(request):
            self.no_more = True
            raise _NotAuthorized
        self._token_found = request

    def on_message_complete(self) -> None:
        request = self._current
        assert request is not None
        request.complete = True
        self._current = None
        self._token_found = None
        if request.held:
            # Arrived: bounded by admission (or the pipelining bound) from here on.
            self._door._release_body(request)

    # used by the serving task

    async def wait(self) -> None:
        """Until the parser or the connection has news."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def finished_one(self) -> None:
        """The current request is answered; once none waits, read what the client sends next.

        Resuming after every answer instead would let a client that keeps pipelining add the
        bound's worth of requests per answer, without end. Once nothing more is parsed (past
        the bound, behind a request that ends the connection, after bytes that do not parse)
        reading stays paused until the connection lingers, or what the client sends while its
        answers wait to be read would be read and dropped at full speed for as long as it
        takes to read them.
        """
        self.busy = False
        self.serving = None
        if self.requests:
            return
        self._pipelined = 0
        if self._reading_paused and self.transport is not None and not (self.no_more or self.error):
            self._reading_paused = False
            self.transport.resume_reading()

    def reading_body(self) -> None:
        """The request being answered waits for the rest of its body: read it.

        Its head may have come behind an earlier request, and reading paused at the
        pipelining bound with it. No request can wait behind one whose body is still
        arriving, and that body is bounded by the body cap instead.
        """
        self._pipelined = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.gone:
            return  # a response the client left behind is read from the runtime and dropped
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.gone:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None


# --- the runtime leg ----------------------------------------------------------------------


class _UpstreamFailed(Exception):
    """The runtime leg failed; ``reason`` says how, ``status`` what the client gets."""

    def __init__(self, reason: Reason, status: int) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.status = status


@final
class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the runtime; relays one response at a time to a client."""

    def __init__(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        # The exchange in progress (None while idle in the pool).
        self._client: _Client | None = None
        self._done: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_request = False
        self._close_after = False
        self._chunked = False
        self._framed = False
        self._timer: asyncio.TimerHandle | None = None
        self._silence_s = 0.0
        # What the parser callbacks relay from one read, written to the client as one send.
        self._out: list[bytes] = []
        self.last_activity = 0.0
        self.received = False
        self.head_sent = False
        self.keep_alive = False
        # Bytes received before the response head was complete (bounded: llhttp is not).
        self._head_bytes = 0
        #: The silence that ended the exchange was the client's (it stopped reading).
        self.client_stalled = False

    def begin(
        self, client: _Client, *, head_request: bool, close_after: bool, silence_s: float
    ) -> asyncio.Future[None]:
        """Start relaying the next response to ``client``; the future ends with it."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._done = done
        self._client = client
        self._headers = []
        self._out.clear()
        self._head_request = head_request
        self._close_after = close_after
        self._chunked = False
        self._framed = False
        self.received = False
        self.head_sent = False
        self.keep_alive = False
        self.client_stalled = False
        self._head_bytes = 0
        self._silence_s = silence_s
        self.last_activity = self._loop.time()
        if self._timer is None:
            # One timer per connection, moved on lazily: a response that ends in time costs
            # no timer operation at all.
            self._timer = self._loop.call_at(self.last_activity + silence_s, self._check_silence)
        client.upstream = self.transport
        return done

    def end(self) -> None:
        """Detach from the client (the exchange is over, one way or another)."""
        client = self._client
        if client is not None and client.upstream is self.transport:
            client.upstream = None
            if client.write_paused and self.transport is not None:
                # Paused for this client (the read that ended the response filled its
                # buffer); the client's resume no longer reaches this connection, and a
                # pooled connection that does not read would leave the next request on it
                # unanswered until the silence limit.
                self.transport.resume_reading()
        self._client = None
        self._done = None

    @property
    def mid_body(self) -> bool:
        """The response head went to the client, and the response has not ended."""
        return self.head_sent and self._done is not None and not self._done.done()

    def abandon(self) -> None:
        """The client left mid-exchange: ask the runtime to stop, and read on until it has.

        The connection is half-closed (FIN): llama.cpp's server checks whether its client is
        still there and cancels the generation when it is not, then ends the response. One
        that goes on anyway is read to its end (and dropped), so the exchange, and the slot
        held for it, lasts exactly as long as the runtime works on the request. The silence
        timeout still bounds the wait. The connection is not reused.
        """
        self.keep_alive = False
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        # A client that stopped reading had paused this connection; nobody is behind it now.
        transport.resume_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                # The runtime reset it while it was paused (unseen, nothing read it); asyncio's
                # own loop raises ENOTCONN here. Reading, resumed above, sees the reset and
                # ends the exchange.
                pass

    def abort(self) -> None:
        self.end()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _check_silence(self) -> None:
        self._timer = None
        if self._done is None or self._done.done() or self.closed:
            return  # idle: the next exchange arms the timer again
        quiet_until = self.last_activity + self._silence_s
        if self._loop.time() >= quiet_until:
            client = self._client
            # Quiet because the client stopped reading and this connection was paused for
            # it: the client's stall, bounded by the same time, and not the runtime's fault.
            self.client_stalled = client is not None and client.write_paused
            self._fail(Reason.TIMEOUT, 504)
        else:
            self._timer = self._loop.call_at(quiet_until, self._check_silence)

    def _fail(self, reason: Reason, status: int) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_exception(_UpstreamFailed(reason, status))

    def _finish(self) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, only alike).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._done is None:
            # Bytes nobody asked for: this connection cannot be trusted with a next request.
            self.abort()
            return
        self.received = True
        self.last_activity = self._loop.time()
        if not self.head_sent:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_UPSTREAM_HEAD_BYTES:
                # A runtime that never ends its head would grow the header list without end.
                self.closed = True
                self._fail(Reason.UPSTREAM_ERROR, 502)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.closed = True
            self._fail(Reason.UPSTREAM_ERROR, 502)
        except httptools.HttpParserUpgrade:
            self.closed = True
            self._fail(Reason.UPSTREAM_ERROR, 502)
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if out:
            client = self._client
            if client is not None:
                client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def eof_received(self) -> bool:
        self._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof(reset=exc is not None)

    def _eof(self, *, reset: bool = False) -> None:
        self.closed = True
        if self._done is None or self._done.done():
            return
        if self.head_sent and not self._framed and not reset:
            # A body delimited by the end of the connection has ended. A reset (the
            # connection lost without an orderly end) cut it short instead, and must reach
            # the client as a failure, never as the end of a complete response.
            self._complete()
            self._flush()
        else:
            self._fail(Reason.RUNTIME_GONE, 502)

    # parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._done is not None:
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        client = self._client
        if client is None or self._done is None or self._done.done():
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []  # an interim answer: the final one follows
            return
        self.keep_alive = (
            self._parser.should_keep_alive()
            and not self._head_request
            and not (client.gone and client.relaying is self)
        )
        length: bytes | None = None
        connection_tokens: set[bytes] = set()
        for name, value in self._headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked" and not _llhttp_reads_chunks(value):
                    # Another coding (gzip, chunked) would reach the client decoded of its
                    # chunks but not of the rest, and unmarked; without chunked last the body
                    # ends with the connection. The front door re-frames, never re-encodes.
                    self.closed = True
                    self._fail(Reason.UPSTREAM_ERROR, 502)
                    return
                self._framed = True
            elif name == b"connection":
                connection_tokens.update(token.strip().lower() for token in value.split(b","))
        parts = [_status_line(status)]
        for name, value in self._headers:
            if (
                name not in _NOT_TO_CLIENT
                and name not in connection_tokens
                and not name.startswith(b"access-control-")
            ):
                parts += (name, b": ", value, b"\r\n")
        bodiless = self._head_request or status in (204, 304)
        close = self._close_after or client._door._closing()
        if length is not None:
            self._framed = True
            parts += (b"content-length: ", length, b"\r\n")
        elif not bodiless:
            if not self._close_after:
                # An HTTP/1.1 client that keeps the connection gets chunks; any other client
                # (HTTP/1.0 among them) reads the body to the end of the connection.
                self._chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                close = True
        if close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._out.append(b"".join(parts))
        self.head_sent = True
        if bodiless:
            # llhttp does not know this was a HEAD: never read this connection again.
            self.keep_alive = False
            self._complete()

    def on_message_begin(self) -> None:
        done = self._done
        if done is not None and done.done():
            # A second response in the read that ended this one: nobody asked for it, and
            # this connection cannot be trusted with another request.
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        client = self._client
        done = self._done
        if client is None or not self.head_sent or not body or done is None or done.done():
            # Not after the response ended (a body on a HEAD or 204 answer, or bytes past
            # the runtime's own framing): the client gets exactly one framed response.
            return
        if self._chunked:
            self._out.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self.head_sent:
            self._complete()

    def _complete(self) -> None:
        client = self._client
        if client is not None and self._chunked and self._done is not None:
            if not self._done.done():
                self._out.append(b"0\r\n\r\n")
        self._finish()


@final
class _UpstreamPool:
    """Keep-alive connections to the runtime, reused LIFO (the warmest socket first)."""

    def __init__(self, *, size: int, connect_timeout_s: float) -> None:
        self._size = size
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Upstream] = []

    def take_idle(self, key: tuple[str, int]) -> _Upstream | None:
        """The warmest idle connection to ``key``, or None; closed ones are dropped on the way."""
        while self._idle:
            candidate = self._idle.pop()
            # The runtime may have closed an idle connection (llama.cpp caps keep-alive by time
            # and count); its protocol has then already seen the end.
            if candidate.key == key and not candidate.closed:
                candidate.reused = True
                return candidate
            candidate.abort()
        return None

    async def connect(self, key: tuple[str, int]) -> _Upstream:
        """A new connection to ``key``, within the connect timeout."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            _transport, upstream = await loop.create_connection(
                lambda: _Upstream(key, loop), key[0], key[1]
            )
        return upstream

    def release(self, upstream: _Upstream) -> None:
        upstream.end()
        if upstream.keep_alive and not upstream.closed and len(self._idle) < self._size:
            self._idle.append(upstream)
        else:
            upstream.abort()

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
    relayed request, or None. ``runtime_listening`` says whether the runtime's port is still
    the runtime's (``Supervisor.runtime_listening``); it is asked once for each new runtime
    connection, before anything is sent on it, never for a pooled one. When it says no,
    ``find_runtime_listener`` (``Supervisor.find_runtime_listener``) looks whether the runtime
    handed its listener on to another of its processes; if so, a new connection is made and
    checked again, else the request is refused ``502 runtime_gone``.

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
        runtime_listening: Callable[[], bool] | None = None,
        find_runtime_listener: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._config = config
        self._controller = controller
        self._runtime_url = runtime_url
        self._runtime_authorization = runtime_authorization
        self._runtime_listening = runtime_listening
        self._find_runtime_listener = find_runtime_listener
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
        # Clients waiting for a request head, longest-waiting first (candidates for closing
        # at max_connections): those that never sent an authorized request, and those that
        # did; and how many closed that way have not finished closing yet.
        self._idle: dict[_Client, None] = {}
        self._idle_authorized: dict[_Client, None] = {}
        self._evicting = 0
        self._max_connections = 0
        # Clients whose request waits for the rest of its body (woken when shutdown begins).
        self._reading_bodies: set[_Client] = set()
        # Refused connections that wait for the client to read its 503.
        # Oldest first: at the limit, the one that has had longest to read its answer goes.
        self._lingering: dict[_Client, None] = {}
        self._runtime_key_cache: tuple[str, tuple[str, int], bytes] | None = None
        # Bytes of request bodies still arriving, over every connection, and their budget.
        self._arriving_body_bytes = 0
        self._max_arriving_body_bytes = max(config.max_arriving_body_bytes, config.max_body_bytes)

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
        self._max_connections, backlog = _connection_limits(self._config)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Client(self),
            host="127.0.0.1",
            port=self._config.port,
            backlog=backlog,
            reuse_address=True,
        )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        port = str(self._port).encode()
        self._allowed_hosts = frozenset(name + b":" + port for name in _LOOPBACK_NAMES)
        self._allowed_origins = frozenset(b"http://" + host for host in self._allowed_hosts)

    async def aclose(self, *, grace_s: float = 5.0) -> None:
        """Stop listening, let busy connections finish for up to ``grace_s``, close the rest.

        A request whose body is still arriving is refused ``503 not_ready`` at once.
        """
        server = self._server
        if server is None:
            return
        server.close()
        for client in list(self._lingering):
            if client.transport is not None:
                client.transport.abort()
        # A request whose body is still arriving was never admitted: it is refused now, not
        # waited for (a client stalled mid-body would hold the whole grace period).
        for client in list(self._reading_bodies):
            client.nudge()
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
        # Connections that ended mid-request in the grace period linger too; not past here.
        for client in list(self._lingering):
            if client.transport is not None:
                client.transport.abort()
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
            peak_pipelined=counters.peak_pipelined,
            client_stalls=counters.client_stalls,
            max_connections=self._max_connections,
            connections_evicted=counters.connections_evicted,
            connections_refused=counters.connections_refused,
            pipelined_unanswered=counters.pipelined_unanswered,
            status_answered=counters.status_answered,
            shutdown_cancels=counters.shutdown_cancels,
            lingering_connections=len(self._lingering),
            arriving_body_bytes=self._arriving_body_bytes,
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

    def _closing(self) -> bool:
        """True once the listener has stopped accepting (shutdown has begun)."""
        return self._server is None or not self._server.is_serving()

    # --- one connection ---------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Whether a new connection may open, closing the longest-idle one if need be."""
        if len(self._connections) - self._evicting < self._max_connections:
            return True
        # The connection that has waited longest among those that never sent an authorized
        # request goes first: an authorized client's request comes within milliseconds of
        # its connect, so a flood must bring max_connections newer connections in that time
        # to take its place. Then an authorized client's kept connection idle for a while.
        now = self._loop_time()
        victim: _Client | None = None
        for idle, after_s in (
            (self._idle, _EVICTABLE_AFTER_S),
            (self._idle_authorized, _EVICTABLE_AUTHORIZED_AFTER_S),
        ):
            oldest = next(iter(idle), None)
            since = None if oldest is None else oldest.waiting_since
            if since is not None and now - since >= after_s:
                victim = oldest
                break
        if victim is None:
            return False
        self._idle.pop(victim, None)
        self._idle_authorized.pop(victim, None)
        victim.evict()
        self._evicting += 1
        self._counters.connections_evicted += 1
        return True

    def _release_body(self, request: _Request) -> None:
        """``request``'s body no longer counts as arriving (it arrived, or will not)."""
        self._arriving_body_bytes -= request.held
        request.held = 0

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _refuse_connection(self, client: _Client) -> None:
        """Answer a connection over max_connections with ``503 at_capacity``."""
        self._counters.connections_refused += 1
        _logger.debug("refused a connection at max_connections")
        self._linger(client, _AT_CAPACITY_RESPONSE)

    def _linger(self, client: _Client, answer: bytes = b"") -> None:
        """End ``client``'s connection once it has read ``answer`` (see ``_Client.linger``).

        At the limit the connection that has lingered longest is closed to make room: it has
        had the most time to read its answer (a client reads it within milliseconds). Turning
        the newcomer away instead would let anyone who keeps 64 refused connections open, one
        header each, a second at a time, have every other refusal reset, its answer unread.
        """
        lingering = self._lingering
        if len(lingering) >= _MAX_LINGERING:
            oldest = next(iter(lingering))
            del lingering[oldest]
            oldest.lingering = False
            if oldest.transport is not None:
                oldest.transport.abort()
        lingering[client] = None
        client.linger(answer)

    def _accept(self, client: _Client) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._on_connection(client))
        self._connections[task] = False
        return task

    async def _on_connection(self, client: _Client) -> None:
        task = asyncio.current_task()
        assert task is not None
        abort = False
        try:
            abort = not await self._serve_connection(client, task)
            if not abort:
                await self._flushed(client)
        except (_ClientGone, _Closing, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            if not client.gone:
                raise  # shutdown
            # The client left while its request waited or was relayed; the slot is released.
        except Exception:
            # A bug must not take the listener down; the connection is closed below.
            _logger.exception("front door connection failed")
        finally:
            self._connections.pop(task, None)
            self._idle.pop(client, None)
            self._idle_authorized.pop(client, None)
            if client.evicted:
                self._evicting -= 1
            current = client.current
            if current is not None and current.held:
                # Its end will never be read (nothing more is parsed on this connection).
                self._release_body(current)
            if client.requests:
                # Parsed behind the request that ended the connection, and never answered.
                unanswered = len(client.requests)
                client.requests.clear()
                self._counters.requests_total += unanswered
                self._counters.pipelined_unanswered += unanswered
            transport = client.transport
            if transport is not None:
                if abort:
                    transport.abort()
                elif client.mid_request and not client.gone and not transport.is_closing():
                    # Refused before the request's end was read (413, 401, ...): the client
                    # may still be sending, and must get to read its answer.
                    self._linger(client)
                else:
                    transport.close()

    async def _drain(self, client: _Client) -> None:
        """Until the client has read enough to take more, for at most
        ``upstream_read_timeout_s`` (a client that stopped reading for that long is stalled,
        as during a relay); then its connection is reset. Waiting without that bound, a client
        that never reads would keep its connection, never idle, for ever."""
        if not client.write_paused:
            return
        try:
            async with asyncio.timeout(self._config.upstream_read_timeout_s):
                await client.drain()
        except TimeoutError:
            assert client.transport is not None
            _reset(client.transport)
            raise _ClientGone from None

    async def _flushed(self, client: _Client) -> None:
        """Before the connection closes: until what was written to it has gone out (bounded
        as :meth:`_drain`). A close with answers still buffered waits for the client to read
        them, however long, and that connection is no longer counted anywhere."""
        transport = client.transport
        if client.gone or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.set_write_buffer_limits(high=0)  # paused until all of it is out
            await self._drain(client)

    async def _serve_connection(self, client: _Client, task: asyncio.Task[None]) -> bool:
        """Serve requests until the connection ends; False when it must be aborted."""
        connections = self._connections
        loop = asyncio.get_running_loop()
        while True:
            connections[task] = False
            if not client.requests:
                # Bounded by keep_alive_s: the connection's idle timer ends the wait. Until a
                # request comes, the connection may be closed to make room for a new one.
                client.waiting_since = loop.time()
                idle = self._idle_authorized if client.authorized else self._idle
                idle[client] = None
                while not client.requests:
                    if client.error or client.gone or client.no_more or client.idle_expired:
                        break
                    await client.wait()
                client.waiting_since = None
                idle.pop(client, None)
            if not client.requests:
                if client.error and not client.gone:
                    # A head that did not parse is a request too, refused like any other.
                    self._counters.requests_total += 1
                    self._refuse(client, client.error, Reason.BAD_REQUEST, close=True)
                    await self._drain(client)
                return True
            if client.gone:
                # The client left while this task yielded (between two pipelined requests,
                # or before it woke for the first), with no request of it waiting or running
                # to count it: the next one is its last, and never reaches the runtime.
                client.requests.popleft()
                self._counters.requests_total += 1
                self._counters.client_disconnects += 1
                return True
            request = client.requests.popleft()
            connections[task] = True
            client.busy = True
            client.serving = request
            self._counters.requests_total += 1
            keep = await self._serve_request(client, request)
            if not keep:
                # The connection ends once this answer is out: nothing more is read (from the
                # next read on) until it lingers.
                client.no_more = True
                client.finished_one()
                return True
            client.finished_one()
            if client.gone or self._closing():
                return True  # shutting down: do not wait for another request on this one
            if client.requests:
                # Answers the front door gives itself never suspend: without this, one
                # client's pipelined requests would hold the loop until all are answered.
                await asyncio.sleep(0)

    async def _serve_request(self, client: _Client, request: _Request) -> bool:
        """Answer one request; return whether the connection may carry another one."""
        target = request.target
        if not target.startswith(b"/"):
            return self._refuse(client, 400, Reason.BAD_REQUEST, close=True)
        host: bytes | None = None
        hosts = 0
        origin: bytes | None = None
        authorization: list[bytes] = []
        content_length = 0
        expect = False
        coded = False
        for name, value in request.headers:
            if name == b"host":
                host = value.strip(b" \t").lower()
                hosts += 1
            elif name == b"origin":
                origin = value.strip(b" \t").lower() if origin is None else b"\0"
            elif name == b"authorization":
                authorization.append(value)
            elif name == b"content-length":
                content_length = int(value)  # llhttp accepted it: digits only, one value
            elif name == b"expect":
                expect = value.lower() == b"100-continue" and not request.http_10
            elif name == b"connection":
                request.nominated = request.nominated.union(_named(value))
            elif name == b"content-encoding":
                coded = coded or _coded(value)
        if request.head_bytes > _MAX_HEAD_BYTES:
            return self._refuse(client, 431, Reason.BAD_REQUEST, close=True)
        if hosts > 1 or (hosts == 0 and not request.http_10):
            return self._refuse(client, 400, Reason.BAD_REQUEST, close=True)
        if host not in self._allowed_hosts:
            return self._refuse(client, 403, Reason.HOST_NOT_ALLOWED, close=True)
        if origin is not None and origin not in self._allowed_origins:
            return self._refuse(client, 403, Reason.ORIGIN_NOT_ALLOWED, close=True)
        if not self._authorized(authorization):
            return self._refuse(
                client,
                401,
                Reason.UNAUTHORIZED,
                close=True,
                extra=((b"www-authenticate", b"Bearer"),),
            )
        # Every request is checked; this only says whose kept connection it is (see _make_room).
        client.authorized = True

        path = target.partition(b"?")[0]
        if path == STATUS_PATH:
            if request.method != b"GET":
                return self._refuse(
                    client, 405, Reason.BAD_REQUEST, close=True, extra=((b"allow", b"GET"),)
                )
            self._counters.status_answered += 1  # before the document, which counts itself
            keep = self._respond_json(
                client, 200, _json_body(self.status_document()), close=not request.keep_alive
            )
            # Read the rest of the request, so that the connection is reused instead of closed
            # under a client that was told it stays open.
            if keep and not await self._body(client, request, expect=False):
                return False
            await self._drain(client)
            return keep and not request.over_cap

        if content_length > self._config.max_body_bytes:
            return self._refuse(client, 413, Reason.REQUEST_TOO_LARGE, close=True)
        if coded and (
            content_length
            or request.body_size
            or not request.complete
            or request.method in _BODY_METHODS
        ):
            # A compressed body: llama.cpp's server decodes none (a bare 415, also to a POST
            # whose body is empty, which the front door relays with a Content-Length: 0), and
            # the front door relays bodies as they are.
            return self._refuse(
                client,
                415,
                Reason.BAD_REQUEST,
                close=True,
                extra=((b"accept-encoding", b"identity"),),
            )
        # A body that arrived with its head (the usual case) needs no wait.
        if not request.complete:
            if expect and (
                self._arriving_body_bytes - request.held + content_length
                > self._max_arriving_body_bytes
            ):
                # Refused before ``100 Continue``: the client need not send a body that would
                # be refused once sent. (A chunked body's size is not known ahead: it is held
                # to the budget as it arrives.)
                return self._refuse(
                    client, 503, Reason.AT_CAPACITY, close=True, extra=((b"retry-after", b"1"),)
                )
            try:
                read = await self._body(client, request, expect=expect)
            except _ClientGone:
                # Gone before its body was in: a request like any other, ended by the client.
                self._counters.client_disconnects += 1
                raise
            except TimeoutError:
                # Not whole within request_timeout_s: answered (and counted) like any refusal,
                # not a connection closed without a word.
                return self._refuse(client, 408, Reason.TIMEOUT, close=True)
            except _Closing:
                return self._refuse(
                    client, 503, Reason.NOT_READY, close=True, extra=((b"retry-after", b"1"),)
                )
            if not read:
                return self._refuse(client, client.error or 400, Reason.BAD_REQUEST, close=True)
        if request.over_cap:
            if request.shed:
                # Bodies still arriving on other connections hold the budget: try again.
                return self._refuse(
                    client, 503, Reason.AT_CAPACITY, close=True, extra=((b"retry-after", b"1"),)
                )
            return self._refuse(client, 413, Reason.REQUEST_TOO_LARGE, close=True)
        if (
            request.body_size
            and request.method not in _BODY_METHODS
            and len(request.headers) > self._config.max_header_fields - _ADDED_FIELDS
            and self._relayed_fields(request, body=True) > self._config.max_header_fields
        ):
            # A chunked body's length was not known at its head: one that is not empty gets
            # a Content-Length from the front door (see _upstream_request).
            return self._refuse(client, 431, Reason.BAD_REQUEST, close=True)
        keep = await self._admit_and_relay(client, request)
        if client.write_paused:
            await self._drain(client)
        return keep

    async def _body(self, client: _Client, request: _Request, *, expect: bool) -> bool:
        """Wait until the request's body is in (or over the cap); False on a parse error."""
        if request.complete or request.over_cap:
            return True
        client.reading_body()
        if expect:
            client.write(_CONTINUE)
        reading = self._reading_bodies
        reading.add(client)
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                while not request.complete and not request.over_cap:
                    if client.error:
                        return False
                    if client.gone:
                        raise _ClientGone
                    if self._closing():
                        raise _Closing
                    await client.wait()
        finally:
            reading.discard(client)
        return True

    def _relayed_fields(self, request: _Request, *, body: bool) -> int:
        """How many header fields the request reaches the runtime with (see
        ``_upstream_request``): the client's own that are relayed, the front door's Host, its
        runtime key, and a Content-Length when there is a ``body`` or the method takes one."""
        nominated = request.nominated
        fields = 1  # host
        for name, _value in request.headers:
            if name not in _NOT_TO_RUNTIME and name not in nominated:
                fields += 1
        if self._runtime_authorization is not None and self._runtime_authorization() is not None:
            fields += 1
        if body or request.method in _BODY_METHODS:
            fields += 1  # content-length
        return fields

    def _past_the_runtime_limits(self, request: _Request) -> bool:
        """Whether the request, relayed, would pass the runtime's head limits: a header line
        over ``max_header_line_bytes`` or more than ``max_header_fields`` fields. Asked once
        its head is whole; what is not relayed (``_NOT_TO_RUNTIME``, the headers the
        Connection header names) counts for neither. A chunked body's length is not known
        yet: its Content-Length is counted once it is in (see ``_serve_request``)."""
        nominated: frozenset[bytes] = frozenset()
        body = False
        for name, value in request.headers:
            if name == b"connection":
                nominated = nominated.union(_named(value))
            elif name == b"content-length":
                body = body or int(value) > 0  # llhttp accepted it: digits only
        request.nominated = nominated
        if request.long_line:
            longest = self._config.max_header_line_bytes
            for name, value in request.headers:
                if (
                    len(name) + len(value) + 4 > longest
                    and name not in _NOT_TO_RUNTIME
                    and name not in nominated
                ):
                    return True
        return self._relayed_fields(request, body=body) > self._config.max_header_fields

    def _carries_token(self, request: _Request) -> bool:
        """Whether ``request`` would pass the token check (see ``_serve_request``)."""
        return self._authorized(
            [value for name, value in request.headers if name == b"authorization"]
        )

    def _authorized(self, values: list[bytes]) -> bool:
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time on bytes; a length difference is the only thing a timing attack learns.
        return hmac.compare_digest(credentials.strip(), self._token)

    # --- admission and relay ----------------------------------------------------------------

    async def _admit_and_relay(self, client: _Client, request: _Request) -> bool:
        counters = self._counters
        client.cancellable = True
        try:
            async with self._controller.slot(deadline=self._clock() + self._config.queue_timeout_s):
                counters.proxied_in_flight += 1
                if counters.proxied_in_flight > counters.peak_proxied_in_flight:
                    counters.peak_proxied_in_flight = counters.proxied_in_flight
                try:
                    return await self._relay(client, request)
                finally:
                    counters.proxied_in_flight -= 1
        except AdmissionRefused as refused:
            retry_after = max(1, math.ceil(refused.retry_after_s))
            return self._refuse(
                client,
                503,
                refused.reason,
                close=not request.keep_alive,
                extra=((b"retry-after", str(retry_after).encode()),),
            )
        except asyncio.CancelledError:
            if not client.gone:
                # Shutdown's grace period ran out (a client that left is counted as it left).
                counters.shutdown_cancels += 1
            raise
        finally:
            client.cancellable = False

    def _runtime_key(self) -> tuple[tuple[str, int], bytes] | None:
        url = self._runtime_url()
        if url is None:
            return None
        cached = self._runtime_key_cache
        if cached is not None and cached[0] == url:
            return cached[1], cached[2]
        key = _split_runtime_url(url)
        host_line = b"host: %s:%d\r\n" % (key[0].encode(), key[1])
        self._runtime_key_cache = (url, key, host_line)
        return key, host_line

    def _reached_the_runtime(self, key: tuple[str, int]) -> bool:
        """Whether a connection just made to ``key`` is one to the runtime, asked after the
        connect and before anything is sent: the runtime's port is free for anyone to take
        from the moment the runtime dies (a request whose pooled connection broke is sent
        again on a new one at once, before the exit is seen). A pooled connection needs no
        such check: it was made to the runtime, and no one else can take it over."""
        runtime = self._runtime_key()
        if runtime is None or runtime[0] != key:
            return False
        listening = self._runtime_listening
        return listening is None or listening()

    async def _connect_to_moved_listener(self, key: tuple[str, int]) -> _Upstream | None:
        """A new connection to the runtime after ``runtime_listening`` said no: the runtime
        may have handed its listener on to another of its processes (``find_runtime_listener``
        looks, reading ``/proc``). The connection already made is not used (it was made
        before the listener was found again); a new one is, if it passes the check."""
        find = self._find_runtime_listener
        if find is None or not await find():
            return None
        try:
            upstream = await self._pool.connect(key)
        except (OSError, TimeoutError):
            return None
        if self._reached_the_runtime(key):
            return upstream
        upstream.abort()
        return None

    def _upstream_request(self, request: _Request, host_line: bytes) -> bytes:
        parts: list[bytes | bytearray] = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        nominated = request.nominated
        for name, value in request.headers:
            if name not in _NOT_TO_RUNTIME and name not in nominated:
                parts += (name, b": ", value, b"\r\n")
        parts.append(host_line)
        if self._runtime_authorization is not None:
            # The runtime's own key (never the client's token, which was dropped above).
            credential = self._runtime_authorization()
            if credential is not None:
                parts += (b"authorization: ", credential, b"\r\n")
        body = request.body
        if body or request.method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        parts.append(body)
        return b"".join(parts)

    async def _relay(self, client: _Client, request: _Request) -> bool:
        runtime = self._runtime_key()
        if runtime is None:
            return self._refuse(client, 502, Reason.RUNTIME_GONE, close=not request.keep_alive)
        key, host_line = runtime
        payload = self._upstream_request(request, host_line)
        close_after = not request.keep_alive
        # A reused keep-alive connection may have been closed by the runtime a moment ago; if it
        # fails before a single response byte, the request is sent once more on a new one.
        for _attempt in range(2):
            upstream = self._pool.take_idle(key)
            if upstream is None:
                try:
                    upstream = await self._pool.connect(key)
                except (OSError, TimeoutError):
                    return self._refuse(client, 502, Reason.UPSTREAM_ERROR, close=close_after)
                if not self._reached_the_runtime(key):
                    upstream.abort()
                    upstream = await self._connect_to_moved_listener(key)
                    if upstream is None:
                        return self._refuse(client, 502, Reason.RUNTIME_GONE, close=close_after)
            done = upstream.begin(
                client,
                head_request=request.method == b"HEAD",
                close_after=close_after,
                silence_s=self._config.upstream_read_timeout_s,
            )
            client.relaying = upstream
            try:
                assert upstream.transport is not None
                upstream.transport.write(payload)
                await done
            except _UpstreamFailed as failed:
                upstream.abort()
                if client.gone:
                    # The client left, and the runtime has stopped (or failed) since: there
                    # is no one to answer and nothing to retry for.
                    raise _ClientGone from None
                if upstream.head_sent:
                    if upstream.client_stalled:
                        self._counters.client_stalls += 1
                    else:
                        self._counters.upstream_aborts += 1
                        _logger.warning("runtime failed while a response was relayed")
                    # The client already has a head: a reset, never an orderly close, so a
                    # truncated body can never look complete (an HTTP/1.0 client's body ends
                    # with the connection).
                    assert client.transport is not None
                    _reset(client.transport)
                    raise _ClientGone from None
                if (
                    failed.reason is Reason.RUNTIME_GONE
                    and upstream.reused
                    and not upstream.received
                ):
                    continue
                return self._refuse(client, failed.status, failed.reason, close=close_after)
            except BaseException:
                upstream.abort()
                raise
            finally:
                client.relaying = None
            if not client.gone:
                # A response read to its end for a client that left is not one relayed: that
                # request is counted in client_disconnects.
                self._counters.proxied_total += 1
            self._pool.release(upstream)
            return not close_after and not self._closing() and not client.gone
        return self._refuse(client, 502, Reason.RUNTIME_GONE, close=close_after)

    # --- answers the front door gives itself ------------------------------------------------

    def _refuse(
        self,
        client: _Client,
        status: int,
        reason: Reason,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        counts = self._counters.refused_by_reason
        counts[reason.value] = counts.get(reason.value, 0) + 1
        if status >= 500:
            _logger.debug("refused %d %s", status, reason.value)
        return self._respond_json(client, status, _REFUSAL_BODIES[reason], close=close, extra=extra)

    def _respond_json(
        self,
        client: _Client,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        """Write a complete JSON response; return whether the connection stays open."""
        close = close or self._closing()
        parts = [
            _status_line(status),
            b"content-type: application/json\r\ncache-control: no-store\r\n",
            b"content-length: %d\r\n" % len(body),
        ]
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if close:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        client.write(b"".join(parts))
        return not close
