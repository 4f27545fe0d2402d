"""The KV-cache estimate the fit check counts: model files written with the ``gguf`` package,
runtime commands as manifests give them, and the figure the real llama.cpp server logs."""

from __future__ import annotations

import itertools
import os
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from companion_runtime.bind import context_memory
from companion_runtime.bind.context_memory import (
    UNCOUNTABLE,
    AttentionShape,
    ContextMemory,
    Uncountable,
    estimate_context_memory,
    launcher_refuses,
    read_attention_shape,
)
from companion_runtime.bind.llama_server import (
    DEFAULT_CONTEXT_SIZE,
    MAX_LAUNCHER_ARGUMENTS,
    MODULE,
    embedded_llama_command,
    llama_available,
)
from companion_runtime.bind.tiny_model import write_tiny_model
from tests.support.llama import declaring_context, free_port, upstream_binary
from tests.support.quantized import embedding_bytes, quantized_bytes, write_quantized
from tests.support.recurrent import (
    write_granite_hybrid,
    write_jamba,
    write_lfm2,
    write_mamba,
    write_mamba2_hybrid,
    write_qwen3next,
    write_rwkv6,
    write_rwkv7,
)
from tests.support.sliding import write_gemma, write_gpt_oss
from tests.support.vocabulary import write_large_vocabulary

pytestmark = pytest.mark.unit

MIB = 1 << 20
UPSTREAM = "/opt/llama.cpp/bin/llama-server"
#: Upstream on the verified blob, as a manifest runs it.
UPSTREAM_CMD = [UPSTREAM, "-m", "{model_path}"]
EMBEDDED = embedded_llama_command()


def _model(
    path: Path,
    *,
    layers: int = 32,
    context: int = 131072,
    embedding: int = 4096,
    heads: int | list[int] = 32,
    kv_heads: int | list[int] | None = 8,
    key_length: int | None = None,
    value_length: int | None = None,
    vocabulary: int = 1000,
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
    architecture: str | None = "llama",
) -> Path:
    """A GGUF file with a model's metadata (and a vocabulary before it ends, as real ones do)."""
    writer = gguf.GGUFWriter(path, architecture or "llama", endianess=endianess)
    if architecture is None:
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    if kv_heads is not None:
        writer.add_head_count_kv(kv_heads)
    if key_length is not None:
        writer.add_key_length(key_length)
    if value_length is not None:
        writer.add_value_length(value_length)
    writer.add_token_list([f"token{i}".encode() for i in range(vocabulary)])
    writer.add_token_scores([0.0] * vocabulary)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama3_kv_bytes(tokens: int) -> int:
    # 32 layers × 8 KV heads × 128 (4096 / 32) for K and for V, 2 bytes (f16) each.
    return tokens * 32 * 8 * 128 * 2 * 2


def test_the_shape_is_read_as_written(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf", vocabulary=50_000)
    assert read_attention_shape(model) == AttentionShape(
        context_length=131072, kv_heads=(8,) * 32, key_length=128, value_length=128
    )
    assert read_attention_shape(model).architecture == "llama"  # type: ignore[union-attr]
    big_endian = _model(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    assert read_attention_shape(big_endian) == read_attention_shape(model)
    # Per-layer head counts (a hybrid model: layers 1 and 3 have no attention), explicit
    # key and value lengths, and no head_count_kv at all (it is then head_count).
    hybrid = _model(
        tmp_path / "h.gguf",
        layers=4,
        heads=[16, 0, 16, 0],
        kv_heads=[4, 0, 2, 0],
        key_length=192,
        value_length=128,
    )
    assert read_attention_shape(hybrid) == AttentionShape(
        context_length=131072, kv_heads=(4, 0, 2, 0), key_length=192, value_length=128
    )
    plain = _model(tmp_path / "p.gguf", layers=2, heads=8, kv_heads=None, embedding=512)
    assert read_attention_shape(plain) == AttentionShape(
        context_length=131072, kv_heads=(8, 8), key_length=64, value_length=64
    )


def test_the_context_comes_from_the_command(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf")

    def estimate(*arguments: str, command: list[str] | None = None, **env: str) -> object:
        return estimate_context_memory(model, [*(command or UPSTREAM_CMD), *arguments], env)

    declared = ContextMemory(context_tokens=131072, bytes=_llama3_kv_bytes(131072))
    # Upstream llama-server's own default (-c 0) is the length the model declares: 16 GiB.
    assert estimate("-m", "{model_path}", "--port", "{port}") == declared
    assert declared.bytes == 16 << 30
    assert estimate("-c", "0") == declared
    assert estimate("-c", "8192") == ContextMemory(8192, _llama3_kv_bytes(8192))
    # Upstream has no --opt=value form (it refuses the argument); the launcher's argparse has.
    assert estimate("--ctx-size=8192") == declared
    assert estimate("--ctx-size=8192", command=EMBEDDED) == ContextMemory(
        8192, _llama3_kv_bytes(8192)
    )
    assert estimate("-c", "100", "--ctx-size", "4000") == ContextMemory(
        4096, _llama3_kv_bytes(4096)
    )
    # llama.cpp rounds the context up to a multiple of 256 tokens.
    assert estimate("-c", "1") == ContextMemory(256, _llama3_kv_bytes(256))
    # The embedded launcher's default is DEFAULT_CONTEXT_SIZE, not the declared length.
    assert estimate(command=EMBEDDED) == ContextMemory(
        DEFAULT_CONTEXT_SIZE, _llama3_kv_bytes(DEFAULT_CONTEXT_SIZE)
    )
    # -c 0 with a cache per slot (the template's two): the declared length for each slot.
    assert estimate("-c", "0", command=EMBEDDED) == ContextMemory(
        2 * 131072, _llama3_kv_bytes(2 * 131072)
    )
    # The environment counts for upstream llama-server, below its flags; not for the launcher.
    assert estimate(LLAMA_ARG_CTX_SIZE="2048") == ContextMemory(2048, _llama3_kv_bytes(2048))
    assert estimate("-c", "512", LLAMA_ARG_CTX_SIZE="2048") == ContextMemory(
        512, _llama3_kv_bytes(512)
    )
    launcher = estimate(command=EMBEDDED, LLAMA_ARG_CTX_SIZE="0")
    assert isinstance(launcher, ContextMemory) and launcher.context_tokens == 4096


def test_cache_types_change_the_element_size(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf")
    row = 8 * 128  # one layer's K (or V) for one token, in elements
    for flags, k_bytes, v_bytes in (
        (["-ctk", "q8_0", "-ctv", "q8_0"], row // 32 * 34, row // 32 * 34),
        (["--cache_type_k", "q4_0"], row // 32 * 18, row * 2),
        (["-ctv", "f32"], row * 2, row * 4),
        (["-ctk", "bf16", "--cache-type-v", "q5_1"], row * 2, row // 32 * 24),
    ):
        memory = estimate_context_memory(model, [*UPSTREAM_CMD, "-c", "1024", *flags])
        assert memory == ContextMemory(1024, 1024 * 32 * (k_bytes + v_bytes)), flags
    env = {"LLAMA_ARG_CACHE_TYPE_K": "q8_0"}
    memory = estimate_context_memory(model, [*UPSTREAM_CMD, "-c", "1024"], env)
    assert memory == ContextMemory(1024, 1024 * 32 * (row // 32 * 34 + row * 2))


def test_upstream_options_are_read_as_llama_server_reads_them(tmp_path: Path) -> None:
    # Each figure is what llama-server (build 11434) allocated for the same command line.
    model = _model(tmp_path / "m.gguf")

    def tokens(*arguments: str, **env: str) -> int | None:
        memory = estimate_context_memory(model, [*UPSTREAM_CMD, *arguments], env)
        assert memory is None or isinstance(memory, ContextMemory)
        return None if memory is None else memory.context_tokens

    # "_" in a long option is "-": the last -c is this one.
    assert tokens("-c", "100", "--ctx_size", "8192") == 8192
    # An option's value is never an option: this alias is "--ctx-size=512", -c is unset.
    assert tokens("--alias", "--ctx-size=512") == 131072
    assert tokens("--alias", "-c", "-c", "512") == 512
    assert tokens("--control-vector-layer-range", "-c", "9", "-c", "1024") == 1024
    # std::stoi: leading blanks and a sign, then digits; whatever follows is ignored.
    assert tokens("-c", "0x10") == 131072  # 0, the declared length
    assert tokens("-c", "8192abc") == 8192
    assert tokens("-c", " +8192") == 8192
    assert tokens("-c", "1e4") == 256
    assert tokens(LLAMA_ARG_CTX_SIZE="4096tokens") == 4096
    # The declared length as --override-kv gives it.
    assert tokens("--override-kv", "llama.context_length=int:50000") == 50176
    assert tokens("--override-kv", "a.b=bool:true,llama.context_length=int:9000") == 9216
    assert tokens("--override-kv", "qwen2.context_length=int:9000") == 131072
    # std::atol, then the uint32 the loader keeps: past a long it saturates, 2^32 - 1.
    huge = "llama.context_length=int:" + "9" * 5000
    assert tokens("-np", "1", "--override-kv", huge) == 1 << 32
    assert tokens("-c", "1024", "--override-kv", "llama.context_length=int:50000") == 1024


def test_upstream_reads_its_configuration_files_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama-server applies /etc/llama.cpp/config.ini, then the user's (under the runtime's
    # HOME, or XDG_CONFIG_HOME), before its environment and its flags: a context set there is
    # the one it allocates (50,000 tokens here, where the old estimate counted the declared).
    model = _model(tmp_path / "m.gguf")
    system = tmp_path / "etc.ini"
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", system)
    home = tmp_path / "home"
    user = home / ".config" / "llama.cpp" / "config.ini"
    user.parent.mkdir(parents=True)

    def tokens(*arguments: str, **env: str) -> int | None:
        memory = estimate_context_memory(
            model, [*UPSTREAM_CMD, *arguments], {"HOME": str(home), **env}
        )
        assert memory is None or isinstance(memory, ContextMemory)
        return None if memory is None else memory.context_tokens

    user.write_text("c = 50000\n")
    assert tokens() == 50176
    assert tokens(LLAMA_ARG_CTX_SIZE="1000") == 1024  # the environment comes after
    assert tokens("-c", "2000") == 2048  # and the flags last
    # Global keys and the [*] section count, by any of an option's names or its variable;
    # other sections are a router's presets. A later file wins over an earlier one.
    system.write_text("np = 3\nctx-size = 9000\n")
    user.write_text("; a comment\n[*]\nLLAMA_ARG_CTX_SIZE = 4096\n[other]\nc = 99999\n")
    assert tokens() == 4608  # 3 slots, a cache each
    user.write_text("kv-unified = true\n")
    assert tokens() == 9216  # the system file's context, one cache
    user.write_text("no-kvu = false\nc=4096\n")
    assert tokens() == 4096
    # What upstream refuses (and exits on) is no estimate; what it ignores, ignored.
    user.write_text('c = "4096"\n')
    assert tokens() is None
    user.write_text("ctx_size = 4096\nunknown = 1\n")
    assert tokens() == 9216  # no "_" for "-" in a file: the system file's context
    # XDG_CONFIG_HOME, where the runtime has one, instead of HOME's .config.
    other = tmp_path / "xdg" / "llama.cpp" / "config.ini"
    other.parent.mkdir(parents=True)
    other.write_text("c = 1000\n")
    assert tokens(XDG_CONFIG_HOME=str(tmp_path / "xdg")) == 3 * 512
    # A file too large to read is not counted as nothing.
    user.write_bytes(b"# " + bytes(2 << 20))
    memory = estimate_context_memory(model, UPSTREAM_CMD, {"HOME": str(home)})
    assert isinstance(memory, Uncountable) and "configuration file" in memory.what
    # The launcher (xllamacpp) reads no configuration file.
    user.write_text("c = 50000\n")
    launcher = [*EMBEDDED[:4], "-m", "{model_path}", "--port", "{port}"]
    embedded = estimate_context_memory(model, launcher, {"HOME": str(home)})
    assert isinstance(embedded, ContextMemory) and embedded.context_tokens == 4096


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ([], False),
        (["-c", "8192", "--metrics"], False),
        (["--mmproj", "/m/projector.gguf"], True),  # upstream's option, not the launcher's
        (["--host", "0.0.0.0"], True),  # not loopback
        (["-c", "-1"], True),
        (["--parallel"], True),  # no value
    ],
)
def test_a_command_line_the_launcher_refuses_is_known_from_the_command_alone(
    tmp_path: Path, extra: list[str], refused: bool
) -> None:
    command = [*EMBEDDED, *extra]
    assert launcher_refuses(command) is refused
    # The launcher itself agrees: it exits with its usage error before loading anything.
    filled = [
        word.replace("{model_path}", str(tmp_path / "absent.gguf"))
        .replace("{host}", "127.0.0.1")
        .replace("{port}", "1")
        .replace("{api_key_file}", str(tmp_path / "key"))
        for word in command
    ]
    finished = subprocess.run(filled, capture_output=True, text=True, timeout=60)
    assert (finished.returncode == 2) is refused, finished.stderr


def test_a_launcher_command_line_too_long_to_parse_in_time_is_refused_at_once(
    tmp_path: Path,
) -> None:
    # argparse's time grows with the square of the arguments' number: 40,000 "--metrics" (a
    # 480 KB manifest) took the check 71 s, on serve's event loop before the download, deaf
    # to SIGINT and SIGTERM all along (and the launcher itself as long to start). The
    # launcher takes at most MAX_LAUNCHER_ARGUMENTS, and says so at once.
    command = [*EMBEDDED, *["--metrics"] * 20_000]
    started = time.monotonic()
    assert launcher_refuses(command)
    assert estimate_context_memory(_model(tmp_path / "m.gguf"), command) is None
    assert time.monotonic() - started < 2
    at_most = [*EMBEDDED, *["--metrics"] * (MAX_LAUNCHER_ARGUMENTS - len(EMBEDDED) + 4)]
    assert not launcher_refuses(at_most)
    assert launcher_refuses([*at_most, "--metrics"])
    filled = [
        word.replace("{model_path}", str(tmp_path / "absent.gguf"))
        .replace("{host}", "127.0.0.1")
        .replace("{port}", "1")
        .replace("{api_key_file}", str(tmp_path / "key"))
        for word in command
    ]
    started = time.monotonic()
    finished = subprocess.run(filled, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2, finished.stderr
    assert "arguments" in finished.stderr.splitlines()[-1]
    assert time.monotonic() - started < 10


def test_upstream_s_command_line_is_not_the_launcher_s_to_refuse() -> None:
    assert not launcher_refuses(["/opt/llama-server", "-m", "{model_path}", "--mmproj", "p"])
    assert not launcher_refuses(["/bin/sh", "-c", "exit 0", "{port}"])


def test_a_command_that_loads_another_model_is_not_counted_as_the_verified_one(
    tmp_path: Path,
) -> None:
    # The estimate reads the verified blob's header; a command that has llama.cpp load some
    # other file (the last -m wins), none, or one it downloads, is refused, not counted as it.
    model = _model(tmp_path / "m.gguf", context=2048)
    launcher = [*EMBEDDED[:4], "--port", "{port}"]

    def result(command: list[str], **env: str) -> object:
        return estimate_context_memory(model, command, env)

    for command, env, named in (
        ([*UPSTREAM_CMD, "-m", "/models/big.gguf"], {}, "another -m"),
        ([UPSTREAM, "--model", "/models/big.gguf"], {}, "another -m"),
        ([UPSTREAM, "--port", "{port}"], {}, "no -m"),  # no model: router mode, anything
        ([UPSTREAM], {"LLAMA_ARG_MODEL": "/models/big.gguf"}, "another -m"),
        ([*UPSTREAM_CMD, "-hf", "someone/big"], {}, "-hf"),
        ([*UPSTREAM_CMD, "--gpt-oss-20b-default"], {}, "--gpt-oss-20b-default"),
        (UPSTREAM_CMD, {"LLAMA_ARG_HF_REPO": "someone/big"}, "LLAMA_ARG_HF_REPO"),
        ([*launcher, "-m", "{model_path}", "-m", "/models/big.gguf"], {}, "another -m"),
        ([*launcher, "--model=/models/big.gguf"], {}, "another -m"),
        ([*launcher, "-m", "{model_path}.other"], {}, "another -m"),
        # Weights beside the model: a draft model, a projector, adapters, control vectors, a
        # router's models; each runs bytes the manifest never vouched for.
        ([*UPSTREAM_CMD, "-md", "/models/big.gguf"], {}, "-md"),
        ([*UPSTREAM_CMD, "--spec_draft_model", "/models/big.gguf"], {}, "--spec-draft-model"),
        ([*UPSTREAM_CMD, "-hfd", "someone/big"], {}, "-hfd"),
        ([*UPSTREAM_CMD, "--mmproj", "/models/big.gguf"], {}, "--mmproj"),
        ([*UPSTREAM_CMD, "-mmu", "https://elsewhere.example/big.gguf"], {}, "-mmu"),
        ([*UPSTREAM_CMD, "--lora", "/models/big.gguf"], {}, "--lora"),
        ([*UPSTREAM_CMD, "--lora-scaled", "/models/big.gguf:0.5"], {}, "--lora-scaled"),
        ([*UPSTREAM_CMD, "--control-vector", "/models/big.gguf"], {}, "--control-vector"),
        ([*UPSTREAM_CMD, "--models-dir", "/models/big"], {}, "--models-dir"),
        (UPSTREAM_CMD, {"LLAMA_ARG_MMPROJ_URL": "https://e.example/big"}, "LLAMA_ARG_MMPROJ_URL"),
        (UPSTREAM_CMD, {"LLAMA_ARG_SPEC_DRAFT_MODEL": "/big"}, "LLAMA_ARG_SPEC_DRAFT_MODEL"),
    ):
        memory = result(command, **env)
        assert isinstance(memory, Uncountable), (command, env)
        assert memory.what == (
            f"the runtime command loads weights the manifest does not verify ({named})"
        )
        assert context_memory.unverified_weights(command, env) == named
        assert context_memory.loads_another_model(command, env)
    # A value is never taken for an option: an alias that reads "--mmproj" loads nothing.
    assert context_memory.unverified_weights([*UPSTREAM_CMD, "--alias", "--mmproj"]) is None
    # The verified one, however it is named: the last -m, the flags over the environment.
    for command, env in (
        ([UPSTREAM, "-m", "/models/big.gguf", "-m", "{model_path}"], {}),
        (UPSTREAM_CMD, {"LLAMA_ARG_MODEL": "/models/big.gguf"}),
        ([UPSTREAM, "--alias", "-m", "--model", "{model_path}"], {}),
        ([*launcher, "--model={model_path}"], {}),
    ):
        assert isinstance(result(command, **env), ContextMemory), (command, env)
        assert context_memory.unverified_weights(command, env) is None


def test_weights_named_in_a_configuration_file_are_refused_too(tmp_path: Path) -> None:
    # upstream's config.ini takes an option by any of its names, with or without dashes.
    model = _model(tmp_path / "m.gguf", context=2048)
    home = tmp_path / "home"
    config = home / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    for text, named in (
        ("mmproj = /models/big.gguf\n", "mmproj in a configuration file"),
        ("[*]\nmd = /models/big.gguf\n", "md in a configuration file"),
        ("LLAMA_ARG_LORA = /models/big.gguf\n", None),  # not a variable upstream reads
        ("[a-preset]\nlora = /models/big.gguf\n", None),  # a router's preset, not this server
    ):
        config.write_text(text)
        env = {"HOME": str(home)}
        assert context_memory.unverified_weights(UPSTREAM_CMD, env) == named, text
        memory = estimate_context_memory(model, UPSTREAM_CMD, env)
        assert isinstance(memory, Uncountable if named else ContextMemory), text


def test_a_configuration_file_that_is_a_fifo_is_never_waited_on(tmp_path: Path) -> None:
    # open() on a FIFO waits for a writer, and no signal handler runs meanwhile: serve, whose
    # command check reads the configuration before the download, hung there past SIGINT and
    # SIGTERM (a FIFO at /tmp/llama.cpp/config.ini, for a runtime given XDG_CONFIG_HOME=/tmp,
    # is anyone's to make). What upstream would read from it nobody can tell: no estimate.
    model = _model(tmp_path / "m.gguf", context=2048)
    home = tmp_path / "home"
    config = home / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    os.mkfifo(config)
    env = {"HOME": str(home)}
    answers: list[object] = []

    def ask() -> None:
        answers.append(context_memory.unverified_weights(UPSTREAM_CMD, env))
        answers.append(estimate_context_memory(model, UPSTREAM_CMD, env))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(5)
    if asking.is_alive():
        # Let the waiting open() go, so the test ends.
        os.close(os.open(config, os.O_WRONLY | os.O_NONBLOCK))
        asking.join(5)
        pytest.fail("the configuration file's FIFO was waited on")
    unverified, memory = answers
    assert unverified is None
    assert isinstance(memory, Uncountable) and "configuration file" in memory.what
    # The null device (a configuration turned off with a symlink to it) and a directory hold
    # nothing to read, as before.
    config.unlink()
    config.symlink_to(os.devnull)
    memory = estimate_context_memory(model, UPSTREAM_CMD, env)
    assert isinstance(memory, ContextMemory) and memory.context_tokens == 2048
    config.unlink()
    config.mkdir()
    memory = estimate_context_memory(model, UPSTREAM_CMD, env)
    assert isinstance(memory, ContextMemory) and memory.context_tokens == 2048


def test_a_switch_in_a_configuration_file_is_off_unless_truthy(tmp_path: Path) -> None:
    # upstream reads a switch's value in config.ini as on (on, 1, enabled, true) or else off,
    # and never stops for one: "kv-unified = maybe" was taken for a command llama-server
    # refuses, so neither its --mmproj was refused nor its cache counted.
    model = _model(tmp_path / "m.gguf")
    home = tmp_path / "home"
    config = home / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    env = {"HOME": str(home)}
    sized = [*UPSTREAM_CMD, "-np", "3", "-c", "1000"]
    per_slot = ContextMemory(1536, _llama3_kv_bytes(1536))
    unified = ContextMemory(1024, _llama3_kv_bytes(1024))
    for text, expected in (
        ("kv-unified = maybe\n", per_slot),
        ("kv-unified = YES\n", per_slot),
        ("kv-unified = enabled\n", unified),
        ("no-kv-unified = maybe\n", unified),
        ("LLAMA_ARG_KV_UNIFIED = TRUE\n", per_slot),
    ):
        config.write_text(text)
        assert estimate_context_memory(model, sized, env) == expected, text
        command = [*UPSTREAM_CMD, "--mmproj", "/models/projector.gguf"]
        assert context_memory.unverified_weights(command, env) == "--mmproj", text


def test_a_configuration_file_is_read_with_upstreams_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # swa-full is on whatever its value; a ";" or "#" starts a comment in a value; [default]
    # is the global keys' section, started anew by its header, and wins over [*]; within a
    # section the keys count in sorted order.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    model = write_gemma(tmp_path / "gemma3.gguf")
    home = tmp_path / "home"
    config = home / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    env = {"HOME": str(home)}
    row = 2 * 32 * 2 * 2  # 2 KV heads of 32, K and V, f16

    def estimate(text: str, *flags: str) -> object:
        config.write_text(text)
        return estimate_context_memory(model, [*UPSTREAM_CMD, *flags], env)

    full = ContextMemory(8192, 8 * row * 8192)
    for text in ("swa-full = false\n", "swa-full = no\n", "LLAMA_ARG_SWA_FULL = 0\n"):
        assert estimate(text, "-np", "1", "-c", "8192") == full, text
    windowed = ContextMemory(8192, row * 8192 + 7 * row * 1024)
    assert estimate("[foo]\nswa-full = true\n", "-np", "1", "-c", "8192") == windowed
    q8 = estimate("ctk = q8_0 ; the K cache\n", "-np", "1", "-c", "8192")
    assert q8 == estimate("", "-np", "1", "-c", "8192", "-ctk", "q8_0") != windowed
    assert estimate("ctx-size = 8000\nc = 3000\n", "-np", "1") == estimate(
        "", "-np", "1", "-c", "8000"
    )
    assert estimate("[*]\nc = 8000\n[default]\nc = 3000\n", "-np", "1") == estimate(
        "", "-np", "1", "-c", "3000"
    )
    assert estimate("np = 2\n[default]\nc = 3000\n") == estimate("", "-c", "3000")


def test_upstream_behind_a_wrapper_is_still_upstream(tmp_path: Path) -> None:
    # env, nice, taskset run llama-server as it is: its cache is the same, and an env
    # assignment is a variable of its environment.
    model = _model(tmp_path / "m.gguf")
    rest = ["-m", "{model_path}", "--port", "{port}"]
    declared = ContextMemory(131072, _llama3_kv_bytes(131072))
    for wrapper in (
        ["/usr/bin/env"],
        ["/usr/bin/nice", "-n", "5"],
        ["/usr/bin/taskset", "-c", "0"],
    ):
        assert estimate_context_memory(model, [*wrapper, "llama-server", *rest]) == declared
        assert estimate_context_memory(model, [*wrapper, UPSTREAM, *rest]) == declared
    with_env = ["/usr/bin/env", "LLAMA_ARG_CTX_SIZE=2048", UPSTREAM, *rest]
    assert estimate_context_memory(model, with_env) == ContextMemory(2048, _llama3_kv_bytes(2048))


def test_a_variable_set_by_env_behind_another_wrapper_counts(tmp_path: Path) -> None:
    # "nice env LLAMA_ARG_MMPROJ=... llama-server" has llama-server load the projector as
    # surely as "env LLAMA_ARG_MMPROJ=... llama-server" does (checked against the binary: it
    # tries to open the file), and an env's context counts there too.
    model = _model(tmp_path / "m.gguf")
    rest = ["-m", "{model_path}", "--port", "{port}"]
    for wrappers in (
        ["/usr/bin/nice", "env"],
        ["/usr/bin/taskset", "-c", "0", "/usr/bin/env", "-u", "TZ"],
        ["/usr/bin/env", "A=1", "/usr/bin/nice", "-n", "5", "env"],
    ):
        loads = [*wrappers, "LLAMA_ARG_MMPROJ=/models/projector.gguf", UPSTREAM, *rest]
        assert context_memory.unverified_weights(loads) == "LLAMA_ARG_MMPROJ", wrappers
        assert isinstance(estimate_context_memory(model, loads), Uncountable)
        sized = [*wrappers, "LLAMA_ARG_CTX_SIZE=2048", UPSTREAM, *rest]
        assert estimate_context_memory(model, sized) == ContextMemory(
            2048, _llama3_kv_bytes(2048)
        ), wrappers


def test_env_is_read_as_env_reads_its_words(tmp_path: Path) -> None:
    # env -S splits a string into assignments and even the command itself; -i and -u take
    # variables away; an assignment whose value ends in "llama-server" runs none. Each of
    # these once let a projector through, or counted a variable the runtime never got.
    model = _model(tmp_path / "m.gguf")
    rest = ["-m", "{model_path}", "--port", "{port}"]
    projector = "LLAMA_ARG_MMPROJ=/models/projector.gguf"
    env = "/usr/bin/env"
    for command, named in (
        ([env, "-S", f"A=1 {projector}", UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, f"-S{projector}", UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, "-iS", projector, UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, f"--split-string={projector}", UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, f"--split={projector}", UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, "-uTZ", "-S", projector, UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        ([env, "-S", f"{UPSTREAM} --mmproj /models/p.gguf", *rest], "--mmproj"),
        ([env, "-S", f"A=1 #{projector}", UPSTREAM, *rest], None),  # a comment
        ([env, "LLAMA_ARG_MMPROJ=/models/llama-server", UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        # Other wrappers that set variables: sudo, systemd-run -E, bwrap --setenv.
        (["/usr/bin/sudo", projector, UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        (["/usr/bin/systemd-run", "-E", projector, UPSTREAM, *rest], "LLAMA_ARG_MMPROJ"),
        (
            ["/usr/bin/bwrap", "--setenv", "LLAMA_ARG_MMPROJ", "/p", UPSTREAM, *rest],
            "LLAMA_ARG_MMPROJ",
        ),
    ):
        assert context_memory.unverified_weights(command) == named, command
        memory = estimate_context_memory(model, command)
        assert isinstance(memory, Uncountable if named else ContextMemory), command
    sized = [env, "-S", "LLAMA_ARG_CTX_SIZE=2048", UPSTREAM, *rest]
    assert estimate_context_memory(model, sized) == ContextMemory(2048, _llama3_kv_bytes(2048))
    # What env takes away, the runtime never gets.
    extra = {"LLAMA_ARG_MMPROJ": "/models/projector.gguf"}
    for wrappers in ([env, "-i"], [env, "-"], [env, "-u", "LLAMA_ARG_MMPROJ"]):
        command = [*wrappers, UPSTREAM, *rest]
        assert context_memory.unverified_weights(command, extra) is None, wrappers
    assert context_memory.unverified_weights([env, UPSTREAM, *rest], extra) == "LLAMA_ARG_MMPROJ"


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize(
    "wrappers",
    [
        ["/usr/bin/env", "-S", "A=1 LLAMA_ARG_MMPROJ={projector}"],
        ["/usr/bin/env", "--split-string=LLAMA_ARG_MMPROJ={projector}"],
        ["/usr/bin/env", "LLAMA_ARG_MMPROJ={projector}"],
    ],
    ids=["-S", "--split-string", "value-named-llama-server"],
)
def test_what_env_sets_is_what_llama_server_loads(tmp_path: Path, wrappers: list[str]) -> None:
    # The real env and the pinned build: llama-server tries to open the projector, and the
    # command is refused for it.
    binary = upstream_binary()
    assert binary is not None
    if not Path(wrappers[0]).is_file():
        pytest.skip("no /usr/bin/env")
    model = write_tiny_model(tmp_path / "tiny.gguf")
    projector = tmp_path / "missing" / "llama-server"
    filled = [word.format(projector=projector) for word in wrappers]
    template = [*filled, str(binary), "-m", "{model_path}", "--port", "{port}"]
    assert context_memory.unverified_weights(template) == "LLAMA_ARG_MMPROJ"
    command = [*filled, str(binary), "-m", str(model), "--port", str(free_port())]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    ran = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert ran.returncode != 0
    assert str(projector) in ran.stdout + ran.stderr


def test_the_launcher_s_name_as_a_value_of_llama_server_is_still_llama_server(
    tmp_path: Path,
) -> None:
    # The launcher's module name anywhere in the command made the words after it read as the
    # launcher's arguments: "llama-server --mmproj X --alias companion_runtime.bind.llama_server
    # -m {model_path}" passed, and llama-server loaded the unverified projector.
    model = _model(tmp_path / "m.gguf")
    alias = ["--alias", MODULE]
    rest = ["-m", "{model_path}", "--port", "{port}"]
    for command in (
        [UPSTREAM, "--mmproj", "/models/projector.gguf", *alias, *rest],
        [UPSTREAM, "-md", "/models/draft.gguf", "--alias", "-m" + MODULE, *rest],
        ["/usr/bin/nice", UPSTREAM, "--lora", "/models/adapter.gguf", *alias, *rest],
    ):
        assert context_memory.unverified_weights(command) is not None, command
        assert isinstance(estimate_context_memory(model, command), Uncountable), command
    declared = ContextMemory(131072, _llama3_kv_bytes(131072))
    assert estimate_context_memory(model, [UPSTREAM, *alias, *rest]) == declared
    # The launcher itself, however Python is told to run it, is still the launcher.
    for python in (["-P", "-m", MODULE], ["-Pm", MODULE], ["-Pm" + MODULE]):
        command = [sys.executable, *python, *rest]
        memory = estimate_context_memory(model, command)
        assert isinstance(memory, ContextMemory) and memory.context_tokens == 4096, python


def test_slots_with_a_cache_each_pad_their_share(tmp_path: Path) -> None:
    # Upstream without -np: 4 slots sharing one cache. With -np N each slot has a cache of its
    # own, its share of the context padded up to 256 tokens: -np 100 -c 1000 allocates 25,600
    # cells, not 1,024 (as llama-server logged it; 25 times the old estimate).
    model = _model(tmp_path / "m.gguf")

    def tokens(*arguments: str, command: list[str] | None = None, **env: str) -> int:
        memory = estimate_context_memory(model, [*(command or UPSTREAM_CMD), *arguments], env)
        assert isinstance(memory, ContextMemory)
        assert memory.bytes == _llama3_kv_bytes(memory.context_tokens)
        return memory.context_tokens

    assert tokens("-c", "1000") == 1024
    assert tokens("-np", "100", "-c", "1000") == 25600
    assert tokens("-np", "8", "-c", "100") == 2048
    assert tokens("--parallel", "3", "-c", "4096") == 4608
    assert tokens("-np", "3", "-c", "4096", "-kvu") == 4096  # one cache again
    assert tokens("-np", "3", "-c", "4096", LLAMA_ARG_KV_UNIFIED="on") == 4096
    assert tokens("-c", "4096", LLAMA_ARG_N_PARALLEL="3") == 4608
    assert tokens("-np", "-1", "-c", "1000") == 1024  # negative: the automatic choice
    # Without -c (or with -c 0), each slot's cache is the declared length: -np 4 is four
    # times what one shared cache would take (64 GiB here, where the old estimate said 16).
    assert tokens("-np", "4") == 4 * 131072
    assert tokens("-np", "2", "-c", "0") == 2 * 131072
    assert tokens("-np", "4", "--kv-unified") == 131072
    # --kv-unified-per-slot N without -c: slots x N (with -c 0 given, it counts for nothing).
    assert tokens("--kv-unified-per-slot", "5000", "-np", "2", "-c", "0") == 2 * 131072
    # -c 0 pins the context by setting --fit-ctx to UINT32_MAX, as -fitc -1 does; a later
    # -fitc undoes it (each as llama-server, build 11434, allocated it).
    assert tokens("--kv-unified-per-slot", "1000", "-fitc", "-1") == 131072
    assert tokens("-c", "0", "-fitc", "4096", "--kv-unified-per-slot", "1000") == 4096
    assert tokens("-fitc", "4096", "-c", "0", "--kv-unified-per-slot", "1000") == 131072
    assert tokens("--kv-unified-per-slot", "50000") == 200192
    assert tokens("--kv-unified-per-slot", "5000", "-np", "2") == 10240
    assert tokens("--kv-unified-per-slot", "5000", "-c", "1024") == 1024
    # The embedded launcher: --parallel slots (1 by default), a cache each.
    launcher = [*EMBEDDED[:4], "-m", "{model_path}", "--port", "{port}"]
    assert tokens(command=launcher) == 4096
    assert tokens("--parallel", "3", command=launcher) == 4608
    assert tokens("-np", "200", "-c", "1000", command=launcher) == 51200
    assert tokens("--parallel", "3", "-c", "0", command=launcher) == 3 * 131072


def test_the_launcher_reads_its_arguments_with_its_own_parser(tmp_path: Path) -> None:
    # argparse takes abbreviations and attached values: each of these is a 100,000-token
    # context for the launcher, which the old reading took for its 4,096-token default.
    model = _model(tmp_path / "m.gguf")
    launcher = [*EMBEDDED[:4], "-m", "{model_path}", "--port", "{port}"]
    for arguments in (
        ["-c100000"],
        ["--ctx", "100000"],
        ["--c", "100000"],
        ["--ctx-s=100000"],
        ["-c=100000"],
        ["-c", "4096", "--ctx", "100000"],
        ["-c", "1_00_000"],
    ):
        memory = estimate_context_memory(model, [*launcher, *arguments])
        assert memory == ContextMemory(100096, _llama3_kv_bytes(100096)), arguments
    # Python takes the module attached to -m too: it is the launcher all the same.
    for attached in ("-m" + MODULE, "-Pm" + MODULE):
        memory = estimate_context_memory(
            model, [EMBEDDED[0], attached, "-m", "{model_path}", "--port", "{port}", "-c", "0"]
        )
        assert memory == ContextMemory(131072, _llama3_kv_bytes(131072)), attached
    # Its arguments only: -c before the module is the interpreter's own business.
    assert estimate_context_memory(model, [EMBEDDED[0], "-c", "100", *EMBEDDED[1:4]]) is None
    # A command line the launcher refuses (no -m; an unknown option) starts nothing.
    assert estimate_context_memory(model, [*EMBEDDED[:4], "--port", "{port}"]) is None
    assert estimate_context_memory(model, [*launcher, "--ctx-size", "9", "--nope"]) is None


def test_what_cannot_be_counted_gives_no_estimate(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf")
    for command in (
        ["/usr/bin/ollama", "serve"],  # not llama.cpp's server: its memory is its own business
        ["/usr/bin/vllm", "-c", "4096"],
        [],
        [*UPSTREAM_CMD, "-c", "{context}"],
        [*UPSTREAM_CMD, "-c", "-5"],  # upstream aborts
        [*UPSTREAM_CMD, "-c"],
        [*UPSTREAM_CMD, "-c", "lots"],  # std::stoi throws: upstream exits
        [*UPSTREAM_CMD, "-c", "99999999999"],  # past an int: the same
        [*UPSTREAM_CMD, "-c", "9" * 5000],  # (and no ValueError from int() on the way)
        [*UPSTREAM_CMD, "-np", "-" + "9" * 5000],
        [*UPSTREAM_CMD, "-ctk", "q3_k"],
        [*UPSTREAM_CMD, "-ctk", "Q8_0"],  # the names are matched as they are
        [*UPSTREAM_CMD, "-np", "0"],
        [*EMBEDDED, "-c", "-5"],  # the launcher refuses both
        [*EMBEDDED, "--parallel", "0"],
    ):
        assert estimate_context_memory(model, command) is None, command
    assert estimate_context_memory(model, UPSTREAM_CMD, {"LLAMA_ARG_CTX_SIZE": "x"}) is None
    assert estimate_context_memory(model, UPSTREAM_CMD, {"LLAMA_ARG_KV_UNIFIED": "yes"}) is None


def test_a_negative_context_that_llama_cpp_runs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp takes -c as a uint32: -1 to -255 pad up to 0 and it refuses to start (no
    # estimate); -256 and below are contexts of 2^31 tokens or more, which it runs where the
    # memory does not grow with the context (a recurrent state, window layers): refused.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    env = {"HOME": str(tmp_path)}
    model = _model(tmp_path / "m.gguf")
    for context in ("-1", "-255"):
        assert estimate_context_memory(model, [*UPSTREAM_CMD, "-c", context], env) is None
    refused = Uncountable(
        "its context cannot be counted: llama.cpp takes a negative -c for 2^31 tokens or more"
    )
    for context in ("-256", "-1073741824", "-2147483648"):
        estimate = estimate_context_memory(model, [*UPSTREAM_CMD, "-c", context], env)
        assert estimate == refused, context
    variable = env | {"LLAMA_ARG_CTX_SIZE": "-1073741824"}
    assert estimate_context_memory(model, UPSTREAM_CMD, variable) == refused
    config = tmp_path / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("ctx-size = -4096\n")
    assert estimate_context_memory(model, UPSTREAM_CMD, env) == refused


def _recurrent_model(
    path: Path,
    architecture: str,
    *,
    layers: int = 4,
    embedding: int = 2048,
    heads: int | list[int] = 0,
    kv_heads: int | list[int] | None = None,
    feed_forward: int | list[int] | None = None,
    **keys: int,
) -> Path:
    """A GGUF header of a model with a recurrent state: ``keys`` are the architecture's own
    (``ssm.conv_kernel``... with ``.`` spelled ``__``)."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(layers)
    writer.add_context_length(1 << 20)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    if kv_heads is not None:
        writer.add_head_count_kv(kv_heads)
    if feed_forward is not None:
        writer.add_feed_forward_length(feed_forward)
    for name, value in keys.items():
        writer.add_uint32(f"{architecture}.{name.replace('__', '.')}", value)
    writer.add_token_list([b"a", b"b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_recurrent_models_state_is_counted_per_slot(tmp_path: Path) -> None:
    # Mamba-2.8B's shape: 64 layers, 2560 wide, an inner size of 5120, 16 states, a kernel of
    # 4. llama.cpp keeps per slot and per layer an R state of (4 - 1) × 5120 and an S state of
    # 16 × 5120 elements, in f32, whatever -c, -ctk or --kv-unified say; no KV cache at all.
    mamba = _recurrent_model(
        tmp_path / "mamba.gguf",
        "mamba",
        layers=64,
        embedding=2560,
        ssm__conv_kernel=4,
        ssm__inner_size=5120,
        ssm__state_size=16,
        ssm__time_step_rank=160,
    )
    assert read_attention_shape(mamba) == AttentionShape(
        context_length=1 << 20,
        kv_heads=(0,) * 64,
        key_length=0,
        value_length=0,
        architecture="mamba",
        recurrent_layers=64,
        recurrent_r=3 * 5120,
        recurrent_s=16 * 5120,
    )
    per_slot = 64 * (3 * 5120 + 16 * 5120) * 4  # 23.75 MiB
    for flags, slots in (
        ([], 4),  # upstream's automatic four slots
        (["-np", "1"], 1),
        (["-np", "3", "-c", "1000"], 3),
        (["-np", "2", "--kv-unified"], 2),
        (["-np", "2", "-ctk", "q8_0", "-ctv", "q4_0"], 2),
    ):
        memory = estimate_context_memory(mamba, [*UPSTREAM_CMD, *flags])
        assert isinstance(memory, ContextMemory), flags
        assert memory.bytes == memory.recurrent_bytes == slots * per_slot, flags
    launcher = estimate_context_memory(mamba, [*EMBEDDED, "--parallel", "3"])
    assert isinstance(launcher, ContextMemory) and launcher.recurrent_bytes == 3 * per_slot
    # Mamba-2 (and the hybrids built on it) has groups: R counts B and C for each.
    mamba2 = _recurrent_model(
        tmp_path / "mamba2.gguf",
        "mamba2",
        ssm__conv_kernel=4,
        ssm__inner_size=4096,
        ssm__state_size=128,
        ssm__group_count=8,
    )
    shape = read_attention_shape(mamba2)
    assert isinstance(shape, AttentionShape)
    assert (shape.recurrent_r, shape.recurrent_s) == (3 * (4096 + 2 * 8 * 128), 128 * 4096)


def test_rwkv_and_short_convolution_states_are_counted(tmp_path: Path) -> None:
    # RWKV: R is token_shift_count (2 unless the model says) rows of the embedding, S the WKV
    # state, embedding × head size. LFM2: R is l_cache - 1 rows of the embedding, no S.
    rwkv6 = _recurrent_model(tmp_path / "r6.gguf", "rwkv6", wkv__head_size=64)
    shape = read_attention_shape(rwkv6)
    assert isinstance(shape, AttentionShape) and shape.recurrent_layers == 4
    assert (shape.recurrent_r, shape.recurrent_s) == (2 * 2048, 2048 * 64)
    qwen = _recurrent_model(
        tmp_path / "rq.gguf", "rwkv6qwen2", wkv__head_size=64, token_shift_count=1
    )
    shape = read_attention_shape(qwen)
    assert isinstance(shape, AttentionShape)
    assert (shape.recurrent_r, shape.recurrent_s) == (2048, 2048 * 64)
    lfm2 = _recurrent_model(
        tmp_path / "lfm2.gguf",
        "lfm2",
        heads=32,
        kv_heads=[0, 8, 0, 8],
        shortconv__l_cache=3,
    )
    shape = read_attention_shape(lfm2)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (0, 8, 0, 8) and shape.recurrent_layers == 2
    assert (shape.recurrent_r, shape.recurrent_s) == (2 * 2048, 0)
    memory = estimate_context_memory(lfm2, [*UPSTREAM_CMD, "-np", "1", "-c", "256"])
    kv = 256 * 2 * 8 * 64 * 2 * 2  # two attention layers, K and V in f16
    assert memory == ContextMemory(256, kv + 2 * 2 * 2048 * 4, 2 * 2 * 2048 * 4)


def test_a_hybrid_counts_its_recurrent_layers_and_caches_its_attention_layers(
    tmp_path: Path,
) -> None:
    ssm = {"ssm__conv_kernel": 4, "ssm__inner_size": 4096, "ssm__state_size": 128}
    state = 3 * 4096 + 128 * 4096  # no groups
    # Jamba, Granite hybrids: a layer without KV heads is a Mamba layer.
    granite = _recurrent_model(
        tmp_path / "g.gguf", "granitehybrid", heads=32, kv_heads=[0, 0, 0, 8], **ssm
    )
    shape = read_attention_shape(granite)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (0, 0, 0, 8) and shape.recurrent_layers == 3
    memory = estimate_context_memory(granite, [*UPSTREAM_CMD, "-np", "2", "-c", "1024"])
    assert memory == ContextMemory(
        1024, 1024 * 8 * 64 * 2 * 2 + 2 * 3 * state * 4, 2 * 3 * state * 4
    )
    # Nemotron-H: a layer with neither KV heads nor a feed-forward network (an MLP layer has
    # one) is a Mamba layer.
    nemotron = _recurrent_model(
        tmp_path / "n.gguf",
        "nemotron_h",
        heads=32,
        kv_heads=[0, 0, 8, 0],
        feed_forward=[0, 8192, 0, 0],
        **ssm,
    )
    shape = read_attention_shape(nemotron)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (0, 0, 8, 0) and shape.recurrent_layers == 2
    # Qwen3-Next: every full_attention_interval-th layer (4 unless the model says) is
    # attention, the others recurrent; the KV cache holds the attention layers only, whatever
    # head_count_kv says for the others.
    qwen = _recurrent_model(tmp_path / "q.gguf", "qwen3next", layers=8, heads=16, kv_heads=2, **ssm)
    shape = read_attention_shape(qwen)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (0, 0, 0, 2, 0, 0, 0, 2) and shape.recurrent_layers == 6
    every_other = _recurrent_model(
        tmp_path / "q2.gguf",
        "qwen3next",
        layers=8,
        heads=16,
        kv_heads=2,
        full_attention_interval=2,
        **ssm,
    )
    shape = read_attention_shape(every_other)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (0, 2) * 4 and shape.recurrent_layers == 4
    # An explicit list of the recurrent layers, bools or numbers, over the interval; llama.cpp
    # reads it for these (a list it cannot map onto the layers is refused, below).
    for flags in ([True, True, False, False] * 2, [1, 1, 0, 0] * 2):
        listed = tmp_path / "listed.gguf"
        writer = gguf.GGUFWriter(listed, "qwen35")
        writer.add_block_count(8)
        writer.add_context_length(4096)
        writer.add_embedding_length(2048)
        writer.add_head_count(16)
        writer.add_head_count_kv(2)
        writer.add_array("qwen35.attention.recurrent_layers", flags)
        for name, value in ssm.items():
            writer.add_uint32(f"qwen35.{name.replace('__', '.')}", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        shape = read_attention_shape(listed)
        assert isinstance(shape, AttentionShape), flags
        assert shape.kv_heads == (0, 0, 2, 2) * 2 and shape.recurrent_layers == 4, flags
    # Falcon-H1: attention and an SSM side by side in every layer.
    falcon = _recurrent_model(tmp_path / "f.gguf", "falcon-h1", heads=16, kv_heads=2, **ssm)
    shape = read_attention_shape(falcon)
    assert isinstance(shape, AttentionShape)
    assert shape.kv_heads == (2,) * 4 and shape.recurrent_layers == 4


def test_a_recurrent_state_that_cannot_be_counted_is_refused(tmp_path: Path) -> None:
    # llama.cpp would load these and allocate a state this module does not size: refused, not
    # counted as nothing (before, a model without attention gave no estimate at all).
    ssm = {"ssm__conv_kernel": 4, "ssm__inner_size": 4096, "ssm__state_size": 128}
    for name, path in (
        ("ssm.inner_size", _recurrent_model(tmp_path / "a.gguf", "mamba", ssm__conv_kernel=4)),
        ("wkv.head_size", _recurrent_model(tmp_path / "b.gguf", "rwkv7")),
        ("shortconv.l_cache", _recurrent_model(tmp_path / "c.gguf", "lfm2", heads=8)),
        ("architecture", _recurrent_model(tmp_path / "d.gguf", "plamo2", **ssm)),
        ("architecture", _recurrent_model(tmp_path / "e.gguf", "kimi-linear", **ssm)),
        (
            "attention.recurrent_layers",
            _recurrent_model(tmp_path / "f.gguf", "qwen35", attention__recurrent_layers=1, **ssm),
        ),
        (
            "attention.recurrent_layers",
            _recurrent_model(tmp_path / "f2.gguf", "jamba", attention__recurrent_layers=1, **ssm),
        ),
        ("ple.conv_kernel", _recurrent_model(tmp_path / "g.gguf", "mamba2", ple__conv_kernel=4)),
        (
            "feed_forward_length",
            _recurrent_model(
                tmp_path / "h.gguf", "nemotron_h", heads=8, kv_heads=[0, 2, 0, 0], **ssm
            ),
        ),
    ):
        shape = read_attention_shape(path)
        assert isinstance(shape, Uncountable), name
        assert name in shape.what and shape.what.startswith("its recurrent state"), shape
        assert estimate_context_memory(path, UPSTREAM_CMD) == shape
    # Speculative decoding may keep copies of the state: not counted, so refused.
    mamba = _recurrent_model(tmp_path / "m.gguf", "mamba", **ssm)
    for command, env in (
        ([*UPSTREAM_CMD, "--spec-type", "draft-mtp"], {}),
        ([*UPSTREAM_CMD, "--spec-type", "none,ngram-mod"], {}),
        (UPSTREAM_CMD, {"LLAMA_ARG_SPEC_TYPE": "draft-eagle3"}),
    ):
        memory = estimate_context_memory(mamba, command, env)
        assert isinstance(memory, Uncountable) and "--spec-type" in memory.what, command
    assert isinstance(
        estimate_context_memory(mamba, [*UPSTREAM_CMD, "--spec-type", "none"]), ContextMemory
    )
    # A key the state is sized from, set by --override-kv, is not the header's.
    for override in ("mamba.ssm.state_size=int:4096", "x.y=int:1,mamba.token_shift_count=int:1"):
        memory = estimate_context_memory(mamba, [*UPSTREAM_CMD, "--override-kv", override])
        assert isinstance(memory, Uncountable) and "--override-kv" in memory.what, override
    other = estimate_context_memory(mamba, [*UPSTREAM_CMD, "--override-kv", "mamba.x=int:1"])
    assert isinstance(other, ContextMemory)
    # A model without a recurrent state is not concerned.
    plain = _model(tmp_path / "llama.gguf")
    memory = estimate_context_memory(plain, [*UPSTREAM_CMD, "--spec-type", "draft-mtp"])
    assert isinstance(memory, ContextMemory) and memory.recurrent_bytes == 0


def test_sliding_window_layers_are_counted_at_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Gemma 3 12B's shape: 48 layers, 8 KV heads of 256, a 1,024-token window in five layers
    # of every six. At 32,768 tokens the old estimate counted 12 GiB; llama.cpp allocates the
    # 8 full layers' 2 GiB and the 40 others' window, 1,024 + 512 (the physical batch) cells.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    model = tmp_path / "gemma3.gguf"
    writer = gguf.GGUFWriter(model, "gemma3")
    writer.add_block_count(48)
    writer.add_context_length(131072)
    writer.add_embedding_length(3840)
    writer.add_head_count(16)
    writer.add_head_count_kv(8)
    writer.add_key_length(256)
    writer.add_value_length(256)
    writer.add_sliding_window(1024)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    shape = read_attention_shape(model)
    assert isinstance(shape, AttentionShape) and shape.sliding_window == 1024
    assert shape.swa_layers == ((True,) * 5 + (False,)) * 8
    row = 8 * 256 * 2 * 2  # K and V, f16, per layer and token
    env = {"HOME": str(tmp_path)}

    def estimate(*flags: str, command: list[str] | None = None, **extra: str) -> object:
        return estimate_context_memory(model, [*(command or UPSTREAM_CMD), *flags], env | extra)

    assert estimate("-np", "1", "-c", "32768") == ContextMemory(
        32768, 8 * row * 32768 + 40 * row * 1536
    )
    # One stream per slot, each its window and a batch; four slots sharing one (upstream's
    # automatic choice) have four windows and a batch; a smaller physical batch, or a logical
    # one below it, makes it smaller; a context below the window caps it.
    assert estimate("-np", "3", "-c", "32768") == ContextMemory(
        3 * 11008, 8 * row * 3 * 11008 + 40 * row * 3 * 1536
    )
    assert estimate("-c", "32768") == ContextMemory(32768, 8 * row * 32768 + 40 * row * 4608)
    assert estimate("-np", "1", "-c", "32768", "-ub", "100") == ContextMemory(
        32768, 8 * row * 32768 + 40 * row * 1280
    )
    assert estimate("-np", "1", "-c", "32768", "--batch-size", "200") == ContextMemory(
        32768, 8 * row * 32768 + 40 * row * 1280
    )
    assert estimate("-np", "1", "-c", "1000") == ContextMemory(1024, 48 * row * 1024)
    # Counted at the full context: --swa-full (flag, variable, configuration key), speculative
    # decoding, the launcher (whose defaults this does not size), another architecture.
    full = ContextMemory(32768, 48 * row * 32768)
    assert estimate("-np", "1", "-c", "32768", "--swa-full") == full
    assert estimate("-np", "1", "-c", "32768", LLAMA_ARG_SWA_FULL="1") == full
    # The variable is on for 1, true, on, enabled and off for anything else, never an exit
    # (the pinned build: "yes" and "TRUE" are off).
    windowed = estimate("-np", "1", "-c", "32768")
    for value in ("true", "on", "enabled"):
        assert estimate("-np", "1", "-c", "32768", LLAMA_ARG_SWA_FULL=value) == full, value
    for value in ("yes", "TRUE", "0", "maybe"):
        assert estimate("-np", "1", "-c", "32768", LLAMA_ARG_SWA_FULL=value) == windowed, value
    assert estimate("-np", "1", "-c", "32768", "--spec-type", "ngram-mod") == full
    config = tmp_path / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("swa-full = true\n")
    assert estimate("-np", "1", "-c", "32768") == full
    config.unlink()
    launcher = estimate("-c", "32768", "--parallel", "1", command=EMBEDDED)
    assert launcher == full
    # A window (or a pattern) --override-kv sets is not the header's: the full context.
    for override in (
        "gemma3.attention.sliding_window=int:3000",
        "a.b=int:1,gemma3.attention.sliding_window_pattern=int:2",
    ):
        assert estimate("-np", "1", "-c", "32768", "--override-kv", override) == full, override
    assert (
        estimate("-np", "1", "-c", "32768", "--override-kv", "llama.attention.sliding_window=int:9")
        != full
    )
    # Gemma 2: a window in every other layer unless the model says.
    gemma2 = tmp_path / "gemma2.gguf"
    gemma2.write_bytes(model.read_bytes().replace(b"gemma3", b"gemma2"))
    shape = read_attention_shape(gemma2)
    assert isinstance(shape, AttentionShape) and shape.swa_layers == (True, False) * 24
    # Llama 4 (say): not sized here, every layer at the full context.
    llama4 = tmp_path / "llama4.gguf"
    llama4.write_bytes(model.read_bytes().replace(b"gemma3", b"llama4"))
    assert read_attention_shape(llama4) == AttentionShape(
        context_length=131072,
        kv_heads=(8,) * 48,
        key_length=256,
        value_length=256,
        architecture="llama4",
    )


def test_window_layers_with_heads_of_their_own_count_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # attention.key_length_swa and value_length_swa give the window layers heads of their own
    # length (llama.cpp reads them for every architecture): those layers are counted at them,
    # the others at key_length and value_length; where which layers are the window's is not
    # known, every layer at the larger of the two.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    env = {"HOME": str(tmp_path)}
    model = write_gemma(
        tmp_path / "gemma3.gguf",
        header={"gemma3.attention.key_length_swa": 128, "gemma3.attention.value_length_swa": 64},
    )
    shape = read_attention_shape(model)
    assert isinstance(shape, AttentionShape)
    assert (shape.key_length, shape.swa_key_length, shape.swa_value_length) == (32, 128, 64)
    # 8 layers of 2 KV heads, f16: the full layer (one in six) at 32 + 32 for 8,192 cells, the
    # seven window layers at 128 + 64 for 512 + 512 (the window and a batch).
    estimate = estimate_context_memory(model, [*UPSTREAM_CMD, "-np", "1", "-c", "8192"], env)
    full_row, window_row = 2 * (32 + 32) * 2, 2 * (128 + 64) * 2
    assert estimate == ContextMemory(8192, 1 * full_row * 8192 + 7 * window_row * 1024)
    swa_full = estimate_context_memory(
        model, [*UPSTREAM_CMD, "-np", "1", "-c", "8192", "--swa-full"], env
    )
    assert swa_full == ContextMemory(8192, (full_row + 7 * window_row) * 8192)
    # The launcher, a pattern set by --override-kv, another architecture: the larger lengths.
    larger = ContextMemory(8192, 8 * window_row * 8192)
    launcher = estimate_context_memory(model, [*EMBEDDED, "-c", "8192", "--parallel", "1"], env)
    assert launcher == larger
    pattern = "gemma3.attention.sliding_window_pattern=int:2"
    overridden = [*UPSTREAM_CMD, "-np", "1", "-c", "8192", "--override-kv", pattern]
    assert estimate_context_memory(model, overridden, env) == larger
    cohere = tmp_path / "cohere2.gguf"
    cohere.write_bytes(model.read_bytes().replace(b"gemma3", b"cohere"))
    assert estimate_context_memory(cohere, [*UPSTREAM_CMD, "-np", "1", "-c", "8192"], env) == larger
    # Shorter window heads than the others are counted so too; zero is the other lengths'.
    short = write_gemma(
        tmp_path / "short.gguf",
        header={"gemma3.attention.key_length_swa": 16, "gemma3.attention.value_length_swa": 0},
    )
    estimate = estimate_context_memory(short, [*UPSTREAM_CMD, "-np", "1", "-c", "8192"], env)
    assert estimate == ContextMemory(8192, full_row * 8192 + 7 * 2 * (16 + 32) * 2 * 1024)


def test_an_override_of_the_caches_shape_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp sizes the cache from what --override-kv sets (and checks the weights against
    # it), not from the header: an override of a key the shape comes from, of the
    # architecture (llama.cpp then reads another one's keys), or any override on a header
    # that lacks a key the estimate needs cannot be counted from the header, and is refused.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    env = {"HOME": str(tmp_path)}
    model = _model(tmp_path / "llama.gguf")
    base = [*UPSTREAM_CMD, "-c", "4096"]
    refused = Uncountable("its KV cache cannot be counted with --override-kv of its shape")
    for override in (
        "general.architecture=str:gemma3",
        "llama.block_count=int:64",
        "llama.embedding_length=int:8192",
        "llama.attention.head_count=int:8",
        "tokenizer.ggml.add_bos_token=bool:true,llama.attention.head_count_kv=int:32",
        "llama.attention.key_length=int:512",
        "llama.attention.value_length=int:512",
        "llama.attention.key_length_swa=int:512",
        "llama.attention.value_length_swa=int:512",
    ):
        estimate = estimate_context_memory(model, [*base, "--override-kv", override], env)
        assert estimate == refused, override
    config = tmp_path / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("override-kv = general.architecture=str:gemma3\n")
    assert estimate_context_memory(model, base, env) == refused
    config.unlink()
    # Other keys, another architecture's: counted from the header as before.
    for override in ("llama.rope.freq_base=float:1e6", "gemma3.attention.key_length=int:512"):
        estimate = estimate_context_memory(model, [*base, "--override-kv", override], env)
        assert estimate == ContextMemory(4096, _llama3_kv_bytes(4096)), override
    # A header without its block count: no estimate, unless an override may give it one.
    lacking = write_gemma(tmp_path / "lacking.gguf", header={"gemma3.block_count": None})
    assert estimate_context_memory(lacking, base, env) is None
    given = [*base, "--override-kv", "gemma3.block_count=int:8"]
    assert estimate_context_memory(lacking, given, env) == refused


def test_a_header_declaring_no_context_is_counted_at_the_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A context length of 0 in the header: llama.cpp refuses it only where the command gives
    # none either ("n_ctx and n_ctx_train cannot both be zero"); with -c it runs at that
    # context, which is counted, not taken for a header without an attention shape.
    monkeypatch.setattr(context_memory, "_SYSTEM_CONFIG", tmp_path / "none.ini")
    env = {"HOME": str(tmp_path)}
    model = _model(tmp_path / "llama.gguf", context=0)
    shape = read_attention_shape(model)
    assert isinstance(shape, AttentionShape) and shape.context_length == 0
    given = estimate_context_memory(model, [*UPSTREAM_CMD, "-c", "4096"], env)
    assert given == ContextMemory(4096, _llama3_kv_bytes(4096))
    for flags in ([], ["-c", "0"], ["-np", "2"], ["--override-kv", "llama.context_length=int:0"]):
        assert estimate_context_memory(model, [*UPSTREAM_CMD, *flags], env) is None, flags
    declared = ["--override-kv", "llama.context_length=int:1000"]
    assert estimate_context_memory(model, [*UPSTREAM_CMD, *declared], env) == ContextMemory(
        1024, _llama3_kv_bytes(1024)
    )


def test_a_corrupted_recurrent_or_window_header_never_raises(tmp_path: Path) -> None:
    # The new keys' values (counts, flags, lists) corrupted one byte at a time: a shape, a
    # refusal or no estimate, never an exception, and never in long.
    def header(path: Path, architecture: str) -> Path:
        writer = gguf.GGUFWriter(path, architecture)
        writer.add_block_count(4)
        writer.add_context_length(4096)
        writer.add_embedding_length(256)
        writer.add_head_count(4)
        writer.add_head_count_kv([0, 2, 0, 2])
        writer.add_feed_forward_length([0, 64, 0, 64])
        if architecture == "qwen35":
            writer.add_ssm_conv_kernel(4)
            writer.add_ssm_inner_size(512)
            writer.add_ssm_state_size(16)
            writer.add_ssm_group_count(2)
            writer.add_array("qwen35.attention.recurrent_layers", [True, False, True, False])
        writer.add_sliding_window(512)
        writer.add_sliding_window_pattern([True, False, True, False])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path

    qwen = header(tmp_path / "q.gguf", "qwen35")
    window = header(tmp_path / "g.gguf", "gemma3")
    for model in (qwen, window):
        data = model.read_bytes()
        assert isinstance(read_attention_shape(model), AttentionShape)
        flipped = tmp_path / "flipped.gguf"
        started = time.monotonic()
        for index in range(len(data)):
            for bits in (0x01, 0xFF):
                bad = bytearray(data)
                bad[index] ^= bits
                flipped.write_bytes(bytes(bad))
                shape = read_attention_shape(flipped)
                assert shape is None or isinstance(shape, AttentionShape | Uncountable)
                memory = estimate_context_memory(flipped, [*UPSTREAM_CMD, "-c", "4096"])
                assert memory is None or isinstance(memory, ContextMemory | Uncountable)
        assert time.monotonic() - started < 60


def test_a_block_count_past_llama_cpps_layers_gives_no_estimate(tmp_path: Path) -> None:
    # llama.cpp aborts on more than 512 layers (the pinned build, 513 here: GGML_ASSERT
    # n_layer <= LLAMA_MAX_LAYERS). The walk built a tuple per layer first: ten million layers
    # held 160 MB in the manager, two billion got it killed for lack of memory.
    model = tmp_path / "m.gguf"
    for layers, expected in ((512, True), (513, False), (10_000_000, False), (1 << 31, False)):
        model.write_bytes(_raw_header(_llama_pairs()))
        data = model.read_bytes().replace(
            b"llama.block_count" + struct.pack("<II", 4, 2),
            b"llama.block_count" + struct.pack("<II", 4, layers),
        )
        model.write_bytes(data)
        tracemalloc.start()
        try:
            shape = read_attention_shape(model)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(shape, AttentionShape) is expected, layers
        assert peak < 1 << 20, (layers, peak)
        assert (estimate_context_memory(model, UPSTREAM_CMD) is None) is not expected


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
def test_llama_cpp_refuses_more_than_512_layers(tmp_path: Path) -> None:
    binary = upstream_binary()
    assert binary is not None
    data = bytearray(write_tiny_model(tmp_path / "tiny.gguf").read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    data[at + 4 : at + 8] = (513).to_bytes(4, "little")
    model = tmp_path / "layers.gguf"
    model.write_bytes(bytes(data))
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "n_layer_all <= LLAMA_MAX_LAYERS" in done.stdout + done.stderr


def test_a_file_that_is_not_a_readable_gguf_model_gives_none(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf", vocabulary=300)
    data = model.read_bytes()
    for name, content in (
        ("empty", b""),
        ("text", b"not a model at all, just some text" * 10),
        ("zeros", bytes(4096)),
        ("version 1", data[:4] + (1).to_bytes(4, "little") + data[8:]),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        assert read_attention_shape(path) is None, name
    assert read_attention_shape(tmp_path / "missing.gguf") is None
    # A symbolic link is read through: the verifier and the runtime follow it too.
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    assert read_attention_shape(link) == read_attention_shape(model) is not None
    no_architecture = _model(tmp_path / "na.gguf", architecture=None)
    assert read_attention_shape(no_architecture) is None
    no_attention = _model(tmp_path / "ssm.gguf", heads=0, kv_heads=0)
    assert read_attention_shape(no_attention) is None
    wrong_layers = _model(tmp_path / "wl.gguf", layers=3, heads=[8, 8])
    assert read_attention_shape(wrong_layers) is None
    # A key twice (llama.cpp refuses the file): key_length renamed to head_count, same length.
    twice = _model(tmp_path / "twice.gguf", key_length=64)
    assert read_attention_shape(twice) is not None
    renamed = twice.read_bytes().replace(b"attention.key_length", b"attention.head_count")
    twice.write_bytes(renamed)
    assert read_attention_shape(twice) is None


def test_a_cut_or_corrupted_header_gives_none_and_never_raises(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.gguf", vocabulary=200)
    data = model.read_bytes()
    # The key-value section ends where the first tensor's name (its 8-byte length first) starts.
    header_end = data.index(b"token_embd.weight") - 8
    cut = tmp_path / "cut.gguf"
    for end in [*range(0, header_end, 7), header_end - 1]:
        cut.write_bytes(data[:end])
        assert read_attention_shape(cut) is None, end
    # The tensor infos follow (the repacked weights are counted from them): the one tensor's
    # name, two dimensions, its type and offset. A file cut among them is no model either.
    infos_end = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 16 + 4 + 8
    for end in range(header_end, infos_end, 5):
        cut.write_bytes(data[:end])
        assert read_attention_shape(cut) is None, end
    cut.write_bytes(data[:infos_end])
    assert read_attention_shape(cut) is not None
    # A string length far past the end of the file, and an array count of 2^63.
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key)  # value type (u32), item type (u32), count (u64)
    for offset, value in ((8, 1 << 63), (16, 1 << 62)):
        bad = bytearray(data)
        bad[at + offset : at + offset + 8] = value.to_bytes(8, "little")
        path = tmp_path / f"bad-{offset}.gguf"
        path.write_bytes(bytes(bad))
        started = time.monotonic()
        assert read_attention_shape(path) is None
        assert time.monotonic() - started < 1.0
    # Every single byte of the header flipped in turn: an answer or None, never an exception.
    flipped = tmp_path / "flipped.gguf"
    for index in range(0, header_end, 3):
        bad = bytearray(data)
        bad[index] ^= 0xFF
        flipped.write_bytes(bytes(bad))
        shape = read_attention_shape(flipped)
        assert shape is None or isinstance(shape, AttentionShape)


def _raw_header(pairs: list[bytes], count: int | None = None) -> bytes:
    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, len(pairs) if count is None else count)
        + b"".join(pairs)
    )


def _pair(key: bytes, value_type: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", value_type) + payload


def _llama_pairs() -> list[bytes]:
    def u32(key: str, value: int) -> bytes:
        return _pair(key.encode(), 4, struct.pack("<I", value))

    return [
        _pair(b"general.architecture", 8, struct.pack("<Q", 5) + b"llama"),
        u32("llama.block_count", 2),
        u32("llama.context_length", 1 << 20),
        u32("llama.embedding_length", 64),
        u32("llama.attention.head_count", 4),
    ]


def test_a_header_past_the_bounds_is_refused_not_counted_as_nothing(tmp_path: Path) -> None:
    # llama.cpp reads a header of any size, so a file whose header the walk gives up on must
    # not pass the fit check with no KV cache counted (it would allocate what it declares).
    path = tmp_path / "m.gguf"
    command = [*UPSTREAM_CMD, "--port", "{port}"]
    model = _llama_pairs()
    path.write_bytes(_raw_header(model))
    assert estimate_context_memory(path, command) == ContextMemory(1 << 20, (1 << 20) * 512)
    cases = {
        # 70,000 key-value pairs before the model's own (the walk takes 65,536).
        "pairs": [_pair(b"x.%d" % i, 0, b"\0") for i in range(70_000)],
        # A string array of 5 million empty strings (the walk takes 4 million elements).
        "elements": [_pair(b"x.s", 9, struct.pack("<IQ", 8, 5_000_000) + bytes(40_000_000))],
        # One 65 MiB string: the key-value section goes on past the 64 MiB read.
        "bytes": [_pair(b"x.big", 8, struct.pack("<Q", 65 << 20) + bytes(65 << 20))],
    }
    for name, padding in cases.items():
        path.write_bytes(_raw_header([*padding, *model]))
        started = time.monotonic()
        assert read_attention_shape(path) is UNCOUNTABLE, name
        assert estimate_context_memory(path, command) is UNCOUNTABLE, name
        assert time.monotonic() - started < 10, name
    # What llama.cpp refuses stays no estimate: an array of arrays (ggml has no such type),
    # a pair count the file cannot hold.
    nested = _pair(b"x.n", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))
    path.write_bytes(_raw_header([nested, *model]))
    assert read_attention_shape(path) is None
    path.write_bytes(_raw_header(model, count=1 << 40))
    assert read_attention_shape(path) is None


def test_the_walk_keeps_only_what_it_needs(tmp_path: Path) -> None:
    # 1,000 arrays of 4,096 distinct uint32 each (16 MiB of header): decoding them all, as
    # the walk once did, held about 140 MiB of Python ints in the manager for nothing.
    path = tmp_path / "m.gguf"
    rng = np.random.default_rng(0)
    crowd = [
        _pair(b"x.%d" % i, 9, struct.pack("<IQ", 4, 4096) + rng.bytes(4 * 4096))
        for i in range(1000)
    ]
    path.write_bytes(_raw_header([*crowd, *_llama_pairs()]))
    tracemalloc.start()
    try:
        shape = read_attention_shape(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(shape, AttentionShape) and shape.context_length == 1 << 20
    # The header read into memory (and joined once) is the walk's whole cost.
    assert peak < 3 * path.stat().st_size, peak


def test_a_large_vocabulary_is_read_quickly(tmp_path: Path) -> None:
    # A real vocabulary (152,000 tokens here) comes before nothing the estimate needs, but the
    # reader must walk past it: it must not cost what gguf.GGUFReader does (seconds).
    model = _model(tmp_path / "m.gguf", vocabulary=152_000)
    started = time.monotonic()
    assert read_attention_shape(model) is not None
    assert time.monotonic() - started < 2.0
    # Its header is several MiB, past the first read: one cut inside it is still no shape.
    data = model.read_bytes()
    assert len(data) > 3 << 20
    model.write_bytes(data[: 3 << 20])
    assert read_attention_shape(model) is None


def test_what_llama_cpp_holds_for_a_large_vocabulary_is_counted(tmp_path: Path) -> None:
    # llama.cpp keeps every token in the GGUF context, in its vocabulary's tables and maps and
    # in the text it prints of the header: the pinned build's peak RSS grew by 226 bytes for
    # each 6-byte token and 515 for each 40-byte one (and by 911 MiB for 4,190,000 tokens in a
    # 208 MB file, where the fit check had counted the file and 0.125 MiB of KV cache).
    command = [UPSTREAM, "-m", "{model_path}", "-c", "256", "-np", "1"]
    short = write_large_vocabulary(tmp_path / "short.gguf", tokens=200_000, token_length=6)
    long = write_large_vocabulary(tmp_path / "long.gguf", tokens=50_000, token_length=40)
    for model, tokens, per_token in ((short, 200_000, 226), (long, 50_000, 515)):
        estimate = estimate_context_memory(model, command)
        assert isinstance(estimate, ContextMemory)
        assert estimate.metadata_bytes >= tokens * per_token, (model.name, estimate)
        assert estimate.bytes == 2 * 4 * 16 * 2 * 2 * 256  # the KV cache alone, as before
        assert estimate.metadata_bytes == read_attention_shape(model).metadata_bytes  # type: ignore[union-attr]
    # An array llama.cpp only holds while it loads counts too (97 and 41 bytes an element).
    strings = write_large_vocabulary(tmp_path / "strings.gguf", strings=100_000)
    floats = write_large_vocabulary(tmp_path / "floats.gguf", floats=400_000)
    plain = write_large_vocabulary(tmp_path / "plain.gguf")
    baseline = estimate_context_memory(plain, command)
    assert isinstance(baseline, ContextMemory) and baseline.metadata_bytes < 1 * MIB
    for model, elements, per_element in ((strings, 100_000, 97), (floats, 400_000, 41)):
        estimate = estimate_context_memory(model, command)
        assert isinstance(estimate, ContextMemory)
        grown = estimate.metadata_bytes - baseline.metadata_bytes
        assert grown >= elements * per_element, (model.name, estimate)


def test_the_weights_the_cpu_backend_repacks_are_counted(tmp_path: Path) -> None:
    # On an AVX2 machine llama.cpp's CPU backend copies Q4_0, Q4_K and IQ4_NL matrices into a
    # buffer of its own after reading them through the memory map, whose pages stay resident:
    # a 144 MiB Q4_0 model held 311 MiB (176 MiB with --no-repack), counted as 144 MiB.
    model = write_quantized(tmp_path / "q4_0.gguf", layers=2)
    repacked = quantized_bytes(2) if context_memory._repack_rows() else 0

    def counted(*flags: str, environ: dict[str, str] | None = None) -> int:
        estimate = estimate_context_memory(model, [*UPSTREAM_CMD, *flags], environ)
        assert isinstance(estimate, ContextMemory)
        return estimate.repacked_bytes

    assert counted() == repacked > 0 or not context_memory._repack_rows()
    assert counted("-nr") == counted("--no-repack") == counted("--no_repack") == 0
    assert counted("-nr", "--repack") == repacked
    assert counted(environ={"LLAMA_ARG_REPACK": "0"}) == 0
    assert counted("--repack", environ={"LLAMA_ARG_REPACK": "off"}) == repacked
    assert counted(environ={"LLAMA_ARG_REPACK": "1"}) == repacked
    # Upstream's --load-mode none, mlock and dio read the file into buffers and map nothing:
    # the repacked matrices are read into the CPU backend's buffer instead, no copy beside.
    for mode in ("none", "mlock", "dio"):
        assert counted("--load-mode", mode) == counted("-lm", mode) == 0, mode
        assert counted(environ={"LLAMA_ARG_LOAD_MODE": mode}) == 0, mode
        assert counted("-lm", "mmap", environ={"LLAMA_ARG_LOAD_MODE": mode}) == repacked
    for mode in ("auto", "mmap", "mmap+mlock"):
        assert counted("--load-mode", mode) == repacked, mode
    assert counted("--load-mode", "none", "--load_mode", "auto") == repacked
    # A mode it does not know (they are case-sensitive) stops it: nothing to count.
    assert estimate_context_memory(model, [*UPSTREAM_CMD, "-lm", "NONE"]) is None
    # A configuration file's load-mode (or its variable's name) counts as well, below the flag.
    config = tmp_path / "home" / ".config" / "llama.cpp" / "config.ini"
    config.parent.mkdir(parents=True)
    home = {"HOME": str(tmp_path / "home")}
    for line in ("load-mode = none", "LLAMA_ARG_LOAD_MODE = mlock", "lm = dio"):
        config.write_text(line + "\n")
        assert counted(environ=home) == 0, line
        assert counted("-lm", "mmap", environ=home) == repacked, line
    config.write_text("load-mode = NONE\n")
    assert estimate_context_memory(model, UPSTREAM_CMD, home) is None
    # The launcher repacks too, with no switch for it.
    launcher = estimate_context_memory(model, EMBEDDED)
    assert isinstance(launcher, ContextMemory) and launcher.repacked_bytes == repacked
    # Types it does not repack, and the token embedding (only looked up), count nothing.
    q8 = write_quantized(
        tmp_path / "q8_0.gguf", layers=2, quantization=gguf.GGMLQuantizationType.Q8_0
    )
    estimate = estimate_context_memory(q8, UPSTREAM_CMD)
    assert isinstance(estimate, ContextMemory) and estimate.repacked_bytes == 0
    # A tensor info past the file, or with more than four dimensions, is no model to count.
    data = model.read_bytes()
    at = data.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:at] + struct.pack("<I", 5) + data[at + 4 :])
    assert read_attention_shape(broken) is None
    broken.write_bytes(data[:at])
    assert read_attention_shape(broken) is None


def test_a_token_embedding_tied_to_the_output_is_counted_as_repacked(tmp_path: Path) -> None:
    # Without an output matrix of its own, llama.cpp multiplies by the token embedding for the
    # logits: it loads it a second time for the output layer, and the CPU backend repacks that
    # one. A 55 MiB Q4_0 model with a 65,536-token tied embedding grew by 54 MiB with repacking
    # (18 MiB of layers, 36 MiB of the embedding), where 18 MiB were counted.
    tokens = 65_536 - 354  # rows in multiples of 8: repacked
    model = write_quantized(tmp_path / "tied.gguf", layers=2, tokens=tokens)
    estimate = estimate_context_memory(model, UPSTREAM_CMD)
    assert isinstance(estimate, ContextMemory)
    if not context_memory._repack_rows():
        assert estimate.repacked_bytes == 0
        return
    assert estimate.repacked_bytes == quantized_bytes(2) + embedding_bytes(tokens)
    # Rows the backend does not repack (354 + 3 tokens), or a type it does not: the layers only.
    odd = write_quantized(tmp_path / "odd.gguf", layers=2, tokens=3)
    estimate = estimate_context_memory(odd, UPSTREAM_CMD)
    assert isinstance(estimate, ContextMemory) and estimate.repacked_bytes == quantized_bytes(2)
    q8 = write_quantized(
        tmp_path / "q8.gguf", layers=2, tokens=tokens, quantization=gguf.GGMLQuantizationType.Q8_0
    )
    estimate = estimate_context_memory(q8, UPSTREAM_CMD)
    assert isinstance(estimate, ContextMemory) and estimate.repacked_bytes == 0


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_tied_embedding_s_repacked_copy_is_what_llama_cpp_holds(tmp_path: Path) -> None:
    binary = upstream_binary()
    assert binary is not None
    model = write_quantized(tmp_path / "tied.gguf", layers=2, tokens=65_536 - 354)
    flags = ["--port", "0", "-t", "1", "-c", "256", "-np", "1"]
    peaks = [
        _peak_rss([str(binary), "-m", str(model), *flags, *extra], tmp_path / f"{index}.log")
        for index, extra in enumerate(([], ["--no-repack"]))
    ]
    estimate = estimate_context_memory(model, [str(binary), "-m", "{model_path}", *flags])
    assert isinstance(estimate, ContextMemory)
    grown = peaks[0] - peaks[1]
    if not context_memory._repack_rows():
        assert estimate.repacked_bytes == 0 and grown < 8 * MIB
        return
    assert grown <= estimate.repacked_bytes <= 1.2 * grown, (grown, estimate.repacked_bytes)


def test_tensor_infos_past_the_bounds_are_refused_and_a_corrupted_count_is_no_model(
    tmp_path: Path,
) -> None:
    pairs = _llama_pairs()
    path = tmp_path / "m.gguf"
    for tensors, expected in ((70_000, UNCOUNTABLE), (1 << 63, None)):
        header = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(pairs)) + b"".join(pairs)
        # Room in the file for 70,000 infos of 24 bytes: more than the walk goes through.
        path.write_bytes(header + bytes(24 * 70_000))
        started = time.monotonic()
        assert read_attention_shape(path) is expected, tensors
        assert time.monotonic() - started < 1.0


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_the_repacked_weights_are_what_llama_cpp_holds(tmp_path: Path) -> None:
    binary = upstream_binary()
    assert binary is not None
    model = write_quantized(tmp_path / "q4_0.gguf", layers=8)
    flags = ["--port", "0", "-t", "1", "-c", "256", "-np", "1"]
    peaks = [
        _peak_rss([str(binary), "-m", str(model), *flags, *extra], tmp_path / f"{index}.log")
        for index, extra in enumerate(([], ["--no-repack"]))
    ]
    estimate = estimate_context_memory(model, [str(binary), "-m", "{model_path}", *flags])
    assert isinstance(estimate, ContextMemory)
    grown = peaks[0] - peaks[1]
    if not context_memory._repack_rows():
        assert estimate.repacked_bytes == 0 and grown < 8 * MIB
        return
    # Never less than the copy llama.cpp keeps; about the matrices' own bytes.
    assert grown <= estimate.repacked_bytes <= 1.2 * grown, (grown, estimate.repacked_bytes)


def _peak_rss(command: list[str], log: Path) -> int:
    """Run llama.cpp's server until it listens (it has loaded the model and made its context
    by then); return its peak resident set size in bytes (``VmHWM``)."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "listening on" in log.read_text(errors="replace"):
                status = Path(f"/proc/{process.pid}/status").read_text()
                [kib] = re.findall(r"VmHWM:\s+(\d+) kB", status)
                return int(kib) * 1024
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(log.read_text(errors="replace")[-2000:])
    finally:
        process.kill()
        process.wait()


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
@pytest.mark.parametrize(
    "contents",
    [
        {"tokens": 1_000_000},
        {"tokens": 200_000, "token_length": 40},
        {"strings": 500_000, "string_length": 40},
        {"floats": 4_000_000},
    ],
    ids=["tokens", "long-tokens", "strings", "floats"],
)
def test_the_metadata_estimate_covers_what_llama_cpp_holds(
    tmp_path: Path, contents: dict[str, int]
) -> None:
    binary = upstream_binary()
    assert binary is not None
    plain = write_large_vocabulary(tmp_path / "plain.gguf")
    model = write_large_vocabulary(tmp_path / "large.gguf", **contents)
    flags = ["--port", "0", "-t", "1", "-c", "256", "-np", "1"]
    template = [str(binary), "-m", "{model_path}", *flags]
    peaks = [
        _peak_rss([str(binary), "-m", str(path), *flags], tmp_path / f"{path.stem}.log")
        for path in (plain, model)
    ]
    estimates = [estimate_context_memory(path, template) for path in (plain, model)]
    assert all(isinstance(estimate, ContextMemory) for estimate in estimates)
    counted = estimates[1].metadata_bytes - estimates[0].metadata_bytes  # type: ignore[union-attr]
    grown = peaks[1] - peaks[0]
    # Never less than llama.cpp takes; not so much more that a model that fits is refused.
    assert grown <= counted <= 2 * grown, (grown, counted)


def _logged_kv_cache(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[int, float]:
    """Run llama.cpp's server until it logs its KV cache; return (context, MiB) from the log:
    the context in all (``n_ctx``, every slot's cache together), and the cache's size."""
    size = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")
    context = re.compile(r"llama_context: n_ctx += (\d+)")
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            found, tokens = size.search(text), context.search(text)
            if found and tokens:
                return int(tokens.group(1)), float(found.group(1))
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(log.read_text(errors="replace")[-2000:])
    finally:
        process.kill()
        process.wait()


#: Command lines whose KV cache the estimate must match, each read as the runtime reads it.
_UPSTREAM_FLAGS = [
    ["-c", "100"],
    ["-c", "4096"],
    ["-c", "0"],
    [],
    ["-np", "3", "-c", "4096"],
    ["-np", "100", "-c", "1000"],
    ["-c", "100", "--ctx_size", "8192"],
    ["--alias", "--ctx-size=512"],
    ["-c", "0x10"],
    ["-c", "8192abc"],
    ["--override-kv", "llama.context_length=int:30000"],
    ["--kv-unified-per-slot", "3000", "-np", "2"],
    ["-np", "3"],
    ["-np", "2", "-c", "0", "--kv-unified-per-slot", "3000"],
    ["-c", "1000", "-ctk", "bf16", "--cache_type_v", "f32"],
]
_LAUNCHER_FLAGS = [
    [],
    ["--parallel", "3"],
    ["-c30000"],
    ["--ctx", "30000", "--parallel", "2"],
    ["-np", "100", "-c", "1000"],
    ["--parallel", "3", "-c", "0"],
]


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize("flags", _UPSTREAM_FLAGS, ids=" ".join)
def test_the_estimate_is_what_llama_cpp_allocates(tmp_path: Path, flags: list[str]) -> None:
    binary = upstream_binary()
    assert binary is not None
    # The tiny model, declaring 20,000 tokens: -c 0 (and no -c) is then not 2,048.
    model = declaring_context(write_tiny_model(tmp_path / "tiny.gguf"), 20_000, tmp_path)
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    tokens, mib = _logged_kv_cache(command, tmp_path / "server.log")
    assert estimate.context_tokens == tokens
    assert abs(estimate.bytes / MIB - mib) < 0.006, (estimate, mib)


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize(
    "config",
    [
        "c = 50000\n",
        "np = 3\n[*]\nctx-size = 4096\n[other]\nc = 99999\n",
        # A switch's value other than on/1/enabled/true is off, never an error.
        "np = 3\nc = 1000\nkv-unified = YES\n",
        "np = 3\nc = 1000\nno-kv-unified = maybe\n",
    ],
)
def test_the_estimate_counts_upstreams_configuration_file(tmp_path: Path, config: str) -> None:
    binary = upstream_binary()
    assert binary is not None
    model = declaring_context(write_tiny_model(tmp_path / "tiny.gguf"), 20_000, tmp_path)
    home = tmp_path / "home"
    (home / ".config" / "llama.cpp").mkdir(parents=True)
    (home / ".config" / "llama.cpp" / "config.ini").write_text(config)
    template = [str(binary), "-m", "{model_path}", "--port", "{port}"]
    estimate = estimate_context_memory(model, template, {"HOME": str(home)})
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    tokens, mib = _logged_kv_cache(command, tmp_path / "server.log", env)
    assert estimate.context_tokens == tokens
    assert abs(estimate.bytes / MIB - mib) < 0.006, (estimate, mib)


#: Configuration files as upstream reads them: --swa-full on whatever its value; a ";" or "#"
#: starts a comment anywhere; [default] is the global keys' section, and wins over [*];
#: within a section the keys count in sorted order (ctx-size over c over LLAMA_ARG_CTX_SIZE,
#: no-kv-unified over kv-unified), the last of one key's lines; a section's header starts it
#: anew ("[default]" drops the global keys before it).
_GEMMA_CONFIGS = [
    "swa-full = false\n",
    "LLAMA_ARG_SWA_FULL = 0\n",
    "[default]\nswa-full = true\n",
    "[DEFAULT]\nswa-full = true\n",
    "[foo]\nswa-full = true\n",
    "ctk = q8_0 ; a comment\n",
    "ctk = q8_0#a comment\n",
    "np = 2\nno-kv-unified = true;a comment\n",
    "np = 2\nno-kv-unified = true\nkv-unified = true\n",
    "np = 2\n[*]\nkv-unified = true\n[default]\nno-kvu = true\n",
    "[*]\nctx-size = 8000\n[default]\nc = 3000\n",
    "[default]\nc = 3000\n[*]\nctx-size = 8000\n",
    "ctx-size = 8000\nc = 3000\n",
    "LLAMA_ARG_CTX_SIZE = 8000\nc = 3000\n",
    "c = 3000\nc = 8000\n",
    "np = 2\n[default]\nc = 3000\n",
    "[*]\nnp = 2\n[default]\nc = 3000\n",
]


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize("config", _GEMMA_CONFIGS)
def test_a_configuration_file_is_read_as_llama_cpp_reads_it(tmp_path: Path, config: str) -> None:
    # "swa-full = false" had the estimate count the window layers at the window where
    # llama.cpp keeps them at the full context (16 MiB, not 3.75); a cache type followed by a
    # comment gave no estimate at all; "no-kv-unified = true;..." was read as a shared cache.
    binary = upstream_binary()
    assert binary is not None
    model = write_gemma(tmp_path / "gemma3.gguf")
    home = tmp_path / "home"
    (home / ".config" / "llama.cpp").mkdir(parents=True)
    (home / ".config" / "llama.cpp" / "config.ini").write_text(config)
    flags = [] if "np" in config else ["-np", "1"]
    flags += [] if re.search("^(c|ctx-size|LLAMA_ARG_CTX_SIZE) =", config, re.M) else ["-c", "8192"]
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template, {"HOME": str(home)})
    assert isinstance(estimate, ContextMemory), estimate
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    with (tmp_path / "server.log").open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        sizes = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = sizes.findall((tmp_path / "server.log").read_text(errors="replace"))
            if len(found) >= 2 or process.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    assert len(found) >= 2, (tmp_path / "server.log").read_text(errors="replace")[-2000:]
    full, window = float(found[0]), float(found[1])
    assert abs(estimate.bytes / MIB - (full + window)) < 0.011, (estimate, full, window)


@pytest.mark.integration
@pytest.mark.skipif(not llama_available(), reason="xllamacpp is not installed")
@pytest.mark.parametrize("flags", _LAUNCHER_FLAGS, ids=" ".join)
def test_the_estimate_is_what_the_launcher_allocates(tmp_path: Path, flags: list[str]) -> None:
    model = declaring_context(write_tiny_model(tmp_path / "tiny.gguf"), 20_000, tmp_path)
    launcher = [sys.executable, "-P", "-m", MODULE]
    template = [*launcher, "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [*launcher, "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    tokens, mib = _logged_kv_cache(command, tmp_path / "server.log")
    assert estimate.context_tokens == tokens
    assert abs(estimate.bytes / MIB - mib) < 0.006, (estimate, mib)


def _logged_recurrent_state(
    command: list[str], log: Path, *, with_kv_cache: bool
) -> tuple[float, float, float]:
    """Run llama.cpp's server until it logs its recurrent state (and its KV cache, for a
    hybrid); return the R state, the S state and the KV cache (0 without one), in MiB."""
    state = re.compile(
        r"llama_memory_recurrent: size = +[0-9.]+ MiB \( *(\d+) cells.*?"
        r"R \(f32\): +([0-9.]+) MiB, S \(f32\): +([0-9.]+) MiB"
    )
    size = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            found, cache = state.search(text), size.search(text)
            if found and (cache or not with_kv_cache):
                return (
                    float(found.group(2)),
                    float(found.group(3)),
                    float(cache.group(1)) if cache else 0.0,
                )
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(log.read_text(errors="replace")[-2000:])
    finally:
        process.kill()
        process.wait()


_RECURRENT_WRITERS = {
    "mamba": write_mamba,
    "rwkv6": write_rwkv6,
    "rwkv7": write_rwkv7,
    "granitehybrid": write_granite_hybrid,
    "lfm2": write_lfm2,
    "qwen3next": write_qwen3next,
    # Every other layer attention, by the interval; then by an explicit list (bools, or
    # numbers), which llama.cpp reads over the interval.
    "qwen3next-interval-2": lambda path: write_qwen3next(path, layers=6, interval=2),
    "qwen3next-listed": lambda path: write_qwen3next(
        path, interval=2, recurrent_layers=[True, False, True, True]
    ),
    "qwen35-listed": lambda path: write_qwen3next(
        path, architecture="qwen35", recurrent_layers=[False, True, False, True]
    ),
    # Mamba-2 layers beside attention and feed-forward layers (an MLP layer has no state).
    "nemotron_h": lambda path: write_mamba2_hybrid(path, "nemotron_h", layers="MAMFM"),
    # A Mamba-2 mixer beside attention in every layer: every layer has both.
    "falcon-h1": lambda path: write_mamba2_hybrid(path, "falcon-h1", layers="XXX"),
    "jamba": write_jamba,
    "mamba2": lambda path: write_mamba2_hybrid(path, "mamba2", layers="MMM"),
}
_RECURRENT_FLAGS = [
    [],
    ["-np", "1"],
    ["-np", "3", "-c", "1000"],
    ["-np", "2", "-kvu"],
    ["-np", "5", "--no-kv-unified", "-ctk", "q8_0"],
]


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize("flags", _RECURRENT_FLAGS, ids=" ".join)
@pytest.mark.parametrize("architecture", sorted(_RECURRENT_WRITERS))
def test_the_recurrent_state_is_what_llama_cpp_allocates(
    tmp_path: Path, architecture: str, flags: list[str]
) -> None:
    # Mamba and RWKV-6 models (every layer recurrent, no KV cache), a Granite hybrid (three
    # Mamba-2 layers, one attention layer), an LFM2 model (three short-convolution layers, with
    # an R state and no S, one attention layer), Qwen3-Next and Qwen3.5 models (attention
    # layers by the interval or a list): the estimate's recurrent state is the R and S state
    # the real server logs, and its KV cache the one it logs for the attention layers.
    binary = upstream_binary()
    assert binary is not None
    model = _RECURRENT_WRITERS[architecture](tmp_path / f"{architecture}.gguf")
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    hybrid = architecture not in ("mamba", "mamba2", "rwkv6", "rwkv7")
    r_mib, s_mib, kv_mib = _logged_recurrent_state(
        command, tmp_path / "server.log", with_kv_cache=hybrid
    )
    assert r_mib > 0 and (s_mib > 0) == (architecture != "lfm2") and (kv_mib > 0) == hybrid
    # All of it counts: the KV cache alone (or, for Mamba, no estimate at all) fell short.
    assert abs(estimate.bytes / MIB - (r_mib + s_mib + kv_mib)) < 0.016, (estimate, kv_mib)
    assert abs(estimate.recurrent_bytes / MIB - (r_mib + s_mib)) < 0.011, (estimate, r_mib, s_mib)
    assert abs((estimate.bytes - estimate.recurrent_bytes) / MIB - kv_mib) < 0.006, estimate


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
def test_a_negative_context_is_not_undercounted(tmp_path: Path) -> None:
    # -c -1073741824 is a context of 3 × 2^30 tokens to llama.cpp: a Mamba model, whose
    # state does not grow with it, runs, and allocates its state for 8 slots (1.57 MiB here),
    # which the estimate, taking the command for one upstream refuses, did not count.
    binary = upstream_binary()
    assert binary is not None
    model = write_mamba(tmp_path / "mamba.gguf")
    flags = ["-np", "8", "-c", "-1073741824"]
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    r_mib, s_mib, _kv = _logged_recurrent_state(
        command, tmp_path / "server.log", with_kv_cache=False
    )
    assert r_mib + s_mib > 1
    assert isinstance(estimate, Uncountable), estimate


@pytest.mark.integration
@pytest.mark.skipif(not llama_available(), reason="xllamacpp is not installed")
@pytest.mark.parametrize("flags", [[], ["--parallel", "3", "-c", "1000"]], ids=" ".join)
@pytest.mark.parametrize("architecture", sorted(_RECURRENT_WRITERS))
def test_the_recurrent_state_is_what_the_launcher_allocates(
    tmp_path: Path, architecture: str, flags: list[str]
) -> None:
    # The embedded launcher's llama.cpp keeps the same state, a cell per --parallel slot.
    model = _RECURRENT_WRITERS[architecture](tmp_path / f"{architecture}.gguf")
    launcher = [sys.executable, "-P", "-m", MODULE]
    template = [*launcher, "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [*launcher, "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    hybrid = architecture not in ("mamba", "mamba2", "rwkv6", "rwkv7")
    r_mib, s_mib, kv_mib = _logged_recurrent_state(
        command, tmp_path / "server.log", with_kv_cache=hybrid
    )
    assert abs(estimate.bytes / MIB - (r_mib + s_mib + kv_mib)) < 0.016, (estimate, kv_mib)
    assert abs(estimate.recurrent_bytes / MIB - (r_mib + s_mib)) < 0.011, (estimate, r_mib, s_mib)


def _logged_kv_caches(command: list[str], log: Path, caches: int) -> list[float]:
    """Run llama.cpp's server until it logs ``caches`` KV caches (2 for a model with
    sliding-window layers: the full one, then the window's); return their sizes in MiB."""
    size = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [float(mib) for mib in size.findall(log.read_text(errors="replace"))]
            if len(found) >= caches:
                return found
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(log.read_text(errors="replace")[-2000:])
    finally:
        process.kill()
        process.wait()


_SLIDING_FLAGS = [
    ["-np", "1", "-c", "8192"],
    ["-np", "3", "-c", "8192"],
    [],
    ["-np", "2", "-kvu", "-c", "8192"],
    ["-np", "1", "-c", "8192", "-ub", "100"],
    ["-np", "1", "-c", "8192", "-b", "300"],
    ["-np", "1", "-c", "700"],
    ["-np", "1", "-c", "8192", "--swa-full"],
    ["-np", "2", "-c", "8192", "-ctk", "q8_0"],
]


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize("flags", _SLIDING_FLAGS, ids=" ".join)
@pytest.mark.parametrize(
    "pattern", [None, 3, [True, False, False] + [True] * 5], ids=["default", "third", "listed"]
)
@pytest.mark.parametrize("architecture", ["gemma3", "gemma2", "gpt-oss"])
def test_sliding_window_layers_are_what_llama_cpp_allocates(
    tmp_path: Path, flags: list[str], pattern: int | list[bool] | None, architecture: str
) -> None:
    # Gemma 3, Gemma 2 and gpt-oss models with a 512-token (gpt-oss: 128) window in many
    # layers (five in six, or every other, unless the model says): llama.cpp keeps those
    # layers' cache at the window (times the slots sharing it) plus a batch, not the context.
    # The estimate, which counted them at the full context (up to five times too much here),
    # is the two caches the server logs.
    binary = upstream_binary()
    assert binary is not None
    path = tmp_path / f"{architecture}.gguf"
    if architecture == "gpt-oss":
        model = write_gpt_oss(path, pattern=pattern)
    else:
        model = write_gemma(path, architecture, pattern=pattern)
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    full, window = _logged_kv_caches(command, tmp_path / "server.log", 2)[:2]
    assert abs(estimate.bytes / MIB - (full + window)) < 0.011, (estimate, full, window)


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize(
    "flags",
    [["-np", "1", "-c", "8192"], ["-np", "2", "-kvu", "-c", "8192"], ["--swa-full", "-c", "4096"]],
    ids=" ".join,
)
@pytest.mark.parametrize("architecture", ["gemma3", "gemma2"])
def test_window_heads_of_their_own_are_what_llama_cpp_allocates(
    tmp_path: Path, flags: list[str], architecture: str
) -> None:
    # Window layers whose heads are 128 long where the header's key_length says 32: llama.cpp
    # sizes their cache at attention.key_length_swa (8 MiB for one slot here, not 2). (The
    # pinned build loads such a model only with every layer a window one.)
    binary = upstream_binary()
    assert binary is not None
    model = write_gemma(
        tmp_path / f"{architecture}.gguf",
        architecture,
        pattern=[True] * 8,
        swa_head_length=128,
        header={
            f"{architecture}.attention.key_length_swa": 128,
            f"{architecture}.attention.value_length_swa": 128,
        },
    )
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    full, window = _logged_kv_caches(command, tmp_path / "server.log", 2)[:2]
    assert window > 4
    assert abs(estimate.bytes / MIB - (full + window)) < 0.011, (estimate, full, window)


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize(
    "override",
    ["gemma3.attention.sliding_window=int:3000", "gemma3.attention.sliding_window_pattern=int:2"],
)
def test_a_window_set_by_override_kv_is_not_undercounted(tmp_path: Path, override: str) -> None:
    # llama.cpp sizes the window cache from the override (a window of 3,000 tokens, or every
    # other layer full: 8.1 and 9 MiB here), not from the header (3.75 MiB): those layers are
    # counted at the full context, never below what it allocates.
    binary = upstream_binary()
    assert binary is not None
    model = write_gemma(tmp_path / "gemma3.gguf")
    flags = ["-np", "1", "-c", "8192", "--override-kv", override]
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    full, window = _logged_kv_caches(command, tmp_path / "server.log", 2)[:2]
    assert full + window > 3.76
    assert estimate.bytes / MIB >= full + window


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
def test_a_header_declaring_no_context_is_what_llama_cpp_allocates(tmp_path: Path) -> None:
    # gemma3.context_length 0 and -c 8192: llama.cpp allocates 3.75 MiB; the estimate, which
    # took the header for one without an attention shape, counted nothing.
    binary = upstream_binary()
    assert binary is not None
    model = write_gemma(tmp_path / "gemma3.gguf", header={"gemma3.context_length": 0})
    flags = ["-np", "1", "-c", "8192"]
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    full, window = _logged_kv_caches(command, tmp_path / "server.log", 2)[:2]
    assert isinstance(estimate, ContextMemory), estimate
    assert abs(estimate.bytes / MIB - (full + window)) < 0.011, (estimate, full, window)


#: Models whose header declares a smaller cache than their weights, and the --override-kv that
#: has llama.cpp load them at the weights' size.
_SHAPE_OVERRIDES = {
    "architecture": (
        {
            "general.architecture": "llama",
            **{f"llama.{key}": 1 for key in ("block_count", "attention.head_count")},
            **{f"llama.attention.{key}": 1 for key in ("head_count_kv", "key_length")},
            "llama.attention.value_length": 1,
            "llama.context_length": 256,
            "llama.embedding_length": 128,
        },
        None,
        "general.architecture=str:gemma3",
    ),
    "key_length": (
        {"gemma3.attention.key_length": 8, "gemma3.attention.value_length": 8},
        None,
        "gemma3.attention.key_length=int:32,gemma3.attention.value_length=int:32",
    ),
    "key_length_swa": (
        {},
        128,
        "gemma3.attention.key_length_swa=int:128,gemma3.attention.value_length_swa=int:128",
    ),
    "no_block_count": ({"gemma3.block_count": None}, None, "gemma3.block_count=int:8"),
}


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
@pytest.mark.parametrize("case", sorted(_SHAPE_OVERRIDES))
def test_a_shape_set_by_override_kv_is_not_undercounted(tmp_path: Path, case: str) -> None:
    # The header says a cache of 1 to 2 MiB (or none at all), the weights and the override a
    # cache of 3.75 to 8 MiB, which llama.cpp allocates: the estimate must not count the
    # header's.
    binary = upstream_binary()
    assert binary is not None
    header, swa_head_length, override = _SHAPE_OVERRIDES[case]
    model = write_gemma(
        tmp_path / "gemma3.gguf",
        pattern=[True] * 8 if swa_head_length else None,
        swa_head_length=swa_head_length,
        header=header,
    )
    flags = ["-np", "1", "-c", "8192", "--override-kv", override]
    template = [str(binary), "-m", "{model_path}", "--port", "{port}", *flags]
    estimate = estimate_context_memory(model, template)
    command = [str(binary), "-m", str(model), "--port", str(free_port()), "-lv", "4", *flags]
    full, window = _logged_kv_caches(command, tmp_path / "server.log", 2)[:2]
    assert full + window >= 3.75
    assert isinstance(estimate, Uncountable) or estimate.bytes / MIB >= full + window, estimate


#: Upstream options whose value names a file, directory or URL that holds no weights.
_NOT_WEIGHTS = frozenset(
    """
    --log-file --grammar-file -jf --json-schema-file -lcs --lookup-cache-static -lcd
    --lookup-cache-dynamic --video-ffmpeg-dir --path --ui-config-file --webui-config-file
    --mcp-servers-config --api-key-file --ssl-key-file --ssl-cert-file --slot-save-path
    --media-path --chat-template-file --log-prompts-dir -hff --hf-file
    """.split()
)
_HELP_OPTION = re.compile(r"((?:-[\w.-]+,\s*)*-[\w.-]+)(?: (\S+(?: \S+)*?))?(?:\s{2,}|$)")


@pytest.mark.integration
@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
def test_every_upstream_option_that_loads_weights_is_known() -> None:
    # Read the real binary's --help: every option whose value is a file, a URL or a model
    # repository either loads weights (refused) or is known to hold none; every option whose
    # description says it can download weights is refused; every name the refusal lists is
    # one the binary has, with the variable it reads. A newer build's new option fails here
    # until it is placed.
    binary = upstream_binary()
    assert binary is not None
    shown = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # name: (names, metavar, variable, whether its description says it downloads weights)
    options: dict[str, tuple[list[str], str, str, bool]] = {}
    lines = shown.splitlines()
    for index, line in enumerate(lines):
        found = _HELP_OPTION.match(line)
        if not line.startswith("-") or found is None:
            continue
        names = [name.strip() for name in found.group(1).split(",")]
        described = itertools.takewhile(lambda more: not more.startswith("-"), lines[index + 1 :])
        following = "\n".join([line, *described])
        variable = re.search(r"\(env: (LLAMA_ARG_\w+)\)", following)
        downloads = "download weights" in " ".join(following.split())
        entry = (names, found.group(2) or "", variable.group(1) if variable else "", downloads)
        options.update(dict.fromkeys(names, entry))
    # The parse found the options (the build has over 400 names, 11 presets that download).
    assert len(options) > 400 and sum(entry[3] for entry in options.values()) >= 11
    weights = context_memory._UPSTREAM_OTHER_WEIGHTS
    file_like = re.compile(r"FNAME|FILE|PATH|URL|<model>|DIR")
    for name, (names, metavar, variable, downloads) in options.items():
        if file_like.search(metavar) and name not in ("-m", "--model"):
            assert (name in weights) != (name in _NOT_WEIGHTS), (names, metavar)
        if downloads:
            assert name in weights, names
        if name in weights and variable:
            assert variable in weights, (names, variable)
    for name in weights:
        assert name in options or name in {entry[2] for entry in options.values()}, name
