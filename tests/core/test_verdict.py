"""Verdicts, prebuilt denials and SpecError (``core/_verdict.py``)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

import companion_runtime as cr

pytestmark = pytest.mark.unit

DENIAL_REASONS = [reason for reason in cr.Reason if reason is not cr.Reason.OK]


def test_allow_is_ok_truthy_and_serialises_to_the_wire_shape() -> None:
    assert cr.ALLOW.ok is True
    assert cr.ALLOW.reason is cr.Reason.OK
    assert bool(cr.ALLOW) is True
    assert cr.ALLOW.to_dict() == {"ok": True, "reason": "ok"}
    assert cr.Verdict(True, cr.Reason.OK) == cr.ALLOW


@pytest.mark.parametrize("reason", DENIAL_REASONS)
def test_every_denial_is_falsy_prebuilt_and_serialises_exactly(reason: cr.Reason) -> None:
    verdict = cr.deny(reason)
    assert verdict is cr.deny(reason)
    assert bool(verdict) is False
    assert verdict == cr.Verdict(ok=False, reason=reason)
    wire = verdict.to_dict()
    assert wire == {"ok": False, "reason": reason.value}
    assert type(wire["reason"]) is str
    assert type(wire["ok"]) is bool


@pytest.mark.parametrize(
    ("ok", "reason"),
    [
        (True, cr.Reason.QUEUE_FULL),
        (False, cr.Reason.OK),
        (1, cr.Reason.OK),
        (0, cr.Reason.QUEUE_FULL),
        (None, cr.Reason.QUEUE_FULL),
        (True, "ok"),
        (False, "queue_full"),
    ],
)
def test_an_inconsistent_verdict_cannot_be_built(ok: object, reason: object) -> None:
    with pytest.raises(cr.SpecError) as error:
        cr.Verdict(ok, reason)  # type: ignore[arg-type]
    assert str(error.value) == "malformed_spec"


@pytest.mark.parametrize("reason", [cr.Reason.OK, "queue_full", None, 3])
def test_deny_refuses_anything_but_a_denial_reason(reason: object) -> None:
    with pytest.raises(cr.SpecError):
        cr.deny(reason)  # type: ignore[arg-type]


def test_verdicts_are_frozen_and_slotted() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        cr.ALLOW.ok = False  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        cr.ALLOW.extra = 1  # type: ignore[attr-defined]
    assert not hasattr(cr.ALLOW, "__dict__")


def test_spec_error_message_is_the_code_alone() -> None:
    error = cr.SpecError(cr.Reason.MALFORMED_LIMITS)
    assert isinstance(error, ValueError)
    assert str(error) == "malformed_limits"
    assert error.args == ("malformed_limits",)
    assert error.reason is cr.Reason.MALFORMED_LIMITS
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is cr.SpecError
    assert restored.reason is cr.Reason.MALFORMED_LIMITS


@pytest.mark.security
@pytest.mark.parametrize("message", ["https://user:pw@host/", "a" * 64, 42, None, b"ok"])
def test_spec_error_never_echoes_a_message_that_is_not_a_reason(message: object) -> None:
    # A free-text message could carry input data; anything but a code becomes malformed_spec.
    error = cr.SpecError(message)  # type: ignore[arg-type]
    assert str(error) == "malformed_spec"
    assert error.reason is cr.Reason.MALFORMED_SPEC


def test_spec_error_accepts_a_reason_code_string() -> None:
    assert cr.SpecError("queue_full").reason is cr.Reason.QUEUE_FULL  # type: ignore[arg-type]


def test_reason_values_are_codes_never_sentences() -> None:
    for reason in cr.Reason:
        assert reason.value.replace("_", "").isalpha()
        assert reason.value == reason.value.lower()
        assert str(reason) == reason.value
