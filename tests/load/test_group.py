"""The group kind (``interlink.load.group``): a small fan-out against a real local gateway (child
process, demo OpenID issuers, Noise over loopback TCP), the gateway SIGKILLed mid-fan-out and
restarted with every (message, member device) copy classified, and how a member device tells a
redelivery from a duplicate."""

from __future__ import annotations

import json

from interlink.load.accounting import ACKED, GroupMsg, Run, account_group
from interlink.load.group import GroupDevice, run_group
from interlink.load.report import format_report

from .helpers import REPORT_KEYS, StandInSession, scenario


async def test_group_fanout_smoke() -> None:
    """A small group with offline members and two devices per member: every copy (message x member
    device) delivered, or found in an offline device's mailbox after the run."""
    lines: list[str] = []
    group = scenario("group-fanout", members=12, devices=2, senders=2, offline=0.2, inflight=4, duration=1.5, warmup=0.3)
    report = json.loads(json.dumps(await run_group(group, out=lines.append)))
    assert REPORT_KEYS <= report.keys() and report["ok"] is True
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0, accounting
    info = report["group"]
    assert info == info | {"members": 12, "devices": 24, "offline_members": 2, "offline_devices": 4, "senders": 2,
                           "copies_per_message": 23}
    messages = accounting["messages"]
    assert messages["sent"] == messages["acked"] == report["counts"]["sent"] > 0
    assert accounting["sent"] == 23 * messages["sent"]
    assert accounting["delivered"] == 19 * messages["sent"] and accounting["in_mailbox"] == 4 * messages["sent"]
    assert accounting["delivered"] + accounting["in_mailbox"] == accounting["sent"]
    assert accounting["accounting_drain"]["devices_reconnected"] == 4
    assert report["server"]["cpu_us_per_durable_delivery"] > 0 and report["throughput_per_s"]["durable_deliveries"] > 0
    assert report["latency_ms"]["delivery"]["count"] > 0 and report["latency_ms"]["ack"]["p99"] > 0
    assert any(" group " in line for line in lines)
    assert "group: 12 members" in format_report(report)


SENDERS, INFLIGHT, MEMBERS, OFFLINE_MEMBERS = 2, 4, 20, 4


async def test_group_gateway_killed_mid_fanout_loses_no_acked_copy() -> None:
    lines: list[str] = []
    group = scenario("group-fanout", members=MEMBERS, senders=SENDERS, offline=0.2, inflight=INFLIGHT,
                     duration=2.5, warmup=0.3)
    report = json.loads(json.dumps(await run_group(group, out=lines.append, kill_at_s=1.0)))
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
    text = format_report(report)
    assert f"group after the restart: {MEMBERS} members read back" in text and "result: OK" in text
    lost_group = json.loads(json.dumps(report))
    lost_group["group"]["restart"].update(group_intact=False, group_members=0)
    lost_group["ok"] = False
    assert "the group did not survive the restart" in format_report(lost_group)

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
    accounting = account_group(run)
    assert run.device_deliveries == 1 and accounting["delivered"] == 1 and accounting["unexplained"] == 2, accounting
