"""Tests of the public API ``interlink`` (``bindings/``): admin endpoint, command line, configuration,
embedding, reload, ``interlink serve``, the demo, and what the gateway logs."""
