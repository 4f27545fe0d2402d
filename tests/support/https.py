"""Test support for the verified pull: a fault-injecting loopback HTTPS origin and checks.

Each fault is one thing a hostile or broken server does; the origin applies it to one path.
"""

from __future__ import annotations

import gzip
import hashlib
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from companion_runtime.bind.https_origin import ModelOrigin, OriginHandler, RequestRecord
from companion_runtime.bind.store import ModelStore

#: Put into every test URL's query: it must never appear in a message, log or CLI output.
SECRET_TOKEN = "tok-7f3a9c-SECRET-do-not-leak"
#: How much more than the model an ``oversize`` fault sends.
OVERSIZE_EXTRA_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """What the origin does wrong for one path.

    kind: ``bitflip`` | ``truncate`` | ``oversize`` | ``lying_length`` | ``redirect`` |
    ``gzip`` | ``status`` | ``stall`` | ``ignore_range`` | ``bad_content_range`` |
    ``huge_content_range`` | ``set_cookie_redirect`` | ``drip`` | ``chunked`` |
    ``chunked_cut`` | ``switch_protocols`` | ``chunk_extension_drip`` | ``short_range`` |
    ``unsatisfiable_range`` | ``range_answer`` | ``chunked_then`` | ``range_runs_on`` |
    ``gzip_transfer`` | ``chunked_as``.
    """

    kind: str
    #: For ``redirect``: the Location; for ``gzip_transfer``: the Transfer-Encoding (``gzip``
    #: and maybe ``chunked``); for ``chunked_as``, the Transfer-Encoding a chunked body is
    #: sent under; for ``range_answer``: the Content-Range of its ``206``,
    #: with ``{start}``, ``{last}`` (the file's last byte) and ``{size}`` filled in (and its
    #: ``status``, when set, is the answer to a request without ``Range``).
    location: str = ""
    status: int = 0
    #: For ``stall`` (and ``chunked``): bytes sent before the server goes silent; for
    #: ``chunked_cut`` (and ``chunked_as``), before it hangs up without the last chunk; for
    #: ``short_range``, the most bytes one ``206`` answer covers (its Content-Range's, for
    #: ``range_runs_on``).
    stall_after_bytes: int = 0
    #: For ``drip``: seconds between single body bytes (``stall_after_bytes`` of them are
    #: dripped, then the server hangs up); for ``short_range``, seconds before each ``206``.
    drip_interval_s: float = 0.0
    #: For ``chunked_then``: bytes written on the connection right after the last chunk.
    after_body: bytes = b""


class FaultHandler(OriginHandler):
    """Applies the :class:`FaultyOrigin`'s fault for the requested path, else serves normally."""

    server: object  # type: ignore[assignment]

    @property
    def faulty(self) -> FaultyOrigin:
        origin = self.origin
        assert isinstance(origin, FaultyOrigin)
        return origin

    def respond(self, record: RequestRecord, body: bytes | None, send_body: bool) -> None:
        fault = self.faulty.faults.get(record.path)
        if fault is None or body is None:
            super().respond(record, body, send_body)
            return
        kind = fault.kind
        if kind == "bitflip":
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x01
            super().respond(record, bytes(flipped), send_body)
        elif kind == "truncate":
            self._raw(record, 200, {"Content-Length": str(len(body))}, body[: len(body) // 2])
            self.close_connection = True
        elif kind == "oversize":
            # Far more than loopback socket buffers hold, so the server can tell how much the
            # client actually read before hanging up.
            extra = body + bytes(OVERSIZE_EXTRA_BYTES)
            self._raw(record, 200, {"Content-Length": str(len(extra))}, extra)
        elif kind == "lying_length":
            # Claims half the size, then writes everything and hangs up.
            self._raw(record, 200, {"Content-Length": str(len(body) // 2)}, body)
            self.close_connection = True
        elif kind in ("redirect", "set_cookie_redirect"):
            headers = {"Location": fault.location, "Content-Length": "0"}
            if kind == "set_cookie_redirect":
                headers["Set-Cookie"] = "session=leaked-cookie; Path=/"
            self._raw(record, fault.status or 302, headers, b"")
        elif kind == "gzip":
            packed = gzip.compress(body)
            self._raw(
                record,
                200,
                {"Content-Length": str(len(packed)), "Content-Encoding": "gzip"},
                packed,
            )
        elif kind == "gzip_transfer":
            # A transfer coding nobody asked for (the request names none in TE): the body
            # gzip-compressed, and chunked too when the coding ends in "chunked".
            packed = gzip.compress(body)
            self._raw(record, 200, {"Transfer-Encoding": fault.location}, b"")
            if fault.location.replace(" ", "").endswith(",chunked"):
                self.wfile.write(b"%x\r\n" % len(packed) + packed + b"\r\n0\r\n\r\n")
            else:
                self.wfile.write(packed)
            record.bytes_sent += len(packed)
            self.close_connection = True
        elif kind == "status":
            self.send_status_only(record, fault.status)
        elif kind == "stall":
            self._raw(
                record,
                200,
                {"Content-Length": str(len(body))},
                body[: fault.stall_after_bytes],
            )
            # Go silent until the test ends (or the client hangs up).
            self.faulty.closing.wait(30)
            self.close_connection = True
        elif kind == "drip":
            # Announces the whole body, then sends it one byte at a time: never silent for
            # long enough to trip a per-read timeout, yet far too slow to finish.
            self._raw(record, 200, {"Content-Length": str(len(body))}, b"")
            self._drip(record, body[: fault.stall_after_bytes], fault.drip_interval_s)
            self.close_connection = True
        elif kind == "chunked":
            self._chunked(record, body, fault.stall_after_bytes)
        elif kind == "chunked_then":
            # The whole body chunked, then more bytes on the same connection: another
            # response's head and body, or anything else, past the end of this one.
            self._chunked(record, body, 0)
            self.wfile.write(fault.after_body)
            self.close_connection = True
        elif kind == "chunked_cut":
            self._chunked(record, body, fault.stall_after_bytes, hang_up=True)
        elif kind == "chunked_as":
            # Chunk framing under the Transfer-Encoding value given (and, with
            # stall_after_bytes, cut off without the last chunk after that many body bytes).
            self._chunked(
                record, body, fault.stall_after_bytes, hang_up=True, coding=fault.location
            )
        elif kind == "ignore_range":
            self._raw(record, 200, {"Content-Length": str(len(body))}, body)
        elif kind in ("bad_content_range", "huge_content_range"):
            if record.range_header is None:
                super().respond(record, body, send_body)
            else:
                # Claims to start at 0 although byte N was asked for; or gives numbers far
                # past any file size (5,000 digits, beyond int()'s default limit).
                huge = "9" * 5000
                content_range = (
                    f"bytes 0-{len(body) - 1}/{len(body)}"
                    if kind == "bad_content_range"
                    else f"bytes {huge}-{huge}/{huge}"
                )
                self._raw(
                    record,
                    206,
                    {"Content-Length": str(len(body)), "Content-Range": content_range},
                    body,
                )
        elif kind == "short_range":
            if record.range_header is None:
                super().respond(record, body, send_body)
            else:
                # A 206 that covers less than was asked for and says so in its Content-Range,
                # as a server that caps the size of one answer does (RFC 9110 section 14.1.2).
                start = int(record.range_header.removeprefix("bytes=").removesuffix("-"))
                piece = body[start : start + fault.stall_after_bytes]
                if fault.drip_interval_s:
                    self.faulty.closing.wait(fault.drip_interval_s)
                end = start + len(piece) - 1
                self._raw(
                    record,
                    206,
                    {
                        "Content-Length": str(len(piece)),
                        "Content-Range": f"bytes {start}-{end}/{len(body)}",
                    },
                    piece,
                )
        elif kind == "range_runs_on":
            if record.range_header is None:
                # The whole file is refused: only the ranges can bring it.
                self.send_status_only(record, fault.status or 503)
            else:
                # A 206 whose Content-Range covers stall_after_bytes from the byte asked for,
                # and whose body runs on past that range to the file's end, with zeros.
                start = int(record.range_header.removeprefix("bytes=").removesuffix("-"))
                piece = body[start : start + fault.stall_after_bytes]
                end = start + len(piece) - 1
                self._raw(
                    record,
                    206,
                    {
                        "Content-Length": str(len(body) - start),
                        "Content-Range": f"bytes {start}-{end}/{len(body)}",
                    },
                    piece + bytes(len(body) - start - len(piece)),
                )
        elif kind == "unsatisfiable_range":
            if record.range_header is None:
                super().respond(record, body, send_body)
            else:
                # Refuses every range with 416, although its Content-Range names a length the
                # range lies within: a server that contradicts itself.
                self._raw(
                    record,
                    416,
                    {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"},
                    b"",
                )
        elif kind == "range_answer":
            if record.range_header is None and fault.status:
                self.send_status_only(record, fault.status)  # the whole file is refused
            elif record.range_header is None:
                super().respond(record, body, send_body)
            else:
                # Everything from the byte asked for, under the Content-Range the fault names.
                start = int(record.range_header.removeprefix("bytes=").removesuffix("-"))
                content_range = fault.location.format(
                    start=start, last=len(body) - 1, size=len(body)
                )
                self._raw(
                    record,
                    206,
                    {"Content-Length": str(len(body) - start), "Content-Range": content_range},
                    body[start:],
                )
        elif kind == "chunk_extension_drip":
            # Chunked, then one chunk extension dripped in, never a body byte: every read
            # brings bytes, none of them counts as progress.
            self._raw(record, 200, {"Transfer-Encoding": "chunked"}, b"")
            extension = b"1;ext=" + b"a" * fault.stall_after_bytes
            self._drip(record, extension, fault.drip_interval_s)
            self.close_connection = True
        elif kind == "switch_protocols":
            # "101" with the headers that make llhttp hand the connection over, then the body.
            self._raw(record, 101, {"Upgrade": "websocket", "Connection": "Upgrade"}, body)
            self.close_connection = True
        else:
            raise AssertionError(f"unknown fault {kind}")

    def _drip(self, record: RequestRecord, data: bytes, interval_s: float) -> None:
        try:
            self.wfile.flush()
            for position in range(len(data)):
                if self.faulty.closing.wait(interval_s):
                    return
                self.wfile.write(data[position : position + 1])
                record.bytes_sent += 1
        except (OSError, ssl.SSLError):
            return

    def _chunked(
        self,
        record: RequestRecord,
        body: bytes,
        stall_after_bytes: int,
        *,
        hang_up: bool = False,
        coding: str = "chunked",
    ) -> None:
        # ``Transfer-Encoding: chunked`` in odd-sized chunks. With ``stall_after_bytes``, only
        # that many body bytes go out, then the server goes silent mid-body (or, with
        # ``hang_up``, closes the connection without the last chunk).
        self.send_response(200)
        record.status = 200
        self.send_header("Transfer-Encoding", coding)
        self.end_headers()
        data = body[:stall_after_bytes] if stall_after_bytes else body
        try:
            for position in range(0, len(data), 7_001):
                piece = data[position : position + 7_001]
                self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                record.bytes_sent += len(piece)
            if not stall_after_bytes:
                self.wfile.write(b"0\r\n\r\n")
                return
        except (OSError, ssl.SSLError):
            self.close_connection = True
            return
        if not hang_up:
            self.faulty.closing.wait(30)
        self.close_connection = True

    def _raw(
        self, record: RequestRecord, status: int, headers: dict[str, str], data: bytes
    ) -> None:
        self.send_response(status)
        record.status = status
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if data:
            self.send_bytes(record, data)


class FaultyOrigin(ModelOrigin):
    """A :class:`ModelOrigin` with per-path faults and optional pacing of body chunks."""

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        faults: dict[str, Fault] | None = None,
        chunk_delay_s: float = 0.0,
    ) -> None:
        super().__init__(files, handler=FaultHandler)
        self.faults: dict[str, Fault] = dict(faults or {})
        self.chunk_delay_s = chunk_delay_s

    def chunk_sent(self, record: RequestRecord) -> None:
        if self.chunk_delay_s:
            time.sleep(self.chunk_delay_s)


def model_bytes(size: int, seed: int = 0) -> tuple[bytes, str]:
    """Deterministic pseudo-random model bytes and their SHA-256 hex digest."""
    blocks = []
    counter = 0
    while sum(len(b) for b in blocks) < size:
        blocks.append(hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64)
        counter += 1
    data = b"".join(blocks)[:size]
    return data, hashlib.sha256(data).hexdigest()


def secret_url(origin: ModelOrigin, path: str) -> str:
    """The origin's URL for ``path`` with the secret token in its query."""
    return f"{origin.url(path)}?token={SECRET_TOKEN}"


def assert_nothing_published(store: ModelStore) -> None:
    """No blob at any final path, and no temp file bigger than expected lingering in blobs/."""
    if store.blobs_dir.exists():
        assert list(store.blobs_dir.iterdir()) == []


def assert_no_leak(texts: Iterable[str], digest: str) -> None:
    """None of ``texts`` (messages, logs, CLI output) carries the token, query or digest."""
    for text in texts:
        assert SECRET_TOKEN not in text
        assert "token=" not in text
        assert digest not in text


def body_requests(origin: ModelOrigin, path: str) -> list[RequestRecord]:
    """GET requests for ``path`` that transferred at least one body byte."""
    return [r for r in origin.requests if r.path == path and r.method == "GET" and r.bytes_sent]


def partial_size(store: ModelStore, digest: str) -> int:
    """Size of the kept partial download of ``digest`` (0 if none)."""
    path: Path = store.partial_path(digest)
    return path.stat().st_size if path.exists() else 0
