"""``serve``: manifest → fit check → verified pull → supervised runtime → front door.

The order is the safety argument: the model's fit, and whether the runtime command could be run
at all, are checked before a byte is downloaded, the runtime starts only on a blob that
verified, and the front door opens only once the runtime is ``ready``. Any refusal before that
point ends the command with a reason and nothing left running. The store and the state
directory are checked before the download too: a state directory that cannot be used (a
symlink, another user's, shared with others, or a default runtime directory the platform
refuses) is ``store_error`` before a byte is fetched.

Cancelling :func:`serve_manifest` before ready (what ``serve`` does on a signal) stops the pull
and the supervisor's re-verify of the blob as well: each runs in a worker thread, which cannot
be cancelled, so it is told to stop through a cancel event and waited for (about a second at
most; :mod:`~companion_runtime.bind.worker`). Nothing is published, the partial download is
kept for a resume, the store's lock is released, a blob whose re-verify was cut short is left
as it is, and no thread is left for the event loop to wait on at exit.

Shutdown (SIGINT/SIGTERM, or the ``stop`` event): the supervisor drains — the runtime leaves
``ready``, so the admission controller refuses new requests ``not_ready`` (the front door keeps
answering them with 503) while requests in flight finish, up to the grace period — then stops
the runtime process; then the front door closes and the token file and this ``serve``'s record
are removed, and ``serve.json``, if it names this ``serve``, is pointed at another ``serve`` of
the same state directory that is still alive (or removed when none is; see
:mod:`~companion_runtime.bind.session`).

Giving up: when the supervisor stops restarting the runtime (``restart_limit_reached``, or a
blob that no longer verifies or fits before a restart), nothing will ever be ready again, so
``serve`` shuts down the same way and returns that reason instead of answering 503 forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from companion_runtime.bind.frontdoor import FrontDoor, FrontDoorConfig
from companion_runtime.bind.manifest import Manifest, ManifestError, load_manifest
from companion_runtime.bind.pull import PullResult, pull_model
from companion_runtime.bind.session import (
    ServeState,
    SessionFileError,
    default_state_dir,
    forget_serve,
    new_token,
    prepare_state_dir,
    record_serve,
    write_token_file,
)
from companion_runtime.bind.store import ModelStore, StoreError
from companion_runtime.bind.supervisor import Supervisor, check_model_fit, check_runtime_command
from companion_runtime.bind.worker import run_cancellable
from companion_runtime.core import Reason, Verdict

__all__ = [
    "DEFAULT_GRACE_S",
    "ServeOptions",
    "ServeRefused",
    "Serving",
    "serve_manifest",
    "serving",
]

_logger = logging.getLogger(__name__)

#: How long requests in flight may take to finish once shutdown begins.
DEFAULT_GRACE_S: Final = 30.0


@final
class ServeRefused(Exception):
    """``serve`` could not reach ``ready``. ``str(error)`` is the reason code."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason: Final = reason


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """What ``companion-runtime serve`` was asked to do."""

    manifest_path: Path
    store: Path | None = None
    ca_bundle: Path | None = None
    port: int = 0
    state_dir: Path | None = None
    grace_s: float = DEFAULT_GRACE_S


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Serving:
    """A running front door over a ready runtime."""

    url: str
    token: str
    token_file: Path
    door: FrontDoor
    supervisor: Supervisor

    def ready_line(self) -> dict[str, object]:
        """The ``--json`` line printed once ready."""
        return {"ok": True, "reason": "ok", "url": self.url, "token_file": str(self.token_file)}


@contextlib.asynccontextmanager
async def serving(
    manifest: Manifest,
    model_path: Path,
    *,
    port: int = 0,
    state_dir: Path | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    write_state: bool = True,
) -> AsyncIterator[Serving]:
    """Start the runtime on a verified ``model_path``, then the front door; stop both on exit.

    Raises :class:`ServeRefused` when the runtime does not become ready or the front door
    cannot listen (``spawn_failed``), :class:`SessionFileError` when a session file cannot be
    written; nothing is left running then.
    """
    directory = _state_dir(state_dir) if write_state else None
    token = new_token()
    async with Supervisor(manifest, model_path=model_path) as supervisor:
        verdict = await supervisor.start()
        if not verdict.ok:
            raise ServeRefused(verdict.reason)
        config = FrontDoorConfig(
            token=token, port=port, queue_timeout_s=manifest.limits.queue_timeout_s
        )
        door = FrontDoor(
            config=config,
            controller=supervisor.controller,
            runtime_url=lambda: supervisor.runtime_url,
            status=supervisor.status,
            runtime_authorization=lambda: supervisor.runtime_authorization,
            runtime_listening=supervisor.runtime_listening,
            find_runtime_listener=supervisor.find_runtime_listener,
        )
        token_file: Path | None = None
        try:
            try:
                await door.start()
            except OSError:
                # The front door could not bind its port (taken, or not permitted).
                _logger.warning("front door could not listen")
                raise ServeRefused(Reason.SPAWN_FAILED) from None
            token_dir = directory if directory is not None else _state_dir(None)
            token_file = write_token_file(token_dir, token, port=door.port)
            if directory is not None:
                record_serve(
                    directory, ServeState(url=door.url, token_file=token_file, pid=os.getpid())
                )
            yield Serving(
                url=door.url,
                token=token,
                token_file=token_file,
                door=door,
                supervisor=supervisor,
            )
        finally:
            # Drain first (new requests get 503 not_ready from the still-open front door),
            # then stop the process, then close the listener and remove the session files.
            try:
                await supervisor.stop(grace_s=grace_s)
            finally:
                await door.aclose(grace_s=grace_s)
                if token_file is not None:
                    with contextlib.suppress(OSError):
                        token_file.unlink()
                if directory is not None:
                    forget_serve(directory, pid=os.getpid())


def _state_dir(chosen: Path | None) -> Path:
    """``chosen`` or the default state directory, created and checked.

    Raises :class:`SessionFileError` (``store_error``) for one that cannot be used, the default
    included: with ``XDG_RUNTIME_DIR`` unset, platformdirs refuses (``PermissionError``) a
    fallback ``/tmp/runtime-<uid>`` that is a symlink or another user's.
    """
    if chosen is None:
        try:
            chosen = default_state_dir()
        except OSError as error:
            raise SessionFileError(Reason.STORE_ERROR) from error
    return prepare_state_dir(chosen)


async def _pull(manifest: Manifest, store: ModelStore, ca_bundle: Path | None) -> PullResult:
    """``pull_model`` in a worker thread; cancelling this stops the pull, then re-raises.

    The thread cannot be cancelled, so it is told to stop through ``cancel`` and waited for
    (about a second): when this returns or raises, no pull is running and its lock is free.
    """
    return await run_cancellable(
        lambda cancel: pull_model(manifest, store=store, ca_bundle=ca_bundle, cancel=cancel)
    )


async def _until_stop_or_given_up(supervisor: Supervisor, stop: asyncio.Event) -> Reason | None:
    """Wait for ``stop`` (None) or for the supervisor to give up on the runtime (its reason)."""
    stopped = asyncio.ensure_future(stop.wait())
    given_up = asyncio.ensure_future(supervisor.wait_given_up())
    try:
        await asyncio.wait({stopped, given_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (stopped, given_up):
            waiter.cancel()
        await asyncio.gather(stopped, given_up, return_exceptions=True)
    if stop.is_set() or not given_up.done() or given_up.cancelled():
        return None
    return given_up.result()


async def serve_manifest(
    options: ServeOptions,
    *,
    on_ready: Callable[[Serving], None],
    stop: asyncio.Event,
    on_progress: Callable[[str], None] | None = None,
) -> Verdict:
    """Run ``serve`` until ``stop`` is set; return the refusal that ended it early, or ok.

    Once ready, it also ends (after the same shutdown) when the supervisor gives up on the
    runtime, returning that reason (``restart_limit_reached``, ...). An exception raised by
    ``on_ready`` or ``on_progress`` propagates (after the same shutdown once ready): writing
    them so that a closed output cannot fail is the caller's part.
    """

    def say(step: str) -> None:
        if on_progress is not None:
            on_progress(step)

    try:
        manifest = await asyncio.to_thread(load_manifest, options.manifest_path)
    except ManifestError as error:
        return Verdict(False, error.reason)
    say("fit")
    fit = await check_model_fit(manifest)
    if not fit.ok:
        return fit
    command = check_runtime_command(manifest)
    if not command.ok:
        return command
    say("pull")
    try:
        store = ModelStore(options.store)
        state_dir = _state_dir(options.state_dir)
    except (StoreError, SessionFileError) as error:
        return Verdict(False, error.reason)
    pulled = await _pull(manifest, store, options.ca_bundle)
    if not pulled.ok or pulled.path is None:
        return pulled.verdict
    say("start")
    given_up: Reason | None = None
    try:
        async with serving(
            manifest,
            pulled.path,
            port=options.port,
            state_dir=state_dir,
            grace_s=options.grace_s,
        ) as running:
            on_ready(running)
            given_up = await _until_stop_or_given_up(running.supervisor, stop)
            say("drain" if given_up is None else f"stop: {given_up.value}")
    except ServeRefused as refused:
        return Verdict(False, refused.reason)
    except SessionFileError as error:
        return Verdict(False, error.reason)
    if given_up is not None:
        return Verdict(False, given_up)
    return Verdict(True, Reason.OK)
