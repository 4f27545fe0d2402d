"""Pull a model into the store: reuse a verified blob, or download, verify and publish it.

Policy for a stored blob that no longer verifies (tampered with or corrupted on disk), or that
someone other than this user could change (another user's file, or one with group or other
write permission: copied in by hand, restored from a backup), whose bytes could differ by the
time the runtime loads them: it is never used. It is removed from the store and the model is
downloaded again from its allowlisted source; the new bytes go through the same verification
as any download. A warning is logged (reason code only). A blob of another size than the
manifest's that still hashes to its digest (its name) is intact, and the manifest's size is
wrong: the pull is refused ``size_mismatch`` and the blob stays, for the manifests that name
it right.

A stored blob that is there but could not be read (no permission, too many open files, no
memory, an I/O error) says nothing about its bytes: the pull is refused ``store_error``, the
blob stays, and nothing is downloaded (it had been taken for a missing blob, removed, and
fetched again: a lost model without a network). Something other than a regular file at the
blob's name (a directory, a FIFO, a symlink to nothing) is refused ``store_error`` before any
request and left as it is: no download could be published over it.

Concurrency: the whole pull of one digest runs under the store's per-digest file lock, so two
pulls in two threads or two processes download it once; the second finds the published blob
when it gets the lock, and re-verifies it like any other stored blob.

Read-only store: a store on a file system mounted read-only (a model baked into an image, by
root for another user too; a shared read-only mount) cannot hold a lock file, but then no
pull can change its blobs either, so a stored blob is re-verified and used without the lock.
Anything that would write there (a download, removing a blob that no longer verifies) is
refused with ``store_error``.

Cancellation: ``cancel`` (a :class:`threading.Event`) is for a caller that must stop a pull
running in another thread, as ``serve`` and ``pull`` do on SIGINT, SIGTERM or SIGHUP. Once it is
set, the pull stops within about a second wherever it is (waiting for the lock, re-verifying a
stored blob, downloading) with ``cancelled``: nothing is published, a stored blob is left as it
is, the partial download is kept for the next pull to resume, and the lock is released.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import final

import filelock

from companion_runtime.bind.download import (
    DEFAULT_DOWNLOAD_OPTIONS,
    DownloadError,
    DownloadOptions,
    FreeSpace,
    ProgressCallback,
    download_to_store,
)
from companion_runtime.bind.filehash import (
    UnreadableFileError,
    VerifyPolicy,
    verify_file_or_raise,
)
from companion_runtime.bind.httpsget import POLL_S
from companion_runtime.bind.manifest import Manifest, ModelSpec
from companion_runtime.bind.store import ModelStore, StoreError
from companion_runtime.core import Reason, Verdict, validate_integrity_spec

__all__ = ["PullResult", "pull_model"]

_log = logging.getLogger(__name__)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PullResult:
    """The outcome of a pull: the verdict, and the verified blob's path when it is ok."""

    verdict: Verdict
    path: Path | None

    @property
    def ok(self) -> bool:
        """Whether the pull produced a verified blob."""
        return self.verdict.ok

    def to_dict(self) -> dict[str, object]:
        """``{"ok", "reason"}`` plus ``"path"`` on success (the CLI's JSON shape)."""
        result: dict[str, object] = dict(self.verdict.to_dict())
        if self.path is not None:
            result["path"] = str(self.path)
        return result


_NOT_FOUND = Verdict(False, Reason.FILE_NOT_FOUND)


def _refused(reason: Reason) -> PullResult:
    return PullResult(verdict=Verdict(False, reason), path=None)


def _take(lock: filelock.BaseFileLock, cancel: threading.Event | None) -> bool:
    """Wait for ``lock`` (another pull of the same model may hold it for long), or a cancel.

    False, without the lock, when the store is on a read-only file system (see the module
    documentation).
    """
    while True:
        if cancel is not None and cancel.is_set():
            raise DownloadError(Reason.CANCELLED)
        try:
            lock.acquire(timeout=POLL_S if cancel is not None else -1)
        except filelock.Timeout:
            continue
        except OSError as error:
            if error.errno == errno.EROFS:
                return False
            raise
        return True


def _intact_at_its_own_size(
    blob: Path, digest: str, cancelled: Callable[[], bool] | None
) -> Verdict:
    """Whether the blob, whatever its size, still hashes to ``digest`` (its name).

    Raises :class:`UnreadableFileError` when it is there but could not be read.
    """
    try:
        size = blob.stat().st_size
    except FileNotFoundError:
        return _NOT_FOUND
    except OSError:
        raise UnreadableFileError from None
    return verify_file_or_raise(
        blob, expected_digest=digest, expected_size_bytes=size, cancelled=cancelled
    )


def pull_model(
    source: Manifest | ModelSpec,
    *,
    store: ModelStore,
    allowed_source_urls: tuple[str, ...] | None = None,
    ca_bundle: Path | None = None,
    progress: ProgressCallback | None = None,
    options: DownloadOptions | None = None,
    free_space: FreeSpace | None = None,
    verify_policy: VerifyPolicy = "full",
    cancel: threading.Event | None = None,
) -> PullResult:
    """Make the manifest's model available in ``store`` as a verified blob.

    ``source`` is a :class:`Manifest` or a :class:`ModelSpec` plus ``allowed_source_urls``.
    Never raises for refusals: they come back as a :class:`PullResult` whose verdict carries the
    reason. Blocking; thread-safe (call it from a worker thread in async code).
    ``verify_policy="size_only"`` skips re-hashing an already stored blob (opt-in; a download
    is always fully verified). Setting ``cancel`` from another thread stops the pull within
    about a second with ``cancelled`` (see the module docstring).
    """
    if isinstance(source, Manifest):
        model = source.model
        allow = source.sources.allow
    else:
        model = source
        allow = allowed_source_urls or ()
    if not validate_integrity_spec(model.sha256, model.size_bytes).ok:
        return _refused(Reason.MALFORMED_SPEC)
    if verify_policy not in ("full", "size_only"):
        # Checked here: a policy the re-verify rejected would otherwise look like a bad blob.
        return _refused(Reason.MALFORMED_SPEC)
    base = options or DEFAULT_DOWNLOAD_OPTIONS
    if ca_bundle is not None:
        base = dataclasses.replace(base, ca_bundle=ca_bundle)
    cancelled = cancel.is_set if cancel is not None else None
    try:
        store.ensure_layout()
        lock = store.lock(model.sha256)
        locked = _take(lock, cancel)
        try:
            # Something other than a regular file at the blob's name (a directory, a FIFO) is
            # refused here, before any request: no download could be published over it.
            blob = store.stored_blob(model.sha256)
            if blob is not None:
                verdict = verify_file_or_raise(
                    blob,
                    expected_digest=model.sha256,
                    expected_size_bytes=model.size_bytes,
                    policy=verify_policy,
                    cancelled=cancelled,
                    # One someone else could still change is no verified blob: removed and
                    # fetched again, so the blob named is ours and read-only.
                    private=True,
                )
                if verdict.ok:
                    return PullResult(verdict=verdict, path=blob)
                if verdict.reason is Reason.CANCELLED:
                    return _refused(Reason.CANCELLED)  # says nothing about the blob: keep it
                if verdict.reason is Reason.SIZE_MISMATCH:
                    # The blob is named by its digest: when its bytes still hash to it, the
                    # size that is wrong is the manifest's, and the blob stays for the
                    # manifests that name it right.
                    intact = _intact_at_its_own_size(blob, model.sha256, cancelled)
                    if intact.reason is Reason.CANCELLED:
                        return _refused(Reason.CANCELLED)
                    if intact.ok:
                        return _refused(Reason.SIZE_MISMATCH)
                _log.warning(
                    "stored blob failed re-verification (%s); fetching it again",
                    verdict.reason.value,
                )
                store.remove_blob(model.sha256)
            path = download_to_store(
                url=model.url,
                allowed_source_urls=allow,
                expected_digest=model.sha256,
                expected_size_bytes=model.size_bytes,
                store=store,
                options=base,
                progress=progress,
                free_space=free_space,
                cancel=cancel,
            )
        finally:
            if locked:
                lock.release()
    except (DownloadError, StoreError) as error:
        return _refused(error.reason)
    except UnreadableFileError as error:
        # The stored blob is there but could not be read (no permission, too many open
        # files, no memory, an I/O error): nothing is known about its bytes, so it is kept
        # and nothing is downloaded; the next pull re-verifies it.
        return _refused(error.reason)
    except OSError:
        # Creating the store or taking its lock failed.
        return _refused(Reason.STORE_ERROR)
    return PullResult(verdict=Verdict(True, Reason.OK), path=path)
