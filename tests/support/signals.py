"""Signals sent to a CLI child process the way a closing session or an impatient user does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

__all__ = ["catches_termination_signals", "flood_until_exit"]

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


def flood_until_exit(process: subprocess.Popen[str], *, timeout_s: float = 30.0) -> int:
    """Send SIGINT, SIGTERM and SIGHUP in turn, about every half millisecond, until
    ``process`` exits (or ``timeout_s`` passes); return how many were sent.

    A signal that lands anywhere between the first one and the process's exit (the cancel,
    the result being written, the interpreter's teardown) is sent by some flood.
    """
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    sent = 0
    # poll() reaps the child: until it answers, the pid is the child's (a zombie at worst).
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signals[sent % len(signals)])
        sent += 1
        time.sleep(FLOOD_INTERVAL_S)
    return sent
