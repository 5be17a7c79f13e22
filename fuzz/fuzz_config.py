"""Fuzz harness ``config``: the gateway's TOML configuration and its ``INTERLINK_*`` overrides
(``interlink.config``: ``load_config``, ``config_from_mapping``).

Layout (``atheris.FuzzedDataProvider``; ints come from the end of the input): a mode, up to four
environment variables (a name from ``ENV_NAMES`` — every ``INTERLINK_<KEY>``, the excluded and
misspelt ones, an unrelated one — and a value length), the TOML text's length; then the TOML
bytes and the variables' values (decoded as the process environment is: UTF-8 with
``surrogateescape``). Modes 0–2 write the TOML bytes to a file in a temporary folder and call
``load_config(path, environ=...)``; mode 3 parses them with ``tomllib`` (when they are TOML) and
calls ``config_from_mapping``.

Properties:

* the only error is ``ConfigError`` with code ``config``; its message says the file is not
  valid TOML, or starts with the key it is about (a configuration key, ``providers[i].key``, the
  variable's name, the unknown key as written) or names the provider field it is about;
* a configuration that loads passes ``validate()`` again, holds only finite numbers (every
  number is a limit or a duration: an infinite one is no bound), and round-trips: its keys written
  as ``default_config_toml`` writes values (``interlink.config._toml_value``), parsed again
  with the same providers, give an equal configuration (strings holding lone surrogates, which an
  environment can carry but TOML cannot, are left out of the round trip);
* no state leaks: a fixed valid mapping and environment load to the same configuration after
  every input.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

if __name__ == "__main__":
    import atheris

    # tomllib too: its coverage steers the fuzzer to richer TOML, and so deeper into the loader.
    instrumenting = atheris.instrument_imports(include=["interlink", "tomllib"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import tomllib

    import fuzzlib
    from interlink.config import GatewayConfig, _toml_value, config_from_mapping, load_config
    from interlink.core.domain.auth import Provider
    from interlink.core.errors import ConfigError

MAX_ENV = 4
CONFIG_KEYS = tuple(spec.name for spec in fields(GatewayConfig))
PROVIDER_KEYS = tuple(spec.name for spec in fields(Provider))
ENV_NAMES = tuple(f"INTERLINK_{key.upper()}" for key in CONFIG_KEYS) + (
    "INTERLINK_PURE", "INTERLINK_CONFIG", "INTERLINK_PROT", "INTERLINK_", "INTERLINK_port", "HOME",
    "INTERLINK_CLUSTER_NODE",
)
_PROVIDER_KEY = re.compile(r"providers\[\d+\](\.|: )")
_CLUSTER_KEY = re.compile(r"cluster\.")


def _temporary_folder() -> Path:
    """A folder for the fuzzed file. libFuzzer ends the process without running ``atexit``, so
    folders of processes that are gone are removed here, and the atexit cleanup serves the tests."""
    prefix = "interlink-fuzz-config-"
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        try:
            os.kill(int(old.name[len(prefix) :].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):  # not one of ours, or a live process of another user
            continue
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


PATH = _temporary_folder() / "interlink.toml"

VALID_MAPPING = {
    "port": 7460, "window": 128, "drain_timeout_s": 2.5, "data_dir": "/srv/interlink",
    "providers": [{"id": "alpha", "issuer": "https://id.alpha.example", "audience": "interlink", "discovery": True}],
}
VALID_ENV = {"INTERLINK_DURABILITY": "async", "INTERLINK_MAX_DEVICES": "9", "HOME": "/root"}
EXPECTED = config_from_mapping(VALID_MAPPING, environ=VALID_ENV)
assert (EXPECTED.port, EXPECTED.durability, EXPECTED.max_devices) == (7460, "async", 9)


def _names_a_key(message: str, data: dict, environ: dict) -> bool:
    """True if an error message says what it is about, as the loader promises."""
    if "not valid TOML" in message:
        return True
    subjects = (*CONFIG_KEYS, "providers", *environ, *(key for key in data if isinstance(key, str)))
    if (any(message.startswith(f"{subject}: ") for subject in subjects) or _PROVIDER_KEY.match(message)
            or _CLUSTER_KEY.match(message)):
        return True
    # Provider's own checks: "provider 'alpha': issuer ..." names the field in the sentence.
    return message.startswith("provider") and any(re.search(rf"\b{key}\b", message) for key in PROVIDER_KEYS)


def _render(config: GatewayConfig) -> str | None:
    """The configuration's keys (but providers and cluster) as ``default_config_toml`` writes values; None if
    a string holds a lone surrogate (TOML is UTF-8: such a value cannot be written at all)."""
    lines = []
    for spec in fields(config):
        if spec.name in ("providers", "cluster"):
            continue
        value = getattr(config, spec.name)
        text = _toml_value(value)
        if isinstance(value, (str, Path)) and any(0xD800 <= ord(c) <= 0xDFFF for c in str(value)):
            return None
        lines.append(f"{spec.name} = {text}")
    return "\n".join(lines) + "\n"


def _check_loaded(config: GatewayConfig, providers: list, where: str, tables: dict | None = None) -> None:
    """``tables``: the [cluster] table (and the environment's node override) it was loaded with."""
    try:
        config.validate()
    except ConfigError as exc:
        raise AssertionError(f"{where}: a loaded configuration fails validate(): {exc}") from exc
    for spec in fields(config):
        value = getattr(config, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise AssertionError(f"{where}: configuration loaded with {spec.name} = {value!r}")
    text = _render(config)
    if text is None:
        return
    try:
        again = config_from_mapping({**tomllib.loads(text), "providers": providers, **(tables or {}).get("data", {})},
                                    environ=(tables or {}).get("environ", {}))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise AssertionError(f"{where}: the configuration written as TOML does not load again: {exc}\n{text}"[:1200]) from exc
    if again != config:
        changed = [s.name for s in fields(config) if getattr(config, s.name) != getattr(again, s.name)]
        raise AssertionError(f"{where}: written and read again, the configuration changed in {changed}")


def check(data: bytes) -> None:
    fdp = fuzzlib.provider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    variables = []
    for _ in range(fdp.ConsumeIntInRange(0, MAX_ENV)):
        variables.append((ENV_NAMES[fdp.ConsumeIntInRange(0, len(ENV_NAMES) - 1)], fdp.ConsumeIntInRange(0, 255)))
    text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 0xFFFF))
    environ = {name: fdp.ConsumeBytes(size).decode("utf-8", "surrogateescape") for name, size in variables}
    where = f"input {fuzzlib.short(data)} (mode {mode})"

    try:
        parsed = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):  # not TOML: no keys to name
        parsed = None
    try:
        if mode < 3:
            PATH.write_bytes(text)
            config = load_config(PATH, environ=environ)
        else:
            config = config_from_mapping(parsed or {}, environ=environ)
    except Exception as exc:  # judged: only ConfigError (code "config") may come out
        fuzzlib.check_error(exc, (ConfigError,), where)
        if not _names_a_key(str(exc), parsed or {}, environ):
            raise AssertionError(f"{where}: ConfigError names no key: {str(exc)[:300]!r}") from exc
    else:
        providers = (parsed or {}).get("providers", [])
        tables = {"data": {"cluster": parsed["cluster"]}} if parsed and "cluster" in parsed else {"data": {}}
        if "INTERLINK_CLUSTER_NODE" in environ:
            tables["environ"] = {"INTERLINK_CLUSTER_NODE": environ["INTERLINK_CLUSTER_NODE"]}
        _check_loaded(config, providers, where, tables)

    again = config_from_mapping(VALID_MAPPING, environ=VALID_ENV)
    if again != EXPECTED:
        raise AssertionError(f"{where}: afterwards the fixed valid configuration loaded differently")


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
