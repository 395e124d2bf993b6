"""
The outbound agent against a DNS server and scripted next hops on loopback.

Every name resolves through ``tests.dnsserver`` on 127.0.0.1; every next hop
is a ``tests.smtppeer`` peer on a 127.0.0.x address.  Timeouts are short so a
stalling peer or DNS server ends the test quickly.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailx.address import Address
from mailx.client import Timeouts
from mailx.envelope import Body, Envelope
from mailx.maillog import MAIL_NAMESPACE
from mailx.outbound import OutboundAgent
from mailx.spool import RecipientResult
from tests.dnsserver import Behaviour, DNSServer, Zone
from tests.smtppeer import PeerGroup, Script, make_tls_identity

pytestmark = pytest.mark.integration

ME = "mailx.test"
MESSAGE = b"From: a@src.test\r\nTo: b@multi.test\r\nSubject: hi\r\n\r\nHello.\r\n"

ZONE = Zone(
    "test",
    {
        "multi.test": [
            ("MX", 10, "mx-a.multi.test"),
            ("MX", 20, "mx-c.multi.test"),
            ("MX", 10, "mx-b.multi.test"),
        ],
        "mx-a.multi.test": [("A", "127.0.0.2")],
        "mx-b.multi.test": [("A", "127.0.0.3")],
        "mx-c.multi.test": [("A", "127.0.0.4")],
        "cname.test": [("MX", 10, "alias.cname.test")],
        "alias.cname.test": [("CNAME", "real.cname.test")],
        "real.cname.test": [("A", "127.0.0.5")],
        "nomx.test": [("A", "127.0.0.6")],
        "nullmx.test": [("MX", 0, ".")],
        "self.test": [
            ("MX", 5, "better.self.test"),
            ("MX", 10, ME),
            ("MX", 20, "worse.self.test"),
        ],
        "better.self.test": [("A", "127.0.0.7")],
        "worse.self.test": [("A", "127.0.0.8")],
        "selfbest.test": [
            ("MX", 10, "me.selfbest.test"),
            ("MX", 20, "mx.selfbest.test"),
        ],
        "me.selfbest.test": [("A", "127.0.0.1")],
        "mx.selfbest.test": [("A", "127.0.0.9")],
        "tls.test": [("MX", 10, "mx.tls.test")],
        "mx.tls.test": [("A", "127.0.0.10")],
        "smart.test": [("A", "127.0.0.11")],
    },
    ttl=60,
)

SHORT = Timeouts(
    connect=2.0,
    greeting=1.0,
    command=1.0,
    mail=1.0,
    rcpt=1.0,
    data_init=1.0,
    data_block=1.0,
    data_end=1.0,
)


def rcpt(text: str) -> Address:
    local, _, domain = text.partition("@")
    return Address(local, domain)


class OutboundTestCase(TestCase):
    """Starts the DNS server; each test starts its peers and an agent."""

    def setUp(self) -> None:
        self.dns = DNSServer(
            [ZONE],
            {"servfail.test": Behaviour.SERVFAIL, "silent.test": Behaviour.SILENT},
        )
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.peers = PeerGroup()
        self.addCleanup(self.peers.stop)
        self.log: list[str] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == MAIL_NAMESPACE:
                self.log.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def start(self, scripts: dict[str, Script], **options: Any) -> OutboundAgent:
        port = self.peers.start(scripts) if scripts else 1
        options.setdefault("timeouts", SHORT)
        options.setdefault("rng", random.Random(5))
        return OutboundAgent(
            reactor,
            ME,
            ["127.0.0.1"],
            self.dns.servers,
            port=options.pop("port", port),
            dns_timeout=0.6,
            **options,
        )

    async def send(
        self,
        agent: OutboundAgent,
        recipients: list[str],
        content: bytes = MESSAGE,
        body: Body = Body.SEVEN_BIT,
        reverse_path: Address | None = None,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        addresses = [rcpt(r) for r in recipients]
        domain = addresses[0].domain
        envelope = Envelope(
            reverse_path or rcpt("a@src.test"),
            body=body,
            smtputf8=smtputf8,
            message_id="TESTID",
        )
        return await agent.deliver(
            envelope.reverse_path, domain, addresses, content, envelope
        )

    def codes(self, results: list[RecipientResult]) -> list[str]:
        return [f"{r.reply.code} {r.reply.enhanced}".strip() for r in results]


class ResolutionTests(OutboundTestCase):
    async def test_best_exchange_gets_the_message(self) -> None:
        """The message goes to an exchange of the best preference, unchanged."""
        agent = self.start(
            {h: Script() for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
        )
        results = await self.send(agent, ["b@multi.test"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        got = [self.peers.peer(h).messages for h in ("127.0.0.2", "127.0.0.3")]
        self.assertEqual(sum(len(m) for m in got), 1)
        message = (got[0] or got[1])[0]
        self.assertEqual(message.content, MESSAGE)
        self.assertEqual(message.recipients, ["b@multi.test"])
        self.assertEqual(self.peers.peer("127.0.0.4").connections, 0)

    async def test_refused_exchanges_fall_back_in_order(self) -> None:
        """When both best exchanges refuse, the worse one gets the message."""
        agent = self.start({"127.0.0.4": Script()})
        results = await self.send(agent, ["b@multi.test"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        self.assertEqual(results[0].next_hop, "mx-c.multi.test[127.0.0.4]")
        self.assertEqual(len(self.peers.peer("127.0.0.4").messages), 1)

    async def test_cname_target_is_followed(self) -> None:
        """An MX target that is a CNAME is delivered to at its canonical address."""
        agent = self.start({"127.0.0.5": Script()})
        results = await self.send(agent, ["b@cname.test"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        self.assertEqual(len(self.peers.peer("127.0.0.5").messages), 1)

    async def test_no_mx_uses_the_domain_address(self) -> None:
        """A domain with no MX but an A record is its own implicit exchange."""
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["b@nomx.test"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        self.assertEqual(len(self.peers.peer("127.0.0.6").messages), 1)

    async def test_nxdomain_is_permanent(self) -> None:
        """A domain that does not exist fails with 550 5.1.2 and no connection."""
        agent = self.start({"127.0.0.2": Script()})
        results = await self.send(agent, ["b@missing.test"])
        self.assertEqual(self.codes(results), ["550 5.1.2"])
        self.assertEqual(results[0].next_hop, "")

    async def test_servfail_is_temporary_without_fallback(self) -> None:
        """SERVFAIL defers the recipient (4.4.3) and asks for no A record."""
        agent = self.start({})
        results = await self.send(agent, ["b@servfail.test"])
        self.assertEqual(self.codes(results), ["451 4.4.3"])
        self.assertEqual(self.dns.queries, [("servfail.test", "MX")])

    async def test_dns_timeout_is_temporary(self) -> None:
        """A DNS server that never answers defers the recipient (4.4.3)."""
        agent = self.start({})
        results = await self.send(agent, ["b@silent.test"])
        self.assertEqual(self.codes(results), ["451 4.4.3"])
        self.assertIn("timed out", results[0].reply.text)

    async def test_null_mx_is_permanent(self) -> None:
        """A null MX fails at once with 556 5.1.10."""
        agent = self.start({})
        results = await self.send(agent, ["b@nullmx.test"])
        self.assertEqual(self.codes(results), ["556 5.1.10"])

    async def test_self_listed_delivers_only_to_better(self) -> None:
        """Listed at 10 with a better host at 5, mailx sends to the better one."""
        agent = self.start({"127.0.0.7": Script(), "127.0.0.8": Script()})
        results = await self.send(agent, ["b@self.test"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        self.assertEqual(len(self.peers.peer("127.0.0.7").messages), 1)
        self.assertEqual(self.peers.peer("127.0.0.8").connections, 0)

    async def test_self_listed_never_falls_to_worse(self) -> None:
        """When the better host is down, mailx defers instead of using worse."""
        agent = self.start({"127.0.0.8": Script()})
        results = await self.send(agent, ["b@self.test"])
        self.assertEqual(self.codes(results), ["451 4.4.1"])
        self.assertEqual(self.peers.peer("127.0.0.8").connections, 0)

    async def test_self_as_best_is_a_loop(self) -> None:
        """mailx as best MX (by its address) of a foreign domain fails 5.4.6."""
        agent = self.start({"127.0.0.9": Script()})
        results = await self.send(agent, ["b@selfbest.test"])
        self.assertEqual(self.codes(results), ["554 5.4.6"])
        self.assertEqual(self.peers.peer("127.0.0.9").connections, 0)

    async def test_address_literal(self) -> None:
        """A recipient at an address literal is delivered to that address."""
        agent = self.start({"127.0.0.12": Script()})
        results = await self.send(agent, ["b@[127.0.0.12]"])
        self.assertEqual(self.codes(results), ["250 2.0.0"])
        self.assertEqual(len(self.peers.peer("127.0.0.12").messages), 1)

    async def test_refused_host_is_tried_last_next_time(self) -> None:
        """A host that refused is tried after the others on the next message."""
        agent = self.start({"127.0.0.3": Script(), "127.0.0.4": Script()})
        await self.send(agent, ["b@multi.test"])
        await self.send(agent, ["b@multi.test"])
        await self.send(agent, ["b@multi.test"])
        self.assertEqual(len(self.peers.peer("127.0.0.3").messages), 3)
        self.assertEqual(self.peers.peer("127.0.0.4").connections, 0)
        attempts = [line for line in self.log if "127.0.0.2" in line]
        self.assertLessEqual(len(attempts), 1)
