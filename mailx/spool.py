"""
The spool: a persistent, crash-safe queue of messages to pass on.

Theory of operation.  A committed message is one file, ``message/ID``: a
first line, the message's envelope (a ``QueuedMessage`` as JSON) and its
content as received.  It is written in ``free/`` and renamed into
``message/`` only once durable: the rename is the commit point, so a crash
leaves either a whole message or a file in ``free/``, which is never
delivered.  Later changes to the envelope go to ``envelope/ID``, which wins
over the one in the message file.

``enqueue`` joins a group commit: one worker call takes every message waiting
to be stored, writes each one's file without syncing it, makes them all
durable with one ``syncfs(2)`` (``mailx.durable``), renames every file into
``message/`` and syncs again.  Two syncs serve the whole batch, and the
ordering holds: a file is durable before it is renamed, and the rename is
durable before the Deferred fires, so no 250 goes out before its message is
durable.  Finished messages leave in the same batches: each file renamed
back into ``free/`` before the batch's last sync (one sync for a batch that
only removes).  The files in ``free/`` are
overwritten by later messages instead of being unlinked and created again
(``POOL_FILES``), which spares the file system an inode freed and one
allocated per message (issue 7).

A message's first attempt uses the envelope and content it was enqueued with,
kept in memory (within ``FRESH_CONTENT_LIMIT``), instead of reading them back.

Delivery calls the ``DeliveryAgent`` once per (message, recipient domain) with
every pending recipient of that domain, applies each recipient's reply, and
rewrites the envelope atomically.  Notifications (RFC 3464) are queued as
messages of their own with the null reverse path, and are never sent to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import socket
import stat
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorFromThreads,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailx import durable, replies
from mailx.address import Address, parse_mailbox
from mailx.batching import GroupJob, IORunner
from mailx.dsn import Action, RecipientReport, Report, build_report
from mailx.envelope import Body, Envelope, Route
from mailx.ids import new_message_id
from mailx.maillog import PrintableLogger, maillog
from mailx.queue import (
    MessageKind,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    RetryPolicy,
    Schedule,
)
from mailx.replies import Reply, ReplyError

_T = TypeVar("_T")

# The mail log: one line per business event, parsed by operators' tools.
log = PrintableLogger()

# Queue ids name files: letters and digits only, so no id can leave its
# directory.  64 is ample for mailx's own ids and any the server assigns.
QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")

# Messages in delivery at once.  A recovered queue of 100,000 messages must
# not open 100,000 connections; 20 is Postfix's default per-destination
# concurrency, used here as a bound for the whole spool.
MAX_PARALLEL = 20

# The content of fresh messages kept in memory for their first attempt, in
# all (our choice): 64 MiB holds a few thousand typical messages, enough for
# a burst of arrivals, and bounds the memory whatever their size.  Beyond it
# the oldest are dropped and read back from disk when tried.
FRESH_CONTENT_LIMIT = 64 * 1024 * 1024

# What opening a spool file says when something other than a regular file
# is in its place (a FIFO, a link, a directory).
_NOT_A_FILE = frozenset({errno.EINVAL, errno.ELOOP, errno.EISDIR})

# How long after a failed recovery of the queue it is tried again.
RECOVERY_RETRY = 60.0

# How long the start waits to learn whether a control socket left on disk
# still has a server behind it.
CONTROL_PROBE_TIMEOUT = 1.0

# Worker threads for spool I/O: enough for several sessions' fsyncs to
# overlap, few enough that a burst of mail cannot start unbounded threads.
IO_THREADS = 8

# Postfix-like defaults (minimal_backoff_time, maximal_backoff_time,
# maximal_queue_lifetime, delay_warning_time): 5 minutes, about an hour,
# 5 days (RFC 5321 section 4.5.4.1 asks for at least 4 to 5), 4 hours.
DEFAULT_MIN_RETRY = 300.0
DEFAULT_MAX_RETRY = 4000.0
DEFAULT_LIFETIME = 5 * 86400.0
DEFAULT_DELAY_WARNING = 4 * 3600.0


@dataclass(frozen=True)
class RecipientResult:
    """The outcome of a delivery attempt for one recipient."""

    recipient: Address
    reply: Reply
    # The host or address the reply came from; "" when none answered.
    next_hop: str = ""


class DeliveryAgent(Protocol):
    """Passes a message on to the next hop of one recipient domain."""

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        """
        Try to deliver ``content`` to ``recipients`` (all in ``domain``).
        Every recipient gets a reply: 2xx delivered, 4xx temporary, 5xx
        permanent.  It never fails for delivery problems.
        """


class UnknownMessage(KeyError):
    """No message with this queue id is in the spool."""


class MessageGone(UnknownMessage):
    """The message left the queue during the attempt a command waited for."""


class MessageHeld(Exception):
    """The message is on hold; release it first."""


def _write_all(fd: int, parts: Sequence[bytes]) -> int:
    """Write ``parts`` one after the other from the start of ``fd``."""
    offset = 0
    for part in parts:
        view = memoryview(part)
        while view:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]
    return offset


def _open_spool_file(
    path: str, flags: int, mode: int = 0o600
) -> tuple[int, os.stat_result]:
    """
    Open a file of the spool: a regular file, never through a symbolic link
    and never waiting on a FIFO someone left in its place (OSError instead).
    Return the descriptor and the file's status.
    """
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    descriptor = os.open(path, flags, mode)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, info


def _read_spool_file(path: str, limit: int = -1) -> tuple[bytes, int]:
    """
    The first ``limit`` octets (all if -1) of a spool file, and its size.
    """
    descriptor, info = _open_spool_file(path, os.O_RDONLY)
    size = info.st_size
    try:
        wanted = size if limit < 0 else min(limit, size)
        chunks = []
        while wanted > 0 and (chunk := os.read(descriptor, wanted)):
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks), size
    finally:
        os.close(descriptor)


def _write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, flushed and fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)


# A message file begins with this line, which gives the length of the
# envelope (JSON) that follows it; the message content follows the envelope
# to the end of the file.
MESSAGE_MAGIC = b"mailx-spool 2 "
# The longest first line read back: the magic, a length and the newline.
MESSAGE_HEAD_MAX = 64


def message_head(envelope_json: bytes) -> bytes:
    """The first line and envelope of a message file."""
    return MESSAGE_MAGIC + b"%d\n" % len(envelope_json) + envelope_json


def _parse_head(data: bytes) -> tuple[int, int]:
    """
    Where the envelope of a message file starts and ends, from the file's
    first octets.  ValueError if they are not a message file's.
    """
    end = data.find(b"\n", 0, MESSAGE_HEAD_MAX)
    if end < 0 or not data.startswith(MESSAGE_MAGIC):
        raise ValueError("not a mailx spool message file")
    length = data[len(MESSAGE_MAGIC) : end]
    if not length.isdigit():
        raise ValueError("not a mailx spool message file")
    return end + 1, end + 1 + int(length)


# Removed message files kept for reuse (issue 7).  Creating a file and
# unlinking one each allocate or free an inode, and on ext4 both wait for
# the journal commit that the last sync started (130 to 210 us each under
# load, against 8 us for a rename); overwriting a kept file and renaming it
# does neither.  At most POOL_FILES are kept, none larger than
# POOL_FILE_LIMIT octets, so the pool holds at most 16 MiB of disk.
POOL_FILES = 256
POOL_FILE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class StoreNew:
    """
    A change to the spool: a new message to store, its envelope as the JSON
    written (``QueuedMessage.to_json``).  The spool agent writes it as it
    came, not parsed and made again (issue 7).
    """

    message_id: str
    envelope: bytes
    content: bytes

    @classmethod
    def of(cls, message: QueuedMessage, content: bytes) -> StoreNew:
        return cls(message.message_id, message.to_json(), content)


@dataclass(frozen=True)
class Remove:
    """
    A change to the spool: a finished message to remove.  Its file is kept
    for reuse unless ``reuse`` is False (an operator's delete: what is
    deleted leaves the disk).  ``leftovers`` False says that no rewritten
    envelope or content file of an earlier version can be left to remove
    (a message delivered at its first attempt, from memory): two unlinks
    that fail are saved a message (issue 7).
    """

    message_id: str
    reuse: bool = True
    leftovers: bool = True


SpoolChange = StoreNew | Remove


class SpoolChanges(Protocol):
    """
    Applies changes in batches (``SpoolStore.apply``): a ``GroupJob`` in
    this process, or the spool agent (``mailx.agentprocess.SpoolAgent``).
    """

    def submit(self, item: SpoolChange) -> Deferred[bool | None]: ...

    def drained(self) -> Deferred[None]: ...


@dataclass(frozen=True)
class Recovered:
    """One message found on disk at start: what scheduling needs."""

    message_id: str
    next_attempt: float
    hold: bool
    arrival: float


class SpoolStore:
    """
    The spool directory.  Every method blocks on the file system: the
    ``Spool`` runs them in worker threads.  ``fault_hook`` is called with a
    point's name before and after each step that matters to crash safety, so
    a test can kill the process there.  ``syncfs`` is ``durable.SYNCFS``
    unless a test gives another (None takes the fsync-per-file path).

    Layout: ``message/ID`` is a committed message, one file: a first line
    (``message_head``), its envelope as written at acceptance, then its
    content.  ``envelope/ID``, when present, is a newer envelope written by
    ``rewrite`` and wins over the one in the message file.  ``free/`` holds
    files of removed messages kept for reuse, and new messages are written
    there; whatever is in ``free/`` is never delivered.  Spools written by
    earlier versions of mailx kept a message as ``envelope/ID`` and
    ``content/ID``; such messages are still read, delivered and removed.
    """

    def __init__(
        self,
        directory: str,
        fault_hook: Callable[[str], None] | None = None,
        syncfs: durable.SyncFS | None = durable.SYNCFS,
    ) -> None:
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.message = os.path.join(directory, "message")
        self.envelope = os.path.join(directory, "envelope")
        self.free = os.path.join(directory, "free")
        # The content of messages written by mailx before the message files.
        self.content = os.path.join(directory, "content")
        # Messages whose envelope cannot be read: kept for the operator.
        self.corrupt = os.path.join(directory, "corrupt")
        self._fault_hook = fault_hook
        self._syncfs = syncfs
        # What the last recovery could not remove or set aside, and the
        # messages it could not read for now: (name, why).
        self.problems: list[tuple[str, str]] = []
        self.unread: list[tuple[str, str]] = []
        # Names in free/ ready to be overwritten.  Only ``apply`` (one batch
        # at a time: the Spool's GroupJob) and a full recovery (before any
        # writer starts) change it.
        self._pool: deque[str] = deque()

    def _fault(self, point: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(point)

    def prepare(self) -> None:
        for path in (self.tmp, self.message, self.envelope, self.free):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def message_path(self, message_id: str) -> str:
        return os.path.join(self.message, message_id)

    def envelope_path(self, message_id: str) -> str:
        return os.path.join(self.envelope, message_id)

    def content_path(self, message_id: str) -> str:
        return os.path.join(self.content, message_id)

    def _temp(self, message_id: str, part: str) -> str:
        return os.path.join(self.tmp, f"{message_id}.{part}")

    def store_new(
        self, messages: Sequence[tuple[QueuedMessage, bytes]]
    ) -> list[OSError | None]:
        """
        Store new messages as one group commit (``apply``).  Return, per
        message in order, the error that kept it from being written, or
        None.  A failure of the commit itself raises, and no message of the
        batch counts as stored (``discard`` cleans up after it).
        """
        results = self.apply(
            [StoreNew.of(message, content) for message, content in messages]
        )
        return [result for result in results if not isinstance(result, bool)]

    def apply(self, changes: Sequence[SpoolChange]) -> list[OSError | bool | None]:
        """
        Make a batch of changes durable together: new messages stored and
        finished ones removed, with two syncs for the whole batch (one when
        it only removes).  New messages' files are written in ``free/`` and
        synced, then renamed into ``message/``; finished messages' files are
        renamed back into ``free/`` (or, for a message of an earlier
        version, its envelope unlinked); one sync makes every rename
        durable.  A file is renamed into ``message/`` only after its content
        is durable, so ``message/`` never names a file with another
        message's octets in it, or half of this one's.  Then the newer
        envelopes and old content files of removed messages go, which
        recovery removes if a crash leaves them.

        Return, per change in order: for a new message None, or the error
        that kept it from being written; for a removal whether the message
        was there.  A failure of a sync raises: no change of the batch
        counts as done (``discard`` cleans up after a new message).
        """
        results: list[OSError | bool | None] = [None] * len(changes)
        stores = [i for i, change in enumerate(changes) if isinstance(change, StoreNew)]
        removals = [
            (i, change)
            for i, change in enumerate(changes)
            if isinstance(change, Remove)
        ]
        if removals:
            self._fault("remove")
        # (index, message id, its file's name in free/) of the files written.
        written: list[tuple[int, str, str]] = []
        for i in stores:
            change = changes[i]
            assert isinstance(change, StoreNew)
            try:
                slot = self.write_free(
                    change.message_id, change.envelope, change.content
                )
            except OSError as error:
                results[i] = error
            else:
                written.append((i, change.message_id, slot))
        if stores:
            self._fault("written")
        try:
            taken = self._commit(written, removals, results)
        except OSError:
            # Nothing of the batch counts as done; the files written for it
            # must not stay in free/ outside the pool (discard removes what
            # reached message/).
            for _, _, slot in written:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.free, slot))
            raise
        # Past the commit point: a failure to tidy up is no failure of the
        # batch (recovery removes what is left).
        for i, removal in removals:
            if i in taken:
                results[i] = bool(taken[i])
                with contextlib.suppress(OSError):
                    self._tidy_up(removal, taken[i])
        return results

    def _tidy_up(self, removal: Remove, taken: str) -> None:
        """After a removal is durable: its file kept or unlinked, leftovers gone."""
        if taken == "message":
            if removal.reuse:
                self._keep(removal.message_id)
            else:
                os.unlink(os.path.join(self.free, removal.message_id))
        if taken == "envelope" or (taken and removal.leftovers):
            for path in (
                self.envelope_path(removal.message_id),
                self.content_path(removal.message_id),
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _commit(
        self,
        written: list[tuple[int, str, str]],
        removals: list[tuple[int, Remove]],
        results: list[OSError | bool | None],
    ) -> dict[int, str]:
        """
        The syncs and renames of ``apply``.  A rename that fails fails its
        own change only, its error in ``results`` (a full disk can refuse a
        rename for want of a directory entry); so does the first sync, for
        the new messages; the last sync raises if it fails.
        Return what ``_take_out`` did for each removal, by index.
        """
        taken: dict[int, str] = {}
        touched: list[str] = []
        if written and self._syncfs is not None:
            try:
                # One syncfs of the file system covers every file written.
                durable.sync_directories([self.free], self._syncfs)
            except OSError as error:
                # The new messages are not durable, so not stored; the
                # removals (of messages delivered already) go on.
                for i, _, slot in written:
                    results[i] = error
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.free, slot))
                written = []
        if written:
            self._fault("synced")
            for i, message_id, slot in written:
                try:
                    os.replace(
                        os.path.join(self.free, slot), self.message_path(message_id)
                    )
                except OSError as error:
                    results[i] = error
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.free, slot))
            self._fault("renamed")
            touched += [self.message, self.free]
        for i, removal in removals:
            try:
                found = self._take_out(removal.message_id)
            except OSError as error:
                results[i] = error
                continue
            taken[i] = found
            if found in ("message", "unlinked") and self.message not in touched:
                touched += [self.message, self.free]
            elif found and self.envelope not in touched:
                # Only the directories changed: a queue that only an earlier
                # mailx has run on has no message/ or free/ yet.
                touched.append(self.envelope)
        if touched:
            durable.sync_directories(touched, self._syncfs)
        if written:
            self._fault("committed")
        if removals:
            self._fault("removed")
        return taken

    def _take_out(self, message_id: str) -> str:
        """
        Take a message out of the queue, not yet durably: its file renamed
        into ``free/`` ("message") or, if that fails, unlinked ("unlinked"),
        or the envelope of a message of an earlier version unlinked
        ("envelope"); "" if it was not there.
        """
        try:
            os.replace(
                self.message_path(message_id), os.path.join(self.free, message_id)
            )
        except FileNotFoundError:
            pass
        except OSError:
            # A full disk can refuse the new entry in free/: the file is
            # unlinked instead, which it cannot refuse (OSError if it does).
            os.unlink(self.message_path(message_id))
            return "unlinked"
        else:
            return "message"
        try:
            os.unlink(self.envelope_path(message_id))
        except FileNotFoundError:
            return ""
        return "envelope"

    def write_free(self, message_id: str, envelope: bytes, content: bytes) -> str:
        """
        Write a new message's file in ``free/``, not yet synced: a kept file
        overwritten, or a new one.  Return its name there.
        """
        try:
            slot = self._pool.pop()
        except IndexError:
            slot = message_id
        path = os.path.join(self.free, slot)
        try:
            fd, info = _open_spool_file(path, os.O_WRONLY | os.O_CREAT)
            try:
                size = _write_all(fd, [message_head(envelope), content])
                # A kept file longer than this message is cut to its length.
                if info.st_size > size:
                    os.ftruncate(fd, size)
                if info.st_mode & 0o7777 != 0o600:
                    # A file someone left in free/ gets the spool's mode.
                    os.fchmod(fd, 0o600)
                if self._syncfs is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            # Best effort: the write error is the news, not the clean-up.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return slot

    def discard(self, message_id: str) -> None:
        """Remove whatever a failed enqueue left of a message."""
        for path in (
            self.message_path(message_id),
            self.envelope_path(message_id),
            self.content_path(message_id),
            os.path.join(self.free, message_id),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _read_message_file(self, message_id: str, whole: bool) -> tuple[bytes, bytes]:
        """
        The envelope in a message file and, if ``whole``, its content.
        ValueError if the file is not a whole message file.
        """
        path = self.message_path(message_id)
        data, size = _read_spool_file(path, -1 if whole else 4096)
        start, end = _parse_head(data)
        # Checked before reading on: the first line's length is not trusted.
        if end > size:
            raise ValueError(f"message file {message_id} is cut short")
        if end > len(data):
            data, _ = _read_spool_file(path, end)
        return data[start:end], data[end:] if whole else b""

    def _file_message(
        self, message_id: str, whole: bool
    ) -> tuple[QueuedMessage, bytes]:
        """
        The envelope written in a message file and, if ``whole``, its
        content.  FileNotFoundError if the file is gone, or holds another
        message: it left the queue and its file was reused meanwhile.
        """
        envelope, content = self._read_message_file(message_id, whole)
        message = QueuedMessage.from_json(envelope)
        if message.message_id != message_id:
            raise FileNotFoundError(errno.ENOENT, "left the queue", message_id)
        return message, content

    def _read_override(self, message_id: str) -> QueuedMessage | None:
        try:
            data, _ = _read_spool_file(self.envelope_path(message_id))
        except FileNotFoundError:
            return None
        return QueuedMessage.from_json(data)

    def load(self, message_id: str) -> QueuedMessage:
        message = self._read_override(message_id)
        if message is not None:
            return message
        return self._file_message(message_id, whole=False)[0]

    def read_content(self, message_id: str) -> bytes:
        try:
            return self._file_message(message_id, whole=True)[1]
        except FileNotFoundError:
            if os.path.lexists(self.message_path(message_id)):
                raise
        return _read_spool_file(self.content_path(message_id))[0]

    def load_with_content(self, message_id: str) -> tuple[QueuedMessage, bytes]:
        """
        A message's envelope and content.  ValueError if they cannot be read
        or the content is not as long as it was when accepted.
        """
        override = self._read_override(message_id)
        try:
            written, content = self._file_message(message_id, whole=True)
        except FileNotFoundError:
            if override is None or os.path.lexists(self.message_path(message_id)):
                raise
            content, _ = _read_spool_file(self.content_path(message_id))
            message = override
        else:
            message = override or written
        if len(content) != message.size:
            raise ValueError(f"message {message_id} has {len(content)} octets")
        return message, content

    def rewrite(self, message: QueuedMessage) -> None:
        """Replace a message's envelope atomically and durably."""
        temp = self._temp(message.message_id, "rewrite")
        try:
            _write_synced(temp, message.to_json())
        except OSError:
            # A full disk, say: no empty file is left behind in tmp/.
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._fault("rewrite")
        os.replace(temp, self.envelope_path(message.message_id))
        durable.sync_directories([self.envelope], None)
        self._fault("rewritten")

    def remove(self, message_id: str) -> bool:
        """
        Remove a message for good, its file not kept for reuse (``mailx
        queue delete``); False if it was not there.
        """
        return self.apply([Remove(message_id, reuse=False)])[0] is True

    def remove_batch(self, message_ids: Sequence[str]) -> list[bool]:
        """
        Remove messages as one batch (``apply``).  Return, per message in
        order, False if it was not there.
        """
        return [bool(found) for found in self.apply([Remove(i) for i in message_ids])]

    def _keep(self, name: str) -> None:
        """Keep the file ``free/name`` for reuse, or unlink it."""
        path = os.path.join(self.free, name)
        try:
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                # Not ours, and never a message: left for the operator.
                return
            if (
                stat.S_ISREG(info.st_mode)
                # A file linked elsewhere too (a snapshot made with cp -al)
                # must not be written over.
                and info.st_nlink == 1
                and len(self._pool) < POOL_FILES
                and info.st_size <= POOL_FILE_LIMIT
            ):
                self._pool.append(name)
                return
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _names(self, directory: str) -> set[str]:
        try:
            return {
                entry.name
                for entry in os.scandir(directory)
                if QUEUE_ID.fullmatch(entry.name)
            }
        except FileNotFoundError:
            return set()

    def ids(self) -> list[str]:
        """The ids of every committed message, in arrival order of the id."""
        old = self._names(self.envelope) & self._names(self.content)
        return sorted(self._names(self.message) | old)

    def recover(
        self, full: bool = True, skip: frozenset[str] = frozenset()
    ) -> tuple[list[Recovered], list[str]]:
        """
        Remove what a crash left half written and list every whole message.
        Only envelopes are read.  Returns the messages and the names of the
        files removed; what could not be removed or set aside is in
        ``problems`` (name, reason) and is not delivered.  One entry never
        stops the recovery of the others; a directory that cannot be read
        does (OSError).

        A message that cannot be read for a reason that may pass (EMFILE,
        EIO, EACCES: anything but a damaged file or something other than a
        file in its place) is left where it is and named in ``unread``.

        Not ``full``, it only lists the messages (setting aside damaged
        ones), leaving out those in ``skip``: it may then run while messages
        are stored and removed, since it leaves tmp/, free/ and the pool
        alone (a retry after a failed recovery, or of what it could not
        read).
        """
        removed: list[str] = []
        self.problems = []
        self.unread = []
        if full:
            self._sweep(removed)
        messages = self._names(self.message)
        envelopes = self._names(self.envelope)
        contents = self._names(self.content)
        if full:
            self._remove_orphans(messages, envelopes, contents, removed)

        found = []
        for name in sorted((messages | (envelopes & contents)) - skip):
            try:
                message = self._read_override(name)
                if name in messages:
                    # Read even when a newer envelope wins over it: a message
                    # file that cannot be read is never delivered.
                    written, _ = self._file_message(name, whole=False)
                    message = message or written
                if message is None:
                    raise ValueError(f"{name} has no envelope")
            except FileNotFoundError:
                if not (
                    full
                    and name in messages
                    and os.path.lexists(self.message_path(name))
                ):
                    # Delivered or deleted since it was listed.
                    continue
                # At a start nothing reuses a file meanwhile: a message file
                # whose envelope names another message is damaged (edited by
                # hand, say), and goes aside rather than stay unseen for ever.
                self._recover_step(
                    os.path.join("message", name), removed, self.set_aside, name
                )
                continue
            except Exception as error:
                if isinstance(error, OSError) and error.errno not in _NOT_A_FILE:
                    # It may pass (EMFILE, EIO, EACCES): tried again later.
                    self.unread.append((name, str(error)))
                    continue
                # Damaged, or not a file: whatever it is, it must not stop
                # the others.  Never deleted unread: its files go aside.
                self._recover_step(
                    os.path.join("message" if name in messages else "envelope", name),
                    removed,
                    self.set_aside,
                    name,
                )
                continue
            found.append(
                Recovered(name, message.next_attempt, message.hold, message.arrival)
            )
        return found, removed

    def _sweep(self, removed: list[str]) -> None:
        """Empty tmp/ and keep what free/ holds for reuse."""
        for entry in os.scandir(self.tmp):
            try:
                os.unlink(entry.path)
            except IsADirectoryError:
                # Not ours: the spool writes no directories there.
                continue
            except OSError as error:
                self.problems.append((os.path.join("tmp", entry.name), str(error)))
                continue
            removed.append(os.path.join("tmp", entry.name))
        self.fill_pool()

    def fill_pool(self) -> None:
        """
        Keep what free/ holds for reuse, up to ``POOL_FILES`` files; unlink
        the rest.  Files in free/ are never messages, whatever they hold.
        """
        self._pool.clear()
        for entry in os.scandir(self.free):
            with contextlib.suppress(OSError):
                self._keep(entry.name)

    def _remove_orphans(
        self,
        messages: set[str],
        envelopes: set[str],
        contents: set[str],
        removed: list[str],
    ) -> None:
        """Remove the files a crash left of messages not committed, or gone."""
        # A content file without its envelope was never committed.
        for name in sorted(contents - envelopes):
            self._recover_step(
                os.path.join("content", name),
                removed,
                os.unlink,
                self.content_path(name),
            )
        # An envelope without content cannot be delivered (or is the newer
        # envelope of a message whose removal a crash cut short): it goes to
        # tmp/, logged here and removed at the next start.
        for name in sorted(envelopes - contents - messages):
            self._recover_step(
                os.path.join("envelope", name),
                removed,
                os.replace,
                self.envelope_path(name),
                self._temp(name, "orphan"),
            )

    def _recover_step(
        self, name: str, removed: list[str], step: Callable[..., object], *args: str
    ) -> None:
        """Run one clean-up step of recovery; note ``name`` as done or not."""
        try:
            step(*args)
        except OSError as error:
            self.problems.append((name, str(error)))
        else:
            removed.append(name)

    def set_aside(self, name: str) -> str:
        """
        Move every file of a message to ``corrupt/``, out of the queue.
        Return the name of its main file: ``message/ID``, or ``envelope/ID``
        for a message of an earlier version.
        """
        os.makedirs(self.corrupt, mode=0o700, exist_ok=True)
        moved = []
        for kind, path in (
            ("message", self.message_path(name)),
            ("envelope", self.envelope_path(name)),
            ("content", self.content_path(name)),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, os.path.join(self.corrupt, f"{name}.{kind}"))
                moved.append(kind)
        return f"{moved[0] if moved else 'message'}/{name}"


def new_queue_id(now: float) -> str:
    """A queue id of the same form as the server's (mailx.ids)."""
    return new_message_id(now)


def _parse_copy_address(value: str | Address | None) -> Address | None:
    if not value or isinstance(value, Address):
        return value or None
    return parse_mailbox(value, utf8=True)


class Spool(Service):
    """The queue of messages to pass on, as a Twisted service."""

    def __init__(
        self,
        directory: str,
        reactor: IReactorTime,
        agent: DeliveryAgent,
        hostname: str,
        min_retry: float = DEFAULT_MIN_RETRY,
        max_retry: float = DEFAULT_MAX_RETRY,
        lifetime: float = DEFAULT_LIFETIME,
        delay_warning: float = DEFAULT_DELAY_WARNING,
        bounce_copy_to: str | Address | None = None,
        rng: random.Random | None = None,
        *,
        control_socket: str | None = None,
        run_io: IORunner | None = None,
        max_parallel: int = MAX_PARALLEL,
        fault_hook: Callable[[str], None] | None = None,
        changes: SpoolChanges | None = None,
    ) -> None:
        self._reactor = reactor
        self._agent = agent
        self.hostname = hostname
        self.policy = RetryPolicy(min_retry, max_retry, lifetime, delay_warning)
        self.bounce_copy_to = _parse_copy_address(bounce_copy_to)
        self._rng = rng or random.Random()
        self._control_socket = control_socket
        self._max_parallel = max_parallel
        self.store = SpoolStore(directory, fault_hook)
        self.store.prepare()

        self._pool: ThreadPool | None = None
        if run_io is None:
            self._pool = ThreadPool(0, IO_THREADS, name="mailx-spool")
            run_io = self._run_in_pool
        self._run_io: IORunner = run_io

        self.schedule = Schedule()
        # Messages in delivery, each with a Deferred that fires when done.
        self._in_flight: set[str] = set()
        # Who waits for an attempt under way to end (the stop), by message;
        # made only when asked, not a Deferred an attempt (issue 7).
        self._settle_waiters: dict[str, list[Deferred[None]]] = {}
        # Messages flushed while an attempt was under way: tried again after.
        self._flushed_in_flight: set[str] = set()
        self._turns = _Turns()
        # Messages whose newest state (recipients delivered, attempts, next
        # attempt) the disk refused: kept here until written, so that a
        # delivered recipient is not sent the message again at every retry.
        self._unsaved: dict[str, QueuedMessage] = {}
        # Messages whose failure report was queued and whose removal failed.
        self._reported: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._recovery_timer: IDelayedCall | None = None
        # New messages and removals share batches, and so their syncs: in
        # the spool agent's process (mailx.agents) or, without one, in a
        # thread of this one.
        self._changes: SpoolChanges = changes or GroupJob(
            self._run_io, self.store.apply
        )
        # Fresh messages not yet tried, with their content, oldest first.
        self._fresh: OrderedDict[str, tuple[QueuedMessage, bytes]] = OrderedDict()
        self._fresh_size = 0
        self._control_port: IListeningPort | None = None
        # Writers waiting for recovery to finish; None when none is running.
        self._recovering: list[Deferred[None]] | None = None
        # Fires with the number of messages found once recovery is done.
        self.recovery: Deferred[int] | None = None

    def _run_in_pool(self, work: Callable[[], _T]) -> Deferred[_T]:
        assert self._pool is not None
        threads = cast(IReactorFromThreads, self._reactor)
        return deferToThreadPool(threads, self._pool, work)

    def _now(self) -> float:
        return self._reactor.seconds()

    # Service life.

    def startService(self) -> None:
        # Twisted's Service is not annotated.
        super().startService()  # type: ignore[no-untyped-call]
        if self._pool is not None:
            self._pool.start()
        self.recovery = self._recover()
        if self._control_socket is not None:
            self._listen_control(self._control_socket)

    def _recover(self, full: bool = True) -> Deferred[int]:
        """
        Recover the queue on disk; fire with the number of messages found,
        or -1 if recovery failed (logged, and tried again after
        ``RECOVERY_RETRY`` seconds, new mail being queued meanwhile).
        """
        if not full:
            # A retry, with deliveries under way: it only lists messages.
            return Deferred.fromCoroutine(self._list_again())
        # Recovery removes half-written files: no new message is written
        # until it is done, or it could remove that message's files.
        self._recovering = []
        recovered = self._run_io(self.store.recover).addCallbacks(
            self._recovered, self._recovery_failed
        )
        return recovered.addBoth(self._release_writers)

    async def _list_again(self) -> int:
        # Messages scheduled or in delivery are known already.
        known = frozenset(self.schedule.ids()) | frozenset(self._in_flight)
        try:
            result = await self._run_io(
                lambda: self.store.recover(full=False, skip=known)
            )
        except Exception:
            return self._recovery_failed(Failure())
        return self._recovered(result)

    def _recovery_failed(self, failure: Failure) -> int:
        log.failure("queue recovery failed", failure)
        maillog.error(
            "could not recover the queue ({error}): the messages in it are not"
            " delivered until it is; trying again in {delay:.0f} s",
            error=str(failure.value),
            delay=RECOVERY_RETRY,
        )
        self._recovery_timer = self._reactor.callLater(
            RECOVERY_RETRY, self._retry_recovery
        )
        return -1

    def _retry_recovery(self) -> None:
        self._recovery_timer = None
        if self.running:
            self._recover(full=False)

    def _release_writers(self, result: _T) -> _T:
        waiting, self._recovering = self._recovering or [], None
        for writer in waiting:
            if isinstance(result, Failure):
                writer.errback(result)
            else:
                writer.callback(None)
        return result

    def _after_recovery(self) -> Deferred[None]:
        if self._recovering is None:
            return succeed(None)
        writer: Deferred[None] = Deferred()
        self._recovering.append(writer)
        return writer

    def _recovered(self, result: tuple[list[Recovered], list[str]]) -> int:
        found, removed = result
        for name in removed:
            # In the mail log: an unreadable message needs the operator.
            maillog.warn(
                "took {name} out of the queue (partial, orphaned or unreadable;"
                " unreadable ones are kept in corrupt/)",
                name=name,
            )
        for name, reason in self.store.problems:
            maillog.error(
                "could not take {name} out of the queue ({reason}): it is not"
                " delivered; remove or repair it by hand",
                name=name,
                reason=reason,
            )
        for name, reason in self.store.unread:
            maillog.error(
                "could not read queued message {name} ({reason}): trying again"
                " in {delay:.0f} s",
                name=name,
                reason=reason,
                delay=RECOVERY_RETRY,
            )
        if self.store.unread and self._recovery_timer is None:
            self._recovery_timer = self._reactor.callLater(
                RECOVERY_RETRY, self._retry_recovery
            )
        for item in found:
            # The lifetime applies to messages queued before it changed.
            when = min(item.next_attempt, self.policy.expires_at(item.arrival))
            self.schedule.put(item.message_id, when, item.hold)
        maillog.info("recovered {count} queued messages", count=len(found))
        self._run_due()
        return len(found)

    def _listen_control(self, path: str) -> None:
        from twisted.internet.endpoints import UNIXServerEndpoint

        from mailx.control import ControlFactory

        unix = cast(IReactorUNIX, self._reactor)
        clear_stale_socket(path)
        endpoint = UNIXServerEndpoint(unix, path, mode=0o600, wantPID=True)

        def listening(port: IListeningPort) -> None:
            self._control_port = port

        def failed(failure: Failure) -> None:
            log.failure("control socket {path} unavailable", failure, path=path)
            maillog.error(
                "control socket {path} unavailable: mailx queue commands cannot"
                " reach this server; see the twistd log",
                path=path,
            )

        listened = endpoint.listen(ControlFactory(self))
        listened.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._recovery_timer is not None and self._recovery_timer.active():
            self._recovery_timer.cancel()
        self._recovery_timer = None
        waits: list[Deferred[Any]] = []
        if self._control_port is not None:
            port, self._control_port = self._control_port, None
            waits.append(Deferred.fromCoroutine(self._stop_port(port)))
        # Attempts under way finish, so their envelopes are rewritten; the
        # outbound client's timeouts bound the wait.  Then the group commit
        # and the removals they started are let finish.
        waits += [self._settled(message_id) for message_id in self._in_flight]
        done: Deferred[Any] = gatherResults(waits, consumeErrors=True)
        done.addBoth(lambda _: self._changes.drained())
        return done.addBoth(self._stop_pool)

    async def _stop_port(self, port: IListeningPort) -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped

    def _stop_pool(self, _: object) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()

    # Accepting messages.

    def enqueue(self, envelope: Envelope, content: bytes) -> Deferred[str]:
        """
        Store a message for every recipient of ``envelope``; fire with its
        queue id once content and envelope are durable.  A storage failure
        fails the Deferred with a ``ReplyError`` carrying 451 4.3.0.
        """
        now = self._now()
        message_id = envelope.message_id
        if not QUEUE_ID.fullmatch(message_id):
            message_id = new_queue_id(now)
        message = QueuedMessage.from_envelope(message_id, envelope, len(content), now)
        return self._store_new(message, content)

    def _store_new(self, message: QueuedMessage, content: bytes) -> Deferred[str]:
        message_id = message.message_id
        change = StoreNew.of(message, content)
        if self._recovering is None:
            # At once, with no Deferred to wait on (issue 7); what it raises
            # fails the message as a failed batch would.
            try:
                committed = self._changes.submit(change)
            except Exception:
                committed = fail()
        else:
            committed = self._after_recovery().addCallback(
                lambda _: self._changes.submit(change)
            )

        def accepted(_: None) -> str:
            sender = message.reverse_path or ""
            maillog.info(
                "queued {message_id} from=<{sender}> nrcpt={nrcpt} size={size}",
                message_id=message_id,
                sender=str(sender),
                nrcpt=len(message.recipients),
                size=message.size,
            )
            self._keep_fresh(message, content)
            self.schedule.put(message_id, message.next_attempt)
            self._run_due()
            return message_id

        def failed(failure: Failure) -> str:
            log.failure("could not store {message_id}", failure, message_id=message_id)
            self._run_io(lambda: self.store.discard(message_id)).addErrback(
                lambda f: log.failure("could not clean up", f)
            )
            raise ReplyError(replies.STORAGE_FAILED) from failure.value

        return committed.addCallbacks(accepted, failed)

    def _keep_fresh(self, message: QueuedMessage, content: bytes) -> None:
        """Keep a just-stored message for its first attempt, within the bound."""
        if len(content) > FRESH_CONTENT_LIMIT:
            return
        self._fresh[message.message_id] = (message, content)
        self._fresh_size += len(content)
        while self._fresh_size > FRESH_CONTENT_LIMIT:
            _, (_, dropped) = self._fresh.popitem(last=False)
            self._fresh_size -= len(dropped)

    def _take_fresh(self, message_id: str) -> tuple[QueuedMessage, bytes] | None:
        """The kept envelope and content of a message, no longer kept."""
        fresh = self._fresh.pop(message_id, None)
        if fresh is not None:
            self._fresh_size -= len(fresh[1])
        return fresh

    # Scheduling.

    def _run_due(self) -> None:
        """Start every due attempt there is room for; wake up for the next."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.running:
            return

        now = self._now()
        while len(self._in_flight) < self._max_parallel:
            message_id = self.schedule.pop_due(now)
            if message_id is None:
                break
            if message_id not in self._in_flight:
                self._start_attempt(message_id)

        earliest = self.schedule.earliest()
        if earliest is not None and len(self._in_flight) < self._max_parallel:
            delay = max(0.0, earliest - now)
            self._timer = self._reactor.callLater(delay, self._run_due)

    def _locked(
        self, message_id: str, work: Callable[[], Deferred[_T]]
    ) -> Deferred[_T]:
        """Run ``work`` with no other operation on the message under way."""
        return self._turns.run(message_id, work)

    def _settled(self, message_id: str) -> Deferred[None]:
        """Fire once the attempt under way for ``message_id`` has ended."""
        waiter: Deferred[None] = Deferred()
        self._settle_waiters.setdefault(message_id, []).append(waiter)
        return waiter

    def _start_attempt(self, message_id: str) -> None:
        self._in_flight.add(message_id)

        def attempt() -> Deferred[None]:
            return Deferred.fromCoroutine(self._attempt(message_id))

        def done(result: Failure | None) -> None:
            self._in_flight.discard(message_id)
            for waiter in self._settle_waiters.pop(message_id, ()):
                waiter.callback(None)
            if isinstance(result, Failure):
                log.failure(
                    "attempt for {message_id} failed", result, message_id=message_id
                )
                self._retry_later(message_id)
            if message_id in self._flushed_in_flight:
                self._flushed_in_flight.discard(message_id)
                if message_id in self.schedule and not self.schedule.is_held(
                    message_id
                ):
                    self.schedule.put(message_id, self._now())
            self._run_due()

        self._locked(message_id, attempt).addBoth(done)

    def _retry_later(self, message_id: str) -> None:
        if message_id in self.schedule:
            when = self._now() + self.policy.min_retry
            self.schedule.put(message_id, when, self.schedule.is_held(message_id))

    # Delivery.

    async def _attempt(self, message_id: str) -> None:
        if message_id not in self.schedule:
            return
        # A fresh message's first attempt needs nothing from disk.
        fresh = self._take_fresh(message_id)
        from_disk = fresh is None
        try:
            if fresh is None:
                fresh = await self._run_io(
                    lambda: self.store.load_with_content(message_id)
                )
        except FileNotFoundError:
            settled = self._unsaved.get(message_id)
            if settled is not None and message_id in self._reported:
                # Its removal had gone through when the spool agent ended
                # (only the answer was lost): what is left of it goes now.
                await self._finish(settled, b"", leftovers=True)
                return
            log.warn("queued message {message_id} vanished", message_id=message_id)
            self.schedule.remove(message_id)
            self._unsaved.pop(message_id, None)
            self._reported.discard(message_id)
            return
        except (ValueError, OSError) as error:
            if isinstance(error, OSError) and error.errno not in _NOT_A_FILE:
                raise  # An I/O error may pass: the attempt is retried.
            # Damaged on disk since recovery read it, or something else put
            # in its place: retrying cannot mend it, so it goes where
            # recovery puts unreadable messages.
            name = await self._run_io(lambda: self.store.set_aside(message_id))
            self.schedule.remove(message_id)
            maillog.warn(
                "took {name} out of the queue (partial, orphaned or unreadable;"
                " unreadable ones are kept in corrupt/)",
                name=name,
            )
            return
        message, content = fresh
        # A state the disk refused last time is newer than the file's.
        message = self._unsaved.get(message_id, message)
        if message.hold:
            self.schedule.put(message_id, message.next_attempt, hold=True)
            return

        if not message.pending:
            # Settled already (its removal failed): only removed now.
            await self._after_attempt(message, content, leftovers=True)
            return
        started = self._now()
        # An attempt first, even past the lifetime (a message released from
        # hold, or the attempt at the moment of expiry): what it cannot
        # deliver then expires, as Postfix bounces a message only after an
        # attempt that failed.
        expired = self.policy.is_expired(message.arrival, started)
        try:
            await self._deliver(message, content, started)
        except Exception:
            if not expired:
                raise
            # A fault in the attempt must not keep an expired message queued
            # for ever: it is returned as it would have been.
            log.failure("attempt for {message_id} failed", message_id=message_id)
        if message.pending and expired:
            self._expire(message, self._now())
        # A fresh message was never rewritten: nothing but its file to remove.
        await self._after_attempt(message, content, leftovers=from_disk)

    def _expire(self, message: QueuedMessage, now: float) -> None:
        # RFC 5321 section 4.5.4.1: the message has been queued too long.
        maillog.info(
            "expired {message_id} from=<{sender}> nrcpt={nrcpt} age={age:.0f}",
            message_id=message.message_id,
            sender=str(message.reverse_path or ""),
            nrcpt=len(message.pending),
            age=now - message.arrival,
        )
        for recipient in message.pending:
            recipient.state = RecipientState.BOUNCED
            recipient.expired = True
            recipient.reply = recipient.reply or replies.DELIVERY_EXPIRED
            # Each recipient's outcome, as after an attempt: grepping for a
            # recipient finds its bounce, not only its deferrals.
            _log_outcome("bounced", message, recipient)

    async def _deliver(
        self, message: QueuedMessage, content: bytes, started: float
    ) -> None:
        groups = message.pending_by_domain()
        attempts = [
            self._deliver_group(message, domain, recipients, content)
            for domain, recipients in groups.items()
        ]
        if len(attempts) == 1:
            # One domain (the usual case): no DeferredList (issue 7).
            outcomes = [await attempts[0]]
        else:
            outcomes = await gatherResults(attempts)
        finished = self._now()
        message.attempts += 1
        message.last_attempt = finished
        delivered = []
        for recipients, results in zip(groups.values(), outcomes, strict=True):
            for recipient in recipients:
                self._apply(message, recipient, results, finished)
                if recipient.state is RecipientState.DELIVERED:
                    delivered.append(recipient)
        await self._notify_success(message, content, delivered, finished)

    def _deliver_group(
        self,
        message: QueuedMessage,
        domain: str,
        recipients: list[QueuedRecipient],
        content: bytes,
    ) -> Deferred[dict[Address, RecipientResult]]:
        # RFC 5321 section 3.3: one transaction carries every recipient that
        # shares the next hop; the agent groups a domain's recipients so.
        addresses = [r.address for r in recipients]
        try:
            attempt = self._agent.deliver(
                message.reverse_path,
                domain,
                addresses,
                content,
                message.to_envelope(recipients),
            )
        except Exception:
            attempt = fail()

        def by_address(
            results: list[RecipientResult],
        ) -> dict[Address, RecipientResult]:
            return {result.recipient: result for result in results}

        def temporary(failure: Failure) -> dict[Address, RecipientResult]:
            log.failure("delivery agent failed for {domain}", failure, domain=domain)
            return {a: RecipientResult(a, replies.LOCAL_ERROR) for a in addresses}

        return attempt.addCallbacks(by_address, temporary)

    def _apply(
        self,
        message: QueuedMessage,
        recipient: QueuedRecipient,
        results: dict[Address, RecipientResult],
        now: float,
    ) -> None:
        """Record one recipient's reply, and log it."""
        result = results.get(recipient.address)
        if result is None:
            # The agent owes every recipient a reply; a missing one is retried.
            result = RecipientResult(recipient.address, replies.LOCAL_ERROR)
        recipient.reply = result.reply
        recipient.next_hop = result.next_hop
        recipient.attempts += 1
        recipient.last_attempt = now

        code = result.reply.code
        if 200 <= code < 300:
            recipient.state = RecipientState.DELIVERED
            event = "delivered"
        elif code >= 500:
            recipient.state = RecipientState.BOUNCED
            event = "bounced"
        else:
            event = "deferred"
        _log_outcome(event, message, recipient)

    async def _after_attempt(
        self, message: QueuedMessage, content: bytes, leftovers: bool = True
    ) -> None:
        now = self._now()
        if not message.pending:
            await self._finish(message, content, leftovers)
            return

        if self.policy.warning_due(message, now):
            await self._notify_delay(message, content, now)
        message.next_attempt = self.policy.next_attempt(message, now, self._rng)
        await self._record(message)
        self.schedule.put(message.message_id, message.next_attempt, message.hold)

    async def _record(self, message: QueuedMessage) -> None:
        """
        Write a message's new envelope after an attempt.  If the disk refuses
        (a full file system), the state is kept in memory, used by the next
        attempt and written then: retries keep their schedule and do not
        go again to recipients already delivered.  Only a restart before
        it is written forgets it (RFC 5321 section 6.1's duplicate).
        """
        message_id = message.message_id
        try:
            await self._run_io(lambda: self.store.rewrite(message))
        except OSError as error:
            self._unsaved[message_id] = message
            maillog.error(
                "could not record the attempt for {message_id} ({error}); its"
                " state is kept in memory until it can be written",
                message_id=message_id,
                error=str(error),
            )
        else:
            if self._unsaved.pop(message_id, None) is not None:
                maillog.info(
                    "recorded the state of {message_id} kept in memory",
                    message_id=message_id,
                )

    async def _finish(
        self, message: QueuedMessage, content: bytes, leftovers: bool = True
    ) -> None:
        """Report the failed recipients, then take the message off the queue."""
        message_id = message.message_id
        try:
            if message_id not in self._reported:
                await self._notify_failure(message, content)
        except Exception:
            # Keep the message so the report is tried again; it stays durable.
            log.failure("could not queue a report for {id}", id=message.message_id)
            message.next_attempt = self._now() + self.policy.min_retry
            await self._record(message)
            self.schedule.put(message.message_id, message.next_attempt)
            return

        # The attempt, and its place among the max_parallel, lasts until the
        # removal is durable: so a crash can repeat at most max_parallel
        # deliveries (RFC 5321 section 6.1).  The removal joins a batch.
        try:
            await self._changes.submit(Remove(message_id, leftovers=leftovers))
        except Exception as error:
            # The spool agent ended, say.  Every recipient is settled and
            # reported: the next attempt only removes the message, it does
            # not deliver it or report on it again.
            self._unsaved[message_id] = message
            self._reported.add(message_id)
            message.next_attempt = self._now() + self.policy.min_retry
            self.schedule.put(message_id, message.next_attempt, message.hold)
            maillog.error(
                "could not remove {message_id} from the queue ({error}); tried"
                " again at its next attempt",
                message_id=message_id,
                error=str(error),
            )
            return
        self._unsaved.pop(message_id, None)
        self._reported.discard(message_id)
        self.schedule.remove(message_id)
        maillog.info("removed {message_id}", message_id=message.message_id)

    # Notifications.

    def _report_for(
        self, message: QueuedMessage, recipient: QueuedRecipient, action: Action
    ) -> RecipientReport:
        return RecipientReport(
            recipient=recipient.address,
            action=action,
            reply=recipient.reply,
            orcpt=recipient.orcpt,
            remote_mta=recipient.next_hop,
            last_attempt=recipient.last_attempt,
            will_retry_until=(
                self.policy.expires_at(message.arrival)
                if action is Action.DELAYED
                else None
            ),
            # RFC 3463 section 3.5: X.4.7, delivery time expired.
            status="5.4.7" if recipient.expired else None,
        )

    async def _notify_success(
        self,
        message: QueuedMessage,
        content: bytes,
        delivered: list[QueuedRecipient],
        now: float,
    ) -> None:
        # RFC 3461 section 4.1: NOTIFY=SUCCESS asks for a report on delivery.
        # Mail passed to another host is "relayed", the next hop reports on.
        items = [
            self._report_for(
                message,
                r,
                Action.DELIVERED
                if r.route in (Route.LOCAL, Route.MAILBOX)
                else Action.RELAYED,
            )
            for r in delivered
            if r.wants("SUCCESS")
        ]
        try:
            await self._send_report(message, content, items, now)
        except Exception as error:
            # Not kept for another try (the message is done); said where the
            # operator looks, the cause first (a full disk, say).
            cause = error.__cause__ if isinstance(error, ReplyError) else error
            maillog.error(
                "could not queue the success report for {message_id} ({error}):"
                " it is not sent",
                message_id=message.message_id,
                error=str(cause or error),
            )
            if not isinstance(error, ReplyError):
                log.failure("success report for {id} lost", id=message.message_id)

    async def _notify_delay(
        self, message: QueuedMessage, content: bytes, now: float
    ) -> None:
        items = [
            self._report_for(message, r, Action.DELAYED)
            for r in message.pending
            if r.wants("DELAY")
        ]
        try:
            await self._send_report(message, content, items, now)
        except Exception:
            log.failure("delay warning for {id} not queued", id=message.message_id)
            return
        message.delay_warned = True

    async def _notify_failure(self, message: QueuedMessage, content: bytes) -> None:
        # NOTIFY speaks for the sender; with a null reverse path there is no
        # sender to ask, and every failure counts for bounce_copy_to.
        items = [
            self._report_for(message, r, Action.FAILED)
            for r in message.in_state(RecipientState.BOUNCED)
            if message.reverse_path is None or r.wants("FAILURE")
        ]
        await self._send_report(message, content, items, self._now())

    async def _send_report(
        self,
        message: QueuedMessage,
        content: bytes,
        items: list[RecipientReport],
        now: float,
    ) -> None:
        """Queue one report on ``items``; never to the null reverse path."""
        if not items:
            return
        report = Report(
            self.hostname,
            message.message_id,
            message.arrival,
            now,
            items,
            message.ret,
            message.envid,
        )
        failed = any(item.action is Action.FAILED for item in items)
        if message.reverse_path is not None:
            await self._queue_report(
                message, report, content, message.reverse_path, MessageKind.DSN
            )
            return

        # RFC 3461 section 6.2: no report about a message with a null reverse
        # path.  A failure is logged, and copied once to bounce_copy_to.
        if not failed:
            return
        copy_to = self.bounce_copy_to
        if copy_to is None or message.kind is MessageKind.COPY:
            maillog.info(
                "dropped {message_id} reason={reason}",
                message_id=message.message_id,
                reason="undeliverable report",
            )
            return
        await self._queue_report(message, report, content, copy_to, MessageKind.COPY)

    async def _queue_report(
        self,
        message: QueuedMessage,
        report: Report,
        content: bytes,
        recipient: Address,
        kind: MessageKind,
    ) -> None:
        data = build_report(report, recipient, content)
        now = self._now()
        dsn_id = new_queue_id(now)
        dsn = QueuedMessage(
            message_id=dsn_id,
            reverse_path=None,
            recipients=[QueuedRecipient(recipient, notify=frozenset({"NEVER"}))],
            arrival=now,
            size=len(data),
            next_attempt=now,
            kind=kind,
            body=Body.SEVEN_BIT if data.isascii() else Body.EIGHT_BIT,
            smtputf8=recipient.is_utf8,
        )
        await self._store_new(dsn, data)
        actions = sorted({item.action.value for item in report.recipients})
        maillog.info(
            "notified {message_id} dsn={dsn_id} action={action} to=<{recipient}>",
            message_id=message.message_id,
            dsn_id=dsn_id,
            action=",".join(actions),
            recipient=str(recipient),
        )

    # Operator commands (the control channel and ``mailx queue``).

    def _known(self, message_id: str) -> None:
        if message_id not in self.schedule:
            raise UnknownMessage(message_id)

    def flush(self, message_id: str | None = None) -> None:
        """Make one message, or every message not on hold, due now."""
        now = self._now()
        if message_id is None:
            for each in self.schedule.ids():
                if not self.schedule.is_held(each):
                    self.schedule.put(each, now)
            self._flushed_in_flight |= set(self._in_flight)
        else:
            self._known(message_id)
            if self.schedule.is_held(message_id):
                raise MessageHeld(message_id)
            self.schedule.put(message_id, now)
            if message_id in self._in_flight:
                self._flushed_in_flight.add(message_id)
        self._run_due()

    def hold(self, message_id: str) -> Deferred[bool]:
        """
        Keep a message from delivery until it is released; fire with False
        when it was held already.
        """
        return self._set_hold(message_id, True)

    def release(self, message_id: str) -> Deferred[bool]:
        """
        Let a held message go, with an attempt at once; fire with False when
        it was not held.
        """
        return self._set_hold(message_id, False)

    def _known_after_wait(self, message_id: str, was_in_flight: bool) -> None:
        """After waiting for the message's lock: is it still queued?"""
        if message_id not in self.schedule and was_in_flight:
            raise MessageGone(message_id)
        self._known(message_id)

    def _set_hold(self, message_id: str, hold: bool) -> Deferred[bool]:
        was_in_flight = message_id in self._in_flight

        async def change() -> bool:
            self._known_after_wait(message_id, was_in_flight)
            if self.schedule.is_held(message_id) == hold:
                # Held already, or not held: nothing to write or to log.
                return False
            # The envelope on disk is the one to change from now on.
            self._take_fresh(message_id)
            unsaved = self._unsaved.get(message_id)
            if unsaved is not None:
                message = unsaved
            else:
                message = await self._run_io(lambda: self.store.load(message_id))
            before = (message.hold, message.next_attempt)
            message.hold = hold
            if not hold:
                message.next_attempt = self._now()
            try:
                await self._run_io(lambda: self.store.rewrite(message))
            except OSError:
                # Not held (or released) after all: the operator is told.
                message.hold, message.next_attempt = before
                raise
            self._unsaved.pop(message_id, None)
            self.schedule.put(message_id, message.next_attempt, hold)
            event = "held" if hold else "released"
            maillog.info(event + " {message_id}", message_id=message_id)
            self._run_due()
            return True

        return self._locked(message_id, lambda: Deferred.fromCoroutine(change()))

    def delete(self, message_id: str) -> Deferred[None]:
        """Take a message off the queue without any report."""

        was_in_flight = message_id in self._in_flight

        async def remove() -> None:
            self._known_after_wait(message_id, was_in_flight)
            self._take_fresh(message_id)
            await self._changes.submit(Remove(message_id, reuse=False))
            self._unsaved.pop(message_id, None)
            self._reported.discard(message_id)
            self.schedule.remove(message_id)
            maillog.info("deleted {message_id}", message_id=message_id)

        return self._locked(message_id, lambda: Deferred.fromCoroutine(remove()))


def _log_outcome(
    event: str, message: QueuedMessage, recipient: QueuedRecipient
) -> None:
    """A recipient's delivered, deferred or bounced line, with its last reply."""
    maillog.info(
        event + " {message_id} to=<{recipient}> relay={relay} "
        "attempts={attempts} reply={reply}",
        message_id=message.message_id,
        recipient=str(recipient.address),
        relay=recipient.next_hop or "none",
        attempts=recipient.attempts,
        reply=str(recipient.reply),
    )


class _Turns:
    """
    One operation at a time on each message (an attempt, a hold, a delete),
    the others waiting their turn in the order they came.  A message with
    nothing waiting costs no Deferred of its own; a ``DeferredLock`` per
    message made four, for every attempt (issue 7).
    """

    def __init__(self) -> None:
        # Message id -> the operations waiting for the one under way.
        self._waiting: dict[str, deque[Callable[[], None]]] = {}

    def run(self, key: str, work: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Run ``work`` once no earlier operation on ``key`` is under way."""
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = deque()
            return self._start(key, work)
        done: Deferred[_T] = Deferred()

        def start() -> None:
            self._start(key, work).chainDeferred(done)

        waiting.append(start)
        return done

    def _start(self, key: str, work: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        try:
            started = work()
        except Exception:
            started = fail()
        if not isinstance(started, Deferred):
            # Not a Deferred after all: its turn must still end.
            started = succeed(started)
        return started.addBoth(self._next, key)

    def _next(self, result: _T, key: str) -> _T:
        waiting = self._waiting[key]
        if waiting:
            waiting.popleft()()
        else:
            del self._waiting[key]
        return result


def clear_stale_socket(path: str) -> None:
    """
    Remove a UNIX socket (control or handoff), and its lock, that a process
    which ended left behind: nothing answers on it.  A lock can also name a
    process killed but not yet reaped (a zombie), which Twisted takes for
    alive.  Its lock may name a pid that a new
    process has since taken, which would keep the socket from being made
    again.  A socket that answers is left alone: another server uses it.
    """
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A live server with a full backlog must not stall this start.
    probe.settimeout(CONTROL_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        for stale in (path, path + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
    except OSError:
        # Not a socket, not ours to use, or busy: the listen says why.
        return
    finally:
        probe.close()


def synchronous_io(work: Callable[[], _T]) -> Deferred[_T]:
    """An ``IORunner`` that runs work at once, for tests and tools."""
    try:
        return succeed(work())
    except Exception:
        failed: Deferred[_T] = fail()
        return failed
