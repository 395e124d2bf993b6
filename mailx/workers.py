"""
Worker processes: SMTP on every core (``server.workers``).

One reactor uses one core.  With ``server.workers = N`` the twistd process
(the *main* process) binds the listeners, then starts N - 1 worker
processes that accept connections on the very same listening sockets, so
the kernel spreads new connections over N processes, as Postfix spreads
them over its smtpd processes.

A worker runs whole SMTP sessions and writes local mail into the Maildirs
itself.  Mail it must pass on (relay, backup MX) it hands to the main
process over SMTP on a UNIX socket (the *handoff* listener, next to the
control socket), on connections it keeps open from one message to the next,
and says 250 to its client only after the main process has said 250, that
is after the message is durable in the one spool.  The main
process alone runs the spool, its retries and the queue commands, so
``mailx queue`` sees one queue.

A worker reads its standard input, a pipe from the main process, and stops
when it closes: workers never outlive their main process, whatever ends it.
The main process starts a worker again when one exits while it runs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure

from mailx import replies
from mailx.agentprocess import how_it_ended
from mailx.client import (
    ClientSession,
    SessionOutcome,
    SMTPClientProtocol,
    Timeouts,
    TLSMode,
    Transaction,
    nothing_taken,
)
from mailx.envelope import Envelope, Route
from mailx.maillog import PrintableLogger, maillog
from mailx.replies import Reply, ReplyError

log = PrintableLogger()

# Idle connections a worker keeps to the main process's handoff listener,
# which closes them after its idle timeout.
MAX_KEPT = 8
# A worker that exits is started again after this many seconds.
RESTART_DELAY = 1.0
# SIGTERM first; a worker still running after this long gets SIGKILL.
STOP_TIMEOUT = 10.0


def handoff_path(control_socket: str) -> str:
    """The handoff socket lives beside the control socket."""
    return os.path.join(os.path.dirname(control_socket) or ".", "handoff.sock")


class HandoffQueue:
    """
    A worker's queue: the main process's spool, reached over SMTP.  A
    connection that took a message stays open for the next (at most
    ``MAX_KEPT`` of them), as outbound connections do (mailx.outbound).
    """

    def __init__(self, reactor: Any, path: str, hostname: str) -> None:
        self.reactor = reactor
        self.path = path
        self.hostname = hostname
        self.timeouts = Timeouts(connect=30, greeting=60, mail=60, rcpt=60)
        self._kept: list[SMTPClientProtocol] = []

    def enqueue(self, envelope: Envelope, content: bytes) -> Deferred[str]:
        return Deferred.fromCoroutine(self._hand_off(envelope, content))

    async def _hand_off(self, envelope: Envelope, content: bytes) -> str:
        recipients = envelope.recipients
        transaction = Transaction(
            reverse_path=envelope.reverse_path,
            recipients=[r.address for r in recipients],
            content=content,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
            notify=[r.notify for r in recipients],
            orcpt=[r.orcpt for r in recipients],
            # A Maildir this worker could not write: the main process writes
            # it as named (mailx.router), with no alias expanded again.
            mailbox=[r.route is Route.MAILBOX for r in recipients],
        )
        outcome = await self._over_kept(transaction)
        if outcome is None:
            outcome = await self._over_new(transaction)
        for index in range(len(recipients)):
            reply = outcome.replies.get(index, outcome.failure)
            # Taken only on a 2xx to the end of the data (RFC 5321 4.3.2).
            if reply is None or not 200 <= reply.code < 300:
                raise ReplyError(reply or replies.LOCAL_ERROR)
        return envelope.message_id

    async def _over_kept(self, transaction: Transaction) -> SessionOutcome | None:
        """The outcome over a kept connection; None if none took it."""
        while self._kept:
            protocol = self._kept.pop()
            if not protocol.idle:
                continue
            outcome = await protocol.start_next(transaction)
            if nothing_taken(outcome, protocol.session.last_reply):
                continue
            self._keep(protocol)
            return outcome
        return None

    async def _over_new(self, transaction: Transaction) -> SessionOutcome:
        session = ClientSession(
            self.hostname, transaction, tls_mode=TLSMode.NONE, reuse=True
        )
        protocol = SMTPClientProtocol(session, self.reactor, self.timeouts)
        endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=30)
        try:
            await endpoint.connect(_Once(protocol))
        except Exception as error:
            log.error("handoff to the main process failed: {error}", error=error)
            raise ReplyError(replies.LOCAL_ERROR) from error
        outcome = await protocol.done
        self._keep(protocol)
        return outcome

    def _keep(self, protocol: SMTPClientProtocol) -> None:
        if not protocol.idle:
            return
        if len(self._kept) >= MAX_KEPT:
            protocol.close()
            return
        self._kept.append(protocol)


class _Once(Factory):
    """A factory that gives out one protocol instance it was handed."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.instance


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self._log_lines(data)

    def errReceived(self, data: bytes) -> None:
        self._log_lines(data)

    def _log_lines(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            log.info(
                "worker {index}: {line}",
                index=self.index,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    """Starts the worker processes and keeps them running."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        config_path: str | None,
        listeners: Sequence[Any],
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        # The main process's bound listeners (each with .port), in the order
        # of the configuration: the workers share their sockets.
        self.listeners = listeners
        self.processes: dict[int, tuple[_WorkerProcess, Any]] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        arguments = [sys.executable, "-m", "mailx.workers", "--index", str(index)]
        arguments += ["--parent", str(os.getpid())]
        if self.config_path is not None:
            arguments += ["--config", os.path.abspath(self.config_path)]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for number, listener in enumerate(self.listeners):
            child = 3 + number
            child_fds[child] = listener.port.fileno()
            family = int(listener.port.socket.family)
            arguments += ["--listener", f"{number}:{child}:{family}"]
        protocol = _WorkerProcess(self, index)
        transport = self.reactor.spawnProcess(
            protocol,
            sys.executable,
            arguments,
            env=dict(os.environ),
            childFDs=child_fds,
        )
        self.processes[index] = (protocol, transport)
        log.info("worker {index} started, pid {pid}", index=index, pid=transport.pid)

    def signal_all(self, name: str) -> None:
        """Pass a signal on to every worker (SIGHUP: read the certificate)."""
        for _, transport in self.processes.values():
            transport.signalProcess(name)

    def worker_ended(self, protocol: _WorkerProcess, reason: Failure) -> None:
        self.processes.pop(protocol.index, None)
        if not self.running:
            return
        # In the mail log: the sessions it served were cut off.  Any end,
        # a clean exit too, is unexpected while the pool runs.
        maillog.warn(
            "worker {index} ended: {reason}; starting it again",
            index=protocol.index,
            reason=how_it_ended(reason),
        )
        self.reactor.callLater(RESTART_DELAY, self._restart, protocol.index)

    def _restart(self, index: int) -> None:
        if self.running and index not in self.processes:
            self._spawn(index)

    def stopService(self) -> Deferred[Any]:
        if not self.running:
            # Stopped early by MailxService, then again with the others.
            return defer.succeed(None)
        super().stopService()  # type: ignore[no-untyped-call]
        endings = []
        for protocol, transport in list(self.processes.values()):
            endings.append(protocol.ended)
            transport.signalProcess("TERM")
            killer = self.reactor.callLater(STOP_TIMEOUT, _kill, transport)
            protocol.ended.addBoth(_cancel, killer)
        return defer.DeferredList(endings)


def _cancel(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        log.failure("could not kill a worker")


def die_with_parent(signal_number: int = signal.SIGTERM) -> bool:
    """
    Ask Linux to send this process ``signal_number`` when its parent ends
    (prctl PR_SET_PDEATHSIG): a worker whose main process was killed stops
    at once, its share of the listeners with it, so that a server started
    right after can listen.  False where that cannot be asked.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0) == 0)
    except (AttributeError, OSError):
        return False


_PR_SET_PDEATHSIG = 1


def _watch_parent(reactor: Any, parent: int) -> None:
    """Stop the worker once its main process is gone (it was re-parented)."""
    if os.getppid() != parent and reactor.running:
        reactor.stop()


def run_worker(argv: Sequence[str] | None = None) -> int:
    """The entry point of a worker process (``python -m mailx.workers``)."""
    parser = argparse.ArgumentParser(prog="mailx worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--listener", action="append", default=[])
    options = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailx.tap import Options, build_worker

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    mailx_options = Options()  # type: ignore[no-untyped-call]
    mailx_options.worker = True
    arguments = [] if options.config is None else ["--config", options.config]
    mailx_options.parseOptions(arguments)  # type: ignore[no-untyped-call]

    listeners = []
    for text in options.listener:
        index, descriptor, family = (int(part) for part in text.split(":"))
        listeners.append((index, descriptor, family))
    service = build_worker(mailx_options, reactor, listeners)
    # SIGTERM when the main process ends; and, where that cannot be asked
    # or the main process ended before it was, checked every second: a
    # worker never outlives its main process.
    die_with_parent()
    LoopingCall(_watch_parent, reactor, options.parent).start(1.0)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(run_worker())


__all__ = ["HandoffQueue", "Reply", "WorkerPool", "handoff_path", "run_worker"]
