"""write_now: replies sent in the call that makes them, in order, or queued."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from mailx.sendnow import write_now

# Twisted's tcp.Connection is untyped: the tests hold it as Any.
Pair = tuple[Any, socket.socket, MemoryReactor]


class Pull:
    """A pull producer that makes nothing."""

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A Twisted TCP connection on one end of a socket pair, the peer's end."""
    ours, peer = socket.socketpair()
    reactor = MemoryReactor()
    transport = tcp.Connection(ours, Protocol(), reactor)
    transport.connected = 1
    peer.setblocking(False)
    yield transport, peer, reactor
    ours.close()
    peer.close()


def received(peer: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def test_sent_at_once_without_asking_the_reactor(
    pair: Pair,
) -> None:
    """With nothing queued, the octets are on the socket when write_now returns."""
    transport, peer, reactor = pair
    write_now(transport, b"250 2.0.0 OK\r\n")
    assert received(peer) == b"250 2.0.0 OK\r\n"
    assert transport not in reactor.getWriters()


def test_queued_octets_go_first(
    pair: Pair,
) -> None:
    """Behind octets Twisted still holds, the new ones queue up, in order."""
    transport, peer, _ = pair
    transport.write(b"220 ready\r\n")
    write_now(transport, b"250 OK\r\n")
    assert received(peer) == b""
    transport.doWrite()
    assert received(peer) == b"220 ready\r\n250 OK\r\n"


def test_what_the_kernel_does_not_take_is_queued(
    pair: Pair,
) -> None:
    """Past a full send buffer the rest is queued, and arrives whole and in order."""
    transport, peer, reactor = pair
    data = bytes(range(256)) * (16 * 1024)  # 4 MiB, more than a socket buffer
    write_now(transport, data)
    assert transport in reactor.getWriters()
    got = received(peer)
    for _ in range(1000):
        if transport not in reactor.getWriters():
            break
        transport.doWrite()
        got += received(peer)
    assert got == data


def test_a_pull_producer_keeps_the_queue(
    pair: Pair,
) -> None:
    """With a pull producer registered, writes go through Twisted's queue, which
    is what resumes the producer."""
    transport, peer, reactor = pair
    transport.registerProducer(Pull(), False)
    write_now(transport, b"block")
    assert received(peer) == b""
    assert transport in reactor.getWriters()


def test_a_closing_connection_takes_the_ordinary_path(
    pair: Pair,
) -> None:
    """After loseConnection, nothing more goes out."""
    transport, peer, _ = pair
    transport.loseConnection()
    write_now(transport, b"late")
    assert received(peer) == b""


def test_other_transports_take_the_ordinary_path() -> None:
    """A transport that is not a plain TCP connection gets ``write``."""
    transport = StringTransport()
    write_now(transport, b"221 bye\r\n")
    assert transport.value() == b"221 bye\r\n"
