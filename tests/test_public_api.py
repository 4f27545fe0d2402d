"""The public surface of ``import companion_runtime``: complete, honest, and I/O-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import companion_runtime as cr
import companion_runtime.core as core

pytestmark = pytest.mark.unit

CONTRACT = {
    "Reason",
    "Verdict",
    "SpecError",
    "validate_source_url",
    "validate_integrity_spec",
    "IntegrityAccumulator",
    "create_integrity_accumulator",
    "verify_model_bytes",
    "LifecycleState",
    "LifecycleEvent",
    "Lifecycle",
    "Transition",
    "create_lifecycle_state",
    "transition_lifecycle",
    "can_serve_inference",
    "AdmissionState",
    "create_admission_state",
    "evaluate_admission",
    "record_in_flight",
    "record_completion",
    "record_queued",
    "record_dequeued",
    "ResourceLimits",
    "create_resource_limits",
    "ResourceObservation",
    "evaluate_resource_limits",
    "evaluate_runtime_request",
}

IO_MODULES = ("socket", "ssl", "asyncio", "subprocess", "httpx", "psutil", "selectors")
AUTHORITY_WORDS = ("vault", "keychain", "jwt", "token", "canister", "session", "auth", "secret")
ROOT = Path(__file__).resolve().parents[1]


def test_every_contract_name_is_exported_at_the_top_level() -> None:
    assert set(cr.__all__) >= CONTRACT
    for name in CONTRACT:
        assert getattr(cr, name) is getattr(core, name)


def test_all_lists_exactly_the_public_names() -> None:
    # Honest __all__: every listed name exists, is unique, and nothing public is left out.
    for module in (cr, core):
        assert len(module.__all__) == len(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), name
    public = {
        name
        for name, value in vars(cr).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith(cr.__name__)
    }
    assert public <= set(cr.__all__)
    assert set(core.__all__) | {"__version__"} == set(cr.__all__)


def test_private_modules_declare_all_and_core_reexports_them() -> None:
    from companion_runtime.core import (
        _admission,
        _gate,
        _integrity,
        _lifecycle,
        _reasons,
        _resources,
        _sources,
        _verdict,
    )

    modules = (_admission, _gate, _integrity, _lifecycle, _reasons, _resources, _sources, _verdict)
    exported: set[str] = set()
    for module in modules:
        for name in module.__all__:
            assert hasattr(module, name)
            assert getattr(core, name) is getattr(module, name)
        exported |= set(module.__all__)
    assert exported == set(core.__all__)


@pytest.mark.security
def test_no_export_is_named_like_an_ambient_authority() -> None:
    for name in cr.__all__:
        lowered = name.lower()
        assert not any(word in lowered for word in AUTHORITY_WORDS), name


@pytest.mark.security
def test_import_loads_no_io_module() -> None:
    code = (
        "import sys, json; import companion_runtime; "
        f"print(json.dumps([m for m in {IO_MODULES!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_public_classes_are_final_and_slotted() -> None:
    for cls in (
        cr.Verdict,
        cr.Lifecycle,
        cr.Transition,
        cr.AdmissionState,
        cr.ResourceLimits,
        cr.ResourceObservation,
        cr.IntegrityAccumulator,
    ):
        assert getattr(cls, "__final__", False) is True, cls
        assert "__slots__" in vars(cls), cls
    assert getattr(cr.SpecError, "__final__", False) is True
