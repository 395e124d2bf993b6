"""
The next hop's side of a client connection on Twisted's fakes: what an SMTP
client under test (the outbound agent, a worker's hand-off) sent, and the
replies a test scripts for it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

GREETING = b"220 next.test ESMTP\r\n"
EHLO = b"250-next.test\r\n250 PIPELINING\r\n"
ENVELOPE_OK = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
QUEUED = b"250 2.0.0 queued\r\n"


def _replies(data: bytes) -> list[bytes]:
    """``data`` cut after each complete reply (a line "NNN " or "NNN")."""
    pieces = []
    start = end = 0
    for line in data.splitlines(keepends=True):
        end += len(line)
        if len(line.rstrip(b"\r\n")) == 3 or line[3:4] == b" ":
            pieces.append(data[start:end])
            start = end
    if start < len(data):
        pieces.append(data[start:])
    return pieces if pieces else [data]


class Connection:
    """One fake connection a client opened: its protocol and transport."""

    def __init__(self, factory: Factory, address: IAddress) -> None:
        protocol = factory.buildProtocol(address)
        assert protocol is not None
        self.protocol: Any = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def reply(self, data: bytes) -> None:
        """
        Replies from the next hop, each read on its own (a script may give
        replies to commands the client has yet to send: a next hop cannot
        send those before the client's commands, so neither is read before
        them); the content is drained on 354.
        """
        for one in _replies(data):
            self.protocol.dataReceived(one)
            while self.transport.producer is not None:
                self.transport.producer.resumeProducing()

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def close(self) -> None:
        """The connection ends."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
