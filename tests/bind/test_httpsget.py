"""The download's HTTPS transport against a loopback TLS server that controls every byte.

The server runs TLS on memory buffers too, so a test can send a response in any shape on the
wire: a TLS record cut into single bytes, a head split across records, an interim ``100``
answer, a head that never ends, a body past its length.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httptools
import pytest
import trustme

from companion_runtime.bind.httpsget import MAX_HEAD_BYTES, POLL_S, Cancelled, ProtocolError, get

pytestmark = pytest.mark.integration


class _Wire:
    """The server's side of one connection: ``send`` encrypts, ``send_raw`` does not."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.tls = tls
        self.outgoing = outgoing

    def record(self, data: bytes) -> bytes:
        """The TLS bytes of ``data`` (one record per 16 KiB), without sending them."""
        self.tls.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.record(data))


@contextmanager
def tls_server(
    authority: trustme.CA, respond: Callable[[_Wire], None], *, drip_handshake_s: float = 0.0
) -> Iterator[tuple[int, ssl.SSLContext]]:
    """One-connection TLS server on 127.0.0.1; yields its port and a client context.

    ``drip_handshake_s``: send the server's handshake bytes one at a time, this far apart.
    """
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = server_context.wrap_bio(incoming, outgoing, server_side=True)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    try:
                        tls.do_handshake()  # a no-op once done
                        request += tls.read(65536)
                    except ssl.SSLWantReadError:
                        pending = outgoing.read()
                        if drip_handshake_s and pending:
                            for byte in pending:
                                sock.sendall(bytes([byte]))
                                time.sleep(drip_handshake_s)
                        else:
                            sock.sendall(pending)
                        data = sock.recv(65536)
                        if not data:
                            return
                        incoming.write(data)
                respond(_Wire(sock, tls, outgoing))
                time.sleep(0.2)  # let the client read before the close
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, client_context
    finally:
        listener.close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def read_all(port: int, context: ssl.SSLContext, *, read_timeout_s: float = 5.0) -> bytes:
    out = bytearray()
    view = memoryview(bytearray(1 << 20))
    with get(
        "127.0.0.1",
        port,
        "/m.bin",
        {"Accept-Encoding": "identity"},
        context=context,
        connect_timeout_s=5,
        read_timeout_s=read_timeout_s,
    ) as response:
        assert response.status == 200
        while count := response.read_some(view):
            out += view[:count]
        assert response.length in (None, 0)
    return bytes(out)


BODY = bytes(range(256)) * 400  # 100 KiB: several records


def test_a_body_in_many_records_with_the_head_split_across_records(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        wire.send(head[:10])
        wire.send(head[10:] + BODY[:5])
        wire.send(BODY[5:])

    with tls_server(authority, respond) as (port, context):
        assert read_all(port, context) == BODY


def test_an_interim_100_answer_is_skipped(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY)

    with tls_server(authority, respond) as (port, context):
        assert read_all(port, context) == BODY


def test_a_chunked_body_is_unframed(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(BODY), 30_000):
            piece = BODY[start : start + 30_000]
            wire.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        wire.send(b"0\r\n\r\n")

    with tls_server(authority, respond) as (port, context):
        assert read_all(port, context) == BODY


@pytest.mark.parametrize(
    ("coding", "chunked"),
    [("chunked", True), ("Chunked ", True), ("\tCHUNKED", True), ("chunked\t", False)],
)
def test_a_body_is_read_in_chunks_exactly_when_the_parser_reads_it_so(
    authority: trustme.CA, coding: str, chunked: bool
) -> None:
    # llhttp reads "chunked" followed by a tab as another coding, and the body to the
    # connection's end, framing and all. The trimmed header value said "chunked" all the same,
    # so the response had claimed chunks while handing out their framing as body.
    framed = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"

    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n".encode() + framed)

    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        out = bytearray()
        with get(
            "127.0.0.1",
            port,
            "/m.bin",
            {},
            context=context,
            connect_timeout_s=5,
            read_timeout_s=5,
        ) as response:
            assert response.chunked is chunked
            while count := response.read_some(view):
                out += view[:count]
        assert bytes(out) == (BODY if chunked else framed)


def test_bytes_past_the_announced_length_are_never_read(authority: trustme.CA) -> None:
    # Sent in the head's record, so a parser fed everything would see a second "response".
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more garbage")

    with tls_server(authority, respond) as (port, context):
        assert read_all(port, context) == b"hello"


#: What a server may write after a chunked body's last chunk: another response (a "101" makes
#: llhttp raise HttpParserUpgrade, which is no HttpParserError), or bytes that parse as nothing.
AFTER_THE_LAST_CHUNK = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nzz",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nmore!",
    b"not HTTP at all",
]


@pytest.mark.parametrize("after", AFTER_THE_LAST_CHUNK)
@pytest.mark.parametrize("with_the_head", [True, False])
def test_bytes_past_the_last_chunk_are_never_body(
    authority: trustme.CA, after: bytes, with_the_head: bool
) -> None:
    # As with a Content-Length, the body ends where the server said it does; what follows
    # it is not parsed as a next response whose body would be handed out as more of this one.
    chunks = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def respond(wire: _Wire) -> None:
        if with_the_head:  # all of it in the first records, before the first body read
            wire.send(head + chunks + after)
        else:
            wire.send(head)
            time.sleep(0.1)
            wire.send(chunks + after)

    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        out = bytearray()
        with get(
            "127.0.0.1",
            port,
            "/m.bin",
            {},
            context=context,
            connect_timeout_s=5,
            read_timeout_s=5,
        ) as response:
            while count := response.read_some(view):
                out += view[:count]
            assert response.complete
            assert response.read_some(view) == 0
        assert bytes(out) == BODY


def test_bytes_decrypted_before_a_bad_record_are_handed_out_first(authority: trustme.CA) -> None:
    # The body's records and a record that cannot decrypt arrive in one socket read: the
    # bytes before it are body, handed out before the TLS error is raised (it had been
    # raised at once, and the whole buffer decrypted in that call was lost).
    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {2 * len(BODY)}\r\n\r\n".encode())
        time.sleep(0.2)
        wire.sock.sendall(wire.record(BODY) + b"\x17\x03\x03\x00\x20" + bytes(32))
        time.sleep(1)

    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        out = bytearray()
        with get(
            "127.0.0.1",
            port,
            "/m.bin",
            {},
            context=context,
            connect_timeout_s=5,
            read_timeout_s=5,
        ) as response:
            with pytest.raises(ssl.SSLError):
                while count := response.read_some(view):
                    out += view[:count]
            assert bytes(out) == BODY
            with pytest.raises(ssl.SSLError):
                response.read_some(view)  # and it stays failed


def test_a_record_dripped_byte_by_byte_is_a_timeout(authority: trustme.CA) -> None:
    # Every socket read brings a byte within the read timeout, yet no record ever completes;
    # the wait for one record is bounded by the read timeout in all.
    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        for byte in wire.record(BODY[:1000]):
            wire.sock.sendall(bytes([byte]))
            time.sleep(0.05)

    with tls_server(authority, respond) as (port, context):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_all(port, context, read_timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_a_protocol_switch_nobody_asked_for_is_refused(authority: trustme.CA) -> None:
    # With "Connection: Upgrade" llhttp hands the connection over (HttpParserUpgrade, which
    # is no HttpParserError); the transport turns that into a ProtocolError.
    def respond(wire: _Wire) -> None:
        wire.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n" + BODY
        )

    with tls_server(authority, respond) as (port, context):
        with pytest.raises(ProtocolError):
            read_all(port, context)


def test_chunk_extensions_dripped_without_a_body_byte_are_a_timeout(
    authority: trustme.CA,
) -> None:
    # Each socket read brings bytes well within the read timeout, but none of them is body:
    # the framing as a whole is bounded by the read timeout, as a head is.
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=")
        for _ in range(60):
            wire.send(b"a" * 16)
            time.sleep(0.05)

    with tls_server(authority, respond) as (port, context):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_all(port, context, read_timeout_s=0.5)
        assert time.monotonic() - started < 2


def test_chunk_framing_longer_than_a_head_without_a_body_byte_is_refused(
    authority: trustme.CA,
) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=")
        # Twice the bound: the client may read part of it together with the head.
        for _ in range(2 * MAX_HEAD_BYTES // 4096 + 2):
            wire.send(b"a" * 4096)

    with tls_server(authority, respond) as (port, context):
        with pytest.raises(ProtocolError):
            read_all(port, context)


def test_a_head_that_never_ends_is_refused(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\n")
        for _ in range(MAX_HEAD_BYTES // 1000 + 2):
            wire.send(b"X-Filler: " + b"a" * 988 + b"\r\n")

    with tls_server(authority, respond) as (port, context):
        with pytest.raises(ProtocolError):
            read_all(port, context)


def test_a_malformed_head_is_a_parser_error(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")

    with tls_server(authority, respond) as (port, context):
        with pytest.raises(httptools.HttpParserError):
            read_all(port, context)


def test_an_end_without_close_notify_ends_the_body_short(authority: trustme.CA) -> None:
    # The caller compares what arrived with what was announced; the transport just stops.
    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:999])
        wire.sock.shutdown(socket.SHUT_RDWR)

    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        with get(
            "127.0.0.1",
            port,
            "/m.bin",
            {},
            context=context,
            connect_timeout_s=5,
            read_timeout_s=5,
        ) as response:
            received = 0
            while count := response.read_some(view):
                received += count
            assert received == 999
            assert response.length == len(BODY) - 999


def close_notify(wire: _Wire) -> None:
    """End TLS with a close_notify alert, as a server that means to end the body does."""
    with contextlib.suppress(ssl.SSLWantReadError):
        wire.tls.unwrap()
    wire.sock.sendall(wire.outgoing.read())


HEAD_LENGTH = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
HEAD_UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
CHUNK = b"%x\r\n" % 1000 + BODY[:1000] + b"\r\n"


@pytest.mark.parametrize(
    ("respond", "complete"),
    [
        (lambda wire: wire.send(HEAD_LENGTH + BODY), True),
        (lambda wire: wire.send(HEAD_LENGTH + BODY[:1000]), False),
        (lambda wire: wire.send(HEAD_CHUNKED + CHUNK + b"0\r\n\r\n"), True),
        (lambda wire: wire.send(HEAD_CHUNKED + CHUNK), False),
        (lambda wire: wire.send(HEAD_CHUNKED + CHUNK[:500]), False),
        (lambda wire: (wire.send(HEAD_CHUNKED + CHUNK), close_notify(wire)), False),
        (lambda wire: (wire.send(HEAD_UNTIL_CLOSE + BODY[:1000]), close_notify(wire)), True),
        (lambda wire: wire.send(HEAD_UNTIL_CLOSE + BODY[:1000]), False),
    ],
    ids=[
        "length-all",
        "length-short",
        "chunked-last-chunk",
        "chunked-cut-between-chunks",
        "chunked-cut-mid-chunk",
        "chunked-close-notify-without-last-chunk",
        "until-close-with-close-notify",
        "until-close-without-close-notify",
    ],
)
def test_a_body_is_complete_only_where_the_server_said_it_ends(
    authority: trustme.CA, respond: Callable[[_Wire], None], complete: bool
) -> None:
    # RFC 9112 section 9.8: a connection that goes away before then is a broken transfer.
    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        with get(
            "127.0.0.1", port, "/m.bin", {}, context=context, connect_timeout_s=5, read_timeout_s=5
        ) as response:
            while response.read_some(view):
                pass
            assert response.complete is complete


def test_a_certificate_for_another_name_is_refused(authority: trustme.CA) -> None:
    other = trustme.CA()

    with tls_server(other, lambda wire: None) as (port, _):
        context = ssl.create_default_context()
        authority.configure_trust(context)
        with pytest.raises(ssl.SSLCertVerificationError):
            read_all(port, context)


def test_a_handshake_dripped_byte_by_byte_is_a_timeout(authority: trustme.CA) -> None:
    # Each byte arrives well within the connect timeout; the handshake as a whole does not.
    with tls_server(authority, lambda wire: None, drip_handshake_s=0.02) as (port, context):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with get(
                "127.0.0.1",
                port,
                "/m.bin",
                {},
                context=context,
                connect_timeout_s=0.5,
                read_timeout_s=5,
            ):
                pass
        assert time.monotonic() - started < 3


def test_a_head_dripped_byte_by_byte_is_a_timeout(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
            wire.send(bytes([byte]))  # each byte a whole record, within the read timeout
            time.sleep(0.02)

    with tls_server(authority, respond) as (port, context):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_all(port, context, read_timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_a_repeated_header_reads_as_one_list(authority: trustme.CA) -> None:
    def respond(wire: _Wire) -> None:
        wire.send(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )

    with tls_server(authority, respond) as (port, context):
        with get(
            "127.0.0.1", port, "/m.bin", {}, context=context, connect_timeout_s=5, read_timeout_s=5
        ) as response:
            assert response.getheader("Content-Encoding") == "identity, gzip"


# --- cancellation -------------------------------------------------------------------------


def cancel_after(delay_s: float) -> threading.Event:
    """An event that another thread sets ``delay_s`` from now (as a signal handler would)."""
    cancel = threading.Event()
    timer = threading.Timer(delay_s, cancel.set)
    timer.daemon = True
    timer.start()
    return cancel


def test_a_cancel_ends_a_connect_that_hangs(authority: trustme.CA) -> None:
    # A listener whose accept queue is full drops new connection attempts: the connect would
    # wait out its whole timeout (60 s here); the cancel ends it at the next slice.
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # fills the queue
            cancel = cancel_after(0.5)
            started = time.monotonic()
            with pytest.raises(Cancelled):
                with get(
                    "127.0.0.1",
                    port,
                    "/m.bin",
                    {},
                    context=client_context,
                    connect_timeout_s=60,
                    read_timeout_s=60,
                    cancelled=cancel.is_set,
                ):
                    pass
            assert time.monotonic() - started < 0.5 + POLL_S + 1


def test_a_cancel_ends_a_read_the_server_stays_silent_on(authority: trustme.CA) -> None:
    # Head and part of the body, then silence: every read would wait the stall timeout (60 s).
    release = threading.Event()

    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        wire.send(BODY[:1000])
        release.wait(30)

    cancel = threading.Event()
    with tls_server(authority, respond) as (port, context):
        view = memoryview(bytearray(1 << 20))
        received = 0
        try:
            with get(
                "127.0.0.1",
                port,
                "/m.bin",
                {},
                context=context,
                connect_timeout_s=60,
                read_timeout_s=60,
                cancelled=cancel.is_set,
            ) as response:
                while received < 1000:
                    received += response.read_some(view)
                threading.Timer(0.5, cancel.set).start()
                started = time.monotonic()
                with pytest.raises(Cancelled):
                    response.read_some(view)
                assert time.monotonic() - started < 0.5 + POLL_S + 1
        finally:
            release.set()
    assert received == 1000


def test_without_a_cancel_the_same_silence_is_still_a_timeout(authority: trustme.CA) -> None:
    # The sliced waits add up to the read timeout, no less and not much more.
    release = threading.Event()

    def respond(wire: _Wire) -> None:
        wire.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        release.wait(30)

    with tls_server(authority, respond) as (port, context):
        try:
            with get(
                "127.0.0.1",
                port,
                "/m.bin",
                {},
                context=context,
                connect_timeout_s=5,
                read_timeout_s=1,
            ) as response:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    response.read_some(memoryview(bytearray(1024)))
                assert 1 <= time.monotonic() - started < 1 + POLL_S + 1
        finally:
            release.set()


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_key_update_the_server_requests_mid_body_is_answered(tmp_path: Path) -> None:
    # TLS 1.3: a KeyUpdate with update_requested obliges the client to send one of its own.
    # OpenSSL writes it only on the client's next write, and after the request a download
    # writes nothing more, so it had never been sent: a server that waited for it (or a
    # TLS 1.2 server waiting for a renegotiation's ClientHello) would have waited in vain.
    # Python's ssl cannot send a KeyUpdate; openssl s_server can (its "K" command), and it
    # shows what it receives.
    authority = trustme.CA()
    server_pem = tmp_path / "server.pem"
    authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    body = bytes(range(256)) * 4
    server = subprocess.Popen(
        [
            *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(server_pem)),
            *("-tls1_3", "-naccept", "1", "-msg", "-ign_eof"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert server.stdin is not None and server.stdout is not None
    output: list[str] = []
    stdout = server.stdout

    def collect() -> None:
        for line in stdout:
            output.append(line.decode(errors="replace"))

    def seen(text: str) -> bool:
        return any(text in line for line in list(output))

    def wait(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "".join(output)[-2000:]
            time.sleep(0.02)

    received = bytearray()
    errors: list[BaseException] = []

    def download() -> None:
        try:
            with get(
                "127.0.0.1",
                port,
                "/m",
                {},
                context=client_context,
                connect_timeout_s=10,
                read_timeout_s=10,
            ) as response:
                buffer = memoryview(bytearray(65536))
                while count := response.read_some(buffer):
                    received.extend(buffer[:count])
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    def send(data: bytes) -> None:
        assert server.stdin is not None
        server.stdin.write(data)
        server.stdin.flush()

    threading.Thread(target=collect, daemon=True).start()
    try:
        wait(lambda: seen("ACCEPT"))
        client = threading.Thread(target=download, daemon=True)
        client.start()
        wait(lambda: seen("GET /m HTTP/1.1"))
        send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:300])
        wait(lambda: len(received) >= 300)
        send(b"K\n")  # s_server: a KeyUpdate with update_requested
        wait(lambda: seen(">>> TLS 1.3, Handshake [length 0005], KeyUpdate"))
        # Before the rest of the body: the client answers while it waits for more.
        wait(lambda: seen("<<< TLS 1.3, Handshake [length 0005], KeyUpdate"))
        send(body[300:])
        client.join(10)
        assert not client.is_alive() and not errors
        assert bytes(received) == body
    finally:
        server.kill()
        server.wait()
