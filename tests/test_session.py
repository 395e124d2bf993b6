"""The SMTP session state machine, driven with fakes and no reactor."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from typing import cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from mailx import replies
from mailx.envelope import Body, RecipientDecision, Route
from mailx.replies import Reply, ReplyError
from mailx.session import MAX_COMMAND_LINE, Session
from tests.sessionkit import FakeAuthenticator, FakeOutput, make_session

TRANSACTION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@example.net>\r\n"
    b"RCPT TO:<alice@example.org>\r\n"
    b"DATA\r\n"
)
MESSAGE = b"Subject: hi\r\n\r\nHello\r\n..dot\r\n.\r\n"


@contextlib.contextmanager
def mail_events() -> Iterator[list[LogEvent]]:
    """The log events emitted inside the ``with`` block."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def feed(session: Session, data: bytes) -> None:
    session.data_received(data)


def test_greeting_is_220_with_the_hostname() -> None:
    """The session opens with 220 and the configured host name."""
    _, output, _, _ = make_session()
    assert output.replies() == ["220 mx.example.org ESMTP mailx ready"]


def test_ehlo_advertises_the_extensions() -> None:
    """EHLO lists every implemented extension, STARTTLS only with a certificate."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c.example\r\n")
    text = b"".join(output.writes).decode()
    for keyword in (
        "PIPELINING",
        "SIZE 100000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "SMTPUTF8",
        "DSN",
    ):
        assert f"250-{keyword}\r\n" in text or f"250 {keyword}\r\n" in text
    assert "STARTTLS" not in text

    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"EHLO c.example\r\n")
    assert b"250 STARTTLS\r\n" in b"".join(output.writes)


def test_helo_gives_a_plain_250() -> None:
    """HELO is answered with one 250 line and no extensions."""
    session, output, _, _ = make_session()
    feed(session, b"HELO c.example\r\n")
    assert output.replies()[-1] == "250 mx.example.org greets c.example"


def test_a_whole_transaction_stores_the_message() -> None:
    """MAIL, RCPT, DATA and the text store one message, dot-stuffing undone."""
    session, output, sink, _ = make_session()
    feed(session, TRANSACTION + MESSAGE)
    assert output.codes() == [220, 250, 250, 250, 354, 250]
    assert output.replies()[-1] == "250 2.0.0 OK queued as TESTID"
    assert sink.bodies() == [b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"]
    envelope, content = sink.messages[0]
    assert str(envelope.reverse_path) == "sender@example.net"
    assert [str(r.address) for r in envelope.recipients] == ["alice@example.org"]
    assert envelope.recipients[0].route is Route.LOCAL
    assert content.startswith(
        b"Received: from client.example ([192.0.2.7])\r\n"
        b"\tby mx.example.org (mailx) with ESMTP id TESTID\r\n"
        b"\tfor <alice@example.org>; "
    )


def test_pipelined_commands_get_one_write() -> None:
    """Commands sent in one segment are answered in order in a single write."""
    session, output, _, _ = make_session()
    output.writes.clear()
    feed(session, TRANSACTION)
    assert len(output.writes) == 1
    assert output.codes() == [250, 250, 250, 354]


@pytest.mark.parametrize("split", range(1, len(TRANSACTION + MESSAGE)))
def test_split_at_every_octet(split: int) -> None:
    """Splitting the input anywhere gives the same replies and message."""
    data = TRANSACTION + MESSAGE + b"QUIT\r\n"
    session, output, sink, _ = make_session()
    feed(session, data[:split])
    feed(session, data[split:])
    assert output.codes() == [220, 250, 250, 250, 354, 250, 221]
    assert sink.bodies() == [b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"]
    assert output.closed


def test_every_octet_alone() -> None:
    """Input arriving one octet at a time is read exactly as in one piece."""
    data = TRANSACTION + MESSAGE + b"QUIT\r\n"
    session, output, sink, _ = make_session()
    for index in range(len(data)):
        feed(session, data[index : index + 1])
    assert output.codes() == [220, 250, 250, 250, 354, 250, 221]
    assert sink.bodies() == [b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"]


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\n.\n", b"\r\n.\n"])
def test_a_bare_line_ending_never_ends_the_message(fake_end: bytes) -> None:
    """An end-of-data with a bare LF neither ends the message nor starts commands."""
    session, output, sink, _ = make_session()
    feed(session, TRANSACTION)
    feed(
        session,
        b"first part"
        + fake_end
        + b"MAIL FROM:<x@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
        + b"DATA\r\nsecond\r\n",
    )
    assert output.codes() == [220, 250, 250, 250, 354]
    feed(session, b".\r\n")
    assert output.codes() == [220, 250, 250, 250, 354, 554]
    assert output.replies()[-1].startswith("554 5.6.11 ")
    assert sink.messages == []


def test_bare_cr_is_refused_too() -> None:
    """A bare CR inside message text rejects the message at its end."""
    session, output, sink, _ = make_session()
    feed(session, TRANSACTION + b"a\rb\r\n.\r\n")
    assert output.replies()[-1].startswith("554 5.6.11 ")
    assert sink.messages == []


def test_an_overlong_line_in_data_rejects_only_that_message() -> None:
    """A 2,000-octet text line gets one 5xx at the end; nothing in the body runs."""
    session, output, sink, _ = make_session()
    feed(session, TRANSACTION)
    feed(session, b"x" * 2000 + b"\r\n")
    feed(session, b"MAIL FROM:<x@example.com>\r\n" * 3)
    feed(session, b".\r\n")
    assert output.codes() == [220, 250, 250, 250, 354, 554]
    assert output.replies()[-1].startswith("554 5.6.0 ")
    assert sink.messages == []
    # The session is back in command mode and works.
    feed(session, b"MAIL FROM:<a@example.net>\r\n")
    assert output.codes()[-1] == 250


def test_an_endless_line_in_data_keeps_memory_bounded() -> None:
    """Megabytes without CRLF are discarded as they come, not buffered."""
    session, output, _, _ = make_session()
    feed(session, TRANSACTION)
    for _ in range(100):
        feed(session, b"y" * 10000)
    assert len(session._buffer) <= 1001
    feed(session, b"\r\n.\r\n")
    assert output.codes()[-1] == 552  # the discarded octets exceed SIZE too


def test_dot_stuffing_at_the_very_start() -> None:
    """A stuffed dot on the first line and a line of two dots are undone."""
    session, _, sink, _ = make_session()
    feed(session, TRANSACTION + b"..\r\n...x\r\n.\r\n")
    assert sink.bodies() == [b".\r\n..x\r\n"]


def test_empty_message_by_data() -> None:
    """DATA followed at once by the end stores an empty message."""
    session, output, sink, _ = make_session()
    feed(session, TRANSACTION + b".\r\n")
    assert output.codes()[-1] == 250
    assert sink.bodies() == [b""]


def test_bdat_chunks_are_read_as_octets() -> None:
    """BDAT stores its octets unchanged, '.' lines included."""
    session, output, sink, _ = make_session()
    chunk1 = b"Subject: x\r\n\r\n.\r\n"
    chunk2 = b"..\r\nend\r\n"
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        + b"BDAT %d\r\n" % len(chunk1)
        + chunk1
        + b"BDAT %d LAST\r\n" % len(chunk2)
        + chunk2,
    )
    assert output.codes() == [220, 250, 250, 250, 250, 250]
    assert sink.bodies() == [chunk1 + chunk2]


def test_bdat_zero_last_ends_the_message() -> None:
    """BDAT 0 LAST after a chunk ends the message with what was sent."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n",
    )
    assert output.codes()[-2:] == [250, 250]
    assert sink.bodies() == [b"abc\r\n"]


def test_bdat_last_line_without_crlf_gets_one() -> None:
    """A text message whose last line lacks CRLF is stored with one added."""
    session, _, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"BDAT 3 LAST\r\nabc",
    )
    assert sink.bodies() == [b"abc\r\n"]


def test_bdat_after_last_is_a_bad_sequence() -> None:
    """A BDAT after LAST has no transaction: 503, and its octets are skipped."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"BDAT 2 LAST\r\nx\nBDAT 6\r\nNOOP\r\nNOOP\r\n",
    )
    # x<LF> has a bare LF: refused; then BDAT 6 swallows "NOOP\r\n".
    assert output.codes() == [220, 250, 250, 250, 554, 503, 250]
    assert sink.messages == []


def test_data_during_bdat_is_refused() -> None:
    """DATA in the middle of a BDAT transfer gets 503 and changes nothing."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"BDAT 3\r\nab\nDATA\r\n",
    )
    assert output.codes()[-1] == 503
    feed(session, b"BDAT 0 LAST\r\n")
    # The chunk had a bare LF: the message is refused at LAST.
    assert output.codes()[-1] == 554
    assert sink.messages == []


def test_bdat_without_recipients_skips_the_chunk() -> None:
    """BDAT before any recipient gets 503 and its octets are never commands."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nBDAT 6 LAST\r\nQUIT\r\n")
    assert output.codes() == [220, 250, 250, 503]
    assert not output.closed


def test_binarymime_requires_bdat() -> None:
    """BODY=BINARYMIME with DATA is refused; with BDAT bare LFs are kept."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net> BODY=BINARYMIME\r\n"
        b"RCPT TO:<bob@example.org>\r\nDATA\r\nBDAT 4 LAST\r\na\nb\0",
    )
    assert output.codes() == [220, 250, 250, 250, 503, 250]
    assert sink.bodies() == [b"a\nb\0"]
    assert sink.messages[0][0].body is Body.BINARY


def test_starttls_discards_pipelined_input() -> None:
    """After STARTTLS one reply; RSET sent behind it is never answered."""
    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"EHLO a\r\nSTARTTLS\r\nRSET\r\n")
    assert output.codes() == [220, 250, 220]
    assert output.tls_started == 1
    session.tls_started()
    assert output.codes() == [220, 250, 220]
    feed(session, b"MAIL FROM:<s@example.net>\r\n")
    assert output.replies()[-1].startswith("503 5.5.1 ")
    feed(session, b"EHLO a\r\n")
    text = b"".join(output.writes)
    assert not text.endswith(b"STARTTLS\r\n")


def test_starttls_before_ehlo_is_refused() -> None:
    """STARTTLS before EHLO gets 503 5.5.1 asking for EHLO, and TLS does not start."""
    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"STARTTLS\r\nNOOP\r\n")
    assert output.replies()[1:] == ["503 5.5.1 Send EHLO or HELO first", "250 2.0.0 OK"]
    assert output.tls_started == 0


def test_starttls_again_after_the_handshake_says_tls_is_active() -> None:
    """A second STARTTLS after the handshake, before EHLO, gets 503 TLS active."""
    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"EHLO a\r\nSTARTTLS\r\n")
    session.tls_started()
    feed(session, b"STARTTLS\r\n")
    assert output.replies()[-1] == "503 5.5.1 TLS already active"
    assert output.tls_started == 1


def test_octets_during_the_handshake_are_dropped() -> None:
    """Nothing arriving between STARTTLS and the handshake's end is read."""
    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"EHLO a\r\nSTARTTLS\r\n")
    feed(session, b"NOOP\r\n")
    assert output.codes() == [220, 250, 220]


def test_unknown_commands_end_the_session_after_the_limit() -> None:
    """Too many errors get 421 and the connection is closed."""
    session, output, _, _ = make_session(max_errors=3)
    feed(session, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert output.codes() == [220, 500, 500, 500, 421]
    assert output.closed


def test_an_overlong_command_line_is_refused() -> None:
    """A command line longer than 512 octets gets 500 5.5.6, then work goes on."""
    session, output, _, _ = make_session()
    feed(session, b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\nNOOP\r\n")
    assert output.codes() == [220, 500, 250]
    assert output.replies()[1].startswith("500 5.5.6 ")


def test_bare_lf_never_ends_a_command() -> None:
    """NOOP<LF>QUIT<CRLF> is one bad line, not two commands."""
    session, output, _, _ = make_session()
    feed(session, b"NOOP\nQUIT\r\n")
    assert output.codes() == [220, 501]
    assert not output.closed


def test_declared_size_over_the_limit() -> None:
    """MAIL with a SIZE over the limit is refused with 552 5.3.4."""
    session, output, _, _ = make_session(max_message_size=1000)
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net> SIZE=1001\r\n")
    assert output.replies()[-1].startswith("552 5.3.4 ")


def test_size_is_enforced_during_the_transfer() -> None:
    """A message that grows past the limit is refused at its end."""
    session, output, sink, _ = make_session(max_message_size=1000)
    feed(session, TRANSACTION + (b"y" * 100 + b"\r\n") * 20 + b".\r\n")
    assert output.replies()[-1].startswith("552 5.3.4 ")
    assert sink.messages == []


def test_recipient_limit() -> None:
    """Recipients beyond the limit get 452 4.5.3; the others stay."""
    session, output, sink, _ = make_session(max_recipients=2)
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net>\r\n")
    names = (b"alice", b"bob", b"postmaster")
    feed(session, b"".join(b"RCPT TO:<%s@example.org>\r\n" % n for n in names))
    assert output.codes()[-3:] == [250, 250, 452]
    assert output.replies()[-1].startswith("452 4.5.3 ")
    feed(session, b"DATA\r\nx\r\n.\r\n")
    assert len(sink.messages[0][0].recipients) == 2


def test_too_many_received_headers() -> None:
    """A message with 50 Received headers is refused as a loop (554 5.4.6)."""
    session, output, sink, _ = make_session()
    header = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 50
    feed(session, TRANSACTION + header + b"\r\nbody\r\n.\r\n")
    assert output.replies()[-1].startswith("554 5.4.6 ")
    assert sink.messages == []


def test_storage_failure_is_temporary() -> None:
    """When the sink fails the client gets 451 4.3.0, never a 5xx."""
    session, output, sink, _ = make_session()
    sink.fail = True
    feed(session, TRANSACTION + MESSAGE)
    assert output.replies()[-1].startswith("451 4.3.0 ")


def test_address_syntax_and_parameters() -> None:
    """Malformed paths get 501/553 and unknown parameters 555."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c\r\n")
    cases = [
        (b"MAIL FROM:sender@example.net\r\n", "553 5.1.7"),
        (b"MAIL FROM:<s@example.net> FOO=BAR\r\n", "555 5.5.4"),
        (b"MAIL FROM:<\xc3\xbc@example.net>\r\n", "553 5.6.7"),
        (b"MAIL TO:<s@example.net>\r\n", "501 5.5.4"),
    ]
    for line, expected in cases:
        feed(session, line)
        assert output.replies()[-1].startswith(expected), line
    feed(session, b"MAIL FROM:<\xc3\xbc@example.net> SMTPUTF8\r\n")
    assert output.codes()[-1] == 250
    feed(session, b"RCPT TO:<alice@example.org> NOTIFY=NEVER,DELAY\r\n")
    assert output.replies()[-1].startswith("501 ")
    feed(session, b"RCPT TO:<alice@example.org> XFOO\r\n")
    assert output.replies()[-1].startswith("555 5.5.4")


def test_a_domain_with_its_root_dot_is_the_same_domain() -> None:
    """MAIL FROM and RCPT TO accept example.org. and keep it as example.org."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net.>\r\nRCPT TO:<alice@example.org.>\r\n"
        b"DATA\r\n" + MESSAGE,
    )
    assert output.codes() == [220, 250, 250, 250, 354, 250]
    envelope = sink.messages[0][0]
    assert str(envelope.reverse_path) == "s@example.net"
    assert [str(r.address) for r in envelope.recipients] == ["alice@example.org"]


def test_a_lone_or_doubled_dot_in_a_domain_is_still_refused() -> None:
    """A lone dot, a doubled dot or a dot after an address literal still gets 553."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c\r\n")
    for line, expected in [
        (b"MAIL FROM:<s@.>\r\n", "553 5.1.7"),
        (b"MAIL FROM:<s@example..net>\r\n", "553 5.1.7"),
        (b"MAIL FROM:<s@example.net..>\r\n", "553 5.1.7"),
        (b"MAIL FROM:<s@[192.0.2.1].>\r\n", "553 5.1.7"),
    ]:
        feed(session, line)
        assert output.replies()[-1].startswith(expected), line
    feed(session, b"MAIL FROM:<s@example.net>\r\n")
    for line in [
        b"RCPT TO:<alice@.>\r\n",
        b"RCPT TO:<alice@example..org>\r\n",
        b"RCPT TO:<alice@example.org..>\r\n",
        b"RCPT TO:<alice@[192.0.2.1].>\r\n",
    ]:
        feed(session, line)
        assert output.replies()[-1].startswith("553 5.1.3"), line


def test_postmaster_without_domain() -> None:
    """RCPT TO:<Postmaster> is accepted as the local postmaster."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    assert output.codes()[-1] == 250


def test_async_policy_keeps_replies_in_order() -> None:
    """While a RCPT answer is pending no later command is answered."""
    session, output, _sink, policy = make_session()
    policy.hold = True
    feed(
        session,
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<nobody@example.org>\r\nDATA\r\n",
    )
    assert output.codes() == [220, 250, 250]
    policy.release()
    assert output.codes() == [220, 250, 250, 250]
    policy.release()
    assert output.codes() == [220, 250, 250, 250, 550, 354]


def test_policy_answers_as_deferreds_fired_or_failed() -> None:
    """
    A policy may answer with a Deferred that has fired already, or with one
    that fails: the first counts as its answer, the second gets 451 4.3.0
    for that command alone, and the session goes on in order.
    """
    session, output, _sink, policy = make_session()
    fired = succeed(replies.SENDER_OK)
    policy.check_sender = lambda *_: fired  # type: ignore[method-assign,assignment]
    answers = iter([fail(RuntimeError("lookup broke")), succeed_ok()])
    policy.check_recipient = lambda *_: next(answers)  # type: ignore[method-assign]
    with mail_events() as events:
        feed(
            session,
            b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n",
        )
    assert output.replies()[3] == "451 4.3.0 Local error in processing, try again later"
    assert output.codes() == [220, 250, 250, 451, 250, 354]
    assert any(e.get("log_format") == "policy check failed" for e in events)


def test_a_policy_answer_that_breaks_the_session_gets_451() -> None:
    """An answer given at once that the session cannot use (a bug) gets 451
    4.3.0 for that command, as a failing Deferred would: the replies to the
    other pipelined commands still go out, and the session goes on."""
    session, output, _sink, policy = make_session()
    policy.check_sender = lambda *_: None  # type: ignore[method-assign,assignment]
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nNOOP\r\n")
    assert output.codes() == [220, 250, 451, 250]


def succeed_ok() -> Deferred[RecipientDecision]:
    return succeed(RecipientDecision(replies.RECIPIENT_OK, Route.LOCAL))


def test_many_pipelined_recipients_do_not_recurse() -> None:
    """Thousands of pipelined commands are read without deep recursion."""
    session, output, _, _ = make_session(max_recipients=10000, max_errors=100000)
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net>\r\n")
    feed(session, b"RCPT TO:<alice@example.org>\r\n" * 5000)
    assert output.codes().count(250) == 5002


def test_auth_needs_tls() -> None:
    """AUTH on a plain session is refused with 538 5.7.11 and not advertised."""
    session, output, _, _ = make_session(authenticator=FakeAuthenticator())
    feed(session, b"EHLO c\r\n")
    assert b"AUTH" not in b"".join(output.writes)
    feed(session, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert output.replies()[-1].startswith("538 5.7.11 ")


def test_auth_plain_and_login_after_tls() -> None:
    """AUTH PLAIN and LOGIN succeed with good credentials under TLS."""
    plain = base64.b64encode(b"\0alice\0secret")
    for dialogue in (
        [b"AUTH PLAIN " + plain + b"\r\n"],
        [b"AUTH PLAIN\r\n", plain + b"\r\n"],
        [
            b"AUTH LOGIN\r\n",
            base64.b64encode(b"alice") + b"\r\n",
            base64.b64encode(b"secret") + b"\r\n",
        ],
    ):
        session, output, _, _ = make_session(
            tls_available=True, authenticator=FakeAuthenticator()
        )
        feed(session, b"EHLO c\r\nSTARTTLS\r\n")
        session.tls_started()
        feed(session, b"EHLO c\r\n")
        assert b"250 AUTH PLAIN LOGIN\r\n" in b"".join(output.writes)
        for line in dialogue:
            feed(session, line)
        assert output.replies()[-1] == "235 2.7.0 Authentication successful"
        assert session.client.authenticated_as == "alice"


def test_auth_failure_and_submission_requirement() -> None:
    """Wrong credentials get 535 5.7.8; a submission port wants AUTH first."""
    session, output, _, _ = make_session(
        tls_available=True, authenticator=FakeAuthenticator(), require_auth=True
    )
    feed(session, b"EHLO c\r\nSTARTTLS\r\n")
    session.tls_started()
    feed(session, b"EHLO c\r\nMAIL FROM:<alice@example.org>\r\n")
    assert output.replies()[-1].startswith("530 5.7.0 ")
    feed(session, b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    assert output.replies()[-1].startswith("535 5.7.8 ")
    feed(session, b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
    feed(session, b"MAIL FROM:<alice@example.org>\r\n")
    assert output.codes()[-1] == 250


def test_idle_timeout_says_421() -> None:
    """When the idle timer fires the client gets 421 4.4.2 and is closed."""
    session, output, _, _ = make_session()
    session.timed_out()
    assert output.replies()[-1].startswith("421 4.4.2 ")
    assert output.closed


def test_nothing_is_written_after_the_connection_is_lost() -> None:
    """A reply that comes after the connection is lost is not written."""
    session, output, _, policy = make_session()
    policy.hold = True
    feed(
        session, b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
    )
    session.connection_lost()
    before = list(output.writes)
    policy.release()
    assert output.writes == before


# Each state, reached by a prefix, and the reply code each command gets there.
STATES = {
    "initial": b"",
    "ready": b"EHLO c\r\n",
    "mail": b"EHLO c\r\nMAIL FROM:<s@example.net>\r\n",
    "rcpt": b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n",
    "bdat": b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
    b"BDAT 3\r\nx\r\n",
}
COMMANDS = {
    "EHLO": b"EHLO c\r\n",
    "HELO": b"HELO c\r\n",
    "MAIL": b"MAIL FROM:<t@example.net>\r\n",
    "RCPT": b"RCPT TO:<alice@example.org>\r\n",
    "DATA": b"DATA\r\n",
    "BDAT": b"BDAT 3 LAST\r\nz\r\n",
    "RSET": b"RSET\r\n",
    "NOOP": b"NOOP\r\n",
    "QUIT": b"QUIT\r\n",
    "VRFY": b"VRFY bob\r\n",
    "HELP": b"HELP\r\n",
    "STARTTLS": b"STARTTLS\r\n",
    "AUTH": b"AUTH PLAIN\r\n",
}
EXPECTED = {
    "initial": {"EHLO": 250, "HELO": 250, "MAIL": 503, "RCPT": 503, "DATA": 503,
                "BDAT": 503, "RSET": 250, "NOOP": 250, "QUIT": 221, "VRFY": 252,
                "HELP": 214, "STARTTLS": 503, "AUTH": 538},
    "ready": {"EHLO": 250, "HELO": 250, "MAIL": 250, "RCPT": 503, "DATA": 503,
              "BDAT": 503, "RSET": 250, "NOOP": 250, "QUIT": 221, "VRFY": 252,
              "HELP": 214, "STARTTLS": 220, "AUTH": 538},
    "mail": {"EHLO": 250, "HELO": 250, "MAIL": 503, "RCPT": 250, "DATA": 503,
             "BDAT": 503, "RSET": 250, "NOOP": 250, "QUIT": 221, "VRFY": 252,
             "HELP": 214, "STARTTLS": 220, "AUTH": 538},
    "rcpt": {"EHLO": 250, "HELO": 250, "MAIL": 503, "RCPT": 250, "DATA": 354,
             "BDAT": 250, "RSET": 250, "NOOP": 250, "QUIT": 221, "VRFY": 252,
             "HELP": 214, "STARTTLS": 220, "AUTH": 538},
    "bdat": {"EHLO": 503, "HELO": 503, "MAIL": 503, "RCPT": 503, "DATA": 503,
             "BDAT": 250, "RSET": 250, "NOOP": 250, "QUIT": 221, "VRFY": 503,
             "HELP": 214, "STARTTLS": 503, "AUTH": 503},
}  # fmt: skip


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_state_and_command(state: str, command: str) -> None:
    """Each command in each state gets the reply code the table gives."""
    session, output, _, _ = make_session(
        tls_available=True, authenticator=FakeAuthenticator()
    )
    feed(session, STATES[state])
    before = len(output.codes())
    feed(session, COMMANDS[command])
    codes = output.codes()
    assert len(codes) == before + 1, output.replies()
    assert codes[-1] == EXPECTED[state][command]


def test_fake_output_refuses_writes_after_close() -> None:
    """The fake transport catches a session that writes after closing."""
    output = FakeOutput()
    output.close()
    with pytest.raises(AssertionError):
        output.write(b"x")


def test_a_parameter_given_twice_is_refused() -> None:
    """MAIL with RET twice gets 501 (RFC 3461 section 4.3: at most once)."""
    session, output, _, _ = make_session()
    feed(session, b"EHLO c\r\nMAIL FROM:<s@example.net> RET=HDRS RET=FULL\r\n")
    assert output.replies()[-1].startswith("501 5.5.4 ")
    assert "RET given twice" in output.replies()[-1]


def test_a_chunk_larger_than_any_message_closes_the_session() -> None:
    """BDAT announcing more than the size limit gets 552 5.3.4 and a close."""
    session, output, _, _ = make_session(max_message_size=1000)
    feed(session, STATES["rcpt"] + b"BDAT 99999999999999999999999\r\n")
    assert output.replies()[-1].startswith("552 5.3.4 ")
    assert output.closed


def test_help_lists_only_what_is_offered() -> None:
    """HELP names STARTTLS only when a certificate is configured."""
    session, output, _, _ = make_session()
    feed(session, b"HELP\r\n")
    assert "STARTTLS" not in b"".join(output.writes).decode()
    session, output, _, _ = make_session(tls_available=True)
    feed(session, b"HELP\r\n")
    assert "STARTTLS" in b"".join(output.writes).decode()


def test_a_refused_message_is_logged_with_its_recipients() -> None:
    """The mail log names the recipients of a message refused at its end."""
    with mail_events() as events:
        session, _, _, _ = make_session()
        feed(session, TRANSACTION + b"bare\nLF\r\n.\r\n")
    (event,) = [e for e in events if "reject" in str(e.get("log_format"))]
    assert formatEvent(event).endswith(
        "from=<sender@example.net> to=<alice@example.org>"
    )


@pytest.mark.parametrize(
    ("command", "logged"),
    [
        (b"MAIL FROM:<alice@example.org> SIZE=100", "from=<alice@example.org>"),
        (b"MAIL FROM: <alice@example.org>", "from=<alice@example.org>"),
        (b"MAIL FROM:<>", "from=<>"),
    ],
)
def test_a_mail_refused_for_want_of_auth_is_logged_with_its_sender(
    command: bytes, logged: str
) -> None:
    """530 to MAIL on a submission port logs the sender the client gave, not
    an empty one that would read as a bounce's null reverse path."""
    with mail_events() as events:
        session, output, _, _ = make_session(
            authenticator=FakeAuthenticator(), require_auth=True
        )
        feed(session, b"EHLO c\r\n" + command + b"\r\n")
    assert output.replies()[-1].startswith("530 5.7.0 ")
    (event,) = [e for e in events if "reject" in str(e.get("log_format"))]
    # No recipient yet: none is named, not an empty "<>".
    assert formatEvent(event).endswith(f"; {logged}")


@pytest.mark.parametrize(
    ("commands", "logged"),
    [
        (
            b"MAIL FROM:<s@example.net>\r\nRCPT TO:<x@remote.test@example.com>",
            "reject: RCPT from [192.0.2.7]:40000: 553 5.1.3 ",
        ),
        (
            b"MAIL FROM:<s@example.net>\r\nRCPT TO:<@example.com:x@remote.test",
            "reject: RCPT from [192.0.2.7]:40000: 5",
        ),
        (b"MAIL FROM:<a@b@c>", "reject: MAIL from [192.0.2.7]:40000: 553 "),
    ],
)
def test_a_path_refused_unparsed_is_logged_as_written(
    commands: bytes, logged: str
) -> None:
    """A forward or reverse path refused for its syntax gets a reject line,
    with the path as the client wrote it, so that probing is seen."""
    with mail_events() as events:
        session, output, _, _ = make_session()
        feed(session, b"EHLO c\r\n" + commands + b"\r\n")
    assert output.codes()[-1] >= 500
    (line,) = [formatEvent(e) for e in events if "reject" in str(e["log_format"])]
    assert line.startswith(logged)
    written = commands.rsplit(b":", 1)[-1] if b"RCPT" in commands else b"a@b@c"
    assert written.decode().strip("<>") in line


def test_one_recipient_too_many_is_logged() -> None:
    """452 for the recipient over the limit is logged as a refusal too."""
    with mail_events() as events:
        session, output, _, _ = make_session(max_recipients=1)
        feed(
            session,
            b"EHLO c\r\nMAIL FROM:<s@example.net>\r\n"
            b"RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n",
        )
    assert output.codes()[-1] == 452
    (line,) = [formatEvent(e) for e in events if "reject" in str(e["log_format"])]
    assert line.endswith("from=<s@example.net> to=<bob@example.org>")


def test_a_helo_name_with_control_characters_is_made_printable() -> None:
    """Control characters in the EHLO name reach neither the trace field nor
    anything after it."""
    session, _, sink, _ = make_session()
    feed(
        session,
        b"EHLO a\x1b[31mred\r\nMAIL FROM:<s@example.net>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\n" + MESSAGE,
    )
    (_, content) = sink.messages[0]
    received = content.split(b"\r\n", 1)[0]
    assert received.startswith(b"Received: from a?[31mred ")
    assert b"\x1b" not in content


def test_a_recipient_named_twice_gets_one_copy() -> None:
    """RCPT for a recipient already accepted (the domain in other case, a
    trailing dot) is answered 250 and adds nothing; a local part written
    otherwise is another recipient (RFC 5321 section 2.4)."""
    session, output, sink, _ = make_session()
    feed(
        session,
        b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\n"
        b"RCPT TO:<alice@example.org>\r\nRCPT TO:<alice@EXAMPLE.ORG.>\r\n"
        b"RCPT TO:<alice@Example.Org>\r\nRCPT TO:<Alice@example.org>\r\n"
        b"DATA\r\n" + MESSAGE,
    )
    assert output.replies()[3:7] == ["250 2.1.5 Recipient OK"] * 4
    (envelope, _) = sink.messages[0]
    assert [str(r.address) for r in envelope.recipients] == [
        "alice@example.org",
        "Alice@example.org",
    ]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_the_helo_name_is_echoed_as_printable_ascii(verb: bytes) -> None:
    """RFC 5321 section 4.2: reply text is printable ASCII; a NUL, an escape
    or a non-ASCII letter in the name is echoed as "?"."""
    session, output, _, _ = make_session()
    feed(session, verb + " x\x00y\x1b[2Jé.test\r\n".encode())
    first = b"".join(output.writes).split(b"\r\n")[1]
    assert first == b"250" + (b"-" if verb == b"EHLO" else b" ") + (
        b"mx.example.org greets x?y?[2J?.test"
    )


@pytest.mark.parametrize(
    ("transfer", "command"),
    [
        (b"DATA\r\n" + b"x" * 120 + b"\r\n.\r\n", "DATA"),
        (b"BDAT 60\r\n" + b"x" * 60 + b"BDAT 62 LAST\r\n" + b"x" * 62, "BDAT"),
    ],
)
def test_a_message_over_the_size_limit_is_logged_under_its_command(
    transfer: bytes, command: str
) -> None:
    """A message refused for its size is logged as refused at DATA or BDAT,
    whichever carried it."""
    with mail_events() as events:
        session, output, _, _ = make_session(max_message_size=100)
        feed(
            session,
            b"EHLO c\r\nMAIL FROM:<s@example.net>\r\n"
            b"RCPT TO:<alice@example.org>\r\n" + transfer,
        )
    assert output.replies()[-1].startswith("552 ")
    (line,) = [formatEvent(e) for e in events if "reject" in str(e["log_format"])]
    assert line.startswith(f"reject: {command} from [192.0.2.7]:40000: 552 ")


def test_a_hand_off_names_a_maildir_with_its_own_parameter() -> None:
    """On the hand-off listener, RCPT with X-MAILX-MAILBOX takes the recipient
    as one Maildir here, past the policy, so it is not expanded again; the
    parameter is offered there only and refused anywhere else."""
    session, output, _, policy = make_session(add_trace=False)
    policy.hold = True  # the policy is not asked: nothing would answer
    feed(session, b"EHLO worker\r\n")
    assert "X-MAILX-MAILBOX" in output.replies()[-1]
    feed(
        session,
        b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org> X-MAILX-MAILBOX\r\n",
    )
    assert output.codes()[-2:] == [250, 250]
    assert session.envelope is not None
    assert session.envelope.recipients[0].route is Route.MAILBOX

    session, output, _, _ = make_session()
    feed(session, b"EHLO client\r\n")
    assert "X-MAILX-MAILBOX" not in output.replies()[-1]
    feed(
        session,
        b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org> X-MAILX-MAILBOX\r\n",
    )
    assert output.codes()[-1] == 555


def test_shutdown_while_a_message_is_stored_answers_it_first() -> None:
    """SIGTERM while the message is being stored: its 250 comes, then 421;
    a 421 alone would have the client send again what is stored anyway."""
    session, output, sink, _ = make_session()
    held: Deferred[Reply] = Deferred()
    sink.receive = lambda envelope, content: held  # type: ignore[method-assign]
    session.data_received(
        b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
    )
    assert output.codes() == [220, 250, 250, 250, 354]
    session.shutting_down()
    assert not output.closed
    held.callback(replies.OK)
    assert output.codes()[-2:] == [250, 421]
    assert output.replies()[-2].startswith("250 2.0.0 OK queued as ")
    assert output.closed


def test_shutdown_between_messages_is_421_at_once() -> None:
    session, output, _, _ = make_session()
    session.data_received(b"EHLO c.test\r\n")
    session.shutting_down()
    assert output.codes() == [220, 250, 421]
    assert output.closed


def test_a_message_the_store_refused_is_an_error_line_not_a_fault(
    mail_log: list[str],
) -> None:
    """The spool could not take it: 451, and one line with why, no traceback."""
    session, output, sink, _ = make_session()

    def refuse(envelope: object, content: bytes) -> Deferred[Reply]:
        try:
            try:
                raise OSError(28, "No space left on device")
            except OSError as error:
                raise ReplyError(replies.STORAGE_FAILED) from error
        except ReplyError as refused:
            return fail(refused)

    sink.receive = refuse  # type: ignore[method-assign]
    session.data_received(
        b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
    )
    assert output.codes()[-1] == 451
    (line,) = [line for line in mail_log if "stor" in line]
    assert re.fullmatch(
        r"\w+: not stored \(\[Errno 28\] No space left on device\): 451 .*", line
    )
