"""Tests for mailx.dsn: RFC 3464 reports, parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest

from mailx.address import Address
from mailx.dsn import (
    MAX_RETURNED_CONTENT,
    Action,
    RecipientReport,
    Report,
    build_report,
    decode_xtext,
    encode_xtext,
    split_headers,
    status_of,
)
from mailx.replies import Reply

SENDER = Address("alice", "example.org")
CONTENT = b"From: alice@example.org\r\nSubject: hi\r\n\r\nBody line.\r\n"
REFUSED = Reply(550, "5.1.1", "No such user")


def report(*items: RecipientReport, ret: str | None = None) -> Report:
    return Report(
        reporting_mta="mx.example.net",
        message_id="Q1",
        arrival=1_000_000_000.0,
        now=1_000_000_600.0,
        recipients=list(items),
        ret=ret,
        envid=None,
    )


def failed(local: str, reply: Reply | None = REFUSED) -> RecipientReport:
    return RecipientReport(
        Address(local, "example.com"), Action.FAILED, reply, remote_mta="mx.example.com"
    )


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def blocks(message: EmailMessage) -> list[Any]:
    part = list(message.iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    return list(part.get_payload())


def test_report_is_a_multipart_report_with_three_parts() -> None:
    """A report is multipart/report of text, delivery-status and headers."""
    message = parse(build_report(report(failed("bob")), SENDER, CONTENT))

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    types = [part.get_content_type() for part in message.iter_parts()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.net"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"


def test_delivery_status_fields() -> None:
    """Per-message and per-recipient fields follow RFC 3464."""
    message = parse(build_report(report(failed("bob")), SENDER, CONTENT))
    per_message, per_recipient = blocks(message)

    assert per_message["Reporting-MTA"] == "dns; mx.example.net"
    assert per_message["Arrival-Date"].startswith("Sun, 09 Sep 2001")
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.com"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.com"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"


def test_every_line_ends_with_crlf() -> None:
    """The report uses CRLF line endings only, ready for SMTP."""
    data = build_report(report(failed("bob")), SENDER, CONTENT)
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_full_message_returned_only_under_the_limit() -> None:
    """RET=FULL returns the message unless it exceeds the size limit."""
    small = parse(build_report(report(failed("bob"), ret="FULL"), SENDER, CONTENT))
    assert list(small.iter_parts())[2].get_content_type() == "message/rfc822"

    big = CONTENT + b"x" * MAX_RETURNED_CONTENT + b"\r\n"
    large = parse(build_report(report(failed("bob"), ret="FULL"), SENDER, big))
    returned = list(large.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: hi" in returned.get_content()


def test_delay_report_never_returns_the_body() -> None:
    """A delay warning returns headers only, even with RET=FULL."""
    item = RecipientReport(
        Address("bob", "example.com"),
        Action.DELAYED,
        Reply(450, "4.2.0", "Busy"),
        will_retry_until=1_000_432_000.0,
    )
    message = parse(build_report(report(item, ret="FULL"), SENDER, CONTENT))
    assert list(message.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    [_, block] = blocks(message)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.0"
    assert block["Will-Retry-Until"]


def test_status_without_enhanced_code_comes_from_the_reply_class() -> None:
    """A reply with no enhanced code gives X.0.0 of its class."""
    assert status_of(Reply(554, "", "No"), Action.FAILED) == "5.0.0"
    assert status_of(None, Action.FAILED) == "5.0.0"
    assert status_of(None, Action.DELAYED) == "4.0.0"
    assert status_of(None, Action.RELAYED) == "2.0.0"


def test_xtext_is_decoded() -> None:
    """``+XX`` in xtext becomes the octet it names."""
    assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
    assert decode_xtext("plain") == "plain"


def test_xtext_encoding_round_trips() -> None:
    """ "+", "=", spaces and non-ASCII octets become +XX, and decode back."""
    assert encode_xtext("a+b=c d@example.org") == "a+2Bb+3Dc+20d@example.org"
    assert encode_xtext("plain@example.org") == "plain@example.org"
    assert encode_xtext("\u00e9") == "+C3+A9"
    for text in ("a+b=c d@example.org", "x;y@[127.0.0.1]"):
        assert decode_xtext(encode_xtext(text)) == text


def test_split_headers_stops_at_the_blank_line() -> None:
    """The returned headers end with the last header field's CRLF."""
    assert split_headers(CONTENT) == b"From: alice@example.org\r\nSubject: hi\r\n"


def test_boundary_does_not_occur_in_the_returned_message() -> None:
    """The MIME boundary is chosen so the returned message cannot contain it."""
    data = build_report(report(failed("bob"), ret="FULL"), SENDER, CONTENT)
    boundary = parse(data).get_boundary()
    assert boundary is not None
    assert boundary.encode() not in CONTENT
    assert data.count(f"--{boundary}".encode()) == 4


@pytest.mark.parametrize(
    ("next_hop", "field"),
    [
        ("mx.example.com[192.0.2.25]", "dns; mx.example.com"),
        ("local", None),
        ("", None),
    ],
)
def test_remote_mta_names_the_next_hop_host_only(
    next_hop: str, field: str | None
) -> None:
    """Remote-MTA is the next hop's host name, without its address, and is
    left out for a Maildir here."""
    item = RecipientReport(
        Address("bob", "example.com"), Action.FAILED, None, remote_mta=next_hop
    )
    report = Report(
        reporting_mta="mx.example.net",
        message_id="ID",
        arrival=0.0,
        now=0.0,
        recipients=[item],
    )
    sender = Address("alice", "example.org")
    text = build_report(report, sender, b"Subject: x\r\n\r\nbody\r\n").decode()
    remote = [line for line in text.splitlines() if line.startswith("Remote-MTA:")]
    assert remote == ([f"Remote-MTA: {field}"] if field else [])
