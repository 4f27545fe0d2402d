"""Spawning, stopping and containing real runtime processes (stand-in runtime and real children)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from companion_runtime.bind import process as process_module
from companion_runtime.bind.process import (
    LOOPBACK_HOST,
    OutputTail,
    ProcessError,
    StopOutcome,
    SubprocessLauncher,
    build_launch_spec,
    choose_loopback_port,
    scrub_environment,
)
from companion_runtime.core._reasons import Reason
from tests.support.supervision import (
    async_wait_for,
    llama_ready,
    process_gone,
    read_runtime_pid,
    real_runtime,
    standin_command,
    start_manager,
    wait_for,
)

pytestmark = pytest.mark.anyio

_PRINT_ENV = "import json, os, sys; print(json.dumps(dict(os.environ))); sys.stdout.flush()"


async def _wait_healthy(base_url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(base_url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("runtime never answered its health check")


# --- the command template ----------------------------------------------------------------


@pytest.mark.unit
def test_template_fills_only_the_three_placeholders() -> None:
    spec = build_launch_spec(
        [sys.executable, "-m", "{model_path}", "--host", "{host}", "--port", "{port}", "x{{y}}"],
        model_path="/models/m.gguf",
        port=4242,
    )
    assert spec.argv == (
        sys.executable,
        "-m",
        "/models/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "4242",
        "x{y}",
    )
    assert spec.host == LOOPBACK_HOST
    assert spec.base_url == "http://127.0.0.1:4242"


@pytest.mark.unit
def test_a_free_loopback_port_is_chosen_when_none_is_given() -> None:
    spec = build_launch_spec([sys.executable, "{port}"], model_path="m")
    assert 0 < spec.port < 65536
    assert spec.argv[1] == str(spec.port)
    assert choose_loopback_port() != 0


@pytest.mark.security
@pytest.mark.parametrize(
    "argument",
    [
        "{port.__class__}",
        "{model_path[0]}",
        "{port!r}",
        "{port:>10}",
        "{secret}",
        "{}",
        "{0}",
        "unbalanced{",
        "unbalanced}",
    ],
)
def test_any_other_placeholder_is_refused(argument: str) -> None:
    with pytest.raises(ProcessError) as caught:
        build_launch_spec([sys.executable, "{port}", argument], model_path="m")
    assert caught.value.reason is Reason.MALFORMED_SPEC
    assert str(caught.value) == "malformed_spec"


@pytest.mark.unit
def test_a_nul_in_an_argument_is_refused_before_anything_runs() -> None:
    # exec cannot carry it; without this check the launch raised a bare ValueError.
    for template, model in (
        ([sys.executable, "{port}", "a\0b"], "m"),
        ([sys.executable, "{port}", "{model_path}"], "m\0x"),
    ):
        with pytest.raises(ProcessError) as caught:
            build_launch_spec(template, model_path=model)
        assert caught.value.reason is Reason.MALFORMED_SPEC


@pytest.mark.security
def test_a_placeholder_in_the_executable_is_refused() -> None:
    with pytest.raises(ProcessError) as caught:
        build_launch_spec(["{model_path}", "{port}"], model_path=sys.executable)
    assert caught.value.reason is Reason.MALFORMED_SPEC


@pytest.mark.unit
@pytest.mark.parametrize("template", [[], "python {port}", [sys.executable, 7], [sys.executable]])
def test_malformed_templates_are_refused(template: object) -> None:
    with pytest.raises(ProcessError) as caught:
        build_launch_spec(template, model_path="m")  # type: ignore[arg-type]
    assert caught.value.reason is Reason.MALFORMED_SPEC


@pytest.mark.unit
@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_a_bad_explicit_port_is_refused(port: object) -> None:
    with pytest.raises(ProcessError):
        build_launch_spec([sys.executable, "{port}"], model_path="m", port=port)  # type: ignore[arg-type]


@pytest.mark.security
def test_the_executable_must_be_an_absolute_path_to_an_executable_file(tmp_path: Path) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(stat.S_IRUSR | stat.S_IWUSR)
    for executable in ["python3", "./python3", str(tmp_path), str(tmp_path / "absent"), str(plain)]:
        with pytest.raises(ProcessError) as caught:
            build_launch_spec([executable, "{port}"], model_path="m")
        assert caught.value.reason is Reason.EXECUTABLE_NOT_ALLOWED, executable


def _executable(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    path.chmod(0o755)
    return str(path)


@pytest.mark.security
def test_an_executable_exec_could_never_run_is_refused_from_its_first_bytes(
    tmp_path: Path,
) -> None:
    # Each passed the old check (an executable regular file) and failed only at spawn, after
    # serve had downloaded the model for it.
    not_executable = tmp_path / "not-executable-interpreter"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    cases = {
        "missing interpreter": b"#!/nonexistent/interpreter\necho\n",
        "missing interpreter, blanks and an argument": b"#! \t/nonexistent/sh -e\n",
        "interpreter not executable": f"#!{not_executable}\n".encode(),
        "interpreter a directory": f"#!{tmp_path}\n".encode(),
        "relative interpreter": b"#!python3\nprint()\n",
        "no interpreter": b"#!\n",
        "CRLF line (the interpreter is '/bin/sh\\r')": b"#!/bin/sh\r\necho\r\n",
    }
    if sys.platform.startswith("linux"):
        cases |= {
            "no #! and not ELF": b"echo hello\n",
            "garbage": b"\x00\x01\x02 not a program",
            "empty": b"",
        }
    for name, content in cases.items():
        executable = _executable(tmp_path / "runtime", content)
        with pytest.raises(ProcessError) as caught:
            build_launch_spec([executable, "{port}"], model_path="m")
        assert caught.value.reason is Reason.EXECUTABLE_NOT_ALLOWED, name
        assert str(caught.value) == "executable_not_allowed"


@pytest.mark.unit
def test_executables_exec_can_run_pass_the_check(tmp_path: Path) -> None:
    # env's own argument is not looked up: exec runs env, and env finds python3 on PATH.
    for content in (
        b"#!/bin/sh\nexit 0\n",
        b"#! /bin/sh -e\nexit 0\n",
        b"#!/usr/bin/env python3\n",
        f"#!{sys.executable}\n".encode(),
        Path("/bin/true").read_bytes()[:4096],  # ELF on Linux
    ):
        executable = _executable(tmp_path / "runtime", content)
        assert build_launch_spec([executable, "{port}"], model_path="m").argv[0] == executable
    # Through a symlink, as exec follows it (a virtualenv's python is one).
    link = tmp_path / "python"
    link.symlink_to(sys.executable)
    assert build_launch_spec([str(link), "{port}"], model_path="m").argv[0] == str(link)


def _runs(executable: str) -> bool:
    """Whether exec runs ``executable`` (and it exits 0), asked of the kernel itself, from a
    working directory of its own (where no relative name resolves)."""
    try:
        finished = subprocess.run(
            [executable], capture_output=True, timeout=30, cwd=Path(executable).parent
        )
        return finished.returncode == 0
    except OSError:
        return False


@pytest.mark.security
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's reading of #!")
def test_a_hash_bang_line_is_read_as_the_kernel_reads_it(tmp_path: Path) -> None:
    # The kernel reads the first 256 bytes: the line ends at a newline before any NUL, the
    # interpreter's name at a blank or a NUL, and a name not ended within the buffer may have
    # been cut short, so it is refused even when the part that fits names a real file.
    padding = b"/" * 248  # "#!" and this and "bin/sh" fill the 256 bytes
    cases = {
        "a NUL ends the interpreter's name": (b"#!/bin/sh\0ignored\nexit 0\n", True),
        "a NUL before the newline, then a blank": (b"#!/bin/sh\0 x\nexit 0\n", True),
        "a name ended by a blank on the buffer's last byte": (
            b"#!" + padding[1:] + b"bin/sh \nexit 0\n",
            True,
        ),
        "a name cut short by the buffer": (b"#!" + padding + b"bin/shell\nexit 0\n", False),
        "a newline just past the buffer": (b"#!" + padding + b"bin/sh\nexit 0\n", False),
        "an interpreter with a trailing slash": (b"#!/bin/sh/\nexit 0\n", False),
    }
    for name, (content, runs) in cases.items():
        executable = _executable(tmp_path / "runtime", content)
        assert _runs(executable) is runs, name  # what the kernel says
        try:
            build_launch_spec([executable, "{port}"], model_path="m")
            accepted = True
        except ProcessError as error:
            assert error.reason is Reason.EXECUTABLE_NOT_ALLOWED
            accepted = False
        assert accepted is runs, name


def _program_interpreter(image: bytes) -> tuple[int, int]:
    """Where a 64-bit little-endian ELF image's ``PT_INTERP`` name lies: (offset, length)."""
    phoff = int.from_bytes(image[32:40], "little")
    phentsize = int.from_bytes(image[54:56], "little")
    phnum = int.from_bytes(image[56:58], "little")
    for index in range(phnum):
        header = image[phoff + index * phentsize : phoff + (index + 1) * phentsize]
        if int.from_bytes(header[0:4], "little") == 3:
            return int.from_bytes(header[8:16], "little"), int.from_bytes(header[32:40], "little")
    raise AssertionError("no PT_INTERP")


def _with_loader(image: bytes, loader: bytes) -> bytes:
    offset, length = _program_interpreter(image)
    assert len(loader) < length
    named = loader + b"\0" * (length - len(loader))
    return image[:offset] + named + image[offset + length :]


def _is_dynamic_elf64_le(path: Path) -> bool:
    try:
        image = path.read_bytes()
        _program_interpreter(image)
    except (OSError, AssertionError):
        return False
    return image[:6] == b"\x7fELF\x02\x01"


@pytest.mark.security
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _is_dynamic_elf64_le(Path("/bin/true"))),
    reason="a dynamically linked 64-bit little-endian /bin/true",
)
def test_an_elf_image_whose_loader_is_missing_is_refused(tmp_path: Path) -> None:
    # A binary built for another C library (a glibc build on Alpine, a musl one elsewhere)
    # names a dynamic loader that is not there: exec fails with ENOENT, after the download.
    image = Path("/bin/true").read_bytes()
    offset, length = _program_interpreter(image)
    loader = image[offset : offset + length].rstrip(b"\0")
    missing = _executable(tmp_path / "missing-loader", _with_loader(image, b"/lib/ld-gone.so.1"))
    relative = _executable(tmp_path / "relative-loader", _with_loader(image, loader[1:]))
    for executable in (missing, relative):
        assert not _runs(executable)
        with pytest.raises(ProcessError) as caught:
            build_launch_spec([executable, "{port}"], model_path="m")
        assert caught.value.reason is Reason.EXECUTABLE_NOT_ALLOWED, executable
    # The loader it names, through a symlink of another name: runs, and passes. (A short
    # name, to fit where the loader's own was.)
    short = Path(tempfile.mkdtemp(prefix="ld", dir="/tmp"))
    try:
        link = short / "l"
        link.symlink_to(os.fsdecode(loader))
        linked = _executable(tmp_path / "linked-loader", _with_loader(image, os.fsencode(link)))
        assert _runs(linked)
        assert build_launch_spec([linked, "{port}"], model_path="m").argv[0] == linked
    finally:
        shutil.rmtree(short)
    # Another machine's image is left to the kernel (binfmt_misc may run it, its loader
    # looked up under another root).
    foreign = bytearray(_with_loader(image, b"/lib/ld-gone.so.1"))
    aarch64, x86_64 = 183, 62
    machine = aarch64 if int.from_bytes(foreign[18:20], "little") != aarch64 else x86_64
    foreign[18:20] = machine.to_bytes(2, "little")
    other = _executable(tmp_path / "other-machine", bytes(foreign))
    assert build_launch_spec([other, "{port}"], model_path="m").argv[0] == other


#: The user a root-run test drops to (nobody), as root reads any file.
_OTHER_UID = 65534


@pytest.mark.unit
def test_an_execute_only_executable_is_left_to_the_kernel() -> None:
    # Its bytes cannot be read by this user, so nothing can be said of them before the spawn.
    directory = Path(tempfile.mkdtemp())
    try:
        directory.chmod(0o755)
        executable = _executable(directory / "runtime", b"\x00 unreadable")
        Path(executable).chmod(0o111)

        def check() -> str:
            try:
                return build_launch_spec([executable, "{port}"], model_path="m").argv[0]
            except ProcessError as error:
                return str(error)

        if os.geteuid() != 0:
            assert check() == executable
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(_OTHER_UID)
                os.setuid(_OTHER_UID)
                os.write(write_end, check().encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answer:
            assert answer.read() == executable
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(directory)


# --- the environment -----------------------------------------------------------------------


@pytest.mark.unit
def test_scrubbing_keeps_only_the_allowlist_and_the_extras() -> None:
    source = {
        "PATH": "/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "HOME": "/h",
        "TMPDIR": "/t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "LD_PRELOAD": "/evil.so",
        "PYTHONPATH": "/x",
    }
    assert scrub_environment(source, {"CUDA_VISIBLE_DEVICES": "0"}) == {
        "PATH": "/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "HOME": "/h",
        "TMPDIR": "/t",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    with pytest.raises(ProcessError):
        scrub_environment({}, {"A=B": "c"})
    for extra in ({"A": "b\0c"}, {"A\0B": "c"}):
        with pytest.raises(ProcessError) as caught:
            scrub_environment({}, extra)
        assert caught.value.reason is Reason.MALFORMED_SPEC


@pytest.mark.security
async def test_a_secret_in_the_managers_environment_does_not_reach_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMPANION_TEST_SECRET_TOKEN", "hunter2-very-secret")
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("LC_TIME", "C")
    spec = build_launch_spec(
        [sys.executable, "-c", _PRINT_ENV, "{port}"],
        model_path="m",
        extra_env={"RUNTIME_EXTRA": "1"},
    )
    async with SubprocessLauncher().launch(spec) as runtime:
        assert await asyncio.wait_for(runtime.wait(), 10) == 0
        await asyncio.sleep(0.05)
    child_env = json.loads(runtime.stdout_tail())
    assert "COMPANION_TEST_SECRET_TOKEN" not in child_env
    assert "hunter2-very-secret" not in runtime.stdout_tail().decode()
    assert "LD_PRELOAD" not in child_env
    assert child_env["LC_TIME"] == "C"
    assert child_env["RUNTIME_EXTRA"] == "1"
    assert child_env["PATH"] == os.environ["PATH"]
    # Python itself may add LC_CTYPE (locale coercion); nothing else beyond the allowlist.
    allowed = {"PATH", "LANG", "HOME", "TMPDIR", "RUNTIME_EXTRA"}
    assert {name for name in child_env if not name.startswith("LC_")} <= allowed


# --- process group, output, stop ---------------------------------------------------------


@pytest.mark.integration
async def test_the_runtime_leads_its_own_session_and_answers_on_loopback() -> None:
    spec = build_launch_spec(standin_command(), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        assert os.getpgid(runtime.pid) == runtime.pid
        assert os.getsid(runtime.pid) == runtime.pid
        assert os.getpgid(runtime.pid) != os.getpgid(0)
        # The PID we hold is the keeper's; the runtime is its one child, in its session but in
        # a process group of its own that it does not lead (what it sends its group never
        # reaches the keeper, and it may still make a session of its own).
        async with httpx.AsyncClient() as client:
            served_by = (await client.get(spec.base_url + "/pid")).json()["pid"]
        assert [child.pid for child in psutil.Process(runtime.pid).children()] == [served_by]
        assert os.getsid(served_by) == runtime.pid
        assert os.getpgid(served_by) not in (runtime.pid, served_by)
        connections = psutil.Process(served_by).net_connections(kind="tcp")
        listening = [c for c in connections if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    assert runtime.returncode is not None


@pytest.mark.integration
async def test_output_is_capped_and_drained_so_the_child_never_blocks() -> None:
    cap = 4096
    one_mib = 1024 * 1024
    spec = build_launch_spec(
        standin_command("--emit-stdout-bytes", str(one_mib)), model_path="m", output_cap_bytes=cap
    )
    async with SubprocessLauncher().launch(spec) as runtime:
        # A child blocked on a full 64 KiB pipe would never get to listening.
        await _wait_healthy(spec.base_url)
        tail = runtime.stdout_tail()
        assert len(tail) <= cap
        assert b"END-OF-OUTPUT" in tail
    assert len(runtime.stdout_tail()) <= cap


@pytest.mark.unit
def test_output_tail_keeps_the_last_bytes_and_counts_the_dropped() -> None:
    tail = OutputTail(cap_bytes=5)
    tail.append(b"abc")
    tail.append(b"defgh")
    assert tail.snapshot() == b"defgh"
    assert tail.total_bytes == 8
    assert tail.dropped_bytes == 3


@pytest.mark.integration
async def test_stop_sends_sigterm_and_the_runtime_exits_within_the_grace() -> None:
    spec = build_launch_spec(standin_command(), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        started = time.monotonic()
        outcome = await runtime.stop(grace_s=5.0)
        assert time.monotonic() - started < 2.0
    assert outcome.killed is False
    assert outcome.returncode == 0
    assert process_gone(runtime.pid)


@pytest.mark.integration
async def test_a_runtime_that_ignores_sigterm_is_sigkilled_after_the_grace() -> None:
    spec = build_launch_spec(standin_command("--ignore-sigterm"), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        started = time.monotonic()
        outcome = await runtime.stop(grace_s=0.5)
        elapsed = time.monotonic() - started
    assert outcome.killed is True
    assert outcome.returncode == -signal.SIGKILL
    assert 0.5 <= elapsed < 3.0
    assert process_gone(runtime.pid)


@pytest.mark.integration
async def test_a_runtime_that_made_a_session_of_its_own_is_still_stopped_gracefully() -> None:
    # A runtime started through setsid (or calling it itself) leaves the keeper's group, and
    # the group's SIGTERM never reached it: every stop ran out the grace and ended in SIGKILL.
    setsid = (
        "import os, sys; os.setsid(); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    spec = build_launch_spec([sys.executable, "-c", setsid, *standin_command()[1:]], model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        started = time.monotonic()
        outcome = await runtime.stop(grace_s=5.0)
        assert time.monotonic() - started < 2.0
    assert outcome == StopOutcome(returncode=0, killed=False)
    assert process_gone(runtime.pid)


@pytest.mark.integration
async def test_stopping_reaches_every_process_in_the_group() -> None:
    spec = build_launch_spec(standin_command("--spawn-child"), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        line = next(
            ln for ln in runtime.stdout_tail().decode().splitlines() if ln.startswith("CHILD ")
        )
        grandchild = psutil.Process(int(line.split()[1]))
        created = grandchild.create_time()
    assert wait_for(lambda: process_gone(grandchild.pid, created), 5.0)


def _noted_pids(pid_file: Path, *roles: str) -> dict[str, int]:
    """The PIDs the stand-in wrote to ``pid_file``, once every role in ``roles`` is there."""

    def read() -> dict[str, int]:
        text = pid_file.read_text() if pid_file.exists() else ""
        return {role: int(pid) for role, pid in (line.split() for line in text.splitlines())}

    assert wait_for(lambda: set(roles) <= read().keys(), 10.0), read()
    return read()


@pytest.mark.integration
@pytest.mark.parametrize("ignores_sigterm", [False, True])
async def test_stopping_reaches_a_process_that_left_the_group(
    tmp_path: Path, ignores_sigterm: bool
) -> None:
    # A double fork into a session of its own leaves the group, so the group's signals never
    # reach it; the keeper (its subreaper) kills it, after a quiet exit and after the grace.
    pid_file = tmp_path / "pids"
    flags = ["--spawn-child", "--spawn-orphan", "--pid-file", str(pid_file)]
    if ignores_sigterm:
        flags.append("--ignore-sigterm")
    spec = build_launch_spec(standin_command(*flags), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _wait_healthy(spec.base_url)
        pids = _noted_pids(pid_file, "runtime", "child", "orphan")
        orphan = psutil.Process(pids["orphan"])
        assert os.getsid(orphan.pid) != runtime.pid and os.getpgid(orphan.pid) != runtime.pid
        # Left by its parent, it is the keeper's now, not init's.
        assert orphan.ppid() == runtime.pid
        created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
        outcome = await runtime.stop(grace_s=0.5 if ignores_sigterm else 5.0)
    assert outcome.killed is ignores_sigterm
    assert outcome.returncode == (-signal.SIGKILL if ignores_sigterm else 0)
    assert wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0)


# A runtime stand-in that forks a chain of N processes below it, each in a session of its own
# (out of the group's reach) and ignoring SIGTERM: only the keeper can end them.
_OUT_OF_REACH_CHAIN = """\
import os, signal, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() != 0:
        break
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)
"""


@pytest.mark.integration
@pytest.mark.security
async def test_the_keeper_kills_every_process_below_it_past_what_one_pass_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The keeper lists what is below it in passes of at most its cap and gave up after 100
    # passes taken back to back, many of them finding only processes still dying: with the
    # cap lowered to 2, 81 of a chain of 100 were left running, orphaned, after the stop.
    monkeypatch.setattr(process_module, "_KEEPER_MAX_BELOW", 2)
    spec = build_launch_spec(
        [sys.executable, "-c", _OUT_OF_REACH_CHAIN, "60", "{port}"], model_path="m"
    )
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        keeper = psutil.Process(runtime.pid)
        assert wait_for(lambda: len(keeper.children(recursive=True)) == 61, 20.0)
        created = {p.pid: p.create_time() for p in keeper.children(recursive=True)}
        await runtime.stop(grace_s=0.5)
    gone = wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0)
    left = [pid for pid, created_at in created.items() if not process_gone(pid, created_at)]
    for pid in left:  # so that a failure leaves nothing behind either
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert gone, f"{len(left)} of {len(created)} left running"


@pytest.mark.integration
async def test_the_exit_is_seen_even_while_a_survivor_holds_the_output_pipes(
    tmp_path: Path,
) -> None:
    # A SIGKILL of the keeper itself (only the same user can send one) leaves a process that
    # made its own session running, with the output pipes open. Waiting for the pipes as well,
    # as Python 3.11's Process.wait does, never saw the keeper's exit.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-orphan", "--pid-file", str(pid_file)), model_path="m"
    )
    survivor = 0
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            survivor = _noted_pids(pid_file, "runtime", "orphan")["orphan"]
            os.kill(runtime.pid, signal.SIGKILL)
            assert await asyncio.wait_for(runtime.wait(), 2.0) == -signal.SIGKILL
            started = time.monotonic()
            outcome = await runtime.stop(grace_s=1.0)
            assert outcome.returncode == -signal.SIGKILL
            assert time.monotonic() - started < 1.0
            # Out of reach once the keeper is gone (docs/threat-model.md, row 9): the test ends
            # it, inside the context, so that the pipes close before the loop does.
            os.kill(survivor, signal.SIGKILL)
            survivor = 0
    finally:
        if survivor:
            with contextlib.suppress(ProcessLookupError):
                os.kill(survivor, signal.SIGKILL)


@pytest.mark.integration
async def test_a_stop_after_the_keeper_was_killed_still_ends_the_runtime_s_group(
    tmp_path: Path,
) -> None:
    # A SIGKILL of the keeper itself leaves the runtime to its death signal; what the runtime
    # started in its own group is ended by the stop's SIGKILL to that group, as it was when
    # the runtime shared the keeper's group.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-child", "--pid-file", str(pid_file)), model_path="m"
    )
    pids: dict[str, int] = {}
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            pids = _noted_pids(pid_file, "runtime", "child")
            created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
            os.kill(runtime.pid, signal.SIGKILL)
            assert await asyncio.wait_for(runtime.wait(), 5.0) == -signal.SIGKILL
            await runtime.stop(grace_s=1.0)
            assert wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0), {
                role: pid for role, pid in pids.items() if not process_gone(pid, created[pid])
            }
    finally:
        _end_all(pids)


def _group_numbered(number: int, *, with_child: bool = False) -> subprocess.Popen[bytes] | None:
    """A process of the user's in a session and group of its own whose number is ``number``
    (the kernel hands out the number after ``ns_last_pid`` next, which root may set), with a
    child in its group (``with_child``, as a service's workers or ``setsid sh -c 'a & b'``)."""
    command = ["sleep", "30"]
    if with_child:
        command = [sys.executable, "-c", "import os, time; os.fork(); time.sleep(30)"]
    for _ in range(200):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(number - 1))
        process = subprocess.Popen(command, start_new_session=True)
        if process.pid == number:
            return process
        process.kill()  # another process took the number first
        process.wait()
    return None


# A runtime that writes its process group's number on stdout, then (argv[1]) exits at once,
# lives on, or makes a session of its own (as ``setsid llama-server`` does) and lives on.
_TELLS_ITS_GROUP = """\
import os, sys, time
print(os.getpgrp(), flush=True)
if sys.argv[1] != "exit":
    if sys.argv[1] == "setsid":
        os.setsid()
    time.sleep(60)
"""


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="handing out a chosen process number needs root")
@pytest.mark.parametrize(
    ("how", "whose"),
    [
        ("runtime-exited", "runtime"),
        ("runtime-exited", "keeper"),
        ("keeper-killed", "runtime"),
        ("keeper-killed", "keeper"),
        # The keeper's number is held by the keeper for as long as the runtime lives.
        ("runtime-left-its-group", "runtime"),
    ],
)
async def test_a_stop_signals_no_group_whose_number_came_free(how: str, whose: str) -> None:
    # Once the runtime's group or the keeper's is empty, its number is free and the user's
    # next process group may get it. The stop had SIGKILLed both numbers whatever became of
    # them, and so killed an unrelated group of the user's that had one by then: after the
    # runtime exited, after the keeper was killed, and (the runtime's number) for the whole
    # life of a runtime that made a session of its own.
    behaviour = {
        "runtime-exited": "exit",
        "keeper-killed": "live",
        "runtime-left-its-group": "setsid",
    }
    spec = build_launch_spec(
        [sys.executable, "-c", _TELLS_ITS_GROUP, behaviour[how], "{port}"], model_path="m"
    )
    unrelated: subprocess.Popen[bytes] | None = None
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            assert await async_wait_for(lambda: runtime.stdout_tail().strip().isdigit(), 5.0)
            runtime_group = int(runtime.stdout_tail())
            if how == "keeper-killed":
                os.kill(runtime.pid, signal.SIGKILL)
            if how != "runtime-left-its-group":
                await asyncio.wait_for(runtime.wait(), 5.0)
            assert wait_for(lambda: not _members_of(runtime_group), 5.0)
            unrelated = _group_numbered(runtime_group if whose == "runtime" else runtime.pid)
            if unrelated is None:
                pytest.skip("another process kept taking the number")
        time.sleep(0.2)
        assert unrelated.poll() is None, "the stop killed an unrelated group"
    finally:
        if unrelated is not None:
            unrelated.kill()
            unrelated.wait()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="handing out a chosen process number needs root")
async def test_a_stop_after_the_keeper_was_killed_spares_a_session_that_got_its_number() -> None:
    # After a keeper killed by someone else, the stop SIGKILLed every process in the keeper's
    # session whose group was the keeper's or the runtime's, by their numbers: once the
    # keeper's session had emptied, a session of the user's whose leader got the keeper's
    # number has that number as session and group, and all but its leader were killed.
    spec = build_launch_spec(
        [sys.executable, "-c", _TELLS_ITS_GROUP, "live", "{port}"], model_path="m"
    )
    unrelated: subprocess.Popen[bytes] | None = None
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            assert await async_wait_for(lambda: runtime.stdout_tail().strip().isdigit(), 5.0)
            runtime_group = int(runtime.stdout_tail())
            os.kill(runtime.pid, signal.SIGKILL)
            await asyncio.wait_for(runtime.wait(), 5.0)
            assert wait_for(lambda: not _members_of(runtime_group), 5.0)
            unrelated = _group_numbered(runtime.pid, with_child=True)
            if unrelated is None:
                pytest.skip("another process kept taking the number")
            leader = psutil.Process(unrelated.pid)
            assert wait_for(lambda: len(leader.children()) == 1, 5.0)
            worker = leader.children()[0]
        time.sleep(0.2)
        assert unrelated.poll() is None
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE, (
            "the stop killed a process of an unrelated session"
        )
    finally:
        if unrelated is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(unrelated.pid, signal.SIGKILL)
            unrelated.wait()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="handing out a chosen process number needs root")
async def test_a_stop_signals_nothing_by_number_once_the_keeper_is_reaped_unseen() -> None:
    # The child watcher reaps the keeper in a thread of its own and tells the event loop
    # later; until the loop has run that, the runtime's returncode is still None. A stop in
    # between had sent SIGTERM and SIGCONT to the keeper's number, by then free and maybe
    # another group's of the user's.
    spec = build_launch_spec(
        [sys.executable, "-c", _TELLS_ITS_GROUP, "exit", "{port}"], model_path="m"
    )
    unrelated: subprocess.Popen[bytes] | None = None
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            keeper = runtime.pid
            # The loop is held here (no await), so it sees neither the exit nor the reaping.
            assert wait_for(lambda: not Path(f"/proc/{keeper}").exists(), 5.0)
            unrelated = _group_numbered(keeper)
            if unrelated is None:
                pytest.skip("another process kept taking the number")
            assert runtime.returncode is None
            await runtime.stop(grace_s=1.0)
        time.sleep(0.2)
        assert unrelated.poll() is None, "the stop signalled an unrelated group"
    finally:
        if unrelated is not None:
            unrelated.kill()
            unrelated.wait()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="handing out a chosen process number needs root")
@pytest.mark.parametrize("seen", [True, False])
@pytest.mark.parametrize("kernel", ["6.9", "before-6.9"])
async def test_a_stop_without_the_keeper_signals_no_group_whose_number_came_free(
    seen: bool, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the keeper the runtime leads its own group, and the stop SIGKILLed that group by
    # number even once the runtime had exited and been reaped and the group was empty, so its
    # number free (and SIGTERMed it by number while the loop had not yet seen the reaping):
    # another group of the user's that had the number by then was killed. A kernel before 6.9
    # refuses the pidfd's group flag (EINVAL), as it refuses this one.
    if kernel == "before-6.9":
        monkeypatch.setattr(process_module, "_PIDFD_SIGNAL_PROCESS_GROUP", 1 << 30, raising=False)
    spec = build_launch_spec(
        [sys.executable, "-c", _TELLS_ITS_GROUP, "exit", "{port}"], model_path="m"
    )
    unrelated: subprocess.Popen[bytes] | None = None
    try:
        async with SubprocessLauncher(use_death_signal=False).launch(spec) as runtime:
            if seen:
                await asyncio.wait_for(runtime.wait(), 5.0)
            else:  # the loop is held here, so it does not see the reaping
                assert wait_for(lambda: not Path(f"/proc/{runtime.pid}").exists(), 5.0)
            assert wait_for(lambda: not _members_of(runtime.pid), 5.0)
            unrelated = _group_numbered(runtime.pid)
            if unrelated is None:
                pytest.skip("another process kept taking the number")
            assert (runtime.returncode is None) is not seen
        time.sleep(0.2)
        assert unrelated.poll() is None, "the stop signalled an unrelated group"
    finally:
        if unrelated is not None:
            unrelated.kill()
            unrelated.wait()


@pytest.mark.integration
async def test_a_stop_without_the_keeper_still_ends_what_the_runtime_left_in_its_group(
    tmp_path: Path,
) -> None:
    # The runtime exits by itself and leaves a process in its group: the stop still ends it.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-child", "--pid-file", str(pid_file), "--exit-after-s", "1"),
        model_path="m",
    )
    pids: dict[str, int] = {}
    try:
        async with SubprocessLauncher(use_death_signal=False).launch(spec) as runtime:
            pids = _noted_pids(pid_file, "runtime", "child")
            created = psutil.Process(pids["child"]).create_time()
            await asyncio.wait_for(runtime.wait(), 10.0)
            assert not process_gone(pids["child"], created)
        assert wait_for(lambda: process_gone(pids["child"], created), 5.0)
    finally:
        _end_all(pids)


# A runtime that ignores SIGTERM, starts a child that exits once the file argv[1] is there,
# writes the child's number on stdout, reaps the child and lives on.
_REAPS_ITS_CHILD = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    os._exit(0)
print(child, flush=True)
os.waitpid(child, 0)
time.sleep(60)
"""


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="handing out a chosen process number needs root")
async def test_the_keeper_kills_no_process_whose_number_came_free_after_its_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The keeper lists what is below it, then kills it by number: a child its own parent reaped
    # in between, whose number another process of the user's got, was killed in its place.
    # The keeper is held right after its listing (the file ``hold`` is there) until ``go``.
    hold = tmp_path / "hold"
    keeper = process_module._KEEPER
    assert keeper.count("    return found\n") == 1
    monkeypatch.setattr(
        process_module,
        "_KEEPER",
        keeper.replace(
            "    return found\n",
            f"    if os.path.exists({str(hold)!r}):\n"
            f"        os.unlink({str(hold)!r})\n"
            f"        open({str(hold) + '.listed'!r}, 'w').close()\n"
            f"        while not os.path.exists({str(hold) + '.go'!r}):\n"
            "            time.sleep(0.01)\n"
            "    return found\n",
        ),
    )
    monkeypatch.setattr(process_module, "_KEEPER_KILL_TIMEOUT_S", 20.0)
    child_exits = tmp_path / "child-exits"
    spec = build_launch_spec(
        [sys.executable, "-c", _REAPS_ITS_CHILD, str(child_exits), "{port}"], model_path="m"
    )
    unrelated: subprocess.Popen[bytes] | None = None
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            assert await async_wait_for(lambda: runtime.stdout_tail().strip().isdigit(), 5.0)
            child = int(runtime.stdout_tail())
            hold.touch()
            stopping = asyncio.create_task(runtime.stop(grace_s=0.2))
            assert await async_wait_for(Path(str(hold) + ".listed").exists, 10.0)
            child_exits.touch()  # the runtime reaps it: its number is free
            assert await async_wait_for(lambda: not Path(f"/proc/{child}").exists(), 5.0)
            unrelated = _group_numbered(child)
            Path(str(hold) + ".go").touch()
            await stopping
            if unrelated is None:
                pytest.skip("another process kept taking the number")
        time.sleep(0.2)
        assert unrelated.poll() is None, "the keeper killed an unrelated process"
    finally:
        if unrelated is not None:
            unrelated.kill()
            unrelated.wait()


def _members_of(group: int) -> list[int]:
    return [process.pid for process in psutil.process_iter() if _group_of(process) == group]


def _group_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


@pytest.mark.integration
async def test_a_stop_after_the_keeper_was_killed_works_with_descriptors_past_1024(
    tmp_path: Path,
) -> None:
    # A manager serving many clients holds more than 1,024 descriptors, and the pidfds the
    # stop opens after a killed keeper are numbered past them, beyond what select() takes.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("the open-file limit is below 1,200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-child", "--pid-file", str(pid_file)), model_path="m"
    )
    pids: dict[str, int] = {}
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            pids = _noted_pids(pid_file, "runtime", "child")
            created = psutil.Process(pids["child"]).create_time()
            os.kill(runtime.pid, signal.SIGKILL)
            await asyncio.wait_for(runtime.wait(), 5.0)
            await runtime.stop(grace_s=1.0)
            assert wait_for(lambda: process_gone(pids["child"], created), 5.0)
    finally:
        _end_all(pids)
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.integration
async def test_a_runtime_that_exits_by_itself_leaves_nothing_below_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-orphan", "--pid-file", str(pid_file), "--exit-after-s", "1"),
        model_path="m",
    )
    async with SubprocessLauncher().launch(spec) as runtime:
        pids = _noted_pids(pid_file, "runtime", "orphan")
        created = psutil.Process(pids["orphan"]).create_time()
        # The keeper exits the way the runtime did, once what it left is gone.
        assert await asyncio.wait_for(runtime.wait(), 10) == 4
        assert process_gone(pids["orphan"], created)


# A runtime that leaves a process in a session of its own (out of the group's reach), then
# signals its own process group (``kill -STOP 0`` or ``kill -KILL 0`` from a shell script) once
# the file ``<pid file>.go`` is there.
_SIGNALS_ITS_GROUP = """\
import os, signal, sys, time
pid_file, how = sys.argv[1], sys.argv[2]
def note(role):
    with open(pid_file, "a") as f:
        f.write("%s %d\\n" % (role, os.getpid()))
note("runtime")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        note("orphan")
        while True:
            time.sleep(1)
    os._exit(0)
while not os.path.exists(pid_file + ".go"):
    time.sleep(0.01)
if how == "stop-itself":
    os.kill(os.getpid(), signal.SIGSTOP)
else:
    os.kill(0, signal.SIGSTOP if how == "stop-its-group" else signal.SIGKILL)
time.sleep(120)
"""


def _signals_its_group(pid_file: Path, how: str) -> list[str]:
    return [sys.executable, "-c", _SIGNALS_ITS_GROUP, str(pid_file), how, "{port}"]


def _end_all(pids: dict[str, int]) -> None:
    """So that a failure leaves nothing behind either."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.security
@pytest.mark.parametrize("how", ["stop-itself", "stop-its-group", "kill-its-group"])
async def test_a_runtime_that_signals_its_own_group_is_stopped_and_leaves_nothing(
    tmp_path: Path, how: str
) -> None:
    # The runtime shared the keeper's process group: a SIGSTOP it sent its group stopped the
    # keeper, so the stop waited out its grace and the keeper's kill, and the group's SIGKILL
    # left the process in a session of its own running, orphaned to init; a SIGKILL it sent
    # its group killed the keeper, with the same result. A runtime that stopped only itself
    # acted on the SIGTERM only at the SIGKILL, after the whole grace.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(_signals_its_group(pid_file, how), model_path="m")
    pids: dict[str, int] = {}
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            pids = _noted_pids(pid_file, "runtime", "orphan")
            created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
            pid_file.with_name("pids.go").touch()
            if how == "kill-its-group":
                assert await asyncio.wait_for(runtime.wait(), 10) == -signal.SIGKILL
            else:
                runtime_process = psutil.Process(pids["runtime"])
                assert wait_for(lambda: runtime_process.status() == psutil.STATUS_STOPPED, 5.0)
            started = time.monotonic()
            outcome = await runtime.stop(grace_s=5.0)
            elapsed = time.monotonic() - started
        assert wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0), {
            role: pid for role, pid in pids.items() if not process_gone(pid, created[pid])
        }
        if how != "kill-its-group":
            # Continued, the runtime acts on the SIGTERM at once.
            assert outcome == StopOutcome(returncode=-signal.SIGTERM, killed=False)
            assert elapsed < 2.0
    finally:
        _end_all(pids)


# Holds the process argv[1] names in ptrace's stops for as long as it lives: signals are left
# undelivered, SIGCONT included, until a SIGKILL ends it.
_TRACER = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
    sys.exit("attach: %d" % ctypes.get_errno())
os.waitpid(pid, 0x40000000)  # __WALL: the attach's own stop
print("ATTACHED", flush=True)
while True:
    _, status = os.waitpid(pid, 0x40000000)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
"""


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="tracing another process's child needs root")
async def test_a_keeper_that_cannot_act_still_leaves_nothing_of_the_runtime_s_group(
    tmp_path: Path,
) -> None:
    # A keeper held in a stop that SIGCONT does not end (traced): the stop kills the groups of
    # its children itself, or the runtime's child, in the runtime's group, would outlive it.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-child", "--pid-file", str(pid_file)), model_path="m"
    )
    pids: dict[str, int] = {}
    tracer: subprocess.Popen[str] | None = None
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            await _wait_healthy(spec.base_url)
            pids = _noted_pids(pid_file, "runtime", "child")
            created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
            tracer = subprocess.Popen(
                [sys.executable, "-c", _TRACER, str(runtime.pid)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert tracer.stdout is not None
            assert tracer.stdout.readline().strip() == "ATTACHED"
            outcome = await runtime.stop(grace_s=0.2)
        assert outcome.killed is True
        assert wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0), {
            role: pid for role, pid in pids.items() if not process_gone(pid, created[pid])
        }
    finally:
        _end_all(pids)
        if tracer is not None:
            tracer.kill()
            tracer.wait()
            if tracer.stdout is not None:
                tracer.stdout.close()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="tracing another process's child needs root")
async def test_a_keeper_that_cannot_act_and_is_then_reaped_unseen_leaves_its_number_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop kills the groups of a keeper's children itself when the keeper cannot act,
    # reading them from /proc by the keeper's number while the runtime's returncode is unset:
    # a keeper killed and reaped by the child watcher's thread just before, the loop not having
    # seen it, whose number another session of the user's got, had that session's processes
    # killed instead. Killed and handed out here, right before the stop reads the children.
    spec = build_launch_spec(standin_command(), model_path="m")
    unrelated: subprocess.Popen[bytes] | None = None
    tracer: subprocess.Popen[str] | None = None
    original = process_module._kill_groups_of_children

    def keeper_reaped_unseen(pid: int, *args: int) -> None:
        nonlocal unrelated
        assert tracer is not None
        below = [child.pid for child in psutil.Process(pid).children(recursive=True)]
        tracer.kill()
        tracer.wait()
        os.kill(pid, signal.SIGKILL)
        # The runtime dies by its death signal; the number is free once all are reaped.
        assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in [pid, *below]), 5)
        unrelated = _group_numbered(pid, with_child=True)
        if unrelated is not None:
            leader = psutil.Process(unrelated.pid)
            assert wait_for(lambda: len(leader.children()) == 1, 5.0)
        original(pid, *args)

    monkeypatch.setattr(process_module, "_kill_groups_of_children", keeper_reaped_unseen)
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            await _wait_healthy(spec.base_url)
            tracer = subprocess.Popen(
                [sys.executable, "-c", _TRACER, str(runtime.pid)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert tracer.stdout is not None
            assert tracer.stdout.readline().strip() == "ATTACHED"
            await runtime.stop(grace_s=0.2)
        if unrelated is None:
            pytest.skip("another process kept taking the number")
        worker = psutil.Process(unrelated.pid).children()
        time.sleep(0.2)
        assert unrelated.poll() is None
        assert len(worker) == 1 and worker[0].status() != psutil.STATUS_ZOMBIE, (
            "the stop killed a process of an unrelated session"
        )
    finally:
        if unrelated is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(unrelated.pid, signal.SIGKILL)
            unrelated.wait()
        if tracer is not None:
            tracer.kill()
            tracer.wait()
            if tracer.stdout is not None:
                tracer.stdout.close()


_EXIT_AS = """
import os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
how = sys.argv[1]
if how.startswith("signal:"):
    number = int(how.split(":")[1])
    if number != signal.SIGKILL:
        signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
os._exit(int(how))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("how", "returncode"),
    [
        ("0", 0),
        ("3", 3),
        ("255", 255),
        ("signal:15", -15),
        ("signal:9", -9),
        ("signal:10", -10),
        ("signal:11", -11),  # would dump core, where core dumps are on
        ("signal:34", -34),  # a real-time signal
    ],
)
async def test_the_caller_sees_the_runtimes_own_exit(how: str, returncode: int) -> None:
    spec = build_launch_spec([sys.executable, "-c", _EXIT_AS, how, "{port}"], model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        assert await asyncio.wait_for(runtime.wait(), 10) == returncode


@pytest.mark.integration
@pytest.mark.parametrize(
    "manager_ignores",
    [(), (signal.SIGQUIT, signal.SIGUSR1, signal.SIGTTOU)],
    ids=["nothing", "what-a-background-job-or-nohup-ignores"],
)
async def test_the_runtime_starts_with_no_signal_ignored_or_blocked(
    manager_ignores: tuple[signal.Signals, ...],
) -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and a fork passes that on to what it execs: a runtime
    # killed by SIGPIPE would have kept running, unlike one started from a shell. A manager
    # started as a background job of a script ignores SIGQUIT (and SIGINT), one under nohup
    # SIGHUP; exec passes those on too.
    spec = build_launch_spec(
        ["/bin/grep", "-hE", "^Sig(Ign|Blk):", "/proc/self/status", "{port}"], model_path="m"
    )
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in manager_ignores}
    try:
        async with SubprocessLauncher().launch(spec) as runtime:
            await asyncio.wait_for(runtime.wait(), 10)
            await asyncio.sleep(0.1)
            lines = runtime.stdout_tail().decode().split()
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert lines == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


@pytest.mark.integration
async def test_a_stop_right_after_the_launch_is_never_lost() -> None:
    # A SIGTERM that reached the keeper before it forked was once swallowed, and the stop
    # waited out its whole grace period and killed.
    outcomes = []
    for _ in range(40):
        spec = build_launch_spec(standin_command(), model_path="m")
        async with SubprocessLauncher().launch(spec) as runtime:
            await asyncio.sleep(0.001 * (_ % 20))
            outcomes.append(await runtime.stop(grace_s=3.0))
    assert [outcome for outcome in outcomes if outcome.killed] == []


@pytest.mark.integration
async def test_leaving_the_context_on_an_error_or_a_cancellation_leaves_no_process() -> None:
    spec = build_launch_spec(standin_command("--ignore-sigterm"), model_path="m")
    launcher = SubprocessLauncher()
    pids: list[int] = []
    with pytest.raises(RuntimeError):
        async with launcher.launch(spec, stop_grace_s=0.2) as runtime:
            pids.append(runtime.pid)
            raise RuntimeError("boom")

    async def hold() -> None:
        async with launcher.launch(
            build_launch_spec(standin_command(), model_path="m"), stop_grace_s=0.2
        ) as held:
            pids.append(held.pid)
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    while len(pids) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(process_gone(pid) for pid in pids)


@pytest.mark.integration
async def test_an_executable_the_kernel_cannot_run_is_spawn_failed(tmp_path: Path) -> None:
    # ELF magic passes the check before the spawn; the kernel then refuses the rest (as it
    # would a binary for another machine).
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00\x01\x02 not a program")
    garbage.chmod(0o755)
    spec = build_launch_spec([str(garbage), "{port}"], model_path="m")
    with pytest.raises(ProcessError) as caught:
        async with SubprocessLauncher(use_death_signal=False).launch(spec):
            pass
    assert caught.value.reason is Reason.SPAWN_FAILED
    # Through the death-signal wrapper the exec failure surfaces as exit status 127.
    async with SubprocessLauncher().launch(spec) as runtime:
        assert await asyncio.wait_for(runtime.wait(), 10) == 127


# --- dying with the manager ----------------------------------------------------------------


def _kill_manager_and_check(template: list[str], *, wait_healthy: bool, timeout_s: float) -> bool:
    return _kill_manager_and_check_model(
        template, "/nonexistent/model.gguf", wait_healthy=wait_healthy, timeout_s=timeout_s
    )


def _kill_manager_and_check_model(
    template: list[str], model: str, *, wait_healthy: bool = True, timeout_s: float
) -> bool:
    manager = start_manager(template, model, wait_healthy=wait_healthy)
    try:
        runtime_pid = read_runtime_pid(manager)
        created = psutil.Process(runtime_pid).create_time()
        assert psutil.Process(runtime_pid).ppid() == manager.pid
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(10)
        return wait_for(lambda: process_gone(runtime_pid, created), timeout_s)
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        if manager.stdout is not None:
            manager.stdout.close()


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_a_manager_killed_with_sigkill_leaves_no_runtime_behind_20_trials() -> None:
    # The manager waits until the runtime is healthy, so the runtime has finished writing to
    # its stdout pipe: a later write to the dead manager's pipe (EPIPE) cannot be what ends it.
    # Without the death signal the runtime survives this test (checked by hand).
    template = standin_command()
    clean = [_kill_manager_and_check(template, wait_healthy=True, timeout_s=3.0) for _ in range(20)]
    assert clean.count(True) == 20, f"{clean.count(True)}/20 trials clean"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_manager_killed_with_sigkill_leaves_nothing_the_runtime_started_behind(
    tmp_path: Path,
) -> None:
    # The death signal once reached the runtime alone: its child and a process that left its
    # group kept running after the manager was killed.
    pid_file = tmp_path / "pids"
    template = standin_command("--spawn-child", "--spawn-orphan", "--pid-file", str(pid_file))
    manager = start_manager(template, "/nonexistent/model.gguf", wait_healthy=True)
    try:
        read_runtime_pid(manager)
        pids = _noted_pids(pid_file, "runtime", "child", "orphan")
        created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(10)
        assert wait_for(lambda: all(process_gone(p, c) for p, c in created.items()), 5.0), {
            role: pid for role, pid in pids.items() if not process_gone(pid, created[pid])
        }
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        if manager.stdout is not None:
            manager.stdout.close()


@pytest.mark.integration
@pytest.mark.security
@pytest.mark.timeout(60)
def test_a_manager_killed_with_sigkill_leaves_nothing_behind_a_runtime_that_stops_its_group(
    tmp_path: Path,
) -> None:
    # A SIGSTOP the runtime sent its own group stopped the keeper too, which then never acted
    # on the manager's death: the keeper, the runtime and the process in a session of its own
    # were all left behind, for good.
    pid_file = tmp_path / "pids"
    manager = start_manager(_signals_its_group(pid_file, "stop-its-group"), "/nonexistent/m")
    pids: dict[str, int] = {}
    try:
        pids = {"keeper": read_runtime_pid(manager)}
        pids |= _noted_pids(pid_file, "runtime", "orphan")
        created = {role: psutil.Process(pid).create_time() for role, pid in pids.items()}
        pid_file.with_name("pids.go").touch()
        runtime = psutil.Process(pids["runtime"])
        assert wait_for(lambda: runtime.status() == psutil.STATUS_STOPPED, 5.0)
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(10)
        assert wait_for(
            lambda: all(process_gone(pids[role], c) for role, c in created.items()), 5.0
        ), {role: pids[role] for role, c in created.items() if not process_gone(pids[role], c)}
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        if manager.stdout is not None:
            manager.stdout.close()
        _end_all(pids)


@pytest.mark.stress
@pytest.mark.timeout(180)
@pytest.mark.skipif(not llama_ready(), reason="the embedded llama.cpp server is not available")
def test_a_manager_killed_with_sigkill_leaves_no_real_server_behind_3_trials(
    tmp_path: Path,
) -> None:
    template, model = real_runtime(tmp_path, api_key_file=False)
    clean = [_kill_manager_and_check_model(template, str(model), timeout_s=5.0) for _ in range(3)]
    assert clean.count(True) == 3, f"{clean.count(True)}/3 trials clean"
