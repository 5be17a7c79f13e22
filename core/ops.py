"""``iq`` operations (PROTOCOL §5): each ``op`` maps to a handler that answers ``res`` or raises.

A refusal raises ``RouteError`` (code and fields) or ``StanzaError`` (``bad_stanza``); the
server turns either into an ``err`` carrying the iq's ``id``, and the session continues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interlink.core.errors import StanzaError

if TYPE_CHECKING:
    from interlink.core.server import GatewayProtocol


class Operations:
    """The table of ``iq`` operations this gateway serves."""

    def __init__(self) -> None:
        self.handlers: dict = {}

    def handle_iq(self, proto: GatewayProtocol, stanza: dict) -> None:
        iq_id = stanza.get("id")
        if type(iq_id) is not int:
            raise StanzaError("iq needs an int 'id'")
        op = stanza.get("op")
        handler = self.handlers.get(op) if type(op) is str else None
        if handler is None:
            raise StanzaError(f"unknown operation {str(op)[:32]!r}")
        result = handler(proto, stanza)
        answer = {"t": "res", "id": iq_id}
        if result:
            answer.update(result)
        proto.conn.send_stanza(answer)
