"""Numbers fixed by the wire contract (docs/protocol.md), in one place."""

WIRE_MAX_FRAME_BYTES = 65535  # the 2-byte length prefix
TAG_BYTES = 16  # AEAD tag of every Noise transport message
MAX_PLAINTEXT_BYTES = WIRE_MAX_FRAME_BYTES - TAG_BYTES  # largest transport plaintext
MAX_DEVICE_ID = 2**31 - 1  # devices are 1..2^31-1
MAX_TOKEN_BYTES = 8192  # tokens above this are refused before parsing
