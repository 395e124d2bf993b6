"""
Run the real mailx, through twistd, as a test's own process on loopback.

``MailxProcess`` writes a TOML configuration into its work directory, starts
``twistd -n mailx --config ...`` there and waits until the SMTP listener
answers.  ``stop`` ends it with SIGTERM (SIGKILL if it hangs), ``kill`` with
SIGKILL, as a crash would.  Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
# Starting twistd and binding takes about a second; this bounds a hung start.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


class MailxProcess:
    """One mailx server with its own directory, configuration and port."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        address: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.address = address
        self.port = port if port is not None else free_port(address)
        self.config_text = config
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maildir(self, domain: str, local_part: str) -> Path:
        return self.workdir / "var/mailx/mail" / domain / local_part

    def messages(self, domain: str, local_part: str) -> list[bytes]:
        """The messages in a Maildir's new/, oldest name first."""
        new = self.maildir(domain, local_part) / "new"
        if not new.is_dir():
            return []
        return [path.read_bytes() for path in sorted(new.iterdir())]

    def _command(self) -> list[str]:
        return [
            str(Path(sys.executable).parent / "twistd"),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "mailx",
            "--config",
            "mailx.toml",
        ]

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = str(PROJECT)
        return environment

    def run_refused(self) -> str:
        """Start a server that must refuse to start; return what it printed."""
        (self.workdir / "mailx.toml").write_text(self.config_text)
        finished = subprocess.run(
            self._command(),
            cwd=self.workdir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert finished.returncode != 0, "mailx started, and should not have"
        return (finished.stdout + finished.stderr).decode(errors="replace") + self.log()

    def start(self) -> None:
        (self.workdir / "mailx.toml").write_text(self.config_text)
        self.process = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            # twistd prints a refused start (usage errors) on standard output.
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = b""
                if self.process.stdout is not None:
                    error = self.process.stdout.read()
                    self.process.stdout.close()
                raise RuntimeError(
                    f"mailx exited with {self.process.returncode}: "
                    f"{error.decode(errors='replace')}\n{self.log()}"
                )
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"mailx did not listen within {START_TIMEOUT}s\n{self.log()}"
        )

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
        if process.stdout:
            process.stdout.close()


def basic_config(
    port: int,
    address: str = "127.0.0.1",
    hostname: str = "mx.example.org",
    local: list[str] | None = None,
    extra: str = "",
) -> str:
    """A small configuration: one listener, local domains, users alice and bob."""
    return f"""
[server]
hostname = "{hostname}"
listen = ["tcp:{port}:interface={address}"]
control_socket = "var/mailx/control.sock"

[domains]
local = {toml_list(local or ["example.org"])}

[mailboxes]
users = ["alice", "bob"]
{extra}
"""


@pytest.fixture
def mailx_server(tmp_path: Path) -> Iterator[MailxProcess]:
    """A running mailx on a free loopback port, stopped after the test."""
    port = free_port()
    server = MailxProcess(tmp_path / "mx", basic_config(port), port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
