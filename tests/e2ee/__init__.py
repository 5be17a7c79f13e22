"""Tests of ``interlink.e2ee``, one module per source module (``bindings/e2ee/``)."""
