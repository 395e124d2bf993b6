"""The MX resolver against the loopback DNS server, with a zone given as text."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailx.mx import MXResolver, NextHop, ResolutionError, make_dns_resolver
from tests.dnsserver import Behaviour, DNSServer, Zone

pytestmark = pytest.mark.integration

ZONE_TEXT = """
$ORIGIN zone.test.
$TTL 120
@        IN SOA ns.zone.test. hostmaster.zone.test. 1 3600 600 86400 60
@        IN MX 10 mx1.zone.test.
@        IN MX 20 alias.zone.test.
mx1      IN A 127.0.0.21
mx1      IN AAAA ::1
alias    IN CNAME mx2.zone.test.
mx2      IN A 127.0.0.22
null     IN MX 0 .
"""


class ResolverOverDNSTests(TestCase):
    def setUp(self) -> None:
        self.dns = DNSServer(
            [Zone.from_text("zone.test", ZONE_TEXT)],
            {"refused.zone.test": Behaviour.REFUSED},
        )
        self.dns.start()
        self.addCleanup(self.dns.stop)
        resolver = make_dns_resolver(reactor, self.dns.servers)
        self.mx = MXResolver(resolver, reactor, "mailx.test", ["127.0.0.1"], (0.5,))

    async def test_zone_text_resolves_in_order(self) -> None:
        """MX records from zone text resolve by preference, CNAME followed."""
        hops = await self.mx.resolve("zone.test")
        assert hops == [
            NextHop("mx1.zone.test", 10, ("::1", "127.0.0.21")),
            NextHop("alias.zone.test", 20, ("127.0.0.22",)),
        ]

    async def test_answers_come_from_the_cache(self) -> None:
        """A second resolution within the TTL sends no query."""
        await self.mx.resolve("zone.test")
        asked = len(self.dns.queries)
        await self.mx.resolve("zone.test")
        assert len(self.dns.queries) == asked

    async def test_null_mx_from_zone_text(self) -> None:
        """A null MX written as MX 0 . fails with 556 5.1.10."""
        with pytest.raises(ResolutionError) as caught:
            await self.mx.resolve("null.zone.test")
        assert caught.value.reply.enhanced == "5.1.10"

    async def test_refused_is_temporary(self) -> None:
        """A REFUSED answer is a temporary failure, 4.4.3."""
        with pytest.raises(ResolutionError) as caught:
            await self.mx.resolve("refused.zone.test")
        assert caught.value.reply.code == 451
        assert "REFUSED" in caught.value.reply.text
