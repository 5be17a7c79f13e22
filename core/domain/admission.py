"""Admission control: how the gateway notices it is falling behind, and what it stops taking.

The signal is the load of each turn's commit (``WriteBatch.load``): every message, receipt and
change read in one event-loop turn joins one commit, and counts one, plus one per 64 copies it
stores (a group message to 1,000 devices counts 16); ``recv`` deletions do not count, being a
consequence of deliveries rather than new work. A turn whose load passes ``turn_budget`` is a turn
that grew with the backlog — the loop lag, the commit backlog and the wait of every stanza behind
it, in one number the domain already holds. (In commit-thread mode the batch also grows while the
previous commit is being written, so a slow disk shows the same way.)

* **Throttled** (the first level): once the batch waiting for the commit reaches the budget, the
  edge stops reading from each connection whose read brought load (messages, receipts, changes)
  into it, until the commit is written (docs/architecture.md, "Admission control"). Light connections — ``recv``,
  acks, ``ping`` — are read as always, so deliveries and keep-alives never wait behind senders.
* **Refusing** (the second level): when the overload lasted ``refuse_after_s`` (turns over the
  budget, never ``CALM_S`` apart), a ``msg`` beyond the budget of its turn is answered ``err
  overloaded`` with ``retry_after`` instead of being stored, and nothing is throttled any more:
  the gateway reads on, as a refusal costs a fraction of a stored message and what is refused no
  longer waits anywhere. What was admitted is stored and delivered as always: nothing acked is
  dropped. Both levels end after ``CALM_S`` without a turn over the budget.

Sans-I/O: the edge reports each turn's load with ``turn_ended(load, now)``; the domain asks
``refusal(pending_load)`` before it takes a ``msg``.
"""

from __future__ import annotations

import math

CALM_S = 1.0  # an overload ends after this long without a turn over the budget


class Admission:
    """The overload level, from the sizes of the turns' commits."""

    __slots__ = ("turn_budget", "refuse_after_s", "refusing", "refused", "_streak_since", "_last_over_at", "_turn_s")

    def __init__(self, *, turn_budget: int, refuse_after_s: float) -> None:
        self.turn_budget = turn_budget  # load per turn before throttling; 0: admission control off
        self.refuse_after_s = refuse_after_s
        self.refusing = False
        self.refused = 0  # messages refused since the last turn ended: offered, so they count
        self._streak_since: float | None = None  # when the current run of over-budget turns began
        self._last_over_at = 0.0
        self._turn_s = 0.0  # how long the last over-budget turn took (for retry_after)

    def configure(self, *, turn_budget: int, refuse_after_s: float) -> None:
        """New thresholds (a configuration reload); the current level is kept until the next turn."""
        self.turn_budget = turn_budget
        self.refuse_after_s = refuse_after_s

    def over_budget(self, pending_load: int) -> bool:
        """The batch waiting for the commit is at the budget."""
        return 0 < self.turn_budget <= pending_load

    def throttles(self, pending_load: int) -> bool:
        """Stop reading a connection whose read just brought load into a batch this large: at
        the first level only (refusing, the gateway reads on: a refusal costs a fraction of a
        stored message, and what is refused no longer waits anywhere)."""
        return not self.refusing and self.over_budget(pending_load)

    def level(self, now: float) -> int:
        """0 normal, 1 throttling (an overload under way), 2 refusing new messages."""
        self._expire(now)
        return 2 if self.refusing else (1 if self._streak_since is not None else 0)

    def _expire(self, now: float) -> None:
        """End an overload that had no turn over the budget for ``CALM_S``: turns end only with
        commits, and with no traffic there are none to end it."""
        if self._streak_since is not None and now - self._last_over_at > CALM_S:
            self._streak_since = None
            self.refusing = False

    def turn_ended(self, load: int, now: float) -> None:
        """A turn's batch of ``load`` is being committed. The turn's measure is what it was
        offered: its load and the messages refused in it (else refusing would end the overload
        that makes it refuse). Only a calm second ends an overload (``_expire``): turns under the
        budget in between are what the levels themselves bring about."""
        offered, self.refused = load + self.refused, 0
        self._expire(now)
        if not self.over_budget(offered):
            return
        if self._streak_since is None:
            self._streak_since = now  # a new overload
            self._turn_s = 0.0
        else:
            self._turn_s = now - self._last_over_at
        self._last_over_at = now
        if now - self._streak_since >= self.refuse_after_s:
            self.refusing = True

    def refusal(self, pending_load: int, now: float) -> int:
        """0 to admit a new ``msg``; otherwise the ``retry_after`` (ms) of its ``overloaded``
        answer (counted as refused): two turns at the pace of the last one, in steps of 10 ms, at
        least 10 ms."""
        if not self.over_budget(pending_load):
            return 0
        self._expire(now)
        if not self.refusing:
            return 0
        self.refused += 1
        return self.retry_after_ms()

    def retry_after_ms(self) -> int:
        """The ``retry_after`` of an ``overloaded`` answer: two turns at the pace of the last one."""
        return 10 * max(1, math.ceil(200 * self._turn_s))
