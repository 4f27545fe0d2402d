"""Run the CLI as root without root's power to read any file, so that a file it may not read
really cannot be read (``EACCES``), as for any other user."""

from __future__ import annotations

import shutil
import subprocess
import sys

#: Whether the test can run: as root, with util-linux ``setpriv`` to drop the capabilities.
CAN_DROP_FILE_OVERRIDE = shutil.which("setpriv") is not None

_WITHOUT_OVERRIDE = ("--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")


def run_cli_without_file_override(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``companion-runtime ARGS`` without ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``: a
    file whose mode forbids reading cannot be read, root's own included."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    return subprocess.run(
        [setpriv, *_WITHOUT_OVERRIDE, sys.executable, "-m", "companion_runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
