"""Supply-chain integrity (``core/_integrity.py``): spec, streaming accumulator, whole file."""

from __future__ import annotations

import array
import hashlib
import itertools
import statistics
import time
import tracemalloc

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import companion_runtime as cr
from tests.support.core import ALLOWLIST, FAST, THOROUGH, SneakyStr, garbage

pytestmark = pytest.mark.unit

SOURCE = "https://models.example.com/tiny.gguf"
DATA = bytes(range(256)) * 40
DIGEST = hashlib.sha256(DATA).hexdigest()


def make(
    data: bytes = DATA, *, digest: str | None = None, size: int | None = None
) -> cr.IntegrityAccumulator:
    return cr.IntegrityAccumulator(
        expected_digest=hashlib.sha256(data).hexdigest() if digest is None else digest,
        expected_size_bytes=len(data) if size is None else size,
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )


def verify(file_data: object, **overrides: object) -> cr.Verdict:
    arguments: dict[str, object] = {
        "file_data": file_data,
        "expected_digest": DIGEST,
        "expected_size_bytes": len(DATA),
        "source_url": SOURCE,
        "allowed_source_urls": ALLOWLIST,
    }
    arguments.update(overrides)
    return cr.verify_model_bytes(**arguments)  # type: ignore[arg-type]


# ---- the spec ------------------------------------------------------------------------------


def test_a_valid_spec_is_allowed() -> None:
    assert cr.validate_integrity_spec(DIGEST, 1) is cr.ALLOW
    assert cr.validate_integrity_spec("0" * 64, 10**30) is cr.ALLOW


@pytest.mark.parametrize(
    ("digest", "size"),
    [
        (DIGEST.upper(), 10),
        (DIGEST[:63], 10),
        (DIGEST + "0", 10),
        ("g" * 64, 10),
        (" " + DIGEST[1:], 10),
        (DIGEST[:63] + "\n", 10),
        (DIGEST + "\n", 10),
        ("", 10),
        (None, 10),
        (DIGEST.encode(), 10),
        (SneakyStr(DIGEST), 10),
        (bytes.fromhex(DIGEST), 10),
        (DIGEST, 0),
        (DIGEST, -1),
        (DIGEST, True),
        (DIGEST, 10.0),
        (DIGEST, "10"),
        (DIGEST, None),
    ],
)
def test_a_malformed_spec_is_refused(digest: object, size: object) -> None:
    assert cr.validate_integrity_spec(digest, size).reason == "malformed_spec"


# ---- the constructor -----------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"source_url": "http://models.example.com/tiny.gguf"}, "scheme_not_allowed"),
        ({"source_url": "https://evil.example.net/tiny.gguf"}, "source_not_allowed"),
        ({"source_url": "https://models.example.com.evil.net/x"}, "source_not_allowed"),
        ({"allowed_source_urls": []}, "source_not_allowed"),
        ({"allowed_source_urls": "https://models.example.com/"}, "malformed_spec"),
        ({"expected_digest": "xyz"}, "malformed_spec"),
        ({"expected_size_bytes": 0}, "malformed_spec"),
        # Source first: a foreign source with a bad digest is refused for its source.
        (
            {"source_url": "https://evil.example.net/x", "expected_digest": "xyz"},
            "source_not_allowed",
        ),
    ],
)
def test_the_constructor_raises_spec_error_with_the_code_alone(
    overrides: dict[str, object], reason: str
) -> None:
    arguments: dict[str, object] = {
        "expected_digest": DIGEST,
        "expected_size_bytes": len(DATA),
        "source_url": SOURCE,
        "allowed_source_urls": ALLOWLIST,
    }
    arguments.update(overrides)
    for factory in (cr.IntegrityAccumulator, cr.create_integrity_accumulator):
        with pytest.raises(cr.SpecError) as error:
            factory(**arguments)  # type: ignore[arg-type]
        assert str(error.value) == reason
        assert error.value.reason == reason


def test_the_alias_builds_the_same_class() -> None:
    accumulator = cr.create_integrity_accumulator(
        expected_digest=DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )
    assert type(accumulator) is cr.IntegrityAccumulator
    assert accumulator.update(DATA).ok
    assert accumulator.finalize().ok


# ---- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [DATA],
        [bytearray(DATA)],
        [memoryview(DATA)],
        [DATA[:1], DATA[1:]],
        [b"", DATA, b""],
        [memoryview(DATA)[i : i + 1000] for i in range(0, len(DATA), 1000)],
        [bytes([byte]) for byte in DATA[:100]] + [DATA[100:]],
    ],
)
def test_the_exact_bytes_verify(chunks: list[bytes]) -> None:
    accumulator = make()
    for chunk in chunks:
        assert accumulator.update(chunk) is cr.ALLOW
    assert accumulator.received_bytes == len(DATA)
    assert accumulator.finalize() is cr.ALLOW


def test_a_memoryview_counts_bytes_not_items() -> None:
    items = array.array("I", range(100))
    data = items.tobytes()
    accumulator = make(data)
    assert accumulator.update(memoryview(items)).ok
    assert accumulator.received_bytes == len(data) == 400
    assert accumulator.finalize().ok


@pytest.mark.data_integrity
def test_one_byte_short_is_a_size_mismatch() -> None:
    accumulator = make()
    assert accumulator.update(DATA[:-1]).ok
    assert accumulator.finalize().reason == "size_mismatch"
    assert accumulator.finalize().reason == "accumulator_finalized"


@pytest.mark.data_integrity
def test_nothing_at_all_is_a_size_mismatch() -> None:
    assert make().finalize().reason == "size_mismatch"


@pytest.mark.data_integrity
@pytest.mark.security
def test_one_extra_byte_is_refused_by_the_chunk_that_carries_it() -> None:
    accumulator = make()
    assert accumulator.update(DATA).ok
    assert accumulator.update(b"\x00").reason == "size_mismatch"
    # The overrun is sticky and the overrunning bytes were never counted.
    assert accumulator.received_bytes == len(DATA)
    assert accumulator.update(b"").reason == "size_mismatch"
    assert accumulator.finalize().reason == "size_mismatch"


@pytest.mark.data_integrity
def test_a_chunk_that_straddles_the_size_is_refused_whole() -> None:
    accumulator = make()
    assert accumulator.update(DATA[:-10]).ok
    assert accumulator.update(DATA[-10:] + b"!").reason == "size_mismatch"
    assert accumulator.received_bytes == len(DATA) - 10


@pytest.mark.stress
@pytest.mark.security
def test_an_oversize_flood_is_stopped_at_size_plus_one() -> None:
    size = 4096
    payload = b"\xff" * 1024
    accumulator = make(payload * 4)
    results = []
    for _ in range(10_000):
        verdict = accumulator.update(payload)
        results.append(verdict)
        if not verdict.ok:
            break
    # Four chunks fit; the fifth takes the count past the size and ends the stream at once.
    assert [verdict.ok for verdict in results] == [True, True, True, True, False]
    assert results[-1].reason == "size_mismatch"
    assert accumulator.received_bytes == size
    for _ in range(1000):
        assert accumulator.update(payload).reason == "size_mismatch"
    assert accumulator.received_bytes == size


def _peak_while_streaming(view: memoryview, passes: int) -> int:
    tracemalloc.start()
    try:
        accumulator = make(b"x", digest="0" * 64, size=len(view) * passes)
        for _ in range(passes):
            accumulator.update(view)
        assert accumulator.received_bytes == len(view) * passes
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.stress
def test_memory_does_not_grow_with_the_length_of_the_stream() -> None:
    view = memoryview(bytes(range(256)) * 4096)  # 1 MiB, allocated before tracing starts
    short = _peak_while_streaming(view, 8)
    long = _peak_while_streaming(view, 64)
    assert long <= short + 1024
    assert long < 64 * 1024


@pytest.mark.data_integrity
@pytest.mark.security
@given(
    data=st.binary(min_size=1, max_size=2048),
    position=st.integers(min_value=0),
    bit=st.integers(0, 7),
)
@THOROUGH
def test_any_single_bit_flip_is_detected(data: bytes, position: int, bit: int) -> None:
    index = position % len(data)
    corrupted = bytearray(data)
    corrupted[index] ^= 1 << bit
    accumulator = make(data)
    assert accumulator.update(bytes(corrupted)).ok
    assert accumulator.finalize().reason == "digest_mismatch"
    verdict = cr.verify_model_bytes(
        file_data=bytes(corrupted),
        expected_digest=hashlib.sha256(data).hexdigest(),
        expected_size_bytes=len(data),
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )
    assert verdict.reason == "digest_mismatch"


@pytest.mark.data_integrity
def test_a_flipped_bit_in_the_expected_digest_is_detected() -> None:
    for position in (0, 31, 63):
        digest = list(DIGEST)
        digest[position] = "0" if digest[position] != "0" else "1"
        accumulator = make(digest="".join(digest))
        accumulator.update(DATA)
        assert accumulator.finalize().reason == "digest_mismatch"


def _outcome(accumulator: cr.IntegrityAccumulator, chunks: list[bytes]) -> cr.Verdict:
    for chunk in chunks:
        verdict = accumulator.update(chunk)
        if not verdict.ok:
            return verdict
    return accumulator.finalize()


@pytest.mark.data_integrity
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    expectation=st.sampled_from(["right", "wrong_digest", "smaller", "larger"]),
    as_view=st.booleans(),
)
@example(data=b"a", cuts=[], expectation="right", as_view=False)
@THOROUGH
def test_any_chunking_gives_the_verdict_of_one_call(
    data: bytes, cuts: list[int], expectation: str, as_view: bool
) -> None:
    if not data:
        data = b"\x00"
    digest = hashlib.sha256(data).hexdigest()
    size = len(data)
    if expectation == "wrong_digest":
        digest = hashlib.sha256(data + b"!").hexdigest()
    elif expectation == "smaller":
        size = max(1, size - 1) if size > 1 else size
    elif expectation == "larger":
        size += 1
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    buffer = memoryview(data) if as_view else data
    chunks = [buffer[start:end] for start, end in itertools.pairwise(bounds)]
    whole = _outcome(make(data, digest=digest, size=size), [data])
    split = _outcome(make(data, digest=digest, size=size), chunks)  # type: ignore[arg-type]
    assert split is whole
    in_memory = cr.verify_model_bytes(
        file_data=buffer,
        expected_digest=digest,
        expected_size_bytes=size,
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )
    assert in_memory is whole


# ---- refused chunks and single use --------------------------------------------------------


@pytest.mark.parametrize(
    "chunk",
    [
        "text",
        None,
        5,
        [1, 2],
        array.array("B", b"ab"),
        SneakyStr("x"),
        type("B", (bytes,), {})(b"x"),
    ],
)
def test_a_chunk_that_is_not_bytes_aborts(chunk: object) -> None:
    accumulator = make()
    assert accumulator.update(chunk).reason == "malformed_spec"  # type: ignore[arg-type]
    assert accumulator.update(DATA).reason == "accumulator_aborted"
    assert accumulator.finalize().reason == "accumulator_aborted"
    assert accumulator.received_bytes == 0


def test_a_non_contiguous_memoryview_is_taken_as_its_bytes_in_logical_order() -> None:
    # The contract takes any memoryview; hashlib alone takes only C-contiguous ones.
    accumulator = make(DATA[::2])
    view = memoryview(DATA)[::2]
    assert not view.c_contiguous
    assert accumulator.update(view) is cr.ALLOW
    assert accumulator.received_bytes == len(DATA[::2])
    assert accumulator.finalize() is cr.ALLOW
    # The view's own bytes are hashed, not the buffer under it.
    whole = make(DATA)
    assert whole.update(view) is cr.ALLOW
    assert whole.finalize().reason == "size_mismatch"


def test_verify_model_bytes_takes_a_non_contiguous_memoryview() -> None:
    data = DATA[::3]
    verdict = cr.verify_model_bytes(
        file_data=memoryview(DATA)[::3],
        expected_digest=hashlib.sha256(data).hexdigest(),
        expected_size_bytes=len(data),
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )
    assert verdict is cr.ALLOW


def test_a_released_memoryview_aborts() -> None:
    view = memoryview(DATA)
    view.release()
    accumulator = make()
    assert accumulator.update(view).reason == "malformed_spec"
    assert accumulator.finalize().reason == "accumulator_aborted"


def test_a_released_memoryview_is_refused_by_verify_model_bytes() -> None:
    view = memoryview(DATA)
    view.release()
    verdict = cr.verify_model_bytes(
        file_data=view,
        expected_digest=DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SOURCE,
        allowed_source_urls=ALLOWLIST,
    )
    assert verdict.reason == "malformed_spec"


def test_finalize_is_single_use() -> None:
    accumulator = make()
    accumulator.update(DATA)
    assert accumulator.finalize() is cr.ALLOW
    assert accumulator.finalize().reason == "accumulator_finalized"
    assert accumulator.update(b"").reason == "accumulator_finalized"
    accumulator.abort()
    assert accumulator.finalize().reason == "accumulator_finalized"


def test_abort_is_final() -> None:
    accumulator = make()
    accumulator.update(DATA[:10])
    accumulator.abort()
    accumulator.abort()
    assert accumulator.update(DATA[10:]).reason == "accumulator_aborted"
    assert accumulator.finalize().reason == "accumulator_aborted"
    assert accumulator.received_bytes == 10


def test_abort_after_an_overrun_keeps_the_cause() -> None:
    accumulator = make()
    accumulator.update(DATA + b"!")
    accumulator.abort()
    assert accumulator.finalize().reason == "size_mismatch"


@given(chunks=st.lists(garbage(), max_size=5))
@FAST
def test_update_never_raises(chunks: list[object]) -> None:
    accumulator = make()
    for chunk in chunks:
        assert type(accumulator.update(chunk)) is cr.Verdict  # type: ignore[arg-type]
    assert type(accumulator.finalize()) is cr.Verdict


@pytest.mark.security
def test_repr_leaks_neither_digest_nor_size() -> None:
    accumulator = make()
    text = repr(accumulator)
    assert DIGEST not in text
    assert DIGEST[:16] not in text
    assert str(len(DATA)) not in text


def test_the_accumulator_has_no_instance_dict() -> None:
    accumulator = make()
    with pytest.raises(AttributeError):
        accumulator.extra = 1  # type: ignore[attr-defined]


# ---- whole-file verification ---------------------------------------------------------------


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_verify_model_bytes_accepts_the_three_buffer_types(wrap: type) -> None:
    assert verify(wrap(DATA)) is cr.ALLOW


@pytest.mark.data_integrity
@pytest.mark.parametrize(
    ("file_data", "overrides", "reason"),
    [
        # Order: source, spec, type, size, digest. Each row breaks two stages; the first wins.
        (
            DATA,
            {"source_url": "http://models.example.com/x", "expected_digest": "x"},
            "scheme_not_allowed",
        ),
        (DATA, {"allowed_source_urls": [], "expected_size_bytes": 0}, "source_not_allowed"),
        ("text", {"expected_digest": "x"}, "malformed_spec"),
        ("text", {"expected_size_bytes": 1}, "malformed_spec"),
        (None, {}, "malformed_spec"),
        ([1, 2, 3], {}, "malformed_spec"),
        (DATA + b"!", {"expected_digest": "0" * 64}, "size_mismatch"),
        (DATA[:-1], {}, "size_mismatch"),
        (b"", {}, "size_mismatch"),
        (bytes(len(DATA)), {}, "digest_mismatch"),
        (memoryview(DATA)[::2], {"expected_size_bytes": len(DATA) // 2}, "digest_mismatch"),
    ],
)
def test_verify_model_bytes_order(
    file_data: object, overrides: dict[str, object], reason: str
) -> None:
    assert verify(file_data, **overrides).reason == reason


@given(
    file_data=garbage(),
    digest=garbage(),
    size=garbage(),
    source=garbage(),
    allowlist=garbage(),
)
@FAST
def test_verify_model_bytes_never_raises(
    file_data: object, digest: object, size: object, source: object, allowlist: object
) -> None:
    verdict = cr.verify_model_bytes(
        file_data=file_data,
        expected_digest=digest,
        expected_size_bytes=size,
        source_url=source,
        allowed_source_urls=allowlist,
    )
    assert type(verdict) is cr.Verdict
    assert not verdict.ok


@given(digest=garbage(), size=garbage())
@THOROUGH
def test_validate_integrity_spec_never_raises(digest: object, size: object) -> None:
    assert type(cr.validate_integrity_spec(digest, size)) is cr.Verdict


# ---- constant-time comparison --------------------------------------------------------------


def _differing_at(position: int) -> str:
    digest = list(DIGEST)
    digest[position] = "0" if digest[position] != "0" else "1"
    return "".join(digest)


def _median_finalize_ns(rounds: int, batch: int) -> tuple[float, float]:
    """Median time of a batch of ``finalize()`` calls for a digest that differs from the real
    one in its first character and for one that differs in its last, measured interleaved.

    Only ``finalize`` is inside the timed window (the accumulators are built and fed before),
    so the comparison is as large a share of the measurement as the public API allows.
    """
    early, late = _differing_at(0), _differing_at(63)

    def run(expected: str) -> int:
        accumulators = [make(digest=expected) for _ in range(batch)]
        for accumulator in accumulators:
            accumulator.update(DATA)
        start = time.perf_counter_ns()
        for accumulator in accumulators:
            accumulator.finalize()
        return time.perf_counter_ns() - start

    early_times: list[int] = []
    late_times: list[int] = []
    run(early)
    run(late)
    for index in range(rounds):
        # Alternate which case goes first so that drift on a loaded machine hits both alike.
        if index % 2:
            early_times.append(run(early))
            late_times.append(run(late))
        else:
            late_times.append(run(late))
            early_times.append(run(early))
    return statistics.median(early_times), statistics.median(late_times)


@pytest.mark.security
def test_digest_comparison_time_does_not_depend_on_where_the_digests_differ() -> None:
    ratios = []
    for _attempt in range(3):
        early, late = _median_finalize_ns(rounds=41, batch=200)
        ratio = early / late
        ratios.append(ratio)
        if 0.7 <= ratio <= 1.43:
            break
    assert 0.7 <= ratios[-1] <= 1.43, ratios
