"""``demo``: the whole path, offline, in under a minute, leaving nothing behind.

1. Generate the tiny GGUF model and serve it from a loopback HTTPS origin with a throwaway CA.
2. Pull a bit-flipped copy through the real verified path: refused ``digest_mismatch``, and
   nothing appears at the store's final path. Then pull the real one: verified.
3. Start llama.cpp's server (embedded launcher) on the verified blob under the supervisor,
   behind the front door, with small limits (2 in flight, 4 queued).
4. Send a burst of concurrent completions larger than in-flight + queue, so some run, some
   wait and the rest are refused ``503 queue_full``.
5. Drain and stop; print a report. Exit 0.

Everything lives in a temporary directory (store, session files, CA) that is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final

import httpx
from rich.console import Console
from rich.table import Table

from companion_runtime.bind.eventloop import run as run_loop
from companion_runtime.bind.https_origin import ModelOrigin
from companion_runtime.bind.llama_server import (
    INSTALL_COMMAND,
    embedded_llama_command,
    llama_available,
)
from companion_runtime.bind.manifest import Manifest, manifest_from_dict
from companion_runtime.bind.pull import pull_model
from companion_runtime.bind.serve import ServeRefused, serving
from companion_runtime.bind.store import ModelStore
from companion_runtime.bind.worker import run_cancellable
from companion_runtime.core import Reason

__all__ = ["BURST_SIZE", "INSTALL_HINT", "DemoReport", "run_demo"]

#: How to get the runtime the demo needs.
INSTALL_HINT: Final = (
    "the demo runs llama.cpp through the 'llama' extra; install it with: "
    f"{INSTALL_COMMAND}  (from a checkout: pip install -e '.[llama]')"
)
#: How long the child interpreter may take to import xllamacpp.
_IMPORT_CHECK_TIMEOUT_S: Final = 60.0
#: How often the wait for that child looks at the cancel flag a signal sets.
_CANCEL_POLL_S: Final = 0.05
#: Demo limits: small enough that a burst shows every admission outcome.
MAX_IN_FLIGHT: Final = 2
QUEUE_BOUND: Final = 4
#: Requests in the burst: more than in flight + queued, so some are refused.
BURST_SIZE: Final = 12
#: Tokens per completion: long enough (~100 ms) that the burst overlaps.
N_PREDICT: Final = 24
_MODEL_PATH: Final = "/models/tiny.gguf"
_TAMPERED_PATH: Final = "/tampered/tiny.gguf"


@final
@dataclass(slots=True, kw_only=True)
class DemoReport:
    """What the demo observed (filled in as it goes)."""

    model_bytes: int = 0
    tampered_reason: str = ""
    tampered_left_nothing: bool = False
    pull_reason: str = ""
    sent: int = 0
    served: int = 0
    correct_answers: int = 0
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    peak_in_flight: int = 0
    peak_queued: int = 0
    runtime_started: bool = False
    runtime_pid_gone: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)
    failure: str = ""

    @property
    def ok(self) -> bool:
        """Every step showed what it should."""
        return (
            not self.failure
            and self.tampered_reason == Reason.DIGEST_MISMATCH.value
            and self.tampered_left_nothing
            and self.pull_reason == Reason.OK.value
            and self.served > 0
            and self.correct_answers == self.served
            and self.served + sum(self.refused_by_reason.values()) == self.sent
            and self.runtime_pid_gone
        )


def _flip_one_bit(data: bytes) -> bytes:
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    return bytes(tampered)


#: Why a store in the temporary directory is refused, said without its path.
_TEMPORARY_DIRECTORY_RULE: Final = (
    "the demo's store is made in the temporary directory (TMPDIR): it and every directory "
    "above it must be yours or root's and writable by no one else, unless sticky like /tmp"
)


def _manifest(origin: ModelOrigin, path: str, data: bytes) -> Manifest:
    return manifest_from_dict(
        {
            "model": {
                "name": "tiny-demo",
                "url": origin.url(path),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
            },
            "sources": {"allow": [origin.base_url]},
            "runtime": {
                "command": embedded_llama_command(parallel=MAX_IN_FLIGHT, threads=1),
                "ready_timeout_s": 60,
            },
            "limits": {
                "max_in_flight": MAX_IN_FLIGHT,
                "queue_bound": QUEUE_BOUND,
                "queue_timeout_s": 20,
                "max_ram_bytes": 4 * 1024**3,
                "max_vram_bytes": 1024**3,
                "max_cpu_percent": 100,
            },
        }
    )


async def _burst(url: str, token: str, report: DemoReport) -> None:
    limits = httpx.Limits(max_connections=BURST_SIZE, max_keepalive_connections=BURST_SIZE)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"authorization": f"Bearer {token}"},
        limits=limits,
        timeout=60,
        trust_env=False,
    ) as client:
        prompts = [f"companion {chr(ord('a') + index)}" for index in range(BURST_SIZE)]
        responses = await asyncio.gather(
            *(
                client.post(
                    "/completion",
                    json={"prompt": prompt, "n_predict": N_PREDICT, "ignore_eos": True},
                )
                for prompt in prompts
            )
        )
    report.sent = len(responses)
    for prompt, response in zip(prompts, responses, strict=True):
        if response.status_code == 200:
            report.served += 1
            # The tiny model repeats the prompt's last character: proof the runtime answered.
            if response.json().get("content") == prompt[-1] * N_PREDICT:
                report.correct_answers += 1
        else:
            reason = str(response.json().get("reason", f"http_{response.status_code}"))
            report.refused_by_reason[reason] += 1


async def run_demo(*, say: Callable[[str], None] = lambda _: None) -> DemoReport:
    """Run the demo end to end; the report says what happened (``report.ok``)."""
    from companion_runtime.bind.tiny_model import tiny_model_bytes

    report = DemoReport()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="companion-runtime-demo-") as scratch:
        root = Path(scratch)
        data = tiny_model_bytes()
        report.model_bytes = len(data)
        store = ModelStore(root / "store")
        with ModelOrigin({_MODEL_PATH: data, _TAMPERED_PATH: _flip_one_bit(data)}) as origin:
            say("pull a tampered copy (one bit flipped)")
            mark = time.monotonic()
            tampered_manifest = _manifest(origin, _TAMPERED_PATH, data)
            tampered = await run_cancellable(
                lambda cancel: pull_model(
                    tampered_manifest, store=store, ca_bundle=origin.ca_pem_path, cancel=cancel
                )
            )
            report.tampered_reason = tampered.verdict.reason.value
            digest = hashlib.sha256(data).hexdigest()
            report.tampered_left_nothing = tampered.path is None and not store.has_blob(digest)
            say("pull the real model")
            manifest = _manifest(origin, _MODEL_PATH, data)
            pulled = await run_cancellable(
                lambda cancel: pull_model(
                    manifest, store=store, ca_bundle=origin.ca_pem_path, cancel=cancel
                )
            )
            report.pull_reason = pulled.verdict.reason.value
            report.timings_s["pulls"] = time.monotonic() - mark
        if not pulled.ok or pulled.path is None:
            report.failure = f"pull refused: {pulled.verdict.reason.value}"
            if pulled.verdict.reason is Reason.STORE_ERROR:
                # The one store_error a demo user can act on: the store lies in the
                # temporary directory, whose way must pass the store's rule.
                report.failure += f" ({_TEMPORARY_DIRECTORY_RULE})"
            return report

        say("start llama.cpp behind the front door")
        mark = time.monotonic()
        try:
            async with serving(
                manifest, pulled.path, state_dir=root / "state", grace_s=10
            ) as running:
                report.timings_s["start"] = time.monotonic() - mark
                pid = running.supervisor.status().get("pid")
                report.runtime_started = True
                say(f"send a burst of {BURST_SIZE} completions")
                mark = time.monotonic()
                try:
                    await _burst(running.url, running.token, report)
                except (httpx.HTTPError, ValueError) as error:
                    # A connection turned away or reset (an open-file limit too low to raise),
                    # or an answer that is not JSON: the step failed. Its class only: the
                    # error's text may carry the URL.
                    report.failure = f"burst failed: {type(error).__name__}"
                report.timings_s["burst"] = time.monotonic() - mark
                statistics = running.supervisor.controller.statistics()
                report.peak_in_flight = statistics.peak_in_flight
                report.peak_queued = statistics.peak_queued
                say("drain and stop")
                mark = time.monotonic()
        except ServeRefused as refused:
            report.failure = f"runtime refused: {refused.reason.value}"
            return report
        report.timings_s["stop"] = time.monotonic() - mark
        report.runtime_pid_gone = isinstance(pid, int) and not _pid_alive(pid)
    report.timings_s["total"] = time.monotonic() - started
    return report


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def report_table(report: DemoReport) -> Table:
    """The demo's summary as a rich table."""
    table = Table(title="companion-runtime demo", show_header=True)
    table.add_column("step")
    table.add_column("result")
    table.add_row(
        "tampered copy (1 bit flipped)",
        f"refused: {report.tampered_reason}"
        + (", nothing stored" if report.tampered_left_nothing else ", SOMETHING STORED"),
    )
    table.add_row("model pull", f"{report.pull_reason} ({report.model_bytes:,} bytes, SHA-256)")
    table.add_row("limits", f"max_in_flight {MAX_IN_FLIGHT}, queue_bound {QUEUE_BOUND}")
    table.add_row("requests sent", str(report.sent))
    table.add_row(
        "served by llama.cpp", f"{report.served} ({report.correct_answers} expected answers)"
    )
    table.add_row("peak in flight / queued", f"{report.peak_in_flight} / {report.peak_queued}")
    refused = ", ".join(
        f"{reason} {count}" for reason, count in sorted(report.refused_by_reason.items())
    )
    table.add_row("refused (503)", refused or "none")
    after_stop = "gone" if report.runtime_pid_gone else "STILL THERE"
    # A step that failed before the start (a refused pull) leaves nothing to be gone.
    table.add_row(
        "runtime process after stop", after_stop if report.runtime_started else "never started"
    )
    timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report.timings_s.items())
    table.add_row("timings", timings)
    if report.failure:
        table.add_row("failure", report.failure)
    return table


def _llama_importable(cancel: threading.Event) -> bool:
    """Whether ``import xllamacpp`` works, tried in a child interpreter.

    A package that is present but cannot be imported (a broken or partial install) is found
    here rather than as a runtime that dies while starting; the child keeps llama.cpp's native
    libraries out of this process. Once ``cancel`` is set the child is killed and reaped at
    once (the answer is then ``False``; the caller asks ``cancel`` first).
    """
    if not llama_available():
        return False
    try:
        child = subprocess.Popen(
            # -P: not from the working directory, where anyone may have left an xllamacpp.py.
            [sys.executable, "-P", "-c", "import xllamacpp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return False
    deadline = time.monotonic() + _IMPORT_CHECK_TIMEOUT_S
    try:
        while True:
            try:
                return child.wait(timeout=_CANCEL_POLL_S) == 0
            except subprocess.TimeoutExpired:
                if cancel.is_set() or time.monotonic() > deadline:
                    return False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def _run_demo_until_signal(
    say: Callable[[str], None], cancel: threading.Event
) -> DemoReport | None:
    """:func:`run_demo`, cancelled by SIGINT, SIGTERM or SIGHUP (``None`` then), or at once
    when ``cancel`` was set before (by the caller's own handlers, for a signal that came before
    this loop's).

    A signal's default action would end the process on the spot: the runtime dies with it
    (``PR_SET_PDEATHSIG``), but its temporary directories (the store with the model, the
    front door's token file, the runtime's API key, the origin's CA) would stay behind.
    Cancelled, every step unwinds and removes what it made. A second signal while that runs
    changes nothing: it takes well under a second.
    """
    task = asyncio.ensure_future(run_demo(say=say))
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            task.cancel()

    loop = asyncio.get_running_loop()
    # Handlers can only be set from the main thread (the CLI's own); elsewhere nothing changes.
    signals = (
        (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if threading.current_thread() is threading.main_thread()
        else ()
    )
    previous = {signum: signal.getsignal(signum) for signum in signals}
    # Blocked while the loop's handlers replace the caller's: a signal that comes in between
    # is held by the kernel and delivered to the loop's once they are in, and one that came
    # just before is handed to the caller's (the unblock runs pending Python handlers).
    with _blocked(signals):
        for signum in signals:
            loop.add_signal_handler(signum, on_signal)
    if cancel.is_set():
        on_signal()
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            return None
        raise
    finally:
        # The caller's handlers back in place (the loop's removal leaves the default action),
        # blocked again so that no signal finds the default in between.
        with _blocked(signals):
            for signum in signals:
                loop.remove_signal_handler(signum)
                handler = previous[signum]
                if handler is not None:  # None: set outside Python, left as the loop leaves it
                    signal.signal(signum, handler)


@contextlib.contextmanager
def _blocked(signals: Sequence[signal.Signals]) -> Iterator[None]:
    """Hold ``signals`` back while inside (where the platform can); on leaving, those that
    came in are delivered."""
    if not signals or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def demo_main(console: Console | None = None, *, cancel: threading.Event | None = None) -> int:
    """Run the demo with console output; return the exit code.

    SIGINT, SIGTERM or SIGHUP stop it: what it started is stopped and removed, ``refused:
    cancelled`` goes to stderr, and the exit code is 1. ``cancel``, set by the caller's own
    signal handlers (the CLI installs them before anything else), does the same for a signal
    that came before the demo's event loop handles them: the demo then starts nothing more.
    """
    cancel = cancel if cancel is not None else threading.Event()
    console = console or Console()
    importable = not cancel.is_set() and _llama_importable(cancel)
    if cancel.is_set():
        return _cancelled()
    if not importable:
        # Printed verbatim: as markup, "[llama]" would be swallowed as a style tag, and a
        # wrapped line would split the command.
        console.print(INSTALL_HINT, markup=False, highlight=False, soft_wrap=True)
        return 1
    report = run_loop(
        _run_demo_until_signal(
            say=lambda step: console.print(f"[bold]>[/bold] {step}"), cancel=cancel
        )
    )
    if report is None:
        return _cancelled()
    console.print(report_table(report))
    return 0 if report.ok else 1


def _cancelled() -> int:
    Console(stderr=True).print(f"refused: {Reason.CANCELLED.value}", highlight=False)
    return 1
