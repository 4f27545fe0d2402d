"""Benchmark of the fit check's GGUF header walk (not a test; prints figures).

    .venv/bin/python bench/bench_context_memory.py [--quick] [--json] [--repeats N]

Before every start of a llama.cpp runtime the supervisor reads the verified model's attention
shape from its GGUF header (``bind/context_memory.py``) to count the KV cache in the fit check.
A real model's header holds its tokenizer: for a Qwen-sized one, 151,936 token strings, as
many scores and types, and 151,387 merges, about 7 MB before the tensors. The script writes
such a header (with the ``gguf`` package, a 4-tensor body) and times, in the same run:

1. ``read_attention_shape`` (the walk: key-value section only, lengths checked, strings
   skipped), median of ``--repeats``;
2. the reference, ``gguf.GGUFReader(path)`` on the same file and the same keys read from its
   ``fields``, median of 3 (it builds a NumPy view for every array element).

Both read from the page cache (the file was just written). ``--quick`` uses a 32,000-token
vocabulary (Llama 2's) instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from companion_runtime.bind.context_memory import AttentionShape, read_attention_shape


def _write(path: Path, vocabulary: int) -> int:
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(28)
    writer.add_context_length(131072)
    writer.add_embedding_length(3584)
    writer.add_head_count(28)
    writer.add_head_count_kv(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"token-{index}".encode() for index in range(vocabulary)])
    writer.add_token_scores([0.0] * vocabulary)
    writer.add_token_types([1] * vocabulary)
    writer.add_token_merges([f"m{index} n{index}" for index in range(vocabulary - 549)])
    for index in range(4):
        writer.add_tensor(f"blk.{index}.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def _reader_shape(path: Path) -> tuple[int, int]:
    fields = gguf.GGUFReader(path).fields
    context = fields["qwen2.context_length"].contents()
    kv_heads = fields["qwen2.attention.head_count_kv"].contents()
    assert isinstance(context, int) and isinstance(kv_heads, int)
    return context, kv_heads


def _median_s(action: object, repeats: int) -> float:
    assert callable(action)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 32,000-token vocabulary")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=9, help="timed walks (default 9)")
    options = parser.parse_args()
    vocabulary = 32_000 if options.quick else 151_936
    with tempfile.TemporaryDirectory(prefix="bench-context-") as directory:
        path = Path(directory) / "header.gguf"
        size = _write(path, vocabulary)
        shape = read_attention_shape(path)
        assert isinstance(shape, AttentionShape) and shape.context_length == 131072
        assert _reader_shape(path) == (shape.context_length, shape.kv_heads[0])
        walk_s = _median_s(lambda: read_attention_shape(path), options.repeats)
        reader_s = _median_s(lambda: _reader_shape(path), 3)
    figures = {
        "vocabulary": vocabulary,
        "file_bytes": size,
        "walk_median_s": walk_s,
        "gguf_reader_median_s": reader_s,
        "reader_over_walk": reader_s / walk_s,
    }
    if options.json:
        print(json.dumps(figures))
    else:
        print(f"GGUF header with a {vocabulary:,}-token vocabulary ({size / 1e6:.1f} MB)")
        print(f"  read_attention_shape (the fit check's walk): {walk_s * 1e3:8.1f} ms (median)")
        print(f"  gguf.GGUFReader, same keys (reference):      {reader_s * 1e3:8.1f} ms (median)")
        print(f"  ratio reference / walk: {reader_s / walk_s:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
