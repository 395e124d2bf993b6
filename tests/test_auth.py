"""
mailx.auth: scrypt hash strings, the users file, the twisted.cred checker,
the failure slow-down on a fake clock, and the hash command.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailx import auth
from mailx.auth import (
    FailureThrottle,
    PasswordHash,
    PasswordHashError,
    PortalAuthenticator,
    Users,
    UsersFileError,
    build_authenticator,
    hash_password,
    load_users,
    make_portal,
    parse_users,
)
from mailx.clients import client_key
from mailx.envelope import ClientInfo
from mailx.session import Session, SessionConfig
from tests.sessionkit import AcceptingPolicy, FakeOutput, RecordingSink


def cheap_hash(password: str) -> str:
    """Cheap parameters keep the unit tests fast; production uses the defaults."""
    return hash_password(password, n=16, r=1, p=1)


def run_now(work: Callable[[], bool]) -> Deferred[bool]:
    """Runs the blocking work at once instead of in a thread."""
    return succeed(work())


def users_text() -> str:
    return (
        "# mailx users\n"
        "\n"
        f"alice:{cheap_hash('correct horse')}:alice@example.org, @team.example\n"
        f"bob:{cheap_hash('battery staple')}:\n"
        f"carol:{cheap_hash('zwölf Boxkämpfer')}\n"
    )


def fired(deferred: Deferred[Any]) -> object:
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    return result


# --- password hashes ------------------------------------------------------------------


def test_hash_string_round_trip() -> None:
    """A hash string reads back and matches its password and no other."""
    text = cheap_hash("s3cret")
    assert text.startswith("scrypt$16$1$1$")
    parsed = PasswordHash.parse(text)
    assert str(parsed) == text
    assert parsed.matches("s3cret")
    assert not parsed.matches("s3cret ")
    assert not parsed.matches("S3cret")


def test_default_parameters_and_random_salt() -> None:
    """The default hash is N=16384, r=8, p=1 with a 16-octet salt, new each time."""
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second
    parsed = PasswordHash.parse(first)
    assert (parsed.n, parsed.r, parsed.p, len(parsed.salt)) == (16384, 8, 1, 16)
    assert PasswordHash.parse(second).matches("pw")


def test_known_vector_of_rfc_7914() -> None:
    """The derived key is scrypt's: RFC 7914 section 12's second test vector."""
    salt = b"NaCl"
    expected = bytes.fromhex(
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640"
    )
    key = PasswordHash(1024, 8, 16, salt, bytes(64)).derive("password")
    assert key == expected


def test_passwords_are_compared_after_unicode_normalisation() -> None:
    """Composed and decomposed accents, and a no-break space, are the same password."""
    parsed = PasswordHash.parse(cheap_hash("caf\u00e9 au lait"))
    assert parsed.matches("cafe\u0301 au lait")
    assert parsed.matches("caf\u00e9\u00a0au lait")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain-text-password",
        "scrypt$16$1$1$c2FsdHNhbHQ=",
        "bcrypt$16$1$1$c2FsdHNhbHQ=$" + "A" * 44,
        "scrypt$15$1$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$1$1$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$16$0$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$16$1$17$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$1048576$8$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$16$1$1$c2FsdA==$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$16$1$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(8)).decode(),
        "scrypt$16$1$1$not*base64$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$1_6$1$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
        "scrypt$ 16$1$1$c2FsdHNhbHQ=$" + base64.b64encode(bytes(32)).decode(),
    ],
)
def test_malformed_or_unbounded_hash_strings_are_refused(text: str) -> None:
    """A hash string that is not scrypt, or asks too much or too little, is refused."""
    with pytest.raises(PasswordHashError):
        PasswordHash.parse(text)


# --- the users file -----------------------------------------------------------------


def test_users_file_is_read() -> None:
    """Comments and blank lines are skipped; addresses are kept lower-cased."""
    users = parse_users(users_text())
    assert len(users) == 3
    alice = users.get("alice")
    assert alice is not None
    assert alice.addresses == ("alice@example.org", "@team.example")
    assert users.sender_addresses == {"alice": ("alice@example.org", "@team.example")}
    assert users.get("Alice") is None


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("alice", "expected user:scrypt-hash:addresses"),
        ("alice:x:y:z", "expected user:scrypt-hash:addresses"),
        (":{hash}:", "user name"),
        (" alice:{hash}:", "user name"),
        ("alice:{hash}:not-an-address", "'not-an-address' is not an address"),
        ("alice:{hash}:@", "'@' is not an address"),
        ("alice:plaintextpassword:", "bad password hash"),
    ],
)
def test_users_file_errors_name_the_line(line: str, says: str) -> None:
    """A bad line stops the load with the file, the line number and the reason."""
    text = "# users\n" + line.format(hash=cheap_hash("pw")) + "\n"
    with pytest.raises(UsersFileError) as caught:
        parse_users(text, "users.txt")
    message = str(caught.value)
    assert message.startswith("users.txt: line 2: ")
    assert says in message


def test_users_file_error_does_not_quote_the_hash() -> None:
    """The error for a line never repeats the password hash it holds."""
    secret_hash = cheap_hash("pw")
    with pytest.raises(UsersFileError) as caught:
        parse_users(f"alice:{secret_hash}:a:b\n")
    assert secret_hash not in str(caught.value)
    assert secret_hash.split("$")[-1] not in str(caught.value)


def test_duplicate_user_is_an_error() -> None:
    """The same user name twice is refused rather than one line winning."""
    line = f"alice:{cheap_hash('pw')}:\n"
    with pytest.raises(UsersFileError, match="line 2: user 'alice' appears twice"):
        parse_users(line + line)


def test_load_users_from_a_file(tmp_path: Path) -> None:
    """A users file on disk loads; "" means no users; a missing file is an error."""
    path = tmp_path / "users"
    path.write_text(users_text(), encoding="utf-8")
    assert len(load_users(str(path))) == 3
    assert len(load_users("")) == 0
    with pytest.raises(UsersFileError, match="cannot read"):
        load_users(str(tmp_path / "missing"))


def test_no_users_means_no_authenticator() -> None:
    """Without users there is no authenticator, so AUTH is not offered."""
    assert build_authenticator(Users(), Clock(), 5, run_now) is None
    users = parse_users(users_text())
    assert isinstance(
        build_authenticator(users, Clock(), 5, run_now), PortalAuthenticator
    )


# --- twisted.cred ---------------------------------------------------------------------


def login(users: Users, name: bytes, password: bytes) -> object:
    portal = make_portal(users, run_now)
    return fired(portal.login(UsernamePassword(name, password), None, auth.ISubmitter))


def test_portal_logs_in_with_the_right_password() -> None:
    """The portal gives a Submitter named as the user for the right password."""
    result = login(parse_users(users_text()), b"alice", b"correct horse")
    assert isinstance(result, tuple)
    interface, avatar, logout = result
    assert interface is auth.ISubmitter
    assert avatar == auth.Submitter("alice")
    logout()


def test_portal_refuses_wrong_password_unknown_user_and_bad_utf8() -> None:
    """A wrong password, an unknown user or undecodable octets are unauthorized."""
    users = parse_users(users_text())
    for name, password in [
        (b"alice", b"battery staple"),
        (b"nobody", b"correct horse"),
        (b"alice", b"\xff"),
        (b"ALICE", b"correct horse"),
    ]:
        result = login(users, name, password)
        assert isinstance(result, Failure)
        assert isinstance(result.value, UnauthorizedLogin)


def test_unknown_user_is_hashed_too() -> None:
    """An unknown user costs a hash like a known one, so timing does not tell."""
    calls: list[bool] = []

    def counting(work: Callable[[], bool]) -> Deferred[bool]:
        result = work()
        calls.append(result)
        return succeed(result)

    portal = make_portal(parse_users(users_text()), counting)
    portal.login(UsernamePassword(b"nobody", b"x"), None, auth.ISubmitter)
    assert calls == [False]


def test_non_ascii_password() -> None:
    """A UTF-8 password from SASL matches its hash."""
    result = login(parse_users(users_text()), b"carol", "zwölf Boxkämpfer".encode())
    assert isinstance(result, tuple)


# --- failure slow-down ----------------------------------------------------------------

CLIENT = ClientInfo("192.0.2.7", 4000)


def make_authenticator(clock: Clock, max_failures: int = 5) -> PortalAuthenticator:
    authenticator = build_authenticator(
        parse_users(users_text()), clock, max_failures, run_now
    )
    assert authenticator is not None
    return authenticator


def attempt(
    authenticator: PortalAuthenticator,
    password: str,
    client: ClientInfo = CLIENT,
    user: str = "alice",
) -> list[str | None]:
    answers: list[str | None] = []
    authenticator.authenticate(client, user, password).addCallback(answers.append)
    return answers


def test_good_credentials_answer_at_once() -> None:
    """A first attempt with the right password is answered without waiting."""
    assert attempt(make_authenticator(Clock()), "correct horse") == ["alice"]


def test_each_failure_doubles_the_wait() -> None:
    """After failures the next attempt waits 1, 2, 4 s before it is checked."""
    clock = Clock()
    authenticator = make_authenticator(clock, max_failures=10)
    assert attempt(authenticator, "wrong") == [None]
    for wait in (1.0, 2.0, 4.0):
        answers = attempt(authenticator, "wrong")
        clock.advance(wait - 0.01)
        assert answers == []
        clock.advance(0.01)
        assert answers == [None]
    answers = attempt(authenticator, "correct horse")
    clock.advance(7.99)
    assert answers == []
    clock.advance(0.01)
    assert answers == ["alice"]


def test_wait_is_capped() -> None:
    """The wait never grows beyond 30 seconds."""
    clock = Clock()
    throttle = FailureThrottle(clock, max_failures=100)
    for _ in range(40):
        throttle.record_failure("192.0.2.7")
    assert throttle.delay("192.0.2.7") == 30.0


def test_too_many_failures_refuse_even_the_right_password() -> None:
    """At max_auth_failures an address is refused until its failures are forgotten."""
    clock = Clock()
    authenticator = make_authenticator(clock, max_failures=2)
    assert attempt(authenticator, "wrong") == [None]
    answers = attempt(authenticator, "wrong")
    clock.advance(1)
    assert answers == [None]
    with capturedLogs() as events:
        answers = attempt(authenticator, "correct horse")
        clock.advance(2)
    assert answers == [None]
    texts = [formatEvent(event) for event in events]
    assert "auth refused from [192.0.2.7]: too many failures" in texts
    # RFC-less choice: forgotten 15 minutes after the last failure.
    clock.advance(auth.FAILURE_MEMORY)
    assert attempt(authenticator, "correct horse") == ["alice"]


def test_failures_are_counted_per_client_address() -> None:
    """Another client address is not slowed down by someone else's failures."""
    clock = Clock()
    authenticator = make_authenticator(clock, max_failures=2)
    attempt(authenticator, "wrong")
    attempt(authenticator, "wrong")
    clock.advance(1)
    other = ClientInfo("192.0.2.8", 4000)
    assert attempt(authenticator, "correct horse", other) == ["alice"]


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("2001:db8::1", "2001:db8::ffff:2", True),
        ("2001:db8::1", "2001:db8:0:1::1", False),
        ("192.0.2.7", "::ffff:192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
    ],
)
def test_client_keys(first: str, second: str, same: bool) -> None:
    """IPv6 clients count by /64, IPv4-mapped ones as their IPv4 address."""
    assert (client_key(first) == client_key(second)) is same


def test_parallel_attempts_stop_at_the_limit() -> None:
    """Attempts waiting in parallel are refused once the failures reach the limit."""
    clock = Clock()
    authenticator = make_authenticator(clock, max_failures=2)
    attempt(authenticator, "wrong")
    waiting = [attempt(authenticator, "wrong") for _ in range(3)]
    good = attempt(authenticator, "correct horse")
    clock.advance(1)
    assert waiting == [[None], [None], [None]]
    assert good == [None]


def test_remembered_addresses_are_bounded() -> None:
    """The failure table keeps at most max_tracked addresses, dropping the oldest."""
    clock = Clock()
    throttle = FailureThrottle(clock, max_failures=5, max_tracked=3)
    for number in range(5):
        clock.advance(1)
        throttle.record_failure(f"192.0.2.{number}")
    assert [throttle.failures(f"192.0.2.{n}") for n in range(5)] == [0, 0, 1, 1, 1]


def test_errors_other_than_refusal_are_not_counted() -> None:
    """A checker that breaks gives a failure to the session, not a counted refusal."""
    clock = Clock()

    def broken(work: Callable[[], bool]) -> Deferred[bool]:
        raise_error: Deferred[bool] = Deferred()
        raise_error.errback(OSError("thread pool gone"))
        return raise_error

    authenticator = build_authenticator(parse_users(users_text()), clock, 5, broken)
    assert authenticator is not None
    result = fired(authenticator.authenticate(CLIENT, "alice", "x"))
    assert isinstance(result, Failure)
    assert authenticator.throttle.failures("192.0.2.7") == 0


# --- through a session ----------------------------------------------------------------


def tls_session(
    authenticator: PortalAuthenticator,
) -> tuple[Session, FakeOutput]:
    output = FakeOutput()
    session = Session(
        SessionConfig(hostname="mx.example.org", tls_available=True),
        ClientInfo(address="192.0.2.7", port=40000),
        AcceptingPolicy(),
        RecordingSink(),
        output,
        clock=lambda: 1_700_000_000.0,
        authenticator=authenticator,
        new_id=lambda: "TESTID",
    )
    session.connection_made()
    session.data_received(b"EHLO client.example\r\nSTARTTLS\r\n")
    session.tls_started()
    session.data_received(b"EHLO client.example\r\n")
    return session, output


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def test_session_answer_waits_for_the_delay() -> None:
    """After a failure the session's next AUTH reply comes only when the wait ends."""
    clock = Clock()
    session, output = tls_session(make_authenticator(clock))
    session.data_received(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
    assert output.replies()[-1].startswith("535 5.7.8")
    session.data_received(b"AUTH PLAIN " + plain("alice", "correct horse") + b"\r\n")
    assert output.replies()[-1].startswith("535 5.7.8")
    clock.advance(1)
    assert output.replies()[-1].startswith("235 2.7.0")
    assert session.client.authenticated_as == "alice"


def test_credentials_never_reach_the_log() -> None:
    """Neither the password nor a failed user name appears in any log event."""
    clock = Clock()
    with capturedLogs() as events:
        session, _ = tls_session(make_authenticator(clock, max_failures=2))
        session.data_received(b"AUTH LOGIN\r\n")
        session.data_received(base64.b64encode(b"hunter2-as-user") + b"\r\n")
        session.data_received(base64.b64encode(b"pa55-w0rd") + b"\r\n")
        for _ in range(3):
            session.data_received(
                b"AUTH PLAIN " + plain("alice", "correct horse") + b"\r\n"
            )
            clock.advance(30)
        session.data_received(b"AUTH PLAIN " + plain("bob", "letmein") + b"\r\n")
        clock.advance(30)
    text = "\n".join(formatEvent(event) for event in events) + repr(events)
    assert "auth failed from [192.0.2.7]" in text
    for secret in ("hunter2-as-user", "pa55-w0rd", "correct horse", "letmein"):
        assert secret not in text
        assert base64.b64encode(secret.encode()).decode() not in text


# --- python -m mailx.auth hash --------------------------------------------------------


class _Input(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_hash_command_prints_a_usable_hash() -> None:
    """The hash command reads one line from stdin and prints a matching hash."""
    stdout = io.StringIO()
    assert auth.main(["hash"], _Input("my password\nignored\n"), stdout) == 0
    printed = stdout.getvalue()
    assert printed.endswith("\n")
    assert PasswordHash.parse(printed.strip()).matches("my password")
    assert "my password" not in printed


def test_hash_command_refuses_empty_password_and_bad_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An empty password exits 1 and other arguments exit 2, printing no hash."""
    stdout = io.StringIO()
    assert auth.main(["hash"], _Input("\n"), stdout) == 1
    assert auth.main([], _Input("pw\n"), stdout) == 2
    assert auth.main(["hash", "extra"], _Input("pw\n"), stdout) == 2
    assert stdout.getvalue() == ""
    assert "usage: python -m mailx.auth hash" in capsys.readouterr().err
