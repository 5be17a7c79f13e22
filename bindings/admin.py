"""The admin HTTP endpoint: health, readiness, Prometheus metrics, JSON snapshots and provider
control, served by aiohttp on the gateway's own event loop.

Bound to 127.0.0.1 unless configured otherwise (``admin_host``, ``admin_port``; ``admin_port =
-1``, the library default, serves nothing). Reads need nothing; writes (``POST``) need
``Authorization: Bearer <admin_token>`` and are refused with 403 while no token is configured.

Metrics are read from the gateway's counters at scrape time by a collector in a private
registry: nothing on the message path updates a metric, and embedding programs' own
``prometheus_client`` registries are left alone.
"""

from __future__ import annotations

import base64
import hmac
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from interlink.core.errors import ConfigError, InterlinkError

if TYPE_CHECKING:
    from interlink.gateway import Gateway

log = logging.getLogger("interlink.admin")

MAX_PAGE = 1000  # sessions per /connz page


class GatewayCollector:
    """Turns ``Gateway.stats()`` into Prometheus metric families at each scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self):
        if not self.gateway.running:
            return
        stats = self.gateway.stats()
        counters, routing = stats["counters"], stats["routing"]
        yield _gauge("interlink_connections", "Open TCP connections (authenticated or not).", stats["connections"])
        yield _gauge("interlink_sessions", "Authenticated device sessions.", stats["sessions"])
        yield _counter("interlink_connections_accepted", "Connections accepted.", counters.get("connections_accepted", 0))
        yield _counter("interlink_sessions_opened", "Sessions opened after a successful authentication.", counters.get("sessions_opened", 0))
        yield _labelled_counter("interlink_auth_failures", "Refused authentications by error code.", "code", stats["auth_failures"])
        yield _labelled_counter("interlink_closes", "Closed connections by reason.", "reason", stats["close_reasons"])
        yield _labelled_counter("interlink_source_refusals", "Connections refused at accept by a per-source limit "
                                "(preauth_per_source, handshake_rate, handshake_budget).", "reason", stats["source_refusals"])
        yield _labelled_counter("interlink_proxied_connections", "Connections from trusted proxies by what they said: "
                                "proxy (a PROXY v2 client address), forwarded (an X-Forwarded-For client address), "
                                "local (none: the proxy's own connection), refused (a bad PROXY v2 header).",
                                "kind", stats["proxied"])
        yield _counter("interlink_websocket_upgrades", "WebSocket upgrades accepted on ws_port.",
                       counters.get("ws_upgrades", 0))
        yield _counter("interlink_websocket_upgrades_refused", "WebSocket upgrades refused (path, Origin, headers, "
                       "source limit).", counters.get("ws_upgrades_refused", 0))
        yield _gauge("interlink_preauth_sources", "Source addresses (IPv4, IPv6 /64) with connections not yet "
                     "authenticated.", stats["preauth_sources"])
        yield _labelled_counter("interlink_stanzas_in", "Stanzas received from clients by type (ping excluded).", "type", stats["stanzas_in"])
        yield _labelled_counter("interlink_refusals", "err answers to stanzas by code (rate_limited, not_opted_in, ...).", "code", stats["refusals"])
        commits = stats["commit_seconds"]
        yield HistogramMetricFamily(
            "interlink_commit_seconds", "Group-commit write transactions, fsync included.",
            buckets=[("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in commits["buckets"]],
            sum_value=commits["sum"],
        )
        store = stats["store"]
        yield _gauge("interlink_mailbox_items", "Items waiting in all mailboxes.", store["mailbox_items"])
        yield _gauge("interlink_mailbox_bytes", "Bytes of LMDB pages the mailboxes and the group bodies they share use.", store["mailbox_bytes"])
        yield _gauge("interlink_lmdb_used_bytes", "Bytes of the LMDB map in use.", store["map_used_bytes"])
        yield _gauge("interlink_lmdb_map_bytes", "Size of the LMDB map (full: senders get overloaded).", store["map_size_bytes"])
        yield _counter("interlink_messages_stored", "Messages and receipts stored (acked).", routing.get("messages_stored", 0))
        yield _counter("interlink_duplicates", "Resent messages recognised and acked with dup.", routing.get("duplicates", 0))
        yield _counter("interlink_deliveries_pushed", "dlv stanzas pushed to device sessions.", routing.get("deliveries_pushed", 0))
        yield _counter("interlink_commits", "Group-commit write transactions.", routing.get("commits", 0))
        yield _counter("interlink_group_copies_dropped_full", "Group message copies skipped: the device's mailbox was full.",
                       routing.get("group_copies_dropped_full", 0))
        yield _counter("interlink_group_events_dropped_full",
                       "Group events skipped: the device's mailbox was past its quota and the control overdraft.",
                       routing.get("group_events_dropped_full", 0))
        yield _counter("interlink_group_states_dropped",
                       "Group typing states dropped: their copies (one per 64 members) were past the sender's rate.",
                       routing.get("group_states_dropped", 0))
        yield _gauge("interlink_admission_level", "Admission control: 0 normal, 1 throttling senders, 2 refusing new msg (overloaded).",
                     stats["admission"]["level"])
        yield _counter("interlink_reads_throttled", "Times a sending connection was not read until its turn's commit (admission control).",
                       counters.get("reads_throttled", 0))
        yield _counter("interlink_slow_consumers", "Sessions ended with bye slow_consumer.", counters.get("slow_consumers", 0))
        yield _counter("interlink_items_expired", "Undelivered items deleted by the TTL sweep.", counters.get("items_expired", 0))
        blobs = stats.get("blobs") or {}
        if blobs:
            yield _gauge("interlink_blob_uploads", "Unfinished blob uploads.", blobs["blob_uploads"])
            yield _gauge("interlink_blobs_ready", "Ready blobs (served to readers).", blobs["blobs_ready"])
            yield _gauge("interlink_blob_bytes", "Bytes of the ready blobs.", blobs["blob_bytes"])
            yield _counter("interlink_blob_bytes_written", "Blob bytes received from uploads (each byte once).",
                           blobs["blob_bytes_written"])
            yield _counter("interlink_blob_bytes_read", "Blob bytes sent to readers.", blobs["blob_bytes_read"])
            yield _counter("interlink_blob_uploads_started", "blob.new accepted.", blobs["blob_uploads_started"])
            yield _counter("interlink_blob_uploads_released",
                           "Unfinished uploads quiet for 10 minutes deleted to make room for a new one of their owner.",
                           blobs["blob_uploads_released"])
            yield _counter("interlink_blob_uploads_ready", "Uploads completed with a matching hash.", blobs["blob_uploads_ready"])
            yield _counter("interlink_blob_bad_hash", "Uploads completed with a hash that did not match (bad_hash).",
                           blobs["blob_bad_hash"])
            yield _counter("interlink_blobs_expired", "Blobs and unfinished uploads deleted by the TTL sweep.",
                           blobs["blobs_expired"])
        push = stats.get("push") or {}
        if push:
            yield _gauge("interlink_push_registered", "Devices registered for push (push.set).", push["registered"])
            yield _gauge("interlink_push_queued", "Push intents owed and not yet answered by their provider.", push["queued"])
            yield _counter("interlink_pushes_sent", "Push webhooks answered 2xx.", push.get("sent", 0))
            yield _counter("interlink_pushes_retried", "Push webhook attempts scheduled again (5xx, 429, timeouts, "
                           "connection errors).", push.get("retried", 0))
            yield _counter("interlink_pushes_coalesced", "Commits whose items an owed push already covered.",
                           push.get("coalesced", 0))
            yield _counter("interlink_pushes_cancelled", "Owed pushes cancelled: the device connected or unregistered.",
                           push.get("cancelled", 0))
            yield _labelled_counter("interlink_push_failures", "Push webhook attempts that failed, by reason "
                                    "(http_5xx, http_429, timeout, connection, internal).", "reason", push["failures"])
            yield _labelled_counter("interlink_pushes_dropped", "Owed pushes given up without a retry, by reason "
                                    "(http_<status> of other 4xx, http_3xx, token_gone, nothing_pending, not_registered, no_push_url).",
                                    "reason", push["dropped"])
            breakers = GaugeMetricFamily("interlink_push_breaker", "Push circuit breaker per provider: 0 closed, "
                                         "1 open, 2 half-open (one probe).", labels=["provider"])
            for provider_id, state in sorted(push["breakers"].items()):
                breakers.add_metric([provider_id], state)
            yield breakers
        cluster = stats.get("cluster") or {}
        if cluster:
            relay = cluster["relay"]
            for key, name, documentation in _CLUSTER_COUNTERS:
                yield _counter(name, documentation, relay.get(key, 0))
            link = cluster.get("link", {})
            for key, name, documentation in _LINK_COUNTERS:
                yield _counter(name, documentation, link.get(key, 0))
            yield _gauge("interlink_cluster_waiting", "Stanzas relayed to other nodes and not yet answered.",
                         cluster["waiting"])
            yield _gauge("interlink_cluster_waiting_bytes", "What this node's clients' stanzas waiting for other "
                         "nodes take, counted against their bound (256 MiB: overloaded past it).",
                         cluster.get("waiting_bytes", 0))
            yield _gauge("interlink_cluster_connected", "1 while this node is connected to NATS.",
                         int(cluster["connected"]))
            backlog = GaugeMetricFamily("interlink_cluster_outbox_backlog", "Group fan-out entries of the groups "
                                        "living here that a member node has not yet stored, per node.", labels=["node"])
            for node, entries in sorted(cluster.get("outbox", {}).items()):
                backlog.add_metric([node], entries)
            yield backlog
            trips = cluster["round_trip_seconds"]
            yield HistogramMetricFamily(
                "interlink_cluster_relay_seconds", "From relaying a stanza to another node to its answer (that "
                "node's commit included).",
                buckets=[("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in trips["buckets"]],
                sum_value=trips["sum"],
            )
        yield _counter("interlink_redirects", "Sessions sent to their home node with bye redirect (a cluster).",
                       counters.get("redirects", 0))
        jwks = stats.get("jwks") or {}
        for name, field, documentation in _JWKS_COUNTERS:
            yield _labelled_counter(name, documentation, "provider", {pid: fetches[field] for pid, fetches in jwks.items()})
        yield _counter("interlink_internal_errors", "Stanzas that failed on a gateway bug (see the logs).", counters.get("internal_errors", 0))


_CLUSTER_COUNTERS = (
    ("relayed", "interlink_cluster_relayed", "Stanzas of this node's sessions relayed to the node their user lives on."),
    ("answered", "interlink_cluster_answered", "Answers to relayed stanzas received in time."),
    ("timeouts", "interlink_cluster_timeouts", "Relayed stanzas not answered in time (the sender got overloaded)."),
    ("late_answers", "interlink_cluster_late_answers", "Answers that came after their stanza's deadline (dropped)."),
    ("served", "interlink_cluster_served", "Stanzas other nodes relayed here, served for their senders."),
    ("malformed", "interlink_cluster_malformed", "Relayed records this node could not serve (malformed or not relayable)."),
    ("misrouted", "interlink_cluster_misrouted", "Relayed stanzas for users this node is not home to (node lists differ)."),
    ("refused", "interlink_cluster_refused", "Relayed stanzas refused here: their sender's provider is suspended or unknown."),
    ("held_back", "interlink_cluster_held_back", "Stanzas refused because an earlier one of their device got no answer in time."),
    ("refused_before_resend", "interlink_cluster_refused_before_resend",
     "Stored stanzas refused because an earlier one of their device, refused at a timeout, was not sent again yet."),
    ("held_for_group_change", "interlink_cluster_held_for_group_change",
     "Waits of a stanza for a group at its home behind a change of it whose members other nodes were checking "
     "(a stanza behind several changes counts once per change)."),
    ("held_overflow", "interlink_cluster_held_overflow",
     "Stanzas for a group refused overloaded (or typing state dropped): too many already waited behind changes "
     "(256 per group, 64 per device, 8,192 in all)."),
    ("waiting_full", "interlink_cluster_waiting_full",
     "Stanzas refused overloaded: what this node's clients' stanzas waiting for other nodes take (256 MiB) was full."),
    ("own_copies_lost", "interlink_cluster_own_copies_lost",
     "Messages acked by the recipient's node whose copies for the sender's other devices could not be stored here."),
    ("internal_errors", "interlink_cluster_internal_errors", "Relayed stanzas that failed on a gateway bug (see the logs)."),
    ("bad_answers", "interlink_cluster_bad_answers",
     "Answers of other nodes that were not an answer to what was asked (their bug: the sender got internal)."),
    ("outbox_sent", "interlink_cluster_outbox_sent", "Group fan-out entries sent to member nodes (first sends)."),
    ("outbox_resent", "interlink_cluster_outbox_resent",
     "Group fan-out entries sent again (their node did not confirm them: down, NATS away, a refusal)."),
    ("outbox_stored", "interlink_cluster_outbox_stored", "Group fan-out entries their member node confirmed stored."),
    ("outbox_refused", "interlink_cluster_outbox_refused",
     "Group fan-out entries a member node refused for good (the sender's provider suspended there)."),
    ("outbox_full", "interlink_cluster_outbox_full",
     "Group messages and changes refused overloaded at their home: a member node's waiting fan-out entries "
     "filled its share of the store (half the LMDB map, shared by the other nodes)."),
)

# The NATS side (core/edge/clusterlink.py): what leaves and arrives, and what another node or
# NATS got wrong (all but the first three should stay 0).
_LINK_COUNTERS = (
    ("batches_out", "interlink_cluster_link_relay_messages_out", "NATS messages of relayed stanzas sent to other nodes."),
    ("answer_batches_out", "interlink_cluster_link_answer_messages_out",
     "NATS messages of answers sent to other nodes (for the stanzas they relayed here)."),
    ("batches_in", "interlink_cluster_link_relay_messages_in", "NATS messages of relayed stanzas received from other nodes."),
    ("malformed_batches", "interlink_cluster_link_malformed_messages",
     "NATS messages from another node that could not be read (dropped: their senders time out)."),
    ("mismatched_batches", "interlink_cluster_link_mismatched_messages",
     "Relayed batches from a node running another node list (every stanza refused internal)."),
    ("malformed_answers", "interlink_cluster_link_malformed_answers", "Answer entries that were not [seq, bytes or nil]."),
    ("answer_errors", "interlink_cluster_link_answer_errors",
     "Answers from another node whose taking failed (this node's bug; the batch's other answers were taken)."),
    ("unknown_origin", "interlink_cluster_link_unknown_origin",
     "NATS messages on this node's subjects naming no other node of the list."),
    ("unpackable", "interlink_cluster_link_unpackable", "Relayed entries this node could not pack (its bug; dropped)."),
    ("publish_failures", "interlink_cluster_link_publish_failures",
     "NATS messages (batches of relayed stanzas or answers) dropped: 8 MiB already waiting for NATS (to come "
     "back, or to take them), over its max_payload, or the link closed — their senders time out."),
    ("disconnects", "interlink_cluster_link_disconnects", "Times this node lost its NATS connection."),
    ("expired_while_away", "interlink_cluster_link_expired_while_away",
     "NATS messages (batches of relayed stanzas or answers, hello answers) published while NATS was away "
     "and dropped at the reconnect, older than the request timeout (their senders were answered overloaded)."),
    ("twins_seen", "interlink_cluster_link_twins_seen",
     "Hellos from, or answers by, another process with this node's id: a second process starting (it refuses) "
     "or one serving beside this one after a cut from NATS (the one started later stands down)."),
    ("stood_down", "interlink_cluster_link_stood_down",
     "1 when this process stood down: another process of its node id, started earlier, serves it."),
    ("twin_looks", "interlink_cluster_link_twin_looks",
     "Looks for another process of this node id (after a reconnect, or when one looked; at most every 2 s)."),
    ("stale", "interlink_cluster_link_stale_connections",
     "Times the NATS server left two PINGs unanswered and the connection was dropped."),
    ("reconnect_failures", "interlink_cluster_link_reconnect_failures",
     "Tries to reconnect to a NATS server that failed (every 0.5 s while NATS is away)."),
    ("server_errors", "interlink_cluster_link_server_errors",
     "-ERR lines the NATS server sent after the connect (a publish its permissions forbid)."),
    ("handler_errors", "interlink_cluster_link_handler_errors",
     "NATS messages whose handling raised (this node's bug; the connection goes on)."),
)

_JWKS_COUNTERS = (
    ("interlink_jwks_fetches", "attempts", "Key refreshes started per provider (discovery and JWKS requests together)."),
    ("interlink_jwks_fetch_failures", "failures", "Key refreshes that failed per provider (the last good keys stay in service)."),
    ("interlink_jwks_unknown_kid_fetches", "unknown_kid_refetches",
     "Key refreshes per provider started because a token named a key id that was not cached."),
    ("interlink_jwks_unknown_kid_waits", "unknown_kid_waits",
     "Tokens per provider that named a key id not cached and waited for a fetch (many: made-up kids, or a rotation)."),
)


def _gauge(name: str, documentation: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled_counter(name: str, documentation: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


class AdminServer:
    """The HTTP endpoint of one gateway; ``await start()`` / ``await stop()``."""

    def __init__(self, gateway: Gateway, host: str, port: int, token: str) -> None:
        self.gateway = gateway
        self.host, self.port = host, port
        self._token = token.encode("utf-8")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway))
        app = web.Application()
        app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/varz", self.varz),
            web.get("/connz", self.connz),
            web.post("/sessions/kick", self.kick),
            web.get("/reports", self.reports),
            web.post("/reports/{number}/resolve", self.resolve_report),
            web.get("/providers", self.list_providers),
            web.post("/providers", self.add_provider),
            web.post("/providers/{id}/suspend", self.suspend_provider),
            web.post("/providers/{id}/resume", self.resume_provider),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"admin_port: cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = self._runner.addresses[0][1]
        log.info("admin endpoint on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    # -- reads

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # the loop answers: the process is alive

    async def readyz(self, request: web.Request) -> web.Response:
        if self.gateway.running and not self.gateway.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if self.gateway.draining else "not started\n")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def varz(self, request: web.Request) -> web.Response:
        import interlink.core

        config = self.gateway.config
        snapshot = {
            "version": interlink.__version__,
            "implementation": interlink.core.IMPLEMENTATION,
            "node": config.node_name,
            "listen": f"{config.host}:{config.port}",
            "durability": config.durability,
            "providers": [_provider_json(p) for p in self.gateway.list_providers()],
        }
        if self.gateway.running:
            snapshot.update(self.gateway.stats())
        return web.json_response(snapshot)

    async def connz(self, request: web.Request) -> web.Response:
        try:
            offset = int(request.query.get("offset", "0"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise web.HTTPBadRequest(text="offset and limit must be integers\n") from None
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise web.HTTPBadRequest(text=f"offset must be >= 0 and limit 1..{MAX_PAGE}\n")
        sessions = sorted(self.gateway.sessions(), key=lambda s: (s["user"], s["device"])) if self.gateway.running else []
        page = [
            {"user": s["user"], "device": s["device"], "peer": _peer(s["peer"]), "suite": s["suite"]}
            for s in sessions[offset : offset + limit]
        ]
        return web.json_response({"total": len(sessions), "offset": offset, "limit": limit, "sessions": page})

    # -- writes

    def _authorize(self, request: web.Request) -> None:
        if not self._token:
            raise web.HTTPForbidden(text="no admin_token is configured: write operations are off\n")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # aiohttp keeps a header's bytes that are not UTF-8 as surrogates: encoded back as they came
        # (plain "utf-8" raised on them: a 500 and a traceback in the log for any such request).
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self._token):
            raise web.HTTPUnauthorized(text="a valid 'Authorization: Bearer <admin_token>' is required\n",
                                       headers={"WWW-Authenticate": "Bearer"})

    async def kick(self, request: web.Request) -> web.Response:
        """End a user's sessions: JSON ``{"user": address, "device": n}`` (``device`` optional)."""
        self._authorize(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        user = body.get("user") if isinstance(body, dict) else None
        device = body.get("device") if isinstance(body, dict) else None
        if not isinstance(user, str) or (device is not None and (type(device) is not int or device < 1)):
            raise web.HTTPBadRequest(text='the body must be JSON {"user": "name@provider", "device": n (optional)}\n')
        ended = self.gateway.kick(user, device)
        log.info("admin: %d sessions of one user ended", ended)
        return web.json_response({"sessions_ended": ended})

    async def reports(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise web.HTTPBadRequest(text="after and limit must be integers\n") from None
        if after < 0 or not 1 <= limit <= MAX_PAGE:
            raise web.HTTPBadRequest(text=f"after must be >= 0 and limit 1..{MAX_PAGE}\n")
        unresolved = request.query.get("unresolved", "") in ("1", "true", "yes")
        found = self.gateway.reports(after, limit, unresolved=unresolved)
        return web.json_response({"reports": [_report_json(r) for r in found]})

    async def resolve_report(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            number = int(request.match_info["number"])
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text='the body must be JSON {"action": ..., "note": ...}\n') from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='the body must be JSON {"action": ..., "note": ...}\n')
        try:
            self.gateway.resolve_report(number, body.get("action"), body.get("note", ""))
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        except InterlinkError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        log.info("admin: report %d resolved (%s)", number, body.get("action"))
        return web.json_response({"report": number, "resolved": True})

    async def list_providers(self, request: web.Request) -> web.Response:
        return web.json_response([_provider_json(p) for p in self.gateway.list_providers()])

    async def add_provider(self, request: web.Request) -> web.Response:
        """Register a provider from a JSON object with the keys of a ``[[providers]]`` table. It
        lasts until the next restart or SIGHUP: add it to the file too."""
        self._authorize(request)
        from interlink.config import providers_from_tables

        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body must be a JSON object of provider keys\n") from None
        try:
            [provider] = providers_from_tables([body])
            self.gateway.add_provider(provider)
        except InterlinkError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        log.info("admin: provider %s added (issuer %s)", provider.id, provider.issuer)
        return web.json_response(_provider_json(provider), status=201)

    async def suspend_provider(self, request: web.Request) -> web.Response:
        self._authorize(request)
        provider_id = request.match_info["id"]
        try:
            ended = self.gateway.suspend_provider(provider_id)
        except InterlinkError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        log.info("admin: provider %s suspended, %d sessions ended", provider_id, ended)
        return web.json_response({"provider": provider_id, "suspended": True, "sessions_ended": ended})

    async def resume_provider(self, request: web.Request) -> web.Response:
        self._authorize(request)
        provider_id = request.match_info["id"]
        try:
            self.gateway.resume_provider(provider_id)
        except InterlinkError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        log.info("admin: provider %s resumed", provider_id)
        return web.json_response({"provider": provider_id, "suspended": False})


def _report_json(report: dict) -> dict:
    """JSON has no bytes: message ids in hex, evidence in base64."""
    evidence = report.get("evidence")
    return {
        **report,
        "ids": [i.hex() for i in report.get("ids", [])],
        "evidence": base64.b64encode(evidence).decode("ascii") if evidence is not None else None,
    }


def _provider_json(provider) -> dict:
    source = "discovery" if provider.discovery else provider.jwks_uri or "inline jwks"
    return {
        "id": provider.id, "issuer": provider.issuer, "audience": provider.audience, "keys": source,
        "algorithms": list(provider.algorithms), "default_accept": list(provider.default_accept),
        "suspended": provider.suspended,
    }


def _peer(peer) -> str | None:
    if not peer:
        return None
    return f"{peer[0]}:{peer[1]}" if peer[1] else peer[0]  # port 0: an X-Forwarded-For address, port unknown
