"""Whether a directory, and every directory above it, is one no one else can change.

Whoever can write a directory can rename or remove its entries: a directory the store or the
session state lives in, if others could write it, lets them move the whole tree aside and put
one of their own at its path, between a check and the use that relies on it. The rule the
store and the state directory share:

* a directory that holds the files themselves must be the user's and writable by no one else
  (:func:`writable_by_no_one_else`, the user's own group aside; with an access ACL its group
  bits are the ACL's mask, so the ACL's entries are read: none but the user's own may write);
* every directory above it, as written and as its symlinks resolve, and every directory a
  symlink on the way lives in, must be the user's or root's, and writable by no one else
  unless it is sticky like ``/tmp``, where an entry is renamed or removed only by its owner:
  there the entry on the way (a symlink too) must be the user's or root's
  (:func:`ancestors_hold_no_one_else_s_entries`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

from companion_runtime.bind.read_only_file_system import file_system_read_only
from companion_runtime.bind.write_permission import accounts_read_once, writable_by_no_one_else

__all__ = [
    "ancestors_hold_no_one_else_s_entries",
    "holds_no_one_else_s_entries",
    "make_private_directories",
    "may_create_on_the_way_to",
    "writable_by_no_one_else",
]


def holds_no_one_else_s_entries(info: os.stat_result, uid: int, path: Path) -> bool:
    """Whether only this user (or root) can rename or remove the entries of the directory at
    ``path`` (``info`` is its ``stat``), or no one can: it lies on a file system read-only in
    its superblock that keeps its own bytes (:func:`file_system_read_only`), whoever owns
    it, as an image built by another user does."""
    if not stat.S_ISDIR(info.st_mode):
        return False
    # Sticky (/tmp): an entry is renamed or removed only by its owner, the directory's owner
    # (this user or root) or root.
    if info.st_uid in (uid, 0) and (
        info.st_mode & stat.S_ISVTX or writable_by_no_one_else(info, path)
    ):
        return True
    return file_system_read_only(info.st_dev)


def ancestors_hold_no_one_else_s_entries(path: Path, uid: int) -> bool:
    """Whether every directory above ``path``, as written and as its symlinks resolve, and
    every directory a name is looked up in on the way (a symlink's own directory, also one
    met half-way through another symlink's target), passes
    :func:`holds_no_one_else_s_entries`; and whether every entry met on the way in a sticky
    directory others may write (``/tmp``) is the user's or root's, since its owner may
    rename it, and, a symlink, point it elsewhere.

    Raises ``OSError`` when one cannot be looked at, or for a symlink loop (``ELOOP``), and
    ``RuntimeError`` for a symlink loop (Python before 3.13).
    """
    lookups = _lookups_on_the_way_to(path.absolute())
    above = [*path.absolute().parents, *path.resolve().parents, *(where for where, _ in lookups)]
    infos = {directory: directory.stat() for directory in dict.fromkeys(above)}
    with accounts_read_once():
        if not all(holds_no_one_else_s_entries(info, uid, where) for where, info in infos.items()):
            return False
        return all(
            entry.st_uid in (uid, 0) or not _sticky_and_shared(infos[where], where)
            for where, entry in lookups
        )


def may_create_on_the_way_to(path: Path, uid: int) -> bool:
    """Whether the directories missing on the way to ``path`` may be made: whether the
    nearest one that is there, and the way to it, pass the rule for ``path``'s parents.

    Checked before anything is made, so that nothing is made where a name someone else
    controls leads (their symlink sends the user's ``mkdir`` wherever they like), only to be
    refused afterwards. Raises as :func:`ancestors_hold_no_one_else_s_entries` does.
    """
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    with accounts_read_once():
        return holds_no_one_else_s_entries(
            existing.stat(), uid, existing
        ) and ancestors_hold_no_one_else_s_entries(existing, uid)


def make_private_directories(path: Path) -> None:
    """Make ``path`` and every directory missing on the way to it, each ``0700`` (an existing
    one is left as it is).

    ``Path.mkdir(parents=True)`` makes the missing parents with the umask's mode: under
    ``umask 002`` the store's own root came out group-writable, and was then refused where
    the user's primary group is not theirs alone (see :func:`writable_by_no_one_else`).
    Raises ``OSError`` as ``mkdir`` does.
    """
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made in the meantime: it is checked as any other


def _sticky_and_shared(info: os.stat_result, directory: Path) -> bool:
    """Sticky and writable by others, as ``/tmp``: each entry is its owner's to rename."""
    return bool(info.st_mode & stat.S_ISVTX) and not writable_by_no_one_else(info, directory)


#: How many symlinks a path may go through, as Linux allows (``MAXSYMLINKS``).
_MAX_SYMLINKS: Final = 40


def _lookups_on_the_way_to(path: Path) -> list[tuple[Path, os.stat_result]]:
    """Each lookup the kernel makes to reach the absolute ``path``, following its symlinks as
    it does: the directory (free of symlinks) a name is looked up in, and what the name is
    there (``lstat``). Whoever can rename an entry of such a directory can send the path
    elsewhere, be it a symlink half-way through another one's target."""
    lookups: list[tuple[Path, os.stat_result]] = []
    names = list(reversed(path.parts[1:]))
    current = Path(path.anchor)
    followed = 0
    while names:
        name = names.pop()
        if name == ".":
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        entry = candidate.lstat()
        lookups.append((current, entry))
        if not stat.S_ISLNK(entry.st_mode):
            current = candidate
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            current = Path(target.anchor)
        names.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return lookups
