"""The manifest loader on generated and hostile TOML: only ``ManifestError`` may escape.

A seeded batch mutates the valid base manifest field by field (hostile values, huge integers,
deep nesting, unknown tables, token soup) and checks every outcome with
``tests.support.fuzzing.manifest_outcome_violation``: a manifest that loads is consistent, and a
refusal is a ``ManifestError`` whose message is ``"<field>: <reason>"`` and never quotes the file
(the base manifest's URL carries ``token=SECRET-TOKEN`` to make a leak visible).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from companion_runtime.bind.manifest import ManifestError, load_manifest_text
from tests.fuzz._budget import EXAMPLES, SEED
from tests.support.fuzzing import (
    BASE_MANIFEST_FIELDS,
    RandomSource,
    manifest_outcome_violation,
    random_manifest_text,
    render_manifest,
)

pytestmark = [pytest.mark.security, pytest.mark.data_integrity]


def _load(text: str) -> object:
    try:
        return load_manifest_text(text)
    except Exception as error:
        return error


def _with(table: str, key: str, value: str) -> str:
    fields = [(t, k, value if (t, k) == (table, key) else v) for t, k, v in BASE_MANIFEST_FIELDS]
    return render_manifest(fields)


def test_the_base_manifest_loads() -> None:
    outcome = _load(render_manifest(BASE_MANIFEST_FIELDS))
    assert manifest_outcome_violation(outcome) is None
    assert not isinstance(outcome, Exception)


def test_seeded_batch_of_manifests_only_raises_manifest_error() -> None:
    source = RandomSource(random.Random(SEED))
    outcomes: Counter[str] = Counter()
    for index in range(max(1000, EXAMPLES // 10)):
        text = random_manifest_text(source, raw="\x00[model]\nname = 1")
        outcome = _load(text)
        violation = manifest_outcome_violation(outcome)
        assert violation is None, f"input {index} under seed {SEED}: {violation}: {text[:300]!r}"
        if isinstance(outcome, Exception):
            assert "SECRET-TOKEN" not in str(outcome)
        outcomes[type(outcome).__name__] += 1
    assert outcomes["Manifest"] > 0 and outcomes["ManifestError"] > 0


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("runtime", "ready_timeout_s"),
        ("limits", "queue_timeout_s"),
        ("limits", "max_cpu_percent"),
    ],
)
def test_an_integer_too_large_for_a_float_is_a_manifest_error(table: str, key: str) -> None:
    # Found by fuzzing: float() of a 400-digit TOML integer raises OverflowError.
    with pytest.raises(ManifestError) as caught:
        load_manifest_text(_with(table, key, "9" * 400))
    assert str(caught.value) == f"{table}.{key}: malformed_manifest"


@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ("{ a = ", " }")])
def test_deeply_nested_toml_is_a_manifest_error(opener: str, closer: str) -> None:
    # Found by fuzzing: tomllib recurses per nesting level and raises RecursionError.
    depth = 5000
    text = render_manifest(BASE_MANIFEST_FIELDS) + f"x = {opener * depth}1{closer * depth}\n"
    with pytest.raises(ManifestError) as caught:
        load_manifest_text(text)
    assert str(caught.value) == "manifest: malformed_manifest"


def test_the_repr_of_a_loaded_manifest_does_not_show_the_url_query() -> None:
    # A manifest logged with %r (or shown in a traceback's locals) must not leak a signed URL's
    # token; the query is needed for the download, not for display.
    manifest = load_manifest_text(render_manifest(BASE_MANIFEST_FIELDS))
    shown = repr(manifest)
    assert "SECRET-TOKEN" not in shown
    assert manifest.model.sha256 not in shown
    assert manifest.model.url.split("?", 1)[0] in shown  # still says where the model is from
