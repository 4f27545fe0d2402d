"""The single gate every inference request passes: lifecycle, then admission, then resources.

:func:`evaluate_runtime_request` asks; it changes no state. It runs on every request, so its
allowed path is written out flat: exact-type tests and chained comparisons, no helper calls,
no allocation, and the prebuilt ``ALLOW`` verdict at the end. The rules are the same as those
of :func:`can_serve_inference`, :func:`evaluate_admission` and
:func:`evaluate_resource_limits` (a property test holds the gate to their composition); any
refusal is handed to those functions so that the reason comes from one place.
"""

from __future__ import annotations

import math
from typing import Final

from companion_runtime.core._admission import AdmissionState, evaluate_admission
from companion_runtime.core._lifecycle import SERVING, Lifecycle
from companion_runtime.core._reasons import Reason
from companion_runtime.core._resources import (
    ResourceLimits,
    ResourceObservation,
    evaluate_resource_limits,
)
from companion_runtime.core._verdict import ALLOW, Verdict, deny

__all__ = ["evaluate_runtime_request"]

_NOT_READY: Final = deny(Reason.NOT_READY)
_INF: Final = math.inf
# SERVING holds one state, so the exact test is an identity test: cheaper than hashing an enum
# member (a Python-level __hash__), and a plain "ready" string or a look-alike is never the
# member itself. Unpacking fails at import if SERVING ever grows, so this cannot drift.
(_SERVING_STATE,) = SERVING
# Exact types only: bool and subclasses of int or float (which may lie in comparisons) are not
# numbers here, as in the constructors.
_NUMBERS: Final = frozenset({int, float})


def evaluate_runtime_request(
    *,
    lifecycle_state: object,
    admission_state: object,
    resource_observation: object,
    resource_limits: object,
) -> Verdict:
    """May this inference request run now? Never raises; pure.

    Checks, in order: the lifecycle is a :class:`Lifecycle` in ``ready`` (else
    ``not_ready``); admission (:func:`evaluate_admission`'s reasons); resources
    (:func:`evaluate_resource_limits`'s reasons).
    """
    try:
        if type(lifecycle_state) is not Lifecycle or lifecycle_state.state is not _SERVING_STATE:
            return _NOT_READY
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # A Lifecycle forged without its slot set.
        return _NOT_READY
    try:
        if type(admission_state) is AdmissionState:
            max_in_flight = admission_state.max_in_flight
            queue_bound = admission_state.queue_bound
            in_flight = admission_state.in_flight
            queued = admission_state.queued
            if (
                type(max_in_flight) is type(queue_bound) is type(in_flight) is type(queued) is int
                and 0 <= in_flight < max_in_flight
                and 0 <= queued <= queue_bound
                and queue_bound > 0
                and type(resource_limits) is ResourceLimits
                and type(resource_observation) is ResourceObservation
            ):
                max_ram = resource_limits.max_ram_bytes
                max_vram = resource_limits.max_vram_bytes
                max_cpu = resource_limits.max_cpu_percent
                ram = resource_observation.ram_bytes
                vram = resource_observation.vram_bytes
                cpu = resource_observation.cpu_percent
                if (
                    type(max_ram) in _NUMBERS
                    and type(max_vram) in _NUMBERS
                    and type(max_cpu) in _NUMBERS
                    and type(ram) in _NUMBERS
                    and type(vram) in _NUMBERS
                    and type(cpu) in _NUMBERS
                    and 0 < max_ram < _INF
                    and 0 < max_vram < _INF
                    and 0 < max_cpu <= 100
                    and 0 <= ram <= max_ram
                    and 0 <= vram <= max_vram
                    and 0 <= cpu <= max_cpu
                ):
                    return ALLOW
    except Exception:  # noqa: BLE001, S110 - the slow path below gives the reason
        pass
    # Refused, or not obviously allowed: let the functions that own the rules say why.
    verdict = evaluate_admission(admission_state)
    if not verdict.ok:
        return verdict
    return evaluate_resource_limits(resource_observation, resource_limits)
