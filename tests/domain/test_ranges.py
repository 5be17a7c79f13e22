"""Byte ranges of an upload: a state machine against a byte-by-byte model, validation, the
sequential upload, and the strict packed form."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from interlink.core.domain.ranges import MAX_OFFSET, ByteRanges

UNIVERSE = 512  # offsets the machine draws from: small, so ranges collide, touch and merge often


def runs(flags: bytearray, value: int) -> list[tuple[int, int]]:
    """The maximal runs of ``value`` in ``flags``, as (start, end) pairs."""
    found = []
    start = None
    for offset, flag in enumerate(flags):
        if flag == value and start is None:
            start = offset
        elif flag != value and start is not None:
            found.append((start, offset))
            start = None
    if start is not None:
        found.append((start, len(flags)))
    return found


def pack_pairs(pairs: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack(">QQ", start, end) for start, end in pairs)


spans = st.tuples(st.integers(0, UNIVERSE - 1), st.integers(1, UNIVERSE)).map(sorted).filter(
    lambda span: span[0] < span[1])


class ByteRangesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ranges = ByteRanges()
        self.covered = bytearray(UNIVERSE)  # 1 where a byte arrived

    @rule(span=spans)
    def add(self, span):
        start, end = span
        expected_count = self.ranges.count_after(start, end)
        newly = self.covered[start:end].count(0)
        assert self.ranges.add(start, end) == newly
        self.covered[start:end] = b"\x01" * (end - start)
        assert len(self.ranges) == expected_count

    @rule(span=st.tuples(st.integers(0, UNIVERSE - 1), st.integers(1, 64)))
    def add_after_the_last(self, span):
        """The sequential path: a chunk right at, or past, the end of the last range."""
        gap, length = span
        last_end = max((end for _, end in self.ranges), default=0)
        start = min(last_end + gap % 3, UNIVERSE - 1)  # 0: continues the last range; 1, 2: leaves a gap
        end = min(start + length, UNIVERSE)
        expected_count = self.ranges.count_after(start, end)
        assert self.ranges.add(start, end) == self.covered[start:end].count(0)
        self.covered[start:end] = b"\x01" * (end - start)
        assert len(self.ranges) == expected_count

    @rule()
    def clear(self):
        self.ranges.clear()
        self.covered = bytearray(UNIVERSE)

    @rule(span=spans)
    def covers(self, span):
        start, end = span
        assert self.ranges.covers(start, end) == (self.covered[start:end].count(0) == 0)

    @rule(limit=st.integers(0, 6))
    def missing(self, limit):
        assert self.ranges.missing(UNIVERSE, limit) == runs(self.covered, 0)[:limit]

    @invariant()
    def matches_the_model(self):
        model_runs = runs(self.covered, 1)
        assert list(self.ranges) == model_runs
        assert len(self.ranges) == len(model_runs)
        assert self.ranges.total == self.covered.count(1)
        assert self.ranges.prefix == (model_runs[0][1] if model_runs and model_runs[0][0] == 0 else 0)

    @invariant()
    def packs_and_unpacks(self):
        packed = self.ranges.pack()
        assert len(packed) == 16 * len(self.ranges)
        assert ByteRanges.unpack(packed) == self.ranges


ByteRangesMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestByteRangesMachine = ByteRangesMachine.TestCase


# ----------------------------------------------------------------------------- add


@pytest.mark.parametrize("start, end", [(-1, 5), (5, 5), (6, 5), (0, MAX_OFFSET + 1)])
def test_add_refuses_a_span_that_is_not_a_range(start, end):
    ranges = ByteRanges()
    with pytest.raises(ValueError):
        ranges.add(start, end)
    with pytest.raises(ValueError):
        ranges.count_after(start, end)
    with pytest.raises(ValueError):
        ranges.covers(start, end)
    assert len(ranges) == 0 and ranges.total == 0


def test_add_refuses_offsets_that_are_not_integers():
    with pytest.raises(TypeError):
        ByteRanges().add(0, 1.5)


def test_adjacent_ranges_merge():
    ranges = ByteRanges()
    assert ranges.add(0, 5) == 5
    assert ranges.count_after(5, 9) == 1
    assert ranges.add(5, 9) == 4
    assert list(ranges) == [(0, 9)]
    assert ranges.add(12, 20) == 8
    assert ranges.add(9, 12) == 3  # fills the gap exactly: the neighbours join
    assert list(ranges) == [(0, 20)]


def test_a_range_bridging_several_counts_only_the_new_bytes():
    ranges = ByteRanges()
    for start in (10, 30, 50):
        ranges.add(start, start + 5)
    assert ranges.count_after(0, 100) == 1
    assert ranges.count_after(20, 25) == 4
    assert ranges.add(12, 52) == 40 - (3 + 5 + 2)  # [12, 52) minus the 3 + 5 + 2 bytes already there
    assert list(ranges) == [(10, 55)]
    assert ranges.total == 45
    assert ranges.add(10, 55) == 0  # a repeated chunk adds nothing


def test_a_sequential_upload_stays_one_range():
    ranges = ByteRanges()
    chunk = 63 * 1024
    size = 1000 * chunk + 17
    for offset in range(0, size, chunk):
        assert ranges.add(offset, min(offset + chunk, size)) == min(chunk, size - offset)
        assert len(ranges) == 1
        assert ranges.prefix == ranges.total == min(offset + chunk, size)
    assert ranges.covers(0, size)
    assert ranges.missing(size, 10) == []


def test_prefix_is_zero_until_offset_zero_arrives():
    ranges = ByteRanges()
    ranges.add(10, 20)
    assert ranges.prefix == 0 and ranges.total == 10
    ranges.add(0, 4)
    assert ranges.prefix == 4
    assert ranges.missing(30, 5) == [(4, 10), (20, 30)]
    assert ranges.missing(30, 1) == [(4, 10)]
    assert ranges.missing(15, 5) == [(4, 10)]  # the size cuts the gaps short
    assert ranges.missing(0, 5) == []


def test_missing_refuses_negative_arguments():
    with pytest.raises(ValueError):
        ByteRanges().missing(-1, 1)
    with pytest.raises(ValueError):
        ByteRanges().missing(1, -1)


def test_equality_and_repr():
    first, second = ByteRanges(), ByteRanges()
    first.add(0, 3)
    assert first != second
    second.add(0, 3)
    assert first == second
    assert first != [(0, 3)]
    assert repr(first) == "ByteRanges([(0, 3)])"
    for start in range(10, 100, 2):
        first.add(start, start + 1)
    assert repr(first).endswith(", ... 38 more])")  # 46 ranges, 8 shown


# ----------------------------------------------------------------------------- the packed form


def test_pack_is_two_big_endian_uint64_per_range():
    ranges = ByteRanges()
    assert ranges.pack() == b""
    ranges.add(1, 2)
    ranges.add(256, MAX_OFFSET)
    assert ranges.pack() == pack_pairs([(1, 2), (256, MAX_OFFSET)])


def test_unpack_of_nothing_is_empty():
    ranges = ByteRanges.unpack(b"")
    assert len(ranges) == 0 and ranges.total == 0 and ranges.prefix == 0


def test_unpack_restores_the_total():
    ranges = ByteRanges.unpack(pack_pairs([(0, 4), (10, 20)]))
    assert ranges.total == 14 and ranges.prefix == 4
    assert ranges.add(4, 10) == 6
    assert list(ranges) == [(0, 20)]


@pytest.mark.parametrize("data", [
    pytest.param(b"\x00" * 15, id="length 15"),
    pytest.param(pack_pairs([(0, 5)]) + b"\x00", id="length 17"),
    pytest.param(pack_pairs([(5, 5)]), id="empty range"),
    pytest.param(pack_pairs([(6, 5)]), id="start after end"),
    pytest.param(pack_pairs([(10, 20), (0, 5)]), id="unsorted"),
    pytest.param(pack_pairs([(0, 10), (5, 20)]), id="overlapping"),
    pytest.param(pack_pairs([(0, 10), (0, 10)]), id="repeated"),
    pytest.param(pack_pairs([(0, 5), (5, 9)]), id="adjacent"),
    pytest.param(pack_pairs([(0, MAX_OFFSET + 1)]), id="end past 2**63-1"),
    pytest.param(pack_pairs([(MAX_OFFSET + 1, 2**64 - 1)]), id="start past 2**63-1"),
])
def test_unpack_refuses_what_pack_never_makes(data):
    with pytest.raises(ValueError):
        ByteRanges.unpack(data)


packed_candidates = st.one_of(
    st.binary(max_size=80),
    # Plausible stored values: small offsets, so many inputs are valid and the accepting path runs.
    st.lists(st.integers(0, 64), max_size=10).map(lambda values: struct.pack(f">{len(values)}Q", *values)),
    st.lists(st.integers(0, 64), max_size=10, unique=True).map(
        lambda values: struct.pack(f">{len(values)}Q", *sorted(values))),
    st.lists(st.integers(MAX_OFFSET - 3, 2**64 - 1), max_size=4).map(
        lambda values: struct.pack(f">{len(values)}Q", *values)),
)


@settings(max_examples=500, deadline=None)
@given(data=packed_candidates)
def test_unpack_refuses_or_round_trips(data):
    try:
        ranges = ByteRanges.unpack(data)
    except ValueError:
        return
    assert ranges.pack() == data
    assert ranges.total == sum(end - start for start, end in ranges)
