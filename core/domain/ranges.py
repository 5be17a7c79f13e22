"""The byte ranges received of a chunked upload: chunks arrive at any offset, in any order, some
twice; ``ByteRanges`` merges them, answers where a client resumes (``prefix``) and whether every
byte arrived, and packs to bytes the store keeps, so an upload survives a restart. Unpacking is
strict, as the bytes come back from storage."""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

# The largest offset a range may end at: a signed 64-bit integer holds every offset, for a store
# or a peer that reads the packed form as int64.
MAX_OFFSET = 2**63 - 1

PACKED_RANGE_SIZE = 16  # two big-endian uint64: start, end
_REPR_RANGES = 8  # a fragmented upload would otherwise flood a log line


def _check_span(start: int, end: int) -> None:
    # A float offset would compare fine and then corrupt the running total and the packed form.
    if not isinstance(start, int) or not isinstance(end, int):
        raise TypeError(f"offsets must be integers, not {type(start).__name__} and {type(end).__name__}")
    if not 0 <= start < end <= MAX_OFFSET:
        raise ValueError(f"not a byte range: [{start}, {end}) (needs 0 <= start < end <= {MAX_OFFSET})")


class ByteRanges:
    """The received parts of an upload: sorted, disjoint, non-adjacent half-open ranges [start, end)."""

    __slots__ = ("_starts", "_ends", "_total")
    __hash__ = None  # mutable: equal values may not stay equal

    def __init__(self) -> None:
        # Parallel lists, so bisect searches either side without building keys.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._total = 0

    def add(self, start: int, end: int) -> int:
        """Merge [start, end) in (overlapping and adjacent ranges merge); return how many bytes
        were newly covered."""
        _check_span(start, end)
        starts, ends = self._starts, self._ends
        # The common upload is sequential: the chunk continues, or follows, the last range.
        if not ends or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            self._total += end - start
            return end - start
        if start == ends[-1]:
            ends[-1] = end
            self._total += end - start
            return end - start
        first, past = self._touching(start, end)
        if first == past:
            starts.insert(first, start)
            ends.insert(first, end)
            self._total += end - start
            return end - start
        merged_start = min(start, starts[first])
        merged_end = max(end, ends[past - 1])
        covered_before = sum(ends[i] - starts[i] for i in range(first, past))
        newly = (merged_end - merged_start) - covered_before
        starts[first:past] = [merged_start]
        ends[first:past] = [merged_end]
        self._total += newly
        return newly

    def count_after(self, start: int, end: int) -> int:
        """How many separate ranges there would be after ``add(start, end)``, changing nothing."""
        _check_span(start, end)
        first, past = self._touching(start, end)
        return len(self._starts) - (past - first) + 1

    def _touching(self, start: int, end: int) -> tuple[int, int]:
        """The indexes [first, past) of the ranges that overlap or touch [start, end)."""
        # First range ending at or after start (adjacent counts), up to the last starting at or before end.
        return bisect_left(self._ends, start), bisect_right(self._starts, end)

    @property
    def prefix(self) -> int:
        """The end of the range that starts at 0, or 0: the offset a client resumes from."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    @property
    def total(self) -> int:
        """Bytes covered."""
        return self._total

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of [start, end) is covered."""
        _check_span(start, end)
        # Ranges never touch, so one range must hold the whole span.
        index = bisect_right(self._starts, start) - 1
        return index >= 0 and self._ends[index] >= end

    def missing(self, size: int, limit: int) -> list[tuple[int, int]]:
        """The first ``limit`` gaps in [0, size), as (start, end) pairs, in order."""
        if size < 0 or limit < 0:
            raise ValueError(f"size and limit must not be negative: {size}, {limit}")
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for start, end in zip(self._starts, self._ends):
            if len(gaps) >= limit or start >= size:
                break
            if start > cursor:
                gaps.append((cursor, start))
            cursor = end
        if cursor < size and len(gaps) < limit:
            gaps.append((cursor, size))
        return gaps

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._total = 0

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByteRanges):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        shown = ", ".join(f"({s}, {e})" for s, e in zip(self._starts[:_REPR_RANGES], self._ends))
        more = len(self._starts) - _REPR_RANGES
        return f"ByteRanges([{shown}{f', ... {more} more' if more > 0 else ''}])"

    def pack(self) -> bytes:
        """Each range as two big-endian uint64 (start, end), 16 bytes a range; b"" when empty."""
        values = [value for pair in zip(self._starts, self._ends) for value in pair]
        return struct.pack(f">{len(values)}Q", *values)

    @classmethod
    def unpack(cls, data: bytes) -> ByteRanges:
        """The strict inverse of ``pack``: ValueError unless ``data`` is what ``pack`` makes."""
        if len(data) % PACKED_RANGE_SIZE:
            raise ValueError(f"packed ranges are {PACKED_RANGE_SIZE} bytes each, not {len(data)} bytes in all")
        values = struct.unpack(f">{len(data) // 8}Q", data)
        ranges = cls()
        starts, ends = ranges._starts, ranges._ends
        previous_end = -1
        for index in range(0, len(values), 2):
            start, end = values[index], values[index + 1]
            if not start < end <= MAX_OFFSET:
                raise ValueError(f"range {index // 2} is not a byte range: [{start}, {end})")
            # Adjacent ranges are merged by add, so a stored pair that touches was not made by pack.
            if start <= previous_end:
                raise ValueError(
                    f"range {index // 2} [{start}, {end}) is not after the end {previous_end} of the previous one")
            starts.append(start)
            ends.append(end)
            ranges._total += end - start
            previous_end = end
        return ranges
