"""A first pass over every public decision, end to end."""

from __future__ import annotations

import hashlib

import pytest

import companion_runtime as cr

pytestmark = pytest.mark.unit

ALLOW = ["https://models.example.com/"]
DATA = b"model bytes " * 100
DIGEST = hashlib.sha256(DATA).hexdigest()


def test_verdict_shape() -> None:
    assert cr.ALLOW.to_dict() == {"ok": True, "reason": "ok"}
    assert not cr.deny(cr.Reason.QUEUE_FULL)
    with pytest.raises(cr.SpecError) as error:
        cr.Verdict(True, cr.Reason.QUEUE_FULL)
    assert str(error.value) == "malformed_spec"


def test_sources() -> None:
    assert cr.validate_source_url("https://models.example.com/m.gguf", ALLOW).ok
    assert cr.validate_source_url("http://models.example.com/m.gguf", ALLOW).reason == (
        "scheme_not_allowed"
    )
    assert cr.validate_source_url("https://models.example.com@evil.net/", ALLOW).reason == (
        "malformed_spec"
    )
    assert cr.validate_source_url("https://models.example.com.evil.net/", ALLOW).reason == (
        "source_not_allowed"
    )


def test_integrity() -> None:
    accumulator = cr.IntegrityAccumulator(
        expected_digest=DIGEST,
        expected_size_bytes=len(DATA),
        source_url="https://models.example.com/m",
        allowed_source_urls=ALLOW,
    )
    assert accumulator.update(DATA).ok
    assert accumulator.finalize().ok
    assert accumulator.finalize().reason == "accumulator_finalized"
    corrupted = bytes([DATA[0] ^ 1]) + DATA[1:]
    verdict = cr.verify_model_bytes(
        file_data=corrupted,
        expected_digest=DIGEST,
        expected_size_bytes=len(DATA),
        source_url="https://models.example.com/m",
        allowed_source_urls=ALLOW,
    )
    assert verdict.reason == "digest_mismatch"


def test_lifecycle_and_gate() -> None:
    state = cr.create_lifecycle_state()
    for event in ("start", "health_ok"):
        move = cr.transition_lifecycle(state, cr.LifecycleEvent(event))
        assert move.ok
        state = move.new_state
    assert cr.can_serve_inference(state)
    admission = cr.create_admission_state(max_in_flight=1, queue_bound=1)
    limits = cr.create_resource_limits(max_ram_bytes=10, max_vram_bytes=10, max_cpu_percent=50)
    observation = cr.ResourceObservation(10, 0, 50.0)
    assert cr.evaluate_runtime_request(
        lifecycle_state=state,
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    ).ok
    full = cr.record_in_flight(admission)
    assert cr.evaluate_admission(full).reason == "at_capacity"
    with pytest.raises(cr.SpecError, match=r"^no_in_flight_to_complete$"):
        cr.record_completion(admission)
