"""The model fit check, through its public function only."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from companion_runtime.core import Reason, ResourceLimits, Verdict, create_resource_limits
from companion_runtime.core._fit import evaluate_model_fit

pytestmark = pytest.mark.unit

GIB = 1024**3
LIMITS = create_resource_limits(max_ram_bytes=8 * GIB, max_vram_bytes=4 * GIB, max_cpu_percent=90)


def fit(**overrides: Any) -> Verdict:
    arguments: dict[str, Any] = {
        "model_size_bytes": 2 * GIB,
        "overhead_bytes": 1 * GIB,
        "available_ram_bytes": 16 * GIB,
        "available_vram_bytes": 0,
        "resource_limits": LIMITS,
    }
    arguments.update(overrides)
    return evaluate_model_fit(**arguments)


def test_a_model_that_fits_in_ram_is_allowed() -> None:
    verdict = fit()
    assert verdict.ok and verdict.reason is Reason.OK


def test_exactly_at_both_ceilings_fits() -> None:
    assert fit(model_size_bytes=7 * GIB, available_ram_bytes=8 * GIB).ok


@pytest.mark.parametrize(
    ("model", "overhead", "available_ram"),
    [
        (7 * GIB + 1, 1 * GIB, 16 * GIB),  # past max_ram_bytes with the overhead
        (2 * GIB, 1 * GIB, 3 * GIB - 1),  # past the machine's available RAM
        (9 * GIB, 0, 32 * GIB),  # past max_ram_bytes alone
    ],
)
def test_a_model_past_the_ram_headroom_or_ceiling_is_too_large(
    model: int, overhead: int, available_ram: int
) -> None:
    verdict = fit(
        model_size_bytes=model, overhead_bytes=overhead, available_ram_bytes=available_ram
    )
    assert not verdict.ok
    assert verdict.reason is Reason.MODEL_TOO_LARGE


def test_without_a_gpu_offload_changes_nothing_the_model_must_fit_in_ram() -> None:
    verdict = fit(model_size_bytes=9 * GIB, gpu_offload=True, available_vram_bytes=0)
    assert verdict.reason is Reason.MODEL_TOO_LARGE
    assert fit(gpu_offload=True, available_vram_bytes=0).ok


def test_with_gpu_offload_the_weights_go_to_vram_and_the_overhead_to_ram() -> None:
    # 4 GiB of weights would not fit the 3 GiB of RAM left, but they go to VRAM.
    assert fit(
        model_size_bytes=4 * GIB,
        available_ram_bytes=1 * GIB,
        available_vram_bytes=6 * GIB,
        gpu_offload=True,
    ).ok
    past_vram_ceiling = fit(
        model_size_bytes=4 * GIB + 1, available_vram_bytes=24 * GIB, gpu_offload=True
    )
    assert past_vram_ceiling.reason is Reason.MODEL_TOO_LARGE
    past_free_vram = fit(model_size_bytes=3 * GIB, available_vram_bytes=2 * GIB, gpu_offload=True)
    assert past_free_vram.reason is Reason.MODEL_TOO_LARGE
    overhead_past_ram = fit(
        overhead_bytes=2 * GIB,
        available_ram_bytes=1 * GIB,
        available_vram_bytes=6 * GIB,
        gpu_offload=True,
    )
    assert overhead_past_ram.reason is Reason.MODEL_TOO_LARGE


def test_with_a_gpu_but_no_offload_the_model_must_fit_in_ram() -> None:
    verdict = fit(model_size_bytes=9 * GIB, available_vram_bytes=24 * GIB)
    assert verdict.reason is Reason.MODEL_TOO_LARGE


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_size_bytes": 0},
        {"model_size_bytes": -1},
        {"model_size_bytes": True},
        {"model_size_bytes": 1.5},
        {"model_size_bytes": "1"},
        {"overhead_bytes": -1},
        {"overhead_bytes": None},
        {"available_ram_bytes": -1},
        {"available_ram_bytes": math.nan},
        {"available_vram_bytes": -1},
        {"available_vram_bytes": False},
        {"gpu_offload": 1},
        {"gpu_offload": "yes"},
    ],
)
def test_malformed_sizes_are_malformed_spec(overrides: dict[str, Any]) -> None:
    assert fit(**overrides).reason is Reason.MALFORMED_SPEC


def test_malformed_limits_are_refused_before_the_sizes() -> None:
    assert fit(resource_limits=None).reason is Reason.MALFORMED_LIMITS
    assert fit(resource_limits=None, model_size_bytes=-1).reason is Reason.MALFORMED_LIMITS
    forced = create_resource_limits(max_ram_bytes=1, max_vram_bytes=1, max_cpu_percent=1)
    object.__setattr__(forced, "max_ram_bytes", math.inf)
    assert fit(resource_limits=forced).reason is Reason.MALFORMED_LIMITS
    forged = object.__new__(ResourceLimits)  # slots never set: reading one raises
    assert fit(resource_limits=forged).reason is Reason.MALFORMED_LIMITS


_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.just(LIMITS),
)


@given(
    model=_anything,
    overhead=_anything,
    ram=_anything,
    vram=_anything,
    limits=_anything,
    offload=_anything,
)
def test_never_raises_and_always_returns_a_verdict(
    model: object, overhead: object, ram: object, vram: object, limits: object, offload: object
) -> None:
    verdict = evaluate_model_fit(
        model_size_bytes=model,  # type: ignore[arg-type]
        overhead_bytes=overhead,  # type: ignore[arg-type]
        available_ram_bytes=ram,  # type: ignore[arg-type]
        available_vram_bytes=vram,  # type: ignore[arg-type]
        resource_limits=limits,  # type: ignore[arg-type]
        gpu_offload=offload,  # type: ignore[arg-type]
    )
    assert type(verdict) is Verdict


@given(
    model=st.integers(min_value=1, max_value=2**50),
    overhead=st.integers(min_value=0, max_value=2**40),
    ram=st.integers(min_value=0, max_value=2**50),
)
def test_without_offload_it_fits_exactly_when_the_sum_is_within_both_bounds(
    model: int, overhead: int, ram: int
) -> None:
    verdict = fit(model_size_bytes=model, overhead_bytes=overhead, available_ram_bytes=ram)
    expected = model + overhead <= ram and model + overhead <= LIMITS.max_ram_bytes
    assert verdict.ok is expected
    assert verdict.reason is (Reason.OK if expected else Reason.MODEL_TOO_LARGE)
