"""Signals sent to a CLI child process the way a closing session or an impatient user does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

__all__ = ["catches_termination_signals", "flood_until_exit", "threads_blocking"]

#: Between two signals of a flood: a second signal "about 2 ms after the first" falls into
#: every window a flood sweeps.
FLOOD_INTERVAL_S = 0.0005


def catches_termination_signals(pid: int) -> bool:
    """Whether ``pid`` has handlers for SIGTERM and SIGHUP (SigCgt in /proc): the CLI's own
    are in place, and a signal no longer takes its default action."""
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16) & wanted == wanted
    except OSError:
        pass
    return False


def flood_until_exit(
    process: subprocess.Popen[str],
    *,
    timeout_s: float = 30.0,
    interval_s: float = FLOOD_INTERVAL_S,
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
) -> int:
    """Send ``signals`` in turn (SIGINT, SIGTERM and SIGHUP), about every ``interval_s`` (half
    a millisecond; 0: as fast as they can be sent), until ``process`` exits (or ``timeout_s``
    passes); return how many were sent.

    A signal that lands anywhere between the first one and the process's exit (the cancel,
    the result being written, the interpreter's teardown) is sent by some flood; a window of
    microseconds, by one sent as fast as it can be.
    """
    deadline = time.monotonic() + timeout_s
    sent = 0
    # poll() reaps the child: until it answers, the pid is the child's (a zombie at worst).
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signals[sent % len(signals)])
        sent += 1
        if interval_s:
            time.sleep(interval_s)
    return sent


def threads_blocking(pid: int, signums: tuple[signal.Signals, ...]) -> dict[str, bool]:
    """For each thread of ``pid`` but its main one (``name:tid``), whether it blocks every one
    of ``signums`` (SigBlk in /proc)."""
    wanted = 0
    for signum in signums:
        wanted |= 1 << (signum - 1)
    blocking: dict[str, bool] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue
        fields: dict[str, str] = {}
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if "SigBlk" in fields:
            blocking[f"{fields['Name']}:{tid}"] = int(fields["SigBlk"], 16) & wanted == wanted
    return blocking
