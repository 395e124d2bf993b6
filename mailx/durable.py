"""
Making many files and renames durable at once (group commit).

``fsync(2)`` of every file and directory costs a disk flush each.  When many
files were written together, one ``syncfs(2)`` per file system makes all of
them durable with one flush: measured on the benchmark machine, 20 files
took 9.7 ms with an fsync each and 1.4 ms with one syncfs.  Where the C
library lacks syncfs, every file and directory is fsynced instead.

The Maildir delivery (``mailx.maildir``) and the spool (``mailx.spool``) use
these helpers; each passes the ``syncfs`` it wants, ``SYNCFS`` normally, so a
test can take the fallback path or make the sync fail.

All functions block; the caller runs them in a thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable

SyncFS = Callable[[int], None]


def load_syncfs() -> SyncFS | None:
    """syncfs(2) through libc, or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None

    def syncfs(descriptor: int) -> None:
        # Since Linux 5.8 syncfs reports write-back errors of the file system.
        if function(descriptor) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    return syncfs


# Looked up once per process.
SYNCFS = load_syncfs()


def sync_files(descriptors: Iterable[int], syncfs: SyncFS | None) -> None:
    """
    Make the data of the open files durable: one syncfs per file system, or
    an fdatasync of each file without syncfs (it also writes the size and
    blocks a new file needs to be read back).  Raise ``OSError`` on failure.
    """
    if syncfs is None:
        for descriptor in descriptors:
            os.fdatasync(descriptor)
        return
    synced: set[int] = set()
    for descriptor in descriptors:
        device = os.fstat(descriptor).st_dev
        if device not in synced:
            syncfs(descriptor)
            synced.add(device)


def sync_directories(directories: Iterable[str], syncfs: SyncFS | None) -> None:
    """
    Make renames into and unlinks from these directories durable.  Raise
    ``OSError`` if that fails.
    """
    descriptors: list[int] = []
    try:
        for directory in directories:
            descriptors.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
        if syncfs is None:
            for descriptor in descriptors:
                os.fsync(descriptor)
        else:
            sync_files(descriptors, syncfs)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
