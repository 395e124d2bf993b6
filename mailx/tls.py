"""
Server TLS (RFC 3207 STARTTLS, RFC 8314 implicit TLS) through pyOpenSSL.

TLS 1.2 is the oldest version offered (RFC 8996 retires 1.0 and 1.1).  The
certificate file holds the server's certificate followed by its chain.
``ReloadableContext`` reads them again on demand (SIGHUP), so new sessions
get the new certificate and open ones keep theirs.
"""

from __future__ import annotations

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says why."""


def load_context_factory(certificate: str, key: str) -> ssl.CertificateOptions:
    """Read a PEM chain and key; raise TLSConfigError with a clear reason."""
    try:
        with open(certificate, "rb") as file:
            chain_pem = file.read()
        with open(key, "rb") as file:
            key_pem = file.read()
    except OSError as error:
        raise TLSConfigError(
            f"cannot read {error.filename}: {error.strerror}"
        ) from None

    chain = _split_pem_certificates(chain_pem)
    if not chain:
        raise TLSConfigError(f"{certificate}: no PEM certificate found")
    try:
        certificates = [
            crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in chain
        ]
        private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as error:
        raise TLSConfigError(f"cannot parse certificate or key: {error}") from None

    leaf, *extra = certificates
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(leaf)
        context.use_privatekey(private_key)
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{key} does not match {certificate}") from None

    return ssl.CertificateOptions(
        privateKey=private_key.to_cryptography_key(),  # type: ignore[arg-type]
        certificate=leaf.to_cryptography(),  # type: ignore[arg-type]
        extraCertChain=[cert.to_cryptography() for cert in extra],  # type: ignore[misc]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _split_pem_certificates(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    pieces = []
    for piece in data.split(marker)[:-1]:
        start = piece.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            pieces.append(piece[start:] + marker + b"\n")
    return pieces


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ReloadableContext:
    """A context factory whose certificate can be re-read without a restart."""

    def __init__(self, certificate: str, key: str) -> None:
        self.certificate = certificate
        self.key = key
        self._options = load_context_factory(certificate, key)

    def reload(self) -> None:
        """Read the files again; on error keep the old ones and raise."""
        self._options = load_context_factory(self.certificate, self.key)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)
