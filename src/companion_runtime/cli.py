"""Command-line interface: ``verify``, ``pull``, ``serve``, ``status``, ``demo``.

Exit codes: 0 when the action succeeded, 1 when it was refused (a ``Reason`` is printed), 2 on a
usage error (typer/click's own convention). With ``--json`` a command prints exactly one JSON
object on standard output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="companion-runtime",
    help="Run a local model inference runtime safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- verify / pull ------------------------------------------------------------------------
# (bodies live in this section; they call companion_runtime.bind.filehash / .pull)

# --- serve / status / demo ----------------------------------------------------------------
# (bodies live in this section; they call companion_runtime.bind.serve / .demo)
# Imports of the bind layer happen inside the commands so that one command's dependencies
# (llama.cpp, rich tables) are never loaded for another.


def _finish(payload: dict[str, object], *, ok: bool, json_output: bool) -> None:
    """Print a refusal (or a JSON result) and exit 0/1."""
    if json_output:
        typer.echo(json.dumps(payload))
    elif not ok:
        typer.echo(f"refused: {payload.get('reason')}", err=True)
    raise typer.Exit(0 if ok else 1)


@app.command()
def status(
    url: Annotated[
        str | None,
        typer.Option(help="Front door URL. Default: the one the last `serve` recorded."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token. Default: the one `serve` recorded."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a running front door's /_status (state, in flight, queued, counters).

    Without --url/--token-file it reads serve.json in the state directory
    ($COMPANION_RUNTIME_STATE_DIR, else the user runtime directory).
    """
    from companion_runtime.bind.status import read_status, status_table

    result = read_status(url=url, token_file=token_file)
    if result.verdict.ok and not json_output:
        from rich.console import Console

        Console().print(status_table(result.document))
    _finish(result.to_dict(), ok=result.verdict.ok, json_output=json_output)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
