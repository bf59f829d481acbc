"""The federation's broker as ``fedge broker config`` sets it up: a real mosquitto, mutual TLS, the ACL."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from conftest import agreed_suite, tls_for, wait_for
from test_simulate import run_cli

from fedge.security import broker, pki
from fedge.wire import rounds_topic, status_topic


def test_broker_config_writes_a_tls_only_config_and_an_acl_per_identity(tmp_path: Path, pki_dir) -> None:
    out = tmp_path / "broker"
    done = run_cli("broker", "config", "--pki", str(pki_dir), "--out", str(out), "--port", "18830")
    assert done.returncode == 0, done.stderr
    conf = (out / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false"):
        assert line in conf.splitlines()
    assert ("crlfile" in conf) == (pki_dir / "crl.pem").exists()
    acl = (out / "acl").read_text()
    assert (
        "user client:alice\ntopic read fedge/test/rounds\ntopic write fedge/test/clients/alice/status" in acl
    )
    assert oct((out / "broker.key").stat().st_mode & 0o777) == "0o600"


def test_broker_config_rejects_a_directory_that_is_no_pki(tmp_path: Path) -> None:
    done = run_cli("broker", "config", "--pki", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "not a fedge PKI" in " ".join(done.stderr.split())


def test_a_client_with_its_certificate_is_admitted(start_broker, probe, pki_dir: Path) -> None:
    broker = start_broker(pki_dir)
    assert probe(broker, tls_for(pki_dir, pki.Role.CLIENT, "alice")).admitted()


def test_a_client_without_a_certificate_is_refused(start_broker, probe, pki_dir: Path) -> None:
    broker = start_broker(pki_dir)
    assert not probe(broker, ssl.create_default_context(cafile=pki_dir / "ca.pem")).admitted()


def test_a_certificate_from_another_ca_is_refused(
    start_broker, probe, pki_dir: Path, other_pki: Path
) -> None:
    broker = start_broker(pki_dir)
    foreign = tls_for(other_pki, pki.Role.CLIENT, "alice")
    foreign.load_verify_locations(pki_dir / "ca.pem")  # it trusts the broker; the broker must not trust it
    assert not probe(broker, foreign).admitted()


def test_a_client_publishes_only_to_its_own_status_topic(start_broker, probe, pki_dir: Path) -> None:
    broker = start_broker(pki_dir)
    watched = (status_topic("test", "+"), rounds_topic("test"))
    server = probe(broker, tls_for(pki_dir, pki.Role.SERVER, "server"), subscribe=watched)
    bob = probe(broker, tls_for(pki_dir, pki.Role.CLIENT, "bob"), subscribe=(rounds_topic("test"),))
    alice = probe(broker, tls_for(pki_dir, pki.Role.CLIENT, "alice"))
    assert server.admitted()
    assert bob.admitted()
    assert alice.admitted()
    # Messages on one connection arrive in order: once the last one is in, the forbidden ones had their turn.
    alice.client.publish(status_topic("test", "bob"), b"forged", qos=1).wait_for_publish(10)
    alice.client.publish(rounds_topic("test"), b"forged round", qos=1).wait_for_publish(10)
    alice.client.publish(status_topic("test", "alice"), b"mine", qos=1).wait_for_publish(10)
    wait_for(lambda: server.payloads(status_topic("test", "alice")), 30, "alice's own status")
    assert server.payloads(status_topic("test", "bob")) == []
    assert server.payloads(rounds_topic("test")) == []
    assert bob.payloads(rounds_topic("test")) == []


def test_a_revoked_certificate_is_refused_once_the_pki_has_a_crl(start_broker, probe, tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "test")
    pki.issue(directory, pki.Role.CLIENT, "lost-phone")
    pki.issue(directory, pki.Role.CLIENT, "alice")
    pki.revoke(directory, pki.Role.CLIENT, "lost-phone")  # writes crl.pem
    broker = start_broker(directory)
    assert "crlfile" in broker.conf.read_text()
    assert "client:lost-phone" not in (broker.conf.parent / "acl").read_text()
    assert probe(broker, tls_for(directory, pki.Role.CLIENT, "alice")).admitted()
    assert not probe(broker, tls_for(directory, pki.Role.CLIENT, "lost-phone")).admitted()


def test_broker_config_listens_on_loopback_unless_told_otherwise(tmp_path: Path, fresh_pki: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("broker", "config", "--pki", str(fresh_pki), "--out", str(out)).returncode == 0
    assert "listener 8883 127.0.0.1" in (out / "mosquitto.conf").read_text().splitlines()
    done = run_cli("broker", "config", "--pki", str(fresh_pki), "--out", str(out), "--bind", "0.0.0.0")
    assert done.returncode == 0, done.stderr
    assert "listener 8883 0.0.0.0" in (out / "mosquitto.conf").read_text().splitlines()


def test_a_config_written_by_root_keeps_root_for_files_here_but_not_in_a_container() -> None:
    assert broker.default_user(mounted=False, euid=0) == "root"
    assert broker.default_user(mounted=True, euid=0) is None
    assert broker.default_user(mounted=False, euid=1000) is None


def test_a_pid_file_naming_another_process_is_not_signalled(tmp_path: Path) -> None:
    """A stale pid file may name any process by now: SIGHUP would end this one."""
    (tmp_path / "mosquitto.pid").write_text(f"{os.getpid()}\n")
    reloaded, detail = broker.reload(tmp_path / "mosquitto.pid")
    assert not reloaded
    assert "send it SIGHUP" in detail


def test_issuing_a_client_certificate_puts_it_on_the_running_brokers_acl(
    start_broker, probe, fresh_pki: Path
) -> None:
    running = start_broker(fresh_pki)
    assert "client:carol" not in (running.conf.parent / "acl").read_text()
    done = run_cli("pki", "client-cert", "--dir", str(fresh_pki), "--client", "carol")
    assert "reloaded" in " ".join(done.stdout.split())
    assert "user client:carol" in (running.conf.parent / "acl").read_text()
    server = probe(running, tls_for(fresh_pki, pki.Role.SERVER, "server"), (status_topic("test", "+"),))
    carol = probe(running, tls_for(fresh_pki, pki.Role.CLIENT, "carol"))
    assert server.admitted()
    assert carol.admitted()
    carol.client.publish(status_topic("test", "carol"), b"here", qos=1).wait_for_publish(10)
    wait_for(lambda: server.payloads(status_topic("test", "carol")), 30, "carol's status, allowed by the ACL")


def test_the_broker_offers_tls12_only_with_ecdhe_and_aead_as_the_server_does(
    start_broker, fresh_pki: Path
) -> None:
    running = start_broker(fresh_pki)
    host, port = running.address.host, running.address.port
    alice = tls_for(fresh_pki, pki.Role.CLIENT, "alice")
    assert agreed_suite(host, port, alice, "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    for suite in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256"):
        with pytest.raises(ssl.SSLError):
            agreed_suite(host, port, tls_for(fresh_pki, pki.Role.CLIENT, "alice"), f"{suite}:@SECLEVEL=0")
