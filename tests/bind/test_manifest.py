"""Manifest loading: every field type-checked, defaults documented, errors never echo values."""

from __future__ import annotations

import copy
import os
import threading
import tomllib
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion_runtime.bind import regular_file
from companion_runtime.bind.manifest import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_LIMITS,
    DEFAULT_READY_TIMEOUT_S,
    Manifest,
    ManifestError,
    _dots_outside_strings,
    load_manifest,
    load_manifest_text,
    manifest_from_dict,
)
from companion_runtime.core import Reason
from tests.support.would_block import opener_that_would_block

DIGEST = "ab" * 32
SECRET = "s3cr3t-token-value"

FULL_TOML = f"""
[model]
name = "tinyllama"
url = "https://models.example.com/tinyllama-q4.gguf?token={SECRET}"
sha256 = "{DIGEST}"
size_bytes = 668788096

[sources]
allow = ["https://models.example.com/"]

[runtime]
command = ["/usr/local/bin/llama-server", "-m", "{{model_path}}", "--port", "{{port}}"]
health_path = "/healthz"
ready_timeout_s = 60

[limits]
max_in_flight = 2
queue_bound = 8
queue_timeout_s = 2.5
max_ram_bytes = 8_000_000_000
max_vram_bytes = 4_000_000_000
max_cpu_percent = 90
"""


def minimal() -> dict[str, Any]:
    return {
        "model": {
            "name": "m",
            "url": f"https://models.example.com/m.gguf?token={SECRET}",
            "sha256": DIGEST,
            "size_bytes": 10,
        },
        "sources": {"allow": ["https://models.example.com/"]},
        "runtime": {"command": ["/bin/true"]},
    }


def with_field(table: str, key: str, value: object) -> dict[str, Any]:
    data = copy.deepcopy(minimal())
    data.setdefault(table, {})[key] = value
    return data


def assert_refused(data: dict[str, Any], reason: Reason, field: str) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        manifest_from_dict(data)
    error = caught.value
    assert error.reason is reason
    assert error.field == field
    assert str(error) == f"{field}: {reason.value}"
    assert SECRET not in str(error)
    assert DIGEST not in str(error)
    return error


@pytest.mark.unit
def test_full_manifest_loads_every_field(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(FULL_TOML)
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest)
    assert manifest.model.name == "tinyllama"
    assert manifest.model.url.startswith("https://models.example.com/tinyllama-q4.gguf")
    assert manifest.model.sha256 == DIGEST
    assert manifest.model.size_bytes == 668788096
    assert manifest.sources.allow == ("https://models.example.com/",)
    assert manifest.runtime.command == (
        "/usr/local/bin/llama-server",
        "-m",
        "{model_path}",
        "--port",
        "{port}",
    )
    assert manifest.runtime.health_path == "/healthz"
    assert manifest.runtime.ready_timeout_s == 60.0
    assert isinstance(manifest.runtime.ready_timeout_s, float)
    limits = manifest.limits
    assert (limits.max_in_flight, limits.queue_bound, limits.queue_timeout_s) == (2, 8, 2.5)
    assert (limits.max_ram_bytes, limits.max_vram_bytes) == (8_000_000_000, 4_000_000_000)
    assert limits.max_cpu_percent == 90.0


@pytest.mark.unit
def test_a_manifest_an_editor_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_bytes(b"\xef\xbb\xbf" + FULL_TOML.encode())
    assert load_manifest(path).model.name == "tinyllama"
    # Only one, and only at the start: anywhere else it is a character TOML does not allow.
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbf" + FULL_TOML.encode())
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.reason is Reason.MALFORMED_MANIFEST


@pytest.mark.unit
def test_optional_fields_take_documented_defaults() -> None:
    manifest = manifest_from_dict(minimal())
    assert manifest.runtime.health_path == DEFAULT_HEALTH_PATH == "/health"
    assert manifest.runtime.ready_timeout_s == DEFAULT_READY_TIMEOUT_S == 120.0
    assert manifest.limits == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_in_flight == 4
    assert DEFAULT_LIMITS.queue_bound == 64
    assert DEFAULT_LIMITS.max_cpu_percent == 100.0
    partial = manifest_from_dict(with_field("limits", "queue_bound", 3))
    assert partial.limits.queue_bound == 3
    assert partial.limits.max_in_flight == DEFAULT_LIMITS.max_in_flight


@pytest.mark.unit
def test_manifest_is_frozen() -> None:
    manifest = manifest_from_dict(minimal())
    with pytest.raises(AttributeError):
        manifest.model.url = "https://evil.example/"  # type: ignore[misc]


@pytest.mark.unit
@pytest.mark.security
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://models.example.com/m.gguf", Reason.SCHEME_NOT_ALLOWED),
        (f"https://models.example.com.evil.net/m.gguf?token={SECRET}", Reason.SOURCE_NOT_ALLOWED),
        (f"https://models.example.com@evil.net/m.gguf?token={SECRET}", None),
        ("https://other.example.com/m.gguf", Reason.SOURCE_NOT_ALLOWED),
    ],
)
def test_model_url_is_checked_against_the_allowlist(url: str, reason: Reason | None) -> None:
    with pytest.raises(ManifestError) as caught:
        manifest_from_dict(with_field("model", "url", url))
    assert caught.value.field == "model.url"
    assert caught.value.reason is not Reason.OK
    if reason is not None:
        assert caught.value.reason is reason
    assert SECRET not in str(caught.value) and "evil" not in str(caught.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("table", "key", "value", "reason", "field"),
    [
        ("model", "sha256", "AB" * 32, Reason.MALFORMED_SPEC, "model.sha256"),
        ("model", "sha256", "ab" * 31, Reason.MALFORMED_SPEC, "model.sha256"),
        ("model", "sha256", 5, Reason.MALFORMED_MANIFEST, "model.sha256"),
        ("model", "size_bytes", 0, Reason.MALFORMED_SPEC, "model.size_bytes"),
        ("model", "size_bytes", -1, Reason.MALFORMED_SPEC, "model.size_bytes"),
        ("model", "size_bytes", True, Reason.MALFORMED_MANIFEST, "model.size_bytes"),
        ("model", "size_bytes", 1.5, Reason.MALFORMED_MANIFEST, "model.size_bytes"),
        ("model", "size_bytes", "10", Reason.MALFORMED_MANIFEST, "model.size_bytes"),
        ("model", "name", "", Reason.MALFORMED_MANIFEST, "model.name"),
        ("model", "name", "a\nb", Reason.MALFORMED_MANIFEST, "model.name"),
        ("model", "name", "x" * 129, Reason.MALFORMED_MANIFEST, "model.name"),
        ("model", "url", 7, Reason.MALFORMED_MANIFEST, "model.url"),
        ("model", "sha265", DIGEST, Reason.MALFORMED_MANIFEST, "model"),
        ("sources", "allow", [], Reason.MALFORMED_MANIFEST, "sources.allow"),
        (
            "sources",
            "allow",
            "https://models.example.com/",
            Reason.MALFORMED_MANIFEST,
            "sources.allow",
        ),
        ("sources", "allow", [3], Reason.MALFORMED_MANIFEST, "sources.allow[0]"),
        (
            "sources",
            "allow",
            ["https://models.example.com/", "http://x.example/"],
            Reason.SCHEME_NOT_ALLOWED,
            "sources.allow[1]",
        ),
        ("runtime", "command", [], Reason.MALFORMED_MANIFEST, "runtime.command"),
        ("runtime", "command", "/bin/true", Reason.MALFORMED_MANIFEST, "runtime.command"),
        ("runtime", "command", ["/bin/true", 3], Reason.MALFORMED_MANIFEST, "runtime.command[1]"),
        (
            "runtime",
            "command",
            ["/bin/true", "a\x00b"],
            Reason.MALFORMED_MANIFEST,
            "runtime.command[1]",
        ),
        ("runtime", "command", [" "], Reason.MALFORMED_MANIFEST, "runtime.command[0]"),
        ("runtime", "health_path", "health", Reason.MALFORMED_MANIFEST, "runtime.health_path"),
        ("runtime", "health_path", "/a b", Reason.MALFORMED_MANIFEST, "runtime.health_path"),
        ("runtime", "ready_timeout_s", 0, Reason.MALFORMED_MANIFEST, "runtime.ready_timeout_s"),
        ("runtime", "ready_timeout_s", False, Reason.MALFORMED_MANIFEST, "runtime.ready_timeout_s"),
        (
            "runtime",
            "ready_timeout_s",
            float("inf"),
            Reason.MALFORMED_MANIFEST,
            "runtime.ready_timeout_s",
        ),
        (
            "runtime",
            "ready_timeout_s",
            float("nan"),
            Reason.MALFORMED_MANIFEST,
            "runtime.ready_timeout_s",
        ),
        ("limits", "max_in_flight", 0, Reason.MALFORMED_MANIFEST, "limits.max_in_flight"),
        ("limits", "max_in_flight", True, Reason.MALFORMED_MANIFEST, "limits.max_in_flight"),
        ("limits", "queue_bound", 2.0, Reason.MALFORMED_MANIFEST, "limits.queue_bound"),
        ("limits", "queue_timeout_s", -1, Reason.MALFORMED_MANIFEST, "limits.queue_timeout_s"),
        ("limits", "max_ram_bytes", "8G", Reason.MALFORMED_MANIFEST, "limits.max_ram_bytes"),
        ("limits", "max_vram_bytes", 0, Reason.MALFORMED_MANIFEST, "limits.max_vram_bytes"),
        ("limits", "max_cpu_percent", 101, Reason.MALFORMED_MANIFEST, "limits.max_cpu_percent"),
        ("limits", "max_cpu_percent", 0, Reason.MALFORMED_MANIFEST, "limits.max_cpu_percent"),
        ("limits", "max_threads", 3, Reason.MALFORMED_MANIFEST, "limits"),
    ],
)
def test_each_bad_field_is_named(
    table: str, key: str, value: object, reason: Reason, field: str
) -> None:
    assert_refused(with_field(table, key, value), reason, field)


@pytest.mark.unit
@pytest.mark.parametrize("table", ["model", "sources", "runtime"])
def test_required_tables(table: str) -> None:
    data = minimal()
    del data[table]
    assert_refused(data, Reason.MALFORMED_MANIFEST, table)
    data = minimal()
    data[table] = ["not", "a", "table"]
    assert_refused(data, Reason.MALFORMED_MANIFEST, table)


@pytest.mark.unit
@pytest.mark.parametrize("key", ["name", "url", "sha256", "size_bytes"])
def test_required_model_fields(key: str) -> None:
    data = minimal()
    del data["model"][key]
    assert_refused(data, Reason.MALFORMED_MANIFEST, f"model.{key}")


@pytest.mark.unit
def test_unknown_top_level_table_is_refused() -> None:
    data = minimal()
    data["extra"] = {}
    assert_refused(data, Reason.MALFORMED_MANIFEST, "manifest")
    data = minimal()
    data["limits"] = 3
    assert_refused(data, Reason.MALFORMED_MANIFEST, "limits")


@pytest.mark.unit
def test_bad_toml_and_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest_text(f'[model]\nurl = "https://x/?token={SECRET}"\nbroken = ')
    assert caught.value.reason is Reason.MALFORMED_MANIFEST
    assert SECRET not in str(caught.value)

    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "missing.toml")
    assert caught.value.reason is Reason.FILE_NOT_FOUND
    assert "missing" not in str(caught.value)

    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError) as caught:
        load_manifest(binary)
    assert caught.value.reason is Reason.MALFORMED_MANIFEST

    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (1024 * 1024 + 10))
    with pytest.raises(ManifestError) as caught:
        load_manifest(huge)
    assert caught.value.reason is Reason.MALFORMED_MANIFEST

    # An integer past int()'s 4,300-digit limit: tomllib raises a plain ValueError for it.
    with pytest.raises(ManifestError) as caught:
        load_manifest_text("[model]\nsize_bytes = " + "9" * 5000)
    assert caught.value.reason is Reason.MALFORMED_MANIFEST

    with pytest.raises(ManifestError):
        load_manifest(tmp_path)  # a directory is not a manifest
    with pytest.raises(ManifestError):
        load_manifest_text(b"[model]")  # type: ignore[arg-type]


@pytest.mark.unit
def test_a_long_dotted_key_is_refused_before_tomllib_spends_memory_on_it() -> None:
    # tomllib's time and memory grow with the square of a dotted key's parts: 5,000 of them
    # (10 KB) took 100 MB, 100,000 (200 KB, well inside the size limit) more memory than the
    # machine had, and the command was killed by the kernel instead of refused.
    text = FULL_TOML + "a" + ".a" * 5000 + " = 1\n"
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as caught:
            load_manifest_text(text)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason is Reason.MALFORMED_MANIFEST
    assert caught.value.field == "manifest"
    assert peak < 4 * 1024 * 1024, peak


@pytest.mark.unit
@pytest.mark.parametrize(
    "text",
    [
        'a = "' + "x" * 1_000_000 + '"\n',  # a long string: 153 MB had gone to the count
        'a = """' + "\\t" * 500_000 + '"""\n',  # escapes
        'a = "' + "x" * 1_000_000,  # left open
        'a = """' + '""x' * 300_000,
    ],
)
def test_the_count_of_dots_takes_little_memory_for_a_long_string(text: str) -> None:
    # The count runs before tomllib so that a manifest under the size limit cannot take more
    # memory than it is worth; the count itself must not: tomllib reads these in a few MB.
    tracemalloc.start()
    try:
        _dots_outside_strings(text)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


@pytest.mark.unit
def test_dots_in_strings_and_comments_and_a_few_dotted_keys_are_no_dotted_key() -> None:
    # Only dots outside strings and comments count, read as TOML reads them: a quote in a
    # comment, an escaped quote, a multi-line string ending in four or five quotes.
    dots = "." * 400
    lines = [
        f'# {dots} " \' """',
        'model.name = "tinyllama"',
        f'model.url = "https://models.example.com/tinyllama-q4.gguf?token={SECRET}"',
        f'model.sha256 = "{DIGEST}"',
        'model."size_bytes" = 668788096',
        f'sources.allow = ["https://models.example.com/"]  # {dots}',
        "[runtime]",
        f'command = ["/usr/local/bin/llama-server", "{dots}\\\\", "\\"{dots}", \'{dots}\',',
        f'  """{dots}""""", \'\'\'\n{dots}\'\'\'\'\', ""]',
        "ready_timeout_s = 2.5",
        "[limits]",
        "queue_timeout_s = 2.5",
    ]
    manifest = load_manifest_text("\n".join(lines) + "\n")
    assert manifest.model.name == "tinyllama"
    assert manifest.runtime.command[1:] == (
        dots + "\\",
        '"' + dots,
        dots,
        dots + '""',
        dots + "''",
        "",
    )
    assert manifest.limits.queue_timeout_s == 2.5


#: What strings, comments and bare text are made of: every character that starts or ends
#: something in TOML's lexical rules, and a letter.
_PIECES = st.text(alphabet="a.\"'#\\ ", max_size=12)


def _basic(content: str) -> str:
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _string(draw: st.DrawFn) -> str:
    """A TOML string of any of the four kinds, with its dots, quotes and hashes."""
    content = draw(_PIECES)
    kind = draw(st.sampled_from(["basic", "literal", "multi-line basic", "multi-line literal"]))
    if kind == "basic":
        return _basic(content)
    no_quote = content.replace("'", "")
    if kind == "literal":
        return "'" + no_quote + "'"
    extra = draw(st.integers(0, 2))  # one or two more quotes end a multi-line string
    if kind == "multi-line basic":
        escaped = _basic(content + "\n" + content)[1:-1]
        return '"""' + escaped + '"' * extra + '"""'
    return "'''" + no_quote + "\n" + no_quote + "'" * extra + "'''"


@st.composite
def _manifest_like(draw: st.DrawFn) -> tuple[str, int]:
    """TOML text and the number of dots it has outside strings and comments."""
    lines: list[str] = []
    dots = 0
    for index in range(draw(st.integers(1, 8))):
        parts = [f"k{index}"]
        for _ in range(draw(st.integers(0, 3))):
            parts.append(draw(st.one_of(st.just("p"), _string().filter(lambda s: "\n" not in s))))
        dots += len(parts) - 1
        values = draw(st.lists(st.one_of(_string(), st.just("1.5"), st.just("{ a.b = 2 }"))))
        dots += sum(value.count(".") for value in values if value[0] in "1{")
        line = ".".join(parts) + " = [" + ", ".join(values) + "]"
        if draw(st.booleans()):
            line += " # " + draw(_PIECES)
        lines.append(line)
    return "\n".join(lines) + "\n", dots


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(_manifest_like())
def test_the_dots_that_count_are_those_outside_strings_and_comments(
    case: tuple[str, int],
) -> None:
    # Counted too few, a dotted key hides in what the count takes for a string; too many, a
    # manifest with dots in its strings is refused.
    text, dots = case
    tomllib.loads(text)  # TOML indeed
    assert _dots_outside_strings(text, stop_after=10**9) == dots


@pytest.mark.unit
def test_a_manifest_with_no_bytes_to_give_for_now_is_not_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read non-blocking, such a file (/proc/kmsg, a file in user space) answers None, which
    # was taken for its end: the manifest loaded without its [limits], their defaults instead.
    path = tmp_path / "model.toml"
    path.write_text(FULL_TOML)
    before_limits = FULL_TOML.split("[limits]")[0].encode()
    monkeypatch.setattr(
        regular_file,
        "open",
        opener_that_would_block(open, inode=path.stat().st_ino, given=before_limits),
        raising=False,
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.reason is Reason.FILE_NOT_FOUND


def _released(path: Path) -> None:
    """Let a reader blocked in ``open()`` on the FIFO at ``path`` go on (to end of file)."""
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_manifest_that_is_no_regular_file_is_refused_without_waiting(
    tmp_path: Path, kind: str
) -> None:
    # A FIFO given as the manifest had held load_manifest in open() for a writer that never
    # came, past any signal (serve loads it in a worker thread); /dev/zero was read.
    path = tmp_path / "manifest.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.mkdir()
    reasons: list[Reason] = []

    def load() -> None:
        try:
            load_manifest(path)
        except ManifestError as error:
            reasons.append(error.reason)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    blocked = thread.is_alive()
    if blocked:
        _released(path)
        thread.join(5)
    assert not blocked
    assert reasons == [Reason.FILE_NOT_FOUND]
