"""`companion-runtime verify` run as a real child process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.https import model_bytes

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
