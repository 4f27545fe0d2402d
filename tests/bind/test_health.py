"""Health probes against real loopback listeners: the stand-in runtime and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from companion_runtime.bind.health import (
    HealthAnswer,
    HealthPolicy,
    HttpHealthChecker,
    wait_until_healthy,
    watch_while_ready,
)
from companion_runtime.bind.process import (
    SubprocessLauncher,
    build_launch_spec,
    choose_loopback_port,
)
from companion_runtime.core import LifecycleEvent, SpecError
from tests.support.supervision import async_wait_for, standin_command

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

FAST = HealthPolicy(
    interval_s=0.02, probe_timeout_s=0.5, failure_threshold=3, ready_interval_s=None
)


async def test_a_slow_start_is_loading_then_healthy_and_gives_health_ok() -> None:
    spec = build_launch_spec(
        standin_command("--listen-delay-s", "0.3", "--loading-s", "0.4"), model_path="m"
    )
    async with (
        SubprocessLauncher().launch(spec),
        HttpHealthChecker(spec.base_url + "/health", probe_timeout_s=0.5) as checker,
    ):
        answers = [await checker.check()]
        assert answers[0] is HealthAnswer.REFUSED
        started = time.monotonic()
        wait = await wait_until_healthy(checker, ready_timeout_s=20, policy=FAST)
        assert wait.event is LifecycleEvent.HEALTH_OK
        assert wait.answered_at is not None and wait.answered_at >= started
        assert wait.probes > 3  # it saw refusals and 503s before the 200
        assert wait.last_answer is HealthAnswer.HEALTHY
        assert await checker.check() is HealthAnswer.HEALTHY


async def test_a_runtime_that_never_turns_healthy_gives_health_fail_at_the_timeout() -> None:
    spec = build_launch_spec(standin_command("--never-healthy"), model_path="m")
    async with (
        SubprocessLauncher().launch(spec),
        HttpHealthChecker(spec.base_url + "/health", probe_timeout_s=0.5) as checker,
    ):
        started = time.monotonic()
        wait = await wait_until_healthy(checker, ready_timeout_s=1.0, policy=FAST)
        elapsed = time.monotonic() - started
    assert wait.event is LifecycleEvent.HEALTH_FAIL
    assert wait.answered_at is None
    assert wait.last_answer is HealthAnswer.LOADING
    assert 1.0 <= elapsed < 1.5


async def test_nothing_listening_is_refused_and_times_out_to_health_fail() -> None:
    port = choose_loopback_port()
    async with HttpHealthChecker(f"http://127.0.0.1:{port}/health") as checker:
        assert await checker.check() is HealthAnswer.REFUSED
        wait = await wait_until_healthy(checker, ready_timeout_s=0.3, policy=FAST)
    assert wait.event is LifecycleEvent.HEALTH_FAIL
    assert wait.last_answer is HealthAnswer.REFUSED


async def test_a_listener_that_never_answers_is_a_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/health"
        async with HttpHealthChecker(url, probe_timeout_s=0.2) as checker:
            started = time.monotonic()
            assert await checker.check() is HealthAnswer.TIMEOUT
            assert time.monotonic() - started < 1.0
            # A probe longer than what is left of the ready timeout is cut off at the deadline.
            slow = HttpHealthChecker(url, probe_timeout_s=10)
            async with slow:
                started = time.monotonic()
                wait = await wait_until_healthy(slow, ready_timeout_s=0.3, policy=FAST)
                assert time.monotonic() - started < 1.0
            assert wait.event is LifecycleEvent.HEALTH_FAIL
            assert wait.last_answer is HealthAnswer.TIMEOUT


@contextlib.contextmanager
def _hostile_health_listener(how: str) -> Iterator[tuple[str, list[int]]]:
    """A loopback listener that answers every connection as ``how`` says; yields its URL and
    a list that gets the number of bytes each connection managed to send."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n"

    def answer(connection: socket.socket) -> None:
        count = 0
        with connection, contextlib.suppress(OSError):
            connection.recv(65536)
            if how == "endless body":
                connection.sendall(head)
                while count < 8 * 1024**3:
                    count += connection.send(b"x" * 1024 * 1024)
            elif how == "body a byte at a time":
                connection.sendall(head)
                for _ in range(200):
                    count += connection.send(b"x")
                    time.sleep(0.05)
            else:  # the head a byte at a time: it never ends within the probe timeout
                for byte in head:
                    count += connection.send(bytes([byte]))
                    time.sleep(0.05)
        sent.append(count)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                threading.Thread(target=answer, args=(connection,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/health", sent
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(5)


@pytest.mark.security
@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("endless body", HealthAnswer.HEALTHY),
        ("body a byte at a time", HealthAnswer.HEALTHY),
        ("head a byte at a time", HealthAnswer.TIMEOUT),
    ],
)
async def test_a_probe_reads_no_body_and_never_outlasts_its_timeout(
    how: str, expected: HealthAnswer
) -> None:
    with _hostile_health_listener(how) as (url, sent):
        async with HttpHealthChecker(url, probe_timeout_s=0.5) as checker:
            started = time.monotonic()
            async with asyncio.timeout(5):
                answer = await checker.check()
            assert answer is expected
            assert time.monotonic() - started < 1.5
        # The connection was closed unread: the listener could send no more than the socket
        # buffers hold, not the gigabytes it offered.
        assert await async_wait_for(lambda: len(sent) == 1, 10)
        assert sent[0] < 64 * 1024 * 1024


async def test_another_status_is_not_healthy() -> None:
    spec = build_launch_spec(standin_command(), model_path="m")
    async with (
        SubprocessLauncher().launch(spec),
        HttpHealthChecker(spec.base_url + "/health") as health,
        HttpHealthChecker(spec.base_url + "/no-such-path") as elsewhere,
    ):
        assert (await wait_until_healthy(health, ready_timeout_s=20, policy=FAST)).event is (
            LifecycleEvent.HEALTH_OK
        )
        assert await elsewhere.check() is HealthAnswer.BAD_STATUS


async def test_while_ready_consecutive_failures_give_health_fail_and_not_before() -> None:
    spec = build_launch_spec(standin_command(), model_path="m")
    async with (
        SubprocessLauncher().launch(spec) as runtime,
        HttpHealthChecker(spec.base_url + "/health", probe_timeout_s=0.5) as checker,
    ):
        await wait_until_healthy(checker, ready_timeout_s=20, policy=FAST)
        watcher = asyncio.create_task(watch_while_ready(checker, policy=FAST))
        try:
            await asyncio.sleep(0.3)  # ~15 healthy probes: no event
            assert not watcher.done()
            await runtime.stop(grace_s=1.0)
            stopped = time.monotonic()
            assert await asyncio.wait_for(watcher, 5) is LifecycleEvent.HEALTH_FAIL
            # Three failed probes 20 ms apart: well within half a second.
            assert time.monotonic() - stopped < 0.5
        finally:
            watcher.cancel()


@pytest.mark.unit
@pytest.mark.parametrize(
    "fields",
    [
        {"interval_s": 0},
        {"interval_s": float("inf")},
        {"probe_timeout_s": -1},
        {"failure_threshold": 0},
        {"failure_threshold": True},
        {"ready_interval_s": 0},
        {"ready_interval_s": float("nan")},
    ],
)
def test_a_bad_policy_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        HealthPolicy(**fields)  # type: ignore[arg-type]


async def test_while_ready_the_probes_are_spaced_by_the_ready_interval() -> None:
    spec = build_launch_spec(standin_command(), model_path="m")
    policy = HealthPolicy(interval_s=0.01, failure_threshold=2, ready_interval_s=0.4)
    async with (
        SubprocessLauncher().launch(spec) as runtime,
        HttpHealthChecker(spec.base_url + "/health") as checker,
    ):
        await wait_until_healthy(checker, ready_timeout_s=20, policy=policy)
        await runtime.stop(grace_s=1.0)
        started = time.monotonic()
        assert await watch_while_ready(checker, policy=policy) is LifecycleEvent.HEALTH_FAIL
        # Two failed probes, each after a 0.4 s pause (not 0.01 s).
        assert 0.8 <= time.monotonic() - started < 2.0
