"""Frame codec selector: ``FrameDecoder``, ``encode_frame`` and ``encode_frames`` from the
compiled module when available, else from the pure twin ``interlink.core.protocol._framing_pure``."""

from interlink.core._select import select

_impl = select("_framing")

FrameDecoder = _impl.FrameDecoder
encode_frame = _impl.encode_frame
encode_frames = _impl.encode_frames
from interlink.core.protocol.wire import WIRE_MAX_FRAME_BYTES as MAX_FRAME_BYTES

__all__ = ["FrameDecoder", "encode_frame", "encode_frames", "MAX_FRAME_BYTES"]
