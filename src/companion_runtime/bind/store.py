"""The content-addressed model store.

Layout under the store root (everything on one file system, so a rename is atomic)::

    blobs/sha256-<hex>             verified models, read-only (0444), never written in place
    tmp/sha256-<hex>.partial       the download in progress (kept for resume), never trusted
    locks/<key>.lock               one file lock per digest: one downloader at a time

A file reaches ``blobs/`` only through :meth:`ModelStore.publish`, which fsyncs it, makes it
read-only, renames it into place and fsyncs the directory, so a crash at any point leaves either
no blob or a complete one. Nothing half-written is ever at a final path.

The root is, in order of precedence: the ``root`` argument (the CLI's ``--store``), the
environment variable ``COMPANION_RUNTIME_STORE``, the user cache directory
(``platformdirs.user_cache_dir("companion-runtime")/models``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final, final

import filelock
import platformdirs

from companion_runtime.bind.directory_trust import (
    ancestors_hold_no_one_else_s_entries,
    make_private_directories,
    may_create_on_the_way_to,
    writable_by_no_one_else,
)
from companion_runtime.bind.read_only_file_system import file_system_read_only
from companion_runtime.bind.write_permission import accounts_read_once
from companion_runtime.core import Reason

__all__ = [
    "STORE_ENV_VAR",
    "ModelStore",
    "StoreError",
    "default_store_root",
]

#: Environment variable that overrides the default store root.
STORE_ENV_VAR: Final = "COMPANION_RUNTIME_STORE"

_DIGEST = re.compile(r"[0-9a-f]{64}")
_BLOB_MODE: Final = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH  # 0o444


@final
class StoreError(Exception):
    """A store operation failed; ``reason`` says why and the message is the reason code alone."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


def default_store_root(environ: Mapping[str, str] | None = None) -> Path:
    """Return the store root used when none is given: the env override or the user cache dir.

    Raises :class:`StoreError` (``store_error``) when the override starts with a ``~user``
    that names no user.
    """
    env = os.environ if environ is None else environ
    override = env.get(STORE_ENV_VAR)
    if override:
        return _expand_user(Path(override))
    return Path(platformdirs.user_cache_dir("companion-runtime")) / "models"


def _expand_user(path: Path) -> Path:
    if "\0" in str(path):
        # No file can have such a name; every call on it would raise ValueError.
        raise StoreError(Reason.STORE_ERROR)
    try:
        return path.expanduser()
    except RuntimeError:
        # "~nosuchuser/models": there is no home to expand to, and no directory named "~…"
        # is what the user meant either.
        raise StoreError(Reason.STORE_ERROR) from None


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise StoreError(Reason.MALFORMED_SPEC)
    return digest


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@final
class ModelStore:
    """A directory of verified model blobs addressed by their SHA-256.

    Thread-safe: every method is a self-contained file-system operation; serialising
    downloads of one digest is the job of :meth:`lock`.
    """

    __slots__ = ("blobs_dir", "locks_dir", "root", "tmp_dir")

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        """``root`` as given (``~`` expanded), else :func:`default_store_root`.

        Raises :class:`StoreError` (``store_error``) for a ``~user`` that names no user, and
        for a root with a NUL in it.
        """
        self.root: Final = _expand_user(Path(root)) if root is not None else default_store_root()
        self.blobs_dir: Final = self.root / "blobs"
        self.tmp_dir: Final = self.root / "tmp"
        self.locks_dir: Final = self.root / "locks"

    def ensure_layout(self) -> None:
        """Create the store directories, and any missing on the way to them, owner-only (0700,
        whatever the umask) if they do not exist yet, and check them.

        Raises :class:`StoreError` (``store_error``) unless the root (which may be a symlink,
        say to a larger disk) and ``blobs/``, ``tmp/`` and ``locks/`` (which may not) are
        directories of this user, or of root, that no one else can write to, or directories
        on a file system no one can write (read-only in its superblock, and keeping its own
        bytes), whoever their owner. Anyone who can write there could swap a verified blob
        for other bytes before the runtime opens it. Root's, or another user's on a read-only
        file system, are for a store baked into an image and used by another user; where
        root's are writable, the user cannot lock or write them, and a pull that would is
        ``store_error`` all the same. Group write is allowed for the user's own group (one no
        other account has or lists): with the usual per-user groups (umask 002) a directory
        made by hand has it; not for other users or groups an access ACL lets write (the
        group bits are then its mask).

        Every directory above the root, as written and as its symlinks resolve, and every
        directory a symlink on the way lives in (also one met half-way through another
        symlink's target), must be this user's or root's, and writable by no one else (the
        user's own group aside) unless it is sticky like ``/tmp`` (and there the entry on the
        way, a symlink too, must be the user's or root's): whoever can rename entries there
        can move the whole store aside and put a store of their own at its path, between the
        re-verify and the runtime's open.
        """
        with accounts_read_once():
            self._ensure_layout()

    def _ensure_layout(self) -> None:
        try:
            uid = os.geteuid()
            # Nothing is made where the way there is not the user's own: a symlink of
            # someone else's would have sent the mkdir wherever they chose.
            if not may_create_on_the_way_to(self.root, uid):
                raise StoreError(Reason.STORE_ERROR)
            for directory in (self.blobs_dir, self.tmp_dir, self.locks_dir):
                make_private_directories(directory)
            own_ok = all(
                stat.S_ISDIR(info.st_mode)
                and (
                    (info.st_uid in (uid, 0) and writable_by_no_one_else(info, directory))
                    # No one writes a file system read-only in its superblock (an image
                    # built by another user), whoever its directories' owner.
                    or file_system_read_only(info.st_dev)
                )
                for directory, info in (
                    (self.root, self.root.stat()),
                    *(
                        (directory, directory.lstat())
                        for directory in (self.blobs_dir, self.tmp_dir, self.locks_dir)
                    ),
                )
            )
            trusted = own_ok and ancestors_hold_no_one_else_s_entries(self.root, uid)
        except (OSError, RuntimeError):
            # RuntimeError: a symlink loop on the way (Python before 3.13).
            raise StoreError(Reason.STORE_ERROR) from None
        if not trusted:
            raise StoreError(Reason.STORE_ERROR)

    def blob_path(self, digest: str) -> Path:
        """Final path of the blob with this digest (it may not exist)."""
        return self.blobs_dir / f"sha256-{_check_digest(digest)}"

    def partial_path(self, digest: str) -> Path:
        """Path of the kept, unverified download of this digest (for resume)."""
        return self.tmp_dir / f"sha256-{_check_digest(digest)}.partial"

    def lock_path(self, digest: str) -> Path:
        """Path of the lock file that serialises downloads of this digest.

        Named by a key derived from the digest, not the digest itself: the lock library logs
        lock paths, and log lines must not carry a model's digest.
        """
        key = hashlib.sha256(b"companion-runtime lock\x00" + _check_digest(digest).encode())
        return self.locks_dir / f"{key.hexdigest()[:32]}.lock"

    def lock(self, digest: str, *, timeout_s: float = -1) -> filelock.BaseFileLock:
        """An inter-process (and inter-thread) lock for this digest; use it as a context manager.

        ``timeout_s`` < 0 waits forever. A ``filelock.Timeout`` is raised when it expires.
        """
        # thread_local=False: one pull may take the lock in one thread and the store work runs
        # in another; is_singleton=False keeps separate lock objects per call so two threads
        # of one process exclude each other exactly as two processes do.
        return filelock.FileLock(
            self.lock_path(digest), timeout=timeout_s, thread_local=False, is_singleton=False
        )

    def has_blob(self, digest: str) -> bool:
        """Whether a blob for this digest is present (presence only; verify before use)."""
        return self.blob_path(digest).is_file()

    def stored_blob(self, digest: str) -> Path | None:
        """The blob's path when a regular file is there (verify before use), else None.

        Raises :class:`StoreError` (``store_error``) when something else is at the blob's name
        (a directory, a FIFO, a device, a symlink to nothing), or the name cannot be looked
        up: the store never made it, no download could be published over it, and it is left
        as it is. So it does for a symlink (one the user made, to a model on another disk)
        whose way to its file passes a directory someone else could rename entries of: the
        file the blob's name leads to is then theirs to swap, as with the store's own
        directories (see :meth:`ensure_layout`).
        """
        path = self.blob_path(digest)
        try:
            named = path.lstat()
        except FileNotFoundError:
            return None
        except OSError:
            raise StoreError(Reason.STORE_ERROR) from None
        try:
            if stat.S_ISLNK(named.st_mode) and not ancestors_hold_no_one_else_s_entries(
                path, os.geteuid()
            ):
                raise StoreError(Reason.STORE_ERROR)
        except (OSError, RuntimeError):
            # A symlink to nothing, or a loop (RuntimeError before Python 3.13).
            raise StoreError(Reason.STORE_ERROR) from None
        try:
            if stat.S_ISREG(path.stat().st_mode):
                return path
        except OSError:
            pass
        raise StoreError(Reason.STORE_ERROR)

    def free_bytes(self) -> int:
        """Free space available to this user on the store's file system."""
        try:
            return shutil.disk_usage(self._existing_ancestor()).free
        except OSError:
            raise StoreError(Reason.STORE_ERROR) from None

    def publish(self, temp_path: Path, digest: str) -> Path:
        """Atomically move a verified temp file into place as the blob for ``digest``.

        The caller must have verified the bytes. The file is fsynced, made read-only, renamed
        over the final path, and the directory fsynced.
        """
        final_path = self.blob_path(digest)
        try:
            fd = os.open(temp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.fchmod(fd, _BLOB_MODE)
            finally:
                os.close(fd)
            os.replace(temp_path, final_path)
            fsync_directory(self.blobs_dir)
            fsync_directory(self.tmp_dir)
        except OSError:
            raise StoreError(Reason.STORE_ERROR) from None
        return final_path

    def remove_blob(self, digest: str) -> None:
        """Remove the blob for ``digest`` (used when it no longer verifies)."""
        path = self.blob_path(digest)
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fsync_directory(self.blobs_dir)
        except OSError:
            raise StoreError(Reason.STORE_ERROR) from None

    def remove_partial(self, digest: str) -> None:
        """Drop the kept partial download of ``digest``, if any."""
        try:
            with contextlib.suppress(FileNotFoundError):
                self.partial_path(digest).unlink()
        except OSError:
            raise StoreError(Reason.STORE_ERROR) from None

    def _existing_ancestor(self) -> Path:
        path = self.root
        while not path.exists() and path.parent != path:
            path = path.parent
        return path
