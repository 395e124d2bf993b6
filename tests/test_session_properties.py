"""Properties of the session over generated input (hypothesis)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sessionkit import make_session

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")

COMMANDS = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<s@example.net>\r\n",
    b"MAIL FROM:<s@example.net> SIZE=10 BODY=8BITMIME\r\n",
    b"RCPT TO:<alice@example.org>\r\n",
    b"RCPT TO:<nobody@example.org>\r\n",
    b"RCPT TO:<x@elsewhere.example>\r\n",
    b"DATA\r\n",
    b"line\r\n",
    b".\r\n",
    b"..\r\n",
    b"BDAT 4\r\n",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"x" * 600,
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40)), max_size=40),
    st.integers(min_value=1, max_value=64),
)
def test_any_input_gives_only_well_formed_replies(
    pieces: list[bytes], segment: int
) -> None:
    """Whatever arrives, in whatever segments, the session answers in replies."""
    session, output, sink, _ = make_session(tls_available=True, max_errors=1000)
    data = b"".join(pieces)
    for start in range(0, len(data), segment):
        session.data_received(data[start : start + segment])
    written = b"".join(output.writes)
    assert REPLY_LINE.sub(b"", written) == b""
    # Every stored message went through a 250 for its end of data.
    assert len(sink.messages) <= written.count(b"queued as")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=700))
def test_message_text_round_trips(body: bytes, segment: int) -> None:
    """Text with CRLF lines, dot-stuffed on the wire, is stored as sent."""
    lines = body.replace(b"\r", b"").replace(b"\n", b"").split(b"\0")
    text = b"".join(line[:900] + b"\r\n" for line in lines)
    stuffed = re.sub(rb"(?m)^\.", b"..", text)
    wire = (
        b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
        b"DATA\r\n" + stuffed + b".\r\n"
    )
    session, output, sink, _ = make_session(max_message_size=10**6)
    for start in range(0, len(wire), segment):
        session.data_received(wire[start : start + segment])
    assert output.codes()[-1] == 250
    assert sink.bodies() == [text]
