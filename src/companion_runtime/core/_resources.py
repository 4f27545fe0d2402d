"""Resource ceilings: is the runtime within its RAM, VRAM and CPU limits?

The bind layer samples the runtime process (and its children) and hands the figures in as a
:class:`ResourceObservation`; the core compares them with :class:`ResourceLimits`. A value
equal to its ceiling is within it. CPU percent is a share of the whole machine (0-100), not of
one core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, final

from companion_runtime.core._reasons import Reason
from companion_runtime.core._verdict import ALLOW, SpecError, Verdict, deny

__all__ = [
    "ResourceLimits",
    "ResourceObservation",
    "create_resource_limits",
    "evaluate_resource_limits",
]

_INF: Final = math.inf
_MALFORMED_LIMITS: Final = deny(Reason.MALFORMED_LIMITS)
_MALFORMED_OBSERVATION: Final = deny(Reason.MALFORMED_OBSERVATION)
_RAM_OVER_LIMIT: Final = deny(Reason.RAM_OVER_LIMIT)
_VRAM_OVER_LIMIT: Final = deny(Reason.VRAM_OVER_LIMIT)
_CPU_OVER_LIMIT: Final = deny(Reason.CPU_OVER_LIMIT)


def _number(value: object) -> bool:
    # Exact types: bool and int/float subclasses (which may override comparisons) are refused.
    value_type = type(value)
    return value_type is int or value_type is float


def _limits_valid(max_ram_bytes: object, max_vram_bytes: object, max_cpu_percent: object) -> bool:
    # Chained comparisons with infinity refuse NaN and both infinities in one step.
    return (
        _number(max_ram_bytes)
        and _number(max_vram_bytes)
        and _number(max_cpu_percent)
        and 0 < max_ram_bytes < _INF  # type: ignore[operator]
        and 0 < max_vram_bytes < _INF  # type: ignore[operator]
        and 0 < max_cpu_percent <= 100  # type: ignore[operator]
    )


def _observation_valid(ram_bytes: object, vram_bytes: object, cpu_percent: object) -> bool:
    return (
        _number(ram_bytes)
        and _number(vram_bytes)
        and _number(cpu_percent)
        and 0 <= ram_bytes < _INF  # type: ignore[operator]
        and 0 <= vram_bytes < _INF  # type: ignore[operator]
        and 0 <= cpu_percent < _INF  # type: ignore[operator]
    )


@final
@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Ceilings for the runtime process.

    Finite numbers (``int`` or ``float``, not ``bool``) greater than zero; ``max_cpu_percent``
    in (0, 100] as a share of the whole machine. Else :class:`SpecError` (``malformed_limits``).
    """

    #: Resident memory ceiling, bytes.
    max_ram_bytes: int | float
    #: GPU memory ceiling, bytes.
    max_vram_bytes: int | float
    #: CPU ceiling, percent of the whole machine.
    max_cpu_percent: int | float

    def __post_init__(self) -> None:
        if not _limits_valid(self.max_ram_bytes, self.max_vram_bytes, self.max_cpu_percent):
            raise SpecError(Reason.MALFORMED_LIMITS)


def create_resource_limits(
    *, max_ram_bytes: int | float, max_vram_bytes: int | float, max_cpu_percent: int | float
) -> ResourceLimits:
    """Return validated :class:`ResourceLimits`; raises :class:`SpecError` likewise."""
    return ResourceLimits(max_ram_bytes, max_vram_bytes, max_cpu_percent)


@final
@dataclass(frozen=True, slots=True)
class ResourceObservation:
    """One sample of the runtime's resource use.

    Finite numbers (``int`` or ``float``, not ``bool``) >= 0, else :class:`SpecError`
    (``malformed_observation``).
    """

    #: Resident memory of the runtime and its children, bytes.
    ram_bytes: int | float
    #: GPU memory of the runtime and its children, bytes (0 without a GPU).
    vram_bytes: int | float
    #: CPU share of the whole machine, percent.
    cpu_percent: int | float

    def __post_init__(self) -> None:
        if not _observation_valid(self.ram_bytes, self.vram_bytes, self.cpu_percent):
            raise SpecError(Reason.MALFORMED_OBSERVATION)


def _resource_verdict(observation: object, limits: object) -> Verdict:
    # Re-checked on every call: look-alikes and objects forced with object.__setattr__ are
    # refused rather than trusted.
    if type(limits) is not ResourceLimits:
        return _MALFORMED_LIMITS
    max_ram = limits.max_ram_bytes
    max_vram = limits.max_vram_bytes
    max_cpu = limits.max_cpu_percent
    if not _limits_valid(max_ram, max_vram, max_cpu):
        return _MALFORMED_LIMITS
    if type(observation) is not ResourceObservation:
        return _MALFORMED_OBSERVATION
    ram = observation.ram_bytes
    vram = observation.vram_bytes
    cpu = observation.cpu_percent
    if not _observation_valid(ram, vram, cpu):
        return _MALFORMED_OBSERVATION
    if ram > max_ram:
        return _RAM_OVER_LIMIT
    if vram > max_vram:
        return _VRAM_OVER_LIMIT
    if cpu > max_cpu:
        return _CPU_OVER_LIMIT
    return ALLOW


def evaluate_resource_limits(observation: object, limits: object) -> Verdict:
    """Is ``observation`` within ``limits``? Never raises.

    Order: limits (``malformed_limits``), observation (``malformed_observation``), then RAM,
    VRAM and CPU (``ram_over_limit``, ``vram_over_limit``, ``cpu_over_limit``). A value equal
    to its ceiling is within it.
    """
    try:
        return _resource_verdict(observation, limits)
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # An instance forged with object.__new__ has unset slots; reading one raises. Work
        # out which argument it was, keeping the limits-first order.
        return _MALFORMED_OBSERVATION if _readable_limits(limits) else _MALFORMED_LIMITS


def _readable_limits(limits: object) -> bool:
    return _limits_valid(
        getattr(limits, "max_ram_bytes", None),
        getattr(limits, "max_vram_bytes", None),
        getattr(limits, "max_cpu_percent", None),
    )
