"""`companion-runtime status` as a real subprocess, against a real `serve` over llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

import pytest

from companion_runtime.bind.llama_server import llama_available
from tests.support.frontdoor import (
    ServeProcess,
    _readline_with_timeout,
    running_serve,
    serve_command,
    serve_env,
)
from tests.support.port_taker import ipv6_loopback, port_taker
from tests.support.signals import flood_until_exit
from tests.support.supervision import standin_command
from tests.support.unreadable import CAN_DROP_FILE_OVERRIDE, run_cli_without_file_override

pytestmark = pytest.mark.e2e
needs_llama = pytest.mark.skipif(not llama_available(), reason="needs the llama extra")

COUNTERS = ("in_flight", "queued", "admitted_total", "completed_total", "refused_total")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_serve(tmp_path_factory.mktemp("status")) as (serve, _origin):
        yield serve


def run_status(*options: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """``companion-runtime status OPTIONS`` with ``state_dir`` as the state directory."""
    env = dict(os.environ)
    env["COMPANION_RUNTIME_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "status", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def assert_refused(
    finished: subprocess.CompletedProcess[str], reason: str, *, json_output: bool
) -> None:
    assert finished.returncode == 1, finished.stdout + finished.stderr
    if json_output:
        assert json.loads(finished.stdout) == {"ok": False, "reason": reason}
    else:
        assert finished.stdout == ""
        assert finished.stderr.strip() == f"refused: {reason}"
    assert "Traceback" not in finished.stdout + finished.stderr


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


# --- against a running serve --------------------------------------------------------------


@needs_llama
def test_json_finds_serve_through_its_state_file(served: ServeProcess) -> None:
    finished = run_status("--json", state_dir=served.state_dir)
    assert finished.returncode == 0, finished.stderr
    document = json.loads(finished.stdout)  # the whole output is one JSON object
    assert isinstance(document, dict)
    assert document["ok"] is True and document["reason"] == "ok"
    assert document["state"] == "ready"
    for counter in COUNTERS:
        assert _is_number(document[counter]), counter
    front_door = document["front_door"]
    assert isinstance(front_door, dict)
    assert _is_number(front_door["proxied_total"])
    assert all(_is_number(count) for count in front_door["refused_by_reason"].values())
    assert document["pid"] == served.status()["pid"]  # the runtime this serve supervises


@needs_llama
def test_json_with_url_and_token_file_needs_no_state_file(
    served: ServeProcess, tmp_path: Path
) -> None:
    finished = run_status(
        "--url",
        served.url,
        "--token-file",
        str(served.token_file),
        "--json",
        state_dir=tmp_path / "empty",
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads(finished.stdout)
    assert document["state"] == "ready"
    assert all(_is_number(document[counter]) for counter in COUNTERS)


@needs_llama
def test_table_shows_the_state(served: ServeProcess) -> None:
    finished = run_status(state_dir=served.state_dir)
    assert finished.returncode == 0, finished.stderr
    rows: dict[str, str] = {}
    for line in finished.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) == 4 and cells[1]:
            rows.setdefault(cells[1], cells[2])
    assert rows.get("state") == "ready", finished.stdout
    assert rows.get("in_flight") == "0"
    assert rows.get("front_door.proxied_total", "").isdigit()


@needs_llama
@pytest.mark.parametrize("json_output", [True, False], ids=["json", "table"])
def test_a_status_that_cannot_be_written_is_one_line_on_stderr_and_exit_1(
    served: ServeProcess, json_output: bool
) -> None:
    # stdout on a full disk: the answer is lost, so exit 1 with why, and no traceback.
    with open("/dev/full", "wb") as full:
        finished = subprocess.run(
            [sys.executable, "-m", "companion_runtime.cli", "status"]
            + (["--json"] if json_output else []),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COMPANION_RUNTIME_STATE_DIR": str(served.state_dir)},
            timeout=60,
        )
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.splitlines() == ["could not write the result: No space left on device"]


@needs_llama
@pytest.mark.security
@pytest.mark.parametrize("json_output", [False, True])
def test_a_wrong_token_is_refused_without_echoing_token_or_path(
    served: ServeProcess, tmp_path: Path, json_output: bool
) -> None:
    wrong_token = "W" * 43
    token_file = tmp_path / "wrong.token"
    token_file.write_text(wrong_token + "\n")
    finished = run_status(
        "--url",
        served.url,
        "--token-file",
        str(token_file),
        *(["--json"] if json_output else []),
        state_dir=served.state_dir,
    )
    assert_refused(finished, "unauthorized", json_output=json_output)
    output = finished.stdout + finished.stderr
    for secret in (wrong_token, served.token, str(token_file), str(served.token_file)):
        assert secret not in output


@needs_llama
@pytest.mark.security
@pytest.mark.parametrize("json_output", [False, True])
def test_a_missing_token_file_is_refused_without_echoing_its_path(
    served: ServeProcess, tmp_path: Path, json_output: bool
) -> None:
    missing = tmp_path / "no-such.token"
    finished = run_status(
        "--url",
        served.url,
        "--token-file",
        str(missing),
        *(["--json"] if json_output else []),
        state_dir=served.state_dir,
    )
    assert_refused(finished, "file_not_found", json_output=json_output)
    assert str(missing) not in finished.stdout + finished.stderr
    assert served.token not in finished.stdout + finished.stderr


# --- nothing to ask -----------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [False, True])
def test_nothing_listening_is_refused_not_ready(tmp_path: Path, json_output: bool) -> None:
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    finished = run_status(
        "--url",
        f"http://127.0.0.1:{free_port()}",
        "--token-file",
        str(token_file),
        *(["--json"] if json_output else []),
        state_dir=tmp_path / "state",
    )
    assert_refused(finished, "not_ready", json_output=json_output)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new ``0600`` file, as ``serve`` writes its session files."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def test_a_stale_state_file_of_a_serve_that_died_is_refused_not_ready(tmp_path: Path) -> None:
    # What a serve killed with SIGKILL leaves behind: the files, and nobody on the port.
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    token_file = state_dir / "frontdoor.token"
    write_private(token_file, "T" * 43 + "\n")
    write_private(
        state_dir / "serve.json",
        json.dumps(
            {"url": f"http://127.0.0.1:{free_port()}", "token_file": str(token_file), "pid": 1}
        ),
    )
    assert_refused(run_status("--json", state_dir=state_dir), "not_ready", json_output=True)


@pytest.mark.parametrize("json_output", [False, True])
def test_no_serve_recorded_is_refused_file_not_found(tmp_path: Path, json_output: bool) -> None:
    finished = run_status(*(["--json"] if json_output else []), state_dir=tmp_path / "state")
    assert_refused(finished, "file_not_found", json_output=json_output)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:notaport", "http://127.0.0.1:99999", "http://[::1"]
)
def test_a_malformed_url_is_refused_without_a_traceback(tmp_path: Path, url: str) -> None:
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    finished = run_status(
        "--url", url, "--token-file", str(token_file), state_dir=tmp_path / "state"
    )
    assert_refused(finished, "malformed_spec", json_output=False)


@pytest.mark.parametrize("url", ["http://192.0.2.1:8080", "https://127.0.0.1:8080"])
def test_the_token_goes_only_to_loopback_http(tmp_path: Path, url: str) -> None:
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    finished = run_status(
        "--url", url, "--token-file", str(token_file), "--json", state_dir=tmp_path / "state"
    )
    assert_refused(finished, "host_not_allowed", json_output=True)


# --- state that serve would not trust is not trusted ----------------------------------------

#: A user other than the one running the tests (``nobody``); giving it a file needs root.
OTHER_UID = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another user needs root"
)


def standin_manifest_text(origin_url: str, allow: str, data: bytes) -> str:
    """A manifest whose runtime is the stand-in runtime (no model is ever read)."""
    import hashlib

    return "\n".join(
        [
            "[model]",
            'name = "standin"',
            f'url = "{origin_url}"',
            f'sha256 = "{hashlib.sha256(data).hexdigest()}"',
            f"size_bytes = {len(data)}",
            "[sources]",
            f'allow = ["{allow}"]',
            "[runtime]",
            f"command = {json.dumps(standin_command())}",
            "ready_timeout_s = 30",
            "[limits]",
            "max_ram_bytes = 4294967296",
            "max_vram_bytes = 1073741824",
            "max_cpu_percent = 100",
            "",
        ]
    )


@pytest.mark.security
def test_after_serve_is_sigkilled_whoever_takes_its_port_gets_no_token(tmp_path: Path) -> None:
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            assert ready["ok"] is True
            token = Path(str(ready["token_file"])).read_text().strip()
            port = int(str(ready["url"]).rsplit(":", 1)[1])
            alive = run_status("--json", state_dir=state_dir)
            assert alive.returncode == 0, alive.stdout + alive.stderr
            assert json.loads(alive.stdout)["state"] == "ready"
        finally:
            process.kill()
            process.communicate(timeout=30)
    # SIGKILL leaves no chance to clean up: the state and token files stay behind.
    assert (state_dir / "serve.json").exists()
    assert Path(str(ready["token_file"])).exists()
    with port_taker(port=port) as taker:
        finished = run_status("--json", state_dir=state_dir)
        received = taker.stop()
    assert_refused(finished, "not_ready", json_output=True)
    assert received == []
    assert token not in finished.stdout + finished.stderr


def _in_a_pid_namespace(command: list[str]) -> list[str]:
    """``command`` as the second process of a new pid namespace, always with the same pid (the
    namespace's next pid is set first), as the same program gets it in each run of a
    container."""
    script = 'echo 299 > /proc/sys/kernel/ns_last_pid && "$@"; exit $?'
    return ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh", *command]


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a pid namespace of its own needs Linux, root and unshare",
)
def test_a_serve_killed_with_sigkill_does_not_keep_the_next_one_with_its_pid_from_starting(
    tmp_path: Path,
) -> None:
    # A container restarted after an OOM kill or `docker kill`: serve gets the same pid as
    # the last time, the same --port, and the state directory (under /tmp) kept what the
    # killed serve left. Its token file had the very name the new serve wanted, so each new
    # serve was refused store_error, for ever.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    port = free_port()
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        command = [
            *serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            "--port",
            str(port),
        ]
        readies = []
        for _run in range(2):
            process = subprocess.Popen(
                _in_a_pid_namespace(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(state_dir),
                start_new_session=True,
            )
            try:
                line = _readline_with_timeout(process, 90)
                if not line and not readies:
                    pytest.skip("unshare could not make a pid namespace here")
                readies.append(json.loads(line))
                assert readies[-1]["ok"] is True, readies[-1]
            finally:
                # SIGKILL to the namespace's first process: the kernel kills every process
                # in it, serve included, with no chance to clean up.
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate(timeout=60)
    # Both runs had the same pid, each in a pid namespace of its own: the second wrote a token
    # file of its own and a record of its own, named for its namespace. (The first's stay:
    # nothing in another pid namespace can tell whether that serve is gone, and a live serve
    # of the same pid in a sibling sandbox must not lose its record.)
    assert len({ready["token_file"] for ready in readies}) == 2
    records = sorted(state_dir.glob("serve-*.json"))
    assert len(records) == 2 and all(record.name.count("-") == 2 for record in records)


@pytest.mark.security
@pytest.mark.parametrize("json_output", [False, True])
@pytest.mark.parametrize(
    "case", ["writable by everyone", pytest.param("another user's", marks=needs_root)]
)
def test_a_state_dir_serve_would_refuse_is_refused_and_nothing_is_sent(
    tmp_path: Path, case: str, json_output: bool
) -> None:
    # Whoever can write the state dir could name any file as the token file and any loopback
    # port as the front door: a private file of the user's, sent to a listener of theirs.
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    secret = tmp_path / "secret.token"
    write_private(secret, "a-token-of-something-else\n")
    with port_taker() as taker:
        write_private(
            state_dir / "serve.json",
            json.dumps({"url": taker.url, "token_file": str(secret), "pid": taker.pid}),
        )
        if case == "writable by everyone":
            state_dir.chmod(0o777)
        else:
            os.chown(state_dir, OTHER_UID, OTHER_UID)
        finished = run_status(*(["--json"] if json_output else []), state_dir=state_dir)
        received = taker.stop()
    assert_refused(finished, "store_error", json_output=json_output)
    assert received == []
    output = finished.stdout + finished.stderr
    for leaked in ("a-token-of-something-else", str(secret), str(state_dir), taker.url):
        assert leaked not in output


def _fallback_runtime_dir_in_use() -> bool:
    """Whether platformdirs falls back to ``$TMPDIR/runtime-<uid>`` without XDG_RUNTIME_DIR
    (on Linux: when ``/run/user/<uid>`` does not exist)."""
    return sys.platform.startswith("linux") and not Path(f"/run/user/{os.geteuid()}").exists()


@needs_root
@pytest.mark.security
@pytest.mark.skipif(not _fallback_runtime_dir_in_use(), reason="needs the /tmp fallback")
@pytest.mark.parametrize("json_output", [False, True])
def test_a_fallback_runtime_dir_of_another_user_is_refused_without_a_traceback(
    tmp_path: Path, json_output: bool
) -> None:
    # With XDG_RUNTIME_DIR unset the state dir defaults to a predictable name under the
    # temporary directory, which another user can create first; platformdirs then raises.
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o700)
    taken = temp / f"runtime-{os.geteuid()}"
    taken.mkdir(mode=0o700)
    os.chown(taken, OTHER_UID, OTHER_UID)
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("XDG_RUNTIME_DIR", "COMPANION_RUNTIME_STATE_DIR")
    }
    env["TMPDIR"] = str(temp)
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "status"]
        + (["--json"] if json_output else []),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "Traceback" not in finished.stderr, finished.stderr[-2000:]
    assert_refused(finished, "store_error", json_output=json_output)
    assert str(temp) not in finished.stdout + finished.stderr


# --- the recorded token goes to the recorded front door only ------------------------------


@needs_llama
@pytest.mark.security
@pytest.mark.skipif(not ipv6_loopback(), reason="needs an IPv6 loopback")
@pytest.mark.parametrize("json_output", [False, True])
@pytest.mark.parametrize(
    "user", [None, pytest.param(OTHER_UID, marks=needs_root)], ids=["this user", "another user"]
)
def test_serve_s_port_number_on_ipv6_loopback_gets_no_recorded_token(
    served: ServeProcess, json_output: bool, user: int | None
) -> None:
    # serve listens on 127.0.0.1:PORT only; [::1]:PORT is another socket, free for anyone.
    # Every check of the state passes (serve is alive and listens on its port), and still the
    # token it recorded is for its URL, not for one the caller names.
    with port_taker(host="::1", port=served.port, user=user) as impostor:
        finished = run_status(
            "--url",
            impostor.url,
            *(["--json"] if json_output else []),
            state_dir=served.state_dir,
        )
        received = impostor.stop()
    assert_refused(finished, "host_not_allowed", json_output=json_output)
    assert received == []
    output = finished.stdout + finished.stderr
    for leaked in (served.token, str(served.token_file), impostor.url, str(served.port)):
        assert leaked not in output


@needs_llama
def test_the_url_serve_recorded_needs_no_token_file(served: ServeProcess) -> None:
    for url in (served.url, served.url + "/"):
        finished = run_status("--url", url, "--json", state_dir=served.state_dir)
        assert finished.returncode == 0, finished.stdout + finished.stderr
        assert json.loads(finished.stdout)["state"] == "ready"


# --- what a front door says is shown as it is -----------------------------------------------


# A status document whose values look like rich markup (a closing tag with no opening one).
_MARKUP_LIKE_DOCUMENT: Final = {"state": "ready", "last_reason": "[/bold] [red]x"}


class _StatusDocument(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        data = json.dumps(_MARKUP_LIKE_DOCUMENT).encode()
        self.send_response(200 if self.path == "/_status" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_the_table_prints_values_verbatim_not_as_markup(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusDocument)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        token_file = tmp_path / "frontdoor.token"
        token_file.write_text("T" * 43 + "\n")
        finished = run_status(
            "--url",
            f"http://127.0.0.1:{server.server_address[1]}",
            "--token-file",
            str(token_file),
            state_dir=tmp_path / "state",
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert finished.returncode == 0, finished.stderr
    assert "[/bold] [red]x" in finished.stdout
    assert "Traceback" not in finished.stderr


class _VerdictLikeDocument(BaseHTTPRequestHandler):
    """A status document with fields named like the verdict's, saying the opposite."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        data = json.dumps({"ok": False, "reason": "digest_mismatch", "state": "ready"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.security
def test_the_table_never_shows_a_document_s_own_ok_and_reason(tmp_path: Path) -> None:
    # The exit code (0 here) is the verdict's; a table row "reason  digest_mismatch" taken from
    # whatever answers at --url would say otherwise, as {"ok": false} would with --json.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VerdictLikeDocument)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        token_file = tmp_path / "frontdoor.token"
        token_file.write_text("T" * 43 + "\n")
        url = f"http://127.0.0.1:{server.server_address[1]}"
        table = run_status("--url", url, "--token-file", str(token_file), state_dir=tmp_path / "s")
        as_json = run_status(
            "--url", url, "--token-file", str(token_file), "--json", state_dir=tmp_path / "s"
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert table.returncode == 0, table.stderr
    assert "ready" in table.stdout
    assert "digest_mismatch" not in table.stdout
    assert "False" not in table.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"ok": True, "reason": "ok", "state": "ready"}


# --- several serves with one state directory -----------------------------------------------


class _StandinServes:
    """Real ``serve --json`` processes over the stand-in runtime, sharing one state directory."""

    def __init__(self, tmp_path: Path, origin_url: str, allow: str, ca: Path, data: bytes):
        self.state_dir = tmp_path / "state"
        self._store = tmp_path / "store"
        self._ca = ca
        self._manifest = tmp_path / "manifest.toml"
        self._manifest.write_text(standin_manifest_text(origin_url, allow, data))
        self.running: list[ServeProcess] = []

    def start(self) -> ServeProcess:
        process = subprocess.Popen(
            serve_command(self._manifest, self._store, self._ca),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(self.state_dir),
        )
        try:
            ready = json.loads(_readline_with_timeout(process, 90))
        except BaseException:
            process.kill()
            process.wait()
            raise
        serve = ServeProcess(process, ready, self.state_dir)
        self.running.append(serve)
        return serve

    def stop_all(self) -> None:
        for serve in self.running:
            if serve.process.poll() is None:
                serve.process.kill()
            serve.process.communicate(timeout=60)


@contextmanager
def standin_serves(tmp_path: Path) -> Iterator[_StandinServes]:
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        serves = _StandinServes(
            tmp_path,
            origin.url("/models/standin.bin"),
            origin.base_url,
            origin.ca_pem_path,
            data,
        )
        try:
            yield serves
        finally:
            serves.stop_all()


def runtime_pid_of(serve: ServeProcess) -> object:
    """The pid of the runtime ``serve`` supervises, from its own front door."""
    return serve.status()["pid"]


@pytest.mark.parametrize("json_output", [False, True])
def test_two_serves_with_one_state_dir_are_both_found_and_neither_is_lost(
    tmp_path: Path, json_output: bool
) -> None:
    flags = ["--json"] if json_output else []
    with standin_serves(tmp_path) as serves:
        first = serves.start()
        second = serves.start()
        # Both are recorded; without --url the latest is asked, and the other is named.
        latest = run_status(*flags, state_dir=serves.state_dir)
        assert latest.returncode == 0, latest.stdout + latest.stderr
        assert first.url in latest.stderr and "--url" in latest.stderr
        assert second.url in latest.stderr
        if json_output:
            assert json.loads(latest.stdout)["pid"] == runtime_pid_of(second)
        else:
            assert "ready" in latest.stdout
        # The earlier one is still reachable with its recorded token, by its URL.
        earlier = run_status("--url", first.url, "--json", state_dir=serves.state_dir)
        assert earlier.returncode == 0, earlier.stdout + earlier.stderr
        assert json.loads(earlier.stdout)["pid"] == runtime_pid_of(first)
        assert earlier.stderr == ""
        # The latest exits cleanly: the earlier one is found, alone, without --url.
        assert second.terminate() == 0
        left = run_status("--json", state_dir=serves.state_dir)
        assert left.returncode == 0, left.stdout + left.stderr
        assert json.loads(left.stdout)["pid"] == runtime_pid_of(first)
        assert left.stderr == ""
        assert json.loads((serves.state_dir / "serve.json").read_text())["url"] == first.url
        assert first.terminate() == 0
        for output in (latest, earlier, left):
            for secret in (first.token, second.token, str(first.token_file)):
                assert secret not in output.stdout + output.stderr
    # Nothing is left once both have exited.
    assert list(serves.state_dir.iterdir()) == []
    assert_refused(
        run_status("--json", state_dir=serves.state_dir), "file_not_found", json_output=True
    )


@pytest.mark.security
def test_a_serve_killed_with_sigkill_hides_no_other_serve_and_gets_no_token(
    tmp_path: Path,
) -> None:
    with standin_serves(tmp_path) as serves:
        first = serves.start()
        killed = serves.start()
        killed.process.kill()
        killed.process.communicate(timeout=30)
        # serve.json still names the killed serve, and another process takes its port.
        assert json.loads((serves.state_dir / "serve.json").read_text())["url"] == killed.url
        with port_taker(port=killed.port) as taker:
            found = run_status("--json", state_dir=serves.state_dir)
            asked_killed = run_status("--url", killed.url, "--json", state_dir=serves.state_dir)
            received = taker.stop()
        assert found.returncode == 0, found.stdout + found.stderr
        assert json.loads(found.stdout)["pid"] == runtime_pid_of(first)
        assert found.stderr == ""
        assert_refused(asked_killed, "not_ready", json_output=True)
        assert received == []
        # The next serve removes what the killed one left behind.
        killed_record = serves.state_dir / f"serve-{killed.process.pid}.json"
        assert killed_record.exists() and killed.token_file.exists()
        third = serves.start()
        assert not killed_record.exists()
        assert not killed.token_file.exists()
        latest = run_status("--json", state_dir=serves.state_dir)
        assert latest.returncode == 0, latest.stdout + latest.stderr
        assert json.loads(latest.stdout)["pid"] == runtime_pid_of(third)
        assert first.url in latest.stderr
        assert killed.url not in latest.stderr
        assert third.terminate() == 0
        assert first.terminate() == 0
    assert list(serves.state_dir.iterdir()) == []


class _NonAsciiStatusDocument(_StatusDocument):
    def do_GET(self) -> None:
        data = json.dumps({"state": "ready", "model": "modèle ✓"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_value_the_output_s_encoding_cannot_show_is_escaped_not_a_traceback(
    tmp_path: Path,
) -> None:
    # Whatever answers at a --url chooses the values; a terminal that is not UTF-8 (an ASCII or
    # Latin-1 locale) cannot show every one of them. The table is still printed, exit 0.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NonAsciiStatusDocument)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        token_file = tmp_path / "frontdoor.token"
        token_file.write_text("T" * 43 + "\n")
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "companion_runtime.cli",
                "status",
                "--url",
                f"http://127.0.0.1:{server.server_address[1]}",
                "--token-file",
                str(token_file),
            ],
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONIOENCODING": "ascii"},
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert finished.returncode == 0, finished.stderr
    assert b"Traceback" not in finished.stderr
    assert b"mod\\xe8le \\u2713" in finished.stdout


class _ControlCharacterDocument(_StatusDocument):
    """A status document whose names and values carry terminal escape sequences."""

    def do_GET(self) -> None:
        document = {
            "state": "\x1b]0;owned\x07\x1b[2J\x1b[31mready\x1b[0m",
            "\x1b]52;c;ZWNobyBvd25lZA==\x1b\\model": "a\rb\u202ec\x9bd\nline",
        }
        data = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.security
def test_control_characters_in_the_document_reach_the_terminal_escaped(tmp_path: Path) -> None:
    # Whatever answers at a --url chooses the names and values: an escape sequence among them
    # must not retitle the terminal, clear it, write the clipboard (OSC 52) or reorder what
    # follows (U+202E); the table shows each such character escaped.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ControlCharacterDocument)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        token_file = tmp_path / "frontdoor.token"
        token_file.write_text("T" * 43 + "\n")
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "companion_runtime.cli",
                "status",
                "--url",
                f"http://127.0.0.1:{server.server_address[1]}",
                "--token-file",
                str(token_file),
            ],
            capture_output=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert finished.returncode == 0, finished.stderr
    shown = finished.stdout.decode()
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\r"):
        assert raw not in shown
    for escaped in ("\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mready\\x1b[0m", "\\x1b]52;c;", "\\u202e"):
        assert escaped in shown
    assert "a\\rb\\u202ec\\x9bd\\nline" in shown


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
@pytest.mark.parametrize("json_output", [True, False])
def test_a_signal_while_status_waits_for_its_answer_is_refused_cancelled(
    tmp_path: Path, signum: signal.Signals, json_output: bool
) -> None:
    # Whatever answers at a --url may take its time (up to the 5 s deadline); Ctrl-C, or a
    # parent's SIGTERM, meanwhile: exit 1 with cancelled (one JSON object with --json), not
    # exit 130 with nothing printed, nor death by the signal.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    options = ["--url", url, "--token-file", str(token_file)]
    if json_output:
        options.append("--json")
    process = subprocess.Popen(
        [sys.executable, "-m", "companion_runtime.cli", "status", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        connection, _ = listener.accept()  # asked: now it waits for the answer
        with connection:
            connection.settimeout(30)
            assert connection.recv(65536).startswith(b"GET /_status ")
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=2)
    finally:
        listener.close()
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    if json_output:
        assert process.returncode == 1, stderr
        assert json.loads(stdout) == {"ok": False, "reason": "cancelled"}
        assert "Traceback" not in stderr
    else:
        assert_refused(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            "cancelled",
            json_output=False,
        )


def test_signals_until_it_exits_never_end_status_by_their_default_action(tmp_path: Path) -> None:
    # As for verify: once the wait for the answer had stopped, a second signal found the
    # default handlers back and status died by it (or with a KeyboardInterrupt). SIGINT,
    # SIGTERM and SIGHUP in turn every half millisecond, from the first until it has exited.
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    for run_index in range(6):
        json_output = run_index % 2 == 0
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        options = ["--url", url, "--token-file", str(token_file)]
        if json_output:
            options.append("--json")
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "status", *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(30)
                assert connection.recv(65536).startswith(b"GET /_status ")
                sent = flood_until_exit(process)
                stdout, stderr = process.communicate(timeout=30)
        finally:
            listener.close()
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        assert process.returncode == 1, (run_index, process.returncode, sent, stderr[-2000:])
        assert "Traceback" not in stderr and "Aborted" not in stderr
        if json_output:
            assert stdout.count("\n") == 1
            assert json.loads(stdout) == {"ok": False, "reason": "cancelled"}
        else:
            assert stdout == ""
            assert stderr.strip() == "refused: cancelled"


@pytest.mark.security
@pytest.mark.skipif(
    os.geteuid() != 0 or not CAN_DROP_FILE_OVERRIDE,
    reason="needs root and setpriv to drop root's power to read any file",
)
def test_a_token_file_that_cannot_be_read_is_refused_without_its_path(tmp_path: Path) -> None:
    # click's own check of --token-file had ended status with a usage error printing the path.
    token_file = tmp_path / "front.token"
    token_file.write_text("t" * 43 + "\n")
    token_file.chmod(0)
    result = run_cli_without_file_override(
        ["status", "--url", "http://127.0.0.1:9", "--token-file", str(token_file), "--json"]
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["reason"] == "store_error"
    assert str(tmp_path) not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "content",
    [b"tok\x00en-token-token", "tokén-token-token".encode(), b"tok\x1b[31men-token-token"],
    ids=["nul", "non-ascii", "escape"],
)
def test_a_token_file_holding_no_header_token_is_refused_before_anything_is_sent(
    tmp_path: Path, content: bytes
) -> None:
    # A NUL or a letter outside ASCII had the HTTP client refuse the header after connecting,
    # reported as upstream_error, as if the front door had answered wrongly; an escape sequence
    # was sent as it is. serve's own tokens are URL-safe base64.
    token_file = tmp_path / "front.token"
    token_file.write_bytes(content + b"\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = run_status(
            "--url", url, "--token-file", str(token_file), "--json", state_dir=tmp_path / "state"
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert_refused(result, "store_error", json_output=True)
    assert str(tmp_path) not in result.stdout + result.stderr
