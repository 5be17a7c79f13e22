"""``interlink load group-fanout --kill-at S`` (issue 7): the gateway SIGKILLed mid-fan-out and
restarted on the same data and port (a real child process, demo OpenID issuers, Noise over
loopback TCP), every (message, member device) copy classified; and the group accounting's rules
for a killed session (all copies or none) and for repeats (same seq on a later session: a
redelivery; another seq: a duplicate), with stand-in data as test_load_review does."""

from __future__ import annotations

import json

from load_helpers import StandInSession, scenario
from interlink import loadtool
from interlink.loadtool import (
    ACKED,
    GroupDevice,
    GroupMsg,
    Run,
)

SENDERS, INFLIGHT, MEMBERS, OFFLINE_MEMBERS = 2, 4, 20, 4


async def test_group_gateway_killed_mid_fanout_loses_no_acked_copy() -> None:
    lines: list[str] = []
    group = scenario("group-fanout", members=MEMBERS, senders=SENDERS, offline=0.2, inflight=INFLIGHT,
                     duration=2.5, warmup=0.3)
    report = json.loads(json.dumps(await loadtool.run_scenario(group, out=lines.append, kill_at_s=1.0)))
    accounting, info = report["accounting"], report["group"]
    assert accounting["unexplained"] == 0 and report["ok"] is True, accounting
    assert info["offline_devices"] == OFFLINE_MEMBERS and info["copies_per_message"] == MEMBERS - 1

    # The restart, reported as the chat kind does (the gateway's starts and kills, the lines).
    assert report["gateway"] == report["gateway"] | {"kills": 1, "starts": 2, "killed_at_s": 1.0}
    assert any("SIGKILLed" in line for line in lines) and any("restarted" in line for line in lines)
    online = MEMBERS - OFFLINE_MEMBERS
    ended = report["errors"]["sessions_ended"]
    assert ended.get("connection_lost", 0) + ended.get("peer_closed", 0) >= online
    # The membership made before the window survived it.
    restart = info["restart"]
    assert restart["group_intact"] is True and restart["group_members"] == MEMBERS, restart
    text = loadtool.format_report(report)
    assert f"group after the restart: {MEMBERS} members read back" in text and "result: OK" in text
    lost_group = json.loads(json.dumps(report))
    lost_group["group"]["restart"].update(group_intact=False, group_members=0)
    lost_group["ok"] = False
    assert "the group did not survive the restart" in loadtool.format_report(lost_group)

    # Copies are classified after the kill too: traffic went on, and every acked message (before
    # and after the restart) has all its copies delivered or in a mailbox.
    messages = accounting["messages"]
    assert restart["acked_after"] > 0 and messages["acked"] == restart["acked_before"] + restart["acked_after"]
    copies = MEMBERS - 1
    assert accounting["lost"] == 0 and accounting["unanswered"] == 0 and accounting["unacked_partial"] == 0
    assert accounting["delivered"] + accounting["in_mailbox"] == messages["acked"] * copies
    assert accounting["in_mailbox"] >= OFFLINE_MEMBERS * messages["acked"]  # the offline members' copies
    # Closed loop: every sender had INFLIGHT messages without an answer when its session died;
    # each of them has all its copies (stored, ack lost) or none (never stored).
    assert messages["unacked"] == SENDERS * INFLIGHT, messages
    assert accounting["delivered_unacked"] + accounting["unacked_in_flight"] == messages["unacked"] * copies
    classes = ("delivered", "in_mailbox", "refused", "delivered_unacked", "unacked_in_flight")
    assert sum(accounting[name] for name in classes) == accounting["sent"] == messages["sent"] * copies


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
    accounting = loadtool.account_group(run)
    assert accounting == accounting | {
        "sent": 15, "delivered": 3, "delivered_unacked": 3, "unacked_in_flight": 3, "unacked_partial": 6,
        "unanswered": 6, "lost": 0, "unexplained": 6,
    }
    assert accounting["messages"] == {"sent": 5, "acked": 1, "unacked": 2, "unacked_partial": 2}

    # Partly delivered without an ack on a session that stayed up is unanswered, not "partial".
    kept = Run(scenario("group-fanout", members=4))
    _add(kept, b"x", live, delivered=0b0010)
    accounting = loadtool.account_group(kept)
    assert accounting["unanswered"] == 3 and accounting["unacked_partial"] == 0 and accounting["unexplained"] == 3


def test_repeated_copy_same_seq_on_a_new_session_is_a_redelivery_another_seq_a_duplicate() -> None:
    run = Run(scenario("group-fanout", members=2, senders=1))
    run.group_id, run.group_expected = b"g" * 16, 0b11
    msg = GroupMsg(StandInSession(None), 0, 0b10)
    msg.state = ACKED
    run.ledger[("u0@pa", b"m" * 16)] = msg
    device = GroupDevice(run, "u1", "pb", 1, 1)
    copy = {"t": "dlv", "k": "msg", "from": "u0@pa", "id": b"m" * 16, "g": b"g" * 16, "c": bytes(8)}

    device.sessions = 1
    device._on_delivery(copy | {"seq": 5})
    assert (run.device_deliveries, run.redelivered, run.duplicates) == (1, 0, 0)
    device._on_delivery(copy | {"seq": 5})  # pushed twice in one session: the gateway never does
    assert (run.redelivered, run.duplicates) == (0, 1)
    device.sessions = 2  # reconnected after the restart: pushed again with its seq
    device._on_delivery(copy | {"seq": 5})
    assert (run.redelivered, run.duplicates) == (1, 1)
    device._on_delivery(copy | {"seq": 9})  # stored a second time for this device
    assert (run.redelivered, run.duplicates) == (1, 2)
    accounting = loadtool.account_group(run)
    assert run.device_deliveries == 1 and accounting["delivered"] == 1 and accounting["unexplained"] == 2, accounting
