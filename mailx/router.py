"""
Where an accepted message goes: the server's ``MessageSink``.

Recipients in local domains are written into their Maildirs; every other
recipient (backup MX and relay) is written into the spool, which passes the
message on.  The server says 250 only when both are durable.  Local
recipients whose Maildir cannot be written go into the spool, which delivers
their copies later; the others have theirs and are not written again.  When
the spool cannot take it the client gets 451 4.3.0 and sends it again; if
local copies were already written they then arrive twice, which is better
than never.

``LocalFirstAgent`` is the spool's ``DeliveryAgent``: it delivers into local
Maildirs itself (delivery status notifications to local senders, mail for a
local domain queued while the server could not store it) and hands every
other domain to the outbound client.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from mailx import maildir, replies
from mailx.address import Address
from mailx.batching import GroupJob, IORunner
from mailx.config import is_safe_local_part
from mailx.dsn import encode_xtext
from mailx.envelope import Envelope, Recipient, Route
from mailx.local import Mailbox as LocalMailbox
from mailx.maillog import PrintableLogger, maillog
from mailx.replies import Reply
from mailx.spool import DeliveryAgent, RecipientResult

log = PrintableLogger()

DELIVERED = Reply(250, "2.0.0", "Delivered to Maildir")
# Recipients whose copies go into Maildirs here.
LOCAL_ROUTES = (Route.LOCAL, Route.MAILBOX)


class Mailbox(Protocol):
    @property
    def domain(self) -> str: ...

    @property
    def local_part(self) -> str: ...

    def maildir(self, root: str) -> str: ...


class Mailboxes(Protocol):
    def resolve(self, address: Address) -> Sequence[Mailbox] | None: ...


class Queue(Protocol):
    def enqueue(self, envelope: Envelope, content: bytes) -> Deferred[str]: ...


# A local recipient with the Maildirs its copies go to.
Resolved = tuple[Recipient, Sequence[Mailbox]]
# A Maildir that could not be written, and why.
Miss = tuple[Mailbox, OSError]
# Per job of a submission, in order: None when it was written, or its error.
JobErrors = list[OSError | None]
# A message's copies: (Maildir, stored form) each.
MaildirJobs = list[tuple[str, maildir.StoredForm]]


class MaildirCommit(Protocol):
    """
    Writes Maildirs in batches: each submission is the (Maildir, stored
    form) jobs of one message, and the submissions that wait together share
    one sync (``maildir.deliver_batch``).  A submission fires with the
    error of each of its jobs, None for one that was written; it fails only
    when the batch failed as a whole.  The server uses a delivery agent
    process (``mailx.agentprocess``); ``GroupCommit`` does it in threads.
    """

    def submit(self, item: MaildirJobs) -> Deferred[JobErrors]: ...


class GroupCommit(GroupJob[MaildirJobs, JobErrors]):
    """
    A ``MaildirCommit`` in this process, one batch at a time in a thread:
    where the reactor cannot start processes, and in tests.
    """

    def __init__(self, run_io: IORunner) -> None:
        super().__init__(run_io, _deliver_submissions)


def _deliver_submissions(
    submissions: list[MaildirJobs],
) -> list[JobErrors | OSError]:
    results = maildir.deliver_batch([job for jobs in submissions for job in jobs])
    outcomes: list[JobErrors | OSError] = []
    start = 0
    for jobs in submissions:
        mine = results[start : start + len(jobs)]
        start += len(jobs)
        outcomes.append([r if isinstance(r, OSError) else None for r in mine])
    return outcomes


class LocalStore:
    """Writes messages into the Maildirs of local recipients."""

    def __init__(self, root: str, mailboxes: Mailboxes, commit: MaildirCommit) -> None:
        self.root = root
        self.mailboxes = mailboxes
        self.commit = commit

    def mailboxes_of(self, recipient: Recipient) -> Sequence[Mailbox]:
        """
        The Maildirs a local recipient's copies go to: what its address
        resolves to, or for a ``Route.MAILBOX`` recipient the one it names.
        """
        if recipient.route is Route.MAILBOX:
            address = recipient.address
            if not is_safe_local_part(address.local_part):
                return []
            return [LocalMailbox(address.domain_key, address.local_part)]
        return self.mailboxes.resolve(recipient.address) or []

    def resolved(
        self, recipients: Iterable[Recipient]
    ) -> tuple[list[Resolved], list[Recipient]]:
        """Each recipient with its Maildirs, and those that have none."""
        found: list[Resolved] = []
        unknown: list[Recipient] = []
        for recipient in recipients:
            boxes = self.mailboxes_of(recipient)
            if boxes:
                found.append((recipient, boxes))
            else:
                unknown.append(recipient)
        return found, unknown

    def deliver(
        self,
        message_id: str,
        reverse_path: Address | None,
        recipients: Sequence[Resolved],
        content: bytes,
    ) -> Deferred[dict[int, list[Miss]]]:
        """
        Store one copy per distinct Maildir of ``recipients`` (from
        ``resolved``).  Fire with the recipients, by their index, that did
        not get every copy: the Maildirs that failed and why; an empty dict
        when all were stored.  Fail only when nothing could be done at all.
        """
        # Maildir -> (the mailbox, the recipient its copy names, the
        # indices of every recipient whose copies go there).
        targets: dict[str, tuple[Mailbox, Address, list[int]]] = {}
        for index, (recipient, mailboxes) in enumerate(recipients):
            for mailbox in mailboxes:
                path = mailbox.maildir(self.root)
                entry = targets.setdefault(path, (mailbox, recipient.address, []))
                entry[2].append(index)
        return_path = "" if reverse_path is None else str(reverse_path)
        paths = list(targets)
        # One body for every copy, each with its own Delivered-To field.
        body = maildir.stored_body(content)
        jobs: list[tuple[str, maildir.StoredForm]] = [
            (path, (maildir.stored_header(return_path, str(targets[path][1])), body))
            for path in paths
        ]
        deferred = self.commit.submit(jobs)

        def settled(errors: JobErrors) -> dict[int, list[Miss]]:
            failed: dict[int, list[Miss]] = {}
            for path, error in zip(paths, errors, strict=True):
                mailbox, _, indices = targets[path]
                if error is not None:
                    for index in indices:
                        failed.setdefault(index, []).append((mailbox, error))
                    continue
                # A line for every recipient the copy is for, not only the
                # one its Delivered-To field names.
                for index in indices:
                    maillog.info(
                        "{message_id}: delivered to=<{recipient}> maildir={maildir}",
                        message_id=message_id,
                        recipient=str(recipients[index][0].address),
                        maildir=path,
                    )
            return failed

        return deferred.addCallback(settled)


class Router:
    """The ``mailx.envelope.MessageSink`` of the server."""

    def __init__(self, local: LocalStore, queue: Queue | None) -> None:
        self.local = local
        self.queue = queue

    def receive(self, envelope: Envelope, content: bytes) -> Deferred[Reply]:
        if self.queue is not None and _queued_whole(envelope):
            # Straight to the spool, without a coroutine to drive (issue 7).
            try:
                queued = self.queue.enqueue(envelope, content)
            except Exception:
                return fail()
            return queued.addCallback(lambda _: replies.OK)
        return Deferred.fromCoroutine(self._receive(envelope, content))

    async def _receive(self, envelope: Envelope, content: bytes) -> Reply:
        """
        A message for local recipients alone goes straight into their
        Maildirs; the recipients whose Maildir could not be written go to
        the spool, which retries them later: the client is not refused for
        copies that were written, and those are not written again.
        """
        if _queued_whole(envelope):
            # Here only without a spool to take it.
            return replies.LOCAL_ERROR
        # A local recipient with no Maildir now (its alias was removed by a
        # reload since RCPT) goes to the spool, whose agent reports it as
        # unknown to the sender: it is never dropped unsaid.
        resolved, unknown = self.local.resolved(envelope.recipients)
        others = list(unknown)
        if others and self.queue is None:
            return replies.LOCAL_ERROR

        missed: list[tuple[Recipient, list[Miss]]] = []
        if resolved:
            try:
                failed = await self.local.deliver(
                    envelope.message_id, envelope.reverse_path, resolved, content
                )
            except OSError as batch_error:
                failed = {
                    index: [(box, batch_error) for box in boxes]
                    for index, (_, boxes) in enumerate(resolved)
                }
            if failed and self.queue is None:
                raise next(
                    problem for misses in failed.values() for _, problem in misses
                )
            # A Maildir several recipients lead to is queued once, under the
            # first of them, as it is written once.
            covered: set[str] = set()
            for index, misses in sorted(failed.items()):
                recipient, boxes = resolved[index]
                missed.append((recipient, misses))
                # Only what is missing goes to the spool: the Maildirs that
                # were written are not written again.
                missing = _uncovered(misses, covered, self.local.root)
                if missing:
                    others = others + _to_retry(recipient, missing, boxes)
        if others:
            assert self.queue is not None
            await self.queue.enqueue(_with_recipients(envelope, others), content)
        # Said once queued: a spool that refused it makes the client's 451
        # the news ("not stored"), not a retry that will not come.
        for recipient, misses in missed:
            _log_missing(envelope.message_id, recipient, misses)
        return replies.OK


def _queued_whole(envelope: Envelope) -> bool:
    """
    Does the whole message go to the spool, its local recipients too?

    - When some recipient is not local (relaying, a backup domain): the
      spool takes it first, and its first attempt writes the Maildirs.  A
      store the disk refuses then refuses the message (451) before any
      copy is written, so the client's next try makes none twice.
    - When a worker handed it on (mailx.workers): the worker wrote every
      Maildir it could, so the rest goes to the spool, not again to a
      Maildir that just failed.
    """
    if envelope.client is not None and envelope.client.listener == "worker":
        return True
    return any(r.route not in LOCAL_ROUTES for r in envelope.recipients)


def _maildir_failed(misses: list[Miss]) -> Reply:
    """
    The reply a recipient whose Maildir could not be written is retried
    with: it names the error, for the deferred line, ``mailx queue show``
    and the report if it never can be; a full disk or quota is "mail
    system full" (RFC 3463, X.3.1).
    """
    if not misses:
        return replies.STORAGE_FAILED
    error = misses[0][1]
    words = error.strerror or str(error)
    enhanced = "4.3.1" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "4.3.0"
    return Reply(451, enhanced, f"Maildir could not be written ({words})")


def _log_missing(message_id: str, recipient: Recipient, misses: list[Miss]) -> None:
    for _, problem in misses:
        maillog.warn(
            "{message_id}: maildir write failed for <{recipient}>"
            " ({error}); queued for retry",
            message_id=message_id,
            recipient=str(recipient.address),
            error=str(problem),
        )


def _uncovered(misses: list[Miss], covered: set[str], root: str) -> list[Mailbox]:
    """
    The failed Maildirs no other recipient's retry covers yet; from now on
    they are covered.
    """
    missing = [box for box, _ in misses if box.maildir(root) not in covered]
    covered.update(box.maildir(root) for box in missing)
    return missing


def _to_retry(
    recipient: Recipient, missing: list[Mailbox], boxes: Sequence[Mailbox]
) -> list[Recipient]:
    """
    What the spool retries for a local recipient (whose Maildirs are
    ``boxes``) with Maildirs ``missing``:
    the recipient itself when it has one Maildir; else one ``Route.MAILBOX``
    recipient for each missing Maildir, with the original recipient as its
    ORCPT (RFC 3461 section 4.2), so that a retry writes only those.
    """
    if len(boxes) <= 1:
        return [recipient]
    orcpt = recipient.orcpt or f"rfc822;{encode_xtext(str(recipient.address))}"
    return [
        Recipient(
            Address(box.local_part, box.domain),
            Route.MAILBOX,
            notify=recipient.notify,
            orcpt=orcpt,
        )
        for box in missing
    ]


def _with_recipients(envelope: Envelope, recipients: list[Recipient]) -> Envelope:
    if recipients == envelope.recipients:
        # All of them (the usual case relaying): no copy (issue 7).
        return envelope
    return dataclasses.replace(envelope, recipients=list(recipients))


class LocalFirstAgent:
    """
    The spool's ``DeliveryAgent``: local domains here, others outbound.

    ``requeue`` (the spool's ``enqueue``, set once the spool exists) takes
    the Maildirs still missing when some of a local recipient's copies were
    written: they are queued as a message of their own, so that the retry
    writes only those, and the recipient is done.
    """

    def __init__(
        self,
        local: LocalStore,
        local_domains: Iterable[str],
        outbound: DeliveryAgent | None,
        requeue: Callable[[Envelope, bytes], Deferred[str]] | None = None,
    ) -> None:
        self.local = local
        self.local_domains = frozenset(domain.lower() for domain in local_domains)
        self.outbound = outbound
        self.requeue = requeue

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        if domain.lower() not in self.local_domains and domain != "":
            if self.outbound is None:
                reply = Reply(451, "4.4.0", "No outbound delivery configured")
                return succeed([RecipientResult(r, reply) for r in recipients])
            return self.outbound.deliver(
                reverse_path, domain, recipients, content, envelope
            )
        return Deferred.fromCoroutine(
            self._deliver_local(reverse_path, recipients, content, envelope)
        )

    async def _deliver_local(
        self,
        reverse_path: Address | None,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> list[RecipientResult]:
        # The envelope says how each recipient was queued (Route.MAILBOX: one
        # Maildir of an alias, not to be expanded again).
        routes = {r.address: r for r in envelope.recipients}
        targets = [routes.get(a) or Recipient(a, Route.LOCAL) for a in recipients]
        known, unknown = self.local.resolved(targets)
        results = [
            RecipientResult(r.address, replies.NO_SUCH_USER, "local") for r in unknown
        ]
        try:
            failed = await self.local.deliver(
                envelope.message_id, reverse_path, known, content
            )
        except Exception:
            log.failure(
                "{message_id}: local delivery failed", message_id=envelope.message_id
            )
            failed = {index: [] for index in range(len(known))}
        outcome: dict[int, Reply] = {}
        # Maildirs some recipient of this attempt will write on its retry.
        covered: set[str] = set()
        # First the recipients none of whose copies were written: each is
        # tried again whole, so its Maildirs are covered.
        for index, (_, boxes) in enumerate(known):
            misses = failed.get(index)
            if misses is None:
                outcome[index] = DELIVERED
            elif not misses or len(misses) >= len(boxes):
                # Retried whole: its deferred line names the error.
                _uncovered(misses, covered, self.local.root)
                outcome[index] = _maildir_failed(misses)
        # Then those with some copies written: the rest goes once, by itself.
        for index, (recipient, boxes) in enumerate(known):
            if index not in outcome:
                misses = failed[index]
                _log_missing(envelope.message_id, recipient, misses)
                missing = _uncovered(misses, covered, self.local.root)
                outcome[index] = await self._requeue(
                    recipient, missing, boxes, content, envelope
                )
        for index, (recipient, _) in enumerate(known):
            results.append(RecipientResult(recipient.address, outcome[index], "local"))
        return results

    async def _requeue(
        self,
        recipient: Recipient,
        missing: list[Mailbox],
        boxes: Sequence[Mailbox],
        content: bytes,
        envelope: Envelope,
    ) -> Reply:
        """
        A recipient some of whose copies were written: its ``missing``
        Maildirs (those no other retry covers) are queued as a message of
        their own, and the recipient is done.
        """
        if not missing:
            return DELIVERED
        if self.requeue is None:
            return replies.STORAGE_FAILED
        retry = _to_retry(recipient, missing, boxes)
        rest = dataclasses.replace(envelope, recipients=retry, message_id="")
        try:
            queue_id = await self.requeue(rest, content)
        except Exception:
            log.failure(
                "{message_id}: could not queue the missing copies",
                message_id=envelope.message_id,
            )
            return replies.STORAGE_FAILED
        return DELIVERED.with_text(
            f"{DELIVERED.text}; {len(missing)} more queued as {queue_id}"
        )
