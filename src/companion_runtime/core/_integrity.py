"""Supply-chain integrity: are these the bytes the manifest promised?

The check works on chunks (a streaming :class:`IntegrityAccumulator`); the in-memory
:func:`verify_model_bytes` and the file and HTTPS helpers of the bind layer are thin wrappers
on top of the same rules. Size is counted while the bytes stream, and the chunk that takes the
count past the expected size is refused at once, so a downloader stops at size + 1 bytes instead
of at the end of a hostile stream. Digests are compared in constant time, on the digests hashed
once more so that neither length nor content of the expected value shapes the comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import final

from companion_runtime.core._reasons import Reason
from companion_runtime.core._sources import validate_source_url
from companion_runtime.core._verdict import ALLOW, SpecError, Verdict, deny

__all__ = [
    "IntegrityAccumulator",
    "create_integrity_accumulator",
    "validate_integrity_spec",
    "verify_model_bytes",
]

_DIGEST = re.compile(r"[0-9a-f]{64}")
_MALFORMED = deny(Reason.MALFORMED_SPEC)
_SIZE_MISMATCH = deny(Reason.SIZE_MISMATCH)
_DIGEST_MISMATCH = deny(Reason.DIGEST_MISMATCH)
_FINALIZED = deny(Reason.ACCUMULATOR_FINALIZED)
_ABORTED = deny(Reason.ACCUMULATOR_ABORTED)


def validate_integrity_spec(expected_digest: object, expected_size_bytes: object) -> Verdict:
    """Is this a usable (digest, size) pair?

    Never raises. The digest must be a ``str`` of exactly 64 lowercase hex characters and the
    size an ``int`` (not ``bool``) greater than zero; anything else is ``malformed_spec``.
    """
    if (
        type(expected_digest) is str
        and _DIGEST.fullmatch(expected_digest) is not None
        and type(expected_size_bytes) is int
        and expected_size_bytes > 0
    ):
        return ALLOW
    return _MALFORMED


def _digests_equal(actual_digest: bytes, expected_digest_hashed: bytes) -> bool:
    # Hash the actual digest again so that both operands of the comparison are fixed-length
    # values the attacker cannot steer byte by byte; compare_digest then runs in constant time.
    return hmac.compare_digest(hashlib.sha256(actual_digest).digest(), expected_digest_hashed)


def _checked_spec(
    expected_digest: object,
    expected_size_bytes: object,
    source_url: object,
    allowed_source_urls: object,
) -> Verdict:
    verdict = validate_source_url(source_url, allowed_source_urls)
    if not verdict.ok:
        return verdict
    return validate_integrity_spec(expected_digest, expected_size_bytes)


@final
class IntegrityAccumulator:
    """Hash and count a model's bytes as they stream, then decide once.

    The constructor validates the source against the allowlist and the (digest, size) spec
    and raises :class:`SpecError` with the reason code when either is refused.
    :meth:`update` and :meth:`finalize` never raise; they return :class:`Verdict`\\ s.

    Single use: after :meth:`finalize` every further call returns ``accumulator_finalized``;
    after :meth:`abort` or a non-bytes chunk, ``accumulator_aborted``; after the chunk that
    overran the expected size, ``size_mismatch`` again.
    """

    __slots__ = ("_closed", "_expected_digest_hashed", "_expected_size", "_hasher", "_received")

    def __init__(
        self,
        *,
        expected_digest: str,
        expected_size_bytes: int,
        source_url: str,
        allowed_source_urls: list[str] | tuple[str, ...] | set[str] | frozenset[str],
    ) -> None:
        verdict = _checked_spec(
            expected_digest, expected_size_bytes, source_url, allowed_source_urls
        )
        if not verdict.ok:
            raise SpecError(verdict.reason)
        self._hasher = hashlib.sha256()
        self._expected_size = expected_size_bytes
        self._expected_digest_hashed = hashlib.sha256(bytes.fromhex(expected_digest)).digest()
        self._received = 0
        # None while open; otherwise the verdict every further call returns.
        self._closed: Verdict | None = None

    @property
    def received_bytes(self) -> int:
        """How many bytes have been taken into the hash so far."""
        return self._received

    def update(self, chunk: bytes | bytearray | memoryview) -> Verdict:
        """Take the next chunk; ``ok`` while the stream is still within the expected size.

        A chunk that is not ``bytes``, ``bytearray`` or ``memoryview`` (a view that is not
        C-contiguous is hashed as its ``tobytes()``, its bytes in logical order) returns
        ``malformed_spec`` and aborts the accumulator, as does a released view. The chunk that
        takes the count past the expected size returns ``size_mismatch`` and aborts it: stop
        reading at once.
        """
        if self._closed is not None:
            return self._closed
        chunk_type = type(chunk)
        try:
            if chunk_type is memoryview:
                size = chunk.nbytes  # type: ignore[union-attr]
                if not chunk.c_contiguous:  # type: ignore[union-attr]
                    chunk = chunk.tobytes()  # type: ignore[union-attr]  # hashlib needs C order
            elif chunk_type is bytes or chunk_type is bytearray:
                size = len(chunk)
            else:
                self._closed = _ABORTED
                return _MALFORMED
            if self._received + size > self._expected_size:
                self._closed = _SIZE_MISMATCH
                return _SIZE_MISMATCH
            self._hasher.update(chunk)
        except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
            # A released memoryview: refuse it like any other bad chunk.
            self._closed = _ABORTED
            return _MALFORMED
        self._received += size
        return ALLOW

    def finalize(self) -> Verdict:
        """Decide: size exact first, then the digest in constant time. Single use."""
        if self._closed is not None:
            return self._closed
        self._closed = _FINALIZED
        if self._received != self._expected_size:
            return _SIZE_MISMATCH
        if not _digests_equal(self._hasher.digest(), self._expected_digest_hashed):
            return _DIGEST_MISMATCH
        return ALLOW

    def abort(self) -> None:
        """Give up: every further call returns ``accumulator_aborted``.

        Aborting a finalized or already aborted accumulator changes nothing.
        """
        if self._closed is None:
            self._closed = _ABORTED

    def __repr__(self) -> str:
        # Deliberately leaves out the expected digest and size.
        return f"<IntegrityAccumulator received_bytes={self._received}>"


def create_integrity_accumulator(
    *,
    expected_digest: str,
    expected_size_bytes: int,
    source_url: str,
    allowed_source_urls: list[str] | tuple[str, ...] | set[str] | frozenset[str],
) -> IntegrityAccumulator:
    """Same as :class:`IntegrityAccumulator` (raises :class:`SpecError` likewise)."""
    return IntegrityAccumulator(
        expected_digest=expected_digest,
        expected_size_bytes=expected_size_bytes,
        source_url=source_url,
        allowed_source_urls=allowed_source_urls,
    )


def verify_model_bytes(
    *,
    file_data: object,
    expected_digest: object,
    expected_size_bytes: object,
    source_url: object,
    allowed_source_urls: object,
) -> Verdict:
    """Verify a whole model held in memory. Never raises.

    Checks, in order: the source against the allowlist, the (digest, size) spec, the type of
    ``file_data`` (``bytes``, ``bytearray`` or ``memoryview``, else ``malformed_spec``), the
    size, and the digest (constant time).
    """
    verdict = _checked_spec(expected_digest, expected_size_bytes, source_url, allowed_source_urls)
    if not verdict.ok:
        return verdict
    data_type = type(file_data)
    try:
        if data_type is memoryview:
            size = file_data.nbytes  # type: ignore[attr-defined]
            if not file_data.c_contiguous:  # type: ignore[attr-defined]
                file_data = file_data.tobytes()  # type: ignore[attr-defined]
        elif data_type is bytes or data_type is bytearray:
            size = len(file_data)  # type: ignore[arg-type]
        else:
            return _MALFORMED
        if size != expected_size_bytes:
            return _SIZE_MISMATCH
        actual = hashlib.sha256(file_data).digest()  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - never raise: a refusal is the answer
        # A released memoryview.
        return _MALFORMED
    expected_hashed = hashlib.sha256(bytes.fromhex(expected_digest)).digest()  # type: ignore[arg-type]
    return ALLOW if _digests_equal(actual, expected_hashed) else _DIGEST_MISMATCH
