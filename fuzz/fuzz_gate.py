"""Coverage-guided fuzzing of ``evaluate_runtime_request`` on decoded garbage.

The fuzzer's bytes are decoded into the four keyword arguments, from valid values to
instances forged past validation, look-alikes, hostile objects whose comparisons raise, and
bare scalars (``tests.support.fuzzing.decode_gate_arguments``). Property: the call never
raises, returns a ``Verdict``, and allows only a ready lifecycle with a free slot and every
resource at or under its ceiling (``tests.support.fuzzing.gate_oracle_violation``).
"""

from __future__ import annotations

import sys

import _common
import atheris
from tests.support.fuzzing import decode_gate_arguments, gate_oracle_violation

from companion_runtime import evaluate_runtime_request


def test_one_input(data: bytes) -> None:
    arguments = decode_gate_arguments(_common.ProviderSource(atheris.FuzzedDataProvider(data)))
    verdict = evaluate_runtime_request(**arguments)  # type: ignore[arg-type]
    violation = gate_oracle_violation(**arguments, verdict=verdict)
    if violation is not None:
        raise AssertionError(f"{violation}: {arguments!r} {verdict!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
