"""The supervisor: one runtime process, driven through the core's lifecycle table.

Theory of operation
-------------------
``start()`` runs, in this order, and stops at the first refusal:

1. **re-verify** the model blob (``verify_file``; SHA-256 by default, size only when the
   policy says so) — a runtime is never started on bytes that did not verify, on the first
   start nor on any restart. The hash runs in a worker thread that a cancelled ``start()`` or
   a ``stop()`` stops between two buffers (milliseconds, not the seconds a multi-GB blob
   takes), and that is then waited for; a re-verify cut short is no refusal and leaves the
   blob as it is. A blob someone other than this user could change (another user's file, or
   one with group or other write permission, not on a read-only mount) is ``store_error``:
   what verified would not be what the runtime loads;
2. **fit**: model size plus an overhead allowance, plus the KV cache a llama.cpp runtime will
   allocate for its context (read from the verified blob's GGUF header), against the machine's
   headroom and the resource ceilings (:func:`~companion_runtime.core._fit.evaluate_model_fit`);
3. **spawn** (``start``: stopped → starting) through the process seam;
4. **health-wait**: the first healthy answer *from the runtime* (a process in its tree listens
   on the port: one that took the port before the runtime bound it is not the runtime), after
   one resource sample has been pushed to the admission controller, gives ``health_ok``
   (starting → ready); none before
   ``ready_timeout_s`` gives ``health_fail`` (starting → stopped) and the process is stopped;
   a process that exits while starting gives ``stopped``.

While ready, three watchers race: the process exit watcher (an exit gives ``stopped`` at once,
so the admission controller refuses every waiter ``not_ready`` without waiting for a health
probe), the health watcher (``failure_threshold`` failed probes give ``health_fail``: ready →
draining, then the process is stopped) and the resource sampler (one sample every
``sample_interval_s`` pushed with ``update_resources``; over a ceiling, the controller refuses
new requests until a later sample is back under it). A runtime that left service is restarted
after an exponential backoff, re-verified and fit-checked again, up to ``max_restarts`` times;
after that the supervisor stays ``stopped`` with ``restart_limit_reached``. A runtime that stays
ready for ``stable_after_s`` earns its restart budget back.

``stop(grace_s)``: ``drain`` (ready → draining: new requests and waiters are refused), wait up
to ``grace_s`` for in-flight requests to finish, then SIGTERM (and SIGCONT, so a stopped
runtime acts on it) to the process group, wait ``kill_grace_s``, SIGKILL, reap, ``stopped``.

Every move goes through :func:`transition_lifecycle`, and every new :class:`Lifecycle` is pushed
to the :class:`AdmissionController` the moment it is taken. All tasks belong to the
supervisor's :class:`asyncio.TaskGroup` (entered with ``async with``) or are awaited by the
code that made them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self, TypeVar, final

from companion_runtime.bind.admission import AdmissionController
from companion_runtime.bind.context_memory import (
    ContextMemory,
    Uncountable,
    estimate_context_memory,
    launcher_refuses,
    unverified_weights,
)
from companion_runtime.bind.directory_trust import ancestors_hold_no_one_else_s_entries
from companion_runtime.bind.filehash import VerifyPolicy, verify_file
from companion_runtime.bind.health import (
    HealthAnswer,
    HealthChecker,
    HealthPolicy,
    HttpHealthChecker,
    wait_until_healthy,
    watch_while_ready,
)
from companion_runtime.bind.manifest import Manifest
from companion_runtime.bind.probe import (
    GpuMemory,
    HeldListener,
    MachineHeadroom,
    ProbeError,
    PsutilResourceProbe,
    ResourceProbe,
    ResourceSample,
    default_gpu_memory,
    held_listeners_below,
    listens_below,
    measure_machine_headroom,
)
from companion_runtime.bind.process import (
    DEFAULT_OUTPUT_CAP_BYTES,
    ProcessError,
    ProcessLauncher,
    RuntimeProcess,
    SubprocessLauncher,
    build_launch_spec,
    uses_api_key_file,
)
from companion_runtime.bind.worker import run_cancellable
from companion_runtime.core import (
    ALLOW,
    Lifecycle,
    LifecycleEvent,
    LifecycleState,
    Reason,
    ResourceLimits,
    SpecError,
    Verdict,
    create_lifecycle_state,
    create_resource_limits,
    deny,
    transition_lifecycle,
)
from companion_runtime.core._fit import evaluate_model_fit

__all__ = [
    "DEFAULT_OVERHEAD_BYTES",
    "Supervisor",
    "SupervisorConfig",
    "check_fit",
    "check_model_fit",
    "check_runtime_command",
    "describe_exit",
]

#: RAM allowed for the runtime beyond the model's bytes (code, KV cache, buffers) by default.
DEFAULT_OVERHEAD_BYTES: Final = 256 * 1024 * 1024
_DRAIN_POLL_S: Final = 0.01
_RECENT_MOVES: Final = 64

_T = TypeVar("_T")
_logger = logging.getLogger(__name__)


def _size(count: int) -> str:
    """``8,192 MiB``, ``419 KiB``, ``12 B``: a byte count as a person reads it."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):,.0f} {unit}"
    return f"{count} B"


def _positive(value: object) -> bool:
    return type(value) in (int, float) and 0 < value < math.inf  # type: ignore[operator]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorConfig:
    """Everything the supervisor needs; bad values raise :class:`SpecError` (``malformed_spec``)."""

    #: The runtime's argv template (``{model_path}``, ``{port}``, ``{host}``).
    command_template: tuple[str, ...]
    #: The verified model blob the runtime is started on.
    model_path: Path
    #: Its SHA-256 (64 lowercase hex) and size, re-checked before every spawn.
    expected_digest: str
    expected_size_bytes: int
    #: ``"full"`` re-hashes the blob; ``"size_only"`` (opt-in) only compares its size.
    verify_policy: VerifyPolicy = "full"
    #: Ceilings the controller enforces and the fit check uses.
    resource_limits: ResourceLimits
    #: Admission bounds.
    max_in_flight: int = 4
    queue_bound: int = 64
    queue_timeout_s: float = 30.0
    #: The runtime's health path and how long a start may take to turn healthy.
    health_path: str = "/health"
    ready_timeout_s: float = 120.0
    health: HealthPolicy = field(default_factory=HealthPolicy)
    #: Seconds between resource samples; a sample older than ``max_sample_age_s`` denies.
    sample_interval_s: float = 1.0
    max_sample_age_s: float = 5.0
    #: Fit check: RAM beyond the model's bytes, and whether weights go to the GPU.
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES
    gpu_offload: bool = False
    #: Restarts after the runtime left service; backoff doubles from ``restart_backoff_s``.
    max_restarts: int = 3
    restart_backoff_s: float = 0.5
    max_restart_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    #: ``stop()``: seconds for in-flight requests, then seconds between SIGTERM and SIGKILL.
    stop_grace_s: float = 10.0
    kill_grace_s: float = 5.0
    #: Extra environment for the runtime (on top of the scrubbed allowlist).
    extra_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    output_cap_bytes: int = DEFAULT_OUTPUT_CAP_BYTES

    def __post_init__(self) -> None:
        ok = (
            isinstance(self.command_template, tuple)
            and all(type(argument) is str for argument in self.command_template)
            and isinstance(self.model_path, Path)
            and type(self.expected_size_bytes) is int
            and self.verify_policy in ("full", "size_only")
            and type(self.resource_limits) is ResourceLimits
            and type(self.max_restarts) is int
            and self.max_restarts >= 0
            and type(self.overhead_bytes) is int
            and self.overhead_bytes >= 0
            and type(self.gpu_offload) is bool
            and type(self.health_path) is str
            and self.health_path.startswith("/")
            and isinstance(self.health, HealthPolicy)
            and all(
                _positive(value)
                for value in (
                    self.queue_timeout_s,
                    self.ready_timeout_s,
                    self.sample_interval_s,
                    self.max_sample_age_s,
                    self.restart_backoff_s,
                    self.max_restart_backoff_s,
                    self.stable_after_s,
                    self.stop_grace_s,
                    self.kill_grace_s,
                )
            )
        )
        if not ok:
            raise SpecError(Reason.MALFORMED_SPEC)


def check_fit(
    *,
    model_size_bytes: int,
    headroom: MachineHeadroom,
    resource_limits: ResourceLimits,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    gpu_offload: bool = False,
) -> Verdict:
    """The fit check against a measured headroom (``model_too_large`` when it cannot fit)."""
    return evaluate_model_fit(
        model_size_bytes=model_size_bytes,
        overhead_bytes=overhead_bytes,
        available_ram_bytes=headroom.available_ram_bytes,
        available_vram_bytes=headroom.available_vram_bytes,
        resource_limits=resource_limits,
        gpu_offload=gpu_offload,
    )


def _limits_of(manifest: Manifest) -> ResourceLimits:
    limits = manifest.limits
    return create_resource_limits(
        max_ram_bytes=limits.max_ram_bytes,
        max_vram_bytes=limits.max_vram_bytes,
        max_cpu_percent=limits.max_cpu_percent,
    )


async def check_model_fit(
    manifest: Manifest,
    *,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    gpu_offload: bool = False,
    gpu: GpuMemory | None = None,
) -> Verdict:
    """Will the manifest's model fit here? Uses the manifest's size alone, so it can run
    **before** the download; measures the machine's headroom now."""
    headroom = await measure_machine_headroom(gpu)
    return check_fit(
        model_size_bytes=manifest.model.size_bytes,
        headroom=headroom,
        resource_limits=_limits_of(manifest),
        overhead_bytes=overhead_bytes,
        gpu_offload=gpu_offload,
    )


def check_runtime_command(manifest: Manifest) -> Verdict:
    """Could the manifest's runtime command be run at all? From the manifest alone, so it can
    run **before** the download: a template the supervisor would refuse (``malformed_spec``) or
    an executable that is missing or cannot be run (``executable_not_allowed``: a directory,
    no execute permission, a ``#!`` interpreter that is missing or not executable, on Linux a
    file that is neither a ``#!`` script nor ELF) is known now, not after a multi-GB model has
    been fetched for it; so is a llama.cpp server told to load another model than the verified
    one or any other weights (``malformed_spec``: a later ``-m``, none, ``-hf``, a draft model,
    ``--mmproj``, ``--lora``; see :func:`unverified_weights`)."""
    template = manifest.runtime.command
    try:
        build_launch_spec(
            template,
            model_path="model",
            port=1,
            api_key_file="api-key" if uses_api_key_file(template) else None,
            base_env={},
        )
    except ProcessError as error:
        return deny(error.reason)
    if launcher_refuses(template):
        _logger.warning(
            "the embedded launcher would refuse its command line (an option it does not take, "
            "or a value it does not accept); its --help lists what it takes"
        )
        return deny(Reason.MALFORMED_SPEC)
    return _verified_model_only(template, {})


def _verified_model_only(template: Sequence[str], environ: Mapping[str, str]) -> Verdict:
    """``malformed_spec`` for a command whose llama.cpp server would load weights other than
    the verified blob (:func:`unverified_weights`): bytes nobody verified would run. The
    warning names the option, never its value."""
    unverified = unverified_weights(template, environ)
    if unverified is not None:
        _logger.warning(
            "the runtime command loads weights the manifest does not verify (%s); "
            "only {model_path} is verified",
            unverified,
        )
        return deny(Reason.MALFORMED_SPEC)
    return ALLOW


def describe_exit(status: int | None) -> str:
    """``exit status 3`` or ``signal 9 (SIGKILL)`` for a ``returncode`` as Popen gives it."""
    if status is None:
        return "exit status unknown"
    if status >= 0:
        return f"exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"
    return f"signal {-status} ({name})"


def _config_from_manifest(
    manifest: Manifest,
    model_path: str | os.PathLike[str],
    *,
    verify_policy: VerifyPolicy = "full",
    **settings: Any,
) -> SupervisorConfig:
    return SupervisorConfig(
        command_template=tuple(manifest.runtime.command),
        model_path=Path(model_path),
        expected_digest=manifest.model.sha256,
        expected_size_bytes=manifest.model.size_bytes,
        verify_policy=verify_policy,
        resource_limits=_limits_of(manifest),
        max_in_flight=manifest.limits.max_in_flight,
        queue_bound=manifest.limits.queue_bound,
        queue_timeout_s=float(manifest.limits.queue_timeout_s),
        health_path=manifest.runtime.health_path,
        ready_timeout_s=float(manifest.runtime.ready_timeout_s),
        **settings,
    )


def _holders_of(
    listens: Callable[[int, int], Awaitable[bool]],
) -> Callable[[int, int], Awaitable[tuple[HeldListener, ...]]]:
    """A ``listens`` seam that answers yes or no, as :func:`held_listeners_below` answers: the
    runtime's own pid stands for the process holding the listener, at a descriptor unknown."""

    async def holders(pid: int, port: int) -> tuple[HeldListener, ...]:
        return (HeldListener(pid=pid),) if await listens(pid, port) else ()

    return holders


async def _first_of(*coroutines: Coroutine[Any, Any, _T]) -> _T:
    """Run the coroutines concurrently; return the first result and cancel (and await) the rest."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(task for task in tasks if task in done)
        return first.result()
    finally:
        for task in tasks:
            task.cancel()
        # Only our own tasks' outcomes are collected here; our own cancellation still raises.
        await asyncio.gather(*tasks, return_exceptions=True)


@final
class _RuntimeHealth:
    """The health seam, healthy only when the runtime itself answers.

    The runtime's port is picked free and released before the runtime binds it; a process
    outside the runtime's tree that takes it first (the port is in the runtime's argv, which
    any local user can read) and answers ``200`` must not make the runtime ready, nor receive
    the requests and the runtime key the front door would then send it.

    Once the runtime's own listener has been seen on the port, no other socket can bind the
    port (``SO_REUSEPORT`` needs the same user on both sides) while that socket is held. So
    the check, which reads the tree's sockets from ``/proc`` (about 11 ms, more with many
    sockets on the machine), runs until it passes; the listening sockets it found (process,
    descriptor, inode) go to ``on_owned``, for :meth:`Supervisor.runtime_listening`. While
    ready, a probe is sent, and its healthy answer counts, only while ``still_owned`` (one
    ``stat``) says those sockets are still held, or ``find_again`` finds the runtime's
    listener anew (a runtime that re-executed itself opened a new one); it is asked before
    the probe and again after it. A runtime that closed its listener and lives on while
    another process took the port is not healthy, and is restarted on a new port, where it
    had stayed ready with every request refused ``runtime_gone`` for as long as that process
    held the port; that process is sent no probe either.
    """

    def __init__(
        self,
        checker: HealthChecker,
        *,
        pid: int,
        port: int,
        listeners: Callable[[int, int], Awaitable[tuple[HeldListener, ...]]],
        on_owned: Callable[[tuple[HeldListener, ...]], None],
        still_owned: Callable[[], bool],
        find_again: Callable[[], Awaitable[bool]],
    ) -> None:
        self._checker = checker
        self._pid = pid
        self._port = port
        self._listeners = listeners
        self._on_owned = on_owned
        self._still_owned = still_owned
        self._find_again = find_again
        self._owned = False

    async def check(self) -> HealthAnswer:
        if self._owned and not await self._holds_listener():
            # Not even a probe goes to a port the runtime no longer holds.
            return HealthAnswer.FOREIGN_LISTENER
        answer = await self._checker.check()
        if answer is not HealthAnswer.HEALTHY:
            return answer
        if self._owned:
            # Checked again: the listener may have changed hands while the probe was out.
            if await self._holds_listener():
                return answer
            return HealthAnswer.FOREIGN_LISTENER
        holders = await self._listeners(self._pid, self._port)
        if not holders:
            return HealthAnswer.FOREIGN_LISTENER
        self._owned = True
        self._on_owned(holders)
        return answer

    async def _holds_listener(self) -> bool:
        return self._still_owned() or await self._find_again()


@dataclass(frozen=True, slots=True)
class _Ended:
    """Why one run of the runtime ended (private to the runner)."""

    reason: Reason
    was_ready: bool


class _StopRequested:
    pass


_STOP: Final = _StopRequested()


@final
class Supervisor:
    """Supervises one runtime process; see the module docstring.

    Build it with :meth:`from_manifest` or from a :class:`SupervisorConfig`. Use it as an async
    context manager (which owns its monitor tasks; leaving it stops the runtime)::

        async with Supervisor.from_manifest(manifest, model_path) as supervisor:
            verdict = await supervisor.start()
            async with supervisor.controller.slot(deadline=...):
                ...  # talk to supervisor.runtime_url
    """

    def __init__(
        self,
        config: SupervisorConfig | Manifest,
        *,
        model_path: str | os.PathLike[str] | None = None,
        launcher: ProcessLauncher | None = None,
        verifier: Callable[[Path], Awaitable[Verdict]] | None = None,
        probe_factory: Callable[[int], ResourceProbe] | None = None,
        checker_factory: Callable[[str], contextlib.AbstractAsyncContextManager[HealthChecker]]
        | None = None,
        headroom: Callable[[], Awaitable[MachineHeadroom]] | None = None,
        gpu: GpuMemory | None = None,
        clock: Callable[[], float] = time.monotonic,
        listens: Callable[[int, int], Awaitable[bool]] = listens_below,
    ) -> None:
        """``Supervisor(config)``, or ``Supervisor(manifest, model_path=...)`` (same as
        :meth:`from_manifest` with default settings). Seams default to the real adapters;
        tests replace a seam only to make a fault."""
        if type(config) is Manifest and model_path is not None:
            config = _config_from_manifest(config, model_path)
        if type(config) is not SupervisorConfig:
            raise SpecError(Reason.MALFORMED_SPEC)
        self._config = config
        self._clock = clock
        self._gpu = gpu if gpu is not None else default_gpu_memory()
        self._launcher: ProcessLauncher = launcher or SubprocessLauncher()
        self._verifier = verifier or self._verify_blob
        self._probe_factory = probe_factory or (
            lambda pid: PsutilResourceProbe(pid, gpu=self._gpu, clock=clock)
        )
        self._checker_factory = checker_factory or (
            lambda url: HttpHealthChecker(url, probe_timeout_s=config.health.probe_timeout_s)
        )
        self._headroom = headroom or (lambda: measure_machine_headroom(self._gpu))
        self._listeners: Callable[[int, int], Awaitable[tuple[HeldListener, ...]]] = (
            held_listeners_below if listens is listens_below else _holders_of(listens)
        )
        self.controller: Final = AdmissionController(
            max_in_flight=config.max_in_flight,
            queue_bound=config.queue_bound,
            resource_limits=config.resource_limits,
            max_sample_age_s=config.max_sample_age_s,
            clock=clock,
        )
        self._lifecycle: Lifecycle = create_lifecycle_state()
        self._task_group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        # A start() between its first check and the runner it creates (the re-verify).
        self._start_pending = False
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._process: RuntimeProcess | None = None
        self._runtime_url: str | None = None
        # The listening sockets found holding the runtime's port this run, as the
        # /proc/<pid>/fd/<fd> path each is held at and its inode (None: not found yet); and
        # whether they were found by process alone (not Linux, or a seam that says yes or no).
        self._held_listeners: tuple[tuple[str, int], ...] | None = None
        self._listeners_untold = False
        self._last_pid: int | None = None
        # How the last run that ended by itself ended: an exit status, or -N for signal N.
        self._last_exit_status: int | None = None
        # The last fit check's estimate of the runtime's KV cache (None: not a llama.cpp one).
        self._context_memory: ContextMemory | None = None
        #: The repacked weights the last fit check counted (0 where they do not stay in RAM).
        self._context_repacked_bytes = 0
        self._last_sample: ResourceSample | None = None
        # False once a sample could not be taken: the last one is still shown, no longer used.
        self._sample_in_force = False
        self._last_reason: Reason = Reason.OK
        self._given_up = asyncio.Event()
        self._api_key_path: Path | None = None
        self._runtime_authorization: bytes | None = None
        self._ready_latency_s: float | None = None
        self._ready_since: float | None = None
        self._spawns = 0
        self._restarts = 0
        self._restarts_total = 0
        self._refused_moves = 0
        self._moves: collections.deque[tuple[float, LifecycleState]] = collections.deque(
            maxlen=_RECENT_MOVES
        )

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        model_path: str | os.PathLike[str],
        *,
        verify_policy: VerifyPolicy = "full",
        launcher: ProcessLauncher | None = None,
        **settings: Any,
    ) -> Supervisor:
        """Build a supervisor for ``manifest``'s runtime on the verified blob ``model_path``.

        ``settings`` are further :class:`SupervisorConfig` fields (``sample_interval_s``,
        ``max_restarts``, ``overhead_bytes``, ...).
        """
        config = _config_from_manifest(
            manifest, model_path, verify_policy=verify_policy, **settings
        )
        return cls(config, launcher=launcher)

    # --- public surface -------------------------------------------------------------------

    @property
    def lifecycle(self) -> Lifecycle:
        """The current lifecycle state."""
        return self._lifecycle

    @property
    def runtime_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` while a runtime process runs, else ``None``."""
        return self._runtime_url

    @property
    def runtime_authorization(self) -> bytes | None:
        """The ``Authorization`` value the runtime demands, or None when it demands none.

        Set when the command template uses ``{api_key_file}``: a random key, written to a
        private file (0600, in a 0700 directory) whose path fills the placeholder, so that only
        whoever holds the key (the front door) can use the runtime's port. Each run of the
        runtime (each restart) gets a new key.
        """
        return self._runtime_authorization

    def runtime_listening(self) -> bool:
        """Whether the runtime's port is still the runtime's: a runtime runs, and every
        listening socket found holding its port (when it turned ready, or last by
        :meth:`find_runtime_listener`) is still held by the process it was found in, at the
        same descriptor.

        The front door asks this once a new connection to :attr:`runtime_url` is made and
        before it sends anything on it. The port is in the runtime's argv for every local
        user to read and is free the moment no socket listens on it: when the runtime dies,
        while requests still hold slots and before the exit is seen, and when a runtime that
        lives on closes its listener (one that re-executes itself does, and opens a new one a
        moment later). A process that binds it then must not receive a request, its body or
        the runtime's key. No other socket can take a port while a listener holds it, so a
        connection made before this answers ``True`` reached the runtime. The process alone
        is not enough: it may have closed that socket and live on. Every socket, not any: a
        process that shared the listener may have closed its copy, and the one that went was
        then the last holding it. One ``stat`` of ``/proc/<pid>/fd/<fd>`` per socket found
        (usually one), its inode compared; where the sockets cannot be named (not Linux),
        only the first part holds.
        """
        if self._runtime_url is None:
            return False
        if self._listeners_untold:
            return True
        held = self._held_listeners
        if not held:
            return False  # not found yet, or none found
        for path, inode in held:
            try:
                found = os.stat(path)
            except OSError:
                return False  # closed, or its process exited
            if found.st_ino != inode or not stat.S_ISSOCK(found.st_mode):
                return False  # closed, and the descriptor reused (a file's inode may match)
        return True

    async def find_runtime_listener(self) -> bool:
        """Look again for the listening sockets of the runtime's tree on its port, after
        :meth:`runtime_listening` said no while the runtime runs; True when some hold it now
        (``runtime_listening`` watches those from then on), False when none does.

        A runtime may hand its listener on: a pre-forking server's worker that exits leaves
        it to its successor, a wrapper restarts its server on the same port, a runtime that
        re-executes itself opens a new one. The answer is the check made at ready (the tree's
        sockets, read from ``/proc`` in a worker thread, about 11 ms), so it is asked only
        when ``runtime_listening`` said no, and a connection made before it is not used: the
        front door makes a new one.
        """
        process = self._process
        url = self._runtime_url
        if process is None or url is None or self._listeners_untold:
            return False
        holders = await self._listeners(process.pid, int(url.rsplit(":", 1)[1]))
        if not holders or self._process is not process or self._runtime_url != url:
            return False
        self._watch_listeners(holders)
        return self.runtime_listening()

    def _watch_listeners(self, held: tuple[HeldListener, ...]) -> None:
        if any(listener.fd < 0 for listener in held):
            self._held_listeners = None
            self._listeners_untold = True  # runtime_listening cannot tell
            return
        self._listeners_untold = False
        self._held_listeners = tuple(
            (f"/proc/{listener.pid}/fd/{listener.fd}", listener.inode) for listener in held
        )

    def _forget_runtime_address(self) -> None:
        """Nothing more goes to this run's port (its runtime has exited or is being stopped)."""
        self._runtime_url = None
        self._held_listeners = None
        self._listeners_untold = False

    @property
    def config(self) -> SupervisorConfig:
        """The configuration it was built with."""
        return self._config

    async def __aenter__(self) -> Self:
        task_group = asyncio.TaskGroup()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        assert task_group is not None, "__aexit__ without __aenter__"
        try:
            await self.stop()
        finally:
            self._task_group = None
            self._remove_api_key_file()
            try:
                await task_group.__aexit__(exc_type, exc, traceback)
            except BaseExceptionGroup as group:
                # A task group wraps the exception its body raised, alone, in a group: the
                # caller's own exception (a refusal it raised inside this context) must reach
                # it as raised, not as an ExceptionGroup no handler of its expects.
                if exc is None or list(group.exceptions) != [exc]:
                    raise
        return None

    def _new_api_key_file(self) -> Path:
        """The runtime's key file with a new key, for the run about to start.

        One key per run, not per supervisor: the key goes to whatever accepted the front
        door's connection to the runtime's port, and a key that reached someone else must not
        open the next run's runtime (whose port anyone can read in its argv). Each run's key
        is a new file (0600, created exclusively) in a new 0700 directory, which the run's
        keeper removes when the runtime ends, also after a manager killed with SIGKILL.
        """
        self._remove_api_key_file()
        key = secrets.token_urlsafe(32)
        directory = Path(tempfile.mkdtemp(prefix="companion-runtime-key-"))  # mode 0700
        path = self._api_key_path = directory / "api-key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key + "\n")
        self._runtime_authorization = b"Bearer " + key.encode("ascii")
        return path

    def _remove_api_key_file(self) -> None:
        path = self._api_key_path
        self._api_key_path = None
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    async def check_fit(self) -> Verdict:
        """The fit check on the current headroom, from the configured size alone."""
        config = self._config
        return check_fit(
            model_size_bytes=config.expected_size_bytes,
            headroom=await self._headroom(),
            resource_limits=config.resource_limits,
            overhead_bytes=config.overhead_bytes,
            gpu_offload=config.gpu_offload,
        )

    async def start(self) -> Verdict:
        """Re-verify, fit-check, spawn and wait until ready; return why not, if not.

        Refusals: the verifier's reason (``digest_mismatch``, ``size_mismatch``,
        ``file_not_found``...), ``model_too_large``, ``malformed_spec`` /
        ``executable_not_allowed`` (command), ``spawn_failed``, ``ready_timeout``,
        ``runtime_exited`` (died while starting), ``not_ready`` (stopped while starting),
        ``invalid_transition`` (already running, or another start() is still under way).
        """
        task_group = self._task_group
        if task_group is None:
            raise RuntimeError("use 'async with Supervisor(...)' before start()")
        if self._start_pending or (self._runner is not None and not self._runner.done()):
            # A start still in its re-verify counts as running: a second one would take over
            # self._runner, and stop() would then wait for the wrong runner.
            return deny(Reason.INVALID_TRANSITION)
        self._start_pending = True
        try:
            return await self._start(task_group)
        finally:
            self._start_pending = False

    async def _start(self, task_group: asyncio.TaskGroup) -> Verdict:
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._restarts = 0
        # A start that failed before gave up then; this one has not (yet).
        self._given_up.clear()
        self._last_reason = Reason.OK
        prepared = await self._prepare_unless_stopped()
        if prepared is None:
            self._last_reason = Reason.NOT_READY
            return deny(Reason.NOT_READY)
        if not prepared.ok:
            self._last_reason = prepared.reason
            return prepared
        first_run: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        runner = task_group.create_task(self._run(first_run))
        self._runner = runner
        either: set[asyncio.Future[Any]] = {first_run, runner}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if first_run.done():
            return first_run.result()
        runner.result()  # the runner failed: its exception, not a verdict
        return deny(self._last_reason if self._last_reason is not Reason.OK else Reason.NOT_READY)

    async def stop(self, *, grace_s: float | None = None) -> None:
        """Drain (wait up to ``grace_s`` for in-flight requests), then stop the process.

        A re-verify of the blob in progress, before a start or a restart, is cut short.
        """
        grace = self._config.stop_grace_s if grace_s is None else grace_s
        self._stopping = True
        if self._lifecycle.state is LifecycleState.READY and self._move(LifecycleEvent.DRAIN):
            deadline = self._clock() + max(grace, 0.0)
            while self.controller.statistics().in_flight and self._clock() < deadline:
                if self._runner is None or self._runner.done():
                    break
                await asyncio.sleep(_DRAIN_POLL_S)
        self._stop_requested.set()
        runner = self._runner
        if runner is not None:
            # Waited, not awaited: a runner that failed reports through the task group.
            await asyncio.wait({runner})
            self._runner = None

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot: state, admission counters, last sample, restarts, pid."""
        statistics = self.controller.statistics()
        sample = self._last_sample
        age_s = 0.0 if sample is None else max(self._clock() - sample.taken_at, 0.0)
        process = self._process
        return {
            "state": self._lifecycle.state.value,
            "in_flight": statistics.in_flight,
            "queued": statistics.queued,
            "admitted_total": statistics.admitted_total,
            "completed_total": statistics.completed_total,
            "refused_total": statistics.refused_total,
            "refused_by_reason": dict(statistics.refused_by_reason),
            "pid": process.pid if process is not None else None,
            "last_pid": self._last_pid,
            "last_exit_status": self._last_exit_status,
            "context": None
            if self._context_memory is None
            else {
                "tokens": self._context_memory.context_tokens,
                "kv_cache_bytes": self._context_memory.bytes - self._context_memory.recurrent_bytes,
                "recurrent_state_bytes": self._context_memory.recurrent_bytes,
                "metadata_bytes": self._context_memory.metadata_bytes,
                "repacked_weights_bytes": self._context_repacked_bytes,
            },
            "runtime_url": self._runtime_url,
            "spawns": self._spawns,
            "restarts": self._restarts_total,
            "last_reason": self._last_reason.value,
            "ready_latency_s": self._ready_latency_s,
            "refused_moves": self._refused_moves,
            "last_sample": None
            if sample is None
            else {
                "ram_bytes": sample.observation.ram_bytes,
                "vram_bytes": sample.observation.vram_bytes,
                "cpu_percent": sample.observation.cpu_percent,
                "age_s": age_s,
                "process_count": sample.process_count,
                # What admission decides on: False once a newer sample could not be taken, or
                # once this one is older than max_sample_age_s (refused malformed_observation).
                "in_force": self._sample_in_force and age_s <= self._config.max_sample_age_s,
            },
            "recent_moves": [{"at": at, "state": state.value} for at, state in self._moves],
        }

    # --- the moves ----------------------------------------------------------------------------

    def _move(self, event: LifecycleEvent) -> bool:
        """Ask the table; on a legal move take it and push it to the controller at once."""
        transition = transition_lifecycle(self._lifecycle, event)
        if not transition.ok:
            self._refused_moves += 1
            return False
        self._lifecycle = transition.new_state
        self.controller.set_lifecycle(transition.new_state)
        self._moves.append((self._clock(), transition.new_state.state))
        return True

    async def _verify_blob(self, path: Path) -> Verdict:
        """``verify_file`` in a worker thread that a cancel stops between two buffers, for a
        blob only this user can change, at a name no one else can point elsewhere.

        Cancelled, it raises ``CancelledError`` once the hash has stopped: the ``cancelled``
        verdict says nothing about the blob and is never reported as a refusal.
        """
        config = self._config

        def verify(cancel: threading.Event) -> Verdict:
            # Nor are bytes at a name someone else could point elsewhere: whoever may rename
            # the entries of a directory on the way puts another file there after this.
            way = _way_held_by_no_one_else(path)
            if way is False:
                return deny(Reason.STORE_ERROR)
            verdict = verify_file(
                path,
                expected_digest=config.expected_digest,
                expected_size_bytes=config.expected_size_bytes,
                policy=config.verify_policy,
                cancelled=cancel.is_set,
                # Bytes someone else could change after this are not what the runtime loads.
                private=True,
            )
            if verdict.ok and way is None:
                return deny(Reason.STORE_ERROR)  # there now, but its way was not looked at
            return verdict

        return await run_cancellable(verify)

    async def _prepare(self) -> Verdict:
        """Re-verify the blob, then the fit check. Runs before every spawn.

        The fit check here counts, on top of the configured allowance, the KV cache a llama.cpp
        runtime will allocate for its context (:func:`estimate_context_memory`, read from the
        verified blob's header): it is allocated as the model loads, before any sample."""
        config = self._config
        verified = await self._verifier(config.model_path)
        if not verified.ok:
            return verified
        only_verified = _verified_model_only(config.command_template, config.extra_env)
        if not only_verified.ok:
            return only_verified
        context = await asyncio.to_thread(
            estimate_context_memory, config.model_path, config.command_template, config.extra_env
        )
        if isinstance(context, Uncountable):
            # llama.cpp would run it (a header or a configuration file this large, a model
            # other than the verified one); what its cache would take, nobody has counted.
            # Refused rather than counted as nothing.
            self._context_memory = None
            _logger.warning(
                "the model does not fit: the KV cache it needs cannot be counted (%s)",
                context.what,
            )
            return deny(Reason.MODEL_TOO_LARGE)
        self._context_memory = context
        headroom = await self._headroom()
        # The vocabulary and the other metadata llama.cpp holds as it loads, beside the cache;
        # and, where the weights stay in RAM, the copy the CPU backend repacks beside them.
        in_ram = not (config.gpu_offload and headroom.available_vram_bytes > 0)
        context_bytes = (
            0
            if context is None
            else context.bytes + context.metadata_bytes + (context.repacked_bytes if in_ram else 0)
        )
        verdict = check_fit(
            model_size_bytes=config.expected_size_bytes,
            headroom=headroom,
            resource_limits=config.resource_limits,
            overhead_bytes=config.overhead_bytes + context_bytes,
            gpu_offload=config.gpu_offload,
        )
        repacked = context.repacked_bytes if context is not None and in_ram else 0
        self._context_repacked_bytes = repacked
        # The copy is named apart, with what turns it off: it is no part of the runtime's
        # allowance, and no smaller context makes it go away.
        weights = (
            _size(config.expected_size_bytes)
            + " of weights"
            + (
                f", {_size(repacked)} of them again as the CPU backend repacks them "
                "(none with --no-repack or --load-mode none)"
                if repacked
                else ""
            )
        )
        if not verdict.ok and context is not None and context.recurrent_bytes > 0:
            # A recurrent state is per slot, whatever the context: fewer slots need less.
            kv_cache = context.bytes - context.recurrent_bytes
            _logger.warning(
                "the model does not fit: %s, %s%s of recurrent state and %s for the "
                "runtime; fewer slots (-np) need less",
                weights,
                f"{_size(kv_cache)} of KV cache for a {context.context_tokens}-token context, "
                if kv_cache
                else "",
                _size(context.recurrent_bytes),
                _size(config.overhead_bytes + context_bytes - context.bytes - repacked),
            )
        elif not verdict.ok and context is not None and (context.bytes > 0 or repacked):
            # Sizes only: no path, no digest. The context is what the user can change.
            _logger.warning(
                "the model does not fit: %s, %s of KV cache for a %d-token context "
                "and %s for the runtime; a smaller context (-c) needs less",
                weights,
                _size(context.bytes),
                context.context_tokens,
                _size(config.overhead_bytes + context_bytes - context.bytes - repacked),
            )
        return verdict

    async def _prepare_unless_stopped(self) -> Verdict | None:
        """:meth:`_prepare`, cut short (None) by a stop: a re-verify takes seconds on a big blob."""
        outcome = await _first_of(self._prepare(), self._wait_stop())
        return outcome if isinstance(outcome, Verdict) else None

    # --- the runner ---------------------------------------------------------------------------

    async def _run(self, first_run: asyncio.Future[Verdict]) -> None:
        """Run the runtime, restarting it with backoff, until stopped or out of restarts."""
        config = self._config
        first_attempt = True
        try:
            while True:
                ended = await self._run_once(first_run)
                self._last_reason = ended.reason
                if self._stopping or (first_attempt and not ended.was_ready):
                    # A first start that failed is reported by start(), not retried.
                    break
                first_attempt = False
                if (
                    ended.was_ready
                    and self._ready_since is not None
                    and self._clock() - self._ready_since >= config.stable_after_s
                ):
                    self._restarts = 0
                self._restarts += 1
                if self._restarts > config.max_restarts:
                    self._last_reason = Reason.RESTART_LIMIT_REACHED
                    break
                delay = min(
                    config.restart_backoff_s * 2 ** (self._restarts - 1),
                    config.max_restart_backoff_s,
                )
                if await self._sleep_unless_stopped(delay):
                    break
                prepared = await self._prepare_unless_stopped()
                if prepared is None:
                    break
                if not prepared.ok:
                    self._last_reason = prepared.reason
                    break
                self._restarts_total += 1
        finally:
            if not self._stopping:
                # Out of restarts, or a pre-restart check refused: nothing will bring the
                # runtime back, and whoever serves through it should know (``wait_given_up``).
                self._given_up.set()
            if not first_run.done():
                first_run.set_result(deny(self._last_reason_or(Reason.NOT_READY)))

    async def wait_given_up(self) -> Reason:
        """Wait until the supervisor stops restarting the runtime for good; return why.

        That is ``restart_limit_reached``, or the refusal of a check it runs before every
        restart (re-verify, fit). A stop requested through :meth:`stop` never counts: this
        then waits forever, so use it alongside the caller's own stop signal.
        """
        await self._given_up.wait()
        return self._last_reason_or(Reason.NOT_READY)

    def _last_reason_or(self, fallback: Reason) -> Reason:
        return fallback if self._last_reason is Reason.OK else self._last_reason

    async def _sleep_unless_stopped(self, delay_s: float) -> bool:
        """Sleep ``delay_s``; True when a stop was requested meanwhile."""
        outcome = await _first_of(self._sleep_none(delay_s), self._wait_stop())
        return outcome is _STOP

    async def _sleep_none(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    async def _wait_stop(self) -> _StopRequested:
        await self._stop_requested.wait()
        return _STOP

    async def _run_once(self, first_run: asyncio.Future[Verdict]) -> _Ended:
        config = self._config
        try:
            key_file = (
                self._new_api_key_file() if uses_api_key_file(config.command_template) else None
            )
            spec = build_launch_spec(
                config.command_template,
                model_path=config.model_path,
                api_key_file=key_file,
                extra_env=config.extra_env,
                output_cap_bytes=config.output_cap_bytes,
            )
            if key_file is not None:
                # The keeper removes them when this run ends, however the manager ends.
                spec = dataclasses.replace(spec, run_files=(str(key_file), str(key_file.parent)))
        except ProcessError as error:
            return _Ended(error.reason, was_ready=False)
        except OSError:
            return _Ended(Reason.SPAWN_FAILED, was_ready=False)  # the key file: no temp dir
        if self._stop_requested.is_set() or not self._move(LifecycleEvent.START):
            return _Ended(Reason.NOT_READY, was_ready=False)
        was_ready = False
        try:
            self._spawns += 1
            async with (
                self._launcher.launch(spec, stop_grace_s=config.kill_grace_s) as process,
                self._checker_factory(spec.base_url + config.health_path) as http_checker,
            ):
                checker = _RuntimeHealth(
                    http_checker,
                    pid=process.pid,
                    port=spec.port,
                    listeners=self._listeners,
                    on_owned=self._watch_listeners,
                    still_owned=self.runtime_listening,
                    find_again=self.find_runtime_listener,
                )
                self._process = process
                self._last_pid = process.pid
                self._runtime_url = spec.base_url
                probe = self._probe_factory(process.pid)
                try:
                    reason = await self._until_ready(process, checker, probe)
                    if reason is Reason.OK:
                        was_ready = True
                        self._resolve(first_run, ALLOW)
                        reason = await self._while_ready(process, checker, probe)
                finally:
                    # Before the process is told to stop: a runtime may close its listener
                    # long before it exits, and from then on its port is anyone's.
                    self._forget_runtime_address()
                # Leaving the launch context stops the process: SIGTERM, grace, SIGKILL. A
                # failed first start is reported (by _run) only after that, with it gone.
        except ProcessError as error:
            reason = error.reason
        finally:
            self._process = None
            self._forget_runtime_address()
            # The exit watcher or a failed health wait may have moved to stopped already.
            if self._lifecycle.state is not LifecycleState.STOPPED:
                self._move(LifecycleEvent.STOPPED)
        return _Ended(reason, was_ready=was_ready)

    @staticmethod
    def _resolve(future: asyncio.Future[Verdict], verdict: Verdict) -> None:
        if not future.done():
            future.set_result(verdict)

    async def _until_ready(
        self, process: RuntimeProcess, checker: HealthChecker, probe: ResourceProbe
    ) -> Reason:
        config = self._config

        async def healthy() -> Reason:
            wait = await wait_until_healthy(
                checker,
                ready_timeout_s=config.ready_timeout_s,
                policy=config.health,
                clock=self._clock,
            )
            if wait.event is not LifecycleEvent.HEALTH_OK or wait.answered_at is None:
                self._move(LifecycleEvent.HEALTH_FAIL)
                return Reason.READY_TIMEOUT
            # The controller denies without a fresh sample, so one goes in before ready. One
            # that cannot be taken of a runtime still there (a tree too large to count, a GPU
            # that fails) leaves none: ready, refusing malformed_observation until one can.
            try:
                await self._push_sample(probe)
            except ProbeError as error:
                if error.reason is Reason.RUNTIME_EXITED:
                    return Reason.RUNTIME_EXITED
            if not self._move(LifecycleEvent.HEALTH_OK):
                return Reason.NOT_READY
            now = self._clock()
            self._ready_since = now
            self._ready_latency_s = now - wait.answered_at
            return Reason.OK

        return await _first_of(
            healthy(), self._exited(process), self._stopped_reason(Reason.NOT_READY)
        )

    async def _while_ready(
        self, process: RuntimeProcess, checker: HealthChecker, probe: ResourceProbe
    ) -> Reason:
        config = self._config

        async def unhealthy() -> Reason:
            await watch_while_ready(checker, policy=config.health)
            self._move(LifecycleEvent.HEALTH_FAIL)  # ready → draining (no-op when draining)
            return Reason.RUNTIME_UNHEALTHY

        async def sampler() -> Reason:
            while True:
                await asyncio.sleep(config.sample_interval_s)
                # A sample that cannot be taken drops the last one at once, as a stale one
                # would be: kept until it aged out, it admitted a runtime that may be over its
                # ceilings for up to max_sample_age_s. The exit watcher reports a runtime gone.
                with contextlib.suppress(ProbeError):
                    await self._push_sample(probe)

        return await _first_of(
            self._exited(process), unhealthy(), sampler(), self._stopped_reason(Reason.OK)
        )

    async def _exited(self, process: RuntimeProcess) -> Reason:
        await process.wait()
        self._forget_runtime_address()
        # Out of ready (or starting) at once, before the process context is even left.
        self._move(LifecycleEvent.STOPPED)
        status = process.returncode
        self._last_exit_status = status
        # Without this, a runtime command that cannot work (a missing library, a bad flag,
        # the kernel's OOM killer) would say only runtime_exited. A number or a signal's
        # name, never the runtime's own output, which may carry paths.
        _logger.warning("the runtime exited by itself: %s", describe_exit(status))
        return Reason.RUNTIME_EXITED

    async def _stopped_reason(self, reason: Reason) -> Reason:
        await self._stop_requested.wait()
        return reason

    async def _push_sample(self, probe: ResourceProbe) -> None:
        """Take a sample and push it; :class:`ProbeError` after the controller has been told
        that there is none."""
        try:
            sample = await probe.sample()
        except ProbeError:
            self.controller.forget_resources()
            self._sample_in_force = False
            raise
        self._last_sample = sample
        self._sample_in_force = True
        self.controller.update_resources(sample.observation, taken_at=sample.taken_at)


def _way_held_by_no_one_else(path: Path) -> bool | None:
    """Whether every directory on the way to ``path`` holds no one else's entries (the rule
    the store holds its own directories to, see ``directory_trust``); ``None`` when the way
    cannot be looked at (the file is not there, say: the re-verify says what is wrong)."""
    try:
        return ancestors_hold_no_one_else_s_entries(path, os.geteuid())
    except (OSError, RuntimeError, ValueError):
        # RuntimeError: a symlink loop (Python before 3.13); ValueError: a NUL in the path.
        return None
