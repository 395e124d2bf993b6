"""
Limits under load against the real server (twistd) on loopback: connection
caps overall and per client address, and idle clients timed out.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.mailxproc import MailxProcess, basic_config, free_port

pytestmark = pytest.mark.integration

# A short idle timeout keeps the test quick; production uses 300 s.
IDLE_TIMEOUT = 1.0
# Bounds every wait for the server; far beyond what loopback needs.
WAIT = 15.0
# The start-up probe of MailxProcess holds a slot until the server sees it
# close; a refused connection is retried this often before the test gives up.
RETRIES = 50


def start_server(tmp_path: Path, limits: str) -> MailxProcess:
    port = free_port()
    config = basic_config(port, extra=f"[limits]\n{limits}\n")
    server = MailxProcess(tmp_path / "mx", config, port=port)
    server.start()
    return server


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[MailxProcess]:
    """A server allowing 3 connections in all and 2 per client address."""
    server = start_server(
        tmp_path, "max_connections = 3\nmax_connections_per_client = 2"
    )
    try:
        yield server
    finally:
        server.stop()


def connect(server: MailxProcess, source: str) -> socket.socket:
    connection = socket.create_connection(
        (server.address, server.port), timeout=WAIT, source_address=(source, 0)
    )
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        chunk = connection.recv(4096)
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server did not close; it sent {received!r}")


def greeted(server: MailxProcess, source: str, stack: ExitStack) -> socket.socket:
    """A connection that got the 220 greeting (retrying while a slot frees)."""
    for _ in range(RETRIES):
        connection = connect(server, source)
        greeting = connection.recv(512)
        if greeting.startswith(b"220 "):
            return stack.enter_context(connection)
        connection.close()
        time.sleep(0.1)
    raise AssertionError(f"no greeting for {source}: {greeting!r}")


def test_per_client_cap(capped: MailxProcess) -> None:
    """A third connection from one address gets 421 4.7.0 and is closed."""
    with ExitStack() as stack:
        greeted(capped, "127.0.0.9", stack)
        greeted(capped, "127.0.0.9", stack)
        with connect(capped, "127.0.0.9") as third:
            assert read_until_closed(third) == (
                b"421 4.7.0 Too many connections, try again later\r\n"
            )
        greeted(capped, "127.0.0.10", stack)
    log = capped.log()
    assert "reject: connection from [127.0.0.9]: too many connections" in log


def test_overall_cap_and_slots_freed(capped: MailxProcess) -> None:
    """Beyond max_connections anyone gets 421; after a QUIT the slot is free again."""
    with ExitStack() as stack:
        first = greeted(capped, "127.0.0.11", stack)
        greeted(capped, "127.0.0.12", stack)
        greeted(capped, "127.0.0.13", stack)
        with connect(capped, "127.0.0.14") as fourth:
            assert read_until_closed(fourth).startswith(b"421 4.7.0 ")
        first.sendall(b"QUIT\r\n")
        assert read_until_closed(first).startswith(b"221 ")
        greeted(capped, "127.0.0.14", stack)


def test_idle_client_is_timed_out_and_frees_its_slot(tmp_path: Path) -> None:
    """A client that never speaks gets 421 4.4.2 and its slot is given back."""
    server = start_server(
        tmp_path,
        f"idle_timeout = {IDLE_TIMEOUT}\nmax_connections_per_client = 1",
    )
    try:
        with ExitStack() as stack:
            silent = greeted(server, "127.0.0.9", stack)
            assert read_until_closed(silent) == (
                b"421 4.4.2 Idle timeout, closing connection\r\n"
            )
            greeted(server, "127.0.0.9", stack)
    finally:
        server.stop()


def test_trickling_client_is_timed_out(tmp_path: Path) -> None:
    """A client whose octets never complete a command in time is timed out."""
    server = start_server(tmp_path, f"idle_timeout = {IDLE_TIMEOUT}")
    try:
        with ExitStack() as stack:
            slow = greeted(server, "127.0.0.9", stack)
            slow.settimeout(WAIT)
            received = b""
            # One octet of "NOOP" every quarter of the timeout: never a line.
            for octet in b"NOOP" * 8:
                try:
                    slow.sendall(bytes([octet]))
                except OSError:
                    break
                time.sleep(IDLE_TIMEOUT / 4)
                slow.setblocking(False)
                try:
                    received += slow.recv(4096)
                except BlockingIOError:
                    pass
                finally:
                    slow.setblocking(True)
                if received:
                    break
            assert received.startswith(b"421 4.4.2 ")
    finally:
        server.stop()
