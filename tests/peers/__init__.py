"""
Real SMTP peers for integration tests: a private Postfix (``postfix``) and
swaks, the SMTP test client, run here against a server on loopback.

Every peer talks to loopback addresses only: the helpers refuse any other
server address, and always name the server, so swaks never looks up MX
records for a recipient domain.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SWAKS = "swaks"
# A client transaction on loopback takes milliseconds; this bounds a hung one.
SWAKS_TIMEOUT = 60.0


def swaks_available() -> bool:
    """Is swaks on the PATH?"""
    return shutil.which(SWAKS) is not None


def require_loopback(address: str) -> None:
    """Refuse any server address outside 127.0.0.0/8 and ::1."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ValueError(f"peers talk to IP addresses only, not {address!r}") from None
    if not parsed.is_loopback:
        raise ValueError(f"peers talk to loopback only, not {address}")


@dataclass(frozen=True)
class SwaksResult:
    """What one swaks run showed: its exit status and the SMTP transcript."""

    returncode: int
    transcript: str

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    def server_lines(self) -> list[str]:
        """The lines the server sent, without swaks' arrow markers."""
        # swaks marks server lines "<-" (plain) and "<~" (inside TLS), and a
        # failure it expected to be an error "<**".
        lines = []
        for line in self.transcript.splitlines():
            stripped = line.lstrip()
            for marker in ("<** ", "<-  ", "<~  ", "<~* ", "<-* "):
                if stripped.startswith(marker):
                    lines.append(stripped[len(marker) :])
                    break
        return lines

    def reply_codes(self) -> list[int]:
        """The reply code of each final reply line the server sent."""
        return [
            int(line[:3])
            for line in self.server_lines()
            if line[:3].isdigit() and line[3:4] != "-"
        ]


def run_swaks(
    server: str,
    port: int,
    *,
    mail_from: str = "sender@client.test",
    rcpt_to: Sequence[str] = ("postmaster@mx.test",),
    helo: str = "client.test",
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
    tls: bool = False,
    pipelining: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = SWAKS_TIMEOUT,
) -> SwaksResult:
    """Send one message with swaks to a server on loopback."""
    require_loopback(server)
    command = [
        SWAKS,
        "--server",
        server.strip("[]"),
        "--port",
        str(port),
        "--helo",
        helo,
        "--from",
        mail_from,
        "--to",
        ",".join(rcpt_to),
        "--timeout",
        str(int(timeout)),
    ]
    if body is not None:
        command += ["--body", body]
    for name, value in (headers or {}).items():
        command += ["--add-header", f"{name}: {value}"]
    if tls:
        command.append("--tls")
    if pipelining:
        command.append("--pipeline")
    command += list(extra_args)

    completed = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout + 5,
    )
    return SwaksResult(completed.returncode, completed.stdout + completed.stderr)
