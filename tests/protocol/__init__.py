"""Tests of ``interlink.core.protocol``, one module per source module (``core/protocol/``)."""
