"""The runtime lifecycle: one table decides every move.

Theory of operation
-------------------
A runtime process is always in one of four states::

    stopped --start--> starting --health_ok--> ready --drain--> draining --stopped--> stopped

A start that never turns healthy (``health_fail``) or whose process dies (``stopped``) falls
back to ``stopped``; a ready runtime that turns unhealthy is drained, and one whose process
dies is ``stopped`` at once. Those eight moves are the whole of :data:`LIFECYCLE_TABLE`, a
frozen mapping ``(state, event) -> state``; nothing else in the project decides a move, and
a script can draw the machine from the table alone.

:func:`transition_lifecycle` is a pure lookup in that table. It never raises: a pair the table
does not hold is ``invalid_transition`` with the state unchanged, an event that is not a
:class:`LifecycleEvent` is ``unknown_event``, and a current value that is not a
:class:`Lifecycle` is ``unknown_state`` with the new state ``stopped`` (the safe state: it
serves nothing). Inference is served only in the states of :data:`SERVING`, which is
``{ready}``; :func:`can_serve_inference` coerces nothing.

The bind layer owns everything that produces events (spawning, health checks, exits) and
feeds them in; the core never looks at a process or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, final

from companion_runtime.core._reasons import Reason
from companion_runtime.core._verdict import SpecError

__all__ = [
    "LIFECYCLE_TABLE",
    "SERVING",
    "Lifecycle",
    "LifecycleEvent",
    "LifecycleState",
    "Transition",
    "can_serve_inference",
    "create_lifecycle_state",
    "transition_lifecycle",
]


@enum.unique
class LifecycleState(enum.StrEnum):
    """Where the runtime process is in its life."""

    #: No process is running.
    STOPPED = "stopped"
    #: The process was spawned and has not yet answered its health check.
    STARTING = "starting"
    #: The process is healthy; inference is served.
    READY = "ready"
    #: No new requests are admitted; those in flight finish, then the process stops.
    DRAINING = "draining"


@enum.unique
class LifecycleEvent(enum.StrEnum):
    """What the bind layer observed about the runtime process."""

    #: The supervisor asked for the runtime to start and spawned it.
    START = "start"
    #: The health check answered healthy.
    HEALTH_OK = "health_ok"
    #: The health check failed (too many times, or not healthy before the ready timeout).
    HEALTH_FAIL = "health_fail"
    #: The supervisor asked for a graceful stop.
    DRAIN = "drain"
    #: The process has exited (asked to, or not).
    STOPPED = "stopped"


_S = LifecycleState
_E = LifecycleEvent

#: Every legal move, ``(state, event) -> next state``; any other pair is refused.
LIFECYCLE_TABLE: Final[MappingProxyType[tuple[LifecycleState, LifecycleEvent], LifecycleState]] = (
    MappingProxyType(
        {
            (_S.STOPPED, _E.START): _S.STARTING,
            (_S.STARTING, _E.HEALTH_OK): _S.READY,
            (_S.STARTING, _E.HEALTH_FAIL): _S.STOPPED,
            (_S.STARTING, _E.STOPPED): _S.STOPPED,
            (_S.READY, _E.DRAIN): _S.DRAINING,
            (_S.READY, _E.HEALTH_FAIL): _S.DRAINING,
            (_S.READY, _E.STOPPED): _S.STOPPED,
            (_S.DRAINING, _E.STOPPED): _S.STOPPED,
        }
    )
)

#: The states in which inference is served.
SERVING: Final[frozenset[LifecycleState]] = frozenset({_S.READY})

_STATES_BY_VALUE: Final = MappingProxyType({state.value: state for state in LifecycleState})
_EVENTS_BY_VALUE: Final = MappingProxyType({event.value: event for event in LifecycleEvent})


@final
@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The runtime's lifecycle state as an immutable value.

    ``state`` must be a :class:`LifecycleState` (or exactly one of its string values, which
    is stored as the member); anything else raises :class:`SpecError` (``unknown_state``).
    """

    #: The current state.
    state: LifecycleState

    def __post_init__(self) -> None:
        state: object = self.state
        if type(state) is LifecycleState:
            return
        if type(state) is str and state in _STATES_BY_VALUE:
            object.__setattr__(self, "state", _STATES_BY_VALUE[state])
            return
        raise SpecError(Reason.UNKNOWN_STATE)


@final
@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of one lifecycle event: ``ok``, the ``new_state`` and the ``reason``."""

    #: Whether the table holds this move.
    ok: bool
    #: The state after the event (unchanged when refused; ``stopped`` for an unknown state).
    new_state: Lifecycle
    #: :attr:`Reason.OK`, or why the move was refused.
    reason: Reason

    def __post_init__(self) -> None:
        # The same consistency as a Verdict: ok exactly when the reason is OK.
        if (
            type(self.ok) is not bool
            or type(self.new_state) is not Lifecycle
            or type(self.reason) is not Reason
            or self.ok is not (self.reason is Reason.OK)
        ):
            raise SpecError(Reason.MALFORMED_SPEC)

    def __bool__(self) -> bool:
        return self.ok


# Every possible outcome is built once, so a transition allocates nothing.
_LIFECYCLES: Final = MappingProxyType({state: Lifecycle(state) for state in LifecycleState})
_MOVES: Final = MappingProxyType(
    {
        pair: Transition(True, _LIFECYCLES[target], Reason.OK)
        for pair, target in LIFECYCLE_TABLE.items()
    }
)
_INVALID: Final = MappingProxyType(
    {
        state: Transition(False, _LIFECYCLES[state], Reason.INVALID_TRANSITION)
        for state in LifecycleState
    }
)
_UNKNOWN_EVENT: Final = MappingProxyType(
    {state: Transition(False, _LIFECYCLES[state], Reason.UNKNOWN_EVENT) for state in LifecycleState}
)
_UNKNOWN_STATE: Final = Transition(False, _LIFECYCLES[_S.STOPPED], Reason.UNKNOWN_STATE)


def create_lifecycle_state() -> Lifecycle:
    """Return the initial lifecycle, ``Lifecycle(stopped)``."""
    return _LIFECYCLES[_S.STOPPED]


def transition_lifecycle(current: object, event: object) -> Transition:
    """Apply ``event`` to ``current`` by looking the pair up in :data:`LIFECYCLE_TABLE`.

    Never raises. ``event`` is a :class:`LifecycleEvent` (or exactly one of its string values).
    """
    try:
        if type(current) is not Lifecycle:
            return _UNKNOWN_STATE
        state = current.state
        if type(state) is not LifecycleState:
            return _UNKNOWN_STATE
        if type(event) is str:
            event = _EVENTS_BY_VALUE.get(event, event)
        if type(event) is not LifecycleEvent:
            return _UNKNOWN_EVENT[state]
        move = _MOVES.get((state, event))
        return _INVALID[state] if move is None else move
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # A Lifecycle forged without its slot set (object.__new__) has no state to read.
        return _UNKNOWN_STATE


def can_serve_inference(lifecycle: object) -> bool:
    """``True`` only for a :class:`Lifecycle` whose state is ``ready``; nothing is coerced."""
    try:
        if type(lifecycle) is not Lifecycle:
            return False
        state = lifecycle.state
        # The exact-type test keeps a forged plain "ready" string from passing as the member.
        return type(state) is LifecycleState and state in SERVING
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        return False
