"""The pure decision core: every decision of companion-runtime as a function of its inputs.

Nothing here performs I/O, reads a clock or keeps hidden state. Time, byte chunks, process
events and resource samples come in as arguments; decisions go out as values
(:class:`Verdict`, :class:`Transition`, new :class:`AdmissionState` snapshots).
"""

from __future__ import annotations

from companion_runtime.core._admission import (
    AdmissionState,
    create_admission_state,
    evaluate_admission,
    record_completion,
    record_dequeued,
    record_in_flight,
    record_queued,
)
from companion_runtime.core._fit import evaluate_model_fit
from companion_runtime.core._gate import evaluate_runtime_request
from companion_runtime.core._integrity import (
    IntegrityAccumulator,
    create_integrity_accumulator,
    validate_integrity_spec,
    verify_model_bytes,
)
from companion_runtime.core._lifecycle import (
    LIFECYCLE_TABLE,
    SERVING,
    Lifecycle,
    LifecycleEvent,
    LifecycleState,
    Transition,
    can_serve_inference,
    create_lifecycle_state,
    transition_lifecycle,
)
from companion_runtime.core._reasons import Reason
from companion_runtime.core._resources import (
    ResourceLimits,
    ResourceObservation,
    create_resource_limits,
    evaluate_resource_limits,
)
from companion_runtime.core._sources import validate_source_url
from companion_runtime.core._verdict import ALLOW, SpecError, Verdict, deny

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
