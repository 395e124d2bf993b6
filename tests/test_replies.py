"""Replies as they go on the wire (RFC 5321 section 4.2.1)."""

from __future__ import annotations

from mailx import replies
from mailx.replies import Reply


def test_one_line_reply() -> None:
    assert replies.RECIPIENT_OK.to_bytes() == b"250 2.1.5 Recipient OK\r\n"
    greeting = replies.greeting("mx.test")
    assert greeting.to_bytes() == b"220 mx.test ESMTP mailx ready\r\n"
    assert replies.START_DATA.to_bytes().startswith(b"354 End data")
    assert Reply(250, "", "").to_bytes() == b"250 \r\n"
    assert Reply(250, "2.0.0", "").to_bytes() == b"250 2.0.0 \r\n"
    assert (
        Reply(550, "5.1.1", "caf\u00e9").to_bytes()
        == "550 5.1.1 caf\u00e9\r\n".encode()
    )
    # One per host name, made once.
    assert replies.greeting("mx.test") is greeting
    assert replies.closing("mx.test").to_bytes() == (
        b"221 2.0.0 mx.test closing connection\r\n"
    )


def test_lines_but_the_last_carry_a_hyphen_and_each_its_enhanced_code() -> None:
    reply = Reply(250, "2.0.0", "mx.test greets x\nPIPELINING\nSIZE 1000")
    assert reply.to_bytes() == (
        b"250-2.0.0 mx.test greets x\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 SIZE 1000\r\n"
    )
    assert Reply(250, "", "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"


def test_the_wire_form_kept_on_a_reply_leaves_it_equal_to_a_new_one() -> None:
    sent = Reply(451, "4.3.0", "try again")
    assert sent.to_bytes() == sent.to_bytes() == b"451 4.3.0 try again\r\n"
    fresh = Reply(451, "4.3.0", "try again")
    assert sent == fresh and hash(sent) == hash(fresh)
    assert {sent: 1}[fresh] == 1
    assert sent.with_text("later").to_bytes() == b"451 4.3.0 later\r\n"
