"""Message text as it arrives (mailx.text), against the rules it checks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailx import replies
from mailx.text import MAX_TEXT_LINE, DataReader

# Lines of a few kinds: short ones with stray CRs and LFs, and long ones
# about the limit of RFC 5321 section 4.5.3.1.6.
pieces = st.one_of(
    st.text(alphabet="a.\r\n", max_size=12).map(str.encode),
    st.integers(MAX_TEXT_LINE - 4, MAX_TEXT_LINE + 2).map(lambda n: b"a" * n),
)


@given(st.lists(pieces, max_size=12))
def test_bare_line_endings_and_long_lines_are_found(parts: list[bytes]) -> None:
    """The reader refuses the text exactly when it has a CR or LF outside a
    CRLF, or a line longer than 1000 octets with its CRLF."""
    # As a client sends it: every line that starts with "." gets another.
    lines = b"\r\n".join(parts).split(b"\r\n")
    text = b"".join(b"." * line.startswith(b".") + line + b"\r\n" for line in lines)
    reader = DataReader(max_size=10**6)
    consumed, ended = reader.feed(bytearray(text + b".\r\n"))
    assert ended and consumed == len(text) + 3

    lines = text.split(b"\r\n")[:-1]
    assert b"\r\n.\r\n" not in b"\r\n" + text
    bare = any(b"\r" in line or b"\n" in line for line in lines)
    too_long = any(len(line) + 2 > MAX_TEXT_LINE for line in lines)
    expected = None
    if bare:
        expected = replies.BARE_LINE_ENDING
    elif too_long:
        expected = replies.LINE_IN_DATA_TOO_LONG
    assert reader.failure() == expected
