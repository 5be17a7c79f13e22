"""A cluster end to end (issue 18): three gateway nodes and a real nats-server on loopback, users
of every provider homed on different nodes by rendezvous hashing. A session opened on another
node is redirected home; 1:1 messages, receipts, typing state, device lists and prekeys cross
nodes over NATS; an ack still means every copy is durable; a node that does not answer gets the
sender ``overloaded``, never an ack; a resend is recognised where its copies are stored."""

from __future__ import annotations

import asyncio
import os
import shutil

import msgpack
import pytest

from interlink.client import Client
from interlink.config import ClusterConfig, NodeAddress
from interlink.core.domain.cluster import Membership
from interlink.core.edge.keyfiles import ROOT_KEY_FILE, ROOT_PUBLIC_FILE, init_operator_keys
from interlink.core.edge.natsconn import NatsConnection
from interlink.core.errors import ConfigError, RedirectedError, ServerError
from interlink.gateway import Gateway
from interlink.load.nats import LocalNats
from interlink.testing import ProxyRelay, free_ports, homed_users, keys_for_nodes, until
from interlink.core.domain.batch import device_key
from three_providers import AUD, close_all, config_for, nothing_arrives

NODES = ("node-a", "node-b", "node-c")


@pytest.fixture
async def nats_server(tmp_path):
    server = LocalNats(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()


def cluster_config(nats_url: str, ports: dict, node: str, *, version: int = 1, timeout_s: float = 2.0,
                   ws_ports: dict | None = None) -> ClusterConfig:
    ws = {n: f"ws://127.0.0.1:{port}/interlink" for n, port in (ws_ports or {}).items()}
    return ClusterConfig(node=node, nodes={n: NodeAddress("127.0.0.1", port, ws.get(n)) for n, port in ports.items()},
                         version=version, nats=(nats_url,), request_timeout_s=timeout_s)


class Cluster:
    """Nodes (three by default) sharing one operator root, and ``connect`` for any user at any
    node. Over ``tmp_path / node``: a node whose folder has keys already keeps them and, with
    ``ports``, its port (a node list change: ``test_cluster_move``); a new node's keys are made
    under the same root."""

    def __init__(self, issuers, tmp_path, nats_url: str, nodes=NODES, *, websocket: bool = False, version: int = 1,
                 ports: dict | None = None) -> None:
        self.issuers = dict(zip(("alpha", "beta", "gamma"), issuers))
        self.issuer_list = issuers
        self.tmp_path = tmp_path
        self.nats_url = nats_url
        self.nodes = tuple(nodes)
        self.version = version
        ports = dict(ports or {})
        fresh = [node for node in self.nodes if node not in ports]
        ports.update(zip(fresh, free_ports(len(fresh))))
        self.ports = {node: ports[node] for node in self.nodes}
        # With websocket, every node serves WebSocket too, at the URL its node list entry names.
        self.ws_ports = dict(zip(self.nodes, free_ports(len(self.nodes)))) if websocket else {}
        self._make_keys()
        self.gateways: dict[str, Gateway] = {}
        self.membership = Membership(self.nodes, version)

    def _make_keys(self) -> None:
        made = [node for node in self.nodes if (self.tmp_path / node / "keys").is_dir()]
        if not made:
            keys_for_nodes({node: self.tmp_path / node / "keys" for node in self.nodes})
            return
        for node in self.nodes:
            folder = self.tmp_path / node / "keys"
            if node in made:
                continue
            folder.mkdir(mode=0o700, parents=True)
            for name in (ROOT_KEY_FILE, ROOT_PUBLIC_FILE):
                shutil.copy2(self.tmp_path / made[0] / "keys" / name, folder / name)
            init_operator_keys(folder, node, force=True)

    def config(self, node: str, **settings):
        cluster = cluster_config(self.nats_url, self.ports, node, version=self.version,
                                 timeout_s=settings.pop("timeout_s", 2.0), ws_ports=self.ws_ports)
        if self.ws_ports:
            settings.setdefault("ws_port", self.ws_ports[node])
        return config_for(self.issuer_list, self.tmp_path / node, port=self.ports[node], node_name=node,
                          cluster=cluster, **settings)

    async def start(self, node: str, **settings) -> Gateway:
        gateway = Gateway(self.config(node, **settings))
        await gateway.start()
        self.gateways[node] = gateway
        return gateway

    async def stop(self, node: str) -> None:
        await self.gateways.pop(node).stop()

    async def stop_all(self) -> None:
        for node in list(self.gateways):
            await self.stop(node)

    def home(self, address: str) -> str:
        return self.membership.home(address)

    def users(self, provider: str, per_node: int = 1) -> dict[str, list[str]]:
        return homed_users(self.membership, provider, per_node)

    async def connect(self, address: str, device: int = 1, *, via: str | None = None, phone: str | None = None,
                      **options) -> Client:
        """Connect ``address``'s device through node ``via`` (default: a node that is not its home),
        with a verified ``phone`` claim if given."""
        localpart, provider = address.split("@")
        extra = {"phone_number": phone, "phone_number_verified": True} if phone is not None else None
        token = self.issuers[provider].issue(localpart, audience=AUD, extra_claims=extra)
        if via is None:
            via = next(node for node in self.nodes if node != self.home(address) and node in self.gateways)
        gateway = self.gateways[via]
        return await Client.connect("127.0.0.1", self.ports[via], token=token, device=device,
                                    root_public=gateway.root_public, **options)


@pytest.fixture
async def cluster(issuers, tmp_path, nats_server):
    cluster = Cluster(issuers, tmp_path, nats_server.url)
    for node in NODES:
        await cluster.start(node)
    yield cluster
    await cluster.stop_all()


async def next_dlv(client: Client, timeout_s: float = 5.0) -> dict:
    stanza = await client.recv(timeout_s=timeout_s)
    assert stanza["t"] == "dlv", stanza
    return stanza


def node_of(client: Client) -> str:
    return client._conn.certificate.node


async def test_a_session_opened_elsewhere_is_redirected_home_before_anything_is_stored(cluster):
    alice = cluster.users("alpha")["node-b"][0]
    away = next(node for node in NODES if node != "node-b")
    client = await cluster.connect(alice, via=away)
    assert node_of(client) == "node-b" and client.welcome["user"] == alice
    assert cluster.gateways[away]._server.counters["redirects"] == 1
    assert cluster.gateways[away]._server.store.devices(alice) == ()  # nothing stored where it is not home
    assert cluster.gateways["node-b"]._server.store.devices(alice) == (1,)
    await client.close()


async def test_without_following_the_redirect_the_client_learns_where_home_is(cluster, monkeypatch):
    import interlink.client as client_module

    carol = cluster.users("beta")["node-c"][0]
    token = cluster.issuers["beta"].issue(carol.split("@")[0], audience=AUD)
    monkeypatch.setattr(client_module, "MAX_REDIRECTS", 0)
    with pytest.raises(RedirectedError) as caught:
        await Client.connect("127.0.0.1", cluster.ports["node-a"], token=token, device=1,
                             root_public=cluster.gateways["node-a"].root_public)
    assert (caught.value.node, caught.value.host, caught.value.port) == ("node-c", "127.0.0.1", cluster.ports["node-c"])
    assert caught.value.reason == "redirect"


async def test_messages_cross_nodes_with_own_copies_in_order(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-b"][0]
    alice1, alice2 = await cluster.connect(alice, 1), await cluster.connect(alice, 2)
    bob1, bob2 = await cluster.connect(bob, 1), await cluster.connect(bob, 2)
    assert {node_of(c) for c in (alice1, alice2)} == {"node-a"} and {node_of(c) for c in (bob1, bob2)} == {"node-b"}
    sent = []
    for i in range(20):
        msg_id = os.urandom(16)
        ack = await alice1.send_message(bob, {1: b"b1-%d" % i, 2: b"b2-%d" % i}, own={2: b"a2-%d" % i}, msg_id=msg_id)
        assert ack["t"] == "ack" and ack["id"] == msg_id and "dup" not in ack
        sent.append((msg_id, ack["ts"]))
    for client, prefix in ((bob1, b"b1-"), (bob2, b"b2-"), (alice2, b"a2-")):
        dlvs = [await next_dlv(client) for _ in range(20)]
        assert [d["c"] for d in dlvs] == [prefix + b"%d" % i for i in range(20)]
        assert [d["id"] for d in dlvs] == [msg_id for msg_id, _ in sent]
        assert all(d["from"] == alice and d["dev"] == 1 for d in dlvs)
    reply = await bob2.send_message(alice, {1: b"hi 1", 2: b"hi 2"}, own={1: b"bob copy"})
    assert reply["t"] == "ack"
    assert [(await next_dlv(c))["c"] for c in (alice1, alice2, bob1)] == [b"hi 1", b"hi 2", b"bob copy"]
    for client in (alice1, alice2, bob1, bob2):
        await client.close()


async def test_pipelined_messages_to_several_nodes_keep_each_devices_order(cluster):
    """A device sends to users on every node, pipelined: each recipient device, and its own other
    device, gets the messages in the order sent."""
    users = cluster.users("alpha", per_node=1)
    sender = users["node-a"][0]
    recipients = [users["node-b"][0], users["node-c"][0], cluster.users("beta")["node-a"][0]]
    me1, me2 = await cluster.connect(sender, 1), await cluster.connect(sender, 2)
    others = [await cluster.connect(r) for r in recipients]
    sends = []
    for i in range(30):
        to = recipients[i % 3]
        sends.append(me1.send_message(to, {1: b"%d" % i}, own={2: b"%d" % i}))
    acks = await asyncio.gather(*sends)
    assert all(ack["t"] == "ack" for ack in acks)
    for index, client in enumerate(others):
        got = [(await next_dlv(client))["c"] for _ in range(10)]
        assert got == [b"%d" % i for i in range(index, 30, 3)]
    own = [(await next_dlv(me2)) for _ in range(30)]
    assert [d["c"] for d in own] == [b"%d" % i for i in range(30)]
    assert [d["to"] for d in own] == [recipients[i % 3] for i in range(30)]
    for client in (me1, me2, *others):
        await client.close()


async def test_a_resend_is_recognised_where_the_copies_are_stored(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-c"][0]
    alice1, alice2 = await cluster.connect(alice, 1), await cluster.connect(alice, 2)
    bob1 = await cluster.connect(bob)
    msg_id = os.urandom(16)
    first = await alice1.send_message(bob, {1: b"once"}, own={2: b"mine"}, msg_id=msg_id)
    again = await alice1.send_message(bob, {1: b"once"}, own={2: b"mine"}, msg_id=msg_id)
    assert again["dup"] is True and again["ts"] == first["ts"]
    assert (await next_dlv(bob1))["c"] == b"once" and (await next_dlv(alice2))["c"] == b"mine"
    await nothing_arrives(bob1)
    await nothing_arrives(alice2, timeout_s=0.1)
    assert cluster.gateways["node-c"]._server.router.counters["duplicates"] == 1
    for client in (alice1, alice2, bob1):
        await client.close()


async def test_refusals_come_from_the_recipients_home_and_nothing_is_stored(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    gary = cluster.users("gamma")["node-b"][0]  # gamma accepts only its own users
    bob = cluster.users("beta")["node-c"][0]
    alice1, alice2 = await cluster.connect(alice, 1), await cluster.connect(alice, 2)
    gary1 = await cluster.connect(gary)
    bob1 = await cluster.connect(bob)
    with pytest.raises(ServerError) as refused:
        await alice1.send_message(gary, {1: b"x"}, own={2: b"copy"})
    assert refused.value.code == "not_opted_in"
    with pytest.raises(ServerError) as mismatch:
        await alice1.send_message(bob, {1: b"x", 7: b"y"}, own={2: b"copy"})
    assert mismatch.value.code == "device_mismatch" and mismatch.value.fields["extra"] == [7]
    with pytest.raises(ServerError) as unknown:
        await alice1.send_message(cluster.users("beta", per_node=2)["node-b"][1], {1: b"x"})
    assert unknown.value.code == "unknown_recipient"
    await nothing_arrives(alice2)  # no own copy of a refused message
    for client in (alice1, alice2, gary1, bob1):
        await client.close()


async def test_receipts_typing_state_and_lookups_cross_nodes(cluster):
    alice = cluster.users("alpha")["node-b"][0]
    bob = cluster.users("beta")["node-c"][0]
    alice1, alice2 = await cluster.connect(alice, 1), await cluster.connect(alice, 2)
    bob1 = await cluster.connect(bob)
    ack = await alice1.send_message(bob, {1: b"hello"})
    dlv = await next_dlv(bob1)
    assert (await alice1.iq("devices.get", user=bob))["devices"] == [1]
    assert (await bob1.iq("devices.get", user=alice))["devices"] == [1, 2]
    await bob1.send_receipt(alice, "read", [dlv["id"]])
    for client in (alice1, alice2):
        receipt = await next_dlv(client)
        assert (receipt["k"], receipt["kind"], receipt["ids"], receipt["from"]) == ("rcpt", "read", [ack["id"]], bob)
    await bob1.send_state(alice, "composing")
    for client in (alice1, alice2):
        state = await client.recv(timeout_s=5)
        assert state == {"t": "state", "from": bob, "s": "composing"}
    for client in (alice1, alice2, bob1):
        await client.close()


async def test_prekeys_are_handed_out_once_across_nodes(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-b"][0]
    alice1, bob1 = await cluster.connect(alice), await cluster.connect(bob)
    key = bytes(range(32))
    await bob1.iq("keys.put", ik=key, spk={"id": 1, "key": key, "sig": bytes(64)},
                       otpk=[{"id": 7, "key": key}])
    first = await alice1.iq("keys.get", user=bob)
    second = await alice1.iq("keys.get", user=bob)
    assert first["bundles"][0]["otpk"] == {"id": 7, "key": key}
    assert second["bundles"][0]["otpk"] is None
    for client in (alice1, bob1):
        await client.close()


async def test_a_node_that_does_not_answer_gets_the_sender_overloaded_never_an_ack(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-c"][0]
    bob1 = await cluster.connect(bob)
    await bob1.close()
    await cluster.stop("node-c")
    alice1 = await cluster.connect(alice, via="node-b")
    msg_id = os.urandom(16)
    with pytest.raises(ServerError) as refused:
        await alice1.send_message(bob, {1: b"lost?"}, msg_id=msg_id)
    assert refused.value.code == "overloaded" and refused.value.fields["retry_after"] > 0
    assert refused.value.fields["unconfirmed"] is True
    assert cluster.gateways["node-a"]._server.domain.relay.counters["timeouts"] == 1
    await cluster.start("node-c")
    ack = await alice1.send_message(bob, {1: b"lost?"}, msg_id=msg_id)  # the resend after the restart
    bob1 = await cluster.connect(bob)
    assert (await next_dlv(bob1))["c"] == b"lost?"
    assert "dup" not in ack
    for client in (alice1, bob1):
        await client.close()


async def test_a_node_with_another_node_list_refuses_to_start(cluster, tmp_path):
    await cluster.stop("node-c")
    config = cluster.config("node-c")
    config.cluster = cluster_config(cluster.nats_url, cluster.ports, "node-c", version=2)
    with pytest.raises(ConfigError, match="another node list"):
        await Gateway(config).start()
    config.cluster = cluster_config(cluster.nats_url, cluster.ports, "node-b")
    with pytest.raises(ConfigError, match="already running"):
        await Gateway(config).start()


async def test_unreachable_nats_is_a_clear_error(issuers, tmp_path):
    [port] = free_ports(1)
    keys_for_nodes({"node-a": tmp_path / "keys"})
    config = config_for(issuers, tmp_path, cluster=cluster_config(f"nats://127.0.0.1:{port}", {"node-a": 1}, "node-a"))
    with pytest.raises(ConfigError, match="cluster.nats: cannot connect"):
        await Gateway(config).start()


async def test_cluster_status_reports_every_node_and_who_is_missing(cluster, tmp_path):
    from click.testing import CliRunner

    from interlink.cli import main as cli_main
    from interlink.core.edge.clusterlink import ask_nodes

    alice = cluster.users("alpha")["node-b"][0]
    client = await cluster.connect(alice)
    reports = await ask_nodes(cluster.gateways["node-a"].config.cluster)
    assert set(reports) == set(NODES)
    assert all(report["m"] == cluster.gateways["node-a"].config.cluster.digest for report in reports.values())
    assert reports["node-b"]["sessions"] == 1 and reports["node-a"]["sessions"] == 0
    await client.close()
    await cluster.stop("node-c")
    nodes = "\n".join(f'{node} = "127.0.0.1:{port}"' for node, port in cluster.ports.items())
    path = tmp_path / "node-a.toml"
    path.write_text(f'[cluster]\nnode = "node-a"\nversion = 1\nnats = ["{cluster.nats_url}"]\n[cluster.nodes]\n{nodes}\n')
    result = await asyncio.to_thread(CliRunner().invoke, cli_main, ["cluster", "status", "--config", str(path)])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "not answering" in lines["node-c"] and " up " in lines["node-a"] and " up " in lines["node-b"]


async def test_an_answer_whose_taking_fails_costs_the_batchs_others_nothing(cluster, monkeypatch):
    """An answers message carries every user's answers from one node: a failure with one of them
    (a bug of ours; a relayed blob.read once raised so) is counted and the others are still taken."""
    link = cluster.gateways["node-a"]._server.cluster
    taken: list[int] = []

    def answered(node, seq, answer, now):
        if seq == 1:
            raise KeyError("a bug")
        taken.append(seq)

    monkeypatch.setattr(link.relay, "answered", answered)
    link._on_answers("interlink.node-a.answers.node-b", None, msgpack.packb({"a": [[1, None], [2, None], [3, None]]}))
    assert taken == [2, 3] and link.counters["answer_errors"] == 1


async def test_a_hello_is_answered_only_to_an_inbox(cluster):
    """Whoever may ask a node ``hello`` chooses the reply subject; the node may publish relays under
    its own name, so it must not be made to publish its status as a relay batch to another node."""
    from interlink.core.edge.natsconn import NatsConnection

    spy = NatsConnection([cluster.nats_url], name="spy")
    seen: list[tuple] = []
    spy.subscribe(b"interlink.node-b.relay.node-a", lambda *message: seen.append(message))
    answers: list[bytes] = []
    inbox = spy.new_inbox()
    spy.subscribe(inbox, lambda subject, reply, payload: answers.append(payload))
    await spy.connect()
    try:
        spy.publish(b"interlink.node-a.hello", msgpack.packb({"from": "status"}), reply=b"interlink.node-b.relay.node-a")
        spy.publish(b"interlink.node-a.hello", msgpack.packb({"from": "status"}), reply=inbox)
        await until(lambda: answers, "node-a's answer to the inbox")  # node-a read both, in order
        assert msgpack.unpackb(answers[0])["node"] == "node-a"
        assert await spy.flush(2.0) and seen == []
        assert cluster.gateways["node-b"]._server.cluster.counters["malformed_batches"] == 0
    finally:
        await spy.close()


async def test_a_twin_started_while_a_node_was_cut_off_stands_down_once_it_is_back(issuers, tmp_path, nats_server):
    """A second process with node-a's id passes its start check while node-a is cut off from NATS
    (nobody answers for node-a). Once node-a is back it looks again: both see it, and the one
    started later — the twin — takes no more stanzas from other nodes and drains itself."""
    import dataclasses

    # A plain TCP relay between node-a and NATS, cut (its connections closed) and mended on its port.
    link = ProxyRelay(("127.0.0.1", nats_server.port), header=lambda peer: b"", port=free_ports(1)[0])
    await link.__aenter__()
    cluster = Cluster(issuers, tmp_path, f"nats://127.0.0.1:{link.port}", nodes=("node-a", "node-b"))
    node_a = await cluster.start("node-a")
    await cluster.start("node-b")  # through the link too: cut and back with node-a
    twin = None
    try:
        await link.__aexit__()
        await until(lambda: not node_a._server.cluster.connected, "node-a cut off from NATS")
        shutil.copytree(tmp_path / "node-a" / "keys", tmp_path / "twin" / "keys")
        config = cluster.config("node-a")
        twin = Gateway(dataclasses.replace(config, data_dir=tmp_path / "twin", port=free_ports(1)[0],
                                           cluster=dataclasses.replace(config.cluster, nats=(nats_server.url,))))
        await twin.start()  # nobody answers for node-a: the start check passes
        twin_link, twin_relay = twin._server.cluster, twin._server.domain.relay
        await link.__aenter__()
        links = (node_a._server.cluster, twin_link)
        await until(lambda: all(link.counters["twins_seen"] >= 1 for link in links), "both see the other",
                    timeout_s=15)
        # The twin stood down: it took no more relays at once, drained and released its store.
        failure = await asyncio.wait_for(twin.wait_failed(), 15)
        assert "stands down" in failure and twin.failure == failure and not twin.running
        assert node_a.running and node_a.failure is None
        assert (twin_link.counters["stood_down"], node_a._server.cluster.counters["stood_down"]) == (1, 0)
        # Only node-a takes what other nodes relay for node-a's users.
        alice, bob = cluster.users("alpha")["node-a"][0], cluster.users("beta")["node-b"][0]
        alice1, bob1 = await cluster.connect(alice), await cluster.connect(bob)
        twin_served = twin_relay.counters["served"]
        await bob1.send_message(alice, {1: b"to the real node-a"})
        assert (await next_dlv(alice1))["c"] == b"to the real node-a"
        assert twin_relay.counters["served"] == twin_served
        for client in (alice1, bob1):
            await client.close()
    finally:
        if twin is not None:
            await twin.stop()
        await cluster.stop_all()
        await link.__aexit__()


async def test_a_forged_look_hello_makes_a_node_look_but_never_stand_down(cluster):
    """Anyone allowed to say hello (another node's user, the status user) can claim to be an
    older process of node-a looking for twins: node-a looks for itself, finds no other process
    answering on its own inbox, and keeps serving."""
    node_a = cluster.gateways["node-a"]
    link = node_a._server.cluster
    forger = NatsConnection([cluster.nats_url], name="forger")
    await forger.connect(1)
    try:
        forged = {"from": "node-a", "m": link.digest, "i": "0" * 16, "st": 0.0, "look": True}
        forger.publish(b"interlink.node-a.hello", msgpack.packb(forged))
        await until(lambda: node_a.stats()["cluster"]["link"].get("twin_looks", 0) >= 1 and link._twin_check is None,
                    "node-a looked, and its look ended", timeout_s=10)
        assert node_a.running and node_a.failure is None and link.status()["serving"]
        assert node_a.stats()["cluster"]["link"].get("stood_down", 0) == 0
    finally:
        await forger.close()


async def test_an_answer_counts_only_from_the_node_asked_on_its_subject(cluster):
    """``ask`` gives each node a reply subject of its own: an answer there naming another node is
    someone else's (a forged one could make a starting node refuse to serve, or a twin check fail)."""
    from interlink.core.edge.clusterlink import ask
    from interlink.core.edge.natsconn import NatsConnection

    asker, stranger = NatsConnection([cluster.nats_url], name="asker"), NatsConnection([cluster.nats_url], name="x")
    forged = msgpack.packb({"node": "node-b", "m": b"another list"})
    stranger.subscribe(b"interlink.node-z.hello", lambda subject, reply, payload: stranger.publish(reply.encode(), forged))
    await asker.connect(), await stranger.connect()
    try:
        assert await stranger.flush(2.0)
        answers = await ask(asker, ["node-b", "node-z"], msgpack.packb({"from": "status"}), 1.5)
        assert [answer["node"] for answer in answers] == ["node-b"]  # node-z's subject got node-b's name: ignored
        assert answers[0]["m"] == cluster.gateways["node-b"].config.cluster.digest
    finally:
        await asker.close(), await stranger.close()


async def test_the_load_tool_drives_a_cluster_through_any_one_node(cluster, tmp_path):
    """``interlink load --target`` at one node: every simulated device is redirected home, each
    pair talks across nodes, and every message is accounted for."""
    from interlink.load.chat import run_chat
    from interlink.load.target import RemoteGateway
    from load.helpers import scenario

    alphas, betas = cluster.users("alpha"), cluster.users("beta")
    pairs = [(alphas["node-a"][0], betas["node-b"][0]), (alphas["node-c"][0], betas["node-a"][0])]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(
        f"{address} {cluster.issuers[address.split('@')[1]].issue(address.split('@')[0], audience=AUD)}\n"
        for pair in pairs for address in pair))
    remote = RemoteGateway(f"127.0.0.1:{cluster.ports['node-b']}", cluster.gateways["node-b"].root_public.hex(), tokens)
    report = await run_chat(scenario("chat-1to1", users=4, rate=200, duration=1.0, warmup=0.2), out=None, target=remote)
    assert report["ok"] is True and report["accounting"]["unexplained"] == 0
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] > 0
    # Every message crossed nodes: each was relayed once (receipts and look-ups come on top).
    relayed = sum(gateway._server.domain.relay.counters["relayed"] for gateway in cluster.gateways.values())
    assert relayed >= report["accounting"]["sent"]
    assert sum(gw._server.router.counters["messages_stored"] for gw in cluster.gateways.values()) >= report["accounting"]["sent"]


async def test_a_node_that_cannot_listen_leaves_the_cluster_it_joined(cluster):
    """Joining happens before listening: a node whose port is taken must not stay in NATS, or its
    next start would be refused as already running."""
    await cluster.stop("node-c")
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", cluster.ports["node-c"]))
    blocker.listen()
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await Gateway(cluster.config("node-c")).start()
    finally:
        blocker.close()
    await cluster.start("node-c")  # not refused as "already running"
    assert cluster.gateways["node-c"].running


async def test_metrics_count_relayed_stanzas_round_trips_and_redirects(cluster):
    import aiohttp

    await cluster.stop("node-a")
    gateway = await cluster.start("node-a", admin_port=0)
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-b"][0]
    alice1 = await cluster.connect(alice, via="node-b")  # redirected by node-b
    bob1 = await cluster.connect(bob, via="node-a")  # redirected by node-a
    for _ in range(3):
        await alice1.send_message(bob, {1: b"x"})
    host, port = gateway.admin_address
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/metrics") as response:
        text = await response.text()
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert metrics["interlink_cluster_relayed_total"] == 3 and metrics["interlink_cluster_answered_total"] == 3
    assert metrics["interlink_cluster_relay_seconds_count"] == 3 and metrics["interlink_cluster_connected"] == 1
    assert metrics["interlink_cluster_timeouts_total"] == 0 and metrics["interlink_redirects_total"] == 1
    # The link's own: one NATS message per message sent one at a time (its answer came back in one too).
    assert metrics["interlink_cluster_link_relay_messages_out_total"] == 3
    assert metrics["interlink_cluster_link_publish_failures_total"] == 0
    assert metrics["interlink_cluster_link_malformed_messages_total"] == 0
    assert metrics["interlink_cluster_waiting_bytes"] == 0  # every stanza answered
    # What waits for a node that does not answer is counted against the bound, and shown.
    await bob1.close()
    await cluster.stop("node-b")
    unanswered = asyncio.ensure_future(alice1.send_message(bob, {1: bytes(5000)}))
    await until(lambda: gateway._server.domain.relay.waiting, "the message waiting for node-b")
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/metrics") as response:
        text = await response.text()
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert metrics["interlink_cluster_waiting"] == 1 and metrics["interlink_cluster_waiting_bytes"] > 5000
    with pytest.raises(ServerError, match="did not answer in time"):
        await unanswered
    await alice1.close()


async def test_websocket_clients_are_redirected_to_their_homes_websocket_url(issuers, tmp_path, nats_server):
    cluster = Cluster(issuers, tmp_path, nats_server.url, websocket=True)
    for node in NODES:
        await cluster.start(node)
    try:
        alice = cluster.users("alpha")["node-a"][0]
        token = cluster.issuers["alpha"].issue(alice.split("@")[0], audience=AUD)
        client = await Client.connect("127.0.0.1", cluster.ws_ports["node-b"], token=token, device=1,
                                      root_public=cluster.gateways["node-b"].root_public, ws_path="/interlink")
        assert node_of(client) == "node-a" and client.welcome["user"] == alice
        assert cluster.gateways["node-a"]._server.counters["ws_upgrades"] == 1
        await client.close()
    finally:
        await cluster.stop_all()


async def test_a_group_lives_on_its_home_node_and_members_of_every_node_get_everything(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    bob = cluster.users("beta")["node-b"][0]
    carol = cluster.users("alpha")["node-c"][0]
    alice1, alice2 = await cluster.connect(alice, 1), await cluster.connect(alice, 2)
    bob1, carol1 = await cluster.connect(bob), await cluster.connect(carol)
    created = await alice1.iq("group.new", members=[bob, carol])
    g = created["g"]
    home = cluster.membership.home(g)
    assert cluster.gateways[home]._server.store.group(g) is not None
    assert all(gw._server.store.group(g) is None for node, gw in cluster.gateways.items() if node != home)
    for client in (alice2, bob1, carol1):
        event = await next_dlv(client)
        assert (event["k"], event["event"], event["g"], event["ver"]) == ("group", "created", g, 1)
    acks = []
    for i, sender in enumerate((alice1, bob1, carol1, alice1)):
        acks.append((sender, await sender.send_group_message(g, b"m%d" % i)))
    expected = {alice1: [b"m1", b"m2"], alice2: [b"m0", b"m1", b"m2", b"m3"], bob1: [b"m0", b"m2", b"m3"],
                carol1: [b"m0", b"m1", b"m3"]}
    times: dict[bytes, set] = {}
    for client, bodies in expected.items():
        got = [await next_dlv(client) for _ in bodies]
        assert [d["c"] for d in got] == bodies and all(d["g"] == g for d in got)
        for d in got:
            times.setdefault(d["id"], set()).add(d["ts"])
    # Every copy of a message carries its ack's time, whichever node stored it.
    assert times == {ack["id"]: {ack["ts"]} for _, ack in acks}
    # Membership changes cross nodes too: carol leaves, bob is removed; they get nothing after.
    await carol1.iq("group.leave", g=g)
    await alice1.iq("group.del", g=g, members=[bob])
    for client, events in ((alice1, ["left"]), (alice2, ["left", "removed"]), (bob1, ["left", "removed"])):
        assert [(await next_dlv(client))["event"] for _ in events] == events
    await bob1.close()
    await carol1.close()
    await alice1.send_group_message(g, b"alone")
    assert (await next_dlv(alice2))["c"] == b"alone"
    # Once every node's group fan-out was stored, nothing was for the two who are gone (offline,
    # so whatever had been stored for them would still be there).
    await until(lambda: all(gateway._server.domain.relay.outbox.backlog == 0 for gateway in cluster.gateways.values()),
                "every node's group fan-out stored")
    for gone, node in ((bob, "node-b"), (carol, "node-c")):
        assert cluster.gateways[node]._server.store.pending_count(device_key(gone, 1)) == 0
    # Every node with members but the group's home stored copies for them on the home's word.
    served = {node: gw._server.domain.relay.counters["served"] for node, gw in cluster.gateways.items()}
    assert all(served[node] > 0 for node in NODES if node != home), served
    for client in (alice1, alice2, bob1, carol1):
        await client.close()


async def test_adding_a_member_of_another_node_asks_that_node_for_consent(cluster):
    alice = cluster.users("alpha")["node-a"][0]
    gus = cluster.users("gamma")["node-b"][0]  # gamma accepts only its own users
    nobody = cluster.users("beta", per_node=2)["node-c"][1]  # never connected
    alice1, gus1 = await cluster.connect(alice), await cluster.connect(gus)
    for member, code in ((gus, "not_opted_in"), (nobody, "unknown_recipient")):
        with pytest.raises(ServerError) as refused:
            await alice1.iq("group.new", members=[member])
        assert refused.value.code == code and refused.value.fields["user"] == member
    for client in (alice1, gus1):
        await client.close()


@pytest.mark.parametrize("home_is_senders_node", [True, False])
async def test_a_message_pipelined_behind_an_add_checked_on_another_node_reaches_the_new_member(
        cluster, home_is_senders_node):
    """The group's home is the sender's node (the message waits there) or another (it is relayed
    there and waits); the new member lives on a third node, or the second, which checks him."""
    alice = cluster.users("alpha")["node-a"][0]
    alice1 = await cluster.connect(alice)
    for _ in range(40):  # a group id's home is its hash: draw until it is where this case needs it
        g = (await alice1.iq("group.new", members=[]))["g"]
        home = cluster.membership.home(g)
        if (home == "node-a") == home_is_senders_node:
            break
    else:
        raise AssertionError("no group homed where this case needs it in 40 draws")
    dave_node = next(node for node in NODES if node not in (home, "node-a"))
    dave = cluster.users("beta", per_node=2)[dave_node][1]
    dave1 = await cluster.connect(dave)
    # Sent together: the message leaves before the add is answered.
    added, ack = await asyncio.gather(alice1.iq("group.add", g=g, members=[dave]),
                                      alice1.send_group_message(g, b"welcome"))
    assert added["ver"] == 2 and not ack.get("dup")
    got = [await next_dlv(dave1) for _ in range(2)]
    assert [(d["k"], d.get("event"), d.get("c")) for d in got] == [("group", "added", None), ("msg", None, b"welcome")]
    assert cluster.gateways[home].stats()["cluster"]["relay"]["held_for_group_change"] == 1
    await close_all(alice1, dave1)