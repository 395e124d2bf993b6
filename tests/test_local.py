"""Tests for mailx.local: which local addresses exist and where they deliver."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mailx.address import POSTMASTER, Address, parse_forward_path
from mailx.config import ConfigError, DomainsConfig, MailboxesConfig, load_config
from mailx.local import (
    MAX_ALIAS_DEPTH,
    LocalRecipients,
    Mailbox,
    load_aliases,
    parse_aliases,
)

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "aliases.example"
DOMAINS = ("example.com", "example.org")


def make(
    tmp_path: Path,
    aliases: str | None = None,
    users: tuple[str, ...] = (),
    existing: bool = True,
    aliases_path: str = "",
) -> LocalRecipients:
    """LocalRecipients for DOMAINS with its mail root in tmp_path/mail."""
    if aliases is not None:
        path = tmp_path / "aliases"
        path.write_text(aliases, encoding="utf-8")
        aliases_path = str(path)
    config = dataclasses.replace(
        load_config(None),
        domains=DomainsConfig(local=DOMAINS),
        mailboxes=MailboxesConfig(
            root=str(tmp_path / "mail"),
            users=users,
            existing=existing,
            aliases=aliases_path,
        ),
    )
    return LocalRecipients(config)


def refused(tmp_path: Path, aliases: str) -> str:
    with pytest.raises(ConfigError) as caught:
        make(tmp_path, aliases)
    return str(caught.value)


def boxes(*addresses: str) -> list[Mailbox]:
    result = []
    for address in addresses:
        local_part, _, domain = address.partition("@")
        result.append(Mailbox(domain, local_part))
    return result


def mkmaildir(tmp_path: Path, domain: str, local_part: str) -> None:
    (tmp_path / "mail" / domain / local_part).mkdir(parents=True)


def test_unknown_user(tmp_path: Path) -> None:
    """An address nothing names does not exist."""
    recipients = make(tmp_path)

    assert recipients.resolve(Address("nobody", "example.com")) is None


def test_other_domain(tmp_path: Path) -> None:
    """An address outside the local domains is not a local recipient."""
    recipients = make(tmp_path, users=("bob",))

    assert recipients.resolve(Address("bob", "example.net")) is None
    assert recipients.resolve(Address("bob", "[127.0.0.1]")) is None


def test_listed_user_in_every_domain(tmp_path: Path) -> None:
    """A users entry without a domain exists in every local domain."""
    recipients = make(tmp_path, users=("bob",), existing=False)

    assert recipients.resolve(Address("bob", "example.com")) == boxes("bob@example.com")
    assert recipients.resolve(Address("bob", "example.org")) == boxes("bob@example.org")


def test_listed_user_in_one_domain(tmp_path: Path) -> None:
    """A users entry with a domain exists in that domain only."""
    recipients = make(tmp_path, users=("carol@example.org",), existing=False)

    assert recipients.resolve(Address("carol", "example.org")) == boxes(
        "carol@example.org"
    )
    assert recipients.resolve(Address("carol", "example.com")) is None


def test_case_insensitive(tmp_path: Path) -> None:
    """Local parts and domains match without regard to case; the Maildir is lower."""
    recipients = make(tmp_path, users=("bob",), existing=False)

    assert recipients.resolve(Address("BoB", "EXAMPLE.com")) == boxes("bob@example.com")


def test_non_ascii_local_part_is_lower_cased(tmp_path: Path) -> None:
    """A non-ASCII local part finds the Maildir named by its lower-case form."""
    mkmaildir(tmp_path, "example.com", "j\u00f6rg")
    recipients = make(tmp_path)

    assert recipients.resolve(Address("J\u00d6RG", "example.com")) == [
        Mailbox("example.com", "j\u00f6rg")
    ]


def test_quoted_local_part(tmp_path: Path) -> None:
    """A quoted local part is the same as its content unquoted."""
    recipients = make(tmp_path, users=("bob",), existing=False)

    assert recipients.resolve(Address('"Bob"', "example.com")) == boxes(
        "bob@example.com"
    )
    assert recipients.resolve(Address('"b\\ob"', "example.com")) == boxes(
        "bob@example.com"
    )


def test_existing_maildir(tmp_path: Path) -> None:
    """With existing = true, a Maildir directory makes its local part exist."""
    mkmaildir(tmp_path, "example.com", "dave")
    recipients = make(tmp_path)

    assert recipients.resolve(Address("Dave", "example.com")) == boxes(
        "dave@example.com"
    )
    assert recipients.resolve(Address("dave", "example.org")) is None


def test_existing_is_checked_at_lookup(tmp_path: Path) -> None:
    """A Maildir made after start-up is found without a restart."""
    recipients = make(tmp_path)
    assert recipients.resolve(Address("erin", "example.com")) is None

    mkmaildir(tmp_path, "example.com", "erin")

    assert recipients.resolve(Address("erin", "example.com")) == boxes(
        "erin@example.com"
    )


def test_existing_false_ignores_directories(tmp_path: Path) -> None:
    """With existing = false, a Maildir directory alone is not a user."""
    mkmaildir(tmp_path, "example.com", "dave")
    recipients = make(tmp_path, existing=False)

    assert recipients.resolve(Address("dave", "example.com")) is None


def test_maildir_path(tmp_path: Path) -> None:
    """A mailbox's Maildir is <root>/<domain>/<local-part>."""
    recipients = make(tmp_path)

    path = recipients.maildir(Mailbox("example.com", "bob"))

    assert path == str(tmp_path / "mail" / "example.com" / "bob")


@pytest.mark.parametrize("local_part", ["postmaster", "PostMaster", "POSTMASTER"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_postmaster_always_exists(tmp_path: Path, local_part: str, domain: str) -> None:
    """postmaster exists in every local domain, in any case, with nothing set up."""
    recipients = make(tmp_path, existing=False)

    assert recipients.resolve(Address(local_part, domain)) == [
        Mailbox(domain, "postmaster")
    ]


def test_bare_postmaster_goes_to_first_domain(tmp_path: Path) -> None:
    """RCPT TO:<Postmaster> without a domain goes to the first local domain."""
    recipients = make(tmp_path, existing=False)
    parsed = parse_forward_path("<POSTMASTER>", utf8=False).address
    assert parsed is not None

    assert recipients.resolve(POSTMASTER) == boxes("postmaster@example.com")
    assert recipients.resolve(parsed) == boxes("postmaster@example.com")


def test_bare_other_name_does_not_exist(tmp_path: Path) -> None:
    """Only postmaster may come without a domain."""
    recipients = make(tmp_path, users=("bob",))

    assert recipients.resolve(Address("bob", "")) is None


def test_postmaster_alias(tmp_path: Path) -> None:
    """An alias for postmaster is followed, also for the bare postmaster."""
    recipients = make(tmp_path, "postmaster: alice@example.org\n")

    assert recipients.resolve(Address("postmaster", "example.com")) == boxes(
        "alice@example.org"
    )
    assert recipients.resolve(POSTMASTER) == boxes("alice@example.org")


def test_catch_all_does_not_take_postmaster(tmp_path: Path) -> None:
    """A catch-all leaves postmaster in its own Maildir."""
    recipients = make(tmp_path, "@example.com: alice\n")

    assert recipients.resolve(Address("postmaster", "example.com")) == boxes(
        "postmaster@example.com"
    )


def test_alias_to_local_part_takes_address_domain(tmp_path: Path) -> None:
    """A bare target is in the domain of the address being delivered."""
    recipients = make(tmp_path, "sales: bob, carol\n")

    assert recipients.resolve(Address("Sales", "example.org")) == boxes(
        "bob@example.org", "carol@example.org"
    )
    assert recipients.resolve(Address("sales", "example.com")) == boxes(
        "bob@example.com", "carol@example.com"
    )


def test_exact_alias_beats_any_domain_alias(tmp_path: Path) -> None:
    """An alias for local@domain wins over one for local."""
    recipients = make(tmp_path, "info: bob\ninfo@example.org: carol@example.com\n")

    assert recipients.resolve(Address("info", "example.org")) == boxes(
        "carol@example.com"
    )
    assert recipients.resolve(Address("info", "example.com")) == boxes(
        "bob@example.com"
    )


def test_alias_beats_existing_mailbox(tmp_path: Path) -> None:
    """An alias wins over a Maildir of the same name."""
    mkmaildir(tmp_path, "example.com", "frank")
    recipients = make(tmp_path, "frank: gina\n")

    assert recipients.resolve(Address("frank", "example.com")) == boxes(
        "gina@example.com"
    )


def test_catch_all(tmp_path: Path) -> None:
    """A catch-all takes unknown local parts of its domain only."""
    mkmaildir(tmp_path, "example.org", "dave")
    recipients = make(tmp_path, "@example.org: dave\n", users=("bob",))

    assert recipients.resolve(Address("anything", "example.org")) == boxes(
        "dave@example.org"
    )
    assert recipients.resolve(Address("bob", "example.org")) == boxes("bob@example.org")
    assert recipients.resolve(Address("anything", "example.com")) is None


def test_catch_all_targets_expand(tmp_path: Path) -> None:
    """A catch-all's targets are expanded like any alias's."""
    recipients = make(tmp_path, "team: bob, carol\n@example.com: team\n")

    assert recipients.resolve(Address("x", "example.com")) == boxes(
        "bob@example.com", "carol@example.com"
    )


def test_recursive_expansion(tmp_path: Path) -> None:
    """Aliases naming aliases expand to the mailboxes at the end, once each."""
    recipients = make(
        tmp_path,
        "all: staff, board\nstaff: bob, carol\nboard: carol, dave@example.org\n",
    )

    assert recipients.resolve(Address("all", "example.com")) == boxes(
        "bob@example.com", "carol@example.com", "dave@example.org"
    )


def test_alias_naming_itself(tmp_path: Path) -> None:
    """An alias that names itself keeps a copy in its own Maildir."""
    recipients = make(tmp_path, "bob: bob, archive\n")

    assert recipients.resolve(Address("bob", "example.com")) == boxes(
        "bob@example.com", "archive@example.com"
    )


def test_alias_naming_itself_in_another_domain(tmp_path: Path) -> None:
    """An alias for every domain may send all domains to one of them."""
    recipients = make(tmp_path, "bob: bob@example.com\n")

    assert recipients.resolve(Address("bob", "example.org")) == boxes("bob@example.com")
    assert recipients.resolve(Address("bob", "example.com")) == boxes("bob@example.com")


def test_alias_loop(tmp_path: Path) -> None:
    """A loop through two aliases stops start-up, naming file, line and path."""
    path = tmp_path / "aliases"

    message = refused(tmp_path, "# staff\na: b\nb: c, a\n")

    assert message == (
        f"{path}:3: alias loop: a@example.com -> b@example.com -> a@example.com"
    )


def test_alias_loop_across_domains(tmp_path: Path) -> None:
    """A loop through two domains is found too."""
    message = refused(
        tmp_path, "x@example.com: x@example.org\nx@example.org: x@example.com\n"
    )

    assert "alias loop: x@example.com -> x@example.org -> x@example.com" in message


def test_depth_limit(tmp_path: Path) -> None:
    """Aliases may nest MAX_ALIAS_DEPTH levels deep but not one more."""
    chain = "".join(f"a{n}: a{n + 1}\n" for n in range(MAX_ALIAS_DEPTH))
    deeper = "".join(f"a{n}: a{n + 1}\n" for n in range(MAX_ALIAS_DEPTH + 1))

    recipients = make(tmp_path, chain)
    message = refused(tmp_path, deeper)

    assert recipients.resolve(Address("a0", "example.com")) == boxes(
        f"a{MAX_ALIAS_DEPTH}@example.com"
    )
    assert message.endswith(f":1: aliases nest deeper than {MAX_ALIAS_DEPTH} levels")


BAD_ALIASES = [
    ("bob alice\n", "expected 'name: target, target'"),
    ("bob: alice@example.net\n", "target 'alice@example.net': not in a local domain"),
    ("bob: ../etc\n", "target '../etc': not a usable local part"),
    ("bob: a/b\n", "target 'a/b': not a usable local part"),
    ("bob: .hidden\n", "target '.hidden': not a usable local part"),
    ("bob:\n", "target '': a local part is required"),
    ("bob: alice,\n", "target '': a local part is required"),
    ("bob: @example.com\n", "target '@example.com': a local part is required"),
    ("b b: alice\n", "name 'b b': not a usable local part"),
    ("bob@example.net: alice\n", "name 'bob@example.net': not in a local domain"),
    ("@example.net: alice\n", "catch-all '@example.net': not a local domain"),
    ("bob: a\nBOB: b\n", "defined again (first on line 3)"),
]


@pytest.mark.parametrize(("text", "why"), BAD_ALIASES)
def test_malformed_aliases(tmp_path: Path, text: str, why: str) -> None:
    """A malformed aliases file stops start-up, naming file and line."""
    path = tmp_path / "aliases"
    line = text.count("\n")

    message = refused(tmp_path, "# comment\n\n" + text)

    assert message == f"{path}:{line + 2}: {why}"


def test_aliases_file_missing(tmp_path: Path) -> None:
    """An aliases file that cannot be read stops start-up, naming it."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_aliases(str(tmp_path / "absent"), DOMAINS)


def test_aliases_file_not_utf8(tmp_path: Path) -> None:
    """An aliases file that is not UTF-8 stops start-up, naming it."""
    path = tmp_path / "aliases"
    path.write_bytes(b"bob: \xff\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_aliases(str(path), DOMAINS)


def test_shipped_example(tmp_path: Path) -> None:
    """The shipped etc/aliases.example parses and means what it says."""
    recipients = make(tmp_path, aliases_path=str(SHIPPED))

    assert recipients.resolve(Address("abuse", "example.org")) == boxes(
        "alice@example.com"
    )
    # bob is an alias too, which keeps a copy in an archive.
    assert recipients.resolve(Address("sales", "example.com")) == boxes(
        "bob@example.com", "archive@example.com", "carol@example.com"
    )
    assert recipients.resolve(Address("bob", "example.org")) == boxes(
        "bob@example.org", "archive@example.org"
    )
    assert recipients.resolve(Address("whoever", "example.org")) == boxes(
        "dave@example.org"
    )
    assert recipients.resolve(Address("whoever", "example.com")) is None


def test_parse_aliases_names_the_source() -> None:
    """Errors from parse_aliases carry the source name given."""
    with pytest.raises(ConfigError, match=r"^table:1: "):
        parse_aliases("bob alice", "table", DOMAINS)


TRAVERSALS = [
    '".."',
    '"."',
    '"../example.org/bob"',
    '"a/../../x"',
    '".hidden"',
    '"a\\/b"',
    '"nul\\\x00"',
    '"a..b"',
]


@pytest.mark.parametrize("aliases", [None, "@example.com: catchall\n"])
@pytest.mark.parametrize("local_part", TRAVERSALS)
def test_path_traversal(tmp_path: Path, local_part: str, aliases: str | None) -> None:
    """A local part that could leave its domain directory does not exist."""
    for domain in DOMAINS:
        (tmp_path / "mail" / domain).mkdir(parents=True)
    mkmaildir(tmp_path, "example.org", "bob")
    mkmaildir(tmp_path, "example.com", ".hidden")
    mkmaildir(tmp_path, "example.com", "a..b")
    (tmp_path / "mail" / "x").mkdir()
    (tmp_path / "mail" / "example.com" / "a" / "b").mkdir(parents=True)
    recipients = make(tmp_path, aliases)

    assert recipients.resolve(Address(local_part, "example.com")) is None


@pytest.mark.parametrize("local_part", ["..", ".", "../x", ".profile"])
def test_path_traversal_unquoted(tmp_path: Path, local_part: str) -> None:
    """Unquoted dot forms do not exist either, even with a catch-all."""
    (tmp_path / "mail" / "example.com").mkdir(parents=True)
    recipients = make(tmp_path, "@example.com: catchall\n")

    assert recipients.resolve(Address(local_part, "example.com")) is None


def test_reload_reads_the_aliases_file_again(tmp_path: Path) -> None:
    """reload_aliases takes a changed file; a broken one raises and the
    aliases in force stay as they were."""
    recipients = make(tmp_path, "sales: bob\n", users=("bob", "carol"))
    aliases = tmp_path / "aliases"

    aliases.write_text("sales: carol\n", encoding="utf-8")
    recipients.reload_aliases()
    assert recipients.resolve(Address("sales", "example.com")) == boxes(
        "carol@example.com"
    )

    aliases.write_text("sales: carol\ninfo: x@elsewhere.example\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="aliases:2"):
        recipients.reload_aliases()
    assert recipients.resolve(Address("sales", "example.com")) == boxes(
        "carol@example.com"
    )
    assert recipients.resolve(Address("info", "example.com")) is None
