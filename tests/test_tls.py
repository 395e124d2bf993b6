"""
mailx.tls: loading the certificate chain and key, the errors that stop a
start, TLS 1.2 as the oldest version, and reloading for new connections only.
Handshakes run in memory between two pyOpenSSL connections.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from mailx.tls import ReloadableContext, TLSConfigError, load_context_factory
from tests.smtppeer import TLSIdentity, make_tls_identity

# A handshake in memory needs a few round trips; this bounds a stuck one.
MAX_ROUNDS = 20


def split_pem(identity: TLSIdentity) -> tuple[bytes, bytes]:
    """The certificate and the key of an identity, as separate PEM texts."""
    pem = identity.server_pem
    cut = pem.index(b"-----BEGIN PRIVATE KEY-----")
    return pem[:cut], pem[cut:]


def write_identity(
    directory: Path, identity: TLSIdentity, with_chain: bool = False
) -> tuple[str, str]:
    certificate, key = split_pem(identity)
    if with_chain:
        certificate += identity.ca_pem
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate)
    key_path.write_bytes(key)
    return str(cert_path), str(key_path)


def client_connection(max_version: int = 0) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_METHOD)
    # Let the client offer old versions, so only the server can refuse them.
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if max_version:
        context.set_max_proto_version(max_version)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    return connection


def handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run both sides until done; raise the SSL.Error of a refused handshake."""
    server.set_accept_state()
    for _ in range(MAX_ROUNDS):
        done = True
        for side, other in ((client, server), (server, client)):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                done = False
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(side.bio_read(65536))
        if done:
            return
    raise AssertionError("handshake did not finish")


def served_subject(options: ReloadableContext) -> str:
    client = client_connection()
    handshake(client, options.serverConnectionForTLS(None))  # type: ignore[arg-type]
    certificate = client.get_peer_certificate(as_cryptography=True)
    assert certificate is not None
    return certificate.subject.rfc4514_string()


@pytest.fixture
def identity() -> TLSIdentity:
    return make_tls_identity("mx.example.org")


def test_tls_1_2_and_1_3_are_offered(tmp_path: Path, identity: TLSIdentity) -> None:
    """Clients can negotiate TLS 1.3, or 1.2 when that is their newest."""
    options = load_context_factory(*write_identity(tmp_path, identity))
    for max_version, expected in [
        (0, "TLSv1.3"),
        (SSL.TLS1_2_VERSION, "TLSv1.2"),
    ]:
        client = client_connection(max_version)
        handshake(client, SSL.Connection(options.getContext(), None))
        assert client.get_protocol_version_name() == expected


def test_versions_before_1_2_are_refused(tmp_path: Path, identity: TLSIdentity) -> None:
    """A client that offers at most TLS 1.1 fails the handshake; 1.0 and 1.1 are off."""
    options = load_context_factory(*write_identity(tmp_path, identity))
    context = options.getContext()
    # Context.set_options(0) changes nothing and returns the options in force.
    flags = context.set_options(0)
    for old in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert flags & old
    assert not flags & SSL.OP_NO_TLSv1_2
    with pytest.raises(SSL.Error):
        handshake(client_connection(SSL.TLS1_1_VERSION), SSL.Connection(context, None))


def test_the_chain_is_sent(tmp_path: Path, identity: TLSIdentity) -> None:
    """Certificates after the first in the file are sent as the chain."""
    options = load_context_factory(*write_identity(tmp_path, identity, True))
    client = client_connection()
    handshake(client, SSL.Connection(options.getContext(), None))
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    ca = x509.load_pem_x509_certificate(identity.ca_pem)
    assert [cert.subject for cert in chain][-1] == ca.subject
    assert len(chain) == 2


def test_certificate_and_key_in_one_file(tmp_path: Path, identity: TLSIdentity) -> None:
    """One PEM file holding the certificate and the key serves for both."""
    path = tmp_path / "server.pem"
    path.write_bytes(identity.server_pem)
    options = load_context_factory(str(path), str(path))
    client = client_connection()
    handshake(client, SSL.Connection(options.getContext(), None))


def test_missing_or_unreadable_files(tmp_path: Path, identity: TLSIdentity) -> None:
    """A missing file or a directory in place of the key says it cannot be read."""
    certificate, _ = write_identity(tmp_path, identity)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match=f"cannot read {missing}: No such file"):
        load_context_factory(certificate, missing)
    with pytest.raises(TLSConfigError, match=r"cannot read .*: not a regular file"):
        load_context_factory(certificate, str(tmp_path))


def test_mismatched_key(tmp_path: Path, identity: TLSIdentity) -> None:
    """A key of another certificate stops the load naming both files."""
    certificate, _ = write_identity(tmp_path, identity)
    other = make_tls_identity("other.example.org")
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(split_pem(other)[1])
    with pytest.raises(TLSConfigError) as caught:
        load_context_factory(certificate, str(other_key))
    assert str(caught.value) == f"{other_key} does not match {certificate}"


def test_encrypted_key_is_refused_without_a_prompt(
    tmp_path: Path, identity: TLSIdentity
) -> None:
    """A passphrase-protected key is refused with a reason, never prompted for."""
    certificate, key = write_identity(tmp_path, identity)
    private_key = serialization.load_pem_private_key(
        Path(key).read_bytes(), password=None
    )
    Path(key).write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSConfigError, match="private key is encrypted"):
        load_context_factory(certificate, key)


@pytest.mark.parametrize(
    ("which", "content", "says"),
    [
        ("cert", b"not a certificate\n", "no PEM certificate found"),
        ("cert", b"", "no PEM certificate found"),
        ("key", b"not a key\n", "no usable PEM private key found"),
        ("key", b"", "no usable PEM private key found"),
    ],
)
def test_garbage_files(
    tmp_path: Path, identity: TLSIdentity, which: str, content: bytes, says: str
) -> None:
    """A file with no certificate or no key in it is refused with its name."""
    certificate, key = write_identity(tmp_path, identity)
    target = certificate if which == "cert" else key
    Path(target).write_bytes(content)
    with pytest.raises(TLSConfigError, match=f"^{target}: {says}$"):
        load_context_factory(certificate, key)


def test_reload_serves_the_new_certificate_to_new_connections_only(
    tmp_path: Path, identity: TLSIdentity
) -> None:
    """After reload new handshakes get the new certificate, one under way the old."""
    certificate, key = write_identity(tmp_path, identity)
    context = ReloadableContext(certificate, key)
    assert served_subject(context) == "CN=mx.example.org"

    early_client = client_connection()
    early_server = context.serverConnectionForTLS(None)  # type: ignore[arg-type]
    write_identity(tmp_path, make_tls_identity("new.example.org"))
    context.reload()

    assert served_subject(context) == "CN=new.example.org"
    handshake(early_client, early_server)
    old = early_client.get_peer_certificate(as_cryptography=True)
    assert old is not None
    assert old.subject.rfc4514_string() == "CN=mx.example.org"


def test_failed_reload_keeps_the_old_certificate(
    tmp_path: Path, identity: TLSIdentity
) -> None:
    """A reload that fails raises and leaves the working certificate in use."""
    certificate, key = write_identity(tmp_path, identity)
    context = ReloadableContext(certificate, key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    Path(key).write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TLSConfigError, match="does not match"):
        context.reload()
    assert served_subject(context) == "CN=mx.example.org"
