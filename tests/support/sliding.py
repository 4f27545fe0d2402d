"""Tiny Gemma 2, Gemma 3 and gpt-oss models, written with the ``gguf`` package, for the fit check's
tests against the real llama.cpp server: many of their layers attend through a sliding window,
whose cache llama.cpp keeps at the window's size rather than the context's. Their weights are
small random numbers: the tests only load them and read the sizes llama.cpp logs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from companion_runtime.bind import tiny_model

__all__ = ["write_gemma", "write_gpt_oss"]


def write_gemma(
    path: Path,
    architecture: str = "gemma3",
    *,
    layers: int = 8,
    window: int = 512,
    pattern: int | list[bool] | None = None,
    context: int = 32768,
    embedding: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_length: int = 32,
    feed_forward: int = 128,
    swa_head_length: int | None = None,
    header: Mapping[str, str | int | None] | None = None,
) -> Path:
    """A Gemma 3 (or 2) model with a ``window``-token sliding window in all but every
    ``pattern``-th layer (6 unless given; Gemma 2: 2), or as ``pattern``'s flags say (one per
    layer, true for a window). With ``swa_head_length``, the window layers' heads are that long
    (their tensors; the header says so only if ``header`` does). ``header``'s keys are written
    over the header's own (a string, or a number as a uint32; None takes the key away),
    whatever the tensors are."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_length)
    writer.add_value_length(head_length)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    _vocabulary(writer)
    for key, value in (header or {}).items():
        if value is None:
            writer.kv_data[0].pop(key)
            continue
        value_type = gguf.GGUFValueType.STRING if isinstance(value, str) else None
        writer.kv_data[0][key] = gguf.GGUFValue(value, value_type or gguf.GGUFValueType.UINT32)
    random = np.random.RandomState(20_261_129)

    def weights(*shape: int) -> np.ndarray:
        return random.uniform(-0.05, 0.05, size=shape).astype(np.float32)

    if isinstance(pattern, list):
        windowed = list(pattern)
    else:
        every = pattern if pattern is not None else 6 if architecture == "gemma3" else 2
        windowed = [every == 0 or layer % every < every - 1 for layer in range(layers)]
    ones = np.ones(embedding, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(len(tiny_model.VOCABULARY), embedding))
    writer.add_tensor("output_norm.weight", ones)
    for layer in range(layers):
        block = f"blk.{layer}."
        length = head_length
        if swa_head_length is not None and windowed[layer]:
            length = swa_head_length
        head_ones = np.ones(length, dtype=np.float32)
        for name, tensor in (
            ("attn_norm.weight", ones),
            ("attn_q.weight", weights(heads * length, embedding)),
            ("attn_k.weight", weights(kv_heads * length, embedding)),
            ("attn_v.weight", weights(kv_heads * length, embedding)),
            ("attn_output.weight", weights(embedding, heads * length)),
            ("post_attention_norm.weight", ones),
            ("ffn_norm.weight", ones),
            ("ffn_gate.weight", weights(feed_forward, embedding)),
            ("ffn_up.weight", weights(feed_forward, embedding)),
            ("ffn_down.weight", weights(embedding, feed_forward)),
            ("post_ffw_norm.weight", ones),
        ):
            writer.add_tensor(block + name, tensor)
        if architecture == "gemma3":
            writer.add_tensor(block + "attn_q_norm.weight", head_ones)
            writer.add_tensor(block + "attn_k_norm.weight", head_ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gpt_oss(
    path: Path,
    *,
    layers: int = 8,
    window: int = 128,
    pattern: int | list[bool] | None = None,
    context: int = 32768,
    embedding: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_length: int = 32,
    feed_forward: int = 64,
    experts: int = 4,
) -> Path:
    """A gpt-oss model (a mixture of experts, attention sinks) with a ``window``-token sliding
    window in every other layer unless ``pattern`` says otherwise."""
    writer = gguf.GGUFWriter(path, "gpt-oss")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_expert_feed_forward_length(feed_forward)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_length)
    writer.add_value_length(head_length)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    _vocabulary(writer)
    random = np.random.RandomState(20_261_129)

    def weights(*shape: int) -> np.ndarray:
        return random.uniform(-0.05, 0.05, size=shape).astype(np.float32)

    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(vocabulary, embedding))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(vocabulary, embedding))
    for layer in range(layers):
        block = f"blk.{layer}."
        tensors = {
            "attn_norm.weight": ones,
            "post_attention_norm.weight": ones,
            "attn_output.weight": weights(embedding, heads * head_length),
            "attn_output.bias": weights(embedding),
            "attn_sinks.weight": weights(heads),
            "ffn_gate_inp.weight": weights(experts, embedding),
            "ffn_gate_inp.bias": weights(experts),
            "ffn_down_exps.weight": weights(experts, embedding, feed_forward),
            "ffn_down_exps.bias": weights(experts, embedding),
        }
        for name, count in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            tensors[f"attn_{name}.weight"] = weights(count * head_length, embedding)
            tensors[f"attn_{name}.bias"] = weights(count * head_length)
        for name in ("gate", "up"):
            tensors[f"ffn_{name}_exps.weight"] = weights(experts, feed_forward, embedding)
            tensors[f"ffn_{name}_exps.bias"] = weights(experts, feed_forward)
        for name, tensor in tensors.items():
            writer.add_tensor(block + name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _vocabulary(writer: gguf.GGUFWriter) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tiny_model.VOCABULARY))
    writer.add_token_scores([0.0] * len(tiny_model.VOCABULARY))
    writer.add_token_types(
        [int(gguf.TokenType.CONTROL)] * 3
        + [int(gguf.TokenType.BYTE)] * tiny_model.BYTE_TOKEN_COUNT
        + [int(gguf.TokenType.NORMAL)] * (len(tiny_model.VOCABULARY) - 3 - 256)
    )
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
