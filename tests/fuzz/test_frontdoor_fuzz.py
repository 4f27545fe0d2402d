"""The front door on mutated and hostile HTTP: every connection gets answers or a close, never more.

A seeded batch mutates one valid, authorized request (byte flips, inserted and deleted bytes,
duplicated and garbled header lines, lying lengths, truncation) and sends each result over its
own real connection, in one to four pieces, to a front door over the tiny upstream. For every
connection:

* whatever comes back is a sequence of complete ``HTTP/1.1`` responses with a status the front
  door or the upstream gives, and every refusal body is one of the front door's reason bodies;
* the upstream never receives the client's token (the front door sends its own credential);
* nothing is logged as a front-door failure (an exception inside a connection).

Afterwards the front door still serves, and no slot, queue place or proxied request is left
counted. The batch is ``COMPANION_FUZZ_EXAMPLES`` / 100 connections (200 by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import httpx
import pytest

from companion_runtime.core import Reason
from tests.fuzz._budget import HYPOTHESIS_EXAMPLES, SEED
from tests.support.frontdoor import ReadyDoor, running_front_door, tiny_upstream

pytestmark = [pytest.mark.security, pytest.mark.integration]

_STATUSES = {200, 400, 401, 403, 404, 405, 408, 413, 431, 502, 503, 504}
_REFUSALS = {
    json.dumps({"ok": False, "reason": reason.value}).replace(" ", "") for reason in Reason
}
_PIECES = (
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b":",
    b",",
    b"Content-Length: 9999\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Host: evil.example\r\n",
    b"Origin: http://evil.example\r\n",
    b"Authorization: Bearer x\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n",
    b"0\r\n\r\n",
    b"GET /echo HTTP/1.1\r\n",
    b"\xff\xfe",
)


def _base(door: ReadyDoor) -> bytes:
    body = b'{"prompt": "hi"}'
    return (
        f"POST /echo?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{door.door.port}\r\n"
        f"Authorization: Bearer {door.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _mutate(source: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(source.randint(1, 4)):
        kind = source.randrange(6)
        at = source.randrange(len(buffer) + 1)
        if kind == 0 and buffer:
            buffer[min(at, len(buffer) - 1)] ^= 1 << source.randrange(8)
        elif kind == 1:
            buffer[at:at] = source.choice(_PIECES)
        elif kind == 2:
            buffer[at : at + source.randint(1, 16)] = b""
        elif kind == 3:
            lines = bytes(buffer).split(b"\r\n")
            if len(lines) > 2:
                line = source.randrange(1, len(lines) - 1)
                lines.insert(line, lines[line])
            buffer = bytearray(b"\r\n".join(lines))
        elif kind == 4:
            buffer[at:at] = bytes(source.randrange(256) for _ in range(source.randint(1, 8)))
        else:
            buffer = buffer[:at]
    return bytes(buffer)


def _responses_violation(answer: bytes) -> str | None:
    """None when ``answer`` is zero or more complete responses the front door may give."""
    rest = answer
    while rest:
        head, found, rest = rest.partition(b"\r\n\r\n")
        if not found:
            return f"an incomplete head: {head[:80]!r}"
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
            return f"not a status line: {lines[0][:80]!r}"
        status = int(parts[1])
        if status == 100:
            continue
        if status not in _STATUSES:
            return f"unexpected status {status}"
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines[1:])
        )
        if b"content-length" not in headers:
            return "a response without content-length"
        length = int(headers[b"content-length"])
        if len(rest) < length:
            return "a truncated body"
        body, rest = rest[:length], rest[length:]
        if status >= 400 and headers.get(b"x-upstream") != b"tiny":
            if body.decode("latin-1") not in _REFUSALS:
                return f"a refusal without a reason body: {body[:80]!r}"
    return None


async def _exchange(door: ReadyDoor, payload: bytes, source: random.Random) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", door.door.port)
    try:
        cuts = sorted(source.randrange(len(payload) + 1) for _ in range(source.randrange(4)))
        start = 0
        for cut in [*cuts, len(payload)]:
            writer.write(payload[start:cut])
            await writer.drain()
            start = cut
            await asyncio.sleep(0)
        # The front door closes a refused connection at once, an idle one after keep-alive and
        # one whose body does not arrive after the request timeout.
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""  # reset after a refusal, with bytes still in flight: an answer of nothing
    finally:
        writer.close()


def test_mutated_requests_get_whole_answers_or_a_close_and_never_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = random.Random(SEED)

    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(
                upstream.url,
                max_in_flight=4,
                queue_bound=64,
                keep_alive_s=0.3,
                request_timeout_s=0.5,
            ) as door:
                base = _base(door)
                inputs = [_mutate(source, base) for _ in range(HYPOTHESIS_EXAMPLES * 2)]
                seeds = [source.random() for _ in inputs]
                for start in range(0, len(inputs), 50):
                    batch = range(start, min(start + 50, len(inputs)))
                    answers = await asyncio.gather(
                        *(_exchange(door, inputs[i], random.Random(seeds[i])) for i in batch)
                    )
                    for index, answer in zip(batch, answers, strict=True):
                        violation = _responses_violation(answer)
                        assert violation is None, (
                            f"input {index} under seed {SEED}: {violation}: {inputs[index]!r}"
                        )
                        assert (
                            door.token.encode()
                            not in upstream.last_headers.get("authorization", "").encode()
                        )
                async with httpx.AsyncClient(base_url=door.url, headers=door.auth) as client:
                    assert (await client.post("/echo", content=b"still serving")).status_code == 200
                statistics = door.door.statistics()
                assert statistics.proxied_in_flight == 0
                admission = door.controller.statistics()
                assert admission.in_flight == 0 and admission.queued == 0
                # The batch reaches the runtime as well as every kind of refusal.
                assert statistics.proxied_total > 0
                assert {"bad_request", "unauthorized"} <= set(statistics.refused_by_reason)

    with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.frontdoor"):
        asyncio.run(scenario())
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
