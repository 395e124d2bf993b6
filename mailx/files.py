"""
Reading the small files an operator edits (aliases, users, certificate and
key) on the reactor thread, at start and on SIGHUP.
"""

from __future__ import annotations

import errno
import os
import stat


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
