"""Changing a cluster's node list end to end (issue 18): a cluster of node-a and node-b with
users, mailboxes, keys, consent, blocks, the phone directory, push registrations and groups;
every node stopped (the drain); the new list (node-a, node-b, node-c, version 2) written into
every node's configuration; ``interlink cluster export`` on the old nodes, ``import`` on the node
that gets their users and groups, ``prune`` on the old nodes — each a real ``interlink`` process
over the nodes' real LMDB folders; then the three nodes start with the new list, over a real
nats-server and TCP, and the moved users and group carry on where they were. And the refusals:
a node started under the new list before its data moved, a move while the node runs, a file for
another node or list, a file imported twice, a truncated file, a file that conflicts with what
the node holds, an export while group fan-out entries still wait."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import shutil
import sys
from pathlib import Path

import msgpack
import pytest

from e2e.test_cluster import Cluster, nats_server, next_dlv, node_of  # noqa: F401 (a fixture)
from interlink.client import Client
from interlink.core.domain.batch import device_key
from interlink.core.domain.cluster import Membership
from interlink.core.edge.keyfiles import load_operator_keys
from interlink.core.errors import ConfigError, ServerError
from interlink.gateway import Gateway
from interlink.pushreceiver import PushReceiver
from interlink.testing import keys_for_nodes, until
from three_providers import close_all, nothing_arrives

OLD = Membership(("node-a", "node-b"), 1)
NEW = Membership(("node-a", "node-b", "node-c"), 2)
PHONE = "+4915112345678"
KEY = bytes(range(32))


class Described(Cluster):
    """``test_cluster.Cluster`` for any node list and version over the same data folders, ports
    and keys (``grown``), as TOML files for the command line; ``push_url``: the beta provider's
    push endpoint."""

    def __init__(self, issuers, tmp_path: Path, nats_url: str, nodes, version: int, *, ports=None,
                 push_url: str | None = None) -> None:
        super().__init__(issuers, tmp_path, nats_url, nodes, version=version, ports=ports)
        self.push_url = push_url

    def grown(self, node: str) -> Described:
        """The same cluster with ``node`` added and the version raised."""
        return Described(self.issuer_list, self.tmp_path, self.nats_url, (*self.nodes, node), self.version + 1,
                         ports=self.ports, push_url=self.push_url)

    def config(self, node: str, **settings):
        config = super().config(node, **settings)
        if self.push_url is not None:
            config.providers = [dataclasses.replace(p, push_url=self.push_url) if p.id == "beta" else p
                                for p in config.providers]
        return config

    def toml(self, node: str) -> Path:
        """This node's configuration as the TOML file the ``interlink`` command line reads."""
        nodes = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in self.ports.items())
        path = self.tmp_path / f"{node}-v{self.version}.toml"
        path.write_text(f'data_dir = "{self.tmp_path / node}"\nhost = "127.0.0.1"\nport = {self.ports[node]}\n\n'
                        f'[cluster]\nnode = "{node}"\nversion = {self.version}\nnats = ["{self.nats_url}"]\n\n'
                        f'[cluster.nodes]\n{nodes}\n')
        return path


def pick(provider: str, old_home: str, new_home: str, taken: set) -> str:
    """An address of ``provider`` homed on ``old_home`` under the old list and ``new_home`` under the new."""
    for index in range(10_000):
        address = f"u{index}@{provider}"
        if address not in taken and OLD.home(address) == old_home and NEW.home(address) == new_home:
            taken.add(address)
            return address
    raise AssertionError("no such address")


async def interlink(*args: str) -> tuple[int, str]:
    """The ``interlink`` command line in a process of its own: (exit code, stdout and stderr)."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("INTERLINK_") or name in ("INTERLINK_PURE", "INTERLINK_REQUIRE_NATIVE")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interlink.cli", *map(str, args), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode()


def records(path: Path) -> list[tuple[str, bytes]]:
    """The (table, key) of every record of a move file (format: docs in ``lmdbstore/move.py``)."""
    with open(path, "rb") as handle:
        return [(record[0], record[1]) for record in msgpack.Unpacker(handle, raw=False) if isinstance(record, list)]


async def move(new: Described, sources, target: str) -> None:
    """The move with the ``interlink`` command line: export on every node of ``sources``, import
    their files on ``target``, prune the sources. Each step's report is checked."""
    files = []
    for node in sources:
        code, out = await interlink("cluster", "export", "--config", new.toml(node))
        assert code == 0, out
        path = new.tmp_path / node / "moves" / f"{node}-to-{target}.move"
        assert f"{path}: " in out and f"records for node {target}" in out, out
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing for the others
        files.append((path, int(out.split(f"{path}: ")[1].split()[0])))
        assert len(records(path)) == files[-1][1]
    code, out = await interlink("cluster", "import", "--config", new.toml(target), *(p for p, _ in files))
    assert code == 0, out
    imported = {path: int(out.split(f"{path}: ")[1].split()[0]) for path, _ in files}
    assert f"records imported into node {target}" in out, out
    # Every record is written once: the dedup entry of a group message whose copies moved from
    # several nodes comes in each of their files, and only the first is new.
    assert sum(imported.values()) == len({record for path, _ in files for record in records(path)})
    for node in sources:
        code, out = await interlink("cluster", "prune", "--config", new.toml(node))
        assert code == 0 and "node list version 2 recorded" in out, out


until = functools.partial(until, timeout_s=10.0)  # a hang guard, never an assertion about speed


def pending(gateway: Gateway, user: str, device: int) -> list[tuple[int, dict]]:
    """The device's stored items on ``gateway``'s node: [(seq, the dlv)]."""
    return [(seq, msgpack.unpackb(raw, raw=False)) for seq, raw in gateway._server.store.pending(device_key(user, device))]


def counters(gateway: Gateway, user: str, device: int) -> tuple[int, int, int]:
    state = gateway._server.store.mailbox_state(device_key(user, device))
    return state.last_seq, state.items, state.bytes


def entries(gateway: Gateway, table: str) -> int:
    store = gateway._server.store
    db = store.env.open_db(table.encode("ascii"))
    with store.env.begin() as txn:
        return txn.stat(db)["entries"]


async def drained(client: Client, count: int) -> list[tuple[int, dict]]:
    """``count`` deliveries of a client without auto_recv, exactly those, confirmed afterwards."""
    got = [await next_dlv(client) for _ in range(count)]
    await nothing_arrives(client)
    await client.received([d["seq"] for d in got])
    return [(d["seq"], d) for d in got]


async def put_keys(client: Client, first_id: int) -> None:
    await client.iq("keys.put", ik=KEY, spk={"id": first_id, "key": KEY, "sig": bytes(64)},
                    otpk=[{"id": first_id + i, "key": bytes([first_id + i]) * 32} for i in range(3)])


def tables(folder: Path) -> dict[bytes, dict[bytes, bytes]]:
    """Every named table of a stopped node's LMDB environment, whole."""
    import lmdb

    env = lmdb.open(str(folder / "lmdb"), readonly=True, max_dbs=64)
    try:
        with env.begin() as txn:
            names = [bytes(name) for name, _ in txn.cursor()]
            return {name: {bytes(k): bytes(v) for k, v in txn.cursor(db=env.open_db(name, txn=txn, create=False))}
                    for name in names}
    finally:
        env.close()


@pytest.fixture
async def clusters(nats_server):
    """The cluster descriptions a test made: their running nodes stop before nats-server does."""
    made: list[Described] = []
    yield made
    for cluster in made:
        await cluster.stop_all()


async def test_users_and_groups_move_to_a_new_node_and_carry_on_where_they_were(issuers, tmp_path, nats_server,
                                                                                 clusters):
    taken: set = set()
    ann = pick("alpha", "node-a", "node-c", taken)  # moves from node-a
    ben = pick("beta", "node-b", "node-c", taken)  # moves from node-b
    sam = pick("alpha", "node-a", "node-a", taken)  # stays on node-a
    sue = pick("beta", "node-b", "node-b", taken)  # stays on node-b
    eve = pick("alpha", "node-b", "node-b", taken)  # blocked by ann
    keys_for_nodes({node: tmp_path / node / "keys" for node in OLD.nodes})
    root_public = load_operator_keys(tmp_path / "node-a" / "keys").root_public
    async with PushReceiver(root_public) as receiver:
        old = Described(issuers, tmp_path, nats_server.url, OLD.nodes, 1, push_url=receiver.url)
        clusters.append(old)
        for node in old.nodes:
            await old.start(node)

        # -- the data, under the old list
        ann1, ann2 = await old.connect(ann, 1, phone=PHONE), await old.connect(ann, 2, phone=PHONE)
        assert node_of(ann1) == "node-a"
        await ann1.iq("consent.set", accept=["beta"], discoverable=True)
        await ann1.iq("block.add", user=eve)
        await put_keys(ann1, 1)
        await put_keys(ann2, 11)
        ben1, ben2 = await old.connect(ben, 1), await old.connect(ben, 2)
        assert node_of(ben1) == "node-b"
        await ben1.iq("consent.set", accept=[], discoverable=False)  # its own provider only: not sam
        await ben1.register_push("ben-handset-1")
        await ben2.register_push("ben-handset-2")
        await put_keys(ben1, 21)
        for client in (ann1, ann2, ben1, ben2):
            await client.close()
        receiver.respond_with(503)  # ben's pushes stay owed through the move
        sam1, sue1, eve1 = await old.connect(sam), await old.connect(sue), await old.connect(eve)
        sent_to_ann = []
        for i in range(3):
            ack = await sam1.send_message(ann, {1: b"ann1-%d" % i, 2: b"ann2-%d" % i})
            sent_to_ann.append(ack)
        blocked = await eve1.send_message(ann, {1: b"blocked", 2: b"blocked"})
        assert blocked["t"] == "ack" and "dup" not in blocked
        for i in range(3):
            await sue1.send_message(ben, {1: b"ben1-%d" % i, 2: b"ben2-%d" % i})
        with pytest.raises(ServerError) as refused:
            await sam1.send_message(ben, {1: b"x", 2: b"x"})
        assert refused.value.code == "not_opted_in"
        handed = await sam1.iq("keys.get", user=ann)
        assert sorted((b["device"], b["otpk"]["id"]) for b in handed["bundles"]) == [(1, 1), (2, 11)]
        # A group whose home moves to node-c, and one whose home stays; members on both nodes.
        moved_g = stay_g = None
        for _ in range(60):
            g = (await sue1.iq("group.new", members=[]))["g"]
            if NEW.home(g) == "node-c" and moved_g is None:
                moved_g = g
            elif NEW.home(g) != "node-c" and stay_g is None:
                stay_g = g
            if moved_g and stay_g:
                break
        assert moved_g and stay_g
        await close_all(sam1, eve1)  # they get the groups' items while offline too
        assert (await sue1.iq("group.add", g=moved_g, members=[ann, ben, sam, eve]))["ver"] == 2
        assert (await sue1.iq("group.add", g=stay_g, members=[ann, sam]))["ver"] == 2
        group_acks = [await sue1.send_group_message(moved_g, b"gm-%d" % i) for i in range(2)]
        await sue1.send_group_message(stay_g, b"gs-0")
        await sue1.close()
        # The drain: the group fan-out outboxes are empty (as `interlink cluster status` shows),
        # then every node stops.
        await until(lambda: all(not gw._server.store.outbox_nodes() for gw in old.gateways.values()), "outboxes empty")
        code, out = await interlink("cluster", "status", "--config", old.toml("node-a"))
        assert code == 0, out
        header, *rows = out.splitlines()
        assert header.split()[-1] == "outbox" and [row.split()[-1] for row in rows] == ["0", "0"], out
        before = {(user, device): (pending(old.gateways[OLD.home(user)], user, device),
                                   counters(old.gateways[OLD.home(user)], user, device))
                  for user in (ann, ben) for device in (1, 2)}
        sam_before = pending(old.gateways["node-a"], sam, 1)
        assert [len(before[ann, d][0]) for d in (1, 2)] == [3 + 2 + 2 + 1] * 2  # 1:1, "added" x2, gm-0/1, gs-0
        assert [len(before[ben, d][0]) for d in (1, 2)] == [3 + 1 + 2] * 2
        assert entries(old.gateways["node-a"], "bodies") > 0  # the group messages' shared bodies
        await old.stop_all()

        # -- the move: the new list in every node's configuration, export, import, prune
        new = old.grown("node-c")
        clusters.append(new)
        assert new.membership == NEW
        await move(new, OLD.nodes, "node-c")

        # -- the new list: the three nodes start
        receiver.reset()
        for node in NEW.nodes:
            await new.start(node)
        gw = new.gateways
        for user in (ann, ben):
            assert gw["node-c"]._server.store.devices(user) == (1, 2)
            assert gw["node-a"]._server.store.devices(user) == gw["node-b"]._server.store.devices(user) == ()
        assert gw["node-c"]._server.store.group(moved_g) is not None
        assert all(gw[node]._server.store.group(moved_g) is None for node in OLD.nodes)
        for (user, device), (items, state) in before.items():  # the mailboxes as they were
            assert pending(gw["node-c"], user, device) == items
            assert counters(gw["node-c"], user, device) == state
        # The phone directory and consent moved (ann is discoverable by beta users, from node-c).
        sue1 = await new.connect(sue)
        assert (await sue1.iq("dir.lookup", phone=PHONE))["users"] == [ann]
        assert gw["node-c"]._server.store.directory(PHONE) == [ann] and gw["node-a"]._server.store.directory(PHONE) == []
        # The pushes owed to ben's devices come once each, from node-c, with their counters.
        await until(lambda: len(receiver.received) >= 2, "the owed pushes, from node-c")
        await asyncio.sleep(0.5)
        pushes = sorted((p["user"], p["device"], p["counter"], p["pending"]) for p in receiver.received)
        assert pushes == [(ben, 1, 1, 6), (ben, 2, 1, 6)], pushes

        # Every moved device is sent home to node-c and gets its items once, with their seqs;
        # sam, who stays, gets what node-a stored for it under the old list.
        clients = {}
        for user, device in [*before, (sam, 1)]:
            client = await new.connect(user, device, via="node-a" if device == 1 else "node-b", auto_recv=False)
            clients[user, device] = client
        for (user, device), client in clients.items():
            items = before[user, device][0] if user != sam else sam_before
            assert node_of(client) == NEW.home(user) and client.welcome["pending"] == len(items)
            assert await drained(client, len(items)) == items
            client.auto_recv = True
        for items, one_to_one in ((before[ann, 1][0], [b"ann1-0", b"ann1-1", b"ann1-2"]), (sam_before, [])):
            # (the two groups' messages reach node-a from two homes: ordered within each group)
            assert [d["c"] for _, d in items if d["k"] == "msg" and "g" not in d] == one_to_one
            assert [d["c"] for _, d in items if d.get("g") == moved_g and d["k"] == "msg"] == [b"gm-0", b"gm-1"]
            assert [d["c"] for _, d in items if d.get("g") == stay_g and d["k"] == "msg"] == [b"gs-0"]
        ann1, ann2, ben1, ben2, sam1 = (clients[key] for key in ((ann, 1), (ann, 2), (ben, 1), (ben, 2), (sam, 1)))

        # Resends of messages stored before the move are recognised where they are stored now.
        again = await sam1.send_message(ann, {1: b"ann1-0", 2: b"ann2-0"}, msg_id=sent_to_ann[0]["id"])
        assert again.get("dup") is True and again["ts"] == sent_to_ann[0]["ts"]
        again = await sue1.send_group_message(moved_g, b"gm-0", msg_id=group_acks[0]["id"])
        assert again.get("dup") is True and again["ts"] == group_acks[0]["ts"]

        # New 1:1 messages reach the moved devices after their last seq; the block still holds,
        # and so does ben's consent.
        await sam1.send_message(ann, {1: b"after 1", 2: b"after 2"})
        for device, client in ((1, ann1), (2, ann2)):
            dlv = await next_dlv(client)
            assert dlv["c"] == b"after %d" % device and dlv["seq"] == before[ann, device][1][0] + 1
        eve1 = await new.connect(eve)
        assert [(await next_dlv(eve1)).get("c") for _ in range(3)] == [None, b"gm-0", b"gm-1"]  # "added" first
        quiet = await eve1.send_message(ann, {1: b"still blocked", 2: b"still blocked"})
        assert quiet["t"] == "ack" and "dup" not in quiet
        await nothing_arrives(ann1)
        await nothing_arrives(ann2, 0.1)
        assert (await ann1.iq("block.list"))["users"] == [eve]
        consent = await ann1.iq("consent.get")
        assert (consent["accept"], consent["discoverable"]) == (["beta"], True)
        with pytest.raises(ServerError) as refused:
            await sam1.send_message(ben, {1: b"x", 2: b"x"})
        assert refused.value.code == "not_opted_in"
        await sue1.send_message(ben, {1: b"hi 1", 2: b"hi 2"})
        assert [(await next_dlv(c))["c"] for c in (ben1, ben2)] == [b"hi 1", b"hi 2"]

        # The keys moved: the one-time prekeys handed out before are not handed out again.
        bundles = (await sue1.iq("keys.get", user=ann))["bundles"]
        assert sorted((b["device"], b["ik"], b["otpk"]["id"]) for b in bundles) == [(1, KEY, 2), (2, KEY, 12)]
        assert (await ann1.iq("keys.count"))["otpk_count"] == 1
        assert (await ben1.iq("keys.count"))["otpk_count"] == 3

        # The moved group works from node-c for members of all three nodes; the other one too.
        info = await ann1.iq("group.get", g=moved_g)
        assert (info["members"], info["admins"], info["ver"]) == ([sue, ann, ben, sam, eve], [sue], 2)
        await sue1.send_group_message(moved_g, b"gm-new")
        await sue1.send_group_message(stay_g, b"gs-new")
        for client, bodies in ((ann1, [b"gm-new", b"gs-new"]), (ann2, [b"gm-new", b"gs-new"]),
                               (ben1, [b"gm-new"]), (ben2, [b"gm-new"]), (sam1, [b"gm-new", b"gs-new"]),
                               (eve1, [b"gm-new"])):
            got = [await next_dlv(client) for _ in bodies]
            assert sorted(d["c"] for d in got) == sorted(bodies)  # (two groups, two homes: no order between them)
        # ann's block holds in the group too: eve's group message reaches everyone but ann.
        await eve1.send_group_message(moved_g, b"from eve")
        for client in (sue1, ben1, ben2, sam1):
            assert (await next_dlv(client))["c"] == b"from eve"
        await nothing_arrives(ann1)
        await nothing_arrives(ann2, 0.1)
        assert new.gateways["node-c"]._server.store.group(moved_g).ver == 2

        # ben's push registrations moved with their counters: offline again, woken again.
        await ben1.close()
        await ben2.close()
        await sue1.send_message(ben, {1: b"wake 1", 2: b"wake 2"})
        await until(lambda: len(receiver.received) >= 4, "new pushes to ben")
        await asyncio.sleep(0.3)
        pushes = sorted((p["device"], p["counter"]) for p in receiver.received[2:])
        assert pushes == [(1, 2), (2, 2)], receiver.received

        # Every shared group body is released once its copies are gone: the prune released the
        # moved copies' references, the members' recv the rest.
        for node in NEW.nodes:
            await until(lambda: entries(new.gateways[node], "bodies") == entries(new.gateways[node], "body_refs") == 0,
                        f"{node}: every shared body released")
        # The nodes never disagreed about where anyone lives.
        assert all(gateway._server.domain.relay.counters["misrouted"] == 0 for gateway in new.gateways.values())
        for client in (ann1, ann2, sam1, sue1, eve1):
            await client.close()
        await new.stop_all()


async def test_the_move_refuses_what_would_lose_or_strand_data(issuers, tmp_path, nats_server, clusters):
    taken: set = set()
    ann = pick("alpha", "node-a", "node-c", taken)
    ben = pick("beta", "node-b", "node-c", taken)
    old = Described(issuers, tmp_path, nats_server.url, OLD.nodes, 1)
    new = old.grown("node-c")
    clusters.extend((old, new))
    for node in old.nodes:
        await old.start(node)
    ann1, ben1 = await old.connect(ann), await old.connect(ben)
    await put_keys(ann1, 1)
    await ann1.close()
    kept = await ben1.send_message(ann, {1: b"kept"})
    await ben1.close()

    # A running node's data is not moved: export, import and prune ask to stop it first.
    moves = tmp_path / "node-a" / "moves"
    for command in (["export"], ["import", new.toml("node-a")], ["prune"]):
        code, out = await interlink("cluster", command[0], "--config", new.toml("node-a"), *command[1:])
        assert code == 1 and "still runs on" in out and "stop it first" in out, out
    assert not moves.exists()
    await old.stop_all()

    # Started under the new list while its data is still there, a node refuses, naming the
    # procedure; the refused start leaves nothing behind, and the old list still starts.
    untouched = {node: tables(tmp_path / node) for node in old.nodes}
    for node, user in (("node-a", ann), ("node-b", ben)):
        with pytest.raises(ConfigError) as refused:
            await Gateway(new.config(node)).start()
        message = str(refused.value)
        assert "interlink cluster export / import / prune" in message and "Changing the node list" in message
        assert "version 2" in message and f"e.g. {user}, homed on node-c" in message, message
        assert tables(tmp_path / node) == untouched[node]
    for node in old.nodes:
        await old.start(node)
    ann1 = await old.connect(ann, auto_recv=False)
    assert node_of(ann1) == "node-a" and ann1.welcome["pending"] == 1
    await ann1.close()
    await old.stop_all()

    # Exported, not yet pruned: still refused.
    files = {"node-a": moves / "node-a-to-node-c.move", "node-b": tmp_path / "out" / "node-b-to-node-c.move"}
    for node, extra in (("node-a", []), ("node-b", ["--out", tmp_path / "out"])):
        code, out = await interlink("cluster", "export", "--config", new.toml(node), *extra)
        assert code == 0 and f"{files[node]}: {len(records(files[node]))} records for node node-c" in out, out
    code, out = await interlink("cluster", "export", "--config", new.toml("node-c"))  # a new node: nothing
    assert code == 0 and "node node-c: nothing moves under node list version 2" in out, out
    with pytest.raises(ConfigError, match="move them first"):
        await Gateway(new.config("node-a")).start()

    # A file made for another node, or under another list: refused, nothing written.
    before_b = tables(tmp_path / "node-b")
    code, out = await interlink("cluster", "import", "--config", new.toml("node-b"), files["node-a"])
    assert code == 1 and "made for node node-c" in out and "not for node node-b" in out, out
    assert tables(tmp_path / "node-b") == before_b
    other = Described(issuers, tmp_path, nats_server.url, NEW.nodes, 3, ports=new.ports)
    code, out = await interlink("cluster", "import", "--config", other.toml("node-c"), files["node-a"])
    assert code == 1 and "under version 3" in out, out

    # A truncated file (no trailer, or cut inside a record): refused, nothing written.
    whole = files["node-a"].read_bytes()
    trailer = len(msgpack.packb({"end": len(records(files["node-a"]))}))
    for name, cut in (("no-trailer", len(whole) - trailer), ("half", len(whole) // 2)):
        broken = tmp_path / f"{name}.move"
        broken.write_bytes(whole[:cut])
        code, out = await interlink("cluster", "import", "--config", new.toml("node-c"), broken)
        assert code == 1 and "truncated" in out and "nothing imported" in out, out
        assert not any(tables(tmp_path / "node-c").values())

    # The files themselves: every record once; the same file again adds nothing.
    count = len(set(records(files["node-a"])))
    code, out = await interlink("cluster", "import", "--config", new.toml("node-c"), files["node-a"], files["node-b"])
    assert code == 0 and f"{files['node-a']}: {count} records imported" in out, out
    imported = tables(tmp_path / "node-c")
    code, out = await interlink("cluster", "import", "--config", new.toml("node-c"), files["node-a"])
    assert code == 0 and f"{files['node-a']}: 0 records imported" in out, out
    assert tables(tmp_path / "node-c") == imported

    # Imported, not yet pruned: node-a still refuses (its copy of ann is still there).
    with pytest.raises(ConfigError, match="move them first"):
        await Gateway(new.config("node-a")).start()
    for node in old.nodes:
        code, out = await interlink("cluster", "prune", "--config", new.toml(node))
        assert code == 0 and "node list version 2 recorded" in out, out
    code, out = await interlink("cluster", "prune", "--config", new.toml("node-a"))
    assert code == 0 and ": 0 records" in out, out
    for node in NEW.nodes:
        await new.start(node)
    ann1 = await new.connect(ann, via="node-b")
    assert node_of(ann1) == "node-c"
    dlv = await next_dlv(ann1)
    assert (dlv["c"], dlv["id"], dlv["ts"]) == (b"kept", kept["id"], kept["ts"])
    ben1 = await new.connect(ben, via="node-a")
    assert (await ben1.iq("keys.get", user=ann))["bundles"][0]["otpk"]["id"] == 1
    await close_all(ann1, ben1)
    await new.stop_all()

    # Once the moved users were served on node-c, the same file conflicts with what is there:
    # refused whole, nothing written.
    served = tables(tmp_path / "node-c")
    code, out = await interlink("cluster", "import", "--config", new.toml("node-c"), files["node-a"])
    assert code == 1 and "here already with another value" in out and "nothing imported" in out, out
    assert tables(tmp_path / "node-c") == served


async def test_a_receipt_stored_before_the_move_and_resent_after_it_is_recognised(issuers, tmp_path, nats_server,
                                                                                  clusters):
    """A receipt is stored and deduplicated like a message (sender device, id): the dedup entry
    of a pending receipt's copy must go along with it, as a pending message's does, or a resend
    after the move (the sender never saw the ack: the drain) is stored a second time."""
    taken: set = set()
    ben = pick("beta", "node-b", "node-c", taken)
    sue = pick("beta", "node-b", "node-b", taken)
    old = Described(issuers, tmp_path, nats_server.url, OLD.nodes, 1)
    new = old.grown("node-c")
    clusters.extend((old, new))
    for node in old.nodes:
        await old.start(node)
    await (await old.connect(ben)).close()
    sue1 = await old.connect(sue)
    message = await sue1.send_message(ben, {1: b"hello"})
    read = os.urandom(16)
    receipt = await sue1.send_receipt(ben, "read", [read])
    await sue1.close()
    await old.stop_all()
    await move(new, ["node-b"], "node-c")
    for node in NEW.nodes:
        await new.start(node)
    sue1 = await new.connect(sue)
    again = await sue1.send_message(ben, {1: b"hello"}, msg_id=message["id"])
    assert again.get("dup") is True and again["ts"] == message["ts"]
    again_receipt = await sue1.send_receipt(ben, "read", [read], receipt_id=receipt["id"])
    ben1 = await new.connect(ben, auto_recv=False)  # every stored copy, as the gateway delivers them
    got = []
    with pytest.raises(TimeoutError):
        while True:
            got.append(await ben1.recv(timeout_s=0.5))
    assert [(d["k"], d["id"]) for d in got] == [("msg", message["id"]), ("rcpt", receipt["id"])], got
    assert again_receipt.get("dup") is True and again_receipt["ts"] == receipt["ts"]
    await close_all(sue1, ben1)


async def test_export_waits_until_the_group_fan_out_has_settled(issuers, tmp_path, nats_server, clusters):
    """A fan-out entry still in a group home's outbox names its members' nodes by the old list:
    ``export`` refuses until the cluster, started under the old list again, delivered it."""
    taken: set = set()
    ann = pick("alpha", "node-a", "node-c", taken)
    ben = pick("beta", "node-b", "node-c", taken)
    old = Described(issuers, tmp_path, nats_server.url, OLD.nodes, 1)
    new = old.grown("node-c")
    clusters.extend((old, new))
    for node in old.nodes:
        await old.start(node, timeout_s=0.5)
    ann1, ben1 = await old.connect(ann), await old.connect(ben)
    g = (await ben1.iq("group.new", members=[ann]))["g"]
    assert (await next_dlv(ann1))["event"] == "created"
    home = OLD.home(g)
    sender, other = (ann1, "node-b") if home == "node-a" else (ben1, "node-a")
    await close_all(*(c for c in (ann1, ben1) if c is not sender))
    await old.stop(other)  # its member misses the message for now: it waits in the home's outbox
    await sender.send_group_message(g, b"while down")
    await sender.close()
    assert old.gateways[home]._server.store.outbox_nodes() == {other: 1}
    await old.stop_all()
    code, out = await interlink("cluster", "export", "--config", new.toml(home))
    assert code == 1 and "1 group fan-out entries still wait" in out and "outbox 0" in out, out
    assert not (tmp_path / home / "moves").exists() or not any((tmp_path / home / "moves").iterdir())
    # Under the old list again the entry is delivered; then the move goes through.
    for node in old.nodes:
        await old.start(node, timeout_s=0.5)
    await until(lambda: not old.gateways[home]._server.store.outbox_nodes(), "the entry delivered")
    await old.stop_all()
    await move(new, OLD.nodes, "node-c")
    for node in NEW.nodes:
        await new.start(node)
    member = ann if home == "node-b" else ben  # the one on the node that was down
    client = await new.connect(member)
    assert node_of(client) == "node-c"
    got = []
    with pytest.raises(TimeoutError):
        while True:
            got.append(await client.recv(timeout_s=0.5))
    assert [d["c"] for d in got if d["k"] == "msg"] == [b"while down"], got  # (after "created" if not confirmed)
    await client.close()


async def test_a_node_lost_for_good_is_forgotten_and_its_groups_take_messages_again(issuers, tmp_path, nats_server,
                                                                                     clusters, monkeypatch):
    """node-c is gone with its data (no backup): what node-a's group kept for its member there
    would wait for ever, and the group refuses messages once it fills node-c's share. ``interlink
    cluster forget node-c`` on the stopped nodes drops it; under the list without node-c the group
    takes messages again and that member, registered again at its new home, gets what is sent from
    then on — not what was dropped. A living or mistyped node is refused."""
    import interlink.core.domain.relay as relay_module

    three = Membership(("node-a", "node-b", "node-c"), 1)
    two = Membership(("node-a", "node-b"), 2)
    taken: set = set()

    def homed(provider: str, old_home: str) -> str:
        address = next(f"u{i}@{provider}" for i in range(10_000) if f"u{i}@{provider}" not in taken
                       and three.home(f"u{i}@{provider}") == old_home)
        taken.add(address)
        return address

    ann, ben, cid = homed("alpha", "node-a"), homed("alpha", "node-b"), homed("alpha", "node-c")
    g = next(g for g in iter(lambda: os.urandom(16), None) if three.home(g) == two.home(g) == "node-a")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    old = Described(issuers, tmp_path, nats_server.url, three.nodes, 1)
    new = Described(issuers, tmp_path, nats_server.url, two.nodes, 2, ports=old.ports)
    clusters.extend((old, new))
    for node in three.nodes:
        await old.start(node, timeout_s=0.5)
    ann1, ben1, cid1 = await old.connect(ann), await old.connect(ben), await old.connect(cid)
    assert (await ann1.iq("group.new", members=[ben, cid]))["g"] == g
    for client in (ben1, cid1):  # (the creator has its res)
        assert (await next_dlv(client))["event"] == "created"
    await cid1.close()
    await old.stop("node-c")
    shutil.rmtree(tmp_path / "node-c")  # lost with its data
    assert "dup" not in await ann1.send_group_message(g, b"while node-c is lost")
    assert (await next_dlv(ben1))["c"] == b"while node-c is lost"
    store = old.gateways["node-a"]._server.store
    await until(lambda: store.outbox_nodes() == {"node-c": 1}, "node-b's entry confirmed, node-c's waiting")
    await close_all(ann1, ben1)
    code, out = await interlink("cluster", "status", "--config", old.toml("node-a"))
    assert code == 1 and "node-a           outbox waits for node-c 1" in out.splitlines(), out
    await old.stop_all()

    code, out = await interlink("cluster", "export", "--config", new.toml("node-a"))
    assert code == 1 and "1 group fan-out entries still wait" in out, out
    for lost, refusal in (("node-b", "is in node list version 2"), ("node-x", "is not in the node list")):
        code, out = await interlink("cluster", "forget", "--yes", "--config", new.toml("node-a"), lost)
        assert code == 1 and refusal in out, out
    code, out = await interlink("cluster", "forget", "--config", new.toml("node-a"), "node-c")  # without --yes: told
    assert code == 0 and "node node-a: 1 group fan-out entries wait for node node-c" in out, out
    assert "nothing dropped; run again with --yes" in out, out
    for node, dropped in (("node-a", 1), ("node-b", 0)):
        code, out = await interlink("cluster", "forget", "--yes", "--config", new.toml(node), "node-c")
        assert code == 0 and f"node {node}: {dropped} group fan-out entries waiting for node node-c dropped" in out, out
    for node in two.nodes:  # nothing moves between the nodes that stay: each start records the new list
        await new.start(node, timeout_s=0.5)
    ann1, ben1 = await new.connect(ann), await new.connect(ben)
    cid1 = await new.connect(cid)  # at its new home, as a new device there
    assert node_of(cid1) == two.home(cid)
    assert "dup" not in await ann1.send_group_message(g, b"after")
    assert (await next_dlv(ben1))["c"] == b"after"
    assert [(d["k"], d.get("c")) for d in [await next_dlv(cid1)]] == [("msg", b"after")]
    await nothing_arrives(cid1)
    assert new.gateways["node-a"]._server.store.outbox_nodes() == {}
    await close_all(ann1, ben1, cid1)
