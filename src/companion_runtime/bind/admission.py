"""The admission controller: a bounded, FIFO, deadline-aware gate in front of the runtime.

Theory of operation
-------------------
A runtime such as llama.cpp's server queues without limit; this controller is the bound in
front of it. Every request enters through ``async with controller.slot(deadline=...)``.

* **One decision.** Each admission is decided by the core's ``evaluate_runtime_request`` with
  the current lifecycle, the admission counters and the latest resource sample. A sample that
  is missing, or older than ``max_sample_age_s`` on the injected clock, is passed as ``None``,
  which the core refuses as ``malformed_observation``: no fresh evidence, no admission.
* **Counters only through the core.** The counters are the core's ``AdmissionState`` and move
  only through ``record_in_flight`` / ``record_completion`` / ``record_queued`` /
  ``record_dequeued`` (ask, then commit), so they can never leave their bounds; a bug here
  surfaces as a ``SpecError`` rather than as a silently drifting count.
* **Outcomes.** ``ok`` takes a slot at once, without awaiting anything (no task, no future:
  the uncontended path is a few function calls). ``at_capacity`` waits in a FIFO queue.
  Every other reason (``queue_full``, ``not_ready``, a resource over its ceiling,
  ``malformed_observation``) refuses at once with :class:`AdmissionRefused`.
* **Direct hand-off.** When a slot frees, it is handed to the first live waiter while it is
  still counted in flight, so a newcomer cannot overtake the queue: whenever anyone waits,
  every slot is taken (or promised), and newcomers see ``at_capacity`` and queue behind.
  The waiter's lifecycle and resources are checked again at hand-off; if they now deny, that
  waiter is refused with the reason and the slot goes on to the next one.
* **Deadlines** are absolute on the injected clock. They are converted to the event loop's
  clock relative to ``clock()`` at the moment of queueing and armed as a loop timer, so a
  timeout is exact to the loop's resolution and costs no task. A request that would have to
  wait although its deadline already passed is refused ``queue_timeout`` at once; a request
  that finds a free slot is admitted whatever its deadline (the deadline bounds waiting).
* **Cancellation.** A waiter's outcome is recorded on the waiter by whoever decides it (the
  releasing request, the timer, a lifecycle change). A cancelled waiter looks at that record:
  still waiting → it leaves the queue; already handed a slot → it releases the slot, which
  goes on to the next waiter; already refused → nothing to give back. A body that raises
  (``CancelledError`` included) always releases its slot. Exceptions are never swallowed.
* **Lifecycle.** The controller starts ``stopped``. Leaving ``ready`` refuses every waiter
  with ``not_ready`` at once; requests already running are left to finish (that is the drain).

Statistics count outcomes as callers see them: a request cancelled before it could run (even
if it had just been handed a slot or a refusal) counts as ``cancelled_total``, not as
admitted or refused, so ``admitted_total + refused_total + cancelled_total`` equals the
number of requests that have finished entering, and ``in_flight == admitted_total -
completed_total`` at every moment.

The controller belongs to one event loop and is not thread-safe; the supervisor pushes
lifecycle and resource updates from the same loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final, final

from companion_runtime import (
    AdmissionState,
    Lifecycle,
    Reason,
    ResourceLimits,
    ResourceObservation,
    SpecError,
    Verdict,
    can_serve_inference,
    create_admission_state,
    create_lifecycle_state,
    evaluate_runtime_request,
    record_completion,
    record_dequeued,
    record_in_flight,
    record_queued,
)

__all__ = [
    "RETRY_AFTER_S",
    "AdmissionController",
    "AdmissionRefused",
    "AdmissionStatistics",
]

#: Hint, in seconds, for how long a refused client should wait before trying again, by reason.
#: Capacity refusals clear as soon as one request finishes, so 1 s; a resource ceiling clears
#: only after the next resource sample (the supervisor samples about once a second), so 2 s;
#: ``not_ready`` and a missing or stale sample mean the runtime is starting, draining,
#: restarting or its sampler is behind, which takes seconds, so 5 s. Every value is >= 1 so
#: that it can be sent as an HTTP ``Retry-After`` (whole seconds) without rounding to zero.
RETRY_AFTER_S: Final[Mapping[Reason, float]] = MappingProxyType(
    {
        Reason.QUEUE_FULL: 1.0,
        Reason.AT_CAPACITY: 1.0,
        Reason.QUEUE_TIMEOUT: 1.0,
        Reason.RAM_OVER_LIMIT: 2.0,
        Reason.VRAM_OVER_LIMIT: 2.0,
        Reason.CPU_OVER_LIMIT: 2.0,
        Reason.NOT_READY: 5.0,
        Reason.MALFORMED_OBSERVATION: 5.0,
    }
)
# Anything else (a malformed admission state or limits) is a fault that a retry will not cure
# soon; the hint is generous.
_DEFAULT_RETRY_AFTER_S: Final = 5.0


@final
class AdmissionRefused(Exception):
    """Raised by :meth:`AdmissionController.slot` when a request is refused.

    ``str(exc)`` is the reason code alone (e.g. ``"queue_full"``), so it is safe to log and to
    put on the wire. ``retry_after_s`` is a hint for a ``Retry-After`` header (always >= 1);
    see :data:`RETRY_AFTER_S`.
    """

    #: Why the request was refused.
    reason: Reason
    #: Suggested wait before retrying, seconds (>= 1).
    retry_after_s: float

    def __init__(self, reason: Reason) -> None:
        # Reason(...) also accepts the code string, which is what unpickling passes back.
        self.reason = Reason(reason)
        self.retry_after_s = RETRY_AFTER_S.get(self.reason, _DEFAULT_RETRY_AFTER_S)
        super().__init__(self.reason.value)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionStatistics:
    """A frozen snapshot of an :class:`AdmissionController`'s counters."""

    #: How many requests may run at once.
    max_in_flight: int
    #: How many requests may wait for a slot.
    queue_bound: int
    #: Requests holding a slot now (including one just handed a slot that has not resumed).
    in_flight: int
    #: Requests waiting in the queue now.
    queued: int
    #: Requests given a slot (a hand-off whose waiter was cancelled before its body could
    #: run is taken back out and counted in ``cancelled_total``).
    admitted_total: int
    #: Admitted requests whose body has finished (normally or by raising).
    completed_total: int
    #: Requests refused (every reason).
    refused_total: int
    #: Refusals by reason code (``{"queue_full": 3, ...}``); only reasons that occurred.
    refused_by_reason: Mapping[str, int]
    #: Highest ``in_flight`` seen.
    peak_in_flight: int
    #: Highest ``queued`` seen.
    peak_queued: int
    #: Requests cancelled while waiting (before they could run or see their refusal).
    cancelled_total: int = 0


# Waiter outcomes: plain ints, cheap to compare on the hand-off path.
_WAITING: Final = 0
_GRANTED: Final = 1
_REFUSED: Final = 2
#: Its task was cancelled before an outcome was decided; the controller already dequeued it.
_GONE: Final = 3


@final
class _Waiter:
    """One queued request: the future its task sleeps on and the outcome decided for it."""

    __slots__ = ("future", "outcome", "reason", "timer")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.outcome = _WAITING
        self.reason = Reason.OK
        self.timer: asyncio.TimerHandle | None = None


@final
class _Slot(AbstractAsyncContextManager[None]):
    """The context manager :meth:`AdmissionController.slot` returns; holds no per-entry state."""

    __slots__ = ("_controller", "_deadline")

    def __init__(self, controller: AdmissionController, deadline: float | None) -> None:
        self._controller = controller
        self._deadline = deadline

    async def __aenter__(self) -> None:
        controller = self._controller
        verdict = controller._evaluate(controller._admission)
        if verdict.ok:
            # The uncontended path: no await, so nothing can interleave between ask and commit.
            controller._admit()
            return
        if verdict.reason is Reason.AT_CAPACITY:
            await controller._wait(self._deadline)
            return
        raise controller._refuse(verdict.reason)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Runs for a normal exit and for any exception (CancelledError included); returning
        # None lets the exception propagate.
        self._controller._release(completed=True)


@final
class AdmissionController:
    """Bounds concurrency and queueing in front of a runtime; see the module docstring.

    ``max_in_flight`` requests may run and ``queue_bound`` may wait (both ``int`` > 0, else
    :class:`SpecError`). ``resource_limits`` are the ceilings checked against the latest
    sample pushed with :meth:`update_resources`; a sample older than ``max_sample_age_s``
    (seconds on ``clock``) counts as missing. ``clock`` is the clock deadlines and sample
    times are given on (default :func:`time.monotonic`).
    """

    __slots__ = (
        "_admission",
        "_admitted_total",
        "_cancelled_total",
        "_clock",
        "_completed_total",
        "_lifecycle",
        "_limits",
        "_max_sample_age_s",
        "_observation",
        "_peak_in_flight",
        "_peak_queued",
        "_refused_by_reason",
        "_refused_total",
        "_taken_at",
        "_waiters",
    )

    def __init__(
        self,
        *,
        max_in_flight: int,
        queue_bound: int,
        resource_limits: ResourceLimits,
        max_sample_age_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._admission: AdmissionState = create_admission_state(
            max_in_flight=max_in_flight, queue_bound=queue_bound
        )
        if type(resource_limits) is not ResourceLimits:
            raise SpecError(Reason.MALFORMED_LIMITS)
        if type(max_sample_age_s) not in (int, float) or not 0 < max_sample_age_s < math.inf:
            raise SpecError(Reason.MALFORMED_SPEC)
        self._limits = resource_limits
        self._max_sample_age_s = float(max_sample_age_s)
        self._clock = clock
        self._lifecycle: Lifecycle = create_lifecycle_state()
        self._observation: ResourceObservation | None = None
        self._taken_at = -math.inf
        # Insertion-ordered with O(1) removal from anywhere (a cancelled or timed-out waiter)
        # and from the front (hand-off); a deque would make removal O(n).
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        self._admitted_total = 0
        self._completed_total = 0
        self._cancelled_total = 0
        self._refused_total = 0
        self._refused_by_reason: dict[Reason, int] = {}
        self._peak_in_flight = 0
        self._peak_queued = 0

    # --- public API ---------------------------------------------------------------------------

    def slot(self, *, deadline: float | None = None) -> AbstractAsyncContextManager[None]:
        """Return a context manager that holds one admission slot for its body.

        ``async with controller.slot(deadline=clock() + 30): ...``. ``deadline`` is absolute
        on the controller's clock and bounds only the wait in the queue. Raises
        :class:`AdmissionRefused` when refused; cancellation while waiting or running always
        gives the place back.
        """
        return _Slot(self, deadline)

    def set_lifecycle(self, lifecycle: Lifecycle) -> None:
        """Take the runtime's lifecycle into account (pushed on every lifecycle move).

        Outside ``ready`` every waiter is refused ``not_ready`` at once and new requests are
        refused ``not_ready``; running requests are left to finish.
        """
        self._lifecycle = lifecycle
        if can_serve_inference(lifecycle):
            return
        waiters = self._waiters
        while waiters:
            waiter, _ = waiters.popitem(last=False)
            self._settle(waiter, Reason.NOT_READY)

    def update_resources(self, observation: ResourceObservation, *, taken_at: float) -> None:
        """Record the latest resource sample, taken at ``taken_at`` on the controller's clock."""
        self._observation = observation
        # A non-finite time would make the sample look fresh forever (or compare as NaN);
        # such a sample is kept as "taken never", which denies as missing.
        finite = type(taken_at) in (int, float) and -math.inf < taken_at < math.inf
        self._taken_at = float(taken_at) if finite else -math.inf

    def forget_resources(self) -> None:
        """No sample could be taken: the last one no longer counts, so new requests (and
        waiters at hand-off) are refused ``malformed_observation``, as for a stale sample,
        until :meth:`update_resources` records a new one."""
        self._observation = None
        self._taken_at = -math.inf

    def statistics(self) -> AdmissionStatistics:
        """Return a frozen snapshot of the counters."""
        admission = self._admission
        return AdmissionStatistics(
            max_in_flight=admission.max_in_flight,
            queue_bound=admission.queue_bound,
            in_flight=admission.in_flight,
            queued=admission.queued,
            admitted_total=self._admitted_total,
            completed_total=self._completed_total,
            refused_total=self._refused_total,
            refused_by_reason=MappingProxyType(
                {reason.value: count for reason, count in self._refused_by_reason.items() if count}
            ),
            peak_in_flight=self._peak_in_flight,
            peak_queued=self._peak_queued,
            cancelled_total=self._cancelled_total,
        )

    # --- decisions ----------------------------------------------------------------------------

    def _evaluate(self, admission: AdmissionState) -> Verdict:
        observation = self._observation
        # Written as "not fresh" so that a NaN age also counts as stale.
        if not self._clock() - self._taken_at <= self._max_sample_age_s:
            observation = None
        return evaluate_runtime_request(
            lifecycle_state=self._lifecycle,
            admission_state=admission,
            resource_observation=observation,
            resource_limits=self._limits,
        )

    def _admit(self) -> None:
        admission = record_in_flight(self._admission)
        self._admission = admission
        self._admitted_total += 1
        if admission.in_flight > self._peak_in_flight:
            self._peak_in_flight = admission.in_flight

    def _refuse(self, reason: Reason) -> AdmissionRefused:
        self._refused_total += 1
        self._refused_by_reason[reason] = self._refused_by_reason.get(reason, 0) + 1
        return AdmissionRefused(reason)

    def _unrefuse(self, reason: Reason) -> None:
        # A refusal its caller never saw (cancelled first) is counted as a cancellation.
        self._refused_total -= 1
        self._refused_by_reason[reason] -= 1

    # --- waiting ------------------------------------------------------------------------------

    async def _wait(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        remaining = math.inf
        if deadline is not None:
            remaining = deadline - self._clock()
            # "not >" also refuses a NaN deadline.
            if not remaining > 0:
                raise self._refuse(Reason.QUEUE_TIMEOUT)
        admission = record_queued(self._admission)
        self._admission = admission
        if admission.queued > self._peak_queued:
            self._peak_queued = admission.queued
        waiter = _Waiter(loop.create_future())
        self._waiters[waiter] = None
        if remaining < math.inf:
            # Relative to both clocks' "now": the injected clock need not be the loop's.
            waiter.timer = loop.call_at(loop.time() + remaining, self._expire, waiter)
        try:
            await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.outcome == _GRANTED:
            return
        raise AdmissionRefused(waiter.reason)

    def _settle(
        self, waiter: _Waiter, reason: Reason, dequeued: AdmissionState | None = None
    ) -> None:
        """Decide the outcome of ``waiter`` (already removed from the queue) and wake it.

        ``reason`` is ``OK`` for a hand-off; the slot must then be free in the counters.
        ``dequeued`` is ``record_dequeued`` of the current counters when the caller already
        computed it to ask the core.
        """
        self._admission = record_dequeued(self._admission) if dequeued is None else dequeued
        timer = waiter.timer
        if timer is not None:
            timer.cancel()
            waiter.timer = None
        if waiter.future.done():
            # Its task was cancelled and has not run yet; it will count itself as cancelled.
            waiter.outcome = _GONE
            return
        if reason is Reason.OK:
            self._admit()
            waiter.outcome = _GRANTED
        else:
            self._refuse(reason)
            waiter.outcome = _REFUSED
            waiter.reason = reason
        waiter.future.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        # Only a waiting waiter's timer can fire: whoever decides an outcome cancels the timer
        # first, and the loop skips a handle cancelled even within the same iteration.
        waiter.timer = None
        del self._waiters[waiter]
        self._settle(waiter, Reason.QUEUE_TIMEOUT)

    def _abandon(self, waiter: _Waiter) -> None:
        """Give back whatever a waiter whose task was interrupted still holds."""
        self._cancelled_total += 1
        outcome = waiter.outcome
        if outcome == _WAITING:
            del self._waiters[waiter]
            self._admission = record_dequeued(self._admission)
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
        elif outcome == _GRANTED:
            # Handed a slot at the very moment it was cancelled: pass the slot on.
            self._admitted_total -= 1
            self._release(completed=False)
        elif outcome == _REFUSED:
            self._unrefuse(waiter.reason)
        # _GONE: already dequeued by whoever found its future cancelled.

    def _release(self, *, completed: bool) -> None:
        self._admission = record_completion(self._admission)
        if completed:
            self._completed_total += 1
        waiters = self._waiters
        while waiters:
            waiter, _ = waiters.popitem(last=False)
            # Ask with the queue place already given back, as the core counts a hand-off.
            dequeued = record_dequeued(self._admission)
            self._settle(waiter, self._evaluate(dequeued).reason, dequeued)
            if waiter.outcome == _GRANTED:
                return
