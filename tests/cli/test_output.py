"""A result that cannot be written: `verify`, `pull` and `status` with stdout on a full disk or
a pipe whose reader is gone, as real child processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

DATA = b"a file to verify\n"
DIGEST = hashlib.sha256(DATA).hexdigest()

#: What each failed write says on stderr, and nothing else.
NO_SPACE = "could not write the result: No space left on device"
BROKEN_PIPE = "could not write the result: Broken pipe"


def _verify(tmp_path: Path) -> list[str]:
    model = tmp_path / "model.bin"
    model.write_bytes(DATA)
    return ["verify", str(model), "--sha256", DIGEST, "--size", str(len(DATA))]


def _pull(tmp_path: Path) -> list[str]:
    # Refused from the manifest alone (its source is not allowed): nothing is contacted.
    manifest = tmp_path / "model.toml"
    manifest.write_text(
        f"""
[model]
name = "m"
url = "https://models.example.net/m.bin"
sha256 = "{DIGEST}"
size_bytes = {len(DATA)}

[sources]
allow = ["https://models.example.com/"]

[runtime]
command = ["/bin/true", "{{port}}"]
"""
    )
    return ["pull", str(manifest), "--store", str(tmp_path / "store")]


def _status(tmp_path: Path) -> list[str]:
    # No serve recorded its state there: refused file_not_found.
    return ["status"]


COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "verify": _verify,
    "pull": _pull,
    "status": _status,
}


def _run(tmp_path: Path, arguments: list[str], stdout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", *arguments],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env={**os.environ, "COMPANION_RUNTIME_STATE_DIR": str(tmp_path / "state")},
    )


def _assert_one_line(finished: subprocess.CompletedProcess[str], line: str) -> None:
    assert finished.returncode == 1, finished.stderr
    # One line, no traceback, no "Exception ignored" from the flush at exit.
    assert finished.stderr.splitlines() == [line], finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("verify", ["--json"]),
        ("verify", []),  # the plain "ok" line on stdout
        ("pull", ["--json"]),
        ("status", ["--json"]),
    ],
    ids=["verify-json", "verify-plain", "pull-json", "status-json"],
)
def test_a_result_written_to_a_full_disk_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, command: str, flags: list[str]
) -> None:
    arguments = [*COMMANDS[command](tmp_path), *flags]
    with open("/dev/full", "wb") as full:
        finished = _run(tmp_path, arguments, full.fileno())
    _assert_one_line(finished, NO_SPACE)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_result_written_to_a_pipe_nobody_reads_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, command: str
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = _run(tmp_path, [*COMMANDS[command](tmp_path), "--json"], write_end)
    finally:
        os.close(write_end)
    _assert_one_line(finished, BROKEN_PIPE)


@pytest.mark.parametrize(
    "arguments",
    [["--help"], ["verify", "--help"], ["demo", "--help"]],
    ids=["app", "verify", "demo"],
)
def test_help_written_to_a_full_disk_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, arguments: list[str]
) -> None:
    # click's help text had ended the command with a traceback.
    with open("/dev/full", "wb") as full:
        finished = _run(tmp_path, arguments, full.fileno())
    _assert_one_line(finished, "could not write the output: No space left on device")


@pytest.mark.parametrize(
    "arguments",
    [
        ["verify"],  # click's own: a missing argument
        ["verify", "model.bin", "--sha256", "a", "--sha256", "b", "--size", "1"],  # ours
        ["serve", "no-such-manifest.toml"],  # serve's own check
    ],
    ids=["missing-argument", "option-given-twice", "serve-no-manifest"],
)
def test_a_usage_error_that_cannot_be_written_to_stderr_still_exits_2(
    tmp_path: Path, arguments: list[str]
) -> None:
    # It had exited 1, the code of a refusal, with a traceback nobody could see either.
    with open("/dev/full", "wb") as full:
        finished = subprocess.run(
            [sys.executable, "-m", "companion_runtime.cli", *arguments],
            stdout=subprocess.PIPE,
            stderr=full,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "COMPANION_RUNTIME_STATE_DIR": str(tmp_path / "state")},
        )
    assert (finished.returncode, finished.stdout) == (2, b"")


def test_a_refusal_that_cannot_be_written_to_stderr_still_exits_1(tmp_path: Path) -> None:
    # Nowhere left to say it: exit 1, and nothing written to stdout either.
    with open("/dev/full", "wb") as full:
        finished = subprocess.run(
            [sys.executable, "-m", "companion_runtime.cli", *_pull(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=full,
            timeout=60,
        )
    assert (finished.returncode, finished.stdout) == (1, b"")


@pytest.mark.parametrize("descriptor", [1, 2], ids=["stdout-closed", "stderr-closed"])
@pytest.mark.parametrize(
    ("command", "flags", "code"),
    [
        ("verify", [], 0),
        ("verify", ["--json"], 0),
        ("pull", [], 1),
        ("pull", ["--json"], 1),
        ("status", [], 1),
    ],
    ids=["verify-plain", "verify-json", "pull-plain", "pull-json", "status-plain"],
)
def test_a_command_started_with_its_output_closed_exits_with_its_verdict(
    tmp_path: Path, descriptor: int, command: str, flags: list[str], code: int
) -> None:
    # Closed as the interpreter starts, a stream is None in sys; the null device the CLI puts
    # in its place must stand behind the stream too, as it does for serve: the verdict is the
    # exit code, and no traceback (an AttributeError on None) takes its place.
    arguments = [sys.executable, "-m", "companion_runtime.cli", *COMMANDS[command](tmp_path)]
    finished = subprocess.run(
        ["/bin/sh", "-c", f'exec "$@" {descriptor}>&-', "sh", *arguments, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COMPANION_RUNTIME_STATE_DIR": str(tmp_path / "state")},
    )
    assert finished.returncode == code, finished.stderr
    assert "Traceback" not in finished.stdout + finished.stderr
    open_stream = finished.stderr if descriptor == 1 else finished.stdout
    if descriptor == 1 and code == 1 and not flags:
        assert open_stream.startswith("refused: "), open_stream
    elif descriptor == 1:
        assert open_stream == ""


class _StatusDocument(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        data = json.dumps({"state": "ready", "in_flight": 0}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.mark.parametrize("where", ["full-disk", "pipe-nobody-reads"])
def test_a_status_table_that_cannot_be_written_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, where: str
) -> None:
    # The table (no --json) is printed by rich, which answers a broken pipe with a silent
    # exit of its own: the line saying why must still be there.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusDocument)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    token_file = tmp_path / "frontdoor.token"
    token_file.write_text("T" * 43 + "\n")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    arguments = ["status", "--url", url, "--token-file", str(token_file)]
    try:
        if where == "full-disk":
            with open("/dev/full", "wb") as full:
                finished = _run(tmp_path, arguments, full.fileno())
        else:
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                finished = _run(tmp_path, arguments, write_end)
            finally:
                os.close(write_end)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    _assert_one_line(finished, NO_SPACE if where == "full-disk" else BROKEN_PIPE)
