"""The Twisted adapter around the session, with StringTransport and a Clock."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides

from mailx.protocol import (
    ConnectionLimits,
    ListenerSettings,
    SMTPServerFactory,
    SMTPServerProtocol,
)
from mailx.session import SessionConfig
from tests.sessionkit import AcceptingPolicy, RecordingSink


class FakeTLSTransport(StringTransport):
    """A StringTransport that records startTLS."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]
        self.tls_context: object = None
        self.written_before_tls = b""

    def text(self) -> bytes:
        """Everything written so far."""
        return bytes(self.io.getvalue())

    def startTLS(self, context: object) -> None:
        self.tls_context = context
        self.written_before_tls = self.text()


def make_factory(
    clock: Clock,
    limits: ConnectionLimits | None = None,
    idle_timeout: float = 300.0,
    tls: object = None,
) -> tuple[SMTPServerFactory, RecordingSink]:
    sink = RecordingSink()
    settings = ListenerSettings(
        name="smtp",
        session=SessionConfig(hostname="mx.example.org", tls_available=tls is not None),
        idle_timeout=idle_timeout,
        tls=tls,  # type: ignore[arg-type]
    )
    factory = SMTPServerFactory(
        settings,
        AcceptingPolicy(),
        sink,
        clock,
        limits or ConnectionLimits(100, 10),
    )
    return factory, sink


def connect(
    factory: SMTPServerFactory, host: str = "192.0.2.1"
) -> tuple[SMTPServerProtocol, FakeTLSTransport]:
    peer = IPv4Address("TCP", host, 40000)
    protocol = factory.buildProtocol(peer)
    assert isinstance(protocol, SMTPServerProtocol)
    transport = FakeTLSTransport(peer)
    # The adapter starts TLS only on a transport that says it can.
    alsoProvides(transport, ITLSTransport)
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_message_over_the_adapter() -> None:
    """Octets in give replies out on the transport and a stored message."""
    factory, sink = make_factory(Clock())
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\nhello\r\n.\r\nQUIT\r\n"
    )
    lines = transport.text().split(b"\r\n")
    assert lines[0] == b"220 mx.example.org ESMTP mailx ready"
    assert b"250 2.0.0 OK queued as" in transport.text()
    assert lines[-2].startswith(b"221 2.0.0")
    assert transport.disconnecting
    assert len(sink.messages) == 1
    assert sink.messages[0][0].client is not None
    assert sink.messages[0][0].client.address == "192.0.2.1"


def test_idle_timeout_closes_with_421() -> None:
    """A client that sends nothing for the idle timeout gets 421 and is closed."""
    clock = Clock()
    factory, _ = make_factory(clock, idle_timeout=300)
    _, transport = connect(factory)
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(1)
    assert b"421 4.4.2" in transport.text()
    assert transport.disconnecting


def test_one_octet_at_a_time_does_not_hold_the_slot() -> None:
    """Octets that never complete a command do not restart the idle timer."""
    clock = Clock()
    factory, _ = make_factory(clock, idle_timeout=300)
    protocol, transport = connect(factory)
    for _ in range(10):
        clock.advance(60)
        if transport.disconnecting:
            break
        protocol.dataReceived(b"N")
    assert transport.disconnecting
    assert b"421 4.4.2" in transport.text()


def test_complete_commands_restart_the_timer() -> None:
    """A client that sends a command every minute stays connected."""
    clock = Clock()
    factory, _ = make_factory(clock, idle_timeout=300)
    protocol, transport = connect(factory)
    for _ in range(10):
        clock.advance(200)
        protocol.dataReceived(b"NOOP\r\n")
    assert not transport.disconnecting


def test_connection_limit_per_client() -> None:
    """Beyond the per-client cap a connection gets 421 4.7.0 and is closed."""
    factory, _ = make_factory(Clock(), limits=ConnectionLimits(10, 2))
    connect(factory)
    connect(factory)
    _, third = connect(factory)
    assert third.text().startswith(b"421 4.7.0")
    assert third.disconnecting
    _, other = connect(factory, host="192.0.2.2")
    assert other.text().startswith(b"220 ")


def test_a_closed_connection_frees_its_slot() -> None:
    """When a session ends its slot can be used again."""
    limits = ConnectionLimits(1, 1)
    factory, _ = make_factory(Clock(), limits=limits)
    first, _ = connect(factory)
    _, refused = connect(factory)
    assert refused.text().startswith(b"421 ")
    first.connectionLost(None)
    _, again = connect(factory)
    assert again.text().startswith(b"220 ")


def test_starttls_starts_tls_after_the_220() -> None:
    """The 220 to STARTTLS is written in the clear, then TLS starts."""
    context = object()
    factory, _ = make_factory(Clock(), tls=context)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n")
    assert transport.tls_context is context
    assert transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert transport.text() == transport.written_before_tls
    assert protocol.session is not None
    assert protocol.session.client.tls


def test_replies_not_read_pause_reading() -> None:
    """A client not reading replies is answered no more, then not read."""
    factory, _ = make_factory(Clock())
    protocol, transport = connect(factory)
    assert transport.producer is protocol
    protocol.pauseProducing()
    protocol.dataReceived(b"NOOP\r\n")
    assert transport.text().count(b"\r\n") == 1
    assert transport.producerState == "producing"
    protocol.dataReceived(b"NOOP\r\n" * 20000)
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"
    assert transport.text().count(b"250 2.0.0 OK") == 20001
