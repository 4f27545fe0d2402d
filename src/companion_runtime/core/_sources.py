"""The source allowlist: may a model be fetched from this URL?

Matching is done on parsed components, never on the raw string, because a string prefix test
accepts ``https://models.example.com.evil.net/`` and ``https://models.example.com@evil.net/``
for the entry ``https://models.example.com``. A URL matches an entry when its scheme is
``https``, its host equals the entry's host (ASCII, case-insensitive), its port equals the
entry's port (443 when absent) and its path lies inside the entry's path on a ``/`` segment
boundary (case-sensitive).

Shapes that different URL parsers disagree about are refused outright as ``malformed_spec``
rather than interpreted: userinfo, backslashes, whitespace or control characters anywhere,
non-ASCII, percent-encoded dots, slashes and backslashes (``%2e``, ``%2f``, ``%5c``, any case,
anywhere in the URL), percent-encoded ``%`` or control characters, a ``%`` not followed by two
hex digits, percent-encoded bytes of the path that are not UTF-8 (an overlong ``.`` such as
``%c0%ae``, which some servers decode to ``.``), Unicode look-alikes of ``.``, ``/`` and the
other ASCII punctuation in the percent-decoded path (``%EF%BC%8E``, a fullwidth ``.``, which
servers that normalise Unicode read as ``.``; see :func:`_plain_under_normalisation`),
characters outside RFC 3986 in the path or
query (``"``, ``<``, ``{``, ``[``, ``|``, ...), ``.``/``..`` or empty path segments (also
with a ``;`` parameter: ``..;x`` is ``..`` to servers that drop path parameters, as Tomcat,
Jetty and Spring do, and so is ``..%3b`` once a front server has decoded it), percent-decoded
segments that Win32 path handling reads as ``.`` or ``..`` (``...``, ``..%20``, ``..%3Ax``:
trailing dots and spaces stripped, ``name:stream`` read as ``name``; also ``..+``, ``+`` being
a space to servers that decode a path as form data, ``..%3F`` and ``..%23``, a query or
fragment behind a front server that decodes the path, and ``..%EF%BE%9E``, ``..`` once
accents are folded away; see :func:`_read_as_dot_segment`), percent-decoded segments that
Win32 path handling reads as a drive (``c:secret``, ``C%3A``: a drive-relative or
drive-absolute name, which a server joining segments onto its root reads outside it; see
:func:`_names_a_drive`), fragments, an empty host, bracketed (IPv6) hosts, scheme-relative
URLs, and ports that are empty, non-numeric or out of range.
The scheme is compared case-insensitively (RFC 3986), so ``HTTPS://`` is ``https``.
Queries are allowed on a source URL (they do not change which host or path is asked for);
an allowlist entry with a query, a fragment or a non-``https`` scheme is invalid and grants
nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Literal, NamedTuple, cast
from urllib.parse import unquote_to_bytes, urlsplit

from companion_runtime.core._reasons import Reason
from companion_runtime.core._verdict import ALLOW, Verdict, deny

__all__ = ["validate_source_url"]

_MALFORMED = deny(Reason.MALFORMED_SPEC)
_SCHEME_NOT_ALLOWED = deny(Reason.SCHEME_NOT_ALLOWED)
_SOURCE_NOT_ALLOWED = deny(Reason.SOURCE_NOT_ALLOWED)

# Space, C0 controls, DEL, backslash, and percent-encoded '.', '/' or '\' in any case.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]|%(?:2[eEfF]|5[cC])")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# A DNS label: 1 to 63 characters (RFC 1035); a name of at most 253 (_MAX_HOST). Longer ones
# are no host any resolver would look up, and Python's IDNA codec raises on them.
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_HOST = 253
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
# RFC 3986 path and query characters only, so that every HTTP client sends exactly this text
# (others, such as '"', '<', '{', '[' or '|', are re-encoded by some clients and not by others).
# Percent-encoded '%' and control characters are refused: a server that decodes twice, or
# stops at NUL, would see a different path than the one that was checked.
_PATH_OR_QUERY = re.compile(
    r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%(?![01][0-9A-Fa-f]|7[fF]|25)[0-9A-Fa-f]{2})*"
)
# The forms a server that normalises Unicode may read a decoded path in (NFKC: .NET, Java and
# Python frameworks; NFKD: some file systems and search back ends).
_NORMALISATION_FORMS: tuple[Literal["NFKC", "NFKD"], ...] = ("NFKC", "NFKD")
# Unicode general categories (first letter) allowed outside ASCII in a decoded path: letters,
# combining marks and numbers. Punctuation, symbols, separators and others are refused.
_NAME_CATEGORIES = frozenset({"L", "M", "N"})
# Default-ignorable code points among those letters and marks (the others are format
# characters, refused already): NFKC_Casefold and servers that drop invisible characters
# remove them, so "..<U+FE0F>" is "..". Hangul fillers, the combining grapheme joiner, Khmer
# inherent vowels, Mongolian and other variation selectors.
_IGNORABLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)
# What may end a decoded segment's name, besides its end (""): ":" (Win32 reads "name:stream"
# as a stream of "name"), and "?" or "#", which start the query or the fragment to a server
# behind a front server that decoded "%3F" or "%23" and passed the path on.
_NAME_ENDS = ("", ":", "?", "#")
# What Win32 path handling strips from the end of a name: dots and spaces, and "+", a space
# to servers that decode a path as form data (Java's URLDecoder, PHP's urldecode).
_STRIPPED_AT_END = ". +"
_DEFAULT_PORT = 443
_ALLOWLIST_TYPES = (list, tuple, set, frozenset)


class _Parsed(NamedTuple):
    host: str
    port: int
    path: str
    has_query_or_fragment: bool


class _Refused(Exception):
    """Internal: carries the verdict out of the parser."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__()
        self.verdict = verdict


def _parse(url: str) -> _Parsed:
    """Parse an ``https`` URL strictly; raise :class:`_Refused` with the denial otherwise."""
    if not url.isascii() or _FORBIDDEN.search(url) is not None:
        raise _Refused(_MALFORMED)
    scheme, colon, rest = url.partition(":")
    if not colon or _SCHEME.fullmatch(scheme) is None:
        # No scheme at all, or a scheme-relative "//host/" URL.
        raise _Refused(_MALFORMED)
    if scheme.lower() != "https":
        raise _Refused(_SCHEME_NOT_ALLOWED)
    if not rest.startswith("//"):
        # "https:/x" or "https:x": no authority, hence no host.
        raise _Refused(_MALFORMED)
    try:
        parts = urlsplit(url, allow_fragments=True)
    except ValueError:
        raise _Refused(_MALFORMED) from None
    netloc = parts.netloc
    if parts.fragment or "#" in url or "@" in netloc or "[" in netloc or "]" in netloc:
        raise _Refused(_MALFORMED)
    host, colon, port_text = netloc.partition(":")
    host = host.lower()
    if (
        not host
        or len(host) > _MAX_HOST
        or any(_HOST_LABEL.fullmatch(label) is None for label in host.split("."))
    ):
        raise _Refused(_MALFORMED)
    if colon:
        if _PORT_DIGITS.fullmatch(port_text) is None:
            raise _Refused(_MALFORMED)
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise _Refused(_MALFORMED)
    else:
        port = _DEFAULT_PORT
    if (
        _PATH_OR_QUERY.fullmatch(parts.path) is None
        or _PATH_OR_QUERY.fullmatch(parts.query) is None
    ):
        raise _Refused(_MALFORMED)
    path = parts.path or "/"
    decoded = path
    if "%" in path:
        # Encoded bytes of the path must be UTF-8: an overlong form of "." or "/" ("%c0%ae",
        # "%e0%80%ae", "%c0%af") is no UTF-8, and servers that decode it loosely (Tomcat's
        # CVE-2008-2938, IIS) read "%c0%ae%c0%ae" as "..", outside the prefix it seems in.
        try:
            decoded = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(_MALFORMED) from None
        if not _plain_under_normalisation(decoded):
            raise _Refused(_MALFORMED)
    # Segments are read decoded, as the server that resolves them does; "%2f" is refused above,
    # so decoding adds no "/". A segment's name is what comes before its first ";": servers
    # that drop path parameters before resolving dot segments read "/models/..;/secret" as
    # "/secret", outside the prefix the string "/models/" says it is in. An encoded ";" counts
    # too: a front server that decodes the path before passing it on turns "..%3b" into "..;".
    names = [segment.partition(";")[0] for segment in decoded.split("/")]
    # names[0] is "" (the path is absolute); the last may be "" (a trailing slash).
    if "" in names[1:-1] or any(
        _read_as_dot_segment(name) or _names_a_drive(name) for name in names[1:]
    ):
        raise _Refused(_MALFORMED)
    return _Parsed(host, port, path, bool(parts.query) or "?" in url)


def _read_as_dot_segment(name: str) -> bool:
    """May a server read the decoded segment name ``name`` as ``.`` or ``..``?

    True for ``.`` and ``..`` themselves, and for every other name that Win32 path handling
    (IIS, Windows file servers, static servers and mirrors on Windows) turns into one: it
    strips trailing dots and spaces from each component (``...``, ``.. ``, ``. .``) and reads
    ``name:stream`` as a stream of ``name`` (``..:x``, ``..::$DATA``, ``:x``). A ``+`` counts
    as a space (``..+``: servers that decode a path as form data read it as ``.. ``), and a
    ``?`` or ``#`` ends the name as ``:`` does (``..?x``: ``%3F`` decoded by a front server is
    a query to the server behind it). So: a name that is not empty and whose part before its
    first ``:``, ``?`` or ``#`` is made of nothing but dots, spaces and ``+``, as written, in
    its NFKC form or with accents folded away (see :func:`_readings`: U+FF9E, a letter, is a
    combining mark in NFKD, so ``..`` followed by it is ``..`` once marks are dropped).
    An empty name is left to the caller (``//`` is refused, a trailing ``/`` is not); ``x.``,
    ``a..b``, ``.hidden``, ``v1.0`` and ``c++`` are names.
    """
    # The part before the first end is made of nothing but what Win32 strips exactly when
    # the first character that is none of those is an end: one pass, no split.
    if name.isascii():
        # An ASCII name is its only reading (see _readings); the empty one is no dot segment.
        return bool(name) and name.lstrip(_STRIPPED_AT_END)[:1] in _NAME_ENDS
    return any(reading.lstrip(_STRIPPED_AT_END)[:1] in _NAME_ENDS for reading in _readings(name))


def _names_a_drive(name: str) -> bool:
    """May a server read the decoded segment name ``name`` as a drive?

    Win32 path handling reads a component whose second character is ``:`` as a path on a
    drive: ``c:secret`` is drive-relative, ``c:`` followed by ``/secret`` drive-absolute. A
    Windows server that joins the segments onto its document root the way ``PathCombine`` or
    ``os.path.join`` does (``ntpath.join("D:\\site\\models", "c:secret")`` is ``c:secret``)
    leaves the root, as with a dot segment. Any character before the ``:`` counts, not only
    ``A`` to ``Z``: Windows takes any one UTF-16 code unit as a drive letter (``subst +: C:\\x``
    works), and so does Python's ``ntpath``. The name is read in each of its
    :func:`_readings`. ``xy:z``, ``llama3:8b`` and ``model.gguf:x`` (a stream of
    ``model.gguf``) are names.
    """
    if name.isascii():
        return name[1:2] == ":"
    return any(text[1:2] == ":" for text in _readings(name))


def _readings(name: str) -> tuple[str, ...]:
    """The ways a server may read the decoded segment name ``name``, which is not ASCII: as
    written, in its NFKC form (two Hangul jamo compose into one syllable) and in its NFKD form
    without combining marks (``c`` with an accent is ``c`` to a server that folds accents
    away). Both forms of an ASCII name are the name itself, so the callers read an ASCII name
    as written without calling this; that halves the time a typical URL takes."""
    folded = "".join(
        char for char in unicodedata.normalize("NFKD", name) if unicodedata.category(char)[0] != "M"
    )
    return (name, unicodedata.normalize("NFKC", name), folded)


def _ascii_punctuation(text: str) -> tuple[str, ...]:
    """The ASCII characters of ``text`` that are neither letters nor digits, in order: every
    character the checks above look at (``.``, ``/``, ``\\``, ``;``, ``%``, ``?``, ``#``, ...)."""
    return tuple(char for char in text if char.isascii() and not char.isalnum())


def _plain_under_normalisation(decoded: str) -> bool:
    """Does a server that normalises Unicode read the same path in ``decoded``?

    ``decoded`` is the percent-decoded path, valid UTF-8. A fullwidth full stop (U+FF0E, sent
    as ``%EF%BC%8E``) is ``.`` under NFKC, so ``/models/%EF%BC%8E%EF%BC%8E/secret`` is
    ``/models/../secret`` to a server that normalises before it resolves dot segments, outside
    the prefix it was checked against. Two rules, both on the text and on its NFKC and NFKD
    forms:

    - its ASCII punctuation (:func:`_ascii_punctuation`) is the same in all three: a form
      that gains or loses a ``.``, ``/``, ``;``, ``%`` or any other one is refused;
    - outside ASCII there are only letters, combining marks and numbers (Unicode categories
      L, M, N): the look-alikes no normalisation form maps but other tables do (division
      slash U+2215, fraction slash U+2044, big solidus U+29F8, set minus U+2216, ideographic
      full stop U+3002, which Windows "best fit" conversions and IDNA turn into ``/``, ``\\``
      or ``.``) are punctuation or symbols, and so are refused with every other one.

    Names in any script (``modèle.gguf``, ``模型.gguf``, ``モデル.gguf``) keep both. Before
    them, two more: no default-ignorable letter or mark (a variation selector, a Hangul
    filler: servers that drop invisible characters read ``..<U+FE0F>`` as ``..``), and every
    combining mark on a letter or a number (:func:`_marks_on_names`).
    """
    if decoded.isascii():
        return True
    if _IGNORABLE.search(decoded) or not _marks_on_names(decoded):
        return False
    punctuation = _ascii_punctuation(decoded)
    for text in (decoded, *(unicodedata.normalize(form, decoded) for form in _NORMALISATION_FORMS)):
        if _ascii_punctuation(text) != punctuation:
            return False
        for char in text:
            if not char.isascii() and unicodedata.category(char)[0] not in _NAME_CATEGORIES:
                return False
    return True


def _marks_on_names(decoded: str) -> bool:
    """Does every combining mark in ``decoded`` sit on a letter or a number?

    Servers that fold accents away (NFKD, then marks dropped) read ``..`` in ``..%CC%81``
    (two dots and a combining acute accent); a mark on a letter (``mode%CC%80le``) is a name.
    """
    on_a_name = False
    for char in decoded:
        if unicodedata.category(char)[0] != "M":
            on_a_name = char.isalnum()
        elif not on_a_name:
            return False
    return True


@lru_cache(maxsize=256)
def _parse_entry(entry: str) -> _Parsed | None:
    """Parse an allowlist entry; ``None`` when it is not a valid ``https`` prefix."""
    try:
        parsed = _parse(entry)
    except _Refused:
        return None
    if parsed.has_query_or_fragment:
        return None
    return parsed


def _inside(path: str, prefix: str) -> bool:
    if path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix + "/")


def validate_source_url(url: object, allowed_source_urls: object) -> Verdict:
    """May a model be fetched from ``url`` under the allowlist ``allowed_source_urls``?

    Never raises. ``scheme_not_allowed`` for a scheme other than ``https``;
    ``malformed_spec`` for a URL that is not a ``str`` or is refused as ambiguous (see the
    module documentation) and for an allowlist that is not a list, tuple or set;
    ``source_not_allowed`` when no valid entry covers the URL (an empty allowlist covers
    nothing).
    """
    try:
        if type(url) is not str:
            return _MALFORMED
        try:
            parsed = _parse(url)
        except _Refused as refused:
            return refused.verdict
        if type(allowed_source_urls) not in _ALLOWLIST_TYPES:
            return _MALFORMED
        for entry in cast("Iterable[object]", allowed_source_urls):
            if type(entry) is not str:
                continue
            allowed = _parse_entry(entry)
            if (
                allowed is not None
                and parsed.host == allowed.host
                and parsed.port == allowed.port
                and _inside(parsed.path, allowed.path)
            ):
                return ALLOW
        return _SOURCE_NOT_ALLOWED
    except Exception:  # noqa: BLE001  # pragma: no cover - defensive (e.g. MemoryError)
        return _MALFORMED
