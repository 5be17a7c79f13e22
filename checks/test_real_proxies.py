"""``make proxy-check``: the proxy configurations of docs/operations.md ("Web clients, proxies
and load balancers"), run as written with the real HAProxy and nginx in front of a real gateway.

Each ```` ```haproxy ```` / ```` ```nginx ```` block whose first line is ``# tested: NAME`` is
taken from the document; only the addresses, ports and certificate paths are replaced by local
ones. Needs ``haproxy`` and ``nginx`` on the PATH (Debian 12: ``apt install haproxy
nginx-light``); CI machines do not have them, so ``make test`` does not run this file.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect as ws_connect

from interlink.client import Client
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer, until

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "operations.md"
AUD = "interlink-proxy-check"
OTHER_CLIENT = "127.0.0.2"  # connects through the proxy from an address that is not the proxy's


def documented(name: str) -> str:
    """The configuration block ``# tested: name`` of docs/operations.md."""
    blocks = re.findall(r"```(?:haproxy|nginx)\n(.*?)```", OPERATIONS.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if block.startswith(f"# tested: {name}\n")]
    assert len(found) == 1, f"docs/operations.md has {len(found)} blocks '# tested: {name}'"
    return found[0]


def localised(name: str, replacements: dict[str, str]) -> str:
    """The block ``name`` with its documented addresses, ports and paths replaced by local ones;
    each must be there (a changed document fails here, not as a proxy that never listens)."""
    text = documented(name)
    for documented_value, local in replacements.items():
        assert documented_value in text, f"docs/operations.md block {name!r} no longer has {documented_value!r}"
        text = text.replace(documented_value, local)
    return text


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        pytest.fail(f"{binary} is not installed: on Debian 12, apt install haproxy nginx-light")
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A self-signed certificate for chat.example and 127.0.0.1: (cert, key, both in one file)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("chat.example"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths = folder / "fullchain.pem", folder / "privkey.pem", folder / "chat.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    return paths


@pytest.fixture
async def issuer():
    async with DemoIssuer() as alpha:
        yield alpha


@pytest.fixture
def readiness_answers(monkeypatch) -> list[int]:
    """The statuses /readyz answered (the balancer's health checks): the real handler, recorded."""
    from interlink.admin import AdminServer

    answers: list[int] = []
    real = AdminServer.readyz

    async def recorded(self, request):
        response = await real(self, request)
        answers.append(response.status)
        return response

    monkeypatch.setattr(AdminServer, "readyz", recorded)
    return answers


@pytest.fixture
async def gateway(issuer, tmp_path, readiness_answers):
    config = GatewayConfig(
        port=0, ws_port=0, data_dir=tmp_path / "gw", blob_min_free_bytes=0,
        providers=[Provider(id="alpha", issuer=issuer.issuer, audience=AUD, discovery=True)],
        tcp_trusted_proxies=["127.0.0.1"], ws_trusted_proxies=["127.0.0.1"],
        ws_allowed_origins=["https://chat.example"],
        source_limits_on_loopback=True, max_preauth_per_source=2, admin_port=0,
    )
    async with Gateway(config) as gw:
        yield gw


class Proxy:
    """A proxy process with a configuration file, stopped at the end."""

    def __init__(self, command: list[str], config: str, path: Path) -> None:
        path.write_text(config)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    async def listening(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the proxy exited: {self.process.stdout.read().decode()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise AssertionError("the proxy did not listen in time")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def test_haproxy_tcp_with_proxy_v2(gateway, issuer, tmp_path, readiness_answers):
    port = free_port()
    gw_host, gw_port = gateway.address
    config = localised("haproxy-tcp", {
        "bind :7450": f"bind 127.0.0.1:{port}", "10.0.1.10:7450": f"{gw_host}:{gw_port}",
        "check port 7451 inter 2s": f"check port {gateway.admin_address[1]} inter 200", "maxconn 200000": "maxconn 4000"})
    proxy = Proxy([need("haproxy"), "-db", "-f", str(tmp_path / "haproxy.cfg")], config, tmp_path / "haproxy.cfg")
    server = gateway._server
    try:
        await proxy.listening(port)
        client = await Client.connect("127.0.0.1", port, token=issuer.issue("alice", audience=AUD), device=1,
                                      root_public=gateway.root_public)
        local_port = client._transport.get_extra_info("sockname")[1]
        # The gateway sees the client's own address and port, not HAProxy's outgoing connection.
        assert server.session_list()[0]["peer"] == ("127.0.0.1", local_port)
        assert await client.ping() >= 0
        # The balancer's health checks go to /readyz and find the node ready: none of them is a
        # connection to the client port.
        await until(lambda: len(readiness_answers) >= 2, timeout_s=10)
        assert set(readiness_answers) == {200}
        # (Proxy.listening's probe may have gone through too: a header, then peer_closed.)
        assert server.proxy_counters["proxy"] in (1, 2) and set(server.close_reasons) <= {"peer_closed"}
        # The per-source limit applies to the client behind the proxy: 2 silent connections from
        # another address are held, the third is refused; the first client is unaffected.
        silent = [await asyncio.open_connection("127.0.0.1", port, local_addr=(OTHER_CLIENT, 0)) for _ in range(3)]
        await until(lambda: server.source_refusals["preauth_per_source"] == 1, timeout_s=10)
        assert await client.ping() >= 0
        for _, writer in silent:
            writer.close()
        await client.close()
        assert server.proxy_counters["refused"] == 0
    finally:
        proxy.stop()


async def websocket_through(gateway, issuer, port: int, certificate) -> None:
    """A session over wss through the proxy, and the client address the gateway saw for a
    connection from another address."""
    server = gateway._server
    context = ssl.create_default_context(cafile=str(certificate[0]))  # trusts the self-signed one
    client = await Client.connect("127.0.0.1", port, token=issuer.issue("alice", audience=AUD), device=1,
                                  root_public=gateway.root_public, ws_path="/interlink", ws_ssl=context,
                                  ws_origin="https://chat.example")
    assert await client.ping() >= 0
    other = await ws_connect(f"wss://127.0.0.1:{port}/interlink", ssl=context, local_addr=(OTHER_CLIENT, 0))
    await until(lambda: ("127.0.0.2", 0) in server.forwarded.values(), timeout_s=10)
    await other.close()
    await client.close()


async def test_nginx_websocket_with_tls(gateway, issuer, tmp_path, certificate):
    port = free_port()
    ws_host, ws_port = gateway.ws_address
    config = localised("nginx-websocket", {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;", "10.0.1.10:7480": f"{ws_host}:{ws_port}",
        "/etc/ssl/interlink/fullchain.pem": str(certificate[0]), "/etc/ssl/interlink/privkey.pem": str(certificate[1])})
    command = [need("nginx"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
               "-g", f"daemon off; pid {tmp_path}/nginx.pid; error_log stderr;"]
    # nginx keeps temporary files under its prefix; a run as a normal user needs them in the scratch folder.
    temp = "\n".join(f"    {kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    assert "http {\n" in config
    config = config.replace("http {\n", f"http {{\n    access_log off;\n{temp}\n", 1)
    proxy = Proxy(command, config, tmp_path / "nginx.conf")
    try:
        await proxy.listening(port)
        await websocket_through(gateway, issuer, port, certificate)
    finally:
        proxy.stop()


async def test_haproxy_websocket_with_tls(gateway, issuer, tmp_path, certificate):
    port = free_port()
    ws_host, ws_port = gateway.ws_address
    config = localised("haproxy-websocket", {
        "bind :443 ssl crt /etc/ssl/interlink/chat.pem": f"bind 127.0.0.1:{port} ssl crt {certificate[2]}",
        "10.0.1.10:7480": f"{ws_host}:{ws_port}"})
    proxy = Proxy([need("haproxy"), "-db", "-f", str(tmp_path / "haproxy.cfg")], config, tmp_path / "haproxy.cfg")
    try:
        await proxy.listening(port)
        await websocket_through(gateway, issuer, port, certificate)
    finally:
        proxy.stop()
