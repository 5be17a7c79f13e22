"""The TOML configuration file, its environment overrides and ``interlink check-config`` /
``default-config``: every mistake is answered with the key and what is wrong."""

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from interlink.cli import main
from interlink.config import OPTION_HELP, GatewayConfig, NodeAddress, config_from_mapping, default_config_toml, load_config
from interlink.core.errors import ConfigError

PROVIDER = '''
[[providers]]
id = "alpha"
issuer = "https://id.alpha.example"
audience = "interlink"
discovery = true
default_accept = ["beta"]
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "interlink.toml"
    path.write_text(text)
    return path


def refusal(tmp_path, text: str, environ=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=environ or {})
    return str(caught.value)


def test_a_file_sets_keys_and_providers(tmp_path):
    config = load_config(write(tmp_path, 'port = 7460\nwindow = 128\ndata_dir = "/srv/interlink"\n' + PROVIDER), environ={})
    assert (config.port, config.window, config.data_dir) == (7460, 128, Path("/srv/interlink"))
    [provider] = config.providers
    assert (provider.id, provider.discovery, provider.default_accept) == ("alpha", True, ("beta",))
    assert config.max_devices == GatewayConfig().max_devices  # untouched keys keep their defaults


def test_default_config_lists_every_key_and_loads_to_the_defaults():
    assert set(OPTION_HELP) == {spec.name for spec in fields(GatewayConfig)}
    text = default_config_toml()
    for spec in fields(GatewayConfig):
        if spec.name not in ("providers", "cluster"):
            assert f"\n{spec.name} = " in text
    assert config_from_mapping(tomllib.loads(text), environ={}) == GatewayConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("prot = 7450", "prot: unknown key (did you mean 'port'?)"),
        ('port = "7450"', "port: expected int, got str '7450'"),
        ("port = 70000", "port: must be 0..65535, got 70000"),
        ("window = 2.5", "window: expected int, got float 2.5"),
        ("durability = true", "durability: expected str, got bool True"),
        ('durability = "fast"', "durability: must be 'sync' or 'async', got 'fast'"),
        ("data_dir = 5", "data_dir: expected a folder path (str), got an integer 5"),
        ('data_dir = ""', "data_dir: expected a folder path (str), got a string ''"),
        ("providers = 3", "providers: expected [[providers]] tables, got an integer 3"),
        (PROVIDER + "colour = 1\n", "providers[0].colour: unknown key"),
        ('[[providers]]\nid = "alpha"\naudience = "x"\n', "providers[0].issuer: required"),
        (PROVIDER.replace('default_accept = ["beta"]', 'default_accept = "beta"'),
         "providers[0].default_accept: expected a list of strings, got a string 'beta'"),
        (PROVIDER.replace("discovery = true", 'discovery = "yes"'), "providers[0].discovery: expected true or false"),
        (PROVIDER.replace('id = "alpha"', 'id = "Alpha!"'), "provider 'Alpha!': id must match"),
        (PROVIDER + PROVIDER.replace("id.alpha", "id.other"), "providers: id 'alpha' is used by more than one provider"),
        (PROVIDER + 'push_url = "http://push.alpha.example/hook"\n',
         "provider 'alpha': push_url 'http://push.alpha.example/hook' must use https"),
        (PROVIDER + 'push_url = "https://push.alpha.example/hook?key=1"\n', "must not have a query or fragment"),
        (PROVIDER + "push_url = 5\n", "provider 'alpha': push_url must be a non-empty URL string"),
        (PROVIDER + "push_timeout_s = 0\n", "provider 'alpha': push_timeout_s must be a number of seconds in (0, 60]"),
        (PROVIDER + "push_concurrency = 0\n", "provider 'alpha': push_concurrency must be an integer 1..1024"),
        (PROVIDER + 'push_uri = "https://push.alpha.example"\n',
         "providers[0].push_uri: unknown key (did you mean 'push_url'?)"),
    ],
)
def test_each_mistake_names_the_key(tmp_path, text, message):
    assert message in refusal(tmp_path, text)


CLUSTER = """
[cluster]
node = "node-a"
version = 3
nats = ["nats://10.0.0.9:4222"]
[cluster.nodes]
node-a = "10.0.0.1:7450"
node-b = { address = "[fd00::2]:7451", ws = "wss://b.chat.example/interlink" }
"""


def test_a_cluster_table_names_this_node_every_node_and_nats(tmp_path):
    config = load_config(write(tmp_path, CLUSTER), environ={})
    cluster = config.cluster
    assert (cluster.node, cluster.version, cluster.nats, cluster.request_timeout_s) == ("node-a", 3, ("nats://10.0.0.9:4222",), 2.0)
    assert cluster.nodes["node-b"] == NodeAddress("fd00::2", 7451, "wss://b.chat.example/interlink")
    assert cluster.membership.nodes == ("node-a", "node-b") and cluster.membership.version == 3
    # One file for every node: the environment says which one this process is.
    other = load_config(write(tmp_path, CLUSTER), environ={"INTERLINK_CLUSTER_NODE": "node-b"})
    assert other.cluster.node == "node-b" and other.cluster.digest == cluster.digest
    # The digest covers the addresses and the version, not only the ids.
    moved = load_config(write(tmp_path, CLUSTER.replace("10.0.0.1:7450", "10.0.0.7:7450")), environ={})
    assert moved.cluster.digest != cluster.digest
    assert load_config(write(tmp_path, CLUSTER.replace("version = 3", "version = 4")), environ={}).cluster.digest != cluster.digest
    assert GatewayConfig().cluster is None


@pytest.mark.parametrize(
    "change, message",
    [
        (('node = "node-a"', 'node = "node-z"'), "cluster.node: 'node-z' is not one of cluster.nodes (node-a, node-b)"),
        (('node = "node-a"', 'node = "Node A"'), "cluster.node: a node id"),
        (("version = 3", "version = 0"), "cluster.version: expected a positive integer"),
        (("version = 3", 'version = "3"'), "cluster.version: expected a positive integer"),
        (('nats = ["nats://10.0.0.9:4222"]', "nats = []"), "cluster.nats: expected a list of NATS server URLs"),
        (("nats://10.0.0.9", "http://10.0.0.9"), "cluster.nats: 'http://10.0.0.9:4222' is not a NATS URL"),
        (('node-a = "10.0.0.1:7450"', 'node-a = "10.0.0.1"'), "cluster.nodes.node-a: expected the address clients reach it at"),
        (('node-a = "10.0.0.1:7450"', 'node-a = "10.0.0.1:0"'), "cluster.nodes.node-a: expected the address"),
        (('node-a = "10.0.0.1:7450"', 'NODE_A = "10.0.0.1:7450"'), "cluster.nodes.NODE_A: a node id is"),
        (('ws = "wss://b.chat.example/interlink"', 'ws = "https://b"'), "cluster.nodes.node-b.ws: expected a WebSocket URL"),
        (('ws = "wss', 'wz = "wss'), "cluster.nodes.node-b.wz: unknown key"),
        (("version = 3", "version = 3\nrequest_timeout_s = 0"), "cluster.request_timeout_s: must be 0.05..60 seconds"),
        (("version = 3", "version = 3\nnatz = 1"), "cluster.natz: unknown key (did you mean 'nats'?)"),
        (("version = 3\n", ""), "cluster.version: required"),
    ],
)
def test_each_cluster_mistake_names_the_key(tmp_path, change, message):
    assert message in refusal(tmp_path, CLUSTER.replace(*change))


def test_a_rejected_nats_url_does_not_show_its_password(tmp_path):
    message = refusal(tmp_path, CLUSTER.replace("nats://10.0.0.9", "nats://node-a:s3cret/@10.0.0.9"))
    assert "cluster.nats: 'nats://***@10.0.0.9:4222' is not a NATS URL" in message and "s3cret" not in message


def test_a_cluster_node_from_the_environment_needs_a_cluster_table(tmp_path):
    with pytest.raises(ConfigError, match="INTERLINK_CLUSTER_NODE: set, but the configuration has no"):
        load_config(write(tmp_path, "port = 1\n"), environ={"INTERLINK_CLUSTER_NODE": "node-a"})


def test_toml_syntax_errors_give_the_line(tmp_path):
    message = refusal(tmp_path, "port = 7450\nwindow = = 3\n")
    assert "not valid TOML" in message and "line 2" in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*absent\.toml: No such file"):
        load_config(tmp_path / "absent.toml", environ={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "port = 7460\n")
    config = load_config(path, environ={"INTERLINK_PORT": "7461", "INTERLINK_DURABILITY": "async",
                                        "INTERLINK_MAILBOX_TTL_S": "3600", "INTERLINK_PURE": "1", "HOME": "/x"})
    assert (config.port, config.durability, config.mailbox_ttl_s) == (7461, "async", 3600.0)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"INTERLINK_PORT": "abc"}, "INTERLINK_PORT: expected int, got 'abc'"),
        ({"INTERLINK_WINDOW": "0"}, "window: must be 1..4096, got 0"),
        ({"INTERLINK_PROT": "1"}, "INTERLINK_PROT: not a configuration variable (did you mean 'INTERLINK_PORT'?)"),
        ({"INTERLINK_PROVIDERS": "[]"}, "INTERLINK_PROVIDERS: not a configuration variable"),
        ({"INTERLINK_LMDB_WRITEMAP": "yes"}, "INTERLINK_LMDB_WRITEMAP: expected true or false, got 'yes'"),
    ],
)
def test_environment_mistakes_name_the_variable(tmp_path, environ, message):
    assert message in refusal(tmp_path, "", environ)


def test_check_config_exit_codes(tmp_path, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("INTERLINK_")]:
        monkeypatch.delenv(name)
    runner = CliRunner()
    good = runner.invoke(main, ["check-config", str(write(tmp_path, "port = 7460\n" + PROVIDER))])
    assert good.exit_code == 0 and "ok" in good.output and "providers: alpha" in good.output
    bad = runner.invoke(main, ["check-config", str(write(tmp_path, "prot = 1\n"))])
    assert bad.exit_code == 1 and "prot: unknown key (did you mean 'port'?)" in bad.output
    absent = runner.invoke(main, ["check-config", str(tmp_path / "absent.toml")])
    assert absent.exit_code == 1 and "No such file" in absent.output
    usage = runner.invoke(main, ["check-config", "a.toml", "b.toml"])
    assert usage.exit_code == 2
    monkeypatch.setenv("INTERLINK_PORT", "x")
    assert runner.invoke(main, ["check-config"]).exit_code == 1


def test_default_config_command_prints_a_loadable_file(tmp_path):
    result = CliRunner().invoke(main, ["default-config"])
    assert result.exit_code == 0
    assert load_config(write(tmp_path, result.output), environ={}) == GatewayConfig()


# Found by fuzzing (fuzz/fuzz_config.py, docs/reliability.md): only ConfigError may come out of the
# loader, a loaded configuration holds finite limits, and values written as TOML load back.


def test_a_file_that_is_not_utf8_is_not_toml(tmp_path):
    path = tmp_path / "interlink.toml"
    path.write_bytes(b'port = "7450"\n\x0e\xff\xff\xff\xff\x00\x00\x00')  # the fuzzer's input
    with pytest.raises(ConfigError, match=r"interlink\.toml: not valid TOML: not UTF-8 \(byte 15: invalid start byte\)"):
        load_config(path, environ={})


def test_a_file_nested_too_deeply_is_not_toml(tmp_path):
    text = "port = " + "[" * 2000 + "]" * 2000 + "\n"  # tomllib recurses once per level
    with pytest.raises(ConfigError, match="not valid TOML: nested too deeply"):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize("text", ["drain_timeout_s = inf", "jwks_min_refetch_interval_s = +inf", "drain_timeout_s = nan"])
def test_limits_must_be_finite_in_the_file(tmp_path, text):
    key = text.split()[0]
    assert refusal(tmp_path, text).startswith(f"{key}: expected a finite number, got ")


@pytest.mark.parametrize("name", ["INTERLINK_DRAIN_TIMEOUT_S", "INTERLINK_JWKS_MIN_REFETCH_INTERVAL_S"])
def test_limits_must_be_finite_in_the_environment(tmp_path, name):
    assert refusal(tmp_path, "", {name: "inf"}).startswith(f"{name[len('INTERLINK_'):].lower()}: expected a finite number")


def test_a_config_with_any_string_values_writes_as_toml_that_loads_back(tmp_path):
    """``default_config_toml`` writes each value with ``_toml_value``: strings holding control
    characters, quotes and backslashes must come back the same (the fuzzer's host had \\x10 and \\n)."""
    from interlink.config import _toml_value

    config = load_config(None, environ={"INTERLINK_HOST": 'admin_tok\x10n = "short"\n1 ', "INTERLINK_NODE_NAME": "a\\b\x00\x7f\t\r"})
    text = "".join(f"{key} = {_toml_value(getattr(config, key))}\n" for key in ("host", "node_name"))
    assert load_config(write(tmp_path, text), environ={}) == config


def test_lmdb_writemap_is_a_boolean_in_the_file_and_the_environment(tmp_path):
    assert load_config(write(tmp_path, "lmdb_writemap = true\n"), environ={}).lmdb_writemap is True
    assert load_config(write(tmp_path, ""), environ={"INTERLINK_LMDB_WRITEMAP": "TRUE"}).lmdb_writemap is True
    assert load_config(write(tmp_path, "lmdb_writemap = true\n"),
                       environ={"INTERLINK_LMDB_WRITEMAP": "false"}).lmdb_writemap is False
    assert "lmdb_writemap: expected bool, got int 1" in refusal(tmp_path, "lmdb_writemap = 1\n")
    assert "window: expected int, got bool True" in refusal(tmp_path, "window = true\n")  # and no bool passes for a number
