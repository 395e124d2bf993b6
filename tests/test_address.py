"""Parsing reverse and forward paths: the trailing dot of a domain name, and
how a quoted local part is compared."""

from __future__ import annotations

import pytest

from mailx.address import (
    Address,
    AddressError,
    parse_forward_path,
    parse_reverse_path,
    unquoted_local_part,
)


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("<user@example.com.>", Address("user", "example.com")),
        ("<user@Example.COM.>", Address("user", "Example.COM")),
        ("<user@mx.example.com>", Address("user", "mx.example.com")),
        ("<@relay.example:user@example.com.>", Address("user", "example.com")),
        ("<user@[192.0.2.1]>", Address("user", "[192.0.2.1]")),
        ("<user@[IPv6:2001:db8::1]>", Address("user", "[IPv6:2001:db8::1]")),
    ],
)
def test_a_root_dot_is_dropped_and_literals_are_kept(
    argument: str, expected: Address
) -> None:
    """A name's trailing dot is dropped from the address; literals are unchanged."""
    assert parse_forward_path(argument, utf8=False).address == expected
    assert parse_reverse_path(argument, utf8=False).address == expected


def test_a_root_dot_on_a_utf8_domain() -> None:
    """An internationalized name with its root dot is the name without it."""
    parsed = parse_forward_path("<user@bücher.example.> SMTPUTF8", utf8=True)
    assert parsed.address == Address("user", "bücher.example")


@pytest.mark.parametrize(
    "argument",
    [
        "<user@.>",
        "<user@..>",
        "<user@example..com>",
        "<user@example.com..>",
        "<user@.example.com>",
        "<user@[192.0.2.1].>",
        "<user@[IPv6:2001:db8::1].>",
        "<user.@example.com>",
        "<example.com.>",
    ],
)
def test_other_stray_dots_are_still_refused(argument: str) -> None:
    """A lone dot, a doubled dot or a dot after a literal gets 553 as before."""
    with pytest.raises(AddressError) as raised:
        parse_forward_path(argument, utf8=False)
    assert raised.value.reply.code == 553
    with pytest.raises(AddressError) as raised:
        parse_reverse_path(argument, utf8=False)
    assert raised.value.reply.code == 553


@pytest.mark.parametrize(
    ("written", "compared"),
    [
        ('"alice"', "alice"),
        ('"al\\ice"', "alice"),
        ('"j.doe"', "j.doe"),
        ('"al ice"', '"al ice"'),
        ('"alice."', '"alice."'),
        ('""', '""'),
        ("alice", "alice"),
        ('"ü"', "ü"),
    ],
)
def test_a_needless_quoting_is_undone(written: str, compared: str) -> None:
    """A quoted dot-string is compared as the dot-string; other quoted local
    parts keep their quotes (RFC 5321 section 4.1.2)."""
    assert unquoted_local_part(written) == compared
