"""The media kind of ``interlink load``: blobs (encrypted attachments, docs/protocol.md §7
"Blobs") uploaded and downloaded beside the chat-1to1 traffic, and what they do to the chat.

The chat part is the chat kind's own (``interlink.load.chat``: its devices, open or closed loop,
measured window, tail and loss accounting, so its figures read as the chat kind's do). Beside it,
on users of their own (after the chat's), ``media_uploaders`` SDK clients (``Client.upload_blob``)
upload blobs of ``media_blob_mib`` back to back, and ``media_downloaders`` clients
(``Client.download_blob``) download the newest ready blob back to back, every byte checked against
the bytes uploaded. One seed blob is uploaded before the window, so that downloads start with it.

Over the chat's measured window (``chat.Beside``): upload MB/s (10^6 bytes the gateway
acknowledged) and download MB/s (bytes received), blobs and downloads completed, and
``blob_ready``: the time from the upload's last chunk sent to the gateway's ``ready`` (stored
durably, SHA-256 checked). When the window ends no new blob starts: downloads are cut, and uploads
under way finish (within the tail's timeout), so a remote gateway is not left with unfinished
uploads. ``rate_limited`` is waited out by the SDK; ``overloaded`` (the gateway's disk nearly
full) is counted; any other media error, or a downloaded byte that differs, fails the run.
With ``media_only`` there is no chat: the blobs alone.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from interlink.client import Client
from interlink.core.errors import ConfigError, InterlinkError, ServerError, SessionClosedError
from interlink.load.accounting import Run, account, new_histogram, percentiles_ms, record_latency
from interlink.load.chat import chat_window, drive_devices, make_devices
from interlink.load.e2ee import e2ee_report
from interlink.load.progress import Ticker
from interlink.load.report import gateway_info, report_head, report_tail
from interlink.load.runner import CONNECT_TIMEOUT_S, TAIL_TIMEOUT_S, gather_bounded, pin_cpus
from interlink.load.scenario import Scenario
from interlink.load.target import RemoteGateway, open_gateway

__all__ = ["BlobBytes", "Media", "run_media"]

MARK_BYTES = 8  # the end of every blob: its uploader's number (a download is checked against the blob it asked for)
ERROR_PAUSE_S = 0.2  # after a media error: before the next try (and a reconnect, if the session ended)
REFUSALS = ("overloaded",)  # media errors that explain themselves (a nearly full disk); any other fails the run
MB = 1e6


class BlobBytes:
    """The bytes of a run's blobs: one random buffer of the blob's size, less ``MARK_BYTES`` at
    the end, where each uploader's blobs carry its number (``content(index)``). The buffer is
    hashed once; an uploader's SHA-256 adds only its mark."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mark_bytes = min(MARK_BYTES, size)
        self.body = os.urandom(size - self.mark_bytes)
        self._digest = hashlib.sha256(self.body)

    def content(self, index: int) -> BlobContent:
        mark = index.to_bytes(MARK_BYTES, "big")[MARK_BYTES - self.mark_bytes:]
        digest = self._digest.copy()
        digest.update(mark)
        return BlobContent(self.body, mark, digest.digest())


class BlobContent:
    """One uploader's blob: what ``Client.upload_blob`` reads from (``size``, ``sha256``,
    ``read(offset, length)``) and what a download is compared with."""

    def __init__(self, body: bytes, mark: bytes, sha256: bytes) -> None:
        self.body, self.mark, self.sha256 = body, mark, sha256
        self.size = len(body) + len(mark)

    def read(self, offset: int, length: int) -> bytes:
        end, body = min(offset + length, self.size), len(self.body)
        if end <= body:
            return self.body[offset:end]
        return self.body[offset:body] + self.mark[max(0, offset - body):end - body]


class _Upload:
    """One upload of a ``BlobContent``: when its last chunk was read to be sent (the SDK reads
    each chunk as it sends it; a chunk sent again after a rate limit counts from the later send)."""

    def __init__(self, content: BlobContent) -> None:
        self.content, self.size, self.sha256 = content, content.size, content.sha256
        self.last_chunk_ns = 0

    def read(self, offset: int, length: int) -> bytes:
        if offset + length >= self.size:
            self.last_chunk_ns = time.perf_counter_ns()
        return self.content.read(offset, length)


class _Check:
    """A download's sink: counts the bytes received and compares each chunk with the bytes
    uploaded (chunks arrive in order, from offset 0)."""

    def __init__(self, media: Media, content: BlobContent) -> None:
        self.media, self.content, self.offset = media, content, 0

    def write(self, data: bytes) -> None:
        if data != self.content.read(self.offset, len(data)):
            self.media.mismatched_chunks += 1
        self.offset += len(data)
        self.media.downloaded += len(data)


class _Slot:
    """One media client: its user, its SDK session (renewed when it ends), its task."""

    def __init__(self, localpart: str, provider_id: str, role: str) -> None:
        self.localpart, self.provider_id, self.role = localpart, provider_id, role
        self.client: Client | None = None
        self.task: asyncio.Task | None = None


class Media:
    """The media clients of a run and their counters; the ``chat.Beside`` of its chat window."""

    def __init__(self, run: Run, gateway) -> None:
        scenario = run.scenario
        self.run, self.gateway, self.scenario = run, gateway, scenario
        first = 0 if scenario.media_only else scenario.users  # after the chat's users
        clients = scenario.media_uploaders + scenario.media_downloaders
        try:
            people = gateway.addresses(first + clients)[first:]
        except ConfigError as exc:  # a remote gateway's tokens file
            raise ConfigError(f"{exc}: the {clients} media clients are users of their own, after the {first} chat users") from None
        self.uploaders = [_Slot(*person, "up") for person in people[:scenario.media_uploaders]]
        self.downloaders = [_Slot(*person, "down") for person in people[scenario.media_uploaders:]]
        self.bytes = BlobBytes(int(scenario.media_blob_mib * 2**20))
        self.uploaded = 0  # bytes the gateway acknowledged (have)
        self.downloaded = 0  # bytes received
        self.blobs_ready = 0  # uploads completed (the seed not counted)
        self.downloads = 0  # downloads completed
        self.mismatched_chunks = 0
        self.errors: collections.Counter = collections.Counter()
        self.ready_hist = new_histogram()  # last chunk sent -> ready, of the uploads completed in the window
        self.pool: list[tuple[bytes, BlobContent]] = []  # ready blobs, oldest first
        self.limits: dict = {}
        self.running = False
        self.window: tuple[list, float] | None = None  # (increases, seconds), once the window ended
        self.finished_after_window = 0

    @property
    def slots(self) -> list[_Slot]:
        return self.uploaders + self.downloaders

    # -- chat.Beside

    def read(self) -> tuple:
        return self.uploaded, self.downloaded, self.blobs_ready, self.downloads

    def window_ended(self, increases: list, seconds: float) -> None:
        """No new blob from now on; downloads are cut, uploads under way finish (``finish``)."""
        self.window = (increases, seconds)
        self.running = False
        for slot in self.downloaders:
            if slot.task is not None:
                slot.task.cancel()

    # -- the phases

    async def connect(self) -> None:
        """Connect every media client, check that the gateway serves blobs this large, and upload
        the seed blob."""
        await gather_bounded([self._connect(slot) for slot in self.slots])
        limits = self.slots[0].client.limits
        if type(limits.get("blob_chunk")) is not int or type(limits.get("blob_in_flight")) is not int:
            raise ConfigError("the gateway does not serve blobs (no blob limits in its welcome): no media kind")
        blob_max = limits.get("blob_max")
        if type(blob_max) is int and self.bytes.size > blob_max:
            raise ConfigError(f"scenario {self.scenario.name!r}: media_blob_mib {self.scenario.media_blob_mib} is over the "
                              f"gateway's limits.blob_max ({blob_max / 2**20:g} MiB)")
        self.limits = {key: limits.get(key) for key in ("blob_max", "blob_chunk", "blob_in_flight")}
        seeder = self.uploaders[0] if self.uploaders else self.downloaders[0]
        content = self.bytes.content(len(self.uploaders))  # a mark no uploader has
        try:
            blob = await seeder.client.upload_blob(content)
        except (InterlinkError, OSError, TimeoutError) as exc:
            raise ConfigError(f"the seed blob could not be uploaded: {_code(exc)}: {exc}") from exc
        self.pool.append((blob, content))

    async def _connect(self, slot: _Slot) -> None:
        gateway = self.gateway
        slot.client = await Client.connect(gateway.host, gateway.port, token=gateway.token(slot.localpart, slot.provider_id),
                                           device=1, root_public=gateway.root_public, timeout_s=CONNECT_TIMEOUT_S)

    def start(self) -> None:
        self.running = True
        loop = asyncio.get_running_loop()
        for index, slot in enumerate(self.uploaders):
            slot.task = loop.create_task(self._uploads(slot, self.bytes.content(index)))
        for slot in self.downloaders:
            slot.task = loop.create_task(self._downloads(slot))

    async def _uploads(self, slot: _Slot, content: BlobContent) -> None:
        while self.running:
            upload, acked = _Upload(content), 0

            def progress(have: int, size: int) -> None:
                nonlocal acked
                if have > acked:
                    self.uploaded += have - acked
                    acked = have

            try:
                blob = await slot.client.upload_blob(upload, progress=progress)
            except (InterlinkError, OSError, TimeoutError) as exc:
                await self._failed(slot, exc)
                continue
            now_ns = time.perf_counter_ns()
            if self.window is None:
                self.blobs_ready += 1
                if now_ns >= self.run.record_from_ns:
                    record_latency(self.ready_hist, now_ns - upload.last_chunk_ns)
            else:
                self.finished_after_window += 1
            self.pool.append((blob, content))

    async def _downloads(self, slot: _Slot) -> None:
        while self.running:
            blob, content = self.pool[-1]  # the newest ready blob, as a recipient fetches a fresh attachment
            check = _Check(self, content)
            try:
                size = await slot.client.download_blob(blob, check)
            except (InterlinkError, OSError, TimeoutError) as exc:
                await self._failed(slot, exc)
                continue
            if size != content.size or check.offset != content.size:
                self.mismatched_chunks += 1  # a short (or long) blob
            self.downloads += 1

    async def _failed(self, slot: _Slot, exc: BaseException) -> None:
        """Count a media error; pause (as long as the gateway asked, if it did); reconnect a client
        whose session ended."""
        self.errors[_code(exc)] += 1
        retry_after = getattr(exc, "fields", {}).get("retry_after") if isinstance(exc, ServerError) else None
        await asyncio.sleep(retry_after / 1000 if type(retry_after) is int and 0 < retry_after <= 60_000 else ERROR_PAUSE_S)
        if self.running and (slot.client is None or slot.client.closed):
            try:
                await self._connect(slot)
            except (InterlinkError, OSError, TimeoutError) as error:
                self.errors[f"connect {_code(error)}"] += 1

    async def finish(self) -> None:
        """After the window: the uploads under way finish (within the tail's timeout, then cut)."""
        tasks = [slot.task for slot in self.uploaders if slot.task is not None and not slot.task.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=TAIL_TIMEOUT_S)
            for task in late:
                task.cancel()

    async def stop(self) -> None:
        """Cancel whatever still runs (a run cancelled or failed midway) and close the clients."""
        self.running = False
        tasks = [slot.task for slot in self.slots if slot.task is not None]
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(slot.client.close() for slot in self.slots if slot.client is not None),
                             return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if failures:
            raise failures[0]

    def report(self) -> dict:
        """The report's ``media``: the window's figures, the run's totals, the verdict's reasons."""
        increases, seconds = self.window or ([0, 0, 0, 0], 0.0)
        uploaded, downloaded, blobs, downloads = increases
        ready = percentiles_ms(self.ready_hist)
        failed = {code: count for code, count in self.errors.items() if code not in REFUSALS}
        failed_because = []
        if failed:
            failed_because.append(f"media errors {failed}")
        if self.mismatched_chunks:
            failed_because.append(f"{self.mismatched_chunks} downloaded chunks differ from the bytes uploaded")
        scenario = self.scenario
        return {
            "chat": not scenario.media_only,
            "uploaders": len(self.uploaders), "downloaders": len(self.downloaders),
            "blob_mib": scenario.media_blob_mib, "blob_bytes": self.bytes.size,
            "chunk_bytes": self.limits.get("blob_chunk"), "in_flight": self.limits.get("blob_in_flight"),
            "blob_max_bytes": self.limits.get("blob_max"),
            "blob_kib_per_s_per_user": "the gateway's own" if self.gateway.remote
            else scenario.blob_kib_per_s_per_user or "lifted",
            "window_s": round(seconds, 3),
            "upload_mb_per_s": round(uploaded / MB / seconds, 1) if seconds else None,
            "download_mb_per_s": round(downloaded / MB / seconds, 1) if seconds else None,
            "uploaded_bytes": uploaded, "downloaded_bytes": downloaded,
            "blobs_completed": blobs, "downloads_completed": downloads,
            "ready_after_last_chunk_ms": {"p50": ready["p50"], "max": ready["max"], "count": ready["count"]} if ready else None,
            "totals": {
                "uploaded_bytes": self.uploaded, "downloaded_bytes": self.downloaded,
                "blobs_completed": self.blobs_ready + self.finished_after_window,
                "finished_after_window": self.finished_after_window, "seed_blobs": 1 if self.pool else 0,
                "downloads_completed": self.downloads,
            },
            "errors_by_code": dict(self.errors),
            "mismatched_chunks": self.mismatched_chunks,
            "failed_because": failed_because,
        }


def _code(exc: BaseException) -> str:
    """A media error as a code: the gateway's err code, ``session_closed``, else the exception's class."""
    if isinstance(exc, ServerError):
        return str(exc.code)
    if isinstance(exc, SessionClosedError):
        return "session_closed"
    return type(exc).__name__


class MediaTicker(Ticker):
    """The per-second progress, with the media's bytes (and ready blobs) in every sample and line."""

    def __init__(self, run: Run, out: Callable[[str], None] | None, media: Media) -> None:
        super().__init__(run, out)
        self.media = media

    def _sample(self) -> dict:
        sample = super()._sample()
        media = self.media
        sample.update(media_up_bytes=media.uploaded, media_down_bytes=media.downloaded, blobs_ready=media.blobs_ready)
        return sample

    def _line(self, sample: dict, previous: dict) -> str:
        seconds = sample["t_s"] - previous["t_s"]

        def rate(key: str) -> float:
            return (sample[key] - previous.get(key, 0)) / MB / seconds if seconds > 0 else 0.0

        media = (f"up {rate('media_up_bytes'):.1f} MB/s down {rate('media_down_bytes'):.1f} MB/s "
                 f"blobs {sample['blobs_ready']} (+{sample['blobs_ready'] - previous.get('blobs_ready', 0)})")
        if self.run.scenario.media_only:
            return f"{sample['t_s']:6.1f}s {sample['phase']:<6} {media}"
        return f"{super()._line(sample, previous)}  {media}"


async def _media_phases(run: Run, gateway, devices: list, ticker: Ticker, out: Callable[[str], None] | None,
                        media: Media) -> dict:
    """Media clients connected and the seed uploaded, then the chat window with the media beside it."""
    try:
        await media.connect()
        media.start()
        phases = await chat_window(run, gateway, devices, ticker, out, None, beside=media)
        await media.finish()
    finally:
        await media.stop()
    phases["media"] = media.report()
    return phases


async def run_media(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                    pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """Run a ``media`` scenario against a local gateway (or ``target``, a remote one); the
    report has the chat kind's keys plus ``media`` (``ok`` False when a chat message is
    unexplained, or a media error or a differing byte fails it)."""
    scenario.validate()
    run = Run(scenario)
    gateway_cpu = pin_cpus(pin, target)
    async with open_gateway(scenario, data_dir=data_dir, target=target, cpu=gateway_cpu) as gateway:
        devices = [] if scenario.media_only else make_devices(run, gateway)
        media = Media(run, gateway)
        ticker = MediaTicker(run, out, media)
        phases, drain = await drive_devices(run, gateway, devices, ticker,
                                            lambda: _media_phases(run, gateway, devices, ticker, out, media))
        where = gateway_info(gateway, scenario, None, gateway_cpu, run)
    accounting = account(run)
    accounting["accounting_drain"] = drain
    media_report = phases.pop("media")
    report = {
        **report_head(scenario, where),
        **phases,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **report_tail(run, accounting, ticker),
        "e2ee": e2ee_report(run.e2ee_stats, run.sent),
        "media": media_report,
    }
    report["latency_ms"]["blob_ready"] = percentiles_ms(media.ready_hist)  # last chunk sent -> ready
    report["histograms"]["blob_ready"] = media.ready_hist.encode().decode("ascii")
    report["ok"] = (report["ok"] and report["e2ee"].get("failures", 0) == 0 and not media_report["failed_because"])
    return report
