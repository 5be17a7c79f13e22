"""The cluster's wires (issue 18): this node's NATS connection, the membership check at start, and
the stanzas relayed between nodes (``core/domain/relay.py``) with their answers.

Each node listens under ``interlink.<node id>.``: ``relay.<from>`` (batches of stanzas node
``<from>`` relays here), ``answers.<from>`` (that node's answers to what this node relayed) and
``hello`` (who this node is: its node list's digest, version, sessions — asked by a starting node
and by ``interlink cluster status``). The sending node is named by the subject, which NATS
permissions can pin to each node's credentials (docs/operations.md "Running a cluster"), and
must be one of the node list. What the relay gathers in one event-loop turn leaves in one NATS
message per node, written in that turn on one connection, so a device's stanzas to a node arrive
there in the order it sent them. Everything travels on the node's own NATS connection
(``core/edge/natsconn.py``: a NATS round trip costs about 0.6–0.8× nats-py's CPU,
``bench/nats_floor.py``; and TLS wherever it is asked for). Payloads are msgpack maps:

* relay: ``{"m": digest, "r": [[seq, provider, localpart, device, max plaintext, stanza], ...]}``
* answers: ``{"a": [[seq, encoded answer stanza or nil], ...]}``
* hello: ``{"from": node, "m": digest, "i": instance}`` → ``{"node", "m", "i", "version", "software", "sessions", ...}``

A node whose digest differs is refused: at start (``check_membership``: this node does not
serve), and per batch (every stanza of it is answered ``internal``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import time
from collections import Counter

import msgpack

from interlink.core.domain.cluster import redact
from interlink.core.domain.relay import internal_error
from interlink.core.edge.metrics import Histogram
from interlink.core.edge.natsconn import CONNECT_FAULTS, NatsConnection
from interlink.core.errors import ConfigError

log = logging.getLogger("interlink.cluster")

HELLO_TIMEOUT_S = 1.0
TWIN_WAIT_S = 0.15  # after this node's own hello answer, how long another instance of it gets to answer too
LOOK_LINGER_S = 1.0  # ... when a serving process looks for twins (no hurry: nothing waits for it)
LOOK_EVERY_S = 2.0  # a serving process looks for twins at most this often (a twin's look makes it look)
MIN_MAX_PAYLOAD = 128 * 1024  # NATS must carry one relayed stanza of the largest frame with room to spare
START_ATTEMPTS = 2  # further tries per NATS server before a start gives up (0.5 s apart)
CONNECT_TIMEOUT_S = 2.0  # each step of one connection attempt to a NATS server (TCP, INFO, TLS, PONG)
EXPIRY_TICK_S = 0.05  # how often relayed stanzas past their deadline are looked for
# Relay round trips over loopback take ~0.3-1 ms, commit included; a struggling node, seconds.
RELAY_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)


def subject(node: str, what: str, origin: str | None = None) -> str:
    return f"interlink.{node}.{what}" if origin is None else f"interlink.{node}.{what}.{origin}"


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)  # ciphertext maps have int keys


class ClusterLink:
    """One node's NATS connection, carrying the relay's output and input."""

    def __init__(self, server, cluster, *, software: str, clock=time.time) -> None:
        self.server = server
        self.config = cluster  # interlink.config.ClusterConfig (or anything with its fields)
        self.node = cluster.node
        self.digest = cluster.digest
        self.relay = server.domain.relay
        self.relay.wake = self._wake
        self.software = software
        self.clock = clock
        self.wire: NatsConnection | None = None
        self.round_trips = Histogram(RELAY_BUCKETS_S)  # relayed stanza -> its answer, seconds
        self.counters: Counter = Counter()
        self._ticker: asyncio.TimerHandle | None = None
        self._max_batch_bytes = 512 * 1024
        self._closing = False
        self.instance = os.urandom(8).hex()  # tells this process from another started with the same node id
        self.started_at = clock()  # of two twins, the one started later stands down (_stand_down)
        self.stood_down = False
        self._last_look = -math.inf  # time.monotonic() of the last look for twins
        self._look_handle: asyncio.TimerHandle | None = None  # a look waiting for LOOK_EVERY_S to pass
        self._relay_subscription: int | None = None
        self._publish_failing = False  # a failed publish was logged; the next is not, until reconnected
        others = [node for node in cluster.nodes if node != self.node]
        self._relay_subjects = {node: subject(node, "relay", self.node).encode() for node in others}
        self._answer_subjects = {node: subject(node, "answers", self.node).encode() for node in others}
        self._instances: dict[str, str] = {}  # node -> the instance id of its process that said hello last
        self._twin_check: asyncio.Task | None = None  # after a reconnect: does another process serve this node id?

    # -- lifecycle

    async def start(self) -> None:
        """Connect, refuse a second process with this node id or a node running another node list
        (``ConfigError``), then listen."""
        config = self.config
        self.wire = NatsConnection(config.nats, name=f"interlink-{self.node}", tls=nats_tls(config),
                                   credentials=config.nats_credentials or None, connect_timeout_s=CONNECT_TIMEOUT_S,
                                   min_max_payload=MIN_MAX_PAYLOAD, max_wait_s=config.request_timeout_s,
                                   inbox_prefix=self.node, counters=self.counters, echo=True,
                                   on_disconnected=self._disconnected, on_reconnected=self._reconnected)
        self.wire.subscribe(subject(self.node, "hello").encode(), self._on_hello)
        give_up_s = (CONNECT_TIMEOUT_S + 0.5) * (START_ATTEMPTS + 1) * len(config.nats) + 1.0
        try:
            try:
                await asyncio.wait_for(self.wire.connect(START_ATTEMPTS), give_up_s)
            except CONNECT_FAULTS as exc:
                raise cannot_connect(config, exc, give_up_s) from None
            self._sized_to_the_server()
            await self._refuse_twin()
            # Only now: a second process of this node id must never take the first one's stanzas.
            self._relay_subscription = self.wire.subscribe(subject(self.node, "relay", "*").encode(), self._on_relay)
            self.wire.subscribe(subject(self.node, "answers", "*").encode(), self._on_answers)
            if not await self.wire.flush(HELLO_TIMEOUT_S):  # the SUBs are in before any node hears our hello
                raise ConfigError(f"cluster.nats: NATS did not confirm this node's subscriptions within "
                                  f"{HELLO_TIMEOUT_S:.0f} s")
            await self.check_membership()
        except BaseException:
            await self.wire.close()
            raise
        self._keep_ticking()  # group fan-out entries left from before a restart go out now
        log.info("cluster node %s joined through %r (node list version %d, %d nodes)", self.node, self.wire.server,
                 config.version, len(config.nodes))

    def _sized_to_the_server(self) -> None:
        self._max_batch_bytes = self.wire.max_payload - 1024  # room for the map around the entries
        # A group fan-out window leaves in one NATS message with room for the turn's other stanzas
        # (cut in two it would still be stored in order, but sent again in part).
        self.relay.outbox.window_bytes = min(self.relay.outbox.window_bytes, self._max_batch_bytes // 2)

    async def _refuse_twin(self) -> None:
        """``ConfigError`` if another process answers for this node id (this one hears its own
        answer too: the connection's echo). Asked before subscribing to relays, after the hello
        subscription, so of two instances starting together each sees the other (and both refuse)."""
        if await self._twins():
            raise ConfigError(f"cluster.node: node {self.node} is already running (another process answers for it)")

    async def _twins(self, look: bool = False) -> list[dict]:
        """The answers of other processes to a hello for this node id (``look``: asked by a
        process that serves already — not by one starting — and lingering longer)."""
        answers = await ask(self.wire, [self.node], self._hello_request(look), HELLO_TIMEOUT_S, every_answer=True,
                            enough=lambda got: any(a.get("i") == self.instance for a in got),
                            linger_s=LOOK_LINGER_S if look else TWIN_WAIT_S)
        return [answer for answer in answers if answer.get("i") != self.instance]

    def _look_soon(self) -> None:
        """Look for twins (``_look_for_twins``) now, or once ``LOOK_EVERY_S`` has passed since the
        last look — only while this process takes relays (not during its start, its drain, or once it
        stood down)."""
        if (self._closing or self._relay_subscription is None or self._twin_check is not None
                or self._look_handle is not None):
            return
        wait_s = self._last_look + LOOK_EVERY_S - time.monotonic()
        if wait_s > 0:
            self._look_handle = asyncio.get_running_loop().call_later(wait_s, self._start_look)
        else:
            self._start_look()

    def _start_look(self) -> None:
        self._look_handle = None
        if self._closing or self._relay_subscription is None:
            return
        self._last_look = time.monotonic()
        self._twin_check = asyncio.get_running_loop().create_task(self._look_for_twins())

    async def _look_for_twins(self) -> None:
        """After a reconnect, or when another process of this node id looks: one started while
        this one was cut off from NATS passed its start check, and both now serve this node's
        stanzas. Decided only from the answers on this process's own inbox — only holders of
        this node's NATS credentials can answer there, where anyone allowed to say hello could
        forge a hello: the one started later stands down (``_stand_down``); the earlier one looks
        again (``LOOK_EVERY_S``), which makes the later one look and find it, until it did."""
        self.counters["twin_looks"] += 1
        try:
            twins = await self._twins(look=True)
        except Exception:  # a check that could not run says nothing either way
            log.exception("cluster: could not look for another process serving node %s", self.node)
            return
        finally:
            self._twin_check = None
        serving = [twin for twin in twins if twin.get("serving") is True]  # not one refusing at its start
        if not serving:
            return
        self.counters["twins_seen"] += 1
        older = [twin for twin in serving if self._younger_than(twin)]
        if older:
            self._stand_down(older[0])
            return
        log.critical("cluster: another process (instance %s) serves node %s beside this one (%s): it started later, "
                     "while this one was cut off from NATS, and must stand down", serving[0].get("i"), self.node,
                     self.instance)
        self._look_soon()  # this look makes it look too

    def _younger_than(self, other: dict) -> bool:
        """Whether this process started after ``other`` (an answer from a process with this node
        id): by start time — the hosts' clocks decide — then instance id, so of two twins exactly
        one is younger. An answer without a start time (not this software) decides nothing."""
        started, instance = other.get("st"), other.get("i")
        if type(started) not in (int, float) or type(instance) is not str:
            return False
        return (started, instance) < (self.started_at, self.instance)

    def _stand_down(self, other: dict) -> None:
        """A process with this node id that started earlier serves it: take no more stanzas from
        other nodes and have the gateway stop (``GatewayServer.stand_down``). What this one
        stored while both served stays in its data folder, where the operator finds it."""
        if self.stood_down:
            return
        self.stood_down = True
        self.counters["stood_down"] += 1
        self._unsubscribe_relays()
        message = (f"node {self.node}: another process (instance {other.get('i')}) started earlier and serves it; this one "
                   f"({self.instance}) started while that one was cut off from NATS and stands down — what it stored "
                   "meanwhile stays in its data folder")
        log.critical("cluster: %s", message)
        self.server.stand_down(message)

    async def check_membership(self) -> None:
        """Ask every other node who it is; ``ConfigError`` if one runs another node list (a node
        that is not up checks this node's list when it starts)."""
        others = sorted(node for node in self.config.nodes if node != self.node)
        for hello in await ask(self.wire, others, self._hello_request(), HELLO_TIMEOUT_S):
            if hello.get("m") != self.digest:
                raise ConfigError(
                    f"cluster: node {hello.get('node')} runs another node list (its version {hello.get('version')}, "
                    f"this node's {self.config.version}): every node must list the same nodes, addresses and version; "
                    "not serving")

    async def stop_serving(self) -> None:
        """Take no more stanzas from other nodes (a drain: what they relayed so far is committed
        and answered before ``close``)."""
        self._unsubscribe_relays()

    def _unsubscribe_relays(self) -> None:
        if self._relay_subscription is not None:
            self.wire.unsubscribe(self._relay_subscription)  # not connected: nothing arrives anyway
            self._relay_subscription = None

    async def close(self) -> None:
        """Answer what still waits for another node (``overloaded``, unconfirmed), send what is
        queued — the answers this node owes included — then leave NATS."""
        self._closing = True
        if self._twin_check is not None:
            self._twin_check.cancel()
            self._twin_check = None
        if self._look_handle is not None:
            self._look_handle.cancel()
            self._look_handle = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.relay.expire(self.clock(), everything=True):
            self.server.cluster_input_done()
        if self.wire is None:
            return
        self._flush()
        if not await self.wire.flush(1.0):
            log.warning("cluster: NATS did not confirm the last relayed stanzas and answers at close")
        await self.wire.close()
        self.wire = None

    async def settle(self, timeout_s: float) -> None:
        """Wait until every relayed stanza is answered or timed out (a drain's acks go out first)."""
        deadline = time.monotonic() + timeout_s
        while self.relay.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    # -- output: once per loop turn

    def _wake(self) -> None:
        """The relay has output, and asks once until it is taken (``Relay._ask_flush``)."""
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        outgoing, replies = self.relay.take_output()
        try:
            for node, records in outgoing.items():
                self.counters["batches_out"] += self._publish_batch(self._relay_subjects[node], "r", records)
            for node, answers in replies.items():
                self.counters["answer_batches_out"] += self._publish_batch(self._answer_subjects[node], "a", answers)
        finally:
            self._keep_ticking()

    def _publish_batch(self, name: bytes, field: str, entries: list) -> int:
        """Publish ``entries`` on subject ``name`` in one message, or in halves while one would be
        over NATS's max_payload (packed once in the usual case); returns how many messages. An
        entry that cannot be packed, or a message NATS cannot take now, is dropped (its sender's
        deadline answers it)."""
        batch = {field: entries}
        if field == "r":
            batch["m"] = self.digest
        try:
            payload = msgpack.packb(batch)
        except (ValueError, TypeError, OverflowError) as exc:  # never expected: entries are built from checked fields
            if len(entries) > 1:
                half = len(entries) // 2
                return self._publish_batch(name, field, entries[:half]) + self._publish_batch(name, field, entries[half:])
            self.counters["unpackable"] += 1
            log.error("cluster: dropped an entry for %s that cannot be packed: %s", name, exc)
            return 0
        if len(payload) > self._max_batch_bytes and len(entries) > 1:
            half = len(entries) // 2
            return self._publish_batch(name, field, entries[:half]) + self._publish_batch(name, field, entries[half:])
        if self.wire is not None and self.wire.publish(name, payload):  # None: closed
            return 1
        self.counters["publish_failures"] += 1
        if not self._publish_failing:  # once per outage: a log line per dropped message says nothing more
            self._publish_failing = True
            log.warning("cluster: cannot publish to %s (%s): dropping relayed stanzas and answers until NATS takes "
                        "them again (their senders time out)", name.decode(),
                        "closed" if self.wire is None else "8 MiB wait for NATS to come back"
                        if not self.wire.connected else "NATS is not taking them fast enough")
        return 0

    def _tick(self) -> None:
        self._ticker = None
        if self._closing:
            return
        if self.relay.expire(self.clock()):  # also sends the group fan-out entries that are due
            self.server.cluster_input_done()
        self._keep_ticking()

    def _keep_ticking(self) -> None:
        """Look for deadlines and due fan-out entries every ``EXPIRY_TICK_S`` while there are any."""
        if self._ticker is None and not self._closing and self.relay.needs_tick:
            self._ticker = asyncio.get_running_loop().call_later(EXPIRY_TICK_S, self._tick)

    # -- input

    def _origin(self, name: str) -> str | None:
        """The node a relay or answers message came from (its subject's last token), if a node."""
        origin = name.rpartition(".")[2]
        if origin == self.node or origin not in self.config.nodes:
            self.counters["unknown_origin"] += 1
            log.error("cluster: a message on %s names no other node of the list", name)
            return None
        return origin

    def _read(self, name: str, payload: bytes | None, field: str) -> tuple[str, dict, list] | None:
        """A relay or answers message: (origin node, the batch, its list ``field``), or None when it
        names no other node or cannot be read (another node's bug: counted, logged, dropped —
        its senders time out)."""
        origin = self._origin(name)
        if origin is None:
            return None
        try:
            batch = _unpack(payload)
            entries = batch[field]
            if type(entries) is not list:
                raise TypeError(f"the batch's {field!r} is not a list")
        except Exception as exc:  # anything unreadable is the same fault here
            self.counters["malformed_batches"] += 1
            log.error("cluster: unreadable batch on %s from %s: %s", name, origin, exc)
            return None
        return origin, batch, entries

    def _on_relay(self, name: str, reply: str | None, payload: bytes | None) -> None:
        read = self._read(name, payload, "r")
        if read is None:
            return
        origin, batch, records = read
        self.counters["batches_in"] += 1
        try:
            if batch.get("m") != self.digest:
                self.counters["mismatched_batches"] += 1
                log.error("cluster: node %s relays under another node list; its stanzas are refused", origin)
                for record in records:
                    if type(record) is list and len(record) == 6 and type(record[0]) is int:
                        stanza = record[5] if isinstance(record[5], dict) else {}
                        self.relay.reply(origin, record[0], internal_error(
                            stanza, "the cluster's nodes disagree about the node list"))
                return
            self.relay.serve(origin, records, self.clock())
        finally:
            self.server.cluster_input_done()

    def _on_answers(self, name: str, reply: str | None, payload: bytes | None) -> None:
        read = self._read(name, payload, "a")
        if read is None:
            return
        origin, _, answers = read
        now = self.clock()
        relay, observe = self.relay, self.round_trips.observe
        try:
            for entry in answers:
                if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not int or (
                        entry[1] is not None and type(entry[1]) is not bytes):
                    self.counters["malformed_answers"] += 1
                    continue
                try:
                    round_trip = relay.answered(origin, entry[0], entry[1], now)
                except Exception:  # a bug of ours with one answer must not cost the batch's others theirs
                    self.counters["answer_errors"] += 1
                    log.exception("cluster: taking an answer from node %s failed", origin)
                    continue
                if round_trip is not None:
                    observe(round_trip)
        finally:
            self.server.cluster_input_done()

    def _on_hello(self, name: str, reply: str | None, payload: bytes | None) -> None:
        try:
            asked = _unpack(payload)
        except Exception:  # answer anyway: the asker learns who runs here
            asked = {}
        if not isinstance(asked, dict):
            asked = {}
        if asked.get("m") not in (None, self.digest):
            log.warning("cluster: node %s runs another node list than this node", asked.get("from"))
        if asked.get("from") == self.node and asked.get("i") not in (None, self.instance):
            # A second process starting (it refuses on this answer), or one that served beside this
            # one while cut off from NATS and looks again after its reconnect (``look``): of those
            # two, the one started later stands down.
            # Only a look of this process's own decides (the hello may be forged).
            self.counters["twins_seen"] += 1
            log.error("cluster: another process of node %s (instance %s) asks who runs it: a second one starting "
                      "refuses to serve; of two serving, the one started later stands down", self.node, asked.get("i"))
            if asked.get("look") is True:
                self._look_soon()
        origin, instance = asked.get("from"), asked.get("i")
        if (type(origin) is str and origin != self.node and origin in self.config.nodes and asked.get("m") == self.digest
                and type(instance) is str and self._instances.get(origin) != instance):
            # Another node's new process (a start asks every node): its members' group fan-out goes
            # now. Once per process, and the relay acts at most once per RETRY_S per node.
            self._instances[origin] = instance
            self.relay.node_started(origin, self.clock())
        # Only to an inbox: a reply subject is the asker's to choose, and this node may publish
        # relays and answers under its own name — it must not be made to publish there.
        if reply is not None and reply.startswith("_INBOX."):
            self.wire.publish(reply.encode(), msgpack.packb(self.status()))

    def _hello_request(self, look: bool = False) -> bytes:
        request = {"from": self.node, "m": self.digest, "i": self.instance, "st": self.started_at}
        if look:
            request["look"] = True
        return msgpack.packb(request)

    def status(self) -> dict:
        """What this node tells the others and ``interlink cluster status`` about itself."""
        server = self.server
        return {
            "node": self.node, "m": self.digest, "i": self.instance, "st": self.started_at,
            "serving": self._relay_subscription is not None,  # past its start check, not stood down
            "version": self.config.version,
            "software": self.software,
            "nodes": sorted(self.config.nodes), "sessions": len(server.sessions), "connections": len(server.connections),
            "relay": dict(self.relay.counters), "waiting": len(self.relay.waiting),
            "waiting_bytes": self.relay.waiting_bytes, "link": dict(self.counters),
            "outbox_backlog": self.relay.outbox.backlog,
            "outbox_by_node": self.relay.outbox.backlogs(),
            "round_trips": self.round_trips.snapshot()["count"], "time": self.clock(),
        }

    # -- NATS connection events

    @property
    def connected(self) -> bool:
        """Whether relayed stanzas can leave now."""
        return self.wire is not None and self.wire.connected

    def _disconnected(self) -> None:
        self.counters["disconnects"] += 1
        log.warning("cluster: disconnected from NATS; relayed stanzas wait (their senders get overloaded past "
                    "%.1f s)", self.config.request_timeout_s)

    def _reconnected(self) -> None:
        self._publish_failing = False
        self._sized_to_the_server()
        self._look_soon()  # a process of this node id may have started while this one was cut off
        log.info("cluster: reconnected to NATS at %r", self.wire.server)


def nats_tls(cluster) -> ssl.SSLContext | None:
    """The TLS context for ``cluster.nats_ca_file`` (None: the system's CAs, for ``tls://`` URLs)."""
    if not cluster.nats_ca_file:
        return None
    try:
        return ssl.create_default_context(cafile=cluster.nats_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cluster.nats_ca_file: cannot use {cluster.nats_ca_file} as the CA of the NATS servers: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def cannot_connect(cluster, exc: BaseException, give_up_s: float) -> ConfigError:
    servers = ", ".join(redact(url) for url in cluster.nats)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        hint = (" (TLS: is cluster.nats_ca_file the CA that signed the servers' certificates?)"
                if any(url.startswith("tls://") for url in cluster.nats) or cluster.nats_ca_file else "")
        return ConfigError(f"cluster.nats: cannot connect to {servers} within {give_up_s:.0f} s{hint}")
    return ConfigError(f"cluster.nats: cannot connect to {servers}: {type(exc).__name__} {exc}".rstrip())


async def ask(connection: NatsConnection, nodes: list[str], request: bytes, timeout_s: float, *,
              every_answer: bool = False, enough=None, linger_s: float = 0.0) -> list[dict]:
    """Ask each of ``nodes`` ``hello`` (``request``), each on a reply subject of its own, and
    gather the answers — msgpack maps naming the node asked on that subject; anything else there
    is someone else's and ignored — until every node answered (with ``every_answer``: every
    process answering for it, until ``enough(answers)``) or NATS said nobody listens there; then
    ``linger_s`` more. At most ``timeout_s + linger_s``."""
    if not nodes:
        return []
    inbox = connection.new_inbox()
    answers: list[dict] = []
    settled: set[int] = set()  # nodes (by index) that answered, or that nobody listens for
    done = asyncio.Event()

    def collect(name: str, reply: str | None, payload: bytes | None) -> None:
        index = name.rpartition(".")[2]
        if not index.isdigit() or int(index) >= len(nodes) or (int(index) in settled and not every_answer):
            return
        index = int(index)
        if payload is not None:
            try:
                answer = _unpack(payload)
            except Exception:  # not a hello answer: someone else's bytes on our inbox
                return
            if not isinstance(answer, dict) or answer.get("node") != nodes[index]:
                return
            answers.append(answer)
        settled.add(index)
        if enough(answers) if enough is not None else len(settled) == len(nodes):
            done.set()

    sid = connection.subscribe(inbox + b".*", collect)
    try:
        for index, node in enumerate(nodes):
            connection.publish(subject(node, "hello").encode(), request, reply=inbox + b".%d" % index)
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            return answers
        await asyncio.sleep(linger_s)
    finally:
        connection.unsubscribe(sid)
    return answers


async def ask_nodes(cluster, timeout_s: float = HELLO_TIMEOUT_S) -> dict[str, dict | None]:
    """Every node's own report (``ClusterLink.status``), None for a node that did not answer:
    what ``interlink cluster status`` shows. ``ConfigError`` when NATS is unreachable (or a
    ``.creds`` file unusable: read at the connect)."""
    connection = NatsConnection(cluster.nats, name="interlink-cluster-status", tls=nats_tls(cluster),
                                credentials=cluster.nats_credentials or None, connect_timeout_s=CONNECT_TIMEOUT_S,
                                inbox_prefix="status")
    give_up_s = (CONNECT_TIMEOUT_S + 1.0) * len(cluster.nats)
    nodes = sorted(cluster.nodes)
    try:
        try:
            await asyncio.wait_for(connection.connect(), give_up_s)
        except CONNECT_FAULTS as exc:
            raise cannot_connect(cluster, exc, give_up_s) from None
        answers = await ask(connection, nodes, msgpack.packb({"from": "status", "m": cluster.digest}), timeout_s)
    finally:
        await connection.close()
    reports: dict[str, dict | None] = {node: None for node in nodes}
    for answer in answers:
        reports[answer["node"]] = answer
    return reports
