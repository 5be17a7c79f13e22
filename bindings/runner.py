"""``interlink serve``: runs one gateway as a service, with the signal handling and logging an
embedding program would choose for itself (the library installs neither).

SIGTERM and SIGINT drain: no new connections, ``bye drain`` to every session, batched commits
flushed, LMDB closed, exit 0 within ``drain_timeout_s``. A cluster node that finds another
process of its node id started earlier (a twin, ``Gateway.failure``) drains the same way and
exits 1. SIGHUP re-reads the configuration file
and applies its providers (added, changed, removed, suspended) and the limits a running gateway
can change (``interlink.gateway.RELOADABLE``); a file that no longer validates is refused with a
log line and nothing changes. Other settings take effect at the next start (logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

import uvloop

from interlink.config import GatewayConfig, load_config
from interlink.core.errors import InterlinkError
from interlink.gateway import Gateway

log = logging.getLogger("interlink.serve")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (Unix seconds), ``level``, ``logger``, ``msg`` (and ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(log_format: str, level: str) -> None:
    """Log lines to stderr, as text or JSON lines, from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve_forever(config: GatewayConfig, path: Path | None) -> None:
    """Run the gateway under uvloop until SIGTERM or SIGINT, then drain."""
    uvloop.run(_serve(config, path))


async def _serve(config: GatewayConfig, path: Path | None) -> None:
    loop = asyncio.get_running_loop()
    gateway = Gateway(config)
    await gateway.start()
    host, port = gateway.address
    # Plain lines on stdout for whoever started us (scripts, tests, systemd's journal).
    print(f"listening on {host}:{port}", flush=True)
    print(f"root public key (clients pin this): {gateway.root_public.hex()}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, gateway, path)
    signalled, failed = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gateway.wait_failed())
    try:
        await asyncio.wait((signalled, failed), return_when=asyncio.FIRST_COMPLETED)
        if gateway.running:
            log.info("draining: no new connections, bye drain to %d sessions", len(gateway.sessions()))
        await gateway.drain()  # after the gateway's own, when it stopped by itself
        log.info("stopped")
        failure = gateway.failure
        if failure is not None:
            raise InterlinkError(f"stopped: {failure}")  # exit 1: a service manager must not count this a success
    finally:
        for task in (signalled, failed):
            task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _reload(gateway: Gateway, path: Path | None) -> None:
    if path is None:
        log.info("SIGHUP: no configuration file to re-read (started with the defaults)")
        return
    try:
        config = load_config(path)
    except InterlinkError as exc:
        log.error("SIGHUP: configuration refused, nothing changed: %s", exc)
        return
    asyncio.ensure_future(_apply(gateway, config))


async def _apply(gateway: Gateway, config: GatewayConfig) -> None:
    try:
        result = await gateway.reload(config)
    except InterlinkError as exc:
        log.error("SIGHUP: configuration refused, nothing changed: %s", exc)
        return
    changes = result["providers"]
    log.info(
        "SIGHUP: providers reloaded (added %s, updated %s, removed %s); limits applied: %s; need a restart: %s",
        changes["added"] or "none", changes["updated"] or "none", changes["removed"] or "none",
        ", ".join(result["applied"]) or "none", ", ".join(result["restart_needed"]) or "none",
    )
