"""A tiny llama model with a vocabulary (or another array of its header) as large as a test
asks, written with the ``gguf`` package: llama.cpp keeps such arrays in memory as it loads the
model, several times over. Its weights are zeros (the token embedding in Q4_0, 18 bytes a
token): the tests only load it and read how much memory the runtime took."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from companion_runtime.bind import tiny_model

__all__ = ["write_large_vocabulary"]

_EMBEDDING: int = 64
_FEED_FORWARD: int = 128
_LAYERS: int = 2
_HEADS: int = 4
#: Bytes of a Q4_0 row of the token embedding: 18 bytes for each 32 values.
_Q4_0_ROW: int = _EMBEDDING // 32 * 18


def _token(index: int, length: int) -> str:
    """A token no other one is: ``~`` and ``index`` in base 36, padded to ``length``."""
    return ("~" + np.base_repr(index, 36)).ljust(length, "z")


def write_large_vocabulary(
    path: Path,
    *,
    tokens: int = 0,
    token_length: int = 6,
    strings: int = 0,
    string_length: int = 6,
    floats: int = 0,
) -> Path:
    """A model whose vocabulary is the tiny model's and ``tokens`` more of ``token_length``
    bytes each; with ``strings``, an array of that many strings (``general.notes``) and with
    ``floats`` one of random float32 numbers (``general.weights_note``), which llama.cpp holds
    while it loads the model and uses for nothing."""
    vocabulary: Sequence[str] = [
        *tiny_model.VOCABULARY,
        *(_token(index, token_length) for index in range(tokens)),
    ]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(_EMBEDDING)
    writer.add_block_count(_LAYERS)
    writer.add_feed_forward_length(_FEED_FORWARD)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_HEADS)
    writer.add_rope_dimension_count(_EMBEDDING // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocabulary))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if strings:
        writer.add_array("general.notes", [_token(i, string_length) for i in range(strings)])
    if floats:
        numbers = np.random.RandomState(1).uniform(-1e6, 1e6, floats).astype(np.float32)
        writer.add_array("general.weights_note", numbers.tolist())
    writer.add_tensor(
        "token_embd.weight",
        np.zeros((len(vocabulary), _Q4_0_ROW), dtype=np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q4_0,
    )
    writer.add_tensor("output_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
    square = np.zeros((_EMBEDDING, _EMBEDDING), dtype=np.float32)
    for layer in range(_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}{name}.weight", square)
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
        wide = np.zeros((_FEED_FORWARD, _EMBEDDING), dtype=np.float32)
        writer.add_tensor(prefix + "ffn_gate.weight", wide)
        writer.add_tensor(prefix + "ffn_up.weight", wide)
        writer.add_tensor(
            prefix + "ffn_down.weight", np.zeros((_EMBEDDING, _FEED_FORWARD), np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
