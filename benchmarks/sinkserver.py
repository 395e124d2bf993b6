"""
A plain single-process SMTP server that stores every message into a Maildir,
for checking the harness without mailx and as a baseline ("a plain Python
server that fsyncs each message" of issue 7), or, with ``--no-fsync``, as a
next hop that relayed mail is counted at.

It speaks just enough SMTP for smtp-source and SMTP clients that relay:
EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; it checks nothing.  It is a
benchmark tool, not part of mailx, so its replies are its own.

    python -m benchmarks.sinkserver --listen 127.0.0.1:2600 --maildir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import time
from pathlib import Path

# Large enough for any message smtp-source sends in one read.
STREAM_LIMIT = 16 * 1024 * 1024
DOT_LINE = b".\r\n"


class Maildir:
    """Writes messages into tmp/, then renames them into new/."""

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        self.count = 0
        self.pid = os.getpid()
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.new_fd = os.open(root / "new", os.O_RDONLY | os.O_DIRECTORY)

    def store(self, content: bytes) -> None:
        self.count += 1
        name = f"{time.time_ns()}.P{self.pid}Q{self.count}.sink"
        temporary = self.root / "tmp" / name
        with temporary.open("wb") as handle:
            handle.write(content)
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.rename(temporary, self.root / "new" / name)
        if self.fsync:
            os.fsync(self.new_fd)


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    # Every chunk ends in ".CRLF"; the data ends at a line that is just ".".
    content = await reader.readuntil(DOT_LINE)
    while content != DOT_LINE and not content.endswith(b"\r\n" + DOT_LINE):
        content += await reader.readuntil(DOT_LINE)
    content = content[: -len(DOT_LINE)]
    # RFC 5321 section 4.5.2: remove the dot that stuffs a leading dot.
    if content.startswith(b".."):
        content = content[1:]
    return content.replace(b"\r\n..", b"\r\n.")


async def _session(
    maildir: Maildir, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"220 sink ESMTP\r\n")
    try:
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                maildir.store(await _read_data(reader))
                writer.write(b"250 stored\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 ok\r\n")
            else:
                writer.write(b"500 unknown command\r\n")
            await writer.drain()
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(address: str, port: int, maildir: Maildir) -> None:
    """Serve until SIGTERM or SIGINT."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    server = await asyncio.start_server(
        lambda r, w: _session(maildir, r, w),
        address,
        port,
        limit=STREAM_LIMIT,
        backlog=128,
    )
    async with server:
        await stopped.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT on loopback")
    parser.add_argument("--maildir", required=True, type=Path)
    parser.add_argument("--no-fsync", action="store_true")
    options = parser.parse_args(argv)

    address, _, port = options.listen.rpartition(":")
    address = address.strip("[]")
    if not ipaddress.ip_address(address).is_loopback:
        parser.error(f"--listen must be a loopback address, not {address}")
    maildir = Maildir(options.maildir, fsync=not options.no_fsync)
    asyncio.run(serve(address, int(port), maildir))


if __name__ == "__main__":
    main()
