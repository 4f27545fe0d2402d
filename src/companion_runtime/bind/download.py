"""Stream a model over HTTPS into the store, through the core accumulator.

Theory of operation. The pure :class:`~companion_runtime.core.IntegrityAccumulator` decides
whether the bytes are the promised ones; this module moves bytes and enforces the transport
rules around it:

* Every hop is ``https`` and inside the allowlist: redirects are followed by hand (at most
  :attr:`DownloadOptions.max_redirects`), each ``Location`` is resolved against the current URL,
  its fragment (never sent) dropped, and checked again by ``validate_source_url``; a loop is
  refused, and so is a ``Location`` with whitespace or a control character in it (which URL
  parsers drop, so the target asked for would not be the one written). No credentials, cookies,
  proxies or ``.netrc`` are ever used, so nothing can be forwarded to another origin.
* ``Accept-Encoding: identity`` is asked for and anything else refused: the raw bytes on the
  wire are what is hashed, never a decoded form of them. So is a transfer coding other than
  ``chunked`` (``Transfer-Encoding: gzip, chunked``), which no request asks for.
* The expected size comes from the manifest, never from ``Content-Length``. Each read asks
  for at most one byte more than the size still allows; bytes past the size are handed to the
  accumulator (which refuses them) and never written, so the temp file never exceeds the size.
* Bytes go to ``tmp/sha256-<hex>.partial`` in the store. At the end the file is fsynced, the
  accumulator finalized, and only then is the file published (fsync, 0444, rename, fsync dir).
* Resume: a kept partial file is re-hashed into a fresh accumulator and continued with
  ``Range: bytes=N-``. The manifest's size is the contract: a ``206`` whose ``Content-Range``
  names another total (or, with an unknown total ``*``, a range reaching past the size), a
  ``200`` whose ``Content-Length`` is not the size, or a ``416`` (the server's file ends before
  N) unless its ``Content-Range`` names the manifest's size, is refused ``size_mismatch`` at
  once, and the kept file stays as it was (a later pull from a server with the right file
  resumes it). A ``206`` whose ``Content-Range`` does not start at N, or a ``416`` that names
  the manifest's size, is dropped and the download restarted from 0 (once; the kept file is
  replaced only once the ``200`` from byte 0 is here, so a restart that fails before leaves it
  as it was); any other ``200`` answer to a Range request restarts cleanly from 0 on the same
  response (truncate, new accumulator). A ``206`` whose body ends whole before the file does
  (a server may cover less than was asked for) is continued with another ``Range`` request
  from where it ended, as long as each such answer brings at least 64 KiB (or
  :attr:`DownloadOptions.min_progress_bytes` when larger; else ``download_failed``), and the
  minimum progress for each window of the whole time it took, its connect, redirects and head
  included (else ``timeout``); the bytes of a refused one are kept. A ``206`` body is read
  up to the end of its range and never past it: bytes a server sends after its range are
  none of the range, so they are not taken for the bytes that follow it in the file.
* Timeouts: :attr:`DownloadOptions.connect_timeout_s` for the TCP connect and TLS handshake,
  :attr:`DownloadOptions.stall_timeout_s` (default 30 s) for any single read, and a
  minimum-progress rule for a server that drips bytes just fast enough to keep every read
  under the stall timeout: a body that brings fewer than
  :attr:`DownloadOptions.min_progress_bytes` (default 64 KiB) in a window of
  :attr:`DownloadOptions.min_progress_window_s` (default 30 s) is refused with ``timeout``.
  All three refuse with ``timeout``.
* Network errors and timeouts keep the partial file (it is re-verified on resume anyway):
  every byte received before the failure, including those of a receive buffer only partly
  filled, is hashed and written, and the file is fsynced, so the resume's ``Range`` starts at
  the true received count. A resumed download whose digest is wrong (the kept prefix was
  stale or tampered with) is fetched once more from byte 0 within the same call. A digest or
  size refusal deletes the partial file, and so does
  any refusal that leaves it empty (free disk space, status, redirect, encoding), and so does
  an fsync that fails (bytes whose flush failed may never reach the disk, though the page
  cache still shows them, and the next fsync would not report it): nothing is left in ``tmp/``
  unless it is a prefix to resume from. A kept file left read-only by a
  publish that did not complete is made writable again (it is resumed like any other). Only a
  kept file the store could have made is used: anything else at its name (another user's
  file, a hard link, a FIFO, a symlink) is ``store_error`` before any request, and left alone.
* Cancellation: ``cancel`` (a :class:`threading.Event`, set from another thread, say a
  signal handler's) stops the download within about :data:`httpsget.POLL_S
  <companion_runtime.bind.httpsget.POLL_S>` wherever it waits (name lookup, connect,
  handshake, every read, the re-hash of a kept partial file) and refuses it with
  ``cancelled``. It is treated like a broken connection: every byte received is hashed,
  written and fsynced, the partial file is kept for a resume, and nothing is published.

Receiving, hashing and writing overlap: the main thread receives into one of four buffers
while one worker thread hashes the buffers before it, in order, and a second one writes each
buffer once it hashed without a refusal. A write that fails (``ENOSPC``, ``EIO``) stops the
writer: the buffers queued behind it, already hashed, are cancelled rather than written after
the gap (the space may be back by then), and the file is cut to its position, the bytes the
writes before the failure wrote in order; so the kept file is a prefix of the model for the
next pull to resume from. All of this is on the failure path: a write that succeeds costs
nothing more.

The transport is :mod:`companion_runtime.bind.httpsget`: one GET per connection (one
connection per hop), TLS on memory buffers, the head parsed by llhttp, the body decrypted
straight into the receive buffer from socket reads of up to 1 MiB. Each call brings what one
socket read delivers, so a read that fails can only lose bytes that were never received, and
the minimum-progress rule is checked between calls. Measured against nginx over TLS on
loopback into a RAM-backed store (1 GiB, medians of six interleaved runs, 2026-11-29):
``http.client`` with one record per call (two ``recv`` system calls per 16 KiB record) and
one hashing-and-writing worker gave 587–607 MB/s, this transport with the two workers
706 MB/s with 256 KiB socket reads, and 744 MB/s (against 692 in the same run, kernel time
0.55 against 0.62 CPU-s) with 1 MiB ones. Before that, ``http.client`` had replaced httpx,
whose per-16-KiB event stream cost about 1.6 CPU-seconds per GiB against 0.9. At this level
there is no redirect handling, cookie jar, auth, ``.netrc`` or proxy variable that could carry
anything from one hop to the next, and nothing logs the request line (with its query).

Every foreign exception (ssl, socket and disk ``OSError``, the HTTP parser's, filelock) is
translated to a ``Reason`` in :func:`reason_for_exception`; no error message carries the URL,
its query, or the digest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import ssl
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final
from urllib.parse import urljoin, urlsplit

import filelock
import httptools

from companion_runtime.bind import httpsget
from companion_runtime.bind.filehash import hash_file_into
from companion_runtime.bind.regular_file import open_regular_file
from companion_runtime.bind.store import ModelStore, StoreError
from companion_runtime.core import (
    IntegrityAccumulator,
    Reason,
    SpecError,
    Verdict,
    validate_source_url,
)

__all__ = [
    "DEFAULT_DOWNLOAD_OPTIONS",
    "DownloadError",
    "DownloadOptions",
    "FreeSpace",
    "ProgressCallback",
    "download_to_store",
    "reason_for_exception",
]

_log = logging.getLogger(__name__)

#: ``progress(received_bytes, total_bytes)``; called from the downloading thread.
ProgressCallback = Callable[[int, int], None]
#: ``free_space(directory) -> bytes available``; injectable so a test can simulate a full disk.
FreeSpace = Callable[[Path], int]

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# ASCII digits only, at most 19 of them (any file size fits): a server's 5,000-digit number
# must be a refused answer, not an int() past the interpreter's conversion limit.
# The range unit is case-insensitive (RFC 9110 section 14.1): a server's "Bytes" is no reason
# to throw the kept prefix away and start again from byte 0.
_CONTENT_RANGE = re.compile(
    r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)", re.IGNORECASE | re.ASCII
)
#: A ``416``'s Content-Range: the length of the server's file.
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]{1,19})", re.IGNORECASE | re.ASCII)
_USER_AGENT: Final = "companion-runtime"
# Whitespace and control characters: URL parsers drop some of them (urljoin, like WHATWG,
# removes a tab or a line break anywhere), so a Location holding one names no single target.
# Anything but printable ASCII is refused, so bytes 0x80-0xFF (NEL 0x85, NBSP 0xA0, or a
# UTF-8 U+2028) are too, whatever a parser takes them for.
_LOCATION_UNSAFE = re.compile(r"[^\x21-\x7e]")
#: Receive buffers: one being filled while the worker catches up with up to three.
_BUFFERS: Final = 4
#: Fewest bytes a ``206`` that ends before the file does must bring for another request.
_MIN_SHORT_RANGE_BYTES: Final = 64 * 1024


@final
class DownloadError(Exception):
    """A download was refused or failed; ``reason`` says why, the message is the code alone."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


class _NetworkError(Exception):
    """Internal: an exception raised by a network call, kept apart from disk errors."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__()
        self.cause = cause


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadOptions:
    """Transport settings for :func:`download_to_store`."""

    #: Seconds allowed for the TCP connect and TLS handshake.
    connect_timeout_s: float = 15.0
    #: Seconds any single read may wait for a byte (response headers or body): a stalled
    #: transfer is refused with ``timeout`` after this long without data.
    stall_timeout_s: float = 30.0
    #: Redirect hops followed before ``too_many_redirects``.
    max_redirects: int = 5
    #: PEM file of CA certificates to trust *instead of* the system store (a private mirror).
    ca_bundle: Path | None = None
    #: Size of each of the four receive buffers handed to the hashing/writing thread.
    buffer_bytes: int = 1024 * 1024
    #: Free space required beyond the bytes still to download.
    disk_margin_bytes: int = 0
    #: Minimum progress: a body that brings fewer than this many bytes in any
    #: :attr:`min_progress_window_s` is refused with ``timeout`` (a drip that keeps every
    #: single read under :attr:`stall_timeout_s`). Zero (or a window of zero) turns it off;
    #: a ``206`` that ends before the file must still bring 64 KiB for another request.
    min_progress_bytes: int = 64 * 1024
    #: Length in seconds of the minimum-progress window.
    min_progress_window_s: float = 30.0


#: The options used when none are given.
DEFAULT_DOWNLOAD_OPTIONS: Final = DownloadOptions()


def _disk_free(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def download_to_store(
    *,
    url: str,
    allowed_source_urls: tuple[str, ...] | list[str],
    expected_digest: str,
    expected_size_bytes: int,
    store: ModelStore,
    options: DownloadOptions = DEFAULT_DOWNLOAD_OPTIONS,
    progress: ProgressCallback | None = None,
    free_space: FreeSpace | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download, verify and publish one blob; return its final path.

    The caller holds ``store.lock(expected_digest)``. Raises :class:`DownloadError` (with a
    ``Reason``) on every refusal or failure; nothing is ever at the final path unless it
    verified. Once ``cancel`` is set, the download stops at its next wait with ``cancelled``
    and keeps what it received for a resume.
    """
    try:
        return _Download(
            url=url,
            allowed_source_urls=tuple(allowed_source_urls),
            expected_digest=expected_digest,
            expected_size_bytes=expected_size_bytes,
            store=store,
            options=options,
            progress=progress,
            free_space=free_space or _disk_free,
            cancelled=cancel.is_set if cancel is not None else None,
        ).run()
    except _TRANSLATED as error:
        reason = reason_for_exception(error)
        _log.info("download refused: %s", reason.value)
        raise DownloadError(reason) from None


#: Every exception type the download can meet; anything else is a bug and propagates.
_TRANSLATED: Final = (
    DownloadError,
    StoreError,
    SpecError,
    _NetworkError,
    httpsget.Cancelled,
    filelock.Timeout,
    OSError,
)


def reason_for_exception(error: BaseException) -> Reason:
    """The one place foreign exceptions become reasons.

    Exceptions raised by network calls arrive wrapped in :class:`_NetworkError` (so a socket's
    ``OSError`` is never mistaken for a disk's); bare ``OSError``\\ s come from the store.
    """
    if isinstance(error, DownloadError | StoreError | SpecError):
        return error.reason
    if isinstance(error, httpsget.Cancelled):
        return Reason.CANCELLED
    if isinstance(error, _NetworkError):
        cause = error.cause
        if isinstance(cause, TimeoutError):
            return Reason.TIMEOUT
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return Reason.TLS_ERROR
        return Reason.DOWNLOAD_FAILED
    if isinstance(error, filelock.Timeout):
        return Reason.STORE_ERROR
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return Reason.INSUFFICIENT_DISK
        return Reason.STORE_ERROR
    return Reason.DOWNLOAD_FAILED


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The client context; ``ca_bundle``, when given, must be a regular file (``tls_error``).

    OpenSSL opens the bundle itself, blocking: a FIFO there would hold the pull in ``open()``
    for good, past any cancel. So it is opened here first, refused unless it is a regular
    file, and OpenSSL reads that very file through ``/proc/self/fd``.
    """
    try:
        if ca_bundle is not None:
            fd, _info = open_regular_file(ca_bundle)
            try:
                opened = f"/proc/self/fd/{fd}"
                cafile = opened if os.path.exists(opened) else os.fspath(ca_bundle)
                context = ssl.create_default_context(cafile=cafile)
            finally:
                os.close(fd)
        else:
            context = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError):
        raise DownloadError(Reason.TLS_ERROR) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@contextlib.contextmanager
def _network() -> Iterator[None]:
    """Mark the enclosed calls as network I/O for :func:`reason_for_exception`.

    A cancel seen by the transport becomes ``DownloadError(cancelled)``, so the body loop
    keeps what arrived exactly as it does for a broken connection.
    """
    try:
        yield
    except (OSError, httpsget.ProtocolError, httptools.HttpParserError) as error:
        raise _NetworkError(error) from None
    except httpsget.Cancelled:
        raise DownloadError(Reason.CANCELLED) from None


class _Restart(Exception):
    """Internal: the server's answer to a Range request cannot be trusted; start again at 0."""


class _RangeEnded(Exception):
    """Internal: a ``206`` answer ended whole before the file's end; ask for the rest."""

    def __init__(self, brought: int) -> None:
        super().__init__()
        self.brought = brought


class _Download:
    """One download of one digest; all state of the transfer lives here."""

    def __init__(
        self,
        *,
        url: str,
        allowed_source_urls: tuple[str, ...],
        expected_digest: str,
        expected_size_bytes: int,
        store: ModelStore,
        options: DownloadOptions,
        progress: ProgressCallback | None,
        free_space: FreeSpace,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.url = url
        self.allow = allowed_source_urls
        self.digest = expected_digest
        self.size = expected_size_bytes
        self.store = store
        self.options = options
        self.progress = progress
        self.free_space = free_space
        self.cancelled = cancelled
        # Raises SpecError for a URL outside the allowlist or a bad spec: nothing is fetched.
        self.accumulator = self._new_accumulator()
        self.partial = store.partial_path(expected_digest)
        # How many kept bytes the accumulator took from the partial file rather than the
        # network (0 once the download starts again from byte 0).
        self.resumed_from = 0

    def _new_accumulator(self) -> IntegrityAccumulator:
        return IntegrityAccumulator(
            expected_digest=self.digest,
            expected_size_bytes=self.size,
            source_url=self.url,
            allowed_source_urls=self.allow,
        )

    def run(self) -> Path:
        self.store.ensure_layout()
        self._download()
        verdict = self.accumulator.finalize()
        if self.resumed_from and verdict.reason is Reason.DIGEST_MISMATCH:
            # The kept prefix was hashed as it was found, so a stale or tampered one spoils a
            # body the server sent right. Once, the whole file is fetched again from byte 0;
            # a fresh download that fails again is refused like any other.
            _log.warning("a resumed download failed verification; fetching it again")
            self._discard()
            self.resumed_from = 0
            self.accumulator = self._new_accumulator()
            self._download()
            verdict = self.accumulator.finalize()
        if not verdict.ok:
            self._refuse(verdict)
        return self.store.publish(self.partial, self.digest)

    def _download(self) -> None:
        """Bring the partial file to the full size, resuming from what it keeps."""
        fd = self._open_partial()
        try:
            offset = self._resume_offset(fd)
            self._check_disk(offset)
            if offset < self.size:
                if self.cancelled is not None and self.cancelled():
                    raise DownloadError(Reason.CANCELLED)
                self._fetch(fd, offset)
        except BaseException:
            self._close_after_failure(fd)
            raise
        try:
            os.fsync(fd)
        except OSError:
            # Bytes whose flush failed may never reach the disk, though the page cache still
            # shows them: a re-hash would vouch for them, and a later fsync (the error is
            # reported once) would let them be published. Not kept.
            os.close(fd)
            self._discard()
            raise
        except BaseException:
            self._close_after_failure(fd)
            raise
        os.close(fd)

    def _fetch(self, fd: int, offset: int) -> None:
        context = _ssl_context(self.options.ca_bundle)
        # Set once a range answer could not be used: the whole file is asked for again, and the
        # kept file is replaced only once that answer is here, so a request that fails first
        # (a broken connection, a refused status) leaves the kept prefix as it was.
        replace = False
        while True:
            started = time.monotonic()
            try:
                self._transfer(context, fd, offset, replace=replace)
                return
            except _Restart:
                if replace:
                    raise DownloadError(Reason.DOWNLOAD_FAILED) from None
                replace = True
                offset = 0
            except _RangeEnded as ended:
                self._check_short_answer(ended.brought, time.monotonic() - started)
                offset += ended.brought

    def _check_short_answer(self, brought: int, took_s: float) -> None:
        """Refuse a short ``206`` that does not earn another request; its bytes are kept.

        Each answer must bring :data:`_MIN_SHORT_RANGE_BYTES` (or the minimum progress, when
        larger), also with the minimum-progress rule turned off, so a server cutting every
        range short cannot keep the pull asking, one connection per few bytes. And it must
        bring the minimum progress for each window of the whole time it took, from its
        request on: the body's own windows leave out the connect, the redirects and the
        head, which a server could otherwise stretch before every short answer.
        """
        min_bytes = self.options.min_progress_bytes
        if brought < max(_MIN_SHORT_RANGE_BYTES, min_bytes):
            raise DownloadError(Reason.DOWNLOAD_FAILED)
        window_s = self.options.min_progress_window_s
        if min_bytes > 0 and window_s > 0 and brought < min_bytes * (took_s / window_s):
            raise DownloadError(Reason.TIMEOUT)

    # --- partial file ---------------------------------------------------------------------

    def _open_partial(self) -> int:
        # Only a file the store made itself is written to, resumed and published: a regular
        # file of this user with no other name. Another user's file (root opens it all the
        # same) would become a blob its owner can change; a hard link's other name would be
        # cut and overwritten, and share the blob's bytes; a FIFO or a device is no file.
        # Anything else there is store_error, and left as it is. Checked before the open
        # (opening a device is not harmless) and again on what was opened.
        with contextlib.suppress(FileNotFoundError):
            if not _made_by_the_store(os.lstat(self.partial)):
                raise StoreError(Reason.STORE_ERROR)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.partial, flags, 0o600)
        except PermissionError:
            # publish() makes the verified file read-only before it renames it into place; a
            # rename that failed, or a process that died in between, leaves it so, and its
            # owner (unless root) could not open it again: every later pull was store_error.
            self._make_partial_writable()
            fd = os.open(self.partial, flags, 0o600)
        if not _made_by_the_store(os.fstat(fd)):
            os.close(fd)
            raise StoreError(Reason.STORE_ERROR)
        return fd

    def _make_partial_writable(self) -> None:
        # Through a descriptor of the file itself (O_NOFOLLOW: never a symlink's target), and
        # only a regular file of ours; anything else stays as it is, and is refused.
        fd = os.open(
            self.partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        )
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _resume_offset(self, fd: int) -> int:
        kept = os.fstat(fd).st_size
        if kept == 0:
            return 0
        if kept > self.size:
            return self._restart(fd)
        # Re-hash the kept prefix: the accumulator must have seen every byte it will vouch for.
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            verdict = hash_file_into(
                handle, self.accumulator, limit_bytes=kept, cancelled=self.cancelled
            )
        if verdict.reason is Reason.CANCELLED:
            raise DownloadError(Reason.CANCELLED)  # the kept file is untouched
        if not verdict.ok or self.accumulator.received_bytes != kept:
            return self._restart(fd)
        _log.info("resuming a kept partial download")
        self.resumed_from = kept
        return kept

    def _restart(self, fd: int) -> int:
        self.resumed_from = 0
        self.accumulator.abort()
        self.accumulator = self._new_accumulator()
        os.ftruncate(fd, 0)
        return 0

    def _check_disk(self, offset: int) -> None:
        needed = self.size - offset + self.options.disk_margin_bytes
        if self.free_space(self.store.tmp_dir) < needed:
            raise DownloadError(Reason.INSUFFICIENT_DISK)

    def _cut_back(self, fd: int, length: int) -> bool:
        """Cut the partial file back to ``length`` bytes; whether that worked."""
        try:
            os.ftruncate(fd, length)
        except OSError:
            return False
        return True

    def _refuse(self, verdict: Verdict) -> None:
        # Bytes that failed verification are worthless for a resume: drop them.
        self._discard()
        raise DownloadError(verdict.reason)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.partial.unlink()

    def _close_after_failure(self, fd: int) -> None:
        """Keep what was received (flushed to disk) for a resume; leave no empty file behind,
        nor one whose flush failed."""
        discard = False
        try:
            status = os.fstat(fd)
            if status.st_nlink:  # not dropped already
                discard = status.st_size == 0
                if not discard:
                    os.fsync(fd)
        except OSError:
            discard = True
        os.close(fd)
        if discard:
            # Nothing to resume from: a refusal before the first byte (disk space, status,
            # redirect, encoding) or after a restart; or bytes whose flush failed, which may
            # never reach the disk although a re-hash from the page cache would vouch for them.
            self._discard()

    # --- HTTP -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _response(self, context: ssl.SSLContext, offset: int) -> Iterator[httpsget.Response]:
        headers = {"Accept-Encoding": "identity", "User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        current = self.url
        seen = {current}
        for _hop in range(self.options.max_redirects + 1):
            parts = urlsplit(current)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            # The URL passed validate_source_url: https, a plain host, no userinfo, a valid port.
            with contextlib.ExitStack() as stack:
                with _network():
                    response = stack.enter_context(
                        httpsget.get(
                            parts.hostname or "",
                            parts.port or 443,
                            target,
                            headers,
                            context=context,
                            connect_timeout_s=self.options.connect_timeout_s,
                            # From here on the timeout is per read: no byte for this long is
                            # a stall.
                            read_timeout_s=self.options.stall_timeout_s,
                            cancelled=self.cancelled,
                        )
                    )
                if response.status not in _REDIRECT_STATUSES:
                    yield response
                    return
                location = response.getheader("Location")
            if not location:
                raise DownloadError(Reason.HTTP_STATUS)
            if _LOCATION_UNSAFE.search(location) is not None:
                raise DownloadError(Reason.REDIRECT_NOT_ALLOWED)
            try:
                # A Location may carry a fragment (RFC 9110 section 10.2.2); a fragment is
                # never sent, so it is dropped and what is checked is exactly what is asked.
                # "#" starts the fragment wherever it appears, for every URL parser.
                following = urljoin(current, location).partition("#")[0]
            except ValueError:
                raise DownloadError(Reason.REDIRECT_NOT_ALLOWED) from None
            if not validate_source_url(following, self.allow).ok:
                raise DownloadError(Reason.REDIRECT_NOT_ALLOWED)
            if following in seen:
                raise DownloadError(Reason.TOO_MANY_REDIRECTS)
            seen.add(following)
            current = following
        raise DownloadError(Reason.TOO_MANY_REDIRECTS)

    def _transfer(
        self, context: ssl.SSLContext, fd: int, offset: int, *, replace: bool = False
    ) -> None:
        """One request from ``offset`` on (with ``replace``, from 0 to replace the kept file)."""
        with self._response(context, offset) as response:
            encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise DownloadError(Reason.CONTENT_ENCODING_NOT_ALLOWED)
            transfer = response.getheader("Transfer-Encoding")
            if not _only_chunked(transfer) or (transfer is not None and not response.chunked):
                # The second: "chunked" followed by a tab, which llhttp takes for another
                # coding, reading the body to the connection's end with its chunk framing.
                raise DownloadError(Reason.CONTENT_ENCODING_NOT_ALLOWED)
            status = response.status
            # Where the body's bytes end in the file: a 206's range may end before it does.
            ends_at = self.size
            if offset and status == 206:
                last = self._content_range_last(response.getheader("Content-Range"), offset)
                if last is None:
                    raise _Restart
                ends_at = last + 1
            elif (offset or replace) and status == 200:
                # The server ignored the Range (or none was sent, to start again): this body
                # starts at byte 0 and replaces the kept file. One that announces
                # another length than the manifest's size is another file: refused before the
                # kept prefix is thrown away for it.
                if not response.chunked and response.length not in (None, self.size):
                    raise DownloadError(Reason.SIZE_MISMATCH)
                offset = self._restart(fd)
            elif offset and status == 416:
                self._check_unsatisfied_range(response.getheader("Content-Range"))
                raise _Restart
            elif status != 200:
                raise DownloadError(Reason.HTTP_STATUS)
            os.lseek(fd, offset, os.SEEK_SET)
            self._stream(response, fd, offset, ranged=status == 206, ends_at=ends_at)

    def _content_range_last(self, header: str | None, offset: int) -> int | None:
        """The last byte of a ``206`` that starts where it was asked to, else None.

        Another file size is refused.
        """
        match = _CONTENT_RANGE.fullmatch((header or "").strip())
        if match is None:
            return None
        start, end, total = match.groups()
        if total != "*" and int(total) != self.size:
            # The manifest's size is the contract, and the server says its file has another:
            # it serves another file (or lies). Fetching it all from byte 0 would only end in
            # the same refusal, after throwing the kept prefix away and the whole transfer.
            raise DownloadError(Reason.SIZE_MISMATCH)
        if total == "*" and int(end) >= self.size:
            # A total not known to the server, but a range reaching past the manifest's size:
            # its file is longer. Streamed, the body would overrun the size, and the overrun
            # would drop the kept prefix with it.
            raise DownloadError(Reason.SIZE_MISMATCH)
        if int(start) == offset and offset <= int(end) < self.size:
            return int(end)
        return None

    def _check_unsatisfied_range(self, header: str | None) -> None:
        """Refuse a ``416`` unless its Content-Range names the manifest's size.

        The range asked for starts inside the manifest's size, so a ``416`` says the server's
        file ends before it: another size, refused at once and the kept prefix left alone. Only
        a server that names the manifest's size all the same (it contradicts itself) is asked
        once more from byte 0.
        """
        match = _UNSATISFIED_RANGE.fullmatch((header or "").strip())
        if match is None or int(match.group(1)) != self.size:
            raise DownloadError(Reason.SIZE_MISMATCH)

    def _stream(
        self,
        response: httpsget.Response,
        fd: int,
        offset: int,
        *,
        ranged: bool = False,
        ends_at: int | None = None,
    ) -> None:
        """Receive into one buffer while two workers hash and write the ones before it.

        ``ends_at``: where in the file a ``206``'s range ends, when before the file does. Its
        body is read up to there and never past: bytes after its range are not the bytes that
        follow it in the file (the server says they are none of the range), as bytes past a
        ``Content-Length`` are not body. At the file's end, one byte more is read to see an
        overrun.

        The hashing thread and the writing thread each take the buffers in order; a buffer is
        written only after it hashed without a refusal, and is filled again only after it was
        written. SHA-256 and the copy into the page cache both release the GIL, so receiving,
        hashing and writing run at the same time.
        """
        accumulator = self.accumulator
        size = self.size
        # Ask for at most one byte more than the size allows: an overrun is seen at size + 1,
        # never later. A range that ends before the file is read to its end only.
        read_to = size + 1 if ends_at is None or ends_at >= size else ends_at
        received = offset
        capacity = self.options.buffer_bytes
        views = [memoryview(bytearray(capacity)) for _ in range(_BUFFERS)]
        index = 0
        # Buffers handed to the worker, oldest first; it hashes and writes them in order.
        pending: deque[Future[Verdict]] = deque()
        watch = _ProgressWatch(
            min_bytes=self.options.min_progress_bytes,
            window_s=self.options.min_progress_window_s,
            now=time.monotonic(),
            received=offset,
        )

        def hash_and_write(view: memoryview) -> Verdict:
            verdict = accumulator.update(view)
            if verdict.ok:
                _write_all(fd, view)
            return verdict

        def write_hashed(hashed: Future[Verdict], view: memoryview) -> Verdict:
            verdict = hashed.result()
            if verdict.ok:
                try:
                    _write_all(fd, view)
                except OSError:
                    stop_writing()
                    raise
            return verdict

        def stop_writing() -> None:
            # A write failed (ENOSPC, EIO): no later buffer may be written, even if the space
            # is back by then, or the kept file would not be a prefix of the model and the
            # next pull's resume would fail its digest and start again from byte 0. The
            # buffers queued behind this one are cancelled (the writer takes them in order,
            # so none has started), and the file is cut to what the writes before the failure
            # wrote in order, its position.
            writer.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))

        def settle_oldest() -> None:
            verdict = pending.popleft().result()
            if not verdict.ok:
                raise DownloadError(verdict.reason)

        def wait() -> None:
            while pending:
                settle_oldest()

        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-hash") as hasher,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-write") as writer,
        ):
            try:
                ended = False
                while not ended:
                    if len(pending) == _BUFFERS:
                        settle_oldest()  # the one that used this buffer
                    buffer = views[index]
                    limit = min(capacity, read_to - received)
                    filled = 0
                    try:
                        with _network():
                            while filled < limit:
                                count = response.read_some(buffer[filled:limit])
                                if not count:
                                    ended = True
                                    break
                                filled += count
                                if watch.too_slow(received=received + filled, now=time.monotonic()):
                                    raise DownloadError(Reason.TIMEOUT)
                    except (_NetworkError, DownloadError):
                        # A stall, a drip or a broken connection: every byte received so far
                        # is hashed and written before the failure goes up, so the kept file
                        # ends exactly where the transfer did and a resume's Range starts there.
                        wait()
                        keep = min(filled, size - received)
                        if keep:
                            hash_and_write(buffer[:keep])
                        raise
                    if not filled:
                        break
                    if received + filled > size:
                        # Let the core refuse the overrunning bytes; none of them is written.
                        wait()
                        verdict = accumulator.update(buffer[:filled])
                        # A server that sends more than promised is not one to resume from. A
                        # range answer's overrun says nothing of the bytes kept before it: only
                        # what it brought is dropped.
                        if not ranged or not self._cut_back(fd, offset):
                            self._discard()
                        raise DownloadError(
                            verdict.reason if not verdict.ok else Reason.SIZE_MISMATCH
                        )
                    received += filled
                    view = buffer[:filled]
                    hashed = hasher.submit(accumulator.update, view)
                    try:
                        pending.append(writer.submit(write_hashed, hashed, view))
                    except RuntimeError:
                        # The writer stopped at a failed write: that failure goes up.
                        wait()
                        raise
                    index = (index + 1) % _BUFFERS
                    if self.progress is not None:
                        self.progress(received, size)
                wait()
            finally:
                # Never leave the worker writing a buffer after we return.
                for future in pending:
                    with contextlib.suppress(Exception):
                        future.result()
        if received < size:
            if received < read_to and not response.complete:
                # The connection ended before the body did (short of its Content-Length, or
                # of the last chunk, or without a close_notify): a broken transfer. What
                # arrived is kept for a resume. A range read to its end is whole, whatever
                # the server sent after it.
                raise DownloadError(Reason.DOWNLOAD_FAILED)
            if ranged:
                # A 206 covers the range its Content-Range names, which may end before the
                # file does (RFC 9110 section 14.1.2: a server may send less than was asked
                # for). Its bytes are a prefix to go on from, not a sign of a shorter file.
                raise _RangeEnded(received - offset)
            # The server's whole body is shorter than the manifest promises: not the file
            # the manifest means, and nothing to resume from.
            self._discard()
            raise DownloadError(Reason.SIZE_MISMATCH)


@final
class _ProgressWatch:
    """The minimum-progress rule, on times passed in (no clock is read here).

    The body is cut into consecutive windows of ``window_s`` seconds, the first starting when
    the body does; a window that has run its length with fewer than ``min_bytes`` received in
    it is too slow. Checked after each read, so a refusal comes at most one read (bounded by
    the stall timeout) after the window ran out.
    """

    __slots__ = ("_min_bytes", "_start", "_start_received", "_window_s")

    def __init__(self, *, min_bytes: int, window_s: float, now: float, received: int) -> None:
        self._min_bytes = min_bytes if window_s > 0 else 0
        self._window_s = window_s
        self._start = now
        self._start_received = received

    def too_slow(self, *, received: int, now: float) -> bool:
        """Whether the transfer, at ``received`` bytes by ``now``, breaks the rule."""
        if self._min_bytes <= 0 or now - self._start < self._window_s:
            return False
        if received - self._start_received < self._min_bytes:
            return True
        self._start = now
        self._start_received = received
        return False


def _only_chunked(transfer_encoding: str | None) -> bool:
    """Whether a ``Transfer-Encoding`` names no coding but ``chunked`` (or is absent).

    The request names no transfer coding (no ``TE``), so chunked is the only one a server may
    use (RFC 9112 section 6.1). Any other (``gzip, chunked``) means the bytes on the wire are
    not the file's: they are never decoded, and were hashed to the end of a whole transfer
    only to fail the digest (or, without ``chunked``, kept as a prefix to resume from).
    """
    if transfer_encoding is None:
        return True
    codings = [coding.strip(" \t").lower() for coding in transfer_encoding.split(",")]
    return codings == ["chunked"]


def _made_by_the_store(info: os.stat_result) -> bool:
    """Whether a kept partial file is one the store could have made: a regular file of this
    user with one name."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    total = len(data)
    while written < total:
        written += os.write(fd, data[written:])
