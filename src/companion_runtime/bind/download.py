"""Stream a model over HTTPS into the store, through the core accumulator.

Theory of operation. The pure :class:`~companion_runtime.core.IntegrityAccumulator` decides
whether the bytes are the promised ones; this module moves bytes and enforces the transport
rules around it:

* Every hop is ``https`` and inside the allowlist: redirects are followed by hand (at most
  :attr:`DownloadOptions.max_redirects`), each ``Location`` is resolved against the current URL
  and checked again by ``validate_source_url``; a loop is refused. No credentials, cookies,
  proxies or ``.netrc`` are ever used, so nothing can be forwarded to another origin.
* ``Accept-Encoding: identity`` is asked for and anything else refused: the raw bytes on the
  wire are what is hashed, never a decoded form of them.
* The expected size comes from the manifest, never from ``Content-Length``. Each chunk is
  counted before it is written; the chunk that would pass the expected size is handed to the
  accumulator (which refuses it) and is not written, so the temp file never exceeds the size.
* Bytes go to ``tmp/sha256-<hex>.partial`` in the store. At the end the file is fsynced, the
  accumulator finalized, and only then is the file published (fsync, 0444, rename, fsync dir).
* Resume: a kept partial file is re-hashed into a fresh accumulator and continued with
  ``Range: bytes=N-``. A ``206`` whose ``Content-Range`` does not start at N is dropped and the
  download restarted from 0; a ``200`` answer to a Range request restarts cleanly from 0 on the
  same response (truncate, new accumulator).
* Network errors and timeouts keep the partial file (it is re-verified on resume anyway); a
  digest or size refusal deletes it.

Reading and hashing overlap: the main thread receives into one large buffer while a worker
thread hashes and writes the previous one.

Every foreign exception (httpx, ssl, OSError, filelock) is translated to a ``Reason`` in
:func:`reason_for_exception`, and no error message carries the URL, its query, or the digest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final
from urllib.parse import urljoin

import filelock
import httpx

from companion_runtime.bind.filehash import hash_file_into
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
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_USER_AGENT: Final = "companion-runtime"


@final
class DownloadError(Exception):
    """A download was refused or failed; ``reason`` says why, the message is the code alone."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


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
    #: Size of each of the two receive buffers handed to the hashing/writing thread.
    buffer_bytes: int = 2 * 1024 * 1024
    #: Free space required beyond the bytes still to download.
    disk_margin_bytes: int = 0


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
) -> Path:
    """Download, verify and publish one blob; return its final path.

    The caller holds ``store.lock(expected_digest)``. Raises :class:`DownloadError` (with a
    ``Reason``) on every refusal or failure; nothing is ever at the final path unless it
    verified.
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
    httpx.HTTPError,
    httpx.InvalidURL,
    ssl.SSLError,
    filelock.Timeout,
    OSError,
)


def reason_for_exception(error: BaseException) -> Reason:
    """The one place foreign exceptions become reasons (never called with BaseException-only)."""
    if isinstance(error, DownloadError | StoreError | SpecError):
        return error.reason
    if isinstance(error, httpx.TimeoutException):
        return Reason.TIMEOUT
    if isinstance(error, httpx.TransportError):
        # httpx wraps the ssl error of a failed handshake in ConnectError; dig it out.
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, ssl.SSLError | ssl.CertificateError):
                return Reason.TLS_ERROR
            cause = cause.__cause__ or cause.__context__
        if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return Reason.MALFORMED_SPEC
        return Reason.DOWNLOAD_FAILED
    if isinstance(error, httpx.InvalidURL):
        return Reason.MALFORMED_SPEC
    if isinstance(error, httpx.HTTPError):
        return Reason.DOWNLOAD_FAILED
    if isinstance(error, ssl.SSLError):
        return Reason.TLS_ERROR
    if isinstance(error, filelock.Timeout):
        return Reason.STORE_ERROR
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return Reason.INSUFFICIENT_DISK
        return Reason.STORE_ERROR
    return Reason.DOWNLOAD_FAILED


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    try:
        if ca_bundle is not None:
            context = ssl.create_default_context(cafile=os.fspath(ca_bundle))
        else:
            context = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError):
        raise DownloadError(Reason.TLS_ERROR) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _transport(options: DownloadOptions) -> httpx.HTTPTransport:
    # The bare transport, not httpx.Client: no redirect handling, cookie jar, auth, .netrc or
    # proxy variables exist at this level, so nothing can be forwarded from one hop to the
    # next, and no request line (with its query) is logged.
    return httpx.HTTPTransport(
        verify=_ssl_context(options.ca_bundle),
        trust_env=False,
        http1=True,
        http2=False,
        retries=0,
    )


class _Restart(Exception):
    """Internal: the server's answer to a Range request cannot be trusted; start again at 0."""


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
    ) -> None:
        self.url = url
        self.allow = allowed_source_urls
        self.digest = expected_digest
        self.size = expected_size_bytes
        self.store = store
        self.options = options
        self.progress = progress
        self.free_space = free_space
        # Raises SpecError for a URL outside the allowlist or a bad spec: nothing is fetched.
        self.accumulator = self._new_accumulator()
        self.partial = store.partial_path(expected_digest)

    def _new_accumulator(self) -> IntegrityAccumulator:
        return IntegrityAccumulator(
            expected_digest=self.digest,
            expected_size_bytes=self.size,
            source_url=self.url,
            allowed_source_urls=self.allow,
        )

    def run(self) -> Path:
        self.store.ensure_layout()
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            offset = self._resume_offset(fd)
            self._check_disk(offset)
            if offset < self.size:
                self._fetch(fd, offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        verdict = self.accumulator.finalize()
        if not verdict.ok:
            self._refuse(verdict)
        return self.store.publish(self.partial, self.digest)

    def _fetch(self, fd: int, offset: int) -> None:
        with _transport(self.options) as transport:
            for _attempt in range(2):
                try:
                    self._transfer(transport, fd, offset)
                    return
                except _Restart:
                    offset = self._restart(fd)
            raise DownloadError(Reason.DOWNLOAD_FAILED)

    # --- partial file ---------------------------------------------------------------------

    def _resume_offset(self, fd: int) -> int:
        kept = os.fstat(fd).st_size
        if kept == 0:
            return 0
        if kept > self.size:
            return self._restart(fd)
        # Re-hash the kept prefix: the accumulator must have seen every byte it will vouch for.
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            verdict = hash_file_into(handle, self.accumulator, limit_bytes=kept)
        if not verdict.ok or self.accumulator.received_bytes != kept:
            return self._restart(fd)
        _log.info("resuming a kept partial download")
        return kept

    def _restart(self, fd: int) -> int:
        self.accumulator.abort()
        self.accumulator = self._new_accumulator()
        os.ftruncate(fd, 0)
        return 0

    def _check_disk(self, offset: int) -> None:
        needed = self.size - offset + self.options.disk_margin_bytes
        if self.free_space(self.store.tmp_dir) < needed:
            raise DownloadError(Reason.INSUFFICIENT_DISK)

    def _refuse(self, verdict: Verdict) -> None:
        # Bytes that failed verification are worthless for a resume: drop them.
        self._discard()
        raise DownloadError(verdict.reason)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.partial.unlink()

    # --- HTTP -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _response(self, transport: httpx.HTTPTransport, offset: int) -> Iterator[httpx.Response]:
        headers = {"Accept-Encoding": "identity", "User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeouts = {
            "connect": self.options.connect_timeout_s,
            "read": self.options.stall_timeout_s,
            "write": self.options.stall_timeout_s,
            "pool": self.options.connect_timeout_s,
        }
        current = self.url
        seen = {current}
        for _hop in range(self.options.max_redirects + 1):
            request = httpx.Request(
                "GET", current, headers=headers, extensions={"timeout": timeouts}
            )
            response = transport.handle_request(request)
            if response.status_code not in _REDIRECT_STATUSES:
                try:
                    yield response
                finally:
                    response.close()
                return
            location = response.headers.get("location")
            response.close()
            if not location:
                raise DownloadError(Reason.HTTP_STATUS)
            try:
                target = urljoin(current, location)
            except ValueError:
                raise DownloadError(Reason.REDIRECT_NOT_ALLOWED) from None
            if not validate_source_url(target, self.allow).ok:
                raise DownloadError(Reason.REDIRECT_NOT_ALLOWED)
            if target in seen:
                raise DownloadError(Reason.TOO_MANY_REDIRECTS)
            seen.add(target)
            current = target
        raise DownloadError(Reason.TOO_MANY_REDIRECTS)

    def _transfer(self, transport: httpx.HTTPTransport, fd: int, offset: int) -> None:
        with self._response(transport, offset) as response:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise DownloadError(Reason.CONTENT_ENCODING_NOT_ALLOWED)
            status = response.status_code
            if offset and status == 206:
                if not self._content_range_ok(response.headers.get("content-range"), offset):
                    raise _Restart
            elif offset and status == 200:
                # The server ignored the Range: this body starts at byte 0.
                offset = self._restart(fd)
            elif offset and status == 416:
                raise _Restart
            elif status != 200:
                raise DownloadError(Reason.HTTP_STATUS)
            os.lseek(fd, offset, os.SEEK_SET)
            self._stream(response, fd, offset)

    def _content_range_ok(self, header: str | None, offset: int) -> bool:
        match = _CONTENT_RANGE.fullmatch((header or "").strip())
        if match is None:
            return False
        start, end, total = match.groups()
        if int(start) != offset or int(end) < offset:
            return False
        return total == "*" or int(total) == self.size

    def _stream(self, response: httpx.Response, fd: int, offset: int) -> None:
        accumulator = self.accumulator
        size = self.size
        received = offset
        capacity = self.options.buffer_bytes
        buffers = (bytearray(capacity), bytearray(capacity))
        index = 0
        filled = 0
        pending: Future[Verdict] | None = None

        def flush(view: memoryview) -> Verdict:
            verdict = accumulator.update(view)
            if verdict.ok:
                _write_all(fd, view)
            return verdict

        def hand_over(count: int) -> None:
            nonlocal pending, index
            wait()
            pending = worker.submit(flush, memoryview(buffers[index])[:count])
            index ^= 1

        def wait() -> None:
            nonlocal pending
            if pending is not None:
                verdict = pending.result()
                pending = None
                if not verdict.ok:
                    raise DownloadError(verdict.reason)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="download") as worker:
            try:
                stream = response.stream
                assert isinstance(stream, httpx.SyncByteStream)
                try:
                    for chunk in stream:
                        length = len(chunk)
                        if received + length > size:
                            # Let the core refuse the overrunning chunk; none of it is written.
                            if filled:
                                hand_over(filled)
                            wait()
                            verdict = accumulator.update(chunk)
                            # A server that sends more than promised is not one to resume from.
                            self._discard()
                            raise DownloadError(
                                verdict.reason if not verdict.ok else Reason.SIZE_MISMATCH
                            )
                        received += length
                        if filled + length < capacity:
                            # The common case: the chunk fits; one memcpy, no slicing.
                            buffers[index][filled : filled + length] = chunk
                            filled += length
                        else:
                            piece = memoryview(chunk)
                            while piece:
                                take = min(capacity - filled, len(piece))
                                buffers[index][filled : filled + take] = piece[:take]
                                filled += take
                                piece = piece[take:]
                                if filled == capacity:
                                    hand_over(filled)
                                    filled = 0
                        if self.progress is not None:
                            self.progress(received, size)
                except httpx.HTTPError:
                    # The connection broke or stalled: keep what did arrive, for a resume.
                    if filled:
                        hand_over(filled)
                    wait()
                    raise
                if filled:
                    hand_over(filled)
                wait()
            finally:
                # Never leave the worker writing a buffer after we return.
                if pending is not None:
                    with contextlib.suppress(Exception):
                        pending.result()
        if received < size:
            # The stream ended early without a transport error (e.g. a lying Content-Length).
            # Keep the bytes for a resume; finalize will refuse with size_mismatch.
            raise DownloadError(Reason.SIZE_MISMATCH)


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    total = len(data)
    while written < total:
        written += os.write(fd, data[written:])
