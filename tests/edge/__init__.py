"""Tests of ``interlink.core.edge``, one module per source module (``core/edge/``)."""
