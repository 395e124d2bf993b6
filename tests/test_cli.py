"""Tests for ``mailx queue``: on files alone, and against a running spool."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailx.address import Address
from mailx.cli import EX_DATAERR, EX_OK, EX_TEMPFAIL, main
from mailx.control import ControlProtocol
from mailx.envelope import ClientInfo, Envelope, Recipient, Route
from mailx.queue import QueuedMessage
from mailx.replies import Reply
from mailx.spool import (
    MessageGone,
    RecipientResult,
    Spool,
    SpoolStore,
    UnknownMessage,
    synchronous_io,
)

CONTENT = (
    b"From: alice@example.org\r\n"
    b"Subject: queued for a while\r\n"
    b"\r\n"
    b"The body is not shown.\r\n"
)
DEFERRED = Reply(450, "4.2.0", "Mailbox busy")


class RecordingAgent:
    """Answers 450 to everything and tells the test when it was called."""

    def __init__(self) -> None:
        self.calls: list[list[Address]] = []
        self.called: Deferred[None] = Deferred()

    def deliver(
        self,
        reverse_path: Address | None,
        domain: str,
        recipients: list[Address],
        content: bytes,
        envelope: Envelope,
    ) -> Deferred[list[RecipientResult]]:
        self.calls.append(recipients)
        called, self.called = self.called, Deferred()
        called.callback(None)
        return succeed(
            [RecipientResult(r, DEFERRED, "mx.example.com") for r in recipients]
        )


def envelope(*local_parts: str) -> Envelope:
    return Envelope(
        reverse_path=Address("alice", "example.org"),
        recipients=[
            Recipient(Address(local, "example.com"), Route.RELAY)
            for local in local_parts
        ],
        client=ClientInfo("192.0.2.1", 2525, helo="client.example.org"),
    )


def write_config(directory: Path) -> str:
    (directory / "queue").mkdir(exist_ok=True)
    config = directory / "mailx.toml"
    config.write_text(
        f'[queue]\ndirectory = "{directory / "queue"}"\n'
        f'[server]\ncontrol_socket = "{directory / "control.sock"}"\n'
    )
    return str(config)


def queue_message(
    directory: Path,
    *local_parts: str,
    sent: Envelope | None = None,
    content: bytes = CONTENT,
) -> str:
    """Put a message into the spool at ``directory`` without delivering it."""
    spool = Spool(
        str(directory / "queue"),
        Clock(),
        RecordingAgent(),
        "mx.example.net",
        run_io=synchronous_io,
    )
    queued: list[str] = []
    spool.enqueue(sent or envelope(*local_parts), content).addCallback(queued.append)
    return queued[0]


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out)
    return status, out.getvalue()


# Without a running server: the files alone.


def test_list_shows_messages_like_mailq(tmp_path: Path) -> None:
    """``queue list`` shows id, size, sender and each recipient's state."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob", "carol")

    status, output = run("queue", "list", "--config", config)

    assert status == EX_OK
    assert message_id in output
    assert str(len(CONTENT)) in output
    assert "<alice@example.org>" in output
    assert "bob@example.com pending" in output
    assert "carol@example.com pending" in output
    assert output.rstrip().endswith("-- 1 Kbytes in 1 request.")


def test_list_of_an_empty_queue(tmp_path: Path) -> None:
    """``queue list`` on an empty spool says the queue is empty."""
    config = write_config(tmp_path)
    SpoolStore(str(tmp_path / "queue")).prepare()
    assert run("--config", config, "queue", "list") == (
        EX_OK,
        "Mail queue is empty\n",
    )


def test_show_prints_envelope_and_headers_only(tmp_path: Path) -> None:
    """``queue show`` prints the envelope and the headers, not the body."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")

    status, output = run("queue", "show", message_id, "--config", config)

    assert status == EX_OK
    assert f"Queue ID: {message_id}" in output
    assert "Recipient: <bob@example.com> pending" in output
    assert "Client: 192.0.2.1 helo=client.example.org" in output
    assert "Subject: queued for a while" in output
    assert "The body is not shown." not in output


def test_what_clients_sent_reaches_the_terminal_printable(tmp_path: Path) -> None:
    """An escape sequence or a bidi override in a HELO name, a path, a reply
    or a header field is shown as "?" by ``queue list`` and ``queue show``;
    line breaks and the tab of a folded header field stay."""
    config = write_config(tmp_path)
    sent = Envelope(
        reverse_path=Address("\u202egnp.exe\x85x", "example.org"),
        recipients=[Recipient(Address("bob", "example.com"), Route.RELAY)],
        client=ClientInfo("192.0.2.1", 2525, helo="evil\x1b]0;pwned\x07.test"),
    )
    content = b"Subject: a\x1b[5mblink\r\n\tfolded\r\n\r\nbody\r\n"
    message_id = queue_message(tmp_path, sent=sent, content=content)

    _, listing = run("queue", "list", "--config", config)
    _, shown = run("queue", "show", message_id, "--config", config)

    for output in (listing, shown):
        assert all(c.isprintable() or c in "\n\t" for c in output), output
    assert "<?gnp.exe?x@example.org>" in listing
    assert "helo=evil?]0;pwned?.test" in shown
    assert "Subject: a?[5mblink\n\tfolded" in shown


def test_unknown_id_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue id that is not queued gives an error and a failing status."""
    config = write_config(tmp_path)
    SpoolStore(str(tmp_path / "queue")).prepare()

    status, _ = run("queue", "show", "NOSUCH1", "--config", config)

    assert status == EX_DATAERR
    assert "no such message NOSUCH1" in capsys.readouterr().err


def test_an_unreadable_message_is_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged message file in the queue: ``list`` lists the others and
    names it on stderr, ``show`` says it cannot be read; no traceback."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")
    (tmp_path / "queue" / "message" / "BROKEN").write_bytes(b"garbage")

    status, output = run("queue", "list", "--config", config)
    assert status == EX_OK
    assert message_id in output
    assert "BROKEN: cannot be read: not a mailx spool message file" in (
        capsys.readouterr().err
    )

    status, _ = run("queue", "show", "BROKEN", "--config", config)
    assert status == EX_DATAERR
    assert "message BROKEN cannot be read" in capsys.readouterr().err


def test_malformed_id_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id that could name a file outside the spool is refused."""
    config = write_config(tmp_path)
    status, _ = run("queue", "delete", "../etc", "--config", config)
    assert status != EX_OK
    assert "malformed queue id" in capsys.readouterr().err


def test_a_missing_queue_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the server's configuration the command says where it looked."""
    config = write_config(tmp_path)
    (tmp_path / "queue").rmdir()
    status, _ = run("queue", "list", "--config", config)
    assert status != EX_OK
    assert "no queue at" in capsys.readouterr().err


def test_delete_without_server_removes_files(tmp_path: Path) -> None:
    """With no server, ``queue delete`` removes the message's files."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")

    assert run("queue", "delete", message_id, "--config", config) == (
        EX_OK,
        f"{message_id}: deleted\n",
    )
    for directory in ("message", "envelope", "free"):
        assert os.listdir(tmp_path / "queue" / directory) == [], directory


def test_hold_and_release_without_server(tmp_path: Path) -> None:
    """With no server, hold and release change the envelope on disk."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")
    store = SpoolStore(str(tmp_path / "queue"))

    assert run("queue", "hold", message_id, "--config", config) == (
        EX_OK,
        f"{message_id}: placed on hold\n",
    )
    assert store.load(message_id).hold
    assert f"{message_id}!" in run("queue", "list", "--config", config)[1]
    shown = run("queue", "show", message_id, "--config", config)[1]
    assert "Next attempt: on hold until released" in shown

    assert run("queue", "release", message_id, "--config", config)[0] == EX_OK
    assert not store.load(message_id).hold
    assert run("queue", "release", message_id, "--config", config) == (
        EX_OK,
        f"{message_id}: was not on hold\n",
    )


def test_what_is_done_without_server_is_in_the_mail_log(tmp_path: Path) -> None:
    """hold, release and delete with no server write the lines the server
    would have; one that changed nothing writes none."""
    config = write_config(tmp_path)
    mail_log = tmp_path / "mail.log"
    with open(config, "a") as file:
        file.write(f'[log]\nmail_log = "{mail_log}"\n')
    message_id = queue_message(tmp_path, "bob")
    # Not made by the command (its user may not be the server's).
    assert run("queue", "hold", message_id, "--config", config)[0] == EX_OK
    assert not mail_log.exists()
    assert run("queue", "release", message_id, "--config", config)[0] == EX_OK
    mail_log.touch()

    for command in ("hold", "hold", "release", "delete", "delete"):
        run("queue", command, message_id, "--config", config)

    lines = mail_log.read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        f"held {message_id}",
        f"released {message_id}",
        f"deleted {message_id}",
    ]
    assert all(" [mailx.mail#info] " in line for line in lines)


def test_flush_without_server_makes_messages_due(tmp_path: Path) -> None:
    """With no server, ``queue flush`` marks messages due for the next start."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")
    store = SpoolStore(str(tmp_path / "queue"))
    message = store.load(message_id)
    message.next_attempt = 10**10
    store.rewrite(message)

    status, output = run("queue", "flush", "--config", config)

    assert status == EX_OK
    assert "server not running" in output
    assert store.load(message_id).next_attempt == 0.0


def test_a_server_without_its_control_socket_keeps_the_tool_off_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When a server holds the queue but its control socket does not answer,
    hold changes nothing on disk and says why, with a temporary failure."""
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")
    store = SpoolStore(str(tmp_path / "queue"))
    with open(tmp_path / "queue" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, _ = run("queue", "hold", message_id, "--config", config)
    assert status == EX_TEMPFAIL
    assert "does not answer" in capsys.readouterr().err
    assert not store.load(message_id).hold


# Against a running spool, through its control socket.


@pytest.mark.integration
class ControlChannelTests(unittest.TestCase):
    """``mailx queue`` steering a running spool over a loopback UNIX socket."""

    def setUp(self) -> None:
        # A short path: UNIX socket paths are limited to about 100 octets.
        self.directory = Path(tempfile.mkdtemp(prefix="mailx-cli-"))
        self.addCleanup(shutil.rmtree, self.directory)
        self.config = write_config(self.directory)
        self.agent = RecordingAgent()
        self.spool = Spool(
            str(self.directory / "queue"),
            reactor,
            self.agent,
            "mx.example.net",
            control_socket=str(self.directory / "control.sock"),
        )
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    async def _queue_and_wait(self) -> str:
        called = self.agent.called
        message_id = await self.spool.enqueue(envelope("bob"), CONTENT)
        await called
        return message_id

    async def _cli(self, *argv: str) -> tuple[int, str]:
        return await threads.deferToThread(run, *argv, "--config", self.config)

    async def _flush(self) -> None:
        message_id = await self._queue_and_wait()
        called = self.agent.called
        assert await self._cli("queue", "flush", message_id) == (EX_OK, "")
        await called
        assert len(self.agent.calls) == 2

    def test_flush_reaches_the_server_at_once(self) -> Deferred[None]:
        """``queue flush ID`` makes the running server try the message now."""
        return Deferred.fromCoroutine(self._flush())

    async def _hold(self) -> None:
        message_id = await self._queue_and_wait()
        assert await self._cli("queue", "hold", message_id) == (
            EX_OK,
            f"{message_id}: placed on hold\n",
        )
        assert self.spool.schedule.is_held(message_id)
        assert self.spool.store.load(message_id).hold
        assert await self._cli("queue", "hold", message_id) == (
            EX_OK,
            f"{message_id}: was on hold already\n",
        )
        status, _ = await self._cli("queue", "flush", message_id)
        assert status == EX_DATAERR

        assert await self._cli("queue", "release", message_id) == (
            EX_OK,
            f"{message_id}: released\n",
        )
        assert not self.spool.schedule.is_held(message_id)

    def test_hold_and_release_go_through_the_server(self) -> Deferred[None]:
        """Hold and release while the server runs change its schedule and disk."""
        return Deferred.fromCoroutine(self._hold())

    async def _delete(self) -> None:
        message_id = await self._queue_and_wait()
        assert await self._cli("queue", "delete", message_id) == (
            EX_OK,
            f"{message_id}: deleted\n",
        )
        assert message_id not in self.spool.schedule
        assert self.spool.store.ids() == []
        status, _ = await self._cli("queue", "delete", message_id)
        assert status == EX_DATAERR

    def test_delete_goes_through_the_server(self) -> Deferred[None]:
        """``queue delete`` on a running server removes the message from it."""
        return Deferred.fromCoroutine(self._delete())


class GoneTarget:
    """A spool whose message left during the attempt a command waited for."""

    def flush(self, message_id: str | None = None) -> None:
        pass

    def hold(self, message_id: str) -> Deferred[bool]:
        return fail(MessageGone(message_id))

    def release(self, message_id: str) -> Deferred[bool]:
        return fail(UnknownMessage(message_id))

    def delete(self, message_id: str) -> Deferred[None]:
        return fail(MessageGone(message_id))


def test_the_control_channel_says_a_message_left_during_its_attempt() -> None:
    """hold or delete of a message delivered meanwhile is answered with that,
    not with "no such message"."""
    protocol = ControlProtocol(GoneTarget())
    transport = StringTransport()
    protocol.transport = transport
    protocol.lineReceived(b"hold 31809G8ZB66012R7BG4J")
    protocol.lineReceived(b"release 31809G8ZB66012R7BG4J")
    answers = transport.value().decode().splitlines()
    assert answers[0].startswith(
        "error message 31809G8ZB66012R7BG4J left the queue during the delivery attempt"
    )
    assert answers[1] == "error no such message 31809G8ZB66012R7BG4J"


@pytest.mark.integration
class StaleControlSocketTests(unittest.TestCase):
    """A control socket, and a lock naming a live pid, left by a server that
    was killed: the next server takes the socket over."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mailx-cli-"))
        self.addCleanup(shutil.rmtree, self.directory)
        self.config = write_config(self.directory)
        path = str(self.directory / "control.sock")
        # What kill -9 leaves: the socket file, and a lock whose pid is now
        # another live process (this one).
        left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left.bind(path)
        left.close()
        os.symlink(str(os.getpid()), path + ".lock")
        self.spool = Spool(
            str(self.directory / "queue"),
            reactor,
            RecordingAgent(),
            "mx.example.net",
            control_socket=path,
        )
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    async def _flush(self) -> None:
        status, output = await threads.deferToThread(
            run, "queue", "flush", "--config", self.config
        )
        assert (status, output) == (EX_OK, "")

    def test_the_new_server_answers_on_the_control_socket(self) -> Deferred[None]:
        """``queue flush`` reaches the new server, not the files."""
        return Deferred.fromCoroutine(self._flush())


def test_list_into_a_reader_that_stops_early_says_nothing(tmp_path: Path) -> None:
    """``mailx queue list | head -1``: no "Broken pipe" complaint, status 0."""
    config = write_config(tmp_path)
    store = SpoolStore(str(tmp_path / "queue"))
    store.prepare()
    messages = [
        (QueuedMessage.from_envelope(f"{n:08d}X", envelope("bob"), 10, 0.0), b"x")
        for n in range(1500)  # more than the pipe holds
    ]
    assert store.store_new(messages) == [None] * len(messages)
    command = [sys.executable, "-c", "from mailx.cli import main; main()"]
    listing = subprocess.Popen(
        [*command, "queue", "list", "--config", config],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert listing.stdout is not None and listing.stderr is not None
    listing.stdout.readline()
    listing.stdout.close()  # as head does after its line
    assert listing.wait(30) == 0
    assert listing.stderr.read() == b""
    listing.stderr.close()


class FailingTarget(GoneTarget):
    """A spool whose change fails for now (its agent ended under it)."""

    def delete(self, message_id: str) -> Deferred[None]:
        return fail(OSError(5, "the spool agent ended (signal 9)"))


def test_a_command_the_spool_could_not_do_now_is_a_temporary_failure() -> None:
    protocol = ControlProtocol(FailingTarget())
    transport = StringTransport()
    protocol.transport = transport
    protocol.lineReceived(b"delete 31809G8ZB66012R7BG4J")
    (answer,) = transport.value().decode().splitlines()
    assert answer == (
        "error temporary failure ([Errno 5] the spool agent ended (signal 9)):"
        " try again"
    )


def test_the_tool_exits_75_on_a_temporary_failure_of_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    message_id = queue_message(tmp_path, "bob")
    answer = "error temporary failure ([Errno 5] agent ended): try again"
    monkeypatch.setattr("mailx.cli.send_command", lambda path, command: answer)
    assert run("queue", "delete", message_id, "--config", config)[0] == EX_TEMPFAIL
