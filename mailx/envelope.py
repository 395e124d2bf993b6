"""
The envelope of a mail transaction (RFC 5321 section 2.3.1) and the narrow
interfaces between the SMTP server and the rest of mailx.

The server asks a ``Policy`` whether a client may send from a reverse path to
a forward path, and hands each accepted message to a ``MessageSink``.  Both
answer with Deferreds (which may already have fired), so a decision may take
network time (a recipient probe of a primary MX) without blocking.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from mailx.address import Address
from mailx.replies import Reply


class Route(enum.Enum):
    """Where a forward path goes once accepted."""

    # A domain in domains.local: delivered into its Maildir.
    LOCAL = "local"
    # A domain in domains.backup: queued for its more preferred exchanges.
    BACKUP = "backup"
    # Any other domain, for a trusted client: queued for its exchanges.
    RELAY = "relay"
    # One Maildir an alias of a local recipient expanded to, queued when
    # that Maildir alone could not be written: delivered into it as named,
    # not expanded again, so the alias's other Maildirs get no second copy.
    MAILBOX = "mailbox"


class Body(enum.Enum):
    """The BODY parameter of MAIL (RFC 6152, RFC 3030)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"
    BINARY = "BINARYMIME"


@dataclass
class ClientInfo:
    """What the server knows of the SMTP client of a session."""

    address: str
    port: int
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated_as: str | None = None
    # The name of the listener (from the configuration) the client came in on.
    listener: str = "smtp"


@dataclass
class Recipient:
    """One forward path with its DSN parameters (RFC 3461 section 4)."""

    address: Address
    route: Route
    notify: frozenset[str] | None = None
    orcpt: str | None = None


@dataclass
class Envelope:
    """A mail transaction's envelope as accepted by the server."""

    reverse_path: Address | None
    recipients: list[Recipient] = field(default_factory=list)
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    declared_size: int | None = None
    # RFC 3461 section 4.3 and 4.4.
    ret: str | None = None
    envid: str | None = None
    client: ClientInfo | None = None
    # The queue id the server gives the message when it is accepted.
    message_id: str = ""
    received_at: float = 0.0


@dataclass(frozen=True)
class RecipientDecision:
    """A policy answer for RCPT: the reply, and the route when it is accepted."""

    reply: Reply
    route: Route | None = None


class Policy(Protocol):
    """
    May this client send from this reverse path to this forward path?

    An answer known at once is returned as it is; one that needs a look-up
    (a backup domain's primary asked) comes as a Deferred.  Most answers
    are known at once, and a Deferred for each was a tenth of the server's
    work on MAIL and RCPT (issue 7).
    """

    def check_sender(
        self, client: ClientInfo, reverse_path: Address | None
    ) -> Reply | Deferred[Reply]:
        """Answer MAIL: a 250 to accept, or a 4xx/5xx reply."""

    def check_recipient(
        self, client: ClientInfo, reverse_path: Address | None, forward_path: Address
    ) -> RecipientDecision | Deferred[RecipientDecision]:
        """Answer RCPT: a 250 with its route, or a 4xx/5xx reply."""


class MessageSink(Protocol):
    """Takes an accepted message and answers once it is durably stored."""

    def receive(self, envelope: Envelope, content: bytes) -> Deferred[Reply]:
        """
        Store ``content`` (the message as received, CRLF line endings, trace
        headers included) for every recipient of ``envelope``.  Fire with 250
        only once it is durable; a failure fires with a 4xx reply.
        """
