"""
Local recipients: which addresses of the local domains exist, and which
Maildirs their mail goes to.

Theory of operation: ``LocalRecipients.resolve`` answers with the list of
mailboxes (domain, local part) an address delivers to, or ``None`` for "no
such user" (550 5.1.1).  A local part is looked up without regard to case, and
its Maildir directory is named by the lower-cased local part: mailx treats
``Bob`` and ``bob`` as one mailbox, a deliberate choice that RFC 5321 section
2.4 leaves to the receiving host.  For ``local@domain`` in a local domain, the
first rule that applies wins:

1. a local part that could leave the mail root on disk (a slash, NUL, a
   leading dot, "..") does not exist;
2. an alias for ``local@domain``, then for ``local``, expands to its targets;
3. ``postmaster`` always exists (RFC 5321 section 4.5.1), in its own Maildir;
4. the local part exists if ``mailboxes.users`` lists it, or (with
   ``mailboxes.existing``) if its Maildir directory exists;
5. a catch-all alias ``@domain`` expands to its targets;
6. otherwise there is no such user.

The aliases file is read when ``LocalRecipients`` is made, and again on
``reload_aliases`` (SIGHUP), and every alias is expanded then for every local
domain, so a mistake in the file (a target outside the local domains, a loop,
too deep a chain) stops mailx at start-up, or leaves the old aliases in force
on a reload, with the file and line rather than failing a delivery later.  The
file format is described in etc/aliases.example.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mailx.address import Address
from mailx.config import Config, ConfigError, is_safe_local_part
from mailx.files import read_regular_file

# How deep aliases may refer to aliases; sendmail's MaxAliasRecursion default.
MAX_ALIAS_DEPTH = 10
# How many mailboxes one address may expand to; Postfix's
# virtual_alias_expansion_limit default.
MAX_ALIAS_EXPANSION = 1000

POSTMASTER = "postmaster"

# A local part as the aliases file may write it: a dot-string of RFC 5322
# atext (less "/", which no local part on disk may hold) or any non-ASCII.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+=?^_`{|}~.\-\u0080-\U0010ffff]+")


@dataclass(frozen=True)
class Mailbox:
    """A Maildir under the mail root: <root>/<domain>/<local_part>/."""

    domain: str
    local_part: str

    def maildir(self, root: str) -> str:
        return os.path.join(root, self.domain, self.local_part)


_T = TypeVar("_T")
_Fail = Callable[[str], ConfigError]

# A name in the aliases file: (local part, domain); the domain is None for a
# name that applies in every local domain.
_Name = tuple[str, str | None]


@dataclass(frozen=True)
class _Alias:
    """One line of the aliases file."""

    targets: tuple[_Name, ...]
    line: int


@dataclass
class AliasTable:
    """The aliases file, parsed: names to their targets, with line numbers."""

    source: str
    # local@domain, and local in every local domain.
    exact: dict[tuple[str, str], _Alias]
    any_domain: dict[str, _Alias]
    # @domain.
    catch_all: dict[str, _Alias]

    def find(self, local_part: str, domain: str) -> _Alias | None:
        """The alias for ``local_part@domain``: the exact one first."""
        alias = self.exact.get((local_part, domain))
        if alias is None:
            alias = self.any_domain.get(local_part)
        return alias


def empty_aliases() -> AliasTable:
    return AliasTable("", {}, {}, {})


def load_aliases(path: str, local_domains: Sequence[str]) -> AliasTable:
    """Read and parse the aliases file at ``path``; ConfigError names the line."""
    try:
        text = read_regular_file(path).decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    return parse_aliases(text, path, local_domains)


def parse_aliases(text: str, source: str, local_domains: Sequence[str]) -> AliasTable:
    """Parse aliases text; ``source`` names the file in error messages."""
    table = empty_aliases()
    table.source = source
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        _parse_line(table, line, number, local_domains)
    return table


def _parse_line(
    table: AliasTable, line: str, number: int, local_domains: Sequence[str]
) -> None:
    def fail(why: str) -> ConfigError:
        return ConfigError(f"{table.source}:{number}: {why}")

    name, colon, rest = line.partition(":")
    name = name.strip().lower()
    if not colon:
        raise fail("expected 'name: target, target'")

    targets = []
    for item in rest.split(","):
        target = _parse_address(item.strip().lower(), local_domains)
        if isinstance(target, str):
            raise fail(f"target {item.strip()!r}: {target}")
        targets.append(target)
    alias = _Alias(tuple(targets), number)

    if name.startswith("@"):
        catch_all = name[1:].removesuffix(".")
        if catch_all not in local_domains:
            raise fail(f"catch-all {name!r}: not a local domain")
        _add(table.catch_all, catch_all, alias, fail)
        return
    parsed = _parse_address(name, local_domains)
    if isinstance(parsed, str):
        raise fail(f"name {name!r}: {parsed}")
    local_part, domain = parsed
    if domain is None:
        _add(table.any_domain, local_part, alias, fail)
    else:
        _add(table.exact, (local_part, domain), alias, fail)


def _add(names: dict[_T, _Alias], key: _T, alias: _Alias, fail: _Fail) -> None:
    if key in names:
        raise fail(f"defined again (first on line {names[key].line})")
    names[key] = alias


def _parse_address(text: str, local_domains: Sequence[str]) -> _Name | str:
    """``local`` or ``local@domain`` (lower-case), or why it is refused."""
    local_part, at, domain = text.rpartition("@")
    if not at:
        local_part, domain = text, ""
    if not local_part:
        return "a local part is required"
    if not _LOCAL_PART.fullmatch(local_part) or not is_safe_local_part(local_part):
        return "not a usable local part"
    if not at:
        return (local_part, None)
    domain = domain.removesuffix(".")
    if domain not in local_domains:
        return "not in a local domain"
    return (local_part, domain)


class LocalRecipients:
    """The recipients of the local domains, from the configuration."""

    def __init__(self, config: Config) -> None:
        mailboxes = config.mailboxes
        self.root = mailboxes.root
        self.domains = config.domains.local
        self._users = frozenset(mailboxes.users)
        self._existing = mailboxes.existing
        self.aliases_path = mailboxes.aliases
        self.reload_aliases()

    def reload_aliases(self) -> None:
        """
        Read the aliases file again; ConfigError names the line, and then
        the aliases in force stay as they were.
        """
        aliases = empty_aliases()
        if self.aliases_path:
            aliases = load_aliases(self.aliases_path, self.domains)
        self._expanded, self._catch_all = _expand_all(aliases, self.domains)

    @property
    def alias_count(self) -> int:
        """The addresses and catch-alls the aliases file expands."""
        return len(self._expanded) + len(self._catch_all)

    def resolve(self, address: Address) -> list[Mailbox] | None:
        """The mailboxes ``address`` delivers to, or None for no such user."""
        name = self._local_name(address)
        if name is None:
            return None
        local_part, domain = name

        expanded = self._expanded.get(name)
        if expanded is not None:
            return list(expanded)
        # RFC 5321 section 4.5.1: postmaster must exist in every local domain.
        if local_part == POSTMASTER or self._exists(local_part, domain):
            return [Mailbox(domain, local_part)]
        catch_all = self._catch_all.get(domain)
        if catch_all is not None:
            return list(catch_all)
        return None

    def maildir(self, mailbox: Mailbox) -> str:
        """The Maildir directory of ``mailbox`` under the mail root."""
        return mailbox.maildir(self.root)

    def _local_name(self, address: Address) -> tuple[str, str] | None:
        local_part = _unquote(address.local_part).lower()
        domain = address.domain_key
        # RFC 5321 section 4.1.1.3: "<postmaster>" names the postmaster of the
        # host; mailx gives it to the first local domain.
        if not domain and local_part == POSTMASTER:
            domain = self.domains[0]
        if domain not in self.domains or not is_safe_local_part(local_part):
            return None
        return local_part, domain

    def _exists(self, local_part: str, domain: str) -> bool:
        if local_part in self._users or f"{local_part}@{domain}" in self._users:
            return True
        if not self._existing:
            return False
        return os.path.isdir(Mailbox(domain, local_part).maildir(self.root))


def _unquote(local_part: str) -> str:
    """The content of a quoted local part (RFC 5321 section 4.1.2)."""
    if len(local_part) < 2 or not local_part.startswith('"'):
        return local_part
    return re.sub(r"\\(.)", r"\1", local_part[1:-1])


_Expansions = dict[tuple[str, str], tuple[Mailbox, ...]]


def _expand_all(
    table: AliasTable, domains: Sequence[str]
) -> tuple[_Expansions, dict[str, tuple[Mailbox, ...]]]:
    """Expand every alias name in every local domain, and every catch-all."""
    expander = _Expander(table)
    expanded: _Expansions = {}
    for domain in domains:
        locals_here = [local for local, where in table.exact if where == domain]
        for local_part in [*locals_here, *table.any_domain]:
            name = (local_part, domain)
            expanded[name] = expander.name(name, [])[0]

    catch_all = {}
    for domain, alias in table.catch_all.items():
        catch_all[domain] = expander.targets(alias, domain, None, [])[0]
    return expanded, catch_all


class _Expander:
    """Expands aliases to mailboxes, remembering what it has expanded."""

    def __init__(self, table: AliasTable) -> None:
        self.table = table
        # A name's mailboxes and how deep its aliases nest.
        self.done: dict[tuple[str, str], tuple[tuple[Mailbox, ...], int]] = {}

    def name(
        self, name: tuple[str, str], chain: list[tuple[str, str]]
    ) -> tuple[tuple[Mailbox, ...], int]:
        if name not in self.done:
            alias = self.table.find(*name)
            assert alias is not None
            self.done[name] = self.targets(alias, name[1], name, [*chain, name])
        return self.done[name]

    def targets(
        self,
        alias: _Alias,
        domain: str,
        own: tuple[str, str] | None,
        chain: list[tuple[str, str]],
    ) -> tuple[tuple[Mailbox, ...], int]:
        def fail(why: str) -> ConfigError:
            return ConfigError(f"{self.table.source}:{alias.line}: {why}")

        mailboxes: list[Mailbox] = []
        depth = 1
        for local_part, target_domain in alias.targets:
            target = (local_part, target_domain or domain)
            # "bob: bob, archive" keeps a copy in bob's own mailbox.
            if target == own or self.table.find(*target) is None:
                mailboxes.append(Mailbox(target[1], target[0]))
                continue
            if target in chain:
                path = " -> ".join(f"{local}@{where}" for local, where in chain)
                raise fail(f"alias loop: {path} -> {target[0]}@{target[1]}")
            inner, inner_depth = self.name(target, chain)
            mailboxes.extend(inner)
            depth = max(depth, inner_depth + 1)

        if depth > MAX_ALIAS_DEPTH:
            raise fail(f"aliases nest deeper than {MAX_ALIAS_DEPTH} levels")
        unique = tuple(dict.fromkeys(mailboxes))
        if len(unique) > MAX_ALIAS_EXPANSION:
            raise fail(f"expands to more than {MAX_ALIAS_EXPANSION} mailboxes")
        return unique, depth
