"""Tests of ``interlink.core.domain``, one module per source module (``core/domain/``)."""
