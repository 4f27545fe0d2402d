"""Reading a real front door's status over loopback HTTP."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from pathlib import Path

import pytest

from companion_runtime import Reason
from companion_runtime.bind.session import (
    ServeState,
    new_token,
    prepare_state_dir,
    write_serve_state,
    write_token_file,
)
from companion_runtime.bind.status import fetch_status, read_status, status_table
from tests.support.frontdoor import running_front_door, tiny_upstream

pytestmark = pytest.mark.integration


def test_status_of_a_running_front_door(tmp_path: Path) -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                directory = prepare_state_dir(tmp_path / "state")
                token_file = write_token_file(directory, door.token, port=door.door.port)
                write_serve_state(directory, ServeState(url=door.url, token_file=token_file, pid=1))
                # The blocking client runs off the loop the front door runs on.
                result = await asyncio.to_thread(read_status, state_dir=directory)
                assert result.verdict.ok
                assert result.document["state"] == "ready"
                assert result.document["in_flight"] == 0
                flat = result.to_dict()
                assert flat["ok"] is True and flat["reason"] == "ok"
                assert status_table(result.document).row_count >= 4

                explicit = await asyncio.to_thread(
                    read_status, url=door.url, token_file=token_file, state_dir=tmp_path / "none"
                )
                assert explicit.verdict.ok
                wrong = await asyncio.to_thread(fetch_status, door.url, new_token())
                assert wrong.verdict.reason is Reason.UNAUTHORIZED
                assert wrong.to_dict() == {"ok": False, "reason": "unauthorized"}

    asyncio.run(scenario())


@pytest.mark.security
def test_the_token_is_only_sent_to_a_loopback_http_url() -> None:
    for url in ("http://example.com:80", "https://127.0.0.1:1", "http://10.0.0.1:8080"):
        assert fetch_status(url, "t" * 43).verdict.reason is Reason.HOST_NOT_ALLOWED


def test_nothing_serving_or_no_state_file_is_a_refusal(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert fetch_status(f"http://127.0.0.1:{port}", "t" * 43).verdict.reason is Reason.NOT_READY
    result = read_status(state_dir=tmp_path / "empty")
    assert result.verdict.reason is Reason.FILE_NOT_FOUND


@pytest.mark.parametrize("depth", [20, 5000])
def test_a_status_document_nested_too_deep_is_refused(depth: int) -> None:
    # Whatever answers on the URL a state file names: its document is printed by recursion.
    body = ('{"a":' * depth + "1" + "}" * depth).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = fetch_status(url, new_token())
    finally:
        server.shutdown()
        server.server_close()
    assert result.verdict.reason is Reason.UPSTREAM_ERROR
