"""Write the seed corpora (and libFuzzer dictionaries) of the frames, handshake, server_hello,
config, proxy and nats_wire harnesses.

    .venv/bin/python fuzz/make_seeds.py            # rewrites fuzz/corpus/{frames,handshake,server_hello,config,proxy,
                                                   # nats_wire}/ and fuzz/{handshake,server_hello,config,proxy,nats_wire}.dict
    .venv/bin/python fuzz/make_seeds.py proxy      # one harness only

Every seed is deterministic (fixed keys from ``fuzzkeys.py``, Ed25519 signatures are deterministic,
no clock, no randomness), so running this again gives the same files. Each seed is a valid or
near-valid input in its harness's layout: the bytes the harness reads with ``ConsumeBytes`` first,
then the ints it reads with ``ConsumeIntInRange`` (``fuzzlib.encode_ints``). Each seed is run
through its harness's ``check`` before it is written, recording what the harness reads: a
seed that violates the property, or that the harness reads otherwise than it was written, fails
here. The stanza harnesses keep their own seed script.
"""

from __future__ import annotations

import importlib
import shutil
import sys

import msgpack

import fuzzkeys
import fuzzlib
from fuzzlib import FUZZ_DIR, encode_ints
from interlink.core.protocol import _cipher_pure
from interlink.core.protocol.certs import issue_node_certificate, server_hello, x25519_public

WIRE_MAX = 65535
MAX_NONCE = 2**64 - 1


class Seed(bytes):
    """A seed's bytes, remembering what the harness must read from them: ``body`` (what it takes
    with ``ConsumeBytes``, in order) and ``spec`` (its ``ConsumeIntInRange`` calls)."""

    @classmethod
    def of(cls, body: bytes, spec: list) -> "Seed":
        seed = cls(body + encode_ints(spec))
        seed.body, seed.spec = body, list(spec)
        return seed


class Recorder:
    """A FuzzedDataProvider that records what a harness reads, to compare with the seed's intent."""

    def __init__(self, data: bytes) -> None:
        import atheris

        self._inner = atheris.FuzzedDataProvider(data)
        self.ints, self.taken = [], []

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:  # noqa: N802 (atheris' name)
        value = self._inner.ConsumeIntInRange(lo, hi)
        self.ints.append((lo, hi, value))
        return value

    def ConsumeBytes(self, count: int) -> bytes:  # noqa: N802
        data = self._inner.ConsumeBytes(count)
        self.taken.append(data)
        return data

    def remaining_bytes(self) -> int:
        return self._inner.remaining_bytes()


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


# ------------------------------------------------------------------------------- frames


def frames_seed(stream: bytes, feeds=((0, 0, 0),), limit=None, cipher=0, nonce=0) -> bytes:
    """Layout of fuzz_frames.check: limit, feeds (cut, buffer kind, new limit), cipher, nonce."""
    spec = []
    if limit is None:
        spec.append((0, 3, 0))
    else:
        kind, value = limit
        spec += [(0, 3, kind), (1, (16, 1024, WIRE_MAX)[kind - 1], value)]
    spec.append((1, 12, len(feeds)))
    for cut, kind, new_limit in feeds:
        spec += [(0, 0xFFFF, cut), (0, 3, kind), (0, 0xFFFF, new_limit)]
    spec.append((0, 1, cipher))
    if nonce == 0:
        spec.append((0, 2, 0))
    elif nonce >= MAX_NONCE - 3:
        spec += [(0, 2, 1), (0, 3, MAX_NONCE - nonce)]
    else:
        spec += [(0, 2, 2), (0, MAX_NONCE, nonce)]
    return Seed.of(stream, spec)


def frames_seeds() -> dict:
    import fuzz_frames as harness

    key, valid = harness.KEY, harness.VALID_STREAM
    ping = harness.VALID_PLAINTEXT

    def sealed(plaintexts, cipher="ChaChaPoly", nonce=0) -> bytes:
        return _cipher_pure.CipherState(cipher, key, nonce).encrypt_frames(plaintexts)

    seeds = {
        "empty": frames_seed(b""),
        "valid-stream": frames_seed(valid),
        "valid-stream-split": frames_seed(valid, [(1, 1, 0), (5, 2, 0), (300, 3, 0), (301, 0, 0)]),
        "byte-by-byte": frames_seed(frame(b"abc") + frame(b"d"), [(i, i % 4, 0) for i in range(1, 9)]),
        "one-byte-header-pending": frames_seed(frame(b"hello") + b"\x00"),
        "header-pending": frames_seed(frame(b"hello") + b"\x00\x05he"),
        "zero-length": frames_seed(frame(b"ok") + b"\x00\x00" + frame(b"never")),
        "zero-length-split-header": frames_seed(frame(b"ok") + b"\x00\x00", [(5, 1, 0)]),
        "oversize-small-limit": frames_seed(frame(b"x" * 16) + frame(b"y" * 17), limit=(1, 16)),
        "limit-inclusive": frames_seed(frame(b"x" * 1024), limit=(2, 1024)),
        "limit-one": frames_seed(frame(b"a") + frame(b"bc"), limit=(1, 1)),
        "oversize-header-only": frames_seed(b"\xff\xff", limit=(3, 1000)),
        "limit-lowered-under-pending": frames_seed(frame(b"z" * 40), [(10, 0, 0), (20, 1, 8)]),
        "limit-raised-mid-stream": frames_seed(frame(b"z" * 40) + frame(b"w" * 9), [(10, 0, 0), (20, 2, 100)], limit=(2, 40)),
        "max-wire-frame": frames_seed(frame(b"m" * 4000), [(2, 0, 0), (3000, 3, 0)]),
        "frames-after-failure": frames_seed(b"\x00\x00" + valid, [(2, 0, 0), (10, 1, 0)]),
        "sealed-chacha": frames_seed(sealed([ping])),
        "sealed-aesgcm": frames_seed(sealed([ping], "AESGCM"), cipher=1),
        "sealed-several": frames_seed(sealed([ping, b"\x81\xa1t\xa3bye", b"x" * 200]), [(20, 1, 0)]),
        "sealed-nonce-5": frames_seed(sealed([ping], nonce=5), nonce=5),
        "sealed-wrong-nonce": frames_seed(sealed([ping], nonce=1), nonce=0),
        "tag-only": frames_seed(frame(b"\x00" * 16)),
        "shorter-than-tag": frames_seed(frame(b"\x01" * 15)),
        "nonce-exhausted": frames_seed(frame(b"q" * 20), nonce=MAX_NONCE),
        "nonce-last-usable": frames_seed(frame(b"q" * 20) + frame(b"r" * 20), [(5, 0, 0)], nonce=MAX_NONCE - 1),
        "nonce-high": frames_seed(sealed([ping], nonce=2**63), nonce=2**63),
    }
    return seeds


# ---------------------------------------------------------------------------- handshake


def handshake_raw(stream: bytes, steps=(), settings=0) -> bytes:
    """Mode 0 of fuzz_handshake: settings, steps (("data", cut) / ("timer", s) / ("eof",)), stream."""
    spec = [(0, 15, 0), (0, 2, settings), (1, 8, max(1, len(steps)))]
    for step in steps or [("data", 0)]:
        if step[0] == "data":
            spec += [(0, 9, 0), (0, 0xFFFF, step[1])]
        elif step[0] == "timer":
            spec += [(0, 9, 8), (0, 7, step[1])]
        else:
            spec += [(0, 9, 9)]
    return Seed.of(stream, spec)


def handshake_auth(payload: bytes) -> bytes:
    return Seed.of(payload, [(0, 15, 10)])


def handshake_real(payload: bytes, ik: bool, aes: bool = False) -> bytes:
    return Seed.of(payload, [(0, 15, 15 if ik else 14), (0, 1, int(aes))])


def handshake_seeds() -> dict:
    e = x25519_public(fuzzkeys.CLIENT_EPHEMERAL)
    xx, ik = b"IL\x01\x01", b"IL\x01\x11"
    good = pack({"token": "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2ln", "device": 3, "agent": "interlink-python"})
    seeds = {
        "raw-xx-message1": handshake_raw(xx + frame(e)),
        "raw-xx-message1-split": handshake_raw(xx + frame(e), [("data", 2), ("data", 5), ("data", 20)]),
        "raw-xx-message1-payload": handshake_raw(xx + frame(e + b"early data")),
        "raw-xx-message3-garbage": handshake_raw(xx + frame(e) + frame(b"\x00" * 64 + good)),
        "raw-xx-message3-truncated": handshake_raw(xx + frame(e) + frame(b"\x01" * 20)),
        "raw-xx-low-order": handshake_raw(xx + frame(b"\x00" * 32)),
        "raw-xx-low-order-one": handshake_raw(xx + frame(b"\x01" + b"\x00" * 31)),
        "raw-xx-truncated": handshake_raw(xx + frame(e[:31])),
        "raw-aesgcm": handshake_raw(b"IL\x01\x02" + frame(e)),
        "raw-aesgcm-disabled": handshake_raw(b"IL\x01\x02" + frame(e), settings=1),
        "raw-ik-message1": handshake_raw(ik + frame(e + b"\x00" * 48 + good + b"\x00" * 16)),
        "raw-ik-truncated": handshake_raw(ik + frame(e)),
        "raw-bad-magic": handshake_raw(b"XL\x01\x01" + frame(e)),
        "raw-bad-version": handshake_raw(b"IL\x02\x01" + frame(e)),
        "raw-unknown-suite": handshake_raw(b"IL\x01\x03" + frame(e)),
        "raw-pq-suite": handshake_raw(b"IL\x01\x21" + frame(e)),
        "raw-preamble-trickle": handshake_raw(xx + frame(e), [("data", 1), ("data", 1), ("data", 1), ("data", 1)]),
        "raw-zero-frame": handshake_raw(xx + b"\x00\x00"),
        "raw-oversize-frame": handshake_raw(xx + b"\x03\x01" + b"\x00" * 16, settings=2),
        "raw-deadline": handshake_raw(xx + frame(e), [("data", 6), ("timer", 3), ("timer", 3), ("data", 10)]),
        "raw-eof": handshake_raw(xx + frame(e), [("data", 20), ("eof",)]),
        "auth-good": handshake_auth(good),
        "auth-no-agent": handshake_auth(pack({"token": "t", "device": 1})),
        "auth-device-max": handshake_auth(pack({"token": "t", "device": 2**31 - 1, "agent": ""})),
        "auth-device-zero": handshake_auth(pack({"token": "t", "device": 0, "agent": "a"})),
        "auth-device-bool": handshake_auth(pack({"token": "t", "device": True})),
        "auth-device-too-big": handshake_auth(pack({"token": "t", "device": 2**31})),
        "auth-token-empty": handshake_auth(pack({"token": "", "device": 1})),
        "auth-token-bin": handshake_auth(pack({"token": b"t", "device": 1})),
        "auth-agent-long": handshake_auth(pack({"token": "t", "device": 1, "agent": "a" * 129})),
        "auth-agent-128": handshake_auth(pack({"token": "t", "device": 1, "agent": "é" * 128})),
        "auth-int-keys": handshake_auth(pack({1: "t", "token": "t", "device": 1})),
        "auth-list": handshake_auth(pack(["t", 1, "a"])),
        "auth-trailing": handshake_auth(good + b"\xc0"),
        "auth-truncated": handshake_auth(good[:-3]),
        "auth-bad-utf8": handshake_auth(b"\x82\xa5token\xa2\xff\xfe\xa6device\x01"),
        "auth-ext": handshake_auth(pack({"token": "t", "device": 1, "x": msgpack.ExtType(5, b"e")})),
        "auth-nested": handshake_auth(b"\x91" * 2000 + b"\x80"),
        "real-xx-good": handshake_real(good, ik=False),
        "real-xx-bad": handshake_real(pack({"token": "t", "device": 0}), ik=False),
        "real-xx-aes-good": handshake_real(good, ik=False, aes=True),
        "real-ik-good": handshake_real(good, ik=True),
        "real-ik-bad": handshake_real(b"\xc1", ik=True, aes=True),
    }
    return seeds


# ------------------------------------------------------------------------- server hello


def hello_seed(mode: int, body: bytes, extra=()) -> bytes:
    """fuzz_server_hello layout: mode, the mode's ints, then the bytes."""
    return Seed.of(body, [(0, 15, mode), *extra])


def server_hello_seeds() -> dict:
    import fuzz_server_hello as harness

    cert, now_ms = fuzzkeys.CERT, int(fuzzkeys.NOW * 1000)
    hello = server_hello(cert, fuzzkeys.NODE, now_ms)

    def cert_bytes(**change) -> bytes:
        fields = {"v": 1, "key": fuzzkeys.SERVER_PUBLIC, "node": fuzzkeys.NODE,
                  "nbf": fuzzkeys.NOT_BEFORE, "exp": fuzzkeys.EXPIRES}
        fields.update(change)
        return pack({k: v for k, v in fields.items() if v is not None})

    def signed_hello(cert_: bytes, sig: bytes | None = None, **outer) -> bytes:
        fields = {"cert": cert_, "sig": fuzzkeys.sign(cert_) if sig is None else sig, "node": "n", "time": now_ms}
        fields.update(outer)
        return pack({k: v for k, v in fields.items() if v is not None})

    hello_mode, cert_mode, signed_mode, client_mode = harness.MODES
    clock = [(0, 3, 0), (0, 1, 0)]  # now: the fixed time; remote static: the certified key
    seeds = {
        "hello-valid": hello_seed(hello_mode, hello, clock),
        "hello-valid-at-nbf": hello_seed(hello_mode, hello, [(0, 3, 1), (0, 1, 0)]),
        "hello-valid-at-exp": hello_seed(hello_mode, hello, [(0, 3, 2), (0, 1, 0)]),
        "hello-expired": hello_seed(hello_mode, hello, [(0, 3, 3), (0, 1, 0)]),
        "hello-other-key": hello_seed(hello_mode, hello, [(0, 3, 0), (0, 1, 1)]),
        "hello-extra-fields": hello_seed(hello_mode, signed_hello(cert.cert, extra=[1, 2]), clock),
        "hello-node-time-unsigned": hello_seed(hello_mode, signed_hello(cert.cert, node="else", time=0), clock),
        "hello-time-bool": hello_seed(hello_mode, signed_hello(cert.cert, time=True), clock),
        "hello-sig-short": hello_seed(hello_mode, signed_hello(cert.cert, sig=cert.sig[:63]), clock),
        "hello-sig-flipped": hello_seed(hello_mode, signed_hello(cert.cert, sig=bytes([cert.sig[0] ^ 1]) + cert.sig[1:]), clock),
        "hello-other-root": hello_seed(hello_mode, signed_hello(cert.cert, sig=fuzzkeys.sign(cert.cert, fuzzkeys.OTHER_ROOT)), clock),
        "hello-no-cert": hello_seed(hello_mode, pack({"sig": cert.sig, "node": "n", "time": 1}), clock),
        "hello-cert-str": hello_seed(hello_mode, pack({"cert": "text", "sig": cert.sig, "node": "n", "time": 1}), clock),
        "hello-not-a-map": hello_seed(hello_mode, pack([cert.cert, cert.sig]), clock),
        "hello-trailing": hello_seed(hello_mode, hello + b"\x00", clock),
        "hello-truncated": hello_seed(hello_mode, hello[:-5], clock),
        "hello-int-keys": hello_seed(hello_mode, pack({1: 2}), clock),
        "hello-empty": hello_seed(hello_mode, b"", clock),
        "cert-valid": hello_seed(cert_mode, cert.cert, [(0, 1, 0)] + clock),
        "cert-file-form": hello_seed(cert_mode, cert.to_bytes(), [(0, 1, 1)] + clock),
        "cert-version-2": hello_seed(cert_mode, cert_bytes(v=2), [(0, 1, 0)] + clock),
        "signed-valid": hello_seed(signed_mode, cert.cert, [(0, 1, 0)] + clock),
        "signed-other-root": hello_seed(signed_mode, cert.cert, [(0, 1, 1)] + clock),
        "signed-version-2": hello_seed(signed_mode, cert_bytes(v=2), [(0, 1, 0)] + clock),
        "signed-version-bool": hello_seed(signed_mode, cert_bytes(v=True), [(0, 1, 0)] + clock),
        "signed-key-31": hello_seed(signed_mode, cert_bytes(key=fuzzkeys.SERVER_PUBLIC[:31]), [(0, 1, 0)] + clock),
        "signed-key-other": hello_seed(signed_mode, cert_bytes(key=fuzzkeys.CLIENT_PUBLIC), [(0, 1, 0)] + clock),
        "signed-no-node": hello_seed(signed_mode, cert_bytes(node=None), [(0, 1, 0)] + clock),
        "signed-nbf-future": hello_seed(signed_mode, cert_bytes(nbf=int(fuzzkeys.NOW) + 1), [(0, 1, 0)] + clock),
        "signed-exp-past": hello_seed(signed_mode, cert_bytes(exp=int(fuzzkeys.NOW) - 1), [(0, 1, 0)] + clock),
        "signed-exp-before-nbf": hello_seed(signed_mode, cert_bytes(nbf=int(fuzzkeys.NOW) + 5, exp=int(fuzzkeys.NOW) - 5), [(0, 1, 0)] + clock),
        "signed-huge-times": hello_seed(signed_mode, cert_bytes(nbf=-(2**63), exp=2**64 - 1), [(0, 1, 0)] + clock),
        "signed-extra-field": hello_seed(signed_mode, pack({"v": 1, "key": fuzzkeys.SERVER_PUBLIC, "node": "x", "nbf": 0, "exp": 2**40, "z": None}), [(0, 1, 0)] + clock),
        "signed-not-msgpack": hello_seed(signed_mode, b"\xc1", [(0, 1, 0)] + clock),
        "client-valid-hello": hello_seed(client_mode, hello, [(0, 1, 0)]),
        "client-aes-valid-hello": hello_seed(client_mode, hello, [(0, 1, 1)]),
        "client-empty-hello": hello_seed(client_mode, b"", [(0, 1, 0)]),
        "client-other-root": hello_seed(client_mode, signed_hello(cert.cert, sig=fuzzkeys.sign(cert.cert, fuzzkeys.OTHER_ROOT)), [(0, 1, 0)]),
        "client-other-key": hello_seed(client_mode, server_hello(
            issue_node_certificate(fuzzkeys.ROOT, fuzzkeys.CLIENT_PUBLIC, "x", fuzzkeys.NOT_BEFORE, fuzzkeys.EXPIRES), "x", now_ms
        ), [(0, 1, 0)]),
    }
    return seeds


# ------------------------------------------------------------------------------- config


def config_seed(toml: str | bytes, env=(), mode=0) -> bytes:
    """fuzz_config layout: mode, the env variables (key index, value length), then TOML bytes
    followed by the env values."""
    import fuzz_config as harness

    text = toml.encode() if isinstance(toml, str) else toml
    spec = [(0, 3, mode), (0, harness.MAX_ENV, len(env))]
    values = b""
    for name, value in env:
        spec += [(0, len(harness.ENV_NAMES) - 1, harness.ENV_NAMES.index(name)), (0, 255, len(value.encode()))]
        values += value.encode()
    spec.append((0, 0xFFFF, len(text)))
    return Seed.of(text + values, spec)


PROVIDER = """
[[providers]]
id = "alpha"
issuer = "https://id.alpha.example"
audience = "interlink"
discovery = true
default_accept = ["beta"]
"""

JWKS_PROVIDER = """
[[providers]]
id = "beta"
issuer = "http://127.0.0.1:8080/beta"
audience = "gw"
algorithms = ["EdDSA"]
jwks = { keys = [ { kty = "OKP", crv = "Ed25519", x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", kid = "k1" } ] }
"""


def config_seeds() -> dict:
    from interlink.config import default_config_toml

    return {
        "empty": config_seed(""),
        "defaults": config_seed(default_config_toml()),
        "some-keys": config_seed('port = 7460\nwindow = 128\ndata_dir = "/srv/interlink"\n'),
        "provider": config_seed(PROVIDER),
        "provider-jwks": config_seed(JWKS_PROVIDER),
        "provider-jwks-uri": config_seed(PROVIDER.replace("discovery = true", 'jwks_uri = "https://id.alpha.example/jwks"')),
        "two-providers-same-id": config_seed(PROVIDER + PROVIDER),
        "provider-unknown-key": config_seed(PROVIDER + "colour = 1\n"),
        "provider-missing-issuer": config_seed('[[providers]]\nid = "a"\naudience = "x"\n'),
        "provider-bad-id": config_seed(PROVIDER.replace('"alpha"', '"Alpha!"')),
        "provider-http": config_seed(PROVIDER.replace("https://id", "http://id")),
        "provider-two-sources": config_seed(PROVIDER + 'jwks_uri = "https://x.example/j"\n'),
        "provider-hs256": config_seed(PROVIDER + 'algorithms = ["HS256"]\n'),
        "providers-not-tables": config_seed("providers = 3\n"),
        "unknown-key": config_seed("prot = 7450\n"),
        "wrong-type": config_seed('port = "7450"\n'),
        "out-of-range": config_seed("port = 70000\n"),
        "float-for-int": config_seed("window = 2.5\n"),
        "int-for-float": config_seed("drain_timeout_s = 3\n"),
        "bool-for-int": config_seed("window = true\n"),
        "inf": config_seed("drain_timeout_s = inf\n"),
        "nan": config_seed("preauth_deadline_s = nan\n"),
        "datetime": config_seed("node_name = 1979-05-27T07:32:00Z\n"),
        "table-for-str": config_seed("[host]\nx = 1\n"),
        "frame-below-token": config_seed("max_token_bytes = 8192\nmax_frame_bytes = 8000\n"),
        "admin-token-short": config_seed('admin_token = "short"\n'),
        "string-escapes": config_seed('node_name = "tab\\there \\"q\\" \\\\ \\u00e9"\nhost = "::1"\n'),
        "not-toml": config_seed("port = = 1\n"),
        "not-utf8": config_seed(b'node_name = "\xff"\n'),
        "deep-array": config_seed("port = " + "[" * 40 + "]" * 40 + "\n"),
        "nested-too-deeply": config_seed("port = " + "[" * 600 + "]" * 600 + "\n"),
        "env-port": config_seed("port = 7460\n", [("INTERLINK_PORT", "7461")]),
        "env-bad-int": config_seed("", [("INTERLINK_WINDOW", "abc")]),
        "env-float": config_seed("", [("INTERLINK_MAILBOX_TTL_S", "3600.5"), ("INTERLINK_DURABILITY", "async")]),
        "env-inf": config_seed("", [("INTERLINK_DRAIN_TIMEOUT_S", "inf")]),
        "env-unknown": config_seed("", [("INTERLINK_PROT", "1")]),
        "env-providers": config_seed("", [("INTERLINK_PROVIDERS", "[]")]),
        "env-data-dir-empty": config_seed("", [("INTERLINK_DATA_DIR", "")]),
        "env-ignored": config_seed("", [("INTERLINK_PURE", "1"), ("HOME", "/x")]),
        "env-underscores": config_seed("", [("INTERLINK_PORT", "7_450")]),
        "mapping-mode": config_seed('port = 1\nwindow = 8\n', mode=1),
        "cluster": config_seed(CLUSTER),
        "cluster-node-table": config_seed(CLUSTER.replace('node-b = "10.0.0.2:7450"',
                                                          'node-b = { address = "[fd00::2]:7450", ws = "wss://b.example/il" }')),
        "cluster-node-not-listed": config_seed(CLUSTER.replace('node = "node-a"', 'node = "node-z"')),
        "cluster-bad-url": config_seed(CLUSTER.replace("nats://", "http://")),
        "cluster-unknown-key": config_seed(CLUSTER.replace("version = 1", "version = 1\nnodez = 2")),
        "cluster-env-node": config_seed(CLUSTER, [("INTERLINK_CLUSTER_NODE", "node-b")]),
    }


CLUSTER = """
[cluster]
node = "node-a"
version = 1
nats = ["nats://10.0.0.9:4222", "tls://nats.example:4222"]
request_timeout_s = 1.5
[cluster.nodes]
node-a = "10.0.0.1:7450"
node-b = "10.0.0.2:7450"
"""


# -------------------------------------------------------------------------------- proxy

PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_seed(stream: bytes, kind: int = 0, trailing: int | None = None) -> bytes:
    """Layout of fuzz_proxy.check: first buffer kind, whether the harness writes the length field
    (and the bytes after the header it leaves), then the stream."""
    spec = [(0, 3, kind), (0, 1, int(trailing is not None))]
    if trailing is not None:
        spec.append((0, 255, trailing))
    return Seed.of(stream, spec)


def proxy_raw(version_command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header written out from proxy-protocol.txt §2.2 (``length`` may lie)."""
    length = len(body) if length is None else length
    return PROXY_SIGNATURE + bytes([version_command, family]) + length.to_bytes(2, "big") + body


def proxy_seeds() -> dict:
    from interlink.core.protocol.proxyheader import encode_proxy_header

    tcp4 = encode_proxy_header(source=("192.0.2.10", 51234), destination=("198.51.100.7", 443))
    tlvs = [(0x01, b"h2"), (0x02, b"chat.example"), (0x05, b"unique-1"), (0x20, b"\x01\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3")]
    inet4 = bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x13, 0x88, 0x00, 0x35])
    inet6 = bytes(15) + b"\x01" + bytes(10) + b"\xff\xff\xc0\x00\x02\x01" + b"\x00\x01\x00\x02"
    unix = b"/run/haproxy.sock".ljust(108, b"\x00") + b"\x00abstract".ljust(108, b"\x00")
    client = b"IL\x01\x01\x00\x20" + bytes(range(32))  # what the client sends after the header
    return {
        "empty": proxy_seed(b""),
        "tcp4": proxy_seed(tcp4),
        "tcp4-client-bytes": proxy_seed(tcp4 + client, kind=1),
        "tcp4-tlvs": proxy_seed(encode_proxy_header(source=("203.0.113.9", 1), destination=("192.0.2.1", 7450), tlvs=tlvs), kind=2),
        "tcp6-tlvs": proxy_seed(encode_proxy_header(source=("2001:db8::1", 40000), destination=("::ffff:192.0.2.1", 7450),
                                                    tlvs=tlvs[:2]) + client, kind=3),
        "udp4": proxy_seed(proxy_raw(0x21, 0x12, inet4)),
        "udp6": proxy_seed(proxy_raw(0x21, 0x22, inet6 + b"\x04\x00\x00")),
        "unix-stream": proxy_seed(proxy_raw(0x21, 0x31, unix) + client),
        "unix-dgram": proxy_seed(proxy_raw(0x21, 0x32, unix[::-1])),
        "local-unspec": proxy_seed(encode_proxy_header("local") + client),
        "local-tlvs": proxy_seed(encode_proxy_header("local", tlvs=[(0x04, b""), (0x05, b"check")])),
        "local-inet": proxy_seed(proxy_raw(0x20, 0x11, inet4 + b"\x01\x00\x02h2")),
        "proxy-unspec-tlvs": proxy_seed(proxy_raw(0x21, 0x00, b"\x30\x00\x03ns1")),
        "largest": proxy_seed(encode_proxy_header("local", tlvs=[(0xEE, b"x" * (4096 - 16 - 3))])),
        "harness-length": proxy_seed(PROXY_SIGNATURE + b"\x21\x11\x00\x00" + inet4 + b"\x01\x00\x02h2" + client, trailing=len(client)),
        "version-1-text": proxy_seed(b"PROXY TCP4 192.0.2.10 198.51.100.7 51234 443\r\n" + client),
        "preamble-not-proxy": proxy_seed(client),
        "signature-off": proxy_seed(PROXY_SIGNATURE[:7] + b"\x00" + tcp4[8:]),
        "version-1": proxy_seed(proxy_raw(0x11, 0x11, inet4)),
        "command-2": proxy_seed(proxy_raw(0x22, 0x11, inet4)),
        "family-unknown": proxy_seed(proxy_raw(0x21, 0x13, inet4)),
        "length-over": proxy_seed(proxy_raw(0x21, 0x11, inet4, length=4081)),
        "length-under-inet6": proxy_seed(proxy_raw(0x21, 0x21, inet6[:35])),
        "tlv-truncated": proxy_seed(proxy_raw(0x21, 0x11, inet4 + b"\x01\x00")),
        "tlv-overrun": proxy_seed(proxy_raw(0x21, 0x11, inet4 + b"\x01\x00\x05h2") + client),
    }


# --------------------------------------------------------------------------- dictionaries
# libFuzzer dictionaries (fuzz/<name>.dict, passed with -dict= by run.py): tokens the mutator
# inserts whole, which byte flips would take long to assemble (keys, magic bytes, TOML literals).


def dictionary_line(token: bytes) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)
    return f'"{text}"'


def handshake_tokens() -> list:
    return [b"IL\x01\x01", b"IL\x01\x02", b"IL\x01\x11", b"IL\x01\x12", b"IL\x01", b"\x00\x20",
            pack("token"), pack("device"), pack("agent"), b"\x83", b"\x82", b"\x81",
            pack(2**31 - 1), pack(2**31), pack("a" * 128), b"\xc4\x01", b"\xc3", b"\xc0"]


def server_hello_tokens() -> list:
    return [pack(key) for key in ("cert", "sig", "node", "time", "v", "key", "nbf", "exp")] + [
        b"\xc4\x20", b"\xc4\x40", b"\x84", b"\x85", pack(-(2**63)), pack(2**64 - 1),
        pack(int(fuzzkeys.NOW)), pack(fuzzkeys.NOT_BEFORE), pack(fuzzkeys.EXPIRES), b"\xc2", b"\xc3", b"\xc0"]


def config_tokens() -> list:
    from dataclasses import fields

    from interlink.config import GatewayConfig
    from interlink.core.domain.auth import Provider

    keys = [spec.name for spec in fields(GatewayConfig)]
    words = [*keys, *(f"{key} = " for key in keys), *(spec.name for spec in fields(Provider)),
             "[[providers]]", "[providers]", " = ", "\n", "[", "]", "{", "}", ", ", '"', "'", '"""', "'''", "#",
             "true", "false", "inf", "+inf", "-inf", "nan", "1e999", "-0.0", "0x7f", "0o777", "0b1", "1_000",
             "9223372036854775807", "-9223372036854775808", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27",
             "\\u0000", "\\n", "https://", "http://127.0.0.1", "keys", "kty", "OKP", "EC", "RSA", "crv", "Ed25519",
             "P-256", "EdDSA", "ES256", "RS256", "HS256", "none", "*", "sync", "async", "inline", "thread",
             "[cluster]", "[cluster.nodes]", "node", "nodes", "version", "nats", "request_timeout_s",
             "nats_credentials", "nats_ca_file", "address", "ws", "node-a", "nats://127.0.0.1:4222", "tls://",
             "127.0.0.1:7450", "[::1]:7450", "wss://"]
    return [word.encode() for word in words]


def proxy_tokens() -> list:
    lengths = [n.to_bytes(2, "big") for n in (0, 3, 12, 36, 216, 4080)]
    tokens = [PROXY_SIGNATURE, PROXY_SIGNATURE + b"\x21\x11\x00\x0c", PROXY_SIGNATURE + b"\x20\x00\x00\x00", b"PROXY ",
              b"\x20", b"\x21", *(bytes([f]) for f in (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32)), *lengths,
              *(bytes([t]) + b"\x00" for t in (0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x21, 0x30)), b"\x00" * 16]
    return list(dict.fromkeys(tokens))  # 0x21 is a command byte and a family byte: once


# -------------------------------------------------------------------------------- nats_wire


def nats_wire_seed(stream: bytes, payload_index: int = 3, first: int = 4096, cut: int = 0) -> bytes:
    """Layout of fuzz_nats_wire.check: the index of its max_payload (``MAX_PAYLOADS``), the first
    read's size, the cycle's start (in ``CUTS``), then the stream."""
    import fuzz_nats_wire as harness

    return Seed.of(stream, [(0, len(harness.MAX_PAYLOADS) - 1, payload_index), (0, harness.MAX_FIRST_READ, first),
                            (0, len(harness.CUTS) - 1, cut)])


def nats_wire_seeds() -> dict:
    info = b'INFO {"server_id":"NDX","version":"2.10.0","proto":1,"max_payload":1048576,"nonce":"n0nce"}\r\n'
    relay = msgpack.packb({"m": b"\x01" * 16, "r": [[1, "p", "alice", "d1", 65536, {"t": "msg"}]]})
    message = b"MSG interlink.node-a.relay.node-b 1 %d\r\n%s\r\n" % (len(relay), relay)
    return {
        "connect": nats_wire_seed(info + b"PONG\r\n"),
        "relay-batch": nats_wire_seed(message, first=7, cut=2),
        "everything": nats_wire_seed(info + b"PING\r\n" + message + b"MSG _INBOX.a 2 reply.b 0\r\n\r\n+OK\r\n"
                                     b"-ERR 'Permissions Violation for Publish to \"x\"'\r\nmsg\tx\t3\t2\r\nab\r\n",
                                     first=1, cut=5),
        "payload-with-crlf": nats_wire_seed(b"MSG a 1 6\r\n\r\nMSG\r\n\r\n", payload_index=0, first=3),
        "over-max-payload": nats_wire_seed(b"MSG a 1 17\r\n" + b"x" * 17 + b"\r\n", payload_index=0),
        "payload-not-ended": nats_wire_seed(b"MSG a 1 3\r\nabcd\r\n"),
        "hmsg": nats_wire_seed(b"HMSG a 1 12 14\r\nNATS/1.0\r\n\r\nab\r\n"),
        "long-line": nats_wire_seed(b"INFO " + b"9" * 4100 + b"\r\n", first=4000, cut=6),
        "line-at-the-bound": nats_wire_seed(b"-ERR '" + b"e" * 4089 + b"'\r\nPING\r\n", first=4095, cut=1),
        "deep-json": nats_wire_seed(b"INFO " + b"[" * 2000 + b"\r\n"),
        "bad-msg-arguments": nats_wire_seed(b"MSG a b 3\r\nabc\r\n"),
        "empty-line": nats_wire_seed(b"PING\r\n\r\n"),
        "no-responders": nats_wire_seed(b"HMSG _INBOX.q.0 2 16 16\r\nNATS/1.0 503\r\n\r\n\r\nPONG\r\n", first=20, cut=3),
        "hmsg-bad-headers": nats_wire_seed(b"HMSG a 1 reply 14 16\r\nHTTP/1.1 200\r\n\r\nab\r\n"),
    }


def nats_wire_tokens() -> list:
    return [b"MSG ", b"INFO ", b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR '", b"\r\n", b"HMSG ", b" 1 ",
            b"NATS/1.0", b"NATS/1.0 503\r\n\r\n", b" 16 16\r\n",
            b' {"max_payload":16}', b"\t", b"interlink.node-a.relay.node-b"]


DICTIONARIES = {"handshake": handshake_tokens, "server_hello": server_hello_tokens, "config": config_tokens,
                "proxy": proxy_tokens, "nats_wire": nats_wire_tokens}


# ------------------------------------------------------------------------------- main

HARNESSES = {
    "frames": frames_seeds,
    "handshake": handshake_seeds,
    "server_hello": server_hello_seeds,
    "config": config_seeds,
    "proxy": proxy_seeds,
    "nats_wire": nats_wire_seeds,
}


# ------------------------------------------------------------------------------- relay_serve
# fuzz_relay_serve.py's seeds (``python fuzz/make_seeds.py relay_serve``), in the layout of its
# ``read_plan``: the mode and the batch's origin (ints), then mode 0's payload as it is (bytes), or
# what modes 1 and 2 read. Raw batches of every kind the relay serves, the link's refusals,
# malformed and misrouted records, the reproducer of each bug F1-F7 the harness found (fixed in
# d0feea7; ``regression-F…``: must pass like every seed), answers-mode inputs written out, and
# structure-aware inputs drawn from a seeded PRNG (``RelayDraw``).


class RelayDraw:
    """A provider for ``read_plan`` that draws its choices from a seeded PRNG and records them, so
    that ``Seed.of`` writes an input the harness reads the same way (the first ``forced`` ints are
    given, not drawn)."""

    def __init__(self, seed: int, forced=()) -> None:
        import random

        self.random = random.Random(seed)
        self.forced = list(forced)
        self.ints, self.taken = [], []

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:  # noqa: N802 (atheris' name)
        value = self.forced.pop(0) if self.forced else self.random.randint(lo, hi)
        self.ints.append((lo, hi, value))
        return value

    def ConsumeBytes(self, count: int) -> bytes:  # noqa: N802
        data = bytes(self.random.randrange(256) for _ in range(count))
        self.taken.append(data)
        return data

    def remaining_bytes(self) -> int:
        return 0


def relay_serve_seeds() -> dict:
    import fuzz_relay_serve as relay

    modes, most = relay.MODES - 1, len(relay.ORIGINS) + 12  # the origin choice's range (0..15)
    node_a = most  # any choice past ORIGINS is node-a
    a1, a2, a3 = (user.rpartition("@")[0] for user in (relay.A1, relay.A2, relay.A3))
    b1, b2, b3, bb, ghost = relay.B1, relay.B2, relay.B3, relay.BB, relay.GHOST
    ga, gb, inc, ts, top = relay.GA_ID, relay.GB_MARKER, relay.INC_MARKER, relay.TS_MS, relay.MAX_PLAINTEXT_BYTES

    def ident(n: int) -> bytes:
        return bytes([n]) * 16

    def here(n: int) -> bytes:  # a new group's id homed on node-b
        return relay._homed((ident(n)[:15] + bytes([i]) for i in range(256)), relay.HERE)

    def rec(seq, stanza, localpart=a1, device=1, provider="alpha", top=top):
        return [seq, provider, localpart, device, top, stanza]

    def raw(records, digest=relay.DIGEST_MARKER, origin=node_a, batch=None) -> Seed:
        body = pack(batch if batch is not None else {"m": digest, "r": records})
        return Seed.of(body, [(0, modes, relay.RAW), (0, most, origin)])

    def msg(n, to, c=None, **fields):
        return {"t": "msg", "id": ident(n), "to": to, "c": c or ({1: b"c1", 2: b"c2"} if to == b1 else {1: b"c1"}), **fields}

    def gfan(k, members, **fields):
        return {"t": "gfan", "k": k, "g": ga, "members": members, **fields}

    def gmsg(o, n=40, members=(b1, b2, b3), **fields):
        return gfan("msg", list(members), **{"id": ident(n), "b": b"group body", "ts": ts, "o": o, "n": inc, **fields})

    def iq(n, op, **fields):
        return {"t": "iq", "id": n, "op": op, **fields}

    event = {"k": "group", "id": ident(50), "from": relay.A1, "dev": 1, "g": ga, "event": "added", "members": [b1], "ver": 2}
    seeds = {
        "msg": raw([rec(1, msg(1, b1))]),
        "msg-refusals": raw([rec(1, msg(2, b2)), rec(2, msg(3, b3)), rec(3, msg(4, ghost)), rec(4, msg(5, bb)),
                             rec(5, msg(6, b1, c={1: b"only one"})), rec(6, msg(7, b1), localpart=a2)]),
        "msg-resent": raw([rec(1, msg(8, b1)), rec(2, msg(8, b1))]),
        "msg-too-large": raw([rec(1, msg(9, b3, c={1: b"c" * 65_008}))]),
        "rcpt": raw([rec(1, {"t": "rcpt", "id": ident(10), "to": b1, "kind": "read", "ids": [ident(1)]})]),
        "state": raw([rec(1, {"t": "state", "to": b1, "s": "composing"}), rec(2, {"t": "state", "to": b2, "s": "paused"})]),
        "iq-devices-keys": raw([rec(1, iq(1, "devices.get", user=b1)), rec(2, iq(2, "keys.get", user=b1, devices=[1])),
                                rec(3, iq(3, "keys.get", user=b1)), rec(4, iq(4, "devices.get", user=ghost))]),
        "iq-dir-lookup": raw([rec(1, iq(5, "dir.lookup", phone=relay.PHONE)), rec(2, iq(6, "dir.lookup", phone="0151"))]),
        "iq-blob-read": raw([rec(1, iq(61, "blob.read", blob=relay.BLOB_B, off=0, len=100)),
                             rec(2, iq(62, "blob.read", blob=relay.BLOB_A, off=0, len=100))]),
        "group-msg": raw([rec(1, {"t": "msg", "id": ident(11), "g": gb, "b": b"to GB"}),
                          rec(2, {"t": "msg", "id": ident(12), "g": gb, "b": b"not a member"}, localpart=a3)]),
        "group-state": raw([rec(1, {"t": "state", "g": gb, "s": "paused"})]),
        "group-get": raw([rec(1, iq(7, "group.get", g=gb)), rec(2, iq(8, "group.get", g=gb, skip=1))]),
        "group-add-here": raw([rec(1, iq(9, "group.add", g=gb, members=[b3]))]),
        "group-add-remote": raw([rec(1, iq(10, "group.add", g=gb, members=[relay.A3]))]),
        "group-del": raw([rec(1, iq(11, "group.del", g=gb, members=[b2]))]),
        "group-leave": raw([rec(1, iq(12, "group.leave", g=gb), localpart=a2)]),
        "group-new": raw([rec(1, iq(13, "group.new", g=here(1), members=[b1, b2], meta=b"meta"))]),
        "group-new-remote": raw([rec(1, iq(14, "group.new", g=here(2), members=[b1, relay.A2]))]),
        "gfan-check": raw([rec(1, gfan("check", [b1, b2], id=15)), rec(2, gfan("check", [ghost], id=16))]),
        "gfan-msg": raw([rec(1, gmsg(1))]),
        "gfan-event": raw([rec(1, gfan("event", [b1], fields=event, ts=ts, o=1, n=inc))]),
        "gfan-stream": raw([rec(1, gmsg(1, 41)), rec(2, gmsg(2, 42, id=b"short")), rec(3, gmsg(3, 43))]),
        "gfan-resent": raw([rec(1, gmsg(1, 44)), rec(2, gmsg(1, 44)), rec(3, gmsg(2, 45))]),
        "gfan-state": raw([rec(1, gfan("state", [b1, b2], s="composing"))]),
        "mixed-turn": raw([rec(1, msg(20, b1)), rec(2, {"t": "state", "to": b1, "s": "composing"}),
                           rec(3, iq(21, "devices.get", user=b2)), rec(4, {"t": "msg", "id": ident(22), "g": gb, "b": b"x"}),
                           rec(5, gmsg(1, 23)), rec(6, gfan("check", [b3], id=24)), rec(7, iq(25, "group.get", g=gb)),
                           rec(8, {"t": "rcpt", "id": ident(26), "to": b3, "kind": "delivered", "ids": [ident(20)]})]),
        "wrong-digest": raw([rec(1, msg(27, b1)), rec(2, msg(28, b1))], digest="0" * 64),
        "no-digest": raw([], batch={"r": [rec(1, msg(29, b1))]}),
        "r-not-a-list": raw([], batch={"m": relay.DIGEST_MARKER, "r": {"1": "x"}}),
        "not-a-map": raw([], batch=[rec(1, msg(30, b1))]),
        "empty-batch": raw([]),
        "not-msgpack": Seed.of(b"\xc1\x82\xa1m", [(0, modes, relay.RAW), (0, most, node_a)]),
        "origin-self": raw([rec(1, msg(31, b1))], origin=0),
        "origin-not-a-node": raw([rec(1, msg(32, b1))], origin=1),
        "origin-empty": raw([rec(1, msg(33, b1))], origin=2),
        "malformed-records": raw([[], [1], "junk", None, [2, "alpha", a1, 1, top], ["3", "alpha", a1, 1, top, msg(34, b1)],
                                  [4, 5, a1, 1, top, msg(35, b1)], [5, "alpha", a1, True, top, msg(36, b1)],
                                  [6, "alpha", a1, 1, "top", msg(37, b1)], [7, "alpha", a1, 1, top, "not a map"],
                                  rec(8, msg(38, b1))]),
        "misrouted": raw([rec(1, msg(39, b1), localpart=b1.rpartition("@")[0]), rec(2, msg(40, relay.A1)),
                          rec(3, {**gmsg(1, 46), "g": gb}), rec(4, gmsg(2, 47, members=[b1, relay.A1])),
                          rec(5, msg(48, b1), provider="gamma", localpart=relay.GC.rpartition("@")[0]),
                          rec(6, msg(49, b1), provider="zeta", localpart=relay.ZA.rpartition("@")[0]),
                          rec(7, iq(50, "consent.set", accept=["*"])), rec(8, {"t": "recv", "seq": [1]}),
                          rec(9, gfan("x", [b1]))]),
        "duplicate-seqs": raw([rec(5, msg(51, b1)), rec(5, msg(52, b2)), rec(5, {"t": "state", "to": b1, "s": "paused"})]),
        # The reproducers of the bugs F1-F6 the harness found (fixed in d0feea7): regression inputs.
        "regression-F1-unhashable-t": raw([rec(1, {"t": []}), rec(2, msg(53, b1))]),
        "regression-F2-device-past-uint32": raw([rec(1, msg(54, b1), device=2**32)]),
        "regression-F2-long-localpart": raw([rec(1, msg(55, b1), localpart=relay.LONG_LOCALPARTS[2])]),
        "regression-F3-own-copies": raw([rec(1, msg(56, b1, own={2: b"own copy"}))]),
        "regression-F4-large-body": raw([rec(1, gmsg(1, 57, members=[b1], b=b"b" * 70_000))]),
        "regression-F4-fields-replace-dlv": raw([rec(1, gfan("event", [b1], fields={"t": "ack", "seq": 7}, ts=ts, o=1, n=inc))]),
        "regression-F4-state-s": raw([rec(1, gfan("state", [b1], s={"not": ["a", "state"]}))]),
        "regression-F5-gfan-without-ts": raw([rec(1, {k: v for k, v in gmsg(1, 58).items() if k != "ts"})]),
        "regression-F5-check-without-id": raw([rec(1, gfan("check", [b1]))]),
        "regression-F6-members-none": raw([rec(1, iq(59, "group.new", g=here(3), members=None))]),
        "regression-F6-large-int-member": raw([rec(1, iq(60, "group.new", g=here(4), members=[b1, 2**40]))]),
    }

    def answers(local, entries, origin=node_a, envelope=most) -> Seed:
        """Mode 2 without a batch: node-b's ``LOCAL`` stanzas, then ``entries`` (shape, sel, kind,
        variant, bytes for kind 9) — shapes 4.. and kinds other than 7 and 8 (those read values)."""
        spec = [(0, modes, relay.ANSWERS), (0, most, node_a), (0, 6, len(local))]
        spec += [(0, len(relay.LOCAL) - 1, choice) for choice in local]
        spec += [(0, 3, 1), (0, most, origin), (0, most, envelope), (0, 8, len(entries))]
        body = b""
        for shape, sel, kind, variant, *data in entries:
            spec += [(0, 15, shape), (0, 15, sel), (0, 11, kind), (0, 7, variant)]
            if kind == 9:
                spec.append((0, 64, len(data[0])))
                body += data[0]
        return Seed.of(body, spec)

    right = [(15, sel, 1, 0) for sel in range(6)]
    seeds.update({
        "answers-right": answers([0, 4, 5, 6, 7, 8], right),
        "answers-own-copies-and-receipt": answers([1, 11, 2], [(15, 0, 1, 0), (15, 1, 1, 0), (15, 2, 1, 0)]),
        "answers-refusals": answers([0, 4, 6, 9], [(15, sel, 6, sel) for sel in range(4)] + [(15, 0, 1, 6)]),
        "answers-check-then-change": answers([9, 13], [(15, 0, 1, 0)]),
        "answers-outbox": answers([10, 10], [(15, 0, 1, 0), (15, 1, 1, 6), (15, 1, 1, 7)]),
        "answers-gather-users": answers([6], [(15, 0, 1, 3)]),
        "answers-blob-read": answers([16, 16], [(15, 0, 1, 5), (15, 1, 1, 6)]),
        "answers-late-and-unknown": answers([0], [(15, 0, 1, 0), (15, 12, 1, 0), (15, 13, 1, 5), (15, 14, 3, 0)]),
        "answers-typing": answers([3, 12], [(15, 0, 0, 0), (15, 1, 1, 0)]),
        "answers-wrong-origin": answers([0], [(15, 0, 1, 0)], origin=0),
        "answers-not-a-list": answers([0], [(15, 0, 1, 0)], envelope=0),
        "answers-not-a-map": answers([0], [(15, 0, 1, 0)], envelope=1),
        "answers-not-msgpack": answers([0], [(15, 0, 1, 0)], envelope=2),
        "answers-bad-entries": answers([0], [(4, 0, 1, 0), (5, 0, 11, 0)]),
        # Answers that name nothing, or something else, or are no answer at all: bad_answers, internal.
        "answers-naming-nothing": answers([0, 4], [(15, 0, 11, 4), (15, 1, 11, 4)]),
        "answers-another-name": answers([0, 2], [(15, 0, 11, 6), (15, 1, 1, 0)]),
        "answers-a-dlv": answers([5, 10], [(15, 0, 11, 7), (15, 1, 11, 7)]),
        # The reproducers of F7 (fixed in d0feea7): regression inputs.
        "regression-F7-garbage-to-gather": answers([6], [(15, 0, 9, 0, b"\xc1")]),
        "regression-F7-list-to-check": answers([9], [(15, 0, 9, 0, b"\x93\x01\x02\x03")]),
        "regression-F7-garbage-to-outbox": answers([10], [(15, 0, 9, 0, b"\xc1")]),
        "regression-F7-garbage-to-own-copies": answers([1], [(15, 0, 9, 0, b"\xa3abc")]),
        "regression-F7-two-stanzas-forwarded": answers([0], [(15, 0, 10, 0)]),
        "regression-F7-nil-to-msg": answers([0], [(15, 0, 0, 0)]),
    })
    # F8 (found by this harness on 04bfe1b): node-a refused a relayed typing state with an err naming
    # an id (True), which was passed on to the client as the answer to a stanza it never sent.
    found = Recorder(bytes.fromhex("0f00a6a6a6a6a6a6a62aa6a62fa6a6a6a6a6a6a6a601030b0f02"))
    relay.read_plan(found)
    seeds["regression-F8-typing-refusal-naming-an-id"] = Seed.of(b"".join(found.taken), found.ints)
    for index in range(12):  # structure-aware batches from node-a, then answers-mode inputs
        for mode in (relay.STRUCTURED, relay.ANSWERS):
            draw = RelayDraw(1000 * mode + index, forced=(mode, node_a))
            relay.read_plan(draw)
            seeds[f"drawn-{('batch', 'answers')[mode - 1]}-{index:02d}"] = Seed.of(b"".join(draw.taken), draw.ints)
    return seeds


HARNESSES["relay_serve"] = relay_serve_seeds


def main(names) -> None:
    provider = fuzzlib.provider
    for name in names:
        seeds = HARNESSES[name]()
        check = importlib.import_module(f"fuzz_{name}").check
        for label, seed in seeds.items():
            recorders = []
            fuzzlib.provider = lambda data: recorders.append(Recorder(data)) or recorders[-1]
            try:
                check(seed)  # a seed must be an input the property holds for...
            finally:
                fuzzlib.provider = provider
            # ...and the harness must read it as written: the same choices, the same bytes.
            [recorder] = recorders
            if recorder.ints != seed.spec or b"".join(recorder.taken) != seed.body:
                raise AssertionError(f"{name}/{label}: the harness read {recorder.ints}, {b''.join(recorder.taken)!r}")
        folder = FUZZ_DIR / "corpus" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index, (label, data) in enumerate(seeds.items()):
            (folder / f"{index:02d}-{label}").write_bytes(data)
        print(f"{name}: {len(seeds)} seeds in {folder.relative_to(FUZZ_DIR.parent)}")
        if name in DICTIONARIES:
            lines = [f"# libFuzzer dictionary of fuzz_{name}.py, written by make_seeds.py"]
            lines += [dictionary_line(token) for token in DICTIONARIES[name]()]
            (FUZZ_DIR / f"{name}.dict").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or list(HARNESSES))
