"""
SMTP replies: a basic code (RFC 5321 section 4.2), an enhanced status code
(RFC 3463, carried as RFC 2034 says) and plain words.

Every reply mailx sends comes from this module, so operators can grep the texts
and tests can name what they expect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``enhanced`` is empty where RFC 2034 allows no code."""

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def lines(self) -> list[str]:
        """The text lines of the reply, each with the enhanced code when set."""
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return [prefix + line for line in self.text.split("\n")]

    def to_bytes(self) -> bytes:
        """Encode per RFC 5321 section 4.2.1: ``code-text`` lines, last ``code sp``."""
        # Kept on the reply (not a field: equality and hash are unchanged),
        # since most replies are module constants sent many times.
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            wire = self._encode()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _encode(self) -> bytes:
        if "\n" not in self.text:
            # One line, as most are (a queue id in the text makes a new one
            # for every message).
            prefix = f"{self.enhanced} " if self.enhanced else ""
            return f"{self.code} {prefix}{self.text}\r\n".encode()
        lines = self.lines()
        last = len(lines) - 1
        return "".join(
            f"{self.code}{' ' if index == last else '-'}{line}\r\n"
            for index, line in enumerate(lines)
        ).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines())}"


class ReplyError(Exception):
    """An error that carries the reply a server should send for it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# Made once per host name: one of each a connection (issue 7).
@functools.lru_cache(maxsize=16)
def greeting(hostname: str) -> Reply:
    # RFC 5321 section 4.2: the greeting carries no enhanced code (RFC 2034).
    return Reply(220, "", f"{hostname} ESMTP mailx ready")


@functools.lru_cache(maxsize=16)
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
CANNOT_VERIFY = Reply(
    252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"
)
HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS\n"
    "See RFC 5321",
)

# 4yz: temporary.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
STORAGE_FAILED = Reply(451, "4.3.0", "Message could not be stored, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")

# 5yz: permanent.
UNRECOGNIZED = Reply(500, "5.5.1", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
HELO_FIRST = Reply(503, "5.5.1", "Send EHLO or HELO first")
MAIL_FIRST = Reply(503, "5.5.1", "Send MAIL first")
RCPT_FIRST = Reply(503, "5.5.1", "No valid recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
BDAT_IN_PROGRESS = Reply(503, "5.5.1", "DATA not allowed during a BDAT transfer")
BINARY_NEEDS_BDAT = Reply(503, "5.6.1", "BODY=BINARYMIME requires BDAT")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
BAD_DESTINATION = Reply(550, "5.1.2", "Bad destination mailbox address")
BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(553, "5.1.3", "Bad recipient address syntax")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum")
LINE_IN_DATA_TOO_LONG = Reply(
    554, "5.6.0", "Message rejected: a text line is longer than 1000 octets"
)
BARE_LINE_ENDING = Reply(
    554,
    "5.6.11",
    "Message rejected: bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)",
)
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (Received headers), mail loop?")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "MAIL or RCPT parameter not recognized")
UTF8_NOT_REQUESTED = Reply(
    553, "5.6.7", "Non-ASCII address requires SMTPUTF8 on MAIL FROM"
)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for AUTH")

# AUTH (RFC 4954 section 6).
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot decode the authentication response")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")

# Outbound delivery (mailx/mx.py, mailx/client.py, mailx/outbound.py).
DELIVERED = Reply(250, "2.0.0", "Delivered")
DNS_TEMPORARY = Reply(451, "4.4.3", "Directory server failure")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist")
NULL_MX = Reply(556, "5.1.10", "Recipient domain accepts no mail (null MX, RFC 7505)")
MAIL_LOOP = Reply(554, "5.4.6", "Mail loop: no exchange better than this host")
LITERAL_NOT_ALLOWED = Reply(550, "5.1.2", "Address literals are not delivered to")
NO_ROUTE = Reply(451, "4.4.4", "No usable next hop, will retry")
CONNECT_FAILED = Reply(451, "4.4.1", "No answer from next hop")
CONNECTION_DROPPED = Reply(451, "4.4.2", "Connection to next hop dropped")
NEXT_HOP_TIMEOUT = Reply(451, "4.4.2", "Next hop timed out")
TLS_REQUIRED_FAILED = Reply(451, "4.7.5", "TLS required by policy but not established")
TLS_INJECTION = Reply(451, "4.7.0", "Next hop sent data in the clear after STARTTLS")
NEXT_HOP_PROTOCOL_ERROR = Reply(451, "4.5.0", "Next hop broke the SMTP protocol")
NEXT_HOP_GREETING_REFUSED = Reply(451, "4.4.0", "Next hop refused service at greeting")
TOO_BIG_FOR_NEXT_HOP = Reply(
    552, "5.3.4", "Message is larger than the next hop accepts"
)
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Next hop lacks SMTPUTF8, needed by the addresses")
NEEDS_UTF8_HEADERS = Reply(
    554, "5.6.9", "Next hop lacks SMTPUTF8, needed by the UTF-8 header fields"
)
NEEDS_8BITMIME = Reply(
    554, "5.6.3", "Next hop lacks 8BITMIME and the message cannot be converted"
)
NEEDS_BINARYMIME = Reply(
    554, "5.6.3", "Next hop lacks BINARYMIME, needed by the message"
)
SMARTHOST_AUTH_FAILED = Reply(451, "4.7.0", "Authentication to the smarthost failed")

# The spool (mailx/spool.py): a recipient still pending when the queue
# lifetime runs out (RFC 5321 section 4.5.4.1; RFC 3463 X.4.7).
DELIVERY_EXPIRED = Reply(554, "5.4.7", "Delivery time expired: queue lifetime exceeded")

# Submission (mailx/policy.py): an authenticated user's reverse path that the
# users file does not give it (RFC 6409 section 6.1; RFC 3463 X.7.1).
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")

# RFC 3030 section 2: a BDAT chunk larger than the message size limit.
CHUNK_TOO_BIG = Reply(
    552, "5.3.4", "BDAT chunk exceeds the message size limit; closing connection"
)
