"""Coverage-guided fuzzing of ``validate_source_url`` against an independent URL oracle.

Property checked on every input: the call never raises and returns a ``Verdict``; and an
``ok`` verdict is given only to a URL whose scheme is ``https``, that has no userinfo, no
refused characters, and whose host, port and path -- read by both ``urllib.parse`` and
``httpx.URL`` -- equal an allowlisted entry's host and port with the path inside the entry's
path on a segment boundary (``tests.support.fuzzing.url_oracle_violation``).
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (sets up the import path and instrumentation)
import atheris
from tests.support.fuzzing import ALLOWLIST_ENTRIES, URL_TOKENS, url_oracle_violation

from companion_runtime import validate_source_url


def _allowlist(provider: atheris.FuzzedDataProvider) -> object:
    mode = provider.ConsumeIntInRange(0, 9)
    if mode == 0:
        return provider.ConsumeUnicodeNoSurrogates(40)
    if mode == 1:
        return None
    entries: list[object] = [
        ALLOWLIST_ENTRIES[provider.ConsumeIntInRange(0, len(ALLOWLIST_ENTRIES) - 1)]
        for _ in range(provider.ConsumeIntInRange(1, 3))
    ]
    if mode == 2:
        # A fuzzed entry: an invalid entry must grant nothing, a valid one only its prefix.
        entries.append(provider.ConsumeUnicodeNoSurrogates(48))
    return tuple(entries) if mode == 3 else entries


def _url(provider: atheris.FuzzedDataProvider) -> object:
    mode = provider.ConsumeIntInRange(0, 5)
    if mode == 0:
        return provider.ConsumeUnicodeNoSurrogates(80)
    if mode == 1:
        return provider.ConsumeBytes(40)  # not a str: must be malformed_spec
    pieces: list[str] = []
    if mode >= 3:
        pieces.append(ALLOWLIST_ENTRIES[provider.ConsumeIntInRange(0, len(ALLOWLIST_ENTRIES) - 1)])
    for _ in range(provider.ConsumeIntInRange(1, 10)):
        if provider.ConsumeIntInRange(0, 4) == 0:
            pieces.append(provider.ConsumeUnicodeNoSurrogates(6))
        else:
            pieces.append(URL_TOKENS[provider.ConsumeIntInRange(0, len(URL_TOKENS) - 1)])
    return "".join(pieces)


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    allowlist = _allowlist(provider)
    url = _url(provider)
    verdict = validate_source_url(url, allowlist)
    violation = url_oracle_violation(url, allowlist, verdict)
    if violation is not None:
        raise AssertionError(f"{violation}: url={url!r} allowlist={allowlist!r} {verdict!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
