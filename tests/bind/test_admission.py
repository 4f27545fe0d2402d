"""The admission controller, driven through its public API on a real event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import pickle
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from companion_runtime import Reason, ResourceObservation, SpecError
from companion_runtime.bind.admission import (
    RETRY_AFTER_S,
    AdmissionController,
    AdmissionRefused,
    AdmissionStatistics,
)
from tests.support.admission import (
    CALM,
    DRAINING,
    LIMITS,
    RAM_OVER,
    READY,
    STARTING,
    STOPPED,
    FakeClock,
    ready_controller,
    settle,
)

pytestmark = pytest.mark.unit


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def wrapper() -> None:
        await main()

    asyncio.run(wrapper())


class Holder:
    """A request that holds its slot until released; records what happened to it."""

    def __init__(self, controller: AdmissionController, *, deadline: float | None = None) -> None:
        self.controller = controller
        self.deadline = deadline
        self.release = asyncio.Event()
        self.entered = False
        self.refused: Reason | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with self.controller.slot(deadline=self.deadline):
                self.entered = True
                await self.release.wait()
        except AdmissionRefused as refusal:
            self.refused = refusal.reason


async def finish_all(holders: list[Holder]) -> None:
    for holder in holders:
        holder.release.set()
    await asyncio.gather(*(holder.task for holder in holders), return_exceptions=True)


def assert_idle(controller: AdmissionController) -> None:
    stats = controller.statistics()
    assert stats.in_flight == 0
    assert stats.queued == 0
    assert stats.admitted_total == stats.completed_total


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_in_flight", "queue_bound"), [(0, 1), (1, 0), (-1, 1), (True, 1), (1.0, 1)]
)
def test_bounds_must_be_positive_ints(max_in_flight: object, queue_bound: object) -> None:
    with pytest.raises(SpecError):
        AdmissionController(
            max_in_flight=max_in_flight,  # type: ignore[arg-type]
            queue_bound=queue_bound,  # type: ignore[arg-type]
            resource_limits=LIMITS,
        )


def test_limits_must_be_resource_limits() -> None:
    with pytest.raises(SpecError) as caught:
        AdmissionController(max_in_flight=1, queue_bound=1, resource_limits=object())  # type: ignore[arg-type]
    assert caught.value.reason is Reason.MALFORMED_LIMITS


@pytest.mark.parametrize("age", [0, -1.0, math.nan, math.inf, True, "5"])
def test_max_sample_age_must_be_finite_positive(age: object) -> None:
    with pytest.raises(SpecError):
        AdmissionController(
            max_in_flight=1,
            queue_bound=1,
            resource_limits=LIMITS,
            max_sample_age_s=age,  # type: ignore[arg-type]
        )


# --- refusals without waiting -----------------------------------------------------------------


def test_starts_stopped_and_refuses_not_ready() -> None:
    async def main() -> None:
        controller = AdmissionController(max_in_flight=2, queue_bound=2, resource_limits=LIMITS)
        controller.update_resources(CALM, taken_at=time.monotonic())
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pytest.fail("admitted while stopped")
        assert caught.value.reason is Reason.NOT_READY
        assert str(caught.value) == "not_ready"
        assert caught.value.retry_after_s >= 1
        stats = controller.statistics()
        assert stats.refused_total == 1
        assert dict(stats.refused_by_reason) == {"not_ready": 1}
        assert stats.admitted_total == 0

    run(main)


def test_no_sample_refuses_malformed_observation() -> None:
    async def main() -> None:
        controller = AdmissionController(max_in_flight=2, queue_bound=2, resource_limits=LIMITS)
        controller.set_lifecycle(READY)
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pytest.fail("admitted without a sample")
        assert caught.value.reason is Reason.MALFORMED_OBSERVATION

    run(main)


def test_uncontended_slot_admits_and_releases() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=2, queue_bound=2)
        async with controller.slot():
            assert controller.statistics().in_flight == 1
            async with controller.slot():
                assert controller.statistics().in_flight == 2
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued) == (0, 0)
        assert (stats.admitted_total, stats.completed_total, stats.refused_total) == (2, 2, 0)
        assert stats.peak_in_flight == 2
        assert stats.peak_queued == 0

    run(main)


class _CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the futures handed out through it."""

    futures_created = 0

    def create_future(self) -> asyncio.Future[object]:
        self.futures_created += 1
        return super().create_future()


def test_uncontended_path_creates_no_future_and_no_task() -> None:
    loop = _CountingLoop()
    try:

        async def main() -> None:
            controller = ready_controller(max_in_flight=2, queue_bound=2)
            tasks_before = len(asyncio.all_tasks())
            for _ in range(100):
                async with controller.slot(deadline=time.monotonic() + 10):
                    assert len(asyncio.all_tasks()) == tasks_before
            assert loop.futures_created == 0
            # Waiting is what costs one future (the holders' own Event.wait() take one each).
            holders = [Holder(controller) for _ in range(2)]
            await settle()
            before_waiting = loop.futures_created
            holders.append(Holder(controller))
            await settle()
            assert controller.statistics().queued == 1
            assert loop.futures_created == before_waiting + 1
            await finish_all(holders)

        loop.run_until_complete(main())
    finally:
        loop.close()


def test_refusal_survives_pickling() -> None:
    refusal = pickle.loads(pickle.dumps(AdmissionRefused(Reason.QUEUE_FULL)))
    assert refusal.reason is Reason.QUEUE_FULL
    assert str(refusal) == "queue_full"
    assert refusal.retry_after_s == RETRY_AFTER_S[Reason.QUEUE_FULL]


def test_queue_full_at_exactly_max_in_flight_plus_queue_bound() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=3, queue_bound=5)
        holders = [Holder(controller) for _ in range(8)]
        await settle()
        assert sum(holder.entered for holder in holders) == 3
        assert all(holder.refused is None for holder in holders)
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued) == (3, 5)
        # The ninth finds every slot and every queue place taken.
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pytest.fail("admitted past the bound")
        assert caught.value.reason is Reason.QUEUE_FULL
        assert caught.value.retry_after_s == RETRY_AFTER_S[Reason.QUEUE_FULL] >= 1
        await finish_all(holders)
        assert all(holder.entered for holder in holders)
        stats = controller.statistics()
        assert stats.peak_queued == 5
        assert stats.peak_in_flight == 3
        assert dict(stats.refused_by_reason) == {"queue_full": 1}
        assert_idle(controller)

    run(main)


# --- FIFO -----------------------------------------------------------------------------------------


def test_fifo_order_under_contention() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=3, queue_bound=100)
        order: list[int] = []

        async def request(index: int, hold_rounds: int) -> None:
            async with controller.slot():
                order.append(index)
                for _ in range(hold_rounds):
                    await asyncio.sleep(0)

        # Hold times vary so that slots free up in an order unrelated to arrival.
        tasks = []
        for index in range(60):
            tasks.append(asyncio.ensure_future(request(index, (index * 7) % 5)))
            if index % 4 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == list(range(60))
        assert controller.statistics().peak_queued > 10
        assert_idle(controller)

    run(main)


def test_newcomer_does_not_overtake_a_waiter_handed_a_slot() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        first = Holder(controller)
        await settle()
        waiter = Holder(controller)
        await settle()
        first.release.set()
        await first.task
        # The slot was handed to the waiter at release; a newcomer in the same moment queues.
        assert controller.statistics().in_flight == 1
        newcomer = Holder(controller)
        await settle()
        assert waiter.entered and not newcomer.entered
        await finish_all([waiter, newcomer])
        assert newcomer.entered
        assert_idle(controller)

    run(main)


# --- deadlines ----------------------------------------------------------------------------------


def test_deadline_refuses_queue_timeout_within_50_ms() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        holder = Holder(controller)
        await settle()
        started = time.monotonic()
        waiter = Holder(controller, deadline=started + 0.2)
        await waiter.task
        elapsed = time.monotonic() - started
        assert waiter.refused is Reason.QUEUE_TIMEOUT
        assert 0.2 <= elapsed < 0.25
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued) == (1, 0)
        assert dict(stats.refused_by_reason) == {"queue_timeout": 1}
        await finish_all([holder])
        assert_idle(controller)

    run(main)


def test_deadline_is_relative_to_the_injected_clock() -> None:
    async def main() -> None:
        # The fake clock is nowhere near the loop's clock; only clock()-relative conversion
        # makes the deadline fire after 0.1 s of real time.
        clock = FakeClock(start=1_000_000.0)
        controller = ready_controller(max_in_flight=1, queue_bound=4, clock=clock)
        holder = Holder(controller)
        await settle()
        started = time.monotonic()
        waiter = Holder(controller, deadline=clock() + 0.1)
        await waiter.task
        elapsed = time.monotonic() - started
        assert waiter.refused is Reason.QUEUE_TIMEOUT
        assert 0.1 <= elapsed < 0.15
        await finish_all([holder])
        assert_idle(controller)

    run(main)


def test_waiter_served_before_its_deadline_is_not_refused() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        holder = Holder(controller)
        await settle()
        waiter = Holder(controller, deadline=time.monotonic() + 0.1)
        await settle()
        holder.release.set()
        await settle()
        assert waiter.entered
        # Its timer was disarmed: waiting past the deadline changes nothing.
        await asyncio.sleep(0.15)
        assert waiter.refused is None
        assert controller.statistics().in_flight == 1
        await finish_all([holder, waiter])
        assert controller.statistics().refused_total == 0
        assert_idle(controller)

    run(main)


def test_past_deadline_refused_at_once_only_when_it_would_wait() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        past = time.monotonic() - 1
        # A free slot is taken whatever the deadline: the deadline bounds waiting.
        async with controller.slot(deadline=past):
            started = time.monotonic()
            with pytest.raises(AdmissionRefused) as caught:
                async with controller.slot(deadline=past):
                    pytest.fail("admitted past its deadline")
            assert time.monotonic() - started < 0.05
            assert caught.value.reason is Reason.QUEUE_TIMEOUT
            with pytest.raises(AdmissionRefused) as caught:
                async with controller.slot(deadline=math.nan):
                    pytest.fail("admitted with a NaN deadline")
            assert caught.value.reason is Reason.QUEUE_TIMEOUT
            assert controller.statistics().queued == 0
        assert_idle(controller)

    run(main)


def test_infinite_deadline_waits() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        holder = Holder(controller)
        await settle()
        waiter = Holder(controller, deadline=math.inf)
        await asyncio.sleep(0.02)
        assert controller.statistics().queued == 1
        await finish_all([holder, waiter])
        assert waiter.entered
        assert_idle(controller)

    run(main)


# --- cancellation and failing bodies ----------------------------------------------------------


def test_cancelled_waiters_give_their_place_back() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=2, queue_bound=6)
        holders = [Holder(controller) for _ in range(8)]
        await settle()
        waiting = holders[2:]
        for victim in (waiting[1], waiting[3], waiting[5]):
            victim.task.cancel()
        await settle()
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued, stats.cancelled_total) == (2, 3, 3)
        # The freed places are usable again.
        extra = [Holder(controller) for _ in range(3)]
        await settle()
        assert controller.statistics().queued == 6
        order_before = [holder for holder in holders if not holder.task.cancelled()]
        await finish_all(order_before + extra)
        for victim in (waiting[1], waiting[3], waiting[5]):
            assert victim.task.cancelled() and not victim.entered
        assert all(holder.entered for holder in order_before + extra)
        stats = controller.statistics()
        assert stats.admitted_total == 8
        assert stats.refused_total == 0
        assert_idle(controller)

    run(main)


def test_cancelled_running_bodies_release_their_slots() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=2, queue_bound=4)
        holders = [Holder(controller) for _ in range(5)]
        await settle()
        holders[0].task.cancel()
        holders[1].task.cancel()
        await settle()
        assert holders[0].task.cancelled() and holders[1].task.cancelled()
        assert holders[2].entered and holders[3].entered and not holders[4].entered
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued, stats.completed_total) == (2, 1, 2)
        await finish_all(holders[2:])
        assert_idle(controller)
        assert controller.statistics().cancelled_total == 0

    run(main)


def test_body_that_raises_frees_its_slot_and_the_error_propagates() -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=2)
        waiter: Holder | None = None
        with pytest.raises(Boom):
            async with controller.slot():
                waiter = Holder(controller)
                await settle()
                raise Boom
        assert waiter is not None
        await settle()
        assert waiter.entered
        await finish_all([waiter])
        stats = controller.statistics()
        assert (stats.admitted_total, stats.completed_total) == (2, 2)
        assert_idle(controller)

    run(main)


def test_base_exception_in_body_is_not_swallowed() -> None:
    class Stop(BaseException):
        pass

    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=1)
        with pytest.raises(Stop):
            async with controller.slot():
                raise Stop
        assert_idle(controller)

    run(main)


def test_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        first = Holder(controller)
        await settle()
        second = Holder(controller)
        third = Holder(controller)
        await settle()
        # Release and cancel in one synchronous step: the slot is handed to `second` and then
        # `second` is cancelled before it can resume.
        first.release.set()
        await asyncio.sleep(0)  # `first` runs: releases the slot, handing it to `second`
        assert controller.statistics().admitted_total == 2
        second.task.cancel()
        await settle()
        assert second.task.cancelled() and not second.entered
        assert third.entered
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued) == (1, 0)
        assert stats.cancelled_total == 1
        # admitted_total counts bodies that ran: the cancelled hand-off is not among them.
        assert stats.admitted_total == 2
        await finish_all([third])
        assert_idle(controller)

    run(main)


def test_waiter_cancelled_just_before_release_is_skipped() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        first = Holder(controller)
        await settle()
        second = Holder(controller)
        third = Holder(controller)
        await settle()
        # `first` is scheduled to run before `second` learns it was cancelled, so the release
        # finds a cancelled waiter at the head of the queue.
        first.release.set()
        second.task.cancel()
        await settle()
        assert second.task.cancelled() and not second.entered
        assert third.entered
        stats = controller.statistics()
        assert (stats.in_flight, stats.queued, stats.cancelled_total) == (1, 0, 1)
        await finish_all([third])
        assert_idle(controller)

    run(main)


def test_waiter_cancelled_as_it_is_refused_counts_as_cancelled() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        holder = Holder(controller)
        await settle()
        waiter = Holder(controller)
        await settle()
        # Refused and cancelled in one synchronous step: the caller never sees the refusal.
        controller.set_lifecycle(DRAINING)
        waiter.task.cancel()
        await settle()
        assert waiter.task.cancelled() and waiter.refused is None
        stats = controller.statistics()
        assert (stats.refused_total, stats.cancelled_total) == (0, 1)
        assert dict(stats.refused_by_reason) == {}
        assert (stats.in_flight, stats.queued) == (1, 0)
        await finish_all([holder])
        assert_idle(controller)

    run(main)


# --- lifecycle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("leaving_to", [DRAINING, STOPPED])
def test_leaving_ready_refuses_every_waiter_and_new_requests(leaving_to: object) -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=2, queue_bound=10)
        holders = [Holder(controller) for _ in range(7)]
        await settle()
        started = time.monotonic()
        controller.set_lifecycle(leaving_to)  # type: ignore[arg-type]
        # Refused synchronously, not at the next release.
        assert controller.statistics().queued == 0
        await asyncio.gather(*(holder.task for holder in holders[2:]))
        assert time.monotonic() - started < 0.05
        assert all(holder.refused is Reason.NOT_READY for holder in holders[2:])
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pytest.fail("admitted while not ready")
        assert caught.value.reason is Reason.NOT_READY
        assert caught.value.retry_after_s > RETRY_AFTER_S[Reason.QUEUE_FULL]
        # Running requests are left to finish (the drain).
        assert holders[0].entered and not holders[0].task.done()
        await finish_all(holders[:2])
        stats = controller.statistics()
        assert dict(stats.refused_by_reason) == {"not_ready": 6}
        assert_idle(controller)
        controller.set_lifecycle(READY)
        async with controller.slot():
            pass

    run(main)


def test_starting_is_not_ready() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=1)
        controller.set_lifecycle(STARTING)
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pass
        assert caught.value.reason is Reason.NOT_READY

    run(main)


# --- resource samples ---------------------------------------------------------------------------


def test_stale_sample_refuses_malformed_observation() -> None:
    async def main() -> None:
        clock = FakeClock()
        controller = ready_controller(
            max_in_flight=1, queue_bound=1, clock=clock, max_sample_age_s=5.0
        )
        clock.advance(5.0)
        async with controller.slot():  # exactly at the max age: still fresh
            pass
        clock.advance(0.001)
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pytest.fail("admitted on a stale sample")
        assert caught.value.reason is Reason.MALFORMED_OBSERVATION
        controller.update_resources(CALM, taken_at=clock())
        async with controller.slot():
            pass
        assert controller.statistics().refused_by_reason == {"malformed_observation": 1}

    run(main)


@pytest.mark.parametrize("taken_at", [math.nan, math.inf, -math.inf])
def test_sample_with_non_finite_time_counts_as_missing(taken_at: float) -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=1)
        controller.update_resources(CALM, taken_at=taken_at)
        with pytest.raises(AdmissionRefused) as caught:
            async with controller.slot():
                pass
        assert caught.value.reason is Reason.MALFORMED_OBSERVATION

    run(main)


def test_ram_over_limit_refuses_until_a_sample_under_the_limit() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=2, queue_bound=2)
        controller.update_resources(RAM_OVER, taken_at=time.monotonic())
        for _ in range(3):
            with pytest.raises(AdmissionRefused) as caught:
                async with controller.slot():
                    pytest.fail("admitted over the RAM ceiling")
            assert caught.value.reason is Reason.RAM_OVER_LIMIT
            assert caught.value.retry_after_s >= 1
        # A sample at exactly the ceiling is within it.
        at_limit = ResourceObservation(
            ram_bytes=LIMITS.max_ram_bytes, vram_bytes=0, cpu_percent=0.0
        )
        controller.update_resources(at_limit, taken_at=time.monotonic())
        async with controller.slot():
            pass
        assert controller.statistics().refused_by_reason == {"ram_over_limit": 3}

    run(main)


def test_resources_are_checked_again_at_hand_off() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=4)
        holders = [Holder(controller) for _ in range(3)]
        await settle()
        controller.update_resources(RAM_OVER, taken_at=time.monotonic())
        holders[0].release.set()
        await settle()
        # Each waiter in turn is refused with the reason; the slot is then free.
        assert holders[1].refused is Reason.RAM_OVER_LIMIT
        assert holders[2].refused is Reason.RAM_OVER_LIMIT
        assert_idle(controller)
        controller.update_resources(CALM, taken_at=time.monotonic())
        async with controller.slot():
            pass

    run(main)


# --- statistics and refusals --------------------------------------------------------------------


def test_statistics_are_a_frozen_snapshot() -> None:
    async def main() -> None:
        controller = ready_controller(max_in_flight=1, queue_bound=1)
        before = controller.statistics()
        async with controller.slot():
            during = controller.statistics()
        assert isinstance(before, AdmissionStatistics)
        assert (before.in_flight, during.in_flight) == (0, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            during.in_flight = 5  # type: ignore[misc]
        assert isinstance(during.refused_by_reason, MappingProxyType)
        with pytest.raises(TypeError):
            during.refused_by_reason["x"] = 1  # type: ignore[index]

    run(main)


@pytest.mark.parametrize("reason", [reason for reason in Reason if reason is not Reason.OK])
def test_every_refusal_carries_its_code_and_a_retry_hint(reason: Reason) -> None:
    refusal = AdmissionRefused(reason)
    assert str(refusal) == reason.value
    assert refusal.reason is reason
    assert refusal.retry_after_s >= 1


# --- interleavings (Hypothesis state machine) ---------------------------------------------------


class _Boom(Exception):
    pass


class _Request:
    """One client request in the state machine; its task runs on the machine's loop."""

    def __init__(self, machine: AdmissionMachine, index: int, deadline: float | None) -> None:
        self.machine = machine
        self.index = index
        self.deadline = deadline
        self.release = asyncio.Event()
        self.raise_in_body = False
        self.cancel_after_exit: _Request | None = None
        self.entered = False
        self.in_body = False
        self.refused: Reason | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        machine = self.machine
        try:
            async with machine.controller.slot(deadline=self.deadline):
                self.entered = True
                machine.entered_order.append(self.index)
                self.in_body = True
                try:
                    await self.release.wait()
                    if self.raise_in_body:
                        raise _Boom
                finally:
                    self.in_body = False
            # Same synchronous step as the release above: a hand-off and a cancellation of
            # the waiter it went to happen "at the same moment".
            if self.cancel_after_exit is not None:
                self.cancel_after_exit.task.cancel()
        except AdmissionRefused as refusal:
            self.refused = refusal.reason
        except _Boom:
            pass

    @property
    def waiting(self) -> bool:
        return not self.task.done() and not self.in_body


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is a :class:`FakeClock`: timers fire only when the test moves
    time, so Hypothesis sees the same run every time it replays an example."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._virtual_clock = clock

    def time(self) -> float:
        return self._virtual_clock()


class AdmissionMachine(RuleBasedStateMachine):
    """Random arrivals, releases, raising bodies, cancellations, deadlines, lifecycle moves and
    resource samples; after every step the counters must match what the clients observed.

    Time is virtual (shared by the controller and the loop), so deadlines expire exactly when
    the ``let_time_pass`` rule says and never because the machine was slow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.loop = _VirtualTimeLoop(self.clock)
        self.requests: list[_Request] = []
        self.entered_order: list[int] = []
        self.max_in_flight = 1
        self.queue_bound = 1

    def _do(self, action: Callable[[], object]) -> None:
        async def step() -> None:
            action()
            await settle()

        self.loop.run_until_complete(step())

    def _running(self) -> list[_Request]:
        return [request for request in self.requests if request.in_body]

    def _waiting(self) -> list[_Request]:
        return [request for request in self.requests if request.waiting]

    @initialize(max_in_flight=st.integers(1, 3), queue_bound=st.integers(1, 4))
    def create(self, max_in_flight: int, queue_bound: int) -> None:
        self.max_in_flight = max_in_flight
        self.queue_bound = queue_bound
        self.controller = ready_controller(
            max_in_flight=max_in_flight, queue_bound=queue_bound, clock=self.clock
        )

    @rule(deadline=st.sampled_from(["none", "past", "short", "long"]))
    def arrive(self, deadline: str) -> None:
        now = self.clock()
        absolute = {"none": None, "past": now - 1, "short": now + 0.002, "long": now + 60}[deadline]

        def action() -> None:
            self.requests.append(_Request(self, len(self.requests), absolute))

        self._do(action)

    @precondition(lambda self: bool(self._running()))
    @rule(pick=st.integers(0, 99), raise_in_body=st.booleans())
    def finish(self, pick: int, raise_in_body: bool) -> None:
        running = self._running()
        request = running[pick % len(running)]
        request.raise_in_body = raise_in_body
        self._do(request.release.set)

    @precondition(lambda self: bool(self._running()))
    @rule(pick=st.integers(0, 99))
    def cancel_running(self, pick: int) -> None:
        running = self._running()
        self._do(running[pick % len(running)].task.cancel)

    @precondition(lambda self: bool(self._waiting()))
    @rule(pick=st.integers(0, 99))
    def cancel_waiting(self, pick: int) -> None:
        waiting = self._waiting()
        self._do(waiting[pick % len(waiting)].task.cancel)

    @precondition(lambda self: bool(self._running()) and bool(self._waiting()))
    @rule(pick_running=st.integers(0, 99), pick_waiting=st.integers(0, 99))
    def release_and_cancel_a_waiter_at_once(self, pick_running: int, pick_waiting: int) -> None:
        running = self._running()
        waiting = self._waiting()
        request = running[pick_running % len(running)]
        request.cancel_after_exit = waiting[pick_waiting % len(waiting)]
        self._do(request.release.set)

    @precondition(lambda self: bool(self._running()) and bool(self._waiting()))
    @rule(pick_running=st.integers(0, 99), pick_waiting=st.integers(0, 99))
    def cancel_a_waiter_just_before_a_release(self, pick_running: int, pick_waiting: int) -> None:
        running = self._running()
        waiting = self._waiting()
        finishing = running[pick_running % len(running)]
        victim = waiting[pick_waiting % len(waiting)]

        def action() -> None:
            finishing.release.set()
            victim.task.cancel()

        self._do(action)

    @precondition(lambda self: bool(self._waiting()))
    @rule(pick=st.integers(0, 99))
    def leave_ready_and_cancel_a_waiter_at_once(self, pick: int) -> None:
        waiting = self._waiting()
        victim = waiting[pick % len(waiting)]

        def action() -> None:
            self.controller.set_lifecycle(DRAINING)
            victim.task.cancel()

        self._do(action)

    @rule(lifecycle=st.sampled_from([READY, READY, DRAINING, STOPPED]))
    def move_lifecycle(self, lifecycle: object) -> None:
        self._do(lambda: self.controller.set_lifecycle(lifecycle))  # type: ignore[arg-type]

    @rule(over=st.booleans())
    def sample(self, over: bool) -> None:
        observation = RAM_OVER if over else CALM
        self._do(lambda: self.controller.update_resources(observation, taken_at=self.clock()))

    @rule()
    def let_time_pass(self) -> None:
        # Past every "short" deadline set so far, never near a "long" one.
        self._do(lambda: self.clock.advance(0.004))

    @invariant()
    def counters_match_what_clients_saw(self) -> None:
        if not hasattr(self, "controller"):
            return
        stats = self.controller.statistics()
        assert 0 <= stats.in_flight <= self.max_in_flight
        assert 0 <= stats.queued <= self.queue_bound
        assert stats.peak_in_flight <= self.max_in_flight
        assert stats.peak_queued <= self.queue_bound
        assert stats.in_flight == len(self._running())
        assert stats.queued == len(self._waiting())
        if stats.queued:
            assert stats.in_flight == self.max_in_flight
        # FIFO: bodies are entered in arrival order, queued or not.
        assert self.entered_order == sorted(self.entered_order)
        assert stats.admitted_total == len(self.entered_order)
        assert stats.admitted_total - stats.completed_total == stats.in_flight
        refused: dict[str, int] = {}
        for request in self.requests:
            if request.refused is not None:
                refused[request.refused.value] = refused.get(request.refused.value, 0) + 1
        assert dict(stats.refused_by_reason) == refused
        assert stats.refused_total == sum(refused.values())
        cancelled = [r for r in self.requests if r.task.cancelled() and not r.entered]
        assert stats.cancelled_total == len(cancelled)

    def teardown(self) -> None:
        try:
            if hasattr(self, "controller"):
                for request in self.requests:
                    request.task.cancel()
                self.loop.run_until_complete(settle())
                assert_idle(self.controller)
        finally:
            self.loop.close()


AdmissionMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
test_admission_interleavings = AdmissionMachine.TestCase
