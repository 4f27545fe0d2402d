"""Read a running front door's ``GET /_status`` (the ``status`` command).

Where to look: ``--url`` and ``--token-file`` when given; otherwise the state files that
``serve`` writes in the state directory (see :mod:`companion_runtime.bind.session`):
``serve.json``, naming the most recently started ``serve``, and each ``serve``'s own record
``serve-<pid>.json`` (``serve-<pid>-<namespace>.json`` in a pid namespace other than the
machine's own). The token is sent only to a loopback ``http`` URL, never through a proxy
from the environment.

State files are trusted no more than ``serve`` would trust them, and they are checked before
any token is read or sent: the state directory, every state file and the token file must pass
the checks :func:`~companion_runtime.bind.session.read_recorded_serves` applies
(``store_error`` otherwise, as ``serve`` refuses such a directory), and the process a state
file names must be alive, run as the current user and itself listen on the port of the URL it
recorded (:func:`~companion_runtime.bind.session.is_serving`; a ``serve`` that fails this is
passed over, and ``not_ready`` when none passes). A ``serve`` killed with ``SIGKILL`` leaves its
files behind; without the last check, whatever later took its port would be handed the token.

Which ``serve``: the one ``serve.json`` names when it is alive, else the most recently started
recorded one that is. When more than one is alive and no ``--url`` chose, the most recent is
asked and :attr:`StatusResult.others` lists the URLs of the rest, for the caller to say that
they exist (``status`` does, on stderr) and how to ask one (``--url``).

A recorded token goes only to the URL recorded with it. Those checks are about that URL, so
a ``--url`` without ``--token-file`` must name the front door of a recorded ``serve``
(``host_not_allowed`` otherwise), whose token is then sent: the same scheme, host and port,
with no path beyond ``/``, no query, fragment or user. ``localhost`` is not ``127.0.0.1``: it
may resolve to ``::1``, where any local user can listen on the front door's port number. With
``--token-file`` as well, the URL and the token are both the caller's choice and the state
files are not read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final
from urllib.parse import urlsplit

import httpx
from rich.table import Table
from rich.text import Text

from companion_runtime.bind.session import (
    ServeState,
    SessionFileError,
    default_state_dir,
    is_serving,
    read_recorded_serves,
    read_token_file,
)
from companion_runtime.core import Reason, Verdict

__all__ = ["StatusResult", "fetch_status", "read_status", "status_table"]

_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
#: The fields of a result that are the verdict's, never the document's.
_VERDICT: Final = frozenset({"ok", "reason"})
#: The reasons the front door answers ``403`` with.
_FORBIDDEN_REASONS: Final = frozenset({Reason.HOST_NOT_ALLOWED, Reason.ORIGIN_NOT_ALLOWED})
#: Largest status document read: the front door's own is about a kilobyte.
_MAX_BODY_BYTES: Final = 1024 * 1024


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResult:
    """The verdict and, when it is ok, the status document.

    ``url`` is the front door that was asked (``None`` when none was); ``others`` the URLs of
    the other live ``serve`` processes recorded in the state directory, when the one asked was
    chosen among several without ``--url``. Neither is part of :meth:`to_dict`.
    """

    verdict: Verdict
    document: Mapping[str, object] = field(default_factory=dict)
    url: str | None = None
    others: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """``{"ok", "reason"}`` followed by the document's other fields.

        The verdict's own ``ok`` and ``reason`` are the ones that count: a document with
        fields of those names (not the front door's, which has none) must not turn an answer
        the exit code calls ok into ``"ok": false``, nor the other way round.
        """
        others = {name: value for name, value in self.document.items() if name not in _VERDICT}
        return {**self.verdict.to_dict(), **others}


def _refused(reason: Reason) -> StatusResult:
    return StatusResult(verdict=Verdict(False, reason))


def fetch_status(url: str, token: str, *, timeout_s: float = 5.0) -> StatusResult:
    """``GET {url}/_status`` with the bearer token; never raises for a refusal.

    ``malformed_spec``: ``url`` cannot be parsed (a bad port, an unclosed ``[``);
    ``host_not_allowed``: it is not ``http`` on a loopback host; ``not_ready``: nothing
    listens there; ``host_not_allowed`` or ``origin_not_allowed``: the front door's ``403``
    (any other ``403``, or another status, is ``http_status``); ``timeout``: the whole answer
    is not there within ``timeout_s``;
    ``upstream_error``: it is not a status document (one holding ``NaN``, ``Infinity`` or a
    number too large for a float included), or larger than a mebibyte.
    """
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port  # .port raises for a bad port
    except ValueError:
        return _refused(Reason.MALFORMED_SPEC)
    if parts.scheme != "http" or hostname not in _LOOPBACK_HOSTS:
        return _refused(Reason.HOST_NOT_ALLOWED)
    # httpx's timeout bounds each wait, not the whole: a byte every few seconds, in the head
    # as in the body, would keep it waiting for ever. The deadline bounds the whole exchange,
    # the cap what it keeps.
    deadline = _Deadline(timeout_s)
    try:
        with (
            httpx.Client(trust_env=False, timeout=timeout_s) as client,
            client.stream(
                "GET",
                url.rstrip("/") + "/_status",
                headers={"authorization": f"Bearer {token}"},
                extensions={"trace": deadline.trace},
            ) as response,
        ):
            body = _read_body(response) if response.status_code in (200, 403) else b""
    except httpx.TimeoutException:
        return _refused(Reason.TIMEOUT)
    except httpx.ConnectError:
        # Nothing listens there: no front door is serving.
        return _refused(Reason.NOT_READY)
    except httpx.InvalidURL:
        # Not an httpx.HTTPError: a URL httpx refuses to build a request for.
        return _refused(Reason.MALFORMED_SPEC)
    except (httpx.HTTPError, ValueError):
        # Cut off at the deadline, the answer ends early: that is the deadline's doing.
        return _refused(Reason.TIMEOUT if deadline.expired else Reason.UPSTREAM_ERROR)
    finally:
        deadline.cancel()
    if deadline.expired:
        return _refused(Reason.TIMEOUT)
    if response.status_code == 401:
        return _refused(Reason.UNAUTHORIZED)
    if response.status_code == 403:
        try:
            reason = Reason(json.loads(body)["reason"])
        except (ValueError, KeyError, TypeError, RecursionError):
            reason = Reason.HTTP_STATUS
        # Only the front door's own 403 reasons: whatever answers could otherwise have status
        # say "ok" with ok false, or report a refusal that never happened.
        return _refused(reason if reason in _FORBIDDEN_REASONS else Reason.HTTP_STATUS)
    if response.status_code != 200:
        return _refused(Reason.HTTP_STATUS)
    try:
        # Numbers JSON cannot write (NaN, Infinity, a 1e400 read as inf) are refused: Python
        # would print them back bare, and --json's object would then be no JSON at all.
        document = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        # RecursionError: thousands of nested brackets from whatever answers on that port.
        return _refused(Reason.UPSTREAM_ERROR)
    if not isinstance(document, dict) or _depth(document) > _MAX_DEPTH:
        return _refused(Reason.UPSTREAM_ERROR)
    return StatusResult(verdict=Verdict(True, Reason.OK), document=document)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _read_body(response: httpx.Response) -> bytes:
    """The body; :class:`ValueError` for one larger than :data:`_MAX_BODY_BYTES`: whatever
    listens on that port could otherwise stream into memory until the machine runs out of it.
    """
    received = bytearray()
    for chunk in response.iter_bytes():
        received += chunk
        if len(received) > _MAX_BODY_BYTES:
            raise ValueError("body too large")
    return bytes(received)


@final
class _Deadline:
    """Ends an exchange at a deadline, wherever it waits: a timer thread shuts its socket
    down, which wakes a read or write blocked on it (it then ends as if the peer had gone).

    The socket is learnt from httpcore's ``trace`` extension as the connection is made; one
    made after the deadline is shut down at once.
    """

    def __init__(self, timeout_s: float) -> None:
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: Mapping[str, object]) -> None:
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            get_extra_info = getattr(stream, "get_extra_info", None)
            with self._lock:
                self._socket = get_extra_info("socket") if get_extra_info is not None else None
            self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
        self._shut()

    def _shut(self) -> None:
        with self._lock:
            sock = self._socket if self.expired else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def read_status(
    *, url: str | None = None, token_file: Path | None = None, state_dir: Path | None = None
) -> StatusResult:
    """Find the front door (flags first, then the state files) and fetch its status.

    Refused ``store_error`` when the state directory or a file in it is not as ``serve``
    leaves it, ``not_ready`` when no recorded ``serve`` (of those ``url`` names, when given)
    still listens where it recorded, ``host_not_allowed`` when ``url`` without ``token_file``
    is not the front door of a recorded ``serve`` (``malformed_spec`` when it cannot be
    parsed); see the module docstring. No token is read or sent then.
    """
    others: tuple[str, ...] = ()
    try:
        if url is not None and token_file is not None:
            token = read_token_file(token_file)
        else:
            recorded = read_recorded_serves(_state_dir(state_dir))
            if url is not None:
                # A recorded token, for a URL of the caller's: only if it is the recorded one.
                try:
                    given = _root_of(url)
                except ValueError:
                    return _refused(Reason.MALFORMED_SPEC)
                recorded = [
                    state
                    for state in recorded
                    if given is not None and given == _recorded_root(state)
                ]
                if not recorded:
                    return _refused(Reason.HOST_NOT_ALLOWED)
            alive = [state for state in recorded if is_serving(state)]
            if not alive:
                return _refused(Reason.NOT_READY)
            state = alive[0]
            if url is None:
                others = tuple(other.url for other in alive[1:])
            # The URL checked, never the caller's spelling of it: no two parsers to disagree.
            url = state.url
            if token_file is not None:
                token = read_token_file(token_file)
            else:
                token = read_token_file(state.token_file, private=True)
    except SessionFileError as error:
        return _refused(error.reason)
    return dataclasses.replace(fetch_status(url, token), url=url, others=others)


def _root_of(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` when ``url`` names the root of an ``http`` server, else ``None``.

    Anything more than the root (a path, query, fragment or user) is ``None`` too. Scheme and
    host compare as :func:`~urllib.parse.urlsplit` lowercases them; hosts are not resolved, so
    ``localhost`` and ``127.0.0.1`` differ. Raises :class:`ValueError` when ``url`` cannot be
    parsed (a bad port, an unclosed ``[``).
    """
    parts = urlsplit(url)
    hostname, port = parts.hostname, parts.port  # .port raises for a bad port
    if parts.scheme != "http" or not hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        return None
    return (parts.scheme, hostname, 80 if port is None else port)


def _recorded_root(state: ServeState) -> tuple[str, str, int] | None:
    try:
        return _root_of(state.url)
    except ValueError:
        return None


def _state_dir(state_dir: Path | None) -> Path:
    if state_dir is not None:
        return state_dir
    try:
        return default_state_dir()
    except OSError as error:
        # platformdirs refuses a fallback runtime directory another user owns (PermissionError).
        raise SessionFileError(Reason.STORE_ERROR) from error


def status_table(document: Mapping[str, object]) -> Table:
    """A two-column table of the status document (nested mappings flattened with dots).

    The document's own top-level ``ok`` and ``reason`` (the front door's has none) are left
    out, as :meth:`StatusResult.to_dict` leaves them out: the verdict, which the exit code
    follows, is the only one with those names.
    """
    table = Table(title="companion-runtime front door", show_header=True)
    table.add_column("field")
    table.add_column("value", justify="right")
    shown = {name: value for name, value in document.items() if name not in _VERDICT}
    for name, value in _flatten(shown):
        # Text, not markup: a value such as "[/x]" is shown as it is, never parsed as a tag.
        table.add_row(Text(_escaped(name)), Text(_escaped(value)))
    return table


def _escaped(text: str) -> str:
    """``text`` with every character that is not printable written as its escape (``\\x1b``).

    Names and values come from whatever answers at the URL: an escape sequence among them
    would reach the terminal as it is (rich drops a few control characters, not ESC), where it
    can retitle or clear it, write the clipboard (OSC 52) or, as U+202E does, reorder what
    follows. A space is shown as it is.
    """
    if text.isprintable():
        return text
    return "".join(
        character
        if character.isprintable() or character == " "
        else character.encode("unicode_escape").decode("ascii")
        for character in text
    )


#: Deepest nesting a status document may have (the front door's own has 3 levels), so that
#: printing it, which recurses once per level, stays far from the interpreter's limit.
_MAX_DEPTH = 16


def _depth(document: object) -> int:
    """How deeply ``document``'s mappings and lists nest (iteratively: no recursion to run out)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, Mapping):
            children: list[object] = list(value.values())
        elif isinstance(value, list):
            children = list(value)
        else:
            continue
        deepest = max(deepest, level)
        if level > _MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def _flatten(document: Mapping[str, object], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, value in document.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            nested = _flatten(value, key + ".")
            rows.extend(nested if nested else [(key, "-")])
        else:
            rows.append((key, "-" if value is None else str(value)))
    return rows
