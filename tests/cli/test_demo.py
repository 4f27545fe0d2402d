"""`companion-runtime demo` end to end, as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from companion_runtime.bind.llama_server import llama_available

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(not llama_available(), reason="needs the llama extra")
def test_demo_runs_end_to_end_and_exits_0() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "companion_runtime.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for shown in ("digest_mismatch", "nothing stored", "queue_full", "gone"):
        assert shown in finished.stdout
