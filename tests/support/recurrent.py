"""Tiny models with a recurrent state, written with the ``gguf`` package, for the fit check's
tests against the real llama.cpp server: Mamba, RWKV-6 and RWKV-7 models (every layer recurrent), a
Granite hybrid (Mamba-2 layers beside attention layers) and an LFM2 model (short-convolution
layers beside attention layers). Their weights are small random numbers: the
tests only load them and read the sizes llama.cpp logs, nothing is generated."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from companion_runtime.bind import tiny_model

__all__ = [
    "write_granite_hybrid",
    "write_jamba",
    "write_lfm2",
    "write_mamba",
    "write_mamba2_hybrid",
    "write_qwen3next",
    "write_rwkv6",
    "write_rwkv7",
]

_SEED = 20_261_129


def _writer(path: Path, architecture: str, *, embedding: int, layers: int) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(4096)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_layer_norm_rms_eps(1e-5)
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
    return writer


def _finish(writer: gguf.GGUFWriter, tensors: dict[str, npt.NDArray[np.float32]]) -> None:
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class _Random:
    def __init__(self) -> None:
        self._random = np.random.RandomState(_SEED)

    def __call__(self, *shape: int) -> npt.NDArray[np.float32]:
        # NumPy's (rows, columns) is ggml's (ne1, ne0).
        return self._random.uniform(-0.05, 0.05, size=shape).astype(np.float32)


def write_mamba(
    path: Path,
    *,
    embedding: int = 128,
    layers: int = 3,
    conv_kernel: int = 4,
    state: int = 64,
    time_step_rank: int = 4,
) -> Path:
    """A Mamba model: every layer has a convolution state and an SSM state (llama.cpp takes
    only an inner size twice the embedding)."""
    inner = 2 * embedding
    writer = _writer(path, "mamba", embedding=embedding, layers=layers)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(conv_kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(state)
    writer.add_ssm_time_step_rank(time_step_rank)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "output_norm.weight": np.ones(embedding, dtype=np.float32),
    }
    for layer in range(layers):
        block = f"blk.{layer}."
        tensors |= {
            block + "attn_norm.weight": np.ones(embedding, dtype=np.float32),
            block + "ssm_in.weight": random(2 * inner, embedding),
            block + "ssm_conv1d.weight": random(inner, conv_kernel),
            block + "ssm_conv1d.bias": random(inner),
            block + "ssm_x.weight": random(time_step_rank + 2 * state, inner),
            block + "ssm_dt.weight": random(inner, time_step_rank),
            block + "ssm_dt.bias": random(inner),
            block + "ssm_a": random(inner, state),
            block + "ssm_d": random(inner),
            block + "ssm_out.weight": random(embedding, inner),
        }
    _finish(writer, tensors)
    return path


def write_granite_hybrid(
    path: Path,
    *,
    embedding: int = 128,
    kv_heads: tuple[int, ...] = (0, 2, 0, 0),
    heads: int = 4,
    conv_kernel: int = 4,
    state: int = 32,
    groups: int = 2,
    ssm_heads: int = 8,
    feed_forward: int = 128,
) -> Path:
    """A Granite hybrid: Mamba-2 layers (no KV heads) beside attention layers (llama.cpp
    takes only an inner size twice the embedding)."""
    inner = 2 * embedding
    layers = len(kv_heads)
    writer = _writer(path, "granitehybrid", embedding=embedding, layers=layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(list(kv_heads))
    writer.add_rope_dimension_count(embedding // heads)
    writer.add_ssm_conv_kernel(conv_kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(state)
    writer.add_ssm_group_count(groups)
    writer.add_ssm_time_step_rank(ssm_heads)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    head = embedding // heads
    conv = inner + 2 * groups * state
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "output_norm.weight": np.ones(embedding, dtype=np.float32),
    }
    for layer, kv in enumerate(kv_heads):
        block = f"blk.{layer}."
        tensors[block + "attn_norm.weight"] = np.ones(embedding, dtype=np.float32)
        if kv == 0:
            tensors |= {
                block + "ssm_in.weight": random(
                    2 * inner + 2 * groups * state + ssm_heads, embedding
                ),
                block + "ssm_conv1d.weight": random(conv, conv_kernel),
                block + "ssm_conv1d.bias": random(conv),
                block + "ssm_dt.bias": random(ssm_heads),
                block + "ssm_a": random(ssm_heads, 1),
                block + "ssm_d": random(ssm_heads, 1),
                block + "ssm_norm.weight": np.ones((groups, inner // groups), dtype=np.float32),
                block + "ssm_out.weight": random(embedding, inner),
            }
        else:
            tensors |= {
                block + "attn_q.weight": random(heads * head, embedding),
                block + "attn_k.weight": random(kv * head, embedding),
                block + "attn_v.weight": random(kv * head, embedding),
                block + "attn_output.weight": random(embedding, heads * head),
            }
        tensors |= {
            block + "ffn_norm.weight": np.ones(embedding, dtype=np.float32),
            block + "ffn_gate.weight": random(feed_forward, embedding),
            block + "ffn_up.weight": random(feed_forward, embedding),
            block + "ffn_down.weight": random(embedding, feed_forward),
        }
    _finish(writer, tensors)
    return path


def write_rwkv6(
    path: Path,
    *,
    embedding: int = 256,
    layers: int = 6,
    head_size: int = 64,
    extra: int = 8,
    feed_forward: int = 256,
) -> Path:
    """An RWKV-6 model: every layer has a token-shift state and a WKV state."""
    writer = _writer(path, "rwkv6", embedding=embedding, layers=layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(0)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(head_size)
    writer.add_time_mix_extra_dim(extra)
    writer.add_time_decay_extra_dim(extra)
    writer.add_rescale_every_n_layers(6)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "token_embd_norm.weight": ones,
        "token_embd_norm.bias": random(embedding),
        "output_norm.weight": ones,
        "output_norm.bias": random(embedding),
        "output.weight": random(vocabulary, embedding),
    }
    square = (embedding, embedding)
    for layer in range(layers):
        block = f"blk.{layer}."
        tensors |= {
            block + "attn_norm.weight": ones,
            block + "attn_norm.bias": random(embedding),
            block + "attn_norm_2.weight": ones,
            block + "attn_norm_2.bias": random(embedding),
            block + "time_mix_w1.weight": random(5 * extra, embedding),
            block + "time_mix_w2.weight": random(5, embedding, extra),
            block + "time_mix_lerp_x.weight": random(1, 1, embedding),
            block + "time_mix_lerp_fused.weight": random(5, 1, 1, embedding),
            block + "time_mix_first.weight": random(embedding // head_size, head_size),
            block + "time_mix_decay.weight": random(embedding),
            block + "time_mix_decay_w1.weight": random(extra, embedding),
            block + "time_mix_decay_w2.weight": random(embedding, extra),
            block + "time_mix_key.weight": random(*square),
            block + "time_mix_value.weight": random(*square),
            block + "time_mix_receptance.weight": random(*square),
            block + "time_mix_gate.weight": random(*square),
            block + "time_mix_ln.weight": ones,
            block + "time_mix_ln.bias": random(embedding),
            block + "time_mix_output.weight": random(*square),
            block + "channel_mix_lerp_k.weight": random(1, 1, embedding),
            block + "channel_mix_lerp_r.weight": random(1, 1, embedding),
            block + "channel_mix_key.weight": random(feed_forward, embedding),
            block + "channel_mix_value.weight": random(embedding, feed_forward),
            block + "channel_mix_receptance.weight": random(*square),
        }
    _finish(writer, tensors)
    return path


def write_lfm2(
    path: Path,
    *,
    embedding: int = 256,
    kv_heads: tuple[int, ...] = (0, 2, 0, 0),
    heads: int = 4,
    l_cache: int = 9,
    feed_forward: int = 64,
) -> Path:
    """An LFM2 model: short-convolution layers (no KV heads; an R state, no S) beside
    attention layers."""
    writer = _writer(path, "lfm2", embedding=embedding, layers=len(kv_heads))
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(list(kv_heads))
    writer.add_shortconv_l_cache(l_cache)
    writer.add_rope_freq_base(10000.0)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    head = embedding // heads
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "token_embd_norm.weight": ones,
    }
    for layer, kv in enumerate(kv_heads):
        block = f"blk.{layer}."
        tensors |= {
            block + "attn_norm.weight": ones,
            block + "ffn_norm.weight": ones,
            block + "ffn_gate.weight": random(feed_forward, embedding),
            block + "ffn_up.weight": random(feed_forward, embedding),
            block + "ffn_down.weight": random(embedding, feed_forward),
        }
        if kv == 0:
            tensors |= {
                block + "shortconv.conv.weight": random(embedding, l_cache),
                block + "shortconv.in_proj.weight": random(3 * embedding, embedding),
                block + "shortconv.out_proj.weight": random(embedding, embedding),
            }
        else:
            tensors |= {
                block + "attn_q.weight": random(heads * head, embedding),
                block + "attn_k.weight": random(kv * head, embedding),
                block + "attn_v.weight": random(kv * head, embedding),
                block + "attn_output.weight": random(embedding, heads * head),
                block + "attn_q_norm.weight": np.ones(head, dtype=np.float32),
                block + "attn_k_norm.weight": np.ones(head, dtype=np.float32),
            }
    _finish(writer, tensors)
    return path


def write_qwen3next(
    path: Path,
    *,
    architecture: str = "qwen3next",
    layers: int = 4,
    interval: int | None = None,
    recurrent_layers: list[bool] | None = None,
    embedding: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_length: int = 32,
    conv_kernel: int = 4,
    state: int = 32,
    key_heads: int = 2,
    value_heads: int = 4,
    feed_forward: int = 64,
) -> Path:
    """A Qwen3-Next (mixture of experts) or Qwen3.5 (dense) model: gated delta-net layers
    beside attention layers, every ``interval``-th (4 unless given) or those that
    ``recurrent_layers`` marks false."""
    dense = architecture == "qwen35"
    writer = _writer(path, architecture, embedding=embedding, layers=layers)
    writer.add_feed_forward_length(feed_forward)
    if not dense:
        writer.add_expert_feed_forward_length(feed_forward)
        writer.add_expert_shared_feed_forward_length(feed_forward)
        writer.add_expert_count(2)
        writer.add_expert_used_count(1)
    else:
        writer.add_rope_dimension_sections([2, 1, 1, 0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_length)
    writer.add_value_length(head_length)
    writer.add_rope_dimension_count(head_length // 4)
    writer.add_ssm_conv_kernel(conv_kernel)
    writer.add_ssm_state_size(state)
    writer.add_ssm_group_count(key_heads)
    writer.add_ssm_time_step_rank(value_heads)
    writer.add_ssm_inner_size(state * value_heads)
    if interval is not None:
        writer.add_full_attention_interval(interval)
    if recurrent_layers is not None:
        writer.add_array(f"{architecture}.attention.recurrent_layers", recurrent_layers)
    else:
        recurrent_layers = [(layer + 1) % (interval or 4) != 0 for layer in range(layers)]
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    values = state * value_heads
    conv = 2 * state * key_heads + values
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "output_norm.weight": ones,
    }
    for layer, recurrent in enumerate(recurrent_layers):
        block = f"blk.{layer}."
        tensors |= {block + "attn_norm.weight": ones, block + "post_attention_norm.weight": ones}
        if recurrent:
            tensors |= {
                block + "attn_qkv.weight": random(conv, embedding),
                block + "attn_gate.weight": random(values, embedding),
                block + "ssm_conv1d.weight": random(conv, conv_kernel),
                block + "ssm_dt.bias": random(value_heads),
                block + "ssm_a": random(value_heads),
                block + "ssm_norm.weight": np.ones(state, dtype=np.float32),
                block + "ssm_out.weight": random(embedding, values),
            }
            if dense:
                tensors[block + "ssm_beta.weight"] = random(value_heads, embedding)
                tensors[block + "ssm_alpha.weight"] = random(value_heads, embedding)
            else:
                tensors[block + "ssm_ba.weight"] = random(2 * value_heads, embedding)
        else:
            tensors |= {
                block + "attn_q.weight": random(2 * heads * head_length, embedding),
                block + "attn_k.weight": random(kv_heads * head_length, embedding),
                block + "attn_v.weight": random(kv_heads * head_length, embedding),
                block + "attn_output.weight": random(embedding, heads * head_length),
                block + "attn_q_norm.weight": np.ones(head_length, dtype=np.float32),
                block + "attn_k_norm.weight": np.ones(head_length, dtype=np.float32),
            }
        if dense:
            tensors |= {
                block + "ffn_gate.weight": random(feed_forward, embedding),
                block + "ffn_up.weight": random(feed_forward, embedding),
                block + "ffn_down.weight": random(embedding, feed_forward),
            }
        else:
            tensors |= {
                block + "ffn_gate_inp.weight": random(2, embedding),
                block + "ffn_gate_exps.weight": random(2, feed_forward, embedding),
                block + "ffn_up_exps.weight": random(2, feed_forward, embedding),
                block + "ffn_down_exps.weight": random(2, embedding, feed_forward),
                block + "ffn_gate_inp_shexp.weight": random(embedding),
                block + "ffn_gate_shexp.weight": random(feed_forward, embedding),
                block + "ffn_up_shexp.weight": random(feed_forward, embedding),
                block + "ffn_down_shexp.weight": random(embedding, feed_forward),
            }
    _finish(writer, tensors)
    return path


def write_mamba2_hybrid(
    path: Path,
    architecture: str,
    *,
    layers: str,
    embedding: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    conv_kernel: int = 4,
    inner: int = 256,
    state: int = 32,
    groups: int = 2,
    ssm_heads: int = 8,
    feed_forward: int = 128,
) -> Path:
    """A Mamba-2, Nemotron-H or Falcon-H1 model. Mamba-2 and Nemotron-H: ``layers`` spells
    each layer, ``M`` a Mamba-2 layer, ``A`` attention, ``F`` a feed-forward network.
    Falcon-H1: every layer has a Mamba-2 mixer, attention and a feed-forward network side by
    side (``layers`` gives their count)."""
    falcon = architecture == "falcon-h1"
    writer = _writer(path, architecture, embedding=embedding, layers=len(layers))
    writer.add_head_count(heads)
    if falcon:
        writer.add_feed_forward_length(feed_forward)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(10000.0)
    else:
        writer.add_feed_forward_length([feed_forward if kind == "F" else 0 for kind in layers])
        writer.add_head_count_kv([kv_heads if kind == "A" else 0 for kind in layers])
        writer.add_layer_norm_eps(1e-5)
    head = embedding // heads
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_ssm_conv_kernel(conv_kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(state)
    writer.add_ssm_group_count(groups)
    writer.add_ssm_time_step_rank(ssm_heads)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    conv = inner + 2 * groups * state
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "output_norm.weight": ones,
    }
    if falcon:
        tensors["output.weight"] = random(vocabulary, embedding)
    mamba = {
        "ssm_in.weight": random(2 * inner + 2 * groups * state + ssm_heads, embedding),
        "ssm_conv1d.weight": random(conv, conv_kernel),
        "ssm_conv1d.bias": random(conv),
        "ssm_dt.bias": random(ssm_heads),
        "ssm_a": random(ssm_heads, 1),
        "ssm_d": random(ssm_heads, 1),
        "ssm_norm.weight": np.ones((groups, inner // groups), dtype=np.float32),
        "ssm_out.weight": random(embedding, inner),
    }
    attention = {
        "attn_q.weight": random(heads * head, embedding),
        "attn_k.weight": random(kv_heads * head, embedding),
        "attn_v.weight": random(kv_heads * head, embedding),
        "attn_output.weight": random(embedding, heads * head),
    }
    for layer, kind in enumerate(layers):
        block = f"blk.{layer}."
        tensors[block + "attn_norm.weight"] = ones
        parts: dict[str, npt.NDArray[np.float32]] = {}
        if falcon:
            parts = {
                **mamba,
                **attention,
                "ffn_norm": ones,
                "ffn_gate.weight": random(feed_forward, embedding),
                "ffn_up.weight": random(feed_forward, embedding),
                "ffn_down.weight": random(embedding, feed_forward),
            }
        elif kind == "M":
            parts = mamba
        elif kind == "A":
            parts = attention
        else:
            parts = {
                "ffn_up.weight": random(feed_forward, embedding),
                "ffn_down.weight": random(embedding, feed_forward),
            }
        tensors |= {block + name: tensor for name, tensor in parts.items()}
    _finish(writer, tensors)
    return path


def write_jamba(
    path: Path,
    *,
    layers: str = "MAMM",
    embedding: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    conv_kernel: int = 4,
    inner: int = 256,
    state: int = 32,
    time_step_rank: int = 8,
    feed_forward: int = 128,
) -> Path:
    """A Jamba model: ``layers`` spells each layer, ``M`` a Mamba layer (no KV heads), ``A``
    attention; each with a feed-forward network."""
    writer = _writer(path, "jamba", embedding=embedding, layers=len(layers))
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv([kv_heads if kind == "A" else 0 for kind in layers])
    writer.add_ssm_conv_kernel(conv_kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(state)
    writer.add_ssm_time_step_rank(time_step_rank)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    head = embedding // heads
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "output_norm.weight": ones,
    }
    for layer, kind in enumerate(layers):
        block = f"blk.{layer}."
        parts: dict[str, npt.NDArray[np.float32]] = {"attn_norm.weight": ones}
        if kind == "M":
            parts |= {
                "ssm_in.weight": random(2 * inner, embedding),
                "ssm_conv1d.weight": random(inner, conv_kernel),
                "ssm_conv1d.bias": random(inner),
                "ssm_x.weight": random(time_step_rank + 2 * state, inner),
                "ssm_dt_norm.weight": np.ones(time_step_rank, dtype=np.float32),
                "ssm_dt.weight": random(inner, time_step_rank),
                "ssm_dt.bias": random(inner),
                "ssm_b_norm.weight": np.ones(state, dtype=np.float32),
                "ssm_c_norm.weight": np.ones(state, dtype=np.float32),
                "ssm_a": random(inner, state),
                "ssm_d": random(inner),
                "ssm_out.weight": random(embedding, inner),
            }
        else:
            parts |= {
                "attn_q.weight": random(heads * head, embedding),
                "attn_k.weight": random(kv_heads * head, embedding),
                "attn_v.weight": random(kv_heads * head, embedding),
                "attn_output.weight": random(embedding, heads * head),
            }
        parts |= {
            "ffn_norm.weight": ones,
            "ffn_gate.weight": random(feed_forward, embedding),
            "ffn_up.weight": random(feed_forward, embedding),
            "ffn_down.weight": random(embedding, feed_forward),
        }
        tensors |= {block + name: tensor for name, tensor in parts.items()}
    _finish(writer, tensors)
    return path


def write_rwkv7(
    path: Path,
    *,
    embedding: int = 256,
    layers: int = 6,
    head_size: int = 64,
    lora: int = 8,
    feed_forward: int = 256,
) -> Path:
    """An RWKV-7 model: every layer has a token-shift state and a WKV state."""
    writer = _writer(path, "rwkv7", embedding=embedding, layers=layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(0)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(head_size)
    writer.add_decay_lora_rank(lora)
    writer.add_iclr_lora_rank(lora)
    writer.add_value_residual_mix_lora_rank(lora)
    writer.add_gate_lora_rank(lora)
    random = _Random()
    vocabulary = len(tiny_model.VOCABULARY)
    ones = np.ones(embedding, dtype=np.float32)
    tensors = {
        "token_embd.weight": random(vocabulary, embedding),
        "token_embd_norm.weight": ones,
        "token_embd_norm.bias": random(embedding),
        "output_norm.weight": ones,
        "output_norm.bias": random(embedding),
        "output.weight": random(vocabulary, embedding),
    }
    for layer in range(layers):
        block = f"blk.{layer}."
        for norm in ("attn_norm", "attn_norm_2", "time_mix_ln"):
            tensors |= {block + norm + ".weight": ones, block + norm + ".bias": random(embedding)}
        for name in ("w", "a", "v", "g"):
            if name != "g":
                tensors[block + f"time_mix_{name}0.weight"] = random(embedding)
            tensors[block + f"time_mix_{name}1.weight"] = random(lora, embedding)
            tensors[block + f"time_mix_{name}2.weight"] = random(embedding, lora)
        tensors[block + "time_mix_lerp_fused.weight"] = random(6, 1, 1, embedding)
        for name in ("k_k", "k_a", "r_k"):
            tensors[block + f"time_mix_{name}.weight"] = random(embedding)
        for name in ("key", "value", "receptance", "output"):
            tensors[block + f"time_mix_{name}.weight"] = random(embedding, embedding)
        tensors |= {
            block + "channel_mix_lerp_k.weight": random(1, 1, embedding),
            block + "channel_mix_key.weight": random(feed_forward, embedding),
            block + "channel_mix_value.weight": random(embedding, feed_forward),
        }
    _finish(writer, tensors)
    return path
