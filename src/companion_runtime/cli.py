"""Command-line interface: ``verify``, ``pull``, ``serve``, ``status``, ``demo``.

Exit codes: 0 when the action succeeded, 1 when it was refused (a ``Reason`` is printed), 2 on a
usage error (typer/click's own convention; an option that takes a value given twice is one, see
:class:`_OptionsOnce`). With ``--json`` a command prints exactly one JSON
object on standard output.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

if TYPE_CHECKING:
    from rich.console import Console
    from typer._click import Context  # the click that typer bundles, and passes commands

app = typer.Typer(
    name="companion-runtime",
    help="Run a local model inference runtime safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own plain help and errors: a usage error is one "Error: ..." line on stderr
    # (what _usage_error prints too), not a panel drawn to the terminal's width with the
    # message wrapped inside it, which a script or a parent app cannot pick out.
    rich_markup_mode=None,
)


class _OptionsOnce(TyperCommand):
    """A command whose options that take a value may each be given once.

    click keeps the last of a repeated option: a script that appends an override
    (``verify ... --sha256 A`` then ``--sha256 B``, ``pull --store a --store b``) would
    silently verify, download or ask something else than what was written first. Such a
    repetition is a usage error (exit 2) that names the option, never its values. A repeated
    flag (``--json --json``) asks for the same thing twice and stays allowed.
    """

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if args and not ctx.resilient_parsing:
            # click's own parser, on a copy: the order it reports lists an option once per
            # time it was given. Its errors (an unknown option, a missing value) are the ones
            # click would raise next anyway.
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            if not any(param.is_eager for param in order):  # --help answers whatever else
                seen: set[str | None] = set()
                for param in order:
                    if (
                        isinstance(param, TyperOption)
                        and not param.is_flag
                        and not param.multiple
                        and not param.count
                    ):
                        if param.name in seen:
                            _usage_error(f"{param.opts[0]} is given more than once; give it once")
                        seen.add(param.name)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        # typer writes a required argument as "{file}" in the usage line: a placeholder, not
        # the FILE and MANIFEST the help text and the README speak of. click's own convention
        # instead: the argument's metavar as it is ("[FILE]" when optional, "FILE..." for
        # more than one).
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


# --- verify / pull ------------------------------------------------------------------------
# Exit 0 verified, 1 refused (the reason code on stderr, or in the JSON object), 2 usage error:
# bad or missing options (click's own; an empty --store too), a MANIFEST or --ca-bundle path
# that does not exist, and pull --json with a store path that is not valid UTF-8 (JSON text
# could only carry it as lone-surrogate escapes).
# Refusal output never carries the digest, the URL or its query. On success the blob's path is
# printed (it is content-addressed, so it contains the digest by design). SIGINT, SIGTERM or
# SIGHUP stop a verify at once and a pull within about a second: refused with cancelled; a
# pull publishes nothing then and keeps the partial download for the next pull to resume.
# Any signal that comes before the result is written makes it cancelled; one that comes later
# changes nothing, and no signal, however many and whenever, ends the process by its default
# action (see _cancel_on_signals and main).

#: What verify, pull and status write when a signal came before their result.
_CANCELLED: Mapping[str, object] = {"ok": False, "reason": "cancelled"}


def _finish(
    payload: Mapping[str, object],
    *,
    ok: bool,
    json_output: bool,
    plain: Callable[[], None] | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Write a command's result and exit 0 (ok) or 1 (refused): the one place ``verify``,
    ``pull`` and ``status`` write theirs.

    When ``cancel`` is set (SIGINT, SIGTERM or SIGHUP came, even after the work itself was
    done), the result is ``cancelled`` instead: whoever sent the signal asked the command to
    stop, and gets the same answer however late it came, up to this point. A signal from here
    on changes nothing (the handlers stay in place until the process exits).

    With ``--json`` the JSON object goes to stdout; without, a refusal's line to stderr, or a
    success whatever ``plain`` prints (nothing without it). A result that cannot be written
    (stdout on a full disk, a pipe whose reader is gone) is one line on stderr and exit 1, not
    a traceback: whoever asked never got the answer. The stream that failed is pointed at the
    null device, so the flush at exit does not fail on it again.
    """
    import sys

    if cancel is not None and cancel.is_set():
        payload, ok = _CANCELLED, False
    stream = sys.stdout if json_output or ok else sys.stderr
    try:
        if json_output:
            typer.echo(json.dumps(payload))
        elif not ok:
            typer.echo(_refusal_line(payload), err=True)
        elif plain is not None:
            plain()
        stream.flush()
    except OSError as error:
        _to_null(stream)
        # The description only: the error's own text may carry a path.
        _say(f"could not write the result: {error.strerror or 'output error'}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


def _verified_exit(
    payload: Mapping[str, object],
    *,
    ok: bool,
    json_output: bool,
    cancel: threading.Event | None = None,
) -> None:
    """:func:`_finish` for ``verify`` and ``pull``: a success prints the blob's path (or ok)."""
    path = payload.get("path")
    _finish(
        payload,
        ok=ok,
        json_output=json_output,
        plain=lambda: typer.echo(_path_bytes(path) if isinstance(path, str) else "ok"),
        cancel=cancel,
    )


def _path_bytes(path: str | os.PathLike[str]) -> bytes:
    """A path as the bytes that name it, to be printed as they are.

    A path that is not valid UTF-8 (a store named so) holds lone surrogates as a ``str``, which
    a UTF-8 terminal's stream refuses to encode (``UnicodeEncodeError``): printed as text, it
    ended ``pull`` with a traceback after the download, and dropped ``serve``'s ready line.
    """
    return os.fsencode(path)


def _refusal_line(payload: Mapping[str, object]) -> str:
    """``refused: <reason>``, and the manifest field it is about when there is one (a field's
    dotted name from the manifest's schema, never its value)."""
    field = payload.get("field")
    return f"refused: {payload['reason']}" + (f" ({field})" if field else "")


def _is_file(path: Path) -> bool:
    # Python 3.11's Path.is_file() raises for a name too long (ENAMETOOLONG) instead of
    # answering False; for the CLI such a path is simply not an existing file.
    try:
        return path.is_file()
    except OSError:
        return False


#: Open files serve asks for: every client connection costs one, and a local process that
#: holds idle connections up to a 1,024 soft limit would shut everyone else out.
_OPEN_FILES_WANTED = 65536


def _raise_open_file_limit() -> None:
    """Raise the soft limit on open files towards the hard one (never above it)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, _OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


#: Open files the demo needs before it starts anything. At a limit of 20 or below (``ulimit
#: -n 20``, which sets the hard limit too, so none can be raised) a step ran out of them and
#: then so did the removal of its temporary directory, which stayed behind with the store, the
#: lock and the state directory in it; lower still, the event loop itself failed with a
#: traceback. From 21 up every step ends in its own result; 64 leaves room to spare.
_DEMO_OPEN_FILES_NEEDED = 64


def _open_file_limit() -> int | None:
    """The soft limit on open files; ``None`` when there is none (or no way to know it)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


@contextlib.contextmanager
def _cancel_on_signals(cancel: threading.Event) -> Iterator[None]:
    """From here on, SIGINT, SIGTERM and SIGHUP set ``cancel`` instead of ending the process.

    The work checks ``cancel`` at least every fraction of a second and stops cleanly (files
    flushed, locks released); a signal's default action would kill it mid-write instead.

    The handlers stay in place after the block, and are put back there if the work inside
    replaced them (an event loop's own leave the default action behind): the command writes
    its result next, and a second signal a few milliseconds after the first found the default
    action back and killed the process (by the signal, or with a KeyboardInterrupt), its JSON
    object written or not. What comes after is the command's exit; :func:`main` then ignores
    these signals for the interpreter's teardown.
    """
    import signal

    setting = False

    def on_signal(_signum: int, _frame: object) -> None:
        # Python runs a handler between bytecodes, so a signal that comes while this one is
        # inside cancel.set() runs it again right there; set() holds the event's lock, which
        # is not reentrant, and a nested set() would wait for it forever: two signals in quick
        # succession (Ctrl-C and a parent's SIGTERM, SIGHUP and SIGTERM on a closing session)
        # hung the process until SIGKILL. A nested call has nothing to do: the flag is being set.
        nonlocal setting
        if setting or cancel.is_set():
            return
        setting = True
        try:
            cancel.set()
        finally:
            setting = False

    # Handlers can only be set from the main thread (the CLI's own); elsewhere nothing changes.
    handled = (
        (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if threading.current_thread() is threading.main_thread()
        else ()
    )
    for signum in handled:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum in handled:
            signal.signal(signum, on_signal)


def _say(message: str | bytes, *, err: bool = False) -> None:
    """Print a line; an output nobody reads any more (a closed pipe, a hung-up terminal) is
    dropped.

    ``serve`` must not fail, nor report another outcome, because whoever started it closed its
    stdout or stderr: the line is lost, the stream is pointed at the null device (so no later
    write, nor the flush at exit, fails on it again) and serving goes on.
    """
    import sys

    try:
        typer.echo(message, err=err)
    except (OSError, ValueError):
        _to_null(sys.stderr if err else sys.stdout)


def _to_null(stream: TextIO) -> None:
    """Point ``stream`` at the null device, so that no later write, nor the flush at exit,
    fails on it again; what a failed write left in its buffer goes nowhere."""
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)
        stream.flush()


def _store_option(value: str) -> Path:
    """``--store``'s value as a path; an empty one is a usage error, not the current directory.

    ``Path("")`` is ``.``: an unset shell variable (``--store "$STORE"``) made the current
    directory the store, with ``blobs/``, ``tmp/`` and ``locks/`` created in it. ``.`` itself
    stays allowed.
    """
    if not value:
        raise typer.BadParameter("it is empty (name the store directory, or leave --store out)")
    return Path(value)


def _default_state_dir() -> Path:
    """The state directory ``serve`` will use (``.`` when none can be had: serve refuses
    that itself, with ``store_error``)."""
    from companion_runtime.bind.session import default_state_dir

    try:
        return default_state_dir()
    except OSError:
        return Path()


def _is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _console() -> Console:
    """A rich console on stdout whose write to a pipe nobody reads raises ``BrokenPipeError``.

    rich's own answer to a broken pipe is ``SystemExit(1)``, which passes every ``except
    OSError``: the command would end without the line that says why, and the demo without it
    either.
    """
    import errno
    import os

    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more is written to it
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return _Console()


#: Path arguments are declared ``readable=False``: click's own check of them would end the
#: command with a usage error that echoes the path. A file that cannot be read is refused by
#: the command itself, with a reason code and no path.
_MANIFEST_HELP = "The model manifest (TOML)."
_CA_BUNDLE_HELP = "PEM CA bundle to trust instead of the system store (a mirror)."


def _usage_error(message: str) -> None:
    # click's own usage errors echo the offending value; this one deliberately does not. A
    # stderr that cannot be written (a full disk) loses the line, not the exit code.
    _say(f"Error: {message}", err=True)
    raise typer.Exit(2)


#: The largest size a file can have (a signed 64-bit ``off_t``). A bigger expected size matches
#: no file, so it gets no progress bar: rich turns the total into a float, and a size of a few
#: hundred digits would end the command with an OverflowError instead of its refusal.
_MAX_FILE_BYTES = 2**63 - 1


def _progress_bar(
    enabled: bool, description: str, total: int
) -> tuple[contextlib.AbstractContextManager[object], Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal (and not --json), else nothing.

    Nothing either for a total no file can have (below 1 or past :data:`_MAX_FILE_BYTES`):
    such a command is refused without a byte read.
    """
    import sys

    if not enabled or not 0 < total <= _MAX_FILE_BYTES or not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        # The description is the manifest's model name: shown as written, never read as rich
        # markup (a "[/]" in it would end the pull with a traceback, a "[link=...]" would put
        # a hyperlink on the user's terminal).
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=total)

    def update(done: int, _total: int) -> None:
        bar.update(task, completed=done)

    return bar, update


@app.command(cls=_OptionsOnce)
def verify(
    file: Annotated[
        Path, typer.Argument(help="The file to verify.", readable=False, metavar="FILE")
    ],
    sha256: Annotated[str, typer.Option("--sha256", help="Expected SHA-256, 64 lowercase hex.")],
    size: Annotated[int, typer.Option("--size", help="Expected size in bytes.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Verify FILE against an expected SHA-256 and size (exit 0 verified, 1 refused).

    A missing FILE, or anything but a regular file, is refused as file_not_found; one that is
    there but cannot be read (no permission, too many open files, an I/O error) as
    store_error; a digest that is not 64
    lowercase hex characters, or a size below 1, as malformed_spec. SIGINT, SIGTERM or
    SIGHUP stop the hashing at once: refused as cancelled (exit 1), which says nothing about
    the file.
    """
    from companion_runtime.bind.filehash import verify_file

    bar, progress = _progress_bar(not json_output, "verify", size)
    cancel = threading.Event()
    with _cancel_on_signals(cancel), bar:
        verdict = verify_file(
            file,
            expected_digest=sha256,
            expected_size_bytes=size,
            progress=progress,
            cancelled=cancel.is_set,
        )
    _verified_exit(dict(verdict.to_dict()), ok=verdict.ok, json_output=json_output, cancel=cancel)


@app.command(cls=_OptionsOnce)
def pull(
    manifest: Annotated[
        Path, typer.Argument(help=_MANIFEST_HELP, readable=False, metavar="MANIFEST")
    ],
    store: Annotated[
        Path | None,
        typer.Option(
            help="Model store directory. Default: $COMPANION_RUNTIME_STORE, else the "
            "user cache directory.",
            parser=_store_option,
            metavar="<path>",
        ),
    ] = None,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(help=_CA_BUNDLE_HELP, readable=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Download the manifest's model into the store and verify it (exit 0 ok, 1 refused).

    An already stored blob is re-verified and reused; one that no longer verifies is removed
    and fetched again (an intact one whose size the manifest gets wrong is kept: the pull is
    refused as size_mismatch). Prints the verified blob's path. SIGINT, SIGTERM or SIGHUP stop the
    pull within about a second (exit 1, cancelled); the partial download is kept and the next
    pull resumes it.
    """
    from companion_runtime.bind.manifest import ManifestError, load_manifest
    from companion_runtime.bind.pull import pull_model
    from companion_runtime.bind.store import ModelStore, StoreError

    if not _is_file(manifest):
        _usage_error("MANIFEST does not exist or is not a file")
    if ca_bundle is not None and not _is_file(ca_bundle):
        _usage_error("--ca-bundle does not exist or is not a file")
    try:
        loaded = load_manifest(manifest)
    except ManifestError as error:
        payload: dict[str, object] = {"ok": False, "reason": error.reason.value}
        payload["field"] = error.field
        _verified_exit(payload, ok=False, json_output=json_output)
        return
    try:
        model_store = ModelStore(store)
    except StoreError as error:
        _verified_exit(
            {"ok": False, "reason": error.reason.value}, ok=False, json_output=json_output
        )
        return
    if json_output and not _is_utf8(model_store.root):
        # JSON text is Unicode, and such a path could only be written as lone-surrogate escapes
        # ("\udcff") that most readers turn into another path or refuse. Refused before the
        # download; the plain output prints the path's bytes as they are.
        _usage_error(
            "--json cannot print a store path that is not valid UTF-8; "
            "use another --store, or leave --json out to have the path printed as it is"
        )
    bar, progress = _progress_bar(not json_output, loaded.model.name, loaded.model.size_bytes)
    cancel = threading.Event()
    with _cancel_on_signals(cancel), bar:
        result = pull_model(
            loaded, store=model_store, ca_bundle=ca_bundle, progress=progress, cancel=cancel
        )
    _verified_exit(result.to_dict(), ok=result.ok, json_output=json_output, cancel=cancel)


# --- serve / status / demo ----------------------------------------------------------------
# (bodies live in this section; they call companion_runtime.bind.serve / .demo)
# Imports of the bind layer happen inside the commands so that one command's dependencies
# (llama.cpp, rich tables) are never loaded for another.


@app.command(cls=_OptionsOnce)
def serve(
    manifest: Annotated[
        Path, typer.Argument(help=_MANIFEST_HELP, readable=False, metavar="MANIFEST")
    ],
    store: Annotated[
        Path | None,
        typer.Option(
            help="Model store directory. Default: $COMPANION_RUNTIME_STORE, else the "
            "user cache directory.",
            parser=_store_option,
            metavar="<path>",
        ),
    ] = None,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(help=_CA_BUNDLE_HELP, readable=False),
    ] = None,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Front door port on 127.0.0.1 (0: any free).")
    ] = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON line once ready (or refused).")
    ] = False,
) -> None:
    """Fit-check, pull and verify the model, start the runtime, and serve it on 127.0.0.1.

    Runs until SIGINT, SIGTERM or SIGHUP, then stops admitting (503 not_ready), lets requests
    in flight finish, stops the runtime, removes the token file and exits 0. Clients send
    "Authorization: Bearer <token>" with the token from the printed token file. A signal before
    ready (from its start, during the download too) ends serve within about a second with
    not_ready (exit 1); a partial download is kept for the next pull or serve to resume.

    Output is best effort: if its stdout or stderr is closed, serve goes on serving (status
    finds it through its state files) and exits as it would have otherwise.

    Exits 1 with a reason code when it is refused before ready, or when the supervisor gives
    up on the runtime once serving (restart_limit_reached after repeated crashes, or a blob
    that no longer verifies before a restart); it shuts down the same way first. With --json
    that reason is a second line, {"ok": false, "reason": ...}. With --json, a state
    directory whose path is not valid UTF-8 is a usage error (exit 2) before the download:
    JSON text could not name the token file in it.
    """
    # First of all, before serve's imports: a signal from here on is recorded instead of
    # taking its default action (death by SIGTERM or SIGHUP, or a KeyboardInterrupt: exit 130
    # with nothing printed) in the tenth of a second or more before the event loop handles
    # signals itself. Recorded before the loop runs, it starts nothing: not_ready, as for any
    # signal before ready.
    cancel = threading.Event()
    with _cancel_on_signals(cancel):
        import asyncio
        import signal

        from companion_runtime.bind.manifest import ManifestError, load_manifest
        from companion_runtime.bind.serve import ServeOptions, Serving, serve_manifest
        from companion_runtime.core import Reason, Verdict

        if not _is_file(manifest):
            _usage_error("MANIFEST does not exist or is not a file")
        if ca_bundle is not None and not _is_file(ca_bundle):
            _usage_error("--ca-bundle does not exist or is not a file")
        try:
            # Loaded here too (serve loads it again) so that a refusal names the field, as pull's.
            load_manifest(manifest)
        except ManifestError as error:
            refused = {"ok": False, "reason": error.reason.value, "field": error.field}
            _say(
                json.dumps(refused) if json_output else _refusal_line(refused), err=not json_output
            )
            raise typer.Exit(1) from None
        if json_output and not _is_utf8(_default_state_dir()):
            # The ready line names the token file, in the state directory: as for pull's store,
            # JSON text could only carry such a path as lone-surrogate escapes. Refused before the
            # download.
            _usage_error(
                "--json cannot print a token file path that is not valid UTF-8; set "
                "COMPANION_RUNTIME_STATE_DIR to another directory, or leave --json out to have "
                "the path printed as it is"
            )
        options = ServeOptions(manifest_path=manifest, store=store, ca_bundle=ca_bundle, port=port)
        ready_seen = False

        def on_ready(running: Serving) -> None:
            nonlocal ready_seen
            ready_seen = True
            if json_output:
                _say(json.dumps(running.ready_line()))
            else:
                line = f"serving {running.url}  token file: ".encode()
                _say(line + _path_bytes(running.token_file))

        def on_progress(step: str) -> None:
            if not json_output:
                _say(f"> {step}", err=True)

        _raise_open_file_limit()

        async def run() -> Verdict:
            stop = asyncio.Event()
            task = asyncio.create_task(
                serve_manifest(options, on_ready=on_ready, stop=stop, on_progress=on_progress)
            )

            def on_signal() -> None:
                stop.set()
                if not ready_seen:
                    task.cancel()  # nothing is serving yet: abandon the start (it cleans up)

            loop = asyncio.get_running_loop()
            # SIGHUP too: closing the terminal serve runs in must drain and clean up as well,
            # not kill it with the runtime's children, the token file and the key file left over.
            signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            for signum in signals:
                loop.add_signal_handler(signum, on_signal)
            if cancel.is_set():
                on_signal()  # one came after the check below, before the loop's handlers
            try:
                return await task
            except asyncio.CancelledError:
                if stop.is_set() and not ready_seen:
                    return Verdict(False, Reason.NOT_READY)
                raise
            finally:
                # Drained and cleaned up (or refused): a signal from here on has nothing left to
                # stop. Closing the loop would put the default actions back, and a late signal
                # (a flood from a closing session) then ended serve by it after its clean exit.
                # Held back while the loop's handlers give way, so none finds the default.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
                try:
                    for signum in signals:
                        loop.remove_signal_handler(signum)
                        signal.signal(signum, signal.SIG_IGN)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

        from companion_runtime.bind.eventloop import EventLoopUnavailable
        from companion_runtime.bind.eventloop import run as run_loop

        # A signal so far: nothing started, nothing to stop.
        if cancel.is_set():
            verdict = Verdict(False, Reason.NOT_READY)
        else:
            try:
                verdict = run_loop(run())
            except EventLoopUnavailable as error:
                # Too few descriptors left for the loop itself (ulimit -n): nothing started.
                _say(f"serve could not start its event loop: {error.strerror}", err=True)
                verdict = Verdict(False, Reason.NOT_READY)
        if not verdict.ok:
            reason = verdict.reason.value
            if json_output:
                _say(json.dumps(verdict.to_dict()))
            else:
                _say(f"refused: {reason}", err=True)
        raise typer.Exit(0 if verdict.ok else 1)


@app.command(cls=_OptionsOnce)
def demo() -> None:
    """Offline end-to-end demo: tiny model, verified pull (and a tampered copy refused),
    llama.cpp behind the front door, a burst showing admission, queueing and refusals.

    Exit 0 when every step showed what it should, 1 otherwise (and without the llama extra).
    SIGINT, SIGTERM or SIGHUP stop it: what it started is stopped and removed, and it exits 1
    with cancelled. An open-file limit below 64 that cannot be raised (ulimit -n) is one line
    and exit 1 before it starts anything.
    """
    import sys

    # First of all, before the demo's imports: a signal from here on is recorded instead of
    # taking its default action (death, or a KeyboardInterrupt) in the middle of a step. Until
    # the demo's event loop handles signals itself, the demo asks this flag between steps; it
    # then starts nothing more and exits 1 with cancelled.
    cancel = threading.Event()
    with _cancel_on_signals(cancel):
        try:
            from companion_runtime.bind.demo import demo_main

            # As serve does: the demo's own burst, origin and runtime connections share this
            # process's open files with the front door, which a low soft limit (128) would
            # leave room for a connection or two.
            _raise_open_file_limit()
            limit = _open_file_limit()
            if limit is not None and limit < _DEMO_OPEN_FILES_NEEDED:
                # Refused before anything exists: run out of open files mid-step, the demo
                # could not even remove its temporary directory.
                _say(
                    f"demo failed: the open-file limit is {limit}; the demo needs at least "
                    f"{_DEMO_OPEN_FILES_NEEDED} (ulimit -n {_DEMO_OPEN_FILES_NEEDED})",
                    err=True,
                )
                code = 1
            else:
                code = demo_main(_console(), cancel=cancel)
        except OSError as error:
            # No room left for the demo's temporary files, or a standard output that cannot be
            # written (a full disk behind it): what the demo started is stopped and removed by
            # now.
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                _to_null(sys.stdout)
            # The description only: the error's own text may carry a path.
            _say(f"demo failed: {error.strerror or 'could not write'}", err=True)
            code = 1
    raise typer.Exit(code)


@app.command(cls=_OptionsOnce)
def status(
    url: Annotated[
        str | None,
        typer.Option(
            help="Front door URL. Default: the most recently started `serve` that is still "
            "running. Without --token-file it must be the URL a `serve` recorded (a recorded "
            "token goes nowhere else)."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the bearer token. Default: the one `serve` recorded.",
            readable=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a running front door's /_status (state, in flight, queued, counters).

    Without --url/--token-file it reads the state directory ($COMPANION_RUNTIME_STATE_DIR,
    else the user runtime directory): serve.json names the most recently started serve, and
    each serve records itself in serve-<pid>.json. It asks the one serve.json names if it
    still runs, else the most recently started recorded serve that does. When more than one
    runs, it asks the most recent and names the others on stderr; pick one with --url.

    A token serve recorded goes only to the URL serve recorded with it: --url without
    --token-file is refused with host_not_allowed unless it is such a URL
    (http://127.0.0.1:PORT; [::1], where localhost may lead, is another socket,
    which anyone may listen on). With both flags, both are your choice.

    SIGINT, SIGTERM or SIGHUP end the wait for the answer at once: refused as cancelled.
    """
    from companion_runtime.bind.status import StatusResult, read_status, status_table
    from companion_runtime.core import Reason, Verdict

    # The answer may take up to its deadline (5 s): it is awaited in a thread, so that SIGINT,
    # SIGTERM or SIGHUP end the wait at once, refused as cancelled (with --json, one object),
    # instead of exit 130 with nothing printed, or death by the signal.
    answers: list[StatusResult] = []
    failures: list[BaseException] = []

    def ask() -> None:
        try:
            answers.append(read_status(url=url, token_file=token_file))
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            failures.append(error)

    asking = threading.Thread(target=ask, name="status", daemon=True)
    cancel = threading.Event()
    with _cancel_on_signals(cancel):
        asking.start()
        while asking.is_alive() and not cancel.is_set():
            asking.join(0.05)
    if failures:
        raise failures[0]
    result = answers[0] if answers else StatusResult(verdict=Verdict(False, Reason.CANCELLED))
    if result.others:
        # URLs of front doors checked to be live serves of this user: never a token or a path.
        count = len(result.others) + 1
        _say(
            f"note: {count} serves are running with this state directory; this is "
            f"{result.url}, the most recently started. Ask another with --url: "
            + ", ".join(result.others),
            err=True,
        )

    def table() -> None:
        import sys

        # Whatever answers at a --url chooses the values: one the output's encoding cannot
        # show (an ASCII or Latin-1 locale) is printed escaped, not a UnicodeEncodeError.
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        _console().print(status_table(result.document))

    _finish(
        result.to_dict(), ok=result.verdict.ok, json_output=json_output, plain=table, cancel=cancel
    )


def _open_standard_descriptors() -> None:
    """Point a closed standard input, output or error at the null device, stream and all.

    A parent may start the CLI with one of them closed (``serve <&-``, a daemon's spawner).
    The next socket would then get that number, and libuv (uvloop, which ``serve`` and
    ``demo`` run on) aborts the whole process when it closes a descriptor below 3. With the
    null device there, what would have been written to the closed stream is dropped instead.
    """
    import os
    import sys

    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            # A new descriptor takes the lowest free number: this one, those below being open.
            os.open(os.devnull, os.O_RDWR)
    # A descriptor closed as the interpreter started left its stream None in sys, and every
    # write, flush or isatty() on it would end the command with an AttributeError: a stream on
    # what is there now (the null device) takes its place.
    for name, descriptor in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            stream = open(
                descriptor,
                "r" if descriptor == 0 else "w",
                encoding="utf-8",
                errors="backslashreplace",
                closefd=False,
            )
            setattr(sys, name, stream)


def _ignore_signals_at_exit() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP for the rest of the process's life: its exit.

    The command has written its result. Python's teardown puts the default action back for
    every signal that has a Python handler, and a signal during the rest of it (modules freed,
    tens of milliseconds) would end the process by that signal, its result already written.
    An ignored signal stays ignored there. Nothing is started from here on, so no child
    inherits it.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_IGN)


def _unwritten(error: OSError) -> int:
    """One line on stderr for an ``OSError`` no command turned into its result; the exit code.

    What comes here is click's own output that could not be written: a help text on a full
    disk, or a usage error on a stderr that is one (a closed pipe click answers itself, with
    exit 1). It ended the command with a traceback, and a usage error with exit 1. The line
    is the error's description only (its own text may carry a path); a usage error keeps its
    exit 2, anything else is exit 1: whoever asked never got the answer.
    """
    import sys

    _to_null(sys.stdout)
    _say(f"could not write the output: {error.strerror or 'output error'}", err=True)
    exit_code = getattr(error.__context__, "exit_code", None)
    return exit_code if exit_code == 2 else 1


def main() -> None:
    """Console-script entry point."""
    _open_standard_descriptors()
    try:
        app()
    except OSError as error:
        raise SystemExit(_unwritten(error)) from None
    finally:
        _ignore_signals_at_exit()


if __name__ == "__main__":
    main()
