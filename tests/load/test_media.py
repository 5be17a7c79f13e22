"""The media kind (``interlink.load.media``): short runs against a real local gateway (child
process, demo OpenID issuers, SDK clients uploading and downloading blobs over Noise) beside the
chat kind's traffic, its report (JSON and text), the media alone, a run cancelled midway, the
lifted blob limits, and the scenario values it refuses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.load.child import LIFTED_BLOB_LIMITS, child_arguments
from interlink.load.media import BlobBytes, run_media
from interlink.load.report import format_report
from interlink.load.scenario import SCENARIO_DIR
from interlink.load.target import LocalGateway, RemoteGateway

from .helpers import cancel_after, check_report, our_tasks, scenario

MEDIA_KEYS = {
    "chat", "uploaders", "downloaders", "blob_mib", "blob_bytes", "chunk_bytes", "in_flight", "blob_kib_per_s_per_user",
    "window_s", "upload_mb_per_s", "download_mb_per_s", "uploaded_bytes", "downloaded_bytes", "blobs_completed",
    "downloads_completed", "ready_after_last_chunk_ms", "totals", "errors_by_code", "mismatched_chunks", "failed_because",
}


def _media_file(folder: Path, **keys) -> Path:
    """A media scenario file: a short run with small blobs, ``keys`` added (TOML literals)."""
    lines = ['kind = "media"', "users = 4", "rate = 300", "duration = 2.0", "warmup = 0.3", "media_blob_mib = 2.0"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    path = folder / "media-short.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_media_beside_chat_cli_json(tmp_path: Path) -> None:
    """Uploads and downloads run beside the chat: MB/s both ways, blobs completed, every byte
    downloaded equal to the bytes uploaded, and the chat reported as the chat kind reports it,
    every message delivered once."""
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, ["load", str(_media_file(tmp_path)), "--no-pin", "--quiet", "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = check_report(json.loads(path.read_text()))  # the chat kind's keys and accounting, every message explained
    assert report["scenario"]["kind"] == "media" and report["scenario"]["media_uploaders"] == 2
    media = report["media"]
    assert MEDIA_KEYS <= media.keys(), MEDIA_KEYS - media.keys()
    assert media["upload_mb_per_s"] > 0 and media["download_mb_per_s"] > 0
    assert media["blobs_completed"] > 0 and media["downloads_completed"] > 0
    assert media["uploaded_bytes"] > 0 and media["downloaded_bytes"] > 0
    assert media["errors_by_code"] == {} and media["mismatched_chunks"] == 0 and media["failed_because"] == []
    assert media["blob_bytes"] == 2 * 2**20 and media["chat"] is True and media["blob_kib_per_s_per_user"] == "lifted"
    assert media["totals"]["seed_blobs"] == 1 and media["totals"]["blobs_completed"] >= media["blobs_completed"]
    ready = media["ready_after_last_chunk_ms"]
    assert ready["count"] > 0 and 0 < ready["p50"] <= ready["max"]
    assert report["latency_ms"]["blob_ready"]["count"] == ready["count"] and report["histograms"]["blob_ready"]
    accounting = report["accounting"]
    assert accounting["lost"] == 0 and accounting["duplicates"] == 0 and accounting["unexplained"] == 0
    assert accounting["delivered"] == accounting["sent"] == report["counts"]["delivered"] > 0
    assert report["throughput_per_s"]["delivered"] > 0 and report["latency_ms"]["delivery"]["count"] > 0
    assert report["server"]["cpu_busy"] > 0 and report["server"]["rss_bytes"] > 0
    assert report["timeline"][-1]["media_up_bytes"] > 0 and report["timeline"][-1]["media_down_bytes"] > 0
    for line in ("media: 2 uploaders, 2 downloaders, blobs of 2 MiB", "beside the chat): upload ",
                 "downloads checked byte for byte: all equal", "blob_ready latency ms:", "result: OK"):
        assert line in result.output, (line, result.output)


async def test_media_only_has_no_chat() -> None:
    lines: list[str] = []
    alone = scenario("media", media_only=True, media_uploaders=1, media_downloaders=1, media_blob_mib=1.0,
                     duration=1.5, warmup=0.3)
    report = json.loads(json.dumps(await run_media(alone, out=lines.append)))
    assert report["ok"] is True and report["counts"]["sent"] == 0 and report["accounting"]["unexplained"] == 0
    media = report["media"]
    assert media["chat"] is False and media["upload_mb_per_s"] > 0 and media["download_mb_per_s"] > 0
    assert any(" up " in line and " down " in line and "sent" not in line for line in lines), lines
    assert "media only (no chat)" in format_report(report)


async def test_media_run_cancelled_leaves_nothing_running() -> None:
    """Ctrl-C midway: the upload and download tasks end with the run (and the gateway with them)."""
    lines: list[str] = []
    before = asyncio.all_tasks()
    long = scenario("media", users=2, rate=100, media_uploaders=1, media_downloaders=1, media_blob_mib=1.0,
                    duration=60.0, warmup=0.1)
    task = asyncio.get_running_loop().create_task(run_media(long, out=lines.append))
    for _ in range(300):
        if any(" up " in line for line in lines):
            break
        await asyncio.sleep(0.05)
    assert any(" up " in line for line in lines), lines
    await cancel_after(task, 0.0)
    assert our_tasks(before) == []


async def test_media_against_a_remote_target(tmp_path: Path) -> None:
    """``--target``: the media clients are the tokens file's users after the chat's; no server figures."""
    async with LocalGateway(2, tmp_path / "gw") as gateway:
        tokens = tmp_path / "tokens.txt"
        tokens.write_text("".join(f"{localpart}@{pid} {gateway.token(localpart, pid)}\n"
                                  for localpart, pid in gateway.addresses(6)))
        remote = RemoteGateway(f"127.0.0.1:{gateway.port}", gateway.root_public.hex(), tokens)
        media = scenario("media", users=4, rate=200, media_uploaders=1, media_downloaders=1, media_blob_mib=1.0,
                         duration=1.2, warmup=0.2)
        report = json.loads(json.dumps(await run_media(media, out=None, target=remote)))
        with pytest.raises(ConfigError, match="tokens file has 6"):
            await run_media(scenario("media", users=6, media_blob_mib=1.0, duration=1.0, warmup=0.2), out=None,
                            target=remote)
    assert report["ok"] is True and report["gateway"]["target"] == f"127.0.0.1:{gateway.port}"
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] > 0
    assert report["media"]["upload_mb_per_s"] > 0 and report["media"]["download_mb_per_s"] > 0
    assert report["media"]["blob_kib_per_s_per_user"] == "the gateway's own" and report["server"]["cpu_s"] is None
    assert "remote gateway 127.0.0.1:" in format_report(report)


def test_blob_limits_lifted_unless_the_scenario_sets_them(tmp_path: Path) -> None:
    assert LocalGateway(2, tmp_path).settings["blob_kib_per_s_per_user"] == LIFTED_BLOB_LIMITS["blob_kib_per_s_per_user"]
    assert LocalGateway(2, tmp_path, blob_kib_per_s_per_user=4096).settings["blob_kib_per_s_per_user"] == 4096
    arguments = child_arguments(**LIFTED_BLOB_LIMITS)
    assert "--blob-kib-per-s-per-user" in arguments and "--blob-daily-bytes-per-user" in arguments
    # Each uploader's blobs end in a mark of its own: a download is checked against the blob it asked for.
    blobs = BlobBytes(100_000)
    one, two = blobs.content(0), blobs.content(1)
    assert one.sha256 != two.sha256 and one.read(0, 100_000) != two.read(0, 100_000)
    assert one.read(99_990, 64) == one.read(0, 100_000)[99_990:] and len(one.read(99_995, 64)) == 5


def test_media_scenario_file_and_bad_values(tmp_path: Path) -> None:
    media = scenario("media")
    assert (media.kind, media.media_uploaders, media.media_downloaders, media.media_blob_mib) == ("media", 2, 2, 16.0)
    assert (SCENARIO_DIR / "media.toml").is_file() and media.blob_kib_per_s_per_user is None
    with pytest.raises(ConfigError, match=r"media_uploaders must be 0\.\.1000, got -1"):
        scenario("media", media_uploaders=-1)
    with pytest.raises(ConfigError, match="media_downloaders must be"):
        scenario("media", media_downloaders=-2)
    with pytest.raises(ConfigError, match="at least one media client"):
        scenario("media", media_uploaders=0, media_downloaders=0)
    with pytest.raises(ConfigError, match="media_blob_mib must be"):
        scenario("media", media_blob_mib=0)
    with pytest.raises(ConfigError, match="blob_kib_per_s_per_user must be"):
        scenario("media", blob_kib_per_s_per_user=10)
    with pytest.raises(ConfigError, match="media_only"):
        scenario("media", media_only=True, e2ee=True)
    with pytest.raises(ConfigError, match="media_uploaders is not used by the chat kind"):
        scenario("chat-1to1", media_uploaders=1)
    with pytest.raises(ConfigError, match="wrong type"):
        scenario("media", media_uploaders=1.5)
    # On the command line: a scenario file with a bad value, and the options the media kind refuses.
    result = CliRunner().invoke(cli_main, ["load", str(_media_file(tmp_path, media_uploaders=-1)), "--no-pin"])
    assert result.exit_code == 1 and "media_uploaders must be 0..1000, got -1" in result.output, result.output
    result = CliRunner().invoke(cli_main, ["load", "media", "--kill-at", "1", "--no-pin"])
    assert result.exit_code == 1 and "--kill-at is not supported by the media scenario" in result.output, result.output
    result = CliRunner().invoke(cli_main, ["load", "media", "--peer", "nats", "--no-pin"])
    assert result.exit_code == 1 and "not 'media'" in result.output, result.output
