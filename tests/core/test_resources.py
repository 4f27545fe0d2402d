"""Resource ceilings (``core/_resources.py``): validation, order, and the ceiling itself."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import companion_runtime as cr
from tests.support.core import THOROUGH, Hostile, LookAlike, SneakyInt, forged, garbage

pytestmark = pytest.mark.unit

LIMITS = cr.create_resource_limits(max_ram_bytes=1000, max_vram_bytes=500, max_cpu_percent=50)


def test_limits_keep_their_values() -> None:
    limits = cr.create_resource_limits(max_ram_bytes=8e9, max_vram_bytes=1, max_cpu_percent=100)
    assert (limits.max_ram_bytes, limits.max_vram_bytes, limits.max_cpu_percent) == (8e9, 1, 100)
    assert limits == cr.ResourceLimits(8e9, 1, 100)


BAD_NUMBERS = [
    0,
    -1,
    0.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    None,
    "1",
    SneakyInt(5),
    [1],
]


@pytest.mark.parametrize("field", ["max_ram_bytes", "max_vram_bytes", "max_cpu_percent"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_limits_refuse_non_finite_non_positive_or_non_numbers(field: str, value: object) -> None:
    arguments: dict[str, object] = {
        "max_ram_bytes": 10,
        "max_vram_bytes": 10,
        "max_cpu_percent": 10,
    }
    arguments[field] = value
    with pytest.raises(cr.SpecError) as error:
        cr.create_resource_limits(**arguments)  # type: ignore[arg-type]
    assert str(error.value) == "malformed_limits"


@pytest.mark.parametrize("cpu", [100.0000001, 101, 1000])
def test_cpu_ceiling_is_a_share_of_the_whole_machine(cpu: float) -> None:
    with pytest.raises(cr.SpecError):
        cr.create_resource_limits(max_ram_bytes=1, max_vram_bytes=1, max_cpu_percent=cpu)
    assert cr.create_resource_limits(max_ram_bytes=1, max_vram_bytes=1, max_cpu_percent=1e-9)


@pytest.mark.parametrize("field", ["ram_bytes", "vram_bytes", "cpu_percent"])
@pytest.mark.parametrize(
    "value", [-1, -0.5, math.nan, math.inf, -math.inf, True, None, "0", SneakyInt(0)]
)
def test_observations_refuse_non_finite_negative_or_non_numbers(field: str, value: object) -> None:
    arguments: dict[str, object] = {"ram_bytes": 0, "vram_bytes": 0, "cpu_percent": 0}
    arguments[field] = value
    with pytest.raises(cr.SpecError) as error:
        cr.ResourceObservation(**arguments)  # type: ignore[arg-type]
    assert str(error.value) == "malformed_observation"


def test_observations_accept_zero_and_huge_ints() -> None:
    assert cr.ResourceObservation(0, 0.0, -0.0).cpu_percent == 0
    assert cr.ResourceObservation(10**400, 0, 0).ram_bytes == 10**400


def test_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.max_ram_bytes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cr.ResourceObservation(0, 0, 0).ram_bytes = 1  # type: ignore[misc]


@pytest.mark.security
@pytest.mark.parametrize(
    ("observation", "reason"),
    [
        (cr.ResourceObservation(1000, 500, 50), "ok"),
        (cr.ResourceObservation(0, 0, 0), "ok"),
        (cr.ResourceObservation(999.9, 499.9, 49.9), "ok"),
        (cr.ResourceObservation(1001, 500, 50), "ram_over_limit"),
        (cr.ResourceObservation(1000.0001, 0, 0), "ram_over_limit"),
        (cr.ResourceObservation(1000, 501, 50), "vram_over_limit"),
        (cr.ResourceObservation(1000, 500, 50.01), "cpu_over_limit"),
        # Order: RAM before VRAM before CPU.
        (cr.ResourceObservation(10**400, 10**400, 100), "ram_over_limit"),
        (cr.ResourceObservation(0, 10**400, 100), "vram_over_limit"),
        (cr.ResourceObservation(0, 0, 1e300), "cpu_over_limit"),
    ],
)
def test_ceilings_and_their_order(observation: cr.ResourceObservation, reason: str) -> None:
    verdict = cr.evaluate_resource_limits(observation, LIMITS)
    assert verdict.reason == reason
    assert verdict.ok is (reason == "ok")


MALFORMED_LIMITS = [
    None,
    {"max_ram_bytes": 1, "max_vram_bytes": 1, "max_cpu_percent": 1},
    LookAlike(max_ram_bytes=10**9, max_vram_bytes=10**9, max_cpu_percent=100),
    forged(cr.ResourceLimits),
    forged(cr.ResourceLimits, max_ram_bytes=1, max_vram_bytes=1),
    forged(cr.ResourceLimits, max_ram_bytes=math.nan, max_vram_bytes=1, max_cpu_percent=1),
    forged(cr.ResourceLimits, max_ram_bytes=1, max_vram_bytes=math.inf, max_cpu_percent=1),
    forged(cr.ResourceLimits, max_ram_bytes=1, max_vram_bytes=1, max_cpu_percent=101),
    forged(cr.ResourceLimits, max_ram_bytes=1, max_vram_bytes=1, max_cpu_percent=0),
    forged(cr.ResourceLimits, max_ram_bytes=True, max_vram_bytes=1, max_cpu_percent=1),
    forged(cr.ResourceLimits, max_ram_bytes=Hostile(), max_vram_bytes=1, max_cpu_percent=1),
    forged(cr.ResourceLimits, max_ram_bytes=SneakyInt(1), max_vram_bytes=1, max_cpu_percent=1),
]
MALFORMED_OBSERVATIONS = [
    None,
    (0, 0, 0),
    LookAlike(ram_bytes=0, vram_bytes=0, cpu_percent=0),
    forged(cr.ResourceObservation),
    forged(cr.ResourceObservation, ram_bytes=0, vram_bytes=0),
    forged(cr.ResourceObservation, ram_bytes=-1, vram_bytes=0, cpu_percent=0),
    forged(cr.ResourceObservation, ram_bytes=0, vram_bytes=math.nan, cpu_percent=0),
    forged(cr.ResourceObservation, ram_bytes=0, vram_bytes=0, cpu_percent=math.inf),
    forged(cr.ResourceObservation, ram_bytes=False, vram_bytes=0, cpu_percent=0),
    forged(cr.ResourceObservation, ram_bytes=Hostile(), vram_bytes=0, cpu_percent=0),
    forged(cr.ResourceObservation, ram_bytes=SneakyInt(10**9), vram_bytes=0, cpu_percent=0),
]


@pytest.mark.security
@pytest.mark.parametrize("limits", MALFORMED_LIMITS)
def test_malformed_limits_are_reported_first(limits: object) -> None:
    for observation in [cr.ResourceObservation(0, 0, 0), *MALFORMED_OBSERVATIONS]:
        assert cr.evaluate_resource_limits(observation, limits).reason == "malformed_limits"


@pytest.mark.security
@pytest.mark.parametrize("observation", MALFORMED_OBSERVATIONS)
def test_malformed_observations_are_refused(observation: object) -> None:
    assert cr.evaluate_resource_limits(observation, LIMITS).reason == "malformed_observation"


@given(observation=garbage(), limits=garbage())
@THOROUGH
def test_evaluate_resource_limits_never_raises(observation: object, limits: object) -> None:
    assert not cr.evaluate_resource_limits(observation, limits).ok


numbers = st.one_of(st.integers(0, 2**70), st.floats(0, 1e25, allow_nan=False))


@given(ram=numbers, vram=numbers, cpu=st.floats(0, 200), ceiling=st.integers(1, 2**70))
@THOROUGH
def test_evaluate_resource_limits_matches_its_definition(
    ram: float, vram: float, cpu: float, ceiling: int
) -> None:
    limits = cr.create_resource_limits(
        max_ram_bytes=ceiling, max_vram_bytes=ceiling, max_cpu_percent=75
    )
    verdict = cr.evaluate_resource_limits(cr.ResourceObservation(ram, vram, cpu), limits)
    if ram > ceiling:
        assert verdict.reason == "ram_over_limit"
    elif vram > ceiling:
        assert verdict.reason == "vram_over_limit"
    elif cpu > 75:
        assert verdict.reason == "cpu_over_limit"
    else:
        assert verdict is cr.ALLOW
