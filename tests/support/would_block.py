"""A regular file that has no bytes to give for now, as ``/proc/kmsg`` or a file in user space.

Opened non-blocking, a read of such a file answers ``None`` (``EAGAIN``) where a file on disk
never does. The one on this machine, ``/proc/kmsg``, hands out the kernel's log and takes it
from whoever else reads it, so the tests fake the reader instead: it gives ``given`` first,
then nothing, for a file whose inode is ``inode``; every other open is the real one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


class _NoMoreForNow:
    """An unbuffered reader that gives ``given``, then answers ``None`` as a non-blocking
    read of a file with nothing to give does; it closes the real descriptor."""

    def __init__(self, descriptor: int, given: bytes) -> None:
        self._file = open(descriptor, "rb", buffering=0)
        self._given = given

    def read(self, _size: int = -1) -> bytes | None:
        given, self._given = self._given, b""
        return given or None

    def readinto(self, buffer: memoryview) -> int | None:
        given = self.read()
        if given is None:
            return None
        buffer[: len(given)] = given
        return len(given)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _NoMoreForNow:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def opener_that_would_block(
    real: Callable[..., Any], *, inode: int, given: bytes = b""
) -> Callable[..., Any]:
    """``real`` (``open`` or ``os.fdopen``), except for a descriptor of the file ``inode``."""

    def opener(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, int) and os.fstat(file).st_ino == inode:
            return _NoMoreForNow(file, given)
        return real(file, *args, **kwargs)

    return opener
