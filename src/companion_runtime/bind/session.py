"""Session files of a running ``serve``: the bearer token file and the state file ``status`` reads.

Both live in one private directory, the *state directory*: ``$COMPANION_RUNTIME_STATE_DIR``
when set, else the user runtime directory (``$XDG_RUNTIME_DIR/companion-runtime`` on Linux,
``platformdirs.user_runtime_dir``). It is created with mode ``0700`` and refused when it is a
symlink, is owned by someone else, or is writable by group or others (anyone who can write
there could swap the files ``status`` trusts).

* The token file ``frontdoor-<port>-<pid>.token`` holds the session token and nothing else. It
  is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode ``0600``, so it can never be a
  pre-planted file or symlink, and is removed when ``serve`` exits.
* The state file ``serve.json`` holds ``{"url", "token_file", "pid"}`` of the most recently
  started ``serve``; it is replaced atomically and removed on exit by the ``serve`` it names.

A ``serve`` killed with ``SIGKILL`` leaves both files behind, and anyone who could write the
directory could have put them there, so reading them back applies the rules writing them
follows: the directory passes the same check, both files are regular files of the current user
that no one else may read or write (``serve`` creates them ``0600``), and the token file lies in
the directory itself. Whether the ``serve`` they name still runs is for the reader to check
(``status`` does, before it sends the token anywhere).

Errors are :class:`SessionFileError` carrying ``Reason.STORE_ERROR`` (the files are local
storage the command could not use) or ``Reason.FILE_NOT_FOUND``; messages never carry a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

import platformdirs

from companion_runtime.core import Reason

__all__ = [
    "STATE_DIR_ENV",
    "STATE_FILE_NAME",
    "ServeState",
    "SessionFileError",
    "check_state_dir",
    "default_state_dir",
    "new_token",
    "prepare_state_dir",
    "read_serve_state",
    "read_token_file",
    "remove_serve_state",
    "write_serve_state",
    "write_token_file",
]

#: Environment variable that overrides the state directory.
STATE_DIR_ENV: Final = "COMPANION_RUNTIME_STATE_DIR"
#: Name of the state file inside the state directory.
STATE_FILE_NAME: Final = "serve.json"
_MAX_SMALL_FILE_BYTES: Final = 4096


@final
class SessionFileError(Exception):
    """A session file could not be written or read. ``str(error)`` is the reason code."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ServeState:
    """Where a running ``serve`` listens and where its token is."""

    url: str
    token_file: Path
    pid: int

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {"url": self.url, "token_file": str(self.token_file), "pid": self.pid}


def new_token() -> str:
    """A fresh session token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory (not created); see the module docstring."""
    env = os.environ if environ is None else environ
    override = env.get(STATE_DIR_ENV)
    if override:
        return Path(override)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and falls back to a per-user
        # directory under /tmp; prepare_state_dir checks whatever directory that is.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("companion-runtime"))


def prepare_state_dir(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) if needed and check it is private; return it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    _require_private_dir(info)
    return directory


def check_state_dir(directory: Path) -> Path:
    """Check an existing ``directory`` as :func:`prepare_state_dir` does, creating nothing.

    ``FILE_NOT_FOUND`` when it does not exist (no ``serve`` ever wrote there).
    """
    try:
        info = directory.lstat()
    except FileNotFoundError as error:
        raise SessionFileError(Reason.FILE_NOT_FOUND) from error
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    _require_private_dir(info)
    return directory


def _require_private_dir(info: os.stat_result) -> None:
    # Not a symlink (lstat), the current user's, and no one else may add, swap or remove files.
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise SessionFileError(Reason.STORE_ERROR)


def write_token_file(directory: Path, token: str, *, port: int) -> Path:
    """Write ``token`` to a new ``0600`` file in ``directory``; return its path."""
    path = directory / f"frontdoor-{port}-{os.getpid()}.token"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise SessionFileError(Reason.STORE_ERROR) from error
    return path


def _read_small(path: Path, *, private: bool = False) -> str:
    """The text of a small regular file; with ``private``, only if it is as ``serve`` writes it:
    the current user's, and neither readable nor writable by group or others."""
    # O_NONBLOCK: a FIFO planted where the file should be would block the open until a writer
    # came; it opens at once instead, and is then refused for not being a regular file.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError as error:
        raise SessionFileError(Reason.FILE_NOT_FOUND) from error
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or (
            private and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO))
        ):
            os.close(descriptor)
            raise SessionFileError(Reason.STORE_ERROR)
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(_MAX_SMALL_FILE_BYTES + 1)
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    if len(data) > _MAX_SMALL_FILE_BYTES:
        raise SessionFileError(Reason.STORE_ERROR)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error


def read_token_file(path: Path, *, private: bool = False) -> str:
    """The token stored in ``path`` (surrounding whitespace removed).

    With ``private`` (a token file a state file named, not one the user chose), the file must
    also be the current user's and closed to group and others, as ``serve`` writes it.
    """
    token = _read_small(path, private=private).strip()
    if not token or any(character.isspace() for character in token):
        raise SessionFileError(Reason.STORE_ERROR)
    return token


def write_serve_state(directory: Path, state: ServeState) -> Path:
    """Atomically replace the state file in ``directory`` with ``state``; return its path."""
    final_path = directory / STATE_FILE_NAME
    temp_path = directory / f".{STATE_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temp_path, flags, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(state.to_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, final_path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temp_path.unlink()
        raise SessionFileError(Reason.STORE_ERROR) from error
    return final_path


def read_serve_state(directory: Path) -> ServeState:
    """The state file in ``directory``; ``FILE_NOT_FOUND`` when no ``serve`` wrote one.

    ``STORE_ERROR`` unless ``directory`` passes :func:`check_state_dir`, the file is private
    (see the module docstring) and the token file it names lies directly in ``directory``.
    Nothing here says that the ``serve`` it names still runs.
    """
    check_state_dir(directory)
    text = _read_small(directory / STATE_FILE_NAME, private=True)
    try:
        raw = json.loads(text)
        url, token_file, pid = raw["url"], raw["token_file"], raw["pid"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        # RecursionError: a few thousand nested brackets, well within the size cap.
        raise SessionFileError(Reason.STORE_ERROR) from error
    if type(url) is not str or type(token_file) is not str or type(pid) is not int:
        raise SessionFileError(Reason.STORE_ERROR)
    return ServeState(url=url, token_file=_token_file_in(directory, token_file), pid=pid)


def _token_file_in(directory: Path, recorded: str) -> Path:
    """``recorded`` as a file directly in ``directory`` (where ``serve`` writes it), or refused.

    The parent is compared by identity (device and inode, not following a symlink), so the
    same directory spelled another way still matches and a link to somewhere else does not.
    """
    path = Path(recorded)
    if path.name in ("", ".", ".."):
        raise SessionFileError(Reason.STORE_ERROR)
    try:
        same = os.path.samestat(os.lstat(path.parent), os.lstat(directory))
    except (OSError, ValueError) as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    if not same:
        raise SessionFileError(Reason.STORE_ERROR)
    return directory / path.name


def remove_serve_state(directory: Path, *, pid: int) -> None:
    """Remove the state file if it still names ``pid`` (a later ``serve`` may own it now)."""
    with contextlib.suppress(SessionFileError, OSError):
        if read_serve_state(directory).pid == pid:
            (directory / STATE_FILE_NAME).unlink()
