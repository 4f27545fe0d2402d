"""Options of every command, as a real child process: one that takes a value is given once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.https import model_bytes

DATA, DIGEST = model_bytes(1_000, seed=5)
WRONG = "0" * 64


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Nothing is read from, or written to, the user's own state or store.
        env={
            **os.environ,
            "COMPANION_RUNTIME_STATE_DIR": str(tmp_path / "state"),
            "COMPANION_RUNTIME_STORE": str(tmp_path / "store"),
        },
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(DATA)
    return path


def repeated_options(model: Path) -> list[tuple[list[str], str, tuple[str, str]]]:
    """(arguments, the option given twice, its two values) for every value-taking option.

    The first value is the one a script wrote; the second, an override appended to it. Each
    command line is one whose last value alone would be accepted or refused with exit 1 (a
    MANIFEST that exists, here the model file, is no manifest), so exit 2 shows the repetition.
    """
    size = str(len(DATA))
    manifest = str(model)
    return [
        (
            ["verify", str(model), "--sha256", WRONG, "--size", size, "--sha256", DIGEST],
            "--sha256",
            (WRONG, DIGEST),
        ),
        (
            ["verify", str(model), f"--sha256={DIGEST}", "--size", "7", "--size=" + size],
            "--size",
            ("7", size),
        ),
        (
            ["pull", manifest, "--store", "store-one-x1", "--store", "store-two-x2"],
            "--store",
            ("store-one-x1", "store-two-x2"),
        ),
        (
            ["pull", manifest, "--ca-bundle", manifest, "--ca-bundle", manifest, "--json"],
            "--ca-bundle",
            (manifest, manifest),
        ),
        (
            ["serve", manifest, "--store", "store-one-x1", "--store=store-two-x2"],
            "--store",
            ("store-one-x1", "store-two-x2"),
        ),
        (
            ["serve", manifest, "--ca-bundle", manifest, "--ca-bundle", manifest],
            "--ca-bundle",
            (manifest, manifest),
        ),
        (
            ["serve", manifest, "--port", "40001", "--port", "40002", "--json"],
            "--port",
            ("40001", "40002"),
        ),
        (
            ["status", "--url", "http://127.0.0.1:40001", "--url", "http://127.0.0.1:40002"],
            "--url",
            ("127.0.0.1:40001", "127.0.0.1:40002"),
        ),
        (
            ["status", "--token-file", "token-one-x1", "--json", "--token-file", "token-two-x2"],
            "--token-file",
            ("token-one-x1", "token-two-x2"),
        ),
    ]


@pytest.mark.e2e
@pytest.mark.security
@pytest.mark.parametrize("case", range(9))
def test_a_value_taking_option_given_twice_is_a_usage_error_naming_it_not_its_values(
    tmp_path: Path, model: Path, case: int
) -> None:
    # click keeps the last value: "verify --sha256 WRONG ... --sha256 RIGHT" verified against
    # the appended digest, and exit 0 said the file was the one first written.
    arguments, option, values = repeated_options(model)[case]
    finished = run(tmp_path, *arguments)
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert finished.stdout == ""
    errors = [line for line in finished.stderr.splitlines() if line.strip()]
    assert errors == [f"Error: {option} is given more than once; give it once"]
    for value in values:
        assert value not in finished.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "state").exists()


def test_every_value_taking_option_is_covered(model: Path) -> None:
    from typer.core import TyperOption
    from typer.main import get_command

    from companion_runtime.cli import app

    group = get_command(app)
    options = {
        (name, option)
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for param in command.params
        if isinstance(param, TyperOption) and not param.is_flag
        for option in param.opts
    }
    covered = {(arguments[0], option) for arguments, option, _ in repeated_options(model)}
    assert options == covered
    assert len(repeated_options(model)) == 9


@pytest.mark.e2e
def test_a_flag_given_twice_asks_for_the_same_thing(tmp_path: Path, model: Path) -> None:
    finished = run(
        tmp_path,
        "verify",
        str(model),
        "--sha256",
        DIGEST,
        "--size",
        str(len(DATA)),
        "--json",
        "--json",
    )
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == {"ok": True, "reason": "ok"}


@pytest.mark.e2e
def test_help_answers_even_with_an_option_given_twice(tmp_path: Path) -> None:
    finished = run(tmp_path, "verify", "--sha256", "a", "--sha256", "b", "--help")
    assert finished.returncode == 0
    assert "--sha256" in finished.stdout


@pytest.mark.parametrize(
    ("command", "arguments"),
    [("verify", ["FILE"]), ("pull", ["MANIFEST"]), ("serve", ["MANIFEST"]), ("status", [])],
)
def test_usage_lines_name_their_arguments_in_upper_case(
    tmp_path: Path, command: str, arguments: list[str]
) -> None:
    # verify's usage line read "verify [OPTIONS] {file}", pull's and serve's "{manifest}": a
    # placeholder, not the FILE and MANIFEST their help text and the README speak of. In the
    # help's usage line, in its list of arguments, and in the error for a missing one.
    result = run(tmp_path, command, "--help")
    assert result.returncode == 0, result.stderr
    usage = result.stdout.splitlines()[0]
    assert usage.split(f" {command} ", 1)[1] == " ".join(["[OPTIONS]", *arguments]), usage
    listed = result.stdout.split("Arguments:", 1)[1].split("Options:", 1)[0] if arguments else ""
    for argument in arguments:
        assert listed.split()[0] == argument, listed
        missing = run(tmp_path, command)
        assert missing.returncode == 2
        assert f" {command} [OPTIONS] {argument}\n" in missing.stderr, missing.stderr
        assert f"Missing argument '{argument}'." in missing.stderr, missing.stderr
    assert "{" not in result.stdout.splitlines()[0]
