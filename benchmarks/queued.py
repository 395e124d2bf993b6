"""
Starting with a full spool (issue 7: 100,000 queued messages; serving new
connections within 10 seconds, the whole queue scheduled soon after, memory
proportional to the envelopes, not the contents).

The harness fills mailx's spool directory through mailx's own SpoolStore
(so the files are exactly what mailx writes), each message relayed to a sink
next hop on another loopback address, then starts mailx and measures:

- serving: seconds from starting the process to its first 220 greeting;
- scheduled: seconds until mailx logs "recovered N queued messages", that is
  until every message on disk is in its schedule (N is checked);
- first delivery: seconds until the first message is stored at the next hop;
- drained (with ``--drain``): seconds until every message is there, checked
  exactly once by Message-Id;
- PSS and RSS peaks of mailx over the measurement.

Without ``--drain`` the measurement ends ``--observe`` seconds after mailx
serves, and the table says how many messages had arrived by then.

    .venv/bin/python -m benchmarks.queued --messages 100000
    .venv/bin/python -m benchmarks.queued --messages 1000 --drain
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procstat import MemorySampler
from benchmarks.run import check_exactly_once, wait_for_deliveries
from benchmarks.servers import (
    DEFAULT_MAILX_COMMAND,
    CommandServer,
    ServerError,
    Target,
    make_mailx,
    make_sink,
)
from mailx.address import Address
from mailx.queue import QueuedMessage, QueuedRecipient
from mailx.spool import SpoolStore, new_queue_id
from tests.peers.postfix import free_port, make_workdir

ADDRESS = "127.0.0.13"
NEXT_HOP = "127.0.0.21"
RECIPIENT = Address("bench", "bench.test")
SENDER = Address("load", "client.test")
# Messages committed to the spool per directory fsync while filling it.
COMMIT_BATCH = 1000
POLL_INTERVAL = 0.05


@dataclass
class QueuedResult:
    """What starting with a full spool took."""

    messages: int
    fill_seconds: float = 0.0
    serving_seconds: float = 0.0
    scheduled_seconds: float = 0.0
    first_delivery_seconds: float = 0.0
    drained_seconds: float = 0.0
    delivered: int = 0
    rss_peak_mib: float = 0.0
    pss_peak_mib: float = 0.0
    error: str = ""


def message_content(number: int, size: int) -> bytes:
    """A message of about ``size`` bytes with a Message-Id of its own."""
    header = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Subject: queued {number}\r\nMessage-Id: <q{number}@client.test>\r\n\r\n"
    ).encode()
    line = b"X" * 76 + b"\r\n"
    return header + line * max(1, size // len(line))


def fill_spool(directory: Path, count: int, size: int) -> None:
    """Put ``count`` messages for the relayed recipient into the spool."""
    store = SpoolStore(str(directory))
    store.prepare()
    now = time.time()
    batch: list[tuple[QueuedMessage, bytes]] = []
    for number in range(count):
        content = message_content(number, size)
        message = QueuedMessage(
            message_id=new_queue_id(now),
            reverse_path=SENDER,
            recipients=[QueuedRecipient(RECIPIENT)],
            arrival=now,
            size=len(content),
            next_attempt=now,
        )
        batch.append((message, content))
        if len(batch) == COMMIT_BATCH:
            _store(store, batch)
            batch = []
    if batch:
        _store(store, batch)


def _store(store: SpoolStore, batch: list[tuple[QueuedMessage, bytes]]) -> None:
    errors = [error for error in store.store_new(batch) if error is not None]
    if errors:
        raise errors[0]


def measure(options: argparse.Namespace, workdir: Path) -> QueuedResult:
    """Fill the spool, start mailx on it, and watch it serve and deliver."""
    result = QueuedResult(options.messages)
    next_hop = Target(NEXT_HOP, free_port(NEXT_HOP), str(RECIPIENT))
    target = Target(ADDRESS, free_port(ADDRESS), str(RECIPIENT))
    (workdir / "next-hop").mkdir()
    sink = make_sink(workdir / "next-hop", next_hop, fsync=False)
    mailx = make_mailx(workdir, target, options.mailx_command, next_hop)

    started = time.monotonic()
    fill_spool(workdir / "queue", options.messages, options.size)
    result.fill_seconds = time.monotonic() - started
    try:
        sink.start()
        started = time.monotonic()
        mailx.start()
        result.serving_seconds = time.monotonic() - started
        recovered = _wait_for_recovery(mailx, options.timeout)
        result.scheduled_seconds = time.monotonic() - started
        if recovered != options.messages:
            raise ServerError(f"mailx recovered {recovered} of {options.messages}")
        _watch(mailx, sink, started, result, options)
    except ServerError as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        mailx.stop()
        sink.stop()
    return result


RECOVERED = re.compile(r"recovered (\d+) queued messages")


def _wait_for_recovery(mailx: CommandServer, timeout: float) -> int | None:
    """Wait for the recovery line in mailx's mail log; the count it gives."""
    mail_log = mailx.workdir / "mail.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = mail_log.read_text(errors="replace") if mail_log.exists() else ""
        found = RECOVERED.search(text)
        if found:
            return int(found[1])
        if not mailx.running():
            raise ServerError("mailx exited during recovery")
        time.sleep(POLL_INTERVAL)
    return None


def _watch(
    mailx: CommandServer,
    sink: CommandServer,
    started: float,
    result: QueuedResult,
    options: argparse.Namespace,
) -> None:
    with MemorySampler(mailx.session()) as sampler:
        first = wait_for_deliveries(sink, 1, options.observe, (mailx, sink))
        if first:
            result.first_delivery_seconds = time.monotonic() - started
        if options.drain:
            files = wait_for_deliveries(
                sink, options.messages, options.timeout, watched=(mailx, sink)
            )
            result.drained_seconds = time.monotonic() - started
        else:
            time.sleep(max(0.0, started + options.observe - time.monotonic()))
            files = sink.delivered()
    result.delivered = len(files)
    result.rss_peak_mib = sampler.memory.rss_peak / 1024
    result.pss_peak_mib = sampler.memory.pss_peak / 1024
    if options.drain:
        result.error = check_exactly_once(files, options.messages)


def format_result(result: QueuedResult, options: argparse.Namespace) -> str:
    """The measurement as a few plain lines."""
    lines = [
        f"mailx starting with {result.messages} queued messages of about "
        f"{options.size} bytes (spool filled in {result.fill_seconds:.1f} s)",
        f"  serving after        {result.serving_seconds:8.2f} s",
        f"  all scheduled after  {result.scheduled_seconds:8.2f} s",
        f"  first delivery after {result.first_delivery_seconds:8.2f} s",
    ]
    if options.drain:
        lines.append(f"  all delivered after  {result.drained_seconds:8.2f} s")
    else:
        lines.append(f"  delivered after {options.observe:.0f} s: {result.delivered}")
    lines += [
        f"  RSS peak {result.rss_peak_mib:.1f} MiB, PSS peak "
        f"{result.pss_peak_mib:.1f} MiB",
        f"  check: {_check_text(result, options)}",
    ]
    return "\n".join(lines)


def _check_text(result: QueuedResult, options: argparse.Namespace) -> str:
    if result.error:
        return f"FAILED: {result.error}"
    if not options.drain:
        return "exactly-once not checked (only with --drain)"
    return "ok"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queued",
        description="Start mailx with a full spool.",
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--drain", action="store_true", help="wait for every one")
    parser.add_argument(
        "--observe", type=float, default=30.0, help="seconds to watch without --drain"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="bound on --drain, seconds"
    )
    parser.add_argument("--mailx-command", default=DEFAULT_MAILX_COMMAND)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)

    workdir = make_workdir(prefix="mailx-queued-")
    try:
        result = measure(options, workdir)
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_result(result, options))
    return 1 if result.error else 0


if __name__ == "__main__":
    sys.exit(main())
