"""The front door against a real in-test upstream, with real sockets and httpx as the client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import logging
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from companion_runtime import Lifecycle, LifecycleState
from companion_runtime.bind.eventloop import run as run_on_serves_loop
from companion_runtime.bind.frontdoor import FrontDoor, FrontDoorConfig, _Client
from tests.support.frontdoor import (
    ReadyDoor,
    ready_controller,
    running_front_door,
    tiny_upstream,
)
from tests.support.llama import (
    LLAMA_SERVER_ENV,
    free_port,
    running_llama_server,
    upstream_binary,
    upstream_command,
    write_model,
)

pytestmark = pytest.mark.integration


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def reason_of(response: httpx.Response) -> str:
    body = response.json()
    assert body["ok"] is False
    return str(body["reason"])


async def raw_exchange(door: ReadyDoor, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return data


# --- the guards ---------------------------------------------------------------------------


@pytest.mark.security
def test_missing_wrong_or_malformed_token_is_401() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url) as client:
                    cases = [
                        {},
                        {"authorization": "Bearer " + "x" * len(door.token)},
                        {"authorization": "Bearer " + door.token[:-1]},
                        {"authorization": "Basic " + door.token},
                        {"authorization": door.token},
                    ]
                    for headers in cases:
                        response = await client.get("/echo", headers=headers)
                        assert response.status_code == 401
                        assert reason_of(response) == "unauthorized"
                        assert response.headers["www-authenticate"] == "Bearer"
                    # Two Authorization headers, one of them right: still refused.
                    response = await client.get(
                        "/echo",
                        headers=[
                            ("authorization", "Bearer wrong-token-value"),
                            ("authorization", f"Bearer {door.token}"),
                        ],
                    )
                    assert response.status_code == 401
                    ok = await client.get("/echo", headers=door.auth)
                    assert ok.status_code == 200
                    # Scheme names are case-insensitive (RFC 9110).
                    ok = await client.get(
                        "/echo", headers={"authorization": f"bearer {door.token}"}
                    )
                    assert ok.status_code == 200
            assert upstream.requests_seen == 2

    run(scenario)


@pytest.mark.security
def test_host_must_be_a_loopback_name_with_the_front_door_port() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    for host in (
                        "evil.example",
                        f"evil.example:{port}",
                        "127.0.0.1",
                        f"127.0.0.1:{port + 1}",
                        f"localhost.evil.example:{port}",
                        f"127.0.0.2:{port}",
                    ):
                        response = await client.get("/echo", headers={"host": host})
                        assert response.status_code == 403, host
                        assert reason_of(response) == "host_not_allowed"
                    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
                        response = await client.get("/echo", headers={"host": host})
                        assert response.status_code == 200, host
                    # Host is checked before the token: a rebinding page learns nothing more.
                    response = await client.get(
                        "/echo", headers={"host": "evil.example", "authorization": "Bearer x"}
                    )
                    assert reason_of(response) == "host_not_allowed"
            assert upstream.requests_seen == 3

    run(scenario)


@pytest.mark.security
def test_cross_origin_requests_are_403() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    for origin in (
                        "http://evil.example",
                        "null",
                        f"https://127.0.0.1:{door.door.port}",
                        f"http://127.0.0.1:{door.door.port + 1}",
                    ):
                        response = await client.post(
                            "/echo", headers={"origin": origin}, content=b"{}"
                        )
                        assert response.status_code == 403, origin
                        assert reason_of(response) == "origin_not_allowed"
                    # A CORS preflight from another origin is refused the same way.
                    response = await client.options(
                        "/echo", headers={"origin": "http://evil.example"}
                    )
                    assert response.status_code == 403
                    response = await client.post(
                        "/echo", headers={"origin": door.url}, content=b"{}"
                    )
                    assert response.status_code == 200
            assert upstream.requests_seen == 1

    run(scenario)


def test_listener_is_bound_to_127_0_0_1_only() -> None:
    async def scenario() -> None:
        async with running_front_door(None) as door:
            port = door.door.port
            # Another loopback address on the same port is a different socket: nothing there.
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.2", port)
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert writer.get_extra_info("peername")[0] == "127.0.0.1"
            writer.close()

    run(scenario)


# --- status and relay ---------------------------------------------------------------------


def test_status_reports_state_counters_and_front_door_statistics() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    await client.get("/echo")
                    await client.get("/echo", headers={"authorization": "Bearer nope"})
                    response = await client.get("/_status?verbose=1")
                    assert response.status_code == 200
                    status = response.json()
                    assert status["state"] == "ready"
                    assert status["in_flight"] == 0
                    assert status["queued"] == 0
                    front = status["front_door"]
                    assert front["proxied_total"] == 1
                    assert front["refused_by_reason"] == {"unauthorized": 1}
                    posted = await client.post("/_status")
                    assert posted.status_code == 405
                    assert upstream.requests_seen == 1  # /_status never reaches the runtime
                    unauthenticated = await client.get("/_status", headers={"authorization": ""})
                    assert unauthenticated.status_code == 401

    run(scenario)


@pytest.mark.security
def test_relay_drops_credentials_and_hop_by_hop_headers_and_keeps_the_rest() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    response = await client.post(
                        "/echo?alpha=1&beta=two",
                        content=b'{"prompt": "hi"}',
                        headers={
                            "cookie": "session=secret",
                            "x-custom": "kept",
                            "connection": "keep-alive, x-hop",
                            "x-hop": "dropped",
                            "keep-alive": "timeout=5",
                            "proxy-authorization": "Basic abc",
                            "content-type": "application/json",
                        },
                    )
                    assert response.status_code == 200
                    seen = response.json()
                    assert seen["method"] == "POST"
                    assert seen["target"] == "/echo?alpha=1&beta=two"
                    assert seen["body"] == '{"prompt": "hi"}'
                    headers = seen["headers"]
                    assert "authorization" not in headers
                    assert "proxy-authorization" not in headers
                    assert "cookie" not in headers
                    assert "keep-alive" not in headers
                    assert "x-hop" not in headers  # named by the client's Connection header
                    assert headers["x-custom"] == "kept"
                    assert headers["content-type"] == "application/json"
                    assert headers["host"] == upstream.url.removeprefix("http://")
                    assert door.token not in json.dumps(headers)
                    # Response side: CORS decisions are not the runtime's to make here.
                    assert "access-control-allow-origin" not in response.headers
                    assert response.headers["x-upstream"] == "tiny"
                    head = await client.head("/echo")
                    assert head.status_code == 200
                    assert head.content == b""
                    # Naming the headers the front door writes itself removes none of them.
                    named = await client.post(
                        "/echo",
                        content=b"body",
                        headers={"connection": "host, content-length, authorization, x-b"},
                    )
                    seen = named.json()
                    assert seen["body"] == "body"
                    assert seen["headers"]["host"] == upstream.url.removeprefix("http://")
                    assert seen["headers"]["content-length"] == "4"
                    assert "x-b" not in seen["headers"]

    run(scenario)


@pytest.mark.security
def test_the_runtime_gets_its_own_key_never_the_clients_token() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            runtime_key = b"Bearer runtime-only-key"
            async with running_front_door(upstream.url, runtime_authorization=runtime_key) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    for _ in range(2):  # a fresh and a reused runtime connection
                        seen = (await client.get("/echo")).json()["headers"]
                        assert seen["authorization"] == runtime_key.decode()
                        assert door.token not in json.dumps(seen)
                    status = (await client.get("/_status")).text
                    assert "runtime-only-key" not in status

    run(scenario)


def test_keep_alive_reuses_connections_on_both_legs() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    for _ in range(20):
                        assert (await client.get("/echo")).status_code == 200
                assert door.door.statistics().proxied_total == 20
            assert upstream.requests_seen == 20
            assert upstream.connections_seen == 1

    run(scenario)


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length body from a raw connection: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def test_a_connection_stays_usable_after_a_status_request() -> None:
    # /_status is answered as soon as its head is parsed; the connection must still be kept
    # for the next request (it once was closed under the client, which had been told nothing,
    # so its next request on the connection met a reset).
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                request = (
                    f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n"
                ).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                try:
                    for _ in range(3):
                        writer.write(request)
                        await writer.drain()
                        head, body = await _read_response(reader)
                        assert head.startswith(b"HTTP/1.1 200")
                        assert b"connection: close" not in head.lower()
                        assert json.loads(body)["front_door"]["open_connections"] == 1
                        await asyncio.sleep(0.1)  # long enough for a close to reach us
                finally:
                    writer.close()

    run(scenario)


def test_streamed_events_reach_the_client_before_the_stream_ends() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    started = time.monotonic()
                    arrivals: list[float] = []
                    chunks: list[bytes] = []
                    async with client.stream("GET", "/stream?n=5&gap_ms=200") as response:
                        assert response.status_code == 200
                        assert response.headers["content-type"] == "text/event-stream"
                        async for chunk in response.aiter_raw():
                            arrivals.append(time.monotonic() - started)
                            chunks.append(chunk)
                    body = b"".join(chunks)
                    assert body == b"".join(f"data: token-{i}\n\n".encode() for i in range(5))
                    # The stream takes >= 1 s upstream; the first event must not wait for it.
                    assert arrivals[0] < 0.5
                    assert arrivals[-1] >= 0.8
                    assert len(arrivals) >= 4

    run(scenario)


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                head = f"Host: 127.0.0.1:{door.door.port}\r\nAuthorization: Bearer {door.token}\r\n"
                pipelined = (
                    b"".join(
                        f"GET /echo?n={index} HTTP/1.1\r\n{head}\r\n".encode() for index in range(3)
                    )
                    + f"GET /_status HTTP/1.1\r\n{head}\r\n".encode()
                )
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                try:
                    writer.write(pipelined)  # all four heads in one write
                    await writer.drain()
                    for index in range(3):
                        status, body = await _read_response(reader)
                        assert status.startswith(b"HTTP/1.1 200")
                        assert json.loads(body)["target"] == f"/echo?n={index}"
                    status, body = await _read_response(reader)
                    assert json.loads(body)["front_door"]["proxied_total"] == 3
                finally:
                    writer.close()
            assert upstream.connections_seen == 1

    run(scenario)


def test_a_head_that_never_ends_is_refused_once_it_passes_16_kib() -> None:
    # llhttp takes a header of any length; the front door bounds a head sent in pieces.
    async def scenario() -> None:
        async with running_front_door(None) as door:
            reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            answer = b""
            sent = 0
            while not answer and sent < 40:  # 40 KiB at most, in 1 KiB pieces
                writer.write(b"a" * 1024)
                sent += 1
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    # Stop sending once the answer is there (more bytes would meet a reset).
                    answer = await asyncio.wait_for(reader.read(65536), 0.02)
            assert 16 <= sent <= 18  # refused just past 16 KiB, not at the end of the head
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431")
            assert b"bad_request" in answer
            assert b"connection: close" in answer.lower()

    run(scenario)


def test_more_than_one_host_header_is_400() -> None:
    async def scenario() -> None:
        async with running_front_door(None) as door:
            port = door.door.port
            answer = await raw_exchange(
                door,
                f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n"
                f"Authorization: Bearer {door.token}\r\n\r\n".encode(),
            )
            assert answer.startswith(b"HTTP/1.1 400")
            assert b"bad_request" in answer

    run(scenario)


@pytest.mark.security
def test_whitespace_around_host_and_origin_is_no_part_of_their_value() -> None:
    # RFC 9112, section 5: whitespace before or after a field value is not part of it.
    async def scenario() -> None:
        async with running_front_door(None) as door:
            port = door.door.port
            answer = await raw_exchange(
                door,
                f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{port} \t\r\n"
                f"Origin: http://localhost:{port}\t \r\n"
                f"Authorization: Bearer {door.token}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            for host, origin, reason in (
                (f"evil.example:{port} ", f"http://127.0.0.1:{port}", b"host_not_allowed"),
                (f"127.0.0.1:{port}", f"http://evil.example:{port} ", b"origin_not_allowed"),
            ):
                answer = await raw_exchange(
                    door,
                    f"GET /_status HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n".encode(),
                )
                assert answer.startswith(b"HTTP/1.1 403") and reason in answer, answer[:200]

    run(scenario)


def test_an_http_1_0_client_gets_a_chunked_stream_as_a_body_ended_by_close() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(
                    f"GET /stream?n=3&gap_ms=10 HTTP/1.0\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n".encode()
                )
                answer = await asyncio.wait_for(reader.read(), 5)  # to EOF
                writer.close()
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"transfer-encoding" not in head.lower()
                assert b"connection: close" in head.lower()
                assert body == b"".join(f"data: token-{i}\n\n".encode() for i in range(3))

    run(scenario)


def test_an_idle_connection_is_closed_after_keep_alive_and_a_busy_one_is_not() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, keep_alive_s=0.4) as door:
                request = (
                    f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n"
                ).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                try:
                    # A request every 0.25 s for 1.5 s: never idle for 0.4 s, so never closed.
                    for _ in range(6):
                        writer.write(request)
                        head, _ = await _read_response(reader)
                        assert head.startswith(b"HTTP/1.1 200")
                        await asyncio.sleep(0.25)
                    # Then idle: closed by the front door after about 0.4 s.
                    started = time.monotonic()
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                    assert time.monotonic() - started < 1.5
                finally:
                    writer.close()
                # A head sent in pieces that never completes is bounded by the same time.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(b"GET /echo HTTP/1.1\r\n")
                started = time.monotonic()
                assert await asyncio.wait_for(reader.read(), 5) == b""
                assert time.monotonic() - started < 1.5
                writer.close()
            assert upstream.requests_seen == 6

    run(scenario)


def test_a_silent_runtime_is_504_before_the_head_and_an_abort_after_it() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, upstream_read_timeout_s=0.4) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    started = time.monotonic()
                    response = await client.get("/slow?ms=1500")
                    assert response.status_code == 504
                    assert reason_of(response) == "timeout"
                    assert time.monotonic() - started < 1.2
                    # Events 0.25 s apart keep a stream alive: each one moves the timer on.
                    response = await client.get("/stream?n=4&gap_ms=250")
                    assert response.status_code == 200
                    assert response.content.count(b"data: ") == 4
                    # Silence longer than the limit after the head: the client sees the cut.
                    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                        await client.get("/stream?n=2&gap_ms=1200")
                statistics = door.door.statistics()
                assert statistics.upstream_aborts == 1
                assert statistics.refused_by_reason.get("timeout") == 1
                assert door.controller.statistics().in_flight == 0

    run(scenario)


# --- body and protocol limits -------------------------------------------------------------


def test_request_body_over_the_cap_is_413() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_body_bytes=1000) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    response = await client.post("/echo", content=b"x" * 1001)
                    assert response.status_code == 413
                    assert reason_of(response) == "request_too_large"

                    async def chunked() -> object:
                        for _ in range(5):
                            yield b"y" * 300

                    response = await client.post("/echo", content=chunked())  # type: ignore[arg-type]
                    assert response.status_code == 413
                    assert reason_of(response) == "request_too_large"
                    response = await client.post("/echo", content=b"x" * 1000)
                    assert response.status_code == 200
                    assert len(response.json()["body"]) == 1000
            assert upstream.requests_seen == 1

    run(scenario)


@pytest.mark.security
def test_bodies_still_arriving_are_held_to_a_budget_across_connections() -> None:
    # Bodies are read before admission. Each is capped (8 MiB by default), but every open
    # connection may be sending one: at max_connections that was 8 GiB held by the front
    # door (100 connections held 804 MiB), none of it counted by admission. Bodies still
    # arriving share one budget (64 MiB by default); one that would pass it is refused.
    cap = 8 * 1024 * 1024
    body = b"x" * (cap - 1)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url, max_in_flight=8, queue_bound=8, max_body_bytes=cap
            ) as door:
                head = (
                    b"POST /sized?kib=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
                    b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n"
                    % (door.door.port, door.token.encode(), cap)
                )
                held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
                refused = 0
                for _ in range(10):
                    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                    writer.write(head + body)  # all but the body's last byte
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        answer = await asyncio.wait_for(reader.read(65536), 0.5)
                        assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
                        assert b"retry-after: 1\r\n" in answer
                        assert b'"reason":"at_capacity"' in answer.replace(b" ", b"")
                        refused += 1
                        writer.close()
                        continue
                    held.append((reader, writer))
                # Eight bodies fill the budget; the ninth and the tenth do not fit.
                assert (len(held), refused) == (8, 2)
                for reader, writer in held:
                    writer.write(b"x")
                for reader, writer in held:
                    answer = await asyncio.wait_for(reader.read(65536), 10)
                    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
                    writer.close()
                # A client that leaves mid-body gives its share back.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(head + body[: cap // 2])
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()
                await wait_for(lambda: door.door._arriving_body_bytes == 0)
                statistics = door.door.statistics()
                assert statistics.proxied_total == 8
                assert statistics.refused_by_reason == {"at_capacity": 2}
                assert statistics.requests_total == 11
                assert statistics.client_disconnects == 1
            assert upstream.requests_seen == 8

    run(scenario)


def test_a_request_refused_before_its_large_body_is_read_still_gets_its_answer() -> None:
    # Refused before its body is read, the connection closes; closed with the body unread it
    # would be reset, and a reset can destroy the answer before the client has read it.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_body_bytes=1000) as door:
                body = b"x" * (4 * 1024 * 1024)
                async with httpx.AsyncClient(base_url=door.url) as client:
                    for _ in range(3):
                        response = await client.post("/echo", content=body, headers=door.auth)
                        assert response.status_code == 413
                        assert reason_of(response) == "request_too_large"
                        response = await client.post(
                            "/echo", content=body, headers={"authorization": "Bearer wrong"}
                        )
                        assert response.status_code == 401
                        assert reason_of(response) == "unauthorized"
                await wait_for(lambda: not door.door._lingering)
            assert upstream.requests_seen == 0

    run(scenario)


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_client_gone_right_after_a_refused_request_leaves_no_error(loop: str) -> None:
    # A request refused before its body was read lingers: its sending side is shut. A client
    # that closed right after sending has reset the connection by then (the refusal reached
    # a closed socket), and shutting it failed with ENOTCONN: a traceback for every such
    # client, and a connection closed by nobody.
    errors: list[object] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: errors.append(context.get("exception"))
        )
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                for _ in range(20):
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        sock.sendall(
                            f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            "Content-Length: 100\r\n\r\nabc".encode()
                        )
                    await asyncio.sleep(0.01)
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                await wait_for(lambda: not door.door._lingering)
                assert door.door.statistics().refused_by_reason == {"unauthorized": 20}
            assert upstream.requests_seen == 0

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())
    gc.collect()  # a task's unretrieved exception is reported when the task is collected
    assert errors == []


def test_refused_connections_kept_open_by_one_client_cost_no_other_client_its_answer() -> None:
    # Lingering connections are bounded (64); anyone can refuse to close theirs, a header
    # each, a second at a time. The bound must not then turn other clients' refusals back
    # into resets that destroy the answer before it is read.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_body_bytes=1000) as door:
                port = door.door.port
                held = []
                for _ in range(80):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(
                        f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Content-Length: 100000000\r\n\r\n".encode()
                    )
                    held.append(writer)
                await wait_for(lambda: door.door.statistics().requests_total == 80)
                assert len(door.door._lingering) <= 64
                body = b"x" * (4 * 1024 * 1024)
                async with httpx.AsyncClient(base_url=door.url) as client:
                    for _ in range(3):
                        response = await client.post("/echo", content=body, headers=door.auth)
                        assert response.status_code == 413
                        assert reason_of(response) == "request_too_large"
                assert len(door.door._lingering) <= 64
                for writer in held:
                    writer.close()
                await wait_for(lambda: not door.door._lingering)
            assert upstream.requests_seen == 0

    run(scenario)


def test_a_body_larger_than_the_pipelining_bound_is_read_whole() -> None:
    # Reading pauses when a client sends more than 64 KiB *behind* the request being answered;
    # the request's own body, up to the cap, must never trip that bound.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_body_bytes=4 * 1024 * 1024) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    body = bytes(range(256)) * (3 * 1024 * 4)  # 3 MiB

                    async def pieces() -> AsyncIterator[bytes]:
                        for start in range(0, len(body), 256 * 1024):
                            yield body[start : start + 256 * 1024]
                            await asyncio.sleep(0.01)

                    for content in (body, pieces()):
                        response = await client.post("/echo", content=content)
                        assert response.status_code == 200
                        assert response.json()["body"].encode("latin-1") == body
            assert upstream.requests_seen == 2

    run(scenario)


def test_a_large_body_pipelined_behind_another_request_is_read_whole() -> None:
    # The head and first bytes of a second request, sent behind the first, pause reading at the
    # pipelining bound; once the first is answered, the second's body must still be read.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url, max_body_bytes=4 * 1024 * 1024, request_timeout_s=5
            ) as door:
                port = door.door.port
                auth = f"Authorization: Bearer {door.token}\r\n"
                body = b"b" * (1024 * 1024)
                payload = (
                    f"GET /slow?ms=200 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                for start in range(0, len(payload), 64 * 1024):
                    writer.write(payload[start : start + 64 * 1024])
                    await writer.drain()
                    await asyncio.sleep(0.01)
                head, _ = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 200")
                head, echoed = await _read_response(reader)
                writer.close()
                assert head.startswith(b"HTTP/1.1 200")
                assert json.loads(echoed)["body"].encode("latin-1") == body

    run(scenario)


def test_a_request_whose_body_never_comes_whole_is_answered_and_counted() -> None:
    # Every request ends in exactly one outcome: a body cut off by the client leaving is a
    # client disconnect, and one that does not come whole in request_timeout_s is refused
    # 408 timeout (with the answer readable), never a silent close counted nowhere.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, request_timeout_s=0.5) as door:
                port = door.door.port
                head = (
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {door.token}\r\nContent-Length: 100\r\n\r\n{{"
                ).encode()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                await writer.drain()
                await wait_for(lambda: door.door.statistics().requests_total == 1)
                writer.close()
                await wait_for(lambda: door.door.statistics().client_disconnects == 1)

                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: it is closed
                writer.close()
                assert answer.startswith(b"HTTP/1.1 408")
                assert answer.endswith(b'{"ok":false,"reason":"timeout"}')
                statistics = door.door.statistics().to_dict()
                assert statistics["requests_total"] == 2
                assert statistics["client_disconnects"] == 1
                assert statistics["refused_by_reason"] == {"timeout": 1}
            assert upstream.requests_seen == 0

    run(scenario)


def test_a_chunked_body_is_relayed_with_a_length_and_without_its_trailer() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\nTransfer-Encoding: chunked\r\n"
                    "Trailer: X-Late\r\n\r\n"
                    "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Late: sneaked\r\n\r\n".encode()
                )
                head, body = await _read_response(reader)
                writer.close()
                assert head.startswith(b"HTTP/1.1 200")
                echoed = json.loads(body)
                assert echoed["body"] == "hello world"
                assert echoed["headers"]["content-length"] == "11"
                assert "transfer-encoding" not in echoed["headers"]
                assert "x-late" not in echoed["headers"]

    run(scenario)


@pytest.mark.security
def test_a_body_of_tiny_chunks_costs_the_front_door_no_more_than_its_bytes() -> None:
    # Each piece of a body was kept as it came, a bytes object and a list slot: 43 bytes for
    # each 2-byte chunk, so a body within the 8 MiB cap held 224 MiB, and the bodies within
    # the 64 MiB budget for bodies still arriving nearly 2 GiB.
    import psutil

    payload = 4 * 1024 * 1024
    process = psutil.Process()

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url, max_body_bytes=8 * 1024 * 1024, request_timeout_s=120
            ) as door:
                gc.collect()
                before = process.memory_info().rss
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\nTransfer-Encoding: chunked\r\n"
                    "\r\n".encode()
                )
                block = b"2\r\nab\r\n" * 8192
                for _ in range(payload // 2 // 8192):
                    writer.write(block)
                    await writer.drain()
                await wait_for(
                    lambda: door.door.statistics().arriving_body_bytes == payload, timeout_s=60
                )
                grown = process.memory_info().rss - before
                assert grown < 4 * payload, grown
                writer.write(b"0\r\n\r\n")
                head, body = await _read_response(reader)
                writer.close()
                assert head.startswith(b"HTTP/1.1 200")
                echoed = json.loads(body)
                assert echoed["headers"]["content-length"] == str(payload)
                assert echoed["body"] == "ab" * (payload // 2)

    run(scenario)


@pytest.mark.security
def test_a_body_of_tiny_chunks_without_a_token_is_refused_unparsed() -> None:
    # The read that brings a head also brings what follows, and each chunk of a body cost the
    # parser a callback before the serving task refused the request 401 whatever its body:
    # 200 KB of 2-byte chunks had cost 8.4 ms of the front door's CPU for each connection,
    # 33 times a plain body of that size, with no token needed.
    async def scenario() -> None:
        async with running_front_door(None) as door:
            payload = (
                f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode() + b"2\r\nab\r\n" * 30_000
            connections = 50  # fewer than may linger at once, so each reads its answer

            def send_all() -> list[bytes]:
                socks = [
                    socket.create_connection(("127.0.0.1", door.door.port))
                    for _ in range(connections)
                ]
                answers = []
                for sock in socks:
                    sock.sendall(payload)
                for sock in socks:
                    sock.settimeout(5)
                    answers.append(sock.recv(65536).split(b"\r\n", 1)[0])
                    sock.close()
                return answers

            started = time.thread_time()  # the front door runs on this thread alone
            answers = await asyncio.to_thread(send_all)
            spent = time.thread_time() - started
            assert answers == [b"HTTP/1.1 401 Unauthorized"] * connections
            assert spent / connections < 0.002, spent
            assert door.door.statistics().refused_by_reason == {"unauthorized": connections}

    run(scenario)


@pytest.mark.security
def test_a_trailer_of_many_fields_without_a_token_is_refused_unparsed() -> None:
    # A chunked body's trailer fields are never relayed, yet each cost the parser a callback
    # as a chunk does: one chunk, then 210 KB of empty trailer fields ("a:") in the read that
    # brought the head, had cost 4.5 ms of the front door's CPU for each connection, with no
    # token needed and the body's sixteen pieces never reached.
    async def scenario() -> None:
        async with running_front_door(None) as door:
            payload = (
                f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n"
            ).encode() + b"a:\r\n" * 52_500
            connections = 50  # fewer than may linger at once, so each reads its answer

            def send_all() -> list[bytes]:
                socks = [
                    socket.create_connection(("127.0.0.1", door.door.port))
                    for _ in range(connections)
                ]
                answers = []
                for sock in socks:
                    sock.sendall(payload)
                for sock in socks:
                    sock.settimeout(5)
                    answers.append(sock.recv(65536).split(b"\r\n", 1)[0])
                    sock.close()
                return answers

            started = time.thread_time()  # the front door runs on this thread alone
            answers = await asyncio.to_thread(send_all)
            spent = time.thread_time() - started
            assert answers == [b"HTTP/1.1 401 Unauthorized"] * connections
            assert spent / connections < 0.002, spent
            assert door.door.statistics().refused_by_reason == {"unauthorized": connections}

    run(scenario)


@pytest.mark.security
def test_pipelined_bodies_without_a_token_share_the_pieces_parsed_unchecked() -> None:
    # The pieces were counted per request, so 32 requests pipelined in one write, each with
    # a body of 15 one-byte chunks, had all been parsed (480 pieces, 31 requests waiting
    # behind the first one's 401) on a connection that never sent the token. The pieces since
    # the last token check are counted over the connection: the second request's first chunk
    # is the 16th, and nothing after it is parsed.
    async def scenario() -> None:
        async with running_front_door(None) as door:
            port = door.door.port
            one = (
                (
                    f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                + b"1\r\na\r\n" * 15
                + b"0\r\n\r\n"
            )
            answer = await raw_exchange(door, one * 32)
            assert answer.startswith(b"HTTP/1.1 401 Unauthorized"), answer[:60]
            await wait_for(lambda: door.door.statistics().open_connections == 0)
            statistics = door.door.statistics()
            assert statistics.refused_by_reason == {"unauthorized": 1}
            assert statistics.pipelined_unanswered == 1

    run(scenario)


@pytest.mark.security
def test_pipelined_bodies_in_many_pieces_with_the_token_are_all_answered() -> None:
    # With the token, the same requests are all relayed whole, on a fresh connection too.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                one = (
                    (
                        f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"Authorization: Bearer {door.token}\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n"
                    ).encode()
                    + b"1\r\na\r\n" * 40
                    + b"0\r\n\r\n"
                )
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(one * 8)
                for _ in range(8):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.startswith(b"HTTP/1.1 200 OK"), head
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    echoed = json.loads(await reader.readexactly(length))
                    assert echoed["body"] == "a" * 40
                writer.close()
                assert door.door.statistics().proxied_total == 8

    run(scenario)


@pytest.mark.security
def test_a_trailer_of_many_fields_with_the_token_is_relayed_without_it() -> None:
    # The same trailer on a request with the token is read whole, and the runtime gets the
    # body alone (a trailer is relayed to nobody).
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                payload = (
                    (
                        f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                        f"Authorization: Bearer {door.token}\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n"
                    ).encode()
                    + b"1\r\na\r\n" * 20
                    + b"0\r\n"
                    + b"a:\r\n" * 5_000
                    + b"\r\n"
                )
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(payload)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 OK"), head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                echoed = json.loads(await reader.readexactly(length))
                writer.close()
                assert echoed["body"] == "a" * 20
                assert "a" not in echoed["headers"]

    run(scenario)


def test_malformed_http_is_400_bad_request() -> None:
    async def scenario() -> None:
        async with running_front_door(None) as door:
            for payload in (
                b"NOT HTTP AT ALL\r\n\r\n",
                b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
                b"GET /echo HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
                f"GET http://127.0.0.1:{door.door.port}/echo HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{door.door.port}\r\n\r\n".encode(),
            ):
                answer = await raw_exchange(door, payload)
                status_line, _, rest = answer.partition(b"\r\n")
                assert status_line.startswith(b"HTTP/1.1 400"), payload
                assert b'{"ok":false,"reason":"bad_request"}' in rest
            # An oversized head is refused too (h11 hints 431), with the same reason.
            huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
            answer = await raw_exchange(door, huge)
            assert answer.split(b" ")[1] in (b"400", b"431")
            assert b"bad_request" in answer

    run(scenario)


def test_ambiguous_framing_is_400_closed_and_never_reaches_the_runtime() -> None:
    # Request smuggling: a request whose body length two parsers could read differently is
    # refused outright; the runtime only ever sees requests the front door wrote itself.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                head = f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                auth = f"Authorization: Bearer {door.token}\r\n"
                for framing in (
                    "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                    "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                    "Content-Length: 4\r\nContent-Length: 5\r\n",
                    "Content-Length: 4, 5\r\n",
                    "Content-Length: +4\r\n",
                    "Transfer-Encoding: chunked, identity\r\n",
                    "Content-Length : 4\r\n",
                    "X-Folded: a\r\n b\r\nContent-Length: 4\r\n",
                    "Content-Length: 4\nX-Bare-LF: 1\r\n",
                ):
                    payload = (head + auth + framing + "\r\n0\r\n\r\n").encode()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(payload)
                    answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: it is closed
                    writer.close()
                    assert answer.startswith(b"HTTP/1.1 400"), framing
                    assert b'{"ok":false,"reason":"bad_request"}' in answer, framing
            assert upstream.requests_seen == 0

    run(scenario)


def test_an_upgrade_request_is_never_relayed_without_its_body() -> None:
    # httptools skips the body of a request that asks to switch protocols (curl --http2 sends
    # one with every POST): relayed, the runtime would get the request without its body. The
    # front door switches nothing: a bodiless one is relayed as a plain request, the rest 400.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                auth = f"Authorization: Bearer {door.token}\r\n"
                upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                for request in (
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}{upgrade}"
                    "Content-Length: 5\r\n\r\nhello",
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}{upgrade}"
                    "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    f"CONNECT /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n",
                ):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(request.encode())
                    answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: it is closed
                    writer.close()
                    assert answer.startswith(b"HTTP/1.1 400"), request
                    assert b'{"ok":false,"reason":"bad_request"}' in answer
                assert upstream.requests_seen == 0
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                    "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode()
                )
                head, body = await _read_response(reader)
                writer.close()
                assert head.startswith(b"HTTP/1.1 200")
                assert "upgrade" not in json.loads(body)["headers"]
                statistics = door.door.statistics().to_dict()
                assert statistics["requests_total"] == 4
                assert statistics["refused_by_reason"] == {"bad_request": 3}

    run(scenario)


def test_a_bodiless_upgrade_request_is_answered_with_connection_close() -> None:
    # Nothing after a head that asks to switch protocols is read on its connection (curl
    # --http2 asks on every plain-http request): the answer must say the connection ends, or
    # a client keeping it sends its next request into a connection that never answers it.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                auth = f"Authorization: Bearer {door.token}\r\n"
                for version in ("1.1", "1.0"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(
                        f"GET /echo HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n".encode()
                    )
                    answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: it is closed
                    writer.close()
                    head, _, body = answer.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200"), version
                    assert b"\r\nconnection: close" in head.lower(), version
                    assert "upgrade" not in json.loads(body)["headers"]

    run(scenario)


def test_expect_100_continue_is_answered() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\nContent-Length: 5\r\n"
                    "Expect: 100-continue\r\n\r\n".encode()
                )
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert interim.startswith(b"HTTP/1.1 100")
                writer.write(b"hello")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                writer.close()
            assert upstream.last_headers.get("expect") is None

    run(scenario)


@pytest.mark.security
def test_expect_100_continue_with_a_body_over_what_is_left_of_the_budget_is_refused_first() -> None:
    # Answered 100 Continue, the client sent the whole body only to be refused 503 once it
    # passed the budget of bodies still arriving. Refused before 100 Continue, it sends none.
    cap = 1024 * 1024

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url, max_body_bytes=cap, max_arriving_body_bytes=cap + cap // 4
            ) as door:
                port = door.door.port

                def head(length: int, *, expect: bool) -> bytes:
                    return (
                        b"POST /sized?kib=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
                        b"authorization: Bearer %s\r\ncontent-length: %d\r\n%s\r\n"
                        % (
                            port,
                            door.token.encode(),
                            length,
                            b"expect: 100-continue\r\n" if expect else b"",
                        )
                    )

                # Half a body still arriving on one connection holds half the budget.
                held_reader, held_writer = await asyncio.open_connection("127.0.0.1", port)
                held_writer.write(head(cap, expect=False) + b"x" * (cap // 2))
                await held_writer.drain()
                await wait_for(lambda: door.door._arriving_body_bytes == cap // 2)

                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head(cap, expect=True))
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(65536), 2)
                assert not answer.startswith(b"HTTP/1.1 100"), answer[:100]
                assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
                assert b"retry-after: 1\r\n" in answer
                assert b'"reason":"at_capacity"' in answer.replace(b" ", b"")
                assert await asyncio.wait_for(reader.read(65536), 2) == b""  # closed
                writer.close()

                # What still fits is asked for.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head(cap // 4, expect=True))
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                assert interim.startswith(b"HTTP/1.1 100")
                writer.write(b"y" * (cap // 4))
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
                writer.close()

                held_writer.write(b"x" * (cap - cap // 2))
                answer = await asyncio.wait_for(held_reader.readuntil(b"\r\n\r\n"), 5)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
                held_writer.close()

                await wait_for(lambda: door.door._arriving_body_bytes == 0)
                statistics = door.door.statistics()
                assert statistics.requests_total == 3
                assert statistics.proxied_total == 2
                assert statistics.refused_by_reason == {"at_capacity": 1}
            assert upstream.requests_seen == 2

    run(scenario)


@pytest.mark.security
def test_status_shows_bodies_still_arriving_and_every_way_out_gives_them_back() -> None:
    # A body's bytes count against max_arriving_body_bytes while it arrives; one never given
    # back would shrink the budget for good, until every body is refused at_capacity. Every
    # way a body stops arriving gives its bytes back, and /_status shows what is held.
    cap = 100_000

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url,
                max_in_flight=1,
                max_body_bytes=cap,
                max_arriving_body_bytes=cap + cap // 2,
                request_timeout_s=1.0,
            ) as ready:
                door = ready.door
                port = door.port

                def head(
                    path: bytes = b"/echo", *, length: int | None, extra: bytes = b""
                ) -> bytes:
                    framing = (
                        b"transfer-encoding: chunked\r\n"
                        if length is None
                        else b"content-length: %d\r\n" % length
                    )
                    return b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n%s%s%s\r\n" % (
                        path,
                        port,
                        b"authorization: Bearer %s\r\n" % ready.token.encode(),
                        framing,
                        extra,
                    )

                async def arriving() -> int:
                    async with httpx.AsyncClient(base_url=ready.url) as client:
                        status = (await client.get("/_status", headers=ready.auth)).json()
                    held = status["front_door"]["arriving_body_bytes"]
                    assert isinstance(held, int)
                    return held

                async def send(data: bytes, *, answer: bool, reset: bool = False) -> None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(data)
                    await writer.drain()
                    if answer:
                        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    else:
                        await wait_for(lambda: door.statistics().arriving_body_bytes > 0)
                    if reset:
                        writer.transport.abort()
                    else:
                        writer.close()
                    await wait_for(lambda: door.statistics().arriving_body_bytes == 0)

                # Held while it arrives, and shown.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head(length=cap) + b"x" * (cap // 2))
                await writer.drain()
                await wait_for(lambda: door.statistics().arriving_body_bytes == cap // 2)
                assert await arriving() == cap // 2
                writer.close()  # the client leaves mid-body
                await wait_for(lambda: door.statistics().arriving_body_bytes == 0)
                ways = [
                    # A reset mid-body.
                    send(head(length=cap) + b"x" * (cap // 2), answer=False, reset=True),
                    # 413 by its length, with part of the body in the same write.
                    send(head(length=cap + 1) + b"x" * (cap // 2), answer=True),
                    # 413 as a chunked body passes the cap.
                    send(
                        head(length=None) + b"%x\r\n%s\r\n" % (cap // 4, b"y" * (cap // 4)) * 5,
                        answer=True,
                    ),
                    # 400: a chunk that does not parse, mid-body.
                    send(head(length=None) + b"10\r\n" + b"a" * 16 + b"\r\nZZ\r\n", answer=True),
                    # 401 with its body coming.
                    send(
                        head(length=cap).replace(b"authorization", b"x-not-it") + b"x" * 1000,
                        answer=True,
                    ),
                    # 408: not whole within request_timeout_s.
                    send(head(length=cap) + b"x" * 1000, answer=True),
                    # Pipelined behind a slow request, half a body, then the client leaves.
                    send(
                        head(b"/slow?ms=300", length=0) + head(length=cap) + b"x" * 30_000,
                        answer=False,
                    ),
                ]
                for way in ways:
                    await way
                # Refused before 100 Continue for want of budget, and the body sent anyway.
                held_reader, held_writer = await asyncio.open_connection("127.0.0.1", port)
                held_writer.write(head(length=cap) + b"x" * (cap - 1))
                await held_writer.drain()
                await wait_for(lambda: door.statistics().arriving_body_bytes == cap - 1)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head(length=cap, extra=b"expect: 100-continue\r\n"))
                await writer.drain()
                refusal = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert refusal.startswith(b"HTTP/1.1 503 ")
                with contextlib.suppress(ConnectionError):
                    writer.write(b"z" * cap)
                    await writer.drain()
                writer.close()
                held_writer.write(b"x")  # the whole body: relayed, and given back
                answer = await asyncio.wait_for(held_reader.readuntil(b"\r\n\r\n"), 5)
                assert answer.startswith(b"HTTP/1.1 200 ")
                await wait_for(lambda: door.statistics().arriving_body_bytes == 0)
                assert await arriving() == 0
                # Shutdown with a body arriving.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head(length=cap) + b"x" * (cap // 2))
                await writer.drain()
                await wait_for(lambda: door.statistics().arriving_body_bytes == cap // 2)
            assert door.statistics().arriving_body_bytes == 0
            writer.close()

    run(scenario)


# --- the runtime's own HTTP limits ---------------------------------------------------------
#
# llama.cpp's server (cpp-httplib) refuses some requests llhttp accepts, with a bare status and
# no body: a header line over 8 KiB or more than 100 header fields (400), a method it does not
# route (400), a body in a content coding (415), a Range it cannot satisfy (416). Relayed, such
# a request takes an admission slot and comes back without a reason. The front door refuses
# them itself (or, for Range, which a server may ignore, drops the header), within limits any
# runtime should take: nginx's 8 KiB per line, Apache's 100 fields.


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The pinned upstream llama-server on the tiny model (skipped when it is not built)."""
    binary = upstream_binary()
    if binary is None:
        pytest.skip(
            f"no upstream llama-server: run scripts/build-llama-server or set {LLAMA_SERVER_ENV}"
        )
    directory = tmp_path_factory.mktemp("llama")
    command = upstream_command(binary, write_model(directory), free_port())
    with running_llama_server(command, directory) as server:
        yield server.base_url


def _head(
    door: ReadyDoor, *, method: str = "GET", target: str = "/health", extra: str = ""
) -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
        f"Authorization: Bearer {door.token}\r\n{extra}\r\n"
    ).encode()


async def _exchange(
    door: ReadyDoor, payload: bytes, *, responses: int = 1, then: bytes = b""
) -> bytes:
    """Send ``payload`` (and ``then`` in a later read); read ``responses`` whole responses
    (each with a content-length), or until the connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
    writer.write(payload)
    await writer.drain()
    if then:
        await asyncio.sleep(0.2)
        writer.write(then)
        await writer.drain()
    data = b""
    while True:
        rest, complete = data, 0
        while (end := rest.find(b"\r\n\r\n")) >= 0:
            head = rest[:end].lower()
            at = head.find(b"\r\ncontent-length: ")
            length = int(head[at + 18 :].split(b"\r\n")[0]) if at >= 0 else 0
            if len(rest) < end + 4 + length:
                break
            rest, complete = rest[end + 4 + length :], complete + 1
        if complete >= responses:
            break
        more = await asyncio.wait_for(reader.read(65536), 10)
        if not more:
            break
        data += more
    writer.close()
    return data


def _fields(count: int) -> str:
    """``count`` small header fields."""
    return "".join(f"x-field-{index}: v\r\n" for index in range(count))


async def _refused_before_the_runtime(
    door: ReadyDoor, payload: bytes, status: int, *, then: bytes = b""
) -> bytes:
    """Send ``payload`` (and ``then``, see ``_exchange``); assert the front door refused it
    with ``status`` and a reason, and relayed nothing to the runtime."""
    relayed = door.door.statistics().proxied_total
    answer = await _exchange(door, payload, then=then)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert rest.endswith(b'{"ok":false,"reason":"bad_request"}'), answer[:200]
    assert door.door.statistics().proxied_total == relayed
    return answer


async def _answered_by_the_runtime(door: ReadyDoor, payload: bytes, *, then: bytes = b"") -> bytes:
    relayed = door.door.statistics().proxied_total
    answer = await _exchange(door, payload, then=then)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    # Counted once the relay has ended, a moment after the client has the answer.
    await wait_for(lambda: door.door.statistics().proxied_total == relayed + 1)
    return answer


@pytest.mark.security
@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("header line over 8 KiB", 431),
        ("more than 100 header fields", 431),
        ("TRACE", 400),
        ("PROPFIND", 400),
        ("body in a content coding", 415),
    ],
)
def test_what_llama_server_refuses_without_a_reason_the_front_door_refuses_with_one(
    llama_url: str, name: str, status: int
) -> None:
    # Each of these, relayed, came back as llama-server's bare 400 or 415, no body, after
    # taking an admission slot.
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            if name == "header line over 8 KiB":
                payload = _head(door, extra=f"x-pad: {'a' * 9000}\r\n")
            elif name == "more than 100 header fields":
                payload = _head(door, extra=_fields(101))
            elif name == "body in a content coding":
                body = gzip.compress(b'{"content": "hi"}')
                payload = (
                    _head(
                        door,
                        method="POST",
                        target="/tokenize",
                        extra=f"content-encoding: gzip\r\ncontent-length: {len(body)}\r\n",
                    )
                    + body
                )
            else:
                payload = _head(door, method=name)
            answer = await _refused_before_the_runtime(door, payload, status)
            if status == 415:
                assert b"\r\naccept-encoding: identity\r\n" in answer
            # The same request within the limits is the runtime's to answer.
            await _answered_by_the_runtime(door, _head(door))

    run(scenario)


@pytest.mark.security
def test_a_range_the_runtime_cannot_satisfy_never_reaches_it(llama_url: str) -> None:
    # llama-server answers a Range it cannot apply (also on a POST) with a bare 416. A server
    # may ignore Range (RFC 9110 section 14.2): the front door never relays it, and the client
    # gets the whole answer.
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            for extra in ("range: bytes=100-50\r\n", "range: chars=0-1\r\nif-range: x\r\n"):
                answer = await _answered_by_the_runtime(door, _head(door, extra=extra))
                assert answer.endswith(b'{"status":"ok"}')

    run(scenario)


@pytest.mark.security
def test_at_the_line_and_field_limits_the_runtime_answers_and_past_them_the_front_door(
    llama_url: str,
) -> None:
    async def scenario() -> None:
        async with running_front_door(llama_url, runtime_authorization=b"Bearer key") as door:
            limit = 8192
            # A header line as relayed ("x-pad: " + value + CRLF): llama-server's own limit.
            pad = limit - len("x-pad: \r\n")
            await _answered_by_the_runtime(door, _head(door, extra=f"x-pad: {'a' * pad}\r\n"))
            await _refused_before_the_runtime(
                door, _head(door, extra=f"x-pad: {'a' * (pad + 1)}\r\n"), 431
            )
            # The request line as relayed ("GET " + target + " HTTP/1.1" + CRLF): llama-server
            # takes one of about 32 KiB, so it is held to the head's 16 KiB alone, as it was
            # before the line limits (refused 414 past 8 KiB, nginx's limit, not the runtime's).
            query = 12 * 1024 - len("GET /health? HTTP/1.1\r\n")
            await _answered_by_the_runtime(door, _head(door, target=f"/health?{'a' * query}"))
            query = 16 * 1024 - len("GET /health? HTTP/1.1\r\n")
            await _refused_before_the_runtime(
                door, _head(door, target=f"/health?{'a' * (query + 1)}"), 414
            )
            # 100 fields, Host and Authorization among them; the runtime gets 100 too (its own
            # Host and key for the client's), llama-server's limit.
            await _answered_by_the_runtime(door, _head(door, extra=_fields(98)))
            await _refused_before_the_runtime(door, _head(door, extra=_fields(99)), 431)
            # A POST without a body gets a Content-Length from the front door: with 100
            # fields of its own it would reach the runtime with 101.
            await _refused_before_the_runtime(
                door, _head(door, method="POST", target="/health", extra=_fields(98)), 431
            )
            answer = await _exchange(
                door, _head(door, method="POST", target="/health", extra=_fields(97))
            )
            assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]  # llama-server's own JSON
            assert b'"not_found_error"' in answer

    run(scenario)


@pytest.mark.security
def test_the_field_limit_counts_only_the_fields_the_runtime_is_sent(llama_url: str) -> None:
    # Host, Authorization, Cookie, hop-by-hop headers and the headers a Connection header
    # names are never relayed, but were counted among the 100 fields: 98 of the client's own
    # with Host, Authorization and Connection were refused 431, though the runtime would get
    # 100 (the front door's Host and key for the client's).
    async def scenario() -> None:
        async with running_front_door(llama_url, runtime_authorization=b"Bearer key") as door:
            dropped = (
                "connection: keep-alive, x-hop\r\nx-hop: h\r\n"
                "cookie: c=1\r\nkeep-alive: timeout=5\r\n"
            )
            # 104 fields sent; relayed, 98 with the front door's Host and key: 100.
            await _answered_by_the_runtime(door, _head(door, extra=dropped + _fields(98)))
            await _refused_before_the_runtime(door, _head(door, extra=dropped + _fields(99)), 431)
            # A Connection header naming one of the fields leaves 99 relayed, then 100.
            named = "connection: x-field-0\r\n"
            await _answered_by_the_runtime(door, _head(door, extra=named + _fields(99)))
            await _refused_before_the_runtime(door, _head(door, extra=named + _fields(100)), 431)
            # One with a Content-Length gets the front door's: refused at its head.
            await _refused_before_the_runtime(
                door, _head(door, extra="content-length: 1\r\n" + _fields(98)) + b"a", 431
            )

    run(scenario)


@pytest.mark.security
def test_a_long_line_the_connection_header_names_is_no_limit_of_the_runtimes(
    llama_url: str,
) -> None:
    # A header the client's Connection header names is hop-by-hop and never relayed, but was
    # held to the 8 KiB line limit (refused 431).
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            long = f"x-long: {'a' * 9000}\r\n"
            for extra in (long + "connection: x-long\r\n", "connection: close, X-Long\r\n" + long):
                await _answered_by_the_runtime(door, _head(door, extra=extra))
            await _refused_before_the_runtime(
                door, _head(door, extra=long + "connection: x-other\r\n"), 431
            )

    run(scenario)


@pytest.mark.security
def test_at_the_field_limit_a_chunked_body_decides_whether_a_content_length_counts(
    llama_url: str,
) -> None:
    # A GET gets a Content-Length from the front door only with a body. A chunked one whose
    # body came in a later read was counted as having one: with 98 fields of the client's it
    # was refused 431, though an empty body reaches the runtime with 100 fields.
    async def scenario() -> None:
        async with running_front_door(llama_url, runtime_authorization=b"Bearer key") as door:
            chunked = _head(door, extra="transfer-encoding: chunked\r\n" + _fields(98))
            await _answered_by_the_runtime(door, chunked, then=b"0\r\n\r\n")
            await _refused_before_the_runtime(door, chunked, 431, then=b"1\r\na\r\n0\r\n\r\n")

    run(scenario)


@pytest.mark.security
def test_what_a_browser_sends_by_default_reaches_the_runtime_whatever_its_cookies(
    llama_url: str,
) -> None:
    # Chromium's fetch() from a page of the front door's own origin, with the cookies every
    # other local server has set for 127.0.0.1 (a browser sends a host's cookies to all its
    # ports). The Cookie line is never relayed, so its length is no limit of the runtime's:
    # refused 431 at 8 KiB, where the front door had relayed the request without it.
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            origin = f"http://127.0.0.1:{door.door.port}"
            cookies = "; ".join(f"session-{index}={'c' * 120}" for index in range(80))
            assert len(cookies) > 10 * 1024
            body = b'{"content": "hi"}'
            browser = (
                'sec-ch-ua-platform: "Linux"\r\n'
                'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"\r\n'
                "sec-ch-ua-mobile: ?0\r\n"
                "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like"
                " Gecko) Chrome/131.0.0.0 Safari/537.36\r\n"
                "Content-Type: application/json\r\n"
                "Accept: */*\r\n"
                f"Origin: {origin}\r\n"
                "Sec-Fetch-Site: same-origin\r\n"
                "Sec-Fetch-Mode: cors\r\n"
                "Sec-Fetch-Dest: empty\r\n"
                f"Referer: {origin}/\r\n"
                "Accept-Encoding: gzip, deflate, br, zstd\r\n"
                "Accept-Language: en-US,en;q=0.9\r\n"
                "Priority: u=1, i\r\n"
                f"Cookie: {cookies}\r\n"
                f"Content-Length: {len(body)}\r\n"
            )
            head = _head(door, method="POST", target="/tokenize", extra=browser)
            answer = await _answered_by_the_runtime(door, head + body)
            assert b'"tokens"' in answer
            # A header line the runtime would get is still held to its limit.
            await _refused_before_the_runtime(
                door, _head(door, extra=f"x-pad: {'a' * 9000}\r\n"), 431
            )

    run(scenario)


@pytest.mark.security
def test_a_content_coding_list_of_identity_or_of_nothing_is_no_coding(llama_url: str) -> None:
    # An empty list element is no coding (RFC 9110 section 5.6.1): an empty Content-Encoding,
    # or one that lists only identity, says the body is as sent, and llama-server answers it.
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            body = b'{"content": "hi"}'
            for value in ("", " ", "identity,", "IDENTITY, identity", ", Identity"):
                extra = f"content-encoding: {value}\r\ncontent-length: {len(body)}\r\n"
                head = _head(door, method="POST", target="/tokenize", extra=extra)
                answer = await _answered_by_the_runtime(door, head + body)
                assert b'"tokens"' in answer, value
            for value in ("gzip", "identity, gzip", ", x-gzip"):
                extra = f"content-encoding: {value}\r\ncontent-length: {len(body)}\r\n"
                head = _head(door, method="POST", target="/tokenize", extra=extra)
                await _refused_before_the_runtime(door, head + body, 415)

    run(scenario)


@pytest.mark.security
def test_a_post_in_a_content_coding_is_refused_with_a_reason_also_when_empty(
    llama_url: str,
) -> None:
    # llama-server answers a POST in a content coding with its bare 415 whatever the body's
    # length: an empty one (Content-Length: 0, or a chunked body of no chunk, whole in the
    # first read) was relayed and came back without a reason, where the same chunked body
    # in two reads was refused by the front door. A GET without a body gets no Content-Length
    # from the front door and is the runtime's to answer.
    async def scenario() -> None:
        async with running_front_door(llama_url) as door:
            for extra, body in (
                ("content-length: 0\r\n", b""),
                ("transfer-encoding: chunked\r\n", b"0\r\n\r\n"),
                ("", b""),
            ):
                head = _head(
                    door,
                    method="POST",
                    target="/tokenize",
                    extra="content-encoding: gzip\r\n" + extra,
                )
                answer = await _refused_before_the_runtime(door, head + body, 415)
                assert b"\r\naccept-encoding: identity\r\n" in answer
            head = _head(door, extra="content-encoding: gzip\r\ncontent-length: 0\r\n")
            await _answered_by_the_runtime(door, head)

    run(scenario)


def test_config_refuses_head_limits_too_small_for_a_request() -> None:
    for name, value in (
        ("max_request_line_bytes", 63),
        ("max_header_line_bytes", 0),
        ("max_header_fields", 3),
        ("max_header_fields", 1.5),
        ("max_header_fields", True),
    ):
        with pytest.raises(ValueError, match=name):
            FrontDoorConfig(token="t" * 32, **{name: value})  # type: ignore[arg-type]


def test_configured_head_limits_hold_for_a_head_whole_pipelined_or_in_pieces() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url,
                max_request_line_bytes=100,
                max_header_line_bytes=200,
                max_header_fields=10,
            ) as door:
                # "GET " + target + " HTTP/1.1" + CRLF: 100 bytes at most.
                target = "/echo?" + "a" * (100 - len("GET /echo? HTTP/1.1\r\n"))
                await _answered_by_the_runtime(door, _head(door, target=target))
                await _refused_before_the_runtime(door, _head(door, target=target + "a"), 414)
                # A longer method leaves less room for the target.
                await _refused_before_the_runtime(
                    door, _head(door, method="DELETE", target=target), 414
                )
                value = "v" * (200 - len("x-pad: \r\n"))
                await _answered_by_the_runtime(
                    door, _head(door, target="/echo", extra=f"x-pad: {value}\r\n")
                )
                await _refused_before_the_runtime(
                    door, _head(door, target="/echo", extra=f"x-pad: {value}v\r\n"), 431
                )
                # Relayed without the client's Host and Authorization, with the front door's
                # Host (and no runtime key here): 10 fields, then 11.
                await _answered_by_the_runtime(door, _head(door, target="/echo", extra=_fields(9)))
                await _refused_before_the_runtime(
                    door, _head(door, target="/echo", extra=_fields(10)), 431
                )
                # Behind a request within the limits, in the same write: that one is
                # answered, then the refusal, and the connection ends.
                answer = await _exchange(
                    door,
                    _head(door, target="/echo") + _head(door, target="/echo", extra=_fields(10)),
                    responses=2,
                )
                first, _, second = answer.partition(b"\r\n\r\n")
                assert first.startswith(b"HTTP/1.1 200 ")
                assert b"HTTP/1.1 431 " in second
                assert second.endswith(b'{"ok":false,"reason":"bad_request"}')
                # A target sent in pieces is refused once it passes the limit, before its
                # head ends.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(b"GET /echo?")
                for _ in range(10):
                    writer.write(b"a" * 20)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                answer = await asyncio.wait_for(reader.read(65536), 5)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 414 ")
                assert answer.endswith(b'{"ok":false,"reason":"bad_request"}')
                refused = door.door.statistics().refused_by_reason
                assert refused["bad_request"] == 6
                assert upstream.requests_seen == 4

    run(scenario)


@pytest.mark.security
def test_a_head_holds_at_most_twice_the_relayed_fields_however_small_they_are() -> None:
    # A head of fields of a few bytes each ("0:", "1:", ...) just under 16 KiB, never ended,
    # needs no token: the front door had held each field as a tuple of two bytes objects,
    # 329 KiB a connection (40 KiB for a 16 KiB head of ordinary fields), so 330 MiB at the
    # 1,024 connections serve allows, and spent 2.3 ms of CPU taking each such head in.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                # 200 fields: 98 of the client's own the runtime is sent (with the front door's
                # Host, 99: the stand-in runtime takes no more), its Host and Authorization and
                # 100 Cookie lines, which are not.
                fields = _fields(98) + "".join(f"cookie: c{index}=v\r\n" for index in range(100))
                answer = await _answered_by_the_runtime(
                    door, _head(door, target="/echo", extra=fields)
                )
                assert b'"x-field-97"' in answer
                await _refused_before_the_runtime(
                    door, _head(door, target="/echo", extra=fields + "cookie: one=more\r\n"), 431
                )
                # Without a token, and refused before the head ends, whether it comes in one
                # write or in pieces.
                tiny = b"".join(b"%x:\r\n" % index for index in range(2700))
                assert len(tiny) < 16 * 1024 - 64
                for pieces in (1, 30):
                    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                    payload = b"GET /echo HTTP/1.1\r\n" + tiny
                    step = -(-len(payload) // pieces)
                    for at in range(0, len(payload), step):
                        writer.write(payload[at : at + step])
                        await writer.drain()
                    answer = await asyncio.wait_for(reader.read(65536), 5)
                    writer.close()
                    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
                    assert answer.endswith(b'{"ok":false,"reason":"bad_request"}')
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                assert upstream.requests_seen == 1

    run(scenario)


# --- admission ----------------------------------------------------------------------------


@pytest.mark.stress
def test_burst_is_bounded_and_every_request_is_answered_or_refused_with_a_reason() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=2, queue_bound=4) as door:
                limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
                async with httpx.AsyncClient(
                    base_url=door.url, headers=door.auth, limits=limits, timeout=30
                ) as client:
                    responses = await asyncio.gather(
                        *(client.get("/slow?ms=300") for _ in range(30))
                    )
                statuses = Counter(response.status_code for response in responses)
                assert set(statuses) <= {200, 503}
                refused = [response for response in responses if response.status_code == 503]
                assert Counter(reason_of(response) for response in refused) == {
                    "queue_full": len(refused)
                }
                assert all(response.headers["retry-after"] == "1" for response in refused)
                # All 30 arrive within a few ms, while the first two take 300 ms: 2 run,
                # 4 wait, and the rest are refused.
                assert statuses[200] == 6
                assert statuses[503] == 24
                stats = door.controller.statistics()
                assert stats.peak_in_flight == 2
                assert door.door.statistics().peak_proxied_in_flight == 2
                assert stats.admitted_total == stats.completed_total == 6
                assert door.door.statistics().refused_by_reason == {"queue_full": 24}
            assert upstream.peak_active == 2
            assert upstream.requests_seen == 6

    run(scenario)


_OUTCOMES = (
    "proxied_total",
    "refused_total",
    "client_disconnects",
    "upstream_aborts",
    "client_stalls",
    "pipelined_unanswered",
)


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_requests_pipelined_behind_one_that_ends_the_connection_are_counted(loop: str) -> None:
    # requests_total counts requests whose head was parsed; those parsed behind one refused
    # with a close (a 401 in a pipelined burst) were never answered and counted nowhere, so
    # the counters did not add up. They count now, as unanswered, and every parsed request
    # has exactly one outcome; once the burst is over nothing is left in flight or queued.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=2, queue_bound=2) as door:
                port = door.door.port
                host = f"Host: 127.0.0.1:{port}\r\n"
                auth = f"Authorization: Bearer {door.token}\r\n"
                slow = f"GET /slow?ms=200 HTTP/1.1\r\n{host}{auth}\r\n"
                burst = (
                    slow
                    + f"GET /echo HTTP/1.1\r\n{host}Authorization: Bearer no\r\n\r\n"
                    + slow * 2
                ).encode()

                async def client() -> bytes:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        writer.write(burst)  # one write
                        return await asyncio.wait_for(reader.read(), 10)  # to EOF
                    finally:
                        writer.close()

                answers = await asyncio.gather(*(client() for _ in range(20)))
                for answer in answers:
                    assert answer.count(b"HTTP/1.1 ") == 2
                    assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503"))
                    assert b"HTTP/1.1 401" in answer
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                document = door.door.status_document()
                assert document["in_flight"] == document["queued"] == 0
                statistics = document["front_door"]
                assert isinstance(statistics, dict)
                assert statistics["proxied_in_flight"] == 0
                assert statistics["requests_total"] == 80
                assert statistics["pipelined_unanswered"] == 40
                refused = statistics["refused_by_reason"]
                assert refused["unauthorized"] == 20
                assert statistics["proxied_total"] + refused.get("queue_full", 0) == 20
                assert sum(statistics[name] for name in _OUTCOMES) == 80
            assert upstream.requests_seen == statistics["proxied_total"]

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_request_parsed_after_its_client_left_never_reaches_the_runtime(loop: str) -> None:
    # The client pipelines two requests and leaves (a half-close) before the first is
    # answered. Its leaving is seen while the serving task yields between the two, when
    # no request of it waits or runs: the second was then taken up all the same, run on the
    # runtime for nobody, and counted nowhere, so the counters did not add up.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                host = f"host: 127.0.0.1:{port}\r\n"
                auth = f"authorization: Bearer {door.token}\r\n"
                burst = (
                    f"GET /_status HTTP/1.1\r\n{host}{auth}\r\n"
                    f"POST /slow?ms=200 HTTP/1.1\r\n{host}{auth}content-length: 0\r\n\r\n"
                ).encode()
                with socket.create_connection(("127.0.0.1", port)) as leaving:
                    # Both requests and the end of the client's side are in before the
                    # front door reads any of it (this task does not yield meanwhile).
                    leaving.sendall(burst)
                    leaving.shutdown(socket.SHUT_WR)
                    await wait_for(lambda: door.door.statistics().open_connections == 0)
                    await asyncio.sleep(0.4)  # the time the runtime would take with it
                document = door.door.status_document()
                assert document["in_flight"] == document["queued"] == 0
                statistics = document["front_door"]
                assert isinstance(statistics, dict)
                assert statistics["requests_total"] == 2
                assert statistics["status_answered"] == 1
                assert statistics["proxied_total"] == 0
                assert statistics["client_disconnects"] == 1
                assert sum(statistics[name] for name in _OUTCOMES) == 1  # and the status answer
            assert upstream.requests_seen == 0

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


def test_queue_deadline_and_not_ready_are_503_with_retry_after() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url, max_in_flight=1, queue_bound=4, queue_timeout_s=0.2
            ) as door:
                async with httpx.AsyncClient(
                    base_url=door.url, headers=door.auth, timeout=10
                ) as client:
                    slow, late = await asyncio.gather(
                        client.get("/slow?ms=800"), client.get("/slow?ms=1")
                    )
                    assert slow.status_code == 200
                    assert late.status_code == 503
                    assert reason_of(late) == "queue_timeout"
                    door.controller.set_lifecycle(Lifecycle(LifecycleState.DRAINING))
                    response = await client.get("/echo")
                    assert response.status_code == 503
                    assert reason_of(response) == "not_ready"
                    assert int(response.headers["retry-after"]) >= 1

    run(scenario)


# --- upstream failures --------------------------------------------------------------------


def test_upstream_failures_are_502_with_a_reason_and_release_the_slot() -> None:
    async def scenario() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        async with running_front_door(dead_url) as door:
            async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                response = await client.get("/echo")
                assert response.status_code == 502
                assert reason_of(response) == "upstream_error"
        async with running_front_door(None) as door:
            async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                response = await client.get("/echo")
                assert response.status_code == 502
                assert reason_of(response) == "runtime_gone"
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    response = await client.get("/drop")
                    assert response.status_code == 502
                    assert reason_of(response) == "runtime_gone"
                    # Dies after the head: the client must see a broken response, not a
                    # short one that looks complete.
                    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                        await client.get("/die")
                    assert door.door.statistics().upstream_aborts == 1
                    assert door.controller.statistics().in_flight == 0
                    assert (await client.get("/echo")).status_code == 200
                    # A head the front door will not hold: refused like any broken answer.
                    response = await client.get("/huge-head")
                    assert response.status_code == 502
                    assert reason_of(response) == "upstream_error"
                # An HTTP/1.0 client reads a relayed stream to the end of the connection, so
                # a runtime dying mid-stream must reach it as a reset, not an orderly end.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                writer.write(
                    f"GET /stream-die HTTP/1.0\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n".encode()
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert door.door.statistics().upstream_aborts == 2

    run(scenario)


def test_a_runtime_reset_cutting_a_body_ended_by_close_reaches_the_client_as_a_reset() -> None:
    # A body without length or chunking ends with the runtime's orderly close; a reset cuts it
    # short, and must not be relayed as the end of a complete response (chunked to an HTTP/1.1
    # client, an orderly close to an HTTP/1.0 one).
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                for version in ("1.1", "1.0"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                    writer.write(
                        f"GET /reset-unframed HTTP/{version}\r\n"
                        f"Host: 127.0.0.1:{door.door.port}\r\n"
                        f"Authorization: Bearer {door.token}\r\n\r\n".encode()
                    )
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.startswith(b"HTTP/1.1 200"), version
                    with pytest.raises(ConnectionResetError):
                        await asyncio.wait_for(reader.read(), 5)
                    writer.close()
                statistics = door.door.statistics()
                assert statistics.upstream_aborts == 2
                assert statistics.proxied_total == 0
                assert door.controller.statistics().in_flight == 0

    run(scenario)


async def _open_raw(
    door: ReadyDoor, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
        f"Authorization: Bearer {door.token}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


def test_a_head_that_does_not_parse_counts_as_a_request_and_a_refusal() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                for garbage in (
                    b"\x00\x01 not http\r\n\r\n",
                    b"GET / HTTP/1.1\r\n" + b"x" * 20_000,
                ):
                    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                    writer.write(garbage)
                    answer = await asyncio.wait_for(reader.read(), 5)
                    assert answer.split(b" ", 2)[1] in (b"400", b"431")
                    writer.close()
                statistics = door.door.statistics().to_dict()
                assert statistics["requests_total"] == statistics["refused_total"] == 2

    run(scenario)


def test_a_client_that_stops_reading_is_not_taken_for_a_failed_runtime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The runtime keeps sending; the front door pauses it for a client that stopped reading.
    # Past the silence limit that is the client's stall: reset, counted as one, no warning.
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, upstream_read_timeout_s=0.5) as door:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_connect(sock, ("127.0.0.1", door.door.port))
                await loop.sock_sendall(
                    sock,
                    f"GET /big?mib=64 HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n".encode(),
                )
                await loop.sock_recv(sock, 1 << 20)
                await asyncio.sleep(2.0)  # not reading
                await wait_for(lambda: door.door.statistics().client_stalls == 1)
                sock.close()
                assert door.door.statistics().upstream_aborts == 0

    run(scenario)
    assert "runtime failed" not in caplog.text


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_client_that_stops_reading_its_answers_keeps_its_connection_no_longer_than_a_stall(
    loop: str,
) -> None:
    # Answers a client does not read wait in the front door's buffer. Waiting for them to go
    # out without a bound held the connection for ever, never idle, so never closed nor
    # evicted: at max_connections, a hung client locked every other one out.
    async def scenario() -> None:
        async with running_front_door(None, upstream_read_timeout_s=0.5) as door:
            port = door.door.port
            request = (
                f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {door.token}\r\n\r\n"
            ).encode() * 32
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            with sock:
                # Pipelined until the front door reads no more: megabytes of answers, more
                # than the kernel's buffers take, wait for the client to read them.
                blocked_since = time.monotonic()
                reset = False
                while time.monotonic() - blocked_since < 0.3 and not reset:
                    try:
                        sock.send(request)
                        blocked_since = time.monotonic()
                    except BlockingIOError:
                        pass
                    except ConnectionResetError:
                        reset = True
                    await asyncio.sleep(0.001)
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                sock.settimeout(5)
                try:
                    while sock.recv(1 << 20):
                        pass
                except ConnectionResetError:
                    reset = True
                assert reset  # never an orderly end: the answers were not all read

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


def test_a_runtime_connection_paused_for_a_slow_client_reads_again_once_pooled() -> None:
    # A client that does not read fills its buffers; the runtime connection is paused with it,
    # also by the read that ends a response. Pooled still paused, the next request on it
    # (another client's) would never be read: 504 after the silence limit, its slot held as long.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, upstream_read_timeout_s=5) as door:
                port = door.door.port
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                request = (
                    f"GET /sized?kib=48 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n"
                ).encode()
                # Pipelined and never read, until the front door stops answering.
                answered = -1
                while answered != door.door.statistics().proxied_total:
                    answered = door.door.statistics().proxied_total
                    for _ in range(20):
                        writer.write(request)
                    await asyncio.sleep(0.3)
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    started = time.monotonic()
                    response = await client.get("/echo", timeout=10)
                    assert response.status_code == 200
                    assert time.monotonic() - started < 2
                writer.transport.abort()
                assert door.door.statistics().upstream_aborts == 0

    run(scenario)


def test_bytes_past_the_runtimes_own_framing_never_reach_the_client() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    first = await client.get("/overlong")
                    assert (first.status_code, first.content) == (200, b"hello")
                    # The same client connection's next answer is the runtime's real one.
                    second = await client.get("/echo")
                    assert second.json()["target"] == "/echo"
                    head = await client.head("/overlong")
                    assert (head.status_code, head.content) == (200, b"")
                    third = await client.get("/echo")
                    assert third.json()["target"] == "/echo"

    run(scenario)


def test_a_runtime_transfer_coding_other_than_chunked_is_502_not_a_relayed_body() -> None:
    # "gzip, chunked" reached the client as the gzip bytes, unchunked and unmarked; a coding
    # without chunked last (a body ended by the close) was relayed, then reset and logged as
    # a failed runtime. The front door frames bodies itself and decodes no other coding.
    answers = {
        b"/gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"/identity": b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nhello",
        b"/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    }

    async def runtime(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[head.split(b" ", 2)[1]])
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(runtime, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, running_front_door(url) as door:
            async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                for path in ("/gzip", "/identity"):
                    response = await client.get(path)
                    assert response.status_code == 502, path
                    assert reason_of(response) == "upstream_error"
                response = await client.get("/chunked")
                assert (response.status_code, response.content) == (200, b"hello")
            statistics = door.door.statistics()
            assert statistics.upstream_aborts == 0
            assert statistics.refused_by_reason == {"upstream_error": 2}

    run(scenario)


def test_a_runtime_s_chunked_followed_by_a_tab_is_framed_as_llhttp_frames_it() -> None:
    # llhttp reads "chunked" followed by a tab as another coding and hands the body over to
    # the connection's end, chunk sizes and all; the trimmed header value read as chunked, so
    # the client got the runtime's framing as the body ("5\r\nhello\r\n0\r\n\r\n").
    # Followed by a space, or after a tab, llhttp reads it as chunked, and so it is relayed.
    answers = {
        b"/tab": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"/tab-space": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\t \r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"/space": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"/leading-tab": b"HTTP/1.1 200 OK\r\ntransfer-encoding:\tchunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    }

    async def runtime(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[head.split(b" ", 2)[1]])
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(runtime, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, running_front_door(url) as door:
            async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                for path in ("/tab", "/tab-space"):
                    response = await client.get(path)
                    assert response.status_code == 502, (path, response.content)
                    assert reason_of(response) == "upstream_error"
                for path in ("/space", "/leading-tab"):
                    response = await client.get(path)
                    assert (response.status_code, response.content) == (200, b"hello"), path
            statistics = door.door.statistics()
            assert statistics.upstream_aborts == 0
            assert statistics.refused_by_reason == {"upstream_error": 2}

    run(scenario)


def test_a_client_leaving_the_queue_gives_up_its_place() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=1) as door:
                reader, writer = await _open_raw(door, "/stream?n=20&gap_ms=50")
                first = await asyncio.wait_for(reader.readuntil(b"token-0"), 5)
                assert first.startswith(b"HTTP/1.1 200")
                assert door.controller.statistics().in_flight == 1
                # While the stream holds the only slot, a second client queues, then leaves:
                # nothing of it ever reached the runtime.
                _queued_reader, queued_writer = await _open_raw(door, "/echo")
                await wait_for(lambda: door.controller.statistics().queued == 1)
                queued_writer.close()
                await wait_for(lambda: door.controller.statistics().queued == 0)
                assert door.door.statistics().client_disconnects == 1
                assert door.controller.statistics().in_flight == 1
                assert upstream.requests_seen == 1
                await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
                writer.close()
                await wait_for(lambda: door.controller.statistics().in_flight == 0)

    run(scenario)


def test_a_client_leaving_mid_stream_holds_its_slot_until_the_runtime_stops() -> None:
    # The runtime connection is half-closed; a runtime that, like llama.cpp's server, stops a
    # generation whose client is gone then ends it, and only then is the slot free again.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=1) as door:
                reader, writer = await _open_raw(door, "/stream?n=100&gap_ms=50&stop_on_eof=1")
                await asyncio.wait_for(reader.readuntil(b"token-0"), 5)
                left = time.monotonic()
                writer.close()
                await wait_for(lambda: upstream.cancelled == 1)
                await wait_for(lambda: door.controller.statistics().in_flight == 0)
                # Stopped by the half-close, long before the stream's 5 s.
                assert time.monotonic() - left < 2
                assert door.door.statistics().client_disconnects == 1
                assert door.door.statistics().proxied_in_flight == 0
                await wait_for(lambda: upstream.active == 0)
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    assert (await client.get("/echo")).status_code == 200

    run(scenario)


def test_clients_leaving_mid_request_never_put_more_than_max_in_flight_on_the_runtime() -> None:
    # /slow, like a non-streamed llama.cpp completion under load, runs to its end whether or
    # not its client is still there. A slot released at the disconnect would let the next
    # requests in on top of it.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=2, queue_bound=16) as door:

                async def leave_early() -> None:
                    _reader, writer = await _open_raw(door, "/slow?ms=400")
                    await asyncio.sleep(0.05)
                    writer.close()

                async with httpx.AsyncClient(
                    base_url=door.url, headers=door.auth, timeout=30
                ) as client:
                    # Three waves of two, each gone before the runtime is done with the last.
                    for _wave in range(3):
                        await asyncio.gather(leave_early(), leave_early())
                    answers = await asyncio.gather(*(client.get("/slow?ms=50") for _ in range(4)))
                assert [answer.status_code for answer in answers] == [200] * 4
                await wait_for(lambda: door.controller.statistics().in_flight == 0)
                assert upstream.peak_active <= 2
                # Each request counted once: a response its client left is not a relayed one.
                statistics = door.door.statistics()
                assert statistics.client_disconnects == 6
                assert statistics.proxied_total == 4
                assert statistics.requests_total == 10

    run(scenario)


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_clients_leaving_mid_stream_log_no_error(
    caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    # A response arriving for a client that just left is dropped, never written to its closed
    # connection (uvloop raises there, and the loop logs a "Fatal error on transport").
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=4, queue_bound=64) as door:

                async def leave() -> None:
                    reader, writer = await _open_raw(door, "/stream?n=2000&gap_ms=0&stop_on_eof=1")
                    await asyncio.wait_for(reader.readuntil(b"token-0"), 10)
                    # Gone at once (a reset), while the runtime's events keep coming.
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()

                await asyncio.gather(*(leave() for _ in range(40)))
                await wait_for(lambda: door.controller.statistics().in_flight == 0, 20)
                assert door.door.statistics().client_disconnects == 40

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_client_leaving_after_the_runtime_reset_its_paused_connection_leaves_no_error(
    loop: str,
) -> None:
    # The client stopped reading, so reading from the runtime paused, and the runtime reset
    # that connection meanwhile (unseen: nothing reads it). When the client then left, the
    # runtime connection was half-closed to stop the generation, and on asyncio's own loop
    # the shutdown raised ENOTCONN out of the client's connection_lost: a traceback.
    errors: list[object] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: errors.append(context.get("exception"))
        )
        reset = asyncio.Event()

        async def runtime(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            body = bytes(8 << 20)  # far more than the client's connection holds unread
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(body), body)
            )
            await asyncio.sleep(0.5)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            reset.set()

        server = await asyncio.start_server(runtime, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, running_front_door(url) as door:
            port = door.door.port
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(
                    f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n".encode()
                )
                await asyncio.wait_for(reset.wait(), 10)
                await asyncio.sleep(0.2)
            await wait_for(lambda: door.door.statistics().open_connections == 0)
            await wait_for(lambda: door.controller.statistics().in_flight == 0)
            assert door.door.statistics().client_disconnects == 1

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())
    gc.collect()
    assert errors == []


def _pipelined_status(door: ReadyDoor, count: int) -> bytes:
    one = (
        f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
        f"Authorization: Bearer {door.token}\r\n\r\n"
    ).encode()
    return one * count


def test_a_client_pipelining_without_reading_cannot_queue_without_bound() -> None:
    # Reading pauses until every queued request is answered; resuming after each answer
    # let a client add the bound's worth of requests per answer (tens of thousands queued).
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                flood = _pipelined_status(door, 40_000)

                def send() -> None:
                    with socket.create_connection(("127.0.0.1", door.door.port)) as sock:
                        sock.settimeout(3)
                        with contextlib.suppress(OSError):
                            sock.sendall(flood)  # stops when the front door stops reading
                        time.sleep(0.5)

                await asyncio.to_thread(send)
                assert door.door.statistics().peak_pipelined <= 32

    run_on_serves_loop(scenario())


@pytest.mark.security
def test_requests_pipelined_in_one_write_hold_at_most_two_heads_worth_of_fields() -> None:
    # Every head in a read is parsed before the serving task looks at the first, with or
    # without a token: 32 heads of 200 small fields each (within every bound of one head) had
    # all been held, 700 KiB a connection, and 1,000 connections without a token that sent
    # 47 KB each had grown the front door by 700 MiB before the first refusal went out.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                # 200 fields: the client's Host and Authorization, 98 it relays (99 with the
                # front door's Host: the stand-in runtime takes no more) and 100 Cookie lines.
                fields = "".join(f"{index:x}: v\r\n" for index in range(98)) + "cookie:\r\n" * 100
                unauthorized = (
                    f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
                    f"Authorization: Bearer {'x' * 43}\r\n{fields}\r\n"
                ).encode()
                answer = await _exchange(door, unauthorized * 32)
                assert answer.startswith(b"HTTP/1.1 401 ")
                statistics = door.door.statistics()
                assert statistics.peak_pipelined == 2
                assert statistics.pipelined_unanswered == 1
                # With the token, the two parsed are answered, the second saying that the
                # connection closes; the third is left for the client to send again.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                try:
                    writer.write(_head(door, target="/echo", extra=fields) * 3)
                    await writer.drain()
                    first, _ = await _read_response(reader)
                    second, _ = await _read_response(reader)
                    assert first.startswith(b"HTTP/1.1 200 ")
                    assert b"connection: close" not in first
                    assert second.startswith(b"HTTP/1.1 200 ")
                    assert b"connection: close" in second
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                finally:
                    writer.close()
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                assert upstream.requests_seen == 2

    run(scenario)


def test_requests_pipelined_past_the_bound_in_one_write_are_not_queued() -> None:
    # Reading pauses at the bound only after a read: one read held thousands of small
    # requests, every one parsed and queued (7,103 from one 180 KB write). Past 32 waiting
    # the rest is dropped; the last one answered says the connection closes, and it ends in
    # order, so the client can send the others again.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
                try:
                    writer.write(_pipelined_status(door, 40))  # one write
                    await writer.drain()
                    heads = []
                    while not heads or b"connection: close" not in heads[-1]:
                        head, body = await _read_response(reader)
                        assert head.startswith(b"HTTP/1.1 200")
                        assert json.loads(body)["state"] == "ready"
                        heads.append(head)
                    assert len(heads) == 32
                    assert await asyncio.wait_for(reader.read(), 5) == b""  # an orderly end
                finally:
                    writer.close()
                assert door.door.statistics().peak_pipelined <= 32
                await wait_for(lambda: door.door.statistics().open_connections == 0)

    run(scenario)


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_bytes_sent_past_the_bound_are_not_read_while_the_answers_wait_to_be_read(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the bound the rest of the connection is dropped. Reading resumed once the last
    # answer was written, and while the answers waited for the client to read them (up to
    # upstream_read_timeout_s for one that reads slowly) the front door read whatever else
    # it sent and dropped it, at full speed and without end: hundreds of megabytes a second
    # through one connection. Reading stays paused now until the connection lingers (a
    # second at most), which is when what is left is read and dropped.
    reading_when_flushed: list[bool] = []
    flushed = FrontDoor._flushed

    async def spy(self: FrontDoor, client: Any) -> None:
        reading_when_flushed.append(client.transport.is_reading())
        await flushed(self, client)

    monkeypatch.setattr(FrontDoor, "_flushed", spy)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                one = (
                    f"GET /_status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {door.token}\r\n\r\n"
                ).encode()
                burst = one * 31 + one.replace(b"/_status", b"/echo") + one * 8

                def client() -> bytes:
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        sock.settimeout(5)
                        sock.sendall(burst)
                        answers = b""
                        with contextlib.suppress(OSError):
                            while data := sock.recv(1 << 20):
                                answers += data
                        return answers

                answers = await asyncio.to_thread(client)
                assert answers.count(b"HTTP/1.1 200") == 32
                assert answers.count(b"connection: close") == 1
                assert upstream.requests_seen == 1
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                await wait_for(lambda: not door.door._lingering)

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())
    assert reading_when_flushed == [False]


# A request that ends its connection, and what the client sends behind it.
_CLOSING = {
    "connection-close": "GET /slow?ms=1000 HTTP/1.1\r\nHost: {host}\r\n{auth}"
    "Connection: close\r\n\r\n",
    "upgrade": "GET /slow?ms=1000 HTTP/1.1\r\nHost: {host}\r\n{auth}"
    "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "http-1.0": "GET /slow?ms=1000 HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n",
    "parse-error": "GET /slow?ms=1000 HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n\x00 not http\r\n\r\n",
    "refusal": "GET /echo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer wrong\r\n\r\n",
}


@pytest.mark.parametrize("case", list(_CLOSING))
@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_bytes_sent_behind_a_request_that_ends_the_connection_are_not_read_while_it_is_answered(
    loop: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behind a request that ends the connection (connection: close, an upgrade, HTTP/1.0, a
    # head that does not parse, a refusal) nothing more is parsed. Whatever else the client
    # sent was read and dropped at full speed, for as long as the answers owed took to go out
    # (a slow runtime here; up to upstream_read_timeout_s for a client that reads slowly): a
    # hundred megabytes and more a second through one connection, on the loop every request
    # shares. Reading stops once the connection is known to end (at most one more read), and
    # resumes only when it lingers; the client still gets every answer, and an orderly end.
    read: list[int] = [0]
    data_received = _Client.data_received

    def counting(self: _Client, data: bytes) -> None:
        read[0] += len(data)
        data_received(self, data)

    monkeypatch.setattr(_Client, "data_received", counting)
    if case == "refusal":
        # The refusal goes out at once: its answer waits as one would for a slow reader.
        flushed = FrontDoor._flushed

        async def slow_reader(self: FrontDoor, client: Any) -> None:
            await asyncio.sleep(1.0)
            await flushed(self, client)

        monkeypatch.setattr(FrontDoor, "_flushed", slow_reader)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port
                request = _CLOSING[case].format(
                    host=f"127.0.0.1:{port}", auth=f"Authorization: Bearer {door.token}\r\n"
                )

                def client() -> tuple[int, bytes]:
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        sock.sendall(request.encode())
                        time.sleep(0.1)
                        sock.settimeout(0.1)
                        block = bytes(64 * 1024)
                        end = time.monotonic() + 0.6
                        with contextlib.suppress(TimeoutError):
                            while time.monotonic() < end:
                                sock.send(block)  # blocks once the front door stops reading
                        read_meanwhile = read[0]
                        sock.settimeout(5)
                        answers = b""
                        while data := sock.recv(1 << 20):  # a reset raises
                            answers += data
                        return read_meanwhile, answers

                read_meanwhile, answers = await asyncio.to_thread(client)
                assert read_meanwhile < 1024 * 1024
                if case == "parse-error":
                    assert answers.startswith(b"HTTP/1.1 200")
                    assert answers.count(b"HTTP/1.1 400") == 1
                elif case == "refusal":
                    assert answers.startswith(b"HTTP/1.1 401")
                else:
                    assert answers.startswith(b"HTTP/1.1 200")
                    assert answers.count(b"HTTP/1.1 ") == 1
                assert b"connection: close" in answers
                assert answers.endswith(b"}")
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                await wait_for(lambda: not door.door._lingering)

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


@pytest.mark.parametrize("stage", ["waiting for a slot", "relayed"])
@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_client_that_leaves_while_reading_is_stopped_behind_its_request_is_seen_leaving(
    loop: str, stage: str
) -> None:
    # Behind a request that ends the connection, reading stops, and the end of the client's
    # side then waits unread behind what it sent: a client that left was not seen leaving.
    # Its request kept its place in the queue and was then run by the runtime to its end,
    # for nobody, holding a slot all the while; one already relayed was not stopped either.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=1) as door:
                port = door.door.port
                busy: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
                if stage == "waiting for a slot":
                    busy = await _open_raw(door, "/slow?ms=2500")
                    await wait_for(lambda: door.controller.statistics().in_flight == 1)
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"GET /slow?ms=2500 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {door.token}\r\nConnection: close\r\n\r\n".encode()
                )
                if stage == "waiting for a slot":
                    await wait_for(lambda: door.controller.statistics().queued == 1)
                else:
                    await wait_for(lambda: upstream.active == 1)
                # Bytes behind it, in separate reads: the first is dropped, then reading stops.
                for _ in range(3):
                    writer.write(b"GET /echo HTTP/1.1\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.1)
                writer.close()
                left = time.monotonic()
                await wait_for(lambda: door.door.statistics().client_disconnects == 1)
                assert time.monotonic() - left < 1.0
                if stage == "waiting for a slot":
                    assert door.controller.statistics().queued == 0
                    assert busy is not None
                    answer = await asyncio.wait_for(busy[0].readuntil(b"}"), 10)
                    assert answer.startswith(b"HTTP/1.1 200")
                    busy[1].close()
                await wait_for(lambda: door.controller.statistics().in_flight == 0)
                statistics = door.door.statistics()
                # Only the request that was still wanted reached the runtime's end as relayed.
                assert statistics.proxied_total == (1 if stage == "waiting for a slot" else 0)
                assert upstream.requests_seen == 1
                await wait_for(lambda: door.door.statistics().open_connections == 0)
                await wait_for(lambda: not door.door._lingering)

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_a_body_cut_short_by_a_client_half_closing_ends_in_a_reset(loop: str) -> None:
    # A client that half-closes counts as gone: the runtime is asked to stop, and what it still
    # sends is dropped. The client may still be reading, though, and a body that ends with the
    # connection (connection: close, HTTP/1.0) then ended with an orderly close: a stream cut
    # short looked complete. A reset says it is not.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                port = door.door.port

                def client() -> tuple[bytes, bool]:
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        sock.sendall(
                            f"GET /stream?n=100&gap_ms=50&stop_on_eof=1 HTTP/1.1\r\n"
                            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {door.token}\r\n"
                            "Connection: close\r\n\r\n".encode()
                        )
                        sock.settimeout(5)
                        received = b""
                        while b"token-2" not in received:
                            received += sock.recv(65536)
                        sock.shutdown(socket.SHUT_WR)
                        try:
                            while data := sock.recv(65536):
                                received += data
                        except ConnectionResetError:
                            return received, True
                        return received, False

                received, reset = await asyncio.to_thread(client)
                assert received.startswith(b"HTTP/1.1 200")
                assert b"transfer-encoding" not in received  # the body ends with the connection
                assert b"token-99" not in received
                assert reset
                await wait_for(lambda: upstream.cancelled == 1)
                await wait_for(lambda: door.controller.statistics().in_flight == 0)
                statistics = door.door.statistics()
                assert (statistics.client_disconnects, statistics.proxied_total) == (1, 0)

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


# --- the connection limit ------------------------------------------------------------------


async def _idle_connections(
    door: ReadyDoor, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections that send nothing (a peer without the token can open these)."""
    opened = [await asyncio.open_connection("127.0.0.1", door.door.port) for _ in range(count)]
    await wait_for(lambda: door.door.statistics().open_connections == count)
    return opened


async def _kept_authorized(door: ReadyDoor) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has had one authorized request answered and is kept open."""
    reader, writer = await _open_raw(door, "/echo")
    head, _ = await _read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


@pytest.mark.security
@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_idle_connections_cannot_shut_an_authorized_client_out(loop: str) -> None:
    # Without a limit, idle connections (no token needed to open one) held file descriptors
    # until none was left and accept failed for everyone, authorized clients too.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_connections=4) as door:
                idle = await _idle_connections(door, 4)
                # A head sent in pieces that never completes is idle as well.
                idle[1][1].write(b"GET /echo HTTP/1.1\r\n")
                await asyncio.sleep(0.15)
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    response = await client.get("/echo")
                    assert response.status_code == 200
                    # The longest idle connection made room, a tenth of a second old.
                    assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
                    statistics = door.door.statistics()
                    assert statistics.connections_evicted == 1
                    assert statistics.connections_refused == 0
                    assert statistics.max_connections == 4
                    assert statistics.open_connections == 4
                    # The client's kept connection is authorized: the next newcomer makes
                    # room with the next connection that never sent a token, not with it.
                    async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as second:
                        assert (await second.get("/echo")).status_code == 200
                    assert await asyncio.wait_for(idle[1][0].read(), 5) == b""
                    assert (await client.get("/echo")).status_code == 200
                    assert door.door.statistics().connections_evicted == 2
                for _, writer in idle:
                    writer.close()

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


_FLOOD = """
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
held, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
    except OSError:
        pass
    if len(held) > 3000:
        held.pop(0).close()
print(len(held))
"""


def _turned_away(door: ReadyDoor) -> int:
    statistics = door.door.statistics()
    return statistics.connections_evicted + statistics.connections_refused


@pytest.mark.security
def test_a_flood_of_new_connections_cannot_shut_an_authorized_client_out() -> None:
    # Making room only with connections idle for a second let a flood faster than
    # max_connections per second fill the door with young ones: newcomers, authorized
    # clients among them, were refused or reset (half of them at 2,000 connections a second).
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            # The default limit: a newcomer is only closed for room once that many newer
            # connections came in before its request did, which at this flood's rate (several
            # thousand a second from one process) takes a few hundred milliseconds.
            async with running_front_door(upstream.url) as door:
                assert door.door.statistics().max_connections == 1024
                flood = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _FLOOD, str(door.door.port), "5"
                )
                await wait_for(lambda: _turned_away(door) > 500)
                attempts = []
                for _ in range(20):
                    # A fresh connection each time, as a client with no kept connection has;
                    # a 503 at_capacity or a reset is retried, as a careful client does.
                    for attempt in range(1, 11):
                        try:
                            async with httpx.AsyncClient(
                                base_url=door.url, headers=door.auth
                            ) as client:
                                response = await client.get("/echo")
                        except httpx.TransportError:
                            response = None
                        if response is not None and response.status_code == 200:
                            break
                        assert response is None or reason_of(response) == "at_capacity"
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"refused 10 times in a row: {attempts}")
                    attempts.append(attempt)
                    await asyncio.sleep(0.05)
                await flood.wait()
                statistics = door.door.statistics()
                # Most get in at once; none needs more than a few tries.
                assert max(attempts) <= 5 and sum(attempts) <= 40, attempts
                assert statistics.connections_evicted > 500
                assert statistics.open_connections <= 1024

    run(scenario)


@pytest.mark.security
@pytest.mark.parametrize("loop", ["asyncio", "serve's"])
def test_over_the_limit_with_only_authorized_clients_a_newcomer_gets_503_at_capacity(
    loop: str,
) -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_connections=2) as door:
                kept = [await _kept_authorized(door) for _ in range(2)]
                # Its request is sent at once, before the refusal is read: the 503 must still
                # arrive whole (a plain close with the request unread would reset it).
                reader, writer = await _open_raw(door, "/echo")
                head, body = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 503 ")
                assert b"\r\nretry-after: 1\r\n" in head
                assert b"\r\nconnection: close\r\n" in head
                assert json.loads(body) == {"ok": False, "reason": "at_capacity"}
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
                statistics = door.door.statistics()
                assert statistics.connections_refused == 1
                assert statistics.connections_evicted == 0
                assert statistics.open_connections == 2
                # An authorized client's kept connection idle for a second makes room.
                await asyncio.sleep(1.1)
                late_reader, late_writer = await _open_raw(door, "/echo")
                late_head, _ = await _read_response(late_reader)
                assert late_head.startswith(b"HTTP/1.1 200")
                assert await asyncio.wait_for(kept[0][0].read(), 5) == b""
                assert door.door.statistics().connections_evicted == 1
                for _, kept_writer in (*kept, (late_reader, late_writer)):
                    kept_writer.close()
            assert upstream.requests_seen == 3

    if loop == "asyncio":
        run(scenario)
    else:
        run_on_serves_loop(scenario())


def test_a_flood_of_refused_connections_holds_no_more_than_the_limit_open() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_connections=3) as door:
                kept = [await _kept_authorized(door) for _ in range(3)]
                flood = [
                    await asyncio.open_connection("127.0.0.1", door.door.port) for _ in range(150)
                ]
                answers = []
                for reader, writer in flood:
                    try:
                        answers.append(await asyncio.wait_for(reader.read(), 5))
                    except ConnectionResetError:
                        answers.append(b"reset")
                    writer.close()
                # At most 64 linger at once; the longest-lingering goes to make room.
                assert sum(answer.endswith(b'"reason":"at_capacity"}') for answer in answers) >= 64
                assert all(
                    answer in (b"", b"reset") or answer.startswith(b"HTTP/1.1 503 ")
                    for answer in answers
                )
                statistics = door.door.statistics()
                assert statistics.connections_refused == 150
                assert statistics.open_connections == 3
                await wait_for(lambda: not door.door._lingering)
                for _, writer in kept:
                    writer.close()

    run(scenario)


def test_a_connection_with_a_request_in_progress_is_never_closed_to_make_room() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_connections=2) as door:
                # A stream of 30 events 50 ms apart: busy for 1.5 s, past the idle threshold.
                stream_reader, stream_writer = await _open_raw(door, "/stream?n=30&gap_ms=50")
                await asyncio.wait_for(stream_reader.readuntil(b"token-0"), 5)
                ((idle_reader, idle_writer),) = await _idle_connections_after(door, 1, total=2)
                await asyncio.sleep(1.1)
                # The newcomer takes the idle connection's place, never the stream's.
                reader, writer = await _open_raw(door, "/echo")
                head, _ = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 200")
                assert await asyncio.wait_for(idle_reader.read(), 5) == b""
                # The next one finds the stream busy and the newcomer an authorized client's
                # connection idle for too short a time.
                late_reader, late_writer = await asyncio.open_connection(
                    "127.0.0.1", door.door.port
                )
                late_head, _ = await _read_response(late_reader)
                assert late_head.startswith(b"HTTP/1.1 503 ")
                rest = await asyncio.wait_for(stream_reader.readuntil(b"\r\n0\r\n\r\n"), 10)
                assert b"token-29" in rest
                statistics = door.door.statistics()
                assert statistics.connections_evicted == 1
                assert statistics.connections_refused == 1
                assert statistics.client_disconnects == 0
                for each in (stream_writer, idle_writer, writer, late_writer):
                    each.close()

    run(scenario)


async def _idle_connections_after(
    door: ReadyDoor, count: int, *, total: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    opened = [await asyncio.open_connection("127.0.0.1", door.door.port) for _ in range(count)]
    await wait_for(lambda: door.door.statistics().open_connections == total)
    return opened


def test_config_refuses_a_connection_limit_under_one() -> None:
    for value in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_connections"):
            FrontDoorConfig(token="t" * 32, max_connections=value)  # type: ignore[arg-type]


@pytest.mark.security
def test_nothing_logged_carries_the_token_or_the_target(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="companion_runtime")

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url, max_in_flight=1, queue_bound=1) as door:
                async with httpx.AsyncClient(
                    base_url=door.url, headers=door.auth, timeout=10
                ) as client:
                    await asyncio.gather(
                        *(client.get("/slow?ms=200&secret=hush-query") for _ in range(4))
                    )
                    await client.get("/echo", headers={"authorization": "Bearer guess-secret"})
                    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                        await client.get("/die?secret=hush-query")
                    caplog.set_level(logging.DEBUG)
                    assert door.token not in caplog.text

    run(scenario)
    assert caplog.records  # the refusals and the failure were logged ...
    for text in ("hush-query", "guess-secret", "/slow", "/die"):
        assert text not in caplog.text  # ... without request data


def test_aclose_lets_a_busy_request_finish_and_closes_idle_connections() -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            controller = ready_controller(max_in_flight=2, queue_bound=2)
            door = FrontDoor(
                config=FrontDoorConfig(token="t" * 32),
                controller=controller,
                runtime_url=lambda: upstream.url,
            )
            await door.start()
            headers = {"authorization": "Bearer " + "t" * 32}
            async with httpx.AsyncClient(base_url=door.url, headers=headers) as idle_client:
                assert (await idle_client.get("/echo")).status_code == 200
                async with httpx.AsyncClient(base_url=door.url, headers=headers) as client:
                    busy = asyncio.create_task(client.get("/slow?ms=400"))
                    await wait_for(lambda: controller.statistics().in_flight == 1)
                    started = time.monotonic()
                    await door.aclose(grace_s=5)
                    assert time.monotonic() - started < 3
                    finished = await busy
                    assert finished.status_code == 200
                    # Its connection ends with it, and the response says so.
                    assert finished.headers["connection"] == "close"
                    assert door.statistics().open_connections == 0
                    with pytest.raises(httpx.TransportError):
                        await client.get("/echo")

    run(scenario)


def test_status_counts_itself_shutdown_cancels_and_lingering_connections() -> None:
    # Every parsed request has one outcome in /_status, GET /_status and requests the
    # shutdown's grace period cut off included (neither was counted anywhere but
    # requests_total), and connections that linger after a refusal are shown: they no longer
    # count as open, yet hold a file descriptor for up to a second.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            controller = ready_controller(max_in_flight=2, queue_bound=2)
            door = FrontDoor(
                config=FrontDoorConfig(token="t" * 32),
                controller=controller,
                runtime_url=lambda: upstream.url,
            )
            await door.start()
            headers = {"authorization": "Bearer " + "t" * 32}

            def outcomes() -> int:
                statistics = door.statistics().to_dict()
                names = (*_OUTCOMES, "status_answered", "shutdown_cancels")
                return sum(int(statistics[name]) for name in names)  # type: ignore[call-overload]

            async with httpx.AsyncClient(base_url=door.url, headers=headers) as client:
                assert (await client.get("/_status")).status_code == 200
                document = (await client.get("/_status")).json()["front_door"]
                assert document["status_answered"] == document["requests_total"] == 2
                # Refused before its body came: the connection lingers, no longer open.
                reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
                writer.write(
                    f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.port}\r\n"
                    "Content-Length: 100000\r\n\r\n".encode()
                )
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 401")
                await wait_for(lambda: door.statistics().lingering_connections == 1)
                writer.close()
                await wait_for(lambda: door.statistics().lingering_connections == 0)
                busy = asyncio.create_task(client.get("/slow?ms=2000"))
                await wait_for(lambda: controller.statistics().in_flight == 1)
                await door.aclose(grace_s=0.2)
                with pytest.raises(httpx.TransportError):
                    await busy
            statistics = door.statistics()
            assert statistics.shutdown_cancels == 1
            assert statistics.requests_total == 4
            assert outcomes() == 4
            assert controller.statistics().in_flight == 0

    run(scenario)


def test_aclose_refuses_a_request_still_sending_its_body_at_once() -> None:
    # A client stalled halfway through its body (a paused or hung process) has nothing the
    # runtime works on: shutdown must not wait the whole grace period for it.
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            controller = ready_controller(max_in_flight=2, queue_bound=2)
            door = FrontDoor(
                config=FrontDoorConfig(token="t" * 32),
                controller=controller,
                runtime_url=lambda: upstream.url,
            )
            await door.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
            writer.write(
                f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{door.port}\r\n"
                f"Authorization: Bearer {'t' * 32}\r\nContent-Length: 100\r\n\r\n{{".encode()
            )
            await writer.drain()
            await wait_for(lambda: door.statistics().requests_total == 1)
            started = time.monotonic()
            await door.aclose(grace_s=10)
            assert time.monotonic() - started < 2
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503")
            assert answer.endswith(b'{"ok":false,"reason":"not_ready"}')
            assert door.statistics().refused_by_reason == {"not_ready": 1}
            assert upstream.requests_seen == 0

    run(scenario)
