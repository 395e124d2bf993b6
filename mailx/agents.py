"""
The agents: processes of their own that do the server's blocking file work,
the Maildir delivery agent (writes local recipients' Maildirs) and the
spool agent (stores new messages in the spool and removes finished ones).
``mailx.agentprocess`` starts them and talks to them.  This module is their
program and the format of what goes between; it imports nothing of Twisted
at the start, so that the Maildir agent stays small.

Why processes: when this work ran in threads of the server, every system
call of such a thread (create, write, close, rename) gave up Python's global
lock and had to take it back from the reactor thread, which holds it nearly
all the time under load.  Measured on the benchmark machine, a Maildir
batch spent about two thirds of its time in those hand-overs, and the
server's process could not use more than one core in all.  A process has a
lock of its own (benchmarks/README.md, "Fourth session").

An agent reads submissions on its standard input and answers each on its
standard output, in the order they came.  All the whole submissions one read
finds form one batch: one group commit (``maildir.deliver_batch``,
``spool.SpoolStore.apply``), as submissions that arrive while a batch is
being made durable wait in the pipe and go together in the next.

A submission::

    length of what follows      8 octets, big-endian
    submission number           8 octets
    part count                  8 octets
    per part: its length (8 octets), its octets

The Maildir agent takes a message's copies (``maildir_parts``: where each
goes, then their pieces, a body shared by the copies sent once) and
answers ``{"id": N, "errors": [null or [ERRNO, "TEXT"], ...]}``, an error
a job.  The spool agent takes ``store``, the message id, its
envelope (JSON) and its content, or ``remove``, the message id, ``1`` to
keep the file for reuse (``0`` not) and ``0`` when no rewritten envelope or
earlier version's content file can be left (``1``, the default, to look);
it answers ``{"id": N, "result": R}``,
R null (stored), true or false (removed; false if it was not there) or
[ERRNO, "TEXT"] (this change failed), or ``{"id": N, "failed": [ERRNO,
"TEXT"]}`` when the whole batch failed.

An agent ends when its input ends, and ignores SIGINT, SIGTERM and SIGHUP: a
Ctrl-C or a signal to the server's process group does not cut a batch short,
and it lives exactly as long as the server holds the pipe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

Parts = list[bytes]
Submission = tuple[int, Parts]
# A batch of submissions in, one answer (a JSON object, without "id") each.
Handler = Callable[[list[Submission]], list[dict[str, Any]]]

# Lengths in 8 octets: a message's parts may pass 4 GiB in all.
_LENGTH = struct.Struct(">Q")
_HEAD = struct.Struct(">QQ")
# Room for many messages in the pipe while a batch is made durable (the
# kernel caps it at /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_SIZE = 1 << 20
# The most one read takes from the pipe.
READ_SIZE = 1 << 20


class WireError(ValueError):
    """What came through the pipe is not a submission or an answer."""


def encode_submission(number: int, parts: Sequence[bytes]) -> bytes:
    pieces = [_HEAD.pack(number, len(parts))]
    for part in parts:
        pieces += [_LENGTH.pack(len(part)), part]
    body = b"".join(pieces)
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
        parts: Parts = []
        for _ in range(count):
            (length,) = _LENGTH.unpack_from(body, position)
            position += _LENGTH.size
            parts.append(bytes(body[position : position + length]))
            position += length
    except struct.error as error:
        raise WireError(f"a submission is cut short: {error}") from None
    if position > len(body):
        raise WireError("a submission is cut short in its last part")
    if position < len(body):
        raise WireError("a submission is longer than its parts")
    return number, parts


# The spool agent's usual answers, written without json.dumps (issue 7).
_PLAIN_RESULTS = {None: b"null", True: b"true", False: b"false"}


def encode_answer(number: int, answer: dict[str, Any]) -> bytes:
    if len(answer) == 1 and "result" in answer:
        result = answer["result"]
        if result is None or result is True or result is False:
            return b'{"id": %d, "result": %s}\n' % (number, _PLAIN_RESULTS[result])
    return json.dumps({"id": number, **answer}).encode() + b"\n"


def decode_answer(line: bytes) -> tuple[int, dict[str, Any]]:
    try:
        answer = json.loads(line)
        number = answer["id"]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise WireError(f"not an answer: {line[:80]!r} ({error})") from None
    if not isinstance(number, int) or isinstance(number, bool):
        raise WireError(f"not an answer: {line[:80]!r}")
    return number, answer


def error_of(error: OSError) -> list[Any]:
    """An error as an answer carries it: errno, text and the file it names."""
    named = error.filename
    filename = os.fsdecode(named) if isinstance(named, (str, bytes)) else None
    return [error.errno or errno.EIO, error.strerror or str(error), filename]


def os_error(value: Any) -> OSError:
    """The error an answer carries, back as an ``OSError``; WireError if none."""
    try:
        number, text = int(value[0]), str(value[1])
        filename = value[2] if len(value) > 2 else None
    except (ValueError, TypeError, KeyError, IndexError):
        raise WireError(f"not an error: {value!r}") from None
    if isinstance(filename, str):
        return OSError(number, text, filename)
    return OSError(number, text)


def serve(handler: Handler, source: int = 0, sink: int = 1) -> None:
    """Read what is there, hand it over as one batch, answer; until input ends."""
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
        answers = handler(submissions)
        data = b"".join(
            encode_answer(number, answer)
            for (number, _), answer in zip(submissions, answers, strict=True)
        )
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                try:
                    written += os.write(sink, view[written:])
                except BrokenPipeError:
                    return  # the server is gone; its pipe with it


# The Maildir delivery agent.


def maildir_parts(jobs: Sequence[tuple[str, bytes | tuple[bytes, ...]]]) -> Parts:
    """
    A message's Maildir jobs, (Maildir, stored form), as a submission's
    parts: first where each job's pieces are (JSON: [[path, [piece, ...]],
    ...]), then the pieces, each once however many jobs share it.
    """
    pieces: Parts = []
    where: dict[int, int] = {}
    layout = []
    for path, content in jobs:
        references = []
        for piece in (content,) if isinstance(content, bytes) else content:
            if id(piece) not in where:
                where[id(piece)] = len(pieces)
                pieces.append(piece)
            references.append(where[id(piece)])
        # A path that is not UTF-8 goes as its surrogate escapes.
        layout.append([os.fsdecode(path), references])
    return [json.dumps(layout).encode(), *pieces]


def maildir_jobs(parts: Parts) -> list[tuple[str, tuple[bytes, ...]]]:
    """The jobs ``maildir_parts`` made parts of."""
    try:
        layout = json.loads(parts[0])
        return [
            (str(path), tuple(parts[1 + int(i)] for i in references))
            for path, references in layout
        ]
    except (ValueError, TypeError, IndexError) as error:
        raise WireError(f"not Maildir jobs: {error}") from None


def maildir_batch(submissions: list[Submission]) -> list[dict[str, Any]]:
    from mailx import maildir

    per_submission = [maildir_jobs(parts) for _, parts in submissions]
    results = maildir.deliver_batch([job for jobs in per_submission for job in jobs])
    answers = []
    start = 0
    for jobs in per_submission:
        mine = results[start : start + len(jobs)]
        start += len(jobs)
        answers.append(
            {
                "errors": [
                    error_of(result) if isinstance(result, OSError) else None
                    for result in mine
                ]
            }
        )
    return answers


# The spool agent.


def spool_handler(directory: str) -> Handler:
    """The spool agent's batches, for the spool in ``directory``."""
    from mailx.spool import QUEUE_ID, Remove, SpoolChange, SpoolStore, StoreNew

    store = SpoolStore(directory)
    # The files in free/ that can be reused.  A full recovery (the server's,
    # at start, before any change) fills the pool too; so does a new agent.
    store.fill_pool()

    def change_of(parts: Parts) -> SpoolChange:
        match parts:
            case [b"store", message_id, envelope, content]:
                # Written as it came (the server made it): not parsed, only
                # checked to name this message, as QueuedMessage.to_json
                # writes its id (a queue id needs no JSON escapes).
                name = message_id.decode("ascii", "replace")
                if not QUEUE_ID.fullmatch(name):
                    raise WireError(f"not a queue id: {name!r}")
                if b'"message_id": "%s"' % message_id not in envelope:
                    raise WireError("a new message whose envelope names another")
                return StoreNew(name, envelope, content)
            case [b"remove", message_id, reuse, *rest] if len(rest) <= 1:
                # The last part, leftovers, is "1" unless given.
                leftovers = rest[0] != b"0" if rest else True
                return Remove(message_id.decode("ascii"), reuse == b"1", leftovers)
        raise WireError(f"not a change to the spool: {parts[:1]!r}")

    def batch(submissions: list[Submission]) -> list[dict[str, Any]]:
        changes = [change_of(parts) for _, parts in submissions]
        try:
            results = store.apply(changes)
        except OSError as error:
            return [{"failed": error_of(error)} for _ in submissions]
        return [
            {"result": error_of(result) if isinstance(result, OSError) else result}
            for result in results
        ]

    return batch


def main(argv: Sequence[str] | None = None) -> None:
    """``maildir``, or ``spool DIRECTORY``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    match arguments:
        case ["maildir"]:
            serve(maildir_batch)
        case ["spool", directory]:
            serve(spool_handler(directory))
        case _:
            raise SystemExit(f"usage: maildir | spool DIRECTORY, not {arguments!r}")


if __name__ == "__main__":
    main()
