"""Long blocking work in a worker thread that stops when the task awaiting it is cancelled.

``asyncio.to_thread`` cannot stop its thread: cancelling the task that awaits it abandons the
thread, which runs on to the end, and the event loop's shutdown (``asyncio.run``,
``asyncio.Runner.close``) then waits for it. For long work, hashing a multi-GB blob or a
download, a signal would take seconds to be honoured. :func:`run_cancellable` hands the work a
:class:`threading.Event` instead; when the awaiting task is cancelled it sets the event, waits
for the thread to return (the work asks the event every few milliseconds to every
:data:`~companion_runtime.bind.httpsget.POLL_S`), and only then re-raises the cancellation. When
it has returned or raised, the work is over: no thread is left for the event loop to wait on,
and no lock or file is still held by it.

Short blocking calls (a psutil sample, reading a manifest) keep using ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_cancellable"]

_T = TypeVar("_T")


async def run_cancellable(work: Callable[[threading.Event], _T]) -> _T:
    """``work(cancel)`` in a worker thread; cancelling this sets ``cancel``, waits, re-raises.

    ``work`` must return soon after ``cancel`` is set; what it returns then is dropped (a
    ``cancelled`` verdict says nothing about a file, so no caller ever sees one as a refusal).
    A second cancellation while waiting does not cut the wait short.
    """
    cancel = threading.Event()
    running = asyncio.ensure_future(asyncio.to_thread(work, cancel))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        cancel.set()
        while not running.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({running})
        if not running.cancelled():
            running.exception()  # retrieved: an error after the cancel is not logged as lost
        raise
