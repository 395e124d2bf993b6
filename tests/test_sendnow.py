"""write_now: replies and content sent at once when nothing is queued, in order."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from mailx import client
from mailx.address import Address
from mailx.client import ClientSession, SMTPClientProtocol, Timeouts, Transaction
from mailx.sendnow import write_now

# Twisted's tcp.Connection is untyped: the tests hold it as Any.
Pair = tuple[Any, socket.socket, MemoryReactor]
SocketPair = tuple[socket.socket, socket.socket]


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


def test_the_pull_producer_itself_may_send_at_once(
    pair: Pair,
) -> None:
    """The registered pull producer's own write goes out at once, and says so."""
    transport, peer, reactor = pair
    producer = Pull()
    transport.registerProducer(producer, False)
    assert write_now(transport, b"block", producer)
    assert received(peer) == b"block"
    assert transport not in reactor.getWriters()


# The content relayed through the client's producer, over real TCP on
# loopback (the client turns Nagle off, which a socket pair refuses).


@contextmanager
def tcp_pair(buffer: int | None = None) -> Iterator[SocketPair]:
    """Our end and the peer's of a TCP connection on 127.0.0.1, with small
    send and receive buffers if ``buffer`` is given."""
    with socket.socket() as listener:
        if buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.socket()
        if buffer is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        ours.connect(listener.getsockname())
        peer, _ = listener.accept()
    peer.settimeout(10)
    with ours, peer:
        yield ours, peer


def read_until(peer: socket.socket, end: bytes, got: bytes = b"") -> bytes:
    """What the peer receives up to and with ``end``; bounded by its timeout."""
    while not got.endswith(end):
        chunk = peer.recv(1 << 20)
        assert chunk, got[-200:]
        got += chunk
    return got


def client_at_354(
    ours: socket.socket, content: bytes, block_size: int
) -> tuple[SMTPClientProtocol, Any, MemoryReactor]:
    """A client on ``ours`` whose next hop has accepted MAIL, RCPT and DATA."""
    reactor = MemoryReactor()
    recipient = Address("r", "next.test")
    session = ClientSession(
        "me.test",
        Transaction(Address("s", "src.test"), [recipient], content),
        block_size=block_size,
    )
    protocol = SMTPClientProtocol(session, Clock(), Timeouts())
    transport = tcp.Connection(ours, protocol, reactor)
    transport.connected = 1
    protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    protocol.dataReceived(b"220 next.test\r\n")
    protocol.dataReceived(b"250-next.test\r\n250 PIPELINING\r\n")
    protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
    return protocol, transport, reactor


def write_turns(transport: Any, reactor: MemoryReactor) -> int:
    """Run the reactor's write turns until nothing is queued; how many."""
    for turn in range(100):
        if transport not in reactor.getWriters():
            return turn
        transport.doWrite()
    raise AssertionError("the queue never drained")


def test_content_blocks_the_kernel_takes_go_out_in_one_call() -> None:
    """Content in blocks, each taken whole, is on the socket without a turn."""
    content = (b"a" * 1022 + b"\r\n") * 5
    with tcp_pair() as (ours, peer):
        protocol, transport, reactor = client_at_354(ours, content, 1024)
        read_until(peer, b"DATA\r\n")
        protocol.dataReceived(b"354 go\r\n")
        assert transport.producer is None
        assert write_turns(transport, reactor) == 0
        assert read_until(peer, b"\r\n.\r\n") == content + b".\r\n"


def test_a_queued_block_comes_after_direct_limit_octets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past DIRECT_LIMIT octets in one call a block waits for its turn, and
    Twisted resumes the content after it, in order."""
    monkeypatch.setattr(client, "DIRECT_LIMIT", 2048)
    content = (b"a" * 1022 + b"\r\n") * 5
    with tcp_pair() as (ours, peer):
        protocol, transport, reactor = client_at_354(ours, content, 1024)
        read_until(peer, b"DATA\r\n")
        protocol.dataReceived(b"354 go\r\n")
        # Blocks 1-2 at once, 3 queued; 4-5 at once, the end of data queued.
        assert write_turns(transport, reactor) == 2
        assert transport.producer is None
        assert read_until(peer, b"\r\n.\r\n") == content + b".\r\n"


def test_a_block_the_kernel_does_not_take_whole_waits_in_the_queue() -> None:
    """Past full socket buffers the content arrives whole and in order."""
    line = bytes(range(97, 123)) * 39 + b"\r\n"
    content = line * 1024  # 1 MiB, blocks of 256 KiB, buffers of some 64 KiB
    with tcp_pair(buffer=32 * 1024) as (ours, peer):
        protocol, transport, reactor = client_at_354(ours, content, 256 * 1024)
        read_until(peer, b"DATA\r\n")
        protocol.dataReceived(b"354 go\r\n")
        assert transport in reactor.getWriters()
        got = b""
        for _ in range(10000):
            if transport not in reactor.getWriters():
                break
            transport.doWrite()
            got += peer.recv(1 << 20)
        assert transport.producer is None
        assert read_until(peer, b"\r\n.\r\n", got) == content + b".\r\n"
