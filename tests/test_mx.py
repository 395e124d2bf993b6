"""Unit tests of the MX resolver over a fake IResolver and a task.Clock."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error

from mailx.mx import (
    DOWN_FIRST,
    HostHealth,
    MXResolver,
    NextHop,
    OwnAddresses,
    ResolutionError,
    is_local_address,
    make_dns_resolver,
)

ME = "mailx.test"


def mx(name: str, preference: int, target: str, ttl: int = 60) -> Any:
    record = dns.Record_MX(preference, target.encode())
    return dns.RRHeader(name.encode(), dns.MX, ttl=ttl, payload=record)


def a(name: str, address: str, ttl: int = 60) -> Any:
    record = dns.Record_A(address)
    return dns.RRHeader(name.encode(), dns.A, ttl=ttl, payload=record)


def aaaa(name: str, address: str, ttl: int = 60) -> Any:
    record = dns.Record_AAAA(address)
    return dns.RRHeader(name.encode(), dns.AAAA, ttl=ttl, payload=record)


def cname(name: str, target: str, ttl: int = 60) -> Any:
    record = dns.Record_CNAME(target.encode())
    return dns.RRHeader(name.encode(), dns.CNAME, ttl=ttl, payload=record)


NODATA_SOA = dns.RRHeader(
    b"test",
    dns.SOA,
    ttl=300,
    payload=dns.Record_SOA(minimum=30),
)


class FakeResolver:
    """Answers queries from a table; anything else is NODATA."""

    def __init__(self, table: dict[tuple[str, int], Any]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    def query(self, query: Any, timeout: Any = None) -> defer.Deferred[Any]:
        key = (query.name.name.decode(), query.type)
        self.asked.append(key)
        answer = self.table.get(key, [])
        if isinstance(answer, Exception):
            return defer.fail(answer)
        authority = [] if answer else [NODATA_SOA]
        return defer.succeed((answer, authority, []))


def resolve(resolver: MXResolver, domain: str) -> list[NextHop] | ResolutionError:
    results: list[Any] = []
    resolver.resolve(domain).addBoth(results.append)
    (result,) = results
    if isinstance(result, list):
        return result
    assert isinstance(result.value, ResolutionError)
    return result.value


def make(
    table: dict[tuple[str, int], Any],
    clock: Clock | None = None,
    seed: int = 1,
    own: tuple[str, ...] = ("192.0.2.1",),
) -> tuple[MXResolver, FakeResolver]:
    fake = FakeResolver(table)
    resolver = MXResolver(fake, clock or Clock(), ME, own, rng=random.Random(seed))
    return resolver, fake


THREE = {
    ("d.test", dns.MX): [
        mx("d.test", 20, "c.d.test"),
        mx("d.test", 10, "a.d.test"),
        mx("d.test", 10, "b.d.test"),
    ],
    ("a.d.test", dns.A): [a("a.d.test", "192.0.2.10")],
    ("b.d.test", dns.A): [a("b.d.test", "192.0.2.11")],
    ("b.d.test", dns.AAAA): [aaaa("b.d.test", "2001:db8::11")],
    ("c.d.test", dns.A): [a("c.d.test", "192.0.2.12")],
}


def test_sorted_by_preference_with_all_addresses() -> None:
    """Hops come best preference first, each with its IPv6 and IPv4 addresses."""
    hops = resolve(make(THREE)[0], "d.test")
    assert isinstance(hops, list)
    assert [h.preference for h in hops] == [10, 10, 20]
    assert hops[2] == NextHop("c.d.test", 20, ("192.0.2.12",))
    b = next(h for h in hops if h.host == "b.d.test")
    assert b.addresses == ("2001:db8::11", "192.0.2.11")


def test_equal_preference_is_shuffled() -> None:
    """Hosts of equal preference come in both orders over different draws."""
    firsts = set()
    for seed in range(20):
        hops = resolve(make(THREE, seed=seed)[0], "d.test")
        assert isinstance(hops, list)
        firsts.add(hops[0].host)
        assert hops[2].host == "c.d.test"
    assert firsts == {"a.d.test", "b.d.test"}


def test_no_mx_is_implicit_mx() -> None:
    """NODATA for MX makes the domain its own exchange at preference 0."""
    hops = resolve(make({("d.test", dns.A): [a("d.test", "192.0.2.5")]})[0], "d.test")
    assert hops == [NextHop("d.test", 0, ("192.0.2.5",))]


def test_no_mx_and_no_address_is_permanent() -> None:
    """A domain with neither MX nor address fails with 5.1.2."""
    problem = resolve(make({})[0], "d.test")
    assert isinstance(problem, ResolutionError)
    assert (problem.reply.code, problem.reply.enhanced) == (550, "5.1.2")


@pytest.mark.parametrize(
    ("exception", "code", "enhanced"),
    [
        (error.DNSNameError("x"), 550, "5.1.2"),
        (error.DNSServerError("x"), 451, "4.4.3"),
        (error.DNSQueryRefusedError("x"), 451, "4.4.3"),
        (error.DNSQueryTimeoutError("x"), 451, "4.4.3"),
        (defer.TimeoutError(), 451, "4.4.3"),
    ],
)
def test_dns_errors(exception: Exception, code: int, enhanced: str) -> None:
    """NXDOMAIN is permanent; SERVFAIL, REFUSED and timeouts are temporary."""
    resolver, fake = make({("d.test", dns.MX): exception})
    problem = resolve(resolver, "d.test")
    assert isinstance(problem, ResolutionError)
    assert (problem.reply.code, problem.reply.enhanced) == (code, enhanced)
    assert fake.asked == [("d.test", dns.MX)]


def test_null_mx() -> None:
    """A lone MX 0 . fails with 556 5.1.10 and asks for no address."""
    resolver, fake = make({("d.test", dns.MX): [mx("d.test", 0, "")]})
    problem = resolve(resolver, "d.test")
    assert isinstance(problem, ResolutionError)
    assert (problem.reply.code, problem.reply.enhanced) == (556, "5.1.10")
    assert fake.asked == [("d.test", dns.MX)]


def test_cname_only_answer_is_followed() -> None:
    """An exchange whose answer holds only a CNAME is looked up at the target."""
    table = {
        ("d.test", dns.MX): [mx("d.test", 10, "alias.d.test")],
        ("alias.d.test", dns.A): [cname("alias.d.test", "real.d.test")],
        ("real.d.test", dns.A): [a("real.d.test", "192.0.2.7")],
    }
    hops = resolve(make(table)[0], "d.test")
    assert hops == [NextHop("alias.d.test", 10, ("192.0.2.7",))]


def test_cname_chain_in_answer() -> None:
    """A CNAME and its target's records in one answer give the addresses."""
    table = {
        ("d.test", dns.MX): [mx("d.test", 10, "alias.d.test")],
        ("alias.d.test", dns.A): [
            cname("alias.d.test", "real.d.test"),
            a("real.d.test", "192.0.2.8"),
        ],
    }
    hops = resolve(make(table)[0], "d.test")
    assert hops == [NextHop("alias.d.test", 10, ("192.0.2.8",))]


def test_cname_loop_is_bounded() -> None:
    """A CNAME loop ends in a temporary failure, not an endless lookup."""
    table = {
        ("d.test", dns.MX): [mx("d.test", 10, "x.d.test")],
        ("x.d.test", dns.A): [cname("x.d.test", "y.d.test")],
        ("y.d.test", dns.A): [cname("y.d.test", "x.d.test")],
    }
    problem = resolve(make(table)[0], "d.test")
    assert isinstance(problem, ResolutionError)
    assert problem.reply.is_transient


SELF = {
    ("s.test", dns.MX): [
        mx("s.test", 5, "better.s.test"),
        mx("s.test", 10, ME),
        mx("s.test", 10, "peer.s.test"),
        mx("s.test", 20, "worse.s.test"),
    ],
    ("better.s.test", dns.A): [a("better.s.test", "192.0.2.20")],
    ("peer.s.test", dns.A): [a("peer.s.test", "192.0.2.21")],
    ("worse.s.test", dns.A): [a("worse.s.test", "192.0.2.22")],
    (ME, dns.A): [a(ME, "192.0.2.1")],
}


def test_self_drops_equal_and_worse() -> None:
    """Listed at 10, mailx keeps only the exchange at 5."""
    hops = resolve(make(SELF)[0], "s.test")
    assert hops == [NextHop("better.s.test", 5, ("192.0.2.20",))]


def test_self_by_address() -> None:
    """An exchange at one of mailx's addresses counts as mailx itself."""
    table = dict(SELF)
    table[("s.test", dns.MX)] = [
        mx("s.test", 5, "better.s.test"),
        mx("s.test", 10, "alias-of-me.s.test"),
        mx("s.test", 20, "worse.s.test"),
    ]
    table[("alias-of-me.s.test", dns.A)] = [a("alias-of-me.s.test", "192.0.2.1")]
    hops = resolve(make(table)[0], "s.test")
    assert hops == [NextHop("better.s.test", 5, ("192.0.2.20",))]


def test_self_as_best_is_a_loop() -> None:
    """mailx as the best exchange, nothing better, fails with 5.4.6."""
    table = {
        ("s.test", dns.MX): [
            mx("s.test", 10, ME.upper() + "."),
            mx("s.test", 20, "w.s"),
        ],
        ("w.s", dns.A): [a("w.s", "192.0.2.30")],
    }
    problem = resolve(make(table)[0], "s.test")
    assert isinstance(problem, ResolutionError)
    assert (problem.reply.code, problem.reply.enhanced) == (554, "5.4.6")


def test_exchange_without_address_is_skipped() -> None:
    """An exchange whose address lookup fails is left out of the hops."""
    table = {
        ("d.test", dns.MX): [
            mx("d.test", 10, "gone.d.test"),
            mx("d.test", 20, "ok.d.test"),
        ],
        ("gone.d.test", dns.A): error.DNSNameError("x"),
        ("gone.d.test", dns.AAAA): error.DNSNameError("x"),
        ("ok.d.test", dns.A): [a("ok.d.test", "192.0.2.40")],
    }
    hops = resolve(make(table)[0], "d.test")
    assert hops == [NextHop("ok.d.test", 20, ("192.0.2.40",))]


def test_no_exchange_with_address_is_temporary() -> None:
    """MX records whose hosts all fail to resolve defer the recipient."""
    table = {
        ("d.test", dns.MX): [mx("d.test", 10, "gone.d.test")],
        ("gone.d.test", dns.A): error.DNSServerError("x"),
        ("gone.d.test", dns.AAAA): error.DNSServerError("x"),
    }
    problem = resolve(make(table)[0], "d.test")
    assert isinstance(problem, ResolutionError)
    assert problem.reply.is_transient


def test_answers_are_cached_for_their_ttl() -> None:
    """A second resolution within the TTL asks nothing; after it, DNS again."""
    clock = Clock()
    table = {
        ("d.test", dns.MX): [mx("d.test", 10, "m.d.test", ttl=30)],
        ("m.d.test", dns.A): [a("m.d.test", "192.0.2.50", ttl=30)],
    }
    resolver, fake = make(table, clock)
    resolve(resolver, "d.test")
    asked = len(fake.asked)
    clock.advance(29)
    assert isinstance(resolve(resolver, "d.test"), list)
    assert len(fake.asked) == asked
    clock.advance(2)
    resolve(resolver, "d.test")
    assert len(fake.asked) > asked


def test_resolve_host_of_an_ip() -> None:
    """An IP address as a host name resolves to itself, without DNS."""
    resolver, fake = make({})
    got: list[Any] = []
    for _ in range(2):
        resolver.resolve_host("192.0.2.60").addCallback(got.append)
        resolver.resolve_host("2001:db8::60").addCallback(got.append)
    assert got == [["192.0.2.60"], ["2001:db8::60"]] * 2
    assert fake.asked == []


def test_host_health_grows_and_expires() -> None:
    """A failed address goes last for DOWN_FIRST, then twice as long."""
    clock = Clock()
    health = HostHealth(clock)
    pairs = [("a", "192.0.2.1"), ("b", "192.0.2.2")]
    health.mark_down("192.0.2.1")
    assert health.order(pairs) == [pairs[1], pairs[0]]
    clock.advance(DOWN_FIRST + 1)
    assert health.order(pairs) == pairs
    health.mark_down("192.0.2.1")
    clock.advance(DOWN_FIRST + 1)
    assert health.is_down("192.0.2.1")
    clock.advance(DOWN_FIRST)
    assert not health.is_down("192.0.2.1")
    health.mark_down("192.0.2.1")
    health.mark_up("192.0.2.1")
    assert not health.is_down("192.0.2.1")


class RecordingReactor:
    """Records listenUDP calls; enough for the resolver's socket set-up."""

    def __init__(self) -> None:
        self.interfaces: list[str] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> object:
        self.interfaces.append(interface)
        return object()


def test_loopback_servers_bind_loopback() -> None:
    """With DNS servers on loopback, the query socket binds to loopback only."""
    reactor = RecordingReactor()
    resolver = make_dns_resolver(reactor, [("127.0.0.1", 5353)])
    resolver._connectedProtocol()
    assert reactor.interfaces == ["127.0.0.1"]


def test_listening_on_every_interface_any_local_address_is_self() -> None:
    """
    A listener on every interface (the unspecified address among mailx's
    own): an exchange at any address of this host is mailx, not only one at
    a listener's address; a backup MX must not deliver to itself.
    """
    table = dict(SELF)
    table[("s.test", dns.MX)] = [
        mx("s.test", 5, "better.s.test"),
        mx("s.test", 10, "other-name.s.test"),
    ]
    # A loopback address of this host that no listener names.
    table[("other-name.s.test", dns.A)] = [a("other-name.s.test", "127.0.0.77")]
    wildcard = resolve(make(table, own=("0.0.0.0",))[0], "s.test")
    assert wildcard == [NextHop("better.s.test", 5, ("192.0.2.20",))]
    bound = resolve(make(table, own=("127.0.0.1",))[0], "s.test")
    assert isinstance(bound, list)
    assert [hop.host for hop in bound] == ["better.s.test", "other-name.s.test"]


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1", True),
        ("127.0.0.77", True),
        ("::1", True),
        ("192.0.2.1", False),  # TEST-NET-1: nowhere, and a connect sends nothing
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_local_addresses_of_this_host(address: str, local: bool) -> None:
    assert is_local_address(ipaddress.ip_address(address)) is local


def test_own_addresses_without_a_wildcard_are_the_bound_ones() -> None:
    own = OwnAddresses(["192.0.2.1", "2001:db8::1"])
    assert "192.0.2.1" in own and "2001:db8::1" in own
    assert "127.0.0.1" not in own and "not an address" not in own
    everywhere = OwnAddresses(["::", "192.0.2.1"])
    assert everywhere.every_interface
    assert "192.0.2.1" in everywhere and "127.0.0.1" in everywhere
    assert "192.0.2.99" not in everywhere
