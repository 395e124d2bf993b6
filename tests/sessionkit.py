"""Fakes for driving a ``mailx.session.Session`` without a reactor."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed

from mailx import replies
from mailx.address import Address
from mailx.envelope import ClientInfo, Envelope, RecipientDecision, Route
from mailx.replies import Reply
from mailx.session import Session, SessionConfig

_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)\r\n")


@dataclass
class FakeOutput:
    """Records what a session asks of its transport."""

    writes: list[bytes] = field(default_factory=list)
    tls_started: int = 0
    closed: bool = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def start_tls(self) -> None:
        self.tls_started += 1

    def close(self) -> None:
        self.closed = True

    def replies(self) -> list[str]:
        """Each complete reply, as ``code text-of-last-line``."""
        found = []
        for match in _REPLY_LINE.finditer(b"".join(self.writes)):
            if match.group(2) == b" ":
                found.append(f"{match.group(1).decode()} {match.group(3).decode()}")
        return found

    def codes(self) -> list[int]:
        return [int(reply[:3]) for reply in self.replies()]


class AcceptingPolicy:
    """Local domain example.org (users alice, bob); relays nothing."""

    def __init__(self) -> None:
        # With hold set, answers wait until release(): a slow policy.
        self.hold = False
        self.pending: list[tuple[Deferred[RecipientDecision], RecipientDecision]] = []

    def check_sender(self, client: ClientInfo, reverse_path: Address | None) -> Reply:
        return replies.SENDER_OK

    def check_recipient(
        self, client: ClientInfo, reverse_path: Address | None, forward_path: Address
    ) -> RecipientDecision | Deferred[RecipientDecision]:
        if forward_path.domain_key not in ("example.org", ""):
            decision = RecipientDecision(replies.RELAY_DENIED)
        elif forward_path.local_part.lower() in ("alice", "bob", "postmaster"):
            decision = RecipientDecision(replies.RECIPIENT_OK, Route.LOCAL)
        else:
            decision = RecipientDecision(replies.NO_SUCH_USER)
        if self.hold:
            deferred: Deferred[RecipientDecision] = Deferred()
            self.pending.append((deferred, decision))
            return deferred
        # Answered at once, as RelayPolicy answers all but backup checks.
        return decision

    def release(self) -> None:
        """Answer the oldest pending RCPT."""
        deferred, decision = self.pending.pop(0)
        deferred.callback(decision)


class RecordingSink:
    """Stores messages in memory; can fail or hold the answer."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []
        self.reply = replies.OK
        self.fail = False

    def receive(self, envelope: Envelope, content: bytes) -> Deferred[Reply]:
        if self.fail:
            return Deferred.fromCoroutine(_raise_oserror())
        self.messages.append((envelope, content))
        return succeed(self.reply)

    def bodies(self) -> list[bytes]:
        """Message contents without the Received header mailx added."""
        return [_strip_received(content) for _, content in self.messages]


async def _raise_oserror() -> Reply:
    raise OSError(28, "No space left on device")


_RECEIVED_HEADER = re.compile(
    rb"Received: .*?; \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n",
    re.DOTALL,
)


def _strip_received(content: bytes) -> bytes:
    """The content after the Received header mailx put first (its date ends it)."""
    match = _RECEIVED_HEADER.match(content)
    assert match is not None, content[:200]
    return content[match.end() :]


class FakeAuthenticator:
    def authenticate(
        self, client: ClientInfo, user: str, password: str
    ) -> Deferred[str | None]:
        return succeed(user if password == "secret" else None)


def make_session(
    tls_available: bool = False,
    max_message_size: int = 100000,
    max_recipients: int = 100,
    max_errors: int = 20,
    authenticator: FakeAuthenticator | None = None,
    require_auth: bool = False,
    add_trace: bool = True,
) -> tuple[Session, FakeOutput, RecordingSink, AcceptingPolicy]:
    output = FakeOutput()
    sink = RecordingSink()
    policy = AcceptingPolicy()
    config = SessionConfig(
        hostname="mx.example.org",
        max_message_size=max_message_size,
        max_recipients=max_recipients,
        max_errors=max_errors,
        tls_available=tls_available,
        require_auth=require_auth,
        add_trace=add_trace,
    )
    session = Session(
        config,
        ClientInfo(address="192.0.2.7", port=40000),
        policy,
        sink,
        output,
        clock=lambda: 1_700_000_000.0,
        authenticator=authenticator,
        new_id=lambda: "TESTID",
    )
    session.connection_made()
    return session, output, sink, policy
