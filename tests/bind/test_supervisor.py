"""The supervisor against the real llama.cpp server (tiny model) and, for faults it cannot
show on demand, the stand-in runtime. Every runtime here is a real child process."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import httpx
import psutil
import pytest
from rich.console import Console

from companion_runtime.bind.admission import AdmissionRefused
from companion_runtime.bind.context_memory import ContextMemory, estimate_context_memory
from companion_runtime.bind.filehash import verify_file
from companion_runtime.bind.health import HealthPolicy
from companion_runtime.bind.manifest import (
    LimitsSpec,
    Manifest,
    ModelSpec,
    RuntimeSpec,
    SourcesSpec,
)
from companion_runtime.bind.probe import MachineHeadroom, NvmlGpuMemory, listens_below
from companion_runtime.bind.process import ProcessError, SubprocessLauncher, build_launch_spec
from companion_runtime.bind.status import status_table
from companion_runtime.bind.supervisor import (
    Supervisor,
    SupervisorConfig,
    check_fit,
    check_model_fit,
    check_runtime_command,
    describe_exit,
)
from companion_runtime.core import (
    ALLOW,
    LifecycleState,
    Reason,
    SpecError,
    Verdict,
    create_resource_limits,
)
from tests.support.llama import declaring_context, upstream_binary
from tests.support.nvml import fake_nvml
from tests.support.quantized import cpu_backend_repacks, quantized_bytes, write_quantized
from tests.support.supervision import (
    async_wait_for,
    big_zero_blob,
    hashing,
    llama_ready,
    process_gone,
    real_runtime,
    sparse_scratch_dir,
    standin_command,
)
from tests.support.vocabulary import write_large_vocabulary

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

MIB = 1024 * 1024
GIB = 1024 * MIB
LIMITS = create_resource_limits(max_ram_bytes=8 * GIB, max_vram_bytes=8 * GIB, max_cpu_percent=100)
HEALTH = HealthPolicy(
    interval_s=0.05, probe_timeout_s=0.5, failure_threshold=3, ready_interval_s=0.05
)
needs_llama = pytest.mark.skipif(not llama_ready(), reason="embedded llama.cpp not available")


def _blob(directory: Path, data: bytes = b"stand-in model " * 256) -> tuple[Path, str, int]:
    path = directory / "model.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def _config(
    template: list[str], model: Path, digest: str, size: int, **fields: Any
) -> SupervisorConfig:
    settings: dict[str, Any] = {
        "resource_limits": LIMITS,
        "health": HEALTH,
        "ready_timeout_s": 60.0,
        "sample_interval_s": 0.1,
        "overhead_bytes": 0,
        "stop_grace_s": 5.0,
        "kill_grace_s": 2.0,
        "restart_backoff_s": 0.1,
    }
    settings.update(fields)
    return SupervisorConfig(
        command_template=tuple(template),
        model_path=model,
        expected_digest=digest,
        expected_size_bytes=size,
        **settings,
    )


def standin(tmp_path: Path, *flags: str, **fields: Any) -> Supervisor:
    model, digest, size = _blob(tmp_path)
    return Supervisor(_config(standin_command(*flags), model, digest, size, **fields))


def real(tmp_path: Path, **fields: Any) -> Supervisor:
    template, model = real_runtime(tmp_path)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return Supervisor(_config(template, model, digest, len(data), **fields))


def _state(supervisor: Supervisor) -> LifecycleState:
    return supervisor.lifecycle.state


async def _admitted(supervisor: Supervisor) -> Reason:
    """Ask the controller for a slot and give it straight back; the reason it answered."""
    try:
        async with supervisor.controller.slot(deadline=time.monotonic() + 1):
            return Reason.OK
    except AdmissionRefused as refusal:
        return refusal.reason


def _moves(supervisor: Supervisor) -> list[str]:
    moves = supervisor.status()["recent_moves"]
    assert isinstance(moves, list)
    return [move["state"] for move in moves]


# --- the real server ---------------------------------------------------------------------


@needs_llama
async def test_the_real_runtime_starts_serves_and_stops(tmp_path: Path) -> None:
    async with real(tmp_path) as supervisor:
        assert _state(supervisor) is LifecycleState.STOPPED
        assert await _admitted(supervisor) is Reason.NOT_READY
        verdict = await supervisor.start()
        assert verdict.ok, verdict
        assert _state(supervisor) is LifecycleState.READY
        status = supervisor.status()
        pid = status["pid"]
        assert isinstance(pid, int) and not process_gone(pid)
        assert status["state"] == "ready"
        latency = status["ready_latency_s"]
        assert isinstance(latency, float) and 0 <= latency < 0.1
        assert status["last_sample"] is not None
        assert supervisor.runtime_url is not None
        key = supervisor.runtime_authorization
        assert key is not None and key.startswith(b"Bearer ")
        async with (
            supervisor.controller.slot(deadline=time.monotonic() + 5),
            httpx.AsyncClient(base_url=supervisor.runtime_url, timeout=30) as client,
        ):
            assert (await client.get("/health")).status_code == 200
            # The runtime's port is no way around the front door: without the key, refused.
            request = {"prompt": "a", "n_predict": 4}
            assert (await client.post("/completion", json=request)).status_code == 401
            completion = await client.post(
                "/completion", json=request, headers={"authorization": key.decode()}
            )
            assert completion.status_code == 200
            assert "content" in completion.json()
        assert supervisor.status()["completed_total"] == 1
        await supervisor.stop()
        assert _state(supervisor) is LifecycleState.STOPPED
        assert supervisor.runtime_url is None
        assert process_gone(pid)
        assert _moves(supervisor) == ["starting", "ready", "draining", "stopped"]
        assert supervisor.status()["last_reason"] == "ok"


@needs_llama
async def test_a_crash_while_ready_leaves_ready_within_one_health_interval(tmp_path: Path) -> None:
    interval = 0.5
    policy = HealthPolicy(
        interval_s=0.05, probe_timeout_s=0.5, failure_threshold=3, ready_interval_s=interval
    )
    async with real(tmp_path, health=policy, max_restarts=0) as supervisor:
        assert (await supervisor.start()).ok
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert await async_wait_for(lambda: _state(supervisor) is not LifecycleState.READY, 5)
        assert time.monotonic() - killed < interval
        assert await _admitted(supervisor) is Reason.NOT_READY
        assert await async_wait_for(lambda: supervisor.status()["pid"] is None, 5)
        assert supervisor.status()["last_reason"] == "restart_limit_reached"


@needs_llama
async def test_stop_drains_in_flight_requests_before_stopping_the_process(tmp_path: Path) -> None:
    async with real(tmp_path) as supervisor:
        assert (await supervisor.start()).ok
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        release = asyncio.Event()
        entered = asyncio.Event()

        async def in_flight() -> None:
            async with supervisor.controller.slot():
                entered.set()
                await release.wait()

        holder = asyncio.create_task(in_flight())
        await entered.wait()
        stopping = asyncio.create_task(supervisor.stop(grace_s=10))
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.DRAINING, 2)
        assert await _admitted(supervisor) is Reason.NOT_READY
        await asyncio.sleep(0.3)
        assert not stopping.done() and not process_gone(pid)  # waiting for the request
        release.set()
        started = time.monotonic()
        await asyncio.wait_for(stopping, 10)
        await holder
        assert time.monotonic() - started < 2
        assert _state(supervisor) is LifecycleState.STOPPED
        assert process_gone(pid)


@needs_llama
async def test_built_from_a_manifest_with_the_real_runtime(tmp_path: Path) -> None:
    template, model = real_runtime(tmp_path)
    data = model.read_bytes()
    manifest = Manifest(
        model=ModelSpec(
            name="tiny",
            url="https://models.example.com/tiny.gguf",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(command=tuple(template), health_path="/health", ready_timeout_s=60),
        limits=LimitsSpec(max_in_flight=2, queue_bound=4),
    )
    assert (await check_model_fit(manifest)).ok
    async with Supervisor.from_manifest(manifest, model, health=HEALTH) as supervisor:
        assert (await supervisor.start()).ok
        statistics = supervisor.controller.statistics()
        assert (statistics.max_in_flight, statistics.queue_bound) == (2, 4)
    assert _state(supervisor) is LifecycleState.STOPPED


@needs_llama
@pytest.mark.security
async def test_the_runtime_key_is_in_a_private_file_never_in_argv_and_gone_after(
    tmp_path: Path,
) -> None:
    async with real(tmp_path) as supervisor:
        assert (await supervisor.start()).ok
        key = supervisor.runtime_authorization
        assert key is not None
        secret = key.removeprefix(b"Bearer ").decode()
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        argv = psutil.Process(pid).cmdline()
        key_file = Path(argv[argv.index("--api-key-file") + 1])
        assert secret not in " ".join(argv)  # other local users can read argv, not the file
        assert key_file.read_text().strip() == secret
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
        assert secret not in json.dumps(supervisor.status(), default=str)
    assert not key_file.exists() and not key_file.parent.exists()


@pytest.mark.security
async def test_each_run_of_the_runtime_demands_a_key_of_its_own(tmp_path: Path) -> None:
    # The key reaches whatever accepts the front door's connections to the runtime's port,
    # which anyone may take once the runtime has died. A key that leaked there must not open
    # the runtime the supervisor starts next, on a port anyone can read in its argv.
    async with standin(tmp_path, "--api-key-file", "{api_key_file}") as supervisor:
        assert (await supervisor.start()).ok
        first_key, first_url = supervisor.runtime_authorization, supervisor.runtime_url
        assert first_key is not None and first_url is not None
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        key_file = Path(runtime.cmdline()[-1])
        runtime.kill()
        assert await async_wait_for(
            lambda: (
                _state(supervisor) is LifecycleState.READY
                and supervisor.runtime_url not in (None, first_url)
            ),
            30,
        )
        second_key, second_url = supervisor.runtime_authorization, supervisor.runtime_url
        assert second_key is not None and second_url is not None
        assert second_key != first_key
        # The first run's key file went with it; the second run has one of its own.
        assert not key_file.exists() and not key_file.parent.exists()
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        key_file = Path(runtime.cmdline()[-1])
        assert key_file.read_text().strip() == second_key.removeprefix(b"Bearer ").decode()
        async with httpx.AsyncClient(base_url=second_url, timeout=5) as client:
            stale = await client.get("/pid", headers={"authorization": first_key.decode()})
            assert stale.status_code == 401
            fresh = await client.get("/pid", headers={"authorization": second_key.decode()})
            assert fresh.status_code == 200
    assert not key_file.exists() and not key_file.parent.exists()


def test_a_template_asking_for_a_key_file_needs_one() -> None:
    template = [sys.executable, "--port", "{port}", "--api-key-file", "{api_key_file}"]
    with pytest.raises(ProcessError) as refused:
        build_launch_spec(template, model_path="m")
    assert refused.value.reason is Reason.MALFORMED_SPEC
    spec = build_launch_spec(template, model_path="m", api_key_file="/private/key")
    assert spec.argv[-2:] == ("--api-key-file", "/private/key")


# --- the model and the command are checked before anything runs -----------------------------


@pytest.mark.data_integrity
async def test_a_tampered_blob_is_never_started_on(tmp_path: Path) -> None:
    supervisor = standin(tmp_path)
    model = supervisor.config.model_path
    data = bytearray(model.read_bytes())
    data[100] ^= 0x01  # same size, one bit flipped
    model.write_bytes(bytes(data))
    async with supervisor:
        verdict = await supervisor.start()
        assert verdict.reason is Reason.DIGEST_MISMATCH
        model.write_bytes(bytes(data[:-1]))
        assert (await supervisor.start()).reason is Reason.SIZE_MISMATCH
        model.unlink()
        assert (await supervisor.start()).reason is Reason.FILE_NOT_FOUND
        assert supervisor.status()["spawns"] == 0
        assert _moves(supervisor) == []


@pytest.mark.data_integrity
async def test_size_only_policy_is_an_explicit_opt_in(tmp_path: Path) -> None:
    model, digest, size = _blob(tmp_path)
    model.write_bytes(b"X" * size)  # same size, other bytes
    full = Supervisor(_config(standin_command(), model, digest, size))
    size_only = Supervisor(
        _config(standin_command(), model, digest, size, verify_policy="size_only")
    )
    async with full:
        assert (await full.start()).reason is Reason.DIGEST_MISMATCH
    async with size_only:
        assert (await size_only.start()).ok


@pytest.mark.data_integrity
async def test_a_blob_tampered_after_start_is_not_restarted_on(tmp_path: Path) -> None:
    async with standin(tmp_path, max_restarts=3) as supervisor:
        assert (await supervisor.start()).ok
        model = supervisor.config.model_path
        model.write_bytes(b"tampered" + model.read_bytes()[8:])
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post("/crash")
        assert await async_wait_for(
            lambda: supervisor.status()["last_reason"] == "digest_mismatch", 5
        )
        assert _state(supervisor) is LifecycleState.STOPPED
        assert supervisor.status()["spawns"] == 1


@pytest.mark.data_integrity
async def test_a_cancelled_start_stops_the_re_verify_at_once_and_keeps_the_blob(
    tmp_path: Path,
) -> None:
    # What serve does on a signal before ready: cancel the start. The hash runs in a worker
    # thread; one left running keeps the process from exiting until the whole blob is read.
    with (
        sparse_scratch_dir(tmp_path) as scratch,
        big_zero_blob(scratch / "model.bin") as (digest, size),
    ):
        model = scratch / "model.bin"
        async with Supervisor(_config(standin_command(), model, digest, size)) as supervisor:
            starting = asyncio.create_task(supervisor.start())
            await asyncio.sleep(0.5)  # the hash takes seconds
            assert hashing() and not starting.done()
            cancelled_at = time.monotonic()
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
            ended_after = time.monotonic() - cancelled_at
            assert not hashing(), "the hash ran on behind the cancelled start"
            assert ended_after < 1.5
            # Cut short, not failed: no refusal recorded, nothing spawned, the blob intact.
            assert supervisor.status()["last_reason"] == "ok"
            assert supervisor.status()["spawns"] == 0
        assert model.stat().st_size == size
        assert verify_file(model, expected_digest=digest, expected_size_bytes=size).ok


@pytest.mark.parametrize("during", ["the first start", "a restart"])
async def test_a_stop_during_the_re_verify_ends_it_at_once(tmp_path: Path, during: str) -> None:
    # A re-verify of a multi-GB blob takes seconds: a stop must not wait for it to finish.
    slow_call = 1 if during == "the first start" else 2
    calls = 0
    verifying = asyncio.Event()

    async def verifier(_path: Path) -> Verdict:
        nonlocal calls
        calls += 1
        if calls == slow_call:
            verifying.set()
            await asyncio.sleep(20)
        return ALLOW

    model, digest, size = _blob(tmp_path)
    config = _config(
        standin_command("--exit-after-s", "1.0"),
        model,
        digest,
        size,
        max_restarts=3,
        restart_backoff_s=0.05,
    )
    async with Supervisor(config, verifier=verifier) as supervisor:
        starting = asyncio.create_task(supervisor.start())
        if during == "a restart":
            assert (await starting).ok
        await asyncio.wait_for(verifying.wait(), 10)
        stopped_at = time.monotonic()
        await asyncio.wait_for(supervisor.stop(), 5)
        if during == "the first start":
            assert (await asyncio.wait_for(starting, 5)).reason is Reason.NOT_READY
        assert time.monotonic() - stopped_at < 1
        # A stop asked for is not the supervisor giving up on the runtime.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(supervisor.wait_given_up(), 0.3)
        assert supervisor.status()["spawns"] == slow_call - 1


async def test_a_model_that_cannot_fit_is_refused_before_spawning(tmp_path: Path) -> None:
    small = create_resource_limits(max_ram_bytes=1 * MIB, max_vram_bytes=1, max_cpu_percent=100)
    supervisor = standin(tmp_path, resource_limits=small, overhead_bytes=2 * MIB)
    async with supervisor:
        assert (await supervisor.check_fit()).reason is Reason.MODEL_TOO_LARGE
        assert (await supervisor.start()).reason is Reason.MODEL_TOO_LARGE
        assert supervisor.status()["spawns"] == 0
    # Before any download: from the manifest's declared size alone, against real headroom.
    huge = Manifest(
        model=ModelSpec(
            name="huge",
            url="https://models.example.com/huge.gguf",
            sha256="0" * 64,
            size_bytes=10**15,
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(command=(sys.executable, "{port}")),
        limits=LimitsSpec(max_ram_bytes=2**60),
    )
    assert (await check_model_fit(huge)).reason is Reason.MODEL_TOO_LARGE
    headroom = MachineHeadroom(
        available_ram_bytes=4 * GIB, available_vram_bytes=0, gpu_present=False
    )
    assert check_fit(model_size_bytes=3 * GIB, headroom=headroom, resource_limits=LIMITS).ok


@needs_llama
async def test_a_context_whose_kv_cache_cannot_fit_is_refused_before_spawning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The tiny model declaring 2^21 tokens: with -c 0 the runtime would allocate 2 GiB of KV
    # cache (2 slots with a cache each, of the declared length; 2 layers x 4 KV heads x 16 x
    # 2 (K, V) x 2 bytes per token) as it loads, under a 512 MiB ceiling that the model's
    # 429 KB alone fits with room to spare.
    template, tiny = real_runtime(tmp_path)
    model = declaring_context(tiny, 2**21, tmp_path)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    limits = create_resource_limits(max_ram_bytes=512 * MIB, max_vram_bytes=1, max_cpu_percent=100)
    at = template.index("-c")
    template[at + 1] = "0"
    whole = Supervisor(_config(template, model, digest, len(data), resource_limits=limits))
    async with whole:
        assert (await whole.check_fit()).ok  # the size alone fits
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await whole.start()).reason is Reason.MODEL_TOO_LARGE
        status = whole.status()
        assert status["spawns"] == 0
        counted = estimate_context_memory(model, template)
        assert isinstance(counted, ContextMemory)
        assert status["context"] == {
            "tokens": 2**22,
            "kv_cache_bytes": 2 << 30,
            "recurrent_state_bytes": 0,
            "metadata_bytes": counted.metadata_bytes,
            "repacked_weights_bytes": counted.repacked_bytes,
        }
    [said] = [record.getMessage() for record in caplog.records]
    assert "2,048 MiB of KV cache for a 4194304-token context" in said
    assert str(tmp_path) not in said and digest not in said
    # The same model with the template's own small context starts, and says what it counted.
    template[at + 1] = "256"
    small = Supervisor(_config(template, model, digest, len(data), resource_limits=limits))
    async with small:
        assert (await small.start()).ok
        # Two slots, a cache each, each its 128 tokens padded to 256: 512 cells in all. The
        # metadata and the repacked weights the fit check counted beside the cache show too
        # (the weights stay in RAM here: no GPU offload).
        counted = estimate_context_memory(model, template)
        assert isinstance(counted, ContextMemory) and counted.metadata_bytes > 0
        assert small.status()["context"] == {
            "tokens": 512,
            "kv_cache_bytes": 512 * 512,
            "recurrent_state_bytes": 0,
            "metadata_bytes": counted.metadata_bytes,
            "repacked_weights_bytes": counted.repacked_bytes,
        }
        # companion-runtime status shows them in its table.
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(status_table(small.status()))
        shown = console.export_text()
        rows = {
            line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in shown.splitlines()
            if line.count("│") == 3
        }
        assert rows["context.metadata_bytes"] == str(counted.metadata_bytes)
        assert rows["context.repacked_weights_bytes"] == str(counted.repacked_bytes)
        await small.stop()


async def test_a_recurrent_state_that_cannot_fit_is_refused_before_spawning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Mamba-2.8B header (64 layers, an inner size of 5120, 16 states, a kernel of 4): per
    # slot llama.cpp allocates 64 x (3 + 16) x 5120 f32, 23.75 MiB, whatever the context. 32
    # slots are 760 MiB under a 512 MiB ceiling that the file alone fits. The check once
    # counted nothing for it (no attention, no estimate) and spawned the runtime.
    template, _tiny = real_runtime(tmp_path)
    template[template.index("--parallel") + 1] = "32"
    model = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(model, "mamba")
    writer.add_block_count(64)
    writer.add_context_length(2**20)
    writer.add_embedding_length(2560)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(4)
    writer.add_ssm_inner_size(5120)
    writer.add_ssm_state_size(16)
    writer.add_ssm_time_step_rank(160)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    limits = create_resource_limits(max_ram_bytes=512 * MIB, max_vram_bytes=1, max_cpu_percent=100)
    supervisor = Supervisor(_config(template, model, digest, len(data), resource_limits=limits))
    state = 32 * 64 * (3 + 16) * 5120 * 4
    async with supervisor:
        assert (await supervisor.check_fit()).ok  # the size alone fits
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await supervisor.start()).reason is Reason.MODEL_TOO_LARGE
        status = supervisor.status()
        assert status["spawns"] == 0
        counted = estimate_context_memory(model, template)
        assert isinstance(counted, ContextMemory)
        assert status["context"] == {
            "tokens": 32 * 256,
            "kv_cache_bytes": 0,
            "recurrent_state_bytes": state,
            "metadata_bytes": counted.metadata_bytes,
            "repacked_weights_bytes": counted.repacked_bytes,
        }
    [said] = [record.getMessage() for record in caplog.records]
    assert "of weights, 760 MiB of recurrent state" in said and "fewer slots (-np)" in said
    assert str(tmp_path) not in said and digest not in said


async def test_a_vocabulary_that_cannot_fit_is_refused_before_spawning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 400,000 tokens of 6 bytes in a 13 MB file: llama.cpp holds about 226 bytes for each as it
    # loads them (86 MiB), before any sample sees it. The check counted the file and the KV
    # cache only, and spawned the runtime under a ceiling 32 MiB above them.
    template, _tiny = real_runtime(tmp_path)
    model = write_large_vocabulary(tmp_path / "vocabulary.gguf", tokens=400_000)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    ceiling = len(data) + estimate.bytes + 32 * MIB
    limits = create_resource_limits(max_ram_bytes=ceiling, max_vram_bytes=1, max_cpu_percent=100)
    supervisor = Supervisor(_config(template, model, digest, len(data), resource_limits=limits))
    async with supervisor:
        assert (await supervisor.check_fit()).ok  # the size alone fits
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await supervisor.start()).reason is Reason.MODEL_TOO_LARGE
        assert supervisor.status()["spawns"] == 0
    assert estimate.metadata_bytes > 400_000 * 226
    [said] = [record.getMessage() for record in caplog.records]
    # The runtime's share names what the metadata takes, beside the allowance (0 here).
    assert f"and {estimate.metadata_bytes / MIB:,.0f} MiB for the runtime" in said
    assert str(tmp_path) not in said and digest not in said


async def test_weights_the_cpu_backend_repacks_are_counted_before_spawning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 72 MiB Q4_0 model: llama.cpp's CPU backend (also the launcher's) keeps a repacked copy
    # of its matrices beside the mapped file, whose pages stay resident. Under a ceiling 16 MiB
    # above the file, its KV cache and its metadata, the check had started the runtime.
    template, _tiny = real_runtime(tmp_path)
    model = write_quantized(tmp_path / "q4_0.gguf", layers=8)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    ceiling = len(data) + estimate.bytes + estimate.metadata_bytes + 16 * MIB
    limits = create_resource_limits(max_ram_bytes=ceiling, max_vram_bytes=1, max_cpu_percent=100)
    supervisor = Supervisor(_config(template, model, digest, len(data), resource_limits=limits))
    if not cpu_backend_repacks():
        pytest.skip("the CPU backend repacks nothing on this machine")
    async with supervisor:
        assert (await supervisor.check_fit()).ok  # the size alone fits
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await supervisor.start()).reason is Reason.MODEL_TOO_LARGE
        assert supervisor.status()["spawns"] == 0
    assert estimate.repacked_bytes == quantized_bytes(8)
    # The refusal's line names the copy and what turns it off, apart from the runtime's share
    # (it had been folded into that, beside the advice of a smaller context).
    [said] = [record.getMessage() for record in caplog.records]
    assert f"{estimate.repacked_bytes / MIB:,.0f} MiB of them again as the CPU backend" in said
    assert "--no-repack or --load-mode none" in said
    assert estimate.metadata_bytes < MIB  # the runtime's share: the metadata alone
    assert f"and {estimate.metadata_bytes / 1024:,.0f} KiB for the runtime" in said
    assert str(tmp_path) not in said and digest not in said


@pytest.mark.skipif(upstream_binary() is None, reason="no upstream llama-server built")
async def test_weights_read_without_the_memory_map_are_counted_once(tmp_path: Path) -> None:
    # A 144 MiB Q4_0 model under upstream's --load-mode none: llama.cpp reads the file into
    # its buffers, the repacked matrices straight into the CPU backend's, and maps nothing
    # (measured: 460 MiB resident for a 360 MiB model with or without --no-repack, 810 MiB
    # mapped). The check counted the repacked copy on top of the file all the same and
    # refused, under a ceiling 64 MiB above the file, its KV cache and its metadata, a runtime
    # the samples then measured well under it.
    if not cpu_backend_repacks():
        pytest.skip("the CPU backend repacks nothing on this machine")
    binary = upstream_binary()
    assert binary is not None
    model = write_quantized(tmp_path / "q4_0.gguf", layers=16)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    template = [str(binary), "-m", "{model_path}", "--host", "{host}", "--port", "{port}"]
    template += ["-t", "1", "-c", "256", "-np", "1", "--load-mode", "none"]
    estimate = estimate_context_memory(model, template)
    assert isinstance(estimate, ContextMemory)
    mapped = estimate_context_memory(model, template[:-2])
    assert isinstance(mapped, ContextMemory) and mapped.repacked_bytes == quantized_bytes(16)
    ceiling = len(data) + estimate.bytes + estimate.metadata_bytes + 64 * MIB
    limits = create_resource_limits(max_ram_bytes=ceiling, max_vram_bytes=1, max_cpu_percent=100)
    config = _config(template, model, digest, len(data), resource_limits=limits)
    async with Supervisor(config) as supervisor:
        verdict = await supervisor.start()
        assert verdict.ok, verdict
        await asyncio.sleep(0.5)
        sample = supervisor.status()["last_sample"]
        assert isinstance(sample, dict)
        assert 0 < sample["ram_bytes"] <= ceiling, (sample["ram_bytes"], ceiling)
        async with supervisor.controller.slot(deadline=time.monotonic() + 5):
            pass  # under the ceiling: admitted
        await supervisor.stop()
    assert estimate.repacked_bytes == 0


async def test_a_kv_cache_is_counted_through_a_link_and_a_header_too_large_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The verifier follows a symbolic link to the blob, and so does the runtime: the fit check
    # reads the header through it too, rather than count no KV cache at all (2 GiB here).
    template, tiny = real_runtime(tmp_path)
    template[template.index("-c") + 1] = "0"
    model = declaring_context(tiny, 2**21, tmp_path)
    data = model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    limits = create_resource_limits(max_ram_bytes=512 * MIB, max_vram_bytes=1, max_cpu_percent=100)
    linked = Supervisor(_config(template, link, digest, len(data), resource_limits=limits))
    async with linked:
        assert (await linked.start()).reason is Reason.MODEL_TOO_LARGE
        assert linked.status()["spawns"] == 0
        counted = estimate_context_memory(link, template)
        assert isinstance(counted, ContextMemory)
        assert linked.status()["context"] == {
            "tokens": 2**22,
            "kv_cache_bytes": 2 << 30,
            "recurrent_state_bytes": 0,
            "metadata_bytes": counted.metadata_bytes,
            "repacked_weights_bytes": counted.repacked_bytes,
        }
    # A GGUF header with 70,000 keys before the model's own: llama.cpp reads it, the walk
    # stops at 65,536. Refused, not counted as no KV cache (it would be 2 GiB again).
    crowded = tmp_path / "crowded.gguf"
    writer = gguf.GGUFWriter(crowded, "llama")
    for index in range(70_000):
        writer.add_uint8(f"x.{index}", 0)
    writer.add_block_count(2)
    writer.add_context_length(2**21)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = crowded.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    roomy = create_resource_limits(max_ram_bytes=4 * GIB, max_vram_bytes=1, max_cpu_percent=100)
    refused = Supervisor(_config(template, crowded, digest, len(data), resource_limits=roomy))
    async with refused:
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await refused.start()).reason is Reason.MODEL_TOO_LARGE
        assert refused.status()["spawns"] == 0
        assert refused.status()["context"] is None
    [said] = [m for m in (r.getMessage() for r in caplog.records) if "header" in m]
    assert "cannot be counted" in said and "too large for the fit check" in said
    assert str(tmp_path) not in said and digest not in said


async def test_a_command_that_loads_another_model_than_the_verified_one_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The verified tiny model declares 2,048 tokens; the command's last -m is another file,
    # declaring 2^21, which the runtime would load with 2 GiB of KV cache under a 512 MiB
    # ceiling. The fit check read the verified header: it refuses rather than count that one.
    template, tiny = real_runtime(tmp_path)
    template[template.index("-c") + 1] = "0"
    other = declaring_context(tiny, 2**21, tmp_path)
    template[template.index("{model_path}") + 1 : template.index("{model_path}") + 1] = [
        "-m",
        str(other),
    ]
    data = tiny.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    limits = create_resource_limits(max_ram_bytes=512 * MIB, max_vram_bytes=1, max_cpu_percent=100)
    supervisor = Supervisor(_config(template, tiny, digest, len(data), resource_limits=limits))
    async with supervisor:
        with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
            assert (await supervisor.start()).reason is Reason.MALFORMED_SPEC
        assert supervisor.status()["spawns"] == 0
    [said] = [record.getMessage() for record in caplog.records]
    assert said == (
        "the runtime command loads weights the manifest does not verify (another -m); "
        "only {model_path} is verified"
    )
    assert str(tmp_path) not in said and digest not in said
    # Known from the manifest alone, before anything is downloaded.
    manifest = Manifest(
        model=ModelSpec(
            name="m", url="https://models.example.com/m.gguf", sha256=digest, size_bytes=len(data)
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(command=tuple(template)),
    )
    assert check_runtime_command(manifest).reason is Reason.MALFORMED_SPEC
    del template[template.index(str(other)) - 1 : template.index(str(other)) + 1]
    assert check_runtime_command(
        dataclasses.replace(manifest, runtime=RuntimeSpec(command=tuple(template)))
    ).ok


@pytest.mark.security
async def test_a_command_that_is_not_allowed_never_runs(tmp_path: Path) -> None:
    model, digest, size = _blob(tmp_path)
    relative = Supervisor(_config(["python3", "{port}"], model, digest, size))
    unknown = Supervisor(_config([sys.executable, "{port}", "{secret}"], model, digest, size))
    async with relative, unknown:
        assert (await relative.start()).reason is Reason.EXECUTABLE_NOT_ALLOWED
        assert (await unknown.start()).reason is Reason.MALFORMED_SPEC
    assert relative.status()["spawns"] == unknown.status()["spawns"] == 0


@pytest.mark.security
async def test_a_runtime_command_exec_could_never_run_is_refused_from_the_manifest_alone(
    tmp_path: Path,
) -> None:
    # What serve asks before the download: a script whose interpreter is missing, or a file
    # the kernel has no format for, would otherwise be found only at the spawn, after it.
    def manifest(content: bytes) -> Manifest:
        executable = tmp_path / "runtime"
        executable.write_bytes(content)
        executable.chmod(0o755)
        return Manifest(
            model=ModelSpec(
                name="m", url="https://models.example.com/m.gguf", sha256="0" * 64, size_bytes=1
            ),
            sources=SourcesSpec(allow=("https://models.example.com/",)),
            runtime=RuntimeSpec(command=(str(executable), "--port", "{port}")),
        )

    refused = [b"#!/nonexistent/python3\n", b"#!python3\n"]
    if sys.platform.startswith("linux"):
        refused.append(b"print('no #! line')\n")
    for content in refused:
        verdict = check_runtime_command(manifest(content))
        assert verdict.reason is Reason.EXECUTABLE_NOT_ALLOWED, content
        assert str(tmp_path) not in str(verdict.to_dict())
    assert check_runtime_command(manifest(b"#!/usr/bin/env python3\n")).ok
    assert check_runtime_command(manifest(f"#!{sys.executable}\n".encode())).ok


def test_a_bad_configuration_is_refused(tmp_path: Path) -> None:
    model, digest, size = _blob(tmp_path)
    for fields in ({"max_restarts": -1}, {"sample_interval_s": 0}, {"health_path": "health"}):
        with pytest.raises(SpecError):
            _config(standin_command(), model, digest, size, **fields)
    with pytest.raises(SpecError):
        Supervisor("not a config")  # type: ignore[arg-type]


# --- faults the real server cannot show on demand (stand-in) ---------------------------------


async def test_a_start_past_the_ready_timeout_ends_stopped_with_the_process_gone(
    tmp_path: Path,
) -> None:
    async with standin(tmp_path, "--never-healthy", ready_timeout_s=1.0) as supervisor:
        started = time.monotonic()
        verdict = await supervisor.start()
        elapsed = time.monotonic() - started
        assert verdict.reason is Reason.READY_TIMEOUT
        assert 1.0 <= elapsed < 4.0
        assert _state(supervisor) is LifecycleState.STOPPED
        pid = supervisor.status()["last_pid"]
        assert isinstance(pid, int) and process_gone(pid)
        assert supervisor.status()["pid"] is None
        assert _moves(supervisor) == ["starting", "stopped"]
        assert supervisor.status()["spawns"] == 1  # a failed first start is not retried


@pytest.mark.parametrize(
    ("script", "status", "said"),
    [
        ("exit 3", 3, "exit status 3"),
        ("kill -KILL $$", -9, "signal 9 (SIGKILL)"),
    ],
    ids=["exit 3", "SIGKILL"],
)
async def test_how_the_runtime_ended_by_itself_is_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, script: str, status: int, said: str
) -> None:
    # runtime_exited alone leaves a user guessing why their command never came up.
    model, digest, size = _blob(tmp_path)
    template = ["/bin/sh", "-c", script, "sh", "{port}"]
    with caplog.at_level(logging.WARNING, logger="companion_runtime.bind.supervisor"):
        async with Supervisor(_config(template, model, digest, size, max_restarts=0)) as supervisor:
            assert (await supervisor.start()).reason is Reason.RUNTIME_EXITED
            assert supervisor.status()["last_exit_status"] == status
    assert [record.getMessage() for record in caplog.records] == [
        f"the runtime exited by itself: {said}"
    ]


def test_an_exit_is_described_by_its_number_or_its_signal() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(127) == "exit status 127"
    assert describe_exit(-15) == "signal 15 (SIGTERM)"
    assert describe_exit(-200) == "signal 200"
    assert describe_exit(None) == "exit status unknown"


async def test_a_start_after_a_failed_one_is_not_reported_as_given_up(tmp_path: Path) -> None:
    # The first start finds no runtime (the command exits at once), the second a healthy one.
    model, digest, size = _blob(tmp_path)
    flag = tmp_path / "present"
    # The stand-in's own {host} and {port} placeholders are filled inside the script.
    script = f'if [ -e "{flag}" ]; then exec {" ".join(standin_command())}; else exit 1; fi'
    template = ["/bin/sh", "-c", script]
    async with Supervisor(_config(template, model, digest, size, max_restarts=0)) as supervisor:
        assert (await supervisor.start()).reason is Reason.RUNTIME_EXITED
        flag.touch()
        assert (await supervisor.start()).ok
        assert _state(supervisor) is LifecycleState.READY
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(supervisor.wait_given_up(), 1.0)
        assert supervisor.status()["last_reason"] == "ok"


_SQUATTER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        print(self.path, flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.mark.security
async def test_a_process_that_takes_the_runtime_port_first_never_makes_it_ready(
    tmp_path: Path,
) -> None:
    # The runtime binds its port late; another process, outside the runtime's tree, takes the
    # port in between (it is in the runtime's argv) and answers every health probe 200.
    async with standin(tmp_path, "--listen-delay-s", "2") as supervisor:
        start = asyncio.create_task(supervisor.start())
        assert await async_wait_for(lambda: supervisor.runtime_url is not None, 10)
        port = int(str(supervisor.runtime_url).rsplit(":", 1)[1])
        squatter = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SQUATTER, str(port), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert squatter.stdout is not None
            # It answers the supervisor's health probes...
            assert await asyncio.wait_for(squatter.stdout.readline(), 10) == b"/health\n"
            verdict = await asyncio.wait_for(start, 30)
        finally:
            squatter.kill()
            await squatter.wait()
        # ...but is not the runtime: no ready, and the runtime, which could not bind, exited.
        assert verdict.reason is Reason.RUNTIME_EXITED
        assert "ready" not in _moves(supervisor)
        assert _state(supervisor) is LifecycleState.STOPPED


async def test_the_runtime_s_listener_is_looked_for_until_found_not_on_every_probe(
    tmp_path: Path,
) -> None:
    # The ownership check reads the tree's sockets; once the runtime holds the port no one else
    # can bind it, so probes while ready do not repeat the check.
    calls: list[tuple[int, int]] = []

    async def listens(pid: int, port: int) -> bool:
        calls.append((pid, port))
        return await listens_below(pid, port)

    model, digest, size = _blob(tmp_path)
    # HEALTH probes every 0.05 s while ready too.
    config = _config(standin_command(), model, digest, size)
    async with Supervisor(config, listens=listens) as supervisor:
        verdict = await supervisor.start()
        assert verdict.ok, verdict
        await asyncio.sleep(0.6)  # about a dozen probes while ready
        assert _state(supervisor) is LifecycleState.READY
        assert len(calls) == 1
        await supervisor.stop()


@pytest.mark.security
async def test_a_runtime_listening_on_another_address_of_its_port_is_not_what_answered(
    tmp_path: Path,
) -> None:
    # A command that puts the runtime on [::1] rather than {host}: the probe (and the front
    # door) go to 127.0.0.1, a different socket that another process can hold at the same
    # time. The runtime listening on the port number is no proof that it answered there.
    async with standin(
        tmp_path, "--host", "::1", "--listen-delay-s", "1", ready_timeout_s=4.0, max_restarts=0
    ) as supervisor:
        start = asyncio.create_task(supervisor.start())
        assert await async_wait_for(lambda: supervisor.runtime_url is not None, 10)
        port = int(str(supervisor.runtime_url).rsplit(":", 1)[1])
        squatter = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SQUATTER, str(port), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert squatter.stdout is not None
            assert await asyncio.wait_for(squatter.stdout.readline(), 10) == b"/health\n"
            verdict = await asyncio.wait_for(start, 30)
        finally:
            squatter.kill()
            await squatter.wait()
        assert verdict.reason is Reason.READY_TIMEOUT
        assert "ready" not in _moves(supervisor)


async def test_a_slow_start_becomes_ready(tmp_path: Path) -> None:
    flags = ("--listen-delay-s", "0.4", "--loading-s", "0.4")
    async with standin(tmp_path, *flags, ready_timeout_s=10.0) as supervisor:
        assert (await supervisor.start()).ok
        assert _state(supervisor) is LifecycleState.READY


async def test_a_crash_mid_request_fails_it_and_refuses_the_waiters(tmp_path: Path) -> None:
    async with standin(tmp_path, max_in_flight=1, queue_bound=4, max_restarts=0) as supervisor:
        assert (await supervisor.start()).ok
        url = str(supervisor.runtime_url)
        waiter_reasons: list[Reason] = []

        async def waiter() -> None:
            try:
                async with supervisor.controller.slot(deadline=time.monotonic() + 10):
                    waiter_reasons.append(Reason.OK)
            except AdmissionRefused as refusal:
                waiter_reasons.append(refusal.reason)

        async with supervisor.controller.slot(), httpx.AsyncClient(base_url=url) as client:
            queued = asyncio.create_task(waiter())
            assert await async_wait_for(lambda: supervisor.controller.statistics().queued == 1, 2)
            with pytest.raises(httpx.HTTPError):
                await client.post("/crash")
            assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.STOPPED, 1)
            await asyncio.wait_for(queued, 2)
        assert waiter_reasons == [Reason.NOT_READY]
        assert await _admitted(supervisor) is Reason.NOT_READY


async def test_rss_over_the_limit_refuses_new_requests_until_it_drops(tmp_path: Path) -> None:
    limits = create_resource_limits(
        max_ram_bytes=150 * MIB, max_vram_bytes=1 * GIB, max_cpu_percent=100
    )
    async with standin(tmp_path, resource_limits=limits, sample_interval_s=0.05) as supervisor:
        assert (await supervisor.start()).ok
        assert await _admitted(supervisor) is Reason.OK
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            assert (await client.post("/allocate?mib=200")).status_code == 200
            assert await async_wait_for(
                lambda: supervisor.status()["last_sample"]["ram_bytes"] > 150 * MIB,  # type: ignore[index]
                3,
            )
            assert await _admitted(supervisor) is Reason.RAM_OVER_LIMIT
            assert _state(supervisor) is LifecycleState.READY  # refused, not stopped
            assert (await client.post("/release")).status_code == 200
            assert await async_wait_for(
                lambda: supervisor.status()["last_sample"]["ram_bytes"] < 150 * MIB,  # type: ignore[index]
                3,
            )
            assert await _admitted(supervisor) is Reason.OK
        refused = supervisor.status()["refused_by_reason"]
        assert isinstance(refused, dict) and refused.get("ram_over_limit", 0) >= 1


@pytest.mark.security
async def test_a_sample_that_cannot_be_taken_refuses_at_once_not_once_the_last_ages_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed sample left the last good one in force until it aged out (max_sample_age_s):
    # a GPU lost mid-run kept the runtime admitted, its VRAM unknown, for that long.
    nvml, gpu_state = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    model, digest, size = _blob(tmp_path)
    config = _config(standin_command(), model, digest, size, max_sample_age_s=60.0)
    async with Supervisor(config, gpu=NvmlGpuMemory()) as supervisor:
        assert (await supervisor.start()).ok
        assert await _admitted(supervisor) is Reason.OK
        gpu_state["lost"] = True
        # Within a few sample intervals (0.1 s), not the 60 s the last sample stays fresh.
        assert await _answers_within(supervisor, Reason.MALFORMED_OBSERVATION, 3.0)
        assert _state(supervisor) is LifecycleState.READY  # refused, not stopped
        gpu_state["lost"] = False
        assert await _answers_within(supervisor, Reason.OK, 3.0)


@pytest.mark.security
async def test_status_says_the_last_sample_is_no_longer_in_force_while_samples_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While samples failed (requests refused malformed_observation), /_status went on showing
    # the last good sample as if admission still decided on it.
    nvml, gpu_state = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    model, digest, size = _blob(tmp_path)
    config = _config(standin_command(), model, digest, size, max_sample_age_s=60.0)
    async with Supervisor(config, gpu=NvmlGpuMemory()) as supervisor:
        assert (await supervisor.start()).ok
        assert await _admitted(supervisor) is Reason.OK
        assert _last_sample(supervisor)["in_force"] is True
        gpu_state["lost"] = True
        assert await _answers_within(supervisor, Reason.MALFORMED_OBSERVATION, 3.0)
        shown = _last_sample(supervisor)
        assert shown["in_force"] is False
        # Still the last good sample, with its fields and meanings as before.
        assert {"ram_bytes", "vram_bytes", "cpu_percent", "age_s", "process_count"} <= set(shown)
        assert isinstance(shown["ram_bytes"], int) and shown["ram_bytes"] > 0
        gpu_state["lost"] = False
        assert await _answers_within(supervisor, Reason.OK, 3.0)
        assert _last_sample(supervisor)["in_force"] is True


def _last_sample(supervisor: Supervisor) -> dict[str, object]:
    sample = supervisor.status()["last_sample"]
    assert isinstance(sample, dict)
    return sample


@pytest.mark.security
async def test_a_first_sample_that_cannot_be_taken_is_ready_but_refused_not_an_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first sample's failure read as runtime_exited, though the runtime was running.
    nvml, gpu_state = fake_nvml()
    gpu_state["lost"] = True
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    model, digest, size = _blob(tmp_path)
    config = _config(standin_command(), model, digest, size, max_sample_age_s=60.0)
    async with Supervisor(config, gpu=NvmlGpuMemory()) as supervisor:
        assert (await supervisor.start()).ok
        assert await _admitted(supervisor) is Reason.MALFORMED_OBSERVATION
        assert _state(supervisor) is LifecycleState.READY
        gpu_state["lost"] = False
        assert await _answers_within(supervisor, Reason.OK, 3.0)


async def _answers_within(supervisor: Supervisor, reason: Reason, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _admitted(supervisor) is reason:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_runtime_that_ignores_sigterm_is_sigkilled_after_the_grace(tmp_path: Path) -> None:
    async with standin(tmp_path, "--ignore-sigterm", kill_grace_s=0.5) as supervisor:
        assert (await supervisor.start()).ok
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        started = time.monotonic()
        await supervisor.stop(grace_s=0)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 3.0
        assert process_gone(pid)
        assert _state(supervisor) is LifecycleState.STOPPED


async def test_a_crashed_runtime_is_restarted_and_serves_again(tmp_path: Path) -> None:
    async with standin(tmp_path, max_restarts=2) as supervisor:
        assert (await supervisor.start()).ok
        first_pid = supervisor.status()["pid"]
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post("/crash")
        assert await async_wait_for(lambda: _state(supervisor) is not LifecycleState.READY, 1)
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.READY, 10)
        assert supervisor.status()["pid"] != first_pid
        assert supervisor.status()["restarts"] == 1
        assert await _admitted(supervisor) is Reason.OK
        assert _moves(supervisor) == ["starting", "ready", "stopped", "starting", "ready"]


async def test_restarts_back_off_exponentially_up_to_the_limit(tmp_path: Path) -> None:
    backoff = 0.2
    async with standin(
        tmp_path, "--exit-after-s", "1.0", max_restarts=3, restart_backoff_s=backoff
    ) as supervisor:
        assert (await supervisor.start()).ok
        given_up = await asyncio.wait_for(supervisor.wait_given_up(), 20)
        assert given_up is Reason.RESTART_LIMIT_REACHED
        assert supervisor.status()["last_reason"] == "restart_limit_reached"
        status = supervisor.status()
        assert status["spawns"] == 4 and status["restarts"] == 3
        assert _state(supervisor) is LifecycleState.STOPPED
        moves = status["recent_moves"]
        assert isinstance(moves, list)
        stopped_at = [m["at"] for m in moves if m["state"] == "stopped"]
        starting_at = [m["at"] for m in moves if m["state"] == "starting"]
        gaps = [start - stop for stop, start in zip(stopped_at, starting_at[1:], strict=False)]
        assert len(gaps) == 3
        for index, gap in enumerate(gaps):
            expected = backoff * 2**index  # 0.2, 0.4, 0.8
            assert expected <= gap < expected + 1.0, gaps
        pid = status["last_pid"]
        assert isinstance(pid, int) and process_gone(pid)


async def test_a_runtime_that_turns_unhealthy_is_drained_and_stopped(tmp_path: Path) -> None:
    async with standin(tmp_path, max_restarts=0) as supervisor:
        assert (await supervisor.start()).ok
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            await client.post("/sicken")
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.STOPPED, 5)
        assert _moves(supervisor) == ["starting", "ready", "draining", "stopped"]
        assert process_gone(pid)


async def test_start_twice_is_refused_and_leaving_the_context_stops_the_runtime(
    tmp_path: Path,
) -> None:
    async with standin(tmp_path) as supervisor:
        assert (await supervisor.start()).ok
        assert (await supervisor.start()).reason is Reason.INVALID_TRANSITION
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
    assert process_gone(pid)
    assert _state(supervisor) is LifecycleState.STOPPED
    with pytest.raises(RuntimeError):
        await supervisor.start()


async def test_a_second_start_during_the_first_is_refused_and_stop_waits_for_the_runtime(
    tmp_path: Path,
) -> None:
    async with standin(tmp_path) as supervisor:
        # The second start() arrives while the first re-verifies the blob.
        first, second = await asyncio.gather(supervisor.start(), supervisor.start())
        assert first.ok
        assert second.reason is Reason.INVALID_TRANSITION
        pid = supervisor.status()["pid"]
        assert isinstance(pid, int)
        await supervisor.stop()
        # stop() returned: the runtime it supervised is stopped and gone, not still draining.
        assert _state(supervisor) is LifecycleState.STOPPED
        assert process_gone(pid)
        assert supervisor.status()["spawns"] == 1


async def test_no_move_is_ever_refused_by_the_table(tmp_path: Path) -> None:
    # Every move the supervisor asks for is one the lifecycle table holds, through start,
    # a crash, a restart, a health failure and a stop.
    async with standin(tmp_path, max_restarts=1) as supervisor:
        assert (await supervisor.start()).ok
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post("/crash")
        assert await async_wait_for(lambda: supervisor.status()["restarts"] == 1, 5)
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.READY, 5)
        async with httpx.AsyncClient(base_url=str(supervisor.runtime_url)) as client:
            await client.post("/sicken")
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.STOPPED, 5)
    assert supervisor.status()["refused_moves"] == 0
    assert _moves(supervisor) == [
        "starting",
        "ready",
        "stopped",
        "starting",
        "ready",
        "draining",
        "stopped",
    ]


async def test_a_stop_during_the_restart_backoff_ends_it_at_once(tmp_path: Path) -> None:
    async with standin(
        tmp_path, "--exit-after-s", "1.0", max_restarts=3, restart_backoff_s=30
    ) as supervisor:
        assert (await supervisor.start()).ok
        assert await async_wait_for(lambda: _state(supervisor) is LifecycleState.STOPPED, 5)
        started = time.monotonic()
        await supervisor.stop()
        assert time.monotonic() - started < 1
        # A stop asked for is not the supervisor giving up on the runtime.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(supervisor.wait_given_up(), 0.3)
    assert supervisor.status()["spawns"] == 1


async def test_a_runtime_that_stayed_up_earns_its_restart_budget_back(tmp_path: Path) -> None:
    async with standin(
        tmp_path,
        "--exit-after-s",
        "1.0",
        max_restarts=1,
        restart_backoff_s=0.05,
        stable_after_s=0.1,
    ) as supervisor:
        assert (await supervisor.start()).ok
        assert await async_wait_for(lambda: supervisor.status()["spawns"] >= 4, 10)  # type: ignore[operator]
        assert supervisor.status()["last_reason"] != "restart_limit_reached"


async def test_a_spawn_the_kernel_refuses_is_spawn_failed(tmp_path: Path) -> None:
    model, digest, size = _blob(tmp_path)
    garbage = tmp_path / "garbage"
    # ELF magic passes the check before the spawn; the kernel refuses the rest.
    garbage.write_bytes(b"\x7fELF\x00\x01 not a program")
    garbage.chmod(0o755)
    supervisor = Supervisor(
        _config([str(garbage), "{port}"], model, digest, size),
        launcher=SubprocessLauncher(use_death_signal=False),
    )
    async with supervisor:
        assert (await supervisor.start()).reason is Reason.SPAWN_FAILED
        assert _state(supervisor) is LifecycleState.STOPPED
        assert _moves(supervisor) == ["starting", "stopped"]


async def test_built_as_supervisor_of_a_manifest_and_a_model_path(tmp_path: Path) -> None:
    model, digest, size = _blob(tmp_path)
    manifest = Manifest(
        model=ModelSpec(
            name="stand-in",
            url="https://models.example.com/m.bin",
            sha256=digest,
            size_bytes=size,
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(command=tuple(standin_command()), ready_timeout_s=30),
        limits=LimitsSpec(max_in_flight=3, queue_bound=5),
    )
    async with Supervisor(manifest, model_path=model) as supervisor:
        assert (await supervisor.start()).ok
        assert supervisor.config.expected_digest == digest
        assert supervisor.controller.statistics().max_in_flight == 3


@pytest.mark.data_integrity
@pytest.mark.security
@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646], ids=["others-and-group", "group", "others"])
async def test_a_blob_someone_else_could_change_is_never_started_on(
    tmp_path: Path, mode: int
) -> None:
    # The re-verify vouches for the bytes the runtime loads only if nobody else can write them
    # between the two (or under the runtime's mmap, after): a verified model that others may
    # write to had been started on.
    supervisor = standin(tmp_path)
    model = supervisor.config.model_path
    model.chmod(mode)
    async with supervisor:
        assert (await supervisor.start()).reason is Reason.STORE_ERROR
        assert supervisor.status()["spawns"] == 0
        model.chmod(0o644)  # only its owner's to change: used
        assert (await supervisor.start()).ok


@pytest.mark.data_integrity
@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
async def test_a_blob_of_another_user_is_never_started_on(tmp_path: Path) -> None:
    supervisor = standin(tmp_path)
    model = supervisor.config.model_path
    model.chmod(0o444)
    os.chown(model, 65534, 65534)  # read-only, but its owner can make it writable at any time
    async with supervisor:
        assert (await supervisor.start()).reason is Reason.STORE_ERROR
        assert supervisor.status()["spawns"] == 0


@pytest.mark.data_integrity
@pytest.mark.security
async def test_a_blob_in_a_directory_others_can_write_to_is_never_started_on(
    tmp_path: Path,
) -> None:
    # The re-verify vouched for the file, not for its name: whoever can rename the entries of
    # a directory on the way to it puts other bytes at that name between the re-verify and
    # the runtime's open. A store keeps its blobs only where no one else can, but a model
    # path given to the supervisor itself had not been looked at.
    shared = tmp_path / "shared"
    shared.mkdir()
    model, digest, size = _blob(shared)
    model.chmod(0o444)
    shared.chmod(0o777)
    supervisor = Supervisor(_config(standin_command(), model, digest, size))
    async with supervisor:
        assert (await supervisor.start()).reason is Reason.STORE_ERROR
        assert supervisor.status()["spawns"] == 0
        shared.chmod(0o755)  # only its owner's to rename in: used
        assert (await supervisor.start()).ok
