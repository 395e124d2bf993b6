"""
The control channel: a UNIX socket through which ``mailx queue`` steers the
running spool.

One command per line, one answer per line::

    flush            -> ok
    flush ID         -> ok | error ...
    delete ID        -> ok | error ...
    hold ID          -> ok | ok unchanged | error ...
    release ID       -> ok | ok unchanged | error ...

The server side is a Twisted protocol; the client side is a few blocking
socket calls, because the command-line tool has no reactor.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from mailx.maillog import PrintableLogger

log = PrintableLogger()

# A command is a verb and a queue id; anything longer is not a command.
MAX_COMMAND = 256

# How long the tool waits for an answer.  A delete or hold waits for an
# attempt under way on that message, which the outbound timeouts bound.
DEFAULT_TIMEOUT = 60.0

OK = "ok"
UNCHANGED = "ok unchanged"
# An answer for a command that may succeed when given again.
TEMPORARY = "error temporary failure"


class ControlTarget(Protocol):
    """What the control channel can ask of the spool."""

    def flush(self, message_id: str | None = None) -> None: ...

    def hold(self, message_id: str) -> Deferred[bool]: ...

    def release(self, message_id: str) -> Deferred[bool]: ...

    def delete(self, message_id: str) -> Deferred[None]: ...


class ControlUnavailable(Exception):
    """No server answers on the control socket."""


class ControlProtocol(LineOnlyReceiver):
    """Reads commands, runs them on the spool and writes one answer each."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND

    def __init__(self, target: ControlTarget) -> None:
        self._target = target

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("ascii", "replace").strip()
        Deferred.fromCoroutine(self._run(text)).addCallback(self._answer)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer("error command too long")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _answer(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode("ascii", "replace") + b"\n")

    async def _run(self, text: str) -> str:
        # Imported here: mailx.spool imports this module when it listens.
        from mailx.spool import QUEUE_ID, MessageGone, MessageHeld, UnknownMessage

        verb, _, message_id = text.partition(" ")
        message_id = message_id.strip()
        actions: dict[str, Callable[[str], Deferred[Any] | None]] = {
            "flush": self._target.flush,
            "delete": self._target.delete,
            "hold": self._target.hold,
            "release": self._target.release,
        }
        action = actions.get(verb)
        if action is None:
            return f"error unknown command {verb}"
        if verb == "flush" and not message_id:
            self._target.flush()
            return OK
        if not QUEUE_ID.fullmatch(message_id):
            return "error malformed queue id"

        try:
            ran = action(message_id)
            if ran is not None and await ran is False:
                # hold of a held message, release of one not held.
                return UNCHANGED
        except MessageGone:
            return (
                f"error message {message_id} left the queue during the delivery"
                " attempt the command waited for (delivered, returned or expired)"
            )
        except UnknownMessage:
            return f"error no such message {message_id}"
        except MessageHeld:
            return f"error message {message_id} is on hold"
        except OSError as error:
            # The spool could not do it now (its agent ended, say): the
            # command may be given again.
            return f"{TEMPORARY} ({error}): try again"
        except Exception:
            log.failure("control command {verb} failed", verb=verb)
            return "error internal failure, see the server log"
        return OK


class ControlFactory(Factory):
    """Builds a ``ControlProtocol`` per connection on the control socket."""

    # No "Starting factory" and "Stopping factory" lines in the log.
    noisy = False

    def __init__(self, target: ControlTarget) -> None:
        self._target = target

    def buildProtocol(self, addr: object) -> ControlProtocol:
        protocol = ControlProtocol(self._target)
        protocol.factory = self
        return protocol


def send_command(path: str, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """
    Send one command to the server listening on ``path`` and return its
    answer.  Raise ``ControlUnavailable`` when no server listens there.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        try:
            connection.connect(path)
        except OSError as error:
            raise ControlUnavailable(f"{path}: {error.strerror}") from error
        connection.sendall(command.encode("ascii") + b"\n")
        answer = b""
        # One answer line is at most a few hundred octets; stop at its end.
        while not answer.endswith(b"\n") and len(answer) <= MAX_COMMAND * 4:
            chunk = connection.recv(MAX_COMMAND)
            if not chunk:
                break
            answer += chunk
    finally:
        connection.close()
    return answer.decode("ascii", "replace").strip()
