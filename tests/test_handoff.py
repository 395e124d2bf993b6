"""
A worker's hand-off to the main process (mailx.workers.HandoffQueue), on
Twisted's fakes: one connection carries message after message, and a kept
connection that is gone or closing is replaced without losing the message.
"""

from __future__ import annotations

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import MemoryReactorClock

from mailx.address import Address
from mailx.envelope import Envelope, Recipient, Route
from mailx.workers import HandoffQueue
from tests.fakepeer import EHLO, ENVELOPE_OK, GREETING, QUEUED, Connection

CONTENT = b"Subject: hand-off\r\n\r\nHello.\r\n"


def opened(reactor: MemoryReactorClock, index: int) -> Connection:
    """The fake UNIX connection a hand-off opened, by its index."""
    path, factory, _, _ = reactor.unixClients[index]
    return Connection(factory, UNIXAddress(path))


def hand_off(queue: HandoffQueue, message_id: str) -> list[object]:
    """Hand one relayed message over; what the hand-off fired with so far."""
    envelope = Envelope(
        reverse_path=Address("alice", "here.test"),
        recipients=[Recipient(Address("bob", "remote.test"), Route.RELAY)],
        message_id=message_id,
    )
    outcome: list[object] = []
    queue.enqueue(envelope, CONTENT).addBoth(outcome.append)
    return outcome


def first(reactor: MemoryReactorClock, queue: HandoffQueue) -> Connection:
    outcome = hand_off(queue, "W1")
    connection = opened(reactor, 0)
    connection.reply(GREETING + EHLO + ENVELOPE_OK)
    connection.reply(QUEUED)
    assert outcome == ["W1"]
    connection.sent()
    return connection


def test_messages_share_one_connection() -> None:
    """After a message the connection stays open, without QUIT, and the next
    message goes over it with MAIL: no new connection, no EHLO."""
    reactor = MemoryReactorClock()
    queue = HandoffQueue(reactor, "/run/mailx/handoff.sock", "worker.test")
    connection = first(reactor, queue)

    outcome = hand_off(queue, "W2")
    sent = connection.sent()
    assert sent.startswith(b"MAIL FROM:<alice@here.test>")
    assert b"EHLO" not in sent
    connection.reply(ENVELOPE_OK)
    connection.reply(QUEUED)

    assert outcome == ["W2"]
    assert len(reactor.unixClients) == 1


def test_a_kept_connection_that_is_gone_is_replaced() -> None:
    """A kept connection closed meanwhile is not used; the message goes over
    a new one and is handed over once."""
    reactor = MemoryReactorClock()
    queue = HandoffQueue(reactor, "/run/mailx/handoff.sock", "worker.test")
    first(reactor, queue).close()

    outcome = hand_off(queue, "W2")
    fresh = opened(reactor, 1)
    fresh.reply(GREETING + EHLO + ENVELOPE_OK)
    fresh.reply(QUEUED)
    assert outcome == ["W2"]


def test_a_421_at_the_next_mail_goes_to_a_new_connection() -> None:
    """The main process closing a kept connection with 421 at MAIL costs the
    message nothing: it goes over a new connection."""
    reactor = MemoryReactorClock()
    queue = HandoffQueue(reactor, "/run/mailx/handoff.sock", "worker.test")
    kept = first(reactor, queue)

    outcome = hand_off(queue, "W2")
    kept.reply(b"421 4.4.2 idle too long\r\n")
    kept.close()
    assert outcome == []
    fresh = opened(reactor, 1)
    fresh.reply(GREETING + EHLO + ENVELOPE_OK)
    fresh.reply(QUEUED)
    assert outcome == ["W2"]


def test_a_maildir_recipient_is_handed_over_as_one() -> None:
    """A recipient the worker resolved to one Maildir goes with
    X-MAILX-MAILBOX, so the main process writes that Maildir as named."""
    reactor = MemoryReactorClock()
    queue = HandoffQueue(reactor, "/run/mailx/handoff.sock", "worker.test")
    envelope = Envelope(
        reverse_path=Address("alice", "here.test"),
        recipients=[
            Recipient(Address("carol", "example.org"), Route.MAILBOX),
            Recipient(Address("bob", "remote.test"), Route.RELAY),
        ],
        message_id="W1",
    )
    queue.enqueue(envelope, CONTENT)
    connection = opened(reactor, 0)
    connection.reply(GREETING + b"250-main.test\r\n250-PIPELINING\r\n")
    connection.reply(b"250 X-MAILX-MAILBOX\r\n")
    sent = connection.sent()
    assert b"RCPT TO:<carol@example.org> X-MAILX-MAILBOX\r\n" in sent
    assert b"RCPT TO:<bob@remote.test>\r\n" in sent
