"""The event loop that ``serve`` and ``demo`` run on.

``uvloop`` (libuv underneath) where it is installed, which is every platform but Windows with
the package's own dependencies; asyncio's own loop otherwise. The front door is on the path of
every request, and on a small machine it shares the cores with the runtime: on uvloop it spent
0.105–0.110 ms of CPU per proxied completion against 0.125–0.129 ms on asyncio's loop (three
runs each of 2,008 requests at concurrency 8, CPU time read from ``/proc`` around the front
door's process; ``docs/benchmarks.md``). Both loops run the same code; nothing here depends on
which one it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run"]

_T = TypeVar("_T")


def _factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


#: Makes a new event loop of the preferred kind.
new_event_loop: Callable[[], asyncio.AbstractEventLoop] = _factory()


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on the preferred loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
