"""Floods through the admission controller: bursts, random deadlines, random cancellations.

After every flood both counters are back to zero, the runtime never saw more than
``max_in_flight`` requests at once, the queue never held more than ``queue_bound``, and every
request sent is accounted for exactly once: served, refused (by reason) or cancelled.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from companion_runtime.bind.admission import AdmissionController, AdmissionRefused
from tests.support.admission import ready_controller

pytestmark = pytest.mark.stress


@dataclass
class FloodTally:
    """What the clients saw, counted independently of the controller."""

    sent: int = 0
    served: int = 0
    #: Admitted, then cancelled while the runtime was working on it.
    cancelled_in_body: int = 0
    #: Cancelled before it was admitted or refused.
    cancelled_waiting: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    #: Requests between "sent to the runtime" and "response finished", now and at most.
    active: int = 0
    max_active: int = 0


async def flood(
    controller: AdmissionController,
    handler: Callable[[random.Random], Awaitable[None]],
    *,
    requests: int,
    seed: int,
    burst_max: int,
    gap_s: float,
    cancel_share: float,
    cancel_within_s: float,
    deadline_choices_s: tuple[float | None, ...],
) -> FloodTally:
    """Send ``requests`` requests in random bursts; cancel a random share at random moments."""
    rng = random.Random(seed)
    tally = FloodTally()
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    timers: list[asyncio.TimerHandle] = []

    async def one(deadline_in_s: float | None) -> None:
        deadline = None if deadline_in_s is None else time.monotonic() + deadline_in_s
        entered = False
        try:
            async with controller.slot(deadline=deadline):
                entered = True
                tally.active += 1
                tally.max_active = max(tally.max_active, tally.active)
                try:
                    await handler(rng)
                finally:
                    tally.active -= 1
            tally.served += 1
        except AdmissionRefused as refusal:
            tally.refused[refusal.reason.value] += 1
        except asyncio.CancelledError:
            if entered:
                tally.cancelled_in_body += 1
            else:
                tally.cancelled_waiting += 1
            raise

    while tally.sent < requests:
        burst = min(rng.randint(1, burst_max), requests - tally.sent)
        for _ in range(burst):
            task = asyncio.ensure_future(one(rng.choice(deadline_choices_s)))
            tasks.append(task)
            tally.sent += 1
            if rng.random() < cancel_share:
                # A loop timer, not a task: it is cancelled below if still pending.
                timers.append(loop.call_later(rng.uniform(0, cancel_within_s), task.cancel))
        await asyncio.sleep(rng.uniform(0, gap_s))
    await asyncio.gather(*tasks, return_exceptions=True)
    for timer in timers:
        timer.cancel()
    return tally


def assert_accounted(controller: AdmissionController, tally: FloodTally) -> None:
    stats = controller.statistics()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert tally.active == 0
    assert tally.max_active <= stats.max_in_flight
    assert stats.peak_in_flight <= stats.max_in_flight
    assert stats.peak_queued <= stats.queue_bound
    assert tally.sent == tally.served + tally.cancelled_in_body + tally.cancelled_waiting + sum(
        tally.refused.values()
    )
    assert stats.admitted_total == tally.served + tally.cancelled_in_body
    assert stats.completed_total == stats.admitted_total
    assert dict(stats.refused_by_reason) == dict(tally.refused)
    assert stats.refused_total == sum(tally.refused.values())
    assert stats.cancelled_total == tally.cancelled_waiting


async def in_process_runtime(rng: random.Random) -> None:
    # Mostly very short work, sometimes a millisecond or two, so the queue fills and drains.
    await asyncio.sleep(rng.choice((0.0, 0.0, 0.0, 0.0005, 0.001, 0.002)))


def test_flood_of_10000_through_an_in_process_runtime() -> None:
    async def main() -> tuple[AdmissionController, FloodTally]:
        controller = ready_controller(max_in_flight=8, queue_bound=64)
        tally = await flood(
            controller,
            in_process_runtime,
            requests=10_000,
            seed=20261128,
            burst_max=60,
            gap_s=0.002,
            cancel_share=0.1,
            cancel_within_s=0.005,
            deadline_choices_s=(None, None, 0.001, 0.005, 0.02, 1.0),
        )
        return controller, tally

    started = time.monotonic()
    controller, tally = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert_accounted(controller, tally)
    stats = controller.statistics()
    # The flood must really have exercised every path, not just the easy one.
    assert tally.max_active == stats.max_in_flight
    assert stats.peak_queued == stats.queue_bound
    assert tally.served > 1000
    assert tally.refused["queue_full"] > 100
    assert tally.refused["queue_timeout"] > 100
    assert tally.cancelled_waiting > 50
    assert tally.cancelled_in_body > 10
    print(
        f"\n10,000 in-process: {elapsed:.2f} s; served {tally.served}, refused "
        f"{dict(tally.refused)}, cancelled waiting {tally.cancelled_waiting}, cancelled "
        f"running {tally.cancelled_in_body}; max active {tally.max_active}, "
        f"peak queued {stats.peak_queued}"
    )
