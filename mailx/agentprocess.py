"""
The server's side of its agents (``mailx.agents``): each is started when
its first submission comes, is handed submissions through a pipe and fires
each one's Deferred with the agent's answer.

If an agent ends with submissions unanswered, those fail, the mail log says
so, and the next submission starts a new agent.  For the Maildir agent the
router then queues the copies (``mailx.router``); for the spool agent a new
message is refused with 451 (the client sends it again) and a removal stays
undone (the message is delivered again).  What the agent had done and not
yet reported may so happen twice; nothing is lost.

``MaildirAgent.submit`` keeps the contract of ``mailx.router.GroupCommit``,
``SpoolAgent`` that of the ``GroupJob`` over ``SpoolStore.apply``.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mailx.agents import (
    WireError,
    decode_answer,
    encode_submission,
    maildir_parts,
    os_error,
)
from mailx.maillog import PrintableLogger, maillog
from mailx.sendnow import write_pipe_now
from mailx.spool import Remove, SpoolChange, StoreNew

_log = PrintableLogger()

JobErrors = list[OSError | None]

# How long a stopping server waits for an agent to finish its batch.
STOP_TIMEOUT = 60.0


def agent_command(*arguments: str) -> list[str]:
    """
    An agent's command line: this Python, isolated from the environment's
    PYTHON* variables, importing mailx from where the server imported it.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from mailx.agents import main; main(sys.argv[1:])"
    )
    return [sys.executable, "-I", "-c", code, *arguments]


def start_problem() -> str | None:
    """
    Why this process could not start its agents, as far as can be told
    without starting one: the Python it runs or mailx's files out of its
    reach (``twistd --uid`` to a user without access to them), mailx's
    files gone (an upgrade under a running server).  None if none is seen.
    """
    agents = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents.py")
    if not os.access(sys.executable, os.X_OK):
        return f"cannot run {sys.executable}"
    if not os.access(agents, os.R_OK):
        return f"cannot read {agents}"
    return None


class AgentProcess(ProcessProtocol):
    """One agent process, started on demand; ``name`` is for the logs."""

    def __init__(
        self,
        reactor: Any,
        name: str,
        command: Sequence[str],
        inherit: dict[int, int] | None = None,
    ) -> None:
        # reactor: IReactorProcess and IReactorTime.
        self._reactor = reactor
        self.name = name
        self._command = list(command)
        # The agent's descriptors, beyond its pipes: its own -> the server's.
        self._inherit = dict(inherit or {})
        self._number = 0
        self._answered = 0
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._partial = b""
        self._said = b""
        self._running = False
        self._stopping = False
        self._stopped: list[Deferred[None]] = []
        self._drained: list[Deferred[None]] = []
        self._stop_timer: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def answered(self) -> int:
        """How many submissions the agents of this object have answered."""
        return self._answered

    @property
    def unanswered(self) -> int:
        """How many submissions wait for the agent's answer."""
        return len(self._pending)

    def submit_parts(self, parts: Sequence[bytes]) -> Deferred[dict[str, Any]]:
        """Fire with the agent's answer to one submission."""
        if self._stopping:
            return fail(OSError(errno.ESHUTDOWN, "the server is stopping"))
        try:
            data = encode_submission(self._number + 1, parts)
        except (struct.error, OverflowError, MemoryError) as error:
            return fail(OSError(errno.EFBIG, f"cannot hand it to the agent: {error}"))
        if not self._running:
            try:
                self._start()
            except OSError as error:
                return fail(error)
        self._number += 1
        done: Deferred[dict[str, Any]] = Deferred()
        self._pending[self._number] = done
        assert self.transport is not None
        # At once when the pipe takes it: no turn of the reactor, no epoll_ctl.
        stdin = getattr(self.transport, "pipes", {}).get(0)
        if stdin is not None:
            write_pipe_now(stdin, data)
        else:
            self.transport.write(data)
        return done

    def drained(self) -> Deferred[None]:
        """Fire once no submission waits for its answer."""
        if not self._pending:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drained.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """
        Close the agent's input: it answers what it has and exits.  Fire
        once it has; after ``STOP_TIMEOUT`` seconds it is killed.  Later
        submissions fail.
        """
        self._stopping = True
        if not self._running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped.append(waiter)
        if self._stop_timer is None:
            assert self.transport is not None
            self.transport.closeStdin()
            self._stop_timer = self._reactor.callLater(STOP_TIMEOUT, self.kill)
        return waiter

    def _start(self) -> None:
        self._reactor.spawnProcess(
            self,
            self._command[0],
            self._command,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r", **self._inherit},
        )
        self._running = True

    def kill(self) -> None:
        """End the agent at once (SIGKILL); what it had not answered fails."""
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        if self._running and self.transport is not None:
            self.transport.signalProcess("KILL")

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                number, answer = decode_answer(line)
                done = self._pending.pop(number)
            except (WireError, KeyError) as error:
                maillog.error(
                    "{agent} agent answered what was not asked ({error}): stopping it",
                    agent=self.name,
                    error=str(error),
                )
                self.kill()
                return
            self._answered += 1
            done.callback(answer)
        if not self._pending:
            self._fire_drained()

    def errReceived(self, data: bytes) -> None:
        # A traceback, if the agent failed: into the twistd log, by lines.
        lines = (self._said + data).split(b"\n")
        self._said = lines.pop()
        for line in lines:
            self._log_said(line)

    def _log_said(self, line: bytes) -> None:
        _log.error(
            "{agent} agent: {text}",
            agent=self.name,
            text=line.decode("utf-8", "replace"),
        )

    def processEnded(self, reason: Failure) -> None:
        self._running = False
        self._partial = b""
        if self._said:
            self._log_said(self._said)
            self._said = b""
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        pending, self._pending = self._pending, {}
        how = how_it_ended(reason)
        if not self._stopping or pending:
            maillog.error(
                "{agent} agent ended ({how}) with {count} requests unanswered;"
                " the next request starts a new one",
                agent=self.name,
                how=how,
                count=len(pending),
            )
        for done in pending.values():
            done.errback(
                Failure(OSError(errno.EIO, f"the {self.name} agent ended ({how})"))
            )
        self._fire_drained()
        waiters, self._stopped = self._stopped, []
        for waiter in waiters:
            waiter.callback(None)

    def _fire_drained(self) -> None:
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            waiter.callback(None)


def how_it_ended(reason: Failure) -> str:
    """A process's end in plain words: "exit status N" or "signal N"."""
    if isinstance(reason.value, ProcessTerminated):
        if reason.value.signal is not None:
            return f"signal {reason.value.signal}"
        return f"exit status {reason.value.exitCode}"
    return "exit status 0"


class MaildirAgent(AgentProcess):
    """Writes Maildirs through the Maildir delivery agent."""

    def __init__(self, reactor: Any, command: Sequence[str] | None = None) -> None:
        super().__init__(
            reactor,
            "maildir delivery",
            command if command is not None else agent_command("maildir"),
        )

    def submit(
        self, jobs: Sequence[tuple[str, bytes | tuple[bytes, ...]]]
    ) -> Deferred[JobErrors]:
        """Fire with each job's error (None when written), in order."""
        if not jobs:
            return succeed([])
        count = len(jobs)

        def errors(answer: dict[str, Any]) -> JobErrors:
            found = answer.get("errors")
            if not isinstance(found, list) or len(found) != count:
                raise OSError(errno.EIO, f"the {self.name} agent answered {answer!r}")
            return [None if error is None else os_error(error) for error in found]

        return self.submit_parts(maildir_parts(jobs)).addCallback(errors)


class SpoolAgent(AgentProcess):
    """Stores and removes spool messages through the spool agent."""

    def __init__(
        self,
        reactor: Any,
        directory: str,
        command: Sequence[str] | None = None,
        lock: int | None = None,
    ) -> None:
        # ``lock``: the descriptor of the queue's lock (``tap._lock_queue``),
        # held by the agent as well while it lives.
        super().__init__(
            reactor,
            "spool",
            command if command is not None else agent_command("spool", directory),
            {3: lock} if lock is not None else None,
        )

    def submit(self, change: SpoolChange) -> Deferred[bool | None]:
        """
        Fire with None for a stored message, with whether a removed one was
        there; fail with this change's error, or the whole batch's.
        """
        if isinstance(change, StoreNew):
            message_id = change.message_id.encode("ascii")
            parts = [b"store", message_id, change.envelope, change.content]
        else:
            assert isinstance(change, Remove)
            reuse = b"1" if change.reuse else b"0"
            leftovers = b"1" if change.leftovers else b"0"
            parts = [b"remove", change.message_id.encode("ascii"), reuse, leftovers]
        return self.submit_parts(parts).addCallback(self._result)

    def _result(self, answer: dict[str, Any]) -> bool | None:
        if "failed" in answer:
            raise os_error(answer["failed"])
        result = answer.get("result")
        if result is None or isinstance(result, bool):
            return result
        raise os_error(result)
