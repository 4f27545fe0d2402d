"""`companion-runtime serve` end to end: a real child process over the real llama.cpp server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from companion_runtime.bind.llama_server import llama_available
from companion_runtime.bind.supervisor import SupervisorConfig
from companion_runtime.bind.tiny_model import tiny_model_bytes, write_tiny_model
from tests.support.frontdoor import (
    RUNTIME_PARALLEL,
    ServeProcess,
    running_serve,
    runtime_headers,
    runtime_processing,
    serve_command,
    serve_env,
    serve_manifest_text,
)
from tests.support.llama import declaring_context
from tests.support.signals import (
    catches_termination_signals,
    flood_until_exit,
    threads_blocking,
)
from tests.support.supervision import (
    BIG_BLOB_BYTES,
    BIG_BLOB_SHA256,
    big_zero_blob,
    process_gone,
    sparse_scratch_dir,
    standin_command,
    wait_for,
)

pytestmark = pytest.mark.e2e
needs_llama = pytest.mark.skipif(not llama_available(), reason="needs the llama extra")

MAX_IN_FLIGHT = 2
QUEUE_BOUND = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_serve(
        tmp_path_factory.mktemp("serve"), max_in_flight=MAX_IN_FLIGHT, queue_bound=QUEUE_BOUND
    ) as (serve, _origin):
        yield serve


def completion(prompt: str, n_predict: int, **extra: object) -> dict[str, object]:
    return {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True, **extra}


# --- ready line and guards ----------------------------------------------------------------


@needs_llama
def test_ready_line_token_file_and_state_file(served: ServeProcess) -> None:
    assert set(served.ready) == {"ok", "reason", "url", "token_file"}
    assert served.ready["reason"] == "ok"
    assert served.url.startswith("http://127.0.0.1:")
    assert served.token_file.stat().st_mode & 0o777 == 0o600
    assert len(served.token) >= 43
    state = json.loads((served.state_dir / "serve.json").read_text())
    assert state["url"] == served.url
    assert state["token_file"] == str(served.token_file)
    assert state["pid"] == served.process.pid


@pytest.mark.security
@needs_llama
def test_guards_in_front_of_the_real_runtime(served: ServeProcess) -> None:
    body = completion("hello", 4)
    with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as client:
        missing = client.post("/completion", json=body)
        assert missing.status_code == 401
        assert missing.json() == {"ok": False, "reason": "unauthorized"}
        wrong = client.post(
            "/completion", json=body, headers={"authorization": "Bearer " + "A" * 43}
        )
        assert wrong.status_code == 401
        assert wrong.json()["reason"] == "unauthorized"
        rebound = client.post(
            "/completion", json=body, headers={**served.auth, "host": "evil.example"}
        )
        assert rebound.status_code == 403
        assert rebound.json() == {"ok": False, "reason": "host_not_allowed"}
        cross = client.post(
            "/completion", json=body, headers={**served.auth, "origin": "http://evil.example"}
        )
        assert cross.status_code == 403
        assert cross.json() == {"ok": False, "reason": "origin_not_allowed"}
        answered = client.post("/completion", json=body, headers=served.auth)
        assert answered.status_code == 200
        # The tiny model repeats the prompt's last character: the runtime itself answered.
        assert answered.json()["content"] == "oooo"
        status = client.get("/_status", headers=served.auth).json()
        assert status["state"] == "ready"
        assert status["front_door"]["refused_by_reason"]["unauthorized"] >= 2


@pytest.mark.security
@needs_llama
def test_front_door_and_runtime_listen_on_127_0_0_1_only(served: ServeProcess) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", served.port), timeout=5)
    listening = [
        connection.laddr
        for process in [
            psutil.Process(served.process.pid),
            *psutil.Process(served.process.pid).children(recursive=True),
        ]
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    ports = {address.port for address in listening}
    assert served.port in ports
    assert len(ports) >= 2  # the front door and the runtime
    assert {address.ip for address in listening} == {"127.0.0.1"}


@pytest.mark.security
@needs_llama
def test_a_local_process_cannot_skip_the_front_door_through_the_runtime_port(
    served: ServeProcess,
) -> None:
    # The runtime's port is on loopback and easy to find (here: /_status). Without the
    # runtime's own key, which only the supervisor and the front door hold, it refuses all
    # but /health, so nobody gets past the admission bound that way; the front door's token
    # does not open it either.
    runtime_url = str(served.status()["runtime_url"])
    body = completion("bypass", 4)
    with httpx.Client(base_url=runtime_url, timeout=30, trust_env=False) as runtime:
        assert runtime.get("/health").status_code == 200
        for path in ("/completion", "/v1/completions", "/v1/chat/completions"):
            assert runtime.post(path, json=body).status_code == 401
            assert runtime.post(path, json=body, headers=served.auth).status_code == 401
        assert runtime.get("/slots").status_code == 401
        key = runtime_headers(int(served.status()["pid"]))  # type: ignore[call-overload]
        assert runtime.post("/completion", json=body, headers=key).status_code == 200
    assert key["authorization"] not in json.dumps(served.status())


# --- admission under a flood --------------------------------------------------------------


@pytest.mark.stress
@needs_llama
def test_a_flood_of_2000_never_puts_more_than_max_in_flight_on_the_runtime(
    served: ServeProcess,
) -> None:
    runtime_url = str(served.status()["runtime_url"])
    key = runtime_headers(int(served.status()["pid"]))  # type: ignore[call-overload]
    samples: list[int] = []
    stop = threading.Event()

    def sample_runtime() -> None:
        # llama.cpp's own view, sampled throughout: it has RUNTIME_PARALLEL slots, so only
        # the front door can keep it at MAX_IN_FLIGHT.
        with httpx.Client(trust_env=False, timeout=10, headers=key) as runtime:
            while not stop.is_set():
                slots = runtime.get(runtime_url + "/slots").json()
                samples.append(sum(1 for slot in slots if slot.get("is_processing")))
                time.sleep(0.01)

    total = 2000
    # Bounded on the client side: a few hundred connections at once is what a 2-core machine
    # and httpx's pool handle quickly; thousands queued inside httpx's pool stall the client.
    client_concurrency = 200

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=client_concurrency, max_keepalive_connections=0)
        gate = asyncio.Semaphore(client_concurrency)
        async with httpx.AsyncClient(
            base_url=served.url, headers=served.auth, limits=limits, timeout=120, trust_env=False
        ) as client:

            async def one(index: int) -> httpx.Response:
                async with gate:
                    return await client.post("/completion", json=completion(f"flood {index}", 8))

            return await asyncio.gather(*(one(index) for index in range(total)))

    sampler = threading.Thread(target=sample_runtime)
    sampler.start()
    before = served.status()
    try:
        responses = asyncio.run(flood())
    finally:
        stop.set()
        sampler.join()
    after = served.status()

    served_count = 0
    refusals: Counter[str] = Counter()
    for index, response in enumerate(responses):
        if response.status_code == 200:
            served_count += 1
            assert response.json()["content"] == str(index)[-1] * 8
        else:
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            refusals[response.json()["reason"]] += 1
    assert served_count + sum(refusals.values()) == total
    assert served_count >= MAX_IN_FLIGHT + QUEUE_BOUND
    assert set(refusals) <= {"queue_full", "queue_timeout"}
    assert sum(refusals.values()) > 0

    assert samples and max(samples) <= MAX_IN_FLIGHT
    assert RUNTIME_PARALLEL > MAX_IN_FLIGHT
    front = after["front_door"]
    assert isinstance(front, dict) and isinstance(before["front_door"], dict)
    assert front["peak_proxied_in_flight"] <= MAX_IN_FLIGHT
    assert front["proxied_total"] - before["front_door"]["proxied_total"] == served_count
    assert after["in_flight"] == 0 and after["queued"] == 0
    assert int(after["admitted_total"]) - int(before["admitted_total"]) == served_count  # type: ignore[call-overload]


# --- streaming ----------------------------------------------------------------------------


@needs_llama
def test_streamed_tokens_arrive_while_the_runtime_is_still_generating(
    served: ServeProcess,
) -> None:
    runtime_url = str(served.status()["runtime_url"])
    key = runtime_headers(int(served.status()["pid"]))  # type: ignore[call-overload]
    with httpx.Client(
        base_url=served.url, headers=served.auth, timeout=60, trust_env=False
    ) as client:
        with client.stream(
            "POST", "/completion", json=completion("stream!", 1900, stream=True)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["content"] == "!"
            # The first event is here and the runtime is still generating the rest: nothing
            # waited for the end of the stream.
            assert runtime_processing(runtime_url, key) == 1
            assert client.get("/_status").json()["in_flight"] == 1
        # Leaving the block closes the connection mid-stream: the slot comes back and
        # llama.cpp stops generating for the departed client.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (
                client.get("/_status").json()["in_flight"] == 0
                and runtime_processing(runtime_url, key) == 0
            ):
                break
            time.sleep(0.05)
        assert client.get("/_status").json()["in_flight"] == 0
        assert runtime_processing(runtime_url, key) == 0


# --- shutdown -----------------------------------------------------------------------------


@needs_llama
def test_sigterm_drains_in_flight_refuses_new_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    with running_serve(tmp_path, max_in_flight=MAX_IN_FLIGHT, queue_bound=QUEUE_BOUND) as (
        serve,
        _origin,
    ):
        runtime_pid = int(serve.status()["pid"])  # type: ignore[call-overload]
        runtime = psutil.Process(runtime_pid)
        results: dict[str, object] = {}

        async def scenario() -> None:
            async with httpx.AsyncClient(
                base_url=serve.url, headers=serve.auth, timeout=120, trust_env=False
            ) as client:
                running = [
                    asyncio.create_task(
                        client.post("/completion", json=completion(f"long {index}", 1900))
                    )
                    for index in range(MAX_IN_FLIGHT)
                ]
                while (await client.get("/_status")).json()["in_flight"] < MAX_IN_FLIGHT:
                    await asyncio.sleep(0.01)
                waiting = asyncio.create_task(
                    client.post("/completion", json=completion("queued", 4))
                )
                while (await client.get("/_status")).json()["queued"] < 1:
                    await asyncio.sleep(0.005)
                serve.process.send_signal(signal.SIGTERM)
                while (await client.get("/_status")).json()["state"] != "draining":
                    await asyncio.sleep(0.005)
                results["new"] = await client.post("/completion", json=completion("late", 4))
                results["waiting"] = await waiting
                results["running"] = await asyncio.gather(*running)

        asyncio.run(scenario())
        assert serve.process.wait(timeout=60) == 0
        for response in results["running"]:  # type: ignore[attr-defined]
            assert response.status_code == 200
            # Complete answers (each llama.cpp slot's context caps the length, not the drain).
            content = response.json()["content"]
            assert content and set(content) == {content[0]}
        for key in ("new", "waiting"):
            response = results[key]
            assert isinstance(response, httpx.Response)
            assert response.status_code == 503
            assert response.json() == {"ok": False, "reason": "not_ready"}
            assert int(response.headers["retry-after"]) >= 1
        assert not runtime.is_running() or runtime.status() == psutil.STATUS_ZOMBIE
        assert not serve.token_file.exists()
        assert not (serve.state_dir / "serve.json").exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", serve.port), timeout=2)


# --- refusals before ready ----------------------------------------------------------------


def _serve_once(
    tmp_path: Path,
    *,
    store: Path | None = None,
    model: bytes | None = None,
    stderr: list[str] | None = None,
    **manifest_options: object,
) -> tuple[int, str, int]:
    """Run ``serve`` on the tiny model (or ``model``) until it exits; (status, stdout, requests
    the origin saw). ``stderr``, when given, receives what it printed there."""
    from companion_runtime.bind.https_origin import ModelOrigin

    data = tiny_model_bytes() if model is None else model
    with ModelOrigin({"/models/tiny.gguf": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            serve_manifest_text(
                origin.url("/models/tiny.gguf"),
                origin.base_url,
                data,
                **manifest_options,  # type: ignore[arg-type]
            )
        )
        finished = subprocess.run(
            serve_command(manifest, store or tmp_path / "store", origin.ca_pem_path),
            capture_output=True,
            text=True,
            env=serve_env(tmp_path / "state"),
            timeout=120,
        )
        if stderr is not None:
            stderr.append(finished.stderr)
        return finished.returncode, finished.stdout, len(origin.requests)


@pytest.mark.data_integrity
@needs_llama
def test_a_model_that_does_not_verify_is_refused_before_anything_serves(tmp_path: Path) -> None:
    returncode, stdout, _requests = _serve_once(tmp_path, sha256="0" * 64)
    assert returncode == 1
    assert json.loads(stdout) == {"ok": False, "reason": "digest_mismatch"}
    assert not any((tmp_path / "store").rglob("sha256-*"))
    assert not (tmp_path / "state" / "serve.json").exists()


@needs_llama
def test_a_model_too_large_is_refused_before_the_download(tmp_path: Path) -> None:
    returncode, stdout, requests = _serve_once(
        tmp_path, size_bytes=6 * 1024**3, max_ram_bytes=4 * 1024**3
    )
    assert returncode == 1
    assert json.loads(stdout) == {"ok": False, "reason": "model_too_large"}
    assert requests == 0


@needs_llama
def test_a_context_too_large_for_the_ceiling_is_refused_before_the_runtime_starts(
    tmp_path: Path,
) -> None:
    # The tiny model declaring 2^21 tokens, run with -c 0 and 8 slots, a cache each of the
    # declared length: 8 GiB of KV cache, which only the model file says and only once it is
    # downloaded and verified. The 429 KB model alone fits.
    model = declaring_context(write_tiny_model(tmp_path / "tiny.gguf"), 2**21, tmp_path)
    data = model.read_bytes()
    stderr: list[str] = []
    returncode, stdout, requests = _serve_once(
        tmp_path, model=data, stderr=stderr, context_size=0, max_ram_bytes=512 * 1024**2
    )
    assert returncode == 1
    assert json.loads(stdout) == {"ok": False, "reason": "model_too_large"}
    assert requests == 1  # fetched and verified; the fit before the download could not know
    assert (
        "the model does not fit: 419 KiB of weights, 8,192 MiB of KV cache for a "
        "16777216-token context and 256 MiB for the runtime" in stderr[0]
    )
    assert "(-c)" in stderr[0]
    assert str(tmp_path) not in stderr[0] and hashlib.sha256(data).hexdigest() not in stderr[0]
    assert not (tmp_path / "state" / "serve.json").exists()


@pytest.mark.security
def test_a_manifest_refusal_names_the_field_and_nothing_of_its_value(tmp_path: Path) -> None:
    # As pull does: which field, from the manifest's schema; never the value (a digest here).
    secret = "f" * 63 + "Z"
    returncode, stdout, requests = _serve_once(tmp_path, sha256=secret)
    assert (returncode, requests) == (1, 0)
    assert json.loads(stdout) == {"ok": False, "reason": "malformed_spec", "field": "model.sha256"}
    plain = subprocess.run(
        serve_command(tmp_path / "manifest.toml", tmp_path / "store", tmp_path / "manifest.toml")[
            :-1
        ],
        capture_output=True,
        text=True,
        env=serve_env(tmp_path / "state"),
        timeout=60,
    )
    assert (plain.returncode, plain.stdout) == (1, "")
    assert plain.stderr == "refused: malformed_spec (model.sha256)\n"
    assert secret not in stdout + plain.stderr


@needs_llama
def test_a_store_under_the_home_of_no_user_is_refused_before_the_download(
    tmp_path: Path,
) -> None:
    returncode, stdout, requests = _serve_once(
        tmp_path, store=Path("~no-such-user-companion-runtime/models")
    )
    assert returncode == 1
    assert json.loads(stdout) == {"ok": False, "reason": "store_error"}
    assert requests == 0


def test_a_manifest_name_too_long_for_the_file_system_is_a_usage_error(tmp_path: Path) -> None:
    too_long = tmp_path / ("m" * 300 + ".toml")
    finished = subprocess.run(
        serve_command(too_long, tmp_path / "store", too_long),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr


@pytest.mark.security
@pytest.mark.skipif(
    Path(f"/run/user/{os.geteuid()}").exists(),
    reason="the platform's own runtime directory exists, so its fallback is never used",
)
def test_a_default_state_dir_the_platform_refuses_is_store_error_before_the_download(
    tmp_path: Path,
) -> None:
    # With XDG_RUNTIME_DIR unset, the default is runtime-<uid> in the temporary directory, a
    # name anyone can take first: here it is a planted symlink, which platformdirs refuses.
    from companion_runtime.bind.https_origin import ModelOrigin

    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (temp / f"runtime-{os.geteuid()}").symlink_to(elsewhere)
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("XDG_RUNTIME_DIR", "COMPANION_RUNTIME_STATE_DIR")
    }
    env["TMPDIR"] = str(temp)
    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        finished = subprocess.run(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        requests = origin.requests
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert json.loads(finished.stdout) == {"ok": False, "reason": "store_error"}
    assert "Traceback" not in finished.stderr
    assert requests == []
    assert list(elsewhere.iterdir()) == []


# --- giving up ----------------------------------------------------------------------------


def _standin_manifest_text(
    origin_url: str,
    allow: str,
    data: bytes,
    *flags: str,
    command: list[str] | None = None,
    ready_timeout_s: float = 30,
    model: tuple[str, int] | None = None,
    max_ram_bytes: int = 4294967296,
) -> str:
    """A manifest whose runtime is the stand-in runtime run with ``flags`` (or ``command``).

    The model is ``data``, or the (digest, size) ``model`` when given.
    """
    import hashlib

    digest, size = model or (hashlib.sha256(data).hexdigest(), len(data))
    return "\n".join(
        [
            "[model]",
            'name = "standin"',
            f'url = "{origin_url}"',
            f'sha256 = "{digest}"',
            f"size_bytes = {size}",
            "[sources]",
            f'allow = ["{allow}"]',
            "[runtime]",
            f"command = {json.dumps(command or standin_command(*flags))}",
            f"ready_timeout_s = {ready_timeout_s}",
            "[limits]",
            f"max_ram_bytes = {max_ram_bytes}",
            "max_vram_bytes = 1073741824",
            "max_cpu_percent = 100",
            "",
        ]
    )


def test_serve_exits_1_with_restart_limit_reached_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    from companion_runtime.bind.https_origin import ModelOrigin

    # The supervisor's own defaults apply (the manifest has no restart settings): each crash
    # is restarted after a doubling backoff from 0.5 s, up to max_restarts times.
    defaults = {field.name: field.default for field in dataclasses.fields(SupervisorConfig)}
    max_restarts = defaults["max_restarts"]
    assert isinstance(max_restarts, int)
    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(
                origin.url("/models/standin.bin"),
                origin.base_url,
                data,
                # Ready, then gone one second later (exit status 4) — every time; each run
                # also leaves a grandchild in its process group that must not outlive it.
                "--exit-after-s",
                "1",
                "--spawn-child",
            )
        )
        started = time.monotonic()
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        seen: dict[int, tuple[float, bool]] = {}  # pid -> (create time, is a runtime)
        try:
            serve = psutil.Process(process.pid)
            while process.poll() is None and time.monotonic() - started < 90:
                with contextlib.suppress(psutil.Error):
                    # Descendants first, then direct children: a runtime seen in the first list
                    # is still a direct child in the second unless it has died in between.
                    descendants = serve.children(recursive=True)
                    direct = {child.pid for child in serve.children()}
                    for child in descendants:
                        created, was_runtime = seen.get(child.pid, (child.create_time(), False))
                        seen[child.pid] = (created, was_runtime or child.pid in direct)
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
            stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - started

    assert process.returncode == 1, stderr[-3000:]
    # Backoffs 0.5 + 1 + 2 s and four one-second runs: well under a minute, not forever.
    assert elapsed < 60
    ready_line, given_up_line = (json.loads(line) for line in stdout.splitlines())
    assert ready_line["ok"] is True
    assert given_up_line == {"ok": False, "reason": "restart_limit_reached"}
    assert "Traceback" not in stderr
    runtimes = [pid for pid, (_created, is_runtime) in seen.items() if is_runtime]
    assert len(runtimes) == 1 + max_restarts
    assert len(seen) > len(runtimes)  # the grandchildren were seen too
    assert wait_for(
        lambda: all(process_gone(pid, created) for pid, (created, _) in seen.items()), 10
    ), [pid for pid, (created, _) in seen.items() if not process_gone(pid, created)]
    token_file = Path(str(ready_line["token_file"]))
    assert not token_file.exists()
    assert not (state_dir / "serve.json").exists()
    port = int(str(ready_line["url"]).rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


_RUNTIME = ["RUNTIME", "--port", "{port}"]  # RUNTIME: a file the test writes with `content`


@pytest.mark.parametrize(
    ("command", "content", "expected"),
    [
        (["/nonexistent/llama-server", "--port", "{port}"], None, "executable_not_allowed"),
        (["/", "--port", "{port}"], None, "executable_not_allowed"),
        (["/bin/sh", "-c", "exit 0", "sh", "{model_path}"], None, "malformed_spec"),  # no {port}
        (["/bin/sh", "{port}", "{model_name}"], None, "malformed_spec"),
        # Executable files that exec could never run.
        pytest.param(
            _RUNTIME, b"#!/nonexistent/python3\n", "executable_not_allowed", id="no-interpreter"
        ),
        # llama.cpp's server told to load a file nobody verified (the last -m wins).
        pytest.param(
            [
                sys.executable,
                "-P",
                "-m",
                "companion_runtime.bind.llama_server",
                "-m",
                "{model_path}",
                "-m",
                "/models/other.gguf",
                "--port",
                "{port}",
            ],
            None,
            "malformed_spec",
            id="another-model",
        ),
        # The embedded launcher given an option its parser does not take (upstream's
        # --mmproj): it would exit with a usage error at every start, whatever was downloaded.
        pytest.param(
            [
                sys.executable,
                "-P",
                "-m",
                "companion_runtime.bind.llama_server",
                "-m",
                "{model_path}",
                "--port",
                "{port}",
                "--mmproj",
                "/models/projector.gguf",
            ],
            None,
            "malformed_spec",
            id="launcher-refuses-its-arguments",
        ),
        # ... or weights beside it: a projector fetched from a host nobody allowlisted.
        pytest.param(
            [
                "/usr/bin/env",
                "llama-server",
                "-m",
                "{model_path}",
                "--port",
                "{port}",
                "--mmproj-url",
                "https://elsewhere.example/models/projector.gguf?token=secret",
            ],
            None,
            "malformed_spec",
            id="unverified-projector",
        ),
        pytest.param(
            _RUNTIME, b"#!INTERPRETER\n", "executable_not_allowed", id="interpreter-not-executable"
        ),
        pytest.param(
            _RUNTIME,
            b"print('no #! line')\n",
            "executable_not_allowed",
            id="neither-script-nor-elf",
            marks=pytest.mark.skipif(
                not sys.platform.startswith("linux"), reason="the ELF check is Linux's"
            ),
        ),
    ],
)
def test_a_runtime_command_that_cannot_run_is_refused_before_the_download(
    tmp_path: Path, command: list[str], content: bytes | None, expected: str
) -> None:
    from companion_runtime.bind.https_origin import ModelOrigin

    if content is not None:
        interpreter = tmp_path / "not-executable"
        interpreter.write_text("#!/bin/sh\n")
        interpreter.chmod(0o644)
        runtime = tmp_path / "runtime"
        runtime.write_bytes(content.replace(b"INTERPRETER", bytes(interpreter)))
        runtime.chmod(0o755)
        command = [str(runtime), *command[1:]]
    data = b"a model that is never needed\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(
                origin.url("/models/standin.bin"), origin.base_url, data, command=command
            )
        )
        finished = subprocess.run(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            capture_output=True,
            text=True,
            env=serve_env(tmp_path / "state"),
            timeout=120,
        )
        requests = len(origin.requests)
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert json.loads(finished.stdout) == {"ok": False, "reason": expected}
    assert "elsewhere" not in finished.stderr and "/models/" not in finished.stderr
    if "--mmproj-url" in command:
        assert "loads weights the manifest does not verify (--mmproj-url)" in finished.stderr
    if "--mmproj" in command:
        assert "the embedded launcher would refuse its command line" in finished.stderr
    assert requests == 0
    assert not any((tmp_path / "store").rglob("sha256-*"))


@pytest.mark.parametrize("case", ["never healthy", "exits at once", "port taken"])
def test_a_refusal_after_the_runtime_was_spawned_is_exit_1_with_its_reason(
    tmp_path: Path, case: str
) -> None:
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    taken = socket.create_server(("127.0.0.1", 0))
    with taken, ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        flags = ("--never-healthy",) if case == "never healthy" else ()
        manifest.write_text(
            _standin_manifest_text(
                origin.url("/models/standin.bin"),
                origin.base_url,
                data,
                *flags,
                command=["/bin/sh", "-c", "exit 3", "sh", "{port}"]
                if case == "exits at once"
                else None,
                ready_timeout_s=1 if case == "never healthy" else 30,
            )
        )
        command = serve_command(manifest, tmp_path / "store", origin.ca_pem_path)
        if case == "port taken":
            command += ["--port", str(taken.getsockname()[1])]
        finished = subprocess.run(
            command, capture_output=True, text=True, env=serve_env(state_dir), timeout=120
        )
    expected = {
        "never healthy": "ready_timeout",
        "exits at once": "runtime_exited",
        "port taken": "spawn_failed",
    }[case]
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr
    assert json.loads(finished.stdout) == {"ok": False, "reason": expected}
    assert not state_dir.exists() or not any(state_dir.iterdir())
    if case == "exits at once":
        # How it ended, on stderr, so that the one JSON object on stdout stays one.
        assert "the runtime exited by itself: exit status 3" in finished.stderr


def test_sighup_drains_and_cleans_up_like_sigterm(tmp_path: Path) -> None:
    # Closing the terminal serve runs in sends SIGHUP.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(
                origin.url("/models/standin.bin"), origin.base_url, data, "--spawn-child"
            )
        )
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            assert ready["ok"] is True
            descendants = [
                (child.pid, child.create_time())
                for child in psutil.Process(process.pid).children(recursive=True)
            ]
            assert len(descendants) >= 2  # the runtime and the child it started
            process.send_signal(signal.SIGHUP)
            _stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert wait_for(lambda: all(process_gone(pid, created) for pid, created in descendants), 10)
    assert not Path(str(ready["token_file"])).exists()
    assert not (state_dir / "serve.json").exists()


def test_signals_until_it_exits_never_end_serve_by_their_default_action(tmp_path: Path) -> None:
    # SIGINT, SIGTERM and SIGHUP in turn every half millisecond from the first until serve has
    # exited: its event loop's handlers take the first ones, and once the loop is closed (which
    # puts the default actions back) a late one ended serve by the signal, or with a
    # KeyboardInterrupt, after it had drained and cleaned up. Every run: exit 0, clean.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        for run_index in range(3):
            state_dir = tmp_path / f"state-{run_index}"
            process = subprocess.Popen(
                serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(state_dir),
            )
            try:
                assert process.stdout is not None
                ready = json.loads(process.stdout.readline())
                assert ready["ok"] is True
                sent = flood_until_exit(process, timeout_s=60)
                stdout, stderr = process.communicate(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=30)
            assert process.returncode == 0, (run_index, process.returncode, sent, stderr[-3000:])
            assert stdout == ""
            assert "Traceback" not in stderr and "Aborted" not in stderr
            assert not Path(str(ready["token_file"])).exists()
            assert not (state_dir / "serve.json").exists()


def test_a_signal_flood_finds_no_worker_thread_at_its_default_action(tmp_path: Path) -> None:
    # serve gives up its event loop's handlers with SIGINT, SIGTERM and SIGHUP blocked on its
    # main thread, and the loop's removal leaves each at its default action for a moment. The
    # loop's worker threads (asyncio's, for samples and lookups, and libuv's) did not block
    # them: SIGTERM sent as fast as it can be went to one of them in that moment and ended
    # serve by its default action after it had drained and cleaned up (four runs in eight).
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        for run_index in range(4):
            state_dir = tmp_path / f"state-{run_index}"
            process = subprocess.Popen(
                serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(state_dir),
            )
            try:
                assert process.stdout is not None
                ready = json.loads(process.stdout.readline())
                assert ready["ok"] is True
                time.sleep(1.0)  # samples taken: the worker threads are there
                blocking = threads_blocking(
                    process.pid, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                )
                assert blocking
                assert all(blocking.values()), blocking
                sent = flood_until_exit(
                    process, timeout_s=60, interval_s=0, signals=(signal.SIGTERM,)
                )
                _stdout, stderr = process.communicate(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=30)
            assert process.returncode == 0, (run_index, process.returncode, sent, stderr[-3000:])
            assert not Path(str(ready["token_file"])).exists()
            assert not (state_dir / "serve.json").exists()


@pytest.mark.data_integrity
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_download_ends_serve_within_a_second(
    tmp_path: Path, signum: signal.Signals
) -> None:
    from companion_runtime.bind.store import ModelStore
    from tests.support.https import FaultyOrigin, model_bytes, partial_size

    # 256 KiB every 0.1 s: the 24 MiB would take about 10 s.
    data, digest = model_bytes(24 * 1024 * 1024, seed=5)
    store = ModelStore(tmp_path / "store")
    state_dir = tmp_path / "state"
    with FaultyOrigin({"/models/big.bin": data}, chunk_delay_s=0.1) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/big.bin"), origin.base_url, data)
        )
        process = subprocess.Popen(
            serve_command(manifest, store.root, origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert wait_for(
                lambda: partial_size(store, digest) >= 1024 * 1024 or process.poll() is not None,
                60,
            )
            assert process.poll() is None, process.communicate()
            process.send_signal(signum)
            started = time.monotonic()
            stdout, stderr = process.communicate(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    # As for any signal before ready: exit 1, not_ready. And nothing waited for the download.
    assert process.returncode == 1, stderr[-3000:]
    assert json.loads(stdout) == {"ok": False, "reason": "not_ready"}
    assert "Traceback" not in stderr
    assert elapsed < 2
    assert not store.has_blob(digest)
    assert 0 < partial_size(store, digest) < len(data)  # kept for the next pull to resume
    assert not (state_dir / "serve.json").exists()


def _serve_imports_asyncio(pid: int) -> bool:
    # serve's own first imports load asyncio's extension module: nothing before its command
    # does (click's parsing included), and its event loop is not there yet.
    try:
        return "_asyncio" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif("_asyncio" in sys.builtin_module_names, reason="needs _asyncio as a module")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
@pytest.mark.parametrize("moment", ["caught", "imports", "first-line"])
def test_a_signal_before_serve_s_event_loop_handles_one_ends_it_not_ready(
    tmp_path: Path, signum: signal.Signals, moment: str
) -> None:
    # The tenth of a second or more between serve's first line and its event loop's handlers
    # (its imports, the manifest's check): a SIGINT there ended serve with exit 130 and nothing
    # printed, a SIGTERM or SIGHUP by the signal. Sent as soon as serve catches SIGTERM and
    # SIGHUP (its command's first line), while it imports asyncio, or at the first step it
    # names (without --json): every time exit 1 not_ready, nothing running or left behind.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        for trial in range(3):
            state_dir = tmp_path / f"state-{trial}"
            command = serve_command(manifest, tmp_path / "store", origin.ca_pem_path)
            if moment == "first-line":
                command.remove("--json")
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(state_dir),
            )
            try:
                deadline = time.monotonic() + 60
                if moment == "first-line":
                    assert process.stderr is not None
                    first = process.stderr.readline()
                    assert first.startswith("> "), first
                else:
                    reached = (
                        catches_termination_signals
                        if moment == "caught"
                        else _serve_imports_asyncio
                    )
                    while not reached(process.pid):
                        assert process.poll() is None and time.monotonic() < deadline, moment
                        time.sleep(0.0005)
                children = psutil.Process(process.pid).children(recursive=True)
                started = [(child.pid, child.create_time()) for child in children]
                process.send_signal(signum)
                stdout, stderr = process.communicate(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=30)
            assert process.returncode == 1, (moment, trial, process.returncode, stderr[-3000:])
            assert "Traceback" not in stderr
            if moment == "first-line":
                assert stdout == ""
                assert stderr.strip().endswith("refused: not_ready"), stderr[-3000:]
            else:
                assert json.loads(stdout) == {"ok": False, "reason": "not_ready"}
            assert wait_for(lambda: all(process_gone(pid, at) for pid, at in started), 10)
            assert not state_dir.exists() or not any(state_dir.rglob("*")), list(
                state_dir.rglob("*")
            )


@pytest.mark.data_integrity
def test_a_signal_during_the_re_verify_before_the_runtime_starts_ends_serve_within_a_second(
    tmp_path: Path,
) -> None:
    from companion_runtime.bind.filehash import verify_file
    from companion_runtime.bind.store import ModelStore

    # The supervisor re-hashes the blob before it starts the runtime: seconds for a big one.
    if psutil.virtual_memory().available < BIG_BLOB_BYTES + 2 * 1024**3:
        pytest.skip("the fit check needs room for the 4 GiB model here")
    state_dir = tmp_path / "state"
    with sparse_scratch_dir(tmp_path) as scratch:
        store = ModelStore(scratch / "store")
        store.ensure_layout()
        with big_zero_blob(store.blob_path(BIG_BLOB_SHA256)) as (digest, size):
            manifest = tmp_path / "manifest.toml"
            manifest.write_text(
                # Stored already: the pull only re-verifies it and never asks this source.
                _standin_manifest_text(
                    "https://127.0.0.1:9/models/big.bin",
                    "https://127.0.0.1:9/",
                    b"",
                    model=(digest, size),
                    max_ram_bytes=2 * size,
                )
            )
            # Without --json, serve names each step on stderr as it begins.
            command = [sys.executable, "-m", "companion_runtime.cli", "serve", str(manifest)]
            process = subprocess.Popen(
                [*command, "--store", str(store.root)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=serve_env(state_dir),
            )
            try:
                assert process.stderr is not None
                steps = []
                while (line := process.stderr.readline()) and line.strip() != "> start":
                    steps.append(line)
                assert line.strip() == "> start", steps
                time.sleep(0.5)  # well into the supervisor's re-hash of the blob
                assert process.poll() is None
                process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                stdout, stderr = process.communicate(timeout=60)
                elapsed = time.monotonic() - started
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=30)
            assert process.returncode == 1, stderr[-3000:]
            assert stderr.strip().endswith("refused: not_ready"), stderr[-3000:]
            assert "Traceback" not in stderr
            assert stdout == ""
            assert elapsed < 1.5
            # A re-verify cut short says nothing about the blob: it stays, and still verifies.
            blob = store.blob_path(digest)
            assert verify_file(blob, expected_digest=digest, expected_size_bytes=size).ok
            assert not (state_dir / "serve.json").exists()


def test_sigterm_with_a_client_stalled_mid_body_still_ends_at_once_with_exit_0(
    tmp_path: Path,
) -> None:
    # A client that stopped halfway through its request's body (a hung app) holds no slot
    # and nothing the runtime works on: it gets 503 not_ready, not the whole grace period.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            assert ready["ok"] is True, ready
            port = int(str(ready["url"]).rsplit(":", 1)[1])
            token = Path(str(ready["token_file"])).read_text().strip()
            stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
            for connection in stalled:
                connection.sendall(
                    f"POST /completion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{".encode()
                )
            time.sleep(0.5)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            elapsed = time.monotonic() - started
            answers = []
            for connection in stalled:
                with connection:
                    answers.append(connection.recv(65536))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert process.returncode == 0
    assert elapsed < 10  # the grace period is 30 s
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503")
        assert answer.endswith(b'{"ok":false,"reason":"not_ready"}')


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_serve_whose_output_is_closed_keeps_serving_and_drains_to_exit_0(
    tmp_path: Path, closed: str
) -> None:
    # The app that started serve stopped reading one of its pipes: nothing to report to, but
    # no reason to stop serving, nor to report the clean shutdown as a failure.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        command = serve_command(manifest, tmp_path / "store", origin.ca_pem_path)
        if closed == "stderr":
            command.remove("--json")  # without it the steps ("> drain") go to stderr
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(state_dir),
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            if closed == "stdout":
                process.stdout.close()  # before the ready line
                still_open = process.stderr
            else:
                assert process.stdout.readline().startswith("serving http://127.0.0.1:")
                process.stderr.close()  # before the shutdown's steps
                still_open = process.stdout
            assert wait_for(
                lambda: (state_dir / "serve.json").exists() or process.poll() is not None, 60
            )
            assert process.poll() is None, still_open.read()[-3000:]
            state = json.loads((state_dir / "serve.json").read_text())
            token_file = Path(state["token_file"])
            token = token_file.read_text().strip()
            with httpx.Client(trust_env=False, timeout=10) as client:
                response = client.get(
                    state["url"] + "/_status", headers={"authorization": f"Bearer {token}"}
                )
            assert response.status_code == 200
            assert response.json()["state"] == "ready"
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            rest = still_open.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert process.returncode == 0, rest[-3000:]
    assert "Traceback" not in rest
    assert "could not listen" not in rest
    assert not token_file.exists()
    assert not (state_dir / "serve.json").exists()


@pytest.mark.parametrize("descriptor", [0, 1, 2])
def test_serve_started_with_a_standard_descriptor_closed_serves_and_drains_to_exit_0(
    tmp_path: Path, descriptor: int
) -> None:
    # A spawner that closes stdin, stdout or stderr (a daemon's, "serve <&-"): the number is
    # then free for the next socket, which the event loop must never treat as a standard one.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = tmp_path / "state"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        command = serve_command(manifest, tmp_path / "store", origin.ca_pem_path)
        log = tmp_path / "log"
        with log.open("w") as output:
            process = subprocess.Popen(
                ["/bin/sh", "-c", f'exec "$@" {descriptor}>&-', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=serve_env(state_dir),
            )
        try:
            assert wait_for(
                lambda: (state_dir / "serve.json").exists() or process.poll() is not None, 60
            )
            assert process.poll() is None, log.read_text()[-3000:]
            state = json.loads((state_dir / "serve.json").read_text())
            token_file = Path(state["token_file"])
            token = token_file.read_text().strip()
            with httpx.Client(trust_env=False, timeout=10) as client:
                response = client.get(
                    state["url"] + "/_status", headers={"authorization": f"Bearer {token}"}
                )
            assert response.status_code == 200
            assert response.json()["state"] == "ready"
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert not token_file.exists()
    assert not (state_dir / "serve.json").exists()


def test_serve_raises_its_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    # Each client connection is a file; a low soft limit is all a local process would have
    # to fill with idle connections to shut out everyone else.
    import resource

    from companion_runtime.bind.https_origin import ModelOrigin

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(tmp_path / "state"),
            preexec_fn=low_soft_limit,
        )
        try:
            assert process.stdout is not None
            assert json.loads(process.stdout.readline())["ok"] is True
            soft, hard = psutil.Process(process.pid).rlimit(psutil.RLIMIT_NOFILE)
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert (soft, hard) == (4096, 4096)
    assert process.returncode == 0


@pytest.mark.security
def test_idle_connections_past_the_open_file_limit_cannot_shut_out_an_authorized_client(
    tmp_path: Path,
) -> None:
    # Every connection is a file descriptor; once they ran out, accept failed for everyone,
    # and a local process needing no token could hold the front door shut with idle ones.
    import resource

    from companion_runtime.bind.https_origin import ModelOrigin

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    data = b"the stand-in runtime never reads its model\n"
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        process = subprocess.Popen(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=serve_env(tmp_path / "state"),
            preexec_fn=low_limit,
        )
        idle: list[socket.socket] = []
        try:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            assert ready["ok"] is True
            url = str(ready["url"])
            port = int(url.rsplit(":", 1)[1])
            token = Path(str(ready["token_file"])).read_text().strip()
            for _ in range(300):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                except ConnectionResetError:
                    # Refused at the limit, and reset at once rather than left to read its
                    # 503: past 64 such refusals waiting to be read, as a busy machine
                    # makes a burst of 300 (connect waits, so the reset can land first).
                    pass
            time.sleep(1.2)
            with httpx.Client(trust_env=False, timeout=10) as client:
                response = client.get(
                    url + "/_status", headers={"authorization": f"Bearer {token}"}
                )
            assert response.status_code == 200
            front = response.json()["front_door"]
            assert 0 < front["max_connections"] < 256
            assert front["open_connections"] <= front["max_connections"]
            # Each one past the limit either took an idle one's place or was refused.
            turned_away = front["connections_refused"] + front["connections_evicted"]
            assert turned_away >= 300 - front["max_connections"]
            assert front["connections_evicted"] >= 1
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        finally:
            for sock in idle:
                sock.close()
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert process.returncode == 0


def test_serve_help_documents_the_give_up_exit() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert finished.returncode == 0
    assert "Exits 1" in finished.stdout
    assert "restart_limit_reached" in finished.stdout


def _utf8_locale_env(state_dir: Path) -> dict[str, str]:
    """``serve_env`` with standard streams as a UTF-8 locale such as en_US.UTF-8 gives Python:
    strict, refusing to encode a lone surrogate (set with PYTHONIOENCODING, as not every
    machine has a locale besides C and C.UTF-8, under which they pass such bytes through)."""
    env = {
        name: value
        for name, value in serve_env(state_dir).items()
        if name not in ("PYTHONIOENCODING", "PYTHONUTF8") and not name.startswith("LC_")
    }
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    env["PYTHONIOENCODING"] = "utf-8"  # strict, as under en_US.UTF-8
    return env


def test_json_with_a_state_dir_that_is_not_utf8_is_a_usage_error_before_the_download(
    tmp_path: Path,
) -> None:
    # The ready line names the token file in the state directory: such a path came out as a
    # lone-surrogate escape ("\udcff"), which most readers turn into another path or refuse.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/state-\xff"))
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        finished = subprocess.run(
            serve_command(manifest, tmp_path / "store", origin.ca_pem_path),
            capture_output=True,
            env=_utf8_locale_env(state_dir),
            timeout=120,
        )
        requests = origin.requests
    assert (finished.returncode, finished.stdout) == (2, b"")
    assert b"Error: --json cannot print a token file path that is not valid UTF-8" in (
        finished.stderr
    )
    assert b"\xff" not in finished.stderr
    assert requests == []
    assert not state_dir.exists()


def test_the_ready_line_names_a_token_file_that_is_not_utf8_as_its_bytes(
    tmp_path: Path,
) -> None:
    # Printed as text under a UTF-8 locale, the token file's path could not be encoded: the
    # ready line was dropped, and standard output sent to the null device.
    from companion_runtime.bind.https_origin import ModelOrigin

    data = b"the stand-in runtime never reads its model\n"
    state_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/state-\xff"))
    with ModelOrigin({"/models/standin.bin": data}) as origin:
        manifest = tmp_path / "manifest.toml"
        manifest.write_text(
            _standin_manifest_text(origin.url("/models/standin.bin"), origin.base_url, data)
        )
        argv = serve_command(manifest, tmp_path / "store", origin.ca_pem_path)
        argv.remove("--json")
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_utf8_locale_env(state_dir),
        )
        try:
            # Ready once it recorded itself (the ready line may not come).
            assert wait_for(lambda: (state_dir / "serve.json").exists(), 60)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    assert b"Traceback" not in stderr
    (line,) = stdout.splitlines()
    prefix, _, token_file = line.partition(b"  token file: ")
    assert prefix.startswith(b"serving http://127.0.0.1:")
    assert token_file.startswith(os.fsencode(state_dir) + b"/frontdoor-")


@needs_llama
@pytest.mark.security
def test_serve_killed_with_sigkill_leaves_no_runtime_key_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runtime's key lives in a private file while the runtime runs. A serve killed with
    # SIGKILL cannot remove it, and it stayed in the temporary directory for good, one per
    # killed serve; the runtime's keeper, which outlives the manager long enough to kill what
    # is below it, removes it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    with running_serve(tmp_path) as (serve, _origin):
        keeper = serve.status()["pid"]
        assert isinstance(keeper, int)
        argv = psutil.Process(keeper).cmdline()
        key_file = Path(argv[argv.index("--api-key-file") + 1])
        assert key_file.is_file() and key_file.parent.parent == scratch
        below = [process.pid for process in psutil.Process(keeper).children(recursive=True)]
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait()
        assert wait_for(lambda: all(process_gone(pid) for pid in (keeper, *below)), 10)
        assert wait_for(lambda: not any(scratch.iterdir()), 5), sorted(
            path.name for path in scratch.iterdir()
        )


# --- too few descriptors -------------------------------------------------------------------


@pytest.mark.parametrize("limit", [8, 10, 11, 12, 13])
def test_too_few_descriptors_for_the_event_loop_is_a_refusal_not_a_traceback(
    tmp_path: Path, limit: int
) -> None:
    """Below a few free descriptors libuv aborted the process; a little above, the loop's
    signal set-up failed and left a ``RuntimeError`` traceback, and at 7-9 the loop's own
    failure read "could not write the output"."""
    import resource

    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        _standin_manifest_text(
            "https://127.0.0.1:9/models/standin.bin", "https://127.0.0.1:9", b"unused\n"
        )
    )
    ca_bundle = tmp_path / "ca.pem"
    ca_bundle.write_text("")

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    finished = subprocess.run(
        serve_command(manifest, tmp_path / "store", ca_bundle),
        capture_output=True,
        text=True,
        env=serve_env(tmp_path / "state"),
        timeout=60,
        preexec_fn=limit_descriptors,
    )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert json.loads(finished.stdout) == {"ok": False, "reason": "not_ready"}
    assert "Traceback" not in finished.stderr
    assert finished.stderr == "serve could not start its event loop: Too many open files\n"
