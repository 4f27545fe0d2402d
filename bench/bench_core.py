"""Benchmark of the pure decision core (not a test; prints figures).

    .venv/bin/python bench/bench_core.py [--quick]

1. ``evaluate_runtime_request`` on the allowed path, decisions per second, next to a bare
   Python function taking the same keyword arguments (the floor any gate pays for being
   called), measured in the same run; and the ratio. A denial path is printed alongside.
2. ``IntegrityAccumulator.update`` over 1 GiB fed as 1 MiB ``memoryview`` chunks, next to
   ``hashlib.sha256().update`` on the very same chunks; throughput and ratio.
3. Peak memory (``tracemalloc``) of an accumulator while 1 GiB and 4 GiB stream through it:
   it must not depend on the length of the stream.

Every figure is the median of repeated rounds, and the rounds of the core and of its reference
alternate, so that both see the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable

import companion_runtime as cr

MIB = 1 << 20
GIB = 1 << 30


# --- 1. the gate -------------------------------------------------------------------------------


def _bare(
    *,
    lifecycle_state: object,
    admission_state: object,
    resource_observation: object,
    resource_limits: object,
) -> None:
    return None


def _gate_round(function: Callable[..., object], arguments: dict[str, object], calls: int) -> float:
    lifecycle_state = arguments["lifecycle_state"]
    admission_state = arguments["admission_state"]
    resource_observation = arguments["resource_observation"]
    resource_limits = arguments["resource_limits"]
    started = time.perf_counter()
    for _ in range(calls):
        function(
            lifecycle_state=lifecycle_state,
            admission_state=admission_state,
            resource_observation=resource_observation,
            resource_limits=resource_limits,
        )
    return calls / (time.perf_counter() - started)


def bench_gate(repeats: int, calls: int) -> None:
    limits = cr.create_resource_limits(
        max_ram_bytes=8_000_000_000, max_vram_bytes=4_000_000_000, max_cpu_percent=90
    )
    allowed = {
        "lifecycle_state": cr.Lifecycle(cr.LifecycleState.READY),
        "admission_state": cr.create_admission_state(max_in_flight=4, queue_bound=64),
        "resource_observation": cr.ResourceObservation(1_000_000_000, 0, 10.0),
        "resource_limits": limits,
    }
    at_capacity = {**allowed, "admission_state": cr.AdmissionState(4, 64, 4, 0)}
    assert cr.evaluate_runtime_request(**allowed) is cr.ALLOW
    assert cr.evaluate_runtime_request(**at_capacity).reason is cr.Reason.AT_CAPACITY
    gate: list[float] = []
    denied: list[float] = []
    bare: list[float] = []
    for _ in range(repeats):
        gate.append(_gate_round(cr.evaluate_runtime_request, allowed, calls))
        bare.append(_gate_round(_bare, allowed, calls))
        denied.append(_gate_round(cr.evaluate_runtime_request, at_capacity, calls))
    gate_median, bare_median, denied_median = (
        statistics.median(gate),
        statistics.median(bare),
        statistics.median(denied),
    )
    print(f"1. evaluate_runtime_request, median of {repeats} rounds x {calls:,} calls")
    for label, median, unit in (
        ("allowed path", gate_median, "decisions/s"),
        ("at_capacity path", denied_median, "decisions/s"),
        ("bare function call", bare_median, "calls/s"),
    ):
        print(f"   {label:<19} {median:>14,.0f} {unit:<12} ({1e9 / median:.0f} ns)")
    print(f"   allowed / bare      {gate_median / bare_median:>14.3f}")
    print(f"   target >= 1,000,000/s: {'met' if gate_median >= 1_000_000 else 'NOT met'}")


# --- 2. streaming integrity ----------------------------------------------------------------------


def _chunks(buffer_bytes: int) -> list[memoryview]:
    buffer = memoryview(os.urandom(buffer_bytes))
    return [buffer[offset : offset + MIB] for offset in range(0, buffer_bytes, MIB)]


def _accumulator(total: int) -> cr.IntegrityAccumulator:
    return cr.IntegrityAccumulator(
        expected_digest="0" * 64,
        expected_size_bytes=total,
        source_url="https://models.example.com/bench.gguf",
        allowed_source_urls=["https://models.example.com/"],
    )


def _timed_pass(update: Callable[[memoryview], object], chunks: list[memoryview]) -> float:
    started = time.perf_counter()
    for chunk in chunks:
        update(chunk)
    return time.perf_counter() - started


def bench_stream(repeats: int, total: int, buffer_bytes: int) -> None:
    chunks = _chunks(buffer_bytes)
    passes = total // buffer_bytes
    # One untimed pass of each first, so that neither pays for faulting the buffer in.
    _timed_pass(_accumulator(buffer_bytes).update, chunks)
    _timed_pass(hashlib.sha256().update, chunks)
    core: list[float] = []
    raw: list[float] = []
    for _ in range(repeats):
        accumulator = _accumulator(total)
        hasher = hashlib.sha256()
        # Passes of the two alternate (and swap which goes first), so that a burst of load
        # from other processes on a shared machine lands on both alike.
        for index in range(passes):
            if index % 2:
                raw.append(_timed_pass(hasher.update, chunks))
                core.append(_timed_pass(accumulator.update, chunks))
            else:
                core.append(_timed_pass(accumulator.update, chunks))
                raw.append(_timed_pass(hasher.update, chunks))
        assert accumulator.received_bytes == total
    core_median, raw_median = statistics.median(core), statistics.median(raw)
    print(
        f"2. {repeats} x {total // MIB:,} MiB in 1 MiB memoryview chunks, timed per "
        f"{buffer_bytes // MIB} MiB pass (median of {len(core)} passes each, interleaved)"
    )
    print(f"   IntegrityAccumulator.update  {buffer_bytes / core_median / MIB:>9,.1f} MiB/s")
    print(f"   hashlib.sha256().update      {buffer_bytes / raw_median / MIB:>9,.1f} MiB/s")
    # Each pass of the core is paired with the raw pass next to it: the median of the pair
    # ratios is the figure least moved by load that comes and goes.
    paired = statistics.median(
        raw_time / core_time for raw_time, core_time in zip(raw, core, strict=True)
    )
    print(f"   accumulator / raw, medians   {raw_median / core_median:>9.3f}")
    print(f"   accumulator / raw, paired    {paired:>9.3f}  (target >= 0.97)")


# --- 3. memory ---------------------------------------------------------------------------------


def _peak_while_streaming(chunks: list[memoryview], total: int) -> int:
    passes = total // (len(chunks) * MIB)
    tracemalloc.start()
    try:
        accumulator = _accumulator(total)
        for _ in range(passes):
            for chunk in chunks:
                accumulator.update(chunk)
        assert accumulator.finalize().reason is cr.Reason.DIGEST_MISMATCH
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_memory(small: int, large: int, buffer_bytes: int) -> None:
    chunks = _chunks(buffer_bytes)
    small_peak = _peak_while_streaming(chunks, small)
    large_peak = _peak_while_streaming(chunks, large)
    print("3. tracemalloc peak while streaming (the chunks themselves are allocated before)")
    print(f"   {small // MIB:>6,} MiB  peak {small_peak:>8,} bytes")
    print(f"   {large // MIB:>6,} MiB  peak {large_peak:>8,} bytes")
    print(f"   independent of length: {'yes' if large_peak <= small_peak + 4096 else 'NO'}")


def _load() -> str:
    try:
        return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    arguments = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {_load()} at start")
    if arguments.quick:
        bench_gate(repeats=5, calls=50_000)
        bench_stream(repeats=3, total=64 * MIB, buffer_bytes=16 * MIB)
        bench_memory(small=64 * MIB, large=256 * MIB, buffer_bytes=16 * MIB)
    else:
        bench_gate(repeats=9, calls=500_000)
        bench_stream(repeats=5, total=GIB, buffer_bytes=64 * MIB)
        bench_memory(small=GIB, large=4 * GIB, buffer_bytes=64 * MIB)
    print(f"{_load()} at end")


if __name__ == "__main__":
    main()
