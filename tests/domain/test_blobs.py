"""Blobs in the domain (``core/domain/blobs.py``), without a loop or a socket: a real ``Domain``
over a real LMDB store and a real blob file store in a temporary folder, ``FakeSession``s, and
an ``Offload`` that queues the work until the test runs it (so a test can act while a blob is
being hashed). The same operations over TCP with the SDK are in ``tests/e2e/test_blobs.py``."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from interlink.core.domain import blobs as blobs_module
from interlink.core.domain import ops as ops_module
from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.blobs import BlobLimits, BlobRecord
from interlink.core.domain.dispatch import Domain
from interlink.core.edge.blobfiles import BlobFileStore
from interlink.core.protocol.stanza import encode_stanza
from interlink.testing import DEFAULTS, FakeSession, lmdb_store

NOW = 1_800_000_000.0
MIB = 1 << 20


def limits(**overrides) -> BlobLimits:
    values = {"blob_max_bytes": 8 * MIB, "blob_open_uploads_per_user": 3, "blob_daily_bytes_per_user": 32 * MIB,
              "blob_min_free_bytes": 0, "blob_kib_per_s_per_user": 1 << 20, "blob_ttl_s": 3600.0,
              "blob_upload_ttl_s": 600.0}
    return BlobLimits(**{**values, **overrides})


class QueuedOffload:
    """The ``Offload`` port run by hand: work waits until ``run()``."""

    def __init__(self) -> None:
        self.queue: list = []

    def submit(self, work, done) -> None:
        self.queue.append((work, done))

    def run(self, now: float = NOW) -> int:
        ran = 0
        while self.queue:
            work, done = self.queue.pop(0)
            try:
                outcome = work()
            except Exception as exc:
                outcome = exc
            done(outcome, now)
            ran += 1
        return ran


class InlineOffload:
    """The ``Offload`` port doing the work at once on the caller's thread: the chunk writer in
    most of these tests (``Edge(queued_writes=True)`` queues the writes too)."""

    def submit(self, work, done) -> None:
        try:
            outcome = work()
        except Exception as exc:
            outcome = exc
        done(outcome, NOW)


class Edge:
    def __init__(self, folder, map_size_bytes: int = 1 << 26, queued_writes: bool = False, **limit_overrides) -> None:
        self.folder = folder
        self.store = lmdb_store(folder / "lmdb", sync=False, map_size_bytes=map_size_bytes)
        self.files = BlobFileStore(folder / "blobs")
        self.offload = QueuedOffload()
        self.writer = QueuedOffload() if queued_writes else InlineOffload()
        self.domain = self._domain(limits(**limit_overrides))
        self.next_iq = 0

    def _domain(self, blob_limits: BlobLimits) -> Domain:
        return Domain(
            store=self.store, registry=ProviderRegistry([Provider(id="alpha", issuer="https://a.example", audience="gw",
                                                                  jwks_uri="https://a.example/jwks")]),
            window=64, max_frame_bytes=65535, max_group=16, message_rate_per_device=1e9, message_rate_per_user=1e9,
            overload_turn_messages=DEFAULTS.overload_turn_messages,
            overload_refuse_after_s=DEFAULTS.overload_refuse_after_s,
            blob_files=self.files, offload=self.offload, blob_writer=self.writer, blob_limits=blob_limits,
        )

    def restart(self, **limit_overrides) -> None:
        """A new domain over the same store and files: what a gateway restart keeps."""
        self.domain = self._domain(limits(**limit_overrides))

    def iq(self, session: FakeSession, op: str, now: float = NOW, **fields) -> dict | None:
        """Send an iq; its answer, or None while it waits (a blob being hashed)."""
        self.next_iq += 1
        self.domain.dispatch(session, {"t": "iq", "id": self.next_iq, "op": op, **fields}, now)
        answers = [s for s in session.take() if s.get("id") == self.next_iq]
        return answers[0] if answers else None

    def upload(self, session, data: bytes, chunk: int = 65_000, sha256: bytes | None = None) -> tuple[bytes, dict]:
        blob = self.iq(session, "blob.new", size=len(data), sha256=sha256 or hashlib.sha256(data).digest())["blob"]
        answer = None
        for offset in range(0, len(data), chunk):
            answer = self.iq(session, "blob.write", blob=blob, off=offset, data=data[offset:offset + chunk])
        if answer is None:
            self.offload.run()
            answer = session.take()[-1]
        return blob, answer

    def read_all(self, session, blob: bytes, chunk: int = 65_000) -> bytes:
        got = b""
        while True:
            answer = self.iq(session, "blob.read", blob=blob, off=len(got), len=chunk)
            assert answer["t"] == "res", answer
            got += answer["data"]
            if len(got) >= answer["size"]:
                return got


@pytest.fixture
def edge(tmp_path):
    made = Edge(tmp_path)
    yield made
    made.store.close()


def session(user: str = "alice@alpha", device: int = 1) -> FakeSession:
    return FakeSession(user, device)


def test_an_upload_is_ready_only_after_its_hash_and_then_anyone_reads_it(edge):
    alice, bob = session(), session("bob@alpha")
    data = os.urandom(190_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    assert len(blob) == 16
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=data[:65_000]) == {
        "t": "res", "id": edge.next_iq, "have": 65_000, "ready": False}
    assert edge.iq(bob, "blob.read", blob=blob, off=0, len=10)["code"] == "not_found"  # not ready yet
    edge.iq(alice, "blob.write", blob=blob, off=65_000, data=data[65_000:130_000])
    assert edge.iq(alice, "blob.write", blob=blob, off=130_000, data=data[130_000:]) is None  # hashed first
    assert edge.store.blob(blob).ready is False
    assert edge.offload.run() == 1
    assert alice.take() == [{"t": "res", "id": edge.next_iq, "have": len(data), "ready": True}]
    assert edge.store.blob(blob).ready is True
    assert edge.read_all(bob, blob) == data
    assert edge.store.blob_usage() == {"blob_uploads": 0, "blobs_ready": 1, "blob_bytes": len(data)}
    # a repeated chunk after the end is answered ready, and changes nothing
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"x" * 10)["ready"] is True
    assert edge.read_all(bob, blob) == data


def test_chunks_out_of_order_and_repeated_make_the_same_blob(edge):
    alice = session()
    data = os.urandom(7 * 10_000 + 123)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    offsets = list(range(0, len(data), 10_000))
    order = offsets[3:] + offsets[:3] + offsets[2:5]  # the later half first, then some again
    answers = [edge.iq(alice, "blob.write", blob=blob, off=o, data=data[o:o + 10_000]) for o in order]
    haves = [a["have"] for a in answers if a is not None]
    assert haves[:4] == [0, 0, 0, 0]  # nothing contiguous from 0 until the first chunk arrives
    assert answers[len(offsets) - 1] is None  # the chunk that completed it waits for the hash
    edge.offload.run()
    assert alice.take()[-1]["ready"] is True
    assert edge.read_all(alice, blob) == data


def test_a_wrong_hash_is_bad_hash_and_the_same_id_can_be_uploaded_again(edge):
    alice = session()
    data = os.urandom(100_000)
    blob, answer = edge.upload(alice, data, sha256=hashlib.sha256(data + b"!").digest())
    assert answer["code"] == "bad_hash"
    assert edge.store.blob(blob).ready is False
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 0  # starts over
    assert edge.iq(alice, "blob.read", blob=blob, off=0, len=10)["code"] == "not_found"


def test_writes_while_the_blob_is_hashed_are_answered_with_the_verdict(edge):
    alice = session()
    data = os.urandom(5000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=data) is None
    first = edge.next_iq
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=data) is None  # a resend during the hash
    assert len(edge.offload.queue) == 1  # hashed once
    edge.offload.run()
    assert alice.take() == [{"t": "res", "id": first, "have": 5000, "ready": True},
                            {"t": "res", "id": first + 1, "have": 5000, "ready": True}]


def test_every_id_that_cannot_be_read_gets_the_same_answer(edge):
    alice, bob = session(), session("bob@alpha")
    unfinished = edge.iq(alice, "blob.new", size=10, sha256=bytes(32))["blob"]
    expired, _ = edge.upload(alice, b"0123456789")
    answers = [
        edge.iq(bob, "blob.read", blob=os.urandom(16), off=0, len=10),  # unknown
        edge.iq(bob, "blob.read", blob=unfinished, off=0, len=10),  # still uploading
        edge.iq(bob, "blob.read", blob=expired, off=0, len=10, now=NOW + 3601),  # expired
        edge.iq(bob, "blob.write", blob=unfinished, off=0, data=b"x"),  # someone else's upload
        edge.iq(bob, "blob.write", blob=os.urandom(16), off=0, data=b"x"),
    ]
    assert {(a["code"], a["msg"]) for a in answers} == {("not_found", "no such blob")}


@pytest.mark.parametrize("fields, problem", [
    ({"size": 0}, "'size'"), ({"size": -5}, "'size'"), ({"size": "10"}, "'size'"), ({"size": 1.5}, "'size'"),
    ({"sha256": b"short"}, "'sha256'"), ({"sha256": "hex"}, "'sha256'"),
])
def test_bad_blob_new_is_bad_stanza(edge, fields, problem):
    alice = session()
    answer = edge.iq(alice, "blob.new", **{"size": 10, "sha256": bytes(32), **fields})
    assert answer["code"] == "bad_stanza" and problem in answer["msg"]
    assert alice.closed is False


@pytest.mark.parametrize("fields, code", [
    ({"off": -1}, "bad_stanza"), ({"off": "0"}, "bad_stanza"), ({"off": 2**70}, "bad_stanza"),
    ({"off": 95, "data": b"x" * 10}, "bad_stanza"),  # past the declared size
    ({"data": "text"}, "bad_stanza"), ({"data": None}, "bad_stanza"), ({"blob": b"x" * 15}, "bad_stanza"),
    ({"data": b"x" * 65_264}, "too_large"),  # one byte over the announced chunk
])
def test_bad_blob_write_is_refused_and_changes_nothing(edge, fields, code):
    alice = session()
    blob = edge.iq(alice, "blob.new", size=100, sha256=bytes(32))["blob"]
    answer = edge.iq(alice, "blob.write", **{"blob": blob, "off": 0, "data": b"abc", **fields})
    assert answer["code"] == code
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 0


@pytest.mark.parametrize("fields", [{"off": -1}, {"len": -1}, {"len": 65_264}, {"len": "9"}, {"off": 11}])
def test_bad_blob_read_is_bad_stanza(edge, fields):
    alice = session()
    blob, _ = edge.upload(alice, b"0123456789")
    assert edge.iq(alice, "blob.read", **{"blob": blob, "off": 0, "len": 5, **fields})["code"] == "bad_stanza"
    answer = edge.iq(alice, "blob.read", blob=blob, off=10, len=5)  # at the end: nothing, and the size
    assert (answer["data"], answer["size"]) == (b"", 10)


def test_limits_have_their_codes(tmp_path):
    edge = Edge(tmp_path, blob_max_bytes=1000, blob_open_uploads_per_user=2)
    alice, bob = session(), session("bob@alpha")
    assert edge.iq(alice, "blob.new", size=1001, sha256=bytes(32))["code"] == "too_large"
    edge.iq(alice, "blob.new", size=1000, sha256=bytes(32))
    edge.iq(alice, "blob.new", size=1000, sha256=bytes(32))
    third = edge.iq(alice, "blob.new", size=10, sha256=bytes(32))
    assert third["code"] == "rate_limited" and third["retry_after"] > 0  # two unfinished uploads
    assert edge.iq(bob, "blob.new", size=10, sha256=bytes(32))["t"] == "res"  # another user is not affected
    edge.store.close()


def test_at_the_open_upload_limit_the_quietest_upload_makes_room(tmp_path):
    """A client that lost its upload ids (reinstalled, crashed) is not locked out of uploading
    until they expire: past 10 quiet minutes the quietest one gives way to a new blob.new."""
    edge = Edge(tmp_path, blob_max_bytes=1000, blob_open_uploads_per_user=2, blob_upload_ttl_s=86_400.0)
    alice = session()
    first = edge.iq(alice, "blob.new", size=1000, sha256=bytes(32))["blob"]
    edge.iq(alice, "blob.write", blob=first, off=0, data=b"a" * 100)
    second = edge.iq(alice, "blob.new", now=NOW + 100, size=1000, sha256=bytes(32))["blob"]
    edge.iq(alice, "blob.write", now=NOW + 300, blob=second, off=0, data=b"b" * 100)
    refused = edge.iq(alice, "blob.new", now=NOW + 400, size=10, sha256=bytes(32))
    assert (refused["code"], refused["retry_after"]) == ("rate_limited", 200_000)  # the first is quiet at NOW + 600
    third = edge.iq(alice, "blob.new", now=NOW + 601, size=10, sha256=bytes(32))
    assert third["t"] == "res"
    assert edge.iq(alice, "blob.write", now=NOW + 602, blob=first, off=100, data=b"a")["code"] == "not_found"
    assert edge.store.blob(first) is None and first not in set(edge.files.ids())
    assert edge.iq(alice, "blob.write", now=NOW + 602, blob=second, off=100, data=b"b")["have"] == 101
    assert edge.domain.blobs.counters["blob_uploads_released"] == 1
    assert edge.store.blob_usage()["blob_uploads"] == 2
    # After a restart an upload counts as touched when the process started: its client may be
    # about to resume it.
    edge.restart(blob_max_bytes=1000, blob_open_uploads_per_user=2, blob_upload_ttl_s=86_400.0)
    later = NOW + 5_000
    edge.domain.blobs.sweep(later)
    assert edge.iq(alice, "blob.new", now=later + 10, size=10, sha256=bytes(32))["retry_after"] == 590_000
    assert edge.iq(alice, "blob.new", now=later + 600, size=10, sha256=bytes(32))["t"] == "res"
    assert [edge.store.blob(b) is None for b in sorted((second, third["blob"]))].count(True) == 1  # one of the equals
    assert edge.store.blob_usage()["blob_uploads"] == 2
    edge.store.close()


def test_the_daily_allowance_counts_each_blob_as_a_megabyte_at_least(tmp_path):
    # 2.5 MiB a day: two blobs of any size under 1 MiB, not thousands of tiny ones
    daily = Edge(tmp_path, blob_max_bytes=1000, blob_daily_bytes_per_user=5 * MIB // 2, blob_open_uploads_per_user=9)
    alice = session()
    for _ in range(2):
        assert daily.iq(alice, "blob.new", size=1, sha256=bytes(32))["t"] == "res"
    over = daily.iq(alice, "blob.new", size=1, sha256=bytes(32))
    assert over["code"] == "rate_limited" and 0 < over["retry_after"] <= 86_400_000
    assert daily.iq(alice, "blob.new", size=1, sha256=bytes(32), now=NOW + 86_400)["t"] == "res"  # the next day
    daily.store.close()


def test_a_nearly_full_disk_refuses_new_uploads_with_overloaded(tmp_path):
    edge = Edge(tmp_path, blob_min_free_bytes=1 << 60)
    answer = edge.iq(session(), "blob.new", size=10, sha256=bytes(32))
    assert answer["code"] == "overloaded" and answer["retry_after"] > 0
    edge.store.close()


def test_blob_traffic_is_rate_limited_per_user(tmp_path):
    edge = Edge(tmp_path, blob_kib_per_s_per_user=64)  # a burst of 128 KiB, then 64 KiB/s
    alice = session()
    blob = edge.iq(alice, "blob.new", size=1 << 20, sha256=bytes(32))["blob"]  # 64 KiB of it
    codes = [edge.iq(alice, "blob.write", blob=blob, off=i * 60_000, data=bytes(60_000)).get("code") for i in range(2)]
    assert codes == [None, "rate_limited"]
    later = edge.iq(alice, "blob.write", blob=blob, off=60_000, data=bytes(60_000), now=NOW + 1)
    assert later["t"] == "res"
    edge.store.close()


def test_writes_waiting_for_a_verdict_are_bounded(edge):
    alice = session()
    data = os.urandom(100)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=data) is None  # hashed
    for _ in range(blobs_module.MAX_WAITING - 1):
        assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"") is None
    refused = edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")
    assert refused["code"] == "rate_limited" and refused["retry_after"] > 0
    edge.offload.run()
    answers = alice.take()
    assert len(answers) == blobs_module.MAX_WAITING and all(a["ready"] for a in answers)


def test_one_read_of_many_blob_reads_is_answered_up_to_a_budget(edge):
    alice = session()
    blob, _ = edge.upload(alice, os.urandom(65_000))
    answer = len(encode_stanza({"t": "res", "id": 1000, "data": bytes(65_000), "size": 65_000}))
    per_budget = ops_module.ANSWERS_PER_READ_BYTES // answer + 1  # the one that passes the budget is still served
    answers = [edge.iq(alice, "blob.read", blob=blob, off=0, len=65_000) for _ in range(per_budget + 3)]
    assert [a["t"] for a in answers[:per_budget]] == ["res"] * per_budget
    assert all(a["code"] == "rate_limited" for a in answers[per_budget:])
    assert edge.iq(alice, "blob.read", blob=blob, off=0, len=10, now=NOW + 0.01)["t"] == "res"  # the next read


def test_the_disk_check_counts_what_unfinished_uploads_still_have_to_write(tmp_path):
    edge = Edge(tmp_path)
    free = edge.files.free_bytes()
    edge.domain.blobs.limits.blob_min_free_bytes = free - 12 * MIB  # room for 12 MiB more
    edge.domain.blobs.limits.blob_open_uploads_per_user = 9
    alice = session()
    assert edge.iq(alice, "blob.new", size=8 * MIB, sha256=bytes(32))["t"] == "res"  # 8 MiB reserved
    assert edge.iq(alice, "blob.new", size=6 * MIB, sha256=bytes(32))["code"] == "overloaded"  # 8 + 6 > 12
    assert edge.iq(alice, "blob.new", size=3 * MIB, sha256=bytes(32))["t"] == "res"
    edge.store.close()


def test_a_nearly_full_lmdb_map_refuses_new_uploads(tmp_path):
    edge = Edge(tmp_path, map_size_bytes=1 << 20)  # a 1 MiB map, filled with other users' uploads
    alice = session()
    assert edge.iq(alice, "blob.new", size=10, sha256=bytes(32))["t"] == "res"
    number = 0
    while edge.store.usage()["map_used_bytes"] <= 0.9 * (1 << 20):
        number += 1
        record = BlobRecord(f"filler{number}@alpha", 10, bytes(32), 0, 2**40, False, b"")
        assert edge.store.create_blob(os.urandom(16), record, 9)
    answer = edge.iq(alice, "blob.new", size=10, sha256=bytes(32))
    assert answer["code"] == "overloaded" and answer["retry_after"] > 0
    edge.store.close()


def test_an_upload_resumes_after_a_restart_from_its_last_checkpoint(edge, monkeypatch):
    monkeypatch.setattr(blobs_module, "CHECKPOINT_BYTES", 100_000)
    alice = session()
    data = os.urandom(300_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    for offset in (0, 50_000, 100_000):
        edge.iq(alice, "blob.write", blob=blob, off=offset, data=data[offset:offset + 50_000])
    assert len(edge.offload.queue) == 1  # 100,000 bytes unsynced: a checkpoint
    edge.offload.run()
    edge.iq(alice, "blob.write", blob=blob, off=150_000, data=data[150_000:200_000])  # not checkpointed
    edge.restart()
    # the restarted gateway knows what was synced, not what was written after
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 100_000
    for offset in range(100_000, len(data), 50_000):
        answer = edge.iq(alice, "blob.write", blob=blob, off=offset, data=data[offset:offset + 50_000])
    assert answer is None
    edge.offload.run()
    assert alice.take()[-1]["ready"] is True
    assert edge.read_all(alice, blob) == data


def test_every_megabyte_is_flushed_to_the_disk_and_only_checkpoints_record_it(edge, monkeypatch):
    """Flushes keep the disk's queue short (a message commit's fsync waits behind little blob
    data); only a checkpoint's sync saves the ranges a restart resumes from."""
    monkeypatch.setattr(blobs_module, "FLUSH_BYTES", 30_000)
    monkeypatch.setattr(blobs_module, "CHECKPOINT_BYTES", 100_000)
    synced = []
    real_sync = edge.files.sync
    monkeypatch.setattr(edge.files, "sync", lambda blob: (synced.append(blob), real_sync(blob))[1])
    alice = session()
    data = os.urandom(300_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    edge.iq(alice, "blob.write", blob=blob, off=0, data=data[:50_000])
    assert len(edge.offload.queue) == 1  # 50,000 unflushed: a flush
    edge.iq(alice, "blob.write", blob=blob, off=50_000, data=data[50_000:60_000])
    assert len(edge.offload.queue) == 1  # one flush at a time
    edge.offload.run()
    assert synced == [blob] and edge.store.blob(blob).ranges == b""  # flushed, nothing recorded
    edge.iq(alice, "blob.write", blob=blob, off=60_000, data=data[60_000:110_000])
    assert len(edge.offload.queue) == 1  # 110,000 unsynced: the checkpoint (no flush beside it)
    edge.offload.run()
    assert len(synced) == 2
    edge.iq(alice, "blob.write", blob=blob, off=110_000, data=data[110_000:150_000])
    edge.offload.run()  # 40,000 since the checkpoint: a flush
    assert len(synced) == 3
    edge.restart()
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 110_000


def test_chunks_are_answered_once_written_and_the_hash_waits_for_every_write(tmp_path):
    """Chunks go to the page cache on the writer thread: each is answered when its write is
    done, and the verdict never starts while a write of the blob is still on its way."""
    edge = Edge(tmp_path, queued_writes=True)
    alice = session()
    data = os.urandom(150_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 0  # nothing on its way: at once
    ids = []
    for offset in (0, 50_000):
        assert edge.iq(alice, "blob.write", blob=blob, off=offset, data=data[offset:offset + 50_000]) is None
        ids.append(edge.next_iq)
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"") is None  # behind the two: answered after them
    ids.append(edge.next_iq)
    assert edge.iq(alice, "blob.write", blob=blob, off=100_000, data=data[100_000:]) is None
    assert len(edge.writer.queue) == 4 and edge.domain.blobs.pending_write_bytes == 150_000
    assert edge.store.blob(blob) is not None and not edge.offload.queue
    edge.writer.run()
    answers = alice.take()
    assert [(a["id"], a["have"]) for a in answers] == list(zip(ids, [50_000, 100_000, 100_000]))  # in order
    assert len(edge.offload.queue) == 1 and edge.domain.blobs.pending_write_bytes == 0  # the last waits for the verdict
    edge.offload.run()
    assert alice.take()[-1]["ready"] is True
    assert edge.read_all(alice, blob) == data
    edge.store.close()


def test_a_write_that_fails_is_answered_with_its_error_and_counts_nothing(tmp_path, monkeypatch):
    edge = Edge(tmp_path, queued_writes=True)
    alice = session()
    data = os.urandom(100_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    edge.iq(alice, "blob.write", blob=blob, off=0, data=data[:50_000])
    edge.iq(alice, "blob.write", blob=blob, off=50_000, data=data[50_000:])
    real_write = edge.files.write

    def full_disk(blob_id, offset, chunk):
        if offset == 50_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(blob_id, offset, chunk)

    monkeypatch.setattr(edge.files, "write", full_disk)
    edge.writer.run()
    answers = alice.take()
    assert answers[0]["have"] == 50_000 and answers[1]["code"] == "overloaded"
    assert not edge.offload.queue  # half the bytes: no verdict
    monkeypatch.setattr(edge.files, "write", real_write)
    edge.iq(alice, "blob.write", blob=blob, off=50_000, data=data[50_000:])
    edge.writer.run()
    edge.offload.run()
    assert alice.take()[-1]["ready"] is True
    edge.store.close()


def test_writes_waiting_for_the_disk_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs_module, "MAX_PENDING_WRITE_BYTES", 120_000)
    edge = Edge(tmp_path, queued_writes=True)
    alice, bob = session(), session("bob@alpha")
    first = edge.iq(alice, "blob.new", size=1_000_000, sha256=bytes(32))["blob"]
    for offset in range(0, 32 * 1000, 1000):  # one upload: 32 chunks on their way at most
        assert edge.iq(alice, "blob.write", blob=first, off=offset, data=b"a" * 1000) is None
    refused = edge.iq(alice, "blob.write", blob=first, off=32_000, data=b"a" * 1000)
    assert (refused["code"], refused["retry_after"]) == ("rate_limited", 10)
    # all uploads together: MAX_PENDING_WRITE_BYTES
    second = edge.iq(bob, "blob.new", size=1_000_000, sha256=bytes(32))["blob"]
    assert edge.iq(bob, "blob.write", blob=second, off=0, data=b"b" * 60_000) is None
    assert edge.iq(bob, "blob.write", blob=second, off=60_000, data=b"b" * 60_000)["code"] == "rate_limited"
    # an upload with writes on their way is not deleted under them, even once its time ran out
    assert edge.domain.blobs.sweep(NOW + 601) == 0
    edge.writer.run()
    assert edge.domain.blobs.pending_write_bytes == 0
    assert edge.domain.blobs.sweep(NOW + 601) == 2
    assert list(edge.files.ids()) == []
    edge.store.close()


def test_the_sweep_deletes_expired_blobs_and_unfinished_uploads_with_their_files(edge):
    alice = session()
    ready, _ = edge.upload(alice, b"ready bytes")
    unfinished = edge.iq(alice, "blob.new", size=100, sha256=bytes(32))["blob"]
    edge.iq(alice, "blob.write", blob=unfinished, off=0, data=b"half")
    assert sorted(edge.files.ids()) == sorted([ready, unfinished])
    assert edge.domain.blobs.sweep(NOW + 60) == 0  # nothing is due yet
    assert edge.domain.blobs.sweep(NOW + 601) == 1  # the upload's 600 s are over
    assert list(edge.files.ids()) == [ready] and edge.store.blob(unfinished) is None
    assert edge.domain.blobs.sweep(NOW + 3601) == 1  # the ready blob's hour is over
    assert list(edge.files.ids()) == [] and edge.store.blob(ready) is None
    assert edge.store.blob_usage() == {"blob_uploads": 0, "blobs_ready": 0, "blob_bytes": 0}


def test_without_any_blob_record_no_file_is_taken_for_an_orphan(edge, caplog):
    stray = os.urandom(16)
    edge.files.write(stray, 0, b"a file of another environment")
    assert edge.domain.blobs.remove_orphans() == 0
    assert list(edge.files.ids()) == [stray]
    assert "no blob record does" in caplog.text


def test_a_drain_checkpoints_what_each_upload_received(edge):
    alice = session()
    data = os.urandom(300_000)
    blob = edge.iq(alice, "blob.new", size=len(data), sha256=hashlib.sha256(data).digest())["blob"]
    edge.iq(alice, "blob.write", blob=blob, off=0, data=data[:50_000])
    assert edge.domain.blobs.checkpoint_all() == 1
    edge.offload.run()
    edge.restart()
    assert edge.iq(alice, "blob.write", blob=blob, off=0, data=b"")["have"] == 50_000


def test_files_without_a_record_are_removed_at_start(edge):
    alice = session()
    kept, _ = edge.upload(alice, b"kept")
    orphan = os.urandom(16)
    edge.files.write(orphan, 0, b"left by a crash")
    assert edge.domain.blobs.remove_orphans() == 1
    assert list(edge.files.ids()) == [kept]
