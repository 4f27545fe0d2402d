"""The content-addressed store: layout, root precedence, atomic read-only publish, locks."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from companion_runtime.bind.directory_trust import ancestors_hold_no_one_else_s_entries
from companion_runtime.bind.store import (
    STORE_ENV_VAR,
    ModelStore,
    StoreError,
    default_store_root,
)
from companion_runtime.core import Reason
from tests.support.acl import grant_by_acl, grant_write_by_acl

DIGEST = "cd" * 32
OTHER_UID = 65534


@pytest.mark.unit
def test_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_ENV_VAR, raising=False)
    cache_default = default_store_root()
    assert cache_default.name == "models"
    assert "companion-runtime" in str(cache_default)
    assert default_store_root({STORE_ENV_VAR: str(tmp_path / "env")}) == tmp_path / "env"
    monkeypatch.setenv(STORE_ENV_VAR, str(tmp_path / "env"))
    assert ModelStore().root == tmp_path / "env"
    assert ModelStore(tmp_path / "explicit").root == tmp_path / "explicit"


@pytest.mark.unit
def test_a_home_of_no_user_is_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = "~no-such-user-companion-runtime/models"
    with pytest.raises(StoreError) as caught:
        ModelStore(nobody)
    assert caught.value.reason is Reason.STORE_ERROR
    assert str(caught.value) == "store_error"
    monkeypatch.setenv(STORE_ENV_VAR, nobody)
    with pytest.raises(StoreError):
        ModelStore()


@pytest.mark.unit
def test_a_root_with_a_nul_in_it_is_a_store_error(tmp_path: Path) -> None:
    # No file can have such a name: every lookup raised ValueError out of ensure_layout and
    # stored_blob, a traceback instead of a refusal.
    with pytest.raises(StoreError) as caught:
        ModelStore(tmp_path / "store\0root").ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR
    assert default_store_root({STORE_ENV_VAR: f"{tmp_path}/a"}) == tmp_path / "a"
    with pytest.raises(StoreError):
        default_store_root({STORE_ENV_VAR: f"{tmp_path}/a\0b"})


@pytest.mark.unit
def test_layout_and_paths(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "s")
    store.ensure_layout()
    for directory in (store.blobs_dir, store.tmp_dir, store.locks_dir):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert store.blob_path(DIGEST) == tmp_path / "s" / "blobs" / f"sha256-{DIGEST}"
    assert store.partial_path(DIGEST).parent == store.tmp_dir
    assert store.lock_path(DIGEST).parent == store.locks_dir
    assert not store.has_blob(DIGEST)


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.parametrize("digest", ["CD" * 32, "cd" * 31, "../" + "a" * 61, "", 5])
def test_bad_digest_never_becomes_a_path(tmp_path: Path, digest: object) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError) as caught:
        store.blob_path(digest)  # type: ignore[arg-type]
    assert caught.value.reason is Reason.MALFORMED_SPEC
    assert str(caught.value) == "malformed_spec"


@pytest.mark.unit
@pytest.mark.data_integrity
def test_publish_is_atomic_and_read_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ensure_layout()
    temp = store.partial_path(DIGEST)
    temp.write_bytes(b"verified bytes")
    path = store.publish(temp, DIGEST)
    assert path == store.blob_path(DIGEST)
    assert path.read_bytes() == b"verified bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not temp.exists()
    assert store.has_blob(DIGEST)
    store.remove_blob(DIGEST)
    assert not store.has_blob(DIGEST)
    store.remove_blob(DIGEST)  # idempotent


@pytest.mark.unit
def test_publish_of_a_missing_file_is_a_store_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ensure_layout()
    with pytest.raises(StoreError) as caught:
        store.publish(store.partial_path(DIGEST), DIGEST)
    assert caught.value.reason is Reason.STORE_ERROR
    assert not store.has_blob(DIGEST)


@pytest.mark.unit
def test_unwritable_root_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError) as caught:
        ModelStore(blocker / "store").ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.unit
@pytest.mark.security
def test_a_store_everyone_can_write_to_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ModelStore(root).ensure_layout()
    root.chmod(0o777)
    with pytest.raises(StoreError) as caught:
        ModelStore(root).ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR
    root.chmod(0o700)
    (root / "blobs").chmod(0o1777)
    with pytest.raises(StoreError):
        ModelStore(root).ensure_layout()


@pytest.mark.unit
def test_a_group_writable_root_and_a_symlinked_root_are_accepted(tmp_path: Path) -> None:
    # "mkdir ~/models" under the common umask 002 makes a group-writable directory; a root
    # that is a symlink to another disk is a choice of the user's.
    real = tmp_path / "disk" / "models"
    real.mkdir(parents=True)
    real.chmod(0o770)
    link = tmp_path / "models"
    link.symlink_to(real)
    ModelStore(link).ensure_layout()
    assert (real / "blobs").is_dir()


@pytest.mark.unit
@pytest.mark.security
def test_a_symlinked_store_directory_is_refused(tmp_path: Path) -> None:
    # blobs/ pointing elsewhere would publish verified models wherever the link goes.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    (root / "blobs").symlink_to(elsewhere)
    with pytest.raises(StoreError):
        ModelStore(root).ensure_layout()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_store_of_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ModelStore(root).ensure_layout()
    os.chown(root, 65534, 65534)
    with pytest.raises(StoreError):
        ModelStore(root).ensure_layout()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.parametrize("mode", [0o777, 0o773, 0o757], ids=["all", "others", "others-no-read"])
@pytest.mark.parametrize("through", ["path", "symlink"])
def test_a_store_inside_a_directory_others_can_write_to_is_refused(
    tmp_path: Path, mode: int, through: str
) -> None:
    # Whoever can rename entries of a directory above the store can move the whole store
    # aside and put one of their own at its path, with other bytes at the blob's name, after
    # the re-verify and before the runtime opens it. The store had been accepted since its
    # own directories were this user's.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    real = shared / "models"
    root = real if through == "path" else tmp_path / "models"
    if through == "symlink":
        real.mkdir(mode=0o700)
        root.symlink_to(real)
    with pytest.raises(StoreError) as caught:
        ModelStore(root).ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR
    shared.chmod(mode | stat.S_ISVTX)  # sticky, like /tmp: only an entry's owner renames it
    ModelStore(root).ensure_layout()
    shared.chmod(0o775)  # group write on a directory of this user's own: its own group
    ModelStore(root).ensure_layout()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_store_inside_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    # Its owner can rename the store away whatever its mode, and make it writable at will.
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StoreError):
        ModelStore(theirs / "models").ensure_layout()
    os.chown(theirs, 0, 65534)
    theirs.chmod(0o775)  # root's, but another group may write: its members could rename it
    with pytest.raises(StoreError):
        ModelStore(theirs / "models").ensure_layout()
    theirs.chmod(0o755)
    ModelStore(theirs / "models").ensure_layout()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a group other than the user's needs root")
def test_a_store_another_group_can_write_to_is_refused(tmp_path: Path) -> None:
    # Group write is for the user's own group (umask 002 with per-user groups); the members of
    # another group could swap the blobs.
    root = tmp_path / "store"
    ModelStore(root).ensure_layout()
    for directory in (root, root / "blobs"):
        os.chown(directory, os.geteuid(), 65534)
        directory.chmod(0o770)
        with pytest.raises(StoreError):
            ModelStore(root).ensure_layout()
        os.chown(directory, os.geteuid(), os.getegid())
        ModelStore(root).ensure_layout()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_a_store_reached_through_a_symlink_in_a_directory_others_can_write_to_is_refused(
    tmp_path: Path, target: str
) -> None:
    # ~/models -> /shared/disk/models, where /shared/disk is a symlink to a safe directory
    # but /shared is writable by anyone: they could point "disk" elsewhere. The directory
    # holding "disk" is neither above the root as written nor above where it resolves, and
    # had not been looked at.
    safe = tmp_path / "safe"
    (safe / "models").mkdir(parents=True, mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "disk").symlink_to(safe if target == "absolute" else Path("..") / "safe")
    home = tmp_path / "home"
    home.mkdir()
    root = home / "models"
    root.symlink_to(shared / "disk" / "models" if target == "absolute" else "../shared/disk/models")
    with pytest.raises(StoreError) as caught:
        ModelStore(root).ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR
    shared.chmod(0o1777)  # sticky, like /tmp: only the symlink's owner can replace it
    ModelStore(root).ensure_layout()
    assert (safe / "models" / "blobs").is_dir()


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a symlink of another user needs root")
@pytest.mark.parametrize("depth", ["root", "above"])
def test_a_store_through_another_user_s_symlink_in_a_sticky_directory_is_refused(
    tmp_path: Path, depth: str
) -> None:
    # In /tmp anyone may create a name first, and only its owner may rename it: another
    # user's symlink there, pointing into a directory of the user's own, passed (the walk
    # looked at where it leads), and its owner could point it elsewhere at any time.
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mine = tmp_path / "mine"
    (mine / "models").mkdir(parents=True, mode=0o700)
    link = sticky / "link"
    link.symlink_to(mine / "models" if depth == "root" else mine)
    root = link if depth == "root" else link / "models"
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(StoreError) as caught:
        ModelStore(root).ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR
    os.lchown(link, os.geteuid(), os.getegid())  # the user's own symlink: theirs to change
    ModelStore(root).ensure_layout()


@pytest.mark.unit
@pytest.mark.security
def test_nothing_is_made_where_a_symlink_others_control_leads(tmp_path: Path) -> None:
    # The store's directories (and any missing on the way) had been made first and the
    # store refused afterwards: a symlink in a directory anyone can write sent the user's
    # mkdir into a directory of the user's own, or of root's when root pulled.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (shared / "models").symlink_to(mine)
    for root in (shared / "models", shared / "models" / "deeper" / "still"):
        with pytest.raises(StoreError) as caught:
            ModelStore(root).ensure_layout()
        assert caught.value.reason is Reason.STORE_ERROR
    assert list(mine.iterdir()) == []


@pytest.mark.unit
def test_a_store_through_a_symlink_loop_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(StoreError) as caught:
        ModelStore(tmp_path / "a" / "models").ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.parametrize("where", ["root", "blobs", "above"])
def test_a_store_an_acl_lets_another_user_write_to_is_refused(tmp_path: Path, where: str) -> None:
    # An access ACL naming another user turns the group bits into its mask: the directory
    # showed as group-writable by the user's own group (rwxrwx---) and was accepted, while the
    # user the ACL names could rename blobs/ away and put a directory of their own there.
    above = tmp_path / "above"
    above.mkdir(mode=0o755)
    root = above / "models"
    ModelStore(root).ensure_layout()
    target = {"root": root, "blobs": root / "blobs", "above": above}[where]
    grant_write_by_acl(target, OTHER_UID)
    info = target.stat()
    assert info.st_mode & stat.S_IWGRP and info.st_gid == os.getegid()
    with pytest.raises(StoreError) as caught:
        ModelStore(root).ensure_layout()
    assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.unit
def test_a_store_an_acl_lets_another_user_only_read_is_accepted(tmp_path: Path) -> None:
    # A default ACL above (say, a backup user's r-x on the home directory) gives every
    # directory made below it an access ACL; with umask 002 its mask shows rwx, though no one
    # it names may write.
    root = tmp_path / "models"
    root.mkdir()
    grant_by_acl(root, OTHER_UID, 0o5)
    assert root.stat().st_mode & stat.S_IWGRP and root.stat().st_gid == os.getegid()
    ModelStore(root).ensure_layout()
    grant_by_acl(root, os.geteuid(), 0o7)  # the user named in their own ACL
    ModelStore(root).ensure_layout()


def _as_other_user(gid: int, act: Callable[[], object], uid: int = OTHER_UID) -> str:
    """Run ``act`` in a child as ``uid`` with ``gid`` its only group; ``ok`` or what it
    raised (a reason code, or the exception's name)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                act()
                answer = "ok"
            except StoreError as error:
                answer = error.reason.value
            except Exception as error:
                answer = type(error).__name__
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answers:
        answer = answers.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user and group needs root")
def test_group_write_for_a_group_other_accounts_have_as_theirs_is_refused() -> None:
    # Group write had been allowed whenever the group was the process's effective one. Where
    # accounts share a primary group (``users`` for every account on some distributions;
    # ``nogroup`` here) or after ``newgrp``, another account of that group could rename
    # blobs/ away and put a directory of its own there.
    others = [account for account in pwd.getpwall() if account.pw_uid not in (0, OTHER_UID)]
    if not others:
        pytest.skip("no other account to share a primary group with")
    other = others[0]
    shared = other.pw_gid
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        root = base / "models"
        ModelStore(root).ensure_layout()
        for directory in (root, root / "blobs", root / "tmp", root / "locks"):
            os.chown(directory, OTHER_UID, shared)
        root.chmod(0o770)
        assert _as_other_user(shared, ModelStore(root).ensure_layout) == "store_error"
        # What the refusal is about: the other account really can.
        moved = _as_other_user(
            shared, lambda: (root / "blobs").rename(root / "moved"), uid=other.pw_uid
        )
        assert moved == "ok"
        (root / "moved").rename(root / "blobs")
        # A group no account has as its own and that names no member is the user's alone.
        taken = {account.pw_gid for account in pwd.getpwall()}
        taken |= {group.gr_gid for group in grp.getgrall()}
        alone = next(gid for gid in range(20_000, 2**31) if gid not in taken)
        for directory in (root, root / "blobs", root / "tmp", root / "locks"):
            os.chown(directory, OTHER_UID, alone)
        assert _as_other_user(alone, ModelStore(root).ensure_layout) == "ok"
    finally:
        shutil.rmtree(base)


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user and group needs root")
def test_group_write_for_root_s_group_run_as_another_user_is_accepted() -> None:
    # A process run as another user with group 0 (OpenShift's way) had its store refused
    # because root's own account has group 0: root may write anything anyway.
    sharing = [account for account in pwd.getpwall() if account.pw_gid == 0 and account.pw_uid]
    if sharing or any(member != "root" for member in grp.getgrgid(0).gr_mem):
        pytest.skip("accounts other than root share group 0 here")
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        root = base / "models"
        ModelStore(root).ensure_layout()
        for directory in (root, root / "blobs", root / "tmp", root / "locks"):
            os.chown(directory, OTHER_UID, 0)
        root.chmod(0o770)
        assert _as_other_user(0, ModelStore(root).ensure_layout) == "ok"
    finally:
        shutil.rmtree(base)


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="a group-writable way only root's group has")
def test_the_accounts_are_read_once_per_check_however_many_directories_group_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whether a group is the user's own is a full enumeration of the accounts: a directory
    # service with tens of thousands (or one that does not answer, and times out) had been
    # enumerated again for every group-writable directory on the way, nine times over for a
    # store three such directories deep, before every pull and every start.
    sharing = [account for account in pwd.getpwall() if account.pw_gid == 0 and account.pw_uid]
    if sharing or any(member != "root" for member in grp.getgrgid(0).gr_mem):
        pytest.skip("accounts other than root share group 0 here")
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        deep = base / "a" / "b" / "c"
        deep.mkdir(parents=True)
        for directory in (base / "a", base / "a" / "b", deep):
            os.chown(directory, 0, 0)
            directory.chmod(0o770)
        enumerations = []
        enumerate_accounts = pwd.getpwall

        def counted() -> list[pwd.struct_passwd]:
            enumerations.append(1)
            return enumerate_accounts()

        monkeypatch.setattr(pwd, "getpwall", counted)
        store = ModelStore(deep / "models")
        store.ensure_layout()
        assert len(enumerations) == 1
        enumerations.clear()
        assert ancestors_hold_no_one_else_s_entries(store.blobs_dir, 0)
        assert len(enumerations) == 1
        # Each check reads them afresh: an account added since counts at the next one.
        store.ensure_layout()
        assert len(enumerations) == 2
    finally:
        shutil.rmtree(base)


@pytest.mark.unit
def test_free_bytes_reports_the_file_system(tmp_path: Path) -> None:
    # Of the nearest existing parent. Other processes may write to the same file system
    # between the two readings, hence the slack (far below any file system's size).
    store = ModelStore(tmp_path / "not" / "yet")
    info = os.statvfs(tmp_path)
    assert abs(store.free_bytes() - info.f_bavail * info.f_frsize) <= 64 * 1024 * 1024


@pytest.mark.integration
def test_lock_excludes_a_second_thread(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ensure_layout()
    inside = threading.Event()
    order: list[str] = []

    def second() -> None:
        inside.wait()
        with store.lock(DIGEST):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with store.lock(DIGEST):
        inside.set()
        time.sleep(0.3)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


@pytest.mark.unit
def test_the_directories_the_store_makes_are_owner_only_whatever_the_umask(
    tmp_path: Path,
) -> None:
    # The root and any directory missing on the way to it had been made with the umask's
    # mode: rwxrwxr-x under umask 002, a store group-writable by the user's primary group,
    # refused where that group is not the user's alone, though the store had made it itself.
    root = tmp_path / "cache" / "companion-runtime" / "models"
    previous = os.umask(0o002)
    try:
        ModelStore(root).ensure_layout()
    finally:
        os.umask(previous)
    for directory in (tmp_path / "cache", root.parent, root, root / "blobs", root / "tmp"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
