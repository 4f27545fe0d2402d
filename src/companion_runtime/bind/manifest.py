"""The model manifest: one TOML file naming the model, where it may come from, how to run it.

Every field is type-checked here, once, so the rest of the bind layer can trust a
:class:`Manifest`. The model's URL is checked against the manifest's own allowlist and its digest
and size against the integrity rules by the pure core, so a manifest that loads is one the
downloader can act on.

Format (``[runtime]`` and ``[limits]`` fields other than ``command`` are optional)::

    [model]
    name = "tinyllama"                       # display name, printable, 1-128 characters
    url = "https://models.example.com/tinyllama-q4.gguf"
    sha256 = "<64 lowercase hex>"
    size_bytes = 668788096

    [sources]
    allow = ["https://models.example.com/"]  # https URL prefixes, at least one

    [runtime]
    command = ["/usr/local/bin/llama-server", "-m", "{model_path}", "--port", "{port}"]
    health_path = "/health"                  # default "/health"
    ready_timeout_s = 120                    # default 120

    [limits]
    max_in_flight = 4                        # default 4
    queue_bound = 64                         # default 64
    queue_timeout_s = 30                     # default 30
    max_ram_bytes = 8_000_000_000            # default 8 GiB
    max_vram_bytes = 4_000_000_000           # default 8 GiB (no GPU: the observation is 0)
    max_cpu_percent = 90                     # default 100 (share of the whole machine)

Unknown tables and unknown keys are refused: a misspelt key (``sha265``) must not silently fall
back to a default. Errors are :class:`ManifestError` whose message is ``"<field>: <reason>"`` and
never echoes a value from the file (a URL may carry a token in its query).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from companion_runtime.bind.regular_file import read_regular_file
from companion_runtime.core import Reason, validate_integrity_spec, validate_source_url

__all__ = [
    "DEFAULT_HEALTH_PATH",
    "DEFAULT_LIMITS",
    "DEFAULT_READY_TIMEOUT_S",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DOTS",
    "LimitsSpec",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "RuntimeSpec",
    "SourcesSpec",
    "load_manifest",
    "load_manifest_text",
    "manifest_from_dict",
]

#: Health path used when ``[runtime] health_path`` is absent (llama-server's).
DEFAULT_HEALTH_PATH: Final = "/health"
#: Seconds a starting runtime has to turn healthy when ``ready_timeout_s`` is absent.
DEFAULT_READY_TIMEOUT_S: Final = 120.0
#: A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES: Final = 1024 * 1024
#: Most ``.`` a manifest may hold outside its strings and comments: its dotted keys and floats
#: have a handful. tomllib's time and memory grow with the square of a dotted key's length
#: (``a.a.a...`` of 10,000 parts took 3 s and 400 MB, of 100,000 parts more memory than the
#: machine had), so a longer one is refused before it is parsed.
MAX_MANIFEST_DOTS: Final = 256
_MAX_NAME_CHARS: Final = 128
_GIB: Final = 1024**3


@final
class ManifestError(ValueError):
    """A manifest that cannot be used.

    ``reason`` is :attr:`Reason.MALFORMED_MANIFEST` for shape errors, or the core's reason when
    the model URL or integrity spec is refused (``source_not_allowed``, ``malformed_spec``, ...).
    ``field`` is the dotted name of the offending field (``"model.url"``). The message is
    ``"<field>: <reason>"`` and carries no value from the manifest.
    """

    def __init__(self, reason: Reason, field: str) -> None:
        super().__init__(f"{field}: {reason.value}")
        self.reason: Final = reason
        self.field: Final = field


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """The ``[model]`` table: what to download and how to recognise it."""

    name: str
    url: str
    sha256: str
    size_bytes: int

    def __repr__(self) -> str:
        # A manifest may be logged with %r or shown among a traceback's locals: the URL's query
        # and fragment (a signed URL's token) and the digest are left out of the text.
        shown = self.url.split("#", 1)[0]
        if "?" in shown:
            shown = shown.split("?", 1)[0] + "?…"
        return f"ModelSpec(name={self.name!r}, url={shown!r}, size_bytes={self.size_bytes!r})"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class SourcesSpec:
    """The ``[sources]`` table: HTTPS URL prefixes the model (and every redirect) must match."""

    allow: tuple[str, ...]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeSpec:
    """The ``[runtime]`` table: the argv to run (placeholders filled by the supervisor)."""

    command: tuple[str, ...]
    health_path: str = DEFAULT_HEALTH_PATH
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSpec:
    """The ``[limits]`` table: admission bounds and resource ceilings (defaults above)."""

    max_in_flight: int = 4
    queue_bound: int = 64
    queue_timeout_s: float = 30.0
    max_ram_bytes: int = 8 * _GIB
    max_vram_bytes: int = 8 * _GIB
    max_cpu_percent: float = 100.0


#: The limits used when the manifest has no ``[limits]`` table.
DEFAULT_LIMITS: Final = LimitsSpec()


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A validated manifest. Build it with :func:`load_manifest` or :func:`manifest_from_dict`."""

    model: ModelSpec
    sources: SourcesSpec
    runtime: RuntimeSpec
    limits: LimitsSpec = DEFAULT_LIMITS


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``.

    A missing or unreadable file, or anything but a regular file (a FIFO, a device, a
    directory: refused without waiting for a writer), raises
    ``ManifestError(FILE_NOT_FOUND, "manifest")``; bad TOML, a file over
    :data:`MAX_MANIFEST_BYTES`, or one with more than :data:`MAX_MANIFEST_DOTS` dots outside
    its strings and comments raises ``ManifestError(MALFORMED_MANIFEST, "manifest")``.
    """
    try:
        raw = read_regular_file(path, max_bytes=MAX_MANIFEST_BYTES)
    except OSError:
        raise ManifestError(Reason.FILE_NOT_FOUND, "manifest") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "manifest")
    try:
        # One byte order mark at the start, which editors on Windows write, is no content.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "manifest") from None
    return load_manifest_text(text)


def load_manifest_text(text: str) -> Manifest:
    """Parse and validate manifest TOML given as a string (see :func:`load_manifest`)."""
    if not isinstance(text, str) or _dots_outside_strings(text) > MAX_MANIFEST_DOTS:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "manifest")
    try:
        data = tomllib.loads(text)
    except ValueError:
        # TOMLDecodeError (its message quotes the offending line; it is deliberately dropped),
        # or a plain ValueError for an integer past int()'s digit limit (4,300 by default).
        raise ManifestError(Reason.MALFORMED_MANIFEST, "manifest") from None
    except RecursionError:
        # tomllib recurses once per nesting level of arrays and inline tables; a few thousand
        # levels exhaust the stack. No real manifest nests more than two levels.
        raise ManifestError(Reason.MALFORMED_MANIFEST, "manifest") from None
    return manifest_from_dict(data)


#: What ends TOML's strings: a basic string at its first unescaped ``"``, a multi-line basic
#: string at its first unescaped ``\"\"\"`` (one or two more ``"`` just after it are its own,
#: skipped by the caller, as tomllib reads them). Every alternative starts with another
#: character and none can take the closing quotes, so giving a character back never helps a
#: match: the repetition is possessive (``*+``). A backtracking one keeps a frame for each
#: character it took, in case it must give it back: 153 MB for a string of a mebibyte, which
#: tomllib reads in a few.
_BASIC_STRING_REST: Final = re.compile(r'(?:[^"\\]|\\.)*+"', re.DOTALL)
_MULTI_LINE_BASIC_STRING_REST: Final = re.compile(r'(?:[^"\\]|\\.|"(?!""))*+"""', re.DOTALL)
#: Where a string, a comment or a dot may begin.
_LEXICAL_START: Final = re.compile(r"[.#\"']")


def _dots_outside_strings(text: str, stop_after: int = MAX_MANIFEST_DOTS) -> int:
    """How many ``.`` ``text`` has outside its strings and comments, as TOML reads them
    (counting stops past ``stop_after``).

    Where a string or comment is left open, the count stops: tomllib refuses the text there,
    before it acts on anything after it.
    """
    dots = 0
    position = 0
    while dots <= stop_after:
        found = _LEXICAL_START.search(text, position)
        if found is None:
            break
        start = found.group()
        position = found.end()
        if start == ".":
            dots += 1
            continue
        multi_line = start != "#" and text.startswith(start * 2, position)
        if multi_line:
            position += 2
        if start == "#":
            end = text.find("\n", position)
        elif start == "'":
            end = text.find("'''" if multi_line else "'", position)
            end = end if end < 0 else end + (3 if multi_line else 1)
        else:
            pattern = _MULTI_LINE_BASIC_STRING_REST if multi_line else _BASIC_STRING_REST
            rest = pattern.match(text, position)
            end = -1 if rest is None else rest.end()
        if end < 0:
            break
        position = end
        if multi_line:
            # Up to two more quotes end a multi-line string: they are its last characters.
            for _ in range(2):
                if text.startswith(start, position):
                    position += 1
    return dots


def manifest_from_dict(data: Mapping[str, object]) -> Manifest:
    """Validate an already-parsed manifest (the shape ``tomllib`` produces)."""
    table = _table(data, "manifest")
    _no_unknown_keys(table, "", {"model", "sources", "runtime", "limits"})
    sources = _sources(_table(table.get("sources"), "sources"))
    model = _model(_table(table.get("model"), "model"), sources)
    runtime = _runtime(_table(table.get("runtime"), "runtime"))
    raw_limits = table.get("limits")
    limits = DEFAULT_LIMITS if raw_limits is None else _limits(_table(raw_limits, "limits"))
    return Manifest(model=model, sources=sources, runtime=runtime, limits=limits)


# --- tables -----------------------------------------------------------------------------------


def _sources(table: Mapping[str, object]) -> SourcesSpec:
    _no_unknown_keys(table, "sources", {"allow"})
    raw = table.get("allow")
    if not isinstance(raw, list) or not raw:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "sources.allow")
    allow: list[str] = []
    for index, entry in enumerate(raw):
        field = f"sources.allow[{index}]"
        if not isinstance(entry, str):
            raise ManifestError(Reason.MALFORMED_MANIFEST, field)
        # An entry that does not even match itself can never grant anything: say so now rather
        # than let every download fail later with source_not_allowed.
        verdict = validate_source_url(entry, [entry])
        if not verdict.ok:
            raise ManifestError(verdict.reason, field)
        allow.append(entry)
    return SourcesSpec(allow=tuple(allow))


def _model(table: Mapping[str, object], sources: SourcesSpec) -> ModelSpec:
    _no_unknown_keys(table, "model", {"name", "url", "sha256", "size_bytes"})
    name = _text(table, "model", "name", required=True, max_chars=_MAX_NAME_CHARS)
    url = table.get("url")
    if not isinstance(url, str):
        raise ManifestError(Reason.MALFORMED_MANIFEST, "model.url")
    verdict = validate_source_url(url, list(sources.allow))
    if not verdict.ok:
        raise ManifestError(verdict.reason, "model.url")
    sha256 = table.get("sha256")
    if not isinstance(sha256, str):
        raise ManifestError(Reason.MALFORMED_MANIFEST, "model.sha256")
    size_bytes = table.get("size_bytes")
    if not _is_int(size_bytes):
        raise ManifestError(Reason.MALFORMED_MANIFEST, "model.size_bytes")
    assert isinstance(size_bytes, int)
    # The spec check is one call; ask it about each half so the error names the right field.
    if not validate_integrity_spec(sha256, 1).ok:
        raise ManifestError(Reason.MALFORMED_SPEC, "model.sha256")
    verdict = validate_integrity_spec(sha256, size_bytes)
    if not verdict.ok:
        raise ManifestError(verdict.reason, "model.size_bytes")
    assert name is not None
    return ModelSpec(name=name, url=url, sha256=sha256, size_bytes=size_bytes)


def _runtime(table: Mapping[str, object]) -> RuntimeSpec:
    _no_unknown_keys(table, "runtime", {"command", "health_path", "ready_timeout_s"})
    raw = table.get("command")
    if not isinstance(raw, list) or not raw:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "runtime.command")
    command: list[str] = []
    for index, argument in enumerate(raw):
        # NUL cannot be passed in argv; an empty program name is never meant.
        if (
            not isinstance(argument, str)
            or "\x00" in argument
            or (index == 0 and not argument.strip())
        ):
            raise ManifestError(Reason.MALFORMED_MANIFEST, f"runtime.command[{index}]")
        command.append(argument)
    health_path = _text(table, "runtime", "health_path", required=False, max_chars=2048)
    if health_path is None:
        health_path = DEFAULT_HEALTH_PATH
    elif not health_path.startswith("/") or any(ch.isspace() for ch in health_path):
        raise ManifestError(Reason.MALFORMED_MANIFEST, "runtime.health_path")
    ready_timeout_s = _positive_number(table, "runtime", "ready_timeout_s", DEFAULT_READY_TIMEOUT_S)
    return RuntimeSpec(
        command=tuple(command), health_path=health_path, ready_timeout_s=ready_timeout_s
    )


def _limits(table: Mapping[str, object]) -> LimitsSpec:
    defaults = DEFAULT_LIMITS
    _no_unknown_keys(
        table,
        "limits",
        {
            "max_in_flight",
            "queue_bound",
            "queue_timeout_s",
            "max_ram_bytes",
            "max_vram_bytes",
            "max_cpu_percent",
        },
    )
    max_cpu_percent = _positive_number(table, "limits", "max_cpu_percent", defaults.max_cpu_percent)
    if max_cpu_percent > 100:
        raise ManifestError(Reason.MALFORMED_MANIFEST, "limits.max_cpu_percent")
    return LimitsSpec(
        max_in_flight=_positive_int(table, "limits", "max_in_flight", defaults.max_in_flight),
        queue_bound=_positive_int(table, "limits", "queue_bound", defaults.queue_bound),
        queue_timeout_s=_positive_number(
            table, "limits", "queue_timeout_s", defaults.queue_timeout_s
        ),
        max_ram_bytes=_positive_int(table, "limits", "max_ram_bytes", defaults.max_ram_bytes),
        max_vram_bytes=_positive_int(table, "limits", "max_vram_bytes", defaults.max_vram_bytes),
        max_cpu_percent=max_cpu_percent,
    )


# --- field helpers ----------------------------------------------------------------------------


def _table(value: object, field: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ManifestError(Reason.MALFORMED_MANIFEST, field)
    return value


def _no_unknown_keys(table: Mapping[str, object], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            # An unknown key could be anything the author typed, so only its table is named.
            raise ManifestError(Reason.MALFORMED_MANIFEST, prefix or "manifest")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(
    table: Mapping[str, object], prefix: str, key: str, *, required: bool, max_chars: int
) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > max_chars or not value.isprintable():
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}")
    return value


def _positive_int(table: Mapping[str, object], prefix: str, key: str, default: int) -> int:
    value = table.get(key, default)
    if not _is_int(value):
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}")
    assert isinstance(value, int)
    if value <= 0:
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}")
    return value


def _positive_number(table: Mapping[str, object], prefix: str, key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}")
    try:
        number = float(value)
    except OverflowError:  # an integer with more digits than a float can hold
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}") from None
    if not math.isfinite(number) or number <= 0:
        raise ManifestError(Reason.MALFORMED_MANIFEST, f"{prefix}.{key}")
    return number
