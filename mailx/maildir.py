"""
Delivery into a Maildir, as the Maildir format (D. J. Bernstein, maildir(5))
describes it.

A message is written under a unique name into ``tmp/``, flushed and synced to
disk, then renamed into ``new/``, and ``new/`` itself is synced so the rename
survives a crash.  A reader (Dovecot, mutt) only ever sees complete messages
in ``new/``.  If any step fails, the file in ``tmp/`` is removed and the
``OSError`` is raised: the message was not delivered.

``deliver_batch`` is the group commit used by the server: it writes many
messages, then makes them all durable with one ``syncfs(2)`` per file system
instead of one ``fsync(2)`` per file and directory, and only then reports
them delivered.  Where syncfs is missing it falls back to fsync per file.

All functions block; the caller runs them in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Sequence

from mailx import durable

# maildir(5): a Maildir and its subdirectories are private to the user.
DIRECTORY_MODE = 0o700
MESSAGE_MODE = 0o600
SUBDIRECTORIES = ("tmp", "new", "cur")

# Part of the unique name: how many messages this process has delivered.
_counter = itertools.count(1)


def to_stored_form(content: bytes, return_path: str, delivered_to: str) -> bytes:
    """
    Prepend ``Return-Path`` (RFC 5321 section 4.4) and ``Delivered-To`` to a
    message as received (CRLF line endings) and turn CRLF into LF, the line
    ending of files on Unix that Maildir readers expect.

    ``return_path`` is the reverse path without brackets, "" for the null
    reverse path; ``delivered_to`` is the recipient address.
    """
    return stored_header(return_path, delivered_to) + stored_body(content)


def stored_header(return_path: str, delivered_to: str) -> bytes:
    """The fields ``to_stored_form`` puts before the message, alone."""
    for value in (return_path, delivered_to):
        if "\r" in value or "\n" in value:
            raise ValueError(f"line break in a header value: {value!r}")
    # RFC 5321 section 4.4: the final delivery adds Return-Path with the reverse
    # path of the MAIL command, in angle brackets.
    header = f"Return-Path: <{return_path}>\nDelivered-To: {delivered_to}\n"
    return header.encode("utf-8")


def stored_body(content: bytes) -> bytes:
    """The message as ``to_stored_form`` writes it after the fields."""
    return content.replace(b"\r\n", b"\n")


def unique_name(now: float | None = None, origin: tuple[int, str] | None = None) -> str:
    """
    A file name no other delivery to the same Maildir can choose.
    ``origin`` is ``name_origin()``, which a batch asks for once.
    """
    if now is None:
        now = time.time()
    pid, host = name_origin() if origin is None else origin
    seconds = int(now)
    microseconds = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{microseconds}P{pid}Q{next(_counter)}.{host}"


def name_origin() -> tuple[int, str]:
    """The process id and the host name that unique names carry."""
    # maildir(5): "/" and ":" in the host name are written as \057 and \072.
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return os.getpid(), host


def deliver(maildir: str, content: bytes) -> str:
    """
    Write ``content`` (already in stored form) as one new message in
    ``maildir``, creating the Maildir if missing; return the path in ``new/``.
    """
    _make_maildir(maildir)

    name = unique_name()
    temporary = os.path.join(maildir, "tmp", name)
    final = os.path.join(maildir, "new", name)
    try:
        _write_synced(temporary, content)
        os.rename(temporary, final)
    except OSError:
        _remove_quietly(temporary)
        raise

    try:
        _sync_directory(os.path.join(maildir, "new"))
    except OSError:
        # Not durable, so not delivered: the caller will try again, and must
        # not find a second copy here then.
        _remove_quietly(final)
        raise
    return final


def _make_maildir(maildir: str) -> None:
    parent = os.path.dirname(os.path.abspath(maildir))
    _make_parents(parent)
    created = _make_directory(maildir)
    for sub in SUBDIRECTORIES:
        created = _make_directory(os.path.join(maildir, sub)) or created

    if created:
        # New directories are entries of their parent; sync it so they last.
        _sync_directory(maildir)
        _sync_directory(parent)


def _make_parents(path: str) -> None:
    """
    Create ``path`` and any missing directory above it, each readable by the
    mailx user only, as at start (``os.makedirs`` would give the ones above
    the last the process's default mode).
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        above = os.path.dirname(path)
        if above == path:
            break
        path = above
    for directory in reversed(missing):
        _make_directory(directory)


def _make_directory(path: str) -> bool:
    """Create ``path`` unless it is a directory already; True if created."""
    try:
        os.mkdir(path, mode=DIRECTORY_MODE)
    except FileExistsError:
        # Another delivery may have made it; anything else in the way is wrong.
        if os.path.isdir(path):
            return False
        raise
    return True


def _write_synced(path: str, content: bytes) -> None:
    # O_EXCL: a name that already exists is an error, never overwritten.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    descriptor = os.open(path, flags, MESSAGE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_quietly(path: str) -> None:
    # Best effort while another error is on its way up: that one is the news.
    with contextlib.suppress(OSError):
        os.unlink(path)


# syncfs(2), or None where libc lacks it (tests replace it).
_syncfs = durable.SYNCFS
# Maildirs known to exist with tmp/, new/ and cur/: checked once a process.
_ready: set[str] = set()


# A message's stored form, whole or in pieces written one after the other:
# the copies of one message for several Maildirs share its body (a field of
# their own first), so that it is held once however many they are.
StoredForm = bytes | tuple[bytes, ...]


def deliver_batch(jobs: Sequence[tuple[str, StoredForm]]) -> list[str | OSError]:
    """
    Deliver many messages, each ``(maildir, stored form)``: write them into
    tmp/, make them durable, rename them into new/ and make the renames
    durable.  Return, for each job in order, its path in new/ or the error
    that kept it from being delivered (then no file of it is left).
    """
    results: list[str | OSError] = []
    written: list[tuple[int, str, str, int]] = []
    # Two system calls a batch, not a file: the I/O thread takes the GIL
    # back after each one, while the reactor thread holds it most of the time.
    origin = name_origin()
    for index, (maildir, content) in enumerate(jobs):
        try:
            if maildir not in _ready:
                _make_maildir(maildir)
                _ready.add(maildir)
            name = unique_name(origin=origin)
            temporary = os.path.join(maildir, "tmp", name)
            descriptor = _write_unsynced(temporary, content)
        except OSError as error:
            _ready.discard(maildir)
            results.append(error)
            continue
        results.append(os.path.join(maildir, "new", name))
        written.append((index, temporary, maildir, descriptor))

    failed = _sync_all([descriptor for _, _, _, descriptor in written])
    renamed: list[tuple[int, str]] = []
    for index, temporary, maildir, descriptor in written:
        os.close(descriptor)
        final = results[index]
        assert isinstance(final, str)
        try:
            if failed is not None:
                raise failed
            os.rename(temporary, final)
        except OSError as error:
            _remove_quietly(temporary)
            results[index] = error
            continue
        renamed.append((index, maildir))

    directories = sorted({os.path.join(maildir, "new") for _, maildir in renamed})
    failed = _sync_directories(directories)
    if failed is not None:
        # Not durable, so not delivered: the client will send it again.
        for index, _ in renamed:
            final = results[index]
            assert isinstance(final, str)
            _remove_quietly(final)
            results[index] = failed
    return results


def _write_unsynced(path: str, content: StoredForm) -> int:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MESSAGE_MODE)
    try:
        for piece in (content,) if isinstance(content, bytes) else content:
            view = memoryview(piece)
            while view:
                view = view[os.write(descriptor, view) :]
    except OSError:
        os.close(descriptor)
        _remove_quietly(path)
        raise
    return descriptor


def _sync_all(descriptors: list[int]) -> OSError | None:
    """Make the files' data durable: one syncfs per file system, or fsyncs."""
    try:
        durable.sync_files(descriptors, _syncfs)
    except OSError as error:
        return error
    return None


def _sync_directories(directories: list[str]) -> OSError | None:
    """Make renames into these directories durable."""
    try:
        durable.sync_directories(directories, _syncfs)
    except OSError as error:
        return error
    return None
