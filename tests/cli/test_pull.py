"""`companion-runtime pull` as a real child process against a real loopback HTTPS origin.

Includes the two faults only a real process can show: a pull killed with SIGKILL mid-download
(the next pull resumes with Range), and two processes pulling the same model at once (one
body transfer).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from companion_runtime.bind.store import STORE_ENV_VAR, ModelStore
from tests.support.https import (
    Fault,
    FaultyOrigin,
    assert_no_leak,
    assert_nothing_published,
    body_requests,
    model_bytes,
    partial_size,
    secret_url,
)
from tests.support.signals import catches_termination_signals, flood_until_exit
from tests.support.unreadable import CAN_DROP_FILE_OVERRIDE, run_cli_without_file_override

SMALL, SMALL_DIGEST = model_bytes(200_000, seed=11)
# Larger than the 4 MiB receive buffer, so a killed pull has written some of it.
LARGE, LARGE_DIGEST = model_bytes(12 * 1024 * 1024, seed=12)


@pytest.fixture
def origin() -> Iterator[FaultyOrigin]:
    files = {"/small.bin": SMALL, "/flip.bin": SMALL, "/large.bin": LARGE}
    with FaultyOrigin(files, faults={"/flip.bin": Fault(kind="bitflip")}) as server:
        yield server


def write_manifest(
    tmp_path: Path, origin: FaultyOrigin, path: str, digest: str, size: int, **model: object
) -> Path:
    url = model.get("url", secret_url(origin, path))
    name = model.get("name", "test-model")
    manifest = tmp_path / "model.toml"
    manifest.write_text(
        f"""
[model]
name = "{name}"
url = "{url}"
sha256 = "{digest}"
size_bytes = {size}

[sources]
allow = ["{origin.base_url}"]

[runtime]
command = ["/bin/true"]
"""
    )
    return manifest


def command(manifest: Path, store: Path | None, origin: FaultyOrigin, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "companion_runtime.cli", "pull", str(manifest)]
    if store is not None:
        args += ["--store", str(store)]
    return [*args, "--ca-bundle", str(origin.ca_pem_path), *extra]


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.e2e
def test_pull_prints_one_json_object_with_the_path(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    result = run(command(manifest, tmp_path / "store", origin, "--json"))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    payload = json.loads(line)
    assert payload["ok"] is True and payload["reason"] == "ok"
    blob = Path(payload["path"])
    assert blob == ModelStore(tmp_path / "store").blob_path(SMALL_DIGEST)
    assert blob.read_bytes() == SMALL
    # Plain mode prints the path; piped stderr gets no progress bar.
    again = run(command(manifest, tmp_path / "store", origin))
    assert again.returncode == 0
    assert again.stdout.strip() == str(blob)
    assert again.stderr == ""
    assert len(body_requests(origin, "/small.bin")) == 1


@pytest.mark.e2e
def test_store_defaults_to_the_environment_variable(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    env = {**os.environ, STORE_ENV_VAR: str(tmp_path / "env-store")}
    result = run(command(manifest, None, origin, "--json"), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"].startswith(str(tmp_path / "env-store"))


@pytest.mark.e2e
@pytest.mark.security
@pytest.mark.parametrize("json_flag", [True, False])
def test_refused_pull_exits_1_and_leaks_nothing(
    origin: FaultyOrigin, tmp_path: Path, json_flag: bool
) -> None:
    manifest = write_manifest(tmp_path, origin, "/flip.bin", SMALL_DIGEST, len(SMALL))
    extra = ("--json",) if json_flag else ()
    result = run(command(manifest, tmp_path / "store", origin, *extra))
    assert result.returncode == 1
    if json_flag:
        (line,) = result.stdout.strip().splitlines()
        assert json.loads(line) == {"ok": False, "reason": "digest_mismatch"}
    else:
        assert result.stdout == ""
        assert "refused: digest_mismatch" in result.stderr
    assert_no_leak([result.stdout, result.stderr], SMALL_DIGEST)
    assert_nothing_published(ModelStore(tmp_path / "store"))


@pytest.mark.e2e
@pytest.mark.security
def test_manifest_problems(origin: FaultyOrigin, tmp_path: Path) -> None:
    store = tmp_path / "store"
    missing = run(command(tmp_path / "absent.toml", store, origin, "--json"))
    assert missing.returncode == 2
    assert "absent" not in missing.stderr
    bad_ca = run(
        [
            sys.executable,
            "-m",
            "companion_runtime.cli",
            "pull",
            str(tmp_path / "x.toml"),
            "--ca-bundle",
            str(tmp_path / "none.pem"),
        ]
    )
    assert bad_ca.returncode == 2

    outside = write_manifest(
        tmp_path,
        origin,
        "/small.bin",
        SMALL_DIGEST,
        len(SMALL),
        url="https://elsewhere.example/small.bin?token=tok-7f3a9c-SECRET-do-not-leak",
    )
    result = run(command(outside, store, origin, "--json"))
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "ok": False,
        "reason": "source_not_allowed",
        "field": "model.url",
    }
    assert_no_leak([result.stdout, result.stderr], SMALL_DIGEST)
    # Without --json the one line names the field too, never its value.
    result = run(command(outside, store, origin))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "refused: source_not_allowed (model.url)\n"
    assert origin.requests == []

    outside.write_text("[model\nname=")
    result = run(command(outside, store, origin, "--json"))
    assert result.returncode == 1
    assert json.loads(result.stdout)["reason"] == "malformed_manifest"

    # A name longer than the file system allows is a path that does not exist (usage, 2).
    too_long = tmp_path / ("m" * 300 + ".toml")
    assert run(command(too_long, store, origin, "--json")).returncode == 2
    result = run([*command(outside, store, origin, "--json")[:-3], "--ca-bundle", str(too_long)])
    assert result.returncode == 2


@pytest.mark.e2e
def test_a_store_under_the_home_of_no_user_is_refused(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    nobody = "~no-such-user-companion-runtime/models"
    result = run(command(manifest, Path(nobody), origin, "--json"))
    assert (result.returncode, result.stderr) == (1, "")
    assert json.loads(result.stdout) == {"ok": False, "reason": "store_error"}
    env = {**os.environ, STORE_ENV_VAR: nobody}
    result = run(command(manifest, None, origin, "--json"), env=env)
    assert (result.returncode, result.stderr) == (1, "")
    assert json.loads(result.stdout) == {"ok": False, "reason": "store_error"}
    assert origin.requests == []


def run_on_a_terminal(args: list[str]) -> tuple[int, bytes]:
    """Run ``args`` with stderr on a pseudo-terminal (so pull draws its progress bar)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            args,
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
def test_progress_bar_on_a_terminal(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE))
    returncode, seen = run_on_a_terminal(command(manifest, tmp_path / "store", origin))
    assert returncode == 0
    assert b"test-model" in seen
    assert LARGE_DIGEST.encode() not in seen and b"token=" not in seen


@pytest.mark.e2e
def test_a_model_name_that_looks_like_markup_is_shown_as_written(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # The name is the manifest author's text: on a terminal it is printed as is, not parsed
    # as rich markup (where "[/]" is an error and "[link=...]" a terminal hyperlink).
    name = "[/][link=https://evil.example/]m[/link]"
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE), name=name)
    returncode, seen = run_on_a_terminal(command(manifest, tmp_path / "store", origin))
    assert returncode == 0
    assert b"Traceback" not in seen
    assert b"[/][link=https://evil.example/]m" in seen
    assert b"\x1b]8;" not in seen  # no OSC 8 hyperlink


@pytest.mark.e2e
def test_a_size_no_file_can_have_is_refused_on_a_terminal_too(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # A manifest may promise any positive integer; one far past any file size is refused
    # (no disk has the room) and must not make the progress bar fail first.
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, 10**400)
    returncode, seen = run_on_a_terminal(command(manifest, tmp_path / "store", origin))
    assert returncode == 1
    assert b"Traceback" not in seen
    assert b"refused: insufficient_disk" in seen
    assert origin.requests == []


@pytest.mark.e2e
@pytest.mark.data_integrity
def test_pull_killed_mid_download_resumes_with_range(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE))
    store = ModelStore(tmp_path / "store")
    origin.chunk_delay_s = 0.03  # ~8 MiB/s: the kill lands mid-transfer
    process = subprocess.Popen(
        command(manifest, store.root, origin, "--json"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while partial_size(store, LARGE_DIGEST) < 4 * 1024 * 1024:
            assert process.poll() is None, "the pull finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    kept = partial_size(store, LARGE_DIGEST)
    assert 0 < kept < len(LARGE)
    assert not store.has_blob(LARGE_DIGEST)

    origin.chunk_delay_s = 0.0
    before = len(origin.requests)
    result = run(command(manifest, store.root, origin, "--json"))
    assert result.returncode == 0, result.stderr
    assert Path(json.loads(result.stdout)["path"]).read_bytes() == LARGE
    (resumed,) = origin.requests[before:]
    assert resumed.range_header == f"bytes={kept}-"
    assert resumed.status == 206
    assert resumed.bytes_sent == len(LARGE) - kept


@pytest.mark.e2e
@pytest.mark.data_integrity
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_pull_within_a_second_and_the_next_one_resumes(
    origin: FaultyOrigin, tmp_path: Path, signum: signal.Signals
) -> None:
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE))
    store = ModelStore(tmp_path / "store")
    origin.chunk_delay_s = 0.1  # 256 KiB every 0.1 s: the 12 MiB would take about 5 s
    process = subprocess.Popen(
        command(manifest, store.root, origin, "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while partial_size(store, LARGE_DIGEST) < 1024 * 1024:
            assert process.poll() is None, "the pull finished before the signal"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signum)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 1, stderr
    assert json.loads(stdout) == {"ok": False, "reason": "cancelled"}
    assert "Traceback" not in stderr
    assert elapsed < 2
    assert not store.has_blob(LARGE_DIGEST)
    kept = partial_size(store, LARGE_DIGEST)
    assert 0 < kept < len(LARGE)

    origin.chunk_delay_s = 0.0
    before = len(origin.requests)
    result = run(command(manifest, store.root, origin, "--json"))
    assert result.returncode == 0, result.stderr
    assert Path(json.loads(result.stdout)["path"]).read_bytes() == LARGE
    (resumed,) = origin.requests[before:]
    assert resumed.range_header == f"bytes={kept}-"
    assert resumed.bytes_sent == len(LARGE) - kept


@pytest.mark.e2e
@pytest.mark.data_integrity
def test_signals_until_it_exits_never_end_pull_by_their_default_action(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # As for verify: once the download had stopped, a second signal found the default handlers
    # back and the pull died by it (or with a KeyboardInterrupt), its JSON object written or
    # not. SIGINT, SIGTERM and SIGHUP in turn every half millisecond, from the first until it
    # has exited: exit 1, cancelled, one JSON object, nothing published, the partial kept.
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE))
    store = ModelStore(tmp_path / "store")
    origin.chunk_delay_s = 0.1
    for run_index in range(3):
        process = subprocess.Popen(
            command(manifest, store.root, origin, "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            # The first run waits for a partial; later ones for the handlers (it resumes).
            while not catches_termination_signals(process.pid) or (
                run_index == 0 and partial_size(store, LARGE_DIGEST) < 256 * 1024
            ):
                assert process.poll() is None, "the pull finished before the signal"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            sent = flood_until_exit(process)
            stdout, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
        assert process.returncode == 1, (run_index, process.returncode, sent, stderr[-2000:])
        assert "Traceback" not in stderr and "Aborted" not in stderr
        assert stdout.count("\n") == 1
        assert json.loads(stdout) == {"ok": False, "reason": "cancelled"}
        assert not store.has_blob(LARGE_DIGEST)
    assert 0 < partial_size(store, LARGE_DIGEST) < len(LARGE)


@pytest.mark.e2e
@pytest.mark.stress
def test_two_processes_download_once(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, origin, "/large.bin", LARGE_DIGEST, len(LARGE))
    store = tmp_path / "store"
    # ~2 s of transfer: far longer than interpreter start-up, so the two really contend.
    origin.chunk_delay_s = 0.04
    processes = [
        subprocess.Popen(
            command(manifest, store, origin, "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    paths = {json.loads(stdout)["path"] for stdout, _ in outputs}
    assert paths == {str(ModelStore(store).blob_path(LARGE_DIGEST))}
    assert len(body_requests(origin, "/large.bin")) == 1


@pytest.mark.e2e
def test_an_empty_store_is_a_usage_error(origin: FaultyOrigin, tmp_path: Path) -> None:
    # An empty --store was taken as the current directory, where blobs/, tmp/ and locks/ were
    # made. A store named by mistake (an unset shell variable, "--store $STORE") is refused.
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    for extra in ((), ("--json",)):
        result = run(command(manifest, None, origin, "--store", "", *extra), cwd=elsewhere)
        assert (result.returncode, result.stdout) == (2, "")
        assert "Invalid value for '--store': it is empty" in result.stderr
    assert list(elsewhere.iterdir()) == []
    assert origin.requests == []


@pytest.mark.e2e
def test_json_with_a_store_path_that_is_not_utf8_is_a_usage_error(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # JSON text is Unicode: such a path came out as a lone-surrogate escape ("\udcff"), which
    # most readers turn into another path or refuse. Refused before anything is fetched; the
    # plain output prints the path's bytes as they are.
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    store = Path(os.fsdecode(os.fsencode(tmp_path) + b"/store-\xff"))
    result = subprocess.run(command(manifest, store, origin, "--json"), capture_output=True)
    assert (result.returncode, result.stdout) == (2, b"")
    assert b"Error: --json cannot print a store path that is not valid UTF-8" in result.stderr
    assert b"\xff" not in result.stderr
    assert origin.requests == []
    result = subprocess.run(command(manifest, store, origin), capture_output=True)
    assert result.returncode == 0, result.stderr
    blob = ModelStore(store).blob_path(SMALL_DIGEST)
    assert result.stdout == os.fsencode(blob) + b"\n"
    assert blob.read_bytes() == SMALL


def utf8_locale_env() -> dict[str, str]:
    """The environment with standard streams as a UTF-8 locale such as en_US.UTF-8 gives
    Python: strict, refusing to encode a lone surrogate (under the C or C.UTF-8 locale they
    pass such bytes through). Set with PYTHONIOENCODING, as not every machine has a locale
    besides C."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONIOENCODING", "PYTHONUTF8") and not name.startswith("LC_")
    }
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    env["PYTHONIOENCODING"] = "utf-8"  # strict, as under en_US.UTF-8
    return env


@pytest.mark.e2e
def test_a_store_path_that_is_not_utf8_is_printed_as_its_bytes_under_a_utf8_locale(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # Printed as text, the path's lone surrogate could not be encoded: the pull ended with a
    # UnicodeEncodeError traceback and exit 1, after the model was downloaded and published.
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    store = Path(os.fsdecode(os.fsencode(tmp_path) + b"/store-\xff"))
    result = subprocess.run(
        command(manifest, store, origin), capture_output=True, env=utf8_locale_env(), timeout=120
    )
    assert b"Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    blob = ModelStore(store).blob_path(SMALL_DIGEST)
    assert result.stdout == os.fsencode(blob) + b"\n"


@pytest.mark.e2e
@pytest.mark.security
@pytest.mark.skipif(
    os.geteuid() != 0 or not CAN_DROP_FILE_OVERRIDE,
    reason="needs root and setpriv to drop root's power to read any file",
)
@pytest.mark.parametrize("unreadable", ["manifest", "ca-bundle"])
def test_a_manifest_or_bundle_that_cannot_be_read_is_refused_without_its_path(
    origin: FaultyOrigin, tmp_path: Path, unreadable: str
) -> None:
    # click's own check of the argument had ended the command with a usage error that printed
    # the path. The manifest is refused as any unreadable manifest is, the bundle as any CA
    # bundle that cannot be used, before any request.
    manifest = write_manifest(tmp_path, origin, "/small.bin", SMALL_DIGEST, len(SMALL))
    bundle = tmp_path / "ca.pem"
    shutil.copyfile(origin.ca_pem_path, bundle)
    (manifest if unreadable == "manifest" else bundle).chmod(0)
    result = run_cli_without_file_override(
        [
            *("pull", str(manifest), "--store", str(tmp_path / "store")),
            *("--ca-bundle", str(bundle), "--json"),
        ]
    )
    assert result.returncode == 1, result.stderr
    reason = "file_not_found" if unreadable == "manifest" else "tls_error"
    assert json.loads(result.stdout)["reason"] == reason
    assert str(tmp_path) not in result.stdout + result.stderr
    assert not body_requests(origin, "/small.bin")
