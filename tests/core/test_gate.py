"""The single gate (``core/_gate.py``): lifecycle, then admission, then resources; never raises."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

import companion_runtime as cr
from tests.support.core import (
    THOROUGH,
    Hostile,
    LookAlike,
    SneakyInt,
    forged,
    garbage,
    ready,
    reasonable_limits,
)

pytestmark = pytest.mark.unit

S = cr.LifecycleState
FREE = cr.create_admission_state(max_in_flight=2, queue_bound=2)
QUIET = cr.ResourceObservation(1_000_000, 0, 5.0)


def gate(
    lifecycle: object = None,
    admission: object = FREE,
    observation: object = QUIET,
    limits: object = None,
) -> cr.Verdict:
    return cr.evaluate_runtime_request(
        lifecycle_state=ready() if lifecycle is None else lifecycle,
        admission_state=admission,
        resource_observation=observation,
        resource_limits=reasonable_limits() if limits is None else limits,
    )


def test_the_allowed_path_returns_the_prebuilt_verdict() -> None:
    assert gate() is cr.ALLOW
    assert gate() is gate()


@pytest.mark.security
@pytest.mark.parametrize("state", [S.STOPPED, S.STARTING, S.DRAINING])
def test_every_non_ready_state_is_blocked(state: cr.LifecycleState) -> None:
    assert gate(cr.Lifecycle(state)).reason == "not_ready"


@pytest.mark.security
@pytest.mark.parametrize(
    "lifecycle",
    [
        "ready",
        S.READY,
        {"state": "ready"},
        LookAlike(state=S.READY),
        forged(cr.Lifecycle),
        forged(cr.Lifecycle, state="ready"),
        Hostile(),
        True,
    ],
)
def test_anything_but_a_ready_lifecycle_is_not_ready(lifecycle: object) -> None:
    assert gate(lifecycle).reason == "not_ready"


@pytest.mark.parametrize(
    ("lifecycle", "admission", "observation", "limits", "reason"),
    [
        # Each row is wrong in several places; the earliest stage names the reason.
        (cr.Lifecycle(S.DRAINING), None, None, None, "not_ready"),
        (None, None, None, None, "malformed_admission_state"),
        (None, forged(cr.AdmissionState), None, None, "malformed_admission_state"),
        (None, cr.AdmissionState(1, 1, 1, 0), None, None, "at_capacity"),
        (None, cr.AdmissionState(1, 1, 1, 1), None, None, "queue_full"),
        (None, FREE, None, "limits", "malformed_limits"),
        (None, FREE, None, forged(cr.ResourceLimits), "malformed_limits"),
        (None, FREE, "obs", reasonable_limits(), "malformed_observation"),
        (None, FREE, forged(cr.ResourceObservation), reasonable_limits(), "malformed_observation"),
        (
            None,
            FREE,
            cr.ResourceObservation(1e12, 1e12, 100),
            reasonable_limits(),
            "ram_over_limit",
        ),
        (None, FREE, cr.ResourceObservation(0, 1e12, 100), reasonable_limits(), "vram_over_limit"),
        (None, FREE, cr.ResourceObservation(0, 0, 90.5), reasonable_limits(), "cpu_over_limit"),
        (None, FREE, cr.ResourceObservation(8e9, 4e9, 90), reasonable_limits(), "ok"),
    ],
)
def test_order_lifecycle_admission_resources(
    lifecycle: object, admission: object, observation: object, limits: object, reason: str
) -> None:
    verdict = cr.evaluate_runtime_request(
        lifecycle_state=ready() if lifecycle is None else lifecycle,
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    )
    assert verdict.reason == reason


@pytest.mark.stress
def test_allowed_decisions_allocate_nothing() -> None:
    lifecycle, admission, observation, limits = ready(), FREE, QUIET, reasonable_limits()

    def decide(count: int) -> None:
        for _ in range(count):
            cr.evaluate_runtime_request(
                lifecycle_state=lifecycle,
                admission_state=admission,
                resource_observation=observation,
                resource_limits=limits,
            )

    decide(100)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        decide(20_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = [
        stat
        for stat in after.compare_to(before, "filename")
        if "companion_runtime" in str(stat.traceback) and stat.size_diff > 0
    ]
    assert grown == []


def test_the_gate_changes_nothing() -> None:
    lifecycle, admission, observation, limits = ready(), FREE, QUIET, reasonable_limits()
    before = (lifecycle, admission, observation, limits)
    for _ in range(3):
        assert gate(lifecycle, admission, observation, limits) is cr.ALLOW
    assert (lifecycle, admission, observation, limits) == before
    assert admission.in_flight == 0


def composed(
    lifecycle: object, admission: object, observation: object, limits: object
) -> cr.Verdict:
    """The gate's contract, built from the three public decisions it is made of."""
    if not cr.can_serve_inference(lifecycle):
        return cr.deny(cr.Reason.NOT_READY)
    verdict = cr.evaluate_admission(admission)
    if not verdict.ok:
        return verdict
    return cr.evaluate_resource_limits(observation, limits)


counts = st.integers(-1, 5) | st.sampled_from([True, 1.0, math.nan, None, 10**30])
positive = st.integers(1, 5)
values = st.one_of(
    st.integers(-1, 2 * 10**10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, None, "1", 10**400]),
    st.builds(SneakyInt, st.integers(0, 3)),
)


def _admission(fields: tuple[object, object, object, object]) -> object:
    try:
        return cr.AdmissionState(*fields)  # type: ignore[arg-type]
    except cr.SpecError:
        return forged(
            cr.AdmissionState,
            max_in_flight=fields[0],
            queue_bound=fields[1],
            in_flight=fields[2],
            queued=fields[3],
        )


def _limits(fields: tuple[object, object, object]) -> object:
    try:
        return cr.ResourceLimits(*fields)  # type: ignore[arg-type]
    except cr.SpecError:
        return forged(
            cr.ResourceLimits,
            max_ram_bytes=fields[0],
            max_vram_bytes=fields[1],
            max_cpu_percent=fields[2],
        )


def _observation(fields: tuple[object, object, object]) -> object:
    try:
        return cr.ResourceObservation(*fields)  # type: ignore[arg-type]
    except cr.SpecError:
        return forged(
            cr.ResourceObservation, ram_bytes=fields[0], vram_bytes=fields[1], cpu_percent=fields[2]
        )


lifecycles = st.one_of(st.sampled_from(S).map(cr.Lifecycle), garbage())
admissions = st.one_of(
    st.tuples(positive | counts, positive | counts, counts, counts).map(_admission), garbage()
)
limit_values = st.one_of(
    st.tuples(values, values, values | st.floats(0, 150)).map(_limits), garbage()
)
observations = st.one_of(st.tuples(values, values, values).map(_observation), garbage())


@pytest.mark.security
@given(lifecycle=lifecycles, admission=admissions, observation=observations, limits=limit_values)
@THOROUGH
def test_the_gate_is_the_composition_of_its_stages(
    lifecycle: object, admission: object, observation: object, limits: object
) -> None:
    verdict = cr.evaluate_runtime_request(
        lifecycle_state=lifecycle,
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    )
    assert verdict is composed(lifecycle, admission, observation, limits)


@given(
    admission=st.tuples(positive, positive, st.integers(0, 5), st.integers(0, 5)).map(_admission),
    observation=st.tuples(st.integers(0, 10**10), st.integers(0, 10**10), st.floats(0, 100)).map(
        _observation
    ),
)
@THOROUGH
def test_the_allowed_path_agrees_with_the_composition(
    admission: object, observation: object
) -> None:
    # The same comparison on mostly valid inputs, so that allowed verdicts are common.
    limits = reasonable_limits()
    verdict = cr.evaluate_runtime_request(
        lifecycle_state=ready(),
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    )
    assert verdict is composed(ready(), admission, observation, limits)


EDGES = st.one_of(
    st.sampled_from([-1, 0, 1, 100, 101, True, False, 0.0, 1.0, math.nan, math.inf, -math.inf]),
    st.sampled_from([None, "1", 10**30, 10**400, -(10**30)]),
    st.builds(SneakyInt, st.integers(-2, 6)),
)


def _tamper(fields: tuple[object, ...], index: int, value: object) -> tuple[object, ...]:
    """``fields`` with one of them (``index`` modulo their number) replaced by ``value``."""
    position = index % len(fields)
    return (*fields[:position], value, *fields[position + 1 :])


@pytest.mark.security
@given(
    stage=st.sampled_from(["admission", "limits", "observation", "none"]),
    counts=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3), st.integers(0, 4)),
    ceilings=st.tuples(st.integers(1, 10**10), st.floats(1, 1e10), st.floats(1, 100)),
    usage=st.tuples(st.integers(0, 10**10), st.floats(0, 1e10), st.integers(0, 100)),
    index=st.integers(0, 3),
    value=EDGES,
)
@THOROUGH
def test_one_tampered_field_is_judged_like_its_own_decision(
    stage: str,
    counts: tuple[object, ...],
    ceilings: tuple[object, ...],
    usage: tuple[object, ...],
    index: int,
    value: object,
) -> None:
    # Start from values that are valid (and mostly allowing), then change exactly one field of
    # one stage, so that nearly every example reaches the gate's fast path with one thing
    # wrong; the stage's own public decision says what the answer must be.
    max_in_flight, queue_bound, in_flight, queued = counts
    counts = (max_in_flight, queue_bound, min(in_flight, max_in_flight), min(queued, queue_bound))  # type: ignore[call-overload]
    if stage == "admission":
        counts = _tamper(counts, index, value)
    elif stage == "limits":
        ceilings = _tamper(ceilings, index, value)
    elif stage == "observation":
        usage = _tamper(usage, index, value)
    admission = _admission(counts)  # type: ignore[arg-type]
    limits = _limits(ceilings)  # type: ignore[arg-type]
    observation = _observation(usage)  # type: ignore[arg-type]
    verdict = cr.evaluate_runtime_request(
        lifecycle_state=ready(),
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    )
    assert verdict is composed(ready(), admission, observation, limits)


EDGE_VALUES: list[object] = [
    -1,
    0,
    1,
    2,
    100,
    101,
    True,
    False,
    0.0,
    0.5,
    2.0,
    math.nan,
    math.inf,
    -math.inf,
    None,
    "1",
    10**30,
    -(10**30),
    SneakyInt(0),
    SneakyInt(1),
    Hostile(),
]
BASES: dict[str, tuple[tuple[object, ...], tuple[object, ...], tuple[object, ...]]] = {
    # (admission counts, limits, observation): empty and allowed; one slot left; at a ceiling.
    "empty": ((2, 2, 0, 0), (1000, 1000, 100), (0, 0, 0)),
    "busy": ((2, 2, 1, 2), (1000, 1000.0, 50), (10, 10.0, 1.5)),
    "at_ceiling": ((1, 1, 0, 1), (10, 10, 10), (10, 10, 10)),
}


@pytest.mark.security
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize(
    ("stage", "index"),
    [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)],
)
def test_every_single_field_tampering_is_judged_like_its_own_decision(
    base: str, stage: int, index: int
) -> None:
    # Exhaustive over one field of one stage and a list of edge values, the others valid and
    # allowing: every case reaches the gate's fast path with exactly one thing wrong.
    stages = list(BASES[base])
    for value in EDGE_VALUES:
        fields = list(stages)
        fields[stage] = _tamper(fields[stage], index, value)
        admission = _admission(fields[0])  # type: ignore[arg-type]
        limits = _limits(fields[1])  # type: ignore[arg-type]
        observation = _observation(fields[2])  # type: ignore[arg-type]
        verdict = cr.evaluate_runtime_request(
            lifecycle_state=ready(),
            admission_state=admission,
            resource_observation=observation,
            resource_limits=limits,
        )
        assert verdict is composed(ready(), admission, observation, limits), (stage, index, value)


@given(a=garbage(), b=garbage(), c=garbage(), d=garbage())
@THOROUGH
def test_the_gate_never_raises(a: object, b: object, c: object, d: object) -> None:
    for lifecycle in (a, ready()):
        verdict = cr.evaluate_runtime_request(
            lifecycle_state=lifecycle, admission_state=b, resource_observation=c, resource_limits=d
        )
        assert type(verdict) is cr.Verdict
        assert not verdict.ok


@pytest.mark.e2e
def test_a_runtime_from_cold_start_to_drain() -> None:
    limits = cr.create_resource_limits(max_ram_bytes=8e9, max_vram_bytes=4e9, max_cpu_percent=90)
    admission = cr.create_admission_state(max_in_flight=2, queue_bound=1)
    lifecycle = cr.create_lifecycle_state()
    quiet = cr.ResourceObservation(2e9, 0, 10.0)

    def ask(observation: cr.ResourceObservation = quiet) -> str:
        return cr.evaluate_runtime_request(
            lifecycle_state=lifecycle,
            admission_state=admission,
            resource_observation=observation,
            resource_limits=limits,
        ).reason.value

    assert ask() == "not_ready"
    lifecycle = cr.transition_lifecycle(lifecycle, cr.LifecycleEvent.START).new_state
    assert ask() == "not_ready"
    lifecycle = cr.transition_lifecycle(lifecycle, cr.LifecycleEvent.HEALTH_OK).new_state
    assert ask() == "ok"
    admission = cr.record_in_flight(admission)
    assert ask() == "ok"
    admission = cr.record_in_flight(admission)
    assert ask() == "at_capacity"
    admission = cr.record_queued(admission)
    assert ask() == "queue_full"
    admission = cr.record_completion(admission)
    assert ask() == "ok"
    assert ask(cr.ResourceObservation(9e9, 0, 10.0)) == "ram_over_limit"
    lifecycle = cr.transition_lifecycle(lifecycle, cr.LifecycleEvent.DRAIN).new_state
    assert ask() == "not_ready"
    admission = cr.record_completion(cr.record_dequeued(admission))
    lifecycle = cr.transition_lifecycle(lifecycle, cr.LifecycleEvent.STOPPED).new_state
    assert (lifecycle.state, admission.in_flight, admission.queued) == (S.STOPPED, 0, 0)
    assert ask() == "not_ready"


@pytest.mark.stress
def test_a_flood_of_requests_against_the_gate() -> None:
    limits = reasonable_limits()
    admission = cr.create_admission_state(max_in_flight=100, queue_bound=1000)
    lifecycle = ready()
    tally: dict[str, int] = {}
    for _ in range(5000):
        verdict = cr.evaluate_runtime_request(
            lifecycle_state=lifecycle,
            admission_state=admission,
            resource_observation=QUIET,
            resource_limits=limits,
        )
        tally[verdict.reason.value] = tally.get(verdict.reason.value, 0) + 1
        if verdict.ok:
            admission = cr.record_in_flight(admission)
        elif verdict.reason is cr.Reason.AT_CAPACITY:
            admission = cr.record_queued(admission)
    assert tally == {"ok": 100, "at_capacity": 1000, "queue_full": 3900}
