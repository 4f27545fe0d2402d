"""Re-verifying a file: stat first, overlapping read/hash, every refusal a reason."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from companion_runtime.bind import filehash
from companion_runtime.bind.filehash import verify_file
from companion_runtime.core import Reason
from tests.support.https import model_bytes
from tests.support.would_block import opener_that_would_block


def write_model(tmp_path: Path, size: int) -> tuple[Path, bytes, str]:
    data, digest = model_bytes(size)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    return path, data, digest


@pytest.mark.unit
@pytest.mark.parametrize("size", [1, 4096, 3 * 1024 * 1024 + 7])
def test_intact_file_verifies(tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small buffers so the two-buffer rotation is exercised many times on a small file.
    monkeypatch.setattr(filehash, "READ_BUFFER_BYTES", 64 * 1024)
    path, _data, digest = write_model(tmp_path, size)
    seen: list[tuple[int, int]] = []
    verdict = verify_file(
        path,
        expected_digest=digest,
        expected_size_bytes=size,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert verdict.ok and verdict.reason is Reason.OK
    assert seen[-1] == (size, size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


@pytest.mark.unit
@pytest.mark.data_integrity
@pytest.mark.parametrize("position", [0, 1, -1])
def test_one_flipped_bit_anywhere_is_refused(
    tmp_path: Path, position: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filehash, "READ_BUFFER_BYTES", 64 * 1024)
    path, data, digest = write_model(tmp_path, 200_000)
    flipped = bytearray(data)
    flipped[position if position >= 0 else len(data) - 1] ^= 0x80
    path.write_bytes(flipped)
    verdict = verify_file(path, expected_digest=digest, expected_size_bytes=len(data))
    assert not verdict.ok and verdict.reason is Reason.DIGEST_MISMATCH


@pytest.mark.unit
@pytest.mark.data_integrity
def test_size_comes_from_stat_first(tmp_path: Path) -> None:
    path, data, digest = write_model(tmp_path, 10_000)
    # A 64 GiB sparse file would take far longer than the timeout to read: a quick refusal
    # proves the size was judged from stat before any byte was hashed.
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(64 * 1024**3)
    started = time.monotonic()
    verdict = verify_file(sparse, expected_digest=digest, expected_size_bytes=len(data))
    assert verdict.reason is Reason.SIZE_MISMATCH
    assert time.monotonic() - started < 1.0
    with open(path, "ab") as handle:
        handle.write(b"x")
    verdict = verify_file(path, expected_digest=digest, expected_size_bytes=len(data))
    assert verdict.reason is Reason.SIZE_MISMATCH


@pytest.mark.unit
def test_size_only_policy_skips_the_hash(tmp_path: Path) -> None:
    path, data, digest = write_model(tmp_path, 10_000)
    path.write_bytes(b"\x00" * len(data))  # same size, wrong bytes
    assert verify_file(
        path, expected_digest=digest, expected_size_bytes=len(data), policy="size_only"
    ).ok
    assert (
        verify_file(path, expected_digest=digest, expected_size_bytes=len(data)).reason
        is Reason.DIGEST_MISMATCH
    )
    assert (
        verify_file(
            path,
            expected_digest=digest,
            expected_size_bytes=len(data),
            policy="bogus",  # type: ignore[arg-type]
        ).reason
        is Reason.MALFORMED_SPEC
    )


@pytest.mark.unit
def test_missing_directory_and_bad_spec(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"").hexdigest()
    assert (
        verify_file(tmp_path / "nope", expected_digest="ab" * 32, expected_size_bytes=1).reason
        is Reason.FILE_NOT_FOUND
    )
    assert (
        verify_file(tmp_path, expected_digest="ab" * 32, expected_size_bytes=1).reason
        is Reason.FILE_NOT_FOUND
    )
    assert (  # a name with a NUL cannot exist (os.open raises ValueError for it)
        verify_file(f"{tmp_path}/a\0b", expected_digest="ab" * 32, expected_size_bytes=1).reason
        is Reason.FILE_NOT_FOUND
    )
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert verify_file(path, expected_digest=digest.upper(), expected_size_bytes=1).reason is (
        Reason.MALFORMED_SPEC
    )
    assert verify_file(path, expected_digest=digest, expected_size_bytes=0).reason is (
        Reason.MALFORMED_SPEC
    )


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    verdict = verify_file(fifo, expected_digest="ab" * 32, expected_size_bytes=1)
    assert verdict.reason is Reason.FILE_NOT_FOUND


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    # A writer waits in open() for a reader. Were the FIFO opened (and closed) to be refused,
    # the writer would go on and meet a closed pipe: a producer killed by SIGPIPE.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer_opened = threading.Event()

    def writer() -> None:
        with open(fifo, "wb"):
            writer_opened.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.2)  # the writer is blocked in open()
    verdict = verify_file(fifo, expected_digest="ab" * 32, expected_size_bytes=1)
    assert verdict.reason is Reason.FILE_NOT_FOUND
    assert not writer_opened.wait(0.5)
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
    thread.join(5)


@pytest.mark.unit
def test_a_cancel_stops_the_hash_between_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filehash, "READ_BUFFER_BYTES", 64 * 1024)
    path, data, digest = write_model(tmp_path, 1_000_000)
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, _total: int) -> None:
        seen.append(done)
        if done >= 128 * 1024:
            cancel.set()  # as another thread would, between two buffers

    verdict = verify_file(
        path,
        expected_digest=digest,
        expected_size_bytes=len(data),
        progress=progress,
        cancelled=cancel.is_set,
    )
    assert not verdict.ok and verdict.reason is Reason.CANCELLED
    assert seen[-1] == 128 * 1024


def _reason_in_a_child(path: Path, digest: str, size: int, *, as_uid: int | None) -> str:
    """``verify_file``'s reason in a forked child: as ``as_uid``, or with no descriptor free."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if as_uid is not None:
                os.setgroups([])
                os.setgid(as_uid)
                os.setuid(as_uid)
            else:
                highest = max(int(name) for name in os.listdir("/proc/self/fd"))
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, limit))
                with contextlib.suppress(OSError):
                    while True:
                        os.open(os.devnull, os.O_RDONLY)
            verdict = verify_file(path, expected_digest=digest, expected_size_bytes=size)
            os.write(write_end, verdict.reason.value.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.unit
@pytest.mark.data_integrity
def test_a_file_that_is_there_but_cannot_be_read_is_no_missing_file(tmp_path: Path) -> None:
    # Every OSError had been file_not_found, and pull removes a stored blob it is told is
    # missing: too many open files (a real EMFILE) or no permission is no absent file.
    path, data, digest = write_model(tmp_path, 10_000)
    assert _reason_in_a_child(path, digest, len(data), as_uid=None) == "store_error"
    if os.geteuid() == 0:
        tmp_path.chmod(0o755)
        path.chmod(0o600)
        assert _reason_in_a_child(path, digest, len(data), as_uid=65534) == "store_error"
    path.unlink()
    assert _reason_in_a_child(path, digest, len(data), as_uid=None) == "file_not_found"


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="a process limit that binds needs another user")
def test_no_thread_to_hash_with_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    # The hash runs in a worker thread; one that could not be started (a process limit, no
    # memory) had raised RuntimeError out of verify_file, which never raises on I/O errors,
    # and out of pull.
    directory = Path(tempfile.mkdtemp())  # one another user can reach
    directory.chmod(0o755)
    path, data, digest = write_model(directory, 10_000)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            # This process alone reaches the limit: no thread can start.
            resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
            try:
                answer = verify_file(path, expected_digest=digest, expected_size_bytes=len(data))
                os.write(write_end, answer.reason.value.encode())
            except Exception as error:
                os.write(write_end, type(error).__name__.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    shutil.rmtree(directory)
    assert answer == "store_error"


@pytest.fixture
def read_only_bind() -> Iterator[tuple[Path, Path]]:
    """A directory another user can reach, and a read-only bind mount of it: (writable, ro)."""
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    writable, read_only = base / "writable", base / "read-only"
    writable.mkdir(mode=0o755)
    read_only.mkdir()
    bind = subprocess.run(
        ["mount", "--bind", str(writable), str(read_only)], capture_output=True, check=False
    )
    if bind.returncode != 0:
        shutil.rmtree(base)
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(read_only)], capture_output=True, check=True
        )
        yield writable, read_only
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
        shutil.rmtree(base)


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user needs root")
def test_a_read_only_bind_mount_of_a_writable_directory_is_no_read_only_file_system(
    read_only_bind: tuple[Path, Path],
) -> None:
    # Another user's file read through a read-only bind mount (docker's -v ...:ro) had counted
    # as on a read-only mount, which no one can change; its owner still writes it through the
    # directory the mount shows, and the runtime loads what they wrote.
    writable, read_only = read_only_bind
    path, data, digest = write_model(writable, 10_000)
    os.chown(path, 65534, 65534)
    seen = read_only / path.name
    verdict = verify_file(seen, expected_digest=digest, expected_size_bytes=len(data), private=True)
    assert verdict.reason is Reason.STORE_ERROR
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with open(path, "r+b") as theirs:
                theirs.write(b"other bytes")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert seen.read_bytes().startswith(b"other bytes")


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="a file of root's seen by another user needs root")
def test_root_s_file_only_root_may_write_is_used_through_a_read_only_bind_mount(
    read_only_bind: tuple[Path, Path],
) -> None:
    # A model baked into an image, in a container whose root file system is a read-only
    # bind mount (docker's --read-only), run as another user: only root can write the file,
    # through any mount.
    writable, read_only = read_only_bind
    path, data, digest = write_model(writable, 10_000)
    path.chmod(0o644)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            verdict = verify_file(
                read_only / path.name,
                expected_digest=digest,
                expected_size_bytes=len(data),
                private=True,
            )
            os.write(write_end, verdict.reason.value.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    assert answer == "ok"


@pytest.fixture
def layers() -> Iterator[Path]:
    """A tmpfs of its own, which another user can reach, to hold an overlay's lower layers."""
    mount_point = Path(tempfile.mkdtemp())
    mount_point.chmod(0o755)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="an overlay and a file of another user need root")
@pytest.mark.parametrize("second_layer", ["same file system", "another file system"])
def test_another_user_s_file_in_a_read_only_overlay_is_no_file_no_one_can_change(
    layers: Path, tmp_path: Path, second_layer: str
) -> None:
    # An overlay with lower layers only is read-only in its superblock, yet each lower layer
    # stays writable where it is, and the overlay shows what its owner writes there at once.
    # With both layers on one file system the file showed the overlay's own device, read-only
    # in mountinfo; with the layers on two, a device no mount names: either way another
    # user's file had counted as one no one could change.
    lower = layers / "lower"
    lower.mkdir(mode=0o755)
    path, data, digest = write_model(lower, 10_000)
    os.chown(path, 65534, 65534)
    second = layers / "second" if second_layer == "same file system" else tmp_path / "second"
    second.mkdir()
    shown = tmp_path / "overlay"
    shown.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}:{second}", str(shown)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount an overlay here")
    try:
        seen = shown / path.name
        verdict = verify_file(
            seen, expected_digest=digest, expected_size_bytes=len(data), private=True
        )
        assert verdict.reason is Reason.STORE_ERROR
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with open(path, "r+b") as theirs:
                    theirs.write(b"other bytes")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert seen.read_bytes().startswith(b"other bytes")
    finally:
        subprocess.run(["umount", "-l", str(shown)], check=False)


#: The owner of a disk image, neither root nor the user the test verifies as (nobody).
IMAGE_OWNER = 4242


@pytest.fixture(
    params=[4243, 0, 65534], ids=["another user's file", "root's file", "the user's own file"]
)
def disk_image(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """An ext4 image holding a model (another user's, root's, or nobody's, the user the tests
    verify as), and where it is mounted
    read-only through a loop device: (image, mount point)."""
    with _mounted_image(request.param) as (image, shown):
        yield image, shown


@contextlib.contextmanager
def _mounted_image(
    file_owner: int, *, over_a_block_device: bool = False
) -> Iterator[tuple[Path, Path]]:
    """An ext4 image holding a model of ``file_owner``'s, mounted read-only through a loop
    device, or through a loop device over another one: (image, mount point)."""
    if any(shutil.which(tool) is None for tool in ("mkfs.ext4", "findmnt", "blockdev")):
        pytest.skip("no mkfs.ext4, findmnt or blockdev to make and look at an image with")
    if over_a_block_device and shutil.which("losetup") is None:
        pytest.skip("no losetup to put a loop device over a block device with")
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    content, image, shown = base / "content", base / "disk.img", base / "mounted"
    content.mkdir()
    shown.mkdir()
    path, _data, _digest = write_model(content, 10_000)
    path.chmod(0o644)
    os.chown(path, file_owner, file_owner)
    with open(image, "wb") as handle:
        handle.truncate(4 * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-d", str(content), str(image)], capture_output=True, check=False
    )
    lower = ""
    if over_a_block_device and made.returncode == 0:
        lower = subprocess.run(
            ["losetup", "-f", "--show", "-r", str(image)], capture_output=True, text=True
        ).stdout.strip()
    source = lower or str(image)
    mounted = subprocess.run(
        ["mount", "-o", "ro,loop", source, str(shown)], capture_output=True, check=False
    )
    try:
        if made.returncode != 0 or mounted.returncode != 0:
            pytest.skip("cannot make or mount an ext4 image here (needs root and loop devices)")
        yield image, shown
    finally:
        subprocess.run(["umount", "-l", str(shown)], check=False)
        if lower:
            subprocess.run(["losetup", "-d", lower], check=False)
        shutil.rmtree(base)


def _as_another_user(uid: int, act: Callable[[], object]) -> str:
    """Run ``act`` in a child as ``uid`` (its own group alone); what it returned, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_end, str(act()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a loop device and another user's image need root")
def test_a_read_only_mount_of_a_disk_image_another_user_may_write_is_no_read_only_file_system(
    disk_image: tuple[Path, Path],
) -> None:
    # ext4 on a loop device, read-only in its superblock: nothing writes through the mount,
    # but the image's owner rewrites its blocks, and the mount shows them once the cache
    # lets go of the old ones. A file there had counted as one no one could change, another
    # user's and root's alike; and one the image names as the user's own, as one only the
    # user could change.
    image, shown = disk_image
    data, digest = model_bytes(10_000)
    seen = shown / "model.bin"

    def verdict() -> str:
        answer = verify_file(
            seen, expected_digest=digest, expected_size_bytes=len(data), private=True
        )
        return answer.reason.value

    os.chown(image, IMAGE_OWNER, IMAGE_OWNER)
    image.chmod(0o644)
    assert _as_another_user(65534, verdict) == "store_error"
    # An image only root may write is a read-only file system as before.
    os.chown(image, 0, 0)
    assert _as_another_user(65534, verdict) == "ok"
    # What the refusal is about: the image's owner really changes what the mount shows.
    os.chown(image, IMAGE_OWNER, IMAGE_OWNER)
    offset = image.read_bytes().index(data[:4096])

    def overwrite() -> None:
        with open(image, "r+b") as theirs:
            theirs.seek(offset)
            theirs.write(b"other bytes")

    _as_another_user(IMAGE_OWNER, overwrite)
    loop = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(shown)], capture_output=True, text=True, check=True
    ).stdout.strip()
    with open(seen, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    subprocess.run(["blockdev", "--flushbufs", loop], check=True)
    assert seen.read_bytes().startswith(b"other bytes")


#: A user whose group is theirs alone: no account has it as its primary group or lists it.
OWN_GROUP_USER = 4244


def _verdict_as(uid: int, seen: Path) -> str:
    data, digest = model_bytes(10_000)
    return _as_another_user(
        uid,
        lambda: (
            verify_file(
                seen, expected_digest=digest, expected_size_bytes=len(data), private=True
            ).reason.value
        ),
    )


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="a loop device and another user's file need root")
def test_a_disk_image_the_user_s_own_group_may_write_is_the_user_s_own() -> None:
    # Under umask 002 (the per-user groups of Fedora and Ubuntu) the user's own image file is
    # group-writable for their own group, which the store's directories may be: a model on
    # it had been refused before every start.
    with _mounted_image(OWN_GROUP_USER) as (image, shown):
        os.chown(image, OWN_GROUP_USER, OWN_GROUP_USER)
        image.chmod(0o664)
        assert _verdict_as(OWN_GROUP_USER, shown / "model.bin") == "ok"
        # A group of someone else's that may write the image is another writer.
        os.chown(image, OWN_GROUP_USER, OWN_GROUP_USER + 1)
        assert _verdict_as(OWN_GROUP_USER, shown / "model.bin") == "store_error"


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and another user's image need root")
def test_a_loop_device_over_a_block_device_is_judged_by_what_lies_under_that() -> None:
    # A loop device's backing file may be a block device (losetup /dev/sdb1, another loop
    # device): it had been taken for an image no one could vouch for, and the user's own
    # model on it refused before every start.
    with _mounted_image(OWN_GROUP_USER, over_a_block_device=True) as (image, shown):
        os.chown(image, OWN_GROUP_USER, OWN_GROUP_USER)
        image.chmod(0o644)
        assert _verdict_as(OWN_GROUP_USER, shown / "model.bin") == "ok"
        # Another user's image under the lower loop device still writes what the mount shows.
        os.chown(image, IMAGE_OWNER, IMAGE_OWNER)
        assert _verdict_as(OWN_GROUP_USER, shown / "model.bin") == "store_error"


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a FUSE daemon of another user needs root")
def test_a_file_another_user_s_fuse_daemon_serves_is_no_file_only_the_user_can_change() -> None:
    # A FUSE daemon answers every read and names every file's owner: one run by another user
    # (bindfs here) showed a file as the user's own, read-only, and it had counted as one
    # only the user could change, while the daemon's owner changed it at will.
    if shutil.which("bindfs") is None or shutil.which("setpriv") is None:
        pytest.skip("no bindfs or setpriv to run a FUSE daemon with")
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    source, shown = base / "source", base / "shown"
    source.mkdir(mode=0o755)
    shown.mkdir(mode=0o755)
    path, data, digest = write_model(source, 10_000)
    path.chmod(0o644)
    os.chown(source, IMAGE_OWNER, IMAGE_OWNER)
    os.chown(path, IMAGE_OWNER, IMAGE_OWNER)
    # The daemon runs as IMAGE_OWNER; the capabilities only let it open /dev/fuse and mount.
    daemon = ["setpriv", f"--reuid={IMAGE_OWNER}", f"--regid={IMAGE_OWNER}", "--clear-groups"]
    daemon += ["--inh-caps=+sys_admin,+dac_override", "--ambient-caps=+sys_admin,+dac_override"]
    daemon += ["bindfs", "-o", "allow_other", "--force-user=65534", "--force-group=65534"]
    mounted = subprocess.run([*daemon, str(source), str(shown)], capture_output=True, check=False)
    if mounted.returncode != 0:
        shutil.rmtree(base)
        pytest.skip("cannot mount a FUSE file system here")
    try:
        seen = shown / path.name
        assert seen.stat().st_uid == 65534
        answer = _as_another_user(
            65534,
            lambda: (
                verify_file(
                    seen, expected_digest=digest, expected_size_bytes=len(data), private=True
                ).reason.value
            ),
        )
        assert answer == "store_error"
        with open(path, "r+b") as theirs:  # what the daemon's owner may do at any time
            theirs.write(b"other bytes")
        assert seen.read_bytes().startswith(b"other bytes")
    finally:
        subprocess.run(["umount", str(shown)], check=False)
        shutil.rmtree(base)


def test_a_file_with_no_bytes_to_give_for_now_is_unreadable_not_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read non-blocking, such a file (/proc/kmsg, a file in user space) answers None, which
    # was taken for its end: the file was judged on what came before it (size_mismatch), a
    # verdict about bytes that were never read.
    data, digest = model_bytes(64 * 1024)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    monkeypatch.setattr(
        filehash,
        "open",
        opener_that_would_block(open, inode=path.stat().st_ino, given=data[:1000]),
        raising=False,
    )
    verdict = verify_file(path, expected_digest=digest, expected_size_bytes=len(data))
    assert verdict.reason is Reason.STORE_ERROR
