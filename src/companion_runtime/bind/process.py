"""Spawning and stopping a runtime process: argv, environment, process group, output, death.

Theory of operation
-------------------
:func:`build_launch_spec` turns a manifest command template into a :class:`LaunchSpec`. Only
the placeholders ``{model_path}``, ``{port}``, ``{host}`` and ``{api_key_file}`` are filled (by
hand, never with ``str.format``, so ``{port.__class__}`` cannot reach an attribute); any other
field, a format spec or a conversion is refused. ``{api_key_file}`` is the path of a private
file holding a key the runtime must demand of every client (``--api-key-file`` in llama.cpp's
server); the supervisor writes it and the front door sends the key, so a local process that
finds the runtime's port cannot skip the front door. The executable must be an absolute path
to an existing executable file that exec could run: a ``#!`` script whose interpreter is an
absolute path to an executable file, or (on Linux) an ELF image. There is no shell anywhere.
The host is always ``127.0.0.1`` and the port a free loopback port picked here. The
environment is scrubbed to an allowlist (``PATH``, ``LANG``, ``LC_*``, ``HOME``, ``TMPDIR``)
plus the caller's explicit extras, so a secret in the manager's environment never reaches the
runtime.

:class:`SubprocessLauncher` runs a spec as an async context manager::

    async with SubprocessLauncher().launch(spec) as runtime:
        await runtime.wait()

The child leads its own session and process group, so stopping it reaches every process it
started: SIGTERM and SIGCONT to the group (a stopped runtime acts on the SIGTERM at once), a
grace period, SIGKILL to the group, then the exit is reaped. Under the keeper (below), the
stop's signals go to the keeper through a pidfd, so they reach it or nothing even once it has
been reaped unseen, and no group is signalled by a number that may have come free since.
Without the keeper (not Linux, or ``use_death_signal=False``), the runtime leads the group: on
Linux 6.9 and later its signals go through the runtime's pidfd to the group it leads, which
reaches what is left in that group after the runtime was reaped and nothing once the group is
empty (its number free); before 6.9, by number while the runtime lives and not at all once it
has ended; elsewhere, by number until the runtime is known to be reaped.
Leaving the context always stops the runtime.

Dying with the manager, and leaving nothing behind: on Linux the runtime runs under a keeper,
a tiny stdlib-only Python process (``python -I -S -c``, about 30 ms to start, about 10 MB
resident) that stays its parent for the runtime's whole life; the PID the caller sees is the
keeper's, which leads the process group. The keeper:

- marks itself a child subreaper, so a process the runtime starts and abandons (a double fork,
  even into its own session, outside the group) becomes the keeper's child, not init's: it
  stays in the tree that the resource probe measures and that the keeper can kill;
- sets ``PR_SET_PDEATHSIG`` and checks that its parent is still the manager (closing the race
  where the manager died before ``prctl``); when the manager dies, it kills every process below
  it, then itself;
- forks and execs the runtime (which gets a death signal of its own for the keeper) in a
  process group of its own, which the runtime does not lead (a first, short-lived child of the
  keeper makes it), so that what the runtime sends its own group (``kill -STOP 0``,
  ``kill -KILL 0``) never stops or kills the keeper, and the runtime may still make a session
  of its own; sends the group's SIGTERM/SIGINT/SIGHUP/SIGCONT on to the runtime's group (or to
  the one it made, as ``setsid llama-server`` does, so that a stop is still graceful there),
  and when the runtime exits, kills whatever the runtime left below it and exits with the
  runtime's status (or its signal), so the caller sees the runtime's own exit;
- on SIGUSR2, the stop's escalation after the grace period (sent after a SIGCONT, should the
  keeper have been stopped), kills everything below it and then itself, before the group gets
  SIGKILL. A keeper that still cannot act (stopped again, traced) has its children's groups
  killed by the manager, then its own.
- once everything below it is dead (the runtime exited, the manager died, or the stop's
  escalation), removes the spec's ``run_files`` (the run's key file and its directory), which
  a manager killed with SIGKILL could not remove.

A ``preexec_fn`` could arm the death signal without the extra process, but it is not safe in a
process that runs threads (psutil, NVML and ``asyncio.to_thread`` workers), which the manager
always does, and it would cover the runtime only. One limit follows from the kernel's
semantics: the death signal fires when the *thread* that spawned the keeper exits (asyncio
spawns from the event-loop thread, which lives as long as the manager's loop). A process below
the keeper that is killed while it is forking can leave a child the keeper finds on its next
pass. Each process a pass lists is killed through a pidfd, once it is seen to be still the
child of the process it was listed under (one its own parent reaped since the listing may have
left its number to another process). A pass lists at most ``_KEEPER_MAX_BELOW`` (4,096)
processes; what lies below those is found on a later pass, once they are dead and the keeper
inherits it, and the keeper passes until nothing is left below it (it once gave up after 100
passes taken back to back, most of them finding only processes still dying, and left the rest
running). It gives up only on a
tree that stays the same for about 5 s: a process in the kernel's uninterruptible sleep,
which dies when it leaves it (its SIGKILL is pending). A stop's escalation waits 2 s for the
keeper before the group gets SIGKILL, which ends the keeper wherever it is.

Output: stdout and stderr are drained continuously by reader tasks into ring buffers that keep
the last ``output_cap_bytes`` of each stream, so the child never blocks on a full pipe and the
manager never holds more than the cap.

Foreign exceptions (``OSError`` from spawning) become :class:`ProcessError` with a
:class:`Reason` in one place, :func:`_spawn_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import select
import signal
import socket
import stat
import string
import struct
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, final

from companion_runtime.core._reasons import Reason

__all__ = [
    "DEFAULT_OUTPUT_CAP_BYTES",
    "ENV_ALLOWLIST",
    "LOOPBACK_HOST",
    "PLACEHOLDERS",
    "LaunchSpec",
    "OutputTail",
    "ProcessError",
    "ProcessLauncher",
    "RuntimeProcess",
    "StopOutcome",
    "SubprocessLauncher",
    "build_launch_spec",
    "choose_loopback_port",
    "filled_argv",
    "scrub_environment",
    "uses_api_key_file",
]

#: The only address a runtime is ever told to bind.
LOOPBACK_HOST: Final = "127.0.0.1"
#: The placeholders a command template may use.
PLACEHOLDERS: Final = frozenset({"model_path", "port", "host", "api_key_file"})
#: Environment variables passed through from the manager (plus every ``LC_*``).
ENV_ALLOWLIST: Final = frozenset({"PATH", "LANG", "HOME", "TMPDIR"})
#: Bytes kept from the end of each output stream.
DEFAULT_OUTPUT_CAP_BYTES: Final = 64 * 1024
_READ_CHUNK_BYTES: Final = 64 * 1024
# How long stop() waits for the output pipes to close after the group is dead; a process that
# left the group (its own setsid) could hold them open forever.
_PIPE_CLOSE_TIMEOUT_S: Final = 2.0
# How much of an executable is read to see whether exec could run it: Linux reads a ``#!``
# line within its first 256 bytes (BINPRM_BUF_SIZE); an ELF image starts with _ELF_MAGIC.
_HEAD_BYTES: Final = 256
_ELF_MAGIC: Final = b"\x7fELF"

# The keeper: the runtime's parent for its whole life, stdlib only and isolated (-I -S) so it
# starts fast and reads nothing from the environment. argv: [manager pid, N, N run files,
# executable, *args]; the run's files (then directories) are removed once everything below the
# keeper is dead, whether the runtime exited or the manager died.
# It marks itself a child subreaper (a process the runtime starts and leaves, even one that made
# its own session, becomes the keeper's child instead of init's), arms a death signal for the
# manager, forks and execs the runtime, and reaps. When the runtime exits it kills everything
# left below it and exits the same way; when the manager dies (the death signal) or asks for it
# (SIGUSR2, the stop's escalation) it kills everything below it and then itself with SIGKILL.
# The runtime runs in a process group of its own (made by a first child, so the runtime does not
# lead it and may still setsid): SIGTERM, SIGINT, SIGHUP and SIGCONT to the keeper's group are
# sent on to the runtime's group (or the one it made). They are blocked from the start until the
# fork, and any that came in before it is sent on to the runtime's group, so a stop that lands
# in that window is not lost. The runtime starts with every
# signal at its default (Python ignores SIGPIPE and SIGXFSZ, and the fork would pass that
# on). Exit codes follow the shell's convention (126: cannot arm, 127: cannot exec).
_KEEPER: Final = """\
import ctypes, errno, os, signal, sys, time
PASSED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCONT}
signal.pthread_sigmask(signal.SIG_BLOCK, PASSED)
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
MAX_BELOW = 4096
GROUP_FD = -1
if GROUP_FD >= 0:
    os.set_inheritable(GROUP_FD, False)  # the keeper's alone: the runtime's exec closes it
def below():
    # (process, the parent it was listed under) for each process below the keeper.
    found, frontier = [], [os.getpid()]
    while frontier and len(found) < MAX_BELOW:
        pid = frontier.pop()
        try:
            tasks = os.listdir('/proc/%d/task' % pid)
        except OSError:
            continue
        for tid in tasks:
            try:
                with open('/proc/%d/task/%s/children' % (pid, tid)) as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += [(kid, pid) for kid in kids]
            frontier += kids
    return found
def kill(pid, parent):
    # Through a pidfd, once the process it names is seen to be the listed parent's child: one
    # its own parent reaped since the listing may have left its number to another process.
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError) as error:
        if getattr(error, 'errno', errno.ENOSYS) == errno.ENOSYS:
            try:
                os.kill(pid, signal.SIGKILL)  # no pidfd (Linux before 5.3): by number
            except OSError:
                pass
        return
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            if int(f.read().rpartition(b')')[2].split()[1]) == parent:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(pidfd)
def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return
def kill_below():
    # Until nothing is left: a pass lists at most MAX_BELOW, and what is below those is found
    # once they are dead (the keeper, as subreaper, inherits it). A pass that finds only what
    # the last one found (still dying) waits a little; only a tree that stays the same for
    # about 5 s (a process in the kernel's uninterruptible sleep) is given up on. True when
    # nothing is left below.
    last, same = None, 0
    while True:
        pids = below()
        if not pids:
            return True
        for pid, parent in pids:
            kill(pid, parent)
        reap()
        found = set(pids)
        if found == last:
            same += 1
            if same > 500:
                return False
            time.sleep(0.01)
        else:
            last, same = found, 0
RUN_FILES = sys.argv[3:3 + int(sys.argv[2])]
RUNTIME = sys.argv[3 + int(sys.argv[2]):]
def forget():
    for path in RUN_FILES:
        try:
            os.unlink(path)
        except IsADirectoryError:
            try:
                os.rmdir(path)
            except OSError:
                pass
        except OSError:
            pass
def emptied():
    # Nothing is left below the keeper, so no process is left in its group or the runtime's:
    # the manager then signals neither, as their numbers may soon name other groups.
    try:
        os.write(GROUP_FD, b'emptied\\n')
    except OSError:
        pass
def end(signum, frame):
    global reaped
    reaped = True  # kill_below may reap the runtime: pass_on sends nothing by number from here
    if kill_below():
        emptied()
    forget()
    os.kill(os.getpid(), signal.SIGKILL)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    os._exit(126)
signal.signal(signal.SIGUSR2, end)
if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0) != 0:
    os._exit(126)
if os.getppid() != int(sys.argv[1]):
    forget()
    os._exit(0)
target, reaped = None, False
def pass_on(signum, frame):
    # The runtime leads a process group of its own, so what it sends its group (a SIGSTOP, a
    # SIGKILL) never reaches the keeper: the manager's signal is sent on to the runtime's
    # group (the one it made, should it have made a session of its own), once, and only while
    # the runtime is not reaped (the pidfd tells), as its number may name another group then.
    try:
        if target is not None and hasattr(os, 'P_PIDFD'):
            os.waitid(os.P_PIDFD, target, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        elif reaped:
            return
        group = os.getpgid(runtime)
        if group != os.getpgrp():
            os.killpg(group, signum)
    except (OSError, AttributeError):
        pass
for passed in PASSED:
    signal.signal(passed, pass_on)
keeper = os.getpid()
# The runtime's process group: not the keeper's, so that what the runtime sends its group (a
# SIGSTOP, a SIGKILL) never reaches the keeper, and not one it leads, so that it may still make
# a session of its own (setsid fails for a group leader). A first child makes the group and
# holds it until the runtime is in it (its end of the pipe closes at the runtime's exec); the
# group then lives on with the runtime, and its number with it.
ready_r, ready_w = os.pipe()
holder = os.fork()
if holder == 0:
    try:
        os.setpgid(0, 0)
        os.close(ready_w)
        os.read(ready_r, 1)
    finally:
        os._exit(0)
os.close(ready_r)
try:
    os.setpgid(holder, holder)  # as the holder does: whichever comes first
except OSError:
    pass
if GROUP_FD >= 0:
    # The manager's record of the runtime's group, for a stop after the keeper was killed.
    try:
        os.write(GROUP_FD, b'%d\\n' % holder)
    except OSError:
        pass
runtime = os.fork()
if runtime == 0:
    try:
        for default in (*PASSED, signal.SIGUSR2, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(default, signal.SIG_DFL)
        # And whatever the manager inherited ignored (a shell without job control ignores
        # SIGINT and SIGQUIT in a job it puts in the background, nohup SIGHUP), which exec
        # passes on: the runtime starts as a service manager starts one, nothing ignored.
        for inherited in signal.valid_signals():
            try:
                if signal.getsignal(inherited) == signal.SIG_IGN:
                    signal.signal(inherited, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED)
        os.setpgid(0, holder)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == keeper:
            os.execv(RUNTIME[0], RUNTIME)
    except BaseException:
        pass
    os._exit(127)
try:
    os.setpgid(runtime, holder)  # as the runtime does: whichever comes first
except OSError:
    pass
os.close(ready_w)
try:
    target = os.pidfd_open(runtime)
except (OSError, AttributeError):
    pass  # no pidfd (Linux before 5.3): signals are passed on until the runtime is reaped
for early in signal.sigpending() & PASSED:
    signal.sigtimedwait([early], 0)  # taken here, so the handler does not pass it on again
    pass_on(early, None)  # to the group the runtime is in by now (its own, after a setsid)
signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED)
while True:
    try:
        # Seen before it is reaped, so that without a pidfd ``reaped`` is set while the
        # runtime's number is still its own: pass_on never sends by a reaped runtime's number.
        exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid
    except ChildProcessError:
        forget()
        os._exit(127)
    if exited == runtime:
        reaped = True
    pid, status = os.waitpid(exited, 0)
    if pid == runtime:
        break
if kill_below():
    emptied()
forget()
if os.WIFSIGNALED(status):
    # Die of the runtime's signal, so the manager sees it; never with a core dump of our own
    # (it would overwrite the runtime's).
    signum = os.WTERMSIG(status)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass  # a signal the C library keeps for itself: the shell's number for it
    os._exit(128 + signum)
os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""
#: Processes the keeper lists below it in one pass (it kills them, then looks again).
_KEEPER_MAX_BELOW: Final = 4096
# How often a wait for the runtime's exit looks at its status when the output pipes stay open.
_EXIT_POLL_S: Final = 0.1
# The largest process number Linux hands out (PID_MAX_LIMIT): anything larger the keeper told
# is no process group.
_PID_MAX_LIMIT: Final = 4 * 1024 * 1024
# Passes over /proc a stop makes to kill what a keeper killed by someone else left behind.
_SESSION_KILL_PASSES: Final = 50
# pidfd_send_signal's flag for the process group the pidfd's process leads (Linux 6.9).
_PIDFD_SIGNAL_PROCESS_GROUP: Final = 1 << 2
# How long the stop's escalation waits for the keeper to kill what is below it before the
# group gets SIGKILL (which ends the keeper too).
_KEEPER_KILL_TIMEOUT_S: Final = 2.0


@final
class ProcessError(Exception):
    """A runtime could not be launched. ``str(error)`` is the reason code only."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchSpec:
    """Everything needed to start one runtime: built by :func:`build_launch_spec`."""

    #: The filled argv; ``argv[0]`` is an absolute path to an executable file.
    argv: tuple[str, ...]
    #: The complete (scrubbed) environment of the child.
    env: Mapping[str, str]
    #: Always :data:`LOOPBACK_HOST`.
    host: str
    #: The loopback port the runtime was told to listen on.
    port: int
    #: Bytes kept from the end of each of stdout and stderr.
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES
    #: Files, then directories, that belong to this run alone (the runtime's key file and its
    #: directory): removed, in this order, by the keeper once the runtime has ended, however
    #: the manager ended (a manager killed with SIGKILL cannot remove them itself).
    run_files: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class StopOutcome:
    """How a runtime ended when it was stopped."""

    #: The exit status (negative: killed by that signal).
    returncode: int
    #: True when the grace period ran out and the group was SIGKILLed.
    killed: bool


@final
@dataclass(slots=True, kw_only=True)
class OutputTail:
    """A ring buffer that keeps the last ``cap_bytes`` of a stream and counts the rest."""

    cap_bytes: int
    total_bytes: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    def append(self, chunk: bytes) -> None:
        """Add ``chunk``; drop the oldest bytes beyond the cap."""
        self.total_bytes += len(chunk)
        self._buffer += chunk
        excess = len(self._buffer) - self.cap_bytes
        if excess > 0:
            del self._buffer[:excess]

    @property
    def dropped_bytes(self) -> int:
        """Bytes seen but no longer kept."""
        return self.total_bytes - len(self._buffer)

    def snapshot(self) -> bytes:
        """The kept bytes (at most ``cap_bytes``)."""
        return bytes(self._buffer)


class RuntimeProcess(Protocol):
    """A running runtime, as the supervisor sees it."""

    @property
    def pid(self) -> int:
        """The runtime's PID (also its process group id)."""
        ...

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped, else ``None``."""
        ...

    async def wait(self) -> int:
        """Wait for the runtime to exit; return its exit status."""
        ...

    async def stop(self, *, grace_s: float) -> StopOutcome:
        """SIGTERM the group, wait ``grace_s``, SIGKILL the group, reap."""
        ...

    def stdout_tail(self) -> bytes:
        """The last bytes the runtime wrote to stdout."""
        ...

    def stderr_tail(self) -> bytes:
        """The last bytes the runtime wrote to stderr."""
        ...


class ProcessLauncher(Protocol):
    """The spawn seam: run a :class:`LaunchSpec` for the duration of a context."""

    def launch(
        self, spec: LaunchSpec, *, stop_grace_s: float = ...
    ) -> contextlib.AbstractAsyncContextManager[RuntimeProcess]:
        """Start the runtime; leaving the context stops it (SIGTERM, grace, SIGKILL)."""
        ...


def scrub_environment(
    source: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Keep only allowlisted variables of ``source`` (``PATH``, ``LANG``, ``LC_*``, ``HOME``,
    ``TMPDIR``) and add ``extra`` on top. Nothing else passes."""
    kept = {
        name: value
        for name, value in source.items()
        if name in ENV_ALLOWLIST or name.startswith("LC_")
    }
    if extra:
        for name, value in extra.items():
            if (
                type(name) is not str
                or type(value) is not str
                or not name
                or "=" in name
                or "\0" in name
                or "\0" in value
            ):
                raise ProcessError(Reason.MALFORMED_SPEC)
            kept[name] = value
    return kept


def choose_loopback_port() -> int:
    """Return a loopback TCP port that was free a moment ago.

    The port is released before the runtime binds it, so another process could take it in
    between; the runtime then fails its health check and the supervisor's restart picks a new
    port. Binding port 0 is the only portable way to ask the kernel for a free one.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def build_launch_spec(
    command_template: Sequence[str],
    *,
    model_path: str | os.PathLike[str],
    port: int | None = None,
    api_key_file: str | os.PathLike[str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
) -> LaunchSpec:
    """Fill a command template and check it; raise :class:`ProcessError` when it is unusable.

    ``MALFORMED_SPEC``: the template is empty, not a sequence of strings, uses a placeholder
    other than ``{model_path}``/``{port}``/``{host}``/``{api_key_file}`` (or a format spec or
    conversion), puts a placeholder in the executable, never mentions ``{port}`` (the runtime
    must be told where to listen), uses ``{api_key_file}`` without an ``api_key_file``, or
    has a NUL in an argument once filled (or in an ``extra_env`` name or value).
    ``EXECUTABLE_NOT_ALLOWED``: ``argv[0]`` is not an absolute path to an existing executable
    regular file, or its first bytes show that exec could not run it (a ``#!`` interpreter that
    is not an absolute path to an executable file; on Linux, neither ``#!`` nor ELF, or an ELF
    image for this machine whose dynamic loader is not there).
    ``base_env`` defaults to the manager's environment.
    """
    if isinstance(command_template, str | bytes) or not isinstance(command_template, Sequence):
        raise ProcessError(Reason.MALFORMED_SPEC)
    if not command_template or any(type(arg) is not str for arg in command_template):
        raise ProcessError(Reason.MALFORMED_SPEC)
    if type(output_cap_bytes) is not int or output_cap_bytes <= 0:
        raise ProcessError(Reason.MALFORMED_SPEC)
    if port is None:
        port = choose_loopback_port()
    elif type(port) is not int or not 0 < port < 65536:
        raise ProcessError(Reason.MALFORMED_SPEC)
    values = {"model_path": os.fspath(model_path), "port": str(port), "host": LOOPBACK_HOST}
    if api_key_file is not None:
        values["api_key_file"] = os.fspath(api_key_file)

    executable, *arguments = command_template
    if _fields(executable):
        raise ProcessError(Reason.MALFORMED_SPEC)
    if not any("port" in _fields(argument) for argument in arguments):
        raise ProcessError(Reason.MALFORMED_SPEC)
    if api_key_file is None and uses_api_key_file(command_template):
        raise ProcessError(Reason.MALFORMED_SPEC)
    argv = (_unescape(executable), *(_fill(argument, values) for argument in arguments))
    if any("\0" in part for part in argv):
        # No C string can carry it: exec would refuse the whole argv with a ValueError.
        raise ProcessError(Reason.MALFORMED_SPEC)
    _check_executable(argv[0])
    env = scrub_environment(os.environ if base_env is None else base_env, extra_env)
    return LaunchSpec(
        argv=argv, env=env, host=LOOPBACK_HOST, port=port, output_cap_bytes=output_cap_bytes
    )


def uses_api_key_file(command_template: Sequence[str]) -> bool:
    """Whether the template asks for ``{api_key_file}`` (a key the runtime must demand)."""
    try:
        return any("api_key_file" in _fields(argument) for argument in command_template)
    except (ProcessError, TypeError):
        return False


def filled_argv(command_template: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """The argv ``command_template`` gives with ``values`` for its placeholders, unescaped as
    :func:`build_launch_spec` does it (without its checks); :class:`ProcessError` or
    ``KeyError`` when a placeholder is unknown or has no value."""
    executable, *arguments = command_template
    return (_unescape(executable), *(_fill(argument, values) for argument in arguments))


def _parse(template: str) -> list[tuple[str, str | None]]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:  # an unmatched brace
        raise ProcessError(Reason.MALFORMED_SPEC) from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, format_spec, conversion in parsed:
        if name is not None and (name not in PLACEHOLDERS or format_spec or conversion):
            raise ProcessError(Reason.MALFORMED_SPEC)
        pieces.append((literal, name))
    return pieces


def _fields(template: str) -> set[str]:
    return {name for _, name in _parse(template) if name is not None}


def _fill(template: str, values: Mapping[str, str]) -> str:
    return "".join(literal + (values[name] if name else "") for literal, name in _parse(template))


def _unescape(template: str) -> str:
    return "".join(literal for literal, _ in _parse(template))


def _check_executable(executable: str) -> None:
    """Refuse (``EXECUTABLE_NOT_ALLOWED``) an executable that exec could never run.

    Not an absolute path to an executable regular file; or, from its first bytes: a ``#!``
    line whose interpreter is not an absolute path to an executable regular file (not
    followed further: ``#!/usr/bin/env python3`` passes when ``/usr/bin/env`` does), or that
    the kernel would not read (the interpreter's name not ended within the first
    :data:`_HEAD_BYTES` bytes); on Linux, neither a ``#!`` line nor an ELF image, the only
    formats the kernel runs without ``binfmt_misc``, or an ELF image for this machine whose
    program interpreter (the dynamic loader it names, ``/lib/ld-musl-x86_64.so.1`` for a
    binary built on Alpine) is not an executable regular file. An executable this process may
    not read (execute-only) is left to the kernel at spawn.
    """
    if not _is_executable_file(executable):
        raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED)
    _check_contents(executable)


def _is_executable_file(executable: str) -> bool:
    # The name exactly as exec gets it: pathlib would drop a trailing "/" ("/bin/sh/"), which
    # exec refuses (ENOTDIR).
    try:
        return (
            os.path.isabs(executable)
            and stat.S_ISREG(os.stat(executable).st_mode)
            and os.access(executable, os.X_OK)
        )
    except (OSError, ValueError):  # a name too long; a NUL
        return False


def _check_contents(executable: str) -> None:
    """The checks of :func:`_check_executable` that read the executable's bytes; nothing when
    this process may not read it.

    Symlinks are followed, as exec follows them (``/bin/sh`` and a virtualenv's ``python`` are
    symlinks). ``O_NONBLOCK`` and ``O_NOCTTY``: should the name be switched to a FIFO or a
    terminal since it was checked, the open neither waits for a writer nor takes a terminal,
    and ``fstat`` on the descriptor refuses it.
    """
    try:
        fd = os.open(executable, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except PermissionError:
        return
    except OSError:
        raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED)
        head = os.pread(fd, _HEAD_BYTES, 0)
        if head.startswith(b"#!"):
            interpreter = _interpreter(head)
        elif not sys.platform.startswith("linux"):
            return
        elif head.startswith(_ELF_MAGIC):
            interpreter = _elf_interpreter(fd, head)
            if interpreter is None:
                return  # none needed, or not for the kernel to find (another machine's)
        else:
            raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED)
    except OSError:
        raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED) from None
    finally:
        os.close(fd)
    if interpreter is None or not _is_executable_file(interpreter):
        raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED)


def _interpreter(head: bytes) -> str | None:
    """The interpreter a ``#!`` line names, read as Linux's ``binfmt_script`` reads it;
    ``None`` when the kernel would find none, or it is not absolute (exec would look a
    relative one up from the working directory of the moment).

    The kernel sees the first :data:`_HEAD_BYTES` bytes (NUL-padded for a shorter file). The
    line ends at the first newline before any NUL; without one there, the interpreter's name
    must still end (a blank or a NUL) within the buffer, or the kernel refuses a name it may
    have cut short. Blanks (space, tab) after ``#!`` are skipped, and the name ends at the next
    blank or NUL.
    """
    buffer = head[:_HEAD_BYTES].ljust(_HEAD_BYTES, b"\0")
    last = _HEAD_BYTES - 1
    nul = buffer.find(b"\0")
    end = buffer.find(b"\n", 0, nul if nul >= 0 else _HEAD_BYTES)
    if end < 0:
        start = _next_non_blank(buffer, 2, last)
        if start is None or _next_terminator(buffer, start, last) is None:
            return None
        end = last
    while buffer[end - 1 : end] in (b" ", b"\t"):
        end -= 1
    start = _next_non_blank(buffer, 2, end)
    if start is None or start == end:
        return None
    stop = _next_terminator(buffer, start, end)
    name = buffer[start : end if stop is None else stop]
    if not name.startswith(b"/"):
        return None
    return os.fsdecode(name)


def _next_non_blank(buffer: bytes, first: int, last: int) -> int | None:
    """The first index in ``first..last`` (both included) not holding a space or tab."""
    return next((i for i in range(first, last + 1) if buffer[i] not in _BLANKS), None)


def _next_terminator(buffer: bytes, first: int, last: int) -> int | None:
    """The first index in ``first..last`` (both included) holding a space, tab or NUL."""
    return next((i for i in range(first, last + 1) if buffer[i] in _TERMINATORS), None)


_BLANKS: Final = frozenset(b" \t")
_TERMINATORS: Final = frozenset(b" \t\0")
#: A program header's type for the program interpreter (the dynamic loader).
_PT_INTERP: Final = 3
#: The longest program interpreter name the kernel reads.
_PATH_MAX: Final = 4096


def _elf_interpreter(fd: int, head: bytes) -> str | None:
    """The program interpreter an ELF image names (its ``PT_INTERP``), when the image is for
    the machine this process runs on (the same class, byte order and ``e_machine`` as
    ``/proc/self/exe``); ``None`` when it names none, is for another machine (``binfmt_misc``
    may run it, looking its loader up elsewhere), or cannot be read as the kernel would.

    A relative name comes back as it is, and is then refused: the kernel would look it up from
    the working directory of the moment.
    """
    machine = _elf_machine(head)
    if machine is None or machine != _own_elf_machine():
        return None
    wide, order = machine[0] == 2, "<" if machine[1] == 1 else ">"
    # e_phoff, then e_phentsize and e_phnum; a program header's p_type to p_filesz.
    (phoff,) = struct.unpack_from(order + ("Q" if wide else "I"), head, 32 if wide else 28)
    phentsize, phnum = struct.unpack_from(order + "HH", head, 54 if wide else 42)
    layout = order + ("IIQQQQ" if wide else "IIIIII")
    size = struct.calcsize(layout)
    if phentsize < size or not 0 < phnum <= 65536 // phentsize:
        return None
    table = os.pread(fd, phentsize * phnum, phoff)
    for index in range(len(table) // phentsize):
        fields = struct.unpack_from(layout, table, index * phentsize)
        if fields[0] != _PT_INTERP:
            continue
        offset, filesz = (fields[2], fields[5]) if wide else (fields[1], fields[4])
        if not 2 <= filesz <= _PATH_MAX:
            return None
        name = os.pread(fd, filesz, offset)
        if len(name) != filesz or not name.endswith(b"\0"):
            return None
        return os.fsdecode(name.split(b"\0", 1)[0])
    return None


def _elf_machine(head: bytes) -> tuple[int, int, int] | None:
    """``(class, byte order, e_machine)`` of an ELF header, ``None`` when it is not one."""
    if len(head) < 64 or not head.startswith(_ELF_MAGIC) or head[4] not in (1, 2):
        return None
    if head[5] not in (1, 2):
        return None
    (machine,) = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)
    return head[4], head[5], machine


@functools.cache
def _own_elf_machine() -> tuple[int, int, int] | None:
    try:
        with open("/proc/self/exe", "rb") as own:
            return _elf_machine(own.read(64))
    except OSError:
        return None


@contextlib.contextmanager
def _spawn_errors() -> Iterator[None]:
    """The one place spawn-time ``OSError``s become a :class:`Reason`."""
    try:
        yield
    except PermissionError:
        raise ProcessError(Reason.EXECUTABLE_NOT_ALLOWED) from None
    except OSError:
        raise ProcessError(Reason.SPAWN_FAILED) from None


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # The group outlives its leader while any member is alive; ESRCH means it is empty.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _leader_pidfd(pid: int) -> tuple[int, bool]:
    """A pidfd for the child ``pid`` and ``False``; ``(-1, True)`` where there are no pidfds
    (signals then go by number); ``(-1, False)`` when ``pid`` was reaped already."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1, False
    except (OSError, AttributeError):  # not Linux, or Linux before 5.3
        return -1, True
    try:
        # Still our child (the watcher's thread may have reaped it, and the number come to
        # another process, before the pidfd was opened).
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except OSError:
        os.close(pidfd)
        return -1, False
    return pidfd, False


def _signal_group_through(pidfd: int, pgid: int, signum: signal.Signals) -> None:
    """Signal the process group the process behind ``pidfd`` leads, numbered ``pgid``.

    Through the pidfd (Linux 6.9), it is that group, or nothing once it is empty, whatever the
    number names by then. Before 6.9, by number while the leader lives, so the number is held;
    once it has ended (the watcher's thread may have reaped it) nothing is signalled: the group
    may be empty and its number, which is also the session's, another session's by then.
    """
    if _group_signalled_through(pidfd, signum):
        return
    ended = select.poll()
    ended.register(pidfd, select.POLLIN)
    if not ended.poll(0):
        _signal_group(pgid, signum)


def _group_signalled_through(pidfd: int, signum: signal.Signals) -> bool:
    """Signal the process group the process behind ``pidfd`` leads through the pidfd: that
    group, also once its leader is reaped, or nothing once it is empty, whatever its number
    names by then. ``False`` when the kernel refuses to (before Linux 6.9), or no pidfd."""
    if pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(pidfd, signum, None, _PIDFD_SIGNAL_PROCESS_GROUP)
    except OSError as error:
        return error.errno != errno.EINVAL  # ESRCH: the group is empty
    return True


def _session_and_group(pid: int) -> tuple[int, int] | None:
    """``(session, process group)`` of ``pid`` from ``/proc``; ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
        return int(fields[3]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def _kill_groups_in_session(session: int, groups: set[int]) -> None:
    """SIGKILL every process of ``session`` that is in one of ``groups`` (Linux, ``/proc``).

    For groups whose number nothing of ours holds any more (their keeper is gone): a number
    that named one of them may name another user's group by now, and a ``killpg`` would reach
    it. Each process is signalled through a pidfd, once its session and group were read with
    the pidfd open and it was still there after, so the signal reaches that process or none.
    Passes until one finds no process it had not signalled (one forked meanwhile is found on
    the next; one still dying, or in the kernel's uninterruptible sleep, is not waited for), at
    most :data:`_SESSION_KILL_PASSES`.
    """
    signalled: set[int] = set()
    for _ in range(_SESSION_KILL_PASSES):
        try:
            entries = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        except OSError:
            return
        found = {
            pid
            for pid in entries
            if pid != session and pid not in signalled and _kill_if_in(pid, session, groups)
        }
        if not found:
            return
        signalled |= found


def _kill_if_in(pid: int, session: int, groups: set[int]) -> bool:
    """SIGKILL ``pid`` through a pidfd if it is in ``session`` and one of ``groups``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        ids = _session_and_group(pid)
        # Read with the pidfd open, and the process not ended afterwards: they are the ids
        # of the process the pidfd names.
        if ids is None or ids[0] != session or ids[1] not in groups:
            return False
        ended = select.poll()  # not select(): a manager may hold more than 1,024 descriptors
        ended.register(pidfd, select.POLLIN)
        if ended.poll(0):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _kill_groups_of_children(pid: int, pidfd: int) -> None:
    """SIGKILL the process group of every child of ``pid`` (but ``pid``'s own), and each child.

    Only for a ``pid`` that is alive and has not reaped its children (stopped): a child's
    number then names that child alone, and its group's number stays that group's while it is
    a member. With ``pidfd`` (``pid``'s), each child is read with a pidfd of its own open and
    counted only if its parent is ``pid`` and ``pid`` has not ended after the read: ``pid``
    may have been reaped unseen by the child watcher's thread, and its number come to another
    process, whose children these would be. ``pidfd`` -1: no pidfds here, by number.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as listing:
                children = [int(child) for child in listing.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            if pidfd >= 0:
                _kill_child_and_group(pid, pidfd, child)
                continue
            with contextlib.suppress(ProcessLookupError):
                group = os.getpgid(child)
                if group != os.getpgid(pid):
                    _signal_group(group, signal.SIGKILL)
                os.kill(child, signal.SIGKILL)


def _kill_child_and_group(parent: int, parent_fd: int, child: int) -> None:
    """SIGKILL ``child``'s group (unless it is ``parent``'s) and ``child``, through a pidfd,
    if it is the child of the process behind ``parent_fd``, numbered ``parent``."""
    try:
        child_fd = os.pidfd_open(child)
    except OSError:
        return
    try:
        with open(f"/proc/{child}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
        ended = select.poll()
        ended.register(parent_fd, select.POLLIN)
        # Read with both pidfds open, and the parent not ended afterwards: the ids are those of
        # a child of that parent, which (stopped) reaps none of them.
        if int(fields[1]) != parent or ended.poll(0):
            return
        if int(fields[2]) != parent:
            _signal_group(int(fields[2]), signal.SIGKILL)
        signal.pidfd_send_signal(child_fd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        return
    finally:
        os.close(child_fd)


@final
class _SubprocessRuntime:
    """The real :class:`RuntimeProcess`: an asyncio subprocess in its own process group."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        cap_bytes: int,
        *,
        keeper: bool,
        group_fd: int = -1,
    ) -> None:
        self._process = process
        self._keeper = keeper
        self._group_fd = group_fd
        # The leader's pidfd (the keeper's, or the runtime's without one): signals reach it (or
        # the group it leads) or nothing, also once it has been reaped and before the event
        # loop has seen that (the child watcher reaps in a thread). ``_by_number``: no pidfd
        # here (not Linux, or Linux before 5.3), so signals go by number while it is unreaped.
        self._leader_fd, self._by_number = _leader_pidfd(process.pid)
        self.stdout = OutputTail(cap_bytes=cap_bytes)
        self.stderr = OutputTail(cap_bytes=cap_bytes)
        self._stop_lock = asyncio.Lock()
        self._stop_outcome: StopOutcome | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._exited()

    async def _exited(self) -> int:
        """The exit status, as soon as the process has exited.

        ``Process.wait`` (Python 3.11) also waits for the output pipes to close, and a process
        that outlived the keeper (one only a SIGKILL of the keeper itself leaves) can hold them
        open for ever; the exit itself is known as soon as the child watcher reaps it.
        """
        waiting = asyncio.ensure_future(self._process.wait())
        try:
            while (returncode := self._process.returncode) is None:
                await asyncio.wait({waiting}, timeout=_EXIT_POLL_S)
            return returncode
        finally:
            if not waiting.done():
                waiting.cancel()

    async def stop(self, *, grace_s: float) -> StopOutcome:
        async with self._stop_lock:
            if self._stop_outcome is not None:
                return self._stop_outcome
            pgid = self._process.pid
            killed = False
            if self._process.returncode is None:
                self._signal_leader(signal.SIGTERM, group=True)
                # A stopped runtime (SIGSTOP) would act on the SIGTERM only at the SIGKILL:
                # continued, it stops gracefully. The keeper passes both on.
                self._signal_leader(signal.SIGCONT, group=True)
                try:
                    await asyncio.wait_for(self._exited(), timeout=max(grace_s, 0.0))
                except TimeoutError:
                    killed = True
            if killed and self._keeper:
                # The keeper kills everything below it, a process that left the group too,
                # then itself; the group's SIGKILL below would end it before it could.
                # A keeper someone stopped is continued first, or the SIGUSR2 would wait.
                self._signal_leader(signal.SIGCONT, group=False)
                self._signal_leader(signal.SIGUSR2, group=False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exited(), timeout=_KEEPER_KILL_TIMEOUT_S)
                if self._process.returncode is None and (self._leader_fd >= 0 or self._by_number):
                    # A keeper that cannot act (stopped again, traced): the group's SIGKILL
                    # below ends it, and the groups its children lead go with it.
                    _kill_groups_of_children(pgid, self._leader_fd)
            if not self._keeper:
                # SIGKILL the group even when the leader went quietly: anything it started
                # and left behind in the group goes too (not by its number once it may be free).
                self._signal_leader(signal.SIGKILL, group=True)
            else:
                runtime_group, emptied = self._keeper_report()
                if not emptied:
                    # A keeper killed by someone else, or one that cannot act, left its group
                    # and the runtime's to themselves. Once it is reaped their numbers are held
                    # only by what is left in them. The keeper's group is killed through its
                    # pidfd (its number is also the session's, which a session of the user's
                    # may have by now, its leader's group with it); what is left in the
                    # runtime's group (in the keeper's session) through a pidfd per process.
                    groups = set() if runtime_group is None else {runtime_group}
                    if not _group_signalled_through(self._leader_fd, signal.SIGKILL):
                        groups.add(pgid)
                    if groups:
                        _kill_groups_in_session(pgid, groups)
                if self._process.returncode is None:
                    self._signal_leader(signal.SIGKILL, group=True)
            returncode = await self._exited()
            if self._leader_fd >= 0:
                os.close(self._leader_fd)
                self._leader_fd = -1
            self._stop_outcome = StopOutcome(returncode=returncode, killed=killed)
            return self._stop_outcome

    def _signal_leader(self, signum: signal.Signals, *, group: bool) -> None:
        """Signal the keeper through its pidfd (it sends a stop's signals on to the runtime's
        group, and nothing but what joined it on purpose shares its group). Without a keeper,
        the group the runtime leads (``group``) through the runtime's pidfd: it reaches the
        group that number named at the spawn, as long as anything is left in it, and nothing
        once it is empty and the number free. Without a pidfd, by number, and only while the
        leader is not known to be reaped (a reaping the loop has not seen yet is not known)."""
        with contextlib.suppress(ProcessLookupError):
            if self._leader_fd >= 0:
                if not group or self._keeper:
                    signal.pidfd_send_signal(self._leader_fd, signum)
                else:
                    _signal_group_through(self._leader_fd, self._process.pid, signum)
            elif not self._by_number or self._process.returncode is not None:
                return
            elif group:
                os.killpg(self._process.pid, signum)
            else:
                os.kill(self._process.pid, signum)

    def _keeper_report(self) -> tuple[int | None, bool]:
        """What the keeper told (read once): the runtime's process group (``None`` when it
        did not tell it, having died first), and whether it emptied everything below it
        (then neither its group nor the runtime's has a member left)."""
        if self._group_fd < 0:
            return None, False
        try:
            os.set_blocking(self._group_fd, False)
            told = os.read(self._group_fd, 64)
        except OSError:
            told = b""
        finally:
            os.close(self._group_fd)
            self._group_fd = -1
        lines = told.split(b"\n")
        first = lines[0]
        group = int(first) if first.isdigit() and 1 < int(first) <= _PID_MAX_LIMIT else None
        return group, b"emptied" in lines

    def stdout_tail(self) -> bytes:
        return self.stdout.snapshot()

    def stderr_tail(self) -> bytes:
        return self.stderr.snapshot()


async def _drain(stream: asyncio.StreamReader | None, tail: OutputTail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(_READ_CHUNK_BYTES):
        tail.append(chunk)


@final
class SubprocessLauncher:
    """The real :class:`ProcessLauncher` (asyncio subprocess, own session, death signal)."""

    def __init__(self, *, use_death_signal: bool | None = None) -> None:
        """``use_death_signal`` defaults to on where ``PR_SET_PDEATHSIG`` exists (Linux)."""
        self._use_death_signal = (
            sys.platform.startswith("linux") if use_death_signal is None else use_death_signal
        )

    def _argv(self, spec: LaunchSpec, group_fd: int = -1) -> tuple[str, ...]:
        if not self._use_death_signal:
            return spec.argv
        return (
            sys.executable,
            "-I",
            "-S",
            "-c",
            _KEEPER.replace("MAX_BELOW = 4096", f"MAX_BELOW = {_KEEPER_MAX_BELOW:d}", 1).replace(
                "GROUP_FD = -1", f"GROUP_FD = {group_fd:d}", 1
            ),
            str(os.getpid()),
            str(len(spec.run_files)),
            *spec.run_files,
            *spec.argv,
        )

    @contextlib.asynccontextmanager
    async def launch(
        self, spec: LaunchSpec, *, stop_grace_s: float = 5.0
    ) -> AsyncIterator[RuntimeProcess]:
        """Start ``spec``; on leaving, stop it (SIGTERM, ``stop_grace_s``, SIGKILL) and reap."""
        # The keeper writes the number of the runtime's process group here.
        group_r, group_w = os.pipe() if self._use_death_signal else (-1, -1)
        try:
            with _spawn_errors():
                process = await asyncio.create_subprocess_exec(
                    *self._argv(spec, group_w),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=dict(spec.env),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(group_w,) if group_w >= 0 else (),
                )
        except BaseException:
            if group_r >= 0:
                os.close(group_r)
            raise
        finally:
            if group_w >= 0:
                os.close(group_w)
        runtime = _SubprocessRuntime(
            process, spec.output_cap_bytes, keeper=self._use_death_signal, group_fd=group_r
        )
        # The readers are not in a TaskGroup around the ``yield``: that would wrap the
        # caller's own exception in an ExceptionGroup. They are awaited below instead.
        drains = [
            asyncio.create_task(_drain(process.stdout, runtime.stdout)),
            asyncio.create_task(_drain(process.stderr, runtime.stderr)),
        ]
        try:
            yield runtime
        finally:
            try:
                # Shielded so a cancelled caller still leaves no process behind.
                await asyncio.shield(runtime.stop(grace_s=stop_grace_s))
                await asyncio.wait(drains, timeout=_PIPE_CLOSE_TIMEOUT_S)
            finally:
                for task in drains:
                    task.cancel()
                # Our own readers: their cancellation (just issued) is theirs, not ours.
                await asyncio.gather(*drains, return_exceptions=True)
