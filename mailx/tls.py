"""
Server TLS (RFC 3207 STARTTLS, RFC 8314 implicit TLS) through pyOpenSSL.

TLS 1.2 is the oldest version offered (RFC 8996 retires 1.0 and 1.1).  The
certificate file holds the server's certificate followed by its chain.
``ReloadableContext`` reads them again on demand (SIGHUP), so new sessions
get the new certificate and open ones keep theirs.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailx.files import read_regular_file


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says why."""


def load_context_factory(certificate: str, key: str) -> ssl.CertificateOptions:
    """Read a PEM chain and key; raise TLSConfigError with a clear reason."""
    chain_pem = _read(certificate)
    key_pem = _read(key)

    try:
        leaf, *extra = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise TLSConfigError(f"{certificate}: no PEM certificate found") from None
    private_key = _private_key(key, key_pem)
    if _public_der(leaf.public_key()) != _public_der(private_key.public_key()):
        raise TLSConfigError(f"{key} does not match {certificate}")

    options = ssl.CertificateOptions(
        privateKey=private_key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=extra,  # type: ignore[arg-type]
        # RFC 8996 retires TLS 1.0 and 1.1; RFC 9325 section 3.1.1 wants 1.2+.
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        # Built now, so whatever OpenSSL refuses stops the start, not a client.
        options.getContext()
    except SSL.Error as error:
        raise TLSConfigError(f"{certificate} and {key}: {error}") from None
    return options


def _read(path: str) -> bytes:
    try:
        return read_regular_file(path)
    except OSError as error:
        raise TLSConfigError(f"cannot read {path}: {error.strerror}") from None


def _private_key(path: str, pem: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        # cryptography's way of saying the key needs a passphrase.
        raise TLSConfigError(
            f"{path}: the private key is encrypted; mailx needs it without a"
            " passphrase (readable by the mailx user only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"{path}: no usable PEM private key found") from None


def _public_der(public_key: object) -> bytes:
    encode = getattr(public_key, "public_bytes", None)
    if encode is None:
        return b""
    return bytes(
        encode(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


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
        # Each connection takes the options current when it starts, and keeps
        # them: a reload changes only connections that start afterwards.
        return SSL.Connection(self.getContext(), None)
