"""Bounded admission: counters that can never go out of range.

At most ``max_in_flight`` requests run and at most ``queue_bound`` wait; anything beyond is
refused explicitly rather than buffered. :func:`evaluate_admission` asks (it changes nothing);
the ``record_*`` functions commit a change and return a new :class:`AdmissionState`, raising
:class:`SpecError` rather than letting a counter leave its range. Only the bind layer's
admission controller calls ``record_*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, cast, final

from companion_runtime.core._reasons import Reason
from companion_runtime.core._verdict import ALLOW, SpecError, Verdict, deny

__all__ = [
    "AdmissionState",
    "create_admission_state",
    "evaluate_admission",
    "record_completion",
    "record_dequeued",
    "record_in_flight",
    "record_queued",
]

_MALFORMED: Final = deny(Reason.MALFORMED_ADMISSION_STATE)
_AT_CAPACITY: Final = deny(Reason.AT_CAPACITY)
_QUEUE_FULL: Final = deny(Reason.QUEUE_FULL)


def _consistent(
    max_in_flight: object, queue_bound: object, in_flight: object, queued: object
) -> bool:
    return (
        type(max_in_flight) is int
        and type(queue_bound) is int
        and type(in_flight) is int
        and type(queued) is int
        and max_in_flight > 0
        and queue_bound > 0
        and 0 <= in_flight <= max_in_flight
        and 0 <= queued <= queue_bound
    )


@final
@dataclass(frozen=True, slots=True)
class AdmissionState:
    """A snapshot of the admission counters.

    All four are ``int`` (not ``bool``); ``max_in_flight`` and ``queue_bound`` are > 0,
    ``0 <= in_flight <= max_in_flight`` and ``0 <= queued <= queue_bound``. Anything else
    raises :class:`SpecError` (``malformed_admission_state``).
    """

    #: How many requests may run at once.
    max_in_flight: int
    #: How many requests may wait for a slot.
    queue_bound: int
    #: How many requests are running.
    in_flight: int = 0
    #: How many requests are waiting.
    queued: int = 0

    def __post_init__(self) -> None:
        if not _consistent(self.max_in_flight, self.queue_bound, self.in_flight, self.queued):
            raise SpecError(Reason.MALFORMED_ADMISSION_STATE)


def create_admission_state(*, max_in_flight: int, queue_bound: int) -> AdmissionState:
    """Return empty counters; raises :class:`SpecError` unless both bounds are ``int`` > 0."""
    return AdmissionState(max_in_flight, queue_bound, 0, 0)


def _admission_verdict(state: object) -> Verdict:
    # Re-checked on every call: a look-alike object, or a real one whose fields were forced
    # with object.__setattr__, must be refused rather than trusted.
    if type(state) is not AdmissionState:
        return _MALFORMED
    max_in_flight = state.max_in_flight
    queue_bound = state.queue_bound
    in_flight = state.in_flight
    queued = state.queued
    if not _consistent(max_in_flight, queue_bound, in_flight, queued):
        return _MALFORMED
    if in_flight < max_in_flight:
        return ALLOW
    if queued < queue_bound:
        return _AT_CAPACITY
    return _QUEUE_FULL


def evaluate_admission(state: object) -> Verdict:
    """May one more request run now? Never raises; changes nothing.

    ``ok`` if a slot is free, ``at_capacity`` if every slot is taken but the queue has room,
    ``queue_full`` otherwise; ``malformed_admission_state`` for anything that is not a
    consistent :class:`AdmissionState`.
    """
    try:
        return _admission_verdict(state)
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # A forged AdmissionState whose slots were never set.
        return _MALFORMED


def _checked(state: object) -> AdmissionState:
    if evaluate_admission(state) is _MALFORMED:
        raise SpecError(Reason.MALFORMED_ADMISSION_STATE)
    return cast(AdmissionState, state)


def record_in_flight(state: AdmissionState) -> AdmissionState:
    """One more request runs. Raises :class:`SpecError` (``at_capacity``) with no free slot."""
    current = _checked(state)
    if current.in_flight >= current.max_in_flight:
        raise SpecError(Reason.AT_CAPACITY)
    return AdmissionState(
        current.max_in_flight, current.queue_bound, current.in_flight + 1, current.queued
    )


def record_completion(state: AdmissionState) -> AdmissionState:
    """One running request finished. Raises :class:`SpecError`
    (``no_in_flight_to_complete``) when nothing is in flight."""
    current = _checked(state)
    if current.in_flight <= 0:
        raise SpecError(Reason.NO_IN_FLIGHT_TO_COMPLETE)
    return AdmissionState(
        current.max_in_flight, current.queue_bound, current.in_flight - 1, current.queued
    )


def record_queued(state: AdmissionState) -> AdmissionState:
    """One more request waits. Raises :class:`SpecError` (``queue_full``) when it is full."""
    current = _checked(state)
    if current.queued >= current.queue_bound:
        raise SpecError(Reason.QUEUE_FULL)
    return AdmissionState(
        current.max_in_flight, current.queue_bound, current.in_flight, current.queued + 1
    )


def record_dequeued(state: AdmissionState) -> AdmissionState:
    """One waiting request left the queue (it got a slot, timed out or was cancelled).

    Only the queue count changes; a request that got a slot is then recorded with
    :func:`record_in_flight`. Raises :class:`SpecError` (``malformed_admission_state``)
    when nothing is queued.
    """
    current = _checked(state)
    if current.queued <= 0:
        raise SpecError(Reason.MALFORMED_ADMISSION_STATE)
    return AdmissionState(
        current.max_in_flight, current.queue_bound, current.in_flight, current.queued - 1
    )
