"""A link's TLS credentials and the key files on disk (flashlexd.mqttclient.LinkCredentials), on
real certificate files: a renewal written in place is loaded at the next attempt, one that does
not load or is unsafe is not, and the stamp is that of the files the context came from."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flashlexd import mqttclient
from flashlexd.config import Keys
from flashlexd.mqttclient import LinkCredentials, prepare_tls_context
from tests.broker import _Authority


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    authority = _Authority("link-ca")
    thing = authority.issue(tmp_path, "thing", "thing")
    return Keys(authority.write(tmp_path / "ca.pem"), thing.cert, thing.key)


@pytest.fixture(autouse=True)
def no_prepared_context():
    """The fork server's prepared context is process state: none before, none left after."""
    mqttclient._PREPARED.clear()
    yield
    mqttclient._PREPARED.clear()


def renew(keys: Keys, tmp_path: Path) -> None:
    """A new certificate and key written over the same files, as a renewal tool does."""
    fresh = _Authority("link-ca-2").issue(tmp_path, "renewed", "thing")
    keys.cert.write_bytes(fresh.cert.read_bytes())
    keys.private_key.write_bytes(fresh.key.read_bytes())


def test_a_renewal_that_completes_after_the_fork_servers_failed_build_is_loaded(keys, tmp_path, caplog):
    """Found by re-read: the fork server's build failed on a renewal half copied and kept the
    context of the files before; the renewal then completed before the worker stamped the
    files, so the worker took the new stamp with the old context and never loaded them."""
    prepare_tls_context(keys, False)
    old = LinkCredentials(keys, False).context  # the prepared one
    keys.cert.write_text("half a certificate\n")
    with caplog.at_level(logging.WARNING, logger="flashlexd.mqttclient"):
        prepare_tls_context(keys, False)  # fails: the last context stays, with its stamp
    assert "keep the credentials loaded before" in caplog.text
    renew(keys, tmp_path)  # completed before the worker starts
    link = LinkCredentials(keys, False)
    assert link.context is old
    assert link.renewed() and link.context is not old
    assert not link.renewed()  # once per change


def test_a_renewed_key_readable_by_others_is_not_loaded(keys, tmp_path, caplog):
    """The link would have loaded it while a restart or reload refuses it (found by re-read)."""
    link = LinkCredentials(keys, False)
    old = link.context
    renew(keys, tmp_path)
    keys.private_key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="flashlexd.mqttclient"):
        assert not link.renewed()
    assert link.context is old and "is readable by other users (mode 0644)" in caplog.text
    keys.private_key.chmod(0o600)  # a change of its own: tried again
    assert link.renewed() and link.context is not old


def test_under_allow_insecure_key_a_renewed_key_readable_by_others_is_loaded(keys, tmp_path, monkeypatch):
    """Run with --allow-insecure-key, a renewal of mode 0640 was refused at the link for good,
    saying a restart would refuse it: it would not (found by re-read). The supervisor tells its
    workers of the flag."""
    from flashlexd.credentials import ALLOW_INSECURE_KEY_ENV
    monkeypatch.setenv(ALLOW_INSECURE_KEY_ENV, "1")
    link = LinkCredentials(keys, False)
    old = link.context
    renew(keys, tmp_path)
    keys.private_key.chmod(0o640)
    assert link.renewed() and link.context is not old


def test_a_key_renewed_in_place_encrypted_is_named_and_never_asks_for_a_passphrase(keys, tmp_path, caplog):
    """OpenSSL asked for the passphrase on the terminal: a fork server with one stalled until the
    daemon gave up, and without one the log got bare "Enter PEM pass phrase:" lines and a wrong
    reason (review "security"). Here stdin is a pipe nobody writes: a prompt would hang."""
    import subprocess
    encrypted = subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout", "pass:secret",
                                "-in", str(keys.private_key)], capture_output=True, check=True).stdout
    prepare_tls_context(keys, False)
    link = LinkCredentials(keys, False)
    keys.private_key.write_bytes(encrypted)
    with caplog.at_level(logging.WARNING, logger="flashlexd.mqttclient"):
        prepare_tls_context(keys, False)
        assert not link.renewed()
    assert f"flashlex.thing.keys.privateKey: {keys.private_key} is encrypted with a passphrase" in caplog.text
