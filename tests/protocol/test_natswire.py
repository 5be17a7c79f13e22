"""The NATS client protocol reader and commands (core/protocol/natswire.py), against the protocol's
reference (docs.nats.io "Client Protocol"): every server operation, split at every byte, and each
way a server's stream can break it refused at the byte that breaks it."""

from __future__ import annotations

import json

import pytest

from interlink.core.errors import LocalProtocolError, NatsProtocolError
from interlink.core.protocol import natswire
from interlink.core.protocol.natswire import (
    ERR, HMSG, INFO, MAX_CONTROL_LINE, MSG, OK, PING_OP, PONG_OP, NatsReader, check_subject, connect_command,
    pub_command, sub_command, unsub_command,
)

STREAM = (b'INFO {"server_id":"N1","max_payload":1048576,"nonce":"abc"}\r\n'
          b"PING\r\n"
          b"MSG interlink.node-a.relay.node-b 1 12\r\nhello\r\nworld\r\n"
          b"MSG _INBOX.x 22 reply.to 0\r\n\r\n"
          b"pong\r\n"
          b"+OK\r\n"
          b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n"
          b"msg\tlower.case\t7\t3\r\nabc\r\n"
          b"HMSG _INBOX.q.2 9 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
          b"HMSG a.b 4 reply.to 22 25\r\nNATS/1.0\r\nX-Key: v\r\n\r\nabc\r\n")
OPERATIONS = [
    (INFO, {"server_id": "N1", "max_payload": 1048576, "nonce": "abc"}),
    (PING_OP,),
    (MSG, "interlink.node-a.relay.node-b", 1, None, b"hello\r\nworld"),
    (MSG, "_INBOX.x", 22, "reply.to", b""),
    (PONG_OP,),
    (OK,),
    (ERR, 'Permissions Violation for Publish to "x"'),
    (MSG, "lower.case", 7, None, b"abc"),
    (HMSG, "_INBOX.q.2", 9, None, b"", 503),  # "no responders" to a request
    (HMSG, "a.b", 4, "reply.to", b"abc", None),
]


def test_every_server_operation_is_read_in_order():
    assert NatsReader().feed(STREAM) == OPERATIONS


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_the_same_operations_however_the_stream_is_cut(step):
    reader = NatsReader()
    got = []
    for start in range(0, len(STREAM), step):
        got += reader.feed(STREAM[start:start + step])
    assert got == OPERATIONS


def test_a_payload_may_hold_anything_the_size_says():
    payload = bytes(range(256)) * 4 + b"\r\nMSG x 1 2\r\n"
    stream = b"MSG a.b 3 %d\r\n%s\r\nPONG\r\n" % (len(payload), payload)
    assert NatsReader().feed(memoryview(stream)) == [(MSG, "a.b", 3, None, payload), (PONG_OP,)]


def test_a_request_names_its_reply_subject():
    assert pub_command(b"interlink.node-b.hello", b"hi", b"_INBOX.x.0") == b"PUB interlink.node-b.hello _INBOX.x.0 2\r\nhi\r\n"


def test_what_this_side_publishes_reads_back_as_the_server_would_deliver_it():
    payload = b"\x00\xff relay batch \r\n"
    command = pub_command(b"interlink.node-b.relay.node-a", payload)
    assert command == b"PUB interlink.node-b.relay.node-a %d\r\n%s\r\n" % (len(payload), payload)
    delivered = b"MSG" + command[3:].replace(b" %d" % len(payload), b" 5 %d" % len(payload), 1)
    assert NatsReader().feed(delivered) == [(MSG, "interlink.node-b.relay.node-a", 5, None, payload)]


@pytest.mark.parametrize("stream, message", [
    (b"HMSG a 1 0 0\r\n\r\n", "headers take 0 of its 0 bytes"),
    (b"HMSG a 1 20 16\r\n", "headers take 20 of its 16 bytes"),
    (b"HMSG a 1 16\r\n", "3 arguments"),
    (b"HMSG a 1 x 16\r\n", "not a number"),
    (b"HMSG a 1 12 14\r\nNATS/2.0\r\n\r\nab\r\n", "not NATS/1.0 headers"),
    (b"HMSG a 1 12 14\r\nNATS/1.0\r\nX:\r\n\r\n", "not NATS/1.0 headers"),
    (b"WHAT\r\n", "unknown operation"),
    (b"\r\n", "empty control line"),
    (b"   \r\n", "empty control line"),
    (b"MSG a 1\r\n", "2 arguments"),
    (b"MSG a 1 b c 5\r\n", "5 arguments"),
    (b"MSG a x 5\r\n", "not a number"),
    (b"MSG a 1 -5\r\n", "not a number"),
    (b"MSG a 1 99999999999999999999\r\n", "not a number"),
    (b"MSG \xff\xfe 1 0\r\n\r\n", "not UTF-8"),
    (b"MSG a 1 3\r\nabcd\r\n", "does not end after its 3 bytes"),
    (b"INFO {not json}\r\n", "not JSON"),
    (b"INFO [1, 2]\r\n", "not a JSON object"),
    (b"INFO " + b"[" * 4000 + b"\r\n", "not JSON: RecursionError"),  # nested past Python's recursion limit
])
def test_a_broken_stream_is_refused(stream, message):
    with pytest.raises(NatsProtocolError, match=message):
        NatsReader().feed(stream)


def test_a_payload_over_the_limit_is_refused_before_it_arrives():
    reader = NatsReader(max_payload=1000)
    assert reader.feed(b"MSG a 1 1000\r\n" + b"x" * 1000 + b"\r\n") == [(MSG, "a", 1, None, b"x" * 1000)]
    with pytest.raises(NatsProtocolError, match="1001 bytes, over the server's max_payload of 1000"):
        reader.feed(b"MSG a 1 1001\r\n")  # the control line alone: nothing of the payload is waited for


def test_a_control_line_is_bounded_before_it_is_buffered():
    reader = NatsReader()
    line = b"INFO {" + b'"k":1,' * ((MAX_CONTROL_LINE - 10) // 6)
    assert reader.feed(line) == []  # not over the bound yet: waits for the rest
    with pytest.raises(NatsProtocolError, match=f"longer than {MAX_CONTROL_LINE} bytes"):
        reader.feed(b"x" * 200)
    exactly = b"INFO " + json.dumps({"k": "v" * (MAX_CONTROL_LINE - 14)}).encode()
    assert len(exactly) == MAX_CONTROL_LINE
    assert NatsReader().feed(exactly + b"\r\n")[0][0] == INFO
    with pytest.raises(NatsProtocolError, match="longer than"):
        NatsReader().feed(exactly + b" \r\n")


def test_commands_this_side_writes():
    assert sub_command(b"interlink.node-a.relay.*", 3) == b"SUB interlink.node-a.relay.* 3\r\n"
    assert unsub_command(3) == b"UNSUB 3\r\n"
    assert natswire.PING == b"PING\r\n" and natswire.PONG == b"PONG\r\n"
    command = connect_command({"verbose": False, "name": "interlink-node-a-relay", "user": "node-a", "pass": "p w"})
    assert command.startswith(b"CONNECT {") and command.endswith(b"}\r\n") and command.count(b"\r\n") == 1
    assert json.loads(command[8:]) == {"verbose": False, "name": "interlink-node-a-relay", "user": "node-a",
                                        "pass": "p w"}


@pytest.mark.parametrize("subject", [b"", b"a b", b"a\tb", b"a\r\nPUB x 1"])
def test_a_subject_that_would_break_a_command_is_a_local_error(subject):
    with pytest.raises(LocalProtocolError):
        check_subject(subject)
    with pytest.raises(LocalProtocolError):
        sub_command(subject, 1)
