"""
The mailx configuration: one TOML file, read once at start-up and checked
whole before anything else happens.

Theory of operation: ``load_config`` parses the file with the standard
library's ``tomllib`` and hands each table to the checker of its section.  A
checker refuses keys it does not know, converts each value it knows (or
refuses it), and fills in what is missing from the defaults written on the
section's dataclass.  Checks that tie keys together run last.  The first
problem raises ``ConfigError`` whose message names the key, says what was
wanted and shows what was found; nothing else happens on error.

The result is a tree of frozen dataclasses, ``Config``, one attribute per
section.  Lists become tuples; domain names are stored lower-case without a
trailing dot.

Relative paths are kept as written: they are relative to the current
directory of the process that uses them, which for twistd is its working
directory (``twistd --rundir``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from twisted.internet.endpoints import serverFromString

from mailx.address import AddressError, parse_domain, parse_mailbox

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The largest TCP port number (RFC 793 section 3.1: a 16-bit field).
MAX_PORT = 65535
# The DNS port (RFC 1035 section 4.2).
DNS_PORT = 53
# An address, then optionally a slash and a prefix length without leading zeros.
_CIDR = re.compile(r"[^/]+(?:/(?:0|[1-9][0-9]*))?")
# The IPv4-mapped IPv6 addresses (RFC 4291 section 2.5.5.2).
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and why."""


class HostPort(NamedTuple):
    """A host (a name or an IP address) and a TCP or UDP port."""

    host: str
    port: int


@dataclass(frozen=True)
class ServerConfig:
    """How the SMTP server presents itself and where it listens."""

    # Not socket.getfqdn(): nothing is computed when mailx is imported.
    hostname: str = "localhost"
    # Twisted endpoint strings (twisted.internet.endpoints.serverFromString).
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    # RFC 6409 message submission listeners; they require AUTH.
    submission: tuple[str, ...] = ()
    # RFC 8314 implicit-TLS listeners: plain endpoints that mailx wraps in TLS.
    smtps: tuple[str, ...] = ()
    control_socket: str = "var/mailx/control.sock"
    # Processes serving SMTP: the main one and workers sharing its listeners.
    workers: int = 1


@dataclass(frozen=True)
class DomainsConfig:
    """The domains this exchanger is the final destination or a backup for."""

    local: tuple[str, ...] = ("localhost",)
    backup: tuple[str, ...] = ()


@dataclass(frozen=True)
class MailboxesConfig:
    """Where local mail is stored and which local parts exist."""

    # A Maildir lives at <root>/<domain>/<local-part>/.
    root: str = "var/mailx/mail"
    # Entries "local" (every local domain) or "local@domain", lower-cased.
    users: tuple[str, ...] = ()
    # A local part exists when its Maildir directory exists.
    existing: bool = True
    # The aliases file (see etc/aliases.example), or "" for none.
    aliases: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    """Limits on what one client or one message may use."""

    # Postfix's message_size_limit default.
    max_message_size: int = 10240000
    # RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = 100
    # RFC 5321 section 4.5.3.2.7: the server timeout is at least 5 minutes.
    idle_timeout: float = 300.0
    max_errors: int = 20
    # Postfix's hopcount_limit default (counted Received header fields).
    max_hops: int = 50
    # Postfix's default_process_limit and smtpd_client_connection_count_limit.
    max_connections: int = 100
    max_connections_per_client: int = 50
    max_auth_failures: int = 5


@dataclass(frozen=True)
class TLSConfig:
    """The certificate (PEM, with its chain) and key; both or neither."""

    certificate: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


@dataclass(frozen=True)
class RelayConfig:
    """Clients that may relay to any domain."""

    networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@dataclass(frozen=True)
class AuthConfig:
    """
    The AUTH users file, or "" for none.  One user a line,
    ``user:scrypt-hash:address1,address2`` (``mailx.auth`` reads it; the hash
    string and the addresses are described in etc/mailx.toml).
    """

    users_file: str = ""


@dataclass(frozen=True)
class QueueConfig:
    """The outgoing queue and its retry schedule, in seconds."""

    directory: str = "var/mailx/queue"
    min_retry: float = 300.0
    # Postfix's maximal_backoff_time default.
    max_retry: float = 4000.0
    # RFC 5321 section 4.5.4.1: give up after at least 4-5 days.
    lifetime: float = 432000.0
    # Warn the sender after 4 hours; 0 disables the warning.
    delay_warning: float = 14400.0
    # An address that receives a copy of every failure notice, or "".
    bounce_copy_to: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    """How queued mail is sent on; timeouts in seconds."""

    # RFC 5321 section 4.5.4.2: the SMTP port, 25 as IANA assigns it.
    port: int = 25
    smarthost: HostPort | None = None
    smarthost_user: str = ""
    smarthost_password: str = field(default="", repr=False)
    max_hosts: int = 5
    concurrency: int = 20
    connect_timeout: float = 30.0
    # RFC 5321 section 4.5.3.2.1 to 4.5.3.2.6.
    greeting_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    # Domain (lower-case) -> "may" or "verify".
    tls_policy: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class BackupConfig:
    """How a backup exchanger decides which recipients to accept."""

    # "none", "list" or "probe".
    verify_recipients: str = "none"
    # "local@domain" entries, lower-cased, in backup domains.
    recipients: tuple[str, ...] = ()
    probe_cache_ttl: float = 3600.0


@dataclass(frozen=True)
class DNSConfig:
    """The DNS servers to ask; none means the system resolver."""

    servers: tuple[HostPort, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class LogConfig:
    """The mail log file, or "" to write the mail log to the twistd log only."""

    mail_log: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration, one attribute per section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    mailboxes: MailboxesConfig = field(default_factory=MailboxesConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(path: str | None) -> Config:
    """Read and check the TOML file at ``path``; ``None`` gives the defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    return _build(data)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None


# --- values -------------------------------------------------------------------

# A checker takes the full key name and the value found, and returns the value
# to store or raises ConfigError.
Checker = Callable[[str, object], object]
_T = TypeVar("_T")


def _fail(key: str, wanted: str, value: object) -> ConfigError:
    return ConfigError(f"{key}: must be {wanted}, got {value!r}")


def _integer(minimum: int, maximum: int | None = None) -> Checker:
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if maximum is not None:
        wanted = f"an integer from {minimum} to {maximum}"

    def check(key: str, value: object) -> int:
        # TOML booleans are Python ints; a boolean is never a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, wanted, value)
        if value < minimum or (maximum is not None and value > maximum):
            raise _fail(key, wanted, value)
        return value

    return check


# The longest time a setting may give, about three years: a retry interval
# beyond it would put a message's next attempt past any time an envelope
# may hold (mailx.queue), and no timeout needs more.
MAX_SECONDS = 100_000_000


def _seconds(allow_zero: bool = False) -> Checker:
    wanted = (
        "a number of seconds"
        + (" >= 0" if allow_zero else " > 0")
        + f" and at most {MAX_SECONDS}"
    )

    def check(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, wanted, value)
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
            raise _fail(key, wanted, value)
        if seconds == 0 and not allow_zero:
            raise _fail(key, wanted, value)
        return seconds

    return check


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(key, "a string", value)
    return value


def _path(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _fail(key, "a non-empty path", value)
    return value


def _optional_file(key: str, value: object) -> str:
    """A path to a file that must be readable now, or "" for none."""
    path = _string(key, value)
    if not path:
        return path
    if "\x00" in path or not os.path.isfile(path):
        raise _fail(key, "a readable file or an empty string", value)
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path!r}: {error.strerror}") from None
    return path


def _list_of(
    item: Callable[[str, object], _T],
) -> Callable[[str, object], tuple[_T, ...]]:
    def check(key: str, value: object) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise _fail(key, "a list", value)
        return tuple(item(key, element) for element in value)

    return check


def _one_of(*choices: str) -> Checker:
    wanted = " or ".join(repr(choice) for choice in choices)

    def check(key: str, value: object) -> str:
        if value not in choices:
            raise _fail(key, wanted, value)
        return str(value)

    return check


def _domain(key: str, value: object) -> str:
    wanted = "a domain name"
    if not isinstance(value, str):
        raise _fail(key, wanted, value)
    # A trailing dot names the root; mailx compares names without it.
    name = value[:-1] if value.endswith(".") else value
    try:
        parse_domain(name, utf8=True)
    except AddressError:
        raise _fail(key, wanted, value) from None
    if name.startswith("["):
        raise _fail(key, wanted, value)
    return name.lower()


def _hostname(key: str, value: object) -> str:
    _domain(key, value)
    # Kept as written, case and all, for the greeting; without a trailing dot.
    return str(value).removesuffix(".")


def _endpoint(key: str, value: object) -> str:
    wanted = "a Twisted endpoint string such as 'tcp:25:interface=127.0.0.1'"
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, wanted, value)
    try:
        # The endpoint is built to check the string and thrown away; no reactor
        # is needed for that, so a placeholder stands in for one.
        serverFromString(object(), value)
    except Exception as error:
        # Endpoint parsers (plugins included) raise ValueError, TypeError and
        # more; any of them means the string is unusable.
        raise ConfigError(f"{key}: must be {wanted}, got {value!r} ({error})") from None
    return value


def _network(key: str, value: object) -> Network:
    wanted = (
        "a network in CIDR notation, an address or address/prefix-length with "
        "the length in decimal without leading zeros, such as '192.0.2.0/24'"
    )
    if not isinstance(value, str):
        raise _fail(key, wanted, value)
    _refuse_zone_index(key, value)
    # RFC 4632 section 3.1 and RFC 4291 section 2.3: the length after the
    # slash is a decimal count of bits.  A netmask (/255.0.0.0) or a padded
    # length (/08), which the ipaddress module also takes, is refused.
    if not _CIDR.fullmatch(value):
        raise _fail(key, wanted, value)
    try:
        network = ipaddress.ip_network(value, strict=False)
        host = ipaddress.ip_interface(value).ip
    except ValueError:
        raise _fail(key, wanted, value) from None
    _refuse_everyone(key, value, network)
    # "192.0.2.5/24" may mean the network or the one host; a relay decision
    # is not guessed, so the operator is asked to write which.
    if host != network.network_address:
        raise ConfigError(
            f"{key}: {value!r} has host bits set; write {network} for the network "
            f"or {host}/{host.max_prefixlen} for one host"
        )
    return network


def _networks(key: str, value: object) -> tuple[Network, ...]:
    """Every entry checked alone, then the list checked as a whole."""
    networks = _list_of(_network)(key, value)
    # Entries that each cover part of an address family may together cover
    # all of it (0.0.0.0/1 and 128.0.0.0/1): an open relay all the same.
    ipv4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    ipv6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    ipv4 += [_unmapped(n) for n in ipv6 if n.subnet_of(_IPV4_MAPPED)]
    everything = [
        family
        for family, collapsed in (
            ("IPv4", list(ipaddress.collapse_addresses(ipv4))),
            ("IPv6", list(ipaddress.collapse_addresses(ipv6))),
        )
        if any(network.prefixlen == 0 for network in collapsed)
    ]
    if everything:
        raise ConfigError(
            f"{key}: the entries together cover every {everything[0]} address,"
            " which would make mailx an open relay; list the networks of the"
            " clients that may relay instead, such as '192.0.2.0/24'"
        )
    return networks


def _unmapped(network: ipaddress.IPv6Network) -> ipaddress.IPv4Network:
    """An IPv4-mapped IPv6 network (RFC 4291 section 2.5.5.2) as IPv4."""
    low = int(network.network_address) & 0xFFFFFFFF
    return ipaddress.IPv4Network((low, network.prefixlen - 96))


def _refuse_zone_index(key: str, value: str) -> None:
    # RFC 4007 section 11: "fe80::1%eth0" names an interface of this host, and
    # mailx matches a client's address alone, on whichever interface it came.
    address, slash, prefix = value.partition("/")
    address, percent, zone = address.partition("%")
    if percent:
        raise ConfigError(
            f"{key}: {value!r} has a zone index (%{zone}), which has no meaning "
            "in a network list (a client matches on any interface); "
            f"write {address + slash + prefix!r}"
        )


def _refuse_everyone(key: str, value: str, network: Network) -> None:
    # RFC 2505 section 2: an MTA must refuse to relay for strangers, so no
    # entry may cover a whole address family.  An IPv4 client on an IPv6
    # socket has an address in ::ffff:0:0/96 (RFC 4291 section 2.5.5.2).
    covered = ""
    if network.prefixlen == 0:
        covered = f"every IPv{network.version} address"
    elif isinstance(network, ipaddress.IPv6Network) and network.supernet_of(
        _IPV4_MAPPED
    ):
        covered = f"every IPv4 address (as {_IPV4_MAPPED})"
    if covered:
        raise ConfigError(
            f"{key}: {value!r} covers {covered}, which would make mailx an open "
            "relay; list the networks of the clients that may relay instead, "
            "such as '192.0.2.0/24'"
        )


def _address(key: str, value: object) -> str:
    wanted = "an address local@domain"
    if not isinstance(value, str):
        raise _fail(key, wanted, value)
    try:
        parse_mailbox(value, utf8=True)
    except AddressError:
        raise _fail(key, wanted, value) from None
    return value


def _optional_address(key: str, value: object) -> str:
    if value == "":
        return ""
    return _address(key, value)


def _host_port(text: str, default_port: int | None) -> HostPort:
    """Split "host:port", "[v6]:port" or (with a default port) "host"."""
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(text)
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not port:
        if default_port is None:
            raise ValueError(text)
        return HostPort(host, default_port)
    if not port.isascii() or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise ValueError(text)
    return HostPort(host, int(port))


def _smarthost(key: str, value: object) -> HostPort | None:
    wanted = "'host:port' or an empty string"
    if value == "":
        return None
    if not isinstance(value, str):
        raise _fail(key, wanted, value)
    try:
        host, port = _host_port(value, None)
        if not value.startswith("["):
            parse_domain(host, utf8=False)
        else:
            ipaddress.IPv6Address(host)
    except (ValueError, AddressError):
        raise _fail(key, wanted, value) from None
    return HostPort(host, port)


def _dns_server(key: str, value: object) -> HostPort:
    # An IP address, never a name: finding the server must not need DNS.
    wanted = "an IP address with an optional ':port' ('[v6]:port' for IPv6)"
    if not isinstance(value, str):
        raise _fail(key, wanted, value)
    try:
        if value.count(":") > 1 and not value.startswith("["):
            # A bare IPv6 address, which cannot carry a port without brackets.
            ipaddress.IPv6Address(value)
            return HostPort(value, DNS_PORT)
        host, port = _host_port(value, DNS_PORT)
        ipaddress.ip_address(host)
    except ValueError:
        raise _fail(key, wanted, value) from None
    return HostPort(host, port)


def _tls_policy(key: str, value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _fail(key, "a table of domain = 'may' or 'verify'", value)
    policy: dict[str, str] = {}
    for domain, level in value.items():
        name = _domain(f"{key}.{domain}", domain)
        policy[name] = str(_one_of("may", "verify")(f"{key}.{domain}", level))
    return MappingProxyType(policy)


# --- sections ------------------------------------------------------------------

_SECTIONS: dict[str, tuple[type[Any], dict[str, Checker]]] = {
    "server": (
        ServerConfig,
        {
            "hostname": _hostname,
            "listen": _list_of(_endpoint),
            "submission": _list_of(_endpoint),
            "smtps": _list_of(_endpoint),
            "control_socket": _path,
            # More processes than this would only compete for the same cores.
            "workers": _integer(1, 64),
        },
    ),
    "domains": (
        DomainsConfig,
        {"local": _list_of(_domain), "backup": _list_of(_domain)},
    ),
    "mailboxes": (
        MailboxesConfig,
        {
            "root": _path,
            "users": _list_of(_string),
            "existing": _boolean,
            "aliases": _optional_file,
        },
    ),
    "limits": (
        LimitsConfig,
        {
            "max_message_size": _integer(1),
            "max_recipients": _integer(1),
            "idle_timeout": _seconds(),
            "max_errors": _integer(1),
            "max_hops": _integer(1),
            "max_connections": _integer(1),
            "max_connections_per_client": _integer(1),
            "max_auth_failures": _integer(1),
        },
    ),
    "tls": (TLSConfig, {"certificate": _optional_file, "key": _optional_file}),
    "relay": (RelayConfig, {"networks": _networks}),
    "auth": (AuthConfig, {"users_file": _optional_file}),
    "queue": (
        QueueConfig,
        {
            "directory": _path,
            "min_retry": _seconds(),
            "max_retry": _seconds(),
            "lifetime": _seconds(),
            "delay_warning": _seconds(allow_zero=True),
            "bounce_copy_to": _optional_address,
        },
    ),
    "delivery": (
        DeliveryConfig,
        {
            "port": _integer(1, MAX_PORT),
            "smarthost": _smarthost,
            "smarthost_user": _string,
            "smarthost_password": _string,
            "max_hosts": _integer(1),
            "concurrency": _integer(1),
            "connect_timeout": _seconds(),
            "greeting_timeout": _seconds(),
            "mail_timeout": _seconds(),
            "rcpt_timeout": _seconds(),
            "data_init_timeout": _seconds(),
            "data_block_timeout": _seconds(),
            "data_end_timeout": _seconds(),
            "tls_policy": _tls_policy,
        },
    ),
    "backup": (
        BackupConfig,
        {
            "verify_recipients": _one_of("none", "list", "probe"),
            "recipients": _list_of(_address),
            "probe_cache_ttl": _seconds(allow_zero=True),
        },
    ),
    "dns": (DNSConfig, {"servers": _list_of(_dns_server), "timeout": _seconds()}),
    "log": (LogConfig, {"mail_log": _string}),
}


def _section(name: str, table: object) -> Any:
    kind, checkers = _SECTIONS[name]
    if not isinstance(table, dict):
        raise _fail(name, "a table", table)
    for key in table:
        if key not in checkers:
            raise ConfigError(f"{name}.{key}: unknown key")
    values = {key: checkers[key](f"{name}.{key}", raw) for key, raw in table.items()}
    return dataclasses.replace(kind(), **values)


def _build(data: dict[str, Any]) -> Config:
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
    sections = {name: _section(name, data.get(name, {})) for name in _SECTIONS}
    config = Config(**sections)

    _check_listeners(config)
    config = _check_domains(config)
    config = _check_mailboxes(config)
    config = _check_backup(config)
    _check_tls_and_auth(config)
    _check_queue(config)
    _check_delivery(config)
    return config


# --- checks that tie keys together ----------------------------------------------


def _check_listeners(config: Config) -> None:
    server = config.server
    if not (server.listen or server.submission or server.smtps):
        raise ConfigError(
            "server.listen: at least one of server.listen, server.submission "
            "and server.smtps must name an endpoint"
        )


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _check_domains(config: Config) -> Config:
    local = _unique(config.domains.local)
    backup = _unique(config.domains.backup)
    # RFC 5321 section 4.5.1: postmaster must be deliverable, so some domain
    # must be local.
    if not local:
        raise ConfigError("domains.local: must name at least one domain")
    for name in backup:
        if name in local:
            raise ConfigError(
                f"domains.backup: {name!r} is also in domains.local; "
                "a domain is either local or backup"
            )
    domains = DomainsConfig(local=local, backup=backup)
    return dataclasses.replace(config, domains=domains)


def _check_mailboxes(config: Config) -> Config:
    users = []
    for entry in config.mailboxes.users:
        local_part, at, domain = entry.rpartition("@")
        if not at:
            local_part, domain = entry, ""
        if not is_safe_local_part(local_part) or "@" in local_part:
            raise _fail("mailboxes.users", "entries 'local' or 'local@domain'", entry)
        domain = domain.rstrip(".").lower()
        if at and domain not in config.domains.local:
            raise _fail("mailboxes.users", "addresses in domains.local", entry)
        users.append(f"{local_part.lower()}@{domain}" if at else local_part.lower())
    mailboxes = dataclasses.replace(config.mailboxes, users=_unique(tuple(users)))
    return dataclasses.replace(config, mailboxes=mailboxes)


def _check_backup(config: Config) -> Config:
    backup = config.backup
    recipients = []
    for entry in backup.recipients:
        local_part, _, domain = entry.rpartition("@")
        if domain.lower() not in config.domains.backup:
            raise _fail("backup.recipients", "addresses in domains.backup", entry)
        recipients.append(f"{local_part.lower()}@{domain.lower()}")
    if backup.verify_recipients == "list" and not recipients:
        raise ConfigError(
            "backup.recipients: must not be empty when "
            "backup.verify_recipients is 'list'"
        )
    backup = dataclasses.replace(backup, recipients=_unique(tuple(recipients)))
    return dataclasses.replace(config, backup=backup)


def _check_tls_and_auth(config: Config) -> None:
    tls = config.tls
    if bool(tls.certificate) != bool(tls.key):
        missing = "tls.key" if tls.certificate else "tls.certificate"
        raise ConfigError(
            f"{missing}: tls.certificate and tls.key must be set together"
        )
    if config.server.smtps and not tls.enabled:
        raise ConfigError(
            "server.smtps: implicit-TLS listeners need tls.certificate and tls.key"
        )
    if config.server.submission and not tls.enabled:
        # mailx offers AUTH only under TLS (replies.ENCRYPTION_REQUIRED).
        raise ConfigError(
            "server.submission: submission listeners need tls.certificate and tls.key"
        )
    if config.server.submission and not config.auth.users_file:
        raise ConfigError(
            "server.submission: submission listeners need auth.users_file"
        )


def _check_queue(config: Config) -> None:
    queue = config.queue
    if queue.max_retry < queue.min_retry:
        raise ConfigError(
            f"queue.max_retry: must be >= queue.min_retry ({queue.min_retry:g}), "
            f"got {queue.max_retry:g}"
        )


def _check_delivery(config: Config) -> None:
    delivery = config.delivery
    if delivery.smarthost_user and delivery.smarthost is None:
        raise ConfigError("delivery.smarthost_user: needs delivery.smarthost")
    if bool(delivery.smarthost_user) != bool(delivery.smarthost_password):
        raise ConfigError(
            "delivery.smarthost_password: delivery.smarthost_user and "
            "delivery.smarthost_password must be set together"
        )


# --- local parts on disk ----------------------------------------------------------


def is_safe_local_part(local_part: str) -> bool:
    """
    May this (lower-cased) local part name a directory under the mail root?

    Refused: empty, a slash, NUL or another control character, a leading dot
    (which covers "." and ".." and hidden files) and "..".
    """
    if not local_part or local_part.startswith(".") or ".." in local_part:
        return False
    return not any(
        char == "/" or ord(char) < 0x20 or char == "\x7f" for char in local_part
    )
