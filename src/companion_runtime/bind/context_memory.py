"""How much memory a llama.cpp runtime's context (its KV cache) will take, from the model file.

The fit check counts the model's bytes plus an allowance. A llama.cpp runtime also allocates a
KV cache as it loads the model, before any resource sample can see it, and that cache grows
with the context: ``n_ctx × Σ_layers n_head_kv × (key_length + value_length) × element size``.
For a 4,096-token context that is tens to hundreds of MiB; for the 128k tokens many model files
declare (the length upstream ``llama-server`` takes when ``-c`` is not given) it is many GiB.
:func:`estimate_context_memory` works it out so that the fit check can count it.

What it reads:

- the **runtime command**: the estimate is made only for a command that runs llama.cpp's server
  (the embedded launcher, ``python -m companion_runtime.bind.llama_server``, or an executable
  named ``llama-server``); for any other runtime it returns None and the allowance stands alone.
  The context is the last ``-c N`` / ``--ctx-size N`` (or ``=N``); without one, the embedded
  launcher's :data:`~companion_runtime.bind.llama_server.DEFAULT_CONTEXT_SIZE`, and for upstream
  ``llama-server`` its own default, 0, which is the length the model declares. ``-ctk`` /
  ``-ctv`` (``--cache-type-k`` / ``--cache-type-v``) set the element types (``f16`` by default).
  For upstream ``llama-server`` the ``LLAMA_ARG_*`` variables of the runtime's extra environment
  count too, below the flags.
- the **model file's GGUF header**: ``general.architecture`` and that architecture's
  ``block_count``, ``context_length``, ``embedding_length``, ``attention.head_count``,
  ``attention.head_count_kv`` (a number, or one per layer), ``attention.key_length`` and
  ``attention.value_length``. Only the key-value section is read, with every length checked
  against the file's size; anything malformed, or a file that is not GGUF, gives None.

The fit check counts the estimate in RAM, with the allowance, also when the weights go to a
GPU, where llama.cpp puts the cache of offloaded layers too: it may then refuse a context that
would have fitted in VRAM, and its VRAM check does not count the cache. The estimate is an
upper bound for common models: it counts every layer at the full context,
so models with sliding-window layers (whose cache llama.cpp keeps at the window's size) or with
compressed attention (MLA) need less than it says. A value the command leaves to a placeholder
or an option this module does not know (``--kv-unified-per-slot``, a draft model's cache) is
not counted.

The header is parsed here rather than with ``gguf.GGUFReader``: the reader builds a view for
every element of every array, which took 15.6 s for a 152,000-token vocabulary on the test
machine; the fit check runs before every start. The ``gguf`` package still names the keys, the
value types and the element sizes.

Call it on a **verified** blob only: the header is then the bytes the manifest vouched for.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

import gguf

from companion_runtime.bind.llama_server import DEFAULT_CONTEXT_SIZE, MODULE

__all__ = ["AttentionShape", "ContextMemory", "estimate_context_memory", "read_attention_shape"]

#: llama.cpp rounds the context up to a multiple of this many tokens.
_CONTEXT_PADDING: Final = 256
#: Arrays inside arrays, at most this deep (the format allows it; no model uses more than 1).
_MAX_ARRAY_DEPTH: Final = 4
#: Elements walked over in the whole header before giving up (a real vocabulary is < 10^6).
_MAX_ELEMENTS: Final = 1 << 24
#: Bytes read first, and at most, for the key-value section (a 262,144-token vocabulary with
#: its merges takes about 10 MB; the read grows four times at a step while more is needed).
_FIRST_READ: Final = 1 << 20
_MAX_HEADER_BYTES: Final = 64 << 20
_UPSTREAM_NAME: Final = "llama-server"
_CACHE_TYPES: Final = frozenset(
    {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
)
_DEFAULT_CACHE_TYPE: Final = "f16"
_CONTEXT_FLAGS: Final = ("-c", "--ctx-size")
_CACHE_K_FLAGS: Final = ("-ctk", "--cache-type-k")
_CACHE_V_FLAGS: Final = ("-ctv", "--cache-type-v")

_V = gguf.GGUFValueType
#: Byte sizes of the fixed-size value types.
_SCALAR_SIZES: Final[Mapping[int, int]] = {
    _V.UINT8: 1,
    _V.INT8: 1,
    _V.BOOL: 1,
    _V.UINT16: 2,
    _V.INT16: 2,
    _V.UINT32: 4,
    _V.INT32: 4,
    _V.FLOAT32: 4,
    _V.UINT64: 8,
    _V.INT64: 8,
    _V.FLOAT64: 8,
}
_INTEGER_FORMATS: Final[Mapping[int, str]] = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.UINT64: "Q",
    _V.INT64: "q",
}


class _Malformed(Exception):
    """The header is not what the format says; no estimate."""


class _NeedMore(Exception):
    """The header goes on past the bytes read so far (but not past the file)."""


@final
@dataclass(frozen=True, slots=True)
class AttentionShape:
    """What the KV cache's size depends on, per the model file."""

    context_length: int
    #: ``head_count_kv`` for each layer (0 for a layer without attention).
    kv_heads: tuple[int, ...]
    key_length: int
    value_length: int


@final
@dataclass(frozen=True, slots=True)
class ContextMemory:
    """The KV cache a runtime will allocate: its context in tokens and its size in bytes."""

    context_tokens: int
    bytes: int


class _Header:
    """Sequential reads from a GGUF header held in memory, every length checked."""

    __slots__ = ("_data", "_end", "_file_size", "_order", "elements", "position")

    def __init__(self, data: bytes, order: str, file_size: int) -> None:
        self._data = data
        self._end = len(data)
        self._file_size = file_size
        self._order = order
        self.position = 0
        self.elements = 0

    def _past_end(self, position: int) -> None:
        if position > self._file_size:
            raise _Malformed
        raise _NeedMore

    def take(self, size: int) -> int:
        start = self.position
        if size < 0:
            raise _Malformed
        if start + size > self._end:
            self._past_end(start + size)
        self.position = start + size
        return start

    def integer(self, code: str) -> int:
        size = struct.calcsize(code)
        value: int = struct.unpack_from(self._order + code, self._data, self.take(size))[0]
        return value

    def string(self) -> bytes:
        length = self.integer("Q")
        start = self.take(length)
        return bytes(self._data[start : start + length])

    def _skip_strings(self, count: int) -> None:
        # A vocabulary is 10^5 strings: one tight loop, not a method call per string.
        data, end, position = self._data, self._end, self.position
        unpack = struct.Struct(self._order + "Q").unpack_from
        for _ in range(count):
            if position + 8 > end:
                self._past_end(position + 8)
            position += 8 + unpack(data, position)[0]
        if position > end:
            self._past_end(position)
        self.position = position

    def count(self, amount: int) -> None:
        self.elements += amount
        if self.elements > _MAX_ELEMENTS:
            raise _Malformed

    def value(self, value_type: int, *, depth: int = 0) -> int | tuple[int, ...] | bytes | None:
        """Read one value: an int, a tuple of ints, a string; None for anything else (skipped)."""
        self.count(1)
        if value_type in _INTEGER_FORMATS:
            return self.integer(_INTEGER_FORMATS[value_type])
        if value_type in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[value_type])
            return None
        if value_type == _V.STRING:
            return self.string()
        if value_type != _V.ARRAY or depth >= _MAX_ARRAY_DEPTH:
            raise _Malformed
        item_type = self.integer("I")
        length = self.integer("Q")
        if item_type in _INTEGER_FORMATS:
            size = _SCALAR_SIZES[item_type]
            self.count(length)
            start = self.take(size * length)
            if length > 4096:  # no per-layer list is this long; a vocabulary's scores are
                return None
            code = f"{self._order}{length}{_INTEGER_FORMATS[item_type]}"
            return tuple(struct.unpack_from(code, self._data, start))
        if item_type in _SCALAR_SIZES:
            self.count(length)
            self.take(_SCALAR_SIZES[item_type] * length)
            return None
        if item_type == _V.STRING:
            self.count(length)
            self._skip_strings(length)
            return None
        for _ in range(length):
            self.value(item_type, depth=depth + 1)
        return None


def _read_metadata(data: bytes, file_size: int) -> dict[str, int | tuple[int, ...] | bytes]:
    """The header's integer, integer-array and string values by key (others are skipped).

    ``data`` is the start of a file of ``file_size`` bytes: :class:`_NeedMore` when the
    key-value section goes on past it."""
    if len(data) < 24:
        raise _Malformed
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic != gguf.GGUF_MAGIC:
        raise _Malformed
    (version,) = struct.unpack_from("<I", data, 4)
    # A big-endian file has the same magic bytes and its version byte-swapped.
    order = "<" if version < 1 << 16 else ">"
    header = _Header(data, order, file_size)
    header.take(4)
    if header.integer("I") not in (2, 3):  # version 1 used 32-bit counts and is long gone
        raise _Malformed
    header.integer("Q")  # tensor count
    pairs = header.integer("Q")
    found: dict[str, int | tuple[int, ...] | bytes] = {}
    keys: set[bytes] = set()
    for _ in range(pairs):
        key = header.string()
        if key in keys:  # llama.cpp refuses such a file; which value counts is anyone's guess
            raise _Malformed
        keys.add(key)
        value = header.value(header.integer("I"))
        if value is not None:
            found[key.decode("utf-8", "replace")] = value
    return found


def _positive(value: object) -> int:
    if type(value) is not int or value <= 0:
        raise _Malformed
    return value


def _attention_shape(metadata: Mapping[str, int | tuple[int, ...] | bytes]) -> AttentionShape:
    architecture = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(architecture, bytes) or not architecture:
        raise _Malformed
    arch = architecture.decode("utf-8", "replace")

    def get(template: str) -> int | tuple[int, ...] | bytes | None:
        return metadata.get(template.format(arch=arch))

    layers = _positive(get(gguf.Keys.LLM.BLOCK_COUNT))
    context_length = _positive(get(gguf.Keys.LLM.CONTEXT_LENGTH))
    embedding = _positive(get(gguf.Keys.LLM.EMBEDDING_LENGTH))
    heads = get(gguf.Keys.Attention.HEAD_COUNT)
    kv_heads = get(gguf.Keys.Attention.HEAD_COUNT_KV)
    if kv_heads is None:
        kv_heads = heads

    def per_layer(value: object) -> tuple[int, ...]:
        if type(value) is int and value >= 0:
            return (value,) * layers
        if isinstance(value, tuple) and len(value) == layers and all(v >= 0 for v in value):
            return value
        raise _Malformed

    head_counts = per_layer(heads)
    first_heads = next((count for count in head_counts if count > 0), 0)
    if first_heads == 0:
        raise _Malformed  # no attention at all: nothing this estimate knows how to size
    key_length = get(gguf.Keys.Attention.KEY_LENGTH)
    value_length = get(gguf.Keys.Attention.VALUE_LENGTH)
    return AttentionShape(
        context_length=context_length,
        kv_heads=per_layer(kv_heads),
        key_length=embedding // first_heads if key_length is None else _positive(key_length),
        value_length=embedding // first_heads if value_length is None else _positive(value_length),
    )


def _read_start(descriptor: int, count: int) -> bytes:
    """The first ``count`` bytes of the file (fewer only if it ends sooner)."""
    parts: list[bytes] = []
    have = 0
    while have < count:
        part = os.pread(descriptor, count - have, have)
        if not part:
            break
        parts.append(part)
        have += len(part)
    return b"".join(parts)


def read_attention_shape(path: Path) -> AttentionShape | None:
    """The model file's attention shape, or None if it is not a GGUF file this can read.

    The header is read with ``pread`` into memory, :data:`_FIRST_READ` bytes first and four
    times as many while the key-value section goes on, up to :data:`_MAX_HEADER_BYTES`. Not a
    memory map: a file truncated under a map turns the next read into ``SIGBUS``, which would
    end the whole manager.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except (OSError, ValueError):
        return None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size < 24:
            return None
        size = info.st_size
        want = min(size, _FIRST_READ)
        while True:
            data = _read_start(descriptor, want)
            if len(data) < want:
                return None  # the file shrank under the read
            try:
                return _attention_shape(_read_metadata(data, size))
            except _NeedMore:
                if want >= min(size, _MAX_HEADER_BYTES):
                    return None
                want = min(size, want * 4, _MAX_HEADER_BYTES)
    except (OSError, _Malformed, struct.error):
        return None
    finally:
        os.close(descriptor)


def _cache_bytes(elements: int, cache_type: str) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache_type.upper()]]
    return -(-elements // block) * type_size


@dataclass(slots=True)
class _Settings:
    context: int | None = None
    cache_k: str = _DEFAULT_CACHE_TYPE
    cache_v: str = _DEFAULT_CACHE_TYPE


def _runtime_kind(command: Sequence[str]) -> str | None:
    if not command:
        return None
    if MODULE in command[1:]:
        return "embedded"
    if Path(command[0]).name == _UPSTREAM_NAME:
        return "upstream"
    return None


def _apply(settings: _Settings, flag: str, value: str) -> bool:
    """Set what ``flag value`` says; False when the value is not one this can count."""
    if flag in _CONTEXT_FLAGS:
        try:
            context = int(value, 10)
        except ValueError:
            return False
        if context < 0:
            return False
        settings.context = context
    elif flag in _CACHE_K_FLAGS or flag in _CACHE_V_FLAGS:
        if value not in _CACHE_TYPES:
            return False
        if flag in _CACHE_K_FLAGS:
            settings.cache_k = value
        else:
            settings.cache_v = value
    return True


def _settings(command: Sequence[str], kind: str, environ: Mapping[str, str]) -> _Settings | None:
    settings = _Settings()
    if kind == "upstream":
        for variable, flag in (
            ("LLAMA_ARG_CTX_SIZE", "-c"),
            ("LLAMA_ARG_CACHE_TYPE_K", "-ctk"),
            ("LLAMA_ARG_CACHE_TYPE_V", "-ctv"),
        ):
            if variable in environ and not _apply(settings, flag, environ[variable]):
                return None
    known = (*_CONTEXT_FLAGS, *_CACHE_K_FLAGS, *_CACHE_V_FLAGS)
    arguments = list(command[1:])
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        flag, equals, inline = argument.partition("=")
        if equals and flag in known:
            if not _apply(settings, flag, inline):
                return None
        elif argument in known:
            if index + 1 >= len(arguments) or not _apply(settings, argument, arguments[index + 1]):
                return None
            index += 1
        index += 1
    if settings.context is None:
        settings.context = DEFAULT_CONTEXT_SIZE if kind == "embedded" else 0
    return settings


def estimate_context_memory(
    model_path: Path,
    command_template: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> ContextMemory | None:
    """The KV cache the runtime ``command_template`` will allocate for ``model_path``, or None.

    None: the command is not llama.cpp's server, sets the context or a cache type to something
    this cannot count, or the file is not a GGUF model with an attention shape. Never raises.
    """
    kind = _runtime_kind(command_template)
    if kind is None:
        return None
    settings = _settings(command_template, kind, environ or {})
    if settings is None:
        return None
    shape = read_attention_shape(model_path)
    if shape is None:
        return None
    context = settings.context or shape.context_length
    context = -(-context // _CONTEXT_PADDING) * _CONTEXT_PADDING
    per_token = sum(
        _cache_bytes(heads * shape.key_length, settings.cache_k)
        + _cache_bytes(heads * shape.value_length, settings.cache_v)
        for heads in shape.kv_heads
    )
    return ContextMemory(context_tokens=context, bytes=context * per_token)
