"""PROXY protocol v2 headers (HAProxy's proxy-protocol.txt, section 2.2, the binary format).

``parse_proxy_header`` and ``ProxyHeader`` come from the compiled module when available, else
from the pure twin ``interlink.core.protocol._proxy_pure``, whose docstring is the contract: what
is accepted, what each attribute holds, when ``None`` is returned and when ``ProxyHeaderError``
is raised. ``encode_proxy_header`` writes a header, to act as a proxy (tests, benchmarks, the
load tool); it is not on a hot path and has no twin.
"""

from __future__ import annotations

import ipaddress

from interlink.core._select import select

_impl = select("_proxy")

ProxyHeader = _impl.ProxyHeader
parse_proxy_header = _impl.parse_proxy_header
SIGNATURE = _impl.SIGNATURE
MAX_HEADER_BYTES = _impl.MAX_HEADER_BYTES

__all__ = ["ProxyHeader", "parse_proxy_header", "encode_proxy_header", "SIGNATURE", "MAX_HEADER_BYTES"]

_FIXED_BYTES = 16


def _address(endpoint, name: str):
    """``(host, port)`` to ``(ipaddress object, port)``; ValueError/TypeError for anything else."""
    try:
        host, port = endpoint
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (host, port) pair, got {endpoint!r}") from None
    address = ipaddress.ip_address(host)  # ValueError for a name: the header carries addresses only
    if getattr(address, "scope_id", None):
        raise ValueError(f"{name} {host!r} has a scope id, which a PROXY header cannot carry")
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{name} port must be an int in 0..65535, got {port!r}")
    return address, port


def encode_proxy_header(command: str = "proxy", source=None, destination=None, tlvs=()) -> bytes:
    """A PROXY protocol v2 header.

    ``command="proxy"``: ``source`` and ``destination`` are ``(host, port)`` with numeric hosts
    of one family: TCP over IPv4 (family/transport 0x11) or over IPv6 (0x21).
    ``command="local"``: no addresses (``None``), family UNSPEC (0x00), as a proxy's health
    check sends it. ``tlvs``: ``(type, value)`` pairs written in order after the address block.
    Raises ValueError (TypeError for wrong types) for anything the wire cannot carry, including
    a header over ``MAX_HEADER_BYTES``."""
    if command == "proxy":
        if source is None or destination is None:
            raise ValueError("a PROXY command needs both source and destination")
        (src, src_port), (dst, dst_port) = _address(source, "source"), _address(destination, "destination")
        if src.version != dst.version:
            raise ValueError(f"source {source[0]!r} and destination {destination[0]!r} are not of one address family")
        family = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
        version_command = 0x21
    elif command == "local":
        if source is not None or destination is not None:
            raise ValueError("a LOCAL command carries no addresses: source and destination must be None")
        family, block, version_command = 0x00, b"", 0x20
    else:
        raise ValueError(f"command must be 'proxy' or 'local', got {command!r}")
    parts = [block]
    for kind, value in tlvs:
        if type(kind) is not int or not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type must be an int in 0..255, got {kind!r}")
        with memoryview(value) as view:  # TypeError for anything that is not bytes-like
            value = view.tobytes()
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:02x} value of {len(value)} bytes is over 65535")
        parts += [bytes([kind]), len(value).to_bytes(2, "big"), value]
    body = b"".join(parts)
    if _FIXED_BYTES + len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"PROXY header of {_FIXED_BYTES + len(body)} bytes is over the maximum of {MAX_HEADER_BYTES}")
    return SIGNATURE + bytes([version_command, family]) + len(body).to_bytes(2, "big") + body
