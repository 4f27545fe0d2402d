"""Whether a directory, and every directory above it, is one no one else can change.

Whoever can write a directory can rename or remove its entries: a directory the store or the
session state lives in, if others could write it, lets them move the whole tree aside and put
one of their own at its path, between a check and the use that relies on it. The rule the
store and the state directory share:

* a directory that holds the files themselves must be the user's and writable by no one else
  (:func:`writable_by_no_one_else`, the user's own group aside);
* every directory above it, as written and as its symlinks resolve, must be the user's or
  root's, and writable by no one else unless it is sticky like ``/tmp``, where an entry is
  renamed or removed only by its owner (:func:`ancestors_hold_no_one_else_s_entries`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "ancestors_hold_no_one_else_s_entries",
    "holds_no_one_else_s_entries",
    "writable_by_no_one_else",
]


def writable_by_no_one_else(info: os.stat_result) -> bool:
    """Whether no one but the owner can write this directory, beyond the user's own group.

    Group write is allowed when the group is the user's own (primary) one: with the usual
    per-user groups (umask 002) a directory made by hand has it.
    """
    if info.st_mode & stat.S_IWOTH:
        return False
    return not info.st_mode & stat.S_IWGRP or info.st_gid == os.getegid()


def holds_no_one_else_s_entries(info: os.stat_result, uid: int) -> bool:
    """Whether only this user (or root) can rename or remove the entries of this directory."""
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, 0):
        return False
    # Sticky (/tmp): an entry is renamed or removed only by its owner, the directory's owner
    # (this user or root) or root.
    return bool(info.st_mode & stat.S_ISVTX) or writable_by_no_one_else(info)


def ancestors_hold_no_one_else_s_entries(path: Path, uid: int) -> bool:
    """Whether every directory above ``path``, as written and as its symlinks resolve, passes
    :func:`holds_no_one_else_s_entries`.

    Raises ``OSError`` when one cannot be looked at, and ``RuntimeError`` for a symlink loop
    (Python before 3.13). A symlink met half-way through another symlink's target is not
    followed up.
    """
    above = [*path.absolute().parents, *path.resolve().parents]
    return all(
        holds_no_one_else_s_entries(directory.stat(), uid) for directory in dict.fromkeys(above)
    )
