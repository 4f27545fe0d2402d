"""Benchmark of the admission controller (not a test; prints figures).

    .venv/bin/python bench/bench_admission.py [--quick]

1. Uncontended ``async with controller.slot()`` (acquire + release), median per operation,
   next to a bare ``asyncio.Semaphore`` measured in the same run, and the ratio.
2. 1,000 waiters behind a full set of slots: FIFO order verified, per-request cost of the
   queue (enter, hand-off, release) next to ``asyncio.Semaphore`` with the same load.
The third figure of the admission work, "time from the runtime's first healthy answer to
ready", needs a real runtime and the supervisor: ``bench/bench_supervisor.py`` measures it.

Each figure is the median over repeated rounds; rounds of the controller and the reference
alternate so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from companion_runtime import (
    Lifecycle,
    LifecycleState,
    ResourceObservation,
    create_admission_state,
    create_resource_limits,
    evaluate_runtime_request,
    record_completion,
    record_in_flight,
)
from companion_runtime.bind.admission import AdmissionController

LIMITS = create_resource_limits(
    max_ram_bytes=8_000_000_000, max_vram_bytes=4_000_000_000, max_cpu_percent=90
)
CALM = ResourceObservation(ram_bytes=1_000_000_000, vram_bytes=0, cpu_percent=10.0)
READY = Lifecycle(LifecycleState.READY)


def ready_controller(max_in_flight: int, queue_bound: int) -> AdmissionController:
    controller = AdmissionController(
        max_in_flight=max_in_flight, queue_bound=queue_bound, resource_limits=LIMITS
    )
    controller.set_lifecycle(READY)
    controller.update_resources(CALM, taken_at=time.monotonic())
    return controller


# --- 1. uncontended ------------------------------------------------------------------------------


async def _batch_controller(controller: AdmissionController, operations: int) -> float:
    started = time.perf_counter()
    for _ in range(operations):
        async with controller.slot():
            pass
    return (time.perf_counter() - started) / operations


async def _batch_semaphore(semaphore: asyncio.Semaphore, operations: int) -> float:
    started = time.perf_counter()
    for _ in range(operations):
        async with semaphore:
            pass
    return (time.perf_counter() - started) / operations


def _batch_core_only(operations: int) -> float:
    # The decision and the two commits alone: what the controller adds on top is the rest.
    state = create_admission_state(max_in_flight=4, queue_bound=64)
    started = time.perf_counter()
    for _ in range(operations):
        evaluate_runtime_request(
            lifecycle_state=READY,
            admission_state=state,
            resource_observation=CALM,
            resource_limits=LIMITS,
        )
        record_completion(record_in_flight(state))
    return (time.perf_counter() - started) / operations


async def uncontended(rounds: int, operations: int) -> dict[str, float]:
    controller = ready_controller(4, 64)
    semaphore = asyncio.Semaphore(4)
    controller_times: list[float] = []
    semaphore_times: list[float] = []
    core_times: list[float] = []
    await _batch_controller(controller, operations)  # warm-up
    await _batch_semaphore(semaphore, operations)
    for _ in range(rounds):
        # What the supervisor's sampler does about once a second: keep the sample fresh.
        controller.update_resources(CALM, taken_at=time.monotonic())
        controller_times.append(await _batch_controller(controller, operations))
        semaphore_times.append(await _batch_semaphore(semaphore, operations))
        core_times.append(_batch_core_only(operations))
    return {
        "controller": statistics.median(controller_times),
        "semaphore": statistics.median(semaphore_times),
        "core": statistics.median(core_times),
    }


# --- 2. 1,000 waiters ----------------------------------------------------------------------------


async def _queue_round(
    slot: Callable[[], AbstractAsyncContextManager[object]], slots: int, waiters: int
) -> tuple[float, bool]:
    """Fill every slot, queue ``waiters`` behind them, then release; time the drain."""
    order: list[int] = []
    gate = asyncio.Event()

    async def holder() -> None:
        async with slot():
            await gate.wait()

    async def waiter(index: int) -> None:
        async with slot():
            order.append(index)

    holders = [asyncio.ensure_future(holder()) for _ in range(slots)]
    for _ in range(3):
        await asyncio.sleep(0)
    queued = [asyncio.ensure_future(waiter(index)) for index in range(waiters)]
    for _ in range(3):
        await asyncio.sleep(0)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*holders, *queued)
    elapsed = time.perf_counter() - started
    return elapsed / waiters, order == list(range(waiters))


def _same(semaphore: asyncio.Semaphore) -> asyncio.Semaphore:
    # An asyncio.Semaphore is its own context manager.
    return semaphore


async def contended(rounds: int, waiters: int) -> dict[str, float | bool]:
    slots = 4
    controller_times: list[float] = []
    semaphore_times: list[float] = []
    fifo_kept = True
    semaphore_fifo = True
    for _ in range(rounds):
        controller = ready_controller(slots, waiters)
        per_request, in_order = await _queue_round(controller.slot, slots, waiters)
        controller_times.append(per_request)
        fifo_kept = fifo_kept and in_order
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued) == (0, 0)
        assert stats.peak_queued == waiters

        semaphore = asyncio.Semaphore(slots)
        per_request, in_order = await _queue_round(
            functools.partial(_same, semaphore), slots, waiters
        )
        semaphore_times.append(per_request)
        semaphore_fifo = semaphore_fifo and in_order
    return {
        "controller": statistics.median(controller_times),
        "semaphore": statistics.median(semaphore_times),
        "fifo": fifo_kept,
        "semaphore_fifo": semaphore_fifo,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    arguments = parser.parse_args()
    rounds = 5 if arguments.quick else 31
    operations = 2_000 if arguments.quick else 10_000
    queue_rounds = 3 if arguments.quick else 15

    solo = asyncio.run(uncontended(rounds, operations))
    queue = asyncio.run(contended(queue_rounds, 1_000))

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.2f} µs"

    print(f"uncontended acquire+release, median of {rounds} rounds x {operations} ops")
    print(f"  AdmissionController.slot()     {us(solo['controller'])}  (target <= 20 µs)")
    print(f"  asyncio.Semaphore (reference)  {us(solo['semaphore'])}")
    print(f"  ratio                          {solo['controller'] / solo['semaphore']:.1f}x")
    print(f"  of which core decision+commits {us(solo['core'])}")
    print(f"1,000 waiters behind 4 slots, median of {queue_rounds} rounds, per request")
    print(f"  AdmissionController            {us(float(queue['controller']))}")
    print(f"  asyncio.Semaphore (reference)  {us(float(queue['semaphore']))}")
    queue_ratio = float(queue["controller"]) / float(queue["semaphore"])
    print(f"  ratio                          {queue_ratio:.1f}x")
    print(f"  FIFO order kept: controller {queue['fifo']}, semaphore {queue['semaphore_fifo']}")
    # That figure needs a real runtime and the supervisor that watches it.
    print("time from first healthy answer to ready: see bench/bench_supervisor.py")


if __name__ == "__main__":
    main()
