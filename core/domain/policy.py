"""Who may reach whom (docs/protocol.md §7, "Consent" and "Blocks"), over the storage port.

A user accepts messages, receipts, typing, key fetches, device lists and group invitations from
users of its own provider, and from other providers only as its consent says; without a
``consent.set`` of its own, its provider's ``default_accept`` (operator configuration) applies.
A sender the recipient blocked is answered like any other (``ack``) and nothing is delivered.

``allows`` and ``blocks`` run for every message, so the policy keeps a small write-through cache
of each recent recipient's consent and blocks: one LMDB read transaction fills a user's entry
(consent and the set of blocked users together), after that both checks are dict and set
look-ups. Every write of consent or blocks goes through this object, which drops the user's
entry after the store committed, so the cache never serves a stale answer. (This assumes one
gateway process writes the environment, which the gateway's design already does.)

Bounds: at most ``cache_users`` entries (oldest inserted evicted first; users with no consent and
no blocks share one entry object), and a user's blocked set is cached only up to
``cached_blocks`` entries; beyond that ``blocks`` asks the store (one point read).

A group message asks the other way round — which of a thousand members blocked the sender —
so ``blockers_of`` reads the store's reverse index (``blocked_by``) once per sender and caches the
set (up to ``cached_blockers`` users; more than that and the caller asks ``blocks`` per member).
A group message is then one set intersection, however many members, and large groups do not
push everyone else out of the per-user cache.
"""

from __future__ import annotations

from interlink.core.domain.auth import Provider
from interlink.core.domain.ports import SocialStore

CACHE_USERS = 16_384
CACHED_BLOCKS = 64
CACHED_BLOCKERS = 1_024  # users who blocked one sender, kept as a set; more: ask per member


class _Reach:
    """What the policy knows about one user: its stored consent and whom it blocks."""

    __slots__ = ("accept", "discoverable", "blocked")

    def __init__(self, accept: tuple[str, ...] | None, discoverable: bool, blocked: frozenset | None) -> None:
        self.accept = accept  #: stored accept list, or None: the provider's default applies
        self.discoverable = discoverable
        self.blocked = blocked  #: blocked addresses, or None: too many to cache, ask the store


_NOTHING_STORED = _Reach(None, False, frozenset())


class Policy:
    """Consent and block decisions, and the writes that change them."""

    def __init__(self, store: SocialStore, *, cache_users: int = CACHE_USERS, cached_blocks: int = CACHED_BLOCKS,
                 cached_blockers: int = CACHED_BLOCKERS) -> None:
        self.store = store
        self.cache_users = cache_users
        self.cached_blocks = cached_blocks
        self.cached_blockers = cached_blockers
        self._cache: dict[str, _Reach] = {}
        self._blockers: dict[str, frozenset | None] = {}  # sender -> who blocked it (None: too many)

    # -- decisions (hot path)

    def _reach(self, user: str) -> _Reach:
        reach = self._cache.get(user)
        if reach is None:
            consent, blocked = self.store.reach(user, self.cached_blocks)
            if consent is None and blocked is not None and not blocked:
                reach = _NOTHING_STORED
            elif consent is None:
                reach = _Reach(None, False, blocked)
            else:
                reach = _Reach(consent[0], consent[1], blocked)
            cache = self._cache
            if len(cache) >= self.cache_users:
                del cache[next(iter(cache))]
            cache[user] = reach
        return reach

    def allows(self, recipient: str, recipient_provider: Provider, sender_provider: str) -> bool:
        """May a user of ``sender_provider`` reach ``recipient`` (consent)?"""
        if sender_provider == recipient_provider.id:
            return True
        accept = self._reach(recipient).accept
        if accept is None:
            accept = recipient_provider.default_accept
        return "*" in accept or sender_provider in accept

    def blocks(self, recipient: str, sender: str) -> bool:
        """Did ``recipient`` block ``sender``? (Nothing is delivered, the sender is not told.)"""
        blocked = self._reach(recipient).blocked
        if blocked is None:
            return self.store.is_blocked(recipient, sender)
        return sender in blocked

    def blockers_of(self, sender: str) -> frozenset | None:
        """Everyone who blocked ``sender``, or None when more than ``cached_blockers`` did (then
        ask ``blocks`` per recipient)."""
        cache = self._blockers
        if sender in cache:
            return cache[sender]
        found = self.store.blockers(sender, self.cached_blockers)
        if len(cache) >= self.cache_users:
            del cache[next(iter(cache))]
        cache[sender] = found
        return found

    def blocked_among(self, members, member_set: frozenset, sender: str) -> set | frozenset:
        """The members (``member_set`` is ``members`` as a set) who blocked ``sender``; never
        ``sender`` itself."""
        blockers = self.blockers_of(sender)
        if blockers is None:
            blocks = self.blocks
            return {member for member in members if member != sender and blocks(member, sender)}
        if not blockers:
            return blockers
        return (blockers & member_set) - {sender}

    def consent(self, user: str, provider: Provider) -> tuple[tuple[str, ...], bool]:
        """The user's effective ``(accept, discoverable)``: what it set, else its provider's
        default and not discoverable. Its own provider is accepted in any case."""
        reach = self._reach(user)
        if reach.accept is None:
            return provider.default_accept, False
        return reach.accept, reach.discoverable

    # -- changes (write through: the store commits, then the cached entry is dropped)

    def set_consent(self, user: str, accept: tuple[str, ...], discoverable: bool) -> None:
        try:
            self.store.set_consent(user, accept, discoverable)
        finally:
            self._cache.pop(user, None)

    def block(self, user: str, other: str, max_blocks: int) -> bool:
        """``user`` blocks ``other``; True if it was not blocked yet."""
        try:
            return self.store.add_block(user, other, max_blocks)
        finally:
            self._cache.pop(user, None)
            self._blockers.pop(other, None)

    def unblock(self, user: str, other: str) -> bool:
        """``user`` unblocks ``other``; True if it was blocked."""
        try:
            return self.store.del_block(user, other)
        finally:
            self._cache.pop(user, None)
            self._blockers.pop(other, None)
