"""
The outbound ``DeliveryAgent``: find the next hops of a domain and hand the
message to the first that takes it.

Theory of operation
-------------------
``OutboundAgent.deliver`` resolves the domain (``mailx.mx``), or takes the
smarthost or the address literal instead, and walks the addresses of the next
hops in order, at most ``max_hosts`` of them.  Each address gets one SMTP
session (``mailx.client``) for the recipients still open.  A reply that
settles a recipient (RCPT refused, the final reply to the content) ends its
walk; a host-level failure (no connection, 421, timeout, dropped connection,
MAIL refused) sends it on to the next address.  Once the walk ends, a
recipient still open gets the last host-level reply: permanent only if every
host that answered said so permanently, temporary otherwise.

The agent never fails its Deferred for delivery problems: every recipient
gets a reply.  One mail log line is written per attempt and reply.

Connection reuse: a session whose transaction the next hop accepted stays
open, idle, for ``idle_time`` seconds, and the next message for the same
address, port, host name and TLS mode goes over it (as Postfix's connection
cache does).  A kept connection the next hop closed in the meantime shows as
a failure before any reply; the message then goes over a new connection.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
)

from mailx import replies
from mailx.address import Address
from mailx.client import (
    MAX_RECIPIENTS_PER_TRANSACTION,
    ClientSession,
    SessionOutcome,
    SMTPClientProtocol,
    Timeouts,
    TLSMode,
    Transaction,
    nothing_taken,
)
from mailx.config import Config
from mailx.envelope import Envelope
from mailx.maillog import PrintableLogger, maillog
from mailx.mx import (
    HostHealth,
    MXResolver,
    OwnAddresses,
    ResolutionError,
    is_ip_address,
    make_dns_resolver,
)
from mailx.replies import Reply
from mailx.spool import RecipientResult

log = PrintableLogger()

# RFC 5321 section 4.5.4.2: the SMTP port.
SMTP_PORT = 25
# The bound on hosts and addresses tried per attempt.
DEFAULT_MAX_HOSTS = 5
# How long an idle connection waits for the next message, and how long one
# connection is used in all: Postfix's smtp_connection_cache_time_limit (2 s)
# and smtp_connection_reuse_time_limit (300 s).
CONNECTION_IDLE_TIME = 2.0
CONNECTION_REUSE_TIME = 300.0
# Idle connections kept in all (our choice): the spool delivers at most 20
# messages at once (spool.MAX_PARALLEL), so a few dozen cover its next hops.
MAX_IDLE_CONNECTIONS = 50
# How long a stopping mailx waits for kept connections to answer QUIT (our
# choice: as long as a connection may stay idle).
SHUTDOWN_QUIT_WAIT = 2.0
# Verified-TLS client options kept, one per next-hop host name (our choice:
# far more hosts than a tls_policy names; beyond it the cache starts over).
MAX_CACHED_TLS_HOSTS = 1000


# What a kept connection is good for: host name, address, port, TLS mode.
ConnectionKey = tuple[str, str, int, TLSMode]


class _IdleConnection:
    """A connection kept for reuse, with its expiry timer."""

    def __init__(self, protocol: SMTPClientProtocol, opened: float) -> None:
        self.protocol = protocol
        self.opened = opened
        self.expiry: IDelayedCall | None = None


class _OneConnection(Factory):
    """
    Builds the one protocol it was given.  Quiet, unlike the factory of
    ``connectProtocol``, which writes a "Starting factory" and a "Stopping
    factory" line to the debug log for every outbound connection.
    """

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> SMTPClientProtocol:
        return self._protocol


class OutboundAgent:
    """Delivers queued mail to the exchanges of its domain, or a smarthost."""

    def __init__(
        self,
        reactor: Any,
        hostname: str,
        own_addresses: Sequence[str],
        dns_servers: Sequence[tuple[str, int]],
        port: int = SMTP_PORT,
        smarthost: tuple[str, int] | None = None,
        smarthost_user: str = "",
        smarthost_password: str = "",
        max_hosts: int = DEFAULT_MAX_HOSTS,
        timeouts: Timeouts | None = None,
        tls_policy: Mapping[str, str] | None = None,
        tls_trust_root: Any = None,
        dns_timeout: float = 5.0,
        allow_literals: bool = True,
        resolver: Any = None,
        rng: random.Random | None = None,
        idle_time: float = CONNECTION_IDLE_TIME,
    ) -> None:
        self._reactor = reactor
        self._hostname = hostname
        self._own = OwnAddresses(own_addresses)
        self._port = port
        self._smarthost = smarthost
        self._auth = (smarthost_user, smarthost_password) if smarthost_user else None
        self._max_hosts = max_hosts
        self._timeouts = timeouts or Timeouts()
        self._tls_policy = {k.lower(): v for k, v in (tls_policy or {}).items()}
        self._trust_root = tls_trust_root
        # TLS client options, built when a session first needs them.
        self._opportunistic_tls: CertificateOptions | None = None
        self._verified_tls: dict[str, Any] = {}
        # Connections kept after a transaction, newest last; 0 keeps none.
        self._idle_time = idle_time
        self._idle: dict[ConnectionKey, list[_IdleConnection]] = {}
        self._idle_count = 0
        self._allow_literals = allow_literals
        if resolver is None:
            resolver = make_dns_resolver(reactor, dns_servers)
        # twisted.names re-sends a query after each of these; they add up to
        # the configured timeout.
        retries = (dns_timeout / 3, dns_timeout * 2 / 3)
        self.mx = MXResolver(
            resolver, reactor, hostname, own_addresses, retries, rng=rng
        )
        self.health = HostHealth(reactor)
        if idle_time > 0:
            # RFC 5321 section 4.1.1.10: a client closes with QUIT, kept
            # connections included, also when mailx stops.
            reactor.addSystemEventTrigger("before", "shutdown", self._quit_at_stop)

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        """Deliver ``content`` to ``recipients`` of ``domain``; never fails."""
        coroutine = self._deliver(reverse_path, domain, recipients, content, envelope)
        return Deferred.fromCoroutine(coroutine)

    async def _deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> list[RecipientResult]:
        try:
            return await self._deliver_or_raise(
                reverse_path, domain, recipients, content, envelope
            )
        except Exception:
            log.failure("Outbound delivery to {domain} failed", domain=domain)
            return [RecipientResult(r, replies.LOCAL_ERROR, "") for r in recipients]

    async def _deliver_or_raise(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> list[RecipientResult]:
        try:
            targets = await self._targets(domain)
        except ResolutionError as problem:
            self._log(envelope, recipients, "", "", 0, False, problem.reply)
            return [RecipientResult(r, problem.reply, "") for r in recipients]

        results: list[RecipientResult] = []
        size = MAX_RECIPIENTS_PER_TRANSACTION
        for start in range(0, len(recipients), size):
            batch = recipients[start : start + size]
            transaction = _transaction(reverse_path, batch, content, envelope)
            results.extend(await self._walk(domain, targets, transaction, envelope))
        return results

    async def _targets(self, domain: str) -> list[tuple[str, str]]:
        """``(host, address)`` pairs to try, in order, at most max_hosts."""
        pairs: list[tuple[str, str]] = []
        if self._smarthost is not None:
            host = self._smarthost[0]
            if is_ip_address(host):
                # Nothing to look up, nor to wait for (issue 7).
                pairs = [(host, host)]
            else:
                for address in await self.mx.resolve_host(host):
                    pairs.append((host, address))
        elif domain.startswith("["):
            pairs = [(domain, self._literal_address(domain))]
        else:
            for hop in await self.mx.resolve(domain):
                pairs.extend((hop.host, address) for address in hop.addresses)
        ordered = self.health.order(pairs)
        return ordered[: self._max_hosts]

    def _literal_address(self, domain: str) -> str:
        # RFC 5321 section 4.1.3: the literal names the host to deliver to.
        if not self._allow_literals:
            raise ResolutionError(replies.LITERAL_NOT_ALLOWED)
        literal = Address("", domain).literal_ip or ""
        try:
            address = ipaddress.ip_address(literal)
        except ValueError:
            raise ResolutionError(replies.BAD_DESTINATION) from None
        if address in self._own:
            raise ResolutionError(replies.MAIL_LOOP)
        return str(address)

    async def _walk(
        self,
        domain: str,
        targets: list[tuple[str, str]],
        transaction: Transaction,
        envelope: Envelope,
    ) -> list[RecipientResult]:
        recipients = transaction.recipients
        settled: dict[int, RecipientResult] = {}
        open_indices = list(range(len(recipients)))
        failures: list[Reply] = []
        last_hop = ""

        for host, address in targets:
            if not open_indices:
                break
            attempt = transaction.subset(open_indices)
            outcome = await self._attempt(domain, host, address, attempt, envelope)
            if outcome.answered:
                # The exchange whose word the recipients get; "none" while
                # no exchange answered (README, the mail log).
                last_hop = f"{host}[{address}]"

            still_open = []
            for position, index in enumerate(open_indices):
                reply = outcome.replies.get(position)
                if reply is None:
                    still_open.append(index)
                else:
                    settled[index] = RecipientResult(recipients[index], reply, last_hop)
            open_indices = still_open
            if outcome.failure is not None:
                failures.append(outcome.failure)

        for index in open_indices:
            reply = _walk_failure(failures)
            settled[index] = RecipientResult(recipients[index], reply, last_hop)
        return [settled[i] for i in range(len(recipients))]

    async def _attempt(
        self,
        domain: str,
        host: str,
        address: str,
        transaction: Transaction,
        envelope: Envelope,
    ) -> SessionOutcome:
        mode = self._tls_mode(domain)
        outcome = await self._session(host, address, transaction, mode, envelope)
        if outcome.retry_plain:
            # RFC 7435 section 6: fall back to a session in clear.
            outcome = await self._session(
                host, address, transaction, TLSMode.NONE, envelope
            )
        return outcome

    def _tls_mode(self, domain: str) -> TLSMode:
        key = self._smarthost[0] if self._smarthost else domain
        if self._tls_policy.get(key.lower()) == "verify":
            return TLSMode.VERIFY
        return TLSMode.MAY

    async def _session(
        self,
        host: str,
        address: str,
        transaction: Transaction,
        mode: TLSMode,
        envelope: Envelope,
    ) -> SessionOutcome:
        port = self._smarthost[1] if self._smarthost else self._port
        key = (host, address, port, mode)
        outcome = await self._reuse(key, transaction)
        if outcome is None:
            outcome = await self._connect(key, transaction)
        self._log_outcome(envelope, transaction, host, address, port, outcome)
        return outcome

    async def _reuse(
        self, key: ConnectionKey, transaction: Transaction
    ) -> SessionOutcome | None:
        """The outcome over a kept connection; None if none was usable."""
        while (kept := self._take_idle(key)) is not None:
            outcome = await kept.protocol.start_next(transaction)
            if nothing_taken(outcome, kept.protocol.session.last_reply):
                # Closed while idle, or closing at this transaction's first
                # command (a limit of messages per connection): the next hop
                # took nothing of it, so it goes over another connection.
                log.info(
                    "kept connection to {host}[{address}] took nothing"
                    " ({reply}); trying another connection",
                    host=key[0],
                    address=key[1],
                    reply=outcome.failure,
                )
                continue
            self._keep(key, kept)
            return outcome
        return None

    async def _connect(
        self, key: ConnectionKey, transaction: Transaction
    ) -> SessionOutcome:
        host, address, port, mode = key
        session = ClientSession(
            self._hostname, transaction, mode, self._auth, reuse=self._idle_time > 0
        )
        protocol = SMTPClientProtocol(
            session,
            self._reactor,
            self._timeouts,
            tls_options_factory=lambda: self._tls_options(host, mode),
        )
        endpoint = self._endpoint(address, port)
        try:
            await endpoint.connect(_OneConnection(protocol))
        except Exception as reason:
            self.health.mark_down(address)
            failure = replies.CONNECT_FAILED.with_text(
                f"{replies.CONNECT_FAILED.text}: {_connect_error_words(reason)}"
            )
            return SessionOutcome(failure=failure)

        outcome = await protocol.done
        if outcome.failure is not None and outcome.failure.enhanced == "4.4.2":
            self.health.mark_down(address)
        else:
            self.health.mark_up(address)
        self._keep(key, _IdleConnection(protocol, self._reactor.seconds()))
        return outcome

    def _take_idle(self, key: ConnectionKey) -> _IdleConnection | None:
        """The newest kept connection for ``key`` that is still open."""
        kept = self._idle.get(key)
        while kept:
            connection = kept.pop()
            self._idle_count -= 1
            if connection.expiry is not None and connection.expiry.active():
                connection.expiry.cancel()
            if connection.protocol.idle:
                return connection
        self._idle.pop(key, None)
        return None

    def _keep(self, key: ConnectionKey, connection: _IdleConnection) -> None:
        """Keep an idle connection for the next message, or close it."""
        protocol = connection.protocol
        if not protocol.idle:
            return
        age = self._reactor.seconds() - connection.opened
        if age >= CONNECTION_REUSE_TIME or self._idle_count >= MAX_IDLE_CONNECTIONS:
            protocol.close()
            return
        self._idle.setdefault(key, []).append(connection)
        self._idle_count += 1
        connection.expiry = self._reactor.callLater(
            self._idle_time, self._expire, key, connection
        )

    def _expire(self, key: ConnectionKey, connection: _IdleConnection) -> None:
        kept = self._idle.get(key, [])
        if connection in kept:
            kept.remove(connection)
            self._idle_count -= 1
            if not kept:
                self._idle.pop(key, None)
        connection.protocol.close()

    def close_idle(self) -> Deferred[list[SessionOutcome]]:
        """QUIT every kept connection; fire once all are closed."""
        closing = []
        for key in list(self._idle):
            while (connection := self._take_idle(key)) is not None:
                closing.append(connection.protocol.close())
        return gatherResults(closing)

    def _quit_at_stop(self) -> Deferred[None]:
        """QUIT kept connections, waiting for their close a bounded time."""
        stopped: Deferred[None] = Deferred()
        timer = self._reactor.callLater(SHUTDOWN_QUIT_WAIT, stopped.callback, None)

        def closed(_: object) -> None:
            if timer.active():
                timer.cancel()
                stopped.callback(None)

        self.close_idle().addBoth(closed)
        return stopped

    def _endpoint(self, address: str, port: int) -> Any:
        timeout = self._timeouts.connect
        if ipaddress.ip_address(address).version == 6:
            return TCP6ClientEndpoint(self._reactor, address, port, timeout=timeout)
        return TCP4ClientEndpoint(self._reactor, address, port, timeout=timeout)

    def _tls_options(self, host: str, mode: TLSMode) -> Any:
        """The client options for ``mode``, built once and then reused."""
        if mode is TLSMode.VERIFY:
            options = self._verified_tls.get(host)
            if options is None:
                if len(self._verified_tls) >= MAX_CACHED_TLS_HOSTS:
                    self._verified_tls.clear()
                trust = self._trust_root or platformTrust()  # type: ignore[no-untyped-call]
                options = optionsForClientTLS(host, trustRoot=trust)
                self._verified_tls[host] = options
            return options
        if self._opportunistic_tls is None:
            # RFC 7435: opportunistic TLS encrypts without authenticating.
            self._opportunistic_tls = CertificateOptions()
        return self._opportunistic_tls

    def _log_outcome(
        self,
        envelope: Envelope,
        transaction: Transaction,
        host: str,
        address: str,
        port: int,
        outcome: SessionOutcome,
    ) -> None:
        groups: dict[Reply, list[Address]] = {}
        for position, recipient in enumerate(transaction.recipients):
            reply = outcome.replies.get(position, outcome.failure)
            if reply is not None:
                groups.setdefault(reply, []).append(recipient)
        for reply, recipients in groups.items():
            self._log(envelope, recipients, host, address, port, outcome.tls, reply)

    def _log(
        self,
        envelope: Envelope,
        recipients: list[Address],
        host: str,
        address: str,
        port: int,
        tls: bool,
        reply: Reply,
    ) -> None:
        # Sent only on a 2xx, as the spool counts a delivery (mailx.spool).
        status = "sent" if 200 <= reply.code < 300 else "deferred"
        if reply.is_permanent:
            status = "bounced"
        maillog.info(
            "{message_id}: to=<{recipients}> relay={next_hop}[{address}]:{port} "
            "tls={tls} status={status} ({reply})",
            message_id=envelope.message_id,
            recipients=">,<".join(str(r) for r in recipients),
            next_hop=host or "none",
            address=address,
            port=port,
            tls="yes" if tls else "no",
            status=status,
            reply=str(reply),
        )


def listening_addresses(config: Config) -> list[str]:
    """
    The IP addresses mailx's listeners are bound to, from the ``interface=``
    of their endpoint strings.  A listener on every interface (no
    ``interface=``, or 0.0.0.0 or ::) gives the unspecified address, which
    ``mx.OwnAddresses`` reads as every address of this host.
    """
    addresses: list[str] = []
    server = config.server
    for endpoint in (*server.listen, *server.submission, *server.smtps):
        found = re.findall(r"interface=((?:\\.|[^:])*)", endpoint)
        if not found and not endpoint.lower().startswith("unix:"):
            found = ["::" if endpoint.lower().startswith("tcp6:") else "0.0.0.0"]
        for raw in found:
            text = re.sub(r"\\(.)", r"\1", raw)
            try:
                ipaddress.ip_address(text)
            except ValueError:
                continue
            if text not in addresses:
                addresses.append(text)
    return addresses


def agent_from_config(
    reactor: Any, config: Config, own_addresses: Sequence[str] | None = None
) -> OutboundAgent:
    """An ``OutboundAgent`` set up from the ``delivery`` and ``dns`` sections."""
    delivery = config.delivery
    timeouts = Timeouts(
        connect=delivery.connect_timeout,
        greeting=delivery.greeting_timeout,
        command=delivery.mail_timeout,
        mail=delivery.mail_timeout,
        rcpt=delivery.rcpt_timeout,
        data_init=delivery.data_init_timeout,
        data_block=delivery.data_block_timeout,
        data_end=delivery.data_end_timeout,
    )
    smarthost = delivery.smarthost
    if own_addresses is None:
        own_addresses = listening_addresses(config)
    return OutboundAgent(
        reactor,
        config.server.hostname,
        own_addresses,
        [(server.host, server.port) for server in config.dns.servers],
        port=delivery.port,
        smarthost=(smarthost.host, smarthost.port) if smarthost else None,
        smarthost_user=delivery.smarthost_user,
        smarthost_password=delivery.smarthost_password,
        max_hosts=delivery.max_hosts,
        timeouts=timeouts,
        tls_policy=delivery.tls_policy,
        dns_timeout=config.dns.timeout,
    )


def _transaction(
    reverse_path: Address | None,
    recipients: list[Address],
    content: bytes,
    envelope: Envelope,
) -> Transaction:
    dsn = {r.address: r for r in envelope.recipients}
    return Transaction(
        reverse_path,
        recipients,
        content,
        envelope.body,
        envelope.smtputf8,
        envelope.ret,
        envelope.envid,
        [dsn[r].notify if r in dsn else None for r in recipients],
        [dsn[r].orcpt if r in dsn else None for r in recipients],
    )


def _walk_failure(failures: list[Reply]) -> Reply:
    """
    The reply for a recipient no host settled: permanent only when every host
    said so (RFC 5321 section 5.1 asks to try the other exchanges first).
    """
    if not failures:
        return replies.NO_ROUTE
    transient = [f for f in failures if not f.is_permanent]
    if transient:
        return transient[-1]
    return failures[-1]


def _connect_error_words(reason: Exception) -> str:
    """Plain words for why a connection failed, for the log and the DSN."""
    if isinstance(reason, ConnectionRefusedError | error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | error.TimeoutError):
        return "connection timed out"
    if isinstance(reason, error.NoRouteError):
        return "no route to host"
    words = str(reason).strip().rstrip(".")
    return words or type(reason).__name__
