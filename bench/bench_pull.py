"""Benchmark of the verified pull against references measured in the same run. Not a test.

    .venv/bin/python bench/bench_pull.py [--quick] [--json] [--runs N]

Server: nginx on 127.0.0.1 with TLS (a trustme certificate), started here with a temporary
configuration and stopped at the end. Files: a random 1 GiB model (256 MiB with --quick) in a
RAM-backed directory, and a sparse 4 GiB one (1 GiB with --quick) for the memory figure; both
are deleted afterwards.

Figures (medians of --runs, default 5; each round runs curl, curl | sha256sum, the pull and
curl -o FILE in turn):

* pull throughput: ``pull_model`` (download + hash + write + fsync + publish) into a store on
  the same RAM-backed file system, timed inside a child process so interpreter start-up is not
  counted; vs ``curl -o /dev/null`` (target >= 0.65x) and ``curl | sha256sum`` (target >= 2.5x).
* re-verify of the stored blob (page cache warm): ``verify_file`` vs a single-core
  ``openssl speed -evp sha256 -bytes 1048576`` figure (target >= 0.9x) and ``sha256sum`` on
  the same file (target >= 4x).
* peak RSS (``VmHWM``) of the pulling child process for both files (target <= 64 MiB).
* printed without a target: ``curl -o FILE`` into the same RAM-backed file system as the
  store, the cost of merely receiving and storing the bytes that ``curl -o /dev/null`` leaves
  out, and the pull's user and kernel CPU seconds per run. On a virtual machine the kernel's
  share moves from run to run with the cost of giving the file fresh memory pages.

The machine is shared, so the 1-minute load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB

NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_buffer_size 16k;
        output_buffers 2 1m;
        location /small/ {{ alias {small_root}/; }}
        location /big/ {{ alias {big_root}/; }}
    }}
}}
"""

# ru_maxrss is not used for the memory figure: Linux carries the parent's peak into a forked
# child's ru_maxrss across exec, so a child of a big parent would report the parent's peak.
# VmHWM in /proc/self/status is the high-water mark of this process's own address space.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from companion_runtime.bind.manifest import load_manifest
from companion_runtime.bind.pull import pull_model
from companion_runtime.bind.store import ModelStore
manifest = load_manifest(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
result = pull_model(manifest, store=ModelStore(sys.argv[2]), ca_bundle=Path(sys.argv[3]))
elapsed = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
user = after.ru_utime - before.ru_utime
kernel = after.ru_stime - before.ru_stime
status = open("/proc/self/status").read()
hwm_kib = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({"ok": result.ok, "reason": result.verdict.reason.value, "seconds": elapsed,
                  "cpu_seconds": user + kernel, "user_seconds": user, "sys_seconds": kernel,
                  "vmhwm_kib": hwm_kib}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


CPU_SECONDS: dict[str, list[float]] = {}


def timed(args: list[str] | str, *, shell: bool = False, label: str = "") -> float:
    """Wall seconds of one run; its CPU seconds (with waited-for children) go to CPU_SECONDS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        args, shell=shell, stdout=subprocess.DEVNULL, executable="/bin/bash" if shell else None
    )
    _pid, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"reference command failed: {args}")
    CPU_SECONDS.setdefault(label, []).append(usage.ru_utime + usage.ru_stime)
    return elapsed


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(16 * MIB, remaining))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def write_sparse(path: Path, size: int) -> str:
    with open(path, "wb") as handle:
        handle.truncate(size)
    digest = hashlib.sha256()
    zeros = bytes(16 * MIB)
    for _ in range(size // len(zeros)):
        digest.update(zeros)
    return digest.hexdigest()


def openssl_sha256_bytes_per_s() -> float:
    output = subprocess.run(
        # -elapsed: wall-clock like every other figure here (the machine is shared).
        ["openssl", "speed", "-elapsed", "-evp", "sha256", "-bytes", str(MIB), "-seconds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in output.splitlines() if line.startswith("sha256"))
    return float(line.split()[-1].rstrip("k")) * 1000


def manifest_text(url: str, allow: str, digest: str, size: int) -> str:
    return (
        f'[model]\nname = "bench"\nurl = "{url}"\nsha256 = "{digest}"\nsize_bytes = {size}\n'
        f'[sources]\nallow = ["{allow}"]\n[runtime]\ncommand = ["/bin/true"]\n'
    )


def child_pull(manifest: Path, store: Path, ca: Path) -> dict[str, float]:
    shutil.rmtree(store, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(manifest), str(store), str(ca)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    process.wait()
    result: dict[str, float] = json.loads(output)
    if not result["ok"]:
        raise SystemExit(f"pull refused: {result['reason']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB / 1 GiB files")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import trustme

    # The server every figure is measured against (and curl, its reference client).
    for tool, package in (("nginx", "nginx-light"), ("curl", "curl"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install {package}", file=sys.stderr)
            return 1
    small_size = 256 * MIB if args.quick else GIB
    big_size = GIB if args.quick else 4 * GIB
    runs = max(3, args.runs)
    ram_base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    ram = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=ram_base))
    nginx: subprocess.Popen[bytes] | None = None
    try:
        small_root, big_root = ram / "small", work / "big"
        small_root.mkdir()
        big_root.mkdir()
        print(
            f"writing {small_size // MIB} MiB random + {big_size // MIB} MiB sparse ...",
            file=sys.stderr,
        )
        small_digest = write_random(small_root / "model.bin", small_size)
        big_digest = write_sparse(big_root / "model.bin", big_size)

        authority = trustme.CA()
        leaf = authority.issue_cert("127.0.0.1")
        ca, cert, key = work / "ca.pem", work / "cert.pem", work / "key.pem"
        authority.cert_pem.write_to_path(str(ca))
        leaf.private_key_pem.write_to_path(str(key))
        with open(cert, "wb") as handle:
            for pem in leaf.cert_chain_pems:
                handle.write(pem.bytes())
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=work, port=port, cert=cert, key=key, small_root=small_root, big_root=big_root
            )
        )
        nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
        base = f"https://127.0.0.1:{port}/"
        small_url, big_url = base + "small/model.bin", base + "big/model.bin"
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["curl", "-sf", "--cacert", str(ca), "-o", "/dev/null", "-r", "0-0", small_url]
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise SystemExit("nginx did not come up")
            time.sleep(0.1)

        small_manifest, big_manifest = work / "small.toml", work / "big.toml"
        small_manifest.write_text(manifest_text(small_url, base, small_digest, small_size))
        big_manifest.write_text(manifest_text(big_url, base, big_digest, big_size))
        store = ram / "store"
        load_before = os.getloadavg()[0]

        curl = ["curl", "-s", "--cacert", str(ca), "-o", "/dev/null", small_url]
        pipe = f"set -o pipefail; curl -s --cacert {ca} {small_url} | sha256sum"
        stored = ram / "curl-stored.bin"

        def curl_to_file() -> float:
            stored.unlink(missing_ok=True)
            seconds = timed(
                ["curl", "-s", "--cacert", str(ca), "-o", str(stored), small_url], label="file"
            )
            stored.unlink()
            return seconds

        # Rounds interleave the contestants, so a slow spell of the machine lands on all of
        # them instead of on whichever happened to run then.
        curl_all: list[float] = []
        pipe_all: list[float] = []
        file_all: list[float] = []
        pulls: list[dict[str, float]] = []
        for _round in range(runs):
            curl_all.append(timed(curl, label="curl"))
            pipe_all.append(timed(pipe, shell=True, label="pipe"))
            pulls.append(child_pull(small_manifest, store, ca))
            shutil.rmtree(store, ignore_errors=True)
            file_all.append(curl_to_file())
        curl_s = statistics.median(curl_all)
        pipe_s = statistics.median(pipe_all)
        file_s = statistics.median(file_all)
        child_pull(small_manifest, store, ca)  # the blob the re-verify reads
        pull_s = statistics.median(p["seconds"] for p in pulls)
        small_rss = max(p["vmhwm_kib"] for p in pulls) / 1024

        from companion_runtime.bind.filehash import verify_file

        blob = store / "blobs" / f"sha256-{small_digest}"

        def reverify() -> float:
            started = time.perf_counter()
            verdict = verify_file(
                blob, expected_digest=small_digest, expected_size_bytes=small_size
            )
            assert verdict.ok
            return time.perf_counter() - started

        reverify()  # warm the page cache for both contestants
        verify_s, verify_all = median_of(runs, reverify)
        sum_s, sum_all = median_of(runs, lambda: timed(["sha256sum", str(blob)], label="sum"))
        openssl_bps = openssl_sha256_bytes_per_s()

        big_store = work / "big-store"
        big_pulls = [child_pull(big_manifest, big_store, ca) for _ in range(1 if args.quick else 3)]
        shutil.rmtree(big_store, ignore_errors=True)
        big_rss = max(p["vmhwm_kib"] for p in big_pulls) / 1024
        big_s = statistics.median(p["seconds"] for p in big_pulls)
        load_after = os.getloadavg()[0]
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ram, ignore_errors=True)

    def mbps(size: int, seconds: float) -> float:
        return size / seconds / 1e6

    pull_mbps = mbps(small_size, pull_s)
    curl_mbps = mbps(small_size, curl_s)
    pipe_mbps = mbps(small_size, pipe_s)
    verify_mbps = mbps(small_size, verify_s)
    sum_mbps = mbps(small_size, sum_s)
    openssl_mbps = openssl_bps / 1e6
    rows = [
        (
            "pull (download+verify+publish)",
            f"{pull_mbps:.0f} MB/s",
            "curl -o /dev/null",
            f"{curl_mbps:.0f} MB/s",
            pull_mbps / curl_mbps,
            0.65,
        ),
        (
            "pull (download+verify+publish)",
            f"{pull_mbps:.0f} MB/s",
            "curl | sha256sum",
            f"{pipe_mbps:.0f} MB/s",
            pull_mbps / pipe_mbps,
            2.5,
        ),
        (
            "re-verify stored blob",
            f"{verify_mbps:.0f} MB/s",
            "openssl speed sha256 1 MiB",
            f"{openssl_mbps:.0f} MB/s",
            verify_mbps / openssl_mbps,
            0.9,
        ),
        (
            "re-verify stored blob",
            f"{verify_mbps:.0f} MB/s",
            "sha256sum",
            f"{sum_mbps:.0f} MB/s",
            verify_mbps / sum_mbps,
            4.0,
        ),
    ]
    print(
        f"file {small_size // MIB} MiB, runs {runs}, load avg {load_before:.2f} -> {load_after:.2f}"
    )
    print(f"{'measure':32} {'ours':>10}  {'reference':28} {'ref':>10}  {'ratio':>6}  target")
    for name, ours, ref_name, ref, ratio, target in rows:
        mark = "ok" if ratio >= target else "MISSED"
        print(f"{name:32} {ours:>10}  {ref_name:28} {ref:>10}  {ratio:6.2f}  >={target} {mark}")
    for _label, size, rss in (("small", small_size, small_rss), ("big", big_size, big_rss)):
        mark = "ok" if rss <= 64 else "MISSED"
        print(f"peak RSS of pull, {size // MIB} MiB file: {rss:.1f} MiB (target <= 64) {mark}")
    print(f"big file pull: {mbps(big_size, big_s):.0f} MB/s (disk-backed store)")
    file_mbps = mbps(small_size, file_s)
    print(
        f"curl -o FILE on the store's file system: {file_mbps:.0f} MB/s; "
        f"pull / that = {pull_mbps / file_mbps:.2f} (printed, no target)"
    )
    gib = small_size / GIB
    pull_cpu = statistics.median(p["cpu_seconds"] for p in pulls) / gib
    curl_cpu = statistics.median(CPU_SECONDS["curl"]) / gib
    pipe_cpu = statistics.median(CPU_SECONDS["pipe"]) / gib
    print(
        f"client CPU seconds per GiB (load-independent): pull {pull_cpu:.2f}, "
        f"curl -o /dev/null {curl_cpu:.2f}, curl | sha256sum {pipe_cpu:.2f}"
    )
    print(
        "raw seconds: curl",
        [round(v, 3) for v in curl_all],
        "pipe",
        [round(v, 3) for v in pipe_all],
        "pull",
        [round(p["seconds"], 3) for p in pulls],
        "verify",
        [round(v, 3) for v in verify_all],
        "sha256sum",
        [round(v, 3) for v in sum_all],
        "curl -o FILE",
        [round(v, 3) for v in file_all],
    )
    print(
        "pull CPU seconds per run, user / kernel:",
        [f"{p['user_seconds']:.2f} / {p['sys_seconds']:.2f}" for p in pulls],
    )
    if args.json:
        print(
            json.dumps(
                {
                    "file_mib": small_size // MIB,
                    "pull_mb_s": round(pull_mbps),
                    "curl_mb_s": round(curl_mbps),
                    "curl_sha256sum_mb_s": round(pipe_mbps),
                    "verify_mb_s": round(verify_mbps),
                    "openssl_sha256_mb_s": round(openssl_mbps),
                    "sha256sum_mb_s": round(sum_mbps),
                    "ratio_vs_curl": round(pull_mbps / curl_mbps, 2),
                    "ratio_vs_curl_sha256sum": round(pull_mbps / pipe_mbps, 2),
                    "ratio_verify_vs_openssl": round(verify_mbps / openssl_mbps, 2),
                    "ratio_verify_vs_sha256sum": round(verify_mbps / sum_mbps, 2),
                    "peak_rss_mib_small": round(small_rss, 1),
                    "peak_rss_mib_big": round(big_rss, 1),
                    "load_avg": round(load_before, 2),
                    "cpu_s_per_gib_pull": round(pull_cpu, 2),
                    "cpu_s_per_gib_curl": round(curl_cpu, 2),
                    "cpu_s_per_gib_curl_sha256sum": round(pipe_cpu, 2),
                    "curl_to_file_mb_s": round(file_mbps),
                    "ratio_vs_curl_to_file": round(pull_mbps / file_mbps, 2),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
