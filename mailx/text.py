"""
Message text as it arrives: after DATA's 354 (RFC 5321 section 4.1.1.4),
ended only by CRLF "." CRLF and dot-unstuffed (section 4.5.2), and as BDAT
chunks (RFC 3030).  Both keep memory bounded whatever a client sends and
remember why a message must be refused, to say so at its real end.
"""

from __future__ import annotations

from mailx import replies
from mailx.replies import Reply

# RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
MAX_TEXT_LINE = 1000


class DataReader:
    """Reads message text after 354 up to CRLF "." CRLF, bounded in memory."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.parts: list[bytes] = []
        self.size = 0
        self.at_line_start = True
        self.too_big = False
        self.line_too_long = False
        self.bare_line_ending = False

    def feed(self, buffer: bytearray) -> tuple[int, bool]:
        """Consume what can be consumed: (octets consumed, message ended)."""
        if self.at_line_start and buffer.startswith(b".\r\n"):
            return 3, True
        end = buffer.find(b"\r\n.\r\n")
        if end >= 0:
            self._take(bytes(buffer[: end + 2]))
            return end + 5, True
        last = buffer.rfind(b"\r\n")
        if last >= 0:
            self._take(bytes(buffer[: last + 2]))
            consumed = last + 2
        else:
            consumed = 0
        pending = len(buffer) - consumed
        if pending > MAX_TEXT_LINE:
            # An over-long line: keep only its last octet, which may be the CR
            # of the CRLF that ends it.
            self.line_too_long = True
            self.at_line_start = False
            self.size += pending - 1
            self.too_big = self.too_big or self.size > self.max_size
            consumed = len(buffer) - 1
        return consumed, False

    def _take(self, segment: bytes) -> None:
        """Keep whole lines; ``segment`` ends with CRLF."""
        if not (self.bare_line_ending and self.line_too_long):
            # One split serves both checks (issue 7: three counts and a split
            # were a fortieth of the server's time).
            lines = segment.split(b"\r\n")
            if not self.bare_line_ending:
                # A CR or LF left once the CRLFs are gone stands alone.
                rest = b"".join(lines)
                self.bare_line_ending = b"\r" in rest or b"\n" in rest
            if not self.line_too_long:
                self.line_too_long = max(map(len, lines)) + 2 > MAX_TEXT_LINE
        # RFC 5321 section 4.5.2: drop the first of a line's leading dots.
        if self.at_line_start and segment.startswith(b"."):
            segment = segment[1:]
        segment = segment.replace(b"\r\n.", b"\r\n")
        self.at_line_start = True
        self.size += len(segment)
        if self.size > self.max_size:
            self.too_big = True
            self.parts.clear()
        elif not (self.line_too_long or self.bare_line_ending):
            self.parts.append(segment)

    def failure(self) -> Reply | None:
        if self.too_big:
            return replies.SIZE_EXCEEDED
        if self.bare_line_ending:
            return replies.BARE_LINE_ENDING
        if self.line_too_long:
            return replies.LINE_IN_DATA_TOO_LONG
        return None


class Chunks:
    """The octets of one BDAT transfer (RFC 3030), bounded in memory."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_size:
            self.parts.clear()
        else:
            self.parts.append(data)

    @property
    def too_big(self) -> bool:
        return self.size > self.max_size


def check_text(content: bytes) -> Reply | None:
    """Line rules for a message sent by BDAT without BODY=BINARYMIME."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return replies.BARE_LINE_ENDING
    if content and max(map(len, content.split(b"\r\n"))) + 2 > (MAX_TEXT_LINE):
        return replies.LINE_IN_DATA_TOO_LONG
    return None
