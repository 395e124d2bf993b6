"""
The server's side of the Maildir delivery agent (mailx.maildir_agent) with a
real agent process, and the real server when its agent dies.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import smtplib
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailx import maildir_agent
from mailx.maildir_agent import MaildirAgent
from tests.conftest import MailLogObserver
from tests.mailxproc import MailxProcess, basic_config, free_port

pytestmark = pytest.mark.integration

# An agent that reads what it is sent and never answers.
SILENT = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
# One that answers nonsense to whatever comes.
BABBLING = [
    sys.executable,
    "-c",
    "import os; os.read(0, 100); os.write(1, b'nonsense\\n'); os.read(0, 100)",
]


def new_files(maildir: Path) -> list[bytes]:
    return sorted(path.read_bytes() for path in (maildir / "new").iterdir())


class AgentTests(TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailx-agent-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.log = MailLogObserver()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.agents: list[MaildirAgent] = []

    def tearDown(self) -> None:
        for agent in self.agents:
            if agent.running and agent.transport is not None:
                agent.transport.signalProcess("KILL")

    def agent(self, command: list[str] | None = None) -> MaildirAgent:
        agent = MaildirAgent(reactor, command)
        self.agents.append(agent)
        return agent

    async def test_jobs_are_written_and_each_error_is_reported(self) -> None:
        agent = self.agent()
        alice = self.root / "alice"
        (self.root / "plain").write_text("not a directory")
        errors = await agent.submit(
            [(str(alice), b"first"), (str(self.root / "plain" / "bob"), b"x")]
        )
        assert errors[0] is None
        assert isinstance(errors[1], OSError)
        assert errors[1].errno in (errno.EEXIST, errno.ENOTDIR)
        first = agent.transport.pid  # type: ignore[union-attr]
        big = os.urandom(2 * 1024 * 1024)
        assert await agent.submit([(str(alice), big)]) == [None]
        # One agent for many submissions.
        assert agent.transport.pid == first  # type: ignore[union-attr]
        assert new_files(alice) == sorted([b"first", big])
        await agent.stop()
        assert not agent.running

    async def test_submissions_in_flight_fail_when_the_agent_dies(self) -> None:
        agent = self.agent(SILENT)
        pending = agent.submit([(str(self.root / "a"), b"x")])
        agent.transport.signalProcess("KILL")  # type: ignore[union-attr]
        with pytest.raises(OSError) as failed:
            await pending
        assert failed.value.errno == errno.EIO
        assert "signal 9" in str(failed.value)
        assert any(
            "maildir delivery agent ended (signal 9) with 1 deliveries unconfirmed"
            in line
            for line in self.log.lines
        )

    async def test_the_next_delivery_starts_a_new_agent(self) -> None:
        agent = self.agent()
        assert await agent.submit([(str(self.root / "a"), b"1")]) == [None]
        first = agent.transport.pid  # type: ignore[union-attr]
        os.kill(first, signal.SIGKILL)
        while agent.running:  # bounded: the kill ends it at once
            await pause(0.01)
        assert await agent.submit([(str(self.root / "a"), b"2")]) == [None]
        assert agent.transport.pid != first  # type: ignore[union-attr]
        assert new_files(self.root / "a") == [b"1", b"2"]
        await agent.stop()

    async def test_what_a_failing_agent_says_reaches_the_log(self) -> None:
        said: list[str] = []

        @implementer(ILogObserver)
        def keep(event: LogEvent) -> None:
            if event.get("log_namespace") == "mailx.maildir_agent":
                said.append(formatEvent(event))

        globalLogPublisher.addObserver(keep)
        self.addCleanup(globalLogPublisher.removeObserver, keep)
        agent = self.agent(
            [
                sys.executable,
                "-c",
                "import os; os.read(0, 1); raise SystemExit('broke')",
            ]
        )
        with pytest.raises(OSError) as failed:
            await agent.submit([(str(self.root / "a"), b"x")])
        assert "exit status 1" in str(failed.value)
        assert said == ["maildir delivery agent: broke"]

    async def test_an_agent_answering_nonsense_is_stopped(self) -> None:
        agent = self.agent(BABBLING)
        with pytest.raises(OSError):
            await agent.submit([(str(self.root / "a"), b"x")])
        assert not agent.running
        assert any(
            "maildir delivery agent answered what was not asked" in line
            for line in self.log.lines
        )

    async def test_stop_waits_for_the_answers_then_refuses_more(self) -> None:
        agent = self.agent()
        copies = [agent.submit([(str(self.root / "a"), b"%d" % n)]) for n in range(5)]
        await agent.stop()
        for copy in copies:
            assert await copy == [None]
        assert len(new_files(self.root / "a")) == 5
        with pytest.raises(OSError) as refused:
            await agent.submit([(str(self.root / "a"), b"late")])
        assert refused.value.errno == errno.ESHUTDOWN
        # A stop that waited for nothing left nothing to log.
        assert not any("delivery agent" in line for line in self.log.lines)

    async def test_an_agent_that_does_not_finish_is_killed_at_stop(self) -> None:
        agent = self.agent([sys.executable, "-c", "import signal; signal.pause()"])
        pending = agent.submit([(str(self.root / "a"), b"x")])
        self.patch(maildir_agent, "STOP_TIMEOUT", 0.2)  # type: ignore[no-untyped-call]
        await agent.stop()
        with pytest.raises(OSError):
            await pending
        assert not agent.running


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def agent_pids(server_pid: int) -> list[int]:
    """The server's child processes: its delivery agent."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_the_server_survives_its_agent_and_loses_no_mail(tmp_path: Path) -> None:
    """
    The agent killed between two messages: the second is delivered by a new
    agent; the mail log says what happened; at stop no agent is left.
    """
    port = free_port()
    server = MailxProcess(tmp_path / "mx", basic_config(port), port=port)
    server.start()
    try:
        assert server.process is not None
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail(
                "s@example.net", ["alice@example.org"], b"Subject: 1\r\n\r\n"
            )
        (first,) = agent_pids(server.process.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "maildir delivery agent ended" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail(
                "s@example.net", ["alice@example.org"], b"Subject: 2\r\n\r\n"
            )
        (second,) = agent_pids(server.process.pid)
        assert second != first
        subjects = [
            line
            for message in server.messages("example.org", "alice")
            for line in message.splitlines()
            if line.startswith(b"Subject:")
        ]
        assert sorted(subjects) == [b"Subject: 1", b"Subject: 2"]
        assert (
            "maildir delivery agent ended (signal 9) with 0 deliveries unconfirmed"
            in server.log()
        )
    finally:
        server.stop()
    # The stopping server closed the agent's input, waited for it and reaped it.
    assert not Path(f"/proc/{second}").exists()
