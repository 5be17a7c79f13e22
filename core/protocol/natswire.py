"""The NATS client protocol, the part a cluster node's data path speaks (issue 18): the commands
this side writes and a sans-I/O reader of what a server sends
(https://docs.nats.io/reference/reference-protocols/nats-protocol). ``core/edge/natsconn.py``
runs it on a socket; ``core/edge/clusterlink.py`` relays stanzas over it.

A server sends ``INFO {json}``, ``MSG <subject> <sid> [reply-to] <#bytes>`` followed by the
payload, ``HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`` followed by headers
and payload (this side declares ``headers`` only to hear NATS's "no responders" status, ``503``,
for a request nobody is subscribed to), ``PING``, ``PONG``, ``+OK`` and ``-ERR '<text>'``, each
line ended by CRLF; operation names are case-insensitive. A control line longer than
``MAX_CONTROL_LINE`` (nats-server's own default) or a payload over the reader's ``max_payload``
is refused before it is buffered, so a misbehaving server (or something else listening on its
port) cannot make this side hold more than that.
"""

from __future__ import annotations

import json

from interlink.core.errors import LocalProtocolError, NatsProtocolError

MAX_CONTROL_LINE = 4096  # nats-server's max_control_line default
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's max_payload default, until the server's INFO says
CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
_FORBIDDEN_IN_SUBJECT = (b" ", b"\t", b"\r", b"\n")

# What ``NatsReader.feed`` returns, one tuple per server operation:
MSG = "msg"  # (MSG, subject: str, sid: int, reply: str | None, payload: bytes)
HMSG = "hmsg"  # (HMSG, subject, sid, reply, payload, status: int | None — the headers' status line)
INFO = "info"  # (INFO, the server's fields: dict)
PING_OP = "ping"  # (PING_OP,): answer PONG
PONG_OP = "pong"  # (PONG_OP,): the server has read everything this side wrote before its PING
OK = "ok"  # (OK,): only in verbose mode, which this side does not ask for
ERR = "err"  # (ERR, the server's text without its quotes)


def check_subject(subject: bytes) -> bytes:
    """``subject`` if this side may write it in a command (not empty, no white space), else
    ``LocalProtocolError``: subjects are built from checked node ids, so one that is not is a bug."""
    if not subject or any(char in subject for char in _FORBIDDEN_IN_SUBJECT):
        raise LocalProtocolError(f"not a NATS subject: {subject!r}")
    return subject


def connect_command(fields: dict) -> bytes:
    """``CONNECT {json}`` with ``fields`` (verbose, pedantic, name, credentials...)."""
    return b"CONNECT " + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + CRLF


def sub_command(subject: bytes, sid: int) -> bytes:
    return b"SUB %s %d\r\n" % (check_subject(subject), sid)


def unsub_command(sid: int) -> bytes:
    return b"UNSUB %d\r\n" % sid


def pub_command(subject: bytes, payload: bytes, reply: bytes | None = None) -> bytes:
    """``PUB`` with its payload, ready to write (the subjects are checked by the caller once:
    ``check_subject``)."""
    if reply is not None:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)
    return b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)


class NatsReader:
    """Splits a server's byte stream into operations. ``feed`` takes what arrived and returns the
    operations it completed, in order; it keeps an unfinished one for the next call. It raises
    ``NatsProtocolError`` at the first byte that breaks the protocol (the connection is then of no
    further use: drop it)."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._message: tuple | None = None  # (subject, sid, reply, size, header size or None) awaiting its payload

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished operation held for the next ``feed``."""
        return len(self._buffer)

    def feed(self, data) -> list[tuple]:
        buffer = self._buffer
        buffer += data
        operations: list[tuple] = []
        start, end = 0, len(buffer)
        try:
            while start < end:
                if self._message is not None:
                    subject, sid, reply, size, header_size = self._message
                    if end - start < size + 2:
                        break
                    if buffer[start + size:start + size + 2] != CRLF:
                        raise NatsProtocolError(f"the payload of a MSG on {subject} does not end after its "
                                                f"{size} bytes")
                    if header_size is None:
                        operations.append((MSG, subject, sid, reply, bytes(buffer[start:start + size])))
                    else:
                        status = _status(bytes(buffer[start:start + header_size]), subject)
                        operations.append((HMSG, subject, sid, reply, bytes(buffer[start + header_size:start + size]),
                                           status))
                    start += size + 2
                    self._message = None
                    continue
                line_end = buffer.find(CRLF, start, start + MAX_CONTROL_LINE + 2)
                if line_end < 0:
                    if end - start > MAX_CONTROL_LINE + 1:
                        raise NatsProtocolError(f"a control line longer than {MAX_CONTROL_LINE} bytes")
                    break
                line = bytes(buffer[start:line_end])
                start = line_end + 2
                operation = self._operation(line)
                if operation is not None:
                    operations.append(operation)
        finally:
            del buffer[:start]
        return operations

    def _operation(self, line: bytes) -> tuple | None:
        """One control line's operation; None for a MSG (its payload comes next)."""
        parts = line.split(None, 1)  # fields are separated by spaces or tabs
        if not parts:
            raise NatsProtocolError("an empty control line")
        name, rest = parts[0].upper(), (parts[1] if len(parts) == 2 else b"")
        if name == b"MSG" or name == b"HMSG":
            self._message = self._arguments(rest, name == b"HMSG")
            return None
        if name == b"PING":
            return (PING_OP,)
        if name == b"PONG":
            return (PONG_OP,)
        if name == b"+OK":
            return (OK,)
        if name == b"-ERR":
            return (ERR, rest.strip().strip(b"'").decode("utf-8", "replace"))
        if name == b"INFO":
            try:
                fields = json.loads(rest)
            except (ValueError, RecursionError) as exc:  # nested past the recursion limit: not an INFO either
                raise NatsProtocolError(f"an INFO that is not JSON: {type(exc).__name__}") from None
            if type(fields) is not dict:
                raise NatsProtocolError("an INFO that is not a JSON object")
            return (INFO, fields)
        raise NatsProtocolError(f"an unknown operation {_shown(line)}")

    def _arguments(self, rest: bytes, headers: bool) -> tuple:
        """A MSG's (or with ``headers`` an HMSG's) arguments: (subject, sid, reply, size, header size)."""
        name, fewest = ("an HMSG", 4) if headers else ("a MSG", 3)
        arguments = rest.split()
        if len(arguments) not in (fewest, fewest + 1):
            raise NatsProtocolError(f"{name} with {len(arguments)} arguments ({fewest} or {fewest + 1} expected): "
                                    f"{_shown(rest)}")
        numbers = (arguments[1], arguments[-2], arguments[-1]) if headers else (arguments[1], arguments[-1])
        if not all(number.isdigit() and len(number) <= 19 for number in numbers):
            raise NatsProtocolError(f"{name} whose sid or size is not a number: {_shown(rest)}")
        sid, size = int(numbers[0]), int(numbers[-1])
        header_size = int(numbers[1]) if headers else None
        if size > self.max_payload:
            raise NatsProtocolError(f"{name} of {size} bytes, over the server's max_payload of {self.max_payload}")
        if headers and not 12 <= header_size <= size:  # "NATS/1.0\r\n\r\n" at least, within the message
            raise NatsProtocolError(f"an HMSG whose headers take {header_size} of its {size} bytes")
        try:
            subject = arguments[0].decode("utf-8")
            reply = arguments[2].decode("utf-8") if len(arguments) == fewest + 1 else None
        except UnicodeDecodeError:
            raise NatsProtocolError(f"{name} whose subject is not UTF-8: {_shown(rest)}") from None
        return subject, sid, reply, size, header_size


def _status(headers: bytes, subject: str) -> int | None:
    """The status of an HMSG's headers (``NATS/1.0 503`` → 503), None without one."""
    if not headers.startswith(b"NATS/1.0") or not headers.endswith(b"\r\n\r\n"):
        raise NatsProtocolError(f"the headers of an HMSG on {subject} are not NATS/1.0 headers")
    words = headers[8:headers.index(b"\r\n")].split()
    if words and len(words[0]) == 3 and words[0].isdigit():
        return int(words[0])
    return None


def _shown(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")
