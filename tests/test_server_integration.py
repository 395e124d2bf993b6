"""
The real server through twistd on loopback, with Python's smtplib and swaks
as clients, checking the Maildir files on disk.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import sysconfig
import time
from pathlib import Path

import pytest

from tests.mailxproc import MailxProcess, basic_config, free_port
from tests.peers import run_swaks, swaks_available
from tests.smtppeer import make_tls_identity

pytestmark = pytest.mark.integration

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


def stored_body(stored: bytes) -> bytes:
    """A stored message without the trace headers mailx put before it."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ")
    assert lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: from ")
    index = 3
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


def test_smtplib_message_lands_in_the_maildir(mailx_server: MailxProcess) -> None:
    """A message sent with smtplib is in alice's Maildir/new with trace headers."""
    with smtplib.SMTP(mailx_server.address, mailx_server.port, timeout=30) as client:
        client.sendmail(
            "sender@example.net",
            ["alice@example.org"],
            b"Subject: test\r\n\r\nHello alice\r\n.leading dot\r\n",
        )
    (stored,) = mailx_server.messages("example.org", "alice")
    assert stored.startswith(
        b"Return-Path: <sender@example.net>\nDelivered-To: alice@example.org\n"
        b"Received: from "
    )
    assert stored_body(stored) == b"Subject: test\n\nHello alice\n.leading dot\n"
    assert list((mailx_server.maildir("example.org", "alice") / "tmp").iterdir()) == []
    assert "accepted from=<sender@example.net> nrcpt=1" in mailx_server.log()


def test_unknown_user_and_relay_are_refused(mailx_server: MailxProcess) -> None:
    """RCPT to an unknown local user gets 550 5.1.1; another domain 554 5.7.1."""
    with smtplib.SMTP(mailx_server.address, mailx_server.port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("sender@example.net")
        code, text = client.rcpt("nobody@example.org")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, _ = client.rcpt("postmaster@example.org")
        assert code == 250


def test_email_corpus_arrives_intact(mailx_server: MailxProcess) -> None:
    """Every message of Python's email test corpus is stored with its content."""
    corpus = sorted(CORPUS.glob("msg_*.txt"))
    if not corpus:
        pytest.skip(f"the email test corpus is not installed at {CORPUS}")
    with smtplib.SMTP(mailx_server.address, mailx_server.port, timeout=30) as client:
        for path in corpus:
            # On the wire every line ends with CRLF (RFC 5321 section 2.3.8).
            wire = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
            client.sendmail("sender@example.net", ["bob@example.org"], wire)
    stored = mailx_server.messages("example.org", "bob")
    assert len(stored) == len(corpus)
    stored_bodies = {stored_body(message) for message in stored}
    for path in corpus:
        # The README's stored form: LF line endings, ending with a newline.
        expected = path.read_bytes().replace(b"\r\n", b"\n")
        if not expected.endswith(b"\n"):
            expected += b"\n"
        assert expected in stored_bodies, path.name


def _tls_server(tmp_path: Path) -> tuple[MailxProcess, bytes]:
    identity = make_tls_identity("mx.example.org")
    workdir = tmp_path / "mx"
    workdir.mkdir()
    (workdir / "server.pem").write_bytes(identity.server_pem)
    port = free_port()
    extra = '[tls]\ncertificate = "server.pem"\nkey = "server.pem"\n'
    server = MailxProcess(workdir, basic_config(port, extra=extra), port=port)
    return server, identity.ca_pem


def test_starttls_with_smtplib(tmp_path: Path) -> None:
    """STARTTLS with a generated certificate verifies and then delivers."""
    server, ca_pem = _tls_server(tmp_path)
    server.start()
    try:
        context = ssl.create_default_context(cadata=ca_pem.decode())
        context.check_hostname = False
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.ehlo("client.example")
            assert client.has_extn("starttls")
            client.starttls(context=context)
            client.ehlo("client.example")
            assert not client.has_extn("starttls")
            client.sendmail(
                "s@example.net", ["alice@example.org"], b"Subject: t\r\n\r\nx\r\n"
            )
    finally:
        server.stop()
    (stored,) = server.messages("example.org", "alice")
    assert b"with ESMTPS id" in stored


@pytest.mark.skipif(not swaks_available(), reason="swaks is not installed")
def test_swaks_with_starttls(tmp_path: Path) -> None:
    """swaks delivers over STARTTLS and the message is on disk."""
    server, _ = _tls_server(tmp_path)
    server.start()
    try:
        result = run_swaks(
            server=server.address,
            port=server.port,
            mail_from="s@example.net",
            rcpt_to=["bob@example.org"],
            body="hello from swaks",
            tls=True,
        )
    finally:
        server.stop()
    assert result.succeeded, result
    (stored,) = server.messages("example.org", "bob")
    assert b"hello from swaks" in stored


def test_bad_configuration_stops_the_start(tmp_path: Path) -> None:
    """An unknown key stops twistd with a message naming it; nothing listens."""
    port = free_port()
    server = MailxProcess(
        tmp_path / "mx",
        basic_config(port, extra="[limits]\nmax_sizes = 3\n"),
        port=port,
    )
    with pytest.raises(RuntimeError, match=r"limits\.max_sizes"):
        server.start()


def test_a_second_server_on_the_same_queue_is_refused(
    mailx_server: MailxProcess,
) -> None:
    """Two servers on one queue would deliver twice: the second does not start."""
    port = free_port()
    second = MailxProcess(mailx_server.workdir, basic_config(port), port=port)
    output = second.run_refused()
    assert re.search(r"queue\.directory: .* in use by another mailx \(pid", output)
    assert mailx_server.process is not None
    assert mailx_server.process.poll() is None


def test_a_fifo_as_the_mail_log_stops_the_start(tmp_path: Path) -> None:
    """A FIFO where the mail log should be is refused at start, at once."""
    port = free_port()
    config = basic_config(port, extra='[log]\nmail_log = "mail.log"\n')
    server = MailxProcess(tmp_path / "mx", config, port=port)
    os.mkfifo(server.workdir / "mail.log")
    output = server.run_refused()
    assert "log.mail_log: cannot open 'mail.log': not a regular file" in output


def test_unusable_paths_and_ports_stop_the_start(
    tmp_path: Path, mailx_server: MailxProcess
) -> None:
    """A mail log that cannot be opened, or a port in use, is one clear line."""
    port = free_port()
    log = '[log]\nmail_log = "/nonexistent/mail.log"\n'
    server = MailxProcess(tmp_path / "a", basic_config(port, extra=log), port=port)
    output = server.run_refused()
    assert "mailx: configuration: log.mail_log: cannot open" in output
    assert "Traceback" not in output

    busy_port = mailx_server.port
    busy = MailxProcess(tmp_path / "b", basic_config(busy_port), port=busy_port)
    output = busy.run_refused()
    expected = (
        f"mailx: configuration: server.listen: cannot listen on 127.0.0.1:{busy_port}"
    )
    assert expected in output
    assert "Traceback" not in output


def test_the_mail_log_file_takes_the_mail_events(tmp_path: Path) -> None:
    """With log.mail_log set, mail events go to that file, one line each."""
    port = free_port()
    config = basic_config(port, extra='[log]\nmail_log = "mail.log"\n')
    server = MailxProcess(tmp_path / "mx", config, port=port)
    server.start()
    try:
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail("s@example.net", ["bob@example.org"], b"Subject: x\r\n\r\n")
            assert client.sock is not None
            client_port = client.sock.getsockname()[1]
    finally:
        server.stop()
    lines = (server.workdir / "mail.log").read_text().splitlines()
    # The client's address and port tie one session's lines together.
    peer = re.escape(f"[127.0.0.1]:{client_port}")
    prefix = r"\S+ \[mailx\.mail#info\] "
    assert any(re.fullmatch(prefix + f"connect from {peer}", x) for x in lines)
    assert any(
        re.fullmatch(
            prefix + r"\w+: accepted from=<s@example\.net> nrcpt=1 size=\d+"
            f" client={peer}",
            x,
        )
        for x in lines
    )
    assert any(re.fullmatch(prefix + f"disconnect from {peer}", x) for x in lines)
    assert "accepted from=" not in server.log()
    # SIGTERM is in the log too, its last line once all is done.
    assert any(
        x.endswith(
            "] mailx stopping: open sessions get 421, deliveries under way finish"
        )
        for x in lines
    )
    assert re.fullmatch(prefix + "mailx stopped", lines[-1])


def test_several_listeners_and_ipv6(tmp_path: Path) -> None:
    """Two listeners, one of them on ::1, both take mail."""
    first, second = free_port(), free_port()
    config = basic_config(first).replace(
        f'listen = ["tcp:{first}:interface=127.0.0.1"]',
        f'listen = ["tcp:{first}:interface=127.0.0.1",'
        f' "tcp6:{second}:interface=\\\\:\\\\:1"]',
    )
    server = MailxProcess(tmp_path / "mx", config, port=first)
    server.start()
    try:
        for host, port in (("127.0.0.1", first), ("::1", second)):
            with smtplib.SMTP(host, port, timeout=30) as client:
                client.sendmail(
                    "s@example.net", ["bob@example.org"], b"Subject: x\r\n\r\n"
                )
    finally:
        server.stop()
    assert len(server.messages("example.org", "bob")) == 2


def test_sighup_reopens_the_mail_log(tmp_path: Path) -> None:
    """After logrotate moves the mail log, SIGHUP makes a new one; the
    server, with no TLS to reload, keeps running."""
    port = free_port()
    config = basic_config(port, extra='[log]\nmail_log = "mail.log"\n')
    server = MailxProcess(tmp_path / "mx", config, port=port)
    server.start()
    try:
        assert server.process is not None
        log = server.workdir / "mail.log"
        log.rename(server.workdir / "mail.log.1")
        os.kill(server.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail("s@example.net", ["bob@example.org"], b"Subject: x\r\n\r\n")
        assert server.process.poll() is None
    finally:
        server.stop()
    text = log.read_text()
    assert "mail log reopened" in text
    assert "accepted from=<s@example.net>" in text
    # A reopening is no stop: the old file says nothing of one.
    assert "mailx stop" not in (server.workdir / "mail.log.1").read_text()
    assert text.count("mailx stopped") == 1


def test_sighup_reloads_the_aliases_file(tmp_path: Path) -> None:
    """After SIGHUP a new alias delivers; a broken aliases file is refused with
    its line in the mail log and the aliases in force stay."""
    port = free_port()
    config = basic_config(
        port,
        extra='aliases = "aliases"\n[log]\nmail_log = "mail.log"\n',
    )
    server = MailxProcess(tmp_path / "mx", config, port=port)
    aliases = server.workdir / "aliases"
    aliases.write_text("sales: bob\n")
    server.start()
    log = server.workdir / "mail.log"

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert text in log.read_text()

    try:
        assert server.process is not None
        aliases.write_text("sales: bob\ninfo: alice\n")
        os.kill(server.process.pid, signal.SIGHUP)
        # Two names, in the one local domain.
        wait_for("aliases reloaded from aliases: 2 addresses")
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail(
                "s@example.net", ["info@example.org"], b"Subject: 1\r\n\r\n"
            )

        aliases.write_text("sales: bob\ninfo: somebody@elsewhere.example\n")
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for("aliases reload failed, keeping the old aliases")
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail(
                "s@example.net", ["info@example.org"], b"Subject: 2\r\n\r\n"
            )
        assert server.process.poll() is None
    finally:
        server.stop()
    assert len(server.messages("example.org", "alice")) == 2
    assert "aliases:2: target" in log.read_text()


@pytest.mark.parametrize("obstacle", ["directory", "fifo"])
def test_a_mail_log_that_cannot_be_reopened_is_tried_again(
    tmp_path: Path, obstacle: str
) -> None:
    """When SIGHUP cannot open the mail log anew (a directory, or a FIFO that
    must not make it wait for a reader), the lines go on into the old file
    with the reason, the rest of the reload still happens, and the next
    SIGHUP opens it."""
    port = free_port()
    config = basic_config(
        port, extra='aliases = "aliases"\n[log]\nmail_log = "mail.log"\n'
    )
    server = MailxProcess(tmp_path / "mx", config, port=port)
    (server.workdir / "aliases").write_text("sales: bob\n")
    server.start()
    log = server.workdir / "mail.log"
    rotated = server.workdir / "mail.log.1"

    def wait_for(path: Path, text: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in {path}")

    try:
        assert server.process is not None
        log.rename(rotated)
        # In the way: the new file cannot be opened.
        if obstacle == "directory":
            log.mkdir()
        else:
            os.mkfifo(log)
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(rotated, "mail log mail.log cannot be reopened")
        wait_for(rotated, "aliases reloaded from aliases")

        if obstacle == "directory":
            log.rmdir()
        else:
            log.unlink()
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(log, "mail log reopened")
        with smtplib.SMTP(server.address, server.port, timeout=30) as client:
            client.sendmail(
                "s@example.net", ["sales@example.org"], b"Subject: x\r\n\r\n"
            )
        assert server.process.poll() is None
    finally:
        server.stop()
    assert "accepted from=<s@example.net>" in log.read_text()
    assert "Traceback" not in server.log()
