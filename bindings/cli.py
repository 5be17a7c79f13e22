"""The ``interlink`` command line.

Exit codes: 0 success, 1 operation failed or invalid configuration (message on stderr), 2 usage
error (click's).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

import interlink
from interlink.core.errors import ConfigError, InterlinkError

DEFAULT_KEYS_DIR = Path("interlink-data") / "keys"


@click.group()
@click.version_option(interlink.__version__, prog_name="interlink")
def main() -> None:
    """Interlink: the routing core for messaging interoperability."""


@main.command()
def version() -> None:
    """Show the version and whether the compiled hot paths and uvloop are active."""
    import interlink.core

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    click.echo(f"interlink {interlink.__version__}")
    click.echo(f"hot paths: {interlink.core.IMPLEMENTATION}")
    click.echo(f"event loop: {loop}")
    click.echo(f"python: {sys.version.split()[0]}")


@main.group()
def keys() -> None:
    """Operator identity: the root key clients pin and the node certificate it signs."""


@keys.command("init")
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=DEFAULT_KEYS_DIR, show_default=True)
@click.option("--node", default="node-1", show_default=True, help="node name written in the certificate")
@click.option("--valid-days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--force", is_flag=True, help="issue a new node key and certificate under the existing root")
def keys_init(folder: Path, node: str, valid_days: int, force: bool) -> None:
    """Generate the operator root key, a node static key and its certificate."""
    from interlink.core.edge.keyfiles import init_operator_keys

    keys_ = _run(lambda: init_operator_keys(folder, node, valid_days=valid_days, force=force))
    click.echo(f"keys written to {folder}")
    _show(keys_)


@keys.command("renew")
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=DEFAULT_KEYS_DIR, show_default=True)
@click.option("--valid-days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--new-static-key", is_flag=True, help="also replace the node's Noise static key")
def keys_renew(folder: Path, valid_days: int, new_static_key: bool) -> None:
    """Issue a fresh node certificate under the same root (clients keep their pin)."""
    from interlink.core.edge.keyfiles import renew_node_certificate

    _show(_run(lambda: renew_node_certificate(folder, valid_days=valid_days, new_static_key=new_static_key)))


@keys.command("show")
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=DEFAULT_KEYS_DIR, show_default=True)
def keys_show(folder: Path) -> None:
    """Print the root public key (what clients pin) and the node certificate."""
    from interlink.core.edge.keyfiles import load_operator_keys

    _show(_run(lambda: load_operator_keys(folder, check_validity=False)))


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), required=False)
def check_config(path: Path | None) -> None:
    """Validate a configuration file (and the INTERLINK_* environment) without starting anything.

    Exit code 0 when valid, 1 with the offending key and the problem on stderr."""
    config = _load_config(path)
    providers = ", ".join(p.id for p in config.providers) or "none (nobody can log in)"
    click.echo(f"{path or 'defaults'}: ok — {config.host}:{config.port}, data in {config.data_dir}, providers: {providers}")


@main.command("default-config")
def default_config() -> None:
    """Print every configuration key with its default, as a TOML file to start from."""
    from interlink.config import default_config_toml

    click.echo(default_config_toml(), nl=False)


@main.command()
@click.option(
    "--config", "path", type=click.Path(path_type=Path, dir_okay=False), envvar="INTERLINK_CONFIG",
    help="TOML configuration file (default: the built-in defaults; env INTERLINK_CONFIG)",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def serve(path: Path | None, log_format: str, log_level: str) -> None:
    """Run a gateway until SIGTERM or SIGINT (graceful drain); SIGHUP re-reads the providers.

    Exit codes: 0 after a drain, 1 when the configuration is invalid, the gateway cannot start, or
    (a cluster node) another process of its node id that started earlier serves it."""
    config = _load_config(path)
    from interlink.runner import configure_logging, serve_forever

    configure_logging(log_format, log_level)
    _run(lambda: serve_forever(config, path))


@main.command("push-receiver")
@click.option("--root-public", "root_public_hex", default=None, metavar="HEX",
              help="the operator's root public key, 64 hex digits (`interlink keys show`)")
@click.option("--root-public-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="the root public key as PEM instead (the keys folder's root_public.pem)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--path", "url_path", default="/push", show_default=True, help="the URL path pushes are POSTed to")
def push_receiver(root_public_hex: str | None, root_public_file: Path | None, host: str, port: int, url_path: str) -> None:
    """Run a reference receiver of push webhooks until Ctrl-C: each POST is verified with the root
    public key, answered 204 (one JSON line with its payload on stdout) or 401 (reason on stderr)."""
    if (root_public_hex is None) == (root_public_file is None):
        raise click.UsageError("give exactly one of --root-public and --root-public-file")
    if not url_path.startswith("/"):
        raise click.BadParameter("must start with '/'", param_hint="--path")
    from interlink.pushreceiver import root_public_from_pem, run_push_receiver

    if root_public_file is not None:
        root_public = _run(lambda: root_public_from_pem(root_public_file.read_bytes(), str(root_public_file)))
    else:
        try:
            root_public = bytes.fromhex(root_public_hex)
        except ValueError:
            root_public = b""
        if len(root_public) != 32:
            raise click.BadParameter("must be 64 hex digits (32 bytes)", param_hint="--root-public")
    _run(lambda: run_push_receiver(root_public, host=host, port=port, path=url_path))


# -- commands that talk to a running gateway's admin endpoint

DEFAULT_ADMIN_URL = "http://127.0.0.1:7451"
admin_url_option = click.option(
    "--admin", "admin_url", default=DEFAULT_ADMIN_URL, show_default=True, envvar="INTERLINK_ADMIN_URL",
    help="the gateway's admin endpoint (env INTERLINK_ADMIN_URL)",
)
token_option = click.option(
    "--token", envvar="INTERLINK_ADMIN_TOKEN", default="", help="admin token for changes (env INTERLINK_ADMIN_TOKEN)",
)


@main.command()
@admin_url_option
def status(admin_url: str) -> None:
    """Show a running gateway's state: sessions, traffic counters, providers."""
    varz = _admin_request(admin_url, "GET", "/varz")
    click.echo(f"interlink {varz['version']} ({varz['implementation']}) node {varz['node']} on {varz['listen']}, durability {varz['durability']}")
    if "sessions" in varz:
        routing = varz["routing"]
        click.echo(f"connections {varz['connections']}, sessions {varz['sessions']}")
        click.echo(
            f"messages stored {routing.get('messages_stored', 0)}, deliveries pushed {routing.get('deliveries_pushed', 0)}, "
            f"duplicates {routing.get('duplicates', 0)}, commits {routing.get('commits', 0)}"
        )
        admission = varz.get("admission", {})
        level = admission.get("level", 0)
        overloaded = varz.get("refusals", {}).get("overloaded", 0)
        click.echo(
            f"admission: {('normal', 'throttling senders', 'refusing new messages')[level]}, "
            f"messages refused overloaded {overloaded}, reads throttled {varz.get('counters', {}).get('reads_throttled', 0)}"
        )
        blobs = varz.get("blobs") or {}
        if blobs:
            click.echo(
                f"blobs: {blobs['blobs_ready']} ready ({blobs['blob_bytes']} bytes), {blobs['blob_uploads']} uploads "
                f"unfinished, {blobs['blob_bytes_written']} bytes written and {blobs['blob_bytes_read']} read since start, "
                f"bad_hash {blobs['blob_bad_hash']}"
            )
    push = varz.get("push") or {}
    if push:
        failures = sum(push.get("failures", {}).values())
        open_breakers = [provider_id for provider_id, state in push.get("breakers", {}).items() if state]
        click.echo(
            f"push: {push['registered']} devices registered, {push['queued']} owed, {push.get('sent', 0)} sent, "
            f"{failures} failed attempts, breakers open: {', '.join(open_breakers) or 'none'}"
        )
    for provider in varz["providers"]:
        click.echo(f"provider {provider['id']}: {provider['issuer']}{' (suspended)' if provider['suspended'] else ''}")


@main.command()
@admin_url_option
@token_option
@click.argument("user")
@click.option("--device", type=click.IntRange(1, 2**31 - 1), default=None, help="only this device's session")
def kick(admin_url: str, token: str, user: str, device: int | None) -> None:
    """End a user's sessions on a running gateway (bye suspended); they may connect again."""
    body = {"user": user} if device is None else {"user": user, "device": device}
    result = _admin_request(admin_url, "POST", "/sessions/kick", token=token, body=body)
    click.echo(f"{result['sessions_ended']} sessions of {user} ended")


@main.group()
def provider() -> None:
    """Providers of a running gateway (through its admin endpoint). Changes last until the next
    restart or SIGHUP: put them in the configuration file too."""


@provider.command("list")
@admin_url_option
def provider_list(admin_url: str) -> None:
    """List the registered providers."""
    for entry in _admin_request(admin_url, "GET", "/providers"):
        state = "suspended" if entry["suspended"] else "active"
        click.echo(f"{entry['id']}\t{state}\t{entry['issuer']}\taudience={entry['audience']}\tkeys={entry['keys']}")


@provider.command("add")
@admin_url_option
@token_option
@click.option("--id", "provider_id", required=True, help="short id in user addresses (localpart@id)")
@click.option("--issuer", required=True, help="the iss of its tokens")
@click.option("--audience", required=True, help="the aud this gateway expects")
@click.option("--jwks-uri", default=None, help="fetch keys from this URL instead of OpenID discovery")
@click.option("--accept", "default_accept", multiple=True, help="a provider its users accept by default (repeatable; '*' for all)")
def provider_add(admin_url: str, token: str, provider_id: str, issuer: str, audience: str, jwks_uri: str | None,
                 default_accept: tuple[str, ...]) -> None:
    """Register a provider on a running gateway."""
    body = {"id": provider_id, "issuer": issuer, "audience": audience, "default_accept": list(default_accept)}
    body.update({"jwks_uri": jwks_uri} if jwks_uri else {"discovery": True})
    added = _admin_request(admin_url, "POST", "/providers", token=token, body=body)
    click.echo(f"provider {added['id']} added; add it to the configuration file to keep it after a restart")


@provider.command("suspend")
@admin_url_option
@token_option
@click.argument("provider_id")
def provider_suspend(admin_url: str, token: str, provider_id: str) -> None:
    """Suspend a provider: its users' sessions end at once and their tokens are refused."""
    result = _admin_request(admin_url, "POST", f"/providers/{provider_id}/suspend", token=token)
    click.echo(f"provider {provider_id} suspended; {result['sessions_ended']} sessions ended")


@provider.command("resume")
@admin_url_option
@token_option
@click.argument("provider_id")
def provider_resume(admin_url: str, token: str, provider_id: str) -> None:
    """Accept a suspended provider's users again."""
    _admin_request(admin_url, "POST", f"/providers/{provider_id}/resume", token=token)
    click.echo(f"provider {provider_id} resumed")


def _admin_request(admin_url: str, method: str, path: str, *, token: str = "", body: dict | None = None):
    """One request to the admin endpoint; its JSON answer, or exit 1 with what went wrong."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    url = admin_url.rstrip("/") + urllib.parse.quote(path)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        raise click.ClickException(f"{method} {url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach the admin endpoint at {admin_url}: {reason}") from None


@main.group()
def cluster() -> None:
    """A cluster's nodes, as each reports itself over NATS, and moving data when the node list changes."""


@cluster.command("status")
@click.option(
    "--config", "path", type=click.Path(path_type=Path, dir_okay=False), envvar="INTERLINK_CONFIG",
    help="a node's TOML configuration (its [cluster] table names the nodes and NATS; env INTERLINK_CONFIG)",
)
@click.option("--json", "as_json", is_flag=True, help="print the nodes' reports as JSON")
def cluster_status(path: Path | None, as_json: bool) -> None:
    """Each node of the cluster: up or not, its software and node list, sessions, relayed stanzas,
    group fan-out entries its member nodes have not yet stored (outbox; below the table, for which
    member nodes).

    Exit code 0 when every node answers with this configuration's node list, 1 otherwise."""
    import asyncio
    import json

    from interlink.core.edge.clusterlink import ask_nodes

    config = _load_config(path)
    if config.cluster is None:
        raise click.ClickException("the configuration has no [cluster] table")
    reports = _run(lambda: asyncio.run(ask_nodes(config.cluster)))
    healthy = all(report is not None and report.get("m") == config.cluster.digest for report in reports.values())
    if as_json:
        click.echo(json.dumps(reports, indent=2, sort_keys=True))
    else:
        click.echo(f"{'node':<16} {'state':<14} {'software':<10} {'list':>4} {'sessions':>9} {'waiting':>8} "
                   f"{'relayed':>9} {'served':>9} {'timeouts':>9} {'outbox':>8}")
        for node, report in reports.items():
            if report is None:
                click.echo(f"{node:<16} {'not answering':<14}")
                continue
            relay = report.get("relay", {})
            state = "up" if report.get("m") == config.cluster.digest else "OTHER LIST"
            click.echo(f"{node:<16} {state:<14} {str(report.get('software')):<10} {report.get('version', '?'):>4} "
                       f"{report.get('sessions', 0):>9} {report.get('waiting', 0):>8} {relay.get('relayed', 0):>9} "
                       f"{relay.get('served', 0):>9} {relay.get('timeouts', 0):>9} {report.get('outbox_backlog', 0):>8}")
        for node, report in reports.items():  # whom the entries wait for: a node lost for good shows here
            backlogs = (report or {}).get("outbox_by_node")
            waiting_for = sorted((other, count) for other, count in backlogs.items() if count) \
                if isinstance(backlogs, dict) else ()  # (a node of an older version sends none)
            if waiting_for:
                click.echo(f"{node:<16} outbox waits for " + ", ".join(f"{other} {count}" for other, count in waiting_for))
    if not healthy:
        sys.exit(1)


_CONFIG_OPTION = dict(type=click.Path(path_type=Path, dir_okay=False), envvar="INTERLINK_CONFIG",
                      help="this node's TOML configuration with the NEW node list (env INTERLINK_CONFIG)")


def _stopped_node(path: Path | None):
    """(config, store) of a node that must not be running — its data would change under the move
    (a draining node still writes after it stopped listening): the data folder's lock is taken
    for the rest of this process."""
    from interlink.core.edge.lmdbstore import LmdbStore
    from interlink.core.edge.lmdbstore.env import lock_data_dir

    config = _load_config(path)
    if config.cluster is None:
        raise click.ClickException("the configuration has no [cluster] table")
    try:
        lock_data_dir(config.data_dir)  # released when this command exits
    except ConfigError:
        raise click.ClickException(f"node {config.cluster.node} still runs on {config.data_dir} (its data folder is "
                                   "locked): stop it first (a move runs on stopped nodes)") from None
    store = _run(lambda: LmdbStore(config.data_dir / "lmdb", map_size_bytes=config.lmdb_map_size_bytes, sync=True,
                                   writemap=False, max_mailbox_items=config.max_mailbox_items,
                                   max_mailbox_bytes=config.max_mailbox_bytes))
    return config, store


@cluster.command("export")
@click.option("--config", "path", **_CONFIG_OPTION)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="where the move files go (default: DATA_DIR/moves)")
def cluster_export(path: Path | None, out: Path | None) -> None:
    """Changing the node list, step 1 (on every stopped node): write a move file for each node that
    is home, under the new list, to users, groups or blobs whose data is here."""
    from interlink.core.edge.blobfiles import BlobFileStore
    from interlink.core.edge.lmdbstore.move import export_moves

    config, store = _stopped_node(path)
    try:
        folder = out or config.data_dir / "moves"
        counts = _run(lambda: export_moves(store, config.cluster.membership, config.cluster.node, folder,
                                           BlobFileStore(config.data_dir / "blobs")))
    finally:
        store.close()
    if not counts:
        click.echo(f"node {config.cluster.node}: nothing moves under node list version {config.cluster.version}")
    for node, records in sorted(counts.items()):
        click.echo(f"{folder / f'{config.cluster.node}-to-{node}.move'}: {records} records for node {node}")


@cluster.command("import")
@click.option("--config", "path", **_CONFIG_OPTION)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
def cluster_import(path: Path | None, files: tuple[Path, ...]) -> None:
    """Changing the node list, step 2 (on each stopped node that gets data): import the move files
    made for it. A file imported twice changes nothing."""
    from interlink.core.edge.blobfiles import BlobFileStore
    from interlink.core.edge.lmdbstore.move import import_moves

    config, store = _stopped_node(path)
    try:
        for file in files:
            written = _run(lambda: import_moves(store, config.cluster.membership, config.cluster.node, file,
                                                BlobFileStore(config.data_dir / "blobs")))
            click.echo(f"{file}: {written} records imported into node {config.cluster.node}")
    finally:
        store.close()


@cluster.command("prune")
@click.option("--config", "path", **_CONFIG_OPTION)
def cluster_prune(path: Path | None) -> None:
    """Changing the node list, step 3 (on every stopped node, once every move file was imported):
    delete the data of users and groups homed elsewhere under the new list."""
    from interlink.core.edge.blobfiles import BlobFileStore
    from interlink.core.edge.lmdbstore.move import prune

    config, store = _stopped_node(path)
    try:
        deleted = _run(lambda: prune(store, store.node_list, config.cluster.membership, config.cluster.node,
                                     BlobFileStore(config.data_dir / "blobs")))
    finally:
        store.close()
    click.echo(f"node {config.cluster.node}: {sum(deleted.values())} records of other nodes' users and groups "
               f"deleted; node list version {config.cluster.version} recorded")


@cluster.command("forget")
@click.option("--config", "path", **_CONFIG_OPTION)
@click.option("--yes", is_flag=True, help="drop them (without it: say what would be dropped, and drop nothing)")
@click.argument("lost")
def cluster_forget(path: Path | None, lost: str, yes: bool) -> None:
    """Removing a node lost for good with its data (no backup to start it from), before the export
    (on every other stopped node): drop the group fan-out entries that wait for node LOST — its
    members miss those messages and changes — so that the list change can go on."""
    from interlink.core.edge.lmdbstore.move import forget_node

    config, store = _stopped_node(path)
    me = config.cluster.node
    try:
        entries, marks = _run(lambda: forget_node(store, config.cluster.membership, me, lost, drop=yes))
    finally:
        store.close()
    if yes:
        click.echo(f"node {me}: {entries} group fan-out entries waiting for node {lost} dropped, "
                   f"{marks} marks of its groups' entries")
    else:
        click.echo(f"node {me}: {entries} group fan-out entries wait for node {lost}, {marks} marks of its groups' "
                   "entries: nothing dropped; run again with --yes to drop them — only for a node lost for good "
                   "(its members miss those messages and changes)")


@main.command()
def demo() -> None:
    """Start a gateway on 127.0.0.1 with two demo providers and drive traffic through it."""
    from interlink.demo import main as demo_main

    demo_main([])


@main.command()
@click.argument("scenario", default="chat-1to1")
@click.option("--users", type=click.IntRange(2, 100_000), default=None, help="simulated users (in pairs)")
@click.option("--connections", type=click.IntRange(2, 1_000_000), default=None, help="sessions in total (users x devices)")
@click.option("--devices", type=click.IntRange(1, 64), default=None, help="devices per user")
@click.option("--providers", type=click.IntRange(1, 26), default=None, help="demo OpenID providers")
@click.option("--rate", default=None, help='messages/s in total (open loop), or "max" (closed loop)')
@click.option("--inflight", type=click.IntRange(1, 10_000), default=None, help="closed loop: unanswered per device")
@click.option("--payload", type=click.IntRange(8, 60_000), default=None, help="ciphertext bytes (plaintext bytes with --e2ee)")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None, help="seconds of sending")
@click.option("--warmup", type=click.FloatRange(0), default=None, help="seconds not measured")
@click.option("--messages", type=click.IntRange(1), default=None, help="offline-drain: messages to store")
@click.option("--durability", type=click.Choice(["sync", "async"]), default=None)
@click.option("--members", type=click.IntRange(2, 1024), default=None, help="group: members of the group")
@click.option("--senders", type=click.IntRange(1, 1024), default=None, help="group: members that post")
@click.option("--offline", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="group: fraction of the non-sending members offline")
@click.option("--connect-rate", default=None,
              help='churn, handshake-storm: new sessions/s in total (open loop), or "max" (closed loop)')
@click.option("--keep-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="churn: fraction of the users staying connected; handshake-storm: of the sessions kept open")
@click.option("--churn-messages", type=click.IntRange(0, 1000), default=None,
              help="churn: messages each churning session sends before it leaves")
@click.option("--malformed-share", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="malformed-mix: share of all inputs that are malformed frames or stanzas")
@click.option("--e2ee/--no-e2ee", default=None,
              help="chat and group kinds: real Signal-protocol envelopes (interlink.e2ee; groups: sender keys) "
                   "instead of random bytes")
@click.option("--e2ee-verify", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="group with --e2ee: fraction of the member devices that decrypt every copy (default 0.1, at least one)")
@click.option("--media-uploaders", type=int, default=None, help="media: SDK clients uploading blobs back to back")
@click.option("--media-downloaders", type=int, default=None,
              help="media: SDK clients downloading the newest ready blob back to back")
@click.option("--media-blob-mib", type=float, default=None, help="media: MiB per blob (at most the gateway's blob_max)")
@click.option("--media-only/--no-media-only", default=None, help="media: the blobs alone, no chat traffic")
@click.option("--blob-kib-per-s-per-user", type=int, default=None,
              help="media: the local gateway's per-user blob rate in KiB/s (default: lifted)")
@click.option("--transport", type=click.Choice(["tcp", "ws"]), default=None,
              help="chat, offline-drain: devices connect over TCP or WebSocket (with --target: its ws_port, path /interlink)")
@click.option("--kill-at", type=click.FloatRange(0), default=None, help="SIGKILL and restart the gateway after S seconds")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="write the report as JSON")
@click.option("--png", "png_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="plot latency percentiles and throughput over time to a PNG (pip install 'interlink[plots]')")
@click.option("--pin/--no-pin", default=True, show_default=True, help="gateway on CPU 0, load on CPU 1")
@click.option("--quiet", is_flag=True, help="no per-second lines")
@click.option("--peer", type=click.Choice(["nats", "jetstream"]), default=None,
              help="then the same pattern against a local nats-server, side by side (pip install 'interlink[peer]'); "
                   "nats: chat and group kinds; jetstream (durable, file storage): chat and group kinds")
@click.option("--only-peer", is_flag=True, help="run the peer (NATS) alone, not the gateway")
@click.option("--target", default=None, help="host:port of a remote gateway (no local CPU figures); needs the next two")
@click.option("--root-public", default=None, help="remote gateway: its operator's root public key, 64 hex digits")
@click.option("--tokens", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="remote gateway: a file of 'localpart@provider TOKEN' lines, one per simulated user")
def load(scenario: str, json_path: Path | None, png_path: Path | None, kill_at: float | None, pin: bool, quiet: bool,
         peer: str | None, only_peer: bool, target: str | None, root_public: str | None, tokens: Path | None,
         **overrides) -> None:
    """Drive a local gateway with simulated users of several providers (SCENARIO: a name in
    interlink/load/scenarios, or a TOML file). Exit code 1 when any message is unexplained (or,
    for the stress kinds, a connect fails or a malformed input is not answered as the protocol
    says). Needs the load extra: pip install 'interlink[load]'."""
    load_main = _load_tool("cli").main
    sys.exit(_run(lambda: load_main(scenario, json_path=json_path, png_path=png_path, kill_at_s=kill_at, pin=pin,
                                    quiet=quiet, peer=peer, only_peer=only_peer, target=target,
                                    root_public=root_public, tokens=tokens,
                                    **overrides)))


@main.command("load-merge")
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the merged report as JSON")
@click.option("--png", "png_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="plot the merged latency percentiles and throughput over time to a PNG")
def load_merge(reports: tuple[Path, ...], json_path: Path | None, png_path: Path | None) -> None:
    """Merge the JSON reports of several `interlink load` processes (REPORTS: their --json files):
    histograms added, counts and accounting summed, throughput over the window they overlapped.
    Exit code 1 when any input failed or a message is unexplained."""
    merge_main = _load_tool("view").merge_main
    sys.exit(_run(lambda: merge_main(list(reports), json_path=json_path, png_path=png_path)))


def _show(keys_) -> None:
    from datetime import datetime, timezone

    cert = keys_.certificate

    def when(seconds: int) -> str:
        return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")

    click.echo(f"root public key (pin this): {keys_.root_public_hex}")
    click.echo(f"root fingerprint:           {keys_.root_fingerprint}")
    click.echo(f"node:                       {cert.node}")
    click.echo(f"node static key:            {keys_.static_public.hex()}")
    click.echo(f"certificate valid:          {when(cert.not_before)} .. {when(cert.expires)}")
    if keys_.push_certificate is None:
        click.echo("push signing key:           none (`interlink keys renew` issues one)")
        return
    from interlink.core.protocol.pushsig import read_push_certificate

    push = _run(lambda: read_push_certificate(keys_.push_certificate, keys_.root_public))
    click.echo(f"push signing key:           {push.push_key.hex()}")
    click.echo(f"push certificate valid:     {when(push.not_before)} .. {when(push.expires)}")


def _load_config(path: Path | None):
    from interlink.config import load_config

    try:
        return load_config(path)
    except InterlinkError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from exc


def _load_tool(module: str):
    """A module of ``interlink.load``, imported on first use: the rest of the command line and the
    public API work without the load extra. Without it, exit 1 naming the extra to install."""
    return _run(lambda: importlib.import_module(f"interlink.load.{module}"))


def _run(action):
    try:
        return action()
    except InterlinkError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
