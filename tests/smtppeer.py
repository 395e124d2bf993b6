"""
Scripted next-hop SMTP servers on loopback addresses, for tests.

A ``Script`` says how a peer behaves: its greeting, its EHLO keywords, the
reply to any command (or to one recipient), and where it stalls or drops the
connection.  ``PeerGroup`` starts peers on several 127.0.0.x addresses that
share one port (the port mailx is told to deliver to), and records what each
peer saw: the command lines, and every message with its wire form (still
dot-stuffed) and its content::

    group = PeerGroup()
    port = group.start({"127.0.0.2": Script(), "127.0.0.3": Script(greeting=None)})
    ...
    group.peer("127.0.0.2").messages[0].content
    yield group.stop()

``make_tls_identity`` makes a throwaway CA and a server certificate with the
``cryptography`` package, for peers that offer STARTTLS.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.protocol import Factory, Protocol

DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE 10000000")


@dataclass
class Script:
    """How one scripted peer behaves."""

    # The greeting line; None means the peer never greets (it stalls).
    greeting: str | None = "220 peer.test ESMTP scripted"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    # Reply lines by verb ("EHLO", "MAIL", "RCPT", "DATA", "." for the end
    # of data, "BDAT", "STARTTLS", ...); several lines are joined with CRLF.
    replies: Mapping[str, str] = field(default_factory=dict)
    # Reply lines for RCPT by recipient address (without brackets).
    recipient_replies: Mapping[str, str] = field(default_factory=dict)
    # The verb at which the peer stops answering ("DATA-BODY": mid content).
    stall_at: str | None = None
    # The verb at which the peer drops the connection ("DATA-BODY" likewise).
    drop_at: str | None = None
    # Offer STARTTLS with this server certificate (PEM, key included).
    tls_pem: bytes | None = None
    # Octets sent in the clear right after the 220 reply to STARTTLS.
    inject_after_starttls: bytes = b""
    # Answer STARTTLS with 220 but then send this garbage instead of TLS.
    break_tls: bool = False


@dataclass
class ReceivedMessage:
    """One message a peer accepted the content of."""

    reverse_path: str
    recipients: list[str]
    wire: bytes
    content: bytes
    tls: bool


@dataclass
class Peer:
    """What a peer saw."""

    script: Script
    commands: list[str] = field(default_factory=list)
    messages: list[ReceivedMessage] = field(default_factory=list)
    connections: int = 0


def unstuff(wire: bytes) -> bytes:
    """The content of a DATA body as RFC 5321 section 4.5.2 defines it."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class _PeerProtocol(Protocol):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.script = peer.script
        self.buffer = b""
        self.mode = "command"
        self.bdat_left = 0
        self.bdat_last = False
        self.body = b""
        self.tls = False
        self.stalled = False
        self.reverse_path = ""
        self.recipients: list[str] = []

    def connectionMade(self) -> None:
        self.peer.connections += 1
        if self.script.greeting is None:
            self.stalled = True
            return
        self.send(self.script.greeting)

    def send(self, lines: str) -> None:
        self.transport.write(lines.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.stalled:
            return
        self.buffer += data
        while self.buffer and not self.stalled and self.transport is not None:
            if not self._step():
                return

    def _step(self) -> bool:
        if self.mode == "broken-tls":
            self.buffer = b""
            self.transport.write(b"this is not TLS\r\n")  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return False
        if self.mode == "data":
            return self._data_step()
        if self.mode == "bdat":
            return self._bdat_step()
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        line = self.buffer[:end].decode("utf-8", "replace")
        self.buffer = self.buffer[end + 2 :]
        self._command(line)
        return True

    def _data_step(self) -> bool:
        if self.script.drop_at == "DATA-BODY":
            self.transport.abortConnection()  # type: ignore[union-attr]
            return False
        if self.script.stall_at == "DATA-BODY":
            self.stalled = True
            return False
        self.body += self.buffer
        self.buffer = b""
        marker = b".\r\n" if self.body.startswith(b".\r\n") else b"\r\n.\r\n"
        end = self.body.find(marker)
        if end < 0:
            return False
        cut = end + (0 if marker == b".\r\n" else 2)
        wire, self.buffer = self.body[:cut], self.body[end + len(marker) :]
        self.body = b""
        self.mode = "command"
        self._message(wire, unstuff(wire))
        self._reply(".", "250 2.0.0 Queued")
        return True

    def _bdat_step(self) -> bool:
        take = self.buffer[: self.bdat_left]
        self.buffer = self.buffer[self.bdat_left :]
        self.body += take
        self.bdat_left -= len(take)
        if self.bdat_left:
            return False
        self.mode = "command"
        if self.bdat_last:
            self._message(self.body, self.body)
            self.body = b""
            self._reply("BDAT", "250 2.0.0 Queued")
        else:
            self._reply("BDAT-CHUNK", "250 2.0.0 Chunk received")
        return True

    def _message(self, wire: bytes, content: bytes) -> None:
        self.peer.messages.append(
            ReceivedMessage(
                self.reverse_path, list(self.recipients), wire, content, self.tls
            )
        )

    def _reply(self, verb: str, default: str) -> None:
        self.send(self.script.replies.get(verb, default))

    def _command(self, line: str) -> None:
        self.peer.commands.append(line)
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if self.script.stall_at == verb:
            self.stalled = True
            return
        if self.script.drop_at == verb:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        handler = getattr(self, f"_do_{verb}", None)
        if handler is None:
            self._reply(verb, "502 5.5.1 Not implemented")
            return
        handler(argument)

    def _do_EHLO(self, argument: str) -> None:
        keywords = list(self.script.extensions)
        if self.script.tls_pem is not None and not self.tls:
            keywords.append("STARTTLS")
        lines = ["peer.test greets you", *keywords]
        text = "\r\n".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}"
            for i, line in enumerate(lines)
        )
        self._reply("EHLO", text)

    def _do_HELO(self, argument: str) -> None:
        self._reply("HELO", "250 peer.test")

    def _do_MAIL(self, argument: str) -> None:
        self.reverse_path = argument.partition(":")[2].split(" ")[0].strip("<>")
        self.recipients = []
        self._reply("MAIL", "250 2.1.0 Sender OK")

    def _do_RCPT(self, argument: str) -> None:
        recipient = argument.partition(":")[2].split(" ")[0].strip("<>")
        special = self.script.recipient_replies.get(recipient)
        if special is not None:
            self.send(special)
            return
        reply = self.script.replies.get("RCPT", "250 2.1.5 Recipient OK")
        if reply.startswith("2"):
            self.recipients.append(recipient)
        self.send(reply)

    def _do_DATA(self, argument: str) -> None:
        reply = self.script.replies.get("DATA", "354 Go ahead")
        if reply.startswith("354"):
            self.mode = "data"
        self.send(reply)

    def _do_BDAT(self, argument: str) -> None:
        size, _, last = argument.partition(" ")
        self.bdat_left = int(size)
        self.bdat_last = last.upper() == "LAST"
        self.mode = "bdat"
        if self.bdat_left == 0:
            self._bdat_step()

    def _do_RSET(self, argument: str) -> None:
        self._reply("RSET", "250 2.0.0 OK")

    def _do_NOOP(self, argument: str) -> None:
        self._reply("NOOP", "250 2.0.0 OK")

    def _do_AUTH(self, argument: str) -> None:
        self._reply("AUTH", "235 2.7.0 Authenticated")

    def _do_QUIT(self, argument: str) -> None:
        self._reply("QUIT", "221 2.0.0 Bye")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _do_STARTTLS(self, argument: str) -> None:
        reply = self.script.replies.get("STARTTLS", "220 2.0.0 Go ahead")
        self.send(reply)
        if not reply.startswith("220") or self.script.tls_pem is None:
            return
        if self.script.inject_after_starttls:
            self.transport.write(self.script.inject_after_starttls)  # type: ignore[union-attr]
        if self.script.break_tls:
            # The client's handshake is answered with octets that are not TLS.
            self.mode = "broken-tls"
            return
        self.transport.startTLS(server_tls_options(self.script.tls_pem))  # type: ignore[union-attr]
        self.tls = True


class _PeerFactory(Factory):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def buildProtocol(self, addr: Any) -> Protocol:
        return _PeerProtocol(self.peer)


class PeerGroup:
    """Scripted peers on several loopback addresses sharing one port."""

    def __init__(self, reactor: Any = None) -> None:
        self._reactor: Any = reactor if reactor is not None else global_reactor
        self._ports: list[Any] = []
        self.peers: dict[str, Peer] = {}
        self.port = 0

    def start(self, scripts: Mapping[str, Script]) -> int:
        """Listen for each script on its address; return the shared port."""
        for host, script in scripts.items():
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"{host} is not a loopback address")
            peer = Peer(script)
            self.peers[host] = peer
            factory = _PeerFactory(peer)
            listening = self._reactor.listenTCP(self.port, factory, interface=host)
            self._ports.append(listening)
            self.port = listening.getHost().port
        return self.port

    def peer(self, host: str) -> Peer:
        return self.peers[host]

    def stop(self) -> Deferred[Any]:
        """Stop listening everywhere."""
        ports, self._ports = self._ports, []
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])


def server_tls_options(pem: bytes) -> Any:
    """Server TLS options from a PEM certificate followed by its key."""
    certificate = x509.load_pem_x509_certificate(pem)
    key = serialization.load_pem_private_key(pem, password=None)
    # cryptography objects, as pyOpenSSL deprecates its own X509 type.
    return ssl.CertificateOptions(privateKey=key, certificate=certificate)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TLSIdentity:
    """A CA certificate (to trust) and a server certificate with its key."""

    ca_pem: bytes
    server_pem: bytes

    def trust_root(self) -> Any:
        return ssl.Certificate.loadPEM(self.ca_pem)


def make_tls_identity(hostname: str) -> TLSIdentity:
    """A throwaway CA and a certificate for ``hostname`` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailx test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server_pem = certificate.public_bytes(serialization.Encoding.PEM) + key_pem
    return TLSIdentity(ca.public_bytes(serialization.Encoding.PEM), server_pem)
