"""The lifecycle table (``core/_lifecycle.py``): every (state, event) pair, and serving."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import companion_runtime as cr
from tests.support.core import THOROUGH, LookAlike, SneakyStr, forged, garbage

pytestmark = pytest.mark.unit

S = cr.LifecycleState
E = cr.LifecycleEvent

# The contract's table, written out independently of the module.
EXPECTED_MOVES = {
    ("stopped", "start"): "starting",
    ("starting", "health_ok"): "ready",
    ("starting", "health_fail"): "stopped",
    ("starting", "stopped"): "stopped",
    ("ready", "drain"): "draining",
    ("ready", "health_fail"): "draining",
    ("ready", "stopped"): "stopped",
    ("draining", "stopped"): "stopped",
}


def test_states_and_events_have_the_contract_values() -> None:
    assert [state.value for state in S] == ["stopped", "starting", "ready", "draining"]
    assert [event.value for event in E] == ["start", "health_ok", "health_fail", "drain", "stopped"]


def test_the_table_is_exactly_the_contract() -> None:
    table = {
        (state.value, event.value): target.value
        for (state, event), target in cr.LIFECYCLE_TABLE.items()
    }
    assert table == EXPECTED_MOVES
    for (state, event), target in cr.LIFECYCLE_TABLE.items():
        assert type(state) is S
        assert type(event) is E
        assert type(target) is S


def test_the_table_and_serving_set_are_frozen() -> None:
    with pytest.raises(TypeError):
        cr.LIFECYCLE_TABLE[(S.STOPPED, E.DRAIN)] = S.READY  # type: ignore[index]
    assert cr.SERVING == frozenset({S.READY})
    assert type(cr.SERVING) is frozenset


def test_the_table_is_machine_readable() -> None:
    # A script can draw the machine from the table alone.
    lines = [f'  "{s}" -> "{t}" [label="{e}"];' for (s, e), t in sorted(cr.LIFECYCLE_TABLE.items())]
    dot = "digraph lifecycle {\n" + "\n".join(lines) + "\n}"
    assert dot.count("->") == 8
    assert '"ready" -> "draining" [label="health_fail"];' in dot


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair(state: cr.LifecycleState, event: cr.LifecycleEvent) -> None:
    transition = cr.transition_lifecycle(cr.Lifecycle(state), event)
    expected = EXPECTED_MOVES.get((state.value, event.value))
    assert type(transition) is cr.Transition
    if expected is None:
        assert transition.ok is False
        assert bool(transition) is False
        assert transition.reason == "invalid_transition"
        assert transition.new_state == cr.Lifecycle(state)
    else:
        assert transition.ok is True
        assert bool(transition) is True
        assert transition.reason == "ok"
        assert transition.new_state == cr.Lifecycle(S(expected))


@given(state=st.sampled_from(S), event=st.sampled_from(E), as_text=st.booleans())
@THOROUGH
def test_every_pair_against_the_table(
    state: cr.LifecycleState, event: cr.LifecycleEvent, as_text: bool
) -> None:
    # Events may be given as the member or exactly its value; both read the same table.
    sent: object = event.value if as_text else event
    transition = cr.transition_lifecycle(cr.Lifecycle(state), sent)
    target = cr.LIFECYCLE_TABLE.get((state, event))
    assert transition.ok is (target is not None)
    assert transition.new_state.state is (state if target is None else target)
    assert transition.reason is (
        cr.Reason.OK if target is not None else cr.Reason.INVALID_TRANSITION
    )


@pytest.mark.parametrize(
    "event", ["START", "begin", "", " start", None, 1, SneakyStr("start"), S.READY, b"start"]
)
def test_an_unknown_event_leaves_the_state(event: object) -> None:
    for state in S:
        transition = cr.transition_lifecycle(cr.Lifecycle(state), event)
        assert transition.reason == "unknown_event"
        assert transition.ok is False
        assert transition.new_state.state is state


@pytest.mark.security
@pytest.mark.parametrize(
    "current",
    [
        None,
        "stopped",
        "ready",
        S.READY,
        {"state": "ready"},
        LookAlike(state=S.READY),
        forged(cr.Lifecycle),
        forged(cr.Lifecycle, state="ready"),
        forged(cr.Lifecycle, state=SneakyStr("ready")),
        forged(cr.Lifecycle, state=None),
    ],
)
def test_an_unknown_state_falls_back_to_stopped(current: object) -> None:
    transition = cr.transition_lifecycle(current, E.START)
    assert transition.ok is False
    assert transition.reason == "unknown_state"
    assert transition.new_state == cr.Lifecycle(S.STOPPED)


@given(current=garbage(), event=garbage())
@THOROUGH
def test_transition_never_raises(current: object, event: object) -> None:
    transition = cr.transition_lifecycle(current, event)
    assert type(transition) is cr.Transition
    assert type(transition.new_state) is cr.Lifecycle
    assert type(transition.new_state.state) is S


def test_the_initial_state_is_stopped() -> None:
    assert cr.create_lifecycle_state() == cr.Lifecycle(S.STOPPED)
    assert cr.create_lifecycle_state().state is S.STOPPED


def test_lifecycle_takes_exact_values_and_nothing_else() -> None:
    assert cr.Lifecycle("ready").state is S.READY  # type: ignore[arg-type]
    assert cr.Lifecycle(state=S.DRAINING).state is S.DRAINING
    for bad in ("READY", "", None, 1, SneakyStr("ready"), E.STOPPED):
        with pytest.raises(cr.SpecError) as error:
            cr.Lifecycle(bad)  # type: ignore[arg-type]
        assert str(error.value) == "unknown_state"


@pytest.mark.parametrize(
    ("ok", "new_state", "reason"),
    [
        (True, cr.Lifecycle(S.READY), cr.Reason.INVALID_TRANSITION),
        (False, cr.Lifecycle(S.READY), cr.Reason.OK),
        (1, cr.Lifecycle(S.READY), cr.Reason.OK),
        (True, "ready", cr.Reason.OK),
        (True, S.READY, cr.Reason.OK),
        (True, cr.Lifecycle(S.READY), "ok"),
    ],
)
def test_an_inconsistent_transition_cannot_be_built(
    ok: object, new_state: object, reason: object
) -> None:
    with pytest.raises(cr.SpecError) as error:
        cr.Transition(ok, new_state, reason)  # type: ignore[arg-type]
    assert str(error.value) == "malformed_spec"
    assert cr.Transition(True, cr.Lifecycle(S.READY), cr.Reason.OK).ok


def test_lifecycle_is_frozen() -> None:
    lifecycle = cr.Lifecycle(S.READY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lifecycle.state = S.STOPPED  # type: ignore[misc]
    assert hash(lifecycle) == hash(cr.Lifecycle(S.READY))


# ---- serving -------------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize("state", list(S))
def test_only_ready_serves(state: cr.LifecycleState) -> None:
    assert cr.can_serve_inference(cr.Lifecycle(state)) is (state is S.READY)


@pytest.mark.security
@pytest.mark.parametrize(
    "value",
    [
        "ready",
        S.READY,
        {"state": "ready"},
        {"state": S.READY},
        LookAlike(state=S.READY),
        forged(cr.Lifecycle),
        forged(cr.Lifecycle, state="ready"),
        forged(cr.Lifecycle, state=SneakyStr("ready")),
        True,
        None,
    ],
)
def test_nothing_is_coerced_into_serving(value: object) -> None:
    assert cr.can_serve_inference(value) is False


@given(value=garbage())
@THOROUGH
def test_can_serve_inference_never_raises(value: object) -> None:
    assert cr.can_serve_inference(value) is False


# ---- walks ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_full_life_with_a_crash_and_a_restart() -> None:
    walk = [
        (E.START, S.STARTING),
        (E.HEALTH_OK, S.READY),
        (E.HEALTH_FAIL, S.DRAINING),
        (E.STOPPED, S.STOPPED),
        (E.START, S.STARTING),
        (E.STOPPED, S.STOPPED),
        (E.START, S.STARTING),
        (E.HEALTH_OK, S.READY),
        (E.STOPPED, S.STOPPED),
    ]
    lifecycle = cr.create_lifecycle_state()
    for event, expected in walk:
        transition = cr.transition_lifecycle(lifecycle, event)
        assert transition.ok, (lifecycle, event)
        lifecycle = transition.new_state
        assert lifecycle.state is expected
        assert cr.can_serve_inference(lifecycle) is (expected is S.READY)


class LifecycleMachine(RuleBasedStateMachine):
    """Random event sequences: the state is always a member, and serving only in ready."""

    def __init__(self) -> None:
        super().__init__()
        self.lifecycle = cr.create_lifecycle_state()

    @rule(event=st.sampled_from(E))
    def send(self, event: cr.LifecycleEvent) -> None:
        before = self.lifecycle
        transition = cr.transition_lifecycle(before, event)
        if transition.ok:
            assert (before.state, event) in cr.LIFECYCLE_TABLE
        else:
            assert transition.new_state == before
        self.lifecycle = transition.new_state

    @invariant()
    def serves_only_when_ready(self) -> None:
        assert type(self.lifecycle.state) is S
        assert cr.can_serve_inference(self.lifecycle) is (self.lifecycle.state in cr.SERVING)


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = THOROUGH
