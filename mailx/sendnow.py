"""
Replies sent in the call that makes them, not on the reactor's next turn.

``transport.write`` on a TCP connection queues the octets, asks the reactor
to watch the socket for writability (an ``epoll_ctl``), sends them on the
next turn and stops watching (another ``epoll_ctl``).  An SMTP server sends a
handful of short replies per message, each of which fits in the socket's
send buffer at once: under load those two system calls a reply were the
largest single cost of the reactor thread after ``send`` itself
(benchmarks/README.md, issue 7).

``write_now`` sends at once when Twisted has nothing queued for the
connection, and hands whatever the kernel did not take to ``transport.write``
as before, so the order of octets and Twisted's flow control are unchanged.
It reads three attributes of ``twisted.internet.tcp.Connection`` that are
not part of its interface (the queue's state); if a Twisted release changes
them, every write takes the ordinary path and ``tests/test_sendnow.py``
fails, which says so.

A pull producer is resumed only when the queue drains, so its writes take
the queue, except those of the registered producer itself when it says so
(``producer``): it learns from the result that a block went out whole, and
writes the next one in the same call (``mailx.client``).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import process, tcp


def write_now(transport: Any, data: bytes, producer: object = None) -> bool:
    """
    Write ``data`` to ``transport``, sending at once where that is safe; True
    when all of it went out at once, False when some of it is queued.
    ``producer`` is the pull producer registered with the transport when it
    is the one writing.
    """
    if data and _queue_empty(transport, producer):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Broken pipe, reset: Twisted finds out on its own write and
            # closes the connection the usual way.
            sent = 0
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return False


def _queue_empty(transport: Any, producer: object = None) -> bool:
    """True for a plain TCP connection, open, with nothing queued to send."""
    if not isinstance(transport, tcp.Connection):
        return False
    try:
        if transport.TLS or not transport.connected or transport.disconnecting:
            return False
        if transport._writeDisconnected:
            return False
        # A pull producer is resumed only when the queue drains: writes go
        # through the queue, except the producer's own that asked to go at
        # once (it carries on itself when they do).
        pull = transport.producer is not None and not transport.streamingProducer
        if pull and transport.producer is not producer:
            return False
        return bool(
            not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
        )
    except AttributeError:
        return False


def write_pipe_now(writer: Any, data: bytes) -> None:
    """
    ``write_now`` for the pipe to an agent's standard input
    (``mailx.agentprocess``): written at once when Twisted holds nothing
    for it, the rest queued as ``writer.write`` does.
    """
    if data and _pipe_queue_empty(writer):
        try:
            sent = os.write(writer.fd, data)
        except OSError:
            # Full (BlockingIOError), or closed: the queue's way finds out.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    writer.write(data)


def _pipe_queue_empty(writer: Any) -> bool:
    """True for an open pipe to a process, with nothing queued to write."""
    if not isinstance(writer, process.ProcessWriter):
        return False
    try:
        if not writer.connected or writer.disconnecting or writer.producer:
            return False
        return bool(not writer._tempDataLen and writer.offset == len(writer.dataBuffer))
    except AttributeError:
        return False
