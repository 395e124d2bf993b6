"""
mailx and a real MTA, end to end (issue 6): a private Postfix on loopback as
the primary exchange mailx is the backup for, and Postfix as a sending server
relaying to mailx over STARTTLS.  Postfix never uses DNS or the network; mailx
resolves through the loopback DNS server of ``tests.e2e``.
"""

from __future__ import annotations

import shutil
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.network import (
    MXA,
    POSTFIX_MX,
    MXNetwork,
    Settings,
    message,
    network,
    start_all,
    submit,
    trace,
    wait_for,
)
from tests.peers.postfix import (
    PostfixInstance,
    make_workdir,
    postfix_available,
    why_unavailable,
)
from tests.smtppeer import make_tls_identity

pytestmark = pytest.mark.integration

# Postfix's own sending server in the STARTTLS test: a loopback address of its
# own, outside the exchanges' addresses.
POSTFIX_SENDER = "127.0.0.13"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[MXNetwork]:
    """The DNS server running; the mailx processes set up by each test."""
    if not postfix_available():
        pytest.skip(why_unavailable())
    with network(tmp_path) as running:
        yield running


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    """A work directory the postfix user can enter, removed afterwards."""
    workdir = make_workdir()
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_mailx_backup_holds_mail_while_postfix_primary_is_down(
    net: MXNetwork, postfix_dir: Path
) -> None:
    """mxb queues pf.example mail while Postfix is stopped, then delivers it once."""
    subject = uuid.uuid4().hex
    relay, _, mxb, _ = net.standard()
    primary = PostfixInstance(
        postfix_dir, listen_address=POSTFIX_MX, port=net.mx_port, mydomain="pf.example"
    )
    start_all([relay, mxb])

    try:
        refused = submit(
            relay,
            "alice@example.net",
            ["bob@pf.example"],
            message(subject, to="bob@pf.example"),
        )
        assert refused == {}
        wait_for(lambda: len(mxb.queue_ids()) == 1, "the message queued at mxb")
        wait_for(lambda: "status=deferred" in mxb.log(), "mxb's attempt at Postfix")
        assert primary.messages() == []

        primary.start()
        files = primary.wait_for_messages(1, timeout=30)
        wait_for(lambda: not mxb.queue_ids(), "mxb's queue to drain")
    finally:
        primary.stop()

    assert len(files) == 1, primary.log()
    stored = files[0].read_bytes()
    assert f"Subject: {subject}".encode() in stored
    assert trace(stored.replace(b"\r\n", b"\n")) == [
        "mxb.example.org",
        "smtp.example.net",
    ]
    assert set(mxb.relays_named()) == {"mx.pf.example"}
    assert relay.messages("example.net", "alice") == []


def test_postfix_relays_to_mailx_over_starttls(
    net: MXNetwork, postfix_dir: Path
) -> None:
    """Mail sent through Postfix reaches mxa's Maildir over a TLS session."""
    subject = uuid.uuid4().hex
    identity = make_tls_identity("mxa.example.org")
    tls = '[tls]\ncertificate = "server.pem"\nkey = "server.pem"\n'
    mxa = net.add(MXA, Settings(local=("example.org",), extra=tls))
    mxa.process.workdir.joinpath("server.pem").write_bytes(identity.server_pem)
    mxa.start()
    sender = PostfixInstance(
        postfix_dir,
        listen_address=POSTFIX_SENDER,
        mydomain="pf-sender.example",
        relayhost=MXA,
        relay_port=net.mx_port,
        # Mandatory encryption: without STARTTLS the mail would stay queued.
        client_tls_level="encrypt",
        # Log the TLS session the client establishes.
        main_overrides={"smtp_tls_loglevel": "1"},
    )

    try:
        sender.start()
        with smtplib.SMTP(sender.listen_address, sender.port, timeout=30) as client:
            client.sendmail(
                "carol@pf-sender.example",
                ["bob@example.org"],
                message(subject, to="bob@example.org"),
            )
        marker = f"Subject: {subject}\n".encode()
        wait_for(
            lambda: any(marker in m for m in mxa.messages("example.org", "bob")),
            "the message in mxa's Maildir",
        )
    finally:
        sender.stop()

    (stored,) = mxa.messages("example.org", "bob")
    assert b"by mxa.example.org (mailx) with ESMTPS id" in stored
    assert b"by mx.pf-sender.example (Postfix)" in stored
    assert "TLS connection established to 127.0.0.2" in sender.log()
    assert mxa.queue_ids() == []
