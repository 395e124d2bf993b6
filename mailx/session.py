"""
The server side of an SMTP session (RFC 5321) as a state machine.

Theory of operation
-------------------
``Session.data_received`` takes octets from the client and produces replies
through a ``SessionOutput`` (write, start TLS, close).  The session owns no
socket and no clock: the Twisted protocol in ``mailx.protocol`` feeds it and
times it out.  Decisions that may take time (the policy's MAIL and RCPT
answers, storing a message) are Deferreds; while one is pending the session
reads no further input, so pipelined commands (RFC 2920) are answered in
order, one reply each, and replies produced while handling one batch of input
are written together.

The input is read in one of three modes:

- command lines, each ended by CRLF only, at most 512 octets
  (RFC 5321 section 4.5.3.1.4);
- message text after DATA's 354, ended only by CRLF "." CRLF
  (RFC 5321 section 4.1.1.4), with dot-stuffing undone (section 4.5.2);
- BDAT chunks, read as exactly the announced number of octets (RFC 3030).

The two message readers are in ``mailx.text``.  A bare CR or LF never ends
a command or a message.  Message text that holds
one is rejected after its end (554 5.6.11), as is a text line over 1000
octets (554 5.6.0, section 4.5.3.1.6): the reply comes only at the real end
of the message, so nothing in the body is ever read as a command.

The transaction states, and the commands each accepts (every other command
in a state gets 503, with the reason):

=========  ==================================================================
INITIAL    EHLO HELO; NOOP RSET VRFY HELP QUIT
READY      MAIL AUTH STARTTLS; as INITIAL
MAIL       RCPT; as READY but MAIL and AUTH
RCPT       RCPT DATA BDAT; as MAIL
BDAT       BDAT; NOOP RSET HELP QUIT (a chunked transfer is under way)
=========  ==================================================================

A finished TLS handshake puts the session back in INITIAL (RFC 3207 section
4.2); STARTTLS there is refused as TLS is already active.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailx import replies
from mailx.address import Address, AddressError, parse_forward_path, parse_reverse_path
from mailx.envelope import (
    Body,
    ClientInfo,
    Envelope,
    MessageSink,
    Policy,
    Recipient,
    RecipientDecision,
    Route,
)
from mailx.ids import new_message_id
from mailx.maillog import maillog, printable
from mailx.replies import Reply, ReplyError
from mailx.text import Chunks, DataReader, check_text

# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with CRLF.
MAX_COMMAND_LINE = 512
# RFC 4954 section 4: a SASL response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288

# A policy answer: a Reply for MAIL, a RecipientDecision for RCPT.
_A = TypeVar("_A")

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
# The Received header a worker process put first (see _received_header).
_WORKER_TRACE = re.compile(
    rb"Received: from (\S+) \(\[(?:IPv6:)?([^\]\s]+)\]\)\r\n"
    rb"\tby \S+ \(mailx\) with \S+ id (\w+)"
)
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


class State(enum.Enum):
    INITIAL = "initial"
    READY = "ready"
    MAIL = "mail"
    RCPT = "rcpt"
    BDAT = "bdat"


class Mode(enum.Enum):
    """How the next input octets are read."""

    COMMAND = "command"
    DATA = "data"
    CHUNK = "chunk"
    AUTH = "auth"
    # After STARTTLS's 220, until the handshake: input is discarded.
    TLS_HANDSHAKE = "tls-handshake"
    CLOSED = "closed"


class SessionOutput(Protocol):
    """What the session asks of its transport."""

    def write(self, data: bytes) -> None: ...

    def start_tls(self) -> None: ...

    def close(self) -> None: ...


class Authenticator(Protocol):
    """Checks SASL credentials; fires with the user name, or None if refused."""

    def authenticate(
        self, client: ClientInfo, user: str, password: str
    ) -> Deferred[str | None]: ...


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    max_message_size: int = 10240000
    max_recipients: int = 100
    max_errors: int = 20
    max_hops: int = 50
    # Offer STARTTLS (a certificate is configured and TLS is not yet active).
    tls_available: bool = False
    # Submission (RFC 6409): MAIL only after AUTH.
    require_auth: bool = False
    # Add the Received header and count hops, and log the connection and the
    # message as accepted; not on the handoff from a worker process, which
    # did all of it for its client (mailx.workers).
    add_trace: bool = True


# mailx's own RCPT parameter, offered on the hand-off listener only
# (mailx.workers): the recipient is one Maildir here, as a worker resolved it.
HANDOFF_MAILBOX = "X-MAILX-MAILBOX"


class Session:
    """One SMTP session, from greeting to close."""

    def __init__(
        self,
        config: SessionConfig,
        client: ClientInfo,
        policy: Policy,
        sink: MessageSink,
        output: SessionOutput,
        clock: Callable[[], float],
        authenticator: Authenticator | None = None,
        new_id: Callable[[], str] = new_message_id,
    ) -> None:
        self.config = config
        self.client = client
        self.policy = policy
        self.sink = sink
        self.output = output
        self.clock = clock
        self.authenticator = authenticator
        self.new_id = new_id

        self.state = State.INITIAL
        self.mode = Mode.COMMAND
        self.envelope: Envelope | None = None
        self.errors = 0
        # Counts command lines read (and messages ended); the idle timer
        # restarts when it grows.
        self.commands = 0
        self.busy = False
        self.paused = False
        # Shut down (SIGTERM) while busy: 421 once the wait is over.
        self._shut_down_after_wait = False
        self._buffer = bytearray()
        self._pending_output: list[bytes] = []
        self._overlong_command = False
        self._reader: DataReader | None = None
        self._chunks: Chunks | None = None
        self._chunk_remaining = 0
        self._chunk_last = False
        self._chunk_discard = False
        self._auth_mechanism = ""
        self._auth_user = ""
        self._chunk_refusal = replies.BAD_SEQUENCE
        self._processing = False
        self._closing = False
        self._lost = False

    # -- The transport's side ---------------------------------------------

    def connection_made(self) -> None:
        if self.config.add_trace:
            maillog.info(
                "connect from [{client_address}]:{client_port}",
                client_address=self.client.address,
                client_port=self.client.port,
            )
        self._reply(replies.greeting(self.config.hostname))
        self._flush()

    def connection_lost(self) -> None:
        self.mode = Mode.CLOSED
        self._lost = True
        if self.config.add_trace:
            maillog.info(
                "disconnect from [{client_address}]:{client_port}",
                client_address=self.client.address,
                client_port=self.client.port,
            )

    def tls_started(self) -> None:
        """The handshake finished: RFC 3207 section 4.2, start over."""
        self.client.tls = True
        self.client.helo = None
        self.client.esmtp = False
        self._reset_transaction()
        self.state = State.INITIAL
        self.mode = Mode.COMMAND
        self._buffer.clear()

    def timed_out(self) -> None:
        """The idle timer fired (RFC 5321 section 4.5.3.2.7)."""
        self._close_with(replies.IDLE_TIMEOUT)
        self._flush()

    def shutting_down(self) -> None:
        if self.busy:
            # A message being stored (or a check under way) gets its answer
            # first: a 421 now would have the client send again a message
            # that is then stored all the same.
            self._shut_down_after_wait = True
            return
        self._close_with(replies.SHUTTING_DOWN)
        self._flush()

    def pause(self) -> None:
        """Answer nothing more until resume(): the client is not reading."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if not self._processing:
            self._process()

    @property
    def receiving_message(self) -> bool:
        """Message text (DATA or a BDAT chunk) is being read."""
        return self.mode is Mode.DATA or self.mode is Mode.CHUNK

    @property
    def unread(self) -> int:
        """Octets received and not yet read."""
        return len(self._buffer)

    def data_received(self, data: bytes) -> None:
        if self.mode is Mode.TLS_HANDSHAKE or self.mode is Mode.CLOSED:
            return
        self._buffer += data
        self._process()

    # -- Reading input ----------------------------------------------------

    def _process(self) -> None:
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        self._flush()

    def _process_buffer(self) -> None:
        while (
            not self.busy
            and not self.paused
            and self._buffer
            and self.mode is not Mode.CLOSED
        ):
            if self.mode is Mode.COMMAND or self.mode is Mode.AUTH:
                if not self._read_line():
                    break
            elif self.mode is Mode.DATA:
                if not self._read_data():
                    break
            elif self.mode is Mode.CHUNK:
                self._read_chunk()
            else:
                self._buffer.clear()

    def _read_line(self) -> bool:
        limit = MAX_AUTH_LINE if self.mode is Mode.AUTH else MAX_COMMAND_LINE
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > limit:
                # Keep the last octet: it may be the CR of the ending CRLF.
                self._overlong_command = True
                del self._buffer[:-1]
            return False
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        self.commands += 1
        if self._overlong_command or len(line) + 2 > limit:
            self._overlong_command = False
            self.mode = Mode.COMMAND
            self._error(replies.LINE_TOO_LONG)
            return True
        if self.mode is Mode.AUTH:
            self._auth_continue(line)
        else:
            self._command(line)
        return True

    def _read_data(self) -> bool:
        assert self._reader is not None
        consumed, ended = self._reader.feed(self._buffer)
        del self._buffer[:consumed]
        if ended:
            self.commands += 1
            reader, self._reader = self._reader, None
            self.mode = Mode.COMMAND
            failure = reader.failure()
            if failure is not None:
                self._reject_message(failure)
            else:
                self._message_complete(b"".join(reader.parts))
        return ended

    def _read_chunk(self) -> None:
        taken = bytes(self._buffer[: self._chunk_remaining])
        del self._buffer[: len(taken)]
        self._chunk_remaining -= len(taken)
        if not self._chunk_discard and self._chunks is not None:
            self._chunks.add(taken)
        if self._chunk_remaining == 0:
            self.commands += 1
            self.mode = Mode.COMMAND
            self._chunk_complete()

    # -- Replies ----------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        self._pending_output.append(reply.to_bytes())

    def _flush(self) -> None:
        if self._pending_output and not self._lost:
            self.output.write(b"".join(self._pending_output))
        self._pending_output.clear()
        if self._closing and not self._lost:
            self._lost = True
            self.output.close()

    def _close_with(self, reply: Reply) -> None:
        self._reply(reply)
        self.mode = Mode.CLOSED
        self._closing = True
        self._buffer.clear()

    def _error(self, reply: Reply) -> None:
        """A reply to a command in error; too many end the session."""
        self._reply(reply)
        self.errors += 1
        if self.errors >= self.config.max_errors:
            self._close_with(replies.TOO_MANY_ERRORS)

    def _wait(self) -> None:
        """Read no input until a pending Deferred fires and calls _resume."""
        self.busy = True

    def _resume(self) -> None:
        self.busy = False
        if self._shut_down_after_wait:
            self._shut_down_after_wait = False
            self._close_with(replies.SHUTTING_DOWN)
            self._flush()
            return
        # A Deferred that fired at once resumes the loop already running.
        if not self._processing:
            self._process()

    # -- Commands ---------------------------------------------------------

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(replies.SYNTAX_ERROR.with_text("Command is not valid UTF-8"))
            return
        if "\r" in text or "\n" in text:
            self._error(replies.SYNTAX_ERROR.with_text("Bare CR or LF in command"))
            return
        verb, _, argument = text.partition(" ")
        handler = _HANDLERS.get(verb.upper())
        if handler is None:
            self._error(replies.UNRECOGNIZED)
            return
        if self.state is State.BDAT and verb.upper() not in _DURING_BDAT:
            self._error(replies.BDAT_IN_PROGRESS.with_text("BDAT transfer in progress"))
            return
        handler(self, argument)

    def _ehlo(self, argument: str) -> None:
        self._helo_common(argument, esmtp=True)

    def _helo(self, argument: str) -> None:
        self._helo_common(argument, esmtp=False)

    def _helo_common(self, argument: str, esmtp: bool) -> None:
        name = argument.strip()
        if not name or " " in name:
            self._error(replies.SYNTAX_ERROR.with_text("EHLO/HELO needs a domain"))
            return
        # RFC 5321 section 4.1.4: EHLO resets the state as RSET does.
        self._reset_transaction()
        self.client.helo = name
        self.client.esmtp = esmtp
        self.state = State.READY
        # RFC 5321 section 4.2: a reply's text is printable ASCII (and HT);
        # the name is echoed so, whatever octets the client sent.
        shown = name
        if not (name.isascii() and name.isprintable()):
            shown = "".join(c if " " <= c <= "~" else "?" for c in name)
        greeting = f"{self.config.hostname} greets {shown}"
        if not esmtp:
            self._reply(replies.Reply(250, "", greeting))
            return
        self._reply(replies.Reply(250, "", "\n".join([greeting, *self._extensions()])))

    def _extensions(self) -> list[str]:
        extensions = [
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "BINARYMIME",
            "SMTPUTF8",
            "DSN",
        ]
        if self.config.tls_available and not self.client.tls:
            extensions.append("STARTTLS")
        if self._auth_offered():
            extensions.append("AUTH PLAIN LOGIN")
        if not self.config.add_trace:
            extensions.append(HANDOFF_MAILBOX)
        return extensions

    def _auth_offered(self) -> bool:
        return (
            self.authenticator is not None
            and self.client.tls
            and self.client.authenticated_as is None
        )

    def _mail(self, argument: str) -> None:
        if self.state is State.INITIAL:
            self._error(replies.HELO_FIRST)
            return
        if self.state is not State.READY:
            self._error(replies.NESTED_MAIL)
            return
        if self.config.require_auth and self.client.authenticated_as is None:
            written = _written_path(argument, "FROM:")
            self._log_reject("MAIL", replies.AUTH_REQUIRED, written, [])
            self._error(replies.AUTH_REQUIRED)
            return
        path = _argument_after(argument, "FROM:")
        if path is None:
            self._error(replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>"))
            return
        try:
            parsed = parse_reverse_path(path, utf8=False)
            envelope = self._envelope_from(parsed.address, parsed.parameters)
        except AddressError as error:
            written = _written_path(argument, "FROM:")
            self._log_reject("MAIL", error.reply, written, [])
            self._error(error.reply)
            return
        if not self.client.esmtp and parsed.parameters:
            self._error(replies.UNKNOWN_PARAMETER)
            return

        def answered(reply: Reply) -> None:
            if reply.is_positive:
                self.envelope = envelope
                self.state = State.MAIL
                self._reply(reply)
            else:
                self._log_reject("MAIL", reply, envelope.reverse_path, [])
                self._error(reply)

        self._after_policy(
            self.policy.check_sender(self.client, envelope.reverse_path), answered
        )

    def _envelope_from(
        self, reverse_path: Address | None, parameters: dict[str, str | None]
    ) -> Envelope:
        envelope = Envelope(reverse_path=reverse_path, client=self.client)
        for keyword, value in parameters.items():
            if keyword == "SIZE":
                # RFC 1870 section 6: refuse at once a message declared too big.
                if value is None or not value.isdigit():
                    raise AddressError(replies.SYNTAX_ERROR.with_text("Bad SIZE value"))
                envelope.declared_size = int(value)
                if envelope.declared_size > self.config.max_message_size:
                    raise AddressError(replies.SIZE_EXCEEDED)
            elif keyword == "BODY":
                bodies = {body.value: body for body in Body}
                if value is None or value.upper() not in bodies:
                    raise AddressError(replies.SYNTAX_ERROR.with_text("Bad BODY value"))
                envelope.body = bodies[value.upper()]
            elif keyword == "SMTPUTF8" and value is None:
                envelope.smtputf8 = True
            elif keyword == "RET" and value is not None:
                # RFC 3461 section 4.3.
                if value.upper() not in ("FULL", "HDRS"):
                    raise AddressError(replies.SYNTAX_ERROR.with_text("Bad RET value"))
                envelope.ret = value.upper()
            elif keyword == "ENVID" and value is not None:
                # RFC 3461 section 4.4: xtext, at most 100 characters.
                if len(value) > 100 or not _XTEXT.fullmatch(value):
                    raise AddressError(replies.SYNTAX_ERROR.with_text("Bad ENVID"))
                envelope.envid = value
            elif keyword == "AUTH":
                # RFC 4954 section 5: accepted, and not trusted.
                continue
            else:
                raise AddressError(replies.UNKNOWN_PARAMETER)
        if reverse_path is not None and reverse_path.is_utf8 and not envelope.smtputf8:
            raise AddressError(replies.UTF8_NOT_REQUESTED)
        return envelope

    def _rcpt(self, argument: str) -> None:
        if self.state is State.INITIAL or self.state is State.READY:
            self._error(replies.MAIL_FIRST)
            return
        envelope = self.envelope
        assert envelope is not None
        path = _argument_after(argument, "TO:")
        if path is None:
            self._error(replies.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>"))
            return
        try:
            parsed = parse_forward_path(path, utf8=envelope.smtputf8)
            parameters = dict(parsed.parameters)
            mailbox = not self.config.add_trace and HANDOFF_MAILBOX in parameters
            if mailbox:
                del parameters[HANDOFF_MAILBOX]
            notify, orcpt = _dsn_parameters(parameters)
        except AddressError as error:
            # Logged, so that a client probing with odd paths is seen.
            written = _written_path(argument, "TO:")
            self._log_reject("RCPT", error.reply, envelope.reverse_path, written)
            self._error(error.reply)
            return
        forward_path = parsed.address
        assert forward_path is not None
        if _named_already(envelope, forward_path):
            # The same recipient again (the domain in other case, or with a
            # trailing dot): accepted, and given one copy, as Postfix and
            # sendmail do; RFC 5321 neither asks for nor forbids two.
            self.state = State.RCPT
            self._reply(replies.RECIPIENT_OK)
            return
        # RFC 5321 section 4.5.3.1.8: at least 100 recipients; 452 beyond.
        if len(envelope.recipients) >= self.config.max_recipients:
            self._log_reject(
                "RCPT",
                replies.TOO_MANY_RECIPIENTS,
                envelope.reverse_path,
                [forward_path],
            )
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return
        if mailbox:
            # A worker resolved it to one of its Maildirs: written there as
            # named, neither checked nor expanded again (mailx.router).
            envelope.recipients.append(
                Recipient(forward_path, Route.MAILBOX, notify, orcpt)
            )
            self.state = State.RCPT
            self._reply(replies.RECIPIENT_OK)
            return

        def answered(decision: RecipientDecision) -> None:
            if decision.reply.is_positive and decision.route is not None:
                envelope.recipients.append(
                    Recipient(forward_path, decision.route, notify, orcpt)
                )
                self.state = State.RCPT
                self._reply(decision.reply)
            else:
                self._log_reject(
                    "RCPT", decision.reply, envelope.reverse_path, [forward_path]
                )
                self._error(decision.reply)

        self._after_policy(
            self.policy.check_recipient(
                self.client, envelope.reverse_path, forward_path
            ),
            answered,
        )

    def _after_policy(
        self, answer: _A | Deferred[_A], answered: Callable[[_A], None]
    ) -> None:
        """Act on the policy's answer: at once, or when its look-up is done."""
        if not isinstance(answer, Deferred):
            try:
                answered(answer)
            except Exception:
                # As a failure in a Deferred's callback would be: a 451.
                self._policy_failed(Failure())
            return
        self._wait()
        answer.addCallback(answered)
        answer.addErrback(self._policy_failed)
        answer.addBoth(lambda _: self._resume())

    def _policy_failed(self, failure: Failure) -> None:
        maillog.failure("policy check failed", failure)
        self._reply(replies.LOCAL_ERROR)

    def _data(self, argument: str) -> None:
        if argument.strip():
            self._error(replies.SYNTAX_ERROR.with_text("DATA takes no argument"))
            return
        if self.state is State.INITIAL or self.state is State.READY:
            self._error(replies.MAIL_FIRST)
            return
        if self.state is State.MAIL:
            self._error(replies.RCPT_FIRST)
            return
        assert self.envelope is not None
        if self.envelope.body is Body.BINARY:
            self._error(replies.BINARY_NEEDS_BDAT)
            return
        self._reply(replies.START_DATA)
        self._reader = DataReader(self.config.max_message_size)
        self.mode = Mode.DATA

    def _bdat(self, argument: str) -> None:
        words = argument.split()
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not words or len(words) > 2 or (len(words) == 2 and not last):
            self._error(replies.SYNTAX_ERROR.with_text("Syntax: BDAT size [LAST]"))
            return
        if not words[0].isdigit():
            self._error(replies.SYNTAX_ERROR.with_text("BDAT size must be a number"))
            return
        size = int(words[0])
        if size > self.config.max_message_size:
            # RFC 3030 section 2 would have the chunk read and dropped; one
            # larger than any message we accept is not worth reading.
            reverse_path = self.envelope.reverse_path if self.envelope else None
            self._log_reject("BDAT", replies.CHUNK_TOO_BIG, reverse_path, [])
            self._close_with(replies.CHUNK_TOO_BIG)
            return
        # RFC 3030 section 2: the chunk is read even when the command fails.
        self._chunk_remaining = size
        self._chunk_last = last
        self._chunk_discard = False
        if self.state in (State.INITIAL, State.READY):
            self._chunk_discard = True
            self._chunk_refusal = replies.MAIL_FIRST
        elif self.state is State.MAIL:
            self._chunk_discard = True
            self._chunk_refusal = replies.RCPT_FIRST
        elif self._chunks is None:
            self._chunks = Chunks(self.config.max_message_size)
            self.state = State.BDAT
        if self._chunk_remaining:
            self.mode = Mode.CHUNK
        else:
            self._chunk_complete()

    def _chunk_complete(self) -> None:
        if self._chunk_discard:
            self._error(self._chunk_refusal)
            return
        chunks = self._chunks
        assert chunks is not None
        if chunks.too_big:
            # RFC 3030 section 2: a failed chunk ends the transaction.
            self._reject_message(replies.SIZE_EXCEEDED)
            return
        if not self._chunk_last:
            self._reply(replies.Reply(250, "2.0.0", f"{chunks.size} octets received"))
            return
        content = b"".join(chunks.parts)
        assert self.envelope is not None
        if self.envelope.body is not Body.BINARY:
            failure = check_text(content)
            if failure is not None:
                self._reject_message(failure)
                return
            if content and not content.endswith(b"\r\n"):
                content += b"\r\n"
        self._message_complete(content)

    def _rset(self, argument: str) -> None:
        self._reset_transaction()
        if self.state is not State.INITIAL:
            self.state = State.READY
        self._reply(replies.RESET_OK)

    def _noop(self, argument: str) -> None:
        self._reply(replies.NOOP_OK)

    def _quit(self, argument: str) -> None:
        self._close_with(replies.closing(self.config.hostname))

    def _vrfy(self, argument: str) -> None:
        # RFC 5321 section 3.5.3: 252 when we will not say.
        self._reply(replies.CANNOT_VERIFY)

    def _help(self, argument: str) -> None:
        commands = "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
        if self.config.tls_available and not self.client.tls:
            commands += " STARTTLS"
        if self._auth_offered():
            commands += " AUTH"
        self._reply(replies.HELP.with_text(f"Commands: {commands}\nSee RFC 5321"))

    def _expn(self, argument: str) -> None:
        self._reply(replies.NOT_IMPLEMENTED)

    def _starttls(self, argument: str) -> None:
        if self.client.tls:
            self._error(replies.TLS_ALREADY)
            return
        if not self.config.tls_available:
            self._error(replies.NOT_IMPLEMENTED)
            return
        # RFC 3207 section 4: STARTTLS is an EHLO extension, issued after EHLO.
        if self.state is State.INITIAL:
            self._error(replies.HELO_FIRST)
            return
        if argument.strip():
            self._error(replies.SYNTAX_ERROR.with_text("STARTTLS takes no argument"))
            return
        self._reply(replies.READY_FOR_TLS)
        # RFC 3207 section 4.2: whatever followed the command is discarded.
        self._buffer.clear()
        self.mode = Mode.TLS_HANDSHAKE
        self._flush()
        self.output.start_tls()

    # -- AUTH (RFC 4954) ----------------------------------------------------

    def _auth(self, argument: str) -> None:
        if self.authenticator is None:
            self._error(replies.NOT_IMPLEMENTED)
            return
        if not self.client.tls:
            self._log_reject("AUTH", replies.ENCRYPTION_REQUIRED, None, [])
            self._error(replies.ENCRYPTION_REQUIRED)
            return
        if self.client.authenticated_as is not None:
            self._error(replies.BAD_SEQUENCE.with_text("Already authenticated"))
            return
        if self.state is not State.READY:
            self._error(replies.BAD_SEQUENCE.with_text("AUTH not allowed now"))
            return
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            self._error(replies.AUTH_MECHANISM_UNKNOWN)
            return
        self._auth_mechanism = mechanism
        self._auth_user = ""
        if initial:
            self._auth_continue(initial.encode("ascii", "replace"))
            return
        self.mode = Mode.AUTH
        prompt = "" if mechanism == "PLAIN" else "VXNlcm5hbWU6"
        self._reply(replies.Reply(334, "", prompt))

    def _auth_continue(self, line: bytes) -> None:
        self.mode = Mode.COMMAND
        if line == b"*":
            self._error(replies.AUTH_CANCELLED)
            return
        try:
            decoded = base64.b64decode(line, validate=True) if line != b"=" else b""
            text = decoded.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            self._error(replies.AUTH_MALFORMED)
            return
        if self._auth_mechanism == "LOGIN" and not self._auth_user:
            if not text:
                self._error(replies.AUTH_MALFORMED)
                return
            self._auth_user = text
            self.mode = Mode.AUTH
            self._reply(replies.Reply(334, "", "UGFzc3dvcmQ6"))
            return
        if self._auth_mechanism == "LOGIN":
            user, password = self._auth_user, text
        else:
            # RFC 4616 section 2: authzid NUL authcid NUL passwd.
            fields = text.split("\0")
            if len(fields) != 3 or not fields[1]:
                self._error(replies.AUTH_MALFORMED)
                return
            authzid, user, password = fields
            if authzid and authzid != user:
                self._error(replies.AUTH_FAILED)
                return
        self._check_credentials(user, password)

    def _check_credentials(self, user: str, password: str) -> None:
        assert self.authenticator is not None
        deferred = self.authenticator.authenticate(self.client, user, password)
        self._wait()

        def answered(authenticated: str | None) -> None:
            if authenticated is None:
                maillog.info(
                    "auth failed from [{client_address}]:{client_port}"
                    " mechanism={mechanism}",
                    client_address=self.client.address,
                    client_port=self.client.port,
                    mechanism=self._auth_mechanism,
                )
                self._error(replies.AUTH_FAILED)
                return
            self.client.authenticated_as = authenticated
            maillog.info(
                "auth ok from [{client_address}]:{client_port} user={user}",
                client_address=self.client.address,
                client_port=self.client.port,
                user=authenticated,
            )
            self._reply(replies.AUTH_OK)

        deferred.addCallback(answered)
        deferred.addErrback(self._policy_failed)
        deferred.addBoth(lambda _: self._resume())

    # -- Ending a message ---------------------------------------------------

    def _reject_message(self, reply: Reply) -> None:
        envelope = self.envelope
        recipients = [] if envelope is None else envelope.recipients
        # The command that carried the message: DATA, or BDAT (RFC 3030).
        command = "DATA" if self._chunks is None else "BDAT"
        self._log_reject(
            command,
            reply,
            envelope.reverse_path if envelope else None,
            [r.address for r in recipients],
        )
        self._reset_transaction()
        self.state = State.READY
        self._error(reply)

    def _message_complete(self, content: bytes) -> None:
        envelope = self.envelope
        assert envelope is not None
        header_end = content.find(b"\r\n\r\n")
        header = content if header_end < 0 else content[: header_end + 2]
        # RFC 5321 section 6.3: too many Received headers means a loop.
        trace = self.config.add_trace
        if trace and len(_RECEIVED.findall(header)) >= self.config.max_hops:
            self._reject_message(replies.TOO_MANY_HOPS)
            return

        envelope.message_id = self.new_id()
        envelope.received_at = self.clock()
        if trace:
            content = self._received_header(envelope) + content
        else:
            _take_over_trace(envelope, content)
        self._reset_transaction()
        self.state = State.READY

        deferred = self.sink.receive(envelope, content)
        self._wait()

        def stored(reply: Reply) -> None:
            if reply.is_positive and not trace:
                # A worker's hand-off: the worker logs it as accepted.
                reply = reply.with_text(f"{reply.text} queued as {envelope.message_id}")
            elif reply.is_positive:
                client = envelope.client or self.client
                maillog.info(
                    "{message_id}: accepted from=<{sender}> nrcpt={nrcpt} "
                    "size={size} client=[{client_address}]:{client_port}",
                    message_id=envelope.message_id,
                    sender=_path_text(envelope.reverse_path),
                    nrcpt=len(envelope.recipients),
                    size=len(content),
                    client_address=client.address,
                    client_port=client.port,
                )
                reply = reply.with_text(f"{reply.text} queued as {envelope.message_id}")
            else:
                recipients = [r.address for r in envelope.recipients]
                self._log_reject("DATA", reply, envelope.reverse_path, recipients)
            self._reply(reply)

        def failed(failure: Failure) -> None:
            if failure.check(ReplyError):
                # The store said why (a full disk, an agent that ended) and
                # logged the details: no traceback for what it expected.
                error = failure.value
                assert isinstance(error, ReplyError)
                cause = error.__cause__
                maillog.error(
                    "{message_id}: not stored ({reason}): {reply}",
                    message_id=envelope.message_id,
                    reason=str(cause) if cause is not None else "refused",
                    reply=str(error.reply),
                )
                self._reply(error.reply)
                return
            maillog.failure(
                "{message_id}: storing failed", failure, message_id=envelope.message_id
            )
            self._reply(replies.STORAGE_FAILED)

        deferred.addCallbacks(stored, failed)
        deferred.addBoth(lambda _: self._resume())

    def _received_header(self, envelope: Envelope) -> bytes:
        """The trace header of RFC 5321 section 4.4, with RFC 3848's protocol."""
        protocol = "ESMTP" if self.client.esmtp else "SMTP"
        if envelope.smtputf8:
            protocol = "UTF8SMTP"
        if self.client.tls:
            protocol += "S"
        if self.client.authenticated_as is not None:
            protocol += "A"
        literal = _address_literal(self.client.address)
        lines = [
            f"Received: from {printable(self.client.helo or '')} ({literal})",
            f"\tby {self.config.hostname} (mailx) with {protocol}"
            f" id {envelope.message_id}",
        ]
        if len(envelope.recipients) == 1:
            lines.append(f"\tfor <{envelope.recipients[0].address}>")
        lines[-1] += f"; {_date_time(int(envelope.received_at))}"
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _reset_transaction(self) -> None:
        self.envelope = None
        self._reader = None
        self._chunks = None

    def _log_reject(
        self,
        command: str,
        reply: Reply,
        reverse_path: Address | str | None,
        forward_paths: list[Address] | str,
    ) -> None:
        """
        A path given as text is logged as the client wrote it, unparsed.
        Only what the refused command had is named: no recipient before
        RCPT, no sender for AUTH, rather than an empty ``<>`` that reads as
        the null reverse path.
        """
        if isinstance(reverse_path, str):
            sender = reverse_path
        else:
            sender = _path_text(reverse_path)
        if isinstance(forward_paths, str):
            recipient = forward_paths
        else:
            recipient = ">,<".join(str(path) for path in forward_paths)
        fields = {
            "command": command,
            "client_address": self.client.address,
            "client_port": self.client.port,
            "reply": str(reply),
            "sender": sender,
            "recipient": recipient,
        }
        if command == "AUTH":
            maillog.info(
                "reject: {command} from [{client_address}]:{client_port}: {reply}",
                **fields,
            )
        elif not forward_paths:
            maillog.info(
                "reject: {command} from [{client_address}]:{client_port}: {reply};"
                " from=<{sender}>",
                **fields,
            )
        else:
            maillog.info(
                "reject: {command} from [{client_address}]:{client_port}: {reply};"
                " from=<{sender}> to=<{recipient}>",
                **fields,
            )


def _take_over_trace(envelope: Envelope, content: bytes) -> None:
    """
    On the handoff from a worker (mailx.workers), keep the queue id its
    client was given and the client's address, from the worker's trace.
    """
    match = _WORKER_TRACE.match(content)
    if match is None:
        return
    helo, address, message_id = (
        part.decode("ascii", "replace") for part in match.groups()
    )
    envelope.message_id = message_id
    envelope.client = ClientInfo(address=address, port=0, helo=helo, listener="worker")


def _written_path(argument: str, keyword: str) -> str:
    """
    The path of a MAIL or RCPT argument as written, without its brackets and
    parameters: what the log names when a path is refused unparsed.
    """
    path = (_argument_after(argument, keyword) or "").split(" ", 1)[0]
    return path.removeprefix("<").removesuffix(">")


def _named_already(envelope: Envelope, forward_path: Address) -> bool:
    """Is ``forward_path`` one of the envelope's recipients already?  Local
    parts compare as written (RFC 5321 section 2.4), domains without case or
    a trailing dot."""
    key = (forward_path.local_part, forward_path.domain_key.removesuffix("."))
    return any(
        (r.address.local_part, r.address.domain_key.removesuffix(".")) == key
        for r in envelope.recipients
    )


def _argument_after(argument: str, keyword: str) -> str | None:
    """The text after ``FROM:`` or ``TO:``, case-insensitive."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    # A space after the colon is not in the grammar but is widely sent.
    return argument[len(keyword) :].lstrip(" ")


def _dsn_parameters(
    parameters: dict[str, str | None],
) -> tuple[frozenset[str] | None, str | None]:
    """RCPT's NOTIFY and ORCPT (RFC 3461 sections 4.1 and 4.2)."""
    notify: frozenset[str] | None = None
    orcpt: str | None = None
    for keyword, value in parameters.items():
        if keyword == "NOTIFY" and value is not None:
            words = frozenset(word.upper() for word in value.split(","))
            allowed = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
            if not words <= allowed or ("NEVER" in words and len(words) > 1):
                raise AddressError(replies.SYNTAX_ERROR.with_text("Bad NOTIFY value"))
            notify = words
        elif keyword == "ORCPT" and value is not None:
            addr_type, semicolon, address = value.partition(";")
            if not semicolon or not addr_type or not _XTEXT.fullmatch(address):
                raise AddressError(replies.SYNTAX_ERROR.with_text("Bad ORCPT value"))
            orcpt = value
        else:
            raise AddressError(replies.UNKNOWN_PARAMETER)
    return notify, orcpt


def _address_literal(address: str) -> str:
    return f"[IPv6:{address}]" if ":" in address else f"[{address}]"


def _path_text(address: Address | None) -> str:
    return "" if address is None else str(address)


_HANDLERS: dict[str, Callable[[Session, str], None]] = {
    "EHLO": Session._ehlo,
    "HELO": Session._helo,
    "MAIL": Session._mail,
    "RCPT": Session._rcpt,
    "DATA": Session._data,
    "BDAT": Session._bdat,
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "QUIT": Session._quit,
    "VRFY": Session._vrfy,
    "EXPN": Session._expn,
    "HELP": Session._help,
    "STARTTLS": Session._starttls,
    "AUTH": Session._auth,
}

# RFC 3030 section 2: during a chunked transfer only these may come between.
_DURING_BDAT = frozenset({"BDAT", "RSET", "NOOP", "QUIT", "HELP"})


@functools.lru_cache(maxsize=4)
def _date_time(second: int) -> str:
    """
    RFC 5322 section 3.3 date-time of ``second``, in local time.  Formatting
    one took 2.5 % of the reactor thread into Maildir (issue 7), and under
    load hundreds of messages arrive in the same second.
    """
    return formatdate(second, localtime=True)
