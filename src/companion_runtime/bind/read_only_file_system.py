"""Whether the bytes of a file system no one may write through any mount can still change.

A file system read-only in its superblock (not only in one mount: a read-only bind mount of a
writable directory is none) keeps its bytes as they are only when it holds them itself. Not
so overlayfs, whose lower layers are other file systems, written through their own mounts and
seen through the overlay at once; nor FUSE, whose daemon answers every read; nor a network
file system, whose server does. Nor a file system on a loop device (a disk image mounted with
``-o loop``, ``udisksctl loop-setup``) whose image file another user may write: its owner
rewrites the blocks, and the mount shows them as soon as the cache lets go of the old ones.

Linux only: ``/proc/self/mountinfo`` tells the superblock's options, its type and its source,
and ``/sys/dev/block`` what lies under a block device. Where they do not tell, no file system
counts as read-only, and none as lying on another user's image.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from companion_runtime.bind.write_permission import writable_by_no_one_else

__all__ = ["file_system_read_only", "on_no_file_of_another_user"]

#: File systems that keep their bytes on their own device (or in memory), which nothing but a
#: remount (root) makes writable again once the superblock is read-only.
_HOLDS_ITS_OWN_BYTES: Final = frozenset(
    {
        "btrfs",
        "cramfs",
        "erofs",
        "exfat",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "iso9660",
        "msdos",
        "ntfs3",
        "ramfs",
        "romfs",
        "squashfs",
        "tmpfs",
        "udf",
        "vfat",
        "xfs",
    }
)
#: How many block devices may be stacked (partition, device-mapper, loop) before the answer
#: is no.
_MAX_STACK: Final = 8
#: mountinfo writes a space, a tab, a newline and a backslash in a path as an octal escape.
_ESCAPE: Final = re.compile(r"\\([0-7]{3})")
_BLOCK_DEVICES: Final = Path("/sys/dev/block")


def file_system_read_only(device: int) -> bool:
    """Whether the file system on ``device`` (a file's ``st_dev``) is read-only in its
    superblock, holds its own bytes, and lies on no file another user may write (see the
    module docstring). False when that cannot be told: no ``/proc``, another system, or a
    device no mount names (a btrfs subvolume's; a file an overlay shows from a lower layer on
    another file system)."""
    mounts = _mounts_of(device)
    if not mounts:
        return False
    for file_system, _source, super_options in mounts:
        if file_system not in _HOLDS_ITS_OWN_BYTES or "ro" not in super_options:
            return False
    return _on_no_file_of_another_user(device, mounts[0][1], unknown=False)


def on_no_file_of_another_user(device: int) -> bool:
    """Whether the file system on ``device`` lies on no image file another user may write,
    and no other user's FUSE daemon serves it.

    For a file the owner field names as the user's own, or root's: that says who may write
    it only where the file system's bytes are its own; another user who may write the image
    it lies on writes whatever it holds, and a FUSE daemon names whatever owner it likes.
    True where nothing is known to lie under it (no ``/proc`` or ``/sys`` to tell, a device
    no mount names), false for an image that cannot be looked at.
    """
    own_daemon = {f"user_id={os.geteuid()}", "user_id=0"}
    mounts = _mounts_of(device)
    if not mounts:
        return True
    file_system, source, super_options = mounts[0]
    if file_system == "fuse" or file_system.startswith(("fuse.", "fuseblk")):
        # Whoever runs a FUSE daemon answers every read with bytes of their choosing, and
        # names every file's owner: the daemon must be this user's or root's. The kernel
        # records who mounted it (libfuse's user_id).
        return any(option in own_daemon for option in super_options)
    return _on_no_file_of_another_user(device, source, unknown=True)


def _mounts_of(device: int) -> list[tuple[str, str, list[str]]] | None:
    """Each mount of the file system on ``device``: its type, its source (escaped as
    mountinfo writes it) and its superblock's options; ``None`` without a mountinfo to read,
    and no mount at all for a line of a shape not known here."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as lines:
            text = lines.read()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    mounts: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        # "36 35 98:0 /root /mnt ro,noatime shared:1 - ext3 /dev/root rw,errors=continue":
        # the mount's own options, optional fields up to "-", then the file system's type,
        # its source and its own options.
        fields = line.split(" ")
        if len(fields) < 10 or fields[2] != wanted or "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if len(fields) <= separator + 3:
            return []
        mounts.append(
            (fields[separator + 1], fields[separator + 2], fields[separator + 3].split(","))
        )
    return mounts


def _on_no_file_of_another_user(device: int, source: str, *, unknown: bool) -> bool:
    """Whether no file another user may write lies under the file system: a loop device's
    image file (under a partition or a device-mapper target too), or the image a file-backed
    mount reads (erofs), must be this user's or root's, and writable by no one else (the
    user's own group aside).
    ``unknown`` where ``/sys`` or the source's device cannot be looked at."""
    if os.major(device) == 0:
        # An anonymous device: memory (tmpfs, its source a word such as "tmpfs"), or a file
        # system that names what it lies on only as its source (btrfs; erofs on an image).
        path = _ESCAPE.sub(lambda match: chr(int(match[1], 8)), source)
        if not path.startswith("/"):
            return True
        try:
            named = os.stat(path)
        except OSError:
            return unknown
        if stat.S_ISREG(named.st_mode):
            try:
                return _written_by_no_one_else(named, path)
            except OSError:  # its ACL could not be read: who else may write it is not known
                return False
        if not stat.S_ISBLK(named.st_mode):
            return unknown
        device = named.st_rdev
    entry = _block_device_entry(device)
    if not os.path.lexists(entry):
        return unknown
    return _block_device_on_no_file_of_another_user(entry, 0)


def _block_device_entry(device: int) -> Path:
    return _BLOCK_DEVICES / f"{os.major(device)}:{os.minor(device)}"


def _block_device_on_no_file_of_another_user(entry: Path, depth: int) -> bool:
    if depth > _MAX_STACK:
        return False
    try:
        entry = entry.resolve(strict=True)
        if (entry / "partition").exists():
            entry = entry.parent  # loop0p1 lies on loop0
        loop = entry / "loop"
        if loop.is_dir():
            # The image's path as the kernel names it now (a rename shows), free of symlinks;
            # " (deleted)" once no name is left, when who else holds it open is not known.
            backing = (loop / "backing_file").read_text(errors="surrogateescape").rstrip("\n")
            named = os.lstat(backing)
            if not stat.S_ISBLK(named.st_mode):
                return _written_by_no_one_else(named, Path(backing))
            # A loop device over a block device (losetup /dev/sdb1, another loop device): what
            # lies under that one decides, as for a device-mapper target's.
            under = [_block_device_entry(named.st_rdev)]
        else:
            slaves = entry / "slaves"
            under = sorted(slaves.iterdir()) if slaves.is_dir() else []
    except (OSError, RuntimeError):
        return False
    return all(_block_device_on_no_file_of_another_user(lower, depth + 1) for lower in under)


def _written_by_no_one_else(info: os.stat_result, path: Path | str) -> bool:
    """Whether the image file is the user's or root's and no one else may write it: write for
    the user's own group is fine, as for the store's directories (an image made under
    ``umask 002`` has it); raises ``OSError`` when its ACL cannot be looked at."""
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid in (os.geteuid(), 0)
        and writable_by_no_one_else(info, Path(path))
    )
