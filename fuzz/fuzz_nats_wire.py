"""Fuzz harness ``nats_wire``: the NATS client protocol reader (``core/protocol/natswire.py``), what
a cluster node reads from its NATS server on the data path.

One input chooses (``atheris.FuzzedDataProvider``; ints from the end of the input, see
``fuzzlib.encode_ints``): the reader's ``max_payload`` (from ``MAX_PAYLOADS``), how the stream is
cut into reads (the first read's size, then sizes cycling through a few lengths) and the
stream itself. Per input:

* A reference reader written here from the protocol's description alone (the whole stream at
  once, no state) gives the operations the stream holds and whether it breaks the protocol.
* ``NatsReader`` fed the whole stream at once returns exactly those operations, or raises
  ``NatsProtocolError`` (and nothing else) exactly when the reference says it breaks.
* Fed in pieces, it returns the same operations in order — before an error, a prefix of them —
  and raises at the piece the reference's error lies in, never earlier and never without one.
* It never holds more than a control line's bound or one payload's (``max_payload`` + CRLF):
  what a server sends cannot make a node buffer more.
* Each operation has its types (``MSG``: str subject, int sid, str or None reply, bytes payload;
  ``HMSG`` the same and its status, an int or None).
"""

from __future__ import annotations

import contextlib
import json
import sys

if __name__ == "__main__":
    import atheris

    instrumenting = atheris.instrument_imports(include=["interlink"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import fuzzlib
    from interlink.core.errors import NatsProtocolError
    from interlink.core.protocol.natswire import (
        ERR, HMSG, INFO, MAX_CONTROL_LINE, MSG, OK, PING_OP, PONG_OP, NatsReader,
    )

MAX_PAYLOADS = (16, 100, 4096, 1024 * 1024)
CUTS = (1, 2, 3, 5, 8, 13, 64, 1000)
MAX_FIRST_READ = 4096  # the first read's size is drawn up to this


def reference(stream: bytes, max_payload: int) -> tuple[list, int | None]:
    """``(operations, broken_at)``: the operations the stream holds before it ends or breaks, and
    the number of bytes from which it is known to break (None: it does not, so far)."""
    operations: list = []
    at = 0
    while True:
        line_end = stream.find(b"\r\n", at)
        if line_end < 0 or line_end - at > MAX_CONTROL_LINE:
            if len(stream) - at > MAX_CONTROL_LINE + 1:
                return operations, at + MAX_CONTROL_LINE + 2  # a line this long cannot end in time
            return operations, None
        line = stream[at:line_end]
        at = line_end + 2
        words = line.split()
        if not words:
            return operations, at
        name = words[0].upper()
        rest = line.split(None, 1)[1] if len(words) > 1 else b""
        if name in (b"MSG", b"HMSG"):
            headers = name == b"HMSG"  # HMSG: one argument more, the header size before the size
            arguments = words[1:]
            fewest = 4 if headers else 3
            if len(arguments) not in (fewest, fewest + 1):
                return operations, at
            numbers = (arguments[1], arguments[-2], arguments[-1]) if headers else (arguments[1], arguments[-1])
            if not all(number.isdigit() and len(number) <= 19 for number in numbers):
                return operations, at
            sid, size = int(numbers[0]), int(numbers[-1])
            header_size = int(numbers[1]) if headers else 0
            names = _names(arguments, fewest + 1)
            if size > max_payload or (headers and not 12 <= header_size <= size) or names is None:
                return operations, at
            subject, reply = names
            if len(stream) < at + size + 2:
                return operations, None
            if stream[at + size:at + size + 2] != b"\r\n":
                return operations, at + size + 2
            payload = stream[at + header_size:at + size]
            if not headers:
                operations.append((MSG, subject, sid, reply, payload))
            else:
                block = stream[at:at + header_size]
                if not (block.startswith(b"NATS/1.0") and block.endswith(b"\r\n\r\n")):
                    return operations, at + size + 2
                status_line = block[8:block.index(b"\r\n")].split()
                status = (int(status_line[0]) if status_line and len(status_line[0]) == 3 and status_line[0].isdigit()
                          else None)
                operations.append((HMSG, subject, sid, reply, payload, status))
            at += size + 2
        elif name == b"PING":
            operations.append((PING_OP,))
        elif name == b"PONG":
            operations.append((PONG_OP,))
        elif name == b"+OK":
            operations.append((OK,))
        elif name == b"-ERR":
            operations.append((ERR, rest.strip().strip(b"'").decode("utf-8", "replace")))
        elif name == b"INFO":
            try:
                fields = json.loads(rest)
            except (ValueError, RecursionError):
                return operations, at
            if type(fields) is not dict:
                return operations, at
            operations.append((INFO, fields))
        else:
            return operations, at


def _names(arguments: list[bytes], with_reply: int) -> tuple[str, str | None] | None:
    """A (H)MSG's subject and reply (when there are ``with_reply`` arguments), None if not UTF-8."""
    try:
        return arguments[0].decode("utf-8"), arguments[2].decode("utf-8") if len(arguments) == with_reply else None
    except UnicodeDecodeError:
        return None


def _check_types(operation: tuple, where: str) -> None:
    kind = operation[0]
    if kind in (MSG, HMSG):
        subject, sid, reply, payload = operation[1:5]
        if not (type(subject) is str and type(sid) is int and (reply is None or type(reply) is str)
                and type(payload) is bytes and (kind == MSG and len(operation) == 5
                                                or len(operation) == 6 and (operation[5] is None
                                                                            or type(operation[5]) is int
                                                                            and 0 <= operation[5] <= 999))):
            raise AssertionError(f"{where}: a {kind} of types {[type(part).__name__ for part in operation]}")
    elif kind == INFO and type(operation[1]) is not dict or kind == ERR and type(operation[1]) is not str:
        raise AssertionError(f"{where}: {operation!r}"[:300])


def _pieces(stream: bytes, first: int, cut: int) -> list[tuple[int, bytes]]:
    """``(end, piece)`` reads of ``stream``: the first ``first`` bytes, then lengths cycling from ``cut``."""
    pieces, at, turn = [], 0, cut
    size = first
    while at < len(stream):
        piece = stream[at:at + max(size, 1)]
        at += len(piece)
        pieces.append((at, piece))
        size = CUTS[turn % len(CUTS)]
        turn += 1
    return pieces


def decode(data: bytes) -> tuple[int, int, int, bytes]:
    """The input's choices: max_payload, the first read's size, the cycle's start, the stream."""
    fdp = fuzzlib.provider(data)
    max_payload = MAX_PAYLOADS[fdp.ConsumeIntInRange(0, len(MAX_PAYLOADS) - 1)]
    first = fdp.ConsumeIntInRange(0, MAX_FIRST_READ)
    cut = fdp.ConsumeIntInRange(0, len(CUTS) - 1)
    return max_payload, first, cut, fdp.ConsumeBytes(fdp.remaining_bytes())


def check(data: bytes) -> None:
    max_payload, first, cut, stream = decode(data)
    where = f"input {fuzzlib.short(data)}"
    expected, broken_at = reference(stream, max_payload)

    whole = fuzzlib.outcome(NatsReader(max_payload).feed, stream)
    if whole[0] == "raised":
        fuzzlib.check_error(whole[1].error, (NatsProtocolError,), f"{where}, whole")
        if broken_at is None:
            raise AssertionError(f"{where}: whole stream refused ({whole[1].message}), the reference reads "
                                 f"{len(expected)} operations and no fault"[:600])
    elif broken_at is not None:
        raise AssertionError(f"{where}: whole stream read, the reference breaks at byte {broken_at}")
    elif whole[1] != expected:
        raise AssertionError(f"{where}: whole stream read as {whole[1]!r}, the reference {expected!r}"[:800])

    reader = NatsReader(max_payload)
    got: list = []
    bound = max(MAX_CONTROL_LINE + 1, max_payload + 1)
    for end, piece in _pieces(stream, first, cut):
        result = fuzzlib.outcome(reader.feed, piece)
        if result[0] == "raised":
            fuzzlib.check_error(result[1].error, (NatsProtocolError,), f"{where}, piece to {end}")
            if broken_at is None or end < broken_at:
                raise AssertionError(f"{where}: refused at the piece ending at byte {end} ({result[1].message}); "
                                     f"the reference breaks at {broken_at}"[:600])
            if got != expected[:len(got)]:
                raise AssertionError(f"{where}: before the fault, read {got!r}, not a prefix of {expected!r}"[:800])
            return
        for operation in result[1]:
            _check_types(operation, where)
        got += result[1]
        if broken_at is not None and end >= broken_at:
            raise AssertionError(f"{where}: not refused by byte {end}; the reference breaks at byte {broken_at}")
        if reader.buffered > bound:
            raise AssertionError(f"{where}: holds {reader.buffered} bytes after byte {end}, over {bound}")
    if broken_at is not None:
        raise AssertionError(f"{where}: read in pieces without a fault; the reference breaks at byte {broken_at}")
    if got != expected:
        raise AssertionError(f"{where}: read in pieces as {got!r}, the reference {expected!r}"[:800])


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
