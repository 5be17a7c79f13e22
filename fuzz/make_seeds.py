"""Write the seed corpora (and libFuzzer dictionaries) of the frames, handshake, server_hello,
config and proxy harnesses.

    .venv/bin/python fuzz/make_seeds.py            # rewrites fuzz/corpus/{frames,handshake,server_hello,config,proxy}/
                                                   # and fuzz/{handshake,server_hello,config,proxy}.dict
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


DICTIONARIES = {"handshake": handshake_tokens, "server_hello": server_hello_tokens, "config": config_tokens,
                "proxy": proxy_tokens}


# ------------------------------------------------------------------------------- main

HARNESSES = {
    "frames": frames_seeds,
    "handshake": handshake_seeds,
    "server_hello": server_hello_seeds,
    "config": config_seeds,
    "proxy": proxy_seeds,
}


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
