"""The GGUF header walk the fit check runs (``read_attention_shape``) on mutated headers.

Starting from a real model header written by the ``gguf`` package, every generated file is a
mutation of it (bytes overwritten, inserted, removed; the file cut short). The walk must answer
an :class:`AttentionShape` or None, never raise, and never take long: every length it reads is
checked against the file before it is used. Where the walk answers a shape and
``gguf.GGUFReader``, an independent parser of the whole file, reads the same keys, both must
give the same shape.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from companion_runtime.bind.context_memory import (
    UNCOUNTABLE,
    AttentionShape,
    read_attention_shape,
)
from tests.fuzz._budget import EXAMPLES, SEED

pytestmark = [pytest.mark.security]


def _header(path: Path) -> bytes:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(4)
    writer.add_context_length(8192)
    writer.add_embedding_length(256)
    writer.add_head_count([8, 8, 0, 8])
    writer.add_head_count_kv([2, 2, 0, 2])
    writer.add_key_length(32)
    writer.add_token_list([f"t{i}".encode() for i in range(64)])
    writer.add_token_scores([0.5] * 64)
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out)) if out else 0
        kind = rng.randrange(5)
        if kind == 0:  # overwrite with a length-like value
            value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(64)])
            out[where : where + 8] = value.to_bytes(8, "little")
        elif kind == 1:
            out[where] = rng.randrange(256) if where < len(out) else 0
        elif kind == 2:
            out[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif kind == 3:
            del out[where : where + rng.randint(1, 9)]
        else:
            del out[where:]
    return bytes(out)


def _reader_shape(path: Path) -> AttentionShape | None:
    """The same shape through ``gguf.GGUFReader``, an independent parser of the whole file;
    None when it cannot read the file or a key is missing or out of range."""
    try:
        fields = gguf.GGUFReader(path).fields
        if any("_" in name and name.rsplit("_", 1)[1].isdigit() for name in fields):
            return None  # the reader renames a duplicate key; llama.cpp refuses such a file

        def get(key: str) -> list[int] | int | str | None:
            field = fields.get(key.format(arch="llama"))
            return None if field is None else field.contents()

        if get(gguf.Keys.General.ARCHITECTURE) != "llama":
            return None
        layers, context, embedding = (
            get(gguf.Keys.LLM.BLOCK_COUNT),
            get(gguf.Keys.LLM.CONTEXT_LENGTH),
            get(gguf.Keys.LLM.EMBEDDING_LENGTH),
        )
        heads, kv_heads = (
            get(gguf.Keys.Attention.HEAD_COUNT),
            get(gguf.Keys.Attention.HEAD_COUNT_KV),
        )
        key_length, value_length = (
            get(gguf.Keys.Attention.KEY_LENGTH),
            get(gguf.Keys.Attention.VALUE_LENGTH),
        )
    except Exception:  # any failure of the reference parser: no comparison
        return None
    if not all(type(v) is int and v > 0 for v in (layers, context, embedding)):
        return None
    assert isinstance(layers, int) and isinstance(context, int) and isinstance(embedding, int)

    def per_layer(value: object) -> tuple[int, ...] | None:
        if type(value) is int and value >= 0:
            return (value,) * layers
        if (
            isinstance(value, list)
            and len(value) == layers
            and all(type(v) is int and v >= 0 for v in value)
        ):
            return tuple(value)
        return None

    head_counts = per_layer(heads)
    kv = per_layer(heads if kv_heads is None else kv_heads)
    first = next((h for h in head_counts or () if h > 0), 0)
    if head_counts is None or kv is None or first == 0:
        return None
    lengths = [embedding // first if v is None else v for v in (key_length, value_length)]
    if not all(type(v) is int and v > 0 for v in lengths):
        return None
    return AttentionShape(
        context_length=context,
        kv_heads=kv,
        key_length=lengths[0],
        value_length=lengths[1],
        architecture="llama",
    )


def test_mutated_headers_give_a_shape_or_none_and_never_raise(tmp_path: Path) -> None:
    original = _header(tmp_path / "m.gguf")
    assert read_attention_shape(tmp_path / "m.gguf") == AttentionShape(
        context_length=8192, kv_heads=(2, 2, 0, 2), key_length=32, value_length=32
    )
    rng = random.Random(SEED)
    path = tmp_path / "mutated.gguf"
    answers = {"shape": 0, "none": 0, "agreed": 0}
    slowest = 0.0
    for _ in range(max(200, EXAMPLES // 20)):
        path.write_bytes(_mutate(original, rng))
        started = time.perf_counter()
        shape = read_attention_shape(path)
        slowest = max(slowest, time.perf_counter() - started)
        # UNCOUNTABLE only for a header past the walk's bounds, which no mutation of this
        # small one reaches: a corrupted count is checked against the file first.
        assert shape is None or isinstance(shape, AttentionShape), shape
        assert shape is not UNCOUNTABLE
        answers["shape" if shape is not None else "none"] += 1
        if shape is not None:
            # Only then: the reader has no bound of its own, and a mutated array count sends it
            # into minutes of work (seen here); the walk has checked every length of the
            # key-value section by now. The reader also parses the tensor infos after it, so
            # it may fail where the walk answered: no comparison then.
            reference = _reader_shape(path)
            if reference is not None:
                assert shape == reference
                answers["agreed"] += 1
    # Both outcomes occur: the mutations reach the keys that matter and those that do not,
    # and many answers were compared with the reference parser's.
    assert answers["shape"] > 0 and answers["none"] > 0, answers
    assert answers["agreed"] > 0, answers
    assert slowest < 0.5, slowest
