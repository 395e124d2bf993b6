"""
Where a domain's mail goes: the MX resolver (RFC 5321 section 5.1).

Theory of operation
-------------------
``MXResolver.resolve(domain)`` asks DNS for the MX records of the domain and
the A and AAAA records of every exchange, and fires with the next hops in the
order they are to be tried: by preference, hosts of equal preference shuffled,
each with all its addresses.  Every answer that means "do not deliver now"
fails the Deferred with a ``ResolutionError`` carrying the reply to record for
the recipients: permanent for NXDOMAIN, a null MX or a mail loop, temporary for
anything that may get better (SERVFAIL, REFUSED, a timeout).

The resolver sits on any ``IResolver`` (``twisted.names.client.Resolver`` in
production, pointed at the configured servers), caches answers for their TTL
on the injected clock, and never reads the system configuration itself:
``make_dns_resolver`` is the only place that may, and only when no servers are
configured.

``HostHealth`` remembers addresses that refused or timed out, so the next
attempts try them last, for a short time that grows with each failure.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from mailx import replies
from mailx.maillog import PrintableLogger
from mailx.replies import ReplyError

log = PrintableLogger()

# RFC 1034 section 3.6.2 allows CNAME chains; stop after this many links.
MAX_CNAME_CHAIN = 8
# Bound the work per domain: more MX records than this are not looked at
# (our choice; well above the handful real domains publish).
MAX_EXCHANGES = 20
# How long an address is first kept at the back after it failed, the factor
# its time grows by at each further failure, and the ceiling (our choice).
DOWN_FIRST = 60.0
DOWN_FACTOR = 2.0
DOWN_MAX = 1800.0
# How long a query is waited for, per try (twisted.names re-sends after each).
DEFAULT_DNS_TIMEOUT = (2.0, 5.0, 10.0)


class ResolutionError(ReplyError):
    """No next hop now; the reply says why and whether it is permanent."""


@dataclass(frozen=True)
class NextHop:
    """An exchange to try: its name, its preference and all its addresses."""

    host: str
    preference: int
    addresses: tuple[str, ...]


def _normal_name(name: str) -> str:
    return name.rstrip(".").lower()


@functools.lru_cache(maxsize=256)
def is_ip_address(text: str) -> bool:
    # Kept per name: a smarthost given as an address is asked about on
    # every delivery (issue 7).
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _LoopbackBoundResolver(client.Resolver):
    """
    A ``client.Resolver`` whose UDP sockets bind to the loopback interface.

    Deliberate departure: twisted.names binds its query sockets to every
    interface.  When all the configured servers are on loopback (as in tests)
    the socket has no reason to listen anywhere else, so it binds there.
    """

    def __init__(self, servers: list[tuple[str, int]], interface: str, **kw: Any):
        super().__init__(servers=servers, **kw)  # type: ignore[no-untyped-call]
        self._mailx_interface = interface

    def _connectedProtocol(self, interface: str = "") -> Any:
        interface = self._mailx_interface
        return super()._connectedProtocol(interface=interface)  # type: ignore[no-untyped-call]


def make_dns_resolver(reactor: Any, servers: Sequence[tuple[str, int]]) -> Any:
    """
    A ``twisted.names`` resolver for the configured ``servers``; when the list
    is empty, the system's (``/etc/resolv.conf``), which tests never use.
    """
    if not servers:
        # createResolver takes no reactor: it uses the global one.
        return client.createResolver()
    hosts = [ipaddress.ip_address(host) for host, _ in servers]
    if all(host.is_loopback for host in hosts):
        interface = "::1" if all(host.version == 6 for host in hosts) else "127.0.0.1"
        return _LoopbackBoundResolver(list(servers), interface, reactor=reactor)
    return client.Resolver(servers=list(servers), reactor=reactor)


def _temporary(why: str) -> ResolutionError:
    return ResolutionError(replies.DNS_TEMPORARY.with_text(f"{why}, will retry"))


def _classify(failure: Failure, name: str) -> None:
    """Raise the ResolutionError that a twisted.names failure means."""
    reason = failure.value
    if isinstance(reason, ResolutionError):
        raise reason
    if isinstance(reason, error.DNSNameError):
        # RFC 5321 section 5.1: a name that does not exist is a permanent error.
        raise ResolutionError(replies.NO_SUCH_DOMAIN)
    if isinstance(reason, error.DNSServerError):
        raise _temporary(f"DNS server failure (SERVFAIL) for {name}")
    if isinstance(reason, error.DNSQueryRefusedError):
        raise _temporary(f"DNS query refused (REFUSED) for {name}")
    if isinstance(reason, error.DNSQueryTimeoutError | defer.TimeoutError):
        raise _temporary(f"DNS query timed out for {name}")
    log.failure("DNS lookup of {name} failed", failure, name=name)
    raise _temporary(f"DNS lookup failed for {name}")


@dataclass
class _Answer:
    records: list[Any]
    ttl: int


class Clock(Protocol):
    """The part of IReactorTime the resolver uses."""

    def seconds(self) -> float: ...


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Addresses checked against this host's own, kept; cleared past this many.
LOCAL_CHECKS_KEPT = 4096


class OwnAddresses:
    """
    mailx's own IP addresses, which it must never deliver to (RFC 5321
    section 5.1): those its listeners are bound to and, when one listens on
    every interface (the unspecified address among them), every address of
    this host, as Postfix's inet_interfaces = all does.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        ips = {ipaddress.ip_address(address) for address in addresses}
        self.every_interface = any(ip.is_unspecified for ip in ips)
        self._bound = {ip for ip in ips if not ip.is_unspecified}
        self._local: dict[IPAddress, bool] = {}

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
        elif isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            ip = address
        else:
            return False
        if ip in self._bound:
            return True
        if not self.every_interface:
            return False
        if ip not in self._local:
            if len(self._local) >= LOCAL_CHECKS_KEPT:
                self._local.clear()
            self._local[ip] = is_local_address(ip)
        return self._local[ip]


def is_local_address(ip: IPAddress) -> bool:
    """
    Is ``ip`` an address of this host?  A loopback address always is; for
    another, a UDP socket connected to it (which sends nothing) gets it as
    its own address only if the kernel routes it locally.  Asking bind(2)
    instead would be fooled by net.ipv4.ip_nonlocal_bind.
    """
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))
            own = probe.getsockname()[0]
    except OSError:
        return False
    return bool(ipaddress.ip_address(own.split("%", 1)[0]) == ip)


class MXResolver:
    """Resolve a domain to its ordered next hops (RFC 5321 section 5.1)."""

    def __init__(
        self,
        resolver: Any,
        clock: Clock,
        hostname: str,
        own_addresses: Sequence[str],
        dns_timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._hostname = _normal_name(hostname)
        self._own = OwnAddresses(own_addresses)
        self._timeout = tuple(dns_timeout)
        self._random = rng or random.Random()
        self._cache: dict[tuple[str, int], tuple[float, _Answer]] = {}

    def is_self(self, host: str, addresses: Sequence[str]) -> bool:
        """Is this exchange mailx itself, by name or by one of its addresses?"""
        if _normal_name(host) == self._hostname:
            return True
        return any(address in self._own for address in addresses)

    def resolve(self, domain: str) -> Deferred[list[NextHop]]:
        """The next hops for ``domain``, best first; fails with ResolutionError."""
        name = _normal_name(domain)
        d = self._lookup(name, dns.MX)
        return d.addCallback(self._exchanges_found, name)

    def resolve_host(self, host: str) -> Deferred[list[str]]:
        """The IPv6 and IPv4 addresses of ``host`` (an IP gives itself)."""
        if is_ip_address(host):
            return defer.succeed([host])
        name = _normal_name(host)
        d6 = self._lookup(name, dns.AAAA)
        d4 = self._lookup(name, dns.A)
        both = defer.DeferredList([d6, d4], consumeErrors=True)
        return both.addCallback(self._addresses_found, name)

    def _addresses_found(self, results: list[tuple[bool, Any]], name: str) -> list[str]:
        addresses: list[str] = []
        failures: list[Failure] = []
        for ok, value in results:
            if ok:
                addresses.extend(_address_text(r) for r in value.records)
            else:
                failures.append(value)
        if addresses:
            return addresses
        for failure in failures:
            reason = failure.value
            if isinstance(reason, ResolutionError) and reason.reply.is_transient:
                raise reason
        if failures:
            failures[0].raiseException()
        return []

    def _exchanges_found(self, answer: _Answer, domain: str) -> Deferred[list[NextHop]]:
        records = answer.records[:MAX_EXCHANGES]

        if not records:
            # RFC 5321 section 5.1: no MX records, so the domain itself is the
            # implicit MX, with preference 0.
            exchanges = [(0, domain)]
        else:
            exchanges = [
                (r.preference, _normal_name(r.name.name.decode())) for r in records
            ]
            # RFC 7505 section 3: a null MX is the only MX of its domain.
            if len(exchanges) == 1 and exchanges[0][1] == "":
                return defer.fail(ResolutionError(replies.NULL_MX))
            exchanges = [(p, host) for p, host in exchanges if host]

        lookups = [self.resolve_host(host) for _, host in exchanges]
        both = defer.DeferredList(lookups, consumeErrors=True)
        return both.addCallback(self._hosts_found, exchanges, domain, not records)

    def _hosts_found(
        self,
        results: list[tuple[bool, Any]],
        exchanges: list[tuple[int, str]],
        domain: str,
        implicit: bool,
    ) -> list[NextHop]:
        hops: list[NextHop] = []
        failure: Failure | None = None
        for (preference, host), (ok, value) in zip(exchanges, results, strict=True):
            if not ok:
                failure = value
            hops.append(NextHop(host, preference, tuple(value) if ok else ()))

        hops = [h for h in self._drop_self_and_worse(hops, domain) if h.addresses]
        if hops:
            return self._shuffled(hops)
        if implicit and failure is not None:
            # The domain had no MX; its own address lookup failed.
            failure.raiseException()
        if implicit:
            raise ResolutionError(
                replies.NO_SUCH_DOMAIN.with_text(
                    f"{replies.NO_SUCH_DOMAIN.text}: {domain} has no MX and no address"
                )
            )
        raise _temporary(f"no address found for any exchange of {domain}")

    def _drop_self_and_worse(self, hops: list[NextHop], domain: str) -> list[NextHop]:
        # RFC 5321 section 5.1: when the client is itself an exchange, it
        # drops every exchange whose preference is equal to or worse than its
        # own, and delivers only to better ones.
        own = [h.preference for h in hops if self.is_self(h.host, h.addresses)]
        if not own:
            return hops
        best_own = min(own)
        better = [h for h in hops if h.preference < best_own]
        if not better:
            # Nothing better than us is left: sending would loop.
            raise ResolutionError(
                replies.MAIL_LOOP.with_text(
                    f"{replies.MAIL_LOOP.text}: {self._hostname} is the best "
                    f"exchange of {domain}"
                )
            )
        return better

    def _shuffled(self, hops: list[NextHop]) -> list[NextHop]:
        # RFC 5321 section 5.1: hosts of equal preference are tried in random
        # order, to spread the load.
        keyed = [(h.preference, self._random.random(), h) for h in hops]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [h for _, _, h in keyed]

    def _lookup(self, name: str, rtype: int, depth: int = 0) -> Deferred[_Answer]:
        """The records of ``rtype`` at ``name``, CNAMEs followed, cached by TTL."""
        now = self._clock.seconds()
        cached = self._cache.get((name, rtype))
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])

        query = dns.Query(name, rtype, dns.IN)
        d = cast(
            "Deferred[Any]",
            self._resolver.query(query, timeout=self._timeout),
        )
        d.addCallback(self._answered, name, rtype, depth)
        d.addErrback(_classify, name)
        return cast("Deferred[_Answer]", d)

    def _answered(
        self, result: Any, name: str, rtype: int, depth: int
    ) -> _Answer | Deferred[_Answer]:
        answers = result[0]
        owners = {name}
        records: list[Any] = []
        ttls: list[int] = []
        target: str | None = None
        # RFC 1034 section 3.6.2: follow the CNAME chain within the answer.
        for _ in range(MAX_CNAME_CHAIN):
            progressed = False
            for rr in answers:
                owner = _normal_name(rr.name.name.decode())
                if owner not in owners:
                    continue
                if rr.type == rtype:
                    records.append(rr.payload)
                    ttls.append(rr.ttl)
                elif rr.type == dns.CNAME:
                    target = _normal_name(rr.payload.name.name.decode())
                    if target not in owners:
                        owners.add(target)
                        ttls.append(rr.ttl)
                        progressed = True
            if not progressed:
                break

        if not records and target is not None:
            if depth >= MAX_CNAME_CHAIN:
                raise _temporary(f"CNAME chain too long at {name}")
            followed = self._lookup(target, rtype, depth + 1)
            return followed.addCallback(self._store, name, rtype, min(ttls))

        records = _unique(records)
        if not records:
            # RFC 2308 section 5: a NODATA answer is cached for the SOA minimum.
            ttls = [
                min(rr.ttl, rr.payload.minimum)
                for rr in result[1]
                if rr.type == dns.SOA
            ]
        return self._store(_Answer(records, min(ttls) if ttls else 0), name, rtype)

    def _store(
        self, answer: _Answer, name: str, rtype: int, ttl_cap: int | None = None
    ) -> _Answer:
        """Cache ``answer`` for its TTL (or ``ttl_cap`` if that is shorter)."""
        if ttl_cap is not None and ttl_cap < answer.ttl:
            answer = _Answer(answer.records, ttl_cap)
        if answer.ttl > 0:
            expires = self._clock.seconds() + answer.ttl
            self._cache[(name, rtype)] = (expires, answer)
        return answer


def _unique(records: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for record in records:
        if record not in seen:
            seen.append(record)
    return seen


def _address_text(record: Any) -> str:
    if record.TYPE == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.address)
    return socket.inet_ntop(socket.AF_INET, record.address)


class HostHealth:
    """
    Addresses that recently refused a connection or timed out.  They are kept
    at the back of the list for a time that starts at DOWN_FIRST and grows by
    DOWN_FACTOR with each further failure, up to DOWN_MAX.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._down: dict[str, tuple[float, float]] = {}

    def mark_down(self, address: str) -> None:
        _, previous = self._down.get(address, (0.0, 0.0))
        period = min(previous * DOWN_FACTOR, DOWN_MAX) if previous else DOWN_FIRST
        self._down[address] = (self._clock.seconds() + period, period)

    def mark_up(self, address: str) -> None:
        self._down.pop(address, None)

    def is_down(self, address: str) -> bool:
        entry = self._down.get(address)
        return entry is not None and entry[0] > self._clock.seconds()

    def order(self, addresses: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """``(host, address)`` pairs with the ones that are down moved last."""
        up = [pair for pair in addresses if not self.is_down(pair[1])]
        down = [pair for pair in addresses if self.is_down(pair[1])]
        return up + down
