"""pull_model: reuse a verified blob, never use a tampered one, download once under contention."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest

from companion_runtime.bind.download import DownloadOptions
from companion_runtime.bind.manifest import Manifest, manifest_from_dict
from companion_runtime.bind.pull import PullResult, pull_model
from companion_runtime.bind.store import ModelStore
from companion_runtime.core import Reason
from tests.support.https import (
    Fault,
    FaultyOrigin,
    assert_no_leak,
    assert_nothing_published,
    body_requests,
    model_bytes,
    partial_size,
    secret_url,
)
from tests.support.supervision import wait_for

SIZE = 400_000
DATA, DIGEST = model_bytes(SIZE, seed=7)
FAST = DownloadOptions(connect_timeout_s=5, stall_timeout_s=5, buffer_bytes=32 * 1024)
#: The user a root-run test acts as (nobody).
OTHER_UID = 65534


@pytest.fixture
def origin() -> Iterator[FaultyOrigin]:
    # Paced so concurrent pulls really overlap the first one's transfer.
    with FaultyOrigin({"/m.bin": DATA, "/bad.bin": DATA}, chunk_delay_s=0.02) as server:
        server.faults["/bad.bin"] = Fault(kind="bitflip")
        yield server


def manifest_for(origin: FaultyOrigin, path: str = "/m.bin") -> Manifest:
    return manifest_from_dict(
        {
            "model": {
                "name": "m",
                "url": secret_url(origin, path),
                "sha256": DIGEST,
                "size_bytes": SIZE,
            },
            "sources": {"allow": [origin.base_url]},
            "runtime": {"command": ["/bin/true"]},
        }
    )


def pull(origin: FaultyOrigin, store: ModelStore, path: str = "/m.bin") -> PullResult:
    return pull_model(
        manifest_for(origin, path), store=store, ca_bundle=origin.ca_pem_path, options=FAST
    )


@pytest.mark.integration
def test_second_pull_reuses_the_verified_blob(origin: FaultyOrigin, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = pull(origin, store)
    assert first.ok and first.path == store.blob_path(DIGEST)
    assert first.to_dict() == {"ok": True, "reason": "ok", "path": str(first.path)}
    second = pull(origin, store)
    assert second.ok and second.path == first.path
    assert len(body_requests(origin, "/m.bin")) == 1


@pytest.mark.integration
@pytest.mark.data_integrity
def test_tampered_blob_is_never_used_and_is_fetched_again(
    origin: FaultyOrigin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = ModelStore(tmp_path)
    blob = pull(origin, store).path
    assert blob is not None
    os.chmod(blob, 0o644)
    tampered = bytearray(DATA)
    tampered[12345] ^= 0x10
    blob.write_bytes(tampered)
    result = pull(origin, store)
    assert result.ok
    assert result.path is not None and result.path.read_bytes() == DATA
    assert len(body_requests(origin, "/m.bin")) == 2
    assert "digest_mismatch" in caplog.text
    assert_no_leak([caplog.text], DIGEST)


@pytest.mark.integration
@pytest.mark.data_integrity
def test_tampered_blob_with_a_bad_source_leaves_nothing(
    origin: FaultyOrigin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = ModelStore(tmp_path)
    store.ensure_layout()
    store.blob_path(DIGEST).write_bytes(b"\x00" * SIZE)  # planted, same size
    result = pull(origin, store, "/bad.bin")
    assert result.verdict.reason is Reason.DIGEST_MISMATCH
    assert result.path is None
    assert result.to_dict() == {"ok": False, "reason": "digest_mismatch"}
    assert_nothing_published(store)
    assert_no_leak([caplog.text, repr(result)], DIGEST)


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.parametrize("policy", ["full", "size_only"])
def test_a_manifest_with_a_wrong_size_leaves_the_verified_blob_alone(
    origin: FaultyOrigin, tmp_path: Path, policy: str
) -> None:
    # The blob is named by its digest, so a size that does not match it may be the manifest's
    # mistake. The blob had been deleted as if it were corrupt, and the whole model fetched
    # again only to be refused: one wrong manifest cost every other user of the model its file.
    store = ModelStore(tmp_path)
    blob = pull(origin, store).path
    assert blob is not None
    for wrong in (SIZE - 1, SIZE + 1):
        manifest = manifest_for(origin)
        model = dataclasses.replace(manifest.model, size_bytes=wrong)
        result = pull_model(
            dataclasses.replace(manifest, model=model),
            store=store,
            ca_bundle=origin.ca_pem_path,
            options=FAST,
            verify_policy=policy,  # type: ignore[arg-type]
        )
        assert result.verdict.reason is Reason.SIZE_MISMATCH
        assert blob.read_bytes() == DATA
    assert len(body_requests(origin, "/m.bin")) == 1
    assert pull(origin, store).path == blob


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_blob_cut_short_on_disk_is_still_fetched_again(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    blob = pull(origin, store).path
    assert blob is not None
    os.chmod(blob, 0o644)
    blob.write_bytes(DATA[:-1000])
    result = pull(origin, store)
    assert result.ok and result.path == blob and blob.read_bytes() == DATA
    assert len(body_requests(origin, "/m.bin")) == 2


@pytest.mark.integration
def test_size_only_policy_trusts_a_same_size_blob(origin: FaultyOrigin, tmp_path: Path) -> None:
    # The opt-in policy is what it says: a same-size blob is accepted without hashing.
    store = ModelStore(tmp_path)
    store.ensure_layout()
    store.blob_path(DIGEST).write_bytes(b"\x00" * SIZE)
    result = pull_model(
        manifest_for(origin),
        store=store,
        ca_bundle=origin.ca_pem_path,
        options=FAST,
        verify_policy="size_only",
    )
    assert result.ok and origin.requests == []


@pytest.mark.integration
@pytest.mark.data_integrity
def test_pull_after_a_stall_resumes_at_the_last_received_byte(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    sent = 123_457
    origin.files["/stall.bin"] = DATA
    origin.faults["/stall.bin"] = Fault(kind="stall", stall_after_bytes=sent)
    store = ModelStore(tmp_path)
    # Default (2 MiB) receive buffers: the stall hits while the first one is being filled.
    stalls = DownloadOptions(connect_timeout_s=5, stall_timeout_s=0.5)
    result = pull_model(
        manifest_for(origin, "/stall.bin"),
        store=store,
        ca_bundle=origin.ca_pem_path,
        options=stalls,
    )
    assert result.verdict.reason is Reason.TIMEOUT
    assert_nothing_published(store)
    assert store.partial_path(DIGEST).stat().st_size == sent
    resumed = pull(origin, store)
    assert resumed.ok and resumed.path is not None
    assert resumed.path.read_bytes() == DATA
    (request,) = body_requests(origin, "/m.bin")
    assert request.range_header == f"bytes={sent}-"
    assert request.bytes_sent == SIZE - sent
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.integration
@pytest.mark.stress
def test_concurrent_pulls_in_threads_download_once(origin: FaultyOrigin, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    results: list[PullResult] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        result = pull(origin, store)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert all(r.ok and r.path == store.blob_path(DIGEST) for r in results)
    assert len(body_requests(origin, "/m.bin")) == 1
    assert store.blob_path(DIGEST).read_bytes() == DATA


@pytest.mark.integration
def test_bad_spec_and_unwritable_store(origin: FaultyOrigin, tmp_path: Path) -> None:
    manifest = manifest_for(origin)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    result = pull_model(manifest, store=ModelStore(blocker / "s"), ca_bundle=origin.ca_pem_path)
    assert result.verdict.reason is Reason.STORE_ERROR
    spec = manifest.model
    result = pull_model(spec, store=ModelStore(tmp_path / "s"), ca_bundle=origin.ca_pem_path)
    # A bare ModelSpec without an allowlist is allowed nowhere.
    assert result.verdict.reason is Reason.SOURCE_NOT_ALLOWED
    result = pull_model(
        spec,
        store=ModelStore(tmp_path / "s"),
        allowed_source_urls=(origin.base_url,),
        ca_bundle=origin.ca_pem_path,
        options=FAST,
    )
    assert result.ok


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs of its own, so that a test can remount it read-only."""
    mount_point = tmp_path / "mount"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
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
def test_a_verified_blob_in_a_read_only_store_is_used(
    origin: FaultyOrigin, mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A model baked into an image or a shared read-only mount: no lock file can be made
    # there, and none is needed, since no pull can change the blob.
    store = ModelStore(mount / "store")
    blob = pull(origin, store).path
    assert blob is not None
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    result = pull(origin, store)
    assert result.ok and result.path == blob
    assert len(body_requests(origin, "/m.bin")) == 1
    # What would have to be written there is still refused.
    caplog.set_level(logging.DEBUG)
    other = pull_model(
        manifest_from_dict(
            {
                "model": {
                    "name": "other",
                    "url": secret_url(origin, "/m.bin"),
                    "sha256": "0" * 64,
                    "size_bytes": SIZE,
                },
                "sources": {"allow": [origin.base_url]},
                "runtime": {"command": ["/bin/true"]},
            }
        ),
        store=store,
        ca_bundle=origin.ca_pem_path,
        options=FAST,
    )
    assert other.verdict.reason is Reason.STORE_ERROR
    assert len(body_requests(origin, "/m.bin")) == 1
    assert_no_leak([caplog.text], DIGEST)


@pytest.mark.integration
def test_a_blob_on_a_read_only_mount_is_used_whoever_may_write_it(
    origin: FaultyOrigin, mount: Path
) -> None:
    # Nobody can change a file on a read-only mount, whatever its owner and mode say.
    store = ModelStore(mount / "store")
    blob = pull(origin, store).path
    assert blob is not None
    blob.chmod(0o666)
    os.chown(blob, OTHER_UID, OTHER_UID)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    result = pull(origin, store)
    assert result.ok and result.path == blob
    assert len(body_requests(origin, "/m.bin")) == 1


@pytest.fixture
def reachable_mount() -> Iterator[Path]:
    """A real tmpfs of its own that another user can reach (the ``mount`` fixture lies
    under ``tmp_path``, which only its user may enter)."""
    mount_point = Path(tempfile.mkdtemp())
    mount_point.chmod(0o755)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        mount_point.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def _pull_as_another_user(origin: FaultyOrigin, store: ModelStore, blob: Path) -> str:
    """Pull in a child as nobody; the reason, and whether the path is ``blob``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            result = pull(origin, store)
            answer = f"{result.verdict.reason.value} {result.path == blob}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="a store of root's used by another user needs root")
def test_a_read_only_store_of_root_s_is_used_by_another_user(
    origin: FaultyOrigin, reachable_mount: Path
) -> None:
    # A model baked into an image by root, the image run as another user: the store's
    # directories are root's and no one can write them, yet only the user's own had been
    # accepted, and every pull and serve was store_error.
    store = ModelStore(reachable_mount / "store")
    blob = pull(origin, store).path
    assert blob is not None
    for directory in (store.root, store.blobs_dir, store.tmp_dir, store.locks_dir):
        directory.chmod(0o755)
    subprocess.run(["mount", "-o", "remount,ro", str(reachable_mount)], check=True)
    assert _pull_as_another_user(origin, store, blob) == "ok True"
    assert len(body_requests(origin, "/m.bin")) == 1


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="a store of a third user's needs root")
def test_a_read_only_store_another_user_made_is_used(
    origin: FaultyOrigin, reachable_mount: Path
) -> None:
    # An image built as one user and run as another: on a file system no one can write, the
    # directories' owner renames nothing, yet they had to be the user's or root's.
    store = ModelStore(reachable_mount / "store")
    blob = pull(origin, store).path
    assert blob is not None
    for path in (store.root, store.blobs_dir, store.tmp_dir, store.locks_dir, blob):
        os.chown(path, 4242, 4242)
    for directory in (store.root, store.blobs_dir, store.tmp_dir, store.locks_dir):
        directory.chmod(0o755)
    assert _pull_as_another_user(origin, store, blob) == "store_error False"
    subprocess.run(["mount", "-o", "remount,ro", str(reachable_mount)], check=True)
    assert _pull_as_another_user(origin, store, blob) == "ok True"
    assert len(body_requests(origin, "/m.bin")) == 1


@pytest.mark.integration
def test_unknown_policy_is_refused_without_touching_the_blob(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    assert pull(origin, store).ok
    result = pull_model(
        manifest_for(origin),
        store=store,
        ca_bundle=origin.ca_pem_path,
        verify_policy="sometimes",  # type: ignore[arg-type]
    )
    assert result.verdict.reason is Reason.MALFORMED_SPEC
    assert store.blob_path(DIGEST).read_bytes() == DATA


# --- cancellation -------------------------------------------------------------------------

BIG_SIZE = 8 * 1024 * 1024
BIG, BIG_DIGEST = model_bytes(BIG_SIZE, seed=8)


def big_manifest(origin: FaultyOrigin) -> Manifest:
    return manifest_from_dict(
        {
            "model": {
                "name": "big",
                "url": secret_url(origin, "/big.bin"),
                "sha256": BIG_DIGEST,
                "size_bytes": BIG_SIZE,
            },
            "sources": {"allow": [origin.base_url]},
            "runtime": {"command": ["/bin/true"]},
        }
    )


def pull_in_thread(
    manifest: Manifest, store: ModelStore, ca_bundle: Path, cancel: threading.Event
) -> tuple[threading.Thread, list[PullResult]]:
    results: list[PullResult] = []
    thread = threading.Thread(
        target=lambda: results.append(
            pull_model(manifest, store=store, ca_bundle=ca_bundle, cancel=cancel)
        )
    )
    thread.start()
    return thread, results


def lock_is_free(store: ModelStore, digest: str) -> bool:
    probe = store.lock(digest, timeout_s=0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return False
    probe.release()
    return True


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_cancelled_pull_stops_within_a_second_and_the_next_one_resumes(
    tmp_path: Path,
) -> None:
    # 256 KiB every 0.1 s: the whole body would take more than 3 s, each read waits on the
    # server, and the stall timeout (30 s by default) never comes into it.
    with FaultyOrigin({"/big.bin": BIG}, chunk_delay_s=0.1) as origin:
        store = ModelStore(tmp_path)
        manifest = big_manifest(origin)
        cancel = threading.Event()
        thread, results = pull_in_thread(manifest, store, origin.ca_pem_path, cancel)
        try:
            assert wait_for(lambda: partial_size(store, BIG_DIGEST) >= 512 * 1024, 30)
            cancel.set()
            started = time.monotonic()
            thread.join(10)
            elapsed = time.monotonic() - started
        finally:
            cancel.set()
            thread.join(30)
        (result,) = results
        assert result.verdict.reason is Reason.CANCELLED and result.path is None
        assert elapsed < 1.5
        assert_nothing_published(store)
        kept = partial_size(store, BIG_DIGEST)
        assert 0 < kept < BIG_SIZE
        assert lock_is_free(store, BIG_DIGEST)

        origin.chunk_delay_s = 0.0
        before = len(origin.requests)
        resumed = pull_model(manifest, store=store, ca_bundle=origin.ca_pem_path)
        assert resumed.ok and resumed.path is not None
        assert resumed.path.read_bytes() == BIG
        (request,) = origin.requests[before:]
        assert request.range_header == f"bytes={kept}-"
        assert request.bytes_sent == BIG_SIZE - kept


@pytest.mark.integration
def test_a_pull_waiting_for_the_lock_can_be_cancelled(origin: FaultyOrigin, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ensure_layout()
    cancel = threading.Event()
    with store.lock(DIGEST):  # another pull of the same model, taking its time
        thread, results = pull_in_thread(manifest_for(origin), store, origin.ca_pem_path, cancel)
        try:
            time.sleep(0.5)
            assert thread.is_alive()
            cancel.set()
            started = time.monotonic()
            thread.join(10)
            elapsed = time.monotonic() - started
        finally:
            cancel.set()
            thread.join(30)
    assert [result.verdict.reason for result in results] == [Reason.CANCELLED]
    assert elapsed < 1.5
    assert origin.requests == []


class CancelOnceLocked(threading.Event):
    """A cancel that comes the first time the pull looks while it holds the store's lock."""

    def __init__(self, store: ModelStore, digest: str) -> None:
        super().__init__()
        self._store = store
        self._digest = digest

    def is_set(self) -> bool:
        if not super().is_set() and not lock_is_free(self._store, self._digest):
            self.set()
        return super().is_set()


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_cancel_during_the_re_verify_keeps_the_stored_blob(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # A cancelled re-verify says nothing about the blob: it must not be removed as tampered.
    store = ModelStore(tmp_path)
    assert pull(origin, store).ok
    result = pull_model(
        manifest_for(origin),
        store=store,
        ca_bundle=origin.ca_pem_path,
        cancel=CancelOnceLocked(store, DIGEST),
    )
    assert result.verdict.reason is Reason.CANCELLED
    assert store.blob_path(DIGEST).read_bytes() == DATA
    assert len(body_requests(origin, "/m.bin")) == 1
    assert lock_is_free(store, DIGEST)


# --- a blob someone else could change -----------------------------------------------------


def _write_as_another_user(path: Path, groups: list[int]) -> str:
    """In a child process of another user (in ``groups``), overwrite the start of ``path``,
    making it writable first when that user owns it; ``"wrote"`` or why not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            try:
                with contextlib.suppress(PermissionError):
                    os.chmod(path, 0o666)
                fd = os.open(path, os.O_WRONLY)
                os.pwrite(fd, b"EVIL", 0)
                os.close(fd)
                answer = "wrote"
            except OSError as error:
                answer = f"refused {error.errno}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.fixture
def open_store() -> Iterator[ModelStore]:
    """A store whose directories others may enter but not write (made by hand, umask 022)."""
    directory = Path(tempfile.mkdtemp())
    directory.chmod(0o755)
    root = directory / "store"
    try:
        store = ModelStore(root)
        store.ensure_layout()
        for entry in (root, store.blobs_dir, store.tmp_dir, store.locks_dir):
            entry.chmod(0o755)
        yield store
    finally:
        shutil.rmtree(directory)


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="writing as another user needs root")
@pytest.mark.parametrize("writable_by", ["others", "group", "its-owner"])
def test_a_blob_someone_else_could_change_is_never_used_and_is_fetched_again(
    origin: FaultyOrigin, open_store: ModelStore, writable_by: str
) -> None:
    # Verified bytes are only the bytes loaded if nobody else can change them between the
    # re-verify and the runtime's open (or under its mmap, after). A blob is published
    # read-only and ours, but one copied in by hand, restored from a backup or left by another
    # user may be writable by others: it had passed as verified, and another user then wrote
    # into the very file the pull named.
    store = open_store
    blob = pull(origin, store).path
    assert blob is not None
    groups: list[int] = []
    if writable_by == "others":
        blob.chmod(0o666)
    elif writable_by == "group":
        blob.chmod(0o664)
        groups = [blob.stat().st_gid]
    else:
        os.chown(blob, OTHER_UID, OTHER_UID)
    result = pull(origin, store)
    assert result.ok and result.path == blob
    attempt = _write_as_another_user(blob, groups)
    assert attempt.startswith("refused"), attempt
    assert blob.read_bytes() == DATA
    info = blob.stat()
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(info.st_mode) == 0o444
    assert len(body_requests(origin, "/m.bin")) == 2


@pytest.mark.integration
@pytest.mark.security
def test_a_store_inside_a_directory_others_can_write_to_is_refused_before_any_request(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # Another user who can rename entries there had moved the verified store aside after the
    # pull, and put one of their own at its path: the path the pull named held their bytes.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = pull(origin, ModelStore(shared / "models"))
    assert result.verdict.reason is Reason.STORE_ERROR
    assert not body_requests(origin, "/m.bin")


# --- a stored blob that could not be read -------------------------------------------------


def _pull_in_a_child(origin: FaultyOrigin, store: ModelStore, *, as_uid: int | None) -> str:
    """Pull in a forked child whose every descriptor but one is taken (so the lock opens and
    the blob does not: a real ``EMFILE``), or that runs as ``as_uid``; the child's reason."""
    manifest = manifest_for(origin)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if as_uid is not None:
                os.setgroups([])
                os.setgid(as_uid)
                os.setuid(as_uid)
                result = pull_model(
                    manifest, store=store, ca_bundle=origin.ca_pem_path, options=FAST
                )
            else:
                highest = max(int(name) for name in os.listdir("/proc/self/fd"))
                resource.setrlimit(
                    resource.RLIMIT_NOFILE,
                    (highest + 16, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
                )
                taken: list[int] = []
                with contextlib.suppress(OSError):
                    while True:
                        taken.append(os.open(os.devnull, os.O_RDONLY))
                os.close(taken.pop())  # the lock file's
                result = pull_model(
                    manifest, store=store, ca_bundle=origin.ca_pem_path, options=FAST
                )
            os.write(write_end, result.verdict.reason.value.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.integration
@pytest.mark.data_integrity
def test_a_blob_that_cannot_be_opened_for_want_of_descriptors_is_kept(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # Every failure to open the blob had counted as a missing blob: a pull that ran out of
    # file descriptors removed a verified model and set out to fetch it again (gigabytes, or
    # nothing at all without a network).
    store = ModelStore(tmp_path)
    blob = pull(origin, store).path
    assert blob is not None
    before = blob.stat()
    assert _pull_in_a_child(origin, store, as_uid=None) == "store_error"
    after = blob.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert blob.read_bytes() == DATA
    assert len(body_requests(origin, "/m.bin")) == 1
    assert pull(origin, store).ok
    assert len(body_requests(origin, "/m.bin")) == 1


@pytest.mark.integration
@pytest.mark.data_integrity
@pytest.mark.skipif(os.geteuid() != 0, reason="a store of another user needs root")
def test_a_blob_its_user_may_not_read_is_kept(origin: FaultyOrigin, tmp_path: Path) -> None:
    # EACCES had counted as a missing blob too: removed, and fetched again.
    home = Path(tempfile.mkdtemp())
    try:
        home.chmod(0o755)
        root = home / "store"
        store = ModelStore(root)
        blob = pull(origin, store).path
        assert blob is not None
        for directory, _dirs, files in os.walk(root):
            os.chown(directory, OTHER_UID, OTHER_UID)
            for name in files:
                os.chown(Path(directory) / name, OTHER_UID, OTHER_UID)
        blob.chmod(0)
        assert _pull_in_a_child(origin, store, as_uid=OTHER_UID) == "store_error"
        assert blob.exists()
        blob.chmod(0o444)
        assert blob.read_bytes() == DATA
        assert len(body_requests(origin, "/m.bin")) == 1
    finally:
        shutil.rmtree(home)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-symlink"])
def test_something_other_than_a_file_at_the_blob_s_name_is_refused_before_any_request(
    origin: FaultyOrigin, tmp_path: Path, kind: str
) -> None:
    # A directory there had let the first pull download the whole model, only to fail to
    # publish it over the directory; every later pull failed the same way.
    store = ModelStore(tmp_path)
    store.ensure_layout()
    entry = store.blob_path(DIGEST)
    if kind == "directory":
        entry.mkdir()
        (entry / "kept").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.symlink_to(tmp_path / "nothing")
    before = entry.lstat()
    for _ in range(2):
        result = pull(origin, store)
        assert result.verdict.reason is Reason.STORE_ERROR
        assert result.path is None
    assert not origin.requests
    after = entry.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "directory":
        assert (entry / "kept").read_bytes() == b"x"


@pytest.mark.integration
@pytest.mark.security
def test_a_blob_symlinked_into_a_directory_others_can_write_to_is_refused(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # A blob the user linked to a model on another disk, whose directory anyone could
    # write: the store's own directories were checked, but whoever could rename entries
    # there could put other bytes at the name the link leads to after the re-verify.
    shared = tmp_path / "shared"
    shared.mkdir()
    model = shared / "model.bin"
    model.write_bytes(DATA)
    model.chmod(0o444)
    shared.chmod(0o777)
    store = ModelStore(tmp_path / "store")
    store.ensure_layout()
    store.blob_path(DIGEST).symlink_to(model)
    result = pull(origin, store)
    assert result.verdict.reason is Reason.STORE_ERROR
    assert store.blob_path(DIGEST).is_symlink()  # left as it is
    shared.chmod(0o755)  # the user's own, no one else's to change: a link the user may make
    result = pull(origin, store)
    assert result.ok and result.path == store.blob_path(DIGEST)
    assert not origin.requests


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_a_ca_bundle_that_is_a_fifo_is_refused_without_waiting(
    origin: FaultyOrigin, tmp_path: Path
) -> None:
    # OpenSSL opened the bundle itself and waited in open() for a writer: the pull never
    # ended, whatever cancel it was given.
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    cancel = threading.Event()
    results: list[PullResult] = []
    thread = threading.Thread(
        target=lambda: results.append(
            pull_model(
                manifest_for(origin),
                store=ModelStore(tmp_path / "store"),
                ca_bundle=fifo,
                options=FAST,
                cancel=cancel,
            )
        ),
        daemon=True,
    )
    thread.start()
    thread.join(5)
    blocked = thread.is_alive()
    if blocked:
        cancel.set()
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
    assert not blocked
    assert [result.verdict.reason for result in results] == [Reason.TLS_ERROR]
    assert not origin.requests
