"""The public surface of ``import companion_runtime``: complete, honest, and I/O-free."""

from __future__ import annotations

import importlib
import pkgutil
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
    # Every module of the core, found on disk, so that a new module cannot be forgotten.
    names = [info.name for info in pkgutil.iter_modules(core.__path__) if info.name.startswith("_")]
    assert {"_verdict", "_sources", "_integrity", "_lifecycle", "_admission", "_resources"} <= set(
        names
    )
    exported: set[str] = set()
    for name in names:
        module = importlib.import_module(f"{core.__name__}.{name}")
        assert isinstance(module.__all__, list), name
        for public in module.__all__:
            assert getattr(core, public) is getattr(module, public), (name, public)
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


@pytest.mark.security
def test_the_import_contracts_hold() -> None:
    # The purity of the core is also a static contract (pyproject.toml, [tool.importlinter]).
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "The core is pure: no I/O modules KEPT" in result.stdout
