"""
The ``mailx`` command: ``mailx queue list|show|flush|delete|hold|release``.

It reads the spool directory directly (a message file is renamed into
place whole, and overwritten only once it has left the queue, to be reused;
envelopes are replaced atomically; so reading while the server runs is
safe, at worst showing a message that has just left) and steers the queue
through the server's control socket when the server is up.  When it is not,
``delete``, ``hold`` and ``release`` change the files themselves, and
``flush`` marks messages due so the next start tries them at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from twisted.logger import LogLevel

from mailx.config import ConfigError, load_config
from mailx.control import (
    OK,
    TEMPORARY,
    UNCHANGED,
    ControlUnavailable,
    send_command,
)
from mailx.dsn import split_headers
from mailx.files import open_regular_for_append
from mailx.maillog import MailLogFile, printable
from mailx.queue import QueuedMessage
from mailx.spool import QUEUE_ID, SpoolStore

# Exit statuses, as sysexits.h names them.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_CONFIG = 78
EX_TEMPFAIL = 75


class CommandError(Exception):
    """A command that cannot be carried out; the text says why."""

    def __init__(self, text: str, status: int = EX_DATAERR) -> None:
        super().__init__(text)
        self.status = status


def _arrival(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def format_list(messages: Sequence[QueuedMessage]) -> list[str]:
    """The ``queue list`` output, in the manner of mailq."""
    if not messages:
        return ["Mail queue is empty"]
    lines = [f"{'Queue ID':<24} {'Size':>9} {'Arrival':<19}  Sender/Recipient"]
    total = 0
    for message in messages:
        total += message.size
        mark = "!" if message.hold else " "
        sender = str(message.reverse_path) if message.reverse_path else ""
        lines.append(
            f"{message.message_id + mark:<24} {message.size:>9} "
            f"{_arrival(message.arrival):<19}  <{sender}>"
        )
        last = message.last_reply()
        if last is not None:
            lines.append(f"{'':<56}({' '.join(str(last).split())})")
        for recipient in message.recipients:
            lines.append(f"{'':<56}{recipient.address} {recipient.state.value}")
        lines.append("")
    count = len(messages)
    noun = "request" if count == 1 else "requests"
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {count} {noun}.")
    return lines


def format_show(message: QueuedMessage, headers: bytes) -> list[str]:
    """The ``queue show`` output: the envelope, then the message's headers."""
    lines = [
        f"Queue ID: {message.message_id}{' (on hold)' if message.hold else ''}",
        f"Kind: {message.kind.value}",
        f"Arrival: {_arrival(message.arrival)}",
        f"Size: {message.size}",
        f"Client: {message.client_address or '-'} helo={message.client_helo or '-'}",
        f"Sender: <{message.reverse_path or ''}>",
        f"Body: {message.body.value}  SMTPUTF8: {'yes' if message.smtputf8 else 'no'}",
        f"RET: {message.ret or '-'}  ENVID: {message.envid or '-'}",
        f"Attempts: {message.attempts}",
        "Next attempt: on hold until released"
        if message.hold
        else f"Next attempt: {_arrival(message.next_attempt)}",
        f"Delay warning sent: {'yes' if message.delay_warned else 'no'}",
    ]
    for recipient in message.recipients:
        notify = ",".join(sorted(recipient.notify)) if recipient.notify else "-"
        lines.append(
            f"Recipient: <{recipient.address}> {recipient.state.value}"
            f" attempts={recipient.attempts} notify={notify}"
            f" orcpt={recipient.orcpt or '-'}"
        )
        if recipient.reply is not None:
            relay = recipient.next_hop or "none"
            lines.append(f"  last reply from {relay}: {recipient.reply}")
    text = headers.decode("utf-8", "replace").rstrip("\r\n")
    lines += ["", text.replace("\r\n", "\n")]
    return [line.rstrip("\r") for line in lines]


def terminal_safe(text: str) -> str:
    """
    ``text`` with every control character but line breaks and tabs shown as
    "?": what clients and next hops sent (HELO names, paths, replies,
    header fields) must not reach an operator's terminal as an escape
    sequence, as in the logs (mailx.maillog).
    """
    if text.isprintable():
        return text
    return printable(text, keep="\n\t")


class QueueTool:
    """The queue commands over one spool directory and control socket."""

    def __init__(
        self,
        directory: str,
        control_socket: str,
        out: TextIO,
        mail_log: str | None = None,
    ) -> None:
        self.store = SpoolStore(directory)
        self.control_socket = control_socket
        self.out = out
        # The server's log.mail_log: what is done with no server running is
        # written there too, as the server would have.
        self.mail_log = mail_log

    def _logged(self, event: str, message_id: str) -> None:
        """``held ID`` and the like in the mail log, when it is a file."""
        if not self.mail_log:
            return
        if not os.path.exists(self.mail_log):
            # Not made here: made by this command's user (root, say), the
            # server's user might not open it at its next start.
            print(
                f"mailx: no mail log at {self.mail_log}; not written", file=sys.stderr
            )
            return
        try:
            with open_regular_for_append(self.mail_log) as file:
                MailLogFile(file)(
                    {
                        "log_format": event + " {message_id}",
                        "message_id": message_id,
                        "log_level": LogLevel.info,
                        "log_time": time.time(),
                    }
                )
        except OSError as error:
            print(f"mailx: the mail log was not written: {error}", file=sys.stderr)

    def _print(self, lines: list[str]) -> None:
        for line in lines:
            print(terminal_safe(line), file=self.out)

    def _load(self, message_id: str) -> QueuedMessage:
        if not QUEUE_ID.fullmatch(message_id):
            raise CommandError(f"malformed queue id {message_id!r}", EX_USAGE)
        try:
            return self.store.load(message_id)
        except FileNotFoundError:
            raise CommandError(f"no such message {message_id}") from None
        except (OSError, ValueError) as error:
            raise CommandError(
                f"message {message_id} cannot be read: {error}"
            ) from None

    def _messages(self) -> list[QueuedMessage]:
        messages = []
        for message_id in self.store.ids():
            try:
                messages.append(self.store.load(message_id))
            except FileNotFoundError:
                # Delivered or deleted while we listed: no longer queued.
                continue
            except (OSError, ValueError) as error:
                # The server sets such a message aside at its next start.
                print(f"{message_id}: cannot be read: {error}", file=sys.stderr)
        return messages

    def _ask_server(self, command: str) -> str | None:
        """
        Send a command to the running server; its answer, "ok" or "ok
        unchanged", or None if no server is running.
        """
        try:
            answer = send_command(self.control_socket, command)
        except ControlUnavailable:
            if self._queue_in_use():
                raise CommandError(
                    "a server holds the queue but does not answer on"
                    f" {self.control_socket}; files under it are left alone"
                    " (see its mail log)",
                    EX_TEMPFAIL,
                ) from None
            return None
        except OSError as error:
            raise CommandError(f"server did not answer: {error}", EX_TEMPFAIL) from None
        if answer.startswith(TEMPORARY):
            raise CommandError(answer.removeprefix("error "), EX_TEMPFAIL)
        if answer not in (OK, UNCHANGED):
            raise CommandError(answer.removeprefix("error ") or "no answer")
        return answer

    def _queue_in_use(self) -> bool:
        """Whether a running server holds the queue's lock (mailx.tap)."""
        try:
            lock = open(os.path.join(self.store.directory, "lock"), "a")  # noqa: SIM115
        except OSError:
            return False
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            lock.close()
        return False

    def list(self) -> None:
        self._print(format_list(self._messages()))

    def show(self, message_id: str) -> None:
        message = self._load(message_id)
        try:
            headers = split_headers(self.store.read_content(message_id))
        except FileNotFoundError:
            raise CommandError(f"no such message {message_id}") from None
        except (OSError, ValueError) as error:
            raise CommandError(
                f"message {message_id} cannot be read: {error}"
            ) from None
        self._print(format_show(message, headers))

    def flush(self, message_id: str | None) -> None:
        if message_id is not None:
            self._load(message_id)
        command = "flush" if message_id is None else f"flush {message_id}"
        if self._ask_server(command) is not None:
            return
        # No server: make the messages due, so the next start tries them.
        ids = self.store.ids() if message_id is None else [message_id]
        for each in ids:
            self._change(each, self._make_due)
        print("server not running: messages will be tried at its start", file=self.out)

    @staticmethod
    def _make_due(message: QueuedMessage) -> None:
        if not message.hold:
            message.next_attempt = 0.0

    def _change(self, message_id: str, change: Callable[[QueuedMessage], None]) -> bool:
        """Change a message's envelope on disk; False if it is gone."""
        try:
            message = self.store.load(message_id)
        except FileNotFoundError:
            return False
        change(message)
        self.store.rewrite(message)
        return True

    def delete(self, message_id: str) -> None:
        self._load(message_id)
        if self._ask_server(f"delete {message_id}") is None and self.store.remove(
            message_id
        ):
            self._logged("deleted", message_id)
        print(f"{message_id}: deleted", file=self.out)

    def hold(self, message_id: str, hold: bool) -> None:
        message = self._load(message_id)
        verb = "hold" if hold else "release"
        answer = self._ask_server(f"{verb} {message_id}")
        if answer is None:
            answer = UNCHANGED if message.hold == hold else OK

            def change(message: QueuedMessage) -> None:
                message.hold = hold
                if not hold:
                    message.next_attempt = 0.0

            if answer == OK:
                if not self._change(message_id, change):
                    raise CommandError(f"no such message {message_id}")
                self._logged("held" if hold else "released", message_id)
        if answer == UNCHANGED:
            done = "was on hold already" if hold else "was not on hold"
        else:
            done = "placed on hold" if hold else "released"
        print(f"{message_id}: {done}", file=self.out)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own default must not undo an earlier --config.
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the mailx configuration file (TOML)",
    )
    parser = argparse.ArgumentParser(prog="mailx", parents=[common])
    groups = parser.add_subparsers(dest="group", required=True)
    queue = groups.add_parser("queue", help="see and steer the queue", parents=[common])
    commands = queue.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list queued messages", parents=[common])
    for name, text in (
        ("show", "show a message's envelope and headers"),
        ("delete", "remove a message without a report"),
        ("hold", "keep a message from delivery"),
        ("release", "let a held message go"),
    ):
        command = commands.add_parser(name, help=text, parents=[common])
        command.add_argument("id", help="the queue id")
    flush = commands.add_parser("flush", help="retry now", parents=[common])
    flush.add_argument("id", nargs="?", help="the queue id (all when omitted)")
    return parser


def _run(tool: QueueTool, arguments: argparse.Namespace) -> None:
    command = arguments.command
    if command == "list":
        tool.list()
    elif command == "show":
        tool.show(arguments.id)
    elif command == "flush":
        tool.flush(arguments.id)
    elif command == "delete":
        tool.delete(arguments.id)
    else:
        tool.hold(arguments.id, command == "hold")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the ``mailx`` command; return its exit status."""
    out = out or sys.stdout
    arguments = _parser().parse_args(argv)
    try:
        config = load_config(getattr(arguments, "config", None))
    except (ConfigError, OSError) as error:
        print(f"mailx: {error}", file=sys.stderr)
        return EX_CONFIG

    directory = config.queue.directory
    if not os.path.isdir(directory):
        print(
            f"mailx: no queue at {directory!r}; give --config with the server's"
            " configuration, from the directory the server runs in",
            file=sys.stderr,
        )
        return EX_CONFIG
    tool = QueueTool(
        directory, config.server.control_socket, out, config.log.mail_log or None
    )
    try:
        _run(tool, arguments)
    except BrokenPipeError:
        # Read by a pager or ``head`` that has had enough: no complaint.
        # Python's own flush at exit would fail on the closed pipe too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EX_OK
    except CommandError as error:
        print(f"mailx: {error}", file=sys.stderr)
        return error.status
    except OSError as error:
        print(f"mailx: {error}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
