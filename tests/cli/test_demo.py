"""`companion-runtime demo` end to end, as a real subprocess."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from companion_runtime.bind.llama_server import llama_available
from tests.support.signals import catches_termination_signals, flood_until_exit

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_demo_runs_end_to_end_and_exits_0() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for shown in ("digest_mismatch", "nothing stored", "queue_full", "gone"):
        assert shown in finished.stdout


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_a_temporary_directory_others_may_write_is_refused_with_the_rule_it_breaks(
    tmp_path: Path,
) -> None:
    # The demo's store lies in the temporary directory: a TMPDIR others may write (a shared
    # group's, under umask 002) had ended the demo with a bare "pull refused: store_error",
    # which named neither the directory nor the rule, beside a runtime "STILL THERE" that
    # had never been started.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    scratch.chmod(0o777)
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch), "COLUMNS": "400"},
    )
    assert finished.returncode == 1
    assert "pull refused: store_error" in finished.stdout
    assert "temporary directory (TMPDIR)" in finished.stdout
    # Nor had it a runtime to stop, which the report had called still there.
    assert "never started" in finished.stdout and "STILL THERE" not in finished.stdout
    assert str(scratch) not in finished.stdout + finished.stderr
    assert list(scratch.iterdir()) == []


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
@pytest.mark.parametrize("step", ["pull a tampered copy", "send a burst"])
def test_a_signal_stops_the_demo_and_leaves_nothing_behind(
    tmp_path: Path, signum: signal.Signals, step: str
) -> None:
    # Closing the terminal or a parent's SIGTERM mid-demo: the runtime, the temporary store,
    # the front door's token file and the runtime's API key must all be gone afterwards.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if step in line:
                break
        started = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signum)
        _rest, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert list(scratch.iterdir()) == []
    assert process.returncode == 1, stderr[-3000:]
    assert stderr.strip().endswith("refused: cancelled"), stderr[-3000:]
    assert "Traceback" not in stderr
    for child in started:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def _import_check_of(demo: psutil.Process) -> psutil.Process | None:
    """The demo's child that tries ``import xllamacpp``, before its event loop runs."""
    try:
        for child in demo.children():
            if "import xllamacpp" in child.cmdline():
                return child
    except psutil.Error:
        pass
    return None


def _signal_bits(pid: int) -> int:
    """The signals ``pid`` catches (SigCgt in /proc), as a bit mask; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _assert_cancelled(process: subprocess.Popen[str], scratch: Path) -> str:
    """Exit 1 cancelled, nothing left in ``scratch``; what the demo printed on stdout."""
    stdout, stderr = process.communicate(timeout=30)
    # Never the signal's default action (death by it, or a KeyboardInterrupt's "Aborted!").
    assert process.returncode == 1, stderr[-3000:]
    assert stderr.strip().endswith("refused: cancelled"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert list(scratch.iterdir()) == []
    return stdout


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_signal_before_the_demo_s_event_loop_runs_cancels_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # The signal lands while the demo checks, in a child interpreter, that xllamacpp imports:
    # before its event loop and its handlers exist (the signal's default action ended the demo
    # there). The demo's own handlers from its very start record it; the check's child is
    # stopped and the demo exits 1 cancelled. The check lives about 0.15 s: should this test
    # not see it before the demo's first temporary directory appears, it tries again.
    for attempt in range(3):
        scratch = tmp_path / f"tmp-{attempt}"
        scratch.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        try:
            demo = psutil.Process(process.pid)
            deadline = time.monotonic() + 60
            while (check := _import_check_of(demo)) is None and not any(scratch.iterdir()):
                assert process.poll() is None and time.monotonic() < deadline, "no import check"
                time.sleep(0.002)
            if check is None:
                continue  # missed: the demo's event loop runs already
            process.send_signal(signum)
            stdout = _assert_cancelled(process, scratch)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        assert not check.is_running() or check.status() == psutil.STATUS_ZOMBIE
        assert "pull a tampered copy" not in stdout  # nothing started after the signal
        return
    pytest.fail("the import check was never seen running")


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_signal_as_soon_as_the_demo_handles_one_cancels_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # The earliest moment the process catches SIGTERM and SIGHUP (/proc shows it): the first
    # thing the demo command does, before it imports the demo. Sent then, in five trials,
    # every signal ends in exit 1 cancelled, never in its default action.
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    for trial in range(5):
        scratch = tmp_path / f"tmp-{trial}"
        scratch.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        try:
            deadline = time.monotonic() + 60
            while _signal_bits(process.pid) & wanted != wanted:
                assert process.poll() is None and time.monotonic() < deadline, "never caught"
                time.sleep(0.001)
            process.send_signal(signum)
            _assert_cancelled(process, scratch)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
@pytest.mark.parametrize("step", [None, "pull a tampered copy"], ids=["at-once", "mid-demo"])
def test_signals_until_it_exits_never_end_the_demo_by_their_default_action(
    tmp_path: Path, step: str | None
) -> None:
    # As for verify: a second signal just after the first found the default handlers back
    # once the demo had stopped (its cleanup, its last line, the exit) and ended it by that
    # signal. SIGINT, SIGTERM and SIGHUP in turn every half millisecond, from as soon as the
    # demo catches them (or from a step mid-demo, its event loop's handlers in place) until
    # it has exited: exit 1 cancelled, nothing left behind.
    for trial in range(2):
        scratch = tmp_path / f"tmp-{trial}"
        scratch.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-m", "companion_runtime.cli", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
        try:
            if step is None:
                deadline = time.monotonic() + 60
                while not catches_termination_signals(process.pid):
                    assert process.poll() is None and time.monotonic() < deadline, "not caught"
                    time.sleep(0.001)
            else:
                assert process.stdout is not None
                for line in process.stdout:
                    if step in line:
                        break
            sent = flood_until_exit(process)
            _assert_cancelled(process, scratch)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        assert sent > 0


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_a_standard_output_that_cannot_be_written_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    # stdout on a full disk: the demo stops, says why on stderr and leaves nothing behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with open("/dev/full", "w") as full:
        finished = subprocess.run(
            [sys.executable, "-m", "companion_runtime.cli", "demo"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert finished.stderr.splitlines() == ["demo failed: No space left on device"]
    assert list(scratch.iterdir()) == []


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_a_standard_output_nobody_reads_is_one_line_not_a_silent_exit(tmp_path: Path) -> None:
    # `demo | head -1`: the reader is gone. rich's own answer (exit 1 with nothing said) left
    # the user guessing; the demo stops, says why on stderr and leaves nothing behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "companion_runtime.cli", "demo"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
    finally:
        os.close(write_end)
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert finished.stderr.splitlines() == ["demo failed: Broken pipe"]
    assert list(scratch.iterdir()) == []


def _open_files_limit(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` setting the child's open-file limits (``hard``: unchanged if None)."""

    def limit() -> None:
        current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, current_hard if hard is None else hard))

    return limit


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_a_low_soft_open_file_limit_does_not_fail_the_demo(tmp_path: Path) -> None:
    # A soft limit of 128 (the hard one higher, as usual): the demo's own burst, origin and
    # runtime connections left the front door room for a connection or two, and the burst
    # ended in a traceback (httpx.ReadError). Like serve, the demo raises its soft limit.
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:
        pytest.skip("needs a hard open-file limit of at least 4096")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
        preexec_fn=_open_files_limit(128),
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "queue_full" in finished.stdout
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("limit", [16, 20, 63])
def test_an_open_file_limit_too_low_to_raise_is_one_line_and_leaves_nothing_behind(
    tmp_path: Path, limit: int
) -> None:
    # ulimit -n 20 (soft and hard): a step ran out of open files, and so did the removal of
    # the demo's temporary directory, which stayed behind with the store, a lock and the state
    # directory in it (lower still, a traceback from the event loop). The demo now refuses to
    # start below 64: one line, exit 1, nothing created.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
        preexec_fn=_open_files_limit(limit, limit),
    )
    assert finished.returncode == 1, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert finished.stdout == ""
    assert finished.stderr.splitlines() == [
        f"demo failed: the open-file limit is {limit}; the demo needs at least 64 (ulimit -n 64)"
    ]
    assert list(scratch.iterdir()) == []


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_an_open_file_limit_of_64_runs_the_demo_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    # At the floor the demo runs: every step ends in its own result (the burst may fail for
    # want of connections, a step failure), never a traceback, and nothing stays behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
        preexec_fn=_open_files_limit(64, 64),
    )
    assert "Traceback" not in finished.stderr
    assert finished.returncode in (0, 1), finished.stderr[-3000:]
    assert "companion-runtime demo" in finished.stdout  # the report: it ran to its end
    assert list(scratch.iterdir()) == []


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_a_burst_that_fails_is_a_step_failure_not_a_traceback(tmp_path: Path) -> None:
    # A hard limit of 128 too: nothing to raise, and the front door must turn connections
    # away. The demo says the burst failed, exits 1 and leaves nothing behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
        preexec_fn=_open_files_limit(128, 128),
    )
    assert "Traceback" not in finished.stderr
    assert finished.returncode in (0, 1), finished.stderr[-3000:]
    if finished.returncode == 1:
        assert "burst failed" in finished.stdout, finished.stdout[-3000:]
    assert list(scratch.iterdir()) == []


@pytest.mark.security
@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_an_xllamacpp_py_in_the_working_directory_is_never_run(tmp_path: Path) -> None:
    # A shared directory (/tmp, Downloads) where someone left an xllamacpp.py: neither the
    # import check nor the runtime the demo starts may pick it up instead of the package.
    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / "xllamacpp.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=planted,
    )
    assert not marker.exists()
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


# --- without the llama extra --------------------------------------------------------------

INSTALL_COMMAND = "pip install 'companion-runtime[llama]'"


def _demo_without_xllamacpp(
    prelude: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = f"{prelude}\nimport sys\nsys.argv = ['companion-runtime', 'demo']\n"
    script += "from companion_runtime.cli import main\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _assert_names_the_install_command(finished: subprocess.CompletedProcess[str]) -> None:
    assert finished.returncode == 1, finished.stdout[-3000:] + finished.stderr[-3000:]
    output = finished.stdout + finished.stderr
    # Whole, on one line: not split by wrapping, "[llama]" not taken for markup.
    assert any(INSTALL_COMMAND in line for line in output.splitlines()), output
    assert "Traceback" not in output
    # Refused before anything started: no burst, no report.
    assert "queue_full" not in output


def test_demo_without_the_llama_extra_names_the_install_command() -> None:
    # As if the package were not installed: the import system finds nothing for it.
    finished = _demo_without_xllamacpp("import sys\nsys.modules['xllamacpp'] = None")
    _assert_names_the_install_command(finished)


def test_demo_with_an_xllamacpp_that_cannot_be_imported_names_the_install_command(
    tmp_path: Path,
) -> None:
    # Present but broken (e.g. a partial install): it is found, yet importing it fails.
    (tmp_path / "xllamacpp.py").write_text("raise ImportError('native library missing')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    finished = _demo_without_xllamacpp("", env=env)
    _assert_names_the_install_command(finished)
