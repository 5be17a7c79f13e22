"""``interlink load``: run one scenario (any kind, optionally its NATS or JetStream peer after it)
and print and write its report.

    interlink load chat-1to1 --users 16 --rate 5000 --duration 10 --json report.json
    interlink load chat-1to1 --rate max                 # closed loop: the maximum
    interlink load offline-drain --messages 20000       # store while offline, then drain
    interlink load group-fanout --members 1024 --peer nats
    interlink load chat-1to1 --target gw.example:7450 --root-public HEX --tokens users.txt
    interlink load media --duration 5                   # blobs up and down beside the chat traffic

``run_scenario`` sends a scenario to its kind's runner (``chat``, ``group``, ``stress``, ``media``); ``main``
is the command behind the options of ``interlink.cli``: 0 when every message is accounted for,
1 otherwise. With two or more CPUs the local gateway is pinned to CPU 0 and this process to CPU 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from interlink.core.errors import ConfigError
from interlink.load import nats
from interlink.load.chat import run_chat
from interlink.load.group import run_group
from interlink.load.media import run_media
from interlink.load.progress import choose_progress
from interlink.load.report import format_report, write_json
from interlink.load.runner import refuse_remote_kill
from interlink.load.scenario import KIND_KEYS, STRESS_KINDS, Scenario, find_scenario, load_scenario
from interlink.load.stress import run_stress
from interlink.load.target import RemoteGateway
from interlink.load.view import require_matplotlib, write_png

__all__ = ["main", "run_scenario"]


async def run_scenario(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                       kill_at_s: float | None = None, pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """Run one scenario of any kind against a local gateway (or ``target``, a remote one); the
    report (a JSON-ready dict, ``ok`` False when any message is unexplained)."""
    scenario.validate()
    refuse_remote_kill(target, kill_at_s)
    if scenario.kind == "group":
        return await run_group(scenario, data_dir=data_dir, out=out, pin=pin, target=target, kill_at_s=kill_at_s)
    if scenario.kind in STRESS_KINDS:
        if kill_at_s is not None:
            raise ConfigError(f"--kill-at is not supported by the {scenario.kind} scenario")
        return await run_stress(scenario, data_dir=data_dir, out=out, pin=pin, target=target)
    if scenario.kind == "media":
        if kill_at_s is not None:
            raise ConfigError("--kill-at is not supported by the media scenario")
        return await run_media(scenario, data_dir=data_dir, out=out, pin=pin, target=target)
    return await run_chat(scenario, data_dir=data_dir, out=out, kill_at_s=kill_at_s, pin=pin, target=target)


def main(scenario_name: str = "chat-1to1", *, json_path: Path | None = None, png_path: Path | None = None,
         kill_at_s: float | None = None, pin: bool = True, quiet: bool = False, data_dir: Path | None = None, peer: str | None = None,
         only_peer: bool = False, target: str | None = None, root_public: str | None = None,
         tokens: Path | None = None, **overrides: Any) -> int:
    """The ``interlink load`` command: 0 when every message is accounted for, 1 otherwise.

    ``peer="nats"`` (or ``"jetstream"``; chat and group kinds): after the Interlink run, the same pattern
    against a local nats-server (``interlink.load.nats``), and both side by side (``report["peer"]``,
    ``report["comparison"]``); ``only_peer``: the peer alone.
    ``target``: a remote gateway (with ``root_public`` and a ``tokens`` file, see ``RemoteGateway``).
    ``png_path``: the plots (``interlink.load.view.write_png``; needs matplotlib, checked first)."""
    if png_path is not None:
        require_matplotlib()
    remote = None
    if target is not None or root_public is not None or tokens is not None:
        if target is None or root_public is None or tokens is None:
            raise ConfigError("a remote gateway needs --target host:port, --root-public HEX and --tokens FILE")
        if peer is not None or only_peer:
            raise ConfigError("--peer compares server CPU, which a remote gateway does not let us read")
        remote = RemoteGateway(target, root_public, tokens)

    if only_peer and peer is None:
        peer = "nats"
    if peer is not None:
        nats.check_peer(peer)

    connections = overrides.pop("connections", None)
    if connections is not None and overrides.get("users") is not None:
        raise ConfigError("give --connections or --users, not both (--connections sets the users)")
    scenario = load_scenario(find_scenario(scenario_name), **overrides)
    if connections is not None and "users" not in KIND_KEYS[scenario.kind]:
        raise ConfigError(f"scenario {scenario.name!r}: connections is not used by the {scenario.kind} kind "
                          "(its sessions are its members' devices: --members, --devices)")
    if connections is not None:  # sessions in total: users = connections / devices per user
        scenario.users = max(2, math.ceil(connections / scenario.devices))
        scenario.validate()

    out = choose_progress(quiet=False)  # a rich live table when stdout is a terminal, else plain lines

    if peer is not None:
        nats.check_peer(peer, scenario.kind)
        if scenario.e2ee:
            # The peer sends random bytes; E2EE would load the Interlink side's clients only and skew the ratio.
            raise ConfigError("--peer compares the servers with the same random payloads: run it without --e2ee")
        nats.nats_server_path()  # fail before the Interlink run when the peer is not installed
    if only_peer:
        report = uvloop.run(nats.run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin, peer=peer))
        print(nats.format_nats_report(report), flush=True)
        name = "JetStream" if peer == "jetstream" else "NATS"
        print(f"{name} does not do here: " + "; ".join(report["does_not"]), flush=True)
    else:
        report = uvloop.run(run_scenario(scenario, data_dir=data_dir, out=None if quiet else out, kill_at_s=kill_at_s,
                                         pin=pin, target=remote))
        print(format_report(report), flush=True)
        if peer is not None:
            nats_report = uvloop.run(nats.run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin,
                                                   peer=peer))
            print(nats.format_nats_report(nats_report), flush=True)
            report["peer"] = nats_report
            report["comparison"] = nats.compare(report, nats_report)
            report["ok"] = report["ok"] and nats_report["ok"]
            print(nats.format_comparison(report["comparison"]), flush=True)
    write_json(report, json_path)
    if png_path is not None:
        print(f"plots: {write_png(report, png_path)}", flush=True)
    return 0 if report["ok"] else 1

