"""The ``interlink`` command line: key generation, display, renewal, version; exit codes."""

from click.testing import CliRunner

from interlink.cli import main
from interlink.core.edge.keyfiles import load_operator_keys


def test_keys_init_show_renew(tmp_path):
    runner = CliRunner()
    folder = tmp_path / "keys"
    first = runner.invoke(main, ["keys", "init", "--dir", str(folder), "--node", "edge-7"])
    assert first.exit_code == 0, first.output
    keys = load_operator_keys(folder)
    assert keys.root_public.hex() in first.output
    assert keys.certificate.node == "edge-7"
    again = runner.invoke(main, ["keys", "init", "--dir", str(folder)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    shown = runner.invoke(main, ["keys", "show", "--dir", str(folder)])
    assert shown.exit_code == 0 and keys.root_fingerprint in shown.output
    renewed = runner.invoke(main, ["keys", "renew", "--dir", str(folder), "--valid-days", "30"])
    assert renewed.exit_code == 0, renewed.output
    after = load_operator_keys(folder)
    assert after.root_public == keys.root_public  # clients keep their pin
    assert after.certificate.expires < keys.certificate.expires


def test_missing_folder_exits_1_with_a_message(tmp_path):
    result = CliRunner().invoke(main, ["keys", "show", "--dir", str(tmp_path / "absent")])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_version_reports_the_implementation():
    import interlink.core

    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0
    assert f"hot paths: {interlink.core.IMPLEMENTATION}" in result.output
    assert "uvloop" in result.output
