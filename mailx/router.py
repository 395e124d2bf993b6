"""
Where an accepted message goes: the server's ``MessageSink``.

Recipients in local domains are written into their Maildirs; every other
recipient (backup MX and relay) is written into the spool, which passes the
message on.  The server says 250 only when both are durable.  When the
Maildirs cannot be written, the whole message goes into the spool, which
delivers the local copies later.  When the spool cannot take it the client
gets 451 4.3.0 and sends it again; if the local copies were already written
they then arrive twice, which is better than never.

``LocalFirstAgent`` is the spool's ``DeliveryAgent``: it delivers into local
Maildirs itself (delivery status notifications to local senders, mail for a
local domain queued while the server could not store it) and hands every
other domain to the outbound client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from mailx import maildir, replies
from mailx.address import Address
from mailx.batching import GroupJob, IORunner
from mailx.envelope import Envelope, Recipient, Route
from mailx.maillog import maillog
from mailx.replies import Reply
from mailx.spool import DeliveryAgent, RecipientResult

DELIVERED = Reply(250, "2.0.0", "Delivered to Maildir")


class Mailbox(Protocol):
    def maildir(self, root: str) -> str: ...


class Mailboxes(Protocol):
    def resolve(self, address: Address) -> Sequence[Mailbox] | None: ...


class Queue(Protocol):
    def enqueue(self, envelope: Envelope, content: bytes) -> Deferred[str]: ...


class GroupCommit(GroupJob[list[tuple[str, bytes]], None]):
    """
    Maildir deliveries in batches: each submission is the (Maildir, stored
    form) jobs of one message, and all the submissions waiting when a batch
    starts share one sync (``maildir.deliver_batch``).
    """

    def __init__(self, run_io: IORunner) -> None:
        super().__init__(run_io, _deliver_submissions)


def _deliver_submissions(
    submissions: list[list[tuple[str, bytes]]],
) -> list[OSError | None]:
    """One result a submission: None, or the first error among its jobs."""
    results = maildir.deliver_batch([job for jobs in submissions for job in jobs])
    outcomes: list[OSError | None] = []
    start = 0
    for jobs in submissions:
        mine = results[start : start + len(jobs)]
        start += len(jobs)
        errors = [result for result in mine if isinstance(result, OSError)]
        outcomes.append(errors[0] if errors else None)
    return outcomes


class LocalStore:
    """Writes messages into the Maildirs of local recipients."""

    def __init__(self, root: str, mailboxes: Mailboxes, commit: GroupCommit) -> None:
        self.root = root
        self.mailboxes = mailboxes
        self.commit = commit

    def deliver(
        self,
        message_id: str,
        reverse_path: Address | None,
        recipients: Iterable[Address],
        content: bytes,
    ) -> Deferred[None]:
        """Store one copy per distinct mailbox; fail if any write fails."""
        targets: dict[str, Address] = {}
        for recipient in recipients:
            for mailbox in self.mailboxes.resolve(recipient) or []:
                targets.setdefault(mailbox.maildir(self.root), recipient)
        return_path = "" if reverse_path is None else str(reverse_path)
        jobs = [
            (path, maildir.to_stored_form(content, return_path, str(recipient)))
            for path, recipient in targets.items()
        ]
        deferred = self.commit.submit(jobs)

        def logged(result: None) -> None:
            for path, recipient in targets.items():
                maillog.info(
                    "{message_id}: delivered to=<{recipient}> maildir={maildir}",
                    message_id=message_id,
                    recipient=str(recipient),
                    maildir=path,
                )

        deferred.addCallback(logged)
        return deferred


class Router:
    """The ``mailx.envelope.MessageSink`` of the server."""

    def __init__(self, local: LocalStore, queue: Queue | None) -> None:
        self.local = local
        self.queue = queue

    def receive(self, envelope: Envelope, content: bytes) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._receive(envelope, content))

    async def _receive(self, envelope: Envelope, content: bytes) -> Reply:
        """
        Local recipients first, straight into their Maildirs; then the others
        into the spool.  If the Maildirs cannot be written, every recipient
        goes into the spool instead, which retries the local ones later, so
        the client is never refused for a copy that was already queued.
        """
        local = [r for r in envelope.recipients if r.route is Route.LOCAL]
        others = [r for r in envelope.recipients if r.route is not Route.LOCAL]
        if others and self.queue is None:
            return replies.LOCAL_ERROR

        if local:
            addresses = [r.address for r in local]
            try:
                await self.local.deliver(
                    envelope.message_id, envelope.reverse_path, addresses, content
                )
            except OSError as error:
                if self.queue is None:
                    raise
                maillog.warn(
                    "{message_id}: maildir write failed ({error}); queued for retry",
                    message_id=envelope.message_id,
                    error=str(error),
                )
                others = envelope.recipients
        if others:
            assert self.queue is not None
            await self.queue.enqueue(_with_recipients(envelope, others), content)
        return replies.OK


def _with_recipients(envelope: Envelope, recipients: list[Recipient]) -> Envelope:
    return dataclasses.replace(envelope, recipients=list(recipients))


class LocalFirstAgent:
    """The spool's ``DeliveryAgent``: local domains here, others outbound."""

    def __init__(
        self,
        local: LocalStore,
        local_domains: Iterable[str],
        outbound: DeliveryAgent | None,
    ) -> None:
        self.local = local
        self.local_domains = frozenset(domain.lower() for domain in local_domains)
        self.outbound = outbound

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
        known = [r for r in recipients if self.local.mailboxes.resolve(r)]
        results = [
            RecipientResult(r, replies.NO_SUCH_USER, "local")
            for r in recipients
            if r not in known
        ]
        deferred = self.local.deliver(envelope.message_id, reverse_path, known, content)

        def stored(_: None) -> list[RecipientResult]:
            return results + [RecipientResult(r, DELIVERED, "local") for r in known]

        def failed(_: object) -> list[RecipientResult]:
            return results + [
                RecipientResult(r, replies.STORAGE_FAILED, "local") for r in known
            ]

        deferred.addCallbacks(stored, failed)
        return deferred  # type: ignore[return-value]
