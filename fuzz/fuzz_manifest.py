"""Coverage-guided fuzzing of the manifest loader from TOML text.

Inputs are the fuzzer's raw text, token soup, deep nesting, or the valid base manifest with
fields replaced by hostile values (``tests.support.fuzzing.random_manifest_text``). Property:
``load_manifest_text`` either returns a ``Manifest`` whose URL is inside its own allowlist and
whose integrity spec is valid, or raises ``ManifestError`` with a ``"<field>: <reason>"``
message; no other exception escapes (``tests.support.fuzzing.manifest_outcome_violation``).
"""

from __future__ import annotations

import os
import sys

import _common
import atheris
from tests.support.fuzzing import manifest_outcome_violation, random_manifest_text

from companion_runtime.bind.manifest import load_manifest_text

# Exception type names already reported and not yet fixed, e.g. "RecursionError,OverflowError":
# the campaign then keeps looking for other findings instead of stopping at a known one.
_KNOWN = frozenset(filter(None, os.environ.get("COMPANION_FUZZ_KNOWN", "").split(",")))


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    raw = provider.ConsumeUnicodeNoSurrogates(64)
    text = random_manifest_text(_common.ProviderSource(provider), raw)
    outcome: object
    try:
        outcome = load_manifest_text(text)
    except Exception as error:  # noqa: BLE001 - the oracle judges which may escape
        outcome = error
    if type(outcome).__name__ in _KNOWN:
        return
    violation = manifest_outcome_violation(outcome)
    if violation is not None:
        raise AssertionError(f"{violation}: {text[:400]!r}") from (
            outcome if isinstance(outcome, BaseException) else None
        )


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
