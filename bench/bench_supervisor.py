"""Benchmark of the supervisor with the real llama.cpp server (not a test; prints figures).

    .venv/bin/python bench/bench_supervisor.py [--quick] [--json] [--repeats N]

Each repeat starts the embedded llama.cpp server on the tiny model through the supervisor
(re-verify, fit, spawn, health-wait, ready) and stops it again. Figures, medians over repeats:

1. **first healthy answer → ready** as the supervisor sees it: from the moment its health
   probe's ``200`` arrived to the moment ``ready`` was pushed into the admission controller
   (one resource sample is taken in between, so the first request is not refused for lack of
   one). Target: ≤ 100 ms.
2. **first healthy answer → ready, seen from outside**: a separate thread polls ``/health``
   every 2 ms from the moment the port is known; from its first ``200`` to ``ready``. This one
   includes the supervisor's health-poll interval (``--interval-ms``, default 50 ms), so it is
   at most about that interval plus one probe.
3. ``start()`` to ready (spawn, model load, health) and ``stop()`` (drain with nothing in
   flight, SIGTERM, exit), for context.

Reference, measured in the same run against the same server: one ``GET /health`` round trip
on a warm httpx connection (what a single health probe costs), median of 9 per repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from companion_runtime.bind.health import HealthPolicy
from companion_runtime.bind.llama_server import embedded_llama_command, llama_available
from companion_runtime.bind.supervisor import Supervisor, SupervisorConfig
from companion_runtime.bind.tiny_model import write_tiny_model
from companion_runtime.core import create_resource_limits

GIB = 1024**3


class _OutsidePoller(threading.Thread):
    """Polls the runtime's /health from another thread; records the first 200."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(daemon=True)
        self._supervisor = supervisor
        self.first_healthy_at: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=0.5, trust_env=False) as client:
            while not self.stop_event.is_set() and self.first_healthy_at is None:
                url = self._supervisor.runtime_url
                if url is not None:
                    try:
                        if client.get(url + "/health").status_code == 200:
                            self.first_healthy_at = time.monotonic()
                    except httpx.HTTPError:
                        pass
                time.sleep(0.002)


async def _health_round_trip(url: str, rounds: int = 9) -> float:
    """Median of ``rounds`` GETs on a warm connection (what one health probe costs)."""
    async with httpx.AsyncClient(trust_env=False) as client:
        await client.get(url + "/health")  # connect once; the supervisor's client stays open
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            response = await client.get(url + "/health")
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
    return statistics.median(times)


async def one_repeat(config: SupervisorConfig) -> dict[str, float]:
    supervisor = Supervisor(config)
    async with supervisor:
        poller = _OutsidePoller(supervisor)
        poller.start()
        started = time.monotonic()
        verdict = await supervisor.start()
        start_s = time.monotonic() - started
        poller.stop_event.set()
        await asyncio.to_thread(poller.join)
        if not verdict.ok:
            raise SystemExit(f"start refused: {verdict.reason}")
        status = supervisor.status()
        moves = status["recent_moves"]
        assert isinstance(moves, list)
        ready_at = next(move["at"] for move in moves if move["state"] == "ready")
        internal = status["ready_latency_s"]
        assert isinstance(internal, float)
        url = supervisor.runtime_url
        assert url is not None
        reference = await _health_round_trip(url)
        stopping = time.monotonic()
        await supervisor.stop()
        stop_s = time.monotonic() - stopping
    figures = {"internal_s": internal, "reference_s": reference, "start_s": start_s}
    figures["stop_s"] = stop_s
    if poller.first_healthy_at is not None:
        figures["outside_s"] = max(ready_at - poller.first_healthy_at, 0.0)
    return figures


async def run(repeats: int, interval_s: float) -> dict[str, list[float]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-supervisor-"))
    model = write_tiny_model(directory / "tiny.gguf")
    data = model.read_bytes()
    config = SupervisorConfig(
        command_template=tuple(embedded_llama_command(parallel=2, threads=1, context_size=256)),
        model_path=model,
        expected_digest=hashlib.sha256(data).hexdigest(),
        expected_size_bytes=len(data),
        resource_limits=create_resource_limits(
            max_ram_bytes=8 * GIB, max_vram_bytes=8 * GIB, max_cpu_percent=100
        ),
        health=HealthPolicy(interval_s=interval_s),
        ready_timeout_s=60.0,
    )
    collected: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, value in (await one_repeat(config)).items():
            collected.setdefault(name, []).append(value)
    return collected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats (smoke run)")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--interval-ms", type=float, default=50.0, help="health-poll interval")
    arguments = parser.parse_args()
    if not llama_available():
        raise SystemExit("the embedded llama.cpp server is not installed (pip install '.[llama]')")
    repeats = 3 if arguments.quick else arguments.repeats
    collected = asyncio.run(run(repeats, arguments.interval_ms / 1000))
    median = {name: statistics.median(values) for name, values in collected.items()}

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms"

    internal, reference = median["internal_s"], median["reference_s"]
    print(f"repeats: {repeats}, health-poll interval {arguments.interval_ms:.0f} ms")
    print(
        f"first healthy answer -> ready (supervisor): median {ms(internal)} "
        f"(min {ms(min(collected['internal_s']))}, max {ms(max(collected['internal_s']))}); "
        f"target <= 100 ms"
    )
    print(f"reference: one GET /health round trip: median {ms(reference)}")
    print(f"ratio: {internal / reference:.2f}x one health round trip")
    if "outside_s" in median:
        outside = collected["outside_s"]
        print(
            f"first healthy answer -> ready (outside poller, 2 ms): median "
            f"{ms(median['outside_s'])} (min {ms(min(outside))}, max {ms(max(outside))}, "
            f"{len(outside)}/{repeats} repeats observed)"
        )
    print(f"start() to ready (spawn + load + health): median {ms(median['start_s'])}")
    print(f"stop() (drain, SIGTERM, exit): median {ms(median['stop_s'])}")
    if arguments.json:
        figures = [
            {
                "name": "first healthy answer to ready (supervisor)",
                "value": internal * 1e3,
                "reference": reference * 1e3,
                "unit": "ms",
            },
            {"name": "start() to ready", "value": median["start_s"] * 1e3, "unit": "ms"},
            {"name": "stop()", "value": median["stop_s"] * 1e3, "unit": "ms"},
        ]
        if "outside_s" in median:
            figures.insert(
                1,
                {
                    "name": "first healthy answer to ready (outside poller)",
                    "value": median["outside_s"] * 1e3,
                    "unit": "ms",
                },
            )
        print(json.dumps({"figures": figures, "repeats": repeats}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
