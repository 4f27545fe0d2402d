"""Front door overhead: the same short completions direct to llama.cpp and through the front door.

    .venv/bin/python bench/bench_frontdoor.py [--rounds 5] [--requests 400] [--streams 100]
                                              [--threads N] [--llama-server PATH]

One llama.cpp server (the embedded launcher, or the upstream ``llama-server`` binary given with
``--llama-server``; tiny model, 8 slots, ``--threads`` compute threads: by default one core
fewer than the machine has, at least one) and one front door in its own
process (as ``serve`` runs it: the real admission controller, max_in_flight 8). The load client
is a third process (this one): plain h11 over keep-alive sockets, so its own cost is small and
the same on both paths. Rounds alternate direct / front door so that drift on a shared machine
hits both. Printed: per-round medians, then the median over rounds of

* latency p50 / p99 at concurrency 8 (``n_predict`` 1–4), and the difference (added latency);
* throughput at concurrency 8, and the ratio front door / direct;
* time to the first streamed body byte (``stream: true``, one request at a time), and the
  difference.

Where nginx is installed, a third path goes through nginx as a reverse proxy (``proxy_pass``
with keep-alive upstream connections and no buffering), measured in the same rounds and
printed as a reference, not a target: what relaying through any user-space proxy costs on the
same machine, C and all.

Last, the CPU time per completion of the proxy (the front door's process; nginx's master and
workers) and of llama.cpp during the loads, summed over all rounds from the kernel's
per-process counters: on a machine where the proxy, the runtime and the client share the
cores, the proxy's CPU is what the throughput ratio pays for.

Not a test: it asserts nothing and prints figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h11
import psutil

CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("llama.cpp server did not become healthy")


# --- the front door process ---------------------------------------------------------------


async def _front_door_child(runtime_url: str) -> None:
    from companion_runtime import (
        Lifecycle,
        LifecycleState,
        ResourceObservation,
        create_resource_limits,
    )
    from companion_runtime.bind.admission import AdmissionController
    from companion_runtime.bind.frontdoor import FrontDoor, FrontDoorConfig
    from companion_runtime.bind.session import new_token

    controller = AdmissionController(
        max_in_flight=CONCURRENCY,
        queue_bound=64,
        resource_limits=create_resource_limits(
            max_ram_bytes=16 * 1024**3, max_vram_bytes=1024**3, max_cpu_percent=100
        ),
    )
    controller.set_lifecycle(Lifecycle(LifecycleState.STARTING))
    controller.set_lifecycle(Lifecycle(LifecycleState.READY))
    token = new_token()

    async def sample_resources() -> None:
        # Stands in for the supervisor's sampler: a fresh sample every second.
        while True:
            controller.update_resources(
                ResourceObservation(ram_bytes=1, vram_bytes=0, cpu_percent=1.0),
                taken_at=time.monotonic(),
            )
            await asyncio.sleep(1.0)

    config = FrontDoorConfig(token=token)
    async with (
        FrontDoor(config=config, controller=controller, runtime_url=lambda: runtime_url) as door,
        asyncio.TaskGroup() as group,
    ):
        sampler = group.create_task(sample_resources())
        print(json.dumps({"port": door.port, "token": token}), flush=True)
        # Runs until stdin closes (the parent exits or is done).
        await asyncio.to_thread(sys.stdin.read)
        sampler.cancel()


# --- the load client ----------------------------------------------------------------------


class _Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.port = port
        self.headers = [(b"host", f"127.0.0.1:{port}".encode()), *headers]
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.conn.our_state is not h11.IDLE:
            if self.writer is not None:
                self.writer.close()
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, body: bytes) -> tuple[float, float]:
        """Send a POST /completion; return (seconds to complete, seconds to first body byte)."""
        reader, writer = await self._connect()
        conn = self.conn
        headers = [*self.headers, (b"content-length", str(len(body)).encode())]
        started = time.perf_counter()
        writer.write(
            conn.send(h11.Request(method="POST", target="/completion", headers=headers))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        first = 0.0
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if not first:
                    first = time.perf_counter() - started
            elif isinstance(event, h11.EndOfMessage):
                break
        elapsed = time.perf_counter() - started
        if status != 200:
            raise SystemExit(f"unexpected status {status}")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            writer.close()
            self.reader = self.writer = None
        return elapsed, first


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live children (nginx's workers)."""
    if pid is None:
        return 0.0
    process = psutil.Process(pid)
    total = 0.0
    for member in (process, *process.children(recursive=True)):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _completion(index: int, *, stream: bool = False) -> bytes:
    return json.dumps(
        {"prompt": f"hello {index % 7}", "n_predict": 1 + index % 4, "stream": stream}
    ).encode()


async def _load(port: int, headers: list[tuple[bytes, bytes]], requests: int) -> dict[str, float]:
    clients = [_Client(port, headers) for _ in range(CONCURRENCY)]
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker(client: _Client) -> None:
        for index in counter:
            elapsed, _ = await client.request(_completion(index))
            latencies.append(elapsed)

    # Warm the connections so the round measures steady state, not connects.
    await asyncio.gather(*(client.request(_completion(0)) for client in clients))
    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "throughput_rps": requests / wall,
    }


async def _first_bytes(port: int, headers: list[tuple[bytes, bytes]], streams: int) -> float:
    # llama.cpp closes a connection after a streamed response, so each stream gets a fresh
    # client connection on both paths (opened before the clock starts).
    firsts = []
    for index in range(streams + 1):
        client = _Client(port, headers)
        _, first = await client.request(_completion(index, stream=True))
        client.close()
        if index:
            firsts.append(first)
    return statistics.median(firsts) * 1000


NGINX_PROXY_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream runtime {{ server 127.0.0.1:{runtime_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://runtime;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            # llama.cpp closes a connection after a stream; a request sent on it a moment
            # later is sent again on a new one, as the front door does.
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""


def _start_nginx(scratch: Path, runtime_port: int) -> tuple[subprocess.Popen[bytes], int] | None:
    if shutil.which("nginx") is None:
        return None
    port = _free_port()
    conf = scratch / "nginx.conf"
    conf.write_text(NGINX_PROXY_CONF.format(tmp=scratch, port=port, runtime_port=runtime_port))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(scratch)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.kill()
    process.wait()
    return None


def _median_of(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(entry[key] for entry in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="per round and path")
    parser.add_argument("--streams", type=int, default=100, help="per round and path")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="llama.cpp compute threads (default: one core left for the client and front door)",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="an upstream llama-server binary to run instead of the embedded launcher",
    )
    parser.add_argument("--front-door-child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.front_door_child:
        # The event loop serve runs on (uvloop where installed).
        from companion_runtime.bind.eventloop import run as run_loop

        run_loop(_front_door_child(arguments.front_door_child))
        return

    from companion_runtime.bind.llama_server import embedded_llama_command, llama_available
    from companion_runtime.bind.tiny_model import write_tiny_model

    if arguments.llama_server is None and not llama_available():
        raise SystemExit("needs the llama extra: pip install -e '.[llama]'")
    with tempfile.TemporaryDirectory(prefix="bench-frontdoor-") as scratch:
        model = write_tiny_model(Path(scratch) / "tiny.gguf")
        runtime_port = _free_port()
        # No runtime key: the direct path is the reference, and it has no key to send.
        if arguments.llama_server is not None:
            argv = [
                str(arguments.llama_server),
                *("-m", str(model), "--host", "127.0.0.1", "--port", str(runtime_port)),
                *("--parallel", str(CONCURRENCY), "--threads", str(arguments.threads)),
            ]
        else:
            argv = [
                part.format(model_path=model, host="127.0.0.1", port=runtime_port)
                for part in embedded_llama_command(
                    parallel=CONCURRENCY,
                    metrics=False,
                    api_key_file=False,
                    threads=arguments.threads,
                )
            ]
        runtime = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        door = subprocess.Popen(
            [sys.executable, __file__, "--front-door-child", f"http://127.0.0.1:{runtime_port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        nginx: tuple[subprocess.Popen[bytes], int] | None = None
        try:
            _wait_healthy(runtime_port)
            nginx = _start_nginx(Path(scratch), runtime_port)
            assert door.stdout is not None
            ready = json.loads(door.stdout.readline())
            door_port = int(ready["port"])
            auth = [(b"authorization", f"Bearer {ready['token']}".encode())]
            paths: dict[str, tuple[int, list[tuple[bytes, bytes]]]] = {
                "direct": (runtime_port, []),
                "front door": (door_port, auth),
            }
            if nginx is not None:
                paths["nginx proxy"] = (nginx[1], [])
            results: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            proxies: dict[str, int | None] = {
                "direct": None,
                "front door": door.pid,
                "nginx proxy": nginx[0].pid if nginx is not None else None,
            }
            # CPU seconds of the proxy and of the runtime during the loads, summed over rounds
            # (the kernel counts in 10 ms ticks, too coarse for one round).
            cpu: dict[str, dict[str, float]] = {
                name: {"proxy": 0.0, "runtime": 0.0, "requests": 0.0} for name in paths
            }
            print(
                f"{arguments.rounds} rounds x {arguments.requests} completions at concurrency "
                f"{CONCURRENCY}, {arguments.streams} streams one at a time; cpus={os.cpu_count()}, "
                f"llama.cpp threads={arguments.threads}, runtime: "
                f"{arguments.llama_server or 'embedded launcher'}"
            )
            for round_index in range(arguments.rounds):
                for name, (port, headers) in paths.items():
                    proxy_before = _cpu_seconds(proxies[name])
                    runtime_before = _cpu_seconds(runtime.pid)
                    measured = asyncio.run(_load(port, headers, arguments.requests))
                    cpu[name]["proxy"] += _cpu_seconds(proxies[name]) - proxy_before
                    cpu[name]["runtime"] += _cpu_seconds(runtime.pid) - runtime_before
                    # The load's warm-up sends one request per client before the clock starts.
                    cpu[name]["requests"] += arguments.requests + CONCURRENCY
                    measured["first_byte_ms"] = asyncio.run(
                        _first_bytes(port, headers, arguments.streams)
                    )
                    results[name].append(measured)
                    print(
                        f"  round {round_index + 1} {name:>11}: p50 {measured['p50_ms']:.3f} ms"
                        f"  p99 {measured['p99_ms']:.3f} ms"
                        f"  {measured['throughput_rps']:.0f} req/s"
                        f"  first byte {measured['first_byte_ms']:.3f} ms"
                    )
        finally:
            if nginx is not None:
                nginx[0].terminate()
                nginx[0].wait(timeout=10)
            if door.stdin is not None:
                door.stdin.close()
            door.wait(timeout=10)
            runtime.terminate()
            runtime.wait(timeout=30)

    def row(label: str, key: str, fmt: Callable[[float], str], path: str = "front door") -> None:
        direct = _median_of(results["direct"], key)
        through = _median_of(results[path], key)
        ratio = through / direct if direct else float("nan")
        print(
            f"{label:<28} direct {fmt(direct):>12}  {path} {fmt(through):>12}  "
            f"added {fmt(through - direct):>12}  ratio {ratio:.3f}"
        )

    figures: tuple[tuple[str, str, Callable[[float], str]], ...] = (
        ("latency p50 (c=8)", "p50_ms", lambda value: f"{value:.3f} ms"),
        ("latency p99 (c=8)", "p99_ms", lambda value: f"{value:.3f} ms"),
        ("throughput (c=8)", "throughput_rps", lambda value: f"{value:.0f} rps"),
        ("first streamed byte (c=1)", "first_byte_ms", lambda value: f"{value:.3f} ms"),
    )
    print("medians over rounds:")
    for label, key, fmt in figures:
        row(label, key, fmt)
    if "nginx proxy" in results:
        print("reference, same rounds: nginx as a reverse proxy (no target)")
        for label, key, fmt in figures:
            row(label, key, fmt, path="nginx proxy")
    print("CPU per completion over all rounds' loads (from the kernel's per-process counters):")
    for name, spent in cpu.items():
        requests = spent["requests"]
        proxy = f"proxy {spent['proxy'] / requests * 1000:.3f} ms" if name != "direct" else ""
        print(
            f"  {name:<12} llama.cpp {spent['runtime'] / requests * 1000:.3f} ms  {proxy}".rstrip()
        )
    if "nginx proxy" in cpu and cpu["nginx proxy"]["proxy"] > 0:
        ratio = cpu["front door"]["proxy"] / cpu["nginx proxy"]["proxy"]
        print(f"  front door CPU / nginx CPU per completion: {ratio:.2f}")


if __name__ == "__main__":
    main()
