"""Whether a directory, and every directory above it, is one no one else can change.

Whoever can write a directory can rename or remove its entries: a directory the store or the
session state lives in, if others could write it, lets them move the whole tree aside and put
one of their own at its path, between a check and the use that relies on it. The rule the
store and the state directory share:

* a directory that holds the files themselves must be the user's and writable by no one else
  (:func:`writable_by_no_one_else`, the user's own group aside, unless an access ACL names
  others: its group bits are then the ACL's mask, the most any named user or group may do);
* every directory above it, as written and as its symlinks resolve, and every directory a
  symlink on the way lives in, must be the user's or root's, and writable by no one else
  unless it is sticky like ``/tmp``, where an entry is renamed or removed only by its owner
  (:func:`ancestors_hold_no_one_else_s_entries`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "ancestors_hold_no_one_else_s_entries",
    "holds_no_one_else_s_entries",
    "writable_by_no_one_else",
]


#: The extended attribute a POSIX access ACL is stored in (Linux). The kernel keeps none for
#: an ACL the mode bits say all of, so one that is there names other users or groups.
_ACCESS_ACL: Final = "system.posix_acl_access"
#: What ``getxattr`` answers when there is no such ACL, or no ACLs on that file system.
_NO_ACL: Final = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def writable_by_no_one_else(info: os.stat_result, path: Path) -> bool:
    """Whether no one but the owner can write the directory at ``path`` (``info`` is its
    ``stat``), beyond the user's own group.

    Group write is allowed when the group is the user's own (primary) one: with the usual
    per-user groups (umask 002) a directory made by hand has it. Not when the directory has
    an access ACL: its group bits are then the ACL's mask, and a ``w`` there says a named user
    or group (``setfacl -m u:someone:rwx``) may write, whatever the owning group. Raises
    ``OSError`` when the ACL cannot be looked at.
    """
    if info.st_mode & stat.S_IWOTH:
        return False
    if not info.st_mode & stat.S_IWGRP:
        return True
    return info.st_gid == os.getegid() and not _has_access_acl(path)


def _has_access_acl(path: Path) -> bool:
    try:
        os.getxattr(path, _ACCESS_ACL)
    except AttributeError:  # no xattr calls on this system (macOS): no POSIX ACL to read
        return False
    except OSError as error:
        if error.errno in _NO_ACL:
            return False
        raise
    return True


def holds_no_one_else_s_entries(info: os.stat_result, uid: int, path: Path) -> bool:
    """Whether only this user (or root) can rename or remove the entries of the directory at
    ``path`` (``info`` is its ``stat``)."""
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, 0):
        return False
    # Sticky (/tmp): an entry is renamed or removed only by its owner, the directory's owner
    # (this user or root) or root.
    return bool(info.st_mode & stat.S_ISVTX) or writable_by_no_one_else(info, path)


def ancestors_hold_no_one_else_s_entries(path: Path, uid: int) -> bool:
    """Whether every directory above ``path``, as written and as its symlinks resolve, and
    every directory a name is looked up in on the way (a symlink's own directory, also one
    met half-way through another symlink's target), passes
    :func:`holds_no_one_else_s_entries`.

    Raises ``OSError`` when one cannot be looked at, or for a symlink loop (``ELOOP``), and
    ``RuntimeError`` for a symlink loop (Python before 3.13).
    """
    above = [
        *path.absolute().parents,
        *path.resolve().parents,
        *_directories_looked_up_in(path.absolute()),
    ]
    return all(
        holds_no_one_else_s_entries(directory.stat(), uid, directory)
        for directory in dict.fromkeys(above)
    )


#: How many symlinks a path may go through, as Linux allows (``MAXSYMLINKS``).
_MAX_SYMLINKS: Final = 40


def _directories_looked_up_in(path: Path) -> list[Path]:
    """The directories (free of symlinks) the kernel looks a name up in to reach the absolute
    ``path``, following its symlinks as it does: whoever can rename an entry of one of them
    can send the path elsewhere, be it a symlink half-way through another one's target."""
    looked_up_in: list[Path] = []
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
        looked_up_in.append(current)
        candidate = current / name
        if not stat.S_ISLNK(candidate.lstat().st_mode):
            current = candidate
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            current = Path(target.anchor)
        names.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return looked_up_in
