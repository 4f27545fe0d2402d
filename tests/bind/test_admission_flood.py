"""Floods through the admission controller: bursts, random deadlines, random cancellations.

Two runtimes: an in-process async handler (10,000 requests) and the real llama.cpp server
on the tiny model (2,000 requests, over loopback HTTP). After every flood both counters are
back to zero, the runtime never saw more than
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
from pathlib import Path

import httpx
import pytest

from companion_runtime.bind.admission import AdmissionController, AdmissionRefused
from companion_runtime.bind.llama_server import llama_available
from tests.support.admission import ready_controller
from tests.support.llama import (
    PARALLEL,
    embedded_command,
    free_port,
    running_llama_server,
    write_model,
)

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
    # Cancels that land while the body runs depend on how the loop is scheduled (4 of 10,000
    # on a busy machine, more on a quiet one); one is enough to show the path was taken.
    assert tally.cancelled_in_body >= 1
    print(
        f"\n10,000 in-process: {elapsed:.2f} s; served {tally.served}, refused "
        f"{dict(tally.refused)}, cancelled waiting {tally.cancelled_waiting}, cancelled "
        f"running {tally.cancelled_in_body}; max active {tally.max_active}, "
        f"peak queued {stats.peak_queued}"
    )


def _gauge(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name + " missing from /metrics")


@pytest.mark.skipif(not llama_available(), reason="llama extra (xllamacpp) not installed")
def test_flood_of_2000_through_the_real_llama_server(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    max_in_flight = PARALLEL  # the server's own slots: it should never have to queue
    statuses: Counter[int] = Counter()
    server_view = {"samples": 0, "max_processing": 0.0, "max_deferred": 0.0}

    with running_llama_server(embedded_command(model, free_port()), tmp_path) as server:
        base_url = server.base_url

        async def main() -> tuple[AdmissionController, FloodTally]:
            controller = ready_controller(max_in_flight=max_in_flight, queue_bound=16)
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
            timeout = httpx.Timeout(30.0)
            async with (
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client,
                httpx.AsyncClient(base_url=base_url, timeout=timeout) as observer,
            ):

                async def completion(rng: random.Random) -> None:
                    # The "runtime saw it" window is send .. end of the response body, which
                    # is exactly the span of this call inside the slot.
                    body = {"prompt": "hello", "n_predict": rng.choice((1, 2, 4, 8))}
                    response = await client.post("/completion", json=body)
                    statuses[response.status_code] += 1

                async def watch_server(stop: asyncio.Event) -> None:
                    # The server's own gauges, sampled outside the controller.
                    while not stop.is_set():
                        metrics = (await observer.get("/metrics")).text
                        server_view["samples"] += 1
                        server_view["max_processing"] = max(
                            server_view["max_processing"],
                            _gauge(metrics, "llamacpp:requests_processing"),
                        )
                        server_view["max_deferred"] = max(
                            server_view["max_deferred"],
                            _gauge(metrics, "llamacpp:requests_deferred"),
                        )
                        await asyncio.sleep(0.005)

                stop = asyncio.Event()
                async with asyncio.TaskGroup() as group:
                    group.create_task(watch_server(stop))
                    try:
                        tally = await flood(
                            controller,
                            completion,
                            requests=2_000,
                            seed=20261129,
                            burst_max=20,
                            gap_s=0.02,
                            cancel_share=0.1,
                            cancel_within_s=0.005,
                            deadline_choices_s=(None, None, 0.001, 0.005, 0.02, 1.0),
                        )
                    finally:
                        stop.set()
            return controller, tally

        started = time.monotonic()
        controller, tally = asyncio.run(main())
        elapsed = time.monotonic() - started
        final_metrics = httpx.get(base_url + "/metrics", timeout=5.0).text

    stats = controller.statistics()
    print(
        f"\n2,000 real llama.cpp: {elapsed:.2f} s; served {tally.served}, refused "
        f"{dict(tally.refused)}, cancelled waiting {tally.cancelled_waiting}, cancelled "
        f"running {tally.cancelled_in_body}; client max active {tally.max_active}, peak "
        f"queued {stats.peak_queued}; server /metrics ({server_view['samples']} samples) max "
        f"processing {server_view['max_processing']:.0f}, max deferred "
        f"{server_view['max_deferred']:.0f}"
    )
    assert_accounted(controller, tally)
    # Every request the runtime answered was a success: the controller never let it overload.
    assert set(statuses) == {200}
    assert statuses[200] == tally.served
    assert tally.max_active == max_in_flight
    assert stats.peak_queued == stats.queue_bound
    assert tally.served > 300
    assert tally.refused["queue_full"] > 50
    assert tally.cancelled_waiting > 10
    # The server's own view, sampled: it never ran more than the controller admitted, except
    # for as long as a request whose client was cancelled mid-response took to finish (the
    # server completes a non-streamed request after its client hung up).
    assert server_view["samples"] > 10
    assert server_view["max_processing"] <= max_in_flight + tally.cancelled_in_body
    assert server_view["max_deferred"] <= tally.cancelled_in_body
    assert _gauge(final_metrics, "llamacpp:requests_processing") == 0
