"""The HTTPS download against a real loopback TLS origin, one server fault per test.

After every refusal: nothing is at a final path, and neither the error nor any log line carries
the URL's query (a secret token) or the digest.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from companion_runtime.bind import download
from companion_runtime.bind.download import (
    DEFAULT_DOWNLOAD_OPTIONS,
    DownloadError,
    DownloadOptions,
    _ProgressWatch,
    download_to_store,
)
from companion_runtime.bind.store import ModelStore
from companion_runtime.core import Reason
from tests.support.https import (
    SECRET_TOKEN,
    Fault,
    FaultyOrigin,
    assert_no_leak,
    assert_nothing_published,
    body_requests,
    model_bytes,
    partial_size,
    secret_url,
)

SIZE = 300_000
DATA, DIGEST = model_bytes(SIZE)
FAST = DownloadOptions(connect_timeout_s=5, stall_timeout_s=5, buffer_bytes=16 * 1024)


def fault_paths(base: str) -> dict[str, Fault]:
    other_host = base.replace("127.0.0.1", "localhost")
    return {
        "/bitflip.bin": Fault(kind="bitflip"),
        "/truncate.bin": Fault(kind="truncate"),
        "/oversize.bin": Fault(kind="oversize"),
        "/lying.bin": Fault(kind="lying_length"),
        "/to-http.bin": Fault(kind="redirect", location=base.replace("https", "http") + "m.bin"),
        "/to-other-host.bin": Fault(kind="redirect", location=other_host + "m.bin"),
        "/loop-a.bin": Fault(kind="redirect", location="/loop-b.bin"),
        "/loop-b.bin": Fault(kind="redirect", location="/loop-a.bin"),
        "/gzip.bin": Fault(kind="gzip"),
        "/gzip-transfer.bin": Fault(kind="gzip_transfer", location="gzip, chunked"),
        "/gzip-transfer-unchunked.bin": Fault(kind="gzip_transfer", location="gzip"),
        "/404.bin": Fault(kind="status", status=404),
        "/500.bin": Fault(kind="status", status=500),
        "/stall.bin": Fault(kind="stall", stall_after_bytes=50_000),
        "/chunked.bin": Fault(kind="chunked"),
        "/chunked-stall.bin": Fault(kind="chunked", stall_after_bytes=50_000),
        "/chunked-cut.bin": Fault(kind="chunked_cut", stall_after_bytes=50_000),
        "/chunked-short.bin": Fault(kind="chunked"),
        "/drip.bin": Fault(kind="drip", stall_after_bytes=300, drip_interval_s=0.02),
        "/ignore-range.bin": Fault(kind="ignore_range"),
        "/bad-range.bin": Fault(kind="bad_content_range"),
        "/huge-range.bin": Fault(kind="huge_content_range"),
        "/capital-unit.bin": Fault(kind="range_answer", location="Bytes {start}-{last}/{size}"),
        "/bad-range-then-503.bin": Fault(
            kind="range_answer", location="bytes 0-{last}/{size}", status=503
        ),
        "/short-range.bin": Fault(kind="short_range", stall_after_bytes=70_000),
        "/tiny-range.bin": Fault(kind="short_range", stall_after_bytes=1_000),
        "/byte-range.bin": Fault(kind="short_range", stall_after_bytes=1),
        "/slow-range.bin": Fault(kind="short_range", stall_after_bytes=70_000, drip_interval_s=1),
        "/unsatisfiable-range.bin": Fault(kind="unsatisfiable_range"),
        "/range-runs-on.bin": Fault(kind="range_runs_on", stall_after_bytes=70_000),
        "/unknown-total.bin": Fault(kind="range_answer", location="bytes {start}-{last}/*"),
        "/longer-unknown-total.bin": Fault(kind="range_answer", location="bytes {start}-{last}/*"),
        "/longer-ignoring-range.bin": Fault(kind="ignore_range"),
        "/overrunning-range.bin": Fault(
            kind="range_answer", location=f"bytes {{start}}-{SIZE - 1}/{SIZE}"
        ),
        "/shorter-ignoring-range.bin": Fault(kind="ignore_range"),
        "/switch.bin": Fault(kind="switch_protocols"),
        "/chunked-then-switch.bin": Fault(
            kind="chunked_then",
            after_body=b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
            b"Connection: Upgrade\r\n\r\n",
        ),
        "/chunked-then-response.bin": Fault(
            kind="chunked_then", after_body=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nmore!"
        ),
        # Chunk framing under a Transfer-Encoding llhttp does not read as chunked (a tab
        # after the coding), or reads as chunked (other case, spaces, a tab before it).
        "/chunked-tab.bin": Fault(kind="chunked_as", location="chunked\t"),
        "/chunked-tab-cut.bin": Fault(
            kind="chunked_as", location="chunked\t", stall_after_bytes=50_000
        ),
        "/chunked-space-tab.bin": Fault(kind="chunked_as", location="Chunked \t"),
        "/chunked-spaced.bin": Fault(kind="chunked_as", location="\t CHUNKED  "),
        "/extension-drip.bin": Fault(
            kind="chunk_extension_drip", stall_after_bytes=300, drip_interval_s=0.02
        ),
        "/hop.bin": Fault(kind="set_cookie_redirect", location="/m.bin", status=307),
        "/to-fragment.bin": Fault(kind="redirect", location="/m.bin#part-1"),
        "/to-other-host-fragment.bin": Fault(
            kind="redirect", location=f"{other_host}m.bin#@{base.removeprefix('https://')}"
        ),
        "/nowhere.bin": Fault(kind="redirect", location="", status=302),
        "/to-tab.bin": Fault(kind="redirect", location="/m\t.bin"),
        "/to-space.bin": Fault(kind="redirect", location="/m.bin /x"),
        # Sent as the Latin-1 bytes 0x85 and 0xA0, and as U+2028's UTF-8 bytes.
        "/to-nel.bin": Fault(kind="redirect", location="\x85/m.bin"),
        "/to-nbsp.bin": Fault(kind="redirect", location="/m.bin\xa0"),
        "/to-line-separator.bin": Fault(
            kind="redirect", location="\u2028/m.bin".encode().decode("latin-1")
        ),
        **{
            f"/chain-{i}.bin": Fault(kind="redirect", location=f"/chain-{i + 1}.bin")
            for i in range(6)
        },
    }


@pytest.fixture(scope="module")
def origin() -> Iterator[FaultyOrigin]:
    files = {
        "/m.bin": DATA,
        "/chain-6.bin": DATA,
        "/short.bin": DATA[:1000],
        "/chunked-short.bin": DATA[:1000],
        # The model with more after it, and a shorter file: another size than the manifest's.
        "/longer.bin": DATA + bytes(5000),
        "/shorter.bin": DATA[:240_000],
        "/longer-unknown-total.bin": DATA + bytes(5000),
        "/longer-ignoring-range.bin": DATA + bytes(5000),
        "/overrunning-range.bin": DATA + bytes(5000),
        "/shorter-ignoring-range.bin": DATA[:240_000],
    }
    with FaultyOrigin(files) as server:
        server.faults.update(fault_paths(server.base_url))
        for path in server.faults:
            server.files.setdefault(path, DATA)
        yield server


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def fetch(
    origin: FaultyOrigin,
    store: ModelStore,
    path: str,
    *,
    options: DownloadOptions = FAST,
    **kwargs: object,
) -> Path:
    return download_to_store(
        url=secret_url(origin, path),
        allowed_source_urls=(origin.base_url,),
        expected_digest=DIGEST,
        expected_size_bytes=SIZE,
        store=store,
        options=dataclasses.replace(options, ca_bundle=origin.ca_pem_path),
        **kwargs,  # type: ignore[arg-type]
    )


def refused(
    origin: FaultyOrigin,
    store: ModelStore,
    path: str,
    caplog: pytest.LogCaptureFixture,
    **kwargs: object,
) -> DownloadError:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DownloadError) as caught:
        fetch(origin, store, path, **kwargs)  # type: ignore[arg-type]
    assert_nothing_published(store)
    assert_no_leak([str(caught.value), repr(caught.value), caplog.text], DIGEST)
    assert str(caught.value) == caught.value.reason.value
    return caught.value


@pytest.mark.integration
def test_clean_download_is_published_read_only(origin: FaultyOrigin, store: ModelStore) -> None:
    progress: list[tuple[int, int]] = []
    path = fetch(
        origin, store, "/m.bin", progress=lambda done, total: progress.append((done, total))
    )
    assert path == store.blob_path(DIGEST)
    assert path.read_bytes() == DATA
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    assert not store.partial_path(DIGEST).exists()
    assert progress[-1] == (SIZE, SIZE)
    last = [r for r in origin.requests if r.path == "/m.bin"][-1]
    assert last.headers["accept-encoding"] == "identity"
    assert "authorization" not in last.headers and "cookie" not in last.headers
    assert last.has_query


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/bitflip.bin", Reason.DIGEST_MISMATCH),
        ("/truncate.bin", Reason.DOWNLOAD_FAILED),
        ("/lying.bin", Reason.SIZE_MISMATCH),
        ("/404.bin", Reason.HTTP_STATUS),
        ("/500.bin", Reason.HTTP_STATUS),
        ("/missing.bin", Reason.HTTP_STATUS),
        ("/switch.bin", Reason.DOWNLOAD_FAILED),
    ],
)
def test_bad_bodies_are_refused(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    reason: Reason,
) -> None:
    assert refused(origin, store, path, caplog).reason is reason


@pytest.mark.integration
@pytest.mark.security
@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/to-http.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/to-other-host.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/to-other-host-fragment.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/loop-a.bin", Reason.TOO_MANY_REDIRECTS),
        ("/chain-0.bin", Reason.TOO_MANY_REDIRECTS),
        ("/gzip.bin", Reason.CONTENT_ENCODING_NOT_ALLOWED),
        # A transfer coding other than chunked is as much a coding nobody asked for: its
        # compressed bytes had been hashed to the end, the whole model fetched, for a
        # digest_mismatch that blamed the mirror's bytes.
        ("/gzip-transfer.bin", Reason.CONTENT_ENCODING_NOT_ALLOWED),
        ("/gzip-transfer-unchunked.bin", Reason.CONTENT_ENCODING_NOT_ALLOWED),
        ("/nowhere.bin", Reason.HTTP_STATUS),
        # URL parsers drop a tab (WHATWG), so "/m\t.bin" would have been asked as "/m.bin":
        # whitespace in a Location is as ambiguous as in a source URL, and refused alike.
        ("/to-tab.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/to-space.bin", Reason.REDIRECT_NOT_ALLOWED),
        # Bytes 0x85 (NEL) and 0xA0 (NBSP) are whitespace to Python's str.strip(): around a
        # Location they had been stripped, and "\x85/m.bin" followed to "/m.bin".
        ("/to-nel.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/to-nbsp.bin", Reason.REDIRECT_NOT_ALLOWED),
        ("/to-line-separator.bin", Reason.REDIRECT_NOT_ALLOWED),
    ],
)
def test_transport_rules(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    reason: Reason,
) -> None:
    before = len(origin.requests)
    assert refused(origin, store, path, caplog).reason is reason
    # A refused redirect target is never contacted.
    new = origin.requests[before:]
    assert all(r.path != "/m.bin" for r in new)
    if path == "/chain-0.bin":
        assert [r.path for r in new] == [f"/chain-{i}.bin" for i in range(6)]


@pytest.mark.integration
@pytest.mark.security
def test_allowed_redirect_is_followed_without_cookies(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    before = len(origin.requests)
    assert fetch(origin, store, "/hop.bin").read_bytes() == DATA
    hop, target = origin.requests[before:]
    assert (hop.path, target.path) == ("/hop.bin", "/m.bin")
    assert "cookie" not in target.headers
    # The Location carried no query, so the token did not travel with the redirect.
    assert not target.has_query


@pytest.mark.integration
@pytest.mark.security
def test_a_redirect_with_a_fragment_is_followed_without_it(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    # RFC 9110 lets a Location carry a fragment; it names no other resource and is not sent.
    before = len(origin.requests)
    assert fetch(origin, store, "/to-fragment.bin").read_bytes() == DATA
    hop, target = origin.requests[before:]
    assert (hop.path, target.path) == ("/to-fragment.bin", "/m.bin")


@pytest.mark.integration
@pytest.mark.data_integrity
def test_oversized_body_never_grows_the_temp_file_past_the_size(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    sizes: list[int] = []
    error = refused(
        origin,
        store,
        "/oversize.bin",
        caplog,
        progress=lambda done, total: sizes.append(partial_size(store, DIGEST)),
    )
    assert error.reason is Reason.SIZE_MISMATCH
    assert sizes and max(sizes) <= SIZE
    # The client hung up right after the size was passed, not at the end of the 64 MiB body
    # (what the server got out is bounded by loopback socket buffers, a few MiB).
    assert body_requests(origin, "/oversize.bin")[-1].bytes_sent < SIZE + 16 * 1024 * 1024
    assert not store.partial_path(DIGEST).exists()


@pytest.mark.integration
@pytest.mark.data_integrity
def test_stall_keeps_every_received_byte_and_the_resume_starts_there(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The default receive buffer (2 MiB) is far larger than what arrives before the stall:
    # the bytes of a buffer still being filled when the stall hits must not be lost.
    short = DownloadOptions(connect_timeout_s=5, stall_timeout_s=0.5)
    assert short.buffer_bytes > 50_000
    error = refused(origin, store, "/stall.bin", caplog, options=short)
    assert error.reason is Reason.TIMEOUT
    # The server sent 50,000 bytes and went silent well before the stall timeout: every one
    # of them was read, hashed and is in the kept partial file.
    assert body_requests(origin, "/stall.bin")[-1].bytes_sent == 50_000
    assert store.partial_path(DIGEST).read_bytes() == DATA[:50_000]
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert request.range_header == "bytes=50000-"
    assert (request.status, request.bytes_sent) == (206, SIZE - 50_000)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_chunked_body_is_received_and_a_chunked_stall_keeps_its_bytes(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    short = DownloadOptions(connect_timeout_s=5, stall_timeout_s=0.5)
    error = refused(origin, store, "/chunked-stall.bin", caplog, options=short)
    assert error.reason is Reason.TIMEOUT
    assert store.partial_path(DIGEST).read_bytes() == DATA[:50_000]
    store.partial_path(DIGEST).unlink()
    assert fetch(origin, store, "/chunked.bin", options=short).read_bytes() == DATA


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_chunked_body_cut_before_its_last_chunk_is_a_broken_transfer(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The server hung up mid-body: that says nothing about the file's size (a chunked body
    # ends only with its zero-size chunk), so it is download_failed, as for a body short of
    # its Content-Length, and the next pull resumes.
    error = refused(origin, store, "/chunked-cut.bin", caplog)
    assert error.reason is Reason.DOWNLOAD_FAILED
    assert store.partial_path(DIGEST).read_bytes() == DATA[:50_000]
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert request.range_header == "bytes=50000-"


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("path", ["/chunked-then-switch.bin", "/chunked-then-response.bin"])
def test_what_follows_a_chunked_body_s_last_chunk_is_not_body(
    origin: FaultyOrigin, store: ModelStore, path: str
) -> None:
    # The right file, chunked, then another response on the same connection. Parsed as body
    # it was an overrun that threw the file away (size_mismatch), and a "101" escaped the
    # download as the parser's HttpParserUpgrade, a traceback instead of a reason.
    assert fetch(origin, store, path).read_bytes() == DATA


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize(
    "path", ["/chunked-tab.bin", "/chunked-tab-cut.bin", "/chunked-space-tab.bin"]
)
def test_chunk_framing_the_parser_does_not_read_as_chunks_is_refused_and_not_kept(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # "Transfer-Encoding: chunked<TAB>" is chunked once the value's whitespace is trimmed,
    # but llhttp reads a body under it to the connection's end, framing and all. Its chunk
    # sizes and line ends had been hashed and written as the model's bytes: a whole body
    # overran the size (size_mismatch, blaming the file), and one cut off was kept for a
    # resume, a prefix that was never the model's.
    error = refused(origin, store, path, caplog)
    assert error.reason is Reason.CONTENT_ENCODING_NOT_ALLOWED
    assert not store.partial_path(DIGEST).exists()


@pytest.mark.integration
@pytest.mark.data_integrity
def test_chunked_in_any_case_with_spaces_around_it_is_read_in_chunks(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    assert fetch(origin, store, "/chunked-spaced.bin").read_bytes() == DATA


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("path", ["/short.bin", "/lying.bin", "/chunked-short.bin"])
def test_a_whole_body_shorter_than_promised_is_a_size_mismatch_and_not_kept(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # The server said the body ended there (Content-Length reached, or the last chunk): its
    # file is not the one the manifest means, so its bytes are no prefix to resume from.
    assert refused(origin, store, path, caplog).reason is Reason.SIZE_MISMATCH
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.integration
def test_slow_drip_is_refused_by_the_minimum_progress_rule(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # One byte every 20 ms never trips the 2 s per-read stall timeout; the rule (fewer than
    # 1 KiB in 0.5 s) does. Without it the drip runs its 6 s and ends as a broken transfer.
    slow = DownloadOptions(
        connect_timeout_s=5,
        stall_timeout_s=2,
        min_progress_bytes=1024,
        min_progress_window_s=0.5,
    )
    started = time.monotonic()
    error = refused(origin, store, "/drip.bin", caplog, options=slow)
    elapsed = time.monotonic() - started
    assert error.reason is Reason.TIMEOUT
    assert elapsed < 3
    # What dripped in before the refusal is kept for a resume, like after a stall.
    kept = partial_size(store, DIGEST)
    assert 0 < kept <= body_requests(origin, "/drip.bin")[-1].bytes_sent
    assert store.partial_path(DIGEST).read_bytes() == DATA[:kept]


@pytest.mark.integration
def test_chunk_framing_dripped_without_a_body_byte_is_a_timeout(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A chunk extension arriving a byte every 20 ms trips neither the per-read stall timeout
    # nor, carrying no body byte, the progress rule's check; the transport bounds such framing
    # by the stall timeout in all. Without that the drip runs its 6 s and ends as a short body.
    slow = DownloadOptions(connect_timeout_s=5, stall_timeout_s=0.5)
    started = time.monotonic()
    error = refused(origin, store, "/extension-drip.bin", caplog, options=slow)
    assert error.reason is Reason.TIMEOUT
    assert time.monotonic() - started < 3


def test_minimum_progress_default_is_64_kib_in_30_s() -> None:
    assert DEFAULT_DOWNLOAD_OPTIONS.min_progress_bytes == 64 * 1024
    assert DEFAULT_DOWNLOAD_OPTIONS.min_progress_window_s == 30.0


def test_minimum_progress_rule_counts_bytes_per_window() -> None:
    watch = _ProgressWatch(min_bytes=100, window_s=10.0, now=0.0, received=1000)
    assert not watch.too_slow(received=1001, now=9.9)  # the window has not run its length
    assert not watch.too_slow(received=1100, now=10.0)  # 100 bytes in it: a new window starts
    assert not watch.too_slow(received=1150, now=19.9)
    assert watch.too_slow(received=1199, now=20.0)  # 99 bytes in the second window
    for off in (
        _ProgressWatch(min_bytes=0, window_s=10.0, now=0.0, received=0),
        _ProgressWatch(min_bytes=100, window_s=0.0, now=0.0, received=0),
    ):
        assert not off.too_slow(received=0, now=1e9)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "reason", "kwargs"),
    [
        ("/m.bin", Reason.INSUFFICIENT_DISK, {"free_space": lambda _path: 0}),
        ("/bitflip.bin", Reason.DIGEST_MISMATCH, {}),
        ("/oversize.bin", Reason.SIZE_MISMATCH, {}),
        ("/404.bin", Reason.HTTP_STATUS, {}),
        ("/gzip.bin", Reason.CONTENT_ENCODING_NOT_ALLOWED, {}),
        ("/to-http.bin", Reason.REDIRECT_NOT_ALLOWED, {}),
    ],
)
def test_refusals_leave_nothing_in_the_store_tmp_dir(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    reason: Reason,
    kwargs: dict[str, object],
) -> None:
    assert refused(origin, store, path, caplog, **kwargs).reason is reason
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.integration
@pytest.mark.data_integrity
def test_insufficient_disk_keeps_a_verified_prefix_for_later(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A kept prefix is not left behind by the refusal: it was there before and it is still a
    # valid start for a resume once space is freed.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    error = refused(origin, store, "/m.bin", caplog, free_space=lambda _path: 0)
    assert error.reason is Reason.INSUFFICIENT_DISK
    assert len(origin.requests) == before
    assert store.partial_path(DIGEST).read_bytes() == DATA[:100_000]


@pytest.mark.integration
@pytest.mark.data_integrity
def test_kept_partial_is_resumed_with_range(origin: FaultyOrigin, store: ModelStore) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:120_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert request.range_header == "bytes=120000-"
    assert request.status == 206
    assert request.bytes_sent == SIZE - 120_000


@pytest.mark.integration
@pytest.mark.data_integrity
def test_poisoned_partial_is_dropped_and_fetched_again_from_zero(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    # The kept prefix is not the file's start: the resumed body is right, the whole is not.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(b"\x00" * 100_000)
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    resumed, fresh = origin.requests[before:]
    assert (resumed.range_header, resumed.status) == ("bytes=100000-", 206)
    assert (fresh.range_header, fresh.status, fresh.bytes_sent) == (None, 200, SIZE)
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.integration
@pytest.mark.data_integrity
def test_poisoned_partial_is_refused_then_dropped(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A poisoned prefix and a poisoned mirror: the one fresh download from byte 0 fails too,
    # and that is the refusal; nothing of either is kept.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(b"\x00" * 100_000)
    before = len(origin.requests)
    assert refused(origin, store, "/bitflip.bin", caplog).reason is Reason.DIGEST_MISMATCH
    resumed, fresh = origin.requests[before:]
    assert resumed.range_header == "bytes=100000-"
    assert fresh.range_header is None
    assert not store.partial_path(DIGEST).exists()


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_fresh_download_with_a_bad_digest_is_not_fetched_again(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    before = len(origin.requests)
    assert refused(origin, store, "/bitflip.bin", caplog).reason is Reason.DIGEST_MISMATCH
    assert len(origin.requests) == before + 1


@pytest.mark.integration
@pytest.mark.data_integrity
def test_oversized_partial_is_discarded(origin: FaultyOrigin, store: ModelStore) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA + b"tail")
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    assert origin.requests[before].range_header is None


@pytest.mark.integration
@pytest.mark.data_integrity
def test_complete_partial_is_published_without_a_request(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA)
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    # A kept file of full length is verified and published as it is: no request at all.
    assert len(origin.requests) == before


#: The user a root-run test drops to (nobody); a test run as another user stays that user.
OTHER_UID = 65534


def _as_store_owner(work: Callable[[Path], str]) -> str:
    """``work(directory)`` in a child process of a user other than root, in a directory of its
    own; what it returned. root opens a read-only file for writing all the same, so the
    failures of any other user only show without root."""
    directory = Path(tempfile.mkdtemp())
    try:
        if os.geteuid() != 0:
            return work(directory)
        os.chown(directory, OTHER_UID, OTHER_UID)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
                try:
                    answer = work(directory)
                except Exception as error:  # reported to the test process
                    answer = f"raised {error!r}"
                os.write(write_end, answer.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answers:
            answer = answers.read()
        os.waitpid(pid, 0)
        return answer
    finally:
        shutil.rmtree(directory)


def _pull_with_a_kept_partial(
    origin: FaultyOrigin, prepare: Callable[[ModelStore, Path], None]
) -> Callable[[Path], str]:
    ca_pem = origin.ca_pem_path.read_bytes()

    def work(directory: Path) -> str:
        (directory / "ca.pem").write_bytes(ca_pem)
        store = ModelStore(directory / "store")
        store.ensure_layout()
        prepare(store, directory)
        try:
            path = download_to_store(
                url=secret_url(origin, "/m.bin"),
                allowed_source_urls=(origin.base_url,),
                expected_digest=DIGEST,
                expected_size_bytes=SIZE,
                store=store,
                options=dataclasses.replace(FAST, ca_bundle=directory / "ca.pem"),
            )
        except DownloadError as error:
            return error.reason.value
        mode = stat.S_IMODE(path.stat().st_mode)
        return f"ok {path.read_bytes() == DATA} {oct(mode)} {list(store.tmp_dir.iterdir())}"

    return work


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("kept", [SIZE, 100_000], ids=["whole", "prefix"])
def test_a_partial_left_read_only_by_an_unfinished_publish_is_resumed(
    origin: FaultyOrigin, kept: int
) -> None:
    # publish() makes the verified file 0444, then renames it into place: a rename that
    # failed, or a process that died in between, leaves a read-only partial in tmp/.
    def prepare(store: ModelStore, _directory: Path) -> None:
        store.partial_path(DIGEST).write_bytes(DATA[:kept])
        store.partial_path(DIGEST).chmod(0o444)

    before = len(origin.requests)
    assert _as_store_owner(_pull_with_a_kept_partial(origin, prepare)) == "ok True 0o444 []"
    assert len(origin.requests) == before + (kept < SIZE)


@pytest.mark.integration
@pytest.mark.security
def test_a_read_only_partial_that_is_a_symlink_is_refused_and_its_target_left_alone(
    origin: FaultyOrigin,
) -> None:
    def prepare(store: ModelStore, directory: Path) -> None:
        target = directory / "elsewhere"
        target.write_bytes(DATA)
        target.chmod(0o444)
        store.partial_path(DIGEST).symlink_to(target)

    pull = _pull_with_a_kept_partial(origin, prepare)

    def work(directory: Path) -> str:
        answer = pull(directory)
        return f"{answer} {oct(stat.S_IMODE((directory / 'elsewhere').stat().st_mode))}"

    assert _as_store_owner(work) == "store_error 0o444"


@pytest.mark.integration
@pytest.mark.security
@pytest.mark.data_integrity
@pytest.mark.parametrize("kept", ["another-user-s-file", "hard-link", "fifo"])
def test_a_partial_that_is_no_file_of_the_store_s_own_is_refused_and_left_alone(
    origin: FaultyOrigin, store: ModelStore, tmp_path: Path, kept: str
) -> None:
    # Only a file the store made itself is resumed: a regular file of this user with no
    # other name. Another user's file there had been written into and published as the blob
    # (root opens it all the same), so its owner could change the verified model at will;
    # a hard link's other name (a backup snapshot's copy) had been cut and overwritten, and
    # the blob published shared its bytes with it.
    store.ensure_layout()
    partial = store.partial_path(DIGEST)
    elsewhere = tmp_path / "elsewhere"
    if kept == "another-user-s-file":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        partial.write_bytes(DATA[:100_000])
        partial.chmod(0o666)
        os.chown(partial, OTHER_UID, OTHER_UID)
        before = DATA[:100_000]
    elif kept == "hard-link":
        before = b"x" * 100_000  # a stale prefix: the resume drops it and starts from 0
        elsewhere.write_bytes(before)
        os.link(elsewhere, partial)
    else:
        os.mkfifo(partial)
        before = b""
    requests = len(origin.requests)
    with pytest.raises(DownloadError) as refused:
        fetch(origin, store, "/m.bin")
    assert refused.value.reason is Reason.STORE_ERROR
    assert_nothing_published(store)
    if kept == "hard-link":
        assert elsewhere.read_bytes() == before
    if kept != "fifo":
        assert partial.read_bytes() == before
    assert len(origin.requests) == requests


@pytest.mark.integration
@pytest.mark.data_integrity
def test_200_answer_to_range_restarts_from_zero(origin: FaultyOrigin, store: ModelStore) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/ignore-range.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert request.range_header == "bytes=100000-"
    assert (request.status, request.bytes_sent) == (200, SIZE)


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("path", ["/bad-range.bin", "/huge-range.bin"])
def test_wrong_content_range_restarts_without_range(
    origin: FaultyOrigin, store: ModelStore, path: str
) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, path).read_bytes() == DATA
    first, second = origin.requests[before:]
    assert (first.range_header, first.status) == ("bytes=100000-", 206)
    assert (second.range_header, second.status) == (None, 200)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_restart_that_fails_before_its_answer_keeps_the_partial(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A 206 starting elsewhere than asked is dropped and the whole file asked for again. The
    # kept prefix had been cut away before that request, so an answer that never came (here a
    # 503) left nothing to resume from; the answer that replaces it is the 200.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert refused(origin, store, "/bad-range-then-503.bin", caplog).reason is Reason.HTTP_STATUS
    first, second = origin.requests[before:]
    assert (first.range_header, first.status) == ("bytes=100000-", 206)
    assert (second.range_header, second.status) == (None, 503)
    assert store.partial_path(DIGEST).read_bytes() == DATA[:100_000]
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    assert origin.requests[-1].range_header == "bytes=100000-"


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_content_range_s_unit_is_case_insensitive(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    # "Bytes 100000-299999/300000" is as good as "bytes ...": the range unit is
    # case-insensitive (RFC 9110 section 14.1). It had the kept prefix thrown away, and the
    # whole file fetched again from byte 0.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/capital-unit.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == ("bytes=100000-", 206)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_206_covering_less_than_the_rest_is_continued_and_its_bytes_kept(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    # A server may answer "bytes=N-" with a shorter range and say so in its Content-Range: what
    # it sent is a prefix to go on from, not a file shorter than the manifest's. It had been
    # refused as size_mismatch and the kept partial download deleted.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/short-range.bin").read_bytes() == DATA
    assert [(r.range_header, r.status) for r in origin.requests[before:]] == [
        ("bytes=100000-", 206),
        ("bytes=170000-", 206),
        ("bytes=240000-", 206),
    ]


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_206_whose_body_runs_past_its_range_is_read_to_the_range_s_end_only(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Each 206 names 70,000 bytes in its Content-Range and then sends zeros to the file's end.
    # Those zeros had been taken for the bytes after the range: the digest failed, the kept
    # prefix was thrown away as stale, and the file asked for from byte 0, which this server
    # refuses: a good prefix lost to a lie about bytes it never covered.
    caplog.set_level(logging.DEBUG)
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/range-runs-on.bin").read_bytes() == DATA
    ranges = [request.range_header for request in origin.requests[before:]]
    assert ranges == ["bytes=100000-", "bytes=170000-", "bytes=240000-"]
    assert "verification" not in caplog.text


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_206_too_short_to_count_as_progress_is_a_broken_transfer_kept_for_a_resume(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Less than the minimum progress per answer: no endless series of tiny requests, but the
    # bytes it brought are kept for the next pull.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert refused(origin, store, "/tiny-range.bin", caplog).reason is Reason.DOWNLOAD_FAILED
    assert [r.range_header for r in origin.requests[before:]] == ["bytes=100000-"]
    assert store.partial_path(DIGEST).read_bytes() == DATA[:101_000]


@pytest.mark.integration
@pytest.mark.data_integrity
def test_short_206s_are_bounded_also_with_the_minimum_progress_rule_turned_off(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # With min_progress_bytes=0 a short answer had to bring one byte: a server answering
    # every range with a single byte kept the pull asking, one TLS connection per byte.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[: SIZE - 300])
    before = len(origin.requests)
    off = dataclasses.replace(FAST, min_progress_bytes=0)
    error = refused(origin, store, "/byte-range.bin", caplog, options=off)
    assert error.reason is Reason.DOWNLOAD_FAILED
    assert [r.range_header for r in origin.requests[before:]] == [f"bytes={SIZE - 300}-"]
    assert store.partial_path(DIGEST).read_bytes() == DATA[: SIZE - 299]


@pytest.mark.integration
@pytest.mark.data_integrity
def test_short_206s_are_held_to_the_minimum_progress_from_their_request_on(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The minimum-progress window started with each body, so a server that waited before
    # every short answer (or sent it through redirects) was never too slow however long the
    # pull took: each answer is now held to the rule over the whole time it took.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    slow = dataclasses.replace(FAST, min_progress_bytes=64 * 1024, min_progress_window_s=0.5)
    error = refused(origin, store, "/slow-range.bin", caplog, options=slow)
    assert error.reason is Reason.TIMEOUT
    assert [r.range_header for r in origin.requests[before:]] == ["bytes=100000-"]
    assert store.partial_path(DIGEST).read_bytes() == DATA[:170_000]


@pytest.mark.integration
@pytest.mark.security
def test_source_outside_allowlist_is_never_contacted(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    before = len(origin.requests)
    with pytest.raises(DownloadError) as caught:
        download_to_store(
            url=secret_url(origin, "/m.bin"),
            allowed_source_urls=("https://models.example.com/",),
            expected_digest=DIGEST,
            expected_size_bytes=SIZE,
            store=store,
            options=FAST,
        )
    assert caught.value.reason is Reason.SOURCE_NOT_ALLOWED
    assert len(origin.requests) == before
    assert SECRET_TOKEN not in str(caught.value)


@pytest.mark.integration
@pytest.mark.security
@pytest.mark.parametrize("bundle", ["system", "garbage", "missing"])
def test_untrusted_or_broken_ca_is_a_tls_error(
    origin: FaultyOrigin, store: ModelStore, tmp_path: Path, bundle: str
) -> None:
    ca_bundle: Path | None = None
    if bundle == "garbage":
        ca_bundle = tmp_path / "garbage.pem"
        ca_bundle.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif bundle == "missing":
        ca_bundle = tmp_path / "missing.pem"
    with pytest.raises(DownloadError) as caught:
        download_to_store(
            url=secret_url(origin, "/m.bin"),
            allowed_source_urls=(origin.base_url,),
            expected_digest=DIGEST,
            expected_size_bytes=SIZE,
            store=store,
            options=DownloadOptions(connect_timeout_s=5, stall_timeout_s=5, ca_bundle=ca_bundle),
        )
    assert caught.value.reason is Reason.TLS_ERROR
    assert_nothing_published(store)


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: a disk too small for the model."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.integration
def test_too_small_disk_is_refused_before_any_request(
    origin: FaultyOrigin, tiny_mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tiny_mount / "store")
    before = len(origin.requests)
    assert refused(origin, store, "/m.bin", caplog).reason is Reason.INSUFFICIENT_DISK
    assert len(origin.requests) == before
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.integration
def test_disk_filling_up_mid_download_is_insufficient_disk(
    origin: FaultyOrigin, tiny_mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The free-space probe lies (claims plenty), so the real ENOSPC happens mid-write.
    store = ModelStore(tiny_mount / "store")
    error = refused(origin, store, "/m.bin", caplog, free_space=lambda _path: 1 << 40)
    assert error.reason is Reason.INSUFFICIENT_DISK
    assert os.statvfs(tiny_mount).f_bavail * os.statvfs(tiny_mount).f_frsize < SIZE


@pytest.mark.integration
@pytest.mark.data_integrity
def test_416_to_a_range_is_a_size_mismatch_and_the_partial_stays(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's file is shorter than the kept prefix: it answers 416. The download had
    # started over without Range, truncating the kept prefix, only to refuse the short body.
    # The manifest's size is the contract: the server's file is another one, refused at once.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert refused(origin, store, "/short.bin", caplog).reason is Reason.SIZE_MISMATCH
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == ("bytes=100000-", 416)
    assert store.partial_path(DIGEST).read_bytes() == DATA[:100_000]


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("path", ["/longer.bin", "/shorter.bin"])
def test_a_206_for_a_file_of_another_size_is_a_size_mismatch_and_the_partial_stays(
    origin: FaultyOrigin, store: ModelStore, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # Its Content-Range's total is not the manifest's size. The download had started over from
    # byte 0, truncating the kept prefix, and fetched the whole file only to refuse its size.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert refused(origin, store, path, caplog).reason is Reason.SIZE_MISMATCH
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == ("bytes=100000-", 206)
    assert store.partial_path(DIGEST).read_bytes() == DATA[:100_000]
    # Served right again, the same kept prefix is resumed.
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    assert origin.requests[-1].range_header == "bytes=100000-"


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_416_that_names_the_manifest_s_size_restarts_once_from_zero(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    # No disagreement about the size, only a server that will not serve the range: the file
    # is fetched once more from byte 0, as a Range answer that cannot be used always was.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/unsatisfiable-range.bin").read_bytes() == DATA
    first, second = origin.requests[before:]
    assert (first.range_header, first.status) == ("bytes=100000-", 416)
    assert (second.range_header, second.status) == (None, 200)


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/longer-unknown-total.bin", 206),
        # Its Content-Range names the manifest's size, but its body runs past it.
        ("/overrunning-range.bin", 206),
        ("/longer-ignoring-range.bin", 200),
        ("/shorter-ignoring-range.bin", 200),
    ],
)
def test_any_answer_to_a_range_for_a_file_of_another_size_keeps_the_partial(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    status: int,
) -> None:
    # A 206 with an unknown total ("*") whose range reaches past the manifest's size, or a 200
    # (the Range ignored) whose Content-Length is not that size: the server's file has another
    # size. The 206 overran the size and the overrun dropped the kept prefix (as it did for a
    # 206 whose body runs past the size its Content-Range names); the 200 cut the kept prefix
    # away before its whole body was fetched, only to be refused.
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert refused(origin, store, path, caplog).reason is Reason.SIZE_MISMATCH
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == ("bytes=100000-", status)
    assert store.partial_path(DIGEST).read_bytes() == DATA[:100_000]
    # Served right again, the same kept prefix is resumed.
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    assert origin.requests[-1].range_header == "bytes=100000-"


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_206_with_an_unknown_total_inside_the_size_is_resumed(
    origin: FaultyOrigin, store: ModelStore
) -> None:
    store.ensure_layout()
    store.partial_path(DIGEST).write_bytes(DATA[:100_000])
    before = len(origin.requests)
    assert fetch(origin, store, "/unknown-total.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == ("bytes=100000-", 206)


@pytest.mark.integration
def test_connection_refused_is_download_failed(
    store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultyOrigin({"/m.bin": DATA}) as closed:
        ca_copy = store.root.parent / "ca.pem"
        ca_copy.write_bytes(closed.ca_pem_path.read_bytes())
        base = closed.base_url
    # The origin is gone: nothing listens on its port any more.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DownloadError) as caught:
        download_to_store(
            url=base + f"m.bin?token={SECRET_TOKEN}",
            allowed_source_urls=(base,),
            expected_digest=DIGEST,
            expected_size_bytes=SIZE,
            store=store,
            options=DownloadOptions(connect_timeout_s=2, stall_timeout_s=2, ca_bundle=ca_copy),
        )
    assert caught.value.reason is Reason.DOWNLOAD_FAILED
    assert_nothing_published(store)
    assert_no_leak([str(caught.value), caplog.text], DIGEST)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_failed_write_keeps_a_clean_prefix_even_when_space_comes_back_at_once(
    origin: FaultyOrigin,
    tiny_mount: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The disk fills up for real (a 256 KiB tmpfs, the 300 KB model). Only the moment the
    # space comes back is staged: the tmpfs is grown as soon as the first write fails, while
    # up to three later buffers, already hashed, wait for the writer. Those were written after
    # the failed one, so the kept file was no prefix of the model and the next pull's resume
    # failed its digest and fetched everything again from byte 0.
    real_write_all = download._write_all
    grown = threading.Event()

    def write_all(fd: int, data: memoryview) -> None:
        try:
            real_write_all(fd, data)
        except OSError:
            if not grown.is_set():
                grown.set()
                subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_mount)], check=True)
                time.sleep(0.2)  # the receiving thread queues every buffer it can meanwhile
            raise

    monkeypatch.setattr(download, "_write_all", write_all)
    store = ModelStore(tiny_mount / "store")
    error = refused(origin, store, "/m.bin", caplog, free_space=lambda _path: 1 << 40)
    assert error.reason is Reason.INSUFFICIENT_DISK
    assert grown.is_set()
    kept = store.partial_path(DIGEST).read_bytes()
    assert 0 < len(kept) < SIZE
    assert kept == DATA[: len(kept)]
    # With the space back, the next pull goes on from exactly there, in one request.
    monkeypatch.setattr(download, "_write_all", real_write_all)
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == (f"bytes={len(kept)}-", 206)


def _failing_fsync_of_the_partial(
    monkeypatch: pytest.MonkeyPatch, error_number: int
) -> threading.Event:
    """Make the first fsync of a ``.partial`` file fail with ``error_number``, as a disk whose
    writeback failed does; later ones succeed, as Linux reports such an error only once."""
    real_fsync = os.fsync
    failed = threading.Event()

    def fsync(fd: int) -> None:
        if not failed.is_set() and os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            failed.set()
            raise OSError(error_number, os.strerror(error_number))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize(
    ("error_number", "reason"),
    [(errno.EIO, Reason.STORE_ERROR), (errno.ENOSPC, Reason.INSUFFICIENT_DISK)],
)
def test_a_download_whose_fsync_fails_is_not_kept_nor_published_later(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    error_number: int,
    reason: Reason,
) -> None:
    # Every byte arrived, but the flush failed: they may never reach the disk. The file was
    # kept, and the next pull re-hashed it from the page cache, which still shows the bytes,
    # and published it without a request, its fsync passing (the error is reported once).
    failed = _failing_fsync_of_the_partial(monkeypatch, error_number)
    assert refused(origin, store, "/m.bin", caplog).reason is reason
    assert failed.is_set()
    assert not store.partial_path(DIGEST).exists()
    before = len(origin.requests)
    assert fetch(origin, store, "/m.bin").read_bytes() == DATA
    (request,) = origin.requests[before:]
    assert (request.range_header, request.status) == (None, 200)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_kept_partial_whose_fsync_fails_is_dropped(
    origin: FaultyOrigin,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cancel mid-download keeps what arrived for a resume, flushed; a flush that fails
    # leaves bytes that may never reach the disk, which were kept all the same.
    failed = _failing_fsync_of_the_partial(monkeypatch, errno.EIO)
    cancel = threading.Event()

    def progress(received: int, _total: int) -> None:
        if received >= 16 * 1024:
            cancel.set()

    error = refused(origin, store, "/stall.bin", caplog, progress=progress, cancel=cancel)
    assert error.reason is Reason.CANCELLED
    assert failed.is_set()
    assert not store.partial_path(DIGEST).exists()
