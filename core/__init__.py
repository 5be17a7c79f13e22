"""The Interlink engine, one folder per layer: ``protocol`` (the wire contract, sans-I/O),
``domain`` (the gateway's rules, sans-I/O, over ports) and ``edge`` (all I/O). Dependencies
point one way: edge -> domain -> protocol; ``errors`` and ``_select`` (the compiled twins)
serve all three. Each layer's ``__init__`` states its rule; ``tests/test_layers.py`` checks it.

``IMPLEMENTATION`` is ``"cython"`` when the compiled hot paths are active and ``"python"`` when
the pure twins run; it is computed on first access, so importing a light module such as
``interlink.core.errors`` does not load the extensions.
"""


def __getattr__(name: str):
    if name == "IMPLEMENTATION":
        from interlink.core._select import implementation

        return implementation()
    raise AttributeError(f"module 'interlink.core' has no attribute {name!r}")
