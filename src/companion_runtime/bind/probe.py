"""Resource probes: what the runtime uses (RSS, CPU share, VRAM) and what the machine has left.

:class:`PsutilResourceProbe` samples one runtime: its PID and every descendant. It never walks
the machine's process table: on Linux the descendants are read from
``/proc/<pid>/task/<tid>/children`` (the kernel's per-process child list), so only our own
processes are ever looked at; elsewhere psutil's ``children(recursive=True)`` is the fallback.
A tree of more than ``_MAX_DESCENDANTS`` (4,096) processes below the runtime cannot be
measured: the sample is :class:`ProbeError` (``malformed_observation``), never the sum of the
part that was walked (a runtime that forked past the cap had the rest left out, and was
admitted over its ceilings), and no listener in it is trusted.

- RAM is the sum of the processes' RSS.
- CPU is the processes' CPU time between two samples over the wall time between them, divided
  by the CPU count, so it is a share of the **whole machine**, as the core's limits expect.
  Each process counts its own user and system time plus that of the children it has reaped,
  so a child that lived and died between two samples is counted too (under the process
  keeper, every process the runtime starts is reaped inside the tree: see ``process.py``).
  A process that sets ``SIGCHLD`` to be ignored has its children reaped by the kernel, which
  then adds their CPU time to no one's: those are not counted. The first sample has no
  previous one: it is the tree's CPU time over the age of its root (the keeper, started just
  before the runtime; read from ``/proc/<pid>/stat`` against the boot clock on Linux), which
  is all the time that CPU time can have been spent in, so it is the share since the start,
  and a runtime that keeps the machine busy is refused from its first sample on (it read 0,
  and the CPU ceiling held only from the second sample, about a second later). A first
  sample therefore includes the start-up (a model loading) and may refuse for that.
- VRAM comes from NVML when an NVIDIA GPU is present, else it is 0. NVML has no query for one
  PID's *current* GPU memory (accounting stats give a peak, and only when an administrator has
  turned accounting on), so the probe asks each device for its running compute and graphics
  processes and keeps only the entries whose PID is ours, inside one function; nothing about
  any other process is stored, returned or logged. No library, no driver or no device when
  NVML is first asked means no GPU: 0, for the process's whole life (a GPU that appears later
  is not seen). Once NVML has found a device, a failed query for the runtime's usage (a driver
  reset, ``NVML_ERROR_GPU_IS_LOST``, a timeout) makes the sample :class:`ProbeError`
  (``malformed_observation``): it once read 0, and a VRAM ceiling was never enforced while the
  GPU could not be read. Free VRAM for the fit check that cannot be read counts as none.
  Limit: in a PID namespace of its own (a container), NVML reports the host's PIDs, which
  match none of ours, so the runtime's VRAM reads 0 and the VRAM ceiling is not enforced;
  this is not detected (a GPU process whose PID is not ours may well be another program's).

:func:`held_listeners_below` names the listening sockets of the runtime's processes (its PID or
descendants) on ``127.0.0.1`` at a TCP port: which process holds each, at which descriptor,
and the socket's inode, so that whether that process still holds that very socket can be asked
later with one ``stat`` of ``/proc/<pid>/fd/<fd>``. :func:`listeners_below` names the processes
and :func:`listens_below` says whether there is one: the port is picked free and released
before the runtime binds it, so another local process (of any user: the port is in the
runtime's argv for all to read) could take it first and answer the health check; and once the
runtime is gone, or has closed its listener (a runtime that re-executes itself does, and opens
a new one a moment later), the port is free again for anyone to take. Only our processes' own
sockets are looked at: on Linux, the listening sockets of the runtime's network namespace on
that port (``/proc/<pid>/net/tcp`` and ``tcp6``) and our processes' descriptors; elsewhere
psutil's ``net_connections``, which names the processes only.

All psutil and NVML calls block, so they run in a worker thread (``asyncio.to_thread``).
Foreign exceptions are translated in one place per adapter: a runtime that vanished is
:class:`ProbeError` with ``runtime_exited``; a process that cannot be read, a tree past the cap
or a GPU that fails once found is ``malformed_observation`` (one whose driver never tells a
process's memory is not failing: that memory is left out), which the supervisor passes on to
the admission controller at once (``forget_resources``): requests are refused as for a stale
sample until a sample can be taken again.
A sample is a core :class:`ResourceObservation` plus ``taken_at`` on the monotonic clock (the
same clock the admission controller ages samples on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, final

import psutil

from companion_runtime.core import Reason, ResourceObservation

__all__ = [
    "GpuMemory",
    "HeldListener",
    "MachineHeadroom",
    "NoGpu",
    "NvmlGpuMemory",
    "ProbeError",
    "PsutilResourceProbe",
    "ResourceProbe",
    "ResourceSample",
    "default_gpu_memory",
    "held_listeners_below",
    "listeners_below",
    "listens_below",
    "measure_machine_headroom",
]

_logger = logging.getLogger(__name__)

#: Processes below the runtime one sample may count; a larger tree cannot be measured.
_MAX_DESCENDANTS: Final = 4096
#: The shortest age a first CPU sample divides by: a process start time has the resolution of a
#: clock tick (10 ms), and a wall clock stepped back must not divide by zero or less.
_MIN_AGE_S: Final = 0.01


@final
class ProbeError(Exception):
    """A sample could not be taken. ``str(error)`` is the reason code only."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSample:
    """One reading of the runtime's resource use."""

    #: What the core's limits are checked against.
    observation: ResourceObservation
    #: When it was taken, on the probe's clock (monotonic by default).
    taken_at: float
    #: How many processes (the runtime and its descendants) were measured.
    process_count: int


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class MachineHeadroom:
    """What the machine has left, for the fit check."""

    #: Memory that can be given to a new process without swapping (psutil's ``available``).
    available_ram_bytes: int
    #: Free GPU memory summed over devices; 0 without a GPU.
    available_vram_bytes: int
    #: Whether an NVIDIA GPU answered NVML.
    gpu_present: bool


class GpuMemory(Protocol):
    """The GPU seam (blocking calls; run them in a worker thread)."""

    def present(self) -> bool:
        """Whether a GPU can be asked at all."""
        ...

    def process_vram_bytes(self, pids: frozenset[int]) -> int:
        """GPU memory used by exactly these PIDs, summed over devices."""
        ...

    def free_vram_bytes(self) -> int:
        """Free GPU memory summed over devices."""
        ...


class ResourceProbe(Protocol):
    """The resource seam: one sample of the runtime."""

    async def sample(self) -> ResourceSample:
        """Measure now; :class:`ProbeError` (``runtime_exited``) when the runtime is gone."""
        ...


@final
class NoGpu:
    """The :class:`GpuMemory` of a machine without a GPU: always 0."""

    def present(self) -> bool:
        return False

    def process_vram_bytes(self, pids: frozenset[int]) -> int:
        return 0

    def free_vram_bytes(self) -> int:
        return 0


@final
class NvmlGpuMemory:
    """The real :class:`GpuMemory` (nvidia-ml-py).

    No library, no driver, or no device when NVML is first asked: no GPU (0 bytes). Once NVML
    has answered, a query for the runtime's usage that fails (a driver reset, a lost GPU, a
    timeout) raises :class:`ProbeError` (``malformed_observation``): a GPU that is there but
    cannot be read is not one that holds nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._initialised = False
        self._untold_said = False

    def _library(self) -> Any:
        with self._lock:
            if not self._initialised:
                self._initialised = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception:  # noqa: BLE001 - no driver, no library, no GPU: all mean 0
                    self._nvml = None
        return self._nvml

    def _handles(self) -> list[Any]:
        nvml = self._library()
        if nvml is None:
            return []
        with _nvml_errors_are_unmeasurable():
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    def present(self) -> bool:
        try:
            return bool(self._handles())
        except ProbeError:
            return False  # for the fit check: a GPU that cannot be read offers nothing

    def process_vram_bytes(self, pids: frozenset[int]) -> int:
        total = 0
        handles = self._handles()
        nvml = self._nvml
        for handle in handles:
            with _nvml_errors_are_unmeasurable():
                running = [
                    *self._processes(nvml.nvmlDeviceGetComputeRunningProcesses, handle),
                    *self._processes(nvml.nvmlDeviceGetGraphicsRunningProcesses, handle),
                ]
                # Filtered at once: only our PIDs' figures leave this function.
                total += sum(
                    entry.usedGpuMemory or 0
                    for entry in running
                    if entry.pid in pids and entry.usedGpuMemory is not None
                )
        return total

    def _processes(self, query: Callable[[Any], Any], handle: Any) -> list[Any]:
        """``query``'s processes on the device; none where this GPU or driver never tells them
        (``NVML_ERROR_NOT_SUPPORTED``; ``NVML_ERROR_NO_PERMISSION``, a user's answer on a
        MIG-enabled device). That answer never changes on the machine: read as a failure,
        every sample would be unmeasurable and the runtime never served. Its memory is then
        not counted (as before NVML failures were told apart), and that is said once."""
        nvml = self._nvml
        try:
            return list(query(handle))
        except Exception as error:
            never = (
                getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", None),
                getattr(nvml, "NVML_ERROR_NO_PERMISSION", None),
            )
            code = getattr(error, "value", None)
            if code is None or code not in never:
                raise
        if not self._untold_said:
            self._untold_said = True
            _logger.warning(
                "the GPU driver does not tell a process's memory; the VRAM ceiling leaves it out"
            )
        return []

    def free_vram_bytes(self) -> int:
        total = 0
        try:
            handles = self._handles()
        except ProbeError:
            return 0
        for handle in handles:
            # For the fit check: free memory that cannot be read is none.
            with contextlib.suppress(ProbeError), _nvml_errors_are_unmeasurable():
                total += int(self._nvml.nvmlDeviceGetMemoryInfo(handle).free)
        return total


@contextlib.contextmanager
def _nvml_errors_are_unmeasurable() -> Iterator[None]:
    """The one place NVML exceptions (on a GPU that NVML found) are translated."""
    try:
        yield
    except Exception:  # noqa: BLE001 - NVMLError and friends
        raise ProbeError(Reason.MALFORMED_OBSERVATION) from None


_default_gpu: GpuMemory | None = None


def default_gpu_memory() -> GpuMemory:
    """The process-wide NVML adapter (initialised once, lazily)."""
    global _default_gpu
    if _default_gpu is None:
        _default_gpu = NvmlGpuMemory()
    return _default_gpu


def _direct_children_linux(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children.extend(int(text) for text in (task / "children").read_text().split())
    return children


@final
class _TreeTooLarge(Exception):
    """More processes below the runtime than one walk holds: their sum cannot be known."""


def _descendants(root: psutil.Process) -> list[int]:
    """Every process below ``root``; :class:`_TreeTooLarge` past ``_MAX_DESCENDANTS`` (read at
    each call), never a partial list: a tree that forked past the cap would else be summed
    without the rest and admitted over its ceilings."""
    if sys.platform.startswith("linux") and Path("/proc/self/task").is_dir():
        found: list[int] = []
        frontier = [root.pid]
        while frontier:
            children = _direct_children_linux(frontier.pop())
            found.extend(children)
            if len(found) > _MAX_DESCENDANTS:
                raise _TreeTooLarge
            frontier.extend(children)
        return found
    found = [child.pid for child in root.children(recursive=True)]
    if len(found) > _MAX_DESCENDANTS:
        raise _TreeTooLarge
    return found


def _age_s(process: psutil.Process) -> float:
    """How long ``process`` has run, seconds."""
    if sys.platform.startswith("linux"):
        # The start time in clock ticks since boot, against the clock it is kept on: psutil's
        # create_time() adds the boot time in whole seconds, so a wall-clock age from it is off
        # by up to a second, which is most of the age at a first sample.
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{process.pid}/stat").read_text()
            ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
            return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - process.create_time()


@final
class PsutilResourceProbe:
    """The real :class:`ResourceProbe` for the runtime with PID ``pid``."""

    def __init__(
        self,
        pid: int,
        *,
        gpu: GpuMemory | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_count: int | None = None,
    ) -> None:
        self._pid = pid
        self._gpu = gpu if gpu is not None else default_gpu_memory()
        self._clock = clock
        self._cpu_count = cpu_count or psutil.cpu_count() or 1
        self._lock = threading.Lock()
        self._root: psutil.Process | None = None
        # Kept between samples, so a PID reused by an unrelated process is not taken for ours.
        self._processes: dict[int, psutil.Process] = {}
        # CPU seconds of the tree at the previous sample, and when it was taken.
        self._last_cpu: tuple[float, float] | None = None

    async def sample(self) -> ResourceSample:
        return await asyncio.to_thread(self._sample_blocking)

    def _sample_blocking(self) -> ResourceSample:
        # The one place psutil exceptions are translated.
        with self._lock:
            try:
                return self._measure()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                raise ProbeError(Reason.RUNTIME_EXITED) from None
            except (psutil.Error, OSError, _TreeTooLarge):
                raise ProbeError(Reason.MALFORMED_OBSERVATION) from None

    def _measure(self) -> ResourceSample:
        if self._root is None:
            self._root = psutil.Process(self._pid)
            self._processes[self._pid] = self._root
        root = self._root
        if not root.is_running() or root.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(self._pid)
        pids = [self._pid, *_descendants(root)]
        ram_bytes = 0
        cpu_seconds = 0.0
        measured: set[int] = set()
        now = time.monotonic()
        for pid in pids:
            process = self._processes.get(pid)
            try:
                if process is None:
                    process = self._processes[pid] = psutil.Process(pid)
                with process.oneshot():
                    # A zombie still has its CPU times until it is reaped, when they move to
                    # its reaper's children times: read them, or they would drop out and then
                    # come back counted twice.
                    times = process.cpu_times()
                    cpu_seconds += (
                        times.user
                        + times.system
                        + getattr(times, "children_user", 0.0)
                        + getattr(times, "children_system", 0.0)
                    )
                    ram_bytes += process.memory_info().rss
                measured.add(pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                if pid == self._pid:
                    raise
                # A descendant that exited between listing and reading: no longer ours to count.
        for gone in self._processes.keys() - measured:
            del self._processes[gone]
        vram_bytes = self._gpu.process_vram_bytes(frozenset(measured))
        if self._last_cpu is None:
            # The first sample: every CPU second the tree holds was spent since its root (the
            # keeper, or the runtime itself) started, so the share since then is known at once;
            # reading 0 here left the CPU ceiling unenforced until the second sample.
            age = max(_age_s(root), _MIN_AGE_S)
            share = cpu_seconds / age / self._cpu_count * 100.0
        else:
            share = 0.0
            last_seconds, last_at = self._last_cpu
            if now > last_at:
                share = (cpu_seconds - last_seconds) / (now - last_at) / self._cpu_count * 100.0
        self._last_cpu = (cpu_seconds, now)
        # Time that moved out of the tree (a child reaped by a process outside it, where there
        # is no keeper) would read negative; rounding can put the share a hair above 100.
        share = min(max(share, 0.0), 100.0)
        return ResourceSample(
            observation=ResourceObservation(ram_bytes, vram_bytes, share),
            taken_at=self._clock(),
            process_count=len(measured),
        )


#: The local addresses whose listener is what a connection to ``127.0.0.1`` (the health probe's,
#: the front door's) reaches. The port number alone is not enough: a runtime on ``[::1]:P`` (or
#: another loopback address) leaves ``127.0.0.1:P`` free for any process to answer from. ``::``
#: is left out: with ``IPV6_V6ONLY``, which ``/proc`` does not show, it does not hold 127.0.0.1.
_RECEIVES_LOOPBACK: Final = frozenset({"127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1"})  # noqa: S104


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class HeldListener:
    """A listening socket one of the runtime's processes holds."""

    #: The process holding it.
    pid: int
    #: The descriptor it holds it at, and the socket's inode (``-1`` and ``0`` where they
    #: cannot be known: not Linux).
    fd: int = -1
    inode: int = 0


def _proc_address(text: str) -> str:
    """``0100007F`` → ``127.0.0.1``: an address as ``/proc/net/tcp`` shows it (32-bit words
    in the machine's byte order)."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[at : at + 4][::-1] for at in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def _listening_inodes(pid: int, port: int) -> frozenset[int]:
    """The inodes of the sockets listening on TCP ``port`` at an address a connection to
    ``127.0.0.1`` reaches, in ``pid``'s network namespace (anyone's: filtered by ours next)."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 here
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            address, _, port_hex = fields[1].rpartition(":")
            if int(port_hex, 16) == port and _proc_address(address) in _RECEIVES_LOOPBACK:
                inodes.add(int(fields[9]))
    return frozenset(inodes)


def _held_listeners_linux(pid: int, port: int) -> tuple[HeldListener, ...]:
    inodes = _listening_inodes(pid, port)
    if not inodes:
        return ()
    held: list[HeldListener] = []
    for member in (pid, *_descendants(psutil.Process(pid))):
        try:
            descriptors = os.listdir(f"/proc/{member}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between listing and reading: it holds nothing now
        for name in descriptors:
            try:
                target = os.readlink(f"/proc/{member}/fd/{name}")
            except (FileNotFoundError, ProcessLookupError):
                continue  # closed meanwhile, or the process exited
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                held.append(HeldListener(pid=member, fd=int(name), inode=int(target[8:-1])))
    return tuple(held)


def _held_listeners_blocking(pid: int, port: int) -> tuple[HeldListener, ...]:
    if sys.platform.startswith("linux") and Path("/proc/self/fd").is_dir():
        return _held_listeners_linux(pid, port)
    held: list[HeldListener] = []
    for member in (pid, *_descendants(psutil.Process(pid))):
        try:
            connections = psutil.Process(member).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited between listing and reading: it listens on nothing now
        if any(
            connection.status == psutil.CONN_LISTEN
            and connection.laddr.port == port
            and connection.laddr.ip in _RECEIVES_LOOPBACK
            for connection in connections
        ):
            held.append(HeldListener(pid=member))
    return tuple(held)


async def held_listeners_below(pid: int, port: int) -> tuple[HeldListener, ...]:
    """The listening sockets that ``pid`` or processes below it hold on TCP
    ``127.0.0.1:port`` (bound to that address, the IPv4 wildcard or its IPv4-mapped form; in a
    worker thread), one per process and descriptor; empty when there is none. Anything that
    cannot be read counts as none: a listener we cannot show to be the runtime's is not
    trusted."""
    try:
        return await asyncio.to_thread(_held_listeners_blocking, pid, port)
    except (psutil.Error, OSError, ValueError, _TreeTooLarge):
        return ()


async def listeners_below(pid: int, port: int) -> tuple[int, ...]:
    """The processes, ``pid`` or ones below it, that listen on TCP ``127.0.0.1:port``
    (:func:`held_listeners_below`'s processes); empty when none does."""
    return tuple(dict.fromkeys(held.pid for held in await held_listeners_below(pid, port)))


async def listens_below(pid: int, port: int) -> bool:
    """Whether the process ``pid`` or one below it listens on TCP ``127.0.0.1:port``
    (:func:`listeners_below` is not empty)."""
    return bool(await listeners_below(pid, port))


def _headroom_blocking(gpu: GpuMemory) -> MachineHeadroom:
    available = int(psutil.virtual_memory().available)
    present = gpu.present()
    return MachineHeadroom(
        available_ram_bytes=available,
        available_vram_bytes=gpu.free_vram_bytes() if present else 0,
        gpu_present=present,
    )


async def measure_machine_headroom(gpu: GpuMemory | None = None) -> MachineHeadroom:
    """Available RAM and free VRAM now (in a worker thread)."""
    return await asyncio.to_thread(
        _headroom_blocking, gpu if gpu is not None else default_gpu_memory()
    )
