"""Shared builders for the core's tests: hostile values, forged instances, garbage strategies.

Everything here is built from the public API only; nothing reaches into private modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import companion_runtime as cr

__all__ = [
    "ALLOWLIST",
    "FAST",
    "THOROUGH",
    "Hostile",
    "LookAlike",
    "SneakyInt",
    "SneakyStr",
    "forged",
    "garbage",
    "ready",
    "reasonable_limits",
]

#: For properties that run a cheap decision many times.
THOROUGH = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: For properties whose single example is already costly.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWLIST = ["https://models.example.com/", "https://cdn.example.org/models/"]


class Hostile:
    """A value whose every comparison, hash, conversion and attribute access raises."""

    def _boom(self, *_args: object) -> NoReturn:
        raise RuntimeError("hostile value")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _boom
    __hash__ = __bool__ = __index__ = __int__ = __float__ = __len__ = _boom
    __iter__ = __str__ = __format__ = _boom

    def __getattr__(self, name: str) -> NoReturn:
        # Dunder look-ups (pytest ids, copy, pickle) get the ordinary answer; fields do not.
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError("hostile attribute")

    def __repr__(self) -> str:
        return "Hostile()"


class SneakyInt(int):
    """An int subclass that claims to be below everything."""

    def __lt__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return False


class SneakyStr(str):
    """A str subclass that claims to equal anything."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def startswith(self, *_args: Any, **_kwargs: Any) -> bool:
        return True

    def lower(self) -> str:
        return "models.example.com"


class LookAlike:
    """Duck-types any of the core's value objects: every field a caller might read exists."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


def ready() -> cr.Lifecycle:
    """A lifecycle in ``ready``, reached through the table."""
    state = cr.create_lifecycle_state()
    for event in (cr.LifecycleEvent.START, cr.LifecycleEvent.HEALTH_OK):
        state = cr.transition_lifecycle(state, event).new_state
    return state


def reasonable_limits() -> cr.ResourceLimits:
    return cr.create_resource_limits(
        max_ram_bytes=8_000_000_000, max_vram_bytes=4_000_000_000, max_cpu_percent=90
    )


def forged(cls: type, **fields: object) -> Any:
    """An instance of ``cls`` that skipped validation: given fields set by force, others unset."""
    instance: Any = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(instance, name, value)
    return instance


_SCALARS: Sequence[object] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**64,
    -(2**64),
    10**400,
    0.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    "",
    "ready",
    "ok",
    "https://models.example.com/",
    b"",
    b"https://models.example.com/",
    bytearray(b"x"),
    (),
    [],
    {},
    {"state": "ready"},
    object(),
    int,
    cr.LifecycleState.READY,
    cr.LifecycleEvent.START,
    cr.Reason.OK,
    cr.ALLOW,
)


def _hostiles() -> st.SearchStrategy[object]:
    # Built fresh (not sampled): sampling hashes its elements, and a Hostile refuses to hash.
    return st.one_of(
        st.builds(Hostile),
        st.builds(SneakyInt, st.integers(-5, 5)),
        st.builds(SneakyStr, st.sampled_from(["https://models.example.com/x", "ready", "ok"])),
        st.builds(LookAlike),
    )


def _look_alikes() -> st.SearchStrategy[object]:
    return st.sampled_from(
        [
            LookAlike(state=cr.LifecycleState.READY),
            LookAlike(max_in_flight=4, queue_bound=4, in_flight=0, queued=0),
            LookAlike(max_ram_bytes=10, max_vram_bytes=10, max_cpu_percent=10),
            LookAlike(ram_bytes=0, vram_bytes=0, cpu_percent=0),
        ]
    )


def _invalid_forgery(cls: type, **fields: object) -> Any:
    """A forged ``cls`` with ``fields``, or None when those fields make a valid instance.

    Garbage must be garbage: a forgery whose every field is in range (say an admission state
    ``1, 1, 0, 0``) is indistinguishable from a real instance, and the core rightly accepts it.
    """
    try:
        cls(**fields)
    except Exception:
        return forged(cls, **fields)
    return None


def _is_not_none(value: object) -> bool:
    return value is not None


def _forgeries() -> st.SearchStrategy[object]:
    field_values = st.one_of(
        st.sampled_from([None, -1, 0, 1, 5, math.nan, math.inf, True, "5"]),
        st.builds(SneakyInt, st.integers(-5, 5)),
        st.builds(Hostile),
    )
    return st.one_of(
        st.builds(lambda: forged(cr.Lifecycle)),
        st.sampled_from(["ready", "stopped", None, 1]).map(lambda s: forged(cr.Lifecycle, state=s)),
        st.tuples(field_values, field_values, field_values, field_values)
        .map(
            lambda v: _invalid_forgery(
                cr.AdmissionState, max_in_flight=v[0], queue_bound=v[1], in_flight=v[2], queued=v[3]
            )
        )
        .filter(_is_not_none),
        st.tuples(field_values, field_values, field_values)
        .map(
            lambda v: _invalid_forgery(
                cr.ResourceLimits, max_ram_bytes=v[0], max_vram_bytes=v[1], max_cpu_percent=v[2]
            )
        )
        .filter(_is_not_none),
        st.tuples(field_values, field_values, field_values)
        .map(
            lambda v: _invalid_forgery(
                cr.ResourceObservation, ram_bytes=v[0], vram_bytes=v[1], cpu_percent=v[2]
            )
        )
        .filter(_is_not_none),
        st.builds(lambda: forged(cr.AdmissionState)),
        st.builds(lambda: forged(cr.ResourceLimits)),
        st.builds(lambda: forged(cr.ResourceObservation)),
    )


def garbage() -> st.SearchStrategy[object]:
    """Anything at all: scalars, NaN and infinities, huge ints, containers, hostile objects,
    look-alikes and forged instances of the core's own classes."""
    leaves = st.one_of(
        st.sampled_from(_SCALARS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.binary(max_size=40),
        _hostiles(),
        _look_alikes(),
        _forgeries(),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=5), children, max_size=3),
        ),
        max_leaves=8,
    )
