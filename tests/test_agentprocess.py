"""
The server's side of its agents (mailx.agentprocess) with real agent
processes, and the real server when its agents die.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import smtplib
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailx import agentprocess
from mailx.agentprocess import MaildirAgent, SpoolAgent
from mailx.config import load_config
from mailx.spool import Remove, SpoolStore, StoreNew
from mailx.tap import MailxService
from tests.conftest import MailLogObserver
from tests.mailxproc import MailxProcess, basic_config, free_port
from tests.test_spool import CONTENT
from tests.test_spool_files import new_message

pytestmark = pytest.mark.integration

# An agent that reads what it is sent and never answers.
SILENT = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
# One that answers nonsense to whatever comes.
BABBLING = [
    sys.executable,
    "-c",
    "import os; os.read(0, 100); os.write(1, b'nonsense\\n'); os.read(0, 100)",
]


def pid_of(agent: MaildirAgent) -> int:
    assert agent.transport is not None
    return int(agent.transport.pid)


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

    def tearDown(self) -> Deferred[list[None]]:  # type: ignore[override]
        for agent in self.agents:
            if agent.running and agent.transport is not None:
                agent.transport.signalProcess("KILL")
        # Each one reaped before the reactor is checked for leftovers.
        return gatherResults([agent.stop() for agent in self.agents])

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
        first = pid_of(agent)
        big = os.urandom(2 * 1024 * 1024)
        assert await agent.submit([(str(alice), big)]) == [None]
        # One agent for many submissions.
        assert pid_of(agent) == first
        assert new_files(alice) == sorted([b"first", big])
        await agent.stop()
        assert not agent.running

    async def test_submissions_in_flight_fail_when_the_agent_dies(self) -> None:
        agent = self.agent(SILENT)
        pending = agent.submit([(str(self.root / "a"), b"x")])
        assert agent.transport is not None
        agent.transport.signalProcess("KILL")
        with pytest.raises(OSError) as failed:
            await pending
        assert failed.value.errno == errno.EIO
        assert "signal 9" in str(failed.value)
        assert any(
            "maildir delivery agent ended (signal 9) with 1 requests unanswered" in line
            for line in self.log.lines
        )

    async def test_the_next_delivery_starts_a_new_agent(self) -> None:
        agent = self.agent()
        assert await agent.submit([(str(self.root / "a"), b"1")]) == [None]
        first = pid_of(agent)
        os.kill(first, signal.SIGKILL)
        while agent.running:  # bounded: the kill ends it at once
            await pause(0.01)
        assert await agent.submit([(str(self.root / "a"), b"2")]) == [None]
        assert pid_of(agent) != first
        assert new_files(self.root / "a") == [b"1", b"2"]
        await agent.stop()

    async def test_what_a_failing_agent_says_reaches_the_log(self) -> None:
        said: list[str] = []

        @implementer(ILogObserver)
        def keep(event: LogEvent) -> None:
            if event.get("log_namespace") == "mailx.agentprocess":
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

    async def test_what_cannot_be_handed_over_fails_alone(self) -> None:
        agent = self.agent()

        def too_big(number: int, parts: object) -> bytes:
            raise struct.error("argument out of range")

        self.patch(  # type: ignore[no-untyped-call]
            agentprocess, "encode_submission", too_big
        )
        with pytest.raises(OSError) as failed:
            await agent.submit([(str(self.root / "a"), b"x")])
        assert failed.value.errno == errno.EFBIG
        await agent.drained()  # nothing was left waiting
        assert not agent.running  # and no agent started for it

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
        self.patch(agentprocess, "STOP_TIMEOUT", 0.2)  # type: ignore[no-untyped-call]
        await agent.stop()
        with pytest.raises(OSError):
            await pending
        assert not agent.running


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def agent_pid(server_pid: int, kind: str) -> int | None:
    """The pid of the server's agent of ``kind`` (maildir, spool), if running."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    for pid in children.read_text().split():
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if kind.encode() in arguments:
            return int(pid)
    return None


def send_and_find_agent(server: MailxProcess, recipient: str, kind: str) -> int:
    """Send a message with Subject 1 to ``recipient``: the agent it started."""
    with smtplib.SMTP(server.address, server.port, timeout=30) as client:
        client.sendmail("s@example.org", [recipient], b"Subject: 1\r\n\r\n")
    assert server.process is not None
    pid = agent_pid(server.process.pid, kind)
    assert pid is not None
    return pid


def kill_and_send_again(server: MailxProcess, recipient: str, kind: str) -> int:
    """
    Send Subject 1 to ``recipient``, kill -9 the agent of ``kind`` it
    started, wait for the mail log to say so, send Subject 2: the new agent.
    """
    first = send_and_find_agent(server, recipient, kind)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: " agent ended (signal 9)" in server.log(), server.log())
    with smtplib.SMTP(server.address, server.port, timeout=30) as client:
        client.sendmail("s@example.org", [recipient], b"Subject: 2\r\n\r\n")
    assert server.process is not None
    second = agent_pid(server.process.pid, kind)
    assert second is not None and second != first
    return second


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


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
        second = kill_and_send_again(server, "alice@example.org", "maildir")
        assert alices_subjects(server) == [b"Subject: 1", b"Subject: 2"]
        assert (
            "maildir delivery agent ended (signal 9) with 0 requests unanswered"
            in server.log()
        )
    finally:
        server.stop()
    # The stopping server closed the agent's input, waited for it and reaped it.
    assert not Path(f"/proc/{second}").exists()


class SpoolAgentTests(TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailx-spool-agent-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.store = SpoolStore(self.directory)
        self.store.prepare()
        self.agent = SpoolAgent(reactor, self.directory)
        self.addCleanup(self.agent.stop)

    async def test_changes_are_applied_and_reported(self) -> None:
        stored = await self.agent.submit(StoreNew.of(new_message("A"), CONTENT))
        assert stored is None
        assert self.store.load_with_content("A") == (new_message("A"), CONTENT)
        assert await self.agent.submit(Remove("A")) is True
        assert await self.agent.submit(Remove("A")) is False
        assert self.store.ids() == []
        await self.agent.drained()

    async def test_a_change_that_failed_fails_alone(self) -> None:
        Path(self.directory, "free", "B").mkdir()
        refused = self.agent.submit(StoreNew.of(new_message("B"), CONTENT))
        stored = self.agent.submit(StoreNew.of(new_message("C"), CONTENT))
        with pytest.raises(OSError):
            await refused
        assert await stored is None
        assert self.store.ids() == ["C"]

    async def test_drained_waits_for_every_answer(self) -> None:
        changes = [
            self.agent.submit(StoreNew.of(new_message(name), CONTENT)) for name in "DEF"
        ]
        await self.agent.drained()
        assert all(change.called for change in changes)
        assert self.store.ids() == ["D", "E", "F"]


def relaying_server(tmp_path: Path) -> MailxProcess:
    """A started server relaying for loopback to a next hop that is down."""
    port = free_port()
    extra = f"""
[relay]
networks = ["127.0.0.0/8"]

[delivery]
smarthost = "127.0.0.1:{free_port()}"

[dns]
servers = ["127.0.0.1:{free_port()}"]
"""
    server = MailxProcess(tmp_path / "mx", basic_config(port, extra=extra), port=port)
    server.start()
    return server


def test_a_relaying_server_survives_its_spool_agent(tmp_path: Path) -> None:
    """
    The spool agent killed between two relayed messages: the second is
    queued by a new agent, both stay queued for the next hop (none is up).
    """
    server = relaying_server(tmp_path)
    queue = SpoolStore(str(server.workdir / "var/mailx/queue"))
    try:
        assert server.process is not None
        second = kill_and_send_again(server, "r@far.test", "spool")
        # It holds the queue's lock as well as the server.
        lock = server.workdir / "var/mailx/queue/lock"
        assert os.readlink(f"/proc/{second}/fd/3") == str(lock)
        subjects = sorted(
            line
            for message_id in queue.ids()
            for line in queue.load_with_content(message_id)[1].splitlines()
            if line.startswith(b"Subject:")
        )
        assert subjects == [b"Subject: 1", b"Subject: 2"]
        assert "spool agent ended (signal 9) with 0 requests unanswered" in server.log()
    finally:
        server.stop()
    assert not Path(f"/proc/{second}").exists()


def test_the_agents_end_when_the_server_is_killed(tmp_path: Path) -> None:
    """kill -9 of the server: its agents read the end of their input and exit."""
    server = relaying_server(tmp_path)
    try:
        assert server.process is not None
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail("s@example.org", ["r@far.test"], b"Subject: 1\r\n\r\n")
            client.sendmail("s@example.org", ["alice@example.org"], b"Subject: 2")
        agents = [agent_pid(server.process.pid, kind) for kind in ("spool", "maildir")]
    finally:
        server.kill()
    assert None not in agents
    wait_for(lambda: all(ended(pid) for pid in agents if pid), f"{agents} run on")


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_at_stop_the_listener_closes_before_the_agent_is_waited_for(
    tmp_path: Path,
) -> None:
    """
    SIGTERM while the Maildir agent is stuck (SIGSTOP) under a delivery: new
    connections are refused at once; once the agent goes on, the message in
    it is delivered and the server ends.
    """
    port = free_port()
    server = MailxProcess(tmp_path / "mx", basic_config(port), port=port)
    server.start()
    assert server.process is not None
    agent = send_and_find_agent(server, "alice@example.org", "maildir")
    os.kill(agent, signal.SIGSTOP)
    stuck = smtplib.SMTP(server.address, server.port, timeout=30)
    try:
        stuck.ehlo()
        stuck.mail("s@example.net")
        stuck.rcpt("alice@example.org")
        stuck.putcmd("data")
        assert stuck.getreply()[0] == 354
        stuck.send(b"Subject: 2\r\n\r\n.\r\n")  # its 250 waits for the agent
        time.sleep(0.5)  # for the server to read it and hand it to the agent
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not _answers(server), "the listener stays open")
    finally:
        os.kill(agent, signal.SIGCONT)
        stuck.close()
    server.process.wait(30)
    if server.process.stdout is not None:
        server.process.stdout.close()
    assert alices_subjects(server) == [b"Subject: 1", b"Subject: 2"]


def alices_subjects(server: MailxProcess) -> list[bytes]:
    """The Subject lines of the messages in alice's Maildir, sorted."""
    return sorted(
        line
        for message in server.messages("example.org", "alice")
        for line in message.splitlines()
        if line.startswith(b"Subject:")
    )


def _answers(server: MailxProcess) -> bool:
    try:
        with socket.create_connection((server.address, server.port), timeout=2):
            return True
    except OSError:
        return False


class FakeAgent:
    """An agent as MailxService sees it; hung until killed, if ``hung``."""

    def __init__(self, name: str, hung: bool) -> None:
        self.name = name
        self.running = True
        self.unanswered = 1 if hung else 0
        self.answered = 0
        self.killed = False
        self._ended: Deferred[None] = Deferred()
        if not hung:
            self._ended.callback(None)

    def stop(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._ended.addBoth(lambda _: waiter.callback(None))
        return waiter

    def kill(self) -> None:
        self.killed = True
        self.running = False
        if not self._ended.called:
            self._ended.callback(None)


def stopping_service(
    clock: Clock, maildir: FakeAgent, spool: FakeAgent
) -> list[object]:
    """Stop a MailxService with these agents; a list that gets an item once done."""
    service = MailxService(load_config(None), None, clock)
    service.parts = cast(Any, SimpleNamespace(agent=maildir))
    service.spool_agent = cast(Any, spool)
    stopping = service.stopService()
    assert isinstance(stopping, Deferred)
    stopped: list[object] = []
    stopping.addBoth(stopped.append)
    return stopped


def test_an_agent_hung_at_stop_is_killed(clock: Clock, mail_log: list[str]) -> None:
    """A disk that does not answer cannot keep the server from ending."""
    maildir, spool = FakeAgent("maildir delivery", hung=True), FakeAgent("spool", False)
    stopped = stopping_service(clock, maildir, spool)
    clock.advance(agentprocess.STOP_TIMEOUT - 1)
    assert not stopped and not maildir.killed
    clock.advance(1)
    assert maildir.killed and stopped
    assert not spool.killed
    assert mail_log == [
        "mailx stopping: open sessions get 421, deliveries under way finish",
        "maildir delivery agent answered nothing for 60 s while the server stops:"
        " killing it",
        "mailx stopped",
    ]
    assert clock.getDelayedCalls() == []


def test_an_agent_still_answering_at_stop_is_let_finish(clock: Clock) -> None:
    maildir, spool = FakeAgent("maildir delivery", hung=True), FakeAgent("spool", False)
    stopped = stopping_service(clock, maildir, spool)
    maildir.answered += 5  # slow, but working
    clock.advance(agentprocess.STOP_TIMEOUT)
    assert not maildir.killed and not stopped
    clock.advance(agentprocess.STOP_TIMEOUT)
    assert maildir.killed and stopped


def test_nothing_keeps_the_agents_from_starting_here() -> None:
    assert agentprocess.start_problem() is None


def test_a_python_that_cannot_be_run_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = tmp_path / "python3"
    python.write_text("not runnable\n")
    python.chmod(0o644)
    monkeypatch.setattr(sys, "executable", str(python))
    assert agentprocess.start_problem() == f"cannot run {python}"


def test_the_start_says_when_the_agents_cannot_start(
    clock: Clock, mail_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailx.tap.start_problem", lambda: "cannot run /x/python3")
    service = MailxService(load_config(None), None, clock)
    service.parts = cast(Any, SimpleNamespace(agent=FakeAgent("maildir", False)))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        service.startService()
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert mail_log[0] == (
        "the agents cannot start (cannot run /x/python3): local mail is queued"
        " and mail to queue is refused with 451 until they can"
    )
