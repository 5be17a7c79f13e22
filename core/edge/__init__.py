"""The edge layer: everything that does I/O — the uvloop server and its adapters, the commit
driver, the LMDB store, the JWKS fetcher, key files on disk, metrics.

Rule: the only layer of ``interlink.core`` that touches asyncio, lmdb, HTTP or files; it may
import the domain and protocol layers, never the other way round. (``tests/test_layers.py``
checks it.)
"""
