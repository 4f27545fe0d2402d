"""Reason codes: the one vocabulary every refusal in the project is expressed in.

A reason is a short machine-readable code, never a sentence, and never carries input data
(no URL, path, digest, size or token). The first block is the wire contract inherited from the
original module; its values must never change. Later blocks are additions for the bind layer.
"""

from __future__ import annotations

import enum

__all__ = ["Reason"]


@enum.unique
class Reason(enum.StrEnum):
    """Why a decision came out the way it did."""

    # --- wire contract (values fixed) -------------------------------------------------------
    #: The decision allowed the action.
    OK = "ok"
    #: A digest, size, URL or other specification value is missing or of the wrong shape.
    MALFORMED_SPEC = "malformed_spec"
    #: The source URL is well formed but no allowlist entry covers it.
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    #: The source URL's scheme is not ``https``.
    SCHEME_NOT_ALLOWED = "scheme_not_allowed"
    #: The byte count differs from the expected size.
    SIZE_MISMATCH = "size_mismatch"
    #: The SHA-256 of the bytes differs from the expected digest.
    DIGEST_MISMATCH = "digest_mismatch"
    #: The accumulator was already finalized; it is single use.
    ACCUMULATOR_FINALIZED = "accumulator_finalized"
    #: The accumulator was aborted and accepts nothing more.
    ACCUMULATOR_ABORTED = "accumulator_aborted"
    #: The lifecycle table has no move for this (state, event) pair.
    INVALID_TRANSITION = "invalid_transition"
    #: The runtime is not in ``ready``; inference is not admitted.
    NOT_READY = "not_ready"
    #: The event is not a known lifecycle event.
    UNKNOWN_EVENT = "unknown_event"
    #: The lifecycle value is not a known lifecycle state.
    UNKNOWN_STATE = "unknown_state"
    #: The admission counters are not a consistent admission state.
    MALFORMED_ADMISSION_STATE = "malformed_admission_state"
    #: Every in-flight slot is taken; the request may wait in the queue.
    AT_CAPACITY = "at_capacity"
    #: Every slot and every queue place is taken; the request is refused.
    QUEUE_FULL = "queue_full"
    #: A completion was recorded while nothing was in flight.
    NO_IN_FLIGHT_TO_COMPLETE = "no_in_flight_to_complete"
    #: The resource limits are not a valid set of ceilings.
    MALFORMED_LIMITS = "malformed_limits"
    #: The resource observation is missing, malformed or too old.
    MALFORMED_OBSERVATION = "malformed_observation"
    #: The runtime's resident memory is over its ceiling.
    RAM_OVER_LIMIT = "ram_over_limit"
    #: The runtime's GPU memory is over its ceiling.
    VRAM_OVER_LIMIT = "vram_over_limit"
    #: The runtime's CPU share is over its ceiling.
    CPU_OVER_LIMIT = "cpu_over_limit"
    #: The request's parameters are not of the expected shape.
    MALFORMED_REQUEST_PARAMS = "malformed_request_params"

    # --- admission (bind layer) -------------------------------------------------------------
    #: A queued request's deadline passed before a slot was free.
    QUEUE_TIMEOUT = "queue_timeout"
    #: A request was admitted but the runtime went away while it ran.
    RUNTIME_GONE = "runtime_gone"

    # --- download and store -----------------------------------------------------------------
    #: A redirect pointed outside the allowlist or away from ``https``.
    REDIRECT_NOT_ALLOWED = "redirect_not_allowed"
    #: More redirects than the hop limit, or a redirect loop.
    TOO_MANY_REDIRECTS = "too_many_redirects"
    #: The transfer failed (connection reset, TLS failure, unexpected status, ...).
    DOWNLOAD_FAILED = "download_failed"
    #: The server answered with a status that is not a success.
    HTTP_STATUS = "http_status"
    #: The server sent a content encoding although ``identity`` was asked for (or a transfer
    #: coding other than ``chunked``, which no request asks for).
    CONTENT_ENCODING_NOT_ALLOWED = "content_encoding_not_allowed"
    #: A connect, read or stall timeout expired.
    TIMEOUT = "timeout"
    #: The store's file system has too little free space for the model.
    INSUFFICIENT_DISK = "insufficient_disk"
    #: The model store could not be read or written (a file to verify is there but could not
    #: be read: no permission, too many open files, an I/O error).
    STORE_ERROR = "store_error"
    #: The file to verify does not exist or is not a regular file.
    FILE_NOT_FOUND = "file_not_found"
    #: The TLS certificate or CA bundle could not be used.
    TLS_ERROR = "tls_error"
    #: The pull was stopped on request (a signal) before it finished; what arrived is kept
    #: for a resume and nothing was published.
    CANCELLED = "cancelled"

    # --- manifest ---------------------------------------------------------------------------
    #: The manifest is not valid TOML or a field is missing or of the wrong type.
    MALFORMED_MANIFEST = "malformed_manifest"

    # --- runtime supervision ----------------------------------------------------------------
    #: The model cannot fit within the RAM/VRAM headroom and limits.
    MODEL_TOO_LARGE = "model_too_large"
    #: The runtime executable is not an absolute path to an executable file.
    EXECUTABLE_NOT_ALLOWED = "executable_not_allowed"
    #: The runtime process could not be started.
    SPAWN_FAILED = "spawn_failed"
    #: The runtime did not become healthy before its ready timeout.
    READY_TIMEOUT = "ready_timeout"
    #: The runtime process exited.
    RUNTIME_EXITED = "runtime_exited"
    #: The runtime stopped answering its health check.
    RUNTIME_UNHEALTHY = "runtime_unhealthy"
    #: The runtime crashed more often than the restart limit allows.
    RESTART_LIMIT_REACHED = "restart_limit_reached"
    #: The runtime the manifest names is not installed.
    RUNTIME_NOT_INSTALLED = "runtime_not_installed"

    # --- front door -------------------------------------------------------------------------
    #: The bearer token is missing or wrong.
    UNAUTHORIZED = "unauthorized"
    #: The ``Host`` header is not a loopback name with the front door's port; for ``status``,
    #: the URL is not one the token may be sent to.
    HOST_NOT_ALLOWED = "host_not_allowed"
    #: The ``Origin`` header is not the front door's own origin.
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    #: The runtime answered with an error or could not be reached.
    UPSTREAM_ERROR = "upstream_error"
    #: The request could not be parsed as HTTP.
    BAD_REQUEST = "bad_request"
    #: The request body is larger than the front door accepts.
    REQUEST_TOO_LARGE = "request_too_large"
