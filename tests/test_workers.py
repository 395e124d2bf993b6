"""
Worker processes (server.workers): real twistd processes on loopback.

The main process is stopped with SIGSTOP so that only the worker can accept:
what arrives then was served by the worker alone.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.mailxproc import PROJECT, MailxProcess, basic_config, free_port
from tests.smtppeer import make_tls_identity

pytestmark = pytest.mark.integration

# Every wait here is bounded by this many seconds.
WAIT = 20.0


def worker_pids(main_pid: int) -> list[int]:
    """The worker processes the main process started."""
    found = subprocess.run(
        ["pgrep", "-P", str(main_pid), "-f", "mailx.workers"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [int(pid) for pid in found.stdout.split()]


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_two(tmp_path: Path, extra: str = "") -> tuple[MailxProcess, int, int]:
    port = free_port()
    extra += '[dns]\nservers = ["127.0.0.1:9"]\ntimeout = 1\n'
    config = basic_config(port, extra=extra).replace(
        "[server]\n", "[server]\nworkers = 2\n"
    )
    server = MailxProcess(tmp_path / "mx", config, port=port)
    server.start()
    assert server.process is not None
    main = server.process.pid
    wait_until(lambda: len(worker_pids(main)) == 1, "the worker")
    return server, main, worker_pids(main)[0]


def test_a_worker_serves_alone_and_hands_relay_mail_to_the_queue(
    tmp_path: Path,
) -> None:
    """With the main process stopped the worker delivers local mail, and
    queues relayed mail through the main process once it runs again."""
    server, main, _ = start_two(tmp_path)
    try:
        os.kill(main, signal.SIGSTOP)
        try:
            with smtplib.SMTP(server.address, server.port, timeout=WAIT) as client:
                client.sendmail(
                    "s@example.net", ["alice@example.org"], b"Subject: w\r\n\r\nx\r\n"
                )
            assert len(server.messages("example.org", "alice")) == 1

            outcome: list[tuple[int, bytes]] = []

            def relay() -> None:
                with smtplib.SMTP("127.0.0.1", server.port, timeout=WAIT) as client:
                    client.ehlo("client.example")
                    client.mail("alice@example.org")
                    client.rcpt("bob@remote.example")
                    outcome.append(client.data(b"Subject: r\r\n\r\ny\r\n"))

            sender = threading.Thread(target=relay)
            sender.start()
            time.sleep(0.5)
            # The worker waits for the main process before it says 250.
            assert outcome == []
        finally:
            os.kill(main, signal.SIGCONT)
        sender.join(WAIT)
        ((code, text),) = outcome
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
        listing = subprocess.run(
            [
                str(PROJECT / ".venv/bin/mailx"),
                "queue",
                "list",
                "--config",
                "mailx.toml",
            ],
            cwd=server.workdir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "bob@remote.example" in listing
        # The main process queued it under the id the client was given,
        # with the client's address.
        assert queue_id in listing
        shown = subprocess.run(
            [
                str(PROJECT / ".venv/bin/mailx"),
                "queue",
                "show",
                queue_id,
                "--config",
                "mailx.toml",
            ],
            cwd=server.workdir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "127.0.0.1" in shown
    finally:
        server.stop()
    (stored,) = server.messages("example.org", "alice")
    # One trace header: the handoff adds none.
    assert stored.count(b"Received: ") == 1


def test_workers_end_with_their_main_process(tmp_path: Path) -> None:
    """SIGTERM stops the workers too; after a SIGKILL they stop by themselves."""
    server, _, worker = start_two(tmp_path)
    server.stop()
    wait_until(lambda: not alive(worker), "the worker to stop with SIGTERM")

    server, _, worker = start_two(tmp_path / "again")
    server.kill()
    wait_until(lambda: not alive(worker), "the worker to notice its parent died")


def test_a_restart_after_a_kill_serves_while_the_old_pid_is_a_zombie(
    tmp_path: Path,
) -> None:
    """kill -9 of the main process, then a start at once, as a supervisor
    does: the handoff socket's lock names the killed process, not reaped
    yet (a zombie, which looks alive), and the new server takes it over."""
    server, main, worker = start_two(tmp_path)
    killed = server.process
    assert killed is not None
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: not alive(worker), "the worker to stop with its parent")
    assert not alive(main) and Path(f"/proc/{main}").exists()
    lock = server.workdir / "var/mailx/handoff.sock.lock"
    assert os.readlink(lock) == str(main)
    try:
        server.start()
        restarted = server.process
        assert restarted is not None
        wait_until(lambda: len(worker_pids(restarted.pid)) == 1, "a worker")
        with smtplib.SMTP(server.address, server.port, timeout=WAIT) as client:
            client.sendmail(
                "s@example.net", ["alice@example.org"], b"Subject: w\r\n\r\nx\r\n"
            )
    finally:
        server.stop()
        killed.wait(WAIT)
        if killed.stdout:
            killed.stdout.close()
    assert len(server.messages("example.org", "alice")) == 1


def test_a_worker_killed_is_started_again_and_the_mail_log_says_so(
    tmp_path: Path,
) -> None:
    """The sessions a worker served were cut off: the mail log says so."""
    server, main, worker = start_two(tmp_path)
    try:
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: worker_pids(main) not in ([], [worker]), "a new worker")
        wait_until(
            lambda: (
                "[mailx.mail#warn] worker 1 ended: signal 9; starting it again"
                in server.log()
            ),
            "the mail log line",
        )
    finally:
        server.stop()


def test_the_start_is_said_once_whatever_the_workers(tmp_path: Path) -> None:
    """The main process says the server started; its workers, the one
    started again included, write nothing of it into the mail log."""
    server, main, worker = start_two(tmp_path, '[log]\nmail_log = "mail.log"\n')
    try:
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: worker_pids(main) not in ([], [worker]), "a new worker")
        time.sleep(1.0)  # Time for the new worker to have said it, were it to.
    finally:
        server.stop()
    text = (server.workdir / "mail.log").read_text()
    assert text.count("mailx started as") == 1
    assert text.count("mailx stopped") == 1


def test_sighup_reaches_the_workers(tmp_path: Path) -> None:
    """SIGHUP to the main process makes its workers re-read the certificate."""
    identity = make_tls_identity("mx.example.org")
    workdir = tmp_path / "mx"
    workdir.mkdir()
    (workdir / "server.pem").write_bytes(identity.server_pem)
    port = free_port()
    extra = '[tls]\ncertificate = "server.pem"\nkey = "server.pem"\n'
    config = basic_config(port, extra=extra).replace(
        "[server]\n", "[server]\nworkers = 2\n"
    )
    server = MailxProcess(workdir, config, port=port)
    server.start()
    try:
        assert server.process is not None
        main = server.process.pid
        wait_until(lambda: len(worker_pids(main)) == 1, "the worker")
        wait_until(lambda: "worker 1: " in server.log(), "the worker's first line")
        os.kill(main, signal.SIGHUP)
        wait_until(
            lambda: re.search(r"worker 1: .*TLS certificate reloaded", server.log()),
            "the worker's reload",
        )
    finally:
        server.stop()


def block(server: MailxProcess, local_part: str) -> Path:
    """A file where a Maildir should be: every write to it fails."""
    path = server.maildir("example.org", local_part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a Maildir")
    return path


def send_through_the_worker(
    server: MailxProcess, main: int, recipients: list[str], written: str
) -> list[object]:
    """Send one message while the main process is stopped, so the worker
    serves it, once ``written``'s copy is there; what sendmail gave."""
    outcome: list[object] = []

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=WAIT) as client:
            try:
                outcome.append(
                    client.sendmail(
                        "s@example.net", recipients, b"Subject: w\r\n\r\nbody\r\n"
                    )
                )
            except smtplib.SMTPException as error:
                outcome.append(error)

    os.kill(main, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=send)
        sender.start()
        wait_until(
            lambda: len(server.messages("example.org", written)) == 1,
            f"{written}'s copy, written by the worker",
        )
    finally:
        os.kill(main, signal.SIGCONT)
    sender.join(WAIT)
    return outcome


def flush(server: MailxProcess) -> None:
    subprocess.run(
        [str(PROJECT / ".venv/bin/mailx"), "queue", "flush", "--config", "mailx.toml"],
        cwd=server.workdir,
        capture_output=True,
        check=True,
    )


def test_a_maildir_that_fails_costs_the_others_no_second_copy(
    tmp_path: Path,
) -> None:
    """A worker that cannot write bob's Maildir writes alice's once and
    hands only bob to the main process, which queues him; once his Maildir
    can be written he gets one copy, and alice still has one."""
    server, main, _ = start_two(tmp_path)
    bob = block(server, "bob")
    try:
        recipients = ["bob@example.org", "alice@example.org"]
        assert send_through_the_worker(server, main, recipients, "alice") == [{}]
        bob.unlink()
        flush(server)
        wait_until(
            lambda: len(server.messages("example.org", "bob")) == 1, "bob's copy"
        )
        time.sleep(0.5)
    finally:
        server.stop()
    assert len(server.messages("example.org", "alice")) == 1
    assert len(server.messages("example.org", "bob")) == 1
    # One account of the message, the worker's: the handoff itself is not a
    # second client with a second "accepted" line.
    log = server.log()
    assert "from []:0" not in log and "client=[127.0.0.1]:0" not in log
    assert len(re.findall(r": accepted from=<s@example\.net> nrcpt=2 ", log)) == 1


def test_a_worker_hands_on_an_alias_maildir_it_could_not_write(
    tmp_path: Path,
) -> None:
    """An alias to alice and carol, where carol exists only through it and
    her Maildir cannot be written: the worker writes alice's copy, the main
    process takes carol's as one Maildir (not as an unknown user), and she
    gets it once her Maildir can be written; the client sees one 250."""
    port = free_port()
    extra = 'aliases = "aliases"\n[dns]\nservers = ["127.0.0.1:9"]\ntimeout = 1\n'
    config = basic_config(port, extra=extra).replace(
        "[server]\n", "[server]\nworkers = 2\n"
    )
    server = MailxProcess(tmp_path / "mx", config, port=port)
    (server.workdir / "aliases").write_text("team: alice, carol\n")
    carol = block(server, "carol")
    server.start()
    try:
        assert server.process is not None
        main = server.process.pid
        wait_until(lambda: len(worker_pids(main)) == 1, "the worker")
        outcome = send_through_the_worker(server, main, ["team@example.org"], "alice")
        assert outcome == [{}]
        carol.unlink()
        flush(server)
        wait_until(
            lambda: len(server.messages("example.org", "carol")) == 1, "carol's copy"
        )
    finally:
        server.stop()
    assert len(server.messages("example.org", "alice")) == 1
    assert len(server.messages("example.org", "carol")) == 1


def test_a_process_that_asked_ends_with_its_parent(tmp_path: Path) -> None:
    """
    die_with_parent: a child that asked is signalled when its parent is
    killed, instead of living on (here it would sleep for a minute).
    """
    project = str(Path(__file__).resolve().parent.parent)
    child = (
        "import time; from mailx.workers import die_with_parent; "
        "assert die_with_parent(); print('ready', flush=True); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    environment = {**os.environ, "PYTHONPATH": project}
    with subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, env=environment
    ) as top:
        try:
            assert top.stdout is not None
            child_pid = int(top.stdout.readline())
            # The child said it asked: its "ready" went to the same pipe.
            assert top.stdout.readline().strip() == b"ready"
        finally:
            top.kill()
            top.wait(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break  # ended, waiting for whoever adopted it
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)
