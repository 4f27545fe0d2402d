"""Test helpers for runtime supervision: the stand-in runtime's command and process checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN_SCRIPT = Path(__file__).resolve().with_name("standin_runtime.py")


def standin_command(*flags: str) -> list[str]:
    """A command template that runs the stand-in runtime with ``flags``."""
    return [sys.executable, str(STANDIN_SCRIPT), "--host", "{host}", "--port", "{port}", *flags]


def process_gone(pid: int, create_time: float | None = None) -> bool:
    """True when ``pid`` no longer names a live process (a zombie counts as gone: it is dead
    and only waits for whoever inherited it to reap it). With ``create_time``, a different
    process that reused the PID also counts as gone."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and process.create_time() != create_time:
            return True
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


async def async_wait_for(
    predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01
) -> bool:
    """Like :func:`wait_for`, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return predicate()


# A manager process: launches the runtime from the template given as JSON in argv[1] with the
# model path argv[2], optionally waits for its health URL, prints "RUNTIME <pid>" and then
# waits forever (until the test kills it with SIGKILL).
_MANAGER_SCRIPT = """
import asyncio, json, sys, time
import httpx
from companion_runtime.bind.process import SubprocessLauncher, build_launch_spec

async def main():
    spec = build_launch_spec(json.loads(sys.argv[1]), model_path=sys.argv[2])
    async with SubprocessLauncher().launch(spec) as runtime:
        if sys.argv[3] == "wait-healthy":
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if (await client.get(spec.base_url + "/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.05)
        print("RUNTIME", runtime.pid, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_manager(
    command_template: list[str], model_path: str, *, wait_healthy: bool = False
) -> subprocess.Popen[str]:
    """Start a manager process (see ``_MANAGER_SCRIPT``) that launches one runtime."""
    import json

    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MANAGER_SCRIPT,
            json.dumps(command_template),
            model_path,
            "wait-healthy" if wait_healthy else "no-wait",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


def read_runtime_pid(manager: subprocess.Popen[str]) -> int:
    """Read the ``RUNTIME <pid>`` line the manager prints once the runtime is up."""
    assert manager.stdout is not None
    line = manager.stdout.readline()
    assert line.startswith("RUNTIME "), line
    return int(line.split()[1])


def llama_ready() -> bool:
    """Whether the embedded llama.cpp launcher and the tiny model can be used here."""
    try:
        from companion_runtime.bind.llama_server import llama_available
        from companion_runtime.bind.tiny_model import write_tiny_model  # noqa: F401
    except ImportError:
        return False
    return llama_available()


def real_runtime(model_dir: Path, *, api_key_file: bool = True) -> tuple[list[str], Path]:
    """The embedded llama.cpp server's command template (one thread, small context) and the
    tiny model written into ``model_dir``. With ``api_key_file`` (the default, as in real use)
    the template asks for the supervisor's key file."""
    from companion_runtime.bind.llama_server import embedded_llama_command
    from companion_runtime.bind.tiny_model import write_tiny_model

    model = write_tiny_model(model_dir / "tiny.gguf")
    template = embedded_llama_command(
        parallel=2, threads=1, context_size=256, api_key_file=api_key_file
    )
    return template, model


#: The size of :func:`big_zero_blob`'s blob, and its SHA-256 (of that many zero bytes).
BIG_BLOB_BYTES = 4 * 1024 * 1024 * 1024
BIG_BLOB_SHA256 = "8479e43911dc45e89f934fe48d01297e16f51d17aa561d4d1c216b1ae0fcddca"


@contextlib.contextmanager
def sparse_scratch_dir(fallback: Path) -> Iterator[Path]:
    """A private directory for :func:`big_zero_blob`, removed on exit: in memory where there
    is one (``/dev/shm``), else ``fallback``.

    Reading a hole in memory maps the kernel's zero page, so a re-hash of the blob costs the
    hash alone (about 2.5 s for 4 GiB here, as for any 4 GiB in the page cache); on a disk file
    system the first read also fills a page of cache with zeros for each page (about 10 s).
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
        yield fallback
        return
    with tempfile.TemporaryDirectory(prefix="companion-runtime-test-", dir=shm) as directory:
        yield Path(directory)


@contextlib.contextmanager
def big_zero_blob(path: Path) -> Iterator[tuple[str, int]]:
    """A read-only 4 GiB blob of zero bytes at ``path``, removed on exit; (digest, size).

    It takes no space (a sparse file), yet re-hashing it costs what any 4 GiB blob's does:
    the hash is the cost, a few seconds at about 1.7 GB/s.
    """
    with open(path, "xb") as handle:
        handle.truncate(BIG_BLOB_BYTES)
    try:
        if os.stat(path).st_blocks * 512 > 1024 * 1024:
            pytest.skip("this file system does not make sparse files")
        path.chmod(0o444)
        yield BIG_BLOB_SHA256, BIG_BLOB_BYTES
    finally:
        path.unlink(missing_ok=True)


def hashing() -> bool:
    """Whether a file is being hashed in this process (a ``verify_file`` worker is alive)."""
    return any(thread.name.startswith("filehash") for thread in threading.enumerate())
