"""The event loop that ``serve`` and ``demo`` run on.

``uvloop`` (libuv underneath) where it is installed, which is every platform but Windows with
the package's own dependencies; asyncio's own loop otherwise. The front door is on the path of
every request, and on a small machine it shares the cores with the runtime: on uvloop it spent
0.105–0.110 ms of CPU per proxied completion against 0.125–0.129 ms on asyncio's loop (three
runs each of 2,008 requests at concurrency 8, CPU time read from ``/proc`` around the front
door's process; ``docs/benchmarks.md``). Both loops run the same code; nothing here depends on
which one it is.

The loop's worker threads (``asyncio.to_thread``, ``run_in_executor``, and libuv's own, which
uvloop gives name lookups) block SIGINT, SIGTERM and SIGHUP, so these always reach the main
thread. The loop's handlers give way to others when it stops (``serve`` ignores the signals
from then on, the demo puts the caller's handlers back) with the signals blocked on the main
thread, as the loop's removal leaves each at its default action for a moment: a signal sent
then went to a worker thread that did not block it, and ended the process by its default
action after it had cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

__all__ = ["EventLoopUnavailable", "new_event_loop", "run"]

_T = TypeVar("_T")

#: Handled on the main thread alone (see the module docstring).
_MAIN_THREAD_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


#: Makes a new event loop of the preferred kind.
new_event_loop: Callable[[], asyncio.AbstractEventLoop] = _factory()


#: Descriptors a loop takes for itself: libuv's epoll, its wakeup eventfd, its signal pipe and
#: the self-pipe Python's signal wakeup writes to (nine on uvloop, counted), with room to spare.
_LOOP_DESCRIPTORS: Final = 12


class EventLoopUnavailable(Exception):
    """No event loop could be made: too few descriptors left (``ulimit -n``), or no memory."""

    def __init__(self, strerror: str) -> None:
        super().__init__(strerror)
        self.strerror = strerror


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on the preferred loop.

    Raises :class:`EventLoopUnavailable`, ``main`` never run, where the loop cannot be made.
    Below a few free descriptors libuv aborts the process in its loop's setup (uvloop's
    ``new_event_loop``), and a little above that its signal set-up's ``socketpair`` failed in
    the first run and left a loop that could not even be closed: a ``RuntimeError`` traceback.
    """
    try:
        _check_free_descriptors(_LOOP_DESCRIPTORS)
        runner = asyncio.Runner(loop_factory=new_event_loop)
        try:
            loop = runner.get_loop()
        except BaseException:
            with contextlib.suppress(Exception):
                runner.close()
            raise
    except OSError as error:
        main.close()
        raise EventLoopUnavailable(error.strerror or "no event loop") from None
    broken: OSError | None = None
    try:
        loop.set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=_block_signals)
        )
        # libuv starts all of its worker threads at the first task it gives them, with the
        # mask of the thread that gives it: started here, they block the signals too.
        mask = _block_signals()
        try:
            runner.run(_start_worker_threads())
        except OSError as error:
            broken = error
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if broken is None:
            return runner.run(main)
    finally:
        if broken is None:
            runner.close()
        else:
            # uvloop's signal set-up failed inside its first run, which left the loop marked
            # running: it can be neither run nor closed again, only dropped.
            with contextlib.suppress(RuntimeError):
                runner.close()
    main.close()
    raise EventLoopUnavailable(broken.strerror or "no event loop")


def _check_free_descriptors(count: int) -> None:
    """Raise ``OSError`` (``EMFILE``) unless ``count`` more descriptors can be opened now."""
    opened: list[int] = []
    try:
        while len(opened) < count:
            opened.extend(os.pipe())
    finally:
        for fd in opened:
            os.close(fd)


def _block_signals() -> set[int | signal.Signals] | None:
    """Block the signals the main thread handles in this thread (in a worker thread, from its
    start: threads it starts inherit that); return the mask before, where there is one."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


async def _start_worker_threads() -> None:
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().getaddrinfo("localhost", None)
