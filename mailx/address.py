"""
Reverse and forward paths, parsed per RFC 5321 section 4.1.2, with the
SMTPUTF8 extensions of RFC 6531 section 3.3.

A path parses into an ``Address`` (or ``None`` for the null reverse path
``<>``); a domain name written with its root dot (``example.com.``) is kept
without it.  Source routes (``<@a,@b:user@c>``) are accepted and ignored, as RFC
5321 section 4.1.1.3 and appendix C ask.  Anything the grammar does not allow
raises ``AddressError`` carrying the reply to send.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailx import replies
from mailx.replies import Reply, ReplyError

# RFC 5321 section 4.5.3.1.1 and 4.5.3.1.2: local part 64 octets, domain 255.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its brackets.
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_LET_DIG = r"[A-Za-z0-9]"
_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ULABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
_ULABEL += r"[A-Za-z0-9\u0080-\U0010ffff])?"

_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_DOT_STRING_UTF8 = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*")
# quoted-pairSMTP: a backslash and the character it quotes.
_QUOTED_PAIR = re.compile(r"\\(.)")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(
    r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
)
_DOMAIN = re.compile(rf"{_LDH_LABEL}(?:\.{_LDH_LABEL})*")
_DOMAIN_UTF8 = re.compile(rf"{_ULABEL}(?:\.{_ULABEL})*")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")


class AddressError(ReplyError):
    """A path or parameter that the grammar does not allow."""


@dataclass(frozen=True)
class Address:
    """A mailbox: local part and domain (a name, or an address literal)."""

    local_part: str
    domain: str

    @property
    def domain_key(self) -> str:
        """The domain as compared: case-folded (RFC 5321 section 2.4)."""
        return self.domain.lower()

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def literal_ip(self) -> str | None:
        """The IP address of an address literal, or None."""
        if not self.is_literal:
            return None
        inner = self.domain[1:-1]
        if inner[:5].lower() == "ipv6:":
            return inner[5:]
        return inner

    @property
    def is_utf8(self) -> bool:
        return not (self.local_part.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        if not self.domain:
            return self.local_part
        return f"{self.local_part}@{self.domain}"


POSTMASTER = Address("postmaster", "")


@dataclass(frozen=True)
class PathArgument:
    """A parsed ``MAIL FROM:`` or ``RCPT TO:`` argument."""

    address: Address | None
    parameters: dict[str, str | None]


def _fail(reply: Reply, why: str) -> AddressError:
    return AddressError(reply.with_text(f"{reply.text}: {why}"))


def parse_mailbox(text: str, utf8: bool, bad: Reply = replies.BAD_RECIPIENT) -> Address:
    """Parse ``Local-part "@" (Domain / address-literal)``."""
    at = text.rfind("@")
    if at <= 0:
        raise _fail(bad, "mailbox must be local-part@domain")
    local_part, domain = text[:at], text[at + 1 :]

    if local_part.startswith('"'):
        quoted = _QUOTED_UTF8 if utf8 else _QUOTED
        if not quoted.fullmatch(local_part):
            raise _fail(bad, "malformed quoted local part")
    else:
        dot_string = _DOT_STRING_UTF8 if utf8 else _DOT_STRING
        if not dot_string.fullmatch(local_part):
            raise _fail(bad, "malformed local part")
    if len(local_part.encode("utf-8")) > MAX_LOCAL_PART:
        raise _fail(bad, "local part longer than 64 octets")

    parse_domain(domain, utf8, bad)
    return Address(local_part, domain)


def parse_domain(domain: str, utf8: bool, bad: Reply = replies.BAD_RECIPIENT) -> str:
    """Check a Domain or an address-literal; return it unchanged."""
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _fail(bad, "domain longer than 255 octets")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _fail(bad, "malformed address literal")
        _check_literal(domain[1:-1], bad)
        return domain
    pattern = _DOMAIN_UTF8 if utf8 else _DOMAIN
    if not pattern.fullmatch(domain):
        raise _fail(bad, "malformed domain")
    return domain


def _check_literal(inner: str, bad: Reply) -> None:
    # RFC 5321 section 4.1.3: IPv4, "IPv6:" and General-address-literal.
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise _fail(bad, "malformed IPv6 address literal") from None
        return
    if re.fullmatch(r"[0-9.]+", inner):
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise _fail(bad, "malformed IPv4 address literal") from None
        return
    if not _GENERAL_LITERAL.fullmatch(inner):
        raise _fail(bad, "malformed address literal")


def parse_path(text: str, utf8: bool, bad: Reply) -> Address:
    """Parse ``"<" [ A-d-l ":" ] Mailbox ">"``."""
    if len(text.encode("utf-8")) > MAX_PATH:
        raise _fail(bad, "path longer than 256 octets")
    if not (text.startswith("<") and text.endswith(">")):
        raise _fail(bad, "path must be enclosed in <>")
    inner = text[1:-1]
    if inner.startswith("@"):
        # RFC 5321 section 4.1.1.3: source routes are accepted and ignored.
        colon = inner.find(":")
        if colon < 0:
            raise _fail(bad, "malformed source route")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise _fail(bad, "malformed source route")
            parse_domain(hop[1:], utf8, bad)
        inner = inner[colon + 1 :]
    return parse_mailbox(_without_root_dot(inner), utf8, bad)


def _without_root_dot(mailbox: str) -> str:
    """The mailbox with one trailing dot dropped from a domain name."""
    # RFC 5321 section 4.1.2's Domain has no trailing dot; a deliberate
    # departure: "example.com." is the fully qualified example.com (RFC 1034
    # section 3.1), which clients send and other servers accept.  The address
    # keeps the name without it, so policy, delivery and next hop see one name.
    domain = mailbox[mailbox.rfind("@") + 1 :]
    if domain.endswith(".") and not domain.startswith("["):
        return mailbox[:-1]
    return mailbox


def unquoted_local_part(local_part: str) -> str:
    """
    The local part as mailx compares it: a quoted string whose content is a
    dot-string names the same mailbox as that dot-string (RFC 5321 section
    4.1.2), so ``"alice"`` is ``alice``.  Any other local part is returned as
    written, quotes included, so it never equals an unquoted one.
    """
    if len(local_part) >= 2 and local_part[0] == local_part[-1] == '"':
        content = _QUOTED_PAIR.sub(r"\1", local_part[1:-1])
        if _DOT_STRING_UTF8.fullmatch(content):
            return content
    return local_part


def split_path_and_parameters(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` where the path may hold quoted spaces."""
    if not argument.startswith("<"):
        # Clients that omit the brackets are told so by parse_path.
        path, _, rest = argument.partition(" ")
        return path, rest
    in_quotes = False
    escaped = False
    for index, char in enumerate(argument):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            rest = argument[index + 1 :]
            if rest and not rest.startswith(" "):
                raise _fail(replies.SYNTAX_ERROR, "parameters must follow a space")
            return argument[: index + 1], rest
    return argument, ""


def parse_parameters(text: str) -> dict[str, str | None]:
    """Parse ``esmtp-param *(SP esmtp-param)``; keywords upper-cased."""
    parameters: dict[str, str | None] = {}
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword):
            raise _fail(replies.SYNTAX_ERROR, f"malformed parameter {item!r}")
        if equals and not _ESMTP_VALUE.fullmatch(value):
            raise _fail(replies.SYNTAX_ERROR, f"malformed value for {keyword}")
        # RFC 5321 section 4.1.2 and the extensions: a parameter appears once.
        if keyword.upper() in parameters:
            raise _fail(replies.SYNTAX_ERROR, f"{keyword.upper()} given twice")
        parameters[keyword.upper()] = value if equals else None
    return parameters


def parse_reverse_path(argument: str, utf8: bool) -> PathArgument:
    """Parse the argument of ``MAIL FROM:`` (after the colon)."""
    path, rest = split_path_and_parameters(argument.strip())
    parameters = parse_parameters(rest)
    # SMTPUTF8 may be given on this very command (RFC 6531 section 3.4).
    utf8 = utf8 or "SMTPUTF8" in parameters
    if path == "<>":
        return PathArgument(None, parameters)
    address = parse_path(path, True, replies.BAD_SENDER)
    if address.is_utf8 and not utf8:
        raise AddressError(replies.UTF8_NOT_REQUESTED)
    return PathArgument(address, parameters)


def parse_forward_path(argument: str, utf8: bool) -> PathArgument:
    """Parse the argument of ``RCPT TO:``; ``<postmaster>`` is allowed."""
    path, rest = split_path_and_parameters(argument.strip())
    parameters = parse_parameters(rest)
    # RFC 5321 section 4.1.1.3: "<Postmaster>" without a domain, any case.
    if path.lower() == "<postmaster>":
        return PathArgument(POSTMASTER, parameters)
    address = parse_path(path, True, replies.BAD_RECIPIENT)
    if address.is_utf8 and not utf8:
        raise AddressError(replies.UTF8_NOT_REQUESTED)
    return PathArgument(address, parameters)
