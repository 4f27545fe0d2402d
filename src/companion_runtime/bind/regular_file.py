"""Open or read a file only when it is a regular file, without blocking or side effects.

``open()`` on a FIFO waits for a writer, and no signal handler runs while the main thread
waits there; opening a device is not harmless either (a watchdog starts counting, a tape
rewinds). So the name is ``stat``\\ ed first and anything but a regular file is refused
before it is opened; the open itself is non-blocking and takes no controlling terminal, and
what it opened is checked again with ``fstat`` (the name may have been switched since).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO, Final, final

__all__ = ["NotARegularFileError", "open_regular_file", "read_regular_file", "read_to_end"]

_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@final
class NotARegularFileError(OSError):
    """Something other than a regular file (a directory, a FIFO, a device, a socket) is at
    the name; it was not opened, or was closed unread."""


def open_regular_file(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only when it is a regular file; its descriptor and ``fstat``.

    Raises :class:`NotARegularFileError` for anything else, ``FileNotFoundError`` for a name
    with a NUL (no such file can exist), and any other ``OSError`` from ``stat`` or ``open``.
    The caller closes the descriptor.
    """
    if "\0" in os.fspath(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    named = os.stat(path)
    if not stat.S_ISREG(named.st_mode):
        raise NotARegularFileError(errno.EINVAL, "not a regular file")
    fd = os.open(path, _FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (
            named.st_dev,
            named.st_ino,
        ):
            raise NotARegularFileError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes + 1`` of them (so a
    caller can tell a file over its limit). Raises as :func:`open_regular_file` does, and
    as :func:`read_to_end` does."""
    fd, _info = open_regular_file(path)
    with open(fd, "rb", buffering=0) as handle:
        return read_to_end(handle, max_bytes=max_bytes)


def read_to_end(handle: BinaryIO, *, max_bytes: int) -> bytes:
    """What an unbuffered ``handle`` holds up to its end, at most ``max_bytes + 1`` bytes.

    The descriptor is non-blocking, and a few regular files have no bytes to give at times
    (``/proc/kmsg``, a file system in user space): a read there answers ``None``, which is no
    end of file. Taken for one, the bytes stopped early (a manifest cut short, its last tables
    left to their defaults) or a read of them ended in a ``TypeError``. It raises
    ``BlockingIOError`` instead.
    """
    chunks: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = handle.read(min(left, 1024 * 1024))
        if chunk is None:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
