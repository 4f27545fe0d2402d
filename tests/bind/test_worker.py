"""Long blocking work in a worker thread that a cancelled task stops instead of leaving behind."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from companion_runtime.bind.worker import run_cancellable

pytestmark = [pytest.mark.anyio, pytest.mark.unit]


def _until_cancelled(cancel: threading.Event, seen: list[str]) -> str:
    """Work that only ends when told to (or after 30 s), as a long hash or download would."""
    seen.append("started")
    stopped = cancel.wait(30)
    time.sleep(0.2)  # what it takes to stop between two buffers, at the most
    seen.append("stopped" if stopped else "finished")
    return "result"


async def test_the_result_of_work_that_was_not_cancelled() -> None:
    assert await run_cancellable(lambda cancel: f"set: {cancel.is_set()}") == "set: False"


async def test_a_cancel_tells_the_work_to_stop_and_waits_for_it() -> None:
    seen: list[str] = []
    task = asyncio.create_task(run_cancellable(lambda cancel: _until_cancelled(cancel, seen)))
    while not seen:
        await asyncio.sleep(0.01)
    cancelled_at = time.monotonic()
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # a second cancel does not cut the wait for the thread short
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread is over when the cancellation arrives, and did not run to its end.
    assert seen == ["started", "stopped"]
    assert 0.2 <= time.monotonic() - cancelled_at < 1


async def test_an_error_of_the_work_reaches_the_caller() -> None:
    def fail(_cancel: threading.Event) -> None:
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        await run_cancellable(fail)
