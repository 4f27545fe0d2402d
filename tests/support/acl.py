"""Give another user write permission on a directory through a POSIX access ACL.

What ``setfacl -m u:<uid>:rwx`` does, written as the kernel stores it (the
``system.posix_acl_access`` extended attribute), so no ``acl`` package is needed. The mode's
group bits then show the ACL's mask (``rwx``), and the owning group is left as it was.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

__all__ = ["grant_by_acl", "grant_write_by_acl"]

_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def grant_write_by_acl(directory: Path, uid: int) -> None:
    """Let ``uid`` read, write and search ``directory``; skip the test where there are no
    POSIX ACLs (another system, or a file system without them)."""
    grant_by_acl(directory, uid, 0o7)


def grant_by_acl(directory: Path, uid: int, permissions: int) -> None:
    """Give ``uid`` these ``permissions`` (``0o7`` is ``rwx``) on ``directory``, with a mask
    of ``rwx`` and the owning group's ``rwx``, so the group bits show ``rwx`` either way; skip
    the test where there are no POSIX ACLs."""
    entries = [
        (_USER_OBJ, 0o7, _UNDEFINED_ID),
        (_USER, permissions, uid),
        (_GROUP_OBJ, 0o7, _UNDEFINED_ID),
        (_MASK, 0o7, _UNDEFINED_ID),
        (_OTHER, 0o0, _UNDEFINED_ID),
    ]
    value = struct.pack("<I", _VERSION) + b"".join(
        struct.pack("<HHI", tag, permissions, entry_id) for tag, permissions, entry_id in entries
    )
    try:
        os.setxattr(directory, "system.posix_acl_access", value)
    except AttributeError:
        pytest.skip("no extended attributes on this system")
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("no POSIX ACLs on this file system")
        raise
