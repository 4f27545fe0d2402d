"""Independent oracles and input builders shared by the fuzz targets and the long fuzz tests.

An oracle here never calls the code it judges. The source-URL oracle parses with
``urllib.parse`` *and* with ``httpx.URL`` (the parser the downloader actually connects with),
so an accepted URL must name the allowlisted host, port and path under both readings; a
disagreement between parsers is exactly the hole a string-prefix allowlist fell into.

The gate oracle restates the contract of ``evaluate_runtime_request`` from the outside: an
``ok`` verdict requires a ``ready`` lifecycle, a free in-flight slot and every observed resource
at or under its ceiling, all checked on the raw attribute values.
"""

from __future__ import annotations

import ipaddress
import math
import ntpath
import random
import re
import struct
import unicodedata
from collections.abc import Sequence
from typing import NoReturn, Protocol
from urllib.parse import unquote, urlsplit

import httpx

from companion_runtime import Reason, Verdict

__all__ = [
    "ALLOWLIST_ENTRIES",
    "URL_TOKENS",
    "gate_oracle_violation",
    "random_url",
    "url_oracle_violation",
]

#: Allowlist entries the generators draw from: hosts with and without a path, a port, a
#: trailing slash, an IP literal, and entries that must grant nothing.
ALLOWLIST_ENTRIES: tuple[str, ...] = (
    "https://models.example.com/",
    "https://cdn.example.org/models/",
    "https://cdn.example.org/models",
    "https://mirror.example.net:8443/blobs/",
    "https://127.0.0.1/",
    "https://xn--bcher-kva.example/",
    "http://plain.example.com/",
    "https://models.example.com/?q=1",
    "https://user@models.example.com/",
    "https://[::1]/",
    "",
    "models.example.com",
)

#: Fragments a URL is assembled from: the pieces that confuse URL parsers and prefix matchers.
URL_TOKENS: tuple[str, ...] = (
    "https://",
    "HTTPS://",
    "http://",
    "https:",
    "https:/",
    "//",
    "/",
    "\\",
    "@",
    ":",
    ":443",
    ":8443",
    ":0",
    ":65536",
    ":-1",
    ":+443",
    "?",
    "#",
    "&",
    "=",
    ".",
    "..",
    "/../",
    "/./",
    ";",
    "..;",
    "..%3b",
    "%3B",
    # Dots, spaces and streams that Win32 path handling strips: "...", ".. " and "..:x" are "..".
    "...",
    "..%20",
    "%20",
    "..%3A",
    "%3a",
    ":$DATA",
    # "..%3F" and "..%23" are ".." behind a decoding front server, "..+" is ".. " to servers
    # that decode form data, and "..%EF%BE%9E" is ".." once accents are folded away.
    "+",
    "..+",
    "%3F",
    "%23",
    "%EF%BE%9E",
    # A name whose second character is ":" is a drive to Win32 path handling: "c:secret" is
    # drive-relative, outside the root a Windows server joins segments onto.
    "c:",
    "C%3A",
    "x%CC%81:",
    "%2e",
    "%2E",
    "%2f",
    "%5c",
    "%40",
    "%00",
    "%",
    "[",
    "]",
    "[::1]",
    "\t",
    "\n",
    " ",
    "\x00",
    "\x7f",
    "\u3002",
    "\uff0e",
    "\u2024",
    # Percent-encoded UTF-8 look-alikes of "." "/" "\\" ";" (fullwidth, one dot leader, division
    # slash, fraction slash, set minus, fullwidth semicolon), and a plain accented letter.
    "%EF%BC%8E",
    "%ef%bc%8e%ef%bc%8e",
    "%E2%80%A4",
    "%EF%BC%8F",
    "%E2%88%95",
    "%E2%81%84",
    "%E2%88%96",
    "%EF%BC%9B",
    "%C3%A8",
    "ß",
    "models.example.com",
    "MODELS.EXAMPLE.COM",
    "models.example.com.",
    "models.example.com.evil.net",
    "evil.net",
    "cdn.example.org",
    "mirror.example.net",
    "127.0.0.1",
    "2130706433",
    "0x7f.1",
    "127.1",
    "localhost",
    "xn--bcher-kva.example",
    "bücher.example",
    "models",
    "models/",
    "blobs",
    "tiny.gguf",
    "user",
    "user:pass",
)


def _https_view(url: str) -> tuple[str, int, list[str]] | None:
    """(host, port, path segments) of an ``https`` URL under *both* parsers; None if unusable.

    ``None`` means the oracle cannot see an unambiguous ``https`` target in the text, so an
    ``ok`` verdict for it is a violation.
    """
    try:
        split = urlsplit(url)
        split_port = split.port
    except ValueError:
        return None
    if split.scheme.lower() != "https" or split.username is not None or "@" in split.netloc:
        return None
    split_host = (split.hostname or "").lower()
    if not split_host:
        return None
    try:
        seen_by_httpx = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if seen_by_httpx.scheme != "https" or seen_by_httpx.userinfo:
        return None
    if seen_by_httpx.raw_host.decode("ascii", "replace").lower() != split_host:
        return None
    port = 443 if split_port is None else split_port
    if (seen_by_httpx.port or 443) != port:
        return None
    raw_path = split.path or "/"
    segments = raw_path.split("/")
    # httpx normalises dot segments away; the text itself must not contain any, or the two
    # readings would name different resources. Servers that drop ";" parameters before
    # resolving dots read "..;x" as "..", and so "..%3bx" once a front server has decoded it;
    # "..%3Fx" and "..%23x" are ".." followed by a query or fragment to a server behind it.
    if any(
        re.split(r";|%3[bBfF]|%23", segment, maxsplit=1)[0] in (".", "..") for segment in segments
    ):
        return None
    # Nor any that Win32 path handling (IIS, Windows file servers and mirrors) reads as one,
    # or as a drive: joined onto the server's root, "c:secret" is outside it.
    if any(_windows_reads_a_dot_segment(unquote(segment)) for segment in segments):
        return None
    if any(_windows_reads_a_drive(unquote(segment)) for segment in segments):
        return None
    # httpx percent-encodes characters such as "}" on the wire; both readings must still
    # decode to the same path.
    if seen_by_httpx.path != unquote(raw_path):
        return None
    if not _same_under_normalisation(unquote(raw_path)):
        return None
    return split_host, port, segments


def _windows_reads_a_dot_segment(decoded_segment: str) -> bool:
    """Does Windows read ``decoded_segment`` as ``.``, ``..`` or nothing, where its text says
    it is a name? Win32 drops a ``:stream`` and then trailing dots and spaces from a
    component; a server that drops path parameters drops ``;...`` first, one behind a
    decoding front server what a ``?`` or ``#`` starts, and one that decodes form data reads
    ``+`` as a space. Read as written, under NFKC, and with combining marks dropped after NFKD
    (a server that folds accents)."""
    name = decoded_segment.split(";")[0]
    readings = [name, *(unicodedata.normalize(form, name) for form in ("NFKC", "NFKD"))]
    readings.append("".join(char for char in readings[2] if unicodedata.combining(char) == 0))
    for reading in readings:
        component = re.split("[:?#]", reading)[0].replace("+", " ")
        while component.endswith((".", " ")):
            component = component[:-1]
        if name and component in ("", ".", ".."):
            return True
    return False


def _windows_reads_a_drive(decoded_segment: str) -> bool:
    """Does Windows read ``decoded_segment`` as a path on a drive (``c:``, ``c:secret``)?
    ``ntpath.join(root, name)`` drops ``root`` for such a name, as ``PathCombine`` does; any
    one character is a drive letter to both. Read as written, under NFKC and NFKD, and with
    combining marks dropped (a server that folds accents), after a ``;`` parameter is dropped.
    """
    name = decoded_segment.split(";")[0]
    readings = [name, *(unicodedata.normalize(form, name) for form in ("NFKC", "NFKD"))]
    readings.append("".join(char for char in readings[2] if unicodedata.combining(char) == 0))
    root = "\\site\\root"  # no drive of its own, so every drive in a name replaces it
    return any(not ntpath.join(root, reading).startswith(root) for reading in readings if reading)


#: What the path's structure is made of, for a server that resolves or splits it.
_STRUCTURAL = "./\\;%?#"
#: Look-alikes no Unicode normalisation form maps but Windows "best fit" conversions and IDNA
#: do (a sample, not the tables).
_BEST_FIT = str.maketrans(
    {"\u2215": "/", "\u2044": "/", "\u29f8": "/", "\u2216": "\\", "\u3002": "."}
)


def _same_under_normalisation(decoded: str) -> bool:
    """Does a server that normalises the decoded path (NFKC, NFKD, best fit) read the same
    structural characters in it?"""
    structure = [char for char in decoded if char in _STRUCTURAL]
    readings = [unicodedata.normalize(form, decoded) for form in ("NFKC", "NFKD")]
    readings.append(decoded.translate(_BEST_FIT))
    return all([char for char in text if char in _STRUCTURAL] == structure for text in readings)


def _same_host(left: str, right: str) -> bool:
    if left == right:
        return True
    try:
        return ipaddress.ip_address(left) == ipaddress.ip_address(right)
    except ValueError:
        return False


def _segments_inside(url_segments: list[str], entry_segments: list[str]) -> bool:
    prefix = entry_segments[:-1] if entry_segments[-1] == "" else entry_segments
    return url_segments[: len(prefix)] == prefix


def url_oracle_violation(url: object, allowlist: object, verdict: object) -> str | None:
    """Why ``verdict`` breaks the allowlist contract for (url, allowlist); None if it holds.

    Checks the verdict's type, and that an ``ok`` verdict is only given to a ``str`` URL
    whose text has no refused shapes and that names, under both parsers, the host, port and a
    path inside an entry that is itself a plain ``https`` prefix.
    """
    if type(verdict) is not Verdict:
        return "not a Verdict"
    if type(verdict.reason) is not Reason or verdict.ok is not (verdict.reason is Reason.OK):
        return "verdict ok/reason inconsistent"
    if not verdict.ok:
        return None
    if type(url) is not str:
        return "non-str URL accepted"
    if not url.isascii():
        return "non-ASCII URL accepted"
    if any(ord(char) <= 0x20 or char in "\x7f\\" for char in url):
        return "whitespace, control character or backslash accepted"
    lowered = url.lower()
    if any(encoded in lowered for encoded in ("%2e", "%2f", "%5c")):
        return "percent-encoded dot or slash accepted"
    if "#" in url:
        return "fragment accepted"
    target = _https_view(url)
    if target is None:
        return "accepted URL has no unambiguous https target"
    host, port, segments = target
    if not isinstance(allowlist, list | tuple | set | frozenset):
        return "accepted under an allowlist that is not a list, tuple or set"
    for entry in allowlist:
        if type(entry) is not str:
            continue
        entry_view = _https_view(entry)
        if entry_view is None or "?" in entry or "#" in entry:
            continue
        entry_host, entry_port, entry_segments = entry_view
        if (
            _same_host(host, entry_host)
            and port == entry_port
            and _segments_inside(segments, entry_segments)
        ):
            return None
    return "accepted URL is inside no valid allowlist entry"


def random_url(rng: random.Random) -> str:
    """A URL-ish string: mostly assembled from :data:`URL_TOKENS`, sometimes raw noise."""
    mode = rng.randrange(4)
    if mode == 0:
        alphabet = "ab./:@?#%2e5cfEF\\ \t[]-_019"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
    pieces: list[str] = []
    if mode >= 2:
        # Start from a real entry so that near-misses around allowed URLs are common.
        pieces.append(rng.choice(ALLOWLIST_ENTRIES))
    for _ in range(rng.randrange(1, 8)):
        pieces.append(rng.choice(URL_TOKENS))
    return "".join(pieces)


def random_allowlist(rng: random.Random) -> object:
    """An allowlist: usually a list/tuple of entries, sometimes a wrong type."""
    mode = rng.randrange(10)
    if mode == 0:
        return rng.choice(ALLOWLIST_ENTRIES)
    if mode == 1:
        return None
    entries: Sequence[object] = rng.sample(ALLOWLIST_ENTRIES, rng.randrange(1, 4))
    return tuple(entries) if mode == 2 else list(entries)


def _finite_non_negative(value: object) -> int | float | None:
    # Compared natively, not through float(): an int too large for a float is still finite.
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float:
        return value if math.isfinite(value) and value >= 0 else None
    return None


def gate_oracle_violation(
    *,
    lifecycle_state: object,
    admission_state: object,
    resource_observation: object,
    resource_limits: object,
    verdict: object,
) -> str | None:
    """Why the gate's ``verdict`` breaks its contract for these arguments; None if it holds."""
    if type(verdict) is not Verdict:
        return "not a Verdict"
    if type(verdict.reason) is not Reason or verdict.ok is not (verdict.reason is Reason.OK):
        return "verdict ok/reason inconsistent"
    if not verdict.ok:
        return None
    from companion_runtime import (
        AdmissionState,
        Lifecycle,
        LifecycleState,
        ResourceLimits,
        ResourceObservation,
    )

    # getattr with a default: a forged instance may have a slot that was never set.
    if (
        type(lifecycle_state) is not Lifecycle
        or getattr(lifecycle_state, "state", None) is not LifecycleState.READY
    ):
        return "allowed while not ready"
    if type(admission_state) is not AdmissionState:
        return "allowed with a malformed admission state"
    max_in_flight, queue_bound, in_flight, queued = (
        getattr(admission_state, name, None)
        for name in ("max_in_flight", "queue_bound", "in_flight", "queued")
    )
    if not (
        type(max_in_flight) is int
        and type(queue_bound) is int
        and type(in_flight) is int
        and type(queued) is int
    ):
        return "allowed with non-int admission counters"
    if not 0 <= in_flight < max_in_flight:
        return "allowed without a free in-flight slot"
    if not 0 <= queued <= queue_bound:
        return "allowed with an out-of-range queue"
    if type(resource_limits) is not ResourceLimits or type(resource_observation) is not (
        ResourceObservation
    ):
        return "allowed with malformed resource values"
    pairs = tuple(
        (getattr(resource_observation, observed, None), getattr(resource_limits, ceiling, None))
        for observed, ceiling in (
            ("ram_bytes", "max_ram_bytes"),
            ("vram_bytes", "max_vram_bytes"),
            ("cpu_percent", "max_cpu_percent"),
        )
    )
    for observed, ceiling in pairs:
        observed_number = _finite_non_negative(observed)
        ceiling_number = _finite_non_negative(ceiling)
        if observed_number is None or ceiling_number is None or ceiling_number == 0:
            return "allowed with a malformed observation or limit"
        if observed_number > ceiling_number:
            return "allowed over a resource ceiling"
    if not 0 < pairs[2][1] <= 100:  # type: ignore[operator]
        return "allowed with a CPU ceiling outside (0, 100]"
    return None


class ByteSource(Protocol):
    """The few draws the gate-input decoder needs; a seeded RNG or a fuzzer's data provider."""

    def int_in(self, low: int, high: int) -> int:
        """An int in [low, high]."""
        ...

    def any_float(self) -> float:
        """Any float, NaN and infinities included."""
        ...


class RandomSource:
    """:class:`ByteSource` over :class:`random.Random` (seeded, reproducible)."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def int_in(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def any_float(self) -> float:
        choice = self._rng.randrange(8)
        if choice == 0:
            return self._rng.choice((math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7e308))
        if choice == 1:
            return struct.unpack("<d", self._rng.randbytes(8))[0]  # type: ignore[no-any-return]
        return self._rng.uniform(-10.0, 2e10)


class _Hostile:
    """A value whose every comparison, hash and conversion raises."""

    def _boom(self, *_args: object) -> NoReturn:
        raise RuntimeError("hostile value")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _boom  # type: ignore[assignment]
    __hash__ = __bool__ = __index__ = __int__ = __float__ = _boom  # type: ignore[assignment]


class _SneakyInt(int):
    """An int subclass that claims to be below everything."""

    def __lt__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return False


_SMALL_INTS = (-1, 0, 1, 2, 3, 4, 64, 2**31, 2**63, 10**30)


def _scalar(source: ByteSource) -> object:
    kind = source.int_in(0, 11)
    if kind <= 2:
        return _SMALL_INTS[source.int_in(0, len(_SMALL_INTS) - 1)]
    if kind == 3:
        return source.int_in(-(2**70), 2**70)
    if kind <= 5:
        return source.any_float()
    if kind == 6:
        return bool(source.int_in(0, 1))
    if kind == 7:
        return None
    if kind == 8:
        return ("ready", "0", "1e9", "nan", "")[source.int_in(0, 4)]
    if kind == 9:
        return _SneakyInt(source.int_in(-5, 5))
    if kind == 10:
        return _Hostile()
    return [source.int_in(0, 3)]


def _forge(cls: type, fields: Sequence[str], source: ByteSource) -> object:
    """An instance of ``cls`` that skipped validation: fields set by force, some left unset."""
    instance = object.__new__(cls)
    for field in fields:
        if source.int_in(0, 5) == 0:
            continue  # leave the slot unset: reading it raises AttributeError
        object.__setattr__(instance, field, _scalar(source))
    return instance


def decode_gate_arguments(source: ByteSource) -> dict[str, object]:
    """Keyword arguments for ``evaluate_runtime_request``, from valid to hostile.

    Each argument is independently a real valid value (often, so the later checks are
    reached), a valid value with forced fields, an instance forged past validation, a
    look-alike of another type, or a bare scalar.
    """
    from companion_runtime import (
        AdmissionState,
        Lifecycle,
        LifecycleState,
        ResourceLimits,
        ResourceObservation,
    )

    states = tuple(LifecycleState)

    def lifecycle() -> object:
        kind = source.int_in(-6, 7)
        if kind <= 3:
            # Mostly ready, so that admission and resources are exercised.
            return Lifecycle(LifecycleState.READY if kind <= 2 else states[source.int_in(0, 3)])
        if kind == 4:
            return _forge(Lifecycle, ("state",), source)
        if kind == 5:
            return ("ready", LifecycleState.READY, {"state": "ready"})[source.int_in(0, 2)]
        if kind == 6:
            forced = Lifecycle(LifecycleState.READY)
            object.__setattr__(forced, "state", _scalar(source))
            return forced
        return _scalar(source)

    def admission() -> object:
        kind = source.int_in(-4, 5)
        if kind <= 2:
            max_in_flight = source.int_in(1, 8)
            queue_bound = source.int_in(1, 8)
            return AdmissionState(
                max_in_flight,
                queue_bound,
                source.int_in(0, max_in_flight),
                source.int_in(0, queue_bound),
            )
        if kind == 3:
            return _forge(
                AdmissionState, ("max_in_flight", "queue_bound", "in_flight", "queued"), source
            )
        if kind == 4:
            forced = AdmissionState(4, 4, 0, 0)
            field = ("max_in_flight", "queue_bound", "in_flight", "queued")[source.int_in(0, 3)]
            object.__setattr__(forced, field, _scalar(source))
            return forced
        return _scalar(source)

    def number_near(ceiling: float) -> float | int:
        kind = source.int_in(0, 3)
        if kind == 0:
            return ceiling
        if kind == 1:
            return int(ceiling) + source.int_in(-1, 1)
        if kind == 2:
            return ceiling * source.int_in(0, 20) / 10
        return abs(source.any_float()) if source.int_in(0, 1) else source.int_in(0, 2**40)

    def limits() -> object:
        kind = source.int_in(-4, 4)
        if kind <= 2:
            return ResourceLimits(
                source.int_in(1, 2**36), source.int_in(1, 2**34), source.int_in(1, 100)
            )
        if kind == 3:
            return _forge(
                ResourceLimits, ("max_ram_bytes", "max_vram_bytes", "max_cpu_percent"), source
            )
        return _scalar(source)

    resource_limits = limits()
    slot_values = _slots_of(resource_limits) if type(resource_limits) is ResourceLimits else []
    ceilings: Sequence[object] = (
        slot_values
        if len(slot_values) == 3 and all(type(value) in (int, float) for value in slot_values)
        else (2**30, 2**30, 50)
    )

    def observation() -> object:
        kind = source.int_in(-4, 4)
        if kind <= 2:
            values = []
            for ceiling in ceilings:
                finite = _finite_non_negative(ceiling)
                value = number_near(1.0 if finite is None else finite)
                values.append(value if _finite_non_negative(value) is not None else 0)
            return ResourceObservation(*values)
        if kind == 3:
            return _forge(ResourceObservation, ("ram_bytes", "vram_bytes", "cpu_percent"), source)
        return _scalar(source)

    return {
        "lifecycle_state": lifecycle(),
        "admission_state": admission(),
        "resource_observation": observation(),
        "resource_limits": resource_limits,
    }


def _slots_of(instance: object) -> list[object]:
    return [getattr(instance, name, None) for name in getattr(type(instance), "__slots__", ())]


# --- manifests --------------------------------------------------------------------------------

#: A manifest that loads; the fuzzers mutate it field by field.
BASE_MANIFEST_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("model", "name", '"tinyllama"'),
    ("model", "url", '"https://models.example.com/tiny.gguf?token=SECRET-TOKEN"'),
    ("model", "sha256", '"' + "ab" * 32 + '"'),
    ("model", "size_bytes", "1024"),
    ("sources", "allow", '["https://models.example.com/"]'),
    ("runtime", "command", '["/usr/bin/llama-server", "-m", "{model_path}", "--port", "{port}"]'),
    ("runtime", "health_path", '"/health"'),
    ("runtime", "ready_timeout_s", "120"),
    ("limits", "max_in_flight", "4"),
    ("limits", "queue_bound", "64"),
    ("limits", "queue_timeout_s", "30"),
    ("limits", "max_ram_bytes", "8_000_000_000"),
    ("limits", "max_vram_bytes", "4_000_000_000"),
    ("limits", "max_cpu_percent", "90"),
)

#: TOML values that are each wrong somewhere: types, ranges, encodings, sizes, depth.
HOSTILE_TOML_VALUES: tuple[str, ...] = (
    "0",
    "-1",
    "1",
    "true",
    "nan",
    "inf",
    "-inf",
    "-0.0",
    "1e308",
    "0.5",
    "100.0000001",
    "9223372036854775807",
    "0x7fffffff",
    "1979-05-27T07:32:00Z",
    '""',
    '"\\u0000"',
    '"/"',
    '" "',
    '"ftp://models.example.com/x"',
    '"https://models.example.com.evil.net/x"',
    '"https://models.example.com@evil.net/x"',
    '"HTTPS://MODELS.EXAMPLE.COM/x"',
    '"' + "AB" * 32 + '"',
    '"' + "g" * 64 + '"',
    "[]",
    '[""]',
    "[1, 2]",
    '["https://models.example.com/", 3]',
    "{}",
    "{ a = 1 }",
    '"' + "x" * 200 + '"',
    "'''multi\nline'''",
)

_TOML_TOKENS: tuple[str, ...] = (
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    '"',
    "'",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\\u",
    "model",
    "sources",
    "runtime",
    "limits",
    "allow",
    "url",
    "sha256",
    "size_bytes",
    "command",
    "1",
    "9" * 40,
)

#: What a :class:`~companion_runtime.bind.manifest.ManifestError` message may look like: a
#: dotted field name and a reason code, nothing taken from the file.
MANIFEST_ERROR_MESSAGE = re.compile(r"[a-z_]+(?:\.[a-z0-9_]+)?(?:\[[0-9]+\])?: [a-z_]+")


def render_manifest(fields: Sequence[tuple[str, str, str]], extra_lines: Sequence[str] = ()) -> str:
    """TOML text for ``fields`` (table, key, raw TOML value), grouped by table, in order."""
    tables: dict[str, list[str]] = {}
    for table, key, value in fields:
        tables.setdefault(table, []).append(f"{key} = {value}")
    lines: list[str] = []
    for table, entries in tables.items():
        lines.append(f"[{table}]")
        lines.extend(entries)
    lines.extend(extra_lines)
    return "\n".join(lines) + "\n"


def random_manifest_text(source: ByteSource, raw: str = "") -> str:
    """Manifest text: the base manifest with fields replaced, dropped or added, or noise."""
    mode = source.int_in(0, 9)
    if mode == 0:
        return raw
    if mode == 1:
        return "".join(
            _TOML_TOKENS[source.int_in(0, len(_TOML_TOKENS) - 1)]
            for _ in range(source.int_in(0, 30))
        )
    if mode == 2:
        # Deep nesting: a parser that recurses must still fail with a manifest error.
        depth = source.int_in(1, 3000)
        opener, closer = ("[", "]") if source.int_in(0, 1) else ("{ a = ", " }")
        return render_manifest(BASE_MANIFEST_FIELDS[:4]) + (
            f"[limits]\nmax_in_flight = {opener * depth}1{closer * depth}\n"
        )
    fields = list(BASE_MANIFEST_FIELDS)
    for _ in range(source.int_in(0, 3)):
        index = source.int_in(0, len(fields) - 1)
        table, key, _value = fields[index]
        action = source.int_in(0, 5)
        if action == 0:
            del fields[index]
            if not fields:
                break
        elif action == 1:
            fields[index] = (table, key, str(source.int_in(-(2**70), 2**1400)))
        elif action == 2 and raw:
            fields[index] = (table, key, raw)
        else:
            value = HOSTILE_TOML_VALUES[source.int_in(0, len(HOSTILE_TOML_VALUES) - 1)]
            fields[index] = (table, key, value)
    extra: list[str] = []
    if source.int_in(0, 7) == 0:
        extra.append("[unknown]\nsha265 = 1")
    return render_manifest(fields, extra)


def manifest_outcome_violation(outcome: object) -> str | None:
    """Why the outcome of loading a manifest breaks the loader's contract; None if it holds.

    ``outcome`` is the loaded manifest or the exception the loader raised. Only
    ``ManifestError`` may escape; its message names a field and a reason, never a value; a
    manifest that loads has a model URL inside its own allowlist and a valid integrity spec.
    """
    from companion_runtime import validate_integrity_spec, validate_source_url
    from companion_runtime.bind.manifest import Manifest, ManifestError

    if isinstance(outcome, ManifestError):
        if type(outcome.reason) is not Reason:
            return "ManifestError without a Reason"
        if MANIFEST_ERROR_MESSAGE.fullmatch(str(outcome)) is None:
            return "ManifestError message is not '<field>: <reason>'"
        return None
    if isinstance(outcome, BaseException):
        return f"undocumented exception escaped: {type(outcome).__name__}"
    if type(outcome) is not Manifest:
        return "loader returned something other than a Manifest"
    if not validate_source_url(outcome.model.url, list(outcome.sources.allow)).ok:
        return "loaded a model URL outside its own allowlist"
    if not validate_integrity_spec(outcome.model.sha256, outcome.model.size_bytes).ok:
        return "loaded a malformed integrity spec"
    limits = outcome.limits
    if not (limits.max_in_flight > 0 and limits.queue_bound > 0 and limits.max_ram_bytes > 0):
        return "loaded non-positive limits"
    if not 0 < limits.max_cpu_percent <= 100:
        return "loaded a CPU ceiling outside (0, 100]"
    if not (math.isfinite(limits.queue_timeout_s) and limits.queue_timeout_s > 0):
        return "loaded a non-finite or non-positive queue timeout"
    return None
