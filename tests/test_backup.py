"""Unit tests of backup-domain recipient checking over fake exchanges and a Clock."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from mailx import replies
from mailx.address import Address
from mailx.backup import (
    PROBE_MAX_HOSTS,
    PROBE_TIMEOUT,
    ProbeSession,
    RecipientProber,
    StaticRecipients,
    Verdict,
    backup_check_from_config,
)
from mailx.config import load_config
from mailx.envelope import ClientInfo, RecipientDecision, Route
from mailx.maillog import MAIL_NAMESPACE
from mailx.mx import NextHop, ResolutionError
from mailx.policy import RelayPolicy

BOB = Address("bob", "example.org")
NOBODY = Address("nobody", "example.org")
PRIMARY = NextHop("mxa.example.org", 0, ("127.0.0.2",))
SECOND = NextHop("mxb.example.org", 10, ("127.0.0.3",))


def feed(session: ProbeSession, *lines: str) -> list[bytes]:
    out: list[bytes] = []
    for line in lines:
        out.extend(session.data_received(line.encode() + b"\r\n"))
    return out


# --- the probe dialogue ----------------------------------------------------------


def test_probe_names_the_recipient_and_never_sends_data() -> None:
    """A probe greets, gives the null reverse path, names the recipient, quits."""
    session = ProbeSession("mxb.example.org", BOB)

    sent = feed(session, "220 hi", "250-mxa\r\n250 PIPELINING", "250 ok", "250 ok")

    assert sent == [
        b"EHLO mxb.example.org\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<bob@example.org>\r\n",
        b"QUIT\r\n",
    ]
    assert session.result is not None
    assert session.result.verdict is Verdict.EXISTS


@pytest.mark.parametrize(
    ("rcpt_reply", "verdict"),
    [
        ("550 5.1.1 no such user", Verdict.REFUSED),
        ("553 5.1.3 bad address", Verdict.REFUSED),
        ("450 4.2.0 greylisted", Verdict.UNKNOWN),
        ("251 2.1.5 will forward", Verdict.EXISTS),
        # RFC 5321 section 4.3.2: RCPT succeeds with 250 or 251 only; any
        # other code below 400 says nothing of the recipient.
        ("354 go ahead", Verdict.UNKNOWN),
        ("220 hello again", Verdict.UNKNOWN),
        ("252 cannot verify", Verdict.UNKNOWN),
    ],
)
def test_rcpt_reply_decides_the_verdict(rcpt_reply: str, verdict: Verdict) -> None:
    """250 or 251 to RCPT means the recipient exists, 5xx that it does not,
    anything else nothing."""
    session = ProbeSession("me", BOB)

    sent = feed(session, "220 hi", "250 mxa", "250 ok", rcpt_reply)

    assert sent[-1] == b"QUIT\r\n"
    assert session.final_result().verdict is verdict


def test_old_server_gets_helo() -> None:
    """A server refusing EHLO with 5xx is greeted with HELO and probed."""
    session = ProbeSession("me", BOB)

    sent = feed(session, "220 hi", "502 no ehlo", "250 hello", "250 ok", "550 no")

    assert sent[:2] == [b"EHLO me\r\n", b"HELO me\r\n"]
    assert session.final_result().verdict is Verdict.REFUSED


def test_refusing_greeting_says_nothing() -> None:
    """A 554 greeting ends the probe with QUIT and no verdict on the recipient."""
    session = ProbeSession("me", BOB)

    sent = feed(session, "554 go away")

    assert sent == [b"QUIT\r\n"]
    assert session.final_result().verdict is Verdict.UNKNOWN


def test_refused_null_sender_says_nothing() -> None:
    """A primary refusing MAIL FROM:<> leaves the recipient unknown."""
    session = ProbeSession("me", BOB)

    sent = feed(session, "220 hi", "250 mxa", "550 no bounces here")

    assert sent[-1] == b"QUIT\r\n"
    assert session.final_result().verdict is Verdict.UNKNOWN


def test_421_ends_at_once() -> None:
    """A 421 at any point ends the probe without another command."""
    session = ProbeSession("me", BOB)

    sent = feed(session, "220 hi", "250 mxa", "421 4.3.2 shutting down")

    assert sent == [b"EHLO me\r\n", b"MAIL FROM:<>\r\n"]
    assert session.finished
    assert session.final_result().verdict is Verdict.UNKNOWN


def test_utf8_recipient_needs_smtputf8() -> None:
    """A non-ASCII recipient is probed with SMTPUTF8, or not at all without it."""
    recipient = Address("jörg", "example.org")
    without = ProbeSession("me", recipient)
    with_it = ProbeSession("me", recipient)

    plain = feed(without, "220 hi", "250 mxa")
    utf8 = feed(with_it, "220 hi", "250-mxa\r\n250 SMTPUTF8")

    assert plain[-1] == b"QUIT\r\n"
    assert without.final_result().verdict is Verdict.UNKNOWN
    assert utf8[-1] == b"MAIL FROM:<> SMTPUTF8\r\n"


def test_malformed_reply_says_nothing() -> None:
    """A reply that is not SMTP ends the probe with no verdict."""
    session = ProbeSession("me", BOB)

    feed(session, "HTTP/1.1 400 Bad Request")

    assert session.finished
    assert session.final_result().verdict is Verdict.UNKNOWN


@pytest.mark.parametrize(
    "lines",
    [
        # A refusal sent with MAIL's 250, before the RCPT it would answer.
        ["220 hi", "250 mxa", "250 2.1.0 ok\r\n550 5.1.1 stray", "250 2.1.5 ok"],
        # A stray 250 after the EHLO reply, which MAIL's 250 would follow.
        ["220 hi", "250 mxa\r\n250 2.1.0 ok", "250 2.1.0 ok", "550 5.1.1 no"],
        ["220 hi\r\n250 extra", "250 mxa", "250 ok", "550 5.1.1 no"],
    ],
)
def test_a_reply_to_nothing_sent_says_nothing(lines: list[str]) -> None:
    """A reply in the same read as the one its command waited for answers
    nothing sent: no verdict (not cached), whatever comes after."""
    session = ProbeSession("me", BOB)

    feed(session, *lines)

    assert session.final_result().verdict is Verdict.UNKNOWN
    assert session.final_result().reply == replies.NEXT_HOP_PROTOCOL_ERROR


def test_dropped_connection_says_nothing() -> None:
    """A connection lost before the RCPT reply leaves the recipient unknown."""
    session = ProbeSession("me", BOB)
    feed(session, "220 hi", "250 mxa")

    assert session.final_result().verdict is Verdict.UNKNOWN


# --- the prober over scripted exchanges ----------------------------------------------


class Exchange:
    """One scripted exchange: replies by verb, or refusing connections."""

    def __init__(
        self,
        rcpt: str = "250 2.1.5 ok",
        refuse: bool = False,
        silent: bool = False,
        other: Mapping[str, str] | None = None,
    ) -> None:
        self.rcpt = rcpt
        self.refuse = refuse
        self.silent = silent
        self.other = dict(other or {})
        self.commands: list[str] = []
        self.connections = 0
        self.transports: list[StringTransport] = []
        self.protocols: list[Protocol] = []

    def reply_to(self, line: str) -> str:
        verb = line.split(" ")[0].split(":")[0].upper()
        if verb == "RCPT":
            return self.rcpt
        return self.other.get(verb, "221 bye" if verb == "QUIT" else "250 ok")

    def serve(self, protocol: Protocol) -> None:
        transport = StringTransport()
        self.transports.append(transport)
        self.protocols.append(protocol)
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        if self.silent:
            return
        protocol.dataReceived(b"220 exchange ESMTP\r\n")
        for _ in range(20):
            sent = transport.value()
            transport.clear()
            if not sent:
                break
            for line in sent.decode().splitlines():
                self.commands.append(line)
                protocol.dataReceived(self.reply_to(line).encode() + b"\r\n")
        if transport.disconnecting:
            protocol.connectionLost(connectionDone)


class Network:
    """Fake exchanges by IP address, and a Connector that reaches them."""

    def __init__(self, exchanges: Mapping[str, Exchange]) -> None:
        self.exchanges = exchanges
        self.tried: list[tuple[str, int]] = []

    def connect(self, ip: str, port: int, protocol: Protocol) -> defer.Deferred[Any]:
        self.tried.append((ip, port))
        exchange = self.exchanges[ip]
        exchange.connections += 1
        if exchange.refuse:
            return defer.fail(ConnectionRefusedError())  # type: ignore[no-untyped-call]
        exchange.serve(protocol)
        return defer.succeed(protocol)


class Hops:
    """A fake ``MXResolver``: fixed next hops, or a ResolutionError."""

    def __init__(self, hops: list[NextHop] | ResolutionError) -> None:
        self.hops = hops

    def resolve(self, domain: str) -> defer.Deferred[list[NextHop]]:
        if isinstance(self.hops, ResolutionError):
            return defer.fail(self.hops)
        return defer.succeed(self.hops)


def make_prober(
    exchanges: Mapping[str, Exchange],
    hops: list[NextHop] | ResolutionError | None = None,
    ttl: float = 60.0,
    **options: Any,
) -> tuple[RecipientProber, Network, Clock]:
    clock = Clock()
    network = Network(exchanges)
    prober = RecipientProber(
        Hops(hops if hops is not None else [PRIMARY, SECOND]),
        clock,
        "mxb.example.org",
        ttl,
        network.connect,
        port=2525,
        **options,
    )
    return prober, network, clock


def decide(
    answer: RecipientDecision | defer.Deferred[RecipientDecision],
) -> RecipientDecision:
    if not isinstance(answer, defer.Deferred):
        return answer
    results: list[Any] = []
    answer.addBoth(results.append)
    (result,) = results
    assert isinstance(result, RecipientDecision)
    return result


@pytest.fixture
def mail_log() -> Iterator[list[str]]:
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == MAIL_NAMESPACE:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_recipient_known_to_primary_is_accepted_for_backup() -> None:
    """A recipient the primary takes is accepted with the backup route."""
    primary = Exchange()
    prober, network, _ = make_prober({"127.0.0.2": primary})

    decision = decide(prober.check(BOB))

    assert decision == RecipientDecision(replies.RECIPIENT_OK, Route.BACKUP)
    assert network.tried == [("127.0.0.2", 2525)]
    assert "RCPT TO:<bob@example.org>" in primary.commands
    assert not any(c.startswith("DATA") for c in primary.commands)


def test_recipient_refused_by_primary_is_refused(mail_log: list[str]) -> None:
    """A recipient the primary refuses with 5xx gets 550 5.1.1 and is logged."""
    prober, _, _ = make_prober({"127.0.0.2": Exchange(rcpt="550 5.1.1 unknown")})

    decision = decide(prober.check(NOBODY))

    assert decision.reply == replies.NO_SUCH_USER
    assert decision.route is None
    assert mail_log == [
        "backup check to=<nobody@example.org> result=refuse (refused by "
        "mxa.example.org[127.0.0.2]): 550 5.1.1 unknown"
    ]


def test_answers_are_cached_for_the_ttl() -> None:
    """Within the TTL no second probe is made; after it, the primary is asked again."""
    primary = Exchange(rcpt="550 5.1.1 unknown")
    prober, _, clock = make_prober({"127.0.0.2": primary}, ttl=60.0)

    first = decide(prober.check(NOBODY))
    clock.advance(59)
    second = decide(prober.check(Address("NOBODY", "EXAMPLE.ORG")))
    clock.advance(2)
    third = decide(prober.check(NOBODY))

    assert first.reply == second.reply == third.reply == replies.NO_SUCH_USER
    assert primary.connections == 2


def test_zero_ttl_caches_nothing() -> None:
    """With probe_cache_ttl 0 every check asks the primary."""
    primary = Exchange()
    prober, _, _ = make_prober({"127.0.0.2": primary}, ttl=0.0)

    decide(prober.check(BOB))
    decide(prober.check(BOB))

    assert primary.connections == 2


def test_unreachable_primary_falls_to_the_next_better_exchange() -> None:
    """When the primary refuses the connection, the next better exchange is asked."""
    second = Exchange(rcpt="550 5.1.1 unknown")
    prober, network, _ = make_prober(
        {"127.0.0.2": Exchange(refuse=True), "127.0.0.3": second}
    )

    decision = decide(prober.check(NOBODY))

    assert decision.reply == replies.NO_SUCH_USER
    assert [ip for ip, _ in network.tried] == ["127.0.0.2", "127.0.0.3"]


def test_nobody_reachable_accepts_and_asks_again_next_time(
    mail_log: list[str],
) -> None:
    """With every better exchange down the recipient is accepted, uncached."""
    down = {"127.0.0.2": Exchange(refuse=True), "127.0.0.3": Exchange(refuse=True)}
    prober, network, _ = make_prober(down)

    first = decide(prober.check(NOBODY))
    second = decide(prober.check(NOBODY))

    assert first.route is second.route is Route.BACKUP
    assert len(network.tried) == 4
    assert mail_log[0] == (
        "backup check to=<nobody@example.org> result=accept "
        "(mxb.example.org[127.0.0.3] did not say, accepted unverified): "
        "451 4.4.1 No answer from next hop: ConnectionRefusedError"
    )


def test_greylisting_primary_does_not_refuse(mail_log: list[str]) -> None:
    """A 4xx to RCPT is no answer: the recipient is accepted, not cached, and
    the log line carries the reply that was had."""
    primary = Exchange(rcpt="450 4.2.0 try later")
    prober, _, _ = make_prober({"127.0.0.2": primary}, hops=[PRIMARY])

    decision = decide(prober.check(NOBODY))
    decide(prober.check(NOBODY))

    assert decision.route is Route.BACKUP
    assert primary.connections == 2
    assert mail_log[0].endswith(
        "did not say, accepted unverified): 450 4.2.0 try later"
    )


@pytest.mark.parametrize(
    "problem",
    [replies.MAIL_LOOP, replies.DNS_TEMPORARY, replies.NO_SUCH_DOMAIN],
)
def test_no_exchange_to_ask_accepts(problem: replies.Reply) -> None:
    """When MX resolution gives no better exchange, the recipient is accepted."""
    prober, network, _ = make_prober({}, hops=ResolutionError(problem))

    decision = decide(prober.check(NOBODY))

    assert decision.route is Route.BACKUP
    assert network.tried == []


def test_silent_primary_times_out_and_accepts() -> None:
    """A primary that never greets is dropped after the deadline; accepted."""
    primary = Exchange(silent=True)
    prober, _, clock = make_prober({"127.0.0.2": primary}, hops=[PRIMARY])

    pending = prober.check(NOBODY)
    results: list[Any] = []
    pending.addBoth(results.append)
    clock.advance(PROBE_TIMEOUT - 0.1)
    assert results == []
    clock.advance(0.2)
    (transport,) = primary.transports
    assert transport.disconnecting
    primary.protocols[0].connectionLost(connectionDone)

    assert results == [RecipientDecision(replies.RECIPIENT_OK, Route.BACKUP)]


def test_postmaster_is_never_probed() -> None:
    """postmaster of a backup domain is accepted without asking anyone."""
    prober, network, _ = make_prober({})

    decision = decide(prober.check(Address("PostMaster", "example.org")))

    assert decision.route is Route.BACKUP
    assert network.tried == []


def test_concurrent_checks_share_one_probe() -> None:
    """Two checks of one recipient while its probe runs make one connection."""
    primary = Exchange(silent=True)
    prober, _, _ = make_prober({"127.0.0.2": primary}, hops=[PRIMARY])

    first = prober.check(BOB)
    second = prober.check(BOB)
    protocol = primary.protocols[0]
    for line in (b"220 hi\r\n", b"250 mxa\r\n", b"250 ok\r\n", b"250 ok\r\n"):
        protocol.dataReceived(line)
    protocol.connectionLost(connectionDone)

    assert decide(first).route is decide(second).route is Route.BACKUP
    assert primary.connections == 1


def test_at_most_max_hosts_addresses_are_probed() -> None:
    """However many better exchanges there are, only a few are tried."""
    hops = [NextHop(f"mx{i}.example.org", i, (f"127.0.1.{i}",)) for i in range(6)]
    down = {f"127.0.1.{i}": Exchange(refuse=True) for i in range(6)}
    prober, network, _ = make_prober(down, hops=hops)

    decide(prober.check(NOBODY))

    assert len(network.tried) == PROBE_MAX_HOSTS


def test_cache_is_bounded() -> None:
    """With the cache full, the oldest answer is dropped and asked for again."""
    primary = Exchange()
    prober, _, _ = make_prober({"127.0.0.2": primary}, max_entries=2)

    for local_part in ("a", "b", "c", "a"):
        decide(prober.check(Address(local_part, "example.org")))

    assert primary.connections == 4


# --- the static list and the assembly -------------------------------------------


def test_static_list_accepts_only_listed_recipients() -> None:
    """Listed addresses (any case) and postmaster are accepted; others 550 5.1.1."""
    check = StaticRecipients(["bob@example.org"]).check

    assert decide(check(Address("Bob", "Example.ORG"))).route is Route.BACKUP
    assert decide(check(Address("postmaster", "example.org"))).route is Route.BACKUP
    assert decide(check(NOBODY)).reply == replies.NO_SUCH_USER


def _config(tmp_path: Any, backup: str) -> Any:
    path = tmp_path / "mailx.toml"
    path.write_text(
        '[domains]\nlocal = ["example.net"]\nbackup = ["example.org"]\n'
        f"[backup]\n{backup}\n"
    )
    return load_config(str(path))


def test_config_none_builds_no_check(tmp_path: Any) -> None:
    """verify_recipients = "none" gives no check: every recipient is taken."""
    config = _config(tmp_path, 'verify_recipients = "none"')

    assert backup_check_from_config(config, Clock()) is None


def test_config_list_refuses_unlisted_through_the_policy(tmp_path: Any) -> None:
    """With the list, RelayPolicy refuses an unlisted backup recipient at RCPT."""
    config = _config(
        tmp_path, 'verify_recipients = "list"\nrecipients = ["bob@example.org"]'
    )
    policy = RelayPolicy(
        config.domains.local,
        config.domains.backup,
        [],
        lambda address: True,
        backup_check=backup_check_from_config(config, Clock()),
    )
    client = ClientInfo("192.0.2.9", 4000)

    listed = decide(policy.check_recipient(client, None, BOB))
    unlisted = decide(policy.check_recipient(client, None, NOBODY))
    elsewhere = decide(policy.check_recipient(client, None, Address("x", "else.test")))

    assert listed == RecipientDecision(replies.RECIPIENT_OK, Route.BACKUP)
    assert unlisted.reply == replies.NO_SUCH_USER
    assert elsewhere.reply == replies.RELAY_DENIED


def test_config_probe_uses_the_delivery_port(tmp_path: Any) -> None:
    """verify_recipients = "probe" gives a check; nothing is resolved until used."""
    config = _config(tmp_path, 'verify_recipients = "probe"')

    check = backup_check_from_config(config, Clock(), ["127.0.0.3"])

    assert callable(check)
    assert decide(check(Address("postmaster", "example.org"))).route is Route.BACKUP
