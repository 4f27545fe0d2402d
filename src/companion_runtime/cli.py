"""Command-line interface: ``verify``, ``pull``, ``serve``, ``status``, ``demo``.

Exit codes: 0 when the action succeeded, 1 when it was refused (a ``Reason`` is printed), 2 on a
usage error (typer/click's own convention). With ``--json`` a command prints exactly one JSON
object on standard output.
"""

from __future__ import annotations

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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
