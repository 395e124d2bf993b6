"""
Which recipients a backup exchanger accepts for the domains it backs up.

Theory of operation
-------------------
A backup MX (a domain in ``domains.backup``) takes mail for its domains from
anyone and queues it for the exchanges more preferred than itself.  Taking
every local part turns spam to made-up addresses into bounces later, when the
primary refuses them: backscatter.  ``[backup] verify_recipients`` chooses
what ``RelayPolicy`` asks before it accepts such a recipient:

``none``
    Nothing: every recipient is accepted (no check is built).
``list``
    ``StaticRecipients``: accepted when ``backup.recipients`` lists it.
``probe``
    ``RecipientProber``: the exchanges better than mailx (``mailx.mx``) are
    asked with an RCPT probe (``MAIL FROM:<>``, ``RCPT TO``, ``QUIT``; never
    DATA).  A 2xx accepts, a 5xx refuses, and both answers are cached for
    ``backup.probe_cache_ttl`` seconds.  Anything else (no exchange answers,
    DNS fails, a 4xx, a timeout, mailx is itself the best exchange) accepts
    the recipient without caching: refusing good mail because the primary is
    down would defeat the point of a backup.

``postmaster`` of a backup domain is always accepted (RFC 5321 section 4.5.1
requires that address at every domain).

``ProbeSession`` is the probe dialogue as a pure state machine: octets from
the exchange in, command lines out, a ``ProbeResult`` at the end.
``ProbeProtocol`` is its thin Twisted adapter with one deadline on the
injected clock.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from mailx import replies
from mailx.address import Address
from mailx.client import OwedReplies, ReplyParser
from mailx.config import Config
from mailx.envelope import RecipientDecision, Route
from mailx.maillog import PrintableLogger, maillog
from mailx.mx import MXResolver, NextHop, ResolutionError, make_dns_resolver
from mailx.outbound import listening_addresses
from mailx.replies import Reply

log = PrintableLogger()

BackupCheck = Callable[[Address], Deferred[RecipientDecision]]

ACCEPT = RecipientDecision(replies.RECIPIENT_OK, Route.BACKUP)
REFUSE = RecipientDecision(replies.NO_SUCH_USER)

# How long one probe of one address may take, connection included.  The SMTP
# client is waiting for our RCPT reply meanwhile; RFC 5321 section 4.5.3.2.3
# has it wait 5 minutes, and we stay far below that (our choice).
PROBE_TIMEOUT = 10.0
# Addresses probed per recipient before giving up and accepting: with the
# timeout above, a client waits at most 30 seconds (our choice).
PROBE_MAX_HOSTS = 3
# Cached answers kept at most; the oldest go first.  Bounds the memory a
# sender of random local parts can make us spend (our choice).
MAX_CACHE_ENTRIES = 10000
# RFC 5321 section 4.5.4.2: the SMTP port.
SMTP_PORT = 25


def _is_postmaster(address: Address) -> bool:
    # RFC 5321 section 4.5.1: postmaster is case-insensitive and must exist.
    return address.local_part.lower() == "postmaster"


def _key(address: Address) -> str:
    return f"{address.local_part.lower()}@{address.domain_key}"


class StaticRecipients:
    """``verify_recipients = "list"``: only the listed addresses are taken."""

    def __init__(self, recipients: Iterable[str]) -> None:
        self.recipients = frozenset(entry.lower() for entry in recipients)

    def check(self, address: Address) -> Deferred[RecipientDecision]:
        if _is_postmaster(address) or _key(address) in self.recipients:
            return succeed(ACCEPT)
        _log_decision(address, REFUSE, "not in backup.recipients", "")
        return succeed(REFUSE)


# --- the probe dialogue ---------------------------------------------------------


class Verdict(enum.Enum):
    """What a probe learnt of a recipient."""

    EXISTS = "exists"
    REFUSED = "refused"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeResult:
    """The verdict and the reply that led to it (None when nothing answered)."""

    verdict: Verdict
    reply: Reply | None = None


class _Phase(enum.Enum):
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    QUIT = "quit"
    DONE = "done"


class ProbeSession:
    """The client side of an RCPT probe, as a state machine."""

    def __init__(self, hostname: str, recipient: Address) -> None:
        self._hostname = hostname
        self._recipient = recipient
        self._parser = ReplyParser()
        self._smtputf8 = False
        self.phase = _Phase.GREETING
        self.result: ProbeResult | None = None
        self._owed = OwedReplies()

    @property
    def finished(self) -> bool:
        return self.phase is _Phase.DONE

    def data_received(self, data: bytes) -> list[bytes]:
        """Octets from the exchange in; the command lines to send out."""
        out: list[bytes] = []
        self._owed.read_begins()
        try:
            for reply in self._parser.feed(data):
                # A stray "550" after MAIL's 250 would pass for the RCPT's
                # answer: a reply to nothing sent is no answer.
                self._owed.take(reply)
                out.extend(self._handle(reply))
                if self.finished:
                    break
        except ValueError:
            self._decide(Verdict.UNKNOWN, replies.NEXT_HOP_PROTOCOL_ERROR)
            self.phase = _Phase.DONE
        return out

    def final_result(self) -> ProbeResult:
        """The result once the connection is gone: UNKNOWN if undecided."""
        self.phase = _Phase.DONE
        return self.result or ProbeResult(Verdict.UNKNOWN)

    def timed_out(self) -> None:
        """The deadline passed; the adapter drops the connection."""
        self._decide(Verdict.UNKNOWN, replies.NEXT_HOP_TIMEOUT)

    def _decide(self, verdict: Verdict, reply: Reply) -> None:
        if self.result is None:
            self.result = ProbeResult(verdict, reply)

    def _send(self, phase: _Phase, line: str) -> list[bytes]:
        self.phase = phase
        self._owed.handed_out()
        return [line.encode("utf-8") + b"\r\n"]

    def _give_up(self, reply: Reply) -> list[bytes]:
        self._decide(Verdict.UNKNOWN, reply)
        return self._send(_Phase.QUIT, "QUIT")

    def _handle(self, reply: Reply) -> list[bytes]:
        if self.phase is _Phase.QUIT:
            self.phase = _Phase.DONE
            return []
        # RFC 5321 section 3.8: a 421 may come at any time; the host closes.
        if reply.code == 421:
            self._decide(Verdict.UNKNOWN, reply)
            self.phase = _Phase.DONE
            return []
        if self.phase is _Phase.GREETING:
            if reply.code != 220:
                return self._give_up(reply)
            return self._send(_Phase.EHLO, f"EHLO {self._hostname}")
        if self.phase in (_Phase.EHLO, _Phase.HELO):
            return self._on_greeted(reply)
        if self.phase is _Phase.MAIL:
            # RFC 5321 section 4.3.2: MAIL succeeds with 250 only.
            if reply.code != 250:
                return self._give_up(reply)
            return self._send(_Phase.RCPT, f"RCPT TO:<{self._recipient}>")
        return self._on_rcpt(reply)

    def _on_greeted(self, reply: Reply) -> list[bytes]:
        if reply.is_permanent and self.phase is _Phase.EHLO:
            # RFC 5321 section 3.2: an old server that does not know EHLO.
            return self._send(_Phase.HELO, f"HELO {self._hostname}")
        # RFC 5321 section 4.3.2: EHLO and HELO succeed with 250 only.
        if reply.code != 250:
            return self._give_up(reply)
        keywords = [line.split(" ")[0].upper() for line in reply.text.split("\n")[1:]]
        self._smtputf8 = "SMTPUTF8" in keywords
        if self._recipient.is_utf8 and not self._smtputf8:
            # RFC 6531 section 3.2: such an address cannot be named to it.
            return self._give_up(replies.NEEDS_SMTPUTF8)
        # The null reverse path: a probe is no mail anyone could answer.
        parameter = " SMTPUTF8" if self._recipient.is_utf8 else ""
        return self._send(_Phase.MAIL, f"MAIL FROM:<>{parameter}")

    def _on_rcpt(self, reply: Reply) -> list[bytes]:
        # RFC 5321 section 4.3.2: RCPT succeeds with 250 or 251; any other
        # code below 400 is a server out of step, which says nothing.
        if reply.code in (250, 251):
            self._decide(Verdict.EXISTS, reply)
        elif reply.is_permanent:
            self._decide(Verdict.REFUSED, reply)
        else:
            self._decide(Verdict.UNKNOWN, reply)
        # RFC 5321 section 4.1.1.10: end the session without sending DATA.
        return self._send(_Phase.QUIT, "QUIT")


class Scheduler(Protocol):
    """The part of IReactorTime the adapter and the cache use."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...

    def seconds(self) -> float: ...


class ProbeProtocol(TwistedProtocol):
    """Connects a ``ProbeSession`` to a transport, within one deadline."""

    def __init__(self, session: ProbeSession, clock: Scheduler, timeout: float):
        self.session = session
        self.done: Deferred[ProbeResult] = Deferred()
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        for line in self.session.data_received(data):
            self.transport.write(line)  # type: ignore[union-attr]
        if self.session.finished:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.done.called:
            self.done.callback(self.session.final_result())

    def _timed_out(self) -> None:
        self._timer = None
        self.session.timed_out()
        self.transport.abortConnection()  # type: ignore[union-attr]


# --- the prober -------------------------------------------------------------------


class Exchanges(Protocol):
    """What the prober needs of ``mailx.mx.MXResolver``."""

    def resolve(self, domain: str) -> Deferred[list[NextHop]]: ...


# Connects a protocol to an address and port; fires once it is connected.
Connector = Callable[[str, int, TwistedProtocol], Deferred[Any]]


@dataclass(frozen=True)
class _Cached:
    expires: float
    decision: RecipientDecision


class RecipientProber:
    """``verify_recipients = "probe"``: ask the better exchanges, cache it."""

    def __init__(
        self,
        exchanges: Exchanges,
        clock: Scheduler,
        hostname: str,
        cache_ttl: float,
        connect: Connector,
        port: int = SMTP_PORT,
        timeout: float = PROBE_TIMEOUT,
        max_hosts: int = PROBE_MAX_HOSTS,
        max_entries: int = MAX_CACHE_ENTRIES,
    ) -> None:
        self._exchanges = exchanges
        self._clock = clock
        self._hostname = hostname
        self._ttl = cache_ttl
        self._connect = connect
        self._port = port
        self._timeout = timeout
        self._max_hosts = max_hosts
        self._max_entries = max_entries
        self._cache: dict[str, _Cached] = {}
        self._waiting: dict[str, list[Deferred[RecipientDecision]]] = {}

    def check(self, address: Address) -> Deferred[RecipientDecision]:
        """The decision for ``address``; never fails."""
        if _is_postmaster(address):
            return succeed(ACCEPT)
        key = _key(address)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > self._clock.seconds():
            return succeed(cached.decision)

        waiting: Deferred[RecipientDecision] = Deferred()
        if key in self._waiting:
            # A probe for this recipient is under way: share its answer.
            self._waiting[key].append(waiting)
            return waiting
        self._waiting[key] = [waiting]
        probe = Deferred.fromCoroutine(self._probe(address))
        probe.addErrback(self._failed, address)
        probe.addCallback(self._answer, key)
        return waiting

    def _failed(self, failure: Failure, address: Address) -> tuple[bool, Any]:
        log.failure("recipient probe for {address} failed", failure, address=address)
        _log_decision(address, ACCEPT, "probe failed", "")
        return False, ACCEPT

    def _answer(self, outcome: tuple[bool, RecipientDecision], key: str) -> None:
        definite, decision = outcome
        if definite and self._ttl > 0:
            self._remember(key, decision)
        for waiting in self._waiting.pop(key, []):
            waiting.callback(decision)

    def _remember(self, key: str, decision: RecipientDecision) -> None:
        now = self._clock.seconds()
        if len(self._cache) >= self._max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = _Cached(now + self._ttl, decision)

    async def _probe(self, address: Address) -> tuple[bool, RecipientDecision]:
        """The decision, and whether it is definite (and so cached)."""
        try:
            hops = await self._exchanges.resolve(address.domain_key)
        except ResolutionError as problem:
            _log_decision(address, ACCEPT, "no exchange to ask", str(problem.reply))
            return False, ACCEPT

        targets = [(hop.host, a) for hop in hops for a in hop.addresses]
        last = "no exchange answered"
        last_reply: Reply | None = None
        for host, ip in targets[: self._max_hosts]:
            result = await self._probe_one(ip, address)
            where = f"{host}[{ip}]"
            if result.verdict is Verdict.EXISTS:
                _log_decision(address, ACCEPT, f"exists at {where}", result.reply)
                return True, ACCEPT
            if result.verdict is Verdict.REFUSED:
                _log_decision(address, REFUSE, f"refused by {where}", result.reply)
                return True, REFUSE
            last = f"{where} did not say"
            last_reply = result.reply
        _log_decision(address, ACCEPT, f"{last}, accepted unverified", last_reply)
        return False, ACCEPT

    async def _probe_one(self, ip: str, address: Address) -> ProbeResult:
        session = ProbeSession(self._hostname, address)
        protocol = ProbeProtocol(session, self._clock, self._timeout)
        try:
            await self._connect(ip, self._port, protocol)
        except Exception as reason:
            failure = replies.CONNECT_FAILED.with_text(
                f"{replies.CONNECT_FAILED.text}: {type(reason).__name__}"
            )
            return ProbeResult(Verdict.UNKNOWN, failure)
        return await protocol.done


def _log_decision(
    address: Address, decision: RecipientDecision, why: str, reply: object
) -> None:
    maillog.info(
        "backup check to=<{recipient}> result={result} ({why}){reply}",
        recipient=str(address),
        result="accept" if decision.route is not None else "refuse",
        why=why,
        reply=f": {reply}" if reply else "",
    )


# --- assembly ----------------------------------------------------------------------


def tcp_connector(reactor: Any, timeout: float = PROBE_TIMEOUT) -> Connector:
    """A ``Connector`` over real TCP (IPv4 or IPv6 by the address)."""

    def connect(ip: str, port: int, protocol: TwistedProtocol) -> Deferred[Any]:
        if ipaddress.ip_address(ip).version == 6:
            endpoint: Any = TCP6ClientEndpoint(reactor, ip, port, timeout=timeout)
        else:
            endpoint = TCP4ClientEndpoint(reactor, ip, port, timeout=timeout)
        connected: Deferred[Any] = connectProtocol(endpoint, protocol)
        return connected

    return connect


class _LazyExchanges:
    """An ``MXResolver`` made at the first probe, so start-up reads nothing."""

    def __init__(self, make: Callable[[], MXResolver]) -> None:
        self._make = make
        self._resolver: MXResolver | None = None

    def resolve(self, domain: str) -> Deferred[list[NextHop]]:
        if self._resolver is None:
            self._resolver = self._make()
        return self._resolver.resolve(domain)


def backup_check_from_config(
    config: Config, reactor: Any, own_addresses: Sequence[str] | None = None
) -> BackupCheck | None:
    """The check ``[backup] verify_recipients`` asks for; None for "none"."""
    backup = config.backup
    if own_addresses is None:
        own_addresses = listening_addresses(config)
    if backup.verify_recipients == "list":
        return StaticRecipients(backup.recipients).check
    if backup.verify_recipients != "probe":
        return None

    def make_resolver() -> MXResolver:
        servers = [(server.host, server.port) for server in config.dns.servers]
        dns_client = make_dns_resolver(reactor, servers)
        timeout = config.dns.timeout
        # twisted.names re-sends a query after each of these.
        retries = (timeout / 3, timeout * 2 / 3)
        return MXResolver(
            dns_client, reactor, config.server.hostname, own_addresses, retries
        )

    prober = RecipientProber(
        _LazyExchanges(make_resolver),
        reactor,
        config.server.hostname,
        backup.probe_cache_ttl,
        tcp_connector(reactor, min(PROBE_TIMEOUT, config.delivery.connect_timeout)),
        port=config.delivery.port,
    )
    return prober.check
