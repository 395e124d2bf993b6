"""
The servers a benchmark compares: each one starts in a fresh work directory,
listens on one loopback address, delivers the benchmark's recipient into a
Maildir whose files the harness counts, and is one process session whose CPU
and memory the harness reads from /proc.

- ``postfix``: a private Postfix instance (tests/peers/postfix.py).
- ``mailx``: ``twistd -n --pidfile= mailx --config FILE`` with a TOML file
  written here; the command is replaceable (``--mailx-command``).
- ``sink``: benchmarks/sinkserver.py, a plain Python server that fsyncs each
  message, to check the harness and as a baseline.

For the relay measurement a server is given a next hop: it then treats the
recipient's domain as remote and sends everything to that next hop, a sink
that stores without fsync and where the harness counts.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from benchmarks.procstat import session_pids
from tests.peers.postfix import PostfixInstance, free_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MAILX_COMMAND = (
    f"{REPO}/.venv/bin/twistd -n --pidfile= mailx --config {{config}}"
)
# How long a server may take to answer its first connection, and to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
# In the relay measurement the server's own domain, which the load never uses.
RELAY_LOCAL_DOMAIN = "local.test"


class ServerError(Exception):
    """A server did not start or stop as it should."""


@dataclass(frozen=True)
class Target:
    """Where the load goes: a loopback address and port, and one recipient."""

    address: str
    port: int
    recipient: str

    @property
    def local_part(self) -> str:
        return self.recipient.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.recipient.rpartition("@")[2]


class Server(Protocol):
    """What the harness needs of a server under test."""

    name: str

    def start(self) -> None:
        """Start, and return once the server answers with a 220 greeting."""

    def stop(self) -> None:
        """Stop, and return once none of the server's processes is left."""

    def session(self) -> int:
        """The session id of the server's processes."""

    def running(self) -> bool:
        """Is the server still up (its master or main process alive)?"""

    def delivered(self) -> list[Path]:
        """The message files in the recipient's Maildir (new and cur)."""


def _maildir_files(maildir: Path) -> list[Path]:
    found: list[Path] = []
    for sub in ("new", "cur"):
        try:
            found.extend(entry for entry in (maildir / sub).iterdir())
        except FileNotFoundError:
            continue
    return found


def greeting_received(address: str, port: int) -> bool:
    """Does an SMTP server answer on ``address``:``port`` with a 220?"""
    try:
        with socket.create_connection((address, port), timeout=2.0) as probe:
            banner = probe.recv(512)
            probe.sendall(b"QUIT\r\n")
    except OSError:
        return False
    return banner.startswith(b"220")


class PostfixServer:
    """A private Postfix instance delivering the recipient's domain."""

    name = "postfix"

    def __init__(
        self, workdir: Path, target: Target, next_hop: Target | None = None
    ) -> None:
        if next_hop is None:
            self.instance = PostfixInstance(
                workdir,
                listen_address=target.address,
                port=target.port,
                mydomain=target.domain,
            )
            return
        self.instance = PostfixInstance(
            workdir,
            listen_address=target.address,
            port=target.port,
            mydomain=RELAY_LOCAL_DOMAIN,
            relayhost=next_hop.address,
            relay_port=next_hop.port,
        )

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def session(self) -> int:
        master = self.instance.master_pid()
        if master is None:
            raise ServerError("the Postfix master is not running")
        return master

    def running(self) -> bool:
        return self.instance.master_pid() is not None

    def delivered(self) -> list[Path]:
        return self.instance.messages()


class CommandServer:
    """A server run as one command in a session of its own."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        target: Target,
        command: Sequence[str],
        maildir: Path,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.target = target
        self.command = list(command)
        self.maildir = maildir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited: {self._log_tail()}")
            if greeting_received(self.target.address, self.target.port):
                return
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise ServerError(f"{self.name} did not answer: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        # The server and its workers form the process group it leads; the
        # workers may outlive a main process that has died.
        group = self.process.pid
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while session_pids(group) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if session_pids(group):
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def session(self) -> int:
        if self.process is None:
            raise ServerError(f"{self.name} is not running")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def delivered(self) -> list[Path]:
        return _maildir_files(self.maildir)


def mailx_config(
    workdir: Path, target: Target, dns_port: int, next_hop: Target | None = None
) -> str:
    """The TOML configuration of a mailx under benchmark."""
    local = target.domain if next_hop is None else RELAY_LOCAL_DOMAIN
    delivery = ""
    if next_hop is not None:
        delivery = (
            "\n[delivery]\n"
            "# Everything not local goes to the next hop that counts it.\n"
            f'smarthost = "{next_hop.address}:{next_hop.port}"\n'
        )
    return f"""\
# Written by benchmarks/servers.py for one benchmark run.
[server]
hostname = "mx.{target.domain}"
listen = ["tcp:{target.port}:interface={target.address}"]
control_socket = "{workdir}/control.sock"

[domains]
local = ["{local}"]

[mailboxes]
root = "{workdir}/mail"
users = ["{target.local_part}"]

[limits]
# smtp-source opens all its sessions from one address.
max_connections = 2000
max_connections_per_client = 2000

[queue]
directory = "{workdir}/queue"

[dns]
# Never the system resolver: a loopback port where nothing answers.
servers = ["127.0.0.1:{dns_port}"]
timeout = 1

[log]
mail_log = "{workdir}/mail.log"
{delivery}"""


def make_mailx(
    workdir: Path, target: Target, command: str, next_hop: Target | None = None
) -> CommandServer:
    """mailx under twistd, with its configuration written into ``workdir``."""
    config = workdir / "mailx.toml"
    dns_port = free_port("127.0.0.1")
    config.write_text(mailx_config(workdir, target, dns_port, next_hop))
    argv = [part.format(config=config) for part in shlex.split(command)]
    maildir = workdir / "mail" / target.domain.lower() / target.local_part.lower()
    return CommandServer("mailx", workdir, target, argv, maildir)


def make_sink(
    workdir: Path, target: Target, next_hop: Target | None = None, fsync: bool = True
) -> CommandServer:
    """The plain Python server of benchmarks/sinkserver.py."""
    if next_hop is not None:
        raise ServerError("the sink server does not relay")
    maildir = workdir / "Maildir"
    argv = [
        sys.executable,
        "-m",
        "benchmarks.sinkserver",
        "--listen",
        f"{target.address}:{target.port}",
        "--maildir",
        str(maildir),
    ]
    if not fsync:
        argv.append("--no-fsync")
    return CommandServer("sink", workdir, target, argv, maildir)


# (work directory, where to listen, next hop to relay to or None) -> server
ServerFactory = Callable[[Path, Target, Target | None], Server]


def factories(mailx_command: str = DEFAULT_MAILX_COMMAND) -> dict[str, ServerFactory]:
    """The servers by the names the command line takes."""

    def mailx(workdir: Path, target: Target, next_hop: Target | None) -> Server:
        return make_mailx(workdir, target, mailx_command, next_hop)

    return {"postfix": PostfixServer, "mailx": mailx, "sink": make_sink}
