"""``iq`` operations (docs/protocol.md §7): each ``op`` maps to a handler that answers ``res`` or raises.

A refusal raises ``RouteError`` (code and fields) or ``StanzaError`` (``bad_stanza``); the
dispatcher turns either into an ``err`` carrying the iq's ``id``, and the session continues.
Served here: ``keys.put``, ``keys.get``, ``keys.count``, ``devices.get``, ``consent.set``,
``consent.get``, ``block.add``, ``block.del``, ``block.list``, ``report``, ``dir.lookup``, plus
the ``group.*`` operations of ``groups`` (handed in at construction), whose handlers may return
``DEFERRED``: their ``res`` is sent by the router after the group commit. What each operation
decides where the contract is silent (consent before existence, limits, paging) is written in
docs/protocol.md §7.
"""

from __future__ import annotations

import math
import re
from interlink.core.domain.auth import ProviderRegistry
from interlink.core.errors import StanzaError, StoreFullError, StoreLimitError
from interlink.core.domain.fields import address_provider, excerpt, kind_of
from interlink.core.domain.policy import Policy
from interlink.core.domain.ratelimit import TokenBuckets
from interlink.core.domain.router import RouteError, Router, Session
from interlink.core.protocol.stanza import encode_stanza
from interlink.core.domain.ports import Store
from interlink.core.protocol.wire import MAX_DEVICE_ID

ID_BYTES = 16
MAX_ACCEPT = 256  # entries of a consent.set accept list
MAX_BLOCKS = 10_000  # users one user may block
MAX_REPORT_IDS = 100
MAX_REASON_BYTES = 1024
# A stanza must fit in one frame (65,519 bytes of plaintext at most), so the 64 KiB the brief of
# the protocol allows for evidence can never arrive whole; 60 KiB leaves room for ids and reason.
MAX_EVIDENCE_BYTES = 60 * 1024
MAX_DIRECTORY_USERS = 100
KEY_BYTES = 32  # ik, spk.key and otpk keys: 25519 public keys, stored as given
SIG_BYTES = 64  # spk.sig
MAX_KEY_ID = 2**32 - 1  # prekey ids are uint32
MAX_OTPK_STOCK = 1000  # one-time prekeys stored per device
MAX_KEYS_DEVICES = 64  # entries of keys.get's 'devices' (a user has at most 64 devices: Config.max_devices)
RES_OVERHEAD_BYTES = 64  # a res's fields besides a list of addresses, at most

# Token buckets per user: (burst, tokens per second).
DIR_LOOKUP_RATE = (30, 0.5)  # 30 at once, then one every 2 s
REPORT_RATE = (20, 1 / 30)  # 20 at once, then one every 30 s
KEYS_GET_RATE = (60, 1.0)  # 60 at once, then one a second: each fetch may use up a one-time prekey

DEFERRED = object()  # a handler's result: the answer is sent later (after the group commit)
ANSWERS_PER_READ_BYTES = 1 << 20  # iq answers queued for one session from one read of its bytes

_E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")


class Operations:
    """The table of ``iq`` operations this gateway serves."""

    def __init__(
        self, *, store: Store, registry: ProviderRegistry, policy: Policy, router: Router, more_handlers: dict | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.policy = policy
        self.router = router  # keys.get takes prekeys in its group commit; answers go out through it
        self.lookup_buckets = TokenBuckets(*DIR_LOOKUP_RATE)
        self.report_buckets = TokenBuckets(*REPORT_RATE)
        self.keys_buckets = TokenBuckets(*KEYS_GET_RATE)
        self._answer_turn: tuple = (None, 0.0, 0)  # (session, now, answer bytes): the budget per read
        self.handlers: dict = {
            "keys.put": self.keys_put,
            "keys.get": self.keys_get,
            "keys.count": self.keys_count,
            "devices.get": self.devices_get,
            "consent.set": self.consent_set,
            "consent.get": self.consent_get,
            "block.add": self.block_add,
            "block.del": self.block_del,
            "block.list": self.block_list,
            "report": self.report,
            "dir.lookup": self.dir_lookup,
            **(more_handlers or {}),  # the group operations (core/domain/groups.py)
        }

    def handle_iq(self, session: Session, stanza: dict, now: float) -> None:
        iq_id = stanza.get("id")
        if type(iq_id) is not int:
            raise StanzaError("iq needs an int 'id'")
        op = stanza.get("op")
        handler = self.handlers.get(op) if type(op) is str else None
        if handler is None:
            if type(op) is not str:
                raise StanzaError("iq needs 'op': the operation's name (str)")
            raise StanzaError(f"unknown operation {excerpt(op)}")
        # One read of a session's bytes may hold a thousand small requests whose answers are large
        # (group.get, blob.read): past a budget of answer bytes per read, the rest waits, as the
        # output's own high-water mark only acts once the read's answers are queued.
        last_session, last_now, answered = self._answer_turn
        if last_session is not session or last_now != now:
            answered = 0
        if answered >= ANSWERS_PER_READ_BYTES:
            raise RouteError("too many requests at once; send more when the answers have arrived",
                             code="rate_limited", retry_after=10)
        try:
            result = handler(session, stanza, now)
        except (StoreFullError, StoreLimitError) as exc:
            raise RouteError(exc.message, code=exc.code) from None
        if result is DEFERRED:
            return
        answer = {"t": "res", "id": iq_id}
        if result:
            answer.update(result)
        self._answer_turn = (session, now, answered + self.router.answer(session, answer))

    # -- the key directory

    def keys_put(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        ik = _bin(stanza.get("ik"), KEY_BYTES, "keys.put", "'ik'", "the identity key")
        spk = stanza.get("spk")
        if type(spk) is not dict:
            raise StanzaError(f"keys.put needs 'spk': the signed prekey, a map {{id, key, sig}} (got {kind_of(spk)})")
        spk_id = _key_id(spk.get("id"), "keys.put", "'spk.id'")
        spk_key = _bin(spk.get("key"), KEY_BYTES, "keys.put", "'spk.key'", "the signed prekey")
        spk_sig = _bin(spk.get("sig"), SIG_BYTES, "keys.put", "'spk.sig'", "the identity key's signature of 'spk.key'")
        otpk = stanza.get("otpk")
        if otpk is None:
            otpk = []
        elif type(otpk) is not list:
            raise StanzaError(f"keys.put: 'otpk' must be a list of one-time prekeys {{id, key}} (got {kind_of(otpk)})")
        otpks: dict[int, bytes] = {}
        for index, entry in enumerate(otpk):
            name = f"'otpk[{index}]'"
            if type(entry) is not dict:
                raise StanzaError(f"keys.put: {name} must be a map {{id, key}} (got {kind_of(entry)})")
            key_id = _key_id(entry.get("id"), "keys.put", f"'otpk[{index}].id'")
            key = _bin(entry.get("key"), KEY_BYTES, "keys.put", f"'otpk[{index}].key'", "a one-time prekey")
            if key_id in otpks:
                raise StanzaError(f"keys.put: 'otpk' lists id {key_id} twice")
            otpks[key_id] = key
        if len(otpks) > MAX_OTPK_STOCK:
            raise RouteError(
                f"keys.put: {len(otpks)} one-time prekeys (a device stores at most {MAX_OTPK_STOCK})", code="too_large"
            )
        count = self.store.put_prekeys(
            identity.user, identity.device, ik, (spk_id, spk_key, spk_sig), list(otpks.items()), MAX_OTPK_STOCK
        )
        return {"otpk_count": count}

    def keys_get(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        user, provider_id = address_field(stanza, "user", "keys.get")
        asked = stanza.get("devices")
        if asked is not None:
            asked = device_list(asked, "keys.get", "'devices'")
        self._charge(self.keys_buckets, identity.user, now, "key requests")
        provider = self.registry.get(provider_id)
        if provider is None:
            raise RouteError(f"no provider {excerpt(provider_id)} is registered here", code="unknown_recipient")
        # Consent before existence, as in devices.get: no enumeration of users who did not opt in.
        if user != identity.user and not self.policy.allows(user, provider, identity.provider):
            raise RouteError(f"{user} does not accept users of {identity.provider!r}", code="not_opted_in")
        devices = self.store.devices(user)
        if not devices:
            raise RouteError(f"no user {user} is known to this gateway", code="unknown_recipient")
        if asked is not None:
            extra = sorted(set(asked).difference(devices))
            if extra:
                raise RouteError(
                    f"{user} has no device {', '.join(map(str, extra))}", code="device_mismatch", missing=[], extra=extra
                )
            devices = asked
        bundles = self.store.read_prekeys(user, devices)
        if all(bundle["otpk"] is None for bundle in bundles):
            return {"bundles": bundles}  # nothing to consume: answered at once, no write
        # One-time prekeys are taken (each exactly once) in the group commit with the messages
        # and other keys.get of this loop turn: one fsync for all of them, answered after it.
        self.router.enqueue_prekey_take(session, {"t": "res", "id": stanza["id"]}, user, devices, now)
        return DEFERRED

    def keys_count(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        return {"otpk_count": self.store.prekey_count(identity.user, identity.device)}

    # -- devices and consent

    def devices_get(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        user, provider = self._known_address(stanza, "user", "devices.get")
        if user != identity.user:
            if not self.policy.allows(user, provider, identity.provider):
                raise RouteError(f"{user} does not accept users of {identity.provider!r}", code="not_opted_in")
        devices = self.store.devices(user)
        if not devices:
            raise RouteError(f"no user {user} is known to this gateway", code="unknown_recipient")
        return {"devices": devices}

    def consent_set(self, session: Session, stanza: dict, now: float) -> None:
        accept = stanza.get("accept")
        discoverable = stanza.get("discoverable")
        if type(accept) is not list:
            raise StanzaError('consent.set needs \'accept\': a list of provider ids, or ["*"]')
        if type(discoverable) is not bool:
            raise StanzaError("consent.set needs 'discoverable': true or false")
        if len(accept) > MAX_ACCEPT:
            raise StanzaError(f"consent.set: 'accept' lists {len(accept)} entries (at most {MAX_ACCEPT})")
        seen: set[str] = set()
        for entry in accept:
            if type(entry) is not str:
                raise StanzaError("consent.set: 'accept' entries must be provider ids (str)")
            if entry == "*":
                if len(accept) != 1:
                    raise StanzaError('consent.set: "*" must be the only entry of \'accept\'')
            elif entry not in self.registry:
                raise StanzaError(f"consent.set: {excerpt(entry)} is not a provider registered on this gateway")
            if entry in seen:
                raise StanzaError(f"consent.set: 'accept' lists {excerpt(entry)} twice")
            seen.add(entry)
        self.policy.set_consent(session.identity.user, tuple(accept), discoverable)
        return None

    def consent_get(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        provider = self.registry.get(identity.provider)
        if provider is None:  # removed while the session was open
            raise RouteError(f"provider {identity.provider!r} is not registered", code="unknown_recipient")
        accept, discoverable = self.policy.consent(identity.user, provider)
        return {"accept": list(accept), "discoverable": discoverable}

    # -- blocks

    def block_add(self, session: Session, stanza: dict, now: float) -> None:
        identity = session.identity
        user, _ = self._known_address(stanza, "user", "block.add")
        if user == identity.user:
            raise StanzaError("block.add: you cannot block yourself")
        self.policy.block(identity.user, user, MAX_BLOCKS)
        return None

    def block_del(self, session: Session, stanza: dict, now: float) -> None:
        user, _ = address_field(stanza, "user", "block.del")
        self.policy.unblock(session.identity.user, user)
        return None

    def block_list(self, session: Session, stanza: dict, now: float) -> dict:
        after = stanza.get("after")
        if after is not None:
            after, _ = address_field(stanza, "after", "block.list")
        budget = session.max_plaintext_bytes - RES_OVERHEAD_BYTES
        page: list[str] = []
        more = False
        size = 0
        # Read in chunks until the frame is full or the list ends.
        cursor = after
        while True:
            chunk = self.store.blocked(session.identity.user, cursor, 256)
            for user in chunk:
                cost = len(encode_stanza(user))
                if size + cost > budget:
                    more = True
                    break
                page.append(user)
                size += cost
            if more or len(chunk) < 256:
                break
            cursor = chunk[-1]
        return {"users": page, "more": more}

    # -- reports

    def report(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        user, _ = self._known_address(stanza, "user", "report")
        if user == identity.user:
            raise StanzaError("report: you cannot report yourself")
        ids = stanza.get("ids")
        if type(ids) is not list or not all(type(i) is bytes and len(i) == ID_BYTES for i in ids):
            raise StanzaError("report needs 'ids': a list of message ids (16 bytes each)")
        if len(ids) > MAX_REPORT_IDS:
            raise RouteError(f"report: {len(ids)} ids (at most {MAX_REPORT_IDS})", code="too_large")
        reason = stanza.get("reason")
        if type(reason) is not str:
            raise StanzaError("report needs 'reason': a string")
        if len(reason.encode("utf-8")) > MAX_REASON_BYTES:
            raise RouteError(f"report: 'reason' is over {MAX_REASON_BYTES} bytes", code="too_large")
        evidence = stanza.get("evidence")
        if evidence is not None:
            if type(evidence) is not bytes:
                raise StanzaError("report: 'evidence' must be bin")
            if len(evidence) > MAX_EVIDENCE_BYTES:
                raise RouteError(
                    f"report: 'evidence' of {len(evidence)} bytes is over {MAX_EVIDENCE_BYTES}", code="too_large"
                )
        self._charge(self.report_buckets, identity.user, now, "reports")
        number = self.store.add_report(
            {
                "reporter": identity.user,
                "device": identity.device,
                "user": user,
                "ids": ids,
                "reason": reason,
                "evidence": evidence,
                "ts": int(now * 1000),
            }
        )
        return {"report": number}

    # -- directory

    def dir_lookup(self, session: Session, stanza: dict, now: float) -> dict:
        identity = session.identity
        phone = stanza.get("phone")
        if type(phone) is not str or _E164_RE.fullmatch(phone) is None:
            raise StanzaError("dir.lookup needs 'phone': an E.164 number such as '+4915112345678'")
        self._charge(self.lookup_buckets, identity.user, now, "directory look-ups")
        users = []
        for user in self.store.directory(phone, MAX_DIRECTORY_USERS):
            provider = self.registry.get(user.rpartition("@")[2])
            if provider is None or provider.suspended:
                continue
            accept, discoverable = self.policy.consent(user, provider)
            if not discoverable:
                continue
            if provider.id == identity.provider or "*" in accept or identity.provider in accept:
                users.append(user)
        return {"users": users}

    # -- helpers

    def _charge(self, buckets: TokenBuckets, user: str, now: float, what: str) -> None:
        wait_s = buckets.take(user, now)
        if wait_s:
            retry_after = max(1, math.ceil(wait_s * 1000))
            raise RouteError(f"too many {what}; try again in {retry_after} ms", code="rate_limited", retry_after=retry_after)

    def _known_address(self, stanza: dict, name: str, op: str):
        """A well-formed address whose provider is registered (``unknown_recipient`` otherwise)."""
        user, provider_id = address_field(stanza, name, op)
        provider = self.registry.get(provider_id)
        if provider is None:
            raise RouteError(f"no provider {excerpt(provider_id)} is registered here", code="unknown_recipient")
        return user, provider


def address_field(stanza: dict, name: str, op: str) -> tuple[str, str]:
    """``stanza[name]``, a well-formed user address, and its provider id (``bad_stanza`` otherwise)."""
    value = stanza.get(name)
    if type(value) is not str:
        raise StanzaError(f"{op} needs '{name}': a user address 'localpart@provider'")
    provider_id = address_provider(value)
    if provider_id is None:
        raise StanzaError(f"{op}: '{name}' is not a user address: {excerpt(value)}")
    return value, provider_id


def _bin(value, size: int, op: str, name: str, what: str) -> bytes:
    if value is None:
        raise StanzaError(f"{op} needs {name}: {what}, {size} bytes (bin)")
    if type(value) is not bytes:
        raise StanzaError(f"{op}: {name} must be {size} bytes of bin, not {kind_of(value)}")
    if len(value) != size:
        raise StanzaError(f"{op}: {name} must be {size} bytes, not {len(value)}")
    return value


def _key_id(value, op: str, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_KEY_ID:
        shown = kind_of(value) if type(value) is not int else value  # msgpack ints have at most 20 digits
        raise StanzaError(f"{op}: {name} must be a key id, an int 0..{MAX_KEY_ID} (got {shown})")
    return value


def device_list(value, op: str, name: str) -> list[int]:
    """A list of distinct device numbers, at most ``MAX_KEYS_DEVICES`` (``bad_stanza`` otherwise)."""
    if type(value) is not list:
        raise StanzaError(f"{op}: {name} must be a list of device numbers (got {kind_of(value)}); leave it out for all devices")
    if not value:
        raise StanzaError(f"{op}: {name} is empty; leave it out for all devices")
    if len(value) > MAX_KEYS_DEVICES:
        raise StanzaError(f"{op}: {name} lists {len(value)} devices (at most {MAX_KEYS_DEVICES})")
    for device in value:
        if type(device) is not int or not 1 <= device <= MAX_DEVICE_ID:
            shown = kind_of(device) if type(device) is not int else "out of range"
            raise StanzaError(f"{op}: {name} entries must be device numbers 1..{MAX_DEVICE_ID} ({shown})")
    if len(set(value)) != len(value):
        raise StanzaError(f"{op}: {name} lists a device twice")
    return value
