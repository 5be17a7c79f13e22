"""The contract over WebSocket (docs/protocol.md §1): one binary WebSocket message per Noise
message, the preamble first.

The state machines of ``connection.py`` speak the TCP form: a byte stream of the 4-byte preamble
and 2-byte-length-prefixed frames. Over WebSocket the message boundaries replace the length
prefix, so every rule of the contract holds unchanged. These two functions convert between the
forms; the WebSocket framing itself is the ``websockets`` library's (sans-I/O).
"""

from __future__ import annotations

from interlink.core.errors import LocalProtocolError
from interlink.core.protocol.noise import PREAMBLE_BYTES
from interlink.core.protocol.wire import WIRE_MAX_FRAME_BYTES


def stream_to_messages(data, *, preamble: bool = False) -> list:
    """The messages of a stream this side's state machine produced: complete frames (its output
    is never cut inside one), after the preamble when ``preamble`` (a client's first output)."""
    messages = []
    position = 0
    end = len(data)
    if preamble:
        messages.append(data[:PREAMBLE_BYTES])
        position = PREAMBLE_BYTES
    while position < end:
        if end - position < 2:
            raise LocalProtocolError("a frame was cut inside its length prefix")
        stop = position + 2 + ((data[position] << 8) | data[position + 1])
        if stop > end:
            raise LocalProtocolError("a frame was cut before its end")
        messages.append(data[position + 2 : stop])
        position = stop
    return messages


def message_to_frame(message) -> bytes:
    """A received message as the frame the state machine expects (an empty message becomes the
    empty frame the contract refuses, so it is refused the same way). The WebSocket layer
    bounds messages to the wire maximum before they get here."""
    size = len(message)
    if size > WIRE_MAX_FRAME_BYTES:
        raise LocalProtocolError(f"message of {size} bytes is larger than a frame can be")
    return size.to_bytes(2, "big") + message
