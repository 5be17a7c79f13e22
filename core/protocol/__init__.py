"""The protocol layer: the wire contract, sans-I/O.

Rule: modules here import only the standard library, the crypto and msgpack libraries, each
other, ``interlink.core.errors`` and (through ``interlink.core._select``) the compiled twins —
never asyncio, lmdb, aiohttp, sockets or files, and nothing of ``interlink.core.domain`` or
``interlink.core.edge``. Time comes in as an argument. (``tests/test_layers.py`` checks it.)
"""
