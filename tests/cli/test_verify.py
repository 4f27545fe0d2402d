"""`companion-runtime verify` run as a real child process."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.https import model_bytes
from tests.support.signals import flood_until_exit
from tests.support.unreadable import CAN_DROP_FILE_OVERRIDE, run_cli_without_file_override

DATA, DIGEST = model_bytes(100_000, seed=3)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(DATA)
    return path


@pytest.mark.e2e
def test_verified_file_exits_0(model: Path) -> None:
    result = run(str(model), "--sha256", DIGEST, "--size", str(len(DATA)), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"ok": True, "reason": "ok"}
    plain = run(str(model), "--sha256", DIGEST, "--size", str(len(DATA)))
    assert plain.returncode == 0 and plain.stdout.strip() == "ok"
    # Piped stderr: no progress bar.
    assert plain.stderr == ""


@pytest.mark.e2e
@pytest.mark.data_integrity
@pytest.mark.parametrize(
    ("mutate", "size_delta", "reason"),
    [
        ("flip", 0, "digest_mismatch"),
        ("none", 1, "size_mismatch"),
        ("delete", 0, "file_not_found"),
    ],
)
def test_refusals_exit_1_with_the_reason(
    model: Path, mutate: str, size_delta: int, reason: str
) -> None:
    if mutate == "flip":
        data = bytearray(DATA)
        data[-1] ^= 1
        model.write_bytes(data)
    elif mutate == "delete":
        model.unlink()
    args = (str(model), "--sha256", DIGEST, "--size", str(len(DATA) + size_delta))
    result = run(*args, "--json")
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"ok": False, "reason": reason}
    plain = run(*args)
    assert plain.returncode == 1
    assert plain.stdout == ""
    assert plain.stderr.strip() == f"refused: {reason}"
    for text in (result.stdout, result.stderr, plain.stderr):
        assert DIGEST not in text and str(model) not in text


def run_on_a_terminal(*args: str) -> tuple[int, bytes]:
    """Run verify with stderr on a pseudo-terminal (so it draws its progress bar)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "verify", *args],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env={**os.environ, "COLUMNS": "100", "TERM": "xterm"},
        )
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        returncode = process.wait(60)
        assert process.stdout is not None
        process.stdout.close()
    finally:
        os.close(controller)
    return returncode, seen


@pytest.mark.e2e
@pytest.mark.parametrize("size", [str(10**400), str(2**63), "-1"])
def test_a_size_no_file_can_have_is_refused_on_a_terminal_too(model: Path, size: str) -> None:
    # Far past any file size: the progress bar must not turn it into a float and fail; the
    # answer is the refusal, as it is without a terminal.
    returncode, seen = run_on_a_terminal(str(model), "--sha256", DIGEST, "--size", size)
    assert returncode == 1
    assert b"Traceback" not in seen
    assert b"refused: " in seen


@pytest.mark.e2e
def test_malformed_digest_is_refused(model: Path) -> None:
    result = run(str(model), "--sha256", DIGEST.upper(), "--size", str(len(DATA)), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["reason"] == "malformed_spec"
    assert DIGEST.upper() not in result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [
        ("--sha256", DIGEST, "--size", "lots"),
        ("--size", "10"),
        ("--sha256", DIGEST),
    ],
)
def test_usage_errors_exit_2(model: Path, args: tuple[str, ...]) -> None:
    assert run(str(model), *args).returncode == 2


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["verify", "pull", "serve", "status", "demo"])
def test_a_usage_error_is_one_error_line_whatever_the_terminal_width(command: str) -> None:
    # A parent app or a script reads the reason from stderr: one "Error: ..." line, not a
    # box drawn to the terminal's width with the message wrapped inside it.
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", command, "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "30"},
    )
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if "rror" in line]
    assert errors == ["Error: No such option: --no-such-option"], finished.stderr


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open (it is reading it)."""
    try:
        for descriptor in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") == str(path):
                    return True
    except OSError:
        pass
    return False


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
@pytest.mark.parametrize("json_output", [True, False])
def test_a_signal_while_hashing_is_refused_cancelled(
    tmp_path: Path, signum: signal.Signals, json_output: bool
) -> None:
    # Ctrl-C, or a parent's SIGTERM, while a large model is re-hashed: exit 1 with the
    # reason (one JSON object with --json), as pull does; not exit 130 with nothing printed,
    # nor death by the signal.
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(64 * 1024**3)  # sparse: minutes of hashing, no disk space
    flags = ["--json"] if json_output else []
    expected = ("--sha256", DIGEST, "--size", str(64 * 1024**3))
    process = subprocess.Popen(
        [sys.executable, "-m", "companion_runtime.cli", "verify", str(big), *expected, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _has_open(process.pid, big):
            assert process.poll() is None and time.monotonic() < deadline, "never read the file"
            time.sleep(0.01)
        sent = time.monotonic()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 1, stderr
    assert elapsed < 5
    assert "Traceback" not in stderr
    if json_output:
        assert json.loads(stdout) == {"ok": False, "reason": "cancelled"}
    else:
        assert stdout == ""
        assert stderr.strip() == "refused: cancelled"


@pytest.mark.e2e
def test_signals_until_it_exits_never_end_verify_by_their_default_action(tmp_path: Path) -> None:
    # A second signal about 2 ms after the first found the default handlers back once the
    # hashing had stopped: verify died by it (about 1 run in 10), its JSON object written or
    # not, or a SIGINT's KeyboardInterrupt ended it. Here SIGINT, SIGTERM and SIGHUP come in
    # turn every half millisecond from the first until the process has exited, so every
    # moment of the cancel, the result and the exit gets one; in each run: exit 1, cancelled,
    # one JSON object with --json.
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(64 * 1024**3)
    expected = ("--sha256", DIGEST, "--size", str(64 * 1024**3))
    for run_index in range(8):
        json_output = run_index % 2 == 0
        flags = ["--json"] if json_output else []
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "verify", str(big), *expected, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _has_open(process.pid, big):
                assert process.poll() is None and time.monotonic() < deadline, "never read it"
                time.sleep(0.005)
            sent = flood_until_exit(process)
            stdout, stderr = process.communicate(timeout=30)
        finally:
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


@pytest.mark.e2e
def test_signals_in_quick_succession_never_hang_the_cancel(tmp_path: Path) -> None:
    # A signal that came while the handler was inside Event.set() ran the handler again inside
    # it, and the nested set() waited forever for the lock the outer one held: verify, pull,
    # status or the demo hung until SIGKILL. Here a second process sends SIGHUP after SIGHUP
    # while the handlers that verify, pull and status use are in place.
    script = tmp_path / "flood.py"
    script.write_text(
        "import os, signal, subprocess, sys, threading\n"
        "from companion_runtime.cli import _cancel_on_signals\n"
        "cancel = threading.Event()\n"
        "with _cancel_on_signals(cancel):\n"
        "    shooter = subprocess.Popen([sys.executable, '-c', 'import os, signal\\n'\n"
        "        f'for _ in range(20000): os.kill({os.getpid()}, signal.SIGHUP)'])\n"
        "    while shooter.poll() is None:\n"
        "        cancel.is_set()\n"
        "print(cancel.is_set(), shooter.returncode)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(3):
        finished = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
        )
        assert (finished.returncode, finished.stdout) == (0, "True 0\n"), finished.stderr


@pytest.mark.e2e
@pytest.mark.security
@pytest.mark.skipif(
    os.geteuid() != 0 or not CAN_DROP_FILE_OVERRIDE,
    reason="needs root and setpriv to drop root's power to read any file",
)
def test_a_file_that_cannot_be_read_is_refused_without_its_path(tmp_path: Path) -> None:
    # click's own check of the argument had ended verify with a usage error that printed the
    # path; the file is there, so it is no missing file either.
    model = tmp_path / "model.bin"
    model.write_bytes(DATA)
    model.chmod(0)
    result = run_cli_without_file_override(
        ["verify", str(model), "--sha256", DIGEST, "--size", str(len(DATA)), "--json"]
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == {"ok": False, "reason": "store_error"}
    assert str(tmp_path) not in result.stdout + result.stderr
