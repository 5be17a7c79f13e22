"""The open-loop schedule (``interlink.load.schedule``): a rate spread over senders, each intended
send time handed out once."""

from __future__ import annotations

from interlink.load.schedule import OpenLoopSchedule


def test_open_loop_schedule_spreads_the_rate_and_hands_each_time_out_once() -> None:
    schedule = OpenLoopSchedule(4, 4000.0, origin_ns=0)  # 1,000/s per sender, period 1 ms
    first = [schedule.due(index, 999_999) for index in range(4)]
    assert [times[0] for times in first] == [0, 250_000, 500_000, 750_000]  # staggered by a quarter period
    assert all(len(times) == 1 for times in first)
    later = [schedule.due(index, 1_000_000_000) for index in range(4)]
    # up to one second: 1,000 per sender (sender 0 also at exactly 1 s), none handed out twice
    assert [len(a) + len(b) for a, b in zip(first, later)] == [1001, 1000, 1000, 1000]
    assert all(t <= 1_000_000_000 for times in later for t in times)
    assert later[0][:2] == [1_000_000, 2_000_000] and schedule.due(0, 1_000_000_000) == []
