"""
The Maildir delivery agent: a process of its own that writes the Maildirs of
local recipients for the server (``mailx.maildir_agent`` starts it and talks
to it).  This module is the agent's program and the format of what goes
between the two; it imports nothing of Twisted, so that the agent stays
small.

Why a process: writing Maildirs in a thread of the server, every system call
of that thread (create, write, close, rename: four a message) gave up
Python's global lock and had to take it back from the reactor thread, which
holds it nearly all the time under load.  Measured on the benchmark machine,
a batch spent about two thirds of its time in those hand-overs.  A process
has a lock of its own (benchmarks/README.md, "Fourth session").

The agent reads submissions on its standard input and answers each on its
standard output, in the order they came.  All the whole submissions one read
finds form one batch (``maildir.deliver_batch``), that is one group commit:
submissions that arrive while a batch is being made durable wait in the pipe
and go together in the next.

A submission, from the server::

    length of what follows      4 octets, big-endian
    submission number           8 octets
    job count                   4 octets
    per job: Maildir length (4 octets), content length (4 octets),
             the Maildir's path, the content (the stored form)

An answer, one line::

    {"id": NUMBER, "errors": [null or [ERRNO, "TEXT"], ... one a job]}

The agent ends when its input ends, and ignores SIGINT, SIGTERM and SIGHUP:
a Ctrl-C or a signal to the server's process group does not cut a batch
short, and it lives exactly as long as the server holds the pipe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
from collections.abc import Sequence

from mailx import maildir

# (Maildir, stored form)
Job = tuple[str, bytes]
Submission = tuple[int, list[Job]]

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">QI")
_JOB = struct.Struct(">II")
# Room for many messages in the pipe while a batch is made durable (the
# kernel caps it at /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_SIZE = 1 << 20
# The most one read takes from the pipe.
READ_SIZE = 1 << 20


class WireError(ValueError):
    """What came through the pipe is not a submission or an answer."""


def encode_submission(number: int, jobs: Sequence[Job]) -> bytes:
    parts = [_HEAD.pack(number, len(jobs))]
    for path, content in jobs:
        name = os.fsencode(path)
        parts += [_JOB.pack(len(name), len(content)), name, content]
    body = b"".join(parts)
    return _LENGTH.pack(len(body)) + body


def decode_submissions(buffer: bytes | bytearray) -> tuple[list[Submission], int]:
    """
    The whole submissions at the start of ``buffer``, and the octets they
    take; one not all there yet is left for the next read.
    """
    submissions: list[Submission] = []
    offset = 0
    with memoryview(buffer) as view:
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            start = offset + _LENGTH.size
            end = start + length
            if len(buffer) < end:
                break
            submissions.append(_submission(view[start:end]))
            offset = end
    return submissions, offset


def _submission(body: memoryview) -> Submission:
    try:
        number, count = _HEAD.unpack_from(body, 0)
        position = _HEAD.size
        jobs: list[Job] = []
        for _ in range(count):
            name_length, content_length = _JOB.unpack_from(body, position)
            position += _JOB.size
            name = os.fsdecode(bytes(body[position : position + name_length]))
            position += name_length
            content = bytes(body[position : position + content_length])
            position += content_length
            jobs.append((name, content))
    except struct.error as error:
        raise WireError(f"a submission is cut short: {error}") from None
    if position > len(body):
        raise WireError("a submission is cut short in its last job")
    if position < len(body):
        raise WireError("a submission is longer than its jobs")
    return number, jobs


def encode_answer(number: int, results: Sequence[str | OSError]) -> bytes:
    errors = [
        [result.errno or errno.EIO, result.strerror or str(result)]
        if isinstance(result, OSError)
        else None
        for result in results
    ]
    return json.dumps({"id": number, "errors": errors}).encode() + b"\n"


def decode_answer(line: bytes) -> tuple[int, list[OSError | None]]:
    try:
        answer = json.loads(line)
        number = answer["id"]
        errors = [
            None if error is None else OSError(int(error[0]), str(error[1]))
            for error in answer["errors"]
        ]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise WireError(f"not an answer: {line[:80]!r} ({error})") from None
    if not isinstance(number, int):
        raise WireError(f"not an answer: {line[:80]!r}")
    return number, errors


def serve(source: int = 0, sink: int = 1) -> None:
    """Read what is there, deliver it as one batch, answer; until input ends."""
    for descriptor in (source, sink):
        # Not a pipe, or a smaller one: smaller batches, no harm.
        with contextlib.suppress(OSError):
            fcntl.fcntl(descriptor, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    buffer = bytearray()
    while True:
        chunk = os.read(source, READ_SIZE)
        if not chunk:
            return
        buffer += chunk
        submissions, used = decode_submissions(buffer)
        del buffer[:used]
        if not submissions:
            continue
        results = maildir.deliver_batch(
            [job for _, jobs in submissions for job in jobs]
        )
        answers = []
        start = 0
        for number, jobs in submissions:
            answers.append(encode_answer(number, results[start : start + len(jobs)]))
            start += len(jobs)
        with memoryview(b"".join(answers)) as view:
            written = 0
            while written < len(view):
                try:
                    written += os.write(sink, view[written:])
                except BrokenPipeError:
                    return  # the server is gone; its pipe with it


def main() -> None:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    serve()


if __name__ == "__main__":
    main()
