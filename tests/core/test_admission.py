"""Bounded admission (``core/_admission.py``): exact bounds, counters that never leave range."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import companion_runtime as cr
from tests.support.core import THOROUGH, Hostile, LookAlike, SneakyInt, forged, garbage

pytestmark = pytest.mark.unit


def test_a_fresh_state_has_empty_counters() -> None:
    state = cr.create_admission_state(max_in_flight=4, queue_bound=8)
    assert (state.max_in_flight, state.queue_bound, state.in_flight, state.queued) == (4, 8, 0, 0)
    assert cr.evaluate_admission(state) is cr.ALLOW


@pytest.mark.parametrize(
    ("max_in_flight", "queue_bound"),
    [
        (0, 1),
        (1, 0),
        (-1, 1),
        (True, 1),
        (1, True),
        (1.0, 1),
        (1, "1"),
        (None, 1),
        (SneakyInt(2), 1),
        (1, math.inf),
    ],
)
def test_create_refuses_bad_bounds(max_in_flight: object, queue_bound: object) -> None:
    with pytest.raises(cr.SpecError) as error:
        cr.create_admission_state(max_in_flight=max_in_flight, queue_bound=queue_bound)  # type: ignore[arg-type]
    assert str(error.value) == "malformed_admission_state"


@pytest.mark.parametrize(
    "fields",
    [(1, 1, 2, 0), (1, 1, 0, 2), (1, 1, -1, 0), (1, 1, 0, -1), (1, 1, True, 0), (2, 2, 1.0, 0)],
)
def test_an_out_of_range_snapshot_cannot_be_built(fields: tuple[object, ...]) -> None:
    with pytest.raises(cr.SpecError):
        cr.AdmissionState(*fields)  # type: ignore[arg-type]


def test_admission_state_is_frozen() -> None:
    state = cr.create_admission_state(max_in_flight=1, queue_bound=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.in_flight = 5  # type: ignore[misc]


@pytest.mark.security
def test_backpressure_trips_at_exactly_100_in_flight_and_1000_queued() -> None:
    state = cr.create_admission_state(max_in_flight=100, queue_bound=1000)
    for admitted in range(100):
        assert cr.evaluate_admission(state) is cr.ALLOW, admitted
        state = cr.record_in_flight(state)
    assert state.in_flight == 100
    for queued in range(1000):
        assert cr.evaluate_admission(state).reason == "at_capacity", queued
        state = cr.record_queued(state)
    assert state.queued == 1000
    assert cr.evaluate_admission(state).reason == "queue_full"
    with pytest.raises(cr.SpecError, match=r"^at_capacity$"):
        cr.record_in_flight(state)
    with pytest.raises(cr.SpecError, match=r"^queue_full$"):
        cr.record_queued(state)
    # One completion frees exactly one slot.
    state = cr.record_completion(state)
    assert cr.evaluate_admission(state) is cr.ALLOW


@pytest.mark.stress
def test_a_flood_of_1000_requests_is_held_to_the_bounds() -> None:
    state = cr.create_admission_state(max_in_flight=100, queue_bound=500)
    outcomes: dict[str, int] = {}
    for _ in range(1000):
        verdict = cr.evaluate_admission(state)
        outcomes[verdict.reason.value] = outcomes.get(verdict.reason.value, 0) + 1
        if verdict.ok:
            state = cr.record_in_flight(state)
        elif verdict.reason is cr.Reason.AT_CAPACITY:
            state = cr.record_queued(state)
    assert outcomes == {"ok": 100, "at_capacity": 500, "queue_full": 400}
    # Drain everything: each queued request leaves the queue and takes the slot just freed.
    while state.queued:
        state = cr.record_completion(state)
        state = cr.record_dequeued(state)
        state = cr.record_in_flight(state)
    while state.in_flight:
        state = cr.record_completion(state)
    assert (state.in_flight, state.queued) == (0, 0)


def test_underflows_raise() -> None:
    state = cr.create_admission_state(max_in_flight=1, queue_bound=1)
    with pytest.raises(cr.SpecError) as error:
        cr.record_completion(state)
    assert str(error.value) == "no_in_flight_to_complete"
    with pytest.raises(cr.SpecError) as error:
        cr.record_dequeued(state)
    assert str(error.value) == "malformed_admission_state"


def test_record_functions_do_not_change_their_input() -> None:
    state = cr.create_admission_state(max_in_flight=2, queue_bound=2)
    after = cr.record_queued(cr.record_in_flight(state))
    assert (state.in_flight, state.queued) == (0, 0)
    assert (after.in_flight, after.queued) == (1, 1)
    assert cr.record_dequeued(after).queued == 0
    assert cr.record_completion(after).in_flight == 0


MALFORMED = [
    None,
    {"max_in_flight": 1, "queue_bound": 1, "in_flight": 0, "queued": 0},
    (1, 1, 0, 0),
    LookAlike(max_in_flight=1, queue_bound=1, in_flight=0, queued=0),
    forged(cr.AdmissionState),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=-1, queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=0, queued=-1),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=2, queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=0, queued=2),
    forged(cr.AdmissionState, max_in_flight=0, queue_bound=1, in_flight=0, queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=0, in_flight=0, queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=math.nan, queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=False, queued=0),
    forged(cr.AdmissionState, max_in_flight=5, queue_bound=1, in_flight=SneakyInt(9), queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=Hostile(), queued=0),
    forged(cr.AdmissionState, max_in_flight=1, queue_bound=1, in_flight=0),
]


@pytest.mark.security
@pytest.mark.parametrize("state", MALFORMED)
def test_anything_but_a_consistent_state_is_refused(state: object) -> None:
    assert cr.evaluate_admission(state).reason == "malformed_admission_state"
    for record in (cr.record_in_flight, cr.record_completion, cr.record_queued, cr.record_dequeued):
        with pytest.raises(cr.SpecError) as error:
            record(state)  # type: ignore[arg-type]
        assert str(error.value) == "malformed_admission_state"


@given(state=garbage())
@THOROUGH
def test_evaluate_admission_never_raises(state: object) -> None:
    assert not cr.evaluate_admission(state).ok


@given(state=garbage())
@THOROUGH
def test_record_functions_raise_only_spec_error(state: object) -> None:
    for record in (cr.record_in_flight, cr.record_completion, cr.record_queued, cr.record_dequeued):
        with pytest.raises(cr.SpecError):
            record(state)  # type: ignore[arg-type]


@given(
    max_in_flight=st.integers(1, 50),
    queue_bound=st.integers(1, 50),
    in_flight=st.integers(0, 50),
    queued=st.integers(0, 50),
)
@THOROUGH
def test_evaluate_admission_matches_its_definition(
    max_in_flight: int, queue_bound: int, in_flight: int, queued: int
) -> None:
    if in_flight > max_in_flight or queued > queue_bound:
        with pytest.raises(cr.SpecError):
            cr.AdmissionState(max_in_flight, queue_bound, in_flight, queued)
        return
    verdict = cr.evaluate_admission(
        cr.AdmissionState(max_in_flight, queue_bound, in_flight, queued)
    )
    if in_flight < max_in_flight:
        assert verdict is cr.ALLOW
    elif queued < queue_bound:
        assert verdict.reason == "at_capacity"
    else:
        assert verdict.reason == "queue_full"


class AdmissionMachine(RuleBasedStateMachine):
    """Any interleaving of record_* calls: counters stay in range, refusals match the model."""

    def __init__(self) -> None:
        super().__init__()
        self.state = cr.create_admission_state(max_in_flight=3, queue_bound=4)
        self.model_in_flight = 0
        self.model_queued = 0

    def _apply(self, record: object, allowed: bool, reason: str) -> bool:
        try:
            self.state = record(self.state)  # type: ignore[operator]
        except cr.SpecError as error:
            assert not allowed
            assert str(error) == reason
            return False
        assert allowed
        return True

    @rule()
    def admit(self) -> None:
        expect_ok = cr.evaluate_admission(self.state).ok
        if self._apply(cr.record_in_flight, self.model_in_flight < 3, "at_capacity"):
            assert expect_ok
            self.model_in_flight += 1

    @rule()
    def complete(self) -> None:
        if self._apply(cr.record_completion, self.model_in_flight > 0, "no_in_flight_to_complete"):
            self.model_in_flight -= 1

    @rule()
    def enqueue(self) -> None:
        if self._apply(cr.record_queued, self.model_queued < 4, "queue_full"):
            self.model_queued += 1

    @rule()
    def dequeue(self) -> None:
        if self._apply(cr.record_dequeued, self.model_queued > 0, "malformed_admission_state"):
            self.model_queued -= 1

    @invariant()
    def counters_match_and_stay_in_range(self) -> None:
        assert self.state.in_flight == self.model_in_flight
        assert self.state.queued == self.model_queued
        assert 0 <= self.state.in_flight <= self.state.max_in_flight
        assert 0 <= self.state.queued <= self.state.queue_bound
        verdict = cr.evaluate_admission(self.state)
        if self.model_in_flight < 3:
            assert verdict.ok
        else:
            assert verdict.reason == ("at_capacity" if self.model_queued < 4 else "queue_full")


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = THOROUGH
