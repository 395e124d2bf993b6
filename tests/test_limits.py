"""
Limits under load, on Twisted's fakes: connection caps (overall and per
client address) and the idle timer, including clients that trickle octets.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailx.protocol import (
    ConnectionLimits,
    ListenerSettings,
    SMTPServerFactory,
    SMTPServerProtocol,
)
from mailx.session import SessionConfig
from tests.sessionkit import AcceptingPolicy, RecordingSink

IDLE_TIMEOUT = 300.0


class Server:
    """One listener's factory on a fake clock, and the connections made to it."""

    def __init__(self, total: int = 100, per_client: int = 10) -> None:
        self.clock = Clock()
        self.limits = ConnectionLimits(total, per_client)
        settings = ListenerSettings(
            name="smtp",
            session=SessionConfig(hostname="mx.example.org"),
            idle_timeout=IDLE_TIMEOUT,
        )
        self.factory = SMTPServerFactory(
            settings, AcceptingPolicy(), RecordingSink(), self.clock, self.limits
        )

    def connect(
        self, host: str = "192.0.2.7"
    ) -> tuple[SMTPServerProtocol, StringTransport]:
        address: IPv4Address | IPv6Address
        if ":" in host:
            address = IPv6Address("TCP", host, 4000)
        else:
            address = IPv4Address("TCP", host, 4000)
        protocol = self.factory.buildProtocol(address)
        assert isinstance(protocol, SMTPServerProtocol)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport


def close(protocol: SMTPServerProtocol, transport: StringTransport) -> None:
    """What the reactor does once a closing transport is gone."""
    protocol.connectionLost(None)


def refused(transport: StringTransport) -> bool:
    return transport.value().startswith(b"421 4.7.0 ") and transport.disconnecting


def test_per_client_cap() -> None:
    """Beyond max_connections_per_client one address gets 421 4.7.0 and is closed."""
    server = Server(total=10, per_client=2)
    first = server.connect()
    second = server.connect()
    _, third = server.connect()
    assert not first[1].disconnecting and not second[1].disconnecting
    assert third.value() == b"421 4.7.0 Too many connections, try again later\r\n"
    assert third.disconnecting
    _, other = server.connect("192.0.2.8")
    assert other.value().startswith(b"220 ")


def test_overall_cap() -> None:
    """Beyond max_connections every new client gets 421 4.7.0 and is closed."""
    server = Server(total=2, per_client=2)
    server.connect("192.0.2.1")
    server.connect("192.0.2.2")
    _, third = server.connect("192.0.2.3")
    assert refused(third)


def test_a_closed_connection_frees_its_slot() -> None:
    """When a session ends, its address may connect again; refusals free nothing."""
    server = Server(total=1, per_client=1)
    protocol, transport = server.connect()
    refused_protocol, refused_transport = server.connect()
    close(refused_protocol, refused_transport)
    assert refused(server.connect()[1])
    protocol.dataReceived(b"QUIT\r\n")
    assert transport.disconnecting
    close(protocol, transport)
    assert server.limits.active == {}
    assert server.connect()[1].value().startswith(b"220 ")


def test_ipv6_clients_are_capped_by_their_64() -> None:
    """IPv6 clients count by their /64 (RFC 7421): another address of the same
    /64 is refused, one of another /64 is not, and closing frees the slot."""
    server = Server(total=10, per_client=1)
    protocol, transport = server.connect("2001:db8::1")
    assert refused(server.connect("2001:db8::2")[1])
    assert refused(server.connect("2001:db8::ffff:1:2")[1])
    assert not refused(server.connect("2001:db8:0:1::1")[1])
    close(protocol, transport)
    assert not refused(server.connect("2001:db8::2")[1])


def test_an_ipv4_client_mapped_into_ipv6_counts_as_itself() -> None:
    """::ffff:192.0.2.7 on an IPv6 socket is the same client as 192.0.2.7."""
    server = Server(total=10, per_client=1)
    server.connect("192.0.2.7")
    assert refused(server.connect("::ffff:192.0.2.7")[1])


def test_silent_client_times_out() -> None:
    """A client that never speaks gets 421 4.4.2 after idle_timeout and is closed."""
    server = Server()
    protocol, transport = server.connect()
    transport.clear()
    server.clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    server.clock.advance(1)
    assert transport.value() == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert transport.disconnecting
    close(protocol, transport)
    assert server.limits.active == {}


def test_each_complete_command_restarts_the_timer() -> None:
    """A client that sends a whole command now and then is not timed out."""
    server = Server()
    protocol, transport = server.connect()
    for _ in range(5):
        server.clock.advance(IDLE_TIMEOUT - 1)
        protocol.dataReceived(b"NOOP\r\n")
    assert not transport.disconnecting


@pytest.mark.parametrize("before", [b"", b"EHLO client.example\r\n"])
def test_an_octet_a_minute_does_not_hold_the_slot(before: bytes) -> None:
    """Octets that never complete a command within idle_timeout do not keep it."""
    server = Server(total=1, per_client=1)
    protocol, transport = server.connect()
    protocol.dataReceived(before)
    command = b"NOOP\r\n" * 10
    for octet in command:
        server.clock.advance(60)
        if transport.disconnecting:
            break
        protocol.dataReceived(bytes([octet]))
    assert transport.disconnecting
    assert transport.value().endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")
    # Timed out after the idle timeout, not after the whole trickle.
    assert server.clock.seconds() <= IDLE_TIMEOUT + 60
    close(protocol, transport)
    assert server.connect()[1].value().startswith(b"220 ")


def start_transaction(protocol: SMTPServerProtocol) -> None:
    protocol.dataReceived(
        b"EHLO client.example\r\nMAIL FROM:<s@example.net>\r\n"
        b"RCPT TO:<alice@example.org>\r\n"
    )


def test_an_octet_a_minute_of_message_text_times_out() -> None:
    """Message text that never completes a line within idle_timeout is timed out."""
    server = Server()
    protocol, transport = server.connect()
    start_transaction(protocol)
    protocol.dataReceived(b"DATA\r\n")
    for _ in range(10):
        server.clock.advance(60)
        if transport.disconnecting:
            break
        protocol.dataReceived(b"x")
    assert transport.disconnecting
    assert transport.value().endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")


def test_an_octet_a_minute_of_a_bdat_chunk_times_out() -> None:
    """A BDAT chunk trickled an octet a minute is timed out like any idle client."""
    server = Server()
    protocol, transport = server.connect()
    start_transaction(protocol)
    protocol.dataReceived(b"BDAT 100000 LAST\r\n")
    for _ in range(60):
        server.clock.advance(60)
        if transport.disconnecting:
            break
        protocol.dataReceived(b"x")
    assert transport.disconnecting


def test_empty_lines_trickled_into_a_message_do_not_hold_the_slot() -> None:
    """An empty text line every four minutes does not keep a session for hours."""
    server = Server()
    protocol, transport = server.connect()
    start_transaction(protocol)
    protocol.dataReceived(b"DATA\r\n")
    for _ in range(60):
        server.clock.advance(240)
        if transport.disconnecting:
            break
        protocol.dataReceived(b"\r\n")
    assert transport.disconnecting
