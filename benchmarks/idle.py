"""
Memory with many idle connections open (issue 7: 1,000 idle connections,
under 100 MiB in all).

For each server: start it as the throughput benchmark does, open
``--connections`` TCP connections to it from loopback, wait (bounded) for
their 220 greetings, then sample the server's summed RSS and PSS while all of
them sit idle, close them and stop the server.  The table says how many
connections were greeted: a server that caps its processes (Postfix's
default_process_limit of 100) greets only that many, the rest wait in the
listen queue.

    .venv/bin/python -m benchmarks.idle --servers mailx postfix
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procstat import Memory, sample_memory
from benchmarks.servers import DEFAULT_MAILX_COMMAND, ServerError, Target, factories
from tests.peers.postfix import PostfixError, free_port, make_workdir

ADDRESS = "127.0.0.12"
# File descriptors the harness needs beyond the connections themselves.
SPARE_DESCRIPTORS = 64
# Connections are opened in batches of this many (below the listen backlog
# of 50 that Twisted and Python use by default), each given BATCH_WAIT
# seconds to be greeted before the next batch.
BATCH = 40
BATCH_WAIT = 2.0


@dataclass
class IdleResult:
    """One server with its connections idle."""

    server: str
    connections: int = 0
    greeted: int = 0
    rss_mib: float = 0.0
    pss_mib: float = 0.0
    error: str = ""


def raise_descriptor_limit(needed: int) -> None:
    """Raise the soft limit on open files to ``needed`` if the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OSError(errno.EMFILE, f"{needed} descriptors needed, hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Greeter:
    """Connections that wait for their 220 greeting, watched by one selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytes] = {}
        self.open: list[socket.socket] = []
        self.greeted = 0

    def connect(self, address: str, port: int) -> None:
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        connection.setblocking(False)
        connection.connect_ex((address, port))
        self.selector.register(connection, selectors.EVENT_READ, connection)
        self.received[connection] = b""
        self.open.append(connection)

    def waiting(self) -> int:
        return len(self.selector.get_map())

    def wait(self, seconds: float) -> None:
        """Read greetings until none is awaited or ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        while self.waiting() and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.05):
                self._read(key.data)

    def _read(self, connection: socket.socket) -> None:
        try:
            data = connection.recv(512)
        except OSError:
            data = b""
        self.received[connection] += data
        if data and b"\n" not in self.received[connection]:
            return
        self.selector.unregister(connection)
        if self.received[connection].startswith(b"220"):
            self.greeted += 1
        else:
            connection.close()
            self.open.remove(connection)

    def close(self) -> None:
        self.selector.close()
        for connection in self.open:
            connection.close()


def open_idle(address: str, port: int, count: int, wait: float) -> Greeter:
    """
    Open ``count`` connections a batch at a time, each batch given up to
    ``BATCH_WAIT`` seconds to be greeted (a full listen queue would otherwise
    drop handshakes that the kernel retries only seconds later), then wait up
    to ``wait`` seconds for the rest.
    """
    greeter = Greeter()
    saturated = False
    for start in range(0, count, BATCH):
        before = greeter.greeted
        for _ in range(min(BATCH, count - start)):
            greeter.connect(address, port)
        if not saturated:
            greeter.wait(BATCH_WAIT)
            # A batch with no greeting at all: the server takes no more now.
            saturated = greeter.greeted == before
    greeter.wait(wait)
    return greeter


def measure(name: str, options: argparse.Namespace, workroot: Path) -> IdleResult:
    """Start one server, hold the connections open, and sample its memory."""
    result = IdleResult(name)
    workdir = make_workdir(str(workroot), prefix=f"idle-{name}-")
    target = Target(ADDRESS, free_port(ADDRESS), "bench@bench.test")
    server = factories(options.mailx_command)[name](workdir, target, None)
    greeter: Greeter | None = None
    try:
        server.start()
        greeter = open_idle(ADDRESS, target.port, options.connections, options.wait)
        result.connections = len(greeter.open)
        result.greeted = greeter.greeted
        memory = Memory()
        sample_memory(server.session(), memory)
        result.rss_mib = memory.rss_peak / 1024
        result.pss_mib = memory.pss_peak / 1024
    except (OSError, ServerError, PostfixError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if greeter is not None:
            greeter.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def format_table(results: Sequence[IdleResult], wanted: int) -> str:
    """One line per server."""
    lines = [
        f"{wanted} idle connections from loopback",
        f"{'server':<8} {'open':>6} {'greeted':>8} {'RSS MiB':>8} {'PSS MiB':>8}",
    ]
    for r in results:
        tail = f"  FAILED: {r.error}" if r.error else ""
        lines.append(
            f"{r.server:<8} {r.connections:>6} {r.greeted:>8} "
            f"{r.rss_mib:>8.1f} {r.pss_mib:>8.1f}{tail}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.idle",
        description="Memory of SMTP servers holding idle connections.",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["mailx", "postfix"],
        choices=["mailx", "postfix", "sink"],
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for greetings"
    )
    parser.add_argument("--mailx-command", default=DEFAULT_MAILX_COMMAND)
    options = parser.parse_args(argv)
    raise_descriptor_limit(options.connections + SPARE_DESCRIPTORS)

    workroot = make_workdir(prefix="mailx-idle-")
    try:
        results = [measure(name, options, workroot) for name in options.servers]
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print(format_table(results, options.connections))
    return 0 if not any(r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
