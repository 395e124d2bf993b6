"""
The real peers themselves: a private Postfix instance takes mail on its own
loopback address and delivers it into its Maildir, relays only to a loopback
next hop, and leaves no process behind; swaks drives it.
"""

from __future__ import annotations

import contextlib
import datetime
import smtplib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.peers import SwaksResult, require_loopback, run_swaks, swaks_available
from tests.peers.postfix import (
    PostfixInstance,
    free_port,
    is_running,
    postfix_available,
    running_postfix,
    why_unavailable,
)

PostfixFactory = Callable[..., PostfixInstance]


@pytest.fixture
def postfix_factory() -> Iterator[PostfixFactory]:
    """Start private Postfix instances; stop every one when the test ends."""
    if not postfix_available():
        pytest.skip(why_unavailable())
    with contextlib.ExitStack() as stack:

        def start(**options: Any) -> PostfixInstance:
            return stack.enter_context(running_postfix(**options))

        yield start


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> PostfixInstance:
    """One running instance for the domain postfix.test."""
    return postfix_factory(mydomain="postfix.test")


def _message(marker: str) -> bytes:
    return (
        f"From: sender@client.test\r\nTo: bob@postfix.test\r\n"
        f"Subject: {marker}\r\n\r\nbody {marker}\r\n"
    ).encode()


def _swaks_or_skip() -> None:
    if not swaks_available():
        pytest.skip("swaks is not installed (run .ci/install-peers.sh as root)")


@pytest.mark.integration
def test_smtplib_message_lands_in_maildir(postfix: PostfixInstance) -> None:
    """A message sent with smtplib is delivered once into the Maildir."""
    marker = uuid.uuid4().hex

    with smtplib.SMTP(postfix.listen_address, postfix.port, timeout=30) as client:
        refused = client.sendmail(
            "sender@client.test", ["bob@postfix.test"], _message(marker)
        )

    assert refused == {}
    files = postfix.wait_for_messages(1)
    assert len(files) == 1, postfix.log()
    content = files[0].read_bytes()
    assert f"Subject: {marker}".encode() in content
    assert b"Delivered-To: bob@postfix.test" in content


@pytest.mark.integration
def test_listens_only_on_its_own_address(postfix: PostfixInstance) -> None:
    """The instance answers on its address and refuses the same port elsewhere."""
    other = "127.0.0.1" if postfix.listen_address != "127.0.0.1" else "127.0.0.2"

    with socket.create_connection((postfix.listen_address, postfix.port), 10) as s:
        assert s.recv(512).startswith(b"220 ")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, postfix.port), 10).close()


@pytest.mark.integration
def test_rejects_domains_it_does_not_serve(postfix: PostfixInstance) -> None:
    """A recipient outside its domains, with no relayhost, is refused at RCPT."""
    with smtplib.SMTP(postfix.listen_address, postfix.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        code, _ = client.rcpt("someone@elsewhere.test")

    assert code == 550


@pytest.mark.integration
def test_per_user_mailboxes(postfix_factory: PostfixFactory) -> None:
    """With listed mailboxes, each address gets its own Maildir; others bounce."""
    instance = postfix_factory(
        listen_address="127.0.0.6",
        mydomain="users.test",
        mailboxes=["alice@users.test", "bob@users.test"],
    )

    with smtplib.SMTP(instance.listen_address, instance.port, timeout=30) as client:
        client.sendmail("s@client.test", ["alice@users.test"], _message("to-alice"))
        client.ehlo_or_helo_if_needed()
        client.mail("s@client.test")
        unknown_code, _ = client.rcpt("carol@users.test")

    assert unknown_code == 550
    assert len(instance.wait_for_messages(1, "alice@users.test")) == 1
    assert instance.messages("bob@users.test") == []


@pytest.mark.integration
def test_swaks_sends_through_postfix(postfix: PostfixInstance) -> None:
    """swaks reports the whole dialogue and its message reaches the Maildir."""
    _swaks_or_skip()
    marker = uuid.uuid4().hex

    result = run_swaks(
        postfix.listen_address,
        postfix.port,
        rcpt_to=["bob@postfix.test"],
        headers={"X-Marker": marker},
    )

    assert result.succeeded, result.transcript
    assert result.reply_codes() == [220, 250, 250, 250, 354, 250, 221]
    files = postfix.wait_for_messages(1)
    assert f"X-Marker: {marker}".encode() in files[0].read_bytes()


@pytest.mark.integration
def test_swaks_sees_a_refused_recipient(postfix: PostfixInstance) -> None:
    """swaks fails and shows the 550 when the recipient is refused."""
    _swaks_or_skip()

    result = run_swaks(
        postfix.listen_address, postfix.port, rcpt_to=["x@elsewhere.test"]
    )

    assert not result.succeeded
    assert 550 in result.reply_codes()


@pytest.mark.integration
def test_relays_to_loopback_next_hop_after_flush(
    postfix_factory: PostfixFactory,
) -> None:
    """Mail for a down relayhost is deferred, then delivered once it is up."""
    next_hop_port = free_port("127.0.0.7")
    relay = postfix_factory(
        listen_address="127.0.0.8",
        mydomain="relay.test",
        relayhost="[127.0.0.7]",
        relay_port=next_hop_port,
    )
    with smtplib.SMTP(relay.listen_address, relay.port, timeout=30) as client:
        client.sendmail("s@client.test", ["bob@far.test"], _message("relayed"))

    next_hop = postfix_factory(
        listen_address="127.0.0.7", port=next_hop_port, mydomain="far.test"
    )
    relay.flush()

    files = next_hop.wait_for_messages(1)
    assert len(files) == 1, relay.log()
    assert b"by mx.relay.test (Postfix)" in files[0].read_bytes()


@pytest.mark.integration
def test_starttls_with_given_certificate(
    postfix_factory: PostfixFactory, tmp_path: Path
) -> None:
    """With a certificate and key, the instance offers STARTTLS and mail uses it."""
    _swaks_or_skip()
    cert, key = _self_signed(tmp_path)
    instance = postfix_factory(tls_cert=cert, tls_key=key)

    result = run_swaks(
        instance.listen_address,
        instance.port,
        rcpt_to=["bob@postfix.test"],
        tls=True,
    )

    assert result.succeeded, result.transcript
    assert "220 2.0.0 Ready to start TLS" in result.server_lines()
    assert len(instance.wait_for_messages(1)) == 1


@pytest.mark.integration
def test_stop_leaves_no_process() -> None:
    """Once the instance is stopped, none of its processes is running."""
    if not postfix_available():
        pytest.skip(why_unavailable())

    with running_postfix(listen_address="127.0.0.9") as instance:
        processes = instance.pids()
        assert len(processes) > 1

    assert [pid for pid in processes if is_running(pid)] == []
    assert instance.pids() == []


def test_refuses_a_relayhost_off_loopback(tmp_path: Path) -> None:
    """A relayhost outside 127.0.0.0/8 is refused before anything starts."""
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        PostfixInstance(tmp_path, port=2525, relayhost="[192.0.2.1]", relay_port=25)


def test_refuses_a_relayhost_by_name(tmp_path: Path) -> None:
    """A relayhost given as a host name is refused: it would need DNS."""
    with pytest.raises(ValueError, match="IPv4 address"):
        PostfixInstance(tmp_path, port=2525, relayhost="[mx.example]")


def test_refuses_a_listen_address_off_loopback(tmp_path: Path) -> None:
    """A listen address outside 127.0.0.0/8 is refused."""
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        PostfixInstance(tmp_path, listen_address="0.0.0.0", port=2525)


def test_config_keeps_off_the_network(tmp_path: Path) -> None:
    """The written main.cf disables DNS and sends other domains to error."""
    if not postfix_available():
        pytest.skip(why_unavailable())
    instance = PostfixInstance(tmp_path, listen_address="127.0.0.5", port=2525)

    params = instance.main_cf()

    assert params["smtp_dns_support_level"] == "disabled"
    assert params["smtpd_peername_lookup"] == "no"
    assert params["inet_protocols"] == "ipv4"
    assert params["default_transport"].startswith("error:")
    assert params["relayhost"] == ""
    assert instance.master_cf().startswith("127.0.0.5:2525 inet ")


def test_config_relays_only_to_the_literal(tmp_path: Path) -> None:
    """With a relayhost, main.cf names it as a literal and keeps DNS off."""
    if not postfix_available():
        pytest.skip(why_unavailable())
    instance = PostfixInstance(
        tmp_path, port=2525, relayhost="127.0.0.3", relay_port=2526
    )

    params = instance.main_cf()

    assert params["relayhost"] == "[127.0.0.3]:2526"
    assert params["smtp_dns_support_level"] == "disabled"
    assert "default_transport" not in params


def test_swaks_refuses_a_server_off_loopback() -> None:
    """The swaks helper will not talk to a server outside loopback."""
    with pytest.raises(ValueError, match="loopback"):
        run_swaks("192.0.2.25", 25)


def test_require_loopback_takes_ipv6_loopback() -> None:
    """::1 (bracketed or not) counts as loopback; a host name does not."""
    require_loopback("::1")
    require_loopback("[::1]")
    with pytest.raises(ValueError, match="IP addresses only"):
        require_loopback("localhost")


def test_swaks_transcript_is_parsed_into_reply_codes() -> None:
    """Server lines are read out of a transcript; continuation lines are skipped."""
    transcript = (
        "=== Trying 127.0.0.5:25...\n"
        "<-  220 mx ESMTP\n"
        " -> EHLO c\n"
        "<-  250-mx\n"
        "<-  250 PIPELINING\n"
        " -> MAIL FROM:<a@b>\n"
        "<** 451 4.3.0 try later\n"
    )

    result = SwaksResult(24, transcript)

    assert result.server_lines() == [
        "220 mx ESMTP",
        "250-mx",
        "250 PIPELINING",
        "451 4.3.0 try later",
    ]
    assert result.reply_codes() == [220, 250, 451]
    assert not result.succeeded


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.postfix.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
