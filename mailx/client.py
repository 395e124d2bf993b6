"""
The outbound ESMTP client: one mail transaction with one next hop.

Theory of operation
-------------------
``ClientSession`` is the dialogue as a pure state machine.  Its inputs are the
octets the next hop sends (``data_received``), the news that the connection
ended or timed out, and that TLS was started.  Its outputs are ``Action``
values: ``Send`` octets, ``StartTLS``, ``StreamContent`` (the message, in
blocks) and ``Finish`` with a ``SessionOutcome``.  It never touches a socket,
so every path is testable with plain bytes.

The phases run in this order, each waiting for the replies it needs::

    GREETING -> EHLO (-> HELO) [-> STARTTLS -> EHLO] [-> AUTH]
             -> MAIL and RCPT (pipelined when offered) -> DATA or BDAT
             -> CONTENT -> QUIT

``SessionOutcome`` says, for this host, what became of each recipient: a
reply of its own (RCPT refused, or the final reply after the content), or the
host-level ``failure`` (421, timeout, dropped connection, MAIL refused, a
needed extension missing) which sends the recipient on to the next exchange.

A session made with ``reuse=True`` does not QUIT after a transaction the
next hop accepted: it goes ``IDLE`` and finishes with ``keep_open``, and the
connection can carry the next transaction (``next_transaction``, straight to
MAIL: RFC 5321 section 4.1.1.4 ends a transaction at the reply to the end of
data) or be closed (``close``, QUIT).

``SMTPClientProtocol`` is the thin Twisted adapter: it feeds the machine,
performs its actions, arms the RFC 5321 section 4.5.3.2 timeout of each
phase on the injected clock and fires ``done`` with the outcome of each
transaction.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mailx import replies
from mailx.address import Address
from mailx.envelope import Body
from mailx.replies import Reply
from mailx.sendnow import write_now

# RFC 5321 section 4.5.3.1.5 limits a reply line to 512 octets; we tolerate
# longer lines from sloppy peers but no more than this.
MAX_REPLY_LINE = 8192
# RFC 5321 section 4.5.3.1.8 asks for at least 100 recipients per transaction.
MAX_RECIPIENTS_PER_TRANSACTION = 100
# A multi-line reply (an EHLO reply lists the extensions) longer than this
# is taken as a broken peer (our choice; RFC 5321 sets no number).
MAX_REPLY_LINES = 256
# Size of the blocks the content is written in (each one arms the RFC 5321
# section 4.5.3.2.5 data block timeout); our choice, a few TCP windows.
BLOCK_SIZE = 64 * 1024
# Content the producer sends at once in one call before it queues a block and
# lets other connections have the reactor: what Twisted's own write handler
# sends a connection in one turn (FileDescriptor.SEND_LIMIT, 128 KiB).
DIRECT_LIMIT = 128 * 1024

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# RFC 5321 section 4.2: a reply line is a code, then a space or a hyphen
# and text, or the code alone.
_REPLY_LINE = re.compile(r"[2-5][0-9][0-9]([ -].*)?", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class Timeouts:
    """Per-phase timeouts in seconds, defaults from RFC 5321 section 4.5.3.2."""

    connect: float = 30.0
    greeting: float = 300.0
    # Section 4.5.3.2 names no value for EHLO, STARTTLS, AUTH or QUIT; the
    # MAIL value is used for them.
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0


class Phase(enum.Enum):
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS_EHLO = "ehlo after starttls"
    AUTH = "auth"
    ENVELOPE = "mail/rcpt"
    DATA = "data"
    CONTENT = "content"
    QUIT = "quit"
    # A transaction is done and the connection kept for another.
    IDLE = "idle"
    DONE = "done"


class TLSMode(enum.Enum):
    NONE = "none"
    # RFC 7435: opportunistic, unauthenticated encryption.
    MAY = "may"
    # Required and verified; failing that, the host is skipped for now.
    VERIFY = "verify"


@dataclass
class Transaction:
    """What to send: the envelope parts for one domain and the content."""

    reverse_path: Address | None
    recipients: list[Address]
    content: bytes
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    # RFC 3461 parameters, as received: RET and ENVID of MAIL, and NOTIFY and
    # ORCPT of each recipient (aligned with ``recipients``, or empty).
    ret: str | None = None
    envid: str | None = None
    notify: list[frozenset[str] | None] = field(default_factory=list)
    orcpt: list[str | None] = field(default_factory=list)
    # mailx's hand-off from a worker (mailx.workers): which recipients are
    # one Maildir of the main process, sent with X-MAILX-MAILBOX.
    mailbox: list[bool] = field(default_factory=list)

    def subset(self, indices: list[int]) -> Transaction:
        """The same transaction for the recipients at ``indices`` only."""
        if indices == list(range(len(self.recipients))):
            # Every recipient, in order (a first attempt): the transaction
            # itself, which nothing changes once it is made.
            return self
        return dataclasses.replace(
            self,
            recipients=[self.recipients[i] for i in indices],
            notify=[self.notify[i] for i in indices] if self.notify else [],
            orcpt=[self.orcpt[i] for i in indices] if self.orcpt else [],
            mailbox=[self.mailbox[i] for i in indices] if self.mailbox else [],
        )


@dataclass
class SessionOutcome:
    """What one next hop did with a transaction."""

    # Replies that settle a recipient for this attempt, by recipient index.
    replies: dict[int, Reply] = field(default_factory=dict)
    # The host-level reply for every recipient not in ``replies``.
    failure: Reply | None = None
    tls: bool = False
    # A failed opportunistic STARTTLS handshake: try this host again in clear.
    retry_plain: bool = False
    # The next hop said something (its greeting at least): the log names it
    # as the relay; not after a refused connection or a silent one.
    answered: bool = False


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    pass


@dataclass(frozen=True)
class StreamContent:
    blocks: Iterator[bytes]
    # Content of one block or less goes out in one write; larger content
    # through a producer, block by block.
    one_block: bool = False


@dataclass(frozen=True)
class Finish:
    outcome: SessionOutcome
    # The connection stays open for another transaction.
    keep_open: bool = False


Action = Send | StartTLS | StreamContent | Finish


class ReplyParser:
    """Octets in, complete replies (RFC 5321 section 4.2.1) out."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []

    @property
    def pending(self) -> bytes:
        """Octets received after the last complete reply."""
        return self._buffer

    def feed(self, data: bytes) -> Iterator[Reply]:
        """Yield each complete reply; raise ValueError on a malformed one."""
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ValueError("reply line too long")
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not _REPLY_LINE.fullmatch(line):
                raise ValueError(f"malformed reply line {line[:40]!r}")
            if not self._lines and (len(line) == 3 or line[3] == " "):
                # A reply of one line, as most are (issue 7).
                yield _one_line_reply(line)
                continue
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                raise ValueError("reply with too many lines")
            if len(line) == 3 or line[3] == " ":
                yield self._reply()

    def _reply(self) -> Reply:
        lines, self._lines = self._lines, []
        code = int(lines[0][:3])
        # RFC 5321 section 4.2.1: every line of a reply has the same code.
        # Taking the first of "250-...", "550 ..." would take a refusal for
        # a success.
        if any(line[:3] != lines[0][:3] for line in lines):
            codes = ", ".join(dict.fromkeys(line[:3] for line in lines))
            raise ValueError(f"a reply whose lines have different codes ({codes})")
        texts = [line[4:] for line in lines]
        # RFC 2034 section 4: the enhanced code starts the text of each line.
        found = _ENHANCED.match(texts[0])
        enhanced = ""
        if found and found.group(1) == str(code)[0]:
            enhanced = found.group(0).strip()
            texts = [
                t[len(enhanced) :].lstrip() if t.startswith(enhanced) else t
                for t in texts
            ]
        return Reply(code, enhanced, "\n".join(texts))


def _one_line_reply(line: str) -> Reply:
    """A reply of one line (``NNN`` or ``NNN text``), as ``_reply`` reads it."""
    code = int(line[:3])
    text = line[4:]
    # RFC 2034 section 4: the enhanced code starts the text.
    found = _ENHANCED.match(text)
    if found and found.group(1) == line[0]:
        enhanced = found.group(0).strip()
        return Reply(code, enhanced, text[len(enhanced) :].lstrip())
    return Reply(code, "", text)


class OwedReplies:
    """
    The replies a peer owes: one for each command written (and the greeting
    to begin with), and one for each command handed to the adapter, which
    writes it before it reads again.  SMTP numbers no replies, so a reply
    read when none is owed came before its command did: the early "250" of
    a next hop that has not read the message, or one reply too many, which
    would answer the next command in its place (RFC 5321 section 4.2).
    """

    def __init__(self) -> None:
        self._owed = 1
        self._handed_out = 0

    def read_begins(self) -> None:
        """What was handed out before this read is written by now."""
        self._owed += self._handed_out
        self._handed_out = 0

    def handed_out(self, commands: int = 1) -> None:
        self._handed_out += commands

    def written(self) -> None:
        """One more written by the adapter itself (the end of the content)."""
        self._owed += 1

    def take(self, reply: Reply) -> None:
        """Count ``reply`` as owed; ValueError if it is not."""
        if self._owed > 0:
            self._owed -= 1
        elif reply.code != 421:
            # RFC 5321 section 3.8 lets a 421 come at any time.
            raise ValueError(f"a reply to nothing sent yet: {reply}")


class DotStuffer:
    """
    Encode content for DATA (RFC 5321 section 4.5.2): a "." that starts a line
    is doubled, and every line ends with CRLF (section 2.3.8: bare CR and LF
    are never sent).  Works across block boundaries.
    """

    def __init__(self, crlf_only: bool = False) -> None:
        self._at_line_start = True
        # A CR at the end of a block, held until the next shows whether an LF
        # follows it.
        self._held = b""
        # The content has CRLF line endings only already: no need to look.
        self._crlf_only = crlf_only

    def encode(self, block: bytes) -> bytes:
        data, self._held = self._held + block, b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return b""
        if not self._crlf_only:
            data = normalise_line_endings(data)
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._at_line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        """The end of the content and the end-of-data indication."""
        tail = b""
        if self._held or not self._at_line_start:
            tail = b"\r\n"
        self._held = b""
        self._at_line_start = True
        return tail + b".\r\n"


def normalise_line_endings(content: bytes) -> bytes:
    """Every line ending CRLF; a bare CR or LF becomes CRLF."""
    crlf = content.count(b"\r\n")
    if crlf == content.count(b"\r") == content.count(b"\n"):
        # Every CR and LF is part of a CRLF already (the usual case): three
        # counts are cheaper than a substitution that changes nothing.
        return content
    return _LINE_ENDING.sub(b"\r\n", content)


def dot_stuffed_blocks(
    content: bytes, size: int = BLOCK_SIZE, crlf_only: bool = False
) -> Iterator[bytes]:
    """The content as DATA sends it, in blocks, end-of-data included."""
    stuffer = DotStuffer(crlf_only)
    for start in range(0, len(content), size):
        block = stuffer.encode(content[start : start + size])
        if block:
            yield block
    yield stuffer.finish()


def _split_message(content: bytes) -> tuple[bytes, bytes]:
    if content.startswith(b"\r\n"):
        return b"", content[2:]
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 4 :]


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _header_fields(header: bytes) -> list[bytes]:
    """The header section split into fields, folded lines kept together."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def _field_value(fields: list[bytes], name: bytes) -> bytes | None:
    for item in fields:
        field_name, _, value = item.partition(b":")
        if field_name.strip().lower() == name:
            return value.strip().lower()
    return None


def to_quoted_printable(content: bytes) -> bytes | None:
    """
    Convert an 8-bit message to 7 bits where that is safe (RFC 6152 section 3
    allows a downgrade, RFC 2045 section 6.7 defines the encoding): a single
    part, not multipart or message, ASCII header.  None when it is not safe.
    """
    header, body = _split_message(content)
    if has_8bit(header):
        return None
    fields = _header_fields(header)
    content_type = _field_value(fields, b"content-type") or b"text/plain"
    if content_type.startswith((b"multipart/", b"message/")):
        return None
    encoding = _field_value(fields, b"content-transfer-encoding")
    if encoding not in (None, b"7bit", b"8bit"):
        return None

    kept = [
        f
        for f in fields
        if f.partition(b":")[0].strip().lower() != b"content-transfer-encoding"
    ]
    if _field_value(fields, b"mime-version") is None:
        kept.append(b"MIME-Version: 1.0")
    kept.append(b"Content-Transfer-Encoding: quoted-printable")
    lines = body.split(b"\r\n")
    encoded = [binascii.b2a_qp(line).replace(b"\n", b"\r\n") for line in lines]
    return b"\r\n".join(kept) + b"\r\n\r\n" + b"\r\n".join(encoded)


class _Step(enum.Enum):
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class ClientSession:
    """The client side of one SMTP session, as a state machine."""

    def __init__(
        self,
        hostname: str,
        transaction: Transaction,
        tls_mode: TLSMode = TLSMode.MAY,
        auth: tuple[str, str] | None = None,
        block_size: int = BLOCK_SIZE,
        reuse: bool = False,
    ) -> None:
        self._hostname = hostname
        self._transaction = transaction
        self._tls_mode = tls_mode
        self._auth = auth
        self._block_size = block_size
        self._reuse = reuse
        self._parser = ReplyParser()
        self._extensions: dict[str, str] = {}
        self._awaiting: list[tuple[_Step, int]] = []
        self._accepted: list[int] = []
        self._mail_reply: Reply | None = None
        self._content = transaction.content
        self._queued: list[str] = []
        # DATA was accepted with no recipient to send the content to.
        self._abandoned = False
        self._use_utf8 = False
        self._body_parameter = ""
        self.phase = Phase.GREETING
        self.outcome = SessionOutcome()
        self.last_reply: Reply | None = None
        self._owed = OwedReplies()
        # The end of data was answered: this transaction's outcome stands.
        self._settled = False
        # The content is being written: the next hop reads message text,
        # where no command may go (RFC 5321 section 4.1.1.4).
        self._in_content = False

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords of the peer (upper case) and their parameters."""
        return dict(self._extensions)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    def data_received(self, data: bytes) -> list[Action]:
        """Octets from the next hop in; the actions they call for out."""
        if self.phase is Phase.DONE:
            return []
        self._owed.read_begins()
        actions: list[Action] = []
        try:
            for reply in self._parser.feed(data):
                self.last_reply = reply
                self.outcome.answered = True
                self._owed.take(reply)
                actions.extend(self._count(self._handle(reply)))
                if self.finished or any(isinstance(a, StartTLS) for a in actions):
                    break
        except ValueError as reason:
            failure = replies.NEXT_HOP_PROTOCOL_ERROR
            if not self._settled:
                # Out of step, the next hop may have said anything of this
                # transaction in the wrong place (a refusal that answered
                # another command): none of it counts, all is tried again.
                self.outcome.replies.clear()
            # What this read asked for goes unsent: above all a content that
            # the next hop, out of step, might store although the
            # transaction is tried again.
            return self._fail(failure.with_text(f"{failure.text}: {reason}"))
        return actions

    def content_sent(self) -> None:
        """The adapter wrote the whole content: its end is now owed a reply."""
        self._owed.written()
        self._in_content = False

    def _count(self, actions: list[Action]) -> list[Action]:
        """``actions``, their commands counted as owed a reply each."""
        for action in actions:
            if isinstance(action, Send):
                self._owed.handed_out(action.data.count(b"\r\n"))
            elif isinstance(action, StreamContent):
                self._in_content = True
        return actions

    def connection_lost(self) -> SessionOutcome:
        """The connection ended; the outcome so far, final."""
        if self.phase in (Phase.DONE, Phase.QUIT, Phase.IDLE):
            self.phase = Phase.DONE
            return self.outcome
        if self.phase is Phase.TLS_EHLO:
            # Lost before the EHLO over TLS was answered: no TLS session was
            # made (the handshake, or the peer's certificate, failed).
            self.outcome.tls = False
        if self.phase is Phase.TLS_EHLO and self._tls_mode is TLSMode.MAY:
            # RFC 7435 section 6: a failed opportunistic handshake is retried
            # in clear.
            self.outcome.retry_plain = True
            self._fail(replies.CONNECTION_DROPPED.with_text("TLS handshake failed"))
        elif self.phase is Phase.TLS_EHLO:
            self._fail(
                replies.TLS_REQUIRED_FAILED.with_text(
                    f"{replies.TLS_REQUIRED_FAILED.text}: handshake or verification"
                    " failed"
                )
            )
        else:
            text = f"{replies.CONNECTION_DROPPED.text} during {self.phase.value}"
            self._fail(replies.CONNECTION_DROPPED.with_text(text))
        return self.outcome

    def timed_out(self) -> list[Action]:
        """The timeout of the current phase ran out."""
        if self.phase in (Phase.DONE, Phase.QUIT, Phase.IDLE):
            self.phase = Phase.DONE
            return [Finish(self.outcome)]
        text = f"{replies.NEXT_HOP_TIMEOUT.text} during {self.phase.value}"
        return self._fail(replies.NEXT_HOP_TIMEOUT.with_text(text))

    def tls_started(self) -> list[Action]:
        """The adapter has started TLS; greet again (RFC 3207 section 4.2)."""
        self.outcome.tls = True
        self._extensions = {}
        self.phase = Phase.TLS_EHLO
        return self._count([self._command(f"EHLO {self._hostname}")])

    def next_transaction(self, transaction: Transaction) -> list[Action]:
        """Start another transaction on an idle connection."""
        if self.phase is not Phase.IDLE:
            raise ValueError(f"no transaction can start in {self.phase.value}")
        self._transaction = transaction
        self._content = transaction.content
        self._awaiting = []
        self._accepted = []
        self._mail_reply = None
        self._queued = []
        self._abandoned = False
        self.outcome = SessionOutcome(
            tls=self.outcome.tls, answered=self.outcome.answered
        )
        self.last_reply = None
        self._settled = False
        return self._count(self._start_transaction())

    def close(self) -> list[Action]:
        """End an idle connection politely."""
        if self.phase is not Phase.IDLE:
            return []
        return self._count(self._quit())

    def _command(self, line: str) -> Send:
        return Send(line.encode("utf-8") + b"\r\n")

    def _fail(self, reply: Reply) -> list[Action]:
        """End the session: QUIT (RFC 5321 section 4.1.1.10), unless the
        next hop is closing (421), and close without waiting."""
        if reply.code < 400:
            # A reply that says success cannot be why nothing was delivered:
            # taken as the outcome, it would count as delivery.
            failure = replies.NEXT_HOP_PROTOCOL_ERROR
            reply = failure.with_text(f"{failure.text}: unexpected reply {reply}")
        was_idle = self.phase is Phase.IDLE
        self.phase = Phase.DONE
        if not was_idle:
            # Once a transaction ended idle, its outcome is given already.
            self.outcome.failure = reply
        if reply.code == 421 or self._in_content:
            # Closing, or in the middle of the message text, where QUIT
            # would be text: the connection just ends.
            return [Finish(self.outcome)]
        return self._count([self._command("QUIT"), Finish(self.outcome)])

    def _quit(self) -> list[Action]:
        # RFC 5321 section 4.1.1.10: send QUIT and wait for its reply before
        # closing; the outcome is already settled.
        self.phase = Phase.QUIT
        return [self._command("QUIT")]

    def _on_quit(self, reply: Reply) -> list[Action]:
        self.phase = Phase.DONE
        return [Finish(self.outcome)]

    def _handle(self, reply: Reply) -> list[Action]:
        # RFC 5321 section 3.8: a 421 may come at any time; the host is
        # closing (an idle connection too, which then is not kept).
        if reply.code == 421 and self.phase is not Phase.QUIT:
            return self._fail(reply)
        handler = _REPLY_HANDLERS.get(self.phase)
        if handler is None:
            return []
        if reply.code < 400:
            expected = self._positive_codes()
            if expected and reply.code not in expected:
                # RFC 5321 section 4.3.2: each command has its own success
                # codes.  Any other is a next hop out of step with us (a
                # 250 to DATA, or a second greeting taken for the EHLO
                # reply): nothing it said of this transaction counts.
                raise ValueError(f"{reply.code} in reply to {self._awaited()}: {reply}")
        return handler(self, reply)

    def _awaited(self) -> str:
        """What the next reply answers, in the words of RFC 5321."""
        if self.phase is Phase.ENVELOPE and self._awaiting:
            return self._awaiting[0][0].name
        if self.phase is Phase.CONTENT:
            return "the end of the message"
        return self.phase.name.replace("_", " ")

    def _positive_codes(self) -> frozenset[int]:
        """The success codes of what the next reply answers; empty: any."""
        if self.phase is Phase.ENVELOPE and self._awaiting:
            return _STEP_CODES[self._awaiting[0][0]]
        return _PHASE_CODES.get(self.phase, frozenset())

    def _on_greeting(self, reply: Reply) -> list[Action]:
        if reply.code != 220:
            if reply.is_permanent:
                # RFC 5321 section 3.1: a 554 greeting refuses the session,
                # not the message: another exchange is tried, and this one
                # again later (as Postfix's smtp_skip_5xx_greeting).
                refused = replies.NEXT_HOP_GREETING_REFUSED
                reply = refused.with_text(f"{refused.text}: {reply}")
            return self._fail(reply)
        self.phase = Phase.EHLO
        return [self._command(f"EHLO {self._hostname}")]

    def _on_ehlo(self, reply: Reply) -> list[Action]:
        if reply.is_positive:
            self._extensions = _parse_extensions(reply)
            return self._after_greeting()
        if reply.is_permanent and self.phase is Phase.EHLO:
            # RFC 5321 section 3.2: an old server that does not know EHLO.
            self.phase = Phase.HELO
            return [self._command(f"HELO {self._hostname}")]
        return self._fail(reply)

    def _on_helo(self, reply: Reply) -> list[Action]:
        if not reply.is_positive:
            return self._fail(reply)
        self._extensions = {}
        return self._after_greeting()

    def _after_greeting(self) -> list[Action]:
        offered = "STARTTLS" in self._extensions
        if not self.outcome.tls and self._tls_mode is not TLSMode.NONE and offered:
            self.phase = Phase.STARTTLS
            return [self._command("STARTTLS")]
        if not self.outcome.tls and self._tls_mode is TLSMode.VERIFY:
            text = f"{replies.TLS_REQUIRED_FAILED.text}: STARTTLS not offered"
            return self._fail(replies.TLS_REQUIRED_FAILED.with_text(text))
        if self._auth is not None:
            return self._start_auth()
        return self._start_transaction()

    def _on_starttls(self, reply: Reply) -> list[Action]:
        if reply.code == 220:
            # RFC 3207 section 5 and RFC 7435: octets sent in the clear after
            # the STARTTLS reply could be injected; never read them as replies.
            if self._parser.pending:
                return self._fail(replies.TLS_INJECTION)
            return [StartTLS()]
        if self._tls_mode is TLSMode.VERIFY:
            text = f"{replies.TLS_REQUIRED_FAILED.text}: STARTTLS refused: {reply}"
            return self._fail(replies.TLS_REQUIRED_FAILED.with_text(text))
        if self._auth is not None:
            return self._start_auth()
        return self._start_transaction()

    def _start_auth(self) -> list[Action]:
        assert self._auth is not None
        mechanisms = self._extensions.get("AUTH", "").upper().split()
        if not self.outcome.tls or "PLAIN" not in mechanisms:
            why = "no TLS" if not self.outcome.tls else "AUTH PLAIN not offered"
            failure = replies.SMARTHOST_AUTH_FAILED
            return self._fail(failure.with_text(f"{failure.text}: {why}"))
        user, password = self._auth
        # RFC 4616 section 2: authzid NUL authcid NUL passwd.
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        self.phase = Phase.AUTH
        return [self._command(f"AUTH PLAIN {token}")]

    def _on_auth(self, reply: Reply) -> list[Action]:
        if reply.code != 235:
            failure = replies.SMARTHOST_AUTH_FAILED
            return self._fail(failure.with_text(f"{failure.text}: {reply}"))
        return self._start_transaction()

    def _start_transaction(self) -> list[Action]:
        problem = self._check_capabilities()
        if problem is not None:
            self.outcome.failure = problem
            return self._quit()

        transaction = self._transaction
        reverse = str(transaction.reverse_path) if transaction.reverse_path else ""
        commands = [f"MAIL FROM:<{reverse}>{self._mail_parameters()}"]
        self._awaiting = [(_Step.MAIL, -1)]
        for index, recipient in enumerate(transaction.recipients):
            commands.append(f"RCPT TO:<{recipient}>{self._rcpt_parameters(index)}")
            self._awaiting.append((_Step.RCPT, index))
        self.phase = Phase.ENVELOPE

        # RFC 2920 section 3.1: with PIPELINING, MAIL, the RCPTs and DATA go
        # in one group, DATA last (BDAT carries the content itself, so it
        # waits for the RCPT replies).  One round trip a message less.
        if "PIPELINING" in self._extensions:
            if "CHUNKING" not in self._extensions:
                commands.append("DATA")
                self._awaiting.append((_Step.DATA, -1))
            return [Send(b"".join(self._command(c).data for c in commands))]
        self._queued = commands[1:]
        return [self._command(commands[0])]

    def _check_capabilities(self) -> Reply | None:
        transaction = self._transaction
        extensions = self._extensions
        header, _ = _split_message(self._content)

        addresses = [*transaction.recipients]
        if transaction.reverse_path is not None:
            addresses.append(transaction.reverse_path)
        self._use_utf8 = "SMTPUTF8" in extensions and (
            transaction.smtputf8 or any(a.is_utf8 for a in addresses)
        )
        # RFC 6531 section 3.2: a non-ASCII address needs SMTPUTF8 at the peer,
        # and so does a message sent with SMTPUTF8 that has UTF-8 header fields.
        if "SMTPUTF8" not in extensions:
            if any(a.is_utf8 for a in addresses):
                return replies.NEEDS_SMTPUTF8
            if transaction.smtputf8 and has_8bit(header):
                return replies.NEEDS_UTF8_HEADERS

        self._body_parameter = ""
        if transaction.body is Body.BINARY:
            # RFC 3030 section 3: BINARYMIME only with CHUNKING.
            if "BINARYMIME" not in extensions or "CHUNKING" not in extensions:
                return replies.NEEDS_BINARYMIME
            self._body_parameter = "BINARYMIME"
        elif transaction.body is Body.EIGHT_BIT or has_8bit(self._content):
            # RFC 6152 section 3: 8-bit octets only to a peer with 8BITMIME.
            if "8BITMIME" in extensions:
                self._body_parameter = "8BITMIME"
            else:
                converted = to_quoted_printable(self._content)
                if converted is None:
                    return replies.NEEDS_8BITMIME
                self._content = converted

        if transaction.body is not Body.BINARY:
            self._content = normalise_line_endings(self._content)

        # RFC 1870 section 6.5: a message larger than the peer's SIZE would
        # be refused; do not send it.
        limit = extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and len(self._content) > int(limit):
            return replies.TOO_BIG_FOR_NEXT_HOP.with_text(
                f"{replies.TOO_BIG_FOR_NEXT_HOP.text} ({limit} octets)"
            )
        return None

    def _mail_parameters(self) -> str:
        parameters = ""
        if "SIZE" in self._extensions:
            parameters += f" SIZE={len(self._content)}"
        if self._body_parameter:
            parameters += f" BODY={self._body_parameter}"
        if self._use_utf8:
            parameters += " SMTPUTF8"
        # RFC 3461 section 4: DSN parameters go on only to a peer with DSN.
        if "DSN" in self._extensions:
            if self._transaction.ret:
                parameters += f" RET={self._transaction.ret}"
            if self._transaction.envid:
                parameters += f" ENVID={self._transaction.envid}"
        return parameters

    def _rcpt_parameters(self, index: int) -> str:
        transaction = self._transaction
        parameters = ""
        mailbox = transaction.mailbox[index] if transaction.mailbox else False
        if mailbox and "X-MAILX-MAILBOX" in self._extensions:
            parameters += " X-MAILX-MAILBOX"
        if "DSN" not in self._extensions:
            return parameters
        notify = transaction.notify[index] if transaction.notify else None
        if notify:
            # RFC 3461 section 4.1: NEVER alone, or the others in this order.
            order = ["NEVER", "SUCCESS", "FAILURE", "DELAY"]
            parameters += " NOTIFY=" + ",".join(w for w in order if w in notify)
        orcpt = transaction.orcpt[index] if transaction.orcpt else None
        if orcpt:
            parameters += f" ORCPT={orcpt}"
        return parameters

    def _on_envelope(self, reply: Reply) -> list[Action]:
        step, index = self._awaiting.pop(0)
        if step is _Step.MAIL:
            self._mail_reply = reply
        elif self._mail_reply is not None and self._mail_reply.is_positive:
            if reply.is_positive:
                self._accepted.append(index)
            else:
                self.outcome.replies[index] = reply

        actions: list[Action] = []
        if self._awaiting == [(_Step.DATA, -1)]:
            # Only the pipelined DATA is left unanswered: its timeout runs
            # (RFC 5321 section 4.5.3.2.3).
            self.phase = Phase.DATA
            return actions
        mail_ok = self._mail_reply is not None and self._mail_reply.is_positive
        if "PIPELINING" not in self._extensions and mail_ok and self._queued:
            actions.append(self._command(self._queued.pop(0)))
        if self._awaiting and (mail_ok or "PIPELINING" in self._extensions):
            return actions
        return self._envelope_done()

    def _envelope_done(self) -> list[Action]:
        assert self._mail_reply is not None
        if not self._mail_reply.is_positive:
            self.outcome.failure = self._mail_reply
            return self._quit()
        if not self._accepted:
            return self._quit()
        if "CHUNKING" in self._extensions:
            # RFC 3030 section 2: one chunk, marked LAST, carries the content.
            self.phase = Phase.CONTENT
            head = f"BDAT {len(self._content)} LAST\r\n".encode("ascii")
            return [StreamContent(self._bdat_blocks(head), self._one_block())]
        self.phase = Phase.DATA
        return [self._command("DATA")]

    def _bdat_blocks(self, head: bytes) -> Iterator[bytes]:
        yield head
        size = self._block_size
        for start in range(0, len(self._content), size):
            yield self._content[start : start + size]

    def _on_pipelined_data(self, reply: Reply) -> list[Action]:
        """The reply to DATA sent in the group with MAIL and the RCPTs."""
        assert self._mail_reply is not None
        accepted = self._mail_reply.is_positive and bool(self._accepted)
        if not self._mail_reply.is_positive:
            self.outcome.failure = self._mail_reply
        if reply.code == 354 and not accepted:
            # RFC 2920 section 3.1: the server took DATA though no recipient
            # was accepted; a lone dot ends the empty message.
            self.phase = Phase.CONTENT
            self._abandoned = True
            return [Send(b".\r\n")]
        if not accepted:
            return self._quit()
        return self._on_data(reply)

    def _on_data(self, reply: Reply) -> list[Action]:
        if self._awaiting:
            self._awaiting.pop(0)
            return self._on_pipelined_data(reply)
        if reply.code != 354:
            self._settle_accepted(reply)
            return self._quit()
        self.phase = Phase.CONTENT
        # _check_capabilities made every line ending CRLF (BINARYMIME, which
        # keeps them as they are, goes by BDAT).
        blocks = dot_stuffed_blocks(self._content, self._block_size, crlf_only=True)
        return [StreamContent(blocks, self._one_block())]

    def _one_block(self) -> bool:
        return len(self._content) <= self._block_size

    def _on_content(self, reply: Reply) -> list[Action]:
        if self._abandoned:
            return self._quit()
        self._settle_accepted(reply)
        # The next hop answered the message itself: what follows cannot
        # undo it (a refusal of DATA can still turn out to be out of step).
        self._settled = True
        if self._reuse and reply.is_positive:
            # RFC 5321 section 4.1.1.4: the transaction ended with this reply;
            # the next may start with MAIL.
            self.phase = Phase.IDLE
            return [Finish(self.outcome, keep_open=True)]
        return self._quit()

    def _settle_accepted(self, reply: Reply) -> None:
        # RFC 5321 section 3.3: the reply to the end of data applies to every
        # recipient whose RCPT was accepted.
        for index in self._accepted:
            self.outcome.replies[index] = reply


# RFC 5321 section 4.3.2 (RFC 3207 for STARTTLS, RFC 4954 for AUTH, RFC
# 3030 for BDAT, answered in CONTENT): the success and intermediate codes of
# the reply each phase waits for.
_PHASE_CODES: dict[Phase, frozenset[int]] = {
    Phase.GREETING: frozenset({220}),
    Phase.EHLO: frozenset({250}),
    Phase.TLS_EHLO: frozenset({250}),
    Phase.HELO: frozenset({250}),
    Phase.STARTTLS: frozenset({220}),
    Phase.AUTH: frozenset({235, 334}),
    Phase.DATA: frozenset({354}),
    Phase.CONTENT: frozenset({250}),
    Phase.QUIT: frozenset({221}),
}
_STEP_CODES: dict[_Step, frozenset[int]] = {
    _Step.MAIL: frozenset({250}),
    _Step.RCPT: frozenset({250, 251}),
    _Step.DATA: frozenset({354}),
}

# What each phase does with the reply it waits for; a phase not here (DONE)
# waits for none.  Made once: an Enum member hashes in Python, and a table
# built on every reply cost a twentieth of the reactor relaying (issue 7).
_REPLY_HANDLERS: dict[Phase, Callable[[ClientSession, Reply], list[Action]]] = {
    Phase.GREETING: ClientSession._on_greeting,
    Phase.EHLO: ClientSession._on_ehlo,
    Phase.TLS_EHLO: ClientSession._on_ehlo,
    Phase.HELO: ClientSession._on_helo,
    Phase.STARTTLS: ClientSession._on_starttls,
    Phase.AUTH: ClientSession._on_auth,
    Phase.ENVELOPE: ClientSession._on_envelope,
    Phase.DATA: ClientSession._on_data,
    Phase.CONTENT: ClientSession._on_content,
    Phase.QUIT: ClientSession._on_quit,
}


def _parse_extensions(reply: Reply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    # RFC 5321 section 4.1.1.1: the first line is the greeting, then one
    # extension per line, keyword first.
    for line in reply.text.split("\n")[1:]:
        keyword, _, parameters = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = parameters.strip()
    return extensions


def nothing_taken(outcome: SessionOutcome, last_reply: Reply | None) -> bool:
    """
    True when a transaction over a kept connection ended before the next hop
    answered any recipient: the connection closed first, or it answered 421
    (RFC 5321 section 3.8: the server is closing the channel).  The
    transaction may then go over another connection without a duplicate.
    """
    if outcome.failure is None or outcome.replies:
        return False
    return last_reply is None or last_reply.code == 421


class Scheduler(TypingProtocol):
    """The part of IReactorTime the adapter uses."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...


class _ContentProducer:
    """
    A pull producer that writes the content in blocks.

    Twisted resumes it once the connection's queue has drained, and a block
    written through the queue costs two ``epoll_ctl`` calls and a reactor
    turn.  So a block the kernel takes whole (``mailx.sendnow``) is followed
    by the next in the same call.  The first block it does not take whole,
    and the first past ``DIRECT_LIMIT`` octets, wait in the queue, and
    Twisted resumes the producer once they are sent: that bounds what one
    call sends, and keeps the octets in order.  (IPullProducer asks for one
    write a call; more are written only while the queue they would wait
    behind is empty.)  Relaying smtp-source's 200 KB messages to a sink on
    loopback, the reactor was asked to watch the connection for writing five
    times a message before, once after (issue 7).
    """

    def __init__(self, protocol: SMTPClientProtocol, blocks: Iterator[bytes]) -> None:
        self._protocol = protocol
        self._blocks = blocks
        self._stopped = False

    def resumeProducing(self) -> None:
        sent = 0
        while not self._stopped:
            block = next(self._blocks, None)
            if block is None:
                self._stopped = True
                self._protocol.content_written()
                return
            if sent >= DIRECT_LIMIT:
                self._protocol.block_written(block)
                return
            if not self._protocol.block_written(block, self):
                return
            sent += len(block)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._stopped = True


class SMTPClientProtocol(Protocol):
    """
    Connects a ``ClientSession`` to a transport, with per-phase timeouts.
    The TLS options are ``tls_options``, or what ``tls_options_factory``
    returns; it is called only when the session starts TLS, so a session
    with a peer that offers no STARTTLS never builds any.
    """

    def __init__(
        self,
        session: ClientSession,
        clock: Scheduler,
        timeouts: Timeouts,
        tls_options: Any = None,
        *,
        tls_options_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.session = session
        self.done: Deferred[SessionOutcome] = Deferred()
        self._clock = clock
        self._timeouts = timeouts
        self._tls_options = tls_options
        self._tls_options_factory = tls_options_factory
        self._timer: IDelayedCall | None = None
        self._producer: _ContentProducer | None = None

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # The content and its end-of-data line go out as two writes; with
            # Nagle's algorithm the second waits for the peer's delayed ACK
            # of the first (about 40 ms on Linux) on every message.
            self.transport.setTcpNoDelay(True)
        self._arm(self._timeouts.greeting)

    def dataReceived(self, data: bytes) -> None:
        before = self.session.last_reply
        actions = self.session.data_received(data)
        if not actions and self.session.last_reply is before:
            # Part of a reply: the phase's timer runs on, so a next hop that
            # trickles octets cannot hold the connection for ever.
            return
        self._perform(actions)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._producer is not None:
            self._producer.stopProducing()
        outcome = self.session.connection_lost()
        if not self.done.called:
            self.done.callback(outcome)

    def block_written(self, block: bytes, producer: object = None) -> bool:
        """
        The producer's hook: one block goes out, the block timer restarts.
        With ``producer``, the registered producer, the block is sent at once
        if nothing is queued; True when the kernel took all of it.
        """
        self._arm(self._timeouts.data_block)
        if producer is None:
            self.transport.write(block)  # type: ignore[union-attr]
            return False
        return write_now(self.transport, block, producer)

    def content_written(self) -> None:
        """The producer's hook: all blocks went out; wait for the final reply."""
        self.session.content_sent()
        self._producer = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._arm(self._timeouts.data_end)

    def _perform(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                write_now(self.transport, action.data)
            elif isinstance(action, StartTLS):
                options = self._tls_options
                if self._tls_options_factory is not None:
                    options = self._tls_options_factory()
                self.transport.startTLS(options)  # type: ignore[union-attr]
                self._perform(self.session.tls_started())
            elif isinstance(action, StreamContent) and action.one_block:
                # A message that small costs less in one write than through
                # the producer's round trips (benchmarks/README.md).
                write_now(self.transport, b"".join(action.blocks))
                self.session.content_sent()
            elif isinstance(action, StreamContent):
                self._producer = _ContentProducer(self, action.blocks)
                self.transport.registerProducer(  # type: ignore[union-attr]
                    self._producer, False
                )
            elif isinstance(action, Finish) and action.keep_open:
                # The connection waits for ``start_next`` or ``close``, unless
                # a Finish follows (the next hop closes it at once).
                self._disarm()
                if not self.done.called:
                    self.done.callback(action.outcome)
            elif isinstance(action, Finish):
                # ``done`` fires once the connection is closed.
                self._disarm()
                if self._producer is not None:
                    # In the middle of the content: the rest cannot go, and
                    # a next hop that stopped reading would hold a graceful
                    # close for ever.
                    self._producer.stopProducing()
                    self._producer = None
                    self.transport.unregisterProducer()  # type: ignore[union-attr]
                    self.transport.abortConnection()  # type: ignore[union-attr]
                    return
                self.transport.loseConnection()  # type: ignore[union-attr]
                # Bounded all the same: what is still queued may never drain.
                self._timer = self._clock.callLater(
                    self._timeouts.command,
                    self.transport.abortConnection,  # type: ignore[union-attr]
                )
                return
        waiting = self.session.phase not in (Phase.DONE, Phase.IDLE)
        if waiting and self._producer is None:
            self._arm(self._phase_timeout())
        elif self.session.phase is Phase.IDLE:
            self._disarm()

    @property
    def idle(self) -> bool:
        """Whether the connection is open and ready for another transaction."""
        return bool(self.connected) and self.session.phase is Phase.IDLE

    def start_next(self, transaction: Transaction) -> Deferred[SessionOutcome]:
        """Send another transaction over this idle connection."""
        self.done = Deferred()
        self._perform(self.session.next_transaction(transaction))
        return self.done

    def close(self) -> Deferred[SessionOutcome]:
        """QUIT an idle connection; fire once it is closed."""
        if not self.idle:
            return succeed(self.session.outcome)
        self.done = Deferred()
        self._perform(self.session.close())
        return self.done

    def _phase_timeout(self) -> float:
        phase = self.session.phase
        if phase is Phase.DATA:
            return self._timeouts.data_init
        if phase is Phase.CONTENT:
            return self._timeouts.data_end
        if phase is Phase.ENVELOPE:
            return self._timeouts.rcpt
        return self._timeouts.command

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            # Moved, not replaced: a reset costs less than a cancel and a
            # new call (issue 7).
            self._timer.reset(seconds)
            return
        self._timer = self._clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.session.timed_out()
        self.transport.abortConnection()  # type: ignore[union-attr]
