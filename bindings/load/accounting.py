"""The loss accounting of ``interlink load``: what one run counts, and the fate of every message.

``Run`` holds the counters, the HDR latency histograms (microseconds) and the ledger every
simulated device of a run writes to; ``Msg`` (1:1), ``GroupMsg`` and ``DistributionMsg`` (the
group kind) are its entries. ``account`` and ``account_group`` classify every message (group: every
message and member device copy) as delivered, in a mailbox after the run, refused with a code,
delivered or in flight with its ack lost with the session, or *unexplained*: lost, unanswered,
refused yet delivered, duplicated or misdelivered. A run with anything unexplained fails.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Protocol

from hdrh.histogram import HdrHistogram

if TYPE_CHECKING:
    from interlink.load.e2ee import E2EEStats
    from interlink.load.scenario import Scenario

__all__ = ["ACKED", "REFUSED", "SENT", "DistributionMsg", "GroupMsg", "Msg", "Run", "account", "account_group",
           "distribution_accounting", "new_histogram", "percentiles_ms", "record_latency"]

HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000  # one hour
HIST_DIGITS = 3
HISTOGRAM_ENCODING = "HdrHistogram V2 compressed, base64 (hdrh HdrHistogram.decode)"

SENT, ACKED, REFUSED = 0, 1, 2


class Session(Protocol):
    """What the accounting needs of a sending session: whether and why it closed."""

    close_reason: str | None

    @property
    def closed(self) -> bool: ...


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def record_latency(histogram: HdrHistogram, latency_ns: int) -> None:
    histogram.record_value(min(HIST_HIGHEST_US, max(HIST_LOWEST_US, latency_ns // 1000)))


def histograms_section(**encoded: str) -> dict:
    """The report's ``histograms``: how they are encoded, then each one (mergeable across runs)."""
    return {"unit": "us", "lowest": HIST_LOWEST_US, "highest": HIST_HIGHEST_US, "significant_figures": HIST_DIGITS,
            "encoding": HISTOGRAM_ENCODING, **encoded}


def percentiles_ms(histogram: HdrHistogram) -> dict | None:
    if histogram.get_total_count() == 0:
        return None
    result = {
        name: round(histogram.get_value_at_percentile(pct) / 1000, 3)
        for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
    }
    result["max"] = round(histogram.get_max_value() / 1000, 3)
    result["count"] = histogram.get_total_count()
    return result


class Msg:
    """One message sent: its fate, and its deliveries per recipient device."""

    __slots__ = ("peer", "to_user", "to_devices", "intended_ns", "state", "code", "delivered", "drained")

    def __init__(self, peer: Session, to_user: str, to_devices: tuple[int, ...], intended_ns: int) -> None:
        self.peer = peer  # the sending session (did it end before an answer?)
        self.to_user = to_user
        self.to_devices = to_devices
        self.intended_ns = intended_ns
        self.state = SENT
        self.code = ""
        self.delivered: dict[int, int] = {}  # recipient device -> seq of its first delivery
        self.drained: set[int] = set()  # devices that got it only in the accounting drain


class GroupMsg:
    """One group message: its fate, and which member devices (bits, by device index) got a copy."""

    __slots__ = ("peer", "intended_ns", "state", "code", "expected", "delivered", "drained", "firsts")

    def __init__(self, peer: Session, intended_ns: int, expected: int) -> None:
        self.peer = peer
        self.intended_ns = intended_ns
        self.state = SENT
        self.code = ""
        self.expected = expected  # every device of every member except the sending device
        self.delivered = 0  # bits of the devices that got it during the run
        self.drained = 0  # bits of the devices that got it only in the accounting drain
        self.firsts: dict[int, tuple[int, int]] = {}  # device index -> (seq, session) of its first copy


class DistributionMsg:
    """E2EE: one 1:1 message that hands a sender key to one member's devices (and, in the first
    one of a sender, to its own other devices in ``own``). Kept apart from the group messages."""

    __slots__ = ("code", "delivered", "drained", "expected", "peer", "repeats", "state")

    def __init__(self, peer: Session, expected: int) -> None:
        self.peer = peer
        self.state = SENT
        self.code = ""
        self.expected = expected  # bits (device indices) of the devices it has an envelope for
        self.delivered = 0  # bits of the devices that got it during the run
        self.drained = 0  # bits of the devices that got it only in the accounting drain
        self.repeats = 0  # pushed again on a later session (not decrypted again)


class Run:
    """Counters, histograms and the ledger shared by every device of one run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.ledger: dict[tuple[str, bytes], Msg | GroupMsg] = {}
        self.sent = self.acked = self.refused = 0
        self.delivered = 0  # messages delivered to every recipient device (first deliveries)
        self.device_deliveries = 0  # first deliveries to one device (a message to 2 devices: 2)
        self.redelivered = self.duplicates = self.misdelivered = self.dup_acks = self.stray = 0
        self.errors: collections.Counter = collections.Counter()  # every err stanza, by code
        self.sessions_ended: collections.Counter = collections.Counter()  # not closed by us
        self.ack_hist = new_histogram()
        self.delivery_hist = new_histogram()
        self.record_from_ns = 1 << 63  # latencies of messages meant to leave before this: warm-up
        self.record_delivery = True
        self.accounting = False  # deliveries now are found in mailboxes after the run
        self.sending = False  # closed loop: refill on answers
        self.budget: int | None = None  # messages left to send (offline-drain)
        self.predrain = False  # a remote gateway: taking what earlier runs left in the mailboxes
        self.stale = 0  # items of earlier runs found then (not part of this run's accounting)
        self.e2ee_stats: E2EEStats | None = None  # with e2ee on: the client's E2EE work
        self.group_id = b""  # the group kind: the one group, and the bits of all its member devices
        self.group_expected = 0
        self.distributions: dict[tuple[str, bytes], DistributionMsg] = {}  # the group kind with e2ee

    def take_budget(self) -> bool:
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


def session_lost(peer: Session | None) -> bool:
    """Whether the sender's session ended other than by our own close (the gateway closed it, was
    killed, or the connection broke): only then may a missing ack be explained by the session."""
    return peer is not None and peer.closed and peer.close_reason != "client_closed"


def account(run: Run) -> dict:
    """Classify every message sent; ``unexplained`` must be 0."""
    counts = collections.Counter()
    refused: collections.Counter = collections.Counter()
    for msg in run.ledger.values():
        full = len(msg.delivered) == len(msg.to_devices)
        if msg.state == REFUSED:
            if msg.delivered:
                counts["refused_but_delivered"] += 1
            else:
                refused[msg.code] += 1
        elif msg.state == ACKED:
            counts["lost" if not full else "in_mailbox" if msg.drained else "delivered"] += 1
        elif not session_lost(msg.peer):
            # No ack on a session the gateway kept open (or we closed after waiting): a gateway
            # that stores and delivers but never acks must not pass.
            counts["unanswered"] += 1
        elif full:
            counts["delivered_unacked"] += 1  # its ack was lost with the session
        elif not msg.delivered:
            counts["unacked_in_flight"] += 1
        else:
            counts["unanswered"] += 1  # half delivered, then the session ended
    unexplained = (
        counts["lost"] + counts["unanswered"] + counts["refused_but_delivered"] + run.duplicates + run.misdelivered
    )
    return {
        "sent": len(run.ledger),
        "delivered": counts["delivered"],
        "in_mailbox": counts["in_mailbox"],
        "refused": sum(refused.values()),
        "refused_by_code": dict(refused),
        "delivered_unacked": counts["delivered_unacked"],
        "unacked_in_flight": counts["unacked_in_flight"],
        "lost": counts["lost"],
        "unanswered": counts["unanswered"],
        "refused_but_delivered": counts["refused_but_delivered"],
        "duplicates": run.duplicates,
        "misdelivered": run.misdelivered,
        "redelivered": run.redelivered,
        "dup_acks": run.dup_acks,
        "unexplained": unexplained,
    }



def account_group(run: Run) -> dict:
    """Classify every (message, member device) copy; ``unexplained`` must be 0. The message-level
    fates are in ``messages``.

    The gateway stores all of a group message's copies in one transaction before its ack, so a
    message without an ack whose sender's session died (a killed gateway) has all its copies or
    none: all are ``delivered_unacked`` or all ``unacked_in_flight``. Some but not all present is
    unexplained (``unacked_partial``, counted in ``unanswered``)."""
    copies = collections.Counter()
    refused: collections.Counter = collections.Counter()
    messages = collections.Counter()
    for msg in run.ledger.values():
        expected = msg.expected.bit_count()
        delivered = (msg.delivered & ~msg.drained).bit_count()
        drained = msg.drained.bit_count()
        missing = expected - delivered - drained
        if msg.state == REFUSED:
            messages["refused"] += 1
            refused[msg.code] += expected - delivered - drained
            copies["refused_but_delivered"] += delivered + drained
        elif msg.state == ACKED:
            messages["acked"] += 1
            copies["delivered"] += delivered
            copies["in_mailbox"] += drained
            copies["lost"] += missing
        elif not session_lost(msg.peer):  # no ack on a session the gateway kept open (or we closed)
            messages["unanswered"] += 1
            copies["unanswered"] += expected
        elif missing == 0:
            messages["unacked"] += 1
            copies["delivered_unacked"] += expected  # stored; its ack was lost with the session
        elif not (delivered + drained):
            messages["unacked"] += 1
            copies["unacked_in_flight"] += expected  # never stored
        else:  # some copies stored and others not: the one-transaction promise broken
            messages["unacked_partial"] += 1
            copies["unacked_partial"] += expected
            copies["unanswered"] += expected
    unexplained = copies["lost"] + copies["unanswered"] + copies["refused_but_delivered"] + run.duplicates + run.misdelivered
    return {
        "unit": "copy: one (message, member device)",
        "sent": sum(msg.expected.bit_count() for msg in run.ledger.values()),
        "delivered": copies["delivered"],
        "in_mailbox": copies["in_mailbox"],
        "refused": sum(refused.values()),
        "refused_by_code": dict(refused),
        "delivered_unacked": copies["delivered_unacked"],
        "unacked_in_flight": copies["unacked_in_flight"],
        "lost": copies["lost"],
        "unanswered": copies["unanswered"],
        "unacked_partial": copies["unacked_partial"],  # of unanswered: an unacked message partly stored
        "refused_but_delivered": copies["refused_but_delivered"],
        "duplicates": run.duplicates,
        "misdelivered": run.misdelivered,
        "redelivered": run.redelivered,
        "dup_acks": run.dup_acks,
        "unexplained": unexplained,
        "messages": {"sent": len(run.ledger), **messages},
    }



def distribution_accounting(run: Run) -> dict:
    """E2EE: the fates of the sender key envelopes (one per distribution and device)."""
    distributions = run.distributions.values()
    envelopes = sum(d.expected.bit_count() for d in distributions)
    delivered = sum((d.delivered & ~d.drained).bit_count() for d in distributions)
    drained = sum(d.drained.bit_count() for d in distributions)
    refused = sum(d.expected.bit_count() for d in distributions if d.state == REFUSED)
    return {"messages": len(run.distributions), "envelopes": envelopes, "delivered": delivered, "in_mailbox": drained,
            "refused": refused, "missing": envelopes - delivered - drained - refused,
            "repeats": sum(d.repeats for d in distributions)}

