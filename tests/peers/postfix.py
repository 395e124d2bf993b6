"""
A private Postfix instance for integration tests and benchmarks.

Theory of operation: ``PostfixInstance`` writes a config_directory (main.cf,
master.cf) and a queue_directory of its own under a work directory, and runs
``postfix -c <config_directory> start|stop|flush`` as root, with the Debian
``postfix`` user as mail_owner.  The system instance in /etc/postfix is never
touched.

The instance listens only on one loopback address (IPv4), accepts mail for
its domains and delivers it with the ``virtual`` agent into Maildirs under the
work directory, so no system users are needed.  It never uses the network:
DNS is disabled in the SMTP client and in the server's peer lookups, anything
not for its own domains goes to the ``error`` transport, except when a
relayhost is given, which must be a loopback literal ``[127.x.y.z]:port``.

The Postfix daemons run as ``postfix`` and must reach every directory of the
work directory: ``make_workdir`` makes one that they can traverse (pytest's
own tmp_path lives under a directory only root may enter).
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

POSTFIX = "/usr/sbin/postfix"
# The Debian package's meta_directory holds postfix-files, which
# ``postfix start`` reads to check and create the queue's directories.
META_DIRECTORY = "/etc/postfix"
# How long start() and stop() wait for the master before they give up.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# The step of the bounded polling loops.
POLL_INTERVAL = 0.05
# The Maildir (relative to the mailbox base) that takes every recipient when
# no per-user mailboxes are given; the trailing slash asks for Maildir format.
CATCH_ALL_MAILDIR = "Maildir/"


class PostfixError(Exception):
    """Postfix is missing, misconfigured, or did not start or stop in time."""


def postfix_available() -> bool:
    """Is the Postfix package installed, and are we root to run it?"""
    if not os.path.exists(POSTFIX) or os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return False
    return True


def why_unavailable() -> str:
    """A sentence saying why Postfix cannot be run, for pytest.skip."""
    if not os.path.exists(POSTFIX):
        return f"{POSTFIX} is not installed (run .ci/install-peers.sh as root)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    return "the postfix user or postdrop group is missing (reinstall postfix)"


def make_workdir(parent: str | None = None, prefix: str = "mailx-postfix-") -> Path:
    """Make a fresh work directory that the postfix user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def free_port(address: str) -> int:
    """A TCP port that is free on ``address`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def _require_loopback(address: str, what: str) -> None:
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 address, not {address!r}") from None
    if not parsed.is_loopback:
        raise ValueError(f"{what} must be in 127.0.0.0/8, not {address}")


def _check_traversable(path: Path, uid: int) -> None:
    # The daemons run as mail_owner: each ancestor must let it through.
    for directory in [path, *path.parents]:
        mode = directory.stat()
        owned = mode.st_uid == uid
        if not owned and not mode.st_mode & stat.S_IXOTH:
            raise PostfixError(
                f"the postfix user cannot enter {directory}; "
                "use make_workdir() for the work directory"
            )


@dataclass(frozen=True)
class Relayhost:
    """The one next hop the instance may send to: a loopback literal."""

    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}"


class PostfixInstance:
    """
    One private Postfix: config, queue and Maildirs under ``workdir``.

    ``mydestination`` lists the domains whose mail is delivered here (as
    virtual mailbox domains).  With ``mailboxes`` None, every recipient in
    them goes to one catch-all Maildir; otherwise only the listed addresses
    are accepted, each into its own Maildir.
    """

    def __init__(
        self,
        workdir: Path,
        listen_address: str = "127.0.0.5",
        port: int | None = None,
        mydomain: str = "postfix.test",
        mydestination: Sequence[str] | None = None,
        mailboxes: Sequence[str] | None = None,
        relayhost: str | None = None,
        relay_port: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        client_tls_level: str = "none",
        main_overrides: Mapping[str, str] | None = None,
        mail_owner: str = "postfix",
    ) -> None:
        _require_loopback(listen_address, "listen_address")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self.workdir = workdir.resolve()
        self.listen_address = listen_address
        self.port = port if port is not None else free_port(listen_address)
        self.mydomain = mydomain
        self.mydestination = tuple(mydestination or (mydomain,))
        self.mailboxes = tuple(mailboxes) if mailboxes is not None else None
        self.relayhost = self._relayhost(relayhost, relay_port)
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.client_tls_level = client_tls_level
        self.main_overrides = dict(main_overrides or {})
        self.mail_owner = mail_owner

        self.config_directory = self.workdir / "etc"
        self.queue_directory = self.workdir / "spool"
        self.data_directory = self.workdir / "data"
        self.mailbox_base = self.workdir / "mail"
        self.log_file = self.workdir / "log" / "maillog"

    @staticmethod
    def _relayhost(relayhost: str | None, relay_port: int | None) -> Relayhost | None:
        if relayhost is None:
            if relay_port is not None:
                raise ValueError("relay_port needs a relayhost")
            return None
        address = relayhost.strip("[]")
        _require_loopback(address, "relayhost")
        return Relayhost(address, relay_port or 25)

    # Configuration.

    def main_cf(self) -> dict[str, str]:
        """The parameters of main.cf, in the order they are written."""
        owner = pwd.getpwnam(self.mail_owner)
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_directory),
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "meta_directory": META_DIRECTORY,
            "mail_owner": self.mail_owner,
            "setgid_group": "postdrop",
            "myhostname": f"mx.{self.mydomain}",
            "mydomain": self.mydomain,
            "myorigin": "$mydomain",
            # Postfix takes only addresses configured on an interface here, and
            # lo carries 127.0.0.1 alone; the listener in master.cf names its
            # own address, so the instance still listens on that address only.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtp_bind_address": self.listen_address,
            # No DNS anywhere: the client takes literal next hops only, and the
            # server does not look up the names of its clients.
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "append_dot_mydomain": "no",
            "biff": "no",
            # Local delivery needs system users: none of it here.
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "virtual_mailbox_domains": " ".join(self.mydestination),
            "virtual_mailbox_base": str(self.mailbox_base),
            "virtual_mailbox_maps": self._mailbox_map(),
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_minimum_uid": str(owner.pw_uid),
            "relayhost": str(self.relayhost) if self.relayhost else "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # Retry soon: tests wait on deferred mail.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "10s",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.workdir),
            "smtp_tls_security_level": self.client_tls_level,
        }
        if self.relayhost is None:
            # Nothing leaves this instance except to its relayhost.
            params["default_transport"] = "error:no relayhost in this test instance"
            params["relay_transport"] = "error:no relayhost in this test instance"
        if self.tls_cert is not None and self.tls_key is not None:
            params["smtpd_tls_cert_file"] = str(self.tls_cert)
            params["smtpd_tls_key_file"] = str(self.tls_key)
            params["smtpd_tls_security_level"] = "may"
        params.update(self.main_overrides)
        return params

    def _mailbox_map(self) -> str:
        if self.mailboxes is None:
            return f"static:{CATCH_ALL_MAILDIR}"
        return f"texthash:{self.config_directory / 'mailboxes'}"

    def master_cf(self) -> str:
        """The services of master.cf: one SMTP listener, no chroot."""
        listener = f"{self.listen_address}:{self.port}"
        rows = [
            (listener, "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        return "".join(" ".join(row) + "\n" for row in rows)

    def write_config(self) -> None:
        """Write main.cf, master.cf and the directories Postfix expects."""
        owner = pwd.getpwnam(self.mail_owner)
        _check_traversable(self.workdir, owner.pw_uid)
        for directory in (self.config_directory, self.queue_directory):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for directory in (self.data_directory, self.mailbox_base):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        self.log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)

        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_directory / "main.cf").write_text(main)
        (self.config_directory / "master.cf").write_text(self.master_cf())
        if self.mailboxes is not None:
            lines = [f"{box} {self._maildir_name(box)}\n" for box in self.mailboxes]
            (self.config_directory / "mailboxes").write_text("".join(lines))

    @staticmethod
    def _maildir_name(address: str) -> str:
        local_part, _, domain = address.rpartition("@")
        return f"{domain.lower()}/{local_part}/"

    # Running.

    def _postfix(self, *command: str) -> subprocess.CompletedProcess[str]:
        # postfix(1) writes its errors to stderr only when that is a terminal,
        # so it gets a pseudo-terminal for them.
        controller, terminal = pty.openpty()
        try:
            result = subprocess.run(
                [POSTFIX, "-c", str(self.config_directory), *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=terminal,
                text=True,
                check=False,
                timeout=START_TIMEOUT,
            )
            os.close(terminal)
            result.stderr = _drain(controller)
        finally:
            with contextlib.suppress(OSError):
                os.close(terminal)
            os.close(controller)
        return result

    def master_pid(self) -> int | None:
        """The pid of the running master, from its pid file, or None."""
        pid_file = self.queue_directory / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if is_running(pid) else None

    def pids(self) -> list[int]:
        """The master and every process of its session (its daemons)."""
        master = self.master_pid()
        if master is None:
            return []
        return [pid for pid in _all_pids() if _session_of(pid) == master]

    def start(self) -> None:
        """Write the config, start the master and wait until SMTP answers."""
        if not postfix_available():
            raise PostfixError(why_unavailable())
        self.write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            self.stop()
            raise PostfixError(f"postfix start failed: {result.stderr.strip()}")
        try:
            self._wait_until_accepting()
        except PostfixError:
            self.stop()
            raise

    def _wait_until_accepting(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.master_pid() is not None and self._banner_received():
                return
            time.sleep(POLL_INTERVAL)
        raise PostfixError(
            f"Postfix did not answer on {self.listen_address}:{self.port} "
            f"within {START_TIMEOUT:.0f} s; see {self.log_file}"
        )

    def _banner_received(self) -> bool:
        address = (self.listen_address, self.port)
        try:
            with socket.create_connection(address, timeout=2.0) as probe:
                banner = probe.recv(512)
                probe.sendall(b"QUIT\r\n")
        except OSError:
            return False
        return banner.startswith(b"220")

    def stop(self) -> None:
        """Stop the master and wait until none of its processes is left."""
        master = self.master_pid()
        if master is None:
            return
        processes = self.pids()
        self._postfix("stop")
        if _wait_gone(processes, STOP_TIMEOUT):
            return
        # The master did not stop by itself: end the processes it started.
        self._postfix("abort")
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _wait_gone(processes, STOP_TIMEOUT):
            raise PostfixError(f"Postfix processes {processes} did not stop")

    def flush(self) -> None:
        """Ask the queue manager to retry every deferred message now."""
        result = self._postfix("flush")
        if result.returncode != 0:
            raise PostfixError(f"postfix flush failed: {result.stderr.strip()}")

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Mail.

    def maildir(self, address: str | None = None) -> Path:
        """The Maildir of ``address``, or the catch-all one."""
        if address is None or self.mailboxes is None:
            return self.mailbox_base / CATCH_ALL_MAILDIR
        return self.mailbox_base / self._maildir_name(address)

    def messages(self, address: str | None = None) -> list[Path]:
        """The message files delivered to a Maildir (new and cur)."""
        maildir = self.maildir(address)
        found: list[Path] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                found.extend(sorted((maildir / sub).iterdir()))
        return found

    def wait_for_messages(
        self, count: int, address: str | None = None, timeout: float = 30.0
    ) -> list[Path]:
        """Wait until at least ``count`` messages are in the Maildir."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(address)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(POLL_INTERVAL)

    def log(self) -> str:
        """The instance's mail log so far, for failure messages."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def running_postfix(**options: Any) -> Iterator[PostfixInstance]:
    """
    Start a PostfixInstance in a fresh work directory; stop it and remove the
    directory afterwards, whatever happened in between.
    """
    workdir = make_workdir()
    try:
        instance = PostfixInstance(workdir, **options)
        try:
            instance.start()
            yield instance
        finally:
            instance.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def is_running(pid: int) -> bool:
    """Is process ``pid`` alive (a zombie has exited)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    # A zombie has exited; only its parent's wait is missing.
    return state != "Z"


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _session_of(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # proc(5): after the command come state, ppid, pgrp, session.
    return int(fields[3])


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_running(pid) for pid in pids):
            return True
        time.sleep(POLL_INTERVAL)
    return not any(is_running(pid) for pid in pids)


def _drain(controller: int) -> str:
    # Read what is buffered in the pseudo-terminal; its writer has exited.
    chunks: list[bytes] = []
    while select.select([controller], [], [], 0)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
