"""What the fuzz harnesses share: the contract's error codes, outcome capture for comparing the
compiled and pure twins, and the byte layout of seeds read through ``atheris.FuzzedDataProvider``.

Importing this module needs neither atheris nor interlink: ``provider`` imports atheris when a
harness first reads an input, and the error checks import ``interlink.core.errors`` when first
used, so a harness can import this module inside its ``atheris.instrument_imports()`` block.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO_ROOT = FUZZ_DIR.parent

# Wire error codes: the table of docs/protocol.md §5, plus ``bad_hash`` from the original contract's
# list (PROTOCOL.md §4, blobs). tests/test_fuzz.py checks this set against docs/protocol.md.
CONTRACT_CODES = frozenset(
    {
        "bad_frame", "bad_stanza", "too_large", "auth_failed", "token_expired", "unknown_issuer",
        "bad_signature", "bad_audience", "key_binding", "provider_suspended", "device_limit",
        "unknown_recipient", "not_opted_in", "device_mismatch", "not_member", "not_admin", "not_found",
        "mailbox_full", "rate_limited", "overloaded", "internal", "bad_hash",
    }
)
CONFIG_CODE = "config"  # ConfigError's code: the configuration loader's only error

# Every way a server connection may end (docs/protocol.md §5, "Every connection the gateway ends
# has a named reason"): the bye reasons and the operator-visible close reasons.
BYE_REASONS = frozenset({"drain", "replaced", "suspended", "auth_expired", "idle", "slow_consumer", "protocol_error",
                         "redirect"})
CLOSE_REASONS = BYE_REASONS | {
    "bad_preamble", "unknown_suite", "handshake_failed", "bad_frame", "auth_failed", "auth_deadline",
    "peer_closed", "over_capacity", "source_limit", "bad_proxy_header", "bad_upgrade", "internal_error",
}


def provider(data: bytes):
    """An ``atheris.FuzzedDataProvider`` over ``data`` (atheris is imported on first use only).

    Its layout, which ``encode_ints`` writes for seeds: ``ConsumeIntInRange`` takes bytes from the
    END of the input, ``ConsumeBytes`` from the front."""
    import atheris

    return atheris.FuzzedDataProvider(data)


def encode_ints(spec) -> bytes:
    """The input tail that makes ``ConsumeIntInRange(lo, hi)`` return ``value`` for each
    ``(lo, hi, value)`` of ``spec``, in the order they are consumed (seed writers put it after the
    bytes the harness takes with ``ConsumeBytes``). libFuzzer's layout: an int takes as many bytes
    as its range needs, from the end of the data, the most significant byte first."""
    tail = b""
    for lo, hi, value in spec:
        span, offset = hi - lo, value - lo
        if not 0 <= offset <= span:
            raise ValueError(f"{value} is not in {lo}..{hi}")
        width = 0
        while width < 8 and span >> (8 * width):
            width += 1
        tail = offset.to_bytes(width, "little") + tail  # later ints sit further from the end
    return tail


def short(data: bytes, limit: int = 96) -> str:
    """Hex of an input for a message (the crash artifact keeps the whole input)."""
    text = bytes(data).hex()
    return text if len(text) <= limit else f"{text[:limit]}… ({len(data)} bytes)"


class Raised:
    """An exception as the twins are compared on it: type, message and the partial results
    attached to it (``frames`` of a FrameError, ``stanzas`` of a StanzaError)."""

    __slots__ = ("error", "kind", "message", "partial")

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.kind = type(error)
        self.message = str(error)
        self.partial = {name: getattr(error, name) for name in ("frames", "stanzas") if hasattr(error, name)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Raised):
            return NotImplemented
        # By class identity: a twin raising a look-alike class of its own is a disagreement.
        return (self.kind, self.message, self.partial) == (other.kind, other.message, other.partial)

    def __repr__(self) -> str:
        partial = "".join(f" {name}={value!r}"[:200] for name, value in self.partial.items())
        return f"{self.kind.__name__}({self.message!r}){partial}"


def outcome(function, *args):
    """``("ok", result)`` or ``("raised", Raised)``: what ``function(*args)`` did, for comparing
    two twins on the same call. Any exception is captured here; the caller then decides with
    ``check_error`` whether that kind of error was allowed at all."""
    try:
        return ("ok", function(*args))
    except Exception as exc:  # captured to compare twins; judged by check_error afterwards
        return ("raised", Raised(exc))


def check_error(error: BaseException, allowed: tuple, where: str) -> None:
    """Raise AssertionError unless ``error`` is one of the ``allowed`` project errors and carries
    a contract code (``config`` for ConfigError and nothing else)."""
    from interlink.core.errors import ConfigError, InterlinkError

    if not isinstance(error, InterlinkError):
        raise AssertionError(f"{where}: {type(error).__name__}({error}) escaped, not an InterlinkError") from error
    if not isinstance(error, allowed):
        names = ", ".join(kind.__name__ for kind in allowed)
        raise AssertionError(f"{where}: raised {type(error).__name__}({error}), expected only {names}") from error
    if isinstance(error, ConfigError):
        if error.code != CONFIG_CODE:
            raise AssertionError(f"{where}: ConfigError with code {error.code!r}, not {CONFIG_CODE!r}") from error
    elif error.code not in CONTRACT_CODES:
        raise AssertionError(f"{where}: {type(error).__name__} with code {error.code!r}, not a contract code") from error


def store_folder(prefix: str) -> str:
    """A new temporary folder for a harness process's stores, named ``<prefix><pid>-...``; first
    the folders of harness processes that are gone are removed (libFuzzer ends a process without
    running ``atexit``)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")):
        pid = os.path.basename(path)[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


class LogRecords(logging.Handler):
    """Keeps the log records of ``level`` and above that a harness's input caused (attached to the
    "interlink" logger while it is served)."""

    def __init__(self, level: int) -> None:
        super().__init__(level=level)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
