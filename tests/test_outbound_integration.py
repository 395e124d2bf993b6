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
from twisted.internet import reactor, ssl
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailx import outbound
from mailx.address import Address
from mailx.client import Timeouts
from mailx.envelope import Body, Envelope, Recipient, Route
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
        "two.test": [("MX", 10, "mx.two.test")],
        "mx.two.test": [("A", "127.0.0.13"), ("A", "127.0.0.14")],
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

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == MAIL_NAMESPACE:
                self.log.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def start(self, scripts: dict[str, Script], **options: Any) -> OutboundAgent:
        """Start the peers, then an agent; a smarthost port 0 is the peers' port."""
        port = self.peers.start(scripts) if scripts else 1
        if options.get("smarthost") is not None and options["smarthost"][1] == 0:
            options["smarthost"] = (options["smarthost"][0], port)
        options.setdefault("timeouts", SHORT)
        options.setdefault("rng", random.Random(5))
        # Kept connections only where a test asks for them (and closes them).
        options.setdefault("idle_time", 0)
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

    async def assert_the_third_exchange_takes_it(self, failing: Script) -> None:
        """With the two best exchanges of multi.test behaving as ``failing``,
        the message goes on to the third, once."""
        agent = self.start(
            {"127.0.0.2": failing, "127.0.0.3": failing, "127.0.0.4": Script()}
        )
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert len(self.peers.peer("127.0.0.4").messages) == 1


class ResolutionTests(OutboundTestCase):
    async def test_best_exchange_gets_the_message(self) -> None:
        """The message goes to an exchange of the best preference, unchanged."""
        agent = self.start(
            {h: Script() for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
        )
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["250 2.0.0"]
        got = [self.peers.peer(h).messages for h in ("127.0.0.2", "127.0.0.3")]
        assert sum(len(m) for m in got) == 1
        message = (got[0] or got[1])[0]
        assert message.content == MESSAGE
        assert message.recipients == ["b@multi.test"]
        assert self.peers.peer("127.0.0.4").connections == 0

    async def test_refused_exchanges_fall_back_in_order(self) -> None:
        """When both best exchanges refuse, the worse one gets the message."""
        agent = self.start({"127.0.0.4": Script()})
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert results[0].next_hop == "mx-c.multi.test[127.0.0.4]"
        assert len(self.peers.peer("127.0.0.4").messages) == 1

    async def test_cname_target_is_followed(self) -> None:
        """An MX target that is a CNAME is delivered to at its canonical address."""
        agent = self.start({"127.0.0.5": Script()})
        results = await self.send(agent, ["b@cname.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert len(self.peers.peer("127.0.0.5").messages) == 1

    async def test_no_mx_uses_the_domain_address(self) -> None:
        """A domain with no MX but an A record is its own implicit exchange."""
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["b@nomx.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert len(self.peers.peer("127.0.0.6").messages) == 1

    async def test_nxdomain_is_permanent(self) -> None:
        """A domain that does not exist fails with 550 5.1.2 and no connection."""
        agent = self.start({"127.0.0.2": Script()})
        results = await self.send(agent, ["b@missing.test"])
        assert self.codes(results) == ["550 5.1.2"]
        assert results[0].next_hop == ""

    async def test_servfail_is_temporary_without_fallback(self) -> None:
        """SERVFAIL defers the recipient (4.4.3) and asks for no A record."""
        agent = self.start({})
        results = await self.send(agent, ["b@servfail.test"])
        assert self.codes(results) == ["451 4.4.3"]
        assert self.dns.queries == [("servfail.test", "MX")]

    async def test_dns_timeout_is_temporary(self) -> None:
        """A DNS server that never answers defers the recipient (4.4.3)."""
        agent = self.start({})
        results = await self.send(agent, ["b@silent.test"])
        assert self.codes(results) == ["451 4.4.3"]
        assert "timed out" in results[0].reply.text

    async def test_null_mx_is_permanent(self) -> None:
        """A null MX fails at once with 556 5.1.10."""
        agent = self.start({})
        results = await self.send(agent, ["b@nullmx.test"])
        assert self.codes(results) == ["556 5.1.10"]

    async def test_self_listed_delivers_only_to_better(self) -> None:
        """Listed at 10 with a better host at 5, mailx sends to the better one."""
        agent = self.start({"127.0.0.7": Script(), "127.0.0.8": Script()})
        results = await self.send(agent, ["b@self.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert len(self.peers.peer("127.0.0.7").messages) == 1
        assert self.peers.peer("127.0.0.8").connections == 0

    async def test_self_listed_never_falls_to_worse(self) -> None:
        """When the better host is down, mailx defers instead of using worse."""
        agent = self.start({"127.0.0.8": Script()})
        results = await self.send(agent, ["b@self.test"])
        assert self.codes(results) == ["451 4.4.1"]
        assert results[0].reply.text == "No answer from next hop: connection refused"
        assert self.peers.peer("127.0.0.8").connections == 0
        # Nothing answered: the recipient's line says relay=none.
        assert results[0].next_hop == ""

    async def test_self_as_best_is_a_loop(self) -> None:
        """mailx as best MX (by its address) of a foreign domain fails 5.4.6."""
        agent = self.start({"127.0.0.9": Script()})
        results = await self.send(agent, ["b@selfbest.test"])
        assert self.codes(results) == ["554 5.4.6"]
        assert self.peers.peer("127.0.0.9").connections == 0

    async def test_address_literal(self) -> None:
        """A recipient at an address literal is delivered to that address."""
        agent = self.start({"127.0.0.12": Script()})
        results = await self.send(agent, ["b@[127.0.0.12]"])
        assert self.codes(results) == ["250 2.0.0"]
        assert len(self.peers.peer("127.0.0.12").messages) == 1

    async def test_every_address_of_a_host_is_tried(self) -> None:
        """When one address of an exchange refuses, its other address is tried."""
        agent = self.start({"127.0.0.14": Script()})
        results = await self.send(agent, ["b@two.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert results[0].next_hop == "mx.two.test[127.0.0.14]"

    async def test_max_hosts_bounds_the_walk(self) -> None:
        """No more than max_hosts addresses are tried in one attempt."""
        agent = self.start({"127.0.0.4": Script()}, max_hosts=2)
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["451 4.4.1"]
        assert self.peers.peer("127.0.0.4").connections == 0
        assert len(self.log) == 2

    async def test_address_literal_refused_by_policy(self) -> None:
        """With literals disallowed, a literal recipient fails without a connection."""
        agent = self.start({"127.0.0.12": Script()}, allow_literals=False)
        results = await self.send(agent, ["b@[127.0.0.12]"])
        assert self.codes(results) == ["550 5.1.2"]
        assert self.peers.peer("127.0.0.12").connections == 0

    async def test_address_literal_of_self_is_a_loop(self) -> None:
        """A literal naming one of mailx's own addresses fails 5.4.6."""
        agent = self.start({})
        results = await self.send(agent, ["b@[127.0.0.1]"])
        assert self.codes(results) == ["554 5.4.6"]

    async def test_refused_host_is_tried_last_next_time(self) -> None:
        """A host that refused is tried after the others on the next message."""
        agent = self.start({"127.0.0.3": Script(), "127.0.0.4": Script()})
        await self.send(agent, ["b@multi.test"])
        await self.send(agent, ["b@multi.test"])
        await self.send(agent, ["b@multi.test"])
        assert len(self.peers.peer("127.0.0.3").messages) == 3
        assert self.peers.peer("127.0.0.4").connections == 0
        attempts = [line for line in self.log if "127.0.0.2" in line]
        assert len(attempts) <= 1


class SessionTests(OutboundTestCase):
    async def test_greeting_421_moves_to_next_exchange(self) -> None:
        """A 421 greeting sends the message on to the next exchange."""
        await self.assert_the_third_exchange_takes_it(Script(greeting="421 4.3.2 busy"))

    async def test_a_554_greeting_defers_and_moves_on(self) -> None:
        """A 554 greeting sends the message on to the next exchange."""
        refusing = Script(greeting="554 5.3.2 no service")
        await self.assert_the_third_exchange_takes_it(refusing)

    async def test_554_greetings_everywhere_defer(self) -> None:
        """Every exchange greeting with 554: deferred, not bounced."""
        refusing = Script(greeting="554 5.3.2 no service")
        hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
        agent = self.start({h: refusing for h in hosts})
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["451 4.4.0"]

    async def test_all_exchanges_421_is_temporary(self) -> None:
        """When every exchange answers 421, the recipient is deferred with it."""
        busy = Script(greeting="421 4.3.2 busy")
        agent = self.start({h: busy for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")})
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["421 4.3.2"]

    async def test_per_recipient_replies(self) -> None:
        """Each RCPT reply is kept; the final reply goes to the accepted ones."""
        script = Script(
            recipient_replies={
                "no@nomx.test": "550 5.1.1 no such user",
                "later@nomx.test": "452 4.2.2 mailbox full",
            }
        )
        agent = self.start({"127.0.0.6": script})
        results = await self.send(
            agent, ["yes@nomx.test", "no@nomx.test", "later@nomx.test", "y2@nomx.test"]
        )
        assert self.codes(results) == [
            "250 2.0.0",
            "550 5.1.1",
            "452 4.2.2",
            "250 2.0.0",
        ]
        message = self.peers.peer("127.0.0.6").messages[0]
        assert message.recipients == ["yes@nomx.test", "y2@nomx.test"]

    async def test_no_content_without_accepted_recipient(self) -> None:
        """When every RCPT is refused, the pipelined DATA is refused and no
        content is sent."""
        agent = self.start({"127.0.0.6": Script(replies={"RCPT": "550 5.1.1 no"})})
        results = await self.send(agent, ["a@nomx.test", "b@nomx.test"])
        assert self.codes(results) == ["550 5.1.1", "550 5.1.1"]
        peer = self.peers.peer("127.0.0.6")
        verbs = [c.split(" ")[0] for c in peer.commands]
        assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
        # This peer takes DATA even so: only the lone dot reached it.
        assert [message.content for message in peer.messages] in ([], [b""])

    async def test_mail_refused_everywhere_is_permanent(self) -> None:
        """A 5xx to MAIL at every exchange fails the recipient permanently."""
        refuse = Script(replies={"MAIL": "550 5.7.1 sender refused"})
        agent = self.start({h: refuse for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")})
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["550 5.7.1"]
        assert self.peers.peer("127.0.0.4").connections == 1

    async def test_mail_refused_at_one_host_is_not_final(self) -> None:
        """A 5xx to MAIL at one exchange with a 4xx at another defers."""
        agent = self.start(
            {
                "127.0.0.2": Script(replies={"MAIL": "550 5.7.1 refused"}),
                "127.0.0.3": Script(replies={"MAIL": "550 5.7.1 refused"}),
                "127.0.0.4": Script(replies={"MAIL": "451 4.3.0 try later"}),
            }
        )
        results = await self.send(agent, ["b@multi.test"])
        assert self.codes(results) == ["451 4.3.0"]

    async def test_data_refused_4xx_defers_accepted(self) -> None:
        """A 4xx to DATA defers the accepted recipients; the refused keep 5xx."""
        script = Script(
            replies={"DATA": "451 4.3.0 not now"},
            recipient_replies={"no@nomx.test": "550 5.1.1 unknown"},
        )
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["yes@nomx.test", "no@nomx.test"])
        assert self.codes(results) == ["451 4.3.0", "550 5.1.1"]
        assert self.peers.peer("127.0.0.6").messages == []

    async def test_data_answered_250_is_no_delivery(self) -> None:
        """A next hop that answers DATA with 250 never got the content: the
        recipients are deferred with 451 4.5.0, not delivered (RFC 5321
        section 4.3.2: DATA's reply is 354 or an error)."""
        agent = self.start({"127.0.0.6": Script(replies={"DATA": "250 2.0.0 ok"})})
        results = await self.send(agent, ["a@nomx.test", "b@nomx.test"])
        assert self.codes(results) == ["451 4.5.0", "451 4.5.0"]
        assert "250 in reply to DATA" in results[0].reply.text
        assert self.peers.peer("127.0.0.6").messages == []

    async def test_an_early_reply_to_the_message_is_no_delivery(self) -> None:
        """A next hop that answers the message with the 354, before reading
        it, has not taken it: deferred with 451 4.5.0, whatever it says at
        the end of the data (RFC 5321 section 4.1.1.4)."""
        script = Script(
            replies={"DATA": "354 go\r\n250 2.0.0 ok early", ".": "550 5.7.1 no"}
        )
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["a@nomx.test"])
        assert self.codes(results) == ["451 4.5.0"]
        assert "a reply to nothing sent yet" in results[0].reply.text

    async def test_a_stray_refusal_bounces_no_one(self) -> None:
        """A 550 that answers nothing (sent with MAIL's 250) is no refusal of
        a recipient: deferred, not bounced."""
        script = Script(replies={"MAIL": "250 2.1.0 ok\r\n550 5.1.1 stray"})
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["a@nomx.test"])
        assert self.codes(results) == ["451 4.5.0"]
        assert self.peers.peer("127.0.0.6").messages == []

    async def test_a_second_banner_line_is_no_ehlo_reply(self) -> None:
        """A greeting sent as two 220 replies: the second is not taken for
        the EHLO reply (every later reply would be one step off, and a RCPT's
        250 taken for DATA's), the recipients are deferred."""
        script = Script(greeting="220 peer.test ESMTP\r\n220 welcome, second line")
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["a@nomx.test"])
        assert self.codes(results) == ["451 4.5.0"]
        assert self.peers.peer("127.0.0.6").messages == []

    async def test_a_reply_of_mixed_codes_is_no_acceptance(self) -> None:
        """A RCPT reply whose lines say 250 then 550 is a broken reply, not an
        acceptance: nothing is delivered, nothing bounced (RFC 5321 section
        4.2.1)."""
        script = Script(
            recipient_replies={"b@nomx.test": "250-2.1.5 ok\r\n550 5.1.1 mixed"}
        )
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["a@nomx.test", "b@nomx.test"])
        assert self.codes(results) == ["451 4.5.0", "451 4.5.0"]
        assert self.peers.peer("127.0.0.6").messages == []

    async def test_final_reply_5xx_is_permanent(self) -> None:
        """A 5xx to the end of data fails the accepted recipients permanently."""
        agent = self.start({"127.0.0.6": Script(replies={".": "554 5.7.1 spam"})})
        results = await self.send(agent, ["b@nomx.test"])
        assert self.codes(results) == ["554 5.7.1"]

    async def test_drop_mid_data_moves_on(self) -> None:
        """A connection dropped during the content moves to the next exchange."""
        await self.assert_the_third_exchange_takes_it(Script(drop_at="DATA-BODY"))

    async def test_stalled_peer_times_out(self) -> None:
        """A peer that stops answering RCPT times out and is left for the next."""
        await self.assert_the_third_exchange_takes_it(Script(stall_at="RCPT"))

    async def test_silent_greeting_times_out(self) -> None:
        """A peer that never greets defers the recipient with a timeout."""
        agent = self.start({"127.0.0.6": Script(greeting=None)})
        results = await self.send(agent, ["b@nomx.test"])
        assert self.codes(results) == ["451 4.4.2"]
        assert "greeting" in results[0].reply.text

    async def test_helo_fallback(self) -> None:
        """A peer that does not know EHLO is greeted with HELO."""
        agent = self.start({"127.0.0.6": Script(replies={"EHLO": "500 5.5.1 what"})})
        results = await self.send(agent, ["b@nomx.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert f"HELO {ME}" in self.peers.peer("127.0.0.6").commands

    async def test_dot_stuffing_is_exact(self) -> None:
        """Lines starting with a dot, first line and block edges, arrive intact."""
        filler = b"x" * (64 * 1024 - 8) + b"\r\n"
        content = b".\r\n" + b"Subject: x\r\n\r\n" + filler + b".edge\r\n..two\r\n."
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["b@nomx.test"], content)
        assert self.codes(results) == ["250 2.0.0"]
        message = self.peers.peer("127.0.0.6").messages[0]
        assert message.wire.startswith(b"..\r\nSubject")
        assert b"\r\n..edge\r\n...two\r\n..\r\n" in message.wire
        assert message.content == content + b"\r\n"

    async def test_size_limit_is_respected(self) -> None:
        """A message larger than the peer's SIZE is not sent: 552 5.3.4."""
        small = Script(extensions=("SIZE 20",))
        agent = self.start({"127.0.0.6": small})
        results = await self.send(agent, ["b@nomx.test"])
        assert self.codes(results) == ["552 5.3.4"]
        verbs = [c.split(" ")[0] for c in self.peers.peer("127.0.0.6").commands]
        assert "MAIL" not in verbs

    async def test_eight_bit_is_converted_for_a_seven_bit_peer(self) -> None:
        """An 8-bit text body reaches a peer without 8BITMIME quoted-printable."""
        content = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
        agent = self.start({"127.0.0.6": Script(extensions=())})
        results = await self.send(agent, ["b@nomx.test"], content, Body.EIGHT_BIT)
        assert self.codes(results) == ["250 2.0.0"]
        got = self.peers.peer("127.0.0.6").messages[0].content
        assert b"Content-Transfer-Encoding: quoted-printable\r\n" in got
        assert b"caf=C3=A9\r\n" in got
        assert b"BODY=" not in self.peers.peer("127.0.0.6").commands[1].encode()

    async def test_eight_bit_multipart_is_refused_for_a_seven_bit_peer(self) -> None:
        """An 8-bit multipart message fails 5.6.3 at a peer without 8BITMIME."""
        content = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\n\r\n\xff\r\n--b--\r\n"
        )
        agent = self.start({"127.0.0.6": Script(extensions=())})
        results = await self.send(agent, ["b@nomx.test"], content, Body.EIGHT_BIT)
        assert self.codes(results) == ["554 5.6.3"]

    async def test_eight_bit_peer_gets_body_parameter(self) -> None:
        """An 8-bit message goes as is with BODY=8BITMIME when offered."""
        content = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["b@nomx.test"], content, Body.EIGHT_BIT)
        assert self.codes(results) == ["250 2.0.0"]
        peer = self.peers.peer("127.0.0.6")
        assert peer.messages[0].content == content
        assert "BODY=8BITMIME" in next(c for c in peer.commands if c.startswith("MAIL"))

    async def test_utf8_address_needs_smtputf8(self) -> None:
        """A UTF-8 recipient fails 5.6.7 at a peer without SMTPUTF8."""
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["jos\u00e9@nomx.test"], smtputf8=True)
        assert self.codes(results) == ["553 5.6.7"]

    async def test_utf8_address_with_smtputf8_peer(self) -> None:
        """A UTF-8 recipient is sent with the SMTPUTF8 parameter when offered."""
        script = Script(extensions=("8BITMIME", "SMTPUTF8"))
        agent = self.start({"127.0.0.6": script})
        results = await self.send(agent, ["jos\u00e9@nomx.test"], smtputf8=True)
        assert self.codes(results) == ["250 2.0.0"]
        mail = [
            c for c in self.peers.peer("127.0.0.6").commands if c.startswith("MAIL")
        ]
        assert mail[0].endswith(" SMTPUTF8")

    async def test_chunking_uses_bdat(self) -> None:
        """A peer offering CHUNKING gets the message by BDAT, not stuffed."""
        content = b"Subject: x\r\n\r\n.dot\r\n"
        agent = self.start({"127.0.0.6": Script(extensions=("CHUNKING", "PIPELINING"))})
        results = await self.send(agent, ["b@nomx.test"], content)
        assert self.codes(results) == ["250 2.0.0"]
        peer = self.peers.peer("127.0.0.6")
        assert f"BDAT {len(content)} LAST" in peer.commands
        assert peer.messages[0].content == content

    async def test_binarymime_needs_the_extension(self) -> None:
        """A BINARYMIME message fails 5.6.3 at a peer without BINARYMIME."""
        agent = self.start({"127.0.0.6": Script(extensions=("CHUNKING",))})
        results = await self.send(agent, ["b@nomx.test"], body=Body.BINARY)
        assert self.codes(results) == ["554 5.6.3"]

    async def test_eight_bit_header_without_8bitmime(self) -> None:
        """Raw 8-bit header octets fail 5.6.3 at a peer without 8BITMIME."""
        content = b"Subject: caf\xe9\r\n\r\nbody\r\n"
        agent = self.start({"127.0.0.6": Script(extensions=())})
        results = await self.send(agent, ["b@nomx.test"], content)
        assert self.codes(results) == ["554 5.6.3"]

    async def test_utf8_header_needs_smtputf8(self) -> None:
        """An SMTPUTF8 message with UTF-8 header fields fails 5.6.9 without it."""
        content = "Subject: caf\u00e9\r\n\r\nbody\r\n".encode()
        agent = self.start({"127.0.0.6": Script()})
        results = await self.send(agent, ["b@nomx.test"], content, smtputf8=True)
        assert self.codes(results) == ["554 5.6.9"]

    async def test_dsn_parameters_pass_on(self) -> None:
        """RET, ENVID, NOTIFY and ORCPT go on to a peer that offers DSN."""
        agent = self.start({"127.0.0.6": Script(extensions=("DSN",))})
        to = rcpt("b@nomx.test")
        envelope = Envelope(
            rcpt("a@src.test"),
            [
                Recipient(
                    to, Route.RELAY, frozenset({"FAILURE", "SUCCESS"}), "rfc822;b@x"
                )
            ],
            ret="HDRS",
            envid="Q1",
            message_id="TESTID",
        )
        results = await agent.deliver(
            envelope.reverse_path, "nomx.test", [to], MESSAGE, envelope
        )
        assert self.codes(results) == ["250 2.0.0"]
        commands = self.peers.peer("127.0.0.6").commands
        assert "MAIL FROM:<a@src.test> RET=HDRS ENVID=Q1" in commands
        assert (
            "RCPT TO:<b@nomx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@x" in commands
        )

    async def test_mail_log_line_per_attempt(self) -> None:
        """Each attempt logs next hop, address, TLS and the reply."""
        agent = self.start({"127.0.0.6": Script(greeting="421 4.3.2 busy")})
        await self.send(agent, ["b@nomx.test"])
        assert self.log == (
            [
                "TESTID: to=<b@nomx.test> relay=nomx.test[127.0.0.6]:"
                f"{self.peers.port} tls=no status=deferred (421 4.3.2 busy)"
            ]
        )


class DebugLogTests(OutboundTestCase):
    async def test_connections_leave_no_factory_lines(self) -> None:
        """An outbound connection writes no "Starting factory" or "Stopping
        factory" line to the debug log; the mail log line is still written."""
        lines: list[str] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            lines.append(formatEvent(event) or "")

        agent = self.start({"127.0.0.6": Script()})
        # Only from here on: starting the peer logs its own factory.
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        results = await self.send(agent, ["b@nomx.test"])

        assert self.codes(results) == ["250 2.0.0"]
        assert not [line for line in lines if "factory" in line.lower()]
        assert len(self.log) == 1
        assert "relay=nomx.test[127.0.0.6]" in self.log[0]


class ReuseTests(OutboundTestCase):
    async def test_messages_share_one_connection(self) -> None:
        """Messages to the same next hop one after another go over one
        connection, each logged; closing the kept connection sends QUIT."""
        agent = self.start({"127.0.0.6": Script()}, idle_time=30.0)

        for _ in range(3):
            assert self.codes(await self.send(agent, ["b@nomx.test"])) == ["250 2.0.0"]
        await agent.close_idle()

        peer = self.peers.peer("127.0.0.6")
        assert peer.connections == 1
        assert len(peer.messages) == 3
        assert [c.split(" ")[0] for c in peer.commands].count("EHLO") == 1
        assert peer.commands[-1] == "QUIT"
        assert len(self.log) == 3

    async def test_tls_connection_is_reused_with_tls(self) -> None:
        """A kept connection that started TLS carries the next message over
        TLS, and the mail log says so."""
        identity = make_tls_identity("mx.tls.test")
        agent = self.start(
            {"127.0.0.10": Script(tls_pem=identity.server_pem)}, idle_time=30.0
        )

        for _ in range(2):
            assert self.codes(await self.send(agent, ["b@tls.test"])) == ["250 2.0.0"]
        await agent.close_idle()

        peer = self.peers.peer("127.0.0.10")
        assert peer.connections == 1
        assert [m.tls for m in peer.messages] == [True, True]
        assert all("tls=yes" in line for line in self.log)


class TLSTests(OutboundTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.identity = make_tls_identity("mx.tls.test")

    async def test_starttls_is_used_when_offered(self) -> None:
        """A peer offering STARTTLS gets the message over TLS."""
        agent = self.start({"127.0.0.10": Script(tls_pem=self.identity.server_pem)})
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["250 2.0.0"]
        message = self.peers.peer("127.0.0.10").messages[0]
        assert message.tls
        assert "tls=yes" in self.log[0]

    async def test_failed_handshake_retries_in_clear(self) -> None:
        """A broken opportunistic handshake is retried in clear on that host."""
        script = Script(tls_pem=self.identity.server_pem, break_tls=True)
        agent = self.start({"127.0.0.10": script})
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["250 2.0.0"]
        peer = self.peers.peer("127.0.0.10")
        assert peer.connections == 2
        assert not peer.messages[0].tls
        assert [line.split(" tls=")[1][:3] for line in self.log] == ["no ", "no "]

    async def test_octets_after_starttls_reply_drop_the_session(self) -> None:
        """Octets injected after the STARTTLS reply are never read as replies."""
        script = Script(
            tls_pem=self.identity.server_pem,
            inject_after_starttls=b"250 fake\r\n",
        )
        agent = self.start({"127.0.0.10": script})
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["451 4.7.0"]
        assert self.peers.peer("127.0.0.10").messages == []

    async def test_verify_policy_with_trusted_certificate(self) -> None:
        """Under a verify policy a trusted certificate for the name delivers."""
        agent = self.start(
            {"127.0.0.10": Script(tls_pem=self.identity.server_pem)},
            tls_policy={"tls.test": "verify"},
            tls_trust_root=self.identity.trust_root(),
        )
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["250 2.0.0"]
        assert self.peers.peer("127.0.0.10").messages[0].tls

    async def test_verify_policy_with_untrusted_certificate(self) -> None:
        """Under a verify policy an untrusted certificate defers (4.7.5)."""
        other = make_tls_identity("mx.tls.test")
        agent = self.start(
            {"127.0.0.10": Script(tls_pem=self.identity.server_pem)},
            tls_policy={"tls.test": "verify"},
            tls_trust_root=other.trust_root(),
        )
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["451 4.7.5"]
        assert self.peers.peer("127.0.0.10").messages == []
        # No TLS session was ever made: the log does not claim one.
        (line,) = self.log
        assert "tls=no status=deferred (451 4.7.5" in line

    async def test_verify_policy_without_starttls(self) -> None:
        """Under a verify policy a peer without STARTTLS gets nothing."""
        agent = self.start({"127.0.0.10": Script()}, tls_policy={"tls.test": "verify"})
        results = await self.send(agent, ["b@tls.test"])
        assert self.codes(results) == ["451 4.7.5"]

    async def test_tls_options_are_built_once_when_first_needed(self) -> None:
        """Sessions with a peer without STARTTLS build no TLS options; every
        session with a STARTTLS peer uses TLS with options built only once."""
        built: list[Any] = []
        real = ssl.CertificateOptions

        def counting(*args: Any, **kwargs: Any) -> Any:
            built.append(real(*args, **kwargs))
            return built[-1]

        self.patch(outbound, "CertificateOptions", counting)  # type: ignore[no-untyped-call]
        scripts = {
            "127.0.0.6": Script(),
            "127.0.0.10": Script(tls_pem=self.identity.server_pem),
        }
        agent = self.start(scripts)

        for _ in range(2):
            assert self.codes(await self.send(agent, ["b@nomx.test"])) == ["250 2.0.0"]
        assert built == []
        for _ in range(3):
            assert self.codes(await self.send(agent, ["b@tls.test"])) == ["250 2.0.0"]
        assert len(built) == 1
        assert [m.tls for m in self.peers.peer("127.0.0.10").messages] == [True] * 3

    async def test_verified_tls_options_are_kept_per_host(self) -> None:
        """Under a verify policy every session to a host verifies and delivers,
        with that host's options built once."""
        built: list[str] = []
        real = ssl.optionsForClientTLS

        def counting(hostname: str, **kwargs: Any) -> Any:
            built.append(hostname)
            return real(hostname, **kwargs)

        self.patch(outbound, "optionsForClientTLS", counting)  # type: ignore[no-untyped-call]
        agent = self.start(
            {"127.0.0.10": Script(tls_pem=self.identity.server_pem)},
            tls_policy={"tls.test": "verify"},
            tls_trust_root=self.identity.trust_root(),
        )

        for _ in range(2):
            assert self.codes(await self.send(agent, ["b@tls.test"])) == ["250 2.0.0"]
        assert built == ["mx.tls.test"]
        assert [m.tls for m in self.peers.peer("127.0.0.10").messages] == [True] * 2

    async def test_smarthost_with_auth(self) -> None:
        """A smarthost replaces MX lookup and gets AUTH PLAIN over TLS."""
        identity = make_tls_identity("smart.test")
        script = Script(tls_pem=identity.server_pem, extensions=("AUTH PLAIN",))
        agent = self.start(
            {"127.0.0.11": script},
            smarthost=("smart.test", 0),
            smarthost_user="user",
            smarthost_password="secret",
        )
        results = await self.send(agent, ["b@anywhere.example"])
        assert self.codes(results) == ["250 2.0.0"]
        peer = self.peers.peer("127.0.0.11")
        assert "AUTH PLAIN AHVzZXIAc2VjcmV0" in peer.commands
        assert peer.messages[0].tls
        assert "secret" not in " ".join(self.log)
