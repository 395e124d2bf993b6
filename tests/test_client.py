"""Unit tests of the outbound ESMTP client: the state machine and its adapter."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailx import replies
from mailx.address import Address
from mailx.client import (
    ClientSession,
    DotStuffer,
    Finish,
    Phase,
    ReplyParser,
    Send,
    SessionOutcome,
    SMTPClientProtocol,
    StartTLS,
    StreamContent,
    Timeouts,
    TLSMode,
    Transaction,
    dot_stuffed_blocks,
    normalise_line_endings,
    to_quoted_printable,
)
from mailx.envelope import Body
from mailx.replies import Reply
from tests.smtppeer import unstuff

CONTENT = b"Subject: t\r\n\r\nbody\r\n"
EHLO_PIPELINING = b"250-peer hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
ENVELOPE_354 = b"250 ok\r\n250 ok\r\n354 go\r\n"
OK_250 = b"250 2.0.0 ok\r\n"


def transaction(*recipients: str, content: bytes = CONTENT) -> Transaction:
    rcpts = [Address(r.split("@")[0], r.split("@")[1]) for r in recipients]
    return Transaction(Address("s", "src.test"), rcpts, content)


def sent(actions: list[Any]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def outcome_of(actions: list[Any]) -> SessionOutcome:
    (finish,) = [a for a in actions if isinstance(a, Finish)]
    return finish.outcome


def streamed(actions: list[Any], session: ClientSession | None = None) -> bytes:
    """The content a StreamContent action sends; told to ``session`` as
    written, as the adapter tells it once the content is out."""
    (stream,) = [a for a in actions if isinstance(a, StreamContent)]
    content = b"".join(stream.blocks)
    if session is not None:
        session.content_sent()
    return content


def to_envelope(session: ClientSession, ehlo: bytes = EHLO_PIPELINING) -> list[Any]:
    assert sent(session.data_received(b"220 peer ready\r\n")) == b"EHLO me.test\r\n"
    return session.data_received(ehlo)


class TestReplyParser:
    def test_multiline_with_enhanced_codes(self) -> None:
        """A multi-line reply is one Reply, enhanced code split from the text."""
        parser = ReplyParser()
        got = list(parser.feed(b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n"))
        assert got == [Reply(550, "5.1.1", "no such\nuser here")]

    def test_reply_split_across_reads(self) -> None:
        """A reply arriving in pieces is parsed once complete."""
        parser = ReplyParser()
        assert list(parser.feed(b"25")) == []
        assert list(parser.feed(b"0 ok\r\n")) == [Reply(250, "", "ok")]

    def test_bare_code(self) -> None:
        """A reply of just a code is accepted."""
        assert list(ReplyParser().feed(b"250\r\n")) == [Reply(250, "", "")]

    def test_garbage_is_an_error(self) -> None:
        """A line that is not a reply raises ValueError."""
        with pytest.raises(ValueError):
            list(ReplyParser().feed(b"hello there\r\n"))

    def test_endless_reply_is_an_error(self) -> None:
        """A multi-line reply that never ends raises ValueError."""
        with pytest.raises(ValueError):
            list(ReplyParser().feed(b"250-x\r\n" * 1000))

    @given(
        code=st.integers(200, 599),
        enhanced=st.sampled_from(
            ["", "2.0.0 ", "5.1.1 ", "4.7.0", "2.1.5  ", "9.9.9 "]
        ),
        text=st.text(st.characters(codec="utf-8", exclude_characters="\r\n")),
    )
    def test_one_line_is_read_as_a_line_of_many(
        self, code: int, enhanced: str, text: str
    ) -> None:
        """A one-line reply, read on its own, is the Reply it would be as the
        last line of a multi-line one: code, enhanced code and text alike."""
        line = f"{code} {enhanced}{text}"
        alone = list(ReplyParser().feed(line.encode() + b"\r\n"))
        parser = ReplyParser()
        parser._lines = [line]
        assert alone == [parser._reply()]

    def test_endless_line_is_an_error(self) -> None:
        """A line longer than the limit without an end raises ValueError."""
        with pytest.raises(ValueError):
            list(ReplyParser().feed(b"250 " + b"x" * 10000))


class TestDotStuffing:
    def test_leading_dot_line(self) -> None:
        """A message that starts with a line of one dot is stuffed."""
        wire = b"".join(dot_stuffed_blocks(b".\r\nabc\r\n"))
        assert wire == b"..\r\nabc\r\n.\r\n"

    def test_bare_line_endings_become_crlf(self) -> None:
        """Bare CR and LF never reach the wire; each becomes CRLF."""
        wire = b"".join(dot_stuffed_blocks(b"a\rb\nc\r\n.d"))
        assert wire == b"a\r\nb\r\nc\r\n..d\r\n.\r\n"

    def test_block_boundary_between_crlf_and_dot(self) -> None:
        """A dot right after a block edge that follows CRLF is stuffed."""
        wire = b"".join(dot_stuffed_blocks(b"ab\r\n.x\r\n", size=4))
        assert wire == b"ab\r\n..x\r\n.\r\n"

    def test_block_boundary_between_cr_and_lf(self) -> None:
        """A CRLF split by a block edge stays one line ending."""
        wire = b"".join(dot_stuffed_blocks(b"ab\r\n.x\r\n", size=3))
        assert wire == b"ab\r\n..x\r\n.\r\n"

    @given(
        st.lists(st.sampled_from([b".", b"a", b"\r\n", b"..", b"\xff"]), max_size=40),
        st.integers(min_value=1, max_value=7),
    )
    def test_any_blocks_round_trip(self, parts: list[bytes], size: int) -> None:
        """Whatever the block size, unstuffing the wire gives the content back."""
        content = b"".join(parts)
        wire = b"".join(dot_stuffed_blocks(content, size))
        body, end = wire[: -len(b".\r\n")], wire[-len(b".\r\n") :]
        assert end == b".\r\n"
        # No line of the body is a lone dot, so the end is where it should be.
        assert b"." not in body.split(b"\r\n")[:-1]
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        assert unstuff(body) == content

    @given(st.binary(max_size=60), st.integers(min_value=1, max_value=9))
    def test_no_bare_cr_or_lf(self, content: bytes, size: int) -> None:
        """No CR without LF after it, and no LF without CR before it, is sent."""
        wire = b"".join(dot_stuffed_blocks(content, size))
        assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")

    @given(st.binary(max_size=80), st.integers(min_value=1, max_value=9))
    def test_blocks_do_not_change_the_wire(self, content: bytes, size: int) -> None:
        """The wire form is the same whatever the block size."""
        whole = b"".join(dot_stuffed_blocks(content, max(len(content), 1)))
        assert b"".join(dot_stuffed_blocks(content, size)) == whole

    @given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a"]), max_size=30))
    def test_line_endings_become_crlf(self, parts: list[bytes]) -> None:
        """Every bare CR and bare LF becomes CRLF; CRLF and other octets stay."""
        content = b"".join(parts)
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
        assert normalise_line_endings(content) == expected

    def test_finish_closes_an_open_line(self) -> None:
        """Content that does not end in CRLF gets one before the final dot."""
        stuffer = DotStuffer()
        assert stuffer.encode(b"abc") + stuffer.finish() == b"abc\r\n.\r\n"


class TestSession:
    def test_pipelined_transaction(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA go in one write
        (RFC 2920 section 3.1); the content once DATA is answered 354."""
        session = ClientSession("me.test", transaction("a@d.test", "b@d.test"))
        actions = to_envelope(session)
        assert sent(actions) == (
            b"MAIL FROM:<s@src.test> SIZE=20\r\n"
            b"RCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
        )
        actions = session.data_received(
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n"
        )
        assert actions == []
        assert streamed(session.data_received(b"354 go\r\n"), session) == (
            CONTENT + b".\r\n"
        )
        assert sent(session.data_received(b"250 2.0.0 queued as X\r\n")) == b"QUIT\r\n"
        outcome = outcome_of(session.data_received(b"221 bye\r\n"))
        assert outcome.replies == {
            0: Reply(250, "2.0.0", "queued as X"),
            1: Reply(550, "5.1.1", "unknown"),
        }
        assert outcome.failure is None

    def test_reused_session_goes_idle_then_carries_the_next_transaction(
        self,
    ) -> None:
        """With reuse, an accepted transaction ends idle without QUIT; the next
        starts at MAIL with its own outcome, and close sends QUIT."""
        session = ClientSession("me.test", transaction("a@d.test"), reuse=True)
        to_envelope(session)
        streamed(
            session.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"),
            session,
        )
        actions = session.data_received(b"250 2.0.0 queued\r\n")
        assert sent(actions) == b""
        (finish,) = actions
        assert isinstance(finish, Finish) and finish.keep_open
        assert finish.outcome.replies == {0: Reply(250, "2.0.0", "queued")}
        assert session.phase is Phase.IDLE

        actions = session.next_transaction(transaction("c@d.test"))
        assert sent(actions) == (
            b"MAIL FROM:<s@src.test> SIZE=20\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
        )
        actions = session.data_received(
            b"250 2.1.0 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n"
        )
        assert sent(actions) == b"QUIT\r\n"
        assert session.outcome.replies == {0: Reply(550, "5.1.1", "unknown")}

    def test_idle_session_closes_with_quit(self) -> None:
        """An idle session says QUIT when closed; a busy one cannot start
        another transaction."""
        session = ClientSession("me.test", transaction("a@d.test"), reuse=True)
        with pytest.raises(ValueError):
            session.next_transaction(transaction("b@d.test"))
        to_envelope(session)
        streamed(
            session.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"),
            session,
        )
        session.data_received(b"250 2.0.0 queued\r\n")

        assert sent(session.close()) == b"QUIT\r\n"
        assert session.close() == []

    def test_one_command_at_a_time_without_pipelining(self) -> None:
        """Without PIPELINING each RCPT waits for the reply before it."""
        session = ClientSession("me.test", transaction("a@d.test", "b@d.test"))
        actions = to_envelope(session, b"250 peer\r\n")
        assert sent(actions) == b"MAIL FROM:<s@src.test>\r\n"
        assert sent(session.data_received(b"250 ok\r\n")) == b"RCPT TO:<a@d.test>\r\n"
        assert sent(session.data_received(b"250 ok\r\n")) == b"RCPT TO:<b@d.test>\r\n"
        assert sent(session.data_received(b"250 ok\r\n")) == b"DATA\r\n"

    def test_no_content_when_no_recipient_accepted(self) -> None:
        """Every RCPT refused: the refused DATA ends it, no content is sent."""
        session = ClientSession("me.test", transaction("a@d.test"))
        to_envelope(session)
        actions = session.data_received(
            b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n"
        )
        assert sent(actions) == b"QUIT\r\n"
        outcome = outcome_of(session.data_received(b"221 bye\r\n"))
        assert outcome.replies == {0: Reply(550, "5.1.1", "no")}
        assert outcome.failure is None

    def test_data_taken_with_no_recipient_gets_a_lone_dot(self) -> None:
        """RFC 2920 section 3.1: DATA answered 354 though every RCPT was
        refused: a lone dot ends the empty message, then QUIT; the content
        never goes out and the recipients keep their RCPT replies."""
        session = ClientSession("me.test", transaction("a@d.test"), reuse=True)
        to_envelope(session)
        actions = session.data_received(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        assert sent(actions) == b".\r\n"
        assert sent(session.data_received(b"554 5.5.1 nothing\r\n")) == b"QUIT\r\n"
        outcome = outcome_of(session.data_received(b"221 bye\r\n"))
        assert outcome.replies == {0: Reply(550, "5.1.1", "no")}

    def test_content_with_bare_line_endings_goes_out_with_crlf(self) -> None:
        """A stored message with bare CR or LF (a local submission, BDAT
        BINARYMIME kept it) is sent with CRLF line endings after DATA, and
        its dots stuffed (RFC 5321 sections 2.3.8 and 4.5.2)."""
        content = b"Subject: t\n\n.body\rx\n"
        session = ClientSession("me.test", transaction("a@d.test", content=content))
        to_envelope(session)
        blocks = streamed(session.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n"))
        assert blocks == b"Subject: t\r\n\r\n..body\r\nx\r\n.\r\n"

    def test_mail_refused_is_host_level(self) -> None:
        """A refused MAIL is the host-level failure, RCPT replies ignored."""
        session = ClientSession("me.test", transaction("a@d.test"))
        to_envelope(session)
        actions = session.data_received(
            b"550 5.7.1 go away\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no RCPT\r\n"
        )
        assert sent(actions) == b"QUIT\r\n"
        outcome = outcome_of(session.data_received(b"221 bye\r\n"))
        assert outcome.replies == {}
        assert outcome.failure == Reply(550, "5.7.1", "go away")

    @pytest.mark.parametrize("step", ["greeting", "ehlo", "envelope", "data"])
    def test_421_at_any_step_ends_the_session(self, step: str) -> None:
        """A 421 at any point ends the session with that reply as failure."""
        session = ClientSession("me.test", transaction("a@d.test"))
        if step != "greeting":
            session.data_received(b"220 hi\r\n")
        if step in ("envelope", "data"):
            session.data_received(EHLO_PIPELINING)
        if step == "data":
            session.data_received(b"250 ok\r\n250 ok\r\n")
        actions = session.data_received(b"421 4.3.2 closing\r\n")
        assert sent(actions) == b""
        assert outcome_of(actions).failure == Reply(421, "4.3.2", "closing")

    def test_a_554_greeting_defers(self) -> None:
        """RFC 5321 section 3.1: a 554 greeting refuses this session, not
        the message: the outcome is temporary, with the greeting's words."""
        session = ClientSession("me.test", transaction("a@d.test"))
        actions = session.data_received(b"554 5.3.2 no service for you\r\n")
        assert sent(actions) == b"QUIT\r\n"
        failure = outcome_of(actions).failure
        assert failure is not None
        assert (failure.code, failure.enhanced) == (451, "4.4.0")
        assert failure.text.endswith("554 5.3.2 no service for you")

    def test_helo_after_ehlo_refused(self) -> None:
        """An EHLO refused with 5xx is followed by HELO."""
        session = ClientSession("me.test", transaction("a@d.test"))
        session.data_received(b"220 hi\r\n")
        assert sent(session.data_received(b"502 what\r\n")) == b"HELO me.test\r\n"
        assert sent(session.data_received(b"250 ok\r\n")).startswith(b"MAIL FROM:")

    def test_starttls_then_ehlo_again(self) -> None:
        """STARTTLS is sent when offered, and EHLO again once TLS started."""
        session = ClientSession("me.test", transaction("a@d.test"))
        session.data_received(b"220 hi\r\n")
        actions = session.data_received(b"250-peer\r\n250 STARTTLS\r\n")
        assert sent(actions) == b"STARTTLS\r\n"
        assert StartTLS() in session.data_received(b"220 2.0.0 go\r\n")
        assert sent(session.tls_started()) == b"EHLO me.test\r\n"
        assert session.outcome.tls

    def test_octets_after_starttls_reply(self) -> None:
        """Octets after the STARTTLS reply end the session; TLS never starts."""
        session = ClientSession("me.test", transaction("a@d.test"))
        session.data_received(b"220 hi\r\n")
        session.data_received(b"250-peer\r\n250 STARTTLS\r\n")
        actions = session.data_received(b"220 go\r\n250-PIPELINING\r\n")
        assert StartTLS() not in actions
        assert outcome_of(actions).failure == replies.TLS_INJECTION

    def test_handshake_failure_asks_for_plain_retry(self) -> None:
        """A connection lost during the opportunistic handshake asks a retry."""
        session = ClientSession("me.test", transaction("a@d.test"))
        session.data_received(b"220 hi\r\n")
        session.data_received(b"250-peer\r\n250 STARTTLS\r\n")
        session.data_received(b"220 go\r\n")
        session.tls_started()
        outcome = session.connection_lost()
        assert outcome.retry_plain
        assert not outcome.tls

    @pytest.mark.parametrize("mode", [TLSMode.MAY, TLSMode.VERIFY])
    def test_no_tls_is_claimed_when_lost_before_the_ehlo_over_it(
        self, mode: TLSMode
    ) -> None:
        """A connection lost before the EHLO over TLS is answered (the
        handshake or the certificate failed) made no TLS session, and its
        outcome does not say it did."""
        session = ClientSession("me.test", transaction("a@d.test"), mode)
        session.data_received(b"220 hi\r\n")
        session.data_received(b"250-peer\r\n250 STARTTLS\r\n")
        session.data_received(b"220 go\r\n")
        session.tls_started()
        outcome = session.connection_lost()
        assert outcome.failure is not None and outcome.failure.is_transient
        assert not outcome.tls

    def test_verify_without_starttls(self) -> None:
        """Under the verify policy a peer without STARTTLS gets no MAIL."""
        session = ClientSession("me.test", transaction("a@d.test"), TLSMode.VERIFY)
        session.data_received(b"220 hi\r\n")
        actions = session.data_received(b"250 peer\r\n")
        assert sent(actions) == b"QUIT\r\n"
        assert outcome_of(actions).failure is not None
        assert outcome_of(actions).failure.enhanced == "4.7.5"  # type: ignore[union-attr]

    def test_auth_only_over_tls(self) -> None:
        """Credentials are never sent on a connection without TLS."""
        session = ClientSession(
            "me.test", transaction("a@d.test"), TLSMode.NONE, ("u", "p")
        )
        session.data_received(b"220 hi\r\n")
        actions = session.data_received(b"250-peer\r\n250 AUTH PLAIN\r\n")
        assert b"AUTH" not in sent(actions)
        assert outcome_of(actions).failure is not None

    def test_size_too_big(self) -> None:
        """A message over the peer's SIZE is failed 5.3.4 before MAIL."""
        session = ClientSession("me.test", transaction("a@d.test", content=b"x" * 2000))
        actions = to_envelope(session)
        assert sent(actions) == b"QUIT\r\n"
        assert session.outcome.failure is not None
        assert session.outcome.failure.enhanced == "5.3.4"

    def test_bdat_when_chunking(self) -> None:
        """With CHUNKING the content goes in one BDAT LAST chunk, unstuffed."""
        content = b"Subject: t\r\n\r\n.x\r\n"
        session = ClientSession("me.test", transaction("a@d.test", content=content))
        to_envelope(session, b"250-peer\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        actions = session.data_received(b"250 ok\r\n250 ok\r\n")
        assert streamed(actions) == b"BDAT %d LAST\r\n" % len(content) + content

    def test_binary_needs_binarymime(self) -> None:
        """BODY=BINARYMIME is only sent to a peer with BINARYMIME and CHUNKING."""
        tx = transaction("a@d.test")
        tx.body = Body.BINARY
        session = ClientSession("me.test", tx)
        to_envelope(session, b"250-peer\r\n250-BINARYMIME\r\n250 CHUNKING\r\n")
        assert session.phase is Phase.ENVELOPE
        assert session.data_received(b"250 ok\r\n") == [Send(b"RCPT TO:<a@d.test>\r\n")]

    @pytest.mark.parametrize(
        ("replies", "reason"),
        [
            # A second greeting line in the same read: before EHLO was sent.
            (
                [b"220 peer ready\r\n220 welcome, second banner\r\n"],
                "a reply to nothing sent yet",
            ),
            # A second greeting line read after EHLO went out.
            ([b"220 peer ready\r\n", b"220 welcome, second banner\r\n"], "EHLO"),
            ([b"250 hello\r\n"], "GREETING"),
            ([b"220 hi\r\n", b"354 go\r\n"], "EHLO"),
            (
                [b"220 hi\r\n", b"250-peer\r\n250 STARTTLS\r\n", b"250 ok\r\n"],
                "STARTTLS",
            ),
            ([b"220 hi\r\n", EHLO_PIPELINING, b"354 go\r\n"], "MAIL"),
            ([b"220 hi\r\n", EHLO_PIPELINING, b"250 ok\r\n220 ready\r\n"], "RCPT"),
            ([b"220 hi\r\n", EHLO_PIPELINING, b"250 ok\r\n354 go\r\n"], "RCPT"),
            # A 250 to DATA: the content would never be sent.
            (
                [b"220 hi\r\n", EHLO_PIPELINING, b"250 ok\r\n250 ok\r\n250 ok\r\n"],
                "DATA",
            ),
            (
                [b"220 hi\r\n", b"250 peer\r\n", b"250 ok\r\n", b"250 ok\r\n", OK_250],
                "DATA",
            ),
            (
                [b"220 hi\r\n", EHLO_PIPELINING, ENVELOPE_354, b"354 again\r\n"],
                "the end of the message",
            ),
        ],
    )
    def test_a_success_code_out_of_step_delivers_nothing(
        self, replies: list[bytes], reason: str
    ) -> None:
        """RFC 5321 section 4.3.2: a success code that is not one of the
        command's own (a 250 to DATA, a 354 to the end of data, a second
        greeting where the EHLO reply belongs) ends the session with 451
        4.5.0, and no recipient counts as delivered."""
        session = ClientSession("me.test", transaction("a@d.test"))
        actions: list[Any] = []
        for reply in replies:
            assert not session.finished
            actions = session.data_received(reply)
            if any(isinstance(a, StreamContent) for a in actions):
                session.content_sent()
        outcome = outcome_of(actions)
        assert outcome.failure is not None
        assert (outcome.failure.code, outcome.failure.enhanced) == (451, "4.5.0")
        assert reason in outcome.failure.text
        assert not any(r.code < 400 for r in outcome.replies.values())

    @pytest.mark.parametrize("pipelining", [True, False])
    def test_a_stray_refusal_is_no_recipient_s_answer(self, pipelining: bool) -> None:
        """A 550 after MAIL's 250, answering nothing: neither it nor anything
        after it is taken as a recipient's reply; all is tried again (no
        bounce for a recipient the next hop never refused)."""
        session = ClientSession("me.test", transaction("a@d.test"))
        ehlo = EHLO_PIPELINING if pipelining else b"250 peer\r\n"
        to_envelope(session, ehlo)
        actions = session.data_received(b"250 2.1.0 ok\r\n550 5.1.1 stray\r\n")
        if pipelining:
            actions = session.data_received(b"250 2.1.5 ok\r\n354 go\r\n")
        outcome = outcome_of(actions)
        assert outcome.replies == {}
        assert outcome.failure is not None
        assert (outcome.failure.code, outcome.failure.enhanced) == (451, "4.5.0")
        assert sent(actions).endswith(b"QUIT\r\n")

    @pytest.mark.parametrize("split", [False, True])
    def test_one_reply_too_many_shifts_nothing_into_a_bounce(self, split: bool) -> None:
        """An extra reply in a pipelined group moves every later one: a 550
        lands where DATA's reply belongs, DATA's 354 after it.  Neither
        that refusal nor any reply of the group counts, read together or
        apart; the message is tried again, no one is bounced."""
        session = ClientSession("me.test", transaction("a@d.test", "b@d.test"))
        to_envelope(session)
        group = b"250 2.0.0 stray\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n"
        if split:
            assert sent(session.data_received(group)) == b"QUIT\r\n"
            actions = session.data_received(b"354 go ahead\r\n")
        else:
            actions = session.data_received(group + b"354 go ahead\r\n")
        outcome = outcome_of(actions)
        assert outcome.replies == {}
        assert outcome.failure is not None
        assert (outcome.failure.code, outcome.failure.enhanced) == (451, "4.5.0")

    def test_a_reply_whose_lines_disagree_delivers_nothing(self) -> None:
        """RFC 5321 section 4.2.1: every line of a reply has the same code;
        "250-ok" then "550 no" is neither success nor refusal."""
        session = ClientSession("me.test", transaction("a@d.test", "b@d.test"))
        to_envelope(session)
        actions = session.data_received(
            b"250 ok\r\n250 ok\r\n250-2.1.5 ok\r\n550 5.1.1 mixed\r\n"
        )
        outcome = outcome_of(actions)
        assert outcome.failure is not None
        assert (outcome.failure.code, outcome.failure.enhanced) == (451, "4.5.0")
        assert "different codes (250, 550)" in outcome.failure.text
        assert outcome.replies == {}

    def test_garbage_reply_is_a_protocol_error(self) -> None:
        """A peer that sends no SMTP reply ends the session temporarily."""
        session = ClientSession("me.test", transaction("a@d.test"))
        outcome = outcome_of(session.data_received(b"HTTP/1.1 400 Bad\r\n"))
        assert outcome.failure is not None
        assert outcome.failure.code == 451


class TestQuotedPrintable:
    def test_single_part_is_converted(self) -> None:
        """A single-part 8-bit body becomes quoted-printable with its header."""
        got = to_quoted_printable(b"Subject: x\r\n\r\ncaf\xc3\xa9 = ok\r\n")
        assert got == (
            b"Subject: x\r\nMIME-Version: 1.0\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"caf=C3=A9 =3D ok\r\n"
        )

    def test_long_lines_get_soft_breaks_with_crlf(self) -> None:
        """Soft line breaks of long lines use CRLF, never a bare LF."""
        got = to_quoted_printable(b"\r\n" + b"\xe9" * 100 + b"\r\n")
        assert got is not None
        assert b"=\r\n" in got
        assert got.count(b"\n") == got.count(b"\r\n")

    def test_multipart_is_not_converted(self) -> None:
        """A multipart message is not converted here."""
        content = b"Content-Type: multipart/mixed; b=x\r\n\r\n\xe9\r\n"
        assert to_quoted_printable(content) is None

    def test_base64_part_is_not_reencoded(self) -> None:
        """A body with another transfer encoding is left alone."""
        content = b"Content-Transfer-Encoding: base64\r\n\r\n\xe9\r\n"
        assert to_quoted_printable(content) is None


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tls_options: list[Any] = []
        self.aborted = False

    def startTLS(self, options: Any) -> None:
        self.tls_options.append(options)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()  # type: ignore[no-untyped-call]


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A StringTransport that says it is TCP and records TCP_NODELAY."""

    no_delay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return bool(self.no_delay)

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        pass


def connect(
    session: ClientSession, timeouts: Timeouts | None = None
) -> tuple[SMTPClientProtocol, Any, Clock]:
    clock = Clock()
    protocol = SMTPClientProtocol(
        session, clock, timeouts or Timeouts(), tls_options="opts"
    )
    transport = TLSStringTransport()
    protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    return protocol, transport, clock


def results(protocol: SMTPClientProtocol) -> list[SessionOutcome]:
    got: list[SessionOutcome] = []
    protocol.done.addCallback(got.append)
    return got


class TestProtocol:
    def test_greeting_timeout(self) -> None:
        """No greeting within the greeting timeout aborts with 4.4.2."""
        protocol, transport, clock = connect(ClientSession("me", transaction("a@d")))
        got = results(protocol)
        clock.advance(Timeouts().greeting - 1)
        assert not transport.aborted
        clock.advance(1)
        assert transport.aborted
        protocol.connectionLost()
        assert got[0].failure is not None
        assert got[0].failure.enhanced == "4.4.2"
        assert "greeting" in got[0].failure.text

    def test_data_init_timeout(self) -> None:
        """No reply to DATA within the DATA initiation timeout aborts."""
        protocol, transport, clock = connect(ClientSession("me", transaction("a@d")))
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        transport.clear()
        protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
        assert transport.value() == b""  # DATA went with MAIL and RCPT
        clock.advance(Timeouts().data_init - 1)
        assert not transport.aborted
        clock.advance(1)
        assert transport.aborted

    def test_content_in_blocks_then_final_timeout(self) -> None:
        """Content goes out block by block; then the end-of-data timer runs."""
        content = b"Subject: t\r\n\r\n" + b".x\r\n" * 10
        session = ClientSession("me", transaction("a@d", content=content), block_size=7)
        protocol, transport, clock = connect(
            session, Timeouts(data_block=5, data_end=50)
        )
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
        protocol.dataReceived(b"354 go\r\n")
        transport.clear()
        producer = transport.producer
        assert producer is not None
        while transport.producer is not None:
            producer.resumeProducing()
            clock.advance(4)
        assert not transport.aborted
        assert unstuff(transport.value()[: -len(b".\r\n")]) == content
        clock.advance(45)
        assert not transport.aborted
        clock.advance(2)
        assert transport.aborted

    def test_small_content_in_one_write(self) -> None:
        """Content of one block goes out with its end-of-data line at once."""
        content = b"Subject: t\r\n\r\n.dot\r\nbody"
        session = ClientSession("me", transaction("a@d", content=content))
        protocol, transport, clock = connect(session, Timeouts(data_end=50))
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
        transport.clear()
        protocol.dataReceived(b"354 go\r\n")
        assert transport.producer is None
        assert transport.value() == b"Subject: t\r\n\r\n..dot\r\nbody\r\n.\r\n"
        clock.advance(49)
        assert not transport.aborted
        clock.advance(1)
        assert transport.aborted

    @pytest.mark.parametrize("block_size", [1 << 16, 7])
    def test_an_early_reply_to_the_message_is_no_delivery(
        self, block_size: int
    ) -> None:
        """A 250 that comes with the 354, or while the content is still going
        out, answers a message the next hop has not read: the session ends
        451 4.5.0, nothing delivered (RFC 5321 section 4.1.1.4).  Read with
        the 354, the content is not sent at all; read during the content,
        the connection is cut, with no QUIT inside the message text."""
        content = b"Subject: t\r\n\r\n" + b"line\r\n" * 5
        session = ClientSession(
            "me", transaction("a@d", content=content), block_size=block_size
        )
        protocol, transport, _ = connect(session)
        got = results(protocol)
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        if block_size < len(content):
            # Sent block by block: the 250 comes after the first one.
            protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
            assert transport.producer is not None
            transport.producer.resumeProducing()
            protocol.dataReceived(b"250 2.0.0 ok early\r\n")
            assert transport.aborted
        else:
            transport.clear()
            protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 early\r\n")
            assert transport.value() == b""
            assert transport.disconnecting
        assert b"QUIT" not in transport.value()
        protocol.connectionLost()
        (outcome,) = got
        assert outcome.replies == {}
        assert outcome.failure is not None
        assert "a reply to nothing sent yet" in outcome.failure.text

    def test_a_421_after_the_last_reply_closes_a_kept_connection(self) -> None:
        """A next hop that says 421 right after taking the message: the
        message stays delivered, and the connection is closed, not kept."""
        session = ClientSession("me", transaction("a@d"), reuse=True)
        protocol, transport, clock = connect(session)
        got = results(protocol)
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        protocol.dataReceived(b"250 2.0.0 queued\r\n421 4.3.2 bye\r\n")
        (outcome,) = got
        assert outcome.replies == {0: Reply(250, "2.0.0", "queued")}
        assert outcome.failure is None
        assert not protocol.idle
        assert transport.disconnecting
        # Only the bound on the close is left: no phase timer, no keeping.
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(Timeouts().command)
        assert transport.aborted

    def test_a_reply_trickled_octet_by_octet_still_times_out(self) -> None:
        """The phase's timer restarts on a whole reply only: a next hop that
        sends one octet at a time cannot hold the connection past it."""
        protocol, transport, clock = connect(
            ClientSession("me", transaction("a@d")), Timeouts(command=5)
        )
        protocol.dataReceived(b"220 hi\r\n")
        for octet in b"250-peer says hello slowly\r\n"[:6]:
            clock.advance(2)
            if transport.aborted:
                break
            protocol.dataReceived(bytes([octet]))
        assert transport.aborted

    def test_unanswered_quit_keeps_the_outcome(self) -> None:
        """A QUIT left unanswered times out without changing the results."""
        protocol, transport, clock = connect(ClientSession("me", transaction("a@d")))
        got = results(protocol)
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        protocol.dataReceived(b"250 2.0.0 queued\r\n")
        assert transport.value().endswith(b"QUIT\r\n")
        clock.advance(Timeouts().command)
        assert transport.aborted
        protocol.connectionLost()
        assert got[0].replies == {0: Reply(250, "2.0.0", "queued")}
        assert got[0].failure is None

    def test_starttls_uses_the_given_options(self) -> None:
        """On the STARTTLS reply the adapter starts TLS and greets again."""
        protocol, transport, _ = connect(ClientSession("me", transaction("a@d")))
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(b"250-peer\r\n250 STARTTLS\r\n")
        transport.clear()
        protocol.dataReceived(b"220 go\r\n")
        assert transport.tls_options == ["opts"]
        assert transport.value() == b"EHLO me\r\n"

    def test_nagle_is_off_on_tcp_connections(self) -> None:
        """On a TCP connection the client sets TCP_NODELAY, so the end-of-data
        line is not held back behind the content block's unacknowledged octets."""
        protocol = SMTPClientProtocol(
            ClientSession("me", transaction("a@d")), Clock(), Timeouts()
        )
        transport = TCPStringTransport()  # type: ignore[no-untyped-call]
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        assert transport.no_delay is True

    def test_tls_options_are_built_only_for_starttls(self) -> None:
        """The options factory is called when TLS starts, and never for a peer
        that does not offer STARTTLS."""
        built: list[str] = []

        def factory() -> str:
            built.append("built")
            return "lazy"

        plain = b"250-peer\r\n250 PIPELINING\r\n"
        with_tls = b"250-peer\r\n250 STARTTLS\r\n"
        for ehlo_reply, expected in ((plain, []), (with_tls, ["lazy"])):
            protocol = SMTPClientProtocol(
                ClientSession("me", transaction("a@d")),
                Clock(),
                Timeouts(),
                tls_options_factory=factory,
            )
            transport = TLSStringTransport()
            protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
            protocol.dataReceived(b"220 hi\r\n")
            protocol.dataReceived(ehlo_reply)
            if ehlo_reply is with_tls:
                protocol.dataReceived(b"220 go\r\n")
            assert transport.tls_options == expected
        assert built == ["built"]

    def test_done_fires_after_quit_reply_and_close(self) -> None:
        """The outcome is given once QUIT is answered and the connection ends."""
        protocol, transport, _ = connect(ClientSession("me", transaction("a@d")))
        got = results(protocol)
        protocol.dataReceived(b"220 hi\r\n")
        protocol.dataReceived(EHLO_PIPELINING)
        protocol.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n503 5.5.1 no RCPT\r\n")
        assert transport.value().endswith(b"QUIT\r\n")
        assert got == []
        protocol.dataReceived(b"221 bye\r\n")
        assert transport.disconnecting
        protocol.connectionLost()
        assert got[0].replies == {0: Reply(550, "5.1.1", "no")}


def test_transaction_subset_keeps_each_recipients_parameters() -> None:
    """A subset carries the chosen recipients with their own NOTIFY and ORCPT;
    the whole set in order is the transaction as it was."""
    whole = Transaction(
        Address("s", "src.test"),
        [Address("a", "dst.test"), Address("b", "dst.test"), Address("c", "dst.test")],
        CONTENT,
        ret="HDRS",
        notify=[frozenset({"NEVER"}), None, frozenset({"SUCCESS"})],
        orcpt=["rfc822;a@x.test", None, "rfc822;c@x.test"],
    )
    part = whole.subset([0, 2])
    assert [str(r) for r in part.recipients] == ["a@dst.test", "c@dst.test"]
    assert part.notify == [frozenset({"NEVER"}), frozenset({"SUCCESS"})]
    assert part.orcpt == ["rfc822;a@x.test", "rfc822;c@x.test"]
    assert part.ret == "HDRS"
    assert part.content == CONTENT
    assert whole.subset([0, 1, 2]) == whole
    assert whole.subset([2, 1, 0]).recipients == list(reversed(whole.recipients))
