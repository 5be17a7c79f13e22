"""``make demo`` keeps working: run it as a user would and check what it reports."""

import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "interlink.demo", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for user, device, suite in [("alice@alpha", 1, "XX_CHACHAPOLY"), ("alice@alpha", 2, "IK_AESGCM"),
                                ("bob@beta", 1, "XX_AESGCM"), ("bob@beta", 2, "IK_CHACHAPOLY")]:
        assert f"welcome {user:<12} device {device}  suite {suite}" in out
    assert "err token_expired" in out and "err bad_audience" in out
    assert "bob/1   <- dlv seq 1 from alice@alpha/1: <ciphertext for bob/1>" in out
    assert "bob/2 reconnects: welcome says 2 items are waiting" in out
    assert "after recv: bob's mailboxes {1: {'items': 0" in out and "2: {'items': 0" in out
    assert "alice's next message -> err not_opted_in" in out
    assert ("provider beta's server got one webhook, verified with the operator root key: {'user': 'carol@beta', "
            "'device': 1, 'pending': 2, 'counter': 1, 'token': 'carols-phone-apns-token'}") in out
    assert "carol's app wakes and connects: welcome says 2 items are waiting" in out
    assert "client aborts" in out and "replaced" in out
    assert "wren -> alice over WebSocket: acked" in out and "alice's TCP session got b'<ciphertext from a browser>'" in out
    assert "wren's WebSocket session got b'<ciphertext back>'" in out
    # the end-to-end encrypted part (interlink[e2ee] is part of the test extra)
    assert "finn/1 decrypts: 'meet at the bridge at 7'" in out
    assert "erin/2 decrypts her own copy (to finn@beta): 'meet at the bridge at 7'" in out
    assert "erin/1 <- finn@beta/1: 'see you there'" in out and "erin/2 <- finn@beta/1: 'see you there'" in out
    assert "None of the 4 texts is in the gateway's data dir" in out
    assert "erin/2 restarts from its state file and decrypts what waited: 'erin/2 is offline;" in out
    assert ("finn adds device 2; erin/1's next message reaches both: finn/1 \"welcome to the conversation, "
            "finn's tablet\", finn/2 \"welcome to the conversation, finn's tablet\"") in out
    assert "and her own copy of \"welcome to the conversation, finn's tablet\"" in out
    assert ("erin/1 sends a picture (bridge.png, 184,795 bytes, image/png): a 184,843-byte encrypted blob, its key "
            "inside the message; finn/1 and finn/2 download and decrypt it: identical") in out
    assert "erin/1 sends a voice note (directions.ogg, 96,000 bytes, audio/ogg)" in out
    assert "the gateway holds 280,875 bytes of blobs: ciphertext only, no run of either file in it" in out
    assert "directions.ogg downloads and decrypts intact on her second device too" in out
    # the end-to-end encrypted group chat of three providers, a member removed mid-conversation
    assert "OpenID issuer for provider 'gamma':" in out
    for name in ("hana/2", "ivan/1", "juno/1"):
        assert f"{name} <- group event 'created' by hana@alpha: members hana@alpha, ivan@beta, juno@gamma" in out
    assert "hana/1 -> group: 'welcome to the group' — decrypted by hana/2, ivan/1, juno/1" in out
    assert "ivan/1 -> group: 'hi from beta' — decrypted by hana/1, hana/2, juno/1" in out
    assert "juno/1 -> group: 'hi from gamma' — decrypted by hana/1, hana/2, ivan/1" in out
    assert "hana/2 -> group: \"and from hana's tablet\" — decrypted by hana/1, ivan/1, juno/1" in out
    assert "hana/1 removes ivan (ver 2): ivan/1 <- group event 'removed' (ivan@beta)" in out
    assert "hana/1 -> group: 'ivan cannot read this' — decrypted by hana/2, juno/1" in out
    assert "juno/1 -> group: 'nor this' — decrypted by hana/1, hana/2" in out
    assert "ivan/1 receives nothing more; even given the bytes, his old key of hana/1 fails" in out
    assert "none of the 6 group texts is in the gateway's data dir" in out
    assert out.rstrip().endswith("done.")
    assert (tmp_path / "keys" / "root_public.pem").exists()  # keys were generated where asked
