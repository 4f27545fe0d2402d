"""Verify a file on disk against an expected SHA-256 and size, through the core accumulator.

The pure :class:`~companion_runtime.core.IntegrityAccumulator` decides; this module only feeds it
the file's bytes. Reading and hashing overlap: two large buffers alternate, the main thread
``readinto``\\ s one while a worker thread hashes the other (``hashlib`` releases the GIL for
large buffers), so a re-verify runs at close to the hash's own speed.

The size is checked from ``stat`` first, so a file of the wrong length is refused without
reading it, and the accumulator refuses the first byte past the expected size, so a file that
grows while it is read is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Literal, Protocol, final

from companion_runtime.bind.read_only_file_system import (
    file_system_read_only,
    on_no_file_of_another_user,
)
from companion_runtime.bind.regular_file import NotARegularFileError, open_regular_file
from companion_runtime.core import IntegrityAccumulator, Reason, SpecError, Verdict

__all__ = [
    "LOCAL_ALLOWLIST",
    "LOCAL_SOURCE_URL",
    "READ_BUFFER_BYTES",
    "RawReadable",
    "UnreadableFileError",
    "VerifyPolicy",
    "hash_file_into",
    "verify_file",
    "verify_file_or_raise",
]

#: ``"full"`` re-hashes every byte; ``"size_only"`` trusts the store and checks the length only.
VerifyPolicy = Literal["full", "size_only"]

#: Size of each of the two read buffers. Large reads keep the per-call overhead negligible and
#: let hashlib release the GIL for long stretches.
READ_BUFFER_BYTES: Final = 4 * 1024 * 1024

#: The accumulator is built for downloads and insists on a source; a local file has none, so it
#: is described by this placeholder (``.invalid`` is reserved and never resolves).
LOCAL_SOURCE_URL: Final = "https://local.invalid/file"
#: The allowlist that admits :data:`LOCAL_SOURCE_URL`.
LOCAL_ALLOWLIST: Final = ("https://local.invalid/",)


class RawReadable(Protocol):
    """A binary file opened without buffering (``open(path, "rb", buffering=0)``)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def fileno(self) -> int: ...


_OK = Verdict(True, Reason.OK)
_FILE_NOT_FOUND = Verdict(False, Reason.FILE_NOT_FOUND)
_SIZE_MISMATCH = Verdict(False, Reason.SIZE_MISMATCH)
_MALFORMED = Verdict(False, Reason.MALFORMED_SPEC)
_CANCELLED = Verdict(False, Reason.CANCELLED)
_NOT_PRIVATE = Verdict(False, Reason.STORE_ERROR)
_UNREADABLE = Verdict(False, Reason.STORE_ERROR)
#: The errors that say the name is not there (or cannot be): the file is absent. Any other
#: (``EACCES``, ``EMFILE``, ``ENFILE``, ``ENOMEM``, ``EIO``...) says nothing about its bytes.
_ABSENT: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})
#: Write permission for anyone but the owner.
_WRITE_BY_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH


def _only_ours_to_change(fd: int, info: os.stat_result) -> bool:
    """Whether only this user can change the open file's bytes (or nobody can)."""
    if info.st_uid == os.geteuid() and not info.st_mode & _WRITE_BY_OTHERS:
        # Unless the file system lies on a disk image another user may write: its owner
        # writes whatever it holds, whoever the file's owner field names.
        return on_no_file_of_another_user(info.st_dev)
    # A read-only file system (a model baked into an image) cannot change, whoever owns it.
    # A read-only mount of one that is writable elsewhere (a bind mount, docker's ":ro" or
    # "--read-only") can: its owner, and whoever else may write it, write the bytes through
    # any other mount of it. Root's file that only root may write stays as it is, then, as
    # long as no one but root can write through any mount, nor the disk image it lies on. A
    # read-only overlay is no read-only file system either, nor one on a disk image others
    # may write (see read_only_file_system).
    if not os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        return False
    if info.st_uid == 0 and not info.st_mode & _WRITE_BY_OTHERS:
        return on_no_file_of_another_user(info.st_dev)
    return file_system_read_only(info.st_dev)


@final
class UnreadableFileError(Exception):
    """The file is there but could not be opened or read (no permission, too many open files,
    no memory, an I/O error): nothing is known about its bytes. The message is the reason code
    alone (``store_error``)."""

    def __init__(self) -> None:
        super().__init__(Reason.STORE_ERROR.value)
        self.reason: Final = Reason.STORE_ERROR


def verify_file(
    path: str | os.PathLike[str],
    *,
    expected_digest: str,
    expected_size_bytes: int,
    policy: VerifyPolicy = "full",
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    private: bool = False,
) -> Verdict:
    """Is the file at ``path`` exactly the expected bytes? Never raises on I/O errors.

    A missing file, or anything but a regular file (a directory, a FIFO, a device: refused
    before it is opened), is ``file_not_found``; one that is there but could not be opened or
    read for another reason (no permission, too many open files, no memory, an I/O error) is
    ``store_error``, which says nothing about its bytes; a bad digest/size spec is
    ``malformed_spec``; then ``size_mismatch`` (from ``stat`` first) or ``digest_mismatch``.
    ``progress(received_bytes, total_bytes)`` is called after each buffer. ``cancelled`` is
    asked before each buffer; once it answers true the verdict is ``cancelled``, which says
    nothing about the file.

    ``private=True`` is for bytes a runtime is about to load: a file someone other than this
    user could change once it verified (another user's, or one with group or other write
    permission) is ``store_error`` before it is read, unless it lies on a file system that
    keeps its own bytes and is read-only in its superblock (not only in one mount; not an
    overlay, FUSE or network file system; not on an image file another user may write). Its
    verdict would not hold until the runtime opens it, nor under the runtime's ``mmap``
    after that.
    """
    try:
        return verify_file_or_raise(
            path,
            expected_digest=expected_digest,
            expected_size_bytes=expected_size_bytes,
            policy=policy,
            progress=progress,
            cancelled=cancelled,
            private=private,
        )
    except UnreadableFileError:
        return _UNREADABLE


def verify_file_or_raise(
    path: str | os.PathLike[str],
    *,
    expected_digest: str,
    expected_size_bytes: int,
    policy: VerifyPolicy = "full",
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    private: bool = False,
) -> Verdict:
    """:func:`verify_file`, but a file that is there and could not be read raises
    :class:`UnreadableFileError` instead of a ``store_error`` verdict.

    For a caller that acts on a refusal (``pull`` removes a stored blob that no longer
    verifies): a ``store_error`` verdict is then only ever about who could change the file.
    """
    try:
        accumulator = IntegrityAccumulator(
            expected_digest=expected_digest,
            expected_size_bytes=expected_size_bytes,
            source_url=LOCAL_SOURCE_URL,
            allowed_source_urls=LOCAL_ALLOWLIST,
        )
    except SpecError as error:
        return Verdict(False, error.reason)
    if policy not in ("full", "size_only"):
        return _MALFORMED
    try:
        # Anything but a regular file is refused before it is opened: opening is not
        # harmless for all of them (a FIFO lets the writer waiting on it go on, into a
        # SIGPIPE once we close it; a watchdog device starts counting; a tape rewinds).
        fd, info = open_regular_file(path)
        with open(fd, "rb", buffering=0) as handle:
            if private and not _only_ours_to_change(handle.fileno(), info):
                accumulator.abort()
                return _NOT_PRIVATE
            if info.st_size != expected_size_bytes:
                accumulator.abort()
                return _SIZE_MISMATCH
            if policy == "size_only":
                return _OK
            verdict = hash_file_into(
                handle,
                accumulator,
                progress=progress,
                total_bytes=expected_size_bytes,
                cancelled=cancelled,
            )
    except NotARegularFileError:
        return _FILE_NOT_FOUND
    except OSError as error:
        if error.errno in _ABSENT:
            return _FILE_NOT_FOUND
        raise UnreadableFileError from None
    if not verdict.ok:
        return verdict
    return accumulator.finalize()


def hash_file_into(
    handle: RawReadable,
    accumulator: IntegrityAccumulator,
    *,
    limit_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    total_bytes: int = 0,
    cancelled: Callable[[], bool] | None = None,
) -> Verdict:
    """Feed ``handle``'s bytes (up to ``limit_bytes``, else to EOF) to ``accumulator``.

    Returns the first refusing ``update`` verdict, or ok; ``cancelled`` (asked before each
    buffer, a few milliseconds apart) once ``cancelled()`` answers true. Does not finalize.
    ``OSError`` from reading propagates, and so does one (``EAGAIN``) when the hashing thread
    cannot be started. Used for re-verifying blobs and for re-hashing a kept
    partial download.
    """
    # Tell the kernel we read front to back so it reads ahead aggressively (a hint only).
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    buffer_size = READ_BUFFER_BYTES
    if limit_bytes is not None:
        buffer_size = max(1, min(buffer_size, limit_bytes))
    buffers = (bytearray(buffer_size), bytearray(buffer_size))
    views = (memoryview(buffers[0]), memoryview(buffers[1]))
    remaining = limit_bytes
    pending: Future[Verdict] | None = None
    index = 0
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="filehash") as worker:
        try:
            while True:
                if cancelled is not None and cancelled():
                    return _CANCELLED
                view = views[index]
                if remaining is not None and remaining < len(view):
                    view = view[:remaining]
                count = handle.readinto(view) if len(view) else 0
                if count is None:
                    # Non-blocking, a file with no bytes to give for now (/proc/kmsg, a file in
                    # user space) answers None, which is no end of file: taken for one, the
                    # bytes read so far were judged as the whole file.
                    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                if pending is not None:
                    # Wait for the other buffer before handing this one over: at most one
                    # buffer is being hashed while the next one is being read.
                    verdict = pending.result()
                    pending = None
                    if not verdict.ok:
                        return verdict
                if not count:
                    return _OK
                done += count
                if remaining is not None:
                    remaining -= count
                try:
                    pending = worker.submit(accumulator.update, view[:count])
                except RuntimeError as error:
                    # No thread could be started (a process limit, no memory): the bytes could
                    # not be hashed here, which says nothing about them. An OSError, as any
                    # other failure to read them.
                    raise OSError(errno.EAGAIN, "no thread to hash with") from error
                if progress is not None:
                    progress(done, total_bytes)
                index ^= 1
        finally:
            if pending is not None:
                # Never leave the worker hashing a buffer we are about to reuse or drop.
                pending.result()
