"""Fail-closed posture across the whole core: every decision answers every input with a
verdict, and no answer or error ever carries the input back out."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import companion_runtime as cr
from tests.support.core import ALLOWLIST, FAST, garbage, ready, reasonable_limits

pytestmark = [pytest.mark.security, pytest.mark.unit]

REASON_VALUES = {reason.value for reason in cr.Reason}


def _accumulator_update(a: object, *_: object) -> object:
    accumulator = cr.IntegrityAccumulator(
        expected_digest="0" * 64,
        expected_size_bytes=8,
        source_url="https://models.example.com/x",
        allowed_source_urls=ALLOWLIST,
    )
    first = accumulator.update(a)  # type: ignore[arg-type]
    accumulator.finalize()
    return first


#: Every public decision, called with four arbitrary values.
DECISIONS: dict[str, Callable[[object, object, object, object], object]] = {
    "validate_source_url": lambda a, b, c, d: cr.validate_source_url(a, b),
    "validate_integrity_spec": lambda a, b, c, d: cr.validate_integrity_spec(a, b),
    "verify_model_bytes": lambda a, b, c, d: cr.verify_model_bytes(
        file_data=a, expected_digest=b, expected_size_bytes=c, source_url=d, allowed_source_urls=a
    ),
    "transition_lifecycle": lambda a, b, c, d: cr.transition_lifecycle(a, b),
    "can_serve_inference": lambda a, b, c, d: cr.can_serve_inference(a),
    "evaluate_admission": lambda a, b, c, d: cr.evaluate_admission(a),
    "evaluate_resource_limits": lambda a, b, c, d: cr.evaluate_resource_limits(a, b),
    "evaluate_runtime_request": lambda a, b, c, d: cr.evaluate_runtime_request(
        lifecycle_state=a, admission_state=b, resource_observation=c, resource_limits=d
    ),
    "evaluate_model_fit": lambda a, b, c, d: cr.evaluate_model_fit(
        model_size_bytes=a,  # type: ignore[arg-type]
        overhead_bytes=b,  # type: ignore[arg-type]
        available_ram_bytes=c,  # type: ignore[arg-type]
        available_vram_bytes=d,  # type: ignore[arg-type]
        resource_limits=a,  # type: ignore[arg-type]
        gpu_offload=b,  # type: ignore[arg-type]
    ),
    "IntegrityAccumulator.update": _accumulator_update,
}

DECISION_PREFIXES = ("validate_", "verify_", "evaluate_", "can_", "transition_")


def test_the_catalogue_holds_every_public_decision() -> None:
    public = {name for name in cr.__all__ if name.startswith(DECISION_PREFIXES)}
    assert public == {name for name in DECISIONS if "." not in name}


@pytest.mark.parametrize("name", sorted(DECISIONS))
@given(a=garbage(), b=garbage(), c=garbage(), d=garbage())
@FAST
def test_every_decision_answers_garbage_with_a_denial(
    name: str, a: object, b: object, c: object, d: object
) -> None:
    result = DECISIONS[name](a, b, c, d)
    if name == "can_serve_inference":
        assert result is False
    elif name == "transition_lifecycle":
        assert type(result) is cr.Transition
    elif name == "IntegrityAccumulator.update" and type(a) in (bytes, bytearray, memoryview):
        # A real chunk within the expected size is the one thing that may be taken.
        assert type(result) is cr.Verdict
        assert result.ok is (len(a) <= 8)  # type: ignore[arg-type]
    else:
        assert type(result) is cr.Verdict
        assert not result.ok  # type: ignore[attr-defined]


#: Every constructor and ``record_*`` call, given one arbitrary value in a field.
BUILDERS: dict[str, Callable[[object], object]] = {
    "IntegrityAccumulator": lambda value: cr.IntegrityAccumulator(
        expected_digest=value,  # type: ignore[arg-type]
        expected_size_bytes=10,
        source_url=value,  # type: ignore[arg-type]
        allowed_source_urls=ALLOWLIST,
    ),
    "create_integrity_accumulator": lambda value: cr.create_integrity_accumulator(
        expected_digest="0" * 64,
        expected_size_bytes=value,  # type: ignore[arg-type]
        source_url="https://models.example.com/x",
        allowed_source_urls=value,  # type: ignore[arg-type]
    ),
    "Lifecycle": lambda value: cr.Lifecycle(value),  # type: ignore[arg-type]
    "create_admission_state": lambda value: cr.create_admission_state(
        max_in_flight=value,  # type: ignore[arg-type]
        queue_bound=value,  # type: ignore[arg-type]
    ),
    "AdmissionState": lambda value: cr.AdmissionState(4, 4, value, 0),  # type: ignore[arg-type]
    "record_in_flight": lambda value: cr.record_in_flight(value),  # type: ignore[arg-type]
    "record_completion": lambda value: cr.record_completion(value),  # type: ignore[arg-type]
    "record_queued": lambda value: cr.record_queued(value),  # type: ignore[arg-type]
    "record_dequeued": lambda value: cr.record_dequeued(value),  # type: ignore[arg-type]
    "create_resource_limits": lambda value: cr.create_resource_limits(
        max_ram_bytes=value,  # type: ignore[arg-type]
        max_vram_bytes=1,
        max_cpu_percent=1,
    ),
    "ResourceObservation": lambda value: cr.ResourceObservation(0, value, 0),  # type: ignore[arg-type]
    "Verdict": lambda value: cr.Verdict(value, cr.Reason.OK),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@given(value=garbage())
@FAST
def test_constructors_raise_only_spec_error_with_a_bare_code(name: str, value: object) -> None:
    try:
        BUILDERS[name](value)
    except cr.SpecError as error:
        assert str(error) in REASON_VALUES
        assert error.args == (error.reason.value,)


SECRET = st.text(alphabet=string.ascii_letters + string.digits, min_size=16, max_size=24).map(
    lambda text: "S3CRET" + text
)


def _texts_of(result: Any) -> list[str]:
    return [repr(result), str(result), repr(getattr(result, "to_dict", lambda: None)())]


@given(secret=SECRET)
@FAST
def test_no_input_value_appears_in_any_verdict_or_error(secret: str) -> None:
    digest = (secret.encode().hex() * 4)[:64]
    urls = [
        f"https://models.example.com/{secret}",
        f"https://models.example.com/x?token={secret}",
        f"https://{secret}:{secret}@models.example.com/x",
        f"http://models.example.com/{secret}",
        f"https://{secret.lower()}.evil.net/x",
        f"https://models.example.com/%2e%2e/{secret}",
        secret,
    ]
    results: list[Any] = []
    for url in urls:
        results.append(cr.validate_source_url(url, [*ALLOWLIST, f"https://{secret.lower()}.net/"]))
        results.append(
            cr.verify_model_bytes(
                file_data=secret.encode(),
                expected_digest=digest,
                expected_size_bytes=len(secret),
                source_url=url,
                allowed_source_urls=ALLOWLIST,
            )
        )
        try:
            accumulator = cr.IntegrityAccumulator(
                expected_digest=digest,
                expected_size_bytes=len(secret),
                source_url=url,
                allowed_source_urls=ALLOWLIST,
            )
        except cr.SpecError as error:
            results.append(error)
        else:
            results.extend(
                [accumulator, accumulator.update(secret.encode()), accumulator.finalize()]
            )
    results.append(cr.validate_integrity_spec(secret, len(secret)))
    results.append(cr.transition_lifecycle(ready(), secret))
    results.append(cr.evaluate_admission(secret))
    results.append(
        cr.evaluate_runtime_request(
            lifecycle_state=ready(),
            admission_state=cr.create_admission_state(max_in_flight=1, queue_bound=1),
            resource_observation=secret,
            resource_limits=reasonable_limits(),
        )
    )
    for build in BUILDERS.values():
        try:
            results.append(build(secret))
        except cr.SpecError as error:
            results.append(error)
    for result in results:
        if type(result) is cr.Verdict:
            assert result.reason.value in REASON_VALUES
        for text in _texts_of(result):
            assert secret not in text
            assert secret.lower() not in text
            assert digest not in text
