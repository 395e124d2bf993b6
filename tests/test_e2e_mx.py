"""
Primary and backup MX end to end (issue 6): a client, smtp.example.net, and
mxa (primary), mxb and mxc (backups) of example.org as real twistd processes
on loopback, with names resolved by a DNS server process on loopback.
"""

from __future__ import annotations

import re
import smtplib
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.network import (
    RELAY,
    MXNetwork,
    Node,
    message,
    network,
    relay_settings,
    start_all,
    strip_trace,
    submit,
    trace,
    wait_for,
)

pytestmark = pytest.mark.integration

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[MXNetwork]:
    """The DNS server running; the mailx processes set up by each test."""
    with network(tmp_path) as running:
        yield running


def delivered(node: Node, subject: str, local_part: str = "bob") -> list[bytes]:
    """The messages with this subject in a Maildir of example.org at ``node``."""
    marker = f"Subject: {subject}\n".encode()
    return [m for m in node.messages("example.org", local_part) if marker in m]


def arrives(node: Node, subject: str) -> None:
    wait_for(lambda: bool(delivered(node, subject)), f"{subject} at {node.address}")


def empty_queue(node: Node) -> None:
    """The node's spool holds nothing, and ``mailx queue list`` says so."""
    wait_for(lambda: not node.queue_ids(), f"an empty queue at {node.address}")
    listing = node.cli("queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "Mail queue is empty"


def accepted_count(node: Node) -> int:
    return len(re.findall(r": accepted from=<", node.log()))


def test_all_up_delivers_into_the_primary_only(net: MXNetwork) -> None:
    """With every exchange up, mail lands once in mxa's Maildir, queued nowhere."""
    subject = uuid.uuid4().hex
    relay, mxa, mxb, mxc = net.standard()
    start_all([relay, mxa, mxb, mxc])

    refused = submit(relay, "alice@example.net", ["bob@example.org"], message(subject))

    assert refused == {}
    arrives(mxa, subject)
    empty_queue(relay)
    (stored,) = delivered(mxa, subject)
    assert trace(stored) == ["mxa.example.org", "smtp.example.net"]
    assert mxa.queue_ids() == []
    assert accepted_count(mxb) == accepted_count(mxc) == 0
    assert set(relay.relays_named()) == {"mxa.example.org"}


def test_primary_never_relays_its_own_domain(net: MXNetwork) -> None:
    """mxa refuses an unknown example.org user at RCPT instead of passing it on."""
    _, mxa, _, _ = net.standard()
    start_all([mxa])

    with smtplib.SMTP(mxa.address, mxa.port, timeout=30) as client:
        client.ehlo("client.example.net")
        client.mail("alice@example.net")
        code, text = client.rcpt("nobody@example.org")

    assert (code, text[:5]) == (550, b"5.1.1")
    assert mxa.queue_ids() == []
    assert mxa.relays_named() == []


@pytest.mark.parametrize("wake", ["flush", "schedule"])
def test_backup_holds_mail_until_the_primary_returns(net: MXNetwork, wake: str) -> None:
    """With mxa down, mxb queues the mail, tries only mxa, then delivers it once."""
    subject = uuid.uuid4().hex
    # For the flush run mxb would wait 5 minutes: only the flush can deliver.
    retry = (300.0, 300.0) if wake == "flush" else (1.0, 2.0)
    relay, mxa, mxb, mxc = net.standard(mx_retry=retry)
    start_all([relay, mxb, mxc])

    submit(relay, "alice@example.net", ["bob@example.org"], message(subject))

    wait_for(lambda: len(mxb.queue_ids()) == 1, "the message queued at mxb")
    empty_queue(relay)
    wait_for(lambda: "status=deferred" in mxb.log(), "mxb's attempt at mxa")
    mxa.start()
    if wake == "flush":
        flushed = mxb.cli("queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
    arrives(mxa, subject)
    empty_queue(mxb)

    assert len(delivered(mxa, subject)) == 1
    (stored,) = delivered(mxa, subject)
    assert trace(stored) == ["mxa.example.org", "mxb.example.org", "smtp.example.net"]
    assert set(mxb.relays_named()) == {"mxa.example.org"}
    assert accepted_count(mxb) == 1
    assert accepted_count(mxc) == 0
    # No bounce and no delay warning went back to the sender.
    assert "notified " not in mxb.log()
    assert relay.messages("example.net", "alice") == []


@pytest.mark.parametrize("first_back", ["mxb", "mxa"])
def test_last_backup_takes_it_when_both_better_are_down(
    net: MXNetwork, first_back: str
) -> None:
    """With mxa and mxb down, mxc takes the mail and it reaches mxa once."""
    subject = uuid.uuid4().hex
    relay, mxa, mxb, mxc = net.standard()
    start_all([relay, mxc])

    submit(relay, "alice@example.net", ["bob@example.org"], message(subject))

    wait_for(lambda: len(mxc.queue_ids()) == 1, "the message queued at mxc")
    empty_queue(relay)
    wait_for(lambda: "status=deferred" in mxc.log(), "mxc's first attempt")
    if first_back == "mxb":
        mxb.start()
        wait_for(lambda: accepted_count(mxb) == 1, "mxc handing it to mxb")
        empty_queue(mxc)
        mxa.start()
    else:
        mxa.start()
        arrives(mxa, subject)
        mxb.start()
    arrives(mxa, subject)
    for node in (mxc, mxb, relay):
        empty_queue(node)

    (stored,) = delivered(mxa, subject)
    assert set(mxc.relays_named()) <= {"mxa.example.org", "mxb.example.org"}
    assert set(mxb.relays_named()) <= {"mxa.example.org"}
    if first_back == "mxb":
        assert trace(stored)[:3] == [
            "mxa.example.org",
            "mxb.example.org",
            "mxc.example.org",
        ]
    else:
        assert trace(stored)[:2] == ["mxa.example.org", "mxc.example.org"]
        assert accepted_count(mxb) == 0


def test_unreachable_domain_bounces_to_the_sender_after_the_lifetime(
    net: MXNetwork,
) -> None:
    """Mail for a domain whose exchanges are all down stays queued, then bounces."""
    subject = uuid.uuid4().hex
    relay = net.add(RELAY, relay_settings(lifetime=4.0))
    start_all([relay])

    submit(relay, "alice@example.net", ["carol@down.example"], message(subject))

    assert len(relay.queue_ids()) == 1
    assert relay.messages("example.net", "alice") == []
    wait_for(
        lambda: bool(relay.messages("example.net", "alice")),
        "the bounce in alice's Maildir",
    )
    empty_queue(relay)
    (bounce,) = relay.messages("example.net", "alice")
    assert b"Return-Path: <>\n" in bounce
    assert b"report-type=delivery-status" in bounce
    assert b"Final-Recipient: rfc822; carol@down.example" in bounce
    assert b"Action: failed" in bounce
    assert f"Subject: {subject}".encode() in bounce
    assert set(relay.relays_named()) <= {"mx1.down.example", "mx2.down.example"}
    assert "expired " in relay.log()


def _corpus() -> list[Path]:
    found = sorted(CORPUS.glob("msg_*.txt"))
    if not found:
        pytest.skip(f"the email test corpus is not installed at {CORPUS}")
    return found


@pytest.mark.parametrize("route", ["primary", "backup"])
def test_real_messages_travel_intact(net: MXNetwork, route: str) -> None:
    """Python's email corpus reaches mxa's Maildir byte for byte, LF-stored."""
    corpus = _corpus()
    relay, mxa, mxb, mxc = net.standard()
    start_all([relay, mxb, mxc] if route == "backup" else [relay, mxa])

    for path in corpus:
        # On the wire every line ends with CRLF (RFC 5321 section 2.3.8).
        wire = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
        assert submit(relay, "alice@example.net", ["bob@example.org"], wire) == {}
    if route == "backup":
        wait_for(lambda: len(mxb.queue_ids()) == len(corpus), "the corpus at mxb")
        mxa.start()
        assert mxb.cli("queue", "flush").returncode == 0

    hops = 3 if route == "backup" else 2
    wait_for(
        lambda: len(mxa.messages("example.org", "bob")) >= len(corpus),
        "the whole corpus at mxa",
    )
    stored = mxa.messages("example.org", "bob")
    assert len(stored) == len(corpus)
    bodies = {strip_trace(m, hops) for m in stored}
    for path in corpus:
        # The stored form: LF line endings, ending with a newline.
        expected = path.read_bytes().replace(b"\r\n", b"\n")
        if not expected.endswith(b"\n"):
            expected += b"\n"
        assert expected in bodies, path.name
