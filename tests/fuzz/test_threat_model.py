"""docs/threat-model.md names the tests that prove each control; they must exist.

A renamed or deleted test would otherwise leave the threat model citing evidence that is gone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THREAT_MODEL = ROOT / "docs" / "threat-model.md"
_CITED_TEST = re.compile(r"`((?:tests|fuzz)/[\w/]+\.py)(?:::(\w+))?")


def _citations() -> list[tuple[str, str | None]]:
    text = THREAT_MODEL.read_text(encoding="utf-8")
    return sorted({(path, name or None) for path, name in _CITED_TEST.findall(text)}, key=str)


def test_the_threat_model_cites_tests() -> None:
    citations = _citations()
    assert len([name for _, name in citations if name]) >= 20


@pytest.mark.parametrize(("path", "name"), _citations())
def test_every_cited_test_exists(path: str, name: str | None) -> None:
    source = ROOT / path
    assert source.is_file(), f"{path} is cited but does not exist"
    if name is not None:
        pattern = rf"^\s*(?:async\s+)?def {re.escape(name)}\("
        assert re.search(pattern, source.read_text(encoding="utf-8"), re.M), (
            f"{path}::{name} is cited but not defined"
        )
