"""The event loop serve and demo run on."""

from __future__ import annotations

import asyncio
import importlib.util

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
