"""The loss accounting (``interlink.load.accounting``): every message, and every group copy,
classified from stand-in sessions (only whether and why a session closed matters here)."""

from __future__ import annotations

import pytest

from interlink.load.accounting import ACKED, REFUSED, SENT, GroupMsg, Msg, Run, account, account_group
from interlink.load.report import format_report

from .helpers import StandInSession, scenario


def test_accounting_flags_unexplained_messages() -> None:
    run = Run(scenario("chat-1to1", users=2))

    live, dead = StandInSession(None), StandInSession("connection_lost")

    def add(key: bytes, peer, state=0, delivered=(), code="") -> Msg:
        msg = Msg(peer, "u1@pb", (1, 2), 0)
        msg.state, msg.code = state, code
        msg.delivered = {device: 1 for device in delivered}
        run.ledger[("u0@pa", key)] = msg
        return msg

    add(b"a", live, ACKED, (1, 2))  # delivered
    add(b"b", live, ACKED, (1,))  # acked, one device never got it: lost
    add(b"c", live)  # no answer on a live session: unanswered
    add(b"d", dead)  # no answer, session died: in flight
    add(b"e", dead, delivered=(1, 2))  # stored and delivered, ack lost with the session
    add(b"f", live, REFUSED, code="mailbox_full")
    add(b"g", live, REFUSED, (1,), code="internal")  # refused yet delivered
    add(b"h", live, ACKED, (1, 2)).drained = {2}  # found in the mailbox after the run
    run.duplicates = 1
    accounting = account(run)
    assert accounting == accounting | {
        "sent": 8, "delivered": 1, "lost": 1, "unanswered": 1, "unacked_in_flight": 1, "delivered_unacked": 1,
        "refused": 1, "refused_by_code": {"mailbox_full": 1}, "refused_but_delivered": 1, "in_mailbox": 1,
        "duplicates": 1, "unexplained": 1 + 1 + 1 + 1,
    }
    report = {"scenario": {"name": "x", "kind": "chat", "users": 2, "devices": 2, "providers": 2, "rate": None,
                           "payload": 100, "durability": "sync"},
              "environment": {"implementation": "cython", "python": "3.11"}, "window_s": 1.0,
              "throughput_per_s": {"sent": 1.0}, "latency_ms": {"ack": None, "delivery": None},
              "server": {"cpu_us_per_delivery": 1.0, "cpu_busy": 0.1, "rss_bytes": 1 << 20, "rss_peak_bytes": 1 << 20},
              "errors": {"by_code": {}, "sessions_ended": {}}, "accounting": accounting, "ok": False}
    assert "FAILED, 4 unexplained" in format_report(report)


def test_group_accounting_classifies_copies() -> None:
    run = Run(scenario("group-fanout", members=4))

    live, dead = StandInSession(None), StandInSession("connection_lost")
    everyone = 0b1110  # the copies of a message from device 0 to devices 1..3

    def add(key: bytes, peer, state=0, delivered=0, drained=0, code="") -> None:
        msg = GroupMsg(peer, 0, everyone)
        msg.state, msg.code, msg.delivered, msg.drained = state, code, delivered, drained
        run.ledger[("u0@pa", key)] = msg

    add(b"a", live, ACKED, 0b1110)  # 3 delivered
    add(b"b", live, ACKED, 0b0110, 0b1000)  # 2 delivered, 1 in a mailbox
    add(b"c", live, ACKED, 0b0010)  # 2 lost
    add(b"d", live, REFUSED, code="not_member")  # 3 refused
    add(b"e", dead)  # 3 in flight
    add(b"f", live)  # 3 unanswered
    accounting = account_group(run)
    assert accounting == accounting | {
        "sent": 18, "delivered": 6, "in_mailbox": 1, "lost": 2, "refused": 3, "refused_by_code": {"not_member": 3},
        "unacked_in_flight": 3, "unanswered": 3, "unexplained": 5,
    }
    assert accounting["messages"] == {"sent": 6, "acked": 3, "refused": 1, "unacked": 1, "unanswered": 1}


@pytest.mark.parametrize("reason", [None, "client_closed"])
def test_delivered_but_never_acked_on_a_session_the_gateway_did_not_end_is_unexplained(reason) -> None:
    """``delivered_unacked`` means "its ack was lost with the session" (interlink.load.accounting). A
    message delivered everywhere whose ack never came on a session the gateway kept open (or that
    we closed ourselves after the tail or churn wait) is a missing answer, not an explained fate."""
    run = Run(scenario("chat-1to1", users=2))
    msg = Msg(StandInSession(reason), "u1@pb", (1,), 0)
    msg.state, msg.delivered = SENT, {1: 1}
    run.ledger[("u0@pa", b"x" * 16)] = msg
    accounting = account(run)
    assert accounting["delivered_unacked"] == 0 and accounting["unanswered"] == 1, accounting
    assert accounting["unexplained"] == 1

    group_run = Run(scenario("group-fanout", members=2, senders=1))
    group_msg = GroupMsg(StandInSession(reason), 0, 0b10)
    group_msg.delivered = 0b10
    group_run.ledger[("u0@pa", b"y" * 16)] = group_msg
    group_accounting = account_group(group_run)
    assert group_accounting["delivered_unacked"] == 0 and group_accounting["unexplained"] == 1, group_accounting


def _add(run: Run, key: bytes, peer, *, state=0, delivered=0, drained=0) -> None:
    msg = GroupMsg(peer, 0, 0b1110)  # a message from device 0 to devices 1..3
    msg.state, msg.delivered, msg.drained = state, delivered, drained
    run.ledger[("u0@pa", key)] = msg


def test_unacked_copies_of_a_dead_session_are_all_present_or_all_absent() -> None:
    """The gateway stores a group message's copies in one transaction before its ack: when the
    sender's session died without an ack, some copies present and others not is unexplained."""
    run = Run(scenario("group-fanout", members=4))
    dead, live = StandInSession("connection_lost"), StandInSession(None)
    _add(run, b"all", dead, delivered=0b0110, drained=0b1000)  # stored, ack lost: 3 delivered unacked
    _add(run, b"none", dead)  # never stored: 3 in flight
    _add(run, b"some", dead, delivered=0b0010)  # 1 of 3 delivered
    _add(run, b"some-drained", dead, drained=0b1100)  # 2 of 3 found in mailboxes
    _add(run, b"acked", live, state=ACKED, delivered=0b1110)
    accounting = account_group(run)
    assert accounting == accounting | {
        "sent": 15, "delivered": 3, "delivered_unacked": 3, "unacked_in_flight": 3, "unacked_partial": 6,
        "unanswered": 6, "lost": 0, "unexplained": 6,
    }
    assert accounting["messages"] == {"sent": 5, "acked": 1, "unacked": 2, "unacked_partial": 2}

    # Partly delivered without an ack on a session that stayed up is unanswered, not "partial".
    kept = Run(scenario("group-fanout", members=4))
    _add(kept, b"x", live, delivered=0b0010)
    accounting = account_group(kept)
    assert accounting["unanswered"] == 3 and accounting["unacked_partial"] == 0 and accounting["unexplained"] == 3
