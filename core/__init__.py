"""The Interlink engine: protocol core (sans-I/O), domain logic and the I/O edge.

``IMPLEMENTATION`` is ``"cython"`` when the compiled hot paths are active and ``"python"`` when
the pure twins run; it is computed on first access, so importing a light module such as
``interlink.core.errors`` does not load the extensions.
"""


def __getattr__(name: str):
    if name == "IMPLEMENTATION":
        from interlink.core import cipher, fanout, framing, mailbox, stanza  # noqa: F401  (importing them decides)
        from interlink.core._select import implementation

        return implementation()
    raise AttributeError(f"module 'interlink.core' has no attribute {name!r}")
