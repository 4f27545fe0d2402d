"""How much memory a llama.cpp runtime's context (its KV cache and any recurrent state) will
take, from the model file.

The fit check counts the model's bytes plus an allowance. A llama.cpp runtime also allocates a
KV cache as it loads the model, before any resource sample can see it, and that cache grows
with the context: ``n_ctx × Σ_layers n_head_kv × (key_length + value_length) × element size``.
For a 4,096-token context that is tens to hundreds of MiB; for the 128k tokens many model files
declare (the length upstream ``llama-server`` takes when ``-c`` is not given) it is many GiB.
:func:`estimate_context_memory` works it out so that the fit check can count it.

What it reads:

- the **runtime command**: the estimate is made only for a command that runs llama.cpp's server
  (the embedded launcher, ``python -m companion_runtime.bind.llama_server``, or an executable
  named ``llama-server``, also behind a wrapper such as ``env NAME=VALUE`` or ``nice``; env's
  ``-S`` strings are split as env splits them, its ``-i`` and ``-u`` take variables away); for any
  other runtime it returns None and the allowance stands alone.
  Each is read the way it reads its own command line. The launcher's arguments go through its
  own parser (so ``--ctx 8192``, ``-c8192`` and ``--ctx-size=8192`` all count); its context is
  :data:`~companion_runtime.bind.llama_server.DEFAULT_CONTEXT_SIZE` unless ``-c`` says
  otherwise, and ``--parallel`` slots (1 by default). Upstream ``llama-server`` is read as its
  parser reads it: an option's value is never taken for an option (``--alias -c``), ``_`` in a
  long option is ``-`` (``--ctx_size``), ``--ctx-size=N`` is no option at all, numbers are read
  as ``std::stoi`` reads them (``8192abc`` is 8192, ``0x10`` is 0), the last one counts, the
  ``LLAMA_ARG_*`` variables of the runtime's extra environment count below the flags, and its
  configuration files below those (``/etc/llama.cpp/config.ini``, then ``llama.cpp/config.ini``
  under the runtime's ``XDG_CONFIG_HOME``, else ``$HOME/.config``: their global keys, which
  a ``[default]`` header starts anew, over their ``[*]`` section, each section's keys in
  sorted order, a ``;`` or ``#`` starting a comment in a value; a switch there off unless
  ``on``, ``1``, ``enabled`` or ``true``, but ``swa-full`` on whatever its value; one over
  1 MiB gives :class:`Uncountable`). Its context (``-c``; 0, the
  default, is the length the model declares, or the one
  ``--override-kv ARCH.context_length=int:N`` gives it; a model declaring 0 runs only with a
  context given, and without one gives None; a negative one is a uint32 to upstream: -1 to
  -255 pad up to 0, which it refuses, -256 and below are 2^31 tokens or more, which it runs
  for a model whose memory does not grow with the context: :class:`Uncountable`), its slots
  (``-np``: 4 by default, sharing one cache; a number given splits the context into per-slot
  caches unless ``--kv-unified``) and ``--kv-unified-per-slot`` (slots × N, without ``-c``) count;
  ``-ctk`` / ``-ctv`` set the element types (``f16`` by default). The model it loads must be
  ``{model_path}`` (the last ``-m``, or ``LLAMA_ARG_MODEL``, or a configuration file's):
  another file, none, or one it downloads (``-hf``, ``-mu``, ``-dr``, a ``--*-default``
  preset) gives :class:`Uncountable`, since the header read is not the one it loads.
- the **model file's GGUF header**: ``general.architecture`` and that architecture's
  ``block_count``, ``context_length``, ``embedding_length``, ``attention.head_count``,
  ``attention.head_count_kv`` (a number, or one per layer), ``attention.key_length`` and
  ``attention.value_length`` (and their ``_swa`` variants, for the window layers); for a
  model with a recurrent state its ``ssm.conv_kernel``, ``ssm.inner_size``,
  ``ssm.state_size``, ``ssm.group_count``, ``wkv.head_size``, ``token_shift_count``,
  ``shortconv.l_cache``, ``full_attention_interval``, ``attention.recurrent_layers`` and
  ``feed_forward_length`` (see below); and the tensor infos after them, for the weights the
  CPU backend repacks (see below). Only the key-value section and the tensor infos are read,
  with every length checked against the file's size; anything malformed, or
  a file that is not GGUF, gives None (llama.cpp will not load it either; but with an
  ``--override-kv``, which may give it a key it lacks, :class:`Uncountable`). An
  ``--override-kv`` of ``general.architecture`` (llama.cpp then reads another architecture's
  keys) or of a key the cache's shape comes from (:data:`_SHAPE_KEYS`: llama.cpp sizes the
  cache from it, and checks the weights against it, not against the header) gives
  :class:`Uncountable` too. A GGUF header too
  large to walk within this module's bounds (:data:`_MAX_HEADER_BYTES`, :data:`_MAX_ELEMENTS`,
  :data:`_MAX_PAIRS`) gives :class:`Uncountable`: llama.cpp would load it, so the fit check
  refuses it rather than count nothing.

llama.cpp rounds the context up to a multiple of 256 tokens, and with per-slot caches each
slot's share too: ``-np 100 -c 1000`` allocates 100 × 256 cells, not 1,024. Without a context
(or with ``-c 0``), per-slot caches are each the declared length: ``-np 4`` alone is four
times the declared length.

**Recurrent state.** For Mamba, Mamba-2, RWKV-6/7 and the hybrids (Jamba, Falcon-H1, Granite
hybrids, Nemotron-H, Qwen3-Next and Qwen3.5, LFM2) llama.cpp also allocates at load, for every
slot (``-np``; with or without ``--kv-unified``: one cell per slot), an R and an S state for
each recurrent layer, in f32 whatever ``-ctk``/``-ctv`` say: R is the convolution state,
``(conv_kernel - 1) × (inner_size + 2 × group_count × state_size)`` (LFM2: ``embedding ×
(l_cache - 1)``), or RWKV's token shift, ``token_shift_count × embedding`` (2 unless the model
says); S the SSM state, ``state_size × inner_size``, or RWKV's WKV state, ``embedding ×
wkv.head_size`` (LFM2 has none). The recurrent layers are every layer (Mamba, RWKV, Falcon-H1,
which runs attention beside the SSM in each), those without KV heads (Jamba, Granite hybrids,
LFM2), those with neither KV heads nor a feed-forward network (Nemotron-H), or all but every
``full_attention_interval``-th (Qwen3-Next, Qwen3.5: 4 unless the model says; an
``attention.recurrent_layers`` list, one bool or number per layer, wins over it); a hybrid's KV
cache holds its other layers only (Falcon-H1's all). The estimate counts it in
:attr:`ContextMemory.bytes` and says how much of it in ``recurrent_bytes``. A state the
pinned build would allocate but this module does not size gives :class:`Uncountable`: a
model missing one of the keys above, another architecture with ``ssm.*``, ``wkv.*`` or
``shortconv.*`` keys (PLaMo-2, Kimi Linear), an ``attention.recurrent_layers`` list for
another architecture (or one that is not one entry per layer), a ``ple.conv_kernel`` state,
upstream's ``--spec-type`` (``LLAMA_ARG_SPEC_TYPE``) other than ``none`` (with speculative
decoding llama.cpp may keep a copy of the state per draft token), or an ``--override-kv`` of a
key the state is sized from (:data:`_RECURRENT_SIZING_KEYS`).

The fit check counts the estimate in RAM, with the allowance, also when the weights go to a
GPU, where llama.cpp puts the cache of offloaded layers too: it may then refuse a context that
would have fitted in VRAM, and its VRAM check does not count the cache.

**Sliding-window layers.** llama.cpp keeps the cache of a layer that attends through a sliding
window at the window's size: per stream (one with ``--kv-unified`` or upstream's automatic
slots, else one per slot), ``min(the stream's context, attention.sliding_window × the slots in
the stream + the physical batch)`` cells, padded up to 256, where the physical batch is ``-ub``
(512 by default) capped by ``-b`` (2,048) and the context. The estimate counts them so for
Gemma 3, Gemma 2 and gpt-oss (:data:`_SLIDING_WINDOW_PATTERNS`; the window layers are all
but every ``attention.sliding_window_pattern``-th, 6, 2 and 2 unless the model says, or as
its list of flags says), and for upstream's ``llama-server`` only; ``--swa-full`` (or
``LLAMA_ARG_SWA_FULL``, or ``swa-full`` in a configuration file), speculative decoding
(``--spec-type``), an ``--override-kv`` of the window or its pattern, the launcher and every
other architecture with a window (Cohere 2, Llama 4...) are counted at the full context, an
upper bound, as are models with compressed attention (MLA). A model may give its window layers'
heads lengths of their own (``attention.key_length_swa``, ``attention.value_length_swa``, read
by llama.cpp for any architecture): those layers count at them; where which layers have the
window is not known here (another architecture, the launcher, a pattern ``--override-kv``
sets), every layer counts at the larger of the two lengths.
Not counted: the compute buffers (reserved, but touched only as the context fills, where the
resource samples see them), and the prompt checkpoints llama.cpp keeps in RAM for a window
model as requests come (``--swa-checkpoints``), which the resource samples see too.

**Metadata.** llama.cpp also holds the header's values in memory while it loads the model,
beyond the file's bytes (which the fit check counts as the model's size): every string (a key,
a value, an array's element) in its GGUF context, in the text it prints of every value and in
the model's copy of the metadata; a vocabulary's tokens and merges once more in its tables and
maps; the text of every number of an array. A vocabulary of 4,190,000 six-byte tokens in a
208 MB file took the pinned build 911 MiB at its peak. The walk counts it as it goes
(:data:`_STRING_BYTES`), in :attr:`ContextMemory.metadata_bytes`, which the fit check adds to
the cache.

**Repacked weights.** llama.cpp's CPU backend repacks Q4_0, Q4_K and IQ4_NL matrices
(:data:`_REPACKED_TYPES`, on an x86 machine with AVX2, or with NEON) into a buffer of its own
after reading them through the memory map, whose pages then stay resident: a 144 MiB Q4_0
model held 311 MiB (176 MiB with ``--no-repack``). The walk reads the tensor infos after the
key-value section and counts those matrices' bytes in :attr:`ContextMemory.repacked_bytes`
(0 with upstream's ``--no-repack``, ``-nr`` or ``LLAMA_ARG_REPACK`` off; a configuration
file's ``repack`` key is not read), which the fit check adds where the weights stay in RAM.
A model without an output matrix (``output.weight``; one with an ``output_norm.weight``)
multiplies by its token embedding for the logits: llama.cpp loads that a second time for the
output layer, and repacks the copy, which counts too (a 65,536-token Q4_0 embedding, 36 MiB).
Also 0 with upstream's ``--load-mode`` (``-lm``, ``LLAMA_ARG_LOAD_MODE``) ``none``, ``mlock``
or ``dio``: it then maps nothing, reads the file into buffers of its own and the matrices it
repacks straight into the CPU backend's, so they are held once (a 360 MiB Q4_0 model: 460 MiB
resident, as with ``--no-repack``; 810 MiB with the file mapped).

The header is parsed here rather than with ``gguf.GGUFReader``: the reader builds a view for
every element of every array, which took 12.7–15.4 s for a 151,936-token vocabulary on the test
machine; the fit check runs before every start. The ``gguf`` package still names the keys, the
value types and the element sizes.

Call it on a **verified** blob only: the header is then the bytes the manifest vouched for. The
name is followed as the verifier and the runtime follow it (a symbolic link is read through).
"""

from __future__ import annotations

import functools
import os
import platform
import pwd
import re
import shlex
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final

import gguf

from companion_runtime.bind.llama_server import (
    MODULE,
    parse_launcher_arguments,
)
from companion_runtime.bind.process import LOOPBACK_HOST, ProcessError, filled_argv
from companion_runtime.bind.regular_file import NotARegularFileError, read_regular_file

__all__ = [
    "UNCOUNTABLE",
    "AttentionShape",
    "ContextMemory",
    "Uncountable",
    "estimate_context_memory",
    "launcher_refuses",
    "loads_another_model",
    "read_attention_shape",
    "unverified_weights",
]

#: llama.cpp rounds the context (and, with a cache per slot, each slot's share) up to this.
_CONTEXT_PADDING: Final = 256
#: Elements (values, array items) walked over in the whole header before giving up. A real
#: header has < 10^6: a 262,144-token vocabulary is 786,432 with its scores and types.
_MAX_ELEMENTS: Final = 1 << 22
#: Key-value pairs in the header before giving up (a real one has a few dozen), and tensors
#: (a real one has a few hundred, a few thousand with experts apart).
_MAX_PAIRS: Final = 1 << 16
#: Bytes read first, and at most, for the key-value section (a 262,144-token vocabulary with
#: its merges takes about 10 MB; the read grows four times at a step while more is needed).
_FIRST_READ: Final = 1 << 20
_MAX_HEADER_BYTES: Final = 64 << 20
#: What llama.cpp holds in memory, at its peak while it loads, for the header's values
#: (measured with the pinned build, b11434, as the growth of its peak RSS): every string (a
#: key, a value, an array's element) is a ``std::string`` in the GGUF context, in the text it
#: prints of every value, and in the model's copy of the metadata, about
#: :data:`_STRING_BYTES` and :data:`_STRING_BYTE_BYTES` per byte of it (measured: 97 bytes for
#: a 6-byte string, 236 for a 40-byte one); a vocabulary's tokens and merges are kept again,
#: in the vocabulary's tables and maps, :data:`_VOCABULARY_ENTRY_BYTES` more and as much per
#: byte (226 bytes for a 6-byte token, 515 for a 40-byte one, 151 for a 7-byte merge); a number
#: of an array is printed too, :data:`_PRINTED_COPIES` times its widest text and the separator
#: (41 bytes for a float32). The file's bytes themselves are counted as the model's size.
_STRING_BYTES: Final = 80
_STRING_BYTE_BYTES: Final = 5
_VOCABULARY_ENTRY_BYTES: Final = 112
_PRINTED_COPIES: Final = 4
#: The vocabulary's arrays llama.cpp keeps in tables of its own.
_VOCABULARY_KEYS: Final = frozenset({b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"})
#: The tensor types the CPU backend of the pinned build repacks into a buffer of its own for
#: its matrix products (``ggml_repack_get_optimal_repack_type``), when a tensor's rows come in
#: multiples of :func:`_repack_rows` (8 with AVX2; 4 with NEON). The token embedding is only
#: looked up (``get_rows``), never repacked, but for the copy of it a model without an output
#: matrix multiplies by (:data:`_OUTPUT`).
_REPACKED_TYPES: Final = frozenset(
    {
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_K,
        gguf.GGMLQuantizationType.IQ4_NL,
    }
)
_LOOKED_UP_ONLY: Final = frozenset({b"token_embd.weight"})
#: A model without an output matrix of its own (``output.weight``) but with the final norm
#: before it multiplies by its token embedding for the logits: llama.cpp loads the embedding
#: a second time for the output layer, and the CPU backend repacks that copy.
_OUTPUT: Final = b"output.weight"
_OUTPUT_NORM: Final = b"output_norm.weight"
#: The most dimensions a ggml tensor has (llama.cpp refuses a file with more).
_MAX_DIMENSIONS: Final = 4
#: Which layers attend through a sliding window: every N-th is not (a number N), or one bool
#: per layer (true: a sliding window).
_SLIDING_WINDOW_PATTERN_KEY: Final = b".attention.sliding_window_pattern"
#: An explicit list of the recurrent layers (one number or bool per layer, not 0: recurrent),
#: which Qwen3-Next and Qwen3.5 read over their ``full_attention_interval``.
_RECURRENT_LAYERS_KEY: Final = b".attention.recurrent_layers"
#: Keys of a recurrent state the pinned build sizes in ways this module does not count (a
#: list of recurrent layers where the architecture is not known to read it, a per-layer
#: embedding's convolution state, Kimi's delta attention): a model that has one gives
#: :class:`Uncountable`.
_RECURRENT_UNKNOWN_KEYS: Final = (
    _RECURRENT_LAYERS_KEY,
    b".ple.conv_kernel",
    b".kda.head_dim",
)
#: The keys whose values the walk keeps (the architecture's own end so); the rest it skips.
_WANTED: Final = (
    b"general.architecture",
    b".block_count",
    b".context_length",
    b".embedding_length",
    b".attention.head_count",
    b".attention.head_count_kv",
    b".attention.key_length",
    b".attention.value_length",
    b".feed_forward_length",
    b".ssm.conv_kernel",
    b".ssm.inner_size",
    b".ssm.state_size",
    b".ssm.group_count",
    b".wkv.head_size",
    b".token_shift_count",
    b".shortconv.l_cache",
    b".full_attention_interval",
    b".attention.sliding_window",
    _SLIDING_WINDOW_PATTERN_KEY,
    b".attention.key_length_swa",
    b".attention.value_length_swa",
    *_RECURRENT_UNKNOWN_KEYS,
)
#: The most layers llama.cpp loads: the pinned build aborts past it (``GGML_ASSERT(n_layer <=
#: LLAMA_MAX_LAYERS)``, seen for 513). A header saying more gives no estimate.
_MAX_LAYERS: Final = 512
#: Integer arrays longer than this are skipped, not decoded (no per-layer list is this long).
_MAX_DECODED_ARRAY: Final = 4096
_UPSTREAM_NAME: Final = "llama-server"
_CACHE_TYPES: Final = frozenset(
    {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
)
_DEFAULT_CACHE_TYPE: Final = "f16"
#: Upstream's slots when ``-np`` is not given (or is negative): 4, sharing one cache.
_UPSTREAM_AUTO_SLOTS: Final = 4
#: Upstream's batch sizes when ``-b`` / ``-ub`` are not given.
_UPSTREAM_BATCH: Final = 2048
#: Upstream's ``--load-mode`` values (any other stops it), and those that map the model file:
#: with the others (``none``, ``mlock``, ``dio``) it reads the file into buffers of its own,
#: the weights it repacks straight into the CPU backend's, and keeps no mapped page of it.
_LOAD_MODES: Final = frozenset({"auto", "none", "mmap", "mlock", "mmap+mlock", "dio"})
_MAPPING_LOAD_MODES: Final = frozenset({"auto", "mmap", "mmap+mlock"})
_UPSTREAM_UBATCH: Final = 512
#: Architectures whose sliding-window layers the estimate counts at llama.cpp's window cache
#: (the others at the full context, an upper bound), and their layer pattern when the model
#: gives none: every N-th layer attends to the whole context.
_SLIDING_WINDOW_PATTERNS: Final[Mapping[str, int]] = {"gemma3": 6, "gemma2": 2, "gpt-oss": 2}
#: ``std::stoi``: leading white space, a sign, decimal digits; the rest is ignored.
_STOI: Final = re.compile(r"[ \t\n\v\f\r]*([+-]?)0*([0-9]{1,20})")
_INT32: Final = range(-(1 << 31), 1 << 31)
_TRUTHY: Final = frozenset({"on", "enabled", "true", "1"})
_FALSEY: Final = frozenset({"off", "disabled", "false", "0"})

#: Upstream ``llama-server``'s options that take a value (``--help`` of the pinned build,
#: 11434); ``--control-vector-layer-range`` takes two. Any other option takes none.
_UPSTREAM_VALUE_OPTIONS: Final = frozenset(
    """
    --adaptive-decay --adaptive-target --alias --api-key --api-key-file --api-prefix
    --batch-size --cache-ram --cache-reuse --cache-type-k --cache-type-k-draft --cache-type-v
    --cache-type-v-draft --chat-template --chat-template-file --chat-template-kwargs
    --checkpoint-min-step --control-vector --control-vector-scaled --cors-headers
    --cors-methods --cors-origins --cpu-mask --cpu-mask-batch --cpu-mask-batch-draft
    --cpu-mask-draft --cpu-range --cpu-range-batch --cpu-range-draft --cpu-strict
    --cpu-strict-batch --cpu-strict-batch-draft --cpu-strict-draft --ctx-checkpoints
    --ctx-size --defrag-thold --device --device-draft --docker-repo --draft --draft-max
    --draft-min --draft-n --draft-n-min --draft-p-min --draft-p-split --dry-allowed-length
    --dry-base --dry-multiplier --dry-penalty-last-n --dry-sequence-breaker --dynatemp-exp
    --dynatemp-range --embd-normalize --fit --fit-ctx --fit-target --flash-attn
    --frequency-penalty --gpu-layers --gpu-layers-draft --grammar --grammar-file --hf-file
    --hf-repo --hf-repo-draft --hf-token --host --image-max-tokens --image-min-tokens
    --json-schema --json-schema-file --keep --kv-unified-per-slot --lazy-mode --load-mode
    --log-colors --log-file --log-prompts-dir --log-verbosity --logit-bias
    --lookup-cache-dynamic --lookup-cache-static --lora --lora-scaled --main-gpu
    --mcp-servers-config --mcp-servers-json --media-path --min-p --mirostat --mirostat-ent
    --mirostat-lr --mmproj --mmproj-device --mmproj-url --model --model-draft --model-url
    --models-dir --models-max --models-preset --mtmd-batch-max-tokens --n-cpu-ffn
    --n-cpu-moe --n-cpu-moe-draft --n-gpu-layers --n-gpu-layers-draft --n-predict --numa
    --override-kv --override-tensor --override-tensor-draft --parallel --path --poll
    --poll-batch --poll-batch-draft --poll-draft --pooling --port --predict
    --presence-penalty --prio --prio-batch --prio-batch-draft --prio-draft --reasoning
    --reasoning-budget --reasoning-budget-message --reasoning-effort --reasoning-format
    --repeat-last-n --repeat-penalty --reverse-prompt --rope-freq-base --rope-freq-scale
    --rope-scale --rope-scaling --rpc --sampler-seq --samplers --sampling-seq --seed
    --sleep-idle-seconds --slot-prompt-similarity --slot-save-path --spec-draft-cpu-mask
    --spec-draft-cpu-mask-batch --spec-draft-cpu-range --spec-draft-cpu-strict
    --spec-draft-cpu-strict-batch --spec-draft-device --spec-draft-hf --spec-draft-model
    --spec-draft-n-cpu-moe --spec-draft-n-max --spec-draft-n-min --spec-draft-ncmoe
    --spec-draft-ngl --spec-draft-override-tensor --spec-draft-p-min --spec-draft-p-split
    --spec-draft-poll --spec-draft-poll-batch --spec-draft-prio --spec-draft-prio-batch
    --spec-draft-sampling --spec-draft-threads --spec-draft-threads-batch
    --spec-draft-type-k --spec-draft-type-v --spec-ngram-map-k-min-hits
    --spec-ngram-map-k-size-m --spec-ngram-map-k-size-n --spec-ngram-map-k4v-min-hits
    --spec-ngram-map-k4v-size-m --spec-ngram-map-k4v-size-n --spec-ngram-min-hits
    --spec-ngram-mod-n-match --spec-ngram-mod-n-max --spec-ngram-mod-n-min
    --spec-ngram-simple-min-hits --spec-ngram-simple-size-m --spec-ngram-simple-size-n
    --spec-ngram-size-m --spec-ngram-size-n --spec-synth-len --spec-synth-rates --spec-type
    --split-mode --sse-ping-interval --ssl-cert-file --ssl-key-file --swa-checkpoints --tags
    --temp --temperature --tensor-split --threads --threads-batch --threads-batch-draft
    --threads-draft --threads-http --timeout --tools --tools-runtime --top-k --top-n-sigma
    --top-nsigma --top-p --typical --typical-p --ubatch-size --ui-config --ui-config-file
    --verbosity --video-ffmpeg-dir --video-fps --video-timestamp-interval --webui-config
    --webui-config-file --xtc-probability --xtc-threshold --yarn-attn-factor
    --yarn-beta-fast --yarn-beta-slow --yarn-ext-factor --yarn-orig-ctx
    -C -Cb -Cbd -Cd -Cr -Crb -Crd -a -b -c -cms -cram -ctk -ctkd -ctv -ctvd -ctxcp -dev -devd
    -dr -dt -fa -fit -fitc -fitt -hf -hfd -hff -hfr -hfrd -hft -j -jf -l -lcd -lcs -lm -lv
    -lzm -m -md -mg -mm -mmdev -mmu -mu -n -ncffn -ncmoe -ncmoed -ngl -ngld -np -ot -otd -r
    -rea -s -sm -sps -t -tb -tbd -td -to -ts -ub
    """.split()
)
_UPSTREAM_TWO_VALUE_OPTIONS: Final = frozenset({"--control-vector-layer-range"})
#: What upstream reads that the estimate needs: option → setting, and its variable.
_UPSTREAM_SETTINGS: Final[Mapping[str, str]] = {
    "-c": "context",
    "--ctx-size": "context",
    "-ctk": "cache_k",
    "--cache-type-k": "cache_k",
    "-ctv": "cache_v",
    "--cache-type-v": "cache_v",
    "-np": "slots",
    "--parallel": "slots",
    "--kv-unified-per-slot": "per_slot",
    "--override-kv": "override",
    "-m": "model",
    "--model": "model",
    "-fitc": "fit_ctx",
    "--fit-ctx": "fit_ctx",
    "--spec-type": "spec_type",
    "-b": "batch",
    "--batch-size": "batch",
    "-ub": "ubatch",
    "--ubatch-size": "ubatch",
    "-lm": "load_mode",
    "--load-mode": "load_mode",
}
_UPSTREAM_UNIFIED: Final[Mapping[str, bool]] = {
    "-kvu": True,
    "--kv-unified": True,
    "-no-kvu": False,
    "--no-kv-unified": False,
}
_UPSTREAM_VARIABLES: Final[Mapping[str, str]] = {
    "LLAMA_ARG_CTX_SIZE": "context",
    "LLAMA_ARG_CACHE_TYPE_K": "cache_k",
    "LLAMA_ARG_CACHE_TYPE_V": "cache_v",
    "LLAMA_ARG_N_PARALLEL": "slots",
    "LLAMA_ARG_KV_UNIFIED_PER_SLOT": "per_slot",
    "LLAMA_ARG_MODEL": "model",
    "LLAMA_ARG_FIT_CTX": "fit_ctx",
    "LLAMA_ARG_SPEC_TYPE": "spec_type",
    "LLAMA_ARG_BATCH": "batch",
    "LLAMA_ARG_UBATCH": "ubatch",
    "LLAMA_ARG_LOAD_MODE": "load_mode",
}
#: The keys of a llama.cpp configuration file that the estimate reads: an option's names
#: without their dashes, and its variable. ``no-`` names set the opposite.
_CONFIG_KEYS: Final[Mapping[str, str]] = {
    **{option.lstrip("-"): setting for option, setting in _UPSTREAM_SETTINGS.items()},
    **_UPSTREAM_VARIABLES,
}
_CONFIG_UNIFIED: Final[Mapping[str, bool]] = {
    **{option.lstrip("-"): value for option, value in _UPSTREAM_UNIFIED.items()},
    "LLAMA_ARG_KV_UNIFIED": True,
}
#: A comment in a configuration file's value: from a ``;`` or a ``#`` on.
_COMMENT: Final = re.compile("[;#]")
#: ``--swa-full`` in a configuration file, by its name or its variable: on whatever its value.
_CONFIG_SWA_FULL: Final = frozenset({"swa-full", "LLAMA_ARG_SWA_FULL"})
#: Upstream reads this file first, then the user's (``$XDG_CONFIG_HOME/llama.cpp/config.ini``,
#: else ``$HOME/.config/llama.cpp/config.ini``), then its environment, then its flags.
_SYSTEM_CONFIG: Final = Path("/etc/llama.cpp/config.ini")
_USER_CONFIG: Final = Path("llama.cpp", "config.ini")
#: A configuration file larger than this is not read: the fit check refuses.
_MAX_CONFIG_BYTES: Final = 1 << 20
#: The launcher's module attached to Python's ``-m`` (and the flags before it).
_ATTACHED_MODULE: Final = re.compile("-[A-Za-z]*m" + re.escape(MODULE))
#: Python's ``-m`` (and the flags before it) when the module is the next word.
_MODULE_OPTION: Final = re.compile("-[A-Za-z]*m")
#: What ``{model_path}`` stands for while a command is read: the model it loads must be it.
_MODEL_SENTINEL: Final = "\x01model_path\x01"
#: Upstream options (and variables) that have it load weights other than ``-m``'s file,
#: whatever ``-m`` says: a model it downloads (``-hf``, ``-mu``, a ``--*-default`` preset), a
#: draft model, a multimodal projector, LoRA adapters, control vectors, a router's models.
_UPSTREAM_OTHER_WEIGHTS: Final = frozenset(
    """
    -hf -hfr --hf-repo -mu --model-url -dr --docker-repo --embd-gemma-default
    --fim-qwen-1.5b-default --fim-qwen-3b-default --fim-qwen-7b-default --fim-qwen-7b-spec
    --fim-qwen-14b-spec --fim-qwen-30b-default --gpt-oss-20b-default --gpt-oss-120b-default
    --vision-gemma-4b-default --vision-gemma-12b-default
    -md --model-draft --spec-draft-model -hfd -hfrd --hf-repo-draft --spec-draft-hf
    -mm --mmproj -mmu --mmproj-url --lora --lora-scaled --control-vector
    --control-vector-scaled --models-dir --models-preset
    LLAMA_ARG_HF_REPO LLAMA_ARG_MODEL_URL LLAMA_ARG_DOCKER_REPO LLAMA_ARG_SPEC_DRAFT_MODEL
    LLAMA_ARG_SPEC_DRAFT_HF_REPO LLAMA_ARG_MMPROJ LLAMA_ARG_MMPROJ_URL LLAMA_ARG_MODELS_DIR
    LLAMA_ARG_MODELS_PRESET
    """.split()
)
#: GNU env's long options, and those of them that take a value.
_ENV_LONG_OPTIONS: Final = (
    "--argv0",
    "--ignore-environment",
    "--null",
    "--unset",
    "--chdir",
    "--split-string",
    "--block-signal",
    "--default-signal",
    "--ignore-signal",
    "--list-signal-handling",
    "--debug",
    "--help",
    "--version",
)
_ENV_VALUE_OPTIONS: Final = frozenset({"--argv0", "--unset", "--chdir", "--split-string"})
#: Values for the launcher's placeholders while its arguments are parsed (the supervisor's
#: own, but for the port and the paths, which the parse does not look into).
_PLACEHOLDER_VALUES: Final[Mapping[str, str]] = {
    "host": LOOPBACK_HOST,
    "port": "1",
    "model_path": _MODEL_SENTINEL,
    "api_key_file": "key",
}

#: Architectures the pinned llama.cpp gives a recurrent state, by how it finds the layers that
#: have one: every layer; those without KV heads; those without KV heads or a feed-forward
#: network (Nemotron-H's Mamba layers); all but every ``full_attention_interval``-th.
_RECURRENT_EVERY_LAYER: Final = frozenset(
    {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "falcon-h1"}
)
_HYBRID_BY_KV_HEADS: Final = frozenset({"jamba", "granitehybrid", "lfm2", "lfm2moe"})
_HYBRID_BY_KV_HEADS_AND_FF: Final = frozenset({"nemotron_h", "nemotron_h_moe"})
_HYBRID_BY_INTERVAL: Final = frozenset({"qwen3next", "qwen35", "qwen35moe"})
_RECURRENT_ARCHITECTURES: Final = (
    _RECURRENT_EVERY_LAYER | _HYBRID_BY_KV_HEADS | _HYBRID_BY_KV_HEADS_AND_FF | _HYBRID_BY_INTERVAL
)
#: Whose state is RWKV's (token shift and WKV), or LFM2's short convolution; the rest Mamba's.
_RWKV_ARCHITECTURES: Final = frozenset({"rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
_SHORTCONV_ARCHITECTURES: Final = frozenset({"lfm2", "lfm2moe"})
#: Falcon-H1 runs attention and an SSM side by side in every layer: its KV cache has them all.
_ATTENTION_IN_EVERY_LAYER: Final = frozenset({"falcon-h1"})
#: Keys that give a model a recurrent state whatever its architecture is called.
_RECURRENT_KEYS: Final = (
    b".ssm.conv_kernel",
    b".ssm.inner_size",
    b".ssm.state_size",
    b".wkv.head_size",
    b".shortconv.l_cache",
    *_RECURRENT_UNKNOWN_KEYS,
)
#: The keys (after ``ARCH.``) a recurrent state's size or layers come from: an
#: ``--override-kv`` of one gives :class:`Uncountable`.
_RECURRENT_SIZING_KEYS: Final = frozenset(
    {
        "ssm.conv_kernel",
        "ssm.inner_size",
        "ssm.state_size",
        "ssm.group_count",
        "wkv.head_size",
        "token_shift_count",
        "shortconv.l_cache",
        "full_attention_interval",
        "attention.recurrent_layers",
        "attention.head_count_kv",
        "feed_forward_length",
        "block_count",
        "embedding_length",
    }
)
#: The keys (after ``ARCH.``) the KV cache's shape comes from: with an ``--override-kv`` of one,
#: or of ``general.architecture`` (llama.cpp then reads another architecture's keys), the cache
#: is not the header's, and the estimate gives :class:`Uncountable`.
_SHAPE_KEYS: Final = frozenset(
    {
        "block_count",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.key_length_swa",
        "attention.value_length_swa",
    }
)
#: The keys a sliding window's cache comes from: with an ``--override-kv`` of one, the window
#: layers are counted at the full context.
_SLIDING_WINDOW_KEYS: Final = frozenset(
    {"attention.sliding_window", "attention.sliding_window_pattern"}
)
#: Bytes of a recurrent state's element: llama.cpp keeps it in f32 (``-ctk``/``-ctv`` are
#: for the KV cache only).
_RECURRENT_ELEMENT_BYTES: Final = 4
#: Upstream's speculative decoding types that need no copies of the recurrent state.
_PLAIN_SPEC_TYPES: Final = frozenset({"", "none"})

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

#: The widest text ``std::ostream`` gives a number of each type, and ", " after it.
_PRINTED_WIDTHS: Final[Mapping[int, int]] = {
    _V.UINT8: 3 + 2,
    _V.INT8: 4 + 2,
    _V.BOOL: 5 + 2,
    _V.UINT16: 5 + 2,
    _V.INT16: 6 + 2,
    _V.UINT32: 10 + 2,
    _V.INT32: 11 + 2,
    _V.FLOAT32: 13 + 2,
    _V.UINT64: 20 + 2,
    _V.INT64: 20 + 2,
    _V.FLOAT64: 13 + 2,
}

#: An array of flags (``attention.recurrent_layers``) may be bools as well as integers.
_FLAG_FORMATS: Final[Mapping[int, str]] = {**_INTEGER_FORMATS, _V.BOOL: "?"}


class _Malformed(Exception):
    """The header is not what the format says (llama.cpp refuses it too); no estimate."""


class _TooLarge(Exception):
    """A well-formed header past this module's bounds: llama.cpp would load it."""


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
    #: ``general.architecture``: the prefix of the keys above (for ``--override-kv``).
    architecture: str = "llama"
    #: Layers with a recurrent state (Mamba, RWKV, the recurrent layers of a hybrid).
    recurrent_layers: int = 0
    #: Elements of one layer's "R" (convolution or token-shift) state for one sequence.
    recurrent_r: int = 0
    #: Elements of one layer's "S" (SSM or WKV) state for one sequence.
    recurrent_s: int = 0
    #: ``attention.sliding_window``, and which layers attend through it (one flag per layer;
    #: empty where the estimate counts every layer at the full context).
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    #: ``attention.key_length_swa`` and ``value_length_swa``: the heads of the layers that
    #: attend through a window, where the model gives them a length of their own (0: none).
    swa_key_length: int = 0
    swa_value_length: int = 0
    #: What llama.cpp holds in memory for the header's values as it loads the model (its
    #: vocabulary above all), beyond the file's own bytes: not part of the shape.
    metadata_bytes: int = field(default=0, compare=False)
    #: The weights the CPU backend repacks into a buffer of its own (:data:`_REPACKED_TYPES`).
    repacked_bytes: int = field(default=0, compare=False)


@final
@dataclass(frozen=True, slots=True)
class ContextMemory:
    """What a runtime will allocate for its context: the context in tokens, and the bytes of
    its KV cache and recurrent state together (``recurrent_bytes`` of them the latter); and,
    apart, what it holds for the model's metadata as it loads it (``metadata_bytes``: its
    vocabulary's tables, the header's values as text), beyond the file's own bytes."""

    context_tokens: int
    bytes: int
    recurrent_bytes: int = 0
    #: An allowance measured, not a figure llama.cpp logs: left out of comparisons.
    metadata_bytes: int = field(default=0, compare=False)
    #: The weights the CPU backend repacks beside the mapped file, whose pages it read them
    #: from stay resident too (0 with ``--no-repack``, and with a ``--load-mode`` that maps
    #: nothing, which reads them into the repacked buffer alone): for a runtime that keeps its
    #: weights in RAM, a copy beside the model's bytes.
    repacked_bytes: int = field(default=0, compare=False)


@final
@dataclass(frozen=True, slots=True)
class Uncountable:
    """A llama.cpp runtime whose KV cache cannot be counted, where llama.cpp would still run:
    the fit check refuses rather than count nothing. ``what`` says why, without a path."""

    what: str


#: The model file's GGUF header is past the walk's bounds.
UNCOUNTABLE: Final = Uncountable("its GGUF header is too large for the fit check to read")
#: ``--override-kv`` sets what the KV cache's shape comes from, not the header.
_SHAPE_OVERRIDDEN: Final = Uncountable(
    "its KV cache cannot be counted with --override-kv of its shape"
)
_NEGATIVE_CONTEXT: Final = Uncountable(
    "its context cannot be counted: llama.cpp takes a negative -c for 2^31 tokens or more"
)
_CONFIG_TOO_LARGE: Final = Uncountable(
    "llama.cpp's configuration file is too large for the fit check to read"
)
_CONFIG_NOT_A_FILE: Final = Uncountable(
    "llama.cpp's configuration file is no regular file the fit check can read (a FIFO, a "
    "device): what llama.cpp would read from it cannot be known"
)


class _UncountableState(Exception):
    """A model whose recurrent state llama.cpp would allocate in a way this module does not
    count (or from keys it does not find): the fit check refuses rather than count nothing."""


def _unverified(what: str) -> Uncountable:
    """The command has llama.cpp load weights other than the verified blob (``what`` names
    the option, variable or key, never its value): what the fit check read is not all the
    runtime loads, and bytes nobody verified would run."""
    return Uncountable(f"the runtime command loads weights the manifest does not verify ({what})")


class _Header:
    """Sequential reads from a GGUF header held in memory, every length checked."""

    __slots__ = ("_data", "_end", "_file_size", "_order", "elements", "loaded", "position")

    def __init__(self, data: bytes, order: str, file_size: int) -> None:
        self._data = data
        self._end = len(data)
        self._file_size = file_size
        self._order = order
        self.position = 0
        self.elements = 0
        #: What llama.cpp holds in memory for the values walked so far (:data:`_STRING_BYTES`).
        self.loaded = 0

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
        self.loaded += _STRING_BYTES + _STRING_BYTE_BYTES * length
        return bytes(self._data[start : start + length])

    def _skip_strings(self, count: int, *, vocabulary: bool) -> None:
        # Each string takes 8 bytes at least: more than the file holds is malformed, checked
        # before the count is (so a corrupted count is no estimate, not a refusal).
        if self.position + 8 * count > self._file_size:
            raise _Malformed
        self.count(count)
        # A vocabulary is 10^5 strings: one tight loop, not a method call per string.
        data, end, position = self._data, self._end, self.position
        unpack = struct.Struct(self._order + "Q").unpack_from
        for _ in range(count):
            if position + 8 > end:
                self._past_end(position + 8)
            position += 8 + unpack(data, position)[0]
        if position > end:
            self._past_end(position)
        text = position - self.position - 8 * count
        self.loaded += count * _STRING_BYTES + text * _STRING_BYTE_BYTES
        if vocabulary:
            self.loaded += count * _VOCABULARY_ENTRY_BYTES + text * _STRING_BYTE_BYTES
        self.position = position

    def count(self, amount: int) -> None:
        self.elements += amount
        if self.elements > _MAX_ELEMENTS:
            raise _TooLarge

    def value(
        self, value_type: int, *, keep: bool, flags: bool = False, vocabulary: bool = False
    ) -> int | tuple[int, ...] | bytes | None:
        """Read one value: an int, a tuple of ints, a string; None for anything else, and for
        everything when not ``keep`` (skipped, lengths checked, nothing copied). With
        ``flags``, an array of bools is kept too, as a tuple of 0 and 1. What llama.cpp holds
        for it goes to :attr:`loaded` (more for an array of its ``vocabulary``)."""
        self.count(1)
        if value_type in _SCALAR_SIZES:
            start = self.take(_SCALAR_SIZES[value_type])
            if not keep or value_type not in _INTEGER_FORMATS:
                return None
            code = self._order + _INTEGER_FORMATS[value_type]
            number: int = struct.unpack_from(code, self._data, start)[0]
            return number
        if value_type == _V.STRING:
            length = self.integer("Q")
            start = self.take(length)
            self.loaded += _STRING_BYTES + _STRING_BYTE_BYTES * length
            return bytes(self._data[start : start + length]) if keep else None
        if value_type != _V.ARRAY:
            raise _Malformed  # an unknown type
        item_type = self.integer("I")
        length = self.integer("Q")
        if item_type in _SCALAR_SIZES:
            size = _SCALAR_SIZES[item_type]
            start = self.take(size * length)
            self.count(length)
            self.loaded += length * (_PRINTED_COPIES * _PRINTED_WIDTHS[item_type] + size)
            formats = _FLAG_FORMATS if flags else _INTEGER_FORMATS
            if not keep or item_type not in formats or length > _MAX_DECODED_ARRAY:
                return None  # a vocabulary's scores, its token types
            code = f"{self._order}{length}{formats[item_type]}"
            return tuple(int(item) for item in struct.unpack_from(code, self._data, start))
        if item_type == _V.STRING:
            self._skip_strings(length, vocabulary=vocabulary)
            return None
        raise _Malformed  # an array of arrays (or of an unknown type): ggml refuses both


def _read_metadata(
    data: bytes, file_size: int
) -> tuple[dict[str, int | tuple[int, ...] | bytes], int, int]:
    """The header's integer, integer-array and string values by key (others are skipped), and
    what llama.cpp holds in memory for all of its values as it loads them (``_Header.loaded``).

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
    tensors = header.integer("Q")
    pairs = header.integer("Q")
    if pairs > file_size // 13:  # a pair takes 13 bytes at least: an 8-byte length, 1, type
        raise _Malformed
    if pairs > _MAX_PAIRS:
        raise _TooLarge
    found: dict[str, int | tuple[int, ...] | bytes] = {}
    keys: set[bytes] = set()
    for _ in range(pairs):
        key = header.string()
        if key in keys:  # llama.cpp refuses such a file; which value counts is anyone's guess
            raise _Malformed
        keys.add(key)
        value = header.value(
            header.integer("I"),
            keep=key.endswith(_WANTED),
            flags=key.endswith((_RECURRENT_LAYERS_KEY, _SLIDING_WINDOW_PATTERN_KEY)),
            vocabulary=key in _VOCABULARY_KEYS,
        )
        if value is None and key.endswith(_RECURRENT_UNKNOWN_KEYS):
            value = b""  # only its presence counts, whatever its type
        if value is not None:
            found[key.decode("utf-8", "replace")] = value
    return found, header.loaded, _repacked_bytes(header, tensors, file_size)


def _repacked_bytes(header: _Header, tensors: int, file_size: int) -> int:
    """The bytes of the tensors (their infos follow the key-value section) that the CPU
    backend repacks into a buffer of its own, beside the memory-mapped file whose pages it
    read them from (:data:`_REPACKED_TYPES`)."""
    if (
        tensors > file_size // 24
    ):  # an info takes 24 bytes at least: name length, n_dims, type, offset
        raise _Malformed
    if tensors > _MAX_PAIRS:
        raise _TooLarge
    rows = _repack_rows()
    repacked = 0
    names: set[bytes] = set()
    tied = 0  # the token embedding's bytes, were it repacked as the output matrix
    for _ in range(tensors):
        name = header.string()
        names.add(name)
        dimensions = header.integer("I")
        if dimensions > _MAX_DIMENSIONS:
            raise _Malformed
        shape = [header.integer("Q") for _ in range(dimensions)]
        tensor_type = header.integer("I")
        header.integer("Q")  # offset
        if rows and tensor_type in _REPACKED_TYPES and dimensions >= 2 and shape[1] % rows == 0:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
            elements = 1
            for extent in shape:
                elements *= extent
            if name in _LOOKED_UP_ONLY:
                tied = elements // block * type_size
            else:
                repacked += elements // block * type_size
    if _OUTPUT not in names and _OUTPUT_NORM in names:
        repacked += tied  # the embedding, loaded again as the output matrix, is repacked
    return repacked


@functools.cache
def _repack_rows() -> int:
    """What a tensor's rows must be a multiple of for the CPU backend to repack it here: 8 on
    an x86 machine with AVX2 (or where its flags cannot be read), 0 (nothing is repacked) on
    one without; 4 elsewhere (NEON), which also covers 8."""
    machine = platform.machine().lower()
    if machine not in {"x86_64", "amd64", "i386", "i686"}:
        return 4
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            # The first processor's flags: a line at a time, not the whole file in memory.
            for line in handle:
                if line.startswith(b"flags"):
                    return 8 if b"avx2" in line.split() else 0
    except OSError:
        pass
    return 8  # not known here: counted


def _positive(value: object, *, zero: bool = False) -> int:
    """``value``, a positive number (or 0, with ``zero``); :class:`_Malformed` otherwise."""
    if type(value) is not int or value < 0 or (value == 0 and not zero):
        raise _Malformed
    return value


def _positive_or_zero(value: object) -> int:
    """``value`` if it is a positive number, else 0."""
    return value if type(value) is int and value > 0 else 0


def _attention_shape(
    metadata: Mapping[str, int | tuple[int, ...] | bytes],
    metadata_bytes: int = 0,
    repacked_bytes: int = 0,
) -> AttentionShape:
    architecture = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(architecture, bytes) or not architecture:
        raise _Malformed
    arch = architecture.decode("utf-8", "replace")

    def get(template: str) -> int | tuple[int, ...] | bytes | None:
        return metadata.get(template.format(arch=arch))

    layers = _positive(get(gguf.Keys.LLM.BLOCK_COUNT))
    if layers > _MAX_LAYERS:
        raise _Malformed  # llama.cpp aborts on it; and a tuple per layer must stay small
    # 0 is a model that declares no context: llama.cpp runs it at the one the command gives.
    context_length = _positive(get(gguf.Keys.LLM.CONTEXT_LENGTH), zero=True)
    embedding = _positive(get(gguf.Keys.LLM.EMBEDDING_LENGTH))
    recurrent = _has_recurrent_state(metadata, arch)
    heads = get(gguf.Keys.Attention.HEAD_COUNT)
    if heads is None and recurrent:
        heads = 0  # a recurrent model without attention need not say so
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
    kv_counts = per_layer(kv_heads)
    first_heads = next((count for count in head_counts if count > 0), 0)
    if first_heads == 0 and not recurrent:
        raise _Malformed  # no attention at all: nothing this estimate knows how to size
    key_length = get(gguf.Keys.Attention.KEY_LENGTH)
    value_length = get(gguf.Keys.Attention.VALUE_LENGTH)
    recurrent_layers: tuple[bool, ...] = (False,) * layers
    r_elements = s_elements = 0
    if recurrent:
        recurrent_layers, r_elements, s_elements = _recurrent_state(
            get, arch, layers, embedding, kv_counts
        )
        if arch not in _ATTENTION_IN_EVERY_LAYER:
            # A hybrid's KV cache holds its attention layers only.
            kv_counts = tuple(
                0 if is_recurrent else count
                for count, is_recurrent in zip(kv_counts, recurrent_layers, strict=True)
            )
    window, swa_layers = _sliding_window(get, arch, layers)
    # The window layers' heads, where the model sizes them apart (llama.cpp reads these for
    # any architecture); a value it would not load is left to the other lengths.
    swa_key_length = get("{arch}.attention.key_length_swa")
    swa_value_length = get("{arch}.attention.value_length_swa")
    if first_heads == 0:
        return AttentionShape(
            context_length=context_length,
            kv_heads=(0,) * layers,
            key_length=0,
            value_length=0,
            architecture=arch,
            recurrent_layers=sum(recurrent_layers),
            recurrent_r=r_elements,
            recurrent_s=s_elements,
            metadata_bytes=metadata_bytes,
            repacked_bytes=repacked_bytes,
        )
    return AttentionShape(
        context_length=context_length,
        kv_heads=kv_counts,
        key_length=embedding // first_heads if key_length is None else _positive(key_length),
        value_length=embedding // first_heads if value_length is None else _positive(value_length),
        architecture=arch,
        recurrent_layers=sum(recurrent_layers),
        recurrent_r=r_elements,
        recurrent_s=s_elements,
        sliding_window=window,
        swa_layers=swa_layers,
        swa_key_length=_positive_or_zero(swa_key_length),
        swa_value_length=_positive_or_zero(swa_value_length),
        metadata_bytes=metadata_bytes,
        repacked_bytes=repacked_bytes,
    )


def _sliding_window(
    get: Callable[[str], int | tuple[int, ...] | bytes | None], arch: str, layers: int
) -> tuple[int, tuple[bool, ...]]:
    """The sliding window and the layers that attend through it, for an architecture whose
    window cache the estimate sizes (:data:`_SLIDING_WINDOW_PATTERNS`); ``(0, ())`` for any
    other, or where the model's keys are not what llama.cpp reads (every layer is then
    counted at the full context, an upper bound)."""
    default = _SLIDING_WINDOW_PATTERNS.get(arch)
    window = get(gguf.Keys.Attention.SLIDING_WINDOW)
    if default is None or type(window) is not int or window <= 0:
        return 0, ()
    pattern = get("{arch}" + _SLIDING_WINDOW_PATTERN_KEY.decode())
    if pattern is None:
        pattern = default
    if type(pattern) is int:
        # Every pattern-th layer (the last of each group) attends to the whole context.
        flags = tuple(pattern == 0 or layer % pattern < pattern - 1 for layer in range(layers))
    elif isinstance(pattern, tuple) and len(pattern) == layers:
        flags = tuple(flag != 0 for flag in pattern)
    else:
        return 0, ()
    return (window, flags) if any(flags) else (0, ())


def _has_recurrent_state(metadata: Mapping[str, object], arch: str) -> bool:
    """Whether llama.cpp gives the model a recurrent state: an architecture it runs as
    recurrent or hybrid, or keys of one (``ssm.*``, ``wkv.*``, ``shortconv.*``...)."""
    if arch in _RECURRENT_ARCHITECTURES:
        return True
    prefix = arch + "."
    return any(
        key.startswith(prefix) and key.encode().endswith(_RECURRENT_KEYS) for key in metadata
    )


def _recurrent_state(
    get: Callable[[str], int | tuple[int, ...] | bytes | None],
    arch: str,
    layers: int,
    embedding: int,
    kv_heads: tuple[int, ...],
) -> tuple[tuple[bool, ...], int, int]:
    """Which layers have a recurrent state, and the elements (f32) of one layer's R and S
    state for one sequence, as the pinned llama.cpp sizes them.

    R is the convolution state (Mamba: ``(conv_kernel - 1) × (inner_size + 2 × group_count ×
    state_size)``; LFM2: ``embedding × (l_cache - 1)``) or RWKV's token shift
    (``token_shift_count × embedding``); S the SSM state (``state_size × inner_size``) or
    RWKV's WKV state (``embedding × wkv.head_size``). :class:`_UncountableState` for a
    model it sizes otherwise, or whose keys are not all there."""
    explicit = get("{arch}" + _RECURRENT_LAYERS_KEY.decode())
    for key in _RECURRENT_UNKNOWN_KEYS:
        if key == _RECURRENT_LAYERS_KEY and arch in _HYBRID_BY_INTERVAL:
            continue
        if get("{arch}" + key.decode()) is not None:
            raise _UncountableState(key.decode().lstrip(".") + " in its header")
    if arch not in _RECURRENT_ARCHITECTURES:
        raise _UncountableState("an architecture it does not know")

    def number(template: str, default: int | None = None) -> int:
        value = get(template)
        if value is None and default is not None:
            return default
        if type(value) is not int or value < 0:
            raise _UncountableState(template.removeprefix("{arch}.") + " missing or not a number")
        return value

    if arch in _RWKV_ARCHITECTURES:
        head_size = number(gguf.Keys.WKV.HEAD_SIZE)
        shifts = number(gguf.Keys.LLM.TOKEN_SHIFT_COUNT, default=2)
        r_elements, s_elements = shifts * embedding, embedding * head_size
    elif arch in _SHORTCONV_ARCHITECTURES:
        cache = number(gguf.Keys.ShortConv.L_CACHE)
        r_elements, s_elements = embedding * max(cache - 1, 0), 0
    else:
        kernel = number(gguf.Keys.SSM.CONV_KERNEL)
        inner = number(gguf.Keys.SSM.INNER_SIZE)
        state = number(gguf.Keys.SSM.STATE_SIZE)
        groups = number(gguf.Keys.SSM.GROUP_COUNT, default=0)
        r_elements = max(kernel - 1, 0) * (inner + 2 * groups * state)
        s_elements = state * inner
    if arch in _HYBRID_BY_KV_HEADS:
        recurrent = tuple(count == 0 for count in kv_heads)
    elif arch in _HYBRID_BY_KV_HEADS_AND_FF:
        # A layer with neither attention nor a feed-forward network is a Mamba layer.
        feed_forward = get(gguf.Keys.LLM.FEED_FORWARD_LENGTH)
        if type(feed_forward) is int:
            feed_forward = (feed_forward,) * layers
        if not isinstance(feed_forward, tuple) or len(feed_forward) != layers:
            raise _UncountableState("feed_forward_length missing or not one per layer")
        recurrent = tuple(
            count == 0 and width == 0 for count, width in zip(kv_heads, feed_forward, strict=True)
        )
    elif arch in _HYBRID_BY_INTERVAL and explicit is not None:
        if not isinstance(explicit, tuple) or len(explicit) != layers:
            raise _UncountableState("attention.recurrent_layers not one per layer")
        recurrent = tuple(value != 0 for value in explicit)
    elif arch in _HYBRID_BY_INTERVAL:
        interval = number(gguf.Keys.LLM.FULL_ATTENTION_INTERVAL, default=4)
        if interval == 0:
            raise _UncountableState("full_attention_interval 0")
        recurrent = tuple((layer + 1) % interval != 0 for layer in range(layers))
    else:  # every layer: Mamba, RWKV, Falcon-H1 (attention and SSM side by side)
        recurrent = (True,) * layers
    return recurrent, r_elements, s_elements


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


def read_attention_shape(path: Path) -> AttentionShape | Uncountable | None:
    """The model file's attention shape; None if it is not a GGUF model this can read (nor
    llama.cpp load); :data:`UNCOUNTABLE` for a GGUF header past this module's bounds.

    The header is read with ``pread`` into memory, :data:`_FIRST_READ` bytes first and four
    times as many while the key-value section goes on, up to :data:`_MAX_HEADER_BYTES`. Not a
    memory map: a file truncated under a map turns the next read into ``SIGBUS``, which would
    end the whole manager. A symbolic link is followed, as the verifier and the runtime do.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
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
                return _attention_shape(*_read_metadata(data, size))
            except _UncountableState as error:
                return Uncountable(f"its recurrent state cannot be counted ({error.args[0]})")
            except _NeedMore:
                if want >= min(size, _MAX_HEADER_BYTES):
                    return UNCOUNTABLE  # the key-value section goes on past the bound
                want = min(size, want * 4, _MAX_HEADER_BYTES)
    except _TooLarge:
        return UNCOUNTABLE
    except (OSError, _Malformed, struct.error):
        return None
    finally:
        os.close(descriptor)


def _cache_bytes(elements: int, cache_type: str) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache_type.upper()]]
    return -(-elements // block) * type_size


def _pad(tokens: int) -> int:
    return -(-tokens // _CONTEXT_PADDING) * _CONTEXT_PADDING


@dataclass(slots=True)
class _Settings:
    #: Tokens; 0: the length the model declares.
    context: int = 0
    cache_k: str = _DEFAULT_CACHE_TYPE
    cache_v: str = _DEFAULT_CACHE_TYPE
    #: Slots; negative: upstream's automatic choice.
    slots: int = -1
    #: One cache for all slots (else one per slot, each a share of the context).
    unified: bool = False
    #: Upstream's ``--kv-unified-per-slot``: the context is slots × this, without ``-c``.
    per_slot: int = 0
    #: The context is pinned: ``-c 0`` given (not merely left out) sets upstream's minimum
    #: context for ``--fit`` to UINT32_MAX, as ``-fitc -1`` does, and a later ``-fitc N``
    #: undoes it; pinned, ``--kv-unified-per-slot`` counts for nothing.
    pinned: bool = False
    #: ``--override-kv`` values, in order.
    overrides: tuple[str, ...] = ()
    #: Upstream's ``--spec-type``: the kinds of speculative decoding, comma-separated.
    spec_type: str = "none"
    #: Upstream's ``-b`` and ``-ub``: the logical and physical batch sizes.
    batch: int = _UPSTREAM_BATCH
    ubatch: int = _UPSTREAM_UBATCH
    #: Upstream's ``--swa-full``: sliding-window layers get a cache of the full context.
    swa_full: bool = False
    #: Whether the CPU backend repacks weights (upstream's ``--repack``, on by default; the
    #: launcher has no switch for it).
    repack: bool = True
    #: Upstream's ``--load-mode`` (``auto``, the default, maps the file on a CPU).
    load_mode: str = "auto"
    #: Whether the runtime is upstream's ``llama-server``, whose sliding-window cache this
    #: module sizes (the launcher's is counted at the full context).
    upstream: bool = False
    #: The model file it loads (None: none given).
    model: str | None = None
    #: The first option, variable or configuration key that loads other weights (``-hf``,
    #: ``--mmproj``...; :data:`_UPSTREAM_OTHER_WEIGHTS`), by its name.
    other_weights: str | None = None

    def unverified(self) -> str | None:
        """What has the runtime load weights other than the verified blob, by name."""
        if self.other_weights is not None:
            return self.other_weights
        if self.model is None:
            return "no -m"
        if self.model != _MODEL_SENTINEL:
            return "another -m"
        return None


def _number(text: str) -> int | None:
    """The leading integer of ``text`` as the C library reads it (blanks, a sign, decimal
    digits; what follows is ignored), or None without one. Past 20 digits it is past any
    ``long`` too: 10^20 stands for them all (and Python's int() of a long string raises)."""
    found = _STOI.match(text)
    if found is None:
        return None
    sign, digits = found.groups()
    rest = text[found.end() :]
    value = 10**20 if rest[:1].isdigit() and rest[:1].isascii() else int(digits, 10)
    return -value if sign == "-" else value


def _stoi(text: str) -> int | None:
    """What ``std::stoi`` makes of ``text``; None where it throws."""
    value = _number(text)
    return value if value is not None and value in _INT32 else None


def _apply_upstream(settings: _Settings, setting: str, value: str) -> bool:
    """Set what upstream makes of ``value``; False where it refuses it (and exits)."""
    if setting in ("cache_k", "cache_v"):
        if value not in _CACHE_TYPES:
            return False
        setattr(settings, setting, value)
        return True
    if setting == "override":
        settings.overrides = (*settings.overrides, value)
        return True
    if setting in ("model", "spec_type"):
        setattr(settings, setting, value)
        return True
    if setting == "load_mode":
        if value not in _LOAD_MODES:
            return False  # upstream: "unknown load mode"
        settings.load_mode = value
        return True
    number = _stoi(value)
    if number is None:
        return False
    if setting == "fit_ctx":
        settings.pinned = number == -1
        return True
    setattr(settings, setting, number)
    if setting == "context" and number == 0:
        settings.pinned = True
    return True


def _config_files(environ: Mapping[str, str]) -> list[Path]:
    """Where upstream looks for its configuration, for a runtime with the environment
    ``environ`` (without ``HOME``, the user's home directory, as upstream finds it then)."""
    configured = environ.get("XDG_CONFIG_HOME")
    if configured:
        user = Path(configured)
    else:
        home = environ.get("HOME")
        try:
            user = Path(home or pwd.getpwuid(os.getuid()).pw_dir, ".config")
        except KeyError:
            return [_SYSTEM_CONFIG]
    return [_SYSTEM_CONFIG, user / _USER_CONFIG]


def _config_lines(path: Path) -> list[str] | Uncountable:
    """The lines of a configuration file ([] when there is none to read, as upstream skips
    it, a directory and the null device too); :class:`Uncountable` for one too large to
    read, and for anything else but a regular file (a FIFO, whose open would wait for a
    writer past any signal, and whose bytes are whatever is written into it when upstream
    reads it; a device)."""
    try:
        data = read_regular_file(path, max_bytes=_MAX_CONFIG_BYTES)
    except NotARegularFileError:
        return [] if _nothing_to_read(path) else _CONFIG_NOT_A_FILE
    except BlockingIOError:
        return _CONFIG_NOT_A_FILE  # a regular file with no bytes to give for now
    except (OSError, ValueError):
        return []
    if len(data) > _MAX_CONFIG_BYTES:
        return _CONFIG_TOO_LARGE
    return data.decode("utf-8", "replace").splitlines()


def _nothing_to_read(path: Path) -> bool:
    """Whether ``path`` is a directory or the null device, where upstream reads nothing."""
    try:
        info, null = os.stat(path), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(info.st_mode) or (
        stat.S_ISCHR(info.st_mode) and stat.S_ISCHR(null.st_mode) and info.st_rdev == null.st_rdev
    )


def _apply_config(settings: _Settings, lines: Sequence[str]) -> bool:
    """Apply a configuration file as upstream does; False where upstream would exit.

    Its global keys and its ``[default]`` section (one and the same: its header drops the keys
    before it, as a second ``[*]`` drops the first's) win over its ``[*]`` section; every other
    section is a preset for its router. Within a section the keys count
    in sorted order (``ctx-size`` over ``c`` over ``LLAMA_ARG_CTX_SIZE``, ``no-kv-unified``
    over ``kv-unified``), the last line of one key; a ``;`` or ``#`` starts a comment
    anywhere in a value."""
    sections: dict[str, dict[str, str]] = {"*": {}, "default": {}}
    current: dict[str, str] | None = sections["default"]
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            # A section's header starts it anew (the global keys' too: "[default]" drops them).
            name = line[1:].partition("]")[0]
            current = None
            if name in sections:
                current = sections[name] = {}
            continue
        key, equals, value = line.partition("=")
        if current is not None and equals:
            current[key.strip()] = _COMMENT.split(value, maxsplit=1)[0].strip()
    chosen: dict[str, tuple[str, str]] = {}
    for section in (sections["*"], sections["default"]):
        for key in sorted(section):
            value = section[key]
            if (
                key in _UPSTREAM_OTHER_WEIGHTS
                or "-" + key in _UPSTREAM_OTHER_WEIGHTS
                or "--" + key in _UPSTREAM_OTHER_WEIGHTS
            ):
                settings.other_weights = settings.other_weights or f"{key} in a configuration file"
            elif key in _CONFIG_UNIFIED:
                chosen["unified"] = (key, value)
            elif key in _CONFIG_SWA_FULL:
                chosen["swa_full"] = (key, value)
            elif key in _CONFIG_KEYS:
                chosen[_CONFIG_KEYS[key]] = (key, value)
    for setting, (key, value) in sorted(chosen.items(), key=lambda item: item[1][0]):
        if setting == "unified":
            # A switch there is on for on, 1, enabled or true and off for anything else: the
            # pinned build never stops for one (its variable, though, must be one or the other).
            settings.unified = (value in _TRUTHY) == _CONFIG_UNIFIED[key]
        elif setting == "swa_full":
            settings.swa_full = True  # whatever its value: --swa-full has no "off" to take
        elif not _apply_upstream(settings, setting, value):
            return False
    return True


def _upstream_settings(
    arguments: Sequence[str], environ: Mapping[str, str]
) -> _Settings | Uncountable | None:
    settings = _Settings(upstream=True)
    for path in _config_files(environ):
        lines = _config_lines(path)
        if isinstance(lines, Uncountable):
            return lines
        if not _apply_config(settings, lines):
            return None
    for variable, name in _UPSTREAM_VARIABLES.items():
        if variable in environ and not _apply_upstream(settings, name, environ[variable]):
            return None
    named = sorted(name for name in _UPSTREAM_OTHER_WEIGHTS if name in environ)
    if named:
        settings.other_weights = settings.other_weights or named[0]
    if "LLAMA_ARG_KV_UNIFIED" in environ:
        unified = environ["LLAMA_ARG_KV_UNIFIED"]
        if unified not in _TRUTHY | _FALSEY:
            return None
        settings.unified = unified in _TRUTHY
    if "LLAMA_ARG_SWA_FULL" in environ:
        # On for on, 1, enabled or true, off for anything else: unlike LLAMA_ARG_KV_UNIFIED,
        # the pinned build never stops for this one ("yes" and "TRUE" are off).
        settings.swa_full = environ["LLAMA_ARG_SWA_FULL"] in _TRUTHY
    if "LLAMA_ARG_REPACK" in environ:
        # Off only for what the pinned build reads as off; anything else counts as on.
        settings.repack = environ["LLAMA_ARG_REPACK"] not in _FALSEY
    index = 0
    while index < len(arguments):
        option = arguments[index]
        if option.startswith("--"):
            option = option.replace("_", "-")
        index += 1
        if option in _UPSTREAM_OTHER_WEIGHTS:
            settings.other_weights = settings.other_weights or option
        if option in _UPSTREAM_UNIFIED:
            settings.unified = _UPSTREAM_UNIFIED[option]
        elif option == "--swa-full":
            settings.swa_full = True
        elif option in {"--repack", "-nr", "--no-repack"}:
            settings.repack = option == "--repack"
        elif option in _UPSTREAM_TWO_VALUE_OPTIONS:
            index += 2
        elif option in _UPSTREAM_VALUE_OPTIONS:
            if index >= len(arguments):
                return None  # upstream: "expected value for argument"
            wanted = _UPSTREAM_SETTINGS.get(option)
            if wanted is not None and not _apply_upstream(settings, wanted, arguments[index]):
                return None
            index += 1
    if settings.slots < 0:  # upstream's automatic choice: 4 slots, one cache
        settings.slots = _UPSTREAM_AUTO_SLOTS
        settings.unified = True
    if settings.per_slot > 0 and settings.context == 0 and not settings.pinned:
        settings.context = settings.slots * settings.per_slot
    return settings


def _embedded_settings(arguments: Sequence[str]) -> _Settings | None:
    parsed = parse_launcher_arguments(arguments)
    if parsed is None or type(parsed.ctx_size) is not int or parsed.ctx_size < 0:
        return None  # the launcher refuses its command line
    return _Settings(context=parsed.ctx_size, slots=parsed.parallel, model=str(parsed.model))


def launcher_refuses(command_template: Sequence[str]) -> bool:
    """Whether ``command_template`` runs the embedded launcher (``python -m
    companion_runtime.bind.llama_server``) with a command line its own parser refuses: an
    option it does not take (upstream's ``--mmproj``, say), a value it does not accept (a
    host that is not loopback, a negative ``-c``), ``-m`` missing. It would exit with a usage
    error at every start, so this can be asked before the download. Never raises."""
    found = _runtime_in(command_template)
    return found is not None and found[0] and _embedded_settings(found[1]) is None


def _runtime_in(command: Sequence[str]) -> tuple[bool, list[str], list[str]] | None:
    """Which llama.cpp server ``command`` (placeholders filled) runs, or None: ``(True, its
    arguments, [])`` for the embedded launcher, ``(False, its arguments, the words before
    it)`` for upstream's ``llama-server``."""
    if not command:
        return None
    try:
        filled = filled_argv(command, _PLACEHOLDER_VALUES)
    except (ProcessError, KeyError, ValueError, TypeError):
        return None
    argv = _expand_split_strings(filled)
    # Whichever comes first is what runs: the words after it are its own arguments, where the
    # other's name may well be a value ("llama-server --alias companion_runtime.bind...").
    for index, argument in enumerate(argv):
        # python [its options] -m MODULE [the launcher's arguments], or -mMODULE, -PmMODULE
        # as Python takes them too (and -Pm MODULE); xllamacpp reads no LLAMA_ARG_* variable.
        if index and (
            (argument == MODULE and _MODULE_OPTION.fullmatch(argv[index - 1]))
            or _ATTACHED_MODULE.fullmatch(argument)
        ):
            return True, argv[index + 1 :], []
        # llama-server itself, or behind a wrapper that runs it (env, nice, taskset...); an
        # "env NAME=VALUE" before it sets a variable of its environment, also when env is
        # itself behind another wrapper ("nice env NAME=VALUE llama-server").
        if Path(argument).name == _UPSTREAM_NAME and not (index and _assignment(argument)):
            return False, argv[index + 1 :], argv[:index]
    return None


def _settings(command: Sequence[str], environ: Mapping[str, str]) -> _Settings | Uncountable | None:
    """What the command asks of llama.cpp, or None: not its server, or it would not start."""
    found = _runtime_in(command)
    if found is None:
        return None
    embedded, arguments, wrappers = found
    if embedded:
        return _embedded_settings(arguments)
    wrapped = _wrapped_environment(wrappers, _runtime_environment(environ))
    return _upstream_settings(arguments, wrapped)


def _assignment(word: str) -> bool:
    """Whether a wrapper's word reads as ``NAME=VALUE`` (``LLAMA_ARG_MMPROJ=/m/llama-server``
    sets a variable; it runs no llama-server), not as a path with a ``=`` in it."""
    name, equals, _value = word.partition("=")
    return bool(equals and name) and "/" not in name


def _runtime_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the runtime's environment holds of what upstream reads: ``environ`` (the extras)
    over the manager's ``HOME``, the one such variable of the manager's that the scrub keeps."""
    home = os.environ.get("HOME")
    return {**({"HOME": home} if home is not None else {}), **environ}


def _env_option(word: str) -> tuple[str, str | None]:
    """An env long option (``--split-string``, ``--unset=NAME``...) by its full name, as
    getopt takes any unambiguous abbreviation (``--split=...``), and its attached value."""
    given, equals, value = word.partition("=")
    named = [option for option in _ENV_LONG_OPTIONS if option.startswith(given)]
    exact = given if given in _ENV_LONG_OPTIONS else None
    name = exact or (named[0] if len(named) == 1 else given)
    return name, (value if equals else None)


def _split_string(text: str) -> list[str]:
    """``env -S``'s words (quotes, backslashes and a ``#`` comment as it reads them)."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split()  # env refuses it (an unclosed quote): nothing it runs to read


def _expand_split_strings(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``env -S STRING`` (``-SSTRING``, ``--split-string=STRING``,
    ``-iS STRING``...) before llama-server replaced by the words env splits it into: they may
    hold ``NAME=VALUE`` assignments, and llama-server itself with its options."""
    words = list(argv)
    index = 0
    while index < len(words):
        name = Path(words[index]).name
        index += 1
        if name == _UPSTREAM_NAME and not (index > 1 and _assignment(words[index - 1])):
            break
        if name != "env":
            continue
        while index < len(words) and words[index].startswith("-") and words[index] != "-":
            word = words[index]
            if word == "--":
                index += 1
                break
            if word.startswith("--"):
                option, value = _env_option(word)
                if option == "--split-string":
                    if value is None:
                        words[index : index + 2] = _split_string(" ".join(words[index + 1 :][:1]))
                    else:
                        words[index : index + 1] = _split_string(value)
                    continue
                index += 2 if option in _ENV_VALUE_OPTIONS and value is None else 1
                continue
            for position in range(1, len(word)):
                letter = word[position]
                if letter not in "uCaS":
                    continue
                rest = word[position + 1 :]
                if letter == "S":
                    flags = [word[:position]] if position > 1 else []
                    span = 1 if rest else 2
                    text = rest if rest else " ".join(words[index + 1 :][:1])
                    words[index : index + span] = [*flags, *_split_string(text)]
                    index -= 1  # read again from the flags before -S, or its first word
                elif not rest:
                    index += 1  # the value is the next word
                break
            index += 1
    return words


def _wrapped_environment(wrappers: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment llama-server gets from ``environ`` through the wrappers before it.

    ``env`` as it reads its words: ``-i`` (or a lone ``-``) empties it, ``-u NAME`` removes a
    variable, ``NAME=VALUE`` sets one, also behind another wrapper ("nice env NAME=VALUE
    llama-server"). A ``NAME=VALUE`` word of another wrapper counts as set too (``sudo``,
    ``systemd-run -E``, ``start-stop-daemon -e`` take them so), as does bwrap's ``--setenv
    NAME VALUE``: a variable that may be set is read as set."""
    result = dict(environ)
    index = 0
    while index < len(wrappers):
        word = wrappers[index]
        index += 1
        if Path(word).name == "env":
            index = _apply_env(wrappers, index, result)
        elif word == "--setenv" and index + 1 < len(wrappers):
            result[wrappers[index]] = wrappers[index + 1]
            index += 2
        else:
            name, _equals, value = word.partition("=")
            if _assignment(word) and not name.startswith("-"):
                result[name] = value
    return result


def _apply_env(words: Sequence[str], index: int, environ: dict[str, str]) -> int:
    """Apply to ``environ`` what env's options and assignments from ``words[index]`` on do
    (its ``-S`` strings already split); the index of the command it runs."""
    while index < len(words) and words[index].startswith("-"):
        word = words[index]
        index += 1
        if word == "--":
            break
        if word == "-":
            environ.clear()
            break
        if word.startswith("--"):
            option, value = _env_option(word)
            if option in _ENV_VALUE_OPTIONS and value is None and index < len(words):
                value = words[index]
                index += 1
            if option == "--ignore-environment":
                environ.clear()
            elif option == "--unset" and value is not None:
                environ.pop(value, None)
            continue
        for position in range(1, len(word)):
            letter = word[position]
            if letter == "i":
                environ.clear()
            if letter in "uCa":
                value = word[position + 1 :]
                if not value and index < len(words):
                    value = words[index]
                    index += 1
                if letter == "u":
                    environ.pop(value, None)
                break
    while index < len(words):
        name, equals, value = words[index].partition("=")
        if not equals or not name:
            break
        environ[name] = value
        index += 1
    return index


def _override_context(overrides: Sequence[str], architecture: str) -> int | None:
    """The context length ``--override-kv`` gives the model (the largest, if several do)."""
    key = f"{architecture}.context_length="
    lengths = []
    for value in overrides:
        for item in value.split(","):
            if item.startswith(key) and item[len(key) :].startswith("int:"):
                # std::atol, then the uint32 the model loader keeps.
                number = _number(item[len(key) + 4 :])
                if number is not None and not -(1 << 63) <= number < 1 << 63:
                    number = (1 << 63) - 1 if number > 0 else -(1 << 63)  # strtol saturates
                lengths.append(0 if number is None else number % (1 << 32))
    return max(lengths) if lengths else None


def _overridden(overrides: Sequence[str], architecture: str) -> set[str]:
    """The keys of the model's own (``ARCH.…``, without the prefix) that ``--override-kv``
    sets, whatever to."""
    prefix = architecture + "."
    return {
        item.partition("=")[0].removeprefix(prefix)
        for value in overrides
        for item in value.split(",")
        if item.startswith(prefix)
    }


def unverified_weights(
    command_template: Sequence[str], environ: Mapping[str, str] | None = None
) -> str | None:
    """What in ``command_template`` has llama.cpp's server load weights other than
    ``{model_path}``, by name (never its value), or None: a later ``-m`` or none at all, one
    it downloads (``-hf``, ``-mu``, a ``--*-default`` preset), a draft model, a multimodal
    projector (``--mmproj``, ``--mmproj-url``), LoRA adapters, control vectors, a router's
    models (``--models-dir``), or the variable or configuration key for any of them. From the
    command alone, so it can be asked before the download. Never raises."""
    settings = _settings(command_template, environ or {})
    return settings.unverified() if isinstance(settings, _Settings) else None


def loads_another_model(
    command_template: Sequence[str], environ: Mapping[str, str] | None = None
) -> bool:
    """Whether ``command_template`` has llama.cpp's server load weights other than
    ``{model_path}`` (:func:`unverified_weights`). Never raises."""
    return unverified_weights(command_template, environ) is not None


def estimate_context_memory(
    model_path: Path,
    command_template: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> ContextMemory | Uncountable | None:
    """The KV cache the runtime ``command_template`` will allocate for ``model_path``.

    None: the command is not llama.cpp's server, or one it would refuse to start with, or the
    file is not a GGUF model with an attention shape. :data:`UNCOUNTABLE`: llama.cpp's server
    on a GGUF header too large to walk. Never raises.
    """
    settings = _settings(command_template, environ or {})
    if isinstance(settings, Uncountable):
        return settings
    if settings is None or settings.slots <= 0 or -_CONTEXT_PADDING < settings.context < 0:
        # Not llama.cpp's server, or one that exits (or aborts) at once: upstream takes -c as
        # a uint32, and -1 to -255 pad up to 0 ("n_ctx_seq == 0").
        return None
    if settings.context < 0:
        # 2^32 + N, 2^31 tokens or more: a KV cache that size fails, but a recurrent state or
        # window layers do not grow with it, and upstream runs them.
        return _NEGATIVE_CONTEXT
    unverified = settings.unverified()
    if unverified is not None:
        return _unverified(unverified)
    if "architecture" in _overridden(settings.overrides, "general"):
        return _SHAPE_OVERRIDDEN  # llama.cpp would read another architecture's keys
    shape = read_attention_shape(model_path)
    if shape is None and settings.overrides:
        # A header without a key the estimate needs, which --override-kv may well supply.
        return _SHAPE_OVERRIDDEN
    if not isinstance(shape, AttentionShape):
        return shape
    declared = _override_context(settings.overrides, shape.architecture)
    context = settings.context
    if context == 0:
        # The declared length, for every slot when each has a cache of its own: -np 4 without
        # -c is four times the declared length.
        context = shape.context_length if declared is None else declared
        if not settings.unified:
            context *= settings.slots
    if context == 0:
        return None  # llama.cpp: "n_ctx and model->hparams.n_ctx_train cannot both be zero"
    context = _pad(context)
    if not settings.unified:
        # One cache per slot, each its share of the context padded up on its own.
        context = _pad(context // settings.slots) * settings.slots
    overridden = _overridden(settings.overrides, shape.architecture)
    if shape.recurrent_layers and overridden & _RECURRENT_SIZING_KEYS:
        # The state would be sized from the override, not from the header read here.
        return Uncountable("its recurrent state cannot be counted with --override-kv of its keys")
    if overridden & _SHAPE_KEYS:
        # llama.cpp sizes the cache from the override, and checks the weights against it: a
        # header that declares less loads all the same.
        return _SHAPE_OVERRIDDEN
    window_cells = (
        None if overridden & _SLIDING_WINDOW_KEYS else _window_cells(shape, settings, context)
    )
    swa_layers = shape.swa_layers if window_cells is not None else ()
    kv_cache = 0
    for layer, heads in enumerate(shape.kv_heads):
        key_length, value_length = _head_lengths(shape, settings, overridden, layer)
        per_token = _cache_bytes(heads * key_length, settings.cache_k) + _cache_bytes(
            heads * value_length, settings.cache_v
        )
        windowed = window_cells is not None and layer < len(swa_layers) and swa_layers[layer]
        kv_cache += per_token * (window_cells if windowed and window_cells is not None else context)
    recurrent = _recurrent_bytes(shape, settings)
    if isinstance(recurrent, Uncountable):
        return recurrent
    return ContextMemory(
        context_tokens=context,
        bytes=kv_cache + recurrent,
        recurrent_bytes=recurrent,
        metadata_bytes=shape.metadata_bytes,
        # Beside the mapped file's pages only: read into buffers (upstream's --load-mode none,
        # mlock, dio), a repacked matrix is read into the CPU backend's and nowhere else.
        repacked_bytes=(
            shape.repacked_bytes
            if settings.repack and settings.load_mode in _MAPPING_LOAD_MODES
            else 0
        ),
    )


def _head_lengths(
    shape: AttentionShape, settings: _Settings, overridden: set[str], layer: int
) -> tuple[int, int]:
    """The key and value lengths of ``layer``'s heads: a window layer's own
    (``key_length_swa``, ``value_length_swa``) where the model gives them, the others'
    elsewhere; the larger of the two where which layers attend through a window is not known
    here (another architecture, the launcher, a pattern ``--override-kv`` sets)."""
    swa_key = shape.swa_key_length or shape.key_length
    swa_value = shape.swa_value_length or shape.value_length
    if swa_key == shape.key_length and swa_value == shape.value_length:
        return shape.key_length, shape.value_length
    if shape.swa_layers and settings.upstream and not overridden & _SLIDING_WINDOW_KEYS:
        if shape.swa_layers[layer]:
            return swa_key, swa_value
        return shape.key_length, shape.value_length
    return max(shape.key_length, swa_key), max(shape.value_length, swa_value)


def _window_cells(shape: AttentionShape, settings: _Settings, context: int) -> int | None:
    """The cells upstream's cache gives each sliding-window layer (all its slots' together),
    or None where they are counted at the full ``context``: a model whose window this does not
    size, the launcher, ``--swa-full``, speculative decoding, a batch size it would not use.

    Per stream (one, or one per slot without ``--kv-unified``), llama.cpp keeps
    ``min(the stream's context, window × slots in the stream + the physical batch)`` cells,
    padded up to 256."""
    if not shape.swa_layers or not settings.upstream or settings.swa_full:
        return None
    kinds = {kind.strip() for kind in settings.spec_type.split(",")}
    if not kinds <= _PLAIN_SPEC_TYPES or settings.batch <= 0 or settings.ubatch < 0:
        return None
    batch = min(settings.batch, context)
    ubatch = min(batch, settings.ubatch or batch)
    streams = 1 if settings.unified else settings.slots
    per_stream = context // streams
    slots_per_stream = settings.slots if settings.unified else 1
    window = shape.sliding_window * slots_per_stream + ubatch
    return _pad(min(per_stream, window)) * streams


def _recurrent_bytes(shape: AttentionShape, settings: _Settings) -> int | Uncountable:
    """The recurrent state llama.cpp allocates for the model: one cell per slot (with or
    without ``--kv-unified``), in each cell an R and an S state for every recurrent layer."""
    if shape.recurrent_layers == 0:
        return 0
    kinds = {kind.strip() for kind in settings.spec_type.split(",")}
    if not kinds <= _PLAIN_SPEC_TYPES:
        # Speculative decoding may have llama.cpp keep a copy of the state per draft token
        # (its "rs_seq"), for the architectures it lets roll back: not counted here.
        return Uncountable("its recurrent state cannot be counted with --spec-type")
    per_cell = shape.recurrent_layers * (shape.recurrent_r + shape.recurrent_s)
    return settings.slots * per_cell * _RECURRENT_ELEMENT_BYTES
