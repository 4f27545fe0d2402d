"""Helpers for tests of the admission controller: a controller that is ready to admit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from companion_runtime import (
    Lifecycle,
    LifecycleState,
    ResourceObservation,
    create_resource_limits,
)
from companion_runtime.bind.admission import AdmissionController

READY = Lifecycle(LifecycleState.READY)
DRAINING = Lifecycle(LifecycleState.DRAINING)
STOPPED = Lifecycle(LifecycleState.STOPPED)
STARTING = Lifecycle(LifecycleState.STARTING)

MAX_RAM_BYTES = 8_000_000_000
LIMITS = create_resource_limits(
    max_ram_bytes=MAX_RAM_BYTES, max_vram_bytes=4_000_000_000, max_cpu_percent=90
)
#: A sample well within :data:`LIMITS`.
CALM = ResourceObservation(ram_bytes=1_000_000_000, vram_bytes=0, cpu_percent=10.0)
#: A sample whose RAM is one byte over :data:`LIMITS`.
RAM_OVER = ResourceObservation(ram_bytes=MAX_RAM_BYTES + 1, vram_bytes=0, cpu_percent=10.0)


class FakeClock:
    """A clock that moves only when told to; for sample ages the test must control."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ready_controller(
    *,
    max_in_flight: int,
    queue_bound: int,
    clock: Callable[[], float] = time.monotonic,
    max_sample_age_s: float = 3600.0,
) -> AdmissionController:
    """A controller in ``ready`` with a fresh calm sample (long max age unless told)."""
    controller = AdmissionController(
        max_in_flight=max_in_flight,
        queue_bound=queue_bound,
        resource_limits=LIMITS,
        max_sample_age_s=max_sample_age_s,
        clock=clock,
    )
    controller.set_lifecycle(READY)
    controller.update_resources(CALM, taken_at=clock())
    return controller


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop has had ``rounds`` idle turns."""
    for _ in range(rounds):
        await asyncio.sleep(0)
