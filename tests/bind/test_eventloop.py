"""The event loop serve and demo run on."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys

import pytest

from companion_runtime.bind.eventloop import run


def test_run_returns_the_result_on_uvloop_where_it_is_installed() -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    module = run(main())
    if importlib.util.find_spec("uvloop") is not None:
        assert module.startswith("uvloop")
    else:
        assert module.startswith("asyncio")


_UNDER_A_LIMIT = """
import resource, sys
from companion_runtime.bind import eventloop

if sys.argv[2] == "unchecked":
    eventloop._LOOP_DESCRIPTORS = 0  # as if descriptors ran out after the count
async def main() -> None:
    raise AssertionError("never run")
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
try:
    eventloop.run(main())
except eventloop.EventLoopUnavailable as error:
    print("unavailable:", error.strerror)
"""


@pytest.mark.parametrize(
    ("limit", "how"),
    [
        (6, "counted"),
        (8, "counted"),
        (10, "counted"),
        (11, "counted"),
        # With the count off, where the set-up fails after the loop was made. Below 9, libuv
        # aborts the process while making its loop, which only the count prevents.
        (10, "unchecked"),
        (11, "unchecked"),
    ],
)
def test_too_few_descriptors_for_a_loop_is_event_loop_unavailable(limit: int, how: str) -> None:
    """In a child under ``RLIMIT_NOFILE``: libuv aborted the process (6), failed in the loop's
    creation (8) or in its signal set-up's ``socketpair``, after which closing the loop raised
    ``RuntimeError`` (10, 11). Also where the count passed but the set-up then failed."""
    finished = subprocess.run(
        [sys.executable, "-c", _UNDER_A_LIMIT, str(limit), how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout == "unavailable: Too many open files\n"
    assert "Traceback" not in finished.stderr
