"""The front door over a supervised runtime, wired as ``serve`` wires them (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from pathlib import Path

import httpx
import psutil
import pytest

from companion_runtime.bind.manifest import (
    LimitsSpec,
    Manifest,
    ModelSpec,
    RuntimeSpec,
    SourcesSpec,
)
from companion_runtime.bind.serve import serving
from tests.support.llama import upstream_binary, write_model
from tests.support.port_taker import port_taker
from tests.support.supervision import async_wait_for, process_gone, standin_command, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _standin_manifest(directory: Path, *flags: str) -> tuple[Manifest, Path]:
    data = b"stand-in model " * 256
    model = directory / "model.bin"
    model.write_bytes(data)
    manifest = Manifest(
        model=ModelSpec(
            name="standin",
            url="https://models.example.com/standin.bin",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(
            command=tuple(standin_command("--api-key-file", "{api_key_file}", *flags)),
            health_path="/health",
            ready_timeout_s=60,
        ),
        limits=LimitsSpec(max_in_flight=4, queue_bound=8),
    )
    return manifest, model


def _alive_below(pid: int) -> list[psutil.Process]:
    return [
        process
        for process in psutil.Process(pid).children(recursive=True)
        if not process_gone(process.pid)
    ]


@pytest.mark.security
async def test_a_process_that_takes_the_port_of_a_runtime_that_died_gets_no_request(
    tmp_path: Path,
) -> None:
    # The runtime's port is in its argv for every local user to read. When the runtime dies,
    # the port is free at once, while the front door still holds slots for the requests the
    # runtime was working on, and the supervisor has not seen the exit yet. A request whose
    # pooled runtime connection broke before any answer is sent again on a new connection:
    # that connection must not reach whoever bound the port in between, nor hand it the
    # request, its body and the runtime's key.
    manifest, model = _standin_manifest(tmp_path)
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        runtime_url = supervisor.runtime_url
        assert runtime_url is not None
        port = int(runtime_url.rsplit(":", 1)[1])
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            # Four runtime connections in the pool, then four requests relayed on them.
            warm = await asyncio.gather(*(client.post("/work?sleep_s=0.2") for _ in range(4)))
            assert [answer.status_code for answer in warm] == [200] * 4
            working = [asyncio.create_task(client.post("/work?sleep_s=30")) for _ in range(4)]
            assert await async_wait_for(
                lambda: supervisor.controller.statistics().in_flight == 4, 10
            )
            await asyncio.sleep(0.3)  # the runtime has read them
            # The runtime dies, and another process takes its port before the event loop runs
            # again (blocking it here is what makes the race certain, not a fake).
            runtime.kill()
            assert wait_for(lambda: process_gone(runtime.pid), 10)
            with port_taker(port=port) as taker:
                answers = await asyncio.wait_for(asyncio.gather(*working), 30)
                received = taker.stop()
        assert not received, f"{len(received)} requests reached the port taker"
        assert [answer.status_code for answer in answers] == [502] * 4
        assert {answer.json()["reason"] for answer in answers} == {"runtime_gone"}


async def test_a_runtime_that_hands_its_listener_on_to_a_new_process_is_still_served(
    tmp_path: Path,
) -> None:
    # A pre-forking runtime serves from a worker, which hands the listener on to its successor
    # and exits (as a server recycling its workers does). The process found holding the
    # listener at ready is gone, but the listener is still the runtime's: new connections to
    # it must still be relayed, not refused runtime_gone for as long as the runtime runs.
    manifest, model = _standin_manifest(tmp_path, "--hand-over-after-s", "1.5")
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        (worker,) = runtime.children()
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            assert await async_wait_for(lambda: process_gone(worker.pid), 10)
            # The runtime and the successor that took the listener over.
            assert await async_wait_for(lambda: len(_alive_below(keeper)) == 2, 10)
            answers = [await client.post("/work?sleep_s=0") for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200] * 3
        assert supervisor.status()["state"] == "ready"


async def test_a_runtime_that_moves_its_listener_to_another_descriptor_is_still_served(
    tmp_path: Path,
) -> None:
    # The runtime moves its listener to a new descriptor (a dup, then the old one closed): the
    # descriptor found at ready is gone, the socket is still the runtime's. New runtime
    # connections (six at once, past the one pooled) find it again and are relayed, and
    # the health probes that follow keep the runtime ready, never taken for foreign_listener.
    manifest, model = _standin_manifest(tmp_path, "--move-listener-after-s", "1.5")
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()

        def listening_fds() -> set[int]:
            return {
                connection.fd
                for connection in runtime.net_connections(kind="tcp")
                if connection.status == psutil.CONN_LISTEN
            }

        found_at_ready = listening_fds()
        assert len(found_at_ready) == 1
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            assert await async_wait_for(
                lambda: len(listening_fds()) == 1 and listening_fds() != found_at_ready, 10
            )
            answers = await asyncio.gather(*(client.post("/work?sleep_s=0.3") for _ in range(6)))
            assert [answer.status_code for answer in answers] == [200] * 6
            await asyncio.sleep(3)  # health probes while ready
            assert (await client.post("/work?sleep_s=0")).status_code == 200
        status = supervisor.status()
        assert status["state"] == "ready"
        assert status["restarts"] == 0


@pytest.mark.security
async def test_a_port_its_runtime_no_longer_holds_gets_no_request_while_the_runtime_lives(
    tmp_path: Path,
) -> None:
    # Two processes of the runtime hold its listener at ready: the runtime and the worker it
    # forked. The runtime closes its copy and lives on; the worker exits. The port is then
    # free for anyone, while a process found holding it at ready still lives: a new runtime
    # connection must not carry a request, its body or the runtime's key to whoever bound it.
    manifest, model = _standin_manifest(tmp_path, "--give-up-listener-after-s", "1.5")
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        runtime_url = supervisor.runtime_url
        assert runtime_url is not None
        port = int(runtime_url.rsplit(":", 1)[1])
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        (worker,) = runtime.children()
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            assert await async_wait_for(lambda: process_gone(worker.pid), 10)
            assert not process_gone(runtime.pid)
            with port_taker(port=port) as taker:
                answers = [await client.post("/work?sleep_s=0") for _ in range(3)]
                # Longer than the probes' interval while ready: no health probe goes there
                # either.
                health = supervisor.config.health
                await asyncio.sleep((health.ready_interval_s or health.interval_s) * 2.5)
                received = taker.stop()
        assert not received, f"{len(received)} requests reached the port taker"
        assert [answer.status_code for answer in answers] == [502] * 3
        assert {answer.json()["reason"] for answer in answers} == {"runtime_gone"}


def _port_free(port: int) -> bool:
    """Whether no socket listens on ``127.0.0.1:port`` (connections on it may remain)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.security
async def test_a_port_taken_while_the_runtime_reopens_its_listener_gets_no_request(
    tmp_path: Path,
) -> None:
    # A runtime that re-executes itself closes its listener (and its connections) and opens a
    # new one on the same port, in the same process: that process never exits, and while no
    # listener holds the port, anyone may bind it. A new runtime connection must not carry a
    # request, its body or the runtime's key (the live run's) to whoever did.
    manifest, model = _standin_manifest(tmp_path, "--reexec-after-s", "1.5")
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        runtime_url = supervisor.runtime_url
        assert runtime_url is not None
        port = int(runtime_url.rsplit(":", 1)[1])
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            assert await async_wait_for(lambda: _port_free(port), 10)
            with port_taker(port=port) as taker:
                answers = [await client.post("/work?sleep_s=0") for _ in range(3)]
                received = taker.stop()
            assert not received, f"{len(received)} requests reached the port taker"
            assert [answer.status_code for answer in answers] == [502] * 3
            assert {answer.json()["reason"] for answer in answers} == {"runtime_gone"}
            # The port is free again: the runtime opens its new listener, and is served on.
            assert await async_wait_for(lambda: not _port_free(port), 10)
            answer = await client.post("/work?sleep_s=0")
        assert answer.status_code == 200
        assert supervisor.status()["state"] == "ready"


@pytest.mark.security
async def test_a_listener_the_runtime_sent_to_a_process_outside_its_tree_gets_no_request(
    tmp_path: Path,
) -> None:
    # The runtime sends its listener to a process outside its tree (SCM_RIGHTS), closes its
    # own copy and lives on. The socket still listens and the runtime's process still runs,
    # but what accepts on the port now is not the runtime: a new runtime connection must not
    # carry a request, its body or the runtime's key there.
    channel = str(tmp_path / "listener")
    manifest, model = _standin_manifest(
        tmp_path, "--send-listener-to", channel, "--send-listener-after-s", "1.5"
    )
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        keeper = supervisor.status()["pid"]
        assert isinstance(keeper, int)
        (runtime,) = psutil.Process(keeper).children()
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            with contextlib.ExitStack() as stack:
                # Until the runtime has sent it (the event loop runs on meanwhile).
                taker = await asyncio.to_thread(
                    stack.enter_context, port_taker(receive_listener_at=channel)
                )
                assert await async_wait_for(
                    lambda: (
                        not any(
                            connection.status == psutil.CONN_LISTEN
                            for connection in runtime.net_connections()
                        )
                    ),
                    10,
                )
                # Four at once: one on the runtime connection kept from the first request (made
                # to the runtime, which still answers on it), three on new ones.
                answers = await asyncio.gather(
                    *(client.post("/work?sleep_s=0.3") for _ in range(4))
                )
                received = taker.stop()
        assert not received, f"{len(received)} requests reached the process sent the listener"
        assert sorted(answer.status_code for answer in answers) == [200, 502, 502, 502]
        refused = [answer for answer in answers if answer.status_code == 502]
        assert {answer.json()["reason"] for answer in refused} == {"runtime_gone"}
        assert not process_gone(runtime.pid)


@pytest.mark.security
async def test_a_runtime_whose_port_another_process_took_is_restarted_on_a_new_one(
    tmp_path: Path,
) -> None:
    # While the runtime re-executes itself, another process takes its port and keeps it, and
    # would answer the supervisor's health probes 200. The runtime is no longer reachable at all:
    # it must not stay ready, refusing every request runtime_gone for as long as that process
    # holds the port; it is restarted on a new port, and the requests go there.
    manifest, model = _standin_manifest(tmp_path, "--reexec-after-s", "1.5")
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        supervisor = served.supervisor
        runtime_url = supervisor.runtime_url
        assert runtime_url is not None
        port = int(runtime_url.rsplit(":", 1)[1])
        auth = {"authorization": f"Bearer {served.token}"}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=30) as client:
            assert (await client.post("/work?sleep_s=0")).status_code == 200
            assert await async_wait_for(lambda: _port_free(port), 10)
            with port_taker(port=port) as taker:
                assert await async_wait_for(
                    lambda: (
                        supervisor.status()["spawns"] == 2
                        and supervisor.status()["state"] == "ready"
                    ),
                    20,
                )
                answer = await client.post("/work?sleep_s=0")
                received = taker.stop()
        # Nothing at all, not even a health probe.
        assert not received, f"{len(received)} requests reached the port taker"
        assert answer.status_code == 200
        assert supervisor.runtime_url != runtime_url


@pytest.mark.skipif(upstream_binary() is None, reason="needs an upstream llama-server binary")
async def test_a_shell_script_that_execs_llama_server_is_served_on_new_connections(
    tmp_path: Path,
) -> None:
    # A runtime that is a shell script exec-ing llama-server: the listener is found in the
    # process the script became, and each new runtime connection (eight at once, on an empty
    # pool) is checked against it and relayed, none refused runtime_gone.
    binary = upstream_binary()
    assert binary is not None
    model = write_model(tmp_path)
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{binary}" "$@"\n')
    script.chmod(0o755)
    data = model.read_bytes()
    manifest = Manifest(
        model=ModelSpec(
            name="tiny",
            url="https://models.example.com/tiny.gguf",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        ),
        sources=SourcesSpec(allow=("https://models.example.com/",)),
        runtime=RuntimeSpec(
            command=(
                str(script),
                *("-m", "{model_path}", "--host", "{host}", "--port", "{port}"),
                *("--api-key-file", "{api_key_file}", "-c", "512", "-np", "2", "-t", "1"),
            ),
            health_path="/health",
            ready_timeout_s=60,
        ),
        limits=LimitsSpec(max_in_flight=8, queue_bound=8),
    )
    async with serving(manifest, model, state_dir=tmp_path / "state") as served:
        auth = {"authorization": f"Bearer {served.token}"}
        body = {"prompt": "ab", "n_predict": 2}
        async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=60) as client:
            answers = await asyncio.gather(
                *(client.post("/completion", json=body) for _ in range(8))
            )
    assert [answer.status_code for answer in answers] == [200] * 8
