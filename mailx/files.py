"""
The files an operator names (aliases, users, certificate and key, the mail
log), opened on the reactor thread at start and on SIGHUP: regular files
only, and never a wait on a FIFO left in their place.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO


def read_regular_file(path: str) -> bytes:
    """
    The contents of the regular file at ``path``.  Anything else (a FIFO, a
    device, a directory) raises OSError at once: opening is non-blocking, so
    a FIFO left where a file was cannot stall the server waiting for a writer.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks = []
        while chunk := os.read(descriptor, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def open_regular_for_append(path: str) -> IO[str]:
    """
    The regular file at ``path``, created if missing, opened to append text
    (the mail log).  A FIFO or device in its place raises OSError at once:
    opening does not wait for a reader.
    """
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        # Said plainly: opening a FIFO with no reader would fail as "No such
        # device or address".
        if not stat.S_ISREG(existing.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
    descriptor = os.open(path, flags, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(descriptor, True)
        return open(descriptor, "a", encoding="utf-8", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise
