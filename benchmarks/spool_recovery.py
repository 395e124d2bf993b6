"""
Spool recovery at start-up (issue 4, measured for issue 7): how long mailx
takes to serve, and to have its whole queue scheduled, when it starts with
``--count`` (100,000) messages already in its spool, and its peak memory.

The spool is filled directly in mailx's own on-disk format: each message's
envelope is a ``QueuedMessage`` as JSON and both files go where
``SpoolStore`` puts them, content before envelope.  By default the files are
written without an fsync each and the file system is synced once at the end
(``--fsync`` takes ``SpoolStore``'s own write-and-commit path instead, which
is exact but about 100 times slower).

Deliveries go nowhere: the smarthost is a loopback port where nothing
listens, so every attempt fails at once with a temporary error and the
message is rescheduled; with ``--hold`` every message is on hold and no
attempt is made at all.  DNS is a loopback port where nothing answers.

Measured, from starting the process:

- serving: the first 220 greeting on mailx's SMTP port;
- scheduled: the spool's log line "recovered N queued messages", written
  once every message found is in the schedule (N is checked against the
  count);
- RSS peak (and PSS peak) of mailx until ``--observe`` seconds after that,
  while attempts run; and how many attempts were deferred in that time.

The files were just written, so the page cache is warm: this measures mailx,
not the disk.  Run it from the repository root:

    .venv/bin/python -m benchmarks.spool_recovery                 # 100,000
    .venv/bin/python -m benchmarks.spool_recovery --count 1000    # for CI
    .venv/bin/python -m benchmarks.spool_recovery --hold --json out.json

It exits 0 when mailx scheduled exactly the messages written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.procstat import MemorySampler
from benchmarks.servers import (
    DEFAULT_MAILX_COMMAND,
    CommandServer,
    ServerError,
    Target,
    make_mailx,
)
from mailx.address import Address
from mailx.queue import QueuedMessage, QueuedRecipient
from mailx.spool import SpoolStore, new_queue_id
from tests.peers.postfix import free_port, make_workdir

# Its own loopback addresses, apart from the other benchmarks'.
ADDRESS = "127.0.0.14"
# Where the smarthost is said to be: a port on which nothing listens.
DEAD_NEXT_HOP = "127.0.0.22"
RECIPIENT = Address("bench", "bench.test")
SENDER = Address("load", "client.test")
# Messages per commit (two directory fsyncs) with --fsync.
COMMIT_BATCH = 1000
POLL_INTERVAL = 0.02
# The spool's log line once recovery has put every message in the schedule.
RECOVERED = re.compile(r"recovered (\d+) queued messages")
# The mail log line of a failed, temporary attempt.
DEFERRED = re.compile(r"\bdeferred \w+ to=")


@dataclass
class RecoveryResult:
    """What starting on a full spool took; seconds from the process start."""

    count: int
    size: int
    hold: bool
    fill_seconds: float = 0.0
    serving_seconds: float = 0.0
    scheduled_seconds: float = 0.0
    recovered: int = 0
    observed_seconds: float = 0.0
    deferred: int = 0
    rss_peak_mib: float = 0.0
    pss_peak_mib: float = 0.0
    error: str = ""


def message_content(number: int, size: int) -> bytes:
    """A message of about ``size`` bytes with a Message-Id of its own."""
    header = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Subject: recovery {number}\r\nMessage-Id: <r{number}@client.test>\r\n\r\n"
    ).encode()
    line = b"Y" * 76 + b"\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


def queued_message(number: int, size: int, now: float, hold: bool) -> QueuedMessage:
    """The envelope of message ``number``, due now."""
    return QueuedMessage(
        message_id=new_queue_id(now + number * 1e-6),
        reverse_path=SENDER,
        recipients=[QueuedRecipient(RECIPIENT)],
        arrival=now,
        size=size,
        next_attempt=now,
        client_address="127.0.0.1",
        client_helo="client.test",
        hold=hold,
    )


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)


def fill_spool(directory: Path, count: int, size: int, hold: bool, fsync: bool) -> int:
    """Put ``count`` messages into the spool; return how many it holds."""
    store = SpoolStore(str(directory))
    store.prepare()
    now = time.time()
    batch: list[str] = []
    for number in range(count):
        content = message_content(number, size)
        message = queued_message(number, len(content), now, hold)
        if fsync:
            store.write_temp(message, content)
            batch.append(message.message_id)
            if len(batch) == COMMIT_BATCH:
                store.commit(batch)
                batch = []
            continue
        # The commit order of SpoolStore: content first, the envelope last.
        _write(store.content_path(message.message_id), content)
        _write(store.envelope_path(message.message_id), message.to_json())
    if batch:
        store.commit(batch)
    if not fsync:
        os.sync()
    return len(store.ids())


def _log_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_scheduling(mailx: CommandServer, timeout: float) -> int | None:
    """Wait for the recovery line in mailx's log; the count it gives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = RECOVERED.search(_log_text(mailx.log_path))
        if found:
            return int(found[1])
        if not mailx.running():
            raise ServerError("mailx exited during recovery")
        time.sleep(POLL_INTERVAL)
    return None


def measure(options: argparse.Namespace, workdir: Path) -> RecoveryResult:
    """Fill the spool, start mailx on it, and time what it does."""
    result = RecoveryResult(options.count, options.size, options.hold)
    target = Target(ADDRESS, free_port(ADDRESS), str(RECIPIENT))
    dead = Target(DEAD_NEXT_HOP, free_port(DEAD_NEXT_HOP), str(RECIPIENT))
    mailx = make_mailx(workdir, target, options.mailx_command, dead)

    started = time.monotonic()
    written = fill_spool(
        workdir / "queue", options.count, options.size, options.hold, options.fsync
    )
    result.fill_seconds = time.monotonic() - started
    if written != options.count:
        result.error = f"the spool holds {written} messages, not {options.count}"
        return result

    try:
        started = time.monotonic()
        mailx.start()
        result.serving_seconds = time.monotonic() - started
        with MemorySampler(mailx.session()) as sampler:
            recovered = wait_for_scheduling(mailx, options.timeout)
            if recovered is None:
                result.error = f"not scheduled within {options.timeout:g} s"
                return result
            result.scheduled_seconds = time.monotonic() - started
            result.recovered = recovered
            time.sleep(options.observe)
            result.observed_seconds = options.observe
        result.rss_peak_mib = sampler.memory.rss_peak / 1024
        result.pss_peak_mib = sampler.memory.pss_peak / 1024
    except ServerError as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    finally:
        mailx.stop()

    result.deferred = len(DEFERRED.findall(_log_text(workdir / "mail.log")))
    if result.recovered != options.count:
        result.error = f"mailx recovered {result.recovered} of {options.count}"
    return result


def format_result(result: RecoveryResult) -> str:
    """The measurement as a few plain lines."""
    attempts = "held, no attempts" if result.hold else "next hop down"
    return "\n".join(
        [
            f"mailx starting with {result.count} queued messages of about "
            f"{result.size} bytes ({attempts}; spool filled in "
            f"{result.fill_seconds:.1f} s)",
            f"  serving (first 220) after  {result.serving_seconds:8.2f} s",
            f"  whole queue scheduled after {result.scheduled_seconds:7.2f} s "
            f"({result.recovered} recovered)",
            f"  attempts deferred in the {result.observed_seconds:g} s after: "
            f"{result.deferred}",
            f"  RSS peak {result.rss_peak_mib:.1f} MiB, PSS peak "
            f"{result.pss_peak_mib:.1f} MiB",
            f"  check: {'FAILED: ' + result.error if result.error else 'ok'}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.spool_recovery",
        description="Time mailx's start on a full spool.",
    )
    parser.add_argument("--count", type=int, default=100_000, help="messages")
    parser.add_argument("--size", type=int, default=2048, help="bytes each")
    parser.add_argument("--hold", action="store_true", help="queue them on hold")
    parser.add_argument(
        "--fsync", action="store_true", help="fill through SpoolStore's commit"
    )
    parser.add_argument(
        "--observe", type=float, default=5.0, help="seconds to watch after"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="bound on scheduling, seconds"
    )
    parser.add_argument("--mailx-command", default=DEFAULT_MAILX_COMMAND)
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    if options.count < 1:
        parser.error("--count must be at least 1")

    workdir = make_workdir(prefix="mailx-recovery-")
    try:
        result = measure(options, workdir)
    finally:
        if options.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_result(result))
    if options.json:
        Path(options.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 1 if result.error else 0


if __name__ == "__main__":
    sys.exit(main())
