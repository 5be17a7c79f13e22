"""The report of ``interlink load``: the JSON-ready dict every kind shares the frame of, and its text.

``report_head`` (tool, version, scenario, environment, gateway) and ``report_tail`` (latency
percentiles, the encoded HDR histograms that ``interlink load-merge`` adds up, errors, the loss
accounting, the per-second timeline, wall-clock times and the verdict ``ok``) frame what each kind
measures in between. ``format_report`` prints it; its parts (``latency_lines``, ``server_lines``,
``outcome_lines``) also print merged reports; ``media_lines`` prints the media kind's figures.
``write_json`` writes it for ``--json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import uvloop
from hdrh.histogram import HdrHistogram

import interlink
import interlink.core
from interlink.core.errors import ConfigError
from interlink.load.accounting import histograms_section, percentiles_ms
from interlink.load.e2ee import format_e2ee
from interlink.load.scenario import Scenario

__all__ = ["decode_histogram", "environment", "format_report", "gateway_info", "latency_lines", "media_lines",
           "outcome_lines", "report_head", "report_tail", "server_lines", "write_json"]


def report_head(scenario: Scenario, gateway_info: dict) -> dict:
    """The report keys every scenario starts with: the tool, the scenario, where it ran."""
    return {
        "tool": "interlink load",
        "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario),
        "environment": environment(),
        "gateway": gateway_info,
    }


def report_tail(run, accounting: dict, ticker) -> dict:
    """The report keys every scenario shares: latency percentiles, the encoded HDR histograms
    (mergeable across load processes), errors, the loss accounting, the timeline, the verdict."""
    return {
        "latency_ms": {"ack": percentiles_ms(run.ack_hist), "delivery": percentiles_ms(run.delivery_hist)},
        "histograms": histograms_section(ack=run.ack_hist.encode().decode("ascii"),
                                         delivery=run.delivery_hist.encode().decode("ascii")),
        "errors": {"by_code": dict(run.errors), "sessions_ended": dict(run.sessions_ended), "stray_stanzas": run.stray},
        "accounting": accounting,
        "timeline": ticker.timeline,
        "wall_clock": _wall_clock(run, ticker),
        "ok": accounting["unexplained"] == 0,
    }


def _wall_clock(run, ticker) -> dict:
    """When the run started and began measuring (after its warm-up), in wall-clock seconds since
    the epoch: ``interlink load-merge`` finds the window in which several runs overlapped."""
    measured_from = None
    if 0 < run.record_from_ns < 1 << 63:  # set by the kinds with a warm-up (perf_counter_ns)
        measured_from = round(time.time() - (time.perf_counter_ns() - run.record_from_ns) / 1e9, 3)
    return {"started_s": ticker.started_wall_s, "measured_from_s": measured_from}


def environment() -> dict:
    return {
        "implementation": interlink.core.IMPLEMENTATION, "python": platform.python_version(), "uvloop": uvloop.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.system(),
    }


def gateway_info(gateway, scenario: Scenario, kill_at_s: float | None, gateway_cpu: int | None, run) -> dict:
    """The report's ``gateway``: where the run went, and for a local gateway its starts and kills."""
    if gateway.remote:
        return {"target": gateway.target, "providers": gateway.provider_ids, "stale_items_drained_before": run.stale}
    return {
        "target": "local", "providers": {pid: issuer.issuer for pid, issuer in gateway.issuers.items()},
        "durability": scenario.durability, "pid": gateway.pid, "starts": gateway.starts, "kills": gateway.kills,
        "killed_at_s": kill_at_s, "cpu_pinned": gateway_cpu,
    }


def decode_histogram(encoded: str) -> HdrHistogram:
    """A histogram from a JSON report (to merge several: ``merged.add(decode_histogram(...))``)."""
    return HdrHistogram.decode(encoded)


def format_report(report: dict) -> str:
    """The human-readable final report."""
    scenario = report["scenario"]
    lines = [
        f"scenario {scenario['name']} ({scenario['kind']}): {scenario['users']} users x {scenario['devices']} devices, "
        f"{scenario['providers']} providers, rate {scenario['rate'] or 'max'}, payload {scenario['payload']} B, "
        f"durability {scenario['durability']}{', over WebSocket' if scenario.get('transport') == 'ws' else ''}; "
        f"{report['environment']['implementation']}, Python {report['environment']['python']}",
    ]
    group = report.get("group")
    if group:
        lines.append(
            f"group: {group['members']} members, {group['devices']} devices ({group['offline_devices']} offline), "
            f"{group['senders']} senders, {group['copies_per_message']} copies per message; accounting counts copies "
            f"(one per message and member device): {report['accounting']['messages']}"
        )
    throughput = ", ".join(f"{k} {v}/s" for k, v in report["throughput_per_s"].items())
    lines.append(f"throughput ({report['window_s']} s): {throughput}")
    lines.extend(latency_lines(report))
    lines.extend(server_lines(report))
    if report.get("media"):
        lines.extend(media_lines(report))
    if "e2ee" in report:
        lines.append(format_e2ee(report["e2ee"]))
    lines.extend(outcome_lines(report))
    return "\n".join(lines)


def latency_lines(report: dict) -> list[str]:
    """The HDR percentiles of each latency (also for merged reports: ``interlink.load.view``)."""
    return [
        f"{name} latency ms: " + "  ".join(f"{k} {values[k]}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        + f"  (n={values['count']})"
        for name, values in report["latency_ms"].items() if values
    ]


def server_lines(report: dict) -> list[str]:
    """The gateway's CPU, run-queue wait and RSS (one line per phase); none for a remote gateway."""
    lines = []
    server = report["server"]
    for label, figures in (server.items() if "store" in server else [("", server)]):
        if report.get("gateway", {}).get("target", "local") != "local":
            lines.append(f"server{' ' + label if label else ''}: remote gateway {report['gateway']['target']}, no CPU or "
                         f"memory figures (load process busy {figures.get('load_process_cpu_busy')})")
            continue
        per = next(((k, v) for k, v in figures.items() if k.startswith("cpu_us_per_")), (None, None))
        lines.append(
            f"server{' ' + label if label else ''}: {per[1]} µs CPU per {per[0][len('cpu_us_per_'):].replace('_', ' ')}, "
            f"busy {figures['cpu_busy']} (run-queue wait {figures.get('runqueue_wait_s')} s; load process busy "
            f"{figures.get('load_process_cpu_busy')}), RSS {figures['rss_bytes'] / 2**20:.1f} MiB (peak {figures['rss_peak_bytes'] / 2**20:.1f} MiB)"
        )
    return lines


def media_lines(report: dict) -> list[str]:
    """The media kind's figures (``report["media"]``): its clients, MB/s each way over the
    window, blobs completed, the time from the last chunk to ready, its errors."""
    media = report["media"]
    rate = media["blob_kib_per_s_per_user"]
    lines = [
        f"media{'' if media['chat'] else ' only (no chat)'}: {media['uploaders']} uploaders, {media['downloaders']} "
        f"downloaders, blobs of {media['blob_mib']:g} MiB (chunks {media['chunk_bytes']} B, {media['in_flight']} in flight); "
        f"blob rate per user: {rate if isinstance(rate, str) else f'{rate} KiB/s'}",
        f"media ({media['window_s']} s{', beside the chat' if media['chat'] else ''}): upload {media['upload_mb_per_s']} MB/s, "
        f"download {media['download_mb_per_s']} MB/s; blobs completed {media['blobs_completed']}, downloads completed "
        f"{media['downloads_completed']}",
    ]
    ready = media["ready_after_last_chunk_ms"]
    lines.append(
        "media: ready after the last chunk "
        + (f"p50 {ready['p50']} ms, max {ready['max']} ms (n={ready['count']})" if ready else "(no blob completed in the window)")
        + f"; errors by code: {media['errors_by_code'] or 'none'}; downloads checked byte for byte: "
        + (f"{media['mismatched_chunks']} chunks DIFFER" if media["mismatched_chunks"] else "all equal")
    )
    if media["chat"] and report.get("gateway", {}).get("target", "local") == "local":
        lines.append("(the server's CPU above is the chat's and the media's together)")
    return lines


def outcome_lines(report: dict) -> list[str]:
    """Errors by code, the loss accounting and the verdict."""
    errors = report["errors"]
    lines = [f"errors by code: {errors.get('by_code') or 'none'}; sessions ended: {errors.get('sessions_ended') or 'none'}"]
    a = report["accounting"]
    lines.append(
        f"accounting: sent {a['sent']} = delivered {a['delivered']} + in mailbox {a['in_mailbox']} + refused {a['refused']} "
        f"+ delivered unacked {a['delivered_unacked']} + unacked/lost in flight {a['unacked_in_flight']} "
        f"+ UNEXPLAINED {a['lost'] + a['unanswered'] + a['refused_but_delivered']}"
    )
    lines.append(
        f"  lost {a['lost']}, unanswered {a['unanswered']}, duplicates {a['duplicates']}, misdelivered {a['misdelivered']} "
        f"(redelivered after reconnect {a['redelivered']}, dup acks {a['dup_acks']})"
    )
    if report.get("stress"):  # churn, handshake-storm, malformed-mix: their own figures and verdicts
        lines.extend(stress_lines(report))
    for why in (report.get("media") or {}).get("failed_because", []):
        lines.append(f"FAILED: {why}")
    e2ee_failures = report.get("e2ee", {}).get("failures", 0)
    restart = (report.get("group") or {}).get("restart")
    if restart is not None:
        lines.append(f"group after the restart: {restart['group_members']} members read back"
                     + ("" if restart["group_intact"] else ", NOT the members it was made with"))
    lines.append("result: OK" if report["ok"] else f"result: FAILED, {a['unexplained']} unexplained"
                 + (f", {e2ee_failures} E2EE failures" if e2ee_failures else "")
                 + (", the group did not survive the restart" if restart is not None and not restart["group_intact"] else ""))
    return lines



def stress_lines(report: dict) -> list[str]:
    """The lines of the stress kinds' own figures and verdicts (``report["stress"]``)."""
    stress = report["stress"]
    lines = []
    churn, storm, malformed = stress.get("churn"), stress.get("storm"), stress.get("malformed")
    if churn:
        lines.append(
            f"churn: {churn['churning_devices']} churning devices, {churn['kept_devices']} kept; {churn['connects']} "
            f"connects ({churn['messages_per_session']} messages each), connect failures "
            f"{churn['connect_failures'] or 'none'}, not started (no idle device) {churn['not_started']}"
        )
    if storm:
        lines.append(
            f"storm: {storm['handshakes']} handshakes + auths ({storm['closed']} closed, {storm['kept']} kept) over "
            f"{storm['identities']} identities; failures {storm['failures_by_code'] or 'none'}; not started "
            f"{storm['not_started']}, identities exhausted {storm['identities_exhausted']}"
        )
        lines.append(
            f"storm: one gateway core at this cost: {storm['handshakes_per_core_s']} handshakes/s "
            f"(goal {storm['goal_handshakes_per_s_per_core']})"
        )
    if malformed:
        lines.append(
            f"malformed: {malformed['inputs']} inputs (share {malformed['share_sent']}, wanted "
            f"{malformed['share_wanted']}) on {malformed['connections']} connections ({malformed['sessions']} sessions): "
            f"{malformed['as_contract']} answered as the contract says, {malformed['mismatches']} MISMATCHES"
        )
        lines.append(f"malformed answers: {malformed['answers_by_code']}")
        for mismatch in malformed["first_mismatches"][:5]:
            lines.append(f"  mismatch {mismatch['case']}: {mismatch['problem']}")
    for why in stress.get("failed_because", []):
        lines.append(f"FAILED: {why}")
    return lines


def write_json(report: dict, json_path: Path | None) -> None:
    """``--json PATH``: the report as JSON (histograms encoded, the timeline with wall-clock times)."""
    if json_path is None:
        return
    try:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the report {json_path}: {exc}") from exc

