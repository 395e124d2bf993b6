"""
Backup-domain recipient checking with real processes: mxb asks mxa (the
primary of example.org) with an RCPT probe, resolving it through the loopback
DNS server; mxc checks a static list.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.network import MXA, MXB, MXC, MXNetwork, Node, Settings, network

pytestmark = pytest.mark.integration

PROBE = '[backup]\nverify_recipients = "probe"\nprobe_cache_ttl = 60\n'
LIST = '[backup]\nverify_recipients = "list"\nrecipients = ["bob@example.org"]\n'


@pytest.fixture
def net(tmp_path: Path) -> Iterator[MXNetwork]:
    """The DNS server running; the mailx processes set up by each test."""
    with network(tmp_path) as running:
        yield running


def backup(net: MXNetwork, address: str, extra: str) -> Node:
    settings = Settings(local=("localhost",), backup=("example.org",), extra=extra)
    return net.add(address, settings)


def rcpt_replies(node: Node, recipients: list[str]) -> list[tuple[int, bytes]]:
    """The replies ``node`` gives to RCPT for each recipient, in one transaction."""
    with smtplib.SMTP(node.address, node.port, timeout=60) as client:
        client.ehlo("client.example.net")
        client.mail("someone@example.net")
        return [client.rcpt(recipient) for recipient in recipients]


def test_probe_refuses_what_the_primary_refuses(net: MXNetwork) -> None:
    """mxb takes mxa's users and refuses unknown ones with 550 5.1.1."""
    mxa = net.add(MXA, Settings(local=("example.org",)))
    mxb = backup(net, MXB, PROBE)
    mxa.start()
    mxb.start()

    answers = rcpt_replies(
        mxb, ["bob@example.org", "nobody@example.org", "postmaster@example.org"]
    )

    assert [(code, text[:5]) for code, text in answers] == [
        (250, b"2.1.5"),
        (550, b"5.1.1"),
        (250, b"2.1.5"),
    ]
    # The probe named the recipient to mxa and sent no message.
    assert "reject: RCPT from" in mxa.log()
    assert ": accepted from=" not in mxa.log()
    assert "result=refuse (refused by mxa.example.org[127.0.0.2])" in mxb.log()


def test_probe_accepts_when_the_primary_is_down(net: MXNetwork) -> None:
    """With mxa down, mxb accepts an address it cannot verify instead of refusing."""
    mxb = backup(net, MXB, PROBE)
    mxb.start()

    ((code, text),) = rcpt_replies(mxb, ["nobody@example.org"])

    assert (code, text[:5]) == (250, b"2.1.5")
    assert "accepted unverified" in mxb.log()


def test_list_takes_only_listed_recipients(net: MXNetwork) -> None:
    """mxc with a static list takes bob and postmaster and refuses others."""
    mxc = backup(net, MXC, LIST)
    mxc.start()

    answers = rcpt_replies(
        mxc, ["BOB@example.org", "alice@example.org", "postmaster@example.org"]
    )

    assert [code for code, _ in answers] == [250, 550, 250]
