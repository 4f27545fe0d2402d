"""Run llama.cpp's own HTTP server in a process of its own, from Python.

``python -m companion_runtime.bind.llama_server -m MODEL --host 127.0.0.1 --port N`` starts
llama.cpp's server code (the same routes as the upstream ``llama-server`` binary: ``/health``,
``/completion``, ``/v1/*``, ``/metrics``, ``/slots``) in-process through the ``xllamacpp``
binding, so a runtime is available wherever the ``llama`` extra is installed, without a C++
build. It is meant to be spawned and supervised like any other runtime executable:

- it listens on a loopback address only (anything else is a usage error);
- ``/health`` answers ``503`` while the model loads and ``200`` once it is ready;
- SIGTERM or SIGINT stops it cleanly: the listener closes, the port is released, exit 0;
- without ``xllamacpp`` it exits with :data:`EXIT_NOT_INSTALLED` and names the install command.

Exit codes: :data:`EXIT_OK`, :data:`EXIT_START_FAILED`, :data:`EXIT_USAGE`,
:data:`EXIT_NOT_INSTALLED`.
"""

from __future__ import annotations

import argparse
import http
import http.client
import importlib.util
import ipaddress
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

__all__ = [
    "DEFAULT_CONTEXT_SIZE",
    "EXIT_NOT_INSTALLED",
    "EXIT_OK",
    "EXIT_START_FAILED",
    "EXIT_USAGE",
    "INSTALL_COMMAND",
    "MAX_LAUNCHER_ARGUMENTS",
    "MODULE",
    "embedded_llama_command",
    "llama_available",
    "main",
    "parse_launcher_arguments",
]

#: The server ran and was stopped by a signal.
EXIT_OK: Final = 0
#: The server could not start (model missing or unloadable, port unavailable).
EXIT_START_FAILED: Final = 1
#: The command line was invalid (argparse's own code).
EXIT_USAGE: Final = 2
#: ``xllamacpp`` is not installed; the message names :data:`INSTALL_COMMAND`.
EXIT_NOT_INSTALLED: Final = 3

#: How to get the optional dependency this launcher needs.
INSTALL_COMMAND: Final = "pip install 'companion-runtime[llama]'"
#: The module path to run with ``python -m``.
MODULE: Final = "companion_runtime.bind.llama_server"
#: Context size (tokens, all slots together) when ``-c`` is not given. Not the length the model
#: declares: the KV cache grows with the context, and a model file that declares a long one
#: (128k tokens is common, and nothing bounds what a file may declare) would make the runtime
#: allocate gigabytes as it loads, before a resource sample can see it. The fit check counts
#: the model's bytes plus an allowance; this keeps the allowance honest by default.
DEFAULT_CONTEXT_SIZE: Final = 4096

#: Most arguments the launcher takes: its own command line has a dozen or two. argparse's
#: time grows with the square of their number (40,000 flags took 71 s), and ``serve`` parses
#: the command line with this parser before the download, where it must stay quick.
MAX_LAUNCHER_ARGUMENTS: Final = 1000

_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_PROGRAM: Final = "llama_server"
_LOOP_START_TIMEOUT_S: Final = 30.0


def llama_available() -> bool:
    """Return whether the ``xllamacpp`` binding is installed.

    Only looks the package up; it does not import it, so the caller's process does not load
    llama.cpp's native libraries.
    """
    return importlib.util.find_spec("xllamacpp") is not None


def embedded_llama_command(
    *,
    parallel: int = 2,
    threads: int | None = None,
    context_size: int | None = None,
    metrics: bool = True,
    api_key_file: bool = True,
) -> list[str]:
    """Return the argv template that runs this launcher, for a manifest's ``[runtime] command``.

    The placeholders ``{model_path}``, ``{host}``, ``{port}`` (and, with ``api_key_file``, the
    default, ``{api_key_file}``: the runtime then refuses every request but ``/health`` that
    lacks the supervisor's key) are left in place for the supervisor to fill. The first element
    is the absolute path of the current interpreter, run with ``-P``: ``-m`` alone would put
    the working directory first on the module path, and an ``xllamacpp.py`` (or a
    ``companion_runtime`` directory) that anyone placed there would run as the runtime.
    ``context_size`` None leaves the launcher's :data:`DEFAULT_CONTEXT_SIZE`; 0 asks for the
    length the model declares, for each of the ``parallel`` slots (each has a cache of its own).
    """
    command = [
        sys.executable,
        "-P",
        "-m",
        MODULE,
        "-m",
        "{model_path}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--parallel",
        str(parallel),
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    if context_size is not None:
        command += ["-c", str(context_size)]
    if metrics:
        command.append("--metrics")
    if api_key_file:
        command += ["--api-key-file", "{api_key_file}"]
    return command


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number (0 picks a free one)")
    return value


def _loopback_host(text: str) -> str:
    # The runtime must never be reachable from another machine: the front door is the only
    # way in, and it checks a token. So only loopback addresses are accepted here.
    if text == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a loopback IP address") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError("must be a loopback IP address")
    return str(address)


class _Refused(Exception):
    """The launcher's command line would be refused (or only print its help)."""


class _QuietParser(argparse.ArgumentParser):
    """The launcher's parser, raising where the real one prints and exits."""

    def error(self, message: str) -> NoReturn:
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Refused(message)

    def print_help(self, file: object = None) -> None:
        pass


def parse_launcher_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    """What this launcher makes of ``argv`` (its arguments, without the interpreter's), or
    None where it would refuse them: the same parser, so the same abbreviations (``--ctx``),
    attached values (``-c8192``) and last-one-wins, and the same bound on their number
    (:data:`MAX_LAUNCHER_ARGUMENTS`). Prints nothing."""
    if len(argv) > MAX_LAUNCHER_ARGUMENTS:
        return None
    try:
        return _parser(_QuietParser).parse_args(list(argv))
    except (_Refused, ValueError, TypeError):
        return None


def _parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    parser = parser_class(
        prog=f"python -m {MODULE}",
        description="Serve a GGUF model with llama.cpp's HTTP server, embedded via xllamacpp.",
    )
    parser.add_argument("-m", "--model", required=True, type=Path, help="GGUF model file")
    parser.add_argument("--host", default="127.0.0.1", type=_loopback_host)
    parser.add_argument("--port", default=8080, type=_port)
    parser.add_argument("-np", "--parallel", default=1, type=_positive_int, help="slots")
    parser.add_argument("-t", "--threads", type=_positive_int, help="CPU threads")
    parser.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=DEFAULT_CONTEXT_SIZE,
        help=f"context size (default {DEFAULT_CONTEXT_SIZE}; 0: the length the model declares)",
    )
    parser.add_argument("--metrics", action="store_true", help="enable /metrics")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="file whose first line is a key every request but /health must carry",
    )
    parser.add_argument(
        "-lv", "--verbosity", type=int, default=0, help="llama.cpp log verbosity (0: quiet)"
    )
    return parser


def _say(message: str) -> None:
    print(f"{_PROGRAM}: {message}", file=sys.stderr, flush=True)


def _wait_for_inference_loop(host: str, port: int, key: str | None) -> None:
    # llama.cpp's inference loop sets its "running" flag when it starts, after the server has
    # already reported that it is ready. A stop request (terminate) that lands before the loop
    # starts is overwritten, and the destructor then waits for ever. GET /slots is answered by
    # the loop itself, so once it answers, the loop runs and a later stop cannot be lost.
    deadline = time.monotonic() + _LOOP_START_TIMEOUT_S
    while True:
        connection = http.client.HTTPConnection(host, port, timeout=_LOOP_START_TIMEOUT_S)
        try:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            connection.request("GET", "/slots", headers=headers)
            if connection.getresponse().status == http.HTTPStatus.OK:
                return
        except OSError:
            pass
        finally:
            connection.close()
        # Not answered yet: retry until the deadline, then carry on; the server serves anyway.
        if time.monotonic() >= deadline:
            _say("the inference loop did not answer; a stop may need a second signal")
            return
        time.sleep(0.01)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; return the process exit code."""
    given = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if len(given) > MAX_LAUNCHER_ARGUMENTS:
        parser.error(f"more than {MAX_LAUNCHER_ARGUMENTS} arguments")
    arguments = parser.parse_args(given)
    if arguments.ctx_size < 0:
        _say("the context size must not be negative")
        return EXIT_USAGE

    try:
        import xllamacpp
    except ImportError:
        _say(f"the embedded llama.cpp runtime needs xllamacpp; install it with: {INSTALL_COMMAND}")
        return EXIT_NOT_INSTALLED

    model: Path = arguments.model
    if not model.is_file():
        _say("the model file does not exist or is not a regular file")
        return EXIT_START_FAILED

    key: str | None = None
    if arguments.api_key_file is not None:
        try:
            key = arguments.api_key_file.read_text(encoding="ascii").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError):
            key = None
        if not key:
            _say("the API key file is unreadable or empty")
            return EXIT_USAGE

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    if key is not None:
        params.api_keys = [key]
    params.hostnames = [arguments.host]
    params.port = arguments.port
    params.n_parallel = arguments.parallel
    params.n_ctx = arguments.ctx_size
    params.endpoint_metrics = arguments.metrics
    params.endpoint_slots = True
    params.verbosity = arguments.verbosity
    # No browser UI: the runtime sits behind the front door and serves only the API.
    params.ui = False
    if arguments.threads is not None:
        params.cpuparams.n_threads = arguments.threads
        params.cpuparams_batch.n_threads = arguments.threads

    # Block the stop signals before any server thread exists: every thread inherits the mask,
    # so a signal stays pending (even one that arrives while the model loads) until the main
    # thread collects it with sigwait below, and no C++ thread is interrupted by it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        server = xllamacpp.Server(params)
    except (RuntimeError, ValueError):
        # xllamacpp reports every start failure (bind error, unloadable model) as RuntimeError
        # (ValueError for invalid parameters); llama.cpp has already logged the detail.
        _say("the server failed to start")
        return EXIT_START_FAILED

    address = str(server.listening_address)
    _wait_for_inference_loop(arguments.host, int(address.rsplit(":", 1)[1]), key)
    _say(f"listening on {address}")
    received = signal.sigwait(_STOP_SIGNALS)
    # A second signal while shutting down takes the default action and ends the process.
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _say(f"stopping on {signal.Signals(received).name}")
    # Dropping the last reference runs the C++ destructor: it ends the inference loop, stops
    # the HTTP listener (releasing the port) and joins the server threads.
    del server
    _say("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
