"""
The Twisted side of the SMTP server: a thin protocol that feeds octets to a
``mailx.session.Session`` and carries out what it asks (write, start TLS,
close), a factory per listener, and the connection limits they share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailx import replies
from mailx.clients import client_key
from mailx.envelope import ClientInfo, MessageSink, Policy
from mailx.maillog import maillog
from mailx.sendnow import write_now
from mailx.session import Authenticator, Session, SessionConfig

# Input held while the client does not read our replies, before reading stops.
MAX_UNREAD = 65536
# Octets a second of message text that keep a session alive (Postfix's
# smtpd_min_data_rate default).
MIN_DATA_RATE = 500


class ConnectionLimits:
    """
    Caps on concurrent sessions, overall and per client: an IPv4 address or
    an IPv6 /64 (``mailx.clients.client_key``).
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.active: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        if sum(self.active.values()) >= self.total:
            return False
        key = client_key(address)
        if self.active[key] >= self.per_client:
            return False
        self.active[key] += 1
        return True

    def release(self, address: str) -> None:
        key = client_key(address)
        self.active[key] -= 1
        if self.active[key] <= 0:
            del self.active[key]


@dataclass
class ListenerSettings:
    """What differs between the SMTP, submission and implicit-TLS listeners."""

    name: str
    session: SessionConfig
    idle_timeout: float
    # RFC 8314: the transport is already TLS when the session starts.
    implicit_tls: bool = False
    tls: IOpenSSLServerConnectionCreator | None = None


@implementer(IPushProducer)
class SMTPServerProtocol(Protocol):
    """
    Adapts one connection to a ``Session``.

    It is also the producer of its replies: when a client pipelines commands
    and does not read the replies, the transport's buffer fills, Twisted
    pauses this producer, and it stops reading from the client until the
    buffer drains.  Memory stays bounded whatever the client does.
    """

    factory: SMTPServerFactory
    session: Session | None = None
    _address = ""
    _counted = False
    _timer: IDelayedCall | None = None
    _reading_paused = False

    def connectionMade(self) -> None:
        settings = self.factory.settings
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        address, port = _host_and_port(peer)
        self._address = address
        if not self.factory.limits.acquire(address):
            maillog.info(
                "reject: connection from [{client_address}]: too many connections",
                client_address=address,
            )
            self.transport.write(  # type: ignore[union-attr]
                replies.TOO_MANY_CONNECTIONS.to_bytes()
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._counted = True

        client = ClientInfo(
            address=address,
            port=port,
            tls=settings.implicit_tls,
            listener=settings.name,
        )
        self.session = Session(
            settings.session,
            client,
            self.factory.policy,
            self.factory.sink,
            self,
            self.factory.clock.seconds,
            self.factory.authenticator,
        )
        self._restart_timer()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.factory.sessions.add(self)
        self.session.connection_made()

    def dataReceived(self, data: bytes) -> None:
        if self.session is None:
            return
        # The timer restarts when a command is complete.  While message text
        # arrives, each octet buys 1/MIN_DATA_RATE seconds, up to the whole
        # timeout: a client that trickles octets or empty lines cannot hold
        # its slot (Postfix's smtpd_min_data_rate works the same way).
        before = self.session.commands
        self.session.data_received(data)
        if self.session.commands != before:
            self._restart_timer()
        elif self.session.receiving_message:
            self._extend_timer(len(data) / MIN_DATA_RATE)
        if self.session.unread > MAX_UNREAD and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.session is not None:
            self.session.connection_lost()
            self.factory.sessions.discard(self)
        if self._counted:
            self._counted = False
            self.factory.limits.release(self._address)

    def _restart_timer(self) -> None:
        timeout = self.factory.settings.idle_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.factory.clock.callLater(timeout, self._timed_out)

    def _extend_timer(self, seconds: float) -> None:
        timer = self._timer
        if timer is None or not timer.active():
            return
        remaining = timer.getTime() - self.factory.clock.seconds()
        timer.reset(min(self.factory.settings.idle_timeout, remaining + seconds))

    def _timed_out(self) -> None:
        self._timer = None
        if self.session is not None:
            self.session.timed_out()

    # IPushProducer: while our replies are not being read, answer nothing
    # more; once the unread input passes a bound, stop reading the socket.
    # The transport is not paused at once: a TLS transport pauses us during
    # its handshake, and must go on reading to finish it.

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause()

    def resumeProducing(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if self.session is not None:
            self.session.resume()

    def stopProducing(self) -> None:
        pass

    # mailx.session.SessionOutput

    def write(self, data: bytes) -> None:
        write_now(self.transport, data)

    def start_tls(self) -> None:
        context = self.factory.settings.tls
        transport = self.transport
        if context is None or not ITLSTransport.providedBy(transport):
            self.write(replies.TLS_NOT_AVAILABLE.to_bytes())
            self.close()
            return
        transport.startTLS(context)
        # Octets the client sent in the clear after STARTTLS were dropped by
        # the session; from here on the transport hands us decrypted data.
        assert self.session is not None
        self.session.tls_started()

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class SMTPServerFactory(ServerFactory):
    protocol = SMTPServerProtocol  # type: ignore[assignment]
    # The mail log says what happens; no "starting factory" lines.
    noisy = False

    def __init__(
        self,
        settings: ListenerSettings,
        policy: Policy,
        sink: MessageSink,
        clock: IReactorTime,
        limits: ConnectionLimits,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.clock = clock
        self.limits = limits
        self.authenticator = authenticator
        self.sessions: set[SMTPServerProtocol] = set()

    def shut_down(self) -> None:
        """Tell every open session 421 and close it (RFC 5321 section 3.8)."""
        for protocol in list(self.sessions):
            if protocol.session is not None:
                protocol.session.shutting_down()


def _host_and_port(peer: IAddress) -> tuple[str, int]:
    host = getattr(peer, "host", "")
    port = getattr(peer, "port", 0)
    return str(host), int(port)
