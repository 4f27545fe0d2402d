"""Whether anyone but the owner may write a file or directory: its mode bits, its access ACL,
and whether the group that may write it is the user's own.

Shared by the rule for the store's directories (``directory_trust``) and the one for the disk
image a file system lies on (``read_only_file_system``): the user's own group may write
either, no one else may.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
import struct
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Final

__all__ = ["accounts_read_once", "writable_by_no_one_else"]

#: Within :func:`accounts_read_once`, whether each group asked about is the user's own.
_OWN_GROUP_ANSWERS: ContextVar[dict[int, bool] | None] = ContextVar(
    "own_group_answers", default=None
)


@contextlib.contextmanager
def accounts_read_once() -> Iterator[None]:
    """Within it (in this thread), the account databases are read once per group asked about,
    however many directories on the way that group may write.

    Reading them is a full enumeration of every account (``getpwall``): with a directory
    service that enumerates, tens of thousands of entries, or its timeouts when it does not
    answer, once for every group-writable directory a check meets. Nested uses share the
    outermost one's answers.
    """
    if _OWN_GROUP_ANSWERS.get() is not None:
        yield
        return
    token = _OWN_GROUP_ANSWERS.set({})
    try:
        yield
    finally:
        _OWN_GROUP_ANSWERS.reset(token)


#: The extended attribute a POSIX access ACL is stored in (Linux), and how: a version, then
#: (tag, permissions, id) entries, little-endian. The kernel keeps none for an ACL the mode
#: bits say all of.
_ACCESS_ACL: Final = "system.posix_acl_access"
_ACL_VERSION: Final = 2
_ACL_ENTRY: Final = struct.Struct("<HHI")
#: The entries that may give someone other than the owner write: a named user, the owning
#: group, a named group (the others' entry is the mode's own bits).
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP = 0x02, 0x04, 0x08
#: What ``getxattr`` answers when there is no such ACL, or no ACLs on that file system.
_NO_ACL: Final = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def writable_by_no_one_else(info: os.stat_result, path: Path) -> bool:
    """Whether no one but the owner can write the directory or file at ``path`` (``info`` is
    its ``stat``), beyond the user and the user's own group.

    Group write is allowed when the group is the user's own (:func:`_own_group`): with the
    usual per-user groups (umask 002) a directory made by hand has it. With an access ACL the
    group bits are its mask, and a ``w`` there may be a named user's or group's
    (``setfacl -m u:someone:rwx``): then no entry but the user's and the user's own group's
    may have write. Raises ``OSError`` when the ACL cannot be looked at.
    """
    if info.st_mode & stat.S_IWOTH:
        return False
    if not info.st_mode & stat.S_IWGRP:
        return True
    entries = _access_acl(path)
    if entries is None:
        return _own_group(info.st_gid)
    for tag, permissions, entry_id in entries:
        if not permissions & 0o2:
            continue
        if tag == _ACL_USER and entry_id != os.geteuid():
            return False
        if tag == _ACL_GROUP_OBJ and not _own_group(info.st_gid):
            return False
        if tag == _ACL_GROUP and not _own_group(entry_id):
            return False
    return True


def _own_group(gid: int) -> bool:
    """Whether ``gid`` is the user's own group: the effective one, and no one else's but
    root's, as far as the account databases tell: no other account has it as its primary
    group, and it names no other member.

    The effective group alone is not enough: where every account's primary group is one
    shared group (``users`` on some distributions), or after ``newgrp``/``sg``, its other
    members may write whatever it may.
    """
    if gid != os.getegid():
        return False
    answers = _OWN_GROUP_ANSWERS.get()
    if answers is None:
        return _no_one_else_s_group(gid)
    if gid not in answers:
        answers[gid] = _no_one_else_s_group(gid)
    return answers[gid]


def _no_one_else_s_group(gid: int) -> bool:
    # Root may write anything anyway: root's account in the group (the root group itself,
    # a process run as another user with group 0, as OpenShift does) takes nothing away.
    trusted = (os.geteuid(), 0)
    accounts = pwd.getpwall()
    if any(account.pw_gid == gid and account.pw_uid not in trusted for account in accounts):
        return False
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:  # a group the group database does not name names no member
        return True
    trusted_names = {account.pw_name for account in accounts if account.pw_uid in trusted}
    return all(member in trusted_names for member in members)


def _access_acl(path: Path) -> list[tuple[int, int, int]] | None:
    """The entries of the directory's access ACL; ``None`` when it has none. An ACL in a
    form not known here is one entry that lets a named user (no one) write, so it is never
    taken for a harmless one."""
    try:
        value = os.getxattr(path, _ACCESS_ACL)
    except AttributeError:  # no xattr calls on this system (macOS): no POSIX ACL to read
        return None
    except OSError as error:
        if error.errno in _NO_ACL:
            return None
        raise
    unknown = [(_ACL_USER, 0o7, -1)]
    if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size:
        return unknown
    if int.from_bytes(value[:4], "little") != _ACL_VERSION:
        return unknown
    return list(_ACL_ENTRY.iter_unpack(value[4:]))
