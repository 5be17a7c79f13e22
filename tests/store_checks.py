"""Checks on a real ``LmdbStore``'s tables that the tests of several suites share."""

from __future__ import annotations

import struct

from interlink.core.store import SHARED_MARK, LmdbStore

_REFS = struct.Struct(">I")


def shared_body_references(store: LmdbStore) -> tuple[dict[bytes, int], dict[bytes, int], set[bytes]]:
    """``(references, counts, bodies)``: how many ``mbox`` items refer to each shared body (by
    scanning every item), what ``body_refs`` says, and the keys in ``bodies``."""
    references: dict[bytes, int] = {}
    with store._env.begin() as txn:
        for _, value in txn.cursor(db=store._mbox):
            if value[8] == SHARED_MARK:
                references[value[9:17]] = references.get(value[9:17], 0) + 1
        counts = {key: _REFS.unpack(raw)[0] for key, raw in txn.cursor(db=store._body_refs)}
        bodies = {key for key, _ in txn.cursor(db=store._bodies)}
    return references, counts, bodies
