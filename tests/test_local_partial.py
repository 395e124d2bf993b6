"""
A message for several local recipients when one Maildir cannot be written:
the others get their copy once, and only the one that failed is retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mailx import replies as replies_module
from mailx.address import Address
from mailx.envelope import ClientInfo, Envelope, Recipient, Route
from mailx.local import Mailbox
from mailx.replies import Reply, ReplyError
from mailx.router import GroupCommit, LocalFirstAgent, LocalStore, Router
from mailx.spool import Spool, synchronous_io

DOMAIN = "example.org"
ALICE = Address("alice", DOMAIN)
CAROL = Address("carol", DOMAIN)
# An alias whose copies go to both mailboxes.
BOTH = Address("both", DOMAIN)
CONTENT = b"From: s@example.net\r\nSubject: partial\r\n\r\nBody.\r\n"
MIN_RETRY = 300.0


class Mailboxes:
    def resolve(self, address: Address) -> list[Mailbox] | None:
        if address.local_part == "gone":
            return None
        if address.local_part == "both":
            return [Mailbox(DOMAIN, "alice"), Mailbox(DOMAIN, "carol")]
        if address.local_part == "other":
            return [Mailbox(DOMAIN, "carol"), Mailbox(DOMAIN, "dave")]
        return [Mailbox(DOMAIN, address.local_part)]


class Setup:
    """A Router and a spool that delivers local mail with LocalFirstAgent."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "mail"
        self.clock = Clock()
        commit = GroupCommit(synchronous_io)
        self.local = LocalStore(str(self.root), Mailboxes(), commit)
        agent = LocalFirstAgent(self.local, [DOMAIN], None)
        self.spool = Spool(
            str(tmp_path / "queue"),
            self.clock,
            agent,
            "mx.example.org",
            min_retry=MIN_RETRY,
            max_retry=MIN_RETRY,
            lifetime=86400,
            delay_warning=0,
            run_io=synchronous_io,
        )
        agent.requeue = self.spool.enqueue
        self.spool.startService()
        self.router = Router(self.local, self.spool)

    def block(self, local_part: str) -> None:
        """A file where the Maildir should be: every write to it fails."""
        (self.root / DOMAIN).mkdir(parents=True, exist_ok=True)
        (self.root / DOMAIN / local_part).write_text("not a Maildir")

    def unblock(self, local_part: str) -> None:
        (self.root / DOMAIN / local_part).unlink()

    def carol_gets_hers_once(self) -> None:
        """Two retries with carol's Maildir blocked give alice nothing more;
        once it can be written, each has one copy and the queue is empty."""
        self.retry()
        self.retry()
        assert self.copies("alice") == 1
        self.unblock("carol")
        self.retry()
        assert (self.copies("alice"), self.copies("carol")) == (1, 1)
        assert self.queued() == []

    def copies(self, local_part: str) -> int:
        new = self.root / DOMAIN / local_part / "new"
        return len(list(new.iterdir())) if new.is_dir() else 0

    def receive(self, *recipients: Address) -> Reply:
        envelope = Envelope(
            reverse_path=Address("s", "example.net"),
            recipients=[Recipient(r, Route.LOCAL) for r in recipients],
            client=ClientInfo("192.0.2.1", 2525, helo="client.example.net"),
            message_id=f"M{len(recipients)}",
        )
        replies: list[object] = []
        self.router.receive(envelope, CONTENT).addBoth(replies.append)
        (reply,) = replies
        assert isinstance(reply, Reply)
        return reply

    def retry(self) -> None:
        self.clock.advance(MIN_RETRY * 1.5)

    def queued(self) -> list[str]:
        return self.spool.store.ids()


def test_only_the_failed_recipient_is_queued_and_retried(tmp_path: Path) -> None:
    """alice gets her copy at once and never again; carol's copy waits in the
    spool until her Maildir can be written, then arrives once."""
    setup = Setup(tmp_path)
    setup.block("carol")

    assert setup.receive(CAROL, ALICE).is_positive
    assert setup.copies("alice") == 1
    assert len(setup.queued()) == 1
    (message_id,) = setup.queued()
    stored = setup.spool.store.load(message_id)
    assert [r.address for r in stored.recipients] == [CAROL]

    setup.retry()
    assert setup.copies("alice") == 1
    setup.unblock("carol")
    setup.retry()
    assert setup.copies("carol") == 1
    assert setup.copies("alice") == 1
    assert setup.queued() == []


def test_a_retry_delivers_only_the_recipients_still_waiting(tmp_path: Path) -> None:
    """When the spool holds two local recipients and one Maildir fails, the
    other is delivered once and done; the failed one alone is tried again."""
    setup = Setup(tmp_path)
    setup.block("alice")
    setup.block("carol")
    assert setup.receive(CAROL, ALICE).is_positive
    assert setup.copies("alice") == setup.copies("carol") == 0

    setup.unblock("alice")
    setup.retry()
    assert setup.copies("alice") == 1
    setup.retry()
    setup.retry()
    assert setup.copies("alice") == 1
    assert len(setup.queued()) == 1

    setup.unblock("carol")
    setup.retry()
    assert (setup.copies("alice"), setup.copies("carol")) == (1, 1)
    assert setup.queued() == []


def test_an_alias_to_two_mailboxes_retries_only_the_failed_one(
    tmp_path: Path,
) -> None:
    """For an alias whose copies go to two Maildirs, the one that failed is
    queued alone, named as its Maildir with the alias as ORCPT, and the
    other gets no second copy, however many retries it takes."""
    setup = Setup(tmp_path)
    setup.block("carol")
    assert setup.receive(BOTH).is_positive
    assert setup.copies("alice") == 1
    (message_id,) = setup.queued()
    (queued,) = setup.spool.store.load(message_id).recipients
    assert (queued.address, queued.route) == (CAROL, Route.MAILBOX)
    assert queued.orcpt == "rfc822;both@example.org"

    setup.carol_gets_hers_once()


def test_a_mailbox_recipient_is_not_expanded_again(tmp_path: Path) -> None:
    """A queued Route.MAILBOX recipient is written into the Maildir it names,
    even when that name is also an alias (here "both")."""
    setup = Setup(tmp_path)
    envelope = Envelope(
        reverse_path=Address("s", "example.net"),
        recipients=[Recipient(BOTH, Route.MAILBOX)],
        message_id="MB",
    )
    setup.spool.enqueue(envelope, CONTENT)
    assert setup.copies("both") == 1
    assert (setup.copies("alice"), setup.copies("carol")) == (0, 0)


def test_a_mailbox_recipient_cannot_leave_the_mail_root(tmp_path: Path) -> None:
    """A Route.MAILBOX name that is not a safe local part is no such user."""
    setup = Setup(tmp_path)
    envelope = Envelope(
        reverse_path=None,
        recipients=[Recipient(Address("..", DOMAIN), Route.MAILBOX)],
        message_id="MX",
    )
    setup.spool.enqueue(envelope, CONTENT)
    assert not (tmp_path / "mail" / "new").exists()
    assert setup.queued() == []


def test_a_recipient_whose_alias_went_away_is_reported_not_dropped(
    tmp_path: Path,
) -> None:
    """A local recipient that resolves to no Maildir any more (its alias was
    removed by a reload after RCPT) is queued and reported unknown to the
    sender, never dropped without a word."""
    setup = Setup(tmp_path)
    gone = Address("gone", DOMAIN)
    assert setup.receive(gone, ALICE).is_positive
    assert setup.copies("alice") == 1
    # The report to s@example.net is queued; the recipient itself is done.
    (report_id,) = setup.queued()
    report = setup.spool.store.load(report_id)
    assert [r.address for r in report.recipients] == [Address("s", "example.net")]


def test_a_queued_alias_retries_only_its_missing_maildirs(tmp_path: Path) -> None:
    """A spool message for an alias to two Maildirs (a report to a local
    sender, say) whose one Maildir fails: the written one is done, the
    missing one is queued alone and retried alone."""
    setup = Setup(tmp_path)
    setup.block("carol")
    report = Envelope(
        reverse_path=None,
        recipients=[Recipient(BOTH, Route.LOCAL)],
        message_id="",
    )
    setup.spool.enqueue(report, CONTENT)
    assert setup.copies("alice") == 1
    (left,) = setup.queued()
    (waiting,) = setup.spool.store.load(left).recipients
    assert (waiting.address, waiting.route) == (CAROL, Route.MAILBOX)

    setup.carol_gets_hers_once()


def test_every_recipient_of_a_shared_copy_is_logged(tmp_path: Path) -> None:
    """alice and the alias "both" share alice's copy: one file, but a
    delivered line for each recipient, and one for carol's copy."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        setup = Setup(tmp_path)
        assert setup.receive(ALICE, BOTH).is_positive
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [formatEvent(e) for e in events if "delivered to=" in str(e["log_format"])]
    alice = setup.root / DOMAIN / "alice"
    carol = setup.root / DOMAIN / "carol"
    assert sorted(line.split(": ", 1)[1] for line in lines) == sorted(
        [
            f"delivered to=<alice@example.org> maildir={alice}",
            f"delivered to=<both@example.org> maildir={alice}",
            f"delivered to=<both@example.org> maildir={carol}",
        ]
    )
    assert setup.copies("alice") == setup.copies("carol") == 1


def test_a_failed_maildir_several_recipients_lead_to_is_queued_once(
    tmp_path: Path,
) -> None:
    """carol, directly and through the alias "both", is one Maildir: when it
    fails it is queued once, and later written once."""
    setup = Setup(tmp_path)
    setup.block("carol")
    assert setup.receive(CAROL, BOTH).is_positive
    (message_id,) = setup.queued()
    assert [r.address for r in setup.spool.store.load(message_id).recipients] == [CAROL]
    setup.unblock("carol")
    setup.retry()
    assert (setup.copies("alice"), setup.copies("carol")) == (1, 1)


@pytest.mark.parametrize(
    "recipients",
    [
        [BOTH, Address("other", DOMAIN)],
        [CAROL, BOTH],
        [BOTH, CAROL],
    ],
)
def test_a_spool_message_queues_a_shared_failed_maildir_once(
    tmp_path: Path, recipients: list[Address]
) -> None:
    """On a retry from the spool, a failed Maildir that several recipients
    lead to (two aliases, or a user and an alias) ends with one copy."""
    setup = Setup(tmp_path)
    setup.block("carol")
    report = Envelope(
        reverse_path=None,
        recipients=[Recipient(r, Route.LOCAL) for r in recipients],
        message_id="",
    )
    setup.spool.enqueue(report, CONTENT)
    setup.retry()
    setup.unblock("carol")
    setup.retry()
    setup.retry()
    assert setup.copies("carol") == 1
    assert setup.copies("alice") == 1
    assert setup.queued() == []


class FakeQueue:
    """A spool's enqueue: answers with what it is given, or raises at once."""

    def __init__(self, answer: Deferred[str] | Exception) -> None:
        self.answer = answer
        self.queued: list[Envelope] = []

    def enqueue(self, envelope: Envelope, content: bytes) -> Deferred[str]:
        self.queued.append(envelope)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def relayed_envelope() -> Envelope:
    return Envelope(
        reverse_path=Address("s", "example.net"),
        recipients=[
            Recipient(Address("x", "far.example"), Route.RELAY),
            Recipient(Address("y", "backup.example"), Route.BACKUP),
        ],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.net"),
        message_id="R1",
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (succeed("R1"), replies_module.OK),
        (fail(ReplyError(replies_module.STORAGE_FAILED)), ReplyError),
        (OSError(28, "No space left on device"), OSError),
    ],
)
def test_mail_for_the_spool_alone_goes_straight_there(
    tmp_path: Path, answer: Deferred[str] | Exception, expected: object
) -> None:
    """An envelope with no local recipient is queued as it is; what the
    spool answers, or raises at once, comes back as the Deferred's result."""
    queue = FakeQueue(answer)
    local = LocalStore(str(tmp_path), Mailboxes(), GroupCommit(synchronous_io))
    router = Router(local, queue)
    envelope = relayed_envelope()
    results: list[object] = []
    router.receive(envelope, CONTENT).addBoth(results.append)
    (result,) = results
    assert queue.queued == [envelope]
    if isinstance(expected, type):
        assert isinstance(result, Failure) and result.check(expected)
    else:
        assert result == expected


@pytest.mark.parametrize("stored", [True, False])
def test_a_message_for_local_and_other_recipients_is_queued_whole(
    tmp_path: Path, stored: bool
) -> None:
    """Local and relayed recipients together: the whole message goes to the
    spool, whose first attempt writes the Maildirs.  A store the disk
    refuses refuses the message before any copy is written, so the
    client's next try makes no second copy."""
    answer = (
        succeed("R1") if stored else fail(ReplyError(replies_module.STORAGE_FAILED))
    )
    queue = FakeQueue(answer)
    root = tmp_path / "mail"
    local = LocalStore(str(root), Mailboxes(), GroupCommit(synchronous_io))
    router = Router(local, queue)
    envelope = relayed_envelope()
    envelope.recipients.insert(0, Recipient(ALICE, Route.LOCAL))
    results: list[object] = []
    router.receive(envelope, CONTENT).addBoth(results.append)
    (result,) = results
    assert [r.address for r in queue.queued[0].recipients] == [
        ALICE,
        Address("x", "far.example"),
        Address("y", "backup.example"),
    ]
    assert not (root / DOMAIN / "alice").exists()
    if stored:
        assert result == replies_module.OK
    else:
        assert isinstance(result, Failure) and result.check(ReplyError)


def test_the_spool_writes_the_local_copy_of_a_message_queued_whole(
    tmp_path: Path,
) -> None:
    """The spool's first attempt, at once, writes alice's Maildir; only the
    relayed recipient stays queued."""
    setup = Setup(tmp_path)
    envelope = relayed_envelope()
    envelope.recipients[:] = [
        Recipient(ALICE, Route.LOCAL),
        Recipient(Address("x", "far.example"), Route.RELAY),
    ]
    results: list[object] = []
    setup.router.receive(envelope, CONTENT).addBoth(results.append)
    assert results == [replies_module.OK]
    assert setup.copies("alice") == 1
    (message_id,) = setup.queued()
    stored = setup.spool.store.load(message_id)
    assert [r.address for r in stored.pending] == [Address("x", "far.example")]


def test_a_maildir_retry_records_the_error_it_met(tmp_path: Path) -> None:
    """The reply a Maildir retry records (the deferred line, ``queue show``,
    the report if it never succeeds) names the error, not only "try
    again later"."""
    setup = Setup(tmp_path)
    setup.block("carol")
    assert setup.receive(CAROL).is_positive
    setup.retry()
    (message_id,) = setup.queued()
    (recipient,) = setup.spool.store.load(message_id).recipients
    assert recipient.reply is not None
    assert (recipient.reply.code, recipient.reply.enhanced) == (451, "4.3.0")
    assert recipient.reply.text.startswith("Maildir could not be written (")
    assert recipient.reply.text != "Maildir could not be written ()"


def test_a_full_disk_is_mail_system_full() -> None:
    from mailx.router import _maildir_failed

    full = OSError(28, "No space left on device")
    reply = _maildir_failed([(Mailbox(DOMAIN, "carol"), full)])
    assert str(reply) == (
        "451 4.3.1 Maildir could not be written (No space left on device)"
    )


@pytest.mark.parametrize("stored", [True, False])
def test_a_maildir_failure_is_said_queued_only_once_it_is(
    tmp_path: Path, stored: bool, mail_log: list[str]
) -> None:
    """ "queued for retry" is logged once the spool took the retry; when it
    refused, the client's 451 is the news, and no retry is promised."""
    answer = (
        succeed("R1") if stored else fail(ReplyError(replies_module.STORAGE_FAILED))
    )
    root = tmp_path / "mail"
    (root / DOMAIN).mkdir(parents=True)
    (root / DOMAIN / "carol").write_text("not a Maildir")
    local = LocalStore(str(root), Mailboxes(), GroupCommit(synchronous_io))
    router = Router(local, FakeQueue(answer))
    envelope = Envelope(
        reverse_path=Address("s", "example.net"),
        recipients=[Recipient(CAROL, Route.LOCAL), Recipient(ALICE, Route.LOCAL)],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.net"),
        message_id="M1",
    )
    results: list[object] = []
    router.receive(envelope, CONTENT).addBoth(results.append)
    promised = [line for line in mail_log if "queued for retry" in line]
    assert len(promised) == (1 if stored else 0)
    assert (results[0] == replies_module.OK) is stored


def test_a_retry_from_the_spool_logs_its_error_in_its_deferred_line(
    tmp_path: Path, mail_log: list[str]
) -> None:
    """A Maildir retried whole from the spool says why in its deferred
    line, not again "queued for retry" (it is queued already)."""
    setup = Setup(tmp_path)
    setup.block("carol")
    assert setup.receive(CAROL).is_positive
    before = len(mail_log)
    setup.retry()
    retried = mail_log[before:]
    assert not any("queued for retry" in line for line in retried)
    assert any(
        line.startswith("deferred ") and "Maildir could not be written (" in line
        for line in retried
    )
