"""
The server's side of the Maildir delivery agent (``mailx.deliveryagent``):
starts the agent when the first delivery comes, hands it each message's
Maildir jobs and fires each submission's Deferred with the agent's answer.

``MaildirAgent.submit`` keeps the contract of ``mailx.router.GroupCommit``:
it fires with the error of each job, None for one that was written, and
fails only when the batch failed as a whole.  If the agent ends with
submissions unanswered, those fail (the router queues their copies for a
retry, or the client is told 451); the next delivery starts a new agent.
A copy the agent renamed into new/ and had not yet reported may then arrive
twice; none is lost.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailx.deliveryagent import (
    Job,
    WireError,
    decode_answer,
    encode_submission,
)
from mailx.maillog import maillog

JobErrors = list[OSError | None]

_log = Logger()

# How long a stopping server waits for the agent to finish its batch.
STOP_TIMEOUT = 60.0


def agent_command() -> list[str]:
    """
    The agent's command line: this Python, isolated from the environment's
    PYTHON* variables, importing mailx from where the server imported it.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from mailx.deliveryagent import main; main()"
    )
    return [sys.executable, "-I", "-c", code]


class MaildirAgent(ProcessProtocol):
    """Writes Maildirs through a delivery agent process."""

    def __init__(self, reactor: Any, command: Sequence[str] | None = None) -> None:
        # reactor: IReactorProcess and IReactorTime.
        self._reactor = reactor
        self._command = list(command) if command is not None else agent_command()
        self._number = 0
        self._pending: dict[int, Deferred[JobErrors]] = {}
        self._partial = b""
        self._said = b""
        self._running = False
        self._stopping = False
        self._stopped: list[Deferred[None]] = []
        self._stop_timer: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, jobs: Sequence[Job]) -> Deferred[JobErrors]:
        """Fire with each job's error (None when written), in order."""
        if not jobs:
            return succeed([])
        if self._stopping:
            return fail(OSError(errno.ESHUTDOWN, "the server is stopping"))
        if not self._running:
            try:
                self._start()
            except OSError as error:
                return fail(error)
        self._number += 1
        done: Deferred[JobErrors] = Deferred()
        self._pending[self._number] = done
        assert self.transport is not None
        self.transport.write(encode_submission(self._number, jobs))
        return done

    def stop(self) -> Deferred[None]:
        """
        Close the agent's input: it answers what it has and exits.  Fire
        once it has; after ``STOP_TIMEOUT`` seconds it is killed.
        """
        self._stopping = True
        if not self._running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped.append(waiter)
        if self._stop_timer is None:
            assert self.transport is not None
            self.transport.closeStdin()
            self._stop_timer = self._reactor.callLater(STOP_TIMEOUT, self._kill)
        return waiter

    def _start(self) -> None:
        self._reactor.spawnProcess(
            self,
            self._command[0],
            self._command,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self._running = True

    def _kill(self) -> None:
        self._stop_timer = None
        if self._running and self.transport is not None:
            self.transport.signalProcess("KILL")

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                number, errors = decode_answer(line)
                done = self._pending.pop(number)
            except (WireError, KeyError) as error:
                maillog.error(
                    "maildir delivery agent answered what was not asked"
                    " ({error}): stopping it",
                    error=str(error),
                )
                self._kill()
                return
            done.callback(errors)

    def errReceived(self, data: bytes) -> None:
        # A traceback, if the agent failed: into the twistd log, by lines.
        lines = (self._said + data).split(b"\n")
        self._said = lines.pop()
        for line in lines:
            self._log_said(line)

    def _log_said(self, line: bytes) -> None:
        _log.error(
            "maildir delivery agent: {text}", text=line.decode("utf-8", "replace")
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
        how = _how_it_ended(reason)
        if not self._stopping or pending:
            maillog.error(
                "maildir delivery agent ended ({how}) with {count} deliveries"
                " unconfirmed; the next delivery starts a new one",
                how=how,
                count=len(pending),
            )
        for done in pending.values():
            done.errback(
                Failure(OSError(errno.EIO, f"the Maildir delivery agent ended ({how})"))
            )
        waiters, self._stopped = self._stopped, []
        for waiter in waiters:
            waiter.callback(None)


def _how_it_ended(reason: Failure) -> str:
    if isinstance(reason.value, ProcessTerminated):
        if reason.value.signal is not None:
            return f"signal {reason.value.signal}"
        return f"exit status {reason.value.exitCode}"
    return "exit status 0"
