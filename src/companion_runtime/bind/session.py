"""Session files of a running ``serve``: the bearer token file and the state files ``status`` reads.

Both live in one private directory, the *state directory*: ``$COMPANION_RUNTIME_STATE_DIR``
when set (a relative one taken from the current directory, and recorded absolute), else the
user runtime directory (``$XDG_RUNTIME_DIR/companion-runtime`` on Linux,
``platformdirs.user_runtime_dir``). It is created with mode ``0700`` and refused when it is a
symlink, is owned by someone else, or is writable by group or others (anyone who can write
there could swap the files ``status`` trusts), and when a directory above it, as written or
as its symlinks resolve or where a symlink on the way lives, is someone else's than the
user's or root's, or is writable by others (or a group other than the user's own, or anyone
an access ACL lets write) without the sticky bit of ``/tmp`` (in a sticky one the entry on
the way, a symlink too, must be the user's or root's): whoever can rename the state directory
could move it aside and put one of their own at its path.

* The token file ``frontdoor-<port>-<pid>.token`` holds the session token and nothing else
  (``frontdoor-<port>-<pid>-<random>.token`` when that name is taken). It is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode ``0600``, so it can never be a pre-planted file
  or symlink, and is removed when ``serve`` exits.
* Each ``serve`` records itself in a file of its own, ``serve-<pid>.json``
  (``{"url", "token_file", "pid", "pid_ns"}``; ``serve-<pid>-<namespace inode>.json`` in a pid
  namespace other than the machine's own), written atomically with mode ``0600`` once its
  front door listens and removed when it exits. Several ``serve`` processes may share one
  state directory, sandboxes with pids of their own included; none of them overwrites
  another's record.
* The state file ``serve.json`` holds the same fields for the most recently started ``serve``
  (older tools read it). A ``serve`` that exits while ``serve.json`` names it points it at the
  most recently started ``serve`` that is still alive, or removes it when there is none.

Starting and exiting hold an exclusive lock on the state directory itself (``flock``), so two
``serve`` processes that start or exit at the same moment do not undo each other's update of
``serve.json``; they also remove the records of ``serve`` processes that are gone (their pid
names no process of the user any more) and the token files those records name, and the temp
files of writes that a killed ``serve`` never finished (older than a minute, their writer
gone, or older than an hour). Each record
says which pid namespace its pid is a number in (``pid_ns``): one written in another (a
sandbox or container sharing the directory) is never taken for gone, nor asked by ``status``;
nor is any record where ``/proc`` numbers processes as another pid namespace does (a sandbox
that kept the machine's ``/proc``), since a pid cannot be looked up there.

A ``serve`` killed with ``SIGKILL`` leaves its files behind, and anyone who could write the
directory could have put them there, so reading them back applies the rules writing them
follows: the directory passes the same check, every state file read (``serve.json`` and each
record) is a regular file of the current user that no one else may read or write (``serve``
creates them ``0600``), a record holds the pid its name says, and the token file lies in the
directory itself (a record from another pid namespace, never asked from here, is kept by the
token file's name alone: that side may mount the directory at another path). Whether the
``serve`` a file names still runs is :func:`is_serving`'s question: the pid must be a live
process of the current user that itself listens on the recorded URL's port. ``status`` asks
it before it sends a token anywhere.

Errors are :class:`SessionFileError` carrying ``Reason.STORE_ERROR`` (the files are local
storage the command could not use) or ``Reason.FILE_NOT_FOUND``; messages never carry a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, final
from urllib.parse import urlsplit

import platformdirs
import psutil

from companion_runtime.bind.directory_trust import (
    ancestors_hold_no_one_else_s_entries,
    make_private_directories,
    may_create_on_the_way_to,
)
from companion_runtime.bind.regular_file import read_to_end
from companion_runtime.core import Reason

__all__ = [
    "STATE_DIR_ENV",
    "STATE_FILE_NAME",
    "ServeState",
    "SessionFileError",
    "check_state_dir",
    "default_state_dir",
    "forget_serve",
    "is_serving",
    "new_token",
    "prepare_state_dir",
    "read_recorded_serves",
    "read_serve_records",
    "read_serve_state",
    "read_token_file",
    "record_serve",
    "write_serve_state",
    "write_token_file",
]

#: Environment variable that overrides the state directory.
STATE_DIR_ENV: Final = "COMPANION_RUNTIME_STATE_DIR"
#: Name of the state file inside the state directory.
STATE_FILE_NAME: Final = "serve.json"
_MAX_SMALL_FILE_BYTES: Final = 4096
#: The name of one ``serve``'s own record: ``serve-<pid>.json``, or
#: ``serve-<pid>-<namespace>.json`` for a pid in a pid namespace other than the machine's own
#: (see :func:`_record_name`).
_RECORD_NAME: Final = re.compile(r"serve-([1-9][0-9]{0,9})(?:-([1-9][0-9]{0,19}))?\.json")
#: A state file being written: ``.<name>.<writer's pid>.<8 hex digits>``, renamed into place
#: at once; one a ``serve`` killed while writing left behind stays unless swept.
_TEMP_NAME: Final = re.compile(
    r"\.serve(?:-[1-9][0-9]{0,9}(?:-[1-9][0-9]{0,19})?)?\.json\.([1-9][0-9]{0,9})\.[0-9a-f]{8}"
)
#: How ``/proc/self/ns/pid`` names a pid namespace: ``pid:[<inode>]``.
_PID_NS: Final = re.compile(r"pid:\[([1-9][0-9]{0,19})\]")
#: The inode of the machine's own (initial) pid namespace, the same on every Linux since 3.8
#: (``PROC_PID_INIT_INO``): records of ``serve`` processes there keep the plain name.
_INITIAL_PID_NS: Final = 0xEFFFFFFC
#: A temp file older than this whose writer is gone is swept; one older than
#: :data:`_TEMP_ABANDONED_S` is swept whatever its pid (it may be a number in another pid
#: namespace). Writing one takes milliseconds.
_TEMP_STALE_S: Final = 60.0
_TEMP_ABANDONED_S: Final = 3600.0
#: How long starting or exiting waits for another ``serve`` to finish updating the files.
_LOCK_WAIT_S: Final = 5.0


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
    #: The pid namespace ``pid`` is a number in (``pid:[inode]``, as ``/proc/self/ns/pid``
    #: names it), stamped by :func:`record_serve`; ``None`` when unknown. Not part of equality:
    #: it says how to read ``pid``, not which ``serve`` this is.
    pid_ns: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        fields: dict[str, object] = {
            "url": self.url,
            "token_file": str(self.token_file),
            "pid": self.pid,
        }
        if self.pid_ns is not None:
            fields["pid_ns"] = self.pid_ns
        return fields


def new_token() -> str:
    """A fresh session token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory (not created); see the module docstring."""
    env = os.environ if environ is None else environ
    override = env.get(STATE_DIR_ENV)
    if override:
        # Absolute from here on: the token file's path goes into the records, and a client
        # started in another directory must still find it.
        return Path(os.path.abspath(override))
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and falls back to a per-user
        # directory under /tmp; prepare_state_dir checks whatever directory that is.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("companion-runtime"))


def prepare_state_dir(directory: Path) -> Path:
    """Create ``directory``, and any directory missing on the way to it, mode 0700 (whatever
    the umask) if needed, and check it is private; return it.

    Nothing is created unless the nearest directory that is there, and the way to it, pass
    the rule for the directories above it (see the module docstring).
    """
    try:
        # A symlink of someone else's on the way would send the mkdir wherever they chose.
        creatable = may_create_on_the_way_to(directory, os.getuid())
        if creatable:
            make_private_directories(directory)
            info = directory.lstat()
    except (OSError, RuntimeError, ValueError) as error:
        # RuntimeError: a symlink loop on the way (Python before 3.13); ValueError: a NUL in
        # the path, which no file can have.
        raise SessionFileError(Reason.STORE_ERROR) from error
    if not creatable:
        raise SessionFileError(Reason.STORE_ERROR)
    _require_private_dir(directory, info)
    return directory


def check_state_dir(directory: Path) -> Path:
    """Check an existing ``directory`` as :func:`prepare_state_dir` does, creating nothing.

    ``FILE_NOT_FOUND`` when it does not exist (no ``serve`` ever wrote there).
    """
    try:
        info = directory.lstat()
    except FileNotFoundError as error:
        raise SessionFileError(Reason.FILE_NOT_FOUND) from error
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise SessionFileError(Reason.STORE_ERROR) from error
    _require_private_dir(directory, info)
    return directory


def _require_private_dir(directory: Path, info: os.stat_result) -> None:
    # Not a symlink (lstat), the current user's, and no one else may add, swap or remove files.
    uid = os.getuid()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != uid
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise SessionFileError(Reason.STORE_ERROR)
    # Nor may anyone else rename it: whoever can write a directory above it (not sticky like
    # /tmp) could move it aside and put one of their own at its path, with records and a
    # token file of their choosing, between this check and the reads that rely on it.
    try:
        trusted = ancestors_hold_no_one_else_s_entries(directory, uid)
    except (OSError, RuntimeError) as error:
        # RuntimeError: a symlink loop on the way (Python before 3.13).
        raise SessionFileError(Reason.STORE_ERROR) from error
    if not trusted:
        raise SessionFileError(Reason.STORE_ERROR)


def write_token_file(directory: Path, token: str, *, port: int) -> Path:
    """Write ``token`` to a new ``0600`` file in ``directory``; return its path.

    The file is ``frontdoor-<port>-<pid>.token``, or, when something is already there (what a
    ``serve`` killed with ``SIGKILL`` left: in a container run again, the next one has the
    same pid and the same ``--port``), ``frontdoor-<port>-<pid>-<random>.token``. Whatever is
    there is never opened, followed or replaced.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    names = [f"frontdoor-{port}-{os.getpid()}.token"]
    names += [f"frontdoor-{port}-{os.getpid()}-{secrets.token_hex(4)}.token" for _ in range(3)]
    for name in names:
        path = directory / name
        try:
            descriptor = os.open(path, flags, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise SessionFileError(Reason.STORE_ERROR) from error
    else:
        raise SessionFileError(Reason.STORE_ERROR)
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
    return _read_small_with_info(path, private=private)[0]


def _read_small_with_info(path: Path, *, private: bool = False) -> tuple[str, os.stat_result]:
    """:func:`_read_small`, and the status of the file that was read."""
    # Anything but a regular file is refused before it is opened: opening a FIFO lets a writer
    # waiting on it go on, into a SIGPIPE once it is closed again, and opening a device is not
    # harmless either (a watchdog starts counting). O_NONBLOCK: should the name have become a
    # FIFO since, the open does not wait for a writer, and what it opened is checked again.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        named = os.lstat(path)
        if not stat.S_ISREG(named.st_mode):
            raise SessionFileError(Reason.STORE_ERROR)
        descriptor = os.open(path, flags)
    except FileNotFoundError as error:
        raise SessionFileError(Reason.FILE_NOT_FOUND) from error
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    try:
        info = os.fstat(descriptor)
        if (
            not stat.S_ISREG(info.st_mode)
            or (info.st_dev, info.st_ino) != (named.st_dev, named.st_ino)
            or (
                private
                and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO))
            )
        ):
            os.close(descriptor)
            raise SessionFileError(Reason.STORE_ERROR)
        with os.fdopen(descriptor, "rb", buffering=0) as handle:
            data = read_to_end(handle, max_bytes=_MAX_SMALL_FILE_BYTES)
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    if len(data) > _MAX_SMALL_FILE_BYTES:
        raise SessionFileError(Reason.STORE_ERROR)
    try:
        return data.decode("utf-8"), info
    except UnicodeDecodeError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error


def read_token_file(path: Path, *, private: bool = False) -> str:
    """The token stored in ``path`` (surrounding whitespace removed): ``store_error`` unless it
    is one or more visible ASCII characters.

    With ``private`` (a token file a state file named, not one the user chose), the file must
    also be the current user's and closed to group and others, as ``serve`` writes it.
    """
    token = _read_small(path, private=private).strip()
    # Visible ASCII only, what an HTTP header carries (serve's own are URL-safe base64): the
    # client refused a NUL or a letter outside ASCII only once connected, which read as the
    # front door's fault (upstream_error), and sent an escape sequence as it is.
    if not token or not all("!" <= character <= "~" for character in token):
        raise SessionFileError(Reason.STORE_ERROR)
    return token


def write_serve_state(directory: Path, state: ServeState) -> Path:
    """Atomically replace the state file in ``directory`` with ``state``; return its path."""
    return _write_state_file(directory, STATE_FILE_NAME, state)


def _write_state_file(directory: Path, name: str, state: ServeState) -> Path:
    """Atomically replace ``directory / name`` with ``state`` (a new ``0600`` file renamed)."""
    final_path = directory / name
    temp_path = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
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
    return _parse_state(directory, _read_small(directory / STATE_FILE_NAME, private=True))


def read_serve_records(directory: Path) -> list[ServeState]:
    """Every ``serve-<pid>.json`` record in ``directory``, the most recently written first.

    ``FILE_NOT_FOUND`` when ``directory`` does not exist; ``STORE_ERROR`` unless it passes
    :func:`check_state_dir` and every record is as ``serve`` writes it (private, holding the
    pid its name says, naming a token file directly in ``directory``, unless written in another
    pid namespace). Nothing here says that the ``serve`` processes they name still run.
    """
    check_state_dir(directory)
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    found: list[tuple[ServeState, int]] = []
    for name in names:
        match = _RECORD_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            text, info = _read_small_with_info(directory / name, private=True)
        except SessionFileError as error:
            if error.reason is Reason.FILE_NOT_FOUND:
                continue  # that serve removed it since the listing
            raise
        state = _parse_state(directory, text)
        if not _named_for(match, state):
            raise SessionFileError(Reason.STORE_ERROR)
        found.append((state, info.st_mtime_ns))
    found.sort(key=lambda pair: (pair[1], pair[0].pid), reverse=True)
    return [state for state, _written in found]


def read_recorded_serves(directory: Path) -> list[ServeState]:
    """What ``status`` chooses from: the state file's ``serve`` first, then the records.

    Each ``serve`` once, the most recently started first. ``FILE_NOT_FOUND`` when no ``serve``
    recorded anything there; ``STORE_ERROR`` as :func:`read_serve_state` and
    :func:`read_serve_records` refuse. Nothing here says that any of them still runs.
    """
    try:
        named = [read_serve_state(directory)]
    except SessionFileError as error:
        if error.reason is not Reason.FILE_NOT_FOUND:
            raise
        named = []
    recorded: list[ServeState] = []
    for state in named + read_serve_records(directory):
        if not any(_same_serve(state, seen) for seen in recorded):
            recorded.append(state)
    if not recorded:
        raise SessionFileError(Reason.FILE_NOT_FOUND)
    return recorded


def _same_serve(one: ServeState, other: ServeState) -> bool:
    """Whether two states name one ``serve``: the same pid and URL, in the same pid namespace
    (two sandboxes may each have a ``serve`` of that pid listening on that port)."""
    return (one.pid, one.url) == (other.pid, other.url) and (
        one.pid_ns == other.pid_ns or one.pid_ns is None or other.pid_ns is None
    )


def _parse_state(directory: Path, text: str) -> ServeState:
    try:
        raw = json.loads(text)
        url, token_file, pid = raw["url"], raw["token_file"], raw["pid"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        # RecursionError: a few thousand nested brackets, well within the size cap.
        raise SessionFileError(Reason.STORE_ERROR) from error
    pid_ns = raw.get("pid_ns")
    if type(url) is not str or type(token_file) is not str or type(pid) is not int:
        raise SessionFileError(Reason.STORE_ERROR)
    if pid_ns is not None and type(pid_ns) is not str:
        raise SessionFileError(Reason.STORE_ERROR)
    if _foreign(pid_ns):
        # Written in another pid namespace, maybe through another mount of this directory (a
        # container's own path for it), where the token file's path may mean nothing here.
        # Such a record is never asked, swept nor read from here: it is kept by name alone,
        # and does not make every other record unreadable.
        name = Path(token_file).name
        if name in ("", ".", ".."):
            raise SessionFileError(Reason.STORE_ERROR)
        return ServeState(url=url, token_file=directory / name, pid=pid, pid_ns=pid_ns)
    return ServeState(
        url=url, token_file=_token_file_in(directory, token_file), pid=pid, pid_ns=pid_ns
    )


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


def is_serving(state: ServeState) -> bool:
    """Whether ``state.pid`` is a live process of this user listening on its URL's port.

    A pid alone is not enough: after a ``SIGKILL`` the number can be reused by any process,
    and the port taken by another. Only the process that listens on the port is the front
    door the token belongs to.
    """
    try:
        port = urlsplit(state.url).port
    except ValueError:
        return False
    if port is None or state.pid <= 0 or _elsewhere(state) or not _pids_are_looked_up_here():
        return False
    try:
        process = psutil.Process(state.pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.uids().real != os.getuid():
            return False
        connections = process.net_connections(kind="inet")
    except (psutil.Error, OverflowError, ValueError):
        # Gone, not ours to inspect, or a pid no process could have.
        return False
    return any(
        connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
        for connection in connections
    )


def record_serve(directory: Path, state: ServeState) -> None:
    """Record a ``serve`` whose front door listens: its own record, then ``serve.json``.

    Records of ``serve`` processes that are gone are removed on the way, with their token
    files. Raises :class:`SessionFileError` (``STORE_ERROR``) when a file cannot be written;
    the record is not left behind then.
    """
    state = replace(state, pid_ns=_own_pid_ns())
    with _locked(directory):
        replaced = _previous_record(directory, state)
        record = _write_state_file(directory, _record_name(state.pid, state.pid_ns), state)
        try:
            write_serve_state(directory, state)
        except SessionFileError:
            with contextlib.suppress(OSError):
                record.unlink()
            raise
        if (
            replaced is not None
            and replaced.token_file.name != state.token_file.name
            and not is_serving(replaced)
        ):
            # The record of a serve that had this pid before this one (it was killed with
            # SIGKILL): its pid names this process now, which does not listen where it did.
            # (Another serve in this same process would still listen there: its token stays.)
            with contextlib.suppress(OSError):
                replaced.token_file.unlink()
        _sweep(directory, keep=record.name)


def _previous_record(directory: Path, state: ServeState) -> ServeState | None:
    """The record ``state``'s is about to replace, when it is as ``serve`` writes it and was
    written in this pid namespace (one from another may be a live ``serve`` of that pid)."""
    try:
        previous = _parse_state(
            directory,
            _read_small(directory / _record_name(state.pid, state.pid_ns), private=True),
        )
    except SessionFileError:
        return None
    if previous.pid != state.pid or _elsewhere(previous) or not _pids_are_looked_up_here():
        return None
    return previous


def forget_serve(directory: Path, *, pid: int) -> None:
    """Remove what :func:`record_serve` wrote for ``pid``; never raises.

    Its record goes; ``serve.json``, if it still names ``pid`` or a ``serve`` that is gone
    (killed, it could not clean up), then names the most recently started ``serve`` that is
    still alive, or is removed when none is. A ``serve.json`` naming another live ``serve`` is
    left as it is. Records of ``serve`` processes that are gone are removed too.
    """
    with contextlib.suppress(SessionFileError, OSError), _locked(directory):
        with contextlib.suppress(OSError):
            (directory / _record_name(pid, _own_pid_ns())).unlink()
        alive = _sweep(directory, keep=None)
        named = read_serve_state(directory)
        if _elsewhere(named) or (named.pid != pid and not _is_gone(named.pid)):
            return
        if alive:
            write_serve_state(directory, alive[0])
        else:
            (directory / STATE_FILE_NAME).unlink()


def _record_name(pid: int, pid_ns: str | None) -> str:
    """The record of the ``serve`` with ``pid`` in the pid namespace ``pid_ns``.

    ``serve-<pid>.json`` in the machine's own namespace (or where it is unknown), else
    ``serve-<pid>-<namespace inode>.json``: a sandbox or container sharing the directory
    numbers its processes apart, and its ``serve`` may well have the pid of another one,
    outside or in another sandbox. With one name for both, the later replaced the earlier's
    record, and the earlier, exiting, removed the later's.
    """
    inode = _ns_inode(pid_ns)
    if inode is None or inode == _INITIAL_PID_NS:
        return f"serve-{pid}.json"
    return f"serve-{pid}-{inode}.json"


def _ns_inode(pid_ns: str | None) -> int | None:
    found = None if pid_ns is None else _PID_NS.fullmatch(pid_ns)
    return None if found is None else int(found.group(1))


def _named_for(match: re.Match[str], state: ServeState) -> bool:
    """Whether a record's name (``match``) is the one its ``state`` is written under: the same
    pid and, when the name has one, the same pid namespace. (A plain name with another
    namespace inside is an earlier version's record, written before names carried one.)"""
    pid, inode = match.groups()
    return state.pid == int(pid) and (inode is None or _ns_inode(state.pid_ns) == int(inode))


def _sweep(directory: Path, *, keep: str | None) -> list[ServeState]:
    """Remove the records (and token files) of ``serve`` processes that are gone; return those
    that are serving (:func:`is_serving`), the most recently started first. The record named
    ``keep`` stays as it is.

    Only a record whose pid names no process of this user any more is removed: one whose check
    failed for another reason (a process that cannot be inspected just now) may be a live
    ``serve``'s, and removing its token file would lock out the clients that still have to read
    it. Records that are not as ``serve`` writes them are left alone: not this code's to judge.
    """
    alive: list[tuple[ServeState, str]] = []
    gone: list[tuple[ServeState, str]] = []
    for name in _listed(directory):
        match = _RECORD_NAME.fullmatch(name)
        if match is None or name == keep:
            continue
        try:
            state = _parse_state(directory, _read_small(directory / name, private=True))
        except SessionFileError:
            continue
        if not _named_for(match, state) or _elsewhere(state):
            continue  # not as serve writes it; or a pid that names another process here
        if is_serving(state):
            alive.append((state, name))
        elif _is_gone(state.pid):
            gone.append((state, name))
    kept_tokens = {state.token_file.name for state, _name in alive}
    for state, name in gone:
        with contextlib.suppress(OSError):
            (directory / name).unlink()
        if state.token_file.name not in kept_tokens:
            with contextlib.suppress(OSError):
                state.token_file.unlink()
    _sweep_temp_files(directory)
    return _by_recency(directory, alive)


def _sweep_temp_files(directory: Path) -> None:
    """Remove the temp files of state-file writes that never finished (the writer was killed
    between creating and renaming one): older than :data:`_TEMP_STALE_S` with a writer that is
    gone, or older than :data:`_TEMP_ABANDONED_S`. Only this user's regular files."""
    now = time.time()
    for name in _listed(directory):
        match = _TEMP_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            info = os.lstat(directory / name)
        except OSError:
            continue
        age = now - info.st_mtime
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or age < _TEMP_STALE_S:
            continue
        if age >= _TEMP_ABANDONED_S or _is_gone(int(match.group(1))):
            with contextlib.suppress(OSError):
                (directory / name).unlink()


def _own_pid_ns() -> str | None:
    """This process's pid namespace, ``pid:[inode]``; ``None`` where there is no ``/proc``."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _elsewhere(state: ServeState) -> bool:
    """Whether ``state`` was recorded in another pid namespace than this process's.

    A sandbox (``bwrap --unshare-pid``, a container) that shares the state directory numbers
    its processes apart: its ``serve``'s pid names no process here, or another one. Nothing
    can be said of it from here, so it is neither removed nor asked.
    """
    return _foreign(state.pid_ns)


def _pids_are_looked_up_here() -> bool:
    """Whether ``/proc`` (where psutil looks a pid up) numbers processes as this process's pid
    namespace does. In a sandbox that has a pid namespace of its own but the machine's
    ``/proc`` (``bwrap --unshare-pid --dev-bind / /``, ``unshare --pid --fork`` without
    ``--mount-proc``), a pid of the sandbox names another process there, or none: whether a
    ``serve`` recorded there still runs cannot be told, so none is asked or taken for gone."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return True  # no /proc (not Linux): psutil asks the kernel itself


def _foreign(pid_ns: str | None) -> bool:
    own = _own_pid_ns()
    return pid_ns is not None and own is not None and pid_ns != own


def _is_gone(pid: int) -> bool:
    """Whether ``pid`` names no live process of this user (a zombie has ended); never where
    ``/proc`` is another pid namespace's (:func:`_pids_are_looked_up_here`)."""
    if not _pids_are_looked_up_here():
        return False
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or process.uids().real != os.getuid()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, OverflowError, ValueError):
        return False


def _listed(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _by_recency(directory: Path, records: list[tuple[ServeState, str]]) -> list[ServeState]:
    """The states of ``records`` (each with its record's name) ordered by when each record was
    written, the most recent first."""

    def written(record: tuple[ServeState, str]) -> tuple[int, int]:
        state, name = record
        try:
            return (os.lstat(directory / name).st_mtime_ns, state.pid)
        except OSError:
            return (0, state.pid)

    return [state for state, _name in sorted(records, key=written, reverse=True)]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` itself while the state files change.

    Locking the directory leaves no lock file behind. Best effort: a lock not had within
    :data:`_LOCK_WAIT_S` (a ``serve`` stopped while holding it), or a file system without
    locks, does not keep a ``serve`` from starting or exiting.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(directory, flags)
    except OSError as error:
        raise SessionFileError(Reason.STORE_ERROR) from error
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            except OSError:
                pass
            break
        yield
    finally:
        os.close(descriptor)
