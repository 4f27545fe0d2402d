"""A tiny llama model that the project generates itself, so tests and the demo run offline.

The model is a real GGUF file with the ``llama`` architecture (2 layers, 64-wide, 4 heads,
F32 tensors) and a SentencePiece-style vocabulary, small enough (about 400 KB) to build in a few
milliseconds and to load in llama.cpp in well under a second. Its weights are built so that
greedy decoding is predictable:

    **Output rule.** For a prompt whose last character ``c`` is printable ASCII other than the
    space, greedy generation of ``n`` tokens yields ``c * n``. For a prompt ending in a space it
    yields ``n`` spaces. The chat template renders the conversation so that it ends with the
    last message's content, so a chat reply repeats that content's last character.

How: every printable character is a vocabulary piece of its own (no merges are possible), so
the prompt's last token is its last character. Each token's embedding is a distinct ±1 sign
vector; the output projection is tied to the embedding matrix, and the attention and
feed-forward blocks write only a small perturbation into the residual stream. The final hidden
state is therefore close to the last token's embedding, and the logit of that same token
exceeds every other logit by a wide margin (also wide enough that llama.cpp's default
``min_p`` sampling leaves only that token, so even non-greedy requests repeat it).

Determinism: the bytes are identical on every run and machine. Weights come from NumPy's legacy
``RandomState`` (whose stream NumPy keeps frozen) and from integer sign patterns, only with
element-wise operations that IEEE 754 rounds exactly; the GGUF writer adds no timestamps.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "BYTE_TOKEN_COUNT",
    "CHAT_TEMPLATE",
    "CONTEXT_LENGTH",
    "EMBEDDING_LENGTH",
    "FEED_FORWARD_LENGTH",
    "HEAD_COUNT",
    "LAYER_COUNT",
    "PRINTABLE_CHARACTERS",
    "SPACE_MARKER",
    "TINY_MODEL_SHA256",
    "TINY_MODEL_SIZE_BYTES",
    "VOCABULARY",
    "expected_greedy_completion",
    "tiny_model_bytes",
    "tiny_model_sha256",
    "write_tiny_model",
]

#: SHA-256 (lowercase hex) of :func:`tiny_model_bytes`, for manifests that pin the model. A test
#: regenerates the model and compares, so a change in the weights, the vocabulary or the GGUF
#: writer's output shows up as a failing test rather than as a silently different model.
TINY_MODEL_SHA256: Final = "ec4a962e6afd6e04c41711eaa74d97bd9033fb8fdc9ff5e1f120e2750408718a"
#: Size in bytes of :func:`tiny_model_bytes`.
TINY_MODEL_SIZE_BYTES: Final = 429_216

#: Architecture hyper-parameters (llama layout).
LAYER_COUNT: Final = 2
EMBEDDING_LENGTH: Final = 64
HEAD_COUNT: Final = 4
FEED_FORWARD_LENGTH: Final = 128
CONTEXT_LENGTH: Final = 2048
_RMS_NORM_EPSILON: Final = 1e-5
_ROPE_FREQUENCY_BASE: Final = 10000.0

#: SentencePiece's marker for a space (U+2581), which also starts every prompt.
SPACE_MARKER: Final = "\u2581"
#: Printable ASCII without the space, which SentencePiece spells with the space marker.
PRINTABLE_CHARACTERS: Final = "".join(chr(code) for code in range(0x21, 0x7F))
BYTE_TOKEN_COUNT: Final = 256

_UNKNOWN_ID: Final = 0
_BEGIN_ID: Final = 1
_END_ID: Final = 2

#: Every piece in id order: the three control tokens, the 256 byte-fallback tokens, the space
#: marker, then one piece per printable character.
VOCABULARY: Final[tuple[str, ...]] = (
    "<unk>",
    "<s>",
    "</s>",
    *(f"<0x{value:02X}>" for value in range(BYTE_TOKEN_COUNT)),
    SPACE_MARKER,
    *PRINTABLE_CHARACTERS,
)

#: A minimal chat template. It has no assistant prefix on purpose: the rendered prompt ends
#: with the last message's content, which keeps the output rule true for chat completions.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% endfor %}"
)

_SEED: Final = 20_240_611
# Each embedding row has length _EMBEDDING_NORM. Through the final RMS norm the hidden state
# becomes ±1 entries, so the repeated token's logit is _EMBEDDING_NORM * sqrt(n_embd) = 32 and
# any other token's is 32 * (cosine between the two sign vectors).
_EMBEDDING_NORM: Final = 4.0
# Rows are re-drawn until every pair of sign vectors has a cosine at most this, so the margin
# between the repeated token and the runner-up is at least 32 * (1 - 0.5) = 16 logits.
_MAX_COSINE: Final = 0.5
_INPUT_WEIGHT_RANGE: Final = 0.125
_OUTPUT_WEIGHT_RANGE: Final = 0.01


def expected_greedy_completion(prompt: str, n_predict: int) -> str:
    """Return what greedy decoding of the tiny model produces for an ASCII ``prompt``.

    The prompt's last character repeated ``n_predict`` times (see the module's output rule).
    """
    if not prompt or not prompt.isascii() or not prompt[-1].isprintable():
        raise ValueError("the output rule covers prompts ending in printable ASCII")
    return prompt[-1] * n_predict


def _token_types() -> list[int]:
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        *([gguf.TokenType.BYTE] * BYTE_TOKEN_COUNT),
    ]
    types.extend([gguf.TokenType.NORMAL] * (len(VOCABULARY) - len(types)))
    return [int(token_type) for token_type in types]


def _token_scores() -> list[float]:
    # SentencePiece merges the adjacent pair with the highest score. Only single characters
    # exist, so the scores never select a merge; they follow the usual "earlier is likelier"
    # convention of SentencePiece vocabularies.
    return [
        0.0 if index < 3 + BYTE_TOKEN_COUNT else -float(index) for index in range(len(VOCABULARY))
    ]


def _sign_embeddings(random: np.random.RandomState) -> npt.NDArray[np.float32]:
    vocabulary_size = len(VOCABULARY)
    signs = np.empty((vocabulary_size, EMBEDDING_LENGTH), dtype=np.int64)
    limit = int(_MAX_COSINE * EMBEDDING_LENGTH)
    row = 0
    while row < vocabulary_size:
        candidate = random.randint(0, 2, size=EMBEDDING_LENGTH).astype(np.int64) * 2 - 1
        # Integer dot products are exact, so the acceptance test is the same on every machine.
        if row == 0 or int(np.max(np.abs(signs[:row] @ candidate))) <= limit:
            signs[row] = candidate
            row += 1
    scale = _EMBEDDING_NORM / math.sqrt(EMBEDDING_LENGTH)  # 0.5: exact in binary floating point
    embeddings: npt.NDArray[np.float32] = (signs * scale).astype(np.float32)
    return embeddings


def _uniform(
    random: np.random.RandomState, shape: tuple[int, ...], bound: float
) -> npt.NDArray[np.float32]:
    return random.uniform(-bound, bound, size=shape).astype(np.float32)


def _tensors() -> list[tuple[str, npt.NDArray[np.float32]]]:
    random = np.random.RandomState(_SEED)
    # NumPy shapes are (rows, columns) = ggml's (ne1, ne0): a weight mapping n_in -> n_out
    # is stored as (n_out, n_in).
    tensors: list[tuple[str, npt.NDArray[np.float32]]] = [
        ("token_embd.weight", _sign_embeddings(random)),
        ("output_norm.weight", np.ones(EMBEDDING_LENGTH, dtype=np.float32)),
    ]
    square = (EMBEDDING_LENGTH, EMBEDDING_LENGTH)
    for layer in range(LAYER_COUNT):
        prefix = f"blk.{layer}."
        tensors += [
            (prefix + "attn_norm.weight", np.ones(EMBEDDING_LENGTH, dtype=np.float32)),
            (prefix + "attn_q.weight", _uniform(random, square, _INPUT_WEIGHT_RANGE)),
            (prefix + "attn_k.weight", _uniform(random, square, _INPUT_WEIGHT_RANGE)),
            (prefix + "attn_v.weight", _uniform(random, square, _INPUT_WEIGHT_RANGE)),
            (prefix + "attn_output.weight", _uniform(random, square, _OUTPUT_WEIGHT_RANGE)),
            (prefix + "ffn_norm.weight", np.ones(EMBEDDING_LENGTH, dtype=np.float32)),
            (
                prefix + "ffn_gate.weight",
                _uniform(random, (FEED_FORWARD_LENGTH, EMBEDDING_LENGTH), _INPUT_WEIGHT_RANGE),
            ),
            (
                prefix + "ffn_up.weight",
                _uniform(random, (FEED_FORWARD_LENGTH, EMBEDDING_LENGTH), _INPUT_WEIGHT_RANGE),
            ),
            (
                prefix + "ffn_down.weight",
                _uniform(random, (EMBEDDING_LENGTH, FEED_FORWARD_LENGTH), _OUTPUT_WEIGHT_RANGE),
            ),
        ]
    return tensors


def _write(path: Path) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("companion-runtime tiny llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(EMBEDDING_LENGTH)
    writer.add_block_count(LAYER_COUNT)
    writer.add_feed_forward_length(FEED_FORWARD_LENGTH)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT)
    writer.add_rope_dimension_count(EMBEDDING_LENGTH // HEAD_COUNT)
    writer.add_rope_freq_base(_ROPE_FREQUENCY_BASE)
    writer.add_layer_norm_rms_eps(_RMS_NORM_EPSILON)
    writer.add_vocab_size(len(VOCABULARY))

    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(VOCABULARY))
    writer.add_token_scores(_token_scores())
    writer.add_token_types(_token_types())
    writer.add_unk_token_id(_UNKNOWN_ID)
    writer.add_bos_token_id(_BEGIN_ID)
    writer.add_eos_token_id(_END_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in _tensors():
        writer.add_tensor(name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_model_bytes() -> bytes:
    """Return the tiny model's GGUF bytes (identical on every call)."""
    with tempfile.TemporaryDirectory(prefix="tiny-model-") as directory:
        path = Path(directory) / "tiny.gguf"
        _write(path)
        return path.read_bytes()


def tiny_model_sha256() -> str:
    """Return the lowercase hex SHA-256 of :func:`tiny_model_bytes`."""
    return hashlib.sha256(tiny_model_bytes()).hexdigest()


def write_tiny_model(path: Path) -> Path:
    """Write the tiny model to ``path`` atomically and return ``path``.

    The bytes go to a temporary file in the same directory first, so a reader never sees a
    half-written model at ``path``.
    """
    path = Path(path)
    data = tiny_model_bytes()
    descriptor, temporary = tempfile.mkstemp(prefix=".tiny-model-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        # Remove the partial file, then let the error (or cancellation) continue unchanged.
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
