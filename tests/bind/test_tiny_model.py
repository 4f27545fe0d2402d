"""The generated tiny model: deterministic bytes, a valid GGUF llama model, the promised vocab."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from companion_runtime.bind import tiny_model
from companion_runtime.bind.tiny_model import (
    CHAT_TEMPLATE,
    PRINTABLE_CHARACTERS,
    SPACE_MARKER,
    TINY_MODEL_SHA256,
    TINY_MODEL_SIZE_BYTES,
    VOCABULARY,
    expected_greedy_completion,
    tiny_model_bytes,
    tiny_model_sha256,
    write_tiny_model,
)

pytestmark = pytest.mark.unit

# The model's size is fixed by its shape: 354 x 64 embeddings, 2 layers of 4 attention and 3
# feed-forward matrices, all F32, plus the vocabulary. It must stay small enough to load at
# once and to live in tests.
MIN_SIZE = 350_000
MAX_SIZE = 500_000

_FIELD_ARCHITECTURE = "general.architecture"


def _field(reader: gguf.GGUFReader, key: str) -> object:
    value = reader.get_field(key)
    assert value is not None, key
    return value.contents()


def test_two_generations_are_byte_identical() -> None:
    first = tiny_model_bytes()
    second = tiny_model_bytes()
    assert first == second
    assert MIN_SIZE <= len(first) <= MAX_SIZE
    assert tiny_model_sha256() == hashlib.sha256(first).hexdigest()


def test_the_pinned_digest_and_size_match_a_fresh_generation() -> None:
    data = tiny_model_bytes()
    assert hashlib.sha256(data).hexdigest() == TINY_MODEL_SHA256
    assert len(data) == TINY_MODEL_SIZE_BYTES


def test_a_fresh_interpreter_generates_the_same_bytes(tmp_path: Path) -> None:
    # Another process (fresh hash seed, fresh NumPy state) must produce the very same file.
    script = (
        "import sys; from pathlib import Path; "
        "from companion_runtime.bind.tiny_model import write_tiny_model; "
        "write_tiny_model(Path(sys.argv[1]))"
    )
    target = tmp_path / "other.gguf"
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(target)], check=True, env=environment)
    assert target.read_bytes() == tiny_model_bytes()


def test_write_tiny_model_writes_the_bytes_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    assert write_tiny_model(path) == path
    assert path.read_bytes() == tiny_model_bytes()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model.gguf"]
    # Writing again replaces the file atomically with identical bytes.
    write_tiny_model(path)
    assert path.read_bytes() == tiny_model_bytes()


def test_the_gguf_reader_reads_back_a_llama_model(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "model.gguf"))
    assert _field(reader, _FIELD_ARCHITECTURE) == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.feed_forward_length") == 128
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.context_length") == 2048
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert all(tensor.tensor_type == gguf.GGMLQuantizationType.F32 for tensor in tensors.values())
    assert tensors["token_embd.weight"].shape.tolist() == [64, len(VOCABULARY)]
    for layer in range(2):
        assert tensors[f"blk.{layer}.attn_q.weight"].shape.tolist() == [64, 64]
        assert tensors[f"blk.{layer}.ffn_up.weight"].shape.tolist() == [64, 128]
        assert tensors[f"blk.{layer}.ffn_down.weight"].shape.tolist() == [128, 64]


def test_the_vocabulary_is_sentencepiece_style(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "model.gguf"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list)
    assert isinstance(types, list)
    assert tokens == list(VOCABULARY)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    byte_tokens = [token for token, kind in zip(tokens, types, strict=True) if kind == 6]
    assert byte_tokens == [f"<0x{value:02X}>" for value in range(256)]
    assert SPACE_MARKER in tokens
    assert all(character in tokens for character in PRINTABLE_CHARACTERS)
    assert len(set(tokens)) == len(tokens)


def test_embeddings_make_every_token_its_own_best_successor() -> None:
    # The construction the output rule rests on, checked on the weights themselves: after the
    # final RMS norm, each token's own logit beats every other token's by a wide margin.
    embeddings = dict(tiny_model._tensors())["token_embd.weight"].astype(np.float64)
    normalised = embeddings / np.sqrt(np.mean(embeddings**2, axis=1, keepdims=True))
    logits = normalised @ embeddings.T
    own = np.diag(logits)
    runner_up = np.max(logits - np.diag(np.full(len(own), np.inf)), axis=1)
    assert np.all(own - runner_up >= 15.0)


def test_expected_greedy_completion_is_the_last_character_repeated() -> None:
    assert expected_greedy_completion("abc", 4) == "cccc"
    assert expected_greedy_completion("hi there!", 2) == "!!"
    with pytest.raises(ValueError):
        expected_greedy_completion("", 3)
    with pytest.raises(ValueError):
        expected_greedy_completion("caf\u00e9", 3)
