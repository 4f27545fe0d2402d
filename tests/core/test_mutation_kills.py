"""Tests written to kill mutants of the core that the rest of tests/core let survive.

Each test pins a behaviour at a boundary the other tests did not reach (see docs/mutation.md for
the mutants and for the ones that are equivalent and so cannot be killed).
"""

from __future__ import annotations

import uuid

import pytest

import companion_runtime as cr
from companion_runtime.core import _gate

pytestmark = pytest.mark.unit

READY = cr.Lifecycle(cr.LifecycleState.READY)


# --- the gate's fast path --------------------------------------------------------------------
#
# The gate answers an allowed request on a flat fast path and hands anything else to
# evaluate_admission / evaluate_resource_limits. A fast path that is stricter than the rules
# still returns ALLOW (by the slow path), so only the path taken shows it. The fast path is a
# stated property of the gate (its docstring: "the allowed path ... no helper calls"), and these
# inputs sit on every boundary of it.


def _forbid_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_path(*_arguments: object) -> cr.Verdict:
        raise AssertionError("an allowed request left the gate's fast path")

    monkeypatch.setattr(_gate, "evaluate_admission", slow_path)
    monkeypatch.setattr(_gate, "evaluate_resource_limits", slow_path)


ALLOWED_ON_THE_EDGE = [
    # counters (max_in_flight, queue_bound, in_flight, queued), ceilings, use (ram, vram, cpu)
    pytest.param((1, 1, 0, 0), (1, 1, 100), (0, 0, 0), id="smallest-bounds-zero-use"),
    pytest.param((1, 1, 0, 1), (1, 1, 100), (1, 1, 100), id="full-queue-use-equal-to-ceiling"),
    pytest.param((4, 8, 3, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), id="float-ceilings-below-one"),
    pytest.param((4, 8, 3, 0), (2**40, 2**40, 0.5), (2**40, 0, 0.25), id="large-ram-small-cpu"),
    pytest.param((8, 2, 1, 1), (10.0, 10, 99.5), (10, 10.0, 99.5), id="mixed-int-float"),
]


@pytest.mark.parametrize(("counters", "ceilings", "use"), ALLOWED_ON_THE_EDGE)
def test_an_allowed_request_stays_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
    counters: tuple[int, int, int, int],
    ceilings: tuple[float, float, float],
    use: tuple[float, float, float],
) -> None:
    admission = cr.AdmissionState(*counters)
    limits = cr.create_resource_limits(
        max_ram_bytes=ceilings[0], max_vram_bytes=ceilings[1], max_cpu_percent=ceilings[2]
    )
    observation = cr.ResourceObservation(*use)
    # Without the patch the composition agrees: these really are allowed requests.
    assert cr.evaluate_admission(admission) is cr.ALLOW
    assert cr.evaluate_resource_limits(observation, limits) is cr.ALLOW
    _forbid_slow_path(monkeypatch)
    verdict = cr.evaluate_runtime_request(
        lifecycle_state=READY,
        admission_state=admission,
        resource_observation=observation,
        resource_limits=limits,
    )
    assert verdict is cr.ALLOW


# --- verdicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ok", "reason"),
    [("yes", cr.Reason.OK), (True, "ok"), (True, cr.Reason.QUEUE_FULL), (False, cr.Reason.OK)],
)
def test_an_inconsistent_verdict_is_a_spec_error_with_its_code(ok: object, reason: object) -> None:
    with pytest.raises(cr.SpecError) as caught:
        cr.Verdict(ok, reason)  # type: ignore[arg-type]
    assert type(caught.value) is cr.SpecError
    assert caught.value.reason is cr.Reason.MALFORMED_SPEC
    assert str(caught.value) == "malformed_spec"


@pytest.mark.parametrize("reason", [cr.Reason.OK, "queue_full", None])
def test_deny_of_a_non_denial_is_a_spec_error_with_its_code(reason: object) -> None:
    with pytest.raises(cr.SpecError) as caught:
        cr.deny(reason)  # type: ignore[arg-type]
    assert type(caught.value) is cr.SpecError
    assert caught.value.reason is cr.Reason.MALFORMED_SPEC


# --- source allowlist ----------------------------------------------------------------------------
#
# Allowlist entries are parsed once and cached (functools.lru_cache), and the cache outlives a
# test: an entry any earlier test (or the mutation tool's own warm-up run) parsed would never
# reach the entry parser again. Entries whose parsing matters therefore get a fresh host name.


def _fresh_host() -> str:
    return f"https://fresh-{uuid.uuid4().hex}.example/"


@pytest.mark.parametrize("url", ["1https://models.example.com/x", "models.example.com"])
def test_a_url_whose_scheme_is_not_a_scheme_is_malformed(url: str) -> None:
    assert cr.validate_source_url(url, ["https://models.example.com/"]).reason is (
        cr.Reason.MALFORMED_SPEC
    )


@pytest.mark.parametrize("port", [1, 2, 65534, 65535])
def test_every_port_from_1_to_65535_can_be_allowlisted(port: int) -> None:
    entry = f"https://port-edge-{port}.example:{port}/"
    assert cr.validate_source_url(f"{entry}m.gguf", [entry]) is cr.ALLOW


@pytest.mark.parametrize("query", ["?", "?a=1"])
def test_an_entry_with_a_query_even_an_empty_one_grants_nothing(query: str) -> None:
    host = _fresh_host()
    assert cr.validate_source_url(f"{host}m.gguf", [host + query]).reason is (
        cr.Reason.SOURCE_NOT_ALLOWED
    )


def test_an_entry_without_a_query_grants_its_prefix() -> None:
    entry = _fresh_host() + "models/"
    assert cr.validate_source_url(entry + "m.gguf?sig=1", [entry]) is cr.ALLOW


@pytest.mark.parametrize("segment", ["%EF%BC%8E%EF%BC%8E", "a%E2%88%95b", "%E2%92%88"])
def test_an_entry_with_a_look_alike_of_ascii_punctuation_grants_nothing(segment: str) -> None:
    # Fullwidth "..", a division slash, "⒈" ("1." under NFKC): the entry is as ambiguous as
    # such a URL, so it is invalid; the plain entry next to it is the control.
    host = _fresh_host()
    assert cr.validate_source_url(f"{host}m.gguf", [f"{host}{segment}/"]).reason is (
        cr.Reason.SOURCE_NOT_ALLOWED
    )
    plain = _fresh_host() + "mod%C3%A8le/"
    assert cr.validate_source_url(plain + "m.gguf", [plain]) is cr.ALLOW


@pytest.mark.parametrize("segment", ["...", "..%20", ".:x", "%20"])
def test_an_entry_with_a_segment_windows_reads_as_a_dot_segment_grants_nothing(
    segment: str,
) -> None:
    # Each is ".", ".." or nothing once Win32 drops a ":stream" and trailing dots and spaces;
    # the entry is as ambiguous as such a URL, so it is invalid. A name with dots and spaces
    # ("v1.0 x.") is the control.
    host = _fresh_host()
    assert cr.validate_source_url(f"{host}m.gguf", [f"{host}{segment}/"]).reason is (
        cr.Reason.SOURCE_NOT_ALLOWED
    )
    plain = _fresh_host() + "v1.0%20x./"
    assert cr.validate_source_url(plain + "m.gguf", [plain]) is cr.ALLOW


@pytest.mark.parametrize("segment", ["..%3F", ".%23x", "..+", "+", "..%EF%BE%9E", "%EF%BE%9F"])
def test_an_entry_with_a_segment_read_as_a_dot_segment_past_one_more_hop_grants_nothing(
    segment: str,
) -> None:
    # ".." once a decoded "?" or "#" starts a query or fragment, once "+" is a space that Win32
    # strips, or once accents are folded away (U+FF9E is a combining mark in NFKD). Every URL
    # under such an entry carries the same segment, so it is refused itself; one beside it is
    # not under the entry. Names with these characters ("c++", "x%3Fy", halfwidth "ga") are
    # the control.
    host = _fresh_host()
    entry = f"{host}{segment}/"
    assert cr.validate_source_url(entry + "m.gguf", [entry]).reason is cr.Reason.MALFORMED_SPEC
    assert cr.validate_source_url(f"{host}m.gguf", [entry]).reason is (cr.Reason.SOURCE_NOT_ALLOWED)
    plain = _fresh_host() + "c++/x%3Fy/x%23y/%EF%BD%B6%EF%BE%9E/"
    assert cr.validate_source_url(plain + "m.gguf", [plain]) is cr.ALLOW


@pytest.mark.parametrize("segment", ["c:x", "C%3A", "%C7%86:x", "%E1%84%80%E1%85%A1:", "x%CC%B4:"])
def test_an_entry_with_a_segment_windows_reads_as_a_drive_grants_nothing(segment: str) -> None:
    # A drive, as written, in NFKC ("dz" as one letter, two Hangul jamo composed into one
    # syllable) or with accents folded away (x with an overlay). Every URL under such an entry
    # carries the same segment, so it is refused itself, before any entry is consulted; one
    # beside it is not under the entry. Longer names before a ":" are the control.
    host = _fresh_host()
    entry = f"{host}{segment}/"
    assert cr.validate_source_url(entry + "m.gguf", [entry]).reason is cr.Reason.MALFORMED_SPEC
    assert cr.validate_source_url(f"{host}m.gguf", [entry]).reason is (cr.Reason.SOURCE_NOT_ALLOWED)
    plain = _fresh_host() + "llama3:8b/%C7%86x:y/"
    assert cr.validate_source_url(plain + "m.gguf", [plain]) is cr.ALLOW


# --- model fit ---------------------------------------------------------------------------------

ROOMY = cr.create_resource_limits(max_ram_bytes=10**12, max_vram_bytes=10**12, max_cpu_percent=100)


def test_gpu_offload_is_off_unless_asked_for() -> None:
    # Fits in VRAM, not in RAM: without offload it does not fit.
    common = {
        "model_size_bytes": 10,
        "overhead_bytes": 0,
        "available_ram_bytes": 5,
        "available_vram_bytes": 100,
        "resource_limits": ROOMY,
    }
    assert cr.evaluate_model_fit(**common).reason is cr.Reason.MODEL_TOO_LARGE  # type: ignore[arg-type]
    assert cr.evaluate_model_fit(**common, gpu_offload=True) is cr.ALLOW  # type: ignore[arg-type]


def test_a_model_exactly_the_size_of_one_byte_of_vram_fits_there() -> None:
    verdict = cr.evaluate_model_fit(
        model_size_bytes=1,
        overhead_bytes=0,
        available_ram_bytes=0,
        available_vram_bytes=1,
        resource_limits=ROOMY,
        gpu_offload=True,
    )
    assert verdict is cr.ALLOW
