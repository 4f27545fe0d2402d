"""``evaluate_runtime_request`` on generated garbage: never raises, allows only what it may.

Two generators feed one independent oracle (``tests.support.fuzzing.gate_oracle_violation``):
a seeded batch of ``COMPANION_FUZZ_EXAMPLES`` inputs (1,000,000 in a long campaign) and a
Hypothesis test whose draws shrink a failure to a small case.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from companion_runtime import Reason, evaluate_runtime_request
from tests.fuzz._budget import EXAMPLES, HYPOTHESIS_EXAMPLES, SEED
from tests.support.fuzzing import RandomSource, decode_gate_arguments, gate_oracle_violation

pytestmark = [pytest.mark.security, pytest.mark.stress]


class _DataSource:
    """``ByteSource`` over Hypothesis' ``data()`` so that a failure shrinks."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def int_in(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def any_float(self) -> float:
        return self._data.draw(st.floats())


def test_seeded_batch_of_gate_inputs_never_raises_and_allows_only_what_it_may() -> None:
    source = RandomSource(random.Random(SEED))
    reasons: Counter[Reason] = Counter()
    for index in range(EXAMPLES):
        arguments = decode_gate_arguments(source)
        verdict = evaluate_runtime_request(**arguments)  # type: ignore[arg-type]
        violation = gate_oracle_violation(**arguments, verdict=verdict)
        assert violation is None, f"input {index} under seed {SEED}: {violation}: {arguments!r}"
        reasons[verdict.reason] += 1
    # The generator must reach every outcome, or the batch proves less than it claims.
    expected = {
        Reason.OK,
        Reason.NOT_READY,
        Reason.MALFORMED_ADMISSION_STATE,
        Reason.AT_CAPACITY,
        Reason.QUEUE_FULL,
        Reason.MALFORMED_LIMITS,
        Reason.MALFORMED_OBSERVATION,
        Reason.RAM_OVER_LIMIT,
        Reason.VRAM_OVER_LIMIT,
        Reason.CPU_OVER_LIMIT,
    }
    assert set(reasons) == expected, sorted(expected - set(reasons))


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_gate_property_under_hypothesis(data: st.DataObject) -> None:
    arguments = decode_gate_arguments(_DataSource(data))
    verdict = evaluate_runtime_request(**arguments)  # type: ignore[arg-type]
    assert gate_oracle_violation(**arguments, verdict=verdict) is None


def test_the_oracle_rejects_a_gate_that_allows_everything() -> None:
    # The oracle must be able to fail: an always-allow gate is caught within the batch.
    from companion_runtime import ALLOW

    source = RandomSource(random.Random(SEED))
    caught = 0
    for _ in range(2000):
        arguments = decode_gate_arguments(source)
        if gate_oracle_violation(**arguments, verdict=ALLOW) is not None:
            caught += 1
    assert caught > 1000
