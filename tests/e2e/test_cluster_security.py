"""The cluster's NATS secured as docs/operations.md "Running a cluster" tells operators to run it
(issue 18): TLS with the operator's own CA, one NATS user per node whose permissions let it
publish only under its own name, a ``status`` user for ``interlink cluster status``. A real
nats-server on loopback with exactly that authorization block, three gateway nodes and the
SDK: a message crosses nodes; a node without the CA, or with a wrong password, does not start;
a node's credentials cannot speak as another node. Then the other setup the operations guide
names: an operator/account (JWT) nats-server, each node logging in with its own ``.creds`` file."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import time

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from interlink.core.edge.clusterlink import ask_nodes
from interlink.core.errors import ConfigError
from interlink.gateway import Gateway
from interlink.load.nats import LocalNats
from interlink.testing import until

from e2e.test_cluster import NODES, Cluster, next_dlv

PASSWORDS = {"node-a": "pa55-a", "node-b": "pa55-b", "node-c": "pa55-c", "status": "pa55-status"}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_tls(folder) -> tuple[str, str, str]:
    """A CA and a server certificate it signed for 127.0.0.1: (ca, cert, key) file paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("interlink test CA")).issuer_name(_name("interlink test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(_name("nats-1")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "nats-1.pem", folder / "nats-1.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tuple(str(path) for path in paths)


def secured_config(cert: str, key: str) -> str:
    """docs/operations.md's nats-1.conf for one server (no cluster routes), plain passwords."""
    users = "\n".join(
        f'    {{ user: {node}, password: "{PASSWORDS[node]}", permissions: {{\n'
        f'        publish: ["interlink.*.relay.{node}", "interlink.*.answers.{node}", "interlink.*.hello"],\n'
        f'        subscribe: ["interlink.{node}.>", "_INBOX.{node}.>"], allow_responses: true }} }}'
        for node in NODES)
    return (f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
            "authorization {\n  users: [\n" + users + "\n"
            f'    {{ user: status, password: "{PASSWORDS["status"]}", permissions: '
            '{ publish: ["interlink.*.hello"], subscribe: ["_INBOX.status.>"] } }\n  ]\n}\n')


class SecuredCluster(Cluster):
    """Each node connects as its own NATS user over TLS, trusting ``ca_file``."""

    def __init__(self, issuers, tmp_path, port: int, ca_file: str) -> None:
        super().__init__(issuers, tmp_path, f"tls://127.0.0.1:{port}")
        self.nats_port, self.ca_file = port, ca_file
        self.passwords = dict(PASSWORDS)

    def url(self, user: str) -> str:
        return f"tls://{user}:{self.passwords[user]}@127.0.0.1:{self.nats_port}"

    def config(self, node: str, **settings):
        config = super().config(node, **settings)
        cluster = dataclasses.replace(config.cluster, nats=(self.url(node),), nats_ca_file=self.ca_file)
        return dataclasses.replace(config, cluster=cluster)


async def started_and_crossing(cluster, sender_home: str, recipient_home: str, body: bytes) -> None:
    """Start every node; a message from a user of ``sender_home`` reaches one of ``recipient_home``."""
    for node in NODES:
        await cluster.start(node)
    alice = cluster.users("alpha")[sender_home][0]
    bob = cluster.users("beta")[recipient_home][0]
    alice1, bob1 = await cluster.connect(alice), await cluster.connect(bob)
    try:
        ack = await alice1.send_message(bob, {1: body})
        dlv = await next_dlv(bob1)
        assert ack["t"] == "ack" and (dlv["from"], dlv["c"]) == (alice, body)
    finally:
        for client in (alice1, bob1):
            await client.close()


async def stop_all(cluster, server: LocalNats) -> None:
    await cluster.stop_all()
    await server.stop()


@pytest.fixture
async def secured(issuers, tmp_path):
    ca, cert, key = make_tls(tmp_path / "tls")
    server = LocalNats(tmp_path / "nats", extra_config=secured_config(cert, key))
    await server.start()
    cluster = SecuredCluster(issuers, tmp_path, server.port, ca)
    yield cluster, server
    await stop_all(cluster, server)


async def test_nodes_on_tls_with_their_own_users_relay_and_report(secured):
    cluster, _ = secured
    await started_and_crossing(cluster, "node-a", "node-b", b"over tls")
    # interlink cluster status as the status user: every node answers over TLS.
    status = dataclasses.replace(cluster.config("node-a").cluster, nats=(cluster.url("status"),))
    reports = await ask_nodes(status)
    assert sorted(node for node, report in reports.items() if report is not None) == list(NODES)


async def test_a_node_that_does_not_trust_the_servers_ca_or_has_a_wrong_password_does_not_start(secured, tmp_path):
    cluster, _ = secured
    config = cluster.config("node-a")
    untrusting = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, nats_ca_file=""))
    with pytest.raises(ConfigError, match="cluster.nats: cannot connect"):
        await Gateway(untrusting).start()  # the system's CAs do not know the operator's
    cluster.passwords["node-a"] = "wrong"
    with pytest.raises(ConfigError, match=r"cluster.nats: cannot connect to tls://\*\*\*@127.0.0.1"):
        await Gateway(cluster.config("node-a")).start()  # and the password is not in the message


async def test_one_nodes_credentials_cannot_relay_as_another_node(secured, caplog):
    """node-b's NATS user publishing a relay batch under node-c's name: NATS refuses it (a
    permissions violation), node-a never sees it; under its own name it arrives. NATS keeps one
    connection's order, so once node-a took the two sent after it, the spoofed one is not coming.
    The spoofer is the node's own client (``NatsConnection``), logged in as node-b."""
    import msgpack

    from interlink.core.edge.clusterlink import nats_tls
    from interlink.core.edge.natsconn import NatsConnection

    cluster, _ = secured
    for node in NODES:
        await cluster.start(node)
    link = cluster.gateways["node-a"]._server.cluster
    config = cluster.config("node-b").cluster
    spoof = NatsConnection([cluster.url("node-b")], name="spoof", tls=nats_tls(config))
    await spoof.connect()
    try:
        batch = msgpack.packb({"m": config.digest, "r": []})
        before = link.counters["batches_in"]
        with caplog.at_level(logging.WARNING, logger="interlink.cluster"):
            spoof.publish(b"interlink.node-a.relay.node-c", batch)  # as node-c
            await until(lambda: spoof.counters["server_errors"], "NATS to refuse node-b publishing as node-c")
        assert "permissions violation" in caplog.text.lower() and "interlink.node-a.relay.node-c" in caplog.text
        for _ in range(2):
            spoof.publish(b"interlink.node-a.relay.node-b", batch)  # as itself
        assert await spoof.flush(2.0)
        await until(lambda: link.counters["batches_in"] >= before + 2, "node-a to take node-b's own batches")
        assert link.counters["batches_in"] == before + 2  # the spoofed one never arrived
    finally:
        await spoof.close()


# -- an operator/account (JWT) setup: every node logs in with its own .creds file


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int):
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def nats_jwt(issuer, subject: str, name: str, claims: dict) -> str:
    """A NATS JWT (v2, ed25519-nkey) of ``claims`` about ``subject``, signed by ``issuer``."""
    body = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
            "nats": {**claims, "version": 2}}
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(body).encode()).digest()).decode().rstrip("=")
    signed = f'{_b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())}.{_b64(json.dumps(body).encode())}'
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def write_creds(path, account, node: str) -> str:
    """``node``'s .creds: a user JWT with docs/operations.md's permissions, signed by ``account``."""
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    token = nats_jwt(account, user.public_key.decode(), node, {
        "type": "user", "subs": -1, "data": -1, "payload": -1,
        "pub": {"allow": [f"interlink.*.relay.{node}", f"interlink.*.answers.{node}", "interlink.*.hello"]},
        "sub": {"allow": [f"interlink.{node}.>", f"_INBOX.{node}.>"]}, "resp": {"max": 1, "ttl": 0}})
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
    return str(path)


@pytest.fixture
async def operator_mode(issuers, tmp_path):
    ca, cert, key = make_tls(tmp_path / "tls")
    operator, account = _keypair(nkeys.PREFIX_BYTE_OPERATOR), _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
                 "leaf": -1}
    account_jwt = nats_jwt(operator, account.public_key.decode(), "interlink", {"type": "account", "limits": unlimited})
    server = LocalNats(tmp_path / "nats", extra_config=(
        f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
        f'operator: {nats_jwt(operator, operator.public_key.decode(), "operator", {"type": "operator"})}\n'
        f'resolver: MEMORY\nresolver_preload: {{\n  {account.public_key.decode()}: {account_jwt}\n}}\n'))
    await server.start()
    cluster = CredsCluster(issuers, tmp_path, server.port, ca)
    for node in NODES:
        cluster.creds[node] = write_creds(tmp_path / f"{node}.creds", account, node)
    yield cluster
    await stop_all(cluster, server)


class CredsCluster(SecuredCluster):
    """Each node connects over TLS with its own .creds file (no password in the URL)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.creds: dict[str, str] = {}

    def config(self, node: str, **settings):
        config = super().config(node, **settings)
        cluster = dataclasses.replace(config.cluster, nats=(f"tls://127.0.0.1:{self.nats_port}",),
                                      nats_credentials=self.creds[node])
        return dataclasses.replace(config, cluster=cluster)


async def test_nodes_logging_in_with_creds_files_relay_and_a_stranger_account_is_refused(operator_mode, tmp_path):
    cluster = operator_mode
    await started_and_crossing(cluster, "node-c", "node-a", b"over creds")
    await cluster.stop("node-b")
    # A user signed by an account the operator never signed: NATS refuses the login.
    cluster.creds["node-b"] = write_creds(tmp_path / "stranger.creds", _keypair(nkeys.PREFIX_BYTE_ACCOUNT), "node-b")
    with pytest.raises(ConfigError, match="cluster.nats: cannot connect"):
        await Gateway(cluster.config("node-b")).start()


async def test_a_missing_ca_or_creds_file_is_named_at_start(secured, tmp_path):
    cluster, _ = secured
    config = cluster.config("node-a")
    for field, value, message in (
            ("nats_ca_file", str(tmp_path / "absent.pem"), "cluster.nats_ca_file: cannot use .*absent.pem"),
            ("nats_ca_file", __file__, "cluster.nats_ca_file: cannot use"),  # not a certificate
            ("nats_credentials", str(tmp_path / "absent.creds"), "cluster.nats_credentials: cannot read .*absent.creds")):
        broken = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, **{field: value}))
        with pytest.raises(ConfigError, match=message):
            await Gateway(broken).start()
