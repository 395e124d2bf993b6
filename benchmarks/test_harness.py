"""
The benchmark harness itself: its checks, its table, the configuration it
writes for mailx, and a small run of it end to end.

Run with ``.venv/bin/python -m pytest benchmarks``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from benchmarks import idle, procstat, queued, run
from benchmarks.servers import Target, mailx_config
from mailx.config import load_config
from tests.peers.postfix import postfix_available, why_unavailable


def _maildir_file(directory: Path, name: str, message_id: str) -> Path:
    path = directory / name
    path.write_bytes(f"Message-Id: <{message_id}>\r\n\r\nbody\r\n".encode())
    return path


def test_exactly_once_passes_when_every_message_is_there(tmp_path: Path) -> None:
    """One file per message, each with its own Message-Id, passes the check."""
    files = [_maildir_file(tmp_path, f"m{i}", f"id{i}@x") for i in range(3)]

    assert run.check_exactly_once(files, 3) == ""


def test_exactly_once_fails_on_a_lost_message(tmp_path: Path) -> None:
    """Fewer files than messages sent fails the run."""
    files = [_maildir_file(tmp_path, f"m{i}", f"id{i}@x") for i in range(2)]

    assert (
        run.check_exactly_once(files, 3) == "2 files in the Maildir for 3 messages sent"
    )


def test_exactly_once_fails_on_a_duplicate(tmp_path: Path) -> None:
    """Two files with the same Message-Id fail the run even when the count fits."""
    files = [
        _maildir_file(tmp_path, "m0", "id0@x"),
        _maildir_file(tmp_path, "m1", "id0@x"),
        _maildir_file(tmp_path, "m2", "id2@x"),
    ]

    assert run.check_exactly_once(files, 3) == "1 messages delivered more than once"


def test_smtp_source_command_has_the_issue_defaults() -> None:
    """By default 20 sessions send 4 KiB messages to one loopback target."""
    target = Target("127.0.0.10", 2600, "bench@bench.test")

    command = run.smtp_source_command(run.Load(messages=10), target)

    assert command[0] == run.SMTP_SOURCE
    assert command[command.index("-s") + 1] == "20"
    assert command[command.index("-l") + 1] == "4096"
    assert command[command.index("-m") + 1] == "10"
    assert "-d" not in command
    assert command[-1] == "127.0.0.10:2600"


def test_ratios_use_rounds_where_both_counted() -> None:
    """A round with a failed run is left out of the ratios and their median."""
    results = [
        run.Result(1, "A", "mailx", 10, accepted_per_second=200.0),
        run.Result(1, "B", "postfix", 10, accepted_per_second=100.0),
        run.Result(2, "A", "mailx", 10, accepted_per_second=900.0, error="lost"),
        run.Result(2, "B", "postfix", 10, accepted_per_second=100.0),
        run.Result(3, "A", "mailx", 10, accepted_per_second=300.0),
        run.Result(3, "B", "postfix", 10, accepted_per_second=100.0),
    ]

    lines = run.format_ratios(results, {"A": "mailx", "B": "postfix"})

    assert lines[0] == "mailx / postfix, per round, then the median:"
    assert "  accepted/s   2.00 3.00   median 2.50" in lines


def test_mailx_config_is_accepted_by_mailx(tmp_path: Path) -> None:
    """The TOML written for mailx loads, and keeps DNS on a loopback port."""
    target = Target("127.0.0.10", 2600, "bench@bench.test")
    path = tmp_path / "mailx.toml"
    path.write_text(mailx_config(tmp_path, target, 5353))

    config = load_config(str(path))

    assert config.server.listen == ("tcp:2600:interface=127.0.0.10",)
    assert config.domains.local == ("bench.test",)
    assert [server.host for server in config.dns.servers] == ["127.0.0.1"]


def test_mailx_relay_config_names_the_next_hop(tmp_path: Path) -> None:
    """For the relay measurement mailx sends everything to the loopback next hop."""
    target = Target("127.0.0.10", 2600, "bench@bench.test")
    next_hop = Target("127.0.0.20", 2700, "bench@bench.test")
    path = tmp_path / "mailx.toml"
    path.write_text(mailx_config(tmp_path, target, 5353, next_hop))

    config = load_config(str(path))

    assert config.delivery.smarthost == ("127.0.0.20", 2700)
    assert "bench.test" not in config.domains.local


def test_cpu_and_memory_of_this_session_are_read() -> None:
    """The harness reads a positive CPU time and peak memory for a live session."""
    session = os.getsid(0)
    memory = procstat.Memory()

    procstat.sample_memory(session, memory)

    assert os.getpid() in procstat.session_pids(session)
    assert procstat.cpu_seconds(session) > 0
    assert memory.rss_peak > 0 and memory.pss_peak > 0


@pytest.mark.integration
def test_small_run_of_sink_against_sink(capsys: pytest.CaptureFixture[str]) -> None:
    """A small run of the plain server on both sides counts and prints a table."""
    if not os.path.exists(run.SMTP_SOURCE):
        pytest.skip("smtp-source comes with postfix: run .ci/install-peers.sh")

    status = run.main(["--a", "sink", "--b", "sink", "--messages", "40"])

    out = capsys.readouterr().out
    assert status == 0, out
    rows = re.findall(r"^ +\d+ sink +\d+ +\d+ .*  ok$", out, re.MULTILINE)
    assert len(rows) == 6, out
    assert "sink / sink, per round, then the median:" in out


@pytest.mark.integration
def test_small_relay_run_through_postfix(capsys: pytest.CaptureFixture[str]) -> None:
    """Postfix relaying to the sink next hop counts every message there once."""
    if not postfix_available():
        pytest.skip(why_unavailable())

    argv = ["--scenario", "relay", "--a", "postfix", "--b", "postfix"]
    status = run.main([*argv, "--messages", "40", "--rounds", "1"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "scenario: relayed to a sink on 127.0.0.20" in out
    rows = re.findall(r"^ +1 postfix +\d+ +\d+ .*  ok$", out, re.MULTILINE)
    assert len(rows) == 2, out


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["maildir", "relay"])
def test_small_run_of_mailx_against_postfix(
    scenario: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's benchmark runs on a small load and every message lands once."""
    if not postfix_available():
        pytest.skip(why_unavailable())

    argv = ["--scenario", scenario, "--a", "mailx", "--b", "postfix"]
    status = run.main([*argv, "--messages", "300", "--rounds", "1"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"^ +1 mailx +\d+ +\d+ .*  ok$", out, re.MULTILINE), out
    assert re.search(r"^ +1 postfix +\d+ +\d+ .*  ok$", out, re.MULTILINE), out
    assert "mailx / postfix, per round, then the median:" in out


def test_sink_refuses_to_relay(capsys: pytest.CaptureFixture[str]) -> None:
    """Asking the sink server to relay fails its runs instead of measuring."""
    if not os.path.exists(run.SMTP_SOURCE):
        pytest.skip("smtp-source comes with postfix: run .ci/install-peers.sh")

    argv = ["--scenario", "relay", "--a", "sink", "--b", "sink"]
    status = run.main([*argv, "--messages", "5", "--rounds", "1"])

    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED: ServerError: the sink server does not relay" in out


@pytest.mark.integration
def test_idle_connections_are_held_and_greeted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The idle measurement holds every connection open and counts greetings."""
    status = idle.main(["--servers", "sink", "--connections", "30", "--wait", "5"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"^sink +30 +30 +\d+\.\d +\d+\.\d$", out, re.MULTILINE), out


class _FakeServer:
    """A server whose Maildir stays empty and that may have exited."""

    name = "fake"

    def __init__(self, running: bool) -> None:
        self.up = running

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def session(self) -> int:
        return os.getsid(0)

    def running(self) -> bool:
        return self.up

    def delivered(self) -> list[Path]:
        return []


def test_waiting_for_deliveries_ends_when_a_server_exits() -> None:
    """A server that exited ends the wait at once instead of at the timeout."""
    counter = _FakeServer(running=True)
    exited = _FakeServer(running=False)

    files = run.wait_for_deliveries(counter, 10, timeout=3600, watched=[exited])

    assert files == []


@pytest.mark.integration
def test_queued_start_delivers_the_spool_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """mailx started on a filled spool delivers every queued message once."""
    status = queued.main(["--messages", "30", "--drain", "--timeout", "120"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "mailx starting with 30 queued messages" in out
    assert "check: ok" in out
