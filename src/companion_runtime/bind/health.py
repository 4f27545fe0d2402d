"""Health checks: is the runtime answering its health URL, and what lifecycle event follows?

One probe is one ``GET`` of the health URL, all of it (connect, head) within the probe
timeout. ``200`` is healthy; ``503`` (llama-server while it loads the model), a refused
connection, a timeout or any other answer is "not healthy yet". Only the status line and
headers are read, never the body: a runtime that answers with an endless body, or sends it a
byte at a time, can neither fill the manager's memory nor hold a probe past its timeout.

Two loops turn probes into lifecycle events for the supervisor:

- :func:`wait_until_healthy` while ``starting``: the first healthy answer gives ``health_ok``;
  none before ``ready_timeout_s`` gives ``health_fail``.
- :func:`watch_while_ready` while ``ready``: ``failure_threshold`` consecutive unhealthy
  probes give ``health_fail``; a healthy probe resets the count.

The seam is :class:`HealthChecker`; :class:`HttpHealthChecker` is the real adapter and the one
place where httpx exceptions become a :class:`HealthAnswer`.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self, final

import httpx

from companion_runtime.core import LifecycleEvent, Reason, SpecError

__all__ = [
    "HealthAnswer",
    "HealthChecker",
    "HealthPolicy",
    "HealthWait",
    "HttpHealthChecker",
    "wait_until_healthy",
    "watch_while_ready",
]


@enum.unique
class HealthAnswer(enum.StrEnum):
    """What one health probe saw."""

    #: ``200``: the runtime serves.
    HEALTHY = "healthy"
    #: ``503``: the runtime is up but still loading.
    LOADING = "loading"
    #: Nothing listens on the port (yet, or any more).
    REFUSED = "refused"
    #: No answer within the probe timeout.
    TIMEOUT = "timeout"
    #: An answer with another status.
    BAD_STATUS = "bad_status"
    #: Any other transport failure (reset, malformed response).
    ERROR = "error"
    #: A healthy answer from a listener that is not the runtime (one that took its port).
    FOREIGN_LISTENER = "foreign_listener"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPolicy:
    """How often and how patiently to probe (bad values: :class:`SpecError`)."""

    #: Seconds between probes while starting (short: readiness is noticed quickly).
    interval_s: float = 0.05
    #: Seconds one probe may take.
    probe_timeout_s: float = 1.0
    #: Consecutive failed probes, while ready, that make ``health_fail``.
    failure_threshold: int = 3
    #: Seconds between probes while ready. Longer than ``interval_s``: a crash is seen at once
    #: by the exit watcher, so this only has to catch a runtime that hangs, and a busy runtime
    #: should not spend its time answering probes. ``None``: the same as ``interval_s``.
    ready_interval_s: float | None = 1.0

    def __post_init__(self) -> None:
        ready = self.interval_s if self.ready_interval_s is None else self.ready_interval_s
        for value in (self.interval_s, self.probe_timeout_s, ready):
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise SpecError(Reason.MALFORMED_SPEC)
        if type(self.failure_threshold) is not int or self.failure_threshold < 1:
            raise SpecError(Reason.MALFORMED_SPEC)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class HealthWait:
    """The outcome of :func:`wait_until_healthy`."""

    #: ``health_ok`` or ``health_fail``.
    event: LifecycleEvent
    #: When the first healthy answer arrived (on the wait's clock), else ``None``.
    answered_at: float | None
    #: Probes sent.
    probes: int
    #: The last probe's answer.
    last_answer: HealthAnswer | None


class HealthChecker(Protocol):
    """The health seam: one probe of the runtime."""

    async def check(self) -> HealthAnswer:
        """Probe once; never raises except for cancellation."""
        ...


@final
class HttpHealthChecker:
    """Probes ``url`` with an httpx ``AsyncClient``; use as an async context manager."""

    def __init__(self, url: str, *, probe_timeout_s: float = 1.0) -> None:
        self._url = url
        self._probe_timeout_s = probe_timeout_s
        # trust_env=False: a proxy configured in the environment must never see loopback
        # traffic, and no .netrc credentials are attached.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(probe_timeout_s),
            trust_env=False,
            follow_redirects=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def check(self) -> HealthAnswer:
        """GET the health URL once and classify the outcome."""
        # The one place httpx exceptions are translated. httpx's timeouts bound each read,
        # not the whole probe: a head sent a byte at a time would never time out without the
        # overall one. The body is left unread; closing the response closes the connection.
        try:
            async with (
                asyncio.timeout(self._probe_timeout_s),
                self._client.stream("GET", self._url) as response,
            ):
                status = response.status_code
        except httpx.ConnectError:
            return HealthAnswer.REFUSED
        except (httpx.TimeoutException, TimeoutError):
            return HealthAnswer.TIMEOUT
        except httpx.HTTPError:
            return HealthAnswer.ERROR
        if status == 200:
            return HealthAnswer.HEALTHY
        if status == 503:
            return HealthAnswer.LOADING
        return HealthAnswer.BAD_STATUS


_PROBE_GRACE_S: Final = 0.001


async def wait_until_healthy(
    checker: HealthChecker,
    *,
    ready_timeout_s: float,
    policy: HealthPolicy,
    clock: Callable[[], float] = time.monotonic,
) -> HealthWait:
    """Probe until the first healthy answer (``health_ok``) or ``ready_timeout_s`` passes
    (``health_fail``). A probe still running at the deadline is cut off."""
    deadline = clock() + ready_timeout_s
    probes = 0
    answer: HealthAnswer | None = None
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        probes += 1
        try:
            async with asyncio.timeout(max(remaining, _PROBE_GRACE_S)):
                answer = await checker.check()
        except TimeoutError:
            # Cut off at the deadline: the last completed answer says more, if there is one.
            answer = answer or HealthAnswer.TIMEOUT
            break
        if answer is HealthAnswer.HEALTHY:
            return HealthWait(
                event=LifecycleEvent.HEALTH_OK,
                answered_at=clock(),
                probes=probes,
                last_answer=answer,
            )
        await asyncio.sleep(min(policy.interval_s, max(deadline - clock(), 0.0)))
    return HealthWait(
        event=LifecycleEvent.HEALTH_FAIL, answered_at=None, probes=probes, last_answer=answer
    )


async def watch_while_ready(checker: HealthChecker, *, policy: HealthPolicy) -> LifecycleEvent:
    """Probe every ``ready_interval_s`` until ``failure_threshold`` consecutive probes fail; then
    return ``health_fail``. Runs until then (or until cancelled)."""
    interval = policy.interval_s if policy.ready_interval_s is None else policy.ready_interval_s
    failures = 0
    while failures < policy.failure_threshold:
        await asyncio.sleep(interval)
        answer = await checker.check()
        failures = 0 if answer is HealthAnswer.HEALTHY else failures + 1
    return LifecycleEvent.HEALTH_FAIL
