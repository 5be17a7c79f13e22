"""Tests of ``interlink.core.edge.lmdbstore``, one module per table family (``core/edge/lmdbstore/``)."""
