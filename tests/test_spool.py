"""Tests for mailx.spool: storage, delivery attempts, retries and reports."""

from __future__ import annotations

import email
import email.policy
import errno
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailx import replies
from mailx.address import Address
from mailx.envelope import ClientInfo, Envelope, Recipient, Route
from mailx.queue import MessageKind, QueuedMessage, RecipientState
from mailx.replies import Reply, ReplyError
from mailx.spool import (
    MessageGone,
    MessageHeld,
    RecipientResult,
    Remove,
    Spool,
    SpoolChange,
    SpoolStore,
    StoreNew,
    UnknownMessage,
    synchronous_io,
)

_T = TypeVar("_T")

SENDER = Address("alice", "example.org")
CONTENT = (
    b"Received: from client.example.org by mx.example.net\r\n"
    b"From: alice@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello there.\r\n"
)
MIN_RETRY = 300.0
MAX_RETRY = 3600.0
LIFETIME = 86400.0
DELAY_WARNING = 7200.0


class MiddleRandom(random.Random):
    """A Random whose draws sit in the middle, so jitter adds nothing."""

    def random(self) -> float:
        return 0.5


@dataclass
class Call:
    reverse_path: Address | None
    domain: str
    recipients: list[Address]
    content: bytes
    envelope: Envelope
    when: float


@dataclass
class ScriptedAgent:
    """A delivery agent answering each recipient from a script."""

    clock: Clock
    # Local part -> replies to give in turn (the last one repeats).
    script: dict[str, list[Reply]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    failing: bool = False
    pending: list[Deferred[list[RecipientResult]]] = field(default_factory=list)
    hang: bool = False

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        now = self.clock.seconds()
        call = Call(reverse_path, domain, recipients, content, envelope, now)
        self.calls.append(call)
        if self.hang:
            waiting: Deferred[list[RecipientResult]] = Deferred()
            self.pending.append(waiting)
            return waiting
        if self.failing:
            return fail(RuntimeError("agent broke"))
        results = []
        for address in recipients:
            answers = self.script.get(address.local_part, [replies.OK])
            reply = answers.pop(0) if len(answers) > 1 else answers[0]
            results.append(RecipientResult(address, reply, f"mx.{domain}"))
        return succeed(results)


DEFERRED = Reply(450, "4.2.0", "Mailbox busy")
REFUSED = Reply(550, "5.1.1", "No such user")


@pytest.fixture
def agent(clock: Clock) -> ScriptedAgent:
    return ScriptedAgent(clock)


def make_spool(path: Path, clock: Clock, agent: ScriptedAgent, **kwargs: Any) -> Spool:
    options: dict[str, Any] = {
        "min_retry": MIN_RETRY,
        "max_retry": MAX_RETRY,
        "lifetime": LIFETIME,
        "delay_warning": DELAY_WARNING,
        "rng": MiddleRandom(),
        "run_io": synchronous_io,
    }
    options.update(kwargs)
    return Spool(str(path), clock, agent, "mx.example.net", **options)


def envelope(
    *local_parts: str,
    sender: Address | None = SENDER,
    domain: str = "example.com",
    notify: frozenset[str] | None = None,
    **kwargs: Any,
) -> Envelope:
    return Envelope(
        reverse_path=sender,
        recipients=[
            Recipient(Address(local, domain), Route.RELAY, notify=notify)
            for local in local_parts
        ],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.org"),
        **kwargs,
    )


def result_of(deferred: Deferred[_T]) -> _T:
    """The result of a Deferred that has already fired."""
    results: list[_T] = []
    failures: list[Any] = []
    deferred.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def queued_ids(path: Path) -> list[str]:
    return sorted(os.listdir(path / "message"))


def reports(agent: ScriptedAgent) -> list[tuple[Call, EmailMessage]]:
    """The DSNs the agent was asked to deliver, parsed."""
    found = []
    for call in agent.calls:
        if call.reverse_path is None and b"report-type=delivery-status" in call.content:
            parsed = email.message_from_bytes(call.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append((call, parsed))
    return found


def status_blocks(report: EmailMessage) -> list[Any]:
    """The message/delivery-status part's field blocks."""
    for part in report.walk():
        if part.get_content_type() == "message/delivery-status":
            return list(part.get_payload())
    raise AssertionError("no delivery-status part")


# Storage.


def test_enqueue_stores_content_and_envelope(tmp_path: Path, clock: Clock) -> None:
    """An enqueued message's content and envelope are on disk under its id,
    in one file."""
    spool = make_spool(tmp_path, clock, ScriptedAgent(clock))
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))

    assert os.listdir(tmp_path / "message") == [message_id]
    assert (tmp_path / "message" / message_id).read_bytes().endswith(CONTENT)
    assert SpoolStore(str(tmp_path)).read_content(message_id) == CONTENT
    stored = SpoolStore(str(tmp_path)).load(message_id)
    assert stored.reverse_path == SENDER
    assert [str(r.address) for r in stored.recipients] == ["bob@example.com"]
    assert stored.client_address == "192.0.2.1"
    assert os.listdir(tmp_path / "tmp") == []


def test_enqueue_uses_the_servers_queue_id(tmp_path: Path, clock: Clock) -> None:
    """A queue id given by the server on the envelope names the message."""
    spool = make_spool(tmp_path, clock, ScriptedAgent(clock))
    given = envelope("bob", message_id="ABC123")
    assert result_of(spool.enqueue(given, CONTENT)) == "ABC123"
    assert queued_ids(tmp_path) == ["ABC123"]


def test_enqueue_logs_queued(tmp_path: Path, clock: Clock, mail_log: list[str]) -> None:
    """Queueing writes one mail log line with id, sender, count and size."""
    spool = make_spool(tmp_path, clock, ScriptedAgent(clock))
    message_id = result_of(spool.enqueue(envelope("bob", "carol"), CONTENT))
    assert mail_log == [
        f"queued {message_id} from=<alice@example.org> nrcpt=2 size={len(CONTENT)}"
    ]


class ManualIO:
    """An IORunner that runs each job only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        done: Deferred[_T] = Deferred()
        self.jobs.append((work, done))
        return done

    def run_next(self) -> None:
        work, done = self.jobs.pop(0)
        done.callback(work())


def test_enqueue_fires_only_after_the_rename(tmp_path: Path, clock: Clock) -> None:
    """The queue id is given only once the message file is renamed into place
    and that rename is durable, not at any earlier step of the commit."""
    io = ManualIO()
    fired: list[str] = []
    seen: list[tuple[str, int, list[str]]] = []

    def hook(point: str) -> None:
        seen.append((point, len(fired), queued_ids(tmp_path)))

    spool = make_spool(
        tmp_path, clock, ScriptedAgent(clock), run_io=io, fault_hook=hook
    )
    spool.enqueue(envelope("bob"), CONTENT).addCallback(fired.append)
    assert fired == []
    assert queued_ids(tmp_path) == []

    io.run_next()  # The group commit: written, synced, renamed, synced.
    assert len(fired) == 1
    assert [(point, count) for point, count, _ in seen] == [
        ("written", 0),
        ("synced", 0),
        ("renamed", 0),
        ("committed", 0),
    ]
    assert [ids for point, _, ids in seen if point == "synced"] == [[]]
    assert [ids for point, _, ids in seen if point == "renamed"] == [fired]


def test_messages_arriving_together_share_one_commit(
    tmp_path: Path, clock: Clock
) -> None:
    """Messages arriving while a commit runs are committed together in the next."""
    io = ManualIO()
    committed: list[int] = []

    def hook(point: str) -> None:
        if point == "committed":
            committed.append(len(queued_ids(tmp_path)))

    spool = make_spool(
        tmp_path, clock, ScriptedAgent(clock), run_io=io, fault_hook=hook
    )
    fired: list[str] = []
    for name in ("a", "b", "c"):
        spool.enqueue(envelope(name), CONTENT).addCallback(fired.append)
    assert len(io.jobs) == 1  # a's commit started alone; b and c wait.

    io.run_next()  # a's commit.
    assert len(fired) == 1
    assert len(io.jobs) == 1  # One commit for b and c.
    io.run_next()
    assert len(fired) == 3
    assert committed == [1, 3]


class RaisingChanges:
    """A spool's changes that refuse at once, before any Deferred."""

    def submit(self, change: object) -> Deferred[bool | None]:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    def drained(self) -> Deferred[None]:
        return succeed(None)


def test_enqueue_fails_with_451_when_the_change_cannot_be_made(
    tmp_path: Path, clock: Clock
) -> None:
    """A change refused as it is submitted fails enqueue with 451 4.3.0, as a
    failed batch does; it does not escape to the session."""
    spool = make_spool(tmp_path, clock, ScriptedAgent(clock), changes=RaisingChanges())
    with pytest.raises(ReplyError) as caught:
        result_of(spool.enqueue(envelope("bob"), CONTENT))
    assert caught.value.reply == replies.STORAGE_FAILED
    assert queued_ids(tmp_path) == []


def test_enqueue_fails_with_451_when_storage_fails(
    tmp_path: Path, clock: Clock
) -> None:
    """A storage failure fails enqueue with 451 4.3.0 and leaves no files."""

    def broken(point: str) -> None:
        if point == "renamed":
            raise OSError(28, "No space left on device")

    spool = make_spool(tmp_path, clock, ScriptedAgent(clock), fault_hook=broken)
    with pytest.raises(ReplyError) as caught:
        result_of(spool.enqueue(envelope("bob"), CONTENT))

    assert caught.value.reply == replies.STORAGE_FAILED
    assert queued_ids(tmp_path) == []
    assert os.listdir(tmp_path / "envelope") == []
    assert os.listdir(tmp_path / "tmp") == []


# Delivery and per-recipient results.


def test_recipients_of_a_domain_share_one_call(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Recipients are grouped per domain, case-folded, one agent call each."""
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    given = envelope("bob")
    given.recipients += [
        Recipient(Address("carol", "EXAMPLE.com"), Route.RELAY),
        Recipient(Address("dave", "example.net"), Route.RELAY),
    ]
    result_of(spool.enqueue(given, CONTENT))

    groups = sorted((c.domain, [str(a) for a in c.recipients]) for c in agent.calls)
    assert groups == [
        ("example.com", ["bob@example.com", "carol@EXAMPLE.com"]),
        ("example.net", ["dave@example.net"]),
    ]
    assert all(call.content == CONTENT for call in agent.calls)
    assert queued_ids(tmp_path) == []


def test_mixed_replies_deliver_retry_and_bounce(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """With 250/450/550 replies the first is done, the second retried, the third
    bounced, and one report about the bounce goes out when the message is done."""
    agent.script = {"late": [DEFERRED, replies.OK], "nobody": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob", "late", "nobody"), CONTENT))

    stored = spool.store.load(message_id)
    states = {r.address.local_part: r.state for r in stored.recipients}
    assert states == {
        "bob": RecipientState.DELIVERED,
        "late": RecipientState.PENDING,
        "nobody": RecipientState.BOUNCED,
    }
    assert stored.recipients[1].reply == DEFERRED
    assert stored.attempts == 1
    assert mail_log[:2] == [
        "recovered 0 queued messages",
        f"queued {message_id} from=<alice@example.org> nrcpt=3 size={len(CONTENT)}",
    ]
    assert mail_log[2:] == [
        f"delivered {message_id} to=<bob@example.com> relay=mx.example.com "
        "attempts=1 reply=250 2.0.0 OK",
        f"deferred {message_id} to=<late@example.com> relay=mx.example.com "
        "attempts=1 reply=450 4.2.0 Mailbox busy",
        f"bounced {message_id} to=<nobody@example.com> relay=mx.example.com "
        "attempts=1 reply=550 5.1.1 No such user",
    ]
    assert reports(agent) == []

    clock.advance(MIN_RETRY)
    retried = agent.calls[1]
    assert [str(a) for a in retried.recipients] == ["late@example.com"]
    assert queued_ids(tmp_path) != [message_id]

    [(call, report)] = reports(agent)
    assert call.recipients == [SENDER]
    blocks = status_blocks(report)
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; nobody@example.com"]
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"


def test_agent_failure_is_temporary_for_every_recipient(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """An errback from the agent leaves every recipient pending with a 451."""
    agent.failing = True
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob", "carol"), CONTENT))

    stored = spool.store.load(message_id)
    assert [r.state for r in stored.recipients] == [RecipientState.PENDING] * 2
    assert [r.reply for r in stored.recipients] == [replies.LOCAL_ERROR] * 2
    assert spool.schedule.next_attempt(message_id) == MIN_RETRY


def test_envelope_is_rewritten_after_each_attempt(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """After every attempt the envelope on disk holds attempts and next time."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    clock.advance(MIN_RETRY)

    stored = spool.store.load(message_id)
    assert stored.attempts == 2
    assert stored.recipients[0].attempts == 2
    assert stored.next_attempt == 2 * MIN_RETRY
    assert stored.recipients[0].next_hop == "mx.example.com"


def test_at_most_max_parallel_attempts_run(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """No more messages are in delivery at once than the bound allows."""
    agent.hang = True
    spool = make_spool(tmp_path, clock, agent, max_parallel=2)
    spool.startService()
    for name in ("a", "b", "c"):
        result_of(spool.enqueue(envelope(name), CONTENT))
    assert len(agent.calls) == 2

    agent.pending[0].callback(
        [RecipientResult(agent.calls[0].recipients[0], replies.OK)]
    )
    assert len(agent.calls) == 3


# Retry schedule, expiry, warnings.


def test_retry_times_grow_with_time_queued(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Retries wait as long as the message has been queued, from min to max."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent, delay_warning=0)
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))
    # Steps of 100 s: every expected time is a multiple of 100.
    clock.pump([100.0] * 90)

    times = [call.when for call in agent.calls][:7]
    assert times == [0.0, 300.0, 600.0, 1200.0, 2400.0, 4800.0, 8400.0]


def test_retry_jitter_stays_within_bounds(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Jittered waits differ between messages but stay within min and max."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent, rng=random.Random(4), delay_warning=0)
    spool.startService()
    ids = [result_of(spool.enqueue(envelope("bob"), CONTENT)) for _ in range(20)]
    waits = {spool.schedule.next_attempt(i) for i in ids}

    assert len(waits) > 1
    assert all(w is not None and MIN_RETRY <= w <= MIN_RETRY * 1.1 for w in waits)


def test_expiry_at_exactly_the_lifetime(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """A message still pending is kept until the lifetime, and bounced at it."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent, delay_warning=0)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))

    while clock.seconds() < LIFETIME - 1:
        clock.advance(min(MAX_RETRY, LIFETIME - 1 - clock.seconds()))
    assert message_id in queued_ids(tmp_path)
    assert reports(agent) == []

    clock.advance(1)
    assert message_id not in queued_ids(tmp_path)
    expired = mail_log.index(
        f"expired {message_id} from=<alice@example.org> nrcpt=1 age=86400"
    )
    # Then bob's own outcome, with the last reply he had.
    assert mail_log[expired + 1] == (
        f"bounced {message_id} to=<bob@example.com> relay=mx.example.com "
        f"attempts={mail_log[expired - 1].split('attempts=')[1].split()[0]} "
        "reply=450 4.2.0 Mailbox busy"
    )
    [(_, report)] = reports(agent)
    [_, block] = status_blocks(report)
    assert block["Action"] == "failed"
    assert block["Status"] == "5.4.7"
    assert "450 4.2.0 Mailbox busy" in block["Diagnostic-Code"]


def test_delay_warning_goes_out_once(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """One delay warning is sent at the delay, however many retries follow."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))

    clock.advance(DELAY_WARNING - 1)
    assert reports(agent) == []
    clock.advance(1)
    [(call, report)] = reports(agent)
    assert call.when == DELAY_WARNING
    for _ in range(10):
        clock.advance(MAX_RETRY)

    assert len(reports(agent)) == 1
    [_, block] = status_blocks(report)
    assert block["Action"] == "delayed"
    assert block["Will-Retry-Until"]
    assert report["Subject"] == "Delayed Mail (still being retried)"


def test_delay_warning_can_be_switched_off(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """With delay_warning 0 no warning is ever sent."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent, delay_warning=0)
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))
    for _ in range(10):
        clock.advance(MAX_RETRY)
    assert reports(agent) == []


# Reports: NOTIFY, RET, ENVID, ORCPT and the null reverse path.


def test_notify_never_suppresses_the_failure_report(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A recipient with NOTIFY=NEVER bounces without any report."""
    agent.script = {"bob": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob", notify=frozenset({"NEVER"})), CONTENT))
    assert reports(agent) == []
    assert queued_ids(tmp_path) == []


def test_notify_failure_only_gets_no_delay_warning(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """NOTIFY=FAILURE without DELAY gets no delay warning."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob", notify=frozenset({"FAILURE"})), CONTENT))
    for _ in range(6):
        clock.advance(MAX_RETRY)
    assert reports(agent) == []


def test_notify_success_reports_relayed(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """NOTIFY=SUCCESS gets a report saying the message was relayed."""
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob", notify=frozenset({"SUCCESS"})), CONTENT))
    [(_, report)] = reports(agent)
    [_, block] = status_blocks(report)
    assert block["Action"] == "relayed"
    assert block["Status"] == "2.0.0"


def test_report_carries_envid_orcpt_and_full_message(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """ENVID, ORCPT (xtext decoded) and RET=FULL shape the failure report."""
    agent.script = {"bob": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    given = envelope("bob", ret="FULL", envid="id+2B42")
    given.recipients[0].orcpt = "rfc822;Bob+40example.com"
    result_of(spool.enqueue(given, CONTENT))

    [(_, report)] = reports(agent)
    [message_block, block] = status_blocks(report)
    assert message_block["Original-Envelope-Id"] == "id+42"
    assert message_block["Reporting-MTA"] == "dns; mx.example.net"
    assert block["Original-Recipient"] == "rfc822; Bob@example.com"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"Hello there." in returned.as_bytes()


def test_report_returns_headers_by_default(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Without RET=FULL the report returns the headers and not the body."""
    agent.script = {"bob": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))

    [(_, report)] = reports(agent)
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    text = returned.get_content()
    assert "Subject: hello" in text
    assert "Hello there." not in text


def test_report_covers_every_failed_recipient(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Two bounced recipients of one message get one report naming both."""
    agent.script = {"bob": [REFUSED], "carol": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob", "carol"), CONTENT))

    [(_, report)] = reports(agent)
    finals = [b["Final-Recipient"] for b in status_blocks(report)[1:]]
    assert finals == ["rfc822; bob@example.com", "rfc822; carol@example.com"]
    assert report["To"].addresses[0].addr_spec == "alice@example.org"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"


def test_no_report_to_the_null_reverse_path(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """A bounced message from <> produces no report, only a log line."""
    agent.script = {"bob": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob", sender=None), CONTENT))

    assert reports(agent) == []
    assert len(agent.calls) == 1
    assert f"dropped {message_id} reason=undeliverable report" in mail_log


def test_failed_report_is_copied_once_to_bounce_copy_to(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A report that bounces goes to bounce_copy_to, whose own bounce is dropped."""
    agent.script = {"alice": [REFUSED], "bob": [REFUSED], "postmaster": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent, bounce_copy_to="postmaster@example.net")
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))

    sent_to = [(str(c.recipients[0]), c.reverse_path) for c in agent.calls]
    assert sent_to == [
        ("bob@example.com", SENDER),
        ("alice@example.org", None),
        ("postmaster@example.net", None),
    ]
    assert queued_ids(tmp_path) == []


def test_reports_are_queued_as_dsn_messages(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A report is a queued message with the null reverse path, kind dsn."""
    agent.script = {"bob": [REFUSED], "alice": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    result_of(spool.enqueue(envelope("bob"), CONTENT))

    [dsn_id] = queued_ids(tmp_path)
    stored = spool.store.load(dsn_id)
    assert stored.reverse_path is None
    assert stored.kind is MessageKind.DSN
    assert [str(r.address) for r in stored.recipients] == ["alice@example.org"]


# Recovery.


def test_recovery_schedules_every_message_and_removes_partials(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A new spool on the same directory schedules every message and removes
    what a crash left half written; a file never committed is not a message."""
    agent.script = {"bob": [DEFERRED]}
    first = make_spool(tmp_path, clock, agent)
    first.startService()
    ids = [result_of(first.enqueue(envelope("bob"), CONTENT)) for _ in range(3)]
    result_of(first.stopService())
    (tmp_path / "tmp" / "X1.rewrite").write_bytes(b"half")
    (tmp_path / "free" / "X2").write_bytes(b"never committed")
    # Content without its envelope, as an earlier mailx could leave it.
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "X3").write_bytes(b"never committed")

    later = Clock()
    later.advance(100)
    second = make_spool(tmp_path, later, ScriptedAgent(later, {"bob": [DEFERRED]}))
    second.startService()

    assert second.recovery is not None
    assert result_of(second.recovery) == 3
    assert sorted(second.schedule.ids()) == sorted(ids)
    assert {second.schedule.next_attempt(i) for i in ids} == {MIN_RETRY}
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "content") == []
    assert queued_ids(tmp_path) == sorted(ids)


def test_recovered_messages_are_delivered_when_due(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A recovered message is tried at its stored next attempt time."""
    agent.script = {"bob": [DEFERRED]}
    first = make_spool(tmp_path, clock, agent)
    first.startService()
    result_of(first.enqueue(envelope("bob"), CONTENT))
    result_of(first.stopService())

    later_agent = ScriptedAgent(clock)
    second = make_spool(tmp_path, clock, later_agent)
    second.startService()
    clock.advance(MIN_RETRY - 1)
    assert later_agent.calls == []
    clock.advance(1)
    assert len(later_agent.calls) == 1
    assert queued_ids(tmp_path) == []


def test_lifetime_applies_to_messages_already_queued(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A shorter lifetime at restart expires messages queued under a longer one,
    after one more attempt at the moment of expiry."""
    agent.script = {"bob": [DEFERRED]}
    store = SpoolStore(str(tmp_path))
    store.prepare()
    message = QueuedMessage.from_envelope("OLD1", envelope("bob"), len(CONTENT), 0.0)
    message.next_attempt = 5000.0
    assert store.store_new([(message, CONTENT)]) == [None]

    spool = make_spool(tmp_path, clock, agent, lifetime=1000.0)
    spool.startService()
    assert spool.schedule.next_attempt("OLD1") == 1000.0
    clock.advance(1000)
    assert [str(call.recipients[0]) for call in agent.calls[:1]] == ["bob@example.com"]
    assert agent.calls[1].reverse_path is None
    assert queued_ids(tmp_path) == []


def test_a_message_released_after_its_lifetime_is_tried_first(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """Held past its lifetime and released, a message gets one attempt: it is
    delivered if it can be, and expires only if that attempt fails."""
    agent.script = {"bob": [DEFERRED, replies.OK]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.hold(message_id))
    clock.advance(LIFETIME * 2)

    result_of(spool.release(message_id))
    assert len(agent.calls) == 2
    assert all(call.reverse_path is not None for call in agent.calls)
    assert queued_ids(tmp_path) == []
    assert not [line for line in mail_log if line.startswith("expired")]


# Operator commands.


def test_hold_keeps_a_message_and_release_delivers_it(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """A held message is not tried, even flushed; released, it is tried at once."""
    agent.script = {"bob": [DEFERRED, replies.OK]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.hold(message_id))

    assert spool.store.load(message_id).hold
    spool.flush()
    clock.advance(MAX_RETRY * 3)
    assert len(agent.calls) == 1

    result_of(spool.release(message_id))
    assert len(agent.calls) == 2
    assert queued_ids(tmp_path) == []
    assert f"held {message_id}" in mail_log
    assert f"released {message_id}" in mail_log


def test_flush_tries_a_message_now(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Flushing a deferred message tries it at once instead of at its time."""
    agent.script = {"bob": [DEFERRED, replies.OK]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    clock.advance(10)
    spool.flush(message_id)
    assert [c.when for c in agent.calls] == [0.0, 10.0]
    assert queued_ids(tmp_path) == []


def test_delete_removes_without_report(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """Deleting a message removes its files and sends no report."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.delete(message_id))

    assert queued_ids(tmp_path) == []
    assert os.listdir(tmp_path / "envelope") == []
    clock.advance(LIFETIME)
    assert len(agent.calls) == 1
    assert f"deleted {message_id}" in mail_log


def test_delete_waits_for_an_attempt_under_way(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A delete during an attempt happens once the attempt has finished."""
    agent.hang = True
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    deleted: list[None] = []
    spool.delete(message_id).addCallback(deleted.append)
    assert deleted == []

    [address] = agent.calls[0].recipients
    agent.pending[0].callback([RecipientResult(address, DEFERRED)])
    assert deleted == [None]
    assert queued_ids(tmp_path) == []
    assert message_id not in spool.schedule


def test_a_command_waiting_for_a_delivered_message_says_it_left(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A hold or delete that waited for an attempt which delivered the message
    fails with MessageGone, not a plain "no such message"."""
    agent.hang = True
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    outcomes: list[Failure] = []
    spool.hold(message_id).addErrback(outcomes.append)
    spool.delete(message_id).addErrback(outcomes.append)
    assert outcomes == []

    [address] = agent.calls[0].recipients
    agent.pending[0].callback([RecipientResult(address, replies.OK)])
    assert [type(failure.value) for failure in outcomes] == [MessageGone, MessageGone]
    # Asked afterwards, it is simply not there.
    spool.hold(message_id).addErrback(outcomes.append)
    assert type(outcomes[-1].value) is UnknownMessage


def test_holding_a_held_message_changes_nothing(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """A second hold, or a release of a message not held, writes and logs
    nothing."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.hold(message_id))
    result_of(spool.hold(message_id))
    result_of(spool.release(message_id))
    result_of(spool.release(message_id))
    assert [line for line in mail_log if line.endswith(message_id)] == [
        f"held {message_id}",
        f"released {message_id}",
    ]


def test_flush_during_an_attempt_tries_again_after_it(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """A flush while the message is in delivery gives one more attempt after it."""
    agent.hang = True
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    spool.flush(message_id)
    assert len(agent.calls) == 1

    [address] = agent.calls[0].recipients
    agent.pending[0].callback([RecipientResult(address, DEFERRED)])
    assert len(agent.calls) == 2


def test_flush_of_unknown_or_held_message_is_refused(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent
) -> None:
    """Flushing an id not queued, or a held message, raises for the operator."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.hold(message_id))

    with pytest.raises(UnknownMessage):
        spool.flush("NOSUCH")
    with pytest.raises(MessageHeld):
        spool.flush(message_id)


def test_enqueue_waits_for_recovery_to_finish(tmp_path: Path, clock: Clock) -> None:
    """A message arriving during recovery is written only after it, so
    recovery cannot take its files for a crash's leftovers."""
    io = ManualIO()
    spool = make_spool(tmp_path, clock, ScriptedAgent(clock), run_io=io)
    spool.startService()
    fired: list[str] = []
    spool.enqueue(envelope("bob"), CONTENT).addCallback(fired.append)
    assert len(io.jobs) == 1  # Only the recovery scan.

    io.run_next()  # Recovery.
    assert fired == []
    io.run_next()  # The message's group commit.
    assert queued_ids(tmp_path) == fired


def test_an_unreadable_envelope_is_reported_in_the_mail_log(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """A message set aside at start because its envelope cannot be read is
    named in the mail log, where the operator looks."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    (tmp_path / "message" / "BROKEN1").write_bytes(b"mailx-spool 2 9\n{not json")
    # A message as an earlier mailx wrote it.
    (tmp_path / "content").mkdir()
    (tmp_path / "envelope" / "BROKEN2").write_bytes(b"{not json")
    (tmp_path / "content" / "BROKEN2").write_bytes(CONTENT)

    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    assert [line for line in mail_log if line.startswith("took ")] == [
        "took message/BROKEN1 out of the queue (partial, orphaned or unreadable;"
        " unreadable ones are kept in corrupt/)",
        "took envelope/BROKEN2 out of the queue (partial, orphaned or unreadable;"
        " unreadable ones are kept in corrupt/)",
    ]
    assert sorted(os.listdir(tmp_path / "corrupt")) == [
        "BROKEN1.message",
        "BROKEN2.content",
        "BROKEN2.envelope",
    ]


def test_a_fault_in_the_last_attempt_still_expires_the_message(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """Past its lifetime, a message whose attempt fails with a fault (not a
    reply) is returned all the same, not kept for ever."""
    agent.script = {"bob": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    message_id = result_of(spool.enqueue(envelope("bob"), CONTENT))
    result_of(spool.hold(message_id))
    clock.advance(LIFETIME * 2)

    async def broken(*arguments: object) -> None:
        raise RuntimeError("a fault in the attempt")

    spool._deliver = broken  # type: ignore[method-assign,assignment]
    result_of(spool.release(message_id))
    assert any(line.startswith(f"expired {message_id}") for line in mail_log)
    assert message_id not in queued_ids(tmp_path)


def test_turns_run_one_operation_a_message_in_order() -> None:
    """
    Operations on one message run one at a time, in the order they came,
    a failed one passing its turn on; another message's run meanwhile.
    """
    from mailx.spool import _Turns

    turns = _Turns()
    started: list[str] = []
    pending: dict[str, Deferred[str]] = {}

    def op(name: str) -> Callable[[], Deferred[str]]:
        def work() -> Deferred[str]:
            started.append(name)
            pending[name] = Deferred()
            return pending[name]

        return work

    def broken() -> Deferred[str]:
        started.append("broken")
        raise RuntimeError("no")

    outcomes: dict[str, object] = {}

    def record(name: str) -> Callable[[object], None]:
        return lambda outcome: outcomes.__setitem__(name, outcome)

    for name, work in [("a1", op("a1")), ("a2", broken), ("a3", op("a3"))]:
        turns.run("A", work).addBoth(record(name))
    turns.run("B", op("b1")).addBoth(record("b1"))
    assert started == ["a1", "b1"]

    pending["a1"].errback(ValueError("a1 failed"))
    # a2 raised at once; a3 starts in the same turn.
    assert started == ["a1", "b1", "broken", "a3"]
    pending["a3"].callback("a3 done")
    pending["b1"].callback("b1 done")
    for name, error in [("a1", ValueError), ("a2", RuntimeError)]:
        failure = outcomes.pop(name)
        assert isinstance(failure, Failure) and failure.check(error)
    assert outcomes == {"a3": "a3 done", "b1": "b1 done"}
    # Work that gives a plain value still ends its turn.
    plain = cast(Callable[[], Deferred[str]], lambda: "at once")
    turns.run("C", plain).addBoth(record("c1"))
    turns.run("C", op("c2"))
    assert outcomes["c1"] == "at once" and started[-1] == "c2"
    pending["c2"].callback("c2 done")
    # Nothing is kept for a message with nothing under way.
    assert turns._waiting == {}
    turns.run("A", op("a4"))
    assert started[-1] == "a4"


def test_a_full_disk_after_an_attempt_sends_no_recipient_the_message_twice(
    tmp_path: Path,
    clock: Clock,
    agent: ScriptedAgent,
    mail_log: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    When the envelope cannot be rewritten after an attempt (a full queue
    file system), the new state is kept in memory: the next attempt goes
    to the recipients still pending only, at the retry schedule's time,
    and the state is written once the disk takes it.
    """
    agent.script = {"late": [DEFERRED, DEFERRED, replies.OK]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    full = True
    rewrite = spool.store.rewrite

    def refusing(message: QueuedMessage) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        rewrite(message)

    monkeypatch.setattr(spool.store, "rewrite", refusing)
    message_id = result_of(spool.enqueue(envelope("bob", "late"), CONTENT))
    assert (
        f"could not record the attempt for {message_id} ([Errno 28] No space"
        " left on device); its state is kept in memory until it can be written"
    ) in mail_log

    clock.advance(MIN_RETRY * 1.5)
    full = False
    clock.advance(MIN_RETRY * 3)

    attempts = [[a.local_part for a in call.recipients] for call in agent.calls]
    assert attempts == [["bob", "late"], ["late"], ["late"]]
    assert queued_ids(tmp_path) == []
    assert mail_log[-2:] == [
        f"delivered {message_id} to=<late@example.com> relay=mx.example.com "
        "attempts=3 reply=250 2.0.0 OK",
        f"removed {message_id}",
    ]


def refuse_rewrites(spool: Spool, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The next ``times`` envelope rewrites fail as on a full file system."""
    rewrite = spool.store.rewrite
    refusals = [OSError(errno.ENOSPC, "No space left on device")] * times

    def refusing(message: QueuedMessage) -> None:
        if refusals:
            raise refusals.pop()
        rewrite(message)

    monkeypatch.setattr(spool.store, "rewrite", refusing)


def test_the_state_kept_in_memory_is_what_a_restart_reads_once_written(
    tmp_path: Path,
    clock: Clock,
    agent: ScriptedAgent,
    mail_log: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Written at the next attempt the disk takes it: a restart after that
    sends bob nothing again."""
    agent.script = {"late": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    refuse_rewrites(spool, monkeypatch, 1)
    message_id = result_of(spool.enqueue(envelope("bob", "late"), CONTENT))
    clock.advance(MIN_RETRY * 1.5)
    assert f"recorded the state of {message_id} kept in memory" in mail_log
    result_of(spool.stopService())

    stored = SpoolStore(str(tmp_path)).load(message_id)
    assert [r.state for r in stored.recipients] == [
        RecipientState.DELIVERED,
        RecipientState.PENDING,
    ]
    assert stored.attempts == 2


def test_holding_a_message_writes_the_state_kept_in_memory(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold after a refused rewrite writes the newer state, not the
    file's older one: bob stays delivered."""
    agent.script = {"late": [DEFERRED]}
    spool = make_spool(tmp_path, clock, agent)
    spool.startService()
    refuse_rewrites(spool, monkeypatch, 1)
    message_id = result_of(spool.enqueue(envelope("bob", "late"), CONTENT))
    assert result_of(spool.hold(message_id)) is True

    stored = SpoolStore(str(tmp_path)).load(message_id)
    assert stored.hold
    assert [r.state for r in stored.recipients] == [
        RecipientState.DELIVERED,
        RecipientState.PENDING,
    ]
    assert result_of(spool.release(message_id)) is True
    assert [[a.local_part for a in c.recipients] for c in agent.calls] == [
        ["bob", "late"],
        ["late"],
    ]


def test_a_failed_removal_delivers_and_reports_nothing_again(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """When the removal after the last attempt fails (the spool agent
    ended), the message is removed at its next attempt, without another
    delivery to bob or another report on nobody's bounce."""
    agent.script = {"nobody": [REFUSED]}
    spool = make_spool(tmp_path, clock, agent)
    submit = spool._changes.submit
    failures = [OSError(errno.EPIPE, "the spool agent ended (signal 9)")]

    message_id = "ORIGINAL1"

    def failing_once(change: SpoolChange) -> Deferred[bool | None]:
        # Not the report's removal: the message's own.
        if isinstance(change, Remove) and change.message_id == message_id and failures:
            return fail(failures.pop())
        return submit(change)

    spool._changes.submit = failing_once  # type: ignore[method-assign,assignment]
    spool.startService()
    queued = spool.enqueue(envelope("bob", "nobody", message_id=message_id), CONTENT)
    assert result_of(queued) == message_id
    assert (
        f"could not remove {message_id} from the queue ([Errno 32] the spool agent"
        " ended (signal 9)); tried again at its next attempt"
    ) in mail_log
    assert message_id in queued_ids(tmp_path)

    clock.advance(MIN_RETRY * 1.5)

    assert message_id not in queued_ids(tmp_path)
    deliveries = [c for c in agent.calls if c.reverse_path is not None]
    assert [[a.local_part for a in c.recipients] for c in deliveries] == [
        ["bob", "nobody"]
    ]
    assert len(reports(agent)) == 1
    assert mail_log.count(f"removed {message_id}") == 1


def test_a_success_report_the_disk_refuses_is_said_in_the_mail_log(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """NOTIFY=SUCCESS, and the report cannot be stored (a full disk): the
    mail log says so, with the cause; the message itself is done."""
    spool = make_spool(tmp_path, clock, agent)
    submit = spool._changes.submit

    def refusing_reports(change: SpoolChange) -> Deferred[bool | None]:
        if isinstance(change, StoreNew) and change.message_id != "ORIGINAL2":
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        return submit(change)

    spool._changes.submit = refusing_reports  # type: ignore[method-assign,assignment]
    spool.startService()
    given = envelope("bob", notify=frozenset({"SUCCESS"}), message_id="ORIGINAL2")
    assert result_of(spool.enqueue(given, CONTENT)) == "ORIGINAL2"
    assert reports(agent) == []
    assert (
        "could not queue the success report for ORIGINAL2 ([Errno 28] No space left"
        " on device): it is not sent"
    ) in mail_log
    assert mail_log[-1] == "removed ORIGINAL2"


def test_a_removal_done_but_unanswered_is_finished_at_the_next_attempt(
    tmp_path: Path, clock: Clock, agent: ScriptedAgent, mail_log: list[str]
) -> None:
    """The spool agent renamed the message out of the queue and ended before
    it tidied up or answered: the next attempt finds the file gone, removes
    what is left (the rewritten envelope) and logs the removal."""
    agent.script = {"bob": [DEFERRED, replies.OK]}
    spool = make_spool(tmp_path, clock, agent)
    submit = spool._changes.submit
    message_id = "ORIGINAL3"
    cut = [True]

    def half_done(change: SpoolChange) -> Deferred[bool | None]:
        if isinstance(change, Remove) and change.message_id == message_id and cut:
            cut.clear()
            submit(Remove(message_id, leftovers=False)).addErrback(lambda _: None)
            return fail(OSError(errno.EPIPE, "the spool agent ended (signal 9)"))
        return submit(change)

    spool._changes.submit = half_done  # type: ignore[method-assign,assignment]
    spool.startService()
    result_of(spool.enqueue(envelope("bob", message_id=message_id), CONTENT))
    clock.advance(MIN_RETRY * 1.5)
    assert f"could not remove {message_id} from the queue" in mail_log[-1]
    assert os.listdir(tmp_path / "envelope") == [message_id]

    clock.advance(MIN_RETRY * 1.5)

    assert mail_log[-1] == f"removed {message_id}"
    assert os.listdir(tmp_path / "envelope") == []
    assert len([c for c in agent.calls if c.reverse_path is not None]) == 2
