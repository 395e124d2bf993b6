"""
The mail exchangers of the end-to-end tests, as real processes on loopback.

``example.org`` has three exchanges, ``MX 0 mxa``, ``MX 10 mxb`` and
``MX 20 mxc``, on 127.0.0.2, .3 and .4.  ``smtp.example.net`` (127.0.0.10)
is the sending domain's server: it relays for the client's network,
127.0.1.0/24, and trusts nobody else; the exchanges trust nobody.  Names
resolve through ``tests.e2e.dns``, a DNS server process on 127.0.0.1 that every
mailx is pointed at with ``[dns] servers``.

The exchanges (smtp.example.net, example.net's exchange, among them) listen on
port 25 of their own addresses when the tests run as root and port 25 is free
there, as in CI; otherwise on one free port they all share, which every mailx
is then told to deliver to with ``delivery.port``.

``MXNetwork`` starts and stops all of it; every wait is bounded and every
process it started is stopped when it is closed.  Its addresses are fixed, so
two networks on one machine (two test runs side by side) would deliver into
each other: a network holds an exclusive lock on ``LOCK_PATH`` while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mailx.spool import SpoolStore
from tests.mailxproc import PROJECT, MailxProcess, free_port, toml_list

MXA, MXB, MXC = "127.0.0.2", "127.0.0.3", "127.0.0.4"
RELAY = "127.0.0.10"
# The client's network, which smtp.example.net relays for.
CLIENT = "127.0.1.1"
CLIENT_NETWORK = "127.0.1.0/24"
# down.example's exchanges: nothing ever listens there.
DOWN_MX1, DOWN_MX2 = "127.0.0.20", "127.0.0.21"
# pf.example's primary: a Postfix, with mxb as its backup.
POSTFIX_MX = "127.0.0.12"
DNS_HOST = "127.0.0.1"

HOSTNAMES = {
    MXA: "mxa.example.org",
    MXB: "mxb.example.org",
    MXC: "mxc.example.org",
    RELAY: "smtp.example.net",
}

ZONES = {
    "example.org": {
        "example.org": [
            ["MX", 0, "mxa.example.org"],
            ["MX", 10, "mxb.example.org"],
            ["MX", 20, "mxc.example.org"],
        ],
        "mxa.example.org": [["A", MXA]],
        "mxb.example.org": [["A", MXB]],
        "mxc.example.org": [["A", MXC]],
    },
    "example.net": {
        "example.net": [["MX", 10, "smtp.example.net"]],
        "smtp.example.net": [["A", RELAY]],
    },
    "down.example": {
        "down.example": [
            ["MX", 10, "mx1.down.example"],
            ["MX", 20, "mx2.down.example"],
        ],
        "mx1.down.example": [["A", DOWN_MX1]],
        "mx2.down.example": [["A", DOWN_MX2]],
    },
    "pf.example": {
        "pf.example": [["MX", 0, "mx.pf.example"], ["MX", 10, "mxb.example.org"]],
        "mx.pf.example": [["A", POSTFIX_MX]],
    },
}

# Bounds of the polling loops: loopback delivery takes milliseconds, retries
# here come every second or two, so these are generous ceilings.
WAIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
DNS_START_TIMEOUT = 15.0
CLI_TIMEOUT = 30.0
# Held while a network runs; another run waits at most LOCK_TIMEOUT for it,
# about the time the whole end-to-end suite takes.
LOCK_PATH = "/tmp/mailx-e2e-network.lock"
LOCK_TIMEOUT = 300.0


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As Twisted's listeners do, so a closed connection in TIME-WAIT on
        # the port does not count as the port being taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def choose_mx_port(
    addresses: Sequence[str] = (MXA, MXB, MXC, RELAY, POSTFIX_MX),
) -> int:
    """25 when root may bind it on every address; else a port free on all."""
    if os.geteuid() == 0 and all(_bindable(a, 25) for a in addresses):
        return 25
    for _ in range(50):
        port = free_port(addresses[0])
        if all(_bindable(a, port) for a in addresses):
            return port
    raise RuntimeError("no TCP port is free on every exchange address")


def wait_for(
    condition: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


class DNSProcess:
    """``tests.e2e.dns`` in a subprocess, serving ``ZONES``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        zones = self.workdir / "zones.json"
        zones.write_text(json.dumps(ZONES))
        environment = dict(os.environ, PYTHONPATH=str(PROJECT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.dns", "--zones", str(zones)],
            cwd=PROJECT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        # readline blocks; the runner prints its line at once or exits.
        line = self.process.stdout.readline()
        found = re.fullmatch(r"listening (\S+) (\d+)\n", line)
        if found is None:
            self.stop()
            raise RuntimeError(f"the DNS server did not start: {line!r}")
        self.port = int(found.group(2))
        return self.port

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(DNS_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(DNS_START_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


@dataclass(frozen=True)
class Settings:
    """What differs between the mailx processes of the network."""

    local: tuple[str, ...]
    backup: tuple[str, ...] = ()
    relay_networks: tuple[str, ...] = ()
    min_retry: float = 1.0
    max_retry: float = 2.0
    lifetime: float = 600.0
    delay_warning: float = 3600.0
    # More TOML, appended as it is (whole sections).
    extra: str = ""


def mailx_config(
    address: str, port: int, dns_port: int, mx_port: int, settings: Settings
) -> str:
    """A configuration of one mailx of the network, as TOML."""
    return f"""
[server]
hostname = "{HOSTNAMES[address]}"
listen = ["tcp:{port}:interface={address}"]
control_socket = "var/mailx/control.sock"

[domains]
local = {toml_list(list(settings.local))}
backup = {toml_list(list(settings.backup))}

[mailboxes]
users = ["alice", "bob", "carol"]
existing = false

[relay]
networks = {toml_list(list(settings.relay_networks))}

[queue]
min_retry = {settings.min_retry}
max_retry = {settings.max_retry}
lifetime = {settings.lifetime}
delay_warning = {settings.delay_warning}

[delivery]
port = {mx_port}
connect_timeout = 5
greeting_timeout = 10
mail_timeout = 10
rcpt_timeout = 10
data_init_timeout = 10
data_block_timeout = 10
data_end_timeout = 10

[dns]
servers = ["{DNS_HOST}:{dns_port}"]
timeout = 3
{settings.extra}
"""


class Node:
    """One mailx of the network: its process and what can be seen of it."""

    def __init__(self, process: MailxProcess) -> None:
        self.process = process

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def running(self) -> bool:
        return self.process.process is not None

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def log(self) -> str:
        return self.process.log()

    def messages(self, domain: str, local_part: str) -> list[bytes]:
        return self.process.messages(domain, local_part)

    def queue_ids(self) -> list[str]:
        """The ids of the messages in the spool now."""
        return SpoolStore(str(self.process.workdir / "var/mailx/queue")).ids()

    def cli(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run ``mailx <arguments>`` against this server's configuration."""
        environment = dict(os.environ, PYTHONPATH=str(PROJECT))
        return subprocess.run(
            [sys.executable, "-m", "mailx.cli", *arguments, "--config", "mailx.toml"],
            cwd=self.process.workdir,
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=CLI_TIMEOUT,
        )

    def relays_named(self) -> list[str]:
        """Every next hop this mailx's mail log says it tried, in order."""
        return re.findall(r"relay=([^\s\[]+)\[", self.log())


class MXNetwork:
    """The DNS server and the four mailx processes of the scenario."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mx_port = 0
        self.dns = DNSProcess(workdir / "dns")
        self.nodes: dict[str, Node] = {}
        self._lock: int | None = None

    def __enter__(self) -> MXNetwork:
        self._acquire()
        try:
            self.mx_port = choose_mx_port()
            self.dns.start()
        except BaseException:
            self._release()
            raise
        return self

    def _acquire(self) -> None:
        descriptor = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(descriptor)
                    raise RuntimeError(f"{LOCK_PATH} stayed locked") from None
                time.sleep(POLL_INTERVAL)
                continue
            self._lock = descriptor
            return

    def _release(self) -> None:
        descriptor, self._lock = self._lock, None
        if descriptor is not None:
            # Closing the descriptor releases the lock.
            os.close(descriptor)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            for node in self.nodes.values():
                node.stop()
        finally:
            try:
                self.dns.stop()
            finally:
                self._release()

    def add(
        self,
        address: str,
        settings: Settings,
    ) -> Node:
        """Set up (not start) the mailx of ``address``."""
        port = self.mx_port
        config = mailx_config(address, port, self.dns.port, self.mx_port, settings)
        directory = self.workdir / HOSTNAMES[address]
        node = Node(MailxProcess(directory, config, address=address, port=port))
        self.nodes[HOSTNAMES[address]] = node
        return node

    def standard(
        self,
        relay_lifetime: float = 600.0,
        mx_retry: tuple[float, float] = (1.0, 2.0),
    ) -> tuple[Node, Node, Node, Node]:
        """smtp.example.net, mxa, mxb and mxc, set up but not started."""
        relay = self.add(RELAY, relay_settings(relay_lifetime))
        mxa = self.add(MXA, Settings(local=("example.org",)))
        backups = Settings(
            local=("localhost",),
            backup=("example.org", "pf.example"),
            min_retry=mx_retry[0],
            max_retry=mx_retry[1],
        )
        mxb = self.add(MXB, backups)
        mxc = self.add(MXC, backups)
        return relay, mxa, mxb, mxc


def relay_settings(lifetime: float = 600.0) -> Settings:
    """smtp.example.net: example.net is local, and it relays for the client."""
    return Settings(
        local=("example.net",),
        relay_networks=(CLIENT_NETWORK,),
        lifetime=lifetime,
        delay_warning=0,
    )


def start_all(nodes: Sequence[Node]) -> None:
    """Start the nodes side by side; each start waits until it greets."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        for result in [pool.submit(node.start) for node in nodes]:
            result.result()


def submit(
    relay: Node,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
) -> dict[str, tuple[int, bytes]]:
    """Send one message to ``relay`` with smtplib, from the client's network."""
    with smtplib.SMTP(
        relay.address, relay.port, timeout=30, source_address=(CLIENT, 0)
    ) as client:
        client.ehlo("client.example.net")
        return client.sendmail(sender, list(recipients), message)


def message(subject: str, body: str = "Hello.", to: str = "bob@example.org") -> bytes:
    """A small message with CRLF line endings."""
    return (
        f"From: alice@example.net\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.net>\r\n\r\n{body}\r\n"
    ).encode()


def trace(stored: bytes) -> list[str]:
    """The hosts named in the ``by`` part of the Received fields, newest first."""
    header = stored.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return re.findall(r"\n\tby (\S+) \(mailx\)", header)


def strip_trace(stored: bytes, hops: int) -> bytes:
    """A stored message without Return-Path, Delivered-To and ``hops`` Received."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: "), lines[0]
    assert lines[1].startswith(b"Delivered-To: "), lines[1]
    index = 2
    for _ in range(hops):
        assert lines[index].startswith(b"Received: from "), lines[index]
        index += 1
        while lines[index].startswith(b"\t"):
            index += 1
    return b"\n".join(lines[index:])


@contextlib.contextmanager
def network(workdir: Path) -> Iterator[MXNetwork]:
    """An ``MXNetwork`` whose processes are all stopped afterwards."""
    with MXNetwork(workdir) as net:
        yield net
