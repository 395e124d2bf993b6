"""
Delivery status notifications: RFC 3464 reports in an RFC 6522
multipart/report, built as bytes with CRLF line endings, ready to queue.

The report has three parts: a few sentences for people, the
message/delivery-status part for programs, and the returned message (its
headers, or all of it when RET=FULL asks, RFC 3461 section 4.3).  Nothing
here does I/O; the spool decides when a report is due and queues it.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from mailx.address import Address
from mailx.replies import Reply

# Returning more than this of a message is pointless and risks the report
# itself being refused; 50,000 octets is Postfix's bounce_size_limit default.
MAX_RETURNED_CONTENT = 50_000


class Action(enum.Enum):
    """The Action field of a per-recipient block (RFC 3464 section 2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"


@dataclass(frozen=True)
class RecipientReport:
    """What a report says about one recipient."""

    recipient: Address
    action: Action
    reply: Reply | None
    # The ORCPT parameter as given: "addr-type;xtext" (RFC 3461 section 4.2).
    orcpt: str | None = None
    remote_mta: str = ""
    last_attempt: float | None = None
    # For delayed recipients: when mailx gives up (RFC 3464 section 2.3.9).
    will_retry_until: float | None = None
    # Overrides the status taken from the reply (queue expiry is 5.4.7).
    status: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything one report covers: a message and some of its recipients."""

    reporting_mta: str
    message_id: str
    arrival: float
    now: float
    recipients: list[RecipientReport]
    # RFC 3461 section 4.3 and 4.4: the RET and ENVID parameters of MAIL.
    ret: str | None = None
    envid: str | None = None


def decode_xtext(text: str) -> str:
    """Undo RFC 3461 section 4 xtext: ``+XX`` stands for the octet 0xXX."""
    return re.sub(r"\+([0-9A-F]{2})", lambda match: chr(int(match.group(1), 16)), text)


def encode_xtext(text: str) -> str:
    """
    RFC 3461 section 4: xtext, where "+", "=" and every octet outside "!" to
    "~" is written ``+XX``.
    """
    return "".join(
        chr(octet)
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D)
        else f"+{octet:02X}"
        for octet in text.encode("utf-8")
    )


def _printable(text: str) -> str:
    # RFC 3464 fields are US-ASCII text; anything else is replaced, not sent.
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def status_of(reply: Reply | None, action: Action) -> str:
    """The Status field: the enhanced code, or one made from the reply class."""
    if reply is not None and reply.enhanced:
        return reply.enhanced
    if reply is not None:
        # RFC 3463 section 3.1: X.0.0 when nothing more precise is known.
        return f"{reply.code // 100}.0.0"
    return {Action.FAILED: "5.0.0", Action.DELAYED: "4.0.0"}.get(action, "2.0.0")


def _date(when: float) -> str:
    # RFC 5322 section 3.3 date-time, as RFC 3464 section 2.1.1 asks.
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _subject(report: Report) -> str:
    actions = {r.action for r in report.recipients}
    if Action.FAILED in actions:
        return "Undelivered Mail Returned to Sender"
    if Action.DELAYED in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _explanation(report: Report) -> list[str]:
    lines = [
        f"This is the mail system at {report.reporting_mta}.",
        "",
        f"Your message (queue id {report.message_id}) has this status:",
        "",
    ]
    for item in report.recipients:
        detail = str(item.reply) if item.reply else item.action.value
        lines.append(f"<{_printable(str(item.recipient))}>: {item.action.value}")
        lines.append(f"    {_printable(detail)}")
    if any(r.action is Action.DELAYED for r in report.recipients):
        lines += ["", "No action is required on your part; delivery goes on."]
    return lines


def _per_message_fields(report: Report) -> list[str]:
    fields = []
    # RFC 3464 section 2.2.1: the ENVID as given, after xtext decoding.
    if report.envid:
        fields.append(f"Original-Envelope-Id: {_printable(decode_xtext(report.envid))}")
    # RFC 3464 section 2.2.2 and 2.2.5.
    fields.append(f"Reporting-MTA: dns; {report.reporting_mta}")
    fields.append(f"Arrival-Date: {_date(report.arrival)}")
    return fields


def _per_recipient_fields(item: RecipientReport) -> list[str]:
    fields = []
    # RFC 3464 section 2.3.1: from ORCPT, "addr-type; address".
    if item.orcpt:
        addr_type, _, address = item.orcpt.partition(";")
        decoded = _printable(decode_xtext(address))
        fields.append(f"Original-Recipient: {addr_type}; {decoded}")
    # RFC 3464 section 2.3.2 to 2.3.4.
    fields.append(f"Final-Recipient: rfc822; {_printable(str(item.recipient))}")
    fields.append(f"Action: {item.action.value}")
    fields.append(f"Status: {item.status or status_of(item.reply, item.action)}")
    # RFC 3464 section 2.3.5 and 2.3.6: the host name of the next hop that
    # answered, without its address; none for a Maildir here ("local").
    remote = item.remote_mta.split("[", 1)[0]
    if remote and remote != "local":
        fields.append(f"Remote-MTA: dns; {_printable(remote)}")
    if item.reply is not None:
        diagnostic = _printable(" ".join(str(item.reply).split()))
        fields.append(f"Diagnostic-Code: smtp; {diagnostic}")
    # RFC 3464 section 2.3.7 and 2.3.9.
    if item.last_attempt is not None:
        fields.append(f"Last-Attempt-Date: {_date(item.last_attempt)}")
    if item.will_retry_until is not None:
        fields.append(f"Will-Retry-Until: {_date(item.will_retry_until)}")
    return fields


def split_headers(content: bytes) -> bytes:
    """The header section of a message, with the CRLF that ends the last field."""
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content if content.endswith(b"\r\n") else content + b"\r\n"
    return content[: end + 2]


def _returned_part(report: Report, content: bytes) -> tuple[str, bytes]:
    """The content type and body of the returned message part."""
    failed = any(r.action is Action.FAILED for r in report.recipients)
    # RFC 3461 section 4.3: RET=FULL asks for the whole message; only failure
    # reports return it, and only up to MAX_RETURNED_CONTENT.
    if failed and report.ret == "FULL" and len(content) <= MAX_RETURNED_CONTENT:
        body = content if content.endswith(b"\r\n") else content + b"\r\n"
        return "message/rfc822", body
    # RFC 6522 section 4: text/rfc822-headers for the headers alone.
    return "text/rfc822-headers", split_headers(content)


def _boundary(content: bytes) -> str:
    # RFC 2046 section 5.1.1: the boundary must not occur in the parts.
    while True:
        boundary = f"=_mailx_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary


def build_report(report: Report, sender: Address, content: bytes) -> bytes:
    """The whole DSN message to ``sender`` about ``content``, CRLF-terminated."""
    boundary = _boundary(content)
    returned_type, returned = _returned_part(report, content)
    status_lines = _per_message_fields(report)
    for item in report.recipients:
        status_lines += ["", *_per_recipient_fields(item)]

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {_subject(report)}",
        f"Date: {_date(report.now)}",
        f"Message-ID: {make_msgid(domain=report.reporting_mta)}",
        # RFC 3834 section 5: a report is an automatic response.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status report.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *_explanation(report),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *status_lines,
        "",
        f"--{boundary}",
        f"Content-Type: {returned_type}",
        "Content-Description: Returned message",
        "",
    ]
    head = "\r\n".join(headers).encode("ascii", "replace") + b"\r\n"
    return head + returned + f"\r\n--{boundary}--\r\n".encode("ascii")
