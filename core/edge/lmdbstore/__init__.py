"""The LMDB implementation of the storage port (``interlink.core.domain.ports.Store``).

One environment, one family of named databases per module (``mailboxes``, ``social``, ``keys``,
``groups``), opened by ``env``; ``store.LmdbStore`` is the facade the gateway holds and whose
``commit`` writes one batch across the families in one transaction.
"""

from interlink.core.edge.lmdbstore.store import LmdbStore

__all__ = ["LmdbStore"]
