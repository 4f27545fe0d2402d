"""companion-runtime: run a local model inference runtime safely.

The top-level package is the pure decision core (see :mod:`companion_runtime.core`); importing
it loads no I/O module. The I/O lives in :mod:`companion_runtime.bind` and the command line in
:mod:`companion_runtime.cli`, which are imported only when asked for.
"""

from __future__ import annotations

from companion_runtime.core import (
    ALLOW,
    LIFECYCLE_TABLE,
    SERVING,
    AdmissionState,
    IntegrityAccumulator,
    Lifecycle,
    LifecycleEvent,
    LifecycleState,
    Reason,
    ResourceLimits,
    ResourceObservation,
    SpecError,
    Transition,
    Verdict,
    can_serve_inference,
    create_admission_state,
    create_integrity_accumulator,
    create_lifecycle_state,
    create_resource_limits,
    deny,
    evaluate_admission,
    evaluate_model_fit,
    evaluate_resource_limits,
    evaluate_runtime_request,
    record_completion,
    record_dequeued,
    record_in_flight,
    record_queued,
    transition_lifecycle,
    validate_integrity_spec,
    validate_source_url,
    verify_model_bytes,
)

__version__ = "0.1.0"

__all__ = [
    "ALLOW",
    "LIFECYCLE_TABLE",
    "SERVING",
    "AdmissionState",
    "IntegrityAccumulator",
    "Lifecycle",
    "LifecycleEvent",
    "LifecycleState",
    "Reason",
    "ResourceLimits",
    "ResourceObservation",
    "SpecError",
    "Transition",
    "Verdict",
    "__version__",
    "can_serve_inference",
    "create_admission_state",
    "create_integrity_accumulator",
    "create_lifecycle_state",
    "create_resource_limits",
    "deny",
    "evaluate_admission",
    "evaluate_model_fit",
    "evaluate_resource_limits",
    "evaluate_runtime_request",
    "record_completion",
    "record_dequeued",
    "record_in_flight",
    "record_queued",
    "transition_lifecycle",
    "validate_integrity_spec",
    "validate_source_url",
    "verify_model_bytes",
]
