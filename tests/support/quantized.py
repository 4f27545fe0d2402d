"""A llama model with quantized weights (Q4_0 unless asked otherwise), written with the ``gguf``
package, large enough for the memory the CPU backend repacks them into to show in the
runtime's resident set. Its weights are zero blocks: the tests only load it and read how much
memory the runtime took."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import gguf
import numpy as np

from companion_runtime.bind import tiny_model

__all__ = ["cpu_backend_repacks", "embedding_bytes", "quantized_bytes", "write_quantized"]

_EMBEDDING: int = 1024
_FEED_FORWARD: int = 4096
_HEADS: int = 8


def cpu_backend_repacks() -> bool:
    """Whether llama.cpp's CPU backend repacks Q4_0 matrices here: on an x86 machine only with
    AVX2 (as ``/proc/cpuinfo`` lists it), elsewhere with NEON."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return re.search(r"\bavx2\b", flags) is not None


def _blocks(
    rows: int, columns: int, quantization: gguf.GGMLQuantizationType
) -> np.ndarray[tuple[int, int], np.dtype[np.uint8]]:
    block, size = gguf.GGML_QUANT_SIZES[quantization]
    return np.zeros((rows, columns // block * size), dtype=np.uint8)


def quantized_bytes(
    layers: int, quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q4_0
) -> int:
    """The bytes of :func:`write_quantized`'s matrices, the token embedding left out."""
    block, size = gguf.GGML_QUANT_SIZES[quantization]
    square = _EMBEDDING * _EMBEDDING
    per_layer = 4 * square + 3 * _EMBEDDING * _FEED_FORWARD
    return layers * per_layer // block * size


def embedding_bytes(
    tokens: int, quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q4_0
) -> int:
    """The bytes of :func:`write_quantized`'s token embedding with ``tokens`` more tokens."""
    block, size = gguf.GGML_QUANT_SIZES[quantization]
    return (len(tiny_model.VOCABULARY) + tokens) * _EMBEDDING // block * size


def write_quantized(
    path: Path,
    *,
    layers: int = 8,
    quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q4_0,
    tokens: int = 0,
) -> Path:
    """A ``layers``-layer llama model (1,024 wide, a feed-forward of 4,096) whose matrices
    and token embedding are of type ``quantization``; it has no output matrix of its own (the
    token embedding is tied to it). ``tokens`` more tokens grow the vocabulary, and the token
    embedding with it."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(_EMBEDDING)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(_FEED_FORWARD)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_HEADS)
    writer.add_rope_dimension_count(_EMBEDDING // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    vocabulary = [*tiny_model.VOCABULARY, *(f"~{index}" for index in range(tokens))]
    writer.add_token_list(vocabulary)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    raw = {"raw_dtype": quantization}
    embedding = _blocks(len(vocabulary), _EMBEDDING, quantization)
    writer.add_tensor("token_embd.weight", embedding, **raw)
    writer.add_tensor("output_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(_EMBEDDING, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            square = _blocks(_EMBEDDING, _EMBEDDING, quantization)
            writer.add_tensor(f"{prefix}{name}.weight", square, **raw)
        for name in ("ffn_gate", "ffn_up"):
            wide = _blocks(_FEED_FORWARD, _EMBEDDING, quantization)
            writer.add_tensor(f"{prefix}{name}.weight", wide, **raw)
        down = _blocks(_EMBEDDING, _FEED_FORWARD, quantization)
        writer.add_tensor(prefix + "ffn_down.weight", down, **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
