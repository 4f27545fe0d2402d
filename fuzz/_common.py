"""Shared plumbing for the atheris targets: import path, instrumentation, a data-provider source.

Run a target from the repository root, for example::

    .venv/bin/python fuzz/fuzz_source_url.py -atheris_runs=1000000 fuzz/corpus/source_url

Each target checks an independent oracle (``tests/support/fuzzing.py``) on every input and
raises on a violation, which atheris reports as a crash with the input saved to
``crash-<sha1>``. A crash is then turned into a regression case in ``tests/fuzz/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # The oracles live in tests/support; the package itself is installed (editable).
    sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["companion_runtime"]):
    # Imported here so that the core and the manifest loader are instrumented for coverage.
    import companion_runtime
    import companion_runtime.bind.manifest  # noqa: F401


class ProviderSource:
    """``tests.support.fuzzing.ByteSource`` over atheris' FuzzedDataProvider."""

    __slots__ = ("_provider",)

    def __init__(self, provider: atheris.FuzzedDataProvider) -> None:
        self._provider = provider

    def int_in(self, low: int, high: int) -> int:
        return int(self._provider.ConsumeIntInRange(low, high))

    def any_float(self) -> float:
        return float(self._provider.ConsumeFloat())
