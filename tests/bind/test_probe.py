"""Resource probes on real child processes: the stand-in runtime, a busy loop, the real server."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from companion_runtime.bind import probe as probe_module
from companion_runtime.bind.admission import AdmissionController, AdmissionRefused
from companion_runtime.bind.health import HealthPolicy, HttpHealthChecker, wait_until_healthy
from companion_runtime.bind.probe import (
    NoGpu,
    NvmlGpuMemory,
    ProbeError,
    PsutilResourceProbe,
    held_listeners_below,
    listeners_below,
    listens_below,
    measure_machine_headroom,
)
from companion_runtime.bind.process import SubprocessLauncher, build_launch_spec
from companion_runtime.core import (
    LifecycleEvent,
    Reason,
    ResourceObservation,
    create_resource_limits,
)
from tests.support.admission import READY
from tests.support.nvml import fake_nvml
from tests.support.port_taker import ipv6_loopback
from tests.support.supervision import (
    async_wait_for,
    llama_ready,
    real_runtime,
    standin_command,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

MIB = 1024 * 1024
POLICY = HealthPolicy(interval_s=0.02)


async def _healthy(base_url: str) -> None:
    async with HttpHealthChecker(base_url + "/health") as checker:
        wait = await wait_until_healthy(checker, ready_timeout_s=60, policy=POLICY)
    assert wait.event is LifecycleEvent.HEALTH_OK


async def test_a_sample_sums_the_runtime_and_its_children_and_rss_follows_allocation() -> None:
    spec = build_launch_spec(standin_command("--spawn-child"), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _healthy(spec.base_url)
        probe = PsutilResourceProbe(runtime.pid, gpu=NoGpu())
        first = await probe.sample()
        assert type(first.observation) is ResourceObservation
        # The keeper, the runtime under it, and the runtime's child.
        assert first.process_count == 3
        keeper = psutil.Process(runtime.pid)
        family = [keeper, *keeper.children(recursive=True)]
        direct = sum(p.memory_info().rss for p in family)
        assert abs(first.observation.ram_bytes - direct) < 16 * MIB
        assert first.observation.vram_bytes == 0
        loop_time = asyncio.get_running_loop().time()
        assert abs(first.taken_at - loop_time) < 5  # monotonic, like the loop's clock

        async with httpx.AsyncClient() as client:
            response = await client.post(spec.base_url + "/allocate?mib=200")
            assert response.status_code == 200
            grown = await probe.sample()
            assert grown.observation.ram_bytes - first.observation.ram_bytes > 150 * MIB
            await client.post(spec.base_url + "/release")
        released = await probe.sample()
        assert released.observation.ram_bytes < grown.observation.ram_bytes - 150 * MIB
        assert released.taken_at > grown.taken_at > first.taken_at


async def test_cpu_is_a_share_of_the_whole_machine() -> None:
    busy = "import sys\nwhile True: pass"
    spec = build_launch_spec([sys.executable, "-c", busy, "{port}"], model_path="m")
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        probe = PsutilResourceProbe(runtime.pid, gpu=NoGpu())
        await probe.sample()  # the share over the next second is measured from this one
        await asyncio.sleep(1.0)
        sample = await probe.sample()
    cores = psutil.cpu_count() or 1
    # One busy thread is one core: 100 / cores percent of the machine (less if starved).
    assert 100 / cores / 4 < sample.observation.cpu_percent <= 100 / cores + 5


async def test_a_process_the_runtime_left_behind_still_counts(tmp_path: Path) -> None:
    # A double fork leaves the tree the probe walks unless the keeper, as subreaper, takes
    # the orphan in; its 200 MiB once went uncounted, and past the RAM ceiling nothing refused.
    pid_file = tmp_path / "pids"
    spec = build_launch_spec(
        standin_command("--spawn-orphan", "--orphan-mib", "200", "--pid-file", str(pid_file)),
        model_path="m",
    )
    async with SubprocessLauncher().launch(spec) as runtime:
        await _healthy(spec.base_url)
        for _ in range(200):
            if "orphan" in (pid_file.read_text() if pid_file.exists() else ""):
                break
            await asyncio.sleep(0.05)
        sample = await PsutilResourceProbe(runtime.pid, gpu=NoGpu()).sample()
    assert sample.process_count == 3
    assert sample.observation.ram_bytes > 200 * MIB


async def test_cpu_of_children_that_live_shorter_than_a_sample_counts() -> None:
    # Children that each spin a core for 0.3 s: never alive at two samples in a row, so a
    # per-process reading gave 0 % while the runtime kept a core busy.
    spec = build_launch_spec(standin_command("--busy-children"), model_path="m")
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        await _healthy(spec.base_url)
        probe = PsutilResourceProbe(runtime.pid, gpu=NoGpu())
        await probe.sample()
        shares = []
        for _ in range(3):
            await asyncio.sleep(1.0)
            shares.append((await probe.sample()).observation.cpu_percent)
    cores = psutil.cpu_count() or 1
    # About one core (less when the machine is busy, less the start-up of each child).
    assert max(shares) > 100 / cores / 4, shares
    assert all(share <= 100 / cores + 10 for share in shares), shares


async def test_a_runtime_that_exited_is_runtime_exited() -> None:
    spec = build_launch_spec([sys.executable, "-c", "pass", "{port}"], model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        probe = PsutilResourceProbe(runtime.pid, gpu=NoGpu())
        await runtime.wait()
        with pytest.raises(ProbeError) as caught:
            await probe.sample()
    assert caught.value.reason is Reason.RUNTIME_EXITED
    assert str(caught.value) == "runtime_exited"


@pytest.mark.security
async def test_sampling_never_walks_the_machines_process_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("listed the process table")

    spec = build_launch_spec(standin_command("--spawn-child"), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _healthy(spec.base_url)
        monkeypatch.setattr(psutil, "process_iter", forbidden)
        monkeypatch.setattr(psutil, "pids", forbidden)
        monkeypatch.setattr(psutil.Process, "children", forbidden)
        sample = await PsutilResourceProbe(runtime.pid, gpu=NoGpu()).sample()
    assert sample.process_count == 3  # the keeper, the runtime, its child


@pytest.mark.security
async def test_only_a_listener_below_the_runtime_is_the_runtime_s() -> None:
    spec = build_launch_spec(standin_command("--spawn-child"), model_path="m")
    async with SubprocessLauncher().launch(spec) as runtime:
        await _healthy(spec.base_url)
        # The stand-in listens below the keeper, whose PID the caller holds.
        assert await listens_below(runtime.pid, spec.port)
        with socket.create_server(("127.0.0.1", 0)) as elsewhere:
            # A port another process (this one, above the runtime) listens on is not its.
            assert not await listens_below(runtime.pid, elsewhere.getsockname()[1])
    assert not await listens_below(runtime.pid, spec.port)  # gone


@pytest.mark.security
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc names the sockets")
@pytest.mark.parametrize(
    ("family", "host", "reaches"),
    [
        (socket.AF_INET, "127.0.0.1", True),
        (socket.AF_INET, "0.0.0.0", True),
        (socket.AF_INET6, "::ffff:127.0.0.1", True),
        (socket.AF_INET6, "::1", False),
    ],
)
async def test_a_held_listener_names_its_process_descriptor_and_socket(
    family: socket.AddressFamily, host: str, reaches: bool
) -> None:
    # A process that lives on may close its listener; what is watched is that very socket,
    # held at that descriptor, so the check names both, and only where 127.0.0.1 reaches it.
    if family == socket.AF_INET6 and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    listener = socket.socket(family)
    if family == socket.AF_INET6 and host.startswith("::ffff:"):
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    with listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        held = await held_listeners_below(os.getpid(), port)
        if not reaches:
            assert held == ()
            return
        (found,) = held
        assert (found.pid, found.fd) == (os.getpid(), listener.fileno())
        assert found.inode == os.fstat(listener.fileno()).st_ino
        assert await listeners_below(os.getpid(), port) == (os.getpid(),)
    assert await held_listeners_below(os.getpid(), port) == ()


async def test_without_an_nvidia_gpu_nvml_reads_as_no_gpu() -> None:
    gpu = NvmlGpuMemory()
    if gpu.present():
        pytest.skip("an NVIDIA GPU answers NVML here")
    assert gpu.process_vram_bytes(frozenset({1})) == 0
    assert gpu.free_vram_bytes() == 0
    headroom = await measure_machine_headroom(gpu)
    assert headroom.gpu_present is False
    assert headroom.available_vram_bytes == 0
    assert 0 < headroom.available_ram_bytes <= psutil.virtual_memory().total


@pytest.mark.skipif(not llama_ready(), reason="the embedded llama.cpp server is not available")
async def test_the_real_server_is_measured(tmp_path: Path) -> None:
    template, model = real_runtime(tmp_path, api_key_file=False)
    spec = build_launch_spec(template, model_path=model)
    async with SubprocessLauncher().launch(spec) as runtime:
        await _healthy(spec.base_url)
        probe = PsutilResourceProbe(runtime.pid)
        sample = await probe.sample()
        direct = psutil.Process(runtime.pid).memory_info().rss
    assert sample.process_count >= 1
    assert sample.observation.ram_bytes >= direct - 16 * MIB
    assert sample.observation.ram_bytes > model.stat().st_size


# --- failing closed -----------------------------------------------------------------------


@pytest.mark.security
async def test_a_gpu_that_fails_after_it_was_found_makes_the_sample_unmeasurable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every NVML failure once read as 0 bytes: with the GPU lost mid-run (a driver reset), the
    # runtime's VRAM read 0 and the VRAM ceiling was never enforced.
    nvml, state = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    limits = create_resource_limits(
        max_ram_bytes=8 << 30, max_vram_bytes=1 << 30, max_cpu_percent=100
    )
    controller = AdmissionController(max_in_flight=1, queue_bound=1, resource_limits=limits)
    controller.set_lifecycle(READY)
    spec = build_launch_spec(
        [sys.executable, "-c", "import time; time.sleep(60)", "{port}"], model_path="m"
    )
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        probe = PsutilResourceProbe(runtime.pid, gpu=NvmlGpuMemory())
        sample = await probe.sample()
        assert sample.observation.vram_bytes == 0  # present, and none of it ours
        controller.update_resources(sample.observation, taken_at=sample.taken_at)
        async with controller.slot():
            pass
        state["lost"] = True
        with pytest.raises(ProbeError) as caught:
            await probe.sample()
    assert caught.value.reason is Reason.MALFORMED_OBSERVATION
    assert str(caught.value) == "malformed_observation"


@pytest.mark.parametrize("code", [3, 4], ids=["not_supported", "no_permission"])
async def test_a_gpu_that_never_tells_a_process_s_memory_still_lets_the_runtime_serve(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # Some GPUs and drivers never tell which process uses how much memory for one of the two
    # queries (NVML_ERROR_NOT_SUPPORTED; NVML_ERROR_NO_PERMISSION for a user on a MIG-enabled
    # device). That answer never changes on the machine: read as a failure, every sample was
    # unmeasurable and the runtime refused every request malformed_observation for as long as
    # it ran. That query counts nothing, as before; a GPU that fails otherwise still refuses.
    nvml, state = fake_nvml(graphics_processes_error=code)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    spec = build_launch_spec(
        [sys.executable, "-c", "import time; time.sleep(60)", "{port}"], model_path="m"
    )
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        probe = PsutilResourceProbe(runtime.pid, gpu=NvmlGpuMemory())
        for _ in range(2):
            sample = await probe.sample()
            assert sample.observation.vram_bytes == 0
        state["lost"] = True
        with pytest.raises(ProbeError) as caught:
            await probe.sample()
    assert caught.value.reason is Reason.MALFORMED_OBSERVATION


async def test_nvml_that_cannot_start_is_still_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, _ = fake_nvml(init_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu = NvmlGpuMemory()
    assert gpu.present() is False
    assert gpu.process_vram_bytes(frozenset({os.getpid()})) == 0
    assert gpu.free_vram_bytes() == 0


# A runtime stand-in that forks a chain of N sleeping processes below it (each the parent of
# the next), so a walk of the tree meets them one level at a time.
_CHAIN = """\
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() != 0:
        break
time.sleep(120)
"""


@pytest.mark.security
async def test_a_tree_larger_than_the_cap_is_unmeasurable_not_a_partial_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The walk stopped at the cap and summed what it had found: a runtime that forked past it
    # had the rest of its RAM and CPU left out, and was admitted over its ceilings.
    monkeypatch.setattr(probe_module, "_MAX_DESCENDANTS", 8)
    spec = build_launch_spec([sys.executable, "-c", _CHAIN, "12", "{port}"], model_path="m")
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        keeper = psutil.Process(runtime.pid)
        # The keeper, the runtime, and the 12 below it.
        assert await async_wait_for(lambda: len(keeper.children(recursive=True)) == 13, 10)
        with pytest.raises(ProbeError) as caught:
            await PsutilResourceProbe(runtime.pid, gpu=NoGpu()).sample()
        assert caught.value.reason is Reason.MALFORMED_OBSERVATION
        monkeypatch.setattr(probe_module, "_MAX_DESCENDANTS", 13)
        sample = await PsutilResourceProbe(runtime.pid, gpu=NoGpu()).sample()
    assert sample.process_count == 14  # a tree of exactly the cap is measured


async def test_the_first_cpu_sample_already_counts_and_refuses_over_the_ceiling() -> None:
    # The first sample of each run read 0 %: a runtime that kept a core busy was admitted
    # under a low CPU ceiling until the second sample.
    limits = create_resource_limits(
        max_ram_bytes=8 << 30, max_vram_bytes=1 << 30, max_cpu_percent=5
    )
    controller = AdmissionController(max_in_flight=1, queue_bound=1, resource_limits=limits)
    controller.set_lifecycle(READY)
    busy = "import sys\nwhile True: pass"
    spec = build_launch_spec([sys.executable, "-c", busy, "{port}"], model_path="m")
    async with SubprocessLauncher().launch(spec, stop_grace_s=0.5) as runtime:
        await asyncio.sleep(0.5)
        first = await PsutilResourceProbe(runtime.pid, gpu=NoGpu()).sample()
    cores = psutil.cpu_count() or 1
    # One busy thread is one core of the machine (less if starved, and less its start-up).
    assert 100 / cores / 4 < first.observation.cpu_percent <= 100 / cores + 5
    controller.update_resources(first.observation, taken_at=first.taken_at)
    with pytest.raises(AdmissionRefused) as refused:
        async with controller.slot():
            pass
    assert refused.value.reason is Reason.CPU_OVER_LIMIT
