"""
Relay control and authenticated submission against the real server (twistd)
on loopback: the open-relay battery from an untrusted address, relaying for
trusted and authenticated clients, AUTH over STARTTLS on the submission
listener and over implicit TLS, with smtplib and swaks.

relay.networks is 127.0.0.1/32, so a client bound to 127.0.0.9 is untrusted.
DNS points at a loopback port where nothing answers: relayed mail stays in the
spool and nothing asks the machine's resolver.
"""

from __future__ import annotations

import base64
import re
import signal
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailx.auth import hash_password
from mailx.spool import SpoolStore
from tests.mailxproc import MailxProcess, free_port, toml_list
from tests.peers import run_swaks, swaks_available
from tests.smtppeer import make_tls_identity

pytestmark = pytest.mark.integration

UNTRUSTED = "127.0.0.9"
TRUSTED = "127.0.0.1"
ALICE_PASSWORD = "alice's long passphrase"
BOB_PASSWORD = "b0b-secret"
# Bounds the wait for a log line to appear (the server writes it at once).
LOG_WAIT = 10.0

needs_swaks = pytest.mark.skipif(not swaks_available(), reason="swaks is not installed")


@dataclass
class Exchanger:
    """A running mailx with SMTP, submission and implicit-TLS listeners."""

    process: MailxProcess
    submission_port: int
    smtps_port: int
    ca_pem: bytes

    @property
    def smtp_port(self) -> int:
        return self.process.port

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        context.check_hostname = False
        return context

    def queued_contents(self) -> list[bytes]:
        store = SpoolStore(str(self.process.workdir / "var/mailx/queue"))
        return [store.read_content(message_id) for message_id in store.ids()]

    def wait_for_log(self, text: str) -> str:
        deadline = time.monotonic() + LOG_WAIT
        while time.monotonic() < deadline:
            log = self.process.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log:\n{self.process.log()}")


def exchanger_config(
    smtp_port: int,
    submission_port: int,
    smtps_port: int,
    users_file: str = "users",
    limits: str = "",
) -> str:
    listen = f"tcp:{smtp_port}:interface={TRUSTED}"
    submission = f"tcp:{submission_port}:interface={TRUSTED}"
    smtps = f"tcp:{smtps_port}:interface={TRUSTED}"
    return f"""
[server]
hostname = "mx.example.org"
listen = {toml_list([listen])}
submission = {toml_list([submission])}
smtps = {toml_list([smtps])}
control_socket = "var/mailx/control.sock"

[domains]
local = ["example.org"]
backup = ["backup.example"]

[mailboxes]
users = ["alice", "bob"]

[tls]
certificate = "server.pem"
key = "server.pem"

[auth]
users_file = "{users_file}"

[relay]
networks = ["127.0.0.1/32"]

[dns]
servers = ["127.0.0.1:{free_port()}"]
timeout = 1

[queue]
min_retry = 3600
max_retry = 3600

[limits]
{limits}
"""


def users_file_text() -> str:
    return (
        "# test users\n"
        f"alice:{hash_password(ALICE_PASSWORD)}:alice@example.org,@alice.example\n"
        f"bob:{hash_password(BOB_PASSWORD)}:\n"
    )


def make_exchanger(workdir: Path, limits: str = "") -> Exchanger:
    identity = make_tls_identity("mx.example.org")
    workdir.mkdir(parents=True)
    (workdir / "server.pem").write_bytes(identity.server_pem)
    (workdir / "users").write_text(users_file_text())
    smtp_port, submission_port, smtps_port = free_port(), free_port(), free_port()
    config = exchanger_config(smtp_port, submission_port, smtps_port, limits=limits)
    process = MailxProcess(workdir, config, port=smtp_port)
    return Exchanger(process, submission_port, smtps_port, identity.ca_pem)


@pytest.fixture(scope="module")
def exchanger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchanger]:
    """One server for the module's tests; each test uses its own addresses."""
    server = make_exchanger(tmp_path_factory.mktemp("relay") / "mx")
    server.process.start()
    try:
        yield server
    finally:
        server.process.stop()


def untrusted_client(port: int) -> smtplib.SMTP:
    return smtplib.SMTP(TRUSTED, port, timeout=30, source_address=(UNTRUSTED, 0))


def rcpt_reply(client: smtplib.SMTP, argument: str) -> tuple[int, bytes]:
    """RCPT with the argument exactly as given (smtplib would add brackets)."""
    return client.docmd("RCPT", f"TO:{argument}")


# --- the open-relay battery, from an untrusted address ----------------------------

UNSERVED = {
    "percent-hack": "<user%example.org@other.example>",
    "bang-path": "<example.org!user@other.example>",
    "quoted-at": '<"user@example.org"@other.example>',
    "two-ats": "<user@example.org@other.example>",
    "source-route": "<@example.org:user@other.example>",
    "address-literal": "<user@[192.0.2.1]>",
    "address-literal-own": "<alice@[127.0.0.1]>",
    "upper-case": "<user@OTHER.EXAMPLE>",
    "trailing-dot": "<user@other.example.>",
    "empty-local-part": "<@other.example>",
    "empty-quoted-local-part": '<""@other.example>',
}
SERVED = {
    "percent-hack": "<user%other.example@example.org>",
    "bang-path": "<other.example!user@example.org>",
    "quoted-at": '<"user@other.example"@example.org>',
    "two-ats": "<user@other.example@example.org>",
    "source-route": "<@other.example:user@example.org>",
    "upper-case": "<user%other.example@EXAMPLE.ORG>",
    "trailing-dot": "<user%other.example@example.org.>",
    "empty-local-part": "<@example.org>",
    "empty-quoted-local-part": '<""@example.org>',
}


@pytest.mark.parametrize("argument", UNSERVED.values(), ids=UNSERVED)
def test_battery_unserved_is_refused(exchanger: Exchanger, argument: str) -> None:
    """From 127.0.0.9 a path whose last domain is not served gets a 5xx."""
    with untrusted_client(exchanger.smtp_port) as client:
        client.ehlo("client.example")
        assert client.mail("probe@example.net")[0] == 250
        code, text = rcpt_reply(client, argument)
    assert code in (550, 553, 554), (code, text)
    if code == 554:
        assert text == b"5.7.1 Relay access denied"


@pytest.mark.parametrize("argument", SERVED.values(), ids=SERVED)
def test_battery_served_is_not_relayed(exchanger: Exchanger, argument: str) -> None:
    """From 127.0.0.9 a path ending in a local domain is refused as no such user."""
    with untrusted_client(exchanger.smtp_port) as client:
        client.ehlo("client.example")
        assert client.mail("probe@example.net")[0] == 250
        code, text = rcpt_reply(client, argument)
        # Had anything been accepted, DATA would now queue it.
        assert client.docmd("DATA")[0] == 503
    assert code in (550, 553), (code, text)
    assert not any(b"probe@example.net" in c for c in exchanger.queued_contents())


def test_claims_do_not_make_a_client_trusted(exchanger: Exchanger) -> None:
    """An EHLO of the server's own name and a local sender still get 554 5.7.1."""
    with untrusted_client(exchanger.smtp_port) as client:
        client.ehlo("mx.example.org")
        assert client.mail("alice@example.org")[0] == 250
        code, text = client.rcpt("someone@other.example")
    assert (code, text) == (554, b"5.7.1 Relay access denied")
    log = exchanger.wait_for_log("reject: RCPT from [127.0.0.9]:")
    assert re.search(r"reject: RCPT from \[127\.0\.0\.9\]:\d+: 554 5\.7\.1 ", log)
    assert "to=<someone@other.example>" in log


def test_one_message_some_recipients_refused(exchanger: Exchanger) -> None:
    """A local recipient is delivered while the relay recipient beside it is refused."""
    body = b"Subject: mixed\r\n\r\nmixed recipients\r\n"
    with untrusted_client(exchanger.smtp_port) as client:
        refused = client.sendmail(
            "mixed@example.net", ["bob@example.org", "x@other.example"], body
        )
    assert refused == {"x@other.example": (554, b"5.7.1 Relay access denied")}
    stored = exchanger.process.messages("example.org", "bob")
    assert any(b"mixed recipients" in message for message in stored)
    assert not any(b"mixed recipients" in c for c in exchanger.queued_contents())


def test_backup_domain_accepted_from_anyone(exchanger: Exchanger) -> None:
    """Mail for a backup domain is accepted from an untrusted client into the spool."""
    body = b"Subject: backup\r\n\r\nfor the primary\r\n"
    with untrusted_client(exchanger.smtp_port) as client:
        assert client.sendmail("b@example.net", ["u@backup.example"], body) == {}
    assert any(b"for the primary" in c for c in exchanger.queued_contents())


def test_trusted_network_relays_into_the_spool(exchanger: Exchanger) -> None:
    """A client in relay.networks relays: 250, and the message is in the spool."""
    body = b"Subject: relay\r\n\r\nrelayed by a trusted client\r\n"
    with smtplib.SMTP(TRUSTED, exchanger.smtp_port, timeout=30) as client:
        assert client.sendmail("t@example.net", ["x@other.example"], body) == {}
    assert any(b"relayed by a trusted client" in c for c in exchanger.queued_contents())


# --- submission: AUTH over STARTTLS ---------------------------------------------------


def test_plain_submission_refuses_auth_and_mail(exchanger: Exchanger) -> None:
    """Before TLS: no AUTH offered, AUTH gets 538 5.7.11 and MAIL 530 5.7.0."""
    with untrusted_client(exchanger.submission_port) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        plain = base64.b64encode(f"\0alice\0{ALICE_PASSWORD}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {plain}")
        assert (code, text[:6]) == (538, b"5.7.11")
        code, text = client.mail("alice@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
    assert ALICE_PASSWORD not in exchanger.process.log()


def test_auth_on_plain_mx_port_is_refused(exchanger: Exchanger) -> None:
    """On the MX listener without TLS, AUTH gets 538 5.7.11 too."""
    with untrusted_client(exchanger.smtp_port) as client:
        client.ehlo("client.example")
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "LOGIN")
        assert code == 538


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_auth_then_relay(exchanger: Exchanger, mechanism: str) -> None:
    """After STARTTLS and AUTH, a user relays from an untrusted address."""
    body = f"Subject: sub\r\n\r\nsubmitted with {mechanism}\r\n".encode()
    with untrusted_client(exchanger.submission_port) as client:
        client.starttls(context=exchanger.tls_context())
        client.ehlo("client.example")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.user, client.password = "alice", ALICE_PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        assert client.auth(mechanism, authobject)[0] == 235
        refused = client.sendmail(
            "alice@example.org", ["far@other.example", "bob@example.org"], body
        )
    assert refused == {}
    assert any(body.split(b"\r\n")[-2] in c for c in exchanger.queued_contents())
    log = exchanger.process.log()
    assert re.search(r"auth ok from \[127\.0\.0\.9\]:\d+ user=alice", log)
    assert ALICE_PASSWORD not in log


def test_wrong_password_is_535(exchanger: Exchanger) -> None:
    """A wrong password gets 535 5.7.8 and MAIL still needs AUTH."""
    with smtplib.SMTP(TRUSTED, exchanger.submission_port, timeout=30) as client:
        client.starttls(context=exchanger.tls_context())
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.login("bob", "not bob's password")
        assert caught.value.smtp_code == 535
        assert client.mail("bob@example.org")[0] == 530
    assert "not bob's password" not in exchanger.process.log()


@pytest.mark.parametrize(
    ("sender", "code"),
    [
        ("alice@example.org", 250),
        ("anyone@alice.example", 250),
        ("bob@example.org", 553),
        ("alice@other.example", 553),
    ],
)
def test_sender_addresses_are_enforced(
    exchanger: Exchanger, sender: str, code: int
) -> None:
    """alice may send only from her listed addresses; others get 553 5.7.1."""
    with untrusted_client(exchanger.submission_port) as client:
        client.starttls(context=exchanger.tls_context())
        client.ehlo("client.example")
        client.login("alice", ALICE_PASSWORD)
        reply = client.mail(sender)
    assert reply[0] == code
    if code == 553:
        assert reply[1].startswith(b"5.7.1 ")


def test_user_without_addresses_may_use_any_sender(exchanger: Exchanger) -> None:
    """bob has no address list, so any reverse path is accepted."""
    with untrusted_client(exchanger.submission_port) as client:
        client.starttls(context=exchanger.tls_context())
        client.ehlo("client.example")
        client.login("bob", BOB_PASSWORD)
        assert client.mail("whatever@elsewhere.example")[0] == 250


# --- implicit TLS (RFC 8314) ------------------------------------------------------


# Bounds the wait for a TLS handshake on loopback.
HANDSHAKE_TIMEOUT = 10


def test_implicit_tls_auth_and_send(exchanger: Exchanger) -> None:
    """On the smtps listener TLS starts at once, AUTH is offered and mail is sent."""
    with smtplib.SMTP_SSL(
        TRUSTED,
        exchanger.smtps_port,
        timeout=HANDSHAKE_TIMEOUT,
        source_address=(UNTRUSTED, 0),
        context=exchanger.tls_context(),
    ) as client:
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        assert client.mail("bob@example.org")[0] == 530
        client.rset()
        client.login("bob", BOB_PASSWORD)
        refused = client.sendmail(
            "bob@example.org",
            ["alice@example.org"],
            b"Subject: smtps\r\n\r\nover implicit TLS\r\n",
        )
    assert refused == {}
    stored = exchanger.process.messages("example.org", "alice")
    (message,) = [m for m in stored if b"over implicit TLS" in m]
    assert b"with ESMTPSA id" in message


@needs_swaks
def test_swaks_starttls_auth_on_submission(exchanger: Exchanger) -> None:
    """swaks submits with STARTTLS and AUTH PLAIN; the message is delivered."""
    result = run_swaks(
        server=TRUSTED,
        port=exchanger.submission_port,
        mail_from="alice@example.org",
        rcpt_to=["bob@example.org"],
        body="swaks over submission",
        tls=True,
        extra_args=[
            "--local-interface",
            UNTRUSTED,
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            ALICE_PASSWORD,
        ],
    )
    assert result.succeeded, result.transcript
    assert 235 in result.reply_codes()
    stored = exchanger.process.messages("example.org", "bob")
    assert any(b"swaks over submission" in message for message in stored)


@needs_swaks
def test_swaks_implicit_tls_auth_login(exchanger: Exchanger) -> None:
    """swaks submits over implicit TLS with AUTH LOGIN."""
    result = run_swaks(
        server=TRUSTED,
        port=exchanger.smtps_port,
        mail_from="bob@example.org",
        rcpt_to=["far@other.example"],
        body="swaks over smtps",
        timeout=HANDSHAKE_TIMEOUT,
        extra_args=[
            "--local-interface",
            UNTRUSTED,
            "--tls-on-connect",
            "--auth",
            "LOGIN",
            "--auth-user",
            "bob",
            "--auth-password",
            BOB_PASSWORD,
        ],
    )
    assert result.succeeded, result.transcript
    assert any(b"swaks over smtps" in c for c in exchanger.queued_contents())


@needs_swaks
def test_swaks_without_auth_cannot_relay(exchanger: Exchanger) -> None:
    """swaks from the untrusted address without AUTH is refused the relay."""
    result = run_swaks(
        server=TRUSTED,
        port=exchanger.smtp_port,
        mail_from="spammer@example.net",
        rcpt_to=["victim@other.example"],
        extra_args=["--local-interface", UNTRUSTED],
    )
    assert not result.succeeded
    assert 554 in result.reply_codes()


# --- failures slowed down, then refused ----------------------------------------------


def test_failures_lock_out_the_address(tmp_path: Path) -> None:
    """After max_auth_failures failures even the right password gets 535."""
    server = make_exchanger(tmp_path / "mx", limits="max_auth_failures = 2")
    server.process.start()
    try:
        with untrusted_client(server.submission_port) as client:
            client.starttls(context=server.tls_context())
            client.ehlo("client.example")
            for password in ("guess-1", "guess-2", ALICE_PASSWORD):
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.login("alice", password)
        # Another address is not affected.
        with smtplib.SMTP(TRUSTED, server.submission_port, timeout=30) as client:
            client.starttls(context=server.tls_context())
            client.ehlo("client.example")
            assert client.login("alice", ALICE_PASSWORD)[0] == 235
        log = server.wait_for_log("auth refused from [127.0.0.9]: too many failures")
    finally:
        server.process.stop()
    assert "auth failures from [127.0.0.9] reached 2" in log
    for secret in ("guess-1", "guess-2", ALICE_PASSWORD):
        assert secret not in log


def test_bad_users_file_stops_the_start(tmp_path: Path) -> None:
    """A users file with a plain-text password stops twistd naming file and line."""
    server = make_exchanger(tmp_path / "mx")
    (server.process.workdir / "users").write_text("alice:hunter2:\n")
    with pytest.raises(
        RuntimeError, match=r"users_file 'users': line 1: bad pass"
    ) as caught:
        server.process.start()
    assert "hunter2" not in str(caught.value)
    assert "Traceback" not in str(caught.value)


# --- SIGHUP reloads the users file --------------------------------------------------


def test_sighup_reloads_the_users_file(tmp_path: Path) -> None:
    """After SIGHUP a new user can log in and a removed one cannot; a broken
    file is refused with its line in the log and the users in force stay."""
    server = make_exchanger(tmp_path / "mx")
    users = server.process.workdir / "users"
    carol_password = "carol's new passphrase"
    server.process.start()
    try:
        assert server.process.process is not None
        users.write_text(f"carol:{hash_password(carol_password)}:\n")
        server.process.process.send_signal(signal.SIGHUP)
        server.wait_for_log("users reloaded from users: 1 users")
        with smtplib.SMTP(TRUSTED, server.submission_port, timeout=30) as client:
            client.starttls(context=server.tls_context())
            client.ehlo("client.example")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("bob", BOB_PASSWORD)
            assert client.login("carol", carol_password)[0] == 235

        users.write_text("carol:plain-text-password:\n")
        server.process.process.send_signal(signal.SIGHUP)
        log = server.wait_for_log("users reload failed, keeping the old users")
        with smtplib.SMTP(TRUSTED, server.submission_port, timeout=30) as client:
            client.starttls(context=server.tls_context())
            client.ehlo("client.example")
            assert client.login("carol", carol_password)[0] == 235
        assert server.process.process.poll() is None
    finally:
        server.process.stop()
    assert "line 1" in log
    assert "plain-text-password" not in log


def test_an_empty_users_file_after_sighup_is_a_warning(tmp_path: Path) -> None:
    """A users file emptied and reloaded warns that nobody can authenticate."""
    server = make_exchanger(tmp_path / "mx")
    server.process.start()
    try:
        assert server.process.process is not None
        (server.process.workdir / "users").write_text("# nobody for now\n")
        server.process.process.send_signal(signal.SIGHUP)
        log = server.wait_for_log("users file users lists no users now")
    finally:
        server.process.stop()
    assert "users reloaded from users: 0 users" in log


def test_authenticating_listeners_without_users_stop_the_start(
    tmp_path: Path,
) -> None:
    """Submission and implicit-TLS listeners with an empty users file could
    take no mail: the start is refused with one line saying so."""
    server = make_exchanger(tmp_path / "mx")
    (server.process.workdir / "users").write_text("# nobody yet\n")
    output = server.process.run_refused()
    assert (
        "server.submission: these listeners take mail only after AUTH,"
        " users lists no users" in output
    )
    assert "Traceback" not in output
