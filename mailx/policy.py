"""
Who may send what: the decision for each MAIL and RCPT.

For every forward path the answer is one of four (issue 3's table):

=====================  =====================  =====================
domain of the path     untrusted client       trusted client
=====================  =====================  =====================
local, or postmaster   LOCAL (or 550 5.1.1)   LOCAL (or 550 5.1.1)
backup                 BACKUP                 BACKUP
any other, or literal  554 5.7.1 refused      RELAY
=====================  =====================  =====================

A client is trusted when its address is in ``relay.networks`` or it has
authenticated; nothing else counts (not its EHLO name, its reverse path or a
reverse DNS name).  Only the part after the last ``@`` of a parsed path names
the domain, compared without case or a trailing dot; ``%``, ``!``, a quoted
``@`` and a source route are never routing syntax here, so a path such as
``user%other.example@local.example`` is a (most likely unknown) local user.
The decision is per recipient: one message may have some accepted and some
refused.

An authenticated user listed in ``sender_addresses`` may use only those
reverse paths (``@domain`` allows the whole domain); others get 553 5.7.1.
Addresses are compared without case, and a quoted local part whose content
is a plain dot-string (``"alice"``) as its unquoted form (``alice``); any
other quoted local part (``"al ice"``) only as written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping

from twisted.internet.defer import Deferred

from mailx import replies
from mailx.address import POSTMASTER, Address, unquoted_local_part
from mailx.envelope import ClientInfo, RecipientDecision, Route
from mailx.replies import Reply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# How many client addresses a policy keeps its answer for.
TRUSTED_KEPT = 1024


class RelayPolicy:
    """The ``mailx.envelope.Policy`` of a mail exchanger."""

    def __init__(
        self,
        local_domains: Iterable[str],
        backup_domains: Iterable[str],
        relay_networks: Iterable[Network],
        local_exists: Callable[[Address], bool],
        sender_addresses: Mapping[str, Iterable[str]] | None = None,
        backup_check: Callable[[Address], Deferred[RecipientDecision]] | None = None,
    ) -> None:
        self.local_domains = _domain_keys(local_domains)
        self.backup_domains = _domain_keys(backup_domains)
        self.relay_networks = tuple(relay_networks)
        # Client address -> trusted, for the last addresses seen: parsing an
        # address was a fiftieth of the server's time relaying (issue 7).
        self._trusted: dict[str, bool] = {}
        self.local_exists = local_exists
        self.replace_sender_addresses(sender_addresses or {})
        self.backup_check = backup_check

    def replace_sender_addresses(
        self, sender_addresses: Mapping[str, Iterable[str]]
    ) -> None:
        """The users limited to some reverse paths, from now on."""
        self.sender_addresses = {
            user: frozenset(_entry_key(entry) for entry in addresses)
            for user, addresses in sender_addresses.items()
        }

    def is_trusted(self, client: ClientInfo) -> bool:
        # A worker process handing on mail it accepted (mailx.workers).
        if client.authenticated_as is not None or client.listener == "handoff":
            return True
        trusted = self._trusted.get(client.address)
        if trusted is None:
            if len(self._trusted) >= TRUSTED_KEPT:
                self._trusted.clear()
            trusted = _in_networks(client.address, self.relay_networks)
            self._trusted[client.address] = trusted
        return trusted

    def check_sender(self, client: ClientInfo, reverse_path: Address | None) -> Reply:
        user = client.authenticated_as
        if user is None or user not in self.sender_addresses:
            return replies.SENDER_OK
        # RFC 6409 section 6.1: a submission server may check the sender.
        if not _may_send(reverse_path, self.sender_addresses[user]):
            return replies.SENDER_NOT_OWNED
        return replies.SENDER_OK

    def check_recipient(
        self, client: ClientInfo, reverse_path: Address | None, forward_path: Address
    ) -> RecipientDecision | Deferred[RecipientDecision]:
        decision = self._decide(client, forward_path)
        if decision.route is Route.BACKUP and self.backup_check is not None:
            return self.backup_check(forward_path)
        return decision

    def _decide(self, client: ClientInfo, forward_path: Address) -> RecipientDecision:
        # RFC 5321 section 2.4: domain names are compared without case; a
        # trailing dot (the root) names the same domain.
        domain = forward_path.domain_key.removesuffix(".")
        # RFC 5321 section 4.5.1: postmaster always exists.
        if forward_path == POSTMASTER or domain in self.local_domains:
            if not self.local_exists(Address(forward_path.local_part, domain)):
                return RecipientDecision(replies.NO_SUCH_USER)
            return RecipientDecision(replies.RECIPIENT_OK, Route.LOCAL)
        if domain in self.backup_domains:
            return RecipientDecision(replies.RECIPIENT_OK, Route.BACKUP)
        if self.is_trusted(client):
            return RecipientDecision(replies.RECIPIENT_OK, Route.RELAY)
        return RecipientDecision(replies.RELAY_DENIED)


def _in_networks(client_address: str, networks: tuple[Network, ...]) -> bool:
    """Is this client address in one of ``networks``?"""
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    # RFC 4291 section 2.5.5.2: ::ffff:a.b.c.d is the IPv4 client a.b.c.d
    # on a dual-stack socket; either form in relay.networks matches, for
    # a client on an IPv4 socket as for one on an IPv6 socket.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        candidates.append(address.ipv4_mapped)
    if isinstance(address, ipaddress.IPv4Address):
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    return any(candidate in network for candidate in candidates for network in networks)


def _domain_keys(domains: Iterable[str]) -> frozenset[str]:
    return frozenset(domain.lower().removesuffix(".") for domain in domains)


def _may_send(reverse_path: Address | None, allowed: frozenset[str]) -> bool:
    """An entry ``user@domain`` allows that address, ``@domain`` all of it."""
    if reverse_path is None:
        return False
    key = _mailbox_key(reverse_path.local_part, reverse_path.domain)
    return key in allowed or f"@{reverse_path.domain_key}" in allowed


def _entry_key(entry: str) -> str:
    """An entry ``local@domain`` or ``@domain`` as ``_may_send`` compares it."""
    local_part, _, domain = entry.rpartition("@")
    if not local_part:
        return entry.lower()
    return _mailbox_key(local_part, domain)


def _mailbox_key(local_part: str, domain: str) -> str:
    """The address as compared: lower-cased, a needless quoting undone."""
    return f"{unquoted_local_part(local_part)}@{domain}".lower()
