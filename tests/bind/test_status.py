"""Reading a real front door's status over loopback HTTP."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from companion_runtime import Reason, Verdict
from companion_runtime.bind.session import (
    ServeState,
    new_token,
    prepare_state_dir,
    read_serve_state,
    record_serve,
    write_serve_state,
    write_token_file,
)
from companion_runtime.bind.status import StatusResult, fetch_status, read_status, status_table
from tests.support.frontdoor import running_front_door, tiny_upstream
from tests.support.port_taker import ipv6_loopback, port_taker

pytestmark = pytest.mark.integration


def test_status_of_a_running_front_door(tmp_path: Path) -> None:
    async def scenario() -> None:
        with tiny_upstream() as upstream:
            async with running_front_door(upstream.url) as door:
                directory = prepare_state_dir(tmp_path / "state")
                token_file = write_token_file(directory, door.token, port=door.door.port)
                # This process is the one listening on the front door's port, as serve is.
                write_serve_state(
                    directory, ServeState(url=door.url, token_file=token_file, pid=os.getpid())
                )
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


def _fetch_document(body: bytes, status: int = 200) -> StatusResult:
    """``fetch_status`` against a server that answers ``body`` as its status document (or
    with ``status`` and ``body``)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
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
        return fetch_status(f"http://127.0.0.1:{server.server_address[1]}", new_token())
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "value", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", '[1, {"x": NaN}]']
)
def test_a_document_with_a_number_json_cannot_write_is_refused(value: str) -> None:
    # Python's json reads NaN and Infinity (and turns 1e400 into inf), but writes them back
    # as bare NaN/Infinity, which is no JSON: status --json would print an object that its
    # reader (JSON.parse, jq, serde) cannot parse, with exit 0.
    result = _fetch_document(f'{{"state": "ready", "odd": {value}}}'.encode())
    assert result.verdict.reason is Reason.UPSTREAM_ERROR
    # Large but finite numbers are numbers like any other.
    fine = _fetch_document(b'{"state": "ready", "big": 1e308, "int": 123456789012345678901}')
    assert fine.verdict.ok
    assert json.loads(json.dumps(fine.to_dict())) == fine.to_dict()


@pytest.mark.parametrize("reason", ["ok", "cancelled", "digest_mismatch", "unauthorized"])
def test_a_403_gives_only_a_reason_the_front_door_refuses_with_403(reason: str) -> None:
    # Whatever answers on the port chose the reason of its 403, any Reason at all: "ok" made
    # status print {"ok": false, "reason": "ok"}, and "cancelled" or "digest_mismatch" a
    # refusal that never happened. The front door's 403 says host or origin not allowed.
    result = _fetch_document(json.dumps({"ok": False, "reason": reason}).encode(), 403)
    assert result.verdict == Verdict(False, Reason.HTTP_STATUS)
    for allowed in (Reason.HOST_NOT_ALLOWED, Reason.ORIGIN_NOT_ALLOWED):
        body = json.dumps({"ok": False, "reason": allowed.value}).encode()
        assert _fetch_document(body, 403).verdict == Verdict(False, allowed)


@pytest.mark.security
def test_a_document_s_own_ok_and_reason_never_replace_the_verdict() -> None:
    # Whatever answers on the port may send fields of those names; with --json the object's
    # "ok" must agree with the exit code, which follows the verdict.
    body = b'{"ok": false, "reason": "not_ready", "state": "ready", "in_flight": 0}'

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
        result = fetch_status(f"http://127.0.0.1:{server.server_address[1]}", new_token())
    finally:
        server.shutdown()
        server.server_close()
    assert result.verdict.ok
    assert result.to_dict() == {"ok": True, "reason": "ok", "state": "ready", "in_flight": 0}


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """A status answer that never ends: a byte now and then, or a megabyte after another."""

    protocol_version = "HTTP/1.1"
    trickle = True

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        piece = b" " if self.trickle else b" " * (1 << 20)
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        try:
            while not self.server.closing.is_set():  # type: ignore[attr-defined]
                self.wfile.write(chunk)
                self.wfile.flush()
                if self.trickle:
                    self.server.closing.wait(0.2)  # type: ignore[attr-defined]
        except OSError:
            return

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.mark.security
@pytest.mark.parametrize(
    ("trickle", "reason"), [(True, Reason.TIMEOUT), (False, Reason.UPSTREAM_ERROR)]
)
def test_a_status_answer_that_never_ends_is_refused_in_time_and_memory(
    trickle: bool, reason: Reason
) -> None:
    # Whatever listens on the port: a byte every 0.2 s never lets a per-read timeout fire,
    # and an endless body would be read into memory until the machine ran out of it.
    import resource
    import time

    handler = type("Handler", (_EndlessHandler,), {"trickle": trickle})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.closing = threading.Event()  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    results: list[StatusResult] = []
    fetching = threading.Thread(
        target=lambda: results.append(fetch_status(url, new_token(), timeout_s=1)), daemon=True
    )
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        fetching.start()
        fetching.join(timeout=5)
        elapsed = time.monotonic() - started
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    finally:
        # Ends the answer, and with it a fetch still reading it.
        server.closing.set()  # type: ignore[attr-defined]
        fetching.join(timeout=30)
        server.shutdown()
        server.server_close()
    assert elapsed < 3
    assert grown_kib < 64 * 1024
    assert results[0].verdict.reason is reason


@pytest.mark.security
def test_a_status_answer_whose_head_never_ends_is_refused_in_time() -> None:
    # A byte of the head every 0.2 s: httpx's timeout bounds each read, and its head limit
    # (16 KiB) would take most of a day at that pace.
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    closing = threading.Event()

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: " + b"a" * 4096:
                if closing.wait(0.2):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    results: list[StatusResult] = []
    fetching = threading.Thread(
        target=lambda: results.append(fetch_status(url, new_token(), timeout_s=1)), daemon=True
    )
    started = time.monotonic()
    try:
        fetching.start()
        fetching.join(timeout=5)
        elapsed = time.monotonic() - started
    finally:
        closing.set()
        fetching.join(timeout=30)
        thread.join(timeout=5)
        listener.close()
    assert elapsed < 3
    assert results[0].verdict.reason is Reason.TIMEOUT


# --- a state file is trusted no more than serve would trust it ------------------------------

#: A user other than the one running the tests (``nobody``); acting as it needs root.
OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def record_session(directory: Path, *, url: str, pid: int) -> tuple[Path, str]:
    """What ``serve`` writes once ready, naming ``url`` and ``pid``; the token file and token."""
    token = new_token()
    port = int(url.rsplit(":", 1)[1])
    token_file = write_token_file(directory, token, port=port)
    write_serve_state(directory, ServeState(url=url, token_file=token_file, pid=pid))
    return token_file, token


@pytest.mark.security
@pytest.mark.parametrize(
    "case",
    [
        "serve exited",
        "its pid now names a process that does not listen",
        "its pid now names a process that listens on another port",
        pytest.param("its pid now names another user's process on the port", marks=needs_root),
    ],
)
def test_the_token_of_a_serve_that_is_gone_is_not_sent_to_whoever_took_its_port(
    tmp_path: Path, case: str
) -> None:
    # serve killed with SIGKILL leaves its files; another local process then takes the port.
    directory = prepare_state_dir(tmp_path / "state")
    user = OTHER_UID if "another user" in case else None
    with port_taker(user=user) as taker:
        if case == "serve exited":
            gone = subprocess.Popen([sys.executable, "-c", "pass"])
            gone.wait()
            record_session(directory, url=taker.url, pid=gone.pid)
            result = read_status(state_dir=directory)
        elif case == "its pid now names a process that listens on another port":
            with port_taker() as elsewhere:
                record_session(directory, url=taker.url, pid=elsewhere.pid)
                result = read_status(state_dir=directory)
        elif user is None:
            with subprocess.Popen(["sleep", "60"]) as sleeper:
                record_session(directory, url=taker.url, pid=sleeper.pid)
                result = read_status(state_dir=directory)
                sleeper.kill()
        else:
            record_session(directory, url=taker.url, pid=taker.pid)
            result = read_status(state_dir=directory)
        received = taker.stop()
    assert result.to_dict() == {"ok": False, "reason": "not_ready"}
    assert received == []


@pytest.mark.security
@pytest.mark.parametrize(
    "case",
    [
        "state dir writable by everyone",
        pytest.param("state dir of another user", marks=needs_root),
        "state file readable by others",
        pytest.param("state file of another user", marks=needs_root),
        "token file readable by others",
        pytest.param("token file of another user", marks=needs_root),
        "token file outside the state dir",
    ],
)
def test_state_serve_would_refuse_is_refused_before_any_token_is_sent(
    tmp_path: Path, case: str
) -> None:
    # The recorded serve is alive and listens on the recorded port (the port taker), so only
    # the files decide: a state dir or file someone else could have written names the URL and
    # token file, and the token must go nowhere.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as taker:
        token_file, _token = record_session(directory, url=taker.url, pid=taker.pid)
        if case == "state dir writable by everyone":
            directory.chmod(0o777)
        elif case == "state dir of another user":
            os.chown(directory, OTHER_UID, OTHER_UID)
        elif case == "state file readable by others":
            (directory / "serve.json").chmod(0o644)
        elif case == "state file of another user":
            os.chown(directory / "serve.json", OTHER_UID, OTHER_UID)
        elif case == "token file readable by others":
            token_file.chmod(0o644)
        elif case == "token file of another user":
            os.chown(token_file, OTHER_UID, OTHER_UID)
        else:
            # Another private directory of the same user, holding some other secret.
            secret = prepare_state_dir(tmp_path / "secrets") / "other.token"
            secret.write_text("a-secret-that-is-not-a-session-token\n")
            secret.chmod(0o600)
            write_serve_state(
                directory, ServeState(url=taker.url, token_file=secret, pid=taker.pid)
            )
        result = read_status(state_dir=directory)
        received = taker.stop()
    assert result.to_dict() == {"ok": False, "reason": "store_error"}
    assert received == []


def test_a_live_serve_of_this_user_on_its_port_is_asked(tmp_path: Path) -> None:
    # The same checks pass for what a running serve leaves: it gets its own token, once.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as taker:
        _token_file, token = record_session(directory, url=taker.url, pid=taker.pid)
        result = read_status(state_dir=directory)
        received = taker.stop()
    assert result.verdict.ok, result.to_dict()
    assert result.document["answered_by"] == "port taker"
    assert received == [f"Bearer {token}"]


# --- the recorded token goes to the recorded front door only --------------------------------

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="needs an IPv6 loopback")


@pytest.mark.security
@pytest.mark.parametrize(
    "case",
    [
        pytest.param("::1 on the recorded port", marks=needs_ipv6),
        pytest.param("::1 on the recorded port, another user's", marks=[needs_ipv6, needs_root]),
        pytest.param("localhost on the recorded port", marks=needs_ipv6),
        "another port on 127.0.0.1",
    ],
)
def test_a_url_other_than_the_recorded_one_gets_no_recorded_token(
    tmp_path: Path, case: str
) -> None:
    # serve is alive and listens on the port it recorded, so every check of the state passes;
    # the URL given names a socket that is not serve's, and only a token file named with it
    # may go there.
    directory = prepare_state_dir(tmp_path / "state")
    user = OTHER_UID if "another user" in case else None
    with port_taker() as serve:
        record_session(directory, url=serve.url, pid=serve.pid)
        if "::1" in case or "localhost" in case:
            impostor_taken = port_taker(host="::1", port=serve.port, user=user)
        else:
            impostor_taken = port_taker()
        with impostor_taken as impostor:
            url = impostor.url
            if "localhost" in case:
                # It may resolve to ::1 first, and another user's socket there.
                url = f"http://localhost:{serve.port}"
            result = read_status(url=url, state_dir=directory)
            to_impostor = impostor.stop()
        to_serve = serve.stop()
    assert result.to_dict() == {"ok": False, "reason": "host_not_allowed"}
    assert to_impostor == []
    assert to_serve == []


@pytest.mark.security
@pytest.mark.parametrize(
    "suffix", ["/_status", "/?a=b", "#x", "?", "/status/../"], ids=lambda suffix: suffix
)
def test_the_recorded_url_with_more_than_its_root_is_refused(tmp_path: Path, suffix: str) -> None:
    # What the request would be sent to is the recorded URL only; anything the caller added
    # would be dropped, so it is refused rather than ignored.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as serve:
        record_session(directory, url=serve.url, pid=serve.pid)
        result = read_status(url=serve.url + suffix, state_dir=directory)
        received = serve.stop()
    assert result.to_dict() == {"ok": False, "reason": "host_not_allowed"}
    assert received == []


def test_a_malformed_url_without_a_token_file_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as serve:
        record_session(directory, url=serve.url, pid=serve.pid)
        results = [
            read_status(url=url, state_dir=directory)
            for url in ("http://[::1", "http://127.0.0.1:notaport", "http://127.0.0.1:99999")
        ]
        received = serve.stop()
    assert [result.verdict.reason for result in results] == [Reason.MALFORMED_SPEC] * 3
    assert received == []


def test_the_recorded_url_however_spelled_is_asked(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as serve:
        _token_file, token = record_session(directory, url=serve.url, pid=serve.pid)
        spellings = [serve.url, serve.url + "/", f"HTTP://127.0.0.1:{serve.port}/"]
        results = [read_status(url=url, state_dir=directory) for url in spellings]
        received = serve.stop()
    assert all(result.verdict.ok for result in results), [r.to_dict() for r in results]
    assert received == [f"Bearer {token}"] * len(spellings)


@needs_ipv6
def test_a_url_with_a_token_file_goes_where_the_caller_says(tmp_path: Path) -> None:
    # Both named by the caller: the state file is not read, its token not sent.
    directory = prepare_state_dir(tmp_path / "state")
    mine = prepare_state_dir(tmp_path / "mine")
    with port_taker() as serve:
        _recorded, recorded_token = record_session(directory, url=serve.url, pid=serve.pid)
        with port_taker(host="::1", port=serve.port) as elsewhere:
            token = new_token()
            token_file = write_token_file(mine, token, port=elsewhere.port)
            result = read_status(url=elsewhere.url, token_file=token_file, state_dir=directory)
            to_elsewhere = elsewhere.stop()
        to_serve = serve.stop()
    assert result.verdict.ok, result.to_dict()
    assert to_elsewhere == [f"Bearer {token}"]
    assert to_serve == []
    assert recorded_token != token


# --- several serves with one state directory -----------------------------------------------


def record_serve_at(directory: Path, *, url: str, pid: int) -> tuple[Path, str]:
    """What ``serve`` records once ready (its own record and ``serve.json``)."""
    token = new_token()
    token_file = write_token_file(directory, token, port=int(url.rsplit(":", 1)[1]))
    record_serve(directory, ServeState(url=url, token_file=token_file, pid=pid))
    return token_file, token


def test_of_several_live_serves_the_latest_is_asked_and_the_others_named(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as first, port_taker() as second:
        _file, first_token = record_serve_at(directory, url=first.url, pid=first.pid)
        _file, second_token = record_serve_at(directory, url=second.url, pid=second.pid)
        latest = read_status(state_dir=directory)
        chosen = read_status(url=first.url, state_dir=directory)
        to_first, to_second = first.stop(), second.stop()
    assert latest.verdict.ok, latest.to_dict()
    assert latest.url == second.url
    assert latest.others == (first.url,)
    # --url picks another recorded serve; its own token goes to it, and no note then.
    assert chosen.verdict.ok, chosen.to_dict()
    assert (chosen.url, chosen.others) == (first.url, ())
    assert to_first == [f"Bearer {first_token}"]
    assert to_second == [f"Bearer {second_token}"]


@pytest.mark.security
def test_when_serve_json_names_a_serve_that_died_a_live_recorded_one_is_asked(
    tmp_path: Path,
) -> None:
    # The latest serve was killed with SIGKILL: serve.json and its record name it still, and
    # another process took its port; the earlier serve is alive and must be found, and the
    # dead one's token must go nowhere.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as alive, port_taker() as killed:
        _file, alive_token = record_serve_at(directory, url=alive.url, pid=alive.pid)
        with subprocess.Popen(["sleep", "60"]) as sleeper:
            _file, killed_token = record_serve_at(directory, url=killed.url, pid=sleeper.pid)
            sleeper.kill()
        assert read_serve_state(directory).url == killed.url
        result = read_status(state_dir=directory)
        to_killed_port = read_status(url=killed.url, state_dir=directory)
        to_alive, to_killed = alive.stop(), killed.stop()
    assert result.verdict.ok, result.to_dict()
    assert (result.url, result.others) == (alive.url, ())
    assert to_killed_port.to_dict() == {"ok": False, "reason": "not_ready"}
    assert to_alive == [f"Bearer {alive_token}"]
    assert to_killed == []
    assert killed_token != alive_token


@pytest.mark.security
def test_a_record_serve_would_refuse_is_refused_before_any_token_is_sent(tmp_path: Path) -> None:
    # serve.json names a live serve, but a record next to it is readable by others: the
    # directory is not as serve leaves it, so nothing recorded there is trusted.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as first, port_taker() as second:
        record_serve_at(directory, url=first.url, pid=first.pid)
        record_serve_at(directory, url=second.url, pid=second.pid)
        (directory / f"serve-{first.pid}.json").chmod(0o644)
        result = read_status(state_dir=directory)
        received = first.stop() + second.stop()
    assert result.to_dict() == {"ok": False, "reason": "store_error"}
    assert received == []
