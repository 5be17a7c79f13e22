"""The domain layer: the gateway's rules (routing, groups, operations, consent, auth decisions),
sans-I/O, over ports.

Rule: modules here import only the protocol layer, each other, ``interlink.core.errors`` and
``interlink.core._select`` — never asyncio, lmdb, aiohttp, sockets or files, and nothing of
``interlink.core.edge``. Storage is reached through ``ports``, sessions through
``router.Session``, time comes in as ``now``. (``tests/test_layers.py`` checks it.)
"""
