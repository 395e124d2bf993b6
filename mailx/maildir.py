"""
Delivery into a Maildir, as the Maildir format (D. J. Bernstein, maildir(5))
describes it.

A message is written under a unique name into ``tmp/``, flushed and synced to
disk, then renamed into ``new/``, and ``new/`` itself is synced so the rename
survives a crash.  A reader (Dovecot, mutt) only ever sees complete messages
in ``new/``.  If any step fails, the file in ``tmp/`` is removed and the
``OSError`` is raised: the message was not delivered.

Both functions block; the caller runs ``deliver`` in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time

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
    for value in (return_path, delivered_to):
        if "\r" in value or "\n" in value:
            raise ValueError(f"line break in a header value: {value!r}")

    # RFC 5321 section 4.4: the final delivery adds Return-Path with the reverse
    # path of the MAIL command, in angle brackets.
    header = f"Return-Path: <{return_path}>\nDelivered-To: {delivered_to}\n"
    return header.encode("utf-8") + content.replace(b"\r\n", b"\n")


def unique_name(now: float | None = None) -> str:
    """A file name no other delivery to the same Maildir can choose."""
    if now is None:
        now = time.time()
    seconds = int(now)
    microseconds = int((now - seconds) * 1_000_000)

    # maildir(5): "/" and ":" in the host name are written as \057 and \072.
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{seconds}.M{microseconds}P{os.getpid()}Q{next(_counter)}.{host}"


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
    os.makedirs(parent, exist_ok=True)
    created = _make_directory(maildir)
    for sub in SUBDIRECTORIES:
        created = _make_directory(os.path.join(maildir, sub)) or created

    if created:
        # New directories are entries of their parent; sync it so they last.
        _sync_directory(maildir)
        _sync_directory(parent)


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
