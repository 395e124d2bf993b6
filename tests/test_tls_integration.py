"""
TLS of the real server (twistd) on loopback: the certificate re-read on
SIGHUP while a session stays open, old protocol versions refused, and the
start-up errors for keys that cannot be used.
"""

from __future__ import annotations

import signal
import smtplib
import ssl
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.mailxproc import MailxProcess, basic_config, free_port
from tests.smtppeer import make_tls_identity

pytestmark = pytest.mark.integration

# Bounds the wait for the reload line in the log (written at once).
LOG_WAIT = 10.0
TLS_CONFIG = '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'


def write_identity(workdir: Path, hostname: str) -> None:
    pem = make_tls_identity(hostname).server_pem
    cut = pem.index(b"-----BEGIN PRIVATE KEY-----")
    # Written whole and renamed, as an operator's deployment tool would.
    for name, content in (("cert.pem", pem[:cut]), ("key.pem", pem[cut:])):
        temporary = workdir / f".{name}.new"
        temporary.write_bytes(content)
        temporary.replace(workdir / name)


def make_server(tmp_path: Path, hostname: str = "mx.example.org") -> MailxProcess:
    workdir = tmp_path / "mx"
    workdir.mkdir()
    write_identity(workdir, hostname)
    port = free_port()
    config = basic_config(port, extra=TLS_CONFIG)
    return MailxProcess(workdir, config, port=port)


def any_certificate() -> ssl.SSLContext:
    """A client context that accepts any certificate, to look at what is served."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_name(client: smtplib.SMTP) -> str:
    assert isinstance(client.sock, ssl.SSLSocket)
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def starttls_client(server: MailxProcess) -> smtplib.SMTP:
    client = smtplib.SMTP(server.address, server.port, timeout=30)
    client.starttls(context=any_certificate())
    client.ehlo("client.example")
    return client


def wait_for_log(server: MailxProcess, text: str) -> str:
    deadline = time.monotonic() + LOG_WAIT
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log:\n{server.log()}")


def sighup(server: MailxProcess) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)


def test_sighup_reloads_without_dropping_a_session(tmp_path: Path) -> None:
    """After SIGHUP new sessions get the new certificate; an open one carries on."""
    server = make_server(tmp_path)
    server.start()
    try:
        early = starttls_client(server)
        assert served_name(early) == "CN=mx.example.org"
        write_identity(server.workdir, "renewed.example.org")
        sighup(server)
        wait_for_log(server, "TLS certificate reloaded from cert.pem")

        with starttls_client(server) as late:
            assert served_name(late) == "CN=renewed.example.org"
        with early:
            assert early.noop()[0] == 250
            refused = early.sendmail(
                "s@example.net",
                ["alice@example.org"],
                b"Subject: reload\r\n\r\nsent across a reload\r\n",
            )
        assert refused == {}
    finally:
        server.stop()
    (stored,) = server.messages("example.org", "alice")
    assert b"sent across a reload" in stored


def test_failed_reload_keeps_the_old_certificate(tmp_path: Path) -> None:
    """A SIGHUP with a mismatched new key logs the error and keeps serving."""
    server = make_server(tmp_path)
    server.start()
    try:
        other_key = make_tls_identity("other.example.org").server_pem
        cut = other_key.index(b"-----BEGIN PRIVATE KEY-----")
        (server.workdir / "key.pem").write_bytes(other_key[cut:])
        sighup(server)
        log = wait_for_log(server, "TLS reload failed, keeping the old certificate")
        assert "key.pem does not match cert.pem" in log
        with starttls_client(server) as client:
            assert served_name(client) == "CN=mx.example.org"
    finally:
        server.stop()


def test_tls_1_1_is_refused(tmp_path: Path) -> None:
    """A client that offers at most TLS 1.1 gets a protocol-version alert."""
    server = make_server(tmp_path)
    server.start()
    try:
        context = any_certificate()
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            # The client is old on purpose; the ssl module warns about that.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.ehlo("client.example")
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                client.starttls(context=context)
        with starttls_client(server) as client:
            assert isinstance(client.sock, ssl.SSLSocket)
            assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        server.stop()


def replace_key(server: MailxProcess, kind: str) -> None:
    key_path = server.workdir / "key.pem"
    if kind == "mismatched":
        pem = make_tls_identity("other.example.org").server_pem
        key_path.write_bytes(pem[pem.index(b"-----BEGIN PRIVATE KEY-----") :])
    elif kind == "encrypted":
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
    elif kind == "garbage":
        key_path.write_bytes(b"this is not a key\n")
    elif kind == "directory":
        key_path.unlink()
        key_path.mkdir()
    elif kind == "missing":
        key_path.unlink()


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("mismatched", r"tls: key\.pem does not match cert\.pem"),
        ("encrypted", r"tls: key\.pem: the private key is encrypted"),
        ("garbage", r"tls: key\.pem: no usable PEM private key found"),
        ("directory", r"tls\.key: .*'key\.pem'"),
        ("missing", r"tls\.key: .*'key\.pem'"),
    ],
)
def test_unusable_key_stops_the_start(tmp_path: Path, kind: str, says: str) -> None:
    """A key that cannot be used stops twistd with a message naming the file."""
    server = make_server(tmp_path)
    replace_key(server, kind)
    with pytest.raises(RuntimeError, match=says):
        server.start()
