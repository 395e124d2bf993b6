"""
Connection reuse by the outbound agent, on Twisted's fakes: a connection
whose transaction the next hop accepted carries the next message to the same
next hop, is closed when idle too long, and is replaced when it turns out to
be dead.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from mailx.address import Address
from mailx.envelope import Envelope, Recipient, Route
from mailx.outbound import CONNECTION_IDLE_TIME, SHUTDOWN_QUIT_WAIT, OutboundAgent
from mailx.spool import RecipientResult
from tests.fakepeer import EHLO, ENVELOPE_OK, GREETING, QUEUED, Connection

NEXT_HOP = ("192.0.2.25", 2525)
CONTENT = b"Subject: reuse\r\n\r\nHello.\r\n"


def opened(reactor: MemoryReactorClock, index: int) -> Connection:
    """The fake TCP connection the agent opened, by its index."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    return Connection(factory, IPv4Address("TCP", host, port))


def make_agent(reactor: MemoryReactorClock) -> OutboundAgent:
    # The smarthost is an address, so nothing is ever looked up.
    return OutboundAgent(
        reactor, "mx.test", [], [], smarthost=NEXT_HOP, resolver=object()
    )


def deliver(agent: OutboundAgent, message_id: str) -> list[RecipientResult]:
    """Start a delivery of one message to one recipient; its results so far."""
    recipient = Address("bob", "remote.test")
    envelope = Envelope(
        Address("alice", "here.test"),
        recipients=[Recipient(recipient, Route.RELAY)],
        message_id=message_id,
    )
    got: list[RecipientResult] = []
    attempt: Deferred[list[RecipientResult]] = agent.deliver(
        envelope.reverse_path, "remote.test", [recipient], CONTENT, envelope
    )
    attempt.addCallback(got.extend)
    return got


def codes(results: list[RecipientResult]) -> list[int]:
    return [result.reply.code for result in results]


def first_delivery(reactor: MemoryReactorClock, agent: OutboundAgent) -> Connection:
    results = deliver(agent, "M1")
    connection = opened(reactor, 0)
    connection.reply(GREETING + EHLO + ENVELOPE_OK)
    connection.reply(QUEUED)
    assert codes(results) == [250]
    return connection


def test_the_next_message_goes_over_the_kept_connection() -> None:
    """After an accepted message the connection stays open without QUIT, and
    the next message starts with MAIL on it, no new connection, no EHLO."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    assert b"QUIT" not in connection.sent()

    results = deliver(agent, "M2")
    sent = connection.sent()
    assert sent.startswith(b"MAIL FROM:<alice@here.test>")
    assert b"EHLO" not in sent
    connection.reply(ENVELOPE_OK)
    connection.reply(QUEUED)

    assert codes(results) == [250]
    assert len(reactor.tcpClients) == 1


def test_an_idle_connection_is_closed_after_the_idle_time() -> None:
    """A kept connection nobody uses gets QUIT once the idle time is over,
    and the next message opens a new one."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    connection.sent()

    reactor.advance(CONNECTION_IDLE_TIME - 0.1)
    assert connection.sent() == b""
    reactor.advance(0.1)
    assert connection.sent() == b"QUIT\r\n"
    connection.reply(b"221 2.0.0 bye\r\n")
    assert connection.transport.disconnecting

    deliver(agent, "M2")
    assert len(reactor.tcpClients) == 2


def test_a_dead_kept_connection_is_replaced() -> None:
    """A kept connection that closes before answering the next message's
    first command is replaced by a new one, and the message is delivered."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    stale = first_delivery(reactor, agent)
    stale.sent()

    results = deliver(agent, "M2")
    stale.close()
    assert results == []
    fresh = opened(reactor, 1)
    fresh.reply(GREETING + EHLO + ENVELOPE_OK)
    fresh.reply(QUEUED)

    assert codes(results) == [250]
    assert b"Hello." in fresh.sent()


def test_a_refused_message_ends_the_connection() -> None:
    """After a refused message the client QUITs; nothing is kept."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    results = deliver(agent, "M1")
    connection = opened(reactor, 0)
    connection.reply(GREETING + EHLO + ENVELOPE_OK)
    connection.reply(b"554 5.6.0 refused\r\n")
    assert connection.sent().endswith(b"QUIT\r\n")
    connection.reply(b"221 2.0.0 bye\r\n")
    connection.close()

    assert codes(results) == [554]
    deliver(agent, "M2")
    assert len(reactor.tcpClients) == 2


def test_a_421_on_an_idle_connection_closes_it() -> None:
    """A next hop that says 421 while the connection is idle has it closed;
    the next message goes over a new connection."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    connection.reply(b"421 4.4.2 idle too long\r\n")

    assert connection.transport.disconnecting
    deliver(agent, "M2")
    assert len(reactor.tcpClients) == 2


def test_a_421_to_mail_on_a_kept_connection_goes_to_a_new_one() -> None:
    """A next hop that ends a kept connection with 421 at the next message's
    MAIL (a limit of messages per connection) gets the message again over a
    new connection, in the same attempt."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    kept = first_delivery(reactor, agent)
    kept.sent()

    results = deliver(agent, "M2")
    assert kept.sent().startswith(b"MAIL FROM:")
    kept.reply(b"421 4.7.0 too many messages in this session\r\n")
    kept.close()
    assert results == []
    fresh = opened(reactor, 1)
    fresh.reply(GREETING + EHLO + ENVELOPE_OK)
    fresh.reply(QUEUED)

    assert codes(results) == [250]


def test_a_421_to_mail_on_a_new_connection_is_the_outcome() -> None:
    """On a connection of its own, 421 to MAIL ends the attempt with 421:
    there is no older connection to blame."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    results = deliver(agent, "M1")
    connection = opened(reactor, 0)
    connection.reply(GREETING + EHLO + b"421 4.7.0 too many messages\r\n")
    connection.close()

    assert codes(results) == [421]
    assert len(reactor.tcpClients) == 1


def test_close_idle_quits_every_kept_connection() -> None:
    """close_idle sends QUIT on each kept connection and fires once they are
    closed."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    connection.sent()
    closed: list[Any] = []

    agent.close_idle().addCallback(closed.append)
    assert connection.sent() == b"QUIT\r\n"
    assert closed == []
    connection.reply(b"221 2.0.0 bye\r\n")
    connection.close()

    assert len(closed) == 1


def shutdown_triggers(reactor: MemoryReactorClock) -> list[Any]:
    return [call for call, _, _ in reactor.triggers["before"]["shutdown"]]


def test_stopping_quits_kept_connections_within_a_bound() -> None:
    """When mailx stops, each kept connection gets QUIT; the stop waits for
    it to close, but never longer than the bound."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    connection.sent()
    (trigger,) = shutdown_triggers(reactor)
    stopped: list[None] = []

    trigger().addCallback(stopped.append)
    assert connection.sent() == b"QUIT\r\n"
    reactor.advance(SHUTDOWN_QUIT_WAIT - 0.1)
    assert stopped == []
    reactor.advance(0.1)
    assert stopped == [None]


def test_stopping_ends_as_soon_as_kept_connections_close() -> None:
    """A next hop that answers QUIT and closes lets the stop go on at once."""
    reactor = MemoryReactorClock()
    agent = make_agent(reactor)
    connection = first_delivery(reactor, agent)
    (trigger,) = shutdown_triggers(reactor)
    stopped: list[None] = []

    trigger().addCallback(stopped.append)
    connection.reply(b"221 2.0.0 bye\r\n")
    connection.close()

    assert stopped == [None]
