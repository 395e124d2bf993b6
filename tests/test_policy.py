"""
The relay policy's decision table (client class x domain class), the classic
open-relay battery, and the sender addresses of authenticated users.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed

from mailx import replies
from mailx.address import Address, AddressError, parse_forward_path, parse_reverse_path
from mailx.config import load_config
from mailx.envelope import ClientInfo, RecipientDecision, Route
from mailx.policy import TRUSTED_KEPT, RelayPolicy
from mailx.replies import Reply

LOCAL = "local.example"
BACKUP = "backup.example"
EXISTING = {"alice", "bob", "postmaster"}


def local_exists(address: Address) -> bool:
    """alice, bob and postmaster exist in the local domain; bare postmaster too."""
    domain_ok = address.domain_key in (LOCAL, "")
    return domain_ok and address.local_part.lower() in EXISTING


def make_policy(
    sender_addresses: dict[str, list[str]] | None = None,
    backup_check: object = None,
) -> RelayPolicy:
    return RelayPolicy(
        [LOCAL.upper() + "."],
        [BACKUP],
        [
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8:1::/48"),
            # An IPv4 host written as an IPv4-mapped IPv6 network.
            ipaddress.ip_network("::ffff:127.0.0.3/128"),
        ],
        local_exists,
        sender_addresses=sender_addresses,
        backup_check=backup_check,  # type: ignore[arg-type]
    )


def result_of(
    answer: RecipientDecision | Deferred[RecipientDecision],
) -> RecipientDecision:
    if not isinstance(answer, Deferred):
        return answer
    results: list[RecipientDecision] = []
    answer.addCallback(results.append)
    assert results, "the policy answered asynchronously"
    return results[0]


def sender_result(answer: Reply | Deferred[Reply]) -> Reply:
    # Every sender check is answered at once.
    assert isinstance(answer, Reply)
    return answer


@dataclass(frozen=True)
class Outcome:
    code: int
    enhanced: str
    route: Route | None


def decide(policy: RelayPolicy, client: ClientInfo, rcpt_argument: str) -> Outcome:
    """What RCPT TO:<...> gets, parse errors included, as the session would."""
    try:
        parsed = parse_forward_path(rcpt_argument, utf8=False)
    except AddressError as error:
        return Outcome(error.reply.code, error.reply.enhanced, None)
    assert parsed.address is not None
    sender = Address("someone", "sender.example")
    decision = result_of(policy.check_recipient(client, sender, parsed.address))
    reply = decision.reply
    return Outcome(reply.code, reply.enhanced, decision.route)


# --- the decision table --------------------------------------------------------------

CLIENTS = {
    "untrusted-v4": (ClientInfo("192.0.2.7", 4000), False),
    "untrusted-v6": (ClientInfo("2001:db8:2::7", 4000), False),
    "untrusted-v4-mapped": (ClientInfo("::ffff:192.0.2.7", 4000), False),
    "trusted-v4": (ClientInfo("10.1.2.3", 4000), True),
    "trusted-v6": (ClientInfo("2001:db8:1::5", 4000), True),
    "trusted-v4-mapped": (ClientInfo("::ffff:10.1.2.3", 4000), True),
    "authenticated": (ClientInfo("192.0.2.7", 4000, authenticated_as="alice"), True),
    "trusted-v4-by-mapped-entry": (ClientInfo("127.0.0.3", 4000), True),
    "trusted-v4-mapped-by-mapped-entry": (ClientInfo("::ffff:127.0.0.3", 4000), True),
    "untrusted-v4-beside-mapped-entry": (ClientInfo("127.0.0.4", 4000), False),
    "untrusted-v4-mapped-beside-mapped-entry": (
        ClientInfo("::ffff:127.0.0.4", 4000),
        False,
    ),
}

RELAY_DENIED = Outcome(554, "5.7.1", None)
NO_SUCH_USER = Outcome(550, "5.1.1", None)
DOMAINS: dict[str, tuple[str, Outcome | None]] = {
    # None: relayed for a trusted client, refused for an untrusted one.
    "local-existing": ("<alice@local.example>", Outcome(250, "2.1.5", Route.LOCAL)),
    "local-unknown": ("<nobody@local.example>", NO_SUCH_USER),
    "backup": ("<anyone@backup.example>", Outcome(250, "2.1.5", Route.BACKUP)),
    "other": ("<user@other.example>", None),
    "address-literal-v4": ("<user@[192.0.2.1]>", None),
    "address-literal-v6": ("<user@[IPv6:2001:db8::1]>", None),
    "postmaster-bare": ("<Postmaster>", Outcome(250, "2.1.5", Route.LOCAL)),
    "postmaster-local": (
        "<postmaster@local.example>",
        Outcome(250, "2.1.5", Route.LOCAL),
    ),
    "postmaster-other": ("<postmaster@other.example>", None),
    # A trailing dot (the root) names the same domain.
    "local-existing-root-dot": (
        "<alice@local.example.>",
        Outcome(250, "2.1.5", Route.LOCAL),
    ),
    "local-unknown-root-dot": ("<nobody@local.example.>", NO_SUCH_USER),
    "backup-root-dot": (
        "<anyone@backup.example.>",
        Outcome(250, "2.1.5", Route.BACKUP),
    ),
    "other-root-dot": ("<user@other.example.>", None),
}


@pytest.mark.parametrize("domain_class", list(DOMAINS))
@pytest.mark.parametrize("client_class", list(CLIENTS))
def test_decision_table(client_class: str, domain_class: str) -> None:
    """Each client class gets the issue's answer for each class of domain."""
    client, trusted = CLIENTS[client_class]
    argument, expected = DOMAINS[domain_class]
    if expected is None:
        expected = Outcome(250, "2.1.5", Route.RELAY) if trusted else RELAY_DENIED
    assert decide(make_policy(), client, argument) == expected


def test_relay_refusal_says_so_in_plain_words() -> None:
    """A refused relay is 554 5.7.1 and says "relay access denied"."""
    client = ClientInfo("192.0.2.7", 4000)
    decision = result_of(
        make_policy().check_recipient(client, None, Address("u", "other.example"))
    )
    assert decision.reply.to_bytes() == b"554 5.7.1 Relay access denied\r\n"
    assert "relay access denied" in decision.reply.text.lower()


def test_nothing_but_the_address_and_auth_counts_for_trust() -> None:
    """An EHLO name, a TLS session or a local reverse path does not make a relay."""
    client = ClientInfo("192.0.2.7", 4000, helo="local.example", esmtp=True, tls=True)
    policy = make_policy()
    sender = Address("alice", LOCAL)
    decision = result_of(
        policy.check_recipient(client, sender, Address("u", "other.example"))
    )
    assert decision.reply == replies.RELAY_DENIED
    assert not policy.is_trusted(client)


def test_network_boundaries() -> None:
    """Addresses just outside relay.networks are untrusted, the edges trusted."""
    policy = make_policy()
    for address, trusted in [
        ("10.0.0.0", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("9.255.255.255", False),
        ("2001:db8:1:ffff::1", True),
        ("2001:db8:2::1", False),
        ("::ffff:11.0.0.1", False),
        ("not an address", False),
        ("", False),
    ]:
        assert policy.is_trusted(ClientInfo(address, 1)) is trusted, address


def test_each_policy_answers_from_its_own_networks() -> None:
    """The same client asked of two policies in turn (answers are kept per
    address and networks): each answers from its own relay.networks."""
    wide = RelayPolicy([LOCAL], [], [ipaddress.ip_network("10.0.0.0/8")], local_exists)
    narrow = RelayPolicy(
        [LOCAL], [], [ipaddress.ip_network("10.1.0.0/16")], local_exists
    )
    client = ClientInfo("10.2.0.1", 1)
    for _ in range(2):
        assert wide.is_trusted(client)
        assert not narrow.is_trusted(client)
        assert narrow.is_trusted(ClientInfo("10.1.0.1", 1))


def test_answers_stay_right_past_the_number_of_addresses_kept() -> None:
    """More client addresses than a policy keeps answers for: each is still
    answered from relay.networks, the first ones again too."""
    policy = make_policy()
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(TRUSTED_KEPT + 10)]
    addresses += [f"11.0.{i // 256}.{i % 256}" for i in range(TRUSTED_KEPT + 10)]
    for _ in range(2):
        for address in addresses:
            expected = address.startswith("10.")
            assert policy.is_trusted(ClientInfo(address, 1)) is expected, address


def test_mapped_network_in_the_configuration() -> None:
    """A relay.networks entry written as ::ffff:a.b.c.d/n trusts that IPv4 client."""
    policy = RelayPolicy(
        [LOCAL], [], [ipaddress.ip_network("::ffff:10.0.0.0/104")], local_exists
    )
    assert policy.is_trusted(ClientInfo("::ffff:10.9.9.9", 1))
    assert not policy.is_trusted(ClientInfo("::ffff:11.9.9.9", 1))


def test_mapped_entry_of_the_configuration_file_trusts_the_ipv4_host(
    tmp_path: Path,
) -> None:
    """relay.networks ::ffff:127.0.0.3/128 lets 127.0.0.3 relay and not 127.0.0.4."""
    path = tmp_path / "mailx.toml"
    path.write_text('[relay]\nnetworks = ["::ffff:127.0.0.3/128"]\n')
    networks = load_config(str(path)).relay.networks
    policy = RelayPolicy([LOCAL], [], networks, local_exists)

    relayed = Outcome(250, "2.1.5", Route.RELAY)
    assert decide(policy, ClientInfo("127.0.0.3", 1), "<u@other.example>") == relayed
    refused = decide(policy, ClientInfo("127.0.0.4", 1), "<u@other.example>")
    assert refused == RELAY_DENIED


def test_recipients_are_decided_one_by_one() -> None:
    """In one transaction a local recipient is accepted and a relay refused."""
    policy = make_policy()
    client = ClientInfo("192.0.2.7", 4000)
    first = decide(policy, client, "<alice@local.example>")
    second = decide(policy, client, "<user@other.example>")
    third = decide(policy, client, "<bob@local.example>")
    assert (first.code, second.code, third.code) == (250, 554, 250)


def test_backup_check_decides_backup_recipients() -> None:
    """A backup recipient is what the backup check answers, for any client."""
    asked: list[Address] = []

    def backup_check(address: Address) -> Deferred[RecipientDecision]:
        asked.append(address)
        return succeed(RecipientDecision(replies.NO_SUCH_USER))

    policy = make_policy(backup_check=backup_check)
    client = ClientInfo("192.0.2.7", 4000)
    assert decide(policy, client, "<x@backup.example>") == NO_SUCH_USER
    assert decide(policy, client, "<x@other.example>") == RELAY_DENIED
    assert asked == [Address("x", BACKUP)]


# --- the open-relay battery ---------------------------------------------------------

UNTRUSTED = ClientInfo("192.0.2.7", 4000)

# The part after the last "@" is not served: each must be refused.
UNSERVED_BATTERY = {
    "percent-hack": "<user%local.example@other.example>",
    "bang-path": "<local.example!user@other.example>",
    "quoted-at": '<"user@local.example"@other.example>',
    "two-ats": "<user@local.example@other.example>",
    "source-route": "<@local.example:user@other.example>",
    "source-route-two-hops": "<@local.example,@backup.example:user@other.example>",
    "address-literal": "<user@[192.0.2.1]>",
    "address-literal-ipv6": "<user@[IPv6:2001:db8::1]>",
    "upper-case": "<user@OTHER.EXAMPLE>",
    "upper-case-percent": "<USER%LOCAL.EXAMPLE@OTHER.Example>",
    "trailing-dot": "<user@other.example.>",
    "trailing-dot-percent": "<user%local.example.@other.example.>",
    "empty-local-part": "<@other.example>",
    "empty-quoted-local-part": '<""@other.example>',
    "domain-only": "<other.example>",
}

# The part after the last "@" is served: never relayed (local or refused).
SERVED_BATTERY = {
    "percent-hack": "<user%other.example@local.example>",
    "bang-path": "<other.example!user@local.example>",
    "quoted-at": '<"user@other.example"@local.example>',
    "two-ats": "<user@other.example@local.example>",
    "source-route": "<@other.example:user@local.example>",
    "upper-case": "<user%other.example@LOCAL.EXAMPLE>",
    "trailing-dot": "<user%other.example@local.example.>",
    "empty-local-part": "<@local.example>",
    "empty-quoted-local-part": '<""@local.example>',
    "percent-hack-backup-name": "<user%other.example@backup.example>",
}


@pytest.mark.parametrize(
    "client", [UNTRUSTED, ClientInfo("127.0.0.4", 4000)], ids=["v4", "v4-beside-mapped"]
)
@pytest.mark.parametrize("argument", UNSERVED_BATTERY.values(), ids=UNSERVED_BATTERY)
def test_battery_unserved_domain_is_refused(client: ClientInfo, argument: str) -> None:
    """An untrusted client's RCPT whose final domain is not served gets a 5xx."""
    outcome = decide(make_policy(), client, argument)
    assert outcome.route is None
    assert outcome.code >= 500


@pytest.mark.parametrize("argument", SERVED_BATTERY.values(), ids=SERVED_BATTERY)
def test_battery_served_domain_is_never_relayed(argument: str) -> None:
    """A served final domain is local, backup or refused, never a relay."""
    outcome = decide(make_policy(), UNTRUSTED, argument)
    assert outcome.route is not Route.RELAY
    if outcome.route is Route.LOCAL:
        # Only the exact users exist; none of the battery's local parts does.
        pytest.fail(f"{argument} was accepted as a local user")


def test_battery_routing_syntax_stays_in_the_local_part() -> None:
    """%, ! and a quoted @ stay in the local part the local domain is asked about."""
    asked: list[Address] = []

    def recording_exists(address: Address) -> bool:
        asked.append(address)
        return False

    policy = RelayPolicy([LOCAL], [], [], recording_exists)
    for argument in (
        "<user%other.example@local.example>",
        "<other.example!user@local.example>",
        '<"user@other.example"@local.example>',
    ):
        assert decide(policy, UNTRUSTED, argument) == NO_SUCH_USER
    assert [address.domain for address in asked] == [LOCAL] * 3
    assert [address.local_part for address in asked] == [
        "user%other.example",
        "other.example!user",
        '"user@other.example"',
    ]


def test_case_and_trailing_dot_of_a_local_domain() -> None:
    """ALICE@LOCAL.EXAMPLE and a parsed path with a trailing dot are local."""
    policy = make_policy()
    assert decide(policy, UNTRUSTED, "<ALICE@Local.Example>").route is Route.LOCAL
    dotted = Address("alice", "local.example.")
    decision = result_of(policy.check_recipient(UNTRUSTED, None, dotted))
    assert decision.route is Route.LOCAL


def test_a_trailing_dot_does_not_get_past_the_relay_decision() -> None:
    """With its root dot a foreign domain is refused as without, the local one local."""
    policy = make_policy()
    dotted = decide(policy, UNTRUSTED, "<stranger@other.example.>")
    assert dotted == decide(policy, UNTRUSTED, "<stranger@other.example>")
    assert dotted == RELAY_DENIED
    local = decide(policy, UNTRUSTED, "<alice@local.example.>")
    assert local == Outcome(250, "2.1.5", Route.LOCAL)


# --- sender addresses of authenticated users ----------------------------------------

AUTHENTICATED = ClientInfo("192.0.2.7", 4000, authenticated_as="alice")


def sender_reply(policy: RelayPolicy, client: ClientInfo, argument: str) -> Reply:
    parsed = parse_reverse_path(argument, utf8=False)
    return sender_result(policy.check_sender(client, parsed.address))


@pytest.mark.parametrize(
    ("argument", "allowed"),
    [
        ("<alice@local.example>", True),
        ("<Alice@LOCAL.example>", True),
        ("<anything@team.example>", True),
        ("<bob@local.example>", False),
        ("<alice@other.example>", False),
        ("<alice@sub.team.example>", False),
        ("<alice%team.example@other.example>", False),
        ("<@team.example:alice@other.example>", False),
        ("<>", False),
        # RFC 5321 section 4.1.2: a quoted dot-string is the same local part.
        ('<"alice"@local.example>', True),
        ('<"ALICE"@local.example>', True),
        ('<"al\\ice"@local.example>', True),
        ('<"bob"@local.example>', False),
        ('<"al ice"@local.example>', False),
        ('<"alice."@local.example>', False),
        ('<"\\"alice\\""@local.example>', False),
        ('<"alice@local.example"@other.example>', False),
        ('<"alice"@other.example>', False),
        ('<""@local.example>', False),
    ],
)
def test_authenticated_sender_addresses(argument: str, allowed: bool) -> None:
    """A listed user may use only its addresses; others get 553 5.7.1."""
    policy = make_policy({"alice": ["alice@local.example", "@TEAM.example"]})
    reply = sender_reply(policy, AUTHENTICATED, argument)
    if allowed:
        assert reply == replies.SENDER_OK
    else:
        assert (reply.code, reply.enhanced) == (553, "5.7.1")


@pytest.mark.parametrize(
    ("entry", "argument", "allowed"),
    [
        ('"alice"@local.example', "<alice@local.example>", True),
        ('"alice"@local.example', '<"alice"@local.example>', True),
        ('"al ice"@local.example', '<"al ice"@local.example>', True),
        ('"al ice"@local.example', "<alice@local.example>", False),
        ('"al ice"@local.example', '<"alice"@local.example>', False),
    ],
)
def test_quoted_entries(entry: str, argument: str, allowed: bool) -> None:
    """A quoted dot-string entry allows its unquoted form; others only themselves."""
    policy = make_policy({"alice": [entry]})
    reply = sender_reply(policy, AUTHENTICATED, argument)
    assert reply == (replies.SENDER_OK if allowed else replies.SENDER_NOT_OWNED)


# Pieces of quoted local parts near "alice": quoted-pairs, spaces, dots, "@".
NEAR_ALICE = ["alice", "ALI", "al", "ice", "\\i", "\\ ", " ", ".", "@", '\\"', "\\\\"]


@given(st.lists(st.sampled_from(NEAR_ALICE), min_size=1, max_size=5).map("".join))
def test_no_quoted_local_part_but_alice_passes_for_alice(content: str) -> None:
    """A quoted local part is allowed for alice exactly when it unquotes to alice."""
    policy = make_policy({"alice": ["alice@local.example"]})
    try:
        parsed = parse_reverse_path(f'<"{content}"@local.example>', utf8=False)
    except AddressError:
        return
    assert parsed.address is not None
    reply = sender_result(policy.check_sender(AUTHENTICATED, parsed.address))
    named = re.sub(r"\\(.)", r"\1", content)
    assert (reply == replies.SENDER_OK) == (named.lower() == "alice")


def test_users_without_addresses_and_anonymous_clients_may_use_any() -> None:
    """Unlisted users and unauthenticated clients are not limited by MAIL."""
    policy = make_policy({"alice": ["alice@local.example"]})
    bob = ClientInfo("192.0.2.7", 4000, authenticated_as="bob")
    for client in (bob, UNTRUSTED):
        assert sender_reply(policy, client, "<x@other.example>") == replies.SENDER_OK
